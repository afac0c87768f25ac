"""Pieces every model uses, written once: generator-driven noise (and its per-sample parallel form), the
(image, rater) pairs a training step uses, the L2 sum of a head's weights, the check of the shared
``rater_sampling`` option, and the folded inference copy of a convolutional network.

Randomness rule (every draw of every model): the numbers are drawn **on the generator's device** (the input's when
the generator is None, i.e. from the global RNG of that device) **in the dtype of the tensor they go with** (``like``;
float32 when ``like`` is not floating point, e.g. a bool rater mask) and then moved to ``like``'s device. So a CPU
generator gives the same numbers whatever device the model runs on, and equally seeded generators give equal draws.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

RATER_SAMPLING = ("one", "all")
#: how :func:`pick_present_rater` draws: ``multinomial`` (ProSeg, Pionono, CM) or ``argmax`` of uniforms (Prob. U-Net,
#: PHiSeg, D-Persona). Both are uniform over the present raters; they consume the generator differently, so each
#: model keeps the one its stored outputs (tests/models/stored_outputs.json) were made with.
RATER_PICKS = ("multinomial", "argmax")


def noise(kind: str, shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard-normal (``kind="normal"``) or uniform [0, 1) (``"uniform"``) noise of ``shape``, drawn by the rule
    of the module docstring: on ``generator``'s device (``like``'s when None), in ``like``'s dtype (float32 for a
    non-floating ``like``), returned on ``like``'s device."""
    if kind not in ("normal", "uniform"):
        raise ValueError(f"noise kind must be 'normal' or 'uniform', got {kind!r}")
    device = generator.device if generator is not None else like.device
    dtype = like.dtype if like.is_floating_point() else torch.float32
    fn = torch.randn if kind == "normal" else torch.rand
    return fn(tuple(shape), generator=generator, device=device, dtype=dtype).to(like.device)


def sample_seeds(num: int, generator: torch.Generator | None, like: Tensor) -> list[int]:
    """``num`` seeds for :func:`normal_from_seeds`, drawn from ``generator`` (the global RNG of ``like``'s device when
    None): one draw per sample, so sample i's noise is the same however the samples are later split or batched."""
    device = generator.device if generator is not None else like.device
    return torch.randint(0, 2**62, (int(num),), generator=generator, device=device).tolist()


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool) of normal_from_seeds
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:  # a forked child (a DataLoader worker) must not use the parent's threads
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def _noise_pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != workers:
            if _POOL is not None:
                _POOL[1].shutdown(wait=False)
            _POOL = (workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="proseg-noise"))
        return _POOL[1]


def normal_from_seeds(seeds: Sequence[int], shape: Sequence[int], like: Tensor,
                      device: torch.device | str | None = None) -> Tensor:
    """``(len(seeds), *shape)`` standard normals in ``like``'s dtype, on ``like``'s device: sample i is drawn from a
    generator seeded with ``seeds[i]`` on ``device`` (the seeds' generator's; default ``like``'s), so by the module's
    randomness rule a CPU generator gives the same numbers on every device.

    Why: a torch CPU generator is serial (about 5-7 ns a number, whatever the thread count), and ProSeg's Z of 52
    samples is 3.4 M numbers. With one generator per sample, CPU draws run on ``torch.get_num_threads()`` threads
    (torch releases the GIL inside ``normal_``) and the result does not depend on the thread count."""
    device = torch.device(device) if device is not None else like.device
    dtype = like.dtype if like.is_floating_point() else torch.float32
    out = torch.empty((len(seeds), *shape), dtype=dtype, device=device)

    inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads must share the caller's

    def fill(i: int) -> None:
        with torch.inference_mode(inference):
            out[i].normal_(generator=torch.Generator(device=device).manual_seed(int(seeds[i])))

    workers = min(len(seeds), torch.get_num_threads()) if device.type == "cpu" else 1
    if workers > 1:
        for f in [_noise_pool(workers).submit(fill, i) for i in range(len(seeds))]:
            f.result()
    else:
        for i in range(len(seeds)):
            fill(i)
    return out.to(like.device)


