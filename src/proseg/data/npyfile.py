"""Writing and checking the ``.npy`` arrays of a store without writable memory maps.

``prepare`` used to fill its arrays through ``np.lib.format.open_memmap``: on a full disk a store into a memory
map whose block cannot be allocated kills the process with SIGBUS (exit 135, no message, and the temporary
folder is left behind, still filling the disk). :class:`NpyWriter` writes the header, reserves the whole file
with ``posix_fallocate`` (so a full disk fails at once, before any data is written) and then appends rows with
ordinary writes, which report a full disk as ``OSError(ENOSPC)`` like any other write.

:func:`read_npy_header` is the cheap integrity check of an existing array: it parses the header only and
compares the file size with header + data size (a truncated copy is caught without reading the data).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from proseg.errors import DataError
from proseg.fsutil import reserve_space

__all__ = ["NpyHeader", "NpyWriter", "read_npy_header", "renamed_os_error"]


def renamed_os_error(exc: OSError, name: str | Path) -> OSError:
    """``exc`` as an OSError of the same errno (hence the same subclass) naming ``name``: the file the user
    knows, not the hidden temporary copy (a bare ``write`` error names no file at all)."""
    if exc.errno is None:
        return exc
    new = OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(name))
    new.__cause__ = exc
    return new


class NpyWriter:
    """Stream the rows of one ``.npy`` array of a known ``shape`` and ``dtype`` into ``path``.

    Rows are appended in order with :meth:`write`; :meth:`close` checks that exactly ``shape[0]`` rows came.
    Every ``OSError`` (a full disk included) is re-raised naming ``name`` (default ``path``).

    Example:
        >>> with NpyWriter(tmp / "images.npy", (n, c, h, w), np.float32) as w:
        ...     for block in blocks:
        ...         w.write(block)  # (k, c, h, w)
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: Any, name: str | Path | None = None) -> None:
        self.path = Path(path)
        self.name = str(name if name is not None else path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        try:
            self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise renamed_os_error(exc, self.name) from None
        try:
            try:
                np.lib.format.write_array_header_1_0(self._f, header)
            except ValueError:  # header over 64 KiB: only with absurdly many dimensions
                np.lib.format.write_array_header_2_0(self._f, header)
            self._f.flush()
            data_bytes = math.prod(self.shape) * self.dtype.itemsize
            reserve_space(self._f.fileno(), self._f.tell() + data_bytes)
        except OSError as exc:
            self._f.close()
            raise renamed_os_error(exc, self.name) from None
        except BaseException:
            self._f.close()
            raise

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (``(k, *shape[1:])``, cast to the array's dtype)."""
        if tuple(rows.shape[1:]) != self.shape[1:] or self.rows + rows.shape[0] > self.shape[0]:
            raise ValueError(f"{self.name}: rows of shape {rows.shape} do not fit a {self.shape} array "
                             f"after {self.rows} rows")  # a bug of the caller, not a user error
        block = np.ascontiguousarray(rows, dtype=self.dtype)
        try:
            self._f.write(memoryview(block).cast("B"))
        except OSError as exc:
            raise renamed_os_error(exc, self.name) from None
        self.rows += int(rows.shape[0])

    def close(self) -> None:
        """Flush and close; raises when fewer rows than ``shape[0]`` were written."""
        if self._f.closed:
            return
        try:
            self._f.close()  # a late write error (e.g. NFS reports ENOSPC on close) is raised here
        except OSError as exc:
            raise renamed_os_error(exc, self.name) from None
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.name}: {self.rows} rows written, {self.shape[0]} expected")

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says: ``shape``, ``dtype``, ``fortran_order``, the data ``offset`` (header
    length) and the file ``size`` in bytes."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int
    size: int

    @property
    def expected_size(self) -> int:
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(path: str | Path) -> NpyHeader:
    """Parse the header of the ``.npy`` file ``path`` (no data is read); ``DataError`` naming the file when it is
    missing or is not a ``.npy`` file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # read_magic returns whatever version bytes the file holds (damaged, or a future format)
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"{p}: missing (the store is incomplete; re-run proseg prepare)") from None
    except OSError as exc:
        raise DataError(f"{p}: unreadable ({exc.strerror or exc})") from exc
    except (ValueError, EOFError, SyntaxError) as exc:
        raise DataError(f"{p}: not a valid .npy file, its header is damaged ({exc}); re-run proseg prepare") from exc
    return NpyHeader(tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran), offset, size)
