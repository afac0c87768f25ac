"""The ``proseg`` command line (Typer). Each command lives in its own module; heavy imports (torch,
h5py, nibabel ...) happen inside the command functions so that ``proseg --help`` starts fast."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="proseg",
    help="Probabilistic multi-rater medical image segmentation: prepare data, train, evaluate, predict, score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)


def _print_version(value: bool) -> None:
    if value:
        from proseg.cli.version import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of every failure (or PROSEG_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                 help="Print the proseg, torch and Python versions and exit."),
) -> None:
    """Probabilistic multi-rater medical image segmentation."""
    from proseg.cli.errors import set_debug

    set_debug(debug)


def _register() -> None:
    # Each module defines a plain function with Typer annotations and only light imports at top level.
    from proseg.cli import commands

    for name, func in commands.COMMANDS.items():
        if isinstance(func, typer.Typer):  # a command group (proseg config list / show)
            app.add_typer(func, name=name)
        else:
            app.command(name)(func)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
