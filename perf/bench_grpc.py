"""Benchmark of the grpc transport, side by side in one run on this machine:

- bulk: `count` 40 MB tensors from a node on shard 0 to a node on shard 1, against bare grpcio
  streaming the same bytes in the same chunk size between two processes, and against a raw TCP
  socket on loopback (target: the transport >= 80% of bare grpcio);
- tiny: 50,000 tiny messages between two shards (batched per tick; target >= 20,000/s);
- W1 (FedAvg, 10 clients, mlp) and W3 (FedAvg, 20 clients, 40 MB flat model) on grpc and inproc.

`python -m perf.bench_grpc [--quick]`, or `run(quick=False)` which returns the figures.
Medians over repetitions; rates in MB/s (10**6 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from kernel import registry
from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import options
from kernel.registry import declare
from kernel.run import config as kconfig
from kernel.run import runner
from transports.base import Job
from transports.grpc import DEFAULTS, GrpcTransport

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6
TENSOR = 10_000_000  # float32 values: W3's 40 MB model


# -- protocols (named "perf.bench_grpc:build_*" so shard processes import them) ----------------
@declare("protocols")
def build_bulk(config: Mapping[str, Any]) -> Deployment:
    """Node 0 sends `count` messages holding one `size`-value float32 tensor to node 1."""
    p = options("protocol", config["protocol"], {"name": "", "count": 3, "size": TENSOR})
    # Made here, before the clock starts, as the bare baselines make theirs.
    x = np.random.default_rng(0).standard_normal(p["size"]).astype(np.float32)
    return Deployment(node_ids=range(2),
                      make_node=lambda i: BulkSender(x) if i == 0 else Sink(), params=p)


@declare("protocols")
def build_flood(config: Mapping[str, Any]) -> Deployment:
    """Node 0 sends `count` tiny messages to node 1."""
    p = options("protocol", config["protocol"], {"name": "", "count": 50_000})
    return Deployment(node_ids=range(2), make_node=lambda i: Flooder() if i == 0 else Sink(),
                      params=p)


class BulkSender(Protocol):
    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def on_start(self, ctx: Context) -> None:
        for i in range(ctx.params["count"]):
            ctx.send(1, "bulk", x=self.x, i=i)


class Flooder(Protocol):
    def on_start(self, ctx: Context) -> None:
        for i in range(ctx.params["count"]):
            ctx.send(1, "tiny", i=i)


class Sink(Protocol):
    def on_start(self, ctx: Context) -> None:
        self.seen = 0

    def on_message(self, ctx: Context, msg: Message) -> None:
        self.seen += 1
        if self.seen == ctx.params["count"]:
            ctx.finish({"count": self.seen})


def transport_run(protocol: str, reps: int, **params: Any) -> list[float]:
    """Seconds from nodes starting to node 1 finishing, per repetition, on 2 grpc shards."""
    cfg = {"run": {"seed": 0, "rounds": 1},
           "protocol": {"name": f"perf.bench_grpc:{protocol}", **params}}
    dep = registry.load("protocols", cfg["protocol"]["name"])(cfg)
    out = []
    for _ in range(reps):
        transport = GrpcTransport({"shards": 2})
        try:
            res = transport.run(Job(config=cfg, deployment=dep, seed=0, until=300.0))
        finally:
            transport.close()
        assert res.result is not None and res.result["count"] == params["count"], res
        out.append(res.clock_s)
    return out


# -- the bare baselines: a receiver process, the sender here -------------------------------------
def _serve(kind: str) -> None:
    """Child process: a bare grpcio or raw TCP receiver; prints its port, exits on stdin EOF."""
    if kind == "grpc":
        def take(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            n = sum(len(r) for r in requests)
            return str(n).encode()

        limit = 2 * DEFAULTS["chunk_bytes"] + (8 << 20)
        server = grpc.server(futures.ThreadPoolExecutor(2),
                             options=[("grpc.max_receive_message_length", limit)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "bench.Bare", {"Take": grpc.stream_unary_rpc_method_handler(take)})])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    else:
        lsock = socket.create_server(("127.0.0.1", 0))
        port = lsock.getsockname()[1]

        def accept() -> None:
            while True:
                conn, _ = lsock.accept()
                with conn:
                    header = conn.recv(8, socket.MSG_WAITALL)
                    total = int.from_bytes(header, "little")
                    buf = bytearray(min(total, 64 << 20))
                    view = memoryview(buf)
                    got = 0
                    while got < total:
                        n = conn.recv_into(view[: min(len(buf), total - got)])
                        if not n:
                            break
                        got += n
                    conn.sendall(got.to_bytes(8, "little"))

        threading.Thread(target=accept, daemon=True).start()
    print(port, flush=True)
    sys.stdin.read()


class Receiver:
    """A `_serve` child process."""

    def __init__(self, kind: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "perf.bench_grpc", "--serve", kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def bare_grpc(count: int, chunk: int, reps: int) -> list[float]:
    """Seconds to stream `count` 40 MB tensors in `chunk`-byte messages over one grpcio call."""
    x = np.random.default_rng(0).standard_normal(TENSOR).astype(np.float32)
    mv = x.data.cast("B")
    rx = Receiver("grpc")
    limit = 2 * chunk + (8 << 20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{rx.port}",
                                   options=[("grpc.max_send_message_length", limit)]) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            call = ch.stream_unary("/bench.Bare/Take")

            def chunks() -> Iterator[bytes]:
                for _ in range(count):
                    for off in range(0, len(mv), chunk):
                        yield bytes(mv[off : off + chunk])  # grpcio takes bytes only: one copy

            out = []
            for _ in range(reps):
                t = time.perf_counter()
                n = int(call(chunks(), timeout=300))
                out.append(time.perf_counter() - t)
                assert n == count * len(mv)
            return out
    finally:
        rx.close()


def raw_tcp(count: int, reps: int) -> list[float]:
    """Seconds to send `count` 40 MB tensors over one loopback TCP connection (zero-copy)."""
    x = np.random.default_rng(0).standard_normal(TENSOR).astype(np.float32)
    mv = x.data.cast("B")
    rx = Receiver("tcp")
    try:
        out = []
        for _ in range(reps):
            with socket.create_connection(("127.0.0.1", rx.port)) as s:
                t = time.perf_counter()
                s.sendall((count * len(mv)).to_bytes(8, "little"))
                for _ in range(count):
                    s.sendall(mv)
                got = int.from_bytes(s.recv(8, socket.MSG_WAITALL), "little")
                out.append(time.perf_counter() - t)
                assert got == count * len(mv)
        return out
    finally:
        rx.close()


def workload(path: str, kind: str, reps: int,
             overrides: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """result.json of `reps` runs of a workload config on transport `kind`, each in a fresh
    process of its own, so each peak RSS is that run's alone."""
    out = []
    for _ in range(reps):
        proc = subprocess.run(
            [sys.executable, "-m", "perf.bench_grpc", "--run-one", str(ROOT / path), kind,
             *overrides], capture_output=True, text=True, check=False, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{path} on {kind} failed: {proc.stderr[-2000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def run_one(path: str, kind: str, overrides: list[str]) -> dict[str, Any]:
    """One workload run in this process (the child `workload` starts)."""
    cfg = kconfig.load(Path(path), [f"transport.kind={kind}", "run.progress=false",
                                    *overrides])
    return runner.run(cfg, quiet=True, started_at=time.time())


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every comparison; the rows for perf.micro (`figures` has them as one dict)."""
    return rows(figures(quick))


def rows(f: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The figures of `figures` as perf.micro rows: ours beside the floor it is measured on."""
    out: list[dict[str, Any]] = [
        {"name": f"bulk {f['bulk_MB']:.0f} MB through the grpc transport",
         "value": f["bulk_grpc_transport_MBps"], "unit": "MB/s",
         "floor": f["bulk_bare_grpcio_MBps"], "floor_name": "bare grpcio stream"},
        {"name": f"bulk {f['bulk_MB']:.0f} MB through the grpc transport (vs TCP)",
         "value": f["bulk_grpc_transport_MBps"], "unit": "MB/s",
         "floor": f["bulk_raw_tcp_MBps"], "floor_name": "raw TCP socket"},
        {"name": "tiny messages between grpc shards", "value": f["tiny_msgs_per_s"],
         "unit": "msg/s", "floor": None, "floor_name": None},
    ]
    for name in ("w1", "w3"):
        for what, unit in (("s_per_round", "s"), ("wall_s", "s"), ("peak_rss_mb", "MB")):
            out.append({"name": f"{name} grpc {what.replace('_', ' ')}",
                        "value": f[f"{name}_grpc_{what}"], "unit": unit,
                        "floor": f[f"{name}_inproc_{what}"], "floor_name": "inproc",
                        "same_sha256": f[f"{name}_same_sha256_on_both"]})
    out.append({"name": "w3 grpc effective rate", "value": f["w3_grpc_effective_MBps"],
                "unit": "MB/s", "floor": f["bulk_bare_grpcio_MBps"],
                "floor_name": "bare grpcio stream"})
    return out


def figures(quick: bool = False) -> dict[str, Any]:
    """Run every comparison; return the figures (and print them as they come)."""
    reps = 3
    # Full: 40 tensors of 40 MB, the 1.6 GB that W3's effective rate counts per round.
    count = 8 if quick else 40
    chunk = int(DEFAULTS["chunk_bytes"])
    nbytes = count * TENSOR * 4
    figs: dict[str, Any] = {"quick": quick, "chunk_bytes": chunk, "cpus": os.cpu_count()}

    def show(name: str, value: Any) -> None:
        figs[name] = value
        print(f"{name:40s} {value}", flush=True)

    # Interleaved, so a neighbour's load on this shared machine hits all three alike.
    t_tr: list[float] = []
    t_bare: list[float] = []
    t_tcp: list[float] = []
    for _ in range(reps):
        t_tr += transport_run("build_bulk", 1, count=count, size=TENSOR)
        t_bare += bare_grpc(count, chunk, 1)
        t_tcp += raw_tcp(count, 1)
    show("bulk_MB", nbytes / MB)
    show("bulk_grpc_transport_MBps", round(nbytes / MB / _med(t_tr)))
    show("bulk_bare_grpcio_MBps", round(nbytes / MB / _med(t_bare)))
    show("bulk_raw_tcp_MBps", round(nbytes / MB / _med(t_tcp)))
    show("bulk_transport_vs_bare_grpcio", round(_med(t_bare) / _med(t_tr), 3))
    show("bulk_transport_vs_raw_tcp", round(_med(t_tcp) / _med(t_tr), 3))

    tiny = 20_000 if quick else 50_000
    t_tiny = transport_run("build_flood", reps, count=tiny)
    show("tiny_msgs_per_s", round(tiny / _med(t_tiny)))

    wreps = 1 if quick else 3
    for name, path in (("w1", "perf/workloads/w1.toml"), ("w3", "perf/workloads/w3.toml")):
        res = {kind: workload(path, kind, wreps) for kind in ("inproc", "grpc")}
        for kind, rs in res.items():
            rounds = rs[0]["rounds"]
            per_round = _med([r["rounds_s"] / rounds for r in rs])
            show(f"{name}_{kind}_s_per_round", round(per_round, 3))
            show(f"{name}_{kind}_wall_s", round(_med([r["wall_s"] for r in rs]), 2))
            show(f"{name}_{kind}_peak_rss_mb", round(_med([r["peak_rss_mb"] for r in rs])))
            if kind == "grpc":
                show(f"{name}_grpc_startup_s", round(_med([r["startup_s"] for r in rs]), 2))
            if name == "w3":
                show(f"w3_{kind}_effective_MBps", round(2 * 20 * TENSOR * 4 / MB / per_round))
        shas = {r["final_model_sha256"] for rs in res.values() for r in rs}
        show(f"{name}_same_sha256_on_both", len(shas) == 1)
    # W3's effective rate against the rate at which the bare stacks move the same bytes.
    show("w3_grpc_effective_vs_bare_grpcio",
         round(figs["w3_grpc_effective_MBps"] / figs["bulk_bare_grpcio_MBps"], 3))
    show("w3_grpc_effective_vs_raw_tcp",
         round(figs["w3_grpc_effective_MBps"] / figs["bulk_raw_tcp_MBps"], 3))
    return figs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_grpc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller repetitions")
    parser.add_argument("--serve", choices=("grpc", "tcp"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--run-one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return 0
    if args.run_one:
        print(json.dumps(run_one(args.run_one[0], args.run_one[1], args.run_one[2:]),
                         default=str))
        return 0
    figs = figures(quick=args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(figs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
