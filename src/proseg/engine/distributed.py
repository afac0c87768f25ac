"""DDP plumbing in the nanoGPT style: switched on by the ``RANK``/``WORLD_SIZE`` variables torchrun sets.

Backends: ``nccl`` when the run uses CUDA, ``gloo`` on CPU. Rank 0 is the "main" process (logging,
checkpoints, figures). Every collective of the engine is one small named function here (:func:`any_rank`,
:func:`all_ranks`, :func:`all_reduce_max`, :func:`all_reduce_mean`, :func:`all_gather_objects`,
:func:`broadcast_object`, :func:`main_rank_does`), so the training loop holds no ``torch.distributed`` call;
each is a no-op (it returns its input) in a plain single-process run. Every rank must call them in the same
order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from proseg.errors import CommandError, ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); defaults to one process."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise CommandError(f"the environment variables RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from exc
    if world < 1 or not 0 <= rank < world:
        raise CommandError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def resolve_device(spec: str, info: DistInfo, key: str = "device") -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; ``cuda`` -> ``cuda:<local_rank>``.

    A device this machine does not have raises :class:`ConfigError` naming ``key`` (the config key or option).
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"{key}={spec}: not a device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={spec} but CUDA is not available on this machine (use {key}=cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", info.local_rank % max(count, 1))
        elif device.index >= count:
            raise ConfigError(f"{key}={spec} but this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}")
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device, info: DistInfo) -> None:
    """Join the process group (``nccl`` for CUDA, ``gloo`` otherwise) when launched with WORLD_SIZE > 1."""
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)


def cleanup_distributed() -> None:
    """Leave the process group at the end of a command that succeeded on every rank: a barrier first, so no rank
    tears down its gloo/NCCL pairs while a peer is still using them (a rank that raised never gets here, and
    torchrun stops the group when a worker fails)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_rank_does(fn: Callable[[], None], catch: tuple[type[BaseException], ...]) -> None:
    """Run ``fn`` on rank 0 only and share its verdict: an exception of the types in ``catch`` it raised is raised
    on every rank (rank 0's own object there, an unpickled copy elsewhere). Also the barrier: no rank returns
    before ``fn`` has finished (e.g. a run folder is ready before any rank reads it)."""
    err: BaseException | None = None
    if not is_dist() or dist.get_rank() == 0:
        try:
            fn()
        except catch as exc:
            err = exc
    shared = broadcast_object(err)
    if err is not None:
        raise err
    if shared is not None:
        raise shared


def _for_backend(t: Tensor, device: torch.device | None = None) -> Tensor:
    """``t`` where the process group's backend can reduce it: a CUDA device for ``nccl`` (``device``, else the
    current one), the CPU for ``gloo``."""
    if dist.get_backend() != "nccl":
        return t
    return t.to(device) if device is not None else t.cuda()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any rank (e.g. "stop now: time budget spent")."""
    if not is_dist():
        return flag
    t = _for_backend(torch.tensor([1.0 if flag else 0.0]))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_ranks(flag: bool) -> bool:
    """True on every rank when it is True on every rank (e.g. "the loss is finite": all step, or all skip)."""
    return not any_rank(not flag)


def all_reduce_max(value: float, device: torch.device | None = None) -> float:
    """The largest ``value`` over the ranks, in float64 (e.g. the time spent: every rank then agrees on it)."""
    if not is_dist():
        return value
    t = _for_backend(torch.tensor([value], dtype=torch.float64), device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(t: Tensor, device: torch.device | None = None) -> Tensor:
    """The mean of ``t`` over the ranks, on the CPU (a copy); ``t`` itself in a single process.

    Every rank must pass a tensor of the same shape (see :func:`same_on_all_ranks`)."""
    if not is_dist():
        return t
    s = _for_backend(t.clone(), device)
    dist.all_reduce(s)
    return s.cpu() / dist.get_world_size()


def same_on_all_ranks(value: Any) -> bool:
    """Whether every rank passed an equal ``value`` (e.g. a length, before reducing tensors of that length)."""
    values = all_gather_objects(value)
    return all(v == values[0] for v in values)
