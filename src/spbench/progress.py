"""How far a long step is: the Fisher estimate, a task's decoding, a fine-tune.

:class:`Progress` logs a line at each tenth of the work (done/total, percent, time spent, an
estimate of the time left), so a job's log file says where it stands; when standard error is a
terminal it also draws a tqdm bar there, redrawn in place, and routes the job's console log
lines above the bar so that neither garbles the other. ``SPBENCH_PROGRESS`` overrides the
choice: ``bar`` (always draw), ``log`` (never draw), ``auto`` (the default: draw on a terminal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["Progress", "draws_bar"]


def draws_bar(stream=None) -> bool:
    """Whether a bar is drawn on ``stream`` (standard error by default): ``SPBENCH_PROGRESS``
    when it says ``bar`` or ``log``, else whether the stream is a terminal."""
    mode = os.environ.get("SPBENCH_PROGRESS", "auto")
    if mode not in ("auto", "bar", "log"):
        raise ValueError(f"SPBENCH_PROGRESS must be auto, bar or log, not {mode!r}")
    if mode != "auto":
        return mode == "bar"
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """Counts ``total`` units of work named ``what`` (e.g. "Fisher of digits-src", unit
    "images"); :meth:`update` after each piece. A log line on ``logger`` each time another
    tenth is done (and at the end); a tqdm bar on standard error where :func:`draws_bar` says so.
    Use as a context manager, which closes the bar also when the work fails. ``start`` is work
    already done (a resumed fine-tune): it counts toward the position, not toward the rate."""

    def __init__(self, total: int, what: str, *, unit: str = "it", logger: logging.Logger | None = None,
                 start: int = 0, stream=None):
        if total < 0:
            raise ValueError(f"progress total must be >= 0, not {total}")
        self.total, self.what, self.unit = int(total), what, unit
        self.log = logger or logging.getLogger("spbench")
        self.done = self._start = int(start)
        self._began = time.perf_counter()
        self._tenth = self._tenths(self.done)
        self._bar = None
        self._redirect = contextlib.ExitStack()
        stream = sys.stderr if stream is None else stream
        if draws_bar(stream):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # console log lines go through tqdm.write, above the bar; file handlers are untouched
            self._redirect.enter_context(logging_redirect_tqdm([logging.getLogger()]))
            self._bar = tqdm(total=self.total, initial=self.done, desc=what, unit=unit, file=stream,
                             mininterval=0.5, leave=False, dynamic_ncols=True)

    def _tenths(self, done: int) -> int:
        return 10 * done // self.total if self.total else 10

    def elapsed(self) -> float:
        return time.perf_counter() - self._began

    def update(self, n: int = 1, **postfix) -> None:
        """``n`` more units done; ``postfix`` (e.g. loss=0.41) goes into the bar and the log line."""
        self.done = min(self.done + n, self.total)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        tenth = self._tenths(self.done)
        if tenth != self._tenth:
            self._tenth = tenth
            self._log_line(postfix)

    def _log_line(self, postfix: dict) -> None:
        spent = self.elapsed()
        ran = self.done - self._start
        left = spent / ran * (self.total - self.done) if ran else float("nan")
        extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in postfix.items())
        self.log.info("%s: %d/%d %s (%d%%), %.1f s, about %.0f s left%s", self.what, self.done, self.total,
                      self.unit, 100 * self.done // max(self.total, 1), spent, left, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def setup_logging(log_path=None, level: int = logging.INFO) -> None:
    """Log spbench's messages (progress, counts, results) to ``log_path`` and stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)
