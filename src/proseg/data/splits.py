"""Deterministic patient-level K-fold splits with a validation part inside each training fold.

``make_splits`` shuffles the sorted unique patient ids with ``numpy.random.default_rng(seed)`` and cuts them into
``num_folds`` near-equal folds (``numpy.array_split``). For fold ``k``: ``test`` = fold ``k``; the other patients,
shuffled again with ``default_rng([seed, k])``, give ``val`` (``round(val_fraction * n)``, at least 1 when
``val_fraction > 0`` and at least 2 training patients) and ``train`` (the rest). Every list is sorted. A patient
is never in two parts of one fold, and each patient is in exactly one test part.

``read_splits_file`` reads a split given as a file instead (``proseg prepare --splits FILE``): a store's own
``splits.json``, one ``{"train", "val", "test"}`` fold (JSON or YAML) or ``patient,part`` CSV/TSV rows, checked
against the source's patients and recorded with the file's sha256.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from proseg.data.types import DataError
from proseg.fsutil import sha256_file

PARTS = ("train", "val", "test")


def make_splits(patient_ids: Iterable[str], num_folds: int = 4, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Return the ``splits.json`` content: ``{"seed", "num_folds", "val_fraction", "folds": [{"train", "val",
    "test"}: sorted patient ids]}``."""
    patients = sorted(set(patient_ids))
    if num_folds < 2:
        raise DataError(f"--folds must be at least 2, got {num_folds}")
    if len(patients) < num_folds:
        raise DataError(f"cannot make {num_folds} patient-level folds from {len(patients)} patient(s)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    folds = [list(f) for f in np.array_split(np.array(shuffled, dtype=object), num_folds)]
    out = []
    for k in range(num_folds):
        test = folds[k]
        rest = [p for j, f in enumerate(folds) if j != k for p in f]
        rest = [rest[i] for i in np.random.default_rng([seed, k]).permutation(len(rest))]
        n_val = int(round(val_fraction * len(rest)))
        if val_fraction > 0 and n_val == 0 and len(rest) >= 2:
            n_val = 1
        n_val = min(n_val, len(rest) - 1)
        out.append({"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": sorted(test)})
    return {"seed": int(seed), "num_folds": int(num_folds), "val_fraction": float(val_fraction), "folds": out}


# --- a split given as a file (``proseg prepare --splits FILE``) -----------------------------------------------------

SPLIT_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".csv", ".tsv")
_SHOWN = 5


