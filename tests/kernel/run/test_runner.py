"""The runner end to end on inproc with a tiny protocol, the outputs it writes, the model hash
and the progress display."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kernel import registry
from kernel.api import Context, Deployment, Protocol, RunError
from kernel.messages import Message
from kernel.options import options
from kernel.registry import declare
from kernel.run.outputs import FILES, model_sha256, read_metrics
from kernel.run.progress import Progress
from kernel.run.runner import execute, run

# -- a toy protocol: node 0 averages the other nodes' vectors, round after round -------------

TOY_DEFAULTS = {"nodes": 3, "dim": 4, "fail_round": 0, "mode": "average"}


class Toy(Protocol):
    """Node 0 multicasts its vector each round; every other node replies with that vector plus
    noise from its seeded rng; node 0 averages the replies in sender order, weighted by id.

    Modes: "average" (the above), "stall" (nobody replies: the run goes idle), "tick" (node 0
    sets a 1 s timer forever: only a time or event limit ends the run)."""

    def __init__(self, rounds: int, p: Mapping[str, Any]) -> None:
        self.rounds = rounds
        self.p = p
        self.x = np.zeros(p["dim"], dtype=np.float32)
        self.r = 0
        self.replies: dict[int, Message] = {}

    def on_start(self, ctx: Context) -> None:
        if ctx.id != 0:
            return
        if self.p["mode"] == "tick":
            ctx.set_timer(1.0, "tick")
        else:
            self._next_round(ctx)

    def on_timer(self, ctx: Context, key: Any) -> None:
        ctx.set_timer(1.0, key)

    def _next_round(self, ctx: Context) -> None:
        self.r += 1
        self.replies = {}
        ctx.multicast(range(1, ctx.n_nodes), "model", round=self.r, x=self.x)

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind == "model":
            if msg.round == self.p["fail_round"]:
                raise ValueError(f"node {ctx.id} refuses round {msg.round}")
            if self.p["mode"] == "stall":
                return
            noise = ctx.rng.standard_normal(msg.x.shape).astype(np.float32)
            ctx.send(0, "update", round=msg.round, x=msg.x + noise, weight=ctx.id)
            return
        self.replies[msg.src] = msg
        if len(self.replies) < ctx.n_nodes - 1:
            return
        # Canonical order (sorted by sender), never arrival order.
        senders = sorted(self.replies)
        weights = np.array([self.replies[s].weight for s in senders], dtype=np.float64)
        stack = np.stack([self.replies[s].x for s in senders]).astype(np.float64)
        self.x = (weights @ stack / weights.sum()).astype(np.float32)
        ctx.emit("round", self.r, accuracy=float(1.0 / (1.0 + np.abs(self.x).mean())),
                 loss=np.float32(np.abs(self.x).mean()), x=self.x)
        if self.r == self.rounds:
            ctx.finish({"model": {"w": self.x, "b": self.x[:2] * 2}, "rounds": self.r,
                        "test_accuracy": 0.5, "note": "done", "n": np.int64(ctx.n_nodes)})
        else:
            self._next_round(ctx)


@declare("protocols")
def build_toy(config: Mapping[str, Any]) -> Deployment:
    """The toy's plugin entry: validates [protocol] like a real protocol does."""
    p = options("protocol", {k: v for k, v in config["protocol"].items() if k != "name"},
                TOY_DEFAULTS, choices={"mode": ("average", "stall", "tick")})
    rounds = config["run"]["rounds"]
    return Deployment(node_ids=range(p["nodes"]), make_node=lambda i: Toy(rounds, p), params=p)


registry.register("protocols", "toy", build_toy)


def toy_config(**protocol: Any) -> dict[str, Any]:
    return {
        "run": {"seed": 1, "rounds": 3, "progress": False},
        "transport": {"kind": "inproc", "strict": True},
        "protocol": {"name": "toy", **protocol},
    }


# -- end to end --------------------------------------------------------------------------------

