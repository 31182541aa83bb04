"""Micro-benchmarks against their floors: each `perf.bench_<name>` module measures one part of
fedloom beside the bare library it sits on (heapq, tobytes/lz4, ray.put, grpcio, raw TCP), and
this driver prints every measurement next to its floor as a ratio, in one table.

A bench module provides `run(quick: bool = False) -> list[dict]`, one dict per measurement:
`name` (what was measured), `value` (ours, a median), `unit`, `floor` (the same measurement of
the floor, or None), `floor_name` (what the floor is) and optionally `higher_is_better` (else
inferred: a unit with "/s" is a rate). Any other keys are kept in micro.jsonl as they are.
Rows of other shapes are read as far as they go: `mode` names a row, `rate_per_s` or `median_s`
is its value, `ratio` (ours/floor in the value's terms) gives the floor where none is named, and
a row with `skipped` is a note.

`run_micro` runs each bench in a fresh child process (`python -m perf.micro --child NAME`), so
whatever a bench reads about its own process (peak RSS above all) is that bench's alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from perf.procs import machine_info

BENCHES = ("kernel", "codec", "stages", "ray", "grpc", "fedavg", "gossip", "secagg")
# Other spellings bench modules may use for the standard keys.
_ALIASES = {
    "value": ("value", "median", "ours", "ours_median"),
    "floor": ("floor", "floor_value", "floor_median", "baseline"),
    "floor_name": ("floor_name", "floor_label", "against", "baseline_name"),
    "name": ("name", "label", "case", "what", "mode"),
    "unit": ("unit", "units"),
}


class MicroError(ValueError):
    """The micro run was asked for wrongly (an unknown bench name)."""


@dataclass
class BenchOutcome:
    """What one bench module gave: its rows, or why it was skipped or failed."""

    bench: str
    module: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0


def _pick(row: Mapping[str, Any], key: str) -> Any:
    for k in _ALIASES[key]:
        if k in row:
            return row[k]
    return None


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def normalise(row: Mapping[str, Any]) -> dict[str, Any]:
    """A bench row with the standard keys filled in and `cost`: how many times the floor's cost
    ours is (ours/floor for times, floor/ours for rates; 1.0 = as cheap as the floor)."""
    out = dict(row)
    for key in _ALIASES:
        out[key] = _pick(row, key)
    if out["value"] is None:
        for key, unit in (("rate_per_s", "/s"), ("median_s", "s")):
            if _number(row.get(key)) is not None:
                out["value"], out["unit"] = row[key], out["unit"] or unit
                break
    ours, floor = _number(out["value"]), _number(out["floor"])
    ratio = _number(row.get("ratio"))
    if floor is None and ours is not None and ratio:
        floor = out["floor"] = ours / ratio
        out["floor_name"] = out["floor_name"] or "the bench's floor (from its ratio)"
    unit = str(out.get("unit") or "")
    hib = row.get("higher_is_better")
    if hib is None:
        hib = "/s" in unit or unit.lower().endswith("ps")
    out["higher_is_better"] = bool(hib)
    cost = None
    if ours is not None and floor is not None and ours > 0 and floor > 0:
        cost = floor / ours if hib else ours / floor
    out["cost"] = cost
    return out


# The longest one bench may run in its child process.
CHILD_TIMEOUT_S = 3600.0


def run_bench(bench: str, quick: bool, isolate: bool = False,
              module: str | None = None) -> BenchOutcome:
    """Import `perf.bench_<bench>` (or `module`) only now and run it, in this process or (with
    `isolate`) in a fresh child; a missing module or dependency is a skip with a note, an
    exception inside it is recorded as that bench's error."""
    module = module or f"perf.bench_{bench}"
    if isolate:
        return _run_child(bench, quick, module)
    outcome = BenchOutcome(bench, module)
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(module)
        rows = mod.run(quick=quick)
    except ModuleNotFoundError as exc:
        if exc.name in (module, "perf"):
            outcome.skipped = f"{module} is not there (no such module)"
        else:
            outcome.skipped = f"{module} needs {exc.name!r}, which is not installed"
    except Exception as exc:
        tb = traceback.format_exc().strip().splitlines()
        outcome.error = f"{type(exc).__name__}: {exc}\n" + "\n".join(tb[-6:])
    else:
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            outcome.error = f"{module}.run() returned {type(rows).__name__}, not a list of dicts"
        else:
            outcome.rows = [normalise(r) for r in rows if not r.get("skipped")]
            notes = [f"{r.get('mode') or r.get('name') or '?'}: {r['skipped']}"
                     for r in rows if r.get("skipped")]
            if notes:
                outcome.skipped = "some cases skipped: " + "; ".join(notes)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _run_child(bench: str, quick: bool, module: str) -> BenchOutcome:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "perf.micro", "--child", bench, "--module", module]
    try:
        proc = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True,
                              text=True, check=False, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return BenchOutcome(bench, module, error=f"no result within {CHILD_TIMEOUT_S:.0f} s",
                            seconds=time.perf_counter() - t0)
    lines = proc.stdout.strip().splitlines()
    try:
        got = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        got = None
    if proc.returncode != 0 or not isinstance(got, dict):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return BenchOutcome(bench, module, seconds=time.perf_counter() - t0,
                            error=f"its process exited with {proc.returncode} and no result\n"
                                  + "\n".join(tail))
    return BenchOutcome(**got)


