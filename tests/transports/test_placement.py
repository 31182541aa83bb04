"""Placement of nodes on shards: balanced by count, or by a deployment's load hint."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.registry import load
from kernel.run import config as kconfig
from transports.base import place


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 7), st.integers(0, 1000))
def test_without_a_hint_counts_differ_by_at_most_one(n: int, shards: int, first: int) -> None:
    ids = list(range(first, first + n))
    where = place(ids, shards)
    assert sorted(where) == ids
    counts = [sum(1 for s in where.values() if s == k) for k in range(shards)]
    assert max(counts) - min(counts) <= 1
    assert place(ids, shards, {first: 1.0}) == where  # a 1.0 is no hint


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 300), st.integers(2, 6), st.floats(0.0, 200.0),
       st.lists(st.floats(0.0, 3.0), max_size=5))
def test_a_hint_balances_load_and_lightens_the_heavy_nodes_shard(
        n: int, shards: int, heavy: float, others: list[float]) -> None:
    ids = list(range(n))
    hint = {0: heavy, **{i + 1: w for i, w in enumerate(others) if i + 1 < n}}
    where = place(ids, shards, hint)
    assert sorted(where) == ids
    loads = [0.0] * shards
    counts = [0] * shards
    for node, s in where.items():
        loads[s] += hint.get(node, 1.0)
        counts[s] += 1
    # Greedy by falling load: shards differ by at most the largest single node's load.
    assert max(loads) - min(loads) <= max([1.0, *hint.values()]) + 1e-9
    # The heaviest node's shard holds no more other nodes than any other shard.
    mine = where[0]
    if heavy >= max([1.0, *others]):
        counts[mine] -= 1
        assert all(counts[mine] <= counts[s] for s in range(shards))
    # Same inputs, same placement (each process computes it on its own).
    assert place(list(reversed(ids)), shards, dict(reversed(list(hint.items())))) == where


def test_a_bad_hint_is_named() -> None:
    with pytest.raises(ValueError, match=r"placement load of node 3 is nan"):
        place(range(5), 2, {3: float("nan")})
    with pytest.raises(ValueError, match=r"transport.shards must be >= 1"):
        place(range(5), 0)


@pytest.mark.parametrize(("overrides", "server_clients"), [
    (["protocol.clients_per_round=100"], (35, 42)),  # every client trains: server ~ 23 clients
    ([], (20, 35)),  # 10 of 100 per round: the server outweighs ~45 clients' expected work
    # Shard-local partials: each shard sums its own replies, so only evaluating weighs.
    (["protocol.clients_per_round=100", "transport.kind=grpc", "transport.shards=2"], (45, 49)),
])
def test_fedavg_gives_its_server_a_lighter_shard(overrides: list[str],
                                                  server_clients: tuple[int, int]) -> None:
    cfg = kconfig.load(_w2(), overrides)
    dep = load("protocols", "fedavg")(cfg)
    assert dep.load is not None and dep.load[0] > 1.0
    where = place(dep.node_ids, 2, dep.load)
    mine = sum(1 for node, s in where.items() if s == where[0] and node != 0)
    lo, hi = server_clients
    assert lo <= mine <= hi
    assert mine < sum(1 for s in where.values() if s != where[0])


def _w2() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2] / "perf" / "workloads" / "w2.toml")


def test_no_hint_where_the_learner_reports_no_work() -> None:
    cfg = kconfig.load(_w2(), ["workload.model=flat"])
    dep = load("protocols", "fedavg")(cfg)
    assert dep.load is None
    assert place(dep.node_ids, 2, dep.load) == place(dep.node_ids, 2)
