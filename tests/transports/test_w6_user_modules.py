"""W6 (digits, cnn, Dirichlet clients, per-client evaluation) ends with the same model on
inproc, ray and grpc; ray actors and grpc shard processes import the user's model module from
the directory `fedloom run` was started in, as the driver does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FEDLOOM = Path(sys.executable).parent / "fedloom"
USER_MODULE = '''
from kernel.registry import declare
from protocols.learning import models


@declare("models")
def my_cnn(input_shape, classes):
    return models.build("cnn", input_shape, classes)
'''

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.grpc]


def _run(cwd: Path, kind: str, model: str) -> dict:
    out = cwd / f"out-{kind}"
    proc = subprocess.run(
        [str(FEDLOOM), "run", str(ROOT / "perf/workloads/w6.toml"), "--quiet", "--out", str(out),
         "--set", "run.rounds=1", "--set", f"transport.kind={kind}",
         "--set", f"workload.model={model}", "--set", "run.time_limit=240"],
        cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.skipif(not FEDLOOM.exists(), reason="needs the fedloom console script")
def test_w6_same_model_on_every_transport_with_a_model_from_the_cwd(tmp_path):
    from kernel.run import config, runner

    (tmp_path / "mymodels.py").write_text(USER_MODULE)
    cfg = config.load(ROOT / "perf/workloads/w6.toml", ["run.rounds=1", "run.progress=false"])
    base = runner.run(cfg, tmp_path / "out-inproc", quiet=True)  # the built-in cnn, here
    assert base["extra"]["clients_evaluated"] == 20
    for kind in ("ray", "grpc"):
        got = _run(tmp_path, kind, "mymodels:my_cnn")
        assert got["final_model_sha256"] == base["final_model_sha256"], kind
        assert got["test_accuracy"] == base["test_accuracy"]
        assert got["extra"]["client_accuracy_mean"] == base["extra"]["client_accuracy_mean"]


def test_missing_user_module_says_where_it_looked(tmp_path):
    proc = subprocess.run(
        [str(FEDLOOM), "run", "--quiet", "--out", str(tmp_path / "o"),
         "--set", "workload.model=nomodule_here:net"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no module named 'nomodule_here' (looked in" in proc.stderr
    assert str(tmp_path) in proc.stderr and not (tmp_path / "o").exists()
