"""Shard-local partial sums (protocols.partials) against every reply crossing: W5 on 2 shards,
grpc and ray, `protocol.shard_partials` off and on, side by side in one run.

Per run (a fresh process each; the four alternate, so load from elsewhere hits all alike):
bytes that crossed between the shards per round (encoded, as the transport counts them: ray
`wire_bytes`, grpc `wire_bytes_out`), split into up (the client shard's, to the server) and down
(the server's shard's, the train requests); the server's peak bytes of sums plus the one message
it was adding (the `partials` rows' `sum_peak_bytes`); seconds per round (rounds only). Bytes are
also given in models (float32 parameters x 4 bytes). Every run must end with the same sha.

    python -m perf.bench_partials [--repeats N] [--kinds grpc ray] [-o key=value ...]
    python -m perf.bench_partials --sums   # Running against Accumulator: CPU and memory

`--sums` adds 100 model-like replies of W5's size (203,530 float32s, sample counts 100..599)
to each of `exactsum.Accumulator` and `exactsum.Running`, three times alternating, and reports
CPU seconds and the sum's memory in models (both must read out the same bits).
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

W5 = Path(__file__).resolve().parent / "workloads" / "w5.toml"
KINDS = ("grpc", "ray")
TARGETS = {"up_models": 2.0, "server_peak_models": 3.0}


def run_one(kind: str, partials: bool, overrides: list[str]) -> dict[str, Any]:
    """One W5 run on `kind` with 2 shards in this process: bytes, memory, time, sha."""
    from kernel.run import config as kconfig
    from kernel.run import runner

    cfg = kconfig.load(W5, [f"transport.kind={kind}", "transport.shards=2", "run.progress=false",
                            f"protocol.shard_partials={'true' if partials else 'false'}",
                            *overrides])
    rec = runner.execute(cfg, quiet=True, started_at=time.time())
    res = rec.result
    assert rec.model is not None
    model_bytes = 4 * sum(int(v.size) for v in rec.model.values())
    rounds = int(res["rounds"])
    key = "wire_bytes" if kind == "ray" else "wire_bytes_out"
    by_shard = {int(s["shard"]): int(s.get(key, 0)) for s in res["shards"]}
    rows = [r for r in rec.rows if r["name"] == "partials"]
    return {"kind": kind, "partials": partials, "rounds": rounds, "model_bytes": model_bytes,
            "up_bytes": sum(v for s, v in by_shard.items() if s != 0) / rounds,
            "down_bytes": by_shard.get(0, 0) / rounds,
            "merged": sum(r["value"] for r in rows),
            "server_peak_bytes": max((r["sum_peak_bytes"] for r in rows), default=0),
            "s_per_round": res["rounds_s"] / rounds, "sha": res["final_model_sha256"]}


def _child(kind: str, partials: bool, overrides: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "perf.bench_partials", "--one", kind,
                          "on" if partials else "off", *overrides],
                         capture_output=True, text=True, check=False, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"W5 on {kind} (partials {partials}) failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run(quick: bool = False, kinds: tuple[str, ...] = KINDS, repeats: int = 3,
        overrides: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows for perf.micro: per transport, medians with partials off (before) and on (after)."""
    extra = list(overrides) + (["workload.clients=1000", "run.rounds=2"] if quick else [])
    got: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    load = []
    for _ in range(1 if quick else repeats):
        for kind in kinds:
            for partials in (False, True):
                load.append(os.getloadavg()[0])
                got.setdefault((kind, partials), []).append(_child(kind, partials, extra))
    shas = {r["sha"] for rs in got.values() for r in rs}
    rows = []
    for kind in kinds:
        before, after = got[(kind, False)], got[(kind, True)]
        mb = after[0]["model_bytes"]
        for what, unit, scale in (("up_bytes", "models", mb), ("down_bytes", "models", mb),
                                  ("server_peak_bytes", "models", mb),
                                  ("s_per_round", "s", 1.0)):
            b = statistics.median(r[what] for r in before) / scale
            a = statistics.median(r[what] for r in after) / scale
            name = what.replace("_bytes", "").replace("server_peak", "server_peak")
            rows.append({"name": f"W5 {kind} 2 shards: {name} per round, partials off -> on",
                         "value": a, "before": b, "unit": unit,
                         "target": TARGETS.get(f"{name}_models"),
                         "merged_partials": [r["merged"] for r in after],
                         "runs_before": [r[what] / scale for r in before],
                         "runs_after": [r[what] / scale for r in after],
                         "same_sha": len(shas) == 1, "load_1min": load,
                         "shas": sorted({f"{k} {'on' if p else 'off'}: {r['sha'][:12]}"
                                         for (k, p), rs in got.items() for r in rs}),
                         "model_bytes": mb, "overrides": extra})
    return rows


def sums(repeats: int = 3) -> list[dict[str, Any]]:
    """Rows: CPU seconds for 100 adds plus the mean, and bytes held in models, per class."""
    import numpy as np

    from protocols.exactsum import Accumulator, Running

    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.05, 203_530).astype(np.float32)
    items = [(float(rng.integers(100, 600)),
              {"w": (base + rng.normal(0, 1e-3, base.size)).astype(np.float32)})
             for _ in range(100)]
    got: dict[str, list[float]] = {"Accumulator": [], "Running": []}
    held, means = {}, {}
    for _ in range(repeats):
        for cls in (Accumulator, Running):
            acc = cls()
            t = time.process_time()
            for w, x in items:
                acc.add(w, x)
            means[cls.__name__] = acc.mean()["w"].tobytes()
            got[cls.__name__].append(time.process_time() - t)
            held[cls.__name__] = acc.nbytes() / (4 * base.size)
    assert means["Accumulator"] == means["Running"], "Running read out other bits"
    return [{"name": f"{name}: 100 adds of 203,530 + mean, CPU", "value": statistics.median(v),
             "unit": "s", "runs": v, "held_models": held[name]} for name, v in got.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", nargs=2, metavar=("KIND", "on|off"), help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--quick", action="store_true", help="1,000 clients, 2 rounds, one run")
    ap.add_argument("--sums", action="store_true", help="Running against Accumulator only")
    ap.add_argument("-o", "--override", action="append", default=[],
                    help="config override key=value for every run")
    args, rest = ap.parse_known_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1] == "on", rest)))
        return
    if args.sums:
        for r in sums(args.repeats):
            print(f"{r['name']}: {r['value']:.3f} s (runs {[round(x, 3) for x in r['runs']]}),"
                  f" holds {r['held_models']:.4f} models")
        return
    for row in run(quick=args.quick, kinds=tuple(args.kinds), repeats=args.repeats,
                   overrides=tuple(args.override)):
        print(f"{row['name']}: {row['before']:.3f} -> {row['value']:.3f} {row['unit']}"
              f" (runs off {[round(x, 3) for x in row['runs_before']]}, on "
              f"{[round(x, 3) for x in row['runs_after']]}; partials merged "
              f"{row['merged_partials']}; same sha: {row['same_sha']})")
    print(f"load (1 min) before each run: {[round(x, 1) for x in row['load_1min']]}")
    if not row["same_sha"]:
        print("shas differ:", row["shas"])


if __name__ == "__main__":
    main()
