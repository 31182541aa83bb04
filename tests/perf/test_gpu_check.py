"""perf/gpu_check.py: skips cleanly without a GPU; with one, runs its three W6 checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: see the next test")
def test_skips_cleanly_without_a_gpu(capsys):
    from perf import gpu_check

    assert gpu_check.main([]) == 0
    assert "skipped: torch sees no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_w6_repeats_on_cuda_and_matches_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "perf.gpu_check", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
