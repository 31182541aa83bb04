"""[privacy] in FedAvg on inproc: clipping bounds what one client moves, noise is seeded,
adaptive clipping tracks the quantile, the accountant gets the right event for each sampling
scheme, and epsilon reaches metrics.jsonl and result.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError
from kernel.run import runner
from protocols import privacy
from protocols.common import flatten
from protocols.fedavg import build
from tests.protocols import fedavg_runs
from tests.protocols.fedavg_runs import run


def config(dp: dict[str, Any] | None, clients: int = 10, rounds: int = 3,
           **protocol: Any) -> dict[str, Any]:
    return fedavg_runs.config("privacy", dp, seed=0, test_samples=200, clients=clients,
                              rounds=rounds, **protocol)


@settings(max_examples=8, deadline=None)
@given(clip=st.floats(1e-3, 0.5), k=st.integers(1, 6))
def test_without_noise_one_round_moves_the_model_at_most_clip(clip: float, k: int) -> None:
    cfg = config({"mode": "central", "noise_multiplier": 0.0, "clip": clip}, rounds=1,
                 clients_per_round=k)
    result, rows = run(cfg)
    init = build(cfg).make_node(0).learner.init()  # type: ignore[attr-defined]
    moved = flatten(result["model"]).astype(np.float64) - flatten(init)
    # The mean of k updates each clipped to `clip`, divided by k: at most clip.
    assert np.linalg.norm(moved) <= clip * (1 + 1e-5)
    assert rows[0]["epsilon"] == float("inf") and rows[0]["clip"] == clip


def test_noise_is_seeded_and_moves_the_model() -> None:
    dp = {"mode": "central", "noise_multiplier": 1.0, "clip": 0.5}
    a, rows = run(config(dp))
    b, _ = run(config(dp))
    c, _ = run(config(dict(dp, seed=7)))
    clean, _ = run(config(dict(dp, noise_multiplier=0.0)))
    assert np.array_equal(a["model"]["weight"], b["model"]["weight"])
    assert not np.array_equal(a["model"]["weight"], c["model"]["weight"])
    assert not np.array_equal(a["model"]["weight"], clean["model"]["weight"])
    eps = [r["epsilon"] for r in rows]
    assert eps == sorted(eps) and eps[0] == rows[0]["epsilon_round"] < eps[-1]


def _epsilon(event: Any, count: int, delta: float, relation: Any = None) -> float:
    acc = (rdp.RdpAccountant() if relation is None
           else rdp.RdpAccountant(neighboring_relation=relation))
    acc.compose(dpa.SelfComposedDpEvent(event, count))
    return float(acc.get_epsilon(delta))


def test_fixed_size_sampling_is_accounted_without_replacement_replace_one() -> None:
    _, rows = run(config({"mode": "central", "noise_multiplier": 1.2, "delta": 1e-4},
                         clients_per_round=3, rounds=2))
    event = dpa.SampledWithoutReplacementDpEvent(10, 3, dpa.GaussianDpEvent(0.6))
    want = _epsilon(event, 2, 1e-4, dpa.NeighboringRelation.REPLACE_ONE)
    assert rows[-1]["epsilon"] == pytest.approx(want, rel=1e-9)


def test_poisson_sampling_samples_and_is_accounted_add_remove() -> None:
    dp = {"mode": "central", "noise_multiplier": 1.2, "delta": 1e-4, "sampling": "poisson"}
    _, rows = run(config(dp, fraction=0.3, rounds=6))
    assert len({r["sampled"] for r in rows}) > 1  # a Poisson draw, not a fixed count
    event = dpa.PoissonSampledDpEvent(0.3, dpa.GaussianDpEvent(1.2))
    assert rows[-1]["epsilon"] == pytest.approx(_epsilon(event, 6, 1e-4), rel=1e-9)
    _, pld_rows = run(config(dict(dp, accountant="pld"), fraction=0.3, rounds=1))
    assert 0 < pld_rows[-1]["epsilon"] <= rows[0]["epsilon"]  # PLD is the tighter bound


def test_an_empty_poisson_round_still_adds_noise_and_goes_on() -> None:
    dp = {"mode": "central", "noise_multiplier": 1.0, "sampling": "poisson", "clip": 0.1}
    _, rows = run(config(dp, clients=3, fraction=0.01, rounds=3))
    assert [r["sampled"] for r in rows] == [0, 0, 0]
    assert all(r["aggregated"] for r in rows)
    assert rows[0]["loss"] != rows[2]["loss"]  # the model moved by noise alone


def test_adaptive_clip_follows_the_update_norms() -> None:
    base = {"mode": "central", "noise_multiplier": 0.5, "adaptive": True, "clip_lr": 0.5}
    _, down = run(config(dict(base, clip=100.0), rounds=6))
    _, up = run(config(dict(base, clip=1e-4), rounds=6))
    assert down[-1]["clip"] < 100.0 / 2 and up[-1]["clip"] > 1e-4 * 2
    p = privacy.Privacy.from_config(base, 10, 0, True, None, {})
    assert p is not None and p.z_update > p.z  # the count release takes some of the budget


def test_local_mode_noises_each_client_and_accounts_participations() -> None:
    dp = {"mode": "local", "noise_multiplier": 2.0, "clip": 0.2, "delta": 1e-5}
    _, rows = run(config(dp, clients_per_round=5, rounds=4))
    single = _epsilon(dpa.GaussianDpEvent(1.0), 1, 1e-5)
    assert rows[0]["epsilon_round"] == pytest.approx(single, rel=1e-9)
    assert rows[0]["epsilon"] == pytest.approx(single, rel=1e-9)
    assert rows[-1]["epsilon"] > rows[0]["epsilon"]


def test_epsilon_in_metrics_and_result_json(tmp_path: Path) -> None:
    cfg = config({"mode": "central", "noise_multiplier": 1.0}, clients_per_round=5, rounds=2)
    cfg["run"]["progress"] = False
    runner.run(cfg, tmp_path, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows if r["name"] == "round"]
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(eps) == 2 and result["extra"]["privacy"]["epsilon"] == eps[-1] > 0
    assert result["extra"]["privacy"]["delta"] == pytest.approx(1 / 10**1.1)


@pytest.mark.parametrize("bad, named", [
    ({}, "mode"), ({"mode": "global"}, "mode"), ({"mode": "central", "clip": 0.0}, "clip"),
    ({"mode": "central", "noise_multiplier": -1.0}, "noise_multiplier"),
    ({"mode": "local", "adaptive": True}, "adaptive"),
    ({"mode": "central", "delta": 1.5}, "delta"),
    ({"mode": "central", "accountant": "pld"}, "accountant"),
    ({"mode": "central", "sampling": "poisson"}, "sampling"),
    ({"mode": "local", "sampling": "poisson"}, "sampling"),
    ({"mode": "central", "adaptive": True, "noise_multiplier": 5.0, "count_stddev": 1.0},
     "count_stddev"),
    ({"mode": "central", "epsilon": 1.0}, "epsilon"),
])
def test_bad_privacy_is_refused_naming_the_key(bad: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build(config(bad))


def test_central_dp_refuses_a_robust_aggregator_it_would_replace() -> None:
    with pytest.raises(ConfigError, match="aggregator = 'median'"):
        build(config({"mode": "central"}, aggregator="median"))
    build(config({"mode": "local"}, aggregator="median"))  # local noise, then any rule
