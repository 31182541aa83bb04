"""The ray transport's side of a Ray cluster: which cluster to use, joining it (or starting a
local one), what it has, whether the shards' placement can ever fit, and the runtime_env that
ships a user's code to it.

Which cluster (`transport.address`, the same rules as `ray.init` and Ray's CLI):

- `""` (default): the cluster in `RAY_ADDRESS` when that is set (as under `ray job submit` or
  on a node of a `ray start` cluster), else a local Ray that starts and stops with the run.
- `"auto"`: the cluster in `RAY_ADDRESS`, else the one `ray start` started on this machine.
- `"host:port"` (the head's GCS port, 6379 unless `ray start --port` said otherwise) or
  `"ray://host:10001"` (Ray Client): that cluster.
- `"local"`: always a fresh local Ray, whatever `RAY_ADDRESS` says.

Token authentication (Ray >= 2.52; on by default for local clusters from 2.59): fedloom sets no
token itself; Ray reads `RAY_AUTH_MODE=token` and the token from `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, exactly as for `ray.init`. Before joining a
`host:port`, one TCP connect and one authenticated GCS call (a few seconds at most) tell an
unreachable head and a refused token apart, instead of ray.init's 20 s of retries.

A local Ray fedloom starts keeps its files under `transport.temp_dir` (Ray's default /tmp/ray
otherwise) and its dashboard, when `dashboard = true`, on 127.0.0.1. Ray 2.60's own gRPC
servers listen on every interface whatever fedloom asks (Ray replaces a loopback node address
with the machine's own); the token authentication Ray enables for local clusters guards them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from importlib import util as import_util
from pathlib import Path
from typing import Any

import ray

from kernel.api import RunError
from kernel.options import ConfigError

RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "env_vars")
LOG_MODES = ("errors", True, False)
PROBE_TIMEOUT_S = 5.0
DASHBOARD_EXTRA = "pip install 'fedloom[ray-dashboard]' (Ray's dashboard needs ray[default])"


class RayJoinError(RunError):
    """Ray could not be joined or started; the message names the cause and the fix."""


class PlacementError(RunError):
    """The shards' resources can never fit this cluster, or did not free up in time."""


def target(address: str) -> str:
    """The address `ray.init` gets for `transport.address` ("local" for a fresh local Ray)."""
    if address == "local":
        return "local"
    env = os.environ.get("RAY_ADDRESS", "")
    if address in ("", "auto") and env:
        return env
    return address or "local"


def joined_from(address: str) -> str:
    """Where the address came from, for messages: the option or RAY_ADDRESS."""
    if address in ("", "auto") and os.environ.get("RAY_ADDRESS"):
        return f"RAY_ADDRESS={os.environ['RAY_ADDRESS']!r}"
    return f"transport.address = {address!r}"


def auth_mode() -> str:
    """This process's Ray authentication mode as Ray reads it ("token" or "disabled")."""
    return "token" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else "disabled"


def init(opts: Mapping[str, Any], *, runtime_env: Mapping[str, Any] | None = None,
         preload: Sequence[str] = ()) -> tuple[str, bool]:
    """Join or start Ray as `opts` say (with a job-wide `runtime_env`, where given); returns
    (the address given to ray.init, started). A local Ray imports `preload` in each worker it
    prestarts (Ray's `preload_python_modules`), before any task or actor reaches the worker;
    a joined cluster keeps its own setting (`RAY_preload_python_modules` where it started)."""
    address = target(opts["address"])
    log = opts["log_to_driver"]
    kw: dict[str, Any] = {"log_to_driver": log is not False, "logging_level": logging.ERROR}
    if opts["dashboard"]:
        if address != "local":
            raise ConfigError(
                "[transport] dashboard = true starts the dashboard of a local Ray; a cluster "
                f"joined through {joined_from(opts['address'])} has its own (`ray start --head "
                "--include-dashboard true` on the head); the run prints where it is")
        if import_util.find_spec("aiohttp") is None:
            raise ConfigError("[transport] dashboard = true needs Ray's dashboard packages, "
                              f"which are not installed: {DASHBOARD_EXTRA}")
    if address == "local":
        kw.update(address="local", num_cpus=opts["num_cpus"] or os.cpu_count() or 1,
                  include_dashboard=bool(opts["dashboard"]), dashboard_host="127.0.0.1")
        if opts["temp_dir"]:
            kw["_temp_dir"] = str(Path(opts["temp_dir"]).expanduser().resolve())
        if preload:
            kw["_system_config"] = {"preload_python_modules": list(preload)}
    else:
        kw["address"] = address
        probe(address, opts["address"])
    if runtime_env:
        kw["runtime_env"] = dict(runtime_env)
    try:
        ray.init(**kw)
    except Exception as exc:
        raise RayJoinError(explain(exc, address, opts)) from exc
    if log == "errors":
        errors_only()
    return address, address == "local"


