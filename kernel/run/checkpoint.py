"""Checkpoints: a whole inproc run's state in one file of plain data, written atomically, read
back only when every byte checks out, and restored into a host freshly built from the config
before anything runs. Resuming runs no code named in the file: the file names no class,
function or module (see kernel.run.state for the rule that turns protocol objects into data),
and its config is resolved through the registry, which accepts only declared builders.

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
equals an uninterrupted one's, wall-clock fields aside); `state` is what `capture` returns:
node ids, each node's protocol object as a kernel.run.state tree, and one more tree with the
scheduler (clock, insertion counter, queued events), every node's context (busy time,
mailbox, timers, rng, message counter), the host's counters and crash schedule, the network
model's random stream and pipes, context-keyed side tables (module-level
`weakref.WeakKeyDictionary`s in the protocol's modules, by variable name, matched against the
tables those modules define) and the codec's byte counters. No string in the file names a
module, class or function.

Reading checks that the path is a regular file below `MAX_BYTES` (and below the memory
available), then magic, version, length and sha256 before decoding anything; any mismatch is a
`CheckpointError` that says which ("... is truncated at byte N", "... is damaged: sha256
mismatch", "... was written by checkpoint format version 7", "... is not a fedloom
checkpoint"). Restoring builds a complete new host (and network model state) first and
changes nothing a run uses until all of it succeeded.

Checkpoints are not signed: a file another user wrote can at worst make a run continue from
state of its choosing (which the file's owner could have produced anyway), not run code; the
sha256 detects damage, not authorship.

Taken between events only, on inproc: the transport asks the host to pause
(`Host.request_pause`), saves, and goes on. Events that call Python functions directly (a
transport's CALL events) cannot be saved; inproc queues none.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from kernel.api import Deployment, RunError
from kernel.host import Host
from kernel.loop import CALL, CRASH, DELIVER, RESTART, TIMER, WAKE
from kernel.messages import Message
from kernel.run import state as objstate
from kernel.run.files import InputError, read_regular, write_atomic
from kernel.run.outputs import jsonable
from kernel.wire.codec import Codec, CodecError

__all__ = [
    "FILENAME", "FORMAT_VERSION", "MAX_BYTES", "CheckpointError", "CheckpointPlan", "Loaded",
    "RunInterrupted", "capture", "read", "restore", "write",
]

FILENAME = "checkpoint.fl"
MAGIC = b"\x89FLCKPT\n"
FORMAT_VERSION = 2  # 1 named classes and functions; 2 is plain data only
_HEAD = struct.Struct("<8sIIQ32s8s")  # magic, version, reserved, length, sha256, padding
HEADER_BYTES = _HEAD.size  # 64: the payload starts aligned
MAX_BYTES = 1 << 36  # 64 GiB: a checkpoint larger than this is refused unread
# Checkpoints hold whole models and every queued message: the codec's message limits do not
# apply (the sha256 has already vouched for every byte when decoding starts), but decoding
# still allocates at most a bounded multiple of the file's size (see kernel.wire.codec).
_CODEC = Codec(max_message_bytes=1 << 62, max_tensor_bytes=1 << 62, max_depth=256,
               max_items=1 << 40)


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
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, 0, length, h.digest(), bytes(8))
    return write_atomic(p, [head, *parts], sync=True)


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
    if not p.exists() and not p.is_symlink():
        raise CheckpointError(f"no checkpoint to resume from: {p} does not exist (a run "
                              f"writes one every --checkpoint-every N rounds, and when "
                              f"interrupted)")
    # Decoding needs about the file's size again (arrays are copied out on restore).
    available = psutil.virtual_memory().available
    cap = min(MAX_BYTES, max(available // 2, 1 << 20))
    try:
        data = read_regular(p, cap, "checkpoint")
    except InputError as exc:
        size = p.stat().st_size if p.is_file() else 0
        if size > cap and cap < MAX_BYTES:
            raise CheckpointError(f"checkpoint {str(p)!r} is {size} bytes; loading it needs "
                                  f"about twice that and this machine has {available} bytes "
                                  f"of memory available") from None
        raise CheckpointError(str(exc)) from None
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

_EVENT_TYPES = frozenset({DELIVER, TIMER, CRASH, RESTART, WAKE})
_COUNTERS = ("timer_token", "extra_messages", "bytes", "events", "dropped", "lost")
_KEYS = ("now", "seq", "heap", "fifo", "busy", "hold", "mseq", "pending", "timers", "rng",
         "host", "crash_at", "down", "network", "tables", "codec")


def _side_tables(protos: Iterable[Any]) -> dict[str, weakref.WeakKeyDictionary[Any, Any]]:
    """The module-level WeakKeyDictionaries of the modules defining these protocol objects'
    classes (state a protocol keeps per node context, outside its instance, e.g. across
    restarts), by variable name. The tables are found from the deployment, never from a file:
    a checkpoint's table names are only matched against these."""
    out: dict[str, weakref.WeakKeyDictionary[Any, Any]] = {}
    for kind in sorted({type(p) for p in protos if p is not None}, key=lambda t: t.__qualname__):
        for cls in kind.__mro__:
            mod = sys.modules.get(cls.__module__)
            if mod is None or cls.__module__ == "builtins":
                continue
            for name, table in vars(mod).items():
                if isinstance(table, weakref.WeakKeyDictionary):
                    if out.get(name, table) is not table:
                        raise objstate.StateError(
                            f"two modules of this protocol hold a context table named "
                            f"{name!r}; rename one so checkpoints can tell them apart")
                    out[name] = table
    return out


