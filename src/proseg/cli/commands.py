"""The table of CLI commands: name -> function. Each command module is listed here (one line each).

Command modules import only typer and the standard library at top level; everything heavy is imported
inside the command function, so ``proseg --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proseg.cli.adapt import adapt
from proseg.cli.config import config
from proseg.cli.demo import demo
from proseg.cli.evaluate import evaluate
from proseg.cli.info import info
from proseg.cli.predict import predict
from proseg.cli.prepare import prepare
from proseg.cli.score import score
from proseg.cli.summarize import summarize
from proseg.cli.train import train
from proseg.cli.version import version

COMMANDS: dict[str, Callable[..., Any]] = {
    "version": version,
    "prepare": prepare,
    "info": info,
    "score": score,
    "train": train,
    "adapt": adapt,
    "config": config,
    "evaluate": evaluate,
    "summarize": summarize,
    "predict": predict,
    "demo": demo,
}
