"""Names to implementations: how a config line picks a transport, protocol, aggregator or codec
stage without the kernel importing any of them.

Entries come from the `fedloom.<group>` entry points in pyproject.toml, plus `register()` calls
(for protocols defined in a user's script or a test).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, TypeVar

GROUPS = ("transports", "protocols", "aggregators", "codecs", "models", "learners", "datasets",
          "partitioners")
DECLARED = "__fedloom_declares__"  # attribute a declared builder carries: the groups it serves
T = TypeVar("T")
_registered: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
_entry_cache: dict[str, dict[str, str]] = {}


class UnknownName(LookupError):
    """A config named something no entry point or `register()` call provides."""


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown registry group {group!r}; groups are {', '.join(GROUPS)}")


def _entries(group: str) -> dict[str, str]:
    if group not in _entry_cache:
        eps = entry_points(group=f"fedloom.{group}")
        _entry_cache[group] = {ep.name: ep.value for ep in eps}
    return _entry_cache[group]


def register(group: str, name: str, obj: Any) -> Any:
    """Make `obj` available as `name` in `group` (returns `obj`, so it works as a decorator)."""
    _check_group(group)
    _registered[group][name] = obj
    return obj


def declare(group: str, name: str | None = None) -> Callable[[T], T]:
    """Decorator marking a builder the user's code offers to configs for `group` (by
    'module:attr', and also by `name` when given)."""
    _check_group(group)

    def mark(obj: T) -> T:
        setattr(obj, DECLARED, (*getattr(obj, DECLARED, ()), group))
        if name is not None:
            register(group, name, obj)
        return obj

    return mark


def names(group: str) -> list[str]:
    """Every name `group` knows, sorted."""
    _check_group(group)
    return sorted(set(_registered[group]) | set(_entries(group)))


def load(group: str, name: str) -> Any:
    """The object registered as `name` in `group`; importing its module only now."""
    _check_group(group)
    if name in _registered[group]:
        return _registered[group][name]
    target = _entries(group).get(name)
    if target is None and ":" in name:
        target = name  # "package.module:attr" names an implementation directly
    if target is None:
        raise UnknownName(
            f"no {group[:-1]} named {name!r}; known: {', '.join(names(group)) or '(none)'} "
            f"(or give 'module:attribute')"
        )
    module, _, attr = target.partition(":")
    obj: Any = import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
