"""FedAvg (McMahan et al. 2017) with pluggable aggregation, round deadlines, FedProx clients
and FedAvgM / FedAdam server optimisers (Reddi et al. 2021).

Server = node 0, clients = nodes 1..N (node i+1 trains on client i's data). Each round the
server samples clients with its seeded rng, multicasts the global model, and aggregates the
replies (models + sample counts) once all arrive or the deadline passes. With a (weighted)
mean, the exact sum of `protocols.exactsum`, each reply is added as it arrives and dropped, so
the server holds one sum, not every reply, and arrival order cannot change a bit; other
aggregators (median, Krum, ...) gather the replies and get them in sender-id order.
Replies for an older round are counted as late and discarded (metric rows "late"; a second
copy of a reply in its own round is a "duplicate"). Clients keep no state.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import ConfigError, options
from protocols import aggregators, learners
from protocols.common import Aggregate, Gather, Tensors, aggregator, derive_rng, sample

DEFAULTS: dict[str, Any] = {
    "name": "fedavg", "fraction": None, "clients_per_round": None,
    "aggregator": "weighted_mean", "aggregator_args": {},
    "round_timeout": None, "min_replies": 1, "eval_every": 1, "mu": 0.0,
    "server_opt": "none", "server_lr": None, "momentum": 0.9, "betas": [0.9, 0.99], "tau": 1e-3,
}
SERVER_OPTS = ("none", "avgm", "adam")


@dataclass(frozen=True)
class Options:
    """Validated `[protocol]` parameters of FedAvg."""

    fraction: float | None = None  # of clients per round; or clients_per_round; or all
    clients_per_round: int | None = None
    aggregator: str = "weighted_mean"  # a name in the "aggregators" registry group
    aggregator_args: dict[str, Any] = field(default_factory=dict)  # e.g. {f = 1} for krum
    round_timeout: float | None = None  # seconds (virtual on inproc); None waits for all
    min_replies: int = 1  # fewer at the deadline: the round keeps the model (aggregated=false)
    eval_every: int = 1  # rounds between test-set evaluations (and always the last)
    mu: float = 0.0  # FedProx proximal weight on clients
    server_opt: str = "none"  # "avgm" (FedAvgM) or "adam" (FedAdam) on aggregate - global
    server_lr: float = 1.0  # default 1.0, or 0.01 for adam
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3

    @classmethod
    def from_config(cls, section: Mapping[str, Any], clients: int) -> Options:
        o = options("protocol", section, DEFAULTS, choices={"server_opt": SERVER_OPTS})
        del o["name"]

        def check(key: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ConfigError(f"[protocol] {key} = {o[key]!r}; expected {expected}")

        num = (int, float)
        fr, k, to = o["fraction"], o["clients_per_round"], o["round_timeout"]
        check("fraction", fr is None or (isinstance(fr, num) and 0 < fr <= 1), "a number in (0, 1]")
        check("clients_per_round", k is None or (type(k) is int and 1 <= k <= clients),
              f"an integer in 1..{clients} (workload.clients)")
        check("round_timeout", to is None or (isinstance(to, num) and to > 0), "a number > 0")
        check("min_replies", o["min_replies"] >= 1, "an integer >= 1")
        check("eval_every", o["eval_every"] >= 1, "an integer >= 1")
        check("mu", o["mu"] >= 0, "a number >= 0")
        lr = o["server_lr"]
        check("server_lr", lr is None or (isinstance(lr, num) and lr > 0), "a number > 0")
        default_lr = 0.01 if o["server_opt"] == "adam" else 1.0
        o["server_lr"] = float(lr) if lr is not None else default_lr
        b = o["betas"]
        check("betas", len(b) == 2 and all(isinstance(x, num) and 0 <= x < 1 for x in b),
              "two numbers in [0, 1)")
        o["betas"] = (float(b[0]), float(b[1]))
        check("tau", o["tau"] > 0, "a number > 0")
        if fr is not None and k is not None:
            raise ConfigError("[protocol] give fraction or clients_per_round, not both")
        return cls(**o)


class ServerOpt:
    """Applies the round's pseudo-gradient (aggregate - global) to the global model."""

    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, model: Tensors, agg: Tensors) -> Tensors:
        o = self.o
        if o.server_opt == "none":
            return agg
        out: Tensors = {}
        for k in sorted(model):
            delta = agg[k].astype(np.float64) - model[k]
            if o.server_opt == "avgm":  # FedAvgM: v = momentum v + delta; x += lr v
                self.m[k] = o.momentum * self.m.get(k, 0.0) + delta
                upd = self.m[k]
            else:  # FedAdam, Algorithm 2 of Reddi et al.; v starts at tau^2
                b1, b2 = o.betas
                self.m[k] = b1 * self.m.get(k, 0.0) + (1 - b1) * delta
                self.v[k] = b2 * self.v.get(k, o.tau**2) + (1 - b2) * delta**2
                upd = self.m[k] / (np.sqrt(self.v[k]) + o.tau)
            out[k] = (model[k] + o.server_lr * upd).astype(np.float32)
        return out


