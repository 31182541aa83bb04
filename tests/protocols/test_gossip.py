"""Gossip averaging (sync and async) and decentralised SGD: exact answers, conservation,
independence from arrival order, determinism."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.api import Deployment, Network
from kernel.host import Host
from kernel.options import ConfigError
from kernel.wire.codec import Codec
from protocols import common, gossip, learners, topology
from tests.protocols.scripted_network import Scripted
from transports.base import Job
from transports.inproc import InprocTransport
from transports.netmodel import NetworkModel

ROOT = Path(__file__).resolve().parents[2]

# Every message passes through the wire format, as on inproc's strict mode.
STRICT = Codec.from_config({})


delays = st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=1, max_size=30)


def run_host(dep: Deployment, seed: int = 0, network: Network | None = None,
             until: float | None = None) -> tuple[Host, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    host = Host(dep, dep.node_ids, seed=seed, network=network, on_metric=rows.append,
                strict=STRICT)
    host.start()
    reason = host.run(until=until, max_events=1_000_000)
    assert reason in ("finished", "idle", "until"), f"run stopped: {reason}"
    return host, rows


def run_inproc(cfg: Mapping[str, Any], dep: Deployment) -> tuple[
        Mapping[str, Any], list[dict[str, Any]]]:
    """One run on inproc in strict mode; the result and the metric rows."""
    rows: list[dict[str, Any]] = []
    out = InprocTransport({"strict": True}).run(
        Job(cfg, dep, cfg["run"]["seed"], max_events=10**6, on_metric=rows.append))
    assert out.reason == "finished" and out.result is not None, out.reason
    return out.result, rows


def config(n: int, dim: int, rounds: int, section: Mapping[str, Any] | None = None,
           **protocol: Any) -> dict[str, Any]:
    proto = {"name": "gossip", "nodes": n, "dim": dim,
             "topology": dict(section or {"kind": "ring"}), **protocol}
    return {"run": {"seed": 0, "rounds": rounds}, "protocol": proto}


def start_values(n: int, dim: int) -> np.ndarray:
    return np.stack([gossip.initial_vector(i, dim) for i in range(n)]).astype(np.float64)


def finals(host: Host) -> np.ndarray:
    """Every node's current vector, by id, as float64."""
    return np.stack([np.asarray(getattr(host.nodes[i], "x"), np.float64)  # noqa: B009
                     for i in sorted(host.nodes)])


@st.composite
def undirected(draw: st.DrawFn) -> tuple[int, dict[str, Any]]:
    n = draw(st.integers(2, 12))
    kind = draw(st.sampled_from(["complete", "ring", "torus", "random_regular", "erdos_renyi"]))
    section: dict[str, Any] = {"kind": kind, "seed": draw(st.integers(0, 1000)),
                               "weights": draw(st.sampled_from(topology.RULES))}
    if kind == "random_regular":
        section["degree"] = 2 if n > 2 else 1
    if kind == "erdos_renyi":
        section["p"] = 0.5
    return n, section


# -- synchronous gossip ----------------------------------------------------------------------

def test_sync_gossip_ends_at_w_to_the_r_times_x0() -> None:
    n, dim, rounds = 16, 1000, 10
    sec = {"kind": "ring_lattice", "degree": 4}
    host, rows = run_host(gossip.build(config(n, dim, rounds, sec)))
    w = topology.mixing_matrix(topology.ring_lattice(n, 4))
    want = np.linalg.matrix_power(w, rounds) @ start_values(n, dim)
    got = finals(host)
    np.testing.assert_allclose(got, want, atol=1e-5)
    res = host.result
    assert res is not None and res["rounds"] == rounds and res["reports"] == n
    np.testing.assert_array_equal(res["model"]["x"], finals(host)[0])
    assert res["model"]["x"].dtype == np.float32
    dev = np.abs(got - got.mean(axis=0)).max()
    assert res["max_abs_dev"] == pytest.approx(dev, abs=1e-6)
    assert [r["value"] for r in rows if r["name"] == "round"] == list(range(1, rounds + 1))
    dis = [r["disagreement"] for r in rows if r["name"] == "round"]
    assert dis[-1] < dis[0]


