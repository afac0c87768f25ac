"""``proseg demo``: prepare the synthetic source, train a small ProSeg and a Prob. U-Net for a few minutes,
evaluate both on the test part of fold 0, and write ``report.md`` with the metrics table and figures.

Everything lands under one folder::

    DIR/data/                  the prepared dataset (unless --data points at one)
    DIR/runs/<model>/          run directories (config, logs, checkpoints, eval/test-fold0/)
    DIR/figures/<model>-*.png  per-case figures of the test evaluation
    DIR/report.md              the metrics table (mean ± std over test cases) and the figures
    DIR/demo.json              what ran, for how long (marks DIR as a demo folder that a re-run may replace)

The two models train at the same time in two processes (one thread each), each bounded by a wall-clock budget
(``train.time_budget_s``), so the whole demo fits a fixed time on any machine; the number of steps reached
depends on the machine and is reported.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from proseg.commands.evaluate import evaluate_checkpoint
from proseg.data.prepare import prepare
from proseg.engine.config import Config, load_config, validate_config
from proseg.engine.trainer import Trainer
from proseg.errors import CommandError
from proseg.fsutil import atomic_write_text, check_writable
from proseg.jsonio import write_json

MARKER = "demo.json"
MODELS = (("proseg", "ProSeg"), ("prob_unet", "Prob. U-Net"))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file() and not force:
            raise FileExistsError(f"{out}: exists and is not a demo folder (use --force or another --out)")
        check_writable(out)  # before deleting anything: an unwritable folder must stay whole
        for name in ("runs", "figures", "report.md", MARKER):  # a previous demo: replace its results
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)


def demo_config(name: str, data: Path, seconds: float, batch_size: int) -> Config:
    """The demo's training config: the ``tiny`` preset, Adam, cosine over the time budget."""
    cfg = load_config(None, [
        f"data.path={data}", "data.fold=0", "data.augment=true", "data.num_workers=0",
        f"model.name={name}", "model.preset=tiny",
        "optim.optimizer=adam", f"optim.lr={1e-3 if name == 'prob_unet' else 2e-3}", "optim.warmup_steps=10",
        "optim.grad_clip=1.0",
        "train.epochs=1000", f"train.time_budget_s={seconds:.1f}", f"train.batch_size={batch_size}",
        "train.seed=0", "train.device=cpu", "train.log_every=5", "train.val_every=2", "train.max_val_cases=16",
        "train.val_num_samples=4", "train.val_metric=dice",
    ])
    if name == "prob_unet":  # trained with generalized Dice as in the ProSeg/D-Persona code base's baseline
        cfg.model.args.update({"seg_loss": "gdl", "sum_over_pixels": False})
    return validate_config(cfg)


def _train_and_evaluate(name: str, data_dir: str, run_dir: str, seconds: float, batch_size: int, eval_cases: int,
                        num_samples: int, threads: int) -> None:
    """One model's share of the demo (runs in its own process): train, evaluate, write ``demo_result.json``."""
    torch.set_num_threads(threads)
    cfg = demo_config(name, Path(data_dir), seconds, batch_size)
    t0 = time.time()
    summary = Trainer(cfg, run_dir, command=f"proseg demo ({name})").fit()
    train_s = time.time() - t0
    t1 = time.time()
    report = evaluate_checkpoint(run_dir, data_dir, split="test", fold=0, out=Path(run_dir) / "eval" / "test-fold0",
                                 num_samples=num_samples, conventions=("standard",), seed=0, num_figures=2,
                                 batch_size=32, device="cpu", max_cases=eval_cases)
    write_json(Path(run_dir) / "demo_result.json", {"summary": summary, "report": report, "train_s": train_s,
                                                     "eval_s": time.time() - t1})


