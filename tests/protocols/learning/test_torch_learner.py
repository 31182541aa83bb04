"""The generic torch learner: the W1 mlp bit for bit, torch.optim's update rules, hooks
applied to each step, per-client held-out scores, and clear errors for bad models and
learner factories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel import registry
from kernel.options import ConfigError
from protocols import learners
from protocols.learning import models

SMALL = {"model": "mlp", "input_dim": 12, "hidden": 6, "classes": 3, "samples_per_client": 40,
         "batch_size": 8, "test_samples": 50, "clients": 4}


def test_torch_mlp_is_todays_mlp_bit_for_bit():
    old = learners.make(dict(SMALL))
    new = learners.make(dict(SMALL, learner="torch"))
    assert type(old) is learners.TorchMLP and type(new).__name__ == "TorchLearner"
    m0 = old.init()
    assert all(np.array_equal(m0[k], v) for k, v in new.init().items()) and m0.keys() == \
        new.init().keys()
    a = old.train(m0, 2, np.random.default_rng(5))
    b = new.train(m0, 2, np.random.default_rng(5))
    assert a.steps == b.steps == 5 and a.loss == pytest.approx(b.loss)
    assert all(np.array_equal(a.model[k], b.model[k]) for k in m0)
    assert old.evaluate(a.model)["accuracy"] == new.evaluate(b.model)["accuracy"]
    x, y = new.data.client(2)  # the training split, as i16's label-flip wraps it
    assert np.array_equal(y, old.data.client(2)[1])


def _reference(opts, model, x, y, rng, make_opt):
    """Plain torch: the same module and batches, stepped by a torch.optim optimizer."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = models.build(opts["model"], x.shape[1:], 3, opts["hidden"])
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.items()})
    opt = make_opt(net.parameters())
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(opts["epochs"]):
        order = torch.from_numpy(rng.permutation(len(y)))
        for s in range(0, len(y), opts["batch_size"]):
            idx = order[s:s + opts["batch_size"]]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(("extra", "make_opt"), [
    ({"momentum": 0.9, "weight_decay": 0.01},
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
    ({"momentum": 0.5, "nesterov": True},
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, nesterov=True)),
    ({"optimizer": "adam", "lr": 0.01, "weight_decay": 0.001},
     lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.001)),
])
def test_optimizers_follow_torch_optim(extra, make_opt):
    opts = dict(SMALL, learner="torch", epochs=2, **extra)
    learner = learners.make(opts)
    model = learner.init()
    got = learner.train(model, 1, np.random.default_rng(3)).model
    x, y = learner.data.client(1)
    want = _reference(learner.opts, model, x, y, np.random.default_rng(3), make_opt)
    for k in model:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_hooks_change_each_step_by_correction_and_proximal_term():
    learner = learners.make(dict(SMALL, learner="torch", batch_size=64))  # one step
    model = learner.init()
    rng = np.random.default_rng(0)
    corr = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()}
    anchor = {k: v + 1.0 for k, v in model.items()}
    plain = learner.train(model, 0, np.random.default_rng(1)).model
    hooked = learner.train(model, 0, np.random.default_rng(1),
                           learners.Hooks(correction=corr, prox_mu=0.5, anchor=anchor)).model
    lr = learner.opts["lr"]
    for k in model:
        want = plain[k] - lr * (corr[k] + 0.5 * (model[k] - anchor[k]))
        np.testing.assert_allclose(hooked[k], want, rtol=1e-5, atol=1e-6)


def test_cnn_on_digits_scores_clients_held_out_splits():
    config = {"workload": {"model": "cnn", "clients": 5},
              "data": {"dataset": "digits", "holdout": 0.2,
                       "partition": {"kind": "dirichlet", "alpha": 1.0}}}
    learner = learners.make(config)
    model = learner.init()
    assert {k: v.shape for k, v in model.items()}["features.0.weight"] == (16, 1, 3, 3)
    res = learner.evaluate(model, client=3)
    x, y = learner.data.holdout(3)
    assert res["samples"] == len(y) > 0 and 0 <= res["accuracy"] <= 1
    assert sum(learner.samples(i) + len(learner.data.holdout(i)[1]) for i in range(5)) == 1438
    out = learner.train(model, 3, np.random.default_rng(0))
    assert out.steps == -(-learner.samples(3) // 32) and np.isfinite(out.loss)


@registry.declare("models")
def wrong_width(input_shape, classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes + 1))


