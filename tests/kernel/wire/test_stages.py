"""Lossy codec stages: each stage's error bound holds for any array, every stage is a
projection, the codec decodes exactly what `stages.apply` predicts, lossless settings stay
bit-exact, and a staged record that lies about its sizes is refused naming the field."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kernel.messages import Message
from kernel.options import ConfigError
from kernel.wire import stages
from kernel.wire.codec import Codec, CodecError, join
from kernel.wire.stages import Pipeline
from tests.kernel.wire.mutation import edits, mutate

# ------------------------------------------------------------------------------- strategies

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Magnitudes where every stage applies (int8/int4 fall back near float32's maximum).
moderate32 = st.floats(min_value=-(2.0**119), max_value=2.0**119, width=32)


@st.composite
def float_arrays(draw: Any, elements: st.SearchStrategy[float] = moderate32,
                 limit: float = 2.0**119) -> np.ndarray:
    """float32 vectors of `elements` (or normals up to `limit`): arbitrary values, or mostly
    zeros, or heavy ties."""
    n = draw(st.integers(1, 700))
    how = draw(st.sampled_from(["any", "sparse", "ties", "gauss"]))
    if how == "gauss":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e20]))
        return np.clip(rng.standard_normal(n) * scale, -limit, limit).astype(np.float32)
    a = draw(hnp.arrays(np.float32, n, elements=elements))
    if how == "sparse":
        a[np.random.default_rng(n).random(n) < 0.8] = 0
    elif how == "ties":
        a = np.resize(a[: draw(st.integers(1, 3))], n)
    return a


pipelines = st.builds(
    Pipeline,
    sparsifier=st.sampled_from([None, "topk", "randk"]),
    encoder=st.sampled_from([None, "fp16", "bf16", "int8", "int4"]),
    fraction=st.sampled_from([0.001, 0.05, 0.5, 1.0]),
    k=st.sampled_from([0, 0, 1, 7]),
    block=st.sampled_from([0, 1, 5, 64]),
    stochastic=st.booleans(),
)


def _rng(seed: int) -> Any:
    return lambda: np.random.default_rng(seed)


def _scale_exp(amax: float, levels: int) -> int:
    """The smallest e (at least -126) with amax <= levels * 2**e: the scale the stage must use."""
    if amax == 0:
        return stages.E_MIN
    e = math.ceil(math.log2(amax / levels))
    while levels * 2.0 ** (e - 1) >= amax:
        e -= 1
    while levels * 2.0 ** e < amax:
        e += 1
    return max(e, stages.E_MIN)


def _codec_roundtrip(codec: Codec, value: Any, kind: str = "update", seq: int = 1) -> Any:
    msg = Message(3, 0, kind, {"w": value, "r": 1}, 0.0, seq)
    return codec.decode(join(codec.encode(msg))).body["w"]


# ---------------------------------------------------------------------------- error bounds

@given(x=float_arrays(st.floats(min_value=-65504, max_value=65504, width=32), 65504))
def test_fp16_equals_numpy_half_rounding(x: np.ndarray) -> None:
    out = stages.apply(x, Pipeline(encoder="fp16"))
    assert out.tobytes() == x.astype(np.float16).astype(np.float32).tobytes()


@given(x=float_arrays(finite32))
def test_fp16_out_of_range_travels_losslessly(x: np.ndarray) -> None:
    out = stages.apply(x, Pipeline(encoder="fp16"))
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).astype(np.float32)
    if not np.isfinite(ref).all():  # would overflow to inf: sent as it is
        assert out.tobytes() == x.tobytes()
    else:
        assert out.tobytes() == ref.tobytes()


@given(x=float_arrays(st.floats(min_value=-(2.0**127), max_value=2.0**127, width=32), 2.0**127))
def test_bf16_equals_torch_rounding(x: np.ndarray) -> None:
    out = stages.apply(x, Pipeline(encoder="bf16"))
    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    if np.isfinite(ref).all():
        assert out.tobytes() == ref.tobytes()
    else:  # rounds to infinity in bf16: sent as it is
        assert out.tobytes() == x.tobytes()


@settings(max_examples=80)
@given(x=float_arrays(), enc=st.sampled_from(["int8", "int4"]),
       block=st.sampled_from([0, 1, 3, 64]), stochastic=st.booleans(), seed=st.integers(0, 9))
def test_quantisation_error_within_half_a_scale(x: np.ndarray, enc: str, block: int,
                                                stochastic: bool, seed: int) -> None:
    """Deterministic rounding: |x - out| <= scale/2 per element; stochastic: < scale. The scale is
    the smallest power of two that fits the block's largest magnitude in 127 (7) steps."""
    levels = 127 if enc == "int8" else 7
    out = stages.apply(x, Pipeline(encoder=enc, block=block, stochastic=stochastic), _rng(seed))
    b = block or x.size
    for start in range(0, x.size, b):
        xs, os = x[start:start + b].astype(np.float64), out[start:start + b].astype(np.float64)
        s = 2.0 ** _scale_exp(float(np.abs(xs).max()), levels)
        err = np.abs(xs - os)
        assert (err <= (s if stochastic else s / 2)).all(), (s, err.max())
        codes = os / s
        assert (codes == np.round(codes)).all() and (np.abs(codes) <= levels).all()


