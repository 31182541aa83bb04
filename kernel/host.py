"""A host runs a set of nodes: it owns their contexts, dispatches their events and routes sends.

A transport makes one host per shard. Messages to nodes of the same host stay in memory (through
the network model on inproc); messages to other hosts go to the transport's `outbox`.

Node life cycle under a network model's crash schedule: a crash stops the node at once (even in
the middle of a computation), forgets its protocol instance, its timers and the events waiting
for it; while down it runs nothing, so it sends nothing, and messages reaching it are dropped
(counted in `stats["dropped"]`). A restart makes a fresh protocol instance with `make_node` and
calls its `on_start`; the node keeps its id, rng stream and message sequence numbers. What a
node sent before it crashed is already on its way and still arrives; a send that would depart
after the crash (at the end of a computation the crash cut short) never leaves.

A busy node (one that called `ctx.compute`) handles nothing until its computation ends: events
reaching it wait in its mailbox and then run in arrival order, before anything that arrives
later. Its sends depart, and its timers count from, the end of the computation.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Generator, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from typing import Protocol as _TypingProtocol

import numpy as np

from kernel.api import Context, Deployment, Network, Protocol, RunError
from kernel.loop import CALL, CRASH, DELIVER, FANOUT, RESTART, TIMER, WAKE, Scheduler, quiet_gc
from kernel.messages import Message
from kernel.placement import Placement

_INF = float("inf")
# Building the tuple directly skips the namedtuple's Python-level __new__ on the hot path.
_new_message = tuple.__new__


class Outbox(_TypingProtocol):
    """Where a host puts messages for nodes it does not run (a transport implements this)."""

    def post(self, msg: Message, dsts: Sequence[int]) -> None:
        """Carry `msg` (its `dst` is ignored) to each node of `dsts`, none of them local."""
        ...


class Roundtrip(_TypingProtocol):
    """Strict mode's codec: pass a message through the wire format and report its size."""

    def roundtrip(self, msg: Message) -> tuple[Message, int]: ...


