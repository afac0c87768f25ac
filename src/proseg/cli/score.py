"""``proseg score LABELS PREDS``: score anyone's multi-rater predictions with every metric.

Only typer and the standard library are imported at module level (torch and the metrics inside the command).
The choices typer shows and checks (``ConventionChoice``, ``EstimatorChoice``, the ``--thresholds`` default) are
therefore spelled out here rather than imported from :mod:`proseg.metrics` (whose import loads torch, ~3 s of
``proseg --help``); ``tests/engine/test_cli.py`` checks that they equal ``CONVENTIONS``, ``ESTIMATORS`` and
``DEFAULT_THRESHOLDS``.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer


class ConventionChoice(str, Enum):
    standard = "standard"
    reference = "reference"


class EstimatorChoice(str, Enum):
    v = "v"
    u = "u"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _parse_thresholds(text: str) -> tuple[float, ...]:
    try:
        ts = tuple(float(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        _fail(f"--thresholds must be comma-separated numbers, got {text!r}")
    if not ts or any(not (0.0 <= t < 1.0) for t in ts):
        _fail(f"--thresholds must be numbers in [0, 1), got {text!r}")
    return ts


def _format_record(rec: dict[str, Any], thresholds: tuple[float, ...]) -> str:
    ts = ",".join(f"{t:g}" for t in thresholds)
    lines = [
        f"convention={rec['convention']} estimator={rec['estimator']} N={rec['num_labels']} "
        f"K={rec['num_predictions']} thresholds={ts}"
    ]
    for key, val in rec.items():
        if key in ("convention", "estimator", "num_labels", "num_predictions", "case_id"):
            continue
        if isinstance(val, list):
            shown = ", ".join("nan" if math.isnan(v) else f"{v:.6f}" for v in val)
            lines.append(f"{key:<24} [{shown}]")
        else:
            lines.append(f"{key:<24} {'nan' if math.isnan(val) else f'{val:.6f}'}")
    return "\n".join(lines)


def score(
    labels: Annotated[Path, typer.Argument(help="Labels (N,*S) of one case (.npy/.npz/.nii.gz), or a folder of them.")],
    preds: Annotated[
        Path,
        typer.Argument(help="Predictions (M,*S), probabilities or binary, of one case, or a folder matched by name."),
    ],
    convention: Annotated[
        ConventionChoice,
        typer.Option(
            help="Empty-mask convention: 'standard' (IoU(∅,∅)=Dice(∅,∅)=1) or 'reference' (D-Persona/ProSeg code)."
        ),
    ] = ConventionChoice.standard,
    estimator: Annotated[
        EstimatorChoice, typer.Option(help="GED estimator: 'v' (pairs include i=i', as published) or 'u' (i≠i').")
    ] = EstimatorChoice.v,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    thresholds: Annotated[str, typer.Option(help="Dice_soft thresholds, comma-separated.")] = "0.1,0.3,0.5,0.7,0.9",
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="Also write the per-case records to this CSV file.")
    ] = None,
    summary_csv: Annotated[
        Path | None, typer.Option("--summary-csv", help="Folder mode: also write mean ± std per metric to this CSV.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Score predictions against multi-rater labels with every metric (GED, Dice_soft, Dice_max, Dice_match, ...).

    LABELS and PREDS are two files of one case, or two folders of per-case files matched by name.

    Pairing example: case_007.npy in LABELS with case_007.nii.gz in PREDS. NIfTI: the K masks on the last axis.

    Predictions are binarised with > 0.5 where a metric needs masks. Definitions and conventions: docs/metrics.md.
    """
    from proseg.cli.errors import user_errors

    with user_errors(exit_code=1):  # e.g. a full disk while writing --csv: one line, as for bad inputs
        _score(labels, preds, convention.value, estimator.value, json_output, thresholds, csv_path, summary_csv,
               device)


def _score(labels: Path, preds: Path, conv: str, est: str, json_output: bool, thresholds: str, csv_path: Path | None,
           summary_csv: Path | None, device: str) -> None:
    import torch

    from proseg.jsonio import dumps
    from proseg.metrics import case_metrics
    from proseg.metrics.aggregate import aggregate, format_summary, write_records_csv, write_summary_csv
    from proseg.metrics.files import ScoreInputError, load_array, pair_folders

    ts = _parse_thresholds(thresholds)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            _fail(f"--device {device}: CUDA is not available")
    except RuntimeError as err:
        _fail(f"--device {device!r}: {err}")

    for p in (labels, preds):
        if not p.exists():
            _fail(f"{p}: no such file or folder")
    if labels.is_dir() != preds.is_dir():
        _fail(f"LABELS and PREDS must both be files or both be folders: {labels} / {preds}")

    def score_one(lab_path: Path, prd_path: Path) -> dict[str, Any]:
        lab = load_array(lab_path, "labels")
        prd = load_array(prd_path, "preds")
        if lab.shape[1:] != prd.shape[1:]:
            raise ScoreInputError(
                f"shape mismatch: labels {lab_path} {tuple(lab.shape)} vs predictions {prd_path} {tuple(prd.shape)} "
                "(expected (N,*S) and (M,*S) with the same *S)"
            )
        try:
            return case_metrics(
                torch.from_numpy(lab).to(dev),
                torch.from_numpy(prd).to(dev),
                convention=conv,
                estimator=est,
                thresholds=ts,
            )
        except ValueError as err:
            raise ScoreInputError(f"{lab_path} / {prd_path}: {err}") from err

    try:
        if labels.is_file():
            rec = score_one(labels, preds)
            if csv_path is not None:
                write_records_csv([{"case_id": labels.name, **rec}], csv_path, thresholds=ts)
            if json_output:
                typer.echo(dumps(rec))  # strict JSON: undefined values (NaN) are null
            else:
                typer.echo(_format_record(rec, ts))
            return
        records = []
        for name, lab_path, prd_path in pair_folders(labels, preds):
            records.append({"case_id": name, **score_one(lab_path, prd_path)})
    except ScoreInputError as err:
        _fail(str(err))
    summary = aggregate(records, thresholds=ts)
    if csv_path is not None:
        write_records_csv(records, csv_path, thresholds=ts)
    if summary_csv is not None:
        write_summary_csv(summary, summary_csv)
    if json_output:
        typer.echo(dumps({"summary": summary, "cases": records}))
    else:
        typer.echo(format_summary(summary))
