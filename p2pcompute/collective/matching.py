"""The matchmaking driver: forms a group for one run and round by driving a sans-IO MatchCore.

:class:`Matchmaker` keeps what matchmaking needs across rounds (adverts heard early, the
matches in progress, the rounds already matched) and answers the others' hellos and readies;
:class:`MatchDriver` drives one :class:`~p2pcompute.collective.matchcore.MatchCore`: it
republishes our advert, pulls views from known peers, sends hellos and readies, and sleeps
until the core's next deadline or an answer arrives. Every decision is the core's.

Collaborators: the node (``publish``, ``subscribe``, ``peers``, ``identity``, ``addrs``), the
control links (:class:`~p2pcompute.collective.links.ControlLinks`, requests only), a counter for
statistics and a getter for the nursery that readies outlive a match in. Imports the
collective's cores and messages, :mod:`p2pcompute.deadlines`, :mod:`p2pcompute.errors`,
:mod:`p2pcompute.wire` and trio.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from p2pcompute.collective.links import ControlLinks
from p2pcompute.collective.matchcore import Candidate, Formed, MatchCore, NoGroup, SendHello, SendReady
from p2pcompute.collective.messages import (
    HELLO,
    HELLO_ACK,
    JOIN,
    JOIN_KIND,
    PRESENCE,
    PRESENCE_ACK,
    PRESENCE_STATES,
    READY,
    READY_ACK,
    open_join,
)
from p2pcompute.deadlines import give_up_after
from p2pcompute.errors import ConfigError, MalformedMessage, P2PComputeError, ProtocolError
from p2pcompute.wire.signing import seal_signed

log = logging.getLogger(__name__)

_MAX_BUFFERED_ADVERTS = 4096
_MAX_REMEMBERED = 512
_MAX_ADVERT_TTL = 300.0
_READY_GRACE = 1.0  # at most this long a formed peer waits for its readies in flight


@dataclass(frozen=True)
class MatchSettings:
    """Matchmaking's tuning: see :func:`~p2pcompute.collective.open_collective`.

    Example::

        settings = MatchSettings(settle=0.5, hello_timeout=10.0, republish_interval=2.0, pull_fanout=1)
    """

    settle: float = 0.5
    hello_timeout: float = 10.0
    republish_interval: float = 2.0
    pull_fanout: int = 1
    #: a member that leaves a hello unanswered this long is dropped from the group being formed
    #: (paused, overloaded or dead without its connection closing); it joins the next round
    silence: float = 3.0


class MatchDriver:
    """Drives one MatchCore: republishes our advert, sends hellos and readies, waits.

    Example::

        driver = MatchDriver(core, layout, advert, "collective/run", node=node, links=links,
                             absorb=matchmaker.absorb_many, settings=MatchSettings())
        result = await driver.run()          # Formed or NoGroup
    """

    def __init__(
        self,
        core: MatchCore,
        layout: bytes,
        advert: bytes,
        topic: str,
        *,
        node: Any,
        links: ControlLinks,
        absorb: Callable[[list[bytes], str], None],
        settings: MatchSettings,
        background: Callable[[], trio.Nursery | None] = lambda: None,
    ) -> None:
        self.core = core
        self.layout = layout
        self.advert = advert
        self.topic = topic
        self.node = node
        self.links = links
        self.absorb = absorb
        self.settings = settings
        self._background = background
        self._kick = trio.Event()
        self._pull_again_at: dict[str, float] = {}  # a failed pull is retried later, never given up
        self._readies = 0  # in flight
        self._readies_done = trio.Event()
        self._readies_done.set()
        self._pulling = 0

    def kick(self) -> None:
        """Wake the driver: the core has news (a vote, a candidate, an answer).

        Example::

            match.core.on_vote(peer, digest, seq, trio.current_time())
            match.kick()
        """
        self._kick.set()

    async def run(self) -> Formed | NoGroup:
        """Run until the core has a result (formed, or no group by the deadline).

        Example::

            result = await driver.run()
            if isinstance(result, Formed):
                print([c.peer_id for c in result.members])
        """
        core = self.core
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._republish)
            nursery.start_soon(self._watch_expected)
            while core.result is None:
                now = trio.current_time()
                for action in core.poll(now):
                    if isinstance(action, SendHello):
                        for peer in action.to:
                            nursery.start_soon(self._hello, peer, action)
                    elif isinstance(action, SendReady):
                        # a ready outlives the match: the others wait for it even once we have
                        # formed (see the end of this method)
                        background = self._background() or nursery
                        for peer in action.to:
                            self._readies += 1
                            self._readies_done = trio.Event()
                            background.start_soon(self._ready, peer, action.digest)
                if core.result is not None:
                    break
                deadline = core.next_deadline(now)
                with trio.move_on_at(deadline if deadline is not None else math.inf):
                    await self._kick.wait()
                self._kick = trio.Event()
            # Our readies should reach the others before our round starts: a peer that formed
            # and crashed at once would otherwise leave a member waiting for its ready, unformed.
            # But one to a peer that died hangs until hello_timeout, and a round started that
            # late gets us suspected: wait a little, then let them finish in the background.
            with give_up_after(_READY_GRACE):
                await self._readies_done.wait()
            nursery.cancel_scope.cancel()  # hellos and pulls in flight are moot now
        assert core.result is not None
        return core.result

    async def _republish(self) -> None:
        """Gossip our advert, and pull: hand our view to a few known peers not yet in it.

        GossipSub only reaches peers in the topic's mesh, and a fresh topic's mesh takes a
        heartbeat or two (a bootstrap node does not even subscribe); the pull makes discovery
        independent of it: every answer carries the answering peer's view.
        """
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    await self.node.publish(self.topic, self.advert)
                except Exception as exc:  # a publish with no mesh yet is retried next time
                    log.debug("collective: publish failed: %r", exc)
                now = trio.current_time()
                later = {p for p, t in self._pull_again_at.items() if t > now}
                known = set(self.core.candidates) | self.core.excluded | later
                try:
                    records = self.node.peers.alive()
                except Exception:  # an overlay without a table: gossip only
                    records = []
                unknown = [r.peer_id for r in records if r.peer_id not in known]
                if self.core.view(now) == [self.core.me.peer_id]:
                    # alone: ask the peers we dropped for silence whether the round went on
                    # without us (a busy answer ends our match now, not at the deadline)
                    unknown += sorted(self.core.silent() - later)
                if not self._pulling:  # one batch in flight: never pile work on a slow overlay
                    for peer in random.sample(unknown, min(self.settings.pull_fanout, len(unknown))):
                        self._pulling += 1
                        nursery.start_soon(self._pull, peer)
                await trio.sleep(self.settings.republish_interval)

    async def _pull(self, peer: str) -> None:
        try:
            await self._pull_one(peer)
        finally:
            self._pulling -= 1

    async def _pull_one(self, peer: str) -> None:
        core = self.core
        msg = HELLO.build(
            run=core.run, round=core.round_key, digest="", seq=0, members=[],
            adverts=core.adverts(trio.current_time()),
        )
        try:
            ack = await self.links.request(peer, msg, HELLO_ACK, self.settings.hello_timeout)
        except P2PComputeError as exc:
            log.debug("collective: pull from %s failed: %r", peer, exc)
            # not reachable, slow, or not speaking the protocol (a bootstrap node): back off
            self._pull_again_at[peer] = trio.current_time() + 4 * self.settings.republish_interval
            return
        self.absorb(ack["adverts"], peer)
        if ack["state"] == "ok" and ack["digest"]:
            core.on_vote(peer, ack["digest"], ack["seq"], trio.current_time())
        elif ack["state"] == "busy":  # it already averaged (or gave up) this round
            core.on_busy(peer, trio.current_time())
        self.kick()

    async def _hello(self, peer: str, action: SendHello) -> None:
        core = self.core
        msg = HELLO.build(
            run=core.run,
            round=core.round_key,
            digest=action.digest,
            seq=action.seq,
            members=list(action.members),
            adverts=core.adverts(trio.current_time()),
        )
        try:
            ack = await self.links.request(peer, msg, HELLO_ACK, self._hello_wait())
        except P2PComputeError as exc:
            log.info("collective: hello to %s failed: %r", peer, exc)
            core.exclude(peer, trio.current_time())
            self.kick()
            return
        self.absorb(ack["adverts"], peer)
        now = trio.current_time()
        if ack["state"] == "busy":
            core.on_busy(peer, now)
        elif ack["state"] == "ok":
            core.on_vote(peer, ack["digest"], ack["seq"], now)
        self.kick()

    def _hello_wait(self) -> float:
        return min(self.settings.hello_timeout, self.settings.silence)

    async def _watch_expected(self) -> None:
        """An expected partner whose connection closes (killed, gone) is forgotten at once."""
        ids = self.core.expected_ids
        wait_until = getattr(self.node, "wait_until", None)
        if not ids or wait_until is None:
            return

        def gone() -> list[str]:
            connected = set(self.node.connected_peers())
            return [p for p in ids if p not in connected and p not in self.core.excluded]

        while True:
            with contextlib.suppress(P2PComputeError):  # PeerTimeout: wait again
                await wait_until(lambda: bool(gone()), timeout=3600.0)
            lost = gone()
            for peer in lost:
                log.info("collective: expected partner %s disconnected: not waiting for it", peer)
                self.core.forget(peer, trio.current_time())
            if lost:
                self.kick()

    async def _ready(self, peer: str, digest: str) -> None:
        try:
            await self._ready_one(peer, digest)
        finally:
            self._readies -= 1
            if not self._readies:
                self._readies_done.set()

    async def _ready_one(self, peer: str, digest: str) -> None:
        core = self.core
        msg = READY.build(run=core.run, round=core.round_key, digest=digest)
        try:
            ack = await self.links.request(peer, msg, READY_ACK, self.settings.hello_timeout)
        except P2PComputeError as exc:
            log.info("collective: ready to %s failed: %r", peer, exc)
            return  # our lock times out and drops it
        if not ack["ok"]:
            core.on_ready_refused(peer, trio.current_time())
        elif ack["committed"]:
            core.on_ready_confirmed(peer, digest, trio.current_time())
        self.kick()


class Matchmaker:
    """Our side of matchmaking on one node: adverts heard, matches running, rounds matched.

    Example::

        mm = Matchmaker(node, links, stats, bandwidth=1.0, settings=MatchSettings())
        group = await mm.form_group("run", "step-3", layout=tensors_layout(params))
        reply = mm.answer_hello(peer, hello)      # the inbound handler's answer, built
    """

    def __init__(
        self,
        node: Any,
        links: ControlLinks,
        stats: collections.Counter[str],
        *,
        bandwidth: float,
        settings: MatchSettings,
        background: Callable[[], trio.Nursery | None] = lambda: None,
    ) -> None:
        self.node = node
        self.links = links
        self.stats = stats
        self.peer_id: str = node.peer_id
        self.bandwidth = bandwidth
        self.settings = settings
        self._background = background
        self._runs: set[str] = set()
        self._matches: dict[tuple[str, str], MatchDriver] = {}
        self._finished: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._adverts: collections.OrderedDict[tuple[str, str, str], tuple[Candidate, bytes]] = (
            collections.OrderedDict()
        )
        #: (run, peer) -> (state, trio time) of the last presence note: "join" or "leave"
        self.presence: collections.OrderedDict[tuple[str, str], tuple[str, float]] = collections.OrderedDict()
        #: per run: called with (round key, peer) for every valid advert heard (see watch())
        self._watchers: dict[str, list[Callable[[str, str], None]]] = {}

    def watch(self, run: str, listener: Callable[[str, str], None]) -> Callable[[], None]:
        """Call ``listener(round_key, peer)`` for every valid advert of ``run`` another peer makes.

        Subscribes the run's topic now (not at our first round), so a peer learns that others
        started a round while it is still computing; adverts carried in hellos count too. The
        listener runs on the trio thread and must not block. Returns a function that stops it.

        Example::

            stop = mm.watch("run", lambda key, peer: print("round", key, "called by", peer))
        """
        self._subscribe(run)
        self._watchers.setdefault(run, []).append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._watchers.get(run, []).remove(listener)

        return stop

    def _subscribe(self, run: str) -> None:
        if run not in self._runs:
            self.node.subscribe(f"collective/{run}", self.on_join)
            self._runs.add(run)

    # -- inbound
    def answer_hello(self, peer: str, msg: dict[str, Any]) -> bytes:
        """Take a validated hello (a vote, or a pull when its digest is empty); our answer.

        Example::

            await stream.send_frame(mm.answer_hello(peer, HELLO.validate(raw, peer=peer)))
        """
        self.absorb_many(msg["adverts"], peer)
        match = self._matches.get((msg["run"], msg["round"]))
        if match is None:
            state = "busy" if (msg["run"], msg["round"]) in self._finished else "idle"
            return HELLO_ACK.build(state=state, digest="", seq=0, adverts=[])
        core = match.core
        if msg["digest"]:  # an empty digest is a pull, not a vote
            core.on_vote(peer, msg["digest"], msg["seq"], trio.current_time())
        reply = HELLO_ACK.build(
            state=core.answer_state(), digest=core.digest, seq=core.seq,
            adverts=core.adverts(trio.current_time()),
        )
        match.kick()
        return reply

    def answer_ready(self, peer: str, msg: dict[str, Any]) -> bytes:
        """Take a validated ready; our answer (refused, accepted, or accepted and committed).

        Example::

            await stream.send_frame(mm.answer_ready(peer, READY.validate(raw, peer=peer)))
        """
        match = self._matches.get((msg["run"], msg["round"]))
        if match is not None:
            ok = match.core.on_ready(peer, msg["digest"], trio.current_time())
            committed = ok and match.core.committed(msg["digest"])
            match.kick()
        else:
            ok = committed = self._finished.get((msg["run"], msg["round"])) == msg["digest"]
        return READY_ACK.build(ok=ok, committed=committed)

    def answer_presence(self, peer: str, msg: dict[str, Any]) -> bytes:
        """Take a validated presence note of ``peer``: it joined ``run`` or is leaving it.

        A leaving peer is dropped from every match of that run in progress (no one waits for
        it); either note is remembered for the caller's partner list (:meth:`noted`).

        Example::

            await stream.send_frame(mm.answer_presence(peer, PRESENCE.validate(raw, peer=peer)))
        """
        state, run = msg["state"], msg["run"]
        if state not in PRESENCE_STATES:
            self.stats["bad_messages"] += 1
            raise MalformedMessage(f"unknown presence state {state!r}", peer=peer)
        now = trio.current_time()
        key = (run, peer)
        self.presence[key] = (state, now)
        self.presence.move_to_end(key)
        while len(self.presence) > _MAX_REMEMBERED:
            self.presence.popitem(last=False)
        if state == "leave":
            log.info("collective: %s left run %s", peer, run)
            self.forget(peer, run=run)
        return PRESENCE_ACK.build(ok=True)

    def noted(self, run: str, state: str) -> dict[str, float]:
        """Peers whose last presence note for ``run`` was ``state`` ("join" or "leave"), with
        the (trio) time it came.

        Example::

            gone = set(mm.noted("run/abc", "leave"))
        """
        return {p: t for (r, p), (st, t) in self.presence.items() if r == run and st == state}

    def forget(self, peer: str, *, run: str | None = None) -> None:
        """``peer`` is gone (left, or its connection closed): no match in progress waits for it.

        Example::

            mm.forget(dead_peer)
        """
        now = trio.current_time()
        for (r, _), match in list(self._matches.items()):
            if run is None or r == run:
                match.core.forget(peer, now)
                match.kick()

    async def announce(self, run: str, peers: Sequence[str], state: str, *, timeout: float = 1.0) -> int:
        """Tell ``peers`` that we joined ``run`` or are leaving it; how many took the note.

        Bounded by ``timeout`` in all (a dead peer costs nothing more); never raises for a
        peer that does not answer.

        Example::

            await mm.announce("run/abc", partners, "leave")   # before closing
        """
        if state not in PRESENCE_STATES:
            raise ConfigError(f"presence state must be one of {PRESENCE_STATES}, not {state!r}")
        msg = PRESENCE.build(run=run, state=state)
        took = 0

        async def one(peer: str) -> None:
            nonlocal took
            try:
                ack = await self.links.request(peer, msg, PRESENCE_ACK, timeout)
            except P2PComputeError as exc:
                log.debug("collective: presence note to %s not delivered: %r", peer, exc)
                return
            took += bool(ack["ok"])

        with give_up_after(timeout):
            async with trio.open_nursery() as nursery:
                for peer in dict.fromkeys(peers):
                    if peer != self.peer_id:
                        nursery.start_soon(one, peer)
        return took

    async def on_join(self, sender: str, data: bytes) -> None:
        """A join advert gossiped on a run's topic.

        Example::

            node.subscribe("collective/run", mm.on_join)
        """
        self.absorb(data, via=sender)

    def absorb_many(self, adverts: list[bytes], via: str) -> None:
        """Take adverts carried in a hello or an answer from ``via``.

        Example::

            mm.absorb_many(ack["adverts"], peer)
        """
        for raw in adverts:
            self.absorb(raw, via=via)

    def absorb(self, raw: bytes, *, via: str) -> None:
        """Verify one signed advert and remember it (or feed it to the running match).

        Example::

            mm.absorb(raw_advert, via=sender)    # a bad one is counted, never raised
        """
        try:
            body = open_join(raw, via=via)
        except ProtocolError as exc:
            self.stats["rejected_adverts"] += 1
            log.info("collective: advert via %s rejected: %s", via, exc)
            return
        peer = body["peer"]
        if peer == self.peer_id:
            return
        now = trio.current_time()
        left = min(body["expires"] - time.time(), _MAX_ADVERT_TTL)
        if left <= 0:
            self.stats["stale_adverts"] += 1
            return
        cand = Candidate(peer, body["weight"], body["bandwidth"], now + left, bytes(raw))
        key = (body["run"], body["round"], peer)
        self._adverts[key] = (cand, body["layout"])
        self._adverts.move_to_end(key)
        while len(self._adverts) > _MAX_BUFFERED_ADVERTS:
            self._adverts.popitem(last=False)
        match = self._matches.get((body["run"], body["round"]))
        if match is not None and body["layout"] == match.layout and match.core.add_candidate(cand, now):
            match.kick()
        for listener in list(self._watchers.get(body["run"], ())):
            try:
                listener(body["round"], peer)
            except Exception:  # a listener's bug must not stop matchmaking
                log.exception("collective: advert listener failed")

    # -- forming a group
    async def form_group(
        self,
        run: str,
        round_key: str,
        *,
        layout: bytes,
        weight: float = 1.0,
        target: int = 4,
        min_size: int = 2,
        timeout: float = 30.0,
        patience: float | None = None,
        expected: int | Collection[str] | None = None,
    ) -> Formed | NoGroup:
        """See :meth:`p2pcompute.collective.Collective.form_group`.

        Example::

            group = await mm.form_group("run", "step-3", layout=tensors_layout(params))
        """
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError("weight must be finite and >= 0")
        if expected is not None and not isinstance(expected, int):
            expected = set(expected) - set(self.noted(run, "leave"))  # a partner that left is not coming
        if len(layout) != 32:
            raise ConfigError("layout must be a 32-byte digest (see tensors_layout)")
        key = (run, round_key)
        if key in self._matches:
            raise ConfigError(f"already matching for {run!r} round {round_key!r}")
        topic = f"collective/{run}"
        self._subscribe(run)
        now = trio.current_time()
        body = JOIN.build(
            run=run,
            round=round_key,
            peer=self.peer_id,
            weight=float(weight),
            bandwidth=self.bandwidth,
            layout=layout,
            expires=time.time() + timeout + 5.0,
            addrs=list(self.node.addrs[:8]),
        )
        advert = seal_signed(JOIN_KIND, body, self.node.identity)
        me = Candidate(self.peer_id, float(weight), self.bandwidth, now + timeout + 5.0, advert)
        core = MatchCore(
            me,
            run=run,
            round_key=round_key,
            target=target,
            min_size=min_size,
            now=now,
            deadline=now + timeout,
            settle=self.settings.settle,
            patience=patience,
            expected=expected,
            hello_timeout=min(self.settings.hello_timeout, self.settings.silence),
        )
        for (r, k, _), (cand, lay) in list(self._adverts.items()):
            if r == run and k == round_key and lay == layout:
                core.add_candidate(cand, now)
        match = MatchDriver(
            core, layout, advert, topic, node=self.node, links=self.links, absorb=self.absorb_many,
            settings=self.settings, background=self._background,
        )
        self._matches[key] = match
        try:
            result = await match.run()
        finally:
            del self._matches[key]
            self._finished[key] = core.digest if core.result is not None else ""
            while len(self._finished) > _MAX_REMEMBERED:
                self._finished.popitem(last=False)
        self.stats["groups_formed" if isinstance(result, Formed) else "no_group"] += 1
        return result


__all__ = ["MatchDriver", "MatchSettings", "Matchmaker"]
