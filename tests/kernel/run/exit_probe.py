"""A toy protocol that leaves behind what a normal interpreter exit would act on: a child
process still running and an atexit handler, for the test of `fedloom run`'s fast exit. The
folder named by FEDLOOM_EXIT_PROBE receives the child's pid and, if atexit handlers ever run,
a file saying so."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kernel.api import Deployment
from kernel.registry import declare
from tests.kernel.run.test_runner import build_toy


@declare("protocols")
def build(config: Mapping[str, Any]) -> Deployment:
    """The runner tests' toy, plus a sleeping child process and an atexit marker."""
    where = Path(os.environ["FEDLOOM_EXIT_PROBE"])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (where / "child.pid").write_text(str(child.pid))
    atexit.register((where / "atexit-ran").write_text, "the interpreter's teardown ran")
    return build_toy(config)
