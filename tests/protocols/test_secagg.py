"""SecAgg+ on inproc (strict: every message through the codec): the unmasked sum is exactly the
sum of the surviving clients' quantised updates under crashes and losses, a lone masked input
looks uniform on the ring, too few survivors fail the round cleanly, and the pieces (Shamir,
AEAD, masks) do what they say."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.api import Deployment
from kernel.options import ConfigError
from protocols import fedavg, learners, threats
from protocols.common import digest
from protocols.secagg import crypto, shamir
from protocols.secagg.protocol import Options, build, client_vector, graph
from transports.base import Job
from transports.inproc import InprocTransport

LINEAR = {"model": "linear", "input_dim": 16, "classes": 4, "samples_per_client": 24,
          "samples_min": 8, "batch_size": 8, "lr": 0.1, "test_samples": 64}


def config(clients: int = 6, rounds: int = 1, network: dict[str, Any] | None = None,
           workload: dict[str, Any] | None = None, **protocol: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run": {"seed": 0, "rounds": rounds}, "transport": {"kind": "inproc"},
        "protocol": {"name": "secaggplus", **protocol},
        "workload": dict(workload or LINEAR, clients=clients)}
    if network is not None:
        cfg["network"] = network
    return cfg


def run(cfg: dict[str, Any], dep: Deployment | None = None
        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    job = Job(config=cfg, deployment=dep or build(cfg), seed=cfg["run"]["seed"], until=1e6,
              on_metric=rows.append)
    out = InprocTransport({"strict": True}).run(job)
    assert out.reason == "finished", out
    return dict(out.result or {}), rows


def expected_sha(cfg: dict[str, Any], ids: list[int]) -> str:
    """sha256 of the ring sum of the clients' vectors, computed here from each client alone
    (round 1: the global model is the initial one)."""
    learner = learners.make(cfg["workload"])
    o = Options.from_config(cfg["protocol"], learner)
    guard = threats.Guard()
    total = None
    for node in ids:
        v = client_vector(o, learner, guard, cfg["run"]["seed"], node, 1, learner.init())
        total = v if total is None else total + v
    assert total is not None
    return hashlib.sha256(total.tobytes()).hexdigest()


def rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["name"] == "round"]


# -- the protocol ----------------------------------------------------------------------------

# Latency 1 s: setup arrives at 1, keys at 2 ... without waits a client sends its masked input
# at 5 and its unmasking shares at 7; a stage that waits for a crashed client until its
# deadline delays the later ones. Crash times pick the stage a client drops out in.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 7), data=st.data())
def test_crashes_sum_is_exact_whenever_threshold_survive(n: int, data: Any) -> None:
    crashed = data.draw(st.lists(st.integers(1, n), unique=True, max_size=n), label="crashed")
    at = {c: data.draw(st.sampled_from([0.5, 2.5, 4.5, 6.5]), label=f"at{c}") for c in crashed}
    t = data.draw(st.integers(2, n), label="threshold")
    net = {"latency": 1.0, "crashes": [{"node": c, "at": at[c]} for c in crashed]}
    cfg = config(n, network=net, threshold=t, round_timeout=3.0)
    _, rows = run(cfg)
    (row,) = rounds(rows)
    survivors = n - len(crashed)
    assert row["aggregated"] == (survivors >= t)
    if row["aggregated"]:
        # Every client that never crashed is in the sum, and so may be one that crashed after
        # sending its masked input (when, depends on how long earlier stages waited).
        inc = row["included"]
        assert set(range(1, n + 1)) - set(crashed) <= set(inc)
        assert all(at[c] > 4 for c in inc if c in at)
        assert row["sum_sha256"] == expected_sha(cfg, inc)
    else:
        fails = [r for r in rows if r["name"] == "secagg_failed"]
        assert len(fails) == 1 and "threshold" in fails[0]["reason"]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 8), loss=st.sampled_from([0.05, 0.15, 0.3]), seed=st.integers(0, 99),
       k=st.sampled_from([0, 2]))
def test_losses_never_hang_and_an_unmasked_sum_is_exact(n: int, loss: float, seed: int,
                                                        k: int) -> None:
    net = {"latency": {"kind": "uniform", "low": 0.5, "high": 1.5}, "loss": loss,
           "duplicate": 0.1}
    cfg = config(n, rounds=2, network=net, threshold=2, neighbours=k, round_timeout=3.0)
    cfg["run"]["seed"] = seed
    _, rows = run(cfg)
    got = rounds(rows)
    assert [r["value"] for r in got] == [1, 2]
    fails = {r["value"] for r in rows if r["name"] == "secagg_failed"}
    assert {r["value"] for r in got if not r["aggregated"]} == fails
    if got[0]["aggregated"]:
        assert got[0]["sum_sha256"] == expected_sha(cfg, got[0]["included"])


def test_sparse_graph_recovers_dropped_neighbours_exactly() -> None:
    # 12 clients on a 4-regular graph; two drop after sharing keys (their pairwise masks must
    # be rebuilt from their key shares), one after sending its masked input.
    net = {"latency": 1.0, "crashes": [{"node": 3, "at": 4.5}, {"node": 8, "at": 4.5},
                                       {"node": 5, "at": 6.5}]}
    cfg = config(12, network=net, neighbours=4, threshold=3, round_timeout=3.0)
    _, rows = run(cfg)
    (row,) = rounds(rows)
    assert row["aggregated"] and row["stages"] == [12, 12, 10, 9]
    assert row["included"] == [i for i in range(1, 13) if i not in (3, 8)]
    assert row["sum_sha256"] == expected_sha(cfg, row["included"])


def test_without_dropouts_it_is_fedavg_up_to_quantisation() -> None:
    cfg = config(8, rounds=3, clients_per_round=5)  # the same clients sampled as FedAvg's
    result, rows = run(cfg)
    fcfg = config(8, rounds=3)
    fcfg["protocol"] = {"name": "fedavg", "clients_per_round": 5}
    fres = []
    job = Job(config=fcfg, deployment=fedavg.build(fcfg), seed=0, until=1e6,
              on_metric=fres.append)
    ref = InprocTransport({"strict": True}).run(job).result
    assert ref is not None
    for k in ref["model"]:
        np.testing.assert_allclose(result["model"][k], ref["model"][k], atol=1e-5)
    assert all(r["aggregated"] and r["stages"] == [5, 5, 5, 5] for r in rounds(rows))


def test_below_threshold_every_round_fails_cleanly_and_the_run_ends() -> None:
    net = {"crashes": [{"node": c, "at": 0.0} for c in (1, 2, 3, 4)]}
    result, rows = run(config(6, rounds=2, network=net, threshold=3, round_timeout=2.0))
    fails = [r for r in rows if r["name"] == "secagg_failed"]
    assert [(r["value"], r["stage"]) for r in fails] == [(1, "sa_keys"), (2, "sa_keys")]
    assert [r["aggregated"] for r in rounds(rows)] == [False, False]
    assert digest(result["model"]) == digest(learners.make(dict(LINEAR, clients=6)).init())


def _chi2_uniform_bytes(y: np.ndarray) -> bool:
    """True when every byte position of the uint64 elements passes a chi-square test of
    uniformity over 256 bins (p > 0.001 each, Bonferroni over 8 positions)."""
    b = y.view(np.uint8).reshape(-1, 8)
    df, z = 255, 3.54  # z of p = 0.001 / 8
    crit = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    for pos in range(8):
        counts = np.bincount(b[:, pos], minlength=256)
        e = len(b) / 256
        if ((counts - e) ** 2 / e).sum() > crit:
            return False
    return True


def test_a_masked_input_is_uniform_on_the_ring() -> None:
    cfg = config(4, workload=dict(LINEAR, input_dim=2048, test_samples=0))
    dep = build(cfg)
    seen: dict[int, np.ndarray] = {}
    make = dep.make_node

    def spy(i: int) -> Any:
        node = make(i)
        if i == 0:
            inner = node.on_message

            def on_message(ctx: Any, msg: Any) -> None:
                if msg.kind == "sa_masked":
                    seen[msg.src] = np.array(msg.y)
                inner(ctx, msg)
            node.on_message = on_message
        return node

    _, rows = run(cfg, Deployment(dep.node_ids, spy, dep.neighbours, dep.params))
    assert sorted(seen) == [1, 2, 3, 4] and rounds(rows)[0]["aggregated"]
    learner = learners.make(cfg["workload"])
    o = Options.from_config(cfg["protocol"], learner)
    for node, y in seen.items():
        x = client_vector(o, learner, threats.Guard(), 0, node, 1, learner.init())
        assert not _chi2_uniform_bytes(x)  # the test can fail: plain inputs are far from it
        assert _chi2_uniform_bytes(y), node


@pytest.mark.parametrize("bad, named", [
    ({"threshold": 1}, "threshold"), ({"threshold": 1.5}, "threshold"),
    ({"threshold": "half"}, "threshold"), ({"threshold": -0.5}, "threshold"),
    ({"neighbours": 3}, "neighbours"), ({"aggregator": "median"}, "aggregator"),
    ({"min_replies": 2}, "min_replies"), ({"frac_bits": 60}, "frac_bits"),
    ({"clip_range": 0.0}, "clip_range"), ({"thresold": 2}, "thresold"),
    ({"threshold": 7}, "threshold = 7 exceeds the 6 clients"),
    ({"threshold": 4, "neighbours": 2}, "exceeds the 3 share holders"),
])
def test_bad_options_are_refused_naming_the_key(bad: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build(config(**bad))


def test_threshold_as_a_fraction_of_holders() -> None:
    learner = learners.make(dict(LINEAR, clients=10))
    o = Options.from_config({"threshold": 0.5}, learner)
    assert [o.holders_threshold(h) for h in (4, 5, 10)] == [2, 3, 5]
    o = Options.from_config({}, learner)
    assert [o.holders_threshold(h) for h in (4, 5, 10)] == [3, 3, 6]  # a majority
    _, rows = run(config(6, threshold=0.5))
    assert rounds(rows)[0]["aggregated"]


def test_colluding_attacks_and_central_dp_are_refused() -> None:
    cfg = config()
    cfg["adversary"] = {"kind": "alie", "fraction": 0.2}
    with pytest.raises(ConfigError, match="adversary"):
        build(cfg)
    cfg = config()
    cfg["privacy"] = {"mode": "central"}
    with pytest.raises(ConfigError, match="local"):
        build(cfg)


# -- the pieces ------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=1, max_size=64), n=st.integers(1, 12), data=st.data())
def test_shamir_any_t_shares_recover_and_fewer_do_not(secret: bytes, n: int, data: Any) -> None:
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.permutations(range(1, n + 1)))
    shares = shamir.split(secret, holders, t, np.random.default_rng(0))
    pick = data.draw(st.permutations(list(zip(holders, shares))))
    assert shamir.combine(pick[:t], t, len(secret)) == secret
    if t > 1:
        with pytest.raises(shamir.ShamirError):
            shamir.combine(pick[:t - 1], t, len(secret))


def test_key_agreement_sealing_and_masks() -> None:
    a_sk, a_pk = crypto.keypair(bytes(range(32)))
    b_sk, b_pk = crypto.keypair(bytes(range(1, 33)))
    k1, k2 = crypto.agree(a_sk, b_pk, b"enc"), crypto.agree(b_sk, a_pk, b"enc")
    assert k1 == k2 != crypto.agree(a_sk, b_pk, b"mask")
    ct = crypto.seal(k1, 1, 2, 7, b"share")
    assert crypto.unseal(k2, 1, 2, 7, ct) == b"share"
    assert crypto.unseal(k2, 2, 1, 7, ct) is None  # another header
    assert crypto.unseal(k2, 1, 2, 7, ct[:-1] + bytes([ct[-1] ^ 1])) is None  # tampered
    acc = np.arange(3_000_000, dtype=np.uint64)
    crypto.add_mask(acc, k1, 1)
    assert not np.array_equal(acc, np.arange(3_000_000, dtype=np.uint64))
    np.testing.assert_array_equal(acc[:10], np.arange(10, dtype=np.uint64)
                                  + crypto.expand(k1, 10))
    crypto.add_mask(acc, k1, -1)
    np.testing.assert_array_equal(acc, np.arange(3_000_000, dtype=np.uint64))


def test_graph_is_regular_symmetric_and_seeded() -> None:
    clients = list(range(1, 41))
    g = graph(clients, 6, seed=3)
    assert all(len(v) == 6 and c not in v for c, v in g.items())
    assert all(c in g[d] for c, v in g.items() for d in v)
    assert g == graph(clients, 6, seed=3) != graph(clients, 6, seed=4)
    assert graph(clients[:5], 6, seed=0)[1] == [2, 3, 4, 5]


@pytest.mark.ray
@pytest.mark.grpc
@pytest.mark.slow
@pytest.mark.parametrize("protocol, threats", [
    ("secaggplus", {"adversary": {"kind": "gaussian", "ids": [2]},
                    "privacy": {"mode": "local", "noise_multiplier": 0.1, "clip": 5.0}}),
    ("fedavg", {"adversary": {"kind": "alie", "fraction": 0.4},
                "privacy": {"mode": "central", "adaptive": True, "sampling": "poisson"}}),
])
def test_same_model_on_inproc_ray_and_grpc(protocol: str, threats: dict[str, Any]) -> None:
    from kernel.run import runner

    shas, rows = {}, {}
    for kind in ("inproc", "grpc", "ray"):
        cfg = config(5, rounds=2, **({"threshold": 3} if protocol == "secaggplus" else {}))
        cfg["protocol"]["name"] = protocol
        if protocol == "fedavg":
            cfg["protocol"]["fraction"] = 0.6
        cfg["transport"] = {"kind": kind}
        cfg["run"]["progress"] = False
        cfg.update(threats)
        rec = runner.execute(cfg, quiet=True)
        assert rec.result["reason"] == "finished", (kind, rec.result)
        shas[kind] = rec.result["final_model_sha256"]
        rows[kind] = [{k: v for k, v in r.items() if k not in ("t", "wall_s")}
                      for r in rec.rows if r["name"] == "round"]
    assert shas["grpc"] == shas["ray"] == shas["inproc"] is not None
    assert rows["grpc"] == rows["ray"] == rows["inproc"]


@settings(max_examples=30, deadline=None)
@given(vals=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=300),
       bits=st.integers(1, 30), block=st.sampled_from([1, 7, 64, 1 << 15]))
def test_quantise_is_round_of_clipped_scaled_values(vals: list[float], bits: int,
                                                    block: int) -> None:
    v = np.array(vals, np.float64)
    want = np.rint(np.clip(v, -64.0, 64.0) * 2.0**bits).astype(np.int64)
    got = crypto.quantise(v, bits, 64.0, block=block)
    np.testing.assert_array_equal(got.view(np.int64), want)
    np.testing.assert_allclose(crypto.dequantise(got, bits), np.clip(v, -64, 64),
                               atol=2.0 ** -bits)
