"""Is ProSeg's ``reference`` preset within 10 % of its compute floor? Paired steps in one process.

Usage::

    python benchmarks/preset_floor.py                     # 9 alternating pairs, batch 16, 128x128, 2 threads
    python benchmarks/preset_floor.py --pairs 15 --threads 1 --json floor.json

The preset's floor is the work it cannot avoid: its backbone and its reconstruction decoder are each a ResNet-34
U-Net, plus the statistic and remap heads and the first convolution of an 8-channel input. So the floor is
``F x (2 x step of one plain ResNet-34 U-Net)``, with F the preset's forward FLOPs over two such U-Nets' forward
FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` (forward only: the counter over-counts the backward
of grouped convolutions, which the preset's one-rater heads use; see ``model_speed.py``).

``model_speed.py`` times each model in its own subprocess at a different moment, and on a shared 2-core machine a
step's time moves by 30 % or more from one minute to the next, which alone made the preset look 1.23-1.38x two
U-Nets. Here the plain U-Net (backbone + 3x3 head, BCE: ``model_speed.py``'s calibration row) and the preset take
turns in one process on the same batch, after one warm-up step each, and the script prints the median of each,
the ratio of the medians, the paired ratios and the ratio to the floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=9, help="timed (U-Net, preset) pairs, after one warm-up pair")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--raters", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON here")
    args = p.parse_args(argv)

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_speed import _PlainSegmenter
    from proseg.engine.allocator import keep_freed_memory
    from proseg.models import create_model

    keep_freed_memory()  # as the trainer does
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, R, S = args.batch, args.raters, args.size
    batch = {"image": torch.randn(B, 1, S, S, generator=g),
             "masks": (torch.rand(B, R, S, S, generator=g) > 0.5).float(),
             "present": torch.ones(B, R, dtype=torch.bool)}
    torch.manual_seed(0)
    plain = _PlainSegmenter("resnet34_unet", 1)
    preset_model = create_model("proseg", preset="reference", in_channels=1, num_raters=R)
    unet, preset = "plain ResNet-34 U-Net", "proseg reference preset"
    models: dict[str, Any] = {unet: plain, preset: preset_model}
    # one training loss per model, from a step's seed (the plain U-Net's has no randomness)
    losses: dict[str, Callable[[int], Any]] = {
        unet: lambda seed: plain.loss(batch)["loss"],
        preset: lambda seed: preset_model.loss(batch, torch.Generator().manual_seed(seed))["loss"],
    }

    fwd_flops = {}
    for name in models:
        with FlopCounterMode(display=False) as fc:
            losses[name](0)
        fwd_flops[name] = fc.get_total_flops()
    floor_factor = fwd_flops[preset] / (2 * fwd_flops[unet])

    optims = {name: torch.optim.Adam(m.parameters(), 1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.pairs + 1):
        for name in models:
            t = time.perf_counter()
            optims[name].zero_grad(set_to_none=True)
            losses[name](i).backward()
            optims[name].step()
            if i:  # the first pair is the warm-up
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = med[preset] / (2 * med[unet])
    pairs = [b / (2 * a) for a, b in zip(times[unet], times[preset], strict=True)]
    print(f"# batch {B}, {S}x{S}, R={R}, {torch.get_num_threads()} threads, {args.pairs} pairs")
    for name in models:
        print(f"{name}: median step {med[name]:.3f} s, forward {fwd_flops[name] / 1e9:.1f} GFLOP")
    print(f"preset / (2 x U-Net): {ratio:.3f} (paired: {min(pairs):.2f}-{max(pairs):.2f}, "
          f"median {statistics.median(pairs):.3f})")
    print(f"compute floor: {floor_factor:.3f} x (2 x U-Net) by forward FLOPs -> the preset runs at "
          f"{ratio / floor_factor:.3f}x its floor (target <= 1.10)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "batch": B, "size": S, "raters": R, "threads": torch.get_num_threads(), "times_s": times,
            "median_s": med, "ratio_two_unets": ratio, "paired_ratios": pairs, "floor_factor": floor_factor,
            "ratio_to_floor": ratio / floor_factor, "forward_flops": fwd_flops}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
