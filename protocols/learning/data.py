"""The `[data]` section: which dataset, how it is partitioned, what each client holds out.

Keys (`[data]`):
- `dataset` (default "mixture"): see `protocols.learning.datasets`; "mixture" is today's
  synthetic data, made per client from the `[workload]` keys (samples_per_client, ...).
- `holdout` (default 0.0, in [0, 1)): fraction of each client's samples held out for
  per-client evaluation (`learner.evaluate(model, client=i)`).
- `test_fraction` (default 0.2, in [0, 1)): for a dataset without a test split, the seeded
  share of its samples kept aside as the global test set (0: no global test set).
- `classes` (default 0: the largest label + 1): the number of classes, when labels do not show it.
- `seed` (default 0): seeds the test split, the partition and the holdout; the same on every
  transport and independent of `[run] seed`.
- `[data.partition]`: `kind` and its keys, see `protocols.learning.partition` (default iid).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kernel.options import ConfigError, options
from protocols.learning import datasets, partition

DEFAULTS: dict[str, Any] = {"dataset": "mixture", "holdout": 0.0, "test_fraction": 0.2,
                            "classes": 0, "seed": 0, "partition": {}}


def validate(section: Mapping[str, Any]) -> dict[str, Any]:
    """`[data]` merged over DEFAULTS, `[data.partition]` validated; ConfigError names a bad
    key or value."""
    o = options("data", section, DEFAULTS)
    for key in ("holdout", "test_fraction"):
        if not 0 <= o[key] < 1:
            raise ConfigError(f"[data] {key} = {o[key]!r}; expected a number in [0, 1)")
    for key in ("classes", "seed"):
        if o[key] < 0:
            raise ConfigError(f"[data] {key} = {o[key]!r}; expected an integer >= 0")
    if not o["dataset"]:
        raise ConfigError("[data] dataset = ''; expected a dataset name")
    o["partition"] = partition.validate(o["partition"])
    if o["dataset"] == "mixture" and o["partition"]["kind"] != "iid":
        raise ConfigError(f"[data.partition] kind = {o['partition']['kind']!r} needs a dataset "
                          f"of whole arrays; 'mixture' is drawn per client (use digits, npz:PATH, "
                          f"...)")
    return o


class PooledData:
    """A loaded dataset split into clients: `client(i)` (training split), `holdout(i)`,
    `test()`, `samples(i)`; clients are index arrays into one copy of the arrays."""

    def __init__(self, opts: Mapping[str, Any], clients: int) -> None:
        ds = datasets.load(opts["dataset"], opts["classes"] or None)
        self.name, self.classes, self.shape = ds.name, ds.classes, ds.shape
        rng = np.random.default_rng([opts["seed"], 1])
        if ds.x_test is not None and ds.y_test is not None:
            pool = np.arange(len(ds.y))
            self._test: tuple[np.ndarray, np.ndarray] | None = (ds.x_test, ds.y_test)
        else:
            perm = rng.permutation(len(ds.y))
            n_test = int(round(opts["test_fraction"] * len(ds.y)))
            pool = np.sort(perm[n_test:])
            test = np.sort(perm[:n_test])
            self._test = (ds.x[test], ds.y[test]) if n_test else None
        group = ds.group[pool] if ds.group is not None else None
        part = partition.partition(opts["partition"], ds.y[pool], clients,
                                   opts["seed"], group)
        train, held = partition.holdout(part, opts["holdout"],
                                        np.random.default_rng([opts["seed"], 2]))
        # Map partition positions back to dataset rows once, so a client is one index array.
        self.train = partition.Partition(pool[train.indices], train.bounds)
        self.held = partition.Partition(pool[held.indices], held.bounds)
        self.x, self.y = ds.x, ds.y
        self.has_holdout = opts["holdout"] > 0

    def samples(self, client: int) -> int:
        """Training samples of `client`."""
        return int(self.train.bounds[client + 1] - self.train.bounds[client])

    def client(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of `client`'s training split (fresh arrays)."""
        idx = self.train[client]
        return self.x[idx], self.y[idx]

    def holdout(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of `client`'s held-out split."""
        idx = self.held[client]
        return self.x[idx], self.y[idx]

    def test(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The global test set, or None."""
        return self._test


class MixtureData:
    """Today's per-client Gaussian mixture (`protocols.learners.Mixture`), with each client's
    last floor(holdout x n) samples (at least one, for n >= 2) held out."""

    def __init__(self, mixture: Any, holdout: float) -> None:
        self.mixture, self.fraction = mixture, holdout
        self.classes = mixture.classes
        self.shape: tuple[int, ...] = (mixture.dim,)
        self.has_holdout = holdout > 0

    def _held(self, n: int) -> int:
        h = int(np.floor(self.fraction * n))
        return 1 if self.fraction > 0 and h == 0 and n >= 2 else h

    def samples(self, client: int) -> int:
        n = self.mixture.samples(client)
        return n - self._held(n)

    def client(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.mixture.client(client)
        keep = len(y) - self._held(len(y))
        return x[:keep], y[:keep]

    def holdout(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.mixture.client(client)
        keep = len(y) - self._held(len(y))
        return x[keep:], y[keep:]

    def test(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self.mixture.test() if self.mixture.n_test else None