def test_stochastic_rounding_is_unbiased_and_seeded() -> None:
    x = np.full(20000, 0.3, np.float32)
    pipe = Pipeline(encoder="int8", block=0, stochastic=True)
    a = stages.apply(x, pipe, _rng(1))
    assert abs(a.mean() - 0.3) < 0.002 and len(np.unique(a)) == 2
    assert np.array_equal(a, stages.apply(x, pipe, _rng(1)))
    assert not np.array_equal(a, stages.apply(x, pipe, _rng(2)))


@given(x=float_arrays(finite32), k=st.integers(1, 50))
def test_topk_keeps_exactly_the_k_largest_magnitudes(x: np.ndarray, k: int) -> None:
    """Ties at the k-th magnitude: numpy's argpartition picks which of them are kept."""
    out = stages.apply(x, Pipeline(sparsifier="topk", k=k))
    kept = out != 0
    assert kept.sum() == min(k, np.count_nonzero(x))
    assert np.array_equal(out[kept], x[kept])
    if (~kept).any() and kept.any():
        assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()


@given(x=float_arrays(finite32), k=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_randk_keeps_k_seeded_entries(x: np.ndarray, k: int, seed: int) -> None:
    pipe = Pipeline(sparsifier="randk", k=k)
    enc = stages.encode(x, pipe, _rng(seed))
    assert enc is not None
    idx = np.cumsum(enc.sections[0].astype(np.int64))
    # k random positions, of which only the nonzero ones travel; a k-sparse x is kept whole.
    assert len(idx) <= k and len(np.unique(idx)) == len(idx) and (x[idx] != 0).all()
    if np.count_nonzero(x) <= k:
        assert np.array_equal(idx, np.flatnonzero(x))
    out = stages.apply(x, pipe, _rng(seed))
    assert np.array_equal(out[idx], x[idx]) and np.count_nonzero(np.delete(out, idx)) == 0
    assert np.array_equal(out, stages.apply(x, pipe, _rng(seed)))


def test_randk_selection_depends_on_the_seed() -> None:
    x = np.arange(1, 1001, dtype=np.float32)
    pipe = Pipeline(sparsifier="randk", k=10)
    assert not np.array_equal(stages.apply(x, pipe, _rng(1)), stages.apply(x, pipe, _rng(2)))


# ------------------------------------------------------------------------------ projections

@settings(max_examples=120)
@given(x=float_arrays(), pipe=pipelines, s1=st.integers(0, 99), s2=st.integers(0, 99))
def test_every_stage_is_a_projection(x: np.ndarray, pipe: Pipeline, s1: int, s2: int) -> None:
    """Applied to its own output (with any seed), a pipeline changes nothing: relays and error
    feedback rely on it."""
    if pipe.stochastic and pipe.encoder not in ("int8", "int4"):
        pipe = Pipeline(pipe.sparsifier, pipe.encoder, pipe.fraction, pipe.k, pipe.block)
    once = stages.apply(x, pipe, _rng(s1))
    assert once.tobytes() == stages.apply(once, pipe, _rng(s2)).tobytes()


@settings(max_examples=60)
@given(x=float_arrays(), pipe=pipelines, dtype=st.sampled_from(["float16", "float32", "float64"]),
       shape=st.sampled_from([(-1,), (1, -1)]), inline=st.sampled_from([0, 1024]))
def test_codec_decodes_what_apply_predicts(x: np.ndarray, pipe: Pipeline, dtype: str,
                                           shape: tuple[int, ...], inline: int) -> None:
    rule = {"kind": "update", "stages": list(pipe.names), "block": pipe.block,
            "fraction": pipe.fraction, "k": pipe.k}
    codec = Codec(rules=[rule], inline_bytes=inline, min_compress_bytes=64)
    with np.errstate(over="ignore"):
        a = x.astype(dtype).reshape(shape)
    random = pipe.sparsifier == "randk"
    # Random stages draw the codec's own seed: the codec must leave apply's output unchanged.
    sent = stages.apply(a, Pipeline(pipe.sparsifier, pipe.encoder, pipe.fraction, pipe.k,
                                    pipe.block), _rng(5))
    out = _codec_roundtrip(codec, sent if random else a)
    assert out.dtype == a.dtype and out.shape == a.shape and not out.flags.writeable
    assert out.tobytes() == sent.tobytes()


def test_torch_tensors_come_back_as_torch_of_their_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(300, 7, generator=g)
    for stage in ("fp16", "bf16", "int8", "topk"):
        codec = Codec(stages={"update": stage})
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            v = t.to(dt)
            out = _codec_roundtrip(codec, v)
            assert isinstance(out, torch.Tensor) and out.dtype == dt and out.shape == v.shape
            ref = stages.apply(v.float().numpy(), stages.Rules.from_config(
                [], {"u": stage}, ()).rules[0].pipeline)
            if dt == torch.float32:
                assert np.array_equal(out.numpy(), ref)
    # bf16 values are exact under the bf16 stage; fp16 on float32 is torch's own rounding.
    b = t.to(torch.bfloat16)
    assert torch.equal(_codec_roundtrip(Codec(stages={"update": "bf16"}), b), b)
    assert torch.equal(_codec_roundtrip(Codec(stages={"update": "fp16"}), t), t.half().float())


# ---------------------------------------------------------------------------------- lossless

def test_lossless_settings_round_trip_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5000).astype(np.float32)
    x[::7] = 0
    body: dict[str, Any] = {
        "f": x, "i": np.arange(5000), "t": torch.arange(3000), "c": x.astype(np.complex64),
        "nested": [{"g": x[:100].astype(np.float64)}]}
    for codec in (Codec(rules=[{"kind": "*", "stages": [], "compression": "shuffle+lz4"}]),
                  Codec(rules=[{"kind": "other", "stages": ["int4"]}]),
                  Codec(rules=[{"kind": "*", "tensors": "nested/*", "stages": ["int8"],
                                "min_elements": 101}])):
        out = codec.decode(join(codec.encode(Message(0, 1, "k", body, 0.0)))).body
        for key in ("f", "i", "c"):
            assert out[key].tobytes() == body[key].tobytes()
        assert torch.equal(out["t"], body["t"])
        assert out["nested"][0]["g"].tobytes() == body["nested"][0]["g"].tobytes()
    # Integer tensors under a lossy rule, bodies (results, checkpoints) and non-finite tensors
    # all travel exactly.
    codec = Codec(stages={"*": ["topk", "int4"]})
    out = codec.decode(join(codec.encode(Message(0, 1, "k", {"i": body["i"]}, 0.0)))).body
    assert np.array_equal(out["i"], body["i"])
    assert codec.decode_body(join(codec.encode_body(body)))["f"].tobytes() == x.tobytes()
    bad = x.copy()
    bad[3] = np.nan
    assert _codec_roundtrip(codec, bad, kind="k").tobytes() == bad.tobytes()
    assert codec.stats["fallbacks"] == 1


