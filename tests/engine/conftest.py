"""Fixtures of the engine tests: a tiny prepared synthetic dataset and a tiny trained ProSeg run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.engine_helpers import TRAIN_FAST, ok


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
    ok("train", "-c", "synthetic/proseg", "--data", synth, "--out", run, "--fold", "0",
       *TRAIN_FAST, "train.max_steps=4")
    return run
