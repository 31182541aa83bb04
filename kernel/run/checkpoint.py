"""Checkpoints: a whole inproc run's state in one file, written atomically, read back only
when every byte checks out, and restored into a fresh host before anything runs.

File `DIR/checkpoint.fl` (the latest one; each write replaces it):

    bytes 0-7    magic b"\\x89FLCKPT\\n"
    bytes 8-11   format version (u32, little-endian); this module reads FORMAT_VERSION
    bytes 12-15  reserved (0)
    bytes 16-23  payload length (u64)
    bytes 24-55  sha256 of the payload
    bytes 56-63  zero
    bytes 64-    payload: a codec body frame {"header", "config", "rows", "state"}

`header` holds the fedloom version, the format version, the round (the last "round" metric
row's value), virtual time, events, the config's sha256 and `checkpoint_every`; `config` is
the validated run config; `rows` are the metric rows so far (a resumed run's metrics.jsonl
equals an uninterrupted one's, wall-clock fields aside); `state` is a `kernel.run.state` table of:
the scheduler (clock, insertion counter, queued events), every node's context (protocol
object, busy time, mailbox, timers, rng, message counter), the host's counters and crash
schedule, the network model's random stream and pipes, and context-keyed side tables
(module-level `weakref.WeakKeyDictionary`s keyed by node contexts, in protocol modules).

Reading checks magic, version, length and sha256 before decoding anything; any mismatch is a
`CheckpointError` that says which ("... is truncated at byte N", "... is damaged: sha256
mismatch", "... was written by checkpoint format version 7", "... is not a fedloom
checkpoint"). Restoring builds a complete new host (and network model state) first and
changes nothing a run uses until all of it succeeded.

Taken between events only, on inproc: the transport asks the host to pause
(`Host.request_pause`), saves, and goes on. Events that call Python functions directly (a
transport's CALL events) cannot be saved; inproc queues none.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np

from kernel.api import Deployment, RunError
from kernel.host import Host
from kernel.loop import CALL, CRASH, DELIVER, RESTART, TIMER, WAKE
from kernel.messages import Message
from kernel.run import state as objstate
from kernel.run.outputs import jsonable
from kernel.wire.codec import Codec, CodecError

__all__ = [
    "FILENAME", "FORMAT_VERSION", "CheckpointError", "CheckpointPlan", "Loaded",
    "RunInterrupted", "allowed_modules", "capture", "read", "restore", "write",
]

FILENAME = "checkpoint.fl"
MAGIC = b"\x89FLCKPT\n"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sIIQ32s8s")  # magic, version, reserved, length, sha256, padding
HEADER_BYTES = _HEAD.size  # 64: the payload starts aligned
# Packages whose classes and functions a checkpoint may name; the protocol's own module joins
# them (see allowed_modules).
ALLOWED_PREFIXES = ("kernel.", "protocols.", "transports.")
# Checkpoints hold whole models and every queued message: the codec's message limits do not
# apply (the sha256 has already vouched for every byte when decoding starts).
_CODEC = Codec(max_message_bytes=1 << 62, max_tensor_bytes=1 << 62, max_depth=64,
               max_items=1 << 40)
_EVENT_TYPES = frozenset({DELIVER, TIMER, CRASH, RESTART, WAKE})


class CheckpointError(RunError):
    """A checkpoint cannot be written, or is damaged, foreign or unreadable; nothing was
    loaded."""


class RunInterrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C) and stopped cleanly after saving a checkpoint."""

    def __init__(self, path: Path | None, round: int | None) -> None:
        self.path = path
        self.round = round
        at = f"at round {round}" if round else "before its first round"
        if path is None:
            text = f"interrupted {at}; no checkpoint was written"
        else:
            text = (f"interrupted {at}; checkpoint {path} written; resume with: "
                    f"fedloom run --resume {path.parent}")
        super().__init__(text)
        self.message = text


def fedloom_version() -> str:
    """This installation's fedloom version ("unknown" when not installed)."""
    try:
        from importlib.metadata import version

        return version("fedloom")
    except Exception:
        return "unknown"


