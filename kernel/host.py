"""A host runs a set of nodes: it owns their contexts, dispatches their events and routes sends.

A transport makes one host per shard. Messages to nodes of the same host stay in memory (through
the network model on inproc); messages to other hosts go to the transport's `outbox`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol as _TypingProtocol

import numpy as np

from kernel.api import Context, Deployment, Network, Protocol, RunError
from kernel.loop import CALL, CRASH, DELIVER, RESTART, TIMER, Scheduler
from kernel.messages import Message


class Outbox(_TypingProtocol):
    """Where a host puts messages for nodes it does not run (a transport implements this)."""

    def post(self, msg: Message, dsts: Sequence[int]) -> None:
        """Carry `msg` (its `dst` is ignored) to each node of `dsts`, none of them local."""
        ...


class Roundtrip(_TypingProtocol):
    """Strict mode's codec: pass a message through the wire format and report its size."""

    def roundtrip(self, msg: Message) -> tuple[Message, int]: ...


class NodeContext(Context):
    """The context the host gives one node."""

    __slots__ = ("id", "neighbours", "n_nodes", "params", "_host", "_rng", "_seq", "busy_until")

    def __init__(self, host: Host, node: int, neighbours: tuple[int, ...]) -> None:
        self.id = node
        self.neighbours = neighbours
        self.n_nodes = host.n_nodes
        self.params = host.params
        self._host = host
        self._rng: np.random.Generator | None = None
        self._seq = 0
        self.busy_until = 0.0

    @property
    def now(self) -> float:
        t = self._host.sched.now
        return t if t >= self.busy_until else self.busy_until

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng([self._host.seed, self.id])
        return self._rng

    def send(self, dst: int, kind: str, **body: Any) -> None:
        self._host.send(self, (dst,), kind, body)

    def multicast(self, dsts: Iterable[int], kind: str, **body: Any) -> None:
        self._host.send(self, tuple(dsts), kind, body)

    def set_timer(self, delay: float, key: Hashable) -> None:
        if not delay >= 0:
            raise ValueError(f"node {self.id}: timer {key!r} needs a delay >= 0, got {delay!r}")
        self._host.set_timer(self, delay, key)

    def cancel_timer(self, key: Hashable) -> None:
        self._host.timers[self.id].pop(key, None)

    def compute(self, work: float = 1.0, label: str = "train") -> float:
        host = self._host
        if host.network is None or host.sched.wall:
            return 0.0
        dt = host.network.compute_time(self.id, work, label)
        self.busy_until = self.now + dt
        return dt

    def emit(self, name: str, value: Any, **fields: Any) -> None:
        row = {"t": self.now, "node": self.id, "name": name, "value": value}
        row.update(fields)
        self._host.on_metric(row)

    def finish(self, result: Mapping[str, Any]) -> None:
        self._host.finish(self.id, result)


