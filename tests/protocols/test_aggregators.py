"""Aggregators: what each computes, what it tolerates, and that input order does not matter."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel import registry
from protocols import aggregators as agg
from protocols import exactsum


def _items(seed: int, n: int, shape: tuple[int, ...] = (3, 4), weights: bool = True):
    rng = np.random.default_rng(seed)
    return [
        (float(rng.integers(1, 100)) if weights else 1.0,
         {"b": rng.standard_normal(shape[-1]).astype(np.float32),
          "w": rng.standard_normal(shape).astype(np.float32)})
        for _ in range(n)
    ]


def _readonly(items):
    for _, t in items:
        for a in t.values():
            a.flags.writeable = False
    return items


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12))
def test_weighted_mean_equals_np_average(seed, n):
    items = _readonly(_items(seed, n))
    out = agg.weighted_mean(items)
    w = [wt for wt, _ in items]
    for name in ("b", "w"):
        expect = np.average(np.stack([t[name] for _, t in items]), axis=0, weights=w)
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], expect, rtol=1e-6, atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), scale=st.floats(1e-3, 1e6))
def test_weighted_mean_normalises_weights(seed, n, scale):
    # Weights sum to one after normalising: scaling all weights changes nothing, and the
    # weighted mean of n copies of one vector is that vector.
    items = _items(seed, n)
    scaled = [(w * scale, t) for w, t in items]
    a, b = agg.weighted_mean(items), agg.weighted_mean(scaled)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-6)
    same = [(w, items[0][1]) for w, _ in items]
    for name, value in agg.weighted_mean(same).items():
        np.testing.assert_allclose(value, items[0][1][name], rtol=1e-6, atol=1e-7)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10))
def test_mean_ignores_weights(seed, n):
    items = _items(seed, n)
    equal = [(1.0, t) for _, t in items]
    out, ref = agg.mean(items), agg.weighted_mean(equal)
    for name in out:
        np.testing.assert_array_equal(out[name], ref[name])


def _honest_and_outliers(seed, honest, f, magnitude):
    rng = np.random.default_rng(seed)
    good = [(1.0, {"v": rng.uniform(-1, 1, 6).astype(np.float32)}) for _ in range(honest)]
    bad = [(1.0, {"v": (rng.choice([-1, 1], 6) * magnitude * rng.uniform(0, 1, 6))
                  .astype(np.float32)}) for _ in range(f)]
    mixed = good + bad
    order = rng.permutation(len(mixed))
    return [mixed[i] for i in order], np.stack([t["v"] for _, t in good])


@given(seed=st.integers(0, 2**32 - 1), f=st.integers(0, 4), extra=st.integers(1, 4),
       magnitude=st.floats(0, 1e30))
def test_median_and_trimmed_mean_stay_within_honest_range(seed, f, extra, magnitude):
    # Up to f arbitrary items among n > 2f cannot drag the result outside the honest values.
    items, good = _honest_and_outliers(seed, f + extra, f, magnitude)
    lo, hi = good.min(axis=0), good.max(axis=0)
    for out in (agg.median(items)["v"], agg.trimmed_mean(items, f=f)["v"]):
        assert (out >= lo).all() and (out <= hi).all(), (out, lo, hi)


@given(seed=st.integers(0, 2**32 - 1), f=st.integers(0, 3), extra=st.integers(0, 3),
       sign=st.sampled_from([-1.0, 1.0]), spread=st.floats(0, 1e6))
def test_krum_picks_an_honest_vector(seed, f, extra, sign, spread):
    # n >= 2f + 3 (f < (n-2)/2); honest vectors lie in [-1, 1]^d, Byzantine ones at least
    # 2 sqrt(n) + 1 away in every coordinate, which is enough for Krum's scores to separate.
    n = 2 * f + 3 + extra
    rng = np.random.default_rng(seed)
    d = 5
    good = [rng.uniform(-1, 1, d).astype(np.float32) for _ in range(n - f)]
    gap = 2 * math.sqrt(n) + 2
    bad = [(sign * (gap + rng.uniform(0, spread, d))).astype(np.float32) for _ in range(f)]
    vecs = good + bad
    order = rng.permutation(n)
    items = [(1.0, {"v": vecs[i]}) for i in order]
    picked = agg.krum(items, f=f)["v"]
    assert any(np.array_equal(picked, g) for g in good)
    chosen = agg.multi_krum(items, f=f)["v"]
    np.testing.assert_allclose(chosen, np.mean(np.stack(good), axis=0), rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 9), perm_seed=st.integers(0, 1000))
def test_order_invariance(seed, n, perm_seed):
    # Distinct random inputs (no ties): the robust aggregators give bit-identical results for
    # any input order; the means differ at most by float64 summation order.
    items = _items(seed, n)
    perm = np.random.default_rng(perm_seed).permutation(n)
    shuffled = [items[i] for i in perm]
    for fn in (agg.median, agg.trimmed_mean,
               lambda it: agg.krum(it, f=1), lambda it: agg.multi_krum(it, f=1, m=3)):
        a, b = fn(items), fn(shuffled)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    for fn in (agg.mean, agg.weighted_mean):
        a, b = fn(items), fn(shuffled)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_krum_ties_go_to_the_earliest_item():
    # 0, 1, 2 on a line with f = 0: every score is 1, so the first item wins.
    vecs = [np.array([x], np.float32) for x in (0.0, 1.0, 2.0)]
    assert agg.krum([(1.0, {"v": v}) for v in vecs])["v"][0] == 0.0
    assert agg.krum([(1.0, {"v": v}) for v in vecs[::-1]])["v"][0] == 2.0


def test_outputs_are_fresh_float32_and_inputs_untouched():
    items = _readonly(_items(3, 5))
    before = [{k: v.copy() for k, v in t.items()} for _, t in items]
    for fn in (agg.mean, agg.weighted_mean, agg.median, agg.trimmed_mean, agg.krum,
               agg.multi_krum):
        out = fn(items)
        assert sorted(out) == ["b", "w"]
        for name, value in out.items():
            assert value.dtype == np.float32 and value.flags.writeable
            assert all(value is not t[name] for _, t in items)
    for (_, t), b in zip(items, before):
        for k in t:
            np.testing.assert_array_equal(t[k], b[k])


def test_bad_inputs_say_what_is_wrong():
    items = _items(0, 4)
    with pytest.raises(ValueError, match="no items"):
        agg.mean([])
    with pytest.raises(ValueError, match="item 1 has tensors"):
        agg.mean([items[0], (1.0, {"w": items[1][1]["w"]})])
    with pytest.raises(ValueError, match="f = 1 with 4 items"):
        agg.krum(items, f=1)
    with pytest.raises(ValueError, match="need 0 <= 2f < n"):
        agg.trimmed_mean(items, f=2)
    with pytest.raises(ValueError, match="weights must be"):
        agg.weighted_mean([(0.0, t) for _, t in items])
    with pytest.raises(ValueError, match="m = 9"):
        agg.multi_krum(items, m=9)


def test_registered_by_name():
    for name in ("mean", "weighted_mean", "median", "trimmed_mean", "krum", "multi_krum"):
        assert registry.load("aggregators", name) is getattr(agg, name)


def test_weighted_mean_of_tensors_spanning_several_blocks():
    rng = np.random.default_rng(1)
    n = exactsum.BLOCK * 2 + 3
    items = [(float(w), {"x": rng.standard_normal(n).astype(np.float32).reshape(-1, 1)})
             for w in (1, 5, 2)]
    expect = np.average(np.stack([t["x"] for _, t in items]), axis=0, weights=[1, 5, 2])
    out = agg.weighted_mean(items)["x"]
    assert out.shape == (n, 1)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-7)
