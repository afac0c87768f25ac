"""Builders of tiny sources in the exact real layouts (16 x 16, 2-3 patients), shared by the data tests.

Imported by the test modules as ``tests.data.data_builders``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from tests.shared_data import SHARED, needs_shared  # noqa: F401 (the data tests import them from here)


def disk(n: int, r: float, cy: float | None = None, cx: float | None = None) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    cy = (n - 1) / 2 if cy is None else cy
    cx = (n - 1) / 2 if cx is None else cx
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_lidc_kaggle(root: Path, patients=("LIDC-IDRI-0001", "LIDC-IDRI-0002"), nodules=2, slices=3, n=16,
                     raters=4) -> Path:
    """``LIDC-IDRI-XXXX/nodule-N/images/slice-K.png`` + ``mask-r/slice-K.png`` (uint8 image, {0,255} masks).

    Rater r of slice K of nodule N has a disk of radius ``1 + r + (K % 2)`` (so rater 0 is smallest)."""
    rng = np.random.default_rng(0)
    for pid in patients:
        for nod in range(nodules):
            for k in range(slices):
                d = root / pid / f"nodule-{nod}"
                write_png(d / "images" / f"slice-{k}.png", rng.integers(0, 256, (n, n), dtype=np.uint8))
                for r in range(raters):
                    m = disk(n, 1 + r + (k % 2)).astype(np.uint8) * 255
                    write_png(d / f"mask-{r}" / f"slice-{k}.png", m)
    return root


def make_lidc_pickle(path: Path, patients=("LIDC-IDRI-0001", "LIDC-IDRI-0002"), per_patient=3, n=16,
                     raters=4, protocol: int = 4) -> Path:
    """A MedicalMatting-style pickle: ``{key: {"image", "masks", "series_uid"}}``."""
    rng = np.random.default_rng(1)
    data = {}
    for p in patients:
        for j in range(per_patient):
            data[f"{p}_slice{j}"] = {
                "image": rng.integers(0, 256, (n, n), dtype=np.uint8),
                "masks": [disk(n, 1 + r).astype(np.uint8) for r in range(raters)],
                "series_uid": f"{p}_1.3.6.1.4.1.{j}",
                "attributes": {"malignancy": [3, 4]},
            }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def make_npc(root: Path, cases=("Sample_1", "Sample_2"), depth=3, n=16, raters=4, two_d=False) -> Path:
    """MMIS-2024 files: ``t1``, ``t1c``, ``t2`` (D,H,W) float32, ``label_a1..aR`` uint8 {0,1}, ``voxel_spacing``.

    With ``two_d``: one file per slice, ``<case>_slice_<k>.h5`` with (H,W) datasets."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for c in cases:
        vol = {m: rng.normal(100, 20, (depth, n, n)).astype(np.float32) for m in ("t1", "t1c", "t2")}
        labels = {f"label_a{r + 1}": np.stack([disk(n, 2 + r + z) for z in range(depth)]).astype(np.uint8)
                  for r in range(raters)}
        if two_d:
            for z in range(depth):
                with h5py.File(root / f"{c}_slice_{z}.h5", "w") as f:
                    for k, v in {**vol, **labels}.items():
                        f[k] = v[z]
                    f["voxel_spacing"] = np.array([3.0, 0.5, 0.5])
        else:
            with h5py.File(root / f"{c}.h5", "w") as f:
                for k, v in {**vol, **labels}.items():
                    f[k] = v
                f["voxel_spacing"] = np.array([3.0, 0.5, 0.5])
    return root


def write_nifti(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


def make_qubiq(root: Path, cases=3, n=16, raters=3, task="task01", with_training=True) -> Path:
    """``[<task>/]Training/caseXX/image.nii.gz`` + ``taskNN_segMM.nii.gz`` (uint8 2D, {0,1})."""
    base = root / "Training" if with_training else root
    aff = np.diag([0.5, 0.5, 1.0, 1.0])
    for c in range(1, cases + 1):
        d = base / f"case{c:02d}"
        write_nifti(d / "image.nii.gz", (np.arange(n * n).reshape(n, n) % 256).astype(np.uint8), aff)
        for r in range(1, raters + 1):
            write_nifti(d / f"{task}_seg{r:02d}.nii.gz", disk(n, 2 + r).astype(np.uint8), aff)
    return root
