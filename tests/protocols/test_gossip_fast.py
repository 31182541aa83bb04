"""Sync gossip's fast paths (whole FANOUTs, the `on_multicast` hook, deferred batched mixing)
give exactly what the per-message path gives: result, counters, metric rows, checkpoints."""

from __future__ import annotations

import tempfile
from collections.abc import Hashable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.api import Context, Deployment, Protocol
from kernel.host import Host
from kernel.messages import Message
from kernel.run import checkpoint as ckpt
from kernel.run.outputs import WALL_FIELDS
from kernel.run.runner import RunRecord, execute
from protocols import gossip, mixbatch
from tests.kernel.run.interrupt import InterruptAt

COMPARED = ("final_model_sha256", "rounds", "reason", "finished_by", "clock_s", "messages",
            "bytes", "events", "extra")


def plain(rec: RunRecord) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return ({k: rec.result.get(k) for k in COMPARED},
            [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rec.rows])


def per_message(cfg: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> RunRecord:
    """The run without any fast path: events one by one (an event limit it never reaches
    turns whole FANOUTs and the hook off) and a mix computed by each node when due."""
    with monkeypatch.context() as m:
        m.setattr(gossip, "LAZY_DIM", 0)
        slow = dict(cfg, run=dict(cfg["run"], max_events=10**9))
        return execute(slow, quiet=True)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(2, 40), label="nodes")
    kind = draw(st.sampled_from(["random_regular", "erdos_renyi", "ring_lattice", "complete",
                                 "ring"]), label="topology")
    topo: dict[str, Any] = {"kind": kind, "seed": draw(st.integers(0, 50), label="graph seed"),
                            "weights": draw(st.sampled_from(["uniform", "max_degree",
                                                             "metropolis"]))}
    if kind == "random_regular":
        d = draw(st.integers(1, min(5, n - 1)), label="degree")
        if n * d % 2:
            n += 1
        topo["degree"] = d
    elif kind == "ring_lattice":
        topo["degree"] = 2 * draw(st.integers(1, max(1, min(3, (n - 1) // 2))))
        n = max(n, topo["degree"] + 1)
    elif kind == "erdos_renyi":
        topo.update(p=draw(st.floats(0.05, 0.5)), connected=False)
    cfg: dict[str, Any] = {
        "run": {"seed": draw(st.integers(0, 9)), "rounds": draw(st.integers(1, 6)),
                "progress": False},
        "protocol": {"name": "gossip", "nodes": n, "dim": draw(st.integers(1, 3)),
                     "track": draw(st.booleans()), "topology": topo}}
    net = draw(st.sampled_from(["none", "latency", "duplicate", "crash"]), label="network")
    if net != "none":
        cfg["network"] = {"latency": {"kind": "uniform", "low": 0.01, "high": 0.2}}
    if net == "duplicate":
        cfg["network"]["duplicate"] = 0.3
    if net == "crash":
        node = draw(st.integers(0, n - 1), label="crashing node")
        at = draw(st.floats(0.0, 0.6), label="crash at")
        cfg["network"]["crashes"] = [{"node": node, "at": at, "restart": at + 0.05}]
    return cfg


@settings(max_examples=40, deadline=None)
@given(cfg=configs(), flush_at=st.sampled_from([1, 5, 37, mixbatch.FLUSH_AT]))
def test_the_fast_paths_give_exactly_the_per_message_run(cfg: dict[str, Any],
                                                         flush_at: int) -> None:
    with pytest.MonkeyPatch.context() as m:
        want = plain(per_message(cfg, m))
        m.setattr(mixbatch, "FLUSH_AT", flush_at)  # batches flushed by size at any point
        assert plain(execute(cfg, quiet=True)) == want


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 20), at=st.integers(1, 4), dup=st.booleans())
def test_a_run_paused_with_mixes_deferred_resumes_bit_for_bit(seed: int, at: int,
                                                               dup: bool) -> None:
    cfg: dict[str, Any] = {
        "run": {"seed": seed, "rounds": 5, "progress": False},
        "protocol": {"name": "gossip", "nodes": 200, "dim": 2, "track": True,
                     "topology": {"kind": "random_regular", "degree": 4}}}
    if dup:
        cfg["network"] = {"latency": {"kind": "uniform", "low": 0.01, "high": 0.1},
                          "duplicate": 0.2}
    want = execute(cfg, quiet=True)
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(ckpt.RunInterrupted):
            execute(cfg, progress=InterruptAt(at), checkpoint_dir=d)
        assert plain(execute(None, quiet=True, resume=d)) == plain(want)


def test_deferred_mixing_is_what_runs_and_flushes_in_batches() -> None:
    cfg = {"run": {"seed": 0, "rounds": 4, "progress": False},
           "protocol": {"name": "gossip", "nodes": 500, "dim": 1, "track": False,
                        "topology": {"kind": "random_regular", "degree": 4}}}
    dep = gossip.build(cfg)
    host = Host(dep, dep.node_ids, seed=0)
    host.start()
    plan = host.nodes[0].plan  # type: ignore[attr-defined]
    assert plan.lazy is True
    assert host.run(max_events=1500) == "max_events"
    assert plan.batch.pending > 100  # mixes recorded, not computed yet
    assert host.run() == "finished"
    assert plan.batch.pending == 0
    x = np.stack([host.nodes[i].x for i in range(500)])  # type: ignore[attr-defined]
    assert np.isfinite(x).all()


# -- the kernel hook on its own ----------------------------------------------------------------

class Tally(Protocol):
    """Counts what reaches it; node 0 multicasts `fan` to everyone else, `rounds` times, and
    a node named in `stop_at` finishes the run when it gets round `stop_round`."""

    def __init__(self, n: int, rounds: int, stop_at: int, stop_round: int, busy: int) -> None:
        self.n, self.rounds, self.stop_at, self.stop_round = n, rounds, stop_at, stop_round
        self.busy = busy
        self.seen: list[tuple[int, int]] = []

    def on_start(self, ctx: Context) -> None:
        if ctx.id == 0:
            ctx.set_timer(1.0, 1)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        ctx.multicast(range(1, self.n), "fan", r=key)
        if key < self.rounds:  # type: ignore[operator]
            ctx.set_timer(1.0, key + 1)  # type: ignore[operator]

    def on_message(self, ctx: Context, msg: Message) -> None:
        assert msg.dst == ctx.id
        self.seen.append((msg.src, msg.body["r"]))
        ctx.emit("got", msg.body["r"])
        if ctx.id == self.busy:
            ctx.compute(0.5)
        if ctx.id == self.stop_at and msg.body["r"] == self.stop_round:
            ctx.finish({"model": {}, "by": ctx.id})


class HookedTally(Tally):
    @staticmethod
    def on_multicast(msg: Message, deliveries: Iterator[tuple[Context, Any]]) -> None:
        for ctx, node in deliveries:
            node.on_message(ctx, Message(msg.src, ctx.id, msg.kind, msg.body, msg.sent_at,
                                         msg.seq))


def tally_run(cls: type[Tally], n: int, stop_at: int, stop_round: int, busy: int,
              limit: int | None) -> tuple[Any, ...]:
    rows: list[dict[str, Any]] = []
    dep = Deployment(list(range(n)), lambda i: cls(n, 3, stop_at, stop_round, busy))
    host = Host(dep, dep.node_ids, seed=0, on_metric=rows.append)
    host.start()
    reason = host.run(max_events=limit)
    return (reason, host.result, host.stats, rows,
            [host.nodes[i].seen for i in range(n)])  # type: ignore[attr-defined]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), stop_at=st.integers(0, 12), stop_round=st.integers(1, 4),
       busy=st.integers(0, 12), limit=st.one_of(st.none(), st.integers(1, 60)))
def test_the_hook_and_whole_fanouts_run_as_events_one_by_one(
        n: int, stop_at: int, stop_round: int, busy: int, limit: int | None) -> None:
    want = tally_run(Tally, n, stop_at, stop_round, busy, limit if limit else 10**9)
    assert tally_run(Tally, n, stop_at, stop_round, busy, limit) == want
    assert tally_run(HookedTally, n, stop_at, stop_round, busy, limit) == want


class Quitter(HookedTally):
    @staticmethod
    def on_multicast(msg: Message, deliveries: Iterator[tuple[Context, Any]]) -> None:
        next(iter(deliveries))


def test_a_hook_that_skips_deliveries_is_a_clear_error() -> None:
    dep = Deployment(list(range(4)), lambda i: Quitter(4, 3, -1, 0, -1))
    host = Host(dep, dep.node_ids, seed=0)
    host.start()
    with pytest.raises(Exception, match="Quitter.on_multicast returned before taking every "
                                        "delivery"):
        host.run()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), shape=st.sampled_from([(), (0,), (1,), (3,), (5,), (2, 3)]),
       f64=st.booleans(), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-30, 1.0, 1e30]), chunk=st.integers(1, 40))
def test_the_final_deviation_is_the_one_vector_at_a_time_figure(
        n: int, shape: tuple[int, ...], f64: bool, seed: int, scale: float,
        chunk: int) -> None:
    rng = np.random.default_rng(seed)
    vals = [np.asarray(rng.standard_normal(shape) * scale, np.float64 if f64 else np.float32)
            for _ in range(n)]
    mean = np.zeros(shape, np.float64)
    for v in vals:
        mean += v
    mean /= n
    want = max(float(np.max(np.abs(v - mean), initial=0.0)) for v in vals)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gossip, "_REPORT_CHUNK", chunk)  # numbers per numpy call: any grouping
        got = gossip._max_abs_dev(vals)
    assert got == want and type(got) is float
