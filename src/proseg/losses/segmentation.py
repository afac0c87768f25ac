"""Segmentation losses on foreground logits, with per-sample weights so absent raters contribute nothing, and the
registry of their names (``seg_loss=...`` of the models): :func:`list_losses`, :func:`get_loss`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from proseg.errors import ConfigError
from proseg.losses.reduce import weighted_mean

#: ``fn(logits (S, *spatial), target (S, *spatial), weight (S,) or None) -> scalar``
SegmentationLoss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def generalized_dice_loss(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    pooled: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Generalized Dice loss (Sudre et al. 2017) of a sigmoid foreground, with foreground and background
    as the two classes and inverse-squared-volume class weights, as in the ProSeg/D-Persona/Pionono code.

    Args:
        logits: ``(S, *spatial)`` foreground logits for S (image, rater) pairs.
        target: ``(S, *spatial)`` binary targets (float or bool).
        weight: ``(S,)`` non-negative per-pair weights; 0 removes a pair entirely (an absent rater). None = 1.
        pooled: True pools all pairs into one volume before computing the class weights and the Dice (the
            reference code flattens the whole batch); False computes one loss per pair and averages them
            with ``weight``.
        eps: clamp for the squared volumes and the denominator (the reference's 1e-6).

    Returns:
        A scalar: ``1 - mean_c(2 * w_c * sum(p_c t_c) / (w_c * sum(p_c + t_c)))`` over the two classes.
        With every weight 0 the loss is 0 (nothing to learn from).
    """
    prob = torch.sigmoid(_flat(logits).float())
    tgt = _flat(target).to(prob.dtype)
    w = torch.ones(prob.shape[0], dtype=prob.dtype, device=prob.device) if weight is None else weight.to(prob.dtype)
    w = w[:, None]
    probs = torch.stack([prob, 1.0 - prob])  # (2, S, P): foreground, background
    tgts = torch.stack([tgt, 1.0 - tgt])
    dims: tuple[int, ...] = (1, 2) if pooled else (2,)
    vol = (tgts * w).sum(dims)
    class_w = 1.0 / (vol * vol).clamp(min=eps)
    inter = (probs * tgts * w).sum(dims) * class_w
    denom = ((probs + tgts) * w).sum(dims) * class_w
    dice = 2.0 * inter / denom.clamp(min=eps)  # (2,) pooled or (2, S) per pair
    loss = 1.0 - dice.mean(0)
    if pooled:
        return loss * (w.sum() > 0).to(loss.dtype)
    return weighted_mean(loss, w[:, 0])


def bce_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits, mean over pixels, weighted mean over the S pairs.

    Args:
        logits, target: ``(S, *spatial)``; weight: ``(S,)`` (0 = absent rater) or None.
    """
    per_pair = F.binary_cross_entropy_with_logits(
        _flat(logits).float(), _flat(target).float(), reduction="none"
    ).mean(1)
    if weight is None:
        return per_pair.mean()
    return weighted_mean(per_pair, weight.to(per_pair.dtype))


def mask_channel_dice_loss(probs: Tensor, target: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Per-channel foreground soft Dice loss pooled over the batch, as the reference ``GeneralizedDiceLoss``
    on inputs with more than one channel (D-Persona's bound loss and its stage-2 loss).

    With several channels the reference keeps only the foreground of each channel and its inverse-squared
    volume weights cancel between numerator and denominator, so each channel c scores
    ``2 * sum_b w_bc sum_p p t / sum_b w_bc sum_p (p + t)`` (denominator clamped at ``eps`` times its weight).

    Args:
        probs: ``(B, C, *spatial)`` probabilities in [0, 1]; target: same shape, binary.
        weight: ``(B, C)`` or ``(B,)`` non-negative pair weights (0 = absent); None = 1.

    Returns:
        ``1 - mean_c dice_c`` over the channels with any weight (0 when no channel has any). A channel whose
        target and prediction are both empty scores 0 (the reference has no empty-mask rule: this is its
        behaviour), so the minimum 0 needs non-empty targets.
    """
    p = probs.flatten(2).float()
    t = target.flatten(2).to(p.dtype)
    if weight is None:
        w = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device)
    else:
        w = weight.to(p.dtype)
        if w.ndim == 1:
            w = w[:, None].expand(p.shape[0], p.shape[1])
    inter = ((p * t).sum(-1) * w).sum(0)  # (C,)
    vol = (t.sum(-1) * w).sum(0)
    class_w = 1.0 / (vol * vol).clamp(min=eps)
    denom = (((p + t).sum(-1) * w).sum(0) * class_w).clamp(min=eps)
    dice = 2.0 * inter * class_w / denom
    used = (w.sum(0) > 0).to(p.dtype)
    return (used * (1.0 - dice)).sum() / used.sum().clamp(min=1.0)


# --- the registry of segmentation-loss names --------------------------------------------------------------------


def _gdl(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    return generalized_dice_loss(logits, target, weight, pooled=True)


def _gdl_per_sample(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    return generalized_dice_loss(logits, target, weight, pooled=False)


def _gdl_bce(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    return generalized_dice_loss(logits, target, weight, pooled=True) + bce_loss(logits, target, weight)


_LOSSES: dict[str, SegmentationLoss] = {
    "gdl": _gdl,  # pooled generalized Dice, the reference
    "gdl_per_sample": _gdl_per_sample,
    "bce": bce_loss,
    "gdl+bce": _gdl_bce,
}


def list_losses() -> list[str]:
    """The segmentation-loss names the models accept (``seg_loss=...``), sorted."""
    return sorted(_LOSSES)


def get_loss(name: str, key: str = "seg_loss") -> SegmentationLoss:
    """The loss called ``name``: ``fn(logits, target, weight=None) -> scalar``.

    Raises:
        ConfigError: an unknown name; the message names ``key`` (the option it came from) and lists the names.
    """
    fn = _LOSSES.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ConfigError(f"unknown {key} {name!r}; segmentation losses: {', '.join(list_losses())}")
    return fn


def segmentation_loss(kind: str, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """The loss called ``kind`` (:func:`list_losses`: ``"gdl"`` pooled generalized Dice, the reference,
    ``"gdl_per_sample"``, ``"bce"``, ``"gdl+bce"``) of ``logits`` against ``target`` with pair weights ``weight``."""
    return get_loss(kind)(logits, target, weight)
