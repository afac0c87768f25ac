"""proseg: probabilistic multi-rater medical image segmentation.

ProSeg (two latent variables: rater preference tau and boundary ambiguity Z) and the baselines it is
judged against, behind one model API; the field's metrics with explicit conventions; loaders for the
real multi-rater formats; a CLI (`proseg prepare|info|train|evaluate|predict|score|demo`).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
