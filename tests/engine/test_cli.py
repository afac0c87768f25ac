"""End-to-end CLI tests on tiny synthetic data with the real registered models (tiny presets)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from proseg.data.store import open_store
from proseg.models import load_model
from tests.engine.engine_helpers import TRAIN_FAST, fails, is_root, ok


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_train_writes_a_complete_run(proseg_run: Path, synth: Path) -> None:
    run = proseg_run
    info = json.loads((run / "run.json").read_text())
    assert info["manifest_sha256"] == _sha(synth / "manifest.json")
    assert info["proseg_version"] and "git_commit" in info and info["world_size"] == 1
    cfg = (run / "config.yaml").read_text()
    assert "max_steps: 4" in cfg and "preset: tiny" in cfg and str(synth) in cfg  # the resolved config
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "seg", "kl_tau", "kl_z"} <= set(rows[0])
    assert (run / "val.jsonl").read_text().strip()
    model = load_model(run / "checkpoints" / "best")  # loadable without the training code
    assert model.num_raters == 4 and model.in_channels == 1
    state = torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state and "scaler" in state


def test_resume_continues_the_run(proseg_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(proseg_run, run)
    ok("train", "--resume", run, "train.max_steps=6")
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    info = json.loads((run / "run.json").read_text())
    assert info["resumes"][0]["at_step"] == 4
    assert torch.load(run / "checkpoints" / "last" / "state.pt", weights_only=True)["step"] == 6


def test_evaluate_writes_metrics_cases_and_figures(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    ok("evaluate", proseg_run, "--data", synth, "--split", "test", "--out", out, "--samples", "3",
       "--convention", "both", "--figures", "1", "--max-cases", "3")
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_samples"] == 3 and m["estimator"] == "v" and m["split"] == "test" and m["num_cases"] == 3
    assert m["checkpoint_sha256"] == _sha(proseg_run / "checkpoints" / "best" / "model.safetensors")
    assert set(m["results"]) == {"personalized", "diverse"}
    for mode in ("personalized", "diverse"):
        assert set(m["results"][mode]) == {"standard", "reference"}
        summ = m["results"][mode]["standard"]
        assert summ["convention"] == "standard" and summ["num_cases"] == 3
        assert 0.0 <= summ["metrics"]["dice_soft"]["mean"] <= 1.0 and summ["metrics"]["ged"]["std"] >= 0
    assert m["results"]["personalized"]["standard"]["num_predictions"] == 4  # R per-rater predictions
    assert m["results"]["diverse"]["standard"]["num_predictions"] == 3  # K samples
    lines = (out / "cases.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 * 2 * 2
    assert len(list((out / "figures").glob("*.png"))) == 1
    # readable by the rest of a team: mkdtemp/mkstemp would leave 0700 / 0600
    assert out.stat().st_mode & 0o777 == 0o755
    assert next((out / "figures").glob("*.png")).stat().st_mode & 0o777 == 0o644
    # the same numbers again (per-case generators seeded from (seed, case_id))
    ok("evaluate", proseg_run, "--data", synth, "--out", out, "--samples", "3", "--convention", "both",
       "--figures", "0", "--max-cases", "3", "--force")
    assert json.loads((out / "metrics.json").read_text())["results"] == m["results"]


def test_evaluate_case_stride_takes_every_nth_case_with_the_same_scores(proseg_run: Path, synth: Path,
                                                                       tmp_path: Path) -> None:
    full, strided = tmp_path / "full", tmp_path / "strided"
    common = ("--data", synth, "--split", "test", "--samples", "2", "--mode", "diverse", "--figures", "0")
    ok("evaluate", proseg_run, *common, "--out", full)
    ok("evaluate", proseg_run, *common, "--out", strided, "--case-stride", "2")
    rows_full = (full / "cases.csv").read_text().splitlines()
    rows_strided = (strided / "cases.csv").read_text().splitlines()
    meta = json.loads((strided / "metrics.json").read_text())
    n_full = json.loads((full / "metrics.json").read_text())["num_cases"]
    assert meta["case_stride"] == 2 and meta["num_cases"] == (n_full + 1) // 2
    # one row per case and convention: the strided run holds exactly the even-indexed cases, scored identically
    assert rows_strided[0] == rows_full[0]
    assert rows_strided[1:] == [r for i, r in enumerate(rows_full[1:]) if i % 2 == 0]


def _inputs(synth: Path, d: Path) -> dict[str, Path]:
    store = open_store(synth)
    img = np.asarray(store.images[0, 0])  # z-scored float
    aff = np.diag([0.7, 0.8, 2.5, 1.0])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    d.mkdir()
    nib.save(nib.Nifti1Image(img.astype(np.float32), aff), d / "slice.nii.gz")
    vol = np.stack([np.asarray(store.images[i, 0]) for i in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), aff), d / "vol.nii.gz")
    Image.fromarray(np.linspace(0, 255, 40 * 40).reshape(40, 40).astype(np.uint8)).save(d / "photo.png")
    return {"slice": d / "slice.nii.gz", "vol": d / "vol.nii.gz", "png": d / "photo.png", "aff": aff}  # type: ignore


def test_predict_nifti_and_png(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    inp = _inputs(synth, tmp_path / "in")
    out = tmp_path / "pred_vol"
    ok("predict", proseg_run, inp["vol"], out, "--samples", "3", "--save-samples")
    mean = nib.load(out / "mean.nii.gz")
    assert mean.shape == (32, 32, 3) and np.allclose(mean.affine, inp["aff"])
    samples = nib.load(out / "samples.nii.gz")
    assert samples.shape == (32, 32, 3, 3)
    names = open_store(synth).rater_names
    probs = np.stack([nib.load(out / f"rater-{n}_prob.nii.gz").get_fdata() for n in names])
    mask = nib.load(out / f"rater-{names[0]}_mask.nii.gz").get_fdata()
    assert set(np.unique(mask)) <= {0.0, 1.0} and np.array_equal(mask, probs[0] > 0.5)
    np.testing.assert_allclose(mean.get_fdata(), probs.mean(0), atol=1e-6)
    total, rater, amb = (nib.load(out / f"uncertainty_{k}.nii.gz").get_fdata() for k in ("total", "rater",
                                                                                            "ambiguity"))
    np.testing.assert_allclose(total, rater + amb, atol=1e-6)
    np.testing.assert_allclose(rater, probs.var(0), atol=1e-6)  # variance of the per-rater means
    rep = json.loads((out / "prediction.json").read_text())
    assert rep["num_samples"] == 3 and not rep["notes"]

    ok("predict", proseg_run, inp["slice"], tmp_path / "pred_slice", "--samples", "2")
    m2 = nib.load(tmp_path / "pred_slice" / "mean.nii.gz")
    assert m2.shape == (32, 32) and np.allclose(m2.affine, inp["aff"])

    ok("predict", proseg_run, inp["png"], tmp_path / "pred_png", "--samples", "2")  # 40x40: resized to 32, back
    png = np.asarray(Image.open(tmp_path / "pred_png" / f"rater-{names[1]}_mask.png"))
    assert png.shape == (40, 40) and set(np.unique(png)) <= {0, 255}
    # a folder of inputs: one sub-folder per input
    ok("predict", proseg_run, tmp_path / "in", tmp_path / "pred_all", "--samples", "1")
    assert {p.name for p in (tmp_path / "pred_all").iterdir()} == {"photo", "slice", "vol", "prediction.json"}
    shutil.copyfile(inp["png"], tmp_path / "in" / "slice.png")  # slice.png and slice.nii.gz -> both slice/
    fails("predict", proseg_run, tmp_path / "in", tmp_path / "pred_clash", match="would both write")


def test_score_the_predictions(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    store = open_store(synth)
    rows = store.rows(0, "test")[:1]
    labels = np.asarray(store.masks[rows[0]]).astype(np.uint8)  # (R, H, W)
    np.save(tmp_path / "labels.npy", labels)
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.asarray(store.images[rows[0], 0]), aff), tmp_path / "img.nii.gz")
    ok("predict", proseg_run, tmp_path / "img.nii.gz", tmp_path / "pred", "--samples", "4", "--save-samples")
    samples = nib.load(tmp_path / "pred" / "samples.nii.gz").get_fdata()  # (X, Y, K)
    np.save(tmp_path / "preds.npy", np.moveaxis(samples, -1, 0).astype(np.float32))
    res = ok("score", tmp_path / "labels.npy", tmp_path / "preds.npy", "--json")
    rec = json.loads(res.output)
    assert rec["num_labels"] == 4 and rec["num_predictions"] == 4 and 0.0 <= rec["ged"] <= 2.0


def test_score_choices_are_the_metrics_constants() -> None:
    """``proseg score`` spells its choices out (importing the metrics would load torch on ``--help``): they must
    stay the metrics' own ``CONVENTIONS``, ``ESTIMATORS`` and ``DEFAULT_THRESHOLDS``."""
    import inspect

    from proseg.cli.score import ConventionChoice, EstimatorChoice, _parse_thresholds, score
    from proseg.metrics import CONVENTIONS, DEFAULT_THRESHOLDS, ESTIMATORS

    assert tuple(c.value for c in ConventionChoice) == CONVENTIONS
    assert tuple(e.value for e in EstimatorChoice) == ESTIMATORS
    assert _parse_thresholds(inspect.signature(score).parameters["thresholds"].default) == DEFAULT_THRESHOLDS


