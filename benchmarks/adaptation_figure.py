"""The figure of docs/adaptation.md: a held-out rater's masks, the zero-shot answer and the adapted one.

Reads the runs that ``benchmarks/adaptation.py`` wrote (``--bench``): the adapted checkpoint ``adapt-<k>-N<n>``
(R + 1 raters: the R it was trained with, then the new one) and its ``run.json`` (the closest existing rater on the N
adaptation cases = the zero-shot answer). For a few test cases of the fold where the held-out rater drew, one row:
the image with that rater's contour, the closest rater's personalized mean, the adapted rater's personalized mean
(K samples), each titled with its Dice against the held-out rater's mask.

    python benchmarks/adaptation_figure.py --bench /tmp/adapt-bench --store /tmp/qubiq --rater 0 --n 5 \
        --out docs/figures/adaptation-qubiq.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from proseg.data.store import open_store  # noqa: E402
from proseg.engine.data import case_loader  # noqa: E402
from proseg.models import load_model  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, required=True)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--rater", type=int, default=0, help="store index of the held-out rater")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)

    run = a.bench / f"adapt-{a.rater}-N{a.n}"
    info = json.loads((run / "run.json").read_text())["adaptation"]
    model = load_model(run / "checkpoints" / "best")
    names = json.loads((run / "checkpoints" / "best" / "model.json").read_text())["dataset"]["rater_names"]
    store = open_store(a.store)
    held = store.rater_names[a.rater]
    new_r, closest_r = names.index(held), names.index(info["closest"]["rater"])
    load_case, cases_of = case_loader(store)
    test = [c for c in cases_of(store.rows(int(info["fold"]), "test")) if load_case(c).present[a.rater]]
    test = test[: a.cases]

    fig, axes = plt.subplots(len(test), 3, figsize=(7.5, 2.6 * len(test)), squeeze=False)
    gen = torch.Generator().manual_seed(0)
    for row, cid in enumerate(test):
        case = load_case(cid)
        img = torch.as_tensor(case.images[:1])  # (1, C, H, W): the first slice
        mask = case.masks[0, a.rater].astype(bool)
        probs = model.sample_personalized(img, a.samples, gen)[0].mean(1).numpy()  # (R + 1, H, W)
        panels = [("image, " + held, None), (f"zero-shot: {names[closest_r]}", probs[closest_r]),
                  (f"adapted (N={a.n})", probs[new_r])]
        for col, (title, p) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(case.images[0, 0], cmap="gray")
            if p is not None:
                ax.imshow(p, cmap="magma", vmin=0, vmax=1, alpha=0.6)
                title += f"  Dice {100 * dice(p > 0.5, mask):.1f}"
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=1)
            ax.set_title(f"{cid}: {title}" if col == 0 else title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"QUBIQ brain growth: held-out rater {held} (cyan), fitted from {a.n} cases", fontsize=9)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
