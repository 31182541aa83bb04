"""Lossy codec stages, applied to floating tensors before lossless compression: casts (`fp16`,
`bf16`), integer quantisation with power-of-two block scales (`int8`, `int4`) and sparsification
(`topk`, `randk`) with delta-encoded indices; and the `[codec]` rules that choose them per
message kind and tensor name.

A stage list is at most one sparsifier followed by at most one value encoder (["topk", "int8"]
keeps the k largest entries and quantises them). `encode` turns a flat float array into
sections (1-D arrays, in wire order) and `decode` turns sections back into a dense array of the
original float dtype; `apply` is the two together, what a receiver will see.

Every stage is a projection: applied to its own output it changes nothing, bit for bit (scales
are powers of two, so a decoded value is exactly on the grid of any scale at least as fine; a
sparsified tensor with at most k nonzeros keeps all of them). So a tensor decoded and sent on
again (a relay, strict mode followed by a real transport) loses nothing more, and a sender can
compute what its receiver will decode (error feedback: protocols.compression).

Tensors a stage cannot represent (a NaN or infinity anywhere, fp16 overflow, magnitudes near
float32's maximum) are sent losslessly instead: `encode` returns None. Quantisation and casts
compute in float32; float16 and float64 tensors are converted to float32 and back at the end.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel.options import ConfigError, options

__all__ = ["STAGES", "Encoded", "Pipeline", "Rule", "Rules", "StageError", "apply", "decode",
           "encode", "check_layout"]


class StageError(ValueError):
    """A staged tensor's header or sections are inconsistent; the message names the field."""


FP16, BF16, INT8, INT4, TOPK, RANDK = 1, 2, 3, 4, 5, 6
_IDS = {"fp16": FP16, "bf16": BF16, "int8": INT8, "int4": INT4, "topk": TOPK, "randk": RANDK}
_NAMES = {v: k for k, v in _IDS.items()}
STAGES = tuple(_IDS)
SPARSIFIERS = ("topk", "randk")
ENCODERS = ("fp16", "bf16", "int8", "int4")
STOCHASTIC = 1  # flag bit of a quantiser stage
_LEVELS = {"int8": 127, "int4": 7}
_SHIFT = {"int8": 7, "int4": 3}  # 2**shift is the power of two just above the level count
# Scale exponents: 2**-126 is float32's smallest normal, so 2**-e never overflows; at 2**120
# the largest code times the scale still fits float32 (anything larger travels losslessly).
E_MIN, E_MAX = -126, 120
MAX_BLOCK = (1 << 32) - 1
FLOATS = ("float16", "float32", "float64", "bfloat16")

_F4 = np.dtype("<f4")
_INDEX_DTYPES = tuple(np.dtype(s) for s in ("|u1", "<u2", "<u4", "<u8"))


# ------------------------------------------------------------------------------ the pipeline

