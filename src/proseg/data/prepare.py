"""``prepare``: convert any source into the canonical store (see ``proseg.data.store``).

Pipeline: list cases (cheap) -> optional patient filter -> load + validate + scale intensity + pad/resize +
rater order in a thread pool (PNG/NIfTI decoding releases the GIL) -> write the arrays, ``slices.csv``,
``volumes.json``, ``splits.json`` and ``manifest.json`` into a temporary sibling folder -> rename it to ``out``.
Any error removes the temporary folder, so an interrupted or failed prepare leaves nothing that looks complete.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proseg.data.preprocess import (
    INTENSITY_MODES,
    RATER_ORDERS,
    Geometry,
    order_raters,
    pad_resize,
    resolve_intensity,
    scale_intensity,
    validate_sample,
)
from proseg.data.readers import READERS
from proseg.data.readers.base import CaseRef
from proseg.data.splits import make_splits
from proseg.data.store import ARRAY_FILES, FORMAT_VERSION, sha256_file
from proseg.data.types import DataError
from proseg.fsutil import staged_dir

FORMATS = (*READERS, "synthetic")

__all__ = ["FORMATS", "PrepareResult", "prepare"]


@dataclass
class PrepareResult:
    out: Path
    rows: int
    cases: int
    patients: int
    volumes: int
    num_raters: int
    seconds: float


@dataclass
class _Processed:
    case_id: str
    patient_id: str
    image: np.ndarray  # (C, S, H, W): S slices (1 for 2D cases)
    masks: np.ndarray  # (R, S, H, W) bool
    present: np.ndarray  # (R,)
    perm: np.ndarray  # (R,)
    volume_id: str
    slice_indices: list[int]
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    geometry: Geometry
    intensity: str
    rater_names: list[str]
    extra: dict


def _process(case: CaseRef, size: int | None, intensity: str, rater_order: str) -> _Processed:
    s = case.load()
    validate_sample(s)
    mode = resolve_intensity(intensity, str(s.extra.get("source_dtype", s.image.dtype)))
    image, pad_value = scale_intensity(s.image, mode, s.source or s.case_id)
    image, masks, geom = pad_resize(image, s.masks, size, pad_value)
    masks, present, perm = order_raters(masks, s.rater_present, rater_order)
    if s.is_volume:
        n_sl = image.shape[1]
        volume_id, slices = s.case_id, list(range(n_sl))
    else:
        image, masks = image[:, None], masks[:, None]
        volume_id = str(s.extra.get("volume_id", s.case_id))
        slices = [int(s.extra.get("slice_index", 0))]
    return _Processed(
        case_id=s.case_id,
        patient_id=s.patient_id,
        image=image,
        masks=masks,
        present=present,
        perm=perm,
        volume_id=volume_id,
        slice_indices=slices,
        spacing=tuple(s.spacing),
        affine=s.affine,
        geometry=geom,
        intensity=mode,
        rater_names=list(s.rater_names),
        extra={k: v for k, v in s.extra.items() if k in ("series_uid", "nifti_shape", "source_dtype")},
    )


def _filter(cases: list[CaseRef], patterns: Sequence[str] | None) -> list[CaseRef]:
    if not patterns:
        return cases
    return [c for c in cases if any(fnmatch.fnmatchcase(c.patient_id, p) for p in patterns)]


def prepare(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    size: int | None = None,
    intensity: str = "auto",
    rater_order: str = "as-stored",
    num_folds: int = 4,
    val_fraction: float = 0.1,
    seed: int = 0,
    allow_missing_raters: bool = False,
    patients: Sequence[str] | None = None,
    force: bool = False,
    workers: int | None = None,
    reader_options: dict[str, Any] | None = None,
    synthetic_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Convert ``src`` (format ``fmt``) into a store at ``out``.

    Args:
        fmt: one of ``FORMATS``; for ``synthetic`` ``src`` is the integer seed and ``synthetic_options`` holds
            ``cases``, ``size``, ``num_raters`` ... (see ``proseg.data.synthetic.generate``).
        size: target side (pad to square, then resize); None keeps the source size, which must then agree.
        intensity: one of ``INTENSITY_MODES`` (``auto``: /255 for uint8 sources, per-case z-score otherwise).
        rater_order: ``as-stored`` or ``area-ranked``.
        patients: fnmatch patterns on patient ids; only matching patients are converted.
        workers: threads for loading (default ``min(8, 2 * cpu_count)``).
        progress: called as ``progress(done, total)`` after each case.
    Raises:
        DataError: bad input (nothing is left at ``out``), or ``out`` exists and ``force`` is False.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if intensity not in INTENSITY_MODES:
        raise DataError(f"--intensity must be one of {', '.join(INTENSITY_MODES)}, got {intensity!r}")
    if rater_order not in RATER_ORDERS:
        raise DataError(f"--rater-order must be one of {', '.join(RATER_ORDERS)}, got {rater_order!r}")
    if size is not None and size < 1:
        raise DataError(f"--size must be positive, got {size}")
    out = Path(out)
    if out.exists() and not force:
        raise DataError(f"{out}: already exists (use --force to replace it)")

    if fmt == "synthetic":
        from proseg.data.synthetic import list_cases as synthetic_cases

        try:
            syn_seed = int(str(src))
        except ValueError as exc:
            raise DataError(f"synthetic: SRC must be an integer seed, got {src!r}") from exc
        cases = synthetic_cases(seed=syn_seed, **(synthetic_options or {}))
        source_path = f"seed={syn_seed}"
    else:
        cases = READERS[fmt](src, allow_missing_raters=allow_missing_raters, **(reader_options or {}))
        source_path = str(Path(src).resolve())
    cases = _filter(cases, patients)
    if not cases:
        raise DataError(f"{src}: no cases match the patient filter {list(patients or [])}")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{src}: case id {dup!r} appears twice (e.g. both 2D slice files and a 3D file)")

    n_workers = workers or min(8, 2 * (os.cpu_count() or 1))
    processed: list[_Processed] = []
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = [pool.submit(_process, c, size, intensity, rater_order) for c in cases]
        try:
            for i, fut in enumerate(futures):
                processed.append(fut.result())
                if progress is not None:
                    progress(i + 1, len(futures))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    first = processed[0]
    modes = {p.intensity for p in processed}
    if len(modes) > 1:
        raise DataError(f"{src}: sources of different dtypes resolve to intensity modes {sorted(modes)}; "
                        "pass --intensity explicitly")
    hw = first.image.shape[-2:]
    channels = first.image.shape[0]
    for p in processed:
        if p.image.shape[-2:] != hw:
            raise DataError(f"{src}: case {p.case_id!r} is {p.image.shape[-2:]} but {first.case_id!r} is {hw}; "
                            "pass --size to pad and resize every case to one size")
        if p.image.shape[0] != channels:
            raise DataError(f"{src}: case {p.case_id!r} has {p.image.shape[0]} channels, "
                            f"{first.case_id!r} has {channels}")
        if rater_order == "as-stored" and p.rater_names != first.rater_names:
            raise DataError(f"{src}: case {p.case_id!r} has raters {p.rater_names}, "
                            f"{first.case_id!r} has {first.rater_names}")
    # group the rows of one volume together, in slice order (2D slice files of one volume arrive separately)
    vol_order: dict[str, int] = {}
    for p in processed:
        vol_order.setdefault(p.volume_id, len(vol_order))
    processed.sort(key=lambda p: (vol_order[p.volume_id], p.slice_indices[0]))
    seen_slices: dict[tuple[str, int], str] = {}
    for p in processed:
        for k in p.slice_indices:
            other = seen_slices.setdefault((p.volume_id, k), p.case_id)
            if other != p.case_id:
                raise DataError(f"{src}: cases {other!r} and {p.case_id!r} are both slice {k} of volume "
                                f"{p.volume_id!r}")
    pid_of_volume: dict[str, str] = {}
    for p in processed:
        if pid_of_volume.setdefault(p.volume_id, p.patient_id) != p.patient_id:
            raise DataError(f"{src}: volume {p.volume_id!r} spans patients {pid_of_volume[p.volume_id]!r} "
                            f"and {p.patient_id!r}")

    rater_names = first.rater_names if rater_order == "as-stored" else [
        f"rank-{i}" for i in range(len(first.rater_names))]
    splits = make_splits([p.patient_id for p in processed], num_folds, val_fraction, seed)

    with staged_dir(out) as tmp:
        n_rows = sum(p.image.shape[1] for p in processed)
        r = first.masks.shape[0]
        mm_img = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float32, (n_rows, channels, *hw))
        mm_msk = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n_rows, r, *hw))
        present = np.zeros((n_rows, r), bool)
        perm = np.zeros((n_rows, r), np.int16)
        records: list[tuple[int, str, str, str, int]] = []
        volumes: dict[str, dict[str, Any]] = {}
        row = 0
        for p in processed:
            s = p.image.shape[1]
            mm_img[row : row + s] = np.moveaxis(p.image, 1, 0)
            mm_msk[row : row + s] = np.moveaxis(p.masks, 1, 0)
            present[row : row + s] = p.present
            perm[row : row + s] = p.perm
            for j, k in enumerate(p.slice_indices):
                cid = p.case_id if s == 1 else f"{p.case_id}/slice-{k}"
                records.append((row + j, cid, p.patient_id, p.volume_id, k))
            v = volumes.setdefault(p.volume_id, {
                "case_id": p.case_id if s > 1 or p.volume_id == p.case_id else p.volume_id,
                "patient_id": p.patient_id,
                "num_slices": 0,
                "spacing": list(p.spacing),
                "affine": None if p.affine is None else np.asarray(p.affine).tolist(),
                "geometry": p.geometry.to_json(),
                **({"layout": "nifti: stored slice k = data[:, :, k] (x, y) -> (H, W)"}
                   if p.affine is not None and s > 1 else {}),
                **p.extra,
            })
            v["num_slices"] += s
            row += s
        mm_img.flush()
        mm_msk.flush()
        del mm_img, mm_msk
        np.save(tmp / "rater_present.npy", present)
        np.save(tmp / "rater_perm.npy", perm)
        with open(tmp / "slices.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "case_id", "patient_id", "volume_id", "slice_index"])
            w.writerows(records)
        _write_json(tmp / "volumes.json", volumes)
        _write_json(tmp / "splits.json", splits)
        files = {}
        for name in (*ARRAY_FILES, "slices.csv", "volumes.json", "splits.json"):
            fp = tmp / name
            files[name] = {"sha256": sha256_file(fp), "bytes": fp.stat().st_size}
        import proseg

        n_patients = len({p.patient_id for p in processed})
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_by": f"proseg {proseg.__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {
                "format": fmt,
                "path": source_path,
                "reader_options": reader_options or {},
                "synthetic_options": synthetic_options or {},
                "patient_filter": list(patients or []),
            },
            "counts": {
                "rows": n_rows,
                "cases": len(processed),
                "volumes": len(volumes),
                "patients": n_patients,
                "absent_annotations": int((~present).sum()),
            },
            "shapes": {"images": [n_rows, channels, *hw], "masks": [n_rows, r, *hw]},
            "num_channels": channels,
            "num_raters": r,
            "rater_names": rater_names,
            "source_rater_names": first.rater_names,
            "rater_order": rater_order,
            "allow_missing_raters": allow_missing_raters,
            "target_size": size,
            "resize": {"pad": "centred square, source value 0 (its scaled value)", "image": "bilinear",
                       "masks": "nearest"} if size is not None else None,
            "intensity": {"mode": first.intensity, "requested": intensity,
                          "description": _INTENSITY_DOC[first.intensity]},
            "splits": {"num_folds": num_folds, "val_fraction": val_fraction, "seed": seed, "unit": "patient"},
            "files": files,
        }
        _write_json(tmp / "manifest.json", manifest)
    return PrepareResult(out, n_rows, len(processed), n_patients, len(volumes), r, time.perf_counter() - t0)


_INTENSITY_DOC = {
    "unit8": "x / 255 (8-bit source to [0, 1])",
    "none": "stored as read (float32)",
    "minmax": "per case and channel: (x - min) / (max - min)",
    "zscore": "per case and channel: (x - mean) / std",
}


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
