"""A grpc shard process: rebuilds the deployment, runs its nodes on a wall-clock host, streams
frames to its peers and events to the driver.

`python -m transports.grpc_shard` reads one JSON spec line on stdin (see `transports.grpc`),
prints `FEDLOOM-GRPC-SHARD READY <port>` and serves until stdin closes: the driver closes it when
the run is over, and the OS does when the driver dies, so a shard never outlives its driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
import msgpack

from kernel import registry
from kernel.api import RunError
from kernel.host import Host
from kernel.messages import Message
from kernel.placement import Placement
from kernel.wire.codec import Codec, CodecError, body_nbytes
from transports.base import place
from transports.grpc import (
    DELIVER,
    PEER_KEY,
    READY,
    SEQ,
    BufferPool,
    Frame,
    Inbound,
    Reassembler,
    authenticate,
    call_metadata,
    channel_options,
    nbytes_of,
    pack,
    refusals,
    stream_deadline,
)

log = logging.getLogger("fedloom.grpc.shard")

MAX_BAD_LOGS = 10  # malformed frames logged per stream; the rest are only counted


class FrameQueue:
    """A FIFO of frames bounded in bytes: `put` blocks while it is full (up to a timeout), so a
    slow reader slows its writers instead of growing memory."""

    def __init__(self, max_bytes: int, name: str) -> None:
        self.max_bytes = max_bytes
        self.name = name
        self._items: deque[Frame] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self._drain = False
        self.failed: str | None = None
        self.epoch = 0

    def put(self, frame: Frame, timeout: float) -> None:
        """Queue `frame`; RunError when the queue stays full for `timeout` s or has failed."""
        n = frame[2]
        with self._cond:
            if self._bytes + n > self.max_bytes and self._items:
                deadline = time.monotonic() + timeout
                while self._bytes + n > self.max_bytes and self._items and not self.failed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RunError(f"{self.name} has been full ({self._bytes} bytes queued) "
                                       f"for {timeout} s (transport.call_timeout): its reader "
                                       f"is stuck or gone")
                    self._cond.wait(left)
            if self.failed:
                raise RunError(self.failed)
            if self._closed:
                return
            self._items.append(frame)
            self._bytes += n
            self._cond.notify_all()

    def take(self, wait: float, linger: float, fill: int,
             epoch: int | None = None) -> list[Frame] | None:
        """Everything queued, waiting up to `wait` s for a first frame and then up to `linger`
        s for `fill` bytes; [] when nothing came, None once closed (and drained) or when
        `epoch` is given and is no longer the queue's (its reader's stream was replaced)."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(wait)
            if linger > 0 and self._items and not self._closed:
                end = time.monotonic() + linger
                while self._bytes < fill and not self._closed:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._closed and not (self._drain and self._items):
                return None
            if epoch is not None and epoch != self.epoch:
                return None
            items = list(self._items)
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
            return items

    def new_epoch(self) -> int:
        """Retire the current reader (its `take` returns None from now on); the new epoch."""
        with self._cond:
            self.epoch += 1
            self._cond.notify_all()
            return self.epoch

    def fail(self, text: str) -> None:
        """Make every later (and waiting) `put` raise RunError(text)."""
        with self._cond:
            self.failed = text
            self._cond.notify_all()

    def close(self, drain: bool) -> None:
        """No more frames; with `drain`, the reader still gets what is queued."""
        with self._cond:
            self._closed, self._drain = True, drain
            self._cond.notify_all()



class PeerLink:
    """The one long-lived stream from this shard to one peer shard, reconnected with
    exponential backoff up to `max_reconnects` times in a row without progress.

    Every message gets the next sequence number and stays in `_unacked` until the peer
    acknowledges it; a new stream first sends again what is there (the peer drops what it had),
    so a broken stream loses nothing. At most `queue_bytes` wait unacknowledged."""

    def __init__(self, index: int, peer: int, address: str, token: str,
                 opts: Mapping[str, Any], until: float | None,
                 on_error: Callable[[str], None]) -> None:
        self.index = index
        self.peer = peer
        self.address = address
        self.token = token
        self.opts = opts
        self.until = until
        self.on_error = on_error
        self.chunk = int(opts["chunk_bytes"])
        self.tick = float(opts["tick"])
        self.channel = grpc.insecure_channel(address, options=channel_options(self.chunk))
        self.queue = FrameQueue(int(opts["queue_bytes"]),
                                f"grpc shard {index}'s stream to shard {peer} ({address})")
        self.closing = False
        self.stats = {"frames_out": 0, "wire_bytes_out": 0, "reconnects": 0, "resent_out": 0}
        self._unacked: deque[bytes] = deque()  # messages acked + 1, acked + 2, ...
        self._unacked_bytes = 0
        self._acked = 0
        self._next = 1  # the sequence number of the next new message
        self._cond = threading.Condition()
        # One stream's request iterator at a time takes from the queue and numbers what it
        # took, so an old stream's iterator that is still running cannot reorder frames.
        self._taking = threading.Lock()
        self._backoff = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"grpc-link-{peer}", daemon=True)

    def connect(self, timeout: float) -> None:
        """Wait until the channel is up (the peer is serving), then start streaming."""
        deadline = time.monotonic() + timeout
        while True:
            # A fresh future in short slices: each asks the channel to connect again, as one
            # whose handshake broke can otherwise sit idle and never become ready.
            try:
                grpc.channel_ready_future(self.channel).result(
                    timeout=min(0.5, max(deadline - time.monotonic(), 0.0)))
                break
            except grpc.FutureTimeoutError:
                if time.monotonic() >= deadline:
                    raise RunError(f"could not connect to shard {self.peer} at {self.address} "
                                   f"within {timeout} s (transport.connect_timeout)") from None
        self._thread.start()

    def _requests(self, epoch: int) -> Iterator[bytes]:
        queue, cond, stats = self.queue, self._cond, self.stats
        with cond:
            nxt, fresh = self._acked + 1, self._next  # below `fresh`: sent on an older stream
        while True:
            with cond:
                if queue.epoch != epoch or self.closing:
                    return
                nxt = max(nxt, self._acked + 1)
                data = self._unacked[nxt - self._acked - 1] if nxt < self._next else None
                full = self._unacked_bytes >= queue.max_bytes
                if data is None and full:
                    # Wait for acks before taking more: the queue fills and blocks the nodes.
                    cond.wait(0.25)
                    continue
            if data is None:
                if not self._take(epoch):
                    return
                continue
            if nxt < fresh:
                stats["resent_out"] += 1
            nxt += 1
            stats["frames_out"] += 1
            stats["wire_bytes_out"] += len(data)
            yield data

    def _take(self, epoch: int) -> bool:
        """Number and keep the messages of newly queued frames (perhaps none); False once this
        stream is over."""
        with self._taking:
            frames = self.queue.take(0.25, self.tick, self.chunk, epoch)
            if frames is None:
                return False
            with self._cond:
                for data in pack(frames, self.chunk):
                    self._unacked.append(SEQ.pack(self._next) + data)
                    self._unacked_bytes += len(data)
                    self._next += 1
            return True

    def _ack(self, seq: int) -> None:
        with self._cond:
            while self._acked < seq and self._unacked:
                self._unacked_bytes -= len(self._unacked.popleft()) - SEQ.size
                self._acked += 1
            self._cond.notify_all()

    def _run(self) -> None:
        opts = self.opts
        md = call_metadata(self.token, f"shard {self.index}")
        timeout = stream_deadline(self.until, opts["call_timeout"])
        stream = self.channel.stream_stream(DELIVER)
        failures = 0
        epoch = self.queue.epoch
        while not self.closing:
            acked = self._acked
            try:
                for reply in stream(self._requests(epoch), metadata=md, timeout=timeout):
                    self._ack(SEQ.unpack(reply)[0])
                return
            except grpc.RpcError as exc:
                if self.closing:
                    return
                # The old stream's reader may still be waiting in take(): retire it, so frames
                # go out, in order, on the next stream only.
                epoch = self.queue.new_epoch()
                code = exc.code() if hasattr(exc, "code") else None
                failures = 1 if self._acked > acked else failures + 1
                text = (f"grpc shard {self.index}: stream to shard {self.peer} at "
                        f"{self.address} failed: {code.name if code else exc}")
                if code == grpc.StatusCode.UNAUTHENTICATED or failures > opts["max_reconnects"]:
                    text += f" (gave up after {failures - 1} reconnects in a row)"
                    self.queue.fail(text)
                    self.on_error(text)
                    return
                delay = min(0.05 * 2 ** (failures - 1), 2.0)
                log.warning("%s; reconnecting in %.2f s (attempt %d of %d; %d unacknowledged "
                            "messages go again)", text, delay, failures, opts["max_reconnects"],
                            len(self._unacked))
                self.stats["reconnects"] += 1
                self._backoff.wait(delay)

    def close(self, timeout: float) -> None:
        """Drop what is queued, end the stream and the channel."""
        self.closing = True
        self.queue.close(drain=False)
        self._backoff.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.channel.close()


class Shard:
    """One shard: its nodes' host, its server (Deliver, Events, Control) and its peer links."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.index = int(spec["shard"])
        self.local = [int(n) for n in spec["nodes"]]
        self.config: dict[str, Any] = spec["config"]
        self.opts: dict[str, Any] = spec["options"]
        self.token: str = spec["token"]
        self.seed = int(spec["seed"])
        self.until: float | None = spec.get("until")
        self.max_events: int | None = spec.get("max_events")
        self.codec = Codec.from_config(self.config.get("codec", {}))
        build = registry.load("protocols", self.config["protocol"]["name"])
        self.deployment = build(self.config)
        if self.deployment.prepare is not None:
            self.deployment.prepare()
        self.placement = place(self.deployment.node_ids, int(self.opts["shards"]))
        self.local_set = frozenset(self.local)
        self.links: dict[int, PeerLink] = {}
        self.events = FrameQueue(int(self.opts["queue_bytes"]),
                                 f"grpc shard {self.index}'s event stream to the driver")
        self.host: Host | None = None
        self.pool = BufferPool(int(self.opts["pool_bytes"]))
        self.stopped = False
        self.stats = {"bad_frames": 0, "refused": 0}
        self._stream_stats: list[dict[str, int]] = []
        self._inbound: dict[str, Inbound] = {}
        self._early: list[tuple[Message, list[int]]] = []
        self._lock = threading.Lock()
        self._events_open = False
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._error_sent = False
        self.server: grpc.Server | None = None

    # -- serving ---------------------------------------------------------------------------
    def serve(self) -> int:
        """Start the gRPC server on transport.host, port chosen by the OS; return the port."""
        workers = int(self.opts["shards"]) + 8  # one per peer stream, the event stream, control
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                        thread_name_prefix="grpc-serve"),
                             options=channel_options(int(self.opts["chunk_bytes"])))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            DELIVER.split("/")[1], {
                "Deliver": grpc.stream_stream_rpc_method_handler(self._deliver),
                "Events": grpc.unary_stream_rpc_method_handler(self._events),
                "Control": grpc.unary_unary_rpc_method_handler(self._control),
            })])
        host = self.opts["host"]
        port = server.add_insecure_port(f"[{host}]:0" if ":" in host else f"{host}:0")
        if not port:
            raise RunError(f"could not bind a port on {self.opts['host']!r} (transport.host)")
        server.start()
        self.server = server
        return port

    def _auth(self, context: grpc.ServicerContext) -> str:
        try:
            return authenticate(context, self.token)
        except Exception:
            with self._lock:
                self.stats["refused"] += 1
            raise

    def _deliver(self, requests: Iterator[bytes],
                 context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = self._auth(context)
        # One sequence and one Reassembler per sender, across its streams.
        sender = next((v for k, v in context.invocation_metadata() if k == PEER_KEY), "?")
        with self._lock:
            inbound = self._inbound.get(sender)
            if inbound is None:
                inbound = self._inbound[sender] = Inbound(
                    Reassembler(self.codec.max_message_bytes, self.pool))
        reasm = inbound.reasm
        # This stream's own counters (one thread each), summed when the shard reports.
        stats = {"frames_in": 0, "wire_bytes_in": 0, "duplicates_in": 0}
        with self._lock:
            self._stream_stats.append(stats)
        bad = 0
        for data in requests:
            stats["frames_in"] += 1
            stats["wire_bytes_in"] += len(data)
            with inbound.lock:
                try:
                    body = inbound.open(data)
                except CodecError as exc:
                    # The sender starts a new stream and sends again from its last ack.
                    self._bad(peer, exc, bad)
                    context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
                if body is None:
                    stats["duplicates_in"] += 1
                else:
                    at = reasm.offset
                    try:
                        frames = reasm.feed(body)
                    except CodecError as exc:
                        frames, bad = [], self._bad(peer, exc, bad)
                    for meta, buf in frames:
                        try:
                            self._accept(meta, buf)
                        except CodecError as exc:
                            bad = self._bad(peer, f"frame in the message at stream byte offset "
                                                  f"{at}: {exc}", bad)
                ack = SEQ.pack(inbound.last)
            yield ack

    def _bad(self, peer: str, what: object, seen: int) -> int:
        # A malformed frame costs the frame, never the shard.
        with self._lock:
            self.stats["bad_frames"] += 1
        if seen < MAX_BAD_LOGS:
            log.warning("malformed frame from %s dropped: %s", peer, what)
        return seen + 1

    def _accept(self, meta: Any, buf: Any) -> None:
        if (not isinstance(meta, list) or not meta
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in meta)):
            raise CodecError(f"destination list {meta!r:.80} is not a non-empty list of node ids")
        strangers = [d for d in meta if d not in self.local_set]
        if strangers:
            raise CodecError(f"destinations {strangers[:8]} are not nodes of this shard")
        msg = self.codec.decode(buf)
        if not isinstance(msg, Message):
            raise CodecError(f"frame decoded to {type(msg).__name__}, not a message")
        with self._lock:
            host = self.host
            if host is None:
                self._early.append((msg, meta))
                return
        host.deliver(msg, meta, threadsafe=True)

    def _events(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._auth(context)
        with self._lock:
            if self._events_open:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the event stream is open")
            self._events_open = True
        chunk = int(self.opts["chunk_bytes"])
        while True:
            frames = self.events.take(0.25, 0.0, chunk)
            if frames is None:
                return
            yield from pack(frames, chunk)

    def _control(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        peer = self._auth(context)
        try:
            req = msgpack.unpackb(request, raw=False)
            op = req.get("op") if isinstance(req, dict) else None
            if op == "peers":
                reply = self._peers(req["peers"])
            elif op == "start":
                reply = self._start()
            elif op == "stop":
                reply = self._stop_run()
            elif op == "ping":
                reply = {"shard": self.index, "pid": os.getpid()}
            else:
                reply = {"error": f"unknown control request {req!r:.100}; expected op peers, "
                                  f"start, stop or ping"}
        except Exception as exc:
            # Malformed (e.g. peers that are not a table): one line, the caller gets the error.
            log.warning("control request from %s failed: %s: %.300s", peer, type(exc).__name__,
                        exc)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        return msgpack.packb(reply)

    # -- control operations ----------------------------------------------------------------
    def _peers(self, peers: Mapping[str, str]) -> dict[str, Any]:
        for key, address in sorted(peers.items(), key=lambda kv: int(kv[0])):
            k = int(key)
            if k != self.index and k not in self.links:
                self.links[k] = PeerLink(self.index, k, address, self.token, self.opts,
                                         self.until, self.report_error)
        deadline = time.monotonic() + float(self.opts["connect_timeout"])
        for link in self.links.values():
            link.connect(max(deadline - time.monotonic(), 0.01))
        return {}

    def _start(self) -> dict[str, Any]:
        # Lossy stages must reach every message, or this run would differ from inproc.
        if self.opts["strict"] or self.codec.lossy:
            strict, sizer = self.codec, None
        else:
            strict, sizer = None, body_nbytes
        host = Host(self.deployment, self.local, seed=self.seed, wall=True, outbox=self,
                    on_metric=self._on_metric, strict=strict, sizer=sizer,
                    placement=Placement(int(self.opts["shards"]), self.placement))
        with self._lock:
            for msg, dsts in self._early:
                host.deliver(msg, dsts, threadsafe=True)
            self._early.clear()
            self.host = host
        self._loop_thread = threading.Thread(target=self._loop, name="grpc-host", daemon=True)
        self._loop_thread.start()
        return {}

    def _stop_run(self) -> dict[str, Any]:
        self._stop.set()
        if self.host is not None:
            self.host.interrupt()
        if self._loop_thread is not None:
            self._loop_thread.join(float(self.opts["call_timeout"]))
            if self._loop_thread.is_alive():
                return {"error": f"the host loop did not stop within "
                                 f"{self.opts['call_timeout']} s (transport.call_timeout)"}
        for link in self.links.values():
            link.close(float(self.opts["call_timeout"]))
        stats: dict[str, Any] = dict(self.host.stats) if self.host is not None else {}
        with self._lock:
            stats.update(self.stats, nodes=len(self.local), frames_in=0, wire_bytes_in=0,
                         frames_out=0, wire_bytes_out=0, reconnects=0,
                         resent_out=0, duplicates_in=0,
                         buffers_reused=self.pool.reused)
            for counters in [*self._stream_stats, *(link.stats for link in self.links.values())]:
                for key, value in counters.items():
                    stats[key] += value
        self.stopped = True
        self.events.close(drain=True)
        return {"stats": stats}

    # -- the host loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        host = self.host
        assert host is not None
        try:
            host.start()
            reason = self._run(host)
            if reason == "finished":
                self._event("done", {"reason": reason, "finished_by": host.finished_by,
                                     "result": dict(host.result or {})})
            elif reason is not None:
                self._event("done", {"reason": reason})
        except Exception as exc:
            self.report_error(_describe(exc))
        while not self._stop.wait(1.0):
            pass
        try:
            host.stop()  # raises only errors that run() has not raised already
        except Exception as exc:
            self.report_error(_describe(exc))

    def _run(self, host: Host) -> str | None:
        """Run until the run ends (its reason) or the driver stops this shard (None)."""
        reason = host.run(until=self.until, max_events=self.max_events)
        return None if reason == "paused" else reason

    def _on_metric(self, row: dict[str, Any]) -> None:
        # Encoded now: a protocol may go on mutating an array it emitted.
        self._event("row", row)

    def _event(self, kind: str, body: Mapping[str, Any]) -> None:
        parts = self.codec.encode_body(dict(body))
        self.events.put((kind, parts, nbytes_of(parts)), float(self.opts["call_timeout"]))

    def report_error(self, text: str) -> None:
        """Tell the driver this shard cannot go on."""
        log.error("%s", text)
        if self._error_sent:
            return
        self._error_sent = True
        try:
            self._event("error", {"message": text})
        except Exception:
            log.exception("could not report the error to the driver")

    # -- Outbox: messages for nodes on other shards -----------------------------------------
    def post(self, msg: Message, dsts: Sequence[int]) -> None:
        """Encode `msg` once and queue it for each shard that runs some of `dsts`."""
        parts = self.codec.encode(msg)
        n = nbytes_of(parts)
        by_shard: dict[int, list[int]] = {}
        placement = self.placement
        for dst in dsts:
            by_shard.setdefault(placement[dst], []).append(dst)
        timeout = float(self.opts["call_timeout"])
        for k, group in by_shard.items():
            self.links[k].queue.put((group, parts, n), timeout)

    def shutdown(self) -> None:
        """Stop serving (the driver has closed our stdin)."""
        for link in self.links.values():
            link.close(1.0)
        if self.server is not None:
            self.server.stop(grace=0.5).wait(2.0)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RunError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}"


def main() -> int:
    """Read the spec, serve, and exit when stdin closes."""
    # Ctrl-C belongs to the driver, which stops the shards itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    line = sys.stdin.readline()
    if not line:
        return 1
    index = "?"
    try:
        spec = json.loads(line)
        index = str(spec.get("shard", "?"))
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format=f"[grpc shard {index}] %(levelname)s %(message)s")
        shard = Shard(spec)
        port = shard.serve()
    except Exception as exc:
        traceback.print_exc()
        print(f"{READY} ERROR {json.dumps(f'{type(exc).__name__}: {exc}')}", flush=True)
        return 1
    print(f"{READY} READY {port}", flush=True)
    for _ in sys.stdin:  # nothing more is sent; EOF means the driver is done or gone
        pass
    if shard.stopped:
        with contextlib.suppress(Exception):
            shard.shutdown()
    else:
        # The driver died or gave up on the run: nobody is listening, so go at once.
        log.warning("the driver went away before stopping this shard; exiting")
    refusals.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gRPC's threads must not keep a finished shard alive.
    os._exit(0 if shard.stopped else 1)


if __name__ == "__main__":
    sys.exit(main())
