"""A scripted network for protocol tests: message k takes delays[k % len] seconds, so a
hypothesis-chosen list reorders messages at will; optional seeded loss and duplicates.

A test double of `kernel.api.Network` (the shipped model is transports/netmodel.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Scripted:
    """Delays taken in turn from a list, with seeded loss and duplicates."""

    def __init__(self, delays: Sequence[float], loss: float = 0.0, duplicate: float = 0.0,
                 seed: int = 0) -> None:
        self.delays, self.loss, self.duplicate = list(delays), loss, duplicate
        self.rng = np.random.default_rng(seed)
        self.k = 0

    def _delay(self) -> float:
        d = self.delays[self.k % len(self.delays)]
        self.k += 1
        return d

    def arrivals(self, src: int, dst: int, depart: float, nbytes: int) -> list[float]:
        if self.loss and self.rng.random() < self.loss:
            return []
        out = [depart + self._delay()]
        if self.duplicate and self.rng.random() < self.duplicate:
            out.append(depart + self._delay())
        return out

    def node_events(self) -> list[tuple[float, int, str]]:
        return []

    def compute_time(self, node: int, work: float, label: str) -> float:
        return 0.0
