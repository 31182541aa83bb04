"""Accuracy studies from the rows of `results.jsonl`: protocols (configs, settings) compared over
seeds, the way a paper reports them.

A *group* is a cell without its seed and transport: one config with one set of --vary values.
Within a group, the runs of one seed (every transport, every repeat) must end with the same
`final_model_sha256`: the report says per group whether they did. A seed's figures come from
its first run in matrix order (the others are the same run when the models agree). Per group,
over seeds: final test accuracy (mean ± sample std), the first round whose accuracy reaches
`target` and the bytes carried by then (mean over the seeds that reached it, with how many
did), wall time per transport, and, where runs evaluate every client, the per-client accuracy
spread (mean, std, 10th percentile, worst; averaged over seeds). The curve plot draws the mean
accuracy per round over seeds with a min–max or ±std band.

Everything is a pure function of the rows, so `fedloom perf report DIR --target X` rebuilds it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]
MiB = 1024 * 1024
PLOT = "accuracy_over_seeds.png"
BANDS = ("minmax", "std")
# Per-client spread: the keys a run reports it under (result.json, else its last round row).
SPREAD_KEYS = ("mean", "std", "p10", "min")


def _ok(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.get("ok") and not r.get("warmup")]


def group_of(row: Row) -> str:
    """The row's group label: its cell parts without seed and transport."""
    parts = row.get("parts", {})
    keep = [v if k == "workload" else f"{k}={v}" for k, v in parts.items()
            if k not in ("seed", "transport")]
    return "/".join(keep) or str(row.get("cell"))


def seed_of(row: Row) -> Any:
    """The row's seed: its `seed` part, else the seed its run reported."""
    parts = row.get("parts", {})
    return parts["seed"] if "seed" in parts else str(row.get("seed"))


def groups(rows: Sequence[Row]) -> dict[str, dict[str, list[Row]]]:
    """group -> seed -> its counted runs in matrix order; groups and seeds in first-run order."""
    out: dict[str, dict[str, list[Row]]] = {}
    for r in sorted(_ok(rows), key=lambda r: r.get("order", 0)):
        out.setdefault(group_of(r), {}).setdefault(str(seed_of(r)), []).append(r)
    return out


def has_accuracy(rows: Sequence[Row]) -> bool:
    """Whether any counted run reported a test accuracy."""
    return any(isinstance(r.get("test_accuracy"), int | float) for r in _ok(rows))


def points(row: Row) -> list[tuple[int, float, float | None]]:
    """(round, accuracy, cumulative bytes) of the run's rounds that were evaluated."""
    out = []
    for pt in row.get("curve") or []:
        acc = pt.get("accuracy")
        if isinstance(acc, int | float) and not isinstance(acc, bool):
            out.append((int(pt["round"]), float(acc), pt.get("bytes")))
    return out


def reach(row: Row, target: float) -> tuple[int, float | None] | None:
    """The first evaluated round with accuracy >= target and the bytes carried by its end."""
    for rnd, acc, b in points(row):
        if acc >= target:
            return rnd, b
    return None


def mean_std(xs: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value); None for none."""
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def same_models(per_seed: Mapping[str, Sequence[Row]]) -> tuple[bool, str]:
    """Whether, seed by seed, every run (transport, repeat) ended with one model; and a note."""
    bad = []
    transports = sorted({str(r.get("parts", {}).get("transport", r.get("run_transport")))
                         for runs in per_seed.values() for r in runs})
    runs_per_seed = max((len(v) for v in per_seed.values()), default=0)
    for seed, runs in per_seed.items():
        shas = {r.get("final_model_sha256") for r in runs}
        if len(shas) != 1 or None in shas:
            bad.append(f"seed {seed}: {len(shas - {None})} models in {len(runs)} runs")
    what = f"{runs_per_seed} run(s) per seed on {', '.join(transports)}"
    if bad:
        return False, "NO — " + "; ".join(bad)
    return True, f"yes ({what})"


def client_spread(row: Row) -> dict[str, float] | None:
    """The run's per-client accuracy spread {mean, std, p10, min}, where it reported one."""
    got = row.get("client_accuracy")
    if isinstance(got, Mapping) and all(isinstance(got.get(k), int | float) for k in SPREAD_KEYS):
        return {k: float(got[k]) for k in SPREAD_KEYS}
    return None


def summary(per_seed: Mapping[str, Sequence[Row]], target: float | None) -> dict[str, Any]:
    """One group's figures over its seeds (see the module doc)."""
    firsts = [runs[0] for runs in per_seed.values()]
    final = [float(r["test_accuracy"]) for r in firsts
             if isinstance(r.get("test_accuracy"), int | float)]
    out: dict[str, Any] = {"seeds": len(firsts), "final": mean_std(final)}
    if target is not None:
        hits = [h for r in firsts if (h := reach(r, target)) is not None]
        out["reached"] = len(hits)
        out["rounds_to_target"] = mean_std([float(h[0]) for h in hits])
        out["bytes_to_target"] = mean_std([float(h[1]) / MiB for h in hits if h[1] is not None])
    wall: dict[str, list[float]] = {}
    for runs in per_seed.values():
        for r in runs:
            t = str(r.get("parts", {}).get("transport", r.get("run_transport", "")))
            for key in ("wall_s", "rounds_s"):
                v = r.get(key)
                if isinstance(v, int | float):
                    wall.setdefault(f"{t}|{key}", []).append(float(v))
    out["wall"] = {k: statistics.fmean(v) for k, v in wall.items()}
    spreads = [s for r in firsts if (s := client_spread(r)) is not None]
    out["clients"] = ({k: statistics.fmean(s[k] for s in spreads) for k in SPREAD_KEYS}
                      if spreads else None)
    out["same"] = same_models(per_seed)
    return out


