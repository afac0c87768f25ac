"""Dataset-level aggregation of per-case records: mean ± std, CSV files, a printable table.

A *record* is the dict returned by :func:`proseg.metrics.case_metrics` (one case), optionally with extra
identifying keys such as ``case_id`` (and ``mode`` and ``subset`` from the engine); unknown keys are ignored by
:func:`aggregate` and written as leading columns by :func:`write_records_csv` when they are ``case_id``,
``mode`` or ``subset``. The engine's personalized records also carry ``ambiguity_share``
(:data:`proseg.metrics.case.SAMPLE_KEYS`), which is aggregated and written like the other metrics.

Conventions written beside every number: the empty-mask ``convention``, the GED ``estimator``, the
Dice_soft ``thresholds`` (not part of a record: pass the ones the records were computed with), the number of
labels ``N`` and of predictions ``K`` per case. Mixing records of different conventions or estimators in
one aggregate is an error. The standard deviation is over cases with ``ddof=0`` (as the published code's
``np.std``) unless told otherwise; NaN values (undefined metrics) are left out and the count ``n`` of the
values used is reported beside each mean.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from proseg.fsutil import atomic_write_text
from proseg.metrics.case import LIST_KEYS, METRIC_KEYS
from proseg.metrics.dice import DEFAULT_THRESHOLDS, check_thresholds

ID_KEYS: tuple[str, ...] = ("case_id", "mode", "subset")


def _mean_std(values: Sequence[float], ddof: int) -> tuple[float, float, int]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = math.fsum(vals) / n
    if n - ddof <= 0:
        return mean, math.nan, n
    var = math.fsum((v - mean) ** 2 for v in vals) / (n - ddof)
    return mean, math.sqrt(var), n


def _distinct(records: Sequence[Mapping[str, Any]], key: str) -> int | list[int]:
    vals = sorted({int(r[key]) for r in records if key in r})
    return vals[0] if len(vals) == 1 else vals


def _single(records: Sequence[Mapping[str, Any]], key: str) -> str:
    vals = {str(r[key]) for r in records if key in r}
    if len(vals) > 1:
        raise ValueError(f"records mix several values of {key!r}: {sorted(vals)}; aggregate them separately")
    if not vals:
        raise ValueError(f"records lack the {key!r} key (are they case_metrics records?)")
    return vals.pop()


def aggregate(
    records: Sequence[Mapping[str, Any]],
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    ddof: int = 0,
) -> dict[str, Any]:
    """Mean ± std over cases of every metric, with the conventions beside them.

    Args:
        records: per-case dicts from :func:`proseg.metrics.case_metrics` (same convention and estimator).
        thresholds: the Dice_soft thresholds the records were computed with (recorded in the summary).
        ddof: delta degrees of freedom of the standard deviation (0 = population std, the published one).

    Returns:
        ``{"convention", "estimator", "thresholds", "num_cases", "num_labels", "num_predictions", "ddof",
        "metrics": {key: {"mean", "std", "n"}}, "per_rater": {key: {"mean": [...], "std": [...], "n": [...]}}}``;
        ``num_labels`` / ``num_predictions`` are an int when every case has the same value, else the sorted
        distinct values.

    Raises:
        ValueError: no records, or records that mix conventions or estimators.
    """
    if not records:
        raise ValueError("no records to aggregate")
    ts = check_thresholds(thresholds)
    summary: dict[str, Any] = {
        "convention": _single(records, "convention"),
        "estimator": _single(records, "estimator"),
        "thresholds": list(ts),
        "num_cases": len(records),
        "num_labels": _distinct(records, "num_labels"),
        "num_predictions": _distinct(records, "num_predictions"),
        "ddof": ddof,
        "metrics": {},
        "per_rater": {},
    }
    for key in METRIC_KEYS:
        if any(key in r for r in records):
            mean, std, n = _mean_std([r[key] for r in records if key in r], ddof)
            summary["metrics"][key] = {"mean": mean, "std": std, "n": n}
    for key in LIST_KEYS:
        lists = [list(r[key]) for r in records if r.get(key) is not None]
        if not lists:
            continue
        width = max(len(v) for v in lists)
        cols = [_mean_std([v[i] for v in lists if i < len(v)], ddof) for i in range(width)]
        summary["per_rater"][key] = {
            "mean": [c[0] for c in cols],
            "std": [c[1] for c in cols],
            "n": [c[2] for c in cols],
        }
    return summary


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.6f}"


def _context(summary: Mapping[str, Any]) -> str:
    ts = ",".join(f"{t:g}" for t in summary["thresholds"])
    return (
        f"convention={summary['convention']}, estimator={summary['estimator']}, "
        f"N={summary['num_labels']}, K={summary['num_predictions']}, thresholds={ts}"
    )


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table: one line per metric, ``mean ± std (n=...; convention, estimator, N, K, thresholds)``."""
    ctx = _context(summary)
    lines = [f"{summary['num_cases']} case(s); std over cases with ddof={summary['ddof']}"]
    for key, m in summary["metrics"].items():
        lines.append(f"{key:<18} {_fmt(m['mean'])} ± {_fmt(m['std'])}  (n={m['n']}; {ctx})")
    for key, m in summary["per_rater"].items():
        for i, (mu, sd, n) in enumerate(zip(m["mean"], m["std"], m["n"], strict=True)):
            lines.append(f"{key + f'[{i}]':<18} {_fmt(mu)} ± {_fmt(sd)}  (n={n}; {ctx})")
    return "\n".join(lines)


