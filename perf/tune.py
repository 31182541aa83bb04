"""`fedloom tune`: a Ray Tune search over a config's parameters, each trial one fedloom run.

    fedloom tune CONFIG --param 'protocol.server_lr=loguniform(1e-3,1)'
                        --param 'workload.lr=choice(0.05,0.1)' --samples 8
                        --metric test_accuracy --mode max [--scheduler asha|fifo]
                        [--grace-rounds 1] [--cpus-per-trial 1] [--max-concurrent 0]
                        [--set key=value ...] [--seed 0] [--address ADDR] [--out DIR]

Search spaces (`--param KEY=SPACE`, KEY a dotted config key): `uniform(a,b)`,
`loguniform(a,b)`, `quniform(a,b,q)`, `randint(a,b)` (b excluded), `choice(v1,v2,...)`,
`grid(v1,v2,...)` (every value, times `--samples`), or a plain value. Values are TOML scalars
(numbers, booleans, "strings"); nothing is evaluated.

Every trial is a fedloom run of CONFIG with its sampled values (inproc unless the config says
otherwise: deterministic, so a trial's result depends only on its parameters). After each round
the trial reports `round`, `test_accuracy` and `test_loss` (the round row's `accuracy` and
`loss`, when evaluated that round) and the round row's other numbers, so ASHA (the default
scheduler) stops trials that fall behind after `--grace-rounds` rounds. A trial on
`transport.kind = "ray"` reserves one bundle for its driver plus one per shard
(`transport.shards`, default 2, of `cpus_per_shard`, default 1) and its shards use them.

Outputs in `--out` (default runs/tune-<config stem>): `results.csv` and `results.json` (one row
per trial: parameters, last metric, rounds run, stopped early or not), `best_config.toml` (the
whole config of the best trial by the last reported metric, runnable with `fedloom run`),
`search.png` (metric by round for every trial, and the metric against each parameter), and Tune's
own experiment folder (`tune/`, each trial's run folder inside its trial folder).
Needs Ray Tune: `pip install 'fedloom[tune]'`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kernel.api import RunError
from kernel.options import ConfigError
from kernel.registry import UnknownName
from kernel.run.config import dumps as toml_dumps
from kernel.run.config import load, parse_value, validate
from kernel.run.progress import Progress

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
SPACES = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
_SPACE = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.S)
# Round-row fields reported under the names `fedloom run` uses in result.json.
RENAMED = {"accuracy": "test_accuracy", "loss": "test_loss"}


class Param:
    """One searched key: its dotted config key, the space's kind and its arguments."""

    def __init__(self, key: str, kind: str, args: list[Any]) -> None:
        self.key, self.kind, self.args = key, kind, args

    def tune_space(self) -> Any:
        """The Ray Tune domain for this parameter."""
        from ray import tune

        a = self.args
        if self.kind == "value":
            return a[0]
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        if self.kind == "choice":
            return tune.choice(a)
        return tune.grid_search(a)

    def example(self) -> Any:
        """A value in the space (for checking the config before any trial starts)."""
        return self.args[0]

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"


def parse_param(text: str) -> Param:
    """`section.key=space(...)` as a `Param`; ConfigError naming what is wrong."""
    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or "." not in key or any(not p for p in key.split(".")):
        raise ConfigError(f"--param {text!r} is not of the form section.key=SPACE, for "
                          f"example protocol.server_lr=loguniform(1e-3,1)")
    m = _SPACE.match(spec)
    if m is None:
        return Param(key, "value", [parse_value(spec.strip())])
    kind, inner = m.group(1), m.group(2)
    if kind not in SPACES:
        raise ConfigError(f"--param {key}: unknown space {kind!r}; expected one of "
                          f"{', '.join(SPACES)}")
    args = [parse_value(p.strip()) for p in _split(inner)] if inner.strip() else []
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in args)
    need = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2}.get(kind)
    if need is not None:
        if len(args) != need or not numeric:
            raise ConfigError(f"--param {key}={spec.strip()}: {kind} takes {need} numbers")
        if not args[0] < args[1]:
            raise ConfigError(f"--param {key}={spec.strip()}: the lower bound must be below "
                              f"the upper one")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"--param {key}={spec.strip()}: loguniform needs bounds > 0")
        if kind == "randint" and not all(isinstance(x, int) for x in args):
            raise ConfigError(f"--param {key}={spec.strip()}: randint takes two integers")
    elif not args:
        raise ConfigError(f"--param {key}={spec.strip()}: {kind} needs at least one value")
    return Param(key, kind, args)


