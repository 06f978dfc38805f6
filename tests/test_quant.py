from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.quant import (
    Rounding,
    as_fraction,
    f32_error_bounds,
    f32_round,
    f32_thresholds,
    multiply_round,
    round_div,
    round_fraction,
    threshold,
)


def reference(x: Fraction, mode: Rounding) -> int:
    """Independent definition of each rounding mode on one rational."""
    import math

    if mode is Rounding.FLOOR:
        return math.floor(x)
    if mode is Rounding.HALF_UP:
        return math.floor(x + Fraction(1, 2))
    if mode is Rounding.HALF_AWAY:
        mag = math.floor(abs(x) + Fraction(1, 2))
        return mag if x >= 0 else -mag
    return round(x)  # Python rounds Fractions half to even


@given(st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=30), st.integers(1, 5000),
       st.sampled_from(list(Rounding)))
@settings(max_examples=300, deadline=None)
def test_round_div_matches_reference(ns, q, mode):
    got = round_div(np.array(ns, dtype=np.int64), np.int64(q), mode)
    assert got.tolist() == [reference(Fraction(n, q), mode) for n in ns]
    got_obj = round_div(np.array(ns, dtype=object), np.array(q, dtype=object), mode)
    assert [int(v) for v in got_obj] == got.tolist()


def test_ties_each_mode():
    n = np.array([-5, -3, -1, 1, 3, 5])  # n / 2 are all ties
    assert round_div(n, 2, "half_up").tolist() == [-2, -1, 0, 1, 2, 3]
    assert round_div(n, 2, "half_away").tolist() == [-3, -2, -1, 1, 2, 3]
    assert round_div(n, 2, "half_even").tolist() == [-2, -2, 0, 0, 2, 2]
    assert round_div(n, 2, "floor").tolist() == [-3, -2, -1, 0, 1, 2]


@given(st.lists(st.integers(-2**40, 2**40), min_size=1, max_size=20), st.integers(1, 2**60),
       st.integers(1, 2**60), st.sampled_from(list(Rounding)))
@settings(max_examples=200, deadline=None)
def test_multiply_round_large_multipliers_exact(accs, num, den, mode):
    got = multiply_round(np.array(accs, dtype=np.int64), np.int64(num) if num < 2**62 else num, den, mode)
    assert [int(v) for v in got] == [reference(Fraction(a * num, den), mode) for a in accs]


@given(st.integers(-300, 300), st.integers(1, 50), st.integers(1, 50), st.sampled_from(list(Rounding)))
@settings(max_examples=300, deadline=None)
def test_threshold_is_exact_cut(t, num, den, mode):
    a = threshold(t, num, den, mode)
    assert round_fraction(Fraction(a * num, den), mode) >= t
    assert round_fraction(Fraction((a - 1) * num, den), mode) < t


def test_as_fraction_is_exact():
    assert as_fraction(0.1) == Fraction(0.1)
    assert as_fraction("0.0625") == Fraction(1, 16)
    with pytest.raises(ValueError):
        as_fraction(float("nan"))


# ---------------------------------------------------------------------------------------------- float32 (onnxruntime)
def fl32_exact(x: Fraction) -> Fraction:
    """Independent oracle: the rational ``x`` rounded to the nearest float32 (24-bit significand, ties to even;
    normal range only), in exact arithmetic."""
    if x == 0:
        return Fraction(0)
    sign = -1 if x < 0 else 1
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2^e <= a < 2^(e+2)
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    ulp = Fraction(2) ** (e - 23)
    k = a / ulp  # in [2^23, 2^24)
    r = round(k)  # Python rounds Fractions half to even
    return sign * r * ulp


def f32_reference(acc: int, m: float) -> int:
    """``rne(fl32(fl32(acc) * m))`` with the exact oracle (Python's round of a Fraction is half to even)."""
    return round(fl32_exact(fl32_exact(Fraction(acc)) * Fraction(m)))


float32_multipliers = st.floats(2.0**-20, 8.0).map(lambda v: float(np.float32(v)))
#: accumulators of every magnitude up to 2^31 (float32 rounds them above 2^24)
accumulators = st.one_of(st.integers(-3000, 3000), st.integers(-(2**31), 2**31),
                         st.integers(2**24 - 50, 2**24 + 50), st.integers(-(2**26) - 50, -(2**26) + 50))


