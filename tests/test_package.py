"""The package installs, its CLI starts, and the model registry is consistent."""

import ast
import re
import subprocess
import sys
from pathlib import Path

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


def test_registry_lists_every_built_in_model_and_filters_by_pattern() -> None:
    # The README's list is what users read; a model that stops registering (or a new one left out) fails here.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = ast.literal_eval(re.search(r"print\(list_models\(\)\)\s*#\s*(\[.*?\])", readme).group(1))
    assert list_models() == listed
    assert list_models("cm_*") == ["cm_global", "cm_pixel"]
    assert list_models("nothing*") == []
