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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_TAG}", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        swap_in_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` (``--force``) is replaced only after the
    new folder is in place, so a failure never leaves ``out`` half-written.

    Replacing takes two renames (``out`` -> ``.out.old-XXXX/x``, then ``tmp`` -> ``out``). Should the second one
    fail, the old folder is moved back. A crash (power loss, SIGKILL) between the two leaves no ``out`` but the
    complete old folder in ``.out.old-XXXX/x``: :func:`displaced_dir` finds it and :func:`recover_dir` puts it
    back, so at every instant one complete folder exists.
    """
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{_OLD_TAG}", dir=out.parent))
        os.replace(out, old / _OLD_LEAF)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / _OLD_LEAF, out)  # the old folder back: a failed swap changes nothing
            shutil.rmtree(old, ignore_errors=True)
            raise
        _fsync_dir(out.parent)  # the new name is durable before the old copy goes
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
        _fsync_dir(out.parent)


_OLD_TAG = ".old-"  # swap_in_dir's hidden copy of the replaced folder: .NAME.old-XXXX/x
_OLD_LEAF = "x"
_TMP_TAG = ".tmp-"  # staged_dir's work folder: .NAME.tmp-XXXX


def is_displaced(path: Path) -> bool:
    """Whether ``path`` is the hidden copy ``.NAME.old-XXXX/x`` that :func:`swap_in_dir` keeps of a replaced folder."""
    return path.name == _OLD_LEAF and _OLD_TAG in path.parent.name and path.parent.name.startswith(".")


def displaced_dir(out: Path) -> Path | None:
    """The complete previous ``out`` that a :func:`swap_in_dir` interrupted between its two renames left in
    ``.out.old-XXXX/x`` (the newest when there are several), or None. Only meaningful while ``out`` is missing."""
    if not out.parent.is_dir():
        return None
    cands = [d / _OLD_LEAF for d in out.parent.glob(f".{out.name}{_OLD_TAG}*") if (d / _OLD_LEAF).is_dir()]
    return max(cands, key=lambda d: d.stat().st_mtime_ns) if cands else None


def recover_dir(out: Path) -> bool:
    """Undo what a crash in :func:`staged_dir` / :func:`swap_in_dir` left beside ``out``: a missing ``out`` whose
    previous copy survived in ``.out.old-XXXX/x`` is renamed back, and stale work folders (``.out.tmp-XXXX``,
    ``.out.old-XXXX``) are removed. Returns True when ``out`` was put back. Call it only when no other process
    is writing ``out``."""
    restored = False
    if not out.exists():
        old = displaced_dir(out)
        if old is not None:
            os.replace(old, out)
            _fsync_dir(out.parent)
            restored = True
    if out.parent.is_dir():
        for stale in [*out.parent.glob(f".{out.name}{_OLD_TAG}*"), *out.parent.glob(f".{out.name}{_TMP_TAG}*")]:
            shutil.rmtree(stale, ignore_errors=True)
    return restored


def empty_dir(directory: Path, first: tuple[str, ...] = ()) -> None:
    """Delete everything inside ``directory`` (the folder itself stays, with its permissions). The entries named
    in ``first`` go first: e.g. what marks a run resumable, so an interrupted delete never leaves a half run that
    still looks complete."""
    for name in first:
        p = directory / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for p in sorted(directory.iterdir()):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


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


def check_writable(path: Path) -> None:
    """Refuse early, before any work, an output ``path`` that cannot be created: its nearest existing ancestor must
    be a writable folder. Raises NotADirectoryError / PermissionError naming ``path`` and the blocking ancestor."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{path}: cannot write here ({probe} is a file)")
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"{path}: cannot write here ({probe} is not writable)")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks (flat memory for any size)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
