"""The runner: a config in, one run on the transport it names, result.json's content out.

The runner finds the protocol and the transport through `kernel.registry` only; it imports
neither. Timing and memory fields of the result (all wall-clock, so they differ run to run):

- `wall_s`: from `started_at` (default: this process's start time, from psutil, so the CLI
  reports interpreter start-up and imports too) until the transport returned the outcome.
- `build_s`: the protocol's `build(config)`; `startup_s`: what the transport reports as its own
  start-up (Ray init, shard processes); `rounds_s`: time inside `transport.run` minus startup_s;
  `close_s`: `transport.close()`.
- `timings`: the run's path in order, in seconds: `start_s` (process start until the runner
  began: interpreter, imports, reading the config), `build_s`, `transport_import_s` (importing
  the transport, e.g. Ray), `run_s` (all of `transport.run`), then the transport's own parts
  where it reports them (`transport.phases`; for ray see `transports.ray.PHASES`), `close_s`.
  `fedloom run --timings` adds what follows: writing the outputs and the process's exit.
- `peak_rss_mb`: the largest sum of resident memory over this process, all its descendants and
  the processes the transport reports (`Outcome.pids`), sampled every `RSS_INTERVAL_S` by a
  background thread, and never less than this process's own peak (getrusage). Shared pages
  (Ray's object store) count once per process that maps them, so it overstates a little.

Checkpoints (inproc only; see kernel.run.checkpoint): with an output directory, a run on a
transport that supports them saves `DIR/checkpoint.fl` every `checkpoint_every` rounds (the
argument, else `[run] checkpoint_every`) and when interrupted by Ctrl-C (SIGINT), after which
`run` raises `RunInterrupted` saying how to resume. `resume=DIR` continues from DIR's
checkpoint: its config, metric rows and state; the finished run's result and metrics equal
an uninterrupted run's (wall-clock fields aside).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from kernel import registry
from kernel.api import RunError
from kernel.options import NODE_BYTES, ConfigError, require_memory
from kernel.run import checkpoint as ckpt
from kernel.run.config import WALL_TIME_LIMIT_S, validate
from kernel.run.job import Job
from kernel.run.outputs import (
    MetricsStream,
    jsonable,
    model_sha256,
    named_arrays,
    write_outputs,
)
from kernel.run.progress import Progress

RSS_INTERVAL_S = 0.2
# Result entries that result.json reports under their own names; the rest go under "extra".
_PROMOTED = ("model", "rounds", "test_accuracy")


@dataclass
class RunRecord:
    """Everything one run produced: result.json's content, the metric rows in emission order
    (as plain JSON values), the final model (None when no node finished) and the config."""

    result: dict[str, Any]
    rows: list[dict[str, Any]]
    model: dict[str, np.ndarray] | None
    config: dict[str, Any]


def run(
    config: Mapping[str, Any] | None,
    out_dir: str | Path | None = None,
    *,
    quiet: bool = False,
    progress: Progress | None = None,
    started_at: float | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    exiting: bool = False,
) -> dict[str, Any]:
    """Run `config` and return result.json's content; with `out_dir`, also write the run's
    files there (see `kernel.run.outputs.write_outputs`) and checkpoints (see the module doc).
    `resume=DIR` continues DIR's checkpoint (and writes into DIR unless `out_dir` is given);
    `config` may then be None, or must be the checkpoint's own.

    Before anything runs, `out_dir` must be a directory (or not exist yet) and, unless
    `force`, must not hold the checkpoint of a run that has not finished. On a transport
    without checkpoints, metrics.jsonl is written as rows arrive; a run that fails or is
    interrupted there (or fails anywhere) still writes result.json, whose `reason` is
    "interrupted" or "failed: ..." and whose `error` holds the message.

    `exiting=True` says the process ends as soon as this returns (the `fedloom run` command):
    a transport that offers `close_for_exit` is closed with it, leaving what dies with the
    process (a local Ray) to die with it."""
    if resume is not None and out_dir is None:
        out_dir = resume_dir(resume)
    if out_dir is not None:
        check_out_dir(Path(out_dir), resuming=resume is not None, force=force)
    stream = MetricsStream(Path(out_dir)) if out_dir is not None else None
    try:
        record = execute(config, quiet=quiet, progress=progress, started_at=started_at,
                         checkpoint_dir=out_dir, checkpoint_every=checkpoint_every,
                         resume=resume, stream=stream, exiting=exiting)
    except ckpt.RunInterrupted:
        raise  # the checkpoint holds everything; the folder holds only it
    except BaseException as exc:
        if stream is not None and stream.started:
            stream.fail(exc)
        raise
    finally:
        if stream is not None:
            stream.close()
    if out_dir is not None:
        save_model = record.config.get("output", {}).get("save_model", True)
        write_outputs(out_dir, record.config, record.result, record.rows, record.model,
                      save_model=save_model)
    return record.result


def resume_dir(resume: str | Path) -> Path:
    """The folder a resumed run writes into: `resume` itself, or the folder of a checkpoint
    file given directly."""
    p = Path(resume)
    return p if p.is_dir() or not p.exists() and p.name != ckpt.FILENAME else p.parent


def check_out_dir(out: Path, *, resuming: bool, force: bool) -> None:
    """Refuse, before anything runs, an output path that is not a directory, and (unless
    `force` or `resuming`) one holding the checkpoint of a run that has not finished (a
    checkpoint newer than its result.json, or without one)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {str(out)!r} is a file; give a directory (--out "
                          f"DIR)")
    if resuming or force:
        return
    cp, res = out / ckpt.FILENAME, out / "result.json"
    if cp.exists() and (not res.exists() or res.stat().st_mtime < cp.stat().st_mtime):
        raise ConfigError(f"{out} holds the checkpoint of a run that has not finished; resume "
                          f"it with `fedloom run --resume {out}`, or pass --force to start a "
                          f"new run there (its checkpoint will be replaced)")


