"""Losses (functional, shape-documented): segmentation terms and closed-form KL divergences."""

from proseg.losses.kl import dirichlet_kl, gaussian_kl, log_variance
from proseg.losses.segmentation import bce_loss, generalized_dice_loss, segmentation_loss

__all__ = ["bce_loss", "dirichlet_kl", "gaussian_kl", "generalized_dice_loss", "log_variance", "segmentation_loss"]
