"""FedNova (Wang et al. 2020): FedAvg with each client's update normalised by its local steps.

Clients train as FedAvg's do (FedProx `mu` included) and reply with their model y_i and
||a_i||_1, the weight local SGD put on its gradients: K_i steps for plain SGD, less with
FedProx's proximal term, more with momentum (protocols/localsgd.py; the paper's Section 4). The
server takes the normalised updates d_i = (y_i - x) / ||a_i||_1, aggregates them with the
configured aggregator (sample-weighted by default: p_i = n_i / n), and steps

    x <- x + tau_eff * aggregate(d_i),   tau_eff = sum p_i ||a_i||_1

then applies the server optimiser as FedAvg does. With equal steps everywhere this is FedAvg
(to float rounding); a client that took more steps no longer pulls the model further.

`[protocol] name = "fednova"` takes FedAvg's keys (protocols/fedavg.py) and:
    local_lr   the lr in ||a_i||_1 with mu, momentum or weight decay; default: the workload's lr
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kernel.api import Deployment
from kernel.messages import Message
from protocols import fedavg, learners
from protocols.common import Tensors, sub
from protocols.localsgd import a_norm, learner_sgd

Options = fedavg.LocalLrOptions


class Server(fedavg.Server):
    """FedAvg's server with FedNova's normalised step."""

    def reply(self, msg: Message) -> Any:
        return (*super().reply(msg), msg.a_norm)

    def combine(self, replies: Sequence[tuple[int, Any]]) -> Tensors:
        items = [(float(n), model, float(a)) for _, (n, model, _, a) in replies if a > 0]
        if not items:  # nobody took a step: nothing to move by
            return self.opt.step(self.model, self.model)
        # p_i of tau_eff: sample shares under weighted_mean, else equal (what the others use).
        p = [n if self.o.aggregator == "weighted_mean" else 1.0 for n, _, _ in items]
        tau = sum(pi * a for pi, (_, _, a) in zip(p, items)) / sum(p)
        normalised = [(n, {k: v / np.float32(a) for k, v in sub(model, self.model).items()})
                      for n, model, a in items]
        d = self.aggregate(normalised)
        x = {k: (self.model[k] + np.float32(tau) * d[k]).astype(np.float32)
             for k in sorted(self.model)}
        return self.opt.step(self.model, x)


class Client(fedavg.Client):
    """A FedAvg client that also reports ||a_i||_1 of its local steps."""

    def __init__(self, opts: fedavg.Options, learner: learners.Learner, seed: int) -> None:
        super().__init__(opts, learner, seed)
        lr = getattr(opts, "local_lr", None)
        self.lr = float(lr if lr is not None else getattr(learner, "lr", 0.0))
        self.sgd = learner_sgd(learner)

    def local(self, client: int, msg: Message, rng: np.random.Generator) -> dict[str, Any]:
        hooks = learners.Hooks(prox_mu=self.mu) if self.mu else None
        res = self.learner.train(msg.model, client, rng, hooks)
        return self.body(client, res, a_norm=a_norm(res.steps, self.lr, self.mu, **self.sgd))


def build(config: Mapping[str, Any]) -> Deployment:
    """The FedNova deployment for a validated run config."""
    return fedavg.deploy(config, "fednova", Options, Server, Client)
