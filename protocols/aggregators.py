"""Aggregators: plain functions from [(weight, tensors), ...] to tensors.

Every aggregator has the signature `fn(items, **params) -> Tensors`, where `items` is a
sequence of `(weight, {name: float32 array})` with identical names and shapes, and returns
fresh float32 arrays (inputs are never modified and may be read-only). Callers pass `items`
sorted by sender id (never arrival order); that order is the only one results depend on:
ties (Krum scores) go to the earlier item. `mean` and `weighted_mean` sum exactly
(`protocols.exactsum`): their result does not depend on the items' order or grouping at all,
and is within 1 float32 ulp of the exact mean. Only `weighted_mean` uses the weights (sample
counts, say); the robust ones treat all items alike. Registered by name in the "aggregators"
group (pyproject entry points).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from protocols.exactsum import Accumulator, Running

Tensors = dict[str, np.ndarray]
Items = Sequence[tuple[float, Mapping[str, np.ndarray]]]


def _names(items: Items, what: str) -> list[str]:
    if not items:
        raise ValueError(f"{what}: nothing to aggregate (no items)")
    names = sorted(items[0][1])
    for i, (_, t) in enumerate(items):
        if sorted(t) != names:
            raise ValueError(f"{what}: item {i} has tensors {sorted(t)}; item 0 has {names}")
    return names


def mean(items: Items) -> Tensors:
    """The unweighted mean of the items (exact sum, see `protocols.exactsum`)."""
    _names(items, "mean")
    acc = Accumulator()
    for _, t in items:
        acc.add(1.0, t)
    return acc.mean(weighted=False)


def check_weights(weights: Sequence[float], what: str = "weighted_mean") -> None:
    """ValueError unless the weights are finite, >= 0 and not all 0."""
    w = np.array([float(x) for x in weights], np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or not w.sum() > 0:
        raise ValueError(f"{what}: weights must be finite, >= 0 and not all 0; got "
                         f"{w.tolist()}")


def weighted_mean(items: Items) -> Tensors:
    """The mean weighted by each item's weight (FedAvg: sample counts); weights must be >= 0
    with a positive sum. The sum is exact (`protocols.exactsum`), so the result does not
    depend on the items' order."""
    _names(items, "weighted_mean")
    check_weights([w for w, _ in items])
    acc = Accumulator()
    for w, t in items:
        acc.add(w, t)
    return acc.mean()


def streaming(fn: Any) -> Callable[[], Running] | None:
    """For an aggregator that is a (weighted) mean, a factory of running sums that give the
    same result (`acc.mean(weighted)` after `acc.add(w, t)` per item, in any order): a
    caller may then sum replies as they arrive instead of holding them. None for the others
    (median, Krum, ...), which need every item at once."""
    return Running if fn in (mean, weighted_mean) else None


def median(items: Items) -> Tensors:
    """The coordinate-wise median (mean of the two middle values for an even count)."""
    names = _names(items, "median")
    return {n: np.median(np.stack([t[n] for _, t in items]), axis=0).astype(np.float32)
            for n in names}


def trimmed_mean(items: Items, trim: float = 0.1, f: int | None = None) -> Tensors:
    """The coordinate-wise mean after dropping the `f` largest and `f` smallest values
    (`f` defaults to floor(trim * n)); tolerates up to f arbitrary items. Needs 2f < n."""
    names = _names(items, "trimmed_mean")
    n = len(items)
    k = int(np.floor(trim * n)) if f is None else int(f)
    if k < 0 or 2 * k >= n:
        raise ValueError(f"trimmed_mean: trimming {k} per side (trim={trim}, f={f}) leaves "
                         f"nothing of {n} items; need 0 <= 2f < n")
    out: Tensors = {}
    for name in names:
        s = np.sort(np.stack([t[name] for _, t in items]), axis=0)[k:n - k]
        out[name] = s.astype(np.float64).mean(axis=0).astype(np.float32)
    return out


def _krum_scores(items: Items, names: list[str], f: int, what: str) -> np.ndarray:
    n = len(items)
    if f < 0 or n < 2 * f + 3:
        raise ValueError(f"{what}: f = {f} with {n} items; Krum needs f >= 0 and n >= 2f + 3")
    # Pairwise squared distances computed elementwise (not through a Gram matrix) so each
    # d(i, j) is bit-identical whatever position i and j hold.
    d = np.zeros((n, n), np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            s = 0.0
            for name in names:
                diff = np.subtract(items[i][1][name], items[j][1][name], dtype=np.float64)
                s += float(np.dot(diff.ravel(), diff.ravel()))
            d[i, j] = d[j, i] = s
    closest = n - f - 2
    return np.array([np.sort(np.delete(d[i], i))[:closest].sum() for i in range(n)])


def krum(items: Items, f: int = 0) -> Tensors:
    """Krum (Blanchard et al. 2017): the item whose n - f - 2 nearest others are closest
    (sum of squared distances); tolerates f Byzantine items when n >= 2f + 3."""
    names = _names(items, "krum")
    best = int(np.argmin(_krum_scores(items, names, f, "krum")))  # first minimum: earliest item
    return {n: np.array(items[best][1][n], np.float32) for n in names}


def multi_krum(items: Items, f: int = 0, m: int | None = None) -> Tensors:
    """Multi-Krum: the mean of the `m` best-scored items (default n - f), summed in score
    order so the result does not depend on input order when scores differ."""
    names = _names(items, "multi_krum")
    n = len(items)
    m = n - f if m is None else int(m)
    if not 1 <= m <= n:
        raise ValueError(f"multi_krum: m = {m} with {n} items; need 1 <= m <= n")
    scores = _krum_scores(items, names, f, "multi_krum")
    chosen = sorted(range(n), key=lambda i: (scores[i], i))[:m]
    return mean([items[i] for i in chosen])


__all__ = ["Accumulator", "Items", "Tensors", "check_weights", "krum", "mean", "median",
           "multi_krum", "streaming", "trimmed_mean", "weighted_mean"]
