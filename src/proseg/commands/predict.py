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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proseg.commands.inputs import InputCase, list_inputs, read_input, stem
from proseg.commands.outputs import write_case
from proseg.commands.preprocess import preprocess, unprocess
from proseg.engine.checkpoint import resolve_checkpoint
from proseg.engine.evaluation import case_generator, sample_volume, supports
from proseg.errors import CommandError, DataError
from proseg.fsutil import check_writable, sha256_file, staged_dir
from proseg.jsonio import dumps
from proseg.metrics.uncertainty import diverse_uncertainty, uncertainty_maps
from proseg.models import load_model
from proseg.models.base import WEIGHTS_NAME, MultiRaterModel, read_model_meta


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


def predict_path(checkpoint: str | os.PathLike[str], input_path: str | os.PathLike[str],
                 output: str | os.PathLike[str], *, num_samples: int = 16, seed: int = 0, save_samples: bool = False,
                 threshold: float = 0.5, force: bool = False, device: str = "cpu",
                 batch_size: int = 32) -> dict[str, Any]:
    """Predict every input under ``input_path`` into ``output`` (a folder); returns the report dict."""
    inp, out = Path(input_path), Path(output)
    _check_options(out, force=force, threshold=threshold, num_samples=num_samples)
    ckpt_dir = resolve_checkpoint(checkpoint)
    files = list_inputs(inp)
    model = load_model(ckpt_dir, map_location=device)  # validates model.json and the weights, eval mode
    meta = read_model_meta(ckpt_dir)
    dataset = meta.get("dataset") or {}
    prep_meta = dataset.get("preprocessing") or {}
    model.to(device)
    rater_names = _rater_names(dataset, model.num_raters)
    notes = _notes(model, meta, prep_meta)
    check_writable(out)
    report: dict[str, Any] = {"checkpoint": str(ckpt_dir), "checkpoint_sha256": sha256_file(ckpt_dir / WEIGHTS_NAME),
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


def _notes(model: MultiRaterModel, meta: dict[str, Any], prep_meta: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    if not supports(model, "personalized"):
        notes.append(f"{meta['model']['name']} has no personalized (per-rater) output: per-rater maps and the "
                     "rater/ambiguity split of the uncertainty are not written; mean and uncertainty_total come "
                     "from its diverse samples")
    if not prep_meta:
        notes.append("the checkpoint records no preprocessing: inputs are used at their own size with the 'auto' "
                     "intensity scaling")
    return notes
