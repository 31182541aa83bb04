"""inproc: every node in this process, virtual time, the seeded network model; bit-for-bit
deterministic. Strict mode passes every message through the codec, proving it would cross a
process boundary unchanged."""

from __future__ import annotations

from kernel.codec import Codec, body_nbytes
from kernel.config import options
from kernel.host import Host
from transports.base import Job, Outcome, Transport
from transports.netmodel import NetworkModel


class InprocTransport(Transport):
    """One host for all nodes on a virtual clock (options: `strict`)."""

    virtual_clock = True

    def run(self, job: Job) -> Outcome:
        dep = job.deployment
        opts = options("transport", self.options, {"strict": False})
        network = NetworkModel.from_config(job.config.get("network", {}), job.seed, dep.node_ids)
        codec = Codec.from_config(job.config.get("codec", {}))
        strict = codec if opts["strict"] else None
        host = Host(
            dep,
            dep.node_ids,
            seed=job.seed,
            network=network,
            strict=strict,
            on_metric=job.on_metric,
            sizer=body_nbytes,
        )
        host.start()
        reason = "finished" if host.result is not None else host.run(job.until, job.max_events)
        host.stop()
        st = host.stats
        return Outcome(
            result=host.result,
            finished_by=host.finished_by,
            reason=reason,
            clock_s=host.sched.now,
            messages=st["messages"],
            bytes=st["bytes"],
            events=st["events"],
            shards=[dict(st, shard=0, nodes=len(dep.node_ids))],
        )
