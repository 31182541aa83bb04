"""The comparison matrix: workloads x transports x settings x repeats, each run a fresh process.

A run is `python -m kernel.run.cli run CONFIG --set ... --out DIR --quiet` in its own process, so
its total wall time (process start to exit) and start-up are real and no run inherits another's
imports, caches or Ray cluster. Repeats are the outer loop (A B A B ...), so drift of the machine
over the comparison falls on every cell alike. While a run goes, the summed RSS of its whole
process tree is sampled; afterwards its result.json and metrics.jsonl are read into one row of
results.jsonl.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from perf import accuracy, report
from perf.procs import MB, Reaper, TreeSampler, machine_info

RUNNER = (sys.executable, "-m", "kernel.run.cli", "run")
ROUND_DURATION_KEYS = ("round_s", "round_wall_s", "dt_s")
ROUND_CLOCK_KEYS = ("wall", "wall_s")


class CompareError(ValueError):
    """The comparison was asked for wrongly (a missing config, a malformed --set or --vary)."""


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: a config and the overrides that make it this point."""

    label: str
    config: Path
    parts: dict[str, str]  # dimension -> value: workload, transport, each varied key
    sets: tuple[str, ...]  # every --set for this cell, later ones winning


@dataclass
class Matrix:
    """What `fedloom perf compare` was asked to run."""

    configs: list[Path]
    transports: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    vary: list[tuple[str, list[str]]] = field(default_factory=list)
    repeat: int = 3
    warmup: int = 0
    baseline: str | None = None
    timeout_s: float = 3600.0
    # The command that runs one config, before CONFIG --set ... --out DIR --quiet.
    runner: tuple[str, ...] = RUNNER
    # run.seed values: a "seed" dimension of the cells (innermost); none: as configured.
    seeds: list[int] = field(default_factory=list)
    # Accuracy studies: the accuracy "rounds to reach" counts to; the curve band over seeds.
    target: float | None = None
    band: str = "minmax"
    # The config keys each seed is written to (e.g. also data.seed: a new partition per seed).
    seed_keys: list[str] = field(default_factory=lambda: ["run.seed"])

    def cells(self) -> list[Cell]:
        """Every cell, workloads outermost, then transports, then varied settings, then seeds."""
        names = workload_names(self.configs)
        out = []
        tlist: list[str | None] = list(self.transports) or [None]
        vlists = [[(k, v) for v in vs] for k, vs in self.vary]
        if self.seeds:
            vlists.append([("seed", str(s)) for s in self.seeds])
        for cfg, t, combo in itertools.product(self.configs, tlist, itertools.product(*vlists)):
            parts = {"workload": names[cfg]}
            sets = list(self.sets)
            if t is not None:
                parts["transport"] = t
                sets.append(f"transport.kind={t}")
            for k, v in combo:
                parts[k] = v
                if k == "seed":
                    sets += [f"{key}={v}" for key in self.seed_keys]
                else:
                    sets.append(f"{k}={v}")
            label = "/".join(v if k in ("workload", "transport") else f"{k}={v}"
                             for k, v in parts.items())
            out.append(Cell(label, cfg, parts, tuple(sets)))
        return out


def workload_names(configs: Sequence[Path]) -> dict[Path, str]:
    """Short names for configs: the file stem, or the path where stems collide."""
    stems = [c.stem for c in configs]
    return {c: c.stem if stems.count(c.stem) == 1 else str(c) for c in configs}


def parse_set(item: str) -> str:
    """Check one `key=value` override (the run CLI parses the value)."""
    key, eq, _ = item.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+", key.strip()):
        raise CompareError(f"--set {item!r}: expected section.key=value, e.g. run.rounds=5")
    return item


def parse_vary(item: str) -> tuple[str, list[str]]:
    """`key=v1,v2,...` (or `key=v1;v2` when values hold commas) to (key, [v1, v2, ...])."""
    key, eq, rest = item.partition("=")
    parse_set(f"{key}=x")
    sep = ";" if ";" in rest else ","
    values = [v.strip() for v in rest.split(sep)] if eq else []
    if not values or any(v == "" for v in values):
        raise CompareError(f"--vary {item!r}: expected section.key=v1,v2,... with no empty value")
    if len(set(values)) != len(values):
        raise CompareError(f"--vary {item!r}: a value is listed twice")
    return key.strip(), values


# -- reading one run's outputs ---------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (a missing file has none); names the line that is bad."""
    if not path.exists():
        return []
    rows = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CompareError(f"{path}:{i}: not JSON ({exc})") from exc
    return rows


