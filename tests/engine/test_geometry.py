"""Geometry of training data and inputs: the recorded voxel size (``--resample`` default), RAS+ at prepare, and
sliding-window inference (``--sliding-window``).

Small NIfTI folder sources are written here; one tiny ProSeg is trained for two steps on 16 x 16 slices (8-bit
sources, so the intensity transform is per voxel and a crop is scaled as its whole image)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from proseg.data.prepare import prepare
from proseg.data.store import open_store
from proseg.engine.data import PREPROCESSING_KEYS, dataset_meta
from tests.engine.engine_helpers import TRAIN_FAST, fails, ok

SIZE = 16


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _folder_source(root: Path, n: int = 8, shape=(SIZE, SIZE, 2), zooms=None, lps: bool = False) -> Path:
    """``n`` cases ``case{i}/image.nii.gz`` (uint8) + ``mask_a`` / ``mask_b``; ``lps`` stores the same voxels
    in LPS order (x and y flipped, affine to match), so that the RAS+ image is the same."""
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        ma = (img > 128).astype(np.uint8)
        mb = (img > 100).astype(np.uint8)
        z = (zooms[i] if zooms is not None else (1.0, 1.0, 2.0))
        aff = np.diag([*z, 1.0])
        aff[:3, 3] = [5.0, -3.0, 1.0]
        if lps:
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
            aff = aff @ flip
            img, ma, mb = (a[::-1, ::-1].copy() for a in (img, ma, mb))
        _nifti(root / f"case{i}" / "image.nii.gz", img, aff)
        _nifti(root / f"case{i}" / "mask_a.nii.gz", ma, aff)
        _nifti(root / f"case{i}" / "mask_b.nii.gz", mb, aff)
    return root


# --- recorded spacing --------------------------------------------------------------------------------------
def test_spacing_recorded_uniform_and_in_checkpoint_meta(tmp_path: Path) -> None:
    src = _folder_source(tmp_path / "src", n=4, zooms=[(0.8, 0.8, 2.5)] * 3 + [(0.8, 0.8, 2.5002)])
    prepare("folder", src, tmp_path / "store", num_folds=2)
    man = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert man["spacing"]["uniform"] is True and man["spacing"]["unit"] == "mm"
    np.testing.assert_allclose(man["spacing"]["nifti_xyz"], [0.8, 0.8, 2.5], rtol=1e-6)
    assert "spacing" in PREPROCESSING_KEYS
    meta = dataset_meta(open_store(tmp_path / "store"))
    assert meta["preprocessing"]["spacing"] == man["spacing"]


def test_spacing_not_uniform_gives_median_and_range(tmp_path: Path) -> None:
    src = _folder_source(tmp_path / "src", n=3, zooms=[(1.0, 1.0, 2.0), (0.5, 0.5, 3.0), (0.7, 0.7, 2.5)])
    prepare("folder", src, tmp_path / "store", num_folds=2)
    sp = json.loads((tmp_path / "store" / "manifest.json").read_text())["spacing"]
    assert sp["uniform"] is False
    np.testing.assert_allclose(sp["nifti_xyz"], [0.7, 0.7, 2.5], rtol=1e-6)
    np.testing.assert_allclose(sp["min"], [0.5, 0.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(sp["max"], [1.0, 1.0, 3.0], rtol=1e-6)


def test_png_source_records_no_spacing(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(3):
        d = tmp_path / "src" / f"c{i}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / "image.png")
        Image.fromarray((rng.random((8, 8)) > 0.5).astype(np.uint8) * 255).save(d / "mask_a.png")
    prepare("folder", tmp_path / "src", tmp_path / "store", num_folds=2)
    man = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert "spacing" not in man
    assert "spacing" not in dataset_meta(open_store(tmp_path / "store"))["preprocessing"]


# --- RAS+ at prepare ---------------------------------------------------------------------------------------
def test_lps_source_stored_as_its_ras_twin(tmp_path: Path) -> None:
    ras = _folder_source(tmp_path / "ras", n=3, shape=(12, 10, 3))
    lps = _folder_source(tmp_path / "lps", n=3, shape=(12, 10, 3), lps=True)
    assert nib.aff2axcodes(nib.load(str(lps / "case0" / "image.nii.gz")).affine) == ("L", "P", "S")
    prepare("folder", ras, tmp_path / "sr", num_folds=2)
    prepare("folder", lps, tmp_path / "sl", num_folds=2)
    for name in ("images.npy", "masks.npy", "rater_present.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "sr" / name), np.load(tmp_path / "sl" / name))
    vr = json.loads((tmp_path / "sr" / "volumes.json").read_text())
    vl = json.loads((tmp_path / "sl" / "volumes.json").read_text())
    for vid in vr:
        np.testing.assert_allclose(vl[vid]["affine"], vr[vid]["affine"])  # the RAS+ image's affine
        assert vl[vid]["spacing"] == vr[vid]["spacing"]
        assert vl[vid]["orientation"] == "LPS"
        assert "orientation" not in vr[vid]  # a RAS+ source is stored as before, byte for byte
    a = json.loads((tmp_path / "sr" / "manifest.json").read_text())["spacing"]
    b = json.loads((tmp_path / "sl" / "manifest.json").read_text())["spacing"]
    assert a == b


# --- a trained checkpoint ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ProSeg trained 2 steps on 16 x 16 uint8 NIfTI slices prepared with ``--size 16`` (1.0, 1.0, 2.0 mm)."""
    root = tmp_path_factory.mktemp("geom")
    src = _folder_source(root / "src", n=8)
    ok("prepare", "folder", src, root / "store", "--size", str(SIZE), "-q")
    run = root / "run"
    ok("train", "-c", "synthetic/proseg", "--data", root / "store", "--out", run, "--fold", "0", *TRAIN_FAST,
       "train.max_steps=2")
    return run


