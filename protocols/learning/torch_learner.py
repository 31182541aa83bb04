"""The generic torch learner: any `nn.Module` (by name, see `models`) on any `[data]`.

`[workload]` keys it reads (validated in protocols.learners): `model`, `optimizer` ("sgd" with
`momentum`, `nesterov` and `weight_decay`, or "adam" with `betas` and `weight_decay`), `lr`,
`batch_size`, `epochs` (or `local_steps` > 0: exactly that many minibatches, reshuffling
each pass, as FedAvg with K local steps), `loss` ("cross_entropy", "nll" on
log-probabilities, or "mse" against one-hot targets), `device` ("auto": cuda when available,
else cpu; "cpu"; "cuda"; "cuda:N"), `torch_threads`, `hidden` (mlp width), `eval_batch`
(evaluation batch size).

Models cross the wire as named float32 numpy arrays; batches and parameters live on the device.
On cuda, deterministic algorithms are switched on (and CUBLAS_WORKSPACE_CONFIG set), so a run
repeats bit for bit on one machine. The optimizer state starts fresh at every `train` call
(clients keep no state between rounds, as in FedAvg). Hooks act on each step's gradient before
the optimizer: grad += correction + prox_mu * (w - anchor).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from kernel.options import ConfigError
from protocols.learners import (
    Hooks,
    Learner,
    Tensors,
    TrainResult,
    hook_terms,
    set_torch_threads,
)
from protocols.learning import models


class TorchLearner(Learner):
    """A torch model trained by minibatches of a client's data (see the module doc)."""

    def __init__(self, opts: Mapping[str, Any], data: Any) -> None:
        self.opts = dict(opts)
        self.clients = int(opts["clients"])
        self.epochs, self.batch, self.lr = opts["epochs"], opts["batch_size"], opts["lr"]
        self.data = data
        self._net: Any = None
        # Built now, on the cpu, so a bad model is a config error before the run starts;
        # it moves to its device on first use (a ray driver may have no GPU).
        self._built = self._build()

    # -- set-up --------------------------------------------------------------------------

    def _device(self) -> Any:
        import torch

        want = self.opts["device"]
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"[workload] device = {self.opts['device']!r} but torch sees "
                                  f"no CUDA device here; use 'cpu' or 'auto' (on ray, give "
                                  f"shards GPUs with [transport] gpus_per_shard)")
            index = int(want.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ConfigError(f"[workload] device = {want!r} but torch sees "
                                  f"{torch.cuda.device_count()} CUDA device(s)")
            # cuBLAS is deterministic only with a fixed workspace; set before its first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        return torch.device(want)

    def _build(self) -> Any:
        import torch

        set_torch_threads(self.opts["torch_threads"])
        with torch.random.fork_rng(devices=[]):  # the caller's torch RNG state stays as it was
            torch.manual_seed(0)
            net = models.build(self.opts["model"], tuple(self.data.shape),
                               int(self.data.classes), self.opts["hidden"])
        for name, p in net.named_parameters():
            if p.dtype != torch.float32:
                raise ConfigError(f"[workload] model = {self.opts['model']!r}: parameter "
                                  f"{name!r} is {p.dtype}; models travel as float32")
        return net

    def _setup(self) -> None:
        set_torch_threads(self.opts["torch_threads"])
        self.device = self._device()
        net, self._built = self._built.to(self.device), None
        self._names = [name for name, _ in net.named_parameters()]
        self._params = [p for _, p in net.named_parameters()]
        self._initial = {n: p.detach().cpu().numpy().copy()
                         for n, p in zip(self._names, self._params)}
        # On the cpu, numpy views of the parameters make loading a model one copy.
        self._views = ({n: p.detach().numpy() for n, p in zip(self._names, self._params)}
                       if self.device.type == "cpu" else None)
        self._net = net

    def _load(self, model: Mapping[str, np.ndarray]) -> None:
        import torch

        if self._net is None:
            self._setup()
        self._check(model, self._initial)
        if self._views is not None:
            for name, view in self._views.items():
                np.copyto(view, model[name], casting="same_kind")
        else:
            with torch.no_grad():
                for name, p in zip(self._names, self._params):
                    p.copy_(torch.from_numpy(np.asarray(model[name], np.float32)))

    def _tensor(self, a: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _model(self) -> Tensors:
        if self._views is not None:
            return {n: v.copy() for n, v in self._views.items()}
        return {n: p.detach().cpu().numpy().copy() for n, p in zip(self._names, self._params)}

    def _loss(self, out: Any, y: Any) -> Any:
        import torch.nn.functional as F

        kind = self.opts["loss"]
        if kind == "cross_entropy":
            return F.cross_entropy(out, y)
        if kind == "nll":
            return F.nll_loss(out, y)
        return F.mse_loss(out, F.one_hot(y, out.shape[1]).to(out.dtype))

    # -- the learner interface -------------------------------------------------------------

    def init(self) -> Tensors:
        if self._net is None:
            self._setup()
        return {n: v.copy() for n, v in self._initial.items()}

    def samples(self, client: int) -> int:
        return int(self.data.samples(client))

    def work(self, client: int) -> float:
        n = self.samples(client)
        steps = self.opts["local_steps"]
        return float(steps * min(self.batch, n) if steps else n * self.epochs)

    def train(self, model: Mapping[str, np.ndarray], client: int, rng: np.random.Generator,
              hooks: Hooks | None = None) -> TrainResult:
        import torch

        self._load(model)
        x, y = self.data.client(client)
        n = len(y)
        if n == 0:
            return TrainResult(self._model(), 0, 0.0)
        xs, ys = self._tensor(x), self._tensor(y)
        params, net = self._params, self._net
        mu, anchor, corr = hook_terms(hooks, model, self._names, self._tensor)
        step = _Optimizer(self.opts, params)
        steps, total = 0, torch.zeros((), dtype=torch.float64, device=self.device)
        net.train()
        for idx in self._batches(n, rng):
            loss = self._loss(net(xs[idx]), ys[idx])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                total += loss.detach()
                fixed = []
                for p, g, a, c in zip(params, grads, anchor, corr):
                    if a is not None:
                        g = g.add(p - a, alpha=mu)
                    if c is not None:
                        g = g.add(c)
                    fixed.append(g)
                step(fixed)
            steps += 1
        return TrainResult(self._model(), steps, float(total) / max(steps, 1))

    def _batches(self, n: int, rng: np.random.Generator) -> Iterator[Any]:
        """Index tensors of the minibatches of one train call: `epochs` passes over a fresh
        permutation each, or `local_steps` batches cycling through such passes."""
        todo = self.opts["local_steps"]
        passes = 0
        while (passes < self.epochs) if not todo else todo > 0:
            order = self._tensor(rng.permutation(n))
            passes += 1
            for start in range(0, n, self.batch):
                if self.opts["local_steps"]:
                    if todo == 0:
                        return
                    todo -= 1
                yield order[start:start + self.batch]

    def evaluate(self, model: Mapping[str, np.ndarray],
                 client: int | None = None) -> dict[str, float] | None:
        import torch

        if client is None:
            data = self.data.test()
            if data is None:
                return None
        else:
            if not self.data.has_holdout:
                raise ValueError("this workload has no per-client held-out split "
                                 "([data] holdout = 0)")
            data = self.data.holdout(client)
        x, y = data
        if len(y) == 0:
            return None
        self._load(model)
        net = self._net
        net.eval()
        correct, loss_sum = 0.0, 0.0
        eb = self.opts["eval_batch"]
        with torch.no_grad():
            for start in range(0, len(y), eb):
                xb, yb = self._tensor(x[start:start + eb]), self._tensor(y[start:start + eb])
                out = net(xb)
                loss_sum += float(self._loss(out, yb)) * len(yb)
                correct += float((out.argmax(1) == yb).sum())
        return {"accuracy": correct / len(y), "loss": loss_sum / len(y), "samples": len(y)}


class _Optimizer:
    """SGD (momentum, nesterov, weight decay: torch.optim.SGD's update) or Adam (torch.optim
    .Adam's, L2 weight decay) on a parameter list; fresh state per instance."""

    def __init__(self, opts: Mapping[str, Any], params: list[Any]) -> None:
        self.o, self.params = opts, params
        self.kind = opts["optimizer"]
        self.bufs: list[Any] = []
        self.v: list[Any] = []
        self.t = 0

    def __call__(self, grads: list[Any]) -> None:
        import torch

        o, params = self.o, self.params
        lr, wd = o["lr"], o["weight_decay"]
        if wd:
            grads = [g.add(p, alpha=wd) for g, p in zip(grads, params)]
        if self.kind == "sgd":
            m = o["momentum"]
            if m:
                if not self.bufs:
                    self.bufs = [g.clone() for g in grads]
                else:
                    for b, g in zip(self.bufs, grads):
                        b.mul_(m).add_(g)
                grads = ([g.add(b, alpha=m) for g, b in zip(grads, self.bufs)]
                         if o["nesterov"] else self.bufs)
            for p, g in zip(params, grads):
                p.add_(g, alpha=-lr)
            return
        b1, b2 = o["betas"]
        if not self.bufs:
            self.bufs = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m_, v in zip(params, grads, self.bufs, self.v):
            m_.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (c2 ** 0.5)).add_(1e-8)
            p.addcdiv_(m_, denom, value=-lr / c1)
