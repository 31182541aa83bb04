"""Fingerprints of gossip runs, to compare two checkouts bit for bit.

    python -m perf.fingerprint_gossip [--quick]       (run it from each checkout's directory)

Each line: a case name and the run's `final_model_sha256` prefix, messages, events, a hash of
the metric rows without wall-clock fields, and the result's extra fields (`max_abs_dev`,
`reports`). Cases: a random 4-regular graph of 100,000 nodes (left out by --quick), 20,000
nodes of 3 floats with node 0's disagreement rows, Erdos-Renyi graphs with metropolis and
max-degree weights (rows of different weights), W4's lattice at 1,000 floats, strict mode, a
network model with uniform latency, duplication and bandwidth, a ring, a complete graph, one
node.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from kernel.run.outputs import WALL_FIELDS
from kernel.run.runner import execute

RR = {"kind": "random_regular", "degree": 4}


def _cfg(nodes: int, dim: int, rounds: int, topo: dict[str, Any], transport: Any = None,
         network: Any = None, track: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {
        "run": {"seed": 3, "rounds": rounds, "progress": False},
        "transport": transport or {"kind": "inproc"},
        "protocol": {"name": "gossip", "mode": "sync", "nodes": nodes, "dim": dim,
                     "track": track, "topology": topo}}
    if network:
        c["network"] = network
    return c


CASES: dict[str, dict[str, Any]] = {
    "rr100k": _cfg(100_000, 1, 10, RR),
    "rr20k_d3_track": _cfg(20_000, 3, 6, RR, track=True),
    "er_metro": _cfg(3000, 2, 8, {"kind": "erdos_renyi", "p": 0.003, "weights": "metropolis"},
                     track=True),
    "er_maxdeg": _cfg(3000, 2, 8, {"kind": "erdos_renyi", "p": 0.004, "weights": "max_degree"}),
    "lattice_w4small": _cfg(64, 1000, 50, {"kind": "ring_lattice", "degree": 4}, track=True),
    "rr_strict": _cfg(2000, 2, 5, RR, transport={"kind": "inproc", "strict": True}),
    "rr_latency": _cfg(2000, 2, 5, RR, network={
        "latency": {"kind": "uniform", "low": 0.01, "high": 0.05}, "duplicate": 0.1,
        "bandwidth": 1e6}),
    "ring": _cfg(500, 1, 7, {"kind": "ring"}),
    "complete": _cfg(40, 5, 5, {"kind": "complete"}, track=True),
    "single": _cfg(1, 3, 4, {"kind": "complete"}),
}


def fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must be equal between two checkouts for one config."""
    rec = execute(cfg, quiet=True)
    rows = [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rec.rows]
    r = rec.result
    return {"sha": r["final_model_sha256"][:16], "messages": r["messages"],
            "events": r.get("events"), "rows": hashlib.sha256(
                json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:12],
            "extra": dict(r.get("extra", {}))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="leave out the 100,000-node case")
    args = ap.parse_args()
    for name, cfg in CASES.items():
        if args.quick and name == "rr100k":
            continue
        print(name, json.dumps(fingerprint(cfg)), flush=True)


if __name__ == "__main__":
    main()