def test_run_writes_all_four_files_consistent_with_the_result(tmp_path: Path) -> None:
    result = run(toy_config(), tmp_path, quiet=True)

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk == result
    assert result["protocol"] == "toy" and result["transport"] == "inproc"
    assert result["seed"] == 1 and result["rounds"] == 3
    assert result["reason"] == "finished" and result["finished_by"] == 0
    assert result["test_accuracy"] == 0.5
    assert result["extra"] == {"note": "done", "n": 3}
    # 3 rounds x (2 model sends + 2 updates).
    assert result["messages"] == 12 and result["bytes"] > 0 and result["events"] >= 12
    assert result["virtual_s"] == 0.0  # no network model: virtual time never moves
    for key in ("wall_s", "rounds_s", "startup_s", "build_s", "peak_rss_mb"):
        assert isinstance(result[key], float) and result[key] >= 0, key
    assert result["peak_rss_mb"] > 10

    model = np.load(tmp_path / "final_model.npz")
    assert sorted(model.files) == ["b", "w"]
    assert model["w"].dtype == np.float32 and model["w"].shape == (4,)
    assert model_sha256({k: model[k] for k in model.files}) == result["final_model_sha256"]

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["value"] for r in rows] == [1, 2, 3]
    assert all(r["name"] == "round" and r["node"] == 0 and r["t"] == 0.0 for r in rows)
    assert rows[-1]["x"] == pytest.approx(model["w"].tolist())
    assert isinstance(rows[0]["loss"], float)

    ran = tomllib.loads((tmp_path / "config.toml").read_text())
    assert ran["protocol"] == {"name": "toy"}
    assert ran["run"] == {"seed": 1, "rounds": 3, "progress": False}
    assert ran["transport"] == {"kind": "inproc", "strict": True}


def test_same_config_same_metrics_and_model_and_seed_changes_them(tmp_path: Path) -> None:
    texts, shas = [], []
    for i, seed in enumerate((5, 5, 6)):
        cfg = toy_config()
        cfg["run"]["seed"] = seed
        out = tmp_path / str(i)
        shas.append(run(cfg, out, quiet=True)["final_model_sha256"])
        texts.append(read_metrics(out / "metrics.jsonl", drop_wall=True))
    assert texts[0] == texts[1] and shas[0] == shas[1]
    assert texts[0] != texts[2] and shas[0] != shas[2]


def test_written_config_runs_again_to_the_same_model(tmp_path: Path) -> None:
    first = run(toy_config(dim=3), tmp_path / "a", quiet=True)
    again = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    second = run(again, tmp_path / "b", quiet=True)
    assert first["final_model_sha256"] == second["final_model_sha256"]


def test_a_node_that_raises_surfaces_as_run_error_naming_it() -> None:
    with pytest.raises(RunError, match=r"node [12] .*refuses round 2"):
        execute(toy_config(fail_round=2), quiet=True)


def test_run_that_goes_idle_reports_it_and_writes_no_model(tmp_path: Path) -> None:
    (tmp_path / "final_model.npz").write_bytes(b"stale")
    result = run(toy_config(mode="stall"), tmp_path, quiet=True)
    assert result["reason"] == "idle"
    assert result["final_model_sha256"] is None and result["finished_by"] is None
    assert result["rounds"] == 0
    assert not (tmp_path / "final_model.npz").exists()


@pytest.mark.parametrize(
    ("run_keys", "reason"),
    [({"time_limit": 5.5}, "until"), ({"max_events": 7}, "max_events")],
)
def test_limits_reach_the_transport(run_keys: dict[str, Any], reason: str) -> None:
    cfg = toy_config(mode="tick")
    cfg["run"].update(run_keys)
    result = execute(cfg, quiet=True).result
    assert result["reason"] == reason
    if reason == "until":
        assert result["virtual_s"] == 5.5 and result["events"] == 5
    else:
        assert result["events"] == 7


def test_save_model_false_writes_no_npz(tmp_path: Path) -> None:
    cfg = toy_config()
    cfg["output"] = {"save_model": False}
    result = run(cfg, tmp_path, quiet=True)
    assert result["final_model_sha256"] is not None
    assert not (tmp_path / "final_model.npz").exists()


def test_progress_is_driven_by_round_rows() -> None:
    stream = io.StringIO()
    execute(toy_config(), progress=Progress(3, stream))
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["round 1/3", "round 2/3", "round 3/3"]
    assert "accuracy" in lines[0] and "loss" in lines[0] and "ETA" in lines[1]


def test_quiet_and_progress_false_show_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    execute(toy_config(), quiet=True)
    cfg = toy_config()
    cfg["run"]["progress"] = False
    execute(cfg)
    assert capsys.readouterr() == ("", "")


