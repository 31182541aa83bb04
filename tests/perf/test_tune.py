"""`fedloom tune`: search spaces parsed without evaluating anything, and a real Ray Tune search
whose ASHA scheduler stops a bad trial after its first round, with the best config written as a
runnable TOML that reproduces the best trial."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from kernel.options import ConfigError
from kernel.run import runner
from kernel.run.config import load
from perf import tune as ft

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "kind", "args"), [
    ("protocol.server_lr=loguniform(1e-3,1)", "loguniform", [1e-3, 1]),
    ("workload.lr=choice(0.05, 0.1)", "choice", [0.05, 0.1]),
    ("protocol.aggregator=grid(\"mean\", \"median\")", "grid", ["mean", "median"]),
    ("workload.batch_size=randint(8,64)", "randint", [8, 64]),
    ("protocol.mu=quniform(0,1,0.25)", "quniform", [0, 1, 0.25]),
    ("protocol.betas=choice([0.9, 0.99], [0.8, 0.9])", "choice", [[0.9, 0.99], [0.8, 0.9]]),
    ("run.rounds=3", "value", [3]),
])
def test_spaces_parse(text: str, kind: str, args: list[Any]) -> None:
    p = ft.parse_param(text)
    assert (p.kind, p.args) == (kind, args)


@pytest.mark.parametrize(("text", "says"), [
    ("lr=choice(1,2)", "section.key=SPACE"),
    ("workload.lr=gaussian(0,1)", "unknown space 'gaussian'"),
    ("workload.lr=uniform(1)", "uniform takes 2 numbers"),
    ("workload.lr=loguniform(0,1)", "bounds > 0"),
    ("workload.lr=uniform(2,1)", "lower bound"),
    ("workload.lr=randint(1.5,3)", "two integers"),
    ("workload.lr=choice()", "at least one value"),
    ("workload.lr=uniform(__import__('os'),1)", "uniform takes 2 numbers"),
])
def test_bad_spaces_name_the_problem(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        ft.parse_param(text)


def test_a_searched_key_the_config_refuses_fails_before_any_trial(capsys: Any) -> None:
    code = ft.main(["tune", str(ROOT / "perf/workloads/w1.toml"),
                    "--param", "protocol.server_lrr=uniform(0.1,1)"])
    assert code == ft.EXIT_ERROR
    assert "server_lrr" in capsys.readouterr().err


def test_round_rows_become_tune_reports() -> None:
    got: list[dict[str, Any]] = []
    rep = ft.TuneReport(3, got.append)
    rep.update({"name": "round", "value": 2, "node": 0, "t": 1.0, "accuracy": 0.5,
                "loss": None, "clients": 4, "aggregated": True})
    rep.update({"name": "late", "value": 1})
    assert got == [{"round": 2, "test_accuracy": 0.5, "clients": 4}]


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_the_bad_trial_and_the_best_config_reproduces(tmp_path: Path,
                                                                 capsys: Any) -> None:
    pytest.importorskip("ray.tune")
    sets = ["--set", "workload.clients=2", "--set", "run.rounds=3",
            "--set", "workload.model=linear", "--set", "workload.samples_per_client=64",
            "--set", "workload.test_samples=200"]
    code = ft.main([str(ROOT / "perf/workloads/w1.toml"),
                    "--param", "workload.lr=grid(0.1, 0.0001)", "--samples", "1",
                    "--max-concurrent", "1", "--num-cpus", "1", "--metric", "test_accuracy",
                    "--mode", "max", *sets, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == ft.EXIT_OK, out
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    by_lr = {float(r["workload.lr"]): r for r in rows}
    assert by_lr[0.1]["rounds"] == "3" and by_lr[0.1]["stopped_early"] == "False"
    assert by_lr[0.0001]["rounds"] == "1" and by_lr[0.0001]["stopped_early"] == "True"
    assert "stopped early" in out and "best" in out
    assert (tmp_path / "search.png").stat().st_size > 0
    summary = json.loads((tmp_path / "results.json").read_text())
    best = summary["trials"][summary["best"]]
    assert best["params"] == {"workload.lr": 0.1}
    # The best config is a complete run config: run alone, it gives the best trial's metric.
    again = runner.execute(load(tmp_path / "best_config.toml", ["run.progress=false"]),
                           quiet=True).result
    assert again["test_accuracy"] == pytest.approx(best["metric"], abs=0)
