"""Partitioners: which samples of a dataset each client holds, seeded and vectorised.

`[data.partition] kind` is one of (flwr-datasets names in brackets):

- `iid` (IidPartitioner): a seeded permutation cut into near-equal parts.
- `dirichlet` (DirichletPartitioner, same definition and same draws, so results compare):
  per class (in order of first appearance), proportions ~ Dir(alpha) over clients; with
  `self_balancing`, clients already above the average size get none of later classes; the
  whole draw repeats until every client has >= `min_partition_size` samples (at most
  `max_tries` times, then an error); each client's indices are then shuffled.
  Keys: `alpha` (> 0, or one value per client), `min_partition_size` (default 10),
  `self_balancing` (default false), `shuffle` (default true), `max_tries` (default 10).
- `pathological` (PathologicalPartitioner): `classes_per_client` classes per client
  (`class_assignment` = "random" | "deterministic" | "first-deterministic"); each class's
  samples are split evenly among the clients holding it; classes nobody holds stay unused.
- `shards` (McMahan et al. 2017): sort by label, cut into clients x `shards_per_client`
  equal shards, deal them out at random.
- `quantity`: client sizes from `distribution` = "lognormal" (`sigma`) or "powerlaw"
  (`exponent`), at least `min_partition_size` each, samples dealt at random.
- `natural` (NaturalIdPartitioner): one client per value of the dataset's `group` column
  (sorted), the first `[workload] clients` of them.
- `module:function` (declared with `@declare("partitioners")`): called as
  `fn(labels, clients, rng, **other_keys)`, returns one index array per client.

A `Partition` keeps all clients in two arrays (sample indices grouped by client, and client
boundaries), so 10,000 clients cost what their indices cost. `holdout` splits every client into
a training and a held-out part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel.options import ConfigError

KINDS = ("iid", "dirichlet", "pathological", "shards", "quantity", "natural")
DEFAULTS: dict[str, dict[str, Any]] = {
    "iid": {},
    "dirichlet": {"alpha": None, "min_partition_size": 10, "self_balancing": False,
                  "shuffle": True, "max_tries": 10},
    "pathological": {"classes_per_client": 2, "class_assignment": "random"},
    "shards": {"shards_per_client": 2},
    "quantity": {"distribution": "lognormal", "sigma": 1.0, "exponent": 1.5,
                 "min_partition_size": 1},
    "natural": {},
}
ASSIGNMENTS = ("random", "deterministic", "first-deterministic")


@dataclass(frozen=True)
class Partition:
    """Clients' sample indices: client i holds `indices[bounds[i]:bounds[i + 1]]`."""

    indices: np.ndarray
    bounds: np.ndarray

    @classmethod
    def from_lists(cls, parts: Sequence[np.ndarray]) -> Partition:
        """The partition whose client i holds `parts[i]` (in that order)."""
        sizes = np.array([len(p) for p in parts], np.int64)
        idx = np.concatenate([np.asarray(p, np.int64) for p in parts]) if parts else \
            np.zeros(0, np.int64)
        return cls(idx, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    @classmethod
    def from_owner(cls, samples: np.ndarray, owner: np.ndarray, clients: int) -> Partition:
        """Sample `samples[j]` goes to client `owner[j]`; within a client, order is kept."""
        order = np.argsort(owner, kind="stable")
        sizes = np.bincount(owner, minlength=clients)
        return cls(np.asarray(samples, np.int64)[order],
                   np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    @property
    def clients(self) -> int:
        """Number of clients."""
        return len(self.bounds) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Samples per client."""
        return np.diff(self.bounds)

    def __getitem__(self, client: int) -> np.ndarray:
        return self.indices[self.bounds[client]:self.bounds[client + 1]]


def validate(section: Mapping[str, Any]) -> dict[str, Any]:
    """`[data.partition]` merged over its kind's defaults; ConfigError names a bad key or
    value. Unknown kinds of the form module:function keep their keys as given."""
    from kernel.options import options
    from kernel.registry import names

    kind = section.get("kind", "iid")
    if not isinstance(kind, str) or (kind not in KINDS and ":" not in kind
                                     and kind not in names("partitioners")):
        raise ConfigError(f"[data.partition] kind = {kind!r} is not allowed; choose one of "
                          f"{', '.join(KINDS)} (or give 'module:function')")
    rest = {k: v for k, v in section.items() if k != "kind"}
    if kind not in KINDS:
        return {"kind": kind, **rest}
    o = options("data.partition", rest, DEFAULTS[kind],
                choices={"class_assignment": ASSIGNMENTS,
                         "distribution": ("lognormal", "powerlaw")})

    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"[data.partition] {key} = {o[key]!r}; expected {expected}")

    if kind == "dirichlet":
        a = o["alpha"]
        if a is None:
            raise ConfigError("[data.partition] alpha is missing; kind = 'dirichlet' needs a "
                              "concentration alpha > 0 (small: skewed labels, large: near IID)")
        values = a if isinstance(a, list) else [a]
        if not values or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                 and v > 0 for v in values):
            raise bad("alpha", "a number > 0 (or a list of them, one per client)")
        if o["max_tries"] < 1:
            raise bad("max_tries", "an integer >= 1")
    for key, low in (("min_partition_size", 0), ("classes_per_client", 1),
                     ("shards_per_client", 1)):
        if key in o and o[key] < low:
            raise bad(key, f"an integer >= {low}")
    for key in ("sigma", "exponent"):
        if key in o and not o[key] > 0:
            raise bad(key, "a number > 0")
    return {"kind": kind, **o}


def partition(opts: Mapping[str, Any], labels: np.ndarray, clients: int, seed: int,
              group: np.ndarray | None = None) -> Partition:
    """Split samples 0..len(labels)-1 over `clients` as validated `opts` say, seeded."""
    n = len(labels)
    kind = opts["kind"]
    if clients > n:
        raise ConfigError(f"[workload] clients = {clients} is more than the {n} training "
                          f"samples to partition; expected at most {n}")
    rng = np.random.default_rng(seed)
    params = {k: v for k, v in opts.items() if k != "kind"}
    if kind == "iid":
        return iid(n, clients, rng)
    if kind == "dirichlet":
        return dirichlet(labels, clients, rng, **params)
    if kind == "pathological":
        return pathological(labels, clients, rng, **params)
    if kind == "shards":
        return shards(labels, clients, rng, **params)
    if kind == "quantity":
        return quantity(n, clients, rng, **params)
    if kind == "natural":
        if group is None:
            raise ConfigError("[data.partition] kind = 'natural' needs a dataset with a group "
                              "column (npz 'group', LEAF writers, or a dataset function's "
                              "'group')")
        return natural(group, clients)
    return _user(kind, labels, clients, rng, params)


def iid(n: int, clients: int, rng: np.random.Generator) -> Partition:
    """A permutation of 0..n-1 cut into `clients` parts whose sizes differ by at most one."""
    sizes = np.full(clients, n // clients, np.int64)
    sizes[: n % clients] += 1
    return Partition(rng.permutation(n).astype(np.int64),
                     np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def _classes_in_order(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Distinct labels in order of first appearance and, per label, its sample indices."""
    uniq, first = np.unique(labels, return_index=True)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(np.searchsorted(uniq, labels), minlength=len(uniq))
    per = np.split(order, np.cumsum(counts)[:-1])
    by_appearance = np.argsort(first, kind="stable")
    return uniq[by_appearance], [per[i] for i in by_appearance]


def dirichlet(labels: np.ndarray, clients: int, rng: np.random.Generator, *,
              alpha: float | Sequence[float], min_partition_size: int = 10,
              self_balancing: bool = False, shuffle: bool = True,
              max_tries: int = 10) -> Partition:
    """flwr-datasets' DirichletPartitioner (see the module doc), vectorised over clients."""
    alphas = np.asarray(alpha, np.float64)
    if alphas.ndim == 0:
        alphas = np.full(clients, float(alphas))
    if alphas.shape != (clients,):
        raise ConfigError(f"[data.partition] alpha has {alphas.size} values; expected one "
                          f"number or one per client ({clients})")
    n = len(labels)
    if min_partition_size * clients > n:
        raise ConfigError(f"[data.partition] min_partition_size = {min_partition_size} for "
                          f"{clients} clients needs {min_partition_size * clients} samples; "
                          f"the dataset has {n}")
    _, per_class = _classes_in_order(labels)
    average = n / clients
    ids = np.arange(clients)
    for _ in range(max_tries):
        sizes = np.zeros(clients, np.int64)
        owners = []
        for members in per_class:
            p = rng.dirichlet(alphas)
            if self_balancing:
                p = np.where(sizes > average, 0.0, p)
                p = p / np.cumsum(p)[-1]  # a left-to-right sum, as Python's sum() over floats
            cuts = np.minimum((np.cumsum(p) * len(members)).astype(np.int64)[:-1],
                              len(members))
            counts = np.diff(np.concatenate([[0], np.maximum.accumulate(cuts),
                                             [len(members)]]))
            owners.append(np.repeat(ids, counts))
            sizes += counts
        if sizes.min() >= min_partition_size:
            break
    else:
        raise ConfigError(
            f"[data.partition] dirichlet: no draw in {max_tries} tries gave every client at "
            f"least min_partition_size = {min_partition_size} samples (smallest: "
            f"{int(sizes.min())}); raise alpha, lower min_partition_size or use fewer clients")
    part = Partition.from_owner(np.concatenate(per_class), np.concatenate(owners), clients)
    if shuffle:
        for i in range(clients):  # in client order, as flwr-datasets shuffles
            rng.shuffle(part.indices[part.bounds[i]:part.bounds[i + 1]])
    return part


def pathological(labels: np.ndarray, clients: int, rng: np.random.Generator, *,
                 classes_per_client: int = 2, class_assignment: str = "random") -> Partition:
    """Each client holds `classes_per_client` classes; a class is split evenly among its
    holders (in client order); each client's indices are then shuffled."""
    classes, per_class = _classes_in_order(labels)
    c = len(classes)
    if classes_per_client > c:
        raise ConfigError(f"[data.partition] classes_per_client = {classes_per_client}; the "
                          f"dataset has only {c} classes")
    holders: list[list[int]] = [[] for _ in range(c)]
    for i in range(clients):
        if class_assignment == "deterministic":
            chosen = [(i + j) % c for j in range(classes_per_client)]
        elif class_assignment == "first-deterministic":
            others = [k for k in range(c) if k != i % c]
            picked = rng.choice(len(others), classes_per_client - 1, replace=False)
            chosen = [i % c, *(others[int(j)] for j in picked)]
        else:
            chosen = [int(k) for k in rng.choice(c, classes_per_client, replace=False)]
        for k in chosen:
            holders[k].append(i)
    samples, owners = [], []
    for k, members in enumerate(per_class):
        if holders[k]:
            parts = np.array_split(members, len(holders[k]))
            samples.append(members)
            owners.append(np.repeat(holders[k], [len(p) for p in parts]))
    part = Partition.from_owner(np.concatenate(samples), np.concatenate(owners), clients)
    for i in range(clients):
        rng.shuffle(part.indices[part.bounds[i]:part.bounds[i + 1]])
    return part


def shards(labels: np.ndarray, clients: int, rng: np.random.Generator, *,
           shards_per_client: int = 2) -> Partition:
    """McMahan et al.: sort by label, cut clients x k equal shards, deal k to each client."""
    n_shards = clients * shards_per_client
    if n_shards > len(labels):
        raise ConfigError(f"[data.partition] shards_per_client = {shards_per_client} for "
                          f"{clients} clients makes {n_shards} shards of {len(labels)} samples; "
                          f"expected at most one shard per sample")
    order = np.argsort(labels, kind="stable")
    shard_of = np.repeat(np.arange(n_shards),
                         [len(s) for s in np.array_split(order, n_shards)])
    owner_of_shard = np.empty(n_shards, np.int64)
    owner_of_shard[rng.permutation(n_shards)] = np.arange(n_shards) // shards_per_client
    return Partition.from_owner(order, owner_of_shard[shard_of], clients)


def quantity(n: int, clients: int, rng: np.random.Generator, *, distribution: str = "lognormal",
             sigma: float = 1.0, exponent: float = 1.5, min_partition_size: int = 1) -> Partition:
    """Sizes proportional to lognormal(0, sigma) or Pareto(exponent) weights, at least
    `min_partition_size` each (largest remainders get the leftovers); samples at random."""
    if min_partition_size * clients > n:
        raise ConfigError(f"[data.partition] min_partition_size = {min_partition_size} for "
                          f"{clients} clients needs {min_partition_size * clients} samples; "
                          f"the dataset has {n}")
    w = rng.lognormal(0.0, sigma, clients) if distribution == "lognormal" \
        else rng.pareto(exponent, clients) + 1.0
    spare = n - min_partition_size * clients
    share = w / w.sum() * spare
    sizes = np.floor(share).astype(np.int64)
    left = spare - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:left]] += 1
    sizes += min_partition_size
    return Partition(rng.permutation(n).astype(np.int64),
                     np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def natural(group: np.ndarray, clients: int) -> Partition:
    """Client i holds the samples of the i-th smallest group value."""
    values, inverse = np.unique(group, return_inverse=True)
    if clients > len(values):
        raise ConfigError(f"[workload] clients = {clients} but the dataset has only "
                          f"{len(values)} groups for kind = 'natural'; expected at most "
                          f"{len(values)}")
    keep = inverse < clients
    return Partition.from_owner(np.flatnonzero(keep), inverse[keep], clients)


def _user(kind: str, labels: np.ndarray, clients: int, rng: np.random.Generator,
          params: Mapping[str, Any]) -> Partition:
    from protocols.learning.names import resolve

    fn: Callable[..., Any] = resolve("partitioners", kind, "[data.partition] kind", KINDS)
    parts = fn(labels, clients, rng, **params)
    if not isinstance(parts, Sequence) or len(parts) != clients:
        raise ConfigError(f"[data.partition] kind = {kind!r} returned "
                          f"{type(parts).__name__}; expected a list of {clients} index arrays")
    part = Partition.from_lists([np.asarray(p, np.int64).ravel() for p in parts])
    idx = part.indices
    if idx.size and (idx.min() < 0 or idx.max() >= len(labels)):
        raise ConfigError(f"[data.partition] kind = {kind!r} returned index "
                          f"{int(idx.min() if idx.min() < 0 else idx.max())}; expected "
                          f"0..{len(labels) - 1}")
    if len(np.unique(idx)) != len(idx):
        raise ConfigError(f"[data.partition] kind = {kind!r} gave some sample to two clients")
    return part


def holdout(part: Partition, fraction: float, rng: np.random.Generator
            ) -> tuple[Partition, Partition]:
    """(train, held-out): each client's samples in a seeded random order, the last
    floor(fraction x size) of them held out (at least one when fraction > 0 and the client
    has two or more)."""
    sizes = part.sizes
    owner = np.repeat(np.arange(part.clients), sizes)
    order = np.lexsort((rng.random(len(part.indices)), owner))
    mixed = part.indices[order]
    held = np.floor(fraction * sizes).astype(np.int64)
    if fraction > 0:
        held = np.where((held == 0) & (sizes >= 2), 1, held)
    rank = np.arange(len(mixed)) - np.repeat(part.bounds[:-1], sizes)
    is_held = rank >= np.repeat(sizes - held, sizes)
    train = Partition.from_owner(mixed[~is_held], owner[~is_held], part.clients)
    hold = Partition.from_owner(mixed[is_held], owner[is_held], part.clients)
    return train, hold
