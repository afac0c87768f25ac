"""``proseg prepare FORMAT SRC OUT``: convert a multi-rater source into the canonical store."""

from __future__ import annotations

from pathlib import Path

import typer

_FORMATS = "lidc-kaggle, lidc-pickle, npc, qubiq, folder, synthetic"


def prepare(
    fmt: str = typer.Argument(..., metavar="FORMAT", help=f"Source format: {_FORMATS}."),
    src: str = typer.Argument(..., help="Source folder/file (for synthetic: the integer seed)."),
    out: Path = typer.Argument(..., help="Output dataset folder (must not exist unless --force)."),
    size: int | None = typer.Option(None, help="Target side: pad to square, then resize (nearest for masks)."),
    intensity: str = typer.Option(
        "auto", help="auto | none | uint8 | minmax | zscore | window | percentile (auto: /255 for 8-bit)."
    ),
    window: str | None = typer.Option(
        None, "--window", help="LO,HI: clip to [LO, HI] in source units (CT HU, e.g. -1000,400), map to [0, 1]."
    ),
    percentiles: str | None = typer.Option(
        None, "--percentiles", help="P_LO,P_HI: per-case percentile clip to [0, 1] (default 0.5,99.5)."
    ),
    rater_order: str = typer.Option("as-stored", help="as-stored | area-ranked (LIDC papers' convention)."),
    folds: int = typer.Option(4, help="Number of patient-level folds."),
    val_fraction: float = typer.Option(0.1, help="Share of each training fold's patients used for validation."),
    seed: int = typer.Option(0, help="Seed of the split."),
    allow_missing_raters: bool = typer.Option(
        False, "--allow-missing-raters", help="Pad cases with fewer raters and mark those raters absent."
    ),
    patients: list[str] | None = typer.Option(
        None, "--patients", help="Only patients matching these glob patterns (repeatable or comma-separated)."
    ),
    splits: Path | None = typer.Option(
        None, "--splits", help="Use this split instead of random folds: a splits.json, a {train, val, test} JSON/YAML, "
        "or patient,part CSV/TSV (see docs/data.md)."
    ),
    allow_unlisted: bool = typer.Option(
        False, "--allow-unlisted", help="With --splits: allow source patients that are in no part of a fold."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing OUT: only a dataset written by proseg prepare, or an empty folder."
    ),
    workers: int | None = typer.Option(None, help="Loader threads (default min(8, 2 x CPUs))."),
    task: str | None = typer.Option(None, help="qubiq: which task (e.g. task01) when cases hold several."),
    channels: str = typer.Option("t1,t1c,t2", help="npc: datasets stacked as channels, in order."),
    image_pattern: str = typer.Option("{case}/image.*", help="folder: image path pattern with {case}."),
    mask_pattern: str = typer.Option("{case}/mask_{rater}.*", help="folder: mask pattern with {case} and {rater}."),
    patient_regex: str | None = typer.Option(None, help="folder: regex giving the patient id from the case id."),
    ndim: int = typer.Option(2, help="folder: spatial dimensions of .npy/.npz arrays (2 or 3)."),
    cases: int = typer.Option(200, help="synthetic: number of cases."),
    raters: int = typer.Option(4, help="synthetic: number of raters."),
    image_channels: int = typer.Option(1, help="synthetic: number of image channels."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Convert FORMAT data at SRC into a memory-mappable dataset at OUT (manifest, checksums, patient splits)."""
    from proseg.cli.errors import user_errors
    from proseg.data.prepare import prepare as run_prepare

    reader_options: dict = {}
    synthetic_options: dict = {}
    if fmt == "qubiq" and task is not None:
        reader_options["task"] = task
    elif fmt == "npc":
        reader_options["channels"] = tuple(c.strip() for c in channels.split(",") if c.strip())
    elif fmt == "folder":
        reader_options.update(image_pattern=image_pattern, mask_pattern=mask_pattern, ndim=ndim)
        if patient_regex:
            reader_options["patient_regex"] = patient_regex
    elif fmt == "synthetic":
        synthetic_options = {"cases": cases, "size": size or 64, "num_raters": raters, "channels": image_channels}
    pats = [p.strip() for item in (patients or []) for p in item.split(",") if p.strip()]

    bar = None  # a bar on a terminal, a plain `case N/M` line now and then in a log file (proseg.progress)

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            from proseg.progress import Progress

            bar = Progress(total, "prepare", "case", initial=done - 1)
        bar.update(1)

    try:
        with user_errors(exit_code=1):
            res = run_prepare(
                fmt, src, out, size=size, intensity=intensity, window=window, percentiles=percentiles,
                rater_order=rater_order, num_folds=folds,
                val_fraction=val_fraction, seed=seed, allow_missing_raters=allow_missing_raters,
                patients=pats or None, splits=splits, allow_unlisted=allow_unlisted, force=force, workers=workers,
                reader_options=reader_options,
                synthetic_options=synthetic_options, progress=progress,
            )
    finally:
        if bar is not None:
            bar.close()
    typer.echo(
        f"prepared {res.out}: {res.rows} slices from {res.cases} cases, {res.volumes} volumes, "
        f"{res.patients} patients, {res.num_raters} raters in {res.seconds:.1f} s"
    )
