"""How the CLI commands report failures: a one-line ``error:`` message naming the file and the problem."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing failure of a command (bad input, refused overwrite ...)."""


def _expected() -> tuple[type[BaseException], ...]:
    from proseg.data.types import DataError
    from proseg.engine.config import ConfigError
    from proseg.engine.trainer import NonFiniteLossError
    from proseg.models.base import NotSupportedError

    return (CommandError, ConfigError, DataError, NonFiniteLossError, NotSupportedError, FileNotFoundError,
            FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError, ValueError, KeyError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the expected failures into ``error: <message>`` on stderr and exit status 2 (no traceback)."""
    import typer

    try:
        yield
    except _expected() as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


def run_guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with user_errors():
        return fn(*args, **kwargs)
