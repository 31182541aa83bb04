"""Patterns several protocols share: gathering replies, seeded sampling and rngs, resolving
an aggregator by name, and small operations on models held as named float32 arrays."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kernel.api import Context
from kernel.options import ConfigError
from kernel.registry import UnknownName, load

Tensors = dict[str, np.ndarray]
Aggregate = Callable[[Sequence[tuple[float, Mapping[str, np.ndarray]]]], Tensors]


class Gather:
    """Replies to one request (`tag`, e.g. a round number), one per sender: complete when
    `need` have arrived; `expire()` ends it early (the deadline). Replies for another tag,
    from unexpected senders, repeated, or after it ended are refused and counted."""

    def __init__(self, tag: Hashable, expected: Iterable[int] | None = None,
                 need: int | None = None) -> None:
        self.tag = tag
        self.expected = frozenset(expected) if expected is not None else None
        if need is None:
            if self.expected is None:
                raise ValueError("Gather needs `need` when any sender may reply")
            need = len(self.expected)
        self.need = need
        self.replies: dict[int, Any] = {}
        self.closed = False
        self.late = 0  # replies refused because they were for an older tag or came too late
        self.refused = 0  # duplicates and unexpected senders

    @property
    def timer_key(self) -> tuple[str, Hashable]:
        """The timer key `arm` uses; compare it in `on_timer`."""
        return ("gather", self.tag)

    def arm(self, ctx: Context, timeout: float | None) -> None:
        """Start the deadline timer (nothing when `timeout` is None)."""
        if timeout is not None:
            ctx.set_timer(timeout, self.timer_key)

    def offer(self, src: int, tag: Hashable, item: Any) -> bool:
        """Take `item` from `src` if it answers this gather while open; True when taken."""
        if tag != self.tag or self.closed:
            self.late += 1
            return False
        if src in self.replies or (self.expected is not None and src not in self.expected):
            self.refused += 1
            return False
        self.replies[src] = item
        return True

    @property
    def complete(self) -> bool:
        """`need` replies have arrived."""
        return len(self.replies) >= self.need

    def close(self, ctx: Context | None = None) -> list[tuple[int, Any]]:
        """End the gather (cancelling its deadline timer) and return (sender, item) pairs
        sorted by sender id: the canonical order to aggregate in."""
        self.closed = True
        if ctx is not None:
            ctx.cancel_timer(self.timer_key)
        return sorted(self.replies.items())

    def __len__(self) -> int:
        return len(self.replies)


def derive_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, *keys): the same on every transport and for
    any event order (e.g. derive_rng(seed, node, round) for one client's round of training)."""
    return np.random.default_rng([seed, *keys])


def sample(rng: np.random.Generator, population: Sequence[int], *, fraction: float | None = None,
           count: int | None = None) -> list[int]:
    """A seeded sample without replacement, sorted: `count` members, or ceil(fraction * n)
    (at least 1), or everyone when both are None."""
    n = len(population)
    if count is None:
        count = n if fraction is None else max(1, int(np.ceil(fraction * n - 1e-9)))
    if not 0 < count <= n:
        raise ValueError(f"cannot sample {count} of {n} (fraction={fraction})")
    if count == n:
        return sorted(population)
    picked = rng.choice(n, size=count, replace=False)
    return sorted(population[int(i)] for i in picked)


def aggregator(name: str, args: Mapping[str, Any] | None = None,
               section: str = "protocol") -> Aggregate:
    """The aggregator registered as `name`, with `args` bound; ConfigError names a bad name
    or argument (checked against the function's signature, now rather than mid-run)."""
    try:
        fn = load("aggregators", name)
    except UnknownName as exc:
        raise ConfigError(f"[{section}] aggregator = {name!r}: {exc}") from None
    args = dict(args or {})
    params = inspect.signature(fn).parameters
    for key in args:
        if key not in params or key == next(iter(params)):
            allowed = [p for p in list(params)[1:]]
            raise ConfigError(f"[{section}] aggregator_args.{key}: aggregator {name!r} takes "
                              f"{', '.join(allowed) or 'no arguments'}")
    if not args:
        return fn  # type: ignore[no-any-return]
    return lambda items: fn(items, **args)  # type: ignore[no-any-return]


# -- models as named float32 arrays ----------------------------------------------------------

def copy(t: Mapping[str, np.ndarray]) -> Tensors:
    """Writable float32 copies (received arrays are read-only views)."""
    return {k: np.array(v, np.float32) for k, v in t.items()}


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], scale: float = 1.0) -> Tensors:
    """a + scale * b, fresh float32 arrays."""
    s = np.float32(scale)
    return {k: (a[k] + s * b[k]).astype(np.float32, copy=False) for k in sorted(a)}


def sub(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Tensors:
    """a - b, fresh float32 arrays."""
    return {k: (a[k] - b[k]).astype(np.float32, copy=False) for k in sorted(a)}


def flatten(t: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors in sorted-name order as one float32 vector."""
    return np.concatenate([np.ravel(t[k]) for k in sorted(t)]).astype(np.float32, copy=False)


def unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray]) -> Tensors:
    """The inverse of `flatten`, with names and shapes taken from `like`."""
    sizes = [int(np.prod(like[k].shape)) for k in sorted(like)]
    if sum(sizes) != len(vec):
        raise ValueError(f"vector of {len(vec)} values for a model of {sum(sizes)}")
    out: Tensors = {}
    i = 0
    for k, n in zip(sorted(like), sizes):
        out[k] = np.array(vec[i:i + n], np.float32).reshape(like[k].shape)
        i += n
    return out


def digest(t: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes: equal models, equal digests."""
    h = hashlib.sha256()
    for k in sorted(t):
        a = np.ascontiguousarray(t[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data)
    return h.hexdigest()
