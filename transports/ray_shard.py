"""One shard of a Ray run: a Ray actor running a wall-clock Host for a slice of the nodes.

Messages leave the shard as codec frames, batched per destination shard (`ShardOutbox` says when
a batch goes) and sent by a sender thread with one actor call per batch. A batch's frames for one
destination travel as one contiguous uint8 argument (above `inline_threshold` bytes Ray stores
it once and the receiver reads it zero-copy from the object store). A frame above
`inline_threshold` bytes bound for several shards is `ray.put` once and only its ObjectRef
travels, to every shard that needs it. Only bytes, numpy arrays, ints and actor handles cross Ray.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import ray

from kernel.api import RunError
from kernel.host import Host
from kernel.loop import CALL
from kernel.messages import Message
from kernel.placement import Placement
from kernel.registry import load
from kernel.wire.codec import Codec, body_nbytes, join
from transports import shardtrace
from transports.base import place

ALIGN = 64
# A destination's batch holding this many bytes of frames is sent at once, not at the tick.
FLUSH_BYTES = 16 << 20
# A reply batch this old goes at the next send, even while the shard still has events due: the
# receiver (a server summing replies) works on them while this shard goes on training. Each call
# costs the sender CPU (W2: ~8 ms for 8 replies of 0.8 MB), and the last batch of a round delays
# the receiver by its size: ~50 ms balances the two (~8 calls per round of 62 replies, 5 ms apart).
COALESCE_S = 0.05
# Shard states as reported to the driver; the loop's own stop reasons come from Scheduler.run.
STARTING, RUNNING, STOPPED, ERROR = "starting", "running", "stopped", "error"
ENDED = frozenset({"finished", "until", "max_events", STOPPED, ERROR})


def encode_plain(codec: Codec, obj: Mapping[str, Any]) -> bytes:
    """A plain dict as one codec frame (configs, metric rows, results, stats)."""
    return bytes(join(codec.encode_body(dict(obj))))


def _encodable(codec: Codec, row: Mapping[str, Any]) -> bool:
    try:
        codec.encode_body(dict(row))
        return True
    except Exception:
        return False


class ShardOutbox:
    """Batches this shard's outgoing frames per destination shard and hands each batch to a
    sender thread, which makes the actor call.

    When a batch goes (with `tick = 0`, the default): a multicast (a server's "train") at once,
    before the events already due, so remote nodes never wait while this shard's own nodes
    train; a single send (a reply) joins its destination's batch, which goes when it is
    `COALESCE_S` old at the next send, at the end of the events due at this look at the clock,
    or at `FLUSH_BYTES`. So a shard training many clients streams their replies in a few calls
    per round instead of one per reply or one at the very end (which
    left the receiver's work on them all to the end of the round). The sender thread copies
    the batch into one contiguous argument and calls Ray, so the loop goes on running nodes
    meanwhile (Ray's copy into its object store and its IPC take 5-90 ms of wall time per 16 MB
    on a busy machine, most of it without the GIL). One thread sends, in order, so each
    destination gets its batches in sequence."""

    def __init__(self, shard: ShardCore) -> None:
        self.shard = shard
        # dst shard -> entries (dsts, frame parts to copy into the batch, or a multicast ObjectRef)
        self.pending: dict[int, list[tuple[list[int], Any]]] = {}
        self.pending_bytes: dict[int, int] = {}
        self.pending_since: dict[int, float] = {}
        self.scheduled = False
        self.closed = False
        self._scratch = np.empty(0, np.uint8)  # the loop thread's (multicast frames to ray.put)
        self._send_scratch = np.empty(0, np.uint8)  # the sender thread's (batches)
        # Batches handed to the sender: (peer, dst incarnation, seq, index, entries, refs, total).
        self._queue: deque[tuple[Any, ...]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def post(self, msg: Message, dsts: Sequence[int]) -> None:
        sh = self.shard
        if self.closed:
            return
        groups: dict[int, list[int]] = {}
        where = sh.placement
        for d in dsts:
            s = where.get(d)
            if s is None:
                raise RunError(
                    f"node {msg.src} sent {msg.kind!r} to unknown node {d}; this run's nodes "
                    f"are 0..{len(where) - 1}"
                )
            groups.setdefault(s, []).append(d)
        parts = sh.codec.encode(msg)
        n = sum(memoryview(p).nbytes for p in parts)
        item: Any
        if n > sh.inline_threshold and len(groups) > 1:
            # Encoded once, stored once, read by every destination shard from the object store.
            item = ray.put(self._frame_array(parts, n))
            sh.stats["puts"] += 1
        else:
            # Copied into the destination's batch by the sender thread; the parts are views of
            # the body, which nobody mutates after sending (local deliveries share it too).
            item = (parts, n)
        now = time.monotonic()
        for s, ds in groups.items():
            batch = self.pending.get(s)
            if batch is None:
                batch = self.pending[s] = []
                self.pending_since[s] = now
            batch.append((ds, item))
            self.pending_bytes[s] = self.pending_bytes.get(s, 0) + n
            if self.pending_bytes[s] >= FLUSH_BYTES or (sh.tick <= 0 and (
                    len(dsts) > 1 or now - self.pending_since[s] >= COALESCE_S)):
                # Bulk, a multicast (a server's "train" to its clients: remote nodes must not
                # wait while the sender finishes its handler, evaluating say, and this shard's
                # own nodes train), or replies that have waited long enough: the destination
                # should not wait for whatever else this shard has to do in this tick.
                self._send(s)
        sh.stats["wire_bytes"] += n * len(groups)
        if self.pending and not self.scheduled:
            self.scheduled = True
            host = sh.host
            if sh.tick > 0:
                host.sched.push(host.sched.now + sh.tick, CALL, -1, self.flush)
            elif len(dsts) > 1:
                # A multicast (a server's "train" to its clients) goes next, before the events
                # already due: remote nodes must not wait while this shard's own nodes train.
                host.sched.push_front(CALL, -1, self.flush)
            else:
                # One reply: after the events already due, so the replies of one look at the
                # clock share one call per destination shard (unless COALESCE_S passes first).
                host.call_soon_threadsafe(self.flush)

    @staticmethod
    def _grow(buf: np.ndarray, n: int) -> np.ndarray:
        # Ray copies the batch (into the object store, or inlined) inside `.remote()`, and
        # ray.put copies too, so one reused buffer per thread serves every batch (copying into
        # reused memory is ~5x faster than into fresh pages).
        return buf if buf.nbytes >= n else np.empty(max(n, 2 * buf.nbytes), np.uint8)

    def _frame_array(self, parts: list[Any], n: int) -> np.ndarray:
        buf = self._scratch = self._grow(self._scratch, n)
        off = 0
        for p in parts:
            a = np.frombuffer(p, np.uint8)
            buf[off : off + a.nbytes] = a
            off += a.nbytes
        return buf[:n]

    def flush(self) -> None:
        """Hand every destination's batch to the sender: one actor call per destination."""
        self.scheduled = False
        if self.closed:
            self.pending.clear()
            return
        for s in sorted(self.pending):
            self._send(s)

    def _send(self, s: int) -> None:
        """Number destination `s`'s batch and queue it for the sender thread (loop thread)."""
        sh = self.shard
        entries = self.pending.pop(s)
        self.pending_bytes.pop(s, None)
        self.pending_since.pop(s, None)
        index: list[list[Any]] = []
        refs: list[Any] = []
        total = 0
        for ds, item in entries:
            if isinstance(item, tuple):
                n = item[1]
                index.append([ds, n])
                # Frames start 64-aligned in the batch, as the codec aligns tensors.
                total += n + (-n % ALIGN)
            else:
                refs.append(item)
                index.append([ds, -len(refs)])
        seq = sh.out_seq.get(s, 0)
        sh.out_seq[s] = seq + 1
        # The peer and its incarnation as of now, with the sequence number they go with.
        job = (s, sh.peers[s], sh.peer_inc[s], seq, msgpack.packb(index), entries, refs, total)
        with self._cond:
            self._queue.append(job)
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._sender, daemon=True,
                                            name=f"ray-send-{sh.shard_id}")
            self._thread.start()

    def _sender(self) -> None:
        sh = self.shard
        while True:
            with self._cond:
                while not self._queue and not self.closed:
                    self._cond.wait()
                if self.closed:
                    self._queue.clear()
                    return
                job = self._queue.popleft()
            try:
                self._call(*job)
            except Exception as exc:
                sh.interrupt(f"ray shard {sh.shard_id} could not send a batch to shard {job[0]}: "
                             f"{type(exc).__name__}: {exc}")
                return

    def _call(self, s: int, peer: Any, peer_inc: int, seq: int, index: bytes,
              entries: list[tuple[list[int], Any]], refs: list[Any], total: int) -> None:
        sh = self.shard
        trace = sh.trace
        if trace is not None:
            w0, c0 = time.time(), time.thread_time()
        buf = self._send_scratch = self._grow(self._send_scratch, total)
        blob: Any
        if total <= sh.inline_threshold:
            blob = bytes(self._fill(entries, buf[:total]))
        else:
            # One contiguous argument: Ray stores it once and the receiver reads it zero-copy.
            blob = self._fill(entries, buf[:total])
            sh.stats["stored_batches"] += 1
        # Fire and forget: a dead destination is the driver's to notice and report.
        peer.deliver.remote(sh.shard_id, sh.incarnation, peer_inc, seq, index, blob, *refs)
        sh.stats["batches"] += 1
        if trace is not None:
            trace.sent(w0, c0, len(entries), total)

    def close(self, timeout_s: float) -> None:
        """Send nothing more; the sender thread drops what is queued and ends."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @staticmethod
    def _fill(entries: list[tuple[list[int], Any]], buf: np.ndarray) -> np.ndarray:
        off = 0
        for _, item in entries:
            if isinstance(item, tuple):
                parts, n = item
                for p in parts:
                    a = np.frombuffer(p, np.uint8)
                    buf[off : off + a.nbytes] = a
                    off += a.nbytes
                pad = -n % ALIGN
                if pad:
                    buf[off : off + pad] = 0
                    off += pad
        return buf


class ShardCore:
    """The shard's state and logic, apart from Ray's actor machinery (see `Shard`)."""

    def __init__(self, shard_id: int, n_shards: int, config_frame: bytes, settings: bytes) -> None:
        t0 = time.monotonic()
        self.shard_id = shard_id
        self.n_shards = n_shards
        self.incarnation = int.from_bytes(os.urandom(7), "little")
        s = msgpack.unpackb(settings)
        self.inline_threshold: int = s["inline_threshold"]
        self.tick: float = s["tick"]
        self.until: float | None = s["until"]
        self.max_events: int | None = s["max_events"]
        threads = int(s["threads"])
        # Before the protocol imports torch (OpenMP reads it once); a runtime_env would cost a
        # fresh worker process (~2 s) instead of one of Ray's prestarted ones.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        config = Codec.from_config({}).decode_body(config_frame)
        self.codec = Codec.from_config(config.get("codec", {}))
        dep = load("protocols", config["protocol"]["name"])(config)
        if dep.prepare is not None:
            dep.prepare()
        self.placement = place(dep.node_ids, n_shards, dep.load)
        self.local = [n for n, sh in sorted(self.placement.items()) if sh == shard_id]
        self.stats = {"wire_bytes": 0, "batches": 0, "stored_batches": 0, "puts": 0,
                      "received_batches": 0, "stale_batches": 0}
        self.rows: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.state = STARTING
        self.error: str | None = None
        self.result_frame: np.ndarray | None = None
        self.outbox = ShardOutbox(self)
        # Lossy codec stages must reach messages between nodes of this shard too.
        lossy = self.codec.lossy
        self.host = Host(dep, self.local, seed=int(config["run"]["seed"]), wall=True,
                         outbox=self.outbox, on_metric=self._on_metric,
                         strict=self.codec if lossy else None,
                         sizer=None if lossy else body_nbytes,
                         placement=Placement(n_shards, self.placement))
        self.peers: list[Any] = []
        self.peer_inc: list[int] = []
        self.out_seq: dict[int, int] = {}
        # Batches that arrived ahead of their turn: (src shard, src incarnation) -> seq -> args.
        self.in_seq: dict[tuple[int, int], int] = {}
        self.held: dict[tuple[int, int], dict[int, tuple[Any, ...]]] = {}
        self.rx_lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.busy_s = 0.0
        self.loop_s = 0.0
        # The same thread count the learners set from workload.torch_threads, applied here too
        # for protocols that use torch without them: shards must not oversubscribe the cores.
        torch = sys.modules.get("torch")
        if torch is not None and threads > 0:
            torch.set_num_threads(threads)
        self.trace = shardtrace.start("ray", shard_id)
        self.build_s = time.monotonic() - t0

    # -- metrics and state, read by the driver's long poll ------------------------------------
    def _on_metric(self, row: dict[str, Any]) -> None:
        with self.cond:
            self.rows.append(row)
            self.cond.notify_all()

    def _set_state(self, state: str, error: str | None = None) -> None:
        with self.cond:
            if self.state in ENDED:
                return
            self.state = state
            if error is not None and self.error is None:
                self.error = error
            self.cond.notify_all()

    def poll(self, wait_s: float) -> list[Any]:
        """Rows since the last poll and the state; waits up to `wait_s` for something new."""
        with self.cond:
            if not self.rows and self.state not in ENDED:
                self.cond.wait(wait_s)
            rows, self.rows = self.rows, []
            state, error = self.state, self.error
            result = self.result_frame if state == "finished" else None
        head = {"state": state, "error": error, "rows": rows,
                "finished_by": self.host.finished_by}
        try:
            return [encode_plain(self.codec, head), result]
        except Exception as exc:
            bad = next((r for r in rows if not _encodable(self.codec, r)), None)
            why = f"metric row {bad!r} cannot be encoded" if bad is not None else "poll failed"
            self.interrupt(f"{why}: {type(exc).__name__}: {exc}")
            head = {"state": ERROR, "error": self.error, "rows": [], "finished_by": None}
            return [encode_plain(self.codec, head), None]

    # -- lifecycle --------------------------------------------------------------------------
    def ready(self) -> list[Any]:
        return [self.incarnation, ray.util.get_node_ip_address(), os.getpid(), self.local,
                self.build_s]

    def connect(self, peers: list[Any], incarnations: list[int]) -> None:
        """Learn every shard's handle and incarnation (again after a shard restarts)."""
        def apply() -> None:
            for s, inc in enumerate(incarnations):
                if s < len(self.peer_inc) and self.peer_inc[s] != inc:
                    self.out_seq[s] = 0  # a new incarnation numbers batches from 0
            self.peers = list(peers)
            self.peer_inc = list(incarnations)

        if self.thread is None:
            apply()
        else:
            self.host.call_soon_threadsafe(apply)

    def start(self) -> None:
        """Create the local nodes (on_start); their first sends wait for the loop's first flush."""
        self.host.start()
        if self.host.error is not None:
            self._set_state(ERROR, str(self.host.error))
        elif self.host.result is not None:
            self._finish("finished")

    def go(self) -> None:
        """Run the event loop on its own thread."""
        if self.thread is None and self.state == STARTING:
            self.state = RUNNING
            self.thread = threading.Thread(target=self._loop, name=f"shard-{self.shard_id}",
                                           daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        c0, w0 = time.thread_time(), time.monotonic()
        if self.trace is not None:
            self.trace.install(self.host)
        try:
            reason = self.host.run(until=self.until, max_events=self.max_events)
            if reason == "paused":  # the driver asked to stop (`interrupt`)
                reason = STOPPED
        except Exception as exc:
            reason = ERROR
            self._set_state(ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self.busy_s = time.thread_time() - c0
            self.loop_s = time.monotonic() - w0
            if self.trace is not None:
                self.trace.loop_ended()
        if reason != ERROR:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        if reason == "finished" and self.host.result is not None:
            try:
                frame = join(self.codec.encode_body(dict(self.host.result)))
                self.result_frame = np.frombuffer(frame, np.uint8)
            except Exception as exc:
                self._set_state(ERROR, f"result of node {self.host.finished_by} cannot be "
                                       f"encoded: {type(exc).__name__}: {exc}")
                return
        self._set_state(reason)

    def interrupt(self, why: str | None = None) -> None:
        """Make the loop return (from any thread); `why` marks it as this shard's error."""
        if why is not None:
            self._set_state(ERROR, why)
        self.host.interrupt()

    def stop(self, timeout_s: float) -> bytes:
        """End the loop, call every node's on_stop, and report rows left and statistics."""
        self.outbox.close(timeout_s)
        if self.thread is not None:
            self.interrupt()
            self.thread.join(timeout_s)
        late = None
        if self.thread is not None and self.thread.is_alive():
            late = f"its event loop did not stop within {timeout_s:g} s"
        else:
            try:
                self.host.stop()
            except Exception as exc:
                if self.error is None:
                    self.error = f"{type(exc).__name__}: {exc}"
        with self.cond:
            rows, self.rows = self.rows, []
        st = self.host.stats
        stats = {"shard": self.shard_id, "nodes": len(self.local),
                 "node_ip": ray.util.get_node_ip_address(),
                 "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                 "messages": st["messages"], "bytes": st["bytes"], "events": st["events"],
                 "dropped": st["dropped"], "queue": len(self.host.sched),
                 "busy_s": self.busy_s, "loop_s": self.loop_s, "build_s": self.build_s,
                 **self.stats}
        shardtrace.finish(self.trace)
        return encode_plain(self.codec, {"rows": rows, "stats": stats, "error": self.error,
                                         "late": late})

    # -- receiving ----------------------------------------------------------------------------
    def deliver(self, src: int, src_inc: int, dst_inc: int, seq: int, index: bytes,
                blob: bytes | np.ndarray, *frames: np.ndarray) -> None:
        """Take one batch from shard `src`; batches run in the order their sender sent them."""
        if dst_inc != self.incarnation:
            self.stats["stale_batches"] += 1  # meant for this shard's previous incarnation
            return
        key = (src, src_inc)
        with self.rx_lock:
            if seq != self.in_seq.get(key, 0):
                self.held.setdefault(key, {})[seq] = (src, index, blob, frames)
                return
            batch: tuple[Any, ...] | None = (src, index, blob, frames)
            while batch is not None:
                self._unpack(*batch)
                seq += 1
                batch = self.held.get(key, {}).pop(seq, None)
            self.in_seq[key] = seq

    def _unpack(self, src: int, index: bytes, blob: bytes | np.ndarray,
                frames: tuple[np.ndarray, ...]) -> None:
        self.stats["received_batches"] += 1
        trace = self.trace
        if trace is not None:
            w0, c0 = time.time(), time.thread_time()
        try:
            entries = msgpack.unpackb(index)
            # Bytes when small; a read-only view into the object store when large.
            view = memoryview(blob if isinstance(blob, bytes) else blob.data)
            off = 0
            host, decode = self.host, self.codec.decode
            for dsts, n in entries:
                if n >= 0:
                    frame: Any = view[off : off + n]
                    off += n + (-n % ALIGN)
                else:
                    frame = memoryview(frames[-n - 1])
                host.deliver(decode(frame), dsts, threadsafe=True)
            if trace is not None:
                trace.received(w0, c0, len(entries))
        except Exception as exc:
            self.interrupt(f"a batch from ray shard {src} could not be delivered: "
                           f"{type(exc).__name__}: {exc}")


@ray.remote(concurrency_groups={"io": 1, "ctl": 2})  # type: ignore[call-overload]
class Shard:
    """The Ray actor around `ShardCore`: deliveries on one thread, control calls on others."""

    def __init__(self, shard_id: int, n_shards: int, config_frame: bytes, settings: bytes):
        self.args = (shard_id, n_shards, config_frame, settings)
        self.core = ShardCore(*self.args)

    def __repr__(self) -> str:
        # Ray prefixes each line this actor prints with it: "(shard 1 pid=...)".
        return f"shard {self.args[0]}"

    def ready(self) -> list[Any]:
        return self.core.ready()

    @ray.method(concurrency_group="ctl")
    def reset(self, timeout_s: float) -> list[Any]:
        """Drop this shard's nodes and build them afresh under a new incarnation (a replay after
        another shard was restarted); batches for the old incarnation are dropped as stale."""
        self.core.stop(timeout_s)
        self.core = ShardCore(*self.args)
        return self.core.ready()

    @ray.method(concurrency_group="ctl")
    def connect(self, peers: list[Any], incarnations: list[int]) -> None:
        self.core.connect(peers, incarnations)

    def start(self) -> None:
        self.core.start()

    def go(self) -> None:
        self.core.go()

    @ray.method(concurrency_group="ctl")
    def poll(self, wait_s: float) -> list[Any]:
        return self.core.poll(wait_s)

    @ray.method(concurrency_group="ctl")
    def stop(self, timeout_s: float) -> bytes:
        return self.core.stop(timeout_s)

    @ray.method(concurrency_group="io")
    def deliver(self, src: int, src_inc: int, dst_inc: int, seq: int, index: bytes,
                blob: bytes | np.ndarray, *frames: np.ndarray) -> None:
        self.core.deliver(src, src_inc, dst_inc, seq, index, blob, *frames)