def test_progress_bar_redraws_one_line_on_a_terminal() -> None:
    stream = io.StringIO()
    clock = iter([0.0, 10.0, 12.0, 13.0]).__next__
    bar = Progress(4, stream, bar=True, clock=clock)
    bar.update({"name": "round", "value": 1, "accuracy": 0.25, "bytes": 2_500_000})
    bar.update({"name": "other", "value": 9})
    bar.update({"name": "round", "value": 2})
    bar.update({"name": "round", "value": 3})
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    first, second, third = text.split("\r")[1:]
    assert first.startswith("[######.....") and "round 1/4" in first
    assert "accuracy 0.2500" in first and "2.5 MB" in first and "10.0s" in first
    assert "ETA" not in first  # one round says nothing about the rate (start-up is in it)
    assert "ETA 4s" in second and "ETA 2s" in third  # 2 s then 1.5 s per round since round 1


def test_status_rows_show_on_the_progress_line() -> None:
    """A transport saying what it waits for (a "status" row) is shown between rounds."""
    stream = io.StringIO()
    plain = Progress(2, stream, bar=False)
    plain.update({"name": "status", "value": "ray: waiting for 2 shards"})
    plain.update({"name": "round", "value": 1})
    assert stream.getvalue().splitlines()[0] == "ray: waiting for 2 shards"
    stream = io.StringIO()
    bar = Progress(2, stream, bar=True)
    bar.update({"name": "status", "value": "ray: started"})
    bar.update({"name": "round", "value": 1})
    bar.update({"name": "status", "value": "ray: waiting"})
    bar.close()
    lines = stream.getvalue().split("\n")
    assert lines[0] == "ray: started" and "round 1/2" in lines[1]  # the bar stays above
    assert lines[2] == "ray: waiting" and lines[3] == ""


# -- the model hash ----------------------------------------------------------------------------

arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.float16]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
)
models = st.dictionaries(st.text(min_size=1, max_size=8), arrays, min_size=1, max_size=4)


@given(models, st.randoms())
def test_sha_ignores_insertion_order_layout_and_byte_order(model: dict, rnd: Any) -> None:
    names = list(model)
    rnd.shuffle(names)
    shuffled = {n: model[n] for n in names}
    assert model_sha256(shuffled) == model_sha256(model)
    swapped = {n: a.astype(a.dtype.newbyteorder(">")) for n, a in model.items()}
    assert model_sha256(swapped) == model_sha256(model)
    fortran = {n: np.asfortranarray(a) for n, a in model.items()}
    assert model_sha256(fortran) == model_sha256(model)


@given(models, st.data())
def test_any_bit_flip_changes_the_sha(model: dict, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(model)))
    a = model[name]
    assume(a.nbytes > 0)
    bit = data.draw(st.integers(0, a.nbytes * 8 - 1))
    flipped = np.ascontiguousarray(a).copy()
    flipped.reshape(-1).view(np.uint8)[bit // 8] ^= np.uint8(1 << (bit % 8))
    assert model_sha256({**model, name: flipped}) != model_sha256(model)


def test_sha_depends_on_names_dtypes_and_shapes() -> None:
    a = np.arange(6, dtype=np.float32)
    base = model_sha256({"w": a})
    assert model_sha256({"v": a}) != base
    assert model_sha256({"w": a.reshape(2, 3)}) != base
    assert model_sha256({"w": a.view(np.int32)}) != base
    assert model_sha256({"w": a[:3], "x": a[3:]}) != model_sha256({"w": a[:4], "x": a[4:]})
    assert model_sha256({"w": a}) == base


def test_sha_of_torch_tensors_equals_sha_of_numpy() -> None:
    torch = pytest.importorskip("torch")
    a = np.linspace(0, 1, 10, dtype=np.float32)
    assert model_sha256({"w": torch.from_numpy(a.copy())}) == model_sha256({"w": a})


def test_building_imports_no_torch_until_prepare() -> None:
    """A ray or grpc driver builds the deployment only to place nodes: no torch there. Where
    nodes run, `prepare` imports it before the first round."""
    code = (
        "import sys, tomllib\n"
        "from protocols import fedavg\n"
        "cfg = tomllib.load(open('perf/workloads/w1.toml', 'rb'))\n"
        "dep = fedavg.build(cfg)\n"
        "assert 'torch' not in sys.modules, 'build imported torch'\n"
        "dep.prepare()\n"
        "assert 'torch' in sys.modules, 'prepare did not import torch'\n"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
