"""ray: the nodes on a few Ray actors (shards), messages between shards as batched codec frames,
large bodies through the object store; one machine or a cluster (`transport.address`,
`RAY_ADDRESS`; see transports/ray_cluster.py and docs/ray-cluster.md).

The driver starts (or joins) Ray, reserves one placement-group bundle per shard, makes the shard
actors (each rebuilds the deployment from the config), starts every node, then long-polls the
shards for metric rows and their state until one node finishes, a limit passes or a shard dies.

`transport.preload = true` overlaps start-up: a local Ray started for the run imports, in the
workers it prestarts, the modules the deployment's `prepare` declared (`kernel.api.imports`:
torch for the torch learners) and the shard code, so the shards' heaviest set-up runs while
Ray is still starting. Off by default: it pays only where cores are idle during `ray.init`
(on 2 cores it measured no faster, Ray's own processes already fill them), and every worker
Ray prestarts (one per CPU) imports the modules, shard or not. `RayTransport.phases` times
each part of the path (PHASES), for result.json's `timings` and `fedloom run --timings`.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import msgpack
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kernel.api import RunError, prepare_imports
from kernel.options import ConfigError, options
from kernel.wire.codec import Codec, join
from transports import ray_cluster
from transports.base import Job, Outcome, Transport, place
from transports.ray_cluster import PlacementError, check_runtime_env
from transports.ray_shard import ENDED, ERROR, Shard

DEFAULTS: dict[str, Any] = {
    "kind": "ray",
    "shards": 0,  # 0: as many as the cluster's free CPUs hold (ray_cluster.default_layout)
    "cpus_per_shard": 0.0,  # 0: 1 (less on a cluster with under one CPU)
    "gpus_per_shard": 0.0,
    "placement": "PACK",
    "placement_timeout": 60.0,  # seconds a placement that fits waits for resources to free up
    "address": "",  # "": RAY_ADDRESS, else a local Ray; "auto", "host:port", "ray://..", "local"
    "num_cpus": 0,  # CPUs of a local Ray; 0: this machine's
    "temp_dir": "",  # a local Ray's session files and logs; "": Ray's default (/tmp/ray)
    "dashboard": False,  # a local Ray's dashboard on 127.0.0.1 (extra: fedloom[ray-dashboard])
    "log_to_driver": None,  # "errors" (default): shards' stderr here; true: all; false: none
    "runtime_env": {},  # working_dir, py_modules, env_vars for the shards (see ray_cluster)
    "call_timeout": 60.0,
    "max_restarts": 0,  # per shard: a dead shard is restarted and the run replayed (see below)
    "tick": 0.0,  # seconds between flushes of a shard's outbox; 0: after each batch of events
    "inline_threshold": 65536,
    "strict": False,  # accepted for configs shared with inproc; ray always encodes across shards
    # A local Ray's prestarted workers import the shard code and the modules the deployment's
    # prepare step declared (torch for the torch learners) before the shards reach them.
    "preload": False,
}
# The parts of a ray run's wall time, in order, as `RayTransport.phases` reports them (seconds):
# ray_init_s (joining or starting Ray, incl. the driver's probe), placement_s (reserving the
# placement group), actors_s (shard actors created until every one has built its nodes; of
# which shard_build_s is the slowest shard's own build), connect_s, on_start_s (nodes'
# on_start and the loops started), watch_s (the rounds, until one node finished), stop_s
# (shards stopped, their last rows and statistics), release_s (actors and placement group
# released), shutdown_s (ray.shutdown; 0 on the CLI's fast exit, see close_for_exit).
PHASES = ("ray_init_s", "placement_s", "actors_s", "shard_build_s", "connect_s", "on_start_s",
          "watch_s", "stop_s", "release_s", "shutdown_s")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
LOG_CHOICES = {None: "errors", "errors": "errors", True: True, "all": True, False: False,
               "none": False}
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
    for key in ("call_timeout", "placement_timeout"):
        if not opts[key] > 0:
            raise ConfigError(f"[transport] {key} = {opts[key]!r} is not allowed; expected "
                              f"seconds > 0")
    if opts["inline_threshold"] < 0:
        raise ConfigError(f"[transport] inline_threshold = {opts['inline_threshold']!r} is not "
                          f"allowed; expected bytes >= 0")
    log = opts["log_to_driver"]
    if isinstance(log, bool | str | None) and log in LOG_CHOICES:
        opts["log_to_driver"] = LOG_CHOICES[log]
    else:
        raise ConfigError(f"[transport] log_to_driver = {log!r} is not allowed; choose "
                          f"'errors' (shards' stderr, the default), true (everything) or false")
    opts["runtime_env"] = check_runtime_env(opts["runtime_env"])
    if opts["address"] not in ("", "local") and opts["num_cpus"]:
        raise ConfigError("[transport] num_cpus sizes a local Ray; it cannot be combined with "
                          f"address = {opts['address']!r} (the cluster has its own CPUs)")
    if opts["temp_dir"] and opts["address"] not in ("", "local"):
        raise ConfigError("[transport] temp_dir is where a local Ray keeps its files; a "
                          f"cluster joined at address = {opts['address']!r} has its own "
                          "(`ray start --temp-dir` on its nodes)")
    return opts


class ShardLostError(RunError):
    """A shard died and could not be brought back (no restarts left, or Ray could not)."""


class RayTransport(Transport):
    """Nodes on `shards` Ray actors with declared resources, placed by a placement group.

    Restarts (`max_restarts` >= 1): when a shard dies, Ray restarts its actor, every other
    shard drops its state and rebuilds its nodes, and the whole federation runs again from
    its start, which is the last state every shard agrees on without per-protocol snapshots.
    A synchronous protocol replays exactly, so the run ends with the model of a run that never
    failed; metric rows already forwarded are not forwarded again (counted per node)."""

    virtual_clock = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.opts = check_options(options)
        self.actors: list[Any] = []  # the shard actors of the current run, by shard id
        self.shard_nodes: list[list[int]] = []
        self.pids: list[int] = []  # the shard processes of the current run, by shard id
        self.info: dict[str, Any] = {}
        self._pg: Any = None
        self._own_pg = True
        self._started_ray = False
        self._joined = False  # this run joined a cluster itself (address or RAY_ADDRESS)
        self.phases: dict[str, float] = {}  # see PHASES

    # -- set-up -----------------------------------------------------------------------------
    def _ensure_ray(self, job: Job) -> None:
        if ray.is_initialized():
            self.info = ray_cluster.info("(already initialised)", False)
            return
        if self.opts["num_cpus"] and ray_cluster.target(self.opts["address"]) != "local":
            raise ConfigError(
                f"[transport] num_cpus sizes a local Ray, but this run joins "
                f"{ray_cluster.joined_from(self.opts['address'])}; drop num_cpus or set "
                "address = 'local'")
        preload = _preload(job) if self.opts["preload"] else ()
        address, started = ray_cluster.init(self.opts, preload=preload)
        self._started_ray = True  # ours to disconnect (a joined cluster) or stop (a local Ray)
        self._joined = not started
        self.info = ray_cluster.info(address, started)

    def _reserve(self, job: Job, shards: int, cps: float, gps: float) -> None:
        bundle = {"CPU": cps} if cps > 0 else {}
        if gps > 0:
            bundle["GPU"] = gps
        strategy = self.opts["placement"]
        ray_cluster.check_placement(bundle, shards, strategy)
        self._pg = placement_group([dict(bundle) for _ in range(shards)], strategy=strategy)
        timeout = self.opts["placement_timeout"]
        t0 = time.monotonic()
        said = False
        while not self._pg.wait(timeout_seconds=min(2.0, max(timeout - (time.monotonic() - t0),
                                                                0.0))):
            waited = time.monotonic() - t0
            if waited >= timeout:
                nodes = ray_cluster.alive_nodes()
                raise PlacementError(
                    f"ray transport: {ray_cluster.plural(shards, 'shard')} of "
                    f"{ray_cluster.fmt(bundle)} ({strategy}) fit the cluster "
                    f"but its resources did not free up within placement_timeout = "
                    f"{timeout:g} s: {ray_cluster.resources_line(nodes, sorted({'CPU', *bundle}))}"
                    ". Other jobs hold them: wait, raise placement_timeout, or lower "
                    "transport.shards / cpus_per_shard")
            # Whatever holds the resources may free them; say so rather than look hung.
            line = ray_cluster.wait_line(bundle, shards, strategy, waited, timeout)
            if not said or int(waited) % 10 < 2:
                job.on_metric({"t": 0.0, "node": -1, "name": "status", "value": line})
                said = True

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
        self.phases = dict.fromkeys(PHASES, 0.0)
        self._ensure_ray(job)
        self.phases["ray_init_s"] = time.monotonic() - t0
        job.on_metric({"t": 0.0, "node": -1, "name": "status",
                       "value": ray_cluster.where_line(self.info)})
        try:
            return self._run(job, t0)
        finally:
            self._release()

    def _run(self, job: Job, t0: float) -> Outcome:
        o = self.opts
        codec = Codec.from_config(job.config.get("codec", {}))
        node_ids = job.deployment.node_ids
        inherited = _trial_group()
        if inherited is not None:
            # Inside a Ray Tune trial (`fedloom tune`): its bundles 1.. are this run's shards.
            spec = inherited.bundle_specs[1]
            shards = len(inherited.bundle_specs) - 1
            cps, gps = float(spec.get("CPU", 0.0)), float(spec.get("GPU", 0.0))
        else:
            shards, cps, gps = ray_cluster.default_layout(o, len(node_ids))
        where = place(node_ids, shards, job.deployment.load)
        self.shard_nodes = [sorted(n for n, s in where.items() if s == i) for i in range(shards)]
        t = time.monotonic()
        if inherited is not None:
            self._pg, self._own_pg, first = inherited, False, 1
        else:
            self._reserve(job, shards, cps, gps)
            self._own_pg, first = True, 0
        self.phases["placement_s"] = time.monotonic() - t
        t = time.monotonic()
        workload = job.config.get("workload", {})
        # The learners set workload.torch_threads (default 1) themselves; the shard applies the
        # same number before they load, so no shard oversubscribes its CPUs meanwhile.
        threads = int(workload.get("torch_threads", 1) or 1)
        config_frame = bytes(join(Codec.from_config({}).encode_body(_plain(job.config))))
        settings = msgpack.packb({
            "inline_threshold": o["inline_threshold"], "tick": o["tick"],
            "until": job.until, "max_events": job.max_events, "threads": threads,
        })
        auto = self._joined or len(ray_cluster.alive_nodes()) > 1
        env = ray_cluster.runtime_env(o["runtime_env"], job.config, auto=auto)
        extra: dict[str, Any] = {"runtime_env": env} if env else {}
        self.info.update(shards=shards, cpus_per_shard=cps, gpus_per_shard=gps,
                         runtime_env=env or None)
        self.actors = [
            Shard.options(  # type: ignore[attr-defined]
                num_cpus=cps, num_gpus=gps, max_restarts=o["max_restarts"], max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=first + i), **extra,
            ).remote(i, shards, config_frame, settings)
            for i in range(shards)
        ]
        ids = list(range(shards))
        info = self._call([a.ready.remote() for a in self.actors], "start-up (building the "
                          "deployment)", ids)
        incs = [i[0] for i in info]
        self.pids = [int(i[2]) for i in info]
        ph = self.phases
        ph["actors_s"] = time.monotonic() - t
        ph["shard_build_s"] = max(float(i[4]) for i in info)
        t = time.monotonic()
        self._call([a.connect.remote(self.actors, incs) for a in self.actors], "connect", ids)
        ph["connect_s"] = time.monotonic() - t
        startup_s = time.monotonic() - t0
        run_t0 = time.monotonic()
        self._call([a.start.remote() for a in self.actors], "on_start", ids)
        self._call([a.go.remote() for a in self.actors], "go", ids)
        ph["on_start_s"] = time.monotonic() - run_t0
        restarts = [0] * shards
        rows = ReplayFilter(job.on_metric)
        state, result, finished_by = self._watch(job, rows, restarts, incs, run_t0)
        clock_s = time.monotonic() - run_t0
        ph["watch_s"] = clock_s - ph["on_start_s"]
        t = time.monotonic()
        stops = self._call([a.stop.remote(o["call_timeout"] / 2) for a in self.actors], "stop",
                           ids)
        ph["stop_s"] = time.monotonic() - t
        per_shard: list[dict[str, Any]] = []
        errors = []
        for s, frame in enumerate(stops):
            rep = codec.decode_body(frame)
            for row in rep["rows"]:
                rows(row)
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
            pids=list(self.pids),
            info=dict(self.info),
        )

    def _watch(self, job: Job, rows: ReplayFilter, restarts: list[int], incs: list[int],
               run_t0: float) -> tuple[str, Any, int | None]:
        """Long-poll every shard until one ends the run; returns (reason, result, finished_by).
        A dead shard with restarts left brings on a replay (`_replay`); polls of the previous
        attempt are dropped unread, so no row arrives twice from them."""
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
                if ref not in polls:
                    continue  # a poll of an attempt a replay replaced
                s = polls.pop(ref)
                try:
                    head_frame, result_frame = ray.get(ref, timeout=o["call_timeout"])
                except GetTimeoutError:
                    raise RunError(f"{self._name(s)} did not return the driver's poll within "
                                   f"call_timeout = {o['call_timeout']:g} s") from None
                except RayActorError as exc:
                    self._replay(job, s, exc, restarts, incs, rows)
                    ends.clear()
                    polls = {a.poll.remote(POLL_S): i for i, a in enumerate(self.actors)}
                    sent = {i: time.monotonic() for i in range(len(self.actors))}
                    break
                except RayError as exc:
                    raise RunError(f"{self._name(s)} failed to answer the driver's poll: "
                                   f"{_short(exc)}") from exc
                head = codec.decode_body(head_frame)
                for row in head["rows"]:
                    rows(row)
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

    def _replay(self, job: Job, dead: int, exc: BaseException, restarts: list[int],
                incs: list[int], rows: ReplayFilter) -> None:
        """Shard `dead` died: with restarts left, wait for Ray to restart it, rebuild every
        other shard's nodes, and run the federation again from its start (see the class doc);
        else raise `ShardLostError` at once."""
        o = self.opts
        if restarts[dead] >= o["max_restarts"]:
            budget = (f"max_restarts = {o['max_restarts']}" if o["max_restarts"] else
                      "max_restarts = 0 (set transport.max_restarts >= 1 to restart it and "
                      "replay the run)")
            raise ShardLostError(f"{self._name(dead)} died: {_short(exc)}; {budget}") from exc
        restarts[dead] += 1
        if self._own_pg and self._pg is not None:
            # A lost machine may leave too little to restart on: say so now, not after waiting.
            bundles = list(self._pg.bundle_specs)
            why = ray_cluster.shortfall(bundles[0], len(bundles), o["placement"],
                                        ray_cluster.alive_nodes())
            if why is not None:
                raise ShardLostError(f"{self._name(dead)} died ({_short(exc)}) and cannot be "
                                     f"restarted: {why}") from exc
        n = len(self.actors)
        info: list[Any] = [None] * n
        resets = {i: self.actors[i].reset.remote(o["call_timeout"] / 2)
                  for i in range(n) if i != dead}
        info[dead] = self._await_restart(dead)
        for i, ref in resets.items():
            try:
                info[i] = self._call([ref], "reset for a replay", [i])[0]
            except RunError:
                # Dead too (a lost machine takes several shards): restart it as well.
                if restarts[i] >= o["max_restarts"]:
                    raise ShardLostError(f"{self._name(i)} died too while {self._name(dead)} "
                                         f"was restarted; no restarts left "
                                         f"(max_restarts = {o['max_restarts']})") from None
                restarts[i] += 1
                info[i] = self._await_restart(i)
        incs[:] = [x[0] for x in info]
        self.pids = [int(x[2]) for x in info]
        ids = list(range(n))
        rows.replay()
        self._call([a.connect.remote(self.actors, incs) for a in self.actors],
                   "connect after a restart", ids)
        job.on_metric({"t": 0.0, "node": -1, "name": "shard_restart", "value": dead,
                       "nodes": self.shard_nodes[dead], "replayed_from": 0})
        self._call([a.start.remote() for a in self.actors], "on_start after a restart", ids)
        self._call([a.go.remote() for a in self.actors], "go after a restart", ids)

    def _await_restart(self, s: int) -> Any:
        """The restarted shard's ready info, once Ray has brought its actor back."""
        actor = self.actors[s]
        timeout = self.opts["call_timeout"]
        deadline = time.monotonic() + timeout
        while True:
            # Calls fail fast while Ray restarts the actor: ask again until it is back.
            try:
                return ray.get(actor.ready.remote(),
                               timeout=max(deadline - time.monotonic(), 0.0))
            except ActorUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise ShardLostError(f"{self._name(s)} did not come back from a restart "
                                         f"within call_timeout = {timeout:g} s: "
                                         f"{_short(exc)}") from exc
                time.sleep(0.1)
            except GetTimeoutError:
                raise ShardLostError(f"{self._name(s)} did not come back from a restart "
                                     f"within call_timeout = {timeout:g} s") from None
            except RayActorError as exc:
                raise ShardLostError(f"{self._name(s)} died and Ray could not restart it: "
                                     f"{_short(exc)}") from exc

    # -- tear-down --------------------------------------------------------------------------
    def _release(self) -> None:
        t = time.monotonic()
        for a in self.actors:
            with contextlib.suppress(Exception):  # already gone: nothing left to release
                ray.kill(a, no_restart=True)
        self.actors = []
        if self._pg is not None and self._own_pg:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
        self._pg = None
        self.phases["release_s"] = self.phases.get("release_s", 0.0) + time.monotonic() - t

    def close(self) -> None:
        self._release()
        if self._started_ray:
            self._started_ray = False
            t = time.monotonic()
            ray.shutdown()
            self.phases["shutdown_s"] = time.monotonic() - t

    def close_for_exit(self) -> None:
        """`close` for a process that ends right after (the CLI, once its outputs are
        written): releases the shards and the placement group but leaves Ray up. A local
        Ray's processes share this process's fate (Ray starts them so that the kernel, or
        Ray's reaper, ends them when their parent exits), and a joined cluster ends the
        job of a driver that exits, so the second or more of ray.shutdown's graceful waits
        buys nothing. Ray's own atexit hook still shuts down a process that does not exit
        at once."""
        self._release()


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
                    "importable on every Ray node: install it there, or name it in "
                    "transport.runtime_env.py_modules; docs/ray-cluster.md)")
    return out


