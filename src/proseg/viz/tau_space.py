"""The learned raters in ProSeg's tau-space: a 2-D PCA of the posterior means, marker size = concentration."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from proseg.fsutil import atomic_write_bytes


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(R, D)`` points -> ``(R, 2)`` coordinates on the first two principal axes (centred; zeros where there are
    fewer than two axes of variance) and the explained-variance ratios ``(2,)``."""
    x = np.asarray(points, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    coords = np.zeros((x.shape[0], 2))
    k = min(2, s.shape[0])
    coords[:, :k] = u[:, :k] * s[:k]
    var = s**2
    ratio = np.zeros(2)
    ratio[:k] = var[:k] / var.sum() if var.sum() > 0 else 0.0
    return coords, ratio


def tau_space_figure(means: np.ndarray, totals: np.ndarray, names: Sequence[str],
                     path: str | os.PathLike[str], title: str = "raters in tau-space") -> Path:
    """Write a PNG: each rater's posterior mean E[tau | r] on the 2-D PCA of the means, marker area proportional to
    its total concentration ``sum_d a_rd`` (a larger one = a more consistent style), labelled with its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords, ratio = pca_2d(means)
    tot = np.asarray(totals, dtype=np.float64)
    size = 40 + 400 * tot / max(float(tot.max()), 1e-12)
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
    ax.scatter(coords[:, 0], coords[:, 1], s=size, alpha=0.6, c=np.arange(len(names)), cmap="tab10")
    for (x, y), n, t in zip(coords, names, tot, strict=True):
        ax.annotate(f"{n} ({t:.1f})", (x, y), fontsize=7, ha="center", va="bottom")
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})")
    ax.set_title(title, fontsize=9)
    ax.margins(0.25)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out
