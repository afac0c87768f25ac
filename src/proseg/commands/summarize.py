"""``proseg summarize``: the cross-fold summary of per-fold evaluations (mean ± std over folds, as papers report).

Inputs (:func:`collect`): ``metrics.json`` files, evaluation folders holding one, run folders (their
``eval/<split>-fold<k>/metrics.json``, every fold found), or glob patterns of any of these. Per mode, convention
and metric the summary is the mean of the per-fold means and their standard deviation over folds (population,
ddof=0; NaN fold means are left out and ``n`` says how many folds count).

Refused (``CommandError``): two evaluations of the same fold, an evaluation of ``--split all`` (it has no fold),
and folds that differ in what makes numbers comparable: the model configuration, K (``num_samples``), the
conventions, the modes, the GED estimator, the thresholds or the split. Folds scored on different datasets
(manifest checksums) or on a subsample (``--max-cases`` / ``--case-stride``) are summarized with a warning in the
summary (``warnings``) and on stderr.
"""

from __future__ import annotations

import glob
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proseg.engine.checkpoint import CONFIG_FILE
from proseg.errors import CommandError, ProsegWarning
from proseg.fsutil import atomic_write_text
from proseg.jsonio import write_json

__all__ = ["collect", "summarize", "to_markdown", "write_summary"]

# what must agree across folds (key in metrics.json -> how the message names it)
MUST_MATCH = {"model": "model", "num_samples": "K (--samples)", "conventions": "conventions", "modes": "modes",
              "estimator": "GED estimator", "thresholds": "thresholds", "split": "split"}
TABLE_KEYS = ("ged", "dice_soft", "dice_max", "dice_match", "ci_score")
_GLOB_CHARS = set("*?[")


def collect(inputs: Sequence[str | os.PathLike[str]], split: str = "test") -> list[Path]:
    """The ``metrics.json`` files named by ``inputs`` (files, evaluation folders, run folders, glob patterns)."""
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        if not Path(text).exists() and _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise CommandError(f"{text}: the pattern matches nothing")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(text)]
        for p in paths:
            found.extend(_metrics_files(p, split))
    unique: list[Path] = []
    for f in found:
        if f.resolve() not in {u.resolve() for u in unique}:
            unique.append(f)
    if not unique:
        raise CommandError("no evaluations to summarize")
    return unique


def _metrics_files(p: Path, split: str) -> list[Path]:
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CommandError(f"{p}: no such file or folder")
    if (p / "metrics.json").is_file():
        return [p / "metrics.json"]
    if (p / "eval").is_dir() or (p / CONFIG_FILE).is_file():
        files = sorted((p / "eval").glob(f"{split}-fold*/metrics.json"))
        if not files:
            raise CommandError(f"{p}: a run without eval/{split}-fold<k>/metrics.json; run `proseg evaluate {p} "
                               f"--split {split}` first (or pass --split)")
        return files
    raise CommandError(f"{p}: neither an evaluation folder (metrics.json) nor a run folder (eval/)")


