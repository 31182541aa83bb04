"""Shard-local partial sums for FedAvg's streaming mean: each shard other than the server's
combines its own clients' replies and one partial sum per round crosses to the server.

Who relays: each round the server groups its sampled clients by shard (`ctx.shard_of`); on
every shard other than its own with at least `MIN_GROUP` sampled clients, the lowest sampled id
is that round's relay, and the train request carries the groups (`groups`, relay first). The
other members send their reply to the relay, which adds it to an exact sum
(`protocols.exactsum`) and sends the server one `partial` (the packed sum, and per sender its
sample count and training stats) once every member has replied, or at its deadline
(`partial_timeout` after the round's first message reached it). The server merges the partial
exactly, so the model is the same bits as when every reply reaches it alone, and its Gather
still learns each sender: deadlines, `min_replies`, late counts and round rows are as before.
A partial goes in pieces of `partial_piece` sums (`exactsum.split`), so the server holds its
own sum and one piece at a time, never a second sum; where the network model may lose messages
it goes whole (a piece lost after others were added could not be taken out again:
`fedavg._partials`).

What the relay does not take goes on to the server on its own: a reply after the partial left
(or for a round it knows nothing of) is forwarded whole (`relayed_from`), and the server takes
it if its round is still open, else counts it late; a second copy of a reply the relay has
already summed becomes a small `seen` note, counted as a duplicate (or late) by the server, so
that no reply is ever summed twice. A relay that crashes loses its shard's replies for the
round, as a lost message would; with a network model that loses, delays or crashes, results
with more shards can differ from one shard's for that reason alone (the sum itself never does).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel.api import Context
from protocols.exactsum import Running, split

# A partial is a float64 sum (2 float32 models' worth, plus the remainder where that is not
# exact): it saves bytes only where a shard has 3 or more replies to combine.
MIN_GROUP = 3
# Rounds a relay remembers whom it summed, to turn late second copies into `seen` notes.
KEEP_ROUNDS = 8


@dataclass(frozen=True)
class Partials:
    """How relays sum: by sample count (`weighted_mean`) or not (`mean`), their deadline in
    seconds after a round's first message reaches them (None: wait for every member), and the
    sums per `partial` message (0: the whole partial in one)."""

    weighted: bool
    timeout: float | None
    piece: int = 0


def groups(ctx: Context, clients: Iterable[int]) -> list[list[int]]:
    """The round's relay groups: per shard other than this (the server's) node's, its sampled
    clients in id order where there are at least MIN_GROUP of them (the first is the relay)."""
    home = ctx.shard_of(ctx.id)
    by: dict[int, list[int]] = {}
    for c in sorted(clients):
        s = ctx.shard_of(c)
        if s != home:
            by.setdefault(s, []).append(c)
    return [by[s] for s in sorted(by) if len(by[s]) >= MIN_GROUP]


def group_of(gs: Sequence[Sequence[int]] | None, node: int) -> Sequence[int] | None:
    """The group `node` belongs to in a train request's `groups`, or None."""
    for g in gs or ():
        if node in g:
            return g
    return None


@dataclass
class _Round:
    """One round's partial at a relay: its members (None until the train request arrives),
    the sum, and per summed sender (sample count, stats)."""

    members: frozenset[int] | None = None
    server: int = 0
    acc: Running = field(default_factory=Running)
    items: dict[int, tuple[int, Any]] = field(default_factory=dict)