class Server(Protocol):
    """Node 0: samples, broadcasts, gathers, aggregates, evaluates, finishes."""

    def __init__(self, opts: Options, learner: learners.Learner, rounds: int) -> None:
        self.o, self.learner, self.rounds = opts, learner, rounds
        self.aggregate: Aggregate = aggregator(opts.aggregator, opts.aggregator_args)
        # A mean sums replies as they come (see the module docstring); a subclass that handles
        # replies or rounds itself gets them gathered, as (n_samples, model) pairs, as before.
        own = type(self).on_message is Server.on_message and \
            type(self)._end_round is Server._end_round
        self.stream = aggregators.streaming(self.aggregate) if own else None
        self.weighted = self.aggregate is not aggregators.mean
        self.acc: aggregators.Accumulator | None = None
        self.opt = ServerOpt(opts)
        self.round, self.late = 0, 0
        self.model: Tensors = {}
        self.gather = Gather(0, ())
        self.evaluation: dict[str, float] | None = None

    def on_start(self, ctx: Context) -> None:
        self.model = self.learner.init()
        self._next_round(ctx)

    def _next_round(self, ctx: Context) -> None:
        if self.round == self.rounds:
            result: dict[str, Any] = {"model": self.model, "rounds": self.round, "late": self.late}
            if self.evaluation is not None:
                result.update(test_accuracy=self.evaluation["accuracy"],
                              test_loss=self.evaluation["loss"])
            ctx.finish(result)
            return
        self.round += 1
        clients = sample(ctx.rng, range(1, ctx.n_nodes), fraction=self.o.fraction,
                         count=self.o.clients_per_round)
        self.gather = Gather(self.round, clients)
        self.acc = self.stream() if self.stream is not None else None
        self.gather.arm(ctx, self.o.round_timeout)
        ctx.multicast(clients, "train", round=self.round, model=self.model)

    def on_message(self, ctx: Context, msg: Message) -> None:
        acc = self.acc
        item = msg.n_samples if acc is not None else (msg.n_samples, msg.model)
        if self.gather.offer(msg.src, msg.round, item):
            if acc is not None:
                acc.add(float(msg.n_samples) if self.weighted else 1.0, msg.model)
            if self.gather.complete:
                self._end_round(ctx)
            return
        # Discarded: a reply to an earlier round is late; anything else a duplicate.
        what = "late" if msg.round != self.round else "duplicate"
        self.late += what == "late"
        ctx.emit(what, 1, src=msg.src, round=msg.round, current=self.round)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        if key == self.gather.timer_key:
            self._end_round(ctx)

    def _end_round(self, ctx: Context) -> None:
        replies = self.gather.close(ctx)
        aggregated = len(replies) >= min(self.o.min_replies, self.gather.need)
        if aggregated:
            if self.acc is not None:
                if self.weighted:
                    aggregators.check_weights(self.acc.weights)
                agg = self.acc.mean(self.weighted)
            else:
                agg = self.aggregate([(float(n), model) for _, (n, model) in replies])
            self.model = self.opt.step(self.model, agg)
        ev = None
        if self.round % self.o.eval_every == 0 or self.round == self.rounds:
            ev = self.evaluation = self.learner.evaluate(self.model)
        ctx.emit("round", self.round, accuracy=ev and ev["accuracy"], loss=ev and ev["loss"],
                 clients=len(replies), sampled=self.gather.need, late=self.gather.late,
                 aggregated=aggregated)
        self._next_round(ctx)


class Client(Protocol):
    """Nodes 1..N: train on the received model, reply with the result; hold nothing between."""

    def __init__(self, opts: Options, learner: learners.Learner, seed: int) -> None:
        self.mu, self.learner, self.seed = opts.mu, learner, seed

    def on_message(self, ctx: Context, msg: Message) -> None:
        client = ctx.id - 1
        work = self.learner.work(client)
        if work:
            ctx.compute(work=work, label="train")
        rng = derive_rng(self.seed, ctx.id, msg.round)
        hooks = learners.Hooks(prox_mu=self.mu) if self.mu else None
        model = self.learner.train(msg.model, client, rng, hooks).model
        ctx.send(msg.src, "update", round=msg.round, model=model,
                 n_samples=self.learner.samples(client))


def build(config: Mapping[str, Any]) -> Deployment:
    """The FedAvg deployment for a validated run config (cheap: nothing heavy is made here)."""
    run = config.get("run", {})
    learner = learners.make(config.get("workload", {}))
    opts = Options.from_config(config.get("protocol", {}), learner.clients)
    if "rounds" not in run or type(run["rounds"]) is not int or run["rounds"] < 1:
        raise ConfigError(f"[run] rounds = {run.get('rounds')!r}; expected an integer >= 1")
    seed = int(run.get("seed", 0))
    aggregator(opts.aggregator, opts.aggregator_args)  # fail on a bad name now, not mid-run
    rounds = run["rounds"]
    client = Client(opts, learner, seed)  # stateless, so one object serves every client node
    return Deployment(
        node_ids=list(range(learner.clients + 1)),
        make_node=lambda i: Server(opts, learner, rounds) if i == 0 else client,
        describe=f"fedavg: server 0, clients 1..{learner.clients}, {rounds} rounds",
        prepare=learner.prepare,
    )
