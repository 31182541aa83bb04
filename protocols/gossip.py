"""Decentralised averaging: synchronous and asynchronous gossip, push-sum, decentralised SGD.

Entries (registry group "protocols"):

- `gossip` (`build`): node i of `[protocol] nodes` holds `default_rng(i).standard_normal(dim)`
  as float32 (gossip and pushsum read no `[workload]`).
  mode = "sync": in round r every node sends x_i to its neighbours, waits for their round-r
  values (later rounds' values that arrive early are buffered), and sets
  x_i = sum_j w_ij x_j over itself and its neighbours in sorted id order, in float32 (the same
  operations on every transport, so the same bytes). It needs reliable links: a lost message
  stalls the round and the run ends idle. mode = "async": push-pull on timers: every `period`
  (jittered) a node sends x_i to a random neighbour j, which moves half the difference
  d = (x_i - x_j)/2 into x_j and replies d, which the initiator subtracts; as only d travels
  back, the sum is preserved even when exchanges overlap, and messages are duplicated or
  overtaken (each exchange is applied once on each side), but not when a reply is lost. A
  node waiting for a reply answers "busy" to pushes from higher ids (two nodes pushing to
  each other at once would otherwise swap values).
- `pushsum` (`build_pushsum`): push-sum on a directed graph, tolerant of delay, reordering,
  duplication and loss. Each node keeps (s, w), starting at (x_i in float64, 1); every
  `period` it keeps a share 1/(outdeg+1) and pushes one share to each out-neighbour; its
  estimate is s/w. variant = "robust" (default) is running-sum push-sum (Hadjicostis,
  Vaidya, Dominguez-Garcia 2016): a node sends the cumulative total it has ever pushed on a
  link, sigma, and the receiver adds sigma - rho, rho being the last total it took from that
  sender (older totals, by sequence number, are ignored). A lost message's mass arrives with
  the next one, so mass is conserved exactly (sum s + the per-link sigma - rho still in
  flight) and the estimates converge to the true average under loss. variant = "plain"
  sends the shares themselves: lost mass is gone. Crashes: a restarted node is a new
  incarnation (counted per node); its totals start again from zero, which its receivers see
  from the incarnation in its messages, and its first total from each sender only sets the
  baseline (the sender's total may include mass its earlier incarnation took). What a
  crashed node held and what was in flight on its links is lost, and its x_i with weight 1 is
  put in afresh, so the nodes then agree on a shifted average (still a convex combination).
- `dsgd` (`build_dsgd`): decentralised SGD (adapt then combine): each round every node trains
  one `learners.train` call on its client's data, then the synchronous gossip step above
  mixes the trained models. Node i is client i; `[workload] clients` nodes.

Rounds are `[run] rounds` (ticks per node for the timer-driven modes: async gossip and
push-sum). Node 0 emits the "round" rows. At the end every node sends its final vector to
node 0, which finishes with {"model": node 0's model, "rounds", "max_abs_dev":
max_i max|x_i - mean_i x_i|} (over the vectors that reached it; "reports" says how many).
Timer-driven nodes report `drain` seconds after their last tick, and node 0 gives up waiting
for reports `drain` seconds after its own.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import NODE_BYTES, ConfigError, options, require_memory
from protocols import common, learners, mixbatch, seeding, topology

GOSSIP_DEFAULTS: dict[str, Any] = {
    "name": "gossip",
    "mode": "sync",
    "nodes": 64,
    "dim": 100_000,
    "topology": {},
    "period": 1.0,  # async: mean seconds between a node's exchanges
    "drain": 5.0,  # async: seconds from a node's last tick to its report, and node 0's wait
    "track": True,  # sync: node 0 reports its local disagreement each round
}
PUSHSUM_DEFAULTS: dict[str, Any] = {
    "name": "pushsum",
    "variant": "robust",
    "nodes": 16,
    "dim": 1000,
    "topology": {},
    "period": 1.0,
    "drain": 5.0,
}
DSGD_DEFAULTS: dict[str, Any] = {
    "name": "dsgd",
    "topology": {},
    "eval_every": 1,  # node 0 evaluates its model every this many rounds (0: only at the end)
    "track": True,
}


_EMPTY = np.empty(0, np.float32)
# The largest shared buffer block sync gossip reserves (bigger runs use per-node buffers).
_BLOCK_MAX = 1 << 30
# Plain sync gossip of at most this many floats per node defers its mixes into batches
# (`protocols.mixbatch`); longer vectors gain nothing (each numpy call has enough to do).
LAZY_DIM = 64


# One reseeded generator per thread (see protocols.seeding): a million nodes start 4x faster.
_seeds = threading.local()


def initial_vector(node: int, dim: int) -> np.ndarray:
    """Node `node`'s starting vector in `gossip` and `pushsum`: default_rng(node) normals."""
    seeds = getattr(_seeds, "seeds", None)
    if seeds is None:
        seeds = _seeds.seeds = seeding.Seeds()
    return seeds.generator(node).standard_normal(dim).astype(np.float32)


