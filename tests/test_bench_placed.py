"""The tasks and overlay suites with their nodes placed in processes (their ``--wan`` mode).

Where namespaces can be made the processes run inside an unshaped emulated network; elsewhere
the same orchestration runs on loopback (a layout whose peers have no ``exec`` prefix), so the
multi-process path is tested on every machine. In the tasks suite a provider really dies
(SIGKILL) mid-task; in the overlay suite adverts and raw messages cross between processes.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks import overlay, tasks, wan
from p2pcompute import benchresults as harness
from p2pcompute.benchresults import WAN_ENV

SUPPORT = wan.probe_support()


@contextlib.contextmanager
def _layout() -> Iterator[dict[str, Any]]:
    if SUPPORT.ok:
        with wan.WanEmulation(wan.WanSpec(), peers=3, support=SUPPORT) as net:
            yield net.layout()
    else:
        yield {"peers": [{"index": i, "exec": [], "addr": "127.0.0.1"} for i in range(3)]}


def test_tasks_suite_runs_each_node_as_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_overlay_suite_spreads_nodes_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "_wan_used", None)
    with _layout() as layout:
        monkeypatch.setenv(WAN_ENV, json.dumps(layout))
        # 3 nodes: one per site, so the source's site has no other node and answers "armed" and
        # "arrivals" at once (two lines in one read); 7 nodes: several per site
        result = overlay.run(quick=True, sizes=[3, 7], samples=2, deadline=30.0)
    rows = {c.name: c for c in result.configs}
    for name, per_site in (
        ("advert_n3", [1, 1, 1]),
        ("raw_topic_n3", [1, 1, 1]),
        ("advert_n7", [3, 2, 2]),
        ("raw_topic_n7", [3, 2, 2]),
    ):
        row = rows[name]
        assert row.params["processes"] == 3
        assert row.params["nodes_per_site"] == per_site
        assert row.samples["delivered"] == [1.0, 1.0]  # every other node, in every process
        assert all(0 < t < 30 and math.isfinite(t) for t in row.samples["advert_p100_s"])
        assert not any("views before measuring" in n for n in row.notes)
    assert harness._wan_used == layout
