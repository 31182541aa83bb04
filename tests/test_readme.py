"""The README's tutorial runs exactly as printed."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_snippet_runs_and_learns() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Writing your own protocol", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the tutorial's python block is missing"
    assert len(code.group(1).splitlines()) <= 70
    proc = subprocess.run([sys.executable, "-c", code.group(1)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    acc = float(re.search(r"fedmedian: accuracy ([0-9.]+)", proc.stdout).group(1))
    assert acc > 0.5  # three rounds of median-of-models on the mixture: it must really learn
