"""The abstract transport: place nodes on shards, carry messages between them, report failures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from kernel.placement import place
from kernel.run.job import Job, Outcome

__all__ = ["Job", "Outcome", "Transport", "place"]


class Transport(ABC):
    """Carries one run's messages; `transport.kind` in a config picks the implementation."""

    # True when `Outcome.clock_s` is virtual time (inproc), False for the wall clock.
    virtual_clock: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    @abstractmethod
    def run(self, job: Job) -> Outcome:
        """Run `job` to its end and report; raise `RunError` naming any dead shard or peer."""

    def close(self) -> None:  # noqa: B027 - most transports have nothing to release
        """Release processes, actors and sockets (called even when `run` raised)."""
