"""Flower's Ray simulation engine against fedloom (ray and inproc) on workload W1, side by side.

A standalone script, run with a Python that has `flwr[simulation]` and psutil installed (Flower
is not a fedloom dependency, so keep it in its own venv), from the repository root:

    /tmp/flwr-venv/bin/python -m perf.compare_flower [--reps 3] [--fedloom .venv/bin/fedloom]
        [--before /path/to/another/checkout] [--joined]

Both sides use the same model, data and local training (`protocols.learners`, W1's table), the
same per-client rngs as protocols.fedavg (default_rng([seed, node, round]), node = client + 1)
and sample-weighted FedAvg, so final accuracies should agree closely. Every run is a fresh
process (start-up counted); runs alternate Flower, fedloom-ray, fedloom-inproc, the order
turning by one each repetition.
Total wall is measured here from spawn to exit; memory is the peak summed RSS of the process
tree (perf.procs.TreeSampler, every 0.15 s). Flower is imported only inside the child.

`--before DIR` adds an engine in the same alternation: DIR's own `fedloom` on ray (its
`.venv/bin/fedloom`, run with DIR as working directory and PYTHONPATH, so none of this
checkout's code leaks in), to compare two versions at the same load. `--joined` adds fedloom
on ray joining a head started once before the repetitions (`ray start --head`, with token
authentication, not counted; stopped by pid at the end): the fast path, no Ray to start or
stop per run. The fedloom-ray rows are
then broken into the parts result.json's `timings` reports (ray.init, shard actors, rounds,
...; "write + exit" is spawn-to-exit less everything result.json timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a file, perf/ would lead sys.path and perf/inspect.py would shadow the stdlib's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "perf"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

W1 = ROOT / "perf" / "workloads" / "w1.toml"
TIMEOUT_S = 600.0


def _w1() -> tuple[dict[str, Any], int, int]:
    cfg = tomllib.loads(W1.read_text())
    return cfg["workload"], int(cfg["run"]["seed"]), int(cfg["run"]["rounds"])


def flower_child(out: Path) -> None:
    """One Flower simulation of W1 in this process; writes timings and accuracy to `out`."""
    t_child = time.time()
    import flwr
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from protocols import learners

    workload, seed, rounds = _w1()
    n_clients = int(workload["clients"])
    t_imported = time.time()
    marks: dict[str, Any] = {"round_start": {}, "eval_end": {}, "eval": {}}

    learner = learners.make(workload)
    names = list(learner.init().keys())

    class W1Client(NumPyClient):  # type: ignore[misc]
        def __init__(self, client: int) -> None:
            self.client = client

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
                ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            lrn = learners.make(workload)
            rng = np.random.default_rng([seed, self.client + 1, int(config["server_round"])])
            model = lrn.train(dict(zip(names, parameters)), self.client, rng).model
            return [model[n] for n in names], lrn.samples(self.client), {}

    def client_fn(context: Context) -> Any:
        return W1Client(int(context.node_config["partition-id"])).to_client()

    def fit_config(server_round: int) -> dict[str, Any]:
        marks["round_start"].setdefault(server_round, time.time())
        return {"server_round": server_round}

    def evaluate(server_round: int, params: list[np.ndarray], _cfg: dict[str, Any]
                 ) -> tuple[float, dict[str, Any]]:
        res = learner.evaluate(dict(zip(names, params)))
        assert res is not None
        marks["eval"][server_round] = res
        marks["eval_end"][server_round] = time.time()
        if server_round == rounds:  # to compare with fedloom's final_model.npz
            np.savez(out.with_suffix(".npz"), **dict(zip(names, params)))  # type: ignore[arg-type]
        return res["loss"], {"accuracy": res["accuracy"]}

    init = learner.init()
    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n_clients,
        min_evaluate_clients=0, min_available_clients=n_clients, evaluate_fn=evaluate,
        on_fit_config_fn=fit_config,
        initial_parameters=flwr.common.ndarrays_to_parameters([init[n] for n in names]),
    )

    def server_fn(_context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
        num_supernodes=n_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        # "local": a Ray of its own, never one `ray start` left running.
                        "init_args": {"address": "local", "num_cpus": 2,
                                      "include_dashboard": False}},
    )
    t_done = time.time()
    last = marks["eval"].get(rounds)
    r1, rN = marks["round_start"].get(1), marks["eval_end"].get(rounds)
    e1 = marks["eval_end"].get(1)
    out.write_text(json.dumps({
        "flwr": flwr.__version__, "t_child": t_child, "t_imported": t_imported, "t_done": t_done,
        "t_round1": r1, "t_last_eval": rN,
        "rounds_s": (rN - r1) if r1 is not None and rN is not None else None,
        "later_rounds_s": (rN - e1) if e1 is not None and rN is not None else None,
        "test_accuracy": last["accuracy"] if last else None,
        "accuracies": [marks["eval"][r]["accuracy"] for r in sorted(marks["eval"])],
    }))


def measure(cmd: list[str], log: Path, env: dict[str, str], cwd: Path = ROOT) -> dict[str, Any]:
    """Run `cmd` to exit, sampling its process tree's RSS; wall from spawn to exit."""
    from perf.procs import Reaper, TreeSampler

    with log.open("w") as fh:
        t0 = time.time()
        p0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, 0.15).start()
        reaper = Reaper(proc)
        if not reaper.wait(TIMEOUT_S):
            proc.kill()
            raise RuntimeError(f"{cmd} did not finish within {TIMEOUT_S} s; log: {log}")
        sampler.stop()
    wall = (reaper.ended or time.perf_counter()) - p0
    left = sampler.wait_gone(10.0)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}; log: {log}\n{log.read_text()[-3000:]}")
    return {"t0": t0, "exit_s": wall, "load1": os.getloadavg()[0],
            "tree_mb": max(sampler.peak_mb, reaper.maxrss_bytes / 2**20),
            "procs": sampler.peak_procs, "leaked": len(left)}


