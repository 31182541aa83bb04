"""The perf commands: `fedloom perf compare|micro|report ...` (`main`) and `fedloom inspect DIR`
(`inspect_main`, or `main(["inspect", DIR])`)."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from perf.compare import (
    RUNNER,
    CompareError,
    Matrix,
    default_out,
    parse_set,
    parse_vary,
    rewrite_report,
)
from perf.micro import BENCHES, MicroError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2; got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected integers >= 0 like 0,1,2; got {text!r}")
    return seeds


def _accuracy(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"expected an accuracy in (0, 1], e.g. 0.9; got {text!r}")
    return x


def parser() -> argparse.ArgumentParser:
    """The `fedloom perf` argument parser."""
    p = argparse.ArgumentParser(prog="fedloom perf",
                                description="Benchmarks: whole runs compared side by side, and "
                                            "micro-benchmarks against their floors.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser(
        "compare", help="run a matrix of configs x transports x settings x repeats",
        description="Run every cell of CONFIGs x --transports x --vary values, --repeat times, "
                    "each run a fresh `python -m kernel.run.cli run` process, repeats outermost "
                    "(A B A B ...). Writes results.jsonl, report.md and PNG plots into --out.")
    c.add_argument("configs", nargs="+", type=Path, metavar="CONFIG", help="run config (TOML)")
    c.add_argument("--transports", type=_csv, default=[], metavar="T1,T2",
                   help="transports to compare, e.g. inproc,ray,grpc (default: as configured)")
    c.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, e.g. run.rounds=3 (repeatable)")
    c.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a setting to compare at several values, e.g. workload.clients=10,100 "
                        "(repeatable: the cells are the product; use ';' between values that "
                        "contain commas)")
    c.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="runs per cell (default 3, medians need at least 3; 1 with --seeds)")
    c.add_argument("--seeds", type=_seeds, default=[], metavar="S1,S2",
                   help="run every cell once per run.seed, e.g. 0,1,2: report.md then gives "
                        "accuracy over seeds (mean ± std, curves with a band)")
    c.add_argument("--seed-keys", type=_csv, default=["run.seed"], metavar="K1,K2",
                   help="config keys each --seeds value is written to (default run.seed; add "
                        "data.seed for a new data partition per seed)")
    c.add_argument("--target", type=_accuracy, default=None, metavar="ACC",
                   help="accuracy to reach, e.g. 0.9: rounds and bytes until the test accuracy "
                        "first reaches it")
    c.add_argument("--band", choices=("minmax", "std"), default="minmax",
                   help="band around the mean accuracy curve over seeds (default minmax)")
    c.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="unmeasured runs of every cell before the repeats (default 0)")
    c.add_argument("--baseline", metavar="NAME",
                   help="what ratios are against: a transport, a workload, KEY=VALUE of a "
                        "--vary, or a whole cell name (default: the first transport, else the "
                        "first --vary value)")
    c.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                   help="seconds after which one run is killed and counted failed (default 3600)")
    c.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default perf-results/compare-<time>)")
    c.add_argument("--runner", metavar="CMD",
                   help="command that runs one config, given CONFIG --set ... --out DIR --quiet "
                        "(default: this python -m kernel.run.cli run); e.g. another checkout's "
                        "'/path/.venv/bin/python -m kernel.run.cli run' to compare versions")
    m = sub.add_parser("micro", help="micro-benchmarks, each beside its floor",
                       description="Run the perf.bench_* modules and print each measurement "
                                   "beside its floor as a ratio. Writes micro.jsonl, micro.md.")
    m.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    m.add_argument("--only", type=_csv, default=[], metavar="B1,B2",
                   help=f"benches to run (default all: {','.join(BENCHES)})")
    m.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default perf-results/micro-<time>)")
    r = sub.add_parser("report", help="rebuild report.md and the plots of a compare folder",
                       description="Rebuild report.md and the PNGs from DIR/results.jsonl.")
    r.add_argument("dir", type=Path, metavar="DIR")
    r.add_argument("--baseline", metavar="NAME", help="as for compare (default: as it ran)")
    r.add_argument("--target", type=_accuracy, default=None, metavar="ACC",
                   help="as for compare (default: as it ran)")
    r.add_argument("--band", choices=("minmax", "std"), default=None,
                   help="as for compare (default: as it ran)")
    i = sub.add_parser("inspect", help="summarise a run or compare folder")
    i.add_argument("dir", type=Path, metavar="DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`fedloom perf ARGS`; returns the exit code (1 when any run or bench failed)."""
    p = parser()
    ns = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if ns.command is None:
        p.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if ns.command == "compare":
            return _compare(ns)
        if ns.command == "micro":
            return _micro(ns)
        if ns.command == "report":
            for f in rewrite_report(ns.dir, ns.baseline, target=ns.target, band=ns.band):
                print(f"wrote {f}")
            return EXIT_OK
        return inspect_main([str(ns.dir)])
    except (CompareError, MicroError) as exc:
        print(f"fedloom perf: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fedloom perf: interrupted (results so far are in the output folder)",
              file=sys.stderr)
        return 130


def _compare(ns: argparse.Namespace) -> int:
    from perf.compare import run_matrix

    matrix = Matrix(
        configs=list(ns.configs),
        transports=list(dict.fromkeys(ns.transports)),
        sets=[parse_set(s) for s in ns.sets],
        vary=[parse_vary(v) for v in ns.vary],
        repeat=ns.repeat if ns.repeat is not None else (1 if ns.seeds else 3),
        seeds=ns.seeds,
        seed_keys=ns.seed_keys,
        target=ns.target,
        band=ns.band,
        warmup=ns.warmup,
        baseline=ns.baseline,
        timeout_s=ns.timeout,
        runner=tuple(shlex.split(ns.runner)) if ns.runner else RUNNER,
    )
    if matrix.warmup < 0:
        raise CompareError(f"--warmup must be >= 0, got {matrix.warmup}")
    _check_transports(matrix.transports)
    out = ns.out or default_out("compare")
    rows = run_matrix(matrix, out)
    failed = [r for r in rows if not r.get("ok")]
    print(f"wrote {out / 'results.jsonl'}, {out / 'report.md'} and plots; "
          f"{len(rows) - len(failed)} of {len(rows)} runs ok", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


def _check_transports(names: Sequence[str]) -> None:
    from kernel import registry

    known = registry.names("transports")
    bad = [t for t in names if t not in known]
    if bad:
        raise CompareError(f"--transports: no transport named {', '.join(map(repr, bad))}; "
                           f"known: {', '.join(known)}")


def _micro(ns: argparse.Namespace) -> int:
    from perf.micro import run_micro

    outcomes = run_micro(ns.only, ns.quick, ns.out or default_out("micro"))
    return EXIT_ERROR if any(o.error for o in outcomes) else EXIT_OK


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """`fedloom inspect DIR`: print the folder's summary; exit 1 naming the path if it is not
    a run, compare or micro folder."""
    from perf.inspect import InspectError, inspect

    p = argparse.ArgumentParser(prog="fedloom inspect",
                                description="Summarise a run folder (result.json, rounds, files, "
                                            "config) or a compare folder (report.md headline).")
    p.add_argument("dir", type=Path, metavar="DIR")
    ns = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        print(inspect(ns.dir), end="")
    except InspectError as exc:
        print(f"fedloom inspect: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