def _run_rounds(config: Mapping[str, Any]) -> tuple[int, int]:
    run = config.get("run", {})
    seed, rounds = run.get("seed", 0), run.get("rounds", 1)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"[run] rounds = {rounds!r}; expected an integer >= 1")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"[run] seed = {seed!r}; expected an integer")
    return seed, rounds


def _positive(section: str, opts: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if not opts[key] > 0:
            raise ConfigError(f"[{section}] {key} = {opts[key]!r}; expected a number > 0")


def _graph(opts: Mapping[str, Any], n: int, seed: int, *, directed_ok: bool) -> tuple[
        topology.Graph, str]:
    g, rule = topology.from_config(opts["topology"], n, seed)
    if g.directed and not directed_ok:
        raise ConfigError(f"[protocol.topology] {opts['name']} needs an undirected graph; "
                          f"directed graphs are for pushsum")
    return g, rule


# -- final reports to node 0 -----------------------------------------------------------------

class _Reports:
    """Node 0's collection of every node's final vector, and the deviation it finishes with."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.got: dict[int, np.ndarray] = {}

    def add(self, src: int, x: np.ndarray) -> bool:
        """Keep `x` from `src` (the first one only); True once all n are in."""
        self.got.setdefault(src, x)
        return len(self.got) == self.n

    def finish(self, ctx: Context, model: Mapping[str, np.ndarray], rounds: int,
               **extra: Any) -> None:
        ids = sorted(self.got)
        dev = 0.0
        if ids:
            dev = _max_abs_dev([self.got[i] for i in ids])
        ctx.finish({"model": dict(model), "rounds": rounds, "max_abs_dev": dev,
                    "reports": len(ids), **extra})


# Numbers per numpy call when node 0 sums the final reports.
_REPORT_CHUNK = 1 << 18


def _max_abs_dev(vals: list[np.ndarray]) -> float:
    """max_i max|x_i - mean| with the mean summed in float64 one vector after another, in the
    order given; `_REPORT_CHUNK` numbers at a time (a running sum by `np.cumsum` is that
    same sequence of additions), so a million reports cost a few numpy calls."""
    shape = np.shape(vals[0])
    if any(np.shape(v) != shape for v in vals):
        raise ValueError(f"final vectors of different shapes: {shape} and others")
    step = max(1, _REPORT_CHUNK // max(1, int(np.prod(shape))))
    def rows(k: int) -> np.ndarray:
        part = vals[k:k + step]
        if len(shape) == 1:
            # Not np.stack: it makes a view object per vector (100 MB at a million).
            out = np.concatenate(part).reshape(len(part), *shape)
        else:
            out = np.empty((len(part), *shape), np.float64)  # exact for float32 values
            for m, v in enumerate(part):
                out[m] = v
        return out.astype(np.float64)

    mean = np.zeros(shape, np.float64)
    for k in range(0, len(vals), step):
        mean = np.cumsum(np.concatenate([mean[None], rows(k)]), axis=0)[-1]
    mean /= len(vals)
    dev = 0.0
    for k in range(0, len(vals), step):
        dev = max(dev, float(np.max(np.abs(rows(k) - mean), initial=0.0)))
    return dev


# -- synchronous rounds ----------------------------------------------------------------------

class _Plan:
    """What every node of a synchronous mixing run shares: the graph, the weighting rule,
    rounds, initial values. Each node computes its own row of weights when it is made, so
    nothing per node is held here (a million nodes' rows as tuples would be ~0.5 GB)."""

    def __init__(self, g: topology.Graph, rule: str, rounds: int, track: bool,
                 lazy: bool = False) -> None:
        if g.directed:
            raise ValueError("mixing weights need an undirected graph; push-sum handles "
                             "directed ones")
        self.rounds = rounds
        self.track = track
        self.n = g.n
        self.neighbours = g.out
        self.rule = rule
        self.dmax = max((len(o) for o in g.out), default=0)
        # One float object per distinct weight, however many nodes use it.
        self._weights: dict[float, float] = {}
        # Every node's two buffers as rows of one (n, 2, dim) block, made on first use: no
        # array objects per node (a million nodes' would be ~350 MB). Rows of nodes another
        # process runs are never written, so their pages are never touched. A node's first
        # incarnation uses its rows; after a restart it gets private buffers, since messages
        # from before the crash may still point into its rows.
        self._block: np.ndarray | None = None
        self._claimed: np.ndarray | None = None
        # Deferred mixing (plain gossip only, `lazy`): decided when the first node starts
        # (None until then), and off for good once a node cannot take part (a restart, or a
        # transport that reads bodies before delivering them). Nodes then fall back to
        # per-node mixing exactly where they are (see `SyncGossip._unbatch`).
        self.lazy: bool | None = None if lazy else False
        self.batch = mixbatch.Batch(g.out, rounds) if lazy else None

    def flush(self) -> None:
        """Compute every deferred mix (before anything reads the block)."""
        if self.batch is not None and self.batch.pending:
            assert self._block is not None
            self.batch.flush(self._block)

    def stop_lazy(self) -> None:
        """Turn deferred mixing off for the rest of the run, computing what is deferred."""
        self.flush()
        self.lazy = False

    # A checkpoint must see computed values: saving flushes first (and restores the fields).
    def state(self) -> dict[str, Any]:
        """All fields as plain data, after computing every deferred mix (what a checkpoint
        saves)."""
        self.flush()
        out = dict(vars(self))
        if self.batch is not None:
            out["batch"] = dict(vars(self.batch))
        return out

    def load_state(self, data: Mapping[str, Any]) -> None:
        """Restore the fields `state()` gave."""
        if type(data) is not dict or set(data) != set(vars(self)) or (
                self.batch is None) != (data["batch"] is None) or (
                self.batch is not None and (type(data["batch"]) is not dict
                                            or set(data["batch"]) != set(vars(self.batch)))):
            raise ValueError("a gossip plan's state must hold the fields of this config's plan")
        data = dict(data)
        if self.batch is not None:
            vars(self.batch).update(data.pop("batch"))
            data["batch"] = self.batch
        vars(self).update(data)

    def buffers(self, node: int, like: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """None when `node`'s rows of the shared block are its buffers (now claimed); else two
        private arrays like `like`."""
        blk = self._block
        if blk is None and like.ndim == 1 and like.dtype == np.float32 \
                and self.n * 2 * like.size * 4 <= _BLOCK_MAX:
            blk = self._block = np.empty((self.n, 2, like.size), np.float32)
            self._claimed = np.zeros(self.n, bool)
        if blk is None or blk.shape[2] != like.size or like.dtype != np.float32 \
                or self._claimed is None or self._claimed[node]:
            return np.empty_like(like), np.empty_like(like)
        self._claimed[node] = True
        return None

    def row(self, i: int) -> tuple[int, float | None, tuple[float, ...] | None]:
        """(position of i among its sorted neighbours and itself, the weight shared by all of
        them or None, else every weight in that order)."""
        neigh = self.neighbours[i]
        # Neighbour tuples are sorted (topology.Graph), so the position is a bisection.
        pos = bisect.bisect_left(neigh, i)
        if self.rule == "uniform":
            # mixing_row's uniform row without building it: 1 / (d + 1) everywhere.
            w = 1.0 / (len(neigh) + 1)
            w = self._weights.setdefault(w, w)
            if self.batch is not None:
                self.batch.set_row(i, w, None)
            return pos, w, None
        ids_w = topology.mixing_row(self.neighbours, i, self.rule, self.dmax)
        ws = tuple(self._weights.setdefault(w, w) for _, w in ids_w)
        if len(set(ws)) == 1:
            if self.batch is not None:
                self.batch.set_row(i, ws[0], None)
            return pos, ws[0], None
        if self.batch is not None:
            self.batch.set_row(i, None, ws)
        return pos, None, ws


class SyncGossip(Protocol):
    """A node of synchronous gossip: round r mixes the round-r values of itself and its
    neighbours into preallocated buffers (x^r lives in buffer r % 2: by the time a node
    computes x^(r+2) every neighbour has already consumed x^r).

    Values for round r + 1 are kept by position in the sorted (neighbours + self) order, the
    mixing order, in `cur`; values that arrive earlier for later rounds (after a neighbour's
    restart, say) wait in `ahead`, keyed by round.

    With deferred mixing (`_Plan.lazy`: plain gossip of short vectors where bodies reach their
    receivers as they were sent) a node keeps no values: what it has of round r + 1 is a bit
    mask of the positions still missing (`miss`; `ahead` then maps later rounds to such
    masks), its mix is recorded in the plan's batch, and the values are the block rows its
    neighbours' messages point to."""

    # What a delivery reads first: at a million nodes each one touches a cold node.
    __slots__ = ("miss", "r", "neigh", "pos", "plan", "id", "x", "sent", "ahead", "w", "ws",
                 "init", "cur", "got", "bufs", "tmp", "reports")

    def __init__(self, node: int, plan: _Plan, init: Callable[[int], np.ndarray]) -> None:
        self.id = node
        self.plan = plan
        self.init = init
        self.neigh = plan.neighbours[node]
        self.pos, self.w, self.ws = plan.row(node)
        self.r = 0
        self.x: np.ndarray = _EMPTY
        self.sent: np.ndarray = self.x  # the value this node contributes to the next round
        self.cur: list[np.ndarray | None] | None = None
        self.got = 0
        self.ahead: dict[int, Any] | None = None
        self.miss: int | None = None
        # Private buffers, or None for the node's rows of the plan's block.
        self.bufs: tuple[np.ndarray, np.ndarray] | None = None
        self.tmp: np.ndarray | None = None
        self.reports: _Reports | None = _Reports(plan.n) if node == 0 else None

    def on_start(self, ctx: Context) -> None:
        self.r = 0
        self.cur, self.got, self.ahead, self.miss = None, 0, None, None
        x0 = self.init(self.id)
        plan = self.plan
        self.bufs = plan.buffers(self.id, x0)
        if plan.lazy is not False:
            cls = type(self)
            ok = (self.bufs is None and x0.size <= LAZY_DIM and ctx.shares_bodies
                  and cls.local_update is SyncGossip.local_update and cls._mix is SyncGossip._mix)
            if plan.lazy is None:
                plan.lazy = ok
            elif not ok:
                plan.stop_lazy()
        # x^0 goes into buffer 0 (x^r lives in buffer r % 2), so no array is kept per node.
        self.x = self._buffer(0)
        np.copyto(self.x, x0)
        if plan.lazy:
            self.miss = self._full()
        self._send_round(ctx)

    def _full(self) -> int:
        """The mask of every neighbour's position in the mixing order (own position clear)."""
        return ((2 << len(self.neigh)) - 1) ^ (1 << self.pos)

    def _unbatch(self) -> None:
        """Deferred mixing was turned off: turn the masks into the lists of values the
        messages carried (the senders' block rows, computed by `_Plan.stop_lazy`)."""
        block = self.plan._block
        assert block is not None and self.miss is not None
        order = sorted((self.id, *self.neigh))

        def values(rnd: int, miss: int) -> list[np.ndarray | None]:
            src = (rnd - 1) & 1
            return [None if (miss >> k) & 1 or k == self.pos else block[j, src]
                    for k, j in enumerate(order)]

        full = self._full()
        self.cur, self.got = None, 0
        if self.miss != full:
            self.cur = values(self.r + 1, self.miss)
            self.got = sum(1 for v in self.cur if v is not None)
        if self.ahead:
            self.ahead = {rnd: values(rnd, m) for rnd, m in self.ahead.items()}
        self.miss = None

    def _buffer(self, k: int) -> np.ndarray:
        if self.bufs is not None:
            return self.bufs[k]
        assert self.plan._block is not None
        return self.plan._block[self.id, k]

    def local_update(self, ctx: Context) -> np.ndarray:
        """The value this node contributes to round r + 1 (plain gossip: its current x)."""
        return self.x

    def _send_round(self, ctx: Context) -> None:
        while True:
            self.sent = self.local_update(ctx)
            if self.neigh:
                ctx.multicast(self.neigh, "g", r=self.r + 1, x=self.sent)
            if not self._advance(ctx) or self.r >= self.plan.rounds:
                return

    @staticmethod
    def on_multicast(msg: Message, deliveries: Iterator[tuple[Context, Any]]) -> None:
        """A round's value for every neighbour of its sender in one call (see
        `kernel.api.Protocol.on_multicast`): the common case, a value for the round a node
        waits for with deferred mixing on, inline; anything else through `on_message`."""
        body = msg[3]
        src = msg[0]
        dsts: tuple[int, ...] = msg[1]  # type: ignore[assignment]
        rnd = body["r"] if msg[2] == "g" else None
        rev: bytes | None = None
        base = j = 0
        for ctx, node in deliveries:
            miss = node.miss
            if miss is None or rnd != node.r + 1 or not node.plan.lazy:
                node.on_message(ctx, Message(src, ctx.id, msg[2], body, msg[4], msg[5]))
                continue
            if rev is None:
                # The sender's position in each receiver's mixing order, by the slot of the
                # receiver in the sender's neighbour tuple (what `on_message` computes).
                plan = node.plan
                rev = plan.batch.rev if dsts is plan.neighbours[src] else None
                rev = rev or b""
                base = src * plan.batch.deg
            if rev:
                dst = ctx.id
                while dsts[j] != dst:
                    j += 1
                k = rev[base + j]
                j += 1
            else:
                k = node.neigh.index(src)
                if k >= node.pos:
                    k += 1
            bit = 1 << k
            if miss & bit:
                node.miss = miss = miss ^ bit
                if not miss and rnd <= node.plan.rounds:
                    # `_advance` then `_send_round`, knowing the node defers its mixes.
                    node._advance_lazy(ctx)
                    if node.r < node.plan.rounds:
                        node._send_lazy(ctx)

    def on_message(self, ctx: Context, msg: Message) -> None:
        body = msg[3]
        if msg[2] == "g":
            rnd = body["r"]
            r = self.r
            if rnd <= r:
                return  # older rounds are duplicates: ignore
            k = self.neigh.index(msg[0])
            if k >= self.pos:
                k += 1
            miss = self.miss
            if miss is not None:
                if self.plan.lazy:
                    bit = 1 << k
                    if rnd == r + 1:
                        if miss & bit:
                            self.miss = miss = miss ^ bit
                            if not miss and rnd <= self.plan.rounds:
                                self._advance(ctx)
                                if self.r < self.plan.rounds:
                                    self._send_round(ctx)
                        return
                    ahead = self.ahead
                    if ahead is None:
                        ahead = self.ahead = {}
                    ahead[rnd] = ahead.get(rnd, self._full()) & ~bit
                    return
                self._unbatch()
            if rnd == r + 1:
                vals = self.cur
                if vals is None:
                    vals = self.cur = [None] * (len(self.neigh) + 1)
                if vals[k] is None:
                    vals[k] = body["x"]
                    self.got += 1
                    if self.got == len(self.neigh) and r + 1 <= self.plan.rounds:
                        self._advance(ctx)
                        if self.r < self.plan.rounds:
                            self._send_round(ctx)
                return
            ahead = self.ahead
            if ahead is None:
                ahead = self.ahead = {}
            later = ahead.get(rnd)
            if later is None:
                later = ahead[rnd] = [None] * (len(self.neigh) + 1)
            if later[k] is None:
                later[k] = body["x"]
        elif msg[2] == "final" and self.reports is not None:
            self._report(ctx, msg[0], body["x"])

    def _advance(self, ctx: Context) -> bool:
        """Complete round r + 1 if every value for it is in; True when it did."""
        if self.miss is not None:
            if self.plan.lazy:
                return self._advance_lazy(ctx)
            self._unbatch()
        nxt = self.r + 1
        need = len(self.neigh)
        if nxt > self.plan.rounds or (need and self.got < need):
            return False
        vals: list[np.ndarray | None] = self.cur if self.cur is not None else [None]
        vals[self.pos] = self.sent
        self.cur, self.got = None, 0
        if self.ahead:
            later = self.ahead.pop(nxt + 1, None)
            if later is not None:
                self.cur = later
                self.got = sum(1 for v in later if v is not None)
        out = self._buffer(nxt & 1)
        self._mix(out, vals)  # type: ignore[arg-type]
        self.x, self.r = out, nxt
        if self.id == 0:
            ids = sorted((self.id, *self.neigh))
            self.on_round(ctx, nxt, dict(zip(ids, vals)))  # type: ignore[arg-type]
        if nxt == self.plan.rounds:
            if self.id == 0:
                self._report(ctx, 0, self.x)
            else:
                ctx.send(0, "final", x=self.x)
        return True

    def _send_lazy(self, ctx: Context) -> None:
        """`_send_round` of a node that defers its mixes (its local update is its x)."""
        rounds = self.plan.rounds
        while True:
            self.sent = x = self.x
            if self.neigh:
                ctx.multicast(self.neigh, "g", r=self.r + 1, x=x)
            if not self._advance_lazy(ctx) or self.r >= rounds:
                return

    def _advance_lazy(self, ctx: Context) -> bool:
        """`_advance` with deferred mixing: record the mix instead of computing it."""
        nxt = self.r + 1
        plan = self.plan
        if nxt > plan.rounds or self.miss:
            return False
        block = plan._block
        batch = plan.batch
        assert block is not None and batch is not None
        batch.todo[nxt].append(self.id)
        batch.pending += 1
        if batch.pending >= mixbatch.FLUSH_AT:
            batch.flush(block)
        miss = self.ahead.pop(nxt + 1, None) if self.ahead else None
        # (`_full()`, inline)
        self.miss = ((2 << len(self.neigh)) - 1) ^ (1 << self.pos) if miss is None else miss
        self.x = x = block[self.id, nxt & 1]
        self.r = nxt
        if self.id == 0:
            plan.flush()
            src = (nxt - 1) & 1
            self.on_round(ctx, nxt, {j: block[j, src] for j in sorted((self.id, *self.neigh))})
        if nxt == plan.rounds:
            if self.id == 0:
                self._report(ctx, 0, x)
            else:
                ctx.send(0, "final", x=x)
        return True

    def _mix(self, out: np.ndarray, vals: list[np.ndarray]) -> None:
        w = self.w
        if w is not None:
            if len(vals) == 1:
                np.multiply(vals[0], w, out=out)
                return
            add = np.add
            add(vals[0], vals[1], out)
            for v in vals[2:]:
                add(out, v, out)
            np.multiply(out, w, out)
            return
        ws = self.ws
        assert ws is not None
        if self.tmp is None:
            self.tmp = np.empty_like(out)
        tmp = self.tmp
        np.multiply(vals[0], ws[0], out=out)
        for v, wj in zip(vals[1:], ws[1:]):
            np.multiply(v, wj, out=tmp)
            np.add(out, tmp, out=out)

    def on_round(self, ctx: Context, r: int, vals: Mapping[int, np.ndarray]) -> None:
        """Node 0's "round" row; `disagreement` = max_j max|x_j - x_0| over its neighbours'
        values that entered round r."""
        fields: dict[str, Any] = {}
        if self.plan.track and self.neigh:
            if self.tmp is None:
                self.tmp = np.empty_like(self.x)
            tmp, mine, dis = self.tmp, vals[self.id], 0.0
            for j in self.neigh:
                np.subtract(vals[j], mine, out=tmp)
                np.abs(tmp, out=tmp)
                dis = max(dis, float(tmp.max()))
            fields["disagreement"] = dis
        ctx.emit("round", r, **fields)

    def model(self) -> dict[str, np.ndarray]:
        """Node 0's final model, as the result carries it."""
        return {"x": self.x}

    def _report(self, ctx: Context, src: int, x: np.ndarray) -> None:
        assert self.reports is not None
        if self.reports.add(src, x) and self.r == self.plan.rounds:
            self.plan.flush()
            self.reports.finish(ctx, self.model(), self.r, **self.extra_result())

    def extra_result(self) -> dict[str, Any]:
        """More result fields (DSGD adds the test accuracy)."""
        return {}


def build(config: Mapping[str, Any]) -> Deployment:
    """The `gossip` deployment (sync or async averaging of seeded float32 vectors)."""
    seed, rounds = _run_rounds(config)
    o = options("protocol", config.get("protocol", {}), GOSSIP_DEFAULTS,
                choices={"mode": ("sync", "async")})
    _positive("protocol", o, "nodes", "dim", "period", "drain")
    require_memory(f"[protocol] nodes = {o['nodes']}, dim = {o['dim']}",
                   o["nodes"] * (NODE_BYTES + 12 * o["dim"]))
    g, rule = _graph(o, o["nodes"], seed, directed_ok=False)
    dim = o["dim"]

    def init(i: int) -> np.ndarray:
        return initial_vector(i, dim)

    params = {"seed": seed, "rounds": rounds, "mode": o["mode"], "dim": dim, "nodes": g.n}
    if o["mode"] == "sync":
        plan = _Plan(g, rule, rounds, o["track"], lazy=dim <= LAZY_DIM)
        make: Callable[[int], Protocol] = lambda i: SyncGossip(i, plan, init)  # noqa: E731
    else:
        period, drain = o["period"], o["drain"]
        make = lambda i: AsyncGossip(i, g, rounds, period, drain, init)  # noqa: E731
    return Deployment(node_ids=tuple(range(g.n)), make_node=make, neighbours=g.neighbours,
                      params=params, describe=f"gossip/{o['mode']} on {o['topology']}")


# -- timer-driven nodes ----------------------------------------------------------------------

# How many times each node (its context, which outlives crashes) has started: a fresh protocol
# instance after a restart learns from it that it is a new incarnation. Looked up, never iterated.
_starts: weakref.WeakKeyDictionary[Context, int] = weakref.WeakKeyDictionary()


class _Ticking(Protocol):
    """A node that acts on `rounds` jittered ticks, reports its value to node 0 `drain` seconds
    after its last tick (late replies are in by then), and, on node 0, finishes once every
    report is in or `drain` seconds after its own."""

    def __init__(self, node: int, n: int, rounds: int, period: float, drain: float) -> None:
        self.id, self.n = node, n
        self.rounds, self.period, self.drain = rounds, period, drain
        self.ticks = 0
        self.inc = 0  # incarnation: 0 until a crash and restart, then 1, 2, ...
        self.born = 0.0  # when this incarnation started
        self.reports: _Reports | None = _Reports(n) if node == 0 else None

    def value(self) -> np.ndarray:
        """The node's current float32 vector."""
        raise NotImplementedError

    def tick(self, ctx: Context) -> None:
        """One tick's action."""
        raise NotImplementedError

    def start_ticking(self, ctx: Context) -> None:
        self.inc = _starts.get(ctx, 0)
        _starts[ctx] = self.inc + 1
        self.ticks, self.born = 0, float(ctx.now)
        ctx.set_timer(self.period * float(ctx.rng.uniform(0.0, 1.0)), "tick")

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        if key == "tick":
            self.ticks += 1
            self.tick(ctx)
            if self.ticks < self.rounds:
                ctx.set_timer(self.period * float(ctx.rng.uniform(0.5, 1.5)), "tick")
            else:
                ctx.set_timer(self.drain, "report")
        elif key == "report":
            if self.reports is None:
                ctx.send(0, "final", x=self.value())
            else:
                ctx.set_timer(self.drain, "deadline")
                self._report(ctx, 0, self.value())
        elif key == "deadline" and self.reports is not None:
            self.reports.finish(ctx, {"x": self.value()}, self.ticks)

    def _report(self, ctx: Context, src: int, x: np.ndarray) -> None:
        assert self.reports is not None
        if self.reports.add(src, x):
            self.reports.finish(ctx, {"x": self.value()}, self.ticks)


# -- asynchronous push-pull ------------------------------------------------------------------

class AsyncGossip(_Ticking):
    """A node of push-pull gossip: exchanges half-differences with a random neighbour."""

    def __init__(self, node: int, g: topology.Graph, rounds: int, period: float, drain: float,
                 init: Callable[[int], np.ndarray]) -> None:
        super().__init__(node, g.n, rounds, period, drain)
        self.neigh, self.init = g.out[node], init
        self.x: np.ndarray = np.empty(0, np.float32)
        self.waiting = False
        self.xid = 0  # exchanges this node started
        self.open: set[int] = set()  # those whose reply has not come yet
        self.seen: dict[int, tuple[int, int]] = {}  # src -> newest (inc, xid) answered

    def on_start(self, ctx: Context) -> None:
        self.x = self.init(self.id)
        self.waiting, self.open, self.seen, self.xid = False, set(), {}, 0
        self.start_ticking(ctx)

    def value(self) -> np.ndarray:
        return self.x

    def tick(self, ctx: Context) -> None:
        if self.id == 0:
            ctx.emit("round", self.ticks)
        if not self.waiting and self.neigh:
            j = self.neigh[int(ctx.rng.integers(len(self.neigh)))]
            self.xid += 1
            self.open.add(self.xid)
            ctx.send(j, "push", x=self.x, xid=self.xid, inc=self.inc)
            self.waiting = True
            ctx.set_timer(4 * self.period, "timeout")

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        if key == "timeout":
            self.waiting = False  # a lost push or reply; a late reply is still applied
        else:
            super().on_timer(ctx, key)

    def on_message(self, ctx: Context, msg: Message) -> None:
        body = msg.body
        if msg.kind == "push":
            # Answer each exchange once: a duplicated or overtaken push would move mass twice.
            key = (body["inc"], body["xid"])
            if key <= self.seen.get(msg.src, (-1, 0)):
                return
            self.seen[msg.src] = key
            if self.waiting and msg.src > self.id:
                # Two nodes pushing to each other at once would swap values: the lower id wins.
                ctx.send(msg.src, "busy", xid=body["xid"], inc=body["inc"])
                return
            # New arrays, never in place: a sent x may still be read by its receiver.
            d = (body["x"] - self.x) * np.float32(0.5)
            self.x = self.x + d
            ctx.send(msg.src, "pull", d=d, xid=body["xid"], inc=body["inc"])
        elif msg.kind in ("pull", "busy"):
            if body["inc"] != self.inc or body["xid"] not in self.open:
                return  # for an exchange this incarnation did not start, or already applied
            self.open.discard(body["xid"])
            if msg.kind == "pull":
                self.x = self.x - body["d"]
            if body["xid"] == self.xid:
                self.waiting = False
                ctx.cancel_timer("timeout")
        elif msg.kind == "final" and self.reports is not None:
            self._report(ctx, msg.src, body["x"])


# -- push-sum --------------------------------------------------------------------------------

class PushSum(_Ticking):
    """A push-sum node. State: `s` (float64 vector), `w`; robust variant also `sig_s`, `sig_w`
    (cumulative pushed per out-link) and `rho[src] = (inc, k, s, w)` (the last totals taken
    from `src`: its incarnation, tick, and totals)."""

    def __init__(self, node: int, out: tuple[int, ...], n: int, robust: bool, rounds: int,
                 period: float, drain: float, init: Callable[[int], np.ndarray]) -> None:
        super().__init__(node, n, rounds, period, drain)
        self.out, self.robust, self.init = out, robust, init
        self.share = 1.0 / (len(out) + 1)
        self.s: np.ndarray = np.empty(0)
        self.w = 1.0
        self.sig_s: np.ndarray = np.empty(0)
        self.sig_w = 0.0
        self.rho: dict[int, tuple[int, int, np.ndarray, float]] = {}

    def on_start(self, ctx: Context) -> None:
        # A restart starts afresh: the mass the node held is lost and x_i is put in again.
        self.s = self.init(self.id).astype(np.float64)
        self.w, self.rho = 1.0, {}
        self.sig_s, self.sig_w = np.zeros_like(self.s), 0.0
        self.start_ticking(ctx)

    def value(self) -> np.ndarray:
        """The estimate s / w as float32."""
        return (self.s / self.w).astype(np.float32)

    def tick(self, ctx: Context) -> None:
        if self.out:
            share = self.share
            part_s, part_w = self.s * share, self.w * share
            self.s, self.w = part_s, part_w
            if self.robust:
                # New arrays each time: a sent total is read by its receivers later.
                self.sig_s = self.sig_s + part_s
                self.sig_w += part_w
                ctx.multicast(self.out, "ps", k=self.ticks, inc=self.inc, born=self.born,
                              s=self.sig_s, w=self.sig_w)
            else:
                ctx.multicast(self.out, "ps", k=self.ticks, s=part_s, w=part_w)
        if self.id == 0:
            ctx.emit("round", self.ticks, w=self.w)

    def on_message(self, ctx: Context, msg: Message) -> None:
        body = msg.body
        if msg.kind == "ps":
            if not self.robust:
                self.s = self.s + body["s"]
                self.w += body["w"]
                return
            last = self.rho.get(msg.src)
            inc, k = body["inc"], body["k"]
            if last is None:
                # All of the sender's total is new to this node unless this node restarted
                # after the sender started: then an earlier incarnation of this node may have
                # taken part of it, and the total only sets the baseline (that link's mass in
                # flight is lost with the crash).
                if self.inc == 0 or body["born"] >= self.born:
                    self.s = self.s + body["s"]
                    self.w += body["w"]
            elif inc > last[0]:
                # The sender restarted while this node ran: its totals start again from zero.
                self.s = self.s + body["s"]
                self.w += body["w"]
            elif inc == last[0] and k > last[1]:
                self.s = self.s + (body["s"] - last[2])
                self.w += body["w"] - last[3]
            else:
                return  # an older or repeated total, or one from an earlier incarnation
            self.rho[msg.src] = (inc, k, body["s"], body["w"])
        elif msg.kind == "final" and self.reports is not None:
            self._report(ctx, msg.src, body["x"])


def build_pushsum(config: Mapping[str, Any]) -> Deployment:
    """The `pushsum` deployment (directed graphs welcome; see the module docstring)."""
    seed, rounds = _run_rounds(config)
    o = options("protocol", config.get("protocol", {}), PUSHSUM_DEFAULTS,
                choices={"variant": ("robust", "plain")})
    _positive("protocol", o, "nodes", "dim", "period", "drain")
    require_memory(f"[protocol] nodes = {o['nodes']}, dim = {o['dim']}",
                   o["nodes"] * (NODE_BYTES + 12 * o["dim"]))
    g, _ = _graph(o, o["nodes"], seed, directed_ok=True)
    dim, robust = o["dim"], o["variant"] == "robust"
    period, drain = o["period"], o["drain"]

    def init(i: int) -> np.ndarray:
        return initial_vector(i, dim)

    def make(i: int) -> Protocol:
        return PushSum(i, g.out[i], g.n, robust, rounds, period, drain, init)

    return Deployment(node_ids=tuple(range(g.n)), make_node=make, neighbours=g.neighbours,
                      params={"seed": seed, "rounds": rounds, "variant": o["variant"]},
                      describe=f"pushsum/{o['variant']} on {o['topology']}")


# -- decentralised SGD -----------------------------------------------------------------------

class Dsgd(SyncGossip):
    """A DSGD node: trains on its client's data, then mixes like synchronous gossip."""

    def __init__(self, node: int, plan: _Plan, learner: learners.Learner, seed: int,
                 eval_every: int) -> None:
        super().__init__(node, plan, self._initial)
        self.learner, self.seed, self.eval_every = learner, seed, eval_every
        self.like: Mapping[str, np.ndarray] = {}
        self.last_eval: dict[str, float] | None = None

    def _initial(self, node: int) -> np.ndarray:
        self.like = self.learner.init()
        return common.flatten(self.like)

    def local_update(self, ctx: Context) -> np.ndarray:
        model = common.unflatten(self.x, self.like)
        # An rng of (seed, node, round): the same draws whatever order events run in.
        rng = common.derive_rng(self.seed, self.id, self.r + 1)
        trained = self.learner.train(model, self.id, rng).model
        ctx.compute(self.learner.work(self.id))
        return common.flatten(trained)

    def on_round(self, ctx: Context, r: int, vals: Mapping[int, np.ndarray]) -> None:
        fields: dict[str, Any] = {}
        every = self.eval_every
        if (every and r % every == 0) or r == self.plan.rounds:
            self.last_eval = self.learner.evaluate(common.unflatten(self.x, self.like))
            fields.update(self.last_eval or {})
        if self.plan.track and self.neigh:
            mine = vals[self.id]
            fields["disagreement"] = max(float(np.max(np.abs(vals[j] - mine)))
                                         for j in self.neigh)
        ctx.emit("round", r, **fields)

    def model(self) -> dict[str, np.ndarray]:
        return common.unflatten(self.x, self.like)

    def extra_result(self) -> dict[str, Any]:
        if self.last_eval is None:
            return {}
        return {"test_accuracy": self.last_eval["accuracy"], "test_loss": self.last_eval["loss"]}


def build_dsgd(config: Mapping[str, Any]) -> Deployment:
    """The `dsgd` deployment: one node per `[workload] clients`, models from protocols.learners."""
    seed, rounds = _run_rounds(config)
    o = options("protocol", config.get("protocol", {}), DSGD_DEFAULTS)
    if o["eval_every"] < 0:
        raise ConfigError(f"[protocol] eval_every = {o['eval_every']}; expected an integer >= 0")
    wl = learners.validate(config.get("workload", {}))
    learner = learners.make(config)
    g, rule = _graph(o, wl["clients"], seed, directed_ok=False)
    plan = _Plan(g, rule, rounds, o["track"])
    every = o["eval_every"]

    def make(i: int) -> Protocol:
        return Dsgd(i, plan, learner, seed, every)

    return Deployment(node_ids=tuple(range(g.n)), make_node=make, neighbours=g.neighbours,
                      params={"seed": seed, "rounds": rounds},
                      describe=f"dsgd on {o['topology']}, {wl['model']} x {g.n}",
                      prepare=learner.prepare)

