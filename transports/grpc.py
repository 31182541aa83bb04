"""grpc: nodes on several shard processes that talk real gRPC on loopback (by default).

The driver (this module's `GrpcTransport`) starts `transport.shards` processes
(`python -m transports.grpc_shard`), gives each its spec (plain JSON on stdin; never pickle) and
waits for the port it prints. Shards connect one long-lived bidirectional stream to every other
shard;
the driver opens an event stream from each (metric rows, the result, errors) and drives them with
unary control calls. Every call carries the run's token and has a deadline.

Wire format of one gRPC message (raw bytes, no generated stubs), the same on data and event
streams; a "frame" is one codec-encoded message (data) or body (events) plus its routing `meta`:

- BATCH: b"\\x01" + u32 header length + msgpack [[meta, nbytes], ...] + the frames back to back;
  small frames of one tick share one gRPC message.
- HEAD:  b"\\x02" + msgpack [meta, nbytes]; then CHUNK messages: b"\\x03" + raw bytes, in order,
  until nbytes have come; so a 40 MB tensor never needs a 40 MB gRPC message.

Between shards, delivery is exactly-once across broken streams: each Deliver message starts with
a u64 sequence number, counted per sending shard (1, 2, ...); the receiver answers each with the
highest sequence it has handled (a cumulative ack). The sender keeps what is not acknowledged and,
on the next stream, sends it again first; the receiver drops what it already handled and keeps
one `Reassembler` per sender across streams, so a chunked frame broken mid-way resumes.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import os
import queue
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import grpc  # the grpcio package: absolute imports never resolve to this module
import msgpack
import numpy as np

from kernel.api import RunError
from kernel.options import options
from kernel.wire.codec import Codec, CodecError
from transports.base import Job, Outcome, Transport, place

log = logging.getLogger("fedloom.grpc")

SERVICE = "fedloom.Shard"
DELIVER = f"/{SERVICE}/Deliver"  # stream -> stream: frames from a peer shard -> acks
EVENTS = f"/{SERVICE}/Events"  # unary -> stream: metric rows, done, errors, for the driver
CONTROL = f"/{SERVICE}/Control"  # unary: peers, start, stop, ping
TOKEN_KEY = "fedloom-token"
PEER_KEY = "fedloom-peer"
READY = "FEDLOOM-GRPC-SHARD"  # prefix of the shard's one stdout line: READY port / ERROR text

BATCH, HEAD, CHUNK = 1, 2, 3
_U32 = struct.Struct("<I")
SEQ = struct.Struct("<Q")  # the sequence number before each Deliver message, and each ack
# A frame may claim at most this many bytes; nothing is allocated before the bytes arrive.
MAX_FRAME_BYTES = 1 << 34

DEFAULTS: dict[str, Any] = {
    "kind": "grpc",
    "shards": 2,
    "host": "127.0.0.1",
    "token": "",  # "" => a fresh secrets.token_hex(16) per run
    "chunk_bytes": 2 << 20,
    "call_timeout": 30.0,
    "connect_timeout": 60.0,  # shard start-up (imports, build) and connecting, each
    "max_reconnects": 5,
    "strict": False,
    "tick": 0.0,  # > 0: a stream lingers this long to fill a batch; 0 sends when it is free
    "queue_bytes": 64 << 20,  # per peer stream; a full queue blocks the sending node
    "pool_bytes": 256 << 20,  # per shard: receive buffers of chunked frames kept for reuse
}

Buffer = bytes | bytearray | memoryview
Frame = tuple[Any, Sequence[Buffer], int]  # (meta, encoded parts, their total size)


def validate_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """The [transport] options of a grpc run, merged over DEFAULTS and checked."""
    opts = options("transport", given, DEFAULTS, choices={"kind": ("grpc",)})
    for key in ("shards", "chunk_bytes", "queue_bytes"):
        if opts[key] < 1:
            raise_config(f"[transport] {key} = {opts[key]!r} must be >= 1")
    for key in ("call_timeout", "connect_timeout"):
        if not opts[key] > 0:
            raise_config(f"[transport] {key} = {opts[key]!r} must be > 0 seconds")
    for key in ("max_reconnects", "tick", "pool_bytes"):
        if opts[key] < 0:
            raise_config(f"[transport] {key} = {opts[key]!r} must be >= 0")
    if opts["chunk_bytes"] > 64 << 20:
        raise_config(f"[transport] chunk_bytes = {opts['chunk_bytes']} must be <= 64 MiB")
    return opts


def raise_config(text: str) -> None:
    from kernel.options import ConfigError

    raise ConfigError(text)


# -- framing -----------------------------------------------------------------------------------
def nbytes_of(parts: Sequence[Buffer]) -> int:
    """Total size of encoded parts."""
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


def _byte_view(part: Buffer) -> memoryview:
    mv = part if isinstance(part, memoryview) else memoryview(part)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def pack(frames: Sequence[Frame], chunk_bytes: int) -> Iterator[bytes]:
    """The gRPC messages that carry `frames`, in order: small ones batched up to `chunk_bytes`
    per message, larger ones as a HEAD and CHUNKs of at most `chunk_bytes`. One copy each."""
    batch: list[Frame] = []
    size = 0
    for frame in frames:
        n = frame[2]
        if n > chunk_bytes:
            if batch:
                yield _pack_batch(batch)
                batch, size = [], 0
            yield b"\x02" + msgpack.packb([frame[0], n])
            yield from _chunks(frame[1], chunk_bytes)
            continue
        if batch and size + n > chunk_bytes:
            yield _pack_batch(batch)
            batch, size = [], 0
        batch.append(frame)
        size += n
    if batch:
        yield _pack_batch(batch)


def _pack_batch(batch: Sequence[Frame]) -> bytes:
    header = msgpack.packb([[meta, n] for meta, _, n in batch])
    pieces: list[Buffer] = [b"\x01", _U32.pack(len(header)), header]
    for _, parts, _ in batch:
        pieces.extend(parts)
    return b"".join(pieces)


def _chunks(parts: Sequence[Buffer], size: int) -> Iterator[bytes]:
    out: list[Buffer] = [b"\x03"]
    room = size
    for part in parts:
        mv = _byte_view(part)
        off, end = 0, len(mv)
        while off < end:
            take = min(room, end - off)
            out.append(mv[off : off + take])
            off += take
            room -= take
            if room == 0:
                yield b"".join(out)
                out, room = [b"\x03"], size
    if len(out) > 1:
        yield b"".join(out)


class BufferPool:
    """Receive buffers for chunked frames, reused once nothing refers to them any more: filling
    warm memory is several times faster than faulting in fresh pages (DESIGN.md). Thread-safe;
    keeps at most `max_bytes` for reuse."""

    # References to a free pooled buffer while `get` looks at it: the pool's list, the loop
    # variable and getrefcount's argument. Any decoded array still alive adds one.
    _FREE = 3

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.reused = 0

    def get(self, n: int) -> np.ndarray:
        """A writable uint8 buffer of exactly `n` bytes (MemoryError when none can be had)."""
        with self._lock:
            for buf in self._bufs:
                if buf.nbytes == n and sys.getrefcount(buf) == self._FREE:
                    buf.flags.writeable = True
                    self.reused += 1
                    return buf
            buf = np.empty(n, np.uint8)
            held = sum(b.nbytes for b in self._bufs)
            if held + n > self.max_bytes:
                # Make room by forgetting free buffers, oldest first; busy ones go when unused.
                self._bufs = [b for b in self._bufs if sys.getrefcount(b) > self._FREE]
                held = sum(b.nbytes for b in self._bufs)
            if held + n <= self.max_bytes:
                self._bufs.append(buf)
            return buf


class Reassembler:
    """Turns one stream's gRPC messages back into (meta, frame buffer) pairs.

    Counts the stream's bytes so a malformed message is reported at its byte offset; after a
    CodecError the stream can go on (a partial chunked frame is dropped).
    """

    def __init__(self, limit: int = MAX_FRAME_BYTES, pool: BufferPool | None = None) -> None:
        self.limit = limit
        self.pool = pool
        self.offset = 0  # stream bytes before the message being read
        self._meta: Any = None
        self._want = 0
        self._got = 0
        self._buf: np.ndarray | None = None

    def feed(self, data: bytes | memoryview) -> list[tuple[Any, Buffer]]:
        """The frames `data` completes (none while a chunked frame is still arriving)."""
        at = self.offset
        self.offset += len(data)
        if not data:
            raise CodecError(f"empty stream message at stream byte offset {at}")
        kind = data[0]
        if self._want and kind != CHUNK:
            self._reset()
            raise CodecError(f"message type {kind} at stream byte offset {at} inside a "
                             f"chunked frame; expected a CHUNK ({CHUNK})")
        if kind == BATCH:
            return self._batch(data, at)
        if kind == HEAD:
            head = self._header(data, 1, len(data), at, "HEAD")
            if (not isinstance(head, list) or len(head) != 2 or not isinstance(head[1], int)
                    or isinstance(head[1], bool)):
                raise CodecError(f"HEAD at stream byte offset {at}: expected [meta, nbytes], "
                                 f"got {head!r:.60}")
            meta, n = head
            if not 0 < n <= self.limit:
                raise CodecError(f"HEAD at stream byte offset {at} claims {n} bytes; "
                                 f"limit 1..{self.limit}")
            self._meta, self._want, self._got = meta, n, 0
            return []
        if kind == CHUNK:
            if not self._want:
                raise CodecError(f"CHUNK at stream byte offset {at} without a HEAD")
            n = len(data) - 1
            got = self._got
            if got + n > self._want:
                want = self._want
                self._reset()
                raise CodecError(f"CHUNK at stream byte offset {at} overruns its frame of "
                                 f"{want} bytes")
            if self._buf is None:
                # Uninitialised memory, filled chunk by chunk as they come (never a join at the
                # end: the copy overlaps the transfer), allocated only once bytes arrive.
                try:
                    self._buf = (self.pool.get(self._want) if self.pool is not None
                                 else np.empty(self._want, np.uint8))
                except MemoryError:
                    want = self._want
                    self._reset()
                    raise CodecError(f"no memory for a frame of {want} bytes (HEAD before "
                                     f"stream byte offset {at})") from None
            self._buf[got : got + n] = np.frombuffer(data, np.uint8, n, 1)
            self._got = got + n
            if self._got < self._want:
                return []
            meta, buf = self._meta, self._buf
            self._reset()
            buf.flags.writeable = False  # decoded arrays are read-only views of it
            return [(meta, buf.data)]
        raise CodecError(f"unknown message type {kind} at stream byte offset {at}; "
                         f"expected BATCH (1), HEAD (2) or CHUNK (3)")

    def _reset(self) -> None:
        self._meta, self._want, self._got, self._buf = None, 0, 0, None

    def _batch(self, data: bytes | memoryview, at: int) -> list[tuple[Any, Buffer]]:
        if len(data) < 5:
            raise CodecError(f"BATCH at stream byte offset {at} truncated at byte {len(data)}: "
                             f"needs a 4-byte header length")
        (hlen,) = _U32.unpack_from(data, 1)
        start = 5 + hlen
        if start > len(data):
            raise CodecError(f"BATCH at stream byte offset {at}: header of {hlen} bytes "
                             f"truncated at byte {len(data)}")
        entries = self._header(data, 5, start, at, "BATCH")
        if not isinstance(entries, list):
            raise CodecError(f"BATCH header at stream byte offset {at + 5} is not a list")
        view = memoryview(data)
        out: list[tuple[Any, Buffer]] = []
        pos = start
        for i, entry in enumerate(entries):
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], int)
                    or isinstance(entry[1], bool) or entry[1] < 0):
                raise CodecError(f"BATCH at stream byte offset {at}: entry {i} is not "
                                 f"[meta, nbytes]")
            end = pos + entry[1]
            if end > len(data):
                raise CodecError(f"BATCH at stream byte offset {at}: frame {i} truncated at "
                                 f"stream byte offset {at + len(data)} ({end - len(data)} "
                                 f"bytes missing)")
            out.append((entry[0], view[pos:end]))
            pos = end
        if pos != len(data):
            raise CodecError(f"BATCH at stream byte offset {at}: {len(data) - pos} bytes after "
                             f"its last frame (at stream byte offset {at + pos})")
        return out

    @staticmethod
    def _header(data: bytes | memoryview, start: int, end: int, at: int, what: str) -> Any:
        try:
            n = end - start
            return msgpack.unpackb(memoryview(data)[start:end], raw=False, strict_map_key=True,
                                   max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n,
                                   max_ext_len=n)
        except Exception as exc:  # msgpack raises several types for bad input
            raise CodecError(f"{what} header at stream byte offset {at + start} is not valid "
                             f"msgpack: {type(exc).__name__}: {exc}") from None


class Inbound:
    """What a receiving shard keeps of one sender across its streams: the last sequence number
    handled and the sender's `Reassembler`. Callers hold `lock` around `open` and what they do
    with the body, so two streams of one sender (an old one still draining) never interleave."""

    def __init__(self, reasm: Reassembler) -> None:
        self.reasm = reasm
        self.last = 0
        self.lock = threading.Lock()

    def open(self, data: bytes) -> memoryview | None:
        """The body of `data` when it is the next message; None when it was handled already
        (a resend). CodecError for a gap or no sequence number: the stream must be restarted."""
        if len(data) < SEQ.size:
            raise CodecError(f"Deliver message of {len(data)} bytes has no sequence number")
        (seq,) = SEQ.unpack_from(data)
        if seq <= self.last:
            return None
        if seq != self.last + 1:
            raise CodecError(f"Deliver message {seq} after {self.last}: messages are missing")
        self.last = seq
        return memoryview(data)[SEQ.size:]


# -- authentication ----------------------------------------------------------------------------
REFUSED_LOG_INTERVAL_S = 10.0  # unauthenticated calls are logged as one line per interval


class RefusalLog:
    """Counts refused (unauthenticated) calls and logs them as one line per `interval`: the
    first at once, then how many came since, so a flood of strangers costs no log storm.
    `flush` reports what the last interval counted (a shard calls it when it exits)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.total = 0
        self._count = 0
        self._last_log = -math.inf
        self._latest = ""
        self._lock = threading.Lock()

    def note(self, peer: str, why: str) -> None:
        """One refused call from `peer` ("wrong" or "no" token)."""
        with self._lock:
            self.total += 1
            self._count += 1
            self._latest = f"{peer}: {why} token"
            now = time.monotonic()
            if now - self._last_log >= self.interval:
                self._emit(now)

    def flush(self) -> None:
        """Log what was counted since the last line, if anything."""
        with self._lock:
            if self._count:
                self._emit(time.monotonic())

    def _emit(self, now: float) -> None:
        log.warning("refused %d unauthenticated call(s) since the last report (%d in all); "
                    "latest from %s", self._count, self.total, self._latest)
        self._count, self._last_log = 0, now


