"""Config: TOML in, validated plain dicts out, errors that name the key, the value and what fits.

A run config is a TOML file with these top-level sections (each a table):

- `[run]` (validated here): `seed` (int >= 0, default 0), `rounds` (int >= 1, default 5),
  `time_limit` (seconds > 0; virtual seconds on inproc, wall seconds elsewhere; unset means no
  limit on a virtual-clock transport and `WALL_TIME_LIMIT_S` on a wall-clock one),
  `max_events` (int >= 1; unset means no limit), `progress` (bool, default true: a progress
  display on stderr).
- `[transport]`: `kind` (a registered transport name, default "inproc") here; the transport
  validates its other keys.
- `[protocol]`: `name` (a registered protocol, required) here; the protocol's `build`
  validates its parameters.
- `[output]` (validated here): `dir` (string; where `fedloom run` writes when `--out` is not
  given; default "" meaning `runs/<config file stem>`), `save_model` (bool, default true:
  write final_model.npz).
- `[workload]`, `[data]` (with `[data.partition]`), `[eval]`, `[network]`, `[codec]`,
  `[perf]`: validated by their owners (the learner, protocols.learning.data and .evaluation,
  the network model, the codec, the perf harness); `[adversary]` and `[privacy]` by
  `protocols.adversary` and `protocols.privacy` (through the FedAvg-family protocols).

Config files are read only when they are regular files of at most `MAX_CONFIG_BYTES`; any
failure of the TOML parser (syntax, a 100,000-digit integer, 5,000-deep nesting) is one
ConfigError line, and tables and arrays may nest at most `MAX_NESTING` deep.

A validated config is always representable in TOML: optional keys that are unset are absent,
never None, so `config.toml` written from it loads back to the same dict.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kernel import registry
from kernel.options import ConfigError, _type_name, options
from kernel.run.files import InputError, read_regular

MAX_CONFIG_BYTES = 1 << 22  # 4 MiB: configs are written by people
MAX_NESTING = 32  # tables and arrays inside each other
SECTIONS = ("run", "transport", "protocol", "workload", "data", "eval", "network", "codec",
            "output", "perf", "adversary", "privacy")

# Defaults for [run]; None marks a key that is unset unless given (and then absent from the
# validated config).
RUN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "rounds": 5,
    "time_limit": None,
    "max_events": None,
    "progress": True,
    "checkpoint_every": None,  # rounds between checkpoints in the run folder (inproc only)
}
OUTPUT_DEFAULTS: dict[str, Any] = {"dir": "", "save_model": True}
DEFAULT_TRANSPORT = "inproc"
# A run on a wall-clock transport with no [run] time_limit stops after this many seconds, so a
# protocol that never finishes cannot hang a terminal or CI job forever.
WALL_TIME_LIMIT_S = 600.0

# The config `fedloom run` uses without a file: workload W1 (FedAvg, 10 clients, 5 rounds, mlp),
# kept equal in content to perf/workloads/w1.toml (a test checks).
DEFAULT_CONFIG_NAME = "default"
DEFAULT_CONFIG_TOML = """\
# W1 fedavg-10: 10 clients, all train every round, 5 rounds, model mlp (docs/workloads.md).
[run]
seed = 0
rounds = 5

[transport]
kind = "inproc"

[protocol]
name = "fedavg"
aggregator = "weighted_mean"

[workload]
model = "mlp"
clients = 10
samples_per_client = 256
batch_size = 32
lr = 0.05
epochs = 1
test_samples = 2000
"""


# -- loading ---------------------------------------------------------------------------------

def load(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read the TOML file at `path`, apply `key=value` overrides, and validate."""
    p = Path(path)
    try:
        text = read_regular(p, MAX_CONFIG_BYTES, "config file").decode("utf-8")
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: {exc}") from None
    return loads(text, overrides, source=str(p))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML `text` as a dict; any parser failure (syntax, an integer too long to convert,
    nesting too deep for the parser) is one ConfigError line naming `source`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already says "(at line L, column C)".
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid TOML: tables or arrays nest too deeply "
                          f"(at most {MAX_NESTING} levels)") from None
    except (ValueError, MemoryError, TypeError) as exc:
        raise ConfigError(f"{source}: invalid TOML: {str(exc).splitlines()[0][:200]}") from None
    _check_nesting(raw, source, 0)
    return raw


def _check_nesting(x: Any, source: str, depth: int) -> None:
    if depth > MAX_NESTING:
        raise ConfigError(f"{source}: tables or arrays nest more than {MAX_NESTING} levels "
                          f"deep")
    items = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
    for v in items:
        _check_nesting(v, source, depth + 1)


def loads(text: str, overrides: Iterable[str] = (), *, source: str = "<config>") -> dict[str, Any]:
    """Parse TOML `text` (named `source` in errors), apply overrides, and validate."""
    return validate(apply_overrides(parse_toml(text, source), overrides))


