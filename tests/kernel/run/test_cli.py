"""The `fedloom` command: exit codes, error text, outputs and what it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernel.run.cli import EXIT_ERROR, EXIT_OK, EXIT_UNFINISHED, EXIT_USAGE, main
from kernel.run.outputs import read_metrics

ROOT = Path(__file__).resolve().parents[3]
TOY = "tests.kernel.run.test_runner:build_toy"  # the runner tests' toy protocol, by module path
TOY_TOML = f"""\
[run]
seed = 2
rounds = 3

[transport]
kind = "inproc"
strict = true

[protocol]
name = "{TOY}"
"""


def fedloom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh process, as a user would."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-m", "kernel.run.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def toy_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(TOY_TOML)
    return path


def test_a_run_prints_progress_and_a_summary_matching_result_json(
    toy_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = fedloom("run", str(toy_file), "--out", str(out), "--set", "run.seed=9", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["seed"] == 9 and result["reason"] == "finished"
    assert f"model sha256   {result['final_model_sha256']}" in proc.stdout
    assert f"outputs        {out}" in proc.stdout
    assert f"{TOY} on inproc, seed 9: finished by node 0" in proc.stdout
    # Not a terminal: one plain progress line per round, on stderr.
    rounds = [line.split("  ")[0] for line in proc.stderr.splitlines()]
    assert rounds == ["round 1/3", "round 2/3", "round 3/3"]
    assert "seed = 9" in (out / "config.toml").read_text()


def test_a_bad_key_exits_1_with_the_message_and_no_traceback(
    toy_file: Path, tmp_path: Path
) -> None:
    proc = fedloom("run", str(toy_file), "--set", "run.sead=1", cwd=tmp_path)
    assert proc.returncode == EXIT_ERROR
    assert "fedloom: error: [run] has no key 'sead'; did you mean 'seed'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()

    debug = fedloom("run", str(toy_file), "--set", "run.sead=1", "--debug", cwd=tmp_path)
    assert debug.returncode == EXIT_ERROR
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[protocol]\nname = "fedavg"\n\n[run\nseed = 1\n')
    proc = fedloom("run", str(bad), cwd=tmp_path)
    assert proc.returncode == EXIT_ERROR
    assert "bad.toml: invalid TOML" in proc.stderr and "line 4" in proc.stderr


def test_a_failing_run_is_reported_without_traceback(toy_file: Path, tmp_path: Path) -> None:
    proc = fedloom("run", str(toy_file), "--set", "protocol.fail_round=1", cwd=tmp_path)
    assert proc.returncode == EXIT_ERROR
    assert "fedloom: error: node 1 (Toy) raised ValueError in on_message" in proc.stderr
    assert "refuses round 1" in proc.stderr and "Traceback" not in proc.stderr


def test_default_output_dir_is_runs_slash_stem(
    toy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(toy_file), "--quiet"]) == EXIT_OK
    assert capsys.readouterr() == ("", "")
    assert sorted(p.name for p in (tmp_path / "runs" / "toy").iterdir()) == [
        "config.toml", "final_model.npz", "metrics.jsonl", "result.json"]

    assert main(["run", str(toy_file), "--quiet", "--set", 'output.dir="elsewhere"']) == EXIT_OK
    assert (tmp_path / "elsewhere" / "result.json").exists()


def test_a_run_nobody_finishes_exits_3(
    toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "o")
    code = main(["run", str(toy_file), "--out", out, "--set", "protocol.mode=stall"])
    assert code == EXIT_UNFINISHED
    err = capsys.readouterr().err
    assert "the run stopped (idle) before any node called finish" in err
    assert not (tmp_path / "o" / "final_model.npz").exists()


def test_an_unimportable_protocol_is_an_error_naming_it(
    toy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", str(toy_file), "--set", 'protocol.name="no_such_pkg.mod:build"'])
    assert code == EXIT_ERROR
    assert ("fedloom: error: protocol 'no_such_pkg.mod:build' cannot be imported: "
            "No module named 'no_such_pkg'") in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["run", "--bogus"], ["frobnicate"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    if argv:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == EXIT_USAGE
    else:
        assert main(argv) == EXIT_USAGE
    assert "usage: fedloom" in capsys.readouterr().err


def test_inspect_is_delegated_to_perf(
    toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert main(["run", str(toy_file), "--out", str(out), "--quiet"]) == EXIT_OK
    sha = json.loads((out / "result.json").read_text())["final_model_sha256"]
    assert main(["inspect", str(out)]) == EXIT_OK
    assert sha in capsys.readouterr().out


def test_same_config_same_files_process_after_process(toy_file: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        proc = fedloom("run", str(toy_file), "--out", str(tmp_path / name), "--quiet",
                       cwd=tmp_path)
        assert proc.returncode == EXIT_OK, proc.stderr
    for file in ("final_model.npz", "config.toml"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    rows = [read_metrics(tmp_path / n / "metrics.jsonl", drop_wall=True) for n in ("a", "b")]
    assert rows[0] == rows[1] and rows[0]
    sha = [json.loads((tmp_path / n / "result.json").read_text())["final_model_sha256"]
           for n in ("a", "b")]
    assert sha[0] == sha[1] is not None


# -- the fast exit of `fedloom run` ------------------------------------------------------------

PROBE = "tests.kernel.run.exit_probe:build"


def _gone(pid: int) -> bool:
    """Whether `pid` ended (waiting at most a few seconds for a kill already sent to land)."""
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    _, alive = psutil.wait_procs([proc], timeout=5)
    return not alive or proc.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("failing", [False, True], ids=["finished", "failed"])
def test_fedloom_run_exits_at_once_with_its_outputs_complete(
        toy_file: Path, tmp_path: Path, failing: bool) -> None:
    # The probe's build leaves a running child and an atexit handler: after `fedloom run`,
    # the child must be gone and the handler must not have run (the interpreter's teardown
    # was skipped), while every output, stdout included, is complete and the code is right.
    out = tmp_path / "out"
    args = ["run", str(toy_file), "--out", str(out), "--set", f"protocol.name={PROBE}",
            "--timings"] + (["--set", "protocol.fail_round=2"] if failing else [])
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "FEDLOOM_EXIT_PROBE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kernel.run.cli", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert _gone(int((tmp_path / "child.pid").read_text()))
    assert not (tmp_path / "atexit-ran").exists()
    if failing:
        assert proc.returncode == EXIT_ERROR
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedloom: error:")]
        assert len(errors) == 1 and "refuses round 2" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert proc.stderr.startswith("round 1/3")  # progress written before the error
        assert not out.exists()  # as main() leaves it: a failed inproc run writes no files
        return
    result = json.loads((out / "result.json").read_text())
    assert proc.returncode == EXIT_OK, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.toml", "final_model.npz", "metrics.jsonl", "result.json"]
    from kernel.run.outputs import model_sha256

    with np.load(out / "final_model.npz") as npz:
        assert model_sha256(dict(npz)) == result["final_model_sha256"] is not None
    assert [r["value"] for r in read_metrics(out / "metrics.jsonl")
            if r["name"] == "round"] == [1, 2, 3]
    # stdout is a pipe here (block-buffered): the summary's last line arrives only if flushed.
    assert proc.stdout.rstrip().endswith(f"outputs        {out}")
    timings = result["timings"]
    assert set(timings) == {"start_s", "build_s", "transport_import_s", "run_s", "close_s"}
    assert sum(timings.values()) <= result["wall_s"] + timings["close_s"] + 0.05
    printed = proc.stderr[proc.stderr.index("timings (seconds"):].splitlines()
    labels = [ln[:40].strip() for ln in printed[1:]]
    assert labels == ["start (python, imports, config)", "build the deployment",
                      "import the transport", "transport run", "close transport",
                      "write outputs, exit", "total"]
    total = float(printed[-1].split()[-1])
    assert total == pytest.approx(sum(float(ln.split()[-1]) for ln in printed[1:-1]), abs=0.01)


def test_main_called_as_a_library_leaves_the_interpreter_alone(
        toy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Only `entry` (the console script) ends the process; main() returns its code.
    monkeypatch.setenv("FEDLOOM_EXIT_PROBE", str(tmp_path))
    import kernel.run.cli as cli

    called: list[int] = []
    monkeypatch.setattr(cli, "exit_now", called.append)
    code = main(["run", str(toy_file), "--out", str(tmp_path / "o"), "--quiet",
                 "--set", f"protocol.name={PROBE}"])
    assert code == EXIT_OK and called == []
    import psutil

    child = psutil.Process(int((tmp_path / "child.pid").read_text()))
    assert child.is_running()  # the library path kills nothing it did not start itself
    child.kill()
    child.wait(5)
    monkeypatch.setattr(sys, "argv", ["fedloom", "run", str(toy_file), "--quiet", "--out",
                                      str(tmp_path / "p"), "--set", f"protocol.name={PROBE}"])
    with pytest.raises(SystemExit):  # the stub returns, so entry goes on to sys.exit
        cli.entry()
    assert called == [EXIT_OK]
    psutil.Process(int((tmp_path / "child.pid").read_text())).kill()
