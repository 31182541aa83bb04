"""Learners: the standard data and model exactly as docs/workloads.md defines them, deterministic
local training that equals plain SGD, FedProx, and config errors that name the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError
from protocols import learners

SMALL = {"model": "mlp", "input_dim": 12, "hidden": 6, "classes": 3, "samples_per_client": 40,
         "batch_size": 8, "test_samples": 50, "clients": 4}


def _readonly(model):
    for a in model.values():
        a.flags.writeable = False
    return model


def test_data_is_the_documented_mixture():
    data = learners.make({"model": "mlp"}).data
    centres = np.random.default_rng(7).standard_normal((10, 784)) * 0.2
    for i in (0, 3):
        r = np.random.default_rng(1000 + i)
        y = r.integers(0, 10, 256)
        x = (centres[y] + r.standard_normal((256, 784))).astype(np.float32)
        got_x, got_y = data.client(i)
        assert got_x.dtype == np.float32 and np.array_equal(got_x, x) and np.array_equal(got_y, y)
    r = np.random.default_rng(999)
    y = r.integers(0, 10, 2000)
    x = (centres[y] + r.standard_normal((2000, 784))).astype(np.float32)
    tx, ty = data.test()
    assert np.array_equal(tx, x) and np.array_equal(ty, y)


def test_mlp_is_the_documented_torch_model():
    model = learners.make({"model": "mlp"}).init()
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    state = ref.state_dict()
    assert list(model) == list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert sum(a.size for a in model.values()) == 203_530
    for name, value in state.items():
        assert model[name].dtype == np.float32
        assert np.array_equal(model[name], value.numpy())


def test_data_cache_is_bounded_and_counts_can_differ():
    learner = learners.make(dict(SMALL, data_cache=2, samples_min=5))
    counts = [learner.samples(i) for i in range(30)]
    assert min(counts) >= 5 and max(counts) <= 40 and len(set(counts)) > 1
    for i in range(5):
        x, y = learner.data.client(i)
        assert len(y) == counts[i] == len(x)
    assert len(learner.data._cache) == 2
    assert learner.work(3) == counts[3] * 1


@pytest.mark.parametrize("model", ["mlp", "linear"])
def test_training_is_deterministic_and_leaves_its_input_alone(model):
    learner = learners.make(dict(SMALL, model=model))
    start = _readonly(learner.init())
    a = learner.train(start, 1, np.random.default_rng(5)).model
    b = learner.train(start, 1, np.random.default_rng(5)).model
    c = learner.train(start, 1, np.random.default_rng(6)).model
    assert sorted(a) == sorted(start)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # another shuffle, another result
    assert all(not np.array_equal(a[k], start[k]) for k in a)
    assert all(np.array_equal(start[k], learner.init()[k]) for k in a)


@given(seed=st.integers(0, 2**32 - 1), client=st.integers(0, 3), lr=st.floats(0.001, 0.5))
@settings(max_examples=15)
def test_one_full_batch_step_of_mlp_equals_torch_sgd(seed, client, lr):
    # samples = batch: one step on the whole client set, whatever the shuffle.
    learner = learners.make(dict(SMALL, samples_per_client=8, lr=lr))
    start = learner.init()
    got = learner.train(start, client, np.random.default_rng(seed)).model
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    x, y = learner.data.client(client)
    torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    opt.step()
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), client=st.integers(0, 3))
@settings(max_examples=15)
def test_one_full_batch_step_of_linear_equals_the_softmax_gradient(seed, client):
    learner = learners.make(dict(SMALL, model="linear", samples_per_client=8, lr=0.3))
    start = learner.init()
    got = learner.train(start, client, np.random.default_rng(seed)).model
    x, y = learner.data.client(client)
    w, b = start["weight"].astype(np.float64), start["bias"].astype(np.float64)
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(8), y] -= 1
    np.testing.assert_allclose(got["weight"], w - 0.3 * (p.T @ x) / 8, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["bias"], b - 0.3 * p.sum(0) / 8, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["mlp", "linear"])
def test_fedprox_pulls_towards_the_received_model(model):
    learner = learners.make(dict(SMALL, model=model, epochs=3, lr=0.2))
    start = learner.init()
    plain = learner.train(start, 0, np.random.default_rng(1)).model
    prox = learner.train(start, 0, np.random.default_rng(1), learners.Hooks(prox_mu=5.0)).model

    def dist(m):
        return sum(float(np.sum((m[k] - start[k]) ** 2.0)) for k in start)

    assert dist(prox) < dist(plain)


def test_evaluation_improves_with_training():
    learner = learners.make(dict(SMALL, model="linear", input_dim=100, samples_per_client=100,
                                 lr=0.05, test_samples=400))
    model = learner.init()
    before = learner.evaluate(model)
    for c in range(4):
        model = learner.train(model, c, np.random.default_rng(c)).model
    after = learner.evaluate(model)
    assert before is not None and after is not None
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"] + 0.2


def test_flat_adds_a_step_and_has_no_test_set():
    learner = learners.make({"model": "flat", "flat_size": 1000, "flat_step": 0.5})
    x = learner.init()["x"]
    assert x.dtype == np.float32
    assert np.array_equal(x, np.random.default_rng(0).standard_normal(1000).astype(np.float32))
    out = learner.train(_readonly({"x": x}), 3, np.random.default_rng(0)).model
    assert np.array_equal(out["x"], x + np.float32(0.5))
    assert learner.evaluate(out) is None and learner.work(3) == 0.0


def test_same_table_same_learner():
    assert learners.make(dict(SMALL)) is learners.make(dict(SMALL))
    assert learners.make(dict(SMALL)) is not learners.make(dict(SMALL, lr=0.1))


@pytest.mark.parametrize(("table", "message"), [
    ({"modle": "mlp"}, r"\[workload\] has no key 'modle'; did you mean 'model'"),
    ({"model": "resnet"}, r"\[workload\] model = 'resnet' is not allowed"),
    ({"clients": 0}, r"\[workload\] clients = 0; expected an integer >= 1"),
    ({"lr": "fast"}, r"\[workload\] lr = 'fast' is a string; expected a number"),
    ({"samples_min": 300}, r"\[workload\] samples_min = 300 exceeds samples_per_client"),
])
def test_config_errors_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        learners.make(table)


def test_wrong_model_shapes_are_refused():
    learner = learners.make(dict(SMALL))
    model = learner.init()
    with pytest.raises(ValueError, match="expects"):
        learner.train({"0.weight": model["0.weight"]}, 0, np.random.default_rng(0))
    model["2.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"'2.bias' has shape \(5,\); expected \(3,\)"):
        learner.train(model, 0, np.random.default_rng(0))


@pytest.mark.parametrize("model", ["mlp", "linear"])
@settings(max_examples=5, deadline=None)
@given(scale=st.floats(-0.5, 0.5, allow_nan=False), seed=st.integers(0, 2**16))
def test_a_constant_correction_is_one_extra_gradient_term(model, scale, seed):
    """With one full batch and one step, w' = w - lr * (g + c): the correction hook adds c."""
    learner = learners.make(dict(SMALL, model=model, samples_per_client=8, batch_size=8, lr=0.1))
    start = learner.init()
    corr = {k: np.full_like(v, scale) for k, v in start.items()}
    plain = learner.train(start, 0, np.random.default_rng(seed))
    hooked = learner.train(start, 0, np.random.default_rng(seed), learners.Hooks(correction=corr))
    assert plain.steps == hooked.steps == 1 and np.isfinite(plain.loss) and plain.loss > 0
    for k in start:
        np.testing.assert_allclose(hooked.model[k], plain.model[k] - np.float32(0.1 * scale),
                                   rtol=1e-5, atol=1e-6)


def test_train_reports_steps_and_mean_loss():
    learner = learners.make(dict(SMALL, model="linear", epochs=3, samples_per_client=20,
                                 batch_size=8))
    out = learner.train(learner.init(), 0, np.random.default_rng(0))
    assert out.steps == 3 * 3  # ceil(20 / 8) batches per epoch
    assert np.isfinite(out.loss) and out.loss > 0 and out.metrics == {}
