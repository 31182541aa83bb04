"""FedAvg (McMahan et al. 2017) with pluggable aggregation, round deadlines, FedProx clients
and FedAvgM / FedAdam / FedYogi / FedAdagrad server optimisers (Reddi et al. 2021).

Server = node 0, clients = nodes 1..N (node i+1 trains on client i's data). Each round the
server samples clients with its seeded rng, multicasts the global model, and aggregates the
replies (models + sample counts) once all arrive or the deadline passes. With a (weighted)
mean, the exact sum of `protocols.exactsum`, each reply is added as it arrives and dropped, so
the server holds one sum, not every reply, and arrival order cannot change a bit; other
aggregators (median, Krum, ...) gather the replies and get them in sender-id order. On more
than one shard such a mean is summed where the replies are produced: one client per other shard
relays its shard's replies as one exact partial sum per round (`shard_partials`,
`partial_timeout`; protocols/partials.py, docs/aggregation.md), the same bits either way.
Replies for an older round are counted as late and discarded (metric rows "late"; a second
copy of a reply in its own round is a "duplicate"). Clients keep no state; each reply carries
the local loss, steps and any extra training metrics, averaged (by samples) into the round row
as `train_loss`, `train_<metric>`. The server also scores the global model on clients'
held-out splits as `[eval]` says (protocols.learning.evaluation): `client_eval` rows and the
spread of client accuracy per round. Extra metrics `evaluate` returns appear as `test_<name>`.
A round's model is evaluated just after the next round's requests leave (the same rows, in the
same order), so that on parallel shards the evaluation overlaps the clients' training.

The round structure is shared: SCAFFOLD, FedNova and FedDyn (protocols/scaffold.py, fednova.py,
feddyn.py) subclass `Options`, `Server` and `Client` and override the few points where they
differ (what a train request carries, what a reply carries, how replies become the next model,
what a discarded reply still means) and build through `deploy`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import ConfigError, options
from protocols import aggregators, learners, partials, placehint, threats
from protocols.common import Aggregate, Gather, Tensors, aggregator, derive_rng, sample
from protocols.learning import evaluation

DEFAULTS: dict[str, Any] = {
    "name": "fedavg", "fraction": None, "clients_per_round": None,
    "aggregator": "weighted_mean", "aggregator_args": {},
    "round_timeout": None, "min_replies": 1, "eval_every": 1, "mu": 0.0,
    "server_opt": "none", "server_lr": None, "momentum": 0.9, "betas": [0.9, 0.99], "tau": 1e-3,
    "shard_partials": True, "partial_timeout": None, "partial_piece": 1 << 16,
}
SERVER_OPTS = ("none", "avgm", "adam", "yogi", "adagrad")
# The adaptive optimisers take small steps: their update is about server_lr per coordinate.
ADAPTIVE = ("adam", "yogi", "adagrad")
_ROW_FIELDS = ("name", "value", "node", "t", "round", "client", "wall_s")


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
    # On the pseudo-gradient aggregate - global: "avgm" (FedAvgM), "adam", "yogi", "adagrad"
    # (FedAdam, FedYogi, FedAdagrad); "none" moves server_lr of the way to the aggregate.
    server_opt: str = "none"
    server_lr: float = 1.0  # default 1.0, or 0.01 for adam, yogi and adagrad
    momentum: float = 0.9  # avgm
    betas: tuple[float, float] = (0.9, 0.99)  # adam, yogi (beta1 also adagrad's momentum)
    tau: float = 1e-3  # adaptivity: the second moment starts at tau^2 and tau joins its root
    # Shard-local partial sums (protocols/partials.py): on more than one shard, a streaming
    # (weighted) mean has each other shard's clients summed there and one exact partial sent
    # per round; the model is the same bits either way. False: every reply goes to the server.
    shard_partials: bool = True
    # A relay's deadline, seconds after a round's first message reaches it; None: 3/4 of
    # round_timeout (or none without one). Below round_timeout, so the partial still counts.
    partial_timeout: float | None = None
    # Sums per partial message: the server holds its own sum and one piece of a partial at a
    # time (512 KB by default); 0 sends each partial whole.
    partial_piece: int = 1 << 16

    # Keys a subclass adds to DEFAULTS (its own fields, with their defaults).
    EXTRA: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_config(cls, section: Mapping[str, Any], clients: int) -> Options:
        o = options("protocol", section, {**DEFAULTS, **cls.EXTRA},
                    choices={"server_opt": SERVER_OPTS})
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
        default_lr = 0.01 if o["server_opt"] in ADAPTIVE else 1.0
        o["server_lr"] = float(lr) if lr is not None else default_lr
        b = o["betas"]
        check("betas", len(b) == 2 and all(isinstance(x, num) and 0 <= x < 1 for x in b),
              "two numbers in [0, 1)")
        o["betas"] = (float(b[0]), float(b[1]))
        check("tau", o["tau"] > 0, "a number > 0")
        check("partial_piece", o["partial_piece"] >= 0, "an integer >= 0 (0: whole partials)")
        pt = o["partial_timeout"]
        check("partial_timeout", pt is None or (isinstance(pt, num) and not isinstance(pt, bool)
                                                and pt > 0 and (to is None or pt < to)),
              "a number > 0" + ("" if to is None else f" and below round_timeout = {to}"))
        if fr is not None and k is not None:
            raise ConfigError("[protocol] give fraction or clients_per_round, not both")
        cls.check_extra(o, check)
        return cls(**o)

    @classmethod
    def check_extra(cls, o: dict[str, Any], check: Callable[[str, bool, str], None]) -> None:
        """Validate (and normalise in `o`) the keys of EXTRA; `check(key, ok, expected)`."""



@dataclass(frozen=True)
class LocalLrOptions(Options):
    """FedAvg's options plus `local_lr`, the clients' own SGD step (None: the learner's lr),
    for algorithms that correct local steps (SCAFFOLD, FedNova)."""

    local_lr: float | None = None

    EXTRA: ClassVar[dict[str, Any]] = {"local_lr": None}

    @classmethod
    def check_extra(cls, o: dict[str, Any], check: Callable[[str, bool, str], None]) -> None:
        lr = o["local_lr"]
        check("local_lr", lr is None or (isinstance(lr, int | float) and not isinstance(lr, bool)
                                         and lr > 0), "a number > 0")


class ServerOpt:
    """Applies the round's pseudo-gradient (aggregate - global) to the global model."""

    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, model: Tensors, agg: Tensors) -> Tensors:
        o = self.o
        if o.server_opt == "none" and o.server_lr == 1.0:
            return agg  # exactly the aggregate: plain FedAvg
        out: Tensors = {}
        b1, b2 = o.betas
        for k in sorted(model):
            delta = agg[k].astype(np.float64) - model[k]
            if o.server_opt == "none":
                upd = delta
            elif o.server_opt == "avgm":  # FedAvgM: v = momentum v + delta; x += lr v
                self.m[k] = o.momentum * self.m.get(k, 0.0) + delta
                upd = self.m[k]
            else:  # Algorithm 2 of Reddi et al.: momentum m, second moment v from tau^2
                self.m[k] = b1 * self.m.get(k, 0.0) + (1 - b1) * delta
                v, d2 = self.v.get(k, o.tau**2), delta**2
                if o.server_opt == "adam":
                    self.v[k] = b2 * v + (1 - b2) * d2
                elif o.server_opt == "yogi":
                    self.v[k] = v - (1 - b2) * d2 * np.sign(v - d2)
                else:  # adagrad
                    self.v[k] = v + d2
                upd = self.m[k] / (np.sqrt(self.v[k]) + o.tau)
            out[k] = (model[k] + o.server_lr * upd).astype(np.float32)
        return out


