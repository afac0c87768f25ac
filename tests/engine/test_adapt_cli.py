"""`proseg adapt`: a tiny ProSeg trained on a 3-rater synthetic store, adapted to the 4th rater of the 4-rater store
(same cases, same patient splits); the adapted run through evaluate / predict / info, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from proseg.data.store import open_store
from proseg.models import load_model
from tests.engine.engine_helpers import TRAIN_FAST, cli, ok

NEW = "r3-thin-miss"


@pytest.fixture(scope="module")
def synth3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data") / "synth3"
    ok("prepare", "synthetic", "0", d, "--cases", "24", "--size", "32", "--raters", "3")
    return d


@pytest.fixture(scope="module")
def run3(tmp_path_factory: pytest.TempPathFactory, synth3: Path) -> Path:
    run = tmp_path_factory.mktemp("runs") / "proseg3"
    ok("train", "-c", "synthetic/proseg", "--data", synth3, "--out", run, "--fold", "0",
       *TRAIN_FAST, "train.max_steps=4")
    return run


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory, run3: Path, synth: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "adapted"
    res = ok("adapt", run3, "--data", synth, "--rater", NEW, "--cases", "3", "--steps", "4", "--device", "cpu",
             "--out", out)
    assert f"rater '{NEW}' is rater 3 of 4" in res.output, res.output
    return out


def _fails(*args: object, match: str) -> None:
    res = cli(*[str(a) for a in args])
    out = res.output + (getattr(res, "stderr", "") or "")
    assert res.exit_code != 0 and "error:" in out and match in out, out


def test_adapted_run_layout_and_old_raters_unchanged(run3: Path, adapted: Path, synth: Path) -> None:
    for sub in ("config.yaml", "run.json", "checkpoints/best/model.safetensors", "checkpoints/last/model.json"):
        assert (adapted / sub).is_file(), sub
    info = json.loads((adapted / "run.json").read_text())
    ad = info["adaptation"]
    assert ad["rater"] == NEW and ad["rater_index"] == 3 and len(ad["cases"]) == 3
    store = open_store(synth)
    train_cases = set(store.volume_rows(store.rows(0, "train")))
    assert set(ad["cases"]) <= train_cases and not set(ad["val_cases"]) & set(ad["cases"])
    meta = json.loads((adapted / "checkpoints/best/model.json").read_text())
    assert meta["dataset"]["rater_names"] == store.rater_names and meta["model"]["num_raters"] == 4
    old, new = load_model(run3 / "checkpoints/best"), load_model(adapted / "checkpoints/best")
    assert new.num_raters == 4
    x = torch.as_tensor(np.array(store.images[:3]))
    a = old.sample_personalized(x, 3, generator=torch.Generator().manual_seed(0))
    b = new.sample_personalized(x, 3, generator=torch.Generator().manual_seed(0), raters=range(3))
    assert torch.equal(a, b)
    # the new rater was fitted: its rows moved away from their initial copy
    src = ad["init_rater"]
    k = meta["dataset"]["rater_names"].index(src)
    assert not torch.equal(new.tau.raw_concentration[3], new.tau.raw_concentration[k])


def test_adapted_run_evaluates_predicts_and_shows_tau(adapted: Path, synth: Path, tmp_path: Path) -> None:
    res = ok("evaluate", adapted, "--data", synth, "--split", "test", "--samples", "2", "--figures", "0",
             "--max-cases", "2", "--device", "cpu", "--out", tmp_path / "ev")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "personalized" in json.dumps(metrics), res.output
    from PIL import Image

    img = (np.asarray(open_store(synth).images[0, 0]) * 255).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    ok("predict", adapted, tmp_path / "x.png", tmp_path / "pred", "--samples", "2")
    names = sorted(p.name for p in (tmp_path / "pred").rglob("rater-*"))
    assert any(NEW in n for n in names), names
    out = ok("info", adapted).output
    assert NEW in out and "tau" in out, out
    data = json.loads(ok("info", adapted, "--json").output)
    assert [r["name"] for r in data["raters"]][-1] == NEW
    ok("info", adapted, "--figure", tmp_path / "tau.png")
    assert (tmp_path / "tau.png").stat().st_size > 0


def test_adapt_errors(run3: Path, synth: Path, synth3: Path, tmp_path: Path) -> None:
    _fails("adapt", run3, "--data", synth, "--rater", "nobody", "--cases", "1", "--out", tmp_path / "a",
           match="has no rater 'nobody'")
    _fails("adapt", run3, "--data", synth, "--rater", "r0-over", "--cases", "1", "--out", tmp_path / "b",
           match="already one of the model's raters")
    _fails("adapt", run3, "--data", synth3, "--rater", NEW, "--cases", "1", "--out", tmp_path / "c",
           match="has no rater")
    _fails("adapt", run3, "--data", synth, "--rater", NEW, "--cases", "999", "--out", tmp_path / "d",
           match="only")
    (tmp_path / "list.txt").write_text("no-such-case\n")
    _fails("adapt", run3, "--data", synth, "--rater", NEW, "--case-list", tmp_path / "list.txt", "--out",
           tmp_path / "e", match="not in")


def test_adapt_rater_absent_from_chosen_case(run3: Path, tmp_path: Path) -> None:
    src = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in range(8):
        d = src / f"case{c}"
        d.mkdir(parents=True)
        np.save(d / "image.npy", rng.random((32, 32)).astype(np.float32))
        for r in ("a", "b", "c", "d"):
            if r == "d" and c < 2:
                continue  # rater d drew nothing for cases 0 and 1 (absent, not empty)
            np.save(d / f"mask_{r}.npy", (rng.random((32, 32)) > 0.7).astype(np.uint8))
    store = tmp_path / "store"
    ok("prepare", "folder", src, store, "--allow-missing-raters", "--folds", "2", "--ndim", "2")
    s = open_store(store)
    rows = s.volume_rows(np.arange(len(s)))
    di = s.rater_names.index("d")
    absent = [v for v, r in rows.items() if not np.asarray(s.rater_present)[r, di].any()]
    assert absent
    (tmp_path / "list.txt").write_text(absent[0] + "\n")
    _fails("adapt", run3, "--data", store, "--rater", "d", "--case-list", tmp_path / "list.txt", "--out",
           tmp_path / "o", match="has no mask in")