def execute(
    config: Mapping[str, Any] | None,
    *,
    quiet: bool = False,
    progress: Progress | None = None,
    started_at: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    stream: MetricsStream | None = None,
    exiting: bool = False,
) -> RunRecord:
    """Run `config` and keep everything in memory (what `run` writes to disk), but for
    checkpoints, which go to `checkpoint_dir` (see the module doc).

    Progress: `progress` if given; otherwise a `Progress` on stderr unless `quiet` or
    `[run] progress = false`. `stream` (from `run`) receives every metric row as it comes.
    Errors of the run (`RunError`, `CheckpointError`) and of the
    config (`ConfigError`) propagate with their messages; Ctrl-C during a checkpointed run
    raises `RunInterrupted` once the checkpoint is written. `exiting`: as for `run`.
    """
    if started_at is None:
        started_at = process_start_time()
    start_s = max(time.time() - started_at, 0.0)
    # A checkpoint is read and verified before anything else happens.
    loaded = ckpt.read(resume) if resume is not None else None
    if loaded is not None:
        cfg = _checked_config(loaded)
        if config is not None and ckpt.config_sha256(validate(config)) != ckpt.config_sha256(cfg):
            raise ckpt.CheckpointError(
                f"{loaded.path} was written by a different config than the one given; resume "
                f"without a config to continue that run")
    elif config is None:
        raise ConfigError("no config given and nothing to resume")
    else:
        cfg = validate(config)
    run_cfg = cfg["run"]
    every = checkpoint_every
    if every is None:
        every = run_cfg.get("checkpoint_every")
    if every is None and loaded is not None:
        every = loaded.header.get("checkpoint_every")
    if every is not None and (type(every) is not int or every < 1):
        raise ConfigError(f"checkpoint_every = {every!r} is not allowed; expected an integer "
                          f">= 1 (rounds between checkpoints)")
    seed: int = run_cfg["seed"]
    name: str = cfg["protocol"]["name"]
    kind: str = cfg["transport"]["kind"]
    if progress is None and not quiet and run_cfg["progress"]:
        progress = Progress(run_cfg["rounds"])

    t = time.perf_counter()
    build = _load("protocols", name, "protocol")
    _check_honoured(cfg, build, name)
    deployment = build(cfg)
    build_s = time.perf_counter() - t
    n_nodes = len(deployment.node_ids)
    require_memory(f"a deployment of {n_nodes} nodes", n_nodes * NODE_BYTES)

    t = time.perf_counter()
    transport_cls = _load("transports", kind, "transport")
    transport_import_s = time.perf_counter() - t
    virtual = bool(getattr(transport_cls, "virtual_clock", False))
    if virtual and deployment.prepare is not None:
        # The nodes run in this process (inproc): their heavy set-up counts as building.
        t = time.perf_counter()
        deployment.prepare()
        build_s += time.perf_counter() - t
    until = run_cfg.get("time_limit")
    if until is None and not virtual:
        until = WALL_TIME_LIMIT_S

    rows: list[dict[str, Any]] = list(loaded.rows) if loaded is not None else []
    show = progress.update if progress is not None else None
    plan = _plan(cfg, kind, transport_cls, build, checkpoint_dir, every, loaded, rows)
    if show is not None and loaded is not None:
        done = [r for r in rows if r.get("name") == "round"]
        if done:
            show(done[-1])

    t_run = time.perf_counter()

    def on_metric(row: dict[str, Any]) -> None:
        # Converted now: a protocol may keep mutating an array it emitted.
        plain = jsonable(row)
        if plain.get("name") == "round":
            # The one wall-clock field in metrics.jsonl (determinism checks drop WALL_FIELDS).
            plain["wall_s"] = round(time.perf_counter() - t_run, 4)
        rows.append(plain)
        if stream is not None:
            stream.row(plain)
        if show is not None:
            show(plain)

    job = Job(
        config=cfg,
        deployment=deployment,
        seed=seed,
        until=until,
        max_events=run_cfg.get("max_events"),
        on_metric=on_metric,
        checkpoint=plan,
    )
    if stream is not None:
        # With checkpoints, the rows live in the checkpoint; elsewhere they go to disk now.
        stream.begin(cfg, streaming=plan is None)
        for row in rows:
            stream.row(row)
    rss = PeakRss(RSS_INTERVAL_S)
    rss.start()
    try:
        transport = transport_cls({k: v for k, v in cfg["transport"].items() if k != "kind"})
        try:
            if progress is not None:
                progress.start()
            t = time.perf_counter()
            with _sigint_to(plan):
                outcome = transport.run(job)
            run_s = time.perf_counter() - t
            wall_s = time.time() - started_at
            rss.watch(getattr(outcome, "pids", ()) or ())
            rss.sample()
        finally:
            t = time.perf_counter()
            closer = getattr(transport, "close_for_exit", None) if exiting else None
            (closer if callable(closer) else transport.close)()
            close_s = time.perf_counter() - t
    finally:
        rss.stop()
        if progress is not None:
            progress.close()

    if outcome.reason == "interrupted" and plan is not None:
        raise ckpt.RunInterrupted(plan.path if plan.saved else None, plan.last_round())
    res: Mapping[str, Any] = outcome.result if outcome.result is not None else {}
    model = named_arrays(res["model"]) if "model" in res else None
    startup_s = float(outcome.startup_s)
    rounds = res.get("rounds")
    if rounds is None:
        done = [r["value"] for r in rows if r.get("name") == "round"]
        rounds = done[-1] if done else 0
    result: dict[str, Any] = {
        "protocol": name,
        "transport": kind,
        "seed": seed,
        "rounds": rounds,
        "reason": outcome.reason,
        "finished_by": outcome.finished_by,
        "wall_s": wall_s,
        "build_s": build_s,
        "startup_s": startup_s,
        "rounds_s": max(run_s - startup_s, 0.0),
        "close_s": close_s,
        "clock_s": float(outcome.clock_s),
        "virtual_s": float(outcome.clock_s) if virtual else None,
        "messages": outcome.messages,
        "bytes": outcome.bytes,
        "events": outcome.events,
        "test_accuracy": res.get("test_accuracy"),
        "final_model_sha256": model_sha256(model) if model is not None else None,
        "peak_rss_mb": rss.peak_mb(),
        "shards": outcome.shards,
        "transport_info": dict(getattr(outcome, "info", {}) or {}),
        "timings": {"start_s": start_s, "build_s": build_s,
                    "transport_import_s": transport_import_s, "run_s": run_s,
                    **_phases(transport), "close_s": close_s},
        "extra": {k: v for k, v in res.items() if k not in _PROMOTED},
    }
    if plan is not None and (plan.saved or loaded is not None):
        result["checkpoint"] = {
            "path": str(plan.path), "every": plan.every, "written": plan.saved,
            "last_bytes": plan.last_bytes, "write_s": plan.write_s,
            "resumed_from_round": loaded.round if loaded is not None else None,
        }
    return RunRecord(jsonable(result), rows, model, cfg)