def _read(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CommandError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
        raise CommandError(f"{path}: not a proseg evaluate metrics.json (no results)")
    return report


def summarize(inputs: Sequence[str | os.PathLike[str]], split: str = "test") -> dict[str, Any]:
    """The ``summary.json`` content for the evaluations named by ``inputs`` (see the module docstring)."""
    files = collect(inputs, split)
    reports = [(f, _read(f)) for f in files]
    by_fold: dict[int, Path] = {}
    for f, r in reports:
        fold = r.get("fold")
        if r.get("split") == "all" or not isinstance(fold, int):
            raise CommandError(f"{f}: an evaluation of split {r.get('split')!r} without a fold; a cross-fold summary "
                               "needs one evaluation per fold")
        if fold in by_fold:
            raise CommandError(f"two evaluations of fold {fold}: {by_fold[fold]} and {f}")
        by_fold[fold] = f
    first_file, first = reports[0]
    for f, r in reports[1:]:
        for key, name in MUST_MATCH.items():
            if r.get(key) != first.get(key):
                raise CommandError(f"the folds differ in {name}: {first_file} has {first.get(key)!r}, {f} has "
                                   f"{r.get(key)!r}; summarize evaluations of one setting only")
    notes = _notes(reports)
    for n in notes:
        warnings.warn(n, ProsegWarning, stacklevel=2)
    reports.sort(key=lambda fr: fr[1]["fold"])
    results: dict[str, dict[str, Any]] = {}
    for mode in first["modes"]:
        for conv in first["conventions"]:
            per_fold = [r["results"].get(mode, {}).get(conv, {}).get("metrics", {}) for _, r in reports]
            keys = [k for k in per_fold[0] if all(k in m for m in per_fold)]
            results.setdefault(mode, {})[conv] = {k: _over_folds([m[k].get("mean") for m in per_fold]) for k in keys}
    return {
        "num_folds": len(reports),
        "folds": [r["fold"] for _, r in reports],
        "statistic": "mean and std over the folds of each fold's mean over its cases; std with ddof=0 (population); "
                     "n = folds with a finite value",
        "ddof": 0,
        "split": first.get("split"),
        "model": first.get("model"),
        "num_samples": first.get("num_samples"),
        "modes": first.get("modes"),
        "conventions": first.get("conventions"),
        "estimator": first.get("estimator"),
        "thresholds": first.get("thresholds"),
        "num_cases": [r.get("num_cases") for _, r in reports],
        "sources": [str(f) for f, _ in reports],
        "warnings": notes,
        "results": results,
    }


def _notes(reports: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    notes = []
    datasets = {r.get("manifest_sha256") for _, r in reports}
    if len(datasets) > 1:
        notes.append("the folds were scored on different datasets (manifest checksums differ): "
                     + ", ".join(f"fold {r['fold']}: {r.get('dataset')}" for _, r in reports))
    partial = [f"fold {r['fold']}" for _, r in reports if r.get("max_cases") or (r.get("case_stride") or 1) != 1]
    if partial:
        notes.append(f"{', '.join(partial)} scored a subsample of the cases (--max-cases / --case-stride)")
    return notes


def _over_folds(values: list[Any]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n) if n else float("nan")
    return {"mean": mean, "std": std, "n": n, "per_fold": [None if v is None else float(v) for v in values]}


def _cell(m: dict[str, Any] | None) -> str:
    if m is None or not m["n"]:
        return "–"
    return f"{m['mean']:.4f} ± {m['std']:.4f}"


def to_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: the headline table (rows mode x convention), then every metric with its folds."""
    folds = summary["folds"]
    model = summary.get("model") or {}
    name = model.get("name", "?") if isinstance(model, dict) else str(model)
    lines = [
        f"# Cross-fold summary: {name}, {summary['split']} split, {summary['num_folds']} folds "
        f"({', '.join(map(str, folds))})",
        "",
        f"Mean ± std over folds of the per-fold means (std ddof=0, n = {summary['num_folds']} folds); "
        f"K = {summary['num_samples']}, GED estimator {summary['estimator']}.",
        "",
    ]
    for w in summary["warnings"]:
        lines += [f"> warning: {w}", ""]
    keys = [k for k in TABLE_KEYS if any(k in c for by in summary["results"].values() for c in by.values())]
    lines.append("| mode | convention | " + " | ".join(keys) + " |")
    lines.append("|---|---|" + "---|" * len(keys))
    for mode, by_conv in summary["results"].items():
        for conv, metrics in by_conv.items():
            lines.append(f"| {mode} | {conv} | " + " | ".join(_cell(metrics.get(k)) for k in keys) + " |")
    for mode, by_conv in summary["results"].items():
        for conv, metrics in by_conv.items():
            lines += ["", f"## {mode}, {conv}", "",
                      "| metric | mean ± std | n | " + " | ".join(f"fold {k}" for k in folds) + " |",
                      "|---|---|---|" + "---|" * len(folds)]
            for key, m in metrics.items():
                per = " | ".join("–" if v is None or not math.isfinite(v) else f"{v:.4f}" for v in m["per_fold"])
                lines.append(f"| {key} | {_cell(m)} | {m['n']} | {per} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``summary.json`` (strict JSON) and ``summary.md`` into ``out_dir`` (created); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "summary.json", out / "summary.md"
    write_json(js, summary, indent=1)
    atomic_write_text(md, to_markdown(summary))
    return js, md
