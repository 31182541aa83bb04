"""Resolving a user's `module:attr` from a config, with an error that says where Python looked."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from kernel.options import ConfigError


def resolve(group: str, name: str, where: str, builtins: Sequence[str]) -> Any:
    """`registry.load(group, name)`; a ConfigError naming `where` (e.g. "[workload] model")
    when it is unknown, or when its module cannot be imported (saying where it looked)."""
    from kernel.registry import UnknownName, load

    try:
        return load(group, name)
    except UnknownName as exc:
        raise ConfigError(f"{where} = {name!r}: {exc}; built-ins are "
                          f"{', '.join(builtins)}") from None
    except ModuleNotFoundError as exc:
        module = name.partition(":")[0]
        if exc.name is None or not module.startswith(exc.name):
            raise  # the module exists but one of its own imports failed: show that
        paths = ", ".join(repr(p or ".") for p in sys.path[:6])
        raise ConfigError(
            f"{where} = {name!r}: no module named {exc.name!r} (looked in {paths}, ...); run "
            f"from the folder that holds {module.split('.')[0]}.py or its package, or add "
            f"that folder to PYTHONPATH") from None
    except AttributeError as exc:
        raise ConfigError(f"{where} = {name!r}: {exc}") from None
