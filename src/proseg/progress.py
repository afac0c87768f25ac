"""Progress of a long loop (training steps, evaluated cases, predicted volumes, prepared cases) on stderr.

On a terminal it is a tqdm bar. When stderr is not a terminal (a log file, a batch job, a pipe) a bar's ``\\r``
frames would pile up in the file, so instead a plain line is written every ``PROSEG_PROGRESS_EVERY_S`` seconds
(default 30) and at every 10 % of the total, plus one at the end::

    [proseg] train step 120/1236  loss 1.8300  4.1 img/s  eta 52 min

Only the process that shows progress creates one (``enabled=False`` on the other DDP ranks: nothing at all).
``PROSEG_PROGRESS_EVERY_S=0`` writes a line on every update; ``PROSEG_PROGRESS=off`` turns progress off,
``PROSEG_PROGRESS=lines`` forces the plain lines on a terminal too.

This module imports nothing from proseg (any layer may use it).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

EVERY_ENV = "PROSEG_PROGRESS_EVERY_S"
MODE_ENV = "PROSEG_PROGRESS"
DEFAULT_EVERY_S = 30.0


def every_s() -> float:
    """Seconds between two plain progress lines (``PROSEG_PROGRESS_EVERY_S``; a bad value is the default)."""
    try:
        value = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S
    return value if math.isfinite(value) and value >= 0 else DEFAULT_EVERY_S


def format_eta(seconds: float) -> str:
    """``42 s``, ``52 min``, ``3.4 h``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """``update(n)`` after each unit of work, ``set_info(text)`` for the loop's own numbers, ``close()`` at the end
    (or use it as a context manager). ``write(msg)`` prints a line without breaking a bar.

    Args:
        total: the number of units the loop does (``initial`` of them already done, e.g. on resume).
        desc: what the loop is (``train``, ``evaluate``, ``predict``, ``prepare``).
        unit: what one unit is (``step``, ``case``, ``volume``).
        enabled: False = nothing is shown (DDP ranks other than 0).
        show_rate: put ``<units>/s`` in the plain line (off when ``set_info`` carries a better rate, e.g. img/s).
        stream: where to write (default ``sys.stderr`` at creation).
    """

    def __init__(self, total: int, desc: str, unit: str = "step", *, initial: int = 0, enabled: bool = True,
                 show_rate: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.show_rate = show_rate
        self.stream = stream if stream is not None else sys.stderr
        self.info = ""
        mode = os.environ.get(MODE_ENV, "").strip().lower()
        self.enabled = enabled and mode not in ("off", "0", "none", "false", "no")
        self.bar: Any = None
        self.lines = self.enabled and (mode == "lines" or not _isatty(self.stream))
        self.every_s = every_s()
        self._t0 = self._last_t = time.monotonic()
        self._n0 = self._last_n = self.n
        self._closed = False
        if self.enabled and not self.lines:
            from tqdm import tqdm  # only a terminal needs it

            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=True,
                            file=self.stream)

    def set_info(self, text: str) -> None:
        """The loop's own numbers (``loss 1.83  4.1 img/s``), shown beside the count."""
        self.info = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        before, self.n = self.n, self.n + n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        tenth = max(self.total, 1) / 10
        crossed = self.total > 0 and math.floor(self.n / tenth) > math.floor(before / tenth)
        if now - self._last_t >= self.every_s or crossed or self.n >= self.total:
            self._emit(now)

    def line(self, now: float | None = None) -> str:
        """The plain progress line at this moment."""
        now = time.monotonic() if now is None else now
        done = self.n - self._n0
        rate = done / max(now - self._t0, 1e-9) if done > 0 else math.nan
        parts = [f"[proseg] {self.desc} {self.unit} {self.n}/{self.total}"]
        if self.info:
            parts.append(self.info)
        if self.show_rate and done > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
        if self.n < self.total:
            parts.append(f"eta {format_eta((self.total - self.n) / rate) if done > 0 else '?'}")
        return "  ".join(parts)

    def _emit(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self._last_t, self._last_n = now, self.n

    def write(self, msg: str) -> None:
        """Print ``msg`` as its own line (above a bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self._last_n != self.n:  # the last state, when no line said it yet
            self._emit(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
