"""Names to implementations: how a config line picks a transport, protocol, aggregator or codec
stage without the kernel importing any of them.

Entries come from the `fedloom.<group>` entry points in pyproject.toml, plus `register()` calls
(for protocols defined in a user's script or a test).

A config may also name `"package.module:attr"` directly, but only an object that declares
itself a builder of that group (`@declare(group)`, or a target of one of the group's entry
points): `load` refuses anything else with `UnknownName` after importing the module and before
calling anything, so a config naming `subprocess:getoutput` or `builtins:exec` never runs it
(a standard-library module is refused without being imported).
"""

from __future__ import annotations

import sys
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
    """A config named something no entry point or `register()` call provides, or a
    'module:attr' that is not declared for the group."""


class NotDeclared(UnknownName):
    """A 'module:attr' name resolved to an object that does not declare itself for the
    group."""


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
        setattr(obj, DECLARED, (*_declared_groups(obj), group))
        if name is not None:
            register(group, name, obj)
        return obj

    return mark


def names(group: str) -> list[str]:
    """Every name `group` knows, sorted."""
    _check_group(group)
    return sorted(set(_registered[group]) | set(_entries(group)))


def load(group: str, name: str) -> Any:
    """The object registered as `name` in `group` (importing its module only now): a name
    `register()` or an entry point gave, or a "package.module:attr" whose object is declared
    for `group`; UnknownName (NotDeclared) otherwise, before anything is called."""
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
    declared = name in _entries(group) or target in _entries(group).values()
    module, _, attr = target.partition(":")
    if not all(p.isidentifier() for p in [*module.split("."), *attr.split(".")]):
        raise UnknownName(f"{group[:-1]} {name!r} is not 'package.module:attribute'")
    if not declared and module.partition(".")[0] in sys.stdlib_module_names:
        # Not even imported: importing some runs code (antigravity opens a browser).
        raise NotDeclared(
            f"{group[:-1]} {name!r} is not declared as one: {module!r} is a standard-library "
            f"module, which declares no fedloom builders")
    obj: Any = import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not declared and not is_declared(group, obj):
        raise NotDeclared(
            f"{group[:-1]} {name!r} is not declared as one: only objects marked "
            f"@kernel.registry.declare({group!r}) (or named by a fedloom.{group} entry point) "
            f"may be named in a config")
    return obj


def is_declared(group: str, obj: Any) -> bool:
    """Whether `obj` was registered, named by an entry point, or declared for `group`."""
    _check_group(group)
    if any(v is obj for v in _registered[group].values()):
        return True
    return group in _declared_groups(obj)


def _declared_groups(obj: Any) -> tuple[str, ...]:
    # The object's own attribute only: a subclass of a declared class is not declared.
    try:
        own = vars(obj)
    except TypeError:
        return ()
    groups = own.get(DECLARED, ())
    return groups if isinstance(groups, tuple) else ()
