"""Every reader on tiny files written in the exact real layout, and every bad input."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from proseg.data import DataError
from proseg.data.readers import list_cases, read_samples
from tests.data.data_builders import (
    disk,
    make_lidc_kaggle,
    make_lidc_pickle,
    make_npc,
    make_qubiq,
    write_nifti,
    write_png,
)


# ---- LIDC Kaggle PNG tree ----------------------------------------------------------------------------------------
def test_lidc_kaggle_reads_layout(tmp_path: Path) -> None:
    root = make_lidc_kaggle(tmp_path / "lidc", slices=3)
    cases = list_cases("lidc-kaggle", root)
    assert len(cases) == 2 * 2 * 3
    assert cases[0].case_id == "LIDC-IDRI-0001/nodule-0/slice-0"
    assert {c.patient_id for c in cases} == {"LIDC-IDRI-0001", "LIDC-IDRI-0002"}
    s = cases[1].load()  # slice-1: disks of radius 2..5
    assert s.image.shape == (1, 16, 16) and s.image.dtype == np.float32
    assert s.masks.shape == (4, 16, 16) and s.masks.dtype == np.bool_
    assert s.rater_names == ["mask-0", "mask-1", "mask-2", "mask-3"]
    np.testing.assert_array_equal(s.masks[2], disk(16, 1 + 2 + 1))
    assert s.rater_present.all()
    # each slice is its own 2D case (scored per slice, as the literature does); the nodule is kept
    assert s.extra["volume_id"] == s.case_id == "LIDC-IDRI-0001/nodule-0/slice-1"
    assert s.extra["nodule_id"] == "LIDC-IDRI-0001/nodule-0" and s.extra["slice_index"] == 1


def test_lidc_kaggle_missing_mask_file(tmp_path: Path) -> None:
    root = make_lidc_kaggle(tmp_path / "lidc")
    (root / "LIDC-IDRI-0002/nodule-1/mask-2/slice-1.png").unlink()
    with pytest.raises(DataError, match=r"nodule-1/mask-2/slice-1\.png: missing mask file for slice"):
        list_cases("lidc-kaggle", root)


def test_lidc_kaggle_shape_mismatch_and_nonbinary(tmp_path: Path) -> None:
    root = make_lidc_kaggle(tmp_path / "lidc")
    bad = root / "LIDC-IDRI-0001/nodule-0/mask-1/slice-0.png"
    write_png(bad, np.zeros((16, 12), np.uint8))
    with pytest.raises(DataError, match=r"mask-1/slice-0\.png: image/mask shape mismatch"):
        list(read_samples("lidc-kaggle", root))
    write_png(bad, np.full((16, 16), 128, np.uint8))
    with pytest.raises(DataError, match=r"mask-1/slice-0\.png: mask is not binary: values \{128\}"):
        list(read_samples("lidc-kaggle", root))


def test_lidc_kaggle_truncated_png(tmp_path: Path) -> None:
    root = make_lidc_kaggle(tmp_path / "lidc")
    p = root / "LIDC-IDRI-0002/nodule-0/images/slice-2.png"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(DataError, match=r"images/slice-2\.png: unreadable or truncated image"):
        list(read_samples("lidc-kaggle", root))


def test_lidc_kaggle_inconsistent_raters(tmp_path: Path) -> None:
    root = make_lidc_kaggle(tmp_path / "lidc")
    shutil.rmtree(root / "LIDC-IDRI-0002/nodule-0/mask-3")
    with pytest.raises(DataError, match=r"nodule-0: inconsistent rater count"):
        list_cases("lidc-kaggle", root)
    cases = list_cases("lidc-kaggle", root, allow_missing_raters=True)
    s = next(c for c in cases if c.case_id == "LIDC-IDRI-0002/nodule-0/slice-0").load()
    assert s.rater_present.tolist() == [True, True, True, False] and not s.masks[3].any()


def test_lidc_kaggle_empty_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no cases found"):
        list_cases("lidc-kaggle", tmp_path / "empty")
    with pytest.raises(DataError, match="source not found"):
        list_cases("lidc-kaggle", tmp_path / "nope")


# ---- LIDC pickle -------------------------------------------------------------------------------------------------
def test_lidc_pickle_reads_entries(tmp_path: Path) -> None:
    p = make_lidc_pickle(tmp_path / "lidc.pickle")
    cases = list_cases("lidc-pickle", p)
    assert len(cases) == 6
    assert {c.patient_id for c in cases} == {"LIDC-IDRI-0001", "LIDC-IDRI-0002"}
    s = cases[0].load()
    assert s.case_id == "LIDC-IDRI-0001_slice0" and s.masks.shape == (4, 16, 16)
    np.testing.assert_array_equal(s.masks[1], disk(16, 2))
    # a folder of parts works too, and the patient falls back to series_uid.split('_')[0] without an LIDC id
    data = {"k1": {"image": np.zeros((8, 8), np.uint8), "masks": [np.zeros((8, 8), np.uint8)] * 2,
                   "series_uid": "P7_1.2.3"}}
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.pickle").write_bytes(pickle.dumps(data))
    c = list_cases("lidc-pickle", tmp_path / "parts")
    assert c[0].patient_id == "P7" and c[0].load().num_raters == 2


def test_lidc_pickle_bad_inputs(tmp_path: Path) -> None:
    img = np.zeros((8, 8), np.uint8)
    bad = {"a": {"image": img, "masks": [img, np.zeros((8, 7), np.uint8)], "series_uid": "x"}}
    (tmp_path / "shape.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"shape\.pkl \[entry 'a'\]: image/mask shape mismatch"):
        list(read_samples("lidc-pickle", tmp_path / "shape.pkl"))
    uneven = {"a": {"image": img, "masks": [img] * 4, "series_uid": "x"},
              "b": {"image": img, "masks": [img] * 3, "series_uid": "y"}}
    (tmp_path / "uneven.pkl").write_bytes(pickle.dumps(uneven))
    with pytest.raises(DataError, match="inconsistent rater counts"):
        list_cases("lidc-pickle", tmp_path / "uneven.pkl")
    b = [c.load() for c in list_cases("lidc-pickle", tmp_path / "uneven.pkl", allow_missing_raters=True)][1]
    assert b.rater_present.tolist() == [True, True, True, False]
    nan = {"a": {"image": np.full((4, 4), np.nan, np.float32), "masks": [np.zeros((4, 4))], "series_uid": "x"}}
    (tmp_path / "nan.pkl").write_bytes(pickle.dumps(nan))
    with pytest.raises(DataError, match=r"nan\.pkl \[entry 'a'\]: image holds 16 NaN/Inf"):
        list(read_samples("lidc-pickle", tmp_path / "nan.pkl"))
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="expected a dict of entries"):
        list_cases("lidc-pickle", tmp_path / "list.pkl")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no cases found"):
        list_cases("lidc-pickle", tmp_path / "none")


# ---- NPC HDF5 ----------------------------------------------------------------------------------------------------
def test_npc_3d_and_2d(tmp_path: Path) -> None:
    cases = list_cases("npc", make_npc(tmp_path / "3d"))
    assert [c.case_id for c in cases] == ["Sample_1", "Sample_2"]
    s = cases[0].load()
    assert s.image.shape == (3, 3, 16, 16) and s.masks.shape == (4, 3, 16, 16) and s.is_volume
    assert s.spacing == (3.0, 0.5, 0.5)
    assert s.rater_names == ["label_a1", "label_a2", "label_a3", "label_a4"]
    np.testing.assert_array_equal(s.masks[1, 2], disk(16, 2 + 1 + 2))
    cases2 = list_cases("npc", make_npc(tmp_path / "2d", two_d=True))
    assert len(cases2) == 6 and cases2[4].patient_id == "Sample_2"
    s2 = cases2[4].load()  # Sample_2_slice_1
    assert s2.case_id == "Sample_2_slice_1" and s2.image.shape == (3, 16, 16)
    assert s2.extra["volume_id"] == "Sample_2" and s2.extra["slice_index"] == 1
    np.testing.assert_array_equal(s2.masks[0], disk(16, 3))


def test_npc_bad_inputs(tmp_path: Path) -> None:
    import h5py

    root = make_npc(tmp_path / "npc")
    with h5py.File(root / "Sample_2.h5", "a") as f:
        del f["label_a4"]
    with pytest.raises(DataError, match=r"Sample_2\.h5: inconsistent rater count"):
        list_cases("npc", root)
    with h5py.File(root / "Sample_2.h5", "a") as f:
        f["label_a4"] = np.full((3, 16, 16), 3, np.uint8)
    with pytest.raises(DataError, match=r"Sample_2\.h5 \[label_a4\]: mask is not binary"):
        list(read_samples("npc", root))
    with h5py.File(root / "Sample_2.h5", "a") as f:
        del f["label_a4"]
        f["label_a4"] = np.zeros((3, 16, 15), np.uint8)
    with pytest.raises(DataError, match=r"Sample_2\.h5: image/mask shape mismatch"):
        list(read_samples("npc", root))
    with h5py.File(root / "Sample_2.h5", "a") as f:
        del f["label_a4"]
        f["label_a4"] = np.zeros((3, 16, 16), np.uint8)
        f["t2"][0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"Sample_2\.h5 \[t2\]: image holds 1 NaN/Inf"):
        list(read_samples("npc", root))
    raw = (root / "Sample_1.h5").read_bytes()
    (root / "Sample_1.h5").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match=r"Sample_1\.h5: unreadable or truncated HDF5"):
        list_cases("npc", root)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no cases found"):
        list_cases("npc", tmp_path / "none")


# ---- QUBIQ -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point_at", ["task", "training"])
def test_qubiq_task_or_training_folder(tmp_path: Path, point_at: str) -> None:
    root = make_qubiq(tmp_path / "brain-growth", raters=3)
    src = root if point_at == "task" else root / "Training"
    cases = list_cases("qubiq", src)
    assert [c.case_id for c in cases] == ["case01", "case02", "case03"]
    s = cases[0].load()
    assert s.rater_names == ["seg01", "seg02", "seg03"] and s.masks.shape == (3, 16, 16)
    np.testing.assert_allclose(s.affine, np.diag([0.5, 0.5, 1.0, 1.0]))
    assert s.spacing == (0.5, 0.5)
    np.testing.assert_array_equal(s.masks[2], disk(16, 5))


def test_qubiq_any_rater_count_several_tasks_and_3d(tmp_path: Path) -> None:
    root = make_qubiq(tmp_path / "q", raters=2)
    make_qubiq(tmp_path / "q", raters=5, task="task02")
    with pytest.raises(DataError, match="several tasks"):
        list_cases("qubiq", root)
    assert list_cases("qubiq", root, task="task02")[0].load().num_raters == 5
    vol = tmp_path / "v" / "Training" / "case01"
    write_nifti(vol / "image.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 4)).astype(np.float32))
    write_nifti(vol / "task01_seg01.nii.gz", np.zeros((16, 16, 4), np.uint8))
    s = list_cases("qubiq", tmp_path / "v")[0].load()
    assert s.image.shape == (1, 4, 16, 16) and s.masks.shape == (1, 4, 16, 16)


def test_qubiq_bad_inputs(tmp_path: Path) -> None:
    root = make_qubiq(tmp_path / "q", raters=3)
    (root / "Training/case02/task01_seg03.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case02: inconsistent rater count"):
        list_cases("qubiq", root)
    s = list_cases("qubiq", root, allow_missing_raters=True)[1].load()
    assert s.rater_present.tolist() == [True, True, False]
    p = root / "Training/case01/task01_seg01.nii.gz"
    p.write_bytes(p.read_bytes()[:30])
    with pytest.raises(DataError, match=r"case01/task01_seg01\.nii\.gz: unreadable or truncated NIfTI"):
        list(read_samples("qubiq", root, allow_missing_raters=True))
    write_nifti(p, np.zeros((16, 8), np.uint8))
    with pytest.raises(DataError, match=r"task01_seg01\.nii\.gz: image/mask shape mismatch"):
        list(read_samples("qubiq", root, allow_missing_raters=True))
    (tmp_path / "none" / "Training").mkdir(parents=True)
    with pytest.raises(DataError, match="no cases found"):
        list_cases("qubiq", tmp_path / "none")


# ---- generic folder ----------------------------------------------------------------------------------------------
def test_folder_default_and_custom_patterns(tmp_path: Path) -> None:
    a = tmp_path / "a"
    for c in ("p1-c1", "p1-c2", "p2-c1"):
        (a / c).mkdir(parents=True)
        np.save(a / c / "image.npy", np.ones((2, 8, 8), np.float32))
        for r in ("x", "y"):
            np.save(a / c / f"mask_{r}.npy", disk(8, 2).astype(np.uint8))
    cases = list_cases("folder", a, patient_regex=r"^(p\d+)")
    assert [c.case_id for c in cases] == ["p1-c1", "p1-c2", "p2-c1"] and cases[2].patient_id == "p2"
    s = cases[0].load()
    assert s.image.shape == (2, 8, 8) and s.rater_names == ["x", "y"]
    b = tmp_path / "b"
    for c in ("c1", "c2"):
        write_png(b / "images" / f"{c}.png", np.zeros((8, 8, 3), np.uint8))
        for r in ("r1", "r2", "r3"):
            write_png(b / "masks" / r / f"{c}.png", disk(8, 3).astype(np.uint8) * 255)
    cases = list_cases("folder", b, image_pattern="images/{case}.png", mask_pattern="masks/{rater}/{case}.png")
    s = cases[1].load()
    assert s.case_id == "c2" and s.image.shape == (3, 8, 8) and s.rater_names == ["r1", "r2", "r3"]
    n = tmp_path / "n"
    write_nifti(n / "c1" / "image.nii.gz", np.zeros((8, 8, 3), np.float32), np.diag([2.0, 2.0, 5.0, 1.0]))
    write_nifti(n / "c1" / "mask_1.nii.gz", np.zeros((8, 8, 3), np.uint8))
    s = list_cases("folder", n)[0].load()
    assert s.image.shape == (1, 3, 8, 8) and s.spacing == (5.0, 2.0, 2.0) and s.affine is not None


def test_folder_bad_inputs(tmp_path: Path) -> None:
    a = tmp_path / "a"
    for c in ("c1", "c2"):
        (a / c).mkdir(parents=True)
        np.save(a / c / "image.npy", np.zeros((8, 8), np.float32))
    np.save(a / "c1" / "mask_1.npy", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"c2/image\.npy: missing mask files"):
        list_cases("folder", a)
    np.save(a / "c2" / "mask_1.npy", np.zeros((8, 8), np.uint8))
    np.save(a / "c2" / "mask_2.npy", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"c1/image\.npy: inconsistent rater count"):
        list_cases("folder", a)
    (a / "c2" / "mask_2.npy").unlink()
    np.save(a / "c2" / "image.npy", np.array([[np.nan] * 8] * 8, np.float32))
    with pytest.raises(DataError, match=r"c2/image\.npy: image holds 64 NaN/Inf"):
        list(read_samples("folder", a))
    np.save(a / "c2" / "image.npy", np.zeros((8, 8), np.float32))
    np.save(a / "c2" / "mask_1.npy", np.zeros((8, 9), np.uint8))
    with pytest.raises(DataError, match=r"c2/mask_1\.npy: image/mask shape mismatch"):
        list(read_samples("folder", a))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no cases found"):
        list_cases("folder", tmp_path / "empty")
