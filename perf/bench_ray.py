"""The ray transport against bare Ray, side by side in one run (2 shards, Ray at 2 CPUs).

- W3 effective rate, (2 x 20 x 40 MB) / seconds per round, on ray beside bare `ray.put` +
  `ray.get` of the same 40 MB arrays between the same number of actors (one round: a model put
  once and read by every client, each client's update put and read back), and inproc.
- W1 total wall (process start to result, each run a fresh process that starts its own Ray)
  and rounds-only seconds, ray beside inproc; ray's start-up seconds and the peak RSS of the
  whole process tree (driver, raylet, GCS, workers) as the runner samples it.
- Tiny messages from a node on one shard to a node on the other, batched by the transport,
  beside one actor call per message.

    python -m perf.bench_ray [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.registry import declare
from kernel.registry import load as registry_load
from kernel.run import runner
from kernel.run.config import load
from kernel.wire.codec import Codec, join
from transports.base import Job
from transports.ray import RayTransport

WORKLOADS = Path(__file__).resolve().parent / "workloads"
MB = 1e6
FLOOD = "perf.bench_ray:build_flood"


# -- tiny messages: a credit-windowed stream from node 0 (shard 0) to node 1 (shard 1) -------------

class Flood(Protocol):
    """Node 0 streams `total` tiny messages to node 1 with a window of `window` unacknowledged;
    node 1 acknowledges every `ack` and says "done" at the end."""

    def __init__(self, total: int, window: int, ack: int) -> None:
        self.total, self.window, self.ack = total, window, ack
        self.sent = 0
        self.got = 0

    def on_start(self, ctx: Context) -> None:
        if ctx.id == 0:
            self._send(ctx, self.window)

    def _send(self, ctx: Context, k: int) -> None:
        for _ in range(min(k, self.total - self.sent)):
            ctx.send(1, "m", i=self.sent)
            self.sent += 1

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind == "m":
            self.got += 1
            if self.got % self.ack == 0:
                ctx.send(0, "ack")
            if self.got == self.total:
                ctx.send(0, "done", n=self.got)
        elif msg.kind == "ack":
            self._send(ctx, self.ack)
        elif msg.kind == "done":
            ctx.finish({"received": msg.n})

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        pass


@declare("protocols")
def build_flood(config: Mapping[str, Any]) -> Deployment:
    """Two nodes: `total` messages, `window` in flight, acknowledged every `ack`."""
    p = config["protocol"]
    total, window, ack = int(p["total"]), int(p.get("window", 4000)), int(p.get("ack", 1000))
    return Deployment(node_ids=(0, 1), make_node=lambda i: Flood(total, window, ack))


def flood_rate(total: int) -> float:
    """Messages per second through the ray transport between two shards."""
    config = {"run": {"seed": 0, "rounds": 1}, "protocol": {"name": FLOOD, "total": total}}
    dep = registry_load("protocols", FLOOD)(config)
    tr = RayTransport({"shards": 2})
    try:
        out = tr.run(Job(config=config, deployment=dep, seed=0, until=300.0))
    finally:
        tr.close()
    assert out.result == {"received": total}, out.result
    return total / out.clock_s


@ray.remote(num_cpus=1)
class _Sink:
    def __init__(self) -> None:
        self.n = 0

    def recv(self, frame: bytes) -> None:
        self.n += 1

    def count(self) -> int:
        return self.n


@ray.remote(num_cpus=1)
class _Source:
    def blast(self, sink: Any, frame: bytes, n: int) -> float:
        t = time.perf_counter()
        ray.get([sink.recv.remote(frame) for _ in range(n)])
        return time.perf_counter() - t


def unbatched_rate(n: int) -> float:
    """Tiny codec frames per second with one actor call each, actor to actor."""
    frame = bytes(join(Codec().encode(Message(0, 1, "m", {"i": 7}, 0.0, 1))))
    sink, src = _Sink.remote(), _Source.remote()  # type: ignore[attr-defined]
    try:
        seconds = ray.get(src.blast.remote(sink, frame, n))
        assert ray.get(sink.count.remote()) == n
        return n / seconds
    finally:
        ray.kill(sink)
        ray.kill(src)


# -- W3 and its bare-Ray floor ---------------------------------------------------------------

@ray.remote(num_cpus=1)
class _Server:
    def __init__(self, size: int) -> None:
        self.x = np.random.default_rng(0).standard_normal(size).astype(np.float32)

    def publish(self) -> list[Any]:
        return [ray.put(self.x)]  # in a list: the receiver gets the reference, not the array

    def collect(self, refs: list[Any]) -> int:
        return sum(int(ray.get(r).nbytes) for r in refs)


@ray.remote(num_cpus=1)
class _Clients:
    def round(self, refs: list[Any], clients: int) -> list[Any]:
        out = []
        for _ in range(clients):
            model = ray.get(refs[0])  # zero-copy from the object store
            out.append(ray.put(model))
        return out


def bare_w3_round_s(size: int, clients: int, rounds: int) -> float:
    """Median seconds of one bare round: 1 put read by `clients`, `clients` puts read back
    (the first round, which pays the object store's fresh pages, is left out as in W3's)."""
    server, workers = _Server.remote(size), _Clients.remote()  # type: ignore[attr-defined]
    try:
        times = []
        for _ in range(rounds + 1):
            t = time.perf_counter()
            refs = ray.get(workers.round.remote(ray.get(server.publish.remote()), clients))
            ray.get(server.collect.remote(refs))
            times.append(time.perf_counter() - t)
            del refs
        return statistics.median(times[1:])
    finally:
        ray.kill(server)
        ray.kill(workers)


def w3_round_s(kind: str, overrides: list[str]) -> tuple[float, dict[str, Any]]:
    """Steady-state seconds per W3 round and the result: the median gap between consecutive
    "round" rows as the driver received them (the runner's `wall_s` stamp), so start-up, the
    first round's page faults and shutting down are left out on every side alike."""
    cfg = load(WORKLOADS / "w3.toml", ["run.progress=false", f"transport.kind={kind}",
                                       *overrides])
    rec = runner.execute(cfg, quiet=True)
    stamps = [float(r["wall_s"]) for r in rec.rows if r["name"] == "round"]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    res = rec.result
    return (statistics.median(gaps) if gaps else res["rounds_s"] / res["rounds"]), res


# -- W1 in fresh processes -------------------------------------------------------------------

def w1_process(kind: str) -> dict[str, Any]:
    """One W1 run as `fedloom run` in a fresh process; its result.json."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [sys.executable, "-m", "kernel.run.cli", "run", str(WORKLOADS / "w1.toml"), "--set",
             f"transport.kind={kind}", "--out", d, "--quiet"],
            check=True, timeout=600, capture_output=True,
        )
        result: dict[str, Any] = json.loads((Path(d) / "result.json").read_text())
        return result


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in runs))


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The measurements as rows (name, value, unit, floor, floor_name, ratio, runs)."""
    repeats = 1 if quick else 3
    rows: list[dict[str, Any]] = []

    # W1: each run its own process and its own Ray, alternating.
    w1: dict[str, list[dict[str, Any]]] = {"ray": [], "inproc": []}
    for _ in range(repeats):
        for kind in ("ray", "inproc"):
            w1[kind].append(w1_process(kind))
    assert len({r["final_model_sha256"] for r in w1["ray"] + w1["inproc"]}) == 1
    for key, label in (("wall_s", "total wall"), ("rounds_s", "rounds-only")):
        v, f = _med(w1["ray"], key), _med(w1["inproc"], key)
        rows.append({"name": f"w1 {label} (ray, 2 shards)", "value": v, "unit": "s",
                     "floor": f, "floor_name": "inproc", "ratio": v / f, "runs": repeats})
    rows.append({"name": "w1 start-up (ray)", "value": _med(w1["ray"], "startup_s"),
                 "unit": "s", "floor": _med(w1["inproc"], "startup_s"),
                 "floor_name": "inproc", "runs": repeats})
    v, f = _med(w1["ray"], "peak_rss_mb"), _med(w1["inproc"], "peak_rss_mb")
    rows.append({"name": "w1 peak RSS, process tree (ray)", "value": v, "unit": "MB",
                 "floor": f, "floor_name": "inproc", "ratio": v / f, "runs": repeats})

    # The rest shares one Ray, which the transport joins.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        size, clients = 10_000_000, 20
        over = [] if not quick else ["workload.flat_size=2500000"]
        if quick:
            size = 2_500_000
        volume = 2 * clients * size * 4
        ray_s, inproc_s, bare_s = [], [], []
        for _ in range(repeats):
            s, res = w3_round_s("ray", over)
            ray_s.append(s)
            inproc_s.append(w3_round_s("inproc", over)[0])
            bare_s.append(bare_w3_round_s(size, clients, 2))
        r, b, i = (statistics.median(x) for x in (ray_s, bare_s, inproc_s))
        rows.append({"name": "w3 effective rate (ray)", "value": volume / r / MB, "unit": "MB/s",
                     "floor": volume / b / MB, "floor_name": "bare ray.put+ray.get, 2 actors",
                     "ratio": b / r, "runs": repeats})
        rows.append({"name": "w3 effective rate (inproc)", "value": volume / i / MB,
                     "unit": "MB/s", "floor": volume / b / MB,
                     "floor_name": "bare ray.put+ray.get, 2 actors", "ratio": b / i,
                     "runs": repeats})

        total = 20_000 if quick else 100_000
        batched = [flood_rate(total) for _ in range(repeats)]
        single = [unbatched_rate(3000 if quick else 10_000) for _ in range(repeats)]
        v, f = statistics.median(batched), statistics.median(single)
        rows.append({"name": "tiny msgs shard to shard (ray)", "value": v, "unit": "msg/s",
                     "floor": f, "floor_name": "one actor call each", "ratio": v / f,
                     "runs": repeats})
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run each, W3 at a quarter size")
    args = ap.parse_args()
    for row in run(quick=args.quick):
        ratio = f"  ratio {row['ratio']:.3f}" if "ratio" in row else ""
        print(f"{row['name']:<34} {row['value']:12.3f} {row['unit']:<5} vs {row['floor_name']} "
              f"{row['floor']:12.3f}{ratio}  (median of {row['runs']})")


if __name__ == "__main__":
    main()
