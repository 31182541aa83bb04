"""The seeded network model inproc runs in virtual time: latency, bandwidth, loss, duplication,
partitions, node crashes and restarts, and a compute model for stragglers.

Config, the `[network]` table (every key optional; the defaults ask for nothing, and then
`NetworkModel.from_config` returns None so inproc keeps its fast path)::

    [network]
    latency = 0.0        # seconds, constant; or a table, see [network.latency]
    bandwidth = 0.0      # bytes/s of every link; 0 = unlimited. Transfer time = nbytes / bandwidth
    queueing = "link"    # how transfers share bandwidth: "link" (each directed link is a FIFO pipe:
                         # a transfer starts when the previous one on the same link ended),
                         # "sender" (one pipe per sender, shared by all its links), "none"
    loss = 0.0           # probability in [0, 1] that a message is lost
    duplicate = 0.0      # probability in [0, 1] that a message arrives twice (the copy draws its
                         # own latency; both share one transfer)

    [network.latency]    # instead of a number
    kind = "constant"    # "constant" | "uniform" | "normal" | "lognormal"
    value = 0.0          # constant: the latency
    low = 0.0            # uniform: latency uniform in [low, high]
    high = 0.0
    mean = 0.0           # normal: mean >= 0 and std; negative draws are drawn again
    std = 0.0            #   (a normal truncated at 0)
    mu = 0.0             # lognormal: exp(mu + sigma * Z), Z standard normal
    sigma = 0.0          # Only the keys of the chosen kind may be given.

    [[network.links]]    # per-link overrides, applied in order (a later entry wins, key by key)
    src = [0]            # int or list of ints; omitted = every node
    dst = [1, 2]         # int or list of ints; omitted = every node
    symmetric = false    # also apply to the links dst -> src
    latency = 0.05       # any of latency (number or table), bandwidth, loss, duplicate
    bandwidth = 1e6

    [[network.partitions]]
    start = 0.0          # the partition holds during [start, end) in virtual seconds
    end = inf
    groups = [[0, 1], [2, 3]]   # nodes named in no group form one more group together

    [[network.crashes]]
    node = 3             # int or list of ints
    at = 1.0             # crash time
    restart = inf        # restart time (> at); inf = never. A node's down windows may not overlap

    [network.compute]    # virtual seconds of ctx.compute(work, label)
    per_unit = 0.0       # seconds per unit of work
    labels = {}          # label -> seconds per unit, instead of per_unit for that label
    spread = "none"      # per-node speed factor, drawn once per node: "none" (1), "uniform",
    low = 1.0            #   uniform factor in [low, high]
    high = 1.0
    sigma = 0.0          #   "lognormal": factor exp(sigma * Z) (median 1)
    stragglers = 0.0     # fraction of nodes, drawn once, whose factor is also multiplied by
    straggler_factor = 1.0   # this
    factors = {}         # node id (as a string key) -> factor, replacing the drawn one
    jitter = 0.0         # per call: seconds *= exp(jitter * Z)

    compute_time(node, work, label) = work * labels.get(label, per_unit) * factor[node] [* jitter]

Semantics:
- A message departs at `depart` (its sender's time, after any computation of the sender). Its
  transfer starts then or when its pipe frees up (see queueing), takes nbytes / bandwidth, and
  it arrives one latency draw after the transfer ends. A lost message still used its pipe.
  Random latencies can reorder messages on a link. nbytes is what the host measured: the
  encoded size in strict mode, else its sizer's estimate (inproc: kernel.wire.codec.body_nbytes).
- Nothing crosses a partition: a message between nodes of different groups is dropped when its
  time in flight, [depart, arrival], meets the partition's window [start, end) at all; that is,
  when depart < end and arrival >= start. Each copy of a duplicated message is judged alone.
- Crashes and restarts come out of `node_events()`; the host carries them out (a down node runs
  nothing, messages reaching it are dropped, a restart calls a fresh instance's on_start).

Randomness: per-node compute factors come from `default_rng([seed, TAG, 0])`, drawn at
construction in sorted node order; everything per message or per computation comes from
`default_rng([seed, TAG, 1])`, drawn in blocks and consumed strictly in call order. The host
calls the model in event order, so a run replays exactly, in any process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kernel.options import ConfigError, options

# Separates this model's random streams from the nodes' (seeded [seed, node id]).
TAG = 0x6E65746D  # "netm"
_BLOCK = 1024
_INF = math.inf

LATENCY_PARAMS: dict[str, dict[str, float]] = {
    "constant": {"value": 0.0},
    "uniform": {"low": 0.0, "high": 0.0},
    "normal": {"mean": 0.0, "std": 0.0},
    "lognormal": {"mu": 0.0, "sigma": 0.0},
}
TOP_DEFAULTS: dict[str, Any] = {
    "latency": None, "bandwidth": 0.0, "queueing": "link", "loss": 0.0, "duplicate": 0.0,
    "links": [], "partitions": [], "crashes": [], "compute": {},
}
QUEUEING = ("link", "sender", "none")
SPREADS = ("none", "uniform", "lognormal")
LINK_DEFAULTS: dict[str, Any] = {
    "src": None, "dst": None, "symmetric": False,
    "latency": None, "bandwidth": None, "loss": None, "duplicate": None,
}
PARTITION_DEFAULTS: dict[str, Any] = {"start": 0.0, "end": _INF, "groups": []}
CRASH_DEFAULTS: dict[str, Any] = {"node": None, "at": 0.0, "restart": _INF}
COMPUTE_DEFAULTS: dict[str, Any] = {
    "per_unit": 0.0, "labels": {}, "spread": "none", "low": 1.0, "high": 1.0, "sigma": 0.0,
    "stragglers": 0.0, "straggler_factor": 1.0, "factors": {}, "jitter": 0.0,
}


class _Stream:
    """Uniform and standard-normal draws from one generator, in blocks, in call order."""

    __slots__ = ("_gen", "_u", "_ui", "_z", "_zi")

    def __init__(self, gen: np.random.Generator) -> None:
        self._gen = gen
        self._u: list[float] = []
        self._ui = 0
        self._z: list[float] = []
        self._zi = 0

    def uniform(self) -> float:
        i = self._ui
        if i == len(self._u):
            self._u = self._gen.random(_BLOCK).tolist()
            i = 0
        self._ui = i + 1
        return self._u[i]

    def normal(self) -> float:
        i = self._zi
        if i == len(self._z):
            self._z = self._gen.standard_normal(_BLOCK).tolist()
            i = 0
        self._zi = i + 1
        return self._z[i]


def _latency_sampler(
    spec: Mapping[str, Any], rs: _Stream
) -> tuple[float | None, Callable[[], float]]:
    """(the constant, or None) and a function drawing one latency."""
    kind = spec["kind"]
    if kind == "constant":
        c = spec["value"]
        return c, lambda: c
    if kind == "uniform":
        lo, width = spec["low"], spec["high"] - spec["low"]
        return None, lambda: lo + width * rs.uniform()
    if kind == "normal":
        mean, std = spec["mean"], spec["std"]

        def normal() -> float:
            # mean >= 0, so at least half the draws are kept.
            while True:
                x = mean + std * rs.normal()
                if x >= 0.0:
                    return x

        return None, normal
    mu, sigma = spec["mu"], spec["sigma"]
    return None, lambda: math.exp(mu + sigma * rs.normal())


class _Link:
    """The effective parameters of one directed link."""

    __slots__ = ("constant", "latency", "bandwidth", "loss", "duplicate")

    def __init__(self, params: Mapping[str, Any], rs: _Stream) -> None:
        self.constant, self.latency = _latency_sampler(params["latency"], rs)
        self.bandwidth: float = params["bandwidth"]
        self.loss: float = params["loss"]
        self.duplicate: float = params["duplicate"]


class NetworkModel:
    """A seeded network in virtual time; implements `kernel.api.Network` (see module doc)."""

    def __init__(self, config: Mapping[str, Any], seed: int, node_ids: Sequence[int]) -> None:
        """`config` is a validated `[network]` table (see `validate`)."""
        self.config = config
        self.node_ids = sorted(node_ids)
        self._rs = _Stream(np.random.default_rng([seed, TAG, 1]))
        self._link_params = {k: config[k] for k in ("latency", "bandwidth", "loss", "duplicate")}
        self._default = _Link(self._link_params, self._rs)
        self._rules: list[dict[str, Any]] = config["links"]
        self._links: dict[tuple[int, int], _Link] = {}
        self._queueing = config["queueing"]
        self._free: dict[Any, float] = {}
        self._partitions = [
            (p["start"], p["end"], {n: g for g, grp in enumerate(p["groups"]) for n in grp})
            for p in config["partitions"]
        ]
        # The commonest model, constant latency on every link, answers without any draw.
        d = self._default
        self._plain = (
            d.constant is not None and not d.bandwidth and not d.loss and not d.duplicate
            and not self._rules and not self._partitions
        )
        self._plain_latency = d.constant or 0.0
        comp = config["compute"]
        self._per_unit: float = comp["per_unit"]
        self._labels: dict[str, float] = comp["labels"]
        self._jitter: float = comp["jitter"]
        self.factors = _node_factors(comp, seed, self.node_ids)

    @classmethod
    def from_config(
        cls, section: Mapping[str, Any], seed: int, node_ids: Sequence[int]
    ) -> NetworkModel | None:
        """A model for the `[network]` table, or None when it asks for nothing."""
        config = validate(section, node_ids)
        if not wants_anything(config):
            return None
        return cls(config, seed, node_ids)

    # -- kernel.api.Network ------------------------------------------------------------------
    def arrivals(self, src: int, dst: int, depart: float, nbytes: int) -> Sequence[float]:
        """Arrival times of one message: empty when lost, two when duplicated."""
        if self._plain:
            return (depart + self._plain_latency,)
        link = self._link(src, dst) if self._rules else self._default
        done = depart
        if link.bandwidth:
            tx = nbytes / link.bandwidth
            q = self._queueing
            if q == "none":
                done = depart + tx
            else:
                pipe: Any = (src, dst) if q == "link" else src
                start = self._free.get(pipe, 0.0)
                if start < depart:
                    start = depart
                done = self._free[pipe] = start + tx
        rs = self._rs
        if link.loss and rs.uniform() < link.loss:
            return ()
        out = [done + link.latency()]
        if link.duplicate and rs.uniform() < link.duplicate:
            out.append(done + link.latency())
        if self._partitions:
            out = [a for a in out if not self.crosses_partition(src, dst, depart, a)]
        return out

    def node_events(self) -> Sequence[tuple[float, int, str]]:
        """Crash and restart events from `[[network.crashes]]`, sorted by time then node."""
        events: list[tuple[float, int, str]] = []
        for c in self.config["crashes"]:
            for node in c["node"]:
                events.append((c["at"], node, "crash"))
                if c["restart"] != _INF:
                    events.append((c["restart"], node, "restart"))
        return sorted(events)

    def compute_time(self, node: int, work: float, label: str) -> float:
        """Virtual seconds `work` units take on `node` (see the compute model in the module doc)."""
        if not work >= 0:
            raise ValueError(
                f"compute work must be >= 0, got {work!r} (node {node}, label {label!r})"
            )
        per_unit = self._labels.get(label, self._per_unit)
        if not per_unit or not work:
            return 0.0
        try:
            factor = self.factors[node]
        except KeyError:
            raise ValueError(f"compute_time for node {node}, which is not in this run") from None
        dt = work * per_unit * factor
        if self._jitter:
            dt *= math.exp(self._jitter * self._rs.normal())
        return dt

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What changes as the model runs (its random stream and when each pipe frees up), as
        plain values for a checkpoint. Links and compute factors follow from the config."""
        rs = self._rs
        return {
            "rng": rs._gen.bit_generator.state,
            "u": np.asarray(rs._u, np.float64), "ui": rs._ui,
            "z": np.asarray(rs._z, np.float64), "zi": rs._zi,
            "free": [[pipe, t] for pipe, t in self._free.items()],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from `state()` of a model made from the same config and seed; ValueError
        names what does not fit (and nothing is changed then)."""
        try:
            u_arr, z_arr = np.asarray(state["u"], np.float64), np.asarray(state["z"], np.float64)
            if u_arr.ndim != 1 or z_arr.ndim != 1:
                raise ValueError("u and z must be 1-D arrays")
            u, z = u_arr.tolist(), z_arr.tolist()
            ui, zi = int(state["ui"]), int(state["zi"])
            free: dict[Any, float] = {}
            for pipe, t in state["free"]:
                key = tuple(pipe) if isinstance(pipe, list | tuple) else int(pipe)
                free[key] = float(t)
            gen = np.random.default_rng(0)
            gen.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"network model state does not fit: {type(exc).__name__}: {exc}"
                             ) from None
        if not (0 <= ui <= len(u) and 0 <= zi <= len(z)):
            raise ValueError(f"network model state: draw positions {ui}, {zi} outside blocks "
                             f"of {len(u)}, {len(z)}")
        rs = self._rs
        rs._gen.bit_generator.state = gen.bit_generator.state
        rs._u, rs._ui, rs._z, rs._zi = u, ui, z, zi
        self._free = free

    # -- helpers -----------------------------------------------------------------------------
    def crosses_partition(self, src: int, dst: int, depart: float, arrival: float) -> bool:
        """Whether a message in flight over [depart, arrival] crosses a partition's window."""
        for start, end, group in self._partitions:
            if depart < end and arrival >= start and group.get(src, -1) != group.get(dst, -1):
                return True
        return False

    def _link(self, src: int, dst: int) -> _Link:
        link = self._links.get((src, dst))
        if link is None:
            params = dict(self._link_params)
            for rule in self._rules:
                if _matches(rule, src, dst):
                    params.update(rule["set"])
            link = self._links[(src, dst)] = _Link(params, self._rs)
        return link


def _matches(rule: Mapping[str, Any], src: int, dst: int) -> bool:
    s, d = rule["src"], rule["dst"]
    if (s is None or src in s) and (d is None or dst in d):
        return True
    return bool(rule["symmetric"]) and (s is None or dst in s) and (d is None or src in d)


def _node_factors(comp: Mapping[str, Any], seed: int, nodes: list[int]) -> dict[int, float]:
    rng = np.random.default_rng([seed, TAG, 0])
    n = len(nodes)
    spread = comp["spread"]
    if spread == "uniform":
        f = rng.uniform(comp["low"], comp["high"], size=n)
    elif spread == "lognormal":
        f = np.exp(comp["sigma"] * rng.standard_normal(n))
    else:
        f = np.ones(n)
    if comp["stragglers"] > 0:
        slow = rng.random(n) < comp["stragglers"]
        f = np.where(slow, f * comp["straggler_factor"], f)
    factors = dict(zip(nodes, f.tolist(), strict=True))
    factors.update(comp["factors"])
    return factors


# -- validation ------------------------------------------------------------------------------
def wants_anything(config: Mapping[str, Any]) -> bool:
    """Whether a validated `[network]` table changes anything from an ideal, instant network."""
    lat = config["latency"]
    comp = config["compute"]
    return bool(
        lat["kind"] != "constant" or lat["value"] or config["bandwidth"] or config["loss"]
        or config["duplicate"] or config["links"] or config["partitions"] or config["crashes"]
        or comp["per_unit"] or any(comp["labels"].values())
    )


def validate(section: Mapping[str, Any], node_ids: Sequence[int]) -> dict[str, Any]:
    """Check a `[network]` table; return it with every default filled in, latencies as tables,
    node lists as lists. Raises ConfigError naming the key and value."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"[network] must be a table, got {section!r}")
    ids = frozenset(node_ids)
    cfg = options("network", section, TOP_DEFAULTS, choices={"queueing": QUEUEING})
    cfg["latency"] = _latency(cfg["latency"], "network", "latency")
    for key in ("bandwidth",):
        _nonneg(cfg[key], "network", key)
    for key in ("loss", "duplicate"):
        _probability(cfg[key], "network", key)
    for key, check in (("links", _link_rule), ("partitions", _partition), ("crashes", _crash)):
        cfg[key] = [check(t, f"network.{key}[{i}]", ids) for i, t in enumerate(_tables(cfg, key))]
    _no_overlapping_crashes(cfg["crashes"])
    cfg["compute"] = _compute(cfg["compute"], ids)
    return cfg


def _no_overlapping_crashes(crashes: list[dict[str, Any]]) -> None:
    # A node is either up or down: its down windows [at, restart) must not overlap.
    windows: dict[int, list[tuple[float, float, int]]] = {}
    for i, c in enumerate(crashes):
        for node in c["node"]:
            windows.setdefault(node, []).append((c["at"], c["restart"], i))
    for node, ws in sorted(windows.items()):
        ws.sort()
        for (_, end, i), (at, _, j) in zip(ws, ws[1:], strict=False):
            if at < end:
                raise ConfigError(
                    f"[network.crashes[{j}]] crashes node {node} at {at!r}, while it is still "
                    f"down from [network.crashes[{i}]] (until {end!r})"
                )


def _tables(cfg: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = cfg[key]
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"[network] {key}[{i}] = {item!r} is not a table; write [[network.{key}]]"
            )
    return list(value)


def _latency(value: Any, section: str, key: str) -> dict[str, Any]:
    where = f"{section}.{key}"
    if value is None:
        return {"kind": "constant", "value": 0.0}
    if isinstance(value, int | float) and not isinstance(value, bool):
        _nonneg(value, section, key)
        return {"kind": "constant", "value": float(value)}
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{section}] {key} = {value!r} is neither a number of seconds nor a "
                          f"table with kind = {' | '.join(map(repr, LATENCY_PARAMS))}")
    kind = value.get("kind", "constant")
    if kind not in LATENCY_PARAMS:
        allowed = ", ".join(repr(k) for k in LATENCY_PARAMS)
        raise ConfigError(f"[{where}] kind = {kind!r} is not allowed; choose one of {allowed}")
    params = LATENCY_PARAMS[kind]
    for k in value:
        if k != "kind" and k not in params:
            raise ConfigError(f"[{where}] has no key {k!r} for kind {kind!r}; "
                              f"it takes {', '.join(params)}")
    spec = options(where, value, {"kind": kind, **params})
    for k in ("value", "low", "high", "mean", "std", "sigma"):
        if k in spec:
            _nonneg(spec[k], where, k)
    if kind == "uniform" and spec["high"] < spec["low"]:
        raise ConfigError(f"[{where}] high = {spec['high']!r} is below low = {spec['low']!r}")
    if kind == "lognormal" and not math.isfinite(spec["mu"]):
        raise ConfigError(f"[{where}] mu = {spec['mu']!r} must be finite")
    return spec


def _link_rule(rule: Mapping[str, Any], where: str, ids: frozenset[int]) -> dict[str, Any]:
    r = options(where, rule, LINK_DEFAULTS)
    out: dict[str, Any] = {
        "src": None if r["src"] is None else _nodes(r["src"], where, "src", ids),
        "dst": None if r["dst"] is None else _nodes(r["dst"], where, "dst", ids),
        "symmetric": r["symmetric"],
        "set": {},
    }
    if not isinstance(r["symmetric"], bool):
        raise ConfigError(f"[{where}] symmetric = {r['symmetric']!r} is not a boolean")
    if r["latency"] is not None:
        out["set"]["latency"] = _latency(r["latency"], where, "latency")
    for key, check in (("bandwidth", _nonneg), ("loss", _probability), ("duplicate", _probability)):
        if r[key] is not None:
            out["set"][key] = float(_number(r[key], where, key))
            check(out["set"][key], where, key)
    return out


def _partition(p: Mapping[str, Any], where: str, ids: frozenset[int]) -> dict[str, Any]:
    cfg = options(where, p, PARTITION_DEFAULTS)
    _nonneg(cfg["start"], where, "start")
    if not cfg["end"] > cfg["start"]:
        raise ConfigError(f"[{where}] end = {cfg['end']!r} must be after start = {cfg['start']!r}")
    groups = []
    seen: dict[int, int] = {}
    for g, grp in enumerate(cfg["groups"]):
        nodes = _nodes(grp, where, f"groups[{g}]", ids)
        for n in nodes:
            if n in seen:
                raise ConfigError(f"[{where}] node {n} is in groups[{seen[n]}] and groups[{g}]")
            seen[n] = g
        groups.append(nodes)
    if not groups:
        raise ConfigError(f"[{where}] groups = [] names no group; give lists of node ids")
    return {"start": cfg["start"], "end": cfg["end"], "groups": groups}


def _crash(c: Mapping[str, Any], where: str, ids: frozenset[int]) -> dict[str, Any]:
    cfg = options(where, c, CRASH_DEFAULTS)
    if cfg["node"] is None:
        raise ConfigError(f"[{where}] needs node = <id or list of ids>")
    nodes = _nodes(cfg["node"], where, "node", ids)
    _nonneg(cfg["at"], where, "at")
    if not cfg["restart"] > cfg["at"]:
        raise ConfigError(
            f"[{where}] restart = {cfg['restart']!r} must be after at = {cfg['at']!r}"
        )
    return {"node": nodes, "at": cfg["at"], "restart": cfg["restart"]}


def _compute(comp: Any, ids: frozenset[int]) -> dict[str, Any]:
    where = "network.compute"
    if not isinstance(comp, Mapping):
        raise ConfigError(f"[network] compute = {comp!r} is not a table; write [network.compute]")
    cfg = options(where, comp, COMPUTE_DEFAULTS, choices={"spread": SPREADS})
    for key in ("per_unit", "sigma", "jitter", "straggler_factor"):
        _nonneg(cfg[key], where, key)
    _probability(cfg["stragglers"], where, "stragglers")
    if not 0 < cfg["low"] <= cfg["high"]:
        raise ConfigError(f"[{where}] low = {cfg['low']!r}, high = {cfg['high']!r}: "
                          f"need 0 < low <= high")
    labels = {}
    for label, v in cfg["labels"].items():
        labels[label] = float(_number(v, where, f"labels.{label}"))
        _nonneg(labels[label], where, f"labels.{label}")
    factors = {}
    for k, v in cfg["factors"].items():
        try:
            node = int(k)
        except ValueError:
            raise ConfigError(f"[{where}] factors key {k!r} is not a node id") from None
        if node not in ids:
            raise ConfigError(f"[{where}] factors names node {node}, which is not in this run")
        f = float(_number(v, where, f"factors.{k}"))
        if not f > 0:
            raise ConfigError(f"[{where}] factors.{k} = {v!r} must be > 0")
        factors[node] = f
    cfg["labels"], cfg["factors"] = labels, factors
    return cfg


def _nodes(value: Any, where: str, key: str, ids: frozenset[int]) -> list[int]:
    items = value if isinstance(value, list) else [value]
    for n in items:
        if not isinstance(n, int) or isinstance(n, bool):
            raise ConfigError(f"[{where}] {key} = {value!r}: {n!r} is not a node id (an integer)")
        if n not in ids:
            raise ConfigError(f"[{where}] {key} = {value!r}: node {n} is not in this run "
                              f"({len(ids)} nodes)")
    return list(items)


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"[{where}] {key} = {value!r} is not a number")
    return value


def _nonneg(value: float, where: str, key: str) -> None:
    if not (value >= 0 and value == value):
        raise ConfigError(f"[{where}] {key} = {value!r} must be >= 0")


def _probability(value: float, where: str, key: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"[{where}] {key} = {value!r} is not a probability in [0, 1]")
