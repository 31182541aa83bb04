"""W4 (gossip-64) on inproc beside the same 50 rounds as numpy array ops in one process.

fedloom: `runner.execute(perf/workloads/w4.toml)` and its `rounds_s` (transport time: node
start-up with the initial vectors, 50 rounds of messages and mixing, the final reports and the
deviation), plus the same on inproc's strict mode (every message through the codec). Floor: the
fastest of three numpy versions of the same work (vectors from the same seeded generators,
50 rounds, max |x_i - mean|): X <- W X on the 64 x 100,000 float32 matrix (one GEMM per
round); the ring-lattice mean as shifted slice adds on X; and fedloom's own per-node adds into
reused buffers without the kernel (so fedloom / that = what the kernel and messages cost). Runs
alternate, medians of `repeats`; the target is fedloom within 2x of the floor.

Scale (`--scale`): synchronous gossip of 1-float vectors on a random 4-regular graph, 10
rounds, at 100,000 and 1,000,000 nodes, each run in a fresh process of its own (so each peak
RSS is that run's alone): messages per second over `rounds_s` (node start-up, the rounds and
the final reports), seconds per round, peak RSS, and the process's CPU seconds (a figure
other load on the machine disturbs less than wall time). Targets: >= 300,000 messages/s at
100,000 nodes; < 15 s per round and < 1.5 GB at 1,000,000. `--against DIR` runs the same scale
runs of the code in DIR (another checkout, say main's) alternating with this one, each in a
process of its own started in its directory, and reports new against old side by side (the
ratio of CPU seconds is the figure other load on the machine disturbs least).

    python -m perf.bench_gossip [--quick] [--scale [N ...] [--against DIR] [--repeats K]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kernel.run import runner
from protocols import gossip, topology

W4 = Path(__file__).resolve().parent / "workloads" / "w4.toml"
TARGET_RATIO = 2.0
# The numpy versions of the same 50 rounds; the fastest in a run is the floor.
FLOORS = {"gemm": "numpy X <- W X (float32 GEMM)",
          "stencil": "numpy shifted adds on X",
          "rows": "numpy per-node adds, no kernel"}


SCALE_NODES = (100_000, 1_000_000)
SCALE_RATE_TARGET = 300_000.0  # messages/s at 100,000 nodes
SCALE_ROUND_TARGET = 15.0  # s per round at 1,000,000 nodes
SCALE_RSS_TARGET = 1536.0  # MB peak at 1,000,000 nodes


def scale_config(nodes: int, rounds: int = 10, dim: int = 1) -> dict[str, Any]:
    """Sync gossip of `dim` floats on a random 4-regular graph of `nodes` nodes."""
    return {"run": {"seed": 0, "rounds": rounds, "progress": False},
            "transport": {"kind": "inproc"},
            "protocol": {"name": "gossip", "mode": "sync", "nodes": nodes, "dim": dim,
                         "track": False, "topology": {"kind": "random_regular", "degree": 4}}}


def scale_one(nodes: int, rounds: int = 10) -> dict[str, Any]:
    """One scale run in this process (call it in a fresh one): its figures."""
    c0 = time.process_time()
    out = runner.execute(scale_config(nodes, rounds), quiet=True)
    res = out.result
    cpu = time.process_time() - c0
    # `rounds_s` holds the nodes' start (initial vectors) as well; node 0's round rows carry
    # the wall clock, so rounds 2..N alone give the steady time per round.
    marks = [float(r["wall_s"]) for r in out.rows if r["name"] == "round" and "wall_s" in r]
    steady = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None
    return {"nodes": nodes, "rounds": rounds, "rounds_s": float(res["rounds_s"]),
            "steady_round_s": steady,
            "build_s": float(res["build_s"]), "messages": int(res["messages"]),
            "cpu_s": cpu, "peak_rss_mb": runner.own_peak_rss_bytes() / 2**20,
            "sha": res["final_model_sha256"]}


def scale_child(n: int, rounds: int, cwd: str | Path | None = None) -> dict[str, Any]:
    """One scale run in a fresh process started in `cwd` (default: this checkout), with the
    1-minute load average before it."""
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-m", "perf.bench_gossip", "--one", str(n),
                          "--rounds", str(rounds)], capture_output=True, text=True,
                         check=False, timeout=3600, cwd=cwd or Path(__file__).parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"gossip scale run at {n} nodes in {cwd or 'this checkout'} "
                           f"failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), load=load)


def against(base: str, nodes: tuple[int, ...], rounds: int, repeats: int) -> list[str]:
    """Lines comparing this checkout with the one in `base`, runs alternating."""
    lines = []
    for n in nodes:
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for _ in range(repeats):
            runs["old"].append(scale_child(n, rounds, base))
            runs["new"].append(scale_child(n, rounds))
        med = {k: {f: statistics.median(r[f] for r in v)
                   for f in ("rounds_s", "cpu_s", "peak_rss_mb", "load")}
               for k, v in runs.items()}
        shas = {r["sha"] for v in runs.values() for r in v}
        msgs = runs["new"][0]["messages"]
        for k in ("old", "new"):
            m = med[k]
            lines.append(f"{n:>9,} nodes {k}: {m['rounds_s']:8.2f} s ({msgs / m['rounds_s']:>9,.0f}"
                         f" msg/s, {m['rounds_s'] / rounds:6.2f} s/round), cpu {m['cpu_s']:8.2f} s"
                         f" ({msgs / m['cpu_s']:>9,.0f} msg/s of cpu), peak {m['peak_rss_mb']:6.0f}"
                         f" MB, load {m['load']:.1f}")
        wall = med["old"]["rounds_s"] / med["new"]["rounds_s"]
        cpu = med["old"]["cpu_s"] / med["new"]["cpu_s"]
        lines.append(f"{n:>9,} nodes old/new: wall {wall:.2f}x, cpu {cpu:.2f}x; same sha: "
                     f"{len(shas) == 1} ({', '.join(sorted(s[:12] for s in shas))}); "
                     f"medians of {repeats}")
    return lines


def scale(nodes: tuple[int, ...] = SCALE_NODES, rounds: int = 10) -> list[dict[str, Any]]:
    """Rows for the scale runs, each in a child process of its own."""
    rows = []
    for n in nodes:
        r = scale_child(n, rounds)
        label = f"gossip random 4-regular, {n:,} nodes x 1 float, {rounds} rounds"
        rate = r["messages"] / r["rounds_s"]
        rows.append({"name": f"{label}: messages/s", "value": rate, "unit": "msg/s",
                     "floor": None, "floor_name": None, "higher_is_better": True,
                     "target": SCALE_RATE_TARGET if n <= 100_000 else None,
                     "cpu_rate": r["messages"] / r["cpu_s"], **r})
        rows.append({"name": f"{label}: s per round", "value": r["rounds_s"] / rounds,
                     "unit": "s", "floor": None, "floor_name": None,
                     "target": SCALE_ROUND_TARGET if n >= 1_000_000 else None})
        if r.get("steady_round_s") is not None:
            rows.append({"name": f"{label}: s per round, rounds 2..{rounds} (start excluded)",
                         "value": r["steady_round_s"], "unit": "s", "floor": None,
                         "floor_name": None,
                         "target": SCALE_ROUND_TARGET if n >= 1_000_000 else None})
        rows.append({"name": f"{label}: peak RSS", "value": r["peak_rss_mb"], "unit": "MB",
                     "floor": None, "floor_name": None,
                     "target": SCALE_RSS_TARGET if n >= 1_000_000 else None})
    return rows


def load(**protocol: Any) -> dict[str, Any]:
    """W4's config, with [protocol] overrides."""
    cfg = tomllib.loads(W4.read_text())
    cfg["protocol"].update(protocol)
    return cfg


