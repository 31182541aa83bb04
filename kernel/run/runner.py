"""The runner: a config in, one run on the transport it names, result.json's content out.

The runner finds the protocol and the transport through `kernel.registry` only; it imports
neither. Timing and memory fields of the result (all wall-clock, so they differ run to run):

- `wall_s`: from `started_at` (default: this process's start time, from psutil, so the CLI
  reports interpreter start-up and imports too) until the transport returned the outcome.
- `build_s`: the protocol's `build(config)`; `startup_s`: what the transport reports as its own
  start-up (Ray init, shard processes); `rounds_s`: time inside `transport.run` minus startup_s;
  `close_s`: `transport.close()`.
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
from kernel.options import ConfigError
from kernel.run import checkpoint as ckpt
from kernel.run.config import WALL_TIME_LIMIT_S, validate
from kernel.run.job import Job
from kernel.run.outputs import jsonable, model_sha256, named_arrays, write_outputs
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
) -> dict[str, Any]:
    """Run `config` and return result.json's content; with `out_dir`, also write the run's
    files there (see `kernel.run.outputs.write_outputs`) and checkpoints (see the module doc).
    `resume=DIR` continues DIR's checkpoint (and writes into DIR unless `out_dir` is given);
    `config` may then be None, or must be the checkpoint's own."""
    if resume is not None and out_dir is None:
        out_dir = resume
    record = execute(config, quiet=quiet, progress=progress, started_at=started_at,
                     checkpoint_dir=out_dir, checkpoint_every=checkpoint_every, resume=resume)
    if out_dir is not None:
        save_model = record.config.get("output", {}).get("save_model", True)
        write_outputs(out_dir, record.config, record.result, record.rows, record.model,
                      save_model=save_model)
    return record.result


def execute(
    config: Mapping[str, Any] | None,
    *,
    quiet: bool = False,
    progress: Progress | None = None,
    started_at: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
) -> RunRecord:
    """Run `config` and keep everything in memory (what `run` writes to disk), but for
    checkpoints, which go to `checkpoint_dir` (see the module doc).

    Progress: `progress` if given; otherwise a `Progress` on stderr unless `quiet` or
    `[run] progress = false`. Errors of the run (`RunError`, `CheckpointError`) and of the
    config (`ConfigError`) propagate with their messages; Ctrl-C during a checkpointed run
    raises `RunInterrupted` once the checkpoint is written.
    """
    if started_at is None:
        started_at = process_start_time()
    # A checkpoint is read and verified before anything else happens.
    loaded = ckpt.read(resume) if resume is not None else None
    if loaded is not None:
        cfg = validate(loaded.config)
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
    deployment = build(cfg)
    build_s = time.perf_counter() - t

    transport_cls = _load("transports", kind, "transport")
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
            transport.close()
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
        "extra": {k: v for k, v in res.items() if k not in _PROMOTED},
    }
    if plan is not None and (plan.saved or loaded is not None):
        result["checkpoint"] = {
            "path": str(plan.path), "every": plan.every, "written": plan.saved,
            "last_bytes": plan.last_bytes, "write_s": plan.write_s,
            "resumed_from_round": loaded.round if loaded is not None else None,
        }
    return RunRecord(jsonable(result), rows, model, cfg)


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
    return ckpt.CheckpointPlan(Path(directory), every, cfg, rows,
                               ckpt.allowed_modules(cfg, build), resume=loaded,
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


def _load(group: str, name: str, what: str) -> Any:
    try:
        return registry.load(group, name)
    except (ImportError, AttributeError) as exc:
        raise RunError(f"{what} {name!r} cannot be imported: {exc}") from exc


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
