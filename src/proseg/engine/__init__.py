"""Engine: typed run configuration, the Trainer (DDP under torchrun), checkpoints, the evaluation loop.

See ``docs/engine.md``. Submodules: ``config`` (dataclasses, YAML + dotted overrides), ``trainer`` (the loop and
its extension hooks), ``checkpoint`` (run layout, atomic state files), ``data`` (what training and evaluation
read from a prepared store), ``types`` (``TrainData``, ``CaseData``), ``sampler``, ``schedule``, ``seeding``
(keyed randomness), ``distributed`` (every DDP collective), ``logger``, ``evaluation`` (per-case sampling and
scoring), ``compat`` (does a store match a checkpoint's training data). What ``proseg evaluate`` / ``predict`` /
``demo`` do lives in :mod:`proseg.commands`, above the engine; the error types in :mod:`proseg.errors`.
"""

from proseg.engine.config import Config, apply_overrides, load_config, validate_config
from proseg.engine.trainer import Trainer
from proseg.engine.types import CaseData, TrainData

__all__ = [
    "CaseData",
    "Config",
    "TrainData",
    "Trainer",
    "apply_overrides",
    "load_config",
    "validate_config",
]