def fedloom(cfg: dict[str, Any], strict: bool) -> tuple[float, float]:
    """(rounds_s, max_abs_dev) of one run through the runner."""
    cfg = dict(cfg, transport={"kind": "inproc", "strict": strict})
    res = runner.execute(cfg, quiet=True).result
    return float(res["rounds_s"]), float(res["extra"]["max_abs_dev"])


def _start(n: int, dim: int) -> np.ndarray:
    return np.stack([gossip.initial_vector(i, dim) for i in range(n)])


def numpy_gemm(n: int, dim: int, rounds: int, degree: int) -> tuple[float, float]:
    """(seconds, max_abs_dev) of X <- W X, `rounds` times, float32."""
    t0 = time.perf_counter()
    w = topology.mixing_matrix(topology.ring_lattice(n, degree)).astype(np.float32)
    x = _start(n, dim)
    for _ in range(rounds):
        x = w @ x
    dev = float(np.abs(x - x.mean(axis=0, dtype=np.float64)).max())
    return time.perf_counter() - t0, dev


def numpy_rows(n: int, dim: int, rounds: int, degree: int) -> tuple[float, float]:
    """(seconds, max_abs_dev) of fedloom's own arithmetic without the kernel: per node, the
    sum of itself and its neighbours (sorted ids) into one of two reused buffers, then scaled."""
    t0 = time.perf_counter()
    neigh = topology.ring_lattice(n, degree).out
    cur = [gossip.initial_vector(i, dim) for i in range(n)]
    spare = [np.empty_like(v) for v in cur]
    scale = np.float32(1.0 / (degree + 1))
    for _ in range(rounds):
        for i in range(n):
            ids = sorted((i, *neigh[i]))
            out = spare[i]
            np.add(cur[ids[0]], cur[ids[1]], out=out)
            for j in ids[2:]:
                np.add(out, cur[j], out=out)
            np.multiply(out, scale, out=out)
        cur, spare = spare, cur
    x = np.stack(cur)
    dev = float(np.abs(x - x.mean(axis=0, dtype=np.float64)).max())
    return time.perf_counter() - t0, dev


