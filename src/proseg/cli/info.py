"""``proseg info DATASET``: counts, rater agreement, empty masks per rater, split sizes; ``proseg info RUN`` (a run
or checkpoint): the model, its raters and, for ProSeg, the raters' positions in tau-space."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def info(
    dataset: Path = typer.Argument(..., help="A folder written by `proseg prepare`, or a run / checkpoint folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    verify: bool = typer.Option(
        False, "--verify", help="Also recompute and check the sha256 of every file (sizes, headers and the format "
        "version are always checked)."
    ),
    figure: Optional[Path] = typer.Option(  # noqa: UP045 (typer needs Optional on py3.10)
        None, "--figure", help="RUN: also write the raters' tau-space figure (PNG) here (ProSeg)."),
) -> None:
    """Describe a prepared dataset (a damaged one is refused with a message naming the file), or a run or
    checkpoint: its model and raters (ProSeg: each rater's Dirichlet posterior mean and total concentration)."""
    from proseg.cli.errors import user_errors
    from proseg.data.stats import store_stats
    from proseg.data.store import is_store, open_store
    from proseg.jsonio import dumps

    run_like = any((dataset / f).exists() for f in ("model.json", "config.yaml", "checkpoints"))
    if run_like and not is_store(dataset):
        with user_errors(exit_code=1):
            _run_info(dataset, as_json, figure)
        return
    with user_errors(exit_code=1):
        store = open_store(dataset)
        st = store_stats(store)
        bad = store.verify() if verify else []
    if verify:
        st["checksums_ok"] = not bad
        st["checksum_mismatch"] = bad
    if as_json:
        typer.echo(dumps(st, indent=1))
    else:
        src = st["source"]
        c, h, w = st["shape"]
        lines = [
            f"dataset   {st['path']}",
            f"source    {src['format']} {src['path']}",
            f"rows      {st['rows']} slices ({c} x {h} x {w}), {st['cases']} cases, {st['volumes']} volumes, "
            f"{st['patients']} patients",
            f"raters    {st['num_raters']} ({st['rater_order']}): {', '.join(st['rater_names'])}",
            f"intensity {st['intensity']}"
            + "".join(f" {k} {v}" for k, v in st["intensity_params"].items())
            + f"   target size {st['target_size']}",
            f"agreement mean pairwise Dice {st['pairwise_dice']:.3f} (Dice(empty, empty) = 1)",
            "per rater " + "  ".join(
                f"{n}: empty {e:.1%} present {p:.1%}"
                for n, e, p in zip(st["rater_names"], st["empty_fraction"], st["rater_present_fraction"], strict=True)
            ),
            f"splits    {st['splits']['num_folds']} folds by patient, seed {st['splits']['seed']}, "
            + (f"val fraction {st['splits']['val_fraction']}" if any(st["splits"]["val_drawn"])
               else "val parts from the file"),
        ]
        if st["splits"]["source"] == "file":
            lines.append(f"  from file {st['splits'].get('file')} (sha256 {str(st['splits'].get('sha256'))[:16]}...)")
        for k, f in enumerate(st["splits"]["folds"]):
            lines.append(
                f"  fold {k}: "
                + "  ".join(f"{part} {v['patients']} patients / {v['rows']} rows" for part, v in f.items())
            )
        if verify:
            lines.append("checksums " + ("ok" if not bad else f"MISMATCH: {', '.join(bad)}"))
        typer.echo("\n".join(lines))
    if bad:
        raise typer.Exit(1)



def _run_info(path: Path, as_json: bool, figure: Path | None) -> None:
    """``proseg info RUN``: the checkpoint's model, raters and tau-space positions."""
    from proseg.engine.checkpoint import resolve_checkpoint
    from proseg.jsonio import dumps
    from proseg.models import load_model
    from proseg.models.base import read_model_meta

    ckpt = resolve_checkpoint(path)
    meta = read_model_meta(ckpt)
    model = load_model(ckpt)
    names = list((meta.get("dataset") or {}).get("rater_names") or [f"rater{r}" for r in range(model.num_raters)])
    pos = model.tau_positions() if hasattr(model, "tau_positions") else None
    raters = []
    for r, n in enumerate(names):
        row: dict = {"index": r, "name": n}
        if pos is not None:
            row.update(concentration=pos["concentration"][r].tolist(), mean=pos["mean"][r].tolist(),
                       total=float(pos["total"][r]))
        raters.append(row)
    adaptation = meta.get("adaptation")
    st = {"checkpoint": str(ckpt), "model": meta["model"], "step": meta.get("step"), "val_score": meta.get("val_score"),
          "num_raters": model.num_raters, "raters": raters, "adaptation": adaptation}
    if figure is not None:
        if pos is None:
            raise ValueError(f"--figure: {meta['model']['name']} has no tau-space (ProSeg only)")
        from proseg.viz.tau_space import tau_space_figure

        tau_space_figure(pos["mean"].numpy(), pos["total"].numpy(), names, figure)
    if as_json:
        typer.echo(dumps(st, indent=1))
        return
    lines = [f"checkpoint {ckpt}", f"model      {meta['model'].get('name')} (preset {meta['model'].get('preset')}), "
             f"step {meta.get('step')}, val score {meta.get('val_score')}",
             f"raters     {model.num_raters}: {', '.join(names)}"]
    if adaptation:
        lines.append(f"adapted    rater {adaptation.get('rater')!r} from {adaptation.get('from_checkpoint')} on "
                     f"{len(adaptation.get('cases') or [])} case(s), init {adaptation.get('init')}")
    if pos is not None:
        lines.append("tau        posterior mean E[tau|r] (total concentration: larger = more consistent style)")
        for row in raters:
            mean = " ".join(f"{v:.2f}" for v in row["mean"])
            lines.append(f"  {row['index']:>2} {row['name']:<16} [{mean}]  total {row['total']:.2f}")
    if figure is not None:
        lines.append(f"figure     {figure}")
    typer.echo("\n".join(lines))
