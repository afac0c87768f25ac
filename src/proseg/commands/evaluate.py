"""``proseg evaluate``: score a checkpoint on a split of a prepared dataset (one process or DDP-sharded).

Writes into the output folder (all-or-nothing: a temp folder renamed at the end):

* ``metrics.json``: per mode and convention the dataset mean ± std (ddof=0) of every metric
  (:func:`proseg.metrics.aggregate`), with the estimator, K, thresholds, the checkpoint's sha256, the dataset's
  manifest checksum, split and fold (``split`` ``all``: every case of the store, ``fold`` null; for scoring a
  store prepared from other patients, an external test set); ``results_by_subset``: per mode, convention and
  subset (``all``, ``every_rater_drew``, ``some_rater_empty``; :data:`proseg.engine.evaluation.SUBSETS`) the same
  aggregate over those cases only (null for a subset without cases);
* ``cases.csv``: one row per (case, mode, convention), with its ``subset`` tag;
* ``figures/<case>.png`` for the first ``num_figures`` cases (:func:`proseg.viz.figures.case_figure`).

The job in steps: resolve the options (:func:`resolve_options`: the call's, else the run's ``eval`` section),
load and check the checkpoint and the data (:func:`load_inputs`), sample and score the cases
(:func:`proseg.engine.evaluation.evaluate_cases`), build the report (:func:`build_report`), write it
(:func:`write_outputs`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proseg.data.splits import PARTS as SPLITS
from proseg.data.store import Store
from proseg.engine.checkpoint import CONFIG_FILE, git_commit, manifest_checksum, resolve_checkpoint, run_dir_of
from proseg.engine.compat import check_dataset_matches
from proseg.engine.config import Config, EvalConfig, load_config
from proseg.engine.data import case_loader, open_dataset
from proseg.engine.distributed import DistInfo, barrier, env_dist_info, init_distributed, resolve_device
from proseg.engine.evaluation import MODES, SUBSETS, evaluate_cases, resolve_modes, supports
from proseg.engine.types import CaseData
from proseg.errors import CommandError, DataError, ProsegWarning
from proseg.fsutil import check_writable, sha256_file, staged_dir
from proseg.jsonio import dumps
from proseg.metrics import CONVENTIONS, ESTIMATORS
from proseg.metrics.aggregate import aggregate, write_records_csv
from proseg.models import load_model
from proseg.models.base import WEIGHTS_NAME, MultiRaterModel, read_model_meta
from proseg.viz.figures import case_figure

EVAL_SPLITS = (*SPLITS, "all")  # "all": every case of the store, whatever its folds
SUMMARY_KEYS = ("ged", "ged_labels", "ged_preds", "diversity_ratio", "dice_soft", "dice_max", "dice_match",
                "ci_score")
SUMMARY_DETAIL_KEYS = ("ambiguity_share", "sample_variance", "rater_variance", "brier", "brier_fg", "ece")
"""The diversity and calibration metrics the summary lists on an indented line per mode and convention."""
SUMMARY_SUBSET_KEYS = ("ged",)
"""The metrics the summary lists per subset (``every_rater_drew``, ``some_rater_empty``) on an indented line."""
REPORT_SUBSETS = ("all", *SUBSETS)
SUMMARY_PER_RATER_KEYS = {"personalized": ("dice_per_rater", "dice_per_rater_matched")}
"""Per mode, the per-rater metrics (``aggregate``'s ``per_rater``) the summary lists, one line each: for
personalized mode the index-aligned per-rater Dice (rater r's prediction against rater r, the personalization
number) and the Hungarian-matched one."""


@dataclass
class EvalOptions:
    """Every setting of one evaluation, after the run's ``eval`` section filled what the call left at None."""

    data: str | os.PathLike[str]
    split: str
    fold: int
    out_dir: Path
    num_samples: int
    conventions: tuple[str, ...]
    estimator: str
    thresholds: tuple[float, ...]
    seed: int
    num_figures: int
    batch_size: int
    max_cases: int
    case_stride: int


@dataclass
class EvalInputs:
    """The loaded checkpoint and data: the model on its device, its ``model.json``, the cases to score."""

    model: MultiRaterModel
    meta: dict[str, Any]
    store: Store
    modes: list[str]
    warnings: list[str]
    cases: list[str]
    load_case: Callable[[str], CaseData]


def default_output(ckpt_dir: Path, split: str, fold: int, data: str | os.PathLike[str] | None = None) -> Path:
    """``RUN/eval/<split>-fold<k>``; for ``split="all"`` ``RUN/eval/all-<dataset folder name>``."""
    run = run_dir_of(ckpt_dir)
    base = run if run is not None else ckpt_dir
    if split == "all":
        return base / "eval" / f"all-{Path(data).name if data is not None else 'data'}"
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
    model_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate; returns the ``metrics.json`` content (on every rank). See the module docstring.

    ``model_args`` replaces inference-time constructor arguments of the checkpoint's model (its class's
    ``INFERENCE_ARGS``, e.g. ProSeg's ``diverse_mode``); they are recorded in ``metrics.json``.

    Every option left at None takes the run's ``eval`` section (``config.yaml``), or its default
    (:class:`proseg.engine.config.EvalConfig`) for a bare checkpoint. ``modes=None`` means the run's
    ``eval.modes`` that the model has (all modes it has for a bare checkpoint); explicit modes must exist.
    """
    info = env_dist_info()
    ckpt_dir = resolve_checkpoint(checkpoint)
    run = run_dir_of(ckpt_dir)
    run_cfg = load_config(run / CONFIG_FILE) if run is not None else None
    opts = resolve_options(
        ckpt_dir, run_cfg, data, split=split, fold=fold, out=out, num_samples=num_samples, conventions=conventions,
        estimator=estimator, thresholds=thresholds, seed=seed, num_figures=num_figures, batch_size=batch_size,
        max_cases=max_cases, case_stride=case_stride)
    if opts.out_dir.exists() and not force:
        raise FileExistsError(f"{opts.out_dir}: already exists (use --force to replace it)")
    check_writable(opts.out_dir)
    loaded = load_inputs(ckpt_dir, run_cfg, opts, modes, device, info, model_args)
    keep = set(loaded.cases[: opts.num_figures])
    t0 = time.time()
    records, kept, skipped = evaluate_cases(
        loaded.model, loaded.cases, loaded.load_case, modes=loaded.modes, num_samples=opts.num_samples,
        conventions=opts.conventions, estimator=opts.estimator, thresholds=opts.thresholds, seed=opts.seed,
        batch_size=opts.batch_size, keep=keep, rank=info.rank, world_size=info.world_size, progress=info.is_main)
    seconds = time.time() - t0
    report = build_report(ckpt_dir, opts, loaded, records, skipped=skipped, seconds=seconds, info=info,
                          model_args=model_args)
    if info.is_main:
        write_outputs(opts, loaded, report, records, kept)
    barrier()
    report["out"] = str(opts.out_dir)
    return report


def resolve_options(ckpt_dir: Path, run_cfg: Config | None, data: str | os.PathLike[str] | None, *, split: str,
                    fold: int | None, out: str | os.PathLike[str] | None, num_samples: int | None,
                    conventions: Sequence[str] | None, estimator: str | None, thresholds: Sequence[float] | None,
                    seed: int | None, num_figures: int | None, batch_size: int | None, max_cases: int,
                    case_stride: int) -> EvalOptions:
    """The call's options, the run's (``data.path``, ``data.fold``, ``eval``) where it gave None; checked."""
    if data is None:
        if run_cfg is None or not run_cfg.data.path:
            raise CommandError("--data DATASET is required (the checkpoint is not inside a run with a data.path)")
        data = run_cfg.data.path
    if fold is None:
        fold = run_cfg.data.fold if run_cfg is not None else 0
    ev = run_cfg.eval if run_cfg is not None else EvalConfig()
    opts = EvalOptions(
        data=data, split=split, fold=fold,
        out_dir=Path(out) if out is not None else default_output(ckpt_dir, split, fold, data),
        num_samples=ev.num_samples if num_samples is None else num_samples,
        conventions=tuple(ev.conventions if conventions is None else conventions),
        estimator=ev.estimator if estimator is None else estimator,
        thresholds=tuple(ev.thresholds if thresholds is None else thresholds),
        seed=ev.seed if seed is None else seed,
        num_figures=ev.num_figures if num_figures is None else num_figures,
        batch_size=ev.batch_size if batch_size is None else batch_size,
        max_cases=max_cases, case_stride=case_stride)
    if opts.split not in EVAL_SPLITS:
        raise CommandError(f"--split must be {', '.join(EVAL_SPLITS[:-1])} or {EVAL_SPLITS[-1]}, got {opts.split!r}")
    if opts.num_samples < 1:
        raise CommandError(f"--samples must be >= 1, got {opts.num_samples}")
    for c in opts.conventions:
        if c not in CONVENTIONS:
            raise CommandError(f"--convention must be {', '.join(CONVENTIONS)} or both, got {c!r}")
    if opts.estimator not in ESTIMATORS:
        raise CommandError(f"--estimator must be {' or '.join(ESTIMATORS)}, got {opts.estimator!r}")
    return opts


def load_inputs(ckpt_dir: Path, run_cfg: Config | None, opts: EvalOptions, modes: Sequence[str] | None,
                device: str, info: DistInfo, model_args: dict[str, Any] | None = None) -> EvalInputs:
    """Start the process group, open the data, load the model, choose its modes, check that they fit together,
    and list the cases to score (every ``case_stride``-th of the split, then the first ``max_cases``)."""
    dev = resolve_device(device, info, key="--device")
    init_distributed(dev, info)
    store = open_dataset(str(opts.data))
    model = load_model(ckpt_dir, map_location=dev, inference_args=model_args)
    model.to(dev).eval()
    meta = read_model_meta(ckpt_dir)
    use_modes = _choose_modes(model, modes, run_cfg)
    data_warnings = check_dataset_matches(meta.get("dataset"), store, in_channels=model.in_channels,
                                          num_raters=model.num_raters, modes=use_modes,
                                          checkpoint=f"the checkpoint {ckpt_dir}")
    if opts.split == "all":
        data_warnings += _whole_training_store(meta.get("dataset"), store)
    elif not 0 <= opts.fold < store.num_folds:
        raise CommandError(f"--fold {opts.fold}: {store.path} has {store.num_folds} folds")
    load_case, cases_of = case_loader(store)
    cases = cases_of(store.rows(opts.fold, opts.split))
    if opts.case_stride < 1:
        raise CommandError(f"--case-stride must be >= 1, got {opts.case_stride}")
    cases = cases[:: opts.case_stride]  # a systematic sample over all patients, before max_cases
    if opts.max_cases:
        cases = cases[: opts.max_cases]
    if not cases:
        what = "no cases" if opts.split == "all" else f"the {opts.split} part of fold {opts.fold} is empty"
        raise DataError(f"{store.path}: {what}")
    return EvalInputs(model, meta, store, use_modes, data_warnings, cases, load_case)


def _whole_training_store(trained_on: dict[str, Any] | None, store: Store) -> list[str]:
    """``--split all`` on the very store the checkpoint was trained on scores its training patients too: warn."""
    if not trained_on or trained_on.get("manifest_sha256") != manifest_checksum(store.path):
        return []
    note = (f"--split all on {store.path}, the dataset the checkpoint was trained on: the scores include its training "
            "patients (use --split test, or --split all on a dataset prepared from other patients)")
    warnings.warn(note, ProsegWarning, stacklevel=3)
    return [note]


def _choose_modes(model: MultiRaterModel, modes: Sequence[str] | None, run_cfg: Config | None) -> list[str]:
    """Explicit ``modes`` must all exist; otherwise the run's ``eval.modes`` (every mode for a bare checkpoint)
    that the model has."""
    if modes:
        return resolve_modes(model, list(modes), strict=True)
    wanted = list(run_cfg.eval.modes) if run_cfg is not None else list(MODES)
    return resolve_modes(model, [m for m in MODES if m in wanted and supports(model, m)] or wanted, strict=False)


def build_report(ckpt_dir: Path, opts: EvalOptions, loaded: EvalInputs, records: list[dict[str, Any]], *,
                 skipped: int, seconds: float, info: DistInfo,
                 model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``metrics.json`` content: what was scored, how, and per mode and convention the aggregate."""
    results: dict[str, dict[str, Any]] = {}
    by_subset: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in loaded.modes:
        for conv in opts.conventions:
            recs = [r for r in records if r["mode"] == mode and r["convention"] == conv]
            if recs:
                results.setdefault(mode, {})[conv] = aggregate(recs, thresholds=opts.thresholds)
                by_subset.setdefault(mode, {})[conv] = subset_summaries(recs, opts.thresholds)
    meta = loaded.meta
    return {
        "checkpoint": str(ckpt_dir),
        "checkpoint_sha256": sha256_file(ckpt_dir / WEIGHTS_NAME),
        # what was evaluated: model.json's config as rebuilt (pinned defaults, legacy defaults, --model-arg), so
        # that evaluations of one setting compare equal in `proseg summarize` whatever model.json spelled out
        "model": getattr(loaded.model, "init_config", None) or meta.get("model"),
        "model_args": dict(model_args or {}),
        "trained_steps": meta.get("step"),
        "dataset": str(loaded.store.path),
        "manifest_sha256": manifest_checksum(loaded.store.path),
        "split": opts.split,
        "fold": None if opts.split == "all" else opts.fold,
        "num_cases": len(loaded.cases),
        "case_stride": opts.case_stride,
        "max_cases": opts.max_cases,
        "skipped_cases_without_labels": skipped,
        "modes": loaded.modes,
        "num_samples": opts.num_samples,
        "samples_meaning": {"personalized": "K samples per rater; each rater's prediction is their mean",
                            "diverse": "K samples per case"},
        "conventions": list(opts.conventions),
        "estimator": opts.estimator,
        "thresholds": list(opts.thresholds),
        "seed": opts.seed,
        "world_size": info.world_size,
        "seconds": round(seconds, 3),
        "proseg_version": meta.get("proseg_version"),
        "git_commit": git_commit(),
        "warnings": loaded.warnings,
        "results": results,
        "results_by_subset": by_subset,
    }


def subset_summaries(records: list[dict[str, Any]], thresholds: Sequence[float]) -> dict[str, Any]:
    """``{subset: aggregate or None}`` for :data:`REPORT_SUBSETS` over the records of one mode and convention:
    ``all`` is every record, the others those whose ``subset`` tag matches (None when there is none)."""
    out: dict[str, Any] = {}
    for subset in REPORT_SUBSETS:
        recs = records if subset == "all" else [r for r in records if r.get("subset") == subset]
        out[subset] = aggregate(recs, thresholds=thresholds) if recs else None
    return out


def write_outputs(opts: EvalOptions, loaded: EvalInputs, report: dict[str, Any], records: list[dict[str, Any]],
                  kept: dict[str, dict[str, Any]]) -> None:
    """``metrics.json``, ``cases.csv`` and the figures, swapped in as one folder (rank 0 only)."""
    name = loaded.model.init_config.get("name", type(loaded.model).__name__)
    with staged_dir(opts.out_dir) as tmp:
        (tmp / "metrics.json").write_text(dumps(report, indent=2) + "\n")
        if records:
            write_records_csv(records, tmp / "cases.csv", thresholds=opts.thresholds)
        for cid in loaded.cases[: opts.num_figures]:
            k = kept.get(cid)
            if k is None:
                continue
            scores = {r["mode"]: r for r in records if r["case_id"] == cid and r["convention"] == opts.conventions[0]}
            case_figure(tmp / "figures" / f"{_safe_name(cid)}.png", k["image"], k["masks"], k["present"],
                        personalized=k.get("personalized"), diverse=k.get("diverse"),
                        title=f"{name} | {cid} | K={opts.num_samples}", rater_names=loaded.store.rater_names,
                        scores=scores)


def _safe_name(case_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in case_id)


def summary_table(report: dict[str, Any], keys: Sequence[str] = SUMMARY_KEYS,
                  per_rater_keys: dict[str, tuple[str, ...]] | None = None,
                  detail_keys: Sequence[str] = SUMMARY_DETAIL_KEYS,
                  subset_keys: Sequence[str] = SUMMARY_SUBSET_KEYS) -> str:
    """A small text table of the means ± std for printing: one line per mode and convention, then, indented,
    one line per per-rater metric of that mode (``[i]=mean±std``, entry i of ``per_rater``; default
    :data:`SUMMARY_PER_RATER_KEYS`), one line of the diversity and calibration metrics (``detail_keys``) and one
    line of ``subset_keys`` per subset (``every_rater_drew``, ``some_rater_empty``, from ``results_by_subset``).
    A metric that was undefined for some cases (NaN, left out) is followed by ``(n=…)``; an indented line is
    printed only when it has something to show."""
    per_rater_keys = SUMMARY_PER_RATER_KEYS if per_rater_keys is None else per_rater_keys
    by_subset = report.get("results_by_subset") or {}
    lines = []
    for mode, by_conv in report["results"].items():
        for conv, summ in by_conv.items():
            lines.append(f"{mode:<12} {conv:<9} " + "  ".join(_cells(summ, keys)))
            for k in per_rater_keys.get(mode, ()):
                pr = summ.get("per_rater", {}).get(k)
                if pr is not None:
                    pairs = zip(pr["mean"], pr["std"], strict=True)
                    cells = [f"[{i}]={mu:.4f}±{sd:.4f}" for i, (mu, sd) in enumerate(pairs)]
                    lines.append(f"{'':<22} {k:<22} " + "  ".join(cells))
            detail = _cells(summ, detail_keys)
            if detail:
                lines.append(f"{'':<22} {'diversity/calibration':<22} " + "  ".join(detail))
            subsets = by_subset.get(mode, {}).get(conv) or {}
            cells = []
            for name in SUBSETS:
                if name not in subsets:
                    continue
                sub = subsets[name]
                got = _cells(sub, subset_keys, always_n=True) if sub is not None else []
                cells.append(f"{name}: " + ("  ".join(got) if got else "no cases"))
            if cells:
                lines.append(f"{'':<22} {'by subset':<22} " + "   ".join(cells))
    return "\n".join(lines)


def _cells(summ: dict[str, Any], keys: Sequence[str], *, always_n: bool = False) -> list[str]:
    """``key=mean±std`` for the keys the aggregate has, ``(n=…)`` after it when fewer cases than the aggregate's
    (or always with ``always_n``)."""
    cells = []
    total = summ.get("num_cases")
    for k in keys:
        m = summ["metrics"].get(k)
        if m is None:
            continue
        mean, std = (math.nan if v is None else v for v in (m["mean"], m["std"]))  # null in a metrics.json read back
        cell = f"{k}={mean:.4f}±{std:.4f}"
        if always_n or (total is not None and m.get("n", total) != total):
            cell += f" (n={m.get('n')})"
        cells.append(cell)
    return cells
