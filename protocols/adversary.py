"""Malicious clients for FedAvg-family protocols: `[adversary]`, seeded, the same on every
transport.

    [adversary]
    kind = "sign_flip"   # "sign_flip" | "gaussian" | "label_flip" | "alie" | "ipm"
    fraction = 0.2       # of the clients, drawn once with the seed; or
    ids = [1, 5]         # node ids (client i is node i + 1), instead of fraction
    seed = 0             # default: [run] seed
    scale = 1.0          # sign_flip: reply global - scale * update; gaussian: reply
                         #   global + N(0, scale**2) per coordinate
    z = 0.0              # alie: standard deviations to shift; 0 = z_max of Baruch et al.
    epsilon = 0.5        # ipm: reply global - epsilon * mean benign update

Attacks, on updates (reply model - global model):

- `sign_flip`: the update reversed (and scaled); each attacker alone.
- `gaussian`: the update replaced by Gaussian noise, from a generator seeded by (seed, node,
  round).
- `label_flip`: the attacker trains honestly on its data with labels y -> classes - 1 - y.
- `alie` ("a little is enough", Baruch et al. 2019), colluding: every attacker sends
  mean - z * std (coordinate-wise, over the benign updates), with z_max = Phi^-1((n - s) / n),
  s = floor(n / 2 + 1) - m, for n replies of which m are attackers'.
- `ipm` (inner-product manipulation, Xie et al. 2020), colluding: every attacker sends
  -epsilon times the mean benign update.

The colluding attacks need the benign updates of the round. In the simulation the colluders
read them at the server, just before aggregation: the server calls `collude`, which replaces
the attackers' (honestly trained) replies and keeps everything else. So the attack is the same
on every transport, and the aggregator sees only what attackers would send. With no benign
reply in a round the colluders use their own honest updates as the benign estimate.
Round rows list the node ids of the attackers whose replies were aggregated (`attackers`).
"""

from __future__ import annotations

import copy
import statistics
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel.options import ConfigError, options
from protocols import learners
from protocols.common import Tensors, derive_rng

KINDS = ("sign_flip", "gaussian", "label_flip", "alie", "ipm")
COLLUDING = ("alie", "ipm")
DEFAULTS: dict[str, Any] = {"kind": None, "fraction": None, "ids": None, "seed": None,
                            "scale": 1.0, "z": 0.0, "epsilon": 0.5}
ATTACK_TAG = 0x5A7  # rng streams of the adversary, apart from training's and the server's


