"""Per-client evaluation in FedAvg: a row per evaluated client, the per-round spread beside the
global accuracy, extra metrics kept; and a W1 run that imports nothing heavy it does not need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernel import registry
from kernel.options import ConfigError
from kernel.run import config as kconfig
from kernel.run import runner
from kernel.run.outputs import read_metrics
from protocols import learners

ROOT = Path(__file__).resolve().parents[3]
SMALL = {"run": {"rounds": 2, "progress": False}, "protocol": {"name": "fedavg"},
         "workload": {"model": "logreg", "clients": 6, "lr": 0.5},
         "data": {"dataset": "digits", "holdout": 0.2,
                  "partition": {"kind": "dirichlet", "alpha": 0.5, "min_partition_size": 5}}}


class Extra:
    """Wraps the torch learner, adding one metric to train and evaluate."""

    def __init__(self, config):
        inner = dict(config, workload=dict(config["workload"], learner="torch"))
        self.inner = learners.make(inner)
        self.clients, self.data = self.inner.clients, self.inner.data

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, model, client, rng, hooks=None):
        res = self.inner.train(model, client, rng, hooks)
        res.metrics["grad_norm"] = 2.0
        return res

    def evaluate(self, model, client=None):
        res = self.inner.evaluate(model, client)
        return None if res is None else dict(res, top2=0.5)


registry.declare("learners")(Extra)


def test_per_client_rows_and_round_spread(tmp_path):
    cfg = kconfig.validate(dict(SMALL, eval={"clients": 0.5, "every": 1},
                                workload=dict(SMALL["workload"],
                                              learner=f"{__name__}:Extra")))
    result = runner.run(cfg, tmp_path, quiet=True)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    rounds = [r for r in rows if r["name"] == "round"]
    per = [r for r in rows if r["name"] == "client_eval"]
    assert len(rounds) == 2 and len(per) == 2 * 3  # half of 6 clients, each round
    for rnd in rounds:
        mine = [r for r in per if r["round"] == rnd["value"]]
        accs = np.array([r["value"] for r in mine])
        assert rnd["clients_evaluated"] == 3
        assert rnd["client_accuracy_mean"] == pytest.approx(accs.mean())
        assert rnd["client_accuracy_std"] == pytest.approx(accs.std())
        assert rnd["client_accuracy_worst"] == accs.min()
        assert rnd["client_accuracy_p10"] == pytest.approx(np.percentile(accs, 10))
        assert rnd["test_top2"] == 0.5 and rnd["train_grad_norm"] == 2.0
        assert rnd["train_steps"] > 0 and rnd["train_loss"] > 0
        assert all(r["top2"] == 0.5 and r["samples"] > 0 for r in mine)
    chosen = [[r["client"] for r in per if r["round"] == k] for k in (1, 2)]
    assert chosen[0] != chosen[1]  # a fresh seeded sample each round
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["extra"]["client_accuracy_mean"] == rounds[-1]["client_accuracy_mean"]
    assert result["test_accuracy"] == rounds[-1]["accuracy"]
    from kernel.run.cli import summary

    worst = rounds[-1]["client_accuracy_worst"]
    assert f"worst {worst:.4f} (3 evaluated)" in summary(result, tmp_path)
    again = runner.run(cfg, tmp_path / "again", quiet=True)
    assert again["final_model_sha256"] == result["final_model_sha256"]
    rows2 = read_metrics(tmp_path / "again" / "metrics.jsonl", drop_wall=True)
    assert rows2 == read_metrics(tmp_path / "metrics.jsonl", drop_wall=True)


def test_eval_defaults_to_every_client_with_a_holdout_and_refuses_without():
    from protocols import fedavg

    cfg = kconfig.validate(SMALL)

    dep = fedavg.build(cfg)
    assert dep.make_node(0).ev.clients == 1.0
    bad = dict(SMALL, data=dict(SMALL["data"], holdout=0.0), eval={"clients": 1.0})
    with pytest.raises(ConfigError, match=r"\[eval\] clients = 1.0 scores clients' held-out "
                                          r"splits, but there are none"):
        fedavg.build(kconfig.validate(bad))
    with pytest.raises(ConfigError, match=r"\[eval\] every = 0"):
        fedavg.build(kconfig.validate(dict(SMALL, eval={"every": 0})))


def test_w1_run_imports_nothing_heavy(tmp_path):
    code = ("import sys; from kernel.run.cli import main; "
            f"code = main(['run', '--quiet', '--out', {str(tmp_path)!r}]); "
            "heavy = [m for m in ('torch._dynamo', 'scipy', 'sklearn', 'ray', 'grpc', "
            "'matplotlib') if m in sys.modules]; print(code, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "0 []"
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["test_accuracy"] == pytest.approx(0.863, abs=0.01)  # W1 learns as documented


def test_w7_config_runs_at_10000_clients(tmp_path):
    from perf.bench_learning import w7_data

    path = w7_data(tmp_path / "w7.npz", n=20_000)
    cfg = kconfig.load(ROOT / "perf/workloads/w7.toml",
                       [f"data.dataset=npz:{path}", "run.rounds=1", "run.progress=false"])
    result = runner.run(cfg, quiet=True)
    assert result["reason"] == "finished" and result["messages"] == 200
    learner = learners.make(cfg)
    train = learner.data.train
    assert train.clients == 10_000 and train.sizes.sum() == len(learner.data.y) - 667
    assert train.indices.nbytes + train.bounds.nbytes < 300_000  # clients are index arrays
