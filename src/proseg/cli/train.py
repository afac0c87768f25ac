"""``proseg train``: train a model on a prepared dataset (one process, or DDP under torchrun)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def train(
    overrides: Optional[list[str]] = typer.Argument(  # noqa: UP045 (typer needs Optional on py3.10)
        None, help="Dotted config overrides, e.g. train.epochs=5 optim.lr=3e-4 model.kl_weight=0.1."),
    config: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--config", "-c", help="A shipped config by name (lidc/proseg; `proseg config list`) or a YAML file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared dataset (sets data.path)."),  # noqa: UP045
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to create."),  # noqa: UP045
    fold: Optional[int] = typer.Option(None, "--fold", help="Cross-validation fold (sets data.fold)."),  # noqa: UP045
    resume: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    force: bool = typer.Option(
        False, "--force", help="Replace the run in --out even when it has saved state (only a proseg run folder)."),
) -> None:
    """Train a model. Launch under ``torchrun --nproc-per-node=G --no-python proseg train ...`` for DDP.

    A run folder without saved state (one that stopped before its first checkpoint) is started afresh by the
    same command; one with saved state is continued with ``--resume RUN`` or replaced with ``--force``.

    Examples:
        proseg train -c synthetic/proseg --data data/synth --out runs/proseg-f0 --fold 0
        proseg train --resume runs/proseg-f0
    """
    from proseg.cli.errors import user_errors

    with user_errors():
        _train(list(overrides or []), config, data, out, fold, resume, force)


def _train(overrides: list[str], config: Path | None, data: Path | None, out: Path | None, fold: int | None,
           resume: Path | None, force: bool = False) -> None:
    # Imported when the command runs (they load torch): `proseg --help` starts without them.
    from proseg.engine import checkpoint as ckpt
    from proseg.engine.config import apply_overrides, load_config
    from proseg.engine.distributed import cleanup_distributed
    from proseg.engine.trainer import Trainer
    from proseg.errors import CommandError
    from proseg.fsutil import check_writable

    if resume is not None:
        if force:
            raise CommandError("--resume continues a run and --force replaces it; pass one of them")
        if config is not None:
            raise CommandError("--resume continues a run with its own config.yaml; do not pass --config too")
        if out is not None and out.resolve() != resume.resolve():
            raise CommandError("--resume writes into the run it continues; drop --out")
        if not (resume / ckpt.CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{resume}: not a run directory (no {ckpt.CONFIG_FILE})")
        ckpt.plan_run_dir(resume, resume=True, force=False)  # fail now, not after loading the data
        cfg = load_config(resume / ckpt.CONFIG_FILE)
        run_dir = resume
    else:
        if out is None:
            raise CommandError("--out RUN_DIR is required (or --resume RUN_DIR)")
        ckpt.plan_run_dir(out, resume=False, force=force)  # the one rule; the Trainer applies it (after the checks)
        cfg = load_config(config)
        run_dir = out
    if data is not None:
        cfg.data.path = str(data)
    if fold is not None:
        cfg.data.fold = fold
    apply_overrides(cfg, overrides)
    check_writable(run_dir)
    trainer = Trainer.from_config(cfg, run_dir, resume=resume is not None, force=force,
                                  command=shlex.join(["proseg", *sys.argv[1:]]))
    summary = trainer.fit()
    if trainer.dist.is_main:
        best = run_dir / ckpt.BEST_DIR
        score = summary["best_score"]
        note = f" (val {cfg.train.val_metric} {score:.4f} at step {summary['best_step']})" if score is not None else ""
        typer.echo(f"trained {summary['steps']} steps in {summary['elapsed_s']:.1f} s; best checkpoint: {best}{note}")
    cleanup_distributed()
