"""Losses (functional, shape-documented): segmentation terms, the registry of their names, closed-form KL
divergences, the energy score of sampled masks, and the weighted mean over (image, rater) pairs that every term uses."""

from proseg.losses.energy import energy_score
from proseg.losses.kl import dirichlet_kl, full_gaussian_kl_isotropic, gaussian_kl, log_variance
from proseg.losses.reduce import weighted_mean
from proseg.losses.segmentation import (
    bce_loss,
    generalized_dice_loss,
    get_loss,
    list_losses,
    mask_channel_dice_loss,
    segmentation_loss,
)

__all__ = [
    "bce_loss",
    "dirichlet_kl",
    "energy_score",
    "full_gaussian_kl_isotropic",
    "gaussian_kl",
    "generalized_dice_loss",
    "get_loss",
    "list_losses",
    "log_variance",
    "mask_channel_dice_loss",
    "segmentation_loss",
    "weighted_mean",
]
