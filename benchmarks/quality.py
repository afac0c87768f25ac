"""Real-data benchmark: does ProSeg beat its baselines under the same compute, and what should the defaults be?

One command per dataset. Every model is trained under the same wall-clock budget on the same prepared data
and fold (best checkpoint on the fold's *validation* part, never the test part), evaluated on the test part
in diverse mode (K samples per case) and personalized mode (K per rater, averaged) under both metric
conventions, and tabulated beside two floors (an all-empty predictor, the training-set mean mask) and the
inter-rater ceiling. On LIDC every table is also split into slices where every rater drew something and
slices where at least one rater left the slice empty. Beside each main table a "diversity and calibration" table
lists d_aa (``ged_labels``), d_pp (``ged_preds``), their ratio, the pixel variances, the ambiguity share
(personalized) and the Brier / foreground Brier / ECE of the soft mean (docs/metrics.md).

    proseg prepare lidc-kaggle ../shared/data/lidc-idri-slices data/lidc --rater-order area-ranked
    python benchmarks/quality.py --dataset lidc --data data/lidc --out bench/lidc --budget-min 15
    proseg prepare qubiq ../shared/data/qubiq-brain-growth data/qubiq
    python benchmarks/quality.py --dataset qubiq --data data/qubiq --out bench/qubiq --budget-min 5

Ablations: ``--steps N`` trains every model for N optimizer steps instead of a wall-clock budget, and
``--split val`` scores the validation part (choices are made there; ``--split test`` is for reports):

    python benchmarks/quality.py --dataset lidc --data data/lidc --out abl --steps 400 --split val \
        --models "new=proseg:default" "new-T15=proseg:default|from=new|infer.z_temperature=1.5"

Models are given as ``label=name[:preset][|key=value...]`` (``--models``) or taken from the default list.
``from=LABEL`` scores another entry's run instead of training, ``infer.KEY=VALUE`` passes ``--model-arg KEY=VALUE``
to ``proseg evaluate``.
Training and evaluation run as ``proseg train`` / ``proseg evaluate`` child processes, whose wall time and peak
RSS (``os.wait4``) are recorded. Re-running skips runs that already finished (``--retrain`` to redo them).
Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proseg.metrics import CONVENTIONS

REPO = Path(__file__).resolve().parents[1]

DEFAULT_MODELS = [
    "proseg-default=proseg:default",
    "proseg-reference=proseg:reference",
    "prob_unet=prob_unet",
    "phiseg=phiseg",
    "pionono=pionono",
    "dpersona=dpersona",
    "cm_global=cm_global",
    "cm_pixel=cm_pixel",
]

DIVERSE_KEYS = ("ged", "ged_cross", "ged_labels", "ged_preds", "dice_soft", "dice_max", "dice_max_reverse",
                "dice_match", "ci_score")
PERSONAL_KEYS = ("dice_per_rater_mean", "dice_match", "dice_max", "ged")
# Does the spread carry the raters' disagreement? (proseg.metrics.calibration; ambiguity_share is personalized only)
DIVERSE_SPREAD_KEYS = ("ged_labels", "ged_preds", "diversity_ratio", "sample_variance", "rater_variance", "brier",
                       "brier_fg", "ece", "empty_labels", "empty_preds")
PERSONAL_SPREAD_KEYS = ("ged_labels", "ged_preds", "diversity_ratio", "ambiguity_share", "sample_variance",
                        "rater_variance", "brier", "brier_fg", "ece", "empty_labels", "empty_preds")
PERCENT_PREFIXES = ("dice", "ci_")  # shown x100; every other metric with 4 decimals


# --------------------------------------------------------------------------------------------------------------
# child processes
def run_child(cmd: list[str], log: Path) -> dict[str, float]:
    """Run ``cmd`` with output to ``log``; return its wall time (s) and peak RSS (MiB, the child and the
    descendants it waited for). Raises with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed ({code}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0}


def proseg_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "proseg.cli.main", *args]