class Host:
    """Runs `local` nodes of a deployment on one scheduler."""

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
    ) -> None:
        self.deployment = deployment
        self.seed = seed
        self.n_nodes = len(deployment.node_ids)
        self.params = deployment.params
        self.sched = Scheduler(wall=wall)
        self.network = network
        self.strict = strict
        self.outbox = outbox
        self.on_metric = on_metric or (lambda row: None)
        self.sizer = sizer
        self.local = frozenset(local)
        self.nodes: dict[int, Protocol] = {}
        self.ctxs: dict[int, NodeContext] = {}
        self.timers: dict[int, dict[Hashable, int]] = {}
        self.down: set[int] = set()
        self.result: Mapping[str, Any] | None = None
        self.finished_by: int | None = None
        self.error: BaseException | None = None
        self._timer_token = 0
        # Counters a transport reports; `bytes` counts encoded sizes where a message was encoded.
        self.stats = {"messages": 0, "bytes": 0, "events": 0, "dropped": 0}
        nb = deployment.neighbours
        for node in sorted(self.local):
            neigh = tuple(nb(node)) if nb is not None else ()
            self.ctxs[node] = NodeContext(self, node, neigh)
            self.timers[node] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Create every local node and call its `on_start` (in id order), then queue the
        network model's crash and restart events."""
        for node in sorted(self.local):
            self._start_node(node)
            if self.result is not None:
                return
        if self.network is not None:
            for t, node, what in sorted(self.network.node_events()):
                if node in self.local:
                    self.sched.push(t, CRASH if what == "crash" else RESTART, node, None)

    def _start_node(self, node: int) -> None:
        proto = self.deployment.make_node(node)
        self.nodes[node] = proto
        self._call(proto.on_start, node, self.ctxs[node])

    def stop(self) -> None:
        """Call `on_stop` on every node that exists, in id order."""
        for node in sorted(self.nodes):
            self._call(self.nodes[node].on_stop, node, self.ctxs[node])

    def run(self, until: float | None = None, max_events: int | None = None) -> str:
        """Run until a node finishes, nothing is left, `until` or `max_events`; say which."""
        reason, n = self.sched.run(self._dispatch, until=until, max_events=max_events)
        self.stats["events"] += n
        if self.error is not None:
            raise self.error
        return reason

    def _call(self, fn: Callable[..., None], node: int, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self._fail(node, fn.__name__, exc)

    def _fail(self, node: int, where: str, exc: Exception, msg: Message | None = None) -> None:
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
        if etype == CALL:
            payload()
            return self.result is not None or self.error is not None
        if node in self.down:
            if etype == RESTART:
                self.down.discard(node)
                self.ctxs[node].busy_until = self.sched.now
                self._start_node(node)
                return self.result is not None or self.error is not None
            self.stats["dropped"] += etype == DELIVER
            return False
        ctx = self.ctxs[node]
        if ctx.busy_until > self.sched.now:
            # The node is still computing: the event waits for it, in order.
            self.sched.push(ctx.busy_until, etype, node, payload)
            return False
        if etype == DELIVER:
            proto = self.nodes[node]
            try:
                proto.on_message(ctx, payload)
            except Exception as exc:
                self._fail(node, "on_message", exc, payload)
                return True
        elif etype == TIMER:
            key, token = payload
            timers = self.timers[node]
            if timers.get(key) != token:
                return False
            del timers[key]
            self._call(self.nodes[node].on_timer, node, ctx, key)
        elif etype == CRASH:
            self.down.add(node)
            self.nodes.pop(node, None)
            self.timers[node].clear()
            self.on_metric({"t": self.sched.now, "node": node, "name": "crash", "value": 1})
        # A RESTART for a node that is up changes nothing.
        return self.result is not None or self.error is not None

    def send(self, ctx: NodeContext, dsts: tuple[int, ...], kind: str, body: dict[str, Any]) -> None:
        """Route one body from `ctx`'s node to `dsts`; the body is shared, never copied."""
        sched = self.sched
        t = sched.now
        if ctx.busy_until > t:
            t = ctx.busy_until
        ctx._seq += 1
        msg = Message(ctx.id, dsts[0] if len(dsts) == 1 else -1, kind, body, t, ctx._seq)
        stats = self.stats
        stats["messages"] += len(dsts)
        nbytes = 0
        if self.strict is not None:
            msg, nbytes = self.strict.roundtrip(msg)
            stats["bytes"] += nbytes * len(dsts)
        elif self.sizer is not None:
            nbytes = self.sizer(body)
            stats["bytes"] += nbytes * len(dsts)
        local = self.local
        remote: list[int] = []
        network = self.network
        one = len(dsts) == 1
        for dst in dsts:
            if dst not in local:
                remote.append(dst)
                continue
            m = msg if one else msg._replace(dst=dst)
            if network is None:
                sched.push(t, DELIVER, dst, m)
            else:
                for arrival in network.arrivals(ctx.id, dst, t, nbytes):
                    sched.push(arrival, DELIVER, dst, m)
        if remote:
            if self.outbox is None:
                unknown = [d for d in remote if d not in self.deployment.node_ids]
                raise RunError(
                    f"node {ctx.id} sent {kind!r} to unknown node(s) {unknown or remote}; "
                    f"this run's nodes are 0..{self.n_nodes - 1}"
                )
            self.outbox.post(msg, remote)

    def set_timer(self, ctx: NodeContext, delay: float, key: Hashable) -> None:
        self._timer_token += 1
        token = self._timer_token
        self.timers[ctx.id][key] = token
        self.sched.push(ctx.now + delay, TIMER, ctx.id, (key, token))

    def finish(self, node: int, result: Mapping[str, Any]) -> None:
        if self.result is None:
            self.result = result
            self.finished_by = node

    # -- entry points for transports ---------------------------------------------------------
    def deliver(self, msg: Message, dsts: Sequence[int], threadsafe: bool = False) -> None:
        """Hand in a message that arrived from another host, for its local `dsts`, now."""
        for dst in dsts:
            if dst not in self.local:
                raise RunError(f"message {msg.kind!r} from node {msg.src} for node {dst}, "
                               f"which this host does not run")
            m = msg._replace(dst=dst)
            if threadsafe:
                self.sched.push_threadsafe(DELIVER, dst, m)
            else:
                self.sched.push(self.sched.now, DELIVER, dst, m)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop's thread, between events."""
        self.sched.push_threadsafe(CALL, -1, fn)

