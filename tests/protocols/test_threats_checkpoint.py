"""SecAgg+ and the [adversary]/[privacy] layer keep plain node state: a run interrupted
mid-way and resumed from its checkpoint ends bit for bit as one never interrupted (noise,
accountant, adaptive clip and round secrets included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kernel.run import checkpoint as ckpt
from kernel.run.outputs import WALL_FIELDS
from kernel.run.runner import execute
from tests.kernel.run.interrupt import InterruptAt

LINEAR = {"model": "linear", "clients": 6, "input_dim": 16, "classes": 4,
          "samples_per_client": 24, "batch_size": 8, "lr": 0.1, "test_samples": 64}
CONFIGS: dict[str, dict[str, Any]] = {
    "secaggplus": {"run": {"seed": 3, "rounds": 4, "progress": False},
                   "protocol": {"name": "secaggplus", "clients_per_round": 4},
                   "workload": LINEAR, "network": {"latency": 0.1},
                   "adversary": {"kind": "label_flip", "ids": [2, 3]},
                   "privacy": {"mode": "local", "noise_multiplier": 0.5, "clip": 2.0}},
    "fedavg": {"run": {"seed": 3, "rounds": 4, "progress": False},
               "protocol": {"name": "fedavg", "clients_per_round": 4},
               "workload": LINEAR,
               "adversary": {"kind": "alie", "fraction": 0.3},
               "privacy": {"mode": "central", "adaptive": True, "noise_multiplier": 0.5}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_interrupted_and_resumed_equals_uninterrupted(name: str, tmp_path: Path) -> None:
    want = execute(CONFIGS[name], quiet=True)
    with pytest.raises(ckpt.RunInterrupted):
        execute(CONFIGS[name], progress=InterruptAt(2), checkpoint_dir=tmp_path)
    got = execute(None, quiet=True, resume=tmp_path)
    assert got.result["final_model_sha256"] == want.result["final_model_sha256"]

    def plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rows]

    assert plain(got.rows) == plain(want.rows)
    assert got.result["extra"] == want.result["extra"]
