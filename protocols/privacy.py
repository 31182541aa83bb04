"""Client-level differential privacy for FedAvg-family protocols: `[privacy]`.

    [privacy]
    mode = "central"        # "central": the server clips each update and noises the sum
                            #   (DP-FedAvg, McMahan et al. 2018); "local": each client clips
                            #   and noises its own update before sending it
    noise_multiplier = 1.0  # z: noise std = z * clip
    clip = 1.0              # L2 bound on each client's update (the initial one if adaptive)
    adaptive = false        # central only: clip follows a quantile of update norms
                            #   (Andrew et al. 2021), C <- C exp(-clip_lr (b - quantile))
    target_quantile = 0.5
    clip_lr = 0.2
    count_stddev = 0.0      # noise std of the clipped count; 0 = expected clients / 20
                            #   (Andrew et al.), at least noise_multiplier
    delta = 0.0             # 0 = 1 / clients**1.1
    sampling = "fixed"      # "fixed": the protocol's fixed-size sample without replacement;
                            #   "poisson": each client joins a round with probability q
    accountant = "rdp"      # "rdp" or "pld" (pld accounts Poisson sampling only)
    seed = 0                # of the noise; default [run] seed

Central mode replaces the aggregator by the mean of clipped updates with Gaussian noise,
sum + N(0, (z C)^2), divided by the expected number of clients (the sample size, or q N with
Poisson sampling; weights are not used, as in DP-FedAvg), so one client moves the result by
at most C / expected. With adaptive clipping the updates get noise multiplier
z_delta = (z^-2 - (2 count_stddev)^-2)^(-1/2) so that both releases together cost z.

Accounting (dp-accounting, imported when a run has `[privacy]`): one round is a subsampled
Gaussian mechanism on the clients' data sets. Fixed-size sampling without replacement is
accounted under replace-one adjacency (`SampledWithoutReplacementDpEvent`, RDP): replacing a
client moves the clipped sum by up to 2C, so the event's noise multiplier is z / 2. Poisson
sampling is accounted under add-or-remove-one (`PoissonSampledDpEvent`, sensitivity C). When
every client takes part every round there is no amplification. Local mode accounts, for the
client that took part most often, one Gaussian release of sensitivity 2C per participation.
Round rows get `epsilon_round` (one round alone) and `epsilon` (cumulative) at `delta`, and
`clip` (the clip norm used); result.json's extra has the same under "privacy".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernel.options import ConfigError, options
from protocols.common import Tensors, derive_rng, flatten, unflatten

MODES = ("central", "local")
DEFAULTS: dict[str, Any] = {
    "mode": None, "noise_multiplier": 1.0, "clip": 1.0, "adaptive": False,
    "target_quantile": 0.5, "clip_lr": 0.2, "count_stddev": 0.0, "delta": 0.0,
    "sampling": "fixed", "accountant": "rdp", "seed": None,
}
DP_TAG = 0xD1F  # the noise's rng streams, apart from training's and the adversary's


@dataclass
class Privacy:
    """The run's DP settings and what the server has spent so far (plain data)."""

    central: bool
    z: float
    clip: float
    adaptive: bool
    quantile: float
    clip_lr: float
    count_std: float
    delta: float
    poisson: bool
    accountant: str
    seed: int
    clients: int
    expected: float  # clients per round (the sample size, or q N)
    rounds: int = 0  # rounds accounted
    participations: dict[int, int] = field(default_factory=dict)  # local mode: node -> rounds
    _eps_round: float | None = None
    _rdp_one: tuple[list[float], list[float]] | None = None  # (orders, one round's RDP)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None, clients: int, run_seed: int,
                    server_sees_updates: bool, sampled: int | None,
                    config: Mapping[str, Any]) -> Privacy | None:
        """The DP settings of a `[privacy]` table (None without one); `sampled` is the fixed
        sample size per round (None: every client)."""
        if section is None:
            return None
        o = options("privacy", section, DEFAULTS, choices={
            "mode": MODES, "sampling": ("fixed", "poisson"), "accountant": ("rdp", "pld")})

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"[privacy] {key} = {o[key]!r}; expected {expected}")

        if o["mode"] is None:
            raise ConfigError("[privacy] mode is required: 'central' or 'local'")
        central = o["mode"] == "central"
        if central and not server_sees_updates:
            raise ConfigError("[privacy] mode = 'central' clips each update at the server; "
                              "with secure aggregation use mode = 'local'")
        if not o["noise_multiplier"] >= 0:
            raise bad("noise_multiplier", "a number >= 0")
        if not o["clip"] > 0:
            raise bad("clip", "a number > 0")
        if not 0 < o["target_quantile"] < 1:
            raise bad("target_quantile", "a number in (0, 1)")
        if not o["clip_lr"] > 0:
            raise bad("clip_lr", "a number > 0")
        if not o["count_stddev"] >= 0:
            raise bad("count_stddev", "a number >= 0 (0: expected clients / 20)")
        if o["adaptive"] and not central:
            raise ConfigError("[privacy] adaptive = true needs mode = 'central' (the server "
                              "estimates the quantile from clipped counts)")
        delta = o["delta"] or 1.0 / clients**1.1
        if not 0 < delta < 1:
            raise bad("delta", "a number in (0, 1)")
        seed = run_seed if o["seed"] is None else o["seed"]
        if type(seed) is not int or seed < 0:
            raise bad("seed", "an integer >= 0")
        poisson = o["sampling"] == "poisson"
        if poisson and not central:
            raise ConfigError("[privacy] sampling = 'poisson' is for mode = 'central' (local "
                              "mode accounts each client's own releases, whoever samples)")
        if o["accountant"] == "pld" and not poisson:
            raise ConfigError("[privacy] accountant = 'pld' accounts Poisson sampling only; set "
                              "sampling = 'poisson' or accountant = 'rdp'")
        proto = config.get("protocol", {})
        agg = proto.get("aggregator", "weighted_mean")
        if central and agg not in ("weighted_mean", "mean"):
            raise ConfigError(f"[privacy] mode = 'central' replaces the aggregator by a noised "
                              f"mean of clipped updates; [protocol] aggregator = {agg!r} would "
                              f"be ignored (use 'weighted_mean', or mode = 'local')")
        fr, k = proto.get("fraction"), proto.get("clients_per_round")
        num = (int, float)
        if poisson:
            if not isinstance(fr, num) and not isinstance(k, int):
                raise ConfigError("[privacy] sampling = 'poisson' needs [protocol] fraction or "
                                  "clients_per_round (the expected clients per round)")
            expected = (fr if isinstance(fr, num) else k / clients) * clients
        elif sampled is not None:
            expected = float(sampled)
        elif isinstance(k, int):
            expected = float(k)
        elif isinstance(fr, num):
            expected = float(max(1, math.ceil(fr * clients - 1e-9)))
        else:
            expected = float(clients)
        count_std = o["count_stddev"] or max(expected / 20, o["noise_multiplier"])
        if o["adaptive"] and o["noise_multiplier"] > 0 and 2 * count_std <= o["noise_multiplier"]:
            raise ConfigError(f"[privacy] count_stddev = {count_std} is too small for "
                              f"noise_multiplier = {o['noise_multiplier']}: adaptive clipping "
                              f"needs 2 * count_stddev > noise_multiplier")
        p = cls(central, float(o["noise_multiplier"]), float(o["clip"]), o["adaptive"],
                float(o["target_quantile"]), float(o["clip_lr"]), float(count_std), delta,
                poisson, o["accountant"], seed, clients, expected)
        _accounting()  # a missing dp-accounting fails now, naming the extra to install
        return p

    # -- noise ----------------------------------------------------------------------------

    @property
    def z_update(self) -> float:
        """The noise multiplier of the updates (lower than z with adaptive clipping)."""
        if not self.adaptive or self.z == 0:
            return self.z
        return (self.z ** -2 - (2 * self.count_std) ** -2) ** -0.5

    def sample(self, rng: np.random.Generator, population: Sequence[int],
               fraction: float | None, count: int | None) -> list[int] | None:
        """Poisson sampling (each member with probability q, q = fraction or count / n), or
        None when the protocol's own fixed-size sampling applies."""
        if not self.poisson:
            return None
        n = len(population)
        q = fraction if fraction is not None else (count or n) / n
        keep = rng.random(n) < q
        return [int(population[i]) for i in range(n) if keep[i]]

    def local(self, model: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray],
              node: int, rnd: int) -> Tensors:
        """Local mode: the client's update clipped to `clip` plus N(0, (z clip)^2) noise
        (seeded by seed, node, round); central mode: `trained` unchanged."""
        if self.central:
            return dict(trained)
        g = flatten(model).astype(np.float64)
        d = _clipped(flatten(trained).astype(np.float64) - g, self.clip)[0]
        d += derive_rng(self.seed, DP_TAG, node, rnd).standard_normal(d.size) * self.z * self.clip
        return unflatten((g + d).astype(np.float32), model)

    def aggregate(self, model: Mapping[str, np.ndarray],
                  items: Sequence[tuple[float, Mapping[str, np.ndarray]]], rnd: int,
                  sampled: int) -> Tensors:
        """Central mode: global + (sum of clipped updates + noise) / expected clients; adapts
        the clip norm afterwards when adaptive."""
        g = flatten(model).astype(np.float64)
        total = np.zeros_like(g)
        below = 0
        for _, m in items:  # sender order: the same sum on every transport
            d, ok = _clipped(flatten(m).astype(np.float64) - g, self.clip)
            total += d
            below += ok
        rng = derive_rng(self.seed, DP_TAG, 0, rnd)
        total += rng.standard_normal(g.size) * (self.z_update * self.clip)
        out = unflatten((g + total / self.expected).astype(np.float32), model)
        if self.adaptive:
            frac = (below + rng.standard_normal() * self.count_std) / self.expected
            self.clip *= math.exp(-self.clip_lr * (frac - self.quantile))
        return out

    # -- accounting -----------------------------------------------------------------------

    def record(self, ids: Sequence[int]) -> None:
        """Account one more round whose aggregate used the updates of `ids`."""
        self.rounds += 1
        for i in ids:
            self.participations[int(i)] = self.participations.get(int(i), 0) + 1

    def spent(self) -> dict[str, Any]:
        """{"epsilon", "epsilon_round", "delta", "clip"} so far (epsilon at delta)."""
        count = self.rounds if self.central else max(self.participations.values(), default=0)
        if self._eps_round is None:
            self._eps_round = self._epsilon(1)
        eps = self._eps_round if count == 1 else self._epsilon(count) if count else 0.0
        return {"epsilon": eps,
                "epsilon_round": self._eps_round, "delta": self.delta, "clip": self.clip}

    def _epsilon(self, count: int) -> float:
        dpa, rdp, pld = _accounting()
        if self.z == 0:
            return math.inf
        n, m = self.clients, self.expected
        if not self.central:
            event: Any = dpa.GaussianDpEvent(self.z / 2)
            relation = None
        elif self.poisson:
            event = dpa.PoissonSampledDpEvent(m / n, dpa.GaussianDpEvent(self.z))
            relation = None
        else:
            relation = dpa.NeighboringRelation.REPLACE_ONE
            inner = dpa.GaussianDpEvent(self.z / 2)
            event = inner if m >= n else dpa.SampledWithoutReplacementDpEvent(n, int(m), inner)
        if self.accountant == "pld":
            acc = pld.PLDAccountant()
            acc.compose(event, count)
            return float(acc.get_epsilon(self.delta))
        if self._rdp_one is None:
            # RDP composes by adding: one round's curve, kept, times `count` gives the rest
            # (the sampled-without-replacement curve costs ~0.2 s to compute).
            acc = (rdp.RdpAccountant() if relation is None
                   else rdp.RdpAccountant(neighboring_relation=relation))
            acc.compose(event, 1)
            self._rdp_one = ([float(x) for x in acc._orders], [float(x) for x in acc._rdp])
        orders, curve = self._rdp_one
        return float(rdp.compute_epsilon(orders, [count * r for r in curve], self.delta)[0])


def _clipped(d: np.ndarray, clip: float) -> tuple[np.ndarray, bool]:
    norm = float(np.sqrt(np.dot(d, d)))
    if norm <= clip:
        return d, True
    return d * (clip / norm), False


def _accounting() -> tuple[Any, Any, Any]:
    try:
        import logging

        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError as exc:
        raise ConfigError(f"[privacy] needs dp-accounting (pip install 'fedloom[privacy]'): "
                          f"{exc}") from None
    # Its RDP series warns for low orders it skips; the bound stays valid, so keep logs quiet.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return dp_accounting, rdp_privacy_accountant, pld_privacy_accountant
