"""Run logs: CSV and JSONL always, TensorBoard when the ``tensorboard`` package is installed (rank 0 only)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from proseg.engine.checkpoint import atomic_write_text


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them readable
    return v


class RunLogger:
    """Appends rows to ``<name>.jsonl`` and ``<name>.csv`` in ``run_dir``.

    On resume from step ``s`` the rows logged after ``s`` by the interrupted process (which the resumed run
    will log again) are dropped first, so a resumed run's log reads like an uninterrupted one.
    """

    def __init__(self, run_dir: Path, name: str = "log", resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.jsonl = run_dir / f"{name}.jsonl"
        self.csv = run_dir / f"{name}.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if int(row.get("step", 0)) <= resume_step:
                        self.rows.append(row)
            atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        elif self.jsonl.exists():
            self.jsonl.unlink()
        self._columns: list[str] = []
        for r in self.rows:
            self._columns += [k for k in r if k not in self._columns]
        self._rewrite_csv()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def _rewrite_csv(self) -> None:
        lines: list[str] = []
        if self._columns:
            import io

            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self._columns, lineterminator="\n")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
            lines.append(buf.getvalue())
        atomic_write_text(self.csv, "".join(lines))

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _jsonable(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        new = [k for k in row if k not in self._columns]
        if new:  # a new column: rewrite the CSV with the wider header
            self._columns += new
            self._rewrite_csv()
        else:
            with open(self.csv, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self._columns, lineterminator="\n").writerow(row)
        if self.tb is not None:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
