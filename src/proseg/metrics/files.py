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

from proseg.errors import ScoreInputError

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
    """Load one case's stack ``(K, *S)`` from ``path``; ``role`` is ``"labels"`` or ``"preds"``."""
    path = Path(path)
    if not path.exists():
        raise ScoreInputError(f"{path}: no such file")
    if not path.is_file():
        raise ScoreInputError(f"{path}: not a file")
    name = path.name
    try:
        if name.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if len(keys) == 1:
                    arr = z[keys[0]]
                else:
                    hits = [k for k in _NPZ_KEYS[role] if k in keys]
                    if not hits:
                        raise ScoreInputError(
                            f"{path}: {len(keys)} arrays {keys} and none named {list(_NPZ_KEYS[role])}; "
                            f"store one array per file or name it {_NPZ_KEYS[role][0]!r}"
                        )
                    arr = z[hits[0]]
        elif name.endswith(".nii") or name.endswith(".nii.gz"):
            import nibabel as nib

            img = nib.load(str(path))
            arr = np.asarray(img.dataobj)
            if arr.ndim == 4:  # (X, Y, Z, K) -> (K, Z, X, Y)
                arr = np.transpose(arr, (3, 2, 0, 1))
            elif arr.ndim == 3:  # (X, Y, K) -> (K, X, Y)
                arr = np.moveaxis(arr, -1, 0)
            elif arr.ndim == 2:  # one 2D mask
                arr = arr[None]
            else:
                raise ScoreInputError(
                    f"{path}: NIfTI {role} must be (X, Y), (X, Y, K) or (X, Y, Z, K); got shape {arr.shape}"
                )
        else:
            raise ScoreInputError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    except ScoreInputError:
        raise
    except ValueError as err:  # e.g. a pickled object array
        raise ScoreInputError(f"{path}: cannot read {role}: {err}") from err
    except (OSError, EOFError) as err:
        raise ScoreInputError(f"{path}: cannot read {role}: {err}") from err
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ScoreInputError(f"{path}: {role} must be a numeric or boolean array; got dtype {arr.dtype}")
    return arr


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
