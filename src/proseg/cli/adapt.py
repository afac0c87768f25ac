"""``proseg adapt``: fit a new rater into a trained run from a handful of that rater's masks."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def adapt(
    run: Path = typer.Argument(..., help="A run directory (its best checkpoint) or a checkpoint directory."),
    data: Path = typer.Option(..., "--data", help="Prepared dataset holding the new rater's masks."),
    rater: str = typer.Option(..., "--rater", help="The new rater's name in the dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="New run directory (R + 1 raters)."),
    cases: Optional[int] = typer.Option(  # noqa: UP045 (typer needs Optional on py3.10)
        None, "--cases", help="N: fit on N training cases of the run's fold where the rater is present."),
    case_list: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--case-list", help="Fit on the case ids listed in this file (one a line) instead."),
    steps: int = typer.Option(200, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(1e-2, "--lr", help="Learning rate (Adam, no weight decay)."),
    init: str = typer.Option(
        "closest", "--init", help="closest (the model rater with the best Dice on the chosen cases), mean, prior, "
        "or a rater name of the model."),
    fold: Optional[int] = typer.Option(None, "--fold", help="Fold (default: the run's)."),  # noqa: UP045
    batch_size: Optional[int] = typer.Option(  # noqa: UP045
        None, "--batch-size", help="Slices per step [the run's train.batch_size, at most the chosen slices]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the case choice and of the fit."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run in --out."),
) -> None:
    """Add rater NAME to a trained model and fit only its parameters on a few of its masks.

    The existing raters' outputs stay bitwise the same; the new run folder (checkpoints/best + last) works with
    `proseg evaluate` / `proseg predict`. Score it on a store whose raters are the model's in its order (the new
    one last); see docs/adaptation.md.

    Example:
        proseg adapt runs/proseg-6 --data data/qubiq --rater rater7 --cases 5 --out runs/proseg-6+rater7
    """
    from proseg.cli.errors import user_errors

    with user_errors():
        from proseg.commands.adapt import adapt_run

        res = adapt_run(run, data, rater, out, cases=cases, case_list=case_list, steps=steps, lr=lr, init=init,
                        batch_size=batch_size, fold=fold, seed=seed, device=device, force=force,
                        command=shlex.join(["proseg", *sys.argv[1:]]))
        close = res["closest"]
        if close:
            typer.echo(f"closest existing rater on the chosen cases: {close['rater']} (Dice "
                       + ", ".join(f"{k} {v:.3f}" for k, v in close["dice"].items()) + ")")
        fit = res["fit"]
        best = fit["best_score"]
        typer.echo(f"rater {rater!r} is rater {res['rater_index']} of {len(res['rater_names'])} "
                   f"({', '.join(res['rater_names'])}); {len(res['cases'])} case(s), {fit['steps']} steps in "
                   f"{res['seconds']:.1f} s, best validation score "
                   f"{'n/a (no validation cases)' if best is None else f'{best:.4f}'}; wrote {res['run_dir']}")
