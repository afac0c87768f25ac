"""The new user's journey of docs/tutorial.md, end to end through the CLI: a folder of NIfTI CTs in HU with three
raters' masks (one rater absent on one case) and the user's own 2-fold split file -> ``prepare folder --window
--splits`` -> ``info`` -> ``train`` per fold -> ``evaluate`` with figures -> ``summarize`` -> ``predict`` on a raw
HU CT stored in another orientation.

The test runs the tutorial itself: its Python block writes the source, and every ``proseg ...`` line of its bash
blocks is run in order, so the commands in the document are exactly the ones tested."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from tests.engine.engine_helpers import REPO, ok

TUTORIAL = REPO / "docs" / "tutorial.md"


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def commands(text: str) -> list[list[str]]:
    """Every ``proseg`` command of the bash blocks, line continuations joined, split as a shell would."""
    out = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("proseg "):
                out.append(shlex.split(line, comments=True)[1:])
    return out


def test_tutorial_from_nifti_folder_to_cross_fold_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nibabel as nib

    text = TUTORIAL.read_text()
    monkeypatch.chdir(tmp_path)
    (script,) = blocks(text, "python")
    exec(compile(script, str(TUTORIAL), "exec"), {"__name__": "tutorial"})

    # the split shown in the tutorial is the one the script writes
    (shown,) = blocks(text, "json")
    assert json.loads(shown) == json.loads(Path("splits.json").read_text())
    assert not Path("src/labels/carol/P03_ct.nii.gz").exists()
    assert nib.load("src/ct/P01_ct.nii.gz").get_fdata().min() < -500  # HU, not [0, 1]

    cmds = commands(text)
    assert [c[0] for c in cmds] == ["prepare", "info", "config", "train", "train", "evaluate", "evaluate",
                                    "summarize", "predict"]
    outputs = {}
    for cmd in cmds:
        outputs[" ".join(cmd[:2])] = ok(*cmd).output

    # the store: the user's folds, the window, carol absent on P03 only
    store = Path("data/ct")
    splits = json.loads((store / "splits.json").read_text())
    assert splits["source"] == "file" and splits["num_folds"] == 2
    given = json.loads(Path("splits.json").read_text())["folds"]
    assert [{p: f[p] for p in ("train", "val", "test")} for f in splits["folds"]] == given
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["intensity"]["mode"] == "window" and manifest["intensity"]["window"] == [-1000.0, 400.0]
    assert manifest["rater_names"] == ["alice", "bob", "carol"]
    assert manifest["counts"]["patients"] == 6 and manifest["counts"]["volumes"] == 6
    present = np.load(store / "rater_present.npy")
    rows = (store / "slices.csv").read_text().splitlines()[1:]
    absent = {r.split(",")[1].split("/")[0] for r, p in zip(rows, present, strict=True) if not p.all()}
    assert absent == {"P03_ct"} and present.shape == (18, 3)
    images = np.load(store / "images.npy")
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert "from file" in outputs["info data/ct"]

    # two runs, two evaluations with figures (the absent rater's case among them)
    for k in (0, 1):
        run = Path(f"runs/ct-f{k}")
        assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
        ev = run / "eval" / f"test-fold{k}"
        metrics = json.loads((ev / "metrics.json").read_text())
        assert metrics["fold"] == k and metrics["split"] == "test"
        figures = sorted(p.name for p in (ev / "figures").glob("*.png"))
        assert len(figures) == 3 and all((ev / "figures" / f).stat().st_size > 1000 for f in figures)
    assert (Path("runs/ct-f0/eval/test-fold0/figures/P03_ct.png")).is_file()

    # the cross-fold table
    summary = json.loads(Path("results/ct-cv/summary.json").read_text())
    assert summary["num_folds"] == 2 and summary["folds"] == [0, 1]
    ged = summary["results"]["personalized"]["standard"]["ged"]
    assert ged["n"] == 2 and len(ged["per_fold"]) == 2 and np.isfinite(ged["mean"])
    assert "± " in Path("results/ct-cv/summary.md").read_text()

    # predictions on the raw LPS CT: the input's shape and affine, the recorded window applied
    src = nib.load("new_ct.nii.gz")
    assert np.sign(np.diag(src.affine)[:2]).tolist() == [-1.0, -1.0]
    out = Path("out/new_ct")
    names = ["mean", "mean_mask", "uncertainty_total", "uncertainty_rater", "uncertainty_ambiguity"]
    names += [f"rater-{r}_{kind}" for r in ("alice", "bob", "carol") for kind in ("prob", "mask")]
    for name in names:
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape == src.shape, name
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-6, err_msg=name)
    mean = nib.load(out / "mean.nii.gz").get_fdata()
    assert np.isfinite(mean).all() and 0.0 <= mean.min() and mean.max() <= 1.0
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["inputs"]["new_ct.nii.gz"]["intensity"]["window"] == [-1000.0, 400.0]
