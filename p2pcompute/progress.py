"""Progress of long work (state download, link measurement, many tasks): a model and two renderers.

:class:`Progress` is sans-IO: the work tells it how far it got (:meth:`~Progress.advance`,
:meth:`~Progress.update`, :meth:`~Progress.finish`) and it hands a :class:`ProgressUpdate`
(done, total, rate over a sliding window, time left) to an optional callback. Library code never
prints: it takes a ``progress`` callback, and without one it reports through
:func:`log_progress` (plain lines at INFO on the ``p2pcompute.progress`` logger, which nothing
shows unless logging is configured to).

Two renderers turn updates into output; both throttle, so the work may report every chunk:

* :class:`TerminalLine` redraws one line on a terminal (``\\r...``), at most ``1 / min_interval``
  times a second (5 by default), and clears it when the work finishes;
* :class:`LogLines` writes a plain log line when the work crosses another tenth of its total
  (not more than once a second), when ``every_seconds`` passed without a line (30 s; slow work
  and work of unknown size still show life), and when it finishes.

:func:`progress_renderer` picks one: the redrawn line when ``stream`` (stderr) is a terminal and
logs are not JSON, log lines otherwise. The command line uses it; embedded users pass their own
callback or a renderer. Imports nothing of ours.

Example::

    p = Progress("state download", total=size, unit="B", on_update=progress_renderer())
    for chunk in chunks:
        ...
        p.advance(len(chunk))
    p.finish()
"""

from __future__ import annotations

import collections
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

log = logging.getLogger(__name__)

#: logger of :class:`LogLines` by default (the command line shows its INFO lines)
LOGGER = "p2pcompute.progress"


@dataclass(frozen=True)
class ProgressUpdate:
    """Where one piece of work stands. ``rate`` is units per second (``None`` before it can be
    measured); ``eta`` seconds left (``None`` when the total or the rate is unknown).

    Example::

        u.describe()   # 'state download: 45% 12.3/27.4 MB, 3.10 MB/s, 4 s left'
    """

    what: str
    done: float
    total: float | None
    unit: str
    elapsed: float
    rate: float | None
    eta: float | None
    finished: bool = False
    ok: bool = True  # False: the work stopped before its end (an error, a cancel)

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1], or ``None`` when the total is unknown (or zero)."""
        if not self.total:
            return None
        return min(1.0, max(0.0, self.done / self.total))

    def describe(self) -> str:
        """One line: what, percent, done/total, rate, time left (or the time taken when finished)."""
        parts = []
        frac = self.fraction
        if frac is not None:
            parts.append(f"{frac * 100:.0f}%")
        if self.total is not None:
            parts.append(_amount_pair(self.done, self.total, self.unit))
        else:
            parts.append(_amount(self.done, self.unit))
        if self.rate is not None and self.rate > 0:
            parts.append(f"{_amount(self.rate, self.unit)}/s")
        if self.finished:
            ended = "done in" if self.ok else "stopped after"
            parts.append(f"{ended} {_duration(self.elapsed)}")
        elif self.eta is not None:
            parts.append(f"{_duration(self.eta)} left")
        head = " ".join(parts[:2]) if frac is not None else parts[0]
        rest = parts[2:] if frac is not None else parts[1:]
        return f"{self.what}: " + ", ".join([head, *rest])


ProgressFn = Callable[[ProgressUpdate], None]


class Progress:
    """Done/total of one piece of work, its rate over the last ``window`` seconds and its ETA.

    ``total`` may be ``None`` (unknown) and set later (:meth:`set_total`); ``unit`` is ``"B"``
    for bytes (shown as kB/MB/GB) or a noun (``"tasks"``). ``clock`` is monotonic seconds.
    ``on_update`` gets a :class:`ProgressUpdate` after every change; an exception it raises is
    logged once and otherwise ignored (a display bug never stops the work).

    Example::

        p = Progress("bench link", total=29, unit="steps", on_update=print)
        p.advance()          # 1/29
        p.finish()
    """

    def __init__(
        self,
        what: str,
        total: float | None = None,
        unit: str = "",
        *,
        on_update: ProgressFn | None = None,
        clock: Callable[[], float] = time.monotonic,
        window: float = 10.0,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.on_update = on_update
        self.clock = clock
        self.window = window
        self.started = clock()
        self.done = 0.0
        self.finished = False
        self.ok = True
        self._samples: collections.deque[tuple[float, float]] = collections.deque([(self.started, 0.0)])
        self._callback_failed = False

    def set_total(self, total: float | None) -> None:
        """The total became known (or changed)."""
        self.total = total
        self._tell()

    def advance(self, n: float = 1) -> None:
        """``n`` more units are done (negative ``n`` is ignored: progress never goes back)."""
        self.update(self.done + max(0.0, n))

    def update(self, done: float) -> None:
        """``done`` units are done in all (a smaller figure than before is ignored)."""
        if self.finished:
            return
        self.done = max(self.done, float(done))
        now = self.clock()
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        self._tell()

    def finish(self, *, ok: bool = True) -> None:
        """The work ended, completely or (``ok=False``) not; renderers clear their line or write
        the last one. Only the first call counts."""
        if self.finished:
            return
        self.finished = True
        self.ok = ok
        self._tell()

    def snapshot(self) -> ProgressUpdate:
        """The current :class:`ProgressUpdate`."""
        now = self.clock()
        elapsed = max(0.0, now - self.started)
        rate = self._rate(now)
        eta: float | None = None
        if self.total is not None:
            left = max(0.0, self.total - self.done)
            if left == 0:
                eta = 0.0
            elif rate:
                eta = left / rate
                if not math.isfinite(eta):
                    eta = None
        return ProgressUpdate(
            self.what, self.done, self.total, self.unit, elapsed, rate, eta, self.finished, self.ok
        )

    def _rate(self, now: float) -> float | None:
        if self.finished:
            span = now - self.started
            return self.done / span if span > 0 else None
        t0, d0 = self._samples[0]
        span = now - t0
        if span <= 0:
            return None
        return (self.done - d0) / span

    def _tell(self) -> None:
        if self.on_update is None:
            return
        try:
            self.on_update(self.snapshot())
        except Exception:
            if not self._callback_failed:
                self._callback_failed = True
                log.exception("progress callback for %s failed", self.what)


def counting(progress: Progress) -> Callable[[int, int], None]:
    """An adapter for APIs that call ``fn(done, total)`` (``map_tasks``): feeds ``progress``.

    Example::

        p = Progress("tasks", unit="tasks", on_update=progress_renderer())
        results = await tasks.map_tasks("matmul", items, progress=counting(p))
        p.finish()
    """

    def fn(done: int, total: int) -> None:
        if progress.total != total:
            progress.total = total
        progress.update(done)
        if done >= total:
            progress.finish()

    return fn


class TerminalLine:
    """Renders updates as one line redrawn in place on ``stream`` (a terminal), throttled.

    At most one redraw per ``min_interval`` seconds (and one for each finished piece of work, which
    clears the line). Lines are cut to ``width`` characters so they never wrap.

    Example::

        p = Progress("download", total=n, unit="B", on_update=TerminalLine(sys.stderr))
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        min_interval: float = 0.2,
        width: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.min_interval = min_interval
        self.width = width
        self.clock = clock
        self._shown = 0  # characters on the line now
        self._last = -math.inf
        self.redraws = 0

    def __call__(self, update: ProgressUpdate) -> None:
        if update.finished:
            self.clear()
            return
        now = self.clock()
        if now - self._last < self.min_interval:
            return
        self._last = now
        text = update.describe()[: self.width]
        self.stream.write("\r" + text.ljust(self._shown))
        self.stream.flush()
        self._shown = len(text)
        self.redraws += 1

    def clear(self) -> None:
        """Blank the line and put the cursor back at its start."""
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0
        self._last = -math.inf


