"""The canonical on-disk dataset written by ``proseg prepare`` and read with ``open_store``.

Layout of a store folder (all arrays are plain ``.npy``, opened memory-mapped)::

    images.npy         (N, C, H, W) float32   one row per 2D slice (a 3D case is stored as its slices)
    masks.npy          (N, R, H, W) uint8     {0, 1}; an absent rater's mask is all 0
    rater_present.npy  (N, R) bool            False = rater did not annotate this row (missing, not empty)
    rater_perm.npy     (N, R) int16           stored rater r of row n was the source's rater perm[n, r]
    slices.csv         row, case_id, patient_id, volume_id, slice_index
    volumes.json       {volume_id: {case_id, patient_id, num_slices, spacing, affine, geometry, ...}}
    splits.json        {seed, num_folds, val_fraction, folds: [{train, val, test}: patient ids]}
    manifest.json      counts, shapes, rater names/order, source, intensity, target size, sha256 per file

Rows of one volume are contiguous and in slice order.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from proseg.data.types import DataError, Sample

FORMAT_VERSION = 1
ARRAY_FILES = ("images.npy", "masks.npy", "rater_present.npy", "rater_perm.npy")
META_FILES = ("slices.csv", "volumes.json", "splits.json")
PARTS = ("train", "val", "test", "trainval", "all")

__all__ = ["ARRAY_FILES", "FORMAT_VERSION", "PARTS", "Store", "open_store", "sha256_file"]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class Store:
    """A prepared dataset. Arrays are opened lazily with ``mmap_mode="r"`` and are not pickled, so a ``Store``
    travels cheaply to DataLoader workers (each worker re-opens its own memory maps).

    Attributes:
        path: the store folder. manifest / splits / volumes: the parsed JSON files.
        case_ids, patient_ids, volume_ids: ``(N,)`` str arrays; slice_indices: ``(N,)`` int64.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise DataError(f"{self.path}: not a prepared dataset (no manifest.json; run `proseg prepare` first)")
        self.manifest: dict[str, Any] = _read_json(self.path / "manifest.json")
        self.splits: dict[str, Any] = _read_json(self.path / "splits.json")
        self.volumes: dict[str, Any] = _read_json(self.path / "volumes.json")
        case_ids, patient_ids, volume_ids, slice_idx = [], [], [], []
        try:
            with open(self.path / "slices.csv", newline="") as f:
                for i, row in enumerate(csv.DictReader(f)):
                    if int(row["row"]) != i:
                        raise DataError(f"{self.path / 'slices.csv'}: row {i} is numbered {row['row']}")
                    case_ids.append(row["case_id"])
                    patient_ids.append(row["patient_id"])
                    volume_ids.append(row["volume_id"])
                    slice_idx.append(int(row["slice_index"]))
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{self.path / 'slices.csv'}: unreadable ({exc})") from exc
        self.case_ids = np.array(case_ids, dtype=str)
        self.patient_ids = np.array(patient_ids, dtype=str)
        self.volume_ids = np.array(volume_ids, dtype=str)
        self.slice_indices = np.array(slice_idx, dtype=np.int64)
        n = int(self.manifest["counts"]["rows"])
        if len(case_ids) != n:
            raise DataError(f"{self.path}: slices.csv has {len(case_ids)} rows, manifest says {n}")
        self._arrays: dict[str, np.ndarray] = {}

    # -- pickling: never ship the memory maps (np.memmap pickles as a full copy) -----------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def _array(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            p = self.path / name
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except Exception as exc:
                raise DataError(f"{p}: unreadable store array ({exc})") from exc
            self._arrays[name] = arr
        return arr

    @property
    def images(self) -> np.ndarray:
        """``(N, C, H, W)`` float32, memory-mapped read-only."""
        return self._array("images.npy")

    @property
    def masks(self) -> np.ndarray:
        """``(N, R, H, W)`` uint8 in {0, 1}, memory-mapped read-only."""
        return self._array("masks.npy")

    @property
    def rater_present(self) -> np.ndarray:
        """``(N, R)`` bool."""
        return self._array("rater_present.npy")

    @property
    def rater_perm(self) -> np.ndarray:
        """``(N, R)`` int16: stored rater ``r`` of row ``n`` was source rater ``rater_perm[n, r]``."""
        return self._array("rater_perm.npy")

    def __len__(self) -> int:
        return int(self.case_ids.shape[0])

    @property
    def num_raters(self) -> int:
        return int(self.manifest["num_raters"])

    @property
    def num_channels(self) -> int:
        return int(self.manifest["num_channels"])

    @property
    def rater_names(self) -> list[str]:
        return list(self.manifest["rater_names"])

    @property
    def num_folds(self) -> int:
        return int(self.splits["num_folds"])

    def patients(self, fold: int, part: str) -> list[str]:
        """Patient ids of ``part`` (``train``/``val``/``test``/``trainval``/``all``) in fold ``fold``."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if part == "all":
            return sorted(set(self.patient_ids.tolist()))
        if not 0 <= fold < self.num_folds:
            raise ValueError(f"fold must be in [0, {self.num_folds}), got {fold}")
        f = self.splits["folds"][fold]
        if part == "trainval":
            return sorted(f["train"] + f["val"])
        return list(f[part])

    def rows(self, fold: int, part: str) -> np.ndarray:
        """Row indices ``(M,)`` int64, ascending, of the slices whose patient is in ``part`` of ``fold``."""
        return np.flatnonzero(np.isin(self.patient_ids, self.patients(fold, part))).astype(np.int64)

    def volume_rows(self, rows: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Group ``rows`` by volume: ``{volume_id: rows sorted by slice_index}`` (volumes in first-row order)."""
        rows = np.asarray(rows, dtype=np.int64)
        out: dict[str, list[int]] = {}
        for r in rows.tolist():
            out.setdefault(str(self.volume_ids[r]), []).append(r)
        return {
            v: np.array(sorted(rs, key=lambda r: int(self.slice_indices[r])), dtype=np.int64) for v, rs in out.items()
        }

    def sample(self, row: int) -> Sample:
        """Row ``row`` as a 2D ``Sample`` (copies out of the memory map)."""
        vol = self.volumes.get(str(self.volume_ids[row]), {})
        return Sample(
            image=np.array(self.images[row]),
            masks=np.array(self.masks[row]).astype(bool),
            rater_present=np.array(self.rater_present[row]),
            case_id=str(self.case_ids[row]),
            patient_id=str(self.patient_ids[row]),
            rater_names=self.rater_names,
            spacing=tuple(vol.get("spacing", ()))[-2:],
            affine=None,
            source=str(self.path),
            extra={"volume_id": str(self.volume_ids[row]), "slice_index": int(self.slice_indices[row])},
        )

    def volume(self, volume_id: str) -> Sample:
        """All slices of a volume stacked: image ``(C, D, H, W)``, masks ``(R, D, H, W)`` (D = its rows)."""
        rows = self.volume_rows(np.flatnonzero(self.volume_ids == volume_id))
        if volume_id not in rows:
            raise KeyError(volume_id)
        r = rows[volume_id]
        vol = self.volumes.get(volume_id, {})
        affine = vol.get("affine")
        return Sample(
            image=np.moveaxis(np.array(self.images[r]), 0, 1),
            masks=np.moveaxis(np.array(self.masks[r]).astype(bool), 0, 1),
            rater_present=np.array(self.rater_present[r]).any(axis=0),
            case_id=str(vol.get("case_id", volume_id)),
            patient_id=str(self.patient_ids[r[0]]),
            rater_names=self.rater_names,
            spacing=tuple(vol.get("spacing", ())),
            affine=None if affine is None else np.array(affine, dtype=np.float64),
            source=str(self.path),
            extra={"volume_id": volume_id, "rows": r},
        )

    def verify(self) -> list[str]:
        """Recompute the sha256 of every file listed in the manifest; returns the names that differ."""
        bad = []
        for name, meta in self.manifest.get("files", {}).items():
            p = self.path / name
            if not p.is_file() or sha256_file(p) != meta["sha256"]:
                bad.append(name)
        return bad


def open_store(path: str | Path) -> Store:
    """Open a dataset written by ``proseg prepare`` (``DataError`` when ``path`` is not one)."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: no such dataset folder")
    return Store(p)


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc
