"""Rounding modes and requantization arithmetic: the only place in qverify where rounding is written.

A requantization maps an integer accumulator ``acc`` to an integer activation::

    y = clamp(R(acc * p / q) + z, lo, hi)

where ``p / q`` is the exact (rational, positive) multiplier of the output channel, ``z`` the output zero point and
``R`` one of the rounding modes below. The power-of-two fixed-point family (QVIP, AAAI'21, QA-IBP) is ``p = 1,
q = 2^k``; the affine family (ONNX, PyTorch, TFLite) has ``p / q = s_in * s_w / s_out`` computed exactly from the
float scales (every float is a dyadic rational, their quotient a rational).

Rounding of a rational ``n / q`` (``q > 0``), all integer arithmetic:

* ``floor``:      ``floor(n / q)``
* ``half_up``:    ``floor(n / q + 1/2) = floor((2n + q) / (2q))`` (QVIP, TF ``fake_quant``)
* ``half_away``:  ``sign(n) * floor(|n| / q + 1/2)`` (C ``round``, Keras ``quantize_int``)
* ``half_even``:  nearest integer, ties to the even one (ONNX ``QuantizeLinear``, numpy ``rint``)

All four are monotone non-decreasing in ``n``, which is what makes interval propagation through them sound.
"""

from __future__ import annotations

from enum import StrEnum
from fractions import Fraction

import numpy as np

#: numbers whose magnitude stays below this are exact in float64
FLOAT64_EXACT = 2**53
#: products below this are exact in int64
INT64_SAFE = 2**62


class Rounding(StrEnum):
    """Rounding mode of a requantization (a property of the model, stored with it)."""

    FLOOR = "floor"
    HALF_UP = "half_up"
    HALF_AWAY = "half_away"
    HALF_EVEN = "half_even"


def _as_int_array(x: np.ndarray | int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object:
        return a
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"integer array expected, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


_PYINT = np.frompyfunc(int, 1, 1)


def to_pyint(a: np.ndarray | int) -> np.ndarray:
    """An object array of Python ints (arbitrary precision) with the values of ``a``."""
    return np.asarray(_PYINT(np.asarray(a)), dtype=object)


def round_div(n: np.ndarray | int, q: np.ndarray | int, mode: Rounding | str) -> np.ndarray:
    """``R(n / q)`` elementwise for integer arrays ``n`` and positive integer ``q`` (broadcast), exactly.

    Works on int64 arrays (when ``|n| + q < 2^62``) and on object arrays of Python ints (any size).
    """
    mode = Rounding(mode)
    n = _as_int_array(n)
    q = _as_int_array(q)
    if mode is Rounding.FLOOR:
        return n // q
    if mode is Rounding.HALF_UP:
        return (2 * n + q) // (2 * q)
    if mode is Rounding.HALF_AWAY:
        sgn = np.where(n < 0, -1, 1)
        mag = (2 * (n * sgn) + q) // (2 * q)
        return sgn * mag
    # half to even
    f = n // q
    r = n - f * q  # 0 <= r < q
    twice = 2 * r
    up = (twice > q) | ((twice == q) & (f % 2 != 0))
    return f + up.astype(np.int64) if f.dtype != object else f + up.astype(object)


def round_fraction(x: Fraction, mode: Rounding | str) -> int:
    """``R(x)`` for one exact rational (used for scalars: weights, bounds of properties)."""
    return int(round_div(np.array([x.numerator], dtype=object), np.array([x.denominator], dtype=object), mode)[0])


def as_fraction(x: float | int | str | Fraction) -> Fraction:
    """The exact rational value of a float (a dyadic rational), an int, a decimal string or a Fraction."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, (int, np.integer)):
        return Fraction(int(x))
    if isinstance(x, str):
        return Fraction(x)
    f = float(x)
    if not np.isfinite(f):
        raise ValueError(f"scale must be finite, got {x!r}")
    return Fraction(f)


def multiply_round(acc: np.ndarray, num: np.ndarray, den: np.ndarray, mode: Rounding | str,
                   acc_bound: int | None = None) -> np.ndarray:
    """``R(acc * num / den)`` exactly; ``num``, ``den`` positive per-channel integers broadcast against ``acc``.

    Uses int64 when ``acc_bound * max(num) + max(den) < 2^62`` (``acc_bound`` defaults to ``max |acc|``), else Python
    integers (object arrays). The result is int64, or an object array when a value leaves int64 (callers clamp).
    """
    acc = _as_int_array(acc)
    if acc_bound is None:
        acc_bound = int(np.max(np.abs(acc))) if acc.size else 0
    nmax = int(np.max(num)) if np.size(num) else 1
    dmax = int(np.max(den)) if np.size(den) else 1
    if acc.dtype != object and acc_bound * nmax + 2 * dmax < INT64_SAFE and 2 * dmax < INT64_SAFE:
        out = round_div(acc * np.asarray(num, dtype=np.int64), np.asarray(den, dtype=np.int64), mode)
        return out.astype(np.int64, copy=False)
    big = to_pyint(acc) * to_pyint(num)
    out = round_div(big, to_pyint(den), mode)
    if out.size == 0 or max(abs(int(out.max())), abs(int(out.min()))) < INT64_SAFE:
        return out.astype(np.int64)
    return out


def threshold(t: int, num: int, den: int, mode: Rounding | str) -> int:
    """The smallest integer ``a`` with ``R(a * num / den) >= t``.

    ``R`` is monotone, so ``R(a num / den) >= t`` iff ``a >= threshold(t)``, and ``R(a num / den) == t`` iff
    ``threshold(t) <= a <= threshold(t + 1) - 1``: encoders and the fast executor path use these exact cut points.
    With ``v = a num / den``:

    * floor: ``v >= t``, so ``a >= ceil(t den / num)``;
    * half up, and half away for ``t >= 1``, and half even for even ``t``: ``v >= t - 1/2``
      (the tie at ``t - 1/2`` rounds up to ``t``), so ``a >= ceil((2t - 1) den / (2 num))``;
    * half away for ``t <= 0``, half even for odd ``t``: ``v > t - 1/2`` (the tie rounds down),
      so ``a >= floor((2t - 1) den / (2 num)) + 1``.
    """
    mode = Rounding(mode)
    t, num, den = int(t), int(num), int(den)
    if mode is Rounding.FLOOR:
        return -((-t * den) // num)
    p, q = (2 * t - 1) * den, 2 * num
    tie_up = mode is Rounding.HALF_UP or (mode is Rounding.HALF_AWAY and t >= 1) or (
        mode is Rounding.HALF_EVEN and t % 2 == 0)
    return -((-p) // q) if tie_up else p // q + 1


def thresholds(ts: range | list[int], num: int, den: int, mode: Rounding | str) -> np.ndarray:
    """:func:`threshold` for many ``t`` (int64 when every cut fits, else an object array)."""
    vals = [threshold(t, num, den, mode) for t in ts]
    if vals and max(abs(v) for v in vals) < INT64_SAFE:
        return np.array(vals, dtype=np.int64)
    return np.array(vals, dtype=object)


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0
