"""Where the time of a training step (and of sampling) goes: per-component CPU time from ``torch.profiler``.

Usage::

    python benchmarks/components.py                          # proseg:default and proseg:reference, B=16, 128x128
    python benchmarks/components.py --models proseg:default --batch 4 --steps 2 --threads 2

ProSeg's ``loss()`` and sampling code carry ``torch.profiler.record_function`` labels (``proseg.backbone``,
``proseg.stat_heads``, ``proseg.z_sample``, ``proseg.seg_head``, ``proseg.remap_recon``, ``proseg.tau``,
``proseg.loss.*``; sampling: ``proseg.sample.*`` beside the shared ``proseg.backbone`` / ``proseg.stat_heads``).
They cost nothing without a profiler. Here one step is ``zero_grad`` + ``loss`` (label ``step.forward``) +
``backward`` (``step.backward``) + Adam (``step.optim``), profiled on the CPU, and:

* **forward**: per label, the inclusive (self + children) CPU time of the label's events on the calling thread;
  ops outside every ``proseg.*`` label are ``(unlabelled)`` (the rater choice, the batch checks);
* **backward**: every autograd node's ``evaluate_function`` event is charged to the label around the forward op
  that created it (matched by the autograd sequence number); gradient accumulation into the leaves is
  ``(accumulate_grad)``, nodes whose forward op was unlabelled are ``(unlabelled)``.

Times are milliseconds per step (median over ``--steps`` profiled steps, after one unprofiled warm-up), as
measured by the profiler on the main thread: wall time of each op, which on a 2-core machine includes the
intra-op threads' work only as far as the main thread waits for it. The profiler adds overhead (a few %), so
compare shares, not the absolute sum against ``model_speed.py``'s step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from typing import Any

PREFIX = "proseg."
EVAL_FN = "autograd::engine::evaluate_function: "


def _label_of(ev: Any) -> str | None:
    """The innermost ``proseg.*`` label enclosing ``ev`` (via the profiler's CPU parent chain)."""
    p = ev
    while p is not None:
        if p.name.startswith(PREFIX):
            return p.name
        p = p.cpu_parent
    return None


def attribute(events: Any, phases: tuple[str, ...] = ("step.forward", "step.backward", "step.optim")
              ) -> dict[str, dict[str, float]]:
    """``{phase: {label: ms}}`` from one profiled step's ``prof.events()``; see the module docstring."""
    out: dict[str, dict[str, float]] = {ph: defaultdict(float) for ph in phases}
    seq_label: dict[tuple[int, int], str] = {}
    phase_total: dict[str, float] = {}
    for ev in events:
        if ev.name in phases:
            phase_total[ev.name] = phase_total.get(ev.name, 0.0) + ev.cpu_time_total / 1e3
    # forward: labels (top-most occurrence of each label only, so nested re-entries are not double counted)
    for ev in events:
        if ev.name.startswith(PREFIX):
            parent_label = _label_of(ev.cpu_parent) if ev.cpu_parent is not None else None
            if parent_label is None:
                out["step.forward"][ev.name] += ev.cpu_time_total / 1e3
        if ev.sequence_nr is not None and ev.sequence_nr >= 0 and not ev.name.startswith(EVAL_FN):
            lab = _label_of(ev)
            key = (ev.thread, ev.sequence_nr)
            if key not in seq_label or lab is not None:
                seq_label[key] = lab or "(unlabelled)"
    # backward: evaluate_function events -> the forward op's label (sequence numbers are per forward thread)
    for ev in events:
        if not ev.name.startswith(EVAL_FN):
            continue
        if "AccumulateGrad" in ev.name:
            lab = "(accumulate_grad)"
        else:
            lab = seq_label.get((ev.fwd_thread, ev.sequence_nr)) or seq_label.get((ev.thread, ev.sequence_nr))
            lab = lab or "(unlabelled)"
        out["step.backward"][lab] += ev.cpu_time_total / 1e3
    for ph in phases:
        if ph in phase_total and ph != "step.optim":
            covered = sum(out[ph].values())
            rest = phase_total[ph] - covered
            if ph == "step.forward":
                out[ph]["(unlabelled)"] += max(0.0, rest)
            else:
                out[ph]["(engine overhead)"] += max(0.0, rest)
        if ph == "step.optim" and ph in phase_total:
            out[ph]["adam"] = phase_total[ph]
        out[ph]["total"] = phase_total.get(ph, 0.0)
    return {ph: dict(v) for ph, v in out.items()}


def _median_dicts(ds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    res: dict[str, dict[str, float]] = {}
    for ph in ds[0]:
        labels = sorted({lab for d in ds for lab in d[ph]})
        res[ph] = {lab: statistics.median(d[ph].get(lab, 0.0) for d in ds) for lab in labels}
    return res


def profile_step(model: Any, batch: dict[str, Any], opt: Any, steps: int = 2) -> dict[str, dict[str, float]]:
    """Median per-component ms of ``steps`` profiled training steps (after one warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with record_function("step.forward"):
            out = model.loss(batch)
        with record_function("step.backward"):
            out["loss"].backward()
        with record_function("step.optim"):
            opt.step()

    model.train()
    step()
    runs = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        runs.append(attribute(prof.events()))
    torch.set_grad_enabled(True)
    return _median_dicts(runs)


def profile_sampling(model: Any, image: Any, num_samples: int = 52, repeats: int = 2) -> dict[str, float]:
    """Median per-label ms of ``sample_diverse(image, K)`` (eval, inference mode); ``total`` = the whole call."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    model.eval()

    def call() -> None:
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode(), record_function("sample.total"):
            model.sample_diverse(image, num_samples=num_samples, generator=g)

    call()
    runs = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        d: dict[str, float] = defaultdict(float)
        total = 0.0
        for ev in prof.events():
            if ev.name == "sample.total":
                total += ev.cpu_time_total / 1e3
            elif ev.name.startswith(PREFIX) and _label_of(ev.cpu_parent) is None:
                d[ev.name] += ev.cpu_time_total / 1e3
        d["(unlabelled)"] = max(0.0, total - sum(d.values()))
        d["total"] = total
        runs.append({"s": dict(d)})
    return _median_dicts(runs)["s"]


def components_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per (model, label), columns forward / backward / sum ms and share of the step."""
    lines = ["| model | component | forward (ms) | backward (ms) | fwd+bwd (ms) | share of step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        comp = r.get("components")
        if not comp:
            continue
        fwd, bwd, opt = comp["step.forward"], comp["step.backward"], comp["step.optim"]
        step_total = fwd.get("total", 0.0) + bwd.get("total", 0.0) + opt.get("total", 0.0)
        labels = [k for k in sorted(set(fwd) | set(bwd), key=lambda k: -(fwd.get(k, 0) + bwd.get(k, 0)))
                  if k != "total"]
        for lab in labels:
            f, b = fwd.get(lab, 0.0), bwd.get(lab, 0.0)
            lines.append(f"| {r['model']} | {lab} | {f:.1f} | {b:.1f} | {f + b:.1f} | "
                         f"{100 * (f + b) / max(step_total, 1e-9):.1f} % |")
        o = opt.get("total", 0.0)
        lines.append(f"| {r['model']} | Adam step | - | - | {o:.1f} | {100 * o / max(step_total, 1e-9):.1f} % |")
        lines.append(f"| {r['model']} | **step (profiled)** | {fwd.get('total', 0):.1f} | {bwd.get('total', 0):.1f}"
                     f" | {step_total:.1f} | 100 % |")
    samp = [r for r in rows if r.get("sample_components")]
    if samp:
        lines += ["", "| model | sampling component (52 diverse samples, 1 image) | ms | share |", "|---|---|---|---|"]
        for r in samp:
            sc = r["sample_components"]
            tot = sc.get("total", 0.0)
            for lab in sorted((k for k in sc if k != "total"), key=lambda k: -sc[k]):
                lines.append(f"| {r['model']} | {lab} | {sc[lab]:.1f} | {100 * sc[lab] / max(tot, 1e-9):.1f} % |")
            lines.append(f"| {r['model']} | **total** | {tot:.1f} | 100 % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["proseg:default", "proseg:reference"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--raters", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    from proseg.models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"# {args.size}x{args.size}, B={args.batch}, threads={torch.get_num_threads()}, load {load[0]:.2f}")
    rows = []
    for spec in args.models:
        name, _, preset = spec.partition(":")
        torch.manual_seed(0)
        model = create_model(name, in_channels=args.channels, num_raters=args.raters, preset=preset or "default")
        opt = torch.optim.Adam(model.param_groups(1e-4))
        g = torch.Generator().manual_seed(0)
        s, R, C, B = args.size, args.raters, args.channels, args.batch
        batch = {"image": torch.randn(B, C, s, s, generator=g),
                 "masks": (torch.rand(B, R, s, s, generator=g) > 0.7).float(),
                 "rater_present": torch.ones(B, R, dtype=torch.bool)}
        row: dict[str, Any] = {"model": spec, "components": profile_step(model, batch, opt, args.steps)}
        if getattr(model, "supports_diverse", False):
            row["sample_components"] = profile_sampling(model, batch["image"][:1])
        rows.append(row)
    print(components_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