def _phases(transport: Any) -> dict[str, float]:
    """The transport's own timing of its parts (`phases`: name -> seconds), where it has one."""
    phases = getattr(transport, "phases", None)
    if not isinstance(phases, Mapping):
        return {}
    return {str(k): float(v) for k, v in phases.items() if isinstance(v, int | float)}


def _plan(cfg: dict[str, Any], kind: str, transport_cls: Any, build: Any,
          directory: str | Path | None, every: int | None, loaded: ckpt.Loaded | None,
          rows: list[dict[str, Any]]) -> ckpt.CheckpointPlan | None:
    """The run's checkpoint plan: None where the transport cannot checkpoint (then asking
    for checkpoints or resuming is a ConfigError) or there is no directory to write to."""
    if not getattr(transport_cls, "checkpoints", False):
        if every is not None or loaded is not None:
            raise ConfigError(
                f"checkpoints (checkpoint_every, --resume) are inproc-only for now; this run's "
                f"transport.kind = {kind!r}")
        return None
    if directory is None and loaded is not None:
        directory = loaded.path.parent  # a resumed run checkpoints where it came from
    if directory is None:
        if every is not None:
            raise ConfigError("checkpoint_every needs an output directory to write "
                              "checkpoint.fl into (--out DIR)")
        return None
    return ckpt.CheckpointPlan(Path(directory), every, cfg, rows, resume=loaded,
                               rebuild=lambda: build(cfg))