def round_rows(metrics: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The coordinating node's one row per round, in round order."""
    rows = [m for m in metrics if m.get("name") == "round"]
    return sorted(rows, key=lambda m: (m.get("value", 0), m.get("t", 0)))


def _numbers(rows: Sequence[Mapping[str, Any]], key: str) -> list[float] | None:
    vals = [r.get(key) for r in rows]
    if rows and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
        return [float(v) for v in vals]  # type: ignore[arg-type]
    return None


def per_round_time(rounds: Sequence[Mapping[str, Any]], result: Mapping[str, Any]
                   ) -> tuple[float | None, str]:
    """Median seconds per round and where it came from: a per-round duration field, the gaps
    between successive wall-clock stamps, or else rounds_s / rounds."""
    for key in ROUND_DURATION_KEYS:
        vals = _numbers(rounds, key)
        if vals:
            return statistics.median(vals), key
    clocks = [(k, _numbers(rounds, k)) for k in ROUND_CLOCK_KEYS]
    if str(result.get("transport", "inproc")) != "inproc":
        clocks.append(("t", _numbers(rounds, "t")))  # ctx.now is the wall clock off inproc
    for key, vals in clocks:
        if vals and len(vals) >= 2:
            gaps = [b - a for a, b in itertools.pairwise(vals)]
            if all(g >= 0 for g in gaps):
                return statistics.median(gaps), f"{key} gaps"
    n = result.get("rounds") or len(rounds)
    rs = result.get("rounds_s")
    if isinstance(rs, int | float) and n:
        return float(rs) / n, "rounds_s / rounds"
    return None, "none"


def compression_ratio(result: Mapping[str, Any]) -> float | None:
    """Raw over encoded bytes, where the run reports it."""
    r = result.get("compression_ratio")
    if isinstance(r, int | float):
        return float(r)
    raw, enc = result.get("raw_bytes"), result.get("bytes")
    if isinstance(raw, int | float) and isinstance(enc, int | float) and enc:
        return raw / enc
    return None


def curve(rounds: Sequence[Mapping[str, Any]], total_bytes: int | None
          ) -> tuple[list[dict[str, Any]], bool]:
    """Per round: accuracy, loss and cumulative bytes. Bytes come from the rows' `bytes_total`
    when present, else the run's total spread evenly over rounds (then flagged estimated)."""
    cum = _numbers(rounds, "bytes_total")
    estimated = cum is None
    n = len(rounds)
    out = []
    for i, r in enumerate(rounds):
        b: float | None
        if cum is not None:
            b = cum[i]
        elif total_bytes is not None and n:
            b = total_bytes * (i + 1) / n
        else:
            b = None
        out.append({"round": r.get("value", i + 1), "accuracy": r.get("accuracy"),
                    "loss": r.get("loss"), "bytes": b})
    return out, estimated


SPREAD = ("mean", "std", "p10", "min")


def client_spread(result: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]
                  ) -> dict[str, float] | None:
    """The per-client accuracy spread {mean, std, p10, min} a run reported: result.json's
    `client_accuracy` (a list of per-client accuracies, or a table of those four, "worst" for
    "min"), else its last round row's `client_accuracy_<stat>` / `client_acc_<stat>` fields."""
    got: Any = result.get("client_accuracy")
    if got is None and rounds:
        last = rounds[-1]
        for prefix in ("client_accuracy_", "client_acc_"):
            table = {k[len(prefix):]: v for k, v in last.items() if k.startswith(prefix)}
            if table:
                got = table
                break
    if isinstance(got, list | tuple) and got and all(_num(x) is not None for x in got):
        xs = sorted(float(x) for x in got)
        p10 = xs[0] if len(xs) == 1 else statistics.quantiles(xs, n=10, method="inclusive")[0]
        return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "p10": p10,
                "min": xs[0]}
    if isinstance(got, Mapping):
        table = dict(got)
        if "min" not in table and "worst" in table:
            table["min"] = table["worst"]
        if all(_num(table.get(k)) is not None for k in SPREAD):
            return {k: float(table[k]) for k in SPREAD}
    return None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def startup_time(run_dir: Path, result: Mapping[str, Any], started_at: float | None
                 ) -> tuple[float | None, str]:
    """Seconds from process start to the first round, and how they were found.

    With `started_at` (the harness's clock just before the process was started): the rounds
    ended when the outputs began to be written, i.e. metrics.jsonl's mtime less close_s, and
    began rounds_s before that. This avoids the run's own process-start stamp, which psutil
    derives from the whole-second boot time in /proc/stat and so can be up to 1 s off.
    Without it: the run's wall_s less rounds_s."""
    rounds_s, close_s = _num(result.get("rounds_s")), _num(result.get("close_s")) or 0.0
    metrics = run_dir / "metrics.jsonl"
    if started_at is not None and rounds_s is not None and metrics.is_file():
        rounds_end = metrics.stat().st_mtime - close_s
        return rounds_end - rounds_s - started_at, "harness clock"
    run_wall = _num(result.get("wall_s"))
    if run_wall is not None and rounds_s is not None:
        return run_wall - rounds_s, "wall_s - rounds_s"
    return None, "none"


