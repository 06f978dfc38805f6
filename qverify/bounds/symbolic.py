"""Symbolic (linear, DeepPoly/CROWN-style back-substitution) bounds through the integer network.

Tighter than intervals: every layer's value is bounded by linear functions of earlier layers, composed back to the
input box, so correlations between neurons cancel (the margin ``y_c - y_i`` of two outputs is bounded directly).

**Relaxation of a requantization.** Neuron ``y = f(a) = clamp(R(a p / q) + z, lo, hi)`` of an integer accumulator
``a`` known to lie in ``[l, u]`` (integers). ``f`` is a non-decreasing integer step function; we need lines
``alpha_L a + beta_L <= f(a) <= alpha_U a + beta_U`` for every *integer* ``a`` in ``[l, u]`` (accumulators are
integers, so validity is only required there), with slopes ``alpha >= 0``. With ``F_l = f(l) < F_u = f(u)``
(otherwise the neuron is fixed: both lines are the constant ``F_l``) and ``T(v)`` the smallest integer with
``f(T(v)) >= v`` (:func:`thresholds`, found with the exact rounding of :func:`qverify.quant.round_div`):

* the integers of ``[l, u]`` split into *levels* (maximal runs where ``f`` is constant). Level ``v`` is
  ``[max(l, T(v)), min(u, T(v + 1) - 1)]``. The first ``K`` levels ``F_l .. F_l + K - 1`` and the last ``K``
  levels ``F_u - K + 1 .. F_u`` (``levels=K``, default 3) are taken exactly; the middle levels
  ``F_l + K .. F_u - K`` fill the span ``M = [T(F_l + K), T(F_u - K + 1) - 1]``, where they lie strictly between
  ``F_l >= lo`` and ``F_u <= hi``, so no clamp is active and ``f(a) = R(a p / q) + z`` there;
* the rounding error of ``R`` at ``n / q`` lies in ``[-dL / q, dU / q]`` (:func:`rounding_error_bounds`:
  floor ``[-(q-1)/q, 0]``, half-up ``[-(ceil(q/2)-1)/q, floor(q/2)/q]``, half-away and half-even
  ``[-floor(q/2)/q, floor(q/2)/q]``), so on ``M``:
  ``max(F_l + K, (p a + z q - dL) / q) <= f(a) <= min(F_u - K, (p a + z q + dU) / q)``.
* a float32 requantization (onnxruntime's, ``f(a) = clamp(rne(fl32(fl32(a) m)) + z, lo, hi)``) is the same with
  ``p / q = m`` exactly, ``T`` its exact cut points (:func:`qverify.quant.f32_thresholds`) and ``[-dL / q, dU / q]``
  the exact extremes of ``f(a) - z - a m`` over its unclamped levels (:func:`qverify.quant.f32_error_bounds`: on a
  level the error is extreme at the level's ends), so the envelopes hold on ``M`` as they do for exact rounding;
* With a slope ``alpha >= 0`` a line lies below ``f`` on a level iff it does at the level's right end; so it
  lies below ``f`` on the integers of ``[l, u]`` if it lies below the exact levels at their right ends, and
  below the convex lower envelope of ``M`` at ``T(F_l + K)``, at ``k0 = floor(((F_l + K - z) q + dL) / p)``
  (last point where the constant ``F_l + K`` is the larger), at ``k0 + 1`` and at ``T(F_u - K + 1) - 1``
  (those inside ``M``) - on each piece the difference is linear, so its maximum is at the piece's ends. (A
  value skipped by ``f`` gives an empty level whose "end" carries a weaker, implied constraint.) Symmetrically
  for the upper line with the levels' left ends and the concave upper envelope. So
  ``beta_L = min_k (V_k - alpha x_k)`` over ``2K + 4`` vertices ``(x_k, V_k)``, ``beta_U = max_k (...)``.
* The slope is chosen (in float64, any choice is sound) among ``0``, ``p / q`` and the chords of vertex pairs
  to maximise the lower line (minimise the upper line) at the middle of ``[l, u]`` - DeepPoly's minimal-area
  heuristic. It is then rounded to ``A / 2^t`` (a float64), and ``beta`` is computed *exactly* (Python integers,
  every vertex value is a rational with denominator ``q``) for that slope and rounded outward (down for the lower
  line, up for the upper) to a multiple of ``2^-tb`` that is a float64. So every line is exactly valid.

A :class:`~qverify.network.Clamp` is the same with ``p = q = 1``, ``z = 0``, no rounding error.

**Back-substitution.** To bound ``c . v_K`` (a row over layer ``K``'s values) from below: keep a row ``lam`` over
the values ``v_k`` of the current layer and a constant ``C`` with ``c . v_K >= lam . v_k + C`` for every
feasible input. Through an activation ``v_k = f(v_{k-1})``: positive coefficients take the lower line, negative
ones the upper line: ``lam . v_k >= mu . v_{k-1} + nu``, ``mu = lam+ alpha_L + lam- alpha_U``,
``nu = lam+ . beta_L + lam- . beta_U``. Through an affine layer ``v_k = W v_{k-1} + b``:
``lam . v_k = (lam W) . v_{k-1} + lam . b`` (a convolution's ``lam W`` is its transpose, one BLAS contraction
per kernel offset; the padded cells are constants folded into ``b``). At the
input box: ``lam . x >= lam+ . lo + lam- . hi``; after each affine step the row is also concretised over that
layer's own bounds (as DeepPoly does) and the best bound is kept, so a layer's symbolic bound is never worse
than its interval step from the layer below. Intermediate layers are bounded the same way (rows ``+-e_j``,
DeepPoly's full back-substitution to the input), then intersected with the interval bounds (both sound); an
activation's output bounds are ``[f(l), f(u)]`` of its tightened input bounds.

**Soundness of the float64 arithmetic (the proof).** ``lam``, ``C`` are float64; instead of exact values we keep
a float ``s >= 0`` such that the *exact* valid constant is at least ``C~ - 2 s``. With ``u = 2^-53`` and
``g(n) = (n + 1) 2^-52 >= n u / (1 - n u)`` (Higham, Thm. 3.5: ``|fl(x.y) - x.y| <= g(n) |x|.|y|`` for
any summation order, FMA or not, without underflow):

1. ``mu~ = fl(lam alpha)`` (one product; the other term is an exact 0): ``|mu - mu~| <= 2^-52 |mu~|``, so the
   loss ``sum |mu_j - mu~_j| |v_j| <= 2^-52 |mu~| . m`` with ``m_j = max(|l_j|, |u_j|)`` of the layer's bounds;
2. ``nu~ = fl(lam+ . beta_L + lam- . beta_U)``: error ``<= g(2n) |lam| . max(|beta_L|, |beta_U|)``;
3. ``fl(lam W)``: elementwise error ``<= g(n_out) (|lam| |W|)``, loss ``<= g(n_out) (|lam| |W|) . m``;
   ``fl(lam . b)``: ``<= g(n_out) |lam| . |b|``; the input concretisation: ``<= g(2 n_0) |lam| . m_0``;
4. every accumulation ``C~ <- fl(C~ + x)`` loses at most ``u |C~_new| <= 2^-52 |C~_new|``;
5. underflow (gradual, IEEE 754): a product errs by at most ``2^-1075`` more in absolute value, and a sum whose
   exact value is subnormal is exact. One step puts fewer than ``2^40`` products into a row's bound (dense
   ``n_out n_in``, convolutions ``n_out C kh kw``), each multiplied by a value bound
   ``m < 2^53`` at most, so underflow costs less than ``2^93 2^-1075 < 2^-980`` per step - also in the error
   estimates below, which might underflow to 0.

Each error term is a non-negative expression computed in float64 with fewer than ``2^50`` roundings on any path,
so its computed value is at least half its exact value (less the underflow of item 5); ``s`` is their float sum,
also a non-negative expression, plus ``2^-800`` per step (covering item 5): ``2 s`` bounds the total error.
Finally ``L = fl(C~ - 2 s)`` is lowered by two ulps (``fl`` of one subtraction errs by at most one ulp), and
the row's integer lower bound is ``ceil(L)`` (the bounded quantities are integers).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qverify import execute, graph
from qverify.bounds.interval import (
    INTERVAL,
    Bounds,
    check_boxes,
    interval_bounds,
    node_interval,
    property_boxes,
    refutes_each,
    row_lower_bounds,
)
from qverify.execute import requantize
from qverify.network import (
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    LinearMap,
    Lookup,
    MaxPool2d,
    Monotone,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
    Uncertain,
)
from qverify.property import Property
from qverify.quant import Rounding, f32_error_bounds, f32_thresholds, round_div

_U52 = 2.0**-52
_TINY = 2.0**-800
_MIN_SLOPE = 2.0**-100
#: largest dense matrix (entries) a convolution is materialised into for back-substitution
MAX_CONV_MATRIX = 40_000_000


#: exact error bounds of float32 requantizations, per layer (they depend on the layer only)
_F32_ERRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _gam(n: int) -> float:
    """``g(n) = (n + 1) 2^-52``, an upper bound of Higham's ``gamma_n`` (exact as a float)."""
    return (n + 1) * _U52


