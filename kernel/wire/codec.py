"""The wire format: a message (or a bare body) as a list of frame parts, and any byte string back
to a message or a CodecError; never pickle, never eval.

Frame: an 8-byte prefix `b"FL"`, version, kind (`M` message, `B` body) and the u32 length of
the msgpack header; the header; zero padding to a multiple of 64; then the payload region, where
each out-of-band tensor's bytes start at a multiple of 64. A message header is
`[src, dst, kind, sent_at, seq, body]`, a body frame's header is the body dict. Tensors are ext
records (see kernel.wire.tensorwire); `encode` hands their payloads out as views of the arrays (no
copy) and `decode` reads them in place (read-only numpy views of the given buffer).

What round-trips: None, bool, int (-2**63 .. 2**64-1), float, str, bytes (bytearray and
memoryview come back as bytes), numpy arrays of bool/int/uint/float/complex dtypes (read-only,
native little-endian), numpy scalars (as numpy scalars of the same dtype, np.float64 included),
torch tensors (bfloat16 included; dense, on the CPU, detached), lists, tuples (as tuples) and
dicts whose keys are any of these hashable values (str and int keys included). Subclasses come
back as their base type (a namedtuple as a tuple, an OrderedDict as a dict); a msgpack.Timestamp
comes back as a float (seconds).

Decoding is bounded by the frame's size: a frame of B bytes decodes to at most
`DECODE_RATIO * B + DECODE_FLOOR` bytes of tensors (1024 B + 1 MiB; lz4 alone stops at 255x,
and a top-k / random-k record expands to its dense tensor within the same budget: fractions
down to about 0.002 fit), refused with a CodecError before anything is allocated; the decoder
allocates at most a small multiple (a few times) of that while it works. A sender whose
sparsified tensors would exceed that gets the CodecError instead (keep more entries). Anything but a
contiguous buffer is refused with a CodecError, not a BufferError.

Lossy stages (kernel.wire.stages) apply to messages only, never to bodies (checkpoints and results
stay exact): `[codec]` rules pick them per message kind and tensor name, where a tensor's name
is its path in the body with keys joined by "/" (`model/0.weight`, `updates/3`):

    [codec.stages]              # shorthand: message kind = stages, for every tensor
    update = ["int8"]
    [[codec.rules]]             # full form; rules are tried in order, then the shorthand
    kind = "update"             # fnmatch patterns
    tensors = "model/*"
    stages = ["topk", "int8"]   # at most a sparsifier (topk, randk), then an encoder
    fraction = 0.01             # (fp16, bf16, int8, int4); see kernel.wire.stages.RULE_DEFAULTS
    block = 64                  # for the other keys: k, stochastic, min_elements, compression

Every stage and its parameters travel in the tensor's record, so a receiver decodes without
the sender's config. Random-k and stochastic rounding draw from a generator seeded by
([codec] seed, src, seq, crc32 of the tensor's name): the same on every transport. `stats`
counts the bytes of staged tensors before and after each stage.
"""

from __future__ import annotations

import operator
import struct
import sys
import threading
import zlib
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
from msgpack import ExtType

from kernel.messages import Message
from kernel.options import ConfigError, options
from kernel.wire.stages import Rule, Rules
from kernel.wire.tensorwire import (
    ALIGN,
    DECODE_FLOOR,
    DECODE_RATIO,
    EXT_NDARRAY,
    EXT_SCALAR,
    EXT_STAGED,
    EXT_TORCH,
    POLICIES,
    CodecError,
    Staged,
    StageStats,
    TensorReader,
    TensorWriter,
)

__all__ = ["Codec", "CodecError", "body_nbytes", "join", "DEFAULTS"]

MAGIC = b"FL"
VERSION = 1
KIND_MESSAGE = ord("M")
KIND_BODY = ord("B")
_PREFIX = struct.Struct("<2sBBI")
EXT_TUPLE = 4  # empty record opening a msgpack array that decodes as a tuple

