"""Models, synthetic data, local training and evaluation for the standard workloads.

`make(workload)` turns a validated `[workload]` table into a `Learner`: four operations on
models held as named float32 numpy arrays (`Tensors`), the only form a model takes in messages:

    learner.init() -> Tensors                             # the initial global model
    learner.samples(client) -> int                        # client's sample count (no data made)
    learner.work(client) -> float                         # samples x epochs, for ctx.compute
    learner.train(model, client, rng, hooks=None) -> TrainResult  # model left untouched
    learner.evaluate(model, client=None) -> {"accuracy", "loss", ...} | None

`train` returns the new model with what algorithms need beside it (local steps taken, mean
training loss, extra metrics). `Hooks` change a stock local loop without owning it: a per-step
gradient correction (SCAFFOLD's c - c_i, FedDyn's linear term) and a proximal penalty
(FedProx, FedDyn's quadratic term). Any learner that honours them works with every protocol.

Clients are numbered from 0 (FedAvg's node i+1 is client i). Models (docs/workloads.md):
`mlp` (torch, 784->256->10), `linear` (numpy softmax regression on the same data, for quick
tests) and `flat` (one float32 vector; "training" adds `flat_step`; no test set). Data is the
seeded Gaussian mixture, made per client on demand and kept in a small LRU cache, so idle
clients cost nothing. Local training shuffles with the `rng` it is given, so the caller decides
where randomness comes from (FedAvg derives it from (seed, node, round): the same everywhere).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernel.options import ConfigError, options

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Hooks:
    """Optional changes to local training that any stock loop can honour, applied each step:
    gradient += correction + prox_mu * (w - anchor), anchor defaulting to the received model."""

    correction: Mapping[str, np.ndarray] | None = None
    prox_mu: float = 0.0
    anchor: Mapping[str, np.ndarray] | None = None


@dataclass
class TrainResult:
    """What one local training call produced: the model, local steps taken, mean loss, extras."""

    model: Tensors
    steps: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)

DEFAULTS: dict[str, Any] = {
    "model": "mlp",
    "clients": 10,
    "samples_per_client": 256,
    # > 0: client i has a seeded count in [samples_min, samples_per_client] (unequal weights).
    "samples_min": 0,
    "batch_size": 32,
    "lr": 0.05,
    "epochs": 1,
    "test_samples": 2000,
    "input_dim": 784,
    "hidden": 256,
    "classes": 10,
    "flat_size": 10_000_000,
    "flat_step": 0.001,
    "torch_threads": 1,
    "data_cache": 64,  # clients whose data stays in memory (LRU)
}
MODELS = ("mlp", "linear", "flat")

CENTRE_SEED, CLIENT_SEED_BASE, TEST_SEED, CENTRE_SCALE = 7, 1000, 999, 0.2


def validate(workload: Mapping[str, Any]) -> dict[str, Any]:
    """The `[workload]` table merged over DEFAULTS; ConfigError names any bad key or value."""
    opts = options("workload", workload, DEFAULTS, choices={"model": MODELS})
    positive = ("clients", "samples_per_client", "batch_size", "epochs", "input_dim", "hidden",
                "classes", "flat_size", "torch_threads", "data_cache")
    for key in positive:
        if opts[key] < 1:
            raise ConfigError(f"[workload] {key} = {opts[key]!r}; expected an integer >= 1")
    for key in ("samples_min", "test_samples"):
        if opts[key] < 0:
            raise ConfigError(f"[workload] {key} = {opts[key]!r}; expected an integer >= 0")
    if opts["samples_min"] > opts["samples_per_client"]:
        raise ConfigError(f"[workload] samples_min = {opts['samples_min']} exceeds "
                          f"samples_per_client = {opts['samples_per_client']}")
    if not opts["lr"] >= 0:
        raise ConfigError(f"[workload] lr = {opts['lr']!r}; expected a number >= 0")
    return opts


def make(workload: Mapping[str, Any]) -> Learner:
    """The learner for a `[workload]` table; one per process per distinct table, so every node
    of a shard shares one model object and one data cache."""
    opts = validate(workload)
    return _make(tuple(sorted(opts.items())))


@functools.lru_cache(maxsize=4)
def _make(key: tuple[tuple[str, Any], ...]) -> Learner:
    opts = dict(key)
    cls = {"mlp": TorchMLP, "linear": NumpyLinear, "flat": Flat}[opts["model"]]
    return cls(opts)


class Mixture:
    """The seeded Gaussian-mixture data of docs/workloads.md: per-client sets and one test set."""

    def __init__(self, opts: Mapping[str, Any]) -> None:
        self.dim, self.classes = opts["input_dim"], opts["classes"]
        self.n, self.n_min = opts["samples_per_client"], opts["samples_min"]
        self.n_test, self.cache_size = opts["test_samples"], opts["data_cache"]
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._centres: np.ndarray | None = None
        self._test: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def centres(self) -> np.ndarray:
        if self._centres is None:
            rng = np.random.default_rng(CENTRE_SEED)
            self._centres = rng.standard_normal((self.classes, self.dim)) * CENTRE_SCALE
        return self._centres

    def samples(self, client: int) -> int:
        """Client `client`'s sample count, without making its data."""
        if self.n_min == 0:
            return self.n
        # A stream of its own, so the data stream stays exactly as docs/workloads.md draws it.
        return int(np.random.default_rng([CLIENT_SEED_BASE + client, 1])
                   .integers(self.n_min, self.n + 1))

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, self.classes, n)
        x = (self.centres[y] + rng.standard_normal((n, self.dim))).astype(np.float32)
        return x, y

    def client(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """(x float32 [n, dim], y int64 [n]) of one client; cached, treat as read-only."""
        hit = self._cache.get(client)
        if hit is not None:
            self._cache.move_to_end(client)
            return hit
        if client < 0:
            raise ValueError(f"client index must be >= 0, got {client}")
        data = self.draw(np.random.default_rng(CLIENT_SEED_BASE + client), self.samples(client))
        self._cache[client] = data
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return data

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out test set (kept once made)."""
        if self._test is None:
            self._test = self.draw(np.random.default_rng(TEST_SEED), self.n_test)
        return self._test


class Learner:
    """A workload's model: initial weights, local training and evaluation on `Tensors`."""

    def __init__(self, opts: Mapping[str, Any]) -> None:
        self.opts = dict(opts)
        self.clients: int = opts["clients"]
        self.epochs: int = opts["epochs"]
        self.batch: int = opts["batch_size"]
        self.lr: float = opts["lr"]
        self.data = Mixture(opts)

    def init(self) -> Tensors:
        """The initial global model (a fresh copy each call)."""
        raise NotImplementedError

    def samples(self, client: int) -> int:
        """How many samples client `client` trains on (its aggregation weight)."""
        return self.data.samples(client)

    def work(self, client: int) -> float:
        """Units of local work one `train` call costs (for `ctx.compute`)."""
        return float(self.samples(client) * self.epochs)

    def train(self, model: Mapping[str, np.ndarray], client: int, rng: np.random.Generator,
              hooks: Hooks | None = None) -> TrainResult:
        """`epochs` of minibatch SGD on client `client` from `model` (not modified), shuffling
        with `rng`, each step's gradient changed as `hooks` say."""
        raise NotImplementedError

    def evaluate(self, model: Mapping[str, np.ndarray],
                 client: int | None = None) -> dict[str, float] | None:
        """{"accuracy", "loss"} of `model` on the test set (or `client`'s held-out split), or
        None without one."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Heavy set-up (imports) worth doing before the first round, where nodes run."""

    def _check(self, model: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> None:
        if model.keys() != like.keys():
            raise ValueError(f"model has tensors {sorted(model)}; the {self.opts['model']!r} "
                             f"workload expects {sorted(like)}")
        for name, ref in like.items():
            if model[name].shape != ref.shape:
                raise ValueError(f"model tensor {name!r} has shape {model[name].shape}; "
                                 f"expected {ref.shape}")


_threads_set: int | None = None


def set_torch_threads(n: int) -> None:
    """Fix torch's intra-op threads (once per process; later different requests win)."""
    global _threads_set
    if _threads_set != n:
        import torch

        torch.set_num_threads(n)
        _threads_set = n


class TorchMLP(Learner):
    """`mlp`: torch Linear(dim, hidden) -> ReLU -> Linear(hidden, classes), seed-0 init.

    One torch module per process; models move in and out through numpy views of its
    parameters (one copy in, one copy out, no torch warnings about read-only arrays)."""

    def __init__(self, opts: Mapping[str, Any]) -> None:
        super().__init__(opts)
        self._net: Any = None

    def prepare(self) -> None:
        # Imported here (1-2 s) so that start-up pays it, not the first round; only where
        # nodes run (a ray or grpc driver never trains).
        import torch  # noqa: F401

    def _setup(self) -> None:
        import torch
        from torch import nn

        set_torch_threads(self.opts["torch_threads"])
        with torch.random.fork_rng():  # keep the caller's torch RNG state untouched
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(self.opts["input_dim"], self.opts["hidden"]), nn.ReLU(),
                                nn.Linear(self.opts["hidden"], self.opts["classes"]))
        self._params = list(net.parameters())
        self._names = [name for name, _ in net.named_parameters()]
        self._views = {n: p.detach().numpy() for n, p in zip(self._names, self._params)}
        self._initial = {n: v.copy() for n, v in self._views.items()}
        self._net = net

    def _load(self, model: Mapping[str, np.ndarray]) -> None:
        if self._net is None:
            self._setup()
        self._check(model, self._views)
        for name, view in self._views.items():
            np.copyto(view, model[name], casting="same_kind")

    def init(self) -> Tensors:
        if self._net is None:
            self._setup()
        return {n: v.copy() for n, v in self._initial.items()}

    def train(self, model: Mapping[str, np.ndarray], client: int, rng: np.random.Generator,
              hooks: Hooks | None = None) -> TrainResult:
        import torch
        from torch.nn.functional import cross_entropy

        self._load(model)
        x, y = self.data.client(client)
        xs, ys = torch.from_numpy(x), torch.from_numpy(y)
        params, lr, batch, n = self._params, self.lr, self.batch, len(y)
        mu = hooks.prox_mu if hooks else 0.0
        anchor: list[Any] = [None] * len(params)
        if mu:  # the proximal term pulls towards the anchor: keep a copy of it
            ref = hooks.anchor if hooks and hooks.anchor is not None else model
            anchor = [torch.from_numpy(np.array(ref[k], np.float32)) for k in self._names]
        corr: list[Any] = [None] * len(params)
        if hooks and hooks.correction is not None:
            corr = [torch.from_numpy(np.array(hooks.correction[k], np.float32))
                    for k in self._names]
        steps, total = 0, torch.zeros((), dtype=torch.float64)
        for _ in range(self.epochs):
            order = torch.from_numpy(rng.permutation(n))
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                loss = cross_entropy(self._net(xs[idx]), ys[idx])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    total += loss.detach()
                    for p, g, a, c in zip(params, grads, anchor, corr):
                        if a is not None:
                            g = g.add(p - a, alpha=mu)
                        if c is not None:
                            g = g.add(c)
                        p.add_(g, alpha=-lr)
                steps += 1
        return TrainResult({name: view.copy() for name, view in self._views.items()}, steps,
                           float(total) / max(steps, 1))

    def evaluate(self, model: Mapping[str, np.ndarray],
                 client: int | None = None) -> dict[str, float] | None:
        import torch
        from torch.nn.functional import cross_entropy

        if client is not None:
            raise ValueError(
                f"the {self.opts['model']!r} workload has no per-client held-out split")
        if self.data.n_test == 0:
            return None
        self._load(model)
        x, y = self.data.test()
        ys = torch.from_numpy(y)
        with torch.no_grad():
            out = self._net(torch.from_numpy(x))
            loss = float(cross_entropy(out, ys))
            acc = float((out.argmax(1) == ys).double().mean())
        return {"accuracy": acc, "loss": loss}


class NumpyLinear(Learner):
    """`linear`: softmax regression (weight [classes, dim], bias [classes]) in float32 numpy;
    no torch, milliseconds per client at small `input_dim`."""

    def init(self) -> Tensors:
        rng = np.random.default_rng(0)
        c, d = self.opts["classes"], self.opts["input_dim"]
        return {"bias": np.zeros(c, np.float32),
                "weight": (rng.standard_normal((c, d)) * 0.01).astype(np.float32)}

    def train(self, model: Mapping[str, np.ndarray], client: int, rng: np.random.Generator,
              hooks: Hooks | None = None) -> TrainResult:
        self._check(model, self.init())
        mu = hooks.prox_mu if hooks else 0.0
        ref = hooks.anchor if hooks and hooks.anchor is not None else model
        w0, b0 = ref["weight"], ref["bias"]
        cw = cb = None
        if hooks and hooks.correction is not None:
            cw = np.asarray(hooks.correction["weight"], np.float32)
            cb = np.asarray(hooks.correction["bias"], np.float32)
        w, b = np.array(model["weight"], np.float32), np.array(model["bias"], np.float32)
        x, y = self.data.client(client)
        lr, prox = np.float32(self.lr), np.float32(mu)
        steps, total = 0, 0.0
        for _ in range(self.epochs):
            order = rng.permutation(len(y))
            for start in range(0, len(y), self.batch):
                idx = order[start:start + self.batch]
                xb, yb = x[idx], y[idx]
                p = _softmax(xb @ w.T + b)
                total += float(-np.log(np.maximum(p[np.arange(len(yb)), yb], 1e-30)).mean())
                p[np.arange(len(yb)), yb] -= 1
                p /= np.float32(len(yb))
                gw, gb = p.T @ xb, p.sum(0)
                if mu:
                    gw += prox * (w - w0)
                    gb += prox * (b - b0)
                if cw is not None and cb is not None:
                    gw += cw
                    gb += cb
                w -= lr * gw
                b -= lr * gb
                steps += 1
        return TrainResult({"bias": b, "weight": w}, steps, total / max(steps, 1))

    def evaluate(self, model: Mapping[str, np.ndarray],
                 client: int | None = None) -> dict[str, float] | None:
        if client is not None:
            raise ValueError("the 'linear' workload has no per-client held-out split")
        if self.data.n_test == 0:
            return None
        x, y = self.data.test()
        p = _softmax(x @ np.asarray(model["weight"]).T + model["bias"]).astype(np.float64)
        loss = float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-30)).mean())
        return {"accuracy": float((p.argmax(1) == y).mean()), "loss": loss}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Flat(Learner):
    """`flat`: one float32 vector "x" (W3); initial default_rng(0) normals, training adds
    `flat_step`; no compute, no test set. It measures encoding, transport and aggregation."""

    def init(self) -> Tensors:
        x = np.random.default_rng(0).standard_normal(self.opts["flat_size"])
        return {"x": x.astype(np.float32)}

    def work(self, client: int) -> float:
        return 0.0

    def train(self, model: Mapping[str, np.ndarray], client: int, rng: np.random.Generator,
              hooks: Hooks | None = None) -> TrainResult:
        if model.keys() != {"x"}:
            raise ValueError(f"model has tensors {sorted(model)}; the 'flat' workload "
                             f"expects ['x']")
        return TrainResult({"x": model["x"] + np.float32(self.opts["flat_step"])}, 1, 0.0)

    def evaluate(self, model: Mapping[str, np.ndarray],
                 client: int | None = None) -> dict[str, float] | None:
        return None
