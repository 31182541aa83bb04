"""Exact, order-independent weighted sums of float32 tensors.

`Accumulator.add(w, tensors)` adds w * x for every element exactly: no rounding happens until
the total is read, so the total is the same bits whatever order items arrive in and however
they are grouped (accumulators of parts `merge` into the accumulator of the whole).

How: a weight is split (Veltkamp) into at most two parts whose products with a float32 are
exact float64s (one part for integer weights below 2^29, such as sample counts). Each product
is cut into "limbs", float64 arrays holding integer multiples of u_k = 2^(40k - 180), limb k
made only when a product reaches it. Limb 0 rounds a product to the nearest multiple of
2^-180, the only rounding before the total is read, and one that never happens for a float32
(whose lowest bit is at least 2^-149) times an integer weight. A limb gets under 2^40 units per
item, so 2^12 items add exactly in float64 before the limbs are renormalised (carries passed
up, exactly). Reading the total normalises the limbs to one canonical form of the exact sum
(every limb but the top in [-u_{k+1}/2, u_{k+1}/2)), then adds them from the top in float64:
a function of the exact sum alone. Non-finite products (inf, nan) are summed apart (a sum of
infinities and nans does not depend on order either) and win where present.

Error: the float32 result is within 1 float32 ulp of the exact weighted mean of the float32
inputs (the float64 read-out and division cost a few float64 ulps, the cast half a float32
ulp), wherever |sum_i w_i x_i| >= n 2^-155, which integer weights always meet unless the
sum is exactly zero (then the result is exactly 0); below that the absolute error is at most
2n 2^-181 / sum_i w_i. A float64 sequential mean (sum_i w_i x_i accumulated in input order,
then divided) errs by up to ~n float64 ulps of sum_i |w_i x_i| / sum_i w_i: ours differs
from it by at most that plus 1 float32 ulp (tests/protocols/test_exactsum.py checks both
against rational arithmetic). Cost: about 5 passes over a tensor per limb a product needs
(2 limbs for values of ordinary size), against 2 for a float64 sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

LIMB_BITS = 40
BASE_EXP = -180  # limb 0's unit: below every float32 (2^-149) times an integer weight
# Items between renormalisations: each adds < 2^40 units per limb, and float64 holds 2^53.
RENORM_EVERY = 1 << 12
# Elements per block: a block's float64 scratch stays in cache while its limbs are cut.
BLOCK = 1 << 15
_MAGIC = 1.5 * 2.0**52  # (v + M*u) - M*u rounds v to a multiple of u while |v| < 2^51 u


def _unit(k: int) -> float:
    return math.ldexp(1.0, BASE_EXP + LIMB_BITS * k)


def _split_weight(w: float) -> tuple[float, ...]:
    """Parts of `w` (summing to it exactly) whose products with any float32 are exact."""
    m, e = math.frexp(w)
    hi = math.ldexp(math.floor(math.ldexp(m, 29)), e - 29)  # the top 29 bits: 29 + 24 <= 53
    lo = w - hi  # exact, and at most 24 significant bits
    return (hi,) if lo == 0.0 else (hi, lo)


def _carry(limbs: list[np.ndarray | None]) -> None:
    for k in range(len(limbs) - 1):
        limb = limbs[k]
        if limb is None:
            continue
        up = _unit(k + 1)
        # Exact: |limb / up| < 2^13 with bits down to 2^-40, so + 0.5 and floor do not round.
        c = np.floor(limb / up + 0.5)
        if c.any():
            c *= up
            limb -= c
            nxt = limbs[k + 1]
            if nxt is None:
                limbs[k + 1] = c
            else:
                nxt += c


class _Sums:
    """What both exact sums read out the same way: the weights' sum and the mean."""

    weights: list[float]

    def total(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def weight(self) -> float:
        """The sum of the weights, correctly rounded (so independent of order too)."""
        return math.fsum(self.weights)

    def mean(self, weighted: bool = True) -> dict[str, np.ndarray]:
        """total / (sum of weights, or the item count) as float32."""
        if not self.weights:
            raise ValueError("nothing to average (no items)")
        d = self.weight() if weighted else float(len(self.weights))
        if not d > 0:
            raise ValueError(f"the weights sum to {d}; a mean needs a positive sum")
        return {n: (t / d).astype(np.float32) for n, t in self.total().items()}


class Accumulator(_Sums):
    """A weighted sum of named float32 tensors, exact until read: the same total for any
    order or grouping of the same items."""

    def __init__(self) -> None:
        # Per tensor, limb k or None while nothing has reached it.
        self.limbs: dict[str, list[np.ndarray | None]] = {}
        self.special: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.weights: list[float] = []
        self._pending = 0  # items added since the limbs were last renormalised

    def __len__(self) -> int:
        return len(self.weights)

    def add(self, weight: float, tensors: Mapping[str, np.ndarray]) -> None:
        """Add `weight` * tensors (weight finite; tensors cast to float32 if they are not)."""
        w = float(weight)
        if not math.isfinite(w):
            raise ValueError(f"weight {weight!r} is not finite")
        names = sorted(tensors)
        if not self.shapes:
            self.shapes = {n: np.shape(tensors[n]) for n in names}
        elif names != sorted(self.shapes):
            raise ValueError(f"item has tensors {names}; the first had {sorted(self.shapes)}")
        parts = _split_weight(w) if w != 0.0 else ()
        for name in names:
            x = np.asarray(tensors[name])
            if x.shape != self.shapes[name]:
                raise ValueError(f"tensor {name!r} has shape {x.shape} in one item and "
                                 f"{self.shapes[name]} in another")
            if x.dtype != np.float32:
                x = x.astype(np.float32)
            for p in parts:
                self._add_product(name, x.ravel(), p)
        self.weights.append(w)
        self._pending += 1
        if self._pending >= RENORM_EVERY:
            self._renormalise()

    def _limb(self, name: str, k: int) -> np.ndarray:
        limbs = self.limbs.setdefault(name, [])
        while len(limbs) <= k:
            limbs.append(None)
        limb = limbs[k]
        if limb is None:
            limb = limbs[k] = np.zeros(math.prod(self.shapes[name]))
        return limb

    def _add_product(self, name: str, x: np.ndarray, p: float) -> None:
        size = x.size
        buf, tmp = np.empty(min(size, BLOCK)), np.empty(min(size, BLOCK))
        for lo in range(0, size, BLOCK):
            hi = min(lo + BLOCK, size)
            v, t = buf[:hi - lo], tmp[:hi - lo]
            np.multiply(x[lo:hi], p, out=v, dtype=np.float64)  # exact: see _split_weight
            finite = np.isfinite(v)
            if not finite.all():
                sp = self.special.get(name)
                if sp is None:
                    sp = self.special[name] = np.zeros(size)
                with np.errstate(invalid="ignore"):  # inf + -inf is nan, as meant
                    sp[lo:hi] += np.where(finite, 0.0, v)
                v[~finite] = 0.0
            peak = float(np.abs(v).max(initial=0.0))
            if peak == 0.0:
                continue
            # The highest limb this block needs: its values stay below 2^39 of its units.
            k = 0
            while peak > math.ldexp(1.0, BASE_EXP + LIMB_BITS * k + LIMB_BITS - 1):
                k += 1
            while k >= 0:
                u = _unit(k)
                limb = self._limb(name, k)[lo:hi]
                if k == 0:
                    # The one rounding: to the nearest multiple of 2^BASE_EXP.
                    np.add(v, _MAGIC * u, out=t)
                    t -= _MAGIC * u
                    limb += t
                    break
                np.multiply(v, 1.0 / u, out=t)  # exact: a power-of-two scaling
                np.trunc(t, out=t)  # toward zero, so what is left is v's own low bits
                t *= u
                v -= t  # exact: the low part of v, now |v| < u
                limb += t
                if not v.any():
                    break
                k -= 1

    def _renormalise(self) -> None:
        """Carry each limb's excess to the next one up, exactly; afterwards every limb but the
        top lies in [-u_{k+1}/2, u_{k+1}/2): one canonical form for each exact sum."""
        for limbs in self.limbs.values():
            _carry(limbs)
            top = limbs[-1]
            if top is not None and np.abs(top).max(initial=0.0) >= math.ldexp(
                    1.0, BASE_EXP + LIMB_BITS * len(limbs)):
                limbs.append(None)  # room for the top's carry
                _carry(limbs)
        self._pending = 0

    def merge(self, other: Accumulator) -> None:
        """Add everything `other` holds (an accumulator of other items of the same shapes)."""
        if not other.weights:
            return
        if not self.shapes:
            self.shapes = dict(other.shapes)
        elif sorted(other.shapes) != sorted(self.shapes) or any(
                other.shapes[n] != self.shapes[n] for n in self.shapes):
            raise ValueError(f"cannot merge sums of {other.shapes} into sums of {self.shapes}")
        self._renormalise()
        other._renormalise()
        for name, limbs in other.limbs.items():
            for k, limb in enumerate(limbs):
                if limb is not None:
                    self._limb(name, k)[:] += limb
        for name, sp in other.special.items():
            mine = self.special.get(name)
            if mine is None:
                self.special[name] = sp.copy()
            else:
                mine += sp
        self.weights.extend(other.weights)
        self._pending = 1
        self._renormalise()

    def pack(self) -> dict[str, Any]:
        """Everything this accumulator holds, exactly, in a form small enough to send (a
        shard's partial sum): per tensor the float64 nearest its exact sums (`hi`, what `total`
        reads) and, only where that float64 is not the exact sum, the exact remainder as limbs
        at those positions; inf/nan sums at theirs. `merge_packed` adds it to an accumulator."""
        self._renormalise()
        tensors: dict[str, dict[str, Any]] = {}
        for name, shape in sorted(self.shapes.items()):
            limbs = self.limbs.get(name, [])
            hi = np.zeros(math.prod(shape))
            for limb in reversed(limbs):
                if limb is not None:
                    hi += limb
            entry: dict[str, Any] = {}
            if not limbs:  # nothing but zeros (or inf/nan) added
                entry["hi"] = hi
            elif np.isfinite(hi).all():
                entry["hi"] = hi
                # The remainder S - hi, exactly, in canonical limbs (zero where hi is exact).
                rest = Accumulator()
                rest.shapes = {name: shape}
                rest.limbs[name] = [None if x is None else x.copy() for x in limbs]
                rest._add_product(name, hi, -1.0)  # exact: hi is a multiple of 2^BASE_EXP
                rest._renormalise()
                parts = [(k, x) for k, x in enumerate(rest.limbs[name]) if x is not None]
                where = np.zeros(hi.size, bool)
                for _, x in parts:
                    where |= x != 0.0
                idx = np.flatnonzero(where)
                if idx.size:
                    entry["idx"] = idx.astype(np.int64)
                    entry["rest"] = {k: x[idx] for k, x in parts if x[idx].any()}
            else:  # sums beyond float64's range: the limbs themselves
                entry["limbs"] = {k: x for k, x in enumerate(limbs) if x is not None}
            sp = self.special.get(name)
            if sp is not None:
                at = np.flatnonzero(sp != 0.0)  # nan != 0 too
                entry["sidx"], entry["sval"] = at.astype(np.int64), sp[at]
            tensors[name] = entry
        return {"weights": list(self.weights),
                "shapes": {n: list(sh) for n, sh in sorted(self.shapes.items())},
                "tensors": tensors}

    def merge_packed(self, packed: Mapping[str, Any]) -> None:
        """Add what `pack` gave (of another accumulator): the same as `merge` with that one."""
        weights = [float(w) for w in packed["weights"]]
        if not weights:
            return
        shapes = {n: tuple(int(d) for d in sh) for n, sh in packed["shapes"].items()}
        if not self.shapes:
            self.shapes = dict(shapes)
        elif sorted(shapes) != sorted(self.shapes) or any(
                shapes[n] != self.shapes[n] for n in self.shapes):
            raise ValueError(f"cannot merge sums of {shapes} into sums of {self.shapes}")
        self._renormalise()
        for name in sorted(shapes):
            entry = packed["tensors"][name]
            size = math.prod(shapes[name])
            if "hi" in entry:
                hi = np.asarray(entry["hi"], np.float64).ravel()
                if hi.size != size:
                    raise ValueError(f"packed tensor {name!r} has {hi.size} sums, not {size}")
                self._add_product(name, hi, 1.0)  # exact (see pack)
                idx = np.asarray(entry.get("idx", ()), np.int64)
                for k, vals in entry.get("rest", {}).items():
                    self._limb(name, int(k))[idx] += vals
            for k, limb in entry.get("limbs", {}).items():
                self._limb(name, int(k))[:] += np.asarray(limb).ravel()
            if "sidx" in entry:
                sp = self.special.get(name)
                if sp is None:
                    sp = self.special[name] = np.zeros(size)
                with np.errstate(invalid="ignore"):
                    sp[np.asarray(entry["sidx"], np.int64)] += entry["sval"]
        self.weights.extend(weights)
        self._pending = 1
        self._renormalise()

    def nbytes(self) -> int:
        """Bytes of the sums held (limbs and inf/nan sums), the accumulator's memory."""
        return sum(x.nbytes for limbs in self.limbs.values() for x in limbs if x is not None) \
            + sum(x.nbytes for x in self.special.values())

    def total(self) -> dict[str, np.ndarray]:
        """The exact sums rounded to float64 (a function of the exact sums alone)."""
        self._renormalise()
        out: dict[str, np.ndarray] = {}
        for name, shape in self.shapes.items():
            limbs = self.limbs.get(name, [])
            acc = np.zeros(math.prod(shape))
            for limb in reversed(limbs):
                if limb is not None:
                    acc += limb
            sp = self.special.get(name)
            if sp is not None:
                acc = np.where(sp != 0.0, sp, acc)  # inf or nan wherever one was added
            out[name] = acc.reshape(shape)
        return out


def split(packed: Mapping[str, Any], elements: int) -> list[dict[str, Any]]:
    """Cut a `pack` into pieces of at most `elements` sums each (slices of the tensors in name
    order; the weights go with the first): `Running.merge_packed` of every piece, in any
    order, adds what `merge_packed` of the whole adds."""
    if elements < 1:
        raise ValueError(f"pieces need at least 1 element, got {elements}")
    pieces: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    room = elements
    for name, sh in sorted(packed["shapes"].items()):
        entry = packed["tensors"][name]
        size = math.prod(sh)
        off = 0
        while off < size or (size == 0 and off == 0):
            take = min(room, size - off)
            end = off + take
            part: dict[str, Any] = {"lo": off}
            if "hi" in entry:
                part["hi"] = np.asarray(entry["hi"]).ravel()[off:end]
            if "limbs" in entry:
                part["limbs"] = {k: np.asarray(x).ravel()[off:end]
                                 for k, x in entry["limbs"].items()}
            for at, vals in (("idx", "rest"), ("sidx", "sval")):
                if at in entry:
                    idx = np.asarray(entry[at], np.int64)
                    keep = (idx >= off) & (idx < end)
                    if keep.any():
                        part[at] = idx[keep]
                        v = entry[vals]
                        part[vals] = ({k: np.asarray(x)[keep] for k, x in v.items()}
                                      if isinstance(v, Mapping) else np.asarray(v)[keep])
            cur[name] = part
            room -= take
            off = end
            if room == 0 or size == 0:
                if room == 0:
                    pieces.append(cur)
                    cur, room = {}, elements
                if size == 0:
                    break
    if cur or not pieces:
        pieces.append(cur)
    shapes = {n: list(sh) for n, sh in packed["shapes"].items()}
    return [{"weights": list(packed["weights"]) if i == 0 else [], "shapes": shapes,
             "tensors": t} for i, t in enumerate(pieces)]


_TINY = math.ldexp(1.0, BASE_EXP + 53)  # below this a float64 may have bits under 2^BASE_EXP


class Running(_Sums):
    """The same exact sums as `Accumulator` (the same total and mean, bit for bit) in about
    half the memory, for a server that sums replies as they arrive: one float64 per element
    (`hi`) and, only at the elements where a float64 addition was not exact, the exact
    remainder (an `Accumulator` over those positions alone).

    Each product is added to `hi` with an error-free transformation (Knuth's TwoSum: s = hi + v
    rounded, and the rounding error e = hi + v - s exactly); wherever e is not zero it goes
    into the remainder, so hi + remainder is always the exact sum. Read-out: where there is no
    remainder, hi *is* the exact sum, and `Accumulator`'s canonical read-out of an exact sum
    that fits a float64 is that float64 (each partial sum from the top limb down is the sum
    rounded to a multiple of a limb unit at least its own ulp, so exact); elsewhere it is
    `Accumulator`'s read-out of hi + remainder. The sums of model replies of one round mostly
    fit a float64 (products of float32s and sample counts of similar size), so the remainder
    is usually empty; its worst case is `Accumulator`'s memory plus hi.
    """

    def __init__(self) -> None:
        self.hi: dict[str, np.ndarray] = {}
        self.special: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.weights: list[float] = []
        # Per tensor: sorted positions with a remainder, and the remainder there (tensor "r").
        self.where: dict[str, np.ndarray] = {}
        self.rest: dict[str, Accumulator] = {}

    def __len__(self) -> int:
        return len(self.weights)

    def _shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if not self.shapes:
            self.shapes = {n: tuple(shapes[n]) for n in sorted(shapes)}
        elif sorted(shapes) != sorted(self.shapes) or any(
                tuple(shapes[n]) != self.shapes[n] for n in self.shapes):
            raise ValueError(f"item has tensors {dict(shapes)}; the first had {self.shapes}")

    def add(self, weight: float, tensors: Mapping[str, np.ndarray]) -> None:
        """Add `weight` * tensors (weight finite; tensors cast to float32 if they are not)."""
        w = float(weight)
        if not math.isfinite(w):
            raise ValueError(f"weight {weight!r} is not finite")
        arrays = {n: np.asarray(tensors[n]) for n in sorted(tensors)}
        self._shapes({n: a.shape for n, a in arrays.items()})
        parts = _split_weight(w) if w != 0.0 else ()
        for name, x in arrays.items():
            if x.dtype != np.float32:
                x = x.astype(np.float32)
            for p in parts:
                self._add(name, x.ravel(), p)
        self.weights.append(w)

    def _add(self, name: str, x: np.ndarray, p: float, at: int = 0) -> None:
        """hi[at:at + x.size] += x * p exactly (the rounding errors to the remainder); x
        float32 or float64 whose products with p are exact float64s."""
        full = math.prod(self.shapes[name])
        if not 0 <= at <= full - x.size:
            raise ValueError(f"sums {at}..{at + x.size} of tensor {name!r} of {full}")
        hi = self.hi.get(name)
        if hi is None:
            hi = self.hi[name] = np.zeros(full)
        hi = hi[at:at + x.size]
        size = x.size
        n = min(size, BLOCK)
        v, s, t, e = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
        # A float32 (lowest bit >= 2^-149) times a multiple of 2^-31 (any integer, say) has no
        # bits below 2^BASE_EXP, nor has a float64 sum read from a pack: nothing to round.
        fine = x.dtype != np.float32 or p == math.ldexp(math.floor(math.ldexp(p, 31)), -31)
        for lo in range(0, size, BLOCK):
            up = min(lo + BLOCK, size)
            m = up - lo
            vv, ss, tt, ee, h = v[:m], s[:m], t[:m], e[:m], hi[lo:up]
            np.multiply(x[lo:up], p, out=vv, dtype=np.float64)
            finite = np.isfinite(vv)
            if not finite.all():
                sp = self.special.get(name)
                if sp is None:
                    sp = self.special[name] = np.zeros(full)
                with np.errstate(invalid="ignore"):
                    sp[at + lo:at + up] += np.where(finite, 0.0, vv)
                vv[~finite] = 0.0
            if not fine:
                small = (vv != 0.0) & (np.abs(vv) < _TINY)
                if small.any():  # Accumulator's one rounding: to a multiple of 2^BASE_EXP
                    u = _unit(0)
                    vv[small] = (vv[small] + _MAGIC * u) - _MAGIC * u
            np.add(h, vv, out=ss)
            np.subtract(ss, h, out=tt)  # TwoSum: bb = s - h
            np.subtract(ss, tt, out=ee)  # s - bb
            np.subtract(h, ee, out=ee)  # h - (s - bb)
            np.subtract(vv, tt, out=tt)  # v - bb
            ee += tt  # the exact error
            over = ~np.isfinite(ss)
            if over.any():  # beyond float64's range: that product goes to the remainder whole
                ss[over] = h[over]
                ee[over] = vv[over]
            h[:] = ss
            nz = np.flatnonzero(ee)
            if nz.size:
                self._add_rest(name, nz + (lo + at), ee[nz])

    def _add_rest(self, name: str, idx: np.ndarray, vals: np.ndarray) -> None:
        """Add exact float64 `vals` at flat positions `idx` (sorted, distinct) to the
        remainder, growing its set of positions where needed."""
        where = self.where.get(name)
        rest = self.rest.get(name)
        if where is None or rest is None:
            where, rest = self.where[name], self.rest[name] = idx.copy(), Accumulator()
            rest.shapes = {"r": (idx.size,)}
        elif not np.isin(idx, where, assume_unique=True).all():
            grown = np.union1d(where, idx)
            at = np.searchsorted(grown, where)
            bigger = Accumulator()
            bigger.shapes = {"r": (grown.size,)}
            bigger._pending = rest._pending
            for k, limb in enumerate(rest.limbs.get("r", [])):
                if limb is not None:
                    bigger._limb("r", k)[at] = limb
            where, rest = self.where[name], self.rest[name] = grown, bigger
        full = np.zeros(where.size)
        full[np.searchsorted(where, idx)] = vals
        rest._add_product("r", full, 1.0)  # exact: vals are multiples of 2^BASE_EXP
        rest._pending += 1
        if rest._pending >= RENORM_EVERY:
            rest._renormalise()

    def merge(self, other: Running) -> None:
        """Add everything `other` holds (a Running sum of other items of the same shapes)."""
        self.merge_packed(other.pack())

    def pack(self) -> dict[str, Any]:
        """As `Accumulator.pack`: hi, and the exact remainder where there is one."""
        tensors: dict[str, dict[str, Any]] = {}
        for name, shape in self.shapes.items():
            hi = self.hi.get(name)
            entry: dict[str, Any] = {"hi": hi if hi is not None else np.zeros(math.prod(shape))}
            rest = self.rest.get(name)
            if rest is not None:
                rest._renormalise()
                limbs = rest.limbs.get("r", [])
                keep = np.zeros(self.where[name].size, bool)
                for x in limbs:
                    if x is not None:
                        keep |= x != 0.0
                if keep.any():
                    entry["idx"] = self.where[name][keep]
                    entry["rest"] = {k: x[keep] for k, x in enumerate(limbs)
                                     if x is not None and x[keep].any()}
            sp = self.special.get(name)
            if sp is not None:
                at = np.flatnonzero(sp != 0.0)
                entry["sidx"], entry["sval"] = at.astype(np.int64), sp[at]
            tensors[name] = entry
        return {"weights": list(self.weights),
                "shapes": {n: list(sh) for n, sh in sorted(self.shapes.items())},
                "tensors": tensors}

    def merge_packed(self, packed: Mapping[str, Any]) -> None:
        """Add what a `pack` gave (of an Accumulator or a Running sum), or one of the pieces
        `split` cut it into (merging every piece once adds the whole)."""
        weights = [float(w) for w in packed["weights"]]
        if not weights and not packed["tensors"]:
            return
        shapes = {n: tuple(int(d) for d in sh) for n, sh in packed["shapes"].items()}
        self._shapes(shapes)
        for name in sorted(packed["tensors"]):
            entry = packed["tensors"][name]
            size = math.prod(shapes[name])
            at = int(entry.get("lo", 0))
            vecs = [np.asarray(entry["hi"], np.float64).ravel()] if "hi" in entry else []
            vecs += [np.asarray(x, np.float64).ravel() for _, x in
                     sorted(entry.get("limbs", {}).items())]
            for vec in vecs:
                self._add(name, vec, 1.0, at)
            if entry.get("rest"):
                idx = np.asarray(entry["idx"], np.int64)
                order = np.argsort(idx, kind="stable")
                for _, vals in sorted(entry["rest"].items()):
                    self._add_rest(name, idx[order], np.asarray(vals, np.float64)[order])
            if "sidx" in entry:
                sp = self.special.get(name)
                if sp is None:
                    sp = self.special[name] = np.zeros(size)
                with np.errstate(invalid="ignore"):
                    sp[np.asarray(entry["sidx"], np.int64)] += entry["sval"]
        self.weights.extend(weights)

    def state(self) -> dict[str, Any]:
        """Plain data for checkpoints (kernel.run.state): the packed sum."""
        return self.pack()

    def load_state(self, data: Mapping[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.merge_packed(data)

    def nbytes(self) -> int:
        """Bytes of the sums held: hi, the remainder and its positions, inf/nan sums."""
        return (sum(x.nbytes for x in self.hi.values())
                + sum(x.nbytes for x in self.special.values())
                + sum(x.nbytes for x in self.where.values())
                + sum(r.nbytes() for r in self.rest.values()))

    def total(self) -> dict[str, np.ndarray]:
        """The exact sums rounded as `Accumulator.total` rounds them (the same bits)."""
        out: dict[str, np.ndarray] = {}
        for name, shape in self.shapes.items():
            hi = self.hi.get(name)
            acc = np.zeros(math.prod(shape)) if hi is None else hi.copy()
            rest = self.rest.get(name)
            if rest is not None:
                where = self.where[name]
                exact = Accumulator()
                exact.shapes = {"r": (where.size,)}
                exact._add_product("r", acc[where], 1.0)
                rest._renormalise()
                for k, limb in enumerate(rest.limbs.get("r", [])):
                    if limb is not None:
                        exact._limb("r", k)[:] += limb
                exact._pending = 1
                acc[where] = exact.total()["r"]
            sp = self.special.get(name)
            if sp is not None:
                acc = np.where(sp != 0.0, sp, acc)
            out[name] = acc.reshape(shape)
        return out