@dataclass(frozen=True)
class Pipeline:
    """A validated stage list and its parameters (at most one sparsifier, then at most one value
    encoder); `k` > 0 fixes the kept count, else `fraction` of the elements (at least 1)."""

    sparsifier: str | None = None
    encoder: str | None = None
    fraction: float = 0.01
    k: int = 0
    block: int = 64  # quantiser block (consecutive positions of the flat tensor); 0: per tensor
    stochastic: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The stage names in order."""
        return tuple(s for s in (self.sparsifier, self.encoder) if s is not None)

    def kept(self, n: int) -> int:
        """How many entries the sparsifier keeps of `n` (at most)."""
        k = self.k if self.k > 0 else math.ceil(self.fraction * n - 1e-9)
        return max(1, min(k, n))

    def specs(self, n: int) -> list[tuple[int, int, int]]:
        """The stages as they go on the wire: (stage id, flags, parameter)."""
        out = []
        if self.sparsifier is not None:
            out.append((_IDS[self.sparsifier], 0, self.kept(n)))
        if self.encoder is not None:
            quant = self.encoder in _LEVELS
            out.append((_IDS[self.encoder], STOCHASTIC if quant and self.stochastic else 0,
                        self.block if quant else 0))
        return out

    @classmethod
    def from_specs(cls, specs: Sequence[tuple[int, int, int]]) -> Pipeline:
        """The pipeline a received stage list describes (`k` is the wire's kept count)."""
        sparsifier = encoder = None
        k, block, stochastic = 0, 0, False
        for i, (sid, flags, param) in enumerate(specs):
            name = _NAMES.get(sid)
            if name is None:
                raise StageError(f"stage {i}: unknown stage id {sid}; expected 1-6 "
                                 f"({', '.join(f'{v} {n}' for n, v in _IDS.items())})")
            if name in SPARSIFIERS:
                if i != 0:
                    raise StageError(f"stage {i}: sparsifier {name} must be the first stage")
                if flags:
                    raise StageError(f"stage {i} ({name}): flags {flags}; expected 0")
                if param < 1:
                    raise StageError(f"stage {i} ({name}): k = {param}; expected >= 1")
                sparsifier, k = name, param
            else:
                if encoder is not None:
                    raise StageError(f"stage {i}: a second value encoder ({name} after "
                                     f"{encoder})")
                quant = name in _LEVELS
                if flags & ~(STOCHASTIC if quant else 0):
                    raise StageError(f"stage {i} ({name}): flags {flags} not understood")
                if quant and param > MAX_BLOCK:
                    raise StageError(f"stage {i} ({name}): block {param} exceeds {MAX_BLOCK}")
                if not quant and param:
                    raise StageError(f"stage {i} ({name}): parameter {param}; expected 0")
                encoder, block, stochastic = name, param, bool(flags & STOCHASTIC)
        if len(specs) > 2:
            raise StageError(f"{len(specs)} stages; at most a sparsifier and an encoder")
        return cls(sparsifier, encoder, k=k, block=block, stochastic=stochastic)


@dataclass
class Encoded:
    """A tensor after its stages: wire stage list, sections in wire order, and the bytes after
    each stage (what `Codec.stats` adds up)."""

    specs: list[tuple[int, int, int]]
    sections: list[np.ndarray]
    sizes: list[tuple[str, int]]


# -------------------------------------------------------------------------------- encoding

def encode(x: np.ndarray, pipe: Pipeline,
           rng: Callable[[], np.random.Generator] | None = None) -> Encoded | None:
    """The sections of the flat float array `x` (float16, float32 or float64) under `pipe`, or
    None when `x` cannot be represented (it then travels losslessly). `rng()` gives the
    generator for random-k and stochastic rounding; it is called only when they need it."""
    n = x.size
    sections: list[np.ndarray] = []
    sizes: list[tuple[str, int]] = []
    idx: np.ndarray | None = None
    values = x
    if pipe.sparsifier == "randk" and not _fits(x, pipe.encoder):
        # Decided on the whole tensor, not on the random selection: whether a tensor falls
        # back must not depend on the draw, or the stage would not be a projection.
        return None
    if pipe.sparsifier is not None:
        k = pipe.kept(n)
        idx = _select(x, k, pipe.sparsifier, rng)
        if idx is None:
            return None
        values = x[idx]
        deltas = _deltas(idx)
        sections.append(deltas)
        sizes.append((pipe.sparsifier, deltas.nbytes + values.nbytes))
    enc = pipe.encoder
    if enc is None:
        sections.append(values)
    elif enc == "fp16":
        v32 = values.astype(_F4, copy=False)
        if not _fits(v32, "fp16"):  # max and min of the input: cheaper than isfinite on fp16
            return None
        sections.append(v32.astype(np.float16))
    elif enc == "bf16":
        b = _to_bf16(values.astype(_F4, copy=False))
        if b.size and ((b & 0x7F80) == 0x7F80).any():  # an infinity or NaN
            return None
        sections.append(b)
    else:
        starts = _starts(values.size, pipe.block, idx)
        stoch = rng if pipe.stochastic else None
        q = _quantise(values.astype(_F4, copy=False), starts, pipe.block if idx is None else 0,
                      enc, stoch)
        if q is None:
            return None
        exps, codes = q
        sections.append(exps)
        sections.append(_pack4(codes) if enc == "int4" else codes)
    if enc is not None:
        sizes.append((enc, sum(s.nbytes for s in sections)))
    return Encoded(pipe.specs(n), sections, sizes)


def _fits(x: np.ndarray, enc: str | None) -> bool:
    """Whether `encoder` can represent every value of `x` (rounding is monotone in the
    magnitude, so the largest one decides)."""
    if not x.size:
        return True
    top = np.float32(max(x.max(), -x.min()))  # NaN propagates
    if not np.isfinite(top):
        return False
    if enc == "fp16":
        with np.errstate(over="ignore"):
            return bool(np.isfinite(np.float16(top)))
    if enc == "bf16":
        return bool((_to_bf16(np.array([top], _F4))[0] & 0x7F80) != 0x7F80)
    if enc in _LEVELS:
        return _quantise(np.array([top], _F4), np.zeros(1, np.int64), 0, enc, None) is not None
    return True


def _select(x: np.ndarray, k: int, how: str,
            rng: Callable[[], np.random.Generator] | None) -> np.ndarray | None:
    """Sorted int64 positions to keep (top-k: None when `x` holds a NaN or infinity)."""
    n = x.size
    if np.count_nonzero(x) <= k:
        # Already k-sparse: keep every nonzero (what makes the stage a projection).
        idx = np.flatnonzero(x)
    elif how == "topk":
        # argpartition puts NaN last (largest), so a NaN anywhere is kept and caught below.
        idx = np.sort(np.argpartition(np.abs(x), n - k)[n - k:])
    else:
        gen = rng() if rng is not None else np.random.default_rng(0)
        idx = np.sort(gen.choice(n, size=k, replace=False))
        idx = idx[x[idx] != 0]  # zeros are implied (and -0.0 would not survive a second pass)
    if how == "topk" and not np.isfinite(x[idx]).all():
        return None
    return idx.astype(np.int64, copy=False)


def _deltas(idx: np.ndarray) -> np.ndarray:
    """Sorted positions as gaps (the first from 0) in the smallest unsigned dtype that holds
    them: mostly small numbers, which byte shuffling and lz4 then squeeze further."""
    d = np.diff(idx, prepend=0) if idx.size else idx
    top = int(d.max()) if d.size else 0
    for dt in _INDEX_DTYPES:
        if top < 1 << (8 * dt.itemsize):
            return d.astype(dt)
    raise AssertionError("unreachable: an int64 gap fits uint64")


def _starts(m: int, block: int, idx: np.ndarray | None) -> np.ndarray:
    """Offsets (into the m values) where a new scale starts. Blocks are runs of `block`
    positions of the whole flat tensor, so a sparsified tensor's blocks hold the kept entries
    that fall in the same run (one scale per run that keeps anything)."""
    if m == 0:
        return np.zeros(0, np.int64)
    if block == 0:
        return np.zeros(1, np.int64)
    if idx is None:
        return np.arange(0, m, block, dtype=np.int64)
    bid = idx // block
    return np.concatenate(([0], np.flatnonzero(bid[1:] != bid[:-1]) + 1)).astype(np.int64)


def _scale(v: np.ndarray, factors: np.ndarray, starts: np.ndarray, block: int,
           out: np.ndarray) -> np.ndarray:
    """out = v times its group's factor; `block` > 0 says the groups are runs of that length
    (dense), which allows a broadcast instead of repeating the factors."""
    m = v.size
    if m == 0:
        return out
    if len(factors) == 1:
        return np.multiply(v, factors[0], out=out)
    if block > 0:
        full = m // block * block
        nf = full // block
        np.multiply(v[:full].reshape(nf, block), factors[:nf, None],
                    out=out[:full].reshape(nf, block))
        if full < m:
            np.multiply(v[full:], factors[-1], out=out[full:])
        return out
    return np.multiply(v, np.repeat(factors, np.diff(starts, append=m)), out=out)


def _quantise(v: np.ndarray, starts: np.ndarray, block: int, enc: str,
              rng: Callable[[], np.random.Generator] | None
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 scale exponents per group, int8 codes) with v ~ code * 2**exponent, |code| <= L
    (127 or 7), and the exponent the smallest with max|v| <= L * 2**exponent."""
    levels, shift = _LEVELS[enc], _SHIFT[enc]
    m = v.size
    if m == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.int8)
    a = np.abs(v)
    amax = np.maximum.reduceat(a, starts)
    if not np.isfinite(amax).all():
        return None
    mant, ex = np.frexp(amax)  # amax = mant * 2**ex, mant in [0.5, 1) (both 0 for amax 0)
    e = ex.astype(np.int64) - shift
    e += mant * (1 << shift) > levels  # exact: mant * 2**shift is a power-of-two scaling
    e[amax == 0] = E_MIN
    np.maximum(e, E_MIN, out=e)
    if e.max() > E_MAX:
        return None
    inv = np.ldexp(np.float32(1), -e).astype(_F4)
    scaled = _scale(v, inv, starts, block, out=a)  # exact: powers of two
    if rng is not None:
        # floor(v) + (u < frac(v)), not floor(v + u): the sum can round up to the next integer
        # in float32, and an integer v (a value already on the grid) must stay as it is.
        low = np.floor(scaled)
        scaled -= low  # exact: the fraction of a float32 below 128
        low += rng().random(m, dtype=np.float32) < scaled
        scaled = low
    else:
        np.rint(scaled, out=scaled)
    np.clip(scaled, -levels, levels, out=scaled)
    return e.astype(np.int8), scaled.astype(np.int8)


def _pack4(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit two's-complement codes per byte, the even position in the low nibble."""
    u = codes.view(np.uint8) & 0x0F
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return u[0::2] | (u[1::2] << 4)


def _unpack4(packed: np.ndarray, m: int) -> np.ndarray:
    out = np.empty(2 * packed.size, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return ((out[:m] ^ 8).view(np.int8) - np.int8(8)).astype(np.int8)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits, rounding to nearest even (as torch does)."""
    u = x.view(np.uint32)
    r = (u >> 16) & 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


# -------------------------------------------------------------------------------- decoding

def _index_width(n: int) -> int:
    """Bytes of the smallest index dtype that holds any gap of an n-element tensor."""
    for dt in _INDEX_DTYPES:
        if n <= 1 << (8 * dt.itemsize):
            return dt.itemsize
    return 8


def _value_dtype(orig: str) -> np.dtype:
    return _F4 if orig == "bfloat16" else np.dtype(orig).newbyteorder("<")


def check_layout(n: int, pipe: Pipeline, orig: str,
                 table: Sequence[tuple[np.dtype, int]]) -> None:
    """Refuse a section table that does not fit the stages of an n-element `orig` tensor (the
    dtypes and counts the stages imply) before any section is read or allocated."""
    if orig not in FLOATS:
        raise StageError(f"staged tensor of dtype {orig}; stages apply to float tensors only")
    names: list[str] = []
    if pipe.sparsifier is not None:
        names.append("indices")
    enc = pipe.encoder
    names += ["scales", "codes"] if enc in _LEVELS else ["values"]
    if len(table) != len(names):
        raise StageError(f"section count {len(table)}; stages {'+'.join(pipe.names) or 'none'} "
                         f"need {len(names)} ({', '.join(names)})")
    m = n
    for i, ((dt, count), name) in enumerate(zip(table, names)):
        where = f"section {i} ({name})"
        if name == "indices":
            if dt not in _INDEX_DTYPES or dt.itemsize > _index_width(n):
                raise StageError(f"{where}: dtype {dt}; expected an unsigned integer of at most "
                                 f"{_index_width(n)} bytes for a tensor of {n} elements")
            if count > min(pipe.k, n):
                raise StageError(f"{where}: count {count} exceeds k = {pipe.k} (tensor of {n} "
                                 "elements)")
            m = count
            continue
        want: np.dtype[Any]
        if name == "scales":
            want, expect = np.dtype(np.int8), _groups_bound(m, pipe, n)
            exact = pipe.sparsifier is None
        elif name == "codes" and enc == "int4":
            want, expect, exact = np.dtype(np.uint8), (m + 1) // 2, True
        elif name == "codes":
            want, expect, exact = np.dtype(np.int8), m, True
        else:
            want = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2")}.get(enc or "",
                                                                        _value_dtype(orig))
            expect, exact = m, True
        if dt != want:
            raise StageError(f"{where}: dtype {dt}; expected {want}")
        if (count != expect) if exact else (count > expect):
            raise StageError(f"{where}: count {count}; expected {'' if exact else 'at most '}"
                             f"{expect} for {m} values")


def _groups_bound(m: int, pipe: Pipeline, n: int) -> int:
    """The scale count of m values (exact when dense, an upper bound when sparsified)."""
    if m == 0:
        return 0
    if pipe.block == 0:
        return 1
    if pipe.sparsifier is None:
        return -(-m // pipe.block)
    return min(m, -(-n // pipe.block))


def decode(n: int, pipe: Pipeline, orig: str, sections: Sequence[np.ndarray]) -> np.ndarray:
    """The dense flat array (`orig`'s numpy dtype; float32 for bfloat16) that sections laid out
    as `check_layout` accepted describe; StageError names what does not add up."""
    out_dt = _value_dtype(orig)
    idx: np.ndarray | None = None
    rest = list(sections)
    if pipe.sparsifier is not None:
        idx = _indices(rest.pop(0), n)
    m = n if idx is None else idx.size
    enc = pipe.encoder
    if enc is None or enc == "fp16":
        values = rest[0]
    elif enc == "bf16":
        values = (rest[0].astype(np.uint32) << 16).view(_F4)
    else:
        exps = rest[0]
        starts = _starts(m, pipe.block, idx)
        if exps.size != starts.size:
            raise StageError(f"section 'scales': count {exps.size}; the kept positions make "
                             f"{starts.size} blocks of {pipe.block}")
        if exps.size and (exps.min() < E_MIN or exps.max() > E_MAX):
            bad = int(exps.min()) if exps.min() < E_MIN else int(exps.max())
            raise StageError(f"section 'scales': exponent {bad} outside {E_MIN}..{E_MAX}")
        codes = _unpack4(rest[1], m) if enc == "int4" else rest[1]
        values = codes.astype(_F4)
        factors = np.ldexp(np.float32(1), exps.astype(np.int64)).astype(_F4)
        _scale(values, factors, starts, pipe.block if idx is None else 0, out=values)
    if idx is None:
        return values.astype(out_dt, copy=False)
    out = np.zeros(n, out_dt)
    # + 0 turns a -0.0 (a tiny value the encoder flushed) into +0.0, like every unkept entry.
    with np.errstate(invalid="ignore"):  # a signalling NaN in the values
        out[idx] = values + values.dtype.type(0)
    return out


def _indices(deltas: np.ndarray, n: int) -> np.ndarray:
    idx = np.cumsum(deltas.astype(np.int64))  # int64 wraps; a wrap shows as a decrease
    if idx.size and (idx[0] < 0 or idx[-1] >= n or (idx.size > 1 and (np.diff(idx) <= 0).any())):
        raise StageError(f"section 'indices': positions are not strictly increasing within "
                         f"0..{n - 1}")
    return idx


def apply(x: np.ndarray, pipe: Pipeline,
          rng: Callable[[], np.random.Generator] | None = None) -> np.ndarray:
    """What a receiver decodes for float array `x` (any shape) under `pipe`: a new array of
    x's dtype and shape (an unchanged copy when `x` cannot be represented)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    enc = encode(flat, pipe, rng)
    if enc is None:
        return np.array(x, copy=True)
    orig = np.dtype(x.dtype).name
    return decode(flat.size, pipe, orig, enc.sections).reshape(x.shape).astype(x.dtype,
                                                                               copy=False)


# ----------------------------------------------------------------------------------- rules

RULE_DEFAULTS: dict[str, Any] = {
    "kind": "*",  # message kinds (fnmatch pattern)
    "tensors": "*",  # tensor names: the path in the body, keys joined by "/" ("model/0.weight")
    "stages": [],  # e.g. ["int8"], ["topk", "int8"]; [] sends the tensors losslessly
    "block": 64,  # int8/int4 scale block (positions); 0: one scale per tensor
    "stochastic": False,  # int8/int4: stochastic rounding (seeded; see Codec)
    "fraction": 0.01,  # topk/randk: fraction of the elements kept (at least 1)
    "k": 0,  # topk/randk: a fixed count instead (> 0)
    "min_elements": 0,  # smaller tensors travel losslessly
    "compression": "",  # lossless policy for this rule's tensors; "" means the codec's
}


@dataclass(frozen=True)
class Rule:
    """Which tensors (kind and name patterns) get which pipeline and lossless policy."""

    kind: str
    tensors: str
    pipeline: Pipeline
    min_elements: int = 0
    compression: str | None = None  # None: the codec's own policy

    def matches(self, path: str, n: int) -> bool:
        """Whether a tensor named `path` of `n` elements falls under this rule."""
        return n >= self.min_elements and fnmatch.fnmatchcase(path, self.tensors)


class Rules:
    """The ordered `[codec]` rules: the first whose kind and tensor patterns match a tensor
    decides its stages; a tensor no rule matches travels losslessly."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._by_kind: dict[str, tuple[Rule, ...]] = {}

    @property
    def lossy(self) -> bool:
        """Whether any rule has a lossy stage."""
        return any(r.pipeline.names for r in self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def for_kind(self, kind: str) -> tuple[Rule, ...]:
        """The rules that can apply to messages of `kind`, in order."""
        got = self._by_kind.get(kind)
        if got is None:
            got = tuple(r for r in self.rules if fnmatch.fnmatchcase(kind, r.kind))
            if len(self._by_kind) > 4096:  # kinds are few; this only bounds a pathological use
                self._by_kind.clear()
            self._by_kind[kind] = got
        return got

    def match(self, kind: str, path: str, n: int) -> Rule | None:
        """The rule for tensor `path` (n elements) of a `kind` message, if any."""
        for r in self.for_kind(kind):
            if r.matches(path, n):
                return r
        return None

    @classmethod
    def from_config(cls, rules: Any, shorthand: Any, policies: Sequence[str]) -> Rules:
        """Rules from `[[codec.rules]]` tables, then `[codec.stages]` (kind = stage list, every
        tensor, default parameters); ConfigError names the bad key."""
        if not isinstance(rules, list):
            raise ConfigError(f"[codec] rules = {rules!r}; expected a list of tables "
                              "([[codec.rules]])")
        if not isinstance(shorthand, Mapping):
            raise ConfigError(f"[codec] stages = {shorthand!r}; expected a table of message "
                              "kind = stage list")
        out = [_rule(f"codec.rules[{i}]", r, policies) for i, r in enumerate(rules)]
        for kind, st in shorthand.items():
            out.append(_rule(f"codec.stages.{kind}", {"kind": kind, "stages": st}, policies))
        return cls(out)


def _rule(where: str, given: Any, policies: Sequence[str]) -> Rule:
    if not isinstance(given, Mapping):
        raise ConfigError(f"[{where}] = {given!r}; expected a table")
    given = dict(given)
    if isinstance(given.get("stages"), str):
        given["stages"] = [given["stages"]]
    o = options(where, given, RULE_DEFAULTS)

    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"[{where}] {key} = {o[key]!r}; expected {expected}")

    for key in ("kind", "tensors"):
        if not o[key]:
            raise bad(key, "a non-empty name or fnmatch pattern")
    stages = o["stages"]
    sparsifier = encoder = None
    for j, s in enumerate(stages):
        if not isinstance(s, str) or s not in _IDS:
            raise ConfigError(f"[{where}] stages[{j}] = {s!r} is not a stage; choose from "
                              f"{', '.join(STAGES)}")
        if s in SPARSIFIERS:
            if j != 0:
                raise ConfigError(f"[{where}] stages[{j}] = {s!r}: a sparsifier must come "
                                  f"first (e.g. [\"topk\", \"int8\"])")
            sparsifier = s
        else:
            if encoder is not None:
                raise ConfigError(f"[{where}] stages[{j}] = {s!r}: only one of "
                                  f"{', '.join(ENCODERS)} per rule (already {encoder!r})")
            encoder = s
    if not 0 <= o["block"] <= MAX_BLOCK:
        raise bad("block", f"an integer from 0 (one scale per tensor) to {MAX_BLOCK}")
    if not 0 < o["fraction"] <= 1:
        raise bad("fraction", "a number in (0, 1]")
    if o["k"] < 0:
        raise bad("k", "an integer >= 0 (0: use fraction)")
    if o["min_elements"] < 0:
        raise bad("min_elements", "an integer >= 0")
    if o["stochastic"] and encoder not in _LEVELS:
        raise bad("stochastic", "false unless the stages include int8 or int4")
    comp = o["compression"]
    if comp and comp not in policies:
        raise bad("compression", f"\"\" (the codec's) or one of {', '.join(policies)}")
    pipe = Pipeline(sparsifier, encoder, fraction=float(o["fraction"]), k=o["k"],
                    block=o["block"], stochastic=o["stochastic"])
    return Rule(o["kind"], o["tensors"], pipe, o["min_elements"], comp or None)
