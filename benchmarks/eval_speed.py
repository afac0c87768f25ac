"""Evaluation speed: CPU-seconds per 1,000 slices through ``proseg.engine.evaluation.evaluate_cases``.

Usage::

    python benchmarks/eval_speed.py                                   # 200 slices, ProSeg default, K = 16
    python benchmarks/eval_speed.py --slices 50 --phiseg-slices 3 --threads 2

A synthetic in-memory store: ``--slices`` one-slice cases (2D, as LIDC) of ``--size``² pixels, C = 1, R = 4 raters
(blob-shaped masks, every rater present), scored in both modes (personalized, diverse) with K = ``--samples`` and
both conventions (standard, reference), as ``proseg evaluate`` does. The model is ProSeg ``default`` after
``--train-steps`` Adam steps on the same kind of data (so its outputs are not the flat 0.5 of a random net).
One untimed case runs first (warm-up).

The time is split by wrapping the two module-level functions ``evaluate_cases`` calls: ``sample_volume``
(sampling) and ``score_case`` (metrics, every convention of one mode); the rest (loading, tensor moves, record
building) is ``other``. Both process CPU time (``time.process_time``, every thread of this process) and wall
time are reported; the issue's target is <= 3 CPU-minutes (180 CPU-s) per 1,000 slices.

PHiSeg ``default`` is timed per slice at K = ``--phiseg-samples`` (50) over ``--phiseg-slices`` cases, diverse
mode only (PHiSeg has no personalized output), both conventions (target: well under 8 s per slice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from proseg.engine import evaluation
from proseg.engine.config import parse_key_values
from proseg.engine.types import CaseData
from proseg.metrics import CONVENTIONS
from proseg.models import create_model


def synthetic_case(i: int, size: int, raters: int) -> CaseData:
    """One slice: a noisy image with a blob, R masks = the blob with rater-specific radius jitter."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    base = rng.uniform(0.12, 0.25)
    masks = np.stack([r < base * (1 + 0.15 * rng.standard_normal()) for _ in range(raters)])  # (R, H, W)
    image = (r < base).astype(np.float32) + 0.3 * rng.standard_normal((size, size)).astype(np.float32)
    return CaseData(case_id=f"case{i:05d}", images=image[None, None], masks=masks[None],
                    present=np.ones(raters, dtype=bool))


class Timer:
    """Accumulates process-CPU and wall seconds of a wrapped function."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.cpu, self.wall, self.calls = fn, 0.0, 0.0, 0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        c, w = time.process_time(), time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.cpu += time.process_time() - c
            self.wall += time.perf_counter() - w
            self.calls += 1


def train_briefly(model: torch.nn.Module, steps: int, size: int, raters: int, batch: int = 8) -> None:
    if steps <= 0:
        return
    opt = torch.optim.Adam(model.param_groups(1e-3))
    model.train()
    for s in range(steps):
        cases = [synthetic_case(10_000 + s * batch + j, size, raters) for j in range(batch)]
        b = {"image": torch.as_tensor(np.concatenate([c.images for c in cases])),
             "masks": torch.as_tensor(np.concatenate([c.masks for c in cases])).float(),
             "rater_present": torch.ones(batch, raters, dtype=torch.bool)}
        opt.zero_grad(set_to_none=True)
        model.loss(b)["loss"].backward()
        opt.step()


def time_eval(model: Any, n: int, size: int, raters: int, modes: list[str], k: int,
              conventions: list[str]) -> dict[str, Any]:
    cases = {f"case{i:05d}": synthetic_case(i, size, raters) for i in range(n)}
    warm = synthetic_case(n + 1, size, raters)  # one untimed case: first-call allocations and kernel selection
    evaluation.evaluate_cases(model, [warm.case_id], lambda _: warm, modes=modes, num_samples=k,
                              conventions=conventions)
    sv, sc = Timer(evaluation.sample_volume), Timer(evaluation.score_case)
    orig = evaluation.sample_volume, evaluation.score_case
    evaluation.sample_volume, evaluation.score_case = sv, sc
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        records, _, skipped = evaluation.evaluate_cases(model, list(cases), cases.__getitem__, modes=modes,
                                                        num_samples=k, conventions=conventions)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    finally:
        evaluation.sample_volume, evaluation.score_case = orig
    per = 1000.0 / n
    return {"slices": n, "modes": modes, "K": k, "conventions": conventions, "records": len(records),
            "skipped": skipped, "cpu_s": cpu, "wall_s": wall,
            "cpu_s_per_1000": cpu * per, "wall_s_per_1000": wall * per,
            "sampling_cpu_s_per_1000": sv.cpu * per, "sampling_wall_s_per_1000": sv.wall * per,
            "metrics_cpu_s_per_1000": sc.cpu * per, "metrics_wall_s_per_1000": sc.wall * per,
            "other_cpu_s_per_1000": (cpu - sv.cpu - sc.cpu) * per,
            "cpu_s_per_slice": cpu / n, "wall_s_per_slice": wall / n}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--raters", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--phiseg-slices", type=int, default=5)
    p.add_argument("--phiseg-samples", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--proseg", nargs="*", default=["default"],
                   help="ProSeg variants to time, each 'label' or 'label:key=value,key=value' (model arguments on "
                        "the default preset, YAML values), e.g. scale1:scale=1")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, torch threads={torch.get_num_threads()}, "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    conventions = list(CONVENTIONS)
    out: dict[str, Any] = {}
    for spec in args.proseg:
        label, _, kv = spec.partition(":")
        kw = parse_key_values([item for item in kv.split(",") if item], "--proseg", "scale=1")
        torch.manual_seed(0)
        model = create_model("proseg", in_channels=1, num_raters=args.raters, preset="default", **kw)
        t = time.perf_counter()
        train_briefly(model, args.train_steps, args.size, args.raters)
        print(f"# proseg {label} trained {args.train_steps} steps in {time.perf_counter() - t:.1f} s", flush=True)
        out[f"proseg:{label}"] = time_eval(model, args.slices, args.size, args.raters, ["personalized", "diverse"],
                                           args.samples, conventions)
    if args.phiseg_slices > 0:
        torch.manual_seed(0)
        ph = create_model("phiseg", in_channels=1, num_raters=args.raters, preset="default")
        out["phiseg:default"] = time_eval(ph, args.phiseg_slices, args.size, args.raters, ["diverse"],
                                          args.phiseg_samples, conventions)
    lines = ["| model | slices | modes | K | CPU-s / 1000 slices | sampling | metrics | other | wall-s / 1000 |"
             " CPU-s / slice |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in out.items():
        lines.append(f"| {m} | {r['slices']} | {'+'.join(r['modes'])} | {r['K']} | {r['cpu_s_per_1000']:.1f} | "
                     f"{r['sampling_cpu_s_per_1000']:.1f} | {r['metrics_cpu_s_per_1000']:.1f} | "
                     f"{r['other_cpu_s_per_1000']:.1f} | {r['wall_s_per_1000']:.1f} | {r['cpu_s_per_slice']:.3f} |")
    print("\n".join(lines))
    for m, r in out.items():
        if m.startswith("proseg:"):
            print(f"# {m}: {r['cpu_s_per_1000'] / 60:.2f} CPU-min per 1000 slices (target <= 3); sampling "
                  f"{100 * r['sampling_cpu_s_per_1000'] / r['cpu_s_per_1000']:.0f} %, metrics "
                  f"{100 * r['metrics_cpu_s_per_1000'] / r['cpu_s_per_1000']:.0f} %")
    load = os.getloadavg()
    print(f"# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
