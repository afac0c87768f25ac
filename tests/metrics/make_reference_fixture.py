"""Regenerate ``reference_fixture.json`` by running the *published* metric code on ``reference_cases.CASES``.

The published files are not part of this repository; pass their paths (e.g. from a clone or
``git show 5ac653f:ProSeg/code/lib/metrics_set.py`` of github.com/AI4MOL/ProSeg and
``git show c43f3b3:utils.py`` of github.com/baumgach/PHiSeg-code)::

    python -m tests.metrics.make_reference_fixture --dpersona /tmp/metrics_set.py \
        --phiseg /tmp/phiseg_utils.py --out tests/metrics/reference_fixture.json

``metrics_set.py`` is imported unmodified. From PHiSeg's ``utils.py`` only ``ncc``,
``generalised_energy_distance`` and ``variance_ncc_dist`` are executed (the module imports OpenCV, medpy and
scikit-image at top level); ``medpy.metric.jc`` is replaced by the plain Jaccard index it computes.
Needs numpy, scipy and torch. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import scipy
import torch

from tests.metrics import reference_cases as rc


def _load_module(path: Path, name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _phiseg_functions(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    wanted = {"ncc", "generalised_energy_distance", "variance_ncc_dist"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    if {n.name for n in body} != wanted:
        raise SystemExit(f"{path}: expected functions {sorted(wanted)}")

    def jc(a: np.ndarray, b: np.ndarray) -> float:  # medpy.metric.binary.jc
        a, b = np.atleast_1d(a.astype(bool)), np.atleast_1d(b.astype(bool))
        return float(np.count_nonzero(a & b)) / float(np.count_nonzero(a | b))

    ns: dict = {"np": np, "jc": jc}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102
    return ns


def run(dpersona: Path, phiseg: Path) -> dict:
    ms = _load_module(dpersona, "reference_metrics_set")
    ph = _phiseg_functions(phiseg)
    out: dict = {
        "reference": {
            "dpersona_proseg": "github.com/AI4MOL/ProSeg @ 5ac653f ProSeg/code/lib/metrics_set.py "
            "(the same metric functions as ycwu1997/D-Persona @ abf1e50 D-Persona/code/lib/metrics_set.py)",
            "phiseg": "github.com/baumgach/PHiSeg-code @ c43f3b3 utils.py",
            "calls": "GED, cross, d0, d1 = generalized_energy_distance(L, P, all=True); "
            "dice_max, dice_max_reverse, dice_match, dice_each = dice_at_all(L, P, thresh=0.5) "
            "(dice_each_is_test: is_test=True); dice_soft = dice_at_thresh(L, P); "
            "L = labels (1,N,*S) float32, P = preds (1,M,*S) float32. PHiSeg: "
            "generalised_energy_distance(preds>0.5, labels, nlabels=1, label_range=range(1,2)), "
            "variance_ncc_dist(stack(1-p, p), one_hot(labels)) in float32; 3D arrays reshaped to (K, D*H, W)",
            "versions": {"numpy": np.__version__, "torch": torch.__version__, "scipy": scipy.__version__},
        },
        "cases": {},
    }
    for spec in rc.CASES:
        labels, preds = rc.make_case(spec)
        lab_t = torch.from_numpy(labels).float().unsqueeze(0)
        prd_t = torch.from_numpy(preds).float().unsqueeze(0)
        rec: dict = {
            "seed": spec.seed,
            "num_labels": spec.num_labels,
            "num_predictions": spec.num_preds,
            "shape": list(spec.shape),
            "digest": rc.array_digest(labels, preds),
        }
        g, c, d0, d1 = ms.generalized_energy_distance(lab_t, prd_t, all=True)
        rec.update(ged=float(g), ged_cross=float(c), ged_labels=float(d0), ged_preds=float(d1))
        rec["dice_soft"] = float(ms.dice_at_thresh(lab_t, prd_t))
        try:
            dmax, dmaxr, dmatch, each = ms.dice_at_all(lab_t, prd_t, thresh=0.5)
            rec.update(dice_max=float(dmax), dice_max_reverse=float(dmaxr), dice_match=float(dmatch))
            rec["dice_each"] = [float(v) for v in each]
            if spec.num_labels == spec.num_preds:
                rec["dice_each_is_test"] = [float(v) for v in ms.dice_at_all(lab_t, prd_t, 0.5, is_test=True)[3]]
        except IndexError as err:  # the published code indexes col_ind[i] for every label: crashes when N > M
            rec["dice_at_all_error"] = f"IndexError: {err}"
        lab2 = labels.reshape(labels.shape[0], -1, labels.shape[-1])
        prd2 = preds.reshape(preds.shape[0], -1, preds.shape[-1])  # float32, like PHiSeg's softmax outputs
        rec["phiseg_ged"] = float(
            ph["generalised_energy_distance"]((prd2 > 0.5).astype(np.int64), lab2, nlabels=1, label_range=range(1, 2))
        )
        with np.errstate(all="ignore"):
            one_hot = np.stack([1 - lab2, lab2], -1).astype(np.float32)
            ncc = ph["variance_ncc_dist"](np.stack([1 - prd2, prd2], -1), one_hot)
        rec["phiseg_s_ncc"] = float(np.asarray(ncc).reshape(-1)[0])
        out["cases"][spec.name] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dpersona", type=Path, required=True, help="path to the published lib/metrics_set.py")
    ap.add_argument("--phiseg", type=Path, required=True, help="path to PHiSeg-code utils.py")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = run(args.dpersona, args.phiseg)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(data['cases'])} cases to {args.out}")


if __name__ == "__main__":
    main()
