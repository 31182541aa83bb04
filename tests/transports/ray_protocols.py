"""Small protocols for the ray transport's tests, named by "module:function" so that shard
actors (other processes) can import them: a registration in the test process would not reach
them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.registry import declare

SYNC = "tests.transports.ray_protocols:build_sync"
MASS = "tests.transports.ray_protocols:build_mass"
TICKER = "tests.transports.ray_protocols:build_ticker"


def _p(config: Mapping[str, Any], key: str, default: Any) -> Any:
    return config.get("protocol", {}).get(key, default)


# -- sync: FedAvg's shape with numpy only ------------------------------------------------------

class SyncServer(Protocol):
    """Node 0: multicasts the model, aggregates the replies in sender order, `rounds` times."""

    def __init__(self, n: int, dim: int, rounds: int) -> None:
        self.n, self.dim, self.rounds = n, dim, rounds
        self.r = 0
        self.x = np.zeros(0, np.float32)
        self.got: dict[int, tuple[float, np.ndarray]] = {}

    def on_start(self, ctx: Context) -> None:
        self.x = np.random.default_rng(0).standard_normal(self.dim).astype(np.float32)
        self._round(ctx)

    def _round(self, ctx: Context) -> None:
        self.r += 1
        self.got = {}
        ctx.multicast(range(1, self.n), "model", r=self.r, x=self.x)

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind != "update" or msg.r != self.r:
            return
        self.got[msg.src] = (float(msg.weight), msg.x)
        if len(self.got) < self.n - 1:
            return
        total = sum(w for w, _ in self.got.values())
        acc = np.zeros(self.dim, np.float32)
        for src in sorted(self.got):
            w, x = self.got[src]
            acc += np.float32(w / total) * x
        self.x = acc
        ctx.emit("round", self.r, norm=float(np.linalg.norm(acc)))
        if self.r == self.rounds:
            ctx.finish({"model": {"x": self.x}, "rounds": self.r})
        else:
            self._round(ctx)


class SyncClient(Protocol):
    """A client: model plus its own seeded noise, weighted by its id, plus a small chatter."""

    def on_message(self, ctx: Context, msg: Message) -> None:
        noise = ctx.rng.standard_normal(msg.x.shape[0]).astype(np.float32)
        ctx.send(0, "update", r=msg.r, weight=ctx.id, x=msg.x + np.float32(0.01) * noise)
        ctx.send(0, "chatter", r=msg.r, text="hi")


@declare("protocols")
def build_sync(config: Mapping[str, Any]) -> Deployment:
    """A synchronous FedAvg-shaped protocol: `nodes` nodes, a `dim`-float model."""
    n, dim = int(_p(config, "nodes", 8)), int(_p(config, "dim", 1000))
    rounds = int(config["run"]["rounds"])

    def make(i: int) -> Protocol:
        return SyncServer(n, dim, rounds) if i == 0 else SyncClient()

    return Deployment(node_ids=tuple(range(n)), make_node=make)


# -- mass: asynchronous push-sum whose every push is acknowledged ---------------------------------

class MassNode(Protocol):
    """Push-sum on a ring with acknowledged pushes: node 0 finishes when every node has had all
    its `pushes` acknowledged, so no mass is in flight; each node emits its (s, w) on_stop."""

    def __init__(self, n: int, pushes: int) -> None:
        self.n, self.pushes = n, pushes
        self.s = 0.0
        self.w = 1.0
        self.sent = 0
        self.acked = 0
        self.done: set[int] = set()

    def on_start(self, ctx: Context) -> None:
        self.s = float(ctx.id + 1) ** 0.5
        ctx.set_timer(0.0, "push")

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        if self.sent == self.pushes:
            return
        self.sent += 1
        dst = int(ctx.rng.choice([(ctx.id + 1) % self.n, (ctx.id - 1) % self.n, ctx.id // 2]))
        if dst == ctx.id:
            dst = (ctx.id + 1) % self.n
        half_s, half_w = self.s / 2, self.w / 2
        self.s, self.w = self.s - half_s, self.w - half_w
        ctx.send(dst, "push", s=half_s, w=half_w)
        ctx.set_timer(0.001, "push")

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind == "push":
            self.s += msg.s
            self.w += msg.w
            ctx.send(msg.src, "ack")
        elif msg.kind == "ack":
            self.acked += 1
            if self.acked == self.pushes:
                ctx.send(0, "done")
        elif msg.kind == "done":
            self.done.add(msg.src)
            if len(self.done) == self.n:
                ctx.finish({"done": len(self.done)})

    def on_stop(self, ctx: Context) -> None:
        ctx.emit("mass", self.s, w=self.w)


@declare("protocols")
def build_mass(config: Mapping[str, Any]) -> Deployment:
    """Acknowledged push-sum: `nodes` nodes, `pushes` pushes each."""
    n, pushes = int(_p(config, "nodes", 12)), int(_p(config, "pushes", 20))
    return Deployment(node_ids=tuple(range(n)), make_node=lambda i: MassNode(n, pushes))


def initial_mass(n: int) -> float:
    """Total s that MassNode starts with."""
    return sum(float(i + 1) ** 0.5 for i in range(n))


# -- ticker: rounds of ping/pong that survive lost messages (resends) ----------------------------

class Ticker(Protocol):
    """Node 0 pings every node each round, resending to the silent ones every `resend` s, and
    waits `gap` s between rounds; the others answer. Survives a shard's restart."""

    def __init__(self, n: int, rounds: int, gap: float, resend: float) -> None:
        self.n, self.rounds, self.gap, self.resend = n, rounds, gap, resend
        self.r = 0
        self.missing: set[int] = set()

    def on_start(self, ctx: Context) -> None:
        if ctx.id == 0:
            self._next(ctx)

    def _next(self, ctx: Context) -> None:
        self.r += 1
        self.missing = set(range(1, self.n))
        self._ping(ctx)

    def _ping(self, ctx: Context) -> None:
        ctx.multicast(sorted(self.missing), "ping", r=self.r)
        ctx.set_timer(self.resend, "resend")

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        if key == "resend" and self.missing:
            self._ping(ctx)
        elif key == "next":
            self._next(ctx)

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind == "ping":
            ctx.send(0, "pong", r=msg.r)
        elif msg.kind == "pong" and msg.r == self.r and msg.src in self.missing:
            self.missing.discard(msg.src)
            if not self.missing:
                ctx.cancel_timer("resend")
                ctx.emit("round", self.r)
                if self.r == self.rounds:
                    ctx.finish({"rounds": self.r})
                else:
                    ctx.set_timer(self.gap, "next")


@declare("protocols")
def build_ticker(config: Mapping[str, Any]) -> Deployment:
    """Ping/pong rounds: `nodes`, `gap` s between rounds, `resend` s between retries."""
    n = int(_p(config, "nodes", 6))
    gap, resend = float(_p(config, "gap", 0.2)), float(_p(config, "resend", 0.2))
    rounds = int(config["run"]["rounds"])
    return Deployment(node_ids=tuple(range(n)),
                      make_node=lambda i: Ticker(n, rounds, gap, resend))
