"""The engine on real QUBIQ NIfTI data (skips cleanly when ../shared/data is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.engine.engine_helpers import TRAIN_FAST, ok
from tests.shared_data import SHARED

QUBIQ = SHARED / "qubiq-brain-growth"


@pytest.mark.realdata
@pytest.mark.skipif(not QUBIQ.is_dir(), reason="../shared/data/qubiq-brain-growth is not available")
def test_qubiq_train_evaluate_predict_keeps_the_affine(tmp_path: Path) -> None:
    data, run = tmp_path / "qubiq", tmp_path / "run"
    ok("prepare", "qubiq", QUBIQ, data)
    ok("train", "-c", "qubiq/proseg", "--data", data, "--out", run, *TRAIN_FAST,
       "train.max_steps=2")
    assert json.loads((run / "checkpoints" / "best" / "model.json").read_text())["model"]["num_raters"] == 7
    ok("evaluate", run, "--samples", "2", "--max-cases", "2", "--figures", "1", "--out", tmp_path / "ev")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["results"]["personalized"]["standard"]["num_labels"] == 7
    src = sorted((QUBIQ / "Training").glob("case*/image.nii.gz"))[0]
    ok("predict", run, src, tmp_path / "pred", "--samples", "2")
    ref, out = nib.load(src), nib.load(tmp_path / "pred" / "mean.nii.gz")
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert len(list((tmp_path / "pred").glob("rater-*_prob.nii.gz"))) == 7
