"""Low-level safe readers and the restricted unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from proseg.data import DataError
from proseg.data.io import (
    check_finite,
    file_kind,
    nifti_spatial,
    npz_keys,
    read_array,
    read_hdf5,
    read_nifti,
    read_npy,
    read_npz,
    read_npz_array,
    read_png,
    to_binary_mask,
)
from proseg.data.npyfile import read_npy_header
from proseg.data.safe_pickle import safe_load_pickle
from tests.data.data_builders import disk, make_lidc_pickle, write_nifti, write_png


def test_png_roundtrip_and_truncated(tmp_path: Path) -> None:
    a = (np.arange(256).reshape(16, 16)).astype(np.uint8)
    write_png(tmp_path / "a.png", a)
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), a)
    raw = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"t\.png: unreadable or truncated image"):
        read_png(tmp_path / "t.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"junk\.png"):
        read_png(tmp_path / "junk.png")
    with pytest.raises(DataError, match=r"missing\.png: file not found"):
        read_png(tmp_path / "missing.png")


def test_nifti_roundtrip_keeps_affine_and_truncated_fails(tmp_path: Path) -> None:
    aff = np.diag([0.7, 0.8, 2.0, 1.0])
    aff[:3, 3] = [1, 2, 3]
    a = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    write_nifti(tmp_path / "v.nii.gz", a, aff)
    vol = read_nifti(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(vol.data, a)
    np.testing.assert_allclose(vol.affine, aff)
    assert vol.zooms == pytest.approx((0.7, 0.8, 2.0))
    assert tuple(vol.header.get_data_shape()) == a.shape and vol.header.get_data_dtype() == np.int16
    raw = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(raw[: len(raw) - 20])
    with pytest.raises(DataError, match=r"t\.nii\.gz: unreadable or truncated NIfTI"):
        read_nifti(tmp_path / "t.nii.gz")


def test_npy_npz_refuse_object_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.ones((3, 3), np.float32))
    assert read_npy(tmp_path / "ok.npy").shape == (3, 3)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy"):
        read_npy(tmp_path / "obj.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.ones(2))
    assert set(read_npz(tmp_path / "two.npz")) == {"a", "b"}  # type: ignore[arg-type]
    with pytest.raises(DataError, match="exactly one array"):
        read_array(tmp_path / "two.npz")
    with pytest.raises(DataError, match="no array 'c'"):
        read_npz(tmp_path / "two.npz", "c")
    assert npz_keys(tmp_path / "two.npz") == ["a", "b"]
    np.testing.assert_array_equal(read_npz_array(tmp_path / "two.npz", prefer=("c", "b")), np.ones(2))
    with pytest.raises(DataError, match=r"two\.npz: 2 arrays \['a', 'b'\] and none named \['c'\]"):
        read_npz_array(tmp_path / "two.npz", prefer=("c",))
    np.savez(tmp_path / "one.npz", x=np.arange(3))
    np.testing.assert_array_equal(read_npz_array(tmp_path / "one.npz", prefer=("c",)), np.arange(3))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz: unreadable \.npz file"):
        npz_keys(tmp_path / "junk.npz")


def test_npy_header_of_an_unknown_format_version_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    assert read_npy_header(tmp_path / "a.npy").shape == (2, 3)
    raw = bytearray((tmp_path / "a.npy").read_bytes())
    raw[6] = 9  # the major version byte after the magic string
    (tmp_path / "a.npy").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"a\.npy: not a valid \.npy file, its header is damaged \(unsupported \.npy "
                                        r"version \(9, 0\)\)"):
        read_npy_header(tmp_path / "a.npy")


def test_file_kind_by_extension_and_nifti_slice_layout() -> None:
    kinds = {"a.nii.gz": "nifti", "a.NII": "nifti", "a.png": "image", "a.JPEG": "image", "a.npy": "npy",
             "a.npz": "npz", "a.h5": "hdf5", "a.hdf5": "hdf5", "a.txt": None, "nii": None}
    assert {name: file_kind(name) for name in kinds} == kinds
    assert nifti_spatial(np.zeros((4, 5, 1)), "x").shape == (4, 5)
    assert nifti_spatial(np.arange(60).reshape(4, 5, 3), "x")[2, 1, 0] == np.arange(60).reshape(4, 5, 3)[1, 0, 2]
    with pytest.raises(DataError, match=r"v\.nii: expected a 2D or 3D NIfTI image, got shape \(2, 3, 4, 5\)"):
        nifti_spatial(np.zeros((2, 3, 4, 5)), "v.nii")


def test_hdf5_missing_dataset_and_truncated(tmp_path: Path) -> None:
    import h5py

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["t1"] = np.zeros((2, 4, 4), np.float32)
    assert read_hdf5(tmp_path / "a.h5", ["t1"])["t1"].shape == (2, 4, 4)
    with pytest.raises(DataError, match=r"a\.h5: missing dataset 't2'"):
        read_hdf5(tmp_path / "a.h5", ["t1", "t2"])
    raw = (tmp_path / "a.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(raw[:500])
    with pytest.raises(DataError, match=r"t\.h5: unreadable or truncated HDF5"):
        read_hdf5(tmp_path / "t.h5", ["t1"])


@pytest.mark.parametrize(
    ("mask", "ok"),
    [
        (np.array([[0, 255], [255, 0]], np.uint8), True),
        (np.array([[0, 1], [1, 0]], np.uint8), True),
        (np.array([[0, 1], [1, 0]], np.float32), True),
        (np.zeros((2, 2), np.uint8), True),
        (np.full((2, 2), 255, np.uint8), True),
        (np.array([[True, False]]), True),
        (np.array([[0, 128], [255, 0]], np.uint8), False),
        (np.array([[0, 1], [2, 0]], np.int32), False),
        (np.array([[0, 0.5]], np.float32), False),
        (np.full((2, 2), 7, np.uint8), False),
    ],
)
def test_to_binary_mask(mask: np.ndarray, ok: bool) -> None:
    if ok:
        out = to_binary_mask(mask, "m.png")
        assert out.dtype == np.bool_
        np.testing.assert_array_equal(out, mask != 0)
    else:
        with pytest.raises(DataError, match=r"m\.png: mask is not binary"):
            to_binary_mask(mask, "m.png")


def test_check_finite() -> None:
    check_finite(np.zeros(3, np.uint8), "x")
    check_finite(np.zeros(3, np.float32), "x")
    with pytest.raises(DataError, match=r"img\.nii: image holds 2 NaN/Inf"):
        check_finite(np.array([0, np.nan, np.inf], np.float32), "img.nii")


def test_safe_pickle_loads_array_dicts_all_protocols(tmp_path: Path) -> None:
    for proto in (2, 4, 5):
        p = make_lidc_pickle(tmp_path / f"p{proto}.pickle", protocol=proto)
        data = safe_load_pickle(p)
        entry = data["LIDC-IDRI-0001_slice0"]
        assert entry["image"].dtype == np.uint8 and entry["image"].shape == (16, 16)
        np.testing.assert_array_equal(entry["masks"][0], disk(16, 1).astype(np.uint8))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_pickle_refuses_os_system_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pickle"
    p.write_bytes(pickle.dumps({"k": {"image": np.zeros((2, 2), np.uint8), "masks": [_Evil(marker)]}}))
    with pytest.raises(DataError, match=r"evil\.pickle: refused to unpickle global '(posix|os|nt)\.system'"):
        safe_load_pickle(p)
    assert not marker.exists()


def test_safe_pickle_refuses_eval_getattr_and_object_arrays(tmp_path: Path) -> None:
    class EvalIt:
        def __reduce__(self):
            return (eval, ("1+1",))

    (tmp_path / "e.pkl").write_bytes(pickle.dumps([EvalIt()]))
    with pytest.raises(DataError, match="refused to unpickle global 'builtins.eval'"):
        safe_load_pickle(tmp_path / "e.pkl")
    (tmp_path / "o.pkl").write_bytes(pickle.dumps({"a": np.array([1, "x"], dtype=object)}))
    with pytest.raises(DataError, match="object-dtype array"):
        safe_load_pickle(tmp_path / "o.pkl")
    raw = pickle.dumps({"a": np.zeros(100)})
    (tmp_path / "t.pkl").write_bytes(raw[:50])
    with pytest.raises(DataError, match=r"t\.pkl: unreadable or truncated pickle"):
        safe_load_pickle(tmp_path / "t.pkl")


def test_safe_pickle_refuses_bytes_of_a_size_but_loads_real_bytes(tmp_path: Path) -> None:
    """``bytes(N)`` from a tiny file would allocate N bytes (a denial of service); real bytes still load."""
    class Huge:
        def __reduce__(self):
            return (bytes, (10**12,))

    class HugeArray:
        def __reduce__(self):
            return (bytearray, (10**12,))

    for evil in (Huge(), HugeArray()):
        (tmp_path / "b.pkl").write_bytes(pickle.dumps({"x": evil}, protocol=2))
        with pytest.raises(DataError, match=r"b\.pkl: refused (bytes|bytearray)\(1000000000000\)"):
            safe_load_pickle(tmp_path / "b.pkl")
    for proto in (0, 2, 4, 5):
        (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"b": b"\x00\xffab", "e": b"", "ba": bytearray(b"xy")},
                                                       protocol=proto))
        assert safe_load_pickle(tmp_path / "ok.pkl") == {"b": b"\x00\xffab", "e": b"", "ba": bytearray(b"xy")}
