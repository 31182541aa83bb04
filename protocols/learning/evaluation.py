"""Per-client (federated) evaluation: the `[eval]` section and the per-round summary.

Keys (`[eval]`):
- `clients` (default: 1.0 when `[data] holdout` > 0, else 0.0): the fraction of clients whose
  held-out split scores the global model (0: none). The sample is seeded by (run seed,
  round), so it is the same on every transport.
- `every` (default 1): rounds between per-client evaluations (the last round always counts).

The global test set is scored as before (`[protocol] eval_every`). Each evaluated client gives
one `client_eval` row in metrics.jsonl (accuracy, loss and any other metric the learner
returns); the round row gains `client_accuracy_mean`, `_std`, `_p10` (10th percentile),
`_worst` and `clients_evaluated`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel.options import ConfigError, options

DEFAULTS: dict[str, Any] = {"clients": None, "every": 1}


@dataclass(frozen=True)
class EvalOptions:
    """Validated `[eval]`: fraction of clients scored, and how often."""

    clients: float = 0.0
    every: int = 1


def validate(section: Mapping[str, Any], learner: Any) -> EvalOptions:
    """`[eval]` for `learner`; ConfigError names a bad key or value, or per-client evaluation
    asked of a learner without held-out splits."""
    o = options("eval", section, DEFAULTS)
    has_holdout = getattr(getattr(learner, "data", None), "has_holdout", None)
    fr = o["clients"]
    if fr is None:
        fr = 1.0 if has_holdout else 0.0
    if isinstance(fr, bool) or not isinstance(fr, int | float) or not 0 <= fr <= 1:
        raise ConfigError(f"[eval] clients = {fr!r}; expected a fraction in [0, 1]")
    if type(o["every"]) is not int or o["every"] < 1:
        raise ConfigError(f"[eval] every = {o['every']!r}; expected an integer >= 1")
    if fr > 0 and has_holdout is False:
        raise ConfigError(f"[eval] clients = {fr!r} scores clients' held-out splits, but there "
                          f"are none: set [data] holdout > 0 (e.g. 0.1)")
    return EvalOptions(float(fr), o["every"])


def summary(accuracies: list[float]) -> dict[str, float | int]:
    """Mean, std, 10th percentile and worst of per-client accuracies (empty: nothing)."""
    if not accuracies:
        return {"clients_evaluated": 0}
    a = np.asarray(accuracies, np.float64)
    return {"client_accuracy_mean": float(a.mean()), "client_accuracy_std": float(a.std()),
            "client_accuracy_p10": float(np.percentile(a, 10)),
            "client_accuracy_worst": float(a.min()), "clients_evaluated": len(a)}