def summarise_run(run_dir: Path, started_at: float | None = None) -> dict[str, Any]:
    """The figures of one finished run folder (result.json + metrics.jsonl) as row fields;
    `started_at` is when the harness started its process (time.time())."""
    result = json.loads((run_dir / "result.json").read_text())
    rounds = round_rows(read_metrics(run_dir / "metrics.jsonl"))
    n_rounds = result.get("rounds") or len(rounds) or None
    total_bytes = result.get("bytes")
    round_s, source = per_round_time(rounds, result)
    run_wall, rounds_s = _num(result.get("wall_s")), _num(result.get("rounds_s"))
    startup, startup_source = startup_time(run_dir, result, started_at)
    pts, estimated = curve(rounds, total_bytes)
    return {
        "protocol": result.get("protocol"),
        "run_transport": result.get("transport"),
        "seed": result.get("seed"),
        "rounds": n_rounds,
        "reason": result.get("reason"),
        "run_wall_s": run_wall,
        # Process start to the first round: interpreter, imports, build, transport start-up.
        "startup_s": startup,
        "startup_source": startup_source,
        "transport_startup_s": result.get("startup_s"),
        "build_s": result.get("build_s"),
        "close_s": result.get("close_s"),
        "rounds_s": rounds_s,
        "virtual_s": result.get("virtual_s"),
        "round_s": round_s,
        "round_s_source": source,
        "messages": result.get("messages"),
        "bytes": total_bytes,
        "bytes_per_round": total_bytes / n_rounds if total_bytes is not None and n_rounds
        else None,
        "compression_ratio": compression_ratio(result),
        "events": result.get("events"),
        "test_accuracy": result.get("test_accuracy"),
        "client_accuracy": client_spread(result, rounds),
        "final_model_sha256": result.get("final_model_sha256"),
        "run_peak_rss_mb": result.get("peak_rss_mb"),
        "curve": pts,
        "curve_bytes_estimated": estimated,
    }


