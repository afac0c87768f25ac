"""Generic folder: images and per-rater masks matched by patterns with ``{case}`` and ``{rater}`` fields.

Patterns are paths relative to ``src`` in which ``*`` matches within one path component and ``{case}`` /
``{rater}`` capture a component part. Defaults: ``{case}/image.*`` and ``{case}/mask_{rater}.*``; other layouts,
e.g. ``images/{case}.png`` with ``masks/{rater}/{case}.png``. Files: NIfTI, PNG (and other Pillow formats),
NPY or single-array NPZ.

Layouts: PNG ``(H,W)`` or ``(H,W,C)`` -> ``(C,H,W)``; NIfTI as in the QUBIQ reader (read in RAS+, then ``(X,Y)``
2D, ``(X,Y,Z)`` a volume with slices along z; a non-RAS source records ``extra["orientation"]``; NIfTI masks are
reoriented with their image's transform); NPY/NPZ ``(H,W)``, ``(C,H,W)``; with ``ndim=3``: ``(D,H,W)`` or ``(C,D,H,W)``.
Masks have the image's spatial shape. Patient id: ``patient_regex`` applied to the case id (its ``patient``
group or group 1), else the case id itself. Rater names: the ``{rater}`` values, naturally sorted.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from proseg.data.io import (
    RasInfo,
    check_finite,
    file_kind,
    nifti_ras_like,
    nifti_spatial,
    nifti_to_ras,
    read_array,
    to_binary_mask,
)
from proseg.data.readers.base import CaseRef, natural_key, no_cases, require_dir
from proseg.data.types import DataError, Sample

DEFAULT_IMAGE_PATTERN = "{case}/image.*"
DEFAULT_MASK_PATTERN = "{case}/mask_{rater}.*"


def _compile(pattern: str, fields: tuple[str, ...]) -> tuple[str, re.Pattern[str]]:
    for f in fields:
        if pattern.count("{" + f + "}") != 1:
            raise DataError(f"pattern {pattern!r} must contain {{{f}}} exactly once")
    glob = pattern
    rx = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("{case}", i) or pattern.startswith("{rater}", i):
            name = "case" if pattern.startswith("{case}", i) else "rater"
            rx += f"(?P<{name}>[^/]+?)"
            i += len(name) + 2
        elif pattern[i] == "*":
            rx += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            rx += "[^/]"
            i += 1
        else:
            rx += re.escape(pattern[i])
            i += 1
    glob = glob.replace("{case}", "*").replace("{rater}", "*")
    return glob, re.compile("^" + rx + "$")


def list_cases(
    src: str | Path,
    allow_missing_raters: bool = False,
    image_pattern: str = DEFAULT_IMAGE_PATTERN,
    mask_pattern: str = DEFAULT_MASK_PATTERN,
    patient_regex: str | None = None,
    ndim: int = 2,
) -> list[CaseRef]:
    root = require_dir(src, f"images matching {image_pattern!r} and masks matching {mask_pattern!r}")
    img_glob, img_rx = _compile(image_pattern, ("case",))
    msk_glob, msk_rx = _compile(mask_pattern, ("case", "rater"))
    images: dict[str, Path] = {}
    for p in root.glob(img_glob):
        m = img_rx.match(p.relative_to(root).as_posix())
        if m is None or not p.is_file():
            continue
        case = m.group("case")
        if case in images:
            raise DataError(f"{p}: case {case!r} matches two images ({images[case].name} and {p.name})")
        images[case] = p
    masks: dict[str, dict[str, Path]] = {}
    for p in root.glob(msk_glob):
        rel = p.relative_to(root).as_posix()
        m = msk_rx.match(rel)
        if m is None or not p.is_file() or p in images.values():
            continue
        case, rater = m.group("case"), m.group("rater")
        if case not in images:
            raise DataError(f"{p}: mask for case {case!r} which has no image matching {image_pattern!r}")
        if rater in masks.setdefault(case, {}):
            raise DataError(f"{p}: rater {rater!r} of case {case!r} matches two files")
        masks[case][rater] = p
    if not images:
        raise no_cases(root, f"images matching {image_pattern!r}")
    for case, p in images.items():
        if not masks.get(case):
            raise DataError(f"{p}: missing mask files for this image (no file matches {mask_pattern!r})")
    names = sorted({r for v in masks.values() for r in v}, key=natural_key)
    if not allow_missing_raters:
        for case, v in masks.items():
            have = sorted(v, key=natural_key)
            if have != names:
                raise DataError(
                    f"{images[case]}: inconsistent rater count: has raters {have} but other cases have {names} "
                    "(use --allow-missing-raters to mark the missing ones as absent)"
                )
    prx = re.compile(patient_regex) if patient_regex else None
    cases = []
    for case in sorted(images, key=natural_key):
        pid = case
        if prx is not None:
            m = prx.search(case)
            if m is None:
                raise DataError(f"{images[case]}: patient regex {patient_regex!r} does not match case {case!r}")
            pid = m.group("patient") if "patient" in prx.groupindex else (m.group(1) if prx.groups else m.group(0))
        cases.append(CaseRef(case, pid, _loader(case, pid, images[case], masks[case], names, ndim)))
    return cases


def _to_image(arr: np.ndarray, path: Path, ndim: int) -> np.ndarray:
    """Return ``(C, *spatial)`` for the file's layout (see module docstring)."""
    kind = file_kind(path)
    if kind == "nifti":
        a = arr
        if a.ndim == 4 and a.shape[2] > 1:  # (X, Y, Z, C) multi-channel NIfTI
            return np.moveaxis(np.moveaxis(a, -1, 0), -1, 1)
        return nifti_spatial(a, path)[None]
    if kind in ("npy", "npz"):
        if arr.ndim == ndim:
            return arr[None]
        if arr.ndim == ndim + 1:
            return arr
        raise DataError(f"{path}: expected a {ndim}D array (optionally channels first), got shape {arr.shape}")
    if arr.ndim == 2:
        return arr[None]
    return np.moveaxis(arr, -1, 0)