class Server(Protocol):
    """Node 0: samples, broadcasts, gathers, aggregates, evaluates, finishes."""

    def __init__(self, opts: Options, learner: learners.Learner, rounds: int,
                 ev: evaluation.EvalOptions | None = None, seed: int = 0,
                 guard: threats.Guard | None = None) -> None:
        self.o, self.learner, self.rounds = opts, learner, rounds
        self.ev, self.seed = ev or evaluation.EvalOptions(), seed
        self.client_summary: dict[str, Any] = {}
        self.guard = guard or threats.Guard()
        self.aggregate: Aggregate = aggregator(opts.aggregator, opts.aggregator_args)
        # A mean sums replies as they come (see the module docstring); a subclass that handles
        # replies or rounds itself gets them gathered, as (n_samples, model) pairs, as before.
        own = type(self).on_message is Server.on_message and \
            type(self)._end_round is Server._end_round
        self.stream = aggregators.streaming(self.aggregate) if own else None
        self.weighted = self.aggregate is not aggregators.mean
        # Made here, not per round only, so a checkpoint finds one in a fresh server.
        self.acc: aggregators.Running | None = self.stream() if self.stream else None
        self.streaming = False  # this round sums replies as they arrive
        # Set by `deploy` where relays may sum shards' replies (protocols.partials).
        self.relaying: partials.Partials | None = None
        self.relayed = 0  # partial sums merged this round
        self.held = 0  # the most bytes of sums and one incoming message held at once
        # Partials whose pieces are still arriving: (relay, senders) -> [pieces merged,
        # replies (from piece 0)]; partials done with this round; their senders meanwhile.
        self.pieces: dict[tuple[int, tuple[int, ...]], list[Any]] = {}
        self.finished: set[tuple[int, tuple[int, ...]]] = set()
        self.arriving: set[int] = set()
        # The deadline passed while pieces were arriving: the round waits for them a while.
        self.closing = False
        self.opt = ServerOpt(opts)
        self.round, self.late = 0, 0
        self.model: Tensors = {}
        self.gather = Gather(0, ())
        self.evaluation: dict[str, float] | None = None

    def on_start(self, ctx: Context) -> None:
        self.model = self.learner.init()
        self._next_round(ctx)

    def _next_round(self, ctx: Context) -> None:
        if not self._begin(ctx):
            self._end_round(ctx)  # nobody sampled: the round ends at once

    def _begin(self, ctx: Context) -> bool:
        """Finish the run after its last round, else sample the next round's clients and send
        them the request; False when no client was sampled (the caller ends that round)."""
        if self.round == self.rounds:
            result: dict[str, Any] = {"model": self.model, "rounds": self.round, "late": self.late}
            if self.evaluation is not None:
                result.update(test_accuracy=self.evaluation["accuracy"],
                              test_loss=self.evaluation["loss"])
            result.update(self.client_summary)
            ctx.finish({**result, **self.guard.result_fields()})
            return True
        self.round += 1
        pop, fr, k = range(1, ctx.n_nodes), self.o.fraction, self.o.clients_per_round
        clients = self.guard.sample(ctx.rng, pop, fr, k)  # Poisson sampling under [privacy]
        if clients is None:
            clients = sample(ctx.rng, pop, fraction=fr, count=k)
        self.gather = Gather(self.round, clients)
        self.streaming = self.stream is not None and self._streams()
        if self.stream is not None and self.streaming:
            self.acc = self.stream()
        if not clients:
            return False
        self.gather.arm(ctx, self.o.round_timeout)
        body = self.request()
        self.relayed = self.held = 0
        self.pieces, self.finished, self.arriving, self.closing = {}, set(), set(), False
        if self.streaming and self.relaying is not None and ctx.shards > 1:
            gs = partials.groups(ctx, clients)
            if gs:
                body["groups"] = gs
        ctx.multicast(clients, "train", round=self.round, **body)
        return True

    def request(self) -> dict[str, Any]:
        """The body of this round's train request (besides `round`): the global model."""
        return {"model": self.model}

    def reply(self, msg: Message) -> Any:
        """What the round keeps of a client's reply: (sample count, model, training stats);
        subclasses append what their replies add."""
        return (msg.n_samples, msg.model, msg.body.get("stats"))

    def combine(self, replies: Sequence[tuple[int, Any]]) -> Tensors | None:
        """The next global model from the round's kept replies, sorted by sender id: the
        aggregate of the models weighted by sample count, through the server optimiser; None
        when `[privacy]` or `[adversary]` handling refuses the round."""
        items = self.guard.collude(self.round, self.model,
                                   [(src, item[0], item[1]) for src, item in replies])
        agg = self.guard.aggregate(self.aggregate, self.model, items, self.round,
                                   self.gather.need)
        return None if agg is None else self.opt.step(self.model, agg)

    def _streams(self) -> bool:
        """Whether this round sums replies as they arrive: a (weighted) mean, FedAvg's own
        reply and combine, and no [adversary] or [privacy] handling (which needs each update)."""
        return (self.stream is not None and type(self).combine is Server.combine
                and type(self).reply is Server.reply
                and self.guard.attack is None and self.guard.dp is None)

    def _streamed(self) -> Tensors:
        """The next global model from the round's running sum (see `_streams`): the same bits
        `combine` gives, since both sum exactly."""
        assert self.acc is not None
        if self.weighted:
            aggregators.check_weights(self.acc.weights)
        return self.opt.step(self.model, self.acc.mean(self.weighted))

    def closed(self, replies: Sequence[tuple[int, Any]]) -> None:
        """The round's gather has closed with `replies` (aggregated or not); nothing here."""

    def discarded(self, ctx: Context, msg: Message, what: str) -> None:
        """A reply the round did not take ("late" or "duplicate"); FedAvg forgets it."""

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind == "partial":
            self._partial(ctx, msg)
            return
        src = msg.src
        if msg.kind == "seen":  # a relay's note of a second copy it did not sum again
            src = msg.client
            if msg.round == self.round and not self.gather.closed:
                self.gather.refused += 1
            else:
                self.gather.late += 1
            self._refused(ctx, src, msg.round)
            return
        if "relayed_from" in msg.body:  # a reply a relay passed on after its partial left
            src = msg.relayed_from
        if self.closing:  # past the deadline, waiting only for a partial's pieces
            self.gather.late += 1
            self.discarded(ctx, msg, self._refused(ctx, src, msg.round, late=True))
            return
        acc = self.acc if self.streaming else None
        item = self.reply(msg)
        if acc is not None:  # the model goes into the round's sum, not into the gather
            item = (item[0], None, *item[2:])
        if self.gather.offer(src, msg.round, item):
            if acc is not None:
                acc.add(float(msg.n_samples) if self.weighted else 1.0, msg.model)
                self.held = max(self.held, acc.nbytes() + _nbytes(msg.model))
            if self.gather.complete:
                self._end_round(ctx)
            return
        self.discarded(ctx, msg, self._refused(ctx, src, msg.round))

    def _refused(self, ctx: Context, src: int, rnd: int, late: bool = False) -> str:
        """Count and report a reply the round did not take: a reply to an earlier round (or
        after the deadline) is late; anything else a duplicate."""
        what = "late" if late or rnd != self.round else "duplicate"
        self.late += what == "late"
        ctx.emit(what, 1, src=src, round=rnd, current=self.round)
        return what

    def _partial(self, ctx: Context, msg: Message) -> None:
        """A piece of a relay's partial sum (protocols.partials). The first piece to arrive
        decides: if the round is open and every sender new and expected, the partial is taken
        and each piece is added to the round's sum as it comes (the exact sum does not care
        in which order); its senders join the gather once every piece is in. Otherwise every
        sender counts as late (or duplicate), once per partial."""
        senders = tuple(int(s) for s in msg.senders)
        key = (msg.src, senders)
        if msg.round == self.round:
            if key in self.finished:
                return  # another copy of a piece of a partial merged or refused already
            if key in self.pieces:
                self._piece(ctx, key, msg)
                return
        g = self.gather
        current = msg.round == self.round and not g.closed and not self.closing
        fresh = current and self.streaming and self.acc is not None and all(
            src not in g.replies and src not in self.arriving
            and (g.expected is None or src in g.expected) for src in senders)
        if not fresh:
            if msg.round == self.round:
                self.finished.add(key)
            elif msg.part != 0:
                return  # an older round's partial counts once, with its first piece
            for src in senders:  # counted as Gather.offer counts what it refuses
                if current:
                    g.refused += 1
                else:
                    g.late += 1
                self._refused(ctx, src, msg.round, late=self.closing)
            return
        self.pieces[key] = [set(), None]
        self.arriving.update(senders)
        self._piece(ctx, key, msg)

    def _piece(self, ctx: Context, key: tuple[int, tuple[int, ...]], msg: Message) -> None:
        got = self.pieces[key]
        part = int(msg.part)
        if part in got[0]:
            return  # a second copy of this piece
        assert self.acc is not None
        self.acc.merge_packed(msg.sum)
        self.held = max(self.held, self.acc.nbytes() + _nbytes(msg.sum))
        got[0].add(part)
        if part == 0:
            got[1] = [(int(src), int(n), stats) for src, n, stats in msg.replies]
        if len(got[0]) < int(msg.parts):
            return
        del self.pieces[key]
        self.finished.add(key)
        self.arriving.difference_update(key[1])
        for src, n, stats in got[1]:  # checked when the first piece came
            self.gather.replies[src] = (n, None, stats)
        self.relayed += 1
        if self.closing:
            if not self.pieces:
                self._end_round(ctx)
        elif self.gather.complete:
            self._end_round(ctx)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        if key == self.gather.timer_key:
            if self.pieces:
                # A partial whose first piece came in time counts: the round waits for the
                # rest (sent back to back, and never lost: see `_partials`), taking nothing
                # else meanwhile.
                self.closing = True
                return
            self._end_round(ctx)

    def _end_round(self, ctx: Context) -> None:
        replies = self.gather.close(ctx)
        self.closed(replies)
        aggregated = len(replies) >= min(self.o.min_replies, self.gather.need)
        if aggregated:  # [adversary] and [privacy] act in combine (protocols.threats)
            combined = self._streamed() if self.streaming else self.combine(replies)
            aggregated = combined is not None
            if combined is not None:
                self.model = combined
        r, last = self.round, self.round == self.rounds
        counts = dict(clients=len(replies), sampled=self.gather.need, late=self.gather.late,
                      aggregated=aggregated)
        guarded = self.guard.end_round([src for src, _ in replies] if aggregated else [])
        trained = _train_means([(item[0], item[2]) for _, item in replies])
        if ctx.shards > 1 and self.streaming:
            # Its own row, so that round rows stay the same for any shard count.
            ctx.emit("partials", self.relayed, round=r, sum_peak_bytes=self.held)
        # The next round's requests leave before this round's model is evaluated, so that on
        # parallel shards the evaluation overlaps the clients' training. Nothing here reads
        # what `_begin` changes (the model stays until the next round ends), so the results
        # and the rows are those of evaluating first.
        began = True if last else self._begin(ctx)
        ev = None
        if r % self.o.eval_every == 0 or last:
            ev = self.evaluation = self.learner.evaluate(self.model)
        extra = {f"test_{k}": v for k, v in (ev or {}).items() if k not in ("accuracy", "loss")}
        extra.update(trained)
        if self.ev.clients > 0 and (r % self.ev.every == 0 or last):
            self.client_summary = self._evaluate_clients(ctx, r)
            extra.update(self.client_summary)
        ctx.emit("round", r, accuracy=ev and ev["accuracy"], loss=ev and ev["loss"], **counts,
                 **extra, **guarded)
        if last:
            self._begin(ctx)  # finishes the run
        elif not began:
            self._end_round(ctx)  # the next round sampled nobody

    def _evaluate_clients(self, ctx: Context, r: int) -> dict[str, Any]:
        """Score the global model on a seeded sample of clients' held-out splits: one
        `client_eval` row each, and the summary for the round row."""
        n = ctx.n_nodes - 1
        fraction = None if self.ev.clients >= 1 else self.ev.clients
        # Its own stream (seed, server, round, 1): the training sample's rng is untouched.
        chosen = sample(derive_rng(self.seed, 0, r, 1), range(n), fraction=fraction)
        accs = []
        for client in chosen:
            res = self.learner.evaluate(self.model, client=client)
            if res is None:  # nothing held out on this client
                continue
            accs.append(float(res["accuracy"]))
            # A learner's own metric named like a row field is kept under a prefix.
            fields = {(f"metric_{k}" if k in _ROW_FIELDS else k): v
                      for k, v in res.items() if k != "accuracy"}
            ctx.emit("client_eval", float(res["accuracy"]), round=r, client=client,
                     **fields)
        return evaluation.summary(accs)


class StatefulServer(Server):
    """The server of a protocol whose clients keep state that the server mirrors (SCAFFOLD's
    c = sum p_i c_i, FedDyn's h = sum p_i g_i over all clients): every reply's state change is
    `absorb`ed exactly once, whether it came in time, after the deadline (the client has
    changed its state all the same), or in a round that did not aggregate; network duplicates
    never are. The shares p_i are those of the global objective the aggregator averages:
    sample shares (of all clients' samples) under `weighted_mean`, 1/N otherwise."""

    def __init__(self, opts: Options, learner: learners.Learner, rounds: int,
                 ev: evaluation.EvalOptions | None = None, seed: int = 0) -> None:
        super().__init__(opts, learner, rounds, ev, seed)
        # Per client, rounds it was asked to train in whose reply has not arrived yet.
        self.pending: dict[int, list[int]] = {}
        self.total_samples = 0  # of all clients, once known (weighted_mean only)
        self.weighted_sum = aggregator("weighted_mean")

    def shares(self, srcs: Sequence[int]) -> list[float]:
        """p_i of the senders `srcs` (node ids) in the global objective."""
        n = self.learner.clients
        if self.o.aggregator != "weighted_mean":
            return [1.0 / n] * len(srcs)
        if not self.total_samples:
            self.total_samples = sum(self.learner.samples(i) for i in range(n))
        return [self.learner.samples(src - 1) / max(self.total_samples, 1) for src in srcs]

    def fold(self, state: Tensors, items: Sequence[tuple[int, Mapping[str, np.ndarray]]],
             scale: float = 1.0) -> Tensors:
        """state + scale * sum_i p_i t_i over (sender, tensors) items, in float32."""
        p = self.shares([src for src, _ in items])
        if sum(p) <= 0:
            return state
        mean = self.weighted_sum([(pi, t) for pi, (_, t) in zip(p, items)])
        f = np.float32(scale * sum(p))
        return {k: (state[k] + f * mean[k]).astype(np.float32) for k in sorted(state)}

    def absorb(self, replies: Sequence[tuple[int, Any]]) -> None:
        """Fold replies' state changes (sender, kept reply) into the server's state."""
        raise NotImplementedError

    def closed(self, replies: Sequence[tuple[int, Any]]) -> None:
        got = {src for src, _ in replies}
        for src in sorted(self.gather.expected or ()):
            if src not in got:
                self.pending.setdefault(src, []).append(self.round)
        if replies:
            self.absorb(replies)

    def absorb_late(self, ctx: Context, msg: Message) -> None:
        """Absorb the first copy of a late reply (by default as any other)."""
        self.absorb([(msg.src, self.reply(msg))])

    def discarded(self, ctx: Context, msg: Message, what: str) -> None:
        waiting = self.pending.get(msg.src, [])
        if msg.round in waiting:
            waiting.remove(msg.round)
            if not waiting:
                del self.pending[msg.src]
            self.absorb_late(ctx, msg)


