"""inproc end to end: the network model from the config, strict mode through the real codec,
and what the outcome reports."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import pytest

from kernel.api import Context, Deployment, Protocol, RunError
from kernel.messages import Message
from kernel.options import ConfigError
from transports.base import Job
from transports.inproc import InprocTransport


class Relay(Protocol):
    """Node 0 sends a vector around the ring `rounds` times; each hop adds 1; node 0 finishes
    with the vector, what arrived, and the read-only flag of the last array it got."""

    def __init__(self, n: int, rounds: int) -> None:
        self.n, self.rounds = n, rounds
        self.seen: list[tuple[Any, ...]] = []

    def on_start(self, ctx: Context) -> None:
        if ctx.id == 0:
            ctx.send(1 % self.n, "hop", x=np.zeros(4, np.float32), hops=0)

    def on_message(self, ctx: Context, msg: Message) -> None:
        x, hops = msg.body["x"], msg.body["hops"] + 1
        self.seen.append((ctx.now, msg.src, hops))
        ctx.compute(1.0)
        if ctx.id == 0 and hops >= self.rounds * self.n:
            ctx.finish({"model": {"x": x}, "hops": hops, "writeable": x.flags.writeable,
                        "t": ctx.now})
            return
        ctx.emit("hop", hops)
        ctx.send((ctx.id + 1) % self.n, "hop", x=x + 1, hops=hops)


def run(config: dict[str, Any], strict: bool = False, n: int = 4, rounds: int = 3,
        seed: int = 5, **job: Any) -> tuple[Any, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    dep = Deployment(list(range(n)), lambda i: Relay(n, rounds))
    out = InprocTransport({"strict": strict}).run(
        Job(config=config, deployment=dep, seed=seed, on_metric=rows.append, **job))
    return out, rows


def test_an_ideal_network_runs_in_zero_virtual_time() -> None:
    out, rows = run({})
    assert out.reason == "finished" and out.finished_by == 0
    assert out.result["hops"] == 12
    assert np.array_equal(out.result["model"]["x"], np.full(4, 11, np.float32))
    assert out.clock_s == 0.0
    assert out.messages == 12 and out.events == 12 and out.bytes > 12 * 16
    assert [r["value"] for r in rows] == list(range(1, 12))


def test_latency_and_compute_from_the_config_set_the_virtual_clock() -> None:
    net = {"latency": 0.5, "compute": {"per_unit": 0.25}}
    out, rows = run({"network": net})
    # 12 hops of 0.5 s latency; the 11 relays compute 0.25 s before sending; node 0 finishes
    # right after its own last compute.
    assert out.result["t"] == pytest.approx(12 * 0.5 + 12 * 0.25)
    assert out.clock_s == pytest.approx(12 * 0.5 + 11 * 0.25)
    assert [r["t"] for r in rows][:2] == [pytest.approx(0.75), pytest.approx(1.5)]


def test_strict_mode_passes_every_message_through_the_codec() -> None:
    loose, _ = run({})
    strict, _ = run({}, strict=True)
    assert loose.result["writeable"] is True  # the sender's own array, shared
    assert strict.result["writeable"] is False  # a read-only view of the decoded frame
    assert np.array_equal(loose.result["model"]["x"], strict.result["model"]["x"])
    assert strict.bytes > 0


def test_strict_mode_refuses_what_would_not_cross_a_process() -> None:
    class Sneaky(Protocol):
        def on_start(self, ctx: Context) -> None:
            if ctx.id == 0:
                ctx.send(1, "bad", payload={1, 2})  # a set has no wire form

    dep = Deployment([0, 1], lambda i: Sneaky())
    InprocTransport({}).run(Job(config={}, deployment=dep, seed=0))  # fine in memory
    with pytest.raises(RunError, match=r"node 0 .*in on_start"):
        InprocTransport({"strict": True}).run(Job(config={}, deployment=dep, seed=0))


def test_loss_crashes_and_limits_come_through() -> None:
    class Ticker(Protocol):
        def on_start(self, ctx: Context) -> None:
            ctx.set_timer(1.0, "t")

        def on_timer(self, ctx: Context, key: Hashable) -> None:
            ctx.send((ctx.id + 1) % 3, "tick")
            ctx.set_timer(1.0, key)

    dep = Deployment([0, 1, 2], lambda i: Ticker())
    cfg = {"network": {"loss": 0.5, "latency": 0.1,
                       "crashes": [{"node": 2, "at": 3.5, "restart": 6.5}]}}
    rows: list[dict[str, Any]] = []
    job = Job(config=cfg, deployment=dep, seed=1, until=10.0, on_metric=rows.append)
    out = InprocTransport({}).run(job)
    assert out.reason == "until" and out.clock_s == 10.0 and out.result is None
    assert [(r["name"], r["t"], r["node"]) for r in rows] == [("crash", 3.5, 2),
                                                             ("restart", 6.5, 2)]
    shard = out.shards[0]
    assert 0 < shard["lost"] < out.messages
    job = Job(config=cfg, deployment=dep, seed=1, max_events=7)
    assert InprocTransport({}).run(job).reason == "max_events"


def test_same_seed_same_outcome_other_seed_other_outcome() -> None:
    cfg = {"network": {"latency": {"kind": "lognormal", "mu": -2.0, "sigma": 1.0},
                       "compute": {"per_unit": 0.1, "spread": "lognormal", "sigma": 0.5}}}
    a, rows_a = run(cfg, seed=1)
    b, rows_b = run(cfg, seed=1)
    c, _ = run(cfg, seed=2)
    assert (a.clock_s, rows_a) == (b.clock_s, rows_b)
    assert a.clock_s != c.clock_s


def test_a_bad_network_table_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\[network\] loss = 2(\.0)? is not a probability"):
        run({"network": {"loss": 2}})
