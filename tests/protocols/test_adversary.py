"""[adversary] in FedAvg on inproc: who attacks is seeded and reported per round, each attack
sends what its paper defines, robust aggregators resist what the mean does not, and a
protocol that ignores the section refuses it."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError
from kernel.run import runner
from protocols import adversary, learners
from protocols.fedavg import build
from tests.protocols import fedavg_runs
from tests.protocols.fedavg_runs import LINEAR, run


def config(attack: dict[str, Any] | None, clients: int = 10, rounds: int = 3,
           **protocol: Any) -> dict[str, Any]:
    return fedavg_runs.config("adversary", attack, seed=1, test_samples=400, clients=clients,
                              rounds=rounds, **protocol)


@settings(max_examples=20, deadline=None)
@given(clients=st.integers(2, 60), fraction=st.floats(0, 0.99), seed=st.integers(0, 1000))
def test_malicious_set_is_seeded_and_sized(clients: int, fraction: float, seed: int) -> None:
    a = adversary.Adversary.from_config({"kind": "sign_flip", "fraction": fraction}, clients,
                                        seed)
    b = adversary.Adversary.from_config({"kind": "ipm", "fraction": fraction}, clients, seed)
    assert a is not None and b is not None
    assert a.ids == b.ids  # the kind does not change who attacks
    assert len(a.ids) == round(fraction * clients)
    assert all(1 <= i <= clients for i in a.ids) and list(a.ids) == sorted(set(a.ids))


def test_round_rows_name_the_attackers_among_the_sampled() -> None:
    cfg = config({"kind": "sign_flip", "fraction": 0.3}, clients_per_round=5)
    result, rows = run(cfg)
    ids = set(result["adversary"]["ids"])
    assert len(ids) == 3 and result["adversary"]["kind"] == "sign_flip"
    assert all(set(r["attackers"]) <= ids for r in rows)
    assert any(r["attackers"] for r in rows)
    assert run(cfg)[1] == rows  # seeded: the same rows again


def _replies(n: int = 7, dim: int = 5, seed: int = 0) -> list[tuple[int, float, Any]]:
    rng = np.random.default_rng(seed)
    return [(i, 1.0, {"w": rng.standard_normal(dim).astype(np.float32)})
            for i in range(1, n + 1)]


def test_alie_sends_mean_minus_z_std_of_the_benign() -> None:
    a = adversary.Adversary("alie", (2, 5), seed=0)
    replies = _replies()
    items = a.collude(1, {"w": np.zeros(5, np.float32)}, replies)
    benign = np.stack([m["w"] for i, _, m in replies if i not in (2, 5)]).astype(np.float64)
    n, m = 7, 2
    z = statistics.NormalDist().inv_cdf((n - (n // 2 + 1 - m)) / n)
    want = benign.mean(0) - z * benign.std(0)
    for i, (_, model) in zip(range(1, 8), items):
        if i in (2, 5):
            np.testing.assert_allclose(model["w"], want, rtol=1e-6)
        else:
            assert model["w"] is replies[i - 1][2]["w"]  # benign replies untouched


def test_ipm_reverses_the_benign_mean_update() -> None:
    a = adversary.Adversary("ipm", (1,), seed=0, epsilon=2.0)
    g = {"w": np.ones(5, np.float32)}
    replies = _replies()
    items = a.collude(1, g, replies)
    benign_delta = np.mean([m["w"] - 1 for i, _, m in replies if i != 1], axis=0)
    np.testing.assert_allclose(items[0][1]["w"] - 1, -2.0 * benign_delta, rtol=1e-5)
    assert float(np.dot(items[0][1]["w"] - 1, benign_delta)) < 0


def test_sign_flip_and_gaussian_on_the_update() -> None:
    g = {"w": np.full(4, 1.0, np.float32)}
    t = {"w": np.array([1.5, 0.5, 1.0, 2.0], np.float32)}
    flip = adversary.Adversary("sign_flip", (3,), seed=0, scale=2.0)
    np.testing.assert_allclose(flip.poison(g, t, 3, 1)["w"], [0.0, 2.0, 1.0, -1.0])
    gauss = adversary.Adversary("gaussian", (3,), seed=0, scale=0.5)
    a, b = gauss.poison(g, t, 3, 1)["w"], gauss.poison(g, t, 3, 2)["w"]
    assert not np.array_equal(a, b)  # a fresh draw per round ...
    np.testing.assert_array_equal(a, gauss.poison(g, t, 3, 1)["w"])  # ... seeded


def test_label_flip_trains_the_attacker_on_reversed_labels_only() -> None:
    learner = learners.make(dict(LINEAR, clients=4))
    a = adversary.Adversary("label_flip", (2,), seed=0)
    twin = a.flipped(learner)
    x, y = learner.data.client(1)
    fx, fy = twin.data.client(1)
    assert fx is x and np.array_equal(fy, 3 - y)
    assert np.array_equal(learner.data.client(1)[1], y)  # the honest data is untouched
    assert a.flipped(learner) is twin


@pytest.mark.parametrize("kind", ["sign_flip", "alie", "ipm", "label_flip", "gaussian"])
def test_attacks_hurt_the_mean_and_change_the_model(kind: str) -> None:
    attack = {"kind": kind, "fraction": 0.3, "scale": 3.0, "epsilon": 5.0}
    clean, _ = run(config(None, rounds=4))
    hit, rows = run(config(attack, rounds=4))
    assert any(r["attackers"] for r in rows)
    assert not np.array_equal(clean["model"]["weight"], hit["model"]["weight"])
    if kind in ("sign_flip", "ipm", "gaussian"):
        assert hit["test_accuracy"] < clean["test_accuracy"]


def test_median_resists_sign_flip_that_breaks_the_mean() -> None:
    attack = {"kind": "sign_flip", "fraction": 0.3, "scale": 10.0}
    mean, _ = run(config(attack, rounds=5))
    med, _ = run(config(attack, rounds=5, aggregator="median"))
    assert med["test_accuracy"] > mean["test_accuracy"] + 0.1


@pytest.mark.parametrize("bad, named", [
    ({"fraction": 0.2}, "kind"), ({"kind": "sybil", "fraction": 0.2}, "kind"),
    ({"kind": "alie"}, "fraction or ids"), ({"kind": "alie", "fraction": 1.0}, "fraction"),
    ({"kind": "alie", "fraction": 0.1, "ids": [1]}, "fraction or ids"),
    ({"kind": "alie", "ids": [0]}, "ids"), ({"kind": "alie", "ids": [11]}, "ids"),
    ({"kind": "gaussian", "ids": [1], "scale": -1.0}, "scale"),
    ({"kind": "alie", "ids": [1], "fracton": 0.1}, "fracton"),
])
def test_bad_adversary_is_refused_naming_the_key(bad: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build(config(bad))


def test_a_protocol_that_ignores_the_section_refuses_it() -> None:
    cfg = {"run": {"seed": 0, "rounds": 1, "progress": False},
           "protocol": {"name": "fedasync"}, "workload": dict(LINEAR, clients=3),
           "adversary": {"kind": "sign_flip", "fraction": 0.3}}
    with pytest.raises(ConfigError, match=r"\[adversary\] is not honoured by protocol"):
        runner.run(cfg, quiet=True)


@pytest.mark.parametrize("protocol", [
    {"name": "fedavg", "mu": 0.1, "server_opt": "avgm"},
    {"name": "fedavg", "server_opt": "adam", "aggregator": "trimmed_mean",
     "aggregator_args": {"f": 2}},
    {"name": "fedavg_ef"},
])
def test_every_fedavg_variant_is_attacked_and_reports_it(protocol: dict[str, Any]) -> None:
    cfg = config({"kind": "ipm", "fraction": 0.3, "epsilon": 5.0}, rounds=2)
    cfg["protocol"] = dict(protocol, clients_per_round=6)
    cfg["run"]["progress"] = False
    if protocol["name"] == "fedavg_ef":
        cfg["codec"] = {"stages": {"update": ["topk"]}}
    clean = dict(cfg)
    del clean["adversary"]
    hit, want = runner.execute(cfg, quiet=True), runner.execute(clean, quiet=True)
    rows = [r for r in hit.rows if r["name"] == "round"]
    assert any(r["attackers"] for r in rows)
    assert hit.result["final_model_sha256"] != want.result["final_model_sha256"]