class Client(Protocol):
    """Nodes 1..N: train on the received model, reply with the result; hold nothing between
    (but a round's partial sum, on a node that relays its shard's replies: protocols.partials)."""

    # Set by `deploy` where relays may sum shards' replies (then each node has its own object).
    relaying: partials.Partials | None = None

    def __init__(self, opts: Options, learner: learners.Learner, seed: int,
                 guard: threats.Guard | None = None) -> None:
        self.mu, self.learner, self.seed = opts.mu, learner, seed
        self.guard = guard or threats.Guard()
        self.relay: partials.Relay | None = None  # where relaying is on (set by `deploy`)

    def _relay(self) -> partials.Relay:
        assert self.relay is not None, "a relay's message reached a node that cannot relay"
        return self.relay

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind == "update":  # a reply from this relay's shard
            self._relay().take(ctx, msg.src, msg.round,
                               {k: v for k, v in msg.body.items() if k != "round"})
            return
        client = ctx.id - 1
        group = None
        if self.relaying is not None:
            group = partials.group_of(msg.body.get("groups"), ctx.id)
        relay = None
        if group is not None and group[0] == ctx.id:
            relay = self._relay()
            relay.start(ctx, msg.round, group, msg.src)
        work = self.learner.work(client)
        if work:
            ctx.compute(work=work, label="train")
        rng = derive_rng(self.seed, ctx.id, msg.round)
        body = self.local(client, msg, rng)
        if group is None:
            ctx.send(msg.src, "update", round=msg.round, **body)
        elif relay is not None:
            relay.take(ctx, ctx.id, msg.round, body)
        else:
            ctx.send(group[0], "update", round=msg.round, **body)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        if self.relay is not None:
            self.relay.on_timer(ctx, key)

    def local(self, client: int, msg: Message, rng: np.random.Generator) -> dict[str, Any]:
        """Train on `msg`'s request and return the reply body: model and sample count
        ([adversary] clients train and reply as their attack says)."""
        res = self.guard.client_train(self.learner, msg.model, client, rng, msg.round, self.mu)
        return self.body(client, res)

    def body(self, client: int, res: learners.TrainResult, **extra: Any) -> dict[str, Any]:
        """The reply body for a training result: model, sample count, the training stats
        (loss, steps, the learner's metrics) and `extra`."""
        stats = {"loss": float(res.loss), "steps": int(res.steps),
                 **{k: float(v) for k, v in res.metrics.items()}}
        return {"model": res.model, "n_samples": self.learner.samples(client), "stats": stats,
                **extra}


