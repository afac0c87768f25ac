"""CLI conventions: packaged configs by name, ``proseg config``, ``--version``, ``-h`` everywhere, one ``--device``
default, and the schedule warnings (a schedule that cannot do what it says)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import yaml

import proseg
from proseg.cli.commands import COMMANDS
from proseg.engine.config import (
    CONFIG_DIR,
    Config,
    TrainConfig,
    list_configs,
    load_config,
    resolve_config_path,
)
from proseg.engine.schedule import budget_warmup_warning, schedule_warnings
from proseg.engine.trainer import Trainer
from proseg.errors import ConfigError, ProsegWarning
from tests.engine.engine_helpers import TinyConvModel, cli, fails, ok, toy_data


# --- packaged configs --------------------------------------------------------------------------------------------
def test_configs_are_package_data_and_resolve_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert CONFIG_DIR.parent == Path(proseg.__file__).resolve().parent  # installed with the package
    names = list_configs()
    assert len(names) == 32 and "lidc/proseg" in names and "synthetic/dpersona_stage2" in names
    monkeypatch.chdir(tmp_path)  # a name works from any folder
    assert resolve_config_path("lidc/proseg") == CONFIG_DIR / "lidc" / "proseg.yaml"
    assert load_config("lidc/proseg") == load_config(CONFIG_DIR / "lidc" / "proseg.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  epochs: 3\n")
    assert load_config("mine.yaml").train.epochs == 3  # a path keeps working (relative or not)
    assert load_config(own).train.epochs == 3
    with pytest.raises(ConfigError, match="no such config.*lidc/proseg"):
        load_config("lidc/nothing")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("lidc/proseg.yaml")  # with the suffix it is a path, and there is none here


def test_config_list_and_show() -> None:
    res = ok("config", "list")
    assert res.stdout.split() == list_configs()
    res = ok("config", "show", "lidc/proseg", "train.epochs=3", "optim.lr=1e-3")
    shown = yaml.safe_load(res.stdout)
    assert shown["train"]["epochs"] == 3 and shown["optim"]["lr"] == pytest.approx(1e-3)
    assert shown["optim"]["optimizer"] == "adam"  # from the file
    defaults = Config().to_dict()
    assert {s: set(v) for s, v in shown.items()} == {s: set(v) for s, v in defaults.items()}  # every default
    assert yaml.safe_load(ok("config", "show").stdout) == defaults
    assert yaml.safe_load(ok("config", "show", "train.epochs=2").stdout)["train"]["epochs"] == 2
    fails("config", "show", "lidc/nothing", match="no such config")
    fails("config", "show", "lidc/proseg", "train.epoch=3", match="unknown config key")


def test_config_show_writes_a_file_train_accepts(tmp_path: Path) -> None:
    out = tmp_path / "my.yaml"
    ok("config", "show", "synthetic/proseg", "train.epochs=2", "-o", out)
    assert load_config(out) == load_config("synthetic/proseg", ["train.epochs=2"])


# --- version, help, device ---------------------------------------------------------------------------------------
def test_version_flag_and_command() -> None:
    for args in (["--version"], ["-V"], ["version"]):
        res = ok(*args)
        assert res.stdout.startswith(f"proseg {proseg.__version__} (torch ")


def test_short_help_everywhere() -> None:
    assert "Usage: proseg" in ok("-h").stdout
    for name in [*COMMANDS, "config list", "config show"]:
        res = ok(*name.split(), "-h")
        assert f"Usage: proseg {name}" in " ".join(res.stdout.split()), name


def test_one_device_default() -> None:
    from proseg.cli.evaluate import evaluate
    from proseg.cli.predict import predict
    from proseg.cli.score import score
    from proseg.commands.predict import predict_path

    assert TrainConfig().device == "auto"
    for func in (evaluate, predict, score):
        default = inspect.signature(func).parameters["device"].default
        assert getattr(default, "default", default) == "auto", func.__name__
    assert inspect.signature(predict_path).parameters["device"].default == "auto"


# --- schedule warnings -------------------------------------------------------------------------------------------
def _cfg(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def test_schedule_warnings_only_where_inconsistent() -> None:
    cfg = _cfg("optim.warmup_steps=50", "train.val_every=5", "train.epochs=3")
    msgs = schedule_warnings(cfg.optim, cfg.train, total_steps=60, steps_per_epoch=20)
    assert len(msgs) == 1 and "train.val_every=5 > the 3 epoch(s)" in msgs[0]
    msgs = schedule_warnings(cfg.optim, cfg.train, total_steps=50, steps_per_epoch=25)
    assert any("optim.warmup_steps=50 >= the run's 50 steps" in m for m in msgs)
    # max_steps cutting the epochs counts: 30 steps of 20 per epoch = 2 epochs
    cfg = _cfg("train.val_every=2", "train.epochs=10", "train.max_steps=30")
    assert schedule_warnings(cfg.optim, cfg.train, total_steps=30, steps_per_epoch=20) == []
    # a time budget with a long cosine is consistent: lr_factor follows the spent-time fraction
    cfg = _cfg("train.time_budget_s=60", "train.epochs=1000", "optim.schedule=cosine")
    assert schedule_warnings(cfg.optim, cfg.train, total_steps=100_000, steps_per_epoch=100) == []
    # ... but a budget that ends during the (step-based) warm-up is not, once the pace is known
    cfg = _cfg("train.time_budget_s=60", "optim.warmup_steps=1000")
    msg = budget_warmup_warning(cfg.optim, 60, step=10, elapsed_s=3.0)  # 0.3 s/step: ~200 steps in 60 s
    assert msg is not None and "near step 200" in msg and "optim.warmup_steps=1000" in msg
    assert budget_warmup_warning(cfg.optim, 60, step=100, elapsed_s=3.0) is None  # 2000 steps: warm-up ends
    assert budget_warmup_warning(_cfg().optim, 60, step=10, elapsed_s=3.0) is None  # no warm-up


def test_trainer_warns_at_start(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.batch_size=8", "train.device=cpu", "train.epochs=2", "optim.warmup_steps=50",
                             "train.val_every=3", "train.max_val_cases=1", "train.val_num_samples=1"])
    trainer = Trainer(cfg, tmp_path / "run", data=toy_data(), model=TinyConvModel(1, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    msgs = [str(w.message) for w in caught if issubclass(w.category, ProsegWarning)]
    assert any("optim.warmup_steps=50 >= the run's 8 steps" in m for m in msgs), msgs
    assert any("train.val_every=3 > the 2 epoch(s)" in m for m in msgs), msgs


def test_cli_prints_schedule_warning_as_one_line(synth: Path, tmp_path: Path) -> None:
    res = cli("train", "-c", "synthetic/prob_unet", "--data", synth, "--out", tmp_path / "r", "train.device=cpu",
              "model.preset=tiny", "train.batch_size=4", "train.max_steps=2", "optim.warmup_steps=10",
              "train.max_val_cases=1", "train.val_num_samples=1", "data.num_workers=0")
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if "optim.warmup_steps=10" in ln]
    assert lines and lines[0].startswith("warning: optim.warmup_steps=10 >= the run's 2 steps"), res.stderr
