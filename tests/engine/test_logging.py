"""Logs a person reads: plain progress lines (no ``\\r`` frames) when stderr is a file, and TensorBoard (when the
optional package is installed) with the validation metrics and a case panel."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from proseg.engine.config import load_config
from proseg.engine.trainer import Trainer
from proseg.progress import EVERY_ENV, MODE_ENV, Progress, format_eta
from tests.engine.engine_helpers import TRAIN_FAST, TinyConvModel, cli, toy_data


# --- the helper --------------------------------------------------------------------------------------------------
def test_plain_lines_every_tenth_and_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "3600")  # only the 10 % marks and the end
    buf = io.StringIO()  # not a terminal
    with Progress(100, "train", "step", stream=buf, show_rate=False) as bar:
        for i in range(100):
            bar.set_info(f"loss {1.0 / (i + 1):.4f}  4.1 img/s")
            bar.update(1)
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [int(re.search(r"step (\d+)/100", ln).group(1)) for ln in lines] == list(range(10, 101, 10))
    assert "loss" in lines[0] and "img/s" in lines[0] and "eta" in lines[0] and "eta" not in lines[-1]


def test_plain_lines_by_time_resume_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "0")  # a line on every update
    buf = io.StringIO()
    bar = Progress(1000, "evaluate", "case", initial=500, stream=buf)
    bar.update(1)
    bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert [ln.split()[3] for ln in lines] == ["501/1000", "502/1000"] and "case/s" in lines[0]
    buf = io.StringIO()
    Progress(10, "x", stream=buf, enabled=False).update(10)  # another DDP rank: nothing
    monkeypatch.setenv(MODE_ENV, "off")
    Progress(10, "x", stream=buf).update(10)
    assert buf.getvalue() == ""
    monkeypatch.setenv(EVERY_ENV, "not a number")
    assert Progress(1, "x", stream=buf, enabled=False).every_s == 30.0
    assert (format_eta(42), format_eta(52 * 60), format_eta(3.4 * 3600), format_eta(float("nan"))) == \
        ("42 s", "52 min", "3.4 h", "?")


# --- the commands, their stderr in a file ------------------------------------------------------------------------
def test_train_log_file_has_step_lines_and_no_carriage_returns(synth: Path, tmp_path: Path) -> None:
    err = tmp_path / "stderr.txt"
    env = {**os.environ, EVERY_ENV: "0", "OMP_NUM_THREADS": "1"}
    env.pop(MODE_ENV, None)
    proseg = Path(sys.executable).parent / "proseg"
    with open(err, "w") as fh:  # run from another folder: the config is found by name
        proc = subprocess.run([str(proseg), "train", "-c", "synthetic/proseg", "--data", str(synth), "--out",
                               str(tmp_path / "run"), *TRAIN_FAST, "train.max_steps=3"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=fh, env=env, timeout=300)
    text = err.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    steps = re.findall(r"^\[proseg\] train step (\d+)/3  loss \S+  \S+ img/s", text, flags=re.M)
    assert steps == ["1", "2", "3"], text


def test_evaluate_prepare_predict_progress_lines(proseg_run: Path, synth: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "0")
    monkeypatch.delenv(MODE_ENV, raising=False)
    res = cli("evaluate", proseg_run, "--data", synth, "--split", "test", "--out", tmp_path / "ev", "--samples", "2",
              "--mode", "diverse", "--figures", "0")
    assert res.exit_code == 0, res.output
    assert re.search(r"^\[proseg\] evaluate case \d+/\d+", res.stderr, flags=re.M) and "\r" not in res.stderr
    res = cli("prepare", "synthetic", "0", tmp_path / "prep", "--cases", "6", "--size", "16")
    assert res.exit_code == 0, res.output
    assert "[proseg] prepare case 6/6" in res.stderr and "\r" not in res.stderr, res.stderr
    inp = tmp_path / "pngs"
    inp.mkdir()
    for k in range(2):
        Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 255).astype(np.uint8)).save(inp / f"im{k}.png")
    res = cli("predict", proseg_run, inp, tmp_path / "pred", "--samples", "2")
    assert res.exit_code == 0, res.output
    assert "[proseg] predict input 2/2" in res.stderr and "\r" not in res.stderr, res.stderr


# --- TensorBoard (optional) --------------------------------------------------------------------------------------
def test_tensorboard_gets_val_scalars_and_a_case_panel(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    cfg = load_config(None, ["train.batch_size=8", "train.device=cpu", "train.epochs=2", "train.log_every=1",
                             "train.max_val_cases=2", "train.val_num_samples=2"])
    Trainer(cfg, tmp_path / "run", data=toy_data(), model=TinyConvModel(1, 2)).fit()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "val/score", "val/dice_soft"} <= set(tags["scalars"]), tags["scalars"]
    assert [e.step for e in acc.Scalars("val/score")] == [4, 8]
    assert "val/case-0" in tags["images"]
    img = acc.Images("val/case-0")[-1]
    assert (img.height, img.width) == (16, 48)  # image | mean label | mean prediction


def test_a_terminal_gets_a_bar() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = Tty()
    with Progress(4, "train", stream=buf) as bar:
        assert bar.bar is not None and not bar.lines
        bar.update(4)
    assert "\r" in buf.getvalue()  # tqdm's frames, on a terminal only
