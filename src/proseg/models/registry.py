"""Model registry in the spirit of timm ``_registry.py``: ``@register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from proseg.errors import ConfigError


class UnknownNameError(ConfigError, KeyError):
    """An unknown model, preset or backbone name. A :class:`~proseg.errors.ConfigError` (so the CLI prints its
    message) that is also a ``KeyError``, so callers that caught the ``KeyError`` of earlier versions keep working."""

    __str__ = BaseException.__str__  # the message as written, not KeyError's repr() of it


_MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` available as ``create_model(name, ...)``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name].__name__}")
        _MODELS[name] = cls
        cls.model_name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted. (Importing any part of ``proseg.models``
    runs the package's ``__init__``, which imports and so registers every built-in model.)"""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def get_model_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``; :class:`UnknownNameError` (a ``ConfigError``) listing the names if none."""
    if name not in _MODELS:
        raise UnknownNameError(f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def create_model(
    name: str, in_channels: int = 1, num_raters: int = 4, preset: str = "default", **overrides: Any
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (``proseg``, ``prob_unet``, ``phiseg``, ``pionono``, ``dpersona``,
            ``cm_global``, ``cm_pixel``).
        in_channels: image channels C (1 for CT, 3 for T1/T1c/T2 MRI...).
        num_raters: R, the number of rater slots the model personalises to.
        preset: a named set of hyper-parameters from the class's ``PRESETS`` (``default``, ``reference`` ...).
        **overrides: constructor keyword arguments that replace the preset's.

    The call is recorded as ``model.init_config`` (name, C, R, preset and **every** constructor argument with the value
    used, :func:`resolved_arguments`; a model may add options it changes itself, see
    ``MultiRaterModel.config_updates``) so that ``create_model(**model.init_config)`` rebuilds the same architecture
    (used by checkpoints) even after the class's defaults or presets change. The ``default`` preset is the
    constructor's defaults.

    Raises:
        UnknownNameError: (a :class:`~proseg.errors.ConfigError`, also a ``KeyError``) an unknown model or preset.
        TypeError, ValueError: the model's constructor rejects an argument (left to the caller to wrap).

    Example:
        >>> model = create_model("proseg", in_channels=1, num_raters=4, preset="default")
        >>> probs = model.sample_personalized(torch.zeros(2, 1, 64, 64), num_samples=3)  # (2, 4, 3, 64, 64)
        >>> # sampling runs in eval mode and without autograd whatever mode the model is in (grad=True for a graph)
    """
    cls = get_model_class(name)
    presets: dict[str, dict[str, Any]] = getattr(cls, "PRESETS", {"default": {}})
    if preset not in presets:
        raise UnknownNameError(f"model {name!r} has no preset {preset!r}; presets: {', '.join(sorted(presets))}")
    kwargs = {**presets[preset], **overrides}
    model = cls(in_channels=in_channels, num_raters=num_raters, **kwargs)
    model.init_config = {  # type: ignore[attr-defined]
        "name": name,
        "in_channels": in_channels,
        "num_raters": num_raters,
        "preset": preset,
        **resolved_arguments(cls, kwargs),
    }
    return model


def resolved_arguments(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every keyword argument of ``cls``'s constructor (but ``in_channels`` / ``num_raters``) with the value the
    model is built with: ``kwargs`` (the preset and the overrides), else the constructor's default.

    Recording all of them, not only the ones the caller named, means that a later change of a default or of a preset
    cannot rebuild a saved model differently from how it was trained."""
    params = inspect.signature(cls.__init__).parameters
    out = {k: p.default for k, p in params.items()
           if k not in ("self", "in_channels", "num_raters") and p.default is not inspect.Parameter.empty
           and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    out.update(kwargs)
    return out