class NodeContext(Context):
    """The context the host gives one node. Per-host constants the send fast path does not read
    (the host, node count, params) live on a per-host subclass (`for_host`), not in each
    instance: ~24 bytes less per node, 24 MB at a million nodes."""

    # What every delivery reads first (hold, proto), then what a send reads: at a million
    # nodes each delivery touches a cold context, and this keeps that to one cache line.
    __slots__ = ("hold", "proto", "busy_until", "_seq", "id", "_sched", "_direct", "_sizer",
                 "neighbours", "on_message", "pending", "_timers", "_rng", "_local")
    n_nodes: int
    params: Mapping[str, Any]
    _host: Host
    # (lo, hi) when the host runs exactly the nodes lo .. hi - 1: then a range check says a
    # destination is local, with no look-up in a table of a million ids (set by the Host).
    _span: tuple[int, int] | None = None

    @classmethod
    def for_host(cls, host: Host) -> type[NodeContext]:
        """A subclass whose instances share `host`'s constants as class attributes."""
        return type(cls.__name__, (cls,), {
            "__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "n_nodes": host.n_nodes, "params": host.params, "_host": host,
            "shards": host.placement.shards,
            "shares_bodies": host.strict is None and host.outbox is None})

    def __init__(self, host: Host, node: int, neighbours: tuple[int, ...]) -> None:
        if getattr(type(self), "_host", None) is not host:
            raise TypeError("make a node's context with the class NodeContext.for_host(host) "
                            "gives")
        self.id = node
        self.neighbours = neighbours
        # The running protocol instance; None while the node is down (or not started).
        self.proto: Protocol | None = None
        # Kept for checkpoint restores, which set it; the host calls proto.on_message (one
        # object fewer per node, and one memory access fewer per message at scale).
        self.on_message: Callable[[Context, Message], None] | None = None
        # End of the current computation (virtual time); sends depart then.
        self.busy_until = 0.0
        # Events for this node run directly only while `hold <= now`: `hold` is busy_until
        # normally and +inf while the node is down or has events waiting in `pending`.
        self.hold = _INF
        # Made on first use: most nodes never wait, and 10,000s of empty deques add up.
        self.pending: deque[tuple[int, Any]] | None = None
        # Made on first use, like `pending` (see `timers`).
        self._timers: dict[Hashable, int] | None = None
        self._rng: np.random.Generator | None = None
        self._seq = 0
        # In slots, not on the class: the send fast path reads them for every message.
        self._sched = host.sched
        # Sends to a local node go straight onto the scheduler's FIFO when neither a network
        # model nor a codec has to see them: the kernel's fast path.
        self._direct: Callable[[Any], None] | None = host._direct
        self._local = host.local
        self._sizer: Callable[[dict[str, Any]], int] | None = host.sizer

    @property
    def timers(self) -> dict[Hashable, int]:
        """The node's live timers, key -> token (a dict made on first use)."""
        timers = self._timers
        if timers is None:
            timers = self._timers = {}
        return timers

    @property
    def now(self) -> float:
        t = self._sched.now
        return t if t >= self.busy_until else self.busy_until

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng([self._host.seed, self.id])
        return self._rng

    def shard_of(self, node: int) -> int:
        return self._host.placement(node)

    def send(self, dst: int, kind: str, **body: Any) -> None:
        if dst in self._local:
            direct = self._direct
            if direct is None:
                self._host.send_local(self, dst, kind, body)
                return
            self._seq = seq = self._seq + 1
            direct((DELIVER, dst, _new_message(
                Message, (self.id, dst, kind, body, self._sched.now, seq))))
            if self._sizer is not None:
                self._host._bytes += self._sizer(body)
            return
        self._host.send(self, (dst,), kind, body)

    def multicast(self, dsts: Iterable[int], kind: str, **body: Any) -> None:
        dsts = tuple(dsts)
        span = self._span
        direct = self._direct
        sched = self._sched
        # The fast path of `Host.send` (no network model, no codec, not busy, every
        # destination local): the same message, counters and FANOUT entry, made here.
        if span is None or direct is None or len(dsts) < 2 or self.busy_until > sched.now:
            self._host.send(self, dsts, kind, body)
            return
        lo, hi = span
        try:
            for d in dsts:
                if not lo <= d < hi:
                    self._host.send(self, dsts, kind, body)
                    return
        except TypeError:
            self._host.send(self, dsts, kind, body)
            return
        self._seq = seq = self._seq + 1
        host = self._host
        n = len(dsts)
        host._extra_messages += n - 1
        if self._sizer is not None:
            host._bytes += self._sizer(body) * n
        direct((FANOUT, 0, _new_message(Message, (self.id, dsts, kind, body, sched.now, seq))))

    def set_timer(self, delay: float, key: Hashable) -> None:
        if not delay >= 0:
            raise ValueError(f"node {self.id}: timer {key!r} needs a delay >= 0, got {delay!r}")
        host = self._host
        host._timer_token += 1
        token = host._timer_token
        self.timers[key] = token
        self._sched.push(self.now + delay, TIMER, self.id, (key, token))

    def cancel_timer(self, key: Hashable) -> None:
        if self._timers:
            self._timers.pop(key, None)

    def compute(self, work: float = 1.0, label: str = "train") -> float:
        network = self._host.network
        if network is None or self._sched.wall:
            return 0.0
        dt = network.compute_time(self.id, work, label)
        if not dt >= 0:
            raise ValueError(f"compute model gave {dt!r} s for node {self.id}, label {label!r}")
        self.busy_until = self.now + dt
        if not self.pending:
            self.hold = self.busy_until
        return dt

    def emit(self, name: str, value: Any, **fields: Any) -> None:
        row = {"t": self.now, "node": self.id, "name": name, "value": value}
        row.update(fields)
        self._host.on_metric(row)

    def finish(self, result: Mapping[str, Any]) -> None:
        self._host.finish(self.id, result)


