"""Stored-output regression test (smp's ``test_preserve_forward_output``): every registered model, every preset.

For each case (``list_models()`` x ``Model.PRESETS``, plus a few option variants in :data:`VARIANTS` that reach code
paths no preset takes) the model is built after ``torch.manual_seed(0)`` with ``in_channels=1``, ``num_raters=3`` and
run on a fixed tiny batch (B = 2, 32x32 pixels, 64x64 for the 7-level PHiSeg presets, rater 1 of image 0 absent):

* ``loss(batch, generator=seeded)`` in train mode: every returned term, and the L2 norm of all gradients after
  ``backward()`` (catches a changed graph, e.g. a term that lost its gradient);
* ``loss(batch)`` with the global RNG seeded (the path the trainer takes: it passes no generator);
* ``sample_personalized`` / ``sample_diverse`` (whichever the model supports), K = 3 / 4, with a seeded generator,
  ``share_latent`` False and True: sum, standard deviation and a handful of values at fixed flat indices;
* the parameter count (compared exactly).

The numbers are stored in ``stored_outputs.json`` next to this file (8 significant digits) and compared with rtol
1e-5 / atol 1e-6: the same code on another machine (same single thread, ``torch.set_num_threads(1)``) may sum floats
in another order (other SIMD widths / kernels), so the test does not demand bit equality; a real change of behaviour
(another init order, another random draw, another formula) moves the numbers far more. Two outputs are looser:
``grad_norm`` (rtol 5e-2), the gradient norm of a random-weight network in training mode, which is dominated by a few
huge entries behind ``exp`` and BatchNorm (PHiSeg's is 4e7) and moved 2.5 % between an AVX2 and an AVX-512 machine
with the same code, and the loss terms (rtol 1e-3), of which the reference preset's moved 1.3e-4 there.

An intended change of outputs updates the fixture: ``PROSEG_REGEN_STORED=1 python -m pytest -q
tests/models/test_preserve_outputs.py -p no:cacheprovider`` (rewrites ``stored_outputs.json`` from the current code,
drops cases that no longer exist; then review ``git diff`` of the JSON and say why the numbers moved).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from proseg.models import create_model, get_model_class, list_models

FIXTURE = Path(__file__).with_name("stored_outputs.json")
REGEN = os.environ.get("PROSEG_REGEN_STORED") == "1"
RTOL, ATOL = 1e-5, 1e-6
B, C, R = 2, 1, 3
K_PERSONALIZED, K_DIVERSE = 3, 4
NUM_VALUES = 5

#: option variants (name, preset, overrides) for code paths that no preset reaches
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dpersona/tiny+stage2": ("dpersona", "tiny", {"stage": 2}),
    "proseg/tiny+diverse_rater=sample": ("proseg", "tiny", {"diverse_rater": "sample"}),
    "prob_unet/tiny+rater_sampling=all": ("prob_unet", "tiny", {"rater_sampling": "all"}),
    "pionono/tiny+rater_sampling=one": ("pionono", "tiny", {"rater_sampling": "one"}),
}
#: image sizes other than 32 (PHiSeg's 7 resolution levels need 64 pixels a side)
SIZES = {"phiseg/default": 64, "phiseg/reference": 64}


def all_cases() -> dict[str, tuple[str, str, dict[str, Any]]]:
    cases = {f"{n}/{p}": (n, p, {}) for n in list_models() for p in get_model_class(n).PRESETS}
    return {**cases, **VARIANTS}


CASES = all_cases()


def make_batch(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(B, C, size, size, generator=g)
    masks = (torch.rand(B, R, size, size, generator=g) > 0.6).float()
    q = size // 4
    masks[..., q: 3 * q, q: 2 * q] = 1.0  # every rater has foreground and background
    masks[:, 1, q: 2 * q, q: 3 * q] = 1.0
    present = torch.tensor([[True, False, True], [True, True, True]])
    return {"image": image, "masks": masks, "rater_present": present}


def run_case(key: str) -> dict[str, Any]:
    """The raw outputs of one case: ``{"num_params": int, "loss/<term>": 0-d tensor, "grad_norm": float,
    "loss_global_rng": 0-d tensor, "<mode>/share=<bool>": samples}``."""
    name, preset, overrides = CASES[key]
    torch.manual_seed(0)
    model = create_model(name, in_channels=C, num_raters=R, preset=preset, **overrides)
    batch = make_batch(SIZES.get(key.split("+")[0], 32))
    out: dict[str, Any] = {"num_params": sum(p.numel() for p in model.parameters())}
    model.train()
    terms = model.loss(batch, generator=torch.Generator().manual_seed(1))
    terms["loss"].backward()
    out.update({f"loss/{k}": v.detach() for k, v in sorted(terms.items())})
    sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    out["grad_norm"] = math.sqrt(sq)
    torch.manual_seed(2)
    with torch.no_grad():
        out["loss_global_rng"] = model.loss(batch)["loss"]
    for mode, k in (("personalized", K_PERSONALIZED), ("diverse", K_DIVERSE)):
        if not getattr(model, f"supports_{mode}"):
            continue
        fn = getattr(model, f"sample_{mode}")
        for share in (False, True):
            g = torch.Generator().manual_seed(3)
            out[f"{mode}/share={share}"] = fn(batch["image"], num_samples=k, generator=g, share_latent=share)
    return out


def _num(x: float) -> float:
    return float(f"{float(x):.8g}")


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """A few numbers per output (8 significant digits): scalars as they are, samples as sum, std and values."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "num_params":
            out[k] = int(v)
        elif isinstance(v, torch.Tensor) and v.numel() > 1:
            flat = v.detach().double().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, NUM_VALUES).round().long()
            out[k] = {"shape": list(v.shape), "sum": _num(flat.sum()), "std": _num(flat.std()),
                      "values": [_num(flat[i]) for i in idx]}
        else:
            out[k] = _num(v)
    return out