@dataclass(frozen=True)
class Adversary:
    """Who attacks (sorted node ids) and how; plain data."""

    kind: str
    ids: tuple[int, ...]
    seed: int
    scale: float = 1.0
    z: float = 0.0
    epsilon: float = 0.5

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None, clients: int, run_seed: int,
                    server_sees_updates: bool = True) -> Adversary | None:
        """The adversary of an `[adversary]` table (None without one); ConfigError names a
        bad key or value."""
        if section is None:
            return None
        o = options("adversary", section, DEFAULTS, choices={"kind": KINDS})
        if o["kind"] is None:
            raise ConfigError(f"[adversary] kind is required; one of {', '.join(KINDS)}")
        if not server_sees_updates and o["kind"] in COLLUDING:
            raise ConfigError(f"[adversary] kind = {o['kind']!r} colludes on the benign "
                              f"updates the server sees; with secure aggregation use "
                              f"sign_flip, gaussian or label_flip")
        seed = run_seed if o["seed"] is None else o["seed"]
        if type(seed) is not int or seed < 0:
            raise ConfigError(f"[adversary] seed = {seed!r}; expected an integer >= 0")
        fr, ids = o["fraction"], o["ids"]
        if (fr is None) == (ids is None):
            raise ConfigError("[adversary] give fraction or ids (one of them)")
        if fr is not None:
            if isinstance(fr, bool) or not isinstance(fr, int | float) or not 0 <= fr < 1:
                raise ConfigError(f"[adversary] fraction = {fr!r}; expected a number in [0, 1)")
            m = int(round(fr * clients))
            picked = np.random.default_rng([seed, ATTACK_TAG]).choice(clients, m, replace=False)
            chosen = tuple(sorted(int(i) + 1 for i in picked))
        else:
            if (not isinstance(ids, list) or
                    any(type(i) is not int or not 1 <= i <= clients for i in ids)):
                raise ConfigError(f"[adversary] ids = {ids!r}; expected a list of client node "
                                  f"ids in 1..{clients}")
            chosen = tuple(sorted(set(ids)))
        for key in ("scale", "epsilon"):
            if not o[key] >= 0:
                raise ConfigError(f"[adversary] {key} = {o[key]!r}; expected a number >= 0")
        return cls(o["kind"], chosen, seed, float(o["scale"]), float(o["z"]),
                   float(o["epsilon"]))

    def malicious(self, node: int) -> bool:
        """Whether node `node` is an attacker."""
        return node in self.ids

    def flips(self, node: int) -> bool:
        """Whether `node` trains on flipped labels."""
        return self.kind == "label_flip" and node in self.ids

    def attacks(self, node: int) -> bool:
        """Whether `node` changes its trained model itself (sign_flip, gaussian)."""
        return self.kind in ("sign_flip", "gaussian") and node in self.ids

    def flipped(self, learner: learners.Learner) -> learners.Learner:
        """`learner` training on labels y -> classes - 1 - y."""
        return _flipped(learner)

    def poison(self, model: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray],
               node: int, rnd: int) -> Tensors:
        """What attacker `node` replies in round `rnd` instead of `trained`."""
        out: Tensors = {}
        if self.kind == "sign_flip":
            s = np.float64(self.scale)
            for k in sorted(model):
                g = np.asarray(model[k], np.float64)
                out[k] = (g - s * (np.asarray(trained[k], np.float64) - g)).astype(np.float32)
            return out
        rng = derive_rng(self.seed, ATTACK_TAG, node, rnd)
        for k in sorted(model):
            noise = rng.standard_normal(np.shape(model[k])) * self.scale
            out[k] = (np.asarray(model[k], np.float64) + noise).astype(np.float32)
        return out

    def collude(self, rnd: int, model: Mapping[str, np.ndarray],
                replies: Sequence[tuple[int, float, Mapping[str, np.ndarray]]]
                ) -> list[tuple[float, Mapping[str, np.ndarray]]]:
        """(weight, model) items from (sender, weight, model) replies in sender order, the
        colluders' models replaced (alie, ipm)."""
        items: list[tuple[float, Mapping[str, np.ndarray]]] = [
            (float(n), m) for _, n, m in replies]
        if self.kind not in COLLUDING:
            return items
        bad = [i for i, (src, _, _) in enumerate(replies) if src in self.ids]
        if not bad:
            return items
        good = [i for i in range(len(items)) if i not in bad] or bad
        crafted: Tensors = {}
        for k in sorted(model):
            stack = np.stack([np.asarray(items[i][1][k], np.float64) for i in good])
            mu = stack.mean(axis=0)
            if self.kind == "alie":
                z = self.z or z_max(len(items), len(bad))
                crafted[k] = (mu - z * stack.std(axis=0)).astype(np.float32)
            else:
                g = np.asarray(model[k], np.float64)
                crafted[k] = (g - self.epsilon * (mu - g)).astype(np.float32)
        for i in bad:
            items[i] = (items[i][0], crafted)
        return items

    def describe(self) -> dict[str, Any]:
        """A summary for result.json."""
        return {"kind": self.kind, "ids": list(self.ids)}


def z_max(n: int, m: int) -> float:
    """Baruch et al.'s z for n workers of which m collude: the largest shift that keeps
    enough benign workers (s of them) farther from the mean than the attackers."""
    s = n // 2 + 1 - m
    p = (n - s) / n
    p = min(max(p, 1e-6), 1 - 1e-6)
    return statistics.NormalDist().inv_cdf(p)


class FlippedLabels:
    """A data source whose training labels are y -> classes - 1 - y (reads the wrapped one)."""

    def __init__(self, data: Any, classes: int) -> None:
        self.inner, self.classes = data, classes

    def client(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.inner.client(client)
        return x, (self.classes - 1 - np.asarray(y)).astype(np.asarray(y).dtype)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


_flip_cache: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _flipped(learner: learners.Learner) -> learners.Learner:
    # One flipped twin per learner per process, kept outside node state (a cache).
    twin = _flip_cache.get(learner)
    if twin is None:
        classes = getattr(learner.data, "classes", None) or learner.opts.get("classes")
        if not classes:
            raise ConfigError("[adversary] kind = 'label_flip' needs a workload with classes")
        twin = copy.copy(learner)
        twin.data = FlippedLabels(learner.data, int(classes))  # type: ignore[assignment]
        _flip_cache[learner] = twin
    return twin  # type: ignore[no-any-return]
