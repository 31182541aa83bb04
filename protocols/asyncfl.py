"""Asynchronous federated learning: FedAsync (Xie et al., 2019) and FedBuff (Nguyen et al., 2022).

Node 0 is the server, node i+1 trains on client i's data (`[workload] clients` clients, models
from protocols.learners). The server hands its model and version v to `concurrency` clients
(0: all); a client trains (`ctx.compute` makes it take its compute model's time on inproc, so
stragglers come back late) and replies with its model (FedAsync) or the change it made
(FedBuff), tagged with the version it started from. The reply's staleness is
t = (server version now) - (that version). The server answers each reply by sending its
current model to the next client: the same one when everyone is active, else one picked at
random (seeded) from the idle clients.

- FedAsync: every reply makes a new version x <- (1 - a) x + a x_client, a = alpha * s(t).
- FedBuff: replies fill a buffer; after every `buffer` (K) of them the server steps
  x <- x + server_lr * (1/K) sum_k s(t_k) delta_k (summed in (client, sequence) order)
  and the version advances by one.

Staleness functions s(t): "constant" 1; "polynomial" (t + 1)^-a; "hinge" 1 if t <= b else
1 / (a (t - b) + 1). The run lasts `[run] rounds` server versions; the server emits one
"round" row per version (value = version, with `updates` received so far, the staleness, and
the test metrics when the workload has a test set) and finishes with {"model", "rounds",
"updates", "test_accuracy"?}. A client that crashes takes its slot with it (no re-dispatch).
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import ConfigError, options
from protocols import common, learners

STALENESS = ("constant", "polynomial", "hinge")
_COMMON: dict[str, Any] = {
    "staleness": "polynomial",
    "a": 0.5,
    "b": 4.0,
    "concurrency": 0,  # clients training at once; 0 = all
    "eval_every": 1,  # evaluate every this many versions (0: only the last)
}
FEDASYNC_DEFAULTS: dict[str, Any] = {"name": "fedasync", "alpha": 0.6, **_COMMON}
FEDBUFF_DEFAULTS: dict[str, Any] = {"name": "fedbuff", "buffer": 10, "server_lr": 1.0, **_COMMON}


def staleness_fn(kind: str, a: float = 0.5, b: float = 4.0) -> Callable[[int], float]:
    """The staleness weight s(t) named `kind` ("constant", "polynomial", "hinge")."""
    if kind == "constant":
        return lambda t: 1.0
    if kind == "polynomial":
        return lambda t: float((t + 1.0) ** -a)
    if kind == "hinge":
        return lambda t: 1.0 if t <= b else 1.0 / (a * (t - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}; choose one of {', '.join(STALENESS)}")


class Client(Protocol):
    """A client: trains whatever model arrives and replies; holds nothing in between."""

    def __init__(self, node: int, learner: learners.Learner, send_delta: bool) -> None:
        self.id, self.learner, self.send_delta = node, learner, send_delta

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind != "model":
            return
        model, client = msg.body["model"], self.id - 1
        trained = self.learner.train(model, client, ctx.rng).model
        ctx.compute(self.learner.work(client))
        if self.send_delta:
            ctx.send(0, "update", v=msg.body["v"], delta=common.sub(trained, model))
        else:
            ctx.send(0, "update", v=msg.body["v"], model=trained)


class Server(Protocol):
    """The server's bookkeeping shared by FedAsync and FedBuff; `absorb` is the difference."""

    def __init__(self, learner: learners.Learner, clients: int, rounds: int,
                 o: Mapping[str, Any]) -> None:
        self.learner, self.clients, self.rounds = learner, clients, rounds
        self.s = staleness_fn(o["staleness"], o["a"], o["b"])
        self.concurrency = o["concurrency"] or clients
        self.eval_every = o["eval_every"]
        self.x: common.Tensors = {}
        self.version = 0
        self.updates = 0
        self.idle: list[int] = []
        self.last_eval: dict[str, float] | None = None

    def on_start(self, ctx: Context) -> None:
        self.x, self.version, self.updates = self.learner.init(), 0, 0
        nodes = list(range(1, self.clients + 1))
        active = common.sample(ctx.rng, nodes, count=self.concurrency)
        chosen = set(active)
        self.idle = [c for c in nodes if c not in chosen]
        ctx.multicast(active, "model", model=self.x, v=0)

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind != "update":
            return
        self.updates += 1
        fields = self.absorb(msg, self.version - msg.body["v"])
        if fields is not None:
            self.version += 1
            self._round(ctx, fields)
            if self.version >= self.rounds:
                ctx.finish(self._result())
                return
        nxt = msg.src
        if self.idle:
            insort(self.idle, msg.src)
            nxt = self.idle.pop(int(ctx.rng.integers(len(self.idle))))
        ctx.send(nxt, "model", model=self.x, v=self.version)

    def absorb(self, msg: Message, staleness: int) -> dict[str, Any] | None:
        """Take one client reply; return the round row's fields when it made a new version."""
        raise NotImplementedError

    def _round(self, ctx: Context, fields: dict[str, Any]) -> None:
        v, every = self.version, self.eval_every
        if (every and v % every == 0) or v >= self.rounds:
            self.last_eval = self.learner.evaluate(self.x)
            fields.update(self.last_eval or {})
        ctx.emit("round", v, updates=self.updates, **fields)

    def _result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.x, "rounds": self.version, "updates": self.updates}
        if self.last_eval is not None:
            out["test_accuracy"] = self.last_eval["accuracy"]
            out["test_loss"] = self.last_eval["loss"]
        return out