def test_wrapping_leaves_the_sender_body_alone_and_keeps_containers() -> None:
    x = np.linspace(-1, 1, 2000, dtype=np.float32)
    body: dict[str, Any] = {"m": {"a": x, "n": 3}, "l": [x, "s"], "tu": (x, 1)}
    codec = Codec(stages={"k": "int8"})
    out = codec.decode(join(codec.encode(Message(0, 1, "k", body, 0.0)))).body
    assert body["m"]["a"] is x and body["l"][0] is x and type(body["tu"]) is tuple
    assert type(out["tu"]) is tuple and out["l"][1] == "s" and out["m"]["n"] == 3
    assert np.abs(out["m"]["a"] - x).max() <= 2.0 ** _scale_exp(1.0, 127) / 2


def test_rules_match_kind_and_tensor_names_in_order() -> None:
    x = np.linspace(-1, 1, 2000, dtype=np.float32)
    codec = Codec(rules=[{"kind": "up*", "tensors": "model/0.*", "stages": ["fp16"]},
                         {"kind": "update", "tensors": "model/*", "stages": ["int8"]}],
                  stages={"train": "bf16"})
    body = {"model": {"0.weight": x, "2.weight": x}, "other": x}
    out = codec.decode(join(codec.encode(Message(0, 1, "update", body, 0.0)))).body
    assert np.array_equal(out["model"]["0.weight"], x.astype(np.float16).astype(np.float32))
    assert np.array_equal(out["model"]["2.weight"], stages.apply(x, Pipeline(encoder="int8")))
    assert out["other"].tobytes() == x.tobytes()
    out = codec.decode(join(codec.encode(Message(0, 1, "train", body, 0.0)))).body
    assert np.array_equal(out["other"], stages.apply(x, Pipeline(encoder="bf16")))
    assert codec.lossy and not Codec().lossy