def read_splits_file(path: str | Path, patient_ids: Iterable[str], *, val_fraction: float = 0.1, seed: int = 0,
                     allow_unlisted: bool = False) -> dict:
    """The ``splits.json`` content for the split given in ``path``, checked against the source's ``patient_ids``.

    Formats (by suffix): ``.json`` / ``.yaml`` / ``.yml`` holding either a store's own ``splits.json`` (``folds``: a
    list of ``{"train", "val", "test"}`` patient lists; ``val`` may be left out) or one fold
    ``{"train": [...], "test": [...], "val": [...]}`` (``test`` and ``val`` optional); ``.csv`` / ``.tsv``: two
    columns ``patient,part`` (``part`` one of train / val / test; an optional header row ``patient,part``), one fold.
    A fold without ``val`` gets one drawn from its ``train`` part as :func:`make_splits` does (``val_fraction``,
    ``default_rng([seed, k])``). The file's lists are kept in the file's order.

    Refused (``DataError`` naming the file): a patient that is not in the source, a patient listed twice in a part
    or in two parts of one fold, a source patient in no part of a fold (unless ``allow_unlisted``: it then stays in
    the store, in the ``all`` part only, and is listed in the fold's entry of ``unlisted``), an empty ``train``
    part, an unknown part name, patient ids that are not strings.

    Returns: ``{"source": "file", "file", "sha256", "format", "seed", "num_folds", "val_fraction", "val_drawn":
    [bool per fold], "unlisted": [[patients] per fold], "folds": [{"train", "val", "test"}]}``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: --splits file not found")
    raw, fmt = _load_split_file(path)
    given = _folds_of(path, raw)
    known = set(patient_ids)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    folds, drawn, unlisted = [], [], []
    for k, fold in enumerate(given):
        where = f"{path}: fold {k}" if len(given) > 1 else f"{path}"
        parts = _check_fold(where, fold, known, allow_unlisted)
        if "val" not in fold:
            parts["train"], parts["val"] = _draw_val(parts["train"], val_fraction, seed, k)
        folds.append({p: parts[p] for p in PARTS})
        drawn.append("val" not in fold)
        listed = {p for part in PARTS for p in parts[part]}
        unlisted.append(sorted(known - listed))
    return {"source": "file", "file": str(path.resolve()), "sha256": sha256_file(path), "format": fmt,
            "seed": int(seed), "num_folds": len(folds), "val_fraction": float(val_fraction), "val_drawn": drawn,
            "unlisted": unlisted, "folds": folds}


def _load_split_file(path: Path) -> tuple[Any, str]:
    suffix = path.suffix.lower()
    if suffix not in SPLIT_FILE_SUFFIXES:
        raise DataError(f"{path}: unknown --splits file type {suffix or '(none)'!r}; use one of "
                        f"{', '.join(SPLIT_FILE_SUFFIXES)}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc
    if suffix == ".json":
        try:
            return json.loads(text), "json"
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text), "yaml"
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: not valid YAML ({exc})") from exc
    return _read_table(path, text, "\t" if suffix == ".tsv" else ","), suffix[1:]


def _read_table(path: Path, text: str, delimiter: str) -> dict[str, list[str]]:
    """``patient,part`` rows -> one fold ``{part: [patients]}`` (rows in file order; blank lines skipped)."""
    fold: dict[str, list[str]] = {}
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0]] == ["patient", "part"]:
        rows = rows[1:]
    for i, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise DataError(f"{path}: row {i} has {len(row)} column(s); expected two: patient,part")
        patient, part = row[0].strip(), row[1].strip().lower()
        if not patient:
            raise DataError(f"{path}: row {i} has an empty patient id")
        fold.setdefault(part, []).append(patient)
    if not fold:
        raise DataError(f"{path}: no patient,part rows")
    return fold


def _folds_of(path: Path, raw: Any) -> list[dict]:
    """The list of fold dicts in a parsed split file (a store's ``splits.json``, a list of folds, or one fold)."""
    if isinstance(raw, dict) and "folds" in raw:
        folds = raw["folds"]
        if not isinstance(folds, list) or not folds:
            raise DataError(f"{path}: 'folds' must be a non-empty list of {{train, val, test}} patient lists")
        k = raw.get("num_folds")
        if k is not None and k != len(folds):
            raise DataError(f"{path}: num_folds is {k} but the file lists {len(folds)} folds")
    elif isinstance(raw, list) and raw:
        folds = raw
    elif isinstance(raw, dict) and "train" in raw:
        folds = [raw]
    else:
        raise DataError(f"{path}: not a split: expected {{\"folds\": [{{\"train\", \"val\", \"test\"}}, ...]}} "
                        "(a store's splits.json), one fold {\"train\": [...], \"test\": [...]}, or patient,part rows")
    for k, f in enumerate(folds):
        if not isinstance(f, dict):
            raise DataError(f"{path}: fold {k} is not a mapping of train / val / test patient lists")
    return folds


def _check_fold(where: str, fold: dict, known: set[str], allow_unlisted: bool) -> dict[str, list[str]]:
    unknown_parts = sorted(str(p) for p in fold if p not in PARTS)
    if unknown_parts:
        raise DataError(f"{where}: unknown part(s) {', '.join(unknown_parts)}; the parts are train, val and test")
    parts: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for part in PARTS:
        items = fold.get(part, [])
        if items is None:
            items = []
        if not isinstance(items, list):
            raise DataError(f"{where}: {part} must be a list of patient ids, got {type(items).__name__}")
        bad = [p for p in items if not isinstance(p, str)]
        if bad:
            raise DataError(f"{where}: {part}: patient ids must be strings, got {bad[0]!r} (quote ids in YAML)")
        for p in items:
            if p in seen:
                what = f"twice in {part}" if seen[p] == part else f"in both {seen[p]} and {part}"
                raise DataError(f"{where}: patient {p!r} is listed {what}")
            seen[p] = part
        parts[part] = list(items)
    if not parts["train"]:
        raise DataError(f"{where}: the train part is empty")
    unknown = [p for p in seen if p not in known]
    if unknown:
        raise DataError(f"{where}: {len(unknown)} patient(s) not in the source: {_show(unknown)}")
    missing = sorted(known - set(seen))
    if missing and not allow_unlisted:
        raise DataError(f"{where}: {len(missing)} patient(s) of the source are in no part: {_show(missing)} (list "
                        "them, leave them out of the store with --patients, or pass --allow-unlisted)")
    return parts


def _draw_val(train: list[str], val_fraction: float, seed: int, k: int) -> tuple[list[str], list[str]]:
    """Split a given ``train`` part into (train, val) as :func:`make_splits` does; both keep the file's order."""
    order = np.random.default_rng([seed, k]).permutation(len(train))
    n_val = int(round(val_fraction * len(train)))
    if val_fraction > 0 and n_val == 0 and len(train) >= 2:
        n_val = 1
    n_val = min(n_val, len(train) - 1)
    val = {train[i] for i in order[:n_val]}
    return [p for p in train if p not in val], [p for p in train if p in val]


def _show(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f" ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")
