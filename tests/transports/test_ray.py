"""The ray transport on a real local Ray (one instance for the module) and, last, on a real
two-node `ray.cluster_utils.Cluster`: same answers as inproc, exact delivery for asynchronous
protocols, dead shards reported by name or restarted, bad options refused."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from kernel.api import RunError  # noqa: E402
from kernel.options import ConfigError  # noqa: E402
from kernel.registry import load as registry_load  # noqa: E402
from kernel.run import runner  # noqa: E402
from kernel.run.config import load, validate  # noqa: E402
from kernel.run.outputs import model_sha256, named_arrays  # noqa: E402
from tests.transports import ray_protocols as rp  # noqa: E402
from transports.base import Job, Outcome  # noqa: E402
from transports.inproc import InprocTransport  # noqa: E402
from transports.ray import RayTransport, ShardLostError, check_options  # noqa: E402
from transports.ray_cluster import PlacementError  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
TIME_LIMIT = 120.0


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module (the transport reuses it and leaves it running)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _run(transport: Any, config: Mapping[str, Any], rows: list[dict[str, Any]] | None = None,
         on_metric: Any = None) -> Outcome:
    dep = registry_load("protocols", config["protocol"]["name"])(config)
    sink = rows if rows is not None else []

    def metric(row: dict[str, Any]) -> None:
        sink.append(row)
        if on_metric is not None:
            on_metric(row)

    job = Job(config=config, deployment=dep, seed=config["run"]["seed"], until=TIME_LIMIT,
              on_metric=metric)
    try:
        return transport.run(job)
    finally:
        transport.close()


WALL_FIELDS = frozenset({"t", "wall", "wall_s", "round_s", "dt_s"})


def _rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "round" rows without their wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS}
            for r in rows if r["name"] == "round"]


# -- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "named"), [
    ({"shard": 2}, "shard"),
    ({"placement": "EVERYWHERE"}, "placement"),
    ({"shards": -1}, "shards"),
    ({"call_timeout": 0}, "call_timeout"),
    ({"cpus_per_shard": "1"}, "cpus_per_shard"),
    ({"address": "auto", "num_cpus": 2}, "num_cpus"),
])
def test_bad_options_are_refused_naming_the_key(given: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        check_options(given)


def test_documented_options_are_accepted() -> None:
    opts = check_options({"kind": "ray", "shards": 3, "cpus_per_shard": 0.5, "strict": True,
                          "placement": "SPREAD", "tick": 0.01, "inline_threshold": 0})
    assert (opts["shards"], opts["placement"], opts["cpus_per_shard"]) == (3, "SPREAD", 0.5)


# -- same answers as inproc ------------------------------------------------------------------

@pytest.mark.parametrize(("dim", "opts"), [
    (200, {}),  # every frame inline in the batches
    (40_000, {"tick": 0.005}),  # models through the object store; timed flushes
    (3_000, {"inline_threshold": 0, "shards": 3, "cpus_per_shard": 0.5}),  # all by reference
])
def test_sync_protocol_matches_inproc(local_ray: None, dim: int, opts: dict[str, Any]) -> None:
    config = {"run": {"seed": 3, "rounds": 3}, "protocol": {"name": rp.SYNC, "nodes": 7,
                                                            "dim": dim}}
    want_rows: list[dict[str, Any]] = []
    want = _run(InprocTransport({}), config, want_rows)
    rows: list[dict[str, Any]] = []
    got = _run(RayTransport(opts), config, rows)
    assert got.reason == "finished" and got.finished_by == 0
    assert got.result is not None and want.result is not None
    np.testing.assert_array_equal(got.result["model"]["x"], want.result["model"]["x"])
    assert _rounds(rows) == _rounds(want_rows)
    assert got.messages == want.messages
    shards = opts.get("shards", 2)
    stats = [r for r in rows if r["name"] == "shard_stats"]
    assert sorted(r["shard"] for r in stats) == list(range(shards))
    assert sum(r["nodes"] for r in stats) == 7
    assert [s["shard"] for s in got.shards] == list(range(shards))
    if dim * 4 > 65536 or opts.get("inline_threshold") == 0:
        # Large frames go through the object store: one batch argument per destination shard,
        # and a frame bound for several shards put once (only possible with 3+ shards).
        assert sum(s["stored_batches"] for s in got.shards) > 0
        assert (sum(s["puts"] for s in got.shards) > 0) == (shards > 2)
    else:
        assert sum(s["puts"] + s["stored_batches"] for s in got.shards) == 0
    assert ray.is_initialized()  # a Ray the transport did not start is left running


def test_w1_fedavg_gives_the_inproc_model(local_ray: None) -> None:
    base = load(ROOT / "perf/workloads/w1.toml", ["run.progress=false"])
    want = runner.execute(base, quiet=True)
    cfg = load(ROOT / "perf/workloads/w1.toml", ["run.progress=false", "transport.kind=ray"])
    got = runner.execute(cfg, quiet=True)
    assert got.result["final_model_sha256"] == want.result["final_model_sha256"]
    assert got.result["test_accuracy"] == want.result["test_accuracy"]
    assert _rounds(got.rows) == _rounds(want.rows)
    assert got.result["transport"] == "ray" and got.result["reason"] == "finished"


def test_w4_like_gossip_gives_the_inproc_model(local_ray: None) -> None:
    over = ["run.progress=false", "run.rounds=8", "protocol.nodes=16", "protocol.dim=20000"]
    want = runner.execute(load(ROOT / "perf/workloads/w4.toml", over), quiet=True)
    got = runner.execute(load(ROOT / "perf/workloads/w4.toml", [*over, "transport.kind=ray"]),
                         quiet=True)
    assert got.result["final_model_sha256"] == want.result["final_model_sha256"]
    assert got.result["extra"]["max_abs_dev"] == want.result["extra"]["max_abs_dev"]


# -- asynchronous protocols ------------------------------------------------------------------

def test_async_push_sum_conserves_mass(local_ray: None) -> None:
    n = 12
    config = {"run": {"seed": 5, "rounds": 1},
              "protocol": {"name": rp.MASS, "nodes": n, "pushes": 15}}
    rows: list[dict[str, Any]] = []
    out = _run(RayTransport({}), config, rows)
    assert out.result == {"done": n}
    mass = [r for r in rows if r["name"] == "mass"]
    assert sorted(r["node"] for r in mass) == list(range(n))  # every on_stop ran, rows came back
    assert math.isclose(sum(r["value"] for r in mass), rp.initial_mass(n), rel_tol=1e-12)
    assert math.isclose(sum(r["w"] for r in mass), n, rel_tol=1e-12)


def test_pushsum_and_fedbuff_finish_on_ray(local_ray: None) -> None:
    ps = {"run": {"seed": 1, "rounds": 25, "progress": False},
          "transport": {"kind": "ray"},
          "protocol": {"name": "pushsum", "nodes": 10, "dim": 50, "period": 0.01, "drain": 3.0}}
    res = runner.execute(ps, quiet=True).result
    assert res["reason"] == "finished" and res["extra"]["reports"] == 10
    # Mixing 25 ticks on a ring shrinks the spread of the estimates far below the initial one.
    assert res["extra"]["max_abs_dev"] < 1.0
    fb = {"run": {"seed": 2, "rounds": 4, "progress": False},
          "transport": {"kind": "ray"},
          "protocol": {"name": "fedbuff", "buffer": 3},
          "workload": {"model": "linear", "clients": 6, "samples_per_client": 64,
                       "test_samples": 200}}
    rec = runner.execute(fb, quiet=True)
    assert rec.result["reason"] == "finished" and rec.result["rounds"] == 4
    assert [r["value"] for r in rec.rows if r["name"] == "round"] == [1, 2, 3, 4]
    assert rec.result["extra"]["updates"] >= 4 * 3


# -- failures --------------------------------------------------------------------------------

def _kill_shard_after_round(transport: RayTransport, shard: int, at: int) -> Any:
    def on_metric(row: dict[str, Any]) -> None:
        if row["name"] == "round" and row["value"] == at:
            ray.kill(transport.actors[shard], no_restart=False)
    return on_metric


def test_killed_shard_is_reported_by_name(local_ray: None) -> None:
    config = {"run": {"seed": 0, "rounds": 30},
              "protocol": {"name": rp.TICKER, "nodes": 6, "gap": 0.1}}
    tr = RayTransport({"call_timeout": 20.0})
    with pytest.raises(ShardLostError, match=r"ray shard 1 \(nodes 1,3,5\) died: .*Actor.*"
                                             r"max_restarts = 0 \(set transport.max_restarts"):
        _run(tr, config, on_metric=_kill_shard_after_round(tr, 1, 1))


def test_killed_shard_restarts_by_policy(local_ray: None) -> None:
    config = {"run": {"seed": 0, "rounds": 6},
              "protocol": {"name": rp.TICKER, "nodes": 6, "gap": 0.3, "resend": 0.2}}
    tr = RayTransport({"max_restarts": 1, "call_timeout": 30.0})
    rows: list[dict[str, Any]] = []
    out = _run(tr, config, rows, on_metric=_kill_shard_after_round(tr, 1, 1))
    assert out.reason == "finished" and out.result == {"rounds": 6}
    assert [r["value"] for r in rows if r["name"] == "shard_restart"] == [1]
    assert [s["restarts"] for s in out.shards] == [0, 1]


def test_protocol_error_names_shard_and_node(local_ray: None) -> None:
    config = {"run": {"seed": 0, "rounds": 2}, "protocol": {"name": rp.SYNC, "nodes": 5,
                                                            "dim": -1}}
    with pytest.raises(RunError, match=r"ray shard \d \(nodes .*node \d .*raised"):
        _run(RayTransport({}), config)


def test_shard_that_cannot_build_names_the_cause(local_ray: None) -> None:
    config = {"run": {"seed": 0, "rounds": 1}, "protocol": {"name": rp.SYNC, "nodes": 4}}
    dep = registry_load("protocols", rp.SYNC)(config)
    # The driver's deployment is fine, but the shards rebuild it from a config they can't load.
    broken = {**config, "protocol": {"name": "tests.transports.no_such_module:build"}}
    tr = RayTransport({})
    with pytest.raises(RunError, match=r"ray shard \d \(nodes .*\) died during start-up.*"
                                       r"ModuleNotFoundError.*no_such_module"):
        try:
            tr.run(Job(config=broken, deployment=dep, seed=0, until=TIME_LIMIT))
        finally:
            tr.close()


def test_placement_that_can_never_fit_fails_at_once_naming_what_is_missing(
        local_ray: None) -> None:
    config = {"run": {"seed": 0, "rounds": 1}, "protocol": {"name": rp.SYNC, "nodes": 4}}
    # Two shards STRICT_SPREAD on one node: named as such, the remedy is SPREAD, not PACK.
    tr = RayTransport({"shards": 2, "placement": "STRICT_SPREAD", "placement_timeout": 60.0})
    with pytest.raises(PlacementError, match=r"can never be placed: STRICT_SPREAD needs 2 "
                       r"distinct nodes.*CPU [0-9.]+/2 free.* 1 alive node.*placement = 'SPREAD'"):
        _run(tr, config)
    # A GPU on a machine without one: GPU named, free and total, and no PACK advice under PACK.
    tr = RayTransport({"shards": 1, "gpus_per_shard": 0.5, "placement_timeout": 60.0})
    with pytest.raises(PlacementError, match=r"needs GPU 0.5 .*no node has a GPU.*GPU 0/0 "
                       r"free") as err:
        _run(tr, config)
    assert "PACK" not in str(err.value).split("Fix:")[1]
    # Nothing is left reserved: the next run gets both CPUs, two shards by the default rule.
    out = _run(RayTransport({}), config)
    assert out.reason == "finished" and len(out.shards) == 2


def test_placement_that_must_wait_says_so_then_times_out(local_ray: None) -> None:
    from ray.util.placement_group import placement_group, remove_placement_group

    held = placement_group([{"CPU": 2.0}])  # another job holding every CPU
    assert held.wait(timeout_seconds=30)
    try:
        config = {"run": {"seed": 0, "rounds": 1}, "protocol": {"name": rp.SYNC, "nodes": 4}}
        rows: list[dict[str, Any]] = []
        tr = RayTransport({"shards": 2, "placement_timeout": 2.5})
        with pytest.raises(PlacementError, match=r"did not free up within placement_timeout "
                           r"= 2.5 s: CPU 0/2 free"):
            _run(tr, config, rows)
        status = [r["value"] for r in rows if r["name"] == "status"]
        assert status[0].startswith("ray: joined ")  # the Ray this module started
        assert status[1].startswith("ray: waiting for 2 shards of {CPU: 1} (PACK) to fit: "
                                    "CPU 0/2 free")
    finally:
        remove_placement_group(held)


@pytest.mark.parametrize("victim", [0])
def test_killed_shard_recovers_to_the_uninterrupted_model(local_ray: None, victim: int) -> None:
    """SIGKILL of a shard's process mid-run (the server's shard): the run
    replays and ends with the sha of a run never interrupted, each round row once."""
    overrides = ["run.progress=false", "run.rounds=6"]
    want = runner.execute(load(ROOT / "perf/workloads/w1.toml", overrides), quiet=True)
    cfg = load(ROOT / "perf/workloads/w1.toml",
               [*overrides, "transport.kind=ray", "transport.max_restarts=1"])
    transport = RayTransport({k: v for k, v in cfg["transport"].items() if k != "kind"})
    seen: list[int] = []
    rows: list[dict[str, Any]] = []

    def kill_at_round_2(row: dict[str, Any]) -> None:
        if row.get("name") == "round" and row.get("value") == 2 and not seen:
            seen.append(transport.pids[victim])
            os.kill(transport.pids[victim], signal.SIGKILL)

    out = _run(transport, cfg, rows, on_metric=kill_at_round_2)
    assert seen, "the shard was never killed"
    assert out.reason == "finished" and out.result is not None
    assert model_sha256(named_arrays(out.result["model"])) == \
        want.result["final_model_sha256"]
    assert [r["value"] for r in rows if r["name"] == "round"] == [1, 2, 3, 4, 5, 6]
    assert _rounds(rows) == _rounds(want.rows)
    restarts = [r for r in rows if r["name"] == "shard_restart"]
    assert [r["value"] for r in restarts] == [victim]
    assert [s["restarts"] for s in out.shards] == [int(i == victim) for i in range(2)]
    assert seen[0] not in out.pids  # a new process took the dead one's place


# -- a real two-node cluster (last: it replaces the module's Ray) ----------------------------

def test_two_node_cluster_spreads_shards_and_reports_a_lost_node() -> None:
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        config = {"run": {"seed": 4, "rounds": 3},
                  "protocol": {"name": rp.SYNC, "nodes": 6, "dim": 30_000}}
        want = _run(InprocTransport({}), config)
        tr = RayTransport({"address": cluster.address, "shards": 2, "placement": "SPREAD",
                           "cpus_per_shard": 1.0})
        got = _run(tr, config)
        assert got.result is not None and want.result is not None
        np.testing.assert_array_equal(got.result["model"]["x"], want.result["model"]["x"])
        assert len({s["node_id"] for s in got.shards}) == 2
        assert not ray.is_initialized()  # it joined the cluster, so it disconnected after

        # Losing a machine kills the shard on it: the run fails naming that shard.
        ticker = {"run": {"seed": 0, "rounds": 30},
                  "protocol": {"name": rp.TICKER, "nodes": 6, "gap": 0.1}}

        def lose_worker(row: dict[str, Any]) -> None:
            if row["name"] == "round" and row["value"] == 1:
                cluster.remove_node(worker)

        tr = RayTransport({"address": cluster.address, "placement": "SPREAD",
                           "call_timeout": 20.0})
        with pytest.raises(RunError, match=r"ray shard [01] \(nodes [0-5,]+\) died"):
            _run(tr, ticker, on_metric=lose_worker)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_unreachable_cluster_address_fails_with_a_remedy() -> None:
    if ray.is_initialized():
        ray.shutdown()
    config = {"run": {"seed": 0, "rounds": 1}, "protocol": {"name": rp.SYNC, "nodes": 2}}
    tr = RayTransport({"address": "127.0.0.1:9", "call_timeout": 5.0})
    with pytest.raises(RunError, match=r"could not reach .*'127.0.0.1:9'.*Fix: start a head"):
        _run(tr, config)
    assert not ray.is_initialized()


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_any_shard_count_gives_the_inproc_model(local_ray: None, shards: int) -> None:
    # Unequal sample counts, so the weighted mean's order of arrival would show if it leaked.
    def config(kind: str, **transport: Any) -> dict[str, Any]:
        return validate({
            "run": {"seed": 5, "rounds": 3, "progress": False},
            "protocol": {"name": "fedavg", "aggregator": "weighted_mean", "server_opt": "adam",
                         "partial_piece": 5},  # partials in pieces of 5 of 21 sums
            "workload": {"model": "linear", "clients": 9, "samples_per_client": 40,
                         "samples_min": 5, "input_dim": 20, "test_samples": 100},
            "transport": {"kind": kind, **transport}})

    want = runner.execute(config("inproc"), quiet=True)
    got = runner.execute(config("ray", shards=shards, cpus_per_shard=0.5), quiet=True)
    assert got.result["reason"] == "finished" and len(got.result["shards"]) == shards
    # With more than one shard, the other shards' replies came summed (protocols.partials):
    # 9 clients placed round-robin leave 3 or more on every shard but the server's.
    relayed = [row["value"] for row in got.rows if row["name"] == "partials"]
    assert relayed == ([shards - 1] * 3 if shards > 1 else [])
    assert got.result["final_model_sha256"] == want.result["final_model_sha256"]
