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

Clients are numbered from 0 (FedAvg's node i+1 is client i). `make` takes a whole run config
(reading `[workload]` and `[data]`) or a bare `[workload]` table. Original learners
(docs/workloads.md), used when there is no `[data]` section: `mlp` (torch, 784->256->10),
`linear` (numpy softmax regression on the same data, for quick tests) and `flat` (one float32
vector; "training" adds `flat_step`; no test set), on the seeded Gaussian mixture made per
client on demand and kept in a small LRU cache, so idle clients cost nothing. Everything else
(`cnn`, `logreg`, `module:function` models, any `[data]`, `learner = "torch"`) runs on the
generic torch learner of protocols.learning (docs/learning.md); `learner = "module:factory"`
is a user's own. Every learner's `data.client(i)` is client i's training split as (x, y).
Local training shuffles with the `rng` it is given, so the caller decides where randomness
comes from (FedAvg derives it from (seed, node, round): the same everywhere).
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernel.api import imports
from kernel.options import NODE_BYTES, ConfigError, options, require_memory

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
    # The generic torch learner (protocols.learning.torch_learner) and user learners:
    "learner": "auto",  # "auto" | "torch" | "module:factory"
    "device": "auto",  # "auto" | "cpu" | "cuda" | "cuda:N"
    "optimizer": "sgd",  # "sgd" | "adam"
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "loss": "cross_entropy",  # "cross_entropy" | "nll" | "mse"
    "eval_batch": 1024,
    "local_steps": 0,  # > 0: exactly this many minibatch steps per train call (not epochs)
}
# mlp, linear and flat are the original learners; cnn, logreg and "module:function" models
# run on the generic torch learner, as does mlp with `learner = "torch"` or a [data] section.
MODELS = ("mlp", "linear", "flat", "cnn", "logreg")
LEGACY = ("mlp", "linear", "flat")
# A table with any of these keys is a whole run config, not a [workload] table.
SECTIONS = ("run", "transport", "protocol", "workload", "data", "eval", "network", "codec",
            "output", "perf")

CENTRE_SEED, CLIENT_SEED_BASE, TEST_SEED, CENTRE_SCALE = 7, 1000, 999, 0.2


def validate(workload: Mapping[str, Any]) -> dict[str, Any]:
    """The `[workload]` table merged over DEFAULTS; ConfigError names any bad key or value."""
    opts = options("workload", workload, DEFAULTS,
                   choices={"optimizer": ("sgd", "adam"),
                            "loss": ("cross_entropy", "nll", "mse")})
    model, learner, device = opts["model"], opts["learner"], opts["device"]
    if model not in MODELS and ":" not in model and model not in _declared("models"):
        raise ConfigError(f"[workload] model = {model!r} is not allowed; choose one of "
                          f"{', '.join(MODELS)} (or give 'module:function')")
    if learner not in ("auto", "torch") and ":" not in learner \
            and learner not in _declared("learners"):
        raise ConfigError(f"[workload] learner = {learner!r} is not allowed; choose 'auto', "
                          f"'torch' (the generic torch learner) or give 'module:factory'")
    if learner == "torch" and model in ("linear", "flat"):
        raise ConfigError(f"[workload] model = {model!r} is not a torch model; with learner = "
                          f"'torch' choose mlp, cnn, logreg or 'module:function'")
    if device not in ("auto", "cpu", "cuda") and not (
            device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"[workload] device = {device!r} is not allowed; choose 'auto', "
                          f"'cpu', 'cuda' or 'cuda:N'")
    b = opts["betas"]
    if len(b) != 2 or not all(isinstance(v, int | float) and 0 <= v < 1 for v in b):
        raise ConfigError(f"[workload] betas = {b!r}; expected two numbers in [0, 1)")
    opts["betas"] = (float(b[0]), float(b[1]))
    for key in ("momentum", "weight_decay"):
        if not opts[key] >= 0:
            raise ConfigError(f"[workload] {key} = {opts[key]!r}; expected a number >= 0")
    positive = ("clients", "samples_per_client", "batch_size", "epochs", "input_dim", "hidden",
                "classes", "flat_size", "torch_threads", "data_cache", "eval_batch")
    if opts["local_steps"] < 0:
        raise ConfigError(f"[workload] local_steps = {opts['local_steps']!r}; expected an "
                          f"integer >= 0 (0: whole epochs)")
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
    _require_memory(opts)
    return opts


