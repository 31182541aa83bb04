"""Which shard runs each node. Transports place nodes with `place`; protocols read the result
through `ctx.shards` and `ctx.shard_of(node)` (to combine replies where they are produced, say),
so the placement lives here, below both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def place(node_ids: Sequence[int], shards: int) -> dict[int, int]:
    """Round-robin placement by sorted node id: shard loads differ by at most one node."""
    if shards < 1:
        raise ValueError(f"transport.shards must be >= 1, got {shards}")
    return {node: i % shards for i, node in enumerate(sorted(node_ids))}


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
    def of(cls, node_ids: Sequence[int], shards: int) -> Placement:
        """`place(node_ids, shards)` as a Placement."""
        return cls(shards, place(node_ids, shards) if shards > 1 else None)
