"""The progress display: rounds as they complete, from the metric rows named "round"."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

BAR_WIDTH = 24


class Progress:
    """Shows each completed round: one bar redrawn in place on a terminal, one line per round
    otherwise. Feed it every metric row with `update`; it ignores rows not named "round"."""

    def __init__(
        self,
        total_rounds: int,
        stream: TextIO | None = None,
        *,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total_rounds
        self.stream = stream if stream is not None else sys.stderr
        self.bar = _isatty(self.stream) if bar is None else bar
        self._clock = clock
        self._t0 = clock()
        self._drawn = False
        self._first: tuple[int, float] | None = None  # (round, elapsed s) of the first row
        # Rows arrive on a transport's receiver thread on ray and grpc.
        self._lock = threading.Lock()

    def start(self) -> None:
        """Restart the clock that elapsed time and ETA count from (the runner calls this when
        the rounds begin, so building the deployment does not count)."""
        self._t0 = self._clock()
        self._first = None

    def update(self, row: Mapping[str, Any]) -> None:
        """Show `row` if it is a "round" row (value = the 1-based round number), or a
        "status" row (a transport saying what it waits for, value = the text)."""
        if row.get("name") == "status":
            with self._lock:
                # A line of its own (rare, and worth keeping on screen): after a drawn bar,
                # which the next round redraws below it.
                self.stream.write(("\n" if self._drawn else "") + str(row.get("value")) + "\n")
                self._drawn = False
                self.stream.flush()
            return
        if row.get("name") != "round":
            return
        with self._lock:
            text = self.describe(row)
            if self.bar:
                self.stream.write("\r" + text + "\x1b[K")
                self._drawn = True
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def describe(self, row: Mapping[str, Any]) -> str:
        """The text shown for one round row."""
        r = row.get("value")
        elapsed = self._clock() - self._t0
        parts = []
        if isinstance(r, int) and not isinstance(r, bool):
            if self.bar and self.total > 0:
                filled = min(BAR_WIDTH, BAR_WIDTH * r // self.total)
                parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
            parts.append(f"round {r}/{self.total}")
        else:
            parts.append(f"round {r!r}")
        for key in ("accuracy", "loss"):
            value = row.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                parts.append(f"{key} {float(value):.4f}")
        nbytes = row.get("bytes")
        if isinstance(nbytes, int | float) and not isinstance(nbytes, bool):
            parts.append(human_bytes(nbytes))
        parts.append(f"{elapsed:.1f}s")
        if isinstance(r, int) and not isinstance(r, bool) and r > 0:
            # Rates from the first round on: start-up (Ray, shard processes) is not a round.
            if self._first is None:
                self._first = (r, elapsed)
            elif r < self.total and r > self._first[0]:
                per_round = (elapsed - self._first[1]) / (r - self._first[0])
                parts.append(f"ETA {per_round * (self.total - r):.0f}s")
        return "  ".join(parts)

    def close(self) -> None:
        """End the display (a newline after a bar, so what follows starts on its own line)."""
        with self._lock:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as network rates are quoted)."""
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
