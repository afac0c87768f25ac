"""How the CLI commands report failures.

Expected failures (:class:`proseg.errors.ProsegError`, a model without the asked-for output, and file-system
errors: a missing file, a refused overwrite, a full disk) become one ``error: <message>`` line on stderr and exit
status 2 (1 for ``prepare`` / ``info``, as documented). Anything else is a bug: its traceback is shown, after a line
that says so. ``proseg --debug CMD`` (or ``PROSEG_DEBUG=1``) shows the traceback of expected failures too.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_USAGE = 2
DEBUG_ENV = "PROSEG_DEBUG"

# OSErrors whose message (with its file name) is the whole story for a user.
_OS_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                                          IsADirectoryError)


_debug = False


def set_debug(on: bool) -> None:
    """``proseg --debug``: set for each invocation by the root command (so it never outlives one)."""
    global _debug
    _debug = on


def debug_enabled() -> bool:
    return _debug or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def _message(exc: BaseException) -> str:
    from proseg.errors import ProsegError, disk_full_message, is_disk_full

    if isinstance(exc, ProsegError):  # its own message already says what happened (a full disk included)
        return str(exc)
    if is_disk_full(exc):
        return disk_full_message(exc)
    if isinstance(exc, OSError) and not isinstance(exc, _OS_ERRORS):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc):
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """proseg's own warnings as one ``warning: ...`` line; others in Python's usual format."""
    from proseg.errors import ProsegWarning

    if issubclass(category, ProsegWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


@contextmanager
def user_errors(exit_code: int = EXIT_USAGE) -> Iterator[None]:
    """Turn the expected failures into ``error: <message>`` on stderr and ``exit_code`` (no traceback)."""
    import typer

    from proseg.errors import ProsegError, is_disk_full
    from proseg.models.base import NotSupportedError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            yield
    except (ProsegError, NotSupportedError, *_OS_ERRORS) as exc:
        if debug_enabled():
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        raise typer.Exit(exit_code) from None
    except OSError as exc:
        if not is_disk_full(exc) or debug_enabled():
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        raise typer.Exit(exit_code) from None
    except Exception as exc:
        if is_disk_full(exc) and not debug_enabled():  # e.g. a library wrapped ENOSPC in its own error type
            print(f"error: {_message(exc)}", file=sys.stderr)
            raise typer.Exit(exit_code) from None
        print("proseg: unexpected internal error (a bug; please report it with the traceback below)",
              file=sys.stderr)
        raise
