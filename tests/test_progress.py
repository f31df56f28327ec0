"""The progress model (hypothesis) and its two renderers on fake streams and a fake clock, plus the
redrawn line on a real pseudo-terminal."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.progress import (
    LogLines,
    Progress,
    ProgressUpdate,
    TerminalLine,
    counting,
    progress_renderer,
)

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


steps = st.lists(
    st.tuples(st.floats(0, 30, allow_nan=False), st.floats(-5, 1e6, allow_nan=False)), max_size=60
)


@given(steps=steps, total=st.one_of(st.none(), st.floats(0, 1e7, allow_nan=False)))
def test_model_invariants(steps: list[tuple[float, float]], total: float | None) -> None:
    clock = Clock()
    seen: list[ProgressUpdate] = []
    p = Progress("work", total=total, unit="B", on_update=seen.append, clock=clock)
    last_done = 0.0
    for dt, n in steps:
        clock.now += dt
        p.advance(n)
        u = p.snapshot()
        assert u.done >= last_done  # never goes back
        last_done = u.done
        frac = u.fraction
        if frac is not None:
            assert 0.0 <= frac <= 1.0
        if u.rate is not None:
            assert u.rate >= 0
        if u.eta is not None:
            assert u.eta >= 0
            assert total is not None
        if total is not None and u.done >= total:
            assert u.eta == 0.0
        assert u.describe().startswith("work: ")
    p.finish()
    p.finish()  # idempotent: one finished update
    assert [u.finished for u in seen].count(True) == 1
    assert seen[-1].finished
    assert len(seen) == len(steps) + 1


@given(speed=st.floats(1, 1e9), ticks=st.integers(3, 50), tick=st.floats(0.05, 5))
def test_rate_and_eta_of_steady_work(speed: float, ticks: int, tick: float) -> None:
    clock = Clock()
    total = speed * tick * ticks * 2
    p = Progress("x", total=total, clock=clock, window=10.0)
    for _ in range(ticks):
        clock.now += tick
        p.advance(speed * tick)
    u = p.snapshot()
    assert u.rate == pytest.approx(speed, rel=1e-6)
    assert u.eta == pytest.approx(tick * ticks, rel=1e-6)  # half done at the same speed


def test_rate_follows_the_recent_window() -> None:
    clock = Clock()
    p = Progress("x", total=None, clock=clock, window=10.0)
    for _ in range(30):  # 100 units/s for 30 s, then 10 units/s for 30 s
        clock.now += 1
        p.advance(100)
    for _ in range(30):
        clock.now += 1
        p.advance(10)
    rate = p.snapshot().rate
    assert rate is not None
    assert 9 <= rate <= 12


def test_describe() -> None:
    u = ProgressUpdate("state download", 12.3e6, 27.4e6, "B", 4.0, 3.1e6, 4.7, False)
    assert u.describe() == "state download: 45% 12.3/27.4 MB, 3.1 MB/s, 4.7 s left"
    u = ProgressUpdate("tasks", 3, None, "tasks", 2.0, 1.5, None, False)
    assert u.describe() == "tasks: 3 tasks, 1.5 tasks/s"
    u = ProgressUpdate("bench link", 29, 29, "steps", 75.0, 0.39, 0.0, True)
    assert u.describe() == "bench link: 100% 29/29 steps, 0.39 steps/s, done in 1:15"
    u = ProgressUpdate("state download", 0, 2e9, "B", 12.0, None, None, True, ok=False)
    assert u.describe() == "state download: 0% 0.0/2.0 GB, stopped after 12 s"


def test_terminal_line_redraws_at_most_five_times_a_second_and_clears() -> None:
    clock = Clock()
    out = io.StringIO()
    line = TerminalLine(out, clock=clock)
    p = Progress("download", total=1000, unit="B", on_update=line, clock=clock)
    for _ in range(100):  # 100 updates over 2 s
        clock.now += 0.02
        p.advance(10)
    assert 10 <= line.redraws <= 11
    text = out.getvalue()
    assert "\n" not in text
    assert text.count("\r") == line.redraws
    p.finish()
    frames = out.getvalue().split("\r")
    assert frames[-1] == ""  # cleared: the cursor is back at the start of a blank line
    assert frames[-2].strip() == ""
    # a shorter line after a longer one is padded so no old characters remain
    width = len(frames[-3])
    assert all(len(f) <= width for f in frames[1:-2])


def test_log_lines_every_tenth_and_on_finish() -> None:
    clock = Clock()
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.progress.lines")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    lines = LogLines(logger, clock=clock)
    p = Progress("tasks", unit="tasks", on_update=lines, clock=clock)
    fn = counting(p)
    for done in range(1, 201):  # 200 tasks, 0.1 s apart: 20 s in all
        clock.now += 0.1
        fn(done, 200)
    assert p.finished
    assert records[-1].startswith("tasks: 100% 200/200 tasks")
    assert "done in" in records[-1]
    # one line per tenth (the first at 1 task), and the last one on finishing
    assert 10 <= len(records) <= 12
    records.clear()
    # slow work of unknown size still shows life every 30 s
    q = Progress("slow", unit="B", on_update=lines, clock=clock)
    for _ in range(12):
        clock.now += 10
        q.advance(1)
    assert len(records) == 4  # the first update, then at 30, 60 and 90 s after it
    assert records[0] == "slow: 1 B, 0.1 B/s"


def test_a_failing_callback_never_stops_the_work(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_u: ProgressUpdate) -> None:
        raise RuntimeError("display bug")

    p = Progress("x", total=3, on_update=broken)
    for _ in range(3):
        p.advance()
    p.finish()
    assert p.done == 3
    assert sum("progress callback for x failed" in r.message for r in caplog.records) == 1


def test_renderer_choice() -> None:
    assert isinstance(progress_renderer(io.StringIO()), LogLines)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_redrawn_line_on_a_real_terminal() -> None:
    import pty

    code = (
        "import sys\n"
        "from p2pcompute.progress import Progress, TerminalLine, progress_renderer\n"
        "r = progress_renderer()\n"
        "assert isinstance(r, TerminalLine), r\n"
        "t = [0.0]\n"
        "r.clock = lambda: t[0]\n"
        "p = Progress('demo', total=10, unit='steps', on_update=r, clock=lambda: t[0])\n"
        "for _ in range(10):\n"
        "    t[0] += 1.0\n"
        "    p.advance()\n"
        "p.finish()\n"
        "print('after', file=sys.stderr)\n"
    )
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO once the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=30) == 0, b"".join(chunks)
    text = b"".join(chunks).decode()
    assert "\rdemo: 10% 1/10 steps" in text
    assert "\rdemo: 90% 9/10 steps" in text
    assert "after" in text
    # the line was blanked before the next output
    before_after = text[: text.index("after")]
    assert before_after.endswith("\r")
    assert before_after.split("\r")[-2].strip() == ""
