"""SCAFFOLD, FedNova and FedDyn (and FedYogi) give the model inproc gives on real gRPC
shards and on Ray: client state lives on the shards, the server's in its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kernel.run import runner

LINEAR = {"model": "linear", "clients": 6, "input_dim": 12, "classes": 3,
          "samples_per_client": 30, "samples_min": 8, "batch_size": 8, "test_samples": 60}


def config(kind: str, protocol: dict[str, Any]) -> dict[str, Any]:
    return {"run": {"seed": 3, "rounds": 3, "progress": False},
            "transport": {"kind": kind, **({"shards": 2} if kind != "inproc" else {})},
            "protocol": {"clients_per_round": 4, **protocol}, "workload": LINEAR}


def same_as_inproc(kind: str, protocol: dict[str, Any]) -> None:
    ref = runner.run(config("inproc", protocol), quiet=True)
    got = runner.run(config(kind, protocol), quiet=True)
    assert got["reason"] == ref["reason"] == "finished"
    assert got["final_model_sha256"] == ref["final_model_sha256"] is not None
    assert got["messages"] == ref["messages"]
    assert got["test_accuracy"] == ref["test_accuracy"]


@pytest.mark.grpc
@pytest.mark.parametrize("protocol", [
    {"name": "scaffold"},
    {"name": "fednova", "mu": 0.1},
    {"name": "feddyn", "alpha": 0.1},
    {"name": "fedavg", "server_opt": "yogi"},
], ids=lambda p: p["name"])
def test_grpc_gives_the_inproc_model(protocol: dict[str, Any]) -> None:
    same_as_inproc("grpc", protocol)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for these tests (the transport reuses it)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("protocol", [
    {"name": "scaffold"}, {"name": "fednova"}, {"name": "feddyn", "alpha": 0.1},
], ids=lambda p: p["name"])
def test_ray_gives_the_inproc_model(local_ray: None, protocol: dict[str, Any]) -> None:
    same_as_inproc("ray", protocol)
