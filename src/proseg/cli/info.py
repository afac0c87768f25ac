"""``proseg info DATASET``: counts, rater agreement, empty masks per rater, split sizes."""

from __future__ import annotations

from pathlib import Path

import typer


def info(
    dataset: Path = typer.Argument(..., help="A folder written by `proseg prepare`."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    verify: bool = typer.Option(
        False, "--verify", help="Also recompute and check the sha256 of every file (sizes, headers and the format "
        "version are always checked)."
    ),
) -> None:
    """Describe a prepared dataset (a damaged one is refused with a message naming the file)."""
    from proseg.cli.errors import user_errors
    from proseg.data.stats import store_stats
    from proseg.data.store import open_store
    from proseg.jsonio import dumps

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
            f"intensity {st['intensity']}   target size {st['target_size']}",
            f"agreement mean pairwise Dice {st['pairwise_dice']:.3f} (Dice(empty, empty) = 1)",
            "per rater " + "  ".join(
                f"{n}: empty {e:.1%} present {p:.1%}"
                for n, e, p in zip(st["rater_names"], st["empty_fraction"], st["rater_present_fraction"], strict=True)
            ),
            f"splits    {st['splits']['num_folds']} folds by patient, seed {st['splits']['seed']}, "
            f"val fraction {st['splits']['val_fraction']}",
        ]
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

