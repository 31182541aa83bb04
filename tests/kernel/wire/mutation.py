"""Byte-level edits of valid frames, for fuzz tests of decoders."""

from __future__ import annotations

from hypothesis import strategies as st

OPS = ("flip", "cut", "extend", "set", "insert")


def edits(ops: tuple[str, ...] = OPS, max_size: int = 4) -> st.SearchStrategy[list]:
    """Lists of (op, position, byte) edits."""
    return st.lists(st.tuples(st.sampled_from(ops), st.integers(0, 250) | st.integers(0, 10**6),
                              st.integers(0, 255)), min_size=1, max_size=max_size)


def mutate(frame: bytes, changes: list) -> bytes:
    """`frame` with each edit applied in turn (positions wrap around its current length)."""
    f = bytearray(frame)
    for op, pos, byte in changes:
        i = pos % max(len(f), 1)
        if op == "flip" and f:
            f[i] ^= 1 << (byte % 8)
        elif op == "cut":
            del f[i:]
        elif op == "extend":
            f += bytes([byte]) * (pos % 70 + 1)
        elif op == "set" and f:
            f[i] = byte
        elif op == "insert":
            f[i:i] = bytes([byte])
    return bytes(f)
