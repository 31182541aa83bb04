"""FedAvg on inproc (strict: every message through the codec): W1 learns, the aggregate is the
sample-weighted mean, runs replay exactly, deadlines drop stragglers, the variants differ."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.api import Context
from kernel.messages import Message
from kernel.options import ConfigError
from protocols import aggregators, common, learners
from protocols.fedavg import build
from transports.base import Job
from transports.inproc import InprocTransport

ROOT = Path(__file__).resolve().parents[2]
# The numpy learner: milliseconds per client, so properties can run many small federations.
LINEAR = {"model": "linear", "input_dim": 16, "classes": 4, "samples_per_client": 24,
          "batch_size": 8, "lr": 0.1, "test_samples": 64}


def config(rounds: int = 2, seed: int = 0, workload: dict[str, Any] | None = None,
           network: dict[str, Any] | None = None, **protocol: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run": {"seed": seed, "rounds": rounds},
        "transport": {"kind": "inproc"},
        "protocol": {"name": "fedavg", **protocol},
        "workload": dict(LINEAR, clients=4) if workload is None else workload,
    }
    if network is not None:
        cfg["network"] = network
    return cfg


def run(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    job = Job(config=cfg, deployment=build(cfg), seed=cfg["run"]["seed"], until=1e6,
              on_metric=rows.append)
    outcome = InprocTransport({"strict": True}).run(job)
    assert outcome.reason == "finished", outcome
    assert outcome.result is not None
    return dict(outcome.result), rows


def rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["name"] == "round"]


def test_w1_learns():
    cfg = tomllib.loads((ROOT / "perf/workloads/w1.toml").read_text())
    result, rows = run(cfg)
    acc = [r["accuracy"] for r in rounds(rows)]
    assert [r["value"] for r in rounds(rows)] == [1, 2, 3, 4, 5]
    assert all(r["clients"] == 10 and r["late"] == 0 for r in rounds(rows))
    assert acc == sorted(acc) and acc[0] < 0.5
    assert result["test_accuracy"] == acc[-1] > 0.8
    assert result["rounds"] == 5
    assert sum(a.size for a in result["model"].values()) == 203_530


@given(clients=st.integers(1, 7), seed=st.integers(0, 2**31 - 1),
       samples_min=st.integers(1, 24), per_round=st.integers(1, 7))
@settings(max_examples=25)
def test_aggregate_is_the_sample_weighted_mean(clients, seed, samples_min, per_round):
    # One round, computed again centrally from the same client updates.
    workload = dict(LINEAR, clients=clients, samples_min=samples_min)
    cfg = config(rounds=1, seed=seed, workload=workload,
                 clients_per_round=min(per_round, clients))
    result, rows = run(cfg)
    learner = learners.make(workload)
    start = learner.init()
    sampled = common.sample(np.random.default_rng([seed, 0]), range(1, clients + 1),
                            count=min(per_round, clients))
    assert rounds(rows)[0]["clients"] == len(sampled)
    updates = [learner.train(start, node - 1, common.derive_rng(seed, node, 1)).model
               for node in sampled]
    weights = [learner.samples(node - 1) for node in sampled]
    for name, value in result["model"].items():
        expect = np.average(np.stack([u[name] for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(value, expect, rtol=1e-6, atol=1e-7)


@given(seed=st.integers(0, 2**31 - 1), lr=st.floats(0.01, 0.5))
@settings(max_examples=10)
def test_one_client_one_step_is_plain_sgd(seed, lr):
    workload = {"model": "mlp", "input_dim": 10, "hidden": 5, "classes": 3, "clients": 1,
                "samples_per_client": 6, "batch_size": 6, "lr": lr, "test_samples": 0}
    result, _ = run(config(rounds=1, seed=seed, workload=workload))
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x, y = learners.make(workload).data.client(0)
    torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    torch.optim.SGD(net.parameters(), lr=lr).step()
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(result["model"][name], value.numpy(), rtol=1e-5, atol=1e-6)


def test_same_seed_same_model_and_metrics():
    workload = {"model": "mlp", "input_dim": 20, "hidden": 8, "classes": 4, "clients": 6,
                "samples_per_client": 32, "test_samples": 50, "samples_min": 8}
    cfg = config(rounds=3, seed=11, workload=workload, fraction=0.5)
    (a, rows_a), (b, rows_b) = run(copy.deepcopy(cfg)), run(copy.deepcopy(cfg))
    assert common.digest(a["model"]) == common.digest(b["model"])
    assert rows_a == rows_b
    c, _ = run(config(rounds=3, seed=12, workload=workload, fraction=0.5))
    assert common.digest(c["model"]) != common.digest(a["model"])


# Clients compute 0.001 s per sample; node 4 is 20x slower (0.48 s for 24 samples); the
# deadline tests use 0.3 s, so node 4 misses every round.
SLOW_NODE_4 = {"compute": {"per_unit": 0.001, "factors": {"4": 20.0}}}


def test_late_replies_are_counted_and_never_mixed_in():
    result, rows = run(config(rounds=2, network=SLOW_NODE_4, round_timeout=0.3))
    per_round = rounds(rows)
    assert [(r["clients"], r["sampled"], r["aggregated"]) for r in per_round] == [(3, 4, True)] * 2
    # Node 4's round-1 reply reaches the server during round 2: late, logged, discarded.
    assert per_round[1]["late"] == 1 and result["late"] == 1
    late = [r for r in rows if r["name"] == "late"]
    assert [(r["src"], r["round"], r["current"]) for r in late] == [(4, 1, 2)]
    # The final model is FedAvg over nodes 1-3 alone, round after round.
    learner = learners.make(dict(LINEAR, clients=4))
    model = learner.init()
    for r in (1, 2):
        items = [(float(learner.samples(n - 1)),
                  learner.train(model, n - 1, common.derive_rng(0, n, r)).model) for n in (1, 2, 3)]
        model = aggregators.weighted_mean(items)
    for name in model:
        np.testing.assert_array_equal(result["model"][name], model[name])


def test_min_replies_not_met_keeps_the_model():
    result, rows = run(config(rounds=2, network=SLOW_NODE_4, round_timeout=0.3, min_replies=4))
    assert [r["aggregated"] for r in rounds(rows)] == [False, False]
    assert [r["clients"] for r in rounds(rows)] == [3, 3]
    start = learners.make(dict(LINEAR, clients=4)).init()
    assert common.digest(result["model"]) == common.digest(start)


def test_without_a_deadline_the_server_waits_for_stragglers():
    _, rows = run(config(rounds=2, network=SLOW_NODE_4))
    assert [(r["clients"], r["late"]) for r in rounds(rows)] == [(4, 0), (4, 0)]
    assert rounds(rows)[-1]["t"] == pytest.approx(0.96)


def test_duplicated_messages_change_nothing():
    # Every message arrives twice: clients train twice (identically) and every reply has a
    # copy; copies are discarded (as duplicates, or as late once their round is over).
    clean, _ = run(config(rounds=3))
    dup, rows = run(config(rounds=3, network={"duplicate": 1.0, "latency": 0.01}))
    assert common.digest(dup["model"]) == common.digest(clean["model"])
    assert all(r["clients"] == 4 for r in rounds(rows))
    discarded = [r for r in rows if r["name"] in ("late", "duplicate")]
    assert discarded and all(r["round"] <= r["current"] for r in discarded)


def test_variants_run_and_differ_from_plain_fedavg():
    five = dict(LINEAR, clients=5)  # 5, so that median and trimmed mean differ
    plain, _ = run(config(rounds=3, workload=five))
    digests = {"plain": common.digest(plain["model"])}
    variants: dict[str, dict[str, Any]] = {
        "fedprox": {"mu": 1.0},
        "avgm": {"server_opt": "avgm", "momentum": 0.9},
        "adam": {"server_opt": "adam", "server_lr": 0.05},
        "median": {"aggregator": "median"},
        "trimmed": {"aggregator": "trimmed_mean", "aggregator_args": {"f": 1}},
    }
    for name, extra in variants.items():
        result, rows = run(config(rounds=3, workload=five, **extra))
        assert all(np.isfinite(a).all() for a in result["model"].values()), name
        assert len(rounds(rows)) == 3, name
        digests[name] = common.digest(result["model"])
    assert len(set(digests.values())) == len(digests), digests


def test_server_optimisers_follow_their_update_rules():
    # FedAvgM with no momentum and lr 1 is FedAvg; FedAdam's first step is
    # x + lr * (1-b1) d / (sqrt(b2 tau^2 + (1-b2) d^2) + tau), d = aggregate - x.
    plain, _ = run(config(rounds=1))
    avgm, _ = run(config(rounds=1, server_opt="avgm", momentum=0.0, server_lr=1.0))
    adam, _ = run(config(rounds=1, server_opt="adam", server_lr=0.05, betas=[0.8, 0.9], tau=0.01))
    start = learners.make(dict(LINEAR, clients=4)).init()
    for name, x in start.items():
        x = x.astype(np.float64)
        d = plain["model"][name] - x
        np.testing.assert_allclose(avgm["model"][name], plain["model"][name], rtol=1e-6,
                                   atol=1e-7)
        expect = x + 0.05 * 0.2 * d / (np.sqrt(0.9 * 1e-4 + 0.1 * d**2) + 0.01)
        np.testing.assert_allclose(adam["model"][name], expect, rtol=1e-5, atol=1e-7)


def test_eval_every_and_no_test_set():
    _, rows = run(config(rounds=4, eval_every=3))
    assert [r["accuracy"] is not None for r in rounds(rows)] == [False, False, True, True]
    flat = {"model": "flat", "clients": 3, "flat_size": 100}
    result, rows = run(config(rounds=2, workload=flat))
    start = learners.make(flat).init()["x"]
    np.testing.assert_allclose(result["model"]["x"], start + np.float32(0.002), rtol=1e-6)
    assert "test_accuracy" not in result and rounds(rows)[0]["accuracy"] is None


@pytest.mark.parametrize(("protocol", "message"), [
    ({"fractoin": 0.5}, r"\[protocol\] has no key 'fractoin'; did you mean 'fraction'"),
    ({"fraction": 1.5}, r"\[protocol\] fraction = 1.5; expected a number in \(0, 1\]"),
    ({"clients_per_round": 9}, r"\[protocol\] clients_per_round = 9; expected an integer in 1..4"),
    ({"server_opt": "sgd"}, r"\[protocol\] server_opt = 'sgd' is not allowed"),
    ({"aggregator": "avg"}, r"\[protocol\] aggregator = 'avg'"),
    ({"aggregator": "krum", "aggregator_args": {"q": 1}}, r"aggregator_args\.q"),
    ({"round_timeout": -1}, r"\[protocol\] round_timeout = -1; expected a number > 0"),
    ({"betas": [0.9]}, r"\[protocol\] betas = \[0.9\]; expected two numbers"),
    ({"fraction": 0.5, "clients_per_round": 2}, r"fraction or clients_per_round, not both"),
])
def test_config_errors_name_the_key(protocol, message):
    with pytest.raises(ConfigError, match=message):
        build(config(**protocol))


def test_rounds_must_be_given():
    cfg = config()
    del cfg["run"]["rounds"]
    with pytest.raises(ConfigError, match=r"\[run\] rounds = None"):
        build(cfg)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), spread=st.floats(0.0, 2.0))
def test_streamed_mean_equals_gathered_mean_whatever_the_arrival_order(seed, spread):
    """`mean` sums each reply as it arrives (in an order the jitter picks); multi_krum with
    f = 0 keeps all replies and averages them at the end in its own order. Both are the exact
    mean, so the models are the same bits."""
    net = {"latency": {"kind": "uniform", "low": 0.0, "high": 0.01 + spread}}
    streamed, _ = run(config(rounds=3, seed=seed, network=net, aggregator="mean"))
    gathered, _ = run(config(rounds=3, seed=seed, network=net, aggregator="multi_krum",
                             aggregator_args={"f": 0}))
    assert common.digest(streamed["model"]) == common.digest(gathered["model"])


def test_server_holds_a_sum_not_the_replies():
    cfg = config(rounds=1, workload=dict(LINEAR, clients=6))
    dep = build(cfg)
    server = dep.make_node(0)
    assert server.stream is not None  # weighted_mean: replies are summed as they come
    result, rows = run(cfg)
    assert rounds(rows)[0]["clients"] == 6
    kept = build(config(rounds=1, aggregator="median")).make_node(0)
    assert kept.stream is None


class _Recording(Context):
    """A node's context that records what the node does, for checking the order of its acts."""

    def __init__(self, node: int, n_nodes: int, log: list[tuple[Any, ...]]) -> None:
        self.id, self.n_nodes, self.neighbours, self.params = node, n_nodes, (), {}
        self.log, self._rng = log, np.random.default_rng(node)

    @property
    def now(self) -> float:
        return 0.0

    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    def send(self, dst: int, kind: str, **body: Any) -> None:
        self.log.append(("send", self.id, dst, kind, body))

    def multicast(self, dsts: Any, kind: str, **body: Any) -> None:
        self.log.append(("multicast", body["round"], list(dsts), kind, body))

    def set_timer(self, delay: float, key: Any) -> None:
        pass

    def cancel_timer(self, key: Any) -> None:
        pass

    def compute(self, work: float = 1.0, label: str = "train") -> float:
        return 0.0

    def emit(self, name: str, value: Any, **fields: Any) -> None:
        self.log.append(("emit", name, value))

    def finish(self, result: Any) -> None:
        self.log.append(("finish",))


