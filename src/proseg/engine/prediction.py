"""``proseg predict``: per-rater maps, samples, the mean and uncertainty maps for raw input files.

Inputs (by extension): NIfTI (``.nii``/``.nii.gz``; a 2D slice ``(X, Y)``/``(X, Y, 1)``, a volume ``(X, Y, Z)``, or
``(X, Y, Z, C)`` with channels last), PNG (``(H, W)`` or ``(H, W, C)``), an HDF5 case (``t1``/``t1c``/``t2`` as
3 channels as NPC-170 stores them, or a single ``image`` dataset ``(C, [D,] H, W)``), or a folder of them.
Axis conventions are the data layer's readers': NIfTI ``(X, Y)`` -> ``(H, W) = (X, Y)``, slices along z.

Each input is prepared as the training data was (the checkpoint records the dataset's intensity mode and
target size: scaling, pad-to-square, resize), sampled with one image-global latent per volume, and the maps
are mapped back to the input's grid (resize back, un-pad) and written in the input's format:

* NIfTI: one ``.nii.gz`` per map, same shape and **affine** as the input (samples on an extra last axis);
* PNG: 8-bit PNGs, probabilities as ``round(255 p)``, masks as 0/255, variances as ``round(1020 v)``
  (a variance of a probability is at most 0.25);
* HDF5: one ``prediction.h5`` with float32 datasets.

Maps: ``mean`` (mean of every sample), per rater ``rater-<name>_prob`` (mean of its K samples) and
``rater-<name>_mask`` (prob > threshold), ``uncertainty_total``, ``uncertainty_rater`` and
``uncertainty_ambiguity`` (:mod:`proseg.engine.uncertainty`), and with ``save_samples`` the samples. A model
without a personalized output (e.g. ``prob_unet``) gets ``mean`` and ``uncertainty_total`` from its diverse
samples only; the per-rater maps and the split of the variance are not written and the report says so.

Writing is all-or-nothing: everything goes to a temporary folder beside ``OUTPUT`` that is renamed at the end;
an existing ``OUTPUT`` is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from proseg.engine.evaluation import case_generator, sample_volume, supports
from proseg.engine.uncertainty import diverse_uncertainty, uncertainty_maps
from proseg.errors import CommandError, DataError
from proseg.fsutil import staged_dir

NIFTI_EXT = (".nii.gz", ".nii")
PNG_EXT = (".png",)
HDF5_EXT = (".h5", ".hdf5")


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_EXT):
        return "nifti"
    if name.endswith(PNG_EXT):
        return "png"
    if name.endswith(HDF5_EXT):
        return "hdf5"
    return None


def stem(path: Path) -> str:
    name = path.name
    for ext in (*NIFTI_EXT, *PNG_EXT, *HDF5_EXT):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


@dataclass
class InputCase:
    """A raw input: ``image`` ``(C, D, H, W)`` float32 (D = 1 for 2D) plus what is needed to write back."""

    path: Path
    kind: str
    image: np.ndarray
    source_dtype: str
    spatial_shape: tuple[int, ...]  # the input's own spatial shape (NIfTI: stored order; PNG: (H, W); HDF5: as stored)
    affine: np.ndarray | None = None
    header: Any = None
    is_volume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def read_input(path: Path) -> InputCase:
    """Read one input file (``DataError`` naming the file for anything unreadable or malformed)."""
    from proseg.data.io import check_finite, read_hdf5, read_nifti, read_png

    kind = input_kind(path)
    if kind == "nifti":
        import nibabel as nib

        vol = read_nifti(path)
        data = np.asarray(vol.data)
        check_finite(data, path)
        shape = data.shape
        if data.ndim == 2 or (data.ndim == 3 and shape[2] == 1):
            img = data.reshape(shape[0], shape[1])[None, None]  # (1, 1, X, Y)
            is_vol = False
        elif data.ndim == 3:
            img = np.moveaxis(data, 2, 0)[None]  # (1, Z, X, Y)
            is_vol = True
        elif data.ndim == 4:
            img = np.moveaxis(data, (3, 2), (0, 1))  # (C, Z, X, Y)
            is_vol = shape[2] > 1
        else:
            raise DataError(f"{path}: NIfTI data of shape {shape} is not a 2D slice, a volume or a volume with "
                            "channels last")
        header = nib.load(str(path)).header.copy()
        return InputCase(path, kind, img.astype(np.float32), str(data.dtype), tuple(shape), vol.affine, header,
                         is_vol)
    if kind == "png":
        arr = read_png(path)
        if arr.dtype == np.bool_:  # 1-bit PNG
            arr = arr.astype(np.uint8) * 255
        img = arr[None, None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)[:, None]  # (C, 1, H, W)
        return InputCase(path, kind, img.astype(np.float32), str(arr.dtype), tuple(arr.shape[:2]))
    if kind == "hdf5":
        from proseg.data.io import hdf5_keys
        from proseg.data.readers.npc import DEFAULT_CHANNELS

        keys = hdf5_keys(path)
        if all(c in keys for c in DEFAULT_CHANNELS):
            data = read_hdf5(path, keys=list(DEFAULT_CHANNELS))
            chans = [np.asarray(data[c]) for c in DEFAULT_CHANNELS]
            shapes = {c.shape for c in chans}
            if len(shapes) != 1:
                raise DataError(f"{path}: channels {list(DEFAULT_CHANNELS)} differ in shape {sorted(shapes)}")
            img = np.stack(chans)
            names: list[str] = list(DEFAULT_CHANNELS)
        elif "image" in keys:
            img = np.asarray(read_hdf5(path, keys=["image"])["image"])
            names = ["image"]
        else:
            raise DataError(f"{path}: no image datasets (expected {', '.join(DEFAULT_CHANNELS)} or 'image'; the file "
                            f"has {sorted(keys)})")
        check_finite(img, path)
        if img.ndim == 3:
            img4 = img[:, None]
        elif img.ndim == 4:
            img4 = img
        else:
            raise DataError(f"{path}: image of shape {img.shape} is not (C, H, W) or (C, D, H, W)")
        return InputCase(path, kind, img4.astype(np.float32), str(img.dtype), tuple(img.shape[1:]),
                         is_volume=img.ndim == 4, extra={"channels": names})
    raise DataError(f"{path}: unsupported input (expected .nii/.nii.gz, .png, .h5/.hdf5 or a folder of them)")


def list_inputs(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such input file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and input_kind(p) is not None)
    if not files:
        raise DataError(f"{path}: the folder holds no .nii/.nii.gz, .png or .h5 inputs")
    seen: dict[str, Path] = {}
    for f in files:  # each input gets OUTPUT/<stem>/
        if stem(f) in seen:
            raise DataError(f"{path}: inputs {seen[stem(f)].name} and {f.name} would both write to {stem(f)}/; "
                            "rename one")
        seen[stem(f)] = f
    return files


# --- preprocessing as at training time, and its inverse -------------------------------------------------
@dataclass
class Prepared:
    image: np.ndarray  # (C, D, size, size) model space
    pad: tuple[int, int, int, int]
    padded: int
    hw: tuple[int, int]


def preprocess(case: InputCase, prep: dict[str, Any]) -> Prepared:
    """Intensity scaling and pad/resize exactly as ``proseg prepare`` did for the training data."""
    from proseg.data.preprocess import pad_resize, resolve_intensity, scale_intensity

    intensity = prep.get("intensity") or {}
    mode = intensity.get("mode", "auto") if isinstance(intensity, dict) else str(intensity)
    mode = resolve_intensity(mode, case.source_dtype)
    image, pad_value = scale_intensity(case.image, mode, str(case.path))
    size = prep.get("target_size")
    masks = np.zeros((1,) + image.shape[1:], bool)  # pad_resize resizes masks alongside; none here
    out, _, geom = pad_resize(image, masks, int(size) if size else None, pad_value)
    return Prepared(out.astype(np.float32), tuple(geom.pad), geom.padded, tuple(geom.orig_hw))  # type: ignore[arg-type]


def unprocess(maps: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """Map ``(..., size, size)`` model-space maps back to the input grid ``(..., H, W)`` (bilinear, then un-pad)."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if x.shape[-1] != prep.padded:
        x = F.interpolate(x, size=(prep.padded, prep.padded), mode="bilinear", align_corners=False)
    top, _, left, _ = prep.pad
    h, w = prep.hw
    x = x[..., top : top + h, left : left + w]
    return x.reshape(*lead, h, w)


