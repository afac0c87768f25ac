"""proseg's own error types: the failures a user can act on. This module imports nothing from proseg, so every
layer (data, models, metrics, engine, CLI) can raise and catch them without an import cycle.

The CLI turns a :class:`ProsegError` (and file-system errors such as a missing file or a full disk) into one
``error: ...`` line and exit status 2; anything else is a bug and shows its traceback. Each type also derives from
the built-in exception a caller of the Python API would expect (``ValueError`` for bad input, ``RuntimeError`` for
numerical failures), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import errno

__all__ = [
    "CheckpointError",
    "CommandError",
    "ConfigError",
    "DataError",
    "NonFiniteError",
    "NonFiniteInputError",
    "NonFiniteLossError",
    "ProsegError",
    "ProsegWarning",
    "ScoreInputError",
    "disk_full_message",
    "is_disk_full",
]


class ProsegError(Exception):
    """Base of every failure a user can act on; its message names the file or key and what is wrong."""


class DataError(ProsegError, ValueError):
    """Bad input data or a damaged prepared store: the message names the file and what is wrong with it."""


class ConfigError(ProsegError, ValueError):
    """A bad configuration: the message names the dotted key (and the file when there is one)."""


class CommandError(ProsegError, ValueError):
    """A user-facing failure of a command (bad arguments, refused overwrite ...)."""


class CheckpointError(ProsegError, ValueError):
    """A checkpoint or training state that cannot be used (unreadable, truncated, non-finite, mismatched)."""


class ScoreInputError(ProsegError, ValueError):
    """A label / prediction file or folder that cannot be scored; the message names the file."""


class NonFiniteError(ProsegError, RuntimeError):
    """NaN/Inf where a finite number is needed (sampler parameters, weights after an optimizer step ...)."""


class NonFiniteInputError(NonFiniteError, ValueError):
    """NaN in an input that must be finite (e.g. predictions handed to the metrics)."""


class NonFiniteLossError(NonFiniteError):
    """Training stopped: non-finite losses, gradients or weights (the message says which step and what next)."""


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    """True for ``OSError(ENOSPC)`` / ``OSError(EDQUOT)`` (also when raised as the cause of another error)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_message(exc: BaseException, what: str = "") -> str:
    """One line for a full disk: which file, and that nothing half-written was kept."""
    e: BaseException | None = exc
    while e is not None and not (isinstance(e, OSError) and e.errno in _DISK_FULL):
        e = e.__cause__ or e.__context__
    name = getattr(e, "filename", None)
    where = f" writing {name}" if name else ""
    return f"no space left on the device{where}{': ' + what if what else ''}; free some space and run it again"


class ProsegWarning(UserWarning):
    """Something a user should know that does not stop the command (e.g. a dataset prepared differently from the
    checkpoint's training data). The CLI prints these as one ``warning: ...`` line each."""
