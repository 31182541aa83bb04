"""The network model does what its config says: latency, bandwidth, loss, duplication,
partitions, crashes, the compute model; and its config errors name the key and the value."""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernel.api import Context, Deployment, Protocol
from kernel.host import Host
from kernel.messages import Message
from kernel.options import ConfigError
from transports.netmodel import NetworkModel, validate


def model(section: dict[str, Any], seed: int = 0, n: int = 4) -> NetworkModel:
    m = NetworkModel.from_config(section, seed, range(n))
    assert m is not None
    return m


def test_asking_for_nothing_gives_no_model() -> None:
    assert NetworkModel.from_config({}, 0, range(3)) is None
    nothing = {"latency": 0, "loss": 0.0, "duplicate": 0.0, "bandwidth": 0, "compute": {}}
    assert NetworkModel.from_config(nothing, 0, range(3)) is None
    assert NetworkModel.from_config({"compute": {"per_unit": 0.5}}, 0, range(3)) is not None
    assert NetworkModel.from_config({"loss": 0.01}, 0, range(3)) is not None


# -- latency --------------------------------------------------------------------------------
def test_constant_latency_is_exact() -> None:
    m = model({"latency": {"kind": "constant", "value": 0.125}})
    assert [list(m.arrivals(0, 1, t, 1000)) for t in (0.0, 1.5)] == [[0.125], [1.625]]
    assert list(model({"latency": 0.25}).arrivals(2, 3, 1.0, 0)) == [1.25]


@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_uniform_latency_stays_within_low_and_high(low: float, width: float, seed: int) -> None:
    high = low + width
    m = model({"latency": {"kind": "uniform", "low": low, "high": high}}, seed)
    lat = [m.arrivals(0, 1, 10.0, 0)[0] - 10.0 for _ in range(200)]
    tol = 1e-12 * (1 + high)
    assert all(low - tol <= x <= high + tol for x in lat)
    if width > 0.01:
        assert max(lat) - min(lat) > width / 2  # actually spread, not stuck at one value


@settings(max_examples=20)
@given(st.integers(0, 2**32 - 1))
def test_normal_latency_is_truncated_at_zero_and_lognormal_is_positive(seed: int) -> None:
    norm = model({"latency": {"kind": "normal", "mean": 0.01, "std": 0.05}}, seed)
    logn = model({"latency": {"kind": "lognormal", "mu": -2.0, "sigma": 1.0}}, seed)
    xs = [norm.arrivals(0, 1, 0.0, 0)[0] for _ in range(500)]
    ys = [logn.arrivals(0, 1, 0.0, 0)[0] for _ in range(500)]
    assert min(xs) >= 0.0 and max(xs) > 0.05
    assert min(ys) > 0.0
    # The median of exp(mu + sigma Z) is exp(mu); with 500 draws it is well inside a factor 2.
    med = sorted(ys)[250]
    assert math.exp(-2.0) / 2 < med < math.exp(-2.0) * 2


# -- bandwidth ------------------------------------------------------------------------------
def test_bandwidth_adds_exactly_nbytes_over_bandwidth() -> None:
    m = model({"latency": 0.5, "bandwidth": 1000.0, "queueing": "none"})
    assert list(m.arrivals(0, 1, 2.0, 250)) == [2.0 + 0.25 + 0.5]
    assert list(m.arrivals(0, 1, 2.0, 250)) == [2.75]  # "none": no waiting for the first


@pytest.mark.parametrize(("queueing", "expected"), [
    # two messages of 1 s transfer each at t=0 on link 0->1, then one on 0->2
    ("link", [1.0, 2.0, 1.0]),
    ("sender", [1.0, 2.0, 3.0]),
    ("none", [1.0, 1.0, 1.0]),
])
def test_queueing_serialises_transfers_per_link_or_sender(
    queueing: str, expected: list[float]
) -> None:
    m = model({"bandwidth": 100.0, "queueing": queueing})
    got = [m.arrivals(src, dst, 0.0, 100)[0] for src, dst in ((0, 1), (0, 1), (0, 2))]
    assert got == expected
    # A message departing after the pipe freed up does not wait.
    assert list(m.arrivals(3, 1, 10.0, 100)) == [11.0]


