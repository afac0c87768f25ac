"""Real scans into ``proseg predict``: CT in Hounsfield units with a window, NIfTI orientation, resampling, ROI.

Each test goes through the CLI on small data it makes: an LIDC-like 8-bit store (the Kaggle PNG layout), a tiny
ProSeg trained on it for two steps, and NIfTI inputs written here."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.data.data_builders import make_lidc_kaggle
from tests.engine.engine_helpers import TRAIN_FAST, fails, ok

LUNG = (-1000.0, 400.0)


@pytest.fixture(scope="module")
def lidc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ProSeg trained for 2 steps on an 8-bit LIDC-like store (32 x 32 slices)."""
    root = tmp_path_factory.mktemp("real")
    make_lidc_kaggle(root / "src", patients=tuple(f"LIDC-IDRI-000{i}" for i in range(1, 6)), slices=2, n=32)
    ok("prepare", "lidc-kaggle", root / "src", root / "store", "-q")
    run = root / "run"
    ok("train", "-c", "synthetic/proseg", "--data", root / "store", "--out", run, "--fold", "0", *TRAIN_FAST,
       "train.max_steps=2")
    return run


def _ct(shape=(32, 32, 2), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1024, 3000, shape).astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _mean(out: Path) -> nib.Nifti1Image:
    return nib.load(str(out / "mean.nii.gz"))


def test_hu_ct_refused_then_predicted_with_window(lidc_run: Path, tmp_path: Path) -> None:
    hu = _ct()
    f = _save(tmp_path / "hu" / "scan.nii.gz", hu)
    fails("predict", lidc_run, f, tmp_path / "o0", "-k", "2", match="--window")
    ok("predict", lidc_run, f, tmp_path / "o1", "-k", "2", "--window", "-1000,400")
    # the same scan as the 8-bit windowed image the PNGs would hold (x 255, not rounded): the same prediction
    lo, hi = LUNG
    u8 = (np.clip(hu, lo, hi) - lo) / (hi - lo) * 255.0
    g = _save(tmp_path / "u8" / "scan.nii.gz", u8.astype(np.float32))
    ok("predict", lidc_run, g, tmp_path / "o2", "-k", "2")
    np.testing.assert_allclose(_mean(tmp_path / "o1").get_fdata(), _mean(tmp_path / "o2").get_fdata(), atol=1e-4)
    rec = json.loads((tmp_path / "o1" / "prediction.json").read_text())["inputs"][str(f)]["intensity"]
    assert rec["mode"] == "window" and rec["window"] == [-1000.0, 400.0]


def test_window_recorded_at_prepare_and_applied_at_predict(tmp_path: Path) -> None:
    src = tmp_path / "vols"
    rng = np.random.default_rng(1)
    for i in range(8):
        d = src / f"case{i}"
        img = rng.uniform(-1024, 1500, (32, 32)).astype(np.float32)
        _save(d / "image.nii.gz", img)
        for r in range(2):
            _save(d / f"mask_{r}.nii.gz", (img > 0).astype(np.uint8))
    ok("prepare", "folder", src, tmp_path / "store", "--window", "-1000,400", "-q", "--folds", "2")
    man = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert man["intensity"]["mode"] == "window" and man["intensity"]["window"] == [-1000.0, 400.0]
    images = np.load(tmp_path / "store" / "images.npy")
    assert images.min() >= 0.0 and images.max() <= 1.0
    run = tmp_path / "run"
    ok("train", "-c", "synthetic/proseg", "--data", tmp_path / "store", "--out", run, "--fold", "0", *TRAIN_FAST,
       "train.max_steps=1", "train.batch_size=2")
    meta = json.loads((run / "checkpoints" / "best" / "model.json").read_text())
    assert meta["dataset"]["preprocessing"]["intensity"]["window"] == [-1000.0, 400.0]
    ok("predict", run, _save(tmp_path / "in" / "ct.nii.gz", _ct((32, 32))), tmp_path / "o", "-k", "2")
    # an 8-bit image under a HU window is most likely windowed already: refused, naming --intensity uint8
    png = tmp_path / "slice.png"
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(png)
    fails("predict", run, png, tmp_path / "o2", "-k", "2", match="--intensity uint8")
    ok("predict", run, png, tmp_path / "o3", "-k", "2", "--intensity", "uint8")


