"""``prepare``: convert any source into the canonical store (see ``proseg.data.store``).

Pipeline: list cases (cheap) -> optional patient filter -> load + validate + scale intensity + pad/resize +
rater order in a thread pool (PNG/NIfTI decoding releases the GIL) -> write the arrays, ``slices.csv``,
``volumes.json``, ``splits.json`` and ``manifest.json`` into a temporary sibling folder -> rename it to ``out``.
Any error removes the temporary folder, so an interrupted or failed prepare leaves nothing that looks complete.

The arrays are written with ordinary writes after reserving their whole size (``proseg.data.npyfile``), never
through a writable memory map: a full disk is an ``OSError(ENOSPC)`` naming the file (one ``error:`` line in the
CLI), not a SIGBUS. ``force`` replaces only a store (a folder whose ``manifest.json`` parses as a proseg
manifest, holding nothing but the store's files) or an empty folder; anything else is refused and left alone.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import proseg
from proseg.data.npyfile import NpyWriter, renamed_os_error
from proseg.data.preprocess import (
    INTENSITY_MODES,
    RATER_ORDERS,
    Geometry,
    Intensity,
    canonical_intensity,
    intensity_from_options,
    order_raters,
    pad_resize,
    scale_intensity,
    validate_sample,
)
from proseg.data.readers import READERS
from proseg.data.readers.base import CaseRef
from proseg.data.splits import make_splits, read_splits_file
from proseg.data.store import ARRAY_FILES, FORMAT_VERSION, META_FILES, is_store
from proseg.data.synthetic import list_cases as synthetic_cases
from proseg.data.types import DataError
from proseg.errors import CommandError, ProsegWarning
from proseg.fsutil import sha256_file, staged_dir

FORMATS = (*READERS, "synthetic")
STORE_FILES = (*ARRAY_FILES, *META_FILES)  # every file of a store but manifest.json (which lists their sha256)

__all__ = ["FORMATS", "SPACING_RTOL", "PrepareResult", "check_replaceable", "prepare", "recorded_spacing"]

SPACING_RTOL = 1e-3  # volumes whose voxel sizes agree within this relative tolerance share one spacing


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


def _process(case: CaseRef, size: int | None, intensity: Intensity, rater_order: str) -> _Processed:
    s = case.load()
    validate_sample(s)
    spec = intensity.resolve(str(s.extra.get("source_dtype", s.image.dtype)))
    image, pad_value = scale_intensity(s.image, spec, s.source or s.case_id)
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
        intensity=spec.mode,
        rater_names=list(s.rater_names),
        extra={k: v for k, v in s.extra.items() if k in ("series_uid", "nifti_shape", "source_dtype", "orientation")},
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
    window: str | Sequence[float] | None = None,
    percentiles: str | Sequence[float] | None = None,
    rater_order: str = "as-stored",
    num_folds: int = 4,
    val_fraction: float = 0.1,
    seed: int = 0,
    allow_missing_raters: bool = False,
    patients: Sequence[str] | None = None,
    splits: str | Path | None = None,
    allow_unlisted: bool = False,
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
        intensity: one of ``INTENSITY_MODES`` (``auto``: /255 for uint8 sources, per-case z-score otherwise); the
            old spelling ``unit8`` of ``uint8`` is accepted with a ``ProsegWarning``.
        window: ``"lo,hi"`` or ``(lo, hi)``: ``intensity="window"`` (implied), clip to [lo, hi] in source units
            (e.g. Hounsfield units) and map to [0, 1]; recorded in the manifest.
        percentiles: ``"p_lo,p_hi"``: ``intensity="percentile"`` (implied; default 0.5, 99.5).
        rater_order: ``as-stored`` or ``area-ranked``.
        patients: fnmatch patterns on patient ids; only matching patients are converted.
        splits: a split file (``proseg.data.splits.read_splits_file``) used instead of the random folds
            (``num_folds`` is then the file's); checked against the (filtered) patients before any case is loaded.
        allow_unlisted: with ``splits``, patients in no part of a fold are allowed (else a ``DataError``).
        force: replace an existing ``out``, but only a store written by ``prepare`` or an empty folder.
        workers: threads for loading (default ``min(8, 2 * cpu_count)``).
        progress: called as ``progress(done, total)`` after each case.
    Raises:
        DataError: bad input (nothing is left at ``out``).
        CommandError: ``out`` exists and ``force`` is False, or ``out`` is not something ``force`` replaces.
        OSError: e.g. a full disk (``ENOSPC``, naming the file); the temporary folder is removed and an existing
            ``out`` is left as it was.
    """
    t0 = time.perf_counter()
    intensity = _current_intensity(intensity)
    _check_options(fmt, intensity, rater_order, size)
    spec = intensity_from_options(intensity, window, percentiles)
    intensity = spec.mode if spec.mode != "auto" else intensity
    out = Path(out)
    check_replaceable(out, force)
    cases, source_path = _list_cases(fmt, src, allow_missing_raters, reader_options, synthetic_options)
    cases = _filter(cases, patterns=patients)
    if not cases:
        raise DataError(f"{src}: no cases match the patient filter {list(patients or [])}")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{src}: case id {dup!r} appears twice (e.g. both 2D slice files and a 3D file)")
    given = None if splits is None else read_splits_file(
        splits, [c.patient_id for c in cases], val_fraction=val_fraction, seed=seed, allow_unlisted=allow_unlisted)
    processed = _load_all(cases, size, spec, rater_order, workers, progress)
    _check_consistent(processed, src, rater_order)
    processed = _in_store_order(processed, src)
    first = processed[0]
    rater_names = first.rater_names if rater_order == "as-stored" else [
        f"rank-{i}" for i in range(len(first.rater_names))]
    if given is not None:
        split_content, num_folds = given, given["num_folds"]
    else:
        split_content = make_splits([p.patient_id for p in processed], num_folds, val_fraction, seed)
    options = {
        "source": {
            "format": fmt,
            "path": source_path,
            "reader_options": reader_options or {},
            "synthetic_options": synthetic_options or {},
            "patient_filter": list(patients or []),
        },
        "rater_names": rater_names,
        "source_rater_names": first.rater_names,
        "rater_order": rater_order,
        "allow_missing_raters": allow_missing_raters,
        "target_size": size,
        "resize": {"pad": "centred square, source value 0 (its scaled value)", "image": "bilinear",
                   "masks": "nearest"} if size is not None else None,
        "intensity": Intensity(first.intensity, spec.window, spec.percentiles).record(intensity),
        **({"spacing": sp} if (sp := recorded_spacing(processed)) is not None else {}),
        "splits": {"num_folds": num_folds, "val_fraction": val_fraction, "seed": seed, "unit": "patient",
                   "source": "random" if given is None else "file",
                   **({} if given is None else {"file": given["file"], "sha256": given["sha256"]})},
    }
    with staged_dir(out) as tmp:
        counts = _write_store(tmp, out, processed, split_content, options)
        check_replaceable(out, force)  # again: OUT may have changed while we worked; the swap follows
    return PrepareResult(out, counts["rows"], counts["cases"], counts["patients"], counts["volumes"],
                         len(rater_names), time.perf_counter() - t0)


