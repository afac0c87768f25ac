"""Closed-form KL divergences used by the latent-variable models."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gaussian_kl(
    mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor | float = 0.0, logvar_p: Tensor | float = 0.0
) -> Tensor:
    """Element-wise KL( N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p)) ) for diagonal Gaussians.

    ``0.5 * (logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1)``.
    Shapes broadcast; the result has the broadcast shape (sum or average it yourself).
    """
    mu_p_t = torch.as_tensor(mu_p, dtype=mu_q.dtype, device=mu_q.device)
    logvar_p_t = torch.as_tensor(logvar_p, dtype=mu_q.dtype, device=mu_q.device)
    return 0.5 * (logvar_p_t - logvar_q + (logvar_q.exp() + (mu_q - mu_p_t) ** 2) / logvar_p_t.exp() - 1.0)


def dirichlet_kl(alpha_q: Tensor, alpha_p: Tensor | float) -> Tensor:
    """KL( Dir(alpha_q) || Dir(alpha_p) ) over the last dimension.

    Args:
        alpha_q: ``(..., D)`` positive concentrations; alpha_p: ``(..., D)`` or a scalar (symmetric prior).

    Returns:
        ``(...)``: ``lnG(a0) - sum lnG(a) - lnG(b0) + sum lnG(b) + sum (a - b)(psi(a) - psi(a0))``.
    """
    alpha_p_t = torch.as_tensor(alpha_p, dtype=alpha_q.dtype, device=alpha_q.device).expand_as(alpha_q)
    a0 = alpha_q.sum(-1)
    b0 = alpha_p_t.sum(-1)
    return (
        torch.lgamma(a0)
        - torch.lgamma(alpha_q).sum(-1)
        - torch.lgamma(b0)
        + torch.lgamma(alpha_p_t).sum(-1)
        + ((alpha_q - alpha_p_t) * (torch.digamma(alpha_q) - torch.digamma(a0)[..., None])).sum(-1)
    )


def log_variance(variance: float) -> float:
    """Log of a prior variance, with a clear error for non-positive values."""
    if variance <= 0:
        raise ValueError(f"a prior variance must be > 0, got {variance}")
    return math.log(variance)


def full_gaussian_kl_isotropic(mu: Tensor, scale_tril: Tensor, prior_std: float) -> Tensor:
    """KL( N(mu, L L^T) || N(0, prior_std^2 I) ) in closed form (Pionono's KL).

    Args:
        mu: ``(..., D)`` means; scale_tril: ``(..., D, D)`` lower-triangular ``L`` with a positive diagonal.
        prior_std: the prior's standard deviation ``s`` (> 0).

    Returns:
        ``(...)``: ``0.5 * (||L||_F^2 / s^2 + ||mu||^2 / s^2 - D + D log s^2 - 2 sum_i log L_ii)``.
    """
    if prior_std <= 0:
        raise ValueError(f"prior_std must be > 0, got {prior_std}")
    d = mu.shape[-1]
    var_p = prior_std**2
    trace_term = scale_tril.pow(2).sum((-2, -1)) / var_p
    mahalanobis = mu.pow(2).sum(-1) / var_p
    logdet_q = 2.0 * torch.diagonal(scale_tril, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace_term + mahalanobis - d + d * math.log(var_p) - logdet_q)