def capture(host: Host, network: Any, fresh: Callable[[int], Any]) -> dict[str, Any]:
    """The plain-data state of a paused inproc host (and its network model, which must have
    `state()` when not None). `fresh(node)` is a node freshly made from the same config: what
    is the same there is configuration (see kernel.run.state). Raises CheckpointError naming
    what cannot be saved."""
    sched = host.sched
    try:
        st = sched.state()
    except RuntimeError as exc:
        raise CheckpointError(f"cannot checkpoint now: {exc}") from None
    if any(e[0] == CALL for e in [e[2:] for e in st["heap"]] + st["fifo"]):
        raise CheckpointError("cannot checkpoint: a transport callback (CALL event) is queued; "
                              "checkpoints are taken on inproc only")
    ids = sorted(host.ctxs)
    ctxs = [host.ctxs[n] for n in ids]
    try:
        tables = _side_tables([c.proto for c in ctxs])
    except objstate.StateError as exc:
        raise CheckpointError(f"cannot checkpoint: {exc}") from None
    root = {
        "now": st["now"], "seq": st["seq"], "heap": st["heap"], "fifo": st["fifo"],
        # Per-node scalars as arrays and the rest sparse: 10,000 idle clients cost little.
        "busy": np.array([c.busy_until for c in ctxs], np.float64),
        "hold": np.array([c.hold for c in ctxs], np.float64),
        "mseq": np.array([c._seq for c in ctxs], np.int64),
        "pending": {c.id: list(c.pending) for c in ctxs if c.pending},
        "timers": {c.id: c.timers for c in ctxs if c.timers},
        "rng": {c.id: c._rng for c in ctxs if c._rng is not None},
        "host": {k: getattr(host, f"_{k}") for k in _COUNTERS},
        "crash_at": host._crash_at, "down": sorted(host.down),
        "network": network.state() if network is not None else None,
        "tables": {name: {n: t[c] for n, c in zip(ids, ctxs) if c in t}
                   for name, t in sorted(tables.items())},
        # Lossy-stage byte counters, so a resumed run's "wire" rows count on from here.
        "codec": getattr(host.strict, "stats", None),
    }
    d = objstate.Dumper()
    try:
        protos = [d.dump(c.proto, fresh(c.id), f"node {c.id}") if c.proto is not None else None
                  for c in ctxs]
        return {"ids": np.array(ids, np.int64), "protos": protos, "run": d.dump(root)}
    except objstate.StateError as exc:
        raise CheckpointError(f"cannot checkpoint: {exc}") from None


