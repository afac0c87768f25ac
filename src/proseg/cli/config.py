"""``proseg config list`` / ``proseg config show NAME [overrides...]``: the shipped configs, and what a config
resolves to (every default included, as ``proseg train`` would use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

config = typer.Typer(
    name="config",
    help="List the shipped configs, or print one resolved (every default included) as YAML.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@config.command("list")
def list_() -> None:
    """List the shipped configs (use a name with ``proseg train -c NAME``)."""
    from proseg.cli.errors import user_errors
    from proseg.engine.config import list_configs

    with user_errors():
        for name in list_configs():
            typer.echo(name)


@config.command("show")
def show(
    name: Optional[str] = typer.Argument(  # noqa: UP045 (typer needs Optional on py3.10)
        None, help="A shipped config (lidc/proseg) or a YAML file; none = the defaults."),
    overrides: Optional[list[str]] = typer.Argument(  # noqa: UP045
        None, help="Dotted overrides, e.g. train.epochs=5 optim.lr=3e-4."),
    out: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--out", "-o", help="Write the YAML to this file instead of printing it."),
) -> None:
    """Print the resolved config: the file, then the overrides, over every default (checked like ``train``).

    Examples:
        proseg config show lidc/proseg
        proseg config show lidc/proseg train.epochs=5 -o my.yaml
    """
    from proseg.cli.errors import user_errors
    from proseg.engine.config import config_to_yaml, load_config, validate_config
    from proseg.fsutil import atomic_write_text

    with user_errors():
        if name is not None and "=" in name:  # only overrides: they apply to the defaults
            overrides, name = [name, *(overrides or [])], None
        cfg = validate_config(load_config(name, list(overrides or [])))
        text = config_to_yaml(cfg)
        if out is not None:
            atomic_write_text(out, text)
            typer.echo(f"wrote {out}")
        else:
            typer.echo(text, nl=False)
