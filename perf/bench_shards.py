"""Parallel shards against one process: W2 with every client in every round on inproc, ray
(2 shards) and grpc (2 shards), side by side in one run.

Cases: `all` = W2 with protocol.clients_per_round = 100, 4 rounds, workload.data_cache = 128
(every client trains every round, so each shard has the same work); `plain` = W2 as it is;
`big` = W2 with 2,048 samples per client. Each run is a fresh process of its own (the runner's
`rounds_s`: rounds only, no start-up), the three transports alternate, and the figure is the
median seconds per round; the ratio is a transport's against inproc's in the same run (2 cores
are the ceiling: 0.5x). Every run of a case must end with the same model sha on all three.

Each run also records a timeline (`transports.shardtrace`) and the bench prints, per transport,
the median per-phase breakdown of its rounds, per shard, in seconds per round unless said:
`torch thr` torch's intra-op threads; `clients` distinct clients that trained on the shard;
`train` the clients' training events (wall), `(waiting)` the part of it the loop thread was
ready but not running (the GIL held by another thread of the process, or no free core);
`server` node 0's events (summing replies, evaluation, the next round's send); `flushes`,
`flush s` the transport's calls on the loop; `idle` the loop waiting for messages; `loop
waiting` all events' wall minus CPU, split into `core wait` (the loop thread runnable but
without a core, from Linux's schedstat, over the whole loop) and `gil wait` (the rest: the
GIL or a lock held by another thread of the process); `loop cpu`, `proc cpu` the loop
thread's and the whole process's CPU; `rx batch`, `rx s`, `rx cpu` batches the receive
threads took in and their time; `sends`, `send s` batches sent and the time of each send;
`thr cpu` the CPU of every thread but the loop; `1st train`, `last end` when the shard's
first client started and its last ended, from the round's start (medians over rounds). The
`cpu-bound ratio` is the busiest shard's process CPU per round against inproc's: the ratio if
every shard had a core of its own, which load from other processes cannot move much.

With `--base DIR` (another checkout, e.g. `git archive <commit> | tar -x -C DIR`) the old code's
runs alternate with this checkout's in the same sitting, and each row shows both. A checkout
without `transports/shardtrace.py` gives figures but no breakdown.

    python -m perf.bench_shards [--cases all plain big] [--repeats N] [--no-trace]
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


def _trace_inproc() -> Any:
    """Record inproc's loop like a shard's (bench only: the inproc transport has no hook)."""
    from kernel.host import Host
    from transports import shardtrace

    trace = shardtrace.Trace("inproc", 0)
    plain = Host.run

    def run(self: Host, *args: Any, **kw: Any) -> str:
        trace.install(self)
        try:
            return plain(self, *args, **kw)
        finally:
            trace.loop_ended()

    Host.run = run  # type: ignore[method-assign]
    return trace


def run_one(kind: str, overrides: list[str]) -> dict[str, Any]:
    """One W2 run on `kind` in this process: its seconds per round and model sha."""
    from kernel.run import config as kconfig
    from kernel.run import runner
    from transports import shardtrace

    extra = [] if kind == "inproc" else ["transport.shards=2"]
    cfg = kconfig.load(W2, [f"transport.kind={kind}", "run.progress=false", *extra,
                            *overrides])
    trace = _trace_inproc() if kind == "inproc" and shardtrace.directory() else None
    res = runner.run(cfg, quiet=True, started_at=time.time())
    shardtrace.finish(trace)
    return {"kind": kind, "s_per_round": res["rounds_s"] / res["rounds"],
            "startup_s": res.get("startup_s"), "wall_s": res["wall_s"],
            "sha": res["final_model_sha256"], "accuracy": res.get("test_accuracy")}


def _child(kind: str, overrides: list[str], trace: bool = True,
           code: Path | None = None) -> dict[str, Any]:
    """One run in a fresh process, of this checkout's code or of the checkout at `code`."""
    env = dict(os.environ)
    cwd = None
    if code is not None:
        # `python -m` puts the working directory first on sys.path: run from there, so the
        # other checkout's code (not this one's) is what runs, shards included.
        cwd = str(code)
        env["PYTHONPATH"] = str(code)
    with tempfile.TemporaryDirectory(prefix="fedloom-shardtrace-") as tmp:
        if trace:
            env["FEDLOOM_SHARD_TRACE"] = tmp
        else:
            env.pop("FEDLOOM_SHARD_TRACE", None)
        out = subprocess.run([sys.executable, "-m", "perf.bench_shards", "--one", kind,
                              *overrides], capture_output=True, text=True, check=False,
                             timeout=1800, env=env, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"W2 on {kind} ({overrides}) failed: {out.stderr[-2000:]}")
        res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        if trace:
            docs = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("*.json"))]
            res["phases"] = phases(docs)
    return res


