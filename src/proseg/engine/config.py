"""Typed run configuration: five dataclass sections loaded from YAML and overridden with dotted keys.

A config file has up to five top-level sections, ``data``, ``model``, ``optim``, ``train`` and ``eval``, each
mapping to one dataclass below. Anything not given keeps its default. Command-line overrides are
``section.key=value`` strings whose value is parsed as YAML (``train.epochs=5``, ``optim.betas=[0.9,0.99]``,
``model.args.kl_weight=0.1``). Every unknown key, in a file or an override, is an error naming the dotted key.

Model constructor arguments live in the free-form ``model.args`` mapping; as a shorthand, ``model.<key>`` for
a key that is not a :class:`ModelConfig` field is routed to ``model.args.<key>``. :func:`validate_config`
then checks every ``model.args`` key against the model class's constructor, so a typo is still an error
naming the key.

Shipped configs lie inside the package (``proseg/configs/<dataset>/<model>.yaml``) and are named without the
suffix: ``load_config("lidc/proseg")`` (what ``proseg train -c lidc/proseg`` does from any folder);
``list_configs()`` lists them. A name ending in ``.yaml`` / ``.yml`` is always a file path.

Example:
    >>> cfg = load_config("synthetic/proseg", ["train.epochs=2", "model.kl_weight=0.1"])
    >>> cfg.model.args["kl_weight"]
    0.1
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proseg.data.augment import AugmentConfig
from proseg.errors import ConfigError
from proseg.metrics import CONVENTIONS, DEFAULT_THRESHOLDS, ESTIMATORS
from proseg.models import get_model_class


@dataclass
class DataConfig:
    """Where the prepared dataset lies and how it is loaded.

    Attributes:
        path: a dataset prepared by ``proseg prepare`` (folder with ``manifest.json``).
        fold: cross-validation fold; training uses its ``train`` part, model selection its ``val`` part.
        augment: joint image/mask augmentation during training (flips, rot90, small rotations, noise).
        augment_args: keyword arguments of :class:`proseg.data.augment.AugmentConfig` (validated against it).
        num_workers: DataLoader worker processes per rank (0 = load in the training process).
        verify: recompute every store file's sha256 against its manifest when training starts (about 0.6 s per
            400 MB); ``false`` keeps only the cheap checks (sizes, headers, format version) of every open.
    """

    path: str = ""
    fold: int = 0
    augment: bool = True
    augment_args: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    verify: bool = True


@dataclass
class ModelConfig:
    """Which model to build: ``create_model(name, in_channels=C, num_raters=R, preset=preset, **args)``.

    ``in_channels`` and ``num_raters`` come from the dataset's manifest, never from the config.
    ``init_from``: a checkpoint (or run) directory whose weights are loaded, strictly, into the new model before
    training (e.g. D-Persona stage 2 starting from the stage-1 run); empty = random initialisation.
    """

    name: str = "proseg"
    preset: str = "default"
    args: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Attributes:
        optimizer: ``adam`` or ``adamw``. Parameter groups come from ``model.param_groups(lr, weight_decay)``
            (ProSeg gives its rater-latent tables their own learning rate there).
        lr: base learning rate (peak of the schedule).
        weight_decay: passed to ``param_groups``.
        betas, eps: Adam moments.
        schedule: ``cosine`` (linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step) or
            ``constant`` (warm-up, then flat).
        warmup_steps: linear warm-up length in optimiser steps (0 = none).
        min_lr_ratio: final learning rate as a fraction of each group's own base rate.
        grad_clip: clip the global gradient norm to this value (0 = no clipping).
    """

    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """The training loop.

    Attributes:
        epochs: passes over the training part of the fold.
        max_steps: stop after this many optimiser steps (0 = ``epochs`` full epochs). The schedule spans
            ``min(max_steps, epochs * steps_per_epoch)`` steps.
        time_budget_s: stop (then a final validation and checkpoint) once this many wall-clock seconds of the
            training loop, validations and checkpoints included, have passed, summed over resumes (0 = no
            budget). The cosine decay then follows the larger of the step fraction and the spent time fraction.
        batch_size: **global** batch size; each of the W DDP ranks takes ``batch_size / W`` (must divide).
        seed: base seed of every random draw of training, each keyed by what it is for
            (:mod:`proseg.engine.seeding`), so a resumed run repeats the same draws: before optimizer step s,
            rank r reseeds Python's, NumPy's and torch's global RNGs from (seed, r, s) (the models' latent
            samples, rater draws, noise), before the model is built from (seed, r, -1) (its initial weights);
            epoch e's data order is a function of (seed, e) (the same on every rank), augmentation of
            (seed, e, row), DataLoader worker seeds of (seed, r, e, first batch); validation samples each case
            from (seed, case id, mode).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + gradient scaler; CUDA only).
        compile: wrap the model with ``torch.compile``.
        deterministic: ``torch.use_deterministic_algorithms(True)`` and deterministic cuDNN (exact resume).
        log_every: write a log row every this many steps.
        val_every: validate every this many epochs (and at the end).
        val_metric: model-selection score on the fold's validation part: ``dice`` (mean of Dice_max, averaged
            over both directions as the reference's validation does, and Dice_soft; higher is better), ``ged``
            (lower is better), or any scalar key of :func:`proseg.metrics.case_metrics`.
        val_mode: ``auto`` (personalized when the model has it, else diverse), ``personalized`` or ``diverse``.
        val_num_samples: samples per rater (personalized) or per case (diverse) during validation.
        max_val_cases: validate on at most this many cases of the validation part (0 = all).
        checkpoint_every: also write the resumable state every this many steps (0 = at validation only).
        max_nonfinite: abort after this many consecutive steps whose loss was NaN/Inf (each one is skipped).
    """

    epochs: int = 10
    max_steps: int = 0
    time_budget_s: float = 0.0
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    deterministic: bool = False
    log_every: int = 10
    val_every: int = 1
    val_metric: str = "dice"
    val_mode: str = "auto"
    val_num_samples: int = 4
    max_val_cases: int = 0
    checkpoint_every: int = 0
    max_nonfinite: int = 5