def _nifti_xyz(p: _Processed) -> list[float] | None:
    """The voxel size of a NIfTI case in NIfTI (x, y[, z]) order (mm), or None for a source without one."""
    if p.affine is None or len(p.spacing) not in (2, 3):
        return None
    sp = [float(v) for v in p.spacing]
    return sp if len(sp) == 2 else [sp[1], sp[2], sp[0]]  # a volume's spacing is (z, x, y)


def recorded_spacing(processed: Sequence[_Processed]) -> dict[str, Any] | None:
    """The manifest's ``spacing`` entry: the sources' voxel size (RAS+ x, y[, z] in mm, before pad/resize) when
    every case is a NIfTI image (None otherwise: 2D formats such as PNG have no physical spacing).

    ``{"nifti_xyz": [...], "unit": "mm", "uniform": true}`` when all volumes agree within ``SPACING_RTOL``
    (relative); else the per-axis median with ``"uniform": false`` and ``"min"`` / ``"max"`` per axis.
    ``proseg predict --resample`` resamples its inputs to ``nifti_xyz`` by default."""
    per_volume: dict[str, list[float]] = {}
    for p in processed:
        xyz = _nifti_xyz(p)
        if xyz is None:
            return None
        per_volume.setdefault(p.volume_id, xyz)
    n_axes = min(len(v) for v in per_volume.values())
    arr = np.array([v[:n_axes] for v in per_volume.values()], np.float64)
    if not np.isfinite(arr).all() or (arr <= 0).any():
        return None
    ref = arr[0]
    uniform = bool(np.all(np.abs(arr - ref) <= SPACING_RTOL * np.abs(ref)))
    if uniform:
        return {"nifti_xyz": [float(v) for v in ref], "unit": "mm", "uniform": True}
    return {"nifti_xyz": [float(v) for v in np.median(arr, axis=0)], "unit": "mm", "uniform": False,
            "min": [float(v) for v in arr.min(axis=0)], "max": [float(v) for v in arr.max(axis=0)],
            "volumes": len(per_volume)}