def test_model_without_personalized_output_falls_back_clearly(synth: Path, tmp_path: Path) -> None:
    run = tmp_path / "pu"
    ok("train", "-c", "synthetic/prob_unet", "--data", synth, "--out", run,
       *TRAIN_FAST, "train.max_steps=1")
    store = open_store(synth)
    nib.save(nib.Nifti1Image(np.asarray(store.images[0, 0]), np.eye(4)), tmp_path / "x.nii.gz")
    res = ok("predict", run, tmp_path / "x.nii.gz", tmp_path / "pred", "--samples", "2")
    assert "no personalized" in res.output + (getattr(res, "stderr", "") or "")
    files = {p.name for p in (tmp_path / "pred").iterdir()}
    assert {"mean.nii.gz", "uncertainty_total.nii.gz"} <= files
    assert not any(f.startswith("rater-") for f in files) and "uncertainty_rater.nii.gz" not in files
    ok("evaluate", run, "--out", tmp_path / "ev", "--samples", "2", "--max-cases", "1", "--figures", "0")
    assert set(json.loads((tmp_path / "ev" / "metrics.json").read_text())["results"]) == {"diverse"}
    fails("evaluate", run, "--out", tmp_path / "ev2", "--mode", "personalized", match="no personalized output")


# --- bad inputs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from proseg.data.prepare import prepare

    d = tmp_path_factory.mktemp("other")
    prepare("synthetic", "1", d / "rgb", synthetic_options={"cases": 8, "size": 32, "channels": 3})
    ok("prepare", "synthetic", "1", d / "r3", "--cases", "8", "--size", "32", "--raters", "3")
    return {"rgb": d / "rgb", "r3": d / "r3"}


