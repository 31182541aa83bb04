"""ray: the nodes on a few Ray actors (shards), messages between shards as batched codec frames,
large bodies through the object store; one machine or a cluster (`transport.address`).

The driver starts (or joins) Ray, reserves one placement-group bundle per shard, makes the shard
actors (each rebuilds the deployment from the config), starts every node, then long-polls the
shards for metric rows and their state until one node finishes, a limit passes or a shard dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

import msgpack
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kernel.api import RunError
from kernel.options import ConfigError, options
from kernel.wire.codec import Codec, join
from transports.base import Job, Outcome, Transport, place
from transports.ray_shard import ENDED, ERROR, Shard

DEFAULTS: dict[str, Any] = {
    "kind": "ray",
    "shards": 0,  # 0: min(2, CPUs of the cluster)
    "cpus_per_shard": 0.0,  # 0: min(1, CPUs / shards)
    "gpus_per_shard": 0.0,
    "placement": "PACK",
    "address": "",  # "" starts a local Ray (unless one is initialised); else joins this cluster
    "num_cpus": 0,  # CPUs of a local Ray; 0: this machine's
    "dashboard": False,
    "call_timeout": 60.0,
    "max_restarts": 0,
    "tick": 0.0,  # seconds between flushes of a shard's outbox; 0: after each batch of events
    "inline_threshold": 65536,
    "strict": False,  # accepted for configs shared with inproc; ray always encodes across shards
}
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# How long a shard holds the driver's poll when it has nothing to say.
POLL_S = 1.0


def check_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """The [transport] section for ray, defaults filled in; ConfigError naming a bad key."""
    opts = options("transport", given, DEFAULTS, choices={"placement": STRATEGIES})
    for key, low in (("shards", 0), ("num_cpus", 0), ("max_restarts", 0)):
        if opts[key] < low:
            raise ConfigError(f"[transport] {key} = {opts[key]!r} is not allowed; expected an "
                              f"integer >= {low}")
    for key in ("cpus_per_shard", "gpus_per_shard", "tick"):
        if not opts[key] >= 0:
            raise ConfigError(f"[transport] {key} = {opts[key]!r} is not allowed; expected a "
                              f"number >= 0")
    if not opts["call_timeout"] > 0:
        raise ConfigError(f"[transport] call_timeout = {opts['call_timeout']!r} is not allowed; "
                          f"expected seconds > 0")
    if opts["inline_threshold"] < 0:
        raise ConfigError(f"[transport] inline_threshold = {opts['inline_threshold']!r} is not "
                          f"allowed; expected bytes >= 0")
    if opts["address"] and opts["num_cpus"]:
        raise ConfigError("[transport] num_cpus sizes a local Ray; it cannot be combined with "
                          f"address = {opts['address']!r} (the cluster has its own CPUs)")
    return opts


class RayTransport(Transport):
    """Nodes on `shards` Ray actors with declared resources, placed by a placement group."""

    virtual_clock = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.opts = check_options(options)
        self.actors: list[Any] = []  # the shard actors of the current run, by shard id
        self.shard_nodes: list[list[int]] = []
        self._pg: Any = None
        self._started_ray = False

    # -- set-up -----------------------------------------------------------------------------
    def _ensure_ray(self) -> None:
        if ray.is_initialized():
            return
        o = self.opts
        kw: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR,
                              "include_dashboard": o["dashboard"]}
        if o["address"]:
            kw["address"] = o["address"]
            self._probe(o["address"])
        else:
            # "local" always starts a fresh Ray: without it ray.init attaches to any Ray already
            # running on this machine (RAY_ADDRESS, `ray start`), which is not what was asked.
            kw["address"] = "local"
            kw["num_cpus"] = o["num_cpus"] or os.cpu_count() or 1
        try:
            ray.init(**kw)
        except Exception as exc:
            where = (f"join the Ray cluster at {o['address']!r}" if o["address"]
                     else "start a local Ray")
            remedy = ("check the address (host:port of the head's GCS, or 'auto') and that "
                      "`ray status` works there" if o["address"] else
                      "run `ray stop` to clear a stale Ray, free space in /dev/shm and /tmp, "
                      "or join a running cluster with transport.address")
            raise RunError(f"ray transport could not {where}: {type(exc).__name__}: {exc}. "
                           f"Remedy: {remedy}") from exc
        self._started_ray = True

    def _probe(self, address: str) -> None:
        # ray.init retries an unreachable GCS for minutes; a plain TCP connect says it at once.
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or "://" in address:
            return  # "auto", "ray://...": let Ray resolve it
        timeout = self.opts["call_timeout"]
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as exc:
            raise RunError(
                f"ray transport could not reach the Ray cluster at transport.address = "
                f"{address!r}: {exc}. Remedy: start a head there (`ray start --head --port "
                f"{port}`), fix the address, or leave transport.address empty for a local Ray"
            ) from None

    def _layout(self) -> tuple[int, float, float]:
        o = self.opts
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        shards = o["shards"] or max(1, min(2, int(cpus)))
        cps = o["cpus_per_shard"] or min(1.0, cpus / shards)
        return shards, cps, o["gpus_per_shard"]

    def _reserve(self, shards: int, cps: float, gps: float) -> None:
        bundle = {"CPU": cps} if cps > 0 else {}
        if gps > 0:
            bundle["GPU"] = gps
        strategy = self.opts["placement"]
        self._pg = placement_group([dict(bundle) for _ in range(shards)], strategy=strategy)
        timeout = self.opts["call_timeout"]
        if not self._pg.wait(timeout_seconds=timeout):
            have = ray.cluster_resources()
            raise RunError(
                f"ray transport: {shards} shards of {bundle} with placement {strategy} could "
                f"not be placed within call_timeout = {timeout:g} s; the cluster has "
                f"{ {k: v for k, v in have.items() if k in ('CPU', 'GPU')} } over "
                f"{len(ray.nodes())} node(s). Lower transport.shards or cpus_per_shard, or use "
                f"placement = 'PACK'/'SPREAD' instead of a STRICT_ one"
            )

    def _name(self, shard: int) -> str:
        nodes = self.shard_nodes[shard] if shard < len(self.shard_nodes) else []
        shown = ",".join(str(n) for n in nodes[:12]) + (",..." if len(nodes) > 12 else "")
        return f"ray shard {shard} (nodes {shown})"

    def _call(self, refs: list[Any], what: str, shards: list[int]) -> list[Any]:
        """ray.get with the call deadline; a dead or silent shard becomes a RunError naming it."""
        timeout = self.opts["call_timeout"]
        out = []
        deadline = time.monotonic() + timeout
        for ref, s in zip(refs, shards):
            try:
                out.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0)))
            except GetTimeoutError:
                raise RunError(f"{self._name(s)} did not answer {what} within call_timeout = "
                               f"{timeout:g} s") from None
            except RayActorError as exc:
                raise RunError(f"{self._name(s)} died during {what}: {_short(exc)}") from exc
            except RayError as exc:
                raise RunError(f"{self._name(s)} failed in {what}: {_short(exc)}") from exc
        return out

    # -- the run ----------------------------------------------------------------------------
    def run(self, job: Job) -> Outcome:
        t0 = time.monotonic()
        self._ensure_ray()
        try:
            return self._run(job, t0)
        finally:
            self._release()

    def _run(self, job: Job, t0: float) -> Outcome:
        o = self.opts
        codec = Codec.from_config(job.config.get("codec", {}))
        shards, cps, gps = self._layout()
        where = place(job.deployment.node_ids, shards)
        self.shard_nodes = [sorted(n for n, s in where.items() if s == i) for i in range(shards)]
        self._reserve(shards, cps, gps)
        workload = job.config.get("workload", {})
        # The learners set workload.torch_threads (default 1) themselves; the shard applies the
        # same number before they load, so no shard oversubscribes its CPUs meanwhile.
        threads = int(workload.get("torch_threads", 1) or 1)
        config_frame = bytes(join(Codec.from_config({}).encode_body(_plain(job.config))))
        settings = msgpack.packb({
            "inline_threshold": o["inline_threshold"], "tick": o["tick"],
            "until": job.until, "max_events": job.max_events, "threads": threads,
        })
        self.actors = [
            Shard.options(  # type: ignore[attr-defined]
                num_cpus=cps, num_gpus=gps, max_restarts=o["max_restarts"], max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=i),
            ).remote(i, shards, config_frame, settings)
            for i in range(shards)
        ]
        ids = list(range(shards))
        info = self._call([a.ready.remote() for a in self.actors], "start-up (building the "
                          "deployment)", ids)
        incs = [i[0] for i in info]
        self._call([a.connect.remote(self.actors, incs) for a in self.actors], "connect", ids)
        startup_s = time.monotonic() - t0
        run_t0 = time.monotonic()
        self._call([a.start.remote() for a in self.actors], "on_start", ids)
        self._call([a.go.remote() for a in self.actors], "go", ids)
        restarts = [0] * shards
        state, result, finished_by = self._watch(job, restarts, incs, run_t0)
        clock_s = time.monotonic() - run_t0
        stops = self._call([a.stop.remote(o["call_timeout"] / 2) for a in self.actors], "stop",
                           ids)
        per_shard: list[dict[str, Any]] = []
        errors = []
        for s, frame in enumerate(stops):
            rep = codec.decode_body(frame)
            for row in rep["rows"]:
                job.on_metric(row)
            st = dict(rep["stats"], restarts=restarts[s])
            per_shard.append(st)
            if rep.get("late"):
                errors.append(f"{self._name(s)}: {rep['late']}")
            elif rep.get("error") and state != ERROR:
                errors.append(f"{self._name(s)}: {rep['error']}")
        for st in per_shard:
            job.on_metric({"t": clock_s, "node": -1, "name": "shard_stats",
                           "value": st["shard"], **st})
        if errors:
            raise RunError("; ".join(errors))
        return Outcome(
            result=result,
            finished_by=finished_by,
            reason=state,
            clock_s=clock_s,
            messages=sum(st["messages"] for st in per_shard),
            bytes=sum(st["bytes"] for st in per_shard),
            events=sum(st["events"] for st in per_shard),
            startup_s=startup_s,
            shards=per_shard,
            pids=[int(i[2]) for i in info],
        )

    def _watch(self, job: Job, restarts: list[int], incs: list[int],
               run_t0: float) -> tuple[str, Any, int | None]:
        """Long-poll every shard until one ends the run; returns (reason, result, finished_by)."""
        o = self.opts
        codec = Codec.from_config(job.config.get("codec", {}))
        limit = job.until if job.until is not None else job.config.get("run", {}).get("time_limit")
        deadline = None if limit is None else run_t0 + limit + o["call_timeout"]
        ends: dict[int, str] = {}
        polls = {a.poll.remote(POLL_S): s for s, a in enumerate(self.actors)}
        sent = {s: time.monotonic() for s in range(len(self.actors))}
        while True:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise RunError(f"ray run did not end within run.time_limit = {limit:g} s "
                               f"(+ call_timeout = {o['call_timeout']:g} s); shards ended: "
                               f"{ends or 'none'}")
            wait = POLL_S + o["call_timeout"]
            if deadline is not None:
                wait = min(wait, max(deadline - now, 0.0))
            ready, _ = ray.wait(list(polls), num_returns=1, timeout=wait)
            if not ready:
                late = [s for s, t in sent.items()
                        if s not in ends and time.monotonic() - t > POLL_S + o["call_timeout"]]
                if late:
                    raise RunError(f"{self._name(late[0])} did not answer the driver's poll "
                                   f"within call_timeout = {o['call_timeout']:g} s")
                continue
            for ref in ready:
                s = polls.pop(ref)
                try:
                    head_frame, result_frame = ray.get(ref, timeout=o["call_timeout"])
                except GetTimeoutError:
                    raise RunError(f"{self._name(s)} did not return the driver's poll within "
                                   f"call_timeout = {o['call_timeout']:g} s") from None
                except RayActorError as exc:
                    if restarts[s] >= o["max_restarts"]:
                        raise RunError(f"{self._name(s)} died: {_short(exc)}") from exc
                    restarts[s] += 1
                    self._restart(s, incs, job)
                    polls[self.actors[s].poll.remote(POLL_S)] = s
                    sent[s] = time.monotonic()
                    continue
                except RayError as exc:
                    raise RunError(f"{self._name(s)} failed to answer the driver's poll: "
                                   f"{_short(exc)}") from exc
                head = codec.decode_body(head_frame)
                for row in head["rows"]:
                    job.on_metric(row)
                state = head["state"]
                if state == ERROR:
                    raise RunError(f"{self._name(s)}: {head['error']}")
                if state == "finished":
                    # Copied out of the object store: the result outlives this Ray.
                    result = codec.decode_body(bytearray(result_frame))
                    return state, result, head["finished_by"]
                if state == "max_events":
                    return state, None, None
                if state in ENDED:
                    ends[s] = state
                    if len(ends) == len(self.actors):
                        return "until", None, None
                    continue
                polls[self.actors[s].poll.remote(POLL_S)] = s
                sent[s] = time.monotonic()

    def _restart(self, s: int, incs: list[int], job: Job) -> None:
        """Bring a restarted shard back: its nodes start afresh (like a crash and restart);
        messages in flight to or from it are lost."""
        actor = self.actors[s]
        timeout = self.opts["call_timeout"]
        deadline = time.monotonic() + timeout
        while True:
            # Calls fail fast while Ray restarts the actor: ask again until it is back.
            try:
                info = ray.get(actor.ready.remote(),
                               timeout=max(deadline - time.monotonic(), 0.0))
                break
            except ActorUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise RunError(f"{self._name(s)} did not come back from a restart within "
                                   f"call_timeout = {timeout:g} s: {_short(exc)}") from exc
                time.sleep(0.1)
            except GetTimeoutError:
                raise RunError(f"{self._name(s)} did not come back from a restart within "
                               f"call_timeout = {timeout:g} s") from None
            except RayActorError as exc:
                raise RunError(f"{self._name(s)} died and could not be restarted: "
                               f"{_short(exc)}") from exc
        incs[s] = info[0]
        self._call([actor.connect.remote(self.actors, incs)], "connect after restart", [s])
        self._call([actor.start.remote()], "on_start after restart", [s])
        self._call([actor.go.remote()], "go after restart", [s])
        others = [i for i in range(len(self.actors)) if i != s]
        self._call([self.actors[i].connect.remote(self.actors, incs) for i in others],
                   "connect after restart", others)
        job.on_metric({"t": 0.0, "node": -1, "name": "shard_restart", "value": s,
                       "nodes": self.shard_nodes[s]})

    # -- tear-down --------------------------------------------------------------------------
    def _release(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # already gone: nothing left to release
                ray.kill(a, no_restart=True)
        self.actors = []
        if self._pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
            self._pg = None

    def close(self) -> None:
        self._release()
        if self._started_ray:
            self._started_ray = False
            ray.shutdown()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def _short(exc: BaseException) -> str:
    """One line for an error from Ray: its first line, plus the exception that caused it where
    Ray's text carries a remote traceback (a creation task that raised, for one)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    out = f"{type(exc).__name__}: {first[:300]}"
    cause = next((ln for ln in reversed(lines[1:]) if _RAISED.match(ln)), None)
    if cause is not None:
        out += f" ... {cause[:300]}"
        if cause.startswith(("ModuleNotFoundError", "ImportError")):
            out += (" (shard actors import the protocol themselves: its module must be "
                    "importable on every Ray node; a local Ray puts the driver's working "
                    "directory on the workers' path)")
    return out


def _plain(obj: Any) -> Any:
    """The config as msgpack-able plain values (TOML dates become ISO strings)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return obj

