"""Per-case figures: image | rater masks | per-rater predictions | diverse samples | mean | uncertainty maps.

Rows of the grid (a row is left out when the model has no such output):

1. the image (first channel) and the R rater masks (absent raters marked "absent");
2. the R per-rater predictions (mean of each rater's K personalized samples);
3. up to ``max_samples`` diverse samples;
4. the mean prediction and the uncertainty maps (total, rater-attributable, ambiguity-attributable from the
   personalized samples; total only from diverse samples otherwise).

For a volume the slice with the largest annotated area is shown. Matplotlib runs headless (Agg); the figure
is written atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proseg.fsutil import atomic_write_bytes
from proseg.metrics.uncertainty import diverse_uncertainty, uncertainty_maps


def _pick_slice(masks: np.ndarray) -> int:
    """masks ``(D, R, H, W)``: the slice with the most foreground over raters (0 when all empty)."""
    area = masks.reshape(masks.shape[0], -1).sum(axis=1)
    return int(np.argmax(area))


def case_figure(
    path: str | os.PathLike[str],
    image: np.ndarray,
    masks: np.ndarray,
    present: np.ndarray,
    personalized: np.ndarray | None = None,
    diverse: np.ndarray | None = None,
    title: str = "",
    rater_names: list[str] | None = None,
    max_samples: int = 8,
) -> Path:
    """Draw one case and save it as PNG.

    Args:
        image: ``(D, C, H, W)``; masks: ``(D, R, H, W)`` bool; present: ``(R,)``.
        personalized: ``(R, K, D, H, W)`` probabilities or None; diverse: ``(K, D, H, W)`` or None.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    d = _pick_slice(masks)
    r = masks.shape[1]
    names = rater_names or [f"rater {i}" for i in range(r)]
    rows: list[list[tuple[str, np.ndarray, str]]] = []
    rows.append([("image" + (f" (slice {d})" if image.shape[0] > 1 else ""), image[d, 0], "gray")] +
                [(f"{names[i]}" + ("" if present[i] else " (absent)"), masks[d, i].astype(float), "gray")
                 for i in range(r)])
    if personalized is not None:
        u = uncertainty_maps(torch.from_numpy(personalized[:, :, d]))
        rows.append([(f"pred {names[i]}", u["rater_mean"][i].numpy(), "viridis") for i in range(r)])
    if diverse is not None:
        k = min(max_samples, diverse.shape[0])
        rows.append([(f"sample {j}", diverse[j, d], "viridis") for j in range(k)])
    if personalized is not None:
        rows.append([("mean", u["mean"].numpy(), "viridis"), ("var total", u["total"].numpy(), "magma"),
                     ("var rater", u["rater"].numpy(), "magma"), ("var ambiguity", u["ambiguity"].numpy(), "magma")])
    elif diverse is not None:
        du = diverse_uncertainty(torch.from_numpy(diverse[:, d]))
        rows.append([("mean", du["mean"].numpy(), "viridis"), ("var total", du["total"].numpy(), "magma")])
    var_max = max((float(a.max()) for row in rows for (_, a, c) in row if c == "magma"), default=0.0)
    var_max = max(var_max, 1e-6)  # one scale for every variance map, so they can be compared
    ncols = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.8 * ncols, 1.9 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                label, arr, cmap = row[j]
                kw: dict[str, Any] = {"cmap": cmap}
                if cmap == "viridis" or label.startswith(("rater", "mask")) or i == 0 and j > 0:
                    kw.update(vmin=0.0, vmax=1.0)
                if cmap == "magma":
                    kw.update(vmin=0.0, vmax=var_max)
                    label = f"{label} (max {var_max:.2g})" if label.endswith("total") else label
                ax.imshow(arr, **kw)
                ax.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
