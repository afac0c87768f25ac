"""LIDC-IDRI Kaggle PNG export: ``LIDC-IDRI-XXXX/nodule-N/images/slice-K.png`` and
``LIDC-IDRI-XXXX/nodule-N/mask-{0..3}/slice-K.png``.

One case per slice: ``case_id = LIDC-IDRI-XXXX/nodule-N/slice-K``, ``patient_id = LIDC-IDRI-XXXX``. Each slice is
its own 2D case (``extra["volume_id"] = case_id``): the LIDC literature trains and scores these crops slice by
slice, and the crops of one nodule are not a contiguous, geometry-carrying volume. The nodule is kept in
``extra["nodule_id"]`` (``LIDC-IDRI-XXXX/nodule-N``) and the slice number in ``extra["slice_index"]``. Masks are
{0, 255} PNGs; rater names are the slot folders (``mask-0`` ...), which are annotation slots, not persons.

Errors: a slice whose mask file is missing in an existing ``mask-k`` folder, a mask file without an image,
a nodule with a different set of ``mask-k`` folders (unless ``allow_missing_raters``: then that slot is marked
absent), non-binary masks, unreadable PNGs, shape mismatches.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from proseg.data.io import read_png, to_binary_mask
from proseg.data.readers.base import CaseRef, natural_key, no_cases, require_dir
from proseg.data.types import DataError, Sample

_SLICE = re.compile(r"^slice-(\d+)\.png$")
_MASK_DIR = re.compile(r"^mask-(\d+)$")
LAYOUT = "LIDC-IDRI-XXXX/nodule-N/images/slice-K.png and LIDC-IDRI-XXXX/nodule-N/mask-k/slice-K.png"


def _scandir_names(path: Path) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.name for e in it]
    except OSError as exc:
        raise DataError(f"{path}: cannot list folder ({exc})") from exc


def list_cases(src: str | Path, allow_missing_raters: bool = False) -> list[CaseRef]:
    """List every slice of the tree (no pixels read). ``src`` is the folder holding ``LIDC-IDRI-*``."""
    root = require_dir(src, LAYOUT)
    patients = sorted(n for n in _scandir_names(root) if (root / n).is_dir() and not n.startswith("."))
    entries: list[tuple[str, str, Path, int, list[str]]] = []  # patient, nodule dir name, path, K, rater dirs
    all_raters: set[str] = set()
    per_nodule: list[tuple[Path, list[str]]] = []
    for pid in patients:
        pdir = root / pid
        for nod in sorted(_scandir_names(pdir), key=natural_key):
            ndir = pdir / nod
            if not ndir.is_dir():
                continue
            names = _scandir_names(ndir)
            if "images" not in names:
                raise DataError(f"{ndir}: no images/ folder (expected {LAYOUT})")
            raters = sorted((n for n in names if _MASK_DIR.match(n)), key=natural_key)
            if not raters:
                raise DataError(f"{ndir}: no mask-k/ folders next to images/ (expected {LAYOUT})")
            per_nodule.append((ndir, raters))
            all_raters.update(raters)
            slices = []
            for fname in _scandir_names(ndir / "images"):
                m = _SLICE.match(fname)
                if m is None:
                    raise DataError(f"{ndir / 'images' / fname}: unexpected file (expected slice-K.png)")
                slices.append(int(m.group(1)))
            slice_set = set(slices)
            for r in raters:
                have = set()
                for fname in _scandir_names(ndir / r):
                    m = _SLICE.match(fname)
                    if m is None or int(m.group(1)) not in slice_set:
                        raise DataError(f"{ndir / r / fname}: mask file without a matching images/ slice")
                    have.add(int(m.group(1)))
                if have != slice_set:
                    k = min(slice_set - have)
                    img = ndir / "images" / f"slice-{k}.png"
                    raise DataError(f"{ndir / r / f'slice-{k}.png'}: missing mask file for slice {img}")
            for k in sorted(slices):
                entries.append((pid, nod, ndir, k, raters))
    if not entries:
        raise no_cases(root, LAYOUT)
    rater_names = sorted(all_raters, key=natural_key)
    if not allow_missing_raters:
        for ndir, raters in per_nodule:
            if raters != rater_names:
                raise DataError(
                    f"{ndir}: inconsistent rater count: has {raters} but other cases have {rater_names} "
                    "(use --allow-missing-raters to mark the missing ones as absent)"
                )
    return [
        CaseRef(f"{pid}/{nod}/slice-{k}", pid, _loader(ndir, pid, nod, k, raters, rater_names))
        for pid, nod, ndir, k, raters in entries
    ]


def _loader(ndir: Path, pid: str, nod: str, k: int, raters: list[str], rater_names: list[str]):
    base = str(ndir)
    fname = f"slice-{k}.png"

    def load() -> Sample:
        img_path = os.path.join(base, "images", fname)
        img = read_png(img_path, formats=("PNG",))
        if img.ndim == 3:  # grayscale saved as RGB(A): accept only when the colour channels agree
            if img.shape[2] >= 3 and np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(
                img[..., 0], img[..., 2]
            ):
                img = img[..., 0]
            elif img.shape[2] == 2:
                img = img[..., 0]
            else:
                raise DataError(f"{img_path}: expected a grayscale CT slice, got {img.shape[2]} colour channels")
        masks = np.zeros((len(rater_names),) + img.shape, bool)
        present = np.zeros(len(rater_names), bool)
        for r in raters:
            mpath = os.path.join(base, r, fname)
            if not os.path.exists(mpath):
                raise DataError(f"{mpath}: missing mask file for slice {img_path}")
            m = read_png(mpath, formats=("PNG",))
            if m.ndim == 3:
                m = m[..., 0]
            if m.shape != img.shape:
                raise DataError(f"{mpath}: image/mask shape mismatch: mask {m.shape} vs image {img.shape}")
            i = rater_names.index(r)
            masks[i] = to_binary_mask(m, mpath)
            present[i] = True
        return Sample(
            image=img[None].astype(np.float32),
            masks=masks,
            rater_present=present,
            case_id=f"{pid}/{nod}/slice-{k}",
            patient_id=pid,
            rater_names=list(rater_names),
            spacing=(),
            affine=None,
            source=img_path,
            extra={"volume_id": f"{pid}/{nod}/slice-{k}", "nodule_id": f"{pid}/{nod}", "slice_index": k,
                   "source_dtype": str(img.dtype)},
        )

    return load
