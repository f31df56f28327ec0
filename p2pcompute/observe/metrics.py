"""Prometheus text for one node, from :meth:`Observer.figures` at scrape time.

Each node gets its own :class:`prometheus_client.CollectorRegistry` (never the global one, so
two nodes in one process do not mix) holding :class:`NodeCollector`, which turns the figures
into metric families when scraped, and the client's process collector (``process_*``:
resident memory, CPU seconds, open files). Every metric is listed in docs/operations.md.

Imports :mod:`prometheus_client` and :mod:`p2pcompute.observe.view`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pcompute.observe.view import Observer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P = "p2pcompute_"

#: Provider outcomes of leases that did not complete, as the ``reason`` of tasks_failed_total.
_PROVIDER_FAILURES = ("failed", "cancelled", "expired", "input_timeouts")
_REASONS = ("oversized", "version", "malformed", "forged", "stale", "other")
_LANE_REFUSALS = ("refused_busy", "refused_too_large", "evicted_unclaimed", "expired_unclaimed")


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(P + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, value=value)


def _labelled_counter(name: str, doc: str, label: str, values: dict[str, Any]) -> CounterMetricFamily:
    fam = CounterMetricFamily(P + name, doc, labels=[label])
    for key in sorted(values):
        fam.add_metric([key], float(values[key]))
    return fam


class NodeCollector(Collector):
    """A custom collector: reads ``observer.figures()`` on each scrape and yields metric families.

    Example::

        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(observer))
    """

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        f = self.observer.figures()
        node = f["node"]
        info = GaugeMetricFamily(
            P + "node_info",
            "This node: peer id, role, swarm, version (value 1)",
            labels=["peer_id", "role", "swarm", "version"],
        )
        info.add_metric([node["peer_id"], node["role"], node["swarm"], node["version"]], 1.0)
        yield info
        yield _gauge("uptime_seconds", "Seconds since the node started", node["uptime_seconds"])
        yield _counter(
            "identity_conflicts",
            "Adverts signed with this node's key that another process issued (a shared key file)",
            node["identity_conflicts"],
        )
        peers = f["peers"]
        yield _gauge("peers_known", "Live peers in the peer table", peers["known"])
        yield _gauge(
            "peers_verified", "Live peers whose identity a connection has checked", peers["verified"]
        )
        yield _gauge("peers_connected", "Peers with an open connection", peers["connected"])
        ad = f["adverts"]
        yield _counter("adverts_published", "Capacity adverts this node published", ad["published"])
        yield _counter("adverts_accepted", "Adverts accepted into the peer table", ad["accepted"])
        reasons = dict.fromkeys(_REASONS, 0)
        yield _labelled_counter(
            "messages_rejected",
            "Adverts and other protocol messages rejected, by reason",
            "reason",
            {**reasons, **ad["rejected_by_kind"]},
        )
        yield _labelled_counter(
            "offences",
            "Rejections counted against a named peer, by kind",
            "kind",
            {**reasons, **f["offences"]["by_kind"]},
        )
        yield _counter(
            "adverts_expired", "Peers that left the table when their advert ran out", ad["expired"]
        )
        yield _counter("adverts_dropped", "Adverts dropped because the table was full", ad["dropped"])
        off = f["offences"]
        yield _gauge(
            "offending_peers",
            "Peers with at least one rejection counted against them",
            off["offending_peers"],
        )
        yield _counter("peers_blacklisted", "Peers blacklisted for too many offences", off["blacklisted"])
        net = f["network"]
        yield _counter("dials", "Outgoing dials", net["dials"])
        yield _counter("dial_failures", "Outgoing dials that failed", net["dial_failures"])
        yield _counter("peer_exchanges_served", "Peer-exchange requests answered", net["px_served"])
        yield _counter("peer_exchanges_requested", "Peer-exchange requests sent", net["px_requested"])
        yield _counter("handler_errors", "Stream handlers that ended in an error", net["handler_errors"])
        yield _counter("messages_dropped", "Gossip messages dropped (queue full)", net["dropped_messages"])
        yield _labelled_counter(
            "refusals",
            "Streams, connections and buffers refused by a local cap",
            "what",
            {
                "stream": net["streams_refused"],
                "connection": net["connections_refused"],
                "buffer": net["buffer_overflows"],
            },
        )
        streams = CounterMetricFamily(
            P + "stream_bytes",
            "Bytes on framed libp2p streams, by protocol and direction",
            labels=["protocol", "direction"],
        )
        for proto, moved in sorted(f["bytes_by_protocol"].items()):
            streams.add_metric([proto, "in"], float(moved["received"]))
            streams.add_metric([proto, "out"], float(moved["sent"]))
        yield streams
        yield from self._lane(f["lane"])
        yield from self._tasks(f["tasks"])
        yield from self._rounds(f["rounds"])
        yield from self._ledger(f["ledger"])
        yield _gauge(
            "event_loop_lag_seconds",
            "Seconds the event loop took to come back to a yielding task (measured at the last scrape)",
            f["process"]["event_loop_lag_seconds"],
        )
        yield _gauge("resident_memory_bytes", "Resident set size of this process", f["process"]["rss_bytes"])
        yield _labelled_counter(
            "log_messages",
            "Warnings and errors logged, by level",
            "level",
            {"warning": 0, "error": 0, **f["errors"]},
        )

    def _lane(self, lane: dict[str, Any] | None) -> Iterator[Metric]:
        if lane is None:
            return
        fam = CounterMetricFamily(
            P + "lane_bytes", "Tensor payload bytes on the lane, by direction", labels=["direction"]
        )
        fam.add_metric(["out"], float(lane["bytes_sent"]))
        fam.add_metric(["in"], float(lane["bytes_received"]))
        yield fam
        fam = CounterMetricFamily(
            P + "lane_transfers", "Tensor transfers on the lane, by direction", labels=["direction"]
        )
        fam.add_metric(["out"], float(lane["sent"]))
        fam.add_metric(["in"], float(lane["received"]))
        yield fam
        rate = GaugeMetricFamily(
            P + "lane_throughput_bytes_per_second",
            "Lane bytes per second between the last two scrapes a second or more apart",
            labels=["direction"],
        )
        rate.add_metric(["out"], float(lane["sent_bytes_per_second"]))
        rate.add_metric(["in"], float(lane["received_bytes_per_second"]))
        yield rate
        yield _gauge("lane_sessions", "Open lane sessions", lane["sessions"])
        yield _gauge("lane_parked", "Arrived transfers waiting to be received", lane["parked"])
        yield _labelled_counter(
            "lane_refusals",
            "Inbound lane transfers refused, by reason",
            "reason",
            {k: lane.get(k, 0) for k in _LANE_REFUSALS},
        )
        yield _counter(
            "lane_rejected_connections",
            "Inbound lane connections dropped before they authenticated",
            lane.get("rejected_connections", 0),
        )

    def _tasks(self, tasks: dict[str, Any]) -> Iterator[Metric]:
        prov = tasks["provider"]
        if prov is not None:
            yield _counter("tasks_offered", "Offers this provider made", prov["offers"])
            yield _counter("tasks_leased", "Leases this provider granted", prov["granted"])
            yield _counter("tasks_completed", "Leases this provider ran to a result", prov["done"])
            yield _labelled_counter(
                "tasks_failed",
                "Leases that did not complete here, by reason",
                "reason",
                {k: prov.get(k, 0) for k in _PROVIDER_FAILURES},
            )
            yield _gauge("tasks_running", "Task runs executing now", prov["running"])
            yield _gauge("task_leases", "Leases held now (granted and not ended)", prov["leases"])
        req = tasks["requester"]
        if req is not None:
            yield _counter(
                "tasks_bought", "Task items this node bought that returned a result", req["bought"]
            )
            yield _counter(
                "tasks_buy_failed", "Task items this node tried to buy that failed", req["buy_failed"]
            )
            yield _gauge("tasks_buying", "Task items this node is buying now", req["items_in_flight"])
            yield _counter("task_receipts", "Dual-signed receipts recorded", req["receipts"])

    def _rounds(self, rounds: dict[str, Any] | None) -> Iterator[Metric]:
        if rounds is None:
            return
        outcomes = {"averaged": 0, "failed": 0, "no_group": 0, "error": 0}
        yield _labelled_counter(
            "rounds", "Averaging rounds ended, by outcome", "outcome", {**outcomes, **rounds["by_outcome"]}
        )
        yield _labelled_counter(
            "round_seconds",
            "Seconds spent in averaging rounds, by outcome",
            "outcome",
            {**outcomes, **rounds["seconds_by_outcome"]},
        )
        yield _labelled_counter(
            "round_participants",
            "Participants summed over rounds, by outcome",
            "outcome",
            {**outcomes, **rounds["participants_by_outcome"]},
        )
        yield _gauge("rounds_in_progress", "Averaging rounds running now", rounds["in_progress"])

    def _ledger(self, ledger: dict[str, Any] | None) -> Iterator[Metric]:
        if ledger is None:
            return
        yield _gauge("ledger_entries", "Receipts in this node's ledger", ledger["entries"])
        yield _counter(
            "ledger_earned", "Sum of the prices of leases sold (from the ledger)", ledger["earned"]
        )
        yield _counter(
            "ledger_spent", "Sum of the prices of leases bought (from the ledger)", ledger["spent"]
        )
        fam = CounterMetricFamily(P + "ledger_leases", "Leases in the ledger, by role", labels=["role"])
        fam.add_metric(["provider"], float(ledger["sold"]))
        fam.add_metric(["requester"], float(ledger["bought"]))
        yield fam
        fam = CounterMetricFamily(
            P + "ledger_lease_seconds", "Run seconds of the leases in the ledger, by role", labels=["role"]
        )
        fam.add_metric(["provider"], float(ledger["sold_seconds"]))
        fam.add_metric(["requester"], float(ledger["bought_seconds"]))
        yield fam


def node_registry(observer: Observer) -> CollectorRegistry:
    """A private registry with this node's collector and the process collector.

    Example::

        text = generate_latest(node_registry(observer)).decode()
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(observer))
    ProcessCollector(registry=registry)
    return registry


def metrics_text(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry`` (UTF-8 bytes).

    Example::

        body = metrics_text(node_registry(observer))
    """
    return bytes(generate_latest(registry))


__all__ = ["CONTENT_TYPE", "NodeCollector", "metrics_text", "node_registry"]
