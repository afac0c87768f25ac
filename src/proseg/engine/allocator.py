"""Keep the C allocator from handing large tensors back to the kernel between training steps.

glibc ``malloc`` serves blocks above ``M_MMAP_THRESHOLD`` (dynamic, 128 KiB to 32 MiB) with fresh ``mmap``s and
returns freed memory above ``M_TRIM_THRESHOLD`` to the kernel. A training step allocates and frees the same large
activations every time, so each step pays again for fresh zeroed pages (measured for ProSeg ``default`` at batch 16,
one thread: 29,100 minor page faults per step, 770 with this setting; docs/engine.md). Raising both thresholds
once keeps those pages mapped and reused; the process's resident memory then stays at its peak instead of
shrinking between steps, which is what a training process wants anyway.

Only CPU memory and only glibc (Linux) are concerned: elsewhere :func:`keep_freed_memory` does nothing. CUDA
tensors use torch's own caching allocator already.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 * 1024 * 1024
#: freed memory at the top of the heap is kept up to this size
TRIM_THRESHOLD = 4 * 1024 * 1024 * 1024

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (idempotent); True when it took effect.

    Safe to call anywhere: on a non-glibc platform, or if ``mallopt`` refuses a value, nothing changes and False is
    returned. Set once per process, before the first training step (the engine does, in ``Trainer.fit``).
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = (mallopt(_M_TRIM_THRESHOLD, min(TRIM_THRESHOLD, 2**31 - 1)) == 1) and ok
    _done = ok
    return ok
