"""The shared model utilities (proseg.models._utils): the one noise rule, the rater pick, the training pairs, the L2
sum."""

from __future__ import annotations

import pytest
import torch

from proseg.models._utils import (
    RATER_PICKS,
    check_rater_sampling,
    l2_norm_sum,
    noise,
    normal_from_seeds,
    pick_present_rater,
    sample_seeds,
    training_pairs,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool])
@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_noise_is_drawn_in_the_dtype_of_like_on_the_generators_device(kind: str, dtype: torch.dtype) -> None:
    like = torch.zeros(2, dtype=dtype)
    draw_dtype = dtype if dtype.is_floating_point else torch.float32
    fn = torch.randn if kind == "normal" else torch.rand
    got = noise(kind, (3, 4), torch.Generator().manual_seed(7), like)
    assert got.dtype == draw_dtype and got.device == like.device
    assert torch.equal(got, fn((3, 4), generator=torch.Generator().manual_seed(7), dtype=draw_dtype))
    torch.manual_seed(3)  # no generator: the global RNG of like's device, same rule
    got = noise(kind, (5,), None, like)
    torch.manual_seed(3)
    assert torch.equal(got, fn((5,), dtype=draw_dtype))
    with pytest.raises(ValueError, match="noise kind"):
        noise("gamma", (1,), None, like)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_from_seeds_draws_each_sample_from_its_own_seed(dtype: torch.dtype) -> None:
    like = torch.zeros(1, dtype=dtype)
    seeds = sample_seeds(5, torch.Generator().manual_seed(1), like)
    assert seeds == sample_seeds(5, torch.Generator().manual_seed(1), like) and len(set(seeds)) == 5
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = normal_from_seeds(seeds, (3, 7), like)  # parallel
        torch.set_num_threads(1)
        assert torch.equal(got, normal_from_seeds(seeds, (3, 7), like))  # serial: the same numbers
    finally:
        torch.set_num_threads(before)
    assert got.shape == (5, 3, 7) and got.dtype == dtype
    for i, s in enumerate(seeds):  # sample i is torch's normal stream of seed i
        assert torch.equal(got[i], torch.randn(3, 7, generator=torch.Generator().manual_seed(s), dtype=dtype))
    assert torch.equal(normal_from_seeds(seeds[2:4], (3, 7), like), got[2:4])  # a slice of the seeds: those samples
    with torch.inference_mode():  # the pool's threads follow the caller's inference mode
        assert torch.equal(normal_from_seeds(seeds, (3, 7), like), got)


@pytest.mark.parametrize("method", RATER_PICKS)
def test_rater_pick_is_uniform_over_present_raters(method: str) -> None:
    present = torch.tensor([[True, False, True, False], [False, False, False, True], [False] * 4])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 4)
    for _ in range(400):
        idx, valid = pick_present_rater(present, g, method)
        counts[torch.arange(3), idx] += 1
    assert valid.tolist() == [True, True, False]
    assert counts[0, 1] == 0 and counts[0, 3] == 0 and counts[1, :3].sum() == 0
    assert 150 < counts[0, 0] < 250  # ~Binomial(400, 1/2)
    a = pick_present_rater(present, torch.Generator().manual_seed(5), method)[0]
    assert torch.equal(a, pick_present_rater(present, torch.Generator().manual_seed(5), method)[0])
    with pytest.raises(ValueError, match="rater pick"):
        pick_present_rater(present, g, "first")


@pytest.mark.parametrize("method", RATER_PICKS)
def test_training_pairs(method: str) -> None:
    present = torch.tensor([[True, False, True, False], [False, False, False, True], [False] * 4])
    masks = torch.ones(3, 4, 2, 2)
    raters, weight, target = training_pairs(masks, present, "one", torch.Generator().manual_seed(1), method)
    assert raters.shape == (3, 1) and weight[:, 0].tolist() == [True, True, False]
    assert target.shape == (3, 1, 2, 2) and target[2].sum() == 0  # an image without raters: zero target, weight 0
    assert present[0, raters[0, 0]] and raters[1, 0] == 3
    raters, weight, target = training_pairs(masks, present, "all", None, method)
    assert raters.tolist() == [[0, 1, 2, 3]] * 3 and torch.equal(weight, present)
    assert torch.equal(target.sum((2, 3)), 4 * present.float())  # an absent rater's mask is never read
    with pytest.raises(ValueError, match="rater_sampling"):
        training_pairs(masks, present, "some", None, method)


def test_l2_norm_sum_both_orders() -> None:
    params = [torch.full((2, 2), 1.5), torch.tensor([3.0, 4.0]), torch.ones(1)]
    for sequential in (False, True):
        assert float(l2_norm_sum(params, sequential=sequential)) == pytest.approx(3.0 + 5.0 + 1.0)
    assert l2_norm_sum([]) is None


def test_check_rater_sampling() -> None:
    assert check_rater_sampling("one") == "one"
    with pytest.raises(ValueError, match="rater_sampling must be 'one' or 'all'"):
        check_rater_sampling("every")