@dataclass
class EvalConfig:
    """Evaluation and prediction.

    Attributes:
        modes: ``personalized`` and/or ``diverse``.
        num_samples: K: samples per rater (personalized; the rater's prediction is the mean of its K) or per
            case (diverse). The literature uses 4, 10, 16, 50, 100.
        conventions: metric empty-mask conventions, ``standard`` and/or ``reference``.
        estimator: GED estimator, ``v`` (pairs include i = i', as the published code) or ``u``.
        thresholds: Dice_soft thresholds.
        seed: per-case sampling is seeded from (seed, case_id).
        batch_size: slices per forward pass (a volume larger than this is still one latent draw).
        num_figures: write a figure for this many cases (the first ones in case order).
    """

    modes: tuple[str, ...] = ("personalized", "diverse")
    num_samples: int = 16
    conventions: tuple[str, ...] = ("standard",)
    estimator: str = "v"
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    seed: int = 0
    batch_size: int = 32
    num_figures: int = 4


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return _plain(d)


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig,
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "optim.optimizer": ("adam", "adamw"),
    "optim.schedule": ("cosine", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.val_mode": ("auto", "personalized", "diverse"),
    "eval.estimator": ESTIMATORS,
}
_MULTI_CHOICES: dict[str, tuple[str, ...]] = {
    "eval.modes": ("personalized", "diverse"),
    "eval.conventions": CONVENTIONS,
}


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively (YAML/JSON friendly)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a parsed YAML value to the annotated field type; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected: `eval.modes=diverse`
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - programming error


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set_section(section_obj: Any, section: str, mapping: dict[str, Any], where: str) -> None:
    types = _field_types(type(section_obj))
    for key, value in mapping.items():
        dotted = f"{section}.{key}"
        if key in types:
            if typing.get_origin(types[key]) is dict and isinstance(value, dict):
                getattr(section_obj, key).update(value)  # merge mappings (file, then overrides)
            else:
                setattr(section_obj, key, _coerce(value, types[key], f"{where}{dotted}"))
        elif section == "model":
            section_obj.args[key] = value  # shorthand: model.<ctor kwarg> -> model.args.<ctor kwarg>
        else:
            raise ConfigError(f"{where}unknown config key {dotted!r}; {section} keys: {', '.join(sorted(types))}")


