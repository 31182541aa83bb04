"""A tiny FedAvg-shaped protocol for the perf harness tests: server 0 sends a small vector to
clients 1..N each round, each replies with it nudged, the server averages in sender order and
emits one "round" row with an accuracy that rises. Cheap: no torch, no data.

Run as `python -m tests.perf.toy_protocol run CONFIG ...` it registers itself under its
"module:function" name and then is `fedloom run` exactly (for kernels whose config check does
not yet accept "module:function" protocol names).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import options
from kernel.registry import declare

NAME = "tests.perf.toy_protocol:build"
DEFAULTS = {"clients": 2, "size": 1000}
CONFIG_TOML = f"""\
[run]
seed = 0
rounds = 3
progress = false

[transport]
kind = "inproc"

[protocol]
name = "{NAME}"
clients = 2
"""


def expected_accuracy(rounds: int) -> float:
    """What the toy reports after `rounds` rounds."""
    return 1.0 - 1.0 / (rounds + 1)


def runner() -> tuple[str, ...]:
    """The command that runs one toy config: `python -m kernel.run.cli run` itself when the kernel's
    config check accepts "module:function" protocol names, else this module's launcher."""
    from kernel.options import ConfigError
    from kernel.run.config import loads

    try:
        loads(CONFIG_TOML)
    except ConfigError:
        return (sys.executable, "-m", "tests.perf.toy_protocol", "run")
    return (sys.executable, "-m", "kernel.run.cli", "run")


class Server(Protocol):
    """Node 0: broadcast, gather every client, average, emit the round, repeat."""

    def __init__(self, clients: int, rounds: int, size: int) -> None:
        self.clients = clients
        self.rounds = rounds
        self.x = np.zeros(size, dtype=np.float32)
        self.r = 0
        self.got: dict[int, np.ndarray] = {}

    def on_start(self, ctx: Context) -> None:
        self._next(ctx)

    def _next(self, ctx: Context) -> None:
        self.r += 1
        self.got = {}
        ctx.multicast(range(1, self.clients + 1), "model", round=self.r, x=self.x)

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind != "update" or msg.round != self.r:
            return
        self.got[msg.src] = msg.x
        if len(self.got) < self.clients:
            return
        self.x = np.mean([self.got[s] for s in sorted(self.got)], axis=0).astype(np.float32)
        acc = expected_accuracy(self.r)
        ctx.emit("round", self.r, accuracy=acc, loss=1.0 / (self.r + 1))
        if self.r >= self.rounds:
            ctx.finish({"model": {"x": self.x}, "rounds": self.r, "test_accuracy": acc})
        else:
            self._next(ctx)


class Client(Protocol):
    """Replies to each model with the model plus a step of its own."""

    def on_message(self, ctx: Context, msg: Message) -> None:
        step = np.float32(0.01 * ctx.id)
        ctx.send(0, "update", round=msg.round, x=msg.x + step)


@declare("protocols")
def build(config: Mapping[str, Any]) -> Deployment:
    """The toy deployment: node 0 serves `clients` clients for `[run] rounds` rounds."""
    given = {k: v for k, v in config["protocol"].items() if k != "name"}
    p = options("protocol", given, DEFAULTS)
    clients, rounds, size = p["clients"], config["run"]["rounds"], p["size"]

    def make(node: int) -> Protocol:
        return Server(clients, rounds, size) if node == 0 else Client()

    return Deployment(node_ids=range(clients + 1), make_node=make, params=p)


if __name__ == "__main__":
    from kernel import registry
    from kernel.run.cli import main
    from tests.perf import toy_protocol

    registry.register("protocols", NAME, toy_protocol.build)
    sys.exit(main(sys.argv[1:]))