def _flip_xy(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine of the data flipped along x and y (the same world positions: LPS voxel order)."""
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    f[0, 3], f[1, 3] = shape[0] - 1, shape[1] - 1
    return affine @ f


def test_orientation_round_trip(lidc_run: Path, tmp_path: Path) -> None:
    hu = _ct((32, 32, 3), seed=2)
    ras_aff = np.diag([0.8, 0.8, 2.0, 1.0])
    ok("predict", lidc_run, _save(tmp_path / "ras" / "scan.nii.gz", hu, ras_aff), tmp_path / "o_ras", "-k", "2",
       "--window", "-1000,400")
    ref = _mean(tmp_path / "o_ras").get_fdata()
    # LPS: x and y flipped
    lps_aff = _flip_xy(ras_aff, hu.shape)
    lps = _save(tmp_path / "lps" / "scan.nii.gz", hu[::-1, ::-1].copy(), lps_aff)
    assert nib.aff2axcodes(lps_aff) == ("L", "P", "S")
    ok("predict", lidc_run, lps, tmp_path / "o_lps", "-k", "2", "--window", "-1000,400")
    m = _mean(tmp_path / "o_lps")
    np.testing.assert_allclose(m.affine, lps_aff)
    assert m.shape == hu.shape
    np.testing.assert_allclose(m.get_fdata(), ref[::-1, ::-1], atol=1e-5)
    # permuted axes: (y, x, z) voxel order
    perm_aff = ras_aff[:, [1, 0, 2, 3]]
    perm = _save(tmp_path / "perm" / "scan.nii.gz", np.transpose(hu, (1, 0, 2)).copy(), perm_aff)
    ok("predict", lidc_run, perm, tmp_path / "o_perm", "-k", "2", "--window", "-1000,400")
    m = _mean(tmp_path / "o_perm")
    np.testing.assert_allclose(m.affine, perm_aff)
    np.testing.assert_allclose(m.get_fdata(), np.transpose(ref, (1, 0, 2)), atol=1e-5)
    mask = nib.load(str(tmp_path / "o_perm" / "mean_mask.nii.gz"))
    assert mask.shape == (32, 32, 3) and mask.get_data_dtype() == np.uint8


def test_resample_round_trip(lidc_run: Path, tmp_path: Path) -> None:
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    aff[:3, 3] = [10.0, -5.0, 3.0]
    f = _save(tmp_path / "in" / "scan.nii.gz", _ct((48, 40, 2), seed=3), aff)
    ok("predict", lidc_run, f, tmp_path / "o", "-k", "2", "--window", "-1000,400", "--resample", "--spacing",
       "1,1,2", "--save-samples")
    for name in ("mean", "mean_mask", "uncertainty_total"):
        img = nib.load(str(tmp_path / "o" / f"{name}.nii.gz"))
        assert img.shape == (48, 40, 2)
        np.testing.assert_allclose(img.affine, aff)
    s = nib.load(str(tmp_path / "o" / "samples.nii.gz"))
    assert s.shape == (48, 40, 2, 2)
    mean = _mean(tmp_path / "o").get_fdata()
    assert np.isfinite(mean).all() and mean.min() >= 0 and mean.max() <= 1
    rep = json.loads((tmp_path / "o" / "prediction.json").read_text())
    assert rep["spacing"] == [1.0, 1.0, 2.0]
    fails("predict", lidc_run, f, tmp_path / "o2", "--window", "-1000,400", "--resample",
          match="records no voxel size")
    fails("predict", lidc_run, f, tmp_path / "o3", "--window", "-1000,400", "--spacing", "1,1",
          match="pass --resample")
    fails("predict", lidc_run, f, tmp_path / "o4", "--window", "-1000,400", "--resample", "--spacing", "1,x",
          match="--spacing takes")


def test_roi_crop_pasted_back(lidc_run: Path, tmp_path: Path) -> None:
    hu = _ct((64, 64), seed=4)
    f = _save(tmp_path / "in" / "scan.nii.gz", hu)
    ok("predict", lidc_run, f, tmp_path / "o", "-k", "2", "--window", "-1000,400", "--roi", "8,16,32,32")
    m = _mean(tmp_path / "o").get_fdata()
    assert m.shape == (64, 64)
    inside = np.zeros((64, 64), bool)
    inside[8:40, 16:48] = True
    assert (m[~inside] == 0).all() and (m[inside] > 0).all()
    # the crop alone gives the same maps (intensity is computed on the whole input: a window is per voxel)
    g = _save(tmp_path / "crop" / "scan.nii.gz", hu[8:40, 16:48].copy())
    ok("predict", lidc_run, g, tmp_path / "oc", "-k", "2", "--window", "-1000,400")
    np.testing.assert_allclose(m[inside].reshape(32, 32), _mean(tmp_path / "oc").get_fdata(), atol=1e-5)
    fails("predict", lidc_run, f, tmp_path / "o2", "--window", "-1000,400", "--roi", "40,40,32,32",
          match="does not lie inside")
    fails("predict", lidc_run, f, tmp_path / "o3", "--window", "-1000,400", "--roi", "1,2,3", match="--roi takes")


def test_intensity_option_errors(lidc_run: Path, tmp_path: Path) -> None:
    f = _save(tmp_path / "in" / "scan.nii.gz", _ct((32, 32)))
    fails("predict", lidc_run, f, tmp_path / "o1", "--window", "400,-1000", match="LO < HI")
    fails("predict", lidc_run, f, tmp_path / "o2", "--window", "a,b", match="--window takes two numbers")
    fails("predict", lidc_run, f, tmp_path / "o3", "--window", "-1000,400", "--intensity", "zscore",
          match="cannot be combined")
    fails("predict", lidc_run, f, tmp_path / "o4", "--intensity", "window", match="needs --window")
    fails("predict", lidc_run, f, tmp_path / "o5", "--window", "5000,6000", match="outside the intensity window")
    res = ok("predict", lidc_run, f, tmp_path / "o6", "-k", "2", "--intensity", "percentile", "--percentiles",
             "1,99")
    assert (tmp_path / "o6" / "mean.nii.gz").exists()
    res = ok("predict", lidc_run, f, tmp_path / "o7", "-k", "2", "--intensity", "zscore")
    assert "another intensity range" in res.output + (getattr(res, "stderr", "") or "")


def test_sliding_window_needs_a_recorded_training_size(lidc_run: Path, tmp_path: Path) -> None:
    """The LIDC-like store was prepared without --size: there is no window size (and no voxel size: PNG)."""
    f = _save(tmp_path / "in" / "scan.nii.gz", _ct((64, 64), seed=5))
    fails("predict", lidc_run, f, tmp_path / "o", "--window", "-1000,400", "--sliding-window",
          match="records no training image size")
