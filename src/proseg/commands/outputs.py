"""The outputs of ``proseg predict``: one input's maps written in the input's own format and geometry.

* NIfTI: one ``.nii.gz`` per map, same shape, voxel order and **affine** as the input (the maps, computed in the
  canonical RAS+ orientation the input was read in, are reoriented back; samples on an extra last axis);
* PNG: 8-bit PNGs, probabilities as ``round(255 p)``, masks as 0/255, variances as ``round(1020 v)``
  (a variance of a probability is at most 0.25);
* HDF5: one ``prediction.h5`` with float32 datasets (masks uint8).

Maps (the keys of :func:`proseg.commands.predict.predict_case`): ``mean``, ``mean_mask``, per rater
``rater-<name>_prob`` / ``rater-<name>_mask``, ``uncertainty_total`` / ``_rater`` / ``_ambiguity``, and with
``save_samples`` the samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from proseg.commands.inputs import InputCase
from proseg.jsonio import dumps

PNG_SCALE = {"prob": 255.0, "mask": 255.0, "var": 1020.0}

# (file name without extension, array, kind: prob | mask | var)
Entry = tuple[str, np.ndarray, str]


def write_case(case: InputCase, maps: dict[str, np.ndarray], out_dir: Path, rater_names: list[str],
               save_samples: bool) -> list[str]:
    """Write ``maps`` of one input into ``out_dir`` in the input's format; returns the file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = _map_entries(maps, rater_names)
    samples = _sample_entries(maps, rater_names) if save_samples else []
    if case.kind == "nifti":
        return _write_nifti_case(case, entries, samples, out_dir)
    if case.kind == "png":
        return _write_png_case(entries, samples, out_dir)
    return _write_hdf5_case(case, entries, samples, out_dir, rater_names)


def _map_entries(maps: dict[str, np.ndarray], rater_names: list[str]) -> list[Entry]:
    entries: list[Entry] = [("mean", maps["mean"], "prob"), ("mean_mask", maps["mean_mask"], "mask")]
    if "rater_prob" in maps:
        for r, name in enumerate(rater_names):
            entries.append((f"rater-{name}_prob", maps["rater_prob"][r], "prob"))
            entries.append((f"rater-{name}_mask", maps["rater_mask"][r], "mask"))
        entries += [("uncertainty_total", maps["uncertainty_total"], "var"),
                    ("uncertainty_rater", maps["uncertainty_rater"], "var"),
                    ("uncertainty_ambiguity", maps["uncertainty_ambiguity"], "var")]
    else:
        entries.append(("uncertainty_total", maps["uncertainty_total"], "var"))
    return entries


def _sample_entries(maps: dict[str, np.ndarray], rater_names: list[str]) -> list[tuple[str, np.ndarray]]:
    samples: list[tuple[str, np.ndarray]] = []
    if "rater_samples" in maps:
        samples += [(f"rater-{name}_samples", maps["rater_samples"][r]) for r, name in enumerate(rater_names)]
    if "samples" in maps:
        samples.append(("samples", maps["samples"]))
    return samples


# --- NIfTI -------------------------------------------------------------------------------------------------
def _write_nifti_case(case: InputCase, entries: list[Entry], samples: list[tuple[str, np.ndarray]],
                      out_dir: Path) -> list[str]:
    written: list[str] = []
    for name, a, kind in entries:
        f = f"{name}.nii.gz"
        _write_nifti(case, out_dir / f, a, np.uint8 if kind == "mask" else np.float32)
        written.append(f)
    for name, a in samples:
        f = f"{name}.nii.gz"
        _write_nifti(case, out_dir / f, a, np.float32)
        written.append(f)
    return written


def _nifti_array(case: InputCase, a: np.ndarray) -> np.ndarray:
    """``(D, H, W)`` (or ``(K, D, H, W)``) back to the input's stored NIfTI layout ``(X, Y[, Z])`` (K last)."""
    vol = np.moveaxis(a, -3, -1)  # (..., X, Y, Z) in the canonical (RAS+) orientation the input was read in
    from_ras = case.extra.get("from_ras")
    if from_ras is not None:  # back to the file's own voxel order
        from nibabel.orientations import apply_orientation

        lead = tuple(range(vol.ndim - 3))
        moved = tuple(range(3, vol.ndim))
        vol = np.moveaxis(apply_orientation(np.moveaxis(vol, lead, moved), from_ras), moved, lead)
    if len(case.spatial_shape) == 2:
        vol = vol[..., 0]
    if a.ndim == 4:
        vol = np.moveaxis(vol, 0, -1)  # samples on the last axis
    return vol


def _write_nifti(case: InputCase, path: Path, a: np.ndarray, dtype: Any) -> None:
    import nibabel as nib

    arr = _nifti_array(case, a).astype(dtype)
    hdr = case.header.copy() if case.header is not None else None
    if hdr is not None:
        hdr.set_data_dtype(dtype)
        hdr.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(arr, case.affine, header=hdr)
    img.set_qform(case.affine)
    img.set_sform(case.affine)
    nib.save(img, str(path))


# --- PNG ---------------------------------------------------------------------------------------------------
def _write_png_case(entries: list[Entry], samples: list[tuple[str, np.ndarray]], out_dir: Path) -> list[str]:
    written: list[str] = []
    for name, a, kind in entries:
        f = f"{name}.png"
        _write_png(out_dir / f, a[0], PNG_SCALE[kind])
        written.append(f)
    for name, a in samples:
        for k in range(a.shape[0]):
            f = f"{name}-{k:03d}.png"
            _write_png(out_dir / f, a[k, 0], PNG_SCALE["prob"])
            written.append(f)
    return written


def _write_png(path: Path, a2d: np.ndarray, scale: float) -> None:
    from PIL import Image

    v = np.clip(np.rint(a2d.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    Image.fromarray(v).save(path)


# --- HDF5 --------------------------------------------------------------------------------------------------
def _write_hdf5_case(case: InputCase, entries: list[Entry], samples: list[tuple[str, np.ndarray]], out_dir: Path,
                     rater_names: list[str]) -> list[str]:
    import h5py

    f = "prediction.h5"
    with h5py.File(out_dir / f, "w") as h5:
        h5.attrs["rater_names"] = dumps(rater_names)
        h5.attrs["source"] = str(case.path)
        for name, a, kind in entries:
            arr = a if case.is_volume else a[0]
            h5.create_dataset(name, data=arr.astype(np.uint8 if kind == "mask" else np.float32), compression="gzip")
        for name, a in samples:
            arr = a if case.is_volume else a[:, 0]
            h5.create_dataset(name, data=arr.astype(np.float32), compression="gzip")
    return [f]
