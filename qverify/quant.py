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
from typing import Any

import numpy as np

#: numbers whose magnitude stays below this are exact in float64
FLOAT64_EXACT = 2**53
#: integers below this magnitude are exact in float32 (a 24-bit significand)
FLOAT32_EXACT = 2**24
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


# ---------------------------------------------------------------------------------------------------------------------
# Graph ops (residual Add, average pooling, global average pooling, max pooling, concat): exact ONNX semantics and
# onnxruntime's CPU arithmetic, bit for bit. Equations, integer forms and sources: ``encodings/graph_ops.md``.
# ---------------------------------------------------------------------------------------------------------------------

_F32 = np.float32


def _int_range(dtype: np.dtype | type) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def f32_add_exact(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``fl32(p + q)``: the float32 nearest (ties to even) to the exact sum of two float64 arrays (finite, no
    overflow), as a float32 array. With ``p = x * y`` exact in float64 this is the IEEE fused multiply-add
    ``fma(x, y, q)`` that x86 ``vfmadd`` computes (one rounding).

    ``s = fl64(p + q)`` and its exact error ``e`` (Knuth's TwoSum) give ``p + q = s + e`` with ``|e| <= ulp64(s)/2``;
    ``fl32(s)`` is the answer unless ``s`` is exactly a float32 midpoint and ``e != 0`` (a float32 midpoint has 25
    significant bits, so it is a float64: no midpoint lies strictly between ``s`` and ``p + q``), where the sign of
    ``e`` decides."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    s = p + q
    bp = s - q
    bq = s - bp
    e = (p - bp) + (q - bq)
    r = s.astype(_F32)
    lo = np.where(r.astype(np.float64) <= s, r, np.nextafter(r, _F32(-np.inf)))
    hi = np.nextafter(lo, _F32(np.inf))
    mid = (lo.astype(np.float64) + hi.astype(np.float64)) / 2
    at_mid = (s == mid) & (e != 0)
    return np.where(at_mid, np.where(e > 0, hi, lo), r).astype(_F32)


def _cvtps_epi32(v: np.ndarray) -> np.ndarray:
    """x86 ``cvtps2dq`` under the default MXCSR: round half to even; a value outside the int32 range gives the
    'integer indefinite' ``-2^31`` (int64 array)."""
    r = np.rint(np.asarray(v, dtype=_F32)).astype(np.float64)
    bad = ~np.isfinite(r) | (r >= 2.0**31) | (r < -(2.0**31))
    return np.where(bad, -(2.0**31), r).astype(np.int64)


# --- Add: QLinearAdd (com.microsoft) and the QDQ DQ -> Add -> Q group it is fused from ------------------------------

def qlinear_add_integer_form(sA: float, sB: float, sC: float) -> tuple[int, int, int, int]:
    """The exact integer form of ``C = R((sA (a - zA) + sB (b - zB)) / sC) + zC``: ``(mA, mB, num, den)`` with
    ``acc = mA (a - zA) + mB (b - zB)`` and ``C = R(acc num / den) + zC``.

    A finite float is ``M 2^E`` (``M`` odd); with ``e = min(E_A, E_B)``, ``mA = M_A 2^(E_A - e)``,
    ``mB = M_B 2^(E_B - e)`` are integers and ``sA (a - zA) + sB (b - zB) = 2^e acc``; the multiplier
    ``2^e / sC = num / den`` is exact. ``max(mA, mB) < 2^24 2^|E_A - E_B|``: ``|acc| <= (mA + mB) 255`` stays below
    2^53 while the two scales' exponents differ by less than about 20."""
    fa, fb, fc = as_fraction(sA), as_fraction(sB), as_fraction(sC)
    if fa <= 0 or fb <= 0 or fc <= 0:
        raise ValueError("scales must be positive")

    def odd_exp(f: Fraction) -> tuple[int, int]:  # f = M 2^E, M odd (f is dyadic: a float)
        if f.denominator & (f.denominator - 1):
            raise ValueError(f"scale {f} is not a dyadic rational")
        m, e = f.numerator, -(f.denominator.bit_length() - 1)
        while m % 2 == 0:
            m, e = m // 2, e + 1
        return m, e

    (MA, EA), (MB, EB) = odd_exp(fa), odd_exp(fb)
    e = min(EA, EB)
    mult = Fraction(2) ** e / fc
    return MA << (EA - e), MB << (EB - e), mult.numerator, mult.denominator


def exact_qlinear_add(a: np.ndarray, b: np.ndarray, sA: float, zA: int, sB: float, zB: int, sC: float, zC: int,
                      lo: int, hi: int) -> np.ndarray:
    """ONNX (com.microsoft ``QLinearAdd``) semantics on exact rationals, round half to even:
    ``C = clamp(rne((sA (a - zA) + sB (b - zB)) / sC) + zC, lo, hi)`` (numpy broadcasting), int64."""
    mA, mB, num, den = qlinear_add_integer_form(sA, sB, sC)
    da = to_pyint(np.asarray(a, dtype=np.int64) - int(zA))
    db = to_pyint(np.asarray(b, dtype=np.int64) - int(zB))
    acc = mA * da + mB * db
    r = round_div(np.asarray(acc * num, dtype=object), np.asarray(den, dtype=object), Rounding.HALF_EVEN)
    return np.clip(r + int(zC), lo, hi).astype(np.int64)


def ort_qlinear_add_fixed_part(sA: float, zA: int, sB: float, zB: int, sC: float, zC: int
                               ) -> tuple[np.float32, np.float32, np.float32]:
    """``(rA, rB, F)`` of onnxruntime's x86 ``QLinearAdd`` kernels: ``rA = fl32(sA / sC)``, ``rB = fl32(sB / sC)``
    and the 'fixed part' ``F = fl32(zC - fma(rA, zA, fl32(rB zB)))`` (the C++ expression
    ``zC - (rA * zA + rB * zB)``, which the compiler contracts into one FMA in the AVX2 kernel: measured, the
    uncontracted form differs from onnxruntime on some scales)."""
    rA = _F32(_F32(sA) / _F32(sC))
    rB = _F32(_F32(sB) / _F32(sC))
    inner = f32_add_exact(np.float64(rA) * int(zA), np.float64(_F32(rB * _F32(int(zB)))))
    fixed = _F32(_F32(int(zC)) - _F32(inner))
    return rA, rB, fixed


def ort_qlinear_add(a: np.ndarray, b: np.ndarray, sA: float, zA: int, sB: float, zB: int, sC: float, zC: int,
                    dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """onnxruntime's ``QLinearAdd`` (and fused QDQ ``Add``) on x86-64 with AVX2/FMA (MLAS
    ``MlasQLinearAddKernelAvx2Helper``, ``qladd_avx2.cpp``), bit for bit, int64.

    Same shapes (the kernel's vector case)::

        C = sat(cvt(fma(a, rA, fma(b, rB, F))))

    ``a``, ``b`` the raw 8-bit values (converted to float exactly, zero points live in ``F``), ``(rA, rB, F)`` from
    :func:`ort_qlinear_add_fixed_part`, ``cvt`` = ``cvtps2dq`` (ties to even; ``-2^31`` out of range), ``sat`` the
    saturating packs to the 8-bit type (the clamp ``[lo, hi]`` of the type; ``zC`` is already inside ``F``).

    One input of a single element (broadcast scalar): onnxruntime passes the tensor as the kernel's ``A`` and the
    scalar as its ``B`` (swapping the parameters when the scalar is the first input) and computes
    ``F' = fma(b, rB, F)`` once (the source's ``F + b * rB``, contracted: measured), then
    ``C = sat(cvt(fma(a, rA, F')))``. Both of one element: the first
    input is taken as the scalar (onnxruntime's broadcast order). Other broadcasts are not modelled (``ValueError``).

    ``C`` is non-decreasing in ``a`` and in ``b`` separately (every step is monotone; ``rA, rB > 0``) while the
    value range stays inside int32, but it is not a function of one integer combination ``mA (a - zA) + mB (b - zB)``:
    the two roundings of the FMA chain depend on ``a`` and ``b`` separately.
    """
    lo, hi = _int_range(dtype)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.size == 1 or b.size == 1:
        if a.size == 1:  # onnxruntime's first functor: input0 scalar, input1 span
            (a, sA, zA), (b, sB, zB) = (b, sB, zB), (a, sA, zA)
        rA, rB, fixed = ort_qlinear_add_fixed_part(sA, zA, sB, zB, sC, zC)
        fixed2 = f32_add_exact(np.float64(b.reshape(-1)[0]) * np.float64(rB), np.float64(fixed))
        v = f32_add_exact(a.astype(np.float64) * np.float64(rA), np.float64(fixed2))
        return np.clip(_cvtps_epi32(v), lo, hi)
    if a.shape != b.shape:
        raise ValueError(f"ort_qlinear_add models equal shapes or a one-element input, got {a.shape} and {b.shape}")
    rA, rB, fixed = ort_qlinear_add_fixed_part(sA, zA, sB, zB, sC, zC)
    t = f32_add_exact(b.astype(np.float64) * np.float64(rB), np.float64(fixed))
    v = f32_add_exact(a.astype(np.float64) * np.float64(rA), t.astype(np.float64))
    return np.clip(_cvtps_epi32(v), lo, hi)


def ort_dequantize(x: np.ndarray, s: float, z: int) -> np.ndarray:
    """onnxruntime's ``DequantizeLinear`` (8-bit, per tensor): ``fl32((x - z) s)`` (float32 array)."""
    return (np.asarray(x, dtype=np.int64) - int(z)).astype(_F32) * _F32(s)


def ort_quantize(v: np.ndarray, s: float, z: int, lo: int, hi: int) -> np.ndarray:
    """onnxruntime's ``QuantizeLinear`` (MLAS ``MlasQuantizeLinear``): ``clamp(rne(fl32(v / s)), lo - z, hi - z) + z``
    (int64)."""
    q = np.asarray(v, dtype=_F32) / _F32(s)
    return np.clip(_cvtps_epi32(np.clip(q, _F32(lo - int(z)), _F32(hi - int(z)))) + int(z), lo, hi)


def ort_float_add(a: np.ndarray, b: np.ndarray, sA: float, zA: int, sB: float, zB: int, sC: float, zC: int,
                  lo: int, hi: int) -> np.ndarray:
    """An unfused ``DQ -> Add -> Q`` in onnxruntime (float kernels; e.g. at ``ORT_DISABLE_ALL``):
    ``C = clamp(rne(fl32(fl32(fl32(sA (a - zA)) + fl32(sB (b - zB))) / sC)) + zC, lo, hi)`` (numpy broadcasting).
    Non-decreasing in each of ``a``, ``b``; not a function of one integer combination."""
    return ort_quantize(ort_dequantize(a, sA, zA) + ort_dequantize(b, sB, zB), sC, zC, lo, hi)


# --- requantization of single values: QLinearConcat, DQ -> Q, DQ -> MaxPool -> Q with new parameters ----------------

def exact_requantize(x: np.ndarray, sx: float, zx: int, sy: float, zy: int, lo: int, hi: int) -> np.ndarray:
    """ONNX semantics of ``Q(DQ(x))`` with new parameters (``QLinearConcat`` per input):
    ``y = clamp(rne(sx (x - zx) / sy) + zy, lo, hi)``; integer form ``acc = x - zx``, multiplier ``sx / sy``."""
    m = as_fraction(sx) / as_fraction(sy)
    acc = np.asarray(x, dtype=np.int64) - int(zx)
    return np.clip(multiply_round(acc, np.int64(m.numerator), np.int64(m.denominator), Rounding.HALF_EVEN) + int(zy),
                   lo, hi).astype(np.int64)


def ort_requantize(x: np.ndarray, sx: float, zx: int, sy: float, zy: int, lo: int, hi: int) -> np.ndarray:
    """onnxruntime's requantization of single values: ``QLinearConcat``'s 256-entry lookup table
    (``QlinearBuildLookupTable``: ``fl32(sx (x - zx))`` then ``MlasQuantizeLinear``), and equally the separate
    ``DequantizeLinear`` / ``QuantizeLinear`` kernels of an unfused ``DQ -> Q`` (or ``DQ -> MaxPool/Reshape -> Q``
    with new parameters)::

        y = clamp(rne(fl32(fl32(sx (x - zx)) / sy)) + zy, lo, hi)

    A non-decreasing function of the one integer ``acc = x - zx`` (``|acc| <= 255``: a table)."""
    return ort_quantize(ort_dequantize(x, sx, zx), sy, zy, lo, hi)


def ort_qlinear_concat(inputs: list[tuple[np.ndarray, float, int]], sy: float, zy: int, axis: int,
                       dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """onnxruntime's ``QLinearConcat``: each input ``(x, sx, zx)`` is copied when ``(sx, zx) == (sy, zy)`` and mapped
    through :func:`ort_requantize` otherwise (the two agree on a copy: ``|fl32(fl32(s k)/s) - k| < 1/2``), then
    concatenated along ``axis`` (int64)."""
    lo, hi = _int_range(dtype)
    parts = []
    for x, sx, zx in inputs:
        x = np.asarray(x, dtype=np.int64)
        same = _F32(sx) == _F32(sy) and int(zx) == int(zy)
        parts.append(x.copy() if same else ort_requantize(x, sx, zx, sy, zy, lo, hi))
    return np.concatenate(parts, axis=axis)


def exact_qlinear_concat(inputs: list[tuple[np.ndarray, float, int]], sy: float, zy: int, axis: int,
                         dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """ONNX semantics of ``QLinearConcat``: :func:`exact_requantize` of each input, concatenated."""
    lo, hi = _int_range(dtype)
    return np.concatenate([exact_requantize(x, sx, zx, sy, zy, lo, hi) for x, sx, zx in inputs], axis=axis)


# --- pooling windows --------------------------------------------------------------------------------------------------

def pool_output_shape(hw: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
                      pads: tuple[int, int, int, int]) -> tuple[int, int]:
    """Output spatial size of a 2-D pool, ``ceil_mode = 0``: ``(H + p_top + p_bottom - kh) // sh + 1`` (ONNX pads
    order ``[top, left, bottom, right]``)."""
    (h, w), (kh, kw), (sh, sw) = hw, kernel, strides
    return (h + pads[0] + pads[2] - kh) // sh + 1, (w + pads[1] + pads[3] - kw) // sw + 1


def _windows(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
             fill: float | int) -> np.ndarray:
    """``[N, C, OH, OW, kh, kw]`` windows of an NCHW array padded with ``fill`` (row-major window order)."""
    kh, kw = kernel
    sh, sw = strides
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=fill)
    oh, ow = pool_output_shape(x.shape[2:], kernel, strides, pads)
    idx_h = (np.arange(oh) * sh)[:, None] + np.arange(kh)[None, :]
    idx_w = (np.arange(ow) * sw)[:, None] + np.arange(kw)[None, :]
    return xp[:, :, idx_h[:, None, :, None], idx_w[None, :, None, :]]


def avgpool_counts(hw: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
                   pads: tuple[int, int, int, int], count_include_pad: bool) -> np.ndarray:
    """The divisor of each output position ``[OH, OW]``: ``kh kw`` with ``count_include_pad``, else the number of
    window cells inside the image (onnxruntime clips the window to ``[0, H) x [0, W)``, the ONNX reference does the
    same)."""
    ones = np.ones((1, 1) + tuple(hw), dtype=np.int64)
    cells = _windows(ones, kernel, strides, pads, 0)[0, 0].sum(axis=(-1, -2))
    if count_include_pad:
        return np.full(cells.shape, kernel[0] * kernel[1], dtype=np.int64)
    return cells.astype(np.int64)


def avgpool_integer_form(counts: np.ndarray) -> tuple[int, np.ndarray]:
    """``(L, w)``: ``L = lcm`` of the divisors and ``w = L / count`` per output position, so that the exact average
    is ``sx S / (sy count) = (w S) (sx / (sy L))``: one integer linear map ``acc' = w S`` (``S = Σ (x - zx)`` over the
    window) and one requantization with the uniform exact multiplier ``sx / (sy L)``."""
    import math

    L = 1
    for c in np.unique(counts):
        L = math.lcm(L, int(c))
    return L, (L // counts).astype(np.int64)


def avgpool_window_sums(x: np.ndarray, zx: int, kernel: tuple[int, int], strides: tuple[int, int],
                        pads: tuple[int, int, int, int]) -> np.ndarray:
    """``S = Σ_{window ∩ image} (x - zx)`` per output position, ``[N, C, OH, OW]`` (int64): the integer
    accumulator of average pooling (a padded cell is real 0, ``x = zx``, and adds nothing)."""
    return _windows(np.asarray(x, dtype=np.int64) - int(zx), kernel, strides, pads, 0).sum(axis=(-1, -2))


def exact_qlinear_avgpool(x: np.ndarray, sx: float, zx: int, sy: float, zy: int, kernel: tuple[int, int],
                          strides: tuple[int, int], pads: tuple[int, int, int, int], count_include_pad: bool,
                          dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """ONNX semantics of ``QLinearAveragePool`` (NCHW, 2-D, ``ceil_mode = 0``) on exact rationals::

        y = clamp(rne(sx S / (sy count)) + zy, lo, hi),   S = Σ_{window ∩ image} (x - zx)

    (a padded cell is real 0, i.e. contributes nothing to ``S``; ``count`` from :func:`avgpool_counts`). Computed
    through :func:`avgpool_integer_form`: ``acc' = (L / count) S``, multiplier ``sx / (sy L)``."""
    lo, hi = _int_range(dtype)
    x = np.asarray(x, dtype=np.int64)
    S = avgpool_window_sums(x, zx, kernel, strides, pads)
    counts = avgpool_counts(x.shape[2:], kernel, strides, pads, count_include_pad)
    L, w = avgpool_integer_form(counts)
    m = as_fraction(sx) / (as_fraction(sy) * L)
    acc = S * w
    return np.clip(multiply_round(acc, np.int64(m.numerator), np.int64(m.denominator), Rounding.HALF_EVEN)
                   + int(zy), lo, hi).astype(np.int64)


def ort_avgpool_is_global(hw: tuple[int, int], kernel: tuple[int, int], pads: tuple[int, int, int, int]) -> bool:
    """onnxruntime runs a ``QLinearAveragePool`` whose kernel equals the spatial shape and whose pads are all 0 as a
    ``QLinearGlobalAveragePool`` (integer sum, :func:`ort_qlinear_global_avgpool`), whatever the strides."""
    return tuple(hw) == tuple(kernel) and not any(pads)


def ort_qlinear_avgpool(x: np.ndarray, sx: float, zx: int, sy: float, zy: int, kernel: tuple[int, int],
                        strides: tuple[int, int], pads: tuple[int, int, int, int], count_include_pad: bool,
                        dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """onnxruntime's ``QLinearAveragePool`` (``contrib_ops/cpu/quantization/qlinear_pool.cc``, NCHW or NHWC: the
    same float operations in the same order), 2-D, ``ceil_mode = 0``, bit for bit (int64)::

        d_i = fl32(sx (x_i - zx))                            (dequantize_value)
        Y   = (((0 + d_1) + d_2) + ... + d_n)   in float32, window ∩ image in row-major order
        Y'  = fl32(Y / count)                                (AveragePool::Finalize)
        y   = clamp(rne(fl32(fl32(Y' / sy) + zy)), lo, hi)   (quantize_value: nearbyintf of the sum)

    The global case (:func:`ort_avgpool_is_global`) is :func:`ort_qlinear_global_avgpool`. ``y`` is
    non-decreasing in every ``x_i``; it is a function of ``S = Σ (x_i - zx)`` alone only when every ``d_i`` and
    partial sum is exact (:func:`ort_avgpool_sum_is_exact`, then :func:`ort_avgpool_from_sum`)."""
    lo, hi = _int_range(dtype)
    x = np.asarray(x, dtype=np.int64)
    if ort_avgpool_is_global(x.shape[2:], kernel, pads):
        return ort_qlinear_global_avgpool(x, sx, zx, sy, zy, dtype)
    d = ort_dequantize(x, sx, zx)
    win = _windows(d, kernel, strides, pads, 0.0)  # padded cells add +0.0: no change to a float32 sum
    acc = np.zeros(win.shape[:4], dtype=_F32)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            acc = acc + win[..., i, j]
    counts = avgpool_counts(x.shape[2:], kernel, strides, pads, count_include_pad).astype(_F32)
    avg = acc / counts
    q = _F32(avg / _F32(sy)) + _F32(int(zy))
    return np.clip(_cvtps_epi32(q), lo, hi)


def ort_avgpool_sum_is_exact(sx: float, kmax: int, count: int) -> bool:
    """Whether onnxruntime's float32 window sum equals ``sx S`` exactly for every window of ``count`` cells with
    ``|x - zx| <= kmax``: with ``sx = M 2^E`` (``M`` odd), every ``d_i`` and partial sum is an integer multiple of
    ``2^E`` of magnitude at most ``M kmax count``, exact when that is at most ``2^24``."""
    f = as_fraction(sx)
    M = f.numerator
    while M % 2 == 0:
        M //= 2
    return M * int(kmax) * int(count) <= 2**24


def ort_avgpool_from_sum(S: np.ndarray, count: np.ndarray | int, sx: float, sy: float, zy: int, lo: int, hi: int
                         ) -> np.ndarray:
    """onnxruntime's ``QLinearAveragePool`` output as a function of the one integer ``S = Σ (x - zx)`` when the
    window sum is exact (:func:`ort_avgpool_sum_is_exact`)::

        y = clamp(rne(fl32(fl32(fl32(fl32(sx S) / count) / sy) + zy)), lo, hi)

    (``fl32(sx S)`` is exact there). Non-decreasing in ``S`` for each ``count``: cut points by
    :func:`monotone_int_thresholds`; a border position with another ``count`` has its own function."""
    s = np.asarray(S, dtype=np.int64).astype(np.float64) * np.float64(_F32(sx))  # exact: sx S has <= 24 bits
    y = _F32(s.astype(_F32) / np.asarray(count, dtype=np.int64).astype(_F32))
    q = _F32(y / _F32(sy)) + _F32(int(zy))
    return np.clip(_cvtps_epi32(q), lo, hi)


def monotone_int_thresholds(f, ts: np.ndarray, lo: int, hi: int) -> np.ndarray:  # noqa: ANN001 - any vectorised f
    """``C(t) = min{a in [lo, hi] : f(a) >= t}`` (``hi + 1`` when none) for a vectorised non-decreasing integer
    function ``f`` (int64 array in, int64 array out), by bisection over the integers (each ``t`` of ``ts``)."""
    t = np.asarray(ts, dtype=np.int64)
    a = np.full(t.shape, lo - 1, dtype=np.int64)
    b = np.full(t.shape, hi + 1, dtype=np.int64)
    while True:
        open_ = b - a > 1
        if not open_.any():
            return b
        mid = (a + b) // 2
        ok = np.asarray(f(np.where(open_, mid, lo))) >= t
        b = np.where(open_ & ok, mid, b)
        a = np.where(open_ & ~ok, mid, a)


# --- global average pooling -------------------------------------------------------------------------------------------

def ort_global_avgpool_multiplier(sx: float, sy: float, n: int) -> np.float32:
    """onnxruntime's ``QLinearGlobalAveragePool`` multiplier (MLAS ``CheckQLinearGlobalAveragePoolScaleAndSize``):
    ``m = fl32(sx / fl32(sy fl32(n)))``; onnxruntime rejects ``n >= 2^24`` and ``m`` outside ``[2^-32, 256)``."""
    if n >= 2**24:
        raise ValueError("QLinearGlobalAveragePool: image size too large (onnxruntime refuses n >= 2^24)")
    m = _F32(_F32(sx) / _F32(_F32(sy) * _F32(n)))
    if not (2.0**-32 <= float(m) < 256.0):
        raise ValueError(f"QLinearGlobalAveragePool: multiplier {float(m)} outside onnxruntime's [2^-32, 256)")
    return m


def ort_qlinear_global_avgpool(x: np.ndarray, sx: float, zx: int, sy: float, zy: int,
                               dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """onnxruntime's ``QLinearGlobalAveragePool`` (MLAS ``MlasQLinearGlobalAveragePoolNchw``/``Nhwc``), bit for bit:
    an exact int32 sum ``acc = Σ x - zx n = Σ (x - zx)`` over the ``n`` spatial cells, then ``MlasRequantizeOutput``
    with :func:`ort_global_avgpool_multiplier`::

        y = clamp(rne(fl32(fl32(acc) m)) + zy, lo, hi)      (= f32_round(acc, m) + zy)

    a non-decreasing function of the one integer ``acc`` with cut points :func:`f32_thresholds` (returns
    ``[N, C, 1, 1]``, int64)."""
    lo, hi = _int_range(dtype)
    x = np.asarray(x, dtype=np.int64)
    n = int(np.prod(x.shape[2:]))
    acc = (x - int(zx)).reshape(x.shape[0], x.shape[1], -1).sum(axis=-1)
    m = ort_global_avgpool_multiplier(sx, sy, n)
    y = np.clip(f32_round(acc, m) + int(zy), lo, hi)
    return y.reshape(x.shape[0], x.shape[1], *([1] * (x.ndim - 2)))


def exact_qlinear_global_avgpool(x: np.ndarray, sx: float, zx: int, sy: float, zy: int,
                                 dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """ONNX semantics: ``y = clamp(rne(sx acc / (sy n)) + zy, lo, hi)``, ``acc = Σ (x - zx)``; integer form ``acc``
    with the exact multiplier ``sx / (sy n)``."""
    lo, hi = _int_range(dtype)
    x = np.asarray(x, dtype=np.int64)
    n = int(np.prod(x.shape[2:]))
    acc = (x - int(zx)).reshape(x.shape[0], x.shape[1], -1).sum(axis=-1)
    m = as_fraction(sx) / (as_fraction(sy) * n)
    y = np.clip(multiply_round(acc, np.int64(m.numerator), np.int64(m.denominator), Rounding.HALF_EVEN) + int(zy),
                lo, hi)
    return y.reshape(x.shape[0], x.shape[1], *([1] * (x.ndim - 2))).astype(np.int64)


# --- max pooling ------------------------------------------------------------------------------------------------------

def qmaxpool(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int]
             ) -> np.ndarray:
    """``MaxPool`` on 8-bit integers (opset 12+; what onnxruntime runs once it drops a ``DQ -> MaxPool -> Q`` pair
    with equal positive-scale parameters): the exact maximum over ``window ∩ image`` (padded cells never win),
    NCHW 2-D, ``ceil_mode = 0``, no dilation (int64). Exact in both semantics: ``s (x - z)`` is increasing in ``x``
    for ``s > 0``, so max commutes with dequantization, and with any monotone requantization after it."""
    x = np.asarray(x, dtype=np.int64)
    return _windows(x, kernel, strides, pads, np.iinfo(np.int64).min).max(axis=(-1, -2))


# --- TFLite integer arithmetic ----------------------------------------------------------------------------------------
#
# TFLite's int8 kernels (``tensorflow/lite/kernels/internal/reference/integer_ops/``: ``conv.h``,
# ``depthwise_conv.h``, ``fully_connected.h``, ``add.h``, ``pooling.h``) requantize an int32 accumulator with a
# fixed-point multiplier ``M`` (int32, ``2^30 <= M < 2^31``) and a power-of-two exponent ``shift``, derived once
# from the real multiplier by ``QuantizeMultiplier`` (``kernels/internal/quantization_util.cc``), and applied by
# ``MultiplyByQuantizedMultiplier`` (``kernels/internal/common.cc``, the default double-rounding build, i.e.
# without ``TFLITE_SINGLE_ROUNDING``) as two successive roundings (gemmlowp ``fixedpoint.h``)::
#
#     MBQM(x, M, shift) = RDBPOT(SRDHM(x * 2^max(shift, 0), M), max(-shift, 0))
#     SRDHM(a, b)       = floor((a b + 2^30) / 2^31)       (a b / 2^31 rounded half up; INT32_MAX at a = b = -2^31)
#     RDBPOT(x, e)      = round_half_away(x / 2^e)
#
# (SRDHM's C form, ``(ab + nudge) / 2^31`` truncated with ``nudge = 2^30`` or ``1 - 2^30`` by the sign of ``ab``,
# equals ``floor((ab + 2^30) / 2^31)`` for every sign: ``ceil((n + 1) / q) = floor((n + q) / q)``.) Both roundings
# are non-decreasing, so ``clamp(MBQM(acc) + z, lo, hi)`` is a non-decreasing step function of ``acc`` while
# ``acc * 2^max(shift, 0)`` stays in int32 (the C code multiplies in int32; beyond that it wraps, emulated here).

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def _wrap_i32(v: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to int32 (what the int32 multiplication of the C code does)."""
    return ((np.asarray(v, dtype=np.int64) + 2**31) % 2**32) - 2**31


def _round_half_away(x: Fraction) -> int:
    """``std::round`` of an exact rational: nearest integer, ties away from zero."""
    n = abs(x)
    r = int((n + Fraction(1, 2)).__floor__())
    return r if x >= 0 else -r


def tflite_quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier(double, int32* M, int* shift)``: ``real = q 2^shift`` with ``q`` in
    ``[1/2, 1)`` (``frexp``), ``M = round_half_away(q 2^31)`` (``TfLiteRound``); ``M = 2^31`` becomes ``2^30`` with
    ``shift + 1``; ``shift < -31`` flushes to ``(0, 0)``; ``real = 0`` is ``(0, 0)``. Returns ``(M, shift)`` with
    ``real ~ M 2^(shift - 31)``."""
    import math

    real = float(real)
    if real == 0.0:
        return 0, 0
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"TFLite multiplier must be finite and non-negative, got {real!r}")
    q, shift = math.frexp(real)
    m = _round_half_away(Fraction(q) * 2**31)  # q 2^31 is exact in double; rounded exactly here
    if m == 2**31:
        m //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(m), int(shift)


def tflite_conv_multiplier(s_in: float, s_w: float, s_out: float) -> float:
    """The real multiplier of an int8 CONV_2D / DEPTHWISE_CONV_2D channel and of a per-channel FULLY_CONNECTED
    (``PopulateConvolutionQuantizationParams``, ``kernels/kernel_util.cc``): the float32 scales widened to double,
    ``double(s_in) * double(s_w) / double(s_out)`` (one double rounding, in the division)."""
    return float(np.float64(np.float32(s_in)) * np.float64(np.float32(s_w)) / np.float64(np.float32(s_out)))


def tflite_fc_reference_requantize(acc: np.ndarray, effective_scale: np.ndarray | float, zero_point: int, lo: int,
                                   hi: int) -> np.ndarray:
    """TFLite's reference int8 FULLY_CONNECTED output (``reference_integer_ops::FullyConnected`` /
    ``FullyConnectedPerChannel``, the overloads taking the float scales, which ``kernels/fully_connected.cc`` calls
    for ``kReference``): no fixed-point multiplier but ``clamp(round(fl64(double(acc) * e_c)) + z, lo, hi)`` with
    ``e_c`` = :func:`tflite_conv_multiplier` and C ``round`` (half away from zero). Non-decreasing in ``acc``
    (``e_c > 0``). ``double(acc)`` is exact (``|acc| < 2^53``), the product is one IEEE multiplication (numpy), and
    the rounding is done exactly here (``v - trunc(v)`` is exact)."""
    v = np.asarray(acc, dtype=np.int64).astype(np.float64) * np.asarray(effective_scale, dtype=np.float64)
    t = np.trunc(v)
    up = np.abs(v - t) >= 0.5
    r = (t + np.where(up, np.sign(v), 0.0)).astype(np.int64)
    return np.clip(r + int(zero_point), int(lo), int(hi))


def tflite_srdhm(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values (int64 arrays in and out):
    ``floor((a b + 2^30) / 2^31)``, and ``2^31 - 1`` where ``a = b = -2^31``. Exact: ``|a b| <= 2^62``."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    out = (ab + 2**30) >> 31  # arithmetic shift = floor division by 2^31
    return np.where((a == _I32_MIN) & (b == _I32_MIN), _I32_MAX, out)


def tflite_rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT(x, e)`` (``0 <= e <= 31``): ``x >> e`` plus one where the remainder
    ``x & (2^e - 1)`` exceeds ``(2^e - 1) >> 1`` (plus one for negative ``x``): ``x / 2^e`` rounded half away from
    zero."""
    x = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> e) + (remainder > threshold).astype(np.int64)


def tflite_multiply_by_quantized_multiplier(x: np.ndarray, multiplier: np.ndarray | int,
                                            shift: np.ndarray | int) -> np.ndarray:
    """TFLite's int32 ``MultiplyByQuantizedMultiplier(x, M, shift)`` (double rounding, ``common.cc``), vectorized
    and broadcast (per-channel ``M`` and ``shift`` as arrays)::

        RDBPOT(SRDHM(wrap32(x * 2^max(shift, 0)), M), max(-shift, 0))

    ``wrap32`` is the int32 product of the C code (it wraps when ``x 2^shift`` leaves int32; importers refuse
    layers where that can happen, since the function is then not monotone)."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return tflite_rounding_divide_by_pot(tflite_srdhm(_wrap_i32(x << left), multiplier), right)


def tflite_requantize(acc: np.ndarray, multiplier: np.ndarray | int, shift: np.ndarray | int, zero_point: int,
                      lo: int, hi: int) -> np.ndarray:
    """An int8 kernel's output: ``clamp(MBQM(acc, M, shift) + z_out, act_min, act_max)`` (int64)."""
    y = tflite_multiply_by_quantized_multiplier(acc, multiplier, shift) + int(zero_point)
    return np.clip(y, int(lo), int(hi))


def tflite_quantize_float(f: float, scale: float, zero_point: int) -> int:
    """TFLite's ``Quantize`` of a real constant (``kernels/kernel_util.cc``, used for the fused activation's
    bounds): ``z + TfLiteRound(fl32(f / scale))``, the division in float32, rounded half away from zero."""
    q = np.float32(np.float32(f) / np.float32(scale))
    return int(zero_point) + _round_half_away(Fraction(float(q)))


def tflite_activation_range(activation: str, scale: float, zero_point: int, qmin: int, qmax: int
                            ) -> tuple[int, int]:
    """``CalculateActivationRangeQuantized``: the clamp ``[act_min, act_max]`` of a fused activation (``none``,
    ``relu``: ``[max(qmin, z), qmax]``, ``relu6``: ``[max(qmin, z), min(qmax, Q(6))]``, ``relu_n1_to_1``:
    ``[max(qmin, Q(-1)), min(qmax, Q(1))]`` with ``Q`` = :func:`tflite_quantize_float`)."""
    if activation == "none":
        return qmin, qmax
    if activation == "relu":
        return max(qmin, tflite_quantize_float(0.0, scale, zero_point)), qmax
    if activation == "relu6":
        return (max(qmin, tflite_quantize_float(0.0, scale, zero_point)),
                min(qmax, tflite_quantize_float(6.0, scale, zero_point)))
    if activation == "relu_n1_to_1":
        return (max(qmin, tflite_quantize_float(-1.0, scale, zero_point)),
                min(qmax, tflite_quantize_float(1.0, scale, zero_point)))
    raise ValueError(f"unknown fused activation {activation!r}")


#: TFLite's int8 ADD: inputs shifted left by 20 bits before their rescaling (``add.cc`` / ``add_common.cc``)
TFLITE_ADD_LEFT_SHIFT = 20


def tflite_add_params(s1: float, s2: float, s_out: float) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The fixed-point multipliers of TFLite's int8 ADD (``Prepare`` of ``kernels/add.cc``): with
    ``t = 2 max(s1, s2)`` (double), ``r1 = s1 / t``, ``r2 = s2 / t`` (each ``<= 1/2``) and
    ``r_out = t / (2^20 s_out)``, each through ``QuantizeMultiplier`` (``SmallerThanOneExp``). Returns
    ``((M1, shift1), (M2, shift2), (M_out, shift_out))``."""
    d1, d2, do = (float(np.float64(np.float32(v))) for v in (s1, s2, s_out))
    t = 2 * max(d1, d2)
    return (tflite_quantize_multiplier(d1 / t), tflite_quantize_multiplier(d2 / t),
            tflite_quantize_multiplier(t / ((1 << TFLITE_ADD_LEFT_SHIFT) * do)))


def tflite_add_rescale(v: np.ndarray, multiplier: int, shift: int) -> np.ndarray:
    """One input's term of TFLite's int8 ADD: ``MBQM((x - z) * 2^20, M_i, shift_i)`` of ``v = x - z``."""
    return tflite_multiply_by_quantized_multiplier(np.asarray(v, dtype=np.int64) << TFLITE_ADD_LEFT_SHIFT,
                                                   multiplier, shift)


def tflite_add(x1: np.ndarray, x2: np.ndarray, s1: float, z1: int, s2: float, z2: int, s_out: float, z_out: int,
               lo: int = -128, hi: int = 127) -> np.ndarray:
    """TFLite's int8 ADD (``reference_integer_ops::AddFunc``, ``integer_ops/add.h``), bit for bit::

        y = clamp(MBQM(R1(x1 - z1) + R2(x2 - z2), M_out, shift_out) + z_out, lo, hi)

    with ``R_i`` = :func:`tflite_add_rescale` and the multipliers of :func:`tflite_add_params`. The input with the
    larger scale has ``r = 1/2`` exactly (``M = 2^30``, shift 0), so its term is the exact ``2^19 (x - z)``; the
    other term is a rounding of its own input alone."""
    (m1, e1), (m2, e2), (mo, eo) = tflite_add_params(s1, s2, s_out)
    a = tflite_add_rescale(np.asarray(x1, dtype=np.int64) - int(z1), m1, e1)
    b = tflite_add_rescale(np.asarray(x2, dtype=np.int64) - int(z2), m2, e2)
    return tflite_requantize(a + b, mo, eo, z_out, lo, hi)


def tflite_avgpool_round(window_sum: np.ndarray, count: np.ndarray | int) -> np.ndarray:
    """TFLite's int8 average (``reference_integer_ops::AveragePool``, ``integer_ops/pooling.h``): the raw sum of
    the window's cells inside the image (padding excluded, zero points included), then
    ``(S + n/2) / n`` for ``S > 0`` and ``(S - n/2) / n`` otherwise, C division truncating toward zero: for
    ``n >= 1`` that is ``round_half_away(S / n)`` (``n`` even: ``n/2`` is the exact half; ``n`` odd: no ties)."""
    s = np.asarray(window_sum, dtype=np.int64)
    n = np.asarray(count, dtype=np.int64)
    half = n // 2
    num = np.where(s > 0, s + half, s - half)
    q = np.abs(num) // n
    return np.where(num < 0, -q, q)


# --- elementwise functions of one quantized value ----------------------------------------------------------------
#: decimal digits of the transcendental functions (Sigmoid, Tanh) in :func:`exact_function_table`
FN_DIGITS = 120


def exact_function_table(op: str, attrs: dict, qs: np.ndarray, sx: Fraction, zx: int,
                         clip: tuple[Fraction | None, Fraction | None], sy: Fraction, zy: int, lo: int, hi: int
                         ) -> np.ndarray:
    """``y(q) = clamp(rne(f(r) / s_y) + z_y, lo, hi)`` with ``r = clip(s_x (q - z_x))`` for every ``q`` of ``qs``:
    the ONNX specification of ``DQ -> f -> Q`` on exact values.

    * ``LeakyRelu``: ``r`` for ``r >= 0``, ``alpha r`` otherwise (``alpha`` the float32 attribute, exactly);
      ``HardSigmoid``: ``max(0, min(1, alpha r + beta))``; ``HardSwish``: ``r max(0, min(1, r / 6 + 1/2))``: exact
      rationals, rounded half to even exactly;
    * ``Sigmoid`` ``1 / (1 + e^-r)`` and ``Tanh``: irrational for every rational ``r != 0`` (Lindemann), so no tie
      can occur there; evaluated to :data:`FN_DIGITS` digits (``mpmath``) and rounded, with a ``ValueError`` if
      the value lies within ``10^-(FN_DIGITS - 20)`` of a rounding boundary (never for these inputs); ``r = 0`` is
      exact (``1/2``, ``0``)."""
    lo_c, hi_c = clip
    out = np.empty(len(qs), dtype=np.int64)
    for k, q in enumerate(qs.tolist()):
        r = sx * (int(q) - zx)
        if lo_c is not None:
            r = max(r, lo_c)
        if hi_c is not None:
            r = min(r, hi_c)
        v = _fn_value(op, attrs, r)
        if isinstance(v, Fraction):
            y = round_fraction(v / sy, Rounding.HALF_EVEN)
        else:
            y = _round_mp(v / _mp_fraction(sy), op, r)
        out[k] = min(max(y + zy, lo), hi)
    return out


def _fn_value(op: str, attrs: dict, r: Fraction) -> Any:
    if op == "LeakyRelu":
        return r if r >= 0 else Fraction(float(np.float32(attrs.get("alpha", 0.01)))) * r
    if op in ("HardSigmoid", "HardSwish"):
        a = Fraction(float(np.float32(attrs.get("alpha", 0.2)))) if op == "HardSigmoid" else Fraction(1, 6)
        b = Fraction(float(np.float32(attrs.get("beta", 0.5)))) if op == "HardSigmoid" else Fraction(1, 2)
        h = max(Fraction(0), min(Fraction(1), a * r + b))
        return h if op == "HardSigmoid" else r * h
    if op in ("Sigmoid", "Tanh"):
        if r == 0:
            return Fraction(1, 2) if op == "Sigmoid" else Fraction(0)
        import mpmath

        mpmath.mp.dps = FN_DIGITS
        x = _mp_fraction(r)
        return 1 / (1 + mpmath.exp(-x)) if op == "Sigmoid" else mpmath.tanh(x)
    raise ValueError(f"no exact table for the function {op!r}")


def _mp_fraction(f: Fraction) -> Any:
    import mpmath

    mpmath.mp.dps = FN_DIGITS
    return mpmath.mpf(f.numerator) / f.denominator


def _round_mp(v: Any, op: str, r: Fraction) -> int:
    """Round half to even of a high-precision irrational value; refuses to decide within the precision of a tie."""
    import mpmath

    fl = int(mpmath.floor(v))
    frac = v - fl
    if abs(frac - mpmath.mpf(1) / 2) < mpmath.mpf(10) ** (-(FN_DIGITS - 20)):
        raise ValueError(f"{op}({r}) lies within 1e-{FN_DIGITS - 20} of a rounding tie; not decided")
    return fl + 1 if frac > 0.5 else fl
