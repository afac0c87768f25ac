"""NPC-170 / MMIS-2024 HDF5: one file per case with ``t1``, ``t1c``, ``t2`` (``D x H x W``, or ``H x W`` for the
2D single-slice files of ``training_2d/``), ``label_a1`` ... ``label_aR`` and ``voxel_spacing``.

``src`` is a folder searched recursively for ``*.h5``/``*.hdf5``. The three modalities are stacked as 3
channels (``channels`` changes which and in what order). Patient id from the file name: ``Sample_12.h5`` ->
``Sample_12`` (a 3D case, its own volume); ``Sample_12_slice_3.h5`` -> patient and volume ``Sample_12``,
slice index 3. Rater names are the label datasets (``label_a1`` ...), any count.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from proseg.data.io import check_finite, hdf5_keys, read_hdf5, to_binary_mask
from proseg.data.readers.base import CaseRef, natural_key, no_cases, require_dir
from proseg.data.types import DataError, Sample

DEFAULT_CHANNELS = ("t1", "t1c", "t2")
_LABEL = re.compile(r"^label_a(\d+)$")
_NAME = re.compile(r"^(?P<patient>.+?)(?:_slice_(?P<slice>\d+))?$")
LAYOUT = "one HDF5 file per case (*.h5) with datasets t1, t1c, t2, label_a1..label_aR, voxel_spacing"


def list_cases(
    src: str | Path, allow_missing_raters: bool = False, channels: tuple[str, ...] = DEFAULT_CHANNELS
) -> list[CaseRef]:
    root = require_dir(src, LAYOUT)
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".h5", ".hdf5")),
        key=lambda p: natural_key(str(p.relative_to(root))),
    )
    if not files:
        raise no_cases(root, LAYOUT)
    labels_of: dict[Path, list[str]] = {}
    for f in files:
        labels = sorted((k for k in hdf5_keys(f) if _LABEL.match(k)), key=natural_key)
        if not labels:
            raise DataError(f"{f}: no label_a1..label_aR datasets (expected {LAYOUT})")
        labels_of[f] = labels
    names = sorted({n for v in labels_of.values() for n in v}, key=natural_key)
    if not allow_missing_raters:
        for f, labels in labels_of.items():
            if labels != names:
                raise DataError(
                    f"{f}: inconsistent rater count: has {labels} but other cases have {names} "
                    "(use --allow-missing-raters to mark the missing ones as absent)"
                )
    cases = []
    for f in files:
        m = _NAME.match(f.stem)
        assert m is not None
        pid = m.group("patient")
        cases.append(CaseRef(f.stem, pid, _loader(f, pid, m.group("slice"), labels_of[f], names, channels)))
    return cases


def _loader(path: Path, pid: str, slice_idx: str | None, labels: list[str], names: list[str], channels):
    def load() -> Sample:
        data = read_hdf5(path, keys=list(channels) + labels, optional=["voxel_spacing"])
        chans = [np.asarray(data[c]) for c in channels]
        shape = chans[0].shape
        if len(shape) not in (2, 3):
            raise DataError(f"{path}: '{channels[0]}' must be D x H x W or H x W, got shape {shape}")
        for c, a in zip(channels, chans, strict=True):
            if a.shape != shape:
                raise DataError(f"{path}: channel '{c}' has shape {a.shape}, '{channels[0]}' has {shape}")
            check_finite(a, f"{path} [{c}]")
        image = np.stack(chans).astype(np.float32)
        masks = np.zeros((len(names),) + shape, bool)
        present = np.zeros(len(names), bool)
        for lab in labels:
            m = np.asarray(data[lab])
            if m.shape != shape:
                raise DataError(f"{path}: image/mask shape mismatch: '{lab}' {m.shape} vs image {shape}")
            i = names.index(lab)
            masks[i] = to_binary_mask(m, f"{path} [{lab}]")
            present[i] = True
        spacing: tuple[float, ...] = ()
        if "voxel_spacing" in data:
            try:
                sp = np.asarray(data["voxel_spacing"], dtype=np.float64).ravel()
            except (ValueError, TypeError) as exc:  # e.g. a string dataset
                raise DataError(f"{path}: voxel_spacing is not a list of numbers ({exc})") from exc
            if not np.isfinite(sp).all() or (sp <= 0).any():
                raise DataError(f"{path}: invalid voxel_spacing {sp.tolist()}")
            spacing = tuple(float(v) for v in sp)
        extra: dict = {"source_dtype": str(chans[0].dtype)}
        if slice_idx is not None or len(shape) == 2:
            extra.update(volume_id=pid, slice_index=int(slice_idx) if slice_idx is not None else 0)
        return Sample(
            image=image,
            masks=masks,
            rater_present=present,
            case_id=path.stem,
            patient_id=pid,
            rater_names=list(names),
            spacing=spacing,
            affine=None,
            source=str(path),
            extra=extra,
        )

    return load