# ============================================================================================ rounding facts
def rounding_error_bounds(q: int, mode: Rounding | str) -> tuple[int, int]:
    """``(dL, dU)``: for every integer ``n``, ``-dL / q <= R(n / q) - n / q <= dU / q`` (tight)."""
    mode = Rounding(mode)
    q = int(q)
    if q <= 0:
        raise ValueError("q must be positive")
    if mode is Rounding.FLOOR:
        return q - 1, 0
    if mode is Rounding.HALF_UP:
        return (q + 1) // 2 - 1, q // 2
    return q // 2, q // 2  # half away from zero, half to even: symmetric, ties reach 1/2 when q is even


@dataclass(frozen=True)
class ActParams:
    """Per-neuron parameters of an activation layer (flattened neurons; Python ints in object arrays):
    ``f(a) = clamp(R(a p / q) + z, lo, hi)``, rounding error in ``[-dL / q, dU / q]``."""

    layer: Requantize | Clamp
    shape: tuple[int, ...]
    p: np.ndarray
    q: np.ndarray
    z: np.ndarray
    dL: np.ndarray
    dU: np.ndarray
    #: float32 multipliers per neuron (float32 requantizations only; ``p / q`` is their exact value)
    m32: np.ndarray | None = None

    @classmethod
    def of(cls, layer: Requantize | Clamp, shape: tuple[int, ...]) -> ActParams:
        n = int(np.prod(shape))
        if isinstance(layer, Clamp):
            one = np.ones(n, dtype=object)
            zero = np.zeros(n, dtype=object)
            return cls(layer, shape, one, one.copy(), zero, zero.copy(), zero.copy())
        per = n // shape[0] if shape else n
        chans = shape[0] if shape else 1

        def spread(vals: Sequence[int]) -> np.ndarray:
            v = np.array([int(x) for x in vals], dtype=object)
            if v.size == 1:
                return np.repeat(v, n)
            if v.size != chans:
                raise ValueError("per-channel parameters do not match the layer shape")
            return np.repeat(v, per)

        if layer.float32_scale is not None:
            return cls._of_float32(layer, shape, spread)
        errs = [rounding_error_bounds(d, layer.rounding) for d in layer.den]
        return cls(layer, shape, spread(layer.num), spread(layer.den), spread(layer.zero_point.tolist()),
                   spread([e[0] for e in errs]), spread([e[1] for e in errs]))

    @classmethod
    def _of_float32(cls, layer: Requantize, shape: tuple[int, ...], spread: Callable) -> ActParams:
        """A float32 requantization: ``p / q`` the exact value of ``m_c``, and the error of ``f`` against the line
        ``a p / q + z`` on the unclamped levels, exactly (:func:`qverify.quant.f32_error_bounds`, per channel)."""
        c = max(len(layer.num), layer.zero_point.size)
        ms = [layer.float32_scale[k if len(layer.float32_scale) > 1 else 0] for k in range(c)]
        zs = [int(layer.zero_point[k if layer.zero_point.size > 1 else 0]) for k in range(c)]
        nums = [layer.num[k if len(layer.num) > 1 else 0] for k in range(c)]
        dens = [layer.den[k if len(layer.den) > 1 else 0] for k in range(c)]
        errs = _F32_ERRS.get(layer)
        if errs is None:
            errs = _F32_ERRS[layer] = [f32_error_bounds(m, z, layer.lo, layer.hi) for m, z in zip(ms, zs, strict=True)]
        m32 = np.repeat(np.asarray(ms, dtype=np.float32), int(np.prod(shape)) // c)
        return cls(layer, shape, spread(nums), spread(dens), spread(zs), spread([e[0] for e in errs]),
                   spread([e[1] for e in errs]), m32)

    def apply(self, a: np.ndarray) -> np.ndarray:
        """``f`` on flattened int64 values ``[B, n]`` (the executor's own requantize / clip)."""
        if isinstance(self.layer, Clamp):
            return np.clip(a, self.layer.lo, self.layer.hi)
        return requantize(self.layer, a.reshape(len(a), *self.shape)).reshape(len(a), -1)


def thresholds(params: ActParams, v: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Smallest integer ``a`` with ``f(a) >= v`` for neurons ``j`` (object arrays), for ``lo < v <= hi`` (there
    ``f(a) >= v`` iff ``R(a p / q) + z >= v``). Exact: a candidate from the rounding cut, fixed up with
    :func:`qverify.quant.round_div`."""
    v = np.asarray(v, dtype=object)
    if isinstance(params.layer, Clamp):
        return v.copy()
    if params.m32 is not None:  # float32 requantization: the exact bisection on its emulation
        t = (v - params.z[j]).astype(np.int64)
        return f32_thresholds(t, params.m32[j]).astype(object)
    p, q, z = params.p[j], params.q[j], params.z[j]
    mode = params.layer.rounding
    t = v - z
    if mode is Rounding.FLOOR:
        cand = -((-t * q) // p)
    else:
        cand = -((-(2 * t - 1) * q) // (2 * p))

    def ok(a: np.ndarray) -> np.ndarray:
        return np.asarray(round_div(a * p, q, mode) >= t, dtype=bool)

    for _ in range(64):
        bad = ~ok(cand)
        if not bad.any():
            break
        cand = np.where(bad, cand + 1, cand)
    for _ in range(64):
        lower = ok(cand - 1)
        if not lower.any():
            break
        cand = np.where(lower, cand - 1, cand)
    if not (ok(cand).all() and not ok(cand - 1).any()):  # the relaxations' validity rests on exact thresholds
        raise RuntimeError("threshold search did not converge")
    return cand


# ============================================================================================ relaxations
@dataclass
class Relaxation:
    """Lines ``aL x + bL <= f(x) <= aU x + bU`` (float64 ``[B, n]``, exactly valid on the integers of the
    pre-activation bounds)."""

    aL: np.ndarray
    bL: np.ndarray
    aU: np.ndarray
    bU: np.ndarray

    @property
    def bmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.bL), np.abs(self.bU))

    def take(self, idx: np.ndarray) -> Relaxation:
        return Relaxation(self.aL[idx], self.bL[idx], self.aU[idx], self.bU[idx])


def _chords(X: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Non-negative slopes of all vertex pairs (float, ``[N, K(K-1)/2]``; 0 where the x coincide)."""
    cols = []
    K = X.shape[1]
    for i in range(K):
        for k in range(i + 1, K):
            dx = X[:, k] - X[:, i]
            with np.errstate(divide="ignore", invalid="ignore"):
                sl = np.where(dx != 0, (V[:, k] - V[:, i]) / np.where(dx != 0, dx, 1.0), 0.0)
            cols.append(np.maximum(sl, 0.0))
    return np.stack(cols, axis=1)


def _choose_slope(X: np.ndarray, V: np.ndarray, s: np.ndarray, mid: np.ndarray, lower: bool,
                  block: int = 8192) -> np.ndarray:
    """Slope among 0, ``s`` and vertex chords maximising (lower) / minimising (upper) the line at ``mid``."""
    if len(X) > block:
        return np.concatenate([_choose_slope(X[k:k + block], V[k:k + block], s[k:k + block], mid[k:k + block],
                                             lower, block) for k in range(0, len(X), block)])
    cand = np.concatenate([np.zeros((len(X), 1)), s[:, None], _chords(X, V)], axis=1)  # [N, C]
    diff = V[:, None, :] - cand[:, :, None] * X[:, None, :]  # [N, C, K]
    beta = diff.min(axis=2) if lower else diff.max(axis=2)
    obj = cand * mid[:, None] + beta
    pick = np.argmax(obj, axis=1) if lower else np.argmin(obj, axis=1)
    return cand[np.arange(len(X)), pick]


def _to_float(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.array([n / d for n, d in zip(num.tolist(), den.tolist(), strict=True)], dtype=np.float64)


def relax(params: ActParams, l: np.ndarray, u: np.ndarray, levels: int = 3,
          vertices: dict | None = None, fit: bool = True) -> Relaxation:
    """Sound linear relaxation of ``f`` over the integers of ``[l, u]`` (int64 ``[B, n]``), see the module
    docstring. Fixed neurons (``f(l) == f(u)``) get the exact constant. ``vertices`` (a dict, optional) receives
    the unstable neurons' vertex sets: ``bi, ji`` (box, neuron), ``XL, VL, XU, VU`` (object ``[N, K]``, values
    ``V / q``), ``q`` (object ``[N]``), ``slope`` (``p / q``, float): any slope ``a >= 0`` with the offset of
    :func:`exact_lines` is a valid line (the family that :mod:`qverify.bounds.optimized` searches). ``fit=False``
    skips DeepPoly's choice of lines for the unstable neurons and gives them the constant lines ``f(l) <= f <= f(u)``
    (valid, loose: for callers that choose their own slopes from ``vertices``)."""
    fl_ = params.apply(l)
    fu = params.apply(u)
    aL = np.zeros(l.shape)
    aU = np.zeros(l.shape)
    bL = fl_.astype(np.float64)
    bU = fu.astype(np.float64)
    bi, ji = np.nonzero(fl_ != fu)
    if len(bi) == 0:
        return Relaxation(aL, bL, aU, bU)
    o = object
    L = l[bi, ji].astype(o)
    U = u[bi, ji].astype(o)
    FL = fl_[bi, ji].astype(o)
    FU = fu[bi, ji].astype(o)
    p, q, z, dL, dU = params.p[ji], params.q[ji], params.z[ji], params.dL[ji], params.dU[ji]
    K = max(1, int(levels))
    T_up = [thresholds(params, FL + k, ji) for k in range(1, K + 1)]  # T_up[k-1] = T(F_l + k)
    T_dn = [thresholds(params, FU - k, ji) for k in range(K)]  # T_dn[k] = T(F_u - k)
    yes = np.ones(len(bi), dtype=bool)
    XL, VL, okL, XU, VU, okU = [U], [FU * q], [yes], [L], [FL * q], [yes]
    for k in range(K):  # first levels F_l + k: right ends (lower), left ends (upper)
        v = FL + k
        ok = v < FU
        XL.append(np.minimum(U, T_up[k] - 1))
        VL.append(v * q)
        okL.append(ok)
        if k:
            XU.append(T_up[k - 1])
            VU.append(v * q)
            okU.append(ok)
    for k in range(K):  # last levels F_u - k (those not among the first K levels)
        v = FU - k
        ok = v >= FL + K
        if k:
            XL.append(T_dn[k - 1] - 1)
            VL.append(v * q)
            okL.append(ok)
        XU.append(np.maximum(L, T_dn[k]))
        VU.append(v * q)
        okU.append(ok | ((k == 0) & (FU < FL + K)))
    # middle levels F_l + K .. F_u - K: no clamp active, f = R(a p / q) + z, envelopes +- rounding error
    c_lo = FL + K
    c_hi = FU - K
    a = T_up[K - 1]
    b = T_dn[K - 1] - 1
    has_m = (c_lo <= c_hi) & (a <= b)

    def inside(x: np.ndarray) -> np.ndarray:
        return has_m & (a <= x) & (x <= b)

    k0 = ((c_lo - z) * q + dL) // p  # last point where the constant c_lo is above the lower envelope
    env_lo = lambda x: p * x + z * q - dL  # noqa: E731
    XL += [a, k0, k0 + 1, b]
    VL += [np.maximum(c_lo * q, env_lo(a)), c_lo * q, env_lo(k0 + 1), np.maximum(c_lo * q, env_lo(b))]
    okL += [has_m, inside(k0), inside(k0 + 1), has_m]
    k1 = ((c_hi - z) * q - dU) // p  # last point where the upper envelope is below the constant c_hi
    env_hi = lambda x: p * x + z * q + dU  # noqa: E731
    XU += [a, k1, k1 + 1, b]
    VU += [np.minimum(c_hi * q, env_hi(a)), env_hi(k1), c_hi * q, np.minimum(c_hi * q, env_hi(b))]
    okU += [has_m, inside(k1), inside(k1 + 1), has_m]

    def stack(xs: list, vs: list, oks: list) -> tuple[np.ndarray, np.ndarray]:
        X = np.stack([np.where(ok, x, xs[0]) for x, ok in zip(xs, oks, strict=True)], axis=1)
        V = np.stack([np.where(ok, v, vs[0]) for v, ok in zip(vs, oks, strict=True)], axis=1)
        return X, V

    XL_, VL_ = stack(XL, VL, okL)
    XU_, VU_ = stack(XU, VU, okU)
    if vertices is not None:
        vertices.update(bi=bi, ji=ji, XL=XL_, VL=VL_, XU=XU_, VU=VU_, q=q, slope=_to_float(p, q))
    if fit:
        lines = _fit_lines(XL_, VL_, XU_, VU_, q, _to_float(p, q), (L.astype(np.float64) + U.astype(np.float64)) / 2)
        aL[bi, ji], bL[bi, ji], aU[bi, ji], bU[bi, ji] = lines
    return Relaxation(aL, bL, aU, bU)


def _fit_lines(XL: np.ndarray, VL: np.ndarray, XU: np.ndarray, VU: np.ndarray, q: np.ndarray, slope: np.ndarray,
               mid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lines below / above vertex sets (object arrays ``[N, K]`` of Python ints; values ``V / q``): a slope chosen
    in float64 among ``0``, ``slope`` and the vertex chords (:func:`_choose_slope`, at ``mid``), rounded to
    ``A / 2^t``, and the exactly computed offset ``beta_L = min_k (V_k / q - a x_k)`` (``beta_U``: the max), rounded
    outward to a float64. Returns ``(aL, bL, aU, bU)`` float64 ``[N]``: every line is exactly valid at every
    vertex (module docstring)."""
    XLf, XUf = XL.astype(np.float64), XU.astype(np.float64)
    VLf = np.stack([_to_float(VL[:, k], q) for k in range(VL.shape[1])], axis=1)
    VUf = np.stack([_to_float(VU[:, k], q) for k in range(VU.shape[1])], axis=1)
    alo = _choose_slope(XLf, VLf, slope, mid, lower=True)
    ahi = _choose_slope(XUf, VUf, slope, mid, lower=False)
    return exact_lines(XL, VL, XU, VU, q, alo, ahi)


def exact_lines(XL: np.ndarray, VL: np.ndarray, XU: np.ndarray, VU: np.ndarray, q: np.ndarray, alo: np.ndarray,
                ahi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exactly valid lines for given float slopes ``alo, ahi >= 0`` (``[N]``, any float choice): the slopes
    rounded to ``A / 2^t``, the offsets ``beta_L = min_k (V_k / q - a x_k)`` (``beta_U``: the max) computed in
    Python integers and rounded outward to float64 (:func:`_fit_lines`). Returns ``(aL, bL, aU, bU)``."""
    o = object
    alo = np.maximum(np.asarray(alo, dtype=np.float64), 0.0)
    ahi = np.maximum(np.asarray(ahi, dtype=np.float64), 0.0)
    # round the slopes to A / 2^t (A < 2^53: exact floats); tiny slopes become 0 (no underflow later)
    amax = float(max(alo.max(), ahi.max()))
    t = 52 - math.frexp(amax)[1] if amax > 0 else 0
    A_lo = np.rint(np.ldexp(alo, t))
    A_hi = np.rint(np.ldexp(ahi, t))
    A_lo[np.ldexp(A_lo, -t) < _MIN_SLOPE] = 0
    A_hi[np.ldexp(A_hi, -t) < _MIN_SLOPE] = 0
    two_t = 2**t if t >= 0 else None

    def exact_beta(X: np.ndarray, V: np.ndarray, A: np.ndarray, lower: bool) -> np.ndarray:
        Ao = A.astype(np.int64).astype(o)[:, None]
        qq = q[:, None]
        if two_t is not None:
            num = V * two_t - Ao * X * qq  # beta candidates = num / (q 2^t)
            den = q * two_t
        else:
            sc = 2 ** (-t)
            num = V - Ao * sc * X * qq
            den = q
        num = num.min(axis=1) if lower else num.max(axis=1)
        approx = _to_float(num, den)
        big = float(np.abs(approx).max(initial=0.0))
        tb = min(60, 50 - math.frexp(big + 1.0)[1])
        if tb >= 0:
            sc = 2**tb
            k = (num * sc) // den if lower else -((-num * sc) // den)
        else:
            dd = den * 2 ** (-tb)
            k = num // dd if lower else -((-num) // dd)
        return np.ldexp(k.astype(np.float64), -tb)

    return (np.ldexp(A_lo, -t), exact_beta(XL, VL, A_lo, lower=True), np.ldexp(A_hi, -t),
            exact_beta(XU, VU, A_hi, lower=False))


# ============================================================================================ graph pieces
def conv_transpose(lam: np.ndarray, kernel: np.ndarray, layer: Conv2d, in_shape: tuple[int, ...]) -> np.ndarray:
    """The transpose of a convolution's linear part with ``kernel`` (the layer's own, or its absolute value): for
    rows ``lam`` over its output ``[N, O, OH, OW]``, the coefficients over its input ``[N, C, H, W]`` (padded cells
    are constants and dropped; :meth:`qverify.ops.Conv2d.transpose`)."""
    k = Conv2d(np.rint(kernel).astype(np.int64), np.zeros(kernel.shape[0], np.int64), layer.stride, layer.padding,
               layer.dilation, 0, groups=layer.groups)
    return k.transpose(np.asarray(lam, dtype=np.float64), [in_shape])[0]


def conv_matrix(layer: Conv2d, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A convolution as its exact integer matrix ``[out, in]`` (flattened C order) and effective bias (the bias
    plus the padded cells' constant ``pad_value`` contributions)."""
    n_in = int(np.prod(in_shape))
    n_out = int(np.prod(layer.output_shape(in_shape)))
    if n_in * n_out > MAX_CONV_MATRIX:
        raise ValueError(f"convolution too large to materialise for symbolic bounds ({n_out} x {n_in}); "
                         "use interval bounds")
    W = layer.matrices([in_shape])[0].toarray().astype(np.float64)
    return W, layer.offset([in_shape]).reshape(-1).astype(np.float64)


@dataclass
class _Linear:
    """A linear node for back-substitution: its offset (float64, exact integers) and the pull-back of rows."""

    op: LinearMap
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...]
    b: np.ndarray
    absb: np.ndarray

    @classmethod
    def of(cls, net: QNetwork, i: int) -> _Linear:
        op = net.layers[i]
        shapes = net.in_shapes(i)
        b = op.offset(shapes).reshape(-1).astype(np.float64)
        return cls(op, shapes, net.shapes[i + 1], b, np.abs(b))

    @property
    def n_out(self) -> int:
        return int(np.prod(self.out_shape))

    def back(self, lam: np.ndarray, absolute: bool = False) -> list[np.ndarray]:
        """``lam L_i`` (or ``lam |L_i|``) for rows ``lam [N, n_out]`` -> per input ``[N, n_in_i]`` (float64)."""
        parts = self.op.transpose(lam.reshape(len(lam), *self.out_shape), self.in_shapes,
                                  "abs" if absolute else "w")
        return [p.reshape(len(lam), -1) for p in parts]


@dataclass
class PoolRelaxation:
    """Max pooling relaxed per box (DeepPoly): ``y_j >= x_{cell(j, lower[j])}`` (the window cell with the largest
    lower bound) and ``y_j <= x_{cell(j, upper[j])}`` where that cell's lower bound reaches every other cell's upper
    bound (then ``y_j = x_cell`` exactly), else ``y_j <= ub[j]`` (``upper[j] = -1``, the largest upper bound).
    ``lower``, ``upper`` ``[B, n_out]`` index the window cells; ``cells [n_out, K]`` maps window cells to flat
    input positions (``-1``: padding)."""

    lower: np.ndarray
    upper: np.ndarray
    ub: np.ndarray
    cells: np.ndarray

    def take(self, idx: np.ndarray) -> PoolRelaxation:
        return PoolRelaxation(self.lower[idx], self.upper[idx], self.ub[idx], self.cells)

    @property
    def bmax(self) -> np.ndarray:
        return np.abs(self.ub)


def relax_max_pool(layer: MaxPool2d, in_shape: tuple[int, ...], l: np.ndarray, u: np.ndarray) -> PoolRelaxation:
    """:class:`PoolRelaxation` from the integer bounds ``l, u [B, n_in]`` of the pooled value."""
    cells = layer.window_indices(in_shape).reshape(-1, layer.kernel[0] * layer.kernel[1])  # [n_out, K]
    valid = cells >= 0
    safe = np.where(valid, cells, 0)
    low = np.iinfo(np.int64).min
    wl = np.where(valid[None], l[:, safe], low)  # [B, n_out, K]
    wu = np.where(valid[None], u[:, safe], low)
    kl = np.argmax(wl, axis=2)
    best_l = np.take_along_axis(wl, kl[:, :, None], axis=2)[:, :, 0]
    others_u = np.where(np.arange(cells.shape[1])[None, None, :] == kl[:, :, None], low, wu)
    exact = best_l >= others_u.max(axis=2)
    return PoolRelaxation(kl, np.where(exact, kl, -1), wu.max(axis=2).astype(np.float64), cells)


def _pool_back(rel: PoolRelaxation, lam: np.ndarray, n_in: int, sl: slice, absolute: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Pull ``lam [Bc, R, n_out]`` through a max pooling: positive coefficients to the lower cell, negative ones
    to the upper cell (or the constant ``ub``). Returns the rows over the input ``[Bc, R, n_in]`` (per window
    offset ``k`` the outputs map to distinct cells, so each offset is one scatter; at most ``K`` terms add up per
    input coefficient) and the constant ``[Bc, R]``. ``absolute``: the magnitudes of the moved terms instead
    (for the error bound)."""
    pos, neg = np.maximum(lam, 0.0), np.minimum(lam, 0.0)
    if absolute:
        neg = -neg
    lower, upper, ub = rel.lower[sl], rel.upper[sl], rel.ub[sl]
    Bc, R, _ = lam.shape
    out = np.zeros((Bc, R, n_in))
    for k in range(rel.cells.shape[1]):
        col = rel.cells[:, k]
        ok = np.nonzero(col >= 0)[0]
        if not len(ok):
            continue
        contrib = pos * (lower == k)[:, None, :] + neg * (upper == k)[:, None, :]
        out[:, :, col[ok]] += contrib[:, :, ok]
    const = _rowdot(np.where((upper < 0)[:, None, :], neg, 0.0), ub)
    return out, const


#: the refinement throughput assumed before one is measured (rows times the sizes of the values before the node,
#: per second; measured here: about 4e6 through 28x28 convolutions on one core), for ``symbolic_analysis``'s deadline
REFINE_RATE = 4e6

#: step functions with more cut points than this get constant bounds (their vertex relaxation costs ``O(K^2)``)
STEP_VERTEX_MAX = 16


def _step_relaxation(layer: Step, shape: tuple[int, ...], l: np.ndarray, u: np.ndarray) -> Relaxation:
    """Lines below and above a step function over the integers of ``[l, u]`` (int64 ``[B, n]``).

    Level ``k`` (value ``v_k``) covers ``I_k = [max(l, T_k), min(u, T_{k+1} - 1)]`` (``T_0 = -inf``,
    ``T_{K+1} = +inf``); with a slope ``a >= 0`` a line lies below ``f`` on ``I_k`` iff it does at the right end,
    and above iff at the left end. So the vertices are ``(right end of I_k, v_k)`` (lower) and ``(left end,
    v_k)`` (upper) of the nonempty levels, and :func:`_fit_lines` gives exactly valid lines (slope among 0, the
    chord ``(f(u) - f(l)) / (u - l)`` and the vertex chords). Fixed neurons (``f(l) = f(u)``) and steps with more
    than :data:`STEP_VERTEX_MAX` cut points get the constants ``f(l) <= f(x) <= f(u)``."""
    rel = _constant_relaxation(layer, shape, l, u)
    if layer.cuts.shape[1] > STEP_VERTEX_MAX:
        return rel
    fl_, fu = rel.bL, rel.bU
    bi, ji = np.nonzero(fl_ != fu)
    if len(bi) == 0:
        return rel
    o = object
    n = l.shape[1]
    per = n // layer.channels
    cuts = layer.cuts[ji // per if layer.channels > 1 else np.zeros(len(ji), np.int64)].astype(o)  # [N, K]
    K = cuts.shape[1]
    L, U = l[bi, ji].astype(o), u[bi, ji].astype(o)
    FL, FU = fl_[bi, ji].astype(np.int64).astype(o), fu[bi, ji].astype(np.int64).astype(o)
    levels = [int(v) for v in layer.levels]
    lefts = [L] + [np.maximum(L, cuts[:, k]) for k in range(K)]
    rights = [np.minimum(U, cuts[:, k] - 1) for k in range(K)] + [U]
    ok = [lo <= hi for lo, hi in zip(lefts, rights, strict=True)]
    ones = np.ones(len(bi), dtype=o)

    def stack(first_x: np.ndarray, first_v: np.ndarray, xs: list) -> tuple[np.ndarray, np.ndarray]:
        X = np.stack([first_x] + [np.where(k_ok, x, first_x) for x, k_ok in zip(xs, ok, strict=True)], axis=1)
        V = np.stack([first_v] + [np.where(k_ok, v * ones, first_v) for v, k_ok in zip(levels, ok, strict=True)],
                     axis=1)
        return X, V

    XL, VL = stack(U, FU, rights)
    XU, VU = stack(L, FL, lefts)
    Lf, Uf = L.astype(np.float64), U.astype(np.float64)
    chord = (FU - FL).astype(np.float64) / np.maximum(Uf - Lf, 1.0)
    aL_, bL_, aU_, bU_ = _fit_lines(XL, VL, XU, VU, ones, chord, (Lf + Uf) / 2)
    rel.aL[bi, ji], rel.bL[bi, ji], rel.aU[bi, ji], rel.bU[bi, ji] = aL_, bL_, aU_, bU_
    return rel


def _constant_relaxation(layer: Step | Lookup, shape: tuple[int, ...], l: np.ndarray, u: np.ndarray) -> Relaxation:
    """A step function or a table between constants: its exact range over the integers of ``[l, u]`` (a step
    function: ``f(l) <= f(x) <= f(u)``; a table: the range-minimum and -maximum; slope 0, exact integers)."""
    lo, hi = node_rule_interval(layer, l.reshape(len(l), *shape), u.reshape(len(u), *shape))
    z = np.zeros(l.shape)
    return Relaxation(z, lo.reshape(len(l), -1).astype(np.float64), z.copy(),
                      hi.reshape(len(u), -1).astype(np.float64))


def uncertain_relaxation(layer: Uncertain, shape: tuple[int, ...], batch: int) -> Relaxation:
    """The set-valued identity: ``x - d <= y <= x + d``, the envelope of the set (exact, slope 1)."""
    d = np.broadcast_to(layer.deltas(shape).reshape(1, -1).astype(np.float64), (batch, int(np.prod(shape))))
    one = np.ones(d.shape)
    return Relaxation(one, -d.copy(), one.copy(), d.copy())


def node_rule_interval(layer: Step | Lookup, l: np.ndarray, u: np.ndarray) -> Bounds:
    """The interval rule of a one-input op (:data:`qverify.bounds.interval.INTERVAL`) on shaped bounds."""
    return graph.rule(INTERVAL, layer, "interval bounds")(layer, [(l, u)], [0])


# ============================================================================================ back-substitution
def _rowdot(X: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``[B, R, n] . [B, n] -> [B, R]``."""
    return np.matmul(X, v[:, :, None])[:, :, 0]


def _concretize(lam: np.ndarray, c: np.ndarray, s: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                m: np.ndarray) -> np.ndarray:
    """Rigorous float lower bound of ``lam . v + C`` over the box ``lo <= v <= hi`` (``|v| <= m``), given the
    float constant ``c`` and slack ``s`` (items 3, 4 of the module docstring, then ``fl(C~ - 2 s)`` lowered
    by two ulps)."""
    return _concretize_all([(lam, lo, hi, m)], c, s)


def _concretize_all(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], c: np.ndarray,
                    s: np.ndarray) -> np.ndarray:
    """:func:`_concretize` of ``sum_v lam_v . v + C`` over several values' boxes (the rows pending at a cut of
    the graph): ``C + sum_v (lam_v+ . lo_v + lam_v- . hi_v)``, each value's dot product with its own error."""
    r = c.copy()
    for lam, lo, hi, m in rows:
        n = lam.shape[2]
        r = r + (_rowdot(np.maximum(lam, 0.0), lo.astype(np.float64))
                 + _rowdot(np.minimum(lam, 0.0), hi.astype(np.float64)))
        s = s + _gam(2 * n) * _rowdot(np.abs(lam), m) + _U52 * np.abs(r) + _TINY
    low = r - 2.0 * s
    return np.nextafter(np.nextafter(low, -np.inf), -np.inf)


def _backsub_lower(net: QNetwork, top: int, lam: np.ndarray, flat: list[Bounds], mags: list[np.ndarray],
                   relax_of: dict[int, Relaxation | PoolRelaxation], sl: slice,
                   gamma: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Rigorous integer lower bounds ``[Bc, R]`` of ``lam . v_top`` over boxes ``sl`` (see the module
    docstring); ``lam`` float64 ``[Bc, R, n_top]`` holding exact small numbers (integers). The rows are pulled
    back through the graph (:func:`qverify.graph.backward`; rows of a value read by several nodes add up, each
    float addition's rounding charged to the slack). After every linear node the pending rows are also
    concretised over their values' bounds (as DeepPoly does, over several values at a cut of a graph); the best
    bound is returned, so the result is never worse than the interval bound one node down.

    ``gamma`` (optional, ``{value k: float64 [Bc, R, n_k]}``): Lagrange multipliers of the value's own bounds
    ``l_k <= v_k <= u_k`` (``flat[k]``; in a split domain these are the split constraints, which the input box
    alone does not imply). When the row over value ``k`` is complete it gets the term
    ``g . v_k - sum_j (g_j+ u_j + g_j- l_j)``, which is ``<= 0`` on every point whose value lies in its bounds, so
    the bound stays a lower bound (beta-CROWN's split multipliers, Wang et al., NeurIPS 2021, with one signed
    multiplier per neuron: using both sides of a neuron at once never helps). Float errors as in items 1-4:
    ``fl(lam + g)`` loses ``2^-52 |.| . m_k``, the constant ``g(n_k) |g| . m_k``."""
    Bc, R, _ = lam.shape
    st = {"c": np.zeros((Bc, R)), "s": np.zeros((Bc, R)), "best": np.full((Bc, R), -np.inf)}

    def pull(i: int, op: object, lam: np.ndarray) -> list[np.ndarray]:
        if gamma is not None and (i + 1) in gamma:
            lam = _add_split_terms(lam, gamma[i + 1], flat[i + 1], mags[i + 1], st, sl)
        return graph.rule(BACKSUB, op, "symbolic bounds")(net, i, lam, st, mags, relax_of, sl)

    def add(j: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = a + b
        st["s"] = st["s"] + _U52 * _rowdot(np.abs(out), mags[j][sl]) + _TINY
        return out

    def after(i: int, pending: dict[int, np.ndarray]) -> None:
        op = net.layers[i]
        if isinstance(op, LinearMap) and not op.movement:
            rows = [(lam_v, flat[v][0][sl], flat[v][1][sl], mags[v][sl]) for v, lam_v in pending.items()]
            st["best"] = np.maximum(st["best"], _concretize_all(rows, st["c"], st["s"]))

    left = graph.backward(net, top, lam, pull, add, after=after)
    rows = [(lam_v, flat[v][0][sl], flat[v][1][sl], mags[v][sl]) for v, lam_v in left.items()]
    best = np.maximum(st["best"], _concretize_all(rows, st["c"], st["s"]))
    return np.ceil(best)


def _add_split_terms(lam: np.ndarray, g: np.ndarray, bounds: Bounds, mag: np.ndarray, st: dict,
                     sl: slice) -> np.ndarray:
    """``lam + g`` and the constant ``-sum_j (g_j+ u_j + g_j- l_j)`` added to ``st`` with their float errors
    charged (:func:`_backsub_lower`'s ``gamma``)."""
    lo = bounds[0][sl].astype(np.float64)
    hi = bounds[1][sl].astype(np.float64)
    m = mag[sl]
    g = g[sl]
    out = lam + g
    n = lam.shape[2]
    st["c"] = st["c"] - (_rowdot(np.maximum(g, 0.0), hi) + _rowdot(np.minimum(g, 0.0), lo))
    st["s"] = (st["s"] + _U52 * _rowdot(np.abs(out), m) + _gam(2 * n) * _rowdot(np.abs(g), m)
               + _U52 * np.abs(st["c"]) + _TINY)
    return out


def _back_linear(net: QNetwork, i: int, lam: np.ndarray, st: dict, mags: list[np.ndarray],
                 relax_of: dict, sl: slice) -> list[np.ndarray]:
    """Through ``y = sum_k L_k x_k + b``: ``lam . y = sum_k (lam L_k) . x_k + lam . b``; float errors
    ``g(n_out) (|lam| |L_k|) . m_k`` and ``g(n_out) |lam| . |b|`` (item 3). Data movement copies coefficients
    (no rounding at all)."""
    lin = _linear_of(net, i)
    Bc, R, n_out = lam.shape
    flat_lam = lam.reshape(-1, n_out)
    ins = net.node_inputs(i)
    if lin.op.movement:
        st["c"] = st["c"] + lam @ lin.b if lin.b.any() else st["c"]
        if lin.b.any():
            st["s"] = st["s"] + _gam(n_out) * (np.abs(lam) @ lin.absb) + _U52 * np.abs(st["c"]) + _TINY
        return [p.reshape(Bc, R, -1) for p in lin.back(flat_lam)]
    absl = np.abs(lam)
    st["c"] = st["c"] + lam @ lin.b
    s = st["s"] + _gam(n_out) * (absl @ lin.absb) + _U52 * np.abs(st["c"]) + _TINY
    for j, back_abs in zip(ins, lin.back(absl.reshape(-1, n_out), absolute=True), strict=True):
        s = s + _gam(n_out) * _rowdot(back_abs.reshape(Bc, R, -1), mags[j][sl]) + _TINY
    st["s"] = s
    return [p.reshape(Bc, R, -1) for p in lin.back(flat_lam)]


def _back_monotone(net: QNetwork, i: int, lam: np.ndarray, st: dict, mags: list[np.ndarray],
                   relax_of: dict, sl: slice) -> list[np.ndarray]:
    """Through a relaxed activation (items 1, 2): ``lam . v >= mu . x + nu``, ``mu = lam+ aL + lam- aU``,
    ``nu = lam+ . bL + lam- . bU``."""
    rel = relax_of[i]
    (j,) = net.node_inputs(i)
    pos = np.maximum(lam, 0.0)
    neg = np.minimum(lam, 0.0)
    n = lam.shape[2]
    st["c"] = st["c"] + _rowdot(pos, rel.bL[sl]) + _rowdot(neg, rel.bU[sl])
    s = st["s"] + _gam(2 * n) * _rowdot(pos - neg, rel.bmax[sl]) + _U52 * np.abs(st["c"]) + _TINY
    mu = pos * rel.aL[sl][:, None, :] + neg * rel.aU[sl][:, None, :]
    st["s"] = s + _U52 * _rowdot(np.abs(mu), mags[j][sl]) + _TINY
    return [mu]


def _back_max_pool(net: QNetwork, i: int, lam: np.ndarray, st: dict, mags: list[np.ndarray],
                   relax_of: dict, sl: slice) -> list[np.ndarray]:
    """Through max pooling (:class:`PoolRelaxation`): coefficients move to one cell each (exact products by 1;
    at most ``K`` (window cells) terms add up per input coefficient) and constant-bounded neurons go to ``C``."""
    rel = relax_of[i]
    (j,) = net.node_inputs(i)
    n_in = mags[j].shape[1]
    mu, const = _pool_back(rel, lam, n_in, sl)
    n_out = lam.shape[2]
    st["c"] = st["c"] + const
    mu_abs, _ = _pool_back(rel, lam, n_in, sl, absolute=True)
    st["s"] = (st["s"] + _gam(2 * n_out) * _rowdot(np.abs(lam), rel.bmax[sl]) + _U52 * np.abs(st["c"])
               + _gam(rel.cells.shape[1]) * _rowdot(mu_abs, mags[j][sl]) + _TINY)
    return [mu]


#: back-substitution's table: how rows are pulled back through each op type
BACKSUB: dict[type, Callable] = {Dense: _back_linear, Conv2d: _back_linear, SumPool2d: _back_linear,
                                 Add: _back_linear, Flatten: _back_linear, Reshape: _back_linear,
                                 Transpose: _back_linear, Pad: _back_linear, Concat: _back_linear,
                                 Requantize: _back_monotone, Clamp: _back_monotone, Step: _back_monotone,
                                 Lookup: _back_monotone, MaxPool2d: _back_max_pool, Uncertain: _back_monotone}

_LINEARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_of(net: QNetwork, i: int) -> _Linear:
    cache = _LINEARS.setdefault(net, {})
    if i not in cache:
        cache[i] = _Linear.of(net, i)
    return cache[i]


# ============================================================================================ analysis
@dataclass
class SymbolicAnalysis:
    """Result of :func:`symbolic_analysis` for a batch of ``B`` boxes.

    ``bounds``: per value index (as :func:`qverify.execute.execute`), the tightened ``(lo, hi)`` int64
    ``[B, *shape]`` (intersection of symbolic and interval bounds); ``interval``: the interval bounds;
    ``symbolic_only``: the pure back-substitution bounds of the affine layers that were refined (flattened
    ``[B, n]``; ``refined`` marks the neurons that were, the others hold ``-+2^62``).
    """

    net: QNetwork
    bounds: list[Bounds]
    interval: list[Bounds]
    relaxations: dict[int, Relaxation]
    symbolic_only: dict[int, Bounds] = field(default_factory=dict)
    refined: dict[int, np.ndarray] = field(default_factory=dict)
    chunk: int = 64
    #: hidden nodes left unrefined because the deadline would have passed (:func:`symbolic_analysis`)
    skipped_refinements: int = 0

    @property
    def num_boxes(self) -> int:
        return len(self.bounds[0][0])

    def _flat(self) -> tuple[list[Bounds], list[np.ndarray]]:
        B = self.num_boxes
        flat = [(lo.reshape(B, -1), hi.reshape(B, -1)) for lo, hi in self.bounds]
        mags = [np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64) for lo, hi in flat]
        return flat, mags

    def row_lower_bounds(self, rows: np.ndarray, value_index: int | None = None) -> np.ndarray:
        """Integer lower bounds ``[B, R]`` of ``rows . v`` (``rows`` int ``[R, n]`` shared by all boxes, or
        ``[B, R, n]``) for the values ``v`` of ``value_index`` (default: the output); the better of the
        symbolic and the interval bound of each row. int64, or Python ints (object) when int64 could overflow.
        Rows with a coefficient of magnitude ``>= 2^53`` (not exact in float64) get the interval bound only."""
        k = len(self.net.layers) if value_index is None else value_index
        rows = np.asarray(rows, dtype=np.int64)
        B = self.num_boxes
        if rows.ndim == 2:
            rows = np.broadcast_to(rows, (B, *rows.shape))
        flat, mags = self._flat()
        ivl = (np.stack([row_lower_bounds(rows[i], flat[k][0][i:i + 1], flat[k][1][i:i + 1])[0]
                         for i in range(B)]) if B else np.zeros(rows.shape[:2], dtype=np.int64))
        exact = np.abs(rows).max(axis=2, initial=0) < 2**53  # [B, R]
        rows_f = np.where(exact[:, :, None], rows, 0).astype(np.float64)
        sym = np.empty(rows.shape[:2])
        for s0 in range(0, B, self.chunk):
            sl = slice(s0, min(B, s0 + self.chunk))
            sym[sl] = _backsub_lower(self.net, k, rows_f[sl], flat, mags, self.relaxations, sl)
        sym[~exact] = -np.inf
        if ivl.dtype != object and np.all(np.abs(sym[np.isfinite(sym)]) < 2**62):
            return np.maximum(ivl, np.where(np.isfinite(sym), sym, -(2.0**62)).astype(np.int64))
        out = np.empty(sym.shape, dtype=object)  # exact Python ints (a ceil'ed float is an exact integer)
        for idx in np.ndindex(sym.shape):
            v = int(ivl[idx])
            out[idx] = max(v, int(sym[idx])) if np.isfinite(sym[idx]) else v
        return out

    def refutes(self, prop: Property) -> np.ndarray:
        """Boolean ``[B]``: whether each box's margin bounds refute every unsafe disjunct of ``prop`` (some row's
        lower bound above its right-hand side), i.e. :meth:`slack_lower_bounds` ``>= 1``."""
        return self.slack_lower_bounds(prop) > 0

    def slack_lower_bounds(self, prop: Property) -> np.ndarray:
        """Integer lower bounds ``[B]`` of the least :meth:`~qverify.property.Property.slack` over each box,

            min_d max_k (L_dk - b_dk)  <=  min_{x in box} min_d max_k (A_d y(x) - b_d)_k,

        with ``L_dk`` the lower bound of the row ``A_dk . y`` (:meth:`row_lower_bounds`; all rows in one batched
        back-substitution): a lower bound of a maximum is the maximum of the lower bounds."""
        rows = np.concatenate([c.A for c in prop.unsafe])
        low = self.row_lower_bounds(rows)
        per, start = [], 0
        for conj in prop.unsafe:
            k = conj.A.shape[0]
            per.append(np.max(low[:, start:start + k] - conj.b[None, :], axis=1))
            start += k
        return np.min(np.stack(per, axis=1), axis=1)

    def fixed_counts(self, which: str = "bounds") -> dict[int, np.ndarray]:
        """Per activation layer index: the number of fixed neurons (``lo == hi``) of each box, ``[B]``;
        ``which`` is ``"bounds"`` (tightened) or ``"interval"``."""
        src = self.bounds if which == "bounds" else self.interval
        B = self.num_boxes
        out = {}
        for i in self.relaxations:
            if isinstance(self.net.layers[i], Monotone):
                lo, hi = src[i + 1]
                out[i] = (lo.reshape(B, -1) == hi.reshape(B, -1)).sum(axis=1)
        return out


def _needs_symbolic(net: QNetwork, i: int) -> bool:
    """Whether a linear node can gain from back-substitution: some earlier node computes (is not data movement),
    and the node is not diagonal (:func:`_is_diagonal`: each output a multiple of one input, whose own bounds
    are the best a relaxation of the op before it can give, so back-substitution reproduces its interval)."""
    return not _is_diagonal(net.layers[i]) and any(
        not (isinstance(layer, LinearMap) and layer.movement) for layer in net.layers[:i])


def _is_diagonal(op: object) -> bool:
    """A per-element scaling ``y_j = w_j x_j + b_j``: a square ``Dense`` with a diagonal weight, or a 1x1
    depthwise ``Conv2d`` (one input channel per output channel, stride 1, no padding)."""
    if isinstance(op, Dense):
        w = op.weight
        return w.shape[0] == w.shape[1] and not np.any(w - np.diag(np.diag(w)))
    if isinstance(op, Conv2d):
        o, cg, kh, kw = op.weight.shape
        return (cg == 1 and op.groups == o and (kh, kw) == (1, 1) and op.stride == (1, 1)
                and not any(op.padding))
    return False


def _refine_mask(net: QNetwork, i: int, il: np.ndarray, ih: np.ndarray) -> np.ndarray:
    """Neurons of linear node ``i``'s output worth refining: all, unless every reader of the value is a monotone
    activation, then only those some reader does not already fix (a fixed neuron's output is exact)."""
    consumers = net.consumers()
    readers = consumers[i + 1]
    shape = net.shapes[i + 1]
    B = len(il)
    lo_b, hi_b = il.reshape(B, *shape), ih.reshape(B, *shape)
    # a band (Uncertain) read only by monotone ops: its readers see the bounds widened by the band
    if len(readers) == 1 and isinstance(net.layers[readers[0]], Uncertain):
        band = net.layers[readers[0]]
        d = band.deltas(shape)[None]
        lo_b, hi_b = lo_b - d, hi_b + d
        readers = consumers[readers[0] + 1]
    if not readers or not all(isinstance(net.layers[r], Monotone) for r in readers):
        return np.ones(il.shape, dtype=bool)
    need = np.zeros(il.shape, dtype=bool)
    for r in readers:
        layer = net.layers[r]
        lo = execute.apply_layer(layer, lo_b).reshape(B, -1)
        hi = execute.apply_layer(layer, hi_b).reshape(B, -1)
        need |= lo != hi
    return need


def _refine(net: QNetwork, top: int, need: np.ndarray, flat: list[Bounds], mags: list[np.ndarray],
            relax_of: dict, chunk: int) -> Bounds:
    """Symbolic bounds of the neurons ``need`` (bool ``[B, n]``) of value ``top``: rows ``+e_j`` and ``-e_j``
    per needed neuron, packed per box (padded with zero rows). Others get the trivial ``(-2^62, 2^62)``."""
    B, n = need.shape
    lo_out = np.full((B, n), -(2**62), dtype=np.int64)
    hi_out = np.full((B, n), 2**62, dtype=np.int64)
    counts = need.sum(axis=1)
    order = np.argsort(~need, axis=1, kind="stable")  # needed neurons first, in index order
    widest = max((int(np.prod(s)) for s in net.shapes[:top]), default=n)
    s0 = 0
    while s0 < B:
        # boxes per chunk so that the row block [Bc, 2 Rmax, widest] stays around 4M floats
        rmax = int(counts[s0:s0 + chunk].max(initial=0))
        step = max(1, min(chunk, 4_000_000 // max(1, 2 * rmax * widest)))
        sl = slice(s0, min(B, s0 + step))
        s0 = sl.stop
        rmax = int(counts[sl].max(initial=0))
        if rmax == 0:
            continue
        Bc = sl.stop - sl.start
        J = order[sl, :rmax]  # [Bc, rmax] neuron index of each row
        valid = np.arange(rmax)[None, :] < counts[sl][:, None]
        lam = np.zeros((Bc, 2 * rmax, n))
        bb, rr = np.nonzero(valid)
        lam[bb, rr, J[bb, rr]] = 1.0
        lam[bb, rmax + rr, J[bb, rr]] = -1.0
        low = _backsub_lower(net, top, lam, flat, mags, relax_of, sl)
        gb = bb + sl.start
        lo_out[gb, J[bb, rr]] = low[bb, rr].astype(np.int64)
        hi_out[gb, J[bb, rr]] = (-low[bb, rmax + rr]).astype(np.int64)
    return lo_out, hi_out


def _relaxation(net: QNetwork, i: int, ins: list[Bounds], levels: int) -> Relaxation | PoolRelaxation:
    """The relaxation of activation node ``i`` from the (tightened, flattened) bounds of its input."""
    layer = net.layers[i]
    (l, u), = ins
    shape = net.shapes[i + 1]
    if isinstance(layer, MaxPool2d):
        return relax_max_pool(layer, net.in_shapes(i)[0], l, u)
    if isinstance(layer, Step):
        return _step_relaxation(layer, shape, l, u)
    if isinstance(layer, Lookup):
        return _constant_relaxation(layer, shape, l, u)
    if isinstance(layer, Uncertain):
        return uncertain_relaxation(layer, shape, len(l))
    return relax(ActParams.of(layer, shape), l, u, levels=levels)


def symbolic_analysis(net: QNetwork, lo: np.ndarray, hi: np.ndarray, chunk: int = 64,
                      interval: list[Bounds] | None = None, levels: int = 3,
                      intermediate: str = "symbolic", deadline: float | None = None) -> SymbolicAnalysis:
    """Symbolic bounds of every value for a batch of integer input boxes (same box format as
    :func:`qverify.bounds.interval.interval_bounds`); ``chunk`` boxes are back-substituted at a time;
    ``interval`` reuses interval bounds already computed for these boxes; ``levels``: exact levels per end in
    each relaxation (:func:`relax`). ``intermediate="interval"`` skips the back-substitution of hidden nodes
    (CROWN-IBP style: relaxations from interval bounds, symbolic bounds only for the output rows), much cheaper
    on wide convolutional networks; the default refines every hidden linear node (DeepPoly).

    Every value's bounds are the interval step from its inputs' tightened bounds intersected with the interval
    bounds and, for refined linear nodes, with the back-substitution bounds (all sound).

    ``deadline`` (a :func:`time.monotonic` time): a hidden node whose refinement, predicted from the rows per
    second of the refinements so far, would end after it is not refined (CROWN-IBP style from there on; the output
    node is always refined): the bounds stay sound, only looser, and ``skipped_refinements`` counts them."""
    if intermediate not in ("symbolic", "interval"):
        raise ValueError(f"intermediate must be 'symbolic' or 'interval', got {intermediate!r}")
    lo_a, hi_a = check_boxes(net, lo, hi)
    B = len(lo_a)
    ivb = interval_bounds(net, lo_a, hi_a) if interval is None else interval
    flat: list[Bounds] = [(lo_a.reshape(B, -1), hi_a.reshape(B, -1))]
    mags = [np.maximum(np.abs(flat[0][0]), np.abs(flat[0][1])).astype(np.float64)]
    relax_of: dict[int, Relaxation | PoolRelaxation] = {}
    sym_only: dict[int, Bounds] = {}
    refined: dict[int, np.ndarray] = {}
    n = len(net.layers)
    later_act = [any(not isinstance(layer, LinearMap) for layer in net.layers[i + 1:]) for i in range(n)]
    rate = {"work": 0.0, "seconds": 0.0, "skipped": 0}

    def affordable(i: int, need: np.ndarray) -> bool:
        """Whether refining node ``i`` (rows times the sizes of the values before it) fits before ``deadline``."""
        if deadline is None or i == n - 1 or not later_act[i]:
            return True
        work = float(need.sum()) * float(sum(int(np.prod(sh)) for sh in net.shapes[:i + 1]))
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        per = rate["seconds"] / rate["work"] if rate["seconds"] > 0 and rate["work"] > 0 else 1 / REFINE_RATE
        return work * per <= left

    def step(i: int, layer: object, ins: list[Bounds]) -> Bounds:
        il, ih = ivb[i + 1]
        il, ih = il.reshape(B, -1), ih.reshape(B, -1)
        shaped = [(a.reshape(B, *s), b.reshape(B, *s)) for (a, b), s in zip(ins, net.in_shapes(i), strict=True)]
        tl, th = node_interval(net, i, shaped)
        nl, nh = np.maximum(tl.reshape(B, -1), il), np.minimum(th.reshape(B, -1), ih)
        if not isinstance(layer, LinearMap):
            relax_of[i] = _relaxation(net, i, ins, levels)
        elif (not layer.movement and _needs_symbolic(net, i)
              and not (intermediate == "interval" and i < n - 1 and later_act[i])):
            need = _refine_mask(net, i, nl, nh)
            if affordable(i, need):
                t0 = time.monotonic()
                sl_lo, sl_hi = _refine(net, i + 1, need, flat, mags, relax_of, chunk)
                rate["seconds"] += time.monotonic() - t0
                rate["work"] += float(need.sum()) * float(sum(int(np.prod(sh)) for sh in net.shapes[:i + 1]))
                sym_only[i + 1] = (sl_lo, sl_hi)
                refined[i + 1] = need
                nl, nh = np.maximum(sl_lo, nl), np.minimum(sl_hi, nh)
            else:
                rate["skipped"] += 1
        flat.append((nl, nh))
        mags.append(np.maximum(np.abs(nl), np.abs(nh)).astype(np.float64))
        return nl, nh

    graph.forward(net, flat[0], step)
    bounds = [(fl_.reshape(B, *shape), fh.reshape(B, *shape))
              for (fl_, fh), shape in zip(flat, net.shapes, strict=True)]
    return SymbolicAnalysis(net, bounds, ivb, relax_of, sym_only, refined, chunk, int(rate["skipped"]))


def symbolic_bounds(net: QNetwork, lo: np.ndarray, hi: np.ndarray, chunk: int = 64,
                    intermediate: str = "symbolic") -> list[Bounds]:
    """Tightened per-layer bounds, same format as :func:`qverify.bounds.interval.interval_bounds` (one
    ``(lo, hi)`` int64 ``[B, *shape]`` pair per value index): the intersection of the symbolic and the interval
    bounds. Use them for fixed neurons and tight domains in the exact encodings."""
    return symbolic_analysis(net, lo, hi, chunk, intermediate=intermediate).bounds


def _spec_rows(props: Sequence[Property], n_out: int) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """Stack every property's unsafe rows (padded with zero rows): ``[P, R, n_out]`` and, per property, the
    ``(start, stop)`` row range of each disjunct."""
    spans, counts = [], []
    for p in props:
        k, sp = 0, []
        for conj in p.unsafe:
            sp.append((k, k + conj.A.shape[0]))
            k += conj.A.shape[0]
        spans.append(sp)
        counts.append(k)
    rows = np.zeros((len(props), max(counts, default=0), n_out), dtype=np.int64)
    for i, p in enumerate(props):
        if counts[i]:
            rows[i, :counts[i]] = np.concatenate([c.A for c in p.unsafe])
    return rows, spans


def certified_by_symbolic(net: QNetwork, props: Property | Sequence[Property],
                          boxes: tuple[np.ndarray, np.ndarray] | None = None, chunk: int = 64,
                          intermediate: str = "symbolic", deadline: float | None = None,
                          keep: dict[int, tuple[list[tuple[np.ndarray, np.ndarray]], int]] | None = None
                          ) -> np.ndarray:
    """Decide properties from symbolic margin bounds (``True``: proved; ``False``: undecided). Bounds each unsafe
    row ``a . y`` directly by back-substitution through ``a`` (plus the interval bound, the better one), and
    a disjunct ``A y <= b`` is infeasible when some row's lower bound exceeds ``b``. Same call forms as
    :func:`qverify.bounds.interval.certified_by_interval` (many properties, or one property on sub-boxes).

    On a graph network (not a chain) with ``intermediate="symbolic"`` the cheap CROWN-IBP pass
    (``intermediate="interval"``) runs first and the full one only on what it leaves; ``deadline`` bounds the full
    pass's refinements (:func:`symbolic_analysis`).

    ``keep`` (a dict, filled in): for each property left undecided by a final pass that skipped no refinement,
    ``keep[i] = (bounds, lower)``: its box's tightened per-value bounds (``(lo, hi)`` per value index, the
    format of :func:`symbolic_bounds` for one box) and the slack lower bound ``min_d max_k (L_dk - b_dk)``
    (:meth:`SymbolicAnalysis.slack_lower_bounds`), what a later exact stage would otherwise recompute."""
    plist, lo, hi = property_boxes(net, props, boxes)
    if not plist:
        return np.zeros(0, dtype=bool)
    if intermediate == "symbolic" and not net.is_chain:
        done = _certified(net, plist, lo, hi, chunk, "interval", None)
        rest = np.nonzero(~done)[0]
        if len(rest):
            sub: dict | None = {} if keep is not None else None
            done[rest] = _certified(net, [plist[i] for i in rest], lo[rest], hi[rest], chunk, "symbolic", deadline,
                                    sub)
            if keep is not None and sub:
                keep.update({int(rest[k]): v for k, v in sub.items()})
        return done
    return _certified(net, plist, lo, hi, chunk, intermediate, deadline, keep)


def _certified(net: QNetwork, plist: list, lo: np.ndarray, hi: np.ndarray, chunk: int, intermediate: str,
               deadline: float | None, keep: dict | None = None) -> np.ndarray:
    ana = symbolic_analysis(net, lo, hi, chunk, intermediate=intermediate, deadline=deadline)
    out_lo, out_hi = ana.bounds[-1]
    # cheap first: properties the tightened output intervals already decide
    done = refutes_each(plist, out_lo, out_hi)
    todo = np.nonzero(~done)[0]
    if len(todo) == 0:
        return done
    rows, spans = _spec_rows([plist[i] for i in todo], net.num_outputs)
    sub = SymbolicAnalysis(net, [(lo_[todo], hi_[todo]) for lo_, hi_ in ana.bounds],
                           [(lo_[todo], hi_[todo]) for lo_, hi_ in ana.interval],
                           {k: r.take(todo) for k, r in ana.relaxations.items()}, chunk=chunk)
    low = sub.row_lower_bounds(rows)
    for t, i in enumerate(todo):
        p = plist[i]
        ok = True
        for conj, (a, b) in zip(p.unsafe, spans[t], strict=True):
            if not np.any(low[t, a:b] > conj.b):
                ok = False
                break
        done[i] = ok
        if not ok and keep is not None and intermediate == "symbolic" and ana.skipped_refinements == 0:
            per = [int(np.max(low[t, a:b] - conj.b)) for conj, (a, b) in zip(p.unsafe, spans[t], strict=True)]
            keep[int(i)] = ([(lo_[i], hi_[i]) for lo_, hi_ in ana.bounds], min(per))
    return done
