"""Trainer unit tests on a tiny in-file model and in-memory data (no registry, no store)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from proseg.engine import checkpoint as ckpt
from proseg.engine.config import load_config
from proseg.engine.sampler import GlobalBatchSampler
from proseg.engine.schedule import lr_factor
from proseg.engine.trainer import Trainer
from proseg.errors import NonFiniteLossError
from tests.engine.engine_helpers import TinyConvModel, toy_data

BASE = ["train.batch_size=8", "train.log_every=1", "train.device=cpu", "optim.lr=0.01", "train.deterministic=true",
        "optim.warmup_steps=2"]


def _trainer(run: Path, overrides: list[str], resume: bool = False, model: TinyConvModel | None = None) -> Trainer:
    torch.manual_seed(0)
    cfg = load_config(None, BASE + overrides)
    return Trainer(cfg, run, data=toy_data(), model=model or TinyConvModel(1, 2), resume=resume)


def test_fit_writes_logs_checkpoints_and_selects_on_val(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", ["train.epochs=3"])
    summary = t.fit()
    run = tmp_path / "run"
    assert summary["steps"] == 12 == t.total_steps  # 32 samples / 8 = 4 steps per epoch
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "bce", "lr", "grad_norm", "samples_per_s"} <= set(rows[0])
    assert (run / "log.csv").read_text().splitlines()[0].startswith("step,")
    val = [json.loads(x) for x in (run / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [4, 8, 12]
    best = max(val, key=lambda v: v["score"])
    assert summary["best_step"] == best["step"] and summary["best_score"] == pytest.approx(best["score"])
    meta = json.loads((run / ckpt.BEST_DIR / "model.json").read_text())
    assert meta["step"] == best["step"]
    state = torch.load(run / ckpt.LAST_DIR / ckpt.STATE_NAME, weights_only=True)
    assert state["step"] == 12 and set(state["rng"]) >= {"python", "numpy", "torch"}
    info = json.loads((run / "run.json").read_text())
    assert {"proseg_version", "git_commit", "manifest_sha256", "world_size"} <= set(info)
    assert (run / "config.yaml").is_file()


def test_lr_schedule_warmup_then_cosine(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.warmup_steps=2", "optim.min_lr_ratio=0.1"]).optim
    f = [lr_factor(s, 12, cfg) for s in range(12)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))  # monotone after warm-up
    assert lr_factor(5, 12, cfg, progress=1.0) == pytest.approx(0.1)  # a spent time budget ends the decay


def test_param_groups_keep_their_own_learning_rates(tmp_path: Path) -> None:
    class TwoLR(TinyConvModel):
        def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
            return [{"params": [self.conv.weight], "lr": lr}, {"params": [self.conv.bias], "lr": 10 * lr}]

    torch.manual_seed(0)
    t = _trainer(tmp_path / "run", ["train.epochs=1"], model=TwoLR(1, 2))
    t.fit()
    g = t.optimizer.param_groups
    assert g[1]["base_lr"] == pytest.approx(10 * g[0]["base_lr"])
    assert g[1]["lr"] == pytest.approx(10 * g[0]["lr"])


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_is_exact(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full", ["train.epochs=3"])
    full.fit()

    class CrashingTrainer(Trainer):
        def on_train_step_end(self, out: dict) -> None:
            if self.step == 7:  # after the mid-epoch checkpoint at step 6, before the next one
                raise Crash

    torch.manual_seed(0)
    cfg = load_config(None, BASE + ["train.epochs=3", "train.checkpoint_every=3"])
    with pytest.raises(Crash):
        CrashingTrainer(cfg, tmp_path / "part", data=toy_data(), model=TinyConvModel(1, 2)).fit()
    assert torch.load(tmp_path / "part" / ckpt.LAST_DIR / ckpt.STATE_NAME, weights_only=True)["step"] == 6
    resumed = _trainer(tmp_path / "part", ["train.epochs=3", "train.checkpoint_every=3"], resume=True,
                       model=TinyConvModel(1, 2, noise=0.05))
    assert resumed.step == 6
    resumed.fit()
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    log = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    full_log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))  # the rows of the lost step 7 were dropped
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    _trainer(tmp_path / "run", ["train.max_steps=2"]).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        _trainer(tmp_path / "run", ["train.max_steps=2"])
    with pytest.raises(ValueError, match="batch_size"):
        _trainer(tmp_path / "run", ["train.max_steps=2", "train.batch_size=4"], resume=True)


class NaNAt(TinyConvModel):
    """Loss NaN (only its ``bce`` term) at the given 0-based step numbers."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__(1, 2)
        self.bad, self.calls = bad, 0

    def loss(self, batch: dict) -> dict:
        out = super().loss(batch)
        i, self.calls = self.calls, self.calls + 1
        if i in self.bad:
            nan = out["loss"] * float("nan")
            return {"loss": nan, "bce": nan.detach()}
        return out


def test_nonfinite_loss_skips_the_step_and_names_the_term(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = _trainer(tmp_path / "run", ["train.max_steps=5", "train.max_nonfinite=2"], model=NaNAt({1, 3}))
    before = None
    summary = t.fit()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 5
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "bce" in err
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 1, 0]
    assert before is None and all(torch.isfinite(p).all() for p in t.model.parameters())


