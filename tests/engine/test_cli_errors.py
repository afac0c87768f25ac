"""How the CLI reports failures: proseg's own errors and file-system errors as one line, a full disk as one line,
bugs with their traceback, ``--debug`` for everything; and the warning when a dataset differs from the
checkpoint's training data."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path

import pytest

from tests.engine.engine_helpers import cli, fails, ok


def _out(res: object) -> str:
    return res.output + (getattr(res, "stderr", "") or "")  # type: ignore[attr-defined]


def test_an_unexpected_exception_is_not_hidden_as_a_user_error(proseg_run: Path, synth: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import proseg.commands.evaluate as ev

    def bug(*args: object, **kwargs: object) -> None:
        raise ValueError("an internal bug")  # a plain ValueError is a bug, not bad input

    monkeypatch.setattr(ev, "evaluate_checkpoint", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "e")


def test_debug_shows_the_traceback_of_expected_failures(tmp_path: Path) -> None:
    fails("evaluate", tmp_path / "missing", match="no such run or checkpoint")
    with pytest.raises(FileNotFoundError, match="no such run or checkpoint"):
        cli("--debug", "evaluate", tmp_path / "missing")


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(proseg_run: Path, synth: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import proseg.commands.evaluate as ev

    def full(records: object, path: Path, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ev, "write_records_csv", full)  # where evaluate looks it up
    out = fails("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "e", "--samples", "2", "--figures", "0",
                "--max-cases", "1", match="no space left on the device writing")
    assert "cases.csv" in out and "Traceback" not in out
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))  # no half-written or temp folder


def test_evaluate_warns_when_the_dataset_was_prepared_differently(proseg_run: Path, synth: Path,
                                                                   tmp_path: Path) -> None:
    other = tmp_path / "other"
    ok("prepare", "synthetic", "0", other, "--cases", "8", "--size", "48", "--intensity", "minmax", "-q")
    res = cli("evaluate", proseg_run, "--data", other, "--out", tmp_path / "e", "--samples", "2", "--figures", "0",
              "--max-cases", "1", "--mode", "diverse")
    out = _out(res)
    assert res.exit_code == 0, out
    assert "warning: dataset differs from the checkpoint's training data: intensity" in out
    assert "32x32" in out and "48x48" in out
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert len(report["warnings"]) == 2
    # the store it was trained on: no warning
    res = cli("evaluate", proseg_run, "--data", synth, "--out", tmp_path / "same", "--samples", "2", "--figures", "0",
              "--max-cases", "1")
    assert res.exit_code == 0 and "warning:" not in _out(res)
    assert json.loads((tmp_path / "same" / "metrics.json").read_text())["warnings"] == []


def _copy_checkpoint(run: Path, dest: Path) -> Path:
    import shutil

    from proseg.engine.checkpoint import resolve_checkpoint

    shutil.copytree(resolve_checkpoint(run), dest)
    return dest


def test_evaluate_and_predict_name_a_damaged_weights_file(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    ck = _copy_checkpoint(proseg_run, tmp_path / "ck")
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out = fails("evaluate", ck, "--data", synth, "--out", tmp_path / "e", match="model.safetensors")
    assert "Traceback" not in out and not (tmp_path / "e").exists()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    fails("predict", ck, tmp_path / "x.png", tmp_path / "p", match="model.safetensors")
    assert not (tmp_path / "p").exists()


def test_a_nan_concentration_is_refused_at_load_not_a_hang(proseg_run: Path, synth: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    ck = _copy_checkpoint(proseg_run, tmp_path / "ck")
    state = load_file(str(ck / "model.safetensors"))
    state["tau.raw_concentration"] = state["tau.raw_concentration"].clone()
    state["tau.raw_concentration"].view(-1)[0] = torch.nan
    save_file(state, str(ck / "model.safetensors"))

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("evaluate hung on a NaN concentration")

    before = signal.signal(signal.SIGALRM, hung)  # the old sampler looped forever: fail instead of hanging
    signal.alarm(60)
    try:
        fails("evaluate", ck, "--data", synth, "--out", tmp_path / "e", match="tau.raw_concentration")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
