"""Resumable training state and run-directory layout.

A run directory holds::

    config.yaml          the resolved configuration
    run.json             proseg version, git commit, dataset manifest checksum, world size, command
    log.csv, log.jsonl   one row per logged training step; val.csv, val.jsonl one row per validation
    tensorboard/         the same scalars, when the ``tensorboard`` package is installed
    checkpoints/last/    model.safetensors + model.json (release weights) and state.pt (everything to resume)
    checkpoints/best/    model.safetensors + model.json of the best validation score

``state.pt`` is one ``torch.save`` dict of tensors and plain Python values, :meth:`Trainer.state_dict()
<proseg.engine.trainer.Trainer.state_dict>`: ``model`` (the weights), ``optimizer``, ``scaler`` (the gradient
scaler), ``rng`` (the global RNG states of Python, NumPy, torch CPU and, when initialised, CUDA:
:func:`capture_rng_state`), ``step``, ``epoch``, ``best_score``, ``best_step``, ``elapsed`` (seconds),
``nonfinite_run``, ``skipped_steps``, ``last_val_step``, ``world_size``, ``global_batch`` and ``proseg_version``.
There is no scheduler state (the learning rate is a function of the step) and no data-order state (the order is a
function of seed and epoch). It is written atomically (temp file, fsync, rename) and read back with
``torch.load(weights_only=True)``. Resume reads only ``state.pt``: it holds the model weights too, so the
weights and the optimizer state can never come from two different steps.

A checkpoint folder is swapped in whole (:func:`write_checkpoint`): all its files are written into a hidden
``checkpoints/.last.tmp-XXXX`` beside it, fsynced, then renamed into place (:func:`proseg.fsutil.swap_in_dir`),
so ``model.safetensors``, ``model.json`` and ``state.pt`` always come from the same step. A failed save (a full
disk ...) leaves the previous folder untouched and raises :class:`CheckpointError` saying which step it still
holds. A crash between the two renames of a swap leaves the previous folder in ``checkpoints/.last.old-XXXX/x``:
:func:`recover_checkpoints` (run by the trainer before it looks at a run) renames it back, and
:func:`resolve_checkpoint` reads it in the meantime.

Run folder rules (:func:`plan_run_dir`): a folder without saved state (no ``checkpoints/last/state.pt``) is
started afresh by the same ``proseg train --out RUN``; one with saved state is continued with ``--resume RUN``
or replaced with ``--force``; ``--force`` never deletes a non-empty folder that is not a proseg run.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proseg.errors import CheckpointError, CommandError, disk_full_message, is_disk_full
from proseg.fsutil import (
    atomic_write_bytes,
    displaced_dir,
    empty_dir,
    is_displaced,
    recover_dir,
    sha256_file,
    staged_dir,
)
from proseg.models import save_model
from proseg.models.base import CONFIG_NAME, WEIGHTS_NAME, read_model_meta

STATE_NAME = "state.pt"
CONFIG_FILE = "config.yaml"  # the resolved configuration of a run
RUN_INFO_FILE = "run.json"  # versions, dataset checksum, world size, command, resumes
CHECKPOINTS_DIR = "checkpoints"
LAST_DIR = f"{CHECKPOINTS_DIR}/last"
BEST_DIR = f"{CHECKPOINTS_DIR}/best"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG_FILE, RUN_INFO_FILE)  # what makes a folder a proseg run folder


def _np_state_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_plain(d: dict[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA RNG states, as weights_only-loadable values."""
    py = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": _np_state_to_plain(np.random.get_state()),  # noqa: NPY002 (the legacy global RNG)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state(_np_state_from_plain(state["numpy"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- state files --------------------------------------------------------------------------------------
