"""The abstract transport: place nodes on shards, carry messages between them, report failures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel.api import Deployment


@dataclass
class Job:
    """One run as a transport sees it: the config (enough to rebuild everything in another
    process), the deployment already built here, limits and where metric rows go."""

    config: Mapping[str, Any]
    deployment: Deployment
    seed: int
    # Virtual seconds on inproc, wall seconds elsewhere; None runs until a node finishes.
    until: float | None = None
    max_events: int | None = None
    on_metric: Callable[[dict[str, Any]], None] = lambda row: None


@dataclass
class Outcome:
    """What a transport reports when a run ends."""

    result: Mapping[str, Any] | None
    finished_by: int | None
    reason: str  # "finished", "idle", "until" or "max_events"
    clock_s: float  # virtual seconds on inproc, wall seconds of the run loop elsewhere
    messages: int
    bytes: int
    events: int
    startup_s: float = 0.0
    shards: list[dict[str, Any]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # processes the transport started


class Transport(ABC):
    """Carries one run's messages; `transport.kind` in a config picks the implementation."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    @abstractmethod
    def run(self, job: Job) -> Outcome:
        """Run `job` to its end and report; raise `RunError` naming any dead shard or peer."""

    def close(self) -> None:
        """Release processes, actors and sockets (called even when `run` raised)."""


def place(node_ids: Sequence[int], shards: int) -> dict[int, int]:
    """Round-robin placement by sorted node id: shard loads differ by at most one node."""
    if shards < 1:
        raise ValueError(f"transport.shards must be >= 1, got {shards}")
    return {node: i % shards for i, node in enumerate(sorted(node_ids))}