def _rtol(output: str) -> float:
    """The relative tolerance of one output (see the module docstring)."""
    if output == "grad_norm":
        return 5e-2
    return 1e-3 if output.startswith("loss") else RTOL


def _close(a: float, b: float, rtol: float = RTOL) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=ATOL) or (math.isnan(a) and math.isnan(b))


def _compare(key: str, got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    bad = []
    if sorted(got) != sorted(want):
        bad.append(f"outputs {sorted(got)} != stored {sorted(want)}")
    for k in sorted(set(got) & set(want)):
        g, w = got[k], want[k]
        if isinstance(w, dict):
            if g["shape"] != w["shape"]:
                bad.append(f"{k}: shape {g['shape']} != stored {w['shape']}")
                continue
            pairs = [("sum", g["sum"], w["sum"]), ("std", g["std"], w["std"])]
            pairs += [(f"values[{i}]", a, b) for i, (a, b) in enumerate(zip(g["values"], w["values"], strict=True))]
            bad += [f"{k} {what}: {a!r} != stored {b!r}" for what, a, b in pairs if not _close(a, b)]
        elif k == "num_params":
            if g != w:
                bad.append(f"{k}: {g} != stored {w}")
        elif not _close(g, w, _rtol(k)):
            bad.append(f"{k}: {g!r} != stored {w!r}")
    return bad


def _load() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}


def _store(update: dict[str, Any]) -> None:
    data = {k: v for k, v in {**_load(), **update}.items() if k in CASES}
    lines = []  # one line per output: small diffs when a number moves
    for key, outputs in sorted(data.items()):
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in outputs.items())
        lines.append(f" {json.dumps(key)}: {{\n{body}\n }}")
    FIXTURE.write_text("{\n" + ",\n".join(lines) + "\n}\n")


@pytest.mark.parametrize("key", sorted(CASES))
def test_outputs_match_the_stored_ones(key: str) -> None:
    got = summarize(run_case(key))
    if REGEN:
        _store({key: got})
        return
    stored = _load()
    assert key in stored, f"{key}: no stored outputs; record them with PROSEG_REGEN_STORED=1 (see the docstring)"
    bad = _compare(key, got, stored[key])
    assert not bad, f"{key}: outputs moved from the stored ones:\n  " + "\n  ".join(bad)


def test_every_stored_case_still_exists() -> None:
    if REGEN:
        _store({})
        return
    stale = sorted(set(_load()) - set(CASES))
    assert not stale, f"stored outputs of cases that no longer exist: {stale}; regenerate (see the docstring)"
