"""Which shard runs each node. Transports place nodes with `place`; protocols read the result
through `ctx.shards` and `ctx.shard_of(node)` (to combine replies where they are produced, say),
so the placement lives here, below both."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence


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


class Placement:
    """A run's node -> shard map as protocols see it; one shard (every node on 0) by default,
    without a map of every node (a million-node inproc run pays nothing for it)."""

    __slots__ = ("shards", "_of")

    def __init__(self, shards: int = 1, of: Mapping[int, int] | None = None) -> None:
        if shards < 1:
            raise ValueError(f"transport.shards must be >= 1, got {shards}")
        if shards > 1 and of is None:
            raise ValueError("a placement on more than one shard needs its node -> shard map")
        self.shards = shards
        self._of = of if shards > 1 else None

    def __call__(self, node: int) -> int:
        of = self._of
        if of is None:
            return 0
        try:
            return of[node]
        except KeyError:
            raise KeyError(f"node {node} is not placed on any shard") from None

    @classmethod
    def of(cls, node_ids: Sequence[int], shards: int,
           load: Mapping[int, float] | None = None) -> Placement:
        """`place(node_ids, shards, load)` as a Placement."""
        return cls(shards, place(node_ids, shards, load) if shards > 1 else None)
