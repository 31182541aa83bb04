"""SecAgg+ (Bell et al. 2020): FedAvg whose server learns only the sum of the clients' updates.

`[protocol] name = "secaggplus"` takes FedAvg's sampling, evaluation, FedProx and server
optimiser keys (`fraction`, `clients_per_round`, `eval_every`, `mu`, `server_opt`,
`server_lr`, `momentum`, `betas`, `tau`) and these:

    aggregator = "weighted_mean"  # or "mean": clients multiply by their sample count in the ring
    round_timeout = 30.0     # seconds each of the four stages waits (virtual on inproc); unset:
                             # wait for every expected client (a crashed one then stalls the run)
    threshold = 0        # shares that recover a secret: an int >= 2, a fraction in (0, 1) of
                         # a client's share holders (itself + neighbours), or 0 / unset = a
                         # majority of them
    neighbours = 0       # k of the k-regular communication graph (even); 0: complete graph
                         # up to 64 sampled clients, else the even k >= 3 log2(n) (SecAgg+)
    frac_bits = 20       # fixed point: updates are round(delta * 2**frac_bits) in Z/2**64
    clip_range = 64.0    # update coordinates are clipped to +-clip_range before quantising

One round, after the server samples clients and draws the graph (nodes 1..N are clients):

1. `sa_setup` (model, sampled ids, graph seed) -> each client makes two X25519 key pairs and
   a self-mask seed b, and sends its public keys (`sa_keys`). The server forwards to each
   client that answered (U1) its graph neighbours' keys (`sa_roster`; one multicast of all
   keys on a complete graph).
2. Each client Shamir-shares b and its masking private key among its holders (itself and its
   graph neighbours in U1, threshold t), seals each share pair for its holder with
   ChaCha20-Poly1305 under an X25519-agreed key, and sends them via the server (`sa_shares`).
   The server routes them (`sa_inbox`) to the clients that sent shares (U2).
3. Each client trains, quantises its update (times its weight, plus the weight as one more
   element) and masks it: + PRG(b) + sum over neighbours v in U2 of +-PRG(agreed mask key),
   sent as `sa_masked`. Survivors are those whose masked input arrives (U3).
4. `sa_unmask` names U3 and the dropped U2 \\ U3; each client reveals, per holder slot, the
   b share of a survivor or the key share of a dropped client, never both (`sa_reveal`).
   The server recovers each survivor's b and each dropped client's masking key from t shares,
   removes the masks, and gets the exact ring sum of U3's quantised updates.

A stage that ends with fewer than t clients, or a secret with fewer than t shares, fails the
round cleanly: a `secagg_failed` row (round, stage, reason), the model is kept
(`aggregated=false` in the round row) and the next round starts. Round rows add `dropped`,
`stages` (|U1|..|U4|), `included` (U3: whose updates are in the sum) and `sum_sha256`
(sha256 of the unmasked ring sum, which tests recompute from the clients' own vectors).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import ConfigError, options
from protocols import fedavg, learners, threats
from protocols.common import Gather, Tensors, derive_rng, flatten, sample, unflatten
from protocols.secagg import crypto, shamir

SECAGG_DEFAULTS: dict[str, Any] = {
    "threshold": None, "neighbours": 0, "frac_bits": 20, "clip_range": 64.0,
}
# FedAvg keys that make no sense here: the server sees no single update to aggregate robustly.
REFUSED = {"aggregator_args": "secaggplus only sums", "min_replies": "use threshold"}
COMPLETE_UP_TO = 64
KEYS_TAG, SHARES_TAG, GRAPH_TAG = 1, 2, 3  # rng streams apart from training's and sampling's


@dataclass(frozen=True)
class Options:
    """Validated `[protocol]` parameters of SecAgg+: FedAvg's plus the secure-sum ones."""

    fed: fedavg.Options
    weighted: bool
    threshold: float
    neighbours: int
    frac_bits: int
    clip_range: float

    @classmethod
    def from_config(cls, section: Mapping[str, Any], learner: learners.Learner) -> Options:
        sec = {k: v for k, v in section.items() if k in SECAGG_DEFAULTS}
        fed = {k: v for k, v in section.items() if k not in SECAGG_DEFAULTS}
        for key, why in REFUSED.items():
            if key in fed:
                raise ConfigError(f"[protocol] {key}: not a secaggplus key ({why})")
        agg = fed.get("aggregator", "weighted_mean")
        if agg not in ("weighted_mean", "mean"):
            raise ConfigError(f"[protocol] aggregator = {agg!r}; secaggplus sums, so only "
                              f"'weighted_mean' or 'mean'")
        fed["name"] = "fedavg"
        fo = fedavg.Options.from_config(fed, learner.clients)
        o = options("protocol", {**sec}, SECAGG_DEFAULTS)
        t = 0 if o["threshold"] is None else o["threshold"]
        if isinstance(t, bool) or not isinstance(t, int | float) or t < 0 or (
                isinstance(t, float) and t >= 1) or t == 1:
            raise ConfigError(f"[protocol] threshold = {t!r}; expected an integer >= 2, a "
                              f"fraction in (0, 1), or 0 (or unset) for a majority")
        k = o["neighbours"]
        if k < 0 or k % 2:
            raise ConfigError(f"[protocol] neighbours = {k!r}; expected an even integer >= 2, "
                              f"or 0 for the default graph")
        if not 1 <= o["frac_bits"] <= 40:
            raise ConfigError(f"[protocol] frac_bits = {o['frac_bits']!r}; expected 1..40")
        if not o["clip_range"] > 0:
            raise ConfigError(f"[protocol] clip_range = {o['clip_range']!r}; expected > 0")
        # The ring sum must not wrap: |sum| <= n * max weight * clip * 2**frac_bits < 2**63.
        weighted = agg == "weighted_mean"
        wmax = max(learner.samples(c) for c in range(learner.clients)) if weighted else 1
        bits = math.log2(learner.clients * wmax * o["clip_range"]) + o["frac_bits"]
        if bits >= 63:
            raise ConfigError(
                f"[protocol] frac_bits = {o['frac_bits']} with clip_range = {o['clip_range']} "
                f"can overflow the 64-bit ring ({learner.clients} clients x weight up to "
                f"{wmax}); lower frac_bits or clip_range")
        n = fo.clients_per_round or (learner.clients if fo.fraction is None else
                                     max(1, math.ceil(fo.fraction * learner.clients - 1e-9)))
        if isinstance(t, int) and t > n:
            raise ConfigError(f"[protocol] threshold = {t} exceeds the {n} clients sampled per "
                              f"round: every round would fail")
        out = cls(fo, weighted, float(t), k, o["frac_bits"], o["clip_range"])
        holders = degree(out, n) + 1
        if isinstance(t, int) and t > holders:
            raise ConfigError(f"[protocol] threshold = {t} exceeds the {holders} share holders "
                              f"of a client (itself + neighbours = {k}); every round would fail")
        return out

    def holders_threshold(self, holders: int) -> int:
        """t for a client with `holders` share holders (itself + neighbours)."""
        t = self.threshold
        if t == 0:
            return holders // 2 + 1
        if t < 1:
            return max(2, math.ceil(t * holders))
        return int(t)


