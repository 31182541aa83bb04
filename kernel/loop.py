"""The event queue and its clocks: virtual time that jumps from event to event, or the wall clock.

Events are ordered by (time, insertion sequence). Execution is single-threaded and everything that
inserts events is deterministic given the seed, so the order is total and replays exactly.
Events due now go to a FIFO (about 3x cheaper than the heap); the heap holds the future.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# Event types; small ints so the tuples compare and dispatch cheaply.
DELIVER, TIMER, CRASH, RESTART, CALL = 0, 1, 2, 3, 4

Event = tuple[int, int, Any]  # (etype, node, payload)


class Scheduler:
    """An event queue with a clock; `virtual` jumps, `wall` waits for real time to pass."""

    __slots__ = ("now", "_heap", "_fifo", "_seq", "wall", "_t0", "_inbox", "_wake")

    def __init__(self, wall: bool = False) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._fifo: deque[Event] = deque()
        self._seq = 0
        self.wall = wall
        self._t0 = time.monotonic()
        # Events handed in from other threads (a transport's receiver); drained by the loop.
        self._inbox: deque[Event] = deque()
        self._wake = threading.Event()

    def push(self, t: float, etype: int, node: int, payload: Any) -> None:
        """Schedule an event at time `t` (at once when `t` is not in the future)."""
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

    def next_time(self) -> float | None:
        """Time of the next event, or None when nothing is queued."""
        if self._fifo or self._inbox:
            return self.now
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap) + len(self._inbox)

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

        Returns (reason, events) with reason one of "finished", "idle", "until", "max_events".
        In wall mode "idle" is never returned: the loop waits (up to `until`) for events from
        other threads, calling `idle_wait(seconds)` each time it would block.
        """
        heap, fifo, inbox = self._heap, self._fifo, self._inbox
        pop, popleft = heapq.heappop, fifo.popleft
        limit = max_events if max_events is not None else -1
        n = 0
        if not self.wall:
            while True:
                if not fifo:
                    if not heap:
                        return "idle", n
                    t = heap[0][0]
                    if until is not None and t > until:
                        self.now = until
                        return "until", n
                    self.now = t
                    # Move everything due at t to the FIFO so (time, seq) order holds exactly.
                    while heap and heap[0][0] == t:
                        e = pop(heap)
                        fifo.append((e[2], e[3], e[4]))
                etype, node, payload = popleft()
                n += 1
                if dispatch(etype, node, payload):
                    return "finished", n
                if n == limit:
                    return "max_events", n
        t0 = self._t0
        clock = time.monotonic
        while True:
            self.now = clock() - t0
            while inbox:
                fifo.append(inbox.popleft())
            while heap and heap[0][0] <= self.now:
                e = pop(heap)
                fifo.append((e[2], e[3], e[4]))
            if fifo:
                while fifo:
                    etype, node, payload = popleft()
                    n += 1
                    if dispatch(etype, node, payload):
                        return "finished", n
                    if n == limit:
                        return "max_events", n
                continue
            if until is not None and self.now >= until:
                return "until", n
            wait = 0.05
            if heap:
                wait = min(wait, heap[0][0] - self.now)
            if until is not None:
                wait = min(wait, until - self.now)
            if idle_wait is not None:
                idle_wait(max(wait, 0.0))
            if not inbox:
                self._wake.wait(max(wait, 0.0))
            self._wake.clear()