@given(st.lists(accumulators, min_size=1, max_size=20), float32_multipliers)
@settings(max_examples=300, deadline=None)
def test_f32_round_is_the_exact_float32_arithmetic(accs, m):
    got = f32_round(np.array(accs, dtype=np.int64), np.float32(m))
    assert got.tolist() == [f32_reference(a, m) for a in accs]


@given(float32_multipliers, st.integers(-(2**26), 2**26), st.integers(1, 3000))
@settings(max_examples=200, deadline=None)
def test_f32_thresholds_against_brute_force(m, start, width):
    """Over a window of accumulators (also beyond 2^24, where fl32(acc) rounds), ``C(t)`` is the first accumulator
    whose output reaches ``t``, for every output value ``t`` the window reaches."""
    accs = np.arange(start, start + width, dtype=np.int64)
    y = f32_round(accs, np.float32(m))
    assert np.all(np.diff(y) >= 0)  # monotone
    ts = np.arange(int(y[0]) + 1, int(y[-1]) + 1)
    if len(ts):
        cuts = f32_thresholds(ts, np.float32(m))
        np.testing.assert_array_equal(cuts, accs[np.searchsorted(y, ts, side="left")])
    # and at the window's ends: f(C(t) - 1) < t <= f(C(t))
    for t in (int(y[0]), int(y[-1])):
        c = int(f32_thresholds(t, np.float32(m)))
        assert f32_reference(c, m) >= t > f32_reference(c - 1, m)


def test_f32_thresholds_domain_ends():
    m = np.float32(1e-6)
    big = int(f32_round(np.array([2**53]), m)[0])
    assert int(f32_thresholds(big + 1, m)) == 2**53 + 1  # unreachable within |acc| <= 2^53
    assert int(f32_thresholds(-big - 5, m)) == -(2**53)  # every accumulator of the domain reaches it


@given(float32_multipliers, st.integers(-3, 3), st.sampled_from([(0, 7), (-8, 7), (0, 255), (-128, 127), (3, 4)]))
@settings(max_examples=80, deadline=None)
def test_f32_error_bounds_are_exact(m, z, lohi):
    """On every accumulator whose output is strictly inside (lo, hi), ``-dL/q <= f(a) - z - a m <= dU/q``, and both
    ends are attained."""
    lo, hi = lohi
    dL, dU = f32_error_bounds(m, z, lo, hi)
    p, q = Fraction(m).numerator, Fraction(m).denominator
    lo_a = int(f32_thresholds(lo + 1 - z, np.float32(m)))
    hi_a = int(f32_thresholds(hi - z, np.float32(m))) - 1
    if hi - lo < 2 or lo_a > hi_a:
        assert (dL, dU) == (0, 0)
        return
    accs = np.arange(lo_a, min(hi_a, lo_a + 100_000) + 1, dtype=np.int64)
    err = q * f32_round(accs, np.float32(m)).astype(object) - p * accs.astype(object)  # q (f(a) - z - a m)
    if hi_a <= lo_a + 100_000:
        assert dU == max(max(err), 0) and dL == max(-min(err), 0)
    else:  # a long range: sampled at its start
        assert max(err) <= dU and -min(err) <= dL


def test_float32_and_exact_requantization_differ_where_onnxruntime_does():
    """The issue's example: an accumulator whose exact product is 138.50001 rounds to 139, while float32 gives
    exactly 138.5 and rounds (half to even) to 138."""
    acc = 93843
    # a multiplier close to 138.5 / 93843 whose exact product lies just above the tie
    m = float(np.float32(138.5 / acc))
    while Fraction(acc) * Fraction(m) <= Fraction(277, 2):
        m = float(np.nextafter(np.float32(m), np.float32(1)))
    exact = Fraction(acc) * Fraction(m)
    assert Fraction(277, 2) < exact < Fraction(277, 2) + Fraction(1, 10**4)
    assert round_fraction(exact, Rounding.HALF_EVEN) == 139
    assert float(np.float32(np.float32(acc) * np.float32(m))) == 138.5
    assert int(f32_round(np.array([acc]), np.float32(m))[0]) == 138 == f32_reference(acc, m)
    # the cut point between 138 and 139 moves by one accumulator
    assert int(f32_thresholds(139, np.float32(m))) == acc + 1
    assert threshold(139, Fraction(m).numerator, Fraction(m).denominator, Rounding.HALF_EVEN) == acc
