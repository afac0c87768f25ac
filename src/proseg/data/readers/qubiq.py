"""QUBIQ NIfTI tree: ``<task>/Training/caseXX/image.nii.gz`` and ``taskNN_segMM.nii.gz`` (any count of MM).

``src`` may be the task folder (holding ``Training/``) or the ``Training`` folder itself. A case folder may
hold several tasks (QUBIQ brain-tumor has ``task01``..``task03``): then ``task`` (e.g. ``"task01"``) must say
which; with one task it is found automatically. Rater ``segMM`` is the same person in every case.

Images and masks are read in the closest canonical orientation (RAS+, :func:`proseg.data.io.nifti_to_ras`, as
``proseg predict`` reads its inputs), then keep the NIfTI axis order: a 2D image ``(X, Y)`` (or ``(X, Y, 1)``)
becomes ``(1, X, Y)``; a 3D image ``(X, Y, Z)`` becomes the volume ``(1, Z, X, Y)`` (slices along z). The affine
and voxel sizes of the RAS+ image are kept; a source in another orientation records its codes in
``extra["orientation"]`` (e.g. ``"LPS"``). Masks are reoriented with their image's transform (same voxel grid).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from proseg.data.io import check_finite, nifti_ras_like, nifti_spatial, nifti_to_ras, read_nifti, to_binary_mask
from proseg.data.readers.base import CaseRef, natural_key, no_cases, require_dir
from proseg.data.types import DataError, Sample

_SEG = re.compile(r"^(task\d+)_(seg\d+)\.nii(\.gz)?$")
LAYOUT = "<task>/Training/caseXX/image.nii.gz with taskNN_segMM.nii.gz"


def _training_dir(src: Path) -> Path:
    if (src / "Training").is_dir():
        return src / "Training"
    return src


def list_cases(src: str | Path, allow_missing_raters: bool = False, task: str | None = None) -> list[CaseRef]:
    root = _training_dir(require_dir(src, LAYOUT))
    case_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                       key=lambda p: natural_key(p.name))
    segs_of: dict[Path, dict[str, Path]] = {}
    tasks: set[str] = set()
    for d in case_dirs:
        found: dict[str, dict[str, Path]] = {}
        for f in d.iterdir():
            m = _SEG.match(f.name)
            if m:
                found.setdefault(m.group(1), {})[m.group(2)] = f
        if not found and not any(d.glob("image.nii*")):
            continue  # not a case folder
        if not any(d.glob("image.nii*")):
            raise DataError(f"{d}: no image.nii.gz in the case folder (expected {LAYOUT})")
        tasks.update(found)
        if task is not None:
            segs_of[d] = found.get(task, {})
        elif len(found) == 1:
            segs_of[d] = next(iter(found.values()))
        elif not found:
            raise DataError(f"{d}: no taskNN_segMM.nii.gz masks next to image.nii.gz")
        else:
            raise DataError(f"{d}: holds several tasks {sorted(found)}; choose one with --task")
    if not segs_of:
        raise no_cases(root, LAYOUT)
    if task is None and len(tasks) > 1:
        raise DataError(f"{root}: cases hold different tasks {sorted(tasks)}; choose one with --task")
    for d, segs in segs_of.items():
        if not segs:
            raise DataError(f"{d}: no masks for {task}")
    names = sorted({n for s in segs_of.values() for n in s}, key=natural_key)
    if not allow_missing_raters:
        for d, segs in segs_of.items():
            if sorted(segs, key=natural_key) != names:
                raise DataError(
                    f"{d}: inconsistent rater count: has {sorted(segs, key=natural_key)} but other cases have "
                    f"{names} (use --allow-missing-raters to mark the missing ones as absent)"
                )
    return [CaseRef(d.name, d.name, _loader(d, segs, names)) for d, segs in segs_of.items()]


def _loader(d: Path, segs: dict[str, Path], names: list[str]):
    def load() -> Sample:
        img_path = next(iter(sorted(d.glob("image.nii*"))))
        vol = read_nifti(img_path)
        check_finite(vol.data, img_path)
        data, ras = nifti_to_ras(vol.data, vol.affine, vol.zooms)
        img = nifti_spatial(data, img_path)
        masks = np.zeros((len(names),) + img.shape, bool)
        present = np.zeros(len(names), bool)
        for name, path in segs.items():
            m = nifti_spatial(nifti_ras_like(read_nifti(path).data, ras), path)
            if m.shape != img.shape:
                raise DataError(f"{path}: image/mask shape mismatch: mask {m.shape} vs image {img.shape}")
            i = names.index(name)
            masks[i] = to_binary_mask(m, path)
            present[i] = True
        zooms = ras.zooms
        spacing = tuple(zooms[:2]) if img.ndim == 2 else (zooms[2], zooms[0], zooms[1])
        return Sample(
            image=img[None].astype(np.float32),
            masks=masks,
            rater_present=present,
            case_id=d.name,
            patient_id=d.name,
            rater_names=list(names),
            spacing=tuple(float(s) for s in spacing),
            affine=ras.affine,
            source=str(img_path),
            extra={"source_dtype": str(vol.data.dtype), "nifti_shape": list(vol.data.shape),
                   **({"orientation": ras.orientation} if ras.to_ras is not None else {})},
        )

    return load