def pick_present_rater(present: Tensor, generator: torch.Generator | None, method: str) -> tuple[Tensor, Tensor]:
    """One rater per image, uniformly among its present ones, from ``generator``.

    Args:
        present: ``(B, R)`` bool.
        method: ``"multinomial"`` (``torch.multinomial`` over the present raters, on the generator's device) or
            ``"argmax"`` (the argmax of one uniform per rater, absent raters excluded); see :data:`RATER_PICKS`.

    Returns:
        ``idx`` ``(B,)`` long and ``valid`` ``(B,)`` bool: False where the image has no present rater (``idx`` is
        then arbitrary and the image must contribute nothing).
    """
    valid = present.any(dim=1)
    if method == "argmax":
        u = noise("uniform", present.shape, generator, present)
        return torch.where(present, u, torch.full_like(u, -1.0)).argmax(dim=1), valid
    if method != "multinomial":
        raise ValueError(f"rater pick method must be one of {RATER_PICKS}, got {method!r}")
    probs = torch.where(valid[:, None], present.float(), torch.ones_like(present, dtype=torch.float))
    device = generator.device if generator is not None else probs.device
    idx = torch.multinomial(probs.to(device), 1, generator=generator).to(present.device)
    return idx[:, 0], valid


def training_pairs(
    masks: Tensor, present: Tensor, mode: str, generator: torch.Generator | None, pick: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The (image, rater) pairs a training step uses.

    Args:
        masks: ``(B, R, H, W)``; present: ``(B, R)`` bool.
        mode: ``"all"`` (every rater of every image; the absent ones weigh 0) or ``"one"`` (per image one present
            rater drawn with :func:`pick_present_rater` and ``pick``, as the reference training scripts).

    Returns:
        ``raters`` ``(B, N)`` long, ``weight`` ``(B, N)`` bool and ``target`` ``(B, N, H, W)`` (the pair's mask, all
        zero where ``weight`` is False, so an absent rater's mask is never read), with N = R (``all``, ``raters[b] =
        0..R-1``) or 1 (``one``).
    """
    if mode == "all":
        raters = torch.arange(present.shape[1], device=present.device).expand(present.shape)
        return raters, present, masks * present[..., None, None].to(masks.dtype)
    if mode != "one":
        raise ValueError(f"rater_sampling must be one of {RATER_SAMPLING}, got {mode!r}")
    idx, valid = pick_present_rater(present, generator, pick)
    target = masks[torch.arange(masks.shape[0], device=masks.device), idx][:, None]
    return idx[:, None], valid[:, None], target * valid[:, None, None, None].to(masks.dtype)


def l2_norm_sum(params: Iterable[Tensor], sequential: bool = False) -> Tensor | None:
    """Sum of the (non-squared) L2 norms of ``params``, the reference ``l2_regularisation`` of the Prob. U-Net ports
    (ProSeg/Pionono: their heads' layers but the last; Prob. U-Net/D-Persona: prior, posterior and fcomb).

    ``sequential=True`` adds the norms one after another, else they are summed in one reduction; the two round
    differently in the last bits, and each model keeps the order its stored outputs were made with. None when
    ``params`` is empty.
    """
    norms = [p.norm(2) for p in params]
    if not norms:
        return None
    if not sequential:
        return torch.stack(norms).sum()
    total = norms[0]
    for n in norms[1:]:
        total = total + n
    return total


def check_rater_sampling(mode: str) -> str:
    """``mode`` if it is one of :data:`RATER_SAMPLING`, else ValueError."""
    if mode not in RATER_SAMPLING:
        raise ValueError(f"rater_sampling must be 'one' or 'all', got {mode!r}")
    return mode


def inference_copy(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` that computes the same function faster, for sampling without gradients.

    Every ``BatchNorm2d`` (with running statistics) that directly follows a ``Conv2d`` inside an ``nn.Sequential``
    is folded into that convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``: equal up to float rounding, about
    1e-7), and the 4D weights are channels-last (oneDNN's faster inference layout at these widths; feed it
    channels-last inputs). The original module is untouched; the copy shares nothing with it, so build it after
    the weights have changed (it costs one copy of the weights)."""
    out = copy.deepcopy(module).eval()
    for seq in out.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return out.to(memory_format=torch.channels_last)


_COPIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], nn.Module]] = weakref.WeakKeyDictionary()


def cached_inference_copy(module: nn.Module) -> nn.Module:
    """:func:`inference_copy` of ``module``, rebuilt only when one of its parameters or buffers changed (storage or
    in-place version: an optimizer step, ``load_state_dict``, ``.to(device)``). An evaluation samples every case
    through the same weights, so the copy (0.14 s for PHiSeg's 17.8 M parameters) is made once, not per case."""
    key = tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))
    hit = _COPIES.get(module)
    if hit is None or hit[0] != key:
        hit = (key, inference_copy(module))
        _COPIES[module] = hit
    return hit[1]
