"""Tensors on the wire: numpy arrays, numpy scalars and torch tensors as msgpack ext records
(dtype, shape, compression, then the bytes inline or as a zero-copy payload after the header),
and back again as views of the received buffer.

A record's ext data is `<BBBB` (dtype code, compression id, ndim, placement), ndim `<Q`
dimensions, then either the raw bytes (placement 0, inline) or `<QQ` (offset, length) of its
payload in the frame's payload region (placement 1). Torch is imported only when a torch tensor
is encoded or a torch record decoded.
"""

from __future__ import annotations

import math
import struct
import sys
import warnings
from typing import Any

import lz4.block
import numpy as np
from msgpack import ExtType


class CodecError(ValueError):
    """Bytes that are not a valid fedloom frame, or a value that cannot be encoded; the message
    names what is wrong (the byte offset, the ext code, the dtype, the limit exceeded)."""


EXT_NDARRAY = 1  # numpy array
EXT_TORCH = 2  # torch tensor
EXT_SCALAR = 3  # numpy scalar: dtype code then itemsize bytes

COMP_NONE, COMP_LZ4, COMP_SHUFFLE_LZ4 = 0, 1, 2
POLICIES = ("auto", "none", "lz4", "shuffle+lz4")
ALIGN = 64

# Index = dtype code on the wire. Little-endian always; code 14 (bfloat16) is torch-only.
_NP_DTYPES = tuple(
    np.dtype(s)
    for s in ("|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8",
              "<f2", "<f4", "<f8", "<c8", "<c16")
)
_TORCH_NAMES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128", "bfloat16")
_NP_CODE = {dt.str: code for code, dt in enumerate(_NP_DTYPES)}
_ITEMSIZE = tuple(dt.itemsize for dt in _NP_DTYPES) + (2,)
_MAX_NDIM = 32
# A dimension product beyond this cannot be a real array; refusing it keeps numpy quiet.
_MAX_ELEMENTS = 1 << 62

_HEAD = struct.Struct("<BBBB")
_SPAN = struct.Struct("<QQ")
_LZ4_MAX_INPUT = 0x7E000000
# lz4 block output is at most ~255 bytes per input byte: a larger declared size is a lie, and
# refusing it before lz4 allocates keeps a small input from allocating a lot.
_LZ4_MAX_RATIO = 255
_SAMPLE_CHUNK = 2048
_SAMPLE_CHUNKS = 4
_SAMPLE = _SAMPLE_CHUNK * _SAMPLE_CHUNKS
_SAMPLE_PAYS = 0.8  # auto compresses the whole tensor only when its sample shrinks below this
_KEEP_BELOW = 0.9  # ...and keeps the result only when the whole shrinks below this
_SHUFFLE_EDGE = 0.85  # shuffling costs a copy: it must beat plain lz4 by this factor
_ZEROS = bytes(ALIGN)

_torch_dtypes: dict[Any, int] | None = None
_torch_warned = False


def _torch_codes() -> dict[Any, int]:
    global _torch_dtypes
    if _torch_dtypes is None:
        import torch

        _torch_dtypes = {getattr(torch, name): code for code, name in enumerate(_TORCH_NAMES)
                         if hasattr(torch, name)}
    return _torch_dtypes


# ---------------------------------------------------------------------------------- compression

def _lz4(buf: Any) -> bytes:
    return lz4.block.compress(buf, store_size=False)


