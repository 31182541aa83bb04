"""Failed and interrupted runs keep what they had: on every transport a run that fails leaves
result.json with reason "failed: ..." and the error, and metrics.jsonl with the rows so far;
on transports without checkpoints (grpc here, on real loopback sockets) rows reach
metrics.jsonl as they arrive and Ctrl-C leaves result.json with reason "interrupted"."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kernel.api import RunError
from kernel.run.outputs import read_metrics
from kernel.run.progress import Progress
from kernel.run.runner import run

FAILING = "tests.transports.failing_protocols:build_failing"


def config(kind: str, fail_at: int) -> dict[str, Any]:
    return {"run": {"seed": 0, "rounds": 1, "time_limit": 60.0},
            "protocol": {"name": FAILING, "every": 10, "fail_at": fail_at},
            "transport": {"kind": kind}}


class CtrlCAt(Progress):
    """Presses Ctrl-C (raises KeyboardInterrupt in the driver) when round `r` arrives, and
    records what metrics.jsonl held at each row before it."""

    def __init__(self, r: int, out: Path) -> None:
        super().__init__(r, io.StringIO())
        self.r, self.out = r, out
        self.on_disk: list[int] = []

    def update(self, row: Mapping[str, Any]) -> None:
        if row.get("name") != "round":
            return
        rows = read_metrics(self.out / "metrics.jsonl")
        self.on_disk.append(sum(r.get("name") == "round" for r in rows))
        if row.get("value") == self.r:
            raise KeyboardInterrupt


@pytest.mark.parametrize("kind", ["inproc", pytest.param("grpc", marks=pytest.mark.grpc)])
def test_a_failed_run_leaves_result_json_with_the_reason_and_the_rows_so_far(
        kind: str, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="boom at round 3") as info:
        run(config(kind, 3), tmp_path, quiet=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["reason"].startswith("failed: ") and "boom at round 3" in result["reason"]
    assert result["error"] == f"RunError: {info.value}"
    assert result["protocol"] == FAILING and result["transport"] == kind
    rounds = [r["value"] for r in read_metrics(tmp_path / "metrics.jsonl")
              if r["name"] == "round"]
    assert rounds == [1, 2][:len(rounds)] and result["rounds"] == (rounds[-1] if rounds else 0)
    if kind == "inproc":
        assert rounds == [1, 2]


@pytest.mark.grpc
def test_ctrl_c_on_grpc_leaves_metrics_written_as_they_came_and_reason_interrupted(
        tmp_path: Path) -> None:
    progress = CtrlCAt(3, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(config("grpc", 0), tmp_path, progress=progress)
    # Each row was on disk by the time the progress display saw it.
    assert progress.on_disk == [1, 2, 3]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["reason"] == "interrupted" and result["error"] is None
    assert [r["value"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert result["rounds"] == 3