def _trial_group() -> Any:
    """The placement group this process runs in when it is a Ray Tune trial that reserved a
    bundle for itself and one per shard (None otherwise)."""
    if not ray.is_initialized() or "ray.tune" not in sys.modules:
        return None  # a trial has imported Tune already; nobody else pays for importing it
    with contextlib.suppress(Exception):
        from ray import tune

        tune.get_context().get_trial_id()  # raises or is None outside a trial
        pg = ray.util.get_current_placement_group()
        if pg is not None and len(pg.bundle_specs) >= 2:
            return pg
    return None


class ReplayFilter:
    """Forwards metric rows to the run, each once across replays: a replay re-emits a node's
    first rows in the same order, so the k-th row of a node goes on only when no attempt
    forwarded k rows of that node before; a node's "round" rows go on once per round."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.forwarded: dict[int, int] = {}
        self.seen: dict[int, int] = {}
        self.rounds: set[tuple[int, Any]] = set()

    def replay(self) -> None:
        """A new attempt starts: count its rows from zero."""
        self.seen = {}

    def __call__(self, row: dict[str, Any]) -> None:
        node = row.get("node")
        if isinstance(node, int) and node >= 0:
            k = self.seen.get(node, 0) + 1
            self.seen[node] = k
            if k <= self.forwarded.get(node, 0):
                return
            self.forwarded[node] = k
            if row.get("name") == "round":
                key = (node, _hashable(row.get("value")))
                if key in self.rounds:
                    return
                self.rounds.add(key)
        self.sink(row)


def _preload(job: Job) -> tuple[str, ...]:
    """What a local Ray's prestarted workers import before the shards reach them: the modules
    the deployment's prepare step declared, the shard code, and the protocol's module when it
    ships with fedloom (a user's module may not be importable before the job's paths are)."""
    mods = [*prepare_imports(job.deployment), Shard.__module__]
    proto = getattr(job.deployment.make_node, "__module__", None)
    if isinstance(proto, str) and proto.split(".")[0] in ("kernel", "protocols", "transports"):
        mods.append(proto)
    return tuple(dict.fromkeys(mods))


def _hashable(x: Any) -> Any:
    return x if isinstance(x, int | float | str | bool | None) else repr(x)


def _plain(obj: Any) -> Any:
    """The config as msgpack-able plain values (TOML dates become ISO strings)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return obj

