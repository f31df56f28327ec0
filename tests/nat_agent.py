"""A peer process for tests/test_nat_topology.py, run inside a network namespace.

``python tests/nat_agent.py --name a --bootstrap ADDR [--relay]`` starts a :class:`Swarm` (all
interfaces) and then obeys one JSON command per stdin line, answering one JSON line on stdout:

* ``{"cmd": "status"}``: reachability, advertised addresses, peers and links;
* ``{"cmd": "wait", "n": N}``: wait until N other peers are known;
* ``{"cmd": "settle"}``: wait until reachability is settled (public, or private and advertising
  only relayed addresses) and every advert we hold is usable (no LAN or loopback address), then
  answer as ``status`` does;
* ``{"cmd": "sell", "kind": K}``: serve task kind ``K`` (doubles a tensor) until told to quit;
* ``{"cmd": "buy", "kind": K}``: buy one run of ``K``; answers the provider and the result;
* ``{"cmd": "train", "steps": S, "min_group": G}``: DiLoCo for S steps (5 inner steps a round),
  once the others of the run are known (at most ``settle`` seconds, 10);
* ``{"cmd": "serve"}``: serve a training state (the trained one, else a fresh one at outer step
  0); answers its digest and outer step;
* ``{"cmd": "punch", "peer": P}``: connect to P (through the relay when P is private), then try
  a hole punch to it; answers whether it worked and the link it left (``punched``/``circuit``);
* ``{"cmd": "join"}``: download the training state from the others;
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

import torch
import trio

from p2pcompute.collective import Timeouts
from p2pcompute.tasks.registry import TaskRegistry
from p2pcompute.training.swarm import Swarm


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def say(**obj: Any) -> None:
    print(json.dumps(obj, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--relay", action="store_true")
    ap.add_argument("--min-group", type=int, default=4)
    args = ap.parse_args()
    if os.environ.get("NAT_AGENT_LOG"):  # for debugging a topology by hand
        # NAT_AGENT_LOG=INFO: our loggers at that level, py-libp2p's at WARNING; into
        # $NAT_AGENT_LOGDIR/<name>.log when that is set (stderr keeps only the last lines)
        logdir = os.environ.get("NAT_AGENT_LOGDIR")
        out = open(os.path.join(logdir, f"{args.name}.log"), "a") if logdir else sys.stderr  # noqa: SIM115
        logging.basicConfig(level="WARNING", stream=out, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("p2pcompute").setLevel(os.environ["NAT_AGENT_LOG"])
        for name in os.environ.get("NAT_AGENT_LIBP2P_LOGGERS", "").split(","):  # e.g. ...circuit_v2.dcutr
            if name:
                logger = logging.getLogger(name)
                logger.disabled, logger.propagate = False, False
                logger.handlers = [logging.StreamHandler(out)]
                logger.setLevel("DEBUG")
    swarm = Swarm(
        bootstrap=[args.bootstrap],
        patience=4.0,
        matchmaking_timeout=30.0,  # a failed round costs this long (docs/design/nat.md, Status)
        min_group=args.min_group,
        advert_interval=1.0,
        relay=args.relay,
        reach_interval=30.0,
        # generous: CI machines running this are shared and slow, and control goes through a relay
        collective_options={
            "timeouts": Timeouts(sender_timeout=20.0, reducer_timeout=30.0, status_timeout=40.0),
            "hello_timeout": 30.0,
        },
    )
    swarm.start()
    say(event="up", name=args.name, peer_id=swarm.peer_id)
    stop = threading.Event()
    selling = threading.Event()
    service: dict[str, Any] = {}
    opt: Any = None
    model: Any = None
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            what = cmd["cmd"]
            if what == "quit":
                break
            if what in ("status", "settle"):
                node = swarm.node
                if what == "settle":
                    wait = node.wait_until(
                        lambda: _settled(swarm) and _clean(swarm), timeout=cmd.get("timeout", 60.0)
                    )
                    swarm.call(lambda wait=wait: wait)
                peers = {r.peer_id: list(r.addrs) for r in node.peers.alive()}
                links = {p: node.link(p) for p in node.connected_peers()}
                say(event="status", reach=node.reach_status(), addrs=node.addrs, peers=peers, links=links)
            elif what == "wait":
                swarm.wait_for_peers(cmd["n"], timeout=cmd.get("timeout", 40))
                say(event="waited", peers=swarm.peers())
            elif what == "sell":
                registry = TaskRegistry()

                @registry.task(cmd["kind"], price=0.01)
                def double(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, Any]:
                    return {"y": tensors["x"] * 2}

                async def serve(registry: TaskRegistry = registry) -> None:
                    from p2pcompute.tasks.driver import serve_tasks

                    async with serve_tasks(swarm.node, registry, lane=swarm.lane) as svc:
                        service["svc"] = svc
                        selling.set()
                        while not stop.is_set():
                            await trio.sleep(0.2)

                threading.Thread(target=lambda: swarm.call(serve), daemon=True).start()
                selling.wait(30)
                say(event="selling", kind=cmd["kind"])
            elif what == "buy":

                async def buy(cmd: dict[str, Any] = cmd) -> Any:
                    from p2pcompute.tasks.driver import open_tasks

                    inputs = {"x": torch.arange(4.0)}
                    if "svc" in service:  # one task service per node: the one that sells also buys
                        return await service["svc"].run_task(cmd["kind"], inputs, {}, deadline=60)
                    async with open_tasks(swarm.node, lane=swarm.lane) as tasks:
                        await tasks.wait_for_providers(1, timeout=30)
                        return await tasks.run_task(cmd["kind"], inputs, {}, deadline=60)

                r = swarm.call(buy, timeout=90)
                say(event="bought", provider=r.provider, y=r.outputs["y"].tolist(), routes=_routes(swarm))
            elif what == "train":
                model, inner = tiny()
                opt = swarm.diloco(model, inner, inner_steps=5, join=False, min_participants=cmd["min_group"])
                # round 1 starts once the adverts of every other trainer of this run have arrived
                # (at most 10 s: the swarm counts a partner once it fetched its state manifest within
                # 2 s, and a first fetch through a relay can take longer; then the count stays short for
                # PARTNER_TTL and a 60 s wait here started the public peer's round a minute early)
                wanted, give_up = cmd["min_group"] - 1, time.monotonic() + cmd.get("settle", 10.0)
                while swarm.call(swarm.averager.partners) < wanted and time.monotonic() < give_up:
                    time.sleep(0.5)
                for s in range(cmd["steps"]):
                    lo = (s * 4 + hash(swarm.peer_id) % 4) * 8 % 480
                    torch.nn.functional.mse_loss(model(x[lo : lo + 8]), y[lo : lo + 8]).backward()
                    opt.step()
                    opt.zero_grad()
                say(
                    event="trained",
                    participants=[r.participants for r in opt.history],
                    digest=opt.state_digest(),
                    outer_step=opt.outer_step,
                    routes=_routes(swarm),
                )
            elif what == "conns":  # debugging: each libp2p connection's streams and free yamux slots
                net = swarm.node._stack.host.get_network()
                rows = []
                for pid, conns in list(net.connections.items()):
                    for c in conns if isinstance(conns, list) else [conns]:
                        m = c.muxed_conn
                        sem = getattr(m, "stream_backlog_semaphore", None)
                        rows.append(
                            [
                                str(pid)[-6:],
                                len(getattr(m, "streams", {})),
                                getattr(sem, "value", -1),
                                [str(a) for a in c.get_transport_addresses()][:1],
                            ]
                        )
                say(event="conns", rows=rows)
            elif what == "punch":

                async def punch(peer: str = cmd["peer"]) -> bool:
                    node = swarm.node
                    await node.exchange_peers(peer, timeout=20)  # a stream: dials through the relay
                    if node.link(peer) == "punched":  # the dial's own punch already made it
                        return True
                    return await node._stack.relay.punch(peer)

                ok = swarm.call(punch, timeout=60)
                stats = swarm.node._stack.relay.stats
                say(event="punched", ok=ok, link=swarm.node.link(cmd["peer"]), stats=stats)
            elif what == "serve":
                if opt is None:
                    model, inner = tiny()
                    opt = swarm.diloco(model, inner, inner_steps=5, join=False)
                say(event="serving", digest=opt.state_digest(), outer_step=opt.outer_step)
            elif what == "join":
                model, inner = tiny()
                torch.nn.init.zeros_(model.weight)
                opt = swarm.diloco(model, inner, inner_steps=5, join=False)
                ok = swarm.call(lambda opt=opt: swarm._download(opt), timeout=60)
                digest, step = opt.state_digest(), opt.outer_step
                say(event="joined", ok=ok, digest=digest, outer_step=step, routes=_routes(swarm))
            else:
                say(event="error", error=f"unknown command {what!r}")
        except Exception as exc:
            say(event="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-1500:])
    stop.set()
    swarm.close()


def _settled(swarm: Swarm) -> bool:
    """Public, or private and advertising only relayed addresses (its reservation is made)."""
    node = swarm.node
    if node.reachability == "private":
        return bool(node.addrs) and all("/p2p-circuit" in a for a in node.addrs)
    return node.reachability == "public"


def _clean(swarm: Swarm) -> bool:
    """Every advert we hold has addresses others can use: none on loopback or a NATed LAN (10/8).
    A peer's first advert, sent before it knew it was private, does hold its LAN address; the
    one it sends once it holds a relay slot replaces it."""
    for rec in swarm.node.peers.alive():
        hosts = [a.split("/p2p/")[0] for a in rec.addrs]
        if not hosts or any(h.startswith(("/ip4/127.", "/ip4/10.")) for h in hosts):
            return False
    return True


def _routes(swarm: Swarm) -> dict[str, int]:
    return dict(swarm.lane.statistics().routes)


if __name__ == "__main__":
    main()
