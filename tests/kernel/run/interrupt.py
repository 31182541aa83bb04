"""Ctrl-C at a chosen round, for the tests that interrupt and resume runs."""

from __future__ import annotations

import io
import signal
from collections.abc import Mapping
from typing import Any

from kernel.run.progress import Progress


class InterruptAt(Progress):
    """A progress display that presses Ctrl-C (a real SIGINT to this process) when round
    `r` completes, as a user would."""

    def __init__(self, r: int) -> None:
        super().__init__(r, io.StringIO())
        self.r = r

    def update(self, row: Mapping[str, Any]) -> None:
        if row.get("name") == "round" and row.get("value") == self.r:
            signal.raise_signal(signal.SIGINT)
