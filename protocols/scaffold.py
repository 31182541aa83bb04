"""SCAFFOLD (Karimireddy et al. 2020) with option II control variates, on FedAvg's rounds.

The server keeps the model x and a control variate c; client i keeps its own c_i (zero at
first, and again after a crash: a restarted client is a fresh node). Each round the server
sends (x, c); the client trains from x with every local gradient corrected by c - c_i (the
learner's `Hooks.correction`), takes K steps at learning rate lr, and sets

    c_i+ = c_i - c + (x - y) / (K lr)        (option II)

and replies with its model y and dc_i = c_i+ - c_i. K is ||a||_1 of protocols/localsgd.py,
the effective number of steps (the step count for plain SGD; more with momentum, less with
weight decay or `mu`), so c_i still estimates the client's mean gradient. The server moves x
as FedAvg would (the configured aggregator over the models, then the server optimiser;
`server_lr` is the global step size) and c += sum p_i dc_i over the replies, so c stays
sum p_i c_i over all clients (p_i: client i's share of all samples under `weighted_mean`, the
paper's 1/N under `mean`: c must estimate the gradient of the objective the aggregate follows,
or clients with few samples and noisy c_i pull as hard as large ones). A reply the round did
not take (late) still carries a c_i change the client has made, so its dc_i is added to c all
the same; a client trains at most once per round, so a duplicated request cannot change c_i
twice. With zero control variates (the first round) it is FedAvg exactly; it carries one extra
model each way per sampled client.

`[protocol] name = "scaffold"` takes FedAvg's keys (protocols/fedavg.py) and:
    local_lr   the lr in option II's (x - y) / (K lr); default: the workload's lr. Set it
               when the learner is not one of the built-in ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kernel.api import Context, Deployment
from kernel.messages import Message
from kernel.options import ConfigError
from protocols import fedavg, learners
from protocols.common import Tensors, sub
from protocols.localsgd import a_norm, learner_sgd

Options = fedavg.LocalLrOptions


def zeros_like(t: Tensors) -> Tensors:
    """Float32 zeros of every tensor's shape."""
    return {k: np.zeros(np.shape(v), np.float32) for k, v in t.items()}


class Server(fedavg.StatefulServer):
    """FedAvg's server, also holding the global control variate `c`."""

    def __init__(self, opts: fedavg.Options, learner: learners.Learner, rounds: int,
                 ev: Any = None, seed: int = 0) -> None:
        super().__init__(opts, learner, rounds, ev, seed)
        self.c: Tensors = {}

    def on_start(self, ctx: Context) -> None:
        self.c = zeros_like(self.learner.init())
        super().on_start(ctx)

    def request(self) -> dict[str, Any]:
        return {"model": self.model, "c": self.c}

    def reply(self, msg: Message) -> Any:
        return (*super().reply(msg), msg.dc)

    def absorb(self, replies: Sequence[tuple[int, Any]]) -> None:
        self.c = self.fold(self.c, [(src, item[3]) for src, item in replies])


class Client(fedavg.StatefulClient):
    """A SCAFFOLD client: keeps c_i, corrects each local gradient by c - c_i."""

    def __init__(self, opts: fedavg.Options, learner: learners.Learner, seed: int) -> None:
        super().__init__(opts, learner, seed)
        lr = getattr(opts, "local_lr", None)
        self.lr = float(lr if lr is not None else getattr(learner, "lr", 0.0))
        self.sgd = learner_sgd(learner)
        self.ci: Tensors | None = None  # None: zero (never trained, or restarted)

    def local(self, client: int, msg: Message, rng: np.random.Generator) -> dict[str, Any]:
        x, c = msg.model, msg.c
        ci = self.ci if self.ci is not None else zeros_like(c)
        hooks = learners.Hooks(correction=sub(c, ci), prox_mu=self.mu)
        res = self.learner.train(x, client, rng, hooks)
        k = a_norm(res.steps, self.lr, self.mu, **self.sgd)
        if k > 0 and self.lr > 0:
            scale = np.float32(1.0 / (k * self.lr))
            new = {k: (ci[k] - c[k] + scale * (np.asarray(x[k], np.float32) - res.model[k]))
                   .astype(np.float32) for k in sorted(ci)}
        else:  # no step taken: nothing was learnt about the client's gradient
            new = ci
        dc = sub(new, ci)
        self.ci = new
        return self.body(client, res, dc=dc)


def build(config: Mapping[str, Any]) -> Deployment:
    """The SCAFFOLD deployment for a validated run config."""
    dep = fedavg.deploy(config, "scaffold", Options, Server, Client)
    learner = learners.make(config)
    if config.get("protocol", {}).get("local_lr") is None and not getattr(learner, "lr", 0):
        raise ConfigError("[protocol] local_lr is needed: the workload's learner has no lr > 0 "
                          "for SCAFFOLD's c_i update (x - y) / (K lr)")
    return dep
