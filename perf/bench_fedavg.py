"""FedAvg against a bare torch loop, and W5's flatness in the client count.

W1 and W2 on inproc: fedloom's rounds-only time (runner's `rounds_s`) beside a hand-written
torch FedAvg doing the same client-epochs sequentially in this process: same data (made on
first use, as fedloom does), same model, same shuffles, same sample-weighted average and
test-set evaluation each round; caches are cleared before every run so both sides pay the
same. A second floor runs the same rounds as direct calls into protocols.learners and
aggregators (no kernel, no messages). Runs alternate, medians of `repeats`. W5: seconds per
round and peak RSS of a fresh process with 1,000 and with 10,000 clients (100 sampled per
round; they should match), the two alternating.

    python -m perf.bench_fedavg [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from kernel.run import runner
from protocols import aggregators, common, learners

WORKLOADS = Path(__file__).resolve().parent / "workloads"


def load(name: str, **overrides: Any) -> dict[str, Any]:
    """A standard workload config, with `section.key` overrides."""
    cfg = tomllib.loads((WORKLOADS / f"{name}.toml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        cfg.setdefault(section, {})[key] = value
    return cfg


def fedloom_rounds_s(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rounds-only wall seconds, result); the result's "cpu_s" is this process's CPU time
    over the whole run (build included: small once torch is imported)."""
    learners._make.cache_clear()  # fresh data and model, as a new process would have
    cpu = time.process_time()
    res = runner.execute(cfg, quiet=True).result
    res["cpu_s"] = time.process_time() - cpu
    return float(res["rounds_s"]), res


def bare_torch(cfg: dict[str, Any]) -> tuple[float, float, float]:
    """(wall s, CPU s, final accuracy) of FedAvg written directly in torch for `cfg`."""
    import torch
    from torch import nn
    from torch.nn.functional import cross_entropy

    wl, seed, rounds = cfg["workload"], cfg["run"]["seed"], cfg["run"]["rounds"]
    n_clients, per_round = wl["clients"], cfg["protocol"].get("clients_per_round")
    torch.set_num_threads(wl.get("torch_threads", 1))
    t0, cpu = time.perf_counter(), time.process_time()
    centres = np.random.default_rng(7).standard_normal((10, 784)) * 0.2
    data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def draw(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, 10, n)
        x = (centres[y] + rng.standard_normal((n, 784))).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    test_x, test_y = draw(np.random.default_rng(999), 2000)
    server_rng = np.random.default_rng([seed, 0])
    acc = 0.0
    for r in range(1, rounds + 1):
        clients = common.sample(server_rng, range(1, n_clients + 1), count=per_round)
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        weight = 0
        for node in clients:
            if node not in data:
                data[node] = draw(np.random.default_rng(1000 + node - 1), 256)
            x, y = data[node]
            net.load_state_dict(global_state)
            opt = torch.optim.SGD(net.parameters(), lr=0.05)
            order = torch.from_numpy(common.derive_rng(seed, node, r).permutation(len(y)))
            for s in range(0, len(y), 32):
                idx = order[s:s + 32]
                opt.zero_grad()
                cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
            for k, v in net.state_dict().items():
                total[k] += v.double() * len(y)
            weight += len(y)
        global_state = {k: (v / weight).float() for k, v in total.items()}
        net.load_state_dict(global_state)
        with torch.no_grad():
            acc = float((net(test_x).argmax(1) == test_y).double().mean())
    return time.perf_counter() - t0, time.process_time() - cpu, acc


def direct(cfg: dict[str, Any]) -> tuple[float, float]:
    """(wall s, CPU s) of the same rounds as plain calls into protocols.learners and aggregators:
    no kernel, no messages. fedloom minus this is what the kernel and messaging cost."""
    learners._make.cache_clear()
    seed, rounds = cfg["run"]["seed"], cfg["run"]["rounds"]
    t0, cpu = time.perf_counter(), time.process_time()
    learner = learners.make(cfg["workload"])
    model, rng = learner.init(), np.random.default_rng([seed, 0])
    for r in range(1, rounds + 1):
        nodes = common.sample(rng, range(1, learner.clients + 1),
                              count=cfg["protocol"].get("clients_per_round"))
        model = aggregators.weighted_mean([
            (learner.samples(n - 1),
             learner.train(model, n - 1, common.derive_rng(seed, n, r)).model)
            for n in nodes])
        learner.evaluate(model)
    return time.perf_counter() - t0, time.process_time() - cpu


