"""Engine: typed run configuration, the Trainer (DDP under torchrun), checkpoints, evaluation, prediction.

See ``docs/engine.md``. Submodules: ``config`` (dataclasses, YAML + dotted overrides), ``trainer``,
``checkpoint`` (run layout, atomic state files), ``sampler``, ``schedule``, ``distributed``, ``evaluation``
(per-case sampling and scoring), ``evaluate`` (``proseg evaluate``), ``prediction`` (``proseg predict``),
``uncertainty`` (law-of-total-variance maps), ``demo`` (``proseg demo``).
"""

from proseg.engine.config import Config, ConfigError, apply_overrides, load_config, validate_config
from proseg.engine.evaluate import evaluate_checkpoint
from proseg.engine.prediction import predict_path
from proseg.engine.trainer import NonFiniteLossError, TrainData, Trainer
from proseg.engine.uncertainty import diverse_uncertainty, uncertainty_maps

__all__ = [
    "Config",
    "ConfigError",
    "NonFiniteLossError",
    "TrainData",
    "Trainer",
    "apply_overrides",
    "diverse_uncertainty",
    "evaluate_checkpoint",
    "load_config",
    "predict_path",
    "uncertainty_maps",
    "validate_config",
]
