"""Failed and interrupted runs on a real local Ray keep what they had: metrics.jsonl holds the
rows as they arrived, result.json says "failed: ..." (with the error) or "interrupted"."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from kernel.api import RunError  # noqa: E402
from kernel.run.outputs import read_metrics  # noqa: E402
from kernel.run.runner import run  # noqa: E402
from tests.transports.test_failed_runs import CtrlCAt, config  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_a_failed_ray_run_leaves_the_reason_the_error_and_the_rows(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="boom at round 3"):
        run(config("ray", 3), tmp_path, quiet=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["reason"].startswith("failed: ") and "boom at round 3" in result["error"]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    rounds = [r["value"] for r in rows if r.get("name") == "round"]
    assert rounds == [1, 2][:len(rounds)]


def test_ctrl_c_on_ray_leaves_the_rows_so_far_and_reason_interrupted(tmp_path: Path) -> None:
    progress = CtrlCAt(3, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(config("ray", 0), tmp_path, progress=progress)
    assert progress.on_disk == [1, 2, 3]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["reason"] == "interrupted" and result["rounds"] == 3