def _atomic_write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return v


def write_records_csv(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> Path:
    """Write one row per case (atomically: temp file, then rename).

    Columns: ``case_id`` / ``mode`` / ``subset`` when present, ``convention``, ``estimator``, ``thresholds``,
    ``num_labels``, ``num_predictions``, every scalar metric, then the per-rater lists spread over
    ``<key>_<i>`` columns (empty when a case has fewer raters or no aligned Dice).
    """
    if not records:
        raise ValueError("no records to write")
    ts = ";".join(f"{t:g}" for t in check_thresholds(thresholds))
    ids = [k for k in ID_KEYS if any(k in r for r in records)]
    scalars = [k for k in METRIC_KEYS if any(k in r for r in records)]
    widths = {k: max((len(r[k]) for r in records if r.get(k) is not None), default=0) for k in LIST_KEYS}
    header = [*ids, "convention", "estimator", "thresholds", "num_labels", "num_predictions", *scalars]
    for k in LIST_KEYS:
        header += [f"{k}_{i}" for i in range(widths[k])]
    rows = []
    for r in records:
        row = [r.get(k, "") for k in ids]
        row += [
            r.get("convention", ""),
            r.get("estimator", ""),
            ts,
            r.get("num_labels", ""),
            r.get("num_predictions", ""),
        ]
        row += [_cell(r[k]) if k in r else "" for k in scalars]
        for k in LIST_KEYS:
            vals = list(r.get(k) or [])
            row += [_cell(float(vals[i])) if i < len(vals) else "" for i in range(widths[k])]
        rows.append(row)
    _atomic_write_csv(Path(path), header, rows)
    return Path(path)


def write_summary_csv(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the aggregate (one row per metric, per-rater entries as ``<key>_<i>``) with its conventions."""
    ts = ";".join(f"{t:g}" for t in summary["thresholds"])
    ctx = [
        summary["convention"],
        summary["estimator"],
        ts,
        str(summary["num_labels"]),
        str(summary["num_predictions"]),
        summary["num_cases"],
        summary["ddof"],
    ]
    header = [
        "metric",
        "mean",
        "std",
        "n",
        "convention",
        "estimator",
        "thresholds",
        "num_labels",
        "num_predictions",
        "num_cases",
        "ddof",
    ]
    rows = [[k, _cell(m["mean"]), _cell(m["std"]), m["n"], *ctx] for k, m in summary["metrics"].items()]
    for k, m in summary["per_rater"].items():
        for i, (mu, sd, n) in enumerate(zip(m["mean"], m["std"], m["n"], strict=True)):
            rows.append([f"{k}_{i}", _cell(mu), _cell(sd), n, *ctx])
    _atomic_write_csv(Path(path), header, rows)
    return Path(path)
