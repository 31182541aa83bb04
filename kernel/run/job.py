"""A run as a transport receives it, and what the transport reports back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kernel.api import Deployment

if TYPE_CHECKING:
    from kernel.run.checkpoint import CheckpointPlan


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
    # Checkpoints and resuming (inproc only: a transport without `checkpoints = True` never
    # gets one); None runs without.
    checkpoint: CheckpointPlan | None = None


@dataclass
class Outcome:
    """What a transport reports when a run ends."""

    result: Mapping[str, Any] | None
    finished_by: int | None
    reason: str  # "finished", "idle", "until", "max_events" or "interrupted" (Ctrl-C)
    clock_s: float  # virtual seconds on inproc, wall seconds of the run loop elsewhere
    messages: int
    bytes: int
    events: int
    startup_s: float = 0.0
    shards: list[dict[str, Any]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # processes the transport started
    # Where the run ran, for result.json's "transport_info" (Ray: the cluster address joined
    # or started, its log folder and dashboard); plain JSON values.
    info: dict[str, Any] = field(default_factory=dict)
