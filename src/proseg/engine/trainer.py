"""The training loop: one readable class in the spirit of nanoGPT's ``train.py`` with nnU-Net's hook names.

One process, one GPU, or many processes on many machines (DDP under ``torchrun``), the same code:

* DDP switches on when ``WORLD_SIZE > 1`` (``nccl`` on CUDA, ``gloo`` on CPU); ``train.batch_size`` is the
  global batch, each rank takes ``batch_size / W`` of every global batch (:class:`GlobalBatchSampler`), so a
  W-process run follows the 1-process run's batches. Every collective is a named function of
  :mod:`proseg.engine.distributed` (a no-op in one process).
* Randomness is keyed, not streamed (:mod:`proseg.engine.seeding`): before optimizer step ``s`` every RNG
  (torch, NumPy, Python) of rank ``r`` is reseeded from ``(seed, r, s)``, and epoch ``e``'s data order from
  ``(seed, e)``. A run therefore resumes exactly from any saved step, whatever happened in between (validation,
  a crash, a restart on another number of workers ...). The RNG states are saved anyway (``state.pt``) and
  restored on resume.
* The loss goes through a thin module whose ``forward`` calls ``model.loss(batch)``, so DDP's gradient hooks
  and ``torch.compile`` see an ordinary forward.
* A non-finite loss (or gradient norm) skips the step on every rank, logs the terms that went bad, and
  aborts with :class:`NonFiniteLossError` after ``train.max_nonfinite`` such steps in a row.
* After every optimizer step one fused check (``torch._foreach_norm``, one all-reduced flag under DDP) looks
  for NaN/Inf in the weights, floating buffers and optimizer moments. A step that left any stops training at
  once with :class:`NonFiniteLossError` (which step, which tensors, the step's loss terms, and the checkpoint
  that really holds the last good state), before a validation or checkpoint can see the broken weights.
* Run folders follow one rule (:func:`proseg.engine.checkpoint.plan_run_dir`): without saved state they start
  afresh, with saved state they need ``resume`` or ``force``. Checkpoint folders are swapped in whole.

Extension points (override in a subclass, like nnU-Net's trainer variants; build one with
``MyTrainer.from_config(cfg, run_dir)``):

* builders, called once by the constructor (or per epoch segment): :meth:`Trainer.build_data`,
  :meth:`Trainer.build_model`, :meth:`Trainer.build_optimizer`, :meth:`Trainer.build_loader`;
* the step and the validation: :meth:`Trainer.train_step`, :meth:`Trainer.validate`;
* hooks, no-ops here: ``on_train_start``, ``on_epoch_start``, ``on_train_step_end``, ``on_validation_end``,
  ``on_epoch_end``, ``on_train_end``. The loop itself validates and checkpoints
  (:meth:`Trainer.validate_and_checkpoint`) every ``train.val_every`` epochs and at the end, whatever the hooks do.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from tqdm import tqdm

from proseg import __version__
from proseg.engine import checkpoint as ckpt
from proseg.engine import schedule
from proseg.engine.allocator import keep_freed_memory
from proseg.engine.config import Config, config_to_yaml, load_config, validate_config
from proseg.engine.data import train_data
from proseg.engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_ranks,
    all_reduce_max,
    all_reduce_mean,
    any_rank,
    env_dist_info,
    init_distributed,
    main_rank_does,
    resolve_device,
    same_on_all_ranks,
)
from proseg.engine.evaluation import evaluate_cases, resolve_modes, selection_score, supports
from proseg.engine.logger import RunLogger
from proseg.engine.sampler import GlobalBatchSampler
from proseg.engine.seeding import derive_seed, seed_all
from proseg.engine.types import TrainData
from proseg.errors import CheckpointError, ConfigError, NonFiniteError, NonFiniteLossError, ProsegError, ProsegWarning
from proseg.fsutil import atomic_write_text
from proseg.jsonio import write_json
from proseg.metrics.aggregate import aggregate
from proseg.models import create_model
from proseg.models.base import WEIGHTS_NAME, MultiRaterModel, nonfinite_tensors, read_weights
from proseg.progress import Progress


class _LossModule(nn.Module):
    """``forward(batch) = model.loss(batch)``: what DDP and torch.compile wrap."""

    def __init__(self, model: MultiRaterModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model.loss(batch)


class Trainer:
    """Train ``cfg.model`` on ``cfg.data`` into ``run_dir``.

    Args:
        cfg: the run configuration (validated here).
        run_dir: output directory (created; must be empty of another run unless ``resume``).
        data: the datasets (default: :meth:`build_data`, from ``cfg.data.path``).
        model: a model instance to train (default: :meth:`build_model`, ``create_model`` from ``cfg.model`` and
            the data's C, R, then the weights of ``cfg.model.init_from``).
        resume: continue the run in ``run_dir`` from its last saved state.
        force: replace the run in ``run_dir`` even when it has saved state (only a proseg run folder).
        command: the command line, recorded in ``run.json``.

    A ``run_dir`` without saved state (a run that stopped before its first checkpoint) is started afresh;
    one with saved state needs ``resume`` or ``force`` (see :func:`proseg.engine.checkpoint.plan_run_dir`).
    """

    def __init__(self, cfg: Config, run_dir: str | os.PathLike[str], *, data: TrainData | None = None,
                 model: MultiRaterModel | None = None, resume: bool = False, force: bool = False,
                 command: str = "") -> None:
        self.cfg = cfg
        if model is None:
            validate_config(cfg)
        self.run_dir = Path(run_dir)
        self.command = command
        self._setup_process()
        self.data = data if data is not None else self.build_data()
        self.model: MultiRaterModel = (model if model is not None else self._configured_model()).to(self.device)
        self._val_modes()  # fail early on a val_mode the model does not have
        self.optimizer = self.build_optimizer()
        for group in self.optimizer.param_groups:  # the schedule scales each group's base_lr
            group.setdefault("base_lr", group["lr"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.net: nn.Module | None = self._wrap(_LossModule(self.model))
        self.sampler = GlobalBatchSampler(self.data.train, cfg.train.batch_size, num_replicas=self.dist.world_size,
                                          rank=self.dist.rank, seed=cfg.train.seed, shuffle=True)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = self._total_steps()
        self._reset_progress()
        self._open_run(resume, force)

    @classmethod
    def from_config(cls, cfg: Config | str | os.PathLike[str], run_dir: str | os.PathLike[str],
                    **kwargs: Any) -> Trainer:
        """A trainer (of this class: a variant's ``from_config`` builds the variant) for ``cfg``, a :class:`Config`
        or the path of a YAML config; ``kwargs`` are the constructor's (``data``, ``model``, ``resume``, ...)."""
        if not isinstance(cfg, Config):
            cfg = load_config(cfg)
        return cls(cfg, run_dir, **kwargs)

    # --- builders (override in a variant) ---------------------------------------------------------------
    def build_data(self) -> TrainData:
        """The training set and validation cases: the store at ``cfg.data.path``, fold ``cfg.data.fold``."""
        return train_data(self.cfg)

    def build_model(self) -> MultiRaterModel:
        """``create_model`` from ``cfg.model``; a constructor's ValueError (a bad value) names ``model.args``."""
        m = self.cfg.model
        try:
            return create_model(m.name, in_channels=int(self.data.meta["in_channels"]),
                                num_raters=int(self.data.meta["num_raters"]), preset=m.preset, **m.args)
        except ProsegError:
            raise
        except ValueError as exc:
            raise ConfigError(f"model.args: {exc} (model.name={m.name}, model.preset={m.preset}, "
                              f"args {m.args})") from exc

    def build_optimizer(self) -> Optimizer:
        """Adam/AdamW from ``cfg.optim`` over ``model.param_groups`` (:func:`proseg.engine.schedule.build_optimizer`).

        A variant may return any optimizer: the learning-rate schedule multiplies each group's ``base_lr``,
        which defaults to the group's initial ``lr``."""
        return schedule.build_optimizer(self.model, self.cfg.optim, self.device)

    def build_loader(self, epoch: int, start: int) -> DataLoader:
        """The loader of this rank's part of epoch ``epoch``'s global batches from batch ``start`` on (a resumed
        run starts mid-epoch); the order is keyed by (seed, epoch), augmentation by (seed, epoch, row)."""
        self.sampler.set_epoch(epoch, start_batch=start)
        if hasattr(self.data.train, "set_epoch"):  # augmentation keyed by (seed, epoch, row)
            self.data.train.set_epoch(epoch)
        g = torch.Generator()
        g.manual_seed(derive_seed(self.cfg.train.seed, self.dist.rank, epoch, start))  # worker base seeds
        return DataLoader(self.data.train, batch_size=self.sampler.local_batch, sampler=self.sampler,
                          num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                          drop_last=False, generator=g, persistent_workers=False)

    # --- set-up ------------------------------------------------------------------------------------------
    def _setup_process(self) -> None:
        """This process's place in the run (rank, device, process group), determinism, and the set-up seed."""
        cfg = self.cfg.train
        self.dist: DistInfo = env_dist_info()
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.device = resolve_device(cfg.device, self.dist, key="train.device")
        init_distributed(self.device, self.dist)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"train.precision=fp16 needs CUDA, and this run is on {self.device} (use bf16 on CPU)")
        seed_all(derive_seed(cfg.seed, self.dist.rank, -1))  # the data set-up and the model's initial weights

    def _configured_model(self) -> MultiRaterModel:
        model = self.build_model()
        if self.cfg.model.init_from:
            self._init_weights(model, self.cfg.model.init_from)
        return model

    @staticmethod
    def _init_weights(model: MultiRaterModel, source: str) -> None:
        """Load the weights of checkpoint ``source`` strictly into ``model`` (same architecture); refuse a file
        that cannot be read and weights with NaN/Inf (a run must not start from a diverged checkpoint)."""
        try:
            src = ckpt.resolve_checkpoint(source)
        except FileNotFoundError as exc:
            raise ConfigError(f"model.init_from={source}: {exc}") from exc
        path = src / WEIGHTS_NAME
        try:
            state = read_weights(path)  # refuses a truncated / garbled file and NaN/Inf weights, naming them
        except CheckpointError as exc:
            raise CheckpointError(f"model.init_from={source}: {exc}") from exc
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"model.init_from={source}: the weights in {path} do not fit the configured "
                                  f"model ({exc})") from exc

    def _wrap(self, net: nn.Module) -> nn.Module:
        """The loss module as the step runs it: under DDP (gradient all-reduce), then ``torch.compile``."""
        if self.dist.enabled:
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.train.compile:
            net = torch.compile(net)  # type: ignore[assignment]
        return net

    def _total_steps(self) -> int:
        t = self.cfg.train
        full = t.epochs * self.steps_per_epoch
        return min(t.max_steps, full) if t.epochs > 0 and t.max_steps > 0 else (t.max_steps or full)

    def _reset_progress(self) -> None:
        """The progress state (saved in state.pt) of a run at its start."""
        self.step = 0
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.elapsed = 0.0
        self.nonfinite_run = 0
        self.skipped_steps = 0
        self.last_val_step = -1
        self._t_mark = time.time()  # wall-clock mark: `elapsed` counts up to it

    def _open_run(self, resume: bool, force: bool) -> None:
        """Apply the run-folder rule on rank 0 (every rank gets its verdict), load the saved state when resuming,
        open the logs and write ``config.yaml`` + ``run.json`` (rank 0)."""
        main_rank_does(lambda: self._note(ckpt.prepare_run_dir(self.run_dir, resume=resume, force=force)),
                       catch=(ProsegError, OSError))  # also the barrier: the folder is ready before any rank reads it
        resume_step: int | None = None
        if resume:
            self._load_state()
            resume_step = self.step
        main = self.dist.is_main
        self.logger = RunLogger(self.run_dir, "log", resume_step) if main else None
        self.val_logger = RunLogger(self.run_dir, "val", resume_step, tensorboard=False) if main else None
        if main:
            self._write_run_files(resume)

    def _val_modes(self) -> list[str]:
        mode = self.cfg.train.val_mode
        if mode == "auto":
            mode = "personalized" if supports(self.model, "personalized") else "diverse"
        return resolve_modes(self.model, [mode], strict=True)

    def _write_run_files(self, resume: bool) -> None:
        atomic_write_text(self.run_dir / ckpt.CONFIG_FILE, config_to_yaml(self.cfg))
        info_path = self.run_dir / ckpt.RUN_INFO_FILE
        info: dict[str, Any] = {}
        if resume and info_path.is_file():
            info = json.loads(info_path.read_text())
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        info.setdefault("started", now)
        info.update({
            "proseg_version": __version__,
            "git_commit": ckpt.git_commit(),
            "torch_version": torch.__version__,
            "dataset": str(self.cfg.data.path),
            "manifest_sha256": self.data.meta.get("manifest_sha256"),
            "fold": self.cfg.data.fold,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "model": getattr(self.model, "init_config", {"class": type(self.model).__name__}),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        })
        if resume:
            info.setdefault("resumes", []).append({"at_step": self.step, "command": self.command, "time": now})
        else:
            info["command"] = self.command
        write_json(info_path, info)

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: what ``state.pt`` holds (see :mod:`proseg.engine.checkpoint`)."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng_state(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "elapsed": self.elapsed,
            "nonfinite_run": self.nonfinite_run,
            "skipped_steps": self.skipped_steps,
            "last_val_step": self.last_val_step,
            "world_size": self.dist.world_size,
            "global_batch": self.cfg.train.batch_size,
            "proseg_version": __version__,
        }

    def _model_extra(self, score: float | None) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.step // self.steps_per_epoch, "val_metric": self.cfg.train.val_metric,
                "val_score": score, "dataset": {k: v for k, v in self.data.meta.items() if k != "rows"}}

    def save_checkpoint(self, best: bool = False, score: float | None = None) -> None:
        """Rank 0 writes ``checkpoints/last`` (weights + state.pt) and, when ``best``, ``checkpoints/best``.

        Each folder is swapped in whole (:func:`ckpt.write_checkpoint`); a failed save (a full disk ...) keeps
        the previous folders and raises :class:`CheckpointError` on every rank, saying which steps they hold.
        """

        def write() -> None:
            extra = self._model_extra(score)
            last = self.run_dir / ckpt.LAST_DIR
            if best:  # best before last: a crash in between re-validates and re-saves best on resume
                ckpt.write_checkpoint(self.run_dir / ckpt.BEST_DIR, self.model, extra, untouched=(last,))
            ckpt.write_checkpoint(last, self.model, extra, state=self.state_dict())

        main_rank_does(write, catch=(CheckpointError,))  # also the barrier after the save

    _STATE_KEYS = ("model", "optimizer", "scaler", "rng", "step", "best_score", "best_step", "elapsed",
                   "nonfinite_run", "skipped_steps", "last_val_step")

    def _load_state(self) -> None:
        """Restore everything from ``checkpoints/last/state.pt``; a file that does not fit raises
        :class:`CheckpointError` (:class:`ConfigError` for a changed global batch) naming it."""
        path = self.run_dir / ckpt.LAST_DIR / ckpt.STATE_NAME
        state = ckpt.load_state(path, map_location="cpu")
        missing = [k for k in self._STATE_KEYS if k not in state]
        if not missing and not isinstance(state["model"], dict):
            missing = ["model weights"]
        if missing:
            raise CheckpointError(f"{path}: not a proseg training state (no {', '.join(missing)})")
        if state.get("global_batch") != self.cfg.train.batch_size:
            raise ConfigError(f"{path}: saved with train.batch_size={state.get('global_batch')}, the config now "
                              f"says {self.cfg.train.batch_size}; resume with the same global batch")
        bad = nonfinite_tensors(state["model"])
        if bad:
            raise CheckpointError(f"{path}: non-finite weights (NaN/Inf) in {_few(bad)}; it cannot be resumed")
        try:
            self.model.load_state_dict(state["model"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not match the configured model ({exc})") from exc
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            ckpt.restore_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: its optimizer / scaler / RNG state does not fit this run "
                                  f"({type(exc).__name__}: {exc})") from exc
        self.step = int(state["step"])
        self.best_score = state["best_score"]
        self.best_step = state["best_step"]
        self.elapsed = float(state["elapsed"])
        self.nonfinite_run = int(state["nonfinite_run"])
        self.skipped_steps = int(state["skipped_steps"])
        self.last_val_step = int(state["last_val_step"])

    # --- hooks (no-ops: override in a variant) ------------------------------------------------------------
    def on_train_start(self) -> None:
        """Before the first step of :meth:`fit` (after a resume's state is loaded)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first step of epoch ``epoch`` (not called for the rest of an epoch a resume starts in)."""

    def on_train_step_end(self, out: dict[str, float]) -> None:
        """After optimizer step ``self.step`` (already counted); ``out``: its loss terms, or ``{"skipped": 1.0}``."""

    def on_validation_end(self, summary: dict[str, Any]) -> None:
        """After a validation, before its checkpoint is saved; ``summary``: what :meth:`validate` returned."""

    def on_epoch_end(self, epoch: int) -> None:
        """After the last step of epoch ``epoch`` and its validation + checkpoint when one was due."""

    def on_train_end(self) -> None:
        """After the last step and the final validation + checkpoint, before the logs are closed."""

    # --- the step ---------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        p = self.cfg.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's part of a global batch. Returns the (local) loss terms."""
        batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        if self.net is None:  # a step after fit released its DDP wrapper
            self.net = self._wrap(_LossModule(self.model))
        with self._autocast():
            out = self.net(batch)
        loss = out["loss"]
        if not all_ranks(bool(torch.isfinite(loss.detach()).all())):  # all ranks step, or all skip
            bad = sorted(k for k, v in out.items() if isinstance(v, Tensor) and not bool(torch.isfinite(v).all()))
            self._skip(f"non-finite loss (bad terms on rank {self.dist.rank}: {', '.join(bad) or 'on another rank'})")
            return {"skipped": 1.0}
        self.scaler.scale(loss).backward()
        grad_norm = math.nan
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                self._skip("non-finite gradient norm")
                return {"skipped": 1.0}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_run = 0
        res = {k: float(v.detach()) for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1}
        res["grad_norm"] = grad_norm
        return res

    def _skip(self, why: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_run += 1
        self.skipped_steps += 1
        self._say(f"step {self.step + 1}: {why}; step skipped ({self.nonfinite_run} in a row, "
                  f"limit train.max_nonfinite={self.cfg.train.max_nonfinite})", warn=True)
        if self.nonfinite_run >= self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite_run} consecutive steps with a non-finite loss or gradient (last: {why}) at step "
                f"{self.step + 1}; lower optim.lr, set optim.grad_clip, or check the data. {self._last_good()}")

    # --- divergence ------------------------------------------------------------------------------------
    def _watched_tensors(self) -> list[Tensor]:
        """Weights, floating buffers and optimizer moments: what one optimizer step can turn NaN/Inf."""
        ts = [p.detach() for p in self.model.parameters() if p.numel()]
        ts += [b for b in self.model.buffers() if b.is_floating_point() and b.numel()]
        for st in self.optimizer.state.values():
            ts += [v for k, v in st.items() if k != "step" and isinstance(v, Tensor) and v.is_floating_point()
                   and v.numel()]
        return ts

    def _nonfinite_labels(self) -> list[str]:
        """Readable names of the watched tensors holding NaN/Inf (only computed once the cheap check failed)."""
        labels = [f"weight {n}" for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        labels += [f"buffer {n}" for n, b in self.model.named_buffers()
                   if b.is_floating_point() and not bool(torch.isfinite(b).all())]
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, st in self.optimizer.state.items():
            labels += [f"optimizer {k} of {names.get(id(p), '?')}" for k, v in st.items()
                       if k != "step" and isinstance(v, Tensor) and v.is_floating_point()
                       and not bool(torch.isfinite(v).all())]
        return labels

    def check_finite_state(self, out: dict[str, float]) -> None:
        """Right after an optimizer step: stop when it left NaN/Inf in a weight, buffer or optimizer moment.

        The check is one fused ``_foreach_norm`` (L1, see :func:`_abs_sums`), one host sync, and under DDP one
        all-reduced flag so that every rank stops at the same step.
        """
        ts = self._watched_tensors()
        if not ts:
            return
        norms = _abs_sums(ts)
        bad = not bool(torch.isfinite(torch.stack([n.to(self.device) for n in norms])).all())
        if any_rank(bad):
            self._diverged(out)

    def _diverged(self, out: dict[str, float]) -> None:
        """Stop training: name the step, the tensors that went non-finite, the loss terms and the last good state;
        the trainer is first reset to that state when one was saved (never to the broken weights)."""
        labels: list[str] = []
        for part in all_gather_objects(self._nonfinite_labels()):  # every rank's names (they should agree)
            labels += [x for x in part if x not in labels]
        if not labels:  # finite, but |values| summing past the float range: diverged all the same
            labels = ["weights / optimizer moments too large to sum in float32"]
        terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(out.items()) if k != "skipped") or "none"
        step = self.step + 1
        hint = self._last_good()
        if (self.run_dir / ckpt.LAST_DIR / ckpt.STATE_NAME).is_file():
            with contextlib.suppress(ProsegError):  # the message matters more than the in-memory reset
                self._load_state()
        raise NonFiniteLossError(
            f"step {step}: the optimizer step left non-finite values (NaN/Inf) in {_few(labels)} "
            f"although its loss was finite (loss terms: {terms}); training stopped before anything used them. "
            f"Lower optim.lr or set optim.grad_clip. {hint}")

    def _last_good(self, suspect_from: int | None = None) -> str:
        """Where the last good state of this run really is (checked on disk), and how to go on from it.

        ``suspect_from``: the step whose weights failed; a checkpoint saved at or after it holds them too.
        """
        state = ckpt.saved_state(self.run_dir)
        step = ckpt.checkpoint_step(state.parent) if state is not None else None
        if state is None:
            return (f"No checkpoint was saved yet, so there is nothing to resume: run the same "
                    f"`proseg train ... --out {self.run_dir}` again with the changed config (a run folder "
                    f"without saved state starts afresh)")
        if suspect_from is not None and (step is None or step >= suspect_from):
            return (f"The last saved state, {state.parent} (step {step}), already holds these weights: start "
                    f"over with `proseg train ... --out {self.run_dir} --force` and the changed config")
        return (f"The last good state is {state.parent} (step {step}): continue with `proseg train --resume "
                f"{self.run_dir} optim.lr=...` (unchanged, the resumed run repeats the same steps)")

    # --- validation -------------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any] | None:
        """Score the fold's validation part (never the test part). Returns the summary (every rank)."""
        cases = self.data.val_cases
        if self.cfg.train.max_val_cases:
            cases = cases[: self.cfg.train.max_val_cases]
        if not cases:
            return None
        t0 = time.time()
        modes = self._val_modes()  # at validation time: a model's outputs can depend on its training stage
        # the first case's arrays for the TensorBoard panel (rank 0 holds it: cases are dealt ids[rank::world])
        keep = {cases[0]} if self.logger is not None and self.logger.tb is not None else None
        try:
            records, kept, _ = evaluate_cases(
                self.model, cases, self.data.load_case, modes=modes, num_samples=self.cfg.train.val_num_samples,
                conventions=("standard",), estimator="v", seed=self.cfg.train.seed,
                batch_size=self.cfg.eval.batch_size, keep=keep, rank=self.dist.rank, world_size=self.dist.world_size)
        except NonFiniteError as exc:  # e.g. the metrics refuse NaN predictions (NonFiniteInputError)
            # Finite but diverged weights (e.g. a huge learning rate) can still give NaN outputs: say so, with
            # the step and the checkpoint that holds the last good state, instead of a bare metrics error.
            streak = (f"; the last {self.nonfinite_run} step(s) had a non-finite loss and were skipped"
                      if self.nonfinite_run else "")
            raise NonFiniteLossError(
                f"step {self.step}: validation failed ({exc}): the weights are finite but the model's outputs "
                f"are not, the training has diverged{streak}. Lower optim.lr or set optim.grad_clip. "
                f"{self._last_good(suspect_from=self.step - self.nonfinite_run)}") from exc
        mode = modes[0]
        summary = aggregate([r for r in records if r["mode"] == mode and r["convention"] == "standard"])["metrics"]
        score, higher = selection_score(summary, self.cfg.train.val_metric)
        return {"summary": summary, "score": score, "higher_is_better": higher, "mode": mode,
                "cases": len(cases), "seconds": time.time() - t0, "kept": kept}

    def validate_and_checkpoint(self) -> None:
        """Validate (:meth:`validate`), track the best score, log it, call ``on_validation_end``, then save
        ``checkpoints/last`` and, for a new best (or without a validation part), ``checkpoints/best``."""
        res = self.validate()
        self.last_val_step = self.step
        is_best = False
        score = None
        if res is not None:
            score = float(res["score"])
            if math.isfinite(score):
                better = (self.best_score is None or (score > self.best_score if res["higher_is_better"]
                                                      else score < self.best_score))
                if better:
                    self.best_score, self.best_step, is_best = score, self.step, True
            self._log_validation(res, score, is_best)
            self.on_validation_end(res)
        else:
            # No validation part: the latest weights are the selected ones.
            is_best = True
            self.best_step = self.step
        self.save_checkpoint(best=is_best, score=score)

    def _log_validation(self, res: dict[str, Any], score: float, is_best: bool) -> None:
        if self.val_logger is not None:
            row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "mode": res["mode"],
                   "metric": self.cfg.train.val_metric, "score": score, "best": is_best, "cases": res["cases"],
                   "seconds": round(res["seconds"], 3)}
            row.update({k: v["mean"] for k, v in res["summary"].items()})
            self.val_logger.log(row)
            if self.logger is not None:  # TensorBoard (when installed): val/<metric> scalars, one case panel
                self.logger.add_scalars(row, prefix="val/")
                for case_id, arrays in (res.get("kept") or {}).items():
                    if res["mode"] in arrays:
                        self.logger.add_case_panel(f"val/{case_id}", arrays["image"], arrays["masks"],
                                                   arrays[res["mode"]], self.step)
        self._say(f"step {self.step}: validation {self.cfg.train.val_metric}={score:.4f} on {res['cases']} "
                  f"cases ({res['mode']})" + (" (best)" if is_best else f", best {self.best_score:.4f} "
                                                f"at step {self.best_step}"))

    # --- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until ``total_steps`` or the time budget; returns a summary dict."""
        cfg = self.cfg.train
        self._say(self._plan())
        self._warn_schedule()
        keep_freed_memory()  # no page faults on every step's large temporaries (engine/allocator.py)
        self.on_train_start()
        bar = self._progress_bar()
        self._t_mark = time.time()
        self._log_mark = (self._t_mark, self.step)  # samples/s are measured between log rows
        stop = False
        last: dict[str, float] = {}
        try:
            while self.step < self.total_steps and not stop:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                loader = self.build_loader(epoch, start)
                if start == 0:
                    self.on_epoch_start(epoch)
                for batch in loader:
                    last = self._optimizer_step(batch, bar)
                    stop = cfg.time_budget_s > 0 and any_rank(self.elapsed >= cfg.time_budget_s)
                    if self.step % self.steps_per_epoch == 0:
                        done = self.step // self.steps_per_epoch - 1
                        if (done + 1) % cfg.val_every == 0:
                            self.validate_and_checkpoint()
                        self.on_epoch_end(done)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                            and self.last_val_step != self.step:
                        self.save_checkpoint()
                    self._tick()  # wall clock: validation and checkpoints count too
                    if self.step >= self.total_steps or stop:
                        break
            if stop:
                self._say(f"time budget of {cfg.time_budget_s:g} s spent at step {self.step}/{self.total_steps}")
            if self.last_val_step != self.step:
                self.validate_and_checkpoint()
            self.on_train_end()
            for logger in (self.logger, self.val_logger):
                if logger is not None:
                    logger.close()
        finally:
            if bar is not None:
                bar.close()
            if self.dist.enabled:
                # Free the DDP reducer while the process group still exists: freed after destroy_process_group,
                # its gloo group is torn down from the main thread (GIL held) while a gloo worker thread still
                # needs the GIL to release a finished buffer broadcast -- a deadlock seen once in CI.
                self.net = None
                gc.collect()
        return {"steps": self.step, "total_steps": self.total_steps, "best_score": self.best_score,
                "best_step": self.best_step, "elapsed_s": self.elapsed, "skipped_steps": self.skipped_steps,
                "stopped_by_budget": stop, "last": last, "run_dir": str(self.run_dir)}

    def _optimizer_step(self, batch: dict[str, Tensor], bar: Any) -> dict[str, float]:
        """Step ``self.step`` with its bookkeeping: keyed reseed, learning rate, :meth:`train_step`, the finite-state
        check, the clock, ``on_train_step_end``, the log row and the progress bar."""
        cfg = self.cfg.train
        seed_all(derive_seed(cfg.seed, self.dist.rank, self.step))
        factor = schedule.lr_factor(self.step, self.total_steps, self.cfg.optim, self._budget_progress())
        lr = schedule.set_lr(self.optimizer, factor)
        out = self.train_step(batch)
        if not out.get("skipped"):
            self.check_finite_state(out)  # before a validation or checkpoint can use the weights
        self.step += 1
        now = self._tick()
        self.on_train_step_end(out)
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            t0, step0 = self._log_mark
            row = self._log_row(out, lr, (self.step - step0) * cfg.batch_size / max(now - t0, 1e-9))
            self._log_mark = (now, self.step)
            if bar is not None:
                bar.set_info(f"loss {row.get('loss', math.nan):.4f}  {row['samples_per_s']:.1f} img/s")
        if bar is not None:
            bar.update(1)
        if not self._budget_checked and self.cfg.train.time_budget_s > 0 \
                and self.elapsed >= 0.05 * self.cfg.train.time_budget_s:
            self._budget_checked = True  # once, when the pace is known (5 % of the budget spent)
            msg = schedule.budget_warmup_warning(self.cfg.optim, self.cfg.train.time_budget_s, self.step, self.elapsed)
            if msg and self.dist.is_main and self.step < self.cfg.optim.warmup_steps:
                warnings.warn(msg, ProsegWarning, stacklevel=2)
        return out

    def _tick(self) -> float:
        """Add the wall-clock time since the last tick to ``elapsed``; returns now."""
        now = time.time()
        self.elapsed += now - self._t_mark
        self._t_mark = now
        return now

    def _budget_progress(self) -> float | None:
        """The spent fraction of ``train.time_budget_s`` (None without a budget), the same on every rank."""
        budget = self.cfg.train.time_budget_s
        if budget <= 0:
            return None
        spent = all_reduce_max(self.elapsed + (time.time() - self._t_mark), self.device)  # every rank: same lr
        return min(spent / budget, 1.0)

    def _log_row(self, out: dict[str, float], lr: float, samples_per_s: float) -> dict[str, Any]:
        keys = sorted(k for k in out if k != "skipped")
        vals = torch.tensor([out.get(k, math.nan) for k in keys], dtype=torch.float64)
        if same_on_all_ranks(len(keys)):  # the global batch's loss: mean over ranks
            vals = all_reduce_mean(vals, self.device)
        row: dict[str, Any] = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "lr": lr}
        row.update({k: float(v) for k, v in zip(keys, vals.tolist(), strict=True)})
        row.update({"skipped": int(out.get("skipped", 0)), "samples_per_s": round(samples_per_s, 2),
                    "elapsed_s": round(self.elapsed, 3)})
        if self.logger is not None:
            self.logger.log(row)
        return row

    def _plan(self) -> str:
        return (f"training {getattr(self.model, 'model_name', '') or type(self.model).__name__} for "
                f"{self.total_steps} steps ({self.steps_per_epoch} per epoch, global batch "
                f"{self.cfg.train.batch_size} on {self.dist.world_size} process(es), {self.device}) -> "
                f"{self.run_dir}" + (f", resuming at step {self.step}" if self.step else ""))

    def _warn_schedule(self) -> None:
        """A :class:`ProsegWarning` (rank 0) for each thing the schedule cannot do as configured."""
        self._budget_checked = self.step >= self.cfg.optim.warmup_steps  # nothing left to check after warm-up
        if self.dist.is_main:
            for msg in schedule.schedule_warnings(self.cfg.optim, self.cfg.train, self.total_steps,
                                                  self.steps_per_epoch):
                warnings.warn(msg, ProsegWarning, stacklevel=3)

    def _progress_bar(self) -> Progress | None:
        """Rank 0's progress: a bar on a terminal, a plain ``step N/M`` line now and then in a log file."""
        if not self.dist.is_main:
            return None
        return Progress(self.total_steps, "train", "step", initial=self.step, show_rate=False)

    def _note(self, msg: str | None) -> None:
        if msg:
            self._say(msg)

    def _say(self, msg: str, warn: bool = False) -> None:
        if self.dist.is_main or warn:
            prefix = "warning: " if warn else ""
            tqdm.write(f"[proseg] {prefix}{msg}", file=sys.stderr)


def _few(names: Sequence[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _abs_sums(ts: list[Tensor]) -> list[Tensor]:
    """Sum of |x| of each tensor, fused where torch has ``_foreach_norm``: NaN/Inf when the tensor holds one.

    The L1 norm: it is 3x cheaper than the max-norm on CPU, and unlike the L2 norm it does not overflow for the
    squares of large finite values (Adam's ``exp_avg_sq`` already holds squares). Half-precision tensors are
    summed in float32 so that their sum cannot overflow.
    """
    foreach = getattr(torch, "_foreach_norm", None)
    if foreach is None:  # pragma: no cover - older torch
        return [t.abs().sum(dtype=torch.float32 if t.dtype in _LOW_PRECISION else None) for t in ts]
    low = [t for t in ts if t.dtype in _LOW_PRECISION]
    rest = [t for t in ts if t.dtype not in _LOW_PRECISION] if low else ts
    out = list(foreach(rest, ord=1)) if rest else []
    return out + (list(foreach(low, ord=1, dtype=torch.float32)) if low else [])
