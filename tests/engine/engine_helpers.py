"""Test helpers: a tiny deterministic model (not registered) and in-memory data for trainer unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from typer.testing import CliRunner

from proseg.engine.types import CaseData, TrainData
from proseg.models.base import MultiRaterModel


class TinyConvModel(MultiRaterModel):
    """One 3x3 conv to R logit maps; a small keyed noise in the loss exercises the RNG handling.

    No BatchNorm, and the loss is a mean over samples, so a W-process DDP step equals a 1-process step at the
    same global batch up to float summation order.
    """

    supports_personalized = True
    supports_diverse = True

    def __init__(self, in_channels: int, num_raters: int, noise: float = 0.05) -> None:
        super().__init__(in_channels, num_raters)
        self.conv = nn.Conv2d(in_channels, num_raters, 3, padding=1)
        self.noise = noise
        self.init_config = {"name": "tiny_conv_test", "in_channels": in_channels, "num_raters": num_raters,
                            "preset": "default"}

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image, masks, present = self._check_batch(batch)
        logits = self.conv(image)
        logits = logits + self.noise * torch.randn_like(logits)
        bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean((2, 3))  # (B, R)
        w = present.to(bce.dtype)
        loss = ((bce * w).sum(1) / w.sum(1).clamp(min=1)).mean()
        return {"loss": loss, "bce": loss.detach()}

    def sample_personalized(self, images: Tensor, num_samples: int = 1, generator: torch.Generator | None = None,
                            share_latent: bool = False) -> Tensor:
        self._check_images(images)
        logits = self.conv(images)  # (B, R, H, W)
        b = 1 if share_latent else images.shape[0]
        z = torch.randn((b, self.num_raters, num_samples, 1, 1), generator=generator, device=images.device)
        return torch.sigmoid(logits[:, :, None] + z)

    def sample_diverse(self, images: Tensor, num_samples: int = 1, generator: torch.Generator | None = None,
                       share_latent: bool = False) -> Tensor:
        p = self.sample_personalized(images, num_samples, generator, share_latent)
        return p.mean(1)


class ArrayDataset(Dataset):
    def __init__(self, images: np.ndarray, masks: np.ndarray) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": torch.from_numpy(self.images[i]), "masks": torch.from_numpy(self.masks[i]).float(),
                "rater_present": torch.ones(self.masks.shape[1], dtype=torch.bool), "index": i}


def toy_data(n: int = 32, c: int = 1, r: int = 2, size: int = 16, seed: int = 0, val: int = 4) -> TrainData:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n + val, c, size, size)).astype(np.float32)
    base = images[:, :1] > 0.3
    masks = np.concatenate([np.roll(base, k, axis=-1) for k in range(r)], axis=1)  # (N, R, H, W)
    train = ArrayDataset(images[:n], masks[:n])

    def load_case(cid: str) -> CaseData:
        i = n + int(cid.split("-")[1])
        return CaseData(cid, images[i : i + 1], masks[i : i + 1], np.ones(r, bool))

    meta = {"in_channels": c, "num_raters": r, "rater_names": [f"r{k}" for k in range(r)],
            "manifest_sha256": None, "preprocessing": {}}
    return TrainData(train, [f"case-{k}" for k in range(val)], load_case, meta)


REPO = Path(__file__).resolve().parents[2]
TRAIN_FAST = ["train.batch_size=4", "train.log_every=1", "train.device=cpu", "train.val_every=1",
              "train.max_val_cases=2", "train.val_num_samples=2", "optim.warmup_steps=0", "data.num_workers=0",
              "model.preset=tiny"]


def cli(*args: str) -> object:
    """Run ``proseg ARGS`` in-process; returns the click Result (``exit_code``, ``output``, ``stderr``)."""
    from proseg.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args: str) -> object:
    res = cli(*args)
    assert res.exit_code == 0, res.output
    return res


def fails(*args: str, match: str) -> str:
    res = cli(*args)
    out = res.output + (getattr(res, "stderr", "") or "")
    assert res.exit_code == 2, out
    assert "error:" in out and match in out, out
    return out


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (float results can depend on the thread count, so a test that
    compares this process with a subprocess runs both with the same count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
