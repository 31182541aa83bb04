"""FedAsync and FedBuff: staleness weights, the mixing rule, one version per K updates,
stragglers, determinism."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.options import ConfigError
from protocols import asyncfl, common, learners
from transports.base import Job
from transports.inproc import InprocTransport

LINEAR = {"model": "linear", "clients": 1, "input_dim": 10, "samples_per_client": 24,
          "batch_size": 8, "test_samples": 50, "lr": 0.1}
STEP = 0.25  # exact in float32, so sums of steps are exact too


def flat(clients: int) -> dict[str, Any]:
    return {"model": "flat", "clients": clients, "flat_size": 5, "flat_step": STEP}


def config(name: str, rounds: int, workload: Mapping[str, Any], seed: int = 0,
           network: Mapping[str, Any] | None = None, **protocol: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"run": {"seed": seed, "rounds": rounds},
                           "protocol": {"name": name, **protocol}, "workload": dict(workload)}
    if network:
        cfg["network"] = dict(network)
    return cfg


def run(cfg: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[dict[str, Any]]]:
    """One run on inproc in strict mode: the result and the "round" rows."""
    build = {"fedasync": asyncfl.build_fedasync, "fedbuff": asyncfl.build_fedbuff}
    rows: list[dict[str, Any]] = []
    out = InprocTransport({"strict": True}).run(
        Job(cfg, build[cfg["protocol"]["name"]](cfg), cfg["run"]["seed"], max_events=10**6,
            on_metric=rows.append))
    assert out.reason == "finished" and out.result is not None, out.reason
    return out.result, [r for r in rows if r["name"] == "round"]


def stragglers(spread: float) -> dict[str, Any]:
    """Uneven latencies and (for workloads whose training is work: not `flat`) client speeds."""
    return {"latency": {"kind": "uniform", "low": 0.001, "high": 0.05 * spread},
            "compute": {"per_unit": 0.01, "spread": "uniform", "low": 1.0, "high": spread}}


# -- staleness functions ---------------------------------------------------------------------

@given(st.sampled_from(asyncfl.STALENESS), st.floats(0.0, 5.0), st.floats(0.0, 10.0),
       st.integers(0, 1000))
def test_staleness_weight_is_one_when_fresh_and_never_grows(kind: str, a: float, b: float,
                                                            t: int) -> None:
    s = asyncfl.staleness_fn(kind, a, b)
    assert s(0) == 1.0
    assert 0.0 < s(t + 1) <= s(t) <= 1.0


def test_staleness_weights_follow_their_formulas() -> None:
    assert asyncfl.staleness_fn("polynomial", 0.5)(3) == pytest.approx(0.5)
    hinge = asyncfl.staleness_fn("hinge", 2.0, 4.0)
    assert hinge(4) == 1.0 and hinge(6) == pytest.approx(1 / 5)
    assert asyncfl.staleness_fn("constant")(99) == 1.0


# -- FedAsync --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", asyncfl.STALENESS)
def test_fedasync_with_fresh_updates_and_alpha_1_takes_the_client_model(kind: str) -> None:
    rounds, seed = 4, 3
    res, rows = run(config("fedasync", rounds, LINEAR, seed, alpha=1.0, staleness=kind))
    learner = learners.make(LINEAR)
    model, rng = learner.init(), np.random.default_rng([seed, 1])  # client node 1's ctx.rng
    for _ in range(rounds):
        model = learner.train(model, 0, rng).model
    assert common.digest(res["model"]) == common.digest(model)
    assert [r["staleness"] for r in rows] == [0] * rounds
    assert [r["mix"] for r in rows] == [1.0] * rounds


@given(st.integers(1, 6), st.sampled_from(asyncfl.STALENESS), st.integers(0, 100))
def test_fedasync_one_client_at_a_time_is_never_stale(clients: int, kind: str,
                                                      seed: int) -> None:
    rounds = 6
    res, rows = run(config("fedasync", rounds, flat(clients), seed, stragglers(4.0),
                           alpha=1.0, staleness=kind, concurrency=1))
    # Each version is the last one plus the client's step.
    start = learners.make(flat(clients)).init()["x"]
    want = start
    for _ in range(rounds):
        want = want + np.float32(STEP)
    np.testing.assert_array_equal(res["model"]["x"], want)
    assert [r["staleness"] for r in rows] == [0] * rounds
    assert [r["value"] for r in rows] == list(range(1, rounds + 1))


@given(st.integers(2, 6), st.floats(0.1, 0.9), st.integers(0, 100))
def test_fedasync_mixes_by_alpha_times_staleness_weight(clients: int, alpha: float,
                                                        seed: int) -> None:
    """With flat models every client returns base + STEP; replaying the rows (staleness,
    mix) against the versions sent reproduces the server model."""
    res, rows = run(config("fedasync", 12, flat(clients), seed, stragglers(5.0), alpha=alpha,
                           staleness="hinge", a=1.0, b=1.0))
    s = asyncfl.staleness_fn("hinge", 1.0, 1.0)
    versions = [learners.make(flat(clients)).init()["x"]]
    for r in rows:
        assert r["mix"] == pytest.approx(alpha * s(r["staleness"]))
        base = versions[r["value"] - 1 - r["staleness"]]
        client = base + np.float32(STEP)
        versions.append(np.float32(1 - r["mix"]) * versions[-1] + np.float32(r["mix"]) * client)
    np.testing.assert_allclose(res["model"]["x"], versions[-1], rtol=1e-6)
    assert any(r["staleness"] > 0 for r in rows)


def test_fast_clients_send_more_updates() -> None:
    net = {"latency": 0.01, "compute": {"per_unit": 0.01, "factors": {"1": 1.0, "2": 8.0}}}
    _, rows = run(config("fedasync", 40, dict(LINEAR, clients=2), 0, net, eval_every=0))
    counts = [sum(r["client"] == c for r in rows) for c in (0, 1)]
    assert counts[0] > 4 * counts[1] > 0


# -- FedBuff ---------------------------------------------------------------------------------

@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 5), st.integers(0, 100),
       st.floats(1.0, 6.0))
def test_fedbuff_advances_one_version_per_k_updates(k: int, clients: int, concurrency: int,
                                                    seed: int, spread: float) -> None:
    rounds = 5
    res, rows = run(config("fedbuff", rounds, flat(clients), seed, stragglers(spread),
                           buffer=k, staleness="constant", concurrency=min(concurrency, clients)))
    assert [r["value"] for r in rows] == list(range(1, rounds + 1))
    assert [r["updates"] for r in rows] == [k * v for v in range(1, rounds + 1)]
    assert res["updates"] == k * rounds and res["rounds"] == rounds
    # Every delta is STEP and weights are 1: each step adds exactly STEP.
    want = learners.make(flat(clients)).init()["x"].astype(np.float64) + rounds * STEP
    np.testing.assert_allclose(res["model"]["x"], want, rtol=1e-6)


def test_fedbuff_weighs_stale_deltas_down() -> None:
    cfg = config("fedbuff", 6, flat(4), 1, stragglers(6.0), buffer=3, staleness="polynomial",
                 a=1.0, server_lr=2.0)
    res, rows = run(cfg)
    assert any(r["max_staleness"] > 0 for r in rows)
    full = learners.make(flat(4)).init()["x"].astype(np.float64) + 6 * 2.0 * STEP
    assert (res["model"]["x"] < full - 1e-6).all()


# -- both --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedasync", "fedbuff"])
def test_same_seed_same_model_bytes_and_rows(name: str) -> None:
    wl = dict(LINEAR, clients=5)
    cfg = config(name, 8, wl, 7, stragglers(5.0), buffer=2, concurrency=3)
    if name == "fedasync":
        del cfg["protocol"]["buffer"]
    first, again = run(cfg), run(cfg)
    assert common.digest(first[0]["model"]) == common.digest(again[0]["model"])
    assert first[1] == again[1]
    assert "test_accuracy" in first[0] and "accuracy" in first[1][-1]


@pytest.mark.parametrize(("protocol", "fragment"), [
    ({"name": "fedasync", "alpha": 1.5}, "alpha = 1.5"),
    ({"name": "fedasync", "staleness": "linear"}, "staleness"),
    ({"name": "fedasync", "buffer": 3}, "no key 'buffer'"),
    ({"name": "fedbuff", "buffer": 0}, "buffer = 0"),
    ({"name": "fedbuff", "concurrency": 9}, "concurrency = 9"),
])
def test_bad_async_config_names_the_key(protocol: dict[str, Any], fragment: str) -> None:
    cfg = config("x", 3, flat(2))
    cfg["protocol"] = protocol
    build = asyncfl.build_fedasync if protocol["name"] == "fedasync" else asyncfl.build_fedbuff
    with pytest.raises(ConfigError) as info:
        build(cfg)
    assert fragment in str(info.value)
