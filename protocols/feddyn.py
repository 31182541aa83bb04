"""FedDyn (Acar et al. 2021): dynamic regularisation, on FedAvg's rounds.

Client i keeps g_i, the gradient of its local loss at its last model (zero at first, and
again after a crash). It trains from the server model x on L_i(w) - <g_i, w> + alpha/2
||w - x||^2, i.e. every local gradient gets -g_i + alpha (w - x) (the learner's
`Hooks(correction=-g_i, prox_mu=alpha)`), then sets g_i <- g_i - alpha (y_i - x) and replies with
y_i. The server keeps h (= sum p_i g_i over all clients) and

    h <- h - alpha * sum_i p_i (y_i - x)      over the replies
    x <- aggregate(y_i) - h / alpha

with p_i client i's share of all samples under the default `weighted_mean` aggregator, 1/N
under `mean` (the paper's uniform version), then the server optimiser as FedAvg has it. Replies
carry only y_i (FedAvg's bytes), so the server keeps the model it sent last round too: a reply
that misses its round's deadline but arrives during the next round still updates h once (its
client has changed g_i); one later than that is counted ("unabsorbed" rows) and left out. With
alpha = 0 it is FedAvg exactly.

`[protocol] name = "feddyn"` takes FedAvg's keys (protocols/fedavg.py) and:
    alpha   the regulariser's weight (default 0.01; >= 0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kernel.api import Context, Deployment
from kernel.messages import Message
from protocols import fedavg, learners
from protocols.common import Tensors, sub
from protocols.scaffold import zeros_like


@dataclass(frozen=True)
class Options(fedavg.Options):
    """FedAvg's options plus FedDyn's `alpha`."""

    alpha: float = 0.01

    EXTRA: ClassVar[dict[str, Any]] = {"alpha": 0.01}

    @classmethod
    def check_extra(cls, o: dict[str, Any], check: Callable[[str, bool, str], None]) -> None:
        check("alpha", o["alpha"] >= 0, "a number >= 0")


class Server(fedavg.StatefulServer):
    """FedAvg's server, also holding h = sum p_i g_i over all clients."""

    def __init__(self, opts: fedavg.Options, learner: learners.Learner, rounds: int,
                 ev: Any = None, seed: int = 0) -> None:
        super().__init__(opts, learner, rounds, ev, seed)
        self.alpha = float(getattr(opts, "alpha", 0.0))
        self.h: Tensors = {}
        self.sent: dict[int, Tensors] = {}  # round -> model sent, for this and the last round

    def on_start(self, ctx: Context) -> None:
        self.h = zeros_like(self.learner.init())
        super().on_start(ctx)

    def request(self) -> dict[str, Any]:
        self.sent = {r: m for r, m in self.sent.items() if r == self.round - 1}
        self.sent[self.round] = self.model
        return {"model": self.model}

    def absorb(self, replies: Sequence[tuple[int, Any]], rnd: int | None = None) -> None:
        if self.alpha == 0.0:
            return
        start = self.sent[self.round if rnd is None else rnd]
        self.h = self.fold(self.h, [(src, sub(item[1], start)) for src, item in replies],
                           -self.alpha)

    def absorb_late(self, ctx: Context, msg: Message) -> None:
        if msg.round in self.sent:
            self.absorb([(msg.src, self.reply(msg))], msg.round)
        elif self.alpha != 0.0:
            ctx.emit("unabsorbed", 1, src=msg.src, round=msg.round, current=self.round)

    def combine(self, replies: Sequence[tuple[int, Any]]) -> Tensors:
        agg = self.aggregate([(float(item[0]), item[1]) for _, item in replies])
        if self.alpha != 0.0:
            inv = np.float32(1.0 / self.alpha)
            agg = {k: (agg[k] - inv * self.h[k]).astype(np.float32) for k in sorted(agg)}
        return self.opt.step(self.model, agg)


class Client(fedavg.StatefulClient):
    """A FedDyn client: keeps g_i, trains on the dynamically regularised loss."""

    def __init__(self, opts: fedavg.Options, learner: learners.Learner, seed: int) -> None:
        super().__init__(opts, learner, seed)
        self.alpha = float(getattr(opts, "alpha", 0.0))
        self.g: Tensors | None = None  # None: zero (never trained, or restarted)

    def local(self, client: int, msg: Message, rng: np.random.Generator) -> dict[str, Any]:
        x = msg.model
        hooks = None
        if self.alpha != 0.0 or self.mu:
            corr = None if self.g is None else {k: -v for k, v in self.g.items()}
            hooks = learners.Hooks(correction=corr, prox_mu=self.alpha + self.mu)
        res = self.learner.train(x, client, rng, hooks)
        if self.alpha != 0.0:
            g = self.g if self.g is not None else zeros_like(x)
            a = np.float32(self.alpha)
            self.g = {k: (g[k] - a * (res.model[k] - np.asarray(x[k], np.float32)))
                      .astype(np.float32) for k in sorted(g)}
        return self.body(client, res)


def build(config: Mapping[str, Any]) -> Deployment:
    """The FedDyn deployment for a validated run config."""
    return fedavg.deploy(config, "feddyn", Options, Server, Client)
