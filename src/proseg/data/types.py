"""The data model shared by every reader, the canonical store and the training Dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from proseg.errors import DataError

__all__ = ["DataError", "Sample"]


@dataclass
class Sample:
    """One multi-rater case as a reader yields it.

    Attributes:
        image: ``(C, H, W)`` float32 for 2D sources or ``(C, D, H, W)`` for volumes. Finite values only.
        masks: ``(R, H, W)`` bool (or ``(R, D, H, W)``): rater ``r``'s foreground. An all-False mask is a
            real annotation ("no lesion here"); a rater who did not annotate is marked in ``rater_present``.
        rater_present: ``(R,)`` bool. False means rater ``r`` did not annotate this case (missing, not
            empty); its mask is all-False and must contribute nothing to losses or metrics.
        case_id: unique within a source (e.g. ``LIDC-IDRI-0003/nodule-0/slice-12``).
        patient_id: the unit of every split (slices of one patient never straddle train and test).
        rater_names: ``R`` names (``mask-0`` ... for LIDC slots, ``seg01`` ... for QUBIQ).
        spacing: voxel size in mm, one value per spatial axis (``(sy, sx)`` or ``(sz, sy, sx)``).
        affine: the 4x4 NIfTI affine when the source has one, else None.
        source: the file or folder the case was read from (for error messages and the manifest).
    """

    image: np.ndarray
    masks: np.ndarray
    rater_present: np.ndarray
    case_id: str
    patient_id: str
    rater_names: list[str]
    spacing: tuple[float, ...] = ()
    affine: np.ndarray | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_raters(self) -> int:
        return int(self.masks.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.image.shape[0])

    @property
    def is_volume(self) -> bool:
        return self.image.ndim == 4


