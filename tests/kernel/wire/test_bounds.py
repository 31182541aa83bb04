"""Decoding is bounded by the frame: a frame of B bytes never makes the receiver allocate more
than a small multiple of `DECODE_RATIO * B + DECODE_FLOOR` (measured with tracemalloc), top-k
and random-k records included, and a buffer the decoder cannot read is a CodecError."""

from __future__ import annotations

import contextlib
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.messages import Message
from kernel.wire.codec import Codec, CodecError
from kernel.wire.tensorwire import DECODE_FLOOR, DECODE_RATIO
from tests.kernel.wire.mutation import edits, mutate

ALLOC_FACTOR = 4  # what the decoder may allocate while it works, per byte it may produce


def bound(frame: bytes) -> int:
    return ALLOC_FACTOR * (DECODE_RATIO * len(frame) + DECODE_FLOOR)


def peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return top


def frame_of(n: int, k: int, stages: list[str], dtype: str) -> bytes:
    codec = Codec(rules=[{"kind": "u", "stages": stages, "k": k, "min_elements": 1}])
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    return b"".join(bytes(p) for p in codec.encode(Message(0, 1, "u", {"x": x}, 0.0, 1)))


def crafted_frame() -> bytes:
    """A top-1 record of a 16 MiB tensor, as an attacker writes it (the codec no longer
    sends one): encoded with the sender's check turned off."""
    import kernel.wire.codec as codec_module

    saved = codec_module.DECODE_RATIO
    codec_module.DECODE_RATIO = 1 << 40
    try:
        return frame_of(1 << 22, 1, ["topk"], "float32")
    finally:
        codec_module.DECODE_RATIO = saved


def test_a_tiny_top_k_record_declaring_a_huge_dense_tensor_is_refused_cheaply() -> None:
    frame = crafted_frame()  # 16 MiB dense from one kept value
    assert len(frame) < 400
    errors: list[str] = []

    def attempt() -> None:
        try:
            Codec(max_message_bytes=1 << 40).decode(frame)
        except CodecError as exc:
            errors.append(str(exc))

    assert peak(attempt) < 1 << 20
    assert errors and "decode budget" in errors[0]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 1 << 21), k=st.integers(1, 64),
       stages=st.sampled_from([["topk"], ["randk"], ["topk", "int8"], ["randk", "int4"],
                               ["topk", "fp16"], ["int4"], []]),
       dtype=st.sampled_from(["float32", "float64", "float16"]), changes=edits(max_size=3),
       mutated=st.booleans())
def test_decoding_any_frame_allocates_at_most_a_multiple_of_its_size(
        n: int, k: int, stages: list[str], dtype: str, changes: list, mutated: bool) -> None:
    try:
        frame = frame_of(n, k, stages, dtype)
    except CodecError:  # too sparse to send: what an attacker would craft instead
        frame = crafted_frame()
    if mutated:
        frame = mutate(frame, changes)
    codec = Codec(max_message_bytes=1 << 40, max_tensor_bytes=1 << 40)

    def attempt() -> None:
        with contextlib.suppress(CodecError):
            codec.decode(frame)

    assert peak(attempt) <= bound(frame)


@pytest.mark.parametrize("view", [
    lambda f: memoryview(f * 2)[::2],
    lambda f: memoryview(np.frombuffer(f * 2, np.uint8)[::2]),
    lambda f: memoryview(np.frombuffer(f * 4, np.uint8).reshape(2, -1)[:, ::2]),
])
def test_a_buffer_the_decoder_cannot_read_is_a_codec_error(view: Any) -> None:
    frame = frame_of(10, 1, [], "float32")
    with pytest.raises(CodecError, match="non-contiguous|does not cast"):
        Codec().decode(view(frame))


def test_a_sender_is_told_when_its_sparse_record_would_exceed_what_receivers_accept() -> None:
    with pytest.raises(CodecError, match=r"cannot encode message 'u': its sparsified tensors would "
                                         r"decode "
                                         r"to 16777216 bytes from a frame of about \d+ bytes; "
                                         r"receivers accept at most 1024 x the frame"):
        frame_of(1 << 22, 1, ["topk"], "float32")
    # Within the bound (top-1% of the same tensor) it encodes and decodes.
    frame = frame_of(1 << 22, (1 << 22) // 100, ["topk"], "float32")
    assert Codec().decode(frame).body["x"].shape == (1 << 22,)
