"""``proseg adapt``: fit a new rater into a trained run from a handful of that rater's masks (few-shot).

The trained model gets one more rater (``model.add_rater``: R -> R + 1), and only the new rater's parameters are
fitted (``model.freeze_except_rater``: gradient masks on the stacked per-rater tensors, everything else frozen and
in eval mode, Adam without weight decay), so the existing raters' outputs stay bitwise the same. The training cases
are N cases of the run's fold's **train** part where the rater is present, chosen deterministically (ordered by
``case_seed(seed, case_id)``), or the cases of a list file; validation uses the fold's **val** cases where the rater
is present (only the new rater is scored). The output is an ordinary run folder (``config.yaml``, ``run.json`` with
an ``adaptation`` entry, ``checkpoints/best`` + ``last``) that ``proseg evaluate`` / ``predict`` use like any other.

Rater order: the adapted model's raters are the checkpoint's raters in their order, then the new one. A store scored
in personalized mode must hold the raters in that order (``engine/compat.py`` warns when the names differ); e.g.
the original run was trained on a store without rater NAME, and the store with every rater lists NAME last.
See docs/adaptation.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from torch.utils.data import Dataset

from proseg.data.dataset import MultiRaterDataset
from proseg.data.store import Store
from proseg.engine.checkpoint import CONFIG_FILE, RUN_INFO_FILE, manifest_checksum, resolve_checkpoint, run_dir_of
from proseg.engine.config import Config, load_config
from proseg.engine.data import PREPROCESSING_KEYS, case_loader, open_dataset
from proseg.engine.seeding import case_seed
from proseg.engine.trainer import Trainer
from proseg.engine.types import CaseData, TrainData
from proseg.errors import CommandError, DataError, ProsegWarning
from proseg.jsonio import write_json
from proseg.models import load_model
from proseg.models.base import MultiRaterModel, NotSupportedError, RaterFreeze, read_model_meta

INITS = ("mean", "prior", "closest")


class _RaterView(Dataset):
    """Items of a store dataset with the masks in the model's rater order (``index[j]``: the store rater of model
    rater j, -1 = not in the store) and only model rater ``keep`` marked present."""

    def __init__(self, base: MultiRaterDataset, index: Sequence[int], keep: int) -> None:
        self.base, self.index, self.keep = base, list(index), keep

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        masks, present = item["masks"], item["rater_present"]
        out_m = masks.new_zeros((len(self.index), *masks.shape[1:]))
        out_p = present.new_zeros((len(self.index),))
        src = self.index[self.keep]
        out_m[self.keep] = masks[src]
        out_p[self.keep] = present[src]
        item["masks"], item["rater_present"] = out_m, out_p
        return item


def _view_case(case: CaseData, index: Sequence[int], keep: int) -> CaseData:
    masks = np.zeros((case.masks.shape[0], len(index), *case.masks.shape[2:]), dtype=case.masks.dtype)
    present = np.zeros(len(index), dtype=bool)
    masks[:, keep] = case.masks[:, index[keep]]
    present[keep] = bool(case.present[index[keep]])
    return CaseData(case.case_id, case.images, masks, present)


class AdaptTrainer(Trainer):
    """The trainer with the adaptation's optimizer (Adam over the new rater's tensors, no weight decay) and the
    model kept in eval mode (frozen BatchNorm statistics)."""

    def __init__(self, cfg: Config, run_dir: str | os.PathLike[str], *, freeze: RaterFreeze,
                 adaptation: dict[str, Any], **kwargs: Any) -> None:
        self.freeze, self.adaptation = freeze, adaptation  # before the constructor builds the optimizer
        super().__init__(cfg, run_dir, **kwargs)

    def build_optimizer(self) -> Optimizer:
        return torch.optim.Adam(self.freeze.params, lr=self.cfg.optim.lr, betas=tuple(self.cfg.optim.betas),
                                eps=self.cfg.optim.eps, weight_decay=0.0)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.eval()
        return super().train_step(batch)

    def _model_extra(self, score: float | None) -> dict[str, Any]:
        return {**super()._model_extra(score), "adaptation": self.adaptation}


def rater_cases(store: Store, fold: int, part: str, rater: int) -> list[str]:
    """Volume ids of ``fold``/``part`` in which store rater ``rater`` is present on some slice (store order)."""
    groups = store.volume_rows(store.rows(fold, part))
    present = np.asarray(store.rater_present)
    return [v for v, rows in groups.items() if bool(present[rows, rater].any())]


def choose_cases(candidates: Sequence[str], n: int, seed: int) -> list[str]:
    """The first ``n`` of ``candidates`` ordered by ``case_seed(seed, case_id)``: deterministic, independent of the
    store order, and the N = 3 cases are part of the N = 5 ones."""
    if n < 1:
        raise CommandError(f"--cases must be >= 1, got {n}")
    if n > len(candidates):
        raise CommandError(f"--cases {n}: only {len(candidates)} training case(s) have this rater")
    return sorted(candidates, key=lambda c: (case_seed(seed, c), c))[:n]


def read_case_list(path: str | os.PathLike[str]) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"--case-list {p}: no such file")
    ids = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not ids:
        raise CommandError(f"--case-list {p}: lists no case ids")
    return list(dict.fromkeys(ids))


@torch.no_grad()
def rater_dice(model: MultiRaterModel, cases: Sequence[CaseData], target: int, raters: Sequence[int],
               num_samples: int = 4, seed: int = 0) -> list[float]:
    """Mean soft-thresholded (0.5) Dice of each model rater in ``raters`` against store rater ``target``'s masks
    over ``cases`` (pixels pooled per case, then averaged; empty vs empty = 1). Used by ``--init closest``."""
    scores = np.zeros(len(raters))
    for case in cases:
        x = torch.as_tensor(case.images)
        g = torch.Generator().manual_seed(case_seed(seed, case.case_id))
        p = model.sample_personalized(x, num_samples, generator=g).mean(2)  # (D, R, H, W)
        y = torch.as_tensor(case.masks[:, target]).bool()
        for j, r in enumerate(raters):
            pr = p[:, r] > 0.5
            inter, tot = float((pr & y).sum()), float(pr.sum() + y.sum())
            scores[j] += 1.0 if tot == 0 else 2 * inter / tot
    return (scores / max(1, len(cases))).tolist()


def adapt_run(
    run: str | os.PathLike[str],
    data: str | os.PathLike[str],
    rater: str,
    out: str | os.PathLike[str],
    *,
    cases: int | None = None,
    case_list: str | os.PathLike[str] | None = None,
    steps: int = 200,
    lr: float = 1e-2,
    init: str = "closest",
    batch_size: int | None = None,
    fold: int | None = None,
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    val_every_steps: int | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Adapt the checkpoint ``run`` (a run folder: its best checkpoint) to store rater ``rater``; see the module
    docstring. Returns a summary (the new run folder, the chosen cases, the rater index, the fit's result).

    Raises:
        DataError: ``rater`` is not a rater of the store, or is absent from a chosen case.
        CommandError: ``rater`` is already one of the model's raters; neither or both of ``cases`` / ``case_list``;
            too few cases; a case id that is not in the store; a model without per-rater parameters.
    """
    if (cases is None) == (case_list is None):
        raise CommandError("give exactly one of --cases N and --case-list FILE")
    if steps < 1:
        raise CommandError(f"--steps must be >= 1, got {steps}")
    ckpt_dir = resolve_checkpoint(run)
    run_dir = run_dir_of(ckpt_dir)
    cfg = load_config(run_dir / CONFIG_FILE) if run_dir is not None else Config()
    meta = read_model_meta(ckpt_dir)
    trained_on = meta.get("dataset") or {}
    names = list(trained_on.get("rater_names") or [])
    model = load_model(ckpt_dir)
    if len(names) != model.num_raters:
        raise CommandError(f"{ckpt_dir}: its model.json records no rater names for its {model.num_raters} raters "
                           "(a checkpoint written by `proseg train` does); cannot tell which rater is new")
    if rater in names:
        raise CommandError(f"rater {rater!r} is already one of the model's raters {names}")
    store = open_dataset(str(data))
    if rater not in store.rater_names:
        raise DataError(f"{store.path}: has no rater {rater!r} (its raters: {store.rater_names})")
    if store.num_channels != model.in_channels:
        raise DataError(f"{store.path}: {store.num_channels} image channel(s), the model expects {model.in_channels}")
    src = store.rater_names.index(rater)
    fold = cfg.data.fold if fold is None else int(fold)
    if not 0 <= fold < store.num_folds:
        raise CommandError(f"--fold {fold}: {store.path} has {store.num_folds} folds")

    load_case, cases_of = case_loader(store)
    all_cases = set(cases_of(np.arange(len(store))))
    if case_list is not None:
        chosen = read_case_list(case_list)
        unknown = [c for c in chosen if c not in all_cases]
        if unknown:
            raise CommandError(f"--case-list: {len(unknown)} case id(s) not in {store.path}: {unknown[:5]}")
        test = set(cases_of(store.rows(fold, "test")))
        if test & set(chosen):
            warnings.warn(f"--case-list: {sorted(test & set(chosen))[:5]} are test cases of fold {fold}; their "
                          "scores will not be held out", ProsegWarning, stacklevel=2)
        absent = [c for c in chosen if not bool(load_case(c).present[src])]
        if absent:
            raise DataError(f"rater {rater!r} has no mask in {len(absent)} chosen case(s): {absent[:5]}")
    else:
        chosen = choose_cases(rater_cases(store, fold, "train", src), int(cases or 0), seed)
    val = [c for c in rater_cases(store, fold, "val", src) if c not in set(chosen)]

    index = [store.rater_names.index(n) if n in store.rater_names else -1 for n in names] + [src]
    new_names = [*names, rater]
    init_arg: str | int = init
    closest: dict[str, Any] | None = None
    if init not in ("mean", "prior"):
        if init == "closest":
            scores = rater_dice(model, [load_case(c) for c in chosen], src, list(range(len(names))), seed=seed)
            best = int(np.argmax(scores))
            closest = {"rater": names[best], "dice": dict(zip(names, scores, strict=True))}
            init_arg = best
        elif init in names:
            init_arg = names.index(init)
        else:
            raise CommandError(f"--init must be one of {', '.join(INITS)} or a rater of the model {names}, "
                               f"got {init!r}")
    try:
        new = model.add_rater(init_arg)
    except NotSupportedError as exc:
        raise CommandError(f"{meta['model']['name']}: {exc}; adaptation needs per-rater parameters") from exc
    freeze = model.freeze_except_rater(new)

    rows = np.concatenate([store.volume_rows(np.flatnonzero(store.volume_ids == c))[c] for c in chosen])
    base = MultiRaterDataset(store, np.sort(rows), augment=None, seed=seed)
    train = _RaterView(base, index, new)

    def load_val(case_id: str) -> CaseData:
        return _view_case(load_case(case_id), index, new)

    same_order = list(store.rater_names) == new_names
    if not same_order:
        warnings.warn(f"{store.path} lists its raters as {store.rater_names}, the adapted model as {new_names}: "
                      "score it in personalized mode only on a store with the raters in the model's order",
                      ProsegWarning, stacklevel=2)
    data_meta = {
        "path": str(store.path), "in_channels": store.num_channels, "num_raters": len(new_names),
        "rater_names": new_names,
        # the store's checksum only when its raters are the model's, in order (else compat must compare the names)
        "manifest_sha256": manifest_checksum(store.path) if same_order else None,
        "preprocessing": trained_on.get("preprocessing")
        or {k: store.manifest[k] for k in PREPROCESSING_KEYS if k in store.manifest},
    }
    tdata = TrainData(train, val, load_val, data_meta)

    bs = int(batch_size or min(cfg.train.batch_size, len(train)))
    steps_per_epoch = -(-len(train) // bs)
    every = val_every_steps or max(1, steps // 5)
    run_cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=str(store.path), fold=fold, augment=False, num_workers=0),
        optim=dataclasses.replace(cfg.optim, lr=float(lr), weight_decay=0.0, warmup_steps=0),
        train=dataclasses.replace(cfg.train, epochs=0, max_steps=int(steps), time_budget_s=0.0, batch_size=bs,
                                  seed=seed, device=device, val_every=max(1, every // steps_per_epoch),
                                  checkpoint_every=0, compile=False, val_mode="personalized"),
    )
    adaptation = {
        "from_checkpoint": str(ckpt_dir), "rater": rater, "rater_index": new, "init": init,
        "init_rater": closest["rater"] if closest else (names[init_arg] if isinstance(init_arg, int) else None),
        "closest": closest, "cases": chosen, "val_cases": val, "steps": int(steps), "lr": float(lr),
        "fold": fold, "store": str(store.path), "parameters": [n for n, _ in model.rater_parameters(new)],
    }
    t0 = time.time()
    try:
        trainer = AdaptTrainer(run_cfg, out, freeze=freeze, adaptation=adaptation, data=tdata, model=model,
                               force=force, command=command)
        result = trainer.fit()
    finally:
        freeze.remove()
    seconds = time.time() - t0
    info_path = Path(out) / RUN_INFO_FILE
    if trainer.dist.is_main and info_path.is_file():
        info = json.loads(info_path.read_text())
        info["adaptation"] = {**adaptation, "seconds": seconds}
        write_json(info_path, info)
    return {"run_dir": str(out), "rater": rater, "rater_index": new, "rater_names": new_names, "cases": chosen,
            "val_cases": val, "closest": closest, "seconds": seconds, "fit": result}
