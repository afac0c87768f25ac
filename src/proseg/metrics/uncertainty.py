"""Pixel-wise uncertainty maps from personalized samples, by the law of total variance.

For probabilities ``p[r, k]`` (rater r, sample k) at a pixel, with population variances (``ddof=0``)::

    total     = Var_{r,k}(p)                       variance over all R*K samples
    rater     = Var_r( E_k[p] )                    variance of the per-rater means (raters disagree)
    ambiguity = E_r( Var_k(p) )                    mean of the within-rater variances (each rater is unsure)
    total     = rater + ambiguity                  (exactly, up to float rounding)

Only models with a personalized output have the split; for a diverse-only model the total variance over
its K samples is the one map (:func:`diverse_uncertainty`).
"""

from __future__ import annotations

from torch import Tensor


def uncertainty_maps(samples: Tensor) -> dict[str, Tensor]:
    """Law-of-total-variance maps.

    Args:
        samples: ``(R, K, *S)`` probabilities (R raters, K samples each, any spatial shape).
    Returns:
        ``{"mean": (*S), "rater_mean": (R, *S), "total": (*S), "rater": (*S), "ambiguity": (*S)}``, float.
    """
    if samples.ndim < 3:
        raise ValueError(f"samples must be (R, K, *S), got shape {tuple(samples.shape)}")
    x = samples.float()
    rater_mean = x.mean(dim=1)  # (R, *S)
    mean = rater_mean.mean(dim=0)
    within = x.var(dim=1, unbiased=False)  # (R, *S)
    total = x.flatten(0, 1).var(dim=0, unbiased=False)
    return {
        "mean": mean,
        "rater_mean": rater_mean,
        "total": total,
        "rater": rater_mean.var(dim=0, unbiased=False),
        "ambiguity": within.mean(dim=0),
    }


def diverse_uncertainty(samples: Tensor) -> dict[str, Tensor]:
    """``{"mean", "total"}`` over diverse samples ``(K, *S)`` (population variance)."""
    x = samples.float()
    return {"mean": x.mean(dim=0), "total": x.var(dim=0, unbiased=False)}