@contextlib.contextmanager
def _sigint_to(plan: ckpt.CheckpointPlan | None) -> Iterator[None]:
    """While the run goes on, Ctrl-C asks `plan` to save and stop (a second Ctrl-C stops at
    once). Signal handlers can only be set in the main thread: elsewhere nothing changes."""
    if plan is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        plan.interrupt()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _checked_config(loaded: ckpt.Loaded) -> dict[str, Any]:
    """The checkpoint's config, validated, its protocol, transport and aggregator names
    resolved to declared builders (importing their modules, calling nothing) before anything
    else reads it."""
    try:
        cfg = validate(loaded.config)
        _load("protocols", cfg["protocol"]["name"], "protocol")
        _load("transports", cfg["transport"]["kind"], "transport")
        agg = cfg["protocol"].get("aggregator")
        if isinstance(agg, str):
            _load("aggregators", agg, "aggregator")
    except (ConfigError, registry.UnknownName, RunError) as exc:
        raise ckpt.CheckpointError(f"{loaded.path} holds a config this fedloom refuses: "
                                   f"{exc}") from None
    return cfg


# Sections only some protocols act on; a protocol's build lists those it honours in its
# `honours` attribute, so that a run never silently ignores an attack or a privacy setting.
OPTIONAL_SECTIONS = ("adversary", "privacy")


def _check_honoured(cfg: Mapping[str, Any], build: Any, name: str) -> None:
    honours = getattr(build, "honours", ())
    for section in OPTIONAL_SECTIONS:
        if section in cfg and section not in honours:
            raise ConfigError(f"[{section}] is not honoured by protocol {name!r}; the "
                              f"FedAvg family (fedavg, fedavg_ef, secaggplus) honours it")


def _load(group: str, name: str, what: str) -> Any:
    try:
        return registry.load(group, name)
    except registry.UnknownName:
        raise
    except (ImportError, AttributeError) as exc:
        raise RunError(f"{what} {name!r} cannot be imported: {exc}") from exc
    except Exception as exc:  # the module raised while being imported (--debug shows where)
        raise RunError(f"{what} {name!r} cannot be imported: importing it raised "
                       f"{type(exc).__name__}: {exc}") from exc


def process_start_time() -> float:
    """This process's start as a Unix time, to about 10 ms."""
    try:
        # psutil adds the boot time rounded to whole seconds; /proc's tick count does not.
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return float(psutil.Process().create_time())


class PeakRss:
    """Samples the resident memory of this process tree (plus watched pids) in a daemon thread
    and keeps the largest sum seen."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.peak = 0
        self._me = psutil.Process()
        self._watched: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedloom-rss", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        """Take a first sample and start sampling."""
        self.sample()
        self._thread.start()

    def watch(self, pids: Any) -> None:
        """Also count these processes (a transport's workers that are not our descendants)."""
        with self._lock:
            for pid in pids:
                if pid not in self._watched:
                    with contextlib.suppress(psutil.Error):
                        self._watched[pid] = psutil.Process(pid)

    def sample(self) -> None:
        """Add up the tree's memory now; processes that vanish while we look are skipped."""
        with self._lock:
            procs = {self._me.pid: self._me, **self._watched}
            try:
                for child in self._me.children(recursive=True):
                    procs.setdefault(child.pid, child)
            except psutil.Error:
                pass
            total = 0
            for proc in procs.values():
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """Stop sampling (waits for the thread at most a few seconds)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def peak_mb(self) -> float:
        """The peak in MiB, at least this process's own lifetime peak."""
        return round(max(self.peak, own_peak_rss_bytes()) / (1024 * 1024), 1)


def own_peak_rss_bytes() -> int:
    """This process's peak resident memory since it started: VmHWM, which belongs to the
    process's own address space. (`ru_maxrss` also counts the parent's address space a child
    was forked from before it ran exec: a benchmark started from a 3 GB driver reads 3 GB.)"""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(own if sys.platform == "darwin" else own * 1024)  # bytes on macOS, else KiB
