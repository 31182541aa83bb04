"""The event queue and its clocks: virtual time that jumps from event to event, or the wall clock.

Events are ordered by (time, insertion order). Execution is single-threaded and everything that
inserts events is deterministic given the seed, so the order is total and replays exactly.
Events due now go to a FIFO (about 3x cheaper than the heap); the heap holds the future. Virtual
time only advances when the FIFO is empty, and then moves every heap event due at the new time
to the FIFO in (time, insertion) order, so the FIFO order is the total order.

The garbage collector stays out of a virtual-time loop: a node's state lives as long as the run,
so every full collection walks all of it (at 100,000 nodes, 36 full collections took 22 of 54 s).
`run` freezes what exists when it starts (those objects are never scanned) and disables automatic
collection; it collects what the run itself made only when the clock advances and that many new
container objects are alive (`GC_EVERY`), and restores the collector's state when it returns.
Reference counting still frees everything acyclic at once, so only cyclic garbage waits.

In wall mode the clock is `time.monotonic()` since the scheduler was made; other threads hand
events in with `push_threadsafe` and the loop sleeps on a `threading.Event` between events.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

# Event types; small ints so the tuples compare and dispatch cheaply. WAKE tells a host that a
# busy node's computation has ended and its waiting events can run. FANOUT is one message for
# several nodes as one queue entry (FANOUT, i, msg) whose msg.dst is the tuple of nodes: the
# host delivers to dst[i] and puts (FANOUT, i + 1, msg) back at the front of the FIFO, so it
# runs exactly like the DELIVER events it stands for queued one after another, in a third of
# the memory at degree 4.
DELIVER, TIMER, CRASH, RESTART, CALL, WAKE, FANOUT = 0, 1, 2, 3, 4, 5, 6

Event = tuple[int, int, Any]  # (etype, node, payload)

# The longest a wall-clock loop sleeps before looking at its clock again (and calling
# `idle_wait`, which transports use to notice dead peers).
IDLE_POLL_S = 0.05
# New tracked objects alive (gc's young count) after which a virtual-time loop collects the
# objects the run made, at its next clock advance, then freezes the survivors.
GC_EVERY = 1_000_000


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """Freeze what exists and keep automatic collection off inside (a virtual-time loop, or a
    host starting a million long-lived nodes: each full collection would walk them all);
    the collector's state is restored after, and only what this froze is thawed."""
    enabled = gc.isenabled()
    thaw = gc.get_freeze_count() == 0
    gc.disable()
    gc.freeze()
    try:
        yield
    finally:
        if thaw:
            gc.unfreeze()
        if enabled:
            gc.enable()


def expand(etype: int, node: int, payload: Any) -> list[Event]:
    """An event as plain events: a FANOUT as the DELIVER events it stands for, others as is."""
    if etype != FANOUT:
        return [(etype, node, payload)]
    new = tuple.__new__
    return [(DELIVER, d, new(type(payload), (payload[0], d, *payload[2:])))
            for d in payload[1][node:]]


