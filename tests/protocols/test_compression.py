"""Error feedback: what a node sends is exactly what its receiver decodes, the sum of what it
sent tracks the sum of its true updates (the residual stays bounded), and `fedavg_ef` runs
FedAvg on compressed deltas without changing protocols.fedavg."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.messages import Message
from kernel.options import ConfigError
from kernel.run.runner import execute
from kernel.wire.codec import Codec, join
from kernel.wire.stages import Rules
from protocols.compression import ErrorFeedback

RULES: dict[str, dict[str, Any]] = {
    "topk": {"stages": ["topk"], "fraction": 0.05},
    "topk+int8": {"stages": ["topk", "int8"], "fraction": 0.05},
    "randk": {"stages": ["randk"], "fraction": 0.1},
    "int8": {"stages": ["int8"], "block": 16},
    "int4-stochastic": {"stages": ["int4"], "block": 16, "stochastic": True},
    "fp16": {"stages": ["fp16"]},
}


def _ef(name: str, **kw: Any) -> tuple[ErrorFeedback, dict[str, Any]]:
    section = {"rules": [{"kind": "update", "tensors": "delta/*", **RULES[name]}]}
    return ErrorFeedback.from_config(section, "update", "delta", **kw), section


@st.composite
def update_sequences(draw: Any) -> list[dict[str, np.ndarray]]:
    """A few rounds of updates for tensors "a" and "b", of one scale or of wildly varying ones."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 300))
    steps = draw(st.integers(1, 25))
    scales = (rng.choice([1e-6, 1.0, 1e3], steps) if draw(st.booleans())
              else np.full(steps, draw(st.sampled_from([1e-3, 1.0, 50.0]))))
    return [{"a": (rng.standard_normal(n) * s).astype(np.float32),
             "b": (rng.standard_normal((3, 4)) * s).astype(np.float32)} for s in scales]


@settings(max_examples=60, deadline=None)
@given(seq=update_sequences(), name=st.sampled_from(sorted(RULES)))
def test_sum_of_sent_tracks_sum_of_true_updates(seq: list[dict[str, np.ndarray]],
                                                name: str) -> None:
    """Invariant: sum(sent) + residual == sum(true) (to float32 rounding of the running sums),
    and the residual stays bounded by the largest update: for top-k, by q / (1 - q) times the
    largest update's norm, q = sqrt(1 - k/n) (top-k keeps at least k/n of the energy); for the
    quantisers by a fraction of the largest magnitude."""
    ef, _ = _ef(name, seed=7)
    sent_sum: dict[str, np.ndarray] = {}
    true_sum: dict[str, np.ndarray] = {}
    for g in seq:
        sent = ef.compress(4, g)
        for k in g:
            sent_sum[k] = sent_sum.get(k, 0) + sent[k].astype(np.float64)
            true_sum[k] = true_sum.get(k, 0) + g[k].astype(np.float64)
    res = ef.residual(4)
    assert sorted(res) == ["a", "b"]
    for k in ("a", "b"):
        big = max(float(np.abs(g[k]).max()) for g in seq)
        tol = 1e-5 * big * len(seq) + 1e-30
        assert np.allclose(sent_sum[k] + res[k], true_sum[k], rtol=0, atol=tol), k
        r = res[k].astype(np.float64)
        if name == "topk":
            n = r.size
            q = math.sqrt(1 - max(1, math.ceil(0.05 * n - 1e-9)) / n)
            gmax = max(float(np.linalg.norm(g[k])) for g in seq)
            bound = (q / (1 - q) if q < 1 else len(seq)) * gmax
            assert np.linalg.norm(r) <= bound * (1 + 1e-4) + 1e-30
        elif name == "int8":  # |r| <= scale/2 <= max|acc|/127, so <= big/126
            assert np.abs(r).max() <= big / 126 * (1 + 1e-4)
        elif name == "fp16":  # half an ulp: relative 2**-11, or 2**-25 among subnormals
            assert np.abs(r).max() <= (big * 2.0**-11 + 2.0**-25) * (1 + 1e-3)
        elif name == "int4-stochastic":  # |r| < scale <= 2 max|acc|/7, so < 2 big/5
            assert np.abs(r).max() <= 2 * big / 5 * (1 + 1e-4)


