"""The micro driver: cost against the floor for times and rates, skips with a note for a missing
module or dependency, a failing bench recorded, and micro.jsonl/micro.md written."""

from __future__ import annotations

import io
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perf import micro
from perf.inspect import inspect

positive = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(positive, positive)
def test_cost_is_how_many_floors_ours_costs(ours: float, floor: float) -> None:
    t = micro.normalise({"name": "x", "value": ours, "unit": "s", "floor": floor})
    rate = micro.normalise({"name": "x", "value": ours, "unit": "GB/s", "floor": floor})
    assert not t["higher_is_better"] and rate["higher_is_better"]
    assert t["cost"] == pytest.approx(ours / floor)
    assert rate["cost"] == pytest.approx(floor / ours)


def test_missing_floor_has_no_cost_and_aliases_are_read() -> None:
    r = micro.normalise({"label": "y", "median": 2.0, "unit": "ms", "floor": None})
    assert r["name"] == "y" and r["value"] == 2.0 and r["cost"] is None


def test_unknown_bench_is_named() -> None:
    with pytest.raises(micro.MicroError, match=r"'nope'.*known: kernel"):
        micro.select(["kernel", "nope"])


def _fake(monkeypatch: pytest.MonkeyPatch, name: str, run: Any) -> None:
    mod = types.ModuleType(f"perf.bench_{name}")
    mod.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, f"perf.bench_{name}", mod)


def test_run_micro_writes_table_jsonl_and_md(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def good(quick: bool = False) -> list[dict[str, Any]]:
        assert quick
        return [{"name": "dispatch", "value": 0.5, "unit": "M ev/s", "floor": 1.0,
                 "floor_name": "bare heapq", "note": "kept"},
                {"name": "encode 40 MB", "value": 0.03, "unit": "s", "floor": 0.02,
                 "floor_name": "tobytes"}]

    def needs_dep(quick: bool = False) -> list[dict[str, Any]]:
        raise ModuleNotFoundError("No module named 'somelib'", name="somelib")

    def broken(quick: bool = False) -> list[dict[str, Any]]:
        raise RuntimeError("the floor fell through")

    _fake(monkeypatch, "good", good)
    _fake(monkeypatch, "dep", needs_dep)
    _fake(monkeypatch, "broken", broken)
    monkeypatch.setattr(micro, "BENCHES", ("good", "dep", "broken", "absent"))
    stream = io.StringIO()
    outcomes = micro.run_micro(None, True, tmp_path, stream=stream, isolate=False)
    assert [o.bench for o in outcomes] == ["good", "dep", "broken", "absent"]
    text = stream.getvalue()
    assert "2.00x" in text and "1.50x" in text  # 1.0/0.5 for the rate, 0.03/0.02 for the time
    assert "skipped dep: perf.bench_dep needs 'somelib', which is not installed" in text
    assert "skipped absent: perf.bench_absent is not there" in text
    assert "FAILED broken: RuntimeError: the floor fell through" in text
    rows = [json.loads(x) for x in (tmp_path / "micro.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in rows] == ["good", "good", "dep", "broken", "absent"]
    assert rows[0]["note"] == "kept" and rows[0]["cost"] == pytest.approx(2.0)
    assert rows[0]["machine"]["versions"]["numpy"]
    md = (tmp_path / "micro.md").read_text()
    assert "| good | encode 40 MB | 0.03 s | tobytes | 0.02 s | 1.50x |" in md
    assert "## broken failed" in md
    assert "| good | dispatch |" in inspect(tmp_path)


def test_isolated_bench_runs_in_a_process_of_its_own() -> None:
    """Each bench's own-process figures (its peak RSS) must not be the driver's."""
    here = micro.run_bench("toy", True, isolate=True, module="tests.perf.toy_bench")
    assert here.error is None and here.skipped is None, here.error
    row = here.rows[0]
    assert row["value"] != os.getpid() and row["quick"] is True
    # A child that dies is a failed bench with its last words, not a hang or a crash here.
    dead = micro.run_bench("toy", False, isolate=True, module="tests.perf.toy_bench")
    assert dead.rows == [] and dead.error and "exited with 3" in dead.error


def test_grpc_bench_gives_rows_the_driver_reads() -> None:
    """bench_grpc.run used to return its figures dict, which the driver reported as FAILED."""
    from perf import bench_grpc

    figs: dict[str, Any] = {"bulk_MB": 1280.0, "bulk_grpc_transport_MBps": 900,
                            "bulk_bare_grpcio_MBps": 1000, "bulk_raw_tcp_MBps": 2000,
                            "tiny_msgs_per_s": 50_000, "w3_grpc_effective_MBps": 700}
    for name in ("w1", "w3"):
        for kind in ("inproc", "grpc"):
            figs |= {f"{name}_{kind}_s_per_round": 0.1, f"{name}_{kind}_wall_s": 2.0,
                     f"{name}_{kind}_peak_rss_mb": 300}
        figs[f"{name}_same_sha256_on_both"] = True
    rows = [micro.normalise(r) for r in bench_grpc.rows(figs)]
    assert len(rows) == 10 and all(r["name"] and r["value"] is not None for r in rows)
    assert rows[0]["cost"] == pytest.approx(1000 / 900)  # a rate: floor/ours
    assert all(r["same_sha256"] for r in rows if r["name"].startswith(("w1 ", "w3 grpc s")))
