"""Who talks to whom: seeded graph generators and gossip mixing weights.

Every generator returns a `Graph` whose neighbour lists are sorted tuples, so iteration order never
depends on how the graph was built. Mixing rules (for undirected graphs):

- "uniform": w_ij = 1/(d_i + 1) for i's neighbours and itself. Rows sum to 1; on a regular graph
  the matrix is symmetric and doubly stochastic (the mean is preserved), on an irregular one it
  is only row-stochastic (consensus is reached, but on a degree-weighted average).
- "max_degree": w_ij = 1/(d_max + 1), w_ii = 1 - d_i/(d_max + 1): doubly stochastic on any graph.
- "metropolis": w_ij = 1/(1 + max(d_i, d_j)), w_ii = 1 - sum_j w_ij (Metropolis-Hastings):
  symmetric and doubly stochastic on any graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel.options import ConfigError, options

KINDS = ("complete", "ring", "ring_lattice", "torus", "random_regular", "erdos_renyi",
         "random_out", "edges")
RULES = ("uniform", "max_degree", "metropolis")
DEFAULTS: dict[str, Any] = {
    "kind": "ring",
    "degree": 4,  # ring_lattice, random_regular; out-degree for random_out
    "p": 0.1,  # erdos_renyi edge probability
    "rows": 0,  # torus rows; 0 = the largest divisor of n not above sqrt(n)
    "seed": 0,  # graph seed, mixed with the run seed
    "connected": True,  # erdos_renyi / random_out: redraw until (strongly) connected
    "directed": False,  # ring: i -> i+1 only; erdos_renyi: each ordered pair; edges: as given
    "edges": [],  # kind = "edges": [[src, dst], ...]
    "weights": "uniform",
}
_MAX_TRIES = 1000


@dataclass(frozen=True)
class Graph:
    """A graph on nodes 0..n-1 as sorted out-neighbour tuples (symmetric when undirected)."""

    n: int
    out: tuple[tuple[int, ...], ...]
    directed: bool = False

    def neighbours(self, i: int) -> tuple[int, ...]:
        """Out-neighbours of node `i` (all neighbours when undirected)."""
        return self.out[i]

    def in_neighbours(self) -> tuple[tuple[int, ...], ...]:
        """In-neighbour tuples of every node, sorted."""
        ins: list[list[int]] = [[] for _ in range(self.n)]
        for i, outs in enumerate(self.out):
            for j in outs:
                ins[j].append(i)
        return tuple(tuple(sorted(x)) for x in ins)

    def degrees(self) -> list[int]:
        """Out-degree of every node."""
        return [len(o) for o in self.out]

    def edges(self) -> list[tuple[int, int]]:
        """All (src, dst) pairs, sorted; both directions for an undirected graph."""
        return [(i, j) for i, outs in enumerate(self.out) for j in outs]

    def is_connected(self) -> bool:
        """Strongly connected (for undirected graphs: connected)."""
        if self.n <= 1:
            return True
        if not _reaches_all(self.out):
            return False
        return not self.directed or _reaches_all(self.in_neighbours())


def _reaches_all(adj: Sequence[Sequence[int]]) -> bool:
    seen = [False] * len(adj)
    seen[0] = True
    stack = [0]
    while stack:
        for j in adj[stack.pop()]:
            if not seen[j]:
                seen[j] = True
                stack.append(j)
    return all(seen)


def _from_pairs(n: int, pairs: Sequence[tuple[int, int]], directed: bool) -> Graph:
    adj: list[set[int]] = [set() for _ in range(n)]
    for i, j in pairs:
        if i != j:
            adj[i].add(j)
            if not directed:
                adj[j].add(i)
    return Graph(n, tuple(tuple(sorted(a)) for a in adj), directed)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ConfigError(f"[protocol.topology] {what}")


def complete(n: int) -> Graph:
    """Every node neighbours every other."""
    return Graph(n, tuple(tuple(j for j in range(n) if j != i) for i in range(n)))


def ring(n: int, directed: bool = False) -> Graph:
    """Node i neighbours i-1 and i+1 (mod n); directed: i -> i+1 only."""
    return _from_pairs(n, [(i, (i + 1) % n) for i in range(n)], directed)


def ring_lattice(n: int, degree: int) -> Graph:
    """Node i neighbours i±1 .. i±degree/2 (mod n)."""
    _need(degree % 2 == 0 and 0 < degree < n,
          f"ring_lattice degree = {degree} must be even and between 2 and n-1 = {n - 1}")
    return _from_pairs(n, [(i, (i + d) % n) for i in range(n) for d in range(1, degree // 2 + 1)],
                       False)


def torus(n: int, rows: int = 0) -> Graph:
    """A rows x (n/rows) grid wrapped both ways; node r*cols + c neighbours its 4 grid
    neighbours (fewer when a side is 1 or 2)."""
    if rows == 0:
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    _need(rows > 0 and n % rows == 0, f"torus rows = {rows} must divide the node count {n}")
    cols = n // rows
    pairs = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            pairs.append((i, r * cols + (c + 1) % cols))
            pairs.append((i, ((r + 1) % rows) * cols + c))
    return _from_pairs(n, pairs, False)


def random_regular(n: int, degree: int, seed: int) -> Graph:
    """A uniformly-ish random simple `degree`-regular graph (Steger-Wormald pairing with
    restarts, the algorithm networkx uses), seeded."""
    _need(0 <= degree < n and (n * degree) % 2 == 0,
          f"random_regular needs 0 <= degree < n and n*degree even; got n = {n}, degree = {degree}")
    rng = np.random.default_rng([seed, n, degree, 1])
    for _ in range(_MAX_TRIES):
        pairs = _pair_stubs(n, degree, rng)
        if pairs is not None:
            return _from_pairs(n, sorted(pairs), False)
    raise ConfigError(f"[protocol.topology] no random {degree}-regular graph on {n} nodes found "
                      f"in {_MAX_TRIES} tries")


def _pair_stubs(n: int, degree: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    edges: set[tuple[int, int]] = set()
    stubs = [i for i in range(n) for _ in range(degree)]
    while stubs:
        leftover: dict[int, int] = {}
        order = rng.permutation(len(stubs))
        for a, b in zip(order[::2], order[1::2]):
            s1, s2 = sorted((stubs[a], stubs[b]))
            if s1 != s2 and (s1, s2) not in edges:
                edges.add((s1, s2))
            else:
                leftover[s1] = leftover.get(s1, 0) + 1
                leftover[s2] = leftover.get(s2, 0) + 1
        if leftover and not _pairable(edges, sorted(leftover)):
            return None
        stubs = [s for s in sorted(leftover) for _ in range(leftover[s])]
    return edges


def _pairable(edges: set[tuple[int, int]], nodes: list[int]) -> bool:
    return any((a, b) not in edges for i, a in enumerate(nodes) for b in nodes[i + 1:])


def erdos_renyi(n: int, p: float, seed: int, *, directed: bool = False,
                connected: bool = True) -> Graph:
    """G(n, p): each pair (each ordered pair when directed) is an edge with probability p;
    with `connected`, redrawn until (strongly) connected."""
    _need(0.0 <= p <= 1.0, f"erdos_renyi p = {p} must be in [0, 1]")
    rng = np.random.default_rng([seed, n, 2])
    for _ in range(_MAX_TRIES):
        mask = rng.random((n, n)) < p
        np.fill_diagonal(mask, False)
        if not directed:
            mask = np.triu(mask)
        src, dst = np.nonzero(mask)
        g = _from_pairs(n, list(zip(src.tolist(), dst.tolist())), directed)
        if not connected or g.is_connected():
            return g
    raise ConfigError(f"[protocol.topology] no connected G({n}, {p}) in {_MAX_TRIES} draws; "
                      f"raise p or set connected = false")


def random_out(n: int, degree: int, seed: int, *, connected: bool = True) -> Graph:
    """Directed: every node has `degree` distinct random out-neighbours. With `connected`, one
    of them is its successor on a random cycle through all nodes, so the graph is strongly
    connected by construction."""
    _need(0 < degree < n, f"random_out degree = {degree} must be between 1 and n-1 = {n - 1}")
    rng = np.random.default_rng([seed, n, degree, 3])
    succ: dict[int, int] = {}
    if connected:
        cycle = rng.permutation(n).tolist()
        succ = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
    out = []
    for i in range(n):
        fixed = [succ[i]] if connected else []
        others = [j for j in range(n) if j != i and j not in fixed]
        pick = rng.choice(len(others), size=degree - len(fixed), replace=False).tolist()
        out.append(tuple(sorted(fixed + [others[k] for k in pick])))
    return Graph(n, tuple(out), True)


def from_edges(n: int, edges: Sequence[Sequence[int]], directed: bool = False) -> Graph:
    """The graph of an explicit edge list [[src, dst], ...] (both directions unless directed)."""
    pairs = []
    for k, e in enumerate(edges):
        if (not isinstance(e, Sequence) or len(e) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in e)):
            raise ConfigError(f"[protocol.topology] edges[{k}] = {e!r}; expected [src, dst] ints")
        if not (0 <= e[0] < n and 0 <= e[1] < n) or e[0] == e[1]:
            raise ConfigError(f"[protocol.topology] edges[{k}] = {list(e)}: ids must differ and "
                              f"lie in 0..{n - 1}")
        pairs.append((e[0], e[1]))
    return _from_pairs(n, pairs, directed)


def from_config(section: Mapping[str, Any], n: int, seed: int = 0) -> tuple[Graph, str]:
    """Build the graph a `[protocol.topology]` table describes on `n` nodes, with the mixing
    rule it names; `seed` (the run seed) is mixed into the random kinds' seed."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"[protocol] topology = {section!r}; expected a table")
    o = options("protocol.topology", section, DEFAULTS,
                choices={"kind": KINDS, "weights": RULES})
    _need(n >= 1, f"needs at least one node, got {n}")
    kind, gseed = o["kind"], _mix_seed(seed, o["seed"])
    if o["directed"] and kind not in ("ring", "erdos_renyi", "edges", "random_out"):
        raise ConfigError(f"[protocol.topology] directed = true is not available for kind "
                          f"{kind!r}; use ring, erdos_renyi, random_out or edges")
    if kind == "complete":
        g = complete(n)
    elif kind == "ring":
        g = ring(n, o["directed"])
    elif kind == "ring_lattice":
        g = ring_lattice(n, o["degree"])
    elif kind == "torus":
        g = torus(n, o["rows"])
    elif kind == "random_regular":
        g = random_regular(n, o["degree"], gseed)
    elif kind == "erdos_renyi":
        g = erdos_renyi(n, o["p"], gseed, directed=o["directed"], connected=o["connected"])
    elif kind == "random_out":
        g = random_out(n, o["degree"], gseed, connected=o["connected"])
    else:
        g = from_edges(n, o["edges"], o["directed"])
    return g, o["weights"]


