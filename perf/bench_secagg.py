"""SecAgg+ micro-benchmark: mask expansion and a client's whole masking step, in MB/s of float32
model, each beside its floor (numpy filling the same uint64 buffer with zeros / adding two
buffers). `python -m perf.bench_secagg [--quick]` prints medians; `run(quick)` returns the rows
for `fedloom perf micro`.

- `expand`: one mask (32-byte seed -> PCG64 uint64 ring elements) per model element.
- `mask k=K`: quantise a model and add its self mask and K pairwise masks (X25519 agreement
  included), what one client does per round: the rate is model bytes / time, so it falls
  with K (each mask costs one expansion).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from protocols.secagg import crypto

_MB = 1e6


def _median_s(fn: Callable[[], Any], reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows of {name, value (MB/s of float32 model), unit, floor, floor_name}."""
    n = 2_000_000 if quick else 10_000_000  # model elements (8 / 40 MB of float32)
    reps = 3 if quick else 5
    seed = bytes(range(32))
    model_mb = 4 * n / _MB
    acc = np.zeros(n, np.uint64)
    other = np.ones(n, np.uint64)
    rows: list[dict[str, Any]] = []
    t_exp = _median_s(lambda: crypto.add_mask(acc, seed, 1), reps)
    t_add = _median_s(lambda: np.add(acc, other, out=acc), reps)
    rows.append({"name": "expand+add one mask", "value": model_mb / t_exp, "unit": "MB/s",
                 "floor": model_mb / t_add, "floor_name": "numpy uint64 add"})
    vec = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.01
    sk, _ = crypto.keypair(bytes(range(1, 33)))
    pks = [crypto.keypair(bytes([i]) * 32)[1] for i in range(2, 40)]
    for k in (0, 4, 16) if quick else (0, 4, 16, 28):
        def client(k: int = k) -> None:
            y = crypto.quantise(vec, 20, 64.0)
            crypto.add_mask(y, seed, 1)
            for pk in pks[:k]:
                crypto.add_mask(y, crypto.agree(sk, pk, b"mask"), 1)
        t = _median_s(client, reps)
        rows.append({"name": f"client masking, k={k} neighbours", "value": model_mb / t,
                     "unit": "MB/s", "floor": None, "floor_name": None,
                     "per_mask_MBps": model_mb * (k + 1) / t})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    for row in run(args.quick):
        floor = f"   floor {row['floor']:.0f} ({row['floor_name']})" if row["floor"] else ""
        extra = (f"   per mask {row['per_mask_MBps']:.0f} MB/s" if "per_mask_MBps" in row
                 else "")
        print(f"{row['name']:<34} {row['value']:8.0f} {row['unit']}{floor}{extra}")


if __name__ == "__main__":
    main()
