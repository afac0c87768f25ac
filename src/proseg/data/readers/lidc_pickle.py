"""LIDC pickles of the Probabilistic U-Net port (Knegt) and MedicalMatting / D-Persona (``lidc_attributes.pkl``).

The file is a dict ``{key: {"image": H x W uint8 (0-255), "masks": [H x W] * R, "series_uid": str, ...}}``;
``src`` is one pickle or a folder of ``*.pickle``/``*.pkl`` files (Knegt splits it in parts). It is read with
``proseg.data.safe_pickle`` (numpy arrays and builtin containers only; anything else is refused unexecuted).

Patient id: the ``LIDC-IDRI-XXXX`` found in the key or ``series_uid`` when present, else the part of
``series_uid`` before the first ``_`` (D-Persona's ``uid.split('_')[0]``), else the key. Each entry is one 2D
case (``case_id`` = its key; its own volume, slice 0). Masks may be {0,1}, {0,255}, bool or float 0/1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from proseg.data.io import check_finite, to_binary_mask
from proseg.data.readers.base import CaseRef, natural_key, no_cases
from proseg.data.safe_pickle import safe_load_pickle
from proseg.data.types import DataError, Sample

_PID = re.compile(r"LIDC-IDRI-\d+")
LAYOUT = "a pickle (or folder of *.pickle/*.pkl) holding {key: {'image', 'masks', 'series_uid'}}"


def patient_from(key: str, series_uid: str) -> str:
    for text in (key, series_uid):
        m = _PID.search(text)
        if m:
            return m.group(0)
    if series_uid:
        return series_uid.split("_")[0]
    return key


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        found = [p for p in src.iterdir() if p.is_file() and p.suffix in (".pickle", ".pkl")]
        return sorted(found, key=lambda p: natural_key(p.name))
    raise DataError(f"{src}: source not found")


def list_cases(src: str | Path, allow_missing_raters: bool = False) -> list[CaseRef]:
    """Load the pickle(s) safely and list one case per entry (the pixels are already in memory)."""
    root = Path(src)
    files = _files(root)
    if not files:
        raise no_cases(root, LAYOUT)
    entries: list[tuple[str, Path, dict[str, Any]]] = []
    seen: dict[str, Path] = {}
    for f in files:
        data = safe_load_pickle(f)
        if not isinstance(data, dict):
            raise DataError(f"{f}: expected a dict of entries at the top level, got {type(data).__name__}")
        for key, value in data.items():
            skey = str(key)
            if skey in seen:
                raise DataError(f"{f}: entry {skey!r} also appears in {seen[skey]}")
            seen[skey] = f
            if not isinstance(value, dict) or "image" not in value or "masks" not in value:
                raise DataError(f"{f}: entry {skey!r} is not a dict with 'image' and 'masks'")
            _check_masks_container(value["masks"], f"{f} [entry {skey!r}]")
            entries.append((skey, f, value))
    if not entries:
        raise no_cases(root, LAYOUT)
    counts = {len(v["masks"]) for _, _, v in entries}
    num_raters = max(counts)
    if num_raters == 0:
        key, f, _ = entries[0]
        raise DataError(f"{f} [entry {key!r}]: 'masks' is empty in every entry (no rater masks at all)")
    if len(counts) > 1 and not allow_missing_raters:
        key, f, v = next(e for e in entries if len(e[2]["masks"]) != num_raters)
        raise DataError(
            f"{f}: inconsistent rater counts: entry {key!r} has {len(v['masks'])} masks, others {num_raters} "
            "(use --allow-missing-raters to mark the missing ones as absent)"
        )
    names = [f"mask-{i}" for i in range(num_raters)]
    cases = []
    for key, f, value in entries:
        uid = _text(value.get("series_uid", ""))
        pid = patient_from(key, uid)
        cases.append(CaseRef(key, pid, _loader(key, pid, f, value, names)))
    return cases


def _check_masks_container(raw: Any, where: str) -> None:
    """``masks`` must be a list/tuple of H x W arrays or one R x H x W array (anything else: ``DataError``)."""
    if isinstance(raw, np.ndarray):
        if raw.ndim != 3:
            raise DataError(f"{where}: 'masks' must be a list of H x W arrays or an R x H x W array, got an "
                            f"array of shape {raw.shape}")
    elif not isinstance(raw, (list, tuple)):
        raise DataError(f"{where}: 'masks' must be a list of H x W arrays, got {type(raw).__name__}")


def _text(v: Any) -> str:
    """A ``series_uid`` as text (Python-2 pickles may hold it as bytes)."""
    return v.decode("latin1") if isinstance(v, (bytes, bytearray)) else str(v)


def _as_array(v: Any, where: str, what: str) -> np.ndarray:
    """``np.asarray(v)`` with a ``DataError`` for what numpy cannot make an array of (ragged nested lists ...)
    and for non-numeric contents (strings, dicts, None)."""
    try:
        arr = np.asarray(v)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: {what} is not an array ({type(v).__name__}: {exc})") from exc
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_
    if not numeric:  # strings, None / dicts (object), complex: nothing a CT slice or a mask can be
        raise DataError(f"{where}: {what} must be a numeric array, got {type(v).__name__} of dtype {arr.dtype}")
    return arr


def _loader(key: str, pid: str, path: Path, value: dict[str, Any], names: list[str]):
    def load() -> Sample:
        where = f"{path} [entry {key!r}]"
        img = _as_array(value["image"], where, "'image'")
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim != 2 or img.size == 0:
            raise DataError(f"{where}: image must be H x W, got shape {img.shape}")
        check_finite(img, where)
        raw_masks = value["masks"]
        _check_masks_container(raw_masks, where)
        masks = np.zeros((len(names),) + img.shape, bool)
        present = np.zeros(len(names), bool)
        for i, m in enumerate(raw_masks):
            m = _as_array(m, where, f"mask {i}")
            if m.shape != img.shape:
                raise DataError(f"{where}: image/mask shape mismatch: mask {i} {m.shape} vs image {img.shape}")
            masks[i] = to_binary_mask(m, f"{where} mask {i}")
            present[i] = True
        return Sample(
            image=img[None].astype(np.float32),
            masks=masks,
            rater_present=present,
            case_id=key,
            patient_id=pid,
            rater_names=list(names),
            source=where,
            extra={"series_uid": _text(value.get("series_uid", "")), "source_dtype": str(img.dtype)},
        )

    return load