@registry.declare("models")
def not_a_module(classes):
    return [classes]


@registry.declare("learners")
def not_a_learner(config):
    return {"init": None}


@pytest.mark.parametrize(("workload", "match"), [
    ({"model": f"{__name__}:wrong_width"},
     r"model = '.*wrong_width' returns output of shape \(2, 11\) for a batch of 2; expected "
     r"\(2, 10\)"),
    ({"model": f"{__name__}:not_a_module"}, r"returned list; expected a torch.nn.Module"),
    ({"learner": f"{__name__}:not_a_learner"},
     r"learner = '.*not_a_learner' returned dict, which lacks init, samples, work, train, "
     r"evaluate"),
    ({"model": "nowhere_pkg.models:net"},
     r"model = 'nowhere_pkg.models:net': no module named 'nowhere_pkg' \(looked in"),
    ({"model": "cnn", "optimizer": "lbfgs"}, r"optimizer = 'lbfgs' is not allowed"),
    ({"model": "cnn", "device": "tpu"}, r"device = 'tpu' is not allowed"),
    ({"model": "linear", "learner": "torch"}, r"model = 'linear' is not a torch model"),
])
def test_bad_models_and_learners_are_one_clear_error(workload, match):
    config = {"workload": dict(workload, clients=3), "data": {"dataset": "digits"}}
    learner = None
    with pytest.raises(ConfigError, match=match):
        learner = learners.make(config)
        learner.init()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without one")
def test_cuda_without_a_gpu_says_so():
    learner = learners.make(dict(SMALL, learner="torch", device="cuda:1"))
    with pytest.raises(ConfigError, match=r"device = 'cuda:1' but torch sees no CUDA device"):
        learner.init()


@pytest.mark.parametrize(("data", "match"), [
    ({"dataset": "digits", "holdout": 1.0}, r"\[data\] holdout = 1.0; expected a number in"),
    ({"dataset": "digits", "sead": 1}, r"\[data\] has no key 'sead'; did you mean 'seed'"),
    ({"partition": {"kind": "dirichlet", "alpha": 0.5}}, r"'mixture' is drawn per client"),
    ({"dataset": "digits", "partition": {"kind": "dirichlet", "alpha": 0.0}},
     r"\[data.partition\] alpha = 0.0; expected a number > 0"),
    ({"dataset": "mnist:/nonexistent/mnist"}, r"dataset: folder '/nonexistent/mnist' does not"),
])
def test_bad_data_sections(data, match):
    with pytest.raises(ConfigError, match=match):
        learners.make({"workload": {"model": "cnn", "clients": 3}, "data": data})


def test_more_clients_than_samples():
    with pytest.raises(ConfigError, match=r"\[workload\] clients = 2000 is more than the 1438"):
        learners.make({"workload": {"model": "logreg", "clients": 2000},
                       "data": {"dataset": "digits"}})


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_local_steps_take_exactly_k_minibatches(k):
    learner = learners.make(dict(SMALL, local_steps=k))  # 40 samples, batch 8: 5 per pass
    assert type(learner).__name__ == "TorchLearner"
    res = learner.train(learner.init(), 0, np.random.default_rng(0))
    assert res.steps == k


def test_local_steps_of_one_pass_equal_one_epoch():
    model = learners.make(dict(SMALL)).init()
    a = learners.make(dict(SMALL, local_steps=5)).train(model, 1, np.random.default_rng(4))
    b = learners.make(dict(SMALL, learner="torch")).train(model, 1, np.random.default_rng(4))
    assert a.steps == b.steps == 5
    assert all(np.array_equal(a.model[k], b.model[k]) for k in model)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (28, 28), (784,),
                                   (3072,)])
def test_cnn_fits_the_documented_image_sizes(shape):
    net = models.build("cnn", shape, 10)
    with torch.no_grad():
        assert net(torch.zeros((4, *shape))).shape == (4, 10)


def test_cnn_refuses_samples_that_are_not_images():
    with pytest.raises(ConfigError, match=r"model = 'cnn' needs image samples .* shape \(10,\)"):
        models.build("cnn", (10,), 3)
