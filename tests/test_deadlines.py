"""p2pcompute.deadlines: trio's timeouts become PeerTimeout naming what and whom (mock clock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pcompute.deadlines import deadline, deadline_at, give_up_after
from p2pcompute.errors import PeerTimeout


async def test_deadline_raises_peer_timeout_naming_what_and_whom(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    with pytest.raises(PeerTimeout) as info, deadline(5, "the offer", peer="12D3KooWpeer"):
        await trio.sleep(60)
    assert trio.current_time() - start == pytest.approx(5)
    assert info.value.peer == "12D3KooWpeer"
    assert "the offer did not finish within 5 s" in str(info.value)
    assert "12D3KooWpeer" in str(info.value)


async def test_a_body_that_finishes_in_time_is_untouched(autojump_clock: trio.testing.MockClock) -> None:
    with deadline(5, "quick work") as scope:
        await trio.sleep(4.9)
    assert not scope.cancelled_caught
    with deadline(None, "unbounded work"):
        await trio.sleep(10_000)


async def test_deadline_at_is_absolute(autojump_clock: trio.testing.MockClock) -> None:
    when = trio.current_time() + 3
    with pytest.raises(PeerTimeout, match="the lease"), deadline_at(when, "the lease"):
        await trio.sleep(10)
    assert trio.current_time() == pytest.approx(when)
    with deadline_at(None, "no limit"):
        await trio.sleep(100)


async def test_other_errors_pass_through(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(KeyError), deadline(5, "work"):
        raise KeyError("x")


async def test_give_up_after_is_quiet(autojump_clock: trio.testing.MockClock) -> None:
    with give_up_after(2) as scope:
        await trio.sleep(10)
    assert scope.cancelled_caught
    with give_up_after(None) as scope:
        await trio.sleep(10)
    assert not scope.cancelled_caught