def config_sha256(config: Mapping[str, Any]) -> str:
    """A hash of the config as it matters for the run (not `checkpoint_every`, `progress`)."""
    plain = jsonable(config)
    run = dict(plain.get("run", {}))
    run.pop("checkpoint_every", None)
    run.pop("progress", None)
    plain = {**plain, "run": run}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def allowed_modules(config: Mapping[str, Any], build: Any = None) -> tuple[str, ...]:
    """Module prefixes a checkpoint of this run may import from: the kernel, protocols and
    transports, plus the module of the configured protocol ("module:attr" names) and of its
    `build` function (a protocol registered from a user's module)."""
    out = list(ALLOWED_PREFIXES)
    name = config.get("protocol", {}).get("name", "")
    if isinstance(name, str) and ":" in name:
        out.append(name.partition(":")[0])
    module = getattr(build, "__module__", None)
    if isinstance(module, str) and module not in out:
        out.append(module)
    return tuple(out)


# -- the file --------------------------------------------------------------------------------

def write(path: str | Path, body: Mapping[str, Any]) -> int:
    """Encode `body` and write it to `path` atomically (a temporary file in the same
    directory, fsynced, then renamed over `path`); returns the file's size in bytes."""
    p = Path(path)
    try:
        parts = _CODEC.encode_body(body)
    except CodecError as exc:
        raise CheckpointError(f"cannot write checkpoint {p}: {exc}") from None
    h = hashlib.sha256()
    length = 0
    for part in parts:
        h.update(part)
        length += memoryview(part).nbytes
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_HEAD.pack(MAGIC, FORMAT_VERSION, 0, length, h.digest(), bytes(8)))
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)
    return HEADER_BYTES + length


def _fsync_dir(d: Path) -> None:
    # Makes the rename durable; not every platform lets a directory be opened.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Loaded:
    """A verified, decoded checkpoint: its header, config, metric rows and state table (still
    a table: `restore` turns it into objects)."""

    path: Path
    header: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    state: dict[str, Any]

    @property
    def round(self) -> int | None:
        """The round of the last "round" row before the checkpoint (None before any)."""
        r = self.header.get("round")
        return r if type(r) is int else None


