"""The event queue and its clocks: virtual time that jumps from event to event, or the wall clock.

Events are ordered by (time, insertion order). Execution is single-threaded and everything that
inserts events is deterministic given the seed, so the order is total and replays exactly.
Events due now go to a FIFO (about 3x cheaper than the heap); the heap holds the future. Virtual
time only advances when the FIFO is empty, and then moves every heap event due at the new time
to the FIFO in (time, insertion) order, so the FIFO order is the total order.

In wall mode the clock is `time.monotonic()` since the scheduler was made; other threads hand
events in with `push_threadsafe` and the loop sleeps on a `threading.Event` between events.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# Event types; small ints so the tuples compare and dispatch cheaply. WAKE tells a host that a
# busy node's computation has ended and its waiting events can run.
DELIVER, TIMER, CRASH, RESTART, CALL, WAKE = 0, 1, 2, 3, 4, 5

Event = tuple[int, int, Any]  # (etype, node, payload)

# The longest a wall-clock loop sleeps before looking at its clock again (and calling
# `idle_wait`, which transports use to notice dead peers).
IDLE_POLL_S = 0.05


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
        return {"now": self.now, "seq": self._seq, "heap": list(self._heap),
                "fifo": list(self._fifo)}

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
        heap, fifo = self._heap, self._fifo
        pop, popleft = heapq.heappop, fifo.popleft
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