# --- the prediction ------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_case(model: Any, case: InputCase, prep_meta: dict[str, Any], *, num_samples: int, seed: int,
                 batch_size: int, threshold: float) -> dict[str, np.ndarray]:
    """All maps of one input on its own grid, as ``(D, H, W)`` arrays (``(R, D, H, W)`` / ``(K, D, H, W)`` ...)."""
    device = next(model.parameters()).device
    if case.image.shape[0] != model.in_channels:
        raise DataError(f"{case.path}: the input has {case.image.shape[0]} channel(s) but the checkpoint's model "
                        f"expects {model.in_channels}")
    prep = preprocess(case, prep_meta)
    images = torch.from_numpy(np.ascontiguousarray(np.moveaxis(prep.image, 1, 0))).to(device)  # (D, C, H, W)
    out: dict[str, np.ndarray] = {}
    cid = case.path.name
    if supports(model, "personalized"):
        s = sample_volume(model, images, "personalized", num_samples, case_generator(seed, cid, device), batch_size)
        s = unprocess(s, prep)  # (R, K, D, H, W)
        u = uncertainty_maps(s)
        out["mean"] = u["mean"].cpu().numpy()
        out["rater_prob"] = u["rater_mean"].cpu().numpy()
        out["rater_mask"] = (u["rater_mean"] > threshold).cpu().numpy()
        out["uncertainty_total"] = u["total"].cpu().numpy()
        out["uncertainty_rater"] = u["rater"].cpu().numpy()
        out["uncertainty_ambiguity"] = u["ambiguity"].cpu().numpy()
        out["rater_samples"] = s.cpu().numpy()
    if supports(model, "diverse"):
        d = sample_volume(model, images, "diverse", num_samples, case_generator(seed, cid + "\x00diverse", device),
                          batch_size)
        d = unprocess(d, prep)  # (K, D, H, W)
        out["samples"] = d.cpu().numpy()
        if "mean" not in out:
            u2 = diverse_uncertainty(d)
            out["mean"] = u2["mean"].cpu().numpy()
            out["uncertainty_total"] = u2["total"].cpu().numpy()
    out["mean_mask"] = out["mean"] > threshold
    return out


