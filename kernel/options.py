"""Option parsing every layer may use: merge a config table over its defaults, refusing what
does not fit with one line that names the section, key, value and what is allowed.

Numbers must be finite: NaN is refused everywhere (also inside lists and tables), and an
infinity only for a key whose default is itself infinite (where inf means "never")."""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and says what is allowed."""


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


def options(
    section: str,
    given: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    choices: Mapping[str, Collection[Any]] | None = None,
) -> dict[str, Any]:
    """Merge `given` over `defaults`, refusing unknown keys, values of another type than the
    default's (an integer is accepted for a number; a None default accepts anything) and values
    outside `choices[key]`."""
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            near = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"[{section}] has no key {key!r}{hint} Allowed keys: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        if default is not None and not _same_kind(value, default):
            raise ConfigError(
                f"[{section}] {key} = {value!r} is {_type_name(value)}; expected "
                f"{_type_name(default)} (default {default!r})"
            )
        bad = _non_finite(value, default)
        if bad is not None:
            raise ConfigError(
                f"[{section}] {key} = {value!r}{bad}: not a finite number; expected a finite "
                f"value" + (" (or inf)" if _is_inf(default) else ""))
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        if choices and key in choices and value not in choices[key]:
            allowed = ", ".join(repr(c) for c in choices[key])
            raise ConfigError(
                f"[{section}] {key} = {value!r} is not allowed; choose one of {allowed}"
            )
        out[key] = value
    return out


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def _is_inf(x: Any) -> bool:
    return isinstance(x, float) and math.isinf(x)


def _non_finite(value: Any, default: Any, depth: int = 0) -> str | None:
    """Where in `value` a NaN (or an infinity, unless `default` is one) sits: "" for the value
    itself, " (at [1]['x'])" deeper; None when every number is finite."""
    if isinstance(value, float):
        ok = not math.isnan(value) and (math.isfinite(value) or _is_inf(default))
        return None if ok else ""
    if depth > 64:
        return None
    items: Any = (value.items() if isinstance(value, Mapping) else
                  enumerate(value) if isinstance(value, list | tuple) else ())
    for k, v in items:
        inner = _non_finite(v, None, depth + 1)
        if inner is not None:
            return f" (at [{k!r}]{inner.removeprefix(' (at ').removesuffix(')')})"
    return None


NODE_BYTES = 2048  # a lower estimate of one node's memory: host context, protocol object, ids


def require_memory(what: str, nbytes: float) -> None:
    """Refuse up front, with a ConfigError giving the estimate, a size that cannot fit:
    `nbytes` is a lower estimate of what `what` (e.g. "[workload] clients = 10**9") needs,
    compared with the memory available now; better than running out part way."""
    import psutil

    available = psutil.virtual_memory().available
    if nbytes > available:
        raise ConfigError(f"{what} needs at least {_gib(nbytes)} of memory; this machine has "
                          f"{_gib(available)} available")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):,.1f} MiB"
