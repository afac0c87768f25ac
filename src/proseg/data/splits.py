"""Deterministic patient-level K-fold splits with a validation part inside each training fold.

``make_splits`` shuffles the sorted unique patient ids with ``numpy.random.default_rng(seed)`` and cuts them into
``num_folds`` near-equal folds (``numpy.array_split``). For fold ``k``: ``test`` = fold ``k``; the other patients,
shuffled again with ``default_rng([seed, k])``, give ``val`` (``round(val_fraction * n)``, at least 1 when
``val_fraction > 0`` and at least 2 training patients) and ``train`` (the rest). Every list is sorted. A patient
is never in two parts of one fold, and each patient is in exactly one test part.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from proseg.data.types import DataError

PARTS = ("train", "val", "test")


def make_splits(patient_ids: Iterable[str], num_folds: int = 4, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Return the ``splits.json`` content: ``{"seed", "num_folds", "val_fraction", "folds": [{"train", "val",
    "test"}: sorted patient ids]}``."""
    patients = sorted(set(patient_ids))
    if num_folds < 2:
        raise DataError(f"--folds must be at least 2, got {num_folds}")
    if len(patients) < num_folds:
        raise DataError(f"cannot make {num_folds} patient-level folds from {len(patients)} patient(s)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    folds = [list(f) for f in np.array_split(np.array(shuffled, dtype=object), num_folds)]
    out = []
    for k in range(num_folds):
        test = folds[k]
        rest = [p for j, f in enumerate(folds) if j != k for p in f]
        rest = [rest[i] for i in np.random.default_rng([seed, k]).permutation(len(rest))]
        n_val = int(round(val_fraction * len(rest)))
        if val_fraction > 0 and n_val == 0 and len(rest) >= 2:
            n_val = 1
        n_val = min(n_val, len(rest) - 1)
        out.append({"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": sorted(test)})
    return {"seed": int(seed), "num_folds": int(num_folds), "val_fraction": float(val_fraction), "folds": out}
