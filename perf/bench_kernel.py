"""Kernel hot-path benchmark: a ping-pong of tiny messages between 100 nodes, against a bare
`heapq` loop delivering the same number of events in the same process (the ceiling).

    python -m perf.bench_kernel [--quick]

Modes, each the median of several reps, interleaved so all see the same machine state:
`heapq` (the ceiling), `kernel` (Host driven directly: no network model, no codec, no sizer: the
fast path), `inproc` (through InprocTransport, which sizes every body), `network` (a constant
1 ms latency network model), `strict` (every message through the codec). Rates are delivered
events per second; `ratio` is the mode's rate over the heapq rate.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import time
from collections.abc import Callable
from typing import Any

from kernel.api import Context, Deployment, Protocol
from kernel.host import Host
from kernel.messages import Message

NODES = 100


class PingPong(Protocol):
    """Each node pings its partner (id ^ 1); a message carrying n < rounds gets n + 1 back."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def on_start(self, ctx: Context) -> None:
        ctx.send(ctx.id ^ 1, "ping", n=0)

    def on_message(self, ctx: Context, msg: Message) -> None:
        # msg.body["n"] rather than msg.n: the attribute form costs ~0.6 us on Python 3.11.
        n = msg.body["n"]
        if n < self.rounds:
            ctx.send(msg.src, "ping", n=n + 1)


def _deployment(rounds: int) -> Deployment:
    return Deployment(list(range(NODES)), lambda i: PingPong(rounds))


def bare_heapq(rounds: int) -> tuple[int, float]:
    """The same exchange as a bare heap of (time, seq, dst, src, n) tuples, handled inline."""
    heap = [(0.0, i, i ^ 1, i, 0) for i in range(NODES)]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    seq, n = NODES, 0
    t0 = time.perf_counter()
    while heap:
        t, _, dst, src, k = pop(heap)
        n += 1
        if k < rounds:
            seq += 1
            push(heap, (t, seq, src, dst, k + 1))
    return n, time.perf_counter() - t0


def _host_run(rounds: int, **host_kw: Any) -> tuple[int, float]:
    host = Host(_deployment(rounds), range(NODES), seed=1, **host_kw)
    t0 = time.perf_counter()
    host.start()
    host.run()
    dt = time.perf_counter() - t0
    return host.stats["events"], dt


def kernel_direct(rounds: int) -> tuple[int, float]:
    return _host_run(rounds)


def kernel_network(rounds: int) -> tuple[int, float]:
    from transports.netmodel import NetworkModel

    net = NetworkModel.from_config({"latency": 0.001}, 1, range(NODES))
    return _host_run(rounds, network=net)


def kernel_strict(rounds: int) -> tuple[int, float]:
    from kernel.wire.codec import Codec

    return _host_run(rounds, strict=Codec.from_config({}))


def kernel_inproc(rounds: int) -> tuple[int, float]:
    from transports.base import Job
    from transports.inproc import InprocTransport

    job = Job(config={}, deployment=_deployment(rounds), seed=1)
    t0 = time.perf_counter()
    out = InprocTransport({}).run(job)
    return out.events, time.perf_counter() - t0


MODES: dict[str, Callable[[int], tuple[int, float]]] = {
    "heapq": bare_heapq,
    "kernel": kernel_direct,
    "inproc": kernel_inproc,
    "network": kernel_network,
    "strict": kernel_strict,
}


def run(quick: bool = False, reps: int | None = None) -> list[dict[str, Any]]:
    """Measure every mode that can run here; one row per mode with median rate and ratio."""
    rounds = 200 if quick else 2000
    reps = reps or 5
    available: dict[str, Callable[[int], tuple[int, float]]] = {}
    skipped: dict[str, str] = {}
    for name, fn in MODES.items():
        try:
            fn(2)  # warm up, and find modes whose modules are not there yet
            available[name] = fn
        except ImportError as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
    times: dict[str, list[float]] = {name: [] for name in available}
    events: dict[str, int] = {}
    for _ in range(reps):
        for name, fn in available.items():
            n, dt = fn(rounds)
            times[name].append(dt)
            events[name] = n
    base = events["heapq"] / statistics.median(times["heapq"])
    rows: list[dict[str, Any]] = []
    for name in available:
        med = statistics.median(times[name])
        rate = events[name] / med
        rows.append({
            "bench": "kernel_pingpong", "mode": name, "nodes": NODES, "events": events[name],
            "reps": reps, "median_s": med, "rate_per_s": rate, "ratio": rate / base,
        })
    for name, why in skipped.items():
        rows.append({"bench": "kernel_pingpong", "mode": name, "skipped": why})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer events per rep")
    ap.add_argument("--reps", type=int, default=5, help="reps per mode (median reported)")
    args = ap.parse_args(argv)
    rows = run(quick=args.quick, reps=args.reps)
    print(f"{'mode':<8} {'events':>9} {'median s':>9} {'M events/s':>11} {'vs heapq':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['mode']:<8} skipped ({r['skipped']})")
            continue
        print(f"{r['mode']:<8} {r['events']:>9} {r['median_s']:>9.4f} "
              f"{r['rate_per_s'] / 1e6:>11.3f} {r['ratio']:>8.1%}")


if __name__ == "__main__":
    main()
