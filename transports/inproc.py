"""inproc: every node in this process, virtual time, the seeded network model; bit-for-bit
deterministic. Strict mode passes every message through the codec, proving it would cross a
process boundary unchanged.

`transport.shards` (default 1): how many shards protocols are told the nodes are placed on
(`ctx.shards`, `ctx.shard_of`, placed as ray and grpc place them). Every node still runs here;
it lets a protocol's per-shard behaviour (FedAvg's shard-local partial sums) run under the
network model, deterministically.

Checkpoints (`job.checkpoint`): after the event that emits a "round" row due for one (or
after Ctrl-C), the host pauses between events, the whole state is saved, and the loop goes on
(or, interrupted, stops with reason "interrupted"). A resumed job restores a fresh host from
the checkpoint instead of starting the nodes, and goes on exactly where the saved run was.
"""

from __future__ import annotations

from typing import Any

from kernel.host import Host
from kernel.options import ConfigError, options
from kernel.placement import Placement
from kernel.run import checkpoint
from kernel.wire.codec import Codec, body_nbytes
from transports.base import Job, Outcome, Transport
from transports.netmodel import NetworkModel


class InprocTransport(Transport):
    """One host for all nodes on a virtual clock (options: `strict`)."""

    virtual_clock = True
    checkpoints = True

    def run(self, job: Job) -> Outcome:
        dep = job.deployment
        opts = options("transport", self.options, {"strict": False, "shards": 1})
        if opts["shards"] < 1:
            raise ConfigError(f"[transport] shards = {opts['shards']!r}; expected an integer "
                              f">= 1 (shards protocols are told of; inproc runs them all here)")
        network = NetworkModel.from_config(job.config.get("network", {}), job.seed, dep.node_ids)
        codec = Codec.from_config(job.config.get("codec", {}))
        # Lossy stages must reach every message, or inproc would differ from ray and grpc.
        strict = codec if opts["strict"] or codec.lossy else None
        plan = job.checkpoint
        on_metric = job.on_metric
        if plan is not None and plan.every:
            emit = job.on_metric

            def on_metric(row: dict[str, Any]) -> None:
                # Only metric rows look at the checkpoint schedule: the event loop does not.
                emit(row)
                if plan.due(row):
                    host.request_pause()

        if codec.lossy:
            inner_metric = on_metric

            def on_metric(row: dict[str, Any]) -> None:
                inner_metric(row)
                if row.get("name") == "round":
                    # Bytes so far, in all and per stage: a row of its own, so that "round"
                    # rows stay the same on every transport.
                    inner_metric({"t": row["t"], "node": row["node"], "name": "wire",
                                  "value": row["value"], "bytes": host.stats["bytes"],
                                  **codec.stats})

        host = Host(
            dep,
            dep.node_ids,
            seed=job.seed,
            network=network,
            strict=strict,
            on_metric=on_metric,
            sizer=body_nbytes,
            placement=Placement.of(dep.node_ids, min(opts["shards"], len(dep.node_ids))),
        )
        if plan is not None and plan.resume is not None:
            checkpoint.restore(host, network, plan.resume.state, plan.fresh())
        else:
            host.start()
        reason = "finished" if host.result is not None else ""
        if plan is not None:
            plan.attach(host.request_pause)
        try:
            while not reason:
                left = None if job.max_events is None else job.max_events - host.stats["events"]
                reason = host.run(job.until, left)
                if reason == "paused" and plan is not None:
                    plan.take(host, network)
                    reason = "interrupted" if plan.interrupted else ""
                elif reason == "paused":
                    reason = ""
        finally:
            if plan is not None:
                plan.attach(None)
        if reason != "interrupted":
            host.stop()
        st = host.stats
        return Outcome(
            result=host.result if reason != "interrupted" else None,
            finished_by=host.finished_by,
            reason=reason,
            clock_s=host.sched.now,
            messages=st["messages"],
            bytes=st["bytes"],
            events=st["events"],
            shards=[dict(st, shard=0, nodes=len(dep.node_ids),
                         **({"codec": codec.stats} if codec.lossy else {}))],
        )
