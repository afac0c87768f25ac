"""Segmentation losses on foreground logits, with per-sample weights so absent raters contribute nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    if pooled:
        dims: tuple[int, ...] = (1, 2)
    else:
        dims = (2,)
    vol = (tgts * w).sum(dims)
    class_w = 1.0 / (vol * vol).clamp(min=eps)
    inter = (probs * tgts * w).sum(dims) * class_w
    denom = ((probs + tgts) * w).sum(dims) * class_w
    dice = 2.0 * inter / denom.clamp(min=eps)  # (2,) pooled or (2, S) per pair
    loss = 1.0 - dice.mean(0)
    if pooled:
        return loss * (w.sum() > 0).to(loss.dtype)
    wsum = w[:, 0].sum()
    return (loss * w[:, 0]).sum() / wsum.clamp(min=1e-12)


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
    w = weight.to(per_pair.dtype)
    return (per_pair * w).sum() / w.sum().clamp(min=1e-12)


def segmentation_loss(kind: str, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Dispatch on ``kind``: ``"gdl"`` (pooled generalized Dice, the reference), ``"gdl_per_sample"``,
    ``"bce"``, or ``"gdl+bce"``."""
    if kind == "gdl":
        return generalized_dice_loss(logits, target, weight, pooled=True)
    if kind == "gdl_per_sample":
        return generalized_dice_loss(logits, target, weight, pooled=False)
    if kind == "bce":
        return bce_loss(logits, target, weight)
    if kind == "gdl+bce":
        return generalized_dice_loss(logits, target, weight, pooled=True) + bce_loss(logits, target, weight)
    raise ValueError(f"unknown segmentation loss {kind!r}; use gdl, gdl_per_sample, bce or gdl+bce")
