"""Keyed randomness: every seed the engine uses is a hash of what it is for, never the state of a stream.

* :func:`derive_seed` ``(seed, rank, step)``: the trainer reseeds every global RNG from it before each optimizer
  step (:func:`seed_all`), so a run resumes exactly from any saved step;
* :func:`case_seed` ``(seed, case_id)``: the evaluation loop's per-case generators, so scores do not depend on the
  number of processes or the order in which cases are visited.

Both are 63-bit integers from sha256, stable across processes, platforms, Python versions and hash seeds.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

__all__ = ["case_seed", "derive_seed", "seed_all"]


def _seed_of(key: str) -> int:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. ``derive_seed(seed, rank, step)``."""
    return _seed_of(",".join(str(int(p)) for p in parts))


def case_seed(seed: int, case_id: str) -> int:
    """A 63-bit seed from ``(seed, case_id)``."""
    return _seed_of(f"{int(seed)}\x00{case_id}")


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's legacy global and torch's global RNGs (CPU and CUDA) from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))  # noqa: NPY002 (third-party code may draw from the legacy global RNG)
    torch.manual_seed(seed)
