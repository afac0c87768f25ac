"""proseg.jsonio: the one JSON rule (strict JSON, NaN/Inf -> null), also for model.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType

import numpy as np

from proseg.jsonio import dumps, nan_if_none
from proseg.models import create_model, save_model


def test_non_finite_numpy_and_read_only_mappings() -> None:
    text = dumps({"a": math.nan, "b": np.float32(1.5), "c": np.arange(2), "d": (1, math.inf),
                  "e": MappingProxyType({"w": (16, 32)})})
    assert json.loads(text) == {"a": None, "b": 1.5, "c": [0, 1], "d": [1, None], "e": {"w": [16, 32]}}
    assert math.isnan(nan_if_none(None)) and nan_if_none(2) == 2.0


def test_model_json_is_strict_json(tmp_path: Path) -> None:
    model = create_model("proseg", in_channels=1, num_raters=2, preset="tiny")
    save_model(model, tmp_path, extra={"val_score": math.nan, "step": 3})
    text = (tmp_path / "model.json").read_text()
    assert "NaN" not in text and json.loads(text)["val_score"] is None