DEFAULTS: dict[str, Any] = {
    "compression": "auto",  # per tensor: "auto", "none", "lz4" or "shuffle+lz4"
    "min_compress_bytes": 4096,  # tensors smaller than this are never compressed
    "inline_bytes": 1024,  # tensors up to this size travel inside the header
    "max_message_bytes": 1 << 32,  # a frame, and the tensors it decodes to, in all
    "max_tensor_bytes": 1 << 31,  # one tensor, decoded
    "max_depth": 32,  # nesting of lists, tuples and dicts (the body dict is depth 1)
    "max_items": 1 << 22,  # entries of one list, tuple or dict
    "seed": 0,  # of random-k and stochastic rounding (with each message's src and seq)
    "rules": [],  # [[codec.rules]]: lossy stages per message kind and tensor name
    "stages": {},  # [codec.stages]: message kind = stage list (shorthand for a rule)
}
_RANGES = {
    "min_compress_bytes": (0, 1 << 62),
    "inline_bytes": (0, 1 << 16),
    "max_message_bytes": (64, 1 << 62),
    "max_tensor_bytes": (0, 1 << 62),
    "max_depth": (1, 256),
    "max_items": (1, 1 << 40),
    "seed": (0, (1 << 64) - 1),
}
_TUPLE_RECORD = ExtType(EXT_TUPLE, b"")
_TUPLE_MARK = object()  # what the tuple record decodes to before its list becomes a tuple
_new_message = tuple.__new__  # Message's own __new__ checks nothing, and costs more
_BASES: tuple[Any, ...] = (int, float, bytes, list, dict)  # subclasses become these
_FIELDS = ("src", "dst", "kind", "sent_at", "seq", "body")
_FIELD_TYPES = (int, int, str, float, int, dict)
_PACK_OPTS = {"use_bin_type": True, "strict_types": True, "datetime": False}


