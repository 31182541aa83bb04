"""The comparison harness: the process-tree RSS sampler, the run order, its argument checks, and
a tiny real matrix (2 settings x 2 repeats of the toy protocol on inproc, each a fresh process)
whose report is recomputed here from results.jsonl."""

from __future__ import annotations

import io
import json
import os
import select
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest

from perf import cli, compare, report
from perf.procs import MB, TreeSampler, machine_info
from tests.perf import toy_protocol
from tests.perf.test_report import PNG, printed_ratio, ratio_table

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60.0


def _readline(proc: subprocess.Popen[bytes], what: str) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
    assert ready, f"{what} did not report within {TIMEOUT_S} s"
    return proc.stdout.readline()


# A parent holding ~120 MiB that starts a child holding ~80 MiB; both say "ready" and wait for
# their stdin to close, so the test measures them while both are alive, without sleeping.
TREE = textwrap.dedent("""
    import subprocess, sys
    hold = b"p" * (120 * 2**20)
    child = subprocess.Popen([sys.executable, "-c",
        "import sys; hold = b'c' * (80 * 2**20); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"ready"
    print("ready", flush=True)
    sys.stdin.read()
    child.stdin.close()
    child.wait(timeout=60)
""")


def test_sampler_sums_the_whole_tree_and_sees_no_survivors() -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert _readline(proc, "the process tree").strip() == b"ready"
        sampler = TreeSampler(proc.pid, interval=0.05)
        sampler.sample()
        assert sampler.peak_procs == 2
        assert sampler.peak_mb >= 200, f"tree RSS {sampler.peak_mb:.0f} MiB < 120 + 80 MiB"
        own = psutil.Process(proc.pid).memory_info().rss / MB
        assert sampler.peak_mb >= own + 75, "the child's memory was not counted"
        sampler.start()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=TIMEOUT_S)
    sampler.stop()
    assert sampler.samples >= 2
    assert len(sampler.seen) == 2
    assert sampler.survivors() == []


def test_sampler_of_a_gone_process_reads_zero() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=TIMEOUT_S)
    sampler = TreeSampler(proc.pid)
    assert sampler.sample() == 0
    assert sampler.peak_bytes == 0


def test_machine_info_names_versions_and_commit() -> None:
    info = machine_info()
    assert info["cpu_count"] >= 1 and info["memory_gb"] > 0
    assert info["versions"]["numpy"] and info["versions"]["python"]
    assert set(info["versions"]) >= {"torch", "ray", "grpcio", "numpy"}
    assert "commit" in info["git"]


def _cells(n: int) -> list[compare.Cell]:
    m = compare.Matrix(configs=[Path("w.toml")], vary=[("run.seed", [str(i) for i in range(n)])])
    return m.cells()


def test_schedule_alternates_repeats_outermost() -> None:
    a, b, c = _cells(3)
    order = compare.schedule([a, b, c], repeat=2, warmup=1)
    assert [(x.label, k) for x, k in order] == [
        (a.label, -1), (b.label, -1), (c.label, -1),
        (a.label, 0), (b.label, 0), (c.label, 0), (a.label, 1), (b.label, 1), (c.label, 1)]


def test_cells_are_the_product_and_carry_their_overrides() -> None:
    m = compare.Matrix(configs=[Path("a/w1.toml"), Path("b/w1.toml")], transports=["inproc", "ray"],
                       sets=["run.rounds=2"], vary=[("workload.clients", ["10", "100"])])
    cells = m.cells()
    assert len(cells) == 8
    first = cells[0]
    assert first.label == "a/w1.toml/inproc/workload.clients=10"
    assert first.sets == ("run.rounds=2", "transport.kind=inproc", "workload.clients=10")
    assert len({c.label for c in cells}) == 8


@pytest.mark.parametrize("bad, match", [
    ("rounds=3", "section.key=value"),
    ("run.rounds", "section.key=value"),
])
def test_bad_set_is_named(bad: str, match: str) -> None:
    with pytest.raises(compare.CompareError, match=match):
        compare.parse_set(bad)


def test_vary_parsing() -> None:
    assert compare.parse_vary("workload.clients=10,100") == ("workload.clients", ["10", "100"])
    assert compare.parse_vary("p.x=[1,2];[3]") == ("p.x", ["[1,2]", "[3]"])
    for bad in ("workload.clients", "workload.clients=1,,2", "workload.clients=1,1"):
        with pytest.raises(compare.CompareError, match=r"--vary"):
            compare.parse_vary(bad)


