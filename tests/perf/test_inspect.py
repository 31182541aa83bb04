"""`fedloom inspect DIR`: a real run folder is summarised (headline, rounds, files, config), a
compare folder shows its report's headline, anything else is an error naming the path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from perf import cli, report
from perf.inspect import InspectError, inspect
from tests.perf import toy_protocol

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real toy run (3 rounds, 3 clients) written by the run command."""
    tmp = tmp_path_factory.mktemp("inspect")
    cfg = tmp / "toy.toml"
    cfg.write_text(toy_protocol.CONFIG_TOML)
    out = tmp / "run"
    proc = subprocess.run(
        [*toy_protocol.runner(), str(cfg), "--set", "protocol.clients=3", "--out", str(out),
         "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_run_folder_summary(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.inspect_main([str(run_dir)]) == 0
    text = capsys.readouterr().out
    result = json.loads((run_dir / "result.json").read_text())
    assert f"{toy_protocol.NAME} on inproc, seed 0: finished" in text
    assert f"messages       {result['messages']:,}" in text
    assert result["final_model_sha256"] in text
    rounds = text.split("rounds (3):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert rounds[0].split() == ["round", "t", "accuracy", "loss", "wall_s"]
    for r, line in zip((1, 2, 3), rounds[1:], strict=True):
        cols = line.split()
        assert cols[0] == str(r)
        assert float(cols[2]) == pytest.approx(toy_protocol.expected_accuracy(r), abs=1e-4)
    files = text.split("files:", 1)[1]
    for name in ("result.json", "metrics.jsonl", "final_model.npz", "config.toml"):
        assert name in files
    assert "missing:" not in files
    diff = text.split("differs from the built-in default", 1)[1]
    assert f"protocol.name = '{toy_protocol.NAME}'  (default 'fedavg')" in diff
    assert "protocol.clients = 3" in diff


def test_fedloom_inspect_command(run_dir: Path, tmp_path: Path) -> None:
    """Through the real `fedloom` dispatch: a run folder, then a folder that is not one."""
    ok = subprocess.run([sys.executable, "-m", "kernel.run.cli", "inspect", str(run_dir)],
                        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "rounds (3):" in ok.stdout
    (tmp_path / "notes.txt").write_text("hello")
    bad = subprocess.run([sys.executable, "-m", "kernel.run.cli", "inspect", str(tmp_path)],
                         capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
    assert bad.returncode == 1
    assert f"{tmp_path} is not a fedloom run folder" in bad.stderr
    assert "notes.txt" in bad.stderr


def test_paths_that_are_not_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(InspectError, match=f"{tmp_path / 'nope'} does not exist"):
        inspect(tmp_path / "nope")
    f = tmp_path / "result.json"
    f.write_text("{}")
    with pytest.raises(InspectError, match="is a file, not a folder"):
        inspect(f)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "result.json").write_text("[1, 2")
    with pytest.raises(InspectError, match=r"result\.json cannot be read as JSON"):
        inspect(tmp_path / "d")


def test_compare_folder_shows_the_headline(tmp_path: Path) -> None:
    rows = [{"order": i, "cell": c, "parts": {"workload": "w", "transport": c.split("/")[1]},
             "repeat": i // 2, "ok": True, "wall_s": 1.0 + i, "round_s": 0.1 * (i + 1)}
            for i, c in enumerate(["w/inproc", "w/ray"] * 2)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "report.md").write_text(report.render(rows, "inproc"))
    text = inspect(tmp_path)
    assert "4 runs: 2 cells x 2 repeats, 0 failed. Baseline: `inproc`." in text
    assert "Fastest per round: `w/inproc`" in text
    assert "results.jsonl: 4 runs (4 ok) over 2 cells:" in text
    assert "  w/inproc: 2 ok runs, wall 2 s, 0.2 s/round" in text  # medians of 1, 3 and .1, .3
    assert "  w/ray: 2 ok runs, wall 3 s, 0.3 s/round" in text
    assert "| cell |" not in text  # the headline only, not the tables
