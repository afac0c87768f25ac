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

Opening a store always runs the cheap integrity checks (known ``format_version``, every file present with its
recorded size, array headers and sizes matching the manifest, metadata parsing); ``open_store(path, verify=True)``
also recomputes every sha256, which the training and evaluation path does by default. Each failure is a
``DataError`` naming the file and what is wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from proseg.data.npyfile import read_npy_header
from proseg.data.preprocess import canonical_intensity
from proseg.data.types import DataError, Sample
from proseg.fsutil import sha256_file

# Version of the layout above. A store without the field is version 1; a newer version is refused (this code
# cannot know what it changed), an older one would be read through a converter here.
FORMAT_VERSION = 1
ARRAY_FILES = ("images.npy", "masks.npy", "rater_present.npy", "rater_perm.npy")
META_FILES = ("slices.csv", "volumes.json", "splits.json")
PARTS = ("train", "val", "test", "trainval", "all")
_AXES = {"images.npy": "(N, C, H, W)", "masks.npy": "(N, R, H, W)", "rater_present.npy": "(N, R)",
         "rater_perm.npy": "(N, R)"}

__all__ = ["ARRAY_FILES", "FORMAT_VERSION", "PARTS", "Store", "check_manifest", "is_store", "open_store"]


class Store:
    """A prepared dataset. Arrays are opened lazily with ``mmap_mode="r"`` and are not pickled, so a ``Store``
    travels cheaply to DataLoader workers (each worker re-opens its own memory maps).

    Opening checks what is cheap (no data is read): the manifest's ``format_version`` is known, every file it
    lists exists with its recorded size, every array's ``.npy`` header matches the manifest's shape and dtype and
    its size is header + data (truncation), and the metadata files parse. ``verify=True`` also recomputes the
    sha256 of every file (about a second per few hundred MB; the training and evaluation path does it).

    Attributes:
        path: the store folder. manifest / splits / volumes: the parsed JSON files.
        case_ids, patient_ids, volume_ids: ``(N,)`` str arrays; slice_indices: ``(N,)`` int64.
    Raises:
        DataError: naming the file and what is wrong with it.
    """

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise DataError(f"{self.path}: not a prepared dataset (no manifest.json; run `proseg prepare` first)")
        self.manifest: dict[str, Any] = _read_json(self.path / "manifest.json")
        self.format_version = check_manifest(self.path / "manifest.json", self.manifest)
        _current_spellings(self.manifest)
        # cheap checks before parsing anything: a truncated file gets a message naming it and its size
        self._check_arrays()
        self._check_sizes()
        if verify:
            self._check_checksums()
        self.splits: dict[str, Any] = _read_json(self.path / "splits.json")
        _check_splits(self.path / "splits.json", self.splits)
        self.volumes: dict[str, Any] = _read_json(self.path / "volumes.json")
        if not isinstance(self.volumes, dict):
            raise DataError(f"{self.path / 'volumes.json'}: expected a JSON object of volumes")
        self._read_slices()
        self._arrays: dict[str, np.ndarray] = {}

    def _read_slices(self) -> None:
        csv_path = self.path / "slices.csv"
        case_ids, patient_ids, volume_ids, slice_idx = [], [], [], []
        try:
            with open(csv_path, newline="") as f:
                for i, row in enumerate(csv.DictReader(f)):
                    if int(row["row"]) != i:
                        raise DataError(f"{csv_path}: row {i} is numbered {row['row']}")
                    case_ids.append(row["case_id"])
                    patient_ids.append(row["patient_id"])
                    volume_ids.append(row["volume_id"])
                    slice_idx.append(int(row["slice_index"]))
        except DataError:
            raise
        except (OSError, KeyError, ValueError, TypeError, csv.Error) as exc:
            raise DataError(f"{csv_path}: unreadable ({exc})") from exc
        self.case_ids = np.array(case_ids, dtype=str)
        self.patient_ids = np.array(patient_ids, dtype=str)
        self.volume_ids = np.array(volume_ids, dtype=str)
        self.slice_indices = np.array(slice_idx, dtype=np.int64)
        n = int(self.manifest["counts"]["rows"])
        if len(case_ids) != n:
            raise DataError(f"{self.path}: slices.csv has {len(case_ids)} rows, manifest says {n}")
        unknown = sorted(set(volume_ids) - set(self.volumes))
        if unknown:
            raise DataError(f"{self.path / 'volumes.json'}: no entry for volume(s) {unknown[:5]} of slices.csv")

    def expected_arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{file: (shape, dtype)}`` of the four arrays, as the manifest describes them."""
        n, c, h, w = self.manifest["shapes"]["images"]
        _, r, _, _ = self.manifest["shapes"]["masks"]
        return {
            "images.npy": ((n, c, h, w), np.dtype(np.float32)),
            "masks.npy": ((n, r, h, w), np.dtype(np.uint8)),
            "rater_present.npy": ((n, r), np.dtype(bool)),
            "rater_perm.npy": ((n, r), np.dtype(np.int16)),
        }

    def _check_arrays(self) -> None:
        """Every array exists, its header parses, and its shape, dtype and file size match the manifest."""
        for name, (shape, dtype) in self.expected_arrays().items():
            p = self.path / name
            hdr = read_npy_header(p)
            if hdr.shape != shape or hdr.dtype != dtype or hdr.fortran_order:
                raise DataError(f"{p}: holds a {hdr.shape} {hdr.dtype} array, the manifest says {shape} {dtype}; "
                                "the file was replaced after prepare; re-run proseg prepare")
            if hdr.size != hdr.expected_size:
                what = "truncated" if hdr.size < hdr.expected_size else "extra bytes at the end"
                raise DataError(f"{p}: {hdr.size} bytes, expected {hdr.expected_size} for {_AXES[name]} = "
                                f"{shape} {dtype} ({what}); the store is damaged, re-run proseg prepare")

    def _check_sizes(self) -> None:
        """Every file the manifest lists exists and has the size recorded by prepare (catches truncation)."""
        for name, meta in self.manifest["files"].items():
            p = self.path / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{p}: missing (the store is incomplete; re-run proseg prepare)") from None
            except OSError as exc:
                raise DataError(f"{p}: unreadable ({exc.strerror or exc})") from exc
            if size != meta["bytes"]:
                raise DataError(f"{p}: {size} bytes, the manifest recorded {meta['bytes']}; the file was altered "
                                "or truncated after prepare; re-run proseg prepare")

    def _check_checksums(self) -> None:
        bad = self.verify()
        if bad:
            # the action is the same for the CLI and the API; verify=False (documented) is for whoever insists
            raise DataError("; ".join(f"{self.path / name}: sha256 mismatch" for name in bad)
                            + (": the files were" if len(bad) > 1 else ": the file was")
                            + " altered after prepare; re-run proseg prepare")

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
            raise DataError(f"{self.path}: fold {fold} does not exist, the dataset has {self.num_folds} folds "
                            f"(0..{self.num_folds - 1})")
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

    def volume(self, volume_id: str) -> Sample:
        """All slices of a volume stacked: image ``(C, D, H, W)``, masks ``(R, D, H, W)`` (D = its rows)."""
        rows = self.volume_rows(np.flatnonzero(self.volume_ids == volume_id))
        if volume_id not in rows:
            raise DataError(f"{self.path}: no volume {volume_id!r}")
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
        """Recompute the sha256 of every file listed in the manifest; returns the names that differ (or are gone)."""
        bad = []
        for name, meta in self.manifest.get("files", {}).items():
            p = self.path / name
            if not p.is_file() or sha256_file(p) != meta["sha256"]:
                bad.append(name)
        return bad


def open_store(path: str | Path, verify: bool = False) -> Store:
    """Open a dataset written by ``proseg prepare`` (``DataError`` when ``path`` is not one, or is damaged).

    Args:
        verify: also recompute every file's sha256 (see :class:`Store`); the cheap checks always run.
    """
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: no such dataset folder")
    return Store(p, verify=verify)


def check_manifest(path: Path, man: Any) -> int:
    """Check the parsed ``manifest.json`` at ``path``: a known ``format_version`` and the entries the store
    needs. Returns the format version (1 when the field is absent: the stores written before it existed)."""
    if not isinstance(man, dict):
        raise DataError(f"{path}: not a proseg manifest (expected a JSON object)")
    version = man.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"{path}: invalid format_version {version!r} (expected a positive integer)")
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version} is newer than this proseg can read (up to "
                        f"{FORMAT_VERSION}); upgrade proseg, or re-run proseg prepare with this version")
    try:
        rows = man["counts"]["rows"]
        img, msk = man["shapes"]["images"], man["shapes"]["masks"]
        files = man["files"]
        num_raters, num_channels, names = man["num_raters"], man["num_channels"], man["rater_names"]
    except KeyError as exc:
        raise DataError(f"{path}: not a proseg manifest (no {exc.args[0]!r} entry)") from None
    except TypeError:
        raise DataError(f"{path}: not a proseg manifest (counts/shapes are not JSON objects)") from None
    if not (_is_count(rows) and _is_count(num_raters) and _is_count(num_channels) and _is_shape(img)
            and _is_shape(msk)):
        raise DataError(f"{path}: invalid shapes/counts {man['shapes']}, counts.rows={rows!r}, "
                        f"num_raters={num_raters!r}, num_channels={num_channels!r}")
    if not (img[0] == msk[0] == rows and img[1] == num_channels and msk[1] == num_raters and img[2:] == msk[2:]):
        raise DataError(f"{path}: shapes {man['shapes']} disagree with counts.rows={rows}, "
                        f"num_channels={num_channels}, num_raters={num_raters}")
    if not isinstance(names, list) or len(names) != num_raters:
        raise DataError(f"{path}: rater_names {names!r} does not list num_raters={num_raters} names")
    if not isinstance(files, dict):
        raise DataError(f"{path}: 'files' must map file names to their sha256 and size")
    for name in (*ARRAY_FILES, *META_FILES):
        meta = files.get(name)
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and isinstance(meta.get("bytes"), int)):
            raise DataError(f"{path}: no sha256 and size recorded for {name} (not a complete proseg manifest)")
    for name in files:
        if Path(name).name != name:  # only files of the store folder itself, never ../ or absolute paths
            raise DataError(f"{path}: invalid file name {name!r} in 'files'")
    return version


def _current_spellings(man: dict[str, Any]) -> None:
    """Rewrite, in the parsed manifest (the file stays as ``prepare`` wrote it), values that older versions spelled
    differently: the intensity mode ``unit8`` is now ``uint8`` (:func:`proseg.data.preprocess.canonical_intensity`)."""
    intensity = man.get("intensity")
    if isinstance(intensity, dict):
        for key in ("mode", "requested"):
            if key in intensity:
                intensity[key] = canonical_intensity(intensity[key])


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_shape(v: Any) -> bool:
    """(N, C|R, H, W) of non-negative ints."""
    return isinstance(v, list) and len(v) == 4 and all(_is_count(x) for x in v)


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a folder with a ``manifest.json`` that parses as a proseg manifest (whatever the state
    of the other files): what ``prepare --force`` may replace."""
    p = Path(path) / "manifest.json"
    try:
        with open(p) as f:
            man = json.load(f)
    except (OSError, ValueError):
        return False
    try:
        check_manifest(p, man)
    except DataError:
        # a store written by a newer proseg is still a store (this version cannot read it, but may replace it)
        version = man.get("format_version") if isinstance(man, dict) else None
        return isinstance(version, int) and version > FORMAT_VERSION and isinstance(man.get("files"), dict)
    return True


def _check_splits(path: Path, splits: Any) -> None:
    try:
        k = splits["num_folds"]
        folds = splits["folds"]
        ok = isinstance(k, int) and isinstance(folds, list) and len(folds) == k and all(
            isinstance(f, dict) and all(isinstance(f[part], list) for part in ("train", "val", "test"))
            for f in folds)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path}: not a proseg split file (expected num_folds and that many folds of "
                        "train/val/test patient lists)")


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc
