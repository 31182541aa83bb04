"""One shard of a Ray run: a Ray actor running a wall-clock Host for a slice of the nodes.

Messages leave the shard as codec frames, batched per destination shard and sent with one actor
call per destination per loop tick. A batch's frames for one destination travel as one contiguous
uint8 argument (above `inline_threshold` bytes Ray stores it once and the receiver reads it
zero-copy from the object store). A frame above `inline_threshold` bytes bound for several shards
is `ray.put` once and only its ObjectRef travels, to every shard that needs it. Only bytes, numpy
arrays, ints and actor handles cross Ray.
"""

from __future__ import annotations

import os
import sys
import threading
import time
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
from transports.base import place

ALIGN = 64
# A destination's batch holding this many bytes of frames is sent at once, not at the tick.
FLUSH_BYTES = 16 << 20
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
    """Batches this shard's outgoing frames per destination shard until the next flush."""

    def __init__(self, shard: ShardCore) -> None:
        self.shard = shard
        # dst shard -> entries (dsts, frame parts to copy into the batch, or a multicast ObjectRef)
        self.pending: dict[int, list[tuple[list[int], Any]]] = {}
        self.pending_bytes: dict[int, int] = {}
        self.scheduled = False
        self.closed = False
        self._scratch = np.empty(0, np.uint8)

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
            # Copied into the destination's batch at send time; the parts are views of the body,
            # which nobody mutates after sending (local deliveries share it too).
            item = (parts, n)
        for s, ds in groups.items():
            self.pending.setdefault(s, []).append((ds, item))
            self.pending_bytes[s] = self.pending_bytes.get(s, 0) + n
            if self.pending_bytes[s] >= FLUSH_BYTES:
                # Bulk goes now: one call is cheap beside this many bytes, and the destination
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
                # clock share one call per destination shard (each call costs ~2 ms of loop).
                host.call_soon_threadsafe(self.flush)

    def _buffer(self, n: int) -> np.ndarray:
        # The batch is serialised (copied into the object store, or inlined) inside `.remote()`
        # and ray.put copies too, so one scratch buffer serves every batch and multicast frame
        # (copying into reused memory is ~5x faster than into fresh pages).
        if self._scratch.nbytes < n:
            self._scratch = np.empty(max(n, 2 * self._scratch.nbytes), np.uint8)
        return self._scratch

    def _frame_array(self, parts: list[Any], n: int) -> np.ndarray:
        buf = self._buffer(n)
        off = 0
        for p in parts:
            a = np.frombuffer(p, np.uint8)
            buf[off : off + a.nbytes] = a
            off += a.nbytes
        return buf[:n]

    def flush(self) -> None:
        """Send every destination's batch: one actor call per destination shard."""
        self.scheduled = False
        if self.closed:
            self.pending.clear()
            return
        for s in sorted(self.pending):
            self._send(s)

    def _send(self, s: int) -> None:
        sh = self.shard
        entries = self.pending.pop(s)
        self.pending_bytes.pop(s, None)
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
        blob: Any
        if total <= sh.inline_threshold:
            blob = bytes(self._fill(entries, self._buffer(total)[:total]))
        else:
            # One contiguous argument: Ray stores it once and the receiver reads it zero-copy.
            blob = self._fill(entries, self._buffer(total)[:total])
            sh.stats["stored_batches"] += 1
        peer = sh.peers[s]
        seq = sh.out_seq.get(s, 0)
        sh.out_seq[s] = seq + 1
        # Fire and forget: a dead destination is the driver's to notice and report.
        peer.deliver.remote(
            sh.shard_id, sh.incarnation, sh.peer_inc[s], seq,
            msgpack.packb(index), blob, *refs,
        )
        sh.stats["batches"] += 1

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
        self.placement = place(dep.node_ids, n_shards)
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
        self.outbox.closed = True
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
