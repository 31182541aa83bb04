"""Studies for the README: accuracy under attack per aggregator, accuracy against epsilon for
central DP, and the cost of SecAgg+ per round against plain FedAvg. Every cell is one run in
this process (inproc, seeded), so a table replays exactly but for its wall-clock columns.

    python -m perf.study_threats attacks --config perf/workloads/w6.toml --out runs/study
    python -m perf.study_threats dp --config perf/workloads/w6.toml --out runs/study
    python -m perf.study_threats secagg --clients 20,100,500 --out runs/study

Each prints a markdown table and writes it, with one JSON row per cell, under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kernel.run import config as kconfig
from kernel.run import runner

ATTACKS = ("none", "sign_flip", "gaussian", "label_flip", "alie", "ipm")
AGGREGATORS = ("weighted_mean", "median", "trimmed_mean", "krum", "multi_krum")


def _run(cfg: dict[str, Any]) -> dict[str, Any]:
    t = time.perf_counter()
    rec = runner.execute(kconfig.validate(cfg), quiet=True)
    rounds = [r for r in rec.rows if r.get("name") == "round"]
    return {"result": rec.result, "rounds": rounds, "wall_s": time.perf_counter() - t}


def _base(path: str, sets: list[str]) -> dict[str, Any]:
    return kconfig.load(path, ["run.progress=false", *sets])


def attacks(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    """Final test accuracy for each attack (fraction malicious) and aggregator."""
    base = _base(args.config, args.set)
    n = base["workload"]["clients"]
    f = max(1, round(args.fraction * n))
    agg_args = {"trimmed_mean": {"f": f}, "krum": {"f": f}, "multi_krum": {"f": f}}
    cells = []
    for attack in ATTACKS:
        for agg in AGGREGATORS:
            cfg = json.loads(json.dumps(base))
            cfg["protocol"].update(aggregator=agg, aggregator_args=agg_args.get(agg, {}))
            if attack != "none":
                cfg["adversary"] = {"kind": attack, "fraction": args.fraction}
            out = _run(cfg)
            cells.append({"attack": attack, "aggregator": agg,
                          "accuracy": out["result"]["test_accuracy"], "wall_s": out["wall_s"]})
            print(f"{attack:>10} {agg:>13} {cells[-1]['accuracy']:.4f}", file=sys.stderr)
    lines = ["| attack | " + " | ".join(AGGREGATORS) + " |",
             "|---|" + "---|" * len(AGGREGATORS)]
    for attack in ATTACKS:
        accs = [c["accuracy"] for c in cells if c["attack"] == attack]
        lines.append(f"| {attack} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    return "\n".join(lines), cells


def dp(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    """Final accuracy and epsilon for central DP at each noise multiplier."""
    base = _base(args.config, args.set)
    cells = []
    for z in [float(x) for x in args.noise.split(",")]:
        cfg = json.loads(json.dumps(base))
        if z >= 0:
            cfg["privacy"] = {"mode": "central", "noise_multiplier": z, "clip": args.clip,
                              "adaptive": args.adaptive}
        out = _run(cfg)
        last = out["rounds"][-1]
        cells.append({"noise_multiplier": z if z >= 0 else None,
                      "epsilon": last.get("epsilon"), "delta": last.get("delta"),
                      "accuracy": out["result"]["test_accuracy"], "clip": last.get("clip")})
        print(cells[-1], file=sys.stderr)
    lines = ["| noise multiplier | epsilon (cumulative) | delta | test accuracy |",
             "|---|---|---|---|"]
    for c in cells:
        zs = "no DP" if c["noise_multiplier"] is None else f"{c['noise_multiplier']:g}"
        eps = "-" if c["epsilon"] is None else f"{c['epsilon']:.3g}"
        delta = "-" if c["delta"] is None else f"{c['delta']:.2g}"
        lines.append(f"| {zs} | {eps} | {delta} | {c['accuracy']:.3f} |")
    return "\n".join(lines), cells


def secagg(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    """Seconds and bytes per round, SecAgg+ against FedAvg, every client in every round."""
    cells = []
    for n in [int(x) for x in args.clients.split(",")]:
        for name in ("fedavg", "secaggplus"):
            cfg = {"run": {"seed": 0, "rounds": args.rounds, "progress": False},
                   "transport": {"kind": "inproc"}, "protocol": {"name": name},
                   "workload": {"model": "linear", "clients": n, "samples_per_client": 64,
                                "input_dim": args.dim, "classes": 10, "test_samples": 500}}
            out = _run(cfg)
            res = out["result"]
            last = out["rounds"][-1]
            cells.append({"clients": n, "protocol": name,
                          "s_per_round": res["rounds_s"] / args.rounds,
                          "bytes_per_round": res["bytes"] / args.rounds,
                          "messages_per_round": res["messages"] / args.rounds,
                          "accuracy": res["test_accuracy"], "stages": last.get("stages")})
            print(cells[-1], file=sys.stderr)
    lines = ["| clients | FedAvg s/round | SecAgg+ s/round | FedAvg MB/round | "
             "SecAgg+ MB/round | SecAgg+ messages/round | accuracy FedAvg / SecAgg+ |",
             "|---|---|---|---|---|---|---|"]
    for n in sorted({c["clients"] for c in cells}):
        f, s = (next(c for c in cells if c["clients"] == n and c["protocol"] == p)
                for p in ("fedavg", "secaggplus"))
        lines.append(
            f"| {n} | {f['s_per_round']:.3f} | {s['s_per_round']:.3f} | "
            f"{f['bytes_per_round'] / 1e6:.2f} | {s['bytes_per_round'] / 1e6:.2f} | "
            f"{s['messages_per_round']:.0f} | {f['accuracy']:.3f} / {s['accuracy']:.3f} |")
    return "\n".join(lines), cells


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=("attacks", "dp", "secagg"))
    ap.add_argument("--config", default="perf/workloads/w6.toml")
    ap.add_argument("--set", action="append", default=[], help="section.key=value override")
    ap.add_argument("--fraction", type=float, default=0.2, help="malicious clients")
    ap.add_argument("--noise", default="-1,0,0.3,1,3", help="noise multipliers (-1: no DP)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--adaptive", action="store_true")
    ap.add_argument("--clients", default="20,100,500")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dim", type=int, default=784, help="secagg: linear model input size")
    ap.add_argument("--out", default="runs/study")
    args = ap.parse_args(argv)
    table, cells = {"attacks": attacks, "dp": dp, "secagg": secagg}[args.study](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.study}.md").write_text(table + "\n")
    with open(out / f"{args.study}.jsonl", "w") as fh:
        for c in cells:
            fh.write(json.dumps(c) + "\n")
    print(table)


if __name__ == "__main__":
    main()
