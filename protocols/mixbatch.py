"""Deferred mixing for synchronous gossip: a round's mixes of many nodes as one gather-sum.

A node of synchronous gossip that has every value for round r (all its neighbours' x^(r-1))
sets x^r = sum_j w_ij x_j^(r-1). Done per node, that is five numpy calls on a few floats, most
of the time at a million nodes. `Batch` records "node i mixes round r" instead and computes
every recorded mix later, round by round, as a few numpy gathers and adds over all of them at
once, with exactly the float32 operations the node would have done, in the same order per
node: the same bits.

Why computing later is exact. The values live in a shared (n, 2, dim) block, x^r in buffer
r % 2. A recorded mix (i, r) reads rows (j, (r-1) % 2) and writes row (i, r % 2). Its inputs are
either computed already or recorded at round r - 1, which `flush` computes first. They are not
yet overwritten: (j, r + 1) overwrites them, and j records that only after receiving x_i^r,
which i sends only after recording (i, r); so (j, r + 1) is computed after (i, r), in the same
flush (a later round) or a later one. Anything else that reads the block (a metric row, the
final reports, a checkpoint, a codec) must `flush` first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Mixes recorded before `flush` runs by itself (bounds the memory of the lists of node ids).
FLUSH_AT = 1 << 17


class Batch:
    """Recorded mixes of a synchronous gossip run over a shared block, and every node's row
    of weights as arrays (filled by `set_row` when the nodes are made)."""

    def __init__(self, neighbours: Sequence[Sequence[int]], rounds: int) -> None:
        n = len(neighbours)
        self.neighbours = neighbours
        # todo[r]: nodes whose round-r mix is recorded, not yet computed (SyncGossip appends
        # and counts `pending` itself, and flushes at `FLUSH_AT`).
        self.todo: list[list[int]] = [[] for _ in range(rounds + 1)]
        self.pending = 0
        # Per node: the weight shared by its whole row (float64, as the node holds it), or
        # NaN when its weights differ; those rows are in `wpos` (made on first need).
        self.wshare = np.full(n, np.nan)
        self.wpos: np.ndarray | None = None
        self.dmax = max((len(o) for o in neighbours), default=0)
        # Sorted ids of each node and its neighbours, the mixing order (made at first flush).
        self.order: np.ndarray | None = None
        # When every node has degree d (1..255): at i * d + s, the position of node i in the
        # mixing order of its s-th neighbour: what that neighbour would find by searching its
        # own neighbour list, read from a few MB instead of a million cold tuples.
        self.deg = 0
        self.rev: bytes | None = None
        degs = {len(o) for o in neighbours}
        if n and len(degs) == 1 and 1 <= self.dmax <= 255:
            self.deg = self.dmax
            self.rev = self._positions()

    def _positions(self) -> bytes:
        d, n = self.deg, len(self.neighbours)
        order = self._table()
        out = np.empty(n * d, np.uint8)
        step = max(1, (1 << 16) // d)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            near = np.repeat(np.arange(lo, hi), d)
            far = np.asarray(self.neighbours[lo:hi], np.int64).ravel()
            # i's position in j's sorted (neighbours + j): how many entries are below i.
            out[lo * d:hi * d] = (order[far] < near[:, None]).sum(axis=1)
        return out.tobytes()

    def set_row(self, node: int, w: float | None, ws: Sequence[float] | None) -> None:
        """Node `node`'s weights: `w` for all of its row, else `ws` in mixing order."""
        if w is not None:
            self.wshare[node] = w
            return
        assert ws is not None
        if self.wpos is None:
            self.wpos = np.zeros((len(self.wshare), self.dmax + 1))
        self.wpos[node, :len(ws)] = ws

    def flush(self, block: np.ndarray) -> None:
        """Compute every recorded mix, round by round, into `block`."""
        if not self.pending:
            return
        for r, nodes in enumerate(self.todo):
            if nodes:
                self._mix(block, r, np.array(nodes, np.int64))
                nodes.clear()
        self.pending = 0

    def _table(self) -> np.ndarray:
        order = self.order
        if order is None:
            nb = self.neighbours
            n, width = len(nb), self.dmax + 1
            kind = np.int32 if n < 2**31 else np.int64
            if len({len(o) for o in nb}) == 1:
                # Every row full: the neighbour tuples and the node itself, sorted, at once.
                order = np.empty((n, width), kind)
                order[:, 0] = np.arange(n)
                step = 1 << 16
                for lo in range(0, n, step):
                    # In slices: converting a million tuples at once peaks at ~100 MB.
                    if width > 1:
                        order[lo:lo + step, 1:] = np.asarray(nb[lo:lo + step], kind).reshape(
                            -1, width - 1)
                    order[lo:lo + step].sort(axis=1)
            else:
                order = np.full((n, width), -1, kind)
                for i, o in enumerate(nb):
                    row = sorted((i, *o))
                    order[i, :len(row)] = row
            self.order = order
        return order

    def _mix(self, block: np.ndarray, r: int, nodes: np.ndarray) -> None:
        src = block[:, (r - 1) & 1]
        order = self._table()
        deg = (order[nodes] >= 0).sum(axis=1) - 1
        shared = ~np.isnan(self.wshare[nodes])
        # Nodes with the same degree and the same kind of row run the same operations.
        key = deg * 2 + shared
        first = key[0]
        groups = [nodes] if (key == first).all() else [
            nodes[key == k] for k in np.unique(key)]
        for ids in groups:
            d = int((order[ids[0]] >= 0).sum()) - 1
            cols = order[ids]
            if not np.isnan(self.wshare[ids[0]]):
                # As the node does: v0 + v1, then + v2 ..., then times w (in float32).
                acc = src[cols[:, 0]]
                for k in range(1, d + 1):
                    np.add(acc, src[cols[:, k]], out=acc)
                np.multiply(acc, self.wshare[ids].astype(np.float32)[:, None], out=acc)
            else:
                assert self.wpos is not None
                wp = self.wpos[ids].astype(np.float32)
                acc = src[cols[:, 0]] * wp[:, :1]
                for k in range(1, d + 1):
                    np.add(acc, src[cols[:, k]] * wp[:, k:k + 1], out=acc)
            block[ids, r & 1] = acc
