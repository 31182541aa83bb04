"""Small protocols for the grpc transport's tests and benchmark, named "module:function" so
shard processes can import them (they cannot see a test's `register()` calls).

- `build_sum`: a synchronous server/clients round trip; the server (node 0) multicasts a vector,
  each client adds a seeded delta, the server averages the replies in sender order. Same answer
  on every transport. A "poison" message to the server would change the answer.
- `build_flood`: node 0 sends `count` tiny messages to node 1, which checks their order.
- `build_pingpong`: nodes 0 and 1 bounce a ball until the run's time limit; node 0 emits a
  "round" row every `every` bounces (a long-running run to break).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import options
from kernel.registry import declare


def _params(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    return options("protocol", config["protocol"], {"name": "", **defaults})


@declare("protocols")
def build_sum(config: Mapping[str, Any]) -> Deployment:
    """Server node 0 and `clients` clients; `rounds` rounds over a `dim`-long float32 vector."""
    p = _params(config, {"clients": 4, "dim": 16})
    rounds = int(config["run"]["rounds"])
    n = p["clients"] + 1
    params = {"rounds": rounds, "dim": p["dim"], "seed": int(config["run"]["seed"])}
    return Deployment(node_ids=range(n), make_node=lambda i: SumServer() if i == 0 else SumClient(),
                      params=params)


class SumServer(Protocol):
    def on_start(self, ctx: Context) -> None:
        self.x = np.random.default_rng(ctx.params["seed"]).standard_normal(
            ctx.params["dim"]).astype(np.float32)
        self.round = 0
        self.replies: dict[int, Message] = {}
        self.poison = 0.0
        self._next(ctx)

    def _next(self, ctx: Context) -> None:
        self.round += 1
        self.replies = {}
        ctx.multicast(range(1, ctx.n_nodes), "model", x=self.x, round=self.round)

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind == "poison":
            self.poison += float(msg.amount)
            return
        assert msg.kind == "update" and msg.round == self.round, (msg.kind, msg.body.get("round"))
        self.replies[msg.src] = msg
        if len(self.replies) < ctx.n_nodes - 1:
            return
        total = np.zeros_like(self.x)
        weight = 0.0
        for src in sorted(self.replies):  # canonical order, never arrival order
            m = self.replies[src]
            total += np.float32(m.n) * m.x
            weight += m.n
        self.x = total / np.float32(weight) + np.float32(self.poison)
        ctx.emit("round", self.round, norm=float(np.linalg.norm(self.x)))
        if self.round == ctx.params["rounds"]:
            ctx.finish({"model": {"w": self.x}, "rounds": self.round})
        else:
            self._next(ctx)


class SumClient(Protocol):
    def on_message(self, ctx: Context, msg: Message) -> None:
        delta = ctx.rng.standard_normal(msg.x.shape).astype(np.float32)
        ctx.send(msg.src, "update", x=msg.x + delta, n=ctx.id, round=msg.round)


@declare("protocols")
def build_flood(config: Mapping[str, Any]) -> Deployment:
    """Node 0 sends `count` tiny messages to node 1 (run with 2 shards: they cross)."""
    p = _params(config, {"count": 1000})
    return Deployment(node_ids=range(2), make_node=lambda i: Flooder() if i == 0 else Sink(),
                      params={"count": p["count"]})


class Flooder(Protocol):
    def on_start(self, ctx: Context) -> None:
        for i in range(ctx.params["count"]):
            ctx.send(1, "tiny", i=i)


class Sink(Protocol):
    def on_start(self, ctx: Context) -> None:
        self.seen = 0
        self.in_order = True

    def on_message(self, ctx: Context, msg: Message) -> None:
        self.in_order &= msg.i == self.seen
        self.seen += 1
        if self.seen == ctx.params["count"]:
            ctx.finish({"count": self.seen, "in_order": self.in_order})


@declare("protocols")
def build_pingpong(config: Mapping[str, Any]) -> Deployment:
    """Two nodes bouncing a ball forever (the run ends at its time limit or by failure)."""
    p = _params(config, {"every": 50})
    return Deployment(node_ids=range(2), make_node=lambda i: Ping(),
                      params={"every": p["every"]})


class Ping(Protocol):
    def on_start(self, ctx: Context) -> None:
        self.bounces = 0
        if ctx.id == 0:
            ctx.send(1, "ball", n=0)

    def on_message(self, ctx: Context, msg: Message) -> None:
        self.bounces += 1
        if ctx.id == 0 and self.bounces % ctx.params["every"] == 0:
            ctx.emit("round", self.bounces // ctx.params["every"])
        ctx.send(1 - ctx.id, "ball", n=msg.n + 1)


@declare("protocols")
def build_pushsum_audit(config: Mapping[str, Any]) -> Deployment:
    """`pushsum` (robust) whose nodes, in on_stop, emit a "mass" row with their state: enough
    for a test to add up s over nodes plus what is still in flight on every link."""
    from protocols.gossip import build_pushsum

    dep = build_pushsum(config)
    inner_make = dep.make_node
    return Deployment(node_ids=dep.node_ids, make_node=lambda i: Audited(inner_make(i)),
                      neighbours=dep.neighbours, params=dep.params, describe=dep.describe)


class Audited(Protocol):
    """Forwards to a push-sum node; reports its mass when the run stops."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def on_start(self, ctx: Context) -> None:
        self.inner.on_start(ctx)

    def on_message(self, ctx: Context, msg: Message) -> None:
        self.inner.on_message(ctx, msg)

    def on_timer(self, ctx: Context, key: Any) -> None:
        self.inner.on_timer(ctx, key)

    def on_stop(self, ctx: Context) -> None:
        p = self.inner
        ctx.emit("mass", ctx.id, s=p.s, w=p.w, sig_s=p.sig_s, sig_w=p.sig_w, out=list(p.out),
                 # rho[src] ends with the totals (s, w) last taken from src
                 rho={src: [r[-2], r[-1]] for src, r in sorted(p.rho.items())})