class Relay:
    """A relay node's partial sums, one per open round (kept on that node's own client
    object, so a crash forgets them with the node)."""

    # Every client has one where relaying may happen: no per-instance dict.
    __slots__ = ("o", "open", "summed", "server")

    def __init__(self, opts: Partials) -> None:
        self.o = opts
        self.open: dict[int, _Round] = {}
        self.summed: dict[int, frozenset[int]] = {}  # round -> senders in its sent partial
        self.server = 0  # FedAvg's; each train request says it again

    def state(self) -> dict[str, Any]:
        """Plain data for checkpoints (kernel.run.state): open rounds, packed, and whom each
        sent partial summed."""
        return {"server": self.server,
                "summed": {r: sorted(s) for r, s in sorted(self.summed.items())},
                "open": {r: {"members": None if st.members is None else sorted(st.members),
                             "server": st.server, "sum": st.acc.pack(),
                             "items": {src: [n, stats] for src, (n, stats) in
                                       sorted(st.items.items())}}
                         for r, st in sorted(self.open.items())}}

    def load_state(self, data: Mapping[str, Any]) -> None:
        self.server = int(data["server"])
        self.summed = {int(r): frozenset(s) for r, s in data["summed"].items()}
        self.open = {}
        for r, d in data["open"].items():
            st = self.open[int(r)] = _Round(
                members=None if d["members"] is None else frozenset(d["members"]),
                server=int(d["server"]))
            st.acc.merge_packed(d["sum"])
            st.items = {int(src): (n, stats) for src, (n, stats) in d["items"].items()}

    def start(self, ctx: Context, rnd: int, members: Sequence[int], server: int) -> None:
        """The train request of round `rnd` reached this relay: who to wait for, the deadline.
        A second copy of the request changes nothing (the reply it makes is a duplicate)."""
        st = self.open.setdefault(rnd, _Round()) if rnd not in self.summed else None
        if st is None or st.members is not None:
            return
        st.members, st.server = frozenset(members), server
        self.server = server
        for old in sorted(r for r in self.open if r < rnd):  # its request never came
            self._flush(ctx, old)
        if self.o.timeout is not None:
            ctx.set_timer(self.o.timeout, ("relay", rnd))
        self._maybe_send(ctx, rnd)

    def take(self, ctx: Context, src: int, rnd: int, body: Mapping[str, Any]) -> None:
        """A reply (`body` of an update) from `src` for round `rnd`: summed, or passed on."""
        st = self.open.get(rnd)
        if st is None:
            newest = max([*self.open, *self.summed], default=0)
            if rnd in self.summed or rnd < newest:  # its partial left, or it never opened here
                if src in self.summed.get(rnd, ()):
                    ctx.send(self.server, "seen", round=rnd, client=src)
                else:
                    ctx.send(self.server, "update", round=rnd, relayed_from=src, **body)
                return
            st = self.open[rnd] = _Round(server=self.server)  # before the relay's own request
        if src in st.items:
            ctx.send(st.server, "seen", round=rnd, client=src)
            return
        if st.members is not None and src not in st.members:
            ctx.send(st.server, "update", round=rnd, relayed_from=src, **body)
            return
        n = body["n_samples"]
        st.acc.add(float(n) if self.o.weighted else 1.0, body["model"])
        st.items[src] = (n, body.get("stats"))
        self._maybe_send(ctx, rnd)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        """The relay deadline of a round: send what has arrived."""
        assert isinstance(key, tuple)
        if key[1] in self.open and self.open[key[1]].members is not None:
            self._send(ctx, key[1])

    def _maybe_send(self, ctx: Context, rnd: int) -> None:
        st = self.open[rnd]
        if st.members is not None and len(st.items) >= len(st.members):
            self._send(ctx, rnd)

    def _send(self, ctx: Context, rnd: int) -> None:
        st = self.open.pop(rnd)
        ctx.cancel_timer(("relay", rnd))
        self.summed[rnd] = frozenset(st.items)
        for old in [r for r in self.summed if r <= rnd - KEEP_ROUNDS]:
            del self.summed[old]
        if st.items:
            senders = sorted(st.items)
            packed = st.acc.pack()
            pieces = split(packed, self.o.piece) if self.o.piece else [packed]
            for i, piece in enumerate(pieces):
                extra = {"replies": [[src, *st.items[src]] for src in senders]} if i == 0 else {}
                ctx.send(st.server, "partial", round=rnd, part=i, parts=len(pieces), sum=piece,
                         senders=senders, **extra)

    def _flush(self, ctx: Context, rnd: int) -> None:
        """An older round whose request never reached this relay: what it summed goes on as a
        partial all the same (the server counts it late if that round has closed)."""
        st = self.open[rnd]
        st.members = frozenset(st.items)
        self._send(ctx, rnd)