def parse_model(spec: str) -> tuple[str, str, str, list[str]]:
    """``label=name[:preset][|key=value...]`` -> (label, name, preset, overrides).

    Two special overrides: ``from=LABEL`` reuses the run of another entry (nothing is trained), and
    ``infer.KEY=VALUE`` is passed to ``proseg evaluate --model-arg KEY=VALUE`` (an inference-time choice such as
    ProSeg's ``diverse_mode``), so one trained model can be scored under several sampling choices."""
    label, _, rest = spec.partition("=")
    if not rest:
        label, rest = spec.split(":")[0], spec
    head, *overrides = rest.split("|")
    name, _, preset = head.partition(":")
    return label, name, preset or "default", overrides


def run_label(label: str, overrides: list[str]) -> str:
    """The run an entry is scored from: its own, or the one named by ``from=LABEL``."""
    src = [o.partition("=")[2] for o in overrides if o.startswith("from=")]
    return src[-1] if src else label


def infer_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides if o.startswith("infer.") for a in ("--model-arg", o[len("infer."):])]


def train_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(("from=", "infer."))]


def train_model(args: argparse.Namespace, label: str, name: str, preset: str, overrides: list[str],
                budget_s: float) -> dict[str, Any]:
    """Train one model under ``budget_s`` seconds; D-Persona spends 60% on stage 1 and 40% on stage 2."""
    run = args.out / "runs" / label
    done = run / "benchmark_train.json"
    if done.is_file() and not args.retrain:
        return json.loads(done.read_text())
    if run_label(label, overrides) != label:  # scored from another entry's run
        src = args.out / "runs" / run_label(label, overrides) / "benchmark_train.json"
        return {**json.loads(src.read_text()), "label": label} if src.is_file() else {"label": label}
    budget = ([f"train.max_steps={args.steps}", "train.time_budget_s=0"] if args.steps
              else [f"train.time_budget_s={budget_s:.0f}"])
    common = [f"model.preset={preset}", f"data.num_workers={args.workers}",
              f"train.max_val_cases={args.max_val_cases}", *args.override, *train_overrides(overrides)]
    stats: dict[str, Any] = {"label": label, "model": name, "preset": preset, "budget_s": budget_s}
    if name == "dpersona":
        stage1, stage2 = run.with_name(label + "-stage1"), run
        s1 = run_child(proseg_cmd("train", "-c", f"{args.dataset}/dpersona_stage1",
                                  "--data", str(args.data), "--out", str(stage1), "--fold", str(args.fold),
                                  *([f"train.max_steps={int(0.6 * args.steps)}", "train.time_budget_s=0"]
                                    if args.steps else [f"train.time_budget_s={0.6 * budget_s:.0f}"]), *common),
                       args.out / "logs" / f"{label}-stage1-train.log")
        s2 = run_child(proseg_cmd("train", "-c", f"{args.dataset}/dpersona_stage2",
                                  "--data", str(args.data), "--out", str(stage2), "--fold", str(args.fold),
                                  f"model.init_from={stage1 / 'checkpoints' / 'best'}",
                                  *([f"train.max_steps={args.steps - int(0.6 * args.steps)}",
                                     "train.time_budget_s=0"]
                                    if args.steps else [f"train.time_budget_s={0.4 * budget_s:.0f}"]), *common),
                       args.out / "logs" / f"{label}-stage2-train.log")
        stats.update(wall_s=s1["wall_s"] + s2["wall_s"], peak_rss_mib=max(s1["peak_rss_mib"], s2["peak_rss_mib"]))
    else:
        s = run_child(proseg_cmd("train", "-c", f"{args.dataset}/{name}",
                                 "--data", str(args.data), "--out", str(run), "--fold", str(args.fold),
                                 *budget, *common),
                      args.out / "logs" / f"{label}-train.log")
        stats.update(s)
    stats["steps"] = count_steps(run)
    done.write_text(json.dumps(stats, indent=2))
    return stats


