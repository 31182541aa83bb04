"""W6 on a GPU: twice on cuda (the same final_model_sha256 both times: deterministic
algorithms are on) and once on cpu (test accuracy within 1 point of cuda's). Each run is a
fresh `fedloom run` process. Without a CUDA device it says so and exits 0.

    python -m perf.gpu_check [--rounds N] [--out DIR]

Exit codes: 0 passed or skipped, 1 a check failed, 2 a run failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
W6 = ROOT / "perf" / "workloads" / "w6.toml"


def has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run_w6(device: str, out: Path, rounds: int | None, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "kernel.run.cli", "run", str(W6), "--quiet", "--out", str(out),
           "--set", f"workload.device={device}"]
    if rounds is not None:
        cmd += ["--set", f"run.rounds={rounds}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"W6 on {device} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((out / "result.json").read_text())  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.gpu_check", description=__doc__)
    p.add_argument("--rounds", type=int, default=None, help="override W6's 30 rounds")
    p.add_argument("--out", type=Path, default=None, help="keep the run folders here")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ns = p.parse_args(argv)
    if not has_cuda():
        print("gpu_check: skipped: torch sees no CUDA device on this machine")
        return 0
    base = ns.out or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        runs = {name: run_w6(dev, base / name, ns.rounds, ns.timeout)
                for name, dev in (("cuda-1", "cuda"), ("cuda-2", "cuda"), ("cpu", "cpu"))}
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    for name, r in runs.items():
        print(f"{name:7s} sha {r['final_model_sha256'][:16]}  accuracy {r['test_accuracy']:.4f}"
              f"  rounds {r['rounds_s']:.1f} s")
    same = runs["cuda-1"]["final_model_sha256"] == runs["cuda-2"]["final_model_sha256"]
    gap = abs(runs["cuda-1"]["test_accuracy"] - runs["cpu"]["test_accuracy"])
    print(f"cuda repeats bit for bit: {same}; |cuda - cpu| accuracy {gap * 100:.2f} points "
          f"(limit 1)")
    return 0 if same and gap <= 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
