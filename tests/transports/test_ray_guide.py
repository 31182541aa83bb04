"""docs/ray-cluster.md, "Try it on one machine", run as printed: a real head and a real second
node started with `ray start` on this machine (token authentication on, own ports and folder),
W1 joined through RAY_ADDRESS, the inproc model at the end. Also through the same cluster: a
wrong token fails naming authentication, and a user's module that is not installed is shipped
to the shards. Only the processes this test started are stopped, by pid (never `ray stop`)."""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("ray")

import contextlib

from kernel.run import runner  # noqa: E402
from kernel.run.config import load  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "ray-cluster.md"
START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 300.0


def guide_lines() -> list[str]:
    """The shell lines of the guide's one-machine block."""
    text = GUIDE.read_text(encoding="utf-8")
    block = text.split("<!-- guide:one-machine -->", 1)[1].split("```sh\n", 1)[1]
    return [ln for ln in block.split("```", 1)[0].splitlines() if ln.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One `ray start ... --block` process; its output is read on a thread, so waiting for
    "Ray runtime started" blocks on the pipe rather than polling."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_started(self) -> None:
        while True:
            try:
                line = self.lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError("ray start printed nothing for "
                                     f"{START_TIMEOUT_S:g} s:\n" + "".join(self.log)) from None
            if line is None:
                raise AssertionError("ray start exited:\n" + "".join(self.log))
            self.log.append(line)
            if "Ray runtime started" in line:
                return

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops what it started), then SIGKILL to any of
        its processes still there; only pids of this node's process tree."""
        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(
                recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(tree, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_dir() -> Iterator[Path]:
    """Ray's temp dir for the nodes: short, since Ray's socket paths inside it must fit 107
    bytes (pytest's tmp_path does not)."""
    path = Path(tempfile.mkdtemp(prefix="flray", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in reversed(started):
        node.stop()


def _subst(line: str, ports: dict[str, int], tmp: Path, short: Path) -> str:
    py = shlex.quote(sys.executable)
    for default, port in ports.items():
        line = line.replace(default, str(port))
    return (line.replace("/tmp/fedloom-ray", str(short))
                .replace("runs/w1-cluster", str(tmp / "out"))
                .replace("python -c", f"{py} -c")
                .replace("ray start", f"{py} -m ray.scripts.scripts start")
                .replace("fedloom run", f"{py} -m kernel.run.cli run"))


def _fedloom(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernel.run.cli", "run", *argv], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_the_guides_commands_run_w1_on_a_two_node_cluster(tmp_path: Path, ray_dir: Path,
                                                           nodes: list[Node]) -> None:
    lines = guide_lines()
    ports = {d: _free_port() for d in ("6379", "8265", "10001", "52365", "52366")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    runs: list[subprocess.CompletedProcess[str]] = []
    for raw in lines:
        line = _subst(raw, ports, tmp_path, ray_dir)
        if line.startswith("export "):
            name, _, expr = line.removeprefix("export ").partition("=")
            env[name] = subprocess.run(["bash", "-c", f"printf %s {expr}"], env=env,
                                       capture_output=True, text=True, check=True).stdout
        elif line.endswith("&"):
            nodes.append(Node(shlex.split(line[:-1]), env))
            nodes[-1].wait_started()
        elif line.startswith("kill "):
            continue  # the fixture stops the nodes by pid, after the checks below
        else:
            argv = shlex.split(line)
            run_env = dict(env)
            while "=" in argv[0] and not argv[0].startswith("/"):
                k, _, v = argv.pop(0).partition("=")
                run_env[k] = v
            runs.append(subprocess.run(argv, env=run_env, cwd=ROOT, capture_output=True,
                                       text=True, timeout=RUN_TIMEOUT_S))
    assert len(nodes) == 2 and len(runs) == 1
    assert runs[0].returncode == 0, runs[0].stderr[-3000:]
    want = runner.execute(load(ROOT / "perf/workloads/w1.toml", ["run.progress=false"]),
                          quiet=True).result["final_model_sha256"]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["final_model_sha256"] == want
    info = result["transport_info"]
    assert (info["started"], info["nodes"], info["auth"]) == (False, 2, "token")
    assert info["address"].endswith(f":{ports['6379']}")
    assert info["logs"].startswith(str(ray_dir))
    assert len({s["node_id"] for s in result["shards"]}) == 2  # one shard per node
    assert "joined, 2 node(s), auth token" in runs[0].stdout

    address = f"127.0.0.1:{ports['6379']}"
    # A wrong token: refused by name, not after ray.init's retries.
    bad = _fedloom(["perf/workloads/w1.toml", "--set", "transport.kind=ray",
                    "--out", str(tmp_path / "bad")],
                   {**env, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN": "0" * 64})
    assert bad.returncode == 1
    assert "refused this process's authentication token (read from RAY_AUTH_TOKEN)" in bad.stderr
    assert "ray stop" not in bad.stderr

    # The user's own module, importable only here: shipped to both nodes as py_modules.
    mods = tmp_path / "usermods"
    mods.mkdir()
    (mods / "myfed_guide.py").write_text(
        "import dataclasses, sys\n"
        "from kernel.registry import declare\nfrom protocols import fedavg\n\n\n"
        "def make(dep, i):\n"
        "    if i == 0:  # only shards make nodes on ray\n"
        "        print('myfed_guide: warning from the server', file=sys.stderr, flush=True)\n"
        "        print('myfed_guide: chatter on stdout', flush=True)\n"
        "    return dep.make_node(i)\n\n\n"
        "@declare('protocols')\ndef build(config):\n"
        "    dep = fedavg.build(config)\n"
        "    return dataclasses.replace(dep, make_node=lambda i: make(dep, i))\n")
    # (the numpy `linear` model: shards that need no torch start faster)
    linear = ["run.progress=false", "workload.model=linear"]
    own = _fedloom(["perf/workloads/w1.toml", "--set", "transport.kind=ray", "--set",
                    "protocol.name=myfed_guide:build", *[x for s in linear for x in ("--set", s)],
                    "--out", str(tmp_path / "own"), "--quiet"],
                   {**env, "RAY_ADDRESS": address, "PYTHONPATH": str(mods)})
    assert own.returncode == 0, own.stderr[-3000:]
    shipped: dict[str, Any] = json.loads((tmp_path / "own" / "result.json").read_text())
    assert shipped["final_model_sha256"] == runner.execute(
        load(ROOT / "perf/workloads/w1.toml", linear), quiet=True).result["final_model_sha256"]
    assert shipped["transport_info"]["runtime_env"]["py_modules"][0].startswith("gcs://")
    # log_to_driver = "errors" (default): the shard's stderr reaches this terminal, prefixed
    # with the shard; its stdout stays in the log folder.
    said = [ln for ln in own.stderr.splitlines() if "myfed_guide: warning" in ln]
    assert said and "(shard 0 pid=" in said[0], own.stderr[-2000:]
    assert "chatter on stdout" not in own.stderr + own.stdout

    # Last (it leaves the cluster claiming another Ray version): a version mismatch is named,
    # with both versions and the fix.
    claim = (
        "import json, sys, ray\n"
        "from ray._common.usage import usage_constants as usage_constant\n"
        "from ray._private import ray_constants\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        "gcs = ray._private.worker.global_worker.gcs_client\n"
        "key, ns = usage_constant.CLUSTER_METADATA_KEY, ray_constants.KV_NAMESPACE_CLUSTER\n"
        "meta = json.loads(gcs.internal_kv_get(key, namespace=ns))\n"
        "meta['ray_version'] = '2.0.0'\n"
        "gcs.internal_kv_put(key, json.dumps(meta).encode(), True, namespace=ns)\n"
        "ray.shutdown()\n"
        "from kernel.run.cli import main\n"
        "sys.exit(main(['run', 'perf/workloads/w1.toml', '--set', 'transport.kind=ray', "
        f"'--quiet', '--out', {str(tmp_path / 'old')!r}]))\n")
    old = subprocess.run([sys.executable, "-c", claim], env={**env, "RAY_ADDRESS": address},
                         cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert old.returncode == 1, old.stderr[-2000:]
    assert "version mismatch" in old.stderr and "2.0.0" in old.stderr
    assert "this process runs Ray 2." in old.stderr and "ray stop" not in old.stderr