def read(path: str | Path) -> Loaded:
    """Read and verify the checkpoint at `path` (a file, or a directory holding FILENAME)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint to resume from: {p} does not exist (a run "
                              f"writes one every --checkpoint-every N rounds, and when "
                              f"interrupted)") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {p}: {exc}") from None
    n = len(data)
    head = data[:len(MAGIC)]
    if head != MAGIC:
        if n < len(MAGIC) and MAGIC.startswith(head):
            raise CheckpointError(f"{p} is truncated at byte {n}: a checkpoint starts with a "
                                  f"{HEADER_BYTES}-byte header")
        raise CheckpointError(f"{p} is not a fedloom checkpoint: it starts with {head!r}, "
                              f"expected {MAGIC!r}")
    if n < HEADER_BYTES:
        raise CheckpointError(f"{p} is truncated at byte {n}: a checkpoint starts with a "
                              f"{HEADER_BYTES}-byte header")
    _, version, reserved, length, digest, pad = _HEAD.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{p} was written by checkpoint format version {version}; this "
                              f"fedloom ({fedloom_version()}) reads version {FORMAT_VERSION}")
    if reserved or any(pad):
        raise CheckpointError(f"{p} is damaged: header bytes 12-15 and 56-63 must be zero")
    end = HEADER_BYTES + length
    if n < end:
        raise CheckpointError(f"{p} is truncated at byte {n}: its header declares {length} "
                              f"payload bytes, so it should end at byte {end}")
    if n > end:
        raise CheckpointError(f"{p} is damaged: {n - end} bytes follow its declared end at "
                              f"byte {end}")
    got = hashlib.sha256(memoryview(data)[HEADER_BYTES:]).digest()
    if got != digest:
        raise CheckpointError(f"{p} is damaged: sha256 mismatch (expected {digest.hex()}, "
                              f"got {got.hex()})")
    try:
        body = _CODEC.decode_body(memoryview(data)[HEADER_BYTES:])
    except CodecError as exc:
        raise CheckpointError(f"{p} cannot be decoded: {exc}") from None
    return _check_body(p, body)


def _check_body(p: Path, body: dict[Any, Any]) -> Loaded:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{p} is not a checkpoint this fedloom can use: {why}")

    header, config, rows, table = (body.get(k) for k in ("header", "config", "rows", "state"))
    if type(header) is not dict or type(config) is not dict or type(rows) is not list or type(
            table) is not dict:
        raise bad("its body must hold header (a dict), config (a dict), rows (a list) and "
                  "state (a dict)")
    if header.get("format") != FORMAT_VERSION:
        raise bad(f"header format {header.get('format')!r}; expected {FORMAT_VERSION}")
    mine = fedloom_version()
    if header.get("fedloom") != mine:
        raise bad(f"written by fedloom {header.get('fedloom')!r}; this is fedloom {mine!r}, "
                  f"whose protocol classes may differ")
    if header.get("config_sha256") != config_sha256(config):
        raise bad("its config does not match the config hash in its header")
    if not all(type(r) is dict for r in rows):
        raise bad("rows must be dicts")
    return Loaded(p, header, config, rows, table)


# -- capturing and restoring a host ----------------------------------------------------------

def capture(host: Host, network: Any, allowed: Sequence[str],
            fresh: Deployment) -> dict[str, Any]:
    """The state table of a paused inproc host (and its network model, which must have
    `state()` when not None). `fresh` is a deployment built anew from the same config: what
    its nodes share with the host's is configuration the loading process has too (a learner
    cached per config), everything else is saved. Raises CheckpointError naming what cannot
    be saved."""
    sched = host.sched
    try:
        sched_state = sched.state()
    except RuntimeError as exc:
        raise CheckpointError(f"cannot checkpoint now: {exc}") from None
    events = [e[2:] for e in sched_state["heap"]] + sched_state["fifo"]
    if any(e[0] == CALL for e in events):
        raise CheckpointError("cannot checkpoint: a transport callback (CALL event) is queued; "
                              "checkpoints are taken on inproc only")
    up = sorted(host.nodes)
    counterparts = objstate.Fresh(fresh.make_node, up)
    anchors: dict[int, int] = {}
    for node in up:
        anchors.setdefault(id(host.nodes[node]), node)
    ids = sorted(host.ctxs)
    ctxs = [host.ctxs[node] for node in ids]
    # Per-node scalars as arrays and the rest sparse: 10,000 idle clients cost little.
    nodes = {
        "ids": np.array(ids, np.int64),
        "busy": np.array([c.busy_until for c in ctxs], np.float64),
        "hold": np.array([c.hold for c in ctxs], np.float64),
        "seq": np.array([c._seq for c in ctxs], np.int64),
        "proto": [c.proto for c in ctxs],
        "pending": {c.id: list(c.pending) for c in ctxs if c.pending},
        "timers": {c.id: c.timers for c in ctxs if c.timers},
        "rng": {c.id: c._rng for c in ctxs if c._rng is not None},
    }
    root = {
        "now": sched_state["now"], "seq": sched_state["seq"],
        "heap": sched_state["heap"], "fifo": sched_state["fifo"],
        "nodes": nodes,
        "host": {
            "timer_token": host._timer_token, "extra_messages": host._extra_messages,
            "bytes": host._bytes, "events": host._events, "dropped": host._dropped,
            "lost": host._lost, "crash_at": host._crash_at, "down": sorted(host.down),
        },
        "network": network.state() if network is not None else None,
        "tables": _side_tables(host, allowed),
        # Lossy-stage byte counters, so a resumed run's "wire" rows count on from here.
        "codec": getattr(host.strict, "stats", None),
    }
    try:
        return objstate.dump(root, fresh=counterparts, anchors=anchors, allowed=allowed)
    except objstate.StateError as exc:
        raise CheckpointError(f"cannot checkpoint: {exc}") from None


def _side_tables(host: Host, allowed: Sequence[str]) -> list[list[Any]]:
    """Entries for this host's contexts in module-level WeakKeyDictionaries of the protocol's
    modules (state a protocol keeps per node outside its instance, e.g. across restarts)."""
    modules = set()
    for kind in {type(proto) for proto in host.nodes.values()}:
        for cls in kind.__mro__:
            if objstate.module_allowed(cls.__module__, allowed):
                modules.add(cls.__module__)
    out: list[list[Any]] = []
    for m in sorted(modules):
        mod = sys.modules.get(m)
        if mod is None:
            continue
        for name, table in sorted(vars(mod).items()):
            if isinstance(table, weakref.WeakKeyDictionary):
                entries = [[node, table[ctx]] for node, ctx in sorted(host.ctxs.items())
                           if ctx in table]
                if entries:
                    out.append([m, name, entries])
    return out


def restore(host: Host, network: Any, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Load a state table into `host`, freshly made for a deployment built from the same config
    and not started (and into `network`, made from the same config). Protocol objects are
    restored into nodes the deployment makes, so what it shares between them stays shared.
    The table is decoded and checked in full first: on a CheckpointError neither `host` nor
    `network` has changed."""
    dep = host.deployment
    fresh = objstate.Fresh(dep.make_node, dep.node_ids)
    try:
        root = objstate.load(table, fresh=fresh, allowed=allowed)
        plan = _plan_restore(host, network, root, allowed)
    except objstate.StateError as exc:
        raise CheckpointError(f"cannot restore the checkpoint: {exc}") from None
    plan()