class Codec:
    """Encodes messages and bodies into frames and decodes frames, under one compression policy
    and one set of limits (see DEFAULTS); stateless, so one instance serves many threads."""

    def __init__(self, **settings: Any) -> None:
        cfg = _validated(settings)
        self.compression: str = cfg["compression"]
        self.min_compress_bytes: int = cfg["min_compress_bytes"]
        self.inline_bytes: int = cfg["inline_bytes"]
        self.max_message_bytes: int = cfg["max_message_bytes"]
        self.max_tensor_bytes: int = cfg["max_tensor_bytes"]
        self.max_depth: int = cfg["max_depth"]
        self.max_items: int = cfg["max_items"]
        self.seed: int = cfg["seed"]
        self.rules = Rules.from_config(cfg["rules"], cfg["stages"], POLICIES)
        self._staging = bool(self.rules.rules)  # checked on every message: a plain attribute
        self._local = threading.local()
        # The stage counters of each thread that encoded (small; its writer dies with it).
        self._counters: list[StageStats] = []
        self._lock = threading.Lock()
        self._base: dict[str, Any] = {}  # counts carried over from before a resume

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Codec:
        """A codec from the `[codec]` config table; an unknown key or bad value is a ConfigError
        naming it."""
        return cls(**dict(section))

    def __repr__(self) -> str:
        return (f"Codec(compression={self.compression!r}, max_message_bytes="
                f"{self.max_message_bytes}, max_tensor_bytes={self.max_tensor_bytes}, "
                f"rules={len(self.rules.rules)})")

    @property
    def lossy(self) -> bool:
        """Whether some rule changes tensors (a transport must then pass local messages through
        the codec too, or they would arrive exact where remote ones do not)."""
        return self.rules.lossy

    @property
    def stats(self) -> dict[str, Any]:
        """Running counts since creation (or `reset_stats`), over all threads, of the tensors
        that went through lossy stages: `staged` (how many), `raw_bytes` (before), `stage_bytes`
        (after each stage, by name), `wire_bytes` (after lossless compression); `fallbacks`:
        tensors a rule named that travelled losslessly (non-finite or out-of-range values).
        Frame sizes are the host's to count (`Host.stats["bytes"]` in strict mode)."""
        base = self._base
        out: dict[str, Any] = {k: base.get(k, 0) for k in
                               ("staged", "raw_bytes", "wire_bytes", "fallbacks")}
        out["stage_bytes"] = dict(base.get("stage_bytes", {}))
        with self._lock:
            counters = list(self._counters)
        for ss in counters:
            out["staged"] += ss.tensors
            out["raw_bytes"] += ss.raw_bytes
            out["wire_bytes"] += ss.wire_bytes
            out["fallbacks"] += ss.fallbacks
            for name, n in sorted(ss.stage_bytes.items()):
                out["stage_bytes"][name] = out["stage_bytes"].get(name, 0) + n
        return out

    def continue_stats(self, base: Mapping[str, Any]) -> None:
        """Count `stats` on from `base` (what a resumed run had counted before)."""
        self._base = {k: int(base.get(k, 0)) for k in
                      ("staged", "raw_bytes", "wire_bytes", "fallbacks")}
        self._base["stage_bytes"] = {str(k): int(v) for k, v in
                                     dict(base.get("stage_bytes", {})).items()}

    def reset_stats(self) -> None:
        """Zero the counters of `stats`."""
        self._base = {}
        with self._lock:
            for ss in self._counters:
                ss.reset()

    # ------------------------------------------------------------------------------ encoding

    def encode(self, msg: Message) -> list[bytes | memoryview]:
        """`msg` as frame parts, header first; tensor payloads are views of the arrays, not
        copies, so the arrays must not change until the parts are written out."""
        h = self._staged_header(msg) if self._staging else _header(msg)
        return self._frame(KIND_MESSAGE, h, check=True)

    def encode_body(self, body: Mapping[str, Any]) -> list[bytes | memoryview]:
        """A bare body (a checkpoint, a result) as frame parts, the same way as `encode`."""
        return self._frame(KIND_BODY, _as_dict(body), check=True)

    def _frame(self, kind: int, obj: Any, check: bool) -> list[Any]:
        if check:
            body = obj[5] if kind == KIND_MESSAGE else obj
            _check_tree(body, self.max_depth, self.max_depth, self.max_items)
        try:
            packer, w = self._local.tools
        except AttributeError:
            # Building a Packer costs more than packing a small header: one per thread, reused.
            w = _Writer(self)
            packer = msgpack.Packer(default=w.default, **_PACK_OPTS)
            self._local.tools = packer, w
            with self._lock:
                self._counters.append(w.stage_stats)
        w.parts = []
        w.end = 0
        w.expanded = 0
        w.current = None
        try:
            header = packer.pack(obj)
        except CodecError as e:
            w.parts = []
            where = _path_to(obj[5] if kind == KIND_MESSAGE else obj, w.current)
            raise CodecError(f"cannot encode {where}: {e}") from None
        except Exception as e:
            w.parts = []
            raise CodecError(f"cannot encode the body: {_explain(e)}") from None
        hl = len(header)
        parts = w.parts
        # A receiver refuses more (see DECODE_RATIO): better said here, by the sender.
        if w.expanded > DECODE_RATIO * (8 + hl + w.end) + DECODE_FLOOR:
            w.parts = []
            what = f"message {obj[2]!r}" if kind == KIND_MESSAGE else "the body"
            raise CodecError(f"cannot encode {what}: its sparsified tensors would decode to "
                             f"{w.expanded} bytes from a frame of about {8 + hl + w.end} "
                             f"bytes; receivers accept at most "
                             f"{DECODE_RATIO} x the frame + {DECODE_FLOOR} bytes (keep more "
                             f"entries: a larger fraction or k in the codec rule)")
        if not parts:
            if 8 + hl > self.max_message_bytes:
                raise CodecError(f"frame of {8 + hl} bytes exceeds max_message_bytes "
                                 f"{self.max_message_bytes}")
            return [_PREFIX.pack(MAGIC, VERSION, kind, hl) + header]
        w.parts = []  # the payload views leave with the frame, not with the writer
        pad = -(8 + hl) % ALIGN
        total = 8 + hl + pad + w.end
        if total > self.max_message_bytes:
            raise CodecError(f"frame of {total} bytes exceeds max_message_bytes "
                             f"{self.max_message_bytes}")
        first = b"".join((_PREFIX.pack(MAGIC, VERSION, kind, hl), header, bytes(pad)))
        return [first, *parts]

    # ------------------------------------------------------------------------------ decoding

    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        """The message in frame `data`; its arrays are read-only views into `data` (torch
        tensors share `data` too and must be treated as read-only), so `data` must not be
        reused while the message lives."""
        h, walk = self._unframe(data, KIND_MESSAGE)
        if type(h) is not list or len(h) != 6:
            raise CodecError("message header must be a list of 6 fields [src, dst, kind, "
                             f"sent_at, seq, body]; got {_describe(h)}")
        src, dst, kind, sent_at, seq, body = h
        if (type(src) is not int or type(dst) is not int or type(kind) is not str
                or type(sent_at) is not float or type(seq) is not int or type(body) is not dict):
            for name, value, want in zip(_FIELDS, h, _FIELD_TYPES):
                if type(value) is not want:
                    raise CodecError(f"message header field {name!r} is {_describe(value)}; "
                                     f"expected {want.__name__}")
        if walk:
            _check_tree(body, self.max_depth, self.max_depth, self.max_items)
        return _new_message(Message, (src, dst, kind, body, sent_at, seq))

    def decode_body(self, data: bytes | bytearray | memoryview) -> dict[Any, Any]:
        """The body in a frame made by `encode_body`."""
        body, walk = self._unframe(data, KIND_BODY)
        if type(body) is not dict:
            raise CodecError(f"body frame must hold a dict; got {_describe(body)}")
        if walk:
            _check_tree(body, self.max_depth, self.max_depth, self.max_items)
        return body

    def roundtrip(self, msg: Message) -> tuple[Message, int]:
        """`msg` after encoding and decoding (what a receiver in another process would get, in
        fresh memory) and the frame's size in bytes."""
        h = self._staged_header(msg) if self._staging else _header(msg)
        parts = self._frame(KIND_MESSAGE, h, check=False)
        data = parts[0] if len(parts) == 1 else join(parts)
        return self.decode(data), len(data)

    def _staged_header(self, msg: Message) -> list[Any]:
        """The header list of `msg`, its body's tensors wrapped for the rules of its kind."""
        h = _header(msg)
        rules = self.rules.for_kind(h[2])
        if rules:
            h[5] = _wrap(h[5], "", rules, (self.seed, h[0], h[4]))
        return h

    def _unframe(self, data: Any, kind: int) -> tuple[Any, bool]:
        """The header object of frame `data`, and whether its nesting must still be checked."""
        try:
            mv = memoryview(data)
        except TypeError:
            raise CodecError(f"cannot decode {type(data).__name__}: need bytes, bytearray or "
                             "memoryview") from None
        if not mv.c_contiguous:
            raise CodecError("cannot decode a non-contiguous buffer (a strided view); pass "
                             "bytes(view) instead")
        if mv.ndim != 1 or mv.itemsize != 1:
            try:
                mv = mv.cast("B")
            except (TypeError, BufferError, ValueError):
                raise CodecError("cannot decode a buffer that does not cast to bytes") from None
        n = len(mv)
        if n > self.max_message_bytes:
            raise CodecError(f"frame of {n} bytes exceeds max_message_bytes "
                             f"{self.max_message_bytes}")
        if n < 8:
            raise CodecError(f"truncated at byte offset {n}: a frame starts with an 8-byte prefix")
        magic, version, got, hl = _PREFIX.unpack_from(mv)
        if magic != MAGIC:
            raise CodecError(f"not a fedloom frame: bytes 0-1 are {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise CodecError(f"frame version {version} at byte offset 2; this codec reads "
                             f"version {VERSION}")
        if got != kind:
            what = "message" if kind == KIND_MESSAGE else "body"
            raise CodecError(f"frame kind {bytes((got,))!r} at byte offset 3; expected "
                             f"{bytes((kind,))!r} ({what})")
        hend = 8 + hl
        if hend > n:
            raise CodecError(f"truncated at byte offset {n}: the header declares {hl} bytes "
                             "from byte offset 8")
        # Tensors may decode to more than the frame (lz4, sparse records), but never to more
        # than a fixed multiple of it: a small frame cannot make the receiver allocate much.
        budget = min(self.max_message_bytes, DECODE_RATIO * n + DECODE_FLOOR)
        r = _Reader(mv, -(-hend // ALIGN) * ALIGN, self.max_tensor_bytes, budget)
        lim = min(hl, self.max_items)
        try:
            # msgpack bounds every declared length by the header's real size (so a few bytes
            # cannot make it preallocate much) and lists and maps by max_items too. A msgpack
            # timestamp (never written here) decodes as a plain float, so no type leaks out.
            obj = msgpack.unpackb(
                mv[8:hend], ext_hook=r.ext_hook, list_hook=r.list_hook,
                object_hook=r.object_hook, strict_map_key=False, timestamp=1,
                max_array_len=lim, max_map_len=lim,
            )
        except CodecError:
            raise
        except Exception as e:
            why = _explain(e)
            if "exceeds max_" in why:  # msgpack's own length limits, which we set
                why += f" (max_items is {self.max_items}; the header has {hl} bytes)"
            raise CodecError(f"bad header at byte offsets 8-{hend}: {why}") from None
        if r.marks:
            raise CodecError(f"{r.marks} tuple record(s) out of place in the header")
        end = r.base + r.end if r.seen else hend
        if n != end:
            raise CodecError(f"{n - end} unexpected bytes after the frame's end at byte offset "
                             f"{end}")
        # Nesting cannot be deeper than the number of containers: most headers need no walk.
        return obj, r.nests > self.max_depth


# ---------------------------------------------------------------------------------- helpers

class _Writer(TensorWriter):
    """msgpack's `default` for one frame: tensors become records, tuples tagged lists, and
    subclasses of plain types their base type."""

    __slots__ = ("current",)

    def __init__(self, codec: Codec) -> None:
        super().__init__(codec.compression, codec.min_compress_bytes, codec.inline_bytes,
                         codec.max_tensor_bytes)
        self.current: Any = None  # the value being converted, to name it in an error

    def default(self, obj: Any) -> Any:
        self.current = obj
        t = type(obj)
        if t is np.ndarray:
            return self.ndarray(obj)
        if t is tuple:
            return [_TUPLE_RECORD, *obj]
        if t is Staged:
            return self.staged(obj)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, np.generic):
            if isinstance(obj, np.bool_ | np.number):
                return self.scalar(obj)
            if isinstance(obj, str):  # np.str_
                return str.__str__(obj)
            if isinstance(obj, bytes):  # np.bytes_
                return bytes(obj)
        elif isinstance(obj, np.ndarray):
            if isinstance(obj, np.ma.MaskedArray):
                raise CodecError("a masked array (its mask would be lost)")
            return self.ndarray(np.asarray(obj))
        elif isinstance(obj, tuple):
            return [_TUPLE_RECORD, *obj]
        elif isinstance(obj, str):
            return str.__str__(obj)  # the characters, even where str() is overridden (enums)
        else:
            for base in _BASES:
                if isinstance(obj, base):
                    return base(obj)
        raise CodecError(f"unsupported type {t.__module__}.{t.__qualname__}")


class _Reader(TensorReader):
    """msgpack's hooks for one frame: ext records to values, tagged lists to tuples, and a count
    of containers (to skip the nesting walk when there are too few to nest too deep)."""

    __slots__ = ("marks", "nests")

    def __init__(self, mv: memoryview, base: int, max_tensor: int, budget: int) -> None:
        # TensorReader's fields set here directly: this runs once per decoded message.
        self.mv = mv
        self.base = base
        self.size = len(mv)
        self.end = 0
        self.max_tensor = max_tensor
        self.budget = budget
        self.seen = False
        self.marks = 0  # tuple records seen but not yet turned into tuples
        self.nests = 0  # lists, tuples and dicts decoded

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_TUPLE:
            if data:
                raise CodecError(f"tuple record holds {len(data)} bytes; expected none")
            self.marks += 1
            return _TUPLE_MARK
        if code in (EXT_NDARRAY, EXT_TORCH, EXT_SCALAR, EXT_STAGED):
            return self.record(code, data)
        raise CodecError(f"unknown ext code {code} in the header; expected {EXT_NDARRAY} "
                         f"(numpy), {EXT_TORCH} (torch), {EXT_SCALAR} (numpy scalar), "
                         f"{EXT_TUPLE} (tuple) or {EXT_STAGED} (staged tensor)")

    def object_hook(self, d: dict[Any, Any]) -> dict[Any, Any]:
        self.nests += 1
        return d

    def list_hook(self, items: list[Any]) -> Any:
        self.nests += 1
        if items and items[0] is _TUPLE_MARK:
            self.marks -= 1
            return tuple(items[1:])
        return items


def _header(msg: Message) -> list[Any]:
    src, dst, kind, body, sent_at, seq = msg
    try:
        if type(src) is not int:
            src = operator.index(src)
        if type(dst) is not int:
            dst = operator.index(dst)
        if type(seq) is not int:
            seq = operator.index(seq)
        if type(sent_at) is not float:
            sent_at = float(sent_at)
    except TypeError as e:
        raise CodecError(f"cannot encode message header: {e}") from None
    if type(kind) is not str:
        if not isinstance(kind, str):
            raise CodecError(f"message kind must be a str; got {_describe(kind)}")
        kind = str.__str__(kind)
    return [src, dst, kind, sent_at, seq, _as_dict(body)]


def _wrap(obj: Any, path: str, rules: tuple[Rule, ...], seed: tuple[int, int, int]) -> Any:
    """`obj` (named `path`) with each tensor a rule names wrapped as Staged; containers on the
    way are copied only when something inside them is wrapped (the sender's body is never
    changed)."""
    t = type(obj)
    if t is dict or t is list or t is tuple:
        items = obj.items() if t is dict else enumerate(obj)
        out = None
        for key, v in items:
            if type(v) not in _WRAPPABLE and not _is_tensor(v):
                continue
            w = _wrap(v, f"{path}/{key}" if path else str(key), rules, seed)
            if w is not v:
                if out is None:
                    out = dict(obj) if t is dict else list(obj)
                out[key] = w
        if out is None:
            return obj
        return tuple(out) if t is tuple else out
    n = obj.size if t is np.ndarray else obj.numel()
    for rule in rules:
        if rule.matches(path, n):
            return Staged(obj, rule, (*seed, zlib.crc32(path.encode())))
    return obj


_WRAPPABLE = frozenset((dict, list, tuple, np.ndarray))


def _is_tensor(v: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


def _as_dict(body: Any) -> dict[Any, Any]:
    if type(body) is dict:
        return body
    if isinstance(body, Mapping):
        return dict(body)
    raise CodecError(f"a body must be a dict; got {_describe(body)}")


def _check_tree(obj: Any, left: int, limit: int, max_items: int) -> None:
    """Refuse nesting deeper than `limit` (`obj` itself is at depth limit - left + 1) and a
    container of more than `max_items` entries."""
    if left <= 0:
        raise CodecError(f"body nested deeper than max_depth {limit}")
    if len(obj) > max_items:
        raise CodecError(f"a {type(obj).__name__} of {len(obj)} entries exceeds max_items "
                         f"{max_items}")
    if type(obj) is dict:
        for k in obj:
            if type(k) is tuple:
                _check_tree(k, left - 1, limit, max_items)
        values: Any = obj.values()
    else:
        values = obj
    for v in values:
        t = type(v)
        if t is dict or t is list or t is tuple:
            _check_tree(v, left - 1, limit, max_items)


def _path_to(root: Any, target: Any) -> str:
    """Where `target` sits in `root`, as `body['a'][2]` (only on the error path)."""
    stack: list[tuple[Any, str]] = [(root, "body")]
    while stack:
        obj, path = stack.pop()
        if obj is target:
            return path
        if isinstance(obj, dict):
            stack.extend((v, f"{path}[{k!r}]") for k, v in obj.items())
        elif isinstance(obj, list | tuple):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(obj))
    return "the body"


def _describe(v: Any) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def _explain(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _validated(given: Mapping[str, Any]) -> dict[str, Any]:
    cfg = options("codec", given, DEFAULTS, choices={"compression": POLICIES})
    for key, (lo, hi) in _RANGES.items():
        v = cfg[key]
        if not lo <= v <= hi:
            raise ConfigError(f"[codec] {key} = {v!r} is out of range; expected an integer from "
                              f"{lo} to {hi}")
    return cfg


# ------------------------------------------------------------------------------- free helpers

_SMALL = 16  # estimated bytes of one scalar entry (key, type tag, value)
_SCALARS = frozenset((int, float, bool, type(None)))


def body_nbytes(body: Mapping[str, Any]) -> int:
    """A cheap estimate of a body's encoded size: tensor bytes (uncompressed) plus a small
    constant per scalar and the length of strings and bytes."""
    n = 32
    for v in body.values():
        t = type(v)
        if t is np.ndarray:
            n += v.nbytes + 48
        elif t in _SCALARS:
            n += _SMALL
        elif t is str or t is bytes:
            n += len(v) + _SMALL
        else:
            n += _value_nbytes(v)
    return n


def _value_nbytes(v: Any) -> int:
    t = type(v)
    if t in _SCALARS:
        return _SMALL
    if t is dict or isinstance(v, Mapping):
        n = _SMALL
        for k, x in v.items():
            n += _value_nbytes(k) + _value_nbytes(x)
        return n
    if t is list or t is tuple or isinstance(v, list | tuple):
        n = _SMALL
        for x in v:
            n += _value_nbytes(x)
        return n
    if isinstance(v, str | bytes | bytearray):
        return len(v) + _SMALL
    nb = getattr(v, "nbytes", None)  # numpy arrays and scalars, torch tensors, memoryviews
    if isinstance(nb, int):
        return nb + 48
    return _SMALL


def join(parts: list[Any]) -> bytearray:
    """Frame parts as one buffer (one copy)."""
    return bytearray().join(parts)
