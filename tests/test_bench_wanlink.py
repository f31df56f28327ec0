"""benchmarks.wanlink: the user-space link's shaper (sans-IO, with hypothesis) and the real forwarder.

The shaper is the twin of one netem qdisc on a peer's egress; its properties are checked for any
sequence of packets: one sender's packets leave in order, never before their delay, never faster
than the rate; exactly the packets whose draw falls under the loss are lost; the queue limit holds.
The real tests (root with TUN devices) run TCP between two namespaces through the forwarder and
read its counters.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import wan
from benchmarks.wan import WanEmulation, parse_spec
from benchmarks.wanlink import EgressShaper, queue_limit, route

SUPPORT = wan.probe_support()
needs_tun = pytest.mark.skipif(not (SUPPORT.ok and SUPPORT.tun), reason=SUPPORT.describe())

arrivals = st.lists(
    st.tuples(st.floats(0, 0.01), st.integers(40, 65_535), st.floats(0, 0.999), st.floats(-4, 4)),
    min_size=1,
    max_size=200,
)


@given(
    arrivals,
    st.floats(0, 0.2),
    st.floats(0, 0.05),
    st.one_of(st.none(), st.floats(1e3, 1e10)),
)
def test_one_senders_packets_leave_in_order_after_delay_and_within_rate(
    arr: list[tuple[float, int, float, float]], delay: float, jitter: float, rate: float | None
) -> None:
    s = EgressShaper(delay_s=delay, jitter_s=jitter, rate_bps=rate, limit=10_000)
    now = 100.0
    first = now
    sent = 0
    last = -math.inf
    for gap, size, u, z in arr:
        now += gap
        due = s.offer(now, size, u, z)
        assert due is not None  # no loss configured, limit not reached
        sent += size
        assert due >= last  # in order
        assert due >= now + max(delay + jitter * z, 0.0) - 1e-9  # never before its own delay
        if rate is not None:
            # never faster than the rate: everything so far has been serialized by `due - delay - ...`
            assert due - first >= sent / rate - 1e-9
        last = due
    assert s.held == len(arr)
    assert s.stats.passed == len(arr)
    assert s.stats.bytes_passed == sent


@given(st.lists(st.floats(0, 0.999), min_size=1, max_size=300), st.floats(0, 0.99))
def test_exactly_the_draws_under_the_loss_are_lost(draws: list[float], loss: float) -> None:
    s = EgressShaper(loss=loss, limit=10_000)
    fates = [s.offer(1.0, 1000, u, 0.0) is None for u in draws]
    assert fates == [u < loss for u in draws]
    assert s.stats.lost == sum(fates)
    assert s.stats.offered == len(draws)


@given(st.integers(1, 50), st.integers(0, 100))
def test_queue_limit_holds_and_frees_on_release(limit: int, extra: int) -> None:
    s = EgressShaper(delay_s=1.0, limit=limit)
    dues = [s.offer(0.0, 100, 0.5, 0.0) for _ in range(limit + extra)]
    assert all(d is not None for d in dues[:limit])
    assert all(d is None for d in dues[limit:])
    assert s.stats.overflow == extra
    s.released()
    assert s.offer(0.0, 100, 0.5, 0.0) is not None
    assert s.held == limit


def test_loss_is_drawn_before_the_limit_as_in_netem() -> None:
    s = EgressShaper(delay_s=1.0, loss=0.5, limit=1)
    assert s.offer(0.0, 100, 0.9, 0.0) is not None  # the queue is now full
    assert s.offer(0.0, 100, 0.1, 0.0) is None
    assert (s.stats.lost, s.stats.overflow) == (1, 0)
    assert s.offer(0.0, 100, 0.9, 0.0) is None
    assert (s.stats.lost, s.stats.overflow) == (1, 1)


def test_rate_spaces_back_to_back_packets() -> None:
    s = EgressShaper(rate_bps=1500 * 1000)  # a 1500-byte packet takes 1 ms on the wire
    dues = [s.offer(0.0, 1500, 0.5, 0.0) for _ in range(5)]
    assert dues == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005])
    # an idle gap does not bank credit: after a pause the next packet again takes 1 ms
    assert s.offer(1.0, 1500, 0.5, 0.0) == pytest.approx(1.001)


def test_bad_shaping_is_refused() -> None:
    for kw in ({"loss": 1.0}, {"delay_s": -1.0}, {"limit": 0}, {"rate_bps": 0.0}):
        with pytest.raises(ValueError, match=r"bad shaping|rate must be positive"):
            EgressShaper(**kw)  # type: ignore[arg-type]


def test_route_reads_only_ipv4_destinations_of_peers() -> None:
    peers = {bytes([10, 77, 0, 1]): 0, bytes([10, 77, 0, 2]): 1}
    v4 = bytearray(20)
    v4[0] = 0x45
    v4[16:20] = bytes([10, 77, 0, 2])
    assert route(bytes(v4), peers) == 1
    v4[16:20] = bytes([10, 77, 0, 9])
    assert route(bytes(v4), peers) is None
    v6 = bytes([0x60]) + bytes(39)
    assert route(v6, peers) is None
    assert route(b"\x45", peers) is None


def test_queue_limit_matches_the_netem_rule() -> None:
    assert queue_limit(200.0, 50.0) == 3333
    assert queue_limit(None, 0.0) == 3333  # unlimited counts as 10 gbit over 1 ms
    assert queue_limit(1.0, 1.0) == 1000  # never under 1000 packets
    assert queue_limit(100_000.0, 10_000.0) == 1_000_000


# ------------------------------------------------------------------------------ real forwarder

_PROBE = [sys.executable, "-m", "benchmarks.wan"]


def _tcp(net: WanEmulation, pings: int, nbytes: int) -> dict[str, list[float]]:
    srv = subprocess.Popen(
        net.exec_argv(0, [*_PROBE, "_serve", "--bind", net.addr(0)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        cli = subprocess.run(
            net.exec_argv(
                1,
                [
                    *_PROBE,
                    "_probe",
                    "--host",
                    net.addr(0),
                    "--pings",
                    str(pings),
                    "--bytes",
                    str(nbytes),
                    "--reps",
                    "1",
                ],
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        got: dict[str, list[float]] = json.loads(cli.stdout)
        return got
    finally:
        srv.wait(timeout=30)
        if srv.stderr is not None:
            srv.stderr.close()


@needs_tun
def test_user_link_delays_and_loses_as_told() -> None:
    with WanEmulation(parse_spec("15ms,2%loss"), peers=2, support=SUPPORT, backend="user") as net:
        assert net.layout()["backend"] == "user"
        base = _tcp(net, pings=5, nbytes=1 << 20)
        assert min(base["rtt_ms"]) < 15  # unshaped until told
        net.shape()
        before = net.link_stats()
        shaped = _tcp(net, pings=10, nbytes=2 << 20)
        after = net.link_stats()
    assert min(shaped["rtt_ms"]) >= 2 * 15 * 0.95
    assert before is not None
    assert after is not None
    assert after["shaped"] is True
    d = wan.link_delta(before, after)
    assert d["offered"] > 1000  # 2 MiB at 1500-byte MTU, both directions
    assert d["lost"] > 0
    assert 0.002 < d["lost"] / d["offered"] < 0.06  # 2 % drawn, binomial with n > 1000
    assert d["passed"] + d["lost"] + d["overflow"] == d["offered"]
    assert net.link_stats() is None  # gone with the emulation


@needs_tun
def test_user_link_limits_the_rate() -> None:
    with WanEmulation(parse_spec("40mbit"), peers=2, support=SUPPORT, backend="user") as net:
        net.shape()
        got = _tcp(net, pings=1, nbytes=4 << 20)
    assert got["mbytes_per_s"][0] < 5 * 1.2  # 40 mbit/s is 5 MB/s; no bucket to burst from
