"""A bench module for tests/perf/test_micro.py: reports the process it ran in."""

from __future__ import annotations

import os
import sys
from typing import Any


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One row: this process's id (quick), or an abrupt exit (not quick)."""
    if not quick:
        sys.stdout.flush()
        os._exit(3)
    print("noise a bench prints before its result")
    return [{"name": "pid", "value": os.getpid(), "unit": "", "floor": None, "quick": quick}]
