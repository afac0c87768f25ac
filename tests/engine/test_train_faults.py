"""Fault injection for training: diverging weights, dead-end run folders, a full disk during a checkpoint save,
a crash in the middle of a checkpoint swap, and user errors that must be one-line proseg errors."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import proseg.engine.checkpoint as ckpt_mod
import proseg.fsutil as fsutil
from proseg.engine import checkpoint as ckpt
from proseg.engine.config import load_config
from proseg.engine.sampler import GlobalBatchSampler
from proseg.engine.trainer import Trainer
from proseg.errors import CheckpointError, ConfigError, NonFiniteLossError
from tests.engine.engine_helpers import TRAIN_FAST, TinyConvModel, cli, fails, ok, toy_data

BASE = ["train.batch_size=8", "train.log_every=1", "train.device=cpu", "optim.lr=0.01", "optim.warmup_steps=0"]
CONFIG = "synthetic/proseg"


def _trainer(run: Path, overrides: list[str], resume: bool = False, val: int = 4, cls: type = Trainer) -> Trainer:
    torch.manual_seed(0)
    return cls(load_config(None, BASE + overrides), run, data=toy_data(val=val), model=TinyConvModel(1, 2),
               resume=resume)


def _nan_after_step(t: Trainer, step: int, what: str = "weight") -> None:
    """Make optimizer step ``step`` (1-based, as in log.jsonl) leave a NaN in conv.weight or its exp_avg_sq."""
    calls = {"n": 0}

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == step:
            w = t.model.conv.weight
            target = w if what == "weight" else opt.state[w]["exp_avg_sq"]
            with torch.no_grad():
                target.view(-1)[0] = float("nan")

    t.optimizer.register_step_post_hook(hook)


class _ValidateSeesFiniteWeights(Trainer):
    validated = 0

    def validate(self) -> dict | None:
        assert all(bool(torch.isfinite(p).all()) for p in self.model.parameters()), "validation got NaN weights"
        type(self).validated += 1
        return super().validate()


# --- 1. divergence -------------------------------------------------------------------------------------
def test_nonfinite_weights_stop_at_the_step_before_validation_sees_them(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", ["train.max_steps=8"], cls=_ValidateSeesFiniteWeights)
    _nan_after_step(t, 4)  # the last step of epoch 1: without the check, validation would get the NaN
    with pytest.raises(NonFiniteLossError) as info:
        t.fit()
    msg = str(info.value)
    assert "step 4" in msg and "weight conv.weight" in msg and "loss=" in msg and "bce=" in msg, msg
    assert "No checkpoint was saved yet" in msg and "--out" in msg, msg
    assert _ValidateSeesFiniteWeights.validated == 0
    assert not (tmp_path / "run" / ckpt.LAST_DIR).exists()  # nothing saved the broken weights


def test_nonfinite_optimizer_state_names_the_real_checkpoint_and_resets_to_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    t = _trainer(run, ["train.max_steps=8", "train.checkpoint_every=2", "train.val_every=100"])
    _nan_after_step(t, 3, what="exp_avg_sq")
    with pytest.raises(NonFiniteLossError) as info:
        t.fit()
    msg = str(info.value)
    assert "step 3" in msg and "optimizer exp_avg_sq of conv.weight" in msg, msg
    assert f"{run / ckpt.LAST_DIR} (step 2)" in msg and "--resume" in msg, msg
    assert t.step == 2 and all(bool(torch.isfinite(p).all()) for p in t.model.parameters())  # reset to it
    saved = load_file(str(run / ckpt.LAST_DIR / "model.safetensors"))
    assert torch.equal(saved["conv.weight"], t.model.conv.weight.detach())


class _NaNLossFrom(TinyConvModel):
    """A NaN loss from the given 0-based loss call on."""

    def __init__(self, start: int) -> None:
        super().__init__(1, 2)
        self.start, self.calls = start, 0

    def loss(self, batch: dict) -> dict:
        out = super().loss(batch)
        self.calls += 1
        return {k: v * float("nan") for k, v in out.items()} if self.calls > self.start else out


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_nonfinite_loss_abort_names_only_a_checkpoint_that_exists(tmp_path: Path, checkpoint_every: int) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    cfg = load_config(None, [*BASE, "train.max_steps=8", "train.max_nonfinite=2", "train.val_every=100",
                             f"train.checkpoint_every={checkpoint_every}"])
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(cfg, run, data=toy_data(), model=_NaNLossFrom(3)).fit()
    msg = str(info.value)
    assert "2 consecutive steps" in msg and "at step 5" in msg, msg
    if checkpoint_every:
        assert f"{run / ckpt.LAST_DIR} (step 4)" in msg, msg  # step 4 was skipped: same weights
    else:
        assert "No checkpoint was saved yet" in msg and not (run / ckpt.LAST_DIR).exists(), msg


def test_huge_lr_is_a_one_line_error_and_the_failed_run_can_be_rerun(synth: Path, tmp_path: Path) -> None:
    """lr=1e6: finite but diverged weights give NaN losses and NaN validation predictions. Then the dead ends
    of a run that failed before its first checkpoint: resume says there is nothing, a re-run starts afresh."""
    run = tmp_path / "run"
    args = ["train", "-c", CONFIG, "--data", synth, "--out", run, *TRAIN_FAST, "train.max_steps=4"]
    out = fails(*args, "optim.lr=1e6", match="step 4")
    assert "diverged" in out and "No checkpoint was saved yet" in out and "Traceback" not in out, out
    assert not (run / ckpt.LAST_DIR).exists() and (run / "run.json").is_file()

    out = fails("train", "--resume", run, match="nothing to resume")
    assert f"--out {run}" in out, out

    res = ok(*args)  # the same command, a sane lr: starts afresh
    assert f"no saved state in {run}; starting afresh" in res.output + (getattr(res, "stderr", "") or "")
    assert ckpt.checkpoint_step(run / ckpt.LAST_DIR) == 4
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["skipped"] == 0 for r in rows)

    out = fails(*args, match=f"continue it with --resume {run}, or replace it with --force")
    assert "step 4" in out, out
    fails("train", "--resume", run, "--force", match="pass one of them")

    (run / "notes.txt").write_text("mine")
    res = ok(*args, "train.max_steps=2", "--force")
    assert "--force: replacing the run" in res.output + (getattr(res, "stderr", "") or "")
    assert ckpt.checkpoint_step(run / ckpt.LAST_DIR) == 2 and not (run / "notes.txt").exists()
    assert "resumes" not in json.loads((run / "run.json").read_text())


def test_force_refuses_to_delete_a_folder_that_is_not_a_run(synth: Path, tmp_path: Path) -> None:
    busy = tmp_path / "thesis"
    busy.mkdir()
    (busy / "thesis.tex").write_text("x")
    fails("train", "-c", CONFIG, "--data", synth, "--out", busy, *TRAIN_FAST, "train.max_steps=1", "--force",
          match="not a proseg run folder")
    assert (busy / "thesis.tex").read_text() == "x"


# --- 3. disk full during a checkpoint save ----------------------------------------------------------------
def _enospc_on(monkeypatch: pytest.MonkeyPatch, name: str, nth: int, parent_has: str = "") -> None:
    """The ``nth`` atomic write of a file called ``name`` (in a folder whose name contains ``parent_has``)
    fails with ENOSPC, as on a full disk."""
    real = fsutil.atomic_write_bytes
    seen = {"n": 0}

    def write(path: Path, data: bytes) -> None:
        if path.name == name and parent_has in path.parent.name:
            seen["n"] += 1
            if seen["n"] == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", write)
    monkeypatch.setattr("proseg.models.base.atomic_write_bytes", write, raising=False)


def _folder_steps(d: Path) -> tuple[int | None, int, bool]:
    """(model.json step, state.pt step, weights == state's weights) of a checkpoint folder."""
    state = torch.load(d / ckpt.STATE_NAME, weights_only=True)
    weights = load_file(str(d / "model.safetensors"))
    same = all(torch.equal(weights[k], state["model"][k]) for k in weights)
    return ckpt.checkpoint_step(d), int(state["step"]), same


def _no_leftovers(run: Path) -> None:
    left = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not left, left


def test_disk_full_keeps_the_previous_checkpoint_whole(synth: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    args = ["train", "-c", CONFIG, "--data", synth, "--out", run, *TRAIN_FAST, "train.max_steps=3",
            "train.checkpoint_every=1", "train.val_every=100", "train.epochs=100"]
    with monkeypatch.context() as m:
        _enospc_on(m, ckpt.STATE_NAME, 2)  # the second save: its model files are already written
        out = fails(*args, match="no space left on the device")
    assert f"{run / ckpt.LAST_DIR} still holds step 1" in out and "Traceback" not in out, out
    assert _folder_steps(run / ckpt.LAST_DIR) == (1, 1, True)
    _no_leftovers(run)
    ok("evaluate", run, "--data", synth, "--out", tmp_path / "ev", "--max-cases", "1", "--samples", "1")
    ok("train", "--resume", run)
    assert _folder_steps(run / ckpt.LAST_DIR) == (3, 3, True)


def test_disk_full_on_best_keeps_best_and_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _enospc_on(monkeypatch, "model.safetensors", 2, parent_has="best")
    t = _trainer(run, ["train.epochs=2"], val=0)  # no validation part: every epoch end saves best + last
    with pytest.raises(CheckpointError) as info:
        t.fit()
    msg = str(info.value)
    assert "no space left" in msg and f"{run / ckpt.BEST_DIR} still holds step 4" in msg, msg
    assert f"{run / ckpt.LAST_DIR} still holds step 4" in msg, msg
    assert ckpt.checkpoint_step(run / ckpt.BEST_DIR) == 4
    assert _folder_steps(run / ckpt.LAST_DIR) == (4, 4, True)
    _no_leftovers(run)


# --- 3b. a crash in the middle of a checkpoint swap -------------------------------------------------------
def test_a_crash_between_the_two_renames_of_a_swap_loses_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trainer(run, ["train.max_steps=4", "train.checkpoint_every=2", "train.val_every=100"]).fit()
    cdir = run / "checkpoints"
    # What a SIGKILL between `last -> .last.old-X/x` and `.last.tmp-Y -> last` leaves behind:
    (cdir / ".last.old-abc").mkdir()
    os.replace(cdir / "last", cdir / ".last.old-abc" / "x")
    (cdir / ".last.tmp-def").mkdir()
    (cdir / ".last.tmp-def" / "model.safetensors").write_bytes(b"half")
    assert ckpt.resolve_checkpoint(cdir / "last") == cdir / ".last.old-abc" / "x"  # readers still find it
    assert ckpt.run_dir_of(ckpt.resolve_checkpoint(cdir / "last")) == run
    t = _trainer(run, ["train.max_steps=6", "train.checkpoint_every=2", "train.val_every=100"], resume=True)
    assert t.step == 4 and (cdir / "last" / ckpt.STATE_NAME).is_file()
    _no_leftovers(run)


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "last"
    out.mkdir()
    (out / "a").write_text("old")
    real, calls = os.replace, {"n": 0}

    def replace(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the new folder's rename into place
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    with pytest.raises(OSError):  # noqa: PT012 (the block is the write)
        with fsutil.staged_dir(out) as tmp:
            (tmp / "a").write_text("new")
            monkeypatch.setattr(fsutil.os, "replace", replace)
    monkeypatch.undo()
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


# --- 4./5. user errors are proseg errors naming the key or file --------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_config_error(synth: Path, tmp_path: Path) -> None:
    out = fails("train", "-c", CONFIG, "--data", synth, "--out", tmp_path / "r", *TRAIN_FAST, "train.device=cuda",
                match="train.device=cuda but CUDA is not available")
    assert "Traceback" not in out
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        _trainer(tmp_path / "fp16", ["train.max_steps=1", "train.precision=fp16"])


def test_bad_model_args_value_names_model_args(synth: Path, tmp_path: Path) -> None:
    fails("train", "-c", CONFIG, "--data", synth, "--out", tmp_path / "r", *TRAIN_FAST, "model.alpha0=-1",
          match="model.args")


def test_damaged_or_nonfinite_init_from_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _trainer(src, ["train.max_steps=1"]).fit()
    weights = src / ckpt.BEST_DIR / "model.safetensors"
    Trainer._init_weights(TinyConvModel(1, 2), str(src))  # a good source loads
    good = weights.read_bytes()
    for damage in (good[: len(good) // 2], b"garbage" * 10):
        weights.write_bytes(damage)
        with pytest.raises(CheckpointError, match=str(weights)):
            Trainer._init_weights(TinyConvModel(1, 2), str(src))
    state = {k: v.clone() for k, v in TinyConvModel(1, 2).state_dict().items()}
    state["conv.bias"][0] = math.inf
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="non-finite weights .* conv.bias"):
        Trainer._init_weights(TinyConvModel(1, 2), str(src))
    with pytest.raises(ConfigError, match="model.init_from"):
        Trainer._init_weights(TinyConvModel(1, 2), str(tmp_path / "missing"))


def test_damaged_state_or_other_batch_size_cannot_be_resumed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trainer(run, ["train.max_steps=2"]).fit()
    with pytest.raises(ConfigError, match="batch_size"):
        _trainer(run, ["train.max_steps=4", "train.batch_size=4"], resume=True)
    state = run / ckpt.LAST_DIR / ckpt.STATE_NAME
    good = state.read_bytes()
    for damage in (good[: len(good) // 2], b"\x80\x02garbage"):
        state.write_bytes(damage)
        with pytest.raises(CheckpointError, match=str(state)):
            _trainer(run, ["train.max_steps=4"], resume=True)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        _trainer(run, ["train.max_steps=4"], resume=True)


def test_sampler_batch_problems_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="train.batch_size=8 is not divisible"):
        GlobalBatchSampler(list(range(16)), 8, num_replicas=3)
    with pytest.raises(ConfigError, match="train.batch_size=8: the training part has only 3 samples"):
        GlobalBatchSampler(list(range(3)), 8)


def test_cli_has_a_force_option() -> None:
    res = cli("train", "--help")
    assert "--force" in res.output
