"""How much a FedAvg-shaped server works per round, against one client: a placement hint.

Transports place nodes on shards by `Deployment.load` (`transports.base.place`); a server that
sums every reply and evaluates the model works, per round, as much as many clients, so its shard
should get fewer clients. The figures are estimates in units of training on one sample (one
epoch): summing one reply costs about as much as training on `REPLY_SAMPLES` samples (measured
with the mlp learner of W2: 1.1 ms to add a 203,530-parameter reply exactly, 5.2 ms to train on
256 samples), and evaluating a test sample about `EVAL_SAMPLE` of training on one. A wrong
estimate costs only speed: results never depend on placement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

REPLY_SAMPLES = 54.0
EVAL_SAMPLE = 0.29
# Clients whose work is looked at to estimate a typical client's (spread over all of them).
PROBE = 64


def server_load(learner: Any, clients_per_round: int | None, fraction: float | None,
                eval_every: int, relayed: bool = False) -> Mapping[int, float] | None:
    """`{0: w}`: node 0's (the server's) work per round in units of one client's expected work
    per round; None when the learner reports no work (nothing to balance). `relayed`: replies
    are summed on each client's own shard (shard-local partials), so summing them is spread
    like the clients and does not weigh on the server's shard."""
    n = int(learner.clients)
    if n < 1:
        return None
    step = max(1, n // PROBE)
    probe = range(0, n, step)
    try:
        work = sum(float(learner.work(c)) for c in probe) / len(probe)
    except Exception:  # a user's learner that cannot say: no hint, round-robin placement
        return None
    if not (math.isfinite(work) and work > 0):
        return None
    if clients_per_round is not None:
        k = clients_per_round
    elif fraction is not None:
        k = max(1, math.ceil(fraction * n - 1e-9))
    else:
        k = n
    opts = getattr(learner, "opts", {}) or {}
    test = float(opts.get("test_samples", 0) or 0)
    server = (0.0 if relayed else k * REPLY_SAMPLES) + test * EVAL_SAMPLE / max(eval_every, 1)
    return {0: server / (work * k / n)}
