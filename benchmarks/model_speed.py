"""Training-step time, memory and sampling time of every registered model (and ProSeg's presets).

Usage::

    python benchmarks/model_speed.py                       # every model's default preset + ProSeg reference
    python benchmarks/model_speed.py --models proseg:reference proseg:default --steps 3 --json out.json

Each model runs in its own subprocess (so ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is that model's peak
RSS) on random data: ``(B, C, size, size)`` images, R raters, all present. Columns:

* ``step fp32 B=16`` / ``B=4``: median seconds of ``zero_grad + loss + backward + Adam step`` (after one warm-up);
* ``step bf16``: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``, only where the CPU has native
  bf16 (AVX512-BF16 or AMX; emulated bf16 is ~20x slower than fp32, ``--force-bf16`` times it anyway);
* ``peak RSS``: the subprocess's peak resident memory after the fp32 B=16 steps (GB);
* ``52 samples``: one image, ``sample_diverse(K=52)`` (personalized with ceil(52/R) per rater when a model has no
  diverse output), eval mode, ``inference_mode``; ``+1 sample``: ``(t(K=152) - t(K=52)) / 100``;
* ``params``: parameter count (millions).

The row ``backbone:resnet34_unet`` is a calibration point: a plain smp-style ResNet-34 U-Net with a 3x3 head
and BCE (the issue's "plain ResNet-34 U-Net step"), so times can be compared across machines as ratios.

The machine is shared: check ``uptime`` and report the load next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bf16_isa() -> bool:
    """Whether the CPU has native bf16 (AVX512-BF16 or AMX); without it autocast emulates bf16 and is far slower."""
    import torch

    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def _PlainSegmenter(backbone: str, in_channels: int):  # noqa: N802 - a class factory (torch imported lazily)
    import torch
    import torch.nn.functional as F

    from proseg.models.backbones import create_backbone

    class PlainSegmenter(torch.nn.Module):
        """Backbone + 3x3 conv to one logit, BCE against the first rater's mask; no sampling."""

        def __init__(self) -> None:
            super().__init__()
            self.net = create_backbone(backbone, in_channels)
            self.head = torch.nn.Conv2d(self.net.out_channels, 1, 3, padding=1)

        def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            logits = self.head(self.net(batch["image"]))
            return {"loss": F.binary_cross_entropy_with_logits(logits, batch["masks"][:, :1])}

        def param_groups(self, lr: float) -> list[dict[str, Any]]:
            return [{"params": list(self.parameters()), "lr": lr}]

        def sample_diverse(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("a plain segmenter has no samples")

        sample_personalized = sample_diverse

    return PlainSegmenter()


def worker(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch

    from proseg.models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    name, _, preset = spec.partition(":")
    preset = preset or "default"
    torch.manual_seed(0)
    if name == "backbone":  # calibration row: a plain segmentation net (smp Unet-resnet34 with a 3x3 head + BCE)
        model = _PlainSegmenter(preset, args.channels)
    else:
        model = create_model(name, in_channels=args.channels, num_raters=args.raters, preset=preset)
    res: dict[str, Any] = {"model": spec, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                           "threads": torch.get_num_threads()}
    opt = torch.optim.Adam(model.param_groups(1e-4))  # torch's default (foreach) Adam, as the reference
    size, R, C = args.size, args.raters, args.channels

    def batch(b: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(b)
        return {"image": torch.randn(b, C, size, size, generator=g),
                "masks": (torch.rand(b, R, size, size, generator=g) > 0.7).float(),
                "rater_present": torch.ones(b, R, dtype=torch.bool)}

    def step(b: dict[str, torch.Tensor], bf16: bool) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.loss(b)
        out["loss"].backward()
        opt.step()

    model.train()
    for bs in args.batch_sizes:
        b = batch(bs)
        res[f"step_fp32_b{bs}"] = _median_time(lambda b=b: step(b, False), args.steps)
        if bs == max(args.batch_sizes):
            res["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    res["bf16_isa"] = _bf16_isa()
    if not args.no_bf16 and (res["bf16_isa"] or args.force_bf16):
        for bs in args.batch_sizes:
            b = batch(bs)
            res[f"step_bf16_b{bs}"] = _median_time(lambda b=b: step(b, True), args.steps)

    model.eval()
    x = batch(1)["image"]
    diverse = bool(getattr(model, "supports_diverse", False))

    def sample(k: int) -> None:
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            if diverse:
                model.sample_diverse(x, num_samples=k, generator=g)
            else:
                model.sample_personalized(x, num_samples=math.ceil(k / R), generator=g)

    try:
        t52 = _median_time(lambda: sample(52), args.sample_repeats)
        t152 = _median_time(lambda: sample(152), args.sample_repeats)
        res["sample52_ms"] = t52 * 1e3
        res["per_sample_ms"] = (t152 - t52) / 100 * 1e3
        res["sample_call"] = "diverse" if diverse else "personalized"
    except NotImplementedError as exc:  # NotSupportedError for both calls
        res["sample_call"] = f"n/a ({exc})"
    res["peak_rss_total_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return res


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    cols = [f"step fp32 B={b} (s)" for b in batch_sizes] + [f"step bf16 B={b} (s)" for b in batch_sizes]
    cols += ["peak RSS (GB)", "52 samples (ms)", "+1 sample (ms)", "params (M)"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |")
            continue
        vals = [r.get(f"step_fp32_b{b}") for b in batch_sizes] + [r.get(f"step_bf16_b{b}") for b in batch_sizes]
        vals += [r.get("peak_rss_GB"), r.get("sample52_ms"), r.get("per_sample_ms"), r.get("params_M")]
        cells = [_fmt(v, 1 if i in (len(vals) - 3, len(vals) - 2) else 2) for i, v in enumerate(vals)]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=None,
                   help="name[:preset] entries (backbone:<backbone name> = plain segmenter); default: the "
                        "plain ResNet-34 U-Net, every registered model's default preset, and proseg:reference")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--raters", type=int, default=4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 autocast even without a bf16 ISA")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    if args.models is None:
        from proseg.models import list_models

        args.models = ["backbone:resnet34_unet"] + [f"{n}:default" for n in list_models()] + ["proseg:reference"]
    passthrough = ["--size", str(args.size), "--channels", str(args.channels), "--raters", str(args.raters),
                   "--steps", str(args.steps), "--sample-repeats", str(args.sample_repeats), "--batch-sizes",
                   *map(str, args.batch_sizes), "--threads", str(args.threads)]
    passthrough += (["--no-bf16"] if args.no_bf16 else []) + (["--force-bf16"] if args.force_bf16 else [])
    rows = []
    load = os.getloadavg()
    print(f"# {args.size}x{args.size}, C={args.channels}, R={args.raters}, CPU threads={os.cpu_count()}, "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    for spec in args.models:
        proc = subprocess.run([sys.executable, __file__, "--worker", spec, *passthrough],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"model": spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "?"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"# done {spec}: {rows[-1]}", file=sys.stderr, flush=True)
    print(table(rows, args.batch_sizes))
    if rows and not any(r.get("bf16_isa") for r in rows):
        print("# bf16 columns empty: this CPU has no native bf16 (AVX512-BF16/AMX); --force-bf16 times it anyway")
    load = os.getloadavg()
    print(f"# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
