"""DDP on CPU (gloo): 2 processes follow the 1-process run at the same global batch; sharded evaluation gives
the same numbers as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from proseg.engine.config import load_config
from proseg.engine.trainer import Trainer
from tests.engine.engine_helpers import TRAIN_FAST, TinyConvModel, ok, threads, toy_data

OVERRIDES = ["train.batch_size=8", "train.log_every=1", "train.device=cpu", "optim.lr=0.05", "train.epochs=2",
             "optim.warmup_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(run_dir: str) -> None:
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = TinyConvModel(1, 2, noise=0.0)  # deterministic loss: the curves must agree to float precision
    t = Trainer(load_config(None, OVERRIDES), run_dir, data=toy_data(), model=model)
    t.fit()
    if t.dist.is_main:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(run_dir) / "final.pt")


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from proseg.engine.distributed import cleanup_distributed

    try:
        _run(run_dir)
    finally:
        cleanup_distributed()


def _log(run: Path, name: str = "log") -> list[dict]:
    return [json.loads(x) for x in (run / f"{name}.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _run(str(one))
    mp.start_processes(_worker, args=(2, _free_port(), str(two)), nprocs=2, join=True, start_method="spawn")
    a, b = _log(one), _log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):  # the global batch's loss: mean over the two ranks
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        assert rb["lr"] == pytest.approx(ra["lr"])
    wa, wb = torch.load(one / "final.pt"), torch.load(two / "final.pt")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    # validation sharded over the ranks scores exactly what one process scores
    va, vb = _log(one, "val"), _log(two, "val")
    assert [v["score"] for v in vb] == pytest.approx([v["score"] for v in va], rel=1e-5)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


def test_torchrun_cli_train_and_sharded_evaluate(synth: Path, proseg_run: Path, tmp_path: Path) -> None:
    """The real CLI under torchrun: training runs on 2 processes, and 2-process evaluation equals 1-process."""
    proseg_bin = str(Path(sys.executable).parent / "proseg")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
            "--no-python", proseg_bin]
    run = tmp_path / "ddp-run"
    res = subprocess.run([*base, "train", "--data", str(synth), "--out", str(run), "model.name=proseg",
                          *TRAIN_FAST, "train.max_steps=2"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _log(run)
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    ev1, ev2 = tmp_path / "ev1", tmp_path / "ev2"
    with threads(1):  # as each torchrun process (OMP_NUM_THREADS=1)
        ok("evaluate", proseg_run, "--data", synth, "--out", ev1, "--samples", "2", "--figures", "0")
    base[4] = f"--master-port={_free_port()}"
    res = subprocess.run([*base, "evaluate", str(proseg_run), "--data", str(synth), "--out", str(ev2), "--samples",
                          "2", "--figures", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (ev1, ev2))
    assert m2["world_size"] == 2 and m1["results"] == m2["results"]
    assert (ev1 / "cases.csv").read_text() == (ev2 / "cases.csv").read_text()
