"""Benchmarks of the learning side: partition speed, W7's data file, the generic torch learner
against today's mlp learner.

    python -m perf.bench_learning partition [--repeat 7]   # 60,000 samples over 10,000 clients
    python -m perf.bench_learning learner [--repeat 15]    # torch learner vs mlp learner, W1
    python -m perf.bench_learning w7-data [PATH]            # writes W7's npz (default below)
    fedloom perf compare perf/workloads/w7.toml --vary workload.clients=100,10000 --repeat 3
    fedloom perf compare perf/workloads/w1.toml --vary workload.learner=auto,torch --repeat 3

The first prints medians of each partitioner; the compare commands run fresh processes,
alternating, and report seconds per round, peak RSS and accuracy side by side (W1 with
`learner = "torch"` is the generic learner on the same mlp; `auto` is today's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from protocols.learning import partition as P

W7_DATA = Path("perf-results/w7_data.npz")


def w7_data(path: Path = W7_DATA, n: int = 60_000, seed: int = 0) -> Path:
    """A 10-class Gaussian mixture as MNIST-shaped uint8 images [n, 1, 28, 28], labels [n]."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, 784)) * 0.2
    y = rng.integers(0, 10, n)
    x = np.empty((n, 784), np.uint8)
    for lo in range(0, n, 10_000):  # in blocks: float64 noise for 60,000 rows is 376 MB
        hi = min(lo + 10_000, n)
        block = centres[y[lo:hi]] + rng.standard_normal((hi - lo, 784))
        x[lo:hi] = np.clip(128 + 40 * block, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x.reshape(n, 1, 28, 28), y=y)
    tmp.replace(path)
    return path


def bench_partition(repeat: int, n: int = 60_000, clients: int = 10_000) -> None:
    y = np.random.default_rng(0).integers(0, 10, n)
    group = np.random.default_rng(1).integers(0, clients * 2, n)
    cases: dict[str, dict[str, Any]] = {
        "dirichlet alpha=0.3": {"kind": "dirichlet", "alpha": 0.3, "min_partition_size": 0},
        "dirichlet alpha=0.3 self_balancing": {"kind": "dirichlet", "alpha": 0.3,
                                               "min_partition_size": 0, "self_balancing": True},
        "iid": {"kind": "iid"},
        "shards k=2": {"kind": "shards", "shards_per_client": 2},
        "pathological k=2": {"kind": "pathological", "classes_per_client": 2},
        "quantity lognormal": {"kind": "quantity"},
        "natural": {"kind": "natural"},
    }
    print(f"{n:,} samples over {clients:,} clients, median of {repeat} (then + holdout 0.1):")
    for name, opts in cases.items():
        v = P.validate(opts)
        times, both = [], []
        for seed in range(repeat):
            t0 = time.perf_counter()
            part = P.partition(v, y, clients, seed, group)
            t1 = time.perf_counter()
            P.holdout(part, 0.1, np.random.default_rng(seed))
            times.append(t1 - t0)
            both.append(time.perf_counter() - t0)
        print(f"  {name:36s} {statistics.median(times) * 1e3:8.1f} ms"
              f"   {statistics.median(both) * 1e3:8.1f} ms")


def bench_learner(repeat: int) -> None:
    """W1's local training (10 clients, one round each) with today's mlp learner and with the
    generic torch learner on the same model, alternating blocks in this process."""
    from protocols import learners

    old = learners.make({"model": "mlp"})
    new = learners.make({"model": "mlp", "learner": "torch"})
    model = old.init()
    for learner in (old, new):  # warm: data made, modules built
        for c in range(10):
            learner.train(model, c, np.random.default_rng(c))
    times: dict[str, list[float]] = {"mlp": [], "torch": []}
    for r in range(repeat):
        for name, learner in (("mlp", old), ("torch", new)) if r % 2 == 0 else \
                (("torch", new), ("mlp", old)):
            t0 = time.perf_counter()
            for c in range(10):
                learner.train(model, c, np.random.default_rng([r, c]))
            times[name].append(time.perf_counter() - t0)
    m_old, m_new = statistics.median(times["mlp"]), statistics.median(times["torch"])
    ratios = [b / a for a, b in zip(times["mlp"], times["torch"])]
    print(f"W1 local training, 10 clients x 1 epoch, median of {repeat} alternating blocks:")
    print(f"  mlp learner    {m_old * 1e3:8.1f} ms")
    print(f"  torch learner  {m_new * 1e3:8.1f} ms   ratio {m_new / m_old:.3f} "
          f"(median of paired ratios {statistics.median(ratios):.3f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_learning")
    sub = p.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("partition")
    sp.add_argument("--repeat", type=int, default=7)
    lp = sub.add_parser("learner")
    lp.add_argument("--repeat", type=int, default=15)
    wd = sub.add_parser("w7-data")
    wd.add_argument("path", nargs="?", type=Path, default=W7_DATA)
    ns = p.parse_args(argv)
    if ns.what == "partition":
        bench_partition(ns.repeat)
    elif ns.what == "learner":
        bench_learner(ns.repeat)
    else:
        t0 = time.perf_counter()
        path = w7_data(ns.path)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