# --- writers -------------------------------------------------------------------------------------------
def _nifti_array(case: InputCase, a: np.ndarray) -> np.ndarray:
    """``(D, H, W)`` (or ``(K, D, H, W)``) back to the input's stored NIfTI layout ``(X, Y[, Z])`` (K last)."""
    vol = np.moveaxis(a, -3, -1)  # (..., X, Y, Z)
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


def _write_png(path: Path, a2d: np.ndarray, scale: float) -> None:
    from PIL import Image

    v = np.clip(np.rint(a2d.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    Image.fromarray(v).save(path)


_PNG_SCALE = {"prob": 255.0, "mask": 255.0, "var": 1020.0}


def write_case(case: InputCase, maps: dict[str, np.ndarray], out_dir: Path, rater_names: list[str],
               save_samples: bool) -> list[str]:
    """Write ``maps`` of one input into ``out_dir`` in the input's format; returns the file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[tuple[str, np.ndarray, str]] = [("mean", maps["mean"], "prob"),
                                                  ("mean_mask", maps["mean_mask"], "mask")]
    if "rater_prob" in maps:
        for r, name in enumerate(rater_names):
            entries.append((f"rater-{name}_prob", maps["rater_prob"][r], "prob"))
            entries.append((f"rater-{name}_mask", maps["rater_mask"][r], "mask"))
        entries += [("uncertainty_total", maps["uncertainty_total"], "var"),
                    ("uncertainty_rater", maps["uncertainty_rater"], "var"),
                    ("uncertainty_ambiguity", maps["uncertainty_ambiguity"], "var")]
    else:
        entries.append(("uncertainty_total", maps["uncertainty_total"], "var"))
    samples: list[tuple[str, np.ndarray]] = []
    if save_samples:
        if "rater_samples" in maps:
            samples += [(f"rater-{name}_samples", maps["rater_samples"][r]) for r, name in enumerate(rater_names)]
        if "samples" in maps:
            samples.append(("samples", maps["samples"]))
    written: list[str] = []
    if case.kind == "nifti":
        for name, a, kind in entries:
            f = f"{name}.nii.gz"
            _write_nifti(case, out_dir / f, a, np.uint8 if kind == "mask" else np.float32)
            written.append(f)
        for name, a in samples:
            f = f"{name}.nii.gz"
            _write_nifti(case, out_dir / f, a, np.float32)
            written.append(f)
    elif case.kind == "png":
        for name, a, kind in entries:
            f = f"{name}.png"
            _write_png(out_dir / f, a[0], _PNG_SCALE[kind])
            written.append(f)
        for name, a in samples:
            for k in range(a.shape[0]):
                f = f"{name}-{k:03d}.png"
                _write_png(out_dir / f, a[k, 0], _PNG_SCALE["prob"])
                written.append(f)
    else:
        import h5py

        f = "prediction.h5"
        with h5py.File(out_dir / f, "w") as h5:
            h5.attrs["rater_names"] = json.dumps(rater_names)
            h5.attrs["source"] = str(case.path)
            for name, a, kind in entries:
                arr = a if case.is_volume else a[0]
                h5.create_dataset(name, data=arr.astype(np.uint8 if kind == "mask" else np.float32),
                                  compression="gzip")
            for name, a in samples:
                arr = a if case.is_volume else a[:, 0]
                h5.create_dataset(name, data=arr.astype(np.float32), compression="gzip")
        written.append(f)
    return written


# --- the command's core ----------------------------------------------------------------------------------
def predict_path(checkpoint: str | os.PathLike[str], input_path: str | os.PathLike[str],
                 output: str | os.PathLike[str], *, num_samples: int = 16, seed: int = 0, save_samples: bool = False,
                 threshold: float = 0.5, force: bool = False, device: str = "cpu",
                 batch_size: int = 32) -> dict[str, Any]:
    """Predict every input under ``input_path`` into ``output`` (a folder); returns the report dict."""
    from proseg.engine.checkpoint import file_sha256, resolve_checkpoint
    from proseg.models import load_model
    from proseg.models.base import CONFIG_NAME, WEIGHTS_NAME

    inp, out = Path(input_path), Path(output)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (use --force to replace it)")
    if not 0.0 < threshold < 1.0:
        raise CommandError(f"--threshold must lie in (0, 1), got {threshold}")
    if num_samples < 1:
        raise CommandError(f"--samples must be >= 1, got {num_samples}")
    ckpt_dir = resolve_checkpoint(checkpoint)
    files = list_inputs(inp)
    model = load_model(ckpt_dir, map_location=device)  # validates model.json and the weights, eval mode
    meta = json.loads((ckpt_dir / CONFIG_NAME).read_text())
    dataset = meta.get("dataset") or {}
    prep_meta = dataset.get("preprocessing") or {}
    model.to(device)
    rater_names = list(dataset.get("rater_names") or [f"{r}" for r in range(model.num_raters)])
    if len(rater_names) != model.num_raters:
        rater_names = [f"{r}" for r in range(model.num_raters)]
    notes: list[str] = []
    if not supports(model, "personalized"):
        notes.append(f"{meta['model']['name']} has no personalized (per-rater) output: per-rater maps and the "
                     "rater/ambiguity split of the uncertainty are not written; mean and uncertainty_total come "
                     "from its diverse samples")
    if not prep_meta:
        notes.append("the checkpoint records no preprocessing: inputs are used at their own size with the 'auto' "
                     "intensity scaling")

    parent = out.parent if str(out.parent) else Path(".")
    parent_probe = parent
    while not parent_probe.exists():
        parent_probe = parent_probe.parent
    if not parent_probe.is_dir():
        raise NotADirectoryError(f"{out}: cannot write here ({parent_probe} is a file)")
    if not os.access(parent_probe, os.W_OK):
        raise PermissionError(f"{out}: cannot write here ({parent_probe} is not writable)")
    report: dict[str, Any] = {"checkpoint": str(ckpt_dir), "checkpoint_sha256": file_sha256(ckpt_dir / WEIGHTS_NAME),
                              "model": meta["model"], "num_samples": num_samples, "seed": seed,
                              "threshold": threshold, "notes": notes, "inputs": {},
                              "png_scale": "probabilities and masks x255, variances x1020 (8-bit)"}
    with staged_dir(out) as tmp:
        single = inp.is_file()
        for f in files:
            case = read_input(f)
            maps = predict_case(model, case, prep_meta, num_samples=num_samples, seed=seed, batch_size=batch_size,
                                threshold=threshold)
            dest = tmp if single else tmp / stem(f)
            written = write_case(case, maps, dest, rater_names, save_samples)
            report["inputs"][str(f)] = {"output": str(out if single else out / stem(f)), "files": written}
        (tmp / "prediction.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