def test_per_round_time_sources() -> None:
    rows = [{"name": "round", "value": r, "t": t} for r, t in ((1, 1.0), (2, 3.0), (3, 4.0))]
    assert compare.per_round_time(rows, {"transport": "ray"}) == (1.5, "t gaps")
    # On inproc t is virtual time: the run's wall-clock rounds_s is used instead.
    assert compare.per_round_time(rows, {"transport": "inproc", "rounds": 3, "rounds_s": 0.6}) \
        == (pytest.approx(0.2), "rounds_s / rounds")
    timed = [dict(r, round_s=d) for r, d in zip(rows, (5.0, 1.0, 2.0), strict=True)]
    assert compare.per_round_time(timed, {"transport": "inproc"}) == (2.0, "round_s")


def test_bad_baseline_and_missing_config_fail_before_running(tmp_path: Path) -> None:
    cfg = tmp_path / "toy.toml"
    cfg.write_text(toy_protocol.CONFIG_TOML)
    m = compare.Matrix(configs=[cfg], vary=[("protocol.clients", ["2", "3"])], baseline="grpc")
    with pytest.raises(compare.CompareError, match="baseline 'grpc'"):
        compare.run_matrix(m, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    m = compare.Matrix(configs=[tmp_path / "nope.toml"])
    with pytest.raises(compare.CompareError, match=r"nope\.toml does not exist"):
        compare.run_matrix(m, tmp_path / "out")


def test_cli_names_an_unknown_transport(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    cfg = tmp_path / "toy.toml"
    cfg.write_text(toy_protocol.CONFIG_TOML)
    code = cli.main(["compare", str(cfg), "--transports", "inproc,carrier-pigeon",
                     "--out", str(tmp_path / "o")])
    assert code == 1
    assert "'carrier-pigeon'" in capsys.readouterr().err


# -- a real tiny matrix ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """2 settings (2 and 3 clients) x 2 repeats of the toy protocol on inproc."""
    tmp = tmp_path_factory.mktemp("compare")
    cfg = tmp / "toy.toml"
    cfg.write_text(toy_protocol.CONFIG_TOML)
    out = tmp / "out"
    # The runs import tests.perf.toy_protocol: make the checkout importable wherever pytest runs.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))
        code = cli.main(["compare", str(cfg), "--transports", "inproc",
                         "--vary", "protocol.clients=2,3", "--repeat", "2",
                         "--baseline", "protocol.clients=2", "--timeout", "120",
                         "--runner", " ".join(toy_protocol.runner()), "--out", str(out)])
    errors = ""
    if (out / "results.jsonl").exists():
        errors = "\n".join(str(r.get("error")) for r in compare.load_rows(out) if not r["ok"])
    return out, code, errors


A = "toy/inproc/protocol.clients=2"
B = "toy/inproc/protocol.clients=3"


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_matrix_writes_every_declared_file(matrix_dir: tuple[Path, int, str]) -> None:
    out, code, errors = matrix_dir
    assert code == 0, f"perf compare failed:\n{errors}"
    for name in ("results.jsonl", "report.md", "matrix.json", *report.PLOTS, report.SCALING_PLOT):
        assert (out / name).is_file(), f"{name} missing from {sorted(os.listdir(out))}"
    for name in (*report.PLOTS, report.SCALING_PLOT):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in (out / "report.md").read_text()


def test_matrix_alternates_cells(matrix_dir: tuple[Path, int, str]) -> None:
    out, code, errors = matrix_dir
    rows = _rows(out)
    assert [(r["cell"], r["repeat"]) for r in rows] == [(A, 0), (B, 0), (A, 1), (B, 1)], errors
    assert [r["order"] for r in rows] == [0, 1, 2, 3]
    starts = [r["started_at"] for r in rows]
    assert starts == sorted(starts)
    # Each run really ran as its own process with its cell's settings.
    for r in rows:
        assert r["cmd"][-3:] == ["--out", str(out / r["out"]), "--quiet"]
        clients = int(r["parts"]["protocol.clients"])
        assert f"protocol.clients={clients}" in r["cmd"]
        assert r["ok"], r["error"]
        assert r["messages"] == 2 * clients * 3
        assert r["test_accuracy"] == pytest.approx(toy_protocol.expected_accuracy(3))
        assert r["rounds"] == 3 and len(r["curve"]) == 3
        assert r["startup_s"] > 0 and r["rounds_s"] > 0 and r["teardown_s"] >= 0
        assert r["wall_s"] == pytest.approx(r["startup_s"] + r["rounds_s"] + r["teardown_s"])
        assert r["peak_rss_mb"] > 10 and r["peak_procs"] >= 1
        assert r["machine"]["versions"]["numpy"] and "commit" in r["machine"]["git"]
        assert (out / r["out"] / "result.json").is_file()


def test_report_ratios_match_results(matrix_dir: tuple[Path, int, str]) -> None:
    out, code, errors = matrix_dir
    assert code == 0, errors
    rows = _rows(out)
    table = ratio_table((out / "report.md").read_text())
    assert set(table) == {B}, table
    assert table[B]["baseline"] == f"`{A}`"
    for metric, title in report.RATIO_METRICS:
        pairs = []
        for k in (0, 1):
            a = next(r for r in rows if r["cell"] == A and r["repeat"] == k)
            b = next(r for r in rows if r["cell"] == B and r["repeat"] == k)
            va, vb = report.value(a, metric), report.value(b, metric)
            if va and vb is not None:
                pairs.append(vb / va)
        if not pairs:
            assert table[B][title] == "–"
            continue
        want = statistics.median(pairs)
        assert printed_ratio(table[B][title]) == pytest.approx(want, abs=6e-4), metric
    # More clients carry more bytes: 3/2 of them, exactly, on every pair.
    assert printed_ratio(table[B]["bytes"]) == pytest.approx(1.5, abs=1e-3)


def test_report_can_be_rebuilt_from_results(matrix_dir: tuple[Path, int, str],
                                            tmp_path: Path) -> None:
    out, code, errors = matrix_dir
    assert code == 0, errors
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.jsonl", "matrix.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    assert cli.main(["report", str(copy)]) == 0
    assert ratio_table((copy / "report.md").read_text()) == \
        ratio_table((out / "report.md").read_text())


HANG = ("import subprocess, sys, threading; "
        "subprocess.Popen([sys.executable, '-c', 'import threading; threading.Event().wait()']); "
        "threading.Event().wait()")


def _cell(tmp_path: Path, *sets: str) -> compare.Cell:
    cfg = tmp_path / "toy.toml"
    cfg.write_text(toy_protocol.CONFIG_TOML)
    return compare.Matrix(configs=[cfg], sets=list(sets)).cells()[0]


def test_a_run_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    # A "runner" that never finishes and has a child: both must be stopped.
    progress = compare.Progress(1, io.StringIO())
    row = compare.run_cell(_cell(tmp_path), tmp_path / "run", timeout_s=1.5, progress=progress,
                           n=1, runner=(sys.executable, "-c", HANG))
    assert not row["ok"] and "did not finish within --timeout 1.5 s" in row["error"]
    assert row["peak_procs"] == 2
    assert row["leftover_processes"] == []
    assert row["wall_s"] >= 1.5


def test_a_failing_run_is_reported_with_its_error(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    stream = io.StringIO()
    progress = compare.Progress(1, stream)
    row = compare.run_cell(_cell(tmp_path, "protocol.bogus=1"), tmp_path / "run",
                           timeout_s=TIMEOUT_S, progress=progress, n=1,
                           runner=toy_protocol.runner())
    assert not row["ok"] and row["rc"] == 1
    assert "bogus" in row["error"], row["error"]
    row["cell"], row["repeat"] = "toy", 0
    progress.done(1, row)
    assert "FAILED (exit 1)" in stream.getvalue() and "bogus" in stream.getvalue()


def test_progress_updates_one_line_on_a_terminal_and_prints_each_run() -> None:
    stream = io.StringIO()
    progress = compare.Progress(2, stream, live=True)
    progress.tick(1, "w/inproc", 1.25, 300 * 2**20)
    progress.done(1, {"cell": "w/inproc", "repeat": 0, "ok": True, "wall_s": 2.0,
                      "rounds_s": 1.5, "peak_rss_mb": 300.0, "test_accuracy": 0.8612})
    text = stream.getvalue()
    assert text.startswith("\r\x1b[K[1/2] w/inproc:    1.2 s, tree RSS 300 MiB")
    assert text.endswith("\r\x1b[K[1/2] w/inproc repeat 0: wall 2.00 s, rounds 1.5 s, "
                         "peak RSS 300 MiB, accuracy 0.8612\n")
    plain = io.StringIO()
    compare.Progress(2, plain, live=False).tick(1, "w/inproc", 1.0, 0)
    assert plain.getvalue() == ""
