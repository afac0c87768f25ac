"""Reading label / prediction files for scoring (``proseg score``).

One case per file: ``.npy``, ``.npz`` or ``.nii`` / ``.nii.gz``.

- ``.npy``: the array ``(K, *S)`` (``K`` = raters for labels, samples for predictions). Pickled object
  arrays are refused.
- ``.npz``: a single array, or the one named ``labels`` / ``masks`` (for labels) or ``preds`` /
  ``predictions`` / ``probs`` / ``samples`` (for predictions).
- NIfTI (``proseg predict``'s layout: the masks on the last axis, ``(X, Y)`` = ``(H, W)``, ``Z`` = ``D``):
  a 4D image ``(X, Y, Z, K)`` is ``K`` volumes, read as ``(K, Z, X, Y)`` = ``(K, D, H, W)``; a 3D image
  ``(X, Y, K)`` is ``K`` 2D masks, read as ``(K, X, Y)``; a 2D image is one 2D mask. A single 3D mask must
  therefore be stored as ``(X, Y, Z, 1)``.

Two folders are matched by case name: the file name without its extension (``case_007.npy`` in LABELS
pairs with ``case_007.npz`` or ``case_007.nii.gz`` in PREDS). A case present on one side only is an error
(nothing is silently dropped).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from proseg.data.io import file_kind, read_nifti, read_npy, read_npz_array
from proseg.errors import DataError, ScoreInputError

SUFFIXES: tuple[str, ...] = (".nii.gz", ".npy", ".npz", ".nii")
_NPZ_KEYS = {
    "labels": ("labels", "masks", "label", "mask"),
    "preds": ("preds", "predictions", "probs", "probabilities", "samples", "pred"),
}


def case_name(path: Path) -> str | None:
    """File name without a supported extension, or ``None`` when the extension is not supported."""
    name = path.name
    for suf in SUFFIXES:
        if name.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return None


def load_array(path: str | Path, role: str) -> np.ndarray:
    """Load one case's stack ``(K, *S)`` from ``path``; ``role`` is ``"labels"`` or ``"preds"``.

    The file is read by :mod:`proseg.data.io`; its ``DataError`` becomes a ``ScoreInputError``
    ``"<file>: cannot read <role>: <what is wrong>"``.
    """
    path = Path(path)
    if case_name(path) is None:
        raise ScoreInputError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    try:
        kind = file_kind(path)
        if kind == "npy":
            arr = read_npy(path)
        elif kind == "npz":
            arr = read_npz_array(path, prefer=_NPZ_KEYS[role])
        else:
            arr = _nifti_stack(read_nifti(path).data, path, role)
    except DataError as err:
        problem = str(err).removeprefix(f"{path}: ")
        raise ScoreInputError(f"{path}: cannot read {role}: {problem}") from err
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ScoreInputError(f"{path}: {role} must be a numeric or boolean array; got dtype {arr.dtype}")
    return arr


def _nifti_stack(arr: np.ndarray, path: Path, role: str) -> np.ndarray:
    """``proseg predict``'s NIfTI layout (masks on the last axis) as the stack ``(K, *S)``: module docstring."""
    if arr.ndim == 4:  # (X, Y, Z, K) -> (K, Z, X, Y)
        return np.transpose(arr, (3, 2, 0, 1))
    if arr.ndim == 3:  # (X, Y, K) -> (K, X, Y)
        return np.moveaxis(arr, -1, 0)
    if arr.ndim == 2:  # one 2D mask
        return arr[None]
    raise ScoreInputError(f"{path}: NIfTI {role} must be (X, Y), (X, Y, K) or (X, Y, Z, K); got shape {arr.shape}")


def pair_folders(labels_dir: Path, preds_dir: Path) -> list[tuple[str, Path, Path]]:
    """``[(case, label_file, pred_file)]`` sorted by case name; errors on unmatched or duplicate cases."""

    def index(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            name = case_name(p)
            if name is None:
                continue
            if name in found:
                raise ScoreInputError(f"{folder}: case {name!r} appears twice ({found[name].name}, {p.name})")
            found[name] = p
        if not found:
            raise ScoreInputError(f"{folder}: no .npy/.npz/.nii/.nii.gz files")
        return found

    lab, prd = index(labels_dir), index(preds_dir)
    only_l = sorted(set(lab) - set(prd))
    only_p = sorted(set(prd) - set(lab))
    if only_l or only_p:
        parts = []
        if only_l:
            parts.append(
                f"{len(only_l)} case(s) have labels in {labels_dir} but no predictions in {preds_dir}: "
                f"{', '.join(only_l[:10])}{' ...' if len(only_l) > 10 else ''}"
            )
        if only_p:
            parts.append(
                f"{len(only_p)} case(s) have predictions in {preds_dir} but no labels in {labels_dir}: "
                f"{', '.join(only_p[:10])}{' ...' if len(only_p) > 10 else ''}"
            )
        raise ScoreInputError("; ".join(parts))
    return [(name, lab[name], prd[name]) for name in sorted(lab)]
