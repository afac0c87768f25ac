"""Learning-rate schedule and optimizer construction (nanoGPT style: the factor is recomputed every step)."""

from __future__ import annotations

import math
from typing import Any

import torch

from proseg.engine.config import OptimConfig


def lr_factor(step: int, total_steps: int, cfg: OptimConfig, progress: float | None = None) -> float:
    """Multiplier of each group's base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (from 1/warmup to 1), then ``cosine`` decay from 1 to ``min_lr_ratio``
    at the last step (or ``constant`` 1). ``progress`` in [0, 1] replaces the step-based position in the decay
    when given (the trainer passes the spent fraction of a wall-clock budget when that is further along).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps - 1, 1)
    t = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
    if progress is not None:
        t = min(max(t, progress), 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(model: Any, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam/AdamW over ``model.param_groups(lr, weight_decay)``; each group's ``base_lr`` is its initial lr."""
    groups = model.param_groups(cfg.lr, cfg.weight_decay)
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"{type(model).__name__}.param_groups lists a parameter twice")
            seen.add(id(p))
        g["base_lr"] = g.get("lr", cfg.lr)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"{type(model).__name__}.param_groups leaves out trainable parameters: {missing[:5]}")
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return cls(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to ``base_lr * factor``; returns the first group's lr (for logging)."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return float(optimizer.param_groups[0]["lr"])