def select(only: Sequence[str] | None) -> list[str]:
    """The benches to run: all, or those named (in the order named); names an unknown one."""
    if not only:
        return list(BENCHES)
    unknown = [b for b in only if b not in BENCHES]
    if unknown:
        raise MicroError(f"--only: no bench named {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(BENCHES)}")
    return list(dict.fromkeys(only))


def _fmt(x: Any) -> str:
    v = _number(x)
    if v is None:
        return "–" if x is None else str(x)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def table(outcomes: Sequence[BenchOutcome]) -> list[list[str]]:
    """One line per measurement: bench, what, ours, floor, its value, cost against it."""
    body = []
    for o in outcomes:
        for r in o.rows:
            cost = r["cost"]
            body.append([o.bench, str(r["name"]), f"{_fmt(r['value'])} {r.get('unit') or ''}",
                         str(r["floor_name"] or "–"),
                         "–" if r["floor"] is None else f"{_fmt(r['floor'])} {r.get('unit') or ''}",
                         "–" if cost is None else f"{cost:.2f}x"])
    return body


HEADER = ["bench", "measurement", "ours", "floor", "floor value", "cost vs floor"]


def render_text(outcomes: Sequence[BenchOutcome]) -> str:
    """The table for a terminal, then one line per skipped or failed bench."""
    body = table(outcomes)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(HEADER)]
    line = "  ".join
    out = [line(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)),
           line("-" * w for w in widths)]
    out += [line(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    out += _notes(outcomes)
    out.append("cost vs floor: ours/floor for times, floor/ours for rates; 1.00x = as cheap "
               "as the floor.")
    return "\n".join(out) + "\n"


def _notes(outcomes: Sequence[BenchOutcome]) -> list[str]:
    out = []
    for o in outcomes:
        if o.skipped:
            out.append(f"skipped {o.bench}: {o.skipped}")
        if o.error:
            out.append(f"FAILED {o.bench}: {o.error.splitlines()[0]}")
    return out


def render_md(outcomes: Sequence[BenchOutcome], machine: Mapping[str, Any], quick: bool) -> str:
    """micro.md: the same table in markdown, with the machine and any skips or failures."""
    from perf.report import machine_line

    out = ["# fedloom perf micro", "",
           f"{sum(len(o.rows) for o in outcomes)} measurements from "
           f"{sum(1 for o in outcomes if o.rows)} benches"
           f"{' (--quick)' if quick else ''}. Machine: {machine_line(machine)}.", "",
           "Cost vs floor: ours/floor for times, floor/ours for rates; 1.00x = as cheap as the "
           "floor.", "",
           "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in table(outcomes)]
    notes = _notes(outcomes)
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    for o in outcomes:
        if o.error:
            out += ["", f"## {o.bench} failed", "", "```", o.error, "```"]
    return "\n".join(out) + "\n"


def run_micro(only: Sequence[str] | None, quick: bool, out: Path,
              stream: IO[str] | None = None, isolate: bool = True) -> list[BenchOutcome]:
    """Run the selected benches one after another (each in a process of its own unless
    `isolate` is False), print the table, write micro.jsonl/.md."""
    stream = stream or sys.stdout
    benches = select(only)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    outcomes = []
    for b in benches:
        stream.write(f"running {b} ...\n")
        stream.flush()
        o = run_bench(b, quick, isolate=isolate)
        outcomes.append(o)
        if o.error:
            state = "FAILED"
        elif o.rows:
            state = f"{len(o.rows)} measurements" + (" (some cases skipped)" if o.skipped else "")
        else:
            state = "skipped"
        stream.write(f"  {b}: {state} in {o.seconds:.1f} s\n")
    with (out / "micro.jsonl").open("w") as f:
        for o in outcomes:
            base = {"bench": o.bench, "module": o.module, "quick": quick, "seconds": o.seconds,
                    "machine": machine}
            for r in o.rows:
                # The driver's bench name wins; a row's own "bench" is kept as "case_of".
                extra = {"case_of": r["bench"]} if r.get("bench") not in (None, o.bench) else {}
                f.write(json.dumps({**r, **extra, **base}, default=str) + "\n")
            if o.skipped or o.error:
                f.write(json.dumps({**base, "skipped": o.skipped, "error": o.error}) + "\n")
    (out / "micro.md").write_text(render_md(outcomes, machine, quick))
    stream.write("\n" + render_text(outcomes))
    stream.write(f"\nwrote {out / 'micro.jsonl'} and {out / 'micro.md'}\n")
    return outcomes


def _child(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="run one bench and print its outcome as JSON")
    ap.add_argument("--child", required=True)
    ap.add_argument("--module")
    ap.add_argument("--quick", action="store_true")
    ns = ap.parse_args(argv)
    o = run_bench(ns.child, ns.quick, module=ns.module)
    sys.stdout.write("\n" + json.dumps(dataclasses.asdict(o), default=str) + "\n")


if __name__ == "__main__":
    _child()
