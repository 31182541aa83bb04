"""Tensors on the wire: numpy arrays, numpy scalars and torch tensors as msgpack ext records
(dtype, shape, compression, then the bytes inline or as a zero-copy payload after the header),
and back again as views of the received buffer.

A record's ext data is `<BBBB` (dtype code, compression id, ndim, placement), ndim `<Q`
dimensions, then either the raw bytes (placement 0, inline) or `<QQ` (offset, length) of its
payload in the frame's payload region (placement 1). Torch is imported only when a torch tensor
is encoded or a torch record decoded.

A staged record (ext 5: a float tensor after lossy stages, see kernel.wire.stages) is `<BBBB`
(original dtype code, target ext 1 numpy or 2 torch, ndim, stage count), ndim `<Q` dimensions,
per stage `<BBQ` (stage id, flags, parameter), `<B` section count, then per section `<BBBQ`
(dtype code, compression id, placement, element count) and its bytes inline or `<QQ` (offset,
length) as above. It decodes to a dense array of the original dtype and shape.
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

from kernel.wire import stages


class CodecError(ValueError):
    """Bytes that are not a valid fedloom frame, or a value that cannot be encoded; the message
    names what is wrong (the byte offset, the ext code, the dtype, the limit exceeded)."""


EXT_NDARRAY = 1  # numpy array
EXT_TORCH = 2  # torch tensor
EXT_SCALAR = 3  # numpy scalar: dtype code then itemsize bytes
EXT_STAGED = 5  # a float tensor after lossy stages (4 is the codec's tuple record)

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
_STAGE = struct.Struct("<BBQ")
_SECTION = struct.Struct("<BBBQ")
_FLOAT_CODES = {9: "float16", 10: "float32", 11: "float64", 14: "bfloat16"}
_U64 = (1 << 64) - 1
_LZ4_MAX_INPUT = 0x7E000000
# A frame of B bytes decodes to at most DECODE_RATIO * B + DECODE_FLOOR bytes of tensors,
# whatever its records declare (sparse records included); see kernel.wire.codec.
DECODE_RATIO = 1024
DECODE_FLOOR = 1 << 20
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

class Staged:
    """A tensor on its way out under a codec rule: the value, the rule (its pipeline and
    lossless policy) and the seed of the randomness its stages may need."""

    __slots__ = ("value", "rule", "seed")

    def __init__(self, value: Any, rule: stages.Rule, seed: tuple[int, ...]) -> None:
        self.value = value
        self.rule = rule
        self.seed = seed

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([x & _U64 for x in self.seed])


class StageStats:
    """Running byte counts of staged tensors (one per writer, so one per thread: no locks)."""

    __slots__ = ("tensors", "raw_bytes", "wire_bytes", "stage_bytes", "fallbacks")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tensors = 0  # float tensors that went through lossy stages
        self.raw_bytes = 0  # their bytes before any stage
        self.wire_bytes = 0  # their bytes on the wire (after lossless compression)
        self.stage_bytes: dict[str, int] = {}  # their bytes after each stage, by stage name
        self.fallbacks = 0  # tensors a rule named that had to travel losslessly (NaN, range)


class TensorWriter:
    """Turns arrays, tensors and numpy scalars into ext records for one frame, collecting the
    out-of-band payloads (with alignment padding) in `parts`."""

    __slots__ = ("policy", "min_compress", "inline", "max_tensor", "parts", "end", "stage_stats",
                 "expanded")

    def __init__(self, policy: str, min_compress: int, inline: int, max_tensor: int) -> None:
        self.policy = policy
        self.min_compress = min_compress
        self.inline = inline
        self.max_tensor = max_tensor
        self.parts: list[Any] = []
        self.end = 0  # bytes in the payload region so far
        self.stage_stats = StageStats()
        self.expanded = 0  # dense bytes the frame's staged records decode to (see DECODE_RATIO)

    def staged(self, st: Staged) -> ExtType:
        """A tensor under a rule: a staged record when its pipeline is lossy and the tensor is
        floating (and representable), else a plain record with the rule's lossless policy."""
        rule, v = st.rule, st.value
        policy = rule.compression or self.policy
        is_np = isinstance(v, np.ndarray)
        if not rule.pipeline.names or (is_np and v.dtype.kind != "f"):
            return self.ndarray(v, policy) if is_np else self.tensor(v, policy)
        if is_np:
            code = _NP_CODE.get(v.dtype.newbyteorder("<").str)
            if code not in _FLOAT_CODES:
                return self.ndarray(v, policy)
            flat = np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")).reshape(-1)
            shape, ext = v.shape, EXT_NDARRAY
        else:
            import torch

            t = v.detach()
            code = _torch_codes().get(t.dtype)
            if code not in _FLOAT_CODES or t.layout != torch.strided:
                return self.tensor(v, policy)
            t = t.cpu().resolve_conj().resolve_neg().contiguous()
            flat = (t.float() if code == 14 else t).numpy().reshape(-1)
            shape, ext = tuple(t.shape), EXT_TORCH
        raw = flat.size * _ITEMSIZE[code]
        ndim = self._check(shape, raw)
        enc = stages.encode(flat, rule.pipeline, st.rng) if flat.size else None
        if enc is None:
            self.stage_stats.fallbacks += bool(flat.size)
            return self.ndarray(v, policy) if is_np else self.tensor(v, policy)
        head = [_HEAD.pack(code, ext, ndim, len(enc.specs)), struct.pack(f"<{ndim}Q", *shape)]
        head += [_STAGE.pack(*spec) for spec in enc.specs]
        head.append(bytes((len(enc.sections),)))
        wire = 0
        for sec in enc.sections:
            scode = _NP_CODE[sec.dtype.str]
            comp, where, tail = self._place(sec.view(np.uint8), sec.dtype.itemsize, policy)
            head.append(_SECTION.pack(scode, comp, where, sec.size))
            head.append(tail)
            wire += len(tail) if where == 0 else _SPAN.unpack(tail)[1]
        self.expanded += raw
        ss = self.stage_stats
        ss.tensors += 1
        ss.raw_bytes += raw
        ss.wire_bytes += wire
        for name, nbytes in enc.sizes:
            ss.stage_bytes[name] = ss.stage_bytes.get(name, 0) + nbytes
        return ExtType(EXT_STAGED, b"".join(head))

    def _place(self, u8: np.ndarray, itemsize: int, policy: str) -> tuple[int, int, bytes]:
        """(compression id, placement, inline bytes or span) of a section's bytes `u8`."""
        n = u8.size
        if n <= self.inline:
            return COMP_NONE, 0, u8.tobytes()
        if n >= self.min_compress:
            comp, payload = compress(u8, itemsize, policy)
        else:
            comp, payload = COMP_NONE, u8.data
        off = -(-self.end // ALIGN) * ALIGN
        if off > self.end:
            self.parts.append(_ZEROS[:off - self.end])
        self.parts.append(payload)
        size = len(payload)
        self.end = off + size
        return comp, 1, _SPAN.pack(off, size)

    def ndarray(self, a: np.ndarray, policy: str | None = None) -> ExtType:
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
        return self._record(EXT_NDARRAY, code, a.shape, a.reshape(-1).view(np.uint8), policy)

    def tensor(self, t: Any, policy: str | None = None) -> ExtType:
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
        return self._record(EXT_TORCH, code, tuple(t.shape), u8, policy)

    @staticmethod
    def scalar(s: np.generic) -> ExtType:
        code = _NP_CODE.get(s.dtype.str)
        if code is None:
            raise CodecError(f"a numpy scalar of dtype {s.dtype.str!r} ({s.dtype})")
        return ExtType(EXT_SCALAR, bytes((code,)) + s.tobytes())

    def _check(self, shape: tuple[int, ...], nbytes: int) -> int:
        """Refuse a tensor the limits do not allow to travel; its number of dimensions."""
        if nbytes > self.max_tensor:
            raise CodecError(f"tensor of shape {shape} has {nbytes} bytes; max_tensor_bytes is "
                             f"{self.max_tensor}")
        ndim = len(shape)
        if ndim > _MAX_NDIM:
            raise CodecError(f"tensor has {ndim} dimensions; at most {_MAX_NDIM} travel")
        return ndim

    def _record(self, ext: int, code: int, shape: tuple[int, ...], u8: np.ndarray,
                policy: str | None = None) -> ExtType:
        ndim = self._check(shape, u8.size)
        comp, where, tail = self._place(u8, _ITEMSIZE[code], policy or self.policy)
        return ExtType(ext, _HEAD.pack(code, comp, ndim, where)
                       + struct.pack(f"<{ndim}Q", *shape) + tail)


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
        if ext == EXT_STAGED:
            return self._staged(data)
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
        self._reserve(shape, raw)
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
        start, stop = self._span(data, pos)
        length = stop - start
        if comp == COMP_NONE:
            if length != raw:
                raise CodecError(f"tensor of shape {shape} needs {raw} bytes; its payload at "
                                 f"byte offset {start} holds {length}")
            return _make(ext, code, shape, count, self.mv, start)
        u8 = decompress(self.mv[start:stop], comp, raw, itemsize)
        return _make(ext, code, shape, count, u8, 0)

    def _reserve(self, shape: tuple[int, ...], raw: int) -> None:
        """Count `raw` decoded bytes against the limits before anything is allocated."""
        if raw > self.max_tensor:
            raise CodecError(f"tensor of shape {shape} declares {raw} bytes; max_tensor_bytes "
                             f"is {self.max_tensor}")
        if raw > self.budget:
            raise CodecError(f"tensors of this frame declare more than its decode budget "
                             f"(max_message_bytes, and {DECODE_RATIO} x the frame's size + "
                             f"{DECODE_FLOOR}) in all (the one of shape {shape} needs {raw} "
                             f"bytes, {self.budget} left)")
        self.budget -= raw

    def _span(self, data: bytes, pos: int) -> tuple[int, int]:
        """Frame byte offsets (start, stop) of the payload whose (offset, length) is at `pos` of
        a record, checked to follow the previous payload and to lie inside the frame."""
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
        return start, stop

    def _staged(self, data: bytes) -> Any:
        """A staged record (see the module docstring) back to a dense tensor: the header is
        checked against the stages (kernel.wire.stages.check_layout) before any section is read."""
        size = len(data)
        if size < 4:
            raise CodecError(f"staged tensor record of {size} bytes is shorter than its 4-byte "
                             "head")
        code, target, ndim, nst = _HEAD.unpack_from(data)
        if target not in (EXT_NDARRAY, EXT_TORCH):
            raise CodecError(f"staged tensor record: target {target}; expected {EXT_NDARRAY} "
                             f"(numpy) or {EXT_TORCH} (torch)")
        orig = _FLOAT_CODES.get(code)
        if orig is None or (code == 14 and target == EXT_NDARRAY):
            raise CodecError(f"staged tensor record: dtype code {code}; stages apply to float16 "
                             "(9), float32 (10), float64 (11) and torch bfloat16 (14) only")
        if ndim > _MAX_NDIM:
            raise CodecError(f"staged tensor record declares {ndim} dimensions; at most "
                             f"{_MAX_NDIM}")
        pos = 4 + 8 * ndim + _STAGE.size * nst + 1
        if size < pos:
            raise CodecError(f"staged tensor record truncated: {size} bytes cannot hold "
                             f"{ndim} dimensions and {nst} stages")
        shape = struct.unpack_from(f"<{ndim}Q", data, 4)
        if math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:
            raise CodecError(f"staged tensor record declares shape {shape}: too many elements")
        n = math.prod(shape)
        raw = n * _ITEMSIZE[code]
        self._reserve(shape, raw)
        specs = [_STAGE.unpack_from(data, 4 + 8 * ndim + _STAGE.size * i) for i in range(nst)]
        nsec = data[pos - 1]
        table: list[tuple[np.dtype, int, int, int, int]] = []  # dtype, count, comp, where, pos
        for i in range(nsec):
            if size < pos + _SECTION.size:
                raise CodecError(f"staged tensor record truncated at section {i} of {nsec}")
            scode, comp, where, count = _SECTION.unpack_from(data, pos)
            pos += _SECTION.size
            if scode >= len(_NP_DTYPES):
                raise CodecError(f"staged tensor section {i}: bad dtype code {scode}")
            dt = _NP_DTYPES[scode]
            table.append((dt, count, comp, where, pos))
            if where == 0:
                if comp != COMP_NONE:
                    raise CodecError(f"staged tensor section {i}: inline with compression id "
                                     f"{comp}; inline sections are never compressed")
                pos += count * dt.itemsize
            elif where == 1:
                pos += _SPAN.size
            else:
                raise CodecError(f"staged tensor section {i}: bad placement {where}; expected "
                                 "0 or 1")
        if pos != size:
            raise CodecError(f"staged tensor record has {size} bytes; its sections account for "
                             f"{pos}")
        try:
            pipe = stages.Pipeline.from_specs(specs)
            stages.check_layout(n, pipe, orig, [(t[0], t[1]) for t in table])
        except stages.StageError as e:
            raise CodecError(f"staged tensor of shape {shape}: {e}") from None
        sections = []
        for i, (dt, count, comp, where, at) in enumerate(table):
            nbytes = count * dt.itemsize
            if where == 0:
                sections.append(np.frombuffer(data, dt, count, at))
                continue
            start, stop = self._span(data, at)
            if comp == COMP_NONE:
                if stop - start != nbytes:
                    raise CodecError(f"staged tensor section {i} needs {nbytes} bytes; its "
                                     f"payload at byte offset {start} holds {stop - start}")
                sections.append(np.frombuffer(self.mv, dt, count, start))
            else:
                u8 = decompress(self.mv[start:stop], comp, nbytes, dt.itemsize)
                sections.append(u8.view(dt))
        try:
            with np.errstate(all="ignore"):  # arbitrary bits may hold NaNs; never warn
                flat = stages.decode(n, pipe, orig, sections)
        except stages.StageError as e:
            raise CodecError(f"staged tensor of shape {shape}: {e}") from None
        except Exception as e:  # untrusted bytes: nothing but a CodecError may leave
            raise CodecError(f"staged tensor of shape {shape} cannot be decoded: "
                             f"{type(e).__name__}: {e}") from None
        a = flat.reshape(shape)
        if target == EXT_TORCH:
            import torch

            t = torch.from_numpy(a if a.flags.writeable else a.copy())
            return t.to(torch.bfloat16) if code == 14 else t
        a.flags.writeable = False
        return a


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
