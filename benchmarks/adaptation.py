"""Few-shot adaptation to a held-out rater on QUBIQ brain growth (docs/adaptation.md).

For each held-out rater k: train ProSeg on the other raters (a fixed step budget), adapt to k with N training cases
(`proseg.commands.adapt.adapt_run`), and score rater k's per-rater Dice (0.5 threshold on the mean of K samples, per
case, averaged) on the test fold against: the closest existing rater (chosen on the N cases), the diverse mean, a
model trained on all raters (one for all k), and fine-tuning the whole network on the same N cases.

    OMP_NUM_THREADS=1 python benchmarks/adaptation.py --store /tmp/qubiq --raters 0 1 --train-steps 300 \
        --adapt-steps 100 --out /tmp/adapt-bench
Prints a markdown table and writes results.json into --out. Single thread (`torch.set_num_threads(1)`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from proseg.commands.adapt import adapt_run, choose_cases, rater_cases, rater_dice
from proseg.engine.config import Config
from proseg.engine.data import case_loader, open_dataset, train_data
from proseg.engine.trainer import Trainer
from proseg.engine.types import TrainData
from proseg.jsonio import write_json
from proseg.models import load_model

NS = (1, 3, 5, 10)


class DropRater(torch.utils.data.Dataset):
    """Store items without rater ``k`` (R - 1 raters)."""

    def __init__(self, base, keep: list[int]) -> None:
        self.base, self.keep = base, keep

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, i: int):
        item = dict(self.base[i])
        item["masks"], item["rater_present"] = item["masks"][self.keep], item["rater_present"][self.keep]
        return item


def base_cfg(store: str, steps: int) -> Config:
    cfg = Config()
    cfg.data = dataclasses.replace(cfg.data, path=store, fold=0, num_workers=0)
    cfg.model = dataclasses.replace(cfg.model, name="proseg", preset="default")
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-3, warmup_steps=10)
    cfg.train = dataclasses.replace(cfg.train, epochs=0, max_steps=steps, batch_size=8, device="cpu",
                                    val_every=1000, log_every=50, val_num_samples=2, max_val_cases=3)
    return cfg


def train_model(store: str, out: Path, steps: int, drop: int | None) -> Path:
    if (out / "checkpoints" / "best" / "model.json").is_file():
        return out
    cfg = base_cfg(store, steps)
    data = train_data(cfg)
    if drop is not None:
        keep = [r for r in range(data.meta["num_raters"]) if r != drop]
        load = data.load_case

        def load_case(cid: str):
            c = load(cid)
            return dataclasses.replace(c, masks=c.masks[:, keep], present=c.present[keep])

        meta = {**data.meta, "num_raters": len(keep), "rater_names": [data.meta["rater_names"][r] for r in keep],
                "manifest_sha256": None}
        data = TrainData(DropRater(data.train, keep), data.val_cases, load_case, meta)
    Trainer(cfg, out, data=data, force=True).fit()
    return out


def finetune_all(model, store, cases, src: int, new: int, steps: int, lr: float, seed: int = 0):
    """The naive baseline: add the rater, then train every parameter on the N cases (only rater ``new`` present)."""
    from proseg.data.dataset import MultiRaterDataset

    model = copy.deepcopy(model)
    model.add_rater("mean")
    rows = np.concatenate([store.volume_rows(np.flatnonzero(store.volume_ids == c))[c] for c in cases])
    ds = MultiRaterDataset(store, np.sort(rows))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        idx = torch.randint(len(ds), (min(8, len(ds)),), generator=g).tolist()
        items = [ds[i] for i in idx]
        img = torch.stack([it["image"] for it in items])
        masks = torch.zeros(len(items), model.num_raters, *img.shape[-2:])
        masks[:, new] = torch.stack([it["masks"][src] for it in items])
        present = torch.zeros(len(items), model.num_raters, dtype=torch.bool)
        present[:, new] = True
        loss = model.loss({"image": img, "masks": masks, "rater_present": present},
                          torch.Generator().manual_seed(s))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def diverse_dice(model, cases, target: int, k: int = 8) -> float:
    out = []
    with torch.no_grad():
        for c in cases:
            p = model.sample_diverse(torch.as_tensor(c.images), k, generator=torch.Generator().manual_seed(0))
            pr, y = p.mean(1) > 0.5, torch.as_tensor(c.masks[:, target]).bool()
            tot = float(pr.sum() + y.sum())
            out.append(1.0 if tot == 0 else 2 * float((pr & y).sum()) / tot)
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="../shared/data/qubiq-brain-growth")
    ap.add_argument("--store", default="/tmp/qubiq")
    ap.add_argument("--out", default="/tmp/adapt-bench")
    ap.add_argument("--raters", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS))
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--adapt-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--no-upper", action="store_true")
    ap.add_argument("--no-finetune", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(a.store) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "proseg.cli.main", "prepare", "qubiq", a.source, a.store, "-q"],
                       check=True)
    store = open_dataset(a.store)
    load_case, cases_of = case_loader(store)
    test = [load_case(c) for c in cases_of(store.rows(0, "test"))]
    names = store.rater_names
    results: list[dict] = []
    upper = None
    if not a.no_upper:
        upper = load_model(train_model(a.store, out / "all", a.train_steps, None) / "checkpoints" / "best")
    for k in a.raters:
        run = train_model(a.store, out / f"without-{k}", a.train_steps, k)
        base = load_model(run / "checkpoints" / "best")
        others = [r for r in range(len(names)) if r != k]
        row = {"rater": names[k], "diverse_mean": diverse_dice(base, test, k),
               "upper_all_raters": rater_dice(upper, test, k, [k])[0] if upper is not None else None}
        for n in a.ns:
            chosen = choose_cases(rater_cases(store, 0, "train", k), n, 0)
            ad_cases = [load_case(c) for c in chosen]
            close = int(np.argmax(rater_dice(base, ad_cases, k, list(range(len(others))))))
            row[f"closest_N{n}"] = rater_dice(base, test, k, [close])[0]
            t0 = time.time()
            res = adapt_run(run, a.store, names[k], out / f"adapt-{k}-N{n}", cases=n, steps=a.adapt_steps, lr=a.lr,
                            device="cpu", force=True)
            row[f"adapt_seconds_N{n}"] = time.time() - t0
            adapted = load_model(Path(res["run_dir"]) / "checkpoints" / "best")
            row[f"adapted_N{n}"] = rater_dice(adapted, test, k, [res["rater_index"]])[0]
            if not a.no_finetune:
                t0 = time.time()
                ft = finetune_all(base, store, chosen, k, len(others), a.adapt_steps, 1e-3)
                row[f"finetune_seconds_N{n}"] = time.time() - t0
                row[f"finetune_N{n}"] = rater_dice(ft, test, k, [len(others)])[0]
            print(json.dumps(row), flush=True)
            write_json(out / "results.json", {"args": vars(a), "rows": [*results, row]})
        results.append(row)
    cols = ["diverse_mean", "upper_all_raters"] + [f"{p}_N{n}" for n in a.ns for p in ("closest", "adapted",
                                                                                        "finetune")]
    print("| rater | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in results:
        print(f"| {r['rater']} | " + " | ".join("" if r.get(c) is None else f"{100 * r[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