def _first_by(per_seed: Mapping[str, Sequence[Row]], key: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for seed, runs in per_seed.items():
        for r in runs:
            t = str(r.get("parts", {}).get("transport", r.get("run_transport", "")))
            v = r.get(key)
            if isinstance(v, int | float) and (seed, t) not in out:
                out[(seed, t)] = float(v)
    return out


def overhead(per_seed: Mapping[str, Sequence[Row]], base: Mapping[str, Sequence[Row]]
             ) -> list[float]:
    """Rounds-only seconds of a group over the baseline group's, paired by seed and transport
    (first run of each pair): what an algorithm costs over, say, FedAvg in the same study."""
    a, b = _first_by(per_seed, "rounds_s"), _first_by(base, "rounds_s")
    return [a[k] / b[k] for k in sorted(a) if k in b and b[k] > 0]


def _pm(ms: tuple[float, float] | None, digits: int = 4) -> str:
    if ms is None:
        return "–"
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def section(rows: Sequence[Row], target: float | None) -> list[str]:
    """The report.md section "Accuracy over seeds"; without any accuracy, only whether each
    group's runs of one seed ended with the same model."""
    gs = groups(rows)
    if not gs:
        return []
    if not has_accuracy(rows):
        out = ["", "## Same model across transports and repeats", "",
               "| group | seeds | same final_model_sha256 |", "|---|---|---|"]
        out += [f"| `{g}` | {len(ps)} | {same_models(ps)[1]} |" for g, ps in gs.items()]
        return out
    out = ["", "## Accuracy over seeds", ""]
    out.append("Per group (a config with its settings, over seeds and transports): final test "
               "accuracy as mean ± sample std over seeds"
               + (f"; the first round whose accuracy is >= {target:g} and the MiB carried by "
                  "then, mean ± std over the seeds that reached it (how many did)"
                  if target is not None else "")
               + "; wall and rounds-only seconds, mean per transport; rounds-only time over "
                 f"the first group's (`{next(iter(gs))}`), median of the ratios paired by seed "
                 "and transport; whether every run of a seed (each transport, each repeat) "
                 "ended with the same final_model_sha256."
               + (" Bytes by a round are estimated where runs report only their total (spread "
                  "evenly over rounds)." if any(r.get("curve_bytes_estimated") for r in _ok(rows))
                  else ""))
    out.append("")
    header = ["group", "seeds", "final accuracy"]
    if target is not None:
        header += [f"rounds to {target:g}", f"MiB to {target:g}"]
    header += ["wall s (rounds s)", "rounds-only vs first",
               "per-client acc mean / std / p10 / worst", "same model"]
    body = []
    base = next(iter(gs.values()))
    for g, per_seed in gs.items():
        s = summary(per_seed, target)
        row = [f"`{g}`", str(s["seeds"]), _pm(s["final"])]
        if target is not None:
            n = f" ({s['reached']}/{s['seeds']})"
            row += [_pm(s["rounds_to_target"], 1) + n, _pm(s["bytes_to_target"], 2)]
        ts = sorted({k.split("|")[0] for k in s["wall"]})
        row.append("; ".join(
            f"{t + ' ' if len(ts) > 1 else ''}{s['wall'].get(t + '|wall_s', math.nan):.2f}"
            f" ({s['wall'].get(t + '|rounds_s', math.nan):.2f})" for t in ts) or "–")
        ratios = overhead(per_seed, base)
        row.append(f"{statistics.median(ratios):.3f}x" if ratios else "–")
        c = s["clients"]
        row.append("–" if c is None else " / ".join(f"{c[k]:.3f}" for k in SPREAD_KEYS))
        row.append(s["same"][1])
        body.append(row)
    out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return out


def curve_stats(per_seed: Mapping[str, Sequence[Row]], band: str
                ) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per evaluated round every seed has: rounds, mean accuracy, band low, band high."""
    per: dict[int, list[float]] = {}
    for runs in per_seed.values():
        for rnd, acc, _ in points(runs[0]):
            per.setdefault(rnd, []).append(acc)
    n = len(per_seed)
    rounds = sorted(r for r, v in per.items() if len(v) == n)
    mean = [statistics.fmean(per[r]) for r in rounds]
    if band == "std":
        sd = [statistics.stdev(per[r]) if n > 1 else 0.0 for r in rounds]
        return rounds, mean, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)]
    return rounds, mean, [min(per[r]) for r in rounds], [max(per[r]) for r in rounds]


def plot(rows: Sequence[Row], out_dir: Path, band: str = "minmax",
         target: float | None = None) -> Path | None:
    """The mean accuracy-against-round curve of every group with its band over seeds."""
    if not has_accuracy(rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = ("-", "--", ":", "-.")
    for i, (g, per_seed) in enumerate(groups(rows).items()):
        rounds, mean, lo, hi = curve_stats(per_seed, band)
        if not rounds:
            continue
        line, = ax.plot(rounds, mean, linestyle=styles[i % 4], label=f"{g} ({len(per_seed)})")
        ax.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
    if target is not None:
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    what = "min–max" if band == "minmax" else "±1 std"
    ax.set_title(f"Accuracy against round: mean over seeds, {what} band")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
