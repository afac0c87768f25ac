"""Learning-rate schedule and optimizer construction (nanoGPT style: the factor is recomputed every step)."""

from __future__ import annotations

import math
from typing import Any

import torch

from proseg.engine.config import OptimConfig, TrainConfig


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


def schedule_warnings(optim: OptimConfig, train: TrainConfig, total_steps: int, steps_per_epoch: int) -> list[str]:
    """What a run's schedule cannot do as configured, known before the first step (one message each).

    * ``warmup_steps`` >= the run's steps: the whole run is warm-up (no decay; ``optim.lr`` at the last step at best).
    * ``val_every`` larger than the epochs the run trains: it validates only once, at the end.

    A ``time_budget_s`` together with a ``cosine`` spanning more steps than the budget allows is *not* one of them:
    :func:`lr_factor` follows the larger of the step and the spent-time fraction, so the decay ends at whichever
    comes first. What a budget can cut is the (step-based) warm-up: the trainer checks that once it has timed a
    few steps (:func:`budget_warmup_warning`).
    """
    out: list[str] = []
    if optim.warmup_steps > 0 and optim.warmup_steps >= total_steps:
        tail = "" if optim.schedule == "constant" else " and never decays"
        out.append(f"optim.warmup_steps={optim.warmup_steps} >= the run's {total_steps} steps: the whole run is "
                   f"warm-up (the learning rate reaches optim.lr at the last step at best{tail}); lower "
                   f"optim.warmup_steps (e.g. {max(total_steps // 10, 1)})")
    epochs = math.ceil(total_steps / max(steps_per_epoch, 1))
    if train.val_every > 1 and train.val_every > epochs:
        out.append(f"train.val_every={train.val_every} > the {epochs} epoch(s) the run trains: it validates (and "
                   f"selects checkpoints/best) only once, at the end; lower train.val_every")
    return out


def budget_warmup_warning(optim: OptimConfig, budget_s: float, step: int, elapsed_s: float) -> str | None:
    """A message when, at the pace so far (``step`` steps in ``elapsed_s`` seconds), ``time_budget_s`` ends the run
    before the warm-up is over (the learning rate would still be rising at the end), else None."""
    if budget_s <= 0 or optim.warmup_steps <= 0 or step <= 0 or elapsed_s <= 0:
        return None
    reachable = int(step * budget_s / elapsed_s)
    if reachable >= optim.warmup_steps:
        return None
    return (f"at {elapsed_s / step:.2g} s per step, train.time_budget_s={budget_s:g} ends the run near step "
            f"{reachable}, before optim.warmup_steps={optim.warmup_steps} is over: the learning rate never reaches "
            f"optim.lr; lower optim.warmup_steps (e.g. {max(reachable // 10, 1)})")


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
