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
  diverse output), eval mode, ``inference_mode``; ``+1 sample``: ``(t(K=152) - t(K=52)) / 100``. A model with a
  presence head (ProSeg ``presence=True``) skips the samples it draws empty, so its cost depends on the data: these
  two columns pin every rater's pi(x) to 1 (every sample drawn, the worst case), and ``52 samples, pi = 1/2`` pins
  it to 1/2 (about the share of empty samples ProSeg draws on LIDC, 0.5-0.6);
* ``params``: parameter count (millions);
* ``GFLOP/step``: ``torch.utils.flop_counter.FlopCounterMode`` over one fp32 ``loss + backward`` at the largest
  batch (matmul/conv-like ops only, as the counter counts: elementwise work and Adam are not in it; 1 MAC = 2 FLOP).

``--components`` (default: on for ``proseg`` rows) adds per-component CPU times of a step (backbone, statistic
heads, Z sampling, seg head, remap + reconstruction, loss terms; forward and backward) and of 52 diverse samples,
from ``torch.profiler`` and the ``record_function`` labels in ProSeg's code (``benchmarks/components.py``).

Reference rows: with ``--ref-code DIR`` (the ``ProSeg/code`` folder of a checkout of github AI4MOL/ProSeg, or
the checkout's root) and ``--ref-python VENV/bin/python`` (a venv made by ``../shared/tools/refbench/setup.sh``),
the reference's step (at the largest batch), peak RSS and 52-sample ``test_step`` are timed by ``--refbench``
(default ``../shared/tools/refbench/bench_ref.py``) in the same run, alternating with ours: for each of
``--rounds`` rounds and each model in ``--compare`` (default ``proseg:default proseg:reference``) the order is
reference, ours, so every ours-row has a reference run next to it. The reference's GFLOP/step is counted by
running ``bench_ref.py --steps 1`` under ``FlopCounterMode`` in its venv (warm-up + 1 step, halved). Ratios
(ours / reference) per column are printed from the paired runs (median over the rounds). The reference row's
``+1 sample`` is not measurable through ``bench_ref.py`` (it only times 52). ``--ref-calibration`` also times
the reference venv's plain smp ResNet-34 U-Net beside our ``backbone:resnet34_unet`` (a machine check).

The row ``backbone:resnet34_unet`` is a calibration point: a plain smp-style ResNet-34 U-Net with a 3x3 head
and BCE (the issue's "plain ResNet-34 U-Net step"), so times can be compared across machines as ratios. With it and
``proseg:reference`` in one run, a last line prints the preset's step over two such U-Nets (its compute floor:
the backbone and the reconstruction decoder are each one); FlopCounterMode over-counts the preset's grouped
convolutions' backward, so its GFLOP ratio is an upper bound. The two rows are timed in different subprocesses,
minutes apart, which on a shared machine moves the ratio by 20 % or more: ``benchmarks/preset_floor.py`` times the
two in turns in one process and prints the preset against its FLOP floor (the number to report).

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
from pathlib import Path
from typing import Any

REFBENCH_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "refbench" / "bench_ref.py"


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

    from proseg.engine.config import parse_key_values
    from proseg.models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_allocator_tuning:  # what proseg's trainer and evaluation do (engine/allocator.py)
        from proseg.engine.allocator import keep_freed_memory

        keep_freed_memory()
    name, _, preset = spec.partition(":")
    preset, *extra = (preset or "default").split("+")
    overrides = parse_key_values(extra, "model override", "scale=2")  # spec: name[:preset][+key=value...]
    torch.manual_seed(0)
    if name == "backbone":  # calibration row: a plain segmentation net (smp Unet-resnet34 with a 3x3 head + BCE)
        model = _PlainSegmenter(preset, args.channels)
    else:
        model = create_model(name, in_channels=args.channels, num_raters=args.raters, preset=preset, **overrides)
    res: dict[str, Any] = {"model": spec, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                           "threads": torch.get_num_threads()}
    opt = torch.optim.Adam(model.param_groups(1e-4))  # torch's default (foreach) Adam, as the reference
    size, R, C = args.size, args.raters, args.channels

    def batch(b: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(b)
        return {"image": torch.randn(b, C, size, size, generator=g),
                "masks": (torch.rand(b, R, size, size, generator=g) > 0.7).float(),
                "rater_present": torch.ones(b, R, dtype=torch.bool)}

    loss_fn = model.loss
    if args.compile:  # torch.compile (inductor); the Gamma sampler stays eager (a graph break by design)
        loss_fn = torch.compile(model.loss)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(batch(max(args.batch_sizes)))["loss"].backward()
        res["compile_s"] = time.perf_counter() - t0

    def step(b: dict[str, torch.Tensor], bf16: bool) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = loss_fn(b)
        out["loss"].backward()
        opt.step()

    model.train()
    for bs in args.batch_sizes:
        b = batch(bs)
        res[f"step_fp32_b{bs}"] = _median_time(lambda b=b: step(b, False), args.steps)
        if bs == max(args.batch_sizes):
            res["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if not args.no_flops:
        from torch.utils.flop_counter import FlopCounterMode

        b = batch(max(args.batch_sizes))
        opt.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as fc:
            model.loss(b)["loss"].backward()
        res["gflop_step"] = fc.get_total_flops() / 1e9
        opt.zero_grad(set_to_none=True)
    want_comp = args.components == "on" or (args.components == "auto" and name == "proseg")
    if want_comp:
        from components import profile_sampling, profile_step

        res["components"] = profile_step(model, batch(max(args.batch_sizes)), opt, steps=2)
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

    presence = getattr(model, "presence_head", None)
    try:
        if presence is not None:
            _pin_presence(presence, 0.0)  # pi = 1/2
            res["sample52_half_ms"] = _median_time(lambda: sample(52), args.sample_repeats) * 1e3
            _pin_presence(presence, 30.0)  # pi = 1: every sample drawn
        t52 = _median_time(lambda: sample(52), args.sample_repeats)
        t152 = _median_time(lambda: sample(152), args.sample_repeats)
        res["sample52_ms"] = t52 * 1e3
        res["per_sample_ms"] = (t152 - t52) / 100 * 1e3
        res["sample_call"] = "diverse" if diverse else "personalized"
    except NotImplementedError as exc:  # NotSupportedError for both calls
        res["sample_call"] = f"n/a ({exc})"
    if want_comp and diverse:
        res["sample_components"] = profile_sampling(model, x, 52)
    res["peak_rss_total_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return res


def _pin_presence(head: Any, logit: float) -> None:
    """Every rater's presence logit to ``logit`` whatever the image (ProSeg's ``PresenceHead``: scale 0, shift)."""
    import torch

    with torch.no_grad():
        head.scale.zero_()
        head.shift.fill_(logit)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    cols = [f"step fp32 B={b} (s)" for b in batch_sizes] + [f"step bf16 B={b} (s)" for b in batch_sizes]
    cols += ["peak RSS (GB)", "52 samples (ms)", "+1 sample (ms)", "52 samples, pi = 1/2 (ms)", "params (M)",
             "GFLOP/step"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |")
            continue
        vals = [r.get(f"step_fp32_b{b}") for b in batch_sizes] + [r.get(f"step_bf16_b{b}") for b in batch_sizes]
        vals += [r.get("peak_rss_GB"), r.get("sample52_ms"), r.get("per_sample_ms"), r.get("sample52_half_ms"),
                 r.get("params_M"), r.get("gflop_step")]
        one_digit = (len(vals) - 5, len(vals) - 4, len(vals) - 3, len(vals) - 1)
        cells = [_fmt(v, 1 if i in one_digit else 2) for i, v in enumerate(vals)]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_REF_FLOPS = r"""
import runpy, sys
from torch.utils.flop_counter import FlopCounterMode
sys.argv = [sys.argv[1], "--batch", sys.argv[2], "--steps", "1", "--threads", sys.argv[3]]
with FlopCounterMode(display=False) as fc:
    runpy.run_path(sys.argv[0], run_name="__main__")  # warm-up step + 1 timed step, forward + backward each
print("GFLOP_PER_STEP", fc.get_total_flops() / 2 / 1e9)
"""


def run_reference(args: argparse.Namespace, model: str = "proseg", flops: bool = False) -> dict[str, Any]:
    """One ``bench_ref.py`` run in the reference venv -> a row in this script's units (or ``{"error": ...}``)."""
    code = Path(args.ref_code)
    if (code / "ProSeg" / "code").is_dir():
        code = code / "ProSeg" / "code"
    env = {**os.environ, "REF": str(code)}
    threads = str(args.threads or os.cpu_count() or 1)
    B = max(args.batch_sizes)
    label = "reference code" if model == "proseg" else "reference venv smp U-Net"
    cmd = [args.ref_python, args.refbench, "--batch", str(B), "--steps", str(args.steps), "--threads", threads,
           "--model", model] + (["--samples"] if model == "proseg" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        return {"model": label, "error": err}
    j = json.loads(lines[-1])
    row: dict[str, Any] = {"model": label, "impl": "reference", f"step_fp32_b{B}": j.get("step_median_s"),
                           "peak_rss_GB": j["peak_rss_mb"] / 1024 if "peak_rss_mb" in j else None,
                           "sample52_ms": j.get("test_step_52_ms"), "params_M": j.get("params", 0) / 1e6,
                           "threads": j.get("threads"), "raw": j}
    if flops and model == "proseg" and not args.no_flops:
        fp = subprocess.run([args.ref_python, "-c", _REF_FLOPS, args.refbench, str(B), threads],
                            capture_output=True, text=True, env=env)
        got = [ln for ln in fp.stdout.splitlines() if ln.startswith("GFLOP_PER_STEP")]
        row["gflop_step"] = float(got[-1].split()[1]) if got else None
    return row


RATIO_KEYS = ("step_fp32_b{B}", "peak_rss_GB", "sample52_ms", "sample52_half_ms", "gflop_step")
REF_KEY = {"sample52_half_ms": "sample52_ms"}


def ratio_table(pairs: list[tuple[dict[str, Any], dict[str, Any]]], B: int) -> str:
    """Median over rounds of ours / reference per column, for each compared model."""
    keys = [k.format(B=B) for k in RATIO_KEYS]
    by_model: dict[str, list[dict[str, float]]] = {}
    for ref, ours in pairs:
        if "error" in ref or "error" in ours:
            continue
        # the reference always draws every sample: both of our 52-sample columns are over its one
        d = {k: ours[k] / ref[REF_KEY.get(k, k)] for k in keys
             if ours.get(k) is not None and ref.get(REF_KEY.get(k, k))}
        by_model.setdefault(ours["model"], []).append(d)
    lines = [f"| ours / reference | step B={B} | peak RSS | 52 samples | 52 samples, pi = 1/2 | GFLOP/step | rounds |",
             "|---|---|---|---|---|---|---|"]
    for m, ds in by_model.items():
        cells = []
        for k in keys:
            vals = [d[k] for d in ds if k in d]
            cells.append(f"{statistics.median(vals):.3f}" if vals else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(ds)} |")
    return "\n".join(lines)


def floor_line(rows: list[dict[str, Any]], B: int) -> str | None:
    """``proseg:reference``'s step against two plain ResNet-34 U-Nets (its backbone and its reconstruction decoder),
    the issue's compute floor, when both rows were timed; by FLOPs too where counted."""
    key = f"step_fp32_b{B}"
    ref = next((r for r in rows if r.get("model") == "proseg:reference" and r.get(key)), None)
    unet = next((r for r in rows if r.get("model") == "backbone:resnet34_unet" and r.get(key)), None)
    if ref is None or unet is None:
        return None
    line = f"# proseg:reference step / (2 x plain ResNet-34 U-Net step) at B={B}: {ref[key] / (2 * unet[key]):.2f}"
    if ref.get("gflop_step") and unet.get("gflop_step"):
        line += f" (GFLOP: {ref['gflop_step'] / (2 * unet['gflop_step']):.2f}, counted; see the docstring's caveat)"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=None,
                   help="name[:preset][+key=value...] entries (backbone:<backbone name> = plain segmenter; +key=value "
                        "overrides a model argument); default: the "
                        "plain ResNet-34 U-Net, every registered model's default preset, and proseg:reference")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--raters", type=int, default=4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="time the step of torch.compile(model.loss) (its compile time is reported as compile_s)")
    p.add_argument("--no-allocator-tuning", action="store_true",
                   help="leave glibc's malloc thresholds alone (the trainer raises them; engine/allocator.py)")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 autocast even without a bf16 ISA")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--components", choices=("auto", "on", "off"), default="auto",
                   help="per-component profile (auto: proseg rows only)")
    p.add_argument("--no-flops", action="store_true", help="skip the GFLOP/step count")
    p.add_argument("--ref-code", default=None, help="ProSeg/code folder of a checkout of AI4MOL/ProSeg")
    p.add_argument("--ref-python", default=None, help="python of a venv that runs the reference")
    p.add_argument("--refbench", default=str(REFBENCH_DEFAULT), help="path of bench_ref.py")
    p.add_argument("--compare", nargs="*", default=["proseg:default", "proseg:reference"],
                   help="our models timed alternately with the reference")
    p.add_argument("--rounds", type=int, default=1, help="reference/ours alternation rounds per compared model")
    p.add_argument("--ref-calibration", action="store_true",
                   help="also alternate the reference venv's smp U-Net with backbone:resnet34_unet")
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
    passthrough += ["--no-allocator-tuning"] if args.no_allocator_tuning else []
    passthrough += ["--compile"] if args.compile else []
    rows = []
    load = os.getloadavg()
    print(f"# {args.size}x{args.size}, C={args.channels}, R={args.raters}, CPU threads={os.cpu_count()}, "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    passthrough += ["--components", args.components] + (["--no-flops"] if args.no_flops else [])

    def ours(spec: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, __file__, "--worker", spec, *passthrough],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            row = {"model": spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "?"}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"# done {spec}: { {k: v for k, v in row.items() if 'components' not in k} }", file=sys.stderr,
              flush=True)
        return row

    with_ref = bool(args.ref_code and args.ref_python)
    if bool(args.ref_code) != bool(args.ref_python):
        p.error("--ref-code and --ref-python go together")
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    ref_rows: list[dict[str, Any]] = []
    done: dict[str, dict[str, Any]] = {}
    if with_ref:
        compare = list(args.compare) + (["backbone:resnet34_unet"] if args.ref_calibration else [])
        for rnd in range(args.rounds):
            for spec in compare:  # reference, ours, reference, ours, ...
                kind = "smp_unet" if spec.startswith("backbone:") else "proseg"
                ref = run_reference(args, kind, flops=(rnd == 0 and kind == "proseg" and not ref_rows))
                ref["model"] += f" (round {rnd + 1}, before {spec})"
                ref_rows.append(ref)
                print(f"# done {ref['model']}: { {k: v for k, v in ref.items() if k != 'raw'} }", file=sys.stderr,
                      flush=True)
                row = ours(spec)
                pairs.append((ref, row))
                done.setdefault(spec, row)  # the first round's row goes into the table
        flop_ref = next((r.get("gflop_step") for r in ref_rows if r.get("gflop_step")), None)
        for r in ref_rows:  # one count (deterministic) for every reference row
            if "error" not in r and r.get("model", "").startswith("reference code"):
                r["gflop_step"] = flop_ref
    for spec in list(args.models) + [s for s in done if s not in args.models]:
        rows.append(done[spec] if spec in done else ours(spec))
    rows += [r for r in ref_rows]
    print(table(rows, args.batch_sizes))
    if with_ref:
        print()
        print(ratio_table(pairs, max(args.batch_sizes)))
        if any("error" in r for r in ref_rows):
            print("# reference runs failed: " + "; ".join(r["error"] for r in ref_rows if "error" in r))
    floor = floor_line(rows, max(args.batch_sizes))
    if floor:
        print(floor)
    from components import components_table

    if any(r.get("components") for r in rows):
        print()
        print(components_table(rows))
    if rows and not any(r.get("bf16_isa") for r in rows):
        print("# bf16 columns empty: this CPU has no native bf16 (AVX512-BF16/AMX); --force-bf16 times it anyway")
    load = os.getloadavg()
    print(f"# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "pairs": pairs}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
