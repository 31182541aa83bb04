"""The grpc transport on real shard processes and real gRPC on 127.0.0.1: same answers as inproc,
refused strangers, fuzzed frames survived, dead shards named, no process left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import msgpack
import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import registry
from kernel.api import RunError
from kernel.messages import Message
from kernel.options import ConfigError
from kernel.run import config as kconfig
from kernel.run import runner
from kernel.run.outputs import model_sha256
from kernel.wire.codec import Codec, CodecError
from transports.base import Job, Outcome
from transports.grpc import (
    CONTROL,
    DELIVER,
    EVENTS,
    SEQ,
    Cluster,
    GrpcTransport,
    Inbound,
    Reassembler,
    call_metadata,
    nbytes_of,
    pack,
    validate_options,
)
from transports.grpc_shard import FrameQueue, PeerLink
from transports.inproc import InprocTransport

pytestmark = pytest.mark.grpc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = "tests.transports.grpc_protocols"
WAIT_S = 30.0  # the longest any single wait in these tests may take


def sum_config(clients: int = 5, dim: int = 64, rounds: int = 3, seed: int = 3,
               **transport: Any) -> dict[str, Any]:
    return {"run": {"seed": seed, "rounds": rounds},
            "protocol": {"name": f"{PROTOS}:build_sum", "clients": clients, "dim": dim},
            "transport": {"kind": "grpc", **transport}}


def make_job(config: Mapping[str, Any], rows: list[dict[str, Any]] | None = None,
             until: float = 60.0) -> Job:
    dep = registry.load("protocols", config["protocol"]["name"])(config)
    on_metric = rows.append if rows is not None else (lambda row: None)
    return Job(config=config, deployment=dep, seed=config["run"]["seed"], until=until,
               on_metric=on_metric)


def run_grpc(config: Mapping[str, Any], rows: list[dict[str, Any]] | None = None,
             **opts: Any) -> Outcome:
    transport = GrpcTransport(opts)
    try:
        return transport.run(make_job(config, rows))
    finally:
        transport.close()


def run_inproc(config: Mapping[str, Any], rows: list[dict[str, Any]] | None = None) -> Outcome:
    return InprocTransport({"strict": True}).run(make_job(config, rows, until=1e9))


def shard_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "transports.grpc_shard" in " ".join(child.cmdline()):
                out.append(child)
    return out


@pytest.fixture(autouse=True)
def no_shard_left_behind() -> Iterator[None]:
    yield
    # close() waits for its shards; anything still here was orphaned.
    _, alive = psutil.wait_procs(shard_children(), timeout=WAIT_S)
    assert not alive, f"grpc shard processes left behind: {[p.pid for p in alive]}"


def sha(out: Outcome) -> str:
    assert out.result is not None, f"no node finished ({out.reason})"
    return model_sha256(out.result["model"])


def result(out: Outcome) -> Mapping[str, Any]:
    assert out.result is not None, f"no node finished ({out.reason})"
    return out.result


def without_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "t"} for r in rows]


# -- same answers --------------------------------------------------------------------------------
def test_sync_protocol_matches_inproc_with_chunks_and_multicast_once() -> None:
    # 3 shards; a 160 KB model in 32 KB chunks; the server's multicast reaches 2 peer shards.
    dim, rounds = 40_000, 3
    cfg = sum_config(clients=7, dim=dim, rounds=rounds)
    rows_g: list[dict[str, Any]] = []
    rows_i: list[dict[str, Any]] = []
    out = run_grpc(cfg, rows_g, shards=3, chunk_bytes=32 << 10, strict=True)
    ref = run_inproc(cfg, rows_i)
    assert out.reason == "finished" and out.finished_by == 0
    assert sha(out) == sha(ref)
    assert without_time(rows_g) == without_time(rows_i)
    assert len(out.pids) == 3 and len(out.shards) == 3
    assert out.messages == ref.messages and out.events == ref.events
    # Shard 0 runs the server; its clients answer locally, so what it sends out is one model
    # frame per round per peer shard (a multicast crosses once), cut into chunks.
    model_bytes = 4 * dim
    sent = out.shards[0]["wire_bytes_out"]
    assert rounds * 2 * model_bytes < sent < rounds * 2 * model_bytes * 1.05
    assert out.shards[0]["frames_out"] >= rounds * 2 * (model_bytes // (32 << 10))
    assert all(s["bad_frames"] == 0 and s["refused"] == 0 for s in out.shards)


def test_w1_fedavg_gives_the_same_model_as_inproc() -> None:
    results = {}
    for kind in ("inproc", "grpc"):
        cfg = kconfig.load(ROOT / "perf/workloads/w1.toml",
                           [f"transport.kind={kind}", "run.progress=false"])
        results[kind] = runner.run(cfg, quiet=True)
    g, i = results["grpc"], results["inproc"]
    assert g["final_model_sha256"] == i["final_model_sha256"] is not None
    assert g["test_accuracy"] == i["test_accuracy"] > 0.5
    assert g["messages"] == i["messages"]
    assert g["reason"] == "finished" and len(g["shards"]) == 2


def test_w4_like_sync_gossip_gives_the_same_model_as_inproc() -> None:
    cfg = {"run": {"seed": 0, "rounds": 12},
           "protocol": {"name": "gossip", "mode": "sync", "nodes": 16, "dim": 2000,
                        "topology": {"kind": "ring_lattice", "degree": 4,
                                     "weights": "uniform"}}}
    out = run_grpc(cfg, shards=3)
    ref = run_inproc(cfg)
    assert sha(out) == sha(ref)
    assert result(out)["max_abs_dev"] == result(ref)["max_abs_dev"]


def test_pushsum_conserves_mass_on_real_sockets() -> None:
    nodes, dim = 8, 6
    cfg = {"run": {"seed": 1, "rounds": 25},
           "protocol": {"name": f"{PROTOS}:build_pushsum_audit", "nodes": nodes, "dim": dim,
                        "period": 0.01, "drain": 0.3}}
    rows: list[dict[str, Any]] = []
    out = run_grpc(cfg, rows, shards=2)
    assert out.reason == "finished"
    mass = {r["node"]: r for r in rows if r["name"] == "mass"}
    assert sorted(mass) == list(range(nodes)), "every node reports its mass in on_stop"
    from protocols.gossip import initial_vector

    s_total = sum(np.asarray(m["s"], np.float64) for m in mass.values())
    w_total = sum(float(m["w"]) for m in mass.values())
    for i, m in mass.items():  # what is still in flight on link i -> j: sigma_i - rho_j[i]
        for j in m["out"]:
            rho_s, rho_w = mass[j]["rho"].get(i, [np.zeros(dim), 0.0])
            s_total = s_total + (np.asarray(m["sig_s"]) - np.asarray(rho_s))
            w_total += float(m["sig_w"]) - float(rho_w)
    expected = sum(initial_vector(i, dim).astype(np.float64) for i in range(nodes))
    np.testing.assert_allclose(s_total, expected, rtol=1e-9, atol=1e-9)
    assert w_total == pytest.approx(nodes, rel=1e-12)
    # and it did average: node 0's estimate is near the true mean
    assert np.max(np.abs(result(out)["model"]["x"] - expected / nodes)) < 0.5


# -- security and malformed input ----------------------------------------------------------------
def poison_frames(codec: Codec, dst: int = 0) -> list[bytes]:
    msg = Message(99, dst, "poison", {"amount": 1000.0}, 0.0, 1)
    parts = codec.encode(msg)
    return list(pack([([dst], parts, nbytes_of(parts))], 1 << 20))


def test_wrong_or_missing_token_is_refused_and_changes_nothing() -> None:
    cfg = sum_config()
    ref = run_inproc(cfg)
    cluster = Cluster(make_job(cfg), validate_options({}))
    try:
        cluster.launch()
        cluster.connect()
        shard = cluster.shards[0]  # runs node 0, the server
        frames = poison_frames(Codec.from_config({}))
        with grpc.insecure_channel(shard.address) as channel:
            calls = {
                DELIVER: lambda md: list(channel.stream_stream(DELIVER)(
                    iter(numbered(frames, 1)), metadata=md, timeout=WAIT_S)),
                CONTROL: lambda md: channel.unary_unary(CONTROL)(
                    msgpack.packb({"op": "stop"}), metadata=md, timeout=WAIT_S),
                EVENTS: lambda md: list(channel.unary_stream(EVENTS)(
                    b"", metadata=md, timeout=WAIT_S)),
            }
            for md in (call_metadata("0" * 32, "stranger"), (), (("fedloom-token", ""),)):
                for method, call in calls.items():
                    with pytest.raises(grpc.RpcError) as info:
                        call(md)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        out = cluster.run()
    finally:
        cluster.close()
    assert sha(out) == sha(ref)
    assert out.shards[0]["refused"] == 9 and out.shards[0]["bad_frames"] == 0


def numbered(messages: list[bytes], first: int) -> list[bytes]:
    """Deliver messages as a peer shard sends them: each after its sequence number."""
    return [SEQ.pack(first + i) + m for i, m in enumerate(messages)]


def _garbage() -> st.SearchStrategy[list[bytes]]:
    codec = Codec.from_config({})
    good = poison_frames(codec)[0]  # a BATCH holding one valid message for node 0
    frame = b"".join(bytes(p) for p in codec.encode(Message(99, 0, "poison",
                                                            {"amount": 1000.0}, 0.0, 1)))

    def batch_of(payload: bytes, dsts: list[int]) -> bytes:
        return b"".join(pack([(dsts, [payload], len(payload))], 1 << 20))

    raw = st.binary(min_size=0, max_size=300)
    truncated_message = st.integers(1, len(good) - 1).map(lambda k: good[:k])
    truncated_frame = st.integers(0, len(frame) - 1).map(lambda k: batch_of(frame[:k], [0]))
    random_frame = raw.map(lambda b: batch_of(b, [0]))
    wrong_node = st.just(batch_of(frame, [1]))  # node 1 runs on shard 1, not here
    bad_dsts = st.sampled_from([batch_of(frame, []), batch_of(frame, ["x"]),  # type: ignore[list-item]
                                batch_of(frame, [True])])  # type: ignore[list-item]
    head_only = st.integers(1, 1 << 40).map(lambda n: b"\x02" + bytes([0x92, 0x91, 0x00])
                                            + _msgpack_int(n))
    prefixed = st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x07"]).flatmap(
        lambda t: raw.map(lambda b: t + b))
    one = st.one_of(raw, truncated_message, truncated_frame, random_frame, wrong_node, bad_dsts,
                    head_only, prefixed)
    return st.lists(one, min_size=1, max_size=4)


def _msgpack_int(n: int) -> bytes:
    return bytes(msgpack.packb(n))


def test_random_and_truncated_frames_never_crash_a_shard() -> None:
    cfg = sum_config()
    ref = run_inproc(cfg)
    cluster = Cluster(make_job(cfg), validate_options({}))
    try:
        cluster.launch()
        cluster.connect()
        shard = cluster.shards[0]
        md = call_metadata(cluster.token, "fuzzer")
        with grpc.insecure_channel(shard.address) as channel:
            deliver = channel.stream_stream(DELIVER)
            sent = [0]

            @settings(deadline=None)
            @given(_garbage())
            def check(messages: list[bytes]) -> None:
                acks = list(deliver(iter(numbered(messages, sent[0] + 1)), metadata=md,
                                    timeout=WAIT_S))
                sent[0] += len(messages)
                assert [SEQ.unpack(a)[0] for a in acks] == list(range(sent[0] - len(messages)
                                                                      + 1, sent[0] + 1))
                # still serving, same process
                assert cluster.control(shard, {"op": "ping"})["pid"] == shard.pid

            check()
        out = cluster.run()  # and a valid run afterwards gives the right answer
    finally:
        cluster.close()
    assert sha(out) == sha(ref)
    assert out.shards[0]["bad_frames"] > 0


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), min_size=1, max_size=12),
       st.integers(1, 2048))
def test_framing_round_trips_any_sizes_and_chunking(sizes: list[tuple[int, int]],
                                                    chunk: int) -> None:
    # Each frame comes as two parts split anywhere (as the codec hands out header + tensors).
    rng = np.random.default_rng(len(sizes) + chunk)
    frames: list[tuple[Any, list[bytes | memoryview], int]] = []
    whole = []
    for i, (n, cut) in enumerate(sizes):
        payload = rng.integers(0, 256, n, dtype=np.uint8)
        cut = min(cut, n)
        parts: list[bytes | memoryview] = [payload[:cut].tobytes(), payload[cut:].data]
        frames.append(([i], parts, n))
        whole.append(payload.tobytes())
    messages = list(pack(frames, chunk))
    reasm = Reassembler()
    got = [f for m in messages for f in reasm.feed(m)]
    assert [meta for meta, _ in got] == [[i] for i in range(len(sizes))]
    assert [bytes(buf) for _, buf in got] == whole
    # no gRPC message much above a chunk, unless it is one small frame's batch header
    assert all(len(m) <= chunk + 64 + 8 * len(sizes) or m[0] == 1 for m in messages)
    assert sum(1 for m in messages if m[0] == 1) <= len(sizes)


@given(st.binary(max_size=200))
def test_reassembler_raises_only_codec_errors(data: bytes) -> None:
    reasm = Reassembler(limit=1 << 20)
    with contextlib.suppress(CodecError):
        reasm.feed(data)
    with contextlib.suppress(CodecError):  # and goes on
        reasm.feed(data)


# -- failures ------------------------------------------------------------------------------------
def test_killed_shard_is_a_run_error_naming_it() -> None:
    cfg = {"run": {"seed": 0, "rounds": 1},
           "protocol": {"name": f"{PROTOS}:build_pingpong", "every": 20}}
    transport = GrpcTransport({"shards": 2})
    killed: list[int] = []

    def on_metric(row: dict[str, Any]) -> None:
        if row["name"] == "round" and row["value"] == 3 and not killed:
            assert transport.cluster is not None
            victim = transport.cluster.shards[1]
            killed.append(victim.pid)
            os.kill(victim.pid, signal.SIGKILL)

    job = make_job(cfg, until=WAIT_S)
    job.on_metric = on_metric
    try:
        # Without detection the run would end at its time limit with reason "until".
        with pytest.raises(RunError) as info:
            transport.run(job)
    finally:
        transport.close()
    assert killed
    text = str(info.value)
    assert f"grpc shard 1 (pid {killed[0]}, nodes [1])" in text and "SIGKILL" in text


def test_a_run_that_reaches_its_time_limit_ends_with_reason_until() -> None:
    cfg = {"run": {"seed": 0, "rounds": 1},
           "protocol": {"name": f"{PROTOS}:build_pingpong", "every": 10}}
    rows: list[dict[str, Any]] = []
    transport = GrpcTransport({"shards": 2})
    try:
        out = transport.run(make_job(cfg, rows, until=0.5))
    finally:
        transport.close()
    assert out.reason == "until" and out.result is None and out.finished_by is None
    rounds = [r["value"] for r in rows if r["name"] == "round"]
    assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) > 1  # in shard order
    assert out.messages == sum(s["messages"] for s in out.shards) > 10


DRIVER = """
import sys
from kernel import registry
from transports.base import Job
from transports.grpc import GrpcTransport
cfg = {"run": {"seed": 0, "rounds": 1},
       "protocol": {"name": "tests.transports.grpc_protocols:build_pingpong", "every": 20}}
