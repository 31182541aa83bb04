"""A heterogeneous-data study: each algorithm's main parameter tuned on a small grid, then every
algorithm compared over seeds at each Dirichlet alpha: the README's non-IID results table.

    python -m perf.study perf/workloads/w6.toml --alphas 0.5,0.1 --seeds 0,1,2 --target 0.9 \\
        --out perf-results/w6-study

For every alpha (written to `--alpha-key`, default `data.partition.alpha`): the grid of every
algorithm that has one (`GRID`) runs once on `--tune-seed` (a seed not among `--seeds`, so the
reported runs are not the ones tuned on); the value with the best final test accuracy wins
(ties: the earlier value). Then each algorithm with its chosen value runs on every seed: a
`fedloom perf compare` folder (`DIR/alpha-A/final`, report.md and plots inside), each seed set
into every key of `--seed-keys` (default run.seed and data.seed: training order and partition
both change). `DIR/table.md` holds the combined table; `DIR/grid.json` every grid result.
Each run is a fresh process, as in `fedloom perf compare`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kernel.run.config import apply_overrides, dumps
from perf import accuracy
from perf.compare import CompareError, Matrix, load_rows, run_matrix

# name -> (fixed [protocol] settings, (grid key, values) or None); a grid key with a dot is a
# whole config key, else a [protocol] key. The grids: FedProx's proximal mu, FedAdam's server
# learning rate, SCAFFOLD's local learning rate (its global step size does not tame the local
# instability that W6's lr 0.05 with momentum 0.9 gives it), FedNova's proximal mu
# (FedNova-Prox; 0 is plain FedNova), FedDyn's alpha. FedAvg keeps the workload's settings.
GRID: dict[str, tuple[dict[str, Any], tuple[str, list[Any]] | None]] = {
    "FedAvg": ({"name": "fedavg"}, None),
    "FedProx": ({"name": "fedavg"}, ("mu", [0.01, 0.1])),
    "FedAdam": ({"name": "fedavg", "server_opt": "adam"}, ("server_lr", [0.01, 0.03])),
    "SCAFFOLD": ({"name": "scaffold"}, ("workload.lr", [0.05, 0.02])),
    "FedNova": ({"name": "fednova"}, ("mu", [0.0, 0.01])),
    "FedDyn": ({"name": "feddyn"}, ("alpha", [0.01, 0.1])),
}


def setting(fixed: Mapping[str, Any], key: str | None, value: Any) -> tuple[dict[str, Any],
                                                                             list[str]]:
    """The [protocol] table and extra overrides for one grid point."""
    if key is None:
        return dict(fixed), []
    if "." in key:
        return dict(fixed), [f"{key}={value}"]
    return {**fixed, key: value}, []


def variant(base: Mapping[str, Any], protocol: Mapping[str, Any], overrides: Sequence[str]
            ) -> dict[str, Any]:
    """`base` with `[protocol]` replaced by `protocol` and `overrides` applied."""
    cfg = json.loads(json.dumps(base))
    cfg["protocol"] = dict(protocol)
    return apply_overrides(cfg, overrides)


def write(path: Path, cfg: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(cfg))
    return path


def best(rows: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> tuple[str, float | None]:
    """The label (in `labels` order) whose run has the highest final test accuracy."""
    acc = {r["parts"]["workload"]: r.get("test_accuracy") for r in rows if r.get("ok")}
    scored = [(acc.get(lab), -i, lab) for i, lab in enumerate(labels)
              if isinstance(acc.get(lab), int | float)]
    if not scored:
        raise CompareError(f"no grid run finished among {', '.join(labels)}")
    a, _, lab = max(scored)
    return lab, a


def run_study(base_path: Path, alphas: Sequence[float], seeds: Sequence[int], tune_seed: int,
              target: float | None, out: Path, *, alpha_key: str, seed_keys: Sequence[str],
              sets: Sequence[str], algorithms: Sequence[str], timeout_s: float) -> Path:
    """Run the grids and the comparisons into `out`; returns `out/table.md`."""
    base = tomllib.loads(base_path.read_text())
    chosen: dict[str, dict[str, Any]] = {}
    grid_log: dict[str, Any] = {}
    sections = []
    for a in alphas:
        tag = f"alpha-{a:g}"
        shared = [*sets, f"{alpha_key}={a}"]
        grid_cfgs: dict[str, list[tuple[str, Any, Path]]] = {}
        for name in algorithms:
            fixed, grid = GRID[name]
            if grid is None:
                continue
            key, values = grid
            grid_cfgs[name] = []
            for v in values:
                label = f"{name}-{key.rsplit('.', 1)[-1]}={v:g}"
                proto, extra = setting(fixed, key, v)
                path = write(out / tag / "grid-configs" / f"{label}.toml",
                             variant(base, proto, [*shared, *extra]))
                grid_cfgs[name].append((label, v, path))
        picks: dict[str, Any] = {}
        if grid_cfgs:
            gout = out / tag / "grid"
            rows = run_matrix(Matrix(configs=[p for c in grid_cfgs.values() for _, _, p in c],
                                     seeds=[tune_seed], repeat=1, target=target,
                                     timeout_s=timeout_s, seed_keys=list(seed_keys)), gout)
            for name, cells in grid_cfgs.items():
                lab, acc = best(rows, [lab for lab, _, _ in cells])
                v = next(v for label, v, _ in cells if label == lab)
                picks[name] = v
                grid_log.setdefault(tag, {})[name] = {
                    "key": GRID[name][1][0],  # type: ignore[index]
                    "values": {str(val): next((r.get("test_accuracy") for r in rows
                                               if r["parts"]["workload"] == label), None)
                               for label, val, _ in cells},
                    "chosen": v, "accuracy": acc}
        finals = []
        for name in algorithms:
            fixed, grid = GRID[name]
            proto, extra = setting(fixed, grid and grid[0], grid and picks[name])
            chosen.setdefault(name, {})[tag] = picks.get(name)
            finals.append(write(out / tag / "final-configs" / f"{name}.toml",
                                variant(base, proto, [*shared, *extra])))
        fout = out / tag / "final"
        run_matrix(Matrix(configs=finals, seeds=list(seeds), repeat=1, target=target,
                          timeout_s=timeout_s, seed_keys=list(seed_keys)), fout)
        sections.append((a, fout))
    (out / "grid.json").write_text(json.dumps(grid_log, indent=2) + "\n")
    table = out / "table.md"
    table.write_text(render_table(sections, chosen, target, algorithms))
    return table


def render_table(sections: Sequence[tuple[float, Path]], chosen: Mapping[str, Any],
                 target: float | None, algorithms: Sequence[str]) -> str:
    """The combined markdown table: per algorithm, per alpha, accuracy over seeds and more."""
    header = ["algorithm"]
    for a, _ in sections:
        header += [f"α={a:g} accuracy", f"α={a:g} " + (f"rounds to {target:g}" if target
                                                         else "rounds"),
                   f"α={a:g} worst client", f"α={a:g} rounds s vs FedAvg"]
    header += ["tuned (chosen per α)", "same model"]
    per = [(a, accuracy.groups(load_rows(f))) for a, f in sections]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in algorithms:
        row = [name]
        same = []
        for _a, gs in per:
            g = gs.get(name)
            if g is None:
                row += ["–"] * 4
                continue
            s = accuracy.summary(g, target)
            f = s["final"]
            row.append("–" if f is None else f"{100 * f[0]:.1f} ± {100 * f[1]:.1f} %")
            if target is not None:
                r = s["rounds_to_target"]
                row.append(("–" if r is None else f"{r[0]:.1f}") + f" ({s['reached']}/"
                           f"{s['seeds']})")
            else:
                row.append("–")
            c = s["clients"]
            row.append("–" if c is None else f"{100 * c['min']:.1f} %")
            base = gs.get("FedAvg")
            ratios = accuracy.overhead(g, base) if base else []
            row.append(f"{sorted(ratios)[len(ratios) // 2]:.2f}x" if ratios else "–")
            same.append(s["same"][0])
        fixed, grid = GRID[name]
        tuned = "–"
        if grid is not None:
            picks = ", ".join(f"{chosen[name][f'alpha-{a:g}']:g}" for a, _ in sections)
            tuned = f"{grid[0]} ∈ {{{', '.join(f'{v:g}' for v in grid[1])}}}: {picks}"
        row.append(tuned)
        row.append("yes" if same and all(same) else "NO")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m perf.study BASE.toml ...`; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m perf.study", description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, metavar="BASE.toml")
    p.add_argument("--alphas", default="0.5,0.1", help="Dirichlet alphas (default 0.5,0.1)")
    p.add_argument("--alpha-key", default="data.partition.alpha")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--seed-keys", default="run.seed,data.seed",
                   help="config keys each seed is written to (default run.seed,data.seed)")
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--algorithms", default=",".join(GRID))
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args(argv)
    algorithms = [a.strip() for a in ns.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in GRID]
    if unknown:
        print(f"perf.study: error: --algorithms: unknown {unknown}; known: {', '.join(GRID)}",
              file=sys.stderr)
        return 2
    try:
        table = run_study(ns.config, [float(a) for a in ns.alphas.split(",")],
                          [int(s) for s in ns.seeds.split(",")], ns.tune_seed, ns.target, ns.out,
                          alpha_key=ns.alpha_key, seed_keys=ns.seed_keys.split(","),
                          sets=ns.sets, algorithms=algorithms, timeout_s=ns.timeout)
    except CompareError as exc:
        print(f"perf.study: error: {exc}", file=sys.stderr)
        return 1
    print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
