"""Validation and flattening of one case (or a batch of cases) for the metrics.

Shapes: labels ``(N, *S)`` binary (``N`` raters), predictions ``(M, *S)`` probabilities in ``[0, 1]`` or
binary (``M`` samples), ``*S`` = ``(H, W)`` or ``(D, H, W)``. Batched: ``(B, N, *S)`` and ``(B, M, *S)``.
NumPy arrays and torch tensors are accepted; the computation follows the input's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from proseg.errors import NonFiniteInputError
from proseg.metrics.pairwise import as_counting

# Predictions are binarised with a strict ">" at this value for IoU/Dice/CI (as the published code does).
BINARIZE_THRESHOLD = 0.5


def to_tensor(x: object, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """NumPy array / torch tensor / nested list -> tensor (no copy when already a tensor on ``device``)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype == object:
            raise ValueError(f"{name}: object arrays are not supported")
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: cannot convert {type(x).__name__} to a tensor") from err
    if device is not None:
        t = t.to(device)
    return t


def _check_values(labels: torch.Tensor, preds: torch.Tensor) -> None:
    if labels.dtype != torch.bool:
        if labels.is_complex():
            raise ValueError("labels: complex values are not supported")
        bad = ~((labels == 0) | (labels == 1))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be binary (0/1 or bool); found other values, e.g. {labels[bad].flatten()[:3].tolist()}"
            )
    if preds.dtype != torch.bool:
        if preds.is_complex():
            raise ValueError("preds: complex values are not supported")
        lo_t, hi_t = torch.aminmax(preds)  # one pass; NaN propagates into both
        lo, hi = float(lo_t), float(hi_t)
        if lo != lo or hi != hi:
            raise NonFiniteInputError("preds contain NaN")
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"preds must be probabilities in [0, 1] or binary; found values in [{lo:g}, {hi:g}] "
                "(logits? apply a sigmoid first)"
            )


@dataclass(frozen=True)
class FlatCases:
    """Flattened, validated inputs. ``B`` is absent (no leading dim) for a single case.

    Attributes:
        labels: ``([B,] N, P)`` 0/1 floats in an exact counting dtype.
        preds_binary: ``([B,] M, P)`` predictions ``> 0.5`` as 0/1 floats, same dtype as ``labels``.
        preds_soft: ``([B,] M, P)`` the predictions as floats (float32 or float64, as given).
        spatial_shape: ``*S``.
    """

    labels: torch.Tensor
    preds_binary: torch.Tensor
    preds_soft: torch.Tensor
    spatial_shape: tuple[int, ...]

    @property
    def num_labels(self) -> int:
        return int(self.labels.shape[-2])

    @property
    def num_predictions(self) -> int:
        return int(self.preds_soft.shape[-2])


def flatten_cases(labels: object, preds: object, *, batched: bool = False) -> FlatCases:
    """Validate shapes and values, then flatten the spatial dims.

    Args:
        labels: ``(N, *S)`` (or ``(B, N, *S)`` when ``batched``) binary masks.
        preds: ``(M, *S)`` (or ``(B, M, *S)``) probabilities in ``[0, 1]`` or binary masks.
        batched: whether a leading case dimension is present.

    Raises:
        ValueError: wrong number of dims, spatial shape mismatch, empty sets, non-binary labels,
            predictions outside ``[0, 1]``.
    """
    lab = to_tensor(labels, "labels")
    prd = to_tensor(preds, "preds", device=lab.device)
    lead = 2 if batched else 1
    for name, t in (("labels", lab), ("preds", prd)):
        nd = t.dim() - lead
        if nd not in (2, 3):
            want = "(B, N, H, W) or (B, N, D, H, W)" if batched else "(N, H, W) or (N, D, H, W)"
            raise ValueError(f"{name} must have shape {want}; got {tuple(t.shape)}")
    if lab.shape[lead:] != prd.shape[lead:] or (batched and lab.shape[0] != prd.shape[0]):
        raise ValueError(
            f"labels {tuple(lab.shape)} and preds {tuple(prd.shape)} do not match: they must share "
            + ("the case dim and " if batched else "")
            + "the spatial shape *S"
        )
    if lab.shape[lead - 1] == 0 or prd.shape[lead - 1] == 0:
        raise ValueError(
            f"need at least one label and one prediction; got labels {tuple(lab.shape)}, preds {tuple(prd.shape)}"
        )
    _check_values(lab, prd)
    spatial = tuple(int(s) for s in lab.shape[lead:])
    flat_l = lab.reshape(*lab.shape[:lead], -1)
    flat_p = prd.reshape(*prd.shape[:lead], -1)
    soft = flat_p if flat_p.dtype in (torch.float32, torch.float64) else flat_p.to(torch.float32)
    labels01 = as_counting(flat_l)
    preds01 = (soft > BINARIZE_THRESHOLD).to(labels01.dtype)
    return FlatCases(labels=labels01, preds_binary=preds01, preds_soft=soft, spatial_shape=spatial)