# -- running ---------------------------------------------------------------------------------
class Progress:
    """A line per finished run; on a terminal also a line that updates while a run goes."""

    def __init__(self, total: int, stream: IO[str] | None = None, live: bool | None = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._last = 0.0

    def tick(self, n: int, label: str, elapsed: float, rss_bytes: int) -> None:
        """Update the live line (at most 4 times a second)."""
        now = time.monotonic()
        if not self.live or now - self._last < 0.25:
            return
        self._last = now
        self.stream.write(f"\r\x1b[K[{n}/{self.total}] {label}: {elapsed:6.1f} s, "
                          f"tree RSS {rss_bytes / MB:,.0f} MiB")
        self.stream.flush()

    def done(self, n: int, row: Mapping[str, Any]) -> None:
        """Print the finished run's line."""
        rep = "warm-up" if row.get("warmup") else f"repeat {row['repeat']}"
        if row.get("ok"):
            acc = row.get("test_accuracy")
            what = (f"wall {row['wall_s']:.2f} s, rounds {report.fmt(row.get('rounds_s'))} s, "
                    f"peak RSS {row['peak_rss_mb']:,.0f} MiB"
                    + (f", accuracy {acc:.4f}" if isinstance(acc, int | float) else ""))
        else:
            last = (row.get("error") or "").strip().splitlines()[-1:] or ["?"]
            what = f"FAILED (exit {row.get('rc')}): {last[0][:160]}"
        clear = "\r\x1b[K" if self.live else ""
        self.stream.write(f"{clear}[{n}/{self.total}] {row['cell']} {rep}: {what}\n")
        self.stream.flush()


def _kill_tree(proc: subprocess.Popen[bytes], sampler: TreeSampler, reaper: Reaper) -> None:
    """Stop a run that overran: its process and every descendant the sampler saw."""
    victims = list(sampler.seen.values())
    with contextlib.suppress(psutil.Error):
        victims += psutil.Process(proc.pid).children(recursive=True)
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            continue
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    if not reaper.wait(30):
        raise CompareError(f"run process {proc.pid} did not exit within 30 s of SIGKILL")
    sampler.wait_gone(10.0)  # a killed process takes a moment to be gone


def run_cell(cell: Cell, run_dir: Path, *, timeout_s: float, progress: Progress, n: int,
             runner: Sequence[str] = RUNNER, cwd: Path | None = None) -> dict[str, Any]:
    """Run one cell once in a fresh process and return its row (without matrix bookkeeping)."""
    run_dir.mkdir(parents=True, exist_ok=False)
    cmd = [*runner, str(cell.config)]
    for s in cell.sets:
        cmd += ["--set", s]
    cmd += ["--out", str(run_dir), "--quiet"]
    row: dict[str, Any] = {"cmd": cmd}
    with (run_dir / "stdout.log").open("wb") as out, (run_dir / "stderr.log").open("wb") as err:
        row["started_at"] = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd)
        reaper = Reaper(proc)
        sampler = TreeSampler(proc.pid).start()
        timed_out = False
        while not reaper.wait(0.2):
            elapsed = time.perf_counter() - t0
            progress.tick(n, cell.label, elapsed, sampler.last_bytes)
            if elapsed > timeout_s:
                timed_out = True
                _kill_tree(proc, sampler, reaper)
                break
        wall = (reaper.ended or time.perf_counter()) - t0
        sampler.stop()
    # Children may still be on their way out when the run's process has exited.
    leaks = sampler.wait_gone(2.0)
    # The sampled tree sum, or the run's own kernel-counted peak when that is higher (a spike
    # between two samples of a single-process run).
    peak = max(sampler.peak_bytes, reaper.maxrss_bytes) / MB
    row.update(rc=proc.returncode, wall_s=wall, peak_rss_mb=peak,
               sampled_peak_rss_mb=sampler.peak_mb, root_maxrss_mb=reaper.maxrss_bytes / MB,
               peak_procs=sampler.peak_procs, rss_samples=sampler.samples,
               leftover_processes=[f"{p.pid} {_name(p)}" for p in leaks])
    error = None
    if timed_out:
        error = f"run did not finish within --timeout {timeout_s:g} s; killed"
    elif proc.returncode != 0:
        error = _tail(run_dir / "stderr.log") or f"exit status {proc.returncode}, no stderr"
    elif not (run_dir / "result.json").exists():
        error = f"exit status 0 but {run_dir / 'result.json'} was not written"
    if error is None:
        try:
            row.update(summarise_run(run_dir, row["started_at"]))
            if row.get("startup_s") is not None and row.get("rounds_s") is not None:
                # Closing the transport, writing outputs, interpreter exit.
                row["teardown_s"] = wall - row["startup_s"] - row["rounds_s"]
        except (OSError, ValueError) as exc:
            error = f"cannot read the run's outputs in {run_dir}: {exc}"
    row["ok"] = error is None
    row["error"] = error
    return row


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def schedule(cells: Sequence[Cell], repeat: int, warmup: int = 0) -> list[tuple[Cell, int]]:
    """The order runs go in: warm-ups (repeat -1) then repeats outermost, A B A B ..."""
    order = [(c, -1) for _ in range(warmup) for c in cells]
    order += [(c, k) for k in range(repeat) for c in cells]
    return order


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")[:80]


