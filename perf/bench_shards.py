"""Parallel shards against one process: W2 with every client in every round on inproc, ray
(2 shards) and grpc (2 shards), side by side in one run.

Cases: `all` = W2 with protocol.clients_per_round = 100, 4 rounds, workload.data_cache = 128
(every client trains every round, so each shard has the same work); `plain` = W2 as it is;
`big` = W2 with 2,048 samples per client. Each run is a fresh process of its own (the runner's
`rounds_s`: rounds only, no start-up), the three transports alternate, and the figure is the
median seconds per round; the ratio is a transport's against inproc's in the same run (2 cores
are the ceiling: 0.5x). Every run of a case must end with the same model sha on all three.

    python -m perf.bench_shards [--cases all plain big] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

W2 = Path(__file__).resolve().parent / "workloads" / "w2.toml"
CASES = {
    "all": ["protocol.clients_per_round=100", "run.rounds=4", "workload.data_cache=128"],
    "plain": [],
    "big": ["workload.samples_per_client=2048"],
}
KINDS = ("inproc", "ray", "grpc")
TARGETS = {("all", "ray"): 0.6, ("all", "grpc"): 0.55}


def run_one(kind: str, overrides: list[str]) -> dict[str, Any]:
    """One W2 run on `kind` in this process: its seconds per round and model sha."""
    from kernel.run import config as kconfig
    from kernel.run import runner

    extra = [] if kind == "inproc" else ["transport.shards=2"]
    cfg = kconfig.load(W2, [f"transport.kind={kind}", "run.progress=false", *extra,
                            *overrides])
    res = runner.run(cfg, quiet=True, started_at=time.time())
    return {"kind": kind, "s_per_round": res["rounds_s"] / res["rounds"],
            "startup_s": res.get("startup_s"), "wall_s": res["wall_s"],
            "sha": res["final_model_sha256"], "accuracy": res.get("test_accuracy")}


def _child(kind: str, overrides: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "perf.bench_shards", "--one", kind, *overrides],
                         capture_output=True, text=True, check=False, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"W2 on {kind} ({overrides}) failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(quick: bool = False, cases: tuple[str, ...] = ("all", "plain", "big"),
        repeats: int = 1) -> list[dict[str, Any]]:
    """Rows for perf.micro: seconds per round per transport, with inproc as the floor."""
    rows = []
    for case in cases[:1] if quick else cases:
        got: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        load = []
        for _ in range(repeats):
            for kind in KINDS:  # alternate, so load from elsewhere hits every side alike
                load.append(os.getloadavg()[0])
                got[kind].append(_child(kind, CASES[case]))
        base = statistics.median(r["s_per_round"] for r in got["inproc"])
        shas = {r["sha"] for rs in got.values() for r in rs}
        for kind in KINDS[1:]:
            v = statistics.median(r["s_per_round"] for r in got[kind])
            rows.append({"name": f"W2 {case} ({' '.join(CASES[case]) or 'as is'}): {kind}, "
                                 f"2 shards, s/round", "value": v, "unit": "s",
                         "floor": base, "floor_name": "inproc", "ratio": v / base,
                         "target_ratio": TARGETS.get((case, kind)), "same_sha": len(shas) == 1,
                         "runs": [r["s_per_round"] for r in got[kind]],
                         "inproc_runs": [r["s_per_round"] for r in got["inproc"]],
                         "load_1min": load})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1:])))
        return
    for r in run(cases=tuple(args.cases), repeats=args.repeats):
        tgt = f" (target <= {r['target_ratio']}x)" if r["target_ratio"] else ""
        print(f"{r['name']:<90} {r['value']:7.3f} s  inproc {r['floor']:7.3f} s  "
              f"ratio {r['ratio']:.2f}x{tgt}  same sha: {r['same_sha']}  "
              f"load {', '.join(f'{x:.1f}' for x in r['load_1min'])}")


if __name__ == "__main__":
    main()