class _SpyLearner:
    def __init__(self, inner: Any, log: list[tuple[Any, ...]]) -> None:
        self.inner, self.log = inner, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def evaluate(self, model: Any, client: int | None = None) -> Any:
        self.log.append(("evaluate", client))
        return self.inner.evaluate(model, client=client)


@pytest.mark.parametrize("holdout", [0.0, 0.25])
def test_the_next_rounds_requests_leave_before_this_round_is_evaluated(holdout: float) -> None:
    # On parallel shards evaluating the model then overlaps the clients' training; the rows
    # and the run's result must be those of evaluating first.
    cfg = config(rounds=3, clients_per_round=2)
    if holdout:  # and every client is scored each round
        cfg["workload"] = {"model": "logreg", "clients": 4, "batch_size": 8}
        cfg["data"] = {"holdout": holdout}
    dep = build(cfg)
    log: list[tuple[Any, ...]] = []
    server = dep.make_node(0)
    server.learner = _SpyLearner(server.learner, log)
    ctx = _Recording(0, len(dep.node_ids), log)
    server.on_start(ctx)
    start = -1
    for rnd in (1, 2, 3):
        request = [e for e in log if e[0] == "multicast" and e[1] == rnd][-1]
        for dst in request[2]:
            replies: list[tuple[Any, ...]] = []
            msg = Message(0, dst, "train", request[4], 0.0)
            dep.make_node(dst).on_message(_Recording(dst, len(dep.node_ids), replies), msg)
            (_, src, _, kind, body), = replies
            server.on_message(ctx, Message(src, 0, kind, body, 0.0))
        end = next(i for i, e in enumerate(log) if e[:3] == ("emit", "round", rnd))
        evaluated = [i for i, e in enumerate(log) if start < i < end and e[0] == "evaluate"]
        assert len(evaluated) == 1 + (4 if holdout else 0)
        nxt = [i for i, e in enumerate(log) if e[0] == "multicast" and e[1] == rnd + 1]
        if rnd < 3:
            assert len(nxt) == 1 and start < nxt[0] < min(evaluated)
        else:
            assert not nxt and log[-1] == ("finish",)
        start = end