def _current_intensity(intensity: str) -> str:
    """``intensity`` in its current spelling; the old ``unit8`` is accepted with a warning (recorded as ``uint8``)."""
    current = canonical_intensity(intensity)
    if current != intensity:
        warnings.warn(f"--intensity {intensity} is the old spelling of {current}; it is accepted (and recorded as "
                      f"{current}) but may go away: use --intensity {current}", ProsegWarning, stacklevel=3)
    return current


def _check_options(fmt: str, intensity: str, rater_order: str, size: int | None) -> None:
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if intensity not in INTENSITY_MODES:
        raise DataError(f"--intensity must be one of {', '.join(INTENSITY_MODES)}, got {intensity!r}")
    if rater_order not in RATER_ORDERS:
        raise DataError(f"--rater-order must be one of {', '.join(RATER_ORDERS)}, got {rater_order!r}")
    if size is not None and size < 1:
        raise DataError(f"--size must be positive, got {size}")


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse to write ``out`` when it exists, unless ``force`` and it is a proseg store or an empty folder.

    ``--force`` must never delete a user's own files: anything else at ``out`` (a file, a link, a folder holding
    files that are not a store's) is refused with ``CommandError`` and left untouched.
    """
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise CommandError(f"{out}: already exists (use --force to replace it)")
    keep = "--force replaces only a dataset written by proseg prepare or an empty folder; nothing was deleted"
    if out.is_symlink():
        raise CommandError(f"{out}: is a symbolic link; {keep} (prepare into {out.resolve()} itself if you mean it)")
    if not out.is_dir():
        raise CommandError(f"{out}: exists and is not a folder; {keep}")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not is_store(out):
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise CommandError(f"{out}: is not a proseg dataset (no valid manifest.json; it holds {shown}); {keep}")
    extra = [n for n in entries if n not in (*STORE_FILES, "manifest.json")]
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise CommandError(f"{out}: a proseg dataset, but it also holds other files ({shown}) that --force would "
                           "delete; move them away first (nothing was deleted)")


def _list_cases(fmt: str, src: str | Path, allow_missing_raters: bool, reader_options: dict[str, Any] | None,
                synthetic_options: dict[str, Any] | None) -> tuple[list[CaseRef], str]:
    """The source's cases (not loaded) and the source path recorded in the manifest."""
    if fmt == "synthetic":
        try:
            syn_seed = int(str(src))
        except ValueError as exc:
            raise DataError(f"synthetic: SRC must be an integer seed, got {src!r}") from exc
        return synthetic_cases(seed=syn_seed, **(synthetic_options or {})), f"seed={syn_seed}"
    cases = READERS[fmt](src, allow_missing_raters=allow_missing_raters, **(reader_options or {}))
    return cases, str(Path(src).resolve())


def _load_all(cases: list[CaseRef], size: int | None, intensity: Intensity, rater_order: str, workers: int | None,
              progress: Callable[[int, int], None] | None) -> list[_Processed]:
    """Load and preprocess every case in a thread pool (decoding releases the GIL), in listing order."""
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
    return processed


def _check_consistent(processed: list[_Processed], src: str | Path, rater_order: str) -> None:
    """Every case has the first one's intensity mode, in-plane size, channels (and raters, as stored)."""
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


def _in_store_order(processed: list[_Processed], src: str | Path) -> list[_Processed]:
    """Group the rows of one volume together, in slice order (2D slice files of one volume arrive separately);
    refuse a slice given twice and a volume spanning two patients."""
    vol_order: dict[str, int] = {}
    for p in processed:
        vol_order.setdefault(p.volume_id, len(vol_order))
    processed = sorted(processed, key=lambda p: (vol_order[p.volume_id], p.slice_indices[0]))
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
    return processed


