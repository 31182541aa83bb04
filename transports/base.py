"""The abstract transport: place nodes on shards, carry messages between them, report failures."""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from kernel.run.job import Job, Outcome

__all__ = ["Job", "Outcome", "Transport", "place"]


class Transport(ABC):
    """Carries one run's messages; `transport.kind` in a config picks the implementation."""

    # True when `Outcome.clock_s` is virtual time (inproc), False for the wall clock.
    virtual_clock: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    @abstractmethod
    def run(self, job: Job) -> Outcome:
        """Run `job` to its end and report; raise `RunError` naming any dead shard or peer."""

    def close(self) -> None:  # noqa: B027 - most transports have nothing to release
        """Release processes, actors and sockets (called even when `run` raised)."""


def place(node_ids: Sequence[int], shards: int,
          load: Mapping[int, float] | None = None) -> dict[int, int]:
    """Which shard runs each node. Without `load` (or with every node at 1.0): round-robin by
    sorted node id, so shard loads differ by at most one node. With `load` (a deployment's hint:
    work per round of the nodes that do more or less than a typical node's 1.0, see
    `kernel.api.Deployment.load`): nodes in order of falling load, then id, each go to the
    shard with the least load so far (then the fewest nodes, then the lowest index), so shard
    loads differ by at most the largest node's load and a heavy node (a server) gets a shard
    with correspondingly fewer others. Results never depend on placement: it only moves work."""
    if shards < 1:
        raise ValueError(f"transport.shards must be >= 1, got {shards}")
    ids = sorted(node_ids)
    heavy = {n: w for n, w in (load or {}).items() if w != 1.0}
    for n, w in heavy.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"placement load of node {n} is {w!r}; expected a finite number "
                             f">= 0")
    if not heavy or shards == 1:
        return {node: i % shards for i, node in enumerate(ids)}
    known = set(ids)
    order = sorted((n for n in heavy if n in known), key=lambda n: (-heavy[n], n))
    order += [n for n in ids if n not in heavy]  # the 1.0s, in id order
    # (load so far, nodes so far, shard): the least loaded shard is always on top.
    bins = [(0.0, 0, s) for s in range(shards)]
    out: dict[int, int] = {}
    for n in order:
        w, c, s = bins[0]
        out[n] = s
        heapq.heapreplace(bins, (w + heavy.get(n, 1.0), c + 1, s))
    return out
