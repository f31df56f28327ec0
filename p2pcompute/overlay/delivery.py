"""Mesh peers that never forward: a sans-IO delivery watch (GossipSub's P3, which py-libp2p 0.8.1 lacks).

GossipSub v1.1 scores a mesh peer by its *mesh message deliveries* (P3): a peer we keep
in our mesh owes us the messages of the topic, and one that delivers too few is pruned
and scored down. py-libp2p 0.8.1 keeps the counter but never feeds it nor penalises a
deficit, so a sybil that sits in our mesh and drops everything costs us nothing and keeps
its place (docs/design/threat-model.md, "Advert reach under attack").

:class:`DeliveryWatch` is the bookkeeping, with no I/O and no clock: the overlay tells it
which valid messages arrived (first or again) and who sits in the mesh at that moment;
it answers which mesh peers missed ``misses`` messages in a row, messages we had from
someone else and they never forwarded. Such a peer is a *dropper*: the overlay prunes it
from the mesh (with GossipSub's back-off) and lowers its application score by
``penalty`` per verdict. An honest mesh peer misses a message only when we were faster
and sent it the message first; ``misses`` (8 by default) in a row makes that rare, and a
wrongly pruned honest peer loses only its mesh place for one back-off period.

With ``late`` set, only messages that reached us *late* count: at least ``late`` seconds
after their writer sent them (the caller gives each message's ``age``), and only against
mesh peers that sat in our mesh since before the message was written (``tenure``). An
honest mesh peer that heard the message in time forwarded it to us before we could send it
to them, so we would not have had it late; one that joined our mesh after the message was
out owes us nothing. Messages that arrive in time say nothing (we may have been first), so
peers that only lose the race are never counted. At 16 honest nodes and 64 sybils the rule
without ``late`` took 132 mesh places, mostly honest (docs/design/threat-model.md).

Imports nothing of ours.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping


class DeliveryWatch:
    """Counts, per topic and mesh peer, valid messages the peer should have forwarded and did not.

    ``accepted(topic, forwarder, origin, mesh)``: a valid message reached us first from
    ``forwarder``; when that is not its ``origin`` (we were not one of the first to hold
    it), every other peer of ``mesh`` (the mesh at that moment) but the origin missed one.
    ``delivered(topic, forwarder, origin)``: ``forwarder`` sent us a valid message (first or
    a duplicate) that it did not write itself; its misses reset.
    ``droppers()`` returns (and forgets) the peers that reached ``misses``.

    Example::

        >>> watch = DeliveryWatch(misses=2)
        >>> for _ in range(2):
        ...     watch.accepted("ads", forwarder="honest", origin="writer", mesh={"honest", "sybil"})
        ...     watch.delivered("ads", forwarder="honest", origin="writer")
        >>> watch.droppers()
        [('ads', 'sybil')]
        >>> watch.verdicts("sybil")
        1
    """

    def __init__(self, *, misses: int = 8, late: float | None = None) -> None:
        if misses < 1:
            raise ValueError("misses must be at least 1")
        if late is not None and not late >= 0:
            raise ValueError("late must be >= 0 seconds (or None)")
        self.misses = misses
        self.late = late
        self._missed: dict[str, dict[str, int]] = defaultdict(dict)  # topic -> peer -> misses in a row
        self._verdicts: dict[str, int] = defaultdict(int)  # peer -> times found dropping
        self._standing: dict[str, float] = {}  # peer -> recent verdicts, decaying (see penalty)

    def accepted(
        self,
        topic: str,
        forwarder: str,
        origin: str,
        mesh: Iterable[str],
        *,
        age: float | None = None,
        tenure: Mapping[str, float] | None = None,
    ) -> None:
        """A valid message on ``topic`` written by ``origin`` reached us first from ``forwarder``.

        ``age``: seconds since its writer sent it; ``tenure``: seconds each mesh peer has been
        in our mesh (both used only with ``late``; a peer missing from ``tenure`` counts as new).

        Example::

            watch.accepted("ads", forwarder="p1", origin="p9", mesh={"p1", "p2"})
            watch.accepted("ads", "p1", "p9", {"p1", "p2"}, age=3.0, tenure={"p2": 60.0})
        """
        missed = self._missed[topic]
        if forwarder == origin:
            # straight from its writer: we were among the first to hold it, so our mesh
            # peers probably had it from us and owe us nothing
            self.delivered(topic, forwarder, origin)
            return
        if self.late is not None:
            if age is None or age < self.late:
                self.delivered(topic, forwarder, origin)  # in time: we may have been first
                return
            held = tenure or {}
            mesh = [p for p in mesh if held.get(p, 0.0) >= age]  # in our mesh since it was written
        for peer in mesh:
            if peer != forwarder and peer != origin:
                missed[peer] = missed.get(peer, 0) + 1
        self.delivered(topic, forwarder, origin)

    def delivered(self, topic: str, forwarder: str, origin: str) -> None:
        """``forwarder`` sent us a valid message on ``topic`` written by ``origin``.

        A peer's own messages do not count: forwarding is what a dropper withholds.
        Example::

            watch.delivered("ads", forwarder="p2", origin="p9")
        """
        if forwarder != origin:
            self._missed[topic].pop(forwarder, None)

    def left(self, topic: str, peer: str) -> None:
        """``peer`` left our mesh of ``topic`` (pruned, gone): it owes nothing any more.

        Example::

            watch.left("ads", "p2")
        """
        self._missed[topic].pop(peer, None)

    def pending(self, topic: str, peer: str) -> int:
        """Messages in a row ``peer`` has missed on ``topic`` so far. Example::

        watch.pending("ads", "p2")     # 0
        """
        return self._missed[topic].get(peer, 0)

    def droppers(self, meshes: Mapping[str, Collection[str]] | None = None) -> list[tuple[str, str]]:
        """(topic, peer) pairs that missed ``misses`` messages in a row, each counted as a verdict.

        With ``meshes`` (topic -> current mesh) peers no longer in the mesh are forgotten
        and never returned. A returned peer starts again from zero.
        Example::

            for topic, peer in watch.droppers(gossipsub.mesh): prune(topic, peer)
        """
        out: list[tuple[str, str]] = []
        for topic, missed in self._missed.items():
            current = None if meshes is None else meshes.get(topic, ())
            for peer in list(missed):
                if current is not None and peer not in current:
                    del missed[peer]  # left the mesh: owes nothing any more
                    continue
                if missed[peer] < self.misses:
                    continue
                del missed[peer]
                self._verdicts[peer] += 1
                self._standing[peer] = self._standing.get(peer, 0.0) + 1.0
                out.append((topic, peer))
        return sorted(out)

    def verdicts(self, peer: str) -> int:
        """How many times ``peer`` was found dropping (feeds its application score).

        Example::

            score = -10.0 * watch.verdicts(peer)
        """
        return self._verdicts.get(peer, 0)

    def penalty(self, peer: str) -> float:
        """How much of one verdict still counts against ``peer``: between 0 and 1.

        Capped at one verdict's worth and decaying (:meth:`decay`), because an honest mesh
        peer that always hears a message from us first forwards us nothing and looks like a
        dropper: it may lose its mesh place for a while, never its standing with the swarm.
        Example::

            score = -10.0 * watch.penalty(peer)
        """
        return min(1.0, self._standing.get(peer, 0.0))

    def decay(self, factor: float) -> None:
        """Multiply every recent verdict by ``factor`` (once per heartbeat). Example::

        watch.decay(0.99)     # half-life about 70 heartbeats
        """
        for peer in list(self._standing):
            self._standing[peer] *= factor
            if self._standing[peer] < 0.01:
                del self._standing[peer]

    def forget(self, peer: str) -> None:
        """Drop what is known about ``peer``'s misses (it disconnected); verdicts are kept.

        Example::

            watch.forget("p2")
        """
        for missed in self._missed.values():
            missed.pop(peer, None)

    def statistics(self) -> dict[str, int]:
        """Peers being watched and verdicts so far. Example::

        watch.statistics()    # {'watched': 3, 'verdicts': 1, 'droppers': 1}
        """
        return {
            "watched": sum(len(m) for m in self._missed.values()),
            "verdicts": sum(self._verdicts.values()),
            "droppers": len(self._verdicts),
        }


__all__ = ["DeliveryWatch"]