refusals = RefusalLog(REFUSED_LOG_INTERVAL_S)


def call_metadata(token: str, peer: str) -> tuple[tuple[str, str], ...]:
    """Metadata every call carries: the run's token and who is calling (for logs)."""
    return ((TOKEN_KEY, token), (PEER_KEY, peer))


def authenticate(context: grpc.ServicerContext, token: str) -> str:
    """The caller's name when it sent the right token; otherwise abort the call with
    UNAUTHENTICATED before anything it sent is read."""
    md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
    given = md.get(TOKEN_KEY, "")
    peer = f"{md.get(PEER_KEY, '?')} at {context.peer()}"
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        refusals.note(peer, "wrong" if given else "no")
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      f"{'wrong' if given else 'missing'} {TOKEN_KEY} metadata")
    return peer


def channel_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """Channel and server options: messages up to two chunks plus slack, quick reconnects."""
    limit = 2 * chunk_bytes + (1 << 20)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.min_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),
    ]


def stream_deadline(until: float | None, call_timeout: float) -> float:
    """Timeout of a run-long stream: the run's wall limit plus slack, else a day."""
    return (until if until is not None else 86400.0) + 4 * call_timeout


# -- the driver --------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[1]


class ShardProcess:
    """One shard process as the driver sees it: spawn, readiness, control calls, its events."""

    def __init__(self, index: int, nodes: Sequence[int], spec: dict[str, Any],
                 opts: Mapping[str, Any]) -> None:
        self.index = index
        self.nodes = list(nodes)
        self.opts = opts
        self.address = ""
        self.stopped = False
        self.stats: dict[str, Any] = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.channel: grpc.Channel | None = None
        self.events_call: Any = None
        env = dict(os.environ)
        # Shards import protocols by name ("package.module:attr" included) from the same roots.
        paths = [str(REPO_ROOT), os.getcwd(), *filter(None, env.get("PYTHONPATH", "").split(
            os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.setdefault("PYTHONUNBUFFERED", "1")
        text = json.dumps(spec)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "transports.grpc_shard"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
            # Ctrl-C reaches the driver only; it shuts the shards down itself.
            start_new_session=True,
        )
        self.pid = self.proc.pid
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        threading.Thread(target=self._read_stdout, args=(self.proc.stdout,),
                         name=f"grpc-shard-{index}-stdout", daemon=True).start()

    def describe(self) -> str:
        """'grpc shard K (pid P, nodes ...)' for error messages."""
        nodes = self.nodes if len(self.nodes) <= 12 else [*self.nodes[:12], "..."]
        return f"grpc shard {self.index} (pid {self.pid}, nodes {nodes})"

    def _read_stdout(self, stream: IO[str]) -> None:
        seen = False
        for line in stream:
            if not seen and line.startswith(READY):
                seen = True
                self._lines.put(line.strip())
            else:
                sys.stdout.write(f"[grpc shard {self.index}] {line}")
        self._lines.put(None)

    def wait_ready(self, deadline: float) -> None:
        """Read the shard's port (or its start-up error) before `deadline` (monotonic)."""
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise RunError(f"{self.describe()} did not report ready within "
                               f"{self.opts['connect_timeout']} s (transport.connect_timeout)"
                               ) from None
            if line is None:
                rc = self.proc.wait(timeout=self.opts["call_timeout"])
                raise RunError(f"{self.describe()} exited with {exit_text(rc)} during start-up "
                               f"(its stderr above says why)")
            word, _, rest = line[len(READY):].strip().partition(" ")
            if word == "ERROR":
                raise RunError(f"{self.describe()} failed to start: {json.loads(rest)}")
            if word == "READY":
                host = self.opts["host"]
                self.address = f"[{host}]:{int(rest)}" if ":" in host else f"{host}:{int(rest)}"
                return

    def dead(self) -> int | None:
        """The exit code when the process has ended, else None."""
        return self.proc.poll()

    def close(self, grace: float) -> None:
        """Make the process go: EOF on stdin (it exits), then SIGKILL after `grace` s."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit within %.1f s; killing it", self.describe(), grace)
            self.proc.kill()
            self.proc.wait(timeout=10)


def exit_text(rc: int | None) -> str:
    """'exit code 3' or 'signal SIGKILL'."""
    if rc is not None and rc < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-rc).name}"
    return f"exit code {rc}"


class Cluster:
    """The shard processes of one run, in phases: launch, connect, start, wait, stop, close.

    `GrpcTransport.run` goes through all of them; tests use the phases to reach a live shard.
    """

    def __init__(self, job: Job, opts: Mapping[str, Any]) -> None:
        self.job = job
        self.opts = dict(opts)
        self.token = opts["token"] or secrets.token_hex(16)
        self.codec = Codec.from_config(job.config.get("codec", {}))
        # Never a shard without nodes: fewer processes when the run has fewer nodes than shards.
        self.opts["shards"] = max(1, min(opts["shards"], len(job.deployment.node_ids)))
        self.placement = place(job.deployment.node_ids, self.opts["shards"], job.deployment.load)
        self.shards: list[ShardProcess] = []
        self.events: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        self.startup_s = 0.0
        self._md = call_metadata(self.token, "driver")
        self._closed = False

    # phases ------------------------------------------------------------------------------
    def launch(self) -> None:
        """Start every shard process and wait until each serves (transport.connect_timeout)."""
        t0 = time.perf_counter()
        try:
            config = json.loads(json.dumps(self.job.config, default=_plain))
        except (TypeError, ValueError) as exc:
            raise RunError(f"the run config cannot go to grpc shards as plain data: {exc}") \
                from None
        by_shard: dict[int, list[int]] = {k: [] for k in range(self.opts["shards"])}
        for node, k in sorted(self.placement.items()):
            by_shard[k].append(node)
        for k, nodes in by_shard.items():
            spec = {"shard": k, "nodes": nodes, "config": config, "seed": self.job.seed,
                    "until": self.job.until, "max_events": self.job.max_events,
                    "token": self.token, "options": self.opts}
            self.shards.append(ShardProcess(k, nodes, spec, self.opts))
        deadline = time.monotonic() + self.opts["connect_timeout"]
        for shard in self.shards:
            shard.wait_ready(deadline)
        self.startup_s = time.perf_counter() - t0

    def connect(self, via: Mapping[int, str] | None = None) -> None:
        """Tell every shard where its peers are (they connect their streams) and open the
        event stream from each. `via` maps a shard to another address its peers reach it by
        (tests put a proxy there)."""
        t0 = time.perf_counter()
        peers = {str(s.index): (via or {}).get(s.index, s.address) for s in self.shards}
        for shard in self.shards:
            shard.channel = grpc.insecure_channel(
                shard.address, options=channel_options(self.opts["chunk_bytes"]))
        for shard in self.shards:
            self.control(shard, {"op": "peers", "peers": peers},
                         timeout=self.opts["connect_timeout"])
        for shard in self.shards:
            assert shard.channel is not None
            shard.events_call = shard.channel.unary_stream(EVENTS)(
                b"", metadata=self._md,
                timeout=stream_deadline(self.job.until, self.opts["call_timeout"]))
            threading.Thread(target=self._read_events, args=(shard,),
                             name=f"grpc-events-{shard.index}", daemon=True).start()
        self.startup_s += time.perf_counter() - t0

    def control(self, shard: ShardProcess, request: dict[str, Any],
                timeout: float | None = None) -> dict[str, Any]:
        """One control call to `shard`; a failure is a RunError naming it."""
        assert shard.channel is not None
        call = shard.channel.unary_unary(CONTROL)
        try:
            reply = call(msgpack.packb(request), metadata=self._md,
                         timeout=timeout or self.opts["call_timeout"])
        except grpc.RpcError as exc:
            raise self._shard_error(shard, f"{request['op']!r} call failed: "
                                           f"{_rpc_text(exc)}") from None
        out: dict[str, Any] = msgpack.unpackb(reply, raw=False)
        if "error" in out:
            raise RunError(f"{shard.describe()}: {out['error']}")
        return out

    def _read_events(self, shard: ShardProcess) -> None:
        reasm = Reassembler()
        try:
            for data in shard.events_call:
                for meta, buf in reasm.feed(data):
                    self.events.put((shard.index, meta, self.codec.decode_body(buf)))
        except grpc.RpcError as exc:
            self.events.put((shard.index, "broken", _rpc_text(exc)))
        except CodecError as exc:
            self.events.put((shard.index, "broken", f"bad event frame: {exc}"))
        else:
            self.events.put((shard.index, "eof", None))

    def run(self) -> Outcome:
        """Start the nodes, relay metric rows until a node finishes (or every shard reports
        `until`/`max_events`), then stop all shards and report."""
        t0 = time.perf_counter()
        for shard in self.shards:
            self.control(shard, {"op": "start"})
        # Shards stop themselves at the time limit; this is in case one cannot.
        until = self.job.until
        deadline = None if until is None else time.monotonic() + until + self.opts["call_timeout"]
        result: Mapping[str, Any] | None = None
        finished_by: int | None = None
        reason = ""
        done: set[int] = set()
        while not reason:
            k, what, body = self._next_event(deadline)
            if what == "row":
                self.job.on_metric(body)
            elif what == "done":
                done.add(k)
                if body["reason"] == "finished":
                    reason = "finished"
                    result, finished_by = body.get("result"), int(body["finished_by"])
                elif body["reason"] == "max_events" or len(done) == len(self.shards):
                    # Each shard counts its own events against max_events; the first to
                    # reach it ends the run. The time limit ends every shard about together.
                    reason = body["reason"]
            elif what == "error":
                raise self._shard_error(self.shards[k], body["message"])
            else:
                raise self._shard_error(self.shards[k], f"event stream ended ({what}: {body})")
        clock_s = time.perf_counter() - t0
        stats = self.stop()
        shards = [dict(s.stats, shard=s.index, pid=s.pid) for s in self.shards]
        return Outcome(
            result=result,
            finished_by=finished_by,
            reason=reason,
            clock_s=clock_s,
            messages=sum(s.get("messages", 0) for s in stats),
            bytes=sum(s.get("bytes", 0) for s in stats),
            events=sum(s.get("events", 0) for s in stats),
            startup_s=self.startup_s,
            shards=shards,
            pids=[s.pid for s in self.shards],
        )

    def _next_event(self, deadline: float | None) -> tuple[int, str, Any]:
        """The next shard event; a shard process that died meanwhile, or shards still running
        past `deadline` (monotonic), is a RunError."""
        while True:
            try:
                return self.events.get(timeout=0.1)
            except queue.Empty:
                pass
            for shard in self.shards:
                rc = shard.dead()
                if rc is not None:
                    raise RunError(f"{shard.describe()} died with {exit_text(rc)} during the run")
            if deadline is not None and time.monotonic() > deadline:
                raise RunError(f"grpc shards did not stop at the run's time limit of "
                               f"{self.job.until} s (waited transport.call_timeout = "
                               f"{self.opts['call_timeout']} s more): a node is stuck in a "
                               f"handler")

    def _shard_error(self, shard: ShardProcess, text: str) -> RunError:
        # A peer's broken stream is usually a symptom: name a shard that died, if one did.
        deadline = time.monotonic() + 1.0
        while True:
            for other in self.shards:
                rc = other.dead()
                if rc is not None and not other.stopped:
                    return RunError(f"{other.describe()} died with {exit_text(rc)} during the "
                                    f"run (then {shard.describe()}: {text})")
            if time.monotonic() > deadline:
                return RunError(f"{shard.describe()}: {text}")
            time.sleep(0.05)

    def stop(self) -> list[dict[str, Any]]:
        """Stop every shard's nodes (on_stop runs there), collect the remaining metric rows in
        each shard's order, and return each shard's counters."""
        errors: list[str] = []
        for shard in self.shards:
            try:
                shard.stats = self.control(shard, {"op": "stop"})["stats"]
                shard.stopped = True
            except RunError as exc:
                errors.append(str(exc))
        # Rows emitted in on_stop follow on each event stream, which then ends.
        open_streams = {s.index for s in self.shards if s.stopped}
        deadline = time.monotonic() + self.opts["call_timeout"]
        while open_streams and time.monotonic() < deadline:
            try:
                k, what, body = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if what == "row":
                self.job.on_metric(body)
            elif what == "error":
                errors.append(f"{self.shards[k].describe()}: {body['message']}")
            elif what in ("eof", "broken"):
                open_streams.discard(k)
        if errors:
            raise RunError("; ".join(errors))
        return [s.stats for s in self.shards]

    def close(self) -> None:
        """End every shard process (EOF on stdin, then SIGKILL); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for shard in self.shards:
            with contextlib.suppress(OSError, ValueError):
                if shard.proc.stdin is not None:
                    shard.proc.stdin.close()
        for shard in self.shards:
            shard.close(grace=5.0 if shard.stopped else 1.0)


def _plain(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} value {obj!r} is not plain data "
                    f"(str, int, float, bool, list, table)")


def _rpc_text(exc: grpc.RpcError) -> str:
    code: Callable[[], Any] | None = getattr(exc, "code", None)
    details: Callable[[], Any] | None = getattr(exc, "details", None)
    if code is None or details is None:
        return str(exc)
    return f"{code().name}: {details()}"


class GrpcTransport(Transport):
    """Nodes on `shards` processes exchanging codec frames over gRPC streams on loopback."""

    virtual_clock = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.opts = validate_options(options)
        self.cluster: Cluster | None = None

    def run(self, job: Job) -> Outcome:
        self.close()
        self.cluster = cluster = Cluster(job, self.opts)
        try:
            cluster.launch()
            cluster.connect()
            return cluster.run()
        finally:
            # Success, error or Ctrl-C: no shard outlives the run.
            cluster.close()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
