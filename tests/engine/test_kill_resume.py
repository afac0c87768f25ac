"""SIGKILL a training process mid-run, resume it, and end with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.engine_helpers import TRAIN_FAST, ok, threads

STEPS = 12
ARGS = ["-c", "synthetic/proseg", *TRAIN_FAST, f"train.max_steps={STEPS}",
        "train.epochs=100", "train.checkpoint_every=2", "train.deterministic=true", "train.val_every=100",
        "data.augment=true"]


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _state_step(run: Path) -> int:
    p = run / "checkpoints" / "last" / "state.pt"
    if not p.is_file():
        return -1
    try:
        return int(torch.load(p, weights_only=True)["step"])
    except Exception:  # the file is replaced atomically, but a read can still race with the rename
        return -1


def test_sigkill_then_resume_equals_uninterrupted(synth: Path, tmp_path: Path, restore_determinism: None) -> None:
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count here and in the subprocess
    proc = subprocess.Popen([str(Path(sys.executable).parent / "proseg"), "train", "--data", str(synth), "--out",
                             str(killed), *ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 240
        while _state_step(killed) < 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    at = _state_step(killed)
    assert 4 <= at < STEPS
    with threads(1):
        ok("train", "--resume", killed)
        ok("train", "--data", synth, "--out", tmp_path / "straight", *ARGS)
    a = load_file(str(killed / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _state_step(killed) == STEPS
