"""Shared fixtures of the engine tests: a tiny prepared synthetic dataset and a tiny trained ProSeg run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py

REPO = Path(__file__).resolve().parents[2]
TRAIN_FAST = ["train.batch_size=4", "train.log_every=1", "train.device=cpu", "train.val_every=1",
              "train.max_val_cases=2", "train.val_num_samples=2", "optim.warmup_steps=0", "data.num_workers=0",
              "model.preset=tiny"]


def cli(*args: str) -> object:
    """Run ``proseg ARGS`` in-process; returns the click Result (``exit_code``, ``output``, ``stderr``)."""
    from proseg.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args: str) -> object:
    res = cli(*args)
    assert res.exit_code == 0, res.output
    return res


def fails(*args: str, match: str) -> str:
    res = cli(*args)
    out = res.output + (getattr(res, "stderr", "") or "")
    assert res.exit_code == 2, out
    assert "error:" in out and match in out, out
    return out


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic 32x32 cases, 4 raters, 1 channel, 4 folds."""
    d = tmp_path_factory.mktemp("data") / "synth"
    ok("prepare", "synthetic", "0", d, "--cases", "24", "--size", "32")
    return d


@pytest.fixture(scope="session")
def proseg_run(tmp_path_factory: pytest.TempPathFactory, synth: Path) -> Path:
    """A ProSeg (tiny) run of 4 steps on ``synth``."""
    run = tmp_path_factory.mktemp("runs") / "proseg"
    ok("train", "-c", REPO / "configs" / "synthetic" / "proseg.yaml", "--data", synth, "--out", run, "--fold", "0",
       *TRAIN_FAST, "train.max_steps=4")
    return run


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