def phases(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-shard seconds per round of one run's traces (see the module docstring)."""
    ev_all = [e for d in docs for e in d["events"]]
    ups = sorted((e for e in ev_all if e[2] == "update" and e[1] == 0), key=lambda e: e[5])
    trains = [e for e in ev_all if e[2] == "train" and e[1] != 0]
    if not ups or not trains:
        return {}
    rounds = sorted({e[4] for e in trains if isinstance(e[4], int)})
    # A round starts when the server's previous round ended (its last reply's event), the
    # first one when its first client started; it ends with its own last reply's event.
    end = {r: max(e[6] for e in ups if e[4] == r) for r in rounds if any(e[4] == r for e in ups)}
    start = {r: end.get(r - 1, min(e[5] for e in trains if e[4] == r)) for r in rounds}
    t0 = min(start.values())
    t1 = max(end.values())
    n = len(rounds)
    out: dict[str, Any] = {"rounds": n, "round_s": (t1 - t0) / n, "shards": []}
    for d in sorted(docs, key=lambda d: d["shard"]):
        evs = [e for e in d["events"] if e[5] >= t0 and e[6] <= t1]
        tr = [e for e in evs if e[2] == "train" and e[1] != 0]
        srv = [e for e in evs if e[1] == 0]
        calls = [e for e in evs if e[0] == "call"]
        busy = sum(e[6] - e[5] for e in evs)
        cpu = sum(e[7] for e in evs)
        rx = [x for x in d["rx"] if x[0] >= t0 and x[1] <= t1]
        tx = [x for x in d["tx"] if x[0] >= t0 and x[1] <= t1]
        first = [min((e[5] for e in tr if e[4] == r), default=None) for r in rounds]
        last = [max((e[6] for e in tr if e[4] == r), default=None) for r in rounds]
        lag = [f - start[r] for r, f in zip(rounds, first) if f is not None]
        done = [la - start[r] for r, la in zip(rounds, last) if la is not None]
        loop = d.get("loop", {})
        other = proc = runq = gil = None
        if "proc_cpu1" in loop:
            proc = (loop["proc_cpu1"] - loop["proc_cpu0"]) / n
            other = proc - (loop["cpu1"] - loop["cpu0"]) / n
        if loop.get("runq1") is not None and loop.get("runq0") is not None:
            # The loop thread's wait for a core over the whole loop; the rest of its waiting
            # inside events (wall minus CPU) is the GIL's (or a lock's).
            runq = (loop["runq1"] - loop["runq0"]) / n
            gil = max((busy - cpu) / n - runq, 0.0)
        out["shards"].append({
            "shard": d["shard"], "torch_threads": d.get("torch_threads"),
            "clients": len({e[1] for e in tr}),
            "train_s": sum(e[6] - e[5] for e in tr) / n,
            "train_wait_s": sum(e[6] - e[5] - e[7] for e in tr) / n,
            "server_s": sum(e[6] - e[5] for e in srv) / n,
            "calls": len(calls) / n, "calls_s": sum(e[6] - e[5] for e in calls) / n,
            "idle_s": ((t1 - t0) - busy) / n, "wait_s": (busy - cpu) / n,
            "loop_cpu_s": cpu / n, "proc_cpu_s": proc, "runq_s": runq, "gil_s": gil,
            "rx": len(rx) / n, "rx_s": sum(x[1] - x[0] for x in rx) / n,
            "rx_cpu_s": sum(x[2] for x in rx) / n,
            "tx": len(tx) / n, "tx_s": sum(x[1] - x[0] for x in tx) / n,
            "other_threads_cpu_s": other,
            "first_train_at": statistics.median(lag) if lag else None,
            "last_train_end_at": statistics.median(done) if done else None,
        })
    return out


def _median_phases(runs: list[dict[str, Any]]) -> dict[str, Any]:
    got = [r["phases"] for r in runs if r.get("phases")]
    if not got:
        return {}
    shards = []
    for i in range(len(got[0]["shards"])):
        rows = [g["shards"][i] for g in got if len(g["shards"]) > i]
        shards.append({k: (statistics.median(r[k] for r in rows)
                           if all(isinstance(r[k], (int, float)) for r in rows) else None)
                       for k in rows[0]})
    return {"round_s": statistics.median(g["round_s"] for g in got), "shards": shards}


PHASE_COLS = (("torch_threads", "torch thr", "{:.0f}"), ("clients", "clients", "{:.0f}"),
              ("train_s", "train", "{:.3f}"),
              ("train_wait_s", "(waiting)", "{:.3f}"), ("server_s", "server", "{:.3f}"),
              ("calls", "flushes", "{:.0f}"), ("calls_s", "flush s", "{:.3f}"),
              ("idle_s", "idle", "{:.3f}"), ("wait_s", "loop waiting", "{:.3f}"),
              ("runq_s", "core wait", "{:.3f}"), ("gil_s", "gil wait", "{:.3f}"),
              ("loop_cpu_s", "loop cpu", "{:.3f}"), ("proc_cpu_s", "proc cpu", "{:.3f}"),
              ("rx", "rx batch", "{:.0f}"), ("rx_s", "rx s", "{:.3f}"),
              ("rx_cpu_s", "rx cpu", "{:.3f}"), ("tx", "sends", "{:.0f}"),
              ("tx_s", "send s", "{:.3f}"), ("other_threads_cpu_s", "thr cpu", "{:.3f}"),
              ("first_train_at", "1st train", "{:.3f}"),
              ("last_train_end_at", "last end", "{:.3f}"))


def format_phases(kind: str, ph: dict[str, Any]) -> list[str]:
    """Lines of a per-shard phase table (seconds per round, medians over runs)."""
    if not ph:
        return [f"  {kind}: no trace"]
    lines = [f"  {kind}: round {ph['round_s']:.3f} s (traced); per shard, s per round:"]
    lines.append("    " + " ".join(f"{h:>9}" for _, h, _ in (("", "shard", ""), *PHASE_COLS)))
    for row in ph["shards"]:
        cells = [f"{int(row['shard']):>9}"]
        for key, _, fmt in PHASE_COLS:
            v = row.get(key)
            cells.append(f"{'-' if v is None else fmt.format(v):>9}")
        lines.append("    " + " ".join(cells))
    return lines


def run(quick: bool = False, cases: tuple[str, ...] = ("all", "plain", "big"),
        repeats: int = 1, trace: bool = True, base: Path | None = None) -> list[dict[str, Any]]:
    """Rows for perf.micro: seconds per round per transport, with inproc as the floor; with
    `base` (another checkout, the old code), its runs alternate with these in the same sitting
    and each row carries the old figures beside the new."""
    rows = []
    sides = [("new", None)] + ([("base", base)] if base is not None else [])
    for case in cases[:1] if quick else cases:
        got: dict[tuple[str, str], list[dict[str, Any]]] = {
            (side, k): [] for side, _ in sides for k in KINDS}
        load: dict[str, list[float]] = {side: [] for side, _ in sides}
        for _ in range(repeats):
            for kind in KINDS:  # alternate, so load from elsewhere hits every side alike
                for side, code in sides:
                    load[side].append(os.getloadavg()[0])
                    got[side, kind].append(_child(kind, CASES[case], trace, code))
        shas = {r["sha"] for rs in got.values() for r in rs}
        for kind in KINDS[1:]:
            row: dict[str, Any] = {}
            for side, _ in sides:
                floor = statistics.median(r["s_per_round"] for r in got[side, "inproc"])
                v = statistics.median(r["s_per_round"] for r in got[side, kind])
                fig = {"value": v, "floor": floor, "ratio": v / floor,
                       "runs": [r["s_per_round"] for r in got[side, kind]],
                       "inproc_runs": [r["s_per_round"] for r in got[side, "inproc"]],
                       "load_1min": load[side], "phases": _median_phases(got[side, kind]),
                       "inproc_phases": _median_phases(got[side, "inproc"]),
                       "cpu_bound_ratio": _cpu_bound(got[side, kind], got[side, "inproc"])}
                if side == "new":
                    row.update(fig)
                else:
                    row["base"] = fig
            row.update({"name": f"W2 {case} ({' '.join(CASES[case]) or 'as is'}): {kind}, "
                                f"2 shards, s/round", "unit": "s", "floor_name": "inproc",
                        "kind": kind, "target_ratio": TARGETS.get((case, kind)),
                        "same_sha": len(shas) == 1, "shas": sorted(shas)})
            rows.append(row)
    return rows


def _cpu_bound(runs: list[dict[str, Any]], floor: list[dict[str, Any]]) -> float | None:
    """The ratio if every shard had a core of its own and CPU were all that counted: the
    busiest shard's process CPU per round against inproc's (medians); None without traces."""
    def busiest(rs: list[dict[str, Any]]) -> float | None:
        got = [max((sh["proc_cpu_s"] or 0.0) for sh in r["phases"]["shards"])
               for r in rs if r.get("phases")]
        return statistics.median(got) if got else None

    a, b = busiest(runs), busiest(floor)
    return a / b if a and b else None


def _line(tag: str, r: dict[str, Any], target: float | None) -> str:
    tgt = f" (target <= {target}x)" if target else ""
    cpu = r.get("cpu_bound_ratio")
    return (f"  {tag:<5} {r['value']:7.3f} s/round  inproc {r['floor']:7.3f}  ratio "
            f"{r['ratio']:.2f}x{tgt}"
            + (f"  cpu-bound ratio {cpu:.2f}x" if cpu else "")
            + f"  load {', '.join(f'{x:.1f}' for x in r['load_1min'])}\n"
            f"        runs {', '.join(f'{x:.3f}' for x in r['runs'])}; inproc runs "
            f"{', '.join(f'{x:.3f}' for x in r['inproc_runs'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-trace", action="store_true",
                    help="skip the per-phase timelines (they cost ~1 us per event)")
    ap.add_argument("--json", help="also write every row, runs and phases to this file")
    ap.add_argument("--base", type=Path,
                    help="another checkout (the old code, e.g. from `git archive`) whose runs "
                         "alternate with this one's, for before/after figures in one sitting")
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1:])))
        return
    rows = run(cases=tuple(args.cases), repeats=args.repeats, trace=not args.no_trace,
               base=args.base)
    for r in rows:
        print(f"{r['name']}  same sha on every run: {r['same_sha']} "
              f"({', '.join(x[:12] for x in r['shas'])})")
        print(_line("new", r, r["target_ratio"]))
        if "base" in r:
            print(_line("base", r["base"], r["target_ratio"]))
        for tag, fig in (("new", r), ("base", r.get("base"))):
            if fig and fig["phases"]:
                if r["kind"] == KINDS[1]:
                    print("\n".join(format_phases(f"{tag} inproc", fig["inproc_phases"])))
                print("\n".join(format_phases(f"{tag} {r['kind']}", fig["phases"])))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
