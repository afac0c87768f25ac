"""What the engine reads from a prepared dataset (``proseg.data.store``): training items, validation and
test cases (volumes), and the facts a checkpoint must remember (channels, raters, preprocessing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from proseg.data.augment import AugmentConfig
from proseg.data.dataset import MultiRaterDataset
from proseg.data.store import Store, open_store
from proseg.engine.checkpoint import manifest_checksum
from proseg.engine.config import Config
from proseg.engine.types import CaseData, TrainData
from proseg.errors import ConfigError, DataError

# Manifest entries a checkpoint keeps (``model.json`` -> ``dataset.preprocessing``): ``proseg predict`` prepares raw
# inputs with ``intensity`` (its ``mode``) and ``target_size`` as ``proseg prepare`` did, ``--resample`` targets the
# recorded ``spacing`` (NIfTI stores only; older stores and 2D sources have none), and the dataset check
# (:mod:`proseg.engine.compat`) compares intensity, target size and rater order with the store it scores.
PREPROCESSING_KEYS = ("intensity", "target_size", "rater_order", "spacing")


def open_dataset(path: str, verify: bool = True) -> Store:
    """Open the store at ``path`` for training or evaluation.

    ``verify`` (the default here) recomputes every file's sha256 against the manifest: a model must never be
    trained or scored on a store whose bytes changed after ``prepare``, and hashing costs about a second per
    few hundred MB. The cheap checks (sizes, headers, format version) always run.
    """
    if not path:
        raise ConfigError("no dataset: set data.path in the config or pass --data PATH (a `proseg prepare` output)")
    return open_store(path, verify=verify)


def dataset_meta(store: Store) -> dict[str, Any]:
    """Channels, raters, rater names, manifest checksum and preprocessing of a store (JSON-ready)."""
    man = store.manifest
    return {
        "path": str(store.path),
        "in_channels": store.num_channels,
        "num_raters": store.num_raters,
        "rater_names": store.rater_names,
        "manifest_sha256": manifest_checksum(store.path),
        "preprocessing": {k: man[k] for k in PREPROCESSING_KEYS if k in man},
    }


def case_loader(store: Store) -> tuple[Callable[[str], CaseData], Callable[[np.ndarray], list[str]]]:
    """``(load_case, cases_of)``: ``cases_of(rows)`` lists the volume ids of ``rows`` in store order and
    ``load_case(volume_id)`` returns its :class:`CaseData` (slices in order)."""
    index: dict[str, np.ndarray] = {}

    def cases_of(rows: np.ndarray) -> list[str]:
        groups = store.volume_rows(rows)
        index.update(groups)
        return list(groups)

    def load_case(volume_id: str) -> CaseData:
        rows = index.get(volume_id)
        if rows is None:
            rows = store.volume_rows(np.flatnonzero(store.volume_ids == volume_id))[volume_id]
        return CaseData(
            case_id=volume_id,
            images=np.asarray(store.images[rows], dtype=np.float32),  # (D, C, H, W)
            masks=np.asarray(store.masks[rows]).astype(bool),  # (D, R, H, W)
            present=np.asarray(store.rater_present[rows]).any(axis=0),  # (R,): annotated on some slice
        )

    return load_case, cases_of


def train_data(cfg: Config) -> TrainData:
    """The training Dataset of ``cfg.data.fold``'s train part and the validation cases of its val part."""
    store = open_dataset(cfg.data.path, verify=cfg.data.verify)
    fold = cfg.data.fold
    if not 0 <= fold < store.num_folds:
        raise ConfigError(f"data.fold={fold} but {store.path} has {store.num_folds} folds "
                          f"(0..{store.num_folds - 1})")
    train_rows = store.rows(fold, "train")
    if len(train_rows) == 0:
        raise DataError(f"{store.path}: fold {fold} has no training slices")
    augment = AugmentConfig(**cfg.data.augment_args) if cfg.data.augment else None
    dataset = MultiRaterDataset(store, train_rows, augment=augment, seed=cfg.train.seed)
    load_case, cases_of = case_loader(store)
    val_cases = cases_of(store.rows(fold, "val"))
    return TrainData(dataset, val_cases, load_case, dataset_meta(store))
