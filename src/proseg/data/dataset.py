"""``MultiRaterDataset``: the training/evaluation Dataset over a prepared store (see ``proseg.data.store``).

Items are dicts of torch tensors::

    {"image": (C, H, W) float32, "masks": (R, H, W) float32 in {0, 1}, "rater_present": (R,) bool, "index": int}

``index`` is the store row. Augmentation (an ``AugmentConfig``) acts jointly on the image and all masks. Its
randomness is a pure function of ``(seed, epoch, row)`` (``numpy.random.default_rng([seed, epoch, row])``), so a
run is reproducible whatever the number of DataLoader workers or their scheduling; call ``set_epoch(e)`` before
each epoch (with ``persistent_workers=False``, the default, workers pick the new epoch up when the loader is
iterated again). The store's memory maps are re-opened inside each worker, never pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from proseg.data.augment import AugmentConfig, augment_item
from proseg.data.store import Store, open_store

__all__ = ["MultiRaterDataset", "seed_worker"]


class MultiRaterDataset(Dataset):
    """Rows ``rows`` of ``store`` (a ``Store`` or its path), optionally augmented.

    Args:
        store: the prepared dataset.
        rows: store row indices (e.g. ``store.rows(fold, "train")``); None = all rows.
        augment: an ``AugmentConfig`` or None (no augmentation: items are the stored arrays exactly).
        seed: base seed of the per-item augmentation generators.
    """

    def __init__(
        self,
        store: Store | str,
        rows: Sequence[int] | np.ndarray | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.store = store if isinstance(store, Store) else open_store(store)
        self.rows = np.arange(len(self.store), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(self.store)):
            raise IndexError(f"rows outside [0, {len(self.store)})")
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (same epoch -> same augmented items)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.rows[i])
        image = np.array(self.store.images[row], dtype=np.float32)
        masks = np.array(self.store.masks[row])
        if self.augment is not None:
            image, masks = augment_item(image, masks, self.augment, self.seed, self.epoch, row)
        return {
            "image": torch.from_numpy(image),
            "masks": torch.from_numpy(masks.astype(np.float32)),
            "rater_present": torch.from_numpy(np.array(self.store.rater_present[row])),
            "index": row,
        }


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoaders: seeds numpy's and Python's global RNGs from torch's per-worker seed
    (for any code that still uses them; ``MultiRaterDataset`` itself uses per-item generators)."""
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)  # noqa: NPY002 - seeding the legacy global RNG is the point here
    random.seed(s)