@given(undirected(), st.integers(1, 6))
def test_sync_gossip_follows_w_and_a_doubly_stochastic_w_keeps_the_mean(
        graph: tuple[int, dict[str, Any]], rounds: int) -> None:
    n, section = graph
    g, rule = topology.from_config(section, n)
    host, _ = run_host(gossip.build(config(n, 8, rounds, section)))
    w = topology.mixing_matrix(g, rule)
    x0 = start_values(n, 8)
    got = finals(host)
    np.testing.assert_allclose(got, np.linalg.matrix_power(w, rounds) @ x0, atol=1e-5)
    if np.allclose(w.sum(axis=0), 1.0):
        np.testing.assert_allclose(got.mean(axis=0), x0.mean(axis=0), atol=1e-5)


@given(undirected(), st.integers(1, 5), delays, st.floats(0.0, 0.5), st.integers(0, 100))
def test_sync_gossip_result_does_not_depend_on_arrival_order(
        graph: tuple[int, dict[str, Any]], rounds: int, ds: list[float], dup: float,
        seed: int) -> None:
    n, section = graph
    dep = gossip.build(config(n, 16, rounds, section))
    calm, _ = run_host(dep)
    shaken, _ = run_host(dep, network=Scripted(ds, duplicate=dup, seed=seed))
    assert shaken.result is not None and calm.result is not None
    assert finals(shaken).tobytes() == finals(calm).tobytes()
    assert shaken.result["model"]["x"].tobytes() == calm.result["model"]["x"].tobytes()


def test_w4_workload_matches_numpy() -> None:
    cfg = tomllib.loads((ROOT / "perf" / "workloads" / "w4.toml").read_text())
    assert cfg["protocol"]["name"] == "gossip" and cfg["run"]["rounds"] == 50
    host, _ = run_host(gossip.build(cfg))
    n, dim = cfg["protocol"]["nodes"], cfg["protocol"]["dim"]
    w = topology.mixing_matrix(topology.ring_lattice(n, 4))
    want = np.linalg.matrix_power(w, 50) @ start_values(n, dim)
    got = finals(host)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert host.result is not None
    assert host.result["max_abs_dev"] == pytest.approx(
        np.abs(want - want.mean(axis=0)).max(), abs=1e-5)
    # Without the codec (arrays shared, buffers reused) the bytes are the same.
    plain = InprocTransport({"strict": False}).run(Job(cfg, gossip.build(cfg), 0))
    assert plain.result is not None
    assert plain.result["model"]["x"].tobytes() == host.result["model"]["x"].tobytes()


def test_sync_gossip_under_loss_stalls_and_ends_idle() -> None:
    dep = gossip.build(config(6, 4, 20))
    host, _ = run_host(dep, network=Scripted([0.1], loss=0.3, seed=1))
    assert host.result is None


# -- asynchronous push-pull ------------------------------------------------------------------

@given(undirected(), delays, st.floats(0.0, 0.3), st.integers(0, 1000))
def test_async_gossip_keeps_the_sum_and_contracts(graph: tuple[int, dict[str, Any]],
                                                  ds: list[float], dup: float,
                                                  seed: int) -> None:
    n, section = graph
    g, _ = topology.from_config(section, n)
    # Reports come 1e6 s after the last tick: stopping at 1e5, every exchange is over.
    dep = gossip.build(config(n, 8, 30, section, mode="async", period=1.0, drain=1e6))
    host, rows = run_host(dep, seed=seed, network=Scripted(ds, duplicate=dup, seed=seed),
                          until=1e5)
    x0 = start_values(n, 8)
    got = finals(host)
    np.testing.assert_allclose(got.sum(axis=0), x0.sum(axis=0), atol=1e-4)
    assert [r["value"] for r in rows if r["name"] == "round"] == list(range(1, 31))
    if g.is_connected() and n > 1:
        spread0 = np.abs(x0 - x0.mean(axis=0)).max()
        assert np.abs(got - got.mean(axis=0)).max() < spread0


def test_async_gossip_reaches_consensus_on_a_ring() -> None:
    dep = gossip.build(config(8, 4, 200, mode="async", period=1.0))
    host, _ = run_host(dep, network=Scripted([0.05, 0.2, 0.1]))
    res = host.result
    assert res is not None and res["rounds"] == 200 and res["reports"] == 8
    assert res["max_abs_dev"] < 1e-4
    np.testing.assert_allclose(res["model"]["x"], start_values(8, 4).mean(axis=0), atol=1e-4)


