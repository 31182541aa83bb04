"""Processes and the machine: peak memory of a whole process tree, and what a result ran on.

Ray and gRPC runs spawn processes (raylet, GCS, workers, shard servers), so the memory a run
costs is the sum over the tree rooted at the run's process, sampled while it runs.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

MB = 1024 * 1024
VERSIONED = ("numpy", "torch", "ray", "grpcio", "msgpack", "lz4", "psutil", "matplotlib")


def tree(root: psutil.Process) -> list[psutil.Process]:
    """`root` and its descendants now (empty once `root` has gone)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_sum(procs: list[psutil.Process]) -> tuple[int, int]:
    """(bytes, processes): resident memory summed over `procs`, and how many were read.

    Processes that exit between listing and reading are skipped: the tree changes as we look.
    """
    total = 0
    alive = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            alive += 1
        except psutil.Error:
            continue
    return total, alive


class TreeSampler:
    """Samples a process tree's summed RSS every `interval` s on a thread, keeping the peak."""

    def __init__(self, pid: int, interval: float = 0.15) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.peak_procs = 0
        self.last_bytes = 0
        self.samples = 0
        # Every process seen in the tree, so survivors can be found once the root has exited.
        self.seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._root: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._root = None

    def sample(self) -> int:
        """Take one sample now; returns the tree's RSS in bytes (0 once it is gone)."""
        if self._root is None:
            return 0
        procs = tree(self._root)
        for p in procs:
            self.seen.setdefault(p.pid, p)
        total, alive = rss_sum(procs)
        self.samples += 1
        self.last_bytes = total
        if total > self.peak_bytes:
            self.peak_bytes = total
        if alive > self.peak_procs:
            self.peak_procs = alive
        return total

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def start(self) -> TreeSampler:
        """Begin sampling in the background (one sample is taken at once)."""
        self._thread = threading.Thread(target=self._loop, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and wait for the thread (bounded: it wakes within one interval)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.interval + 5.0)
            if self._thread.is_alive():
                raise RuntimeError(f"RSS sampler for pid {self.pid} did not stop within 5 s")

    def survivors(self) -> list[psutil.Process]:
        """Processes seen in the tree that still run (after the root exited: leaks)."""
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def wait_gone(self, timeout: float) -> list[psutil.Process]:
        """Wait up to `timeout` s for every process seen to exit (a zombie counts as gone);
        returns those still running."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            alive = self.survivors()
            if not alive or time.monotonic() >= deadline:
                return alive
            pause.wait(0.02)

    @property
    def peak_mb(self) -> float:
        """Peak summed RSS in MiB."""
        return self.peak_bytes / MB


class Reaper:
    """Waits for a child process on a thread with `os.wait4`: the exact moment it exited and
    its own peak RSS from the kernel (which catches spikes shorter than a sampling interval)."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        self.ended: float | None = None  # time.perf_counter() at exit
        self.maxrss_bytes = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._reap, name=f"reap-{proc.pid}", daemon=True)
        self._thread.start()

    def _reap(self) -> None:
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
        except ChildProcessError:  # reaped elsewhere
            self.ended = time.perf_counter()
            self.done.set()
            return
        self.ended = time.perf_counter()
        # Popen will not wait for a process whose returncode is set.
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.maxrss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        self.done.set()

    def wait(self, timeout: float) -> bool:
        """True once the process has exited (waits at most `timeout` seconds)."""
        return self.done.wait(timeout)


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on (None when not installed);
    read from package metadata so nothing heavy is imported."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info(cwd: str | Path | None = None) -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes (None outside a checkout)."""
    where = str(cwd) if cwd is not None else str(Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"commit": commit.stdout.strip(), "dirty": dirty}


def machine_info() -> dict[str, Any]:
    """CPU, memory, platform, library versions and git commit: what a measurement ran on."""
    vm = psutil.virtual_memory()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(vm.total / 1024**3, 2),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "hostname": platform.node(),
        "python_executable": sys.executable,
        "versions": versions(),
        "git": git_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
