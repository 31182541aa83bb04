"""`fedloom inspect` reads what failed, interrupted and killed runs leave: a result.json whose
reason says "failed: ..." with its error, a folder with only metrics.jsonl, and a folder
holding only a checkpoint (verified first, and saying how to resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernel.api import RunError
from kernel.run.checkpoint import FILENAME
from kernel.run.runner import run
from perf.inspect import InspectError, inspect
from tests.kernel.run.test_checkpoint import good_checkpoint


def test_a_failed_run_folder_shows_the_reason_and_the_error(tmp_path: Path) -> None:
    cfg = {"run": {"rounds": 1}, "protocol": {
        "name": "tests.transports.failing_protocols:build_failing", "every": 5, "fail_at": 3}}
    with pytest.raises(RunError):
        run(cfg, tmp_path, quiet=True)
    text = inspect(tmp_path)
    assert "failed: node 0 (Bouncer) raised RuntimeError" in text
    assert "  error          RunError: node 0 (Bouncer) raised RuntimeError" in text
    assert "rounds (2):" in text


def test_a_folder_with_only_metrics_is_summarised_as_a_run_that_did_not_finish(
        tmp_path: Path) -> None:
    rows = [{"t": 0.1 * i, "node": 0, "name": "round", "value": i} for i in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = inspect(tmp_path)
    assert "no result.json" in text and "rounds (2):" in text


def test_a_folder_with_only_a_checkpoint_says_where_it_stopped_and_how_to_resume(
        tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(good_checkpoint())
    text = inspect(tmp_path)
    assert "fedavg on inproc, seed 1: stopped at round 2 of 6" in text
    assert f"resume with    fedloom run --resume {tmp_path}" in text
    assert "rounds (2):" in text
    data = bytearray(good_checkpoint())
    data[-1] ^= 1
    (tmp_path / FILENAME).write_bytes(bytes(data))
    with pytest.raises(InspectError, match="is damaged: sha256 mismatch"):
        inspect(tmp_path)
