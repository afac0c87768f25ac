"""The small API every proseg model exposes, and weight save/load (safetensors + JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from proseg.fsutil import atomic_write_bytes

Batch = dict[str, Tensor]


class NotSupportedError(NotImplementedError):
    """The model has no notion of the requested output (e.g. a personalized sample from Prob. U-Net)."""


class MultiRaterModel(nn.Module):
    """Base class of every registered model.

    Conventions shared by all models:
        * ``batch["image"]``: ``(B, C, H, W)`` float; ``batch["masks"]``: ``(B, R, H, W)`` float in {0, 1};
          ``batch["rater_present"]``: ``(B, R)`` bool. A rater that is absent for a case contributes nothing
          to the loss (not even as an empty mask).
        * Outputs of the sampling calls are foreground **probabilities** in [0, 1] (sigmoid or softmax of
          the logits), on the input's device and dtype.
        * Randomness only from the ``generator`` argument (or the global RNG when it is None), so two calls
          with equally seeded generators return identical tensors.
        * ``share_latent=True`` draws each image-global latent (ProSeg's tau, Prob. U-Net's z ...) once per
          (rater, sample) and shares it across the batch dimension: the batch is then the slices of one
          volume, predicted slice by slice with one latent per volume. Pixel-wise latents stay per slice.
        * No Python loop over the batch or over raters; per-rater modules are batched modules that run for
          all raters, so every parameter receives a gradient each step (DDP without unused parameters).
    """

    model_name: str = ""
    #: whether :meth:`sample_personalized` / :meth:`sample_diverse` are implemented (else NotSupportedError)
    supports_personalized: bool = False
    supports_diverse: bool = False
    PRESETS: dict[str, dict[str, Any]] = {"default": {}}
    init_config: dict[str, Any]

    def __init__(self, in_channels: int, num_raters: int) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_raters < 1:
            raise ValueError(f"num_raters must be >= 1, got {num_raters}")
        self.in_channels = in_channels
        self.num_raters = num_raters

    # --- the API -------------------------------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training objective. Returns ``{"loss": scalar, <term>: scalar, ...}`` (terms detached or not).

        All randomness of the step (latent draws, the rater chosen per image) comes from ``generator``, or from
        the global RNG when it is None, so a seeded generator makes the loss reproducible.
        """
        raise NotImplementedError

    def sample_personalized(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """What each rater would draw: ``(B, R, K, H, W)`` probabilities for ``images`` ``(B, C, H, W)``."""
        raise NotSupportedError(f"{type(self).__name__} has no per-rater (personalized) output")

    def sample_diverse(
        self,
        images: Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        share_latent: bool = False,
    ) -> Tensor:
        """The population of plausible segmentations: ``(B, K, H, W)`` probabilities."""
        raise NotSupportedError(f"{type(self).__name__} has no diverse (population) output")

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups. Models whose latent tables use another learning rate override this."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay}]

    # --- helpers for subclasses ----------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(images.shape)}"
            )

    def _check_batch(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        for key in ("image", "masks"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batch)})")
        image, masks = batch["image"], batch["masks"]
        self._check_images(image)
        if masks.ndim != 4 or masks.shape[0] != image.shape[0] or masks.shape[1] != self.num_raters \
                or masks.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"masks must be (B, R={self.num_raters}, H, W) matching image {tuple(image.shape)}, "
                f"got {tuple(masks.shape)}"
            )
        present = batch.get("rater_present")
        if present is None:
            present = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        return image, masks.to(image.dtype), present.to(torch.bool)


# --- weights: safetensors + JSON, loadable without the training code -----------------------------------
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"


def save_model(model: nn.Module, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (the ``create_model`` config) into ``directory``.

    Both files are written atomically (temp file, fsync, rename). ``extra`` is stored in the JSON too
    (e.g. the proseg version, the training step). Returns the directory.
    """
    from safetensors.torch import save as st_save

    import proseg

    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    cfg = getattr(model, "init_config", None)
    if cfg is None:
        raise ValueError("model has no init_config: build it with proseg.models.create_model")
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, st_save(state))
    meta = {"model": cfg, "proseg_version": proseg.__version__, **(extra or {})}
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True).encode())
    return directory


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> MultiRaterModel:
    """Rebuild a model from a directory holding ``model.json`` + ``model.safetensors`` (strict load)."""
    from safetensors.torch import load_file

    from proseg.models.registry import create_model

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    cfg_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a proseg checkpoint directory holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}")
    try:
        meta = json.loads(cfg_file.read_text())
        cfg = dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{cfg_file}: not a proseg model config ({exc})") from exc
    model = create_model(**cfg)
    state = load_file(str(weights_file), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_file}: weights do not match the {cfg['name']!r} architecture in {cfg_file} "
                         f"(missing keys: {missing[:5]}, unexpected keys: {unexpected[:5]})")
    return model  # type: ignore[return-value]
