"""How far a client's local steps reach: ||a||_1, the total weight local training put on its
stochastic gradients (Wang et al. 2020, FedNova), for SCAFFOLD's option II and FedNova.

With K plain SGD steps it is K; a proximal pull mu (FedProx, FedDyn) or weight decay shrinks
it, heavy-ball momentum m stretches it towards K / (1 - m). It is found by running the
optimiser's scalar recurrence on a constant unit gradient (exact for every mix of the three,
since the update is linear in the gradients): ||a||_1 = -(w_K - w_0) / lr.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def a_norm(steps: int, lr: float, mu: float = 0.0, momentum: float = 0.0,
           nesterov: bool = False, weight_decay: float = 0.0) -> float:
    """||a||_1 of `steps` local SGD steps (torch.optim.SGD's momentum / nesterov convention)."""
    if steps <= 0:
        return 0.0
    if lr <= 0 or (mu == 0 and momentum == 0 and weight_decay == 0):
        return float(steps)
    shrink = mu + weight_decay
    d = b = 0.0
    for _ in range(steps):
        g = 1.0 + shrink * d
        b = momentum * b + g
        d -= lr * (g + momentum * b if nesterov else b)
    return -d / lr


def learner_sgd(learner: Any) -> dict[str, Any]:
    """The local optimiser settings of a learner, as `a_norm` keywords: momentum, nesterov and
    weight decay where its options name them (SGD), none otherwise."""
    opts: Mapping[str, Any] = getattr(learner, "opts", None) or {}
    if opts.get("optimizer", "sgd") != "sgd":
        return {}
    return {"momentum": float(opts.get("momentum", 0.0) or 0.0),
            "nesterov": bool(opts.get("nesterov", False)),
            "weight_decay": float(opts.get("weight_decay", 0.0) or 0.0)}
