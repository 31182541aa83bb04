"""The codec: what goes in comes out bit for bit, any byte string decodes to a message or a
CodecError within the declared limits, compression keeps only what pays, and config is checked."""

from __future__ import annotations

import enum
import math
import struct
import subprocess
import sys
import tracemalloc
from collections import OrderedDict, namedtuple
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kernel.messages import Message
from kernel.options import ConfigError
from kernel.wire.codec import DEFAULTS, Codec, CodecError, body_nbytes, join
from tests.kernel.wire.mutation import edits, mutate

POLICIES = ("auto", "none", "lz4", "shuffle+lz4")
NP_DTYPES = [np.dtype(d) for d in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                   "uint32", "uint64", "float16", "float32", "float64",
                                   "complex64", "complex128")]
TORCH_DTYPES = [torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.float32,
                torch.float64, torch.complex64, torch.complex128, torch.bfloat16]


# ------------------------------------------------------------------------------- comparison

def _tbytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().numpy(force=True).tobytes()) if t.dtype != torch.bfloat16 else \
        _tbytes(t.view(torch.int16))


def same(a: Any, b: Any) -> bool:
    """Equal in type and bit for bit (NaNs included)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and _tbytes(a) == _tbytes(b)
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def assert_read_only(obj: Any) -> None:
    if isinstance(obj, np.ndarray):
        assert not obj.flags.writeable
    elif isinstance(obj, list | tuple):
        for x in obj:
            assert_read_only(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            assert_read_only(x)


# ------------------------------------------------------------------------------- strategies

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
layouts = st.sampled_from(["as_is", "step", "T", "rev"])


def _layout(a: np.ndarray, how: str) -> np.ndarray:
    if how == "step" and a.ndim:
        return a[::2]
    if how == "T":
        return a.T
    if how == "rev" and a.ndim:
        return a[::-1]
    return a


@st.composite
def big_arrays(draw: Any, dt: np.dtype) -> np.ndarray:
    """Arrays past the inline and compression thresholds: tiled (compressible) or sparse."""
    n = 4 * draw(st.integers(150, 1500))
    if draw(st.booleans()):
        a = np.resize(draw(hnp.arrays(dt, st.integers(1, 12))), n)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        a = np.zeros(n, dt)
        idx = rng.random(n) < draw(st.floats(0.0, 1.0))
        a[idx] = rng.integers(0, 200, int(idx.sum())).astype(dt)
    return a.reshape(draw(st.sampled_from([(-1,), (2, -1), (-1, 2, 2)])))


def arrays_of(dt: np.dtype) -> st.SearchStrategy[np.ndarray]:
    """Arrays of `dt`, small or big, any shape, contiguous or not."""
    return st.tuples(hnp.arrays(dt, shapes) | big_arrays(dt), layouts).map(lambda t: _layout(*t))


arrays = st.sampled_from(NP_DTYPES).flatmap(arrays_of)
np_scalars = st.sampled_from(NP_DTYPES).flatmap(lambda dt: hnp.arrays(dt, ())).map(lambda a: a[()])


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    """Any torch dtype (bfloat16 included), any bits, contiguous or not."""
    dt = draw(st.sampled_from(TORCH_DTYPES))
    if dt == torch.bfloat16:
        a = draw(arrays_of(np.dtype(np.int16)))
        t = torch.from_numpy(a.copy(order="C")).view(torch.bfloat16)
    else:
        a = draw(arrays_of(torch.empty(0, dtype=dt).numpy().dtype))
        t = torch.from_numpy(a.copy(order="C"))
    if t.ndim >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # non-contiguous
    return t


scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10)
           | st.binary(max_size=20) | np_scalars)
keys = st.text(max_size=6) | st.integers(-5, 5) | st.tuples(st.integers(0, 3), st.text(max_size=2))
values = st.recursive(
    scalars | arrays | tensors(),
    lambda ch: (st.lists(ch, max_size=4) | st.tuples(ch, ch)
                | st.dictionaries(keys, ch, max_size=4)),
    max_leaves=8,
)
bodies = st.dictionaries(st.text(max_size=8), values, max_size=5)
codecs = st.builds(
    Codec,
    compression=st.sampled_from(POLICIES),
    min_compress_bytes=st.sampled_from([0, 64, 4096]),
    inline_bytes=st.sampled_from([0, 1024]),
)


# --------------------------------------------------------------------------------- round trip

@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(codec=codecs, body=bodies, src=st.integers(0, 10**6), dst=st.integers(-1, 10**6),
       kind=st.text(max_size=12), sent_at=st.floats(), seq=st.integers(0, 2**63 - 1))
def test_any_message_round_trips_bit_for_bit(codec: Codec, body: dict, src: int, dst: int,
                                             kind: str, sent_at: float, seq: int) -> None:
    msg = Message(src, dst, kind, body, sent_at, seq)
    parts = codec.encode(msg)
    frame = join(parts)
    out = codec.decode(frame)
    assert same(tuple(out), tuple(msg))
    assert_read_only(out.body)
    again, nbytes = codec.roundtrip(msg)
    assert same(tuple(again), tuple(msg)) and nbytes == len(frame)
    assert same(codec.decode_body(join(codec.encode_body(body))), body)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_tensors_come_back_as_torch_every_dtype(policy: str, dtype: torch.dtype) -> None:
    codec = Codec(compression=policy, min_compress_bytes=0, inline_bytes=16)
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(40, 30, generator=g) * 3).round().to(dtype)
    body = {"big": big, "nc": big.t(), "zero_d": big[0, 0].clone(), "empty": big[:0],
            "grad": torch.ones(5, requires_grad=True)}
    out = codec.decode(join(codec.encode(Message(0, 1, "t", body, 0.0)))).body
    for k, v in body.items():
        assert isinstance(out[k], torch.Tensor)
        assert same(out[k], v.detach()), k


def test_containers_and_scalars_keep_their_types() -> None:
    Point = namedtuple("Point", "x y")

    class Colour(str, enum.Enum):  # noqa: UP042 - the old mixin, whose str() is "Colour.RED"
        RED = "red"

    class Number(enum.IntEnum):
        ONE = 1

    body = {"enum": Colour.RED, "int_enum": Number.ONE,
            "t": (1, (2,), ()), "nt": Point(1, 2), "od": OrderedDict(a=1), "f64": np.float64(1.5),
            "i8": np.int8(-3), "b": np.bool_(True), "ba": bytearray(b"ab"), "mv": memoryview(b"cd"),
            "keys": {1: "int", (1, "a"): "tuple", "s": "str"}, "big": 2**64 - 1, "neg": -(2**63)}
    out = Codec().decode_body(join(Codec().encode_body(body)))
    assert out["t"] == (1, (2,), ()) and type(out["t"][1]) is tuple
    assert type(out["nt"]) is tuple and out["nt"] == (1, 2)
    assert type(out["od"]) is dict and out["od"] == {"a": 1}
    assert type(out["f64"]) is np.float64 and type(out["i8"]) is np.int8
    assert type(out["b"]) is np.bool_ and out["b"]
    assert out["ba"] == b"ab" and out["mv"] == b"cd" and type(out["ba"]) is bytes
    assert out["keys"] == body["keys"] and out["big"] == 2**64 - 1 and out["neg"] == -(2**63)
    assert type(out["enum"]) is str and out["enum"] == "red"
    assert type(out["int_enum"]) is int and out["int_enum"] == 1


def test_payloads_are_zero_copy_both_ways() -> None:
    a = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    codec = Codec(compression="auto")
    parts = codec.encode(Message(0, 1, "m", {"a": a}, 0.0))
    assert any(isinstance(p, memoryview) and np.shares_memory(np.frombuffer(p, np.uint8), a)
               for p in parts), "dense payload should be a view of the array, not a copy"
    frame = join(parts)
    assert len(frame) == sum(memoryview(p).nbytes for p in parts)
    out = codec.decode(frame).body["a"]
    assert np.shares_memory(out, np.frombuffer(frame, np.uint8)) and not out.flags.writeable
    assert out.ctypes.data % 64 == np.frombuffer(frame, np.uint8).ctypes.data % 64


def test_decode_accepts_bytes_bytearray_and_unaligned_memoryview() -> None:
    codec = Codec(inline_bytes=0)
    body = {"a": np.arange(300, dtype=np.float64), "t": torch.arange(9.0)}
    msg = Message(3, 4, "k", body, 2.0, 5)
    frame = bytes(join(codec.encode(msg)))
    for data in (frame, bytearray(frame), memoryview(b"x" + frame)[1:]):
        assert same(tuple(codec.decode(data)), tuple(msg))


def test_encode_refuses_what_it_cannot_carry_naming_where() -> None:
    codec = Codec()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"x": object()}, "body['x']"),
        ({"x": [1, {"y": np.array(["s"])}]}, "body['x'][1]['y']"),
        ({"x": np.ma.masked_array([1.0])}, "masked"),
        ({"x": 2**64}, "out of range"),
        ({"x": 1j}, "complex"),
        ({"x": torch.zeros(2).to_sparse()}, "layout"),
    ]
    for body, needle in cases:
        with pytest.raises(CodecError, match=needle.replace("[", r"\[")):
            codec.encode(Message(0, 1, "k", body, 0.0))


def test_import_does_not_import_torch() -> None:
    code = ("import sys, numpy as np; from kernel.wire.codec import Codec, join; "
            "from kernel.messages import Message; c = Codec(); "
            "body = {'a': np.ones(3000), 'b': (1,)}; "
            "m = c.decode(join(c.encode(Message(0, 1, 'k', body, 0.0)))); "
            "assert m.body['b'] == (1,); assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------- compression

def _frame_size(codec: Codec, a: np.ndarray) -> int:
    return len(join(codec.encode(Message(0, 1, "m", {"a": a}, 0.0))))


def test_auto_keeps_only_what_pays() -> None:
    rng = np.random.default_rng(1)
    n = 250_000
    dense = rng.standard_normal(n).astype(np.float32)
    sparse = dense.copy()
    sparse[rng.random(n) < 0.9] = 0
    fp16 = rng.standard_normal(n).astype(np.float16).astype(np.float32)
    auto = Codec()
    assert _frame_size(auto, dense) >= dense.nbytes  # stored raw
    assert dense.nbytes / _frame_size(auto, sparse) > 4
    assert dense.nbytes / _frame_size(auto, fp16) > 1.4  # auto found the shuffle
    assert dense.nbytes / _frame_size(Codec(compression="shuffle+lz4"), fp16) > 1.4
    # Forced lz4 on random data still never sends more than the raw bytes.
    assert _frame_size(Codec(compression="lz4"), dense) < dense.nbytes + 256
    # Below min_compress_bytes nothing is compressed, however compressible.
    zeros = np.zeros(1000, np.float32)
    assert _frame_size(Codec(min_compress_bytes=4096), zeros) >= zeros.nbytes
    assert _frame_size(Codec(min_compress_bytes=1024), zeros) < 1000
    assert _frame_size(Codec(compression="none"), zeros) >= zeros.nbytes


# -------------------------------------------------------------------------- hostile input

def _frame(header: Any, payload: bytes = b"", kind: bytes = b"M") -> bytes:
    h = msgpack.packb(header, use_bin_type=True)
    head = b"FL\x01" + kind + struct.pack("<I", len(h)) + h
    return head + bytes(-len(head) % 64) + payload if payload else head


def _record(code: int, shape: tuple[int, ...], comp: int = 0, span: tuple[int, int] | None = None,
            data: bytes = b"") -> bytes:
    head = struct.pack("<BBBB", code, comp, len(shape), 0 if span is None else 1)
    head += struct.pack(f"<{len(shape)}Q", *shape)
    return head + (data if span is None else struct.pack("<QQ", *span))


def _msg_header(body: Any) -> list[Any]:
    return [0, 1, "k", 0.0, 1, body]


def _decodes_or_codec_error(codec: Codec, data: bytes) -> None:
    try:
        out = codec.decode(data)
    except CodecError as e:
        assert str(e)
    else:
        assert isinstance(out, Message)


SAMPLE = Message(1, 2, "k", {"a": np.arange(400, dtype=np.float32) % 7, "b": (1, [2.5, "x"]),
                             "c": {"d": np.int16(3), 4: b"z"},
                             "t": torch.arange(40, dtype=torch.int16), "s": np.ones((3, 0))},
                 0.5, 9)
VALID_FRAMES = [
    bytes(join(Codec(compression=p, min_compress_bytes=0, inline_bytes=i).encode(SAMPLE)))
    for p, i in (("none", 0), ("lz4", 0), ("shuffle+lz4", 0), ("auto", 1024))
]


@settings(max_examples=400)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_codec_error(data: bytes) -> None:
    _decodes_or_codec_error(Codec(), data)
    _decodes_or_codec_error(Codec(), b"FL\x01M" + struct.pack("<I", len(data) // 2) + data)


@settings(max_examples=500, deadline=None)
@given(which=st.integers(0, len(VALID_FRAMES) - 1), changes=edits())
def test_mutated_frames_only_raise_codec_error(which: int, changes: list) -> None:
    _decodes_or_codec_error(Codec(), mutate(VALID_FRAMES[which], changes))


def test_valid_frames_decode() -> None:
    for f in VALID_FRAMES:
        assert Codec().decode(f).body["b"] == (1, [2.5, "x"])


def _peak_while(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("comp", [0, 1, 2])
def test_small_frame_declaring_10gb_tensor_is_refused_without_allocating(comp: int) -> None:
    shape = (2_500_000_000,)  # float32: 10 GB
    frame = _frame(_msg_header({"w": msgpack.ExtType(1, _record(10, shape, comp, (0, 512)))}),
                   bytes(512))
    assert len(frame) < 1024
    with pytest.raises(CodecError, match="max_tensor_bytes"):
        Codec().decode(frame)
    loose = Codec(max_tensor_bytes=1 << 40, max_message_bytes=1 << 40)
    errors: list[str] = []

    def attempt() -> None:
        try:
            loose.decode(frame)
        except CodecError as e:
            errors.append(str(e))

    assert _peak_while(attempt) < 1 << 20
    assert errors and any(s in errors[0] for s in ("holds 512", "cannot come from 512",
                                                 "decode budget")), errors


def test_crafted_counts_and_nesting_are_refused_cheaply() -> None:
    huge_array = b"FL\x01M" + struct.pack("<I", 5) + b"\xdd\xff\xff\xff\xff"  # 4G-entry list
    huge_map = b"FL\x01B" + struct.pack("<I", 5) + b"\xdf\xff\xff\xff\xff"
    deep = b"FL\x01B" + struct.pack("<I", 4000) + b"\x81\xa1a" + b"\x91" * 3997
    for data in (huge_array, huge_map, deep):
        errors: list[str] = []

        def attempt(data: bytes = data, errors: list[str] = errors) -> None:
            try:
                Codec().decode_body(data) if data[3:4] == b"B" else Codec().decode(data)
            except CodecError as e:
                errors.append(str(e))

        assert _peak_while(attempt) < 1 << 20
        assert errors, data[:16]


@pytest.mark.parametrize(("body", "payload", "needle"), [
    ({"a": msgpack.ExtType(9, b"")}, b"", "unknown ext code 9"),
    ({"a": msgpack.ExtType(1, _record(15, (2,), data=b"ab"))}, b"", "bad dtype code 15"),
    ({"a": msgpack.ExtType(1, _record(14, (1,), data=b"ab"))}, b"", "bad dtype code 14"),
    ({"a": msgpack.ExtType(1, _record(10, (2,), data=b"abc"))}, b"", "needs 8 bytes"),
    ({"a": msgpack.ExtType(1, _record(10, (2,), comp=1, data=b"12345678"))}, b"", "compression"),
    ({"a": msgpack.ExtType(1, _record(10, (4,), span=(0, 16))),
      "b": msgpack.ExtType(1, _record(10, (4,), span=(0, 16)))}, bytes(16), "overlaps"),
    ({"a": msgpack.ExtType(1, _record(10, (64,), span=(0, 256)))}, bytes(100), "truncated at byte"),
    ({"a": msgpack.ExtType(1, _record(10, (4,), comp=1, span=(0, 16)))}, bytes(16), "lz4"),
    ({"a": msgpack.ExtType(3, b"\x0a\x00")}, b"", "numpy scalar"),
    ({"a": [msgpack.ExtType(4, b""), msgpack.ExtType(4, b"")]}, b"", "tuple record"),
    ({"a": 1}, b"extra", "unexpected bytes"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_frames_name_what_is_wrong(body: Any, payload: bytes, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        Codec().decode(_frame(_msg_header(body), payload))


def test_msgpack_timestamps_decode_as_floats() -> None:
    body = Codec().decode(_frame(_msg_header({"a": msgpack.Timestamp(1, 500_000_000)}))).body
    assert body == {"a": 1.5} and type(body["a"]) is float


def test_bad_prefix_and_header_fields_name_what_is_wrong() -> None:
    good = _frame(_msg_header({}))
    with pytest.raises(CodecError, match="truncated at byte offset 5"):
        Codec().decode(good[:5])
    with pytest.raises(CodecError, match="not a fedloom frame"):
        Codec().decode(b"XX" + good[2:])
    with pytest.raises(CodecError, match="version 7"):
        Codec().decode(good[:2] + b"\x07" + good[3:])
    with pytest.raises(CodecError, match="kind"):
        Codec().decode_body(good)
    with pytest.raises(CodecError, match="truncated at byte offset"):
        Codec().decode(good[:-1])
    with pytest.raises(CodecError, match="'sent_at'"):
        Codec().decode(_frame([0, 1, "k", "late", 1, {}]))
    with pytest.raises(CodecError, match="6 fields"):
        Codec().decode(_frame([0, 1, "k"]))


# ------------------------------------------------------------------------------------ limits

def test_limits_hold_on_both_sides() -> None:
    nested: Any = 1
    for _ in range(10):
        nested = [nested]
    loose = Codec(max_depth=64)
    with pytest.raises(CodecError, match="max_depth 5"):
        Codec(max_depth=5).encode_body({"a": nested})
    with pytest.raises(CodecError, match="max_depth 5"):
        Codec(max_depth=5).decode_body(join(loose.encode_body({"a": nested})))
    Codec(max_depth=11).decode_body(join(loose.encode_body({"a": nested})))
    with pytest.raises(CodecError, match="max_items 3"):
        Codec(max_items=3).encode_body({"a": [1, 2, 3, 4]})
    with pytest.raises(CodecError, match="max_items"):
        Codec(max_items=3).decode_body(join(loose.encode_body({"a": [1, 2, 3, 4]})))
    a = np.zeros(1000, np.float64)
    with pytest.raises(CodecError, match="max_tensor_bytes"):
        Codec(max_tensor_bytes=7999).encode_body({"a": a})
    with pytest.raises(CodecError, match="max_tensor_bytes"):
        Codec(max_tensor_bytes=7999).decode_body(join(loose.encode_body({"a": a})))
    with pytest.raises(CodecError, match="max_message_bytes"):
        Codec(max_message_bytes=4000, compression="none").encode_body({"a": a})
    with pytest.raises(CodecError, match="max_message_bytes"):
        Codec(max_message_bytes=4000).decode_body(join(loose.encode_body({"a": a})))
    # Compressed, the frame is small but its tensors still count in full against the limit.
    frame = join(Codec().encode_body({"a": a, "b": a.copy()}))
    assert len(frame) < 4000
    with pytest.raises(CodecError, match="max_message_bytes"):
        Codec(max_message_bytes=12000).decode_body(frame)


def test_from_config_checks_keys_and_values() -> None:
    c = Codec.from_config({"compression": "lz4", "max_depth": 8})
    assert c.compression == "lz4" and c.max_depth == 8
    assert Codec.from_config({}).compression == DEFAULTS["compression"]
    with pytest.raises(ConfigError, match="max_dept"):
        Codec.from_config({"max_dept": 3})
    with pytest.raises(ConfigError, match="compression"):
        Codec.from_config({"compression": "zstd"})
    with pytest.raises(ConfigError, match="max_items"):
        Codec.from_config({"max_items": "many"})
    with pytest.raises(ConfigError, match="max_depth"):
        Codec.from_config({"max_depth": 0})
    with pytest.raises(ConfigError, match="min_compress_bytes"):
        Codec.from_config({"min_compress_bytes": -1})
    with pytest.raises(ConfigError, match="inline_bytes"):
        Codec.from_config({"inline_bytes": True})


# ------------------------------------------------------------------------------ size helpers

@given(body=bodies)
def test_body_nbytes_counts_every_tensor_byte(body: dict) -> None:
    def tensor_bytes(v: Any) -> int:
        if isinstance(v, np.ndarray | torch.Tensor):
            return int(v.nbytes)
        if isinstance(v, dict):
            return sum(tensor_bytes(x) for x in v.values())
        if isinstance(v, list | tuple):
            return sum(tensor_bytes(x) for x in v)
        return 0

    est = body_nbytes(body)
    assert est >= tensor_bytes(body)
    frame = len(join(Codec(compression="none").encode_body(body)))
    assert est >= 0.5 * frame - 64  # same order as the real frame (never compressed here)


def test_body_nbytes_is_close_for_a_model() -> None:
    body = {"w": np.zeros((256, 784), np.float32), "b": np.zeros(256, np.float32), "round": 3}
    exact = len(join(Codec(compression="none").encode_body(body)))
    assert math.isclose(body_nbytes(body), exact, rel_tol=0.01)
