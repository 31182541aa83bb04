"""A protocol that fails part way, named "module:function" so shard processes can import it:
nodes 0 and 1 bounce a ball; node 0 emits a "round" row every `every` bounces and raises
RuntimeError("boom at round N") at round `fail_at` (0: never; the run ends at its limit)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import options
from kernel.registry import declare


@declare("protocols")
def build_failing(config: Mapping[str, Any]) -> Deployment:
    p = options("protocol", config["protocol"], {"name": "", "every": 20, "fail_at": 3})
    return Deployment(node_ids=range(2), make_node=lambda i: Bouncer(),
                      params={"every": p["every"], "fail_at": p["fail_at"]})


class Bouncer(Protocol):
    def __init__(self) -> None:
        self.bounces = 0

    def on_start(self, ctx: Context) -> None:
        if ctx.id == 0:
            ctx.send(1, "ball", n=0)

    def on_message(self, ctx: Context, msg: Message) -> None:
        self.bounces += 1
        every, fail_at = ctx.params["every"], ctx.params["fail_at"]
        if ctx.id == 0 and self.bounces % every == 0:
            r = self.bounces // every
            if r == fail_at:
                raise RuntimeError(f"boom at round {r}")
            ctx.emit("round", r)
        ctx.send(1 - ctx.id, "ball", n=msg.n + 1)
