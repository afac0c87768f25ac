"""Per-case figures: image | rater masks | per-rater predictions | diverse samples | mean | uncertainty maps.

Rows of the grid (a row is left out when the model has no such output):

1. the image (first channel) with every rater's mask contour in that rater's colour (legend above the grid),
   then one panel per rater: the image with that rater's contour, or a hatched grey panel reading "absent"
   for a rater who did not annotate the case (absent is not the same as an empty mask);
2. the R per-rater predictions (mean of each rater's K personalized samples), each with its rater's contour;
3. up to ``max_samples`` diverse samples;
4. the mean prediction (all raters' contours) and the uncertainty maps (total, rater-attributable,
   ambiguity-attributable from the personalized samples; total only from diverse samples otherwise).

Every panel shows the same crop, zoomed to the lesion (:func:`crop_box`). Probability panels share one scale
(0 to 1) and variance panels one fixed scale (0 to :data:`VAR_MAX` = 0.25, the largest variance of a
probability), so figures of different models compare; each row has a colourbar. The title carries the case's
scores when given (GED, per-rater Dice, per mode). For a volume the slice with the largest annotated area is
shown. Matplotlib runs headless (Agg); the figure is written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proseg.fsutil import atomic_write_bytes
from proseg.metrics.uncertainty import diverse_uncertainty, uncertainty_maps

VAR_MAX = 0.25
"""Top of the variance colour scale: the variance of a probability is at most 1/4 (Bernoulli, p = 1/2)."""
DPI = 100
PANEL_IN = 1.7
"""Width and height of one grid cell, inches (panel, its title and the gap)."""
CBAR_IN = 0.45
"""Room on the right of the grid for the colourbar of a full row, inches."""
TITLE_LINE_IN = 0.16
LEGEND_IN = 0.28
Panel = tuple[str, "np.ndarray | None", str, list[int]]
"""One grid panel: title, array (None = an absent rater), kind (image / prob / var / absent), raters outlined."""
RATER_COLORS = ("#e6194b", "#00c8ff", "#ffa600", "#3cb44b", "#f032e6", "#ffffff", "#9a6324", "#bfef45")


def _pick_slice(masks: np.ndarray) -> int:
    """masks ``(D, R, H, W)``: the slice with the most foreground over raters (0 when all empty)."""
    area = masks.reshape(masks.shape[0], -1).sum(axis=1)
    return int(np.argmax(area))


def crop_box(
    masks: np.ndarray,
    present: np.ndarray | Sequence[bool] | None = None,
    preds: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    margin: float = 0.5,
    min_pad: int = 8,
) -> tuple[int, int, int, int]:
    """The square crop ``(y0, y1, x0, x1)`` (end exclusive) around everything annotated or predicted.

    The bounding box of the union of the present raters' masks and of the predictions above ``threshold``,
    padded on each side by ``max(margin * its longer side, min_pad)`` pixels, made square around its centre and
    shifted / clipped to fit the image (a side longer than the image becomes the whole image). The full image
    when everything is empty.

    Args:
        masks: ``(R, H, W)`` (or ``(H, W)``) rater masks; an absent rater's mask is ignored.
        present: ``(R,)`` bool, None = all present.
        preds: ``(..., H, W)`` probabilities or None.
    """
    m = np.asarray(masks).astype(bool)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks must be (R, H, W) or (H, W), got shape {m.shape}")
    h, w = m.shape[-2:]
    if present is not None:
        m = m[np.asarray(present, dtype=bool)]
    fg = m.any(axis=0) if m.shape[0] else np.zeros((h, w), dtype=bool)
    if preds is not None:
        p = np.asarray(preds, dtype=np.float64)
        if p.size:
            fg = fg | (p.reshape(-1, h, w) > threshold).any(axis=0)
    if not fg.any():
        return 0, h, 0, w
    ys, xs = np.nonzero(fg)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    extent = max(y1 - y0, x1 - x0)
    side = extent + 2 * max(math.ceil(margin * extent), int(min_pad))

    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        if side >= n:
            return 0, n
        start = int(round((lo + hi) / 2 - side / 2))
        start = min(max(start, 0), n - side)
        return start, start + side

    ya, yb = span(y0, y1, h)
    xa, xb = span(x0, x1, w)
    return ya, yb, xa, xb


def _fmt(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(f) else f"{f:.2f}"


def _rater_dice(rec: Mapping[str, Any], present: np.ndarray,
                aligned: bool = True) -> tuple[str, list[str | None]] | None:
    """The record's per-rater Dice spread over all R raters (None for an absent one): index-aligned when
    ``aligned`` and the record has it (personalized mode: rater r's prediction against rater r), else
    Hungarian-matched; None when it has neither. (Diverse samples have no rater, so aligned is False there.)"""
    keys = (("dice_per_rater", "Dice"),) if aligned else ()
    for key, label in (*keys, ("dice_per_rater_matched", "matched Dice")):
        vals = rec.get(key)
        if vals is None:
            continue
        it = iter(vals)
        return label, [_fmt(next(it, float("nan"))) if p else None for p in present]
    return None


def score_lines(scores: Mapping[str, Mapping[str, Any]] | None, names: Sequence[str],
                present: np.ndarray) -> list[str]:
    """Title lines from per-mode case records: ``mode: GED g | Dice name v, name absent, ...``."""
    lines = []
    for mode, rec in (scores or {}).items():
        parts = [f"GED {_fmt(rec['ged'])}"] if "ged" in rec else []
        rd = _rater_dice(rec, present, aligned=mode == "personalized")
        if rd is not None:
            label, vals = rd
            cells = [f"{n} {'absent' if v is None else v}" for n, v in zip(names, vals, strict=True)]
            parts.append(label + " " + ", ".join(cells))
        if parts:
            conv = rec.get("convention")
            lines.append(f"{mode}" + (f" ({conv})" if conv else "") + ": " + " | ".join(parts))
    return lines


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
    scores: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Draw one case and save it as PNG (``DPI`` dots per inch; the size follows from the grid).

    Args:
        image: ``(D, C, H, W)``; masks: ``(D, R, H, W)`` bool; present: ``(R,)``.
        personalized: ``(R, K, D, H, W)`` probabilities or None; diverse: ``(K, D, H, W)`` or None.
        scores: the case's metric records by mode (``{"personalized": record, ...}``, records of
            :func:`proseg.metrics.case_metrics`), shown in the title; None = no scores.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    present = np.asarray(present, dtype=bool)
    d = _pick_slice(masks)
    r = masks.shape[1]
    names = list(rater_names or [f"rater {i}" for i in range(r)])[:r]
    names += [f"rater {i}" for i in range(len(names), r)]
    colors = [RATER_COLORS[i % len(RATER_COLORS)] for i in range(r)]
    sl = masks[d].astype(bool)  # (R, H, W)

    u = uncertainty_maps(torch.from_numpy(personalized[:, :, d])) if personalized is not None else None
    du = diverse_uncertainty(torch.from_numpy(diverse[:, d])) if diverse is not None else None
    mean_pred = (u or du or {}).get("mean")
    box_preds = [a for a in (u["rater_mean"].numpy() if u is not None else None,
                             du["mean"].numpy()[None] if du is not None else None) if a is not None]
    y0, y1, x0, x1 = crop_box(sl, present, np.concatenate(box_preds) if box_preds else None)
    h, w = masks.shape[-2:]

    def crop(a: np.ndarray) -> np.ndarray:
        return np.asarray(a)[..., y0:y1, x0:x1]

    rd = _rater_dice(scores["personalized"], present) if scores and "personalized" in scores else None
    zoom = "" if (y0, y1, x0, x1) == (0, h, 0, w) else f" [{y0}:{y1}, {x0}:{x1}]"
    rows: list[list[Panel]] = []
    img = crop(image[d, 0])
    rows.append([("image" + (f" (slice {d})" if image.shape[0] > 1 else "") + zoom, img, "image",
                  [i for i in range(r) if present[i]])] +
                [(names[i] + ("" if sl[i].any() else " (empty)"), img, "image", [i]) if present[i]
                 else (names[i], None, "absent", []) for i in range(r)])
    if u is not None:
        rows.append([(f"pred {names[i]}" + ("" if present[i] else " (no label)")
                      + (f" Dice {rd[1][i]}" if rd is not None and rd[1][i] is not None else ""),
                      crop(u["rater_mean"][i].numpy()), "prob", [i] if present[i] else [])
                     for i in range(r)])
    if diverse is not None:
        k = min(max_samples, diverse.shape[0])
        rows.append([(f"sample {j}", crop(diverse[j, d]), "prob", []) for j in range(k)])
    last: list[Panel] = []
    if mean_pred is not None:
        last.append(("mean", crop(mean_pred.numpy()), "prob", [i for i in range(r) if present[i]]))
    if u is not None:
        last += [("var total", crop(u["total"].numpy()), "var", []), ("var rater", crop(u["rater"].numpy()), "var", []),
                 ("var ambiguity", crop(u["ambiguity"].numpy()), "var", [])]
    elif du is not None:
        last.append(("var total", crop(du["total"].numpy()), "var", []))
    if last:
        rows.append(last)

    lines = ([title] if title else []) + score_lines(scores, names, present)
    ncols = max(len(row) for row in rows)
    top_in = TITLE_LINE_IN * len(lines) + LEGEND_IN + 0.1
    fig_w = PANEL_IN * ncols + CBAR_IN
    fig_h = PANEL_IN * len(rows) + top_in
    fig, axes = plt.subplots(len(rows), ncols, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=0.1 / fig_w, right=1 - CBAR_IN / fig_w, bottom=0.05 / fig_h,
                        top=1 - top_in / fig_h, wspace=0.32, hspace=0.22)
    scale = {"prob": ("viridis", 1.0, "probability"), "var": ("magma", VAR_MAX, "variance")}
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(row):
                continue
            label, arr, kind, outline = row[j]
            ax.set_title(label, fontsize=6.5)
            if arr is None:  # absent rater
                ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="0.85", edgecolor="0.55",
                                       hatch="///", linewidth=0.8))
                ax.text(0.5, 0.5, "absent", transform=ax.transAxes, ha="center", va="center", fontsize=8,
                        color="0.25", bbox={"facecolor": "0.92", "edgecolor": "none", "pad": 2})
                ax.set_aspect("equal")
                continue
            if kind == "image":
                im = ax.imshow(arr, cmap="gray", interpolation="nearest")
            else:
                cmap, vmax, _ = scale[kind]
                im = ax.imshow(arr, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
            for ri in outline:
                _contour(ax, crop(sl[ri]), colors[ri])
            if kind in scale and (j == len(row) - 1 or row[j + 1][2] != kind):
                cax = ax.inset_axes((1.04, 0.0, 0.06, 1.0))
                cb = fig.colorbar(im, cax=cax)
                cb.ax.tick_params(labelsize=5.5, length=2, pad=1)
                cb.set_label(scale[kind][2], fontsize=5.5, labelpad=1)
    handles = [Line2D([], [], color=colors[i], lw=1.5, label=names[i]) if present[i]
               else Patch(facecolor="0.85", edgecolor="0.55", hatch="///", label=f"{names[i]} (absent)")
               for i in range(r)]
    if handles:
        fig.legend(handles=handles, loc="upper center", ncol=min(r, 8), fontsize=6.5, frameon=False,
                   bbox_to_anchor=(0.5, 1 - (TITLE_LINE_IN * len(lines) + 0.04) / fig_h), handlelength=1.6,
                   columnspacing=1.2)
    for n, line in enumerate(lines):
        fig.text(0.5, 1 - (0.05 + TITLE_LINE_IN * (n + 0.5)) / fig_h, line, ha="center", va="center",
                 fontsize=7.5 if n == 0 and title else 6.5)
    out = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _contour(ax: Any, mask: np.ndarray, color: str) -> None:
    """The 0.5 contour of a 2D mask, closed at the crop's border (the mask padded with zeros)."""
    m = np.asarray(mask, dtype=np.float64)
    if not m.any():
        return
    h, w = m.shape
    padded = np.pad(m, 1)
    ax.contour(np.arange(-1, w + 1), np.arange(-1, h + 1), padded, levels=[0.5], colors=[color], linewidths=1.0)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
