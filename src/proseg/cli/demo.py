"""``proseg demo``: the whole pipeline on the embedded synthetic source in a few minutes (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for data, runs, figures and report.md."),
    data: Optional[Path] = typer.Option(  # noqa: UP045 (typer needs Optional on py3.10)
        None, "--data", help="A prepared dataset to use instead of the synthetic source."),
    minutes: float = typer.Option(4.0, "--minutes", help="Training time of each model (they train side by side)."),
    force: bool = typer.Option(False, "--force", help="Use --out even if it holds something other than a demo."),
) -> None:
    """Prepare synthetic data, train a small ProSeg and a Prob. U-Net, evaluate both, write report.md."""
    from proseg.cli.errors import user_errors

    with user_errors():
        import time

        from proseg.commands.demo import format_seconds, run_demo

        t0 = time.time()
        report = run_demo(out, data, minutes=minutes, force=force)
        typer.echo(f"demo finished in {format_seconds(time.time() - t0)}; report: {report}")
