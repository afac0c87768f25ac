"""Safe low-level readers: PNG (and other 2D images), NIfTI, NPY/NPZ and HDF5 -- the one place proseg reads
an image, mask, label or prediction file into an array (the dataset readers, ``proseg predict`` and
``proseg score`` all come here).

Every failure (missing file, truncated or corrupt content, wrong type) is raised as ``DataError`` whose message
starts with the file, so no caller leaks a bare ``OSError``/``zlib.error`` to the user. Nothing here unpickles:
NPY/NPZ are read with ``allow_pickle=False`` (the restricted unpickler for the LIDC pickles lives in
``proseg.data.safe_pickle``).

Array conventions: PNG -> ``(H, W)`` or ``(H, W, C)`` (channels last, as stored); NIfTI -> the data array in
its stored axis order ``(X, Y[, Z[, ...]])`` plus the 4x4 affine, the voxel sizes and the header. How those
axes become a case's ``(C, [D,] H, W)`` is the caller's layout (each reader's and command's docs say).

Entry points:
    ``read_nifti(path) -> NiftiVolume(data, affine, zooms, header)``; ``nifti_spatial(data, path)`` (the readers'
    slice layout: ``(X, Y)`` 2D, ``(X, Y, Z)`` -> ``(Z, X, Y)``); ``nifti_to_ras(data, affine, zooms)`` (the
    closest canonical RAS+ voxel order, as ``nibabel.as_closest_canonical``: how ``prepare`` and ``predict`` read
    every NIfTI) and ``nifti_ras_like(data, ras)`` (another array of the same grid, e.g. a mask, reoriented alike);
    ``read_png(path, formats=None) -> array`` (any Pillow-readable 2D image);
    ``read_npy(path) -> array``; ``read_npz(path, key=None) -> array | {name: array}``;
    ``read_npz_array(path, prefer=()) -> array`` (the one array of an NPZ, or the first name in ``prefer``);
    ``npz_keys(path)``, ``hdf5_keys(path)`` (names, without reading data);
    ``read_hdf5(path, keys=None, optional=()) -> {name: array}``;
    ``read_array(path) -> (array, affine | None, zooms)`` by extension (NIfTI, image, NPY, NPZ);
    ``file_kind(path)`` (which of those an extension names), ``check_finite``, ``to_binary_mask``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proseg.data.types import DataError

__all__ = [
    "HDF5_SUFFIXES",
    "RasInfo",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "NiftiVolume",
    "check_finite",
    "file_kind",
    "hdf5_keys",
    "nifti_ras_like",
    "nifti_spatial",
    "nifti_to_ras",
    "npz_keys",
    "read_array",
    "read_hdf5",
    "read_nifti",
    "read_npy",
    "read_npz",
    "read_npz_array",
    "read_png",
    "to_binary_mask",
]

# File name endings, matched case-insensitively by :func:`file_kind`.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")  # read by Pillow
HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")
_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("nifti", NIFTI_SUFFIXES),
    ("image", IMAGE_SUFFIXES),
    ("npy", (".npy",)),
    ("npz", (".npz",)),
    ("hdf5", HDF5_SUFFIXES),
)


def file_kind(path: str | Path) -> str | None:
    """``"nifti"``, ``"image"``, ``"npy"``, ``"npz"`` or ``"hdf5"`` by the file name's ending (any case);
    None for anything else."""
    name = Path(path).name.lower()
    for kind, suffixes in _KINDS:
        if name.endswith(suffixes):
            return kind
    return None


def _fail(path: str | Path, problem: str, exc: BaseException | None = None) -> DataError:
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return DataError(f"{path}: {problem}{detail}")


def _require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise _fail(p, "file not found" if not p.exists() else "not a regular file")
    return p


def read_png(path: str | Path, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """Decode a PNG (or any Pillow-readable 2D image) fully.

    Returns:
        ``(H, W)`` for grayscale (modes ``L``, ``I;16``, ``I``, ``1``) or ``(H, W, C)`` channels-last for
        ``LA``/``RGB``/``RGBA``; palette images are converted to RGB. dtype as stored (uint8/uint16/int32/bool).
        ``formats`` restricts Pillow's format probing (e.g. ``("PNG",)``, faster for bulk reads).
    """
    from PIL import Image, UnidentifiedImageError

    p = str(path)
    try:
        with Image.open(p, formats=formats) as im:
            im.load()  # force the full decode now: truncated files fail here, not later
            if im.mode == "P":
                im = im.convert("RGB")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise _fail(p, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if not Path(p).is_file():
            raise _fail(p, "not a regular file") from None
        raise _fail(p, "unreadable or truncated image", exc) from exc
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise _fail(p, f"unexpected image shape {arr.shape}")
    return arr


@dataclass
class NiftiVolume:
    """A NIfTI image: ``data`` in stored axis order, ``affine`` ``(4, 4)`` float64, ``zooms`` voxel sizes, and
    ``header`` the file's nibabel header (e.g. to write results back with the same fields; copy it before
    changing it)."""

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, ...]
    header: Any


def read_nifti(path: str | Path) -> NiftiVolume:
    """Read a ``.nii`` / ``.nii.gz`` fully (no lazy proxy left open), keeping the affine, voxel sizes and header.

    The data keeps its stored dtype when the header has no scaling (slope 1, intercept 0), else float32/64.
    """
    import nibabel as nib

    p = _require_file(path)
    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError ...)
        raise _fail(p, "unreadable or truncated NIfTI file", exc) from exc
    if data.size == 0:
        raise _fail(p, f"empty NIfTI data array of shape {data.shape}")
    return NiftiVolume(data=data, affine=affine, zooms=zooms, header=img.header)


def nifti_spatial(data: np.ndarray, path: str | Path) -> np.ndarray:
    """The data layer's slice layout of a single-channel NIfTI array: ``(X, Y)`` (trailing size-1 axes dropped,
    e.g. ``(X, Y, 1)``) stays the 2D ``(H, W) = (X, Y)``; ``(X, Y, Z)`` becomes the volume ``(Z, X, Y)`` (slices
    along z). Anything else raises ``DataError`` naming ``path``."""
    a = data
    while a.ndim > 2 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return a
    if a.ndim == 3:
        return np.moveaxis(a, -1, 0)
    raise _fail(path, f"expected a 2D or 3D NIfTI image, got shape {data.shape}")


@dataclass
class RasInfo:
    """How :func:`nifti_to_ras` reoriented an array: ``orientation`` the file's axis codes (e.g. ``"LPS"``),
    ``to_ras`` / ``from_ras`` the nibabel orientation transforms (None when the data was RAS+ already or is kept as
    stored), ``affine`` and ``zooms`` (x, y[, z] in mm) of the RAS+ image."""

    orientation: str
    to_ras: np.ndarray | None
    from_ras: np.ndarray | None
    affine: np.ndarray
    zooms: tuple[float, ...]


def nifti_to_ras(data: np.ndarray, affine: np.ndarray, zooms: Sequence[float]) -> tuple[np.ndarray, RasInfo]:
    """``data`` with its three spatial axes reoriented to the closest canonical (RAS+) order
    (:mod:`nibabel.orientations`, as ``nibabel.as_closest_canonical``; axes past the third, e.g. channels, follow),
    and the :class:`RasInfo` (original axis codes, the transforms both ways, the RAS+ affine and voxel sizes).

    A 2D slice ``(X, Y)`` / ``(X, Y, 1)`` is reoriented only when its slice axis stays the third one (a sagittal
    or coronal single slice is kept as stored: reorienting it would move the slice axis in-plane). Data already in
    RAS+ is returned as it is (the same array)."""
    from nibabel import orientations as nio

    affine = np.asarray(affine, np.float64)
    spatial = data.shape[:3] if data.ndim >= 3 else data.shape + (1,) * (3 - data.ndim)
    arr = data.reshape(spatial + data.shape[3:]) if data.ndim < 3 else data
    ornt = nio.io_orientation(affine)
    code = "".join(nio.ornt2axcodes(ornt)) if not np.isnan(ornt).any() else "RAS"
    to_ras = nio.ornt_transform(ornt, nio.axcodes2ornt(("R", "A", "S")))
    z3 = (tuple(float(z) for z in zooms[:3]) + (1.0, 1.0, 1.0))[:3]
    identity = RasInfo(code, None, None, affine, z3[: max(2, data.ndim)])
    if (data.ndim < 3 or spatial[2] == 1) and int(to_ras[2, 0]) != 2:
        return data, identity
    if np.array_equal(to_ras, [[0, 1], [1, 1], [2, 1]]):
        return data, identity
    out = nio.apply_orientation(arr, to_ras)
    ras_zooms = [0.0, 0.0, 0.0]
    for i, (axis, _) in enumerate(to_ras):
        ras_zooms[int(axis)] = z3[i]
    if data.ndim < 3:
        out = out.reshape(out.shape[:2])
    info = RasInfo(code, to_ras, nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), ornt),
                   affine @ nio.inv_ornt_aff(to_ras, spatial), tuple(ras_zooms[: max(2, data.ndim)]))
    return np.ascontiguousarray(out), info


def nifti_ras_like(data: np.ndarray, ras: RasInfo) -> np.ndarray:
    """``data`` (an array on the same voxel grid as the image ``ras`` came from, e.g. a rater mask) reoriented by
    the same transform; unchanged when the image was not reoriented."""
    if ras.to_ras is None:
        return data
    from nibabel import orientations as nio

    arr = data.reshape(data.shape + (1,) * (3 - data.ndim)) if data.ndim < 3 else data
    out = nio.apply_orientation(arr, ras.to_ras)
    return np.ascontiguousarray(out.reshape(out.shape[:2]) if data.ndim < 3 else out)


def read_npy(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` array with ``allow_pickle=False`` (object arrays are refused)."""
    p = _require_file(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise _fail(p, "unreadable .npy file (object arrays are refused)", exc) from exc
    if not isinstance(arr, np.ndarray):
        raise _fail(p, "expected a .npy array")
    return arr


def read_npz(path: str | Path, key: str | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """Read a ``.npz`` with ``allow_pickle=False``: the array ``key``, or all arrays as a dict when None."""
    p = _require_file(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if key is not None:
                if key not in z.files:
                    raise _fail(p, f"no array {key!r} (has {sorted(z.files)})")
                return np.asarray(z[key])
            return {k: np.asarray(z[k]) for k in z.files}
    except DataError:
        raise
    except Exception as exc:
        raise _fail(p, "unreadable .npz file (object arrays are refused)", exc) from exc


def npz_keys(path: str | Path) -> list[str]:
    """The array names of a ``.npz``, in stored order, without reading the arrays (``DataError`` when unreadable)."""
    p = _require_file(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            return list(z.files)
    except Exception as exc:
        raise _fail(p, "unreadable .npz file", exc) from exc


def read_npz_array(path: str | Path, prefer: Sequence[str] = ()) -> np.ndarray:
    """The one array of a ``.npz``; when it holds several, the first of the names ``prefer`` that it has.

    Raises ``DataError`` listing the names when there is no such array.
    """
    keys = npz_keys(path)
    if len(keys) == 1:
        return read_npz(path, keys[0])  # type: ignore[return-value]
    hits = [k for k in prefer if k in keys]
    if hits:
        return read_npz(path, hits[0])  # type: ignore[return-value]
    if prefer:
        raise _fail(path, f"{len(keys)} arrays {sorted(keys)} and none named {list(prefer)}; store one array per "
                          f"file or name it {prefer[0]!r}")
    raise _fail(path, f"expected exactly one array in the .npz, found {sorted(keys)}")


def read_hdf5(path: str | Path, keys: Iterable[str] | None = None, optional: Iterable[str] = ()) -> dict[str, Any]:
    """Read datasets of an HDF5 file fully into numpy arrays.

    Args:
        keys: dataset names that must exist (None: every top-level dataset).
        optional: names read when present and skipped silently when absent.
    Returns:
        ``{name: array}``; a name from ``keys`` that is missing raises ``DataError`` listing what the file has.
    """
    import h5py

    p = _require_file(path)
    out: dict[str, Any] = {}
    try:
        with h5py.File(p, "r") as f:
            names = list(f.keys())
            wanted = names if keys is None else list(keys)
            for k in wanted:
                if k not in f:
                    raise _fail(p, f"missing dataset {k!r} (the file has {sorted(names)})")
                out[k] = _read_dataset(p, f[k], k)
            for k in optional:
                if k in f and k not in out:
                    out[k] = _read_dataset(p, f[k], k)
    except DataError:
        raise
    except Exception as exc:  # OSError for truncated/corrupt files, KeyError for broken links ...
        raise _fail(p, "unreadable or truncated HDF5 file", exc) from exc
    return out


def hdf5_keys(path: str | Path) -> list[str]:
    """Top-level names of an HDF5 file (``DataError`` when unreadable)."""
    import h5py

    p = _require_file(path)
    try:
        with h5py.File(p, "r") as f:
            return list(f.keys())
    except Exception as exc:
        raise _fail(p, "unreadable or truncated HDF5 file", exc) from exc


def _read_dataset(path: Path, node: Any, key: str) -> np.ndarray:
    import h5py

    if not isinstance(node, h5py.Dataset):
        raise _fail(path, f"{key!r} is a group, not a dataset")
    return np.asarray(node[()])


def read_array(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """Read an image/mask file by extension: NIfTI, PNG (or other Pillow formats), NPY or single-array NPZ.

    Returns:
        ``(array, affine or None, spacing)``: the array in the format's own layout (see module docstring).
    """
    p = Path(path)
    kind = file_kind(p)
    if kind == "nifti":
        vol = read_nifti(p)
        return vol.data, vol.affine, vol.zooms
    if kind == "npy":
        return read_npy(p), None, ()
    if kind == "npz":
        return read_npz_array(p), None, ()
    if kind == "image":
        return read_png(p), None, ()
    raise _fail(p, "unsupported file type (expected .nii/.nii.gz, .png/.tif/.bmp/.jpg, .npy or .npz)")


def check_finite(image: np.ndarray, path: str | Path) -> None:
    """Raise ``DataError`` when a floating image holds NaN or Inf (integer images are finite by type), or when
    it is not real numbers at all (strings, objects, complex: a float32 cast would drop the imaginary part)."""
    if np.issubdtype(image.dtype, np.complexfloating):
        raise _fail(path, f"image has a complex dtype {image.dtype} (expected real intensities)")
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
            raise _fail(path, f"image holds {bad} NaN/Inf value(s)")
    elif not (np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_):
        raise _fail(path, f"image has a non-numeric dtype {image.dtype}")


def to_binary_mask(mask: np.ndarray, path: str | Path) -> np.ndarray:
    """Validate a rater mask and return it as bool.

    Accepted encodings: bool; integers or floats whose values lie in {0, 1} or in {0, 255}. Anything else
    (soft masks, label maps with several classes, NaN) raises ``DataError`` naming the file and the values.
    """
    if mask.dtype == np.bool_:
        return mask
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise _fail(path, f"mask has a non-numeric dtype {mask.dtype}")
    if mask.size == 0:
        raise _fail(path, "empty mask")
    if mask.dtype == np.uint8:  # the common case (PNG masks): one counting pass
        counts = np.bincount(mask.reshape(-1), minlength=256)
        used = np.flatnonzero(counts)
        if used.size == 1 or (used.size == 2 and used[0] == 0 and used[1] in (1, 255)):
            if used.size == 1 and used[0] not in (0, 1, 255):
                raise _fail(path, f"mask is not binary: values {{{used[0]}}} (expected {{0, 1}} or {{0, 255}})")
            return mask != 0
        shown = ", ".join(str(v) for v in used[:8]) + (" ..." if used.size > 8 else "")
        raise _fail(path, f"mask is not binary: values {{{shown}}} (expected {{0, 1}} or {{0, 255}})")
    hi = mask.max()
    nz = mask != 0
    # {0,1} or {0,255}: every nonzero value equals the maximum, and the maximum is 1 or 255
    if (hi in (1, 255)) and bool(np.all(mask[nz] == hi)) and mask.min() >= 0:
        return nz
    if not nz.any():
        return nz
    values = np.unique(mask)
    shown = ", ".join(str(v) for v in values[:8]) + (" ..." if values.size > 8 else "")
    raise _fail(path, f"mask is not binary: values {{{shown}}} (expected {{0, 1}} or {{0, 255}})")
