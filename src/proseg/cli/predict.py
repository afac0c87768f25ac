"""``proseg predict``: per-rater maps, samples, mean and uncertainty maps for NIfTI, PNG or HDF5 inputs."""

from __future__ import annotations

from pathlib import Path

import typer


def predict(
    checkpoint: Path = typer.Argument(..., help="A run directory (its best checkpoint) or a checkpoint directory."),
    input: Path = typer.Argument(..., help="A .nii/.nii.gz, .png or .h5 file, or a folder of them."),
    output: Path = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    samples: int = typer.Option(16, "--samples", "-k", help="K samples per rater (and diverse samples)."),
    save_samples: bool = typer.Option(False, "--save-samples", help="Also write the K samples."),
    threshold: float = typer.Option(0.5, "--threshold", help="Probability threshold of the binary masks."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (per input: seeded from (seed, file name))."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    intensity: str | None = typer.Option(
        None, "--intensity", help="Override the checkpoint's intensity mode for inputs in other units "
        "(none | uint8 | minmax | zscore | window | percentile)."),
    window: str | None = typer.Option(
        None, "--window", help="LO,HI: clip raw inputs to [LO, HI] (e.g. HU -1000,400) and map to [0, 1]; for a "
        "model trained on windowed 8-bit images, the window those images were made with."),
    percentiles: str | None = typer.Option(None, "--percentiles", help="P_LO,P_HI of --intensity percentile."),
    roi: str | None = typer.Option(
        None, "--roi", help="y0,x0,h,w: predict only this crop of every slice (zeros outside)."),
    resample: bool = typer.Option(
        False, "--resample", help="NIfTI: resample to the training voxel size recorded by prepare (or --spacing), "
        "maps back."),
    spacing: str | None = typer.Option(
        None, "--spacing", help="X,Y[,Z] mm: the voxel size --resample targets (default: the training data's)."),
    sliding_window: bool = typer.Option(
        False, "--sliding-window", help="Inputs larger than the training size: predict in windows of that size "
        "(one latent per volume, shared by the windows) instead of shrinking them."),
    overlap: float | None = typer.Option(
        None, "--overlap", help="Fraction of a window its neighbours share, in [0, 1) (default 0.25)."),
    blend: str | None = typer.Option(
        None, "--blend", help="Weights of overlapping windows: gaussian (default) or uniform."),
    model_arg: list[str] | None = typer.Option(
        None, "--model-arg", help="KEY=VALUE: replace an inference-time model argument (ProSeg: diverse_mode, "
                                  "diverse_rater, z_temperature); repeatable."),
) -> None:
    """Predict in the input's format and geometry (NIfTI keeps its affine); nothing is left half-written."""
    from proseg.cli.errors import user_errors

    with user_errors():
        from proseg.cli.evaluate import parse_model_args
        from proseg.commands.predict import predict_path

        report = predict_path(checkpoint, input, output, num_samples=samples, seed=seed, save_samples=save_samples,
                              threshold=threshold, force=force, device=device, progress=True,
                              intensity=intensity, window=window, percentiles=percentiles, roi=roi,
                              resample=resample, spacing=spacing, sliding_window=sliding_window,
                              overlap=overlap, blend=blend, model_args=parse_model_args(model_arg or []))
        for note in report["notes"]:
            typer.echo(f"note: {note}", err=True)
        n = sum(len(v["files"]) for v in report["inputs"].values())
        typer.echo(f"predicted {len(report['inputs'])} input(s), {n} file(s) -> {output}")