def run_matrix(matrix: Matrix, out: Path, *, cwd: Path | None = None,
               stream: IO[str] | None = None, live: bool | None = None
               ) -> list[dict[str, Any]]:
    """Run every cell `repeat` times into `out` and write results.jsonl, report.md, the plots."""
    if not matrix.configs:
        raise CompareError("give at least one CONFIG to compare")
    for c in matrix.configs:
        if not c.is_file():
            raise CompareError(f"config {c} does not exist (or is not a file)")
    if matrix.repeat < 1:
        raise CompareError(f"--repeat must be >= 1, got {matrix.repeat}")
    for key in matrix.seed_keys:
        parse_set(f"{key}=0")
    if len(set(matrix.seeds)) != len(matrix.seeds):
        raise CompareError(f"--seeds lists a seed twice: {matrix.seeds}")
    if matrix.band not in accuracy.BANDS:
        raise CompareError(f"--band {matrix.band!r}: expected one of {', '.join(accuracy.BANDS)}")
    cells = matrix.cells()
    if len({c.label for c in cells}) != len(cells):
        raise CompareError("two cells have the same name: is a transport or value listed twice?")
    # A wrong --baseline should fail now, not after the whole matrix has run.
    stub = [{"cell": c.label, "parts": c.parts, "order": i} for i, c in enumerate(cells)]
    baseline = matrix.baseline if matrix.baseline is not None else report.default_baseline(stub)
    try:
        report.resolve_baseline(stub, baseline)
    except report.ReportError as exc:
        raise CompareError(str(exc)) from exc
    results = out / "results.jsonl"
    if results.exists():
        raise CompareError(f"{results} exists already; give a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    machine = {**machine_info(), "env": dict(env_note())}
    (out / "matrix.json").write_text(json.dumps({
        "configs": [str(c) for c in matrix.configs], "transports": matrix.transports,
        "sets": matrix.sets, "vary": [[k, vs] for k, vs in matrix.vary],
        "repeat": matrix.repeat, "warmup": matrix.warmup, "baseline": baseline,
        "seeds": matrix.seeds, "seed_keys": matrix.seed_keys, "target": matrix.target,
        "band": matrix.band,
        "cells": [{"label": c.label, "parts": c.parts, "sets": list(c.sets)} for c in cells],
        "runner": list(matrix.runner), "machine": machine,
    }, indent=2) + "\n")
    plan = schedule(cells, matrix.repeat, matrix.warmup)
    progress = Progress(len(plan), stream, live)
    rows: list[dict[str, Any]] = []
    with results.open("w") as f:
        for i, (cell, k) in enumerate(plan):
            tag = "warmup" if k < 0 else f"r{k}"
            run_dir = out / "runs" / f"{i:03d}-{_slug(cell.label)}-{tag}"
            row: dict[str, Any] = {
                "order": i, "cell": cell.label, "parts": cell.parts, "repeat": max(k, 0),
                "warmup": k < 0, "config": str(cell.config), "sets": list(cell.sets),
                "out": str(run_dir.relative_to(out)),
            }
            row.update(run_cell(cell, run_dir, timeout_s=matrix.timeout_s, progress=progress,
                                n=i + 1, runner=matrix.runner, cwd=cwd))
            row["machine"] = machine
            rows.append(row)
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()  # a comparison cut short keeps what it measured
            progress.done(i + 1, row)
            if row["leftover_processes"]:
                progress.stream.write(f"  warning: {len(row['leftover_processes'])} process(es) "
                                      f"of that run still alive: {row['leftover_processes']}\n")
    write_report(rows, out, baseline, target=matrix.target, band=matrix.band)
    return rows


def write_report(rows: Sequence[Mapping[str, Any]], out: Path, baseline: str | None,
                 *, target: float | None = None, band: str = "minmax") -> list[Path]:
    """report.md and the PNGs for `rows` into `out`; returns the files written."""
    plots = report.plot_all(rows, out)
    seeds_plot = accuracy.plot(rows, out, band, target)
    if seeds_plot is not None:
        plots.insert(0, seeds_plot)
    md = report.render(rows, baseline, plots=[p.name for p in plots], target=target)
    (out / "report.md").write_text(md)
    return [out / "report.md", *plots]


def load_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of a compare folder's results.jsonl."""
    path = out / "results.jsonl"
    if not path.is_file():
        raise CompareError(f"{out} is not a compare folder: it has no results.jsonl")
    return read_metrics(path)


def rewrite_report(out: Path, baseline: str | None = None, *, target: float | None = None,
                   band: str | None = None) -> list[Path]:
    """Rebuild report.md and the plots of a compare folder from its results.jsonl (baseline,
    target and band default to what the comparison ran with)."""
    rows = load_rows(out)
    matrix = out / "matrix.json"
    ran = json.loads(matrix.read_text()) if matrix.is_file() else {}
    baseline = baseline if baseline is not None else ran.get("baseline")
    target = target if target is not None else ran.get("target")
    band = band or ran.get("band") or "minmax"
    if band not in accuracy.BANDS:
        raise CompareError(f"--band {band!r}: expected one of {', '.join(accuracy.BANDS)}")
    try:
        return write_report(rows, out, baseline, target=target, band=band)
    except report.ReportError as exc:
        raise CompareError(str(exc)) from exc


def default_out(kind: str) -> Path:
    """perf-results/<kind>-<timestamp>: where results go without --out."""
    return Path("perf-results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def env_note() -> Mapping[str, str]:
    """Environment variables that change what a run measures (recorded, not set)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")
    return {k: os.environ[k] for k in keys if k in os.environ}