def test_train_bad_inputs(synth: Path, tmp_path: Path) -> None:
    fails("train", "--data", tmp_path / "nope", "--out", tmp_path / "r", "model.preset=tiny", match="nope")
    fails("train", "--data", synth, "--out", tmp_path / "r", "train.epoch=2", match="train.epoch")
    fails("train", "--data", synth, "--out", tmp_path / "r", "model.name=prob_unet", "model.tau_dim=3",
          match="model.args.tau_dim")
    fails("train", "--data", synth, "model.preset=tiny", match="--out")
    fails("train", "--resume", tmp_path / "nothing-here", match="not a run directory")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails("train", "--data", synth, "--out", blocker / "run", "model.preset=tiny", match="cannot write here")


def test_train_refuses_an_existing_run(proseg_run: Path, synth: Path) -> None:
    fails("train", "--data", synth, "--out", proseg_run, "model.preset=tiny", match="--resume")


@pytest.mark.skipif(is_root(), reason="root can write into read-only folders")
def test_unwritable_outputs(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        fails("train", "--data", synth, "--out", ro / "run", "model.preset=tiny", match="cannot write")
        fails("evaluate", proseg_run, "--out", ro / "ev", match="cannot write")
        nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), tmp_path / "x.nii.gz")
        fails("predict", proseg_run, tmp_path / "x.nii.gz", ro / "pred", match="cannot write")
    finally:
        ro.chmod(0o700)


