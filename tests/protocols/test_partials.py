"""Shard-local partial sums (protocols.partials) on inproc with `transport.shards`: the model
is the same bits as one shard's, every reply the server counts is summed exactly once, lost,
late and duplicated replies included; the switch and its deadline are validated."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.options import ConfigError
from protocols import aggregators, common, fedavg
from protocols.fedavg import build, deploy
from transports.base import Job
from transports.inproc import InprocTransport

LINEAR = {"model": "linear", "input_dim": 16, "classes": 4, "samples_per_client": 24,
          "samples_min": 5, "batch_size": 8, "lr": 0.1, "test_samples": 64}


def config(shards: int, clients: int = 10, rounds: int = 3, seed: int = 0,
           network: dict[str, Any] | None = None, **protocol: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run": {"seed": seed, "rounds": rounds},
        "transport": {"kind": "inproc", "shards": shards},
        "protocol": {"name": "fedavg", **protocol},
        "workload": dict(LINEAR, clients=clients),
    }
    if network is not None:
        cfg["network"] = network
    return cfg


def run(cfg: dict[str, Any], dep: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    job = Job(config=cfg, deployment=dep or build(cfg), seed=cfg["run"]["seed"], until=1e6,
              on_metric=rows.append)
    outcome = InprocTransport({"strict": True, "shards": cfg["transport"]["shards"]}).run(job)
    assert outcome.reason == "finished", outcome
    assert outcome.result is not None
    return dict(outcome.result), rows


def merged(rows: list[dict[str, Any]]) -> int:
    return sum(r["value"] for r in rows if r["name"] == "partials")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), shards=st.integers(2, 4), clients=st.integers(6, 14),
       jitter=st.floats(0.0, 1.0), duplicate=st.floats(0.0, 0.6),
       aggregator=st.sampled_from(["weighted_mean", "mean"]), piece=st.sampled_from([5, 68]))
def test_any_shard_count_gives_one_shards_model(seed, shards, clients, jitter, duplicate,
                                               aggregator, piece):
    """Every reply arrives (in an order the jitter picks, some twice; partials whole or in
    pieces that overtake each other): with relays summing each other shard's replies the
    model is the bits one shard gives, and partials were sent."""
    net = {"latency": {"kind": "uniform", "low": 0.0, "high": 0.01 + jitter},
           "duplicate": duplicate}
    one, _ = run(config(1, clients, seed=seed, network=net, aggregator=aggregator))
    many, rows = run(config(shards, clients, seed=seed, network=net, aggregator=aggregator,
                            partial_piece=piece))
    assert common.digest(many["model"]) == common.digest(one["model"])
    # Round-robin puts clients // shards or more on each shard: relays where that is >= 3.
    if clients // shards >= 3:
        assert merged(rows) == 3 * (shards - 1)
    dups = [r for r in rows if r["name"] == "duplicate"]
    assert all(r["round"] == r["current"] for r in dups)


class _Client(fedavg.Client):
    """Records what each client replied, so the server can check its sum against it."""

    replied: dict[tuple[int, int], tuple[int, dict[str, np.ndarray]]] = {}

    def local(self, client: int, msg: Any, rng: np.random.Generator) -> dict[str, Any]:
        body = super().local(client, msg, rng)
        self.replied[(client + 1, msg.round)] = (body["n_samples"], common.copy(body["model"]))
        return body


class _Server(fedavg.Server):
    """Checks, at each round's end, that the round's exact sum is the gathered mean of the
    replies its Gather counted: each once, whichever way it came."""

    checked: list[int] = []
    waited: list[bool] = []  # per aggregated round: did its deadline wait for pieces?

    def _streamed(self) -> dict[str, np.ndarray]:
        assert self.acc is not None
        got = sorted(self.gather.replies)
        assert len(self.acc.weights) == len(got)  # nothing summed twice, nothing missing
        items = [(_Client.replied[(src, self.round)][0] if self.weighted else 1.0,
                  _Client.replied[(src, self.round)][1]) for src in got]
        want = (aggregators.weighted_mean if self.weighted else aggregators.mean)(items)
        mean = self.acc.mean(self.weighted)
        assert common.digest(mean) == common.digest(want), (self.round, got)
        self.checked.append(len(got))
        self.waited.append(self.closing)
        return super()._streamed()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), shards=st.integers(2, 4),
       loss=st.just(0.0) | st.floats(0.0, 0.4),
       duplicate=st.floats(0.0, 0.5), high=st.floats(0.05, 1.0),
       relay_share=st.floats(0.1, 0.95),
       crash=st.none() | st.tuples(st.integers(1, 12), st.floats(0.0, 3.0), st.floats(0.1, 2.0)),
       piece=st.sampled_from([7, 68]))
def test_partials_sum_exactly_what_the_server_counts(seed, shards, loss, duplicate, high,
                                                      relay_share, crash, piece):
    """Lost, late and duplicated replies, relay and server deadlines, a client (maybe a relay)
    that crashes and restarts, partials in pieces (where nothing is lost) that the deadline
    may cut: whatever the server's Gather counted in an aggregated round is what its sum
    holds, each reply once, the same bits as the gathered mean of exactly those replies."""
    checked_run(seed, shards, loss, duplicate, high, relay_share, crash, piece)


def checked_run(seed: int, shards: int, loss: float, duplicate: float, high: float,
                relay_share: float, crash: tuple[int, float, float] | None = None,
                piece: int = 1 << 16) -> list[dict[str, Any]]:
    net: dict[str, Any] = {"latency": {"kind": "uniform", "low": 0.0, "high": high},
                           "loss": loss, "duplicate": duplicate}
    if crash is not None:
        node, at, down = crash
        net["crashes"] = [{"node": node, "at": at, "restart": at + down}]
    cfg = config(shards, 12, rounds=4, seed=seed, network=net, round_timeout=1.0,
                 partial_timeout=relay_share, server_opt="none", partial_piece=piece)
    _Client.replied, _Server.checked, _Server.waited = {}, [], []
    dep = deploy(cfg, "fedavg", server_cls=_Server, client_cls=_Client)
    _, rows = run(cfg, dep)
    done = [r for r in rows if r["name"] == "round"]
    assert len(done) == 4
    assert _Server.checked == [r["clients"] for r in done if r["aggregated"]]
    return rows


def test_a_lossy_run_takes_every_path():
    """One run where partials, late replies (forwarded or in a late partial) and duplicates
    (summed once, the second copy a `seen` note) all happen, and the sums still check out."""
    rows = checked_run(seed=0, shards=3, loss=0.1, duplicate=0.3, high=0.4, relay_share=0.5)
    names = [r["name"] for r in rows]
    assert merged(rows) >= 4 and names.count("late") >= 1 and names.count("duplicate") >= 10


def test_a_deadline_between_pieces_waits_for_the_rest():
    """Partials in pieces of 7 sums with latencies near the deadline: rounds whose deadline
    fell between two pieces of a partial wait for the rest, and still sum what they count."""
    rows = checked_run(seed=0, shards=3, loss=0.0, duplicate=0.2, high=0.8, relay_share=0.6,
                       piece=7)
    assert merged(rows) >= 4 and any(_Server.waited)


def test_one_shard_and_the_switch_off_send_no_partials():
    base, _ = run(config(1))
    on, rows_on = run(config(2))
    off, rows_off = run(config(2, shard_partials=False))
    assert merged(rows_on) == 3 and merged(rows_off) == 0
    assert common.digest(base["model"]) == common.digest(on["model"]) \
        == common.digest(off["model"])
    # Only a streaming mean relays: median gathers every reply at the server.
    _, rows_median = run(config(2, aggregator="median"))
    assert merged(rows_median) == 0


def test_bad_partial_options_name_the_key():
    with pytest.raises(ConfigError, match=r"\[protocol\] shard_partials = 'yes'"):
        build(config(2, shard_partials="yes"))
    with pytest.raises(ConfigError, match=r"\[protocol\] partial_timeout = 2.*below round_timeout"):
        build(config(2, round_timeout=1.0, partial_timeout=2.0))
    with pytest.raises(ConfigError, match=r"\[protocol\] partial_timeout = -1"):
        build(config(2, partial_timeout=-1))
    with pytest.raises(ConfigError, match=r"\[protocol\] partial_piece = -5"):
        build(config(2, partial_piece=-5))
    with pytest.raises(ConfigError, match=r"\[protocol\] partial_piece = 0.5"):
        build(config(2, partial_piece=0.5))
    cfg = config(0)
    with pytest.raises(ConfigError, match=r"\[transport\] shards = 0"):
        run(cfg)
