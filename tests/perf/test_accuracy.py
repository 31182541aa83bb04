"""Accuracy studies in `fedloom perf compare`: seeds as a dimension, the "Accuracy over seeds"
table recomputed from rows (mean ± std, rounds and bytes to a target, per-client spread, the
same-model check), the banded curve plot, argument checks, and a real tiny study of two
protocols over two seeds on two transports."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perf import accuracy, cli, compare, report
from tests.perf.test_report import PNG


def acc_table(md: str) -> dict[str, dict[str, str]]:
    """The "Accuracy over seeds" table of a report.md as {group: {column: text}}."""
    section = md.split("## Accuracy over seeds", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return {c[0].strip("`"): dict(zip(header, c, strict=True))
            for ln in lines[2:] if (c := [x.strip() for x in ln.strip("|").split("|")])}


def study(curves: dict[str, dict[int, list[float]]], transports: tuple[str, ...] = ("inproc",),
          sha: Any = None) -> list[dict[str, Any]]:
    """Rows of a study: group -> seed -> accuracy per round; 100 bytes a round; the model hash
    from `sha(group, seed, transport)` (default: one per group and seed)."""
    rows: list[dict[str, Any]] = []
    for t in transports:
        for g, per_seed in curves.items():
            for seed, accs in per_seed.items():
                h = sha(g, seed, t) if sha else f"{g}-{seed}"
                rows.append({
                    "order": len(rows), "cell": f"{g}/{t}/seed={seed}",
                    "parts": {"workload": g, "transport": t, "seed": str(seed)},
                    "repeat": 0, "ok": True, "warmup": False, "test_accuracy": accs[-1],
                    "final_model_sha256": h, "wall_s": 2.0 + seed, "rounds_s": 1.0 + seed,
                    "curve": [{"round": i + 1, "accuracy": a, "bytes": 100 * (i + 1)}
                              for i, a in enumerate(accs)]})
    return rows


@settings(max_examples=30, deadline=None)
@given(curves=st.lists(st.lists(st.floats(0, 1), min_size=3, max_size=3), min_size=1,
                       max_size=4),
       target=st.floats(0.05, 1))
def test_the_table_is_recomputed_from_the_rows(curves: list[list[float]], target: float) -> None:
    rows = study({"fedavg": dict(enumerate(curves))})
    got = acc_table(report.render(rows, target=target))["fedavg"]
    finals = [c[-1] for c in curves]
    sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
    assert got["final accuracy"] == f"{statistics.fmean(finals):.4f} ± {sd:.4f}"
    hits = [next(i + 1 for i, a in enumerate(c) if a >= target) for c in curves
            if max(c) >= target]
    col = got[f"rounds to {target:g}"]
    assert col.endswith(f"({len(hits)}/{len(curves)})")
    if hits:
        assert col.startswith(f"{statistics.fmean(hits):.1f} ±")
        mib = statistics.fmean(100 * h / 2**20 for h in hits)
        assert got[f"MiB to {target:g}"].startswith(f"{mib:.2f} ±")
    else:
        assert col.startswith("–") and got[f"MiB to {target:g}"] == "–"


def test_same_model_check_names_the_seed_that_differs() -> None:
    curves = {"scaffold": {0: [0.1, 0.5], 1: [0.2, 0.6]}}
    same = study(curves, ("inproc", "grpc"))
    assert acc_table(report.render(same))["scaffold"]["same model"] == \
        "yes (2 run(s) per seed on grpc, inproc)"
    differ = study(curves, ("inproc", "grpc"),
                   sha=lambda g, s, t: "x" if (s, t) == (1, "grpc") else f"{g}{s}")
    assert acc_table(report.render(differ))["scaffold"]["same model"] == \
        "NO — seed 1: 2 models in 2 runs"


def test_overhead_is_paired_by_seed_against_the_first_group() -> None:
    rows = study({"fedavg": {0: [0.5], 1: [0.5]}, "feddyn": {0: [0.5], 1: [0.5]}})
    for r in rows:
        if r["parts"]["workload"] == "feddyn":
            r["rounds_s"] *= 1.5 if r["parts"]["seed"] == "0" else 1.25
    table = acc_table(report.render(rows))
    assert table["fedavg"]["rounds-only vs first"] == "1.000x"
    assert table["feddyn"]["rounds-only vs first"] == f"{statistics.median([1.5, 1.25]):.3f}x"
    # Seeds are never the default baseline: the first workload is.
    assert report.default_baseline(rows) == "fedavg"


def test_client_spread_from_a_list_a_table_or_round_fields() -> None:
    s = compare.client_spread({"client_accuracy": [0.5, 1.0, 0.75, 0.25]}, [])
    assert s == {"mean": 0.625, "std": pytest.approx(statistics.pstdev([0.5, 1, 0.75, 0.25])),
                 "p10": pytest.approx(0.325), "min": 0.25}
    table = {"mean": 0.8, "std": 0.1, "p10": 0.6, "worst": 0.5}
    assert compare.client_spread({"client_accuracy": table}, []) == \
        {"mean": 0.8, "std": 0.1, "p10": 0.6, "min": 0.5}
    last = {"name": "round", "client_acc_mean": 0.7, "client_acc_std": 0.2,
            "client_acc_p10": 0.4, "client_acc_min": 0.3}
    assert compare.client_spread({}, [last])["p10"] == 0.4
    assert compare.client_spread({}, [{"name": "round"}]) is None
    rows = study({"fedavg": {0: [0.5], 1: [0.7]}})
    rows[0]["client_accuracy"] = {"mean": 0.4, "std": 0.2, "p10": 0.1, "min": 0.0}
    rows[1]["client_accuracy"] = {"mean": 0.6, "std": 0.1, "p10": 0.3, "min": 0.2}
    got = acc_table(report.render(rows))["fedavg"]["per-client acc mean / std / p10 / worst"]
    assert got == "0.500 / 0.150 / 0.200 / 0.100"


def test_band_plot_and_cells_with_seeds(tmp_path: Path) -> None:
    rows = study({"a": {0: [0.1, 0.5], 1: [0.3, 0.7]}})
    rounds, mean, lo, hi = accuracy.curve_stats(accuracy.groups(rows)["a"], "minmax")
    assert (rounds, lo, hi) == ([1, 2], [0.1, 0.5], [0.3, 0.7])
    assert mean == pytest.approx([0.2, 0.6])
    _, _, lo, hi = accuracy.curve_stats(accuracy.groups(rows)["a"], "std")
    assert hi[0] - lo[0] == pytest.approx(2 * statistics.stdev([0.1, 0.3]))
    path = accuracy.plot(rows, tmp_path, "std", 0.5)
    assert path is not None and path.read_bytes()[:8] == PNG
    m = compare.Matrix(configs=[Path("fedavg.toml")], transports=["inproc", "grpc"], seeds=[0, 7])
    assert [(c.label, c.sets) for c in m.cells()] == [
        ("fedavg/inproc/seed=0", ("transport.kind=inproc", "run.seed=0")),
        ("fedavg/inproc/seed=7", ("transport.kind=inproc", "run.seed=7")),
        ("fedavg/grpc/seed=0", ("transport.kind=grpc", "run.seed=0")),
        ("fedavg/grpc/seed=7", ("transport.kind=grpc", "run.seed=7"))]
    m.seed_keys = ["run.seed", "data.seed"]
    assert m.cells()[1].sets == ("transport.kind=inproc", "run.seed=7", "data.seed=7")


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "0,x"], "--seeds: expected integers"),
    (["--seeds", "0,-1"], "--seeds: expected integers >= 0"),
    (["--target", "90"], "--target: expected an accuracy in (0, 1]"),
    (["--band", "iqr"], "--band: invalid choice"),
])
def test_bad_arguments_are_named(args: list[str], message: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["compare", str(tmp_path / "a.toml"), *args])
    assert message in capsys.readouterr().err.replace("argument ", "")


def test_a_seed_listed_twice_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[run]\nrounds = 1\n")
    with pytest.raises(compare.CompareError, match=r"--seeds lists a seed twice"):
        compare.run_matrix(compare.Matrix(configs=[cfg], seeds=[1, 1]), tmp_path / "o")


# -- a real tiny study ------------------------------------------------------------------------

CONFIG = """\
[run]
rounds = 3
[protocol]
name = "{name}"
[workload]
model = "linear"
clients = 4
input_dim = 16
classes = 4
samples_per_client = 32
samples_min = 8
test_samples = 100
"""


@pytest.mark.grpc
@pytest.mark.slow
def test_two_protocols_two_seeds_two_transports(tmp_path: Path) -> None:
    for name in ("fedavg", "scaffold"):
        (tmp_path / f"{name}.toml").write_text(CONFIG.format(name=name))
    out = tmp_path / "out"
    code = cli.main(["compare", str(tmp_path / "fedavg.toml"), str(tmp_path / "scaffold.toml"),
                     "--seeds", "0,1", "--transports", "inproc,grpc", "--target", "0.3",
                     "--timeout", "120", "--out", str(out)])
    rows = compare.load_rows(out)
    assert code == 0, [r.get("error") for r in rows if not r["ok"]]
    assert len(rows) == 8 and all(r["repeat"] == 0 for r in rows)
    assert {r["seed"] for r in rows} == {0, 1}
    assert json.loads((out / "matrix.json").read_text())["seeds"] == [0, 1]
    md = (out / "report.md").read_text()
    table = acc_table(md)
    assert list(table) == ["fedavg", "scaffold"]
    for g in table:
        assert table[g]["same model"] == "yes (2 run(s) per seed on grpc, inproc)"
        finals = [r["test_accuracy"] for r in rows
                  if r["parts"]["workload"] == g and r["parts"]["transport"] == "inproc"]
        assert table[g]["final accuracy"].startswith(f"{statistics.fmean(finals):.4f} ±")
    assert (out / accuracy.PLOT).read_bytes()[:8] == PNG
    assert f"]({accuracy.PLOT})" in md
    # Rebuilding with another target changes only what depends on it.
    cli.main(["report", str(out), "--target", "0.2"])
    assert "rounds to 0.2" in (out / "report.md").read_text()


def test_study_tunes_on_its_own_seed_then_compares_over_seeds(tmp_path: Path) -> None:
    from perf import study

    base = tmp_path / "base.toml"
    base.write_text(CONFIG.format(name="fedavg"))
    code = study.main([str(base), "--alphas", "0.1", "--alpha-key", "workload.lr", "--seeds",
                       "0,1", "--seed-keys", "run.seed", "--tune-seed", "5",
                       "--algorithms", "FedAvg,FedDyn", "--target", "0.3",
                       "--out", str(tmp_path / "s")])
    assert code == 0
    grid = json.loads((tmp_path / "s/grid.json").read_text())["alpha-0.1"]["FedDyn"]
    assert grid["key"] == "alpha" and list(grid["values"]) == ["0.01", "0.1"]
    assert grid["chosen"] == float(max(grid["values"], key=lambda v: (grid["values"][v],
                                                                     -float(v))))
    grid_rows = compare.load_rows(tmp_path / "s/alpha-0.1/grid")
    assert {r["seed"] for r in grid_rows} == {5} and len(grid_rows) == 2
    final = compare.load_rows(tmp_path / "s/alpha-0.1/final")
    assert sorted((r["parts"]["workload"], r["seed"]) for r in final) == [
        ("FedAvg", 0), ("FedAvg", 1), ("FedDyn", 0), ("FedDyn", 1)]
    table = (tmp_path / "s/table.md").read_text().splitlines()
    assert table[0].startswith("| algorithm | α=0.1 accuracy | α=0.1 rounds to 0.3 |")
    assert table[2].startswith("| FedAvg |") and table[3].startswith("| FedDyn |")
    assert f"alpha ∈ {{0.01, 0.1}}: {grid['chosen']:g} | yes |" in table[3]


def test_without_accuracy_the_report_still_says_whether_models_agree() -> None:
    rows = study({"w3": {0: [0.5]}}, ("inproc", "ray"),
                 sha=lambda g, s, t: "a" if t == "inproc" else "b")
    for r in rows:
        r["test_accuracy"] = None
        r["curve"] = []
    md = report.render(rows)
    assert "## Accuracy over seeds" not in md
    assert "| `w3` | 1 | NO — seed 0: 2 models in 2 runs |" in md
