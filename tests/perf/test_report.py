"""report.md and the plots from rows: every printed ratio is the median of repeat-paired ratios,
baselines resolve by transport, setting or cell, and the PNGs are written."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perf import report

PNG = b"\x89PNG\r\n\x1a\n"


def ratio_table(md: str) -> dict[str, dict[str, str]]:
    """The ratios section of a report.md as {cell: {column title: text}}."""
    section = md.split("## Ratios against baseline", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert lines, f"no ratio table in:\n{section}"
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return out


def printed_ratio(text: str) -> float:
    """`1.234x (1.1–1.3)` -> 1.234."""
    m = re.match(r"([0-9.]+)x", text)
    assert m, f"not a ratio: {text!r}"
    return float(m.group(1))


def make_rows(values: dict[str, list[float]], metric: str = "wall_s",
              key: str = "transport") -> list[dict[str, Any]]:
    """Rows of a matrix whose cells are `values`' keys (as values of `key`), repeats
    alternating, with `metric` set from the lists."""
    rows: list[dict[str, Any]] = []
    n = len(next(iter(values.values())))
    for k in range(n):
        for name, vs in values.items():
            parts = {"workload": "w", key: name}
            cell = "w/" + (name if key in ("transport", "workload") else f"{key}={name}")
            rows.append({"order": len(rows), "cell": cell, "parts": parts, "repeat": k,
                         "ok": True, "warmup": False, metric: vs[k]})
    return rows


def test_ratio_pairs_repeats_not_medians() -> None:
    # Paired: 2/1, 1/2, 4/3 -> median 1.333; the ratio of medians would be 2/2 = 1.
    rows = make_rows({"inproc": [1.0, 2.0, 3.0], "ray": [2.0, 1.0, 4.0]})
    md = report.render(rows, "inproc")
    table = ratio_table(md)
    assert printed_ratio(table["w/ray"]["total wall"]) == pytest.approx(4 / 3, abs=5e-4)
    assert table["w/ray"]["baseline"] == "`w/inproc`"
    assert table["w/ray"]["pairs"] == "3"
    assert "w/inproc" not in table


positive = st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False)


@given(st.integers(1, 5).flatmap(
    lambda n: st.tuples(st.lists(positive, min_size=n, max_size=n),
                        st.lists(positive, min_size=n, max_size=n))))
def test_printed_ratios_equal_recomputed_median(pair: tuple[list[float], list[float]]) -> None:
    base, other = pair
    rows = make_rows({"inproc": base, "grpc": other}, metric="rounds_s")
    md = report.render(rows, "inproc")
    want = statistics.median(o / b for o, b in zip(other, base, strict=True))
    got = printed_ratio(ratio_table(md)["w/grpc"]["rounds"])
    assert got == pytest.approx(want, rel=1e-3, abs=5e-4)
    assert report.fmt_ratio(want) in ratio_table(md)["w/grpc"]["rounds"]


def test_failed_and_warmup_runs_are_not_counted() -> None:
    rows = make_rows({"inproc": [1.0, 1.0], "ray": [3.0, 5.0]})
    rows.append({"order": 4, "cell": "w/ray", "parts": {"workload": "w", "transport": "ray"},
                 "repeat": 2, "ok": False, "rc": 1, "error": "boom\nRunError: shard 1 died",
                 "warmup": False})
    rows.append({"order": 5, "cell": "w/inproc", "parts": {"workload": "w",
                 "transport": "inproc"}, "repeat": 0, "ok": True, "warmup": True,
                 "wall_s": 100.0})
    md = report.render(rows, "inproc")
    assert printed_ratio(ratio_table(md)["w/ray"]["total wall"]) == pytest.approx(4.0)
    assert "1 failed" in md
    assert "RunError: shard 1 died" in md.split("## Failures", 1)[1]
    assert report.cell_values(rows, "w/inproc", "wall_s") == [1.0, 1.0]


def test_baseline_by_setting_pairs_each_cell_with_its_counterpart() -> None:
    rows: list[dict[str, Any]] = []
    for k in range(2):
        for t in ("inproc", "ray"):
            for c in ("10", "100"):
                parts = {"workload": "w1", "transport": t, "workload.clients": c}
                rows.append({"order": len(rows), "cell": f"w1/{t}/workload.clients={c}",
                             "parts": parts, "repeat": k, "ok": True,
                             "wall_s": (2.0 if t == "ray" else 1.0) * int(c)})
    pairs = report.resolve_baseline(rows, "workload.clients=10")
    assert pairs == {"w1/inproc/workload.clients=100": "w1/inproc/workload.clients=10",
                     "w1/ray/workload.clients=100": "w1/ray/workload.clients=10"}
    assert report.resolve_baseline(rows, "inproc") == {
        "w1/ray/workload.clients=10": "w1/inproc/workload.clients=10",
        "w1/ray/workload.clients=100": "w1/inproc/workload.clients=100"}
    whole = report.resolve_baseline(rows, "w1/ray/workload.clients=100")
    assert set(whole) == set(report.cells(rows)) - {"w1/ray/workload.clients=100"}
    assert report.default_baseline(rows) == "inproc"
    table = ratio_table(report.render(rows, "inproc"))
    assert printed_ratio(table["w1/ray/workload.clients=100"]["total wall"]) == 2.0


def test_unknown_baseline_names_the_choices() -> None:
    rows = make_rows({"inproc": [1.0], "ray": [2.0]})
    with pytest.raises(report.ReportError, match=r"'grpc'.*choose one of: .*inproc.*ray"):
        report.resolve_baseline(rows, "grpc")


def test_empty_rows_are_an_error() -> None:
    with pytest.raises(report.ReportError, match="no runs"):
        report.render([])


def _curve_rows(clients: tuple[str, ...]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for k in range(2):
        for t in ("inproc", "ray"):
            for c in clients:
                n = int(c)
                rows.append({
                    "order": len(rows), "cell": f"w/{t}/protocol.clients={c}",
                    "parts": {"workload": "w", "transport": t, "protocol.clients": c},
                    "repeat": k, "ok": True, "wall_s": 1.0 + k, "round_s": 0.1 * n,
                    "bytes": 1000 * n, "bytes_per_round": 500 * n, "peak_rss_mb": 100.0 + n,
                    "curve": [{"round": r, "accuracy": 0.5 + 0.1 * r, "bytes": 500.0 * n * r}
                              for r in (1, 2)],
                })
    return rows


def test_plots_are_written(tmp_path: Path) -> None:
    written = report.plot_all(_curve_rows(("2", "4")), tmp_path)
    names = sorted(p.name for p in written)
    assert names == sorted([*report.PLOTS, report.SCALING_PLOT])
    for p in written:
        assert p.read_bytes()[:8] == PNG, p


def test_no_scaling_plot_without_a_client_count(tmp_path: Path) -> None:
    rows = _curve_rows(("2",))
    assert report.client_key(rows) is None
    written = report.plot_all(rows, tmp_path)
    assert sorted(p.name for p in written) == sorted(report.PLOTS)
    assert not (tmp_path / report.SCALING_PLOT).exists()


def test_report_lists_runs_in_order_and_links_plots() -> None:
    rows = _curve_rows(("2", "4"))
    md = report.render(rows, None, plots=["time_per_round.png"])
    runs = md.split("## Runs, in the order they ran", 1)[1]
    listed = re.findall(r"^\| (\d+) \| `([^`]+)`", runs, flags=re.M)
    assert [int(i) for i, _ in listed] == list(range(len(rows)))
    assert [c for _, c in listed] == [r["cell"] for r in rows]
    assert "![time per round](time_per_round.png)" in md