class Host:
    """Runs `local` nodes of a deployment on one scheduler.

    The network model, strict codec and sizer are fixed at construction (the send fast path is
    chosen then).
    """

    def __init__(
        self,
        deployment: Deployment,
        local: Sequence[int],
        *,
        seed: int,
        wall: bool = False,
        network: Network | None = None,
        strict: Roundtrip | None = None,
        outbox: Outbox | None = None,
        on_metric: Callable[[dict[str, Any]], None] | None = None,
        sizer: Callable[[dict[str, Any]], int] | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.deployment = deployment
        # Which shard runs each node, for protocols (ctx.shard_of); one shard unless given.
        self.placement = placement or Placement()
        self.seed = seed
        self.n_nodes = len(deployment.node_ids)
        self.params = deployment.params
        self.sched = Scheduler(wall=wall)
        self.network = network
        self.strict = strict
        self.outbox = outbox
        self.on_metric = on_metric or (lambda row: None)
        self.sizer = sizer
        # Membership in `ctxs` says which nodes are local: no set of a million ids besides.
        self.ctxs: dict[int, NodeContext] = {}
        self.local = self.ctxs.keys()
        self.nodes: dict[int, Protocol] = {}
        self.down: set[int] = set()
        self.result: Mapping[str, Any] | None = None
        self.finished_by: int | None = None
        self.error: BaseException | None = None
        self._stop = False
        # Set by `request_pause`: the loop returns "paused" after the event running now.
        self._pause = False
        self._timer_token = 0
        # Set by `run`: deliver a FANOUT's messages in one dispatch (see `_fanout`).
        self._whole = False
        self._direct = self.sched._fifo.append if network is None and strict is None else None
        # Counters (see `stats`); messages are counted from the senders' sequence numbers.
        self._extra_messages = 0
        self._bytes = 0
        self._events = 0
        self._dropped = 0
        self._lost = 0
        # Crash times per node: a send that would depart (after a computation) at or after a
        # crash of its sender never leaves.
        self._crash_at: dict[int, list[float]] = {}
        # (inproc runs the deployment's own id list: nothing to check, and no sets to make)
        missing = () if local is deployment.node_ids else set(local) - set(deployment.node_ids)
        if missing:
            raise ValueError(f"local nodes {sorted(missing)} are not in the deployment's node_ids")
        nb = deployment.neighbours
        make_ctx = NodeContext.for_host(self)
        with quiet_gc():
            for node in sorted(local):
                neigh = tuple(nb(node)) if nb is not None else ()
                self.ctxs[node] = make_ctx(self, node, neigh)
        ctxs = self.ctxs
        # What the hot path indexes by node id: for ids 0..n-1 a list (one memory access
        # fewer per delivery than a table of a million int keys), else `ctxs` itself.
        self._by_id: Sequence[NodeContext] | dict[int, NodeContext] = ctxs
        if ctxs and all(type(k) is int for k in ctxs):
            lo, hi = min(ctxs), max(ctxs) + 1
            if hi - lo == len(ctxs):
                make_ctx._span = (lo, hi)
                if lo == 0:
                    self._by_id = list(ctxs.values())

    @functools.cached_property
    def all_ids(self) -> frozenset[int]:
        """Every node id of the deployment (made when a remote send first needs it)."""
        return frozenset(self.deployment.node_ids)

    @property
    def stats(self) -> dict[str, int]:
        """Counters a transport reports: messages sent (one per destination), bytes (encoded or
        estimated sizes, where a codec or sizer saw them), events run, messages dropped at a down
        node, messages the network model lost."""
        return {
            "messages": sum(c._seq for c in self.ctxs.values()) + self._extra_messages,
            "bytes": self._bytes,
            "events": self._events,
            "dropped": self._dropped,
            "lost": self._lost,
        }

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Queue the network model's crash and restart events, then create every local node
        and call its `on_start` (in id order). Queued first, a crash or restart comes before
        anything else due at the same time: a node is down during [crash, restart)."""
        if self.network is not None:
            for t, node, what in sorted(self.network.node_events()):
                if what not in ("crash", "restart"):
                    raise ValueError(f"network node event {what!r} for node {node} at t={t}; "
                                     f"expected 'crash' or 'restart'")
                if node in self.local:
                    self.sched.push(t, CRASH if what == "crash" else RESTART, node, None)
                    if what == "crash":
                        self._crash_at.setdefault(node, []).append(t)
        with quiet_gc():
            for node in sorted(self.local):
                self._start_node(node)
                if self.result is not None or self.error is not None:
                    return

    def _start_node(self, node: int) -> None:
        ctx = self.ctxs[node]
        proto = self.deployment.make_node(node)
        self.nodes[node] = proto
        ctx.proto = proto
        ctx.busy_until = ctx.hold = self.sched.now
        if type(proto).on_start is not Protocol.on_start:
            self._call(proto.on_start, node, ctx)

    def stop(self) -> None:
        """Call `on_stop` on every node that is up, in id order; raise RunError if one raised
        (an error from before, which `run` raised already, is not raised again)."""
        before = self.error
        for node in sorted(self.nodes):
            proto = self.nodes[node]
            if type(proto).on_stop is not Protocol.on_stop:
                self._call(proto.on_stop, node, self.ctxs[node])
        if self.error is not None and self.error is not before:
            raise self.error

    def run(self, until: float | None = None, max_events: int | None = None) -> str:
        """Run until a node finishes, nothing is left, `until` or `max_events`, or a pause was
        requested; say which ("paused" for the last: calling `run` again goes on exactly).
        Raises RunError (naming node, handler, message and time) when a protocol raised."""
        # A transport may have cleared `error` (after interrupting the loop on purpose).
        self._stop = self.result is not None or self.error is not None or self._pause
        if not self._stop:
            # A FANOUT runs whole in one dispatch only where events are not counted one by one
            # against a limit and no other thread can hand events in between.
            self._whole = max_events is None and not self.sched.wall
            reason, n = self.sched.run(self._dispatch, until=until, max_events=max_events)
            self._events += n
        else:
            reason = "finished"
        if self.error is not None:
            raise self.error
        if self._pause and self.result is None:
            self._pause = False
            self.sched.halted = False
            return "paused"
        return reason

    def request_pause(self) -> None:
        """Make `run` return "paused" once the event running now (if any) is done, between
        events, where the whole state can be saved. Only sets two flags, so a signal handler
        may call it; the hot path pays nothing (it already checks `_stop` after each event)."""
        self._pause = True
        self._stop = True

    def interrupt(self) -> None:
        """`request_pause` from any thread: `run` returns "paused" between events, even while a
        wall-clock loop is waiting for one (how ray and grpc shards stop their loops)."""
        self.request_pause()
        self.sched.halt()

    def _call(self, fn: Callable[..., None], node: int, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self._fail(node, fn.__name__, exc)

    def _fail(self, node: int, where: str, exc: Exception, msg: Message | None = None) -> None:
        self._stop = True
        if self.error is not None:
            return
        what = f" handling {msg.kind!r} from node {msg.src}" if msg is not None else ""
        err = RunError(
            f"node {node} ({type(self.nodes.get(node)).__name__}) raised {type(exc).__name__} "
            f"in {where}{what} at t={self.sched.now:.6g}: {exc}"
        )
        err.__cause__ = exc
        self.error = err

    # -- the hot path ----------------------------------------------------------------------
    def _dispatch(self, etype: int, node: int, payload: Any) -> bool:
        if etype == DELIVER:
            ctx = self._by_id[node]
            if ctx.hold > self.sched.now:
                return self._hold(ctx, etype, payload)
            try:
                ctx.proto.on_message(ctx, payload)  # type: ignore[union-attr]
            except Exception as exc:
                self._fail(node, "on_message", exc, payload)
            return self._stop
        if etype == FANOUT:
            return self._fanout(node, payload)
        return self._dispatch_other(etype, node, payload)

    def _fanout(self, i: int, msg: Message) -> bool:
        """Deliver a FANOUT's next message; the rest go back to the front of the FIFO, where
        the DELIVER events they stand for would be. On a virtual clock with no event limit
        (`_whole`) the rest run here at once instead, which is the same order: nothing can
        come between them (every event they cause goes behind them), and a stop puts the
        rest back first."""
        dsts: tuple[int, ...] = msg[1]  # type: ignore[assignment]
        fifo = self.sched._fifo
        if not self._whole:
            dst = dsts[i]
            if i + 1 < len(dsts):
                fifo.appendleft((FANOUT, i + 1, msg))
            m = _new_message(Message, (msg[0], dst, msg[2], msg[3], msg[4], msg[5]))
            ctx = self._by_id[dst]
            if ctx.hold > self.sched.now:
                return self._hold(ctx, DELIVER, m)
            try:
                ctx.proto.on_message(ctx, m)  # type: ignore[union-attr]
            except Exception as exc:
                self._fail(dst, "on_message", exc, m)
            return self._stop
        ctxs, now, n = self._by_id, self.sched.now, len(dsts)
        cls = type(ctxs[dsts[i]].proto)
        many = getattr(cls, "on_multicast", None)
        if many is not None:
            return self._fanout_many(i, msg, cls, many)
        src, kind, body, t, seq = msg[0], msg[2], msg[3], msg[4], msg[5]
        while True:
            dst = dsts[i]
            m = _new_message(Message, (src, dst, kind, body, t, seq))
            ctx = ctxs[dst]
            if ctx.hold > now:
                self._hold(ctx, DELIVER, m)
            else:
                try:
                    ctx.proto.on_message(ctx, m)  # type: ignore[union-attr]
                except Exception as exc:
                    self._fail(dst, "on_message", exc, m)
            i += 1
            if i == n:
                return self._stop
            if self._stop:
                fifo.appendleft((FANOUT, i, msg))
                return True
            # The loop counted this dispatch as one event; each further delivery is one more.
            self._events += 1

    def _fanout_many(self, i: int, msg: Message, cls: type,
                     many: Callable[[Message, Iterator[tuple[NodeContext, Any]]], None]) -> bool:
        """`_fanout` (whole) through the class's `on_multicast`: deliveries to nodes of `cls`
        that can take them now are yielded to it; the rest run as they would otherwise (held,
        dropped, or `on_message` of another class). Same order, same event count."""
        dsts: tuple[int, ...] = msg[1]  # type: ignore[assignment]
        n = len(dsts)
        # [the delivery at hand (the next one once done), 1 once every one was taken]
        at = [i, 0]
        gen = self._deliveries(at, msg, cls)
        try:
            many(msg, gen)
        except Exception as exc:
            gen.close()
            j = min(at[0], n - 1)
            m = _new_message(Message, (msg[0], dsts[j], msg[2], msg[3], msg[4], msg[5]))
            self._fail(dsts[j], "on_message", exc, m)
            at[0] = j + 1
        else:
            if not at[1]:
                gen.close()
                self._fail(dsts[at[0]], "on_multicast", RuntimeError(
                    f"{cls.__name__}.on_multicast returned before taking every delivery"))
                at[0] += 1
        j = at[0]
        # Deliveries i .. j - 1 ran: the loop counted the first as this dispatch's event.
        self._events += j - i - 1
        if j < n:
            self.sched._fifo.appendleft((FANOUT, j, msg))
        return self._stop

    def _deliveries(self, at: list[int], msg: Message, cls: type) -> Generator[
            tuple[NodeContext, Any], None, None]:
        """What `_fanout_many` hands the hook (a generator method, not a closure: its locals
        stay fast); keeps `at` up to date."""
        dsts: tuple[int, ...] = msg[1]  # type: ignore[assignment]
        ctxs, now, n = self._by_id, self.sched.now, len(dsts)
        j = at[0]
        while True:
            dst = dsts[j]
            ctx = ctxs[dst]
            proto = ctx.proto
            if ctx.hold > now:
                self._hold(ctx, DELIVER, _new_message(
                    Message, (msg[0], dst, msg[2], msg[3], msg[4], msg[5])))
            elif type(proto) is cls:
                at[0] = j
                yield ctx, proto
            else:
                m = _new_message(Message, (msg[0], dst, msg[2], msg[3], msg[4], msg[5]))
                try:
                    proto.on_message(ctx, m)  # type: ignore[union-attr]
                except Exception as exc:
                    self._fail(dst, "on_message", exc, m)
            j += 1
            if j == n or self._stop:
                at[0], at[1] = j, 1
                return

    def _hold(self, ctx: NodeContext, etype: int, payload: Any) -> bool:
        """An event for a node that is down (dropped) or busy (kept in its mailbox)."""
        if ctx.proto is None:
            self._dropped += etype == DELIVER
            return False
        pending = ctx.pending
        if pending is None:
            pending = ctx.pending = deque()
        if not pending:
            ctx.hold = _INF
            self.sched.push(ctx.busy_until, WAKE, ctx.id, None)
        pending.append((etype, payload))
        return False

    def _dispatch_other(self, etype: int, node: int, payload: Any) -> bool:
        if etype == CALL:
            try:
                payload()
            except RunError as exc:
                self._stop = True
                self.error = self.error or exc
            except Exception as exc:
                self._stop = True
                if self.error is None:
                    self.error = RunError(f"transport callback {payload!r} raised "
                                          f"{type(exc).__name__}: {exc}")
                    self.error.__cause__ = exc
            return self._stop
        ctx = self.ctxs[node]
        if etype == TIMER:
            if ctx.hold > self.sched.now:
                return self._hold(ctx, etype, payload)
            self._timer(ctx, payload)
        elif etype == WAKE:
            self._drain(ctx)
        elif etype == CRASH:
            if ctx.proto is not None:
                self._crash(ctx)
        elif etype == RESTART:
            if ctx.proto is None:
                self.down.discard(node)
                self.on_metric({"t": self.sched.now, "node": node, "name": "restart", "value": 1})
                self._start_node(node)
        else:
            raise ValueError(f"unknown event type {etype} for node {node}")
        return self._stop

    def _timer(self, ctx: NodeContext, payload: tuple[Hashable, int]) -> None:
        key, token = payload
        timers = ctx._timers
        # A replaced or cancelled timer leaves its old event in the queue: the token tells.
        if timers is None or timers.get(key) != token:
            return
        del timers[key]
        self._call(ctx.proto.on_timer, ctx.id, ctx, key)  # type: ignore[union-attr]

    def _drain(self, ctx: NodeContext) -> None:
        """Run a node's waiting events in order until it is busy again or none are left."""
        now = self.sched.now
        if ctx.proto is None or ctx.busy_until > now:
            return  # down, or a stale wake-up from before a restart: the right one comes later
        pending = ctx.pending
        while pending:
            etype, payload = pending.popleft()
            if etype == DELIVER:
                try:
                    ctx.proto.on_message(ctx, payload)
                except Exception as exc:
                    self._fail(ctx.id, "on_message", exc, payload)
            else:
                self._timer(ctx, payload)
            # Not `_stop`: a pause must not leave events stranded in the mailbox.
            if self.result is not None or self.error is not None:
                return
            if ctx.busy_until > now:
                if pending:
                    ctx.hold = _INF
                    self.sched.push(ctx.busy_until, WAKE, ctx.id, None)
                return
        ctx.hold = ctx.busy_until

    def _crash(self, ctx: NodeContext) -> None:
        node = ctx.id
        self.down.add(node)
        self.nodes.pop(node, None)
        ctx.proto = ctx.on_message = None
        ctx.hold = _INF
        ctx.busy_until = self.sched.now
        ctx.pending = None
        ctx._timers = None
        self.on_metric({"t": self.sched.now, "node": node, "name": "crash", "value": 1})

    def send(
        self, ctx: NodeContext, dsts: tuple[int, ...], kind: str, body: dict[str, Any]
    ) -> None:
        """Route one body from `ctx`'s node to `dsts`; the body is shared, never copied."""
        n = len(dsts)
        if n == 0:
            return
        sched = self.sched
        t = sched.now
        if ctx.busy_until > t:
            t = ctx.busy_until
        ctx._seq += 1
        self._extra_messages += n - 1
        if t > sched.now and self._crash_at and self._dies_before(ctx.id, t):
            self._lost += n
            return
        msg = _new_message(Message, (ctx.id, dsts[0] if n == 1 else -1, kind, body, t, ctx._seq))
        nbytes = 0
        if self.strict is not None:
            msg, nbytes = self.strict.roundtrip(msg)
            self._bytes += nbytes * n
            if self.sizer is not None:
                # Transfer time uses the same estimate with or without strict mode, so strict
                # checks the wire format without moving anything in virtual time.
                nbytes = self.sizer(body)
        elif self.sizer is not None:
            nbytes = self.sizer(body)
            self._bytes += nbytes * n
        local = self.local
        remote: list[int] = []
        network = self.network
        src, kind, body, seq = msg[0], msg[2], msg[3], msg[5]
        if network is None:
            # The fast path: no arrival times to draw, so all local destinations get the
            # message at once: one FANOUT entry stands for their deliveries.
            if n == 1:
                if dsts[0] in local:
                    sched.push(t, DELIVER, dsts[0], msg)
                else:
                    remote.append(dsts[0])
            else:
                here = dsts
                for dst in dsts:
                    if dst not in local:
                        remote.append(dst)
                if remote:
                    here = tuple(d for d in dsts if d in local)
                if len(here) == 1:
                    sched.push(t, DELIVER, here[0], _new_message(
                        Message, (src, here[0], kind, body, t, seq)))
                elif here:
                    sched.push(t, FANOUT, 0, _new_message(
                        Message, (src, here, kind, body, t, seq)))
        else:
            for dst in dsts:
                if dst not in local:
                    remote.append(dst)
                    continue
                m = msg if n == 1 else _new_message(Message, (src, dst, kind, body, t, seq))
                arrivals = network.arrivals(src, dst, t, nbytes)
                if not arrivals:
                    self._lost += 1
                for arrival in arrivals:
                    sched.push(arrival, DELIVER, dst, m)
        if remote:
            if self.outbox is None or not self.all_ids.issuperset(remote):
                unknown = [d for d in remote if d not in self.all_ids]
                raise RunError(
                    f"node {ctx.id} sent {kind!r} to unknown node(s) {unknown or remote}; "
                    f"this run's nodes are {_describe_ids(self.all_ids)}"
                )
            self.outbox.post(msg, remote)

    def send_local(self, ctx: NodeContext, dst: int, kind: str, body: dict[str, Any]) -> None:
        """`send` for one local destination (the network model's common case)."""
        sched = self.sched
        t = ctx.busy_until
        ctx._seq = seq = ctx._seq + 1
        if t > sched.now:
            if self._crash_at and self._dies_before(ctx.id, t):
                self._lost += 1
                return
        else:
            t = sched.now
        msg = _new_message(Message, (ctx.id, dst, kind, body, t, seq))
        nbytes = 0
        if self.strict is not None:
            msg, nbytes = self.strict.roundtrip(msg)
            self._bytes += nbytes
            if self.sizer is not None:
                nbytes = self.sizer(body)  # as in `send`: strict mode must not move time
        elif self.sizer is not None:
            nbytes = self.sizer(body)
            self._bytes += nbytes
        network = self.network
        if network is None:
            sched.push(t, DELIVER, dst, msg)
            return
        arrivals = network.arrivals(ctx.id, dst, t, nbytes)
        if len(arrivals) == 1:
            sched.push(arrivals[0], DELIVER, dst, msg)
        elif not arrivals:
            self._lost += 1
        else:
            for arrival in arrivals:
                sched.push(arrival, DELIVER, dst, msg)

    def _dies_before(self, node: int, depart: float) -> bool:
        now = self.sched.now
        return any(now <= c < depart for c in self._crash_at.get(node, ()))

    def set_timer(self, ctx: NodeContext, delay: float, key: Hashable) -> None:
        """Same as `ctx.set_timer(delay, key)` (kept for callers that hold the host)."""
        ctx.set_timer(delay, key)

    def finish(self, node: int, result: Mapping[str, Any]) -> None:
        """End the run with `result`; the first node to finish wins."""
        if self.result is None:
            self.result = result
            self.finished_by = node
        self._stop = True

    # -- entry points for transports ---------------------------------------------------------
    def deliver(self, msg: Message, dsts: Sequence[int], threadsafe: bool = False) -> None:
        """Hand in a message that arrived from another host, for its local `dsts`, now."""
        for dst in dsts:
            if dst not in self.local:
                raise RunError(f"message {msg.kind!r} from node {msg.src} for node {dst}, "
                               f"which this host does not run")
            m = msg if msg[1] == dst else _new_message(
                Message, (msg[0], dst, msg[2], msg[3], msg[4], msg[5]))
            if threadsafe:
                self.sched.push_threadsafe(DELIVER, dst, m)
            else:
                self.sched.push(self.sched.now, DELIVER, dst, m)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop's thread, between events."""
        self.sched.push_threadsafe(CALL, -1, fn)


def _describe_ids(ids: frozenset[int]) -> str:
    lo, hi = min(ids, default=0), max(ids, default=-1)
    if len(ids) == hi - lo + 1:
        return f"{lo}..{hi}"
    return ", ".join(map(str, sorted(ids)))