@contextlib.contextmanager
def _writing(name: Path) -> Iterator[None]:
    """Re-raise an OSError of the block (a full disk ...) naming ``name``, the file in OUT the user knows: a
    bare write error names no file, and the temporary copy it was written to is deleted."""
    try:
        yield
    except OSError as exc:
        raise renamed_os_error(exc, name) from None


def _write_store(tmp: Path, out: Path, processed: list[_Processed], splits: dict,
                 options: dict[str, Any]) -> dict[str, int]:
    """Write the arrays, ``slices.csv``, ``volumes.json``, ``splits.json`` and ``manifest.json`` into ``tmp``;
    returns the manifest's counts. The arrays are streamed with ordinary writes (:class:`NpyWriter`), never
    through a writable memory map, so a full disk raises ENOSPC instead of killing the process."""
    first = processed[0]
    n_rows = sum(p.image.shape[1] for p in processed)
    channels, r, hw = first.image.shape[0], first.masks.shape[0], first.image.shape[-2:]
    present = np.zeros((n_rows, r), bool)
    perm = np.zeros((n_rows, r), np.int16)
    records: list[tuple[int, str, str, str, int]] = []
    volumes: dict[str, dict[str, Any]] = {}
    with (NpyWriter(tmp / "images.npy", (n_rows, channels, *hw), np.float32, out / "images.npy") as w_img,
          NpyWriter(tmp / "masks.npy", (n_rows, r, *hw), np.uint8, out / "masks.npy") as w_msk):
        row = 0
        for p in processed:
            s = p.image.shape[1]
            w_img.write(np.moveaxis(p.image, 1, 0))
            w_msk.write(np.moveaxis(p.masks, 1, 0))
            present[row : row + s] = p.present
            perm[row : row + s] = p.perm
            for j, k in enumerate(p.slice_indices):
                cid = p.case_id if s == 1 else f"{p.case_id}/slice-{k}"
                records.append((row + j, cid, p.patient_id, p.volume_id, k))
            v = volumes.setdefault(p.volume_id, _volume_entry(p))
            v["num_slices"] += s
            row += s
    with _writing(out / "rater_present.npy"):
        np.save(tmp / "rater_present.npy", present)
    with _writing(out / "rater_perm.npy"):
        np.save(tmp / "rater_perm.npy", perm)
    with _writing(out / "slices.csv"), open(tmp / "slices.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "case_id", "patient_id", "volume_id", "slice_index"])
        w.writerows(records)
    _write_json(tmp / "volumes.json", volumes, out)
    _write_json(tmp / "splits.json", splits, out)
    files = {}
    for name in STORE_FILES:
        fp = tmp / name
        files[name] = {"sha256": sha256_file(fp), "bytes": fp.stat().st_size}
    counts = {
        "rows": n_rows,
        "cases": len(processed),
        "volumes": len(volumes),
        "patients": len({p.patient_id for p in processed}),
        "absent_annotations": int((~present).sum()),
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": f"proseg {proseg.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": options["source"],
        "counts": counts,
        "shapes": {"images": [n_rows, channels, *hw], "masks": [n_rows, r, *hw]},
        "num_channels": channels,
        "num_raters": r,
        **{k: v for k, v in options.items() if k != "source"},
        "files": files,
    }
    _write_json(tmp / "manifest.json", manifest, out)
    return counts


def _volume_entry(p: _Processed) -> dict[str, Any]:
    """The ``volumes.json`` entry of the volume ``p`` belongs to (``num_slices`` is counted by the caller)."""
    s = p.image.shape[1]
    return {
        "case_id": p.case_id if s > 1 or p.volume_id == p.case_id else p.volume_id,
        "patient_id": p.patient_id,
        "num_slices": 0,
        "spacing": list(p.spacing),
        "affine": None if p.affine is None else np.asarray(p.affine).tolist(),
        "geometry": p.geometry.to_json(),
        **({"layout": "nifti: stored slice k = data[:, :, k] (x, y) -> (H, W)"}
           if p.affine is not None and s > 1 else {}),
        **p.extra,
    }


def _write_json(path: Path, obj: Any, out: Path) -> None:
    with _writing(out / path.name), open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
