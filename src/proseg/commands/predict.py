"""``proseg predict``: per-rater maps, samples, the mean and uncertainty maps for raw input files.

Each input (:mod:`proseg.commands.inputs`) is prepared as the training data was (the checkpoint records the
dataset's intensity mode and target size: scaling, pad-to-square, resize; :mod:`proseg.commands.preprocess`),
sampled with one image-global latent per volume (:func:`proseg.engine.evaluation.sample_volume`), and the maps
are mapped back to the input's grid (resize back, un-pad) and written in the input's format
(:mod:`proseg.commands.outputs`).

Maps: ``mean`` (mean of every sample), per rater ``rater-<name>_prob`` (mean of its K samples) and
``rater-<name>_mask`` (prob > threshold), ``uncertainty_total``, ``uncertainty_rater`` and
``uncertainty_ambiguity`` (:mod:`proseg.metrics.uncertainty`), and with ``save_samples`` the samples. A model
without a personalized output (e.g. ``prob_unet``) gets ``mean`` and ``uncertainty_total`` from its diverse
samples only; the per-rater maps and the split of the variance are not written and the report says so.

Writing is all-or-nothing: everything goes to a temporary folder beside ``OUTPUT`` that is renamed at the end;
an existing ``OUTPUT`` is replaced only with ``force``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proseg.commands.inputs import InputCase, list_inputs, read_input, stem
from proseg.commands.outputs import write_case
from proseg.commands.preprocess import BLENDS, Prepared, blend_weight, preprocess, unprocess, window_starts
from proseg.data.preprocess import UNIT_RANGE_MODES, Intensity, intensity_from_options
from proseg.engine.checkpoint import resolve_checkpoint
from proseg.engine.distributed import env_dist_info, resolve_device
from proseg.engine.evaluation import case_generator, sample_volume, supports
from proseg.errors import CommandError, DataError
from proseg.fsutil import check_writable, sha256_file, staged_dir
from proseg.jsonio import dumps
from proseg.metrics.uncertainty import diverse_uncertainty, uncertainty_maps
from proseg.models import load_model
from proseg.models.base import WEIGHTS_NAME, MultiRaterModel, read_model_meta
from proseg.progress import Progress


@torch.inference_mode()
def predict_case(model: Any, case: InputCase, prep_meta: dict[str, Any], *, num_samples: int, seed: int,
                 batch_size: int, threshold: float, intensity: Intensity | None = None,
                 roi: tuple[int, int, int, int] | None = None,
                 spacing: tuple[float, ...] | None = None, window: int | None = None, overlap: float = 0.25,
                 blend: str = "gaussian") -> dict[str, np.ndarray]:
    """All maps of one input on its own grid, as ``(D, H, W)`` arrays (``(R, D, H, W)`` / ``(K, D, H, W)`` ...).

    ``intensity`` overrides the checkpoint's recorded transform, ``roi = (y0, x0, h, w)`` predicts that crop only
    (zeros elsewhere), ``spacing`` resamples the input to that voxel size first (:func:`preprocess`), ``window``
    (the training size) predicts an input larger than it in overlapping windows (:func:`sample_windows`)."""
    device = next(model.parameters()).device
    if case.image.shape[0] != model.in_channels:
        raise DataError(f"{case.path}: the input has {case.image.shape[0]} channel(s) but the checkpoint's model "
                        f"expects {model.in_channels}")
    prep = preprocess(case, prep_meta, intensity=intensity, roi=roi, spacing=spacing, window=window)
    images = torch.from_numpy(np.ascontiguousarray(np.moveaxis(prep.image, 1, 0))).to(device)  # (D, C, H, W)
    out: dict[str, np.ndarray] = {}
    cid = case.path.name
    if supports(model, "personalized"):
        s = _sample(model, images, "personalized", num_samples, case_generator(seed, cid, device), batch_size, prep,
                    overlap, blend)
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
        d = _sample(model, images, "diverse", num_samples, case_generator(seed, cid + "\x00diverse", device),
                    batch_size, prep, overlap, blend)
        d = unprocess(d, prep)  # (K, D, H, W)
        out["samples"] = d.cpu().numpy()
        if "mean" not in out:
            u2 = diverse_uncertainty(d)
            out["mean"] = u2["mean"].cpu().numpy()
            out["uncertainty_total"] = u2["total"].cpu().numpy()
    out["mean_mask"] = out["mean"] > threshold
    out["_intensity"] = prep.intensity.record("predict") if prep.intensity is not None else None  # type: ignore
    if window is not None:
        out["_windows"] = _window_record(prep, window, overlap)  # type: ignore[assignment]
    return out


def _sample(model: Any, images: torch.Tensor, mode: str, num_samples: int, generator: torch.Generator,
            batch_size: int, prep: Prepared, overlap: float, blend: str) -> torch.Tensor:
    if prep.window is None:
        return sample_volume(model, images, mode, num_samples, generator, batch_size)
    return sample_windows(model, images, mode, num_samples, generator, batch_size, window=prep.window,
                          overlap=overlap, blend=blend)


def sample_windows(model: Any, images: torch.Tensor, mode: str, num_samples: int, generator: torch.Generator,
                   batch_size: int, *, window: int, overlap: float = 0.25, blend: str = "gaussian") -> torch.Tensor:
    """:func:`~proseg.engine.evaluation.sample_volume` of ``images`` ``(D, C, H, W)`` (H, W >= ``window``) in
    windows of side ``window`` (:func:`~proseg.commands.preprocess.window_starts`), blended where they overlap
    with :func:`~proseg.commands.preprocess.blend_weight` (weighted mean of the probabilities).

    One latent draw per volume: the generator is rewound to its starting state before each window, and every
    window has the same shape, so every window draws the same random numbers: the image-global latents (ProSeg's
    tau, the Prob. U-Net's z ...) are shared by all windows and slices, and sample k of rater r is one coherent
    segmentation across windows. Each window's result is exactly what predicting that window alone with the same
    generator gives. Returns ``(R, K, D, H, W)`` / ``(K, D, H, W)`` as ``sample_volume``."""
    h, w = images.shape[-2:]
    ys, xs = window_starts(h, window, overlap), window_starts(w, window, overlap)
    start = generator.get_state()
    if len(ys) == 1 and len(xs) == 1:
        return sample_volume(model, images[..., :window, :window], mode, num_samples, generator, batch_size)
    weight = blend_weight(window, blend).to(images.device)
    acc: torch.Tensor | None = None
    wsum = torch.zeros(h, w, device=images.device)
    for y in ys:
        for x in xs:
            generator.set_state(start)
            p = sample_volume(model, images[..., y : y + window, x : x + window], mode, num_samples, generator,
                              batch_size)
            if acc is None:
                acc = torch.zeros(*p.shape[:-2], h, w, device=p.device)
            acc[..., y : y + window, x : x + window] += p * weight
            wsum[y : y + window, x : x + window] += weight
    assert acc is not None
    return acc / wsum


def _window_record(prep: Prepared, window: int, overlap: float) -> dict[str, Any]:
    if prep.window is None:
        return {"used": False, "note": f"the input ({prep.hw[0]} x {prep.hw[1]} after crop/resampling) fits in one "
                                       f"{window} x {window} training window: padded and resized as without "
                                       "--sliding-window"}
    h, w = prep.image.shape[-2:]
    return {"used": True, "windows": len(window_starts(h, window, overlap)) * len(window_starts(w, window, overlap))}


def predict_path(checkpoint: str | os.PathLike[str], input_path: str | os.PathLike[str],
                 output: str | os.PathLike[str], *, num_samples: int = 16, seed: int = 0, save_samples: bool = False,
                 threshold: float = 0.5, force: bool = False, device: str = "auto",
                 batch_size: int = 32, progress: bool = False, intensity: str | None = None,
                 window: str | Sequence[float] | None = None, percentiles: str | Sequence[float] | None = None,
                 roi: str | Sequence[int] | None = None, resample: bool = False,
                 spacing: str | Sequence[float] | None = None, sliding_window: bool = False,
                 overlap: float | None = None, blend: str | None = None,
                 model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict every input under ``input_path`` into ``output`` (a folder); returns the report dict.

    ``model_args``: inference-time model arguments (the class's ``INFERENCE_ARGS``, e.g. ProSeg's ``diverse_mode``
    or ``z_temperature``) that replace the checkpoint's for this prediction.

    ``resample``: resample NIfTI inputs to ``spacing`` (mm), by default the training data's recorded voxel size.
    ``sliding_window``: predict inputs larger than the training size in windows of that size (``overlap``: fraction
    shared by neighbours, default 0.25; ``blend``: ``gaussian`` (default) or ``uniform`` weights) instead of
    shrinking them to it.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. ``progress``: show the inputs done
    on stderr (:mod:`proseg.progress`; a folder of several inputs only)."""
    inp, out = Path(input_path), Path(output)
    _check_options(out, force=force, threshold=threshold, num_samples=num_samples)
    override = intensity_from_options(intensity, window, percentiles, default=None)
    roi_box = _parse_ints(roi, "--roi", 4)
    ckpt_dir = resolve_checkpoint(checkpoint)
    files = list_inputs(inp)
    device = str(resolve_device(device, env_dist_info(), key="--device"))
    # validates model.json and the weights, eval mode
    model = load_model(ckpt_dir, map_location=device, inference_args=model_args)
    meta = read_model_meta(ckpt_dir)
    dataset = meta.get("dataset") or {}
    prep_meta = dataset.get("preprocessing") or {}
    target_spacing = _target_spacing(prep_meta, resample, spacing)
    window, overlap, blend = _window_options(prep_meta, sliding_window, overlap, blend)
    model.to(device)
    rater_names = _rater_names(dataset, model.num_raters)
    notes = _notes(model, meta, prep_meta, override)
    check_writable(out)
    report: dict[str, Any] = {"checkpoint": str(ckpt_dir), "checkpoint_sha256": sha256_file(ckpt_dir / WEIGHTS_NAME),
                              "model": meta["model"], "model_args": dict(model_args or {}),
                              "num_samples": num_samples, "seed": seed,
                              "threshold": threshold, "notes": notes, "inputs": {},
                              "roi": list(roi_box) if roi_box else None,
                              "spacing": list(target_spacing) if target_spacing else None,
                              "sliding_window": None if window is None else {"window": window, "overlap": overlap,
                                                                              "blend": blend},
                              "png_scale": "probabilities and masks x255, variances x1020 (8-bit)"}
    with staged_dir(out) as tmp:
        single = inp.is_file()
        bar = Progress(len(files), "predict", "input", enabled=progress and len(files) > 1)
        for f in files:
            case = read_input(f)
            maps = predict_case(model, case, prep_meta, num_samples=num_samples, seed=seed, batch_size=batch_size,
                                threshold=threshold, intensity=override, roi=roi_box, spacing=target_spacing,
                                window=window, overlap=overlap, blend=blend)
            applied = maps.pop("_intensity", None)
            windows = maps.pop("_windows", None)
            dest = tmp if single else tmp / stem(f)
            written = write_case(case, maps, dest, rater_names, save_samples)
            report["inputs"][str(f)] = {"output": str(out if single else out / stem(f)), "files": written,
                                        "intensity": applied,
                                        **({"sliding_window": windows} if windows is not None else {})}
            bar.update(1)
        bar.close()
        (tmp / "prediction.json").write_text(dumps(report, indent=2) + "\n")
    return report


def _check_options(out: Path, *, force: bool, threshold: float, num_samples: int) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (use --force to replace it)")
    if not 0.0 < threshold < 1.0:
        raise CommandError(f"--threshold must lie in (0, 1), got {threshold}")
    if num_samples < 1:
        raise CommandError(f"--samples must be >= 1, got {num_samples}")


def _rater_names(dataset: dict[str, Any], num_raters: int) -> list[str]:
    """The dataset's rater names as the checkpoint records them; their indices when missing or not matching."""
    names = list(dataset.get("rater_names") or [f"{r}" for r in range(num_raters)])
    return names if len(names) == num_raters else [f"{r}" for r in range(num_raters)]


def _parse_ints(text: str | Sequence[int] | None, option: str, n: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(v) for v in text]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise CommandError(f"{option} takes {n} integers y0,x0,h,w (e.g. {option} 0,0,64,64), got {text!r}")
    return vals


def _target_spacing(prep_meta: dict[str, Any], resample: bool,
                    spacing: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """The voxel size (mm, x, y[, z]) inputs are resampled to: ``--spacing``, else the training data's."""
    if not resample:
        if spacing is not None:
            raise CommandError("--spacing is the voxel size --resample resamples to; pass --resample as well")
        return None
    if spacing is None:
        recorded = prep_meta.get("spacing")
        if isinstance(recorded, dict):
            recorded = recorded.get("nifti_xyz")
        if not recorded:
            raise CommandError("--resample: the checkpoint records no voxel size of its training data; pass "
                               "--spacing X,Y[,Z] (mm) as well")
        spacing = [float(v) for v in recorded]
    parts = [p.strip() for p in spacing.split(",")] if isinstance(spacing, str) else [str(v) for v in spacing]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) not in (2, 3) or not all(np.isfinite(v) and v > 0 for v in vals):
        raise CommandError(f"--spacing takes 2 or 3 positive voxel sizes in mm (x,y[,z]), got {spacing!r}")
    return vals


def _window_options(prep_meta: dict[str, Any], sliding_window: bool, overlap: float | None,
                    blend: str | None) -> tuple[int | None, float, str]:
    """``(window side or None, overlap, blend)`` of ``--sliding-window`` / ``--overlap`` / ``--blend``."""
    if not sliding_window:
        if overlap is not None or blend is not None:
            raise CommandError("--overlap and --blend set up --sliding-window; pass --sliding-window as well")
        return None, 0.25, "gaussian"
    overlap = 0.25 if overlap is None else float(overlap)
    blend = blend or "gaussian"
    if not 0.0 <= overlap < 1.0:
        raise CommandError(f"--overlap must lie in [0, 1) (a fraction of the window), got {overlap}")
    if blend not in BLENDS:
        raise CommandError(f"--blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    size = prep_meta.get("target_size")
    if not size:
        raise CommandError("--sliding-window: the checkpoint records no training image size (its dataset was "
                           "prepared without --size), so there is no window size; predict without --sliding-window")
    return int(size), overlap, blend


def _notes(model: MultiRaterModel, meta: dict[str, Any], prep_meta: dict[str, Any],
           override: Intensity | None = None) -> list[str]:
    notes: list[str] = []
    trained = Intensity.from_record(prep_meta.get("intensity"))
    if override is not None and trained is not None and override.mode != "auto":
        same_range = (override.mode in UNIT_RANGE_MODES) == (trained.mode in UNIT_RANGE_MODES) and (
            override.mode in UNIT_RANGE_MODES or override.mode == trained.mode)
        if not same_range:
            notes.append(f"inputs are mapped with '{override.describe()}', but the checkpoint's training data was "
                         f"'{trained.describe()}': the model sees another intensity range than it was trained on")
    if not supports(model, "personalized"):
        notes.append(f"{meta['model']['name']} has no personalized (per-rater) output: per-rater maps and the "
                     "rater/ambiguity split of the uncertainty are not written; mean and uncertainty_total come "
                     "from its diverse samples")
    if not prep_meta:
        notes.append("the checkpoint records no preprocessing: inputs are used at their own size with the 'auto' "
                     "intensity scaling")
    return notes
