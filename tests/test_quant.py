from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.quant import Rounding, as_fraction, multiply_round, round_div, round_fraction, threshold


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