def _to_mask(arr: np.ndarray, path: Path, ras: RasInfo | None) -> np.ndarray:
    kind = file_kind(path)
    if kind == "nifti":
        return nifti_spatial(arr if ras is None else nifti_ras_like(arr, ras), path)
    if arr.ndim == 3 and kind == "image":
        return arr[..., 0]
    return arr


def _loader(case: str, pid: str, img_path: Path, mask_paths: dict[str, Path], names: list[str], ndim: int):
    def load() -> Sample:
        arr, affine, zooms = read_array(img_path)
        check_finite(arr, img_path)
        source_dtype = str(arr.dtype)
        ras = None
        if affine is not None and file_kind(img_path) == "nifti":
            arr, ras = nifti_to_ras(arr, affine, zooms)
            affine, zooms = ras.affine, ras.zooms
        image = _to_image(arr, img_path, ndim)
        spatial = image.shape[1:]
        masks = np.zeros((len(names),) + spatial, bool)
        present = np.zeros(len(names), bool)
        for rater, mp in mask_paths.items():
            m = _to_mask(read_array(mp)[0], mp, ras)
            if m.shape != spatial:
                raise DataError(f"{mp}: image/mask shape mismatch: mask {m.shape} vs image {spatial}")
            i = names.index(rater)
            masks[i] = to_binary_mask(m, mp)
            present[i] = True
        spacing: tuple[float, ...] = ()
        if zooms and file_kind(img_path) == "nifti":
            z = zooms[:3]
            spacing = tuple(z[:2]) if len(spatial) == 2 else (z[2], z[0], z[1])
        return Sample(
            image=image.astype(np.float32),
            masks=masks,
            rater_present=present,
            case_id=case,
            patient_id=pid,
            rater_names=list(names),
            spacing=tuple(float(s) for s in spacing),
            affine=affine,
            source=str(img_path),
            extra={"source_dtype": source_dtype,
                   **({"orientation": ras.orientation} if ras is not None and ras.to_ras is not None else {})},
        )

    return load
