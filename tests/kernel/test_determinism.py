"""Same protocol, same network model, same seed => the same event trace, run after run and
process after process (whatever PYTHONHASHSEED is)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.api import Context, Deployment, Protocol
from kernel.host import Host
from kernel.messages import Message
from transports.netmodel import NetworkModel

ROOT = Path(__file__).resolve().parents[2]
TIMER_KEYS = ("alpha", "beta", ("gamma", 1))


class Chaos(Protocol):
    """Every event records itself, then does rng-chosen things: sends, multicasts, timers set,
    replaced and cancelled, computation."""

    def __init__(self, trace: list[tuple[Any, ...]], n: int) -> None:
        self.trace = trace
        self.n = n

    def on_start(self, ctx: Context) -> None:
        self.trace.append((ctx.now, ctx.id, "start"))
        self.act(ctx)

    def on_message(self, ctx: Context, msg: Message) -> None:
        self.trace.append((ctx.now, ctx.id, "msg", msg.kind, msg.src, msg.seq, msg.sent_at))
        self.act(ctx)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        self.trace.append((ctx.now, ctx.id, "timer", key))
        self.act(ctx)

    def act(self, ctx: Context) -> None:
        r = ctx.rng
        if r.random() < 0.7:
            ctx.send(int(r.integers(self.n)), f"k{r.integers(3)}", x=float(r.random()), pad="ab")
        if r.random() < 0.2:
            ctx.multicast(r.choice(self.n, size=2, replace=False).tolist(), "mc")
        if r.random() < 0.4:
            ctx.set_timer(float(r.random()), TIMER_KEYS[r.integers(3)])
        if r.random() < 0.15:
            ctx.cancel_timer(TIMER_KEYS[r.integers(3)])
        if r.random() < 0.3:
            ctx.compute(float(r.random()), label=("train", "eval")[r.integers(2)])
        if r.random() < 0.1:
            ctx.emit("note", float(r.random()), tag=str(r.integers(5)))


def run_trace(n: int, network: dict[str, Any], seed: int, max_events: int = 300) -> list[Any]:
    """The full trace (events, metric rows, stats) of one run."""
    trace: list[Any] = []
    dep = Deployment(list(range(n)), lambda i: Chaos(trace, n))
    net = NetworkModel.from_config(network, seed, dep.node_ids)
    host = Host(dep, dep.node_ids, seed=seed, network=net,
                on_metric=lambda row: trace.append(tuple(sorted(row.items()))),
                sizer=lambda body: 40 * len(body))
    host.start()
    reason = host.run(until=60.0, max_events=max_events)
    host.stop()
    trace.append((reason, host.sched.now, tuple(sorted(host.stats.items()))))
    return trace


def _latency() -> st.SearchStrategy[Any]:
    small = st.floats(0.0, 0.5)
    return st.one_of(
        small,
        st.tuples(small, small).map(
            lambda p: {"kind": "uniform", "low": p[0], "high": p[0] + p[1]}),
        st.tuples(small, small).map(lambda p: {"kind": "normal", "mean": p[0], "std": p[1]}),
        st.tuples(st.floats(-4.0, 0.0), st.floats(0.0, 1.0)).map(
            lambda p: {"kind": "lognormal", "mu": p[0], "sigma": p[1]}),
    )


@st.composite
def networks(draw: st.DrawFn) -> tuple[int, dict[str, Any]]:
    n = draw(st.integers(2, 6))
    nodes = st.integers(0, n - 1)
    net: dict[str, Any] = {
        "latency": draw(_latency()),
        "loss": draw(st.sampled_from([0.0, 0.1, 0.3])),
        "duplicate": draw(st.sampled_from([0.0, 0.1, 0.3])),
        "bandwidth": draw(st.sampled_from([0.0, 1e3, 1e5])),
        "queueing": draw(st.sampled_from(["link", "sender", "none"])),
    }
    parts = []
    for _ in range(draw(st.integers(0, 2))):
        start = draw(st.floats(0.0, 3.0))
        members = draw(st.permutations(range(n)))
        cut = draw(st.integers(1, n))
        parts.append({"start": start, "end": start + draw(st.floats(0.1, 3.0)),
                      "groups": [list(members[:cut])]})
    crashes = []
    for node in draw(st.lists(nodes, max_size=2, unique=True)):
        at = draw(st.floats(0.0, 3.0))
        crash: dict[str, Any] = {"node": node, "at": at}
        if draw(st.booleans()):
            crash["restart"] = at + draw(st.floats(0.01, 2.0))
            if draw(st.booleans()):  # and down again later
                crashes.append({"node": node, "at": crash["restart"] + draw(st.floats(0.0, 1.0)),
                                "restart": 9.0})
        crashes.append(crash)
    net["partitions"], net["crashes"] = parts, crashes
    net["compute"] = {
        "per_unit": draw(st.sampled_from([0.0, 0.05, 0.5])),
        "spread": draw(st.sampled_from(["none", "uniform", "lognormal"])),
        "high": 3.0, "sigma": 0.5,
        "jitter": draw(st.sampled_from([0.0, 0.2])),
        "labels": {"eval": 0.01},
    }
    return n, net


@settings(max_examples=25)
@given(networks(), st.integers(0, 2**32 - 1))
def test_a_run_replays_exactly(case: tuple[int, dict[str, Any]], seed: int) -> None:
    n, net = case
    first = run_trace(n, net, seed)
    assert len(first) > n  # the run did something
    assert run_trace(n, net, seed) == first


FIXED_NETWORK: dict[str, Any] = {
    "latency": {"kind": "lognormal", "mu": -3.0, "sigma": 0.5},
    "loss": 0.1, "duplicate": 0.1, "bandwidth": 1e4,
    "partitions": [{"start": 0.5, "end": 1.5, "groups": [[0, 1]]}],
    "crashes": [{"node": 2, "at": 1.0, "restart": 2.0}],
    "compute": {"per_unit": 0.1, "spread": "lognormal", "sigma": 0.5, "jitter": 0.1},
}


def fixed_trace() -> str:
    """The trace of one fixed case as text (what the subprocesses print)."""
    return repr(run_trace(5, FIXED_NETWORK, seed=2024, max_events=500))


def test_a_run_is_the_same_in_other_processes_whatever_the_hash_seed() -> None:
    here = fixed_trace()
    code = "from tests.kernel.test_determinism import fixed_trace; print(fixed_trace())"
    outs = []
    for hash_seed in ("1", "987654"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.strip())
    assert outs[0] == outs[1] == here
    assert here.count("'msg'") > 50
