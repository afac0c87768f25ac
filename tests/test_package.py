"""The package installs, its CLI starts, and the model registry is consistent."""

import subprocess
import sys

import proseg
from proseg.models import list_models


def test_version_string() -> None:
    assert proseg.__version__.count(".") == 2


def test_cli_help_starts_without_torch_import() -> None:
    # Lazy imports: `proseg --help` must not import torch (start-up time of the CLI).
    code = "import sys; from proseg.cli.main import app; import typer.testing as t; " \
           "r = t.CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_lists_are_sorted_strings() -> None:
    names = list_models()
    assert names == sorted(names)