@settings(max_examples=30, deadline=None)
@given(seq=update_sequences(), name=st.sampled_from(sorted(RULES)))
def test_what_is_sent_is_what_the_receiver_decodes(seq: list[dict[str, np.ndarray]],
                                                   name: str) -> None:
    ef, section = _ef(name)
    codec = Codec.from_config({**section, "inline_bytes": 0})
    for i, g in enumerate(seq[:4]):
        sent = ef.compress(2, g)
        out = codec.decode(join(codec.encode(Message(2, 0, "update", {"delta": sent}, 0.0, i))))
        for k in g:
            assert out.body["delta"][k].tobytes() == sent[k].tobytes(), (name, k)


def test_error_feedback_off_keeps_nothing_and_untouched_tensors_pass() -> None:
    ef = ErrorFeedback(Rules.from_config([], {"update": ["topk"]}, ()), "update", "delta",
                       enabled=False)
    g: dict[str, Any] = {"a": np.arange(1, 201, dtype=np.float32), "i": np.arange(5)}
    sent = ef.compress(1, g)
    assert np.count_nonzero(sent["a"]) == 2 and sent["i"] is g["i"]
    assert ef.residual(1) == {} and ef.nbytes == 0
    on = ErrorFeedback(Rules.from_config([], {"update": ["topk"]}, ()), "update", "delta")
    on.compress(1, g)
    assert on.nbytes == 800 and on.last.sent_bytes < on.last.raw_bytes
    # The residual of the first call rides along with the second.
    second = on.compress(1, {"a": np.zeros(200, np.float32), "i": g["i"]})
    assert set(np.flatnonzero(second["a"])) == {196, 197}
    on.forget(1)
    assert on.nbytes == 0


# ------------------------------------------------------------------------------------ fedavg_ef

def _config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run": {"seed": 1, "rounds": 4, "progress": False},
        "transport": {"kind": "inproc", "strict": True},
        "protocol": {"name": "protocols.compression:fedavg_ef", "clients_per_round": 4},
        "workload": {"model": "linear", "clients": 8, "samples_per_client": 64,
                     "test_samples": 400},
    }
    for key, value in over.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return cfg


def test_fedavg_ef_learns_on_compressed_deltas_deterministically() -> None:
    codec = {"stages": {"train": "fp16"},
             "rules": [{"kind": "update", "stages": ["topk", "int8"], "fraction": 0.1}]}
    first = execute(_config(codec__stages=codec["stages"], codec__rules=codec["rules"]),
                    quiet=True)
    again = execute(_config(codec__stages=codec["stages"], codec__rules=codec["rules"]),
                    quiet=True)
    assert first.result["final_model_sha256"] == again.result["final_model_sha256"]
    acc = [r["accuracy"] for r in first.rows if r["name"] == "round"]
    assert len(acc) == 4 and acc[-1] > acc[0] + 0.2
    comp = [r for r in first.rows if r["name"] == "compression"]
    assert len(comp) == 16 and all(r["sent_bytes"] < r["raw_bytes"] / 4 for r in comp)
    # Compressed runs carry fewer bytes than plain FedAvg's.
    plain = execute(_config(protocol__name="fedavg"), quiet=True)
    assert first.result["bytes"] < plain.result["bytes"] / 1.5


def test_fedavg_ef_without_stages_is_fedavg() -> None:
    ef = execute(_config(), quiet=True)
    plain = execute(_config(protocol__name="fedavg"), quiet=True)
    a, b = ef.model, plain.model
    assert a is not None and b is not None
    for k in b:  # global + (trained - global) == trained, to float32 rounding
        assert np.allclose(a[k], b[k], rtol=0, atol=1e-6)


def test_fedavg_ef_checks_its_option() -> None:
    with pytest.raises(ConfigError, match="error_feedback"):
        execute(_config(protocol__error_feedback="yes"), quiet=True)
    with pytest.raises(ConfigError, match="stages"):
        execute(_config(codec__stages={"update": "int9"}), quiet=True)


@pytest.mark.grpc
def test_lossy_stages_give_the_same_model_on_grpc_as_on_inproc() -> None:
    """Stages are projections and seeded by (seed, src, seq): encoding again what strict mode
    already decoded changes nothing, so the shard processes agree with inproc bit for bit."""
    over = {"codec__stages": {"train": "int8"},
            "codec__rules": [{"kind": "update", "stages": ["randk", "int4"], "fraction": 0.3,
                              "stochastic": True}]}
    local = execute(_config(**over), quiet=True)
    remote = execute(_config(transport__kind="grpc", **over), quiet=True)
    assert remote.result["final_model_sha256"] == local.result["final_model_sha256"]
    assert remote.result["bytes"] == local.result["bytes"]
