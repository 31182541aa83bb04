"""Aggregators: plain functions from [(weight, tensors), ...] to tensors.

Every aggregator has the signature `fn(items, **params) -> Tensors`, where `items` is a
sequence of `(weight, {name: float32 array})` with identical names and shapes, and returns
fresh float32 arrays (inputs are never modified and may be read-only). Callers pass `items`
sorted by sender id (never arrival order); that order is the only one results depend on:
ties (Krum scores) go to the earlier item, and sums run in that order. Means accumulate in
float64 and round once to float32, so the result is the exactly rounded mean up to float64
error. Only `weighted_mean` uses the weights (sample counts, say); the robust ones treat all
items alike. Registered by name in the "aggregators" group (pyproject entry points).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

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


# Elements per block of a weighted sum: the float64 accumulator and scratch (2 x 512 KiB)
# stay in cache while every item's slice is added, so big tensors stream through once.
BLOCK = 1 << 16


def _weighted_sum(items: Items, names: list[str], weights: Sequence[float]) -> Tensors:
    """sum_i weights[i] * items[i] per tensor, in item order, accumulated in float64."""
    w64 = [np.float64(w) for w in weights]  # a Python float would multiply in float32
    out: Tensors = {}
    for name in names:
        arrays = [np.asarray(t[name]) for _, t in items]
        shape = arrays[0].shape
        for arr in arrays:
            if arr.shape != shape:
                raise ValueError(f"tensor {name!r} has shape {arr.shape} in one item and "
                                 f"{shape} in another")
        flat = [arr.ravel() for arr in arrays]
        size = flat[0].size
        res = np.empty(size, np.float32)
        acc, tmp = np.empty(min(size, BLOCK)), np.empty(min(size, BLOCK))
        for lo in range(0, size, BLOCK):
            hi = min(lo + BLOCK, size)
            a, t = acc[:hi - lo], tmp[:hi - lo]
            np.multiply(flat[0][lo:hi], w64[0], out=a, dtype=np.float64)
            for w, f in zip(w64[1:], flat[1:]):
                np.multiply(f[lo:hi], w, out=t, dtype=np.float64)
                a += t
            res[lo:hi] = a
        out[name] = res.reshape(shape)
    return out


def mean(items: Items) -> Tensors:
    """The unweighted mean of the items."""
    names = _names(items, "mean")
    return _weighted_sum(items, names, [1.0 / len(items)] * len(items))


def weighted_mean(items: Items) -> Tensors:
    """The mean weighted by each item's weight (FedAvg: sample counts); weights must be >= 0
    with a positive sum."""
    names = _names(items, "weighted_mean")
    w = np.array([float(w) for w, _ in items], np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weighted_mean: weights must be finite, >= 0 and not all 0; got "
                         f"{w.tolist()}")
    return _weighted_sum(items, names, list(w / w.sum()))


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


__all__ = ["Items", "Tensors", "krum", "mean", "median", "multi_krum", "trimmed_mean",
           "weighted_mean"]