def default_config(overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The built-in config (workload W1) with `overrides` applied, validated."""
    return loads(DEFAULT_CONFIG_TOML, overrides, source="built-in default config")


def parse_value(text: str) -> Any:
    """A `--set` value: a TOML value when it parses as one (1, 0.1, true, [1, 2], "x",
    {a = 1}), otherwise the text itself as a string."""
    try:
        raw = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    except (RecursionError, ValueError, MemoryError, TypeError) as exc:
        raise ConfigError(f"--set value {text[:60]!r}: invalid TOML: "
                          f"{str(exc).splitlines()[0][:200] or 'nests too deeply'}") from None
    _check_nesting(raw, f"--set value {text[:60]!r}", 0)
    return raw["v"]


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A deep copy of `config` with each `dotted.key=value` set (tables made as needed)."""
    out = copy.deepcopy(dict(config))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p.strip() for p in parts):
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value "
                f"(for example run.seed=3 or transport.kind=ray)"
            )
        parts = [p.strip() for p in parts]
        if len(parts) == 1:
            raise ConfigError(
                f"override {item!r} sets top-level key {key!r}; keys live in sections: "
                f"write section.{key}=..., for example {_guess_section(key)}.{key}=..."
            )
        table: dict[str, Any] = out
        for depth, part in enumerate(parts[:-1]):
            nxt = table.setdefault(part, {})
            if not isinstance(nxt, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {where} is {_type_name(nxt)} ({nxt!r}), not a table, "
                    f"so it has no key {parts[depth + 1]!r}"
                )
            table = nxt
        table[parts[-1]] = parse_value(text.strip())
    return out


def _guess_section(key: str) -> str:
    for section, keys in (("run", RUN_DEFAULTS), ("output", OUTPUT_DEFAULTS)):
        if key in keys:
            return section
    return "run"


# -- validation ------------------------------------------------------------------------------

def validate(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check the sections the kernel owns and fill their defaults; returns a new dict.

    Idempotent: validating a validated config returns an equal one.
    """
    for name, value in config.items():
        if name not in SECTIONS:
            near = difflib.get_close_matches(name, SECTIONS, n=1)
            hint = f"; did you mean [{near[0]}]?" if near else ""
            raise ConfigError(
                f"unknown section [{name}]{hint} Allowed sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"top-level key {name!r} = {value!r} is {_type_name(value)}; "
                f"[{name}] must be a table (a [{name}] section)"
            )
    out: dict[str, Any] = {name: copy.deepcopy(dict(value)) for name, value in config.items()}
    out["run"] = _validate_run(out.get("run", {}))
    out["transport"] = _validate_named(
        "transport", "kind", out.get("transport", {}), "transports", DEFAULT_TRANSPORT
    )
    out["protocol"] = _validate_named(
        "protocol", "name", out.get("protocol", {}), "protocols", None
    )
    if "output" in out:
        out["output"] = options("output", out["output"], OUTPUT_DEFAULTS)
    return out


def _validate_run(given: Mapping[str, Any]) -> dict[str, Any]:
    run = options("run", given, RUN_DEFAULTS)
    _integer(run, "seed", 0, "an integer >= 0 (numpy seeds cannot be negative)")
    _integer(run, "rounds", 1, "an integer >= 1")
    limit = run["time_limit"]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
            raise ConfigError(
                f"[run] time_limit = {limit!r} is not allowed; expected a number of seconds > 0 "
                f"(leave it out for no limit)"
            )
        run["time_limit"] = float(limit)
    if run["max_events"] is not None:
        _integer(run, "max_events", 1, "an integer >= 1 (leave it out for no limit)")
    if run["checkpoint_every"] is not None:
        _integer(run, "checkpoint_every", 1,
                 "an integer >= 1 (rounds between checkpoints; inproc only)")
    return {k: v for k, v in run.items() if v is not None}


def _integer(section: dict[str, Any], key: str, low: int, expected: str) -> None:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"[run] {key} = {value!r} is not allowed; expected {expected}")


def _validate_named(
    section: str, key: str, given: Mapping[str, Any], group: str, default: str | None
) -> dict[str, Any]:
    out = dict(given)
    known = registry.names(group)
    if key not in out:
        if default is None:
            raise ConfigError(
                f"[{section}] {key} is missing; choose one of {', '.join(known) or '(none)'}"
            )
        out[key] = default
    value = out[key]
    # "package.module:attribute" names an implementation directly (see registry.load).
    if isinstance(value, str) and ":" in value.strip(":"):
        return {key: value, **{k: v for k, v in out.items() if k != key}}
    if not isinstance(value, str) or value not in known:
        near = difflib.get_close_matches(value, known, n=1) if isinstance(value, str) else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"[{section}] {key} = {value!r} is not a known {group[:-1]}{hint} "
            f"Choose one of {', '.join(known) or '(none)'} (or give 'module:attribute')"
        )
    # `kind`/`name` first so config.toml reads naturally.
    return {key: value, **{k: v for k, v in out.items() if k != key}}


# -- writing ---------------------------------------------------------------------------------

def dumps(config: Mapping[str, Any]) -> str:
    """TOML text for a nested dict of tables, scalars, lists and dates (what tomllib returns);
    `tomllib.loads(dumps(c)) == c`. None values are left out (TOML has no null)."""
    lines: list[str] = []
    _dump_table(config, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if v is not None and not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    if path and (scalars or not tables):
        lines.append("")
        lines.append("[" + ".".join(_key(p) for p in path) + "]")
    for k, v in scalars:
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in tables:
        _dump_table(v, [*path, k], lines)


_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _key(k: Any) -> str:
    if not isinstance(k, str):
        raise ConfigError(f"config key {k!r} is {_type_name(k)}; TOML keys are strings")
    return k if k and set(k) <= _BARE else _string(k)


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None)
        return "{" + items + "}"
    if hasattr(v, "isoformat"):  # datetime, date, time: what tomllib gives for TOML dates
        return str(v.isoformat())
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # a numpy scalar
        return _value(v.item())
    raise ConfigError(f"config value {v!r} is {_type_name(v)}; TOML cannot hold it")
