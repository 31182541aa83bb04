"""Checkpoints and resume on inproc: a run interrupted at any round (by a real SIGINT) or
checkpointed every k rounds, then resumed, ends exactly as the run that was never
interrupted (model hash, metric rows but for wall-clock fields, counters, virtual time), for
every protocol; and damaged, truncated, foreign or wrong-version checkpoints are refused with
the promised error before anything runs."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import ConfigError, options
from kernel.registry import declare
from kernel.run import checkpoint as ckpt
from kernel.run.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, main
from kernel.run.outputs import WALL_FIELDS, read_metrics
from kernel.run.runner import RunRecord, execute, run
from tests.kernel.run.interrupt import InterruptAt

ROOT = Path(__file__).resolve().parents[3]
LINEAR = {"model": "linear", "clients": 6, "input_dim": 10, "samples_per_client": 24,
          "batch_size": 8, "test_samples": 50, "lr": 0.1}
# Uneven latencies and client speeds: replies come back late and out of order, so the
# network model's random stream and busy clients' mailboxes are part of the state.
STRAGGLERS = {"latency": {"kind": "uniform", "low": 0.001, "high": 0.05},
              "compute": {"per_unit": 0.01, "spread": "uniform", "low": 1.0, "high": 3.0}}
LOSSY = {"latency": {"kind": "uniform", "low": 0.01, "high": 0.5}, "loss": 0.1,
         "duplicate": 0.1, "crashes": [{"node": 3, "at": 2.5, "restart": 5.5}]}
CONFIGS: dict[str, dict[str, Any]] = {
    "fedavg": {"run": {"seed": 1, "rounds": 6},
               "protocol": {"name": "fedavg", "clients_per_round": 3, "round_timeout": 0.5,
                            "server_opt": "adam", "aggregator": "trimmed_mean",
                            "aggregator_args": {"trim": 0.2}},
               "transport": {"kind": "inproc", "strict": True},
               "workload": LINEAR, "network": STRAGGLERS},
    # FedAvgM with FedProx clients and a robust aggregator: momentum buffers are state.
    "fedavg-avgm": {"run": {"seed": 1, "rounds": 5},
                    "protocol": {"name": "fedavg", "clients_per_round": 4, "server_opt": "avgm",
                                 "mu": 0.01, "aggregator": "median"},
                    "workload": LINEAR, "network": STRAGGLERS},
    "fedbuff": {"run": {"seed": 1, "rounds": 6},
                "protocol": {"name": "fedbuff", "buffer": 3, "concurrency": 4},
                "workload": LINEAR, "network": STRAGGLERS},
    "fedasync": {"run": {"seed": 1, "rounds": 6},
                 "protocol": {"name": "fedasync", "concurrency": 3},
                 "workload": LINEAR, "network": STRAGGLERS},
    # Node 3 crashes after the early checkpoints and restarts as a new incarnation, which
    # gossip counts in a module-level table keyed by contexts: a side table to restore.
    "pushsum": {"run": {"seed": 2, "rounds": 8},
                "protocol": {"name": "pushsum", "nodes": 8, "dim": 20}, "network": LOSSY},
    "gossip-async": {"run": {"seed": 2, "rounds": 8},
                     "protocol": {"name": "gossip", "mode": "async", "nodes": 8, "dim": 20},
                     "network": {"latency": {"kind": "uniform", "low": 0.01, "high": 0.5}}},
    "gossip-sync": {"run": {"seed": 2, "rounds": 6},
                    "protocol": {"name": "gossip", "nodes": 8, "dim": 20}},
    "dsgd": {"run": {"seed": 2, "rounds": 5}, "protocol": {"name": "dsgd"},
             "workload": LINEAR, "network": STRAGGLERS},
    # Three (virtual) shards: relays hold partial sums of their shard's replies (and whom
    # each sent partial summed) across the checkpoint.
    "fedavg-shards": {"run": {"seed": 1, "rounds": 5},
                      "protocol": {"name": "fedavg", "round_timeout": 0.7, "partial_piece": 7},
                      "transport": {"kind": "inproc", "shards": 3},
                      "workload": dict(LINEAR, clients=9), "network": STRAGGLERS},
    # Error-feedback residuals live in one object `build` shares between all clients.
    "fedavg_ef": {"run": {"seed": 1, "rounds": 5},
                  "protocol": {"name": "protocols.compression:fedavg_ef",
                               "clients_per_round": 3},
                  "workload": LINEAR, "codec": {"stages": {"update": ["topk"]}}},
}
COMPARED = ("final_model_sha256", "rounds", "reason", "finished_by", "clock_s", "messages",
            "bytes", "events", "test_accuracy", "extra")


@functools.cache
def reference(name: str) -> RunRecord:
    """The run never interrupted, without checkpoints."""
    return execute(CONFIGS[name], quiet=True)


def plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in rows]


def assert_same_run(got: RunRecord, want: RunRecord) -> None:
    assert {k: got.result[k] for k in COMPARED} == {k: want.result[k] for k in COMPARED}
    assert plain(got.rows) == plain(want.rows)


@pytest.fixture(autouse=True)
def _default_sigint() -> Iterator[None]:
    # Whatever the runner does with SIGINT, it must put the previous handler back.
    before = signal.getsignal(signal.SIGINT)
    yield
    assert signal.getsignal(signal.SIGINT) is before


def interrupt_and_resume(name: str, at: int, directory: Path) -> RunRecord:
    with pytest.raises(ckpt.RunInterrupted) as info:
        execute(CONFIGS[name], progress=InterruptAt(at), checkpoint_dir=directory)
    assert info.value.round == at
    assert info.value.message == (
        f"interrupted at round {at}; checkpoint {directory / 'checkpoint.fl'} written; "
        f"resume with: fedloom run --resume {directory}")
    assert ckpt.read(directory).round == at
    return execute(None, quiet=True, resume=directory)


# -- resuming is invisible -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedavg", "fedbuff", "pushsum"])
@settings(max_examples=6)
@given(data=st.data())
def test_a_run_interrupted_at_any_round_and_resumed_ends_bit_for_bit_as_one_never_interrupted(
        name: str, data: st.DataObject) -> None:
    rounds = CONFIGS[name]["run"]["rounds"]
    at = data.draw(st.integers(1, rounds - 1), label="interrupt after round")
    with tempfile.TemporaryDirectory() as d:
        assert_same_run(interrupt_and_resume(name, at, Path(d)), reference(name))


@pytest.mark.parametrize("name", ["fedavg", "fedbuff"])
@settings(max_examples=4)
@given(data=st.data())
def test_checkpointing_every_k_rounds_changes_nothing_and_the_last_one_resumes(
        name: str, data: st.DataObject) -> None:
    rounds = CONFIGS[name]["run"]["rounds"]
    k = data.draw(st.integers(1, rounds - 1), label="checkpoint_every")
    with tempfile.TemporaryDirectory() as d:
        full = execute(CONFIGS[name], quiet=True, checkpoint_dir=d, checkpoint_every=k)
        assert_same_run(full, reference(name))
        # Both finish in the event that emits their last round: no checkpoint at `rounds`.
        last = (rounds - 1) // k * k
        assert full.result["checkpoint"]["written"] == last // k
        assert ckpt.read(d).round == last
        assert os.listdir(d) == ["checkpoint.fl"]  # written atomically: no temporary left
        resumed = execute(None, quiet=True, resume=d)
        assert_same_run(resumed, reference(name))
        assert resumed.result["checkpoint"]["resumed_from_round"] == last


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - {"fedavg", "fedbuff", "pushsum"}))
def test_every_other_protocol_resumes_bit_for_bit(name: str, tmp_path: Path) -> None:
    assert_same_run(interrupt_and_resume(name, 2, tmp_path), reference(name))


def strings(x: Any) -> Iterator[str]:
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(x, list | tuple):
        for v in x:
            yield from strings(v)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_checkpoint_names_no_module_class_or_function(name: str, tmp_path: Path) -> None:
    execute(CONFIGS[name], quiet=True, checkpoint_dir=tmp_path, checkpoint_every=1)
    state = ckpt.read(tmp_path).state
    found = sorted(s for s in set(strings(state))
                   if s in sys.modules or re.fullmatch(r"[\w.]+:[\w.]+", s)
                   or s.split(".")[0] in ("protocols", "kernel", "transports", "tests",
                                          "builtins", "numpy", "os", "subprocess"))
    assert found == []


def test_a_resumed_run_checkpoints_on_and_resumes_again(tmp_path: Path) -> None:
    with pytest.raises(ckpt.RunInterrupted):
        execute(CONFIGS["fedbuff"], progress=InterruptAt(1), checkpoint_dir=tmp_path,
                checkpoint_every=2)
    with pytest.raises(ckpt.RunInterrupted):
        execute(None, progress=InterruptAt(3), resume=tmp_path)
    assert ckpt.read(tmp_path).round == 3
    assert_same_run(execute(None, quiet=True, resume=tmp_path), reference("fedbuff"))


def test_run_writes_outputs_of_a_resumed_run_into_the_checkpoint_directory(
        tmp_path: Path) -> None:
    with pytest.raises(ckpt.RunInterrupted):
        execute(CONFIGS["fedavg"], progress=InterruptAt(2), checkpoint_dir=tmp_path)
    assert os.listdir(tmp_path) == ["checkpoint.fl"]  # an interrupted run writes nothing else
    result = run(None, quiet=True, resume=tmp_path)
    assert result["final_model_sha256"] == reference("fedavg").result["final_model_sha256"]
    assert plain(read_metrics(tmp_path / "metrics.jsonl")) == plain(reference("fedavg").rows)
    assert json.loads((tmp_path / "result.json").read_text()) == result


def test_resuming_from_the_checkpoint_file_itself_writes_into_its_folder(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.fl").write_bytes(good_checkpoint())
    result = run(None, quiet=True, resume=tmp_path / "checkpoint.fl")
    assert result["final_model_sha256"] == reference("fedavg").result["final_model_sha256"]
    assert json.loads((tmp_path / "result.json").read_text()) == result


# -- refusing what does not fit --------------------------------------------------------------

@functools.cache
def good_checkpoint() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(ckpt.RunInterrupted):
            execute(CONFIGS["fedavg"], progress=InterruptAt(2), checkpoint_dir=d)
        return (Path(d) / "checkpoint.fl").read_bytes()


def refused(data: bytes, match: str) -> str:
    """Resume from `data`: it must fail with `match`, having written nothing."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "checkpoint.fl").write_bytes(data)
        with pytest.raises(ckpt.CheckpointError, match=match) as info:
            run(None, quiet=True, resume=d)
        assert os.listdir(d) == ["checkpoint.fl"]
        return str(info.value)