def _require_memory(o: Mapping[str, Any]) -> None:
    """Sizes that cannot fit are refused before anything is allocated: per client a node's
    bookkeeping, a few float32 copies of the model, and the cached and test data."""
    # Models outside this table (cnn, logreg, user models) are unknown in size until built.
    params = {"mlp": o["input_dim"] * o["hidden"] + o["hidden"] * o["classes"],
              "linear": o["input_dim"] * o["classes"], "flat": o["flat_size"]}.get(o["model"], 0)
    data = (min(o["data_cache"], o["clients"]) * o["samples_per_client"] + o["test_samples"]
            ) * o["input_dim"] * 4
    need = o["clients"] * NODE_BYTES + 4 * params * 4 + data
    require_memory(f"[workload] clients = {o['clients']}, model {o['model']!r} "
                   f"({params} parameters)", need)


def _declared(group: str) -> list[str]:
    from kernel.registry import names

    return names(group)


def make(config: Mapping[str, Any]) -> Learner:
    """The learner for a whole run config (its `[workload]` and `[data]`), or for a bare
    `[workload]` table; one per process per distinct input, so every node of a shard shares
    one model object and one dataset.

    `learner = "auto"` keeps the original mlp/linear/flat learners when there is no `[data]`
    section; `cnn`, `logreg`, `module:function` models, `learner = "torch"` or a `[data]`
    section give the generic torch learner; `learner = "module:factory"` calls the user's
    factory with the whole config (declared with `@declare("learners")`)."""
    if any(k in SECTIONS for k in config):
        workload, data = config.get("workload", {}), config.get("data")
    else:
        workload, data = config, None
    opts = validate(workload)
    if opts["learner"] not in ("auto", "torch"):
        return _user_learner(opts["learner"], config)
    data_opts = None
    if data is not None:
        from protocols.learning import data as learning_data

        data_opts = learning_data.validate(data)
    # One canonical text of both tables is the cache key (lists, nested tables and all).
    return _make(json.dumps({"workload": opts, "data": data_opts}, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _make(key: str) -> Learner:
    both = json.loads(key)
    opts, dopts = both["workload"], both["data"]
    opts["betas"] = tuple(opts["betas"])
    if dopts is None and opts["learner"] == "auto" and opts["model"] in LEGACY \
            and opts["local_steps"] == 0:
        cls = {"mlp": TorchMLP, "linear": NumpyLinear, "flat": Flat}[opts["model"]]
        return cls(opts)
    if opts["model"] in ("linear", "flat"):
        raise ConfigError(f"[workload] model = {opts['model']!r} works only without a [data] "
                          f"section; choose mlp, cnn, logreg or 'module:function'")
    from protocols.learning import data as learning_data
    from protocols.learning.torch_learner import TorchLearner

    if dopts is None:
        dopts = learning_data.validate({})
    if dopts["dataset"] == "mixture":
        data: Any = learning_data.MixtureData(Mixture(opts), dopts["holdout"])
    else:
        data = learning_data.PooledData(dopts, opts["clients"])
    return TorchLearner(opts, data)


LEARNER_METHODS = ("init", "samples", "work", "train", "evaluate")


def _user_learner(name: str, config: Mapping[str, Any]) -> Learner:
    from protocols.learning.names import resolve

    factory = resolve("learners", name, "[workload] learner", ("auto", "torch"))
    if not callable(factory):
        raise ConfigError(f"[workload] learner = {name!r} is {type(factory).__name__}; "
                          f"expected a factory: a function of the run config returning a learner")
    learner = factory(config)
    missing = [m for m in LEARNER_METHODS if not callable(getattr(learner, m, None))]
    clients = getattr(learner, "clients", None)
    if missing or type(clients) is not int or clients < 1:
        what = (f"lacks {', '.join(missing)}" if missing
                else f"has clients = {clients!r}, not an integer >= 1")
        raise ConfigError(f"[workload] learner = {name!r} returned {type(learner).__name__}, "
                          f"which {what}; a learner offers init, samples, work, train, "
                          f"evaluate and an integer clients")
    return learner  # type: ignore[no-any-return]


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
        self.data: Any = Mixture(opts)

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


def hook_terms(hooks: Hooks | None, model: Mapping[str, np.ndarray], names: list[str],
               convert: Any) -> tuple[float, list[Any], list[Any]]:
    """What a per-tensor training loop needs of `hooks`: the proximal mu, then per name the
    anchor and the correction as float32 copies passed through `convert` (None where unused)."""
    mu = hooks.prox_mu if hooks else 0.0
    anchor: list[Any] = [None] * len(names)
    if mu:  # the proximal term pulls towards the anchor: keep a copy of it
        ref = hooks.anchor if hooks and hooks.anchor is not None else model
        anchor = [convert(np.array(ref[k], np.float32)) for k in names]
    corr: list[Any] = [None] * len(names)
    if hooks and hooks.correction is not None:
        corr = [convert(np.array(hooks.correction[k], np.float32)) for k in names]
    return mu, anchor, corr


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

    @imports("torch")
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
        mu, anchor, corr = hook_terms(hooks, model, self._names, torch.from_numpy)
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
