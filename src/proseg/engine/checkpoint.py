"""Resumable training state and run-directory layout.

A run directory holds::

    config.yaml          the resolved configuration
    run.json             proseg version, git commit, dataset manifest checksum, world size, command
    log.csv, log.jsonl   one row per logged training step; val.jsonl one row per validation
    checkpoints/last/    model.safetensors + model.json (release weights) and state.pt (everything to resume)
    checkpoints/best/    model.safetensors + model.json of the best validation score

``state.pt`` is one ``torch.save`` dict of tensors and plain Python values (model and optimizer state, LR
scheduler, grad scaler, the RNG states of Python, NumPy, torch CPU/CUDA and the data-order generator, epoch,
step, best score, elapsed seconds), written atomically (temp file, fsync, rename) and read back with
``torch.load(weights_only=True)``. Resume reads only ``state.pt``: it holds the model weights too, so the
weights and the optimizer state can never come from two different steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proseg.fsutil import atomic_write_bytes, atomic_write_text

STATE_NAME = "state.pt"
LAST_DIR = "checkpoints/last"
BEST_DIR = "checkpoints/best"



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
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable proseg training state ({type(exc).__name__}: {exc})") from exc


# --- run metadata -------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    return file_sha256(p) if p.is_file() else None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A run directory (its best, else last, checkpoint) or a checkpoint directory -> the checkpoint directory.

    Raises FileNotFoundError naming the path when neither holds ``model.json`` + ``model.safetensors``.
    """
    from proseg.models.base import CONFIG_NAME, WEIGHTS_NAME

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run or checkpoint directory")
    if p.is_file():
        p = p.parent
    for cand in (p, p / BEST_DIR, p / LAST_DIR):
        if (cand / CONFIG_NAME).is_file() and (cand / WEIGHTS_NAME).is_file():
            return cand
    raise FileNotFoundError(f"{p}: not a proseg checkpoint (no {CONFIG_NAME} + {WEIGHTS_NAME} in it, "
                            f"nor in {BEST_DIR} or {LAST_DIR})")


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (it has a config.yaml), or None."""
    for cand in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (cand / "config.yaml").is_file() and (cand / "run.json").is_file():
            return cand
    return None
