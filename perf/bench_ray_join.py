"""Driver-side start-up of a ray run: joining a running cluster against starting a local Ray.

    python -m perf.bench_ray_join [--config perf/workloads/w1.toml] [--reps 3] [--out DIR]
                                  [--head-preload torch,transports.ray_shard,protocols.fedavg]

Starts one head with `ray start --head --block` (own ports, own temp dir, token
authentication on; not counted), then runs the same `fedloom run CONFIG --set
transport.kind=ray` as fresh processes, alternating: local Ray (`transport.address = "local"`)
and joined (`RAY_ADDRESS` = the head). For each run: seconds from spawn to the first round line
on stderr ("start-up"), and to exit ("total"). Prints medians side by side and writes
results.json, and the median of each part of the runs' result.json `timings`. With
`--head-preload M1,M2`, the head is started with `--system-config
'{"preload_python_modules": [M1, M2]}'`, so the workers it keeps ready have imported those
modules before a shard reaches them. Stops the head it started by pid (never `ray stop`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_head(env: dict[str, str], temp: str, preload: list[str],
               python: str = sys.executable) -> tuple[subprocess.Popen[str], int]:
    """`ray start --head --block` with its own ports and temp dir (run by `python`); returns the
    process and its GCS port once it says it started."""
    port = _port()
    argv = [python, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
            f"--temp-dir={temp}", "--include-dashboard=false", f"--dashboard-port={_port()}",
            f"--ray-client-server-port={_port()}", f"--dashboard-agent-listen-port={_port()}",
            "--disable-usage-stats", "--block"]
    if preload:
        argv.append("--system-config=" + json.dumps({"preload_python_modules": preload}))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # blocks on the pipe until the head says it is up
        if "Ray runtime started" in line:
            return proc, port
    raise RuntimeError("ray start --head exited before starting")


def stop(proc: subprocess.Popen[str]) -> None:
    """Stop a head `start_head` started, by pid (its process tree), never `ray stop`."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        p.kill()


def _one(config: Path, env: dict[str, str], extra: list[str], out: Path) -> dict[str, float]:
    argv = [sys.executable, "-m", "kernel.run.cli", "run", str(config), "--set",
            "transport.kind=ray", *extra, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = None
    for line in proc.stderr:
        if first is None and line.startswith("round 1/"):
            first = time.perf_counter() - t0
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0 or first is None:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {rc})")
    result = json.loads((out / "result.json").read_text())
    return {"startup_to_round1_s": first, "total_s": total, "wall_s": result["wall_s"],
            "transport_startup_s": result["startup_s"],
            **{f"t.{k}": float(v) for k, v in (result.get("timings") or {}).items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "perf/workloads/w1.toml")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--head-preload", default="", metavar="M1,M2",
                    help="modules the head's workers import before work reaches them")
    ns = ap.parse_args(argv)
    out = ns.out or Path(tempfile.mkdtemp(prefix="fl-join-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    temp = tempfile.mkdtemp(prefix="fljoin", dir="/tmp")
    head, port = start_head(env, temp, [m for m in ns.head_preload.split(",") if m])
    cells: dict[str, list[dict[str, float]]] = {"local": [], "joined": []}
    try:
        for rep in range(ns.reps):
            cells["local"].append(_one(ns.config, env, ["--set", "transport.address=local"],
                                       out / f"local-{rep}"))
            cells["joined"].append(_one(ns.config, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                        [], out / f"joined-{rep}"))
    finally:
        stop(head)
    med: dict[str, Any] = {k: {m: statistics.median(r.get(m, 0.0) for r in v) for m in v[0]}
                           for k, v in cells.items()}
    (out / "results.json").write_text(json.dumps({"runs": cells, "medians": med}, indent=2))
    print(f"{'median of ' + str(ns.reps):<16}{'spawn->round 1 s':>18}{'total s':>10}"
          f"{'transport startup s':>21}")
    for k, m in med.items():
        print(f"{k:<16}{m['startup_to_round1_s']:>18.2f}{m['total_s']:>10.2f}"
              f"{m['transport_startup_s']:>21.2f}")
    parts = [m for m in med["local"] if m.startswith("t.")]
    for m in parts:
        print(f"  {m[2:]:<22}" + "".join(f"{med[k].get(m, 0.0):>10.3f}" for k in med))
    ratio = med["joined"]["startup_to_round1_s"] / med["local"]["startup_to_round1_s"]
    print(f"joined/local spawn->round 1: {ratio:.2f}x   results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