def _plan_restore(host: Host, network: Any, root: Any,
                  allowed: Sequence[str]) -> Callable[[], None]:
    """Check a decoded state against `host` and return the function that applies it."""
    def bad(why: str) -> objstate.StateError:
        return objstate.StateError(why)

    keys = ("now", "seq", "heap", "fifo", "nodes", "host", "network", "tables", "codec")
    if type(root) is not dict or sorted(root) != sorted(keys):
        raise bad(f"the state must be a dict of {', '.join(keys)}")
    now, seq = root["now"], root["seq"]
    if type(now) is not float or type(seq) is not int:
        raise bad("scheduler clock or counter has the wrong type")
    ctxs = host.ctxs

    def check_event(etype: Any, node: Any, payload: Any, where: str) -> None:
        if etype not in _EVENT_TYPES or type(etype) is not int:
            raise bad(f"{where}: event type {etype!r} cannot be restored")
        if node not in ctxs:
            raise bad(f"{where}: event for node {node!r}, which this run does not have")
        if etype == DELIVER and type(payload) is not Message:
            raise bad(f"{where}: a delivery must carry a Message")
        if etype == TIMER and (type(payload) is not tuple or len(payload) != 2
                               or type(payload[1]) is not int):
            raise bad(f"{where}: a timer event must carry (key, token)")

    heap = root["heap"]
    fifo = root["fifo"]
    if type(heap) is not list or type(fifo) is not list:
        raise bad("scheduler queues must be lists")
    for i, e in enumerate(heap):
        if type(e) is not tuple or len(e) != 5 or type(e[0]) is not float or type(e[1]) is not int:
            raise bad(f"heap entry {i} must be (time, seq, etype, node, payload)")
        check_event(*e[2:], where=f"heap entry {i}")
    for i, e in enumerate(fifo):
        if type(e) is not tuple or len(e) != 3:
            raise bad(f"fifo entry {i} must be (etype, node, payload)")
        check_event(*e, where=f"fifo entry {i}")

    nodes = root["nodes"]
    fields = ("ids", "busy", "hold", "seq", "proto", "pending", "timers", "rng")
    if type(nodes) is not dict or sorted(nodes) != sorted(fields):
        raise bad(f"node state must be a dict of {', '.join(fields)}")
    ids = nodes["ids"]
    n = len(ctxs)
    arrays = {"ids": "i", "busy": "f", "hold": "f", "seq": "i"}
    for key, kind in arrays.items():
        a = nodes[key]
        if type(a) is not np.ndarray or a.shape != (n,) or a.dtype.kind != kind:
            raise bad(f"node field {key!r} must be a length-{n} array of kind {kind!r}")
    if ids.tolist() != sorted(ctxs):
        raise bad(f"the checkpoint's nodes are not this run's {n} nodes")
    protos, pending, timers, rngs = (nodes[k] for k in ("proto", "pending", "timers", "rng"))
    if type(protos) is not list or len(protos) != n:
        raise bad(f"node protocol objects must be a list of {n}")
    for node, proto in zip(ids.tolist(), protos):
        if proto is not None and not callable(getattr(proto, "on_message", None)):
            raise bad(f"node {node}'s protocol object has no on_message")
    if not all(type(d) is dict and set(d) <= set(ctxs) for d in (pending, timers, rngs)):
        raise bad("node mailboxes, timers and rngs must be dicts keyed by this run's nodes")
    for node, t in timers.items():
        if type(t) is not dict or not all(type(tok) is int for tok in t.values()):
            raise bad(f"node {node}'s timers must map keys to tokens")
    for node, rng in rngs.items():
        if not isinstance(rng, np.random.Generator):
            raise bad(f"node {node}'s rng is not a numpy Generator")
    for node, box in pending.items():
        if type(box) is not list:
            raise bad(f"node {node}'s mailbox must be a list")
        for j, item in enumerate(box):
            if type(item) is not tuple or len(item) != 2:
                raise bad(f"node {node}'s mailbox entry {j} must be (etype, payload)")
            check_event(item[0], node, item[1], f"node {node}'s mailbox entry {j}")

    h = root["host"]
    counters = ("timer_token", "extra_messages", "bytes", "events", "dropped", "lost")
    if type(h) is not dict or not all(type(h.get(k)) is int for k in counters):
        raise bad("host counters missing or not integers")
    crash_at, down = h.get("crash_at"), h.get("down")
    if type(crash_at) is not dict or type(down) is not list or not set(down) <= set(ctxs):
        raise bad("host crash schedule or down set malformed")

    net = root["network"]
    if (net is None) != (network is None):
        raise bad("the checkpoint's network model does not match this run's "
                  f"({'none' if net is None else 'one'} saved, "
                  f"{'none' if network is None else 'one'} configured)")
    tables = _resolve_tables(root["tables"], allowed)
    codec_stats = root["codec"]
    if codec_stats is not None and type(codec_stats) is not dict:
        raise bad("codec byte counters malformed")

    def apply() -> None:
        # The network model checks its state before changing anything, so it goes first.
        if net is not None:
            try:
                network.restore(net)
            except ValueError as exc:
                raise CheckpointError(f"cannot restore the checkpoint: {exc}") from None
        host.sched.set_state(now, seq, list(heap), list(fifo))
        for node, proto, busy, hold, mseq in zip(
                ids.tolist(), protos, nodes["busy"].tolist(), nodes["hold"].tolist(),
                nodes["seq"].tolist()):
            ctx = ctxs[node]
            ctx.proto = proto
            ctx.on_message = proto.on_message if proto is not None else None
            if proto is not None:
                host.nodes[node] = proto
            ctx.busy_until, ctx.hold, ctx._seq = busy, hold, mseq
            box = pending.get(node)
            ctx.pending = deque(box) if box else None
            ctx.timers.clear()
            ctx.timers.update(timers.get(node, {}))
            ctx._rng = rngs.get(node)
        host._timer_token = h["timer_token"]
        host._extra_messages = h["extra_messages"]
        host._bytes, host._events = h["bytes"], h["events"]
        host._dropped, host._lost = h["dropped"], h["lost"]
        carry_on = getattr(host.strict, "continue_stats", None)
        if codec_stats is not None and carry_on is not None:
            carry_on(codec_stats)
        host._crash_at = {int(k): [float(t) for t in v] for k, v in crash_at.items()}
        host.down = set(down)
        for table, entries in tables:
            for node, value in entries:
                table[ctxs[node]] = value

    return apply