class StatefulClient(Client):
    """A client that keeps state between rounds (one object per node): it trains at most
    once per round, so a duplicated or stale request cannot move its state twice."""

    def __init__(self, opts: Options, learner: learners.Learner, seed: int) -> None:
        super().__init__(opts, learner, seed)
        self.trained = 0  # the last round this client trained for

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.round <= self.trained:
            ctx.emit("duplicate", 1, src=msg.src, round=msg.round, current=self.trained)
            return
        self.trained = msg.round
        super().on_message(ctx, msg)


def deploy(config: Mapping[str, Any], name: str, opts_cls: type[Options] = Options,
           server_cls: type[Server] = Server, client_cls: type[Client] = Client) -> Deployment:
    """The deployment of a FedAvg-shaped protocol for a validated run config (cheap: nothing
    heavy is made here): one server, and one client object per node when clients keep state
    (a `StatefulClient`), else one shared by all."""
    run = config.get("run", {})
    learner = learners.make(config)
    opts = opts_cls.from_config(config.get("protocol", {}), learner.clients)
    ev = evaluation.validate(config.get("eval", {}), learner)
    if "rounds" not in run or type(run["rounds"]) is not int or run["rounds"] < 1:
        raise ConfigError(f"[run] rounds = {run.get('rounds')!r}; expected an integer >= 1")
    seed = int(run.get("seed", 0))
    aggregator(opts.aggregator, opts.aggregator_args)  # fail on a bad name now, not mid-run
    rounds = run["rounds"]
    # [adversary] and [privacy] (protocols.threats): honoured by the protocols whose build
    # lists them in `honours`; the runner refuses the sections for the others.
    guard = threats.Guard.from_config(config, learner, seed, sampled=opts.clients_per_round)
    relays = _partials(config, opts, server_cls, client_cls, guard)

    def client() -> Client:
        c = client_cls(opts, learner, seed)
        c.guard = guard
        if relays is not None:
            c.relaying, c.relay = relays, partials.Relay(relays)
        return c

    per_node = issubclass(client_cls, StatefulClient) or relays is not None
    shared = None if per_node else client()

    def make_node(i: int) -> Protocol:
        if i == 0:
            server = server_cls(opts, learner, rounds, ev, seed)
            server.guard = copy.deepcopy(guard)  # the server's own: it keeps adaptive state
            server.relaying = relays
            return server
        return shared if shared is not None else client()

    return Deployment(
        node_ids=list(range(learner.clients + 1)),
        make_node=make_node,
        describe=f"{name}: server 0, clients 1..{learner.clients}, {rounds} rounds",
        prepare=getattr(learner, "prepare", None),  # a user's learner may have none
        load=placehint.server_load(learner, opts.clients_per_round, opts.fraction,
                                   opts.eval_every, relayed=relays is not None),
    )


