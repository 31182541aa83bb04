"""From the rows of `results.jsonl` to `report.md` and its PNG plots.

Everything here is a pure function of the rows, so a report can be rebuilt from a compare folder
(`fedloom perf report DIR`) and the tests can recompute every figure it prints.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from perf import accuracy

Row = Mapping[str, Any]
MiB = 1024 * 1024

# (metric, column title): the per-cell tables, in order.
TIME_METRICS = (
    ("wall_s", "total wall s"),
    ("startup_s", "start-up s"),
    ("rounds_s", "rounds s"),
    ("round_s", "s / round"),
)
RESOURCE_METRICS = (
    ("peak_rss_mb", "peak RSS MiB (tree)"),
    ("peak_procs", "processes"),
    ("messages", "messages"),
    ("bytes_mb", "MiB carried"),
    ("compression_ratio", "compression"),
    ("test_accuracy", "test accuracy"),
)
RATIO_METRICS = (
    ("wall_s", "total wall"),
    ("startup_s", "start-up"),
    ("rounds_s", "rounds"),
    ("round_s", "s / round"),
    ("peak_rss_mb", "peak RSS"),
    ("bytes_mb", "bytes"),
)
PLOTS = ("time_per_round.png", "bytes_per_round.png", "accuracy_vs_round.png",
         "accuracy_vs_bytes.png")
SCALING_PLOT = "scaling.png"
# A --vary key whose last part matches this is a population size: it gets scaling curves.
_CLIENT_KEY = re.compile(r"(^|_)(clients|nodes|population|workers)$")


class ReportError(ValueError):
    """The rows cannot give what was asked (an unknown baseline name, no rows)."""


# -- numbers ---------------------------------------------------------------------------------
def value(row: Row, metric: str) -> float | None:
    """The number `metric` of one run (derived ones included), or None when it has none."""
    if metric == "bytes_mb":
        b = row.get("bytes")
        return None if b is None else b / MiB
    if metric == "bytes_per_round_mb":
        b = row.get("bytes_per_round")
        return None if b is None else b / MiB
    v = row.get(metric)
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def measured(rows: Iterable[Row]) -> list[Row]:
    """The rows that count: runs that succeeded and are not warm-ups."""
    return [r for r in rows if r.get("ok") and not r.get("warmup")]


def cells(rows: Iterable[Row]) -> list[str]:
    """Cell labels in the order the matrix first ran them."""
    seen: dict[str, None] = {}
    for r in sorted(rows, key=lambda r: r.get("order", 0)):
        seen.setdefault(r["cell"], None)
    return list(seen)


def stats(xs: Sequence[float]) -> tuple[float, float, float] | None:
    """(median, min, max), or None for no values."""
    if not xs:
        return None
    return statistics.median(xs), min(xs), max(xs)


def cell_values(rows: Iterable[Row], cell: str, metric: str) -> list[float]:
    """`metric` of every counted run of `cell`, in repeat order."""
    out = []
    for r in sorted(measured(rows), key=lambda r: r["repeat"]):
        v = value(r, metric)
        if r["cell"] == cell and v is not None:
            out.append(v)
    return out


def paired_ratios(rows: Iterable[Row], metric: str, cell: str, base: str) -> list[float]:
    """Repeat k of `cell` over repeat k of `base`, for every k both have (so drift cancels)."""
    by: dict[tuple[str, int], float] = {}
    for r in measured(rows):
        v = value(r, metric)
        if v is not None:
            by[(r["cell"], r["repeat"])] = v
    out = []
    for (c, k), v in sorted(by.items(), key=lambda kv: kv[0][1]):
        b = by.get((base, k))
        if c == cell and b is not None and b != 0:
            out.append(v / b)
    return out


def ratio_median(rows: Iterable[Row], metric: str, cell: str, base: str) -> float | None:
    """The median of the paired ratios (what report.md prints), or None without pairs."""
    rs = paired_ratios(rows, metric, cell, base)
    return statistics.median(rs) if rs else None


# -- baselines -------------------------------------------------------------------------------
def _parts(rows: Iterable[Row]) -> dict[str, dict[str, str]]:
    return {r["cell"]: dict(r.get("parts", {})) for r in rows}


def default_baseline(rows: Sequence[Row]) -> str | None:
    """The first transport when several ran, else the first value of the first varied setting,
    else the first workload when several ran; None for a single cell."""
    parts = _parts(rows)
    order = cells(rows)
    if len(order) < 2:
        return None
    dims: dict[str, list[str]] = {}
    for c in order:
        for k, v in parts[c].items():
            if v not in dims.setdefault(k, []):
                dims[k].append(v)
    # Seeds are repeats of an accuracy study, never what anything is compared against.
    varied = [k for k in dims if k not in ("transport", "workload", "seed")]
    for k in ("transport", *varied, "workload"):
        if len(dims.get(k, [])) > 1:
            return dims[k][0] if k in ("transport", "workload") else f"{k}={dims[k][0]}"
    return None if len(dims.get("seed", [])) > 1 else order[0]


def resolve_baseline(rows: Sequence[Row], name: str | None) -> dict[str, str]:
    """Each cell's baseline cell for `name`: a whole cell label (every cell against that one), a
    transport or workload name, or `key=value` of a varied setting (each cell against the cell
    that differs only in that). Cells without a counterpart are left out."""
    if name is None:
        return {}
    parts = _parts(rows)
    order = cells(rows)
    if name in parts:
        return {c: name for c in order if c != name}
    dim: str | None = None
    want: str | None = None
    for c in order:
        for k, v in parts[c].items():
            if name in (v, f"{k}={v}"):
                if dim is not None and dim != k:
                    raise ReportError(
                        f"baseline {name!r} is ambiguous: it names a {dim!r} and a {k!r}; "
                        f"write key=value"
                    )
                dim, want = k, v
    if dim is None:
        choices = sorted({f"{k}={v}" if k not in ("transport", "workload") else v
                          for c in order for k, v in parts[c].items()} | set(order))
        raise ReportError(f"baseline {name!r} names no cell, transport, workload or setting of "
                          f"this comparison; choose one of: {', '.join(choices)}")
    by_parts = {tuple(sorted(p.items())): c for c, p in parts.items()}
    out = {}
    for c in order:
        p = dict(parts[c])
        if p.get(dim) == want:
            continue
        p[dim] = want  # type: ignore[assignment]
        base = by_parts.get(tuple(sorted(p.items())))
        if base is not None:
            out[c] = base
    return out


# -- markdown --------------------------------------------------------------------------------
def fmt(x: float | None, metric: str = "") -> str:
    """A number as the report prints it."""
    if x is None:
        return "–"
    if metric in ("messages", "peak_procs"):
        return f"{x:,.0f}"
    if metric == "test_accuracy":
        return f"{x:.4f}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def fmt_ratio(r: float | None) -> str:
    """A ratio as the report prints it (tests parse this back: keep it `1.234x`)."""
    return "–" if r is None else f"{r:.3f}x"


def _spread(xs: Sequence[float], metric: str) -> str:
    s = stats(xs)
    if s is None:
        return "–"
    med, lo, hi = s
    if len(xs) == 1 or lo == hi:
        return fmt(med, metric)
    return f"{fmt(med, metric)} ({fmt(lo, metric)}–{fmt(hi, metric)})"


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in body]
    return lines


def machine_line(machine: Mapping[str, Any] | None) -> str:
    if not machine:
        return "unknown"
    v = machine.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("python", "numpy", "torch", "ray", "grpcio")
                     if v.get(k))
    git = machine.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)"
                                                      if git.get("dirty") else "")
    return (f"{machine.get('cpu_count')} CPUs, {machine.get('memory_gb')} GiB, "
            f"{machine.get('platform')}; {libs}; git {commit}")


def render(rows: Sequence[Row], baseline: str | None = None, *,
           plots: Sequence[str] = (), title: str = "fedloom perf compare",
           target: float | None = None) -> str:
    """report.md for `rows` (all runs of one comparison, failures and warm-ups included)."""
    if not rows:
        raise ReportError("no runs to report on (results.jsonl is empty)")
    ok = measured(rows)
    order = cells(rows)
    failed = [r for r in rows if not r.get("ok")]
    repeats = sorted({r["repeat"] for r in rows if not r.get("warmup")})
    if baseline is None:
        baseline = default_baseline(rows)
    pairs = resolve_baseline(rows, baseline)
    machine = next((r.get("machine") for r in rows if r.get("machine")), None)

    out = [f"# {title}", ""]
    head = (f"{len(rows)} runs: {len(order)} cells x {len(repeats)} repeats"
            f"{' (plus warm-ups)' if any(r.get('warmup') for r in rows) else ''}, "
            f"{len(failed)} failed. Baseline: `{baseline or 'none'}`.")
    out.append(head)
    best = min(((statistics.median(v), c) for c in order
                if (v := cell_values(rows, c, "round_s"))), default=None)
    if best is not None:
        out.append(f"Fastest per round: `{best[1]}` at {fmt(best[0])} s median.")
    out += ["", f"Machine: {machine_line(machine)}.", ""]
    out.append("Figures are medians over repeats, with (min–max) where they differ. Total wall "
               "is measured by the harness from process start to exit; start-up is process start "
               "to the first round. Peak RSS sums the whole process tree (Ray workers, raylet, "
               "gRPC shards) sampled every 0.15 s, or is the run process's own peak from the "
               "kernel where that is higher; shared pages (Ray's object store) count once per "
               "process that maps them.")

    out += ["", "## Time per cell", ""]
    out += _table(["cell", "runs", *[t for _, t in TIME_METRICS]],
                  [[f"`{c}`", str(len(cell_values(rows, c, "wall_s"))),
                    *[_spread(cell_values(rows, c, m), m) for m, _ in TIME_METRICS]]
                   for c in order])
    out += ["", "## Resources and result per cell", ""]
    out += _table(["cell", *[t for _, t in RESOURCE_METRICS]],
                  [[f"`{c}`", *[_spread(cell_values(rows, c, m), m) for m, _ in RESOURCE_METRICS]]
                   for c in order])

    out += accuracy.section(rows, target)

    out += ["", f"## Ratios against baseline `{baseline or 'none'}`", ""]
    if pairs:
        out.append("Repeat k of a cell over repeat k of its baseline, then the median of those "
                   "ratios (min–max over pairs). Below 1.000x: less time, memory or bytes than "
                   "the baseline.")
        out.append("")
        body = []
        for c in order:
            if c not in pairs:
                continue
            b = pairs[c]
            row = [f"`{c}`", f"`{b}`", str(len(paired_ratios(ok, "wall_s", c, b)))]
            for m, _ in RATIO_METRICS:
                rs = paired_ratios(ok, m, c, b)
                if not rs:
                    row.append("–")
                elif len(rs) == 1 or min(rs) == max(rs):
                    row.append(fmt_ratio(statistics.median(rs)))
                else:
                    row.append(f"{fmt_ratio(statistics.median(rs))} "
                               f"({min(rs):.3f}–{max(rs):.3f})")
            body.append(row)
        out += _table(["cell", "baseline", "pairs", *[t for _, t in RATIO_METRICS]], body)
    else:
        out.append("No ratios: a single cell, or no cell has a counterpart for this baseline.")

    out += ["", "## Runs, in the order they ran", ""]
    out += _table(
        ["#", "cell", "repeat", "ok", "total wall s", "rounds s", "peak RSS MiB", "accuracy",
         "folder"],
        [[str(r.get("order")), f"`{r['cell']}`",
          "warm-up" if r.get("warmup") else str(r["repeat"]), "yes" if r.get("ok") else "NO",
          fmt(value(r, "wall_s")), fmt(value(r, "rounds_s")), fmt(value(r, "peak_rss_mb")),
          fmt(value(r, "test_accuracy"), "test_accuracy"), f"`{r.get('out', '')}`"]
         for r in sorted(rows, key=lambda r: r.get("order", 0))],
    )
    if failed:
        out += ["", "## Failures", ""]
        for r in failed:
            err = (r.get("error") or "").strip().splitlines()[-12:]
            out += [f"- run {r.get('order')} `{r['cell']}` repeat {r['repeat']} "
                    f"(exit {r.get('rc')}):", "", "  ```", *[f"  {e}" for e in err], "  ```"]
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{Path(p).stem.replace('_', ' ')}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


# -- plots -----------------------------------------------------------------------------------
def client_key(rows: Sequence[Row]) -> str | None:
    """The varied setting that is a population size (clients, nodes), if the matrix has one."""
    keys: dict[str, set[str]] = {}
    for r in rows:
        for k, v in r.get("parts", {}).items():
            keys.setdefault(k, set()).add(v)
    for k, vs in keys.items():
        if k in ("transport", "workload") or len(vs) < 2:
            continue
        if _CLIENT_KEY.search(k.rsplit(".", 1)[-1]) and all(_is_number(v) for v in vs):
            return k
    return None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _curve_median(rows: Sequence[Row], cell: str, ykey: str,
                  xkey: Callable[[Row, Mapping[str, Any]], float | None]) -> tuple[list, list]:
    """Per round, the median over repeats of x and y (rounds all repeats have)."""
    per: dict[int, tuple[list[float], list[float]]] = {}
    for r in measured(rows):
        if r["cell"] != cell:
            continue
        for pt in r.get("curve") or []:
            x, y = xkey(r, pt), pt.get(ykey)
            if x is None or y is None:
                continue
            xs, ys = per.setdefault(int(pt["round"]), ([], []))
            xs.append(x)
            ys.append(float(y))
    rounds = sorted(per)
    return ([statistics.median(per[k][0]) for k in rounds],
            [statistics.median(per[k][1]) for k in rounds])


def _round_x(row: Row, pt: Mapping[str, Any]) -> float | None:
    return float(pt["round"])


def _bytes_x(row: Row, pt: Mapping[str, Any]) -> float | None:
    b = pt.get("bytes")
    return None if b is None else b / MiB


def plot_all(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Write the PNGs into `out_dir` and return their paths (scaling only with a client vary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = cells(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    colours = plt.get_cmap("tab10")
    transports = sorted({r.get("parts", {}).get("transport", "") for r in rows})

    def colour(cell: str) -> Any:
        t = next((r.get("parts", {}).get("transport", "") for r in rows if r["cell"] == cell), "")
        return colours(transports.index(t) % 10)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    def bars(metric: str, ylabel: str, title: str, name: str) -> None:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(order) + 2), 4.2))
        for i, c in enumerate(order):
            s = stats(cell_values(rows, c, metric))
            if s is None:
                continue
            med, lo, hi = s
            ax.bar(i, med, color=colour(c), yerr=[[med - lo], [hi - med]], capsize=4)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title + " (median, min–max)")
        save(fig, name)

    bars("round_s", "seconds per round", "Time per round", PLOTS[0])
    bars("bytes_per_round_mb", "MiB per round", "Bytes carried per round", PLOTS[1])

    estimated = any(r.get("curve_bytes_estimated") for r in measured(rows))
    bytes_label = "MiB carried (cumulative" + (", spread evenly over rounds)" if estimated
                                               else ")")
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v", "x")
    for name, xkey, xlabel in ((PLOTS[2], _round_x, "round"), (PLOTS[3], _bytes_x, bytes_label)):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drew = False
        for i, c in enumerate(order):
            xs, ys = _curve_median(rows, c, "accuracy", xkey)
            if xs:
                # Cells often reach the same accuracy: vary style so none hides another.
                ax.plot(xs, ys, linestyle=styles[i % 4], marker=markers[i % 6], ms=4, label=c)
                drew = True
        if drew:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no accuracy reported per round", ha="center",
                    transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy against " + xlabel.split(" (")[0])
        save(fig, name)

    key = client_key(rows)
    if key is not None:
        groups: dict[str, list[tuple[float, str]]] = {}
        for c in order:
            parts = next(r.get("parts", {}) for r in rows if r["cell"] == c)
            rest = "/".join(f"{v}" if k in ("transport", "workload") else f"{k}={v}"
                            for k, v in parts.items() if k != key) or "all"
            groups.setdefault(rest, []).append((float(parts[key]), c))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for label, pts in groups.items():
            pts.sort()
            for ax, metric in ((ax1, "round_s"), (ax2, "peak_rss_mb")):
                xy = [(x, statistics.median(v)) for x, c in pts
                      if (v := cell_values(rows, c, metric))]
                if xy:
                    ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=label)
        xs_all = [x for pts in groups.values() for x, _ in pts]
        for ax, ylabel in ((ax1, "seconds per round"), (ax2, "peak RSS MiB (tree)")):
            if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
                ax.set_xscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        ax1.set_title("Time per round against " + key)
        ax2.set_title("Memory against " + key)
        save(fig, SCALING_PLOT)
    return written