class FedAsyncServer(Server):
    """FedAsync's server: mixes every reply in at once, weighted by alpha * s(staleness)."""

    def __init__(self, learner: learners.Learner, clients: int, rounds: int,
                 o: Mapping[str, Any]) -> None:
        super().__init__(learner, clients, rounds, o)
        self.alpha = o["alpha"]

    def absorb(self, msg: Message, staleness: int) -> dict[str, Any] | None:
        a = self.alpha * self.s(staleness)
        keep, take = np.float32(1.0 - a), np.float32(a)
        model = msg.body["model"]
        # Fresh arrays: the old model may still be on its way to clients.
        self.x = {k: keep * self.x[k] + take * model[k] for k in sorted(self.x)}
        return {"client": msg.src - 1, "staleness": staleness, "mix": a}


class FedBuffServer(Server):
    """FedBuff's server: buffers K staleness-weighted deltas, then takes one step."""

    def __init__(self, learner: learners.Learner, clients: int, rounds: int,
                 o: Mapping[str, Any]) -> None:
        super().__init__(learner, clients, rounds, o)
        self.k, self.lr = o["buffer"], o["server_lr"]
        self.buffer: list[tuple[int, int, int, Mapping[str, np.ndarray]]] = []

    def on_start(self, ctx: Context) -> None:
        self.buffer = []
        super().on_start(ctx)

    def absorb(self, msg: Message, staleness: int) -> dict[str, Any] | None:
        self.buffer.append((msg.src, msg.seq, staleness, msg.body["delta"]))
        if len(self.buffer) < self.k:
            return None
        items = sorted(self.buffer, key=lambda it: (it[0], it[1]))
        self.buffer = []
        scale = self.lr / self.k
        new: common.Tensors = {}
        for name in sorted(self.x):
            acc = np.zeros(self.x[name].shape, np.float64)
            for _, _, t, delta in items:
                acc += self.s(t) * np.asarray(delta[name], np.float64)
            new[name] = (self.x[name] + scale * acc).astype(np.float32)
        self.x = new
        stale = [t for _, _, t, _ in items]
        return {"staleness": float(np.mean(stale)), "max_staleness": max(stale)}


def _build(config: Mapping[str, Any], defaults: Mapping[str, Any],
           server: type[Server], send_delta: bool) -> Deployment:
    run = config.get("run", {})
    seed, rounds = run.get("seed", 0), run.get("rounds", 1)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"[run] rounds = {rounds!r}; expected an integer >= 1 "
                          f"(server versions)")
    o = options("protocol", config.get("protocol", {}), defaults,
                choices={"staleness": STALENESS})
    wl = learners.validate(config.get("workload", {}))
    learner = learners.make(config)
    clients = wl["clients"]
    if not 0 <= o["concurrency"] <= clients:
        raise ConfigError(f"[protocol] concurrency = {o['concurrency']}; expected 0 (all) to "
                          f"[workload] clients = {clients}")
    if o["eval_every"] < 0:
        raise ConfigError(f"[protocol] eval_every = {o['eval_every']}; expected an integer >= 0")
    if not o["a"] >= 0 or not o["b"] >= 0:
        raise ConfigError(f"[protocol] a = {o['a']!r}, b = {o['b']!r}; expected numbers >= 0")
    if "alpha" in o and not 0 <= o["alpha"] <= 1:
        raise ConfigError(f"[protocol] alpha = {o['alpha']!r}; expected a number in [0, 1]")
    if "buffer" in o and o["buffer"] < 1:
        raise ConfigError(f"[protocol] buffer = {o['buffer']!r}; expected an integer >= 1")

    def make(i: int) -> Protocol:
        if i == 0:
            return server(learner, clients, rounds, o)
        return Client(i, learner, send_delta)

    return Deployment(node_ids=tuple(range(clients + 1)), make_node=make,
                      params={"seed": seed, "rounds": rounds},
                      describe=f"{o['name']}: server 0, {clients} clients of {wl['model']}",
                      prepare=learner.prepare)


def build_fedasync(config: Mapping[str, Any]) -> Deployment:
    """The `fedasync` deployment."""
    return _build(config, FEDASYNC_DEFAULTS, FedAsyncServer, send_delta=False)


def build_fedbuff(config: Mapping[str, Any]) -> Deployment:
    """The `fedbuff` deployment."""
    return _build(config, FEDBUFF_DEFAULTS, FedBuffServer, send_delta=True)