def _partials(config: Mapping[str, Any], opts: Options, server_cls: type[Server],
              client_cls: type[Client], guard: threats.Guard) -> partials.Partials | None:
    """How relays sum shards' replies, where they may (else None): `shard_partials` on, a
    server that streams a (weighted) mean (`Server._streams`: FedAvg's own reply, combine and
    round, no [adversary] or [privacy]), clients that relay as `Client` does, no lossy codec
    (its stages may pick the partial's tensors too), and a transport that may run more than
    one shard (inproc: `shards` > 1)."""
    tr = config.get("transport", {})
    maybe_shards = tr.get("shards", 1 if tr.get("kind", "inproc") == "inproc" else 0) != 1
    agg = aggregator(opts.aggregator, opts.aggregator_args)
    own = all(getattr(server_cls, f) is getattr(Server, f)
              for f in ("combine", "reply", "on_message", "_end_round")) and all(
        getattr(client_cls, f) is getattr(Client, f) for f in ("on_message", "on_timer"))
    codec = config.get("codec", {})
    lossy = bool(codec.get("stages") or codec.get("rules"))
    if not (opts.shard_partials and maybe_shards and own and not lossy
            and aggregators.streaming(agg) is not None
            and guard.attack is None and guard.dp is None):
        return None
    timeout = opts.partial_timeout
    if timeout is None and opts.round_timeout is not None:
        timeout = 0.75 * opts.round_timeout
    # In pieces, so the server never holds a whole second sum. A round waits for the rest of
    # a partial it has begun to add (it cannot take it apart again), so where a network model
    # may lose messages (loss, crashes, partitions) partials go whole: they arrive or not.
    net = config.get("network") or {}
    loses = bool(net.get("crashes") or net.get("partitions")) or any(
        float(d.get("loss") or 0) > 0 for d in [net, *(net.get("links") or [])])
    return partials.Partials(weighted=agg is not aggregators.mean, timeout=timeout,
                             piece=0 if loses else opts.partial_piece)


def build(config: Mapping[str, Any]) -> Deployment:
    """The FedAvg deployment for a validated run config (cheap: nothing heavy is made here)."""
    return deploy(config, "fedavg")


def _nbytes(x: Any) -> int:
    """Bytes of the arrays in a message body's value (dicts and lists walked)."""
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if isinstance(x, Mapping):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, list | tuple):
        return sum(_nbytes(v) for v in x)
    return 0


def _train_means(items: list[tuple[float, Mapping[str, float] | None]]
                 ) -> dict[str, float | int]:
    """Sample-weighted means of the clients' training stats, as `train_<name>` (steps summed)."""
    got = [(float(n), st) for n, st in items if st]
    total = sum(n for n, _ in got)
    out: dict[str, float | int] = {}
    for name in sorted({k for _, st in got for k in st}):
        pairs = [(n, float(st[name])) for n, st in got if name in st]
        if name == "steps":
            out["train_steps"] = int(sum(v for _, v in pairs))
        elif total > 0:
            out[f"train_{name}"] = sum(n * v for n, v in pairs) / total
    return out


build.honours = ("adversary", "privacy")  # type: ignore[attr-defined]
