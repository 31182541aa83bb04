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


def test_own_model_and_data_snippet_runs_from_an_empty_folder(tmp_path) -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own model and data", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the section's python block is missing"
    assert len(code.group(1).splitlines()) <= 40
    proc = subprocess.run([sys.executable, "-c", code.group(1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"test accuracy ([0-9.]+), clients: mean ([0-9.]+), worst ([0-9.]+)",
                      proc.stdout)
    assert found is not None, proc.stdout
    acc, mean, worst = (float(v) for v in found.groups())
    assert acc > 0.5 and mean > 0.5 and worst <= mean  # it learns; clients really differ
    assert list(tmp_path.iterdir()) == []  # run() without out_dir writes nothing
