"""The node API: everything a protocol author needs, and nothing about how messages travel."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from typing import Protocol as _TypingProtocol

import numpy as np

from kernel.messages import Message


class Context:
    """A node's handle on the world: its id, clock, seeded randomness, and ways to act."""

    id: int
    neighbours: tuple[int, ...]
    n_nodes: int
    params: Mapping[str, Any]
    # True where every message body reaches its receivers as the very objects sent, read by
    # nothing before delivery (inproc without strict mode): a sender may then still fill an
    # array it sent, as long as it does so before anyone reads it (sync gossip's batches).
    shares_bodies: bool = False
    # How many shards (processes or actors) run the nodes: 1 on inproc unless
    # `transport.shards` says otherwise; `shard_of` says which one runs a node.
    shards: int = 1

    @property
    def now(self) -> float:
        """Seconds since the run started: virtual on inproc, wall-clock on ray and grpc."""
        raise NotImplementedError

    @property
    def rng(self) -> np.random.Generator:
        """A generator seeded from the run seed and this node's id, the same on every transport."""
        raise NotImplementedError

    def shard_of(self, node: int) -> int:
        """The shard (0 .. shards - 1) running `node`: messages between nodes of one shard stay
        in its memory, others cross between processes."""
        return 0

    def send(self, dst: int, kind: str, **body: Any) -> None:
        """Send one message; it arrives later (never inside this call), or is lost."""
        raise NotImplementedError

    def multicast(self, dsts: Iterable[int], kind: str, **body: Any) -> None:
        """Send one body to many nodes; it is encoded once, however many receive it."""
        raise NotImplementedError

    def set_timer(self, delay: float, key: Hashable) -> None:
        """Call `on_timer(ctx, key)` after `delay` seconds; setting a key again replaces it."""
        raise NotImplementedError

    def cancel_timer(self, key: Hashable) -> None:
        """Forget the timer named `key`; unknown keys are ignored."""
        raise NotImplementedError

    def compute(self, work: float = 1.0, label: str = "train") -> float:
        """Declare local work; on inproc the compute model turns it into virtual seconds during
        which this node is busy (its later sends leave then). Returns those seconds."""
        raise NotImplementedError

    def emit(self, name: str, value: Any, **fields: Any) -> None:
        """Record a metric row: `{"name", "value", "node", "t", **fields}` in metrics.jsonl."""
        raise NotImplementedError

    def finish(self, result: Mapping[str, Any]) -> None:
        """End the whole run with `result` (put the final model under "model")."""
        raise NotImplementedError


class Protocol:
    """The behaviour of one node: the kernel calls these four methods, one at a time."""

    # Subclasses may declare __slots__ and so hold no per-instance dict (at a million nodes,
    # ~200 bytes each); those that do not get their __dict__ as usual.
    __slots__ = ()

    def on_start(self, ctx: Context) -> None:
        """Called once when the node starts (again after a simulated crash and restart)."""

    def on_message(self, ctx: Context, msg: Message) -> None:
        """Called for every message that reaches this node."""

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        """Called when a timer set with `ctx.set_timer` fires."""

    def on_stop(self, ctx: Context) -> None:
        """Called once when the run ends, for nodes that exist then."""

    # Optional, for speed at scale (a static method taking (msg, deliveries)): one multicast
    # message for many nodes of this class at once. `deliveries` yields (ctx, node) for each
    # destination in turn (skipping those the kernel holds back, or runs itself); handle each
    # exactly as `node.on_message(ctx, msg)` would, where msg.dst is then the tuple of every
    # destination (ctx.id is the one at hand), and take every item. The kernel may call
    # `on_message` per destination instead at any time, so both must do the same.
    # Typed loosely: a static method (msg, deliveries) -> None, or None for "not offered".
    on_multicast: ClassVar[Callable[..., None] | None] = None


@dataclass(frozen=True)
class Deployment:
    """What a protocol's `build(config)` returns: its nodes, how to make each, their neighbours."""

    node_ids: Sequence[int]
    make_node: Callable[[int], Protocol]
    neighbours: Callable[[int], Sequence[int]] | None = None
    # Protocol parameters every node's ctx.params exposes.
    params: Mapping[str, Any] = field(default_factory=dict)
    # A one-line description for logs and `fedloom inspect`.
    describe: str = ""
    # Heavy set-up only a process that runs nodes needs (importing torch, say): transports call
    # it where nodes run, before starting them, never in a driver that only places them.
    prepare: Callable[[], None] | None = None
    # Work per round of the nodes that do more (or less) than a typical node's 1.0 (a server
    # that sums every reply, say): a hint transports place shards by (`transports.base.place`).
    # It only moves work between processes; results never depend on it.
    load: Mapping[int, float] | None = None


def imports(*modules: str) -> Callable[[Any], Any]:
    """Marks a `prepare` function with the modules it imports, so that a transport starting
    worker processes may import them there ahead of the run (see `prepare_imports`)."""

    def mark(fn: Any) -> Any:
        fn.imports = tuple(modules)
        return fn

    return mark


def prepare_imports(deployment: Deployment) -> tuple[str, ...]:
    """The modules `deployment.prepare` declared with `imports` (a bound method carries its
    function's mark); empty when it declared none."""
    found = getattr(deployment.prepare, "imports", ())
    if not isinstance(found, tuple) or not all(isinstance(m, str) for m in found):
        return ()
    return found


class Network(_TypingProtocol):
    """What inproc asks of a network model, in virtual time; `transports.netmodel` implements it."""

    def arrivals(self, src: int, dst: int, depart: float, nbytes: int) -> Sequence[float]:
        """Arrival times of one message (empty when lost, several when duplicated)."""
        ...

    def node_events(self) -> Sequence[tuple[float, int, str]]:
        """(time, node, "crash" | "restart") events, scheduled before the run starts."""
        ...

    def compute_time(self, node: int, work: float, label: str) -> float:
        """Virtual seconds that `work` units of local computation take on `node`."""
        ...


class RunError(RuntimeError):
    """A run could not go on: a dead peer or shard, a timeout, or a protocol that raised."""
