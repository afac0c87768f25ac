"""``proseg evaluate``: score a checkpoint on a split of a prepared dataset (one process or DDP-sharded).

Writes into the output folder (all-or-nothing: a temp folder renamed at the end):

* ``metrics.json``: per mode and convention the dataset mean ± std (ddof=0) of every metric
  (:func:`proseg.metrics.aggregate`), with the estimator, K, thresholds, the checkpoint's sha256, the dataset's
  manifest checksum, split and fold;
* ``cases.csv``: one row per (case, mode, convention);
* ``figures/<case>.png`` for the first ``num_figures`` cases (:func:`proseg.viz.figures.case_figure`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proseg.engine import checkpoint as ckpt
from proseg.engine.compat import check_dataset_matches
from proseg.engine.distributed import barrier, env_dist_info, init_distributed, resolve_device
from proseg.engine.evaluation import MODES, evaluate_cases, resolve_modes, supports
from proseg.errors import CommandError, DataError
from proseg.fsutil import staged_dir


def _safe_name(case_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in case_id)


def default_output(ckpt_dir: Path, split: str, fold: int) -> Path:
    run = ckpt.run_dir_of(ckpt_dir)
    base = run if run is not None else ckpt_dir
    return base / "eval" / f"{split}-fold{fold}"


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | None,
    *,
    split: str = "test",
    fold: int | None = None,
    out: str | os.PathLike[str] | None = None,
    modes: Sequence[str] | None = None,
    num_samples: int | None = None,
    conventions: Sequence[str] | None = None,
    estimator: str | None = None,
    thresholds: Sequence[float] | None = None,
    seed: int | None = None,
    num_figures: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    force: bool = False,
    max_cases: int = 0,
    case_stride: int = 1,
) -> dict[str, Any]:
    """Evaluate; returns the ``metrics.json`` content (on every rank). See the module docstring.

    Every option left at None takes the run's ``eval`` section (``config.yaml``), or its default
    (:class:`proseg.engine.config.EvalConfig`) for a bare checkpoint. ``modes=None`` means the run's
    ``eval.modes`` that the model has (all modes it has for a bare checkpoint); explicit modes must exist.
    """
    from proseg.engine.config import load_config
    from proseg.engine.data import case_loader, open_dataset
    from proseg.metrics.aggregate import aggregate, write_records_csv
    from proseg.models import load_model
    from proseg.models.base import CONFIG_NAME, WEIGHTS_NAME

    info = env_dist_info()
    ckpt_dir = ckpt.resolve_checkpoint(checkpoint)
    run = ckpt.run_dir_of(ckpt_dir)
    run_cfg = load_config(run / "config.yaml") if run is not None else None
    if data is None:
        if run_cfg is None or not run_cfg.data.path:
            raise CommandError("--data DATASET is required (the checkpoint is not inside a run with a data.path)")
        data = run_cfg.data.path
    if fold is None:
        fold = run_cfg.data.fold if run_cfg is not None else 0
    from proseg.engine.config import EvalConfig

    ev = run_cfg.eval if run_cfg is not None else EvalConfig()
    num_samples = ev.num_samples if num_samples is None else num_samples
    conventions = tuple(ev.conventions if conventions is None else conventions)
    estimator = ev.estimator if estimator is None else estimator
    thresholds = tuple(ev.thresholds if thresholds is None else thresholds)
    seed = ev.seed if seed is None else seed
    num_figures = ev.num_figures if num_figures is None else num_figures
    batch_size = ev.batch_size if batch_size is None else batch_size
    if split not in ("train", "val", "test"):
        raise CommandError(f"--split must be train, val or test, got {split!r}")
    if num_samples < 1:
        raise CommandError(f"--samples must be >= 1, got {num_samples}")
    for c in conventions:
        if c not in ("standard", "reference"):
            raise CommandError(f"--convention must be standard, reference or both, got {c!r}")
    if estimator not in ("v", "u"):
        raise CommandError(f"--estimator must be v or u, got {estimator!r}")
    out_dir = Path(out) if out is not None else default_output(ckpt_dir, split, fold)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir}: already exists (use --force to replace it)")
    _check_writable(out_dir)

    dev = resolve_device(device, info, key="--device")
    init_distributed(dev, info)
    store = open_dataset(str(data))
    model = load_model(ckpt_dir, map_location=dev)
    model.to(dev).eval()
    name = model.init_config.get("name", type(model).__name__)
    meta = json.loads((ckpt_dir / CONFIG_NAME).read_text())
    if modes:
        use_modes = resolve_modes(model, list(modes), strict=True)
    else:
        wanted = list(run_cfg.eval.modes) if run_cfg is not None else list(MODES)
        use_modes = resolve_modes(model, [m for m in MODES if m in wanted and supports(model, m)] or wanted,
                                  strict=False)
    data_warnings = check_dataset_matches(meta.get("dataset"), store, in_channels=model.in_channels,
                                          num_raters=model.num_raters, modes=use_modes,
                                          checkpoint=f"the checkpoint {ckpt_dir}")
    if not 0 <= fold < store.num_folds:
        raise CommandError(f"--fold {fold}: {store.path} has {store.num_folds} folds")
    load_case, cases_of = case_loader(store)
    cases = cases_of(store.rows(fold, split))
    if case_stride < 1:
        raise CommandError(f"--case-stride must be >= 1, got {case_stride}")
    cases = cases[::case_stride]  # a systematic sample over all patients, before max_cases
    if max_cases:
        cases = cases[:max_cases]
    if not cases:
        raise DataError(f"{store.path}: the {split} part of fold {fold} is empty")
    keep = set(cases[:num_figures])
    t0 = time.time()
    records, kept, skipped = evaluate_cases(
        model, cases, load_case, modes=use_modes, num_samples=num_samples, conventions=conventions,
        estimator=estimator, thresholds=thresholds, seed=seed, batch_size=batch_size, keep=keep,
        rank=info.rank, world_size=info.world_size, progress=info.is_main)
    seconds = time.time() - t0
    results: dict[str, dict[str, Any]] = {}
    for mode in use_modes:
        for conv in conventions:
            recs = [r for r in records if r["mode"] == mode and r["convention"] == conv]
            if recs:
                results.setdefault(mode, {})[conv] = aggregate(recs, thresholds=thresholds)
    report: dict[str, Any] = {
        "checkpoint": str(ckpt_dir),
        "checkpoint_sha256": ckpt.file_sha256(ckpt_dir / WEIGHTS_NAME),
        "model": meta.get("model"),
        "trained_steps": meta.get("step"),
        "dataset": str(store.path),
        "manifest_sha256": ckpt.manifest_checksum(store.path),
        "split": split,
        "fold": fold,
        "num_cases": len(cases),
        "case_stride": case_stride,
        "max_cases": max_cases,
        "skipped_cases_without_labels": skipped,
        "modes": use_modes,
        "num_samples": num_samples,
        "samples_meaning": {"personalized": "K samples per rater; each rater's prediction is their mean",
                            "diverse": "K samples per case"},
        "conventions": list(conventions),
        "estimator": estimator,
        "thresholds": list(thresholds),
        "seed": seed,
        "world_size": info.world_size,
        "seconds": round(seconds, 3),
        "proseg_version": meta.get("proseg_version"),
        "git_commit": ckpt.git_commit(),
        "warnings": data_warnings,
        "results": results,
    }
    if info.is_main:
        with staged_dir(out_dir) as tmp:
            (tmp / "metrics.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
            if records:
                write_records_csv(records, tmp / "cases.csv", thresholds=thresholds)
            if kept:
                from proseg.viz.figures import case_figure

                for cid in cases[:num_figures]:
                    k = kept.get(cid)
                    if k is None:
                        continue
                    case_figure(tmp / "figures" / f"{_safe_name(cid)}.png", k["image"], k["masks"], k["present"],
                                personalized=k.get("personalized"), diverse=k.get("diverse"),
                                title=f"{name} | {cid} | K={num_samples}", rater_names=store.rater_names)
    barrier()
    report["out"] = str(out_dir)
    return report


def _check_writable(path: Path) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{path}: cannot write here ({probe} is a file)")
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"{path}: cannot write here ({probe} is not writable)")


def summary_table(report: dict[str, Any], keys: Sequence[str] = ("ged", "dice_soft", "dice_max", "dice_match",
                                                                  "ci_score")) -> str:
    """A small text table of the means ± std for printing."""
    lines = []
    for mode, by_conv in report["results"].items():
        for conv, summ in by_conv.items():
            cells = []
            for k in keys:
                m = summ["metrics"].get(k)
                if m is not None:
                    cells.append(f"{k}={m['mean']:.4f}±{m['std']:.4f}")
            lines.append(f"{mode:<12} {conv:<9} " + "  ".join(cells))
    return "\n".join(lines)

