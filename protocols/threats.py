"""The layer FedAvg-family protocols call around local training and aggregation, so that
adversaries (`protocols.adversary`) and differential privacy (`protocols.privacy`) work the
same in every protocol that routes through it, on every transport.

Client side: `client_train` trains (honestly, or on flipped labels), then applies the
client's attack and local DP. Server side: `collude` rewrites the colluding attackers'
replies from the round's benign ones, `aggregate` clips and noises the aggregate under
central DP, and `round_fields` adds to the round row which clients attacked and the privacy
spent. A Guard holds only plain data (options, ids, numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocols import adversary, learners, privacy
from protocols.common import Tensors

Items = list[tuple[float, Mapping[str, np.ndarray]]]


@dataclass
class Guard:
    """The run's adversary and privacy settings (either may be None), plus accountant state."""

    attack: adversary.Adversary | None = None
    dp: privacy.Privacy | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], learner: learners.Learner, seed: int,
                    server_sees_updates: bool = True, sampled: int | None = None) -> Guard:
        """The guard for a run config; `server_sees_updates` is False for secure aggregation
        (then colluding attacks and central DP are refused); `sampled` is clients per round."""
        attack = adversary.Adversary.from_config(config.get("adversary"), learner.clients,
                                                 seed, server_sees_updates)
        dp = privacy.Privacy.from_config(config.get("privacy"), learner.clients, seed,
                                         server_sees_updates, sampled, config)
        return cls(attack, dp)

    def client_train(self, learner: learners.Learner, model: Mapping[str, np.ndarray],
                     client: int, rng: np.random.Generator, rnd: int, mu: float = 0.0,
                     hooks: learners.Hooks | None = None) -> learners.TrainResult:
        """Client `client`'s training for round `rnd` (FedProx `mu` or `hooks`); its model is
        what the client replies: attacked if it is malicious, clipped and noised under local
        DP (steps, loss and metrics stay those of the training itself)."""
        if hooks is None and mu:
            hooks = learners.Hooks(prox_mu=mu)
        node = client + 1
        lrn = learner
        if self.attack is not None and self.attack.flips(node):
            lrn = self.attack.flipped(learner)
        res = lrn.train(model, client, rng, hooks)
        if self.attack is not None and self.attack.attacks(node):
            res.model = self.attack.poison(model, res.model, node, rnd)
        if self.dp is not None:
            res.model = self.dp.local(model, res.model, node, rnd)
        return res

    def collude(self, rnd: int, model: Mapping[str, np.ndarray],
                replies: Sequence[tuple[int, float, Mapping[str, np.ndarray]]]) -> Items:
        """The (weight, model) items to aggregate from (sender, weight, model) replies in
        sender order; colluding attackers' models replaced by what they craft from the
        benign replies of the round."""
        if self.attack is None:
            return [(float(n), m) for _, n, m in replies]
        return self.attack.collude(rnd, model, replies)

    def aggregate(self, agg: Callable[[Items], Tensors], model: Mapping[str, np.ndarray],
                  items: Items, rnd: int, sampled: int) -> Tensors | None:
        """The new model from `items` (None when there is nothing to aggregate): the
        protocol's aggregator, or central DP's clipped, noised mean of updates."""
        if self.dp is not None and self.dp.central:
            return self.dp.aggregate(model, items, rnd, sampled)
        return agg(items) if items else None

    def sample(self, rng: np.random.Generator, population: Sequence[int],
               fraction: float | None, count: int | None) -> list[int] | None:
        """Poisson sampling when [privacy] asks for it, else None (the protocol samples)."""
        if self.dp is None:
            return None
        return self.dp.sample(rng, population, fraction, count)

    def end_round(self, ids: Sequence[int]) -> dict[str, Any]:
        """Account a round whose aggregate used the updates of node `ids` and return its
        round-row fields: the attackers among them and the privacy spent so far."""
        out: dict[str, Any] = {}
        if self.attack is not None:
            out["attackers"] = [int(i) for i in ids if self.attack.malicious(int(i))]
        if self.dp is not None:
            self.dp.record(ids)
            out.update(self.dp.spent())
        return out

    def result_fields(self) -> dict[str, Any]:
        """Entries for the run's result (result.json "extra")."""
        out: dict[str, Any] = {}
        if self.attack is not None:
            out["adversary"] = self.attack.describe()
        if self.dp is not None:
            out["privacy"] = self.dp.spent()
        return out