def degree(o: Options, n: int) -> int:
    """The graph degree for `n` sampled clients (n - 1: complete)."""
    k = o.neighbours
    if k == 0:
        if n <= COMPLETE_UP_TO:
            return n - 1
        k = math.ceil(3 * math.log2(n))
        k += k % 2
    return min(k, n - 1)


def graph(clients: Sequence[int], k: int, seed: int) -> dict[int, list[int]]:
    """A random k-regular graph (Harary graph on a seeded permutation: each client joins the
    k/2 nearest on each side of a ring); complete when k >= n - 1. Sorted neighbour lists."""
    order = _ring(clients, k, seed)
    return {c: neighbours(clients, k, seed, c, order) for c in clients}


def _ring(clients: Sequence[int], k: int, seed: int) -> list[int]:
    if k >= len(clients) - 1:
        return list(clients)
    return [clients[int(i)] for i in np.random.default_rng(seed).permutation(len(clients))]


def neighbours(clients: Sequence[int], k: int, seed: int, node: int,
               order: list[int] | None = None) -> list[int]:
    """`node`'s sorted neighbours in `graph(clients, k, seed)`, in O(n) (each client works
    out its own)."""
    n = len(clients)
    if k >= n - 1:
        return [d for d in clients if d != node]
    order = order if order is not None else _ring(clients, k, seed)
    pos = order.index(node)
    return sorted({order[(pos + j) % n] for j in range(-(k // 2), k // 2 + 1) if j})


class SecAggFailed(RuntimeError):
    """A round cannot unmask: fewer than the threshold survived a stage or hold a share."""


class Server(Protocol):
    """Node 0: samples, drives the four stages, unmasks the sum, steps the global model."""

    def __init__(self, o: Options, learner: learners.Learner, rounds: int, seed: int,
                 guard: threats.Guard) -> None:
        self.o, self.learner, self.rounds, self.guard = o, learner, rounds, guard
        self.seed = seed
        self.opt = fedavg.ServerOpt(o.fed)
        self.round = 0
        self.model: Tensors = {}
        self.evaluation: dict[str, float] | None = None
        self.sampled: list[int] = []
        self.graph_seed = 0
        self.k = 0
        self.nbrs: dict[int, list[int]] = {}  # this round's communication graph
        self.stage = ""
        self.gather = Gather(0, ())
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # U1: id -> (enc public, mask public)
        self.u2: list[int] = []
        self.u3: list[int] = []
        self.acc = np.zeros(0, np.uint64)
        self.counts: list[int] = []

    def on_start(self, ctx: Context) -> None:
        self.model = self.learner.init()
        self._next_round(ctx)

    # -- stages ---------------------------------------------------------------------------

    def _next_round(self, ctx: Context) -> None:
        if self.round == self.rounds:
            result: dict[str, Any] = {"model": self.model, "rounds": self.round}
            if self.evaluation is not None:
                result.update(test_accuracy=self.evaluation["accuracy"],
                              test_loss=self.evaluation["loss"])
            ctx.finish({**result, **self.guard.result_fields()})
            return
        self.round += 1
        fo = self.o.fed
        self.sampled = sample(ctx.rng, range(1, ctx.n_nodes), fraction=fo.fraction,
                              count=fo.clients_per_round)
        # Its own stream, so that the server samples the same clients as FedAvg would.
        self.graph_seed = int(derive_rng(self.seed, 0, self.round, GRAPH_TAG).integers(2**62))
        self.k = degree(self.o, len(self.sampled))
        self.nbrs = graph(self.sampled, self.k, self.graph_seed)
        self.counts = []
        self._expect(ctx, "sa_keys", self.sampled)
        ctx.multicast(self.sampled, "sa_setup", round=self.round, model=self.model,
                      clients=self.sampled, graph_seed=self.graph_seed, k=self.k)

    def _expect(self, ctx: Context, stage: str, senders: Sequence[int]) -> None:
        self.stage = stage
        self.gather = Gather((self.round, stage), senders)
        self.gather.arm(ctx, self.o.fed.round_timeout)

    def on_message(self, ctx: Context, msg: Message) -> None:
        if self.gather.offer(msg.src, (msg.round, msg.kind), msg.body):
            if self.gather.complete:
                self._advance(ctx)
            return
        what = "late" if msg.round != self.round else "duplicate"
        ctx.emit(what, 1, src=msg.src, round=msg.round, current=self.round, stage=msg.kind)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        if key == self.gather.timer_key:
            self._advance(ctx)

    def _advance(self, ctx: Context) -> None:
        replies = dict(self.gather.close(ctx))
        self.counts.append(len(replies))
        holders = self.k + 1
        t = self.o.holders_threshold(holders)
        try:
            if len(replies) < t:
                raise SecAggFailed(f"{len(replies)} clients answered {self.stage}, "
                                   f"threshold {t}")
            if self.stage == "sa_keys":
                ids = sorted(replies)
                self.keys = {i: (bytes(replies[i]["c_pk"]), bytes(replies[i]["s_pk"]))
                             for i in ids}
                self._expect(ctx, "sa_shares", ids)
                if self.k >= len(self.sampled) - 1:  # complete graph: one body for all
                    ctx.multicast(ids, "sa_roster", round=self.round, ids=ids,
                                  c_pk=[self.keys[i][0] for i in ids],
                                  s_pk=[self.keys[i][1] for i in ids])
                    return
                for v in ids:  # each client gets its neighbours' keys only
                    mine = [u for u in sorted([v, *self.nbrs[v]]) if u in self.keys]
                    ctx.send(v, "sa_roster", round=self.round, ids=mine,
                             c_pk=[self.keys[i][0] for i in mine],
                             s_pk=[self.keys[i][1] for i in mine])
            elif self.stage == "sa_shares":
                self.u2 = sorted(replies)
                inbox: dict[int, tuple[list[int], list[bytes]]] = {v: ([], []) for v in self.u2}
                for u in self.u2:
                    for v, ct in zip(replies[u]["to"], replies[u]["ct"]):
                        if v in inbox:
                            inbox[v][0].append(u)
                            inbox[v][1].append(ct)
                self._expect(ctx, "sa_masked", self.u2)
                for v in self.u2:
                    ctx.send(v, "sa_inbox", round=self.round, frm=inbox[v][0], ct=inbox[v][1])
            elif self.stage == "sa_masked":
                self.u3 = sorted(replies)
                acc = np.array(replies[self.u3[0]]["y"], np.uint64)
                for u in self.u3[1:]:
                    np.add(acc, replies[u]["y"], out=acc)
                self.acc = acc
                dropped = [u for u in self.u2 if u not in replies]
                self._expect(ctx, "sa_reveal", self.u3)
                ctx.multicast(self.u3, "sa_unmask", round=self.round, survivors=self.u3,
                              dropped=dropped)
            else:
                self._unmask(ctx, replies, t)
        except SecAggFailed as exc:
            ctx.emit("secagg_failed", self.round, stage=self.stage, reason=str(exc))
            self._end_round(ctx, None)

    def _unmask(self, ctx: Context, replies: Mapping[int, Any], t: int) -> None:
        nbrs = self.nbrs
        b_shares: dict[int, list[tuple[int, bytes]]] = {}
        s_shares: dict[int, list[tuple[int, bytes]]] = {}
        for v in sorted(replies):
            r = replies[v]
            for u, sh in zip(r["b_ids"], r["b_sh"]):
                b_shares.setdefault(int(u), []).append((v, bytes(sh)))
            for u, sh in zip(r["s_ids"], r["s_sh"]):
                s_shares.setdefault(int(u), []).append((v, bytes(sh)))
        acc = self.acc
        survivors = set(self.u3)
        for u in self.u3:
            got = b_shares.get(u, [])
            if len(got) < t:
                raise SecAggFailed(f"{len(got)} shares of client {u}'s self mask, threshold {t}")
            crypto.add_mask(acc, shamir.combine(got, t, crypto.KEY_BYTES), -1)
        for u in self.u2:
            if u in survivors:
                continue
            got = s_shares.get(u, [])
            if len(got) < t:
                raise SecAggFailed(f"{len(got)} shares of dropped client {u}'s key, "
                                   f"threshold {t}")
            sk = shamir.combine(got, t, crypto.KEY_BYTES)
            peers = [v for v in nbrs[u] if v in survivors]
            seeds = crypto.agree_many(sk, [self.keys[v][1] for v in peers], b"mask")
            for v, seed in zip(peers, seeds):  # v added sign(v, u) PRG(s_vu): take it away
                crypto.add_mask(acc, seed, -1 if v < u else 1)
        self._end_round(ctx, acc)

    def _end_round(self, ctx: Context, acc: np.ndarray | None) -> None:
        self.gather.close(ctx)
        aggregated = acc is not None
        extra: dict[str, Any] = {}
        if acc is not None:
            weight = int(acc[-1].view(np.int64))
            extra["sum_sha256"] = hashlib.sha256(acc.tobytes()).hexdigest()
            if weight > 0:
                delta = crypto.dequantise(acc[:-1], self.o.frac_bits) / weight
                flat = flatten(self.model).astype(np.float64) + delta
                self.model = self.opt.step(self.model, unflatten(flat.astype(np.float32),
                                                                 self.model))
            else:
                aggregated = False
        ev = None
        if self.round % self.o.fed.eval_every == 0 or self.round == self.rounds:
            ev = self.evaluation = self.learner.evaluate(self.model)
        n3 = len(self.u3) if aggregated else 0
        dropped = len(self.u2) - len(self.u3) if aggregated else None
        ctx.emit("round", self.round, accuracy=ev and ev["accuracy"], loss=ev and ev["loss"],
                 clients=n3, sampled=len(self.sampled), aggregated=aggregated, dropped=dropped,
                 stages=list(self.counts), included=list(self.u3) if aggregated else [],
                 **extra, **self.guard.end_round(self.u3 if aggregated else []))
        self.keys, self.u2, self.u3, self.acc = {}, [], [], np.zeros(0, np.uint64)
        self.nbrs = {}
        self._next_round(ctx)


class Client(Protocol):
    """Nodes 1..N: one round's secrets, received shares and the global model, as plain data
    (raw key bytes, ints, numpy arrays); a restarted client has none and sits the round out."""

    def __init__(self, o: Options, learner: learners.Learner, seed: int,
                 guard: threats.Guard) -> None:
        self.o, self.learner, self.seed, self.guard = o, learner, seed, guard
        self.round = 0
        self.done: list[str] = []  # stages answered this round (duplicates are ignored)
        self.model: Tensors = {}
        self.nbrs: list[int] = []
        self.c_sk = self.s_sk = self.b = b""
        self.pub: dict[int, tuple[bytes, bytes]] = {}
        self.enc: dict[int, bytes] = {}  # neighbour -> agreed share-transport key
        self.shares: dict[int, tuple[bytes, bytes]] = {}  # holder slot: u -> (b, key) shares
        self.t = 0

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind == "sa_setup":
            if msg.round <= self.round:
                return
            self._setup(ctx, msg)
        elif msg.round != self.round or msg.kind in self.done:
            return
        elif msg.kind == "sa_roster" and "sa_setup" in self.done:
            self._share(ctx, msg)
        elif msg.kind == "sa_inbox" and "sa_roster" in self.done:
            self._mask(ctx, msg)
        elif msg.kind == "sa_unmask" and "sa_inbox" in self.done:
            self._reveal(ctx, msg)

    def _setup(self, ctx: Context, msg: Message) -> None:
        self.round, self.done = msg.round, ["sa_setup"]
        self.model = dict(msg.model)
        self.nbrs = neighbours(list(msg.clients), msg.k, msg.graph_seed, ctx.id)
        self.t = self.o.holders_threshold(msg.k + 1)
        rng = derive_rng(self.seed, ctx.id, msg.round, KEYS_TAG)
        self.c_sk, c_pk = crypto.keypair(rng.bytes(crypto.KEY_BYTES))
        self.s_sk, s_pk = crypto.keypair(rng.bytes(crypto.KEY_BYTES))
        self.b = rng.bytes(crypto.KEY_BYTES)
        self.pub, self.shares, self.enc = {}, {}, {}
        ctx.send(msg.src, "sa_keys", round=msg.round, c_pk=c_pk, s_pk=s_pk)

    def _share(self, ctx: Context, msg: Message) -> None:
        self.done.append("sa_roster")
        me = ctx.id
        mine = set(self.nbrs) | {me}
        self.pub = {int(i): (bytes(c), bytes(s))
                    for i, c, s in zip(msg.ids, msg.c_pk, msg.s_pk) if int(i) in mine}
        holders = sorted(self.pub)
        if me not in self.pub or len(holders) < self.t:
            return  # too few holders to keep the secrets safe: sit this round out
        rng = derive_rng(self.seed, me, self.round, SHARES_TAG)
        b_sh = shamir.split(self.b, holders, self.t, rng)
        s_sh = shamir.split(self.s_sk, holders, self.t, rng)
        others = [v for v in holders if v != me]
        self.enc = dict(zip(others, crypto.agree_many(self.c_sk, [self.pub[v][0] for v in others],
                                                      b"enc")))
        to, cts = [], []
        for v, bs, ss in zip(holders, b_sh, s_sh):
            if v == me:
                self.shares[me] = (bs, ss)
                continue
            to.append(v)
            cts.append(crypto.seal(self.enc[v], me, v, self.round, bs + ss))
        ctx.send(msg.src, "sa_shares", round=self.round, to=to, ct=cts)

    def _mask(self, ctx: Context, msg: Message) -> None:
        self.done.append("sa_inbox")
        me, n = ctx.id, shamir.SHARE_BYTES
        peers = []
        for u, ct in zip(msg.frm, msg.ct):
            u = int(u)
            if u not in self.enc:
                return  # a sender that is no neighbour: refuse the round
            pt = crypto.unseal(self.enc[u], u, me, self.round, ct)
            if pt is None or len(pt) != 2 * n:
                return  # tampered or misrouted: refuse the round
            self.shares[u] = (pt[:n], pt[n:])
            peers.append(u)
        y = self._input(ctx)
        crypto.add_mask(y, self.b, 1)
        seeds = crypto.agree_many(self.s_sk, [self.pub[u][1] for u in peers], b"mask")
        for u, seed in zip(peers, seeds):
            crypto.add_mask(y, seed, 1 if me < u else -1)
        self.model, self.enc = {}, {}
        ctx.send(msg.src, "sa_masked", round=self.round, y=y)

    def _input(self, ctx: Context) -> np.ndarray:
        """This client's quantised, weighted update with its weight appended (the ring vector
        the server's unmasked sum adds up)."""
        return client_vector(self.o, self.learner, self.guard, self.seed, ctx.id, self.round,
                             self.model, ctx)

    def _reveal(self, ctx: Context, msg: Message) -> None:
        self.done.append("sa_unmask")
        survivors, dropped = {int(u) for u in msg.survivors}, {int(u) for u in msg.dropped}
        if survivors & dropped or len(survivors) < self.t:
            return  # a server asking for both shares of one client, or too few survivors
        b_ids, b_sh, s_ids, s_sh = [], [], [], []
        for u in sorted(self.shares):
            if u in survivors:
                b_ids.append(u)
                b_sh.append(self.shares[u][0])
            elif u in dropped:
                s_ids.append(u)
                s_sh.append(self.shares[u][1])
        self.shares = {}
        ctx.send(msg.src, "sa_reveal", round=self.round, b_ids=b_ids, b_sh=b_sh, s_ids=s_ids,
                 s_sh=s_sh)


def client_vector(o: Options, learner: learners.Learner, guard: threats.Guard, seed: int,
                  node: int, rnd: int, model: Mapping[str, np.ndarray],
                  ctx: Context | None = None) -> np.ndarray:
    """Node `node`'s ring vector in round `rnd`: train as FedAvg does (same rng), pass the
    result through the client-side threats (attack, local DP), quantise the update, multiply
    by the weight and append it. Deterministic in its arguments."""
    client = node - 1
    if ctx is not None:
        work = learner.work(client)
        if work:
            ctx.compute(work=work, label="train")
    trained = guard.client_train(learner, model, client, derive_rng(seed, node, rnd), rnd,
                                 o.fed.mu).model
    delta = flatten(trained).astype(np.float64) - flatten(model)
    weight = learner.samples(client) if o.weighted else 1
    q = crypto.quantise(delta, o.frac_bits, o.clip_range)
    q *= np.uint64(weight)
    return np.concatenate([q, np.array([weight], np.uint64)])


def build(config: Mapping[str, Any]) -> Deployment:
    """The SecAgg+ deployment for a validated run config."""
    run = config.get("run", {})
    learner = learners.make(config.get("workload", {}))
    o = Options.from_config(config.get("protocol", {}), learner)
    rounds = run.get("rounds")
    if type(rounds) is not int or rounds < 1:
        raise ConfigError(f"[run] rounds = {rounds!r}; expected an integer >= 1")
    seed = int(run.get("seed", 0))
    guard = threats.Guard.from_config(config, learner, seed, server_sees_updates=False)
    return Deployment(
        node_ids=list(range(learner.clients + 1)),
        make_node=lambda i: (Server(o, learner, rounds, seed, copy.deepcopy(guard)) if i == 0
                             else Client(o, learner, seed, guard)),
        describe=f"secaggplus: server 0, clients 1..{learner.clients}, {rounds} rounds",
    )


build.honours = ("adversary", "privacy")  # type: ignore[attr-defined]
