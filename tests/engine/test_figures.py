"""Per-case figures (crop to the lesion, absent raters, scores in the title) and the evaluate console summary."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from proseg.commands.evaluate import summary_table
from proseg.viz.figures import CBAR_IN, DPI, PANEL_IN, case_figure, crop_box, score_lines
from tests.engine.engine_helpers import ok


def _disk(size: int, cy: int, cx: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _contains(box: tuple[int, int, int, int], mask: np.ndarray) -> bool:
    y0, y1, x0, x1 = box
    ys, xs = np.nonzero(mask)
    return bool(ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1)


def test_crop_box_around_a_small_disk_with_margin() -> None:
    disk = _disk(128, 40, 90, 5)  # ~0.6% of the image, like an LIDC nodule; its box is 11 px wide
    y0, y1, x0, x1 = crop_box(disk[None])
    assert y1 - y0 == x1 - x0 == 11 + 2 * 8  # square; padded by max(50% of 11 -> 6, 8 px) per side
    assert _contains((y0, y1, x0, x1), disk)
    assert (y0, x0) == (40 - 5 - 8, 90 - 5 - 8)  # centred on the disk
    # a larger lesion: the 50% margin wins over the 8 px
    big = _disk(128, 64, 64, 15)
    y0, y1, x0, x1 = crop_box(big[None])
    assert y1 - y0 == x1 - x0 == 31 + 2 * 16


def test_crop_box_is_the_union_of_raters_and_predictions_shifted_into_the_image() -> None:
    a, b = _disk(128, 20, 20, 3), _disk(128, 30, 40, 3)
    pred = np.zeros((2, 128, 128), np.float32)
    pred[1, 50, 10] = 0.9  # above 0.5: counts
    pred[0, 120, 120] = 0.4  # below 0.5: ignored
    box = crop_box(np.stack([a, b]), preds=pred)
    y0, y1, x0, x1 = box
    assert y1 - y0 == x1 - x0
    assert _contains(box, a | b) and y1 > 50 and x0 <= 10 and y1 < 120
    corner = _disk(128, 2, 125, 2)  # at the image corner: the square is shifted inside, not cut
    y0, y1, x0, x1 = crop_box(corner[None])
    assert (y0, x1) == (0, 128) and y1 - y0 == x1 - x0 == 5 + 16


def test_crop_box_full_image_when_empty_and_ignores_absent_raters() -> None:
    empty = np.zeros((3, 128, 96), bool)
    assert crop_box(empty) == (0, 128, 0, 96)
    assert crop_box(empty, preds=np.full((2, 128, 96), 0.3)) == (0, 128, 0, 96)
    masks = np.stack([_disk(128, 64, 64, 4), _disk(128, 10, 10, 30)])  # rater 1's mask would span half the image
    assert crop_box(masks, present=[True, False]) == crop_box(masks[:1])
    assert crop_box(masks, present=[False, False]) == (0, 128, 0, 128)  # nobody present, nothing predicted
    assert crop_box(_disk(16, 8, 8, 6)[None]) == (0, 16, 0, 16)  # the padded box is larger than the image


def test_case_figure_with_absent_raters_writes_a_small_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    r, k, size = 3, 2, 32
    image = rng.normal(size=(1, 1, size, size)).astype(np.float32)
    masks = np.zeros((1, r, size, size), bool)
    masks[0, 0] = _disk(size, 16, 16, 4)
    masks[0, 2] = _disk(size, 15, 17, 3)
    present = np.array([True, False, True])
    pers = rng.uniform(size=(r, k, 1, size, size)).astype(np.float32)
    div = rng.uniform(size=(k, 1, size, size)).astype(np.float32)
    scores = {"personalized": {"ged": 0.25, "dice_per_rater": [0.8, 0.6], "convention": "standard"},
              "diverse": {"ged": 0.3, "dice_per_rater_matched": [0.7, float("nan")], "convention": "standard"}}
    out = case_figure(tmp_path / "sub" / "c.png", image, masks, present, personalized=pers, diverse=div, title="t",
                    rater_names=["a", "b", "c"], scores=scores)
    assert out.is_file() and not list(out.parent.glob("*.tmp*"))
    w, h = _png_size(out)
    ncols = max(r + 1, k, 4)  # image + raters | preds | samples | mean + 3 variances
    assert w == round((PANEL_IN * ncols + CBAR_IN) * DPI)
    assert round(PANEL_IN * 4 * DPI) < h < round((PANEL_IN * 4 + 1.2) * DPI)  # 4 rows + title lines and legend
    assert w * h < 1_000_000  # small
    # diverse only, all raters absent, a volume: still a figure (the full view)
    out2 = case_figure(tmp_path / "d.png", np.zeros((3, 1, 8, 8), np.float32), np.zeros((3, 2, 8, 8), bool),
                     np.array([False, False]), diverse=rng.uniform(size=(2, 3, 8, 8)).astype(np.float32))
    w2, _ = _png_size(out2)
    assert w2 == round((PANEL_IN * 3 + CBAR_IN) * DPI)


def test_score_lines_put_ged_and_per_rater_dice_with_absent_raters() -> None:
    lines = score_lines({"personalized": {"ged": 0.256, "dice_per_rater": [0.8, 0.6], "convention": "standard"},
                         "diverse": {"ged": 0.3, "dice_per_rater": [0.1, 0.2],  # K == N: aligned by chance
                                     "dice_per_rater_matched": [0.7, math.nan]}},
                        ["a", "b", "c"], np.array([True, False, True]))
    assert lines == ["personalized (standard): GED 0.26 | Dice a 0.80, b absent, c 0.60",
                     "diverse: GED 0.30 | matched Dice a 0.70, b absent, c -"]
    assert score_lines(None, ["a"], np.array([True])) == []


def _summary(mean: float) -> dict[str, object]:
    return {"metrics": {"ged": {"mean": mean, "std": 0.1, "n": 2}, "dice_match": {"mean": 0.5, "std": 0.0, "n": 2}},
            "per_rater": {"dice_per_rater": {"mean": [0.81, 0.72], "std": [0.01, 0.02], "n": [2, 2]},
                          "dice_per_rater_matched": {"mean": [0.8, 0.7], "std": [0.0, 0.0], "n": [2, 2]}}}


def test_summary_table_lists_per_rater_dice_for_personalized_mode() -> None:
    report = {"results": {"personalized": {"standard": _summary(0.3)}, "diverse": {"standard": _summary(0.4)}}}
    lines = summary_table(report).splitlines()
    assert lines[0].startswith("personalized standard") and "ged=0.3000±0.1000" in lines[0]
    assert "dice_per_rater " in lines[1] and "[0]=0.8100±0.0100  [1]=0.7200±0.0200" in lines[1]
    assert "dice_per_rater_matched" in lines[2] and "[1]=0.7000±0.0000" in lines[2]
    assert lines[3].startswith("diverse") and len(lines) == 4  # per-rater lines only for personalized mode


@pytest.fixture(scope="module")
def evaluated(proseg_run: Path, synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("figeval") / "eval"
    res = ok("evaluate", proseg_run, "--data", synth, "--split", "test", "--out", out, "--samples", "3",
             "--figures", "2", "--max-cases", "2")
    return out, res.output


def test_evaluate_cli_prints_per_rater_dice_and_writes_figures(evaluated: tuple[Path, str]) -> None:
    out, text = evaluated
    assert "personalized" in text and "dice_per_rater " in text and "[3]=" in text  # 4 raters
    figs = sorted((out / "figures").glob("*.png"))
    assert len(figs) == 2
    w, h = _png_size(figs[0])
    assert w == round((PANEL_IN * 5 + CBAR_IN) * DPI) and h < 1000  # image + 4 raters wide; small
