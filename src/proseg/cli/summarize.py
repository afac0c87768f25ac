"""``proseg summarize EVAL...``: mean ± std over folds of per-fold evaluations (Markdown and JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def summarize(
    inputs: list[str] = typer.Argument(
        ..., metavar="EVAL",
        help="metrics.json files, evaluation folders, run folders (their eval/<split>-fold<k>) or glob patterns."),
    split: str = typer.Option("test", "--split", help="For run folders: which eval/<split>-fold<k> to read."),
    out: Optional[Path] = typer.Option(  # noqa: UP045 (typer needs Optional on py3.10)
        None, "--out", "-o", help="Write summary.md and summary.json here (default: print the Markdown)."),
) -> None:
    """Summarize a cross-validation: per metric, mode and convention the mean ± std (ddof=0) over the folds."""
    from proseg.cli.errors import user_errors

    with user_errors():
        from proseg.commands.summarize import summarize as run_summarize
        from proseg.commands.summarize import to_markdown, write_summary

        summary = run_summarize(inputs, split=split)
        if out is None:
            typer.echo(to_markdown(summary), nl=False)
        else:
            js, md = write_summary(summary, out)
            typer.echo(f"{summary['num_folds']} folds; wrote {md} and {js}")