def run_demo(out: str | os.PathLike[str] = "demo", data: str | os.PathLike[str] | None = None,
             minutes: float = 4.0, force: bool = False, cases: int = 400, eval_cases: int = 32,
             num_samples: int = 16, batch_size: int = 8, parallel: bool = True,
             log: Callable[[str], None] = _say) -> Path:
    """Run the demo; returns the path of ``report.md``.

    The models train **at the same time**, one process each with one intra-op thread (on a 2-core machine
    that uses both cores without the two thread pools fighting), each for ``minutes`` of wall-clock time
    (validation included), then evaluate on the test part of fold 0. ``parallel=False`` runs them one after
    the other in this process.
    """
    t_start = time.time()
    if minutes <= 0:
        raise CommandError(f"--minutes must be > 0, got {minutes}")
    out_dir = Path(out)
    if data is not None:
        data_dir = Path(data)
        if not (data_dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{data_dir}: not a prepared dataset (run `proseg prepare` first)")
    _prepare_out(out_dir, force)
    if data is None:
        data_dir = out_dir / "data"
        if not (data_dir / "manifest.json").is_file():
            log(f"preparing {cases} synthetic cases -> {data_dir}")
            prepare("synthetic", "0", data_dir, synthetic_options={"cases": cases}, force=data_dir.exists())
        else:
            log(f"reusing the prepared synthetic data in {data_dir}")
    for name, _ in MODELS:  # fail here, before any process starts, on a dataset the models cannot use
        demo_config(name, data_dir, 1.0, batch_size)
    seconds = minutes * 60.0
    jobs = []
    for name, label in MODELS:
        run_dir = out_dir / "runs" / name
        args = (name, str(data_dir), str(run_dir), seconds, batch_size, eval_cases, num_samples, 1)
        log(f"training {label} ({name}, preset tiny) for {minutes:g} min, then evaluating it on up to "
            f"{eval_cases} test cases with K={num_samples} -> {run_dir}")
        if parallel:
            proc = mp.get_context("spawn").Process(target=_train_and_evaluate, args=args, name=f"demo-{name}")
            proc.start()
            jobs.append((name, proc))
        else:
            _train_and_evaluate(*args[:-1], threads=max(1, os.cpu_count() or 1))
    for name, proc in jobs:
        proc.join()
        if proc.exitcode != 0:
            for _, other in jobs:
                if other.is_alive():
                    other.terminate()
            raise RuntimeError(f"the demo's {name} process failed (exit code {proc.exitcode}); see the messages "
                               "above")
    runs: dict[str, dict[str, Any]] = {}
    for name, label in MODELS:
        res = json.loads((out_dir / "runs" / name / "demo_result.json").read_text())
        runs[name] = {"label": label, **res}
    figures = _collect_figures(out_dir, runs)
    report_path = out_dir / "report.md"
    total = time.time() - t_start
    atomic_write_text(report_path, _report_md(runs, figures, data_dir, total))
    write_json(out_dir / MARKER, {"data": str(data_dir), "minutes": minutes, "seconds_total": round(total, 1),
                                  "runs": {k: {"steps": v["summary"]["steps"], "train_s": round(v["train_s"], 1),
                                               "eval_s": round(v["eval_s"], 1)} for k, v in runs.items()}})
    return report_path


def _collect_figures(out_dir: Path, runs: dict[str, dict[str, Any]]) -> list[tuple[str, Path]]:
    figs = []
    (out_dir / "figures").mkdir(exist_ok=True)
    for name, r in runs.items():
        src = Path(r["report"]["out"]) / "figures"
        for f in sorted(src.glob("*.png")):
            dst = out_dir / "figures" / f"{name}-{f.name}"
            shutil.copyfile(f, dst)
            figs.append((r["label"], dst))
    return figs


def _fmt(m: dict[str, Any] | None, pct: bool) -> str:
    if m is None or m["mean"] is None or (isinstance(m["mean"], float) and math.isnan(m["mean"])):
        return "–"
    s = 100.0 if pct else 1.0
    return f"{m['mean'] * s:.2f} ± {m['std'] * s:.2f}"


def _report_md(runs: dict[str, dict[str, Any]], figures: list[tuple[str, Path]], data: Path, total: float) -> str:
    lines = ["# proseg demo", "",
             f"Dataset: `{data}` (test part of fold 0). Training: the `tiny` preset of each model for a fixed "
             f"wall-clock budget on CPU; model selection on the fold's validation part. Total time {total / 60:.1f} "
             "min.", "",
             "Metrics: mean ± std over test cases (ddof 0), standard empty-mask convention, GED V-statistic, "
             "Dice in %. *personalized*: each rater's prediction is the mean of its K samples, scored against the "
             "raters (per-rater Dice index-aligned); *diverse*: K samples scored against the raters.", "",
             "| model | mode | K | GED ↓ | Dice_soft ↑ | Dice_max ↑ | Dice_match ↑ | per-rater Dice ↑ | CI ↑ | "
             "steps | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in runs.items():
        rep = r["report"]
        for mode in ("personalized", "diverse"):
            summ = rep["results"].get(mode, {}).get("standard")
            if summ is None:
                continue
            met = summ["metrics"]
            pr = summ["per_rater"].get("dice_per_rater")
            per_rater = "–"
            if pr is not None and mode == "personalized":
                vals = [v for v in pr["mean"] if v is not None and not math.isnan(v)]
                per_rater = f"{100 * sum(vals) / len(vals):.2f}" if vals else "–"
            lines.append(
                f"| {r['label']} | {mode} | {rep['num_samples']} | {_fmt(met.get('ged'), False)} | "
                f"{_fmt(met.get('dice_soft'), True)} | {_fmt(met.get('dice_max'), True)} | "
                f"{_fmt(met.get('dice_match'), True)} | {per_rater} | {_fmt(met.get('ci_score'), True)} | "
                f"{r['summary']['steps']} | {r['train_s']:.0f} |")
    lines += ["", f"{next(iter(runs.values()))['report']['num_cases']} test cases. Per-case numbers: "
              "`runs/<model>/eval/test-fold0/cases.csv`; full summaries: `metrics.json` beside it.", "",
              "## Figures", "",
              "Rows: image and rater masks; per-rater predictions; diverse samples; mean and uncertainty maps "
              "(total = rater + ambiguity variance).", ""]
    for label, f in figures:
        lines += [f"**{label}**: `{f.name}`", "", f"![{label} {f.stem}](figures/{f.name})", ""]
    return "\n".join(lines) + "\n"


def format_seconds(s: float) -> str:
    return f"{int(s // 60)} min {int(s % 60)} s"