def _input(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    _nifti(path, data, np.eye(4) if affine is None else affine)
    return path


def _img(out: Path, name: str = "mean") -> np.ndarray:
    return np.asarray(nib.load(str(out / f"{name}.nii.gz")).get_fdata())


def test_resample_defaults_to_recorded_spacing(nifti_run: Path, tmp_path: Path) -> None:
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    f = _input(tmp_path / "in" / "scan.nii.gz", np.random.default_rng(2).integers(0, 256, (24, 20, 2), np.uint8),
               aff)
    ok("predict", nifti_run, f, tmp_path / "o", "-k", "2", "--resample")
    rep = json.loads((tmp_path / "o" / "prediction.json").read_text())
    assert rep["spacing"] == [1.0, 1.0, 2.0]
    assert _img(tmp_path / "o").shape == (24, 20, 2)
    ok("predict", nifti_run, f, tmp_path / "o2", "-k", "2", "--resample", "--spacing", "1,1,2")
    np.testing.assert_array_equal(_img(tmp_path / "o"), _img(tmp_path / "o2"))
    ok("predict", nifti_run, f, tmp_path / "o3", "-k", "2", "--resample", "--spacing", "0.5,0.5,2")  # overrides
    assert json.loads((tmp_path / "o3" / "prediction.json").read_text())["spacing"] == [0.5, 0.5, 2.0]


def test_checkpoint_without_spacing_predicts_as_before(nifti_run: Path, tmp_path: Path) -> None:
    """An older checkpoint (no ``spacing`` in its model.json) opens and predicts the same; ``--resample`` alone
    then asks for ``--spacing``."""
    old = tmp_path / "old"
    shutil.copytree(nifti_run / "checkpoints" / "best", old)
    mj = json.loads((old / "model.json").read_text())
    assert "spacing" in mj["dataset"]["preprocessing"]
    del mj["dataset"]["preprocessing"]["spacing"]
    (old / "model.json").write_text(json.dumps(mj))
    f = _input(tmp_path / "in" / "scan.nii.gz", np.random.default_rng(3).integers(0, 256, (16, 16, 2), np.uint8))
    ok("predict", nifti_run, f, tmp_path / "new", "-k", "2")
    ok("predict", old, f, tmp_path / "oldout", "-k", "2")
    np.testing.assert_array_equal(_img(tmp_path / "new"), _img(tmp_path / "oldout"))
    fails("predict", old, f, tmp_path / "o2", "--resample", match="records no voxel size")


# --- sliding window ----------------------------------------------------------------------------------------
def test_sliding_window_2x_equals_the_four_quarters(nifti_run: Path, tmp_path: Path) -> None:
    big = np.random.default_rng(4).integers(0, 256, (2 * SIZE, 2 * SIZE, 2), np.uint8)
    f = _input(tmp_path / "full" / "scan.nii.gz", big)
    ok("predict", nifti_run, f, tmp_path / "o", "-k", "3", "--sliding-window", "--overlap", "0", "--save-samples")
    rep = json.loads((tmp_path / "o" / "prediction.json").read_text())
    assert rep["sliding_window"] == {"window": SIZE, "overlap": 0.0, "blend": "gaussian"}
    assert next(iter(rep["inputs"].values()))["sliding_window"] == {"used": True, "windows": 4}
    names = ("mean", "rater-a_prob", "uncertainty_total", "rater-a_samples", "samples")
    full = {n: _img(tmp_path / "o", n) for n in names}
    assert full["mean"].shape == (2 * SIZE, 2 * SIZE, 2)
    for qy in (0, SIZE):
        for qx in (0, SIZE):
            q = _input(tmp_path / f"q{qy}-{qx}" / "scan.nii.gz", big[qy : qy + SIZE, qx : qx + SIZE].copy())
            out = tmp_path / f"oq{qy}-{qx}"
            ok("predict", nifti_run, q, out, "-k", "3", "--save-samples")  # same file name: same seeded latents
            for n in names:
                np.testing.assert_allclose(full[n][qy : qy + SIZE, qx : qx + SIZE], _img(out, n), atol=1e-6,
                                           err_msg=n)


def test_sliding_window_on_the_training_size_changes_nothing(nifti_run: Path, tmp_path: Path) -> None:
    f = _input(tmp_path / "in" / "scan.nii.gz", np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 2), np.uint8))
    ok("predict", nifti_run, f, tmp_path / "a", "-k", "2", "--save-samples")
    ok("predict", nifti_run, f, tmp_path / "b", "-k", "2", "--save-samples", "--sliding-window")
    for n in ("mean", "mean_mask", "uncertainty_total", "samples", "rater-b_samples"):
        np.testing.assert_array_equal(_img(tmp_path / "a", n), _img(tmp_path / "b", n), err_msg=n)