def test_random_stages_are_seeded_by_config_src_and_seq() -> None:
    x = np.arange(1, 2001, dtype=np.float32)
    codec = Codec(stages={"update": "randk"})
    a = _codec_roundtrip(codec, x, seq=1)
    assert np.array_equal(a, _codec_roundtrip(Codec(stages={"update": "randk"}), x, seq=1))
    assert not np.array_equal(a, _codec_roundtrip(codec, x, seq=2))
    assert not np.array_equal(a, _codec_roundtrip(Codec(seed=1, stages={"update": "randk"}), x))


def test_stats_count_bytes_per_stage() -> None:
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    codec = Codec(rules=[{"kind": "update", "stages": ["topk", "int8"], "fraction": 0.1}])
    frame = join(codec.encode(Message(0, 1, "update", {"a": x, "b": x}, 0.0)))
    codec.roundtrip(Message(0, 1, "ping", {"c": x}, 0.0))  # no rule for ping: not counted
    s = codec.stats
    assert s["staged"] == 2 and s["raw_bytes"] == 2 * x.nbytes
    # topk keeps 1000 values (4 bytes) and gaps (1 byte: all under 256 here); int8 makes each
    # value 1 byte, plus a scale per 64-position block that keeps anything.
    blocks = len(np.unique(np.argsort(-np.abs(x))[:1000] // 64))
    assert s["stage_bytes"]["topk"] == 2 * 1000 * 5
    assert s["stage_bytes"]["int8"] == 2 * (1000 + 1000 + blocks)
    assert s["wire_bytes"] <= s["stage_bytes"]["int8"] < len(frame)
    codec.reset_stats()
    assert codec.stats["staged"] == 0 and codec.stats["stage_bytes"] == {}


def test_config_errors_name_the_key() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rules": [{"kind": "u", "stages": ["int9"]}]}, r"rules\[0\]\] stages\[0\] = 'int9'"),
        ({"rules": [{"stages": ["int8", "topk"]}]}, "sparsifier must come first"),
        ({"rules": [{"stages": ["int8", "fp16"]}]}, "only one of"),
        ({"rules": [{"stages": ["topk"], "fraction": 0}]}, "fraction"),
        ({"rules": [{"stages": ["int8"], "block": -1}]}, "block"),
        ({"rules": [{"stages": ["fp16"], "stochastic": True}]}, "stochastic"),
        ({"rules": [{"stages": ["int8"], "compression": "zstd"}]}, "compression"),
        ({"rules": [{"stages": ["int8"], "blok": 3}]}, "blok"),
        ({"rules": [{"kind": ""}]}, "kind"),
        ({"rules": {"kind": "u"}}, "rules"),
        ({"rules": ["int8"]}, "expected a table"),
        ({"stages": {"update": "int3"}}, r"stages\.update\] stages\[0\] = 'int3'"),
        ({"stages": {"update": 8}}, r"stages\.update"),
        ({"seed": -1}, "seed"),
    ]
    for section, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            Codec.from_config(section)
    c = Codec.from_config({"stages": {"update": ["topk", "int8"]}, "seed": 3})
    assert c.rules.rules[0].pipeline == Pipeline("topk", "int8")


