"""Small FedAvg runs on the linear learner, inproc and strict, with an optional threat section
([adversary] or [privacy]): what the attack and privacy tests share."""

from __future__ import annotations

from typing import Any

from protocols.fedavg import build
from transports.base import Job
from transports.inproc import InprocTransport

LINEAR = {"model": "linear", "input_dim": 16, "classes": 4, "samples_per_client": 48,
          "batch_size": 8, "lr": 0.1, "test_samples": 400}

def config(section: str, value: dict[str, Any] | None, *, seed: int, test_samples: int,
           clients: int = 10, rounds: int = 3, **protocol: Any) -> dict[str, Any]:
    """A FedAvg config of `clients` linear-learner clients, with `[section] = value` if given."""
    workload = dict(LINEAR, test_samples=test_samples, clients=clients)
    cfg: dict[str, Any] = {"run": {"seed": seed, "rounds": rounds},
                           "transport": {"kind": "inproc"},
                           "protocol": {"name": "fedavg", **protocol}, "workload": workload}
    if value is not None:
        cfg[section] = value
    return cfg


def run(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's result and its round rows (the run must finish)."""
    rows: list[dict[str, Any]] = []
    job = Job(config=cfg, deployment=build(cfg), seed=cfg["run"]["seed"], until=1e6,
              on_metric=rows.append)
    out = InprocTransport({"strict": True}).run(job)
    assert out.reason == "finished" and out.result is not None
    return dict(out.result), [r for r in rows if r["name"] == "round"]
