"""``proseg version``."""

from __future__ import annotations

import typer


def version() -> None:
    """Print the proseg, torch and Python versions."""
    import platform

    import torch

    import proseg

    typer.echo(f"proseg {proseg.__version__} (torch {torch.__version__}, Python {platform.python_version()})")