def save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` atomically to ``path``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a ``state.pt`` with ``weights_only=True`` (no arbitrary unpickling)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state to resume from")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable proseg training state, truncated or damaged "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a proseg training state (a {type(state).__name__}, not a dict)")
    return state


def checkpoint_step(directory: Path) -> int | None:
    """The training step recorded in ``directory/model.json`` (None when there is no readable one)."""
    try:
        step = read_model_meta(directory).get("step")
    except (OSError, ValueError):  # FileNotFoundError, CheckpointError: no readable model.json
        return None
    return int(step) if isinstance(step, int) else None


def describe_checkpoint(directory: Path) -> str:
    """``"RUN/checkpoints/last still holds step N"`` for an existing checkpoint folder, ``"no checkpoint in
    RUN/checkpoints/last yet"`` else (the second half of a failed save's message)."""
    if not directory.is_dir():
        return f"no checkpoint in {directory} yet"
    step = checkpoint_step(directory)
    return f"{directory} still holds step {step}" if step is not None else f"{directory} is unchanged"


def write_checkpoint(directory: Path, model: torch.nn.Module, extra: dict[str, Any],
                     state: dict[str, Any] | None = None, untouched: tuple[Path, ...] = ()) -> None:
    """Write ``model.safetensors`` + ``model.json`` (and ``state.pt`` when ``state`` is given) as one folder.

    The files go into a hidden folder beside ``directory`` that replaces it only once all are written and
    fsynced. Any OSError (a full disk ...) leaves ``directory`` as it was and raises :class:`CheckpointError`
    saying so, e.g. ``no space left on the device writing RUN/checkpoints/last/state.pt: RUN/checkpoints/last
    still holds step 40; free some space ...`` (the folders in ``untouched`` are described too).
    """
    failure: OSError | None = None
    try:
        with staged_dir(directory) as tmp:
            save_model(model, tmp, extra=extra)
            if state is not None:
                save_state(tmp / STATE_NAME, state)
    except OSError as exc:
        failure = exc
    if failure is None:
        return
    # Raised outside the except block on purpose: a chained OSError(ENOSPC) would make the CLI print its
    # generic disk-full line instead of this one, which says what the checkpoint folders still hold.
    kept = " and ".join(describe_checkpoint(d) for d in (directory, *untouched))
    name = Path(failure.filename).name if failure.filename else ""
    shown = directory / name if name else directory  # the file the user knows, not the hidden temp copy
    if is_disk_full(failure):
        renamed = OSError(failure.errno, failure.strerror, str(shown))
        raise CheckpointError(disk_full_message(renamed, kept))
    raise CheckpointError(f"saving {shown} failed ({failure.strerror or failure}): {kept}")


# --- run folders --------------------------------------------------------------------------------------
def recover_checkpoints(run_dir: Path) -> None:
    """Put back a checkpoint folder that a crash in the middle of its swap left displaced, drop stale work
    folders (see :func:`proseg.fsutil.recover_dir`). Only the process that writes the run may call this."""
    for d in (LAST_DIR, BEST_DIR):
        recover_dir(run_dir / d)


def saved_state(run_dir: Path) -> Path | None:
    """The ``state.pt`` a resume would read: ``checkpoints/last/state.pt``, or the copy a crash in the middle of
    a swap left displaced (put back by :func:`recover_checkpoints`); None when the run has no saved state."""
    last = run_dir / LAST_DIR
    if (last / STATE_NAME).is_file():
        return last / STATE_NAME
    old = None if last.exists() else displaced_dir(last)
    return old / STATE_NAME if old is not None and (old / STATE_NAME).is_file() else None


def is_run_dir(run_dir: Path) -> bool:
    """A proseg run folder: it has ``config.yaml`` or ``run.json`` (or saved training state)."""
    return any((run_dir / f).is_file() for f in RUN_FILES) or saved_state(run_dir) is not None


def _recorded_command(run_dir: Path) -> str:
    try:
        cmd = json.loads((run_dir / RUN_INFO_FILE).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (its command was: {cmd})" if isinstance(cmd, str) and cmd else ""


def plan_run_dir(run_dir: Path, *, resume: bool, force: bool) -> str:
    """What ``proseg train`` does with ``run_dir``; the one rule behind ``--out``, ``--resume`` and ``--force``.

    Returns ``"new"`` (nothing there, or a folder that is not a run: files are added), ``"afresh"`` (a run
    folder without saved state, e.g. one that failed before its first checkpoint: it is started again),
    ``"replace"`` (``force``: the run folder is emptied first) or ``"resume"``. Raises (changing nothing):
    ``FileExistsError`` for a run with saved state and neither ``resume`` nor ``force``;
    :class:`CheckpointError` for ``resume`` without saved state; :class:`CommandError` for ``force`` on a
    non-empty folder that is not a proseg run, or with ``resume``.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir}: exists and is not a directory")
    state = saved_state(run_dir)
    if resume:
        if force:
            raise CommandError("--resume continues a run and --force replaces it; pass one of them")
        if state is None:
            raise CheckpointError(
                f"{run_dir}: nothing to resume: no saved state ({LAST_DIR}/{STATE_NAME}), the run stopped before "
                f"its first checkpoint; start it afresh by re-running `proseg train ... --out {run_dir}`"
                f"{_recorded_command(run_dir)}")
        return "resume"
    if force:
        if not run_dir.is_dir() or not any(run_dir.iterdir()):
            return "new"
        if not is_run_dir(run_dir):
            raise CommandError(f"{run_dir}: not a proseg run folder (no {' or '.join(RUN_FILES)}) and not empty; "
                               f"--force only replaces runs, it will not delete it; choose another --out")
        return "replace"
    if state is not None:
        step = checkpoint_step(state.parent)
        at = f" (saved state at step {step})" if step is not None else ""
        raise FileExistsError(f"{run_dir}: already holds a run{at}; continue it with --resume {run_dir}, or "
                              f"replace it with --force")
    return "afresh" if is_run_dir(run_dir) else "new"


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> str | None:
    """Apply :func:`plan_run_dir` to ``run_dir`` (only the process that writes the run may call this); returns
    what to tell the user, or None.

    ``resume``: a checkpoint folder a crash left displaced is put back (:func:`recover_checkpoints`);
    ``replace``: the folder is emptied, its saved state first (a cut-short delete must not look resumable);
    ``afresh``: the stale ``checkpoints/`` and ``tensorboard/`` go (the logs and run files are rewritten anyway).
    """
    plan = plan_run_dir(run_dir, resume=resume, force=force)
    note = None
    if plan == "resume":
        recover_checkpoints(run_dir)
    elif plan == "replace":
        state = saved_state(run_dir)
        step = checkpoint_step(state.parent) if state is not None else None
        note = f"--force: replacing the run in {run_dir}" + (f" (it was at step {step})" if step else "")
        empty_dir(run_dir, first=(CHECKPOINTS_DIR,))
    elif plan == "afresh":
        note = f"no saved state in {run_dir}; starting afresh"
        for stale in (CHECKPOINTS_DIR, TENSORBOARD_DIR):
            if (run_dir / stale).is_dir():
                shutil.rmtree(run_dir / stale)
    run_dir.mkdir(parents=True, exist_ok=True)
    return note


# --- run metadata -------------------------------------------------------------------------------------
def git_commit() -> str | None:
    """The commit of the proseg source tree when it is a git checkout (None otherwise)."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("-dirty" if dirty else "")


def manifest_checksum(dataset: str | os.PathLike[str]) -> str | None:
    """sha256 of the prepared dataset's ``manifest.json`` (None when there is none)."""
    p = Path(dataset) / "manifest.json"
    return sha256_file(p) if p.is_file() else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A run directory (its best, else last, checkpoint) or a checkpoint directory -> the checkpoint directory.

    Raises FileNotFoundError naming the path when neither holds ``model.json`` + ``model.safetensors``.
    """

    def complete(d: Path) -> bool:
        return (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()

    p = Path(path)
    if not p.exists():
        old = displaced_dir(p)  # a checkpoint folder caught in the middle of its swap
        if old is not None and complete(old):
            return old
        raise FileNotFoundError(f"{p}: no such run or checkpoint directory")
    if p.is_file():
        p = p.parent
    for cand in (p, p / BEST_DIR, p / LAST_DIR):
        if complete(cand):
            return cand
        old = None if cand.exists() else displaced_dir(cand)
        if old is not None and complete(old):
            return old
    raise FileNotFoundError(f"{p}: not a proseg checkpoint (no {CONFIG_NAME} + {WEIGHTS_NAME} in it, "
                            f"nor in {BEST_DIR} or {LAST_DIR})")


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (it has ``config.yaml`` and ``run.json``), or None."""
    cands = [checkpoint, checkpoint.parent, checkpoint.parent.parent]
    if is_displaced(checkpoint):  # a displaced copy: RUN/checkpoints/.last.old-XXXX/x
        cands.append(checkpoint.parent.parent.parent)
    for cand in cands:
        if all((cand / f).is_file() for f in RUN_FILES):
            return cand
    return None