def _split(inner: str) -> list[str]:
    """Split on commas outside quotes and brackets."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in inner:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return out


def with_values(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` with each dotted key set to its value (tables made as needed)."""
    out = json.loads(json.dumps(config))
    for key, value in values.items():
        table = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--param {key}: {part} is not a table in the config")
            table = nxt
        table[parts[-1]] = value.item() if hasattr(value, "item") else value
    return out


def check_space(config: Mapping[str, Any], params: Sequence[Param]) -> None:
    """Build the deployment once with a value from every space, so a bad key or value fails
    here with its name rather than in every trial."""
    from kernel import registry

    cfg = validate(with_values(config, {p.key: p.example() for p in params}))
    try:
        registry.load("protocols", cfg["protocol"]["name"])(cfg)
    except ConfigError as exc:
        raise ConfigError(f"with the searched values {[p.key for p in params]}: {exc}") from None


class TuneReport(Progress):
    """Reports every round row to Ray Tune (and shows nothing)."""

    def __init__(self, rounds: int, report: Any) -> None:
        super().__init__(rounds, stream=sys.stderr, bar=False)
        self.report = report

    def update(self, row: Mapping[str, Any]) -> None:
        if row.get("name") != "round":
            return
        out: dict[str, Any] = {"round": row.get("value")}
        for k, v in row.items():
            if k in ("name", "value", "node", "t"):
                continue
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[RENAMED.get(k, k)] = v
        self.report(out)

    def close(self) -> None:
        pass


def trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial: a fedloom run of `base` with `params`, reporting each round."""
    from ray import tune

    from kernel.run.runner import run

    cfg = validate(with_values(base, params))
    out = Path(tune.get_context().get_trial_dir()) / "run"
    progress = TuneReport(cfg["run"]["rounds"], tune.report)
    result = run(cfg, out, progress=progress, started_at=time.time())
    final = {"round": result.get("rounds"), "done_reason": result.get("reason"),
             "final_model_sha256": result.get("final_model_sha256") or "",
             "wall_s": result.get("wall_s")}
    for k in ("test_accuracy", "test_loss"):
        v = result.get(k, result.get("extra", {}).get(k))
        if isinstance(v, int | float):
            final[k] = v
    tune.report(final)


def _trial_cpus(cfg: Mapping[str, Any], cpus: float) -> float:
    """CPUs one trial reserves (its driver, plus its shards on the ray transport)."""
    t = cfg.get("transport", {})
    if t.get("kind", "inproc") != "ray":
        return cpus
    return cpus + int(t.get("shards", 0) or 2) * float(t.get("cpus_per_shard", 0.0) or 1.0)


def _resources(cfg: Mapping[str, Any], cpus: float) -> Any:
    from ray import tune

    t = cfg.get("transport", {})
    if t.get("kind", "inproc") != "ray":
        return {"cpu": cpus}
    shards = int(t.get("shards", 0) or 2)
    bundle = {"CPU": float(t.get("cpus_per_shard", 0.0) or 1.0)}
    if t.get("gpus_per_shard"):
        bundle["GPU"] = float(t["gpus_per_shard"])
    return tune.PlacementGroupFactory([{"CPU": cpus}] + [dict(bundle)] * shards)


def parser() -> argparse.ArgumentParser:
    """The `fedloom tune` argument parser."""
    p = argparse.ArgumentParser(prog="fedloom tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="the TOML config every trial starts from")
    p.add_argument("--param", action="append", default=[], metavar="KEY=SPACE",
                   help="a searched key, e.g. protocol.server_lr=loguniform(1e-3,1) "
                        "(repeatable; spaces: " + ", ".join(SPACES) + ")")
    p.add_argument("--samples", type=int, default=8, help="trials to sample (default 8)")
    p.add_argument("--metric", default="test_accuracy",
                   help="reported metric to optimise (default test_accuracy)")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha stops trials that fall behind early (default); fifo runs all")
    p.add_argument("--grace-rounds", type=int, default=1,
                   help="rounds every trial runs before ASHA may stop it (default 1)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials at once (default 0: as many as the CPUs allow)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed override for every trial, as for fedloom run")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's sampling")
    p.add_argument("--address", default="",
                   help="Ray cluster to run the trials on (default: RAY_ADDRESS, else a "
                        "local Ray)")
    p.add_argument("--num-cpus", type=int, default=0,
                   help="CPUs of the local Ray (default: this machine's)")
    p.add_argument("--out", type=Path, help="output folder (default runs/tune-<stem>)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run `fedloom tune ...`; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["tune"]:
        args = args[1:]
    ns = parser().parse_args(args)
    try:
        return _tune(ns)
    except (ConfigError, RunError, UnknownName, OSError) as exc:
        print(f"fedloom tune: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _tune(ns: argparse.Namespace) -> int:
    if not ns.param:
        raise ConfigError("fedloom tune needs at least one --param KEY=SPACE to search")
    if ns.samples < 1 or ns.grace_rounds < 1 or ns.cpus_per_trial <= 0:
        raise ConfigError("--samples and --grace-rounds must be >= 1 and --cpus-per-trial > 0")
    params = [parse_param(t) for t in ns.param]
    dup = {p.key for p in params if [q.key for q in params].count(p.key) > 1}
    if dup:
        raise ConfigError(f"--param given twice for {sorted(dup)}")
    base = load(ns.config, [*ns.overrides, "run.progress=false"])
    check_space(base, params)
    # Tune's own console report would interleave with ours; the table below says it all.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
        from ray.tune.search import BasicVariantGenerator
    except ImportError as exc:
        raise ConfigError(f"fedloom tune needs Ray Tune ({exc}): pip install "
                          f"'fedloom[tune]'") from None
    from transports import ray_cluster
    from transports.ray import check_options

    out = (ns.out or Path("runs") / f"tune-{ns.config.stem}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rounds = int(base["run"]["rounds"])
    started = False
    if not ray.is_initialized():
        opts = check_options({"address": ns.address, "num_cpus": ns.num_cpus,
                              "log_to_driver": "errors"})
        # Trials on a cluster import the user's modules the config names: ship them job-wide.
        shipped = (ray_cluster.user_modules(base)
                   if ray_cluster.target(ns.address) != "local" else [])
        ray_cluster.init(opts, runtime_env={"py_modules": shipped} if shipped else None)
        started = True  # ours to stop (local) or disconnect from (a cluster)
    try:
        need = _trial_cpus(base, ns.cpus_per_trial)
        have = float(ray.cluster_resources().get("CPU", 0.0))
        if need > have + 1e-9:
            raise ConfigError(f"one trial needs {need:g} CPUs (--cpus-per-trial "
                              f"{ns.cpus_per_trial:g}"
                              + (" + transport.shards x cpus_per_shard" if need >
                                 ns.cpus_per_trial else "")
                              + f") and the Ray cluster has {have:g}; lower them or give the "
                              "local Ray more with --num-cpus")
        scheduler: Any = (ASHAScheduler(time_attr="round", max_t=rounds,
                                        grace_period=min(ns.grace_rounds, rounds))
                          if ns.scheduler == "asha" else FIFOScheduler())
        trainable = tune.with_resources(tune.with_parameters(trial, base=base),
                                        _resources(base, ns.cpus_per_trial))
        tuner = tune.Tuner(
            trainable,
            param_space={p.key: p.tune_space() for p in params},
            tune_config=tune.TuneConfig(
                metric=ns.metric, mode=ns.mode, num_samples=ns.samples, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=ns.seed),
                max_concurrent_trials=ns.max_concurrent or None),
            run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0),
        )
        grid = tuner.fit()
        rows = _rows(grid, params, ns.metric, rounds)
        if not any(r["metric"] is not None for r in rows):
            errors = [r["error"] for r in rows if r["error"]]
            raise RunError(f"no trial reported {ns.metric!r}"
                           + (f"; first error: {errors[0]}" if errors else
                              "; reported metrics are round, test_accuracy, test_loss and "
                              "the round rows' numbers"))
        best = _best(rows, ns.mode)
        _write(out, rows, params, ns, base, best)
        print(_table(rows, params, ns.metric, best))
        print(f"best {ns.metric} {best['metric']:.6g} with "
              + ", ".join(f"{p.key}={best['params'][p.key]!r}" for p in params))
        print(f"outputs        {out} (best_config.toml, results.csv, search.png, tune/)")
    finally:
        if started:
            ray.shutdown()
    return EXIT_OK


def _rows(grid: Any, params: Sequence[Param], metric: str, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(grid)):
        res = grid[i]
        df = res.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if df is not None and metric in df.columns and "round" in df.columns:
            seen: dict[int, float] = {}
            for r, v in zip(df["round"], df[metric]):
                if r == r and v == v:  # not NaN
                    seen[int(r)] = float(v)
            curve = sorted(seen.items())
        last = curve[-1][1] if curve else None
        done = int(curve[-1][0]) if curve else 0
        cfg = res.config or {}
        rows.append({"trial": i, "params": {p.key: cfg.get(p.key) for p in params},
                     "metric": last, "rounds": done, "stopped_early": done < rounds,
                     "error": None if res.error is None else str(res.error).splitlines()[0],
                     "curve": curve})
    return rows


def _best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The best trial by its last reported metric; ties go to the lower trial number."""
    done = [r for r in rows if r["metric"] is not None]
    sign = -1.0 if mode == "max" else 1.0
    return min(done, key=lambda r: (sign * r["metric"], r["trial"]))