def numpy_stencil(n: int, dim: int, rounds: int, degree: int) -> tuple[float, float]:
    """(seconds, max_abs_dev) of the ring-lattice mean as shifted adds into two buffers."""
    t0 = time.perf_counter()
    x = _start(n, dim)
    y = np.empty_like(x)
    scale = np.float32(1.0 / (degree + 1))
    for _ in range(rounds):
        np.copyto(y, x)
        for d in range(1, degree // 2 + 1):
            # Row i gains rows i - d and i + d (mod n), as slices: no temporaries.
            y[d:] += x[:-d]
            y[:d] += x[-d:]
            y[:-d] += x[d:]
            y[-d:] += x[:d]
        np.multiply(y, scale, out=y)
        x, y = y, x
    dev = float(np.abs(x - x.mean(axis=0, dtype=np.float64)).max())
    return time.perf_counter() - t0, dev


def _median(fn: Callable[[], tuple[float, float]], times: list[float]) -> float:
    s, dev = fn()
    times.append(s)
    return dev


def run(quick: bool = False, repeats: int = 3) -> list[dict[str, Any]]:
    """Rows for perf.micro: fedloom W4 (plain and strict inproc) against the numpy floor."""
    cfg = load()
    n, dim = cfg["protocol"]["nodes"], cfg["protocol"]["dim"]
    rounds, degree = cfg["run"]["rounds"], cfg["protocol"]["topology"]["degree"]
    if quick:
        dim, rounds, repeats = 10_000, 20, 2
        cfg = load(dim=dim)
        cfg["run"]["rounds"] = rounds
    times: dict[str, list[float]] = {k: [] for k in ("inproc", "strict", *FLOORS)}
    devs: dict[str, float] = {}
    for _ in range(repeats):  # alternate, so load from elsewhere hits every side alike
        devs["inproc"] = _median(lambda: fedloom(cfg, False), times["inproc"])
        devs["gemm"] = _median(lambda: numpy_gemm(n, dim, rounds, degree), times["gemm"])
        devs["strict"] = _median(lambda: fedloom(cfg, True), times["strict"])
        devs["stencil"] = _median(lambda: numpy_stencil(n, dim, rounds, degree),
                                  times["stencil"])
        devs["rows"] = _median(lambda: numpy_rows(n, dim, rounds, degree), times["rows"])
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_key = min(FLOORS, key=lambda k: med[k])
    floor = med[floor_key]
    floor_name = FLOORS[floor_key]
    label = f"W4 gossip-{n} x {dim}, {rounds} rounds"
    agree = abs(devs["inproc"] - devs[floor_key]) <= 1e-4
    rows = []
    for key, what in (("inproc", "inproc"), ("strict", "inproc strict (codec)")):
        rows.append({"name": f"{label}: {what}", "value": med[key], "unit": "s",
                     "floor": floor, "floor_name": floor_name, "ratio": med[key] / floor,
                     "target_ratio": TARGET_RATIO, "runs": times[key],
                     "floor_runs": times[floor_key], "max_abs_dev": devs[key],
                     "floor_max_abs_dev": devs[floor_key], "answers_agree": agree})
    for other in FLOORS:
        if other != floor_key:
            rows.append({"name": f"{label}: {FLOORS[other]} (slower floor)",
                         "value": med[other], "unit": "s", "floor": floor,
                         "floor_name": floor_name, "ratio": med[other] / floor})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small W4 (10,000 floats)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--scale", type=int, nargs="*", metavar="N",
                        help="the scale runs instead (default 100000 1000000 nodes)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the scale runs")
    parser.add_argument("--against", metavar="DIR",
                        help="with --scale: also run the checkout in DIR, alternating")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(scale_one(args.one, args.rounds)))
        return
    if args.scale is not None and args.against:
        for line in against(args.against, tuple(args.scale) or SCALE_NODES, args.rounds,
                            args.repeats):
            print(line, flush=True)
        return
    if args.scale is not None:
        rows = scale(tuple(args.scale) or SCALE_NODES, args.rounds)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        for r in rows:
            tgt = r.get("target")
            mark = "" if tgt is None else (
                "  target " + (">= " if r.get("higher_is_better") else "< ") + f"{tgt:,.0f}")
            extra = (f"   (cpu {r['cpu_s']:.1f} s: {r['cpu_rate']:,.0f} msg/s of cpu, "
                     f"build {r['build_s']:.1f} s)" if "cpu_s" in r else "")
            print(f"{r['name']:<75} {r['value']:>12,.2f} {r['unit']}{mark}{extra}")
        return
    rows = run(quick=args.quick, repeats=args.repeats)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['name']:<58} {r['value']:8.3f} s   floor {r['floor']:7.3f} s "
              f"({r['floor_name']})   ratio {r['ratio']:5.2f}")
    main_row = rows[0]
    verdict = "within" if main_row["ratio"] <= TARGET_RATIO else "OUTSIDE"
    print(f"inproc is {main_row['ratio']:.2f}x the numpy floor: {verdict} the "
          f"{TARGET_RATIO:g}x target; answers agree: {main_row['answers_agree']} "
          f"(max_abs_dev {main_row['max_abs_dev']:.6g} vs {main_row['floor_max_abs_dev']:.6g})")


if __name__ == "__main__":
    main()
