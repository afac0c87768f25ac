"""Deterministic generator of the cases scored by the published reference metric code.

``reference_fixture.json`` holds the numbers that D-Persona/ProSeg's ``lib/metrics_set.py`` (and PHiSeg's
``utils.py`` for GED / S_NCC) produced on exactly these arrays; the reference code was run outside this
repository and is not part of it (see docs/metrics.md, "Reference cross-check"). ``array_digest`` guards
against the generator drifting (a NumPy change in the random streams would change the arrays and make the
stored numbers meaningless).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CaseSpec:
    name: str
    seed: int
    num_labels: int
    num_preds: int
    shape: tuple[int, ...]
    empty_labels: tuple[int, ...] = ()  # rater indices forced empty
    preds_kind: str = "soft"  # "soft" | "binary" | "empty" (all probabilities < 0.5)


CASES: tuple[CaseSpec, ...] = (
    CaseSpec("2d_n4_m4", 1, 4, 4, (32, 32)),
    CaseSpec("2d_n4_m10", 2, 4, 10, (32, 32)),
    CaseSpec("2d_n4_m52", 3, 4, 52, (24, 24)),
    CaseSpec("all_labels_empty", 4, 4, 5, (24, 24), empty_labels=(0, 1, 2, 3)),
    CaseSpec("all_preds_empty", 5, 4, 4, (24, 24), preds_kind="empty"),
    CaseSpec("everything_empty", 6, 4, 5, (16, 16), empty_labels=(0, 1, 2, 3), preds_kind="empty"),
    CaseSpec("one_empty_rater", 7, 4, 6, (32, 32), empty_labels=(2,)),
    CaseSpec("one_empty_rater_m4", 8, 4, 4, (32, 32), empty_labels=(1,)),
    CaseSpec("3d_n4_m5", 9, 4, 5, (6, 20, 20)),
    CaseSpec("3d_one_empty_rater", 10, 4, 4, (5, 16, 16), empty_labels=(3,)),
    CaseSpec("binary_preds", 11, 4, 6, (32, 32), preds_kind="binary"),
    CaseSpec("n7_m9", 12, 7, 9, (28, 28)),
    CaseSpec("n1_m3", 13, 1, 3, (20, 20)),
    CaseSpec("n4_m2_more_labels", 14, 4, 2, (20, 20)),
)


def _blob(rng: np.random.Generator, shape: tuple[int, ...], center: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance-like field (positive inside) of a jittered ellipsoid."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    axes = radius * rng.uniform(0.7, 1.3, size=len(shape))
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, center, axes, strict=True)))
    return 1.0 - r  # > 0 inside


def make_case(spec: CaseSpec) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(N, *S)`` uint8 {0,1} and predictions ``(M, *S)`` float32 in [0, 1] for one spec."""
    rng = np.random.default_rng(spec.seed)
    shape = spec.shape
    center = np.array(shape, dtype=np.float64) / 2.0
    radius = min(shape[-2:]) / 4.0
    labels = np.zeros((spec.num_labels, *shape), dtype=np.uint8)
    for i in range(spec.num_labels):
        c = center + rng.normal(0.0, radius / 4.0, size=len(shape))
        labels[i] = (_blob(rng, shape, c, radius) > 0).astype(np.uint8)
    for i in spec.empty_labels:
        labels[i] = 0
    preds = np.zeros((spec.num_preds, *shape), dtype=np.float32)
    for j in range(spec.num_preds):
        c = center + rng.normal(0.0, radius / 3.0, size=len(shape))
        field = _blob(rng, shape, c, radius * rng.uniform(0.6, 1.4))
        prob = 1.0 / (1.0 + np.exp(-6.0 * field + rng.normal(0.0, 0.5, size=shape)))
        preds[j] = prob.astype(np.float32)
    if spec.preds_kind == "binary":
        preds = (preds > 0.5).astype(np.float32)
    elif spec.preds_kind == "empty":
        preds = (preds * 0.49).astype(np.float32)
    return labels, preds


def array_digest(labels: np.ndarray, preds: np.ndarray) -> str:
    """sha256 of both arrays (C order, their dtypes), to detect generator drift."""
    h = hashlib.sha256()
    for a in (labels, preds):
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