def restore(host: Host, network: Any, state: Mapping[str, Any], probe: Deployment) -> None:
    """Load `state` (from `capture`) into `host`, freshly made for a deployment built from the
    same config and not started (and into `network`, made from the same config). Protocol
    objects are restored into nodes the deployment makes now, so what it shares between them
    stays shared. `probe` is a second deployment built from the same config: what its nodes
    share with `host`'s (process-wide caches) is never written into. Everything is decoded and
    checked first: on a CheckpointError neither `host`, `network` nor anything shared has
    changed."""
    try:
        apply = _plan_restore(host, network, state, probe)
    except objstate.StateError as exc:
        raise CheckpointError(f"cannot restore the checkpoint: {exc}") from None
    except Exception as exc:
        # A shape the checks above did not foresee (or a protocol's load_state refusing):
        # still the checkpoint's fault, still nothing changed.
        raise CheckpointError(f"cannot restore the checkpoint: malformed state "
                              f"({type(exc).__name__}: {exc})") from None
    apply()


def _plan_restore(host: Host, network: Any, state: Mapping[str, Any],
                  probe: Deployment) -> Callable[[], None]:
    bad = objstate.StateError
    ctxs = host.ctxs
    n = len(ctxs)
    ids, trees = state.get("ids"), state.get("protos")
    if (type(ids) is not np.ndarray or ids.dtype.kind != "i" or ids.tolist() != sorted(ctxs)
            or type(trees) is not list or len(trees) != n):
        raise bad(f"the checkpoint's nodes are not this run's {n} nodes")
    loader = objstate.Loader()
    dep = host.deployment
    protos: list[Any] = []
    for node, t in zip(ids.tolist(), trees):
        if t is None:
            protos.append(None)
            continue
        fresh = dep.make_node(node)
        loader.frozen = objstate.shared(fresh, probe.make_node(node))
        protos.append(loader.load(t, fresh))
    loader.frozen = frozenset()
    for node, proto in zip(ids.tolist(), protos):
        if proto is not None and not callable(getattr(proto, "on_message", None)):
            raise bad(f"node {node}'s protocol object has no on_message")
    root = loader.load(state.get("run"))
    if type(root) is not dict or set(root) != set(_KEYS):
        raise bad(f"the state must be a dict of {', '.join(_KEYS)}")
    now, seq, heap, fifo = root["now"], root["seq"], root["heap"], root["fifo"]
    if type(now) is not float or type(seq) is not int or type(heap) is not list or type(
            fifo) is not list or not math.isfinite(now):
        raise bad("scheduler clock, counter or queues have the wrong types")

    def check_event(e: Any, where: str) -> None:
        etype, node, payload = e if type(e) is tuple and len(e) == 3 else (None, None, None)
        if type(etype) is not int or etype not in _EVENT_TYPES or node not in ctxs:
            raise bad(f"{where}: event {e!r:.80} cannot be restored into this run")
        if etype == DELIVER and type(payload) is not Message:
            raise bad(f"{where}: a delivery must carry a Message")
        if etype == TIMER and (type(payload) is not tuple or len(payload) != 2
                               or type(payload[1]) is not int):
            raise bad(f"{where}: a timer event must carry (key, token)")

    for i, e in enumerate(heap):
        if type(e) is not tuple or len(e) != 5 or type(e[0]) is not float or type(
                e[1]) is not int or not math.isfinite(e[0]):
            raise bad(f"heap entry {i} must be (time, seq, etype, node, payload)")
        check_event(e[2:], f"heap entry {i}")
    if len({e[:2] for e in heap}) != len(heap):
        raise bad("two heap entries share a (time, seq) key")
    for i, e in enumerate(fifo):
        check_event(e, f"fifo entry {i}")
    for key, kind in (("busy", "f"), ("hold", "f"), ("mseq", "i")):
        a = root[key]
        if type(a) is not np.ndarray or a.shape != (n,) or a.dtype.kind != kind or (
                kind == "f" and (np.isnan(a).any() or np.isneginf(a).any())):
            raise bad(f"node field {key!r} must be a length-{n} array of kind {kind!r} "
                      f"(no NaN)")
    pending, timers, rngs = root["pending"], root["timers"], root["rng"]
    if not all(type(d) is dict and set(d) <= set(ctxs) for d in (pending, timers, rngs)):
        raise bad("node mailboxes, timers and rngs must be dicts keyed by this run's nodes")
    for node, t in timers.items():
        if type(t) is not dict or not all(type(tok) is int for tok in t.values()):
            raise bad(f"node {node}'s timers must map keys to tokens")
    for node, rng in rngs.items():
        if type(rng) is not np.random.Generator:
            raise bad(f"node {node}'s rng is not a numpy Generator")
    for node, box in pending.items():
        if type(box) is not list:
            raise bad(f"node {node}'s mailbox must be a list")
        for j, item in enumerate(box):
            if type(item) is not tuple or len(item) != 2:
                raise bad(f"node {node}'s mailbox entry {j} must be (etype, payload)")
            check_event((item[0], node, item[1]), f"node {node}'s mailbox entry {j}")
    h, crash_at, down = root["host"], root["crash_at"], root["down"]
    if type(h) is not dict or not all(type(h.get(k)) is int for k in _COUNTERS):
        raise bad("host counters missing or not integers")
    if (type(crash_at) is not dict or type(down) is not list or not set(down) <= set(ctxs)
            or not all(type(k) is int and type(v) is list and all(type(x) is float for x in v)
                       for k, v in crash_at.items())):
        raise bad("host crash schedule or down set malformed")
    net = root["network"]
    if (net is None) != (network is None):
        raise bad("the checkpoint's network model does not match this run's "
                  f"({'none' if net is None else 'one'} saved, "
                  f"{'none' if network is None else 'one'} configured)")
    known = _side_tables(protos)
    tables = root["tables"]
    if type(tables) is not dict or not all(
            type(v) is dict and set(v) <= set(ctxs) for v in tables.values()):
        raise bad("side tables malformed")
    unknown = sorted(set(tables) - set(known), key=str)
    if unknown:
        raise bad(f"side table {unknown[0]!r} is not one this run's protocol modules define")
    codec_stats = root["codec"]
    if codec_stats is not None and (type(codec_stats) is not dict or not all(
            type(v) is int or (k == "stage_bytes" and type(v) is dict
                               and all(type(x) is int for x in v.values()))
            for k, v in codec_stats.items())):
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
                ids.tolist(), protos, root["busy"].tolist(), root["hold"].tolist(),
                root["mseq"].tolist()):
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
        for k in _COUNTERS:
            setattr(host, f"_{k}", h[k])
        carry_on = getattr(host.strict, "continue_stats", None)
        if codec_stats is not None and carry_on is not None:
            carry_on(codec_stats)
        host._crash_at = crash_at
        host.down = set(down)
        for name, entries in tables.items():
            for node, value in entries.items():
                known[name][ctxs[node]] = value

    return apply


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
    _fresh_nodes: dict[int, Any] = field(default_factory=dict, repr=False)

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
        self.fresh()
        table = capture(host, network, self._fresh_node)
        path = self.save(table, host.sched.now, host._events)
        self.write_s += time.perf_counter() - t
        return path

    def fresh(self) -> Deployment:
        """The deployment rebuilt from the config, never run: what saving compares with and
        what restoring probes for shared objects."""
        if self._fresh is None:
            if self.rebuild is None:
                raise CheckpointError("cannot checkpoint: the plan has no way to rebuild the "
                                      "deployment from its config")
            self._fresh = self.rebuild()
        return self._fresh

    def _fresh_node(self, node: int) -> Any:
        # Made once per node and never run, so every checkpoint compares with the same.
        try:
            return self._fresh_nodes[node]
        except KeyError:
            assert self._fresh is not None
            made = self._fresh_nodes[node] = self._fresh.make_node(node)
            return made

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