dep = registry.load("protocols", cfg["protocol"]["name"])(cfg)
def on_metric(row):
    if row["value"] == 2:
        print("RUNNING", flush=True)
try:
    GrpcTransport({}).run(Job(config=cfg, deployment=dep, seed=0, until=60.0,
                              on_metric=on_metric))
except KeyboardInterrupt:
    sys.exit(42)
"""


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_no_shard_outlives_a_driver_interrupted_or_killed(how: signal.Signals) -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert driver.stdout is not None
        assert driver.stdout.readline().strip() == "RUNNING"
        shards = shard_children()
        assert len(shards) == 2
        driver.send_signal(how)
        code = driver.wait(timeout=WAIT_S)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(WAIT_S)
    assert code == (42 if how == signal.SIGINT else -signal.SIGKILL)
    _, alive = psutil.wait_procs(shards, timeout=WAIT_S)
    assert not alive, f"shards outlived their driver: {[p.pid for p in alive]}"


def test_shards_exit_when_the_driver_goes_away() -> None:
    cluster = Cluster(make_job(sum_config()), validate_options({}))
    try:
        cluster.launch()
        cluster.connect()
        procs = [s.proc for s in cluster.shards]
        for p in procs:  # what the OS does to the pipe when the driver dies
            assert p.stdin is not None
            p.stdin.close()
        codes = [p.wait(timeout=WAIT_S) for p in procs]
    finally:
        cluster.close()
    assert codes == [1, 1]  # "went away before stopping", not a clean stop


def test_a_shard_that_cannot_build_is_reported_with_its_error() -> None:
    cfg = sum_config()
    transport = GrpcTransport({"shards": 2})
    job = make_job(cfg)
    job.config["protocol"]["colour"] = "blue"  # the shards rebuild from this config
    try:
        with pytest.raises(RunError, match=r"grpc shard 0 .*failed to start.*colour"):
            transport.run(job)
    finally:
        transport.close()


@settings(max_examples=50)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=6), st.integers(64, 1024),
       st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=4))
def test_resends_from_any_point_deliver_each_frame_once(sizes: list[int], chunk: int,
                                                         breaks: list[tuple[int, int]]) -> None:
    # A sender's stream breaks after `k` more messages, and it had heard acks for all but the
    # last `back` of them: it sends again from there, often mid-way through a chunked frame.
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    messages = numbered(list(pack([([i], [p], len(p)) for i, p in enumerate(payloads)], chunk)),
                        1)
    inbound = Inbound(Reassembler())
    got: list[bytes] = []
    duplicates = 0

    def send(at: int, k: int) -> int:
        nonlocal duplicates
        for data in messages[at:at + k]:
            body = inbound.open(data)
            if body is None:
                duplicates += 1
            else:
                got.extend(bytes(buf) for _, buf in inbound.reasm.feed(body))
        return min(at + k, len(messages))

    at = 0
    for k, back in breaks:
        at = max(send(at, k) - back, 0)
    send(at, len(messages))
    assert got == payloads
    assert inbound.last == len(messages)
    with pytest.raises(CodecError, match="messages are missing"):
        inbound.open(SEQ.pack(inbound.last + 2) + messages[0][SEQ.size:])


class FlakyPeer:
    """A real gRPC server on loopback speaking the Deliver protocol, which drops (UNAVAILABLE)
    the first `drop` calls, each after reading `after` messages (the last one unacknowledged)."""

    def __init__(self, drop: int, after: int) -> None:
        self.drop, self.after = drop, after
        self.calls = 0
        self.frames: list[bytes] = []
        self.inbound = Inbound(Reassembler())
        self.changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            DELIVER.split("/")[1],
            {"Deliver": grpc.stream_stream_rpc_method_handler(self._take)})])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _take(self, requests: Iterator[bytes],
              context: grpc.ServicerContext) -> Iterator[bytes]:
        with self.changed:
            self.calls += 1
            call = self.calls
            self.changed.notify_all()
        if call <= self.drop and self.after == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
        for i, data in enumerate(requests):
            if call <= self.drop and i == self.after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
            with self.changed:
                body = self.inbound.open(data)
                if body is not None:
                    self.frames += [bytes(buf) for _, buf in self.inbound.reasm.feed(body)]
                self.changed.notify_all()
                ack = SEQ.pack(self.inbound.last)
            yield ack

    def wait(self, what: Any, text: str) -> None:
        with self.changed:
            assert self.changed.wait_for(what, timeout=WAIT_S), text


def test_a_dropped_stream_reconnects_and_delivers_each_frame_once_in_order() -> None:
    peer = FlakyPeer(drop=1, after=1)
    errors: list[str] = []
    link = PeerLink(0, 1, peer.address, "tok", validate_options({}), None, errors.append)
    try:
        link.connect(WAIT_S)
        link.queue.put(([1], [b"first"], 5), timeout=WAIT_S)
        peer.wait(lambda: peer.frames == [b"first"], "the first frame did not arrive")
        link.queue.put(([1], [b"dropper"], 7), timeout=WAIT_S)  # the server drops this call
        peer.wait(lambda: peer.calls == 2, "the link did not reconnect")
        for word in (b"a", b"b", b"c"):
            link.queue.put(([1], [word], 1), timeout=WAIT_S)
        peer.wait(lambda: peer.frames[-1:] == [b"c"], "frames after the reconnect did not arrive")
    finally:
        link.close(WAIT_S)
        peer.server.stop(None)
    # "dropper" was read but never acknowledged: it went again on the new stream, once
    assert peer.frames == [b"first", b"dropper", b"a", b"b", b"c"]
    assert link.stats["reconnects"] == 1 and link.stats["resent_out"] == 1 and not errors


class CuttingProxy:
    """A loopback TCP proxy to `target` that cuts its i-th connection, both ways, once `cuts[i]`
    bytes have crossed it (in either direction); later connections are left alone."""

    def __init__(self, target: str, cuts: list[int]) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.cuts = list(cuts)
        self.cut = 0  # connections cut so far
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target, timeout=WAIT_S)
            except OSError:
                return
            upstream.settimeout(None)
            left = [self.cuts[n] if n < len(self.cuts) else None]
            n += 1
            with self.lock:
                self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, client, upstream, left),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, a: socket.socket,
              b: socket.socket, left: list[int | None]) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            cut = False
            with self.lock:
                budget = left[0]
                if budget is not None:
                    cut = len(data) >= budget
                    data = data[:budget]
                    left[0] = budget - len(data)
                    if cut:
                        left[0] = None
                        self.cut += 1
            try:
                dst.sendall(data)
            except OSError:
                break
            if cut:
                break
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                sock.close()


_SUM_BROKEN = sum_config(clients=5, dim=20_000, rounds=3)


@settings(max_examples=5, deadline=None)
def _cuts() -> st.SearchStrategy[list[int]]:
    # The first cut comes after the channel's handshake (a few hundred bytes), so it breaks a
    # live stream; the later ones anywhere, handshakes of reconnects included.
    return st.tuples(st.integers(1_000, 60_000), st.lists(st.integers(1, 60_000),
                                                          max_size=2)).map(
        lambda t: [t[0], *t[1]])


@given(_cuts(), _cuts())
def test_streams_broken_at_any_byte_still_give_the_inproc_model(cuts0: list[int],
                                                                 cuts1: list[int]) -> None:
    # Each shard's peers reach it through a proxy that cuts the first connections at the
    # chosen byte offsets: in handshakes, mid-message and mid-way through chunked 80 KB models.
    cluster = Cluster(make_job(_SUM_BROKEN, until=WAIT_S), validate_options(
        {"shards": 2, "chunk_bytes": 16 << 10, "strict": True, "max_reconnects": 10}))
    proxies: list[CuttingProxy] = []
    try:
        cluster.launch()
        proxies = [CuttingProxy(s.address, cuts) for s, cuts in zip(cluster.shards,
                                                                       (cuts0, cuts1))]
        cluster.connect(via={s.index: p.address for s, p in zip(cluster.shards, proxies)})
        out = cluster.run()
    finally:
        cluster.close()
        for proxy in proxies:
            proxy.close()
    assert sha(out) == sha(run_inproc(_SUM_BROKEN))
    assert out.messages == run_inproc(_SUM_BROKEN).messages
    # each proxy's first cut falls inside the run's traffic, so every stream broke at least once
    assert all(p.cut >= 1 for p in proxies), [p.cut for p in proxies]
    assert all(s["reconnects"] >= 1 for s in out.shards), [s["reconnects"] for s in out.shards]


@pytest.mark.parametrize("cuts", [[10, 30, 5], [50, 250, 20]])
def test_a_link_whose_handshakes_are_cut_still_connects_and_delivers(cuts: list[int]) -> None:
    peer = FlakyPeer(drop=0, after=0)
    proxy = CuttingProxy(peer.address, cuts)
    errors: list[str] = []
    link = PeerLink(0, 1, proxy.address, "tok", validate_options({}), None, errors.append)
    try:
        link.connect(WAIT_S)
        link.queue.put(([1], [b"hello"], 5), timeout=WAIT_S)
        peer.wait(lambda: peer.frames == [b"hello"], "the frame did not arrive")
    finally:
        link.close(WAIT_S)
        proxy.close()
        peer.server.stop(None)
    assert proxy.cut >= 1 and not errors


def test_a_stream_that_keeps_failing_gives_up_after_max_reconnects() -> None:
    peer = FlakyPeer(drop=1000, after=0)
    failed = threading.Event()
    errors: list[str] = []

    def on_error(text: str) -> None:
        errors.append(text)
        failed.set()

    link = PeerLink(0, 1, peer.address, "tok", validate_options({"max_reconnects": 2}), None,
                    on_error)
    try:
        link.connect(WAIT_S)
        assert failed.wait(WAIT_S), "the link never gave up"
        gave_up = r"stream to shard 1 at .*UNAVAILABLE \(gave up after 2 reconnects"
        with pytest.raises(RunError, match=gave_up):
            link.queue.put(([1], [b"x"], 1), timeout=WAIT_S)
    finally:
        link.close(WAIT_S)
        peer.server.stop(None)
    assert peer.calls == 3 and link.stats["reconnects"] == 2
    assert "UNAVAILABLE" in errors[0]


def test_full_queue_blocks_then_times_out_naming_the_stream() -> None:
    q = FrameQueue(100, "stream to shard 7")
    q.put(([1], [b"x" * 80], 80), timeout=1.0)
    with pytest.raises(RunError, match=r"stream to shard 7 has been full .* for 0.05 s"):
        q.put(([1], [b"y" * 80], 80), timeout=0.05)
    assert [f[2] for f in q.take(0.0, 0.0, 0) or []] == [80]
    q.put(([1], [b"y" * 80], 80), timeout=0.05)  # room again
    q.fail("peer gone")
    with pytest.raises(RunError, match="peer gone"):
        q.put(([1], [b"z"], 1), timeout=0.05)


def test_options_are_validated() -> None:
    assert validate_options({})["shards"] == 2
    with pytest.raises(ConfigError, match="shard"):
        validate_options({"shard": 3})
    with pytest.raises(ConfigError, match="shards"):
        validate_options({"shards": 0})
    with pytest.raises(ConfigError, match="chunk_bytes"):
        validate_options({"chunk_bytes": 1 << 30})
    with pytest.raises(ConfigError, match="kind"):
        validate_options({"kind": "ray"})


def _uneven_fedavg(kind: str, shards: int | None = None) -> dict[str, Any]:
    transport: dict[str, Any] = {"kind": kind}
    if shards is not None:
        transport["shards"] = shards
    return kconfig.validate({
        "run": {"seed": 5, "rounds": 3, "progress": False},
        "protocol": {"name": "fedavg", "aggregator": "weighted_mean", "server_opt": "adam",
                     "partial_piece": 5},  # partials in pieces of 5 of the 21 sums
        "workload": {"model": "linear", "clients": 9, "samples_per_client": 40,
                     "samples_min": 5, "input_dim": 20, "test_samples": 100},
        "transport": transport})


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_any_shard_count_gives_the_inproc_model(shards: int) -> None:
    # Unequal sample counts, so the weighted mean's order of arrival would show if it leaked.
    want = runner.execute(_uneven_fedavg("inproc"), quiet=True)
    got = runner.execute(_uneven_fedavg("grpc", shards), quiet=True)
    assert got.result["reason"] == "finished" and len(got.result["shards"]) == shards
    # With more than one shard, the other shards' replies came summed (protocols.partials):
    # 9 clients placed round-robin leave 3 or more on every shard but the server's.
    relayed = [row["value"] for row in got.rows if row["name"] == "partials"]
    assert relayed == ([shards - 1] * 3 if shards > 1 else [])
    assert got.result["final_model_sha256"] == want.result["final_model_sha256"]
