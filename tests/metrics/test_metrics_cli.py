"""``proseg score`` through Typer's CliRunner: single files (.npy/.npz/.nii.gz), folders, JSON, errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from proseg.cli.main import app
from proseg.metrics import RECORD_KEYS, case_metrics

runner = CliRunner()
METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _documented_keys() -> list[str]:
    """The record keys in the order of docs/metrics.md's table under "`case_metrics` returns these keys"."""
    text = METRICS_DOC.read_text()
    table = text[text.index("`case_metrics` returns these keys"):].split("\n\n")[1]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return [key for cell in rows for key in re.findall(r"`(\w+)`", cell)]


def test_record_keys_are_the_documented_ones_in_order() -> None:
    assert list(RECORD_KEYS) == _documented_keys()


def _case(seed: int, n: int = 4, k: int = 4, shape: tuple[int, ...] = (12, 12)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, *shape)) > 0.6).astype(np.uint8)
    preds = rng.random((k, *shape)).astype(np.float32)
    return labels, preds


def _run(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["score", *args])
    return res.exit_code, res.output


def test_single_npy_json_has_exactly_the_documented_keys(tmp_path: Path) -> None:
    labels, preds = _case(0)
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "p.npy", preds)
    code, out = _run(str(tmp_path / "l.npy"), str(tmp_path / "p.npy"), "--json")
    assert code == 0, out
    rec = json.loads(out)
    assert list(rec) == list(RECORD_KEYS)
    expected = case_metrics(labels, preds)
    for key in ("ged", "dice_soft", "dice_match", "ci_score", "s_ncc"):
        assert rec[key] == pytest.approx(expected[key], abs=1e-12)
    assert (rec["convention"], rec["estimator"], rec["num_labels"], rec["num_predictions"]) == ("standard", "v", 4, 4)


def test_reference_convention_u_estimator_and_null_for_nan(tmp_path: Path) -> None:
    labels, preds = _case(1, n=3, k=1)  # one prediction: the U-statistic d_pp is undefined -> null
    np.savez(tmp_path / "l.npz", labels=labels)
    np.savez(tmp_path / "p.npz", preds=preds, other=np.zeros(1))
    code, out = _run(
        str(tmp_path / "l.npz"), str(tmp_path / "p.npz"), "--json", "--convention", "reference", "--estimator", "u"
    )
    assert code == 0, out
    rec = json.loads(out)
    assert rec["convention"] == "reference" and rec["estimator"] == "u"
    assert rec["ged"] is None and rec["ged_preds"] is None
    assert "dice_per_rater" not in rec  # M != N
    assert rec["dice_per_rater_matched"].count(None) == 2  # N = 3 > M = 1: two raters unmatched


@pytest.mark.parametrize("shape", [(3, 8, 9), (8, 9)])
def test_nifti_in_predict_layout_pairs_with_npy(tmp_path: Path, shape: tuple[int, ...]) -> None:
    # proseg predict writes (K, D, H, W) as (X, Y, Z, K) = (H, W, D, K) and (K, H, W) as (H, W, K).
    nib = pytest.importorskip("nibabel")
    labels, preds = _case(2, shape=shape)
    np.save(tmp_path / "l.npy", labels)
    order = (2, 3, 1, 0) if len(shape) == 3 else (1, 2, 0)
    nib.save(nib.Nifti1Image(np.transpose(preds, order), np.eye(4)), str(tmp_path / "p.nii.gz"))
    code, out = _run(str(tmp_path / "l.npy"), str(tmp_path / "p.nii.gz"), "--json")
    assert code == 0, out
    rec, expected = json.loads(out), case_metrics(labels, preds)
    for key in ("ged", "dice_soft", "dice_per_rater", "s_ncc"):
        assert rec[key] == pytest.approx(expected[key], abs=1e-9), key


def test_folders_summary_and_csv(tmp_path: Path) -> None:
    (tmp_path / "L").mkdir()
    (tmp_path / "P").mkdir()
    recs = []
    for i, k in enumerate((4, 6, 5)):
        labels, preds = _case(10 + i, k=k)
        np.save(tmp_path / "L" / f"case_{i}.npy", labels)
        np.save(tmp_path / "P" / f"case_{i}.npy", preds)
        recs.append(case_metrics(labels, preds))
    csv_path, sum_path = tmp_path / "out" / "cases.csv", tmp_path / "summary.csv"
    code, out = _run(str(tmp_path / "L"), str(tmp_path / "P"), "--csv", str(csv_path), "--summary-csv", str(sum_path))
    assert code == 0, out
    assert "convention=standard, estimator=v" in out and "K=[4, 5, 6]" in out
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["case_id"] for r in rows] == ["case_0", "case_1", "case_2"]
    assert float(rows[1]["ged"]) == pytest.approx(recs[1]["ged"], abs=1e-12)
    assert rows[0]["thresholds"] == "0.1;0.3;0.5;0.7;0.9" and rows[0]["num_predictions"] == "4"
    summary = {r["metric"]: r for r in csv.DictReader(sum_path.open())}
    assert float(summary["ged"]["mean"]) == pytest.approx(np.mean([r["ged"] for r in recs]), abs=1e-12)
    assert float(summary["ged"]["std"]) == pytest.approx(np.std([r["ged"] for r in recs]), abs=1e-12)
    assert summary["ged"]["estimator"] == "v" and summary["ged"]["num_cases"] == "3"

    code, out = _run(str(tmp_path / "L"), str(tmp_path / "P"), "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["summary"]["num_predictions"] == [4, 5, 6]
    assert [c["case_id"] for c in data["cases"]] == ["case_0", "case_1", "case_2"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such file"),
        ("shape", "shape mismatch"),
        ("logits", "logits"),
        ("nonbinary", "binary"),
        ("unmatched", "no predictions"),
        ("mixed", "both be files or both be folders"),
        ("pickle", "cannot read"),
        ("npz_ambiguous", "none named"),
        ("truncated_nifti", "p.nii.gz: cannot read preds: unreadable or truncated NIfTI file"),
    ],
)
def test_clear_errors(tmp_path: Path, setup: str, message: str) -> None:
    labels, preds = _case(3)
    lp, pp = tmp_path / "l.npy", tmp_path / "p.npy"
    np.save(lp, labels)
    np.save(pp, preds)
    if setup == "missing":
        pp = tmp_path / "absent.npy"
    elif setup == "shape":
        np.save(pp, preds[:, :10])
    elif setup == "logits":
        np.save(pp, preds * 8 - 4)
    elif setup == "nonbinary":
        np.save(lp, labels * 0.5)
    elif setup == "unmatched":
        for d in ("L", "P"):
            (tmp_path / d).mkdir()
        np.save(tmp_path / "L" / "a.npy", labels)
        np.save(tmp_path / "L" / "b.npy", labels)
        np.save(tmp_path / "P" / "a.npy", preds)
        lp, pp = tmp_path / "L", tmp_path / "P"
    elif setup == "mixed":
        pp = tmp_path
    elif setup == "pickle":
        np.save(pp, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif setup == "npz_ambiguous":
        pp = tmp_path / "p.npz"
        np.savez(pp, x=preds, y=preds)
    elif setup == "truncated_nifti":
        import nibabel as nib

        pp = tmp_path / "p.nii.gz"
        nib.save(nib.Nifti1Image(np.moveaxis(preds, 0, -1), np.eye(4)), str(pp))
        pp.write_bytes(pp.read_bytes()[:-20])
    code, out = _run(str(lp), str(pp))
    assert code != 0
    assert message in out
    assert "Traceback" not in out


def test_registered_in_help() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "score" in res.output
