"""`fedloom run` on a local Ray it starts itself: each part of the path timed, the modules the
shards need imported ahead in Ray's prestarted workers, the fast exit leaving no Ray process
behind, and the inproc model all the same."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray")

from kernel.api import Deployment, imports, prepare_imports  # noqa: E402
from kernel.registry import load as registry_load  # noqa: E402
from kernel.run import runner  # noqa: E402
from kernel.run.config import load, validate  # noqa: E402
from transports.base import Job  # noqa: E402
from transports.ray import PHASES, _preload  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
W1 = ROOT / "perf/workloads/w1.toml"
SMALL = ["run.rounds=2", "workload.clients=4", "workload.samples_per_client=64",
         "workload.test_samples=200"]


def test_preload_is_what_prepare_declared_plus_the_shard_code_and_the_protocol() -> None:
    cfg = validate(load(W1, SMALL))
    dep = registry_load("protocols", "fedavg")(cfg)
    assert prepare_imports(dep) == ("torch",)  # the torch learners' prepare says so
    job = Job(config=cfg, deployment=dep, seed=0)
    assert _preload(job) == ("torch", "transports.ray_shard", "protocols.fedavg")

    @imports("numpy", "json")
    def marked() -> None: ...

    def bad() -> None: ...

    bad.imports = "torch"  # type: ignore[attr-defined]  # a string, not a tuple: ignored
    nodes = Deployment(node_ids=[0], make_node=lambda i: None)  # type: ignore[arg-type,return-value]
    assert prepare_imports(nodes) == ()
    assert prepare_imports(Deployment([0], nodes.make_node, prepare=marked)) == ("numpy", "json")
    assert prepare_imports(Deployment([0], nodes.make_node, prepare=bad)) == ()


def _marked(marker: str) -> list[psutil.Process]:
    """Processes whose environment carries `marker` (every process the run started inherits
    it: the head's processes, the raylet's workers and agents)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FEDLOOM_RAY_EXIT_TEST") == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_fedloom_run_on_ray_is_timed_in_parts_and_leaves_no_ray_process(tmp_path: Path) -> None:
    marker = secrets.token_hex(8)
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(path), FEDLOOM_RAY_EXIT_TEST=marker)
    out = tmp_path / "out"
    sets = [a for s in [*SMALL, "transport.kind=ray", "transport.address=local",
                        "transport.preload=true"] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "kernel.run.cli", "run", str(W1), *sets,
                           "--out", str(out), "--quiet", "--timings"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    left = _marked(marker)
    _, alive = psutil.wait_procs(left, timeout=10)
    for p in alive:  # ours to clean up, then fail
        p.kill()
    assert proc.returncode == 0, proc.stderr
    assert alive == [], [p.pid for p in alive]

    result = json.loads((out / "result.json").read_text())
    timings = result["timings"]
    assert set(PHASES) <= set(timings)
    assert timings["ray_init_s"] > 0 and timings["actors_s"] > 0 and timings["watch_s"] > 0
    assert timings["shard_build_s"] <= timings["actors_s"]
    assert timings["shutdown_s"] == 0.0  # no graceful ray.shutdown on the way out
    assert result["transport_info"]["started"] is True
    printed = proc.stderr[proc.stderr.index("timings (seconds"):]
    for label in ("ray.init", "shard actors", "slowest shard's own build", "rounds",
                  "write outputs, exit", "total"):
        assert label in printed, printed

    # Workers that imported torch before the shards set their thread count: same model.
    want = runner.execute(load(W1, [*SMALL, "run.progress=false"]), quiet=True)
    assert result["final_model_sha256"] == want.result["final_model_sha256"]


def test_preload_is_a_boolean_off_by_default() -> None:
    from kernel.options import ConfigError
    from transports.ray import check_options

    assert check_options({})["preload"] is False
    with pytest.raises(ConfigError, match=r"\[transport\] preload = 'yes'.*boolean"):
        check_options({"preload": "yes"})
