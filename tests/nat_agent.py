"""A peer process for tests/test_nat_topology.py, run inside a network namespace.

``python tests/nat_agent.py --name a --bootstrap ADDR [--relay]`` starts a :class:`Swarm` (all
interfaces) and then obeys one JSON command per stdin line, answering one JSON line on stdout:

* ``{"cmd": "status"}``: reachability, advertised addresses, peers and links;
* ``{"cmd": "wait", "n": N}``: wait until N other peers are known;
* ``{"cmd": "sell", "kind": K}``: serve task kind ``K`` (doubles a tensor) until told to quit;
* ``{"cmd": "buy", "kind": K}``: buy one run of ``K``; answers the provider and the result;
* ``{"cmd": "train", "steps": S, "min_group": G}``: DiLoCo for S steps (5 inner steps a round),
  once the others of the run are known (at most ``settle`` seconds, 60);
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
        logging.basicConfig(level=os.environ["NAT_AGENT_LOG"], stream=sys.stderr)
    swarm = Swarm(
        bootstrap=[args.bootstrap],
        patience=4.0,
        matchmaking_timeout=60.0,
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
            if what == "status":
                node = swarm.node
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
                wanted, give_up = cmd["min_group"] - 1, time.monotonic() + cmd.get("settle", 60.0)
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


def _routes(swarm: Swarm) -> dict[str, int]:
    return dict(swarm.lane.statistics().routes)


if __name__ == "__main__":
    main()