def test_sliding_window_falls_back_for_a_small_input(nifti_run: Path, tmp_path: Path) -> None:
    f = _input(tmp_path / "in" / "scan.nii.gz", np.random.default_rng(6).integers(0, 256, (12, 10, 2), np.uint8))
    ok("predict", nifti_run, f, tmp_path / "a", "-k", "2")
    ok("predict", nifti_run, f, tmp_path / "b", "-k", "2", "--sliding-window")
    np.testing.assert_array_equal(_img(tmp_path / "a"), _img(tmp_path / "b"))
    rec = next(iter(json.loads((tmp_path / "b" / "prediction.json").read_text())["inputs"].values()))
    assert rec["sliding_window"]["used"] is False and "fits in one" in rec["sliding_window"]["note"]


def test_sliding_window_overlapping_and_narrow(nifti_run: Path, tmp_path: Path) -> None:
    f = _input(tmp_path / "in" / "scan.nii.gz", np.random.default_rng(7).integers(0, 256, (40, 12, 2), np.uint8))
    for blend in ("gaussian", "uniform"):
        out = tmp_path / blend
        ok("predict", nifti_run, f, out, "-k", "2", "--sliding-window", "--blend", blend)
        m = _img(out)
        assert m.shape == (40, 12, 2) and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
        rec = next(iter(json.loads((out / "prediction.json").read_text())["inputs"].values()))
        assert rec["sliding_window"] == {"used": True, "windows": 3}  # 40 rows: starts 0, 12, 24; 12 cols padded
    fails("predict", nifti_run, f, tmp_path / "e1", "--overlap", "0.5", match="pass --sliding-window")
    fails("predict", nifti_run, f, tmp_path / "e2", "--sliding-window", "--overlap", "1", match="--overlap must")
    fails("predict", nifti_run, f, tmp_path / "e3", "--sliding-window", "--blend", "box", match="--blend must")
