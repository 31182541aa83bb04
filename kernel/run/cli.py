"""The `fedloom` command.

    fedloom run [CONFIG] [--set key=value ...] [--out DIR] [--checkpoint-every N] [--force]
                [--quiet] [--debug] [--timings]
    fedloom run --resume DIR [--checkpoint-every N] [--out DIR2]
    fedloom perf compare|micro ...     (implemented by perf.cli)
    fedloom inspect DIR                (implemented by perf.cli)
    fedloom tune CONFIG --param ...    (implemented by perf.tune: a Ray Tune search)
    fedloom data CONFIG [--out DIR]    (implemented by protocols.learning.cli)

`fedloom run` without CONFIG runs the built-in default (workload W1: FedAvg, 10 clients,
5 rounds, mlp, inproc). Outputs go to `--out`, else `[output] dir`, else `runs/<config stem>`
(`runs/default` for the built-in config); files of an earlier run there are replaced (each
written to a temporary name and renamed), but a folder holding the checkpoint of a run that
has not finished is refused unless `--force`, and an `--out` that is a file is refused before
the run starts. Secrets (a `transport.token` given with --set) are not written to config.toml.
A run that fails, or is interrupted on a transport without checkpoints, leaves metrics.jsonl
(written as rows arrive there) and a result.json whose `reason` says "interrupted" or
"failed: ..." with the `error`.

Checkpoints (inproc): `--checkpoint-every N` saves DIR/checkpoint.fl every N rounds, and Ctrl-C
saves one and stops (exit 130, saying how to resume). `--resume DIR` continues the run saved in
DIR (its config comes from the checkpoint; a CONFIG given too must be the same) and writes its
outputs into DIR (or --out); the finished run equals one never interrupted.

`--timings` prints, after the run, where its wall time went from the process's start to its
exit (result.json's `timings`, and what follows them: writing the outputs, exiting).

Exit: `fedloom run` (the console script `entry`, or `python -m kernel.run.cli`) ends its
process with `os._exit` once the outputs are written and closed and stdout and stderr are
flushed, skipping the interpreter's teardown (unloading torch, Ray's graceful shutdown of a
local Ray whose processes end with this one: about 1.5 s). Nothing is lost by it: every output
file is written, closed and renamed into place first, exactly as a normal exit leaves it.
`main()` called as a library (tests, notebooks) returns its code and tears nothing down early.

Exit codes: 0 the run finished; 1 an error (bad config, a failed run: the message without a
traceback unless --debug); 2 bad command-line usage; 3 the run stopped (time limit, event
limit, nothing left to do) before any node called `finish`; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from kernel.api import RunError
from kernel.options import ConfigError
from kernel.registry import UnknownName
from kernel.run.checkpoint import RunInterrupted
from kernel.run.config import DEFAULT_CONFIG_NAME, default_config, load
from kernel.run.progress import human_bytes

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNFINISHED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Subcommands another package implements: `fedloom perf X ...` calls perf.cli.main(["X", ...]),
# `fedloom inspect DIR` calls perf.cli.main(["inspect", DIR]). Imported only when used, so the
# kernel does not depend on perf.
DELEGATED = {"perf": "perf.cli", "inspect": "perf.cli", "tune": "perf.tune",
             "data": "protocols.learning.cli"}
# Errors a user can fix from the message alone: shown without a traceback.
USER_ERRORS = (ConfigError, RunError, UnknownName, OSError)


def entry() -> None:
    """The `fedloom` console script: `main`, then for `fedloom run` an exit that skips the
    interpreter's teardown (see the module doc); other commands exit normally."""
    args = sys.argv[1:]
    fast = bool(args) and args[0] == "run"
    code = main(args, exiting=fast)
    if fast:
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> None:
    """Flush stdout and stderr, end every process this one started and still has, and end
    this one with `code` at once (no atexit handlers, no finalisers): only once everything
    the run writes is written and closed. The processes left are a local Ray's (its head
    processes, and the workers and agents its raylet started, which would outlive a parent
    that skipped `ray.shutdown`); they are killed, not asked, since nothing of theirs is
    needed any more."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not change the exit code
            stream.flush()
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(code)


def main(argv: Sequence[str] | None = None, *, exiting: bool = False) -> int:
    """Run the command line `argv` (default sys.argv[1:]) and return the exit code.
    `exiting`: the process ends right after (`entry`), so a transport may leave what ends with
    the process to end with it."""
    args = list(sys.argv[1:] if argv is None else argv)
    _import_from_cwd()
    if args and args[0] in DELEGATED:
        return _delegate(args[0], args[1:])
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _run(ns, exiting)
    except RunInterrupted as exc:
        print(f"fedloom: {exc.message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("fedloom: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if ns.debug:
            traceback.print_exc()
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedloom",
        description="Simulate federated and decentralised learning protocols.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run one config and write its results",
                       description="Run one config and write metrics.jsonl, result.json, "
                       "final_model.npz and config.toml into the output directory.")
    p.add_argument("config", nargs="?", type=Path,
                   help="TOML config file (default: the built-in W1 FedAvg run on inproc)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set transport.kind=ray "
                        "--set run.seed=3 (repeatable; values are TOML, else strings)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output directory (default: [output] dir, else runs/<config stem>)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save DIR/checkpoint.fl every N rounds (inproc only; Ctrl-C always "
                        "saves one on inproc)")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR, writing into DIR "
                        "(or --out)")
    p.add_argument("--force", action="store_true",
                   help="start a new run even in a folder holding the checkpoint of an "
                        "unfinished run (it is replaced)")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors (no progress, no summary)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("--timings", action="store_true",
                   help="print where the wall time went, process start to exit (stderr)")
    sub.add_parser("perf", help="benchmarks: fedloom perf compare|micro ... (see fedloom perf -h)",
                   add_help=False)
    sub.add_parser("inspect", help="summarise a run directory: fedloom inspect DIR",
                   add_help=False)
    sub.add_parser("tune", help="Ray Tune search over config parameters: fedloom tune CONFIG "
                   "--param KEY=SPACE ... (see fedloom tune -h)", add_help=False)
    sub.add_parser("data", help="show a config's data partition: fedloom data CONFIG "
                   "[--out DIR]", add_help=False)
    return parser


def _run(ns: argparse.Namespace, exiting: bool = False) -> int:
    if ns.checkpoint_every is not None and ns.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {ns.checkpoint_every} is not allowed; expected "
                          f"an integer >= 1 (rounds between checkpoints)")
    config: dict[str, Any] | None
    if ns.resume is not None:
        if ns.overrides:
            raise ConfigError("--set cannot change a resumed run: it continues with the "
                              "config saved in its checkpoint")
        config = load(ns.config) if ns.config is not None else None
        from kernel.run.runner import resume_dir

        out_dir = ns.out if ns.out is not None else resume_dir(ns.resume)
    else:
        if ns.config is None:
            config = default_config(ns.overrides)
            stem = DEFAULT_CONFIG_NAME
        else:
            config = load(ns.config, ns.overrides)
            stem = ns.config.stem
        out_dir = ns.out
        if out_dir is None:
            configured = config.get("output", {}).get("dir", "")
            out_dir = Path(configured) if configured else Path("runs") / stem
    # Imported here so `fedloom --help` and config errors stay fast.
    from kernel.run.runner import run

    result = run(config, out_dir, quiet=ns.quiet, checkpoint_every=ns.checkpoint_every,
                 resume=ns.resume, force=ns.force, exiting=exiting)
    finished = result.get("reason") == "finished"
    if not ns.quiet:
        print(summary(result, out_dir))
    if ns.timings:
        from kernel.run.runner import process_start_time

        total = time.time() - process_start_time()
        print(timings_text(result.get("timings") or {}, total), file=sys.stderr)
    if not finished:
        print(f"fedloom: the run stopped ({result.get('reason')}) before any node called "
              f"finish; {out_dir} has no final model", file=sys.stderr)
        return EXIT_UNFINISHED
    return EXIT_OK


def summary(result: Mapping[str, Any], out_dir: Path) -> str:
    """A few lines a person reads at the end of a run."""
    acc = result.get("test_accuracy")
    virtual = result.get("virtual_s")
    lines = [
        f"{result['protocol']} on {result['transport']}, seed {result['seed']}: "
        f"{result['reason']}" + (f" by node {result['finished_by']}"
                                 if result.get("finished_by") is not None else ""),
        f"  rounds         {result['rounds']}",
        f"  test accuracy  {acc:.4f}" if isinstance(acc, float) else "  test accuracy  -",
    ]
    extra = result.get("extra") or {}
    if isinstance(extra.get("client_accuracy_mean"), float):  # per-client evaluation ran
        lines.append(f"  clients        accuracy mean {extra['client_accuracy_mean']:.4f}, "
                     f"10th percentile {extra['client_accuracy_p10']:.4f}, worst "
                     f"{extra['client_accuracy_worst']:.4f} ({extra['clients_evaluated']} "
                     f"evaluated)")
    lines += [
        f"  wall s         {result['wall_s']:.2f} (startup {result['startup_s']:.2f}, "
        f"rounds {result['rounds_s']:.2f})",
    ]
    if virtual is not None:
        why = "" if virtual else "  (no [network] latency or compute model: no time passes)"
        lines.append(f"  virtual s      {virtual:.6g}{why}")
    lines += [
        f"  messages       {result['messages']}",
        f"  bytes          {result['bytes']} ({human_bytes(result['bytes'])})",
        f"  peak RSS       {result['peak_rss_mb']:.0f} MB",
        f"  model sha256   {result['final_model_sha256'] or '-'}",
        f"  outputs        {out_dir}",
    ]
    where = result.get("transport_info") or {}
    if where.get("address"):
        how = "started here" if where.get("started") else "joined"
        lines.append(f"  cluster        {where['address']} ({how}, {where.get('nodes', '?')} "
                     f"node(s), auth {where.get('auth', '?')})")
    if where.get("logs"):
        lines.append(f"  ray logs       {where['logs']}")
    if where.get("dashboard"):
        lines.append(f"  dashboard      {where['dashboard']}")
    ck = result.get("checkpoint")
    if ck:
        resumed = ck.get("resumed_from_round")
        lines.append(f"  checkpoint     {ck['path']} ({ck['written']} written"
                     + (f", resumed from round {resumed}" if resumed is not None else "") + ")")
    return "\n".join(lines)


# How `timings_text` names result.json's `timings` keys; keys it does not know show as they are.
_TIMING_LABELS = {
    "start_s": "start (python, imports, config)", "build_s": "build the deployment",
    "transport_import_s": "import the transport", "run_s": "transport run",
    "ray_init_s": "ray.init", "placement_s": "placement group", "actors_s": "shard actors",
    "shard_build_s": "slowest shard's own build", "connect_s": "connect shards",
    "on_start_s": "nodes' on_start", "watch_s": "rounds", "stop_s": "stop shards",
    "release_s": "release actors", "shutdown_s": "ray.shutdown", "close_s": "close transport",
}
# The top-level parts, which add up (with "other") to the total; the rest are parts of run_s.
_TIMING_TOP = ("start_s", "build_s", "transport_import_s", "run_s", "close_s")


def timings_text(timings: Mapping[str, Any], total: float) -> str:
    """`--timings`' lines: each part of the run in order, the transport's own parts indented
    under "transport run", and what no part accounts for up to `total` (process start to the
    exit that follows)."""
    lines = ["timings (seconds; process start to exit):"]
    for key, value in timings.items():
        if not isinstance(value, int | float):
            continue
        indent = "  " if key in _TIMING_TOP else "      "
        if key == "shard_build_s":
            indent += "  "
        label = _TIMING_LABELS.get(key, key.removesuffix("_s"))
        lines.append(f"{indent}{label:<{40 - len(indent)}}{value:8.3f}")
    known = sum(float(timings.get(k) or 0.0) for k in _TIMING_TOP)
    lines.append(f"  {'write outputs, exit':<38}{max(total - known, 0.0):8.3f}")
    lines.append(f"  {'total':<38}{total:8.3f}")
    return "\n".join(lines)


def _import_from_cwd() -> None:
    """Let configs name `module:attr` from the current directory, as `python -m` does (a
    console script's sys.path starts at its own bin/ folder instead). Ray workers and gRPC
    shard processes get the same directory on their paths."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _delegate(command: str, rest: list[str]) -> int:
    module_name = DELEGATED[command]
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            print(f"fedloom: error: 'fedloom {command}' needs {module_name}, which is not "
                  f"installed", file=sys.stderr)
            return EXIT_ERROR
        raise
    argv = rest if command in ("perf", "tune") else [command, *rest]
    code = module.main(argv)
    return int(code or 0)


if __name__ == "__main__":
    entry()
