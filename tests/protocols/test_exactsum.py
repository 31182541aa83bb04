"""Exact weighted sums: the same bits for any order and grouping of the same items, and within
1 float32 ulp of the exact mean (checked against rational arithmetic)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import aggregators as agg
from protocols import exactsum
from protocols.exactsum import Accumulator

DIM = 5
f32 = st.floats(-2.0**20, 2.0**20, width=32, allow_subnormal=True)
tiny = st.floats(-(2.0**-100), 2.0**-100, width=32, allow_subnormal=True)
weights = st.one_of(st.integers(0, 10_000).map(float), st.floats(1e-3, 1e4))


@st.composite
def items(draw: st.DrawFn, max_n: int = 9) -> list[tuple[float, dict[str, np.ndarray]]]:
    n = draw(st.integers(1, max_n))
    out = []
    for _ in range(n):
        vals = draw(st.lists(st.one_of(f32, tiny), min_size=DIM, max_size=DIM))
        out.append((draw(weights), {"a": np.array(vals, np.float32),
                                    "b": np.array(vals[::-1], np.float32).reshape(1, DIM)}))
    if sum(w for w, _ in out) == 0:
        out[0] = (1.0, out[0][1])
    return out


def _bits(t: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v).tobytes() for k, v in t.items()}


@settings(max_examples=60, deadline=None)
@given(items(), st.data())
def test_any_order_and_grouping_gives_the_same_bits(its, data) -> None:
    whole = Accumulator()
    for w, t in its:
        whole.add(w, t)
    order = data.draw(st.permutations(range(len(its))))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(its)), max_size=3)))
    groups = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(its)])]
    parts = []
    for g in groups:
        acc = Accumulator()
        for i in g:
            acc.add(*its[i])
        parts.append(acc)
    merged = Accumulator()
    for p in data.draw(st.permutations(parts)):
        merged.merge(p)
    assert _bits(merged.total()) == _bits(whole.total())
    assert _bits(merged.mean()) == _bits(whole.mean())
    assert _bits(agg.weighted_mean([its[i] for i in order])) == _bits(agg.weighted_mean(its))
    assert _bits(agg.mean([its[i] for i in order])) == _bits(agg.mean(its))


def _ulp32(x: float) -> float:
    x = abs(x)
    return float(np.spacing(np.float32(min(x, 3.0e38))))


@settings(max_examples=60, deadline=None)
@given(items())
def test_within_one_float32_ulp_of_the_exact_mean(its) -> None:
    out = agg.weighted_mean(its)
    n = len(its)
    wsum = sum(Fraction(w) for w, _ in its)
    for name in ("a", "b"):
        xs = [t[name].ravel() for _, t in its]
        seq = np.zeros(DIM)  # the float64 sequential mean, in input order
        for (w, _), x in zip(its, xs):
            seq += np.float64(w) * x.astype(np.float64)
        seq /= math.fsum(w for w, _ in its)
        for j in range(DIM):
            s = sum(Fraction(w) * Fraction(float(x[j])) for (w, _), x in zip(its, xs))
            exact = float(s / wsum)
            got = float(out[name].ravel()[j])
            if abs(s) >= n * Fraction(2) ** -155:
                assert abs(got - exact) <= _ulp32(exact), (got, exact)
            else:
                assert abs(Fraction(got) - s / wsum) <= 2 * n * Fraction(2) ** -181 / wsum \
                    + Fraction(_ulp32(exact))
            # The float64 sequential mean errs by at most n float64 ulps of the sum of |terms|
            # (over the weight sum): within that plus 1 float32 ulp of ours.
            mag = sum(abs(Fraction(w) * Fraction(float(x[j]))) for (w, _), x in zip(its, xs))
            slack = float(4 * n * mag / wsum) * 2.0**-52
            assert abs(got - float(seq[j])) <= _ulp32(exact) + slack


@settings(max_examples=25, deadline=None)
@given(items(max_n=6))
def test_carries_do_not_change_the_result(its) -> None:
    plain = Accumulator()
    for w, t in its:
        plain.add(w, t)
    expect = _bits(plain.total())
    old = exactsum.RENORM_EVERY
    exactsum.RENORM_EVERY = 1  # carry after every item
    try:
        eager = Accumulator()
        for w, t in its:
            eager.add(w, t)
    finally:
        exactsum.RENORM_EVERY = old
    assert _bits(eager.total()) == expect


def test_many_items_big_values_and_specials() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(40).astype(np.float32) * 1e30 for _ in range(3 * 4096 + 5)]
    acc = Accumulator()
    for x in xs:
        acc.add(7.0, {"x": x})
    back = Accumulator()
    for x in reversed(xs):
        back.add(7.0, {"x": x})
    assert _bits(acc.total()) == _bits(back.total())
    exact = [sum(Fraction(float(x[j])) for x in xs) * 7 for j in range(40)]
    np.testing.assert_allclose(acc.total()["x"], [float(e) for e in exact], rtol=1e-15)
    # inf and nan win where present, whatever the order.
    a = np.array([np.inf, 1.0, np.nan, -np.inf], np.float32)
    b = np.array([-np.inf, 2.0, 1.0, -np.inf], np.float32)
    one, two = Accumulator(), Accumulator()
    one.add(1.0, {"x": a}), one.add(1.0, {"x": b})
    two.add(1.0, {"x": b}), two.add(1.0, {"x": a})
    got = one.total()["x"]
    assert _bits(one.total()) == _bits(two.total())
    assert np.isnan(got[0]) and got[1] == 3.0 and np.isnan(got[2]) and got[3] == -np.inf


def test_bad_input_is_named() -> None:
    acc = Accumulator()
    acc.add(1.0, {"x": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        acc.add(1.0, {"x": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="tensors"):
        acc.add(1.0, {"y": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="not finite"):
        acc.add(float("nan"), {"x": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="no items"):
        Accumulator().mean()


special = st.sampled_from([math.inf, -math.inf, math.nan])


@settings(max_examples=60, deadline=None)
@given(items(), st.data())
def test_packed_partials_merge_to_the_same_bits(its, data) -> None:
    """A group's sum sent as `pack()` (float64 nearest plus the exact remainder where that is
    not exact) and merged with `merge_packed` is the same as merging the accumulator itself:
    the same total and mean, bit for bit, for any grouping; inf and nan included."""
    if data.draw(st.booleans()):
        w, t = its[0]
        t["a"][data.draw(st.integers(0, DIM - 1))] = data.draw(special)
    whole = Accumulator()
    for w, t in its:
        whole.add(w, t)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(its)), max_size=3)))
    merged = Accumulator()
    for a, b in zip([0, *cuts], [*cuts, len(its)]):
        part = Accumulator()
        for w, t in its[a:b]:
            part.add(w, t)
        merged.merge_packed(part.pack())
    assert _bits(merged.total()) == _bits(whole.total())
    assert merged.weights == whole.weights
    if whole.weight() > 0:
        assert _bits(merged.mean()) == _bits(whole.mean())


def test_a_pack_sends_a_remainder_only_where_the_float64_is_not_exact() -> None:
    acc = Accumulator()
    # Integer weights times float32s of nearby magnitude: the exact sums fit a float64.
    for w in (3, 5, 7):
        acc.add(float(w), {"x": np.array([0.25, 1.5, -3.0], np.float32)})
    packed = acc.pack()
    assert "idx" not in packed["tensors"]["x"]
    assert packed["tensors"]["x"]["hi"].tolist() == [3.75, 22.5, -45.0]
    # 1 + 2^-60 needs 61 bits: the float64 is 1, the remainder 2^-60 goes along exactly.
    acc.add(1.0, {"x": np.array([2.0**-60, 0.0, 0.0], np.float32)})
    acc.add(1.0, {"x": np.array([1.0, 0.0, 0.0], np.float32)})
    packed = acc.pack()
    assert packed["tensors"]["x"]["idx"].tolist() == [0]
    back = Accumulator()
    back.merge_packed(packed)
    assert _bits(back.total()) == _bits(acc.total())
    assert packed["tensors"]["x"]["hi"][0] == 4.75
    assert sum(v[0] for v in packed["tensors"]["x"]["rest"].values()) == 2.0**-60


@settings(max_examples=80, deadline=None)
@given(items(), st.data())
def test_running_sums_give_the_accumulators_bits(its, data) -> None:
    """`Running` (one float64 per element, an exact remainder only where needed) reads out the
    same bits as `Accumulator` for the same items, added one by one in any order, merged in
    groups or packed; inf and nan included."""
    if data.draw(st.booleans()):
        w, t = its[0]
        t["b"][0, data.draw(st.integers(0, DIM - 1))] = data.draw(special)
    whole = Accumulator()
    for w, t in its:
        whole.add(w, t)
    order = data.draw(st.permutations(range(len(its))))
    run = exactsum.Running()
    cut = data.draw(st.integers(0, len(its)))
    for i in order[:cut]:
        run.add(*its[i])
    other = exactsum.Running() if data.draw(st.booleans()) else Accumulator()
    for i in order[cut:]:
        other.add(*its[i])
    if other.weights:
        run.merge_packed(other.pack())
    assert _bits(run.total()) == _bits(whole.total())
    if whole.weight() > 0:
        assert _bits(run.mean()) == _bits(whole.mean())
    again = exactsum.Running()
    again.load_state(run.state())
    assert _bits(again.total()) == _bits(whole.total())


def test_running_sum_of_model_like_replies_holds_one_float64_per_element() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.05, 10_000).astype(np.float32)
    run, acc = exactsum.Running(), Accumulator()
    for _ in range(50):
        t = {"w": (base + rng.normal(0, 1e-3, base.size)).astype(np.float32)}
        n = float(rng.integers(100, 600))
        run.add(n, t)
        acc.add(n, t)
    assert _bits(run.mean()) == _bits(acc.mean())
    assert run.nbytes() < 1.1 * base.size * 8 < acc.nbytes()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 3.0),
                          st.lists(st.integers(-(2**20), 2**20), min_size=4, max_size=4),
                          st.integers(0, 12)), min_size=1, max_size=4))
def test_running_sum_rounds_the_tiniest_products_as_the_accumulator_does(raw) -> None:
    """Fractional weights times float32s near the bottom of the subnormal range have bits
    below 2^-180, the accumulator's finest unit: both round them alike (the same bits)."""
    run, acc = exactsum.Running(), Accumulator()
    for w, ints, shift in raw:
        x = {"x": (np.array(ints, np.float64) * 2.0 ** (shift - 149)).astype(np.float32)}
        run.add(w, x)
        acc.add(w, x)
    assert _bits(run.total()) == _bits(acc.total())


@settings(max_examples=60, deadline=None)
@given(items(), st.integers(1, 2 * DIM + 1), st.data())
def test_a_pack_cut_into_pieces_merges_to_the_same_bits(its, elements, data) -> None:
    """`split` cuts a pack into pieces of at most `elements` sums; merging every piece, in any
    order, into a Running sum gives the bits of merging the whole (inf and nan included)."""
    if data.draw(st.booleans()):
        its[0][1]["a"][data.draw(st.integers(0, DIM - 1))] = data.draw(special)
    whole = Accumulator()
    for w, t in its:
        whole.add(w, t)
    pieces = exactsum.split(whole.pack(), elements)
    assert all(sum(len(np.ravel(e.get("hi", ()))) for e in p["tensors"].values()) <= elements
               for p in pieces)
    run = exactsum.Running()
    for p in data.draw(st.permutations(pieces)):
        run.merge_packed(p)
    assert _bits(run.total()) == _bits(whole.total())
    assert run.weights == whole.weights
