"""Multi-rater segmentation metrics: GED (V/U), Dice_soft, Dice_max (both ways), Dice_match, per-rater Dice,
CIMD's CI score and PHiSeg's S_NCC, with explicit empty-mask conventions; the diversity ratio, pixel variances,
ambiguity share and calibration (Brier, ECE) of the soft mean; plus dataset-level aggregation.

See ``docs/metrics.md`` for every definition and the quirks of the published reference code.
"""

from proseg.metrics.aggregate import aggregate, format_summary, write_records_csv, write_summary_csv
from proseg.metrics.calibration import Calibration, ambiguity_share, calibration, diversity_ratio, pixel_variances
from proseg.metrics.case import RECORD_KEYS, batch_case_metrics, case_metrics
from proseg.metrics.ci import CIScore, ci_score
from proseg.metrics.dice import DEFAULT_THRESHOLDS, dice_match, dice_matrix, dice_max, dice_soft
from proseg.metrics.ged import ESTIMATORS, GEDTerms, generalized_energy_distance
from proseg.metrics.ncc import s_ncc
from proseg.metrics.pairwise import CONVENTIONS, pairwise_dice, pairwise_iou

__all__ = [
    "CONVENTIONS",
    "DEFAULT_THRESHOLDS",
    "ESTIMATORS",
    "RECORD_KEYS",
    "CIScore",
    "Calibration",
    "GEDTerms",
    "aggregate",
    "ambiguity_share",
    "batch_case_metrics",
    "calibration",
    "case_metrics",
    "ci_score",
    "dice_match",
    "dice_matrix",
    "dice_max",
    "dice_soft",
    "diversity_ratio",
    "format_summary",
    "generalized_energy_distance",
    "pairwise_dice",
    "pairwise_iou",
    "pixel_variances",
    "s_ncc",
    "write_records_csv",
    "write_summary_csv",
]
