"""Run logs: CSV and JSONL always, TensorBoard when the ``tensorboard`` package is installed (rank 0 only).

TensorBoard (``pip install proseg[tensorboard]``; never required): the training rows as scalars (``loss``, ``lr``,
every loss term ...), each validation's metrics as ``val/<metric>`` scalars, and one cheap panel per validation,
``val/case``: the first validation case's image | mean label | mean prediction (middle slice), side by side.

JSONL lines are strict JSON (:mod:`proseg.jsonio`): a NaN/Inf value (e.g. ``grad_norm`` without clipping, a
diverged loss term) is written as ``null``; the CSV keeps it as ``nan`` / ``inf``, and TensorBoard gets only
finite scalars.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from proseg.engine.checkpoint import TENSORBOARD_DIR
from proseg.fsutil import atomic_write_text
from proseg.jsonio import dumps


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    # A logged value is a number, a string or a bool; a null was a NaN/Inf (jsonio), so the CSV rewritten on
    # resume reads as the one an uninterrupted run wrote.
    return {k: math.nan if v is None else v for k, v in row.items()}


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
                    row = _from_json(json.loads(line))
                    if int(row.get("step", 0)) <= resume_step:
                        self.rows.append(row)
            atomic_write_text(self.jsonl, "".join(dumps(r) + "\n" for r in self.rows))
        elif self.jsonl.exists():
            self.jsonl.unlink()
        self._columns: list[str] = []
        for r in self.rows:
            self._columns += [k for k in r if k not in self._columns]
        self._rewrite_csv()
        self.tb = _summary_writer(run_dir / TENSORBOARD_DIR) if tensorboard else None

    def _rewrite_csv(self) -> None:
        text = ""
        if self._columns:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self._columns, lineterminator="\n")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
            text = buf.getvalue()
        atomic_write_text(self.csv, text)

    def log(self, row: dict[str, Any]) -> None:
        row = dict(row)
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(dumps(row) + "\n")
        new = [k for k in row if k not in self._columns]
        if new:  # a new column: rewrite the CSV with the wider header
            self._columns += new
            self._rewrite_csv()
        else:
            with open(self.csv, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self._columns, lineterminator="\n").writerow(row)
        self.add_scalars(row)

    def add_scalars(self, row: Mapping[str, Any], prefix: str = "") -> None:
        """The finite numbers of ``row`` as TensorBoard scalars ``<prefix><key>`` at ``row["step"]`` (no-op
        without TensorBoard)."""
        if self.tb is None:
            return
        step = int(row.get("step", 0))
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}{k}", v, step)

    def add_case_panel(self, tag: str, image: Any, labels: Any, samples: Any, step: int) -> None:
        """One grayscale panel: image | mean label | mean prediction of a case's middle slice (no-op without
        TensorBoard). ``image`` ``(D, C, H, W)``, ``labels`` ``(D, R, H, W)``, ``samples`` ``(..., D, H, W)``."""
        if self.tb is None:
            return
        self.tb.add_image(tag, case_panel(image, labels, samples), step, dataformats="HW")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def case_panel(image: Any, labels: Any, samples: Any) -> np.ndarray:
    """``(H, 3W)`` float32 in [0, 1]: the middle slice's first image channel (min-max scaled), the mean of its
    labels, the mean of its samples."""
    image, labels, samples = (np.asarray(a, dtype=np.float32) for a in (image, labels, samples))
    d = image.shape[0] // 2
    img = image[d, 0]
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    lab = labels[d].mean(axis=0)
    pred = samples.reshape(-1, *samples.shape[-3:])[:, d].mean(axis=0)
    return np.clip(np.nan_to_num(np.concatenate([img, lab, pred], axis=1)), 0.0, 1.0)


def _summary_writer(directory: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``directory``, or None without the optional ``tensorboard`` package.

    Imported here, not at the top: ``torch.utils.tensorboard`` raises ImportError without that package, and
    importing it costs about a second, which only a run that logs should pay.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))