def test_nonfinite_loss_aborts_after_too_many_in_a_row(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", ["train.max_steps=8", "train.max_nonfinite=3"], model=NaNAt({2, 3, 4}))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        t.fit()


def test_time_budget_stops_and_checkpoints(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", ["train.epochs=1000", "train.time_budget_s=0.5"])
    s = t.fit()
    assert s["stopped_by_budget"] and 0 < s["steps"] < t.total_steps
    st = torch.load(tmp_path / "run" / ckpt.LAST_DIR / ckpt.STATE_NAME, weights_only=True)
    assert st["step"] == s["steps"] and st["elapsed"] >= 0.5
    assert math.isfinite(s["best_score"])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampler_global_batches_do_not_depend_on_world_size(world: int) -> None:
    data = list(range(37))
    ref = GlobalBatchSampler(data, 8, num_replicas=1, rank=0, seed=3)
    ref.set_epoch(5)
    ref_batches = [sorted(list(ref)[i : i + 8]) for i in range(0, len(ref), 8)]
    assert len(ref_batches) == 4  # 37 // 8, last incomplete batch dropped
    parts = []
    for r in range(world):
        s = GlobalBatchSampler(data, 8, num_replicas=world, rank=r, seed=3)
        s.set_epoch(5)
        parts.append(list(s))
    per = 8 // world
    merged = [sorted(sum((p[i * per : (i + 1) * per] for p in parts), [])) for i in range(4)]
    assert merged == ref_batches
    s = GlobalBatchSampler(data, 8, num_replicas=world, rank=0, seed=3)
    s.set_epoch(5, start_batch=2)
    assert list(s) == parts[0][2 * per :]
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(data, 8, num_replicas=3, rank=0)


def test_bf16_autocast_trains_and_fp16_needs_cuda(tmp_path: Path) -> None:
    s = _trainer(tmp_path / "bf16", ["train.max_steps=2", "train.precision=bf16"]).fit()
    assert s["steps"] == 2 and math.isfinite(s["last"]["loss"])
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        _trainer(tmp_path / "fp16", ["train.max_steps=2", "train.precision=fp16"])


def test_checkpoint_every_also_saves_at_epoch_ends_without_validation(tmp_path: Path) -> None:
    class CrashAt5(Trainer):
        def on_train_step_end(self, out: dict) -> None:
            if self.step == 5:
                raise Crash

    torch.manual_seed(0)
    cfg = load_config(None, BASE + ["train.epochs=3", "train.checkpoint_every=2", "train.val_every=100"])
    with pytest.raises(Crash):
        CrashAt5(cfg, tmp_path / "run", data=toy_data(), model=TinyConvModel(1, 2)).fit()
    assert torch.load(tmp_path / "run" / ckpt.LAST_DIR / ckpt.STATE_NAME, weights_only=True)["step"] == 4


class SGDTrainer(Trainer):
    """A variant that overrides only the optimizer (nnU-Net style): plain SGD over all parameters."""

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.cfg.optim.lr, momentum=0.9)


def test_a_variant_overriding_only_build_optimizer_trains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = load_config(None, BASE + ["train.epochs=2"])
    t = SGDTrainer.from_config(cfg, tmp_path / "run", data=toy_data(), model=TinyConvModel(1, 2))
    assert isinstance(t, SGDTrainer) and isinstance(t.optimizer, torch.optim.SGD)
    before = [p.detach().clone() for p in t.model.parameters()]
    summary = t.fit()
    assert summary["steps"] == 8 and math.isfinite(summary["last"]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(0.005) and rows[1]["lr"] == pytest.approx(0.01)  # the schedule drives SGD
    state = torch.load(tmp_path / "run" / ckpt.LAST_DIR / ckpt.STATE_NAME, weights_only=True)
    assert "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))
    resumed = SGDTrainer.from_config(cfg, tmp_path / "run", data=toy_data(), model=TinyConvModel(1, 2), resume=True)
    assert resumed.step == 8 and isinstance(resumed.optimizer, torch.optim.SGD)


def test_hooks_are_no_ops_and_the_loop_validates_on_its_own(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []

    class Recording(Trainer):
        def on_epoch_end(self, epoch: int) -> None:  # no super(): validation must not depend on it
            calls.append(("epoch_end", epoch))

        def on_validation_end(self, summary: dict) -> None:
            calls.append(("validated", self.step))

    torch.manual_seed(0)
    cfg = load_config(None, BASE + ["train.epochs=2"])
    Recording(cfg, tmp_path / "run", data=toy_data(), model=TinyConvModel(1, 2)).fit()
    assert calls == [("validated", 4), ("epoch_end", 0), ("validated", 8), ("epoch_end", 1)]
    assert ckpt.checkpoint_step(tmp_path / "run" / ckpt.LAST_DIR) == 8


def test_from_config_reads_a_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 3\n  device: cpu\n  batch_size: 8\noptim:\n  optimizer: adam\n")
    t = Trainer.from_config(path, tmp_path / "run", data=toy_data(), model=TinyConvModel(1, 2))
    assert type(t) is Trainer and t.total_steps == 3 and type(t.optimizer) is torch.optim.Adam
    assert t.fit()["steps"] == 3
