"""SCAFFOLD, FedNova, FedDyn and the FedYogi / FedAdagrad server optimisers: each against a
reference written out here in float64 numpy on the `linear` learner (local SGD included), each
reducing to FedAvg where its paper says it does, SCAFFOLD's and FedDyn's server state equal to
the mean of their clients' state (duplicates, deadlines, late replies), crashes, and
checkpoint/resume with client state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError
from kernel.registry import load
from kernel.run import checkpoint as ckpt
from kernel.run.runner import execute
from protocols import common, fedavg, learners
from tests.kernel.run.interrupt import InterruptAt
from transports.base import Job
from transports.inproc import InprocTransport

# Unequal sample counts (so unequal local steps and weights), two epochs, small batches.
LINEAR = {"model": "linear", "input_dim": 6, "classes": 3, "samples_per_client": 20,
          "samples_min": 5, "batch_size": 4, "lr": 0.1, "epochs": 2, "test_samples": 40}
PROTOCOLS = ("scaffold", "fednova", "feddyn")


def config(name: str = "fedavg", rounds: int = 2, seed: int = 0, clients: int = 3,
           workload: Mapping[str, Any] | None = None, network: Mapping[str, Any] | None = None,
           **protocol: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run": {"seed": seed, "rounds": rounds},
        "transport": {"kind": "inproc"},
        "protocol": {"name": name, **protocol},
        "workload": dict(workload or LINEAR, clients=clients),
    }
    if network is not None:
        cfg["network"] = dict(network)
    return cfg


def run(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, Any]]:
    """Run on strict inproc; also return the node objects (the latest of each id)."""
    dep = load("protocols", cfg["protocol"]["name"])(cfg)
    nodes: dict[int, Any] = {}

    def make(i: int) -> Any:
        nodes[i] = dep.make_node(i)
        return nodes[i]

    rows: list[dict[str, Any]] = []
    job = Job(config=cfg, deployment=dataclasses.replace(dep, make_node=make),
              seed=cfg["run"]["seed"], until=1e6, on_metric=rows.append)
    out = InprocTransport({"strict": True}).run(job)
    assert out.reason == "finished", out
    assert out.result is not None
    return dict(out.result), rows, nodes


def close(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float = 2e-5,
          atol: float = 2e-6) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=rtol, atol=atol,
                                   err_msg=k)


# -- the reference: softmax regression and its local SGD, in float64 -------------------------

def local_sgd(model: Mapping[str, np.ndarray], client: int, node: int, rnd: int, seed: int,
              wl: Mapping[str, Any], corr: Mapping[str, np.ndarray] | None = None,
              mu: float = 0.0) -> tuple[dict[str, np.ndarray], int]:
    """`epochs` of minibatch SGD on softmax regression from `model`, shuffled as the clients
    shuffle (derive_rng(seed, node, round)); each gradient + corr + mu (w - model)."""
    x, y = learners.make(dict(wl)).data.client(client)
    x = x.astype(np.float64)
    w0, b0 = (np.asarray(model["weight"], np.float64), np.asarray(model["bias"], np.float64))
    w, b = w0.copy(), b0.copy()
    rng = common.derive_rng(seed, node, rnd)
    steps = 0
    for _ in range(wl["epochs"]):
        order = rng.permutation(len(y))
        for s in range(0, len(y), wl["batch_size"]):
            idx = order[s:s + wl["batch_size"]]
            z = x[idx] @ w.T + b
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1
            p /= len(idx)
            gw, gb = p.T @ x[idx] + mu * (w - w0), p.sum(0) + mu * (b - b0)
            if corr is not None:
                gw, gb = gw + corr["weight"], gb + corr["bias"]
            w, b = w - wl["lr"] * gw, b - wl["lr"] * gb
            steps += 1
    return {"bias": b, "weight": w}, steps


def start(wl: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in learners.make(dict(wl)).init().items()}


def weights(wl: Mapping[str, Any], n: int) -> np.ndarray:
    learner = learners.make(dict(wl))
    w = np.array([learner.samples(i) for i in range(n)], np.float64)
    return w / w.sum()


def wsum(ws: np.ndarray, models: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: sum(wi * m[k] for wi, m in zip(ws, models)) for k in models[0]}


def ref_scaffold(wl: Mapping[str, Any], n: int, rounds: int, seed: int) -> dict[str, Any]:
    x, p = start(wl), weights(wl, n)
    c = {k: np.zeros_like(v) for k, v in x.items()}
    ci = [dict(c) for _ in range(n)]
    for r in range(1, rounds + 1):
        ys, dcs = [], []
        for i in range(n):
            corr = {k: c[k] - ci[i][k] for k in x}
            y, steps = local_sgd(x, i, i + 1, r, seed, wl, corr)
            new = {k: ci[i][k] - c[k] + (x[k] - y[k]) / (steps * wl["lr"]) for k in x}
            dcs.append({k: new[k] - ci[i][k] for k in x})
            ci[i] = new
            ys.append(y)
        x = wsum(p, ys)
        c = {k: c[k] + sum(pi * d[k] for pi, d in zip(p, dcs)) for k in x}
    return {"model": x, "c": c, "ci": ci}


def ref_fednova(wl: Mapping[str, Any], n: int, rounds: int, seed: int) -> dict[str, Any]:
    x, p = start(wl), weights(wl, n)
    for r in range(1, rounds + 1):
        runs = [local_sgd(x, i, i + 1, r, seed, wl) for i in range(n)]
        tau = sum(pi * s for pi, (_, s) in zip(p, runs))
        d = wsum(p, [{k: (y[k] - x[k]) / s for k in x} for y, s in runs])
        x = {k: x[k] + tau * d[k] for k in x}
    return {"model": x}


def ref_feddyn(wl: Mapping[str, Any], n: int, rounds: int, seed: int,
               alpha: float) -> dict[str, Any]:
    x, p = start(wl), weights(wl, n)
    h = {k: np.zeros_like(v) for k, v in x.items()}
    g = [dict(h) for _ in range(n)]
    for r in range(1, rounds + 1):
        ys = []
        for i in range(n):
            y, _ = local_sgd(x, i, i + 1, r, seed, wl, {k: -g[i][k] for k in x}, alpha)
            g[i] = {k: g[i][k] - alpha * (y[k] - x[k]) for k in x}
            ys.append(y)
        h = {k: h[k] - alpha * sum(pi * (y[k] - x[k]) for pi, y in zip(p, ys)) for k in x}
        avg = wsum(p, ys)
        x = {k: avg[k] - h[k] / alpha for k in x}
    return {"model": x, "h": h, "g": g}


def ref_server_opt(opt: str, wl: Mapping[str, Any], n: int, rounds: int, seed: int, lr: float,
                   b1: float, b2: float, tau: float) -> dict[str, np.ndarray]:
    x, p = start(wl), weights(wl, n)
    m = {k: 0.0 for k in x}
    v = {k: tau**2 for k in x}
    for r in range(1, rounds + 1):
        agg = wsum(p, [local_sgd(x, i, i + 1, r, seed, wl)[0] for i in range(n)])
        for k in x:
            d = agg[k] - x[k]
            m[k] = b1 * m[k] + (1 - b1) * d
            if opt == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d * d
            elif opt == "yogi":
                v[k] = v[k] - (1 - b2) * d * d * np.sign(v[k] - d * d)
            else:
                v[k] = v[k] + d * d
            x[k] = x[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
    return x


# -- against the references ------------------------------------------------------------------

@pytest.mark.parametrize("rounds", [1, 2])
def test_scaffold_matches_the_numpy_reference(rounds: int) -> None:
    result, _, nodes = run(config("scaffold", rounds=rounds))
    want = ref_scaffold(LINEAR, 3, rounds, 0)
    close(result["model"], want["model"])
    close(nodes[0].c, want["c"], atol=1e-5)
    for i in range(3):
        close(nodes[i + 1].ci, want["ci"][i], atol=1e-5)


def test_fednova_matches_the_numpy_reference() -> None:
    result, _, _ = run(config("fednova", rounds=2))
    close(result["model"], ref_fednova(LINEAR, 3, 2, 0)["model"])


def test_feddyn_matches_the_numpy_reference() -> None:
    result, _, nodes = run(config("feddyn", rounds=2, alpha=0.5))
    want = ref_feddyn(LINEAR, 3, 2, 0, 0.5)
    close(result["model"], want["model"], atol=1e-5)
    close(nodes[0].h, want["h"], atol=1e-5)
    for i in range(3):
        close(nodes[i + 1].g, want["g"][i], atol=1e-5)


@pytest.mark.parametrize("opt", ["adam", "yogi", "adagrad"])
def test_adaptive_server_optimisers_match_the_numpy_reference(opt: str) -> None:
    result, _, _ = run(config("fedavg", rounds=2, server_opt=opt, server_lr=0.03,
                              betas=[0.8, 0.9], tau=0.01))
    close(result["model"], ref_server_opt(opt, LINEAR, 3, 2, 0, 0.03, 0.8, 0.9, 0.01))


@settings(max_examples=30, deadline=None)
@given(opt=st.sampled_from(["yogi", "adagrad", "adam"]), steps=st.integers(1, 4),
       deltas=st.lists(st.floats(-1, 1, width=32), min_size=4, max_size=4),
       tau=st.floats(1e-4, 0.5), b1=st.floats(0, 0.99), b2=st.floats(0, 0.999))
def test_server_opt_step_is_reddi_algorithm_2(opt: str, steps: int, deltas: list[float],
                                              tau: float, b1: float, b2: float) -> None:
    # One to four steps of FedAdam / FedYogi / FedAdagrad against the formulas; yogi's and
    # adagrad's second moment stays positive (yogi moves v towards d^2 by less than
    # |v - d^2|), and adagrad's never shrinks.
    opts = fedavg.Options(server_opt=opt, server_lr=0.1, betas=(b1, b2), tau=tau)
    so = fedavg.ServerOpt(opts)
    x = {"a": np.zeros(4, np.float32)}
    m, v = np.zeros(4), np.full(4, tau**2)
    xr = np.zeros(4)
    for _ in range(steps):
        agg = {"a": (x["a"] + np.float32(deltas)).astype(np.float32)}
        d = agg["a"].astype(np.float64) - x["a"]
        m = b1 * m + (1 - b1) * d
        v = {"adam": b2 * v + (1 - b2) * d * d, "adagrad": v + d * d,
             "yogi": v - (1 - b2) * d * d * np.sign(v - d * d)}[opt]
        xr = x["a"] + 0.1 * m / (np.sqrt(v) + tau)
        x = so.step(x, agg)
        np.testing.assert_allclose(x["a"], xr, rtol=1e-5, atol=1e-6)
        if opt != "adam":
            assert (so.v["a"] > 0).all()
        if opt == "adagrad":
            assert (so.v["a"] >= tau**2).all()


# -- what each reduces to ----------------------------------------------------------------------

SETUP = {"clients": st.integers(1, 5), "seed": st.integers(0, 2**31 - 1),
         "per_round": st.integers(1, 5), "samples_min": st.integers(1, 20)}


@settings(max_examples=12, deadline=None)
@given(**SETUP)
def test_scaffold_first_round_is_fedavg(clients: int, seed: int, per_round: int,
                                        samples_min: int) -> None:
    wl = dict(LINEAR, samples_min=samples_min)
    k = min(per_round, clients)
    a, _, _ = run(config("fedavg", 1, seed, clients, wl, clients_per_round=k))
    b, _, _ = run(config("scaffold", 1, seed, clients, wl, clients_per_round=k))
    assert common.digest(a["model"]) == common.digest(b["model"])


@settings(max_examples=12, deadline=None)
@given(**SETUP, rounds=st.integers(1, 3))
def test_feddyn_with_alpha_0_is_fedavg(clients: int, seed: int, per_round: int,
                                       samples_min: int, rounds: int) -> None:
    wl = dict(LINEAR, samples_min=samples_min)
    k = min(per_round, clients)
    a, rows_a, _ = run(config("fedavg", rounds, seed, clients, wl, clients_per_round=k))
    b, rows_b, _ = run(config("feddyn", rounds, seed, clients, wl, clients_per_round=k,
                              alpha=0.0))
    assert common.digest(a["model"]) == common.digest(b["model"])
    assert rows_a == rows_b


@settings(max_examples=12, deadline=None)
@given(clients=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), per_round=st.integers(1, 5),
       rounds=st.integers(1, 3), mu=st.sampled_from([0.0, 0.3]))
def test_fednova_with_equal_steps_is_fedavg(clients: int, seed: int, per_round: int,
                                            rounds: int, mu: float) -> None:
    wl = dict(LINEAR, samples_min=0)  # every client has 20 samples: equal steps
    k = min(per_round, clients)
    a, _, _ = run(config("fedavg", rounds, seed, clients, wl, clients_per_round=k, mu=mu))
    b, _, _ = run(config("fednova", rounds, seed, clients, wl, clients_per_round=k, mu=mu))
    close(b["model"], {n: v.astype(np.float64) for n, v in a["model"].items()}, rtol=1e-5,
          atol=1e-6)


def test_each_differs_from_fedavg_where_it_should() -> None:
    fa, _, _ = run(config("fedavg", rounds=3))
    for name, extra in (("scaffold", {}), ("fednova", {}), ("feddyn", {"alpha": 0.1})):
        other, _, _ = run(config(name, rounds=3, **extra))
        assert common.digest(other["model"]) != common.digest(fa["model"]), name


# -- server state mirrors the clients' ---------------------------------------------------------

@settings(max_examples=8, deadline=None)
@given(clients=st.integers(2, 5), seed=st.integers(0, 2**31 - 1), per_round=st.integers(1, 5),
       rounds=st.integers(1, 4), duplicate=st.sampled_from([0.0, 1.0]))
def test_server_state_is_the_weighted_sum_of_client_state(clients: int, seed: int, per_round: int,
                                                  rounds: int, duplicate: float) -> None:
    # c = sum_i p_i c_i (SCAFFOLD) and h = sum_i p_i g_i (FedDyn) over all clients, sampled or
    # not (p_i: sample shares under weighted_mean, 1/N under mean), with every message
    # delivered twice (a duplicate must not count twice).
    net = {"duplicate": duplicate, "latency": 0.01}
    k = min(per_round, clients)
    for agg in ("weighted_mean", "mean"):
        p = weights(LINEAR, clients) if agg == "weighted_mean" else np.full(clients, 1 / clients)
        for name, state, client_state, extra in (("scaffold", "c", "ci", {}),
                                                 ("feddyn", "h", "g", {"alpha": 0.2})):
            _, _, nodes = run(config(name, rounds, seed, clients, network=net,
                                     clients_per_round=k, aggregator=agg, **extra))
            parts = [(p[i - 1], getattr(nodes[i], client_state)) for i in range(1, clients + 1)
                     if getattr(nodes[i], client_state) is not None]
            for key, value in getattr(nodes[0], state).items():
                want = sum((pi * c[key] for pi, c in parts), np.zeros_like(value, np.float64))
                np.testing.assert_allclose(value, want, atol=1e-6)


# Node 3 (17 samples, 2 epochs) computes 12x slower than the others: 0.408 s a round, so its
# replies miss every 0.3 s deadline and arrive during the next round.
SLOW_NODE_3 = {"compute": {"per_unit": 0.001, "factors": {"3": 12.0}}}


@pytest.mark.parametrize("name", ["scaffold", "feddyn"])
def test_late_replies_still_update_the_server_state_once(name: str) -> None:
    extra = {"alpha": 0.2} if name == "feddyn" else {}
    state, client_state = ("c", "ci") if name == "scaffold" else ("h", "g")
    res, rows, nodes = run(config(name, rounds=3, network=SLOW_NODE_3, round_timeout=0.3,
                                  **extra))
    assert [r["clients"] for r in rows if r["name"] == "round"] == [2, 2, 2]
    assert [(r["src"], r["round"]) for r in rows if r["name"] == "late"] == [(3, 1), (3, 2)]
    # Node 3's round-3 reply is still on its way when the run ends: the server holds its
    # state as of round 2, which a 2-round run of the same federation has on node 3.
    _, _, before = run(config(name, rounds=2, network=SLOW_NODE_3, round_timeout=0.3, **extra))
    parts = [getattr(nodes[1], client_state), getattr(nodes[2], client_state),
             getattr(before[3], client_state)]
    p = weights(LINEAR, 3)
    for k, value in getattr(nodes[0], state).items():
        np.testing.assert_allclose(value, sum(pi * c[k] for pi, c in zip(p, parts)), atol=1e-6)
    assert nodes[0].pending == {3: [3]}


def test_scaffold_extra_bytes_are_one_model_each_way_per_client() -> None:
    # Compression off, so bytes are what the tensors are; the rest is a few header bytes.
    cfg_a = dict(config("fedavg", rounds=3, clients=4), codec={"compression": "none"})
    cfg_b = dict(config("scaffold", rounds=3, clients=4), codec={"compression": "none"})
    cfg_a["workload"] = cfg_b["workload"] = dict(LINEAR, clients=4, input_dim=200)
    a = execute(cfg_a, quiet=True).result
    b = execute(cfg_b, quiet=True).result
    model_bytes = 4 * (3 * 200 + 3)
    extra = b["bytes"] - a["bytes"]
    messages = 3 * 4 * 2
    assert b["messages"] == a["messages"] == messages
    assert messages * model_bytes <= extra <= messages * (model_bytes + 200)


# -- crashes, checkpoints, bad config ------------------------------------------------------------

CRASH = {"latency": 0.01, "compute": {"per_unit": 0.001},
         "crashes": [{"node": 2, "at": 0.05, "restart": 0.25}]}


@pytest.mark.parametrize("name", PROTOCOLS)
def test_a_client_crash_and_restart_is_survived(name: str) -> None:
    res, rows, nodes = run(config(name, rounds=4, clients=4, network=CRASH, round_timeout=0.1))
    assert [r["name"] for r in rows if r["name"] in ("crash", "restart")] == ["crash", "restart"]
    per_round = [r["clients"] for r in rows if r["name"] == "round"]
    assert len(per_round) == 4 and min(per_round) == 3 and per_round[-1] == 4
    assert all(np.isfinite(v).all() for v in res["model"].values())
    assert res["test_accuracy"] > 0.3
    if name != "fednova":  # the restarted node is a fresh one: it trained only after restart
        assert nodes[2].trained >= 2


@pytest.mark.parametrize("name", PROTOCOLS)
def test_interrupted_and_resumed_ends_as_one_never_interrupted(name: str, tmp_path: Path) -> None:
    # Stragglers, a deadline and sampling: pending rounds and client state are in the checkpoint.
    extra = {"alpha": 0.1} if name == "feddyn" else {}
    cfg = config(name, rounds=5, clients=5, network=SLOW_NODE_3, round_timeout=0.3,
                 clients_per_round=4, **extra)
    cfg["transport"]["strict"] = True
    want = execute(cfg, quiet=True).result
    with pytest.raises(ckpt.RunInterrupted):
        execute(cfg, progress=InterruptAt(2), checkpoint_dir=tmp_path)
    got = execute(None, quiet=True, resume=tmp_path).result
    for key in ("final_model_sha256", "rounds", "messages", "bytes", "test_accuracy"):
        assert got[key] == want[key], key


@pytest.mark.parametrize(("name", "protocol", "message"), [
    ("feddyn", {"alpha": -1}, r"\[protocol\] alpha = -1.0; expected a number >= 0"),
    ("feddyn", {"alpah": 1}, r"\[protocol\] has no key 'alpah'; did you mean 'alpha'"),
    ("scaffold", {"local_lr": 0}, r"\[protocol\] local_lr = 0; expected a number > 0"),
    ("fednova", {"local_lr": "x"}, r"\[protocol\] local_lr = 'x'; expected a number > 0"),
    ("scaffold", {"alpha": 1}, r"\[protocol\] has no key 'alpha'"),
    ("fedavg", {"server_opt": "yogii"}, r"server_opt = 'yogii' is not allowed"),
])
def test_config_errors_name_the_key(name: str, protocol: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load("protocols", name)(config(name, **protocol))


def test_scaffold_needs_a_learning_rate() -> None:
    with pytest.raises(ConfigError, match=r"local_lr is needed"):
        load("protocols", "scaffold")(config("scaffold", workload=dict(LINEAR, lr=0.0)))


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(0, 40), lr=st.floats(0.001, 0.2), mu=st.sampled_from([0.0, 0.01, 0.5]),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(),
       wd=st.sampled_from([0.0, 1e-3]))
def test_a_norm_is_what_torch_sgd_does_to_a_unit_gradient(steps: int, lr: float, mu: float,
                                                          momentum: float, nesterov: bool,
                                                          wd: float) -> None:
    import torch

    from protocols.localsgd import a_norm

    nesterov = nesterov and momentum > 0
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        (w.sum() + mu / 2 * (w**2).sum()).backward()  # gradient 1 + mu (w - w0), w0 = 0
        opt.step()
    got = a_norm(steps, lr, mu, momentum, nesterov, wd)
    assert got == pytest.approx(-float(w.detach()) / lr, rel=1e-9, abs=1e-12)
    if mu == wd == 0:
        m = momentum
        closed = steps if m == 0 else (steps - m * (1 - m**steps) / (1 - m)) / (1 - m)
        if not nesterov:  # FedNova's formula for heavy-ball momentum
            assert got == pytest.approx(closed, rel=1e-9)


@pytest.mark.parametrize("name", PROTOCOLS)
@pytest.mark.parametrize("workload", [
    {"model": "flat", "flat_size": 50},
    {"model": "mlp", "input_dim": 10, "hidden": 6, "classes": 3, "samples_per_client": 16,
     "samples_min": 4, "batch_size": 4, "test_samples": 30},
], ids=["flat", "mlp"])
def test_every_learner_works(name: str, workload: dict[str, Any]) -> None:
    extra = {"alpha": 0.1} if name == "feddyn" else {}
    res, rows, _ = run(config(name, rounds=2, workload=workload, **extra))
    assert [r["value"] for r in rows if r["name"] == "round"] == [1, 2]
    assert all(np.isfinite(v).all() for v in res["model"].values())
    # `flat` "training" adds flat_step and ignores hooks: SCAFFOLD's correction changes nothing
    # and FedNova's one step is FedAvg's (FedDyn's h, built on a regulariser that was not
    # applied, moves the model further, as it should).
    if workload["model"] == "flat" and name != "feddyn":
        start = learners.make(dict(workload, clients=3)).init()["x"]
        np.testing.assert_allclose(res["model"]["x"], start + np.float32(0.002), atol=1e-5)