def probe(address: str, given: str) -> None:
    """Fail within seconds, naming the cause, when a host:port head is unreachable or refuses
    this process's token (ray.init would retry for 20 s and end with 'Failed to connect')."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto" and "ray://" addresses: Ray resolves them
    where = f"the Ray cluster at {address!r} (from {joined_from(given)})"
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise RayJoinError(
            f"ray transport could not reach {where}: {exc}. Fix: start a head there (`ray "
            f"start --head --port {port}`), correct the address (the head's GCS host:port, "
            "as `ray start --head` prints it), or leave transport.address empty and unset "
            "RAY_ADDRESS for a local Ray") from None
    code = _gcs_call(host, int(port))
    if code == "UNAUTHENTICATED":
        raise RayJoinError(f"ray transport could not join {where}: " + auth_advice())


def _gcs_call(host: str, port: int) -> str | None:
    """One GetClusterId call to the GCS with the token Ray would send; the gRPC status name on
    failure, None on success (or when the probe itself cannot be made)."""
    try:
        import grpc
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            _get_authentication_metadata_tuple,
        )
    except ImportError:
        return None
    try:
        metadata = tuple(_get_authentication_metadata_tuple())
    except Exception:  # no token where Ray looks: send none, the GCS decides
        metadata = ()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                                   request_serializer=None, response_deserializer=None)
        try:
            call(b"", timeout=PROBE_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            status = exc.code() if hasattr(exc, "code") else None
            return status.name if status is not None else "UNKNOWN"
    return None


def auth_advice() -> str:
    """Why a token was refused and what to do, from this process's settings."""
    if auth_mode() != "token":
        return ("the cluster requires token authentication and this process has it off "
                f"(RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', '<unset>')}). Fix: export "
                "RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or in the "
                "file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token); `ray get-auth-token` "
                "on the head prints it")
    source = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
              f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
              if os.environ.get("RAY_AUTH_TOKEN_PATH") else "~/.ray/auth_token")
    return (f"the cluster refused this process's authentication token (read from {source}). "
            "Fix: use the head's token (`ray get-auth-token` on the head prints it) in "
            "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def explain(exc: BaseException, address: str, opts: Mapping[str, Any]) -> str:
    """One message for a failed ray.init: the cause (authentication, version mismatch,
    unreachable, a local start that failed) and its fix."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    low = str(exc).lower()
    if address == "local":
        where = "start a local Ray"
        fix = ("check free space in /dev/shm and in the temp dir "
               f"({opts['temp_dir'] or '/tmp/ray'}; transport.temp_dir moves it), or join a "
               "running cluster with transport.address or RAY_ADDRESS. A stale Ray of your own "
               "can be stopped by its pids (never `ray stop` on a shared machine: it stops "
               "every user's Ray)")
    else:
        where = f"join the Ray cluster at {address!r} (from {joined_from(opts['address'])})"
        fix = ("check that the head is up (`ray status --address ...` there) and the address "
               "is its GCS host:port")
    if "version mismatch" in low or "ray version" in low and "mismatch" in low:
        fix = (f"this process runs Ray {ray.__version__} on Python "
               f"{sys.version.split()[0]}; the cluster must run the same (see the message), "
               "so install matching versions on every node and the driver")
        said = " ".join(str(exc).split())[:600]  # Ray's text spans lines; one line here
        return f"ray transport could not {where}: version mismatch: {said}. Fix: {fix}"
    if ("auth" in low and ("token" in low or "unauthenticated" in low)):
        return f"ray transport could not {where}: {text}; " + auth_advice()
    return f"ray transport could not {where}: {text}. Fix: {fix}"


def errors_only() -> None:
    """Forward only what shards write to stderr (warnings, errors, tracebacks) to this
    terminal, not their stdout; Ray's own switch is all or nothing."""
    with contextlib.suppress(Exception):  # Ray-internal: on failure everything is forwarded
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")

        def stderr_only(data: dict[str, Any]) -> None:
            if data.get("is_err"):
                ray_worker.print_to_stdstream(data, ignore_prefix=False)

        dispatcher.add_handler("ray_print_logs", stderr_only)


def info(address: str, started: bool) -> dict[str, Any]:
    """What result.json records about the cluster: address, how it was reached, nodes, logs,
    dashboard."""
    out: dict[str, Any] = {"address": None, "requested": address, "started": started,
                           "ray_version": ray.__version__, "auth": auth_mode(),
                           "logs": None, "dashboard": None, "nodes": 0}
    with contextlib.suppress(Exception):
        ctx = ray.get_runtime_context()
        out["address"] = ctx.gcs_address
    with contextlib.suppress(Exception):
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        if node is not None:  # a joined node reads the head's dashboard URL from the GCS
            out["logs"] = node.get_logs_dir_path()
            url = getattr(node, "webui_url", None) or getattr(node, "address_info", {}).get(
                "webui_url")
            if url:
                out["dashboard"] = url if "://" in url else f"http://{url}"
    with contextlib.suppress(Exception):
        out["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
    return out


def where_line(where: Mapping[str, Any]) -> str:
    """The line a run shows when Ray is up: the cluster, its dashboard and log folder."""
    how = "started" if where.get("started") else "joined"
    parts = [f"ray: {how} {where.get('address') or where.get('requested')} "
             f"({where.get('nodes', '?')} node(s), auth {where.get('auth')})"]
    if where.get("dashboard"):
        parts.append(f"dashboard {where['dashboard']}")
    if where.get("logs"):
        parts.append(f"logs {where['logs']}")
    return "; ".join(parts)


# -- resources and placement ------------------------------------------------------------------

def alive_nodes() -> list[dict[str, Any]]:
    """Total resources of the cluster's alive nodes (dead ones count for nothing):
    [{"id", "ip", "total": {...}}]."""
    return [{"id": n.get("NodeID", ""), "ip": n.get("NodeManagerAddress", ""),
             "total": {k: float(v) for k, v in n.get("Resources", {}).items()}}
            for n in ray.nodes() if n.get("Alive")]


def default_layout(opts: Mapping[str, Any], n_nodes: int) -> tuple[int, float, float]:
    """(shards, CPUs per shard, GPUs per shard). The documented rule: `cpus_per_shard`
    defaults to 1 (less on a cluster with under one CPU); `shards` defaults to as many as the
    alive nodes' CPUs hold (and their GPUs, when `gpus_per_shard` > 0), counted by each node's
    total so the layout does not depend on what else runs at the moment, at least one and at
    most one per simulated node. Busy resources make the placement wait, not shrink."""
    nodes = alive_nodes()
    gps = float(opts["gpus_per_shard"])
    total_cpu = sum(n["total"].get("CPU", 0.0) for n in nodes)
    cps = float(opts["cpus_per_shard"]) or min(1.0, total_cpu or 1.0)
    shards = int(opts["shards"])
    if not shards:
        bundle = {"CPU": cps} if cps > 0 else {}
        if gps > 0:
            bundle["GPU"] = gps
        fit = sum(_count_fits(n["total"], bundle, n_nodes) for n in nodes) if bundle else n_nodes
        shards = max(1, min(fit, n_nodes))
    return shards, cps, gps


def shortfall(bundle: Mapping[str, float], shards: int, strategy: str,
              nodes: Sequence[Mapping[str, Any]]) -> str | None:
    """Why `shards` bundles can never be placed on these alive nodes by their totals (None when
    they could be, given time)."""
    if not nodes:
        return "the cluster has no alive node"

    def fits(total: Mapping[str, float], need: Mapping[str, float]) -> bool:
        return all(total.get(k, 0.0) + 1e-9 >= v for k, v in need.items())

    missing = [k for k, v in bundle.items() if v > 0
               and max(n["total"].get(k, 0.0) for n in nodes) + 1e-9 < v]
    if missing:
        k = missing[0]
        best = max(n["total"].get(k, 0.0) for n in nodes)
        return (f"one shard needs {k} {bundle[k]:g} and the largest alive node has {k} {best:g}"
                + ("" if best else f" (no node has a {k})"))
    if strategy == "STRICT_PACK":
        need = {k: v * shards for k, v in bundle.items()}
        if not any(fits(n["total"], need) for n in nodes):
            return f"STRICT_PACK needs {fmt(need)} on one node and no alive node has that"
    per_node = [_count_fits(n["total"], bundle, shards) for n in nodes]
    if strategy == "STRICT_SPREAD":
        able = sum(1 for c in per_node if c >= 1)
        if able < shards:
            return (f"STRICT_SPREAD needs {shards} distinct nodes that each fit a shard; "
                    f"{able} alive node(s) do")
    elif sum(per_node) < shards:
        return (f"{plural(shards, 'shard')} of {fmt(bundle)} need more than the alive nodes "
                f"hold in total (room for {sum(per_node)})")
    return None


def _count_fits(total: Mapping[str, float], bundle: Mapping[str, float], cap: int) -> int:
    """How many bundles fit one node's totals (at most `cap`)."""
    counts = [int(total.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min([cap, *counts])


def plural(n: int, word: str) -> str:
    """'1 shard', '2 shards'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt(res: Mapping[str, float]) -> str:
    """{CPU: 1, GPU: 0.5}: resources as messages show them."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def resources_line(nodes: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """'CPU 0/2 free, GPU 0/0 free over 1 alive node(s)' for the resources that matter."""
    free = ray.available_resources()
    parts = []
    for k in keys:
        total = sum(n["total"].get(k, 0.0) for n in nodes)
        parts.append(f"{k} {float(free.get(k, 0.0)):g}/{total:g} free")
    return ", ".join(parts) + f" over {len(nodes)} alive node(s)"


def check_placement(bundle: Mapping[str, float], shards: int, strategy: str) -> None:
    """Raise `PlacementError` at once when the placement can never fit the alive nodes."""
    nodes = alive_nodes()
    why = shortfall(bundle, shards, strategy, nodes)
    if why is None:
        return
    keys = sorted({"CPU", "GPU", *bundle})
    fix = ["lower transport.shards", "cpus_per_shard or gpus_per_shard"]
    if strategy.startswith("STRICT_"):
        fix.append(f"use placement = '{strategy.removeprefix('STRICT_')}' instead of "
                   f"'{strategy}'")
    elif strategy == "SPREAD":
        fix.append("use placement = 'PACK'")
    fix.append("or add nodes with the missing resources")
    raise PlacementError(
        f"ray transport: {plural(shards, 'shard')} of {fmt(bundle)} with placement {strategy} "
        f"can never be placed: {why}; the cluster has {resources_line(nodes, keys)}. Fix: "
        + ", ".join(fix))


# -- code to the cluster ----------------------------------------------------------------------

def named_modules(config: Mapping[str, Any]) -> list[str]:
    """Top-level modules a config names as 'module:attr' (protocol, model, learner, ...)."""
    found: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and ":" in x and "/" not in x and " " not in x:
            mod = x.partition(":")[0]
            if mod and all(p.isidentifier() for p in mod.split(".")):
                found.append(mod)

    for section in ("protocol", "workload"):
        walk(config.get(section, {}))
    return sorted(set(found))


def not_installed(module: str) -> Path | None:
    """The folder to ship for `module` when it is the user's own code (found on sys.path but
    not in an installed distribution's site-packages); None for installed or unknown ones."""
    top = module.split(".")[0]
    try:
        spec = import_util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        paths = list(spec.submodule_search_locations or []) if spec is not None else []
        if not paths:
            return None
        where = Path(paths[0])
    else:
        where = Path(spec.origin)
        if where.name == "__init__.py":
            where = where.parent
    if any(part in ("site-packages", "dist-packages", "runtime_resources")
           for part in where.parts):
        return None  # installed, or already shipped to this Ray worker by a runtime_env
    if where.is_relative_to(Path(sys.prefix)) or where.is_relative_to(Path(sys.base_prefix)):
        return None
    if top in ("kernel", "transports", "protocols", "perf"):
        return None  # fedloom itself: every node must have it installed (docs/ray-cluster.md)
    return where


def user_modules(config: Mapping[str, Any]) -> list[str]:
    """Folders (or files) of the user's own modules a config names, to ship to a cluster."""
    out: list[str] = []
    for mod in named_modules(config):
        where = not_installed(mod)
        if where is not None and str(where) not in out:
            out.append(str(where))
    return out


def runtime_env(given: Mapping[str, Any], config: Mapping[str, Any], *,
                auto: bool) -> dict[str, Any]:
    """The shards' runtime_env: `transport.runtime_env`, plus (when `auto`: the run joined a
    cluster, or its Ray has several nodes) the user's modules the config names that are not
    installed, as py_modules. Local folders and files are uploaded to the cluster here (Ray
    takes them per actor only as URIs)."""
    env: dict[str, Any] = {k: v for k, v in given.items()}
    shipped = list(env.get("py_modules", []))
    if auto:
        shipped += [m for m in user_modules(config) if m not in shipped]
    if shipped:
        env["py_modules"] = shipped
    if not env:
        return env
    try:
        from ray._private import worker as ray_worker
        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
        from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

        node = ray_worker.global_worker.node
        scratch = node.get_runtime_env_dir_path() if node is not None else None
        env = upload_py_modules_if_needed(env, include_gitignore=True, scratch_dir=scratch)
        env = upload_working_dir_if_needed(env, include_gitignore=True, scratch_dir=scratch)
    except Exception as exc:
        raise RunError(f"ray transport could not upload transport.runtime_env "
                       f"{ {k: env[k] for k in env if k != 'env_vars'} } to the cluster: "
                       f"{type(exc).__name__}: {exc}") from exc
    return env


def check_runtime_env(value: Any) -> dict[str, Any]:
    """`[transport] runtime_env` validated: a table of working_dir (a folder), py_modules (a
    list of folders, .py files or installed module names) and env_vars (str -> str)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"[transport] runtime_env = {value!r}; expected a table with "
                          f"{', '.join(RUNTIME_ENV_KEYS)}")
    for key in value:
        if key not in RUNTIME_ENV_KEYS:
            raise ConfigError(f"[transport] runtime_env.{key} is not supported; expected "
                              f"{', '.join(RUNTIME_ENV_KEYS)}")
    out: dict[str, Any] = {}
    wd = value.get("working_dir")
    if wd is not None:
        if not isinstance(wd, str) or not ("://" in wd or Path(wd).expanduser().is_dir()):
            raise ConfigError(f"[transport] runtime_env.working_dir = {wd!r}; expected an "
                              f"existing folder (or a remote URI such as s3://...zip)")
        out["working_dir"] = wd if "://" in wd else str(Path(wd).expanduser().resolve())
    mods = value.get("py_modules")
    if mods is not None:
        if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
            raise ConfigError(f"[transport] runtime_env.py_modules = {mods!r}; expected a "
                              f"list of folders, .py files or URIs")
        resolved = []
        for m in mods:
            p = Path(m).expanduser()
            if "://" in m:
                resolved.append(m)
            elif p.exists():
                resolved.append(str(p.resolve()))
            else:
                raise ConfigError(f"[transport] runtime_env.py_modules entry {m!r} does not "
                                  f"exist; expected a folder, a .py file or a URI")
        out["py_modules"] = resolved
    ev = value.get("env_vars")
    if ev is not None:
        if not isinstance(ev, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in ev.items()):
            raise ConfigError(f"[transport] runtime_env.env_vars = {ev!r}; expected a table "
                              f"of strings to strings")
        out["env_vars"] = dict(ev)
    return out


def wait_line(bundle: Mapping[str, float], shards: int, strategy: str, waited: float,
              timeout: float) -> str:
    """The progress line while a placement waits for resources to free up."""
    nodes = alive_nodes()
    keys = sorted({"CPU", *bundle})
    return (f"ray: waiting for {plural(shards, 'shard')} of {fmt(bundle)} ({strategy}) to "
            f"fit: {resources_line(nodes, keys)}; {waited:.0f}/{timeout:g} s (placement_timeout)")
