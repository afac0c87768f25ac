"""Summary statistics of a prepared store (what ``proseg info`` prints).

Rater agreement: for every row and every pair of raters that are both present, Dice = 2|A n B| / (|A| + |B|),
with Dice(empty, empty) = 1 (two readers agreeing there is no lesion agree perfectly). ``pairwise_dice`` is the
mean over all such (row, pair) values; ``pairwise_dice_matrix[i][j]`` the mean over rows for raters i, j (NaN when
the two are never present together). Empty fraction per rater: among rows where that rater is present, the share
whose mask is empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from proseg.data.preprocess import recorded_intensity
from proseg.data.store import PARTS, Store


def pairwise_dice(masks: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row pairwise Dice.

    Args:
        masks: ``(N, R, H, W)`` {0, 1} (any integer/bool dtype). present: ``(N, R)`` bool.
    Returns:
        ``(dice (N, R, R) float64, valid (N, R, R) bool)``; valid marks pairs i != j both present.
    """
    n, r = masks.shape[:2]
    m = masks.reshape(n, r, -1).astype(np.float32)
    inter = np.matmul(m, m.transpose(0, 2, 1)).astype(np.float64)  # (N, R, R)
    area = np.einsum("nrr->nr", inter)
    denom = area[:, :, None] + area[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom > 0, 2 * inter / denom, 1.0)
    valid = present[:, :, None] & present[:, None, :] & ~np.eye(r, dtype=bool)[None]
    return dice, valid


def store_stats(store: Store, chunk: int = 1024) -> dict[str, Any]:
    """Counts, per-rater empty fractions and presence, pairwise agreement, and split sizes of ``store``."""
    n, r = len(store), store.num_raters
    present_all = np.asarray(store.rater_present)
    empty = np.zeros(r, np.int64)
    dsum = np.zeros((r, r))
    dcnt = np.zeros((r, r), np.int64)
    for s in range(0, n, chunk):
        m = np.asarray(store.masks[s : s + chunk])
        p = present_all[s : s + chunk]
        empty += ((m.reshape(m.shape[0], r, -1).max(axis=2) == 0) & p).sum(axis=0)
        if r > 1:
            d, v = pairwise_dice(m, p)
            dsum += np.where(v, d, 0).sum(axis=0)
            dcnt += v.sum(axis=0)
    n_present = present_all.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mat = np.where(dcnt > 0, dsum / np.maximum(dcnt, 1), np.nan)
        empty_frac = np.where(n_present > 0, empty / np.maximum(n_present, 1), np.nan)
    iu = np.triu_indices(r, 1)
    overall = float(dsum[iu].sum() / dcnt[iu].sum()) if r > 1 and dcnt[iu].sum() > 0 else float("nan")
    splits = []
    for k in range(store.num_folds):
        splits.append({part: {"patients": len(store.patients(k, part)), "rows": int(store.rows(k, part).size)}
                       for part in PARTS if part not in ("all", "trainval")})
    m = store.manifest
    return {
        "path": str(store.path),
        "source": m["source"],
        "rows": n,
        "cases": m["counts"]["cases"],
        "volumes": m["counts"]["volumes"],
        "patients": len(set(store.patient_ids.tolist())),
        "shape": m["shapes"]["images"][1:],
        "num_raters": r,
        "rater_names": store.rater_names,
        "rater_order": m["rater_order"],
        "intensity": recorded_intensity(m.get("intensity")),
        "intensity_params": {k: v for k, v in m["intensity"].items() if k in ("window", "percentiles")}
        if isinstance(m.get("intensity"), dict) else {},
        "target_size": m["target_size"],
        "rater_present_fraction": (n_present / max(n, 1)).tolist(),
        "empty_fraction": empty_frac.tolist(),
        "pairwise_dice": overall,
        "pairwise_dice_matrix": mat.tolist(),
        "splits": {"seed": store.splits["seed"], "num_folds": store.num_folds,
                   "val_fraction": store.splits["val_fraction"], "folds": splits,
                   "source": store.splits.get("source", "random"),
                   "val_drawn": list(store.splits.get("val_drawn", [True] * store.num_folds)),
                   **{k: store.splits[k] for k in ("file", "sha256") if k in store.splits}},
    }
