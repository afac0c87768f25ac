"""The synthetic multi-rater source: determinism, rater styles, calibrated generative truth, Dataset use."""

from __future__ import annotations

import numpy as np
import pytest

from proseg.data.synthetic import STYLES, SyntheticDataset, generate, rater_names


@pytest.fixture(scope="module")
def batch():
    return generate(range(160), seed=3, size=48, num_raters=4)


def test_shapes_dtypes_and_names(batch) -> None:
    assert batch.images.shape == (160, 1, 48, 48) and batch.images.dtype == np.float32
    assert batch.masks.shape == (160, 4, 48, 48) and batch.masks.dtype == np.bool_
    assert batch.probs.shape == (160, 4, 48, 48) and batch.probs.dtype == np.float32
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert ((batch.probs >= 0) & (batch.probs <= 1)).all()
    np.testing.assert_array_equal(batch.expected, batch.probs > 0.5)
    assert batch.rater_names == ["r0-over", "r1-under", "r2-smooth", "r3-thin-miss"]
    assert rater_names(6)[4:] == ["r4-over", "r5-under"] and len(STYLES) == 4


def test_case_is_a_function_of_seed_and_index(batch) -> None:
    single = generate([37], seed=3, size=48, num_raters=4)
    np.testing.assert_array_equal(single.images[0], batch.images[37])
    np.testing.assert_array_equal(single.masks[0], batch.masks[37])
    np.testing.assert_array_equal(single.probs[0], batch.probs[37])
    other = generate([37], seed=4, size=48, num_raters=4)
    assert not np.array_equal(other.images[0], batch.images[37])
    assert not np.array_equal(batch.images[1], batch.images[2])


def test_persistent_styles(batch) -> None:
    exp = batch.expected
    over, under, smooth, thin = exp[:, 0], exp[:, 1], exp[:, 2], exp[:, 3]
    truth = batch.truth
    # over dilates and under erodes the true lesion; thin-miss never marks more than the full lesion
    assert (over | truth).sum() == over.sum() and (under & truth).sum() == under.sum()
    assert (thin & truth).sum() == thin.sum()
    area = exp.reshape(160, 4, -1).sum(-1)
    assert (area[:, 0] > area[:, 1]).all()
    assert area[:, 3].mean() < truth.reshape(160, -1).sum(-1).mean()
    # the sampled annotations keep the ordering on average
    m_area = batch.masks.reshape(160, 4, -1).sum(-1).mean(0)
    assert m_area[0] > m_area[2] > m_area[1]
    assert smooth.any()


def test_probs_are_calibrated(batch) -> None:
    # pixels where the truth says p ~ 0.3 are marked about 30% of the time (over many cases and raters)
    p, m = batch.probs.ravel(), batch.masks.ravel()
    for lo, hi in ((0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9)):
        sel = (p >= lo) & (p < hi)
        assert sel.sum() > 2000
        assert abs(m[sel].mean() - p[sel].mean()) < 0.05


def test_jitter_grows_with_ambiguity(batch) -> None:
    disagree = (batch.masks != batch.expected).reshape(160, -1).mean(-1)
    lo, hi = batch.ambiguity < 0.3, batch.ambiguity > 0.7
    assert disagree[hi].mean() > 2 * disagree[lo].mean()
    # and the image shows the lesion with a higher contrast-to-noise ratio when unambiguous
    img, t = batch.images[:, 0], batch.truth
    cnr = np.array([(img[i][t[i]].mean() - img[i][~t[i]].mean()) / img[i][~t[i]].std() for i in range(160)])
    assert cnr[lo].mean() > 2 * cnr[hi].mean()


def test_any_rater_and_channel_count() -> None:
    one = generate(3, size=32, num_raters=1, channels=2)
    assert one.masks.shape == (3, 1, 32, 32) and one.images.shape == (3, 2, 32, 32)
    six = generate(3, size=32, num_raters=6, with_truth=False)
    assert six.masks.shape == (3, 6, 32, 32) and six.probs is None


def test_dataset_and_dataloader() -> None:
    import torch
    from torch.utils.data import DataLoader

    ds = SyntheticDataset(10, seed=2, size=32, num_raters=3)
    item = ds[4]
    assert item["image"].shape == (1, 32, 32) and item["masks"].shape == (3, 32, 32)
    assert item["masks"].dtype == torch.float32 and set(item["masks"].unique().tolist()) <= {0.0, 1.0}
    ref = generate([4], seed=2, size=32, num_raters=3)
    np.testing.assert_array_equal(item["masks"].numpy(), ref.masks[0])
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 1, 32, 32) and batch["probs"].shape == (5, 3, 32, 32)
    with pytest.raises(IndexError):
        ds[10]