def _mix_seed(run_seed: int, graph_seed: int) -> int:
    # A stable, order-sensitive mix (no hash(): it is salted per process for str).
    return (run_seed * 1_000_003 + graph_seed) % (2**63)


def mixing_weights(g: Graph, rule: str = "uniform") -> tuple[tuple[tuple[int, float], ...], ...]:
    """For each node i, its (j, w_ij) pairs over its neighbours and itself, sorted by j."""
    if g.directed:
        raise ValueError("mixing weights need an undirected graph; push-sum handles directed ones")
    dmax = max((len(o) for o in g.out), default=0)
    return tuple(mixing_row(g.out, i, rule, dmax) for i in range(g.n))


def mixing_row(out: Sequence[Sequence[int]], i: int, rule: str = "uniform",
               dmax: int | None = None) -> tuple[tuple[int, float], ...]:
    """Node i's row of `mixing_weights` for an undirected graph given as neighbour lists
    (`dmax`, the largest degree, is computed when not given)."""
    outs = out[i]
    d = len(outs)
    if rule == "uniform":
        w = {j: 1.0 / (d + 1) for j in outs}
        w[i] = 1.0 / (d + 1)
    elif rule == "max_degree":
        if dmax is None:
            dmax = max((len(o) for o in out), default=0)
        w = {j: 1.0 / (dmax + 1) for j in outs}
        w[i] = 1.0 - d / (dmax + 1)
    elif rule == "metropolis":
        w = {j: 1.0 / (1 + max(d, len(out[j]))) for j in outs}
        w[i] = 1.0 - math.fsum(w.values())
    else:
        raise ValueError(f"unknown mixing rule {rule!r}; choose one of {', '.join(RULES)}")
    return tuple((j, w[j]) for j in sorted(w))


def mixing_matrix(g: Graph, rule: str = "uniform") -> np.ndarray:
    """The dense n x n float64 matrix W of `mixing_weights` (row i holds node i's weights)."""
    m = np.zeros((g.n, g.n))
    for i, row in enumerate(mixing_weights(g, rule)):
        for j, w in row:
            m[i, j] = w
    return m