def shuffle(u8: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte planes: all first bytes of the items, then all second bytes, ... (a copy)."""
    out = np.empty(u8.size, np.uint8)
    out.reshape(itemsize, -1)[...] = u8.reshape(-1, itemsize).T
    return out


def unshuffle(planes: np.ndarray, itemsize: int) -> np.ndarray:
    """The inverse of `shuffle` (a copy)."""
    out = np.empty(planes.size, np.uint8)
    out.reshape(-1, itemsize)[...] = planes.reshape(itemsize, -1).T
    return out


def _sample(u8: np.ndarray) -> np.ndarray:
    # Chunks spread over the tensor, so a zero head or tail does not decide for all of it.
    n = u8.size
    step = (n - _SAMPLE_CHUNK) // (_SAMPLE_CHUNKS - 1)
    step -= step % 16  # keep chunk starts on item boundaries for every itemsize
    return np.concatenate([u8[i * step:i * step + _SAMPLE_CHUNK] for i in range(_SAMPLE_CHUNKS)])


def _auto_choice(s: np.ndarray, itemsize: int) -> int:
    """Which compression pays on the sample `s` (COMP_NONE when none does)."""
    r1 = len(_lz4(s)) / s.size
    r2 = len(_lz4(shuffle(s, itemsize))) / s.size if itemsize > 1 else 2.0
    if r2 < _SAMPLE_PAYS and r2 < r1 * _SHUFFLE_EDGE:
        return COMP_SHUFFLE_LZ4
    return COMP_LZ4 if r1 < _SAMPLE_PAYS else COMP_NONE


def _best_of(u8: np.ndarray, itemsize: int) -> tuple[int, Any]:
    """auto for a tensor no bigger than a sample: try both ways on all of it, keep the best."""
    n = u8.size
    best: tuple[int, Any] = (COMP_LZ4, _lz4(u8))
    if itemsize > 1:
        c = _lz4(shuffle(u8, itemsize))
        if len(c) < len(best[1]) * _SHUFFLE_EDGE:
            best = (COMP_SHUFFLE_LZ4, c)
    return best if len(best[1]) < n * _KEEP_BELOW else (COMP_NONE, u8.data)


def compress(u8: np.ndarray, itemsize: int, policy: str) -> tuple[int, Any]:
    """(compression id, payload) for the bytes `u8` (1-D uint8, C-contiguous) under `policy`;
    the payload is a zero-copy view when compression is skipped or does not pay."""
    n = u8.size
    raw = (COMP_NONE, u8.data)
    if policy == "none" or n > _LZ4_MAX_INPUT:
        return raw
    if policy == "auto":
        if n <= _SAMPLE:
            return _best_of(u8, itemsize)
        comp = _auto_choice(_sample(u8), itemsize)
        keep = _KEEP_BELOW
    else:
        comp = COMP_LZ4 if policy == "lz4" or itemsize == 1 else COMP_SHUFFLE_LZ4
        keep = 1.0
    if comp == COMP_NONE:
        return raw
    c = _lz4(shuffle(u8, itemsize) if comp == COMP_SHUFFLE_LZ4 else u8)
    return (comp, c) if len(c) < n * keep else raw


def decompress(src: memoryview, comp: int, raw: int, itemsize: int) -> np.ndarray:
    """The `raw` bytes that `src` holds under compression `comp`, as a fresh writable uint8 array;
    the declared size is checked against what `src` can possibly hold before anything is
    allocated."""
    if comp not in (COMP_LZ4, COMP_SHUFFLE_LZ4):
        raise CodecError(f"unknown compression id {comp}; expected 0 (none), 1 (lz4) or "
                         "2 (shuffle+lz4)")
    if raw == 0 or raw > _LZ4_MAX_RATIO * len(src) + _LZ4_MAX_RATIO:
        raise CodecError(f"declared size {raw} bytes cannot come from {len(src)} lz4 bytes")
    try:
        buf = lz4.block.decompress(src, uncompressed_size=raw, return_bytearray=True)
    except Exception as e:  # lz4's LZ4BlockError is not importable by name
        raise CodecError(f"corrupt lz4 payload of {len(src)} bytes: {e}") from None
    if len(buf) != raw:
        raise CodecError(f"lz4 payload decompressed to {len(buf)} bytes; its record declares {raw}")
    u8 = np.frombuffer(buf, np.uint8)
    return unshuffle(u8, itemsize) if comp == COMP_SHUFFLE_LZ4 and itemsize > 1 else u8


# ------------------------------------------------------------------------------------ encoding

class TensorWriter:
    """Turns arrays, tensors and numpy scalars into ext records for one frame, collecting the
    out-of-band payloads (with alignment padding) in `parts`."""

    __slots__ = ("policy", "min_compress", "inline", "max_tensor", "parts", "end")

    def __init__(self, policy: str, min_compress: int, inline: int, max_tensor: int) -> None:
        self.policy = policy
        self.min_compress = min_compress
        self.inline = inline
        self.max_tensor = max_tensor
        self.parts: list[Any] = []
        self.end = 0  # bytes in the payload region so far

    def ndarray(self, a: np.ndarray) -> ExtType:
        dt = a.dtype
        code = _NP_CODE.get(dt.str)
        if code is None:
            if dt.byteorder == ">" and dt.newbyteorder("<").str in _NP_CODE:
                a = a.astype(dt.newbyteorder("<"))
                code = _NP_CODE[a.dtype.str]
            else:
                raise CodecError(f"a numpy array of dtype {dt.str!r} ({dt}); only bool, int, "
                                 "uint, float and complex arrays travel")
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        return self._record(EXT_NDARRAY, code, a.shape, a.reshape(-1).view(np.uint8))

    def tensor(self, t: Any) -> ExtType:
        import torch

        t = t.detach()
        if t.layout != torch.strided:
            raise CodecError(f"a torch tensor with layout {t.layout}; only dense (strided) "
                             "tensors travel")
        code = _torch_codes().get(t.dtype)
        if code is None:
            raise CodecError(f"a torch tensor of dtype {t.dtype}")
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
        # Contiguous means dense, but a size-0 or size-1 dim may carry any stride, which torch
        # refuses to view as bytes: restride explicitly.
        n = t.numel()
        u8 = t.as_strided((n,), (1,)).view(torch.uint8).numpy() if n else np.empty(0, np.uint8)
        return self._record(EXT_TORCH, code, tuple(t.shape), u8)

    @staticmethod
    def scalar(s: np.generic) -> ExtType:
        code = _NP_CODE.get(s.dtype.str)
        if code is None:
            raise CodecError(f"a numpy scalar of dtype {s.dtype.str!r} ({s.dtype})")
        return ExtType(EXT_SCALAR, bytes((code,)) + s.tobytes())

    def _record(self, ext: int, code: int, shape: tuple[int, ...], u8: np.ndarray) -> ExtType:
        n = u8.size
        if n > self.max_tensor:
            raise CodecError(f"tensor of shape {shape} has {n} bytes; max_tensor_bytes is "
                             f"{self.max_tensor}")
        ndim = len(shape)
        if ndim > _MAX_NDIM:
            raise CodecError(f"tensor has {ndim} dimensions; at most {_MAX_NDIM} travel")
        if n <= self.inline:
            return ExtType(ext, _HEAD.pack(code, COMP_NONE, ndim, 0)
                           + struct.pack(f"<{ndim}Q", *shape) + u8.tobytes())
        if n >= self.min_compress:
            comp, payload = compress(u8, _ITEMSIZE[code], self.policy)
        else:
            comp, payload = COMP_NONE, u8.data
        off = -(-self.end // ALIGN) * ALIGN
        if off > self.end:
            self.parts.append(_ZEROS[:off - self.end])
        self.parts.append(payload)
        size = len(payload)
        self.end = off + size
        return ExtType(ext, _HEAD.pack(code, comp, ndim, 1)
                       + struct.pack(f"<{ndim}Q", *shape) + _SPAN.pack(off, size))


# ------------------------------------------------------------------------------------ decoding

class TensorReader:
    """Turns ext records back into arrays, tensors and scalars, reading payloads in place from
    the frame `mv` whose payload region starts at `base`; enforces the size limits and that
    payloads follow each other without overlap, so every payload byte is read at most once."""

    __slots__ = ("mv", "base", "size", "end", "max_tensor", "budget", "seen")

    def __init__(self, mv: memoryview, base: int, max_tensor: int, budget: int) -> None:
        self.mv = mv
        self.base = base
        self.size = len(mv)
        self.end = 0  # end of the last payload, relative to `base`
        self.max_tensor = max_tensor
        self.budget = budget  # decoded tensor bytes this frame may still produce
        self.seen = False  # whether any payload was read

    def record(self, ext: int, data: bytes) -> Any:
        if ext == EXT_SCALAR:
            return _scalar(data)
        if len(data) < 4:
            raise CodecError(f"tensor record of {len(data)} bytes is shorter than its 4-byte head")
        code, comp, ndim, where = _HEAD.unpack_from(data)
        if code >= len(_ITEMSIZE) or (code == 14 and ext == EXT_NDARRAY):
            raise CodecError(f"bad dtype code {code} in a "
                             f"{'numpy' if ext == EXT_NDARRAY else 'torch'} tensor record")
        if ndim > _MAX_NDIM:
            raise CodecError(f"tensor record declares {ndim} dimensions; at most {_MAX_NDIM}")
        pos = 4 + 8 * ndim
        if len(data) < pos:
            raise CodecError(f"tensor record truncated: {len(data)} bytes cannot hold {ndim} "
                             "dimensions")
        shape = struct.unpack_from(f"<{ndim}Q", data, 4)
        if math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:
            raise CodecError(f"tensor record declares shape {shape}: too many elements")
        itemsize = _ITEMSIZE[code]
        count = math.prod(shape)
        raw = count * itemsize
        if raw > self.max_tensor:
            raise CodecError(f"tensor of shape {shape} declares {raw} bytes; max_tensor_bytes "
                             f"is {self.max_tensor}")
        if raw > self.budget:
            raise CodecError(f"tensors of this frame declare more than max_message_bytes in all "
                             f"(the one of shape {shape} needs {raw} bytes, {self.budget} left)")
        self.budget -= raw
        if where == 0:
            if comp != COMP_NONE:
                raise CodecError(f"inline tensor record has compression id {comp}; inline "
                                 "records are never compressed")
            if len(data) - pos != raw:
                raise CodecError(f"inline tensor of shape {shape} needs {raw} bytes; its record "
                                 f"holds {len(data) - pos}")
            return _make(ext, code, shape, count, data, pos)
        if where != 1:
            raise CodecError(f"bad placement {where} in a tensor record; expected 0 or 1")
        if len(data) != pos + 16:
            raise CodecError(f"out-of-band tensor record has {len(data)} bytes; expected "
                             f"{pos + 16}")
        off, length = _SPAN.unpack_from(data, pos)
        if off < self.end:
            raise CodecError(f"payload at offset {off} of the payload region overlaps the "
                             f"previous one (which ends at {self.end})")
        start = self.base + off
        stop = start + length
        if stop > self.size:
            raise CodecError(f"truncated at byte offset {self.size}: a payload of {length} bytes "
                             f"declared at byte offset {start} runs past the end of the frame")
        self.end = off + length
        self.seen = True
        if comp == COMP_NONE:
            if length != raw:
                raise CodecError(f"tensor of shape {shape} needs {raw} bytes; its payload at "
                                 f"byte offset {start} holds {length}")
            return _make(ext, code, shape, count, self.mv, start)
        u8 = decompress(self.mv[start:stop], comp, raw, itemsize)
        return _make(ext, code, shape, count, u8, 0)


def _scalar(data: bytes) -> np.generic:
    code = data[0] if data else 255
    if code >= len(_NP_DTYPES):
        raise CodecError(f"bad dtype code {code} in a numpy scalar record")
    dt = _NP_DTYPES[code]
    if len(data) != 1 + dt.itemsize:
        raise CodecError(f"numpy scalar record of dtype {dt} has {len(data) - 1} value bytes; "
                         f"expected {dt.itemsize}")
    return np.frombuffer(data, dt, 1, 1)[0]  # type: ignore[no-any-return]


def _make(ext: int, code: int, shape: tuple[int, ...], count: int, buf: Any, off: int) -> Any:
    if ext == EXT_NDARRAY:
        dt = _NP_DTYPES[code]
        a = np.frombuffer(buf, dt, count, off) if count else np.empty(0, dt)
        a = a.reshape(shape)
        a.flags.writeable = False
        return a
    return _torch_tensor(code, shape, count, buf, off)


def _torch_tensor(code: int, shape: tuple[int, ...], count: int, buf: Any, off: int) -> Any:
    global _torch_warned
    import torch

    dtype = getattr(torch, _TORCH_NAMES[code], None)
    if dtype is None:
        raise CodecError(f"this torch has no dtype {_TORCH_NAMES[code]}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    if not _torch_warned and memoryview(buf).readonly:
        # torch warns once per process that it cannot mark a tensor read-only; received
        # bodies are read-only by contract, so that warning says nothing here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=off)
        _torch_warned = True
    else:
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=off)
    return t.reshape(shape)


def torch_loaded() -> Any:
    """The torch module if something already imported it, else None (never imports it)."""
    return sys.modules.get("torch")
