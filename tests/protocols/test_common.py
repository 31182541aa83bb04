"""Shared protocol helpers: gathering replies, seeded sampling, aggregator lookup, model ops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.api import Deployment, Protocol
from kernel.host import Host
from kernel.options import ConfigError
from protocols import aggregators, common


@given(senders=st.lists(st.integers(0, 50), min_size=1, max_size=20, unique=True),
       seed=st.integers(0, 1000))
def test_gather_returns_replies_sorted_by_sender_whatever_the_arrival_order(senders, seed):
    g = common.Gather(7, senders)
    arrival = [senders[i] for i in np.random.default_rng(seed).permutation(len(senders))]
    for k, src in enumerate(arrival):
        assert not g.complete
        assert g.offer(src, 7, f"from {src}")
        assert g.complete == (k == len(senders) - 1)
    assert g.close() == [(s, f"from {s}") for s in sorted(senders)]


def test_gather_refuses_and_counts_late_duplicate_and_unexpected_replies():
    g = common.Gather(3, [1, 2, 3], need=2)
    assert not g.offer(1, 2, "an older round")  # other tag: late
    assert g.offer(1, 3, "a")
    assert not g.offer(1, 3, "again")  # duplicate
    assert not g.offer(9, 3, "stranger")  # not asked
    assert (g.late, g.refused, len(g), g.complete) == (1, 2, 1, False)
    assert g.offer(3, 3, "c") and g.complete
    assert g.close() == [(1, "a"), (3, "c")]
    assert not g.offer(2, 3, "after the end")  # closed: late
    assert g.late == 2


def test_gather_from_anyone_needs_a_count():
    with pytest.raises(ValueError, match="needs `need`"):
        common.Gather(0)
    g = common.Gather(0, need=2)
    assert g.offer(5, 0, 1) and g.offer(4, 0, 2) and g.complete
    assert g.close() == [(4, 2), (5, 1)]


class _Asker(Protocol):
    """Node 0 asks nodes 1.. and gathers with a deadline; the others answer after `delay * id`."""

    def __init__(self, delay: float, timeout: float) -> None:
        self.delay, self.timeout = delay, timeout

    def on_start(self, ctx):
        if ctx.id == 0:
            self.g = common.Gather(1, range(1, ctx.n_nodes))
            self.g.arm(ctx, self.timeout)
            ctx.multicast(range(1, ctx.n_nodes), "ask", tag=1)

    def on_message(self, ctx, msg):
        if msg.kind == "ask":
            ctx.set_timer(self.delay * ctx.id, ("reply", msg.src))
        elif self.g.offer(msg.src, msg.tag, msg.src) and self.g.complete:
            ctx.finish({"got": [s for s, _ in self.g.close(ctx)], "late": self.g.late})

    def on_timer(self, ctx, key):
        if ctx.id == 0 and key == self.g.timer_key:
            ctx.finish({"got": [s for s, _ in self.g.close(ctx)], "late": self.g.late})
        else:
            ctx.send(key[1], "answer", tag=1)


@pytest.mark.parametrize(("timeout", "expect"), [(2.5, [1, 2]), (10.0, [1, 2, 3, 4])])
def test_gather_deadline_on_a_real_host(timeout, expect):
    def make(i):
        return _Asker(1.0, timeout)

    dep = Deployment(node_ids=range(5), make_node=make)
    host = Host(dep, dep.node_ids, seed=0)
    host.start()
    assert host.run(until=100.0) == "finished"
    assert host.result == {"got": expect, "late": 0}


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), frac=st.floats(0.001, 1.0))
def test_sample_is_seeded_sorted_and_sized(seed, n, frac):
    pop = range(1, n + 1)
    a = common.sample(np.random.default_rng(seed), pop, fraction=frac)
    assert a == common.sample(np.random.default_rng(seed), pop, fraction=frac)
    assert a == sorted(set(a)) and set(a) <= set(pop)
    assert len(a) == max(1, int(np.ceil(frac * n - 1e-9)))
    k = common.sample(np.random.default_rng(seed), pop, count=(seed % n) + 1)
    assert len(k) == (seed % n) + 1 and set(k) <= set(pop)
    assert common.sample(np.random.default_rng(seed), pop) == list(pop)


def test_sample_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="cannot sample 5 of 3"):
        common.sample(np.random.default_rng(0), [1, 2, 3], count=5)


def test_derive_rng_depends_only_on_its_keys():
    a = common.derive_rng(3, 1, 2).random(4)
    assert np.array_equal(a, common.derive_rng(3, 1, 2).random(4))
    assert not np.array_equal(a, common.derive_rng(3, 2, 1).random(4))


def test_aggregator_lookup_binds_arguments_and_names_bad_keys():
    items = [(1.0, {"v": np.array([x], np.float32)}) for x in (0.0, 1.0, 2.0, 50.0, 3.0)]
    fn = common.aggregator("trimmed_mean", {"f": 1})
    assert fn(items)["v"][0] == pytest.approx(2.0)
    assert common.aggregator("mean") is aggregators.mean
    with pytest.raises(ConfigError, match=r"aggregator = 'avg'"):
        common.aggregator("avg")
    with pytest.raises(ConfigError, match=r"aggregator_args\.g: aggregator 'krum' takes f"):
        common.aggregator("krum", {"g": 1})
    with pytest.raises(ConfigError, match=r"aggregator_args\.items"):
        common.aggregator("krum", {"items": 1})


@given(seed=st.integers(0, 2**32 - 1))
def test_flatten_roundtrip_and_digest(seed):
    rng = np.random.default_rng(seed)
    m = {"z": rng.standard_normal((2, 3)).astype(np.float32),
         "a": rng.standard_normal(4).astype(np.float32)}
    vec = common.flatten(m)
    assert vec.shape == (10,) and np.array_equal(vec[:4], m["a"])
    back = common.unflatten(vec, m)
    assert all(np.array_equal(back[k], m[k]) for k in m)
    assert common.digest(back) == common.digest(m)
    back["z"][0, 0] += 1
    assert common.digest(back) != common.digest(m)
    s = common.add(m, m, scale=-0.5)
    np.testing.assert_allclose(s["a"], 0.5 * m["a"], rtol=1e-6)
    assert np.array_equal(common.sub(m, m)["z"], np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="vector of 9 values"):
        common.unflatten(vec[:9], m)
