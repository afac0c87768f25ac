"""All-or-nothing file system writes shared by the data layer, the models and the engine."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, rename (all-or-nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Build the folder ``out`` all-or-nothing: yields a fresh hidden work folder ``.out.tmp-XXXX`` beside it,
    which is swapped in for ``out`` (:func:`swap_in_dir`) when the block succeeds and removed when it raises.

    The work folder is 0755: ``mkdtemp`` creates 0700, and the folder is renamed into place, so without this a
    prepared dataset or an evaluation would be unreadable by the rest of a team sharing it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        swap_in_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` (``--force``) is replaced only after the
    new folder is in place, so a failure never leaves ``out`` half-written."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def reserve_space(fd: int, size: int) -> None:
    """Allocate the first ``size`` bytes of the open file ``fd`` now (``posix_fallocate``), so that a full disk
    raises ``OSError(ENOSPC)`` here, before anything is written, instead of after minutes of work.

    File systems without allocation support (``EOPNOTSUPP``/``EINVAL``/``ENOSYS``, and platforms without
    ``posix_fallocate``) are skipped: the caller then writes with ordinary writes, which report ENOSPC themselves.
    Never use a writable memory map in its place: on a full disk a store into one dies with SIGBUS.
    """
    import errno

    fallocate = getattr(os, "posix_fallocate", None)
    if size <= 0 or fallocate is None:
        return
    unsupported = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in unsupported:
            raise
