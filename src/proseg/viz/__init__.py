"""Figures: per-case grids of image, rater masks, per-rater predictions, diverse samples, mean, uncertainty."""

from proseg.viz.figures import case_figure

__all__ = ["case_figure"]