def test_outputs_under_a_file_are_refused(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    fails("evaluate", proseg_run, "--data", synth, "--out", blocker / "ev", match="cannot write here")
    fails("predict", proseg_run, tmp_path / "x.nii.gz", blocker / "pred", match="cannot write here")
    fails("demo", "--out", blocker / "demo", match="cannot write here")
    assert blocker.read_text() == "x"


def test_evaluate_bad_inputs(proseg_run: Path, synth: Path, other_data: dict[str, Path], tmp_path: Path) -> None:
    fails("evaluate", tmp_path / "missing", "--data", synth, match="no such run or checkpoint")
    (tmp_path / "empty").mkdir()
    fails("evaluate", tmp_path / "empty", "--data", synth, match="not a proseg checkpoint")
    fails("evaluate", proseg_run, "--data", other_data["rgb"], "--out", tmp_path / "e1", match="3 image channel")
    fails("evaluate", proseg_run, "--data", other_data["r3"], "--out", tmp_path / "e2", match="3 raters")
    (tmp_path / "exists").mkdir()
    fails("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "exists", match="--force")
    fails("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "e3", "--split", "holdout", match="--split")
    fails("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "e4", "--fold", "9", match="folds")
    fails("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "e5", "--model-arg", "diverse_mode",
          match="KEY=VALUE")
    fails("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "e6", "--model-arg", "z_channels=3",
          match="not an inference-time argument")
    fails("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "e7", "--model-arg", "diverse_mode=best",
          match="diverse_mode")
    fails("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "e8", "--model-arg", "z_temperature=[1",
          match="not valid YAML")
    assert not any((tmp_path / f"e{i}").exists() for i in (5, 6, 7, 8))


def test_evaluate_model_arg_changes_only_the_sampling_choice(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    common = ("--data", synth, "--mode", "diverse", "-k", "4", "--max-cases", "3", "--figures", "0")
    ok("evaluate", proseg_run, *common, "--out", tmp_path / "a", "--model-arg", "diverse_mode=per_rater")
    ok("evaluate", proseg_run, *common, "--out", tmp_path / "b", "--model-arg", "diverse_mode=prior_classifier")
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert a["model_args"] == {"diverse_mode": "per_rater"}
    # "model" is the configuration that was evaluated (pinned defaults and the override included)
    assert a["model"]["diverse_mode"] == "per_rater" and b["model"]["diverse_mode"] == "prior_classifier"
    assert a["model"]["scale"] == b["model"]["scale"] == 1
    assert a["checkpoint_sha256"] == b["checkpoint_sha256"]
    assert a["results"]["diverse"] != b["results"]["diverse"]  # another way of drawing, other samples


def test_predict_model_arg_is_applied_and_checked(proseg_run: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    ok("predict", proseg_run, tmp_path / "x.png", tmp_path / "p", "--samples", "2", "--model-arg",
       "diverse_mode=per_rater")
    fails("predict", proseg_run, tmp_path / "x.png", tmp_path / "q", "--model-arg", "tau_dim=2",
          match="not an inference-time argument")
    assert not (tmp_path / "q").exists()


def test_predict_bad_inputs(proseg_run: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "rgb.png")
    fails("predict", tmp_path / "missing", tmp_path / "rgb.png", tmp_path / "o1", match="no such run")
    fails("predict", proseg_run, tmp_path / "rgb.png", tmp_path / "o2", match="3 channel(s)")
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2*"))  # nothing half-written
    fails("predict", proseg_run, tmp_path / "none.png", tmp_path / "o3", match="none.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    fails("predict", proseg_run, tmp_path / "bad.png", tmp_path / "o4", match="bad.png")
    (tmp_path / "notes.txt").write_text("x")
    fails("predict", proseg_run, tmp_path / "notes.txt", tmp_path / "o5", match="unsupported input")
    (tmp_path / "exists").mkdir()
    fails("predict", proseg_run, tmp_path / "rgb.png", tmp_path / "exists", match="--force")


def test_demo_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    fails("demo", "--out", tmp_path / "busy", match="not a demo folder")
    fails("demo", "--out", tmp_path / "d", "--minutes", "0", match="--minutes")
    fails("demo", "--out", tmp_path / "d2", "--data", tmp_path / "busy", match="not a prepared dataset")
    assert (tmp_path / "busy" / "thesis.tex").exists()


def test_predict_hdf5_case_with_a_three_channel_model(other_data: dict[str, Path], tmp_path: Path) -> None:
    import h5py

    run = tmp_path / "rgb-run"
    ok("train", "-c", "npc/proseg", "--data", other_data["rgb"], "--out", run,
       *TRAIN_FAST, "train.max_steps=1", "train.batch_size=2")
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "Sample_1.h5", "w") as f:  # an NPC-170 style 3D case: t1, t1c, t2 of D x H x W
        for k in ("t1", "t1c", "t2"):
            f[k] = rng.random((2, 32, 32)).astype(np.float32)
    ok("predict", run, tmp_path / "Sample_1.h5", tmp_path / "pred", "--samples", "2", "--save-samples")
    with h5py.File(tmp_path / "pred" / "prediction.h5", "r") as f:
        assert f["mean"].shape == (2, 32, 32) and f["samples"].shape == (2, 2, 32, 32)
        names = json.loads(f.attrs["rater_names"])
        assert f[f"rater-{names[0]}_prob"].shape == (2, 32, 32)
        np.testing.assert_allclose(f["uncertainty_total"][()],
                                   f["uncertainty_rater"][()] + f["uncertainty_ambiguity"][()], atol=1e-6)
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), tmp_path / "one.nii.gz")
    fails("predict", run, tmp_path / "one.nii.gz", tmp_path / "p2", match="expects 3")


def test_demo_end_to_end_tiny(tmp_path: Path) -> None:
    """The demo's real path (two processes side by side), scaled down to seconds."""
    from proseg.commands.demo import run_demo

    out = tmp_path / "demo"
    report = run_demo(out, minutes=0.05, cases=24, eval_cases=2, num_samples=2, batch_size=4)
    text = report.read_text()
    assert "| ProSeg | personalized | 2 |" in text and "| Prob. U-Net | diverse | 2 |" in text
    assert "| Prob. U-Net | personalized" not in text  # no personalized output: no row
    for name in ("proseg", "prob_unet"):
        assert (out / "runs" / name / "checkpoints" / "best" / "model.safetensors").is_file()
        assert (out / "runs" / name / "eval" / "test-fold0" / "metrics.json").is_file()
    figs = list((out / "figures").glob("*.png"))
    assert len(figs) == 4 and all(f"figures/{f.name}" in text for f in figs)
    assert json.loads((out / "demo.json").read_text())["runs"]["proseg"]["steps"] >= 1
    # a second demo into the same folder clears the previous results and keeps the prepared data for reuse
    from proseg.commands.demo import _prepare_out

    _prepare_out(out, force=False)
    assert sorted(p.name for p in out.iterdir()) == ["data"]


def test_dpersona_stage_two_starts_from_stage_one(synth: Path, tmp_path: Path) -> None:
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    ok("train", "-c", "synthetic/dpersona_stage1", "--data", synth, "--out", s1,
       *TRAIN_FAST, "train.max_steps=1")
    assert json.loads((s1 / "val.jsonl").read_text().splitlines()[-1])["mode"] == "diverse"
    ok("train", "-c", "synthetic/dpersona_stage2", "--data", synth, "--out", s2,
       *TRAIN_FAST, "train.max_steps=1", f"model.init_from={s1}")
    # stage 2 has trained: validation (and evaluation) use the personalized output
    assert json.loads((s2 / "val.jsonl").read_text().splitlines()[-1])["mode"] == "personalized"
    a = load_model(s1 / "checkpoints" / "last").state_dict()
    b = load_model(s2 / "checkpoints" / "last").state_dict()
    frozen = [k for k in a if "prior" in k and k.endswith("weight")]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)  # stage 1 weights carried over, frozen
    fails("train", "-c", "synthetic/prob_unet", "--data", synth, "--out",
          tmp_path / "bad", *TRAIN_FAST, "train.max_steps=1", f"model.init_from={s1}", match="do not fit")