def _resolve_tables(tables: Any, allowed: Sequence[str]) -> list[tuple[Any, list[Any]]]:
    if type(tables) is not list:
        raise objstate.StateError("side tables must be a list")
    out = []
    for t in tables:
        if type(t) is not list or len(t) != 3 or type(t[0]) is not str or type(t[1]) is not str:
            raise objstate.StateError("a side table entry must be [module, name, entries]")
        module, name, entries = t
        if not objstate.module_allowed(module, allowed):
            raise objstate.StateError(f"refuses side table {module}:{name}: module {module!r} "
                                      f"is not under the allowed ones ({', '.join(allowed)})")
        try:
            table = getattr(import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise objstate.StateError(f"side table {module}:{name} cannot be found: {exc}"
                                      ) from None
        if not isinstance(table, weakref.WeakKeyDictionary):
            raise objstate.StateError(f"{module}:{name} is not a WeakKeyDictionary")
        if type(entries) is not list or not all(type(e) is list and len(e) == 2
                                                for e in entries):
            raise objstate.StateError(f"side table {module}:{name} entries malformed")
        out.append((table, entries))
    return out


# -- what the runner hands the transport -----------------------------------------------------

@dataclass
class CheckpointPlan:
    """Checkpointing for one run: where, how often (every `every` rounds, on the "round"
    metric rows), what to resume from, and the Ctrl-C flag. The runner makes it; a transport
    that supports checkpoints (inproc) attaches its pause hook and calls `save`."""

    directory: Path
    every: int | None
    config: dict[str, Any]
    rows: list[dict[str, Any]]  # the runner's metric rows (the same list, growing)
    allowed: tuple[str, ...]
    resume: Loaded | None = None
    # Builds the deployment anew from the config (the protocol's `build`): its nodes tell
    # configuration from state (see `capture`). Built once, at the first checkpoint.
    rebuild: Callable[[], Deployment] | None = None
    interrupted: bool = False
    saved: int = 0  # checkpoints written by this process
    last_bytes: int = 0
    write_s: float = 0.0  # capturing and writing them, in all
    _pause: Callable[[], None] | None = field(default=None, repr=False)
    _fresh: Deployment | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.directory / FILENAME

    def due(self, row: Mapping[str, Any]) -> bool:
        """Whether metric row `row` asks for a checkpoint (a "round" row, value % every = 0)."""
        every = self.every
        v = row.get("value")
        return (every is not None and every > 0 and row.get("name") == "round"
                and type(v) is int and v % every == 0)

    def attach(self, pause: Callable[[], None] | None) -> None:
        """Set (or clear) the hook that pauses the running loop after the current event."""
        self._pause = pause
        if pause is not None and self.interrupted:
            pause()

    def interrupt(self) -> None:
        """Ctrl-C: pause, save and stop. A second one while that happens stops at once."""
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        if self._pause is not None:
            self._pause()

    def last_round(self) -> int | None:
        """The value of the last "round" row so far."""
        for row in reversed(self.rows):
            if row.get("name") == "round" and type(row.get("value")) is int:
                return int(row["value"])
        return None

    def take(self, host: Host, network: Any) -> Path:
        """Capture the paused `host` (and `network`) and write the checkpoint; `write_s`
        counts both."""
        t = time.perf_counter()
        if self._fresh is None:
            if self.rebuild is None:
                raise CheckpointError("cannot checkpoint: the plan has no way to rebuild the "
                                      "deployment from its config")
            self._fresh = self.rebuild()
        table = capture(host, network, self.allowed, self._fresh)
        path = self.save(table, host.sched.now, host._events)
        self.write_s += time.perf_counter() - t
        return path

    def save(self, table: Mapping[str, Any], virtual_s: float, events: int) -> Path:
        """Write the checkpoint: `table` (from `capture`) with the config and rows so far."""
        header = {
            "fedloom": fedloom_version(), "format": FORMAT_VERSION, "round": self.last_round(),
            "virtual_s": virtual_s, "events": events, "config_sha256": config_sha256(self.config),
            "checkpoint_every": self.every, "written_at": time.time(),
        }
        body = {"header": header, "config": self.config, "rows": self.rows, "state": table}
        self.last_bytes = write(self.path, body)
        self.saved += 1
        return self.path
