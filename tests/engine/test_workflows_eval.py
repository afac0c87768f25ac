"""Real workflows: scoring a run on an external dataset (``evaluate --split all``) and the cross-fold summary
(``proseg summarize``), end to end through the CLI on tiny synthetic data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from proseg.commands.evaluate import default_output
from tests.engine.engine_helpers import fails, ok

EVAL_FAST = ["--samples", "2", "--figures", "0", "--mode", "diverse"]


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other patients (another synthetic seed), prepared with another intensity transform than the run's data."""
    d = tmp_path_factory.mktemp("ext") / "other"
    ok("prepare", "synthetic", "1", d, "--cases", "6", "--size", "32", "--folds", "2", "--intensity", "minmax", "-q")
    return d


@pytest.fixture(scope="module")
def two_folds(proseg_run: Path, synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run evaluated on the test parts of folds 0 and 1: ``EV/test-fold0`` and ``EV/test-fold1``."""
    ev = tmp_path_factory.mktemp("ev")
    for k in (0, 1):
        ok("evaluate", proseg_run, "--data", synth, "--split", "test", "--fold", k, "--out", ev / f"test-fold{k}",
           *EVAL_FAST, "--convention", "both")
    return ev


def test_evaluate_split_all_on_an_external_dataset(proseg_run: Path, external: Path, tmp_path: Path) -> None:
    out = tmp_path / "ext-eval"
    res = ok("evaluate", proseg_run, "--data", external, "--split", "all", "--out", out, *EVAL_FAST)
    report = json.loads((out / "metrics.json").read_text())
    assert report["split"] == "all" and report["fold"] is None and report["num_cases"] == 6
    assert report["dataset"] == str(external) and report["results"]["diverse"]["standard"]["num_cases"] == 6
    # the preprocessing check ran: the run was trained on z-scored images, this store is min-max scaled
    assert any("intensity" in w for w in report["warnings"]), report["warnings"]
    assert "intensity" in res.output + (getattr(res, "stderr", "") or "")
    # the run's fold (0) is irrelevant, and so is a fold the external store does not have
    ok("evaluate", proseg_run, "--data", external, "--split", "all", "--fold", "3", "--out", tmp_path / "f3",
       *EVAL_FAST)
    again = json.loads((tmp_path / "f3" / "metrics.json").read_text())
    assert again["results"] == report["results"]


def test_split_all_default_output_and_training_store_warning(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    assert default_output(proseg_run, "all", 0, "data/other") == proseg_run / "eval" / "all-other"
    assert default_output(proseg_run, "test", 2) == proseg_run / "eval" / "test-fold2"
    out = tmp_path / "own"
    ok("evaluate", proseg_run, "--data", synth, "--split", "all", "--out", out, *EVAL_FAST, "--max-cases", "2")
    report = json.loads((out / "metrics.json").read_text())
    assert any("training patients" in w for w in report["warnings"]), report["warnings"]


def test_evaluate_external_errors(proseg_run: Path, tmp_path: Path) -> None:
    two_ch = tmp_path / "two-channels"
    ok("prepare", "synthetic", "2", two_ch, "--cases", "4", "--size", "32", "--folds", "2", "--image-channels", "2",
       "-q")
    fails("evaluate", proseg_run, "--data", two_ch, "--split", "all", "--out", tmp_path / "e", *EVAL_FAST,
          match="2 image channel(s)")
    fails("evaluate", proseg_run, "--data", two_ch, "--split", "everything", "--out", tmp_path / "e2",
          match="--split must be train, val, test or all")


def _metrics(p: Path) -> dict:
    return json.loads((p / "metrics.json").read_text())


def test_summarize_two_folds_by_hand(two_folds: Path, tmp_path: Path) -> None:
    out = tmp_path / "summary"
    ok("summarize", str(two_folds / "test-fold*"), "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    f0, f1 = _metrics(two_folds / "test-fold0"), _metrics(two_folds / "test-fold1")
    assert summary["folds"] == [0, 1] and summary["num_folds"] == 2 and summary["ddof"] == 0
    assert summary["num_samples"] == 2 and summary["conventions"] == ["standard", "reference"]
    for conv in ("standard", "reference"):
        for key in ("ged", "dice_soft"):
            a = f0["results"]["diverse"][conv]["metrics"][key]["mean"]
            b = f1["results"]["diverse"][conv]["metrics"][key]["mean"]
            got = summary["results"]["diverse"][conv][key]
            assert got["mean"] == pytest.approx((a + b) / 2)
            assert got["std"] == pytest.approx(abs(a - b) / 2)  # population std of two values
            assert got["n"] == 2 and got["per_fold"] == [a, b]
    md = (out / "summary.md").read_text()
    ged = summary["results"]["diverse"]["standard"]["ged"]
    assert "| diverse | standard |" in md and f"{ged['mean']:.4f} ± {ged['std']:.4f}" in md and "ddof=0" in md
    # the same from the two folders named explicitly, printed
    printed = ok("summarize", two_folds / "test-fold1", two_folds / "test-fold0").output
    assert printed == md


def test_summarize_run_folders(two_folds: Path, tmp_path: Path) -> None:
    """Run folders: their eval/<split>-fold<k>/metrics.json (one run per fold, as a CV produces them)."""
    runs = []
    for k in (0, 1):
        run = tmp_path / f"run_fold{k}"
        (run / "eval").mkdir(parents=True)
        (run / "config.yaml").write_text("{}\n")
        shutil.copytree(two_folds / f"test-fold{k}", run / "eval" / f"test-fold{k}")
        runs.append(run)
    text = ok("summarize", str(tmp_path / "run_fold*")).output
    assert text == ok("summarize", two_folds / "test-fold0", two_folds / "test-fold1").output
    fails("summarize", runs[0], runs[1], "--split", "val", match="run `proseg evaluate")


def test_summarize_nan_fold_means_are_left_out(two_folds: Path, tmp_path: Path) -> None:
    fake = tmp_path / "f1"
    shutil.copytree(two_folds / "test-fold1", fake)
    report = _metrics(fake)
    report["results"]["diverse"]["standard"]["metrics"]["ged"]["mean"] = None  # NaN is written as null
    (fake / "metrics.json").write_text(json.dumps(report))
    out = tmp_path / "s"
    ok("summarize", two_folds / "test-fold0", fake, "--out", out)
    ged = json.loads((out / "summary.json").read_text())["results"]["diverse"]["standard"]["ged"]
    a = _metrics(two_folds / "test-fold0")["results"]["diverse"]["standard"]["metrics"]["ged"]["mean"]
    assert ged["n"] == 1 and ged["mean"] == pytest.approx(a) and ged["std"] == 0 and ged["per_fold"] == [a, None]
    assert not math.isnan(ged["mean"])


def _variant(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    report = {**_metrics(dst), **changes}
    (dst / "metrics.json").write_text(json.dumps(report))
    return dst


def test_summarize_refusals(two_folds: Path, tmp_path: Path) -> None:
    f0, f1 = two_folds / "test-fold0", two_folds / "test-fold1"
    fails("summarize", f0, _variant(f0, tmp_path / "dup"), match="two evaluations of fold 0")
    fails("summarize", f0, _variant(f1, tmp_path / "k8", num_samples=8), "--out", tmp_path / "never",
          match="differ in K (--samples)")
    assert not (tmp_path / "never").exists()  # a refused summary writes nothing
    fails("summarize", f0, _variant(f1, tmp_path / "u", estimator="u"), match="differ in GED estimator")
    fails("summarize", f0, _variant(f1, tmp_path / "c", conventions=["standard"]), match="differ in conventions")
    model = {**_metrics(f1)["model"], "name": "prob_unet"}
    fails("summarize", f0, _variant(f1, tmp_path / "m", model=model), match="differ in model")
    fails("summarize", f0, _variant(f1, tmp_path / "all", split="all", fold=None), match="without a fold")
    fails("summarize", str(tmp_path / "nothing-*"), match="matches nothing")
    fails("summarize", tmp_path / "absent", match="no such file or folder")
    (tmp_path / "empty").mkdir()
    fails("summarize", tmp_path / "empty", match="neither an evaluation folder")


def test_summarize_warns_on_subsampled_folds(two_folds: Path, tmp_path: Path) -> None:
    v = _variant(two_folds / "test-fold1", tmp_path / "sub", max_cases=3)
    out = tmp_path / "s"
    res = ok("summarize", two_folds / "test-fold0", v, "--out", out)
    assert "subsample" in res.output + (getattr(res, "stderr", "") or "")
    assert "subsample" in json.loads((out / "summary.json").read_text())["warnings"][0]
