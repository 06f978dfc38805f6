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

**Float32 requantization** (onnxruntime's semantics, ``Requantize.float32_scale``). onnxruntime's fused integer
kernels (``QLinearMatMul``, ``QLinearConv``, ``QGemm`` and the QDQ groups it fuses into them) do not use the exact
fraction: the kernel computes a float32 multiplier once, ``m = fl32(fl32(s_x s_w) / s_y)`` per tensor or per output
channel (``onnxruntime/core/providers/cpu/quantization/quantize_linear_matmul.cc``, ``qlinearconv.cc``;
``QGemm``: ``fl32(fl32(fl32(alpha s_x) s_w) / s_y)``, ``contrib_ops/cpu/quantization/quant_gemm.cc``), adds the
int32 bias to the int32 accumulator and requantizes with MLAS ``MlasRequantizeOutput``
(``onnxruntime/core/mlas/lib/quantize.cpp``): ``_mm_cvtepi32_ps`` (int32 to float32, round to nearest even),
``_mm_mul_ps`` by ``m``, a clamp to ``[qmin - z, qmax - z]`` in float, ``_mm_cvtps_epi32`` (round half to even
under the default MXCSR), ``+ z``, a saturating pack. As a function of the integer accumulator::

    y = clamp(rne(fl32(fl32(acc) * m)) + z, lo, hi)

(the float clamp to integer bounds commutes with the rounding). :func:`f32_round` evaluates it exactly with numpy:
``acc -> float64`` is exact for ``|acc| < 2^53`` and ``float64 -> float32`` is one IEEE rounding to nearest even
(so ``fl32(acc)`` is right also for ``|acc| > 2^24``, where it rounds), the float32 product is one IEEE
multiplication (no FMA: nothing is added), and ``np.rint`` rounds half to even. Every step is monotone
non-decreasing, so the function is a non-decreasing step function of ``acc`` and has exact cut points
``C(t) = min{acc : rne(fl32(fl32(acc) m)) >= t}`` (:func:`f32_thresholds`, a bisection over the integers on the
exact emulation), used as the rational thresholds are.
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


#: float32 requantizations are evaluated (and their cut points searched) on accumulators of magnitude <= this;
#: network validation keeps every accumulator below it
F32_ACC_LIMIT = 2**53
#: float32 multipliers must lie in ``[F32_SCALE_MIN, F32_SCALE_MAX]`` (normal floats; products stay finite)
F32_SCALE_MIN = 2.0**-126
F32_SCALE_MAX = 2.0**24


def is_float32(x: float) -> bool:
    """Whether the float ``x`` is exactly a (finite) float32 value."""
    x = float(x)
    return bool(np.isfinite(x)) and float(np.float32(x)) == x


def f32_round(acc: np.ndarray, m32: np.ndarray | float) -> np.ndarray:
    """``rne(fl32(fl32(acc) * m32))`` elementwise (int64), bit for bit what MLAS ``MlasRequantizeOutput`` computes
    before the zero point and the clamp; ``m32`` float32 multipliers broadcast against ``acc``.

    Exact for ``|acc| <= 2^53`` (see the module docstring); the result saturates at ``+-2^62`` (callers clamp).
    """
    a = np.asarray(acc)
    if a.dtype == object:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"integer accumulators expected, got dtype {a.dtype}")
    if a.size and int(np.max(np.abs(a))) > F32_ACC_LIMIT:
        raise ValueError(f"float32 requantization of an accumulator beyond 2^53 ({int(np.max(np.abs(a)))})")
    af = a.astype(np.float64).astype(np.float32)  # exact, then one rounding to nearest even
    prod = af * np.asarray(m32, dtype=np.float32)  # one IEEE float32 multiplication
    r = np.clip(np.rint(prod), np.float32(-(2.0**62)), np.float32(2.0**62))
    return r.astype(np.int64)


def f32_thresholds(t: np.ndarray | int, m32: np.ndarray | float) -> np.ndarray:
    """``C(t) = min{a : rne(fl32(fl32(a) m32)) >= t}`` elementwise (int64; ``t`` and ``m32`` broadcast), exact on
    the domain ``|a| <= 2^53``: ``f(a) >= t`` iff ``a >= C(t)`` for every such ``a``. ``C(t) = 2^53 + 1`` when no
    ``a`` of the domain reaches ``t``, ``-2^53`` when all do.

    A vectorised bisection on the exact emulation :func:`f32_round` (monotone, so the invariant ``f(lo) < t <=
    f(hi)`` with virtual end points ``-2^53 - 1``, ``2^53 + 1`` gives the least ``a`` in at most 55 steps).
    """
    t_arr, m_arr = np.broadcast_arrays(np.asarray(t, dtype=np.int64), np.asarray(m32, dtype=np.float32))
    lo = np.full(t_arr.shape, -F32_ACC_LIMIT - 1, dtype=np.int64)
    hi = np.full(t_arr.shape, F32_ACC_LIMIT + 1, dtype=np.int64)
    while True:
        open_ = hi - lo > 1
        if not open_.any():
            return hi
        mid = (lo + hi) // 2  # strictly inside (lo, hi): |mid| <= 2^53
        ok = f32_round(np.where(open_, mid, 0), m_arr) >= t_arr
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid, lo)


def f32_error_bounds(m32: float, z: int, lo: int, hi: int) -> tuple[int, int]:
    """``(dL, dU)`` with ``-dL / q <= f(a) - z - a p / q <= dU / q`` for every integer ``a`` (``|a| <= 2^53``)
    whose output ``f(a) = clamp(rne(fl32(fl32(a) m)) + z, lo, hi)`` lies strictly inside ``(lo, hi)``, where
    ``p / q = m`` exactly (a float32 is a dyadic rational). Exact, from the cut points: on level ``v``
    (``C(v - z) <= a <= C(v - z + 1) - 1``) the error ``v - z - a m`` is largest at the left end and smallest at the
    right end, so ``dU = max_v (q (v - z) - p C(v - z))`` and ``dL = max_v (p (C(v - z + 1) - 1) - q (v - z))``
    over ``lo < v < hi`` (levels clipped to the domain; both at least 0)."""
    f = Fraction(float(m32))
    p, q = f.numerator, f.denominator
    if hi - lo < 2:
        return 0, 0
    u = np.arange(lo + 1 - z, hi + 1 - z, dtype=np.int64)  # v - z for v = lo+1 .. hi
    cuts = [int(c) for c in f32_thresholds(u, np.float32(m32))]
    dU, dL = 0, 0
    for k in range(len(u) - 1):  # levels v = lo+1 .. hi-1
        left, right = cuts[k], cuts[k + 1] - 1
        left, right = max(left, -F32_ACC_LIMIT), min(right, F32_ACC_LIMIT)
        if left > right:
            continue
        uv = int(u[k])
        dU = max(dU, q * uv - p * left)
        dL = max(dL, p * right - q * uv)
    return dL, dU


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0