def compare(name: str, repeats: int) -> dict[str, Any]:
    """Medians of wall and CPU seconds: fedloom, bare torch, direct calls (alternating)."""
    cfg = load(name)
    fedloom_rounds_s(load(name, **{"run.rounds": 1}))  # warm: imports, first torch calls
    bare_torch(load(name, **{"run.rounds": 1}))
    runs: dict[str, list[tuple[float, float]]] = {"fedloom": [], "bare": [], "direct": []}
    accs = (0.0, 0.0)
    for _ in range(repeats):
        s, res = fedloom_rounds_s(cfg)
        runs["fedloom"].append((s, res["cpu_s"]))
        b, b_cpu, acc = bare_torch(cfg)
        runs["bare"].append((b, b_cpu))
        runs["direct"].append(direct(cfg))
        accs = (res["test_accuracy"], acc)
    out: dict[str, Any] = {"workload": name, "accuracy": accs, "runs": repeats}
    for who, rs in runs.items():
        out[f"{who}_s"] = statistics.median(r[0] for r in rs)
        out[f"{who}_cpu_s"] = statistics.median(r[1] for r in rs)
    return out


def w5_child(clients: int) -> dict[str, Any]:
    """One W5 run with `clients` clients in this (fresh) process."""
    cfg = load("w5", **{"workload.clients": clients})
    cpu = time.process_time()
    res = runner.execute(cfg, quiet=True).result
    cpu = time.process_time() - cpu
    peak_kb = runner.own_peak_rss_bytes() / 1024  # this process's own, not its parent's
    return {"clients": clients, "s_per_round": res["rounds_s"] / res["rounds"],
            "cpu_s_per_round": cpu / res["rounds"],
            "peak_rss_mb": peak_kb / 1024, "accuracy": res["test_accuracy"]}


def w5(sizes: tuple[int, ...], repeats: int) -> dict[int, dict[str, float]]:
    """Medians per client count; the counts alternate run by run, so load drifts hit all."""
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            out = subprocess.run([sys.executable, "-m", "perf.bench_fedavg", "--w5-child",
                                  str(n)], capture_output=True, text=True, check=True,
                                 timeout=600)
            runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {n: {key: statistics.median(r[key] for r in rs)
                for key in ("s_per_round", "cpu_s_per_round", "peak_rss_mb")}
            for n, rs in runs.items()}


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The measurements, as rows for perf.micro (and printed by `main`)."""
    repeats = 1 if quick else 3
    rows: list[dict[str, Any]] = []
    for name in ("w1",) if quick else ("w1", "w2"):
        c = compare(name, repeats)
        for floor, floor_name in (("bare", "bare torch FedAvg loop"),
                                  ("direct", "direct learner+aggregator calls")):
            for kind, unit in (("", "s"), ("_cpu", "cpu s")):
                rows.append({"name": f"{name} rounds-only (inproc)", "value": c[f"fedloom{kind}_s"],
                             "unit": unit, "floor": c[f"{floor}{kind}_s"],
                             "floor_name": floor_name, "runs": repeats,
                             "accuracy_fedloom_bare": c["accuracy"]})
    sizes = w5((1000, 10_000), repeats)
    small, big = sizes[1000], sizes[10_000]
    rows.append({"name": "w5 s/round at 10k clients", "value": big["s_per_round"], "unit": "s",
                 "floor": small["s_per_round"], "floor_name": "same at 1k clients",
                 "runs": repeats})
    rows.append({"name": "w5 cpu s/round at 10k clients", "value": big["cpu_s_per_round"],
                 "unit": "cpu s", "floor": small["cpu_s_per_round"],
                 "floor_name": "same at 1k clients", "runs": repeats})
    rows.append({"name": "w5 peak RSS at 10k clients", "value": big["peak_rss_mb"], "unit": "MB",
                 "floor": small["peak_rss_mb"], "floor_name": "same at 1k clients",
                 "runs": repeats})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run each, W1 only")
    ap.add_argument("--w5-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.w5_child:
        print(json.dumps(w5_child(args.w5_child)))
        return
    for row in run(quick=args.quick):
        ratio = row["value"] / row["floor"]
        print(f"{row['name']:<28} {row['value']:9.4f} {row['unit']:<5} vs "
              f"{row['floor_name']:<32} {row['floor']:9.4f}  ratio {ratio:.3f}  "
              f"(median of {row['runs']})")


if __name__ == "__main__":
    main()
