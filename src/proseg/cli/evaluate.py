"""``proseg evaluate``: score a run or checkpoint on a split of a prepared dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``--model-arg`` values: ``["diverse_mode=per_rater"]`` -> ``{"diverse_mode": "per_rater"}`` (YAML values)."""
    from proseg.engine.config import parse_key_values

    return parse_key_values(items, "--model-arg")


def evaluate(
    checkpoint: Path = typer.Argument(..., help="A run directory (its best checkpoint) or a checkpoint directory."),
    data: Optional[Path] = typer.Option(  # noqa: UP045 (typer needs Optional on py3.10)
        None, "--data", help="Prepared dataset (default: the run's data.path)."),
    split: str = typer.Option(
        "test", "--split", help="train, val or test part of the fold, or all (every case; e.g. an external dataset)."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Fold (default: the run's; unused with --split all)."),  # noqa: UP045
    out: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--out", "-o", help="Output folder (default: RUN/eval/<split>-fold<k>, or RUN/eval/all-<dataset>)."),
    mode: str = typer.Option("auto", "--mode",
                             help="personalized, diverse, both, or auto (the run's eval.modes the model has)."),
    samples: Optional[int] = typer.Option(  # noqa: UP045
        None, "--samples", "-k", help="K: samples per rater (personalized) or per case [run's eval.num_samples, 16]."),
    convention: Optional[str] = typer.Option(  # noqa: UP045
        None, "--convention", help="standard, reference or both [run's eval.conventions, standard]."),
    estimator: Optional[str] = typer.Option(  # noqa: UP045
        None, "--estimator", help="GED estimator: v (published code) or u [run's eval.estimator, v]."),
    seed: Optional[int] = typer.Option(  # noqa: UP045
        None, "--seed", help="Per-case sampling seed base: generator seeded from (seed, case_id) [0]."),
    figures: Optional[int] = typer.Option(None, "--figures", help="Figures for this many cases [4]."),  # noqa: UP045
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Slices per forward pass [32]."),  # noqa: UP045
    max_cases: int = typer.Option(0, "--max-cases", help="Evaluate only the first N cases (0 = all)."),
    case_stride: int = typer.Option(
        1, "--case-stride", help="Evaluate every N-th case (a systematic sample of all patients); before --max-cases."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    model_arg: Optional[list[str]] = typer.Option(  # noqa: UP045
        None, "--model-arg", help="KEY=VALUE: replace an inference-time model argument (ProSeg: diverse_mode, "
                                  "diverse_rater, z_temperature); repeatable."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Sample K predictions per case and score them; writes metrics.json, cases.csv and figures.

    Runs sharded across processes under ``torchrun --nproc-per-node=G --no-python proseg evaluate ...``;
    the numbers are identical on 1 or N processes.
    """
    from proseg.cli.errors import user_errors

    with user_errors():
        from proseg.commands.evaluate import evaluate_checkpoint, summary_table
        from proseg.engine.distributed import cleanup_distributed, env_dist_info
        from proseg.engine.evaluation import MODES
        from proseg.errors import CommandError
        from proseg.metrics import CONVENTIONS

        modes = None if mode == "auto" else (list(MODES) if mode == "both" else [mode])
        if modes is not None and any(m not in MODES for m in modes):
            raise CommandError(f"--mode must be {', '.join(MODES)}, both or auto, got {mode!r}")
        conventions = None if convention is None else (list(CONVENTIONS) if convention == "both" else [convention])
        model_args = parse_model_args(model_arg or [])
        report = evaluate_checkpoint(checkpoint, data, split=split, fold=fold, out=out, modes=modes,
                                     num_samples=samples, conventions=conventions, estimator=estimator, seed=seed,
                                     num_figures=figures, batch_size=batch_size, device=device, force=force,
                                     max_cases=max_cases, case_stride=case_stride, model_args=model_args)
        if env_dist_info().is_main:
            typer.echo(summary_table(report))
            typer.echo(f"{report['num_cases']} cases, K={report['num_samples']}; wrote {report['out']}/metrics.json")
        cleanup_distributed()