class LogLines:
    """Renders updates as plain log records on ``logger`` at ``level``, throttled.

    A line when the work crosses another ``step`` of its total (a tenth by default) but not more
    than once per ``min_seconds``; one when ``every_seconds`` passed without a line; one when the
    work finishes. The state is kept per ``what``, so one instance may serve several pieces of work.

    Example::

        p = Progress("download", total=n, unit="B", on_update=LogLines(logging.getLogger("x")))
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        level: int = logging.INFO,
        step: float = 0.1,
        min_seconds: float = 1.0,
        every_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger or logging.getLogger(LOGGER)
        self.level = level
        self.step = step
        self.min_seconds = min_seconds
        self.every_seconds = every_seconds
        self.clock = clock
        self._state: dict[str, tuple[float, int]] = {}  # what -> (time of last line, steps shown)

    def __call__(self, update: ProgressUpdate) -> None:
        now = self.clock()
        if update.finished:
            self._state.pop(update.what, None)
            self.logger.log(self.level, "%s", update.describe())
            return
        last, steps = self._state.get(update.what, (-math.inf, -1))
        frac = update.fraction
        reached = -1 if frac is None else int(frac / self.step + 1e-9)
        due = now - last >= self.every_seconds
        crossed = reached > steps and now - last >= self.min_seconds
        if not (due or crossed):
            return
        self._state[update.what] = (now, max(reached, steps))
        self.logger.log(self.level, "%s", update.describe())


def log_progress(logger: logging.Logger | None = None) -> ProgressFn:
    """What library code reports to when its caller passed no callback: :class:`LogLines` at INFO.

    Example::

        p = Progress("state download", total=n, unit="B", on_update=progress or log_progress())
    """
    return LogLines(logger)


def progress_renderer(stream: TextIO | None = None, *, json_logs: bool = False) -> ProgressFn:
    """A redrawn line when ``stream`` (default stderr) is a terminal and logs are text; log lines
    (through the ``p2pcompute.progress`` logger, so ``--log-format json`` applies) otherwise.

    Example::

        result = await measure_link(node, lane, peer, progress=progress_renderer())
    """
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not json_logs and isatty is not None and isatty():
        return TerminalLine(stream)
    return LogLines()


def _scaled(n: float) -> tuple[float, str]:
    for prefix, factor in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= factor:
            return n / factor, prefix
    return n, ""


def _num(n: float) -> str:
    if n == int(n) and abs(n) < 1e15:
        return str(int(n))
    return f"{n:.3g}" if abs(n) < 100 else f"{n:.0f}"


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        v, prefix = _scaled(n)
        return f"{v:.1f} {prefix}B" if prefix else f"{_num(n)} B"
    return f"{_num(n)} {unit}".rstrip()


def _amount_pair(done: float, total: float, unit: str) -> str:
    if unit == "B":
        v, prefix = _scaled(total)
        factor = total / v if v else 1.0
        return f"{done / factor:.1f}/{v:.1f} {prefix}B"
    return f"{_num(done)}/{_num(total)} {unit}".rstrip()


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        m, s = divmod(int(seconds + 0.5), 60)
        return f"{m}:{s:02d}" if m else f"{s} s"
    h, rest = divmod(int(seconds + 0.5), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


__all__ = [
    "LOGGER",
    "LogLines",
    "Progress",
    "ProgressFn",
    "ProgressUpdate",
    "TerminalLine",
    "counting",
    "log_progress",
    "progress_renderer",
]