def _table(rows: list[dict[str, Any]], params: Sequence[Param], metric: str,
           best: dict[str, Any]) -> str:
    head = ["trial", *[p.key for p in params], metric, "rounds", "note"]
    body = []
    for r in rows:
        note = ("best" if r is best else "error" if r["error"] else
                "stopped early" if r["stopped_early"] else "")
        body.append([str(r["trial"]), *[_fmt(r["params"][p.key]) for p in params],
                     "-" if r["metric"] is None else f"{r['metric']:.4f}", str(r["rounds"]),
                     note])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip()
             for line in [head, *body]]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write(out: Path, rows: list[dict[str, Any]], params: Sequence[Param],
           ns: argparse.Namespace, base: Mapping[str, Any], best: dict[str, Any]) -> None:
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["trial", *[p.key for p in params], ns.metric, "rounds", "stopped_early",
                    "error"])
        for r in rows:
            w.writerow([r["trial"], *[r["params"][p.key] for p in params], r["metric"],
                        r["rounds"], r["stopped_early"], r["error"] or ""])
    (out / "results.json").write_text(json.dumps(
        {"metric": ns.metric, "mode": ns.mode, "scheduler": ns.scheduler,
         "samples": ns.samples, "params": {p.key: [p.kind, p.args] for p in params},
         "best": best["trial"], "trials": rows}, indent=2, default=str), encoding="utf-8")
    best_cfg = validate(with_values(base, best["params"]))
    best_cfg["run"].pop("progress", None)
    header = (f"# best of fedloom tune {ns.config} ({ns.metric} {best['metric']:.6g}, "
              f"{ns.mode}); run it with fedloom run\n")
    (out / "best_config.toml").write_text(header + toml_dumps(best_cfg), encoding="utf-8")
    _plot(out / "search.png", rows, params, ns.metric)


def _plot(path: Path, rows: list[dict[str, Any]], params: Sequence[Param], metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the table and CSV carry the same numbers
    fig, axes = plt.subplots(1, 1 + len(params), figsize=(4.5 * (1 + len(params)), 3.6),
                             squeeze=False)
    ax = axes[0][0]
    for r in rows:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker=".", alpha=0.8,
                    linestyle="--" if r["stopped_early"] else "-", label=f"trial {r['trial']}")
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title("by round (dashed: stopped early)")
    if len(rows) <= 10:
        ax.legend(fontsize=7)
    for ax, p in zip(axes[0][1:], params):
        pts = [(r["params"][p.key], r["metric"]) for r in rows if r["metric"] is not None]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _ in pts)
        if numeric:
            ax.scatter([x for x, _ in pts], [y for _, y in pts])
            if p.log:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x, _ in pts})
            ax.scatter([labels.index(str(x)) for x, _ in pts], [y for _, y in pts])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(p.key)
        ax.set_ylabel(f"last {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
