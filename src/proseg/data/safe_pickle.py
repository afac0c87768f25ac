"""A restricted unpickler for third-party data pickles (the LIDC pickles of the Prob. U-Net port and
MedicalMatting/D-Persona).

``pickle.load`` executes whatever callable a file names; a data pickle should only ever name numpy's array
reconstruction. ``SafeUnpickler.find_class`` admits exactly that (``numpy[._]core.multiarray._reconstruct``,
``numpy[._]core.numeric._frombuffer`` (protocol 5),
``numpy.ndarray``, ``numpy.dtype``, numpy scalar types and ``multiarray.scalar``), the builtin containers, and
``_codecs.encode`` (how protocol-2 pickles spell ``bytes``). Every other global (``os.system``,
``builtins.eval``, ``subprocess.Popen`` ...) is refused *before* it is called, with a ``DataError`` naming the
file and the refused global. Object-dtype arrays are refused after loading as well.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from proseg.data.types import DataError

__all__ = ["SafeUnpickler", "safe_load_pickle"]


def _multiarray() -> Any:
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


_MA = _multiarray()
_ALLOWED: dict[tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _MA._reconstruct
    _ALLOWED[(_mod, "scalar")] = _MA.scalar
try:  # protocol 5 pickles contiguous arrays as numeric._frombuffer(bytes, dtype, shape, order)
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype
class _RefusedSize(pickle.UnpicklingError):
    pass


def _sized_from_data(kind: type) -> Any:
    """``bytes``/``bytearray`` for REDUCE, except from a bare count: ``bytes(10**11)`` in a 40-byte pickle would
    allocate 100 GB (a denial of service). No data pickle needs it: bytes come as opcodes or ``_codecs.encode``."""

    def make(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], int):
            raise _RefusedSize(f"refused {kind.__name__}({args[0]}): a size given by the file instead of its data")
        return kind(*args, **kwargs)

    return make


for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (
        ("dict", dict), ("list", list), ("tuple", tuple), ("set", set), ("frozenset", frozenset),
        ("bytearray", _sized_from_data(bytearray)), ("bytes", _sized_from_data(bytes)), ("str", str),
        ("int", int), ("float", float), ("complex", complex), ("bool", bool),
    ):
        _ALLOWED[(_mod, _name)] = _obj
_ALLOWED[("collections", "OrderedDict")] = collections.OrderedDict
# protocol <= 2 pickles bytes as _codecs.encode(str, "latin1"): a pure str -> bytes conversion
_ALLOWED[("_codecs", "encode")] = __import__("_codecs").encode
# numpy 2 pickles dtypes through numpy.dtypes.<Name>DType classes in some protocols
for _name in dir(getattr(np, "dtypes", object())):
    _obj = getattr(np.dtypes, _name, None)
    if isinstance(_obj, type) and issubclass(_obj, np.dtype):
        _ALLOWED[("numpy.dtypes", _name)] = _obj


def _numpy_scalar_type(module: str, name: str) -> Any | None:
    if module != "numpy":
        return None
    obj = getattr(np, name, None)
    if isinstance(obj, type) and issubclass(obj, np.generic) and obj is not np.object_:
        return obj
    return None


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only numpy array reconstruction and builtin containers.

    Args:
        file: a binary file object.
        path: the file's name, used in error messages.
    """

    def __init__(self, file: Any, path: str | Path, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._path = str(path)

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            found = _numpy_scalar_type(module, name)
        if found is None:
            raise DataError(
                f"{self._path}: refused to unpickle global '{module}.{name}': only numpy arrays and builtin "
                "containers are allowed in a data pickle (the file may be malicious or not a dataset pickle)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._path}: refused persistent id {pid!r} in a data pickle")


def _reject_object_arrays(obj: Any, path: str, depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise DataError(f"{path}: refused object-dtype array in a data pickle")
    elif isinstance(obj, dict):
        for v in obj.values():
            _reject_object_arrays(v, path, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _reject_object_arrays(v, path, depth + 1)


def safe_load_pickle(path: str | Path) -> Any:
    """Load a data pickle through ``SafeUnpickler`` (latin1 for Python-2 pickles of numpy arrays).

    Raises:
        DataError: missing/unreadable/truncated file, a refused global, or an object-dtype array.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        with open(p, "rb") as f:
            obj = SafeUnpickler(f, p, encoding="latin1").load()
    except DataError:
        raise
    except _RefusedSize as exc:
        raise DataError(f"{p}: {exc} in a data pickle (the file may be malicious or not a dataset pickle)") from exc
    except Exception as exc:  # UnpicklingError, EOFError (truncated), ValueError ...
        raise DataError(f"{p}: unreadable or truncated pickle ({type(exc).__name__}: {exc})") from exc
    _reject_object_arrays(obj, str(p))
    return obj
