"""The tasks suite with every node a process (its ``--wan`` mode), from start to its table.

Where namespaces can be made the processes run inside an unshaped emulated network; elsewhere
the same orchestration runs on loopback (a layout whose peers have no ``exec`` prefix), so the
multi-process path is tested on every machine. A provider really dies (SIGKILL) mid-task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks import harness, tasks, wan
from benchmarks.harness import WAN_ENV

SUPPORT = wan.probe_support()


@contextlib.contextmanager
def _layout() -> Iterator[dict[str, Any]]:
    if SUPPORT.ok:
        with wan.WanEmulation(wan.WanSpec(), peers=3, support=SUPPORT) as net:
            yield net.layout()
    else:
        yield {"peers": [{"index": i, "exec": [], "addr": "127.0.0.1"} for i in range(3)]}


def test_tasks_suite_runs_each_node_as_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setattr(harness, "_wan_used", None)  # restored after the test: wan_layout() marks it
    with _layout() as layout:
        monkeypatch.setenv(WAN_ENV, json.dumps(layout))
        result = tasks.run(quick=True)
    assert result.options["processes"] == 3
    assert result.options["providers"] == 2
    rows = {c.name: c for c in result.configs}
    assert len(rows["libp2p_rtt"].samples["lease_ms"]) == 10
    assert len(rows["request_to_lease"].samples["lease_ms"]) == 10
    assert rows["small_tasks"].samples["tasks_per_s"][0] > 0
    assert "providers used: 2" in rows["small_tasks"].notes
    # the victim SIGKILLed itself when its run started; the fallback provider finished the task
    (recovered,) = rows["recover_killed"].samples["recover_s"]
    assert 0 < recovered < 60
    assert any("SIGKILL" in n for n in rows["recover_killed"].notes)
    assert harness._wan_used == layout  # the suite's JSON will say which network it ran on