def test_async_gossip_recovers_consensus_after_a_restart() -> None:
    cfg = config(8, 4, 120, {"kind": "ring_lattice", "degree": 4}, mode="async", period=1.0,
                 drain=1e6)
    cfg["network"] = {"latency": {"kind": "uniform", "low": 0.1, "high": 1.5},
                      "crashes": [{"node": 3, "at": 10.0, "restart": 14.0}]}
    dep = gossip.build(cfg)
    host, _ = run_host(dep, network=NetworkModel.from_config(cfg["network"], 0, dep.node_ids),
                       until=1e5)
    restarted = host.nodes[3]
    assert isinstance(restarted, gossip.AsyncGossip) and restarted.inc == 1
    assert restarted.xid > 0 and not restarted.open, "the new incarnation's pushes went unanswered"
    got = finals(host)
    np.testing.assert_allclose(got, np.broadcast_to(got[0], got.shape), atol=1e-4)
    x0 = start_values(8, 4)
    assert (got >= x0.min(axis=0) - 1e-6).all() and (got <= x0.max(axis=0) + 1e-6).all()


# -- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [
    {"mode": "sync"}, {"mode": "async", "period": 0.5},
])
def test_same_seed_same_model_bytes(protocol: dict[str, Any]) -> None:
    cfg = config(10, 32, 8, {"kind": "random_regular", "degree": 3, "seed": 1}, **protocol)
    cfg["network"] = {"latency": {"kind": "uniform", "low": 0.01, "high": 0.5}, "duplicate": 0.1}

    def once() -> tuple[bytes, list[dict[str, Any]]]:
        res, rows = run_inproc(cfg, gossip.build(cfg))
        return res["model"]["x"].tobytes(), rows

    assert once() == once()


# -- decentralised SGD -----------------------------------------------------------------------

WORKLOAD = {"model": "linear", "clients": 4, "input_dim": 12, "samples_per_client": 40,
            "batch_size": 8, "test_samples": 200, "lr": 0.1}


def test_dsgd_equals_train_then_mix_computed_by_hand() -> None:
    rounds, seed = 3, 11
    cfg = {"run": {"seed": seed, "rounds": rounds},
           "protocol": {"name": "dsgd", "topology": {"kind": "ring", "weights": "metropolis"}},
           "workload": WORKLOAD}
    host, rows = run_host(gossip.build_dsgd(cfg), seed=seed)
    learner = learners.make(WORKLOAD)
    w = topology.mixing_matrix(topology.ring(4), "metropolis")
    models = [learner.init() for _ in range(4)]
    for r in range(1, rounds + 1):
        trained = [common.flatten(learner.train(models[i], i, common.derive_rng(seed, i, r)).model)
                   for i in range(4)]
        models = [common.unflatten(sum(w[i, j] * trained[j].astype(np.float64)
                                       for j in range(4)), models[0]) for i in range(4)]
    res = host.result
    assert res is not None
    for name in models[0]:
        np.testing.assert_allclose(res["model"][name], models[0][name], atol=1e-5)
    evaluated = learner.evaluate(models[0])
    assert evaluated is not None
    assert res["test_accuracy"] == pytest.approx(evaluated["accuracy"], abs=0.01)
    assert [r["value"] for r in rows if r["name"] == "round"] == [1, 2, 3]


def test_dsgd_is_deterministic_with_stragglers() -> None:
    cfg = {"run": {"seed": 2, "rounds": 3},
           "protocol": {"name": "dsgd", "topology": {"kind": "complete"}},
           "workload": WORKLOAD,
           "network": {"latency": 0.01, "compute": {"per_unit": 0.001, "spread": "uniform",
                                                    "low": 1.0, "high": 5.0}}}

    def once() -> tuple[bytes, list[dict[str, Any]]]:
        res, rows = run_inproc(cfg, gossip.build_dsgd(cfg))
        return common.digest(res["model"]).encode(), rows

    first = once()
    assert first == once()
    assert first[1][-1]["t"] > 3 * 40 * 0.001  # the compute model made time pass


# -- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("cfg", "fragment"), [
    (config(4, 4, 2, {"kind": "ring", "directed": True}), "undirected"),
    (config(4, 4, 2, mode="lazy"), "mode"),
    (config(4, 4, 2, dims=3), "did you mean 'dim'"),
    (config(4, 0, 2), "dim = 0"),
    (config(4, 4, 0), "rounds = 0"),
])
def test_bad_gossip_config_names_the_key(cfg: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        gossip.build(cfg)
    assert fragment in str(info.value)
