"""``proseg version`` and ``proseg --version``."""

from __future__ import annotations

import typer


def version_line() -> str:
    """``proseg X.Y.Z (torch A.B, Python C.D.E)``."""
    import platform

    import torch

    import proseg

    return f"proseg {proseg.__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def version() -> None:
    """Print the proseg, torch and Python versions."""
    typer.echo(version_line())