# -- loss and duplication -------------------------------------------------------------------
def _within(k: int, n: int, p: float) -> bool:
    """k successes of n at rate p, within 6 binomial standard deviations (+1 for p near 0/1)."""
    return abs(k - n * p) <= 6 * math.sqrt(n * p * (1 - p)) + 1


@settings(max_examples=20)
@given(st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_loss_rate_is_p(p: float, seed: int) -> None:
    m = model({"loss": p, "latency": 0.1}, seed)
    n = 2000
    lost = sum(not m.arrivals(0, 1, 0.0, 10) for _ in range(n))
    assert _within(lost, n, p), f"lost {lost} of {n} at p={p}"


@settings(max_examples=20)
@given(st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_duplicates_come_at_rate_p_each_with_its_own_latency(p: float, seed: int) -> None:
    m = model({"duplicate": p, "latency": {"kind": "uniform", "low": 0.1, "high": 0.2}}, seed)
    n = 2000
    counts = [len(m.arrivals(0, 1, 0.0, 10)) for _ in range(n)]
    assert set(counts) <= {1, 2}
    assert _within(counts.count(2), n, p)
    if p > 0.5:
        twice = [a for a in (m.arrivals(0, 1, 0.0, 10) for _ in range(50)) if len(a) == 2]
        assert any(a[0] != a[1] for a in twice)


# -- partitions, end to end -----------------------------------------------------------------
class Chatter(Protocol):
    """Sends to a random node every `period` seconds and logs every arrival."""

    def __init__(self, log: list[tuple[Any, ...]], n: int, period: float = 0.05) -> None:
        self.log, self.n, self.period = log, n, period

    def on_start(self, ctx: Context) -> None:
        self.log.append(("start", ctx.id, ctx.now))
        ctx.set_timer(self.period, "tick")

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        self.log.append(("timer", ctx.id, ctx.now, key))
        ctx.send(int(ctx.rng.integers(self.n)), "hi")
        ctx.set_timer(self.period, "tick")

    def on_message(self, ctx: Context, msg: Message) -> None:
        self.log.append(("msg", ctx.id, ctx.now, msg.src, msg.sent_at))


def run_chatter(n: int, net: dict[str, Any], seed: int, until: float) -> tuple[list[Any], Host]:
    log: list[Any] = []
    dep = Deployment(list(range(n)), lambda i: Chatter(log, n))
    host = Host(dep, dep.node_ids, seed=seed, network=NetworkModel.from_config(net, seed, range(n)))
    host.start()
    host.run(until=until)
    return log, host


@settings(max_examples=25)
@given(
    n=st.integers(2, 6),
    groups=st.lists(st.integers(0, 2), min_size=6, max_size=6),
    start=st.floats(0.0, 2.0),
    length=st.floats(0.05, 2.0),
    high=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**32 - 1),
)
def test_nothing_crosses_a_partition_in_its_window(
    n: int, groups: list[int], start: float, length: float, high: float, seed: int
) -> None:
    members = [[i for i in range(n) if groups[i] == g] for g in (0, 1)]  # group 2: the rest
    members = [g for g in members if g]
    assume(members)
    end = start + length
    net = {"latency": {"kind": "uniform", "low": 0.0, "high": high},
           "partitions": [{"start": start, "end": end, "groups": members}]}
    log, _ = run_chatter(n, net, seed, until=end + 1.0)
    side = {i: groups[i] for i in range(n)}
    msgs = [e for e in log if e[0] == "msg"]
    assert msgs
    for _, dst, arrival, src, depart in msgs:
        if side[src] != side[dst]:
            assert not (depart < end and arrival >= start), (src, dst, depart, arrival)


# -- crashes and restarts -------------------------------------------------------------------
def test_crash_schedule_comes_out_as_node_events() -> None:
    m = model({"crashes": [{"node": [2, 1], "at": 1.0, "restart": 2.5}, {"node": 0, "at": 0.5}]})
    assert list(m.node_events()) == [
        (0.5, 0, "crash"), (1.0, 1, "crash"), (1.0, 2, "crash"), (2.5, 1, "restart"),
        (2.5, 2, "restart"),
    ]


@settings(max_examples=15)
@given(at=st.floats(0.0, 1.0), down=st.floats(0.01, 1.0), seed=st.integers(0, 2**32 - 1))
def test_a_crashed_node_handles_nothing_until_it_restarts_with_on_start(
    at: float, down: float, seed: int
) -> None:
    net = {"latency": {"kind": "uniform", "low": 0.0, "high": 0.1},
           "crashes": [{"node": 1, "at": at, "restart": at + down}]}
    log, host = run_chatter(3, net, seed, until=at + down + 0.5)
    for e in log:
        if e[1] == 1 and e[0] in ("msg", "timer"):
            assert not at <= e[2] < at + down, e
    starts = [e[2] for e in log if e[0] == "start" and e[1] == 1]
    assert starts == [0.0, at + down]
    # Its sends stop while down: everything node 1 sent departed outside the window.
    assert all(not at < e[4] < at + down for e in log if e[0] == "msg" and e[3] == 1)


def test_a_send_departing_after_its_senders_crash_never_leaves() -> None:
    got: list[Message] = []

    class Worker(Protocol):
        def on_start(self, ctx: Context) -> None:
            if ctx.id == 0 and ctx.now == 0.0:  # the first life only
                ctx.compute(2.0)  # busy 0..2, but it crashes at 1
                ctx.send(1, "late")
                ctx.send(1, "too-late")

        def on_message(self, ctx: Context, msg: Message) -> None:
            got.append(msg)

    net = NetworkModel.from_config(
        {"compute": {"per_unit": 1.0}, "crashes": [{"node": 0, "at": 1.0, "restart": 1.5}]},
        0, range(2))
    host = Host(Deployment([0, 1], lambda i: Worker()), [0, 1], seed=0, network=net)
    host.start()
    host.run()
    assert got == []
    assert host.stats["lost"] == 2


# -- compute model --------------------------------------------------------------------------
def test_compute_time_is_work_times_per_unit_times_the_node_factor() -> None:
    m = model({"compute": {"per_unit": 0.5, "labels": {"eval": 0.1}, "factors": {"2": 3.0}}})
    assert m.compute_time(0, 4.0, "train") == 2.0
    assert m.compute_time(0, 4.0, "eval") == pytest.approx(0.4)
    assert m.compute_time(2, 4.0, "train") == 6.0
    assert m.compute_time(1, 0.0, "train") == 0.0
    with pytest.raises(ValueError, match="work must be >= 0, got -1"):
        m.compute_time(0, -1, "train")


def test_node_factors_are_drawn_once_per_node_in_sorted_order() -> None:
    cfg = {"compute": {"per_unit": 1.0, "spread": "lognormal", "sigma": 0.5,
                       "stragglers": 0.3, "straggler_factor": 10.0}}
    a = NetworkModel.from_config(cfg, 7, list(range(40)))
    b = NetworkModel.from_config(cfg, 7, list(reversed(range(40))))
    c = NetworkModel.from_config(cfg, 8, list(range(40)))
    assert a is not None and b is not None and c is not None
    assert a.factors == b.factors != c.factors
    slow = [f for f in a.factors.values() if f > 4.0]
    assert 2 <= len(slow) <= 25  # about 30% of 40 are stragglers
    uni = model({"compute": {"per_unit": 1.0, "spread": "uniform", "low": 1.0, "high": 2.0}}, n=50)
    assert all(1.0 <= f <= 2.0 for f in uni.factors.values())
    assert len(set(uni.factors.values())) == 50


# -- per-link overrides ---------------------------------------------------------------------
def test_link_overrides_apply_in_order_and_symmetrically_when_asked() -> None:
    m = model({"latency": 1.0, "links": [
        {"src": 0, "dst": [1, 2], "latency": 0.5},
        {"src": 0, "dst": 2, "symmetric": True, "latency": 0.25},
        {"dst": 3, "loss": 1.0},
    ]})
    assert list(m.arrivals(0, 1, 0.0, 0)) == [0.5]
    assert list(m.arrivals(0, 2, 0.0, 0)) == [0.25]
    assert list(m.arrivals(2, 0, 0.0, 0)) == [0.25]
    assert list(m.arrivals(1, 0, 0.0, 0)) == [1.0]
    assert list(m.arrivals(1, 3, 0.0, 0)) == []


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    cfg = {"latency": {"kind": "lognormal", "mu": -3.0, "sigma": 1.0}, "loss": 0.2}
    def draws(seed: int) -> list[Any]:
        m = model(cfg, seed)
        return [tuple(m.arrivals(i % 4, (i + 1) % 4, i * 0.1, 100)) for i in range(100)]
    assert draws(1) == draws(1) != draws(2)


# -- config errors --------------------------------------------------------------------------
@pytest.mark.parametrize(("section", "pattern"), [
    ({"latncy": 0.1}, r"\[network\] has no key 'latncy'; did you mean 'latency'\?"),
    ({"loss": 1.5}, r"\[network\] loss = 1\.5 is not a probability in \[0, 1\]"),
    ({"duplicate": -0.1}, r"\[network\] duplicate = -0\.1 is not a probability"),
    ({"loss": "high"}, r"\[network\] loss = 'high' is a string; expected a number"),
    ({"latency": {"kind": "gauss"}}, r"\[network\.latency\] kind = 'gauss' is not allowed"),
    ({"latency": {"kind": "uniform", "mean": 1.0}},
     r"\[network\.latency\] has no key 'mean' for kind 'uniform'; it takes low, high"),
    ({"latency": {"kind": "uniform", "low": 2.0, "high": 1.0}},
     r"\[network\.latency\] high = 1\.0 is below low = 2\.0"),
    ({"latency": -1.0}, r"\[network\] latency = -1\.0 must be >= 0"),
    ({"latency": "fast"}, r"\[network\] latency = 'fast' is neither a number"),
    ({"bandwidth": -5}, r"\[network\] bandwidth = -5\.0 must be >= 0"),
    ({"queueing": "fifo"}, r"\[network\] queueing = 'fifo' is not allowed"),
    ({"partitions": [{"start": 1.0, "end": 0.5, "groups": [[0]]}]},
     r"\[network\.partitions\[0\]\] end = 0\.5 must be after start = 1\.0"),
    ({"partitions": [{"groups": [[0, 9]]}]},
     r"\[network\.partitions\[0\]\] groups\[0\] = \[0, 9\]: node 9 is not in this run"),
    ({"partitions": [{"groups": [[0, 1], [1]]}]}, r"node 1 is in groups\[0\] and groups\[1\]"),
    ({"crashes": [{"node": 1, "at": 2.0, "restart": 1.0}]},
     r"\[network\.crashes\[0\]\] restart = 1\.0 must be after at = 2\.0"),
    ({"crashes": [{"at": 2.0}]}, r"\[network\.crashes\[0\]\] needs node"),
    ({"crashes": [{"node": [0, 1], "at": 1.0, "restart": 3.0}, {"node": 1, "at": 2.0}]},
     r"\[network\.crashes\[1\]\] crashes node 1 at 2\.0, while it is still down from "
     r"\[network\.crashes\[0\]\] \(until 3\.0\)"),
    ({"crashes": [{"node": 1, "when": 2.0}]}, r"\[network\.crashes\[0\]\] has no key 'when'"),
    ({"links": [{"src": 0, "loss": 2.0}]}, r"\[network\.links\[0\]\] loss = 2\.0 is not a prob"),
    ({"compute": {"per_unit": 1.0, "spread": "pareto"}},
     r"\[network\.compute\] spread = 'pareto' is not allowed"),
    ({"compute": {"stragglers": 1.2}}, r"\[network\.compute\] stragglers = 1\.2 is not a prob"),
    ({"compute": {"factors": {"x": 2.0}}}, r"factors key 'x' is not a node id"),
    ({"compute": {"factors": {"1": 0.0}}}, r"factors\.1 = 0\.0 must be > 0"),
])
def test_config_errors_name_the_key_and_the_value(section: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        validate(section, range(4))