def run_flower(python: str, work: Path, env: dict[str, str]) -> dict[str, Any]:
    res = work / "flower.json"
    m = measure([python, "-m", "perf.compare_flower", "--flower-child", str(res)],
                work / "flower.log", env)
    r = json.loads(res.read_text())
    # The result exists at the last server-side evaluation; run_simulation returns only after
    # tearing Ray down, which fedloom's wall_s (to the transport's outcome) leaves out too.
    return {**m, "result_s": r["t_last_eval"] - m["t0"],
            "teardown_s": r["t_done"] - r["t_last_eval"], "rounds_s": r["rounds_s"],
            "later_s": r["later_rounds_s"], "acc": r["test_accuracy"], "flwr": r["flwr"],
            "accuracies": r["accuracies"], "model": res.with_suffix(".npz")}


def _later_rounds(metrics: Path) -> float | None:
    """Wall time of rounds 2..last from fedloom's per-round metric rows (None without wall_s)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    wall = {r["value"]: r.get("wall_s") for r in rows if r.get("name") == "round"}
    last = max(wall, default=None)
    if last is None or wall.get(1) is None or wall.get(last) is None:
        return None
    return float(wall[last]) - float(wall[1])


def same_model(flower_npz: Path, fedloom_npz: Path) -> str:
    """'bitwise', 'max |diff| = x' or why the final models could not be compared."""
    import numpy as np

    a, b = np.load(flower_npz), np.load(fedloom_npz)
    if sorted(a.files) != sorted(b.files):
        return f"different tensors {sorted(a.files)} vs {sorted(b.files)}"
    if all(np.array_equal(a[k], b[k]) for k in a.files):
        return "bitwise equal"
    return f"max |diff| = {max(float(np.abs(a[k] - b[k]).max()) for k in a.files):.3g}"


# result.json timings shown per part for the fedloom rows (in path order), then the rest.
PARTS = ("start_s", "build_s", "transport_import_s", "ray_init_s", "placement_s", "actors_s",
         "shard_build_s", "connect_s", "on_start_s", "watch_s", "stop_s", "release_s",
         "shutdown_s", "close_s", "tail_s")
TOP = ("start_s", "build_s", "transport_import_s", "run_s", "close_s")


def run_fedloom(fedloom: str, kind: str, work: Path, env: dict[str, str],
                name: str | None = None, cwd: Path = ROOT) -> dict[str, Any]:
    name = name or f"fedloom-{kind}"
    out = work / name
    m = measure([fedloom, "run", str(W1), "--set", f"transport.kind={kind}", "--out", str(out),
                 "--quiet"], work / f"{name}.log", env, cwd=cwd)
    r = json.loads((out / "result.json").read_text())
    timings = dict(r.get("timings") or {})
    if timings:
        timings["tail_s"] = m["exit_s"] - sum(float(timings.get(k) or 0.0) for k in TOP)
    else:  # a version without timings: what its result.json has
        timings = {"close_s": r.get("close_s"), "startup_s": r.get("startup_s"),
                   "tail_s": m["exit_s"] - r["wall_s"] - float(r.get("close_s") or 0.0)}
    return {**m, "result_s": r["wall_s"], "rounds_s": r["rounds_s"], "acc": r["test_accuracy"],
            "self_rss_mb": r.get("peak_rss_mb"), "later_s": _later_rounds(out / "metrics.jsonl"),
            "model": out / "final_model.npz", "timings": timings}


def _med(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def table(runs: dict[str, list[dict[str, Any]]], reps: int) -> str:
    cols = [("exit_s", "total wall to exit s", "{:.2f}"),
            ("result_s", "wall to result s", "{:.2f}"),
            ("rounds_s", "rounds-only s", "{:.2f}"),
            ("later_s", "rounds 2-5 s", "{:.3f}"),
            ("acc", "final test accuracy", "{:.4f}"),
            ("tree_mb", "peak tree RSS MB", "{:.0f}")]
    lines = [f"W1 (fedavg-10, mlp, 5 rounds), medians of {reps} fresh-process runs, "
             "alternating; 2-core machine",
             "total wall: spawn to exit (measured here, same for all); to result: spawn to the "
             "final model (flower: last server-side eval; fedloom: result.json wall_s); "
             "rounds-only: flower = configure_fit(1) to last eval (includes Ray init and actor "
             "start-up, which overlap round 1), fedloom = result.json rounds_s (excludes "
             "startup_s); rounds 2-5: end of round 1 to end of round 5 on both.", "",
             "| engine | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    meds = {name: {k: _med(rows, k) for k, _, _ in cols} for name, rows in runs.items()}
    for name, m in meds.items():
        lines.append(f"| {name} | " + " | ".join(_f(m[k], f) for k, _, f in cols) + " |")
    for base in [n for n in runs if n != "flower"]:
        cells = []
        for k, _, _ in cols:
            a, b = meds["flower"][k], meds[base][k]
            cells.append("" if a is None or b is None or k == "acc" or not a
                         else f"{b / a:.2f}x")
        lines.append(f"| {base} / flower | " + " | ".join(cells) + " |")
    lines += ["", "fedloom's parts (medians, s; result.json `timings`, `tail_s` = spawn-to-exit "
              "less all it timed: writing outputs and exiting):", ""]
    names = [n for n in runs if n != "flower"]
    lines += ["| part | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    keys = [k for k in PARTS if any(k in r["timings"] for n in names for r in runs[n])]
    keys += sorted({k for n in names for r in runs[n] for k in r["timings"]} - set(keys) -
                   {"run_s"})
    for k in keys:
        cells = []
        for n in names:
            vals = [float(r["timings"][k]) for r in runs[n]
                    if isinstance(r["timings"].get(k), int | float)]
            cells.append(f"{statistics.median(vals):.3f}" if vals else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "raw runs:"]
    for name, rows in runs.items():
        for r in rows:
            lines.append(f"- {name}: " + ", ".join(
                f"{k}={_f(r.get(k), f)}" for k, _, f in cols) + f", procs={r['procs']}, "
                f"leaked={r['leaked']}, load={r['load1']:.1f}"
                + (f", self-reported rss={r['self_rss_mb']:.0f}" if r.get("self_rss_mb") else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flower-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fedloom", default=str(ROOT / ".venv" / "bin" / "fedloom"))
    ap.add_argument("--save", type=Path, default=Path("/tmp/flower_cmp.md"))
    ap.add_argument("--joined", action="store_true",
                    help="also fedloom on ray joining a head started beforehand (the fast path)")
    ap.add_argument("--before", type=Path, default=None, metavar="DIR",
                    help="another fedloom checkout to run on ray too (its .venv/bin/fedloom)")
    args = ap.parse_args()
    if args.flower_child is not None:
        flower_child(args.flower_child)
        return
    env = dict(os.environ)
    # Ray workers must import protocols.learners; Flower must not phone home.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    runs: dict[str, list[dict[str, Any]]] = {"flower": [], "fedloom-ray": [], "fedloom-inproc": []}
    before_env: dict[str, str] = {}
    if args.before is not None:
        runs["before-ray"] = []
        before_env = {**env, "PYTHONPATH": str(args.before.resolve()),
                      "PYTHONDONTWRITEBYTECODE": "1"}

    def step(name: str, work: Path) -> dict[str, Any]:
        if name == "flower":
            return run_flower(sys.executable, work, env)
        if name == "before-ray":
            before = args.before.resolve()
            return run_fedloom(str(before / ".venv" / "bin" / "fedloom"), "ray", work,
                               before_env, name=name, cwd=before)
        if name == "fedloom-ray-joined":
            return run_fedloom(args.fedloom, "ray", work, joined_env, name=name)
        return run_fedloom(args.fedloom, name.removeprefix("fedloom-"), work, env)

    head = None
    joined_env: dict[str, str] = {}
    if args.joined:
        import secrets

        from perf.bench_ray_join import start_head

        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        head_env = {**{k: v for k, v in env.items() if not k.startswith("RAY_")}, **auth}
        python = str(Path(args.fedloom).parent / "python")
        head, port = start_head(head_env, tempfile.mkdtemp(prefix="flcmp", dir="/tmp"), [],
                                python=python)
        joined_env = {**env, **auth, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        runs["fedloom-ray-joined"] = []

    load0 = os.getloadavg()
    try:
        _repeat(args, runs, step)
    finally:
        if head is not None:
            from perf.bench_ray_join import stop

            stop(head)
    text = f"flwr {runs['flower'][0]['flwr']}; flower per-round accuracy " \
           f"{[round(a, 4) for a in runs['flower'][0]['accuracies']]}\n" \
           f"load average (1, 5, 15 min) before: {load0}, after: {os.getloadavg()}\n\n" \
           + table(runs, args.reps)
    print(text)
    args.save.write_text(text)


def _repeat(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], step: Any) -> None:
    """`args.reps` repetitions of every engine, the order turning by one each time."""
    with tempfile.TemporaryDirectory(prefix="flower-cmp-") as tmp:
        for i in range(args.reps):
            work = Path(tmp) / f"rep{i}"
            work.mkdir()
            # The order turns each repetition: no engine always follows the heaviest one.
            order = list(runs)
            for name in order[i % len(order):] + order[:i % len(order)]:
                runs[name].append(step(name, work))
            for kind in [n for n in runs if n != "flower"]:
                print(f"rep {i}: final model flower vs {kind}: "
                      + same_model(runs["flower"][-1]["model"], runs[kind][-1]["model"]))
            # Written after every repetition, so a later failure keeps what was measured.
            args.save.write_text(table(runs, i + 1))
            print(f"rep {i}: " + "; ".join(
                f"{k} exit {v[-1]['exit_s']:.1f}s acc {v[-1]['acc']:.4f} rss "
                f"{v[-1]['tree_mb']:.0f}MB" for k, v in runs.items()), flush=True)


if __name__ == "__main__":
    main()