class Scheduler:
    """An event queue with a clock; virtual time jumps, `wall=True` waits for real time to pass."""

    __slots__ = ("now", "_heap", "_fifo", "_seq", "wall", "_t0", "_inbox", "_wake", "halted")

    def __init__(self, wall: bool = False) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, int, int, Any]] = []
        # Friends in kernel.host append (etype, node, payload) here directly for events due now.
        self._fifo: deque[Event] = deque()
        self._seq = 0
        self.wall = wall
        self._t0 = time.monotonic()
        # Events handed in from other threads (a transport's receiver); drained by the loop.
        self._inbox: deque[Event] = deque()
        self._wake = threading.Event()
        # Set by `halt` (any thread): a wall-clock loop returns "halted" at its next look.
        self.halted = False

    def push(self, t: float, etype: int, node: int, payload: Any) -> None:
        """Schedule an event at time `t` (at once, after those already due, when `t` is not in
        the future). Call only from the loop's thread (or before it runs)."""
        if t <= self.now:
            self._fifo.append((etype, node, payload))
        else:
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, etype, node, payload))

    def push_front(self, etype: int, node: int, payload: Any) -> None:
        """Run an event next, before everything already due (from the loop's thread only:
        a transport's flush of what the running event sent, say)."""
        self._fifo.appendleft((etype, node, payload))

    def push_threadsafe(self, etype: int, node: int, payload: Any) -> None:
        """Hand an event in from another thread; it runs as soon as the loop sees it."""
        self._inbox.append((etype, node, payload))
        self._wake.set()

    def wake(self) -> None:
        """Make a waiting wall-clock loop look at its queues now."""
        self._wake.set()

    def halt(self) -> None:
        """Make a wall-clock loop return "halted" at its next look at the clock, from any
        thread, without queueing an event (clear `halted` to run again)."""
        self.halted = True
        self._wake.set()

    def next_time(self) -> float | None:
        """Time of the next event, or None when nothing is queued."""
        if self._fifo or self._inbox:
            return self.now
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap) + len(self._inbox)

    def state(self) -> dict[str, Any]:
        """The clock and the queued events, for a checkpoint (between events, virtual time):
        `now`, `seq` (the insertion counter), `heap` ((time, seq, etype, node, payload)
        entries) and `fifo` ((etype, node, payload) events due now, in order)."""
        if self._inbox:
            raise RuntimeError("events handed in from other threads are still in the inbox")
        fifo: list[Event] = []
        for e in self._fifo:
            fifo.extend(expand(*e))
        if not any(e[2] == FANOUT for e in self._heap):
            return {"now": self.now, "seq": self._seq, "heap": list(self._heap), "fifo": fifo}
        # Each FANOUT becomes its deliveries; the heap is renumbered in (time, seq) order, so
        # the restored queue runs in exactly the same order.
        heap: list[tuple[float, int, int, int, Any]] = []
        for t, _, etype, node, payload in sorted(self._heap, key=lambda e: (e[0], e[1])):
            for ev in expand(etype, node, payload):
                heap.append((t, len(heap) + 1, *ev))
        return {"now": self.now, "seq": len(heap), "heap": heap, "fifo": fifo}

    def set_state(self, now: float, seq: int, heap: list[tuple[float, int, int, int, Any]],
                  fifo: list[Event]) -> None:
        """Replace the clock and queues with those of `state()` (before the loop runs)."""
        self.now = now
        self._seq = seq
        # (time, seq) keys are unique, so the pop order does not depend on the heap's layout.
        self._heap[:] = heap
        heapq.heapify(self._heap)
        self._fifo.clear()
        self._fifo.extend(fifo)

    def elapsed(self) -> float:
        """Wall seconds since this scheduler was made."""
        return time.monotonic() - self._t0

    def run(
        self,
        dispatch: Callable[[int, int, Any], bool],
        until: float | None = None,
        max_events: int | None = None,
        idle_wait: Callable[[float], None] | None = None,
    ) -> tuple[str, int]:
        """Run events through `dispatch` (which returns True to stop) and say why it stopped.

        Returns (reason, events) with reason one of "finished", "idle", "until", "max_events"
        or (wall mode, after `halt`) "halted".
        Events at exactly `until` still run. In wall mode "idle" is never returned: the loop
        waits (up to `until`) for events from other threads, calling `idle_wait(seconds)` each
        time it is about to block.
        """
        if max_events is not None and max_events <= 0:
            return "max_events", 0
        if self.wall:
            return self._run_wall(dispatch, until, max_events, idle_wait)
        with quiet_gc():
            return self._run_virtual(dispatch, until, max_events)

    def _run_virtual(
        self,
        dispatch: Callable[[int, int, Any], bool],
        until: float | None,
        max_events: int | None,
    ) -> tuple[str, int]:
        heap, fifo = self._heap, self._fifo
        pop, popleft = heapq.heappop, fifo.popleft
        gc_count = gc.get_count
        # A limit the count never reaches keeps the hot loop to one comparison.
        limit = max_events if max_events is not None else -1
        n = 0
        while True:
            while fifo:
                n += 1
                if dispatch(*popleft()):
                    return "finished", n
                if n == limit:
                    return "max_events", n
            if not heap:
                return "idle", n
            t = heap[0][0]
            if until is not None and t > until:
                if until > self.now:
                    self.now = until
                return "until", n
            self.now = t
            if gc_count()[0] > GC_EVERY:
                gc.collect()
                gc.freeze()
            # Move everything due at t to the FIFO so (time, insertion) order holds exactly.
            while heap and heap[0][0] == t:
                e = pop(heap)
                fifo.append((e[2], e[3], e[4]))

    def _run_wall(
        self,
        dispatch: Callable[[int, int, Any], bool],
        until: float | None,
        max_events: int | None,
        idle_wait: Callable[[float], None] | None,
    ) -> tuple[str, int]:
        heap, fifo, inbox = self._heap, self._fifo, self._inbox
        pop, popleft = heapq.heappop, fifo.popleft
        limit = max_events if max_events is not None else -1
        t0, clock, wake = self._t0, time.monotonic, self._wake
        n = 0
        while True:
            if self.halted:
                return "halted", n
            self.now = clock() - t0
            while inbox:
                fifo.append(inbox.popleft())
            while heap and heap[0][0] <= self.now:
                e = pop(heap)
                fifo.append((e[2], e[3], e[4]))
            if fifo:
                # Only the events due as of this look at the clock: events they cause wait for
                # the next look, so a chatty node cannot starve timers or other threads' input.
                for _ in range(len(fifo)):
                    n += 1
                    if dispatch(*popleft()):
                        return "finished", n
                    if n == limit:
                        return "max_events", n
                continue
            if until is not None and self.now >= until:
                return "until", n
            wait = IDLE_POLL_S
            if heap:
                wait = min(wait, heap[0][0] - self.now)
            if until is not None:
                wait = min(wait, until - self.now)
            wait = max(wait, 0.0)
            if idle_wait is not None:
                idle_wait(wait)
            # A push_threadsafe between the inbox check above and this wait sets the event,
            # so the wait returns at once: no wake-up is lost, and clear() happens before the
            # next look at the inbox.
            if not inbox and not fifo:
                wake.wait(wait)
            wake.clear()
