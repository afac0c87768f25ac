"""Models: ProSeg and its baselines behind one API (see :class:`proseg.models.base.MultiRaterModel`).

Importing this package registers every built-in model; build one with :func:`create_model`.
"""

from proseg.models.base import MultiRaterModel, NotSupportedError, load_model, save_model
from proseg.models.registry import create_model, get_model_class, list_models, register_model

# Built-in models register themselves on import (one module per model; add new ones here).
from proseg.models import confusion  # noqa: F401  # isort: skip
from proseg.models import pionono  # noqa: F401  # isort: skip
from proseg.models import prob_unet  # noqa: F401  # isort: skip
from proseg.models import phiseg  # noqa: F401  # isort: skip
from proseg.models import dpersona  # noqa: F401  # isort: skip
from proseg.models import proseg  # noqa: F401  # isort: skip

__all__ = [
    "MultiRaterModel",
    "NotSupportedError",
    "create_model",
    "get_model_class",
    "list_models",
    "load_model",
    "register_model",
    "save_model",
]