def count_steps(run: Path) -> int | None:
    """The last optimiser step recorded in the run's step log or validation log."""
    steps: list[int] = []
    for name in ("log.jsonl", "val.jsonl"):
        log = run / name
        if log.is_file():
            steps += [int(json.loads(line).get("step", 0)) for line in log.read_text().splitlines() if line.strip()]
    return max(steps) if steps else None


def personalized_at(args: argparse.Namespace, k: int) -> bool:
    """Whether K is also evaluated in personalized mode (``--personalized-k``; every K when not given)."""
    return args.personalized_k is None or k in args.personalized_k


def evaluate_model(args: argparse.Namespace, label: str, k: int, overrides: list[str] = ()) -> Path:
    out = args.out / "eval" / f"{label}-K{k}"
    run = args.out / "runs" / run_label(label, list(overrides))
    if (out / "metrics.json").is_file() and not args.retrain:
        return out
    mode = "auto" if personalized_at(args, k) else "diverse"
    if mode == "diverse":  # a model without diverse output has nothing to score at this K
        from proseg.engine.evaluation import supports
        from proseg.models import load_model

        if not supports(load_model(run / "checkpoints" / "best"), "diverse"):
            return out
    run_child(proseg_cmd("evaluate", str(run), "--data", str(args.data), "--split", args.split, *infer_args(overrides),
                         "--fold", str(args.fold), "--mode", mode, "--samples", str(k), "--convention", "both",
                         "--figures", str(args.figures), "--max-cases", str(args.max_test_cases),
                         "--case-stride", str(args.test_stride),
                         "--out", str(out), "--force"),
              args.out / "logs" / f"{label}-eval-K{k}.log")
    return out


# --------------------------------------------------------------------------------------------------------------
# floors and ceiling, computed here on the same test cases
def test_cases(store: Any, fold: int, max_cases: int, stride: int, split: str = "test") -> list[tuple[str, np.ndarray]]:
    """The test cases ``proseg evaluate --case-stride stride --max-cases max_cases`` scores, in its order."""
    groups = store.volume_rows(store.rows(fold, split))
    items = list(groups.items())[::stride]
    return items[:max_cases] if max_cases else items


def floors_and_ceiling(args: argparse.Namespace, store: Any, k: int) -> list[dict[str, Any]]:
    """Per-case records for the all-empty and train-mean predictors and the inter-rater reference."""
    from proseg.metrics import case_metrics

    train_rows = store.rows(args.fold, "train")
    mean_mask = torch.from_numpy(
        np.asarray(store.masks[np.sort(train_rows)], dtype=np.float32).mean(axis=(0, 1))
    )  # (H, W): the training-set mean over slices and raters
    records: list[dict[str, Any]] = []
    for case_id, rows in test_cases(store, args.fold, args.max_test_cases, args.test_stride, args.split):
        masks = torch.from_numpy(np.array(store.masks[np.sort(rows)], dtype=bool))  # (D, R, H, W)
        present = np.array(store.rater_present[rows[0]], dtype=bool)  # a writable copy: torch indexes with it
        labels = masks[:, present].permute(1, 0, 2, 3)  # (N, D, H, W)
        if labels.shape[1] == 1:
            labels = labels[:, 0]
        n = labels.shape[0]
        spatial = labels.shape[1:]
        preds = {
            "floor: all-empty": torch.zeros((k, *spatial)),
            "floor: train mean mask": mean_mask.expand(k, *spatial).clone() if len(spatial) == 2
            else mean_mask.expand(k, *spatial).clone(),
        }
        for conv in CONVENTIONS:
            for label, p in preds.items():
                for mode, pp in (("diverse", p), ("personalized", p[:1].expand(n, *spatial))):
                    rec = case_metrics(labels, pp, convention=conv, estimator="v")
                    records.append({"label": label, "case_id": case_id, "mode": mode, "convention": conv,
                                    **flatten(rec)})
            # inter-rater ceiling: rater k "predicted" by rater k-1 (each rater against another human)
            if n > 1:
                perm = torch.roll(torch.arange(n), 1)
                rec = case_metrics(labels, labels[perm].float(), convention=conv, estimator="v")
                records.append({"label": "ceiling: inter-rater (rater k vs rater k-1)", "case_id": case_id,
                                "mode": "personalized", "convention": conv, **flatten(rec)})
    return records


