"""Push-sum: mass is conserved (counting what is in flight) under any delay, reordering,
duplication and, for the running-sum variant, loss; estimates reach the true average."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.api import Deployment, Network
from kernel.host import Host
from kernel.loop import DELIVER
from kernel.messages import Message
from kernel.options import ConfigError
from kernel.wire.codec import Codec
from protocols import gossip, topology
from tests.protocols.scripted_network import Scripted
from transports.base import Job
from transports.inproc import InprocTransport
from transports.netmodel import NetworkModel

DIM = 6

# Every message passes through the wire format, as on inproc's strict mode.
STRICT = Codec.from_config({})


def config(n: int, rounds: int, section: dict[str, Any], variant: str = "robust",
           drain: float = 1e6) -> dict[str, Any]:
    return {"run": {"seed": 0, "rounds": rounds},
            "protocol": {"name": "pushsum", "nodes": n, "dim": DIM, "topology": section,
                         "variant": variant, "period": 1.0, "drain": drain}}


@st.composite
def digraphs(draw: st.DrawFn) -> tuple[int, dict[str, Any]]:
    n = draw(st.integers(1, 10))
    kind = draw(st.sampled_from(["random_out", "ring", "erdos_renyi", "complete"]))
    section: dict[str, Any] = {"kind": kind, "seed": draw(st.integers(0, 1000))}
    if kind == "random_out":
        if n < 2:
            section = {"kind": "ring"}
        else:
            section["degree"] = draw(st.integers(1, min(3, n - 1)))
    if kind in ("ring", "erdos_renyi"):
        section["directed"] = True
    if kind == "erdos_renyi":
        section["p"] = 0.6
    return n, section


delays = st.lists(st.floats(0.0, 4.0, allow_nan=False), min_size=1, max_size=30)


def true_mean(n: int) -> np.ndarray:
    return np.mean([gossip.initial_vector(i, DIM).astype(np.float64) for i in range(n)], axis=0)


def start(dep: Deployment, network: Network | None, seed: int = 0) -> Host:
    host = Host(dep, dep.node_ids, seed=seed, network=network, strict=STRICT)
    host.start()
    return host


def nodes(host: Host) -> list[gossip.PushSum]:
    out = [host.nodes[i] for i in sorted(host.nodes)]
    assert all(isinstance(p, gossip.PushSum) for p in out)
    return out  # type: ignore[return-value]


def robust_mass(host: Host, g: topology.Graph) -> tuple[np.ndarray, float]:
    """sum of (s, w) held by nodes plus, per link j -> i, what j pushed and i has not taken."""
    ps = nodes(host)
    s = sum((p.s for p in ps), np.zeros(DIM))
    w = sum(p.w for p in ps)
    for j, outs in enumerate(g.out):
        for i in outs:
            taken = ps[i].rho.get(j)
            s = s + ps[j].sig_s - (taken[2] if taken else 0.0)
            w += ps[j].sig_w - (taken[3] if taken else 0.0)
    return s, w


def queued_mass(host: Host) -> tuple[np.ndarray, float]:
    """(s, w) carried by "ps" messages still queued for delivery. Reads the scheduler's queues:
    the only independent record of what is in flight."""
    s, w = np.zeros(DIM), 0.0
    events = [e[2:] for e in host.sched._heap] + list(host.sched._fifo)
    for etype, _, payload in events:
        if etype == DELIVER and isinstance(payload, Message) and payload.kind == "ps":
            s = s + payload.body["s"]
            w += payload.body["w"]
    return s, w


def step_through(host: Host, chunk: int, check: Any) -> str:
    reason = "max_events"
    while reason == "max_events":
        reason = host.run(until=1e5, max_events=chunk)
        check()
    return reason


@given(digraphs(), delays, st.floats(0.0, 0.5), st.floats(0.0, 0.5), st.integers(1, 20),
       st.integers(0, 1000))
def test_running_sum_conserves_mass_in_flight_under_delay_duplication_and_loss(
        graph: tuple[int, dict[str, Any]], ds: list[float], loss: float, dup: float,
        chunk: int, seed: int) -> None:
    n, section = graph
    g, _ = topology.from_config(section, n)
    host = start(gossip.build_pushsum(config(n, 12, section)),
                 Scripted(ds, loss=loss, duplicate=dup, seed=seed), seed)
    total = true_mean(n) * n

    def check() -> None:
        s, w = robust_mass(host, g)
        np.testing.assert_allclose(s, total, atol=1e-9)
        assert w == pytest.approx(n, abs=1e-9)

    assert step_through(host, chunk, check) == "until"


@given(digraphs(), delays, st.integers(1, 20), st.integers(0, 1000))
def test_plain_push_sum_conserves_mass_counting_queued_messages(
        graph: tuple[int, dict[str, Any]], ds: list[float], chunk: int, seed: int) -> None:
    n, section = graph
    host = start(gossip.build_pushsum(config(n, 12, section, "plain")), Scripted(ds), seed)
    total = true_mean(n) * n

    def check() -> None:
        ps = nodes(host)
        qs, qw = queued_mass(host)
        np.testing.assert_allclose(sum((p.s for p in ps), qs), total, atol=1e-9)
        assert sum(p.w for p in ps) + qw == pytest.approx(n, abs=1e-9)

    assert step_through(host, chunk, check) == "until"
    assert queued_mass(host)[1] == 0.0  # everything has landed


@pytest.mark.parametrize("variant", ["robust", "plain"])
def test_estimates_converge_to_the_average_on_a_directed_graph(variant: str) -> None:
    section = {"kind": "random_out", "degree": 2, "seed": 3}
    host = start(gossip.build_pushsum(config(10, 150, section, variant)),
                 Scripted([0.3, 1.7, 0.9, 2.5]))
    assert host.run(until=1e5) == "until"
    for p in nodes(host):
        np.testing.assert_allclose(p.value(), true_mean(10), atol=1e-5)


def test_running_sum_recovers_from_loss_and_plain_push_sum_does_not() -> None:
    section = {"kind": "random_out", "degree": 2, "seed": 3}
    errors = {}
    for variant in ("robust", "plain"):
        host = start(gossip.build_pushsum(config(10, 300, section, variant)),
                     Scripted([0.3, 1.7, 0.9], loss=0.3, seed=4))
        assert host.run(until=1e5) == "until"
        errors[variant] = max(float(np.abs(p.value() - true_mean(10)).max())
                              for p in nodes(host))
    assert errors["robust"] < 1e-5
    assert errors["plain"] > 1e-3, "plain push-sum should lose mass under loss"


def test_result_reports_node_0_estimate_and_deviation() -> None:
    cfg = config(8, 100, {"kind": "random_out", "degree": 2}, drain=5.0)
    cfg["network"] = {"latency": {"kind": "uniform", "low": 0.1, "high": 2.0}, "loss": 0.1}

    def once() -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        out = InprocTransport({"strict": True}).run(
            Job(cfg, gossip.build_pushsum(cfg), 9, max_events=10**6, on_metric=rows.append))
        assert out.reason == "finished" and out.result is not None
        assert [r["value"] for r in rows if r["name"] == "round"] == list(range(1, 101))
        return dict(out.result)

    res = once()
    assert res["rounds"] == 100 and 1 <= res["reports"] <= 8
    np.testing.assert_allclose(res["model"]["x"], true_mean(8), atol=1e-3)
    assert res["max_abs_dev"] < 1e-3
    again = once()
    assert again["model"]["x"].tobytes() == res["model"]["x"].tobytes()


def test_a_restarted_node_rejoins_and_the_nodes_agree_on_a_convex_combination() -> None:
    """After a crash and restart the sums restart for that node (a new incarnation): no
    mass is counted twice (each restart puts in at most its own weight 1), all weights stay
    positive, so every estimate stays within the range of the starting values, and the nodes
    reach consensus again."""
    cfg = config(8, 150, {"kind": "random_out", "degree": 2, "seed": 1})
    cfg["network"] = {"latency": {"kind": "uniform", "low": 0.1, "high": 1.5},
                      "crashes": [{"node": [2, 5], "at": 20.0, "restart": 31.0}]}
    dep = gossip.build_pushsum(cfg)
    net = NetworkModel.from_config(cfg["network"], 0, dep.node_ids)
    host = start(dep, net)
    assert host.run(until=1e5) == "until"
    ps = nodes(host)
    assert [p.ticks for p in ps] == [150] * 8
    assert [p.inc for p in ps] == [0, 0, 1, 0, 0, 1, 0, 0]
    assert all(p.w > 0 for p in ps)
    g, _ = topology.from_config(cfg["protocol"]["topology"], 8)
    assert 0 < robust_mass(host, g)[1] <= 8 + 2 + 1e-9
    est = np.stack([p.value() for p in ps]).astype(np.float64)
    x0 = np.stack([gossip.initial_vector(i, DIM) for i in range(8)])
    assert (est >= x0.min(axis=0) - 1e-9).all() and (est <= x0.max(axis=0) + 1e-9).all()
    np.testing.assert_allclose(est, np.broadcast_to(est[0], est.shape), atol=1e-5)


@pytest.mark.parametrize(("protocol", "fragment"), [
    ({"variant": "lossy"}, "variant"),
    ({"period": 0.0}, "period = 0.0"),
    ({"topology": {"kind": "ring", "degre": 3}}, "did you mean 'degree'"),
])
def test_bad_pushsum_config_names_the_key(protocol: dict[str, Any], fragment: str) -> None:
    cfg = config(4, 3, {"kind": "ring"})
    cfg["protocol"].update(protocol)
    with pytest.raises(ConfigError) as info:
        gossip.build_pushsum(cfg)
    assert fragment in str(info.value)
