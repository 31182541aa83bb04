"""An opt-in timeline of one shard's work, for `perf.bench_shards` (off unless asked for).

Set the environment variable `FEDLOOM_SHARD_TRACE` to a directory before a run: every ray or
grpc shard (and the bench's inproc run) then records, on the wall clock shared by all processes,
each event its loop ran (type, node, message kind and round, wall and thread-CPU seconds), each
batch its receive threads took in, each batch it sent, and its process and loop CPU; it writes
them as `<transport>-<shard>-<pid>.json` in that directory when it stops. A loop event's wall
time minus its CPU time is time the loop thread was ready but not running: waiting for the GIL
(held by a receive, decode or send thread) or for a core.

Tracing costs about a microsecond per event; nothing records anything when the variable is unset.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "FEDLOOM_SHARD_TRACE"
# kernel.loop's event types, by number (kept here: the tracer must not slow the kernel).
_ETYPES = {0: "deliver", 1: "timer", 2: "crash", 3: "restart", 4: "call", 5: "wake", 6: "fanout"}


def directory() -> Path | None:
    """Where traces go, or None when tracing is off."""
    d = os.environ.get(ENV)
    return Path(d) if d else None


class Trace:
    """One process's timeline: loop events, receives, sends, and CPU totals."""

    def __init__(self, transport: str, shard: int) -> None:
        self.transport, self.shard = transport, shard
        self.events: list[tuple[Any, ...]] = []
        self.rx: list[tuple[float, float, float, int]] = []
        self.tx: list[tuple[float, float, float, int, int]] = []
        self.loop: dict[str, float | None] = {}
        self._lock = threading.Lock()
        self._cpu0 = time.process_time()
        self._wall0 = time.time()

    def wrap(self, dispatch: Callable[[int, int, Any], bool]) -> Callable[[int, int, Any], bool]:
        """`dispatch` recording each event it runs (install as the host's `_dispatch`)."""
        wall, cpu, events = time.time, time.thread_time, self.events

        def traced(etype: int, node: int, payload: Any) -> bool:
            w0, c0 = wall(), cpu()
            stop = dispatch(etype, node, payload)
            kind, rnd, src = None, None, None
            if etype in (0, 6) and isinstance(payload, tuple):
                kind, src = payload[2], payload[0]
                body = payload[3]
                rnd = body.get("round") if isinstance(body, dict) else None
                if etype == 6:
                    node = payload[1][node]
            elif etype == 4:
                kind = getattr(payload, "__qualname__", type(payload).__name__)
            events.append((_ETYPES.get(etype, etype), node, kind, src, rnd, w0, wall(),
                           cpu() - c0))
            return stop

        return traced

    def install(self, host: Any) -> None:
        """Record every event `host` runs from now on, and the loop's CPU from here."""
        host._dispatch = self.wrap(host._dispatch)  # an instance attribute: Host.run uses it
        self.loop_started()

    def loop_started(self) -> None:
        self.loop["wall0"], self.loop["cpu0"] = time.time(), time.thread_time()
        self.loop["proc_cpu0"] = time.process_time()
        self.loop["runq0"] = run_delay()

    def loop_ended(self) -> None:
        self.loop["wall1"], self.loop["cpu1"] = time.time(), time.thread_time()
        self.loop["proc_cpu1"] = time.process_time()
        self.loop["runq1"] = run_delay()

    def received(self, w0: float, c0: float, n: int) -> None:
        """A receive thread took in `n` messages between wall `w0` and now (thread CPU from c0)."""
        w1, c1 = time.time(), time.thread_time()
        with self._lock:
            self.rx.append((w0, w1, c1 - c0, n))

    def sent(self, w0: float, c0: float, n: int, nbytes: int) -> None:
        """This shard sent `n` messages of `nbytes` in one call between wall `w0` and now."""
        w1, c1 = time.time(), time.thread_time()
        with self._lock:
            self.tx.append((w0, w1, c1 - c0, n, nbytes))

    def dump(self, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"{self.transport}-{self.shard}-{os.getpid()}.json"
        torch = sys.modules.get("torch")
        with self._lock:
            doc = {"transport": self.transport, "shard": self.shard, "pid": os.getpid(),
                   # Intra-op threads: shards sharing cores must not oversubscribe them.
                   "torch_threads": torch.get_num_threads() if torch is not None else None,
                   "threads": threading.active_count(),
                   "loop": self.loop, "events": self.events, "rx": self.rx, "tx": self.tx,
                   "proc_cpu": time.process_time() - self._cpu0,
                   "span": [self._wall0, time.time()]}
        path.write_text(json.dumps(doc))
        return path


def run_delay() -> float | None:
    """Seconds the calling thread has spent runnable but waiting for a core (Linux schedstat),
    or None where the kernel does not say. Waiting for the GIL is not in it (a thread waiting
    for the GIL sleeps), so a loop's wall-minus-CPU time less this is its time spent waiting
    for the GIL (and for locks)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def start(transport: str, shard: int) -> Trace | None:
    """A trace for this shard when `FEDLOOM_SHARD_TRACE` is set, else None."""
    return Trace(transport, shard) if directory() is not None else None


def finish(trace: Trace | None) -> None:
    """Write `trace` (if any) to the trace directory."""
    d = directory()
    if trace is not None and d is not None:
        trace.dump(d)