def flatten(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in rec.items() if not isinstance(v, list)}
    per = rec.get("dice_per_rater")
    if per:
        out["dice_per_rater_mean"] = float(np.nanmean(per))
    return out


# --------------------------------------------------------------------------------------------------------------
# tables
def load_cases_csv(path: Path, label: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rec: dict[str, Any] = {"label": label}
            for key, val in r.items():
                try:
                    rec[key] = float(val)
                except (TypeError, ValueError):
                    rec[key] = val
            # index-aligned per-rater Dice arrives as dice_per_rater_0..R-1 (personalized mode, M == N)
            per = [rec[c] for c in r if c.startswith("dice_per_rater_") and not c.startswith("dice_per_rater_m")]
            per = [v for v in per if isinstance(v, float) and not math.isnan(v)]
            if per:
                rec["dice_per_rater_mean"] = float(np.mean(per))
            rows.append(rec)
    return rows


def all_drew(store: Any, case_ids: set[str]) -> dict[str, bool]:
    """case id -> every present rater drew a non-empty mask on it."""
    out: dict[str, bool] = {}
    for case_id, rows in store.volume_rows(np.arange(len(store))).items():
        if case_id in case_ids:
            m = np.asarray(store.masks[np.sort(rows)]).reshape(len(rows), store.num_raters, -1).any(axis=(0, 2))
            present = np.asarray(store.rater_present[rows[0]], dtype=bool)
            out[case_id] = bool(m[present].all())
    return out


def mean_std(values: list[float]) -> tuple[float, float, int]:
    arr = np.asarray([v for v in values if isinstance(v, float) and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std()), int(arr.size)


def table(records: list[dict[str, Any]], mode: str, conv: str, keys: tuple[str, ...], subset: str,
          flags: dict[str, bool], order: list[str]) -> str:
    lines = ["| model | n | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for label in order:
        recs = [r for r in records if r["label"] == label and r.get("mode") == mode and r.get("convention") == conv]
        if subset == "all raters drew":
            recs = [r for r in recs if flags.get(str(r["case_id"]), False)]
        elif subset == "some rater empty":
            recs = [r for r in recs if not flags.get(str(r["case_id"]), True)]
        if not recs:
            continue
        cells = []
        for key in keys:
            m, s, _ = mean_std([r.get(key, math.nan) for r in recs])
            cells.append("–" if math.isnan(m) else (f"{100 * m:.2f} ± {100 * s:.2f}" if key.startswith(PERCENT_PREFIXES)
                                                    else f"{m:.4f} ± {s:.4f}"))
        lines.append(f"| {label} | {len(recs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("lidc", "qubiq", "synthetic", "npc"), required=True,
                    help="selects the shipped config <dataset>/<model> (proseg config list)")
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset (proseg prepare)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="label=name[:preset][|key=value...]")
    ap.add_argument("--budget-min", type=float, default=15.0, help="training wall-clock budget per model")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0,
                    help="train for this many optimizer steps instead of --budget-min (a fixed-step ablation)")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="the part that is scored (and the floors computed on): val for choices, test for reports")
    ap.add_argument("--samples", type=int, nargs="*", default=[16, 50], help="K values for evaluation")
    ap.add_argument("--max-test-cases", type=int, default=0, help="evaluate the first N test cases (0 = all)")
    ap.add_argument("--test-stride", type=int, default=1,
                    help="evaluate every N-th test case, a systematic sample over all test patients (1 = all)")
    ap.add_argument("--personalized-k", type=int, nargs="*", default=None,
                    help="K values also scored in personalized mode (default: every K); other K: diverse only")
    ap.add_argument("--max-val-cases", type=int, default=0, help="validation cases per model selection (0 = all)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per training run")
    ap.add_argument("--figures", type=int, default=3)
    ap.add_argument("--override", nargs="*", default=[], help="dotted config overrides for every training run")
    ap.add_argument("--retrain", action="store_true", help="redo finished runs and evaluations")
    ap.add_argument("--only-tables", action="store_true", help="tabulate what exists; train/evaluate nothing")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from proseg.data.store import open_store

    store = open_store(args.data)
    specs = [parse_model(s) for s in args.models]
    train_stats: dict[str, Any] = {}
    for label, name, preset, overrides in specs:
        if args.only_tables:
            f = args.out / "runs" / label / "benchmark_train.json"
            if f.is_file():
                train_stats[label] = json.loads(f.read_text())
            continue
        print(f"[{time.strftime('%H:%M:%S')}] train {label} ({name}:{preset}) for "
              f"{f'{args.steps} steps' if args.steps else f'{args.budget_min} min'}", flush=True)
        try:
            train_stats[label] = train_model(args, label, name, preset, overrides, args.budget_min * 60)
            for k in args.samples:
                print(f"[{time.strftime('%H:%M:%S')}] evaluate {label} K={k}", flush=True)
                evaluate_model(args, label, k, overrides)
        except RuntimeError as exc:  # one model failing (e.g. diverging) must not stop the others
            print(f"[{time.strftime('%H:%M:%S')}] {label} FAILED: {exc}", flush=True)
            train_stats[label] = {"label": label, "model": name, "preset": preset, "failed": str(exc)[:2000],
                                  "budget_s": args.budget_min * 60, "wall_s": math.nan,
                                  "peak_rss_mib": math.nan}

    results: dict[str, Any] = {"dataset": args.dataset, "data": str(args.data), "fold": args.fold,
                               "budget_min": args.budget_min, "steps": args.steps, "split": args.split,
                               "samples": args.samples,
                               "max_test_cases": args.max_test_cases, "test_stride": args.test_stride,
                               "personalized_k": args.personalized_k, "train": train_stats,
                               "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
                               "tables": {}}
    budget_txt = f"{args.steps} steps" if args.steps else f"{args.budget_min:g} min"
    md = [f"# {args.dataset}: fold {args.fold}, {budget_txt} per model, scored on the {args.split} part\n"]
    for k in args.samples:
        records: list[dict[str, Any]] = floors_and_ceiling(args, store, k)
        order = [label for label, *_ in specs]
        for label in order:
            f = args.out / "eval" / f"{label}-K{k}" / "cases.csv"
            if f.is_file():
                records.extend(load_cases_csv(f, label))
        order += sorted({r["label"] for r in records if r["label"].startswith(("floor", "ceiling"))})
        flags = all_drew(store, {str(r["case_id"]) for r in records})
        subsets = ["all"] + (["all raters drew", "some rater empty"] if args.dataset == "lidc" else [])
        for conv in CONVENTIONS:
            for subset in subsets:
                for mode, keys, spread in (("diverse", DIVERSE_KEYS, DIVERSE_SPREAD_KEYS),
                                           ("personalized", PERSONAL_KEYS, PERSONAL_SPREAD_KEYS)):
                    if mode == "personalized" and not personalized_at(args, k):
                        continue
                    title = f"K={k}, {mode}, {conv} convention, {subset} slices"
                    for name, cols in ((title, keys), (f"{title}, diversity and calibration", spread)):
                        t = table(records, mode, conv, cols, subset, flags, order)
                        results["tables"][name] = t
                        md.append(f"\n### {name}\n\n{t}\n")
    md.append("\n### Training cost\n\n| model | budget (s) | wall (s) | steps | peak RSS (MiB) |")
    md.append("|---|---|---|---|---|")
    for label, st in train_stats.items():
        if "failed" in st:
            md.append(f"| {label} | {st['budget_s']:.0f} | failed: {st['failed'].splitlines()[-1][:120]} | – | – |")
            continue
        md.append(f"| {label} | {st['budget_s']:.0f} | {st['wall_s']:.0f} | {st.get('steps')} | "
                  f"{st['peak_rss_mib']:.0f} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
