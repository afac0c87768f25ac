"""``MultiRaterDataset`` and joint augmentation: masks stay binary and aligned, seeding is per item."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from proseg.data.augment import AugmentConfig, augment_pair
from proseg.data.dataset import MultiRaterDataset, seed_worker
from proseg.data.prepare import prepare
from proseg.data.store import open_store
from tests.data.data_builders import disk


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """6 cases whose image channel 0 equals rater 0's mask (off-centre, asymmetric shapes)."""
    root = tmp_path_factory.mktemp("aligned")
    src = root / "src"
    for i in range(6):
        d = src / f"p{i}"
        d.mkdir(parents=True)
        m0 = disk(24, 4 + i % 3, cy=8, cx=14)
        m0[3:6, 2:12] = True  # a bar: breaks every symmetry
        m1 = disk(24, 3, cy=15, cx=9)
        np.save(d / "image.npy", np.stack([m0, 1 - m0]).astype(np.float32))
        np.save(d / "mask_a.npy", m0.astype(np.uint8))
        np.save(d / "mask_b.npy", m1.astype(np.uint8))
    out = root / "ds"
    prepare("folder", src, out, intensity="none", num_folds=2)
    return open_store(out)


def test_items_without_augmentation_are_the_stored_rows(store) -> None:
    ds = MultiRaterDataset(store, rows=store.rows(0, "trainval"))
    item = ds[1]
    row = int(ds.rows[1])
    assert item["index"] == row
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, 24, 24)
    assert item["masks"].dtype == torch.float32 and item["masks"].shape == (2, 24, 24)
    assert item["rater_present"].dtype == torch.bool and item["rater_present"].all()
    np.testing.assert_array_equal(item["image"].numpy(), store.images[row])
    np.testing.assert_array_equal(item["masks"].numpy(), store.masks[row])


def test_flips_rot90_keep_exact_alignment(store) -> None:
    cfg = AugmentConfig(flip_p=0.5, rot90_p=1.0, rotate_p=0.0, noise_p=0.0)
    ds = MultiRaterDataset(store, augment=cfg, seed=5)
    changed = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            it = ds[i]
            np.testing.assert_array_equal(it["image"][0].numpy(), it["masks"][0].numpy())
            np.testing.assert_array_equal(it["image"][1].numpy(), 1 - it["masks"][0].numpy())
            changed += int(not np.array_equal(it["masks"].numpy(), store.masks[i]))
    assert changed >= 12  # rot90 always applies: the bar makes every result differ from the original


def test_small_rotation_and_noise_keep_masks_binary_and_aligned(store) -> None:
    cfg = AugmentConfig(flip_p=0.5, rot90_p=0.5, rotate_p=1.0, rotate_deg=20.0, noise_p=1.0, noise_std=0.02)
    ds = MultiRaterDataset(store, augment=cfg, seed=1)
    for i in range(len(ds)):
        it = ds[i]
        m = it["masks"].numpy()
        assert set(np.unique(m)) <= {0.0, 1.0}
        img = it["image"][0].numpy() > 0.5
        inter, union = (img & (m[0] > 0)).sum(), (img | (m[0] > 0)).sum()
        assert inter / union > 0.85
        assert not np.array_equal(m, store.masks[i])  # rotated
        assert (np.abs(it["image"].numpy() - np.round(it["image"].numpy())) > 0).any()  # noise was added


def test_augmentation_is_seeded_per_item(store) -> None:
    cfg = AugmentConfig()
    a = MultiRaterDataset(store, augment=cfg, seed=3)
    b = MultiRaterDataset(store, augment=cfg, seed=3)
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["masks"], b[i]["masks"])
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(len(a)))
    c = MultiRaterDataset(store, augment=cfg, seed=4)
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(len(a)))


def test_workers_give_the_same_batches_and_store_pickles_small(store) -> None:
    ds = MultiRaterDataset(store, augment=AugmentConfig(), seed=9)
    ds[0]  # opens the memory maps in this process
    assert len(pickle.dumps(ds)) < 20_000  # the arrays are not shipped to workers
    kw = {"batch_size": 3, "shuffle": False}
    b0 = list(DataLoader(ds, num_workers=0, **kw))
    b2 = list(DataLoader(ds, num_workers=2, worker_init_fn=seed_worker, **kw))
    for x, y in zip(b0, b2, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["masks"], y["masks"])
        assert torch.equal(x["index"], y["index"])


def test_augment_pair_is_joint_over_all_raters() -> None:
    rng = np.random.default_rng(0)
    masks = np.stack([disk(16, 3, 5, 9), disk(16, 2, 10, 4), np.zeros((16, 16), bool)]).astype(np.uint8)
    image = masks[:2].astype(np.float32)  # channel c shows rater c's mask
    img, msk = augment_pair(image, masks, AugmentConfig(rotate_p=1.0, noise_p=0.0, rot90_p=1.0), rng)
    assert msk.dtype == np.uint8 and msk.shape == (3, 16, 16) and not msk[2].any()
    assert set(np.unique(msk)) <= {0, 1}
    assert abs(int(msk[0].sum()) - int(masks[0].sum())) <= 6 and abs(int(msk[1].sum()) - int(masks[1].sum())) <= 6
    for c in range(2):
        assert ((img[c] > 0.5) == msk[c].astype(bool)).mean() > 0.95
    none = AugmentConfig.none()
    img2, msk2 = augment_pair(image, masks, none, rng)
    np.testing.assert_array_equal(img2, image)
    np.testing.assert_array_equal(msk2, masks)


def test_rows_out_of_range(store) -> None:
    with pytest.raises(IndexError):
        MultiRaterDataset(store, rows=[0, 99])
    assert isinstance(Path(store.path), Path)
