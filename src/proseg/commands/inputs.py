"""The inputs of ``proseg predict``: which files a path names, and each one read into an :class:`InputCase`.

Inputs (by extension): NIfTI (``.nii``/``.nii.gz``; a 2D slice ``(X, Y)``/``(X, Y, 1)``, a volume ``(X, Y, Z)``, or
``(X, Y, Z, C)`` with channels last), PNG (``(H, W)`` or ``(H, W, C)``), an HDF5 case (``t1``/``t1c``/``t2`` as
3 channels as NPC-170 stores them, or a single ``image`` dataset ``(C, [D,] H, W)``), or a folder of them.
Axis conventions are the data layer's readers': NIfTI ``(X, Y)`` -> ``(H, W) = (X, Y)``, slices along z, after the
NIfTI data is reoriented to the closest canonical orientation (RAS+, as ``nibabel.as_closest_canonical``); the
writers put the maps back into the file's own orientation and affine.
The files are read by :mod:`proseg.data.io`; this module arranges their arrays as ``(C, D, H, W)`` and keeps
what :mod:`proseg.commands.outputs` needs to write the maps back in the same format and geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from proseg.data.io import (
    HDF5_SUFFIXES,
    NIFTI_SUFFIXES,
    check_finite,
    hdf5_keys,
    nifti_to_ras,
    read_hdf5,
    read_nifti,
    read_png,
)
from proseg.data.readers.npc import DEFAULT_CHANNELS
from proseg.errors import DataError

NIFTI_EXT = NIFTI_SUFFIXES
PNG_EXT = (".png",)  # of the 2D images proseg.data.io reads, predict takes PNGs (written back as PNGs)
HDF5_EXT = HDF5_SUFFIXES


def input_kind(path: Path) -> str | None:
    """``nifti``, ``png`` or ``hdf5`` by the file name's extension; None for anything else."""
    name = path.name.lower()
    if name.endswith(NIFTI_EXT):
        return "nifti"
    if name.endswith(PNG_EXT):
        return "png"
    if name.endswith(HDF5_EXT):
        return "hdf5"
    return None


def stem(path: Path) -> str:
    """The file name without its input extension (``scan.nii.gz`` -> ``scan``): the input's output sub-folder."""
    name = path.name
    for ext in (*NIFTI_EXT, *PNG_EXT, *HDF5_EXT):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


@dataclass
class InputCase:
    """A raw input: ``image`` ``(C, D, H, W)`` float32 (D = 1 for 2D) plus what is needed to write back."""

    path: Path
    kind: str
    image: np.ndarray
    source_dtype: str
    spatial_shape: tuple[int, ...]  # the input's own spatial shape (NIfTI: stored order; PNG: (H, W); HDF5: as stored)
    affine: np.ndarray | None = None
    header: Any = None
    is_volume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def list_inputs(path: Path) -> list[Path]:
    """``[path]`` for a file; a folder's input files in name order (each gets ``OUTPUT/<stem>/``)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such input file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and input_kind(p) is not None)
    if not files:
        raise DataError(f"{path}: the folder holds no .nii/.nii.gz, .png or .h5 inputs")
    seen: dict[str, Path] = {}
    for f in files:  # each input gets OUTPUT/<stem>/
        if stem(f) in seen:
            raise DataError(f"{path}: inputs {seen[stem(f)].name} and {f.name} would both write to {stem(f)}/; "
                            "rename one")
        seen[stem(f)] = f
    return files


def read_input(path: Path) -> InputCase:
    """Read one input file (``DataError`` naming the file for anything unreadable or malformed)."""
    kind = input_kind(path)
    if kind == "nifti":
        return _read_nifti_input(path)
    if kind == "png":
        return _read_png_input(path)
    if kind == "hdf5":
        return _read_hdf5_input(path)
    raise DataError(f"{path}: unsupported input (expected .nii/.nii.gz, .png, .h5/.hdf5 or a folder of them)")


def _read_nifti_input(path: Path) -> InputCase:
    vol = read_nifti(path)
    stored = np.asarray(vol.data)
    check_finite(stored, path)
    data, ras = _to_ras(stored, vol.affine, vol.zooms)
    shape = data.shape
    if data.ndim == 2 or (data.ndim == 3 and shape[2] == 1):
        img = data.reshape(shape[0], shape[1])[None, None]  # (1, 1, X, Y)
        is_vol = False
    elif data.ndim == 3:
        img = np.moveaxis(data, 2, 0)[None]  # (1, Z, X, Y)
        is_vol = True
    elif data.ndim == 4:
        img = np.moveaxis(data, (3, 2), (0, 1))  # (C, Z, X, Y)
        is_vol = shape[2] > 1
    else:
        raise DataError(f"{path}: NIfTI data of shape {shape} is not a 2D slice, a volume or a volume with "
                        "channels last")
    return InputCase(path, "nifti", img.astype(np.float32), str(data.dtype), tuple(stored.shape), vol.affine,
                     vol.header.copy(), is_vol, extra=ras)


def _to_ras(data: np.ndarray, affine: np.ndarray, zooms: tuple[float, ...]) -> tuple[np.ndarray, dict[str, Any]]:
    """``data`` reoriented to the closest canonical (RAS+) order (:func:`proseg.data.io.nifti_to_ras`, as
    ``proseg prepare`` reads its NIfTI sources), and what writing back needs: ``from_ras`` (the inverse
    orientation transform), ``ras_affine``, ``ras_zooms`` (x, y, z in mm) and ``orientation`` (the file's codes)."""
    out, ras = nifti_to_ras(data, affine, zooms)
    return out, {"from_ras": ras.from_ras, "ras_affine": ras.affine, "ras_zooms": ras.zooms,
                 "orientation": ras.orientation}


def _read_png_input(path: Path) -> InputCase:
    arr = read_png(path)
    if arr.dtype == np.bool_:  # 1-bit PNG
        arr = arr.astype(np.uint8) * 255
    img = arr[None, None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)[:, None]  # (C, 1, H, W)
    return InputCase(path, "png", img.astype(np.float32), str(arr.dtype), tuple(arr.shape[:2]))


def _read_hdf5_input(path: Path) -> InputCase:
    keys = hdf5_keys(path)
    if all(c in keys for c in DEFAULT_CHANNELS):
        data = read_hdf5(path, keys=list(DEFAULT_CHANNELS))
        chans = [np.asarray(data[c]) for c in DEFAULT_CHANNELS]
        shapes = {c.shape for c in chans}
        if len(shapes) != 1:
            raise DataError(f"{path}: channels {list(DEFAULT_CHANNELS)} differ in shape {sorted(shapes)}")
        img = np.stack(chans)
        names: list[str] = list(DEFAULT_CHANNELS)
    elif "image" in keys:
        img = np.asarray(read_hdf5(path, keys=["image"])["image"])
        names = ["image"]
    else:
        raise DataError(f"{path}: no image datasets (expected {', '.join(DEFAULT_CHANNELS)} or 'image'; the file "
                        f"has {sorted(keys)})")
    check_finite(img, path)
    if img.ndim == 3:
        img4 = img[:, None]
    elif img.ndim == 4:
        img4 = img
    else:
        raise DataError(f"{path}: image of shape {img.shape} is not (C, H, W) or (C, D, H, W)")
    return InputCase(path, "hdf5", img4.astype(np.float32), str(img.dtype), tuple(img.shape[1:]),
                     is_volume=img.ndim == 4, extra={"channels": names})