# --------------------------------------------------------------------------- hostile frames

def _frame(body: dict[str, Any], payload: bytes = b"") -> bytes:
    h = msgpack.packb([0, 1, "k", 0.0, 1, body], use_bin_type=True)
    head = b"FL\x01M" + struct.pack("<I", len(h)) + h
    return head + bytes(-len(head) % 64) + payload if payload else head


def _staged(shape: tuple[int, ...], specs: list[tuple[int, int, int]],
            sections: list[tuple[int, int, int, int, bytes]], code: int = 10,
            target: int = 1) -> msgpack.ExtType:
    """A staged record; each section is (dtype code, comp, placement, count, inline bytes or
    packed span)."""
    out = struct.pack("<BBBB", code, target, len(shape), len(specs))
    out += struct.pack(f"<{len(shape)}Q", *shape)
    out += b"".join(struct.pack("<BBQ", *s) for s in specs)
    out += bytes((len(sections),))
    for dt, comp, where, count, data in sections:
        out += struct.pack("<BBBQ", dt, comp, where, count) + data
    return msgpack.ExtType(5, out)


F2, U1, U2, I1 = 9, 5, 6, 1
FP16, INT8, TOPK = (1, 0, 0), (3, 0, 0), 5


@pytest.mark.parametrize(("record", "payload", "needle"), [
    (_staged((4,), [FP16], [(F2, 0, 0, 3, bytes(6))]), b"", r"\(values\): count 3; expected 4"),
    (_staged((4,), [FP16], [(U2, 0, 0, 4, bytes(8))]), b"", "dtype uint16; expected float16"),
    (_staged((4,), [FP16], []), b"", "section count 0"),
    (_staged((4,), [(9, 0, 0)], [(F2, 0, 0, 4, bytes(8))]), b"", "unknown stage id 9"),
    (_staged((4,), [FP16, (TOPK, 0, 2)], [(F2, 0, 0, 4, bytes(8))]), b"", "must be the first"),
    (_staged((4,), [(TOPK, 0, 2)], [(U1, 0, 0, 3, bytes(3)), (10, 0, 0, 3, bytes(12))]), b"",
     "count 3 exceeds k = 2"),
    (_staged((10,), [(TOPK, 0, 2)], [(U2, 0, 0, 1, bytes(2)), (10, 0, 0, 1, bytes(4))]), b"",
     "at most 1 bytes"),
    (_staged((10,), [(TOPK, 0, 2)], [(U1, 0, 0, 2, b"\x03\x00"), (10, 0, 0, 2, bytes(8))]),
     b"", "strictly increasing"),
    (_staged((10,), [(TOPK, 0, 2)], [(U1, 0, 0, 2, b"\x03\x09"), (10, 0, 0, 2, bytes(8))]),
     b"", "strictly increasing"),
    (_staged((4,), [INT8], [(I1, 0, 0, 1, b"\x7f"), (I1, 0, 0, 4, bytes(4))]), b"",
     "exponent 127 outside"),
    (_staged((4,), [(3, 0, 2)], [(I1, 0, 0, 1, b"\x00"), (I1, 0, 0, 4, bytes(4))]), b"",
     r"scales\): count 1; expected 2"),
    (_staged((4,), [INT8], [(I1, 0, 0, 1, b"\x00"), (U1, 0, 0, 4, bytes(4))]), b"",
     "dtype uint8; expected int8"),
    (_staged((8,), [(TOPK, 0, 2), (3, 0, 2)], [(U1, 0, 0, 2, b"\x00\x05"),
                                               (I1, 0, 0, 1, b"\x00"), (I1, 0, 0, 2, bytes(2))]),
     b"", "kept positions make 2 blocks"),
    (_staged((4,), [FP16], [(F2, 0, 0, 4, bytes(9))]), b"", "sections account for"),
    (_staged((4,), [FP16], [(F2, 0, 0, 4, bytes(8))], code=3), b"", "float16 .9."),
    (_staged((4,), [FP16], [(F2, 0, 0, 4, bytes(8))], code=14), b"", "bfloat16"),
    (_staged((4,), [FP16], [(F2, 0, 0, 4, bytes(8))], target=3), b"", "target 3"),
    (_staged((4,), [FP16], [(F2, 1, 0, 4, bytes(8))]), b"", "inline with compression"),
    (_staged((2_500_000_000,), [FP16], [(F2, 0, 1, 4, struct.pack("<QQ", 0, 8))]), bytes(8),
     "max_tensor_bytes"),
    (_staged((4,), [FP16], [(F2, 0, 1, 4, struct.pack("<QQ", 0, 6))]), bytes(6), "needs 8"),
    (_staged((4,), [FP16], [(F2, 0, 1, 4, struct.pack("<QQ", 0, 64))]), bytes(8), "truncated"),
    (_staged((400,), [FP16], [(F2, 1, 1, 400, struct.pack("<QQ", 0, 2))]), b"\x00\x00",
     "cannot come from 2 lz4 bytes"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_staged_records_that_lie_are_refused_naming_the_field(record: Any, payload: bytes,
                                                              needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        Codec().decode(_frame({"a": record}, payload))


def _sample_frames() -> list[bytes]:
    x = np.random.default_rng(3).standard_normal(300).astype(np.float32)
    x[::4] = 0
    out = []
    for rule in ({"stages": ["fp16"]}, {"stages": ["int8"], "block": 16},
                 {"stages": ["topk", "int4"], "fraction": 0.2, "block": 32},
                 {"stages": ["randk", "bf16"], "k": 9}, {"stages": ["topk"], "k": 40}):
        for inline in (0, 4096):
            codec = Codec(rules=[{"kind": "k", **rule}], inline_bytes=inline,
                          min_compress_bytes=0, compression="shuffle+lz4")
            body = {"w": x.reshape(3, 100), "t": torch.from_numpy(x[:50].copy()), "n": 1}
            out.append(bytes(join(codec.encode(Message(1, 2, "k", body, 0.5, 9)))))
    return out


SAMPLES = _sample_frames()


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(SAMPLES) - 1),
       changes=edits(("flip", "cut", "set", "insert"), max_size=3))
def test_mutated_staged_frames_only_raise_codec_error(which: int, changes: list) -> None:
    f = mutate(SAMPLES[which], changes)
    try:
        out = Codec().decode(f)
    except CodecError as e:
        assert str(e)
    else:
        assert isinstance(out, Message)


def test_sample_frames_decode_to_dense_arrays() -> None:
    for f in SAMPLES:
        body = Codec().decode(f).body
        assert body["w"].shape == (3, 100) and body["w"].dtype == np.float32
        assert body["t"].dtype == torch.float32 and body["t"].shape == (50,)
