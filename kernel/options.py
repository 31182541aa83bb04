"""Option parsing every layer may use: merge a config table over its defaults, refusing what
does not fit with one line that names the section, key, value and what is allowed."""

from __future__ import annotations

import difflib
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
