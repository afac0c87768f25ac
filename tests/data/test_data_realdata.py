"""The real copies under ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from proseg.cli.main import app
from proseg.data.store import open_store
from tests.data.data_builders import SHARED, needs_shared

runner = CliRunner()
LIDC_PATIENTS = ("LIDC-IDRI-0003", "LIDC-IDRI-0004", "LIDC-IDRI-0007")


@pytest.mark.realdata
@needs_shared("lidc-idri-slices")
def test_lidc_kaggle_subset(tmp_path: Path) -> None:
    src = SHARED / "lidc-idri-slices"
    expected = sum(len(list((src / p).glob("nodule-*/images/slice-*.png"))) for p in LIDC_PATIENTS)
    out = tmp_path / "lidc"
    res = runner.invoke(app, ["prepare", "lidc-kaggle", str(src), str(out), "--patients", ",".join(LIDC_PATIENTS),
                              "--folds", "3", "--rater-order", "area-ranked", "-q"])
    assert res.exit_code == 0, res.output
    s = open_store(out)
    assert len(s) == expected and set(s.patient_ids) == set(LIDC_PATIENTS)
    assert s.images.shape[1:] == (1, 128, 128) and s.num_raters == 4
    area = s.masks[:].reshape(len(s), 4, -1).sum(-1)
    assert (np.diff(area, axis=1) >= 0).all()  # area-ranked: ascending per slice
    st = json.loads(runner.invoke(app, ["info", str(out), "--json"]).output)
    assert st["patients"] == 3 and 0.0 < st["pairwise_dice"] < 1.0


@pytest.mark.realdata
@needs_shared("qubiq-brain-growth")
def test_qubiq_full(tmp_path: Path) -> None:
    out = tmp_path / "qubiq"
    res = runner.invoke(app, ["prepare", "qubiq", str(SHARED / "qubiq-brain-growth"), str(out), "-q"])
    assert res.exit_code == 0, res.output
    s = open_store(out)
    assert s.num_raters == 7 and len(s) == 39 and s.rater_names == [f"seg{i:02d}" for i in range(1, 8)]
    st = json.loads(runner.invoke(app, ["info", str(out), "--json"]).output)
    assert st["pairwise_dice"] == pytest.approx(0.856, abs=0.001)  # the figure in the data README
    assert np.allclose(s.volumes["case01"]["affine"], np.eye(4))