@settings(max_examples=30)
@given(st.data())
def test_a_truncated_checkpoint_is_refused_saying_where_it_ends(data: st.DataObject) -> None:
    good = good_checkpoint()
    n = data.draw(st.integers(0, len(good) - 1), label="length")
    msg = refused(good[:n], "is truncated")
    assert f"is truncated at byte {n}:" in msg


@settings(max_examples=40)
@given(st.data())
def test_a_checkpoint_with_any_bit_flipped_is_refused(data: st.DataObject) -> None:
    good = bytearray(good_checkpoint())
    # Half the flips land in the 64-byte header, where every field has its own check.
    bit = data.draw(st.integers(0, ckpt.HEADER_BYTES * 8 - 1)
                    | st.integers(0, len(good) * 8 - 1), label="bit")
    good[bit // 8] ^= 1 << (bit % 8)
    byte = bit // 8
    expected = {range(0, 8): "is not a fedloom checkpoint",
                range(8, 12): "was written by checkpoint format version",
                range(16, 24): "is truncated|is damaged"}
    match = next((m for r, m in expected.items() if byte in r), "is damaged")
    refused(bytes(good), match)


def test_a_damaged_payload_says_sha256_mismatch_with_both_hashes() -> None:
    good = bytearray(good_checkpoint())
    good[-1] ^= 0x40
    msg = refused(bytes(good), r"is damaged: sha256 mismatch \(expected [0-9a-f]{64}, "
                               r"got [0-9a-f]{64}\)")
    assert msg.startswith(str(Path(tempfile.gettempdir())))


def test_a_checkpoint_of_another_format_version_is_refused_naming_both_versions() -> None:
    good = bytearray(good_checkpoint())
    struct.pack_into("<I", good, 8, 7)
    refused(bytes(good), r"was written by checkpoint format version 7; this fedloom "
                         r"\(.*\) reads version 2")


@pytest.mark.parametrize("data", [b"", b'{"run": 1}\n', bytes(range(256)) * 3])
def test_something_else_is_refused_as_not_a_checkpoint_or_truncated(data: bytes) -> None:
    refused(data, "is not a fedloom checkpoint|is truncated at byte 0")


def rewrite(data: bytes, change: Any) -> bytes:
    """A checkpoint whose body `change(body)` altered, with a valid hash: what passes the
    integrity checks and must still be refused on content."""
    loaded = ckpt._CODEC.decode_body(memoryview(data)[ckpt.HEADER_BYTES:])
    body = {k: v for k, v in loaded.items()}
    change(body)
    with tempfile.TemporaryDirectory() as d:
        ckpt.write(Path(d) / "x.fl", body)
        return (Path(d) / "x.fl").read_bytes()


def with_config(body: dict[str, Any], config: dict[str, Any]) -> None:
    body["config"] = config
    body["header"] = {**body["header"], "config_sha256": ckpt.config_sha256(config)}


@pytest.mark.parametrize("section, key, name", [
    ("protocol", "name", "subprocess:getoutput"), ("protocol", "name", "builtins:exec"),
    ("transport", "kind", "os:system"), ("protocol", "aggregator", "builtins:eval")])
def test_a_checkpoint_whose_config_names_an_undeclared_builder_is_refused_before_calling_it(
        section: str, key: str, name: str) -> None:
    def evil(body: dict[str, Any]) -> None:
        cfg = dict(body["config"])
        cfg[section] = {**cfg[section], key: name}
        with_config(body, cfg)

    refused(rewrite(good_checkpoint(), evil), rf"refuses.*'{name}' is not declared as one")


@functools.cache
def fresh_host() -> Any:
    """Builds a host as inproc does for `CONFIGS["fedavg"]`, ready for `restore`."""
    from kernel.host import Host
    from kernel.run.config import validate
    from kernel.run.runner import _load
    from kernel.wire.codec import body_nbytes
    from transports.netmodel import NetworkModel

    cfg = validate(CONFIGS["fedavg"])
    build = _load("protocols", "fedavg", "protocol")

    def make() -> tuple[Host, Any]:
        dep = build(cfg)
        net = NetworkModel.from_config(cfg["network"], 1, dep.node_ids)
        return Host(dep, dep.node_ids, seed=1, network=net, sizer=body_nbytes), net

    return make


def mutations(tree: Any) -> st.SearchStrategy[Any]:
    """Values to put anywhere in a state tree: tags, references, names, other subtrees."""
    return (st.sampled_from(["@", "=", "o", "S", "l", "d", "g", "M", "I", "a", "os:system",
                             "__class__", "__globals__", "subprocess", "PCG64", "t"])
            | st.integers(-2, 300) | st.none() | st.floats() | st.binary(max_size=3)
            | st.just(np.zeros(3)) | st.just(tree) | st.just(["@", 0]) | st.just(["="]))


def positions(tree: Any, out: list[tuple[list[Any], int]]) -> list[tuple[list[Any], int]]:
    if type(tree) is list:
        for i, x in enumerate(tree):
            out.append((tree, i))
            positions(x, out)
    elif type(tree) is dict:
        for x in tree.values():
            positions(x, out)
    return out


def _decoded(data: bytes) -> dict[str, Any]:
    return ckpt._CODEC.decode_body(memoryview(data)[ckpt.HEADER_BYTES:])


def _plain_copy(x: Any) -> Any:
    if type(x) is list:
        return [_plain_copy(v) for v in x]
    if type(x) is dict:
        return {k: _plain_copy(v) for k, v in x.items()}
    return x


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_loading_a_mutated_and_rechecksummed_checkpoint_raises_only_the_checkpoint_error_and_runs_nothing(  # noqa: E501
        data: st.DataObject) -> None:
    body = {k: _plain_copy(v) for k, v in _decoded(good_checkpoint()).items()}
    state = body["state"]
    spots = positions(state, [])
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        parent, i = data.draw(st.sampled_from(spots), label="where")
        parent[i] = data.draw(mutations(_plain_copy(state["protos"][0])), label="what")
    with tempfile.TemporaryDirectory() as d:
        ckpt.write(Path(d) / "checkpoint.fl", body)
        host, net = fresh_host()()
        global AUDIT
        AUDIT = []
        try:
            ckpt.restore(host, net, ckpt.read(d).state, fresh_host()()[0].deployment)
        except ckpt.CheckpointError:
            pass
        finally:
            seen, AUDIT = AUDIT, None
        assert seen == []


# Audit hooks cannot be removed: one for the module, listening only while AUDIT is a list.
AUDIT: list[str] | None = None
DANGER = ("import", "exec", "compile", "os.system", "subprocess.Popen", "os.exec",
          "os.posix_spawn", "os.spawn")


def _audit(event: str, args: Any) -> None:
    if AUDIT is not None and event in DANGER:
        AUDIT.append(f"{event} {args!r:.100}")


sys.addaudithook(_audit)


def test_a_checkpoint_whose_config_does_not_match_its_header_is_refused() -> None:
    def edit(body: dict[str, Any]) -> None:
        body["config"] = {**body["config"], "run": {**body["config"]["run"], "seed": 99}}

    refused(rewrite(good_checkpoint(), edit), "its config does not match the config hash")


def test_resuming_with_a_different_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.fl").write_bytes(good_checkpoint())
    other = {**CONFIGS["fedavg"], "run": {"seed": 2, "rounds": 6}}
    with pytest.raises(ckpt.CheckpointError, match="written by a different config"):
        execute(other, quiet=True, resume=tmp_path)
    same = execute(CONFIGS["fedavg"], quiet=True, resume=tmp_path)
    assert_same_run(same, reference("fedavg"))


@pytest.mark.parametrize("kind", ["ray", "grpc"])
def test_checkpoints_on_other_transports_are_a_config_error(kind: str, tmp_path: Path) -> None:
    cfg = {**CONFIGS["fedbuff"], "transport": {"kind": kind}}
    with pytest.raises(ConfigError, match=f"inproc-only for now; this run's transport.kind = "
                                          f"'{kind}'"):
        execute(cfg, quiet=True, checkpoint_dir=tmp_path, checkpoint_every=2)


# -- a protocol whose state cannot be saved --------------------------------------------------

class Locking(Protocol):
    """Node 0 ticks `rounds` times, emitting a round row each tick; from tick 2 on it holds a
    lock, which no checkpoint can hold."""

    def __init__(self, rounds: int) -> None:
        self.rounds, self.ticks = rounds, 0
        self.lock: Any = None

    def on_start(self, ctx: Context) -> None:
        if ctx.id == 0:
            ctx.set_timer(1.0, "tick")

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        self.ticks += 1
        if self.ticks == 2:
            self.lock = threading.Lock()
        ctx.emit("round", self.ticks)
        if self.ticks == self.rounds:
            ctx.finish({"model": {"x": np.zeros(1, np.float32)}})
        else:
            ctx.set_timer(1.0, "tick")


@declare("protocols")
def build_locking(config: Mapping[str, Any]) -> Deployment:
    rounds = config["run"]["rounds"]
    return Deployment([0, 1], lambda i: Locking(rounds))


def test_unsaveable_state_fails_naming_it_and_keeps_the_last_good_checkpoint(
        tmp_path: Path) -> None:
    cfg = {"run": {"rounds": 4}, "protocol": {"name": f"{__name__}:build_locking"}}
    with pytest.raises(ckpt.CheckpointError, match=r"cannot checkpoint: cannot save node 0"
                                                   r"\.lock: an instance of _thread.lock is "
                                                   r"not plain data"):
        execute(cfg, quiet=True, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert ckpt.read(tmp_path).round == 1
    assert os.listdir(tmp_path) == ["checkpoint.fl"]


class LockingWithState(Locking):
    """`Locking`, offering its state as plain data: the documented way out for objects the
    rule cannot save (the lock is made anew, the tick count restored)."""

    def state(self) -> dict[str, Any]:
        return {"ticks": self.ticks, "locked": self.lock is not None}

    def load_state(self, data: dict[str, Any]) -> None:
        self.ticks = data["ticks"]
        self.lock = threading.Lock() if data["locked"] else None


@declare("protocols")
def build_locking_with_state(config: Mapping[str, Any]) -> Deployment:
    rounds = config["run"]["rounds"]
    return Deployment([0, 1], lambda i: LockingWithState(rounds))


def test_an_object_offering_state_and_load_state_is_saved_through_them(tmp_path: Path) -> None:
    cfg = {"run": {"rounds": 5}, "protocol": {"name": f"{__name__}:build_locking_with_state"}}
    want = execute(cfg, quiet=True)
    with pytest.raises(ckpt.RunInterrupted):
        execute(cfg, progress=InterruptAt(3), checkpoint_dir=tmp_path)
    assert_same_run(execute(None, quiet=True, resume=tmp_path), want)


# -- the command line ------------------------------------------------------------------------

RELAY_DEFAULTS = {"nodes": 5, "dim": 3}
SIGINT_ENV = "FEDLOOM_TEST_SIGINT_AT_ROUND"


class Relay(Protocol):
    """Node 0 sends its vector to every other node each round; each answers, after a random
    delay of its own (a timer), with the vector plus noise from its rng; node 0 averages the
    answers in sender order. With $FEDLOOM_TEST_SIGINT_AT_ROUND = r, node 0 sends this process
    a SIGINT in the middle of its handler at round r: a Ctrl-C at a reproducible moment."""

    def __init__(self, rounds: int, p: Mapping[str, Any]) -> None:
        self.rounds, self.p = rounds, p
        self.x = np.zeros(p["dim"], np.float32)
        self.r = 0
        self.got: dict[int, np.ndarray] = {}
        self.waiting: list[Message] = []

    def on_start(self, ctx: Context) -> None:
        if ctx.id == 0:
            self._round(ctx)

    def _round(self, ctx: Context) -> None:
        self.r += 1
        self.got = {}
        ctx.multicast(range(1, ctx.n_nodes), "x", r=self.r, x=self.x)

    def on_message(self, ctx: Context, msg: Message) -> None:
        if ctx.id != 0:
            self.waiting.append(msg)
            ctx.set_timer(float(ctx.rng.uniform(0.1, 1.0)), ("reply", msg.r))
            return
        self.got[msg.src] = msg.x
        if len(self.got) < ctx.n_nodes - 1:
            return
        self.x = np.mean([self.got[i] for i in sorted(self.got)], axis=0).astype(np.float32)
        ctx.emit("round", self.r, norm=float(np.linalg.norm(self.x)))
        if os.environ.get(SIGINT_ENV) == str(self.r):
            signal.raise_signal(signal.SIGINT)
        if self.r == self.rounds:
            ctx.finish({"model": {"x": self.x}, "rounds": self.r})
        else:
            self._round(ctx)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        msg = self.waiting.pop(0)
        noise = ctx.rng.standard_normal(self.p["dim"]).astype(np.float32)
        ctx.send(0, "x", r=msg.r, x=msg.x + noise)


@declare("protocols")
def build_relay(config: Mapping[str, Any]) -> Deployment:
    p = options("protocol", {k: v for k, v in config["protocol"].items() if k != "name"},
                RELAY_DEFAULTS)
    rounds = config["run"]["rounds"]
    return Deployment(list(range(p["nodes"])), lambda i: Relay(rounds, p))


RELAY_TOML = f"""\
[run]
seed = 3
rounds = 6

[protocol]
name = "{__name__}:build_relay"

[network]
latency = {{kind = "uniform", low = 0.01, high = 0.2}}
"""


def fedloom(*args: str, cwd: Path, env: Mapping[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(path), **(env or {})}
    return subprocess.run([sys.executable, "-m", "kernel.run.cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=120)


def test_ctrl_c_stops_cleanly_leaves_a_checkpoint_and_resuming_finishes_the_same_run(
        tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(RELAY_TOML)
    want = execute(ckpt_config(config), quiet=True)
    out = tmp_path / "out"
    stopped = fedloom("run", str(config), "--out", str(out), cwd=tmp_path,
                      env={SIGINT_ENV: "3"})
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
    assert stopped.stderr.splitlines()[-1] == (
        f"fedloom: interrupted at round 3; checkpoint {out / 'checkpoint.fl'} written; "
        f"resume with: fedloom run --resume {out}")
    assert "Traceback" not in stopped.stderr and os.listdir(out) == ["checkpoint.fl"]

    resumed = fedloom("run", "--resume", str(out), cwd=tmp_path)
    assert resumed.returncode == EXIT_OK, resumed.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["final_model_sha256"] == want.result["final_model_sha256"]
    assert result["checkpoint"]["resumed_from_round"] == 3
    assert plain(read_metrics(out / "metrics.jsonl")) == plain(want.rows)
    assert "resumed from round 3" in resumed.stdout


def ckpt_config(path: Path) -> dict[str, Any]:
    from kernel.run.config import load

    return load(path)


def test_the_cli_refuses_a_damaged_checkpoint_with_the_message_and_no_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(good_checkpoint())
    data[len(data) // 2] ^= 1
    (tmp_path / "checkpoint.fl").write_bytes(bytes(data))
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"fedloom: error: {tmp_path / 'checkpoint.fl'} is damaged: sha256 "
                          f"mismatch")
    assert "Traceback" not in err
    assert main(["run", "--resume", str(tmp_path / "nowhere"), "--quiet"]) == EXIT_ERROR
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "--set", "run.seed=1"]) == EXIT_ERROR
    assert "--set cannot change a resumed run" in capsys.readouterr().err
