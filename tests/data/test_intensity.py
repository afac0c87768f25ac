"""Intensity transforms of ``proseg.data.preprocess``: window, percentile, their records and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from proseg.data.preprocess import (
    INTENSITY_DOC,
    INTENSITY_MODES,
    Intensity,
    intensity_from_options,
    parse_pair,
    recorded_intensity,
    scale_intensity,
)
from proseg.errors import DataError


def test_window_clips_and_maps_to_unit_range() -> None:
    x = np.array([[[-2000.0, -1000.0, -300.0, 400.0, 3000.0]]], np.float32)
    out, pad = scale_intensity(x, Intensity("window", (-1000.0, 400.0)), "ct")
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(pad, [1000.0 / 1400.0], atol=1e-6)  # the scaled value of a source 0


def test_window_equals_uint8_of_the_windowed_image() -> None:
    hu = np.random.default_rng(0).uniform(-1024, 3000, (1, 8, 8)).astype(np.float32)
    a, _ = scale_intensity(hu, Intensity("window", (-1000.0, 400.0)), "ct")
    u8 = (np.clip(hu, -1000, 400) + 1000) / 1400 * 255
    b, _ = scale_intensity(u8, "uint8", "png")
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_percentile_per_channel() -> None:
    x = np.stack([np.arange(101, dtype=np.float32), 10 * np.arange(101, dtype=np.float32)])[:, None]
    out, _ = scale_intensity(x, Intensity("percentile", percentiles=(10.0, 90.0)), "mr")
    for c in range(2):
        assert out[c].min() == 0.0 and out[c].max() == 1.0
        np.testing.assert_allclose(out[c, 0, 50], 0.5, atol=1e-6)
    const, _ = scale_intensity(np.ones((1, 4, 4), np.float32), Intensity("percentile", percentiles=(1, 99)), "c")
    assert (const == 0).all()


def test_record_round_trip_and_old_records() -> None:
    spec = Intensity("window", (-1000.0, 400.0))
    rec = spec.record("window")
    assert rec["mode"] == "window" and rec["window"] == [-1000.0, 400.0] and "[-1000, 400]" in rec["description"]
    assert Intensity.from_record(rec) == spec
    assert Intensity.from_record({"mode": "unit8"}) == Intensity("uint8")  # stores written before the rename
    assert Intensity.from_record("zscore") == Intensity("zscore")  # old checkpoints: the bare mode
    assert Intensity.from_record(None) is None
    assert recorded_intensity(rec) == "window"
    # the records of the existing modes are what prepare wrote before (same description, no extra keys)
    assert Intensity("uint8").record("auto") == {"mode": "uint8", "requested": "auto",
                                                  "description": INTENSITY_DOC["uint8"]}
    assert set(INTENSITY_DOC) == set(INTENSITY_MODES) - {"auto"}


def test_options() -> None:
    assert intensity_from_options("auto", "-1000,400") == Intensity("window", (-1000.0, 400.0))
    assert intensity_from_options(None, None, "0.5,99.5") == Intensity("percentile", percentiles=(0.5, 99.5))
    assert intensity_from_options("percentile") == Intensity("percentile", percentiles=(0.5, 99.5))
    assert intensity_from_options(None, default=None) is None
    assert parse_pair((1, 2), "--window") == (1.0, 2.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "window"}, "needs --window"),
        ({"mode": "zscore", "window": "-1000,400"}, "cannot be combined"),
        ({"mode": None, "window": "400,-1000"}, "LO < HI"),
        ({"mode": None, "window": "1,2,3"}, "two numbers"),
        ({"mode": None, "percentiles": "-1,50"}, r"\[0, 100\]"),
        ({"mode": "gamma"}, "--intensity must be one of"),
    ],
)
def test_option_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        intensity_from_options(**kwargs)


def test_range_errors_name_the_option() -> None:
    hu = np.array([[[-1024.0, 3000.0]]], np.float32)
    with pytest.raises(DataError, match=r"expects values in \[0, 255\].*--window LO,HI"):
        scale_intensity(hu, "uint8", "ct.nii.gz")
    with pytest.raises(DataError, match="outside the intensity window.*--window LO,HI"):
        scale_intensity(np.full((1, 2, 2), 5000.0, np.float32), Intensity("window", (-1000.0, 400.0)), "x")
