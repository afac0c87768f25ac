"""Config: YAML + dotted overrides, types, unknown keys named, shipped configs valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from proseg.engine.config import (
    CONFIG_DIR,
    Config,
    apply_overrides,
    config_from_dict,
    config_to_yaml,
    load_config,
    validate_config,
)
from proseg.errors import ConfigError


def test_defaults_and_overrides_typed() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "eval.modes=diverse",
                             "train.compile=true", "model.kl_weight=0.1", "model.args.tau_dim=4"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.eval.modes == ("diverse",)
    assert cfg.train.compile is True
    # model.<ctor kwarg> is shorthand for model.args.<ctor kwarg>
    assert cfg.model.args == {"kl_weight": 0.1, "tau_dim": 4}


@pytest.mark.parametrize("override, key", [
    ("train.epoch=3", "train.epoch"),
    ("trian.epochs=3", "trian.epochs"),
    ("optim.lr.x=1", "optim.lr.x"),
])
def test_unknown_keys_are_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, msg", [
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("train.compile=maybe", "train.compile: expected true/false"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2"),
    ("train.epochs", "expected section.key=value"),
])
def test_bad_values(override: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_unknown_model_argument_is_an_error_naming_it() -> None:
    cfg = load_config(None, ["model.name=prob_unet", "model.tau_dim=4"])  # tau_dim is ProSeg's, not Prob. U-Net's
    with pytest.raises(ConfigError, match=r"model\.args\.tau_dim"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match="model.preset"):
        validate_config(load_config(None, ["model.preset=huge"]))
    with pytest.raises(ConfigError, match="model.name"):
        validate_config(load_config(None, ["model.name=unet3000"]))


def test_choices_and_ranges() -> None:
    with pytest.raises(ConfigError, match="train.precision"):
        validate_config(load_config(None, ["train.precision=fp8"]))
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate_config(load_config(None, ["train.batch_size=0"]))
    with pytest.raises(ConfigError, match="eval.conventions"):
        validate_config(load_config(None, ["eval.conventions=[standard, other]"]))
    with pytest.raises(ConfigError, match="data.augment_args.flip"):
        validate_config(load_config(None, ["data.augment_args.flip=0.5"]))
    validate_config(load_config(None, ["data.augment_args.flip_p=0.2"]))


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'train\.bogus'"):
        load_config(p)
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.epochs=7", "model.args.kl_weight=0.5", "optim.lr=5e-5"])
    p = tmp_path / "resolved.yaml"
    p.write_text(config_to_yaml(cfg))
    again = load_config(p)
    assert again == cfg
    assert config_from_dict({}) == Config()
    assert apply_overrides(Config(), []) == Config()


def test_shipped_configs_are_valid() -> None:
    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    datasets = {p.parent.name for p in files}
    assert {"lidc", "qubiq", "npc", "synthetic"} <= datasets
    models = {load_config(p).model.name for p in files}
    assert models == {"proseg", "prob_unet", "phiseg", "pionono", "dpersona", "cm_global", "cm_pixel"}
    for p in files:
        validate_config(load_config(p))
