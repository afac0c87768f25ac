"""The data shapes the engine passes between its parts: one validation / test case (:class:`CaseData`) and what the
trainer needs from a dataset (:class:`TrainData`). Built by :mod:`proseg.engine.data`, consumed by the trainer and
the evaluation loop; this module imports nothing else from the engine, so both sides can import it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

__all__ = ["CaseData", "TrainData"]


@dataclass
class CaseData:
    """One volume from the store: ``images (D,C,H,W)`` float32, ``masks (D,R,H,W)`` bool, ``present (R,)``."""

    case_id: str
    images: np.ndarray
    masks: np.ndarray
    present: np.ndarray


class TrainData:
    """What the trainer needs from a dataset (built from ``cfg.data`` by :func:`proseg.engine.data.train_data`).

    Attributes:
        train: a Dataset of dict items ``{"image" (C,H,W), "masks" (R,H,W), "rater_present" (R,), ...}``.
        val_cases: case (volume) ids of the fold's validation part, in a fixed order.
        load_case: ``case_id -> CaseData`` for validation.
        meta: ``in_channels``, ``num_raters``, ``rater_names``, ``manifest_sha256``, ``preprocessing``, ...
    """

    def __init__(self, train: Dataset, val_cases: Sequence[str], load_case: Callable[[str], CaseData],
                 meta: dict[str, Any]) -> None:
        self.train, self.val_cases, self.load_case, self.meta = train, list(val_cases), load_case, meta