def config_from_dict(raw: dict[str, Any], where: str = "") -> Config:
    """Build a :class:`Config` from a nested mapping (as read from YAML). ``where`` prefixes error messages."""
    cfg = Config()
    update_config(cfg, raw, where)
    return cfg


def update_config(cfg: Config, raw: dict[str, Any], where: str = "") -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}a config must be a mapping of sections ({', '.join(SECTIONS)}), got {raw!r}")
    for section, mapping in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}unknown config key {section!r}; sections: {', '.join(SECTIONS)}")
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            raise ConfigError(f"{where}{section}: expected a mapping, got {mapping!r}")
        _set_section(getattr(cfg, section), section, mapping, where)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    parts = dotted.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def parse_yaml_value(text: str, item: str) -> Any:
    """The value of a ``key=value`` string, read as YAML (``""`` for an empty value); ConfigError naming ``item``
    when it is not valid YAML."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{item!r}: value is not valid YAML ({exc})") from exc


def parse_key_values(items: list[str] | tuple[str, ...], what: str = "argument",
                     example: str = "diverse_mode=per_rater") -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: v}`` with YAML values (model arguments given on a command line).

    Raises:
        ConfigError: an item without ``=`` or without a key, or a value that is not valid YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r}: expected KEY=VALUE, e.g. {example}")
        out[key.strip()] = parse_yaml_value(text, f"{what} {item}")
    return out


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` strings in order (value parsed as YAML). Returns ``cfg`` (modified)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.epochs=5)")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.epochs=5)")
        value = parse_yaml_value(text, f"override {item}")
        section, rest = parts[0], parts[1:]
        if section not in SECTIONS:
            raise ConfigError(f"unknown config key {key!r}; sections: {', '.join(SECTIONS)}")
        types = _field_types(SECTIONS[section])
        if len(rest) > 1 and not (rest[0] in types and typing.get_origin(types[rest[0]]) is dict):
            if section == "model" and rest[0] not in types:
                rest = ["args", *rest]
            else:
                raise ConfigError(f"unknown config key {key!r}")
        update_config(cfg, _nest(".".join([section, *rest]), value))
    return cfg


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
"""The shipped configs: ``<dataset>/<model>.yaml`` (package data, so they exist wherever proseg is installed)."""

_YAML_SUFFIXES = (".yaml", ".yml")


def list_configs() -> list[str]:
    """The names of the shipped configs (``lidc/proseg`` ...), sorted; each one is a valid ``load_config`` path."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config_path(name: str | os.PathLike[str]) -> Path:
    """The file a ``-c`` argument names: a path ending in ``.yaml`` / ``.yml`` is that file; a name without the
    suffix (``lidc/proseg``) is the shipped config of that name, else an existing file at that path.
    Raises :class:`ConfigError` (listing the shipped names) when there is none."""
    p = Path(name)
    if p.suffix.lower() in _YAML_SUFFIXES:
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        return p
    text = p.as_posix().strip("/")
    shipped = CONFIG_DIR / f"{text}.yaml"
    if text and ".." not in p.parts and not p.is_absolute() and shipped.is_file():
        return shipped
    if p.is_file():
        return p
    raise ConfigError(f"{name}: no such config; a file path ends in .yaml, and the shipped configs are "
                      f"{', '.join(list_configs())} (proseg config list)")


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply dotted overrides.

    ``path`` is a YAML file or the name of a shipped config (``lidc/proseg``, see :func:`resolve_config_path`).
    """
    cfg = Config()
    if path is not None:
        p = resolve_config_path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
        update_config(cfg, raw or {}, where=f"{p}: ")
    apply_overrides(cfg, list(overrides))
    return cfg


def validate_config(cfg: Config) -> Config:
    """Check value ranges, choices, and ``model.args`` against the model constructor. Returns ``cfg``."""
    d = cfg.to_dict()
    for key, choices in _CHOICES.items():
        sec, name = key.split(".")
        if d[sec][name] not in choices:
            raise ConfigError(f"{key}: {d[sec][name]!r} is not one of {', '.join(choices)}")
    for key, choices in _MULTI_CHOICES.items():
        sec, name = key.split(".")
        vals = d[sec][name]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise ConfigError(f"{key}: {vals!r} must be a non-empty list drawn from {', '.join(choices)}")
    positive = {"train.batch_size": cfg.train.batch_size, "train.log_every": cfg.train.log_every,
                "train.val_every": cfg.train.val_every, "train.val_num_samples": cfg.train.val_num_samples,
                "train.max_nonfinite": cfg.train.max_nonfinite, "eval.num_samples": cfg.eval.num_samples,
                "eval.batch_size": cfg.eval.batch_size}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key}: must be >= 1, got {v}")
    nonneg = {"train.epochs": cfg.train.epochs, "train.max_steps": cfg.train.max_steps,
              "train.time_budget_s": cfg.train.time_budget_s, "train.checkpoint_every": cfg.train.checkpoint_every,
              "train.max_val_cases": cfg.train.max_val_cases, "optim.warmup_steps": cfg.optim.warmup_steps,
              "optim.grad_clip": cfg.optim.grad_clip, "optim.weight_decay": cfg.optim.weight_decay,
              "data.num_workers": cfg.data.num_workers, "data.fold": cfg.data.fold,
              "eval.num_figures": cfg.eval.num_figures}
    for key, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise ConfigError("train.epochs and train.max_steps are both 0: nothing to train")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must lie in [0, 1], got {cfg.optim.min_lr_ratio}")
    validate_model_args(cfg.model)
    if cfg.data.augment and cfg.data.augment_args:
        validate_augment_args(cfg.data.augment_args)
    return cfg


def validate_model_args(model: ModelConfig) -> None:
    """Every ``model.args`` key must be a constructor argument of the model class (error names the key)."""
    try:
        cls = get_model_class(model.name)
    except KeyError as exc:
        raise ConfigError(f"model.name: {exc.args[0]}") from None
    presets = getattr(cls, "PRESETS", {"default": {}})
    if model.preset not in presets:
        raise ConfigError(f"model.preset: {model.name!r} has no preset {model.preset!r}; "
                          f"presets: {', '.join(sorted(presets))}")
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n in params if n not in ("self", "in_channels", "num_raters")}
    for key in model.args:
        if key in ("in_channels", "num_raters"):
            raise ConfigError(f"model.args.{key}: set by the dataset's manifest, not the config")
        if key not in accepted:
            raise ConfigError(f"unknown config key 'model.args.{key}': {model.name} accepts "
                              f"{', '.join(sorted(accepted)) or 'no arguments'}")


def validate_augment_args(args: dict[str, Any]) -> None:
    """Every ``data.augment_args`` key must be a field of :class:`proseg.data.augment.AugmentConfig`."""
    names = {f.name for f in dataclasses.fields(AugmentConfig)}
    for key in args:
        if key not in names:
            raise ConfigError(f"unknown config key 'data.augment_args.{key}'; AugmentConfig fields: "
                              f"{', '.join(sorted(names))}")


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
