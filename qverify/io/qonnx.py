"""QONNX (the FINN / Brevitas dialect of ONNX): ``Quant``, ``BipolarQuant`` and ``Trunc`` nodes, imported exactly.

QONNX writes quantization as float-to-float operators of the domain ``qonnx.custom_op.general`` (older files:
``finn.custom_op.general``, ``onnx.brevitas``) around ordinary float ``Conv``/``Gemm``/``MatMul``/``Relu``/``MaxPool``/
``AveragePool`` nodes. Their meaning is the reference implementation in the ``qonnx`` package
(``qonnx/custom_op/general/intquant.py``, ``bipolar_quant.py``, ``trunc.py``), which qverify states over the exact
rationals (every scale is a float32, a dyadic rational; ``encodings/brevitas_import.md`` has the equations):

* ``Quant(x, s, z, b)`` (attributes ``signed``, ``narrow``, ``rounding_mode``)::

      y = clamp(R(x / s + z), m_lo, m_hi),   Quant(x) = s (y - z)

  with ``m_lo = -2^(b-1) + narrow`` (signed) or ``0``, ``m_hi = 2^(b-1) - 1`` (signed) or ``2^b - 1 - narrow``, and
  ``R`` the rounding mode (``ROUND`` = ``HALF_EVEN``, ``FLOOR``, ``CEIL``, ``UP``, ``DOWN``, ``HALF_UP`` = half away
  from zero, ``HALF_DOWN`` = half toward zero); the clamp before the rounding (as qonnx computes it) is the same
  since the bounds are integers. ``b = 1``, ``signed = 1`` is ``y = +1 if x / s + z >= 0 else -1``.
* ``BipolarQuant(x, s)``: ``s * (+1 if x >= 0 else -1)``.
* ``Trunc(x, s, z, b_in, s_out, b_out)`` (opset 2; attributes ``rounding_mode`` default ``FLOOR``, ``signed``,
  ``narrow``)::

      t = R_half_even(x / s + z),   T = 2^round(log2(s_out / s)),   y = clamp(R(t / T), m_lo, m_hi),
      Trunc(x) = s_out (y - z / T)

  (opset 1: ``y = R(t / 2^(b_in - b_out))`` without the clamp, ``Trunc(x) = s (y - z)``).

Each becomes integer ops of the :class:`~qverify.network.QNetwork`:

* on a constant (weights, a quantized bias): the exact integers ``y`` (a dequantized constant ``s (y - z)``);
* on the float graph input: the network's input grid ``[m_lo, m_hi]`` with ``(s, z)`` and the rounding mode;
* on an accumulator ``real_c = M_c (acc_c + r_c)`` (a ``Conv``/``Gemm`` of quantized values; ``r_c`` the fraction of
  an accumulator unit of a float bias, kept exactly: ``c_c / M_c = B_c + r_c`` with the integer ``B_c`` in the
  layer's bias) or on a quantized activation ``real = s_x (q - z_x)``: the non-decreasing integer function
  ``y(a) = clamp(R(m_c (a + o_c) + z), lo', hi')`` with ``m_c = M_c / s`` (``s_x / s``), ``o_c = r_c`` (``-z_x``)
  and ``[lo', hi']`` the range narrowed by a pending ``Relu``/``Clip`` ``[α, β]`` (``lo' = max(m_lo, R(α / s + z))``,
  ``hi' = min(m_hi, R(β / s + z))``). It is a :class:`~qverify.network.Requantize` where that op states it
  (no fraction ``o_c``, and ``R(v + z) = R(v) + z``: ``z = 0``, or ``FLOOR``, or ``HALF_EVEN`` with ``z`` even)
  and otherwise a :class:`~qverify.network.Step` with its exact cut points: ``R(t) >= v`` iff ``t >= β_v`` (or
  ``t > β_v``, by the mode's tie rule), so ``y(a) >= v`` iff ``a >= C(v) = ceil((β_v - z) / m_c - o_c)`` (or
  ``floor(...) + 1``);
* ``Trunc`` of an accumulator (a ``TruncAvgPool2d``: ``AveragePool`` then ``Trunc``): the same, through both
  roundings (``C(v)`` = the least ``a`` whose ``t`` reaches the least ``t`` with ``R(t / T) >= v``);
* ``BipolarQuant`` (or 1-bit signed ``Quant``) of an *exactly integer* accumulator or activation (no float operator
  in between: no float bias, no ``BatchNormalization``): the threshold ``acc >= 0`` (``q >= z_x``), a ``Step`` to
  ``-1, +1``. Of a float value (a float bias, ``BatchNormalization``, ``Mul``/``Add`` of float constants before it,
  or the float graph input) it is a float32 threshold, which this importer refuses
  (:meth:`QonnxOps.bipolar_of_float`: the hook for binarized networks).

Replay: :func:`qonnx_integer_outputs` runs the original file on ``qonnx.core.onnx_exec.execute_onnx`` (QONNX's own
runtime), registered with :mod:`qverify.replay` as the runtime of ``format = "qonnx"`` networks.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from qverify.network import Clamp, QNetwork, Requantize, Step
from qverify.quant import Rounding
from qverify.replay import RuntimeReplay, register_runtime

#: the domains QONNX custom operators are written in (current qonnx, FINN, early Brevitas)
QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "finn", "onnx.brevitas")
#: QONNX rounding modes (``resolve_rounding_mode`` of qonnx) that qverify's Requantize states as they are
_AS_ROUNDING = {"ROUND": Rounding.HALF_EVEN, "HALF_EVEN": Rounding.HALF_EVEN, "FLOOR": Rounding.FLOOR,
                "HALF_UP": Rounding.HALF_AWAY}
ROUNDING_MODES = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN")
#: cut points beyond this magnitude are beyond every accumulator the executor accepts (2^53): kept in int64
_CUT_LIMIT = 2**60
#: the most levels a Step of one requantization may have (16-bit outputs)
_MAX_LEVELS = 1 << 16


# ---------------------------------------------------------------------------------------------- exact rounding
def round_mode(t: Fraction, mode: str) -> int:
    """``R(t)`` of QONNX rounding mode ``mode`` for one exact rational (qonnx's ``resolve_rounding_mode``)."""
    fl = math.floor(t)
    frac = t - fl
    if mode in ("ROUND", "HALF_EVEN"):
        return fl + (1 if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and fl % 2) else 0)
    if mode == "FLOOR":
        return fl
    if mode == "CEIL":
        return math.ceil(t)
    if mode == "UP":  # away from zero
        return math.ceil(t) if t > 0 else fl
    if mode == "DOWN":  # toward zero
        return fl if t >= 0 else math.ceil(t)
    if mode == "HALF_UP":  # ties away from zero
        return (math.floor(t + Fraction(1, 2)) if t >= 0 else -math.floor(-t + Fraction(1, 2)))
    if mode == "HALF_DOWN":  # ties toward zero
        return (math.ceil(t - Fraction(1, 2)) if t >= 0 else -math.ceil(-t - Fraction(1, 2)))
    raise ValueError(f"unknown rounding mode {mode!r} (known: {', '.join(ROUNDING_MODES)})")


def reach(mode: str, v: int) -> tuple[Fraction, bool]:
    """``(b, closed)`` with ``R(t) >= v  <=>  t >= b`` (``closed``) or ``t > b`` (not ``closed``), for integer ``v``.

    ``HALF_EVEN``: ``b = v - 1/2``, closed iff ``v`` is even; ``FLOOR``: ``b = v``, closed; ``CEIL``: ``b = v - 1``,
    open; ``HALF_UP`` (ties away from zero): ``b = v - 1/2``, closed iff ``v > 0``; ``HALF_DOWN``: ``b = v - 1/2``,
    closed iff ``v <= 0``; ``UP``: ``v > 0``: ``b = v - 1`` open, else ``b = v`` closed; ``DOWN``: ``v > 0``:
    ``b = v`` closed, else ``b = v - 1`` open."""
    half = Fraction(v) - Fraction(1, 2)
    if mode in ("ROUND", "HALF_EVEN"):
        return half, v % 2 == 0
    if mode == "FLOOR":
        return Fraction(v), True
    if mode == "CEIL":
        return Fraction(v - 1), False
    if mode == "HALF_UP":
        return half, v > 0
    if mode == "HALF_DOWN":
        return half, v <= 0
    if mode == "UP":
        return (Fraction(v - 1), False) if v > 0 else (Fraction(v), True)
    if mode == "DOWN":
        return (Fraction(v), True) if v > 0 else (Fraction(v - 1), False)
    raise ValueError(f"unknown rounding mode {mode!r} (known: {', '.join(ROUNDING_MODES)})")


def least_reaching(mode: str, v: int, m: Fraction, c: Fraction) -> int:
    """The least integer ``a`` with ``R(m a + c) >= v`` (``m > 0``): ``ceil((b - c) / m)`` for a closed threshold,
    ``floor((b - c) / m) + 1`` for an open one (:func:`reach`)."""
    b, closed = reach(mode, v)
    x = (b - c) / m
    return math.ceil(x) if closed else math.floor(x) + 1


def quant_int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """``(min_int, max_int)`` of qonnx (``intquant.py``): signed ``[-2^(b-1) + narrow, 2^(b-1) - 1]``, unsigned
    ``[0, 2^b - 1 - narrow]``."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)


def container(lo: int, hi: int) -> int:
    """The ONNX element type whose range holds ``[lo, hi]`` (the etype qverify records for the activation)."""
    for et, (a, b) in ((2, (0, 255)), (3, (-128, 127)), (4, (0, 65535)), (5, (-32768, 32767))):
        if a <= lo and hi <= b:
            return et
    return 6


def _strict(cuts: list[int]) -> list[int]:
    """Cut points clamped to ``[-2^60, 2^60]`` (beyond every accumulator) and kept strictly increasing there."""
    out = [max(-_CUT_LIMIT, min(_CUT_LIMIT, c)) for c in cuts]
    for k in range(1, len(out)):  # only clamped ends can collide: spread them upwards
        if out[k] <= out[k - 1]:
            out[k] = out[k - 1] + 1
    return out


# ---------------------------------------------------------------------------------------------- the importer part
class QonnxOps:
    """Handlers of the QONNX operators, mixed into :class:`qverify.io.onnx._Importer` (which supplies ``get``,
    ``const``, ``append``, ``error``, ``notes``, ``layers``, ``bias_residual``...)."""

    # the attributes the importer provides (declared for the type checker only)
    node: Any
    notes: list
    layers: list
    forms: set

    # ---------------- parameters
    def qonnx_const(self, name: str, what: str) -> np.ndarray:
        v = self.const(name, what)  # type: ignore[attr-defined]
        if v is None:
            raise self.error(f"{what} is missing")  # type: ignore[attr-defined]
        return np.asarray(v)

    def qonnx_bits(self, name: str, what: str = "bit width") -> int:
        v = self.qonnx_const(name, what)
        if v.size != 1 or not np.isfinite(v).all() or float(v.ravel()[0]) != int(v.ravel()[0]):
            raise self.error(f"{what} must be one integer, got {v.ravel()[:4].tolist()}")  # type: ignore
        b = int(v.ravel()[0])
        if not 1 <= b <= 32:
            raise self.error(f"{what} {b} is outside 1..32")  # type: ignore[attr-defined]
        return b

    def qonnx_mode(self, default: str = "ROUND") -> str:
        mode = str(self.attr("rounding_mode", default)).upper()  # type: ignore[attr-defined]
        if mode not in ROUNDING_MODES:
            raise self.error(f"unknown rounding_mode {mode!r} (qonnx knows {', '.join(ROUNDING_MODES)})")  # type: ignore
        return mode

    def qonnx_scalar(self, name: str, what: str, positive: bool = True) -> Fraction:
        from qverify.io.onnx import _frac

        v = self.qonnx_const(name, what)
        if v.size != 1:
            raise self.error(f"{what} must be one value (per tensor) here, got shape {v.shape}")  # type: ignore
        f = _frac(v.ravel()[0])
        if positive and f <= 0:
            raise self.error(f"{what} must be positive, got {float(f)!r}")  # type: ignore[attr-defined]
        return f

    def qonnx_zero_point(self, name: str) -> int:
        z = self.qonnx_scalar(name, "zero point", positive=False)
        if z.denominator != 1:
            raise self.error(f"zero point {float(z)!r} is not an integer: no integer grid")  # type: ignore
        return int(z)

    # ---------------- Quant
    def op_Quant(self, node: Any) -> Any:
        """QONNX ``Quant(x, scale, zeropt, bitwidth)``; see the module docstring."""
        from qverify.io.onnx import _Acc, _Const, _Input, _kind, _Real

        self.forms.add("QONNX")
        x = self.get(node.input[0])  # type: ignore[attr-defined]
        bits = self.qonnx_bits(node.input[3])
        signed = bool(int(self.attr("signed", 1)))  # type: ignore[attr-defined]
        narrow = bool(int(self.attr("narrow", 0)))  # type: ignore[attr-defined]
        mode = self.qonnx_mode()
        if isinstance(x, _Const):
            return self.quant_constant(node, x.value, bits, signed, narrow, mode)
        s = self.qonnx_scalar(node.input[1], "activation scale")
        z = self.qonnx_zero_point(node.input[2])
        if bits == 1 and signed:
            if z != 0:
                raise self.error("1-bit signed Quant with a non-zero zero point is not supported")  # type: ignore
            return self.bipolar(node, x, s)
        lo, hi = quant_int_range(bits, signed, narrow)
        if isinstance(x, _Input):
            return self.quant_input_grid(x, s, z, lo, hi, mode)
        if isinstance(x, _Acc):
            return self.quant_acc(x, s, z, lo, hi, mode, node.name)
        if isinstance(x, _Real):
            return self.quant_real(x, s, z, lo, hi, mode, node.name)
        raise self.error(f"Quant of {_kind(x)} is not supported")  # type: ignore[attr-defined]

    def quant_constant(self, node: Any, w: np.ndarray, bits: int, signed: bool, narrow: bool, mode: str) -> Any:
        """``Quant`` of a float constant (weights, a bias): the exact integers ``y = clamp(R(w / s + z))`` per element
        (per-tensor or broadcast per-channel ``s``, ``z``), a dequantized constant ``s (y - z)``."""
        from qverify.io.onnx import _ConstDQ, _frac

        w = np.asarray(w, dtype=np.float64)
        try:
            s = np.broadcast_to(self.qonnx_const(node.input[1], "scale").astype(np.float64), w.shape)
            z = np.broadcast_to(self.qonnx_const(node.input[2], "zero point").astype(np.float64), w.shape)
        except ValueError:
            raise self.error(f"scale / zero point do not broadcast to the constant's shape {w.shape}") from None  # type: ignore
        if np.any(s <= 0) or not np.all(np.isfinite(s)):
            raise self.error("Quant scales must be positive and finite")  # type: ignore[attr-defined]
        if np.any(z != np.round(z)):
            raise self.error("Quant zero points must be integers")  # type: ignore[attr-defined]
        if bits == 1 and signed:
            q = np.where(w / s + z >= 0, 1, -1).astype(np.int64)  # qonnx: y >= 0 (float, as it computes)
            exact = [1 if _frac(a) / _frac(b) + int(c) >= 0 else -1 for a, b, c in
                     zip(w.ravel(), s.ravel(), z.ravel(), strict=True)]
            q = np.array(exact, dtype=np.int64).reshape(w.shape)
        else:
            lo, hi = quant_int_range(bits, signed, narrow)
            flat = [min(hi, max(lo, round_mode(_frac(a) / _frac(b) + int(c), mode)))
                    for a, b, c in zip(w.ravel(), s.ravel(), z.ravel(), strict=True)]
            q = np.array(flat, dtype=np.int64).reshape(w.shape)
        dtype = f"{'int' if signed else 'uint'}{bits}"
        return _ConstDQ(q, np.array(s), z.astype(np.int64), node.name, dtype, node.input[0])

    def quant_input_grid(self, x: Any, s: Fraction, z: int, lo: int, hi: int, mode: str) -> Any:
        """``Quant`` of the float graph input: the network's input grid ``[lo, hi]`` with ``(s, z)``; the input
        rounding is the mode (``R(x / s + z)``: one of qverify's roundings, and the zero point must not move ties:
        ``z = 0``, ``FLOOR``, or ``HALF_EVEN`` with ``z`` even)."""
        from qverify.io.onnx import _Quant, _Real

        if self.layers or getattr(self, "input_scale", None) is not None:
            raise self.error("the float input is quantized twice")  # type: ignore[attr-defined]
        rounding = _AS_ROUNDING.get(mode)
        if rounding is None or not self.shift_free(mode, z):
            raise self.error(f"input Quant with rounding_mode {mode} and zero point {z}: the input grid mapping "
                             f"R(x / s + z) is not one of qverify's input roundings")  # type: ignore[attr-defined]
        self.input_lo, self.input_hi = lo, hi
        self.input_scale, self.input_zero_point = s, z
        self.input_rounding = rounding
        shape0 = x.base if x.pending else x.shape
        self.net_input_shape = shape0
        q = _Quant(0, shape0, lo, hi, s, z, container(lo, hi))
        for op, shape in x.pending:
            q = self.move_act(q, op, shape)  # type: ignore[attr-defined]
        return _Real(q, s, z)

    @staticmethod
    def shift_free(mode: str, z: int) -> bool:
        """Whether ``R(v + z) = R(v) + z`` for every real ``v``: ``z = 0``, ``FLOOR``/``CEIL``, or a half-to-even
        rounding with an even ``z``."""
        return z == 0 or mode in ("FLOOR", "CEIL") or (mode in ("ROUND", "HALF_EVEN") and z % 2 == 0)

    def clip_levels(self, clip: tuple, s: Fraction, z: int, lo: int, hi: int, mode: str) -> tuple[int, int]:
        """``[lo, hi]`` narrowed by a pending real clip ``[α, β]``: ``R`` is non-decreasing, so
        ``R(clip(v, α, β) / s + z) = clip(R(v / s + z), R(α / s + z), R(β / s + z))``."""
        a, b = clip
        if a is not None:
            lo = max(lo, round_mode(a / s + z, mode))
        if b is not None:
            hi = min(hi, round_mode(b / s + z, mode))
        if lo > hi:
            raise self.error(f"the clip interval leaves no integer output (range [{lo}, {hi}])")  # type: ignore
        return lo, hi

    def residual_of(self, acc: Any) -> list[Fraction] | None:
        """The exact fractions ``r_c`` of a float bias folded into ``acc``'s layer (``None``: none recorded)."""
        res = getattr(self, "bias_residual", {}).get(acc.pos)
        if res is None or not any(res):
            return None
        return list(res)

    def quant_acc(self, acc: Any, s: Fraction, z: int, lo: int, hi: int, mode: str, name: str) -> Any:
        """``Quant`` of an accumulator ``real_c = clip(M_c (acc_c + r_c))``: ``y = clamp(R(M_c / s (acc_c + r_c) +
        z), lo', hi')`` exactly (a ``Requantize`` or a ``Step``)."""
        from qverify.io.onnx import _Quant, _Real

        self.take(acc)  # type: ignore[attr-defined]
        if acc.integer:
            raise self.error("integer accumulator must be Cast to float before Quant")  # type: ignore
        if getattr(self, "semantics", "exact") != "exact":
            raise self.error("semantics='onnxruntime' does not apply to QONNX graphs (their runtime is "
                             "qonnx's execute_onnx); use semantics='exact'")  # type: ignore[attr-defined]
        lo, hi = self.clip_levels(acc.clip, s, z, lo, hi, mode)
        n = acc.shape[0] if acc.shape else 1
        mult = [m / s for m in acc.mult]
        res = self.residual_of(acc)
        if res is not None:
            self.bias_exact_note(acc)
        rounding = _AS_ROUNDING.get(mode)
        if res is None and rounding is not None and self.shift_free(mode, z):
            layers: list = [Requantize.affine(mult, z, lo, hi, rounding, name=name)]
        else:
            offsets = res if res is not None else [Fraction(0)]
            if max(mult) >= 1 and max(len(mult), len(offsets)) > 1:
                mult, offsets = self.refine(acc, mult, offsets)
            layers = self.exact_step(mult, offsets, Fraction(z), lo, hi, mode, n, name)
        q = _Quant(self.chain(layers, acc.pos), acc.shape, lo, hi, s, z, container(lo, hi))
        return _Real(q, s, z)

    def refine(self, acc: Any, mult: list[Fraction], offsets: list[Fraction]) -> tuple[list, list]:
        """A per-channel step whose multiplier is ``>= 1`` skips levels at channel-dependent places, which one
        ``Step`` (levels shared by the channels) cannot state: the layer computing ``acc`` is multiplied by the
        power of two ``K > max m_c`` (weights and bias; ``acc' = K acc``, ``m_c / K < 1``, ``o_c K``), which changes
        no real value. Only a fresh ``Dense``/``Conv2d`` output that no other node reads is refined (otherwise
        :meth:`exact_step` falls back to a level index and a per-channel ``Lookup``)."""
        from dataclasses import replace

        k = 1
        while max(mult) / k >= 1:
            k *= 2
        idx = acc.pos - 1
        layer = self.layers[idx] if idx >= 0 else None
        if acc.src != idx or acc.pos in self.sealed or getattr(layer, "weight", None) is None:  # type: ignore
            return mult, offsets  # not a fresh Dense/Conv output: exact_step's per-channel Lookup states it
        self.layers[idx] = replace(layer, weight=layer.weight * k, bias=layer.bias * k)  # type: ignore[union-attr]
        self.notes.append(f"{layer.name}: weights and bias multiplied by {k} (exact: the requantization after it "  # type: ignore
                          f"divides by {k}) so that its per-channel step function has one level per cut point")
        return [m / k for m in mult], [o * k for o in offsets]

    def bias_exact_note(self, acc: Any) -> None:
        """The float bias of ``acc``'s layer is exact after all: replace the importer's rounding note."""
        layer = self.layers[acc.pos - 1]
        src = getattr(self, "bias_residual_node", {}).get(acc.pos, layer.name)
        self.notes[:] = [n for n in self.notes if not n.startswith(f"{src}: real bias rounded")]
        self.notes.append(f"{src}: float bias exact (its fraction of an accumulator unit is kept in the cut points "
                          f"of the requantization after it)")

    def quant_real(self, x: Any, s: Fraction, z: int, lo: int, hi: int, mode: str, name: str) -> Any:
        """``Quant`` of a quantized activation ``clip(s_x (q - z_x))``: nothing (or a clamp) with the same grid,
        else ``y(q) = clamp(R(s_x / s (q - z_x) + z))``, a ``Step`` of ``q`` (or a ``Requantize`` of ``q - z_x``)."""
        from qverify.io.onnx import _Quant, _Real

        lo, hi = self.clip_levels(x.clip, s, z, lo, hi, mode)
        q = x.q
        if s == x.scale and z == x.zero_point:
            qlo, qhi = max(lo, q.lo), min(hi, q.hi)
            if qlo > qhi:
                raise self.error(f"Quant leaves no value of [{q.lo}, {q.hi}] in [{lo}, {hi}]")  # type: ignore
            if (qlo, qhi) == (q.lo, q.hi):
                return _Real(_Quant(q.pos, q.shape, qlo, qhi, s, z, q.etype, q.raw), s, z)
            v = self.append(Clamp(qlo, qhi, name=name), (q.pos,))  # type: ignore[attr-defined]
            return _Real(_Quant(v, q.shape, qlo, qhi, s, z, container(qlo, qhi)), s, z)
        n = q.shape[0] if q.shape else 1
        layers = self.exact_step([x.scale / s], [Fraction(-x.zero_point)], Fraction(z), lo, hi, mode, n, name)
        return _Real(_Quant(self.chain(layers, q.pos), q.shape, lo, hi, s, z, container(lo, hi)), s, z)

    def exact_step(self, mult: list[Fraction], offsets: list[Fraction], z: Fraction, lo: int, hi: int, mode: str,
                   channels: int, name: str, trunc: tuple[int, str] | None = None) -> list:
        """The ``Step`` of ``y_c(a) = clamp(R(m_c (a + o_c) + z), lo, hi)`` per channel ``c`` (``mult``, ``offsets``
        per tensor or per channel), with exact cut points ``C_c(v) = min {a : y_c(a) >= v}`` (:func:`least_reaching`
        on ``t = m_c a + (m_c o_c + z)``). With ``trunc = (T, mode2)`` it is ``Trunc``'s two roundings,
        ``y = clamp(R2(R_half_even(m a + m o + z) / T))``: level ``v`` needs ``t >= t_v = min {t : R2(t / T) >= v}``."""
        if hi - lo > _MAX_LEVELS:
            raise self.error(f"a requantization to [{lo}, {hi}] has too many levels for an exact step function")  # type: ignore
        per = max(len(mult), len(offsets))
        if per not in (1, channels):
            raise self.error(f"{per} multipliers for {channels} channels")  # type: ignore[attr-defined]
        rows = []
        levels_of = []
        for c in range(per):
            m = mult[c if len(mult) > 1 else 0]
            o = offsets[c if len(offsets) > 1 else 0]
            if m <= 0:
                raise self.error("requantization multipliers must be positive")  # type: ignore[attr-defined]
            cuts = []
            for v in range(lo + 1, hi + 1):
                if trunc is None:
                    cuts.append(least_reaching(mode, v, m, m * o + z))
                else:
                    t_v = least_reaching(trunc[1], v, Fraction(1, trunc[0]), Fraction(0))
                    cuts.append(least_reaching("HALF_EVEN", t_v, m, m * o + z))
            # levels that share a cut point (a multiplier >= 1 skips levels): one cut to the highest of them
            uniq: list[int] = []
            levs = [lo]
            for v, cut in zip(range(lo + 1, hi + 1), cuts, strict=True):
                if uniq and cut == uniq[-1]:
                    levs[-1] = v
                else:
                    uniq.append(cut)
                    levs.append(v)
            rows.append(_strict(uniq))
            levels_of.append(tuple(levs))
        if lo == hi:
            return [Clamp(lo, lo, name=name)]
        if len(set(levels_of)) == 1:
            return [Step(np.array(rows, dtype=np.int64), levels_of[0], name=name)]
        # the channels skip different levels (a multiplier >= 1, or a level that is one point, as 0 under UP): a
        # Step to the level's index (cut points past every accumulator pad the shorter channels), then the
        # per-channel Lookup of the index's level
        k = max(len(r) for r in rows)
        padded = [r + [_CUT_LIMIT + 1 + j for j in range(k - len(r))] for r in rows]
        table = [list(levs) + [levs[-1]] * (k + 1 - len(levs)) for levs in levels_of]
        from qverify.network import Lookup

        return [Step(np.array(padded, dtype=np.int64), tuple(range(k + 1)), name=f"{name}/level"),
                Lookup(0, np.array(table, dtype=np.int64), name=name)]

    def chain(self, layers: list, pos: int) -> int:
        """Append ``layers`` one after the other from value ``pos``; the last one's value."""
        for layer in layers:
            pos = self.append(layer, (pos,))  # type: ignore[attr-defined]
        return pos

    # ---------------- BipolarQuant
    def op_BipolarQuant(self, node: Any) -> Any:
        """QONNX ``BipolarQuant(x, scale)``: ``scale * (+1 if x >= 0 else -1)``."""
        from qverify.io.onnx import _Const, _ConstDQ

        self.forms.add("QONNX")
        x = self.get(node.input[0])  # type: ignore[attr-defined]
        if isinstance(x, _Const):
            w = np.asarray(x.value, dtype=np.float64)
            try:
                s = np.broadcast_to(self.qonnx_const(node.input[1], "scale").astype(np.float64), w.shape)
            except ValueError:
                raise self.error(f"scale does not broadcast to the constant's shape {w.shape}") from None  # type: ignore
            if np.any(s <= 0) or not np.all(np.isfinite(s)):
                raise self.error("BipolarQuant scales must be positive and finite")  # type: ignore[attr-defined]
            q = np.where(w >= 0, 1, -1).astype(np.int64)
            return _ConstDQ(q, np.array(s), np.zeros(w.shape, dtype=np.int64), node.name, "bipolar", node.input[0])
        return self.bipolar(node, x, self.qonnx_scalar(node.input[1], "activation scale"))

    def bipolar(self, node: Any, x: Any, s: Fraction) -> Any:
        """The sign of an activation, ``+1`` where its real value is ``>= 0``: on an exactly integer accumulator
        (``M > 0``: ``acc >= 0``) or a quantized activation (``q >= z_x``), a ``Step`` with one cut point; a pending
        clip ``[α, β]`` decides it when ``α >= 0`` (always ``+1``) or ``β < 0`` (always ``-1``)."""
        from qverify.io.onnx import _Acc, _Quant, _Real

        if isinstance(x, _Acc):
            self.take(x)  # type: ignore[attr-defined]
            why = self.float_before(node.input[0], x)
            if why:
                return self.bipolar_of_float(node, why)
            pos, cut, clip = x.pos, 0, x.clip
        elif isinstance(x, _Real):
            pos, cut, clip = x.q.pos, x.zero_point, x.clip
        else:
            return self.bipolar_of_float(node, "its input is the float graph input" if x is not None and
                                         type(x).__name__ == "_Input" else f"its input is {type(x).__name__}")
        shape = x.shape if isinstance(x, _Acc) else x.q.shape
        a, b = clip
        if a is not None and a >= 0:
            layer: Any = Clamp(1, 1, name=node.name)
        elif b is not None and b < 0:
            layer = Clamp(-1, -1, name=node.name)
        else:
            layer = Step(np.array([[cut]], dtype=np.int64), (-1, 1), name=node.name)
        q = _Quant(self.append(layer, (pos,)), shape, -1, 1, s, 0, 3)  # type: ignore[attr-defined]
        self.notes.append(f"{node.name}: {node.op_type} of an exact integer value: the threshold real >= 0")
        return _Real(q, s, 0)

    def float_before(self, tensor: str, acc: Any) -> str:
        """Why the accumulator ``tensor`` is not an exact integer value (``""`` when it is): a float bias in its
        layer, or a float operator (``BatchNormalization``, ``Mul``, ``Add``, ``Div``, ``Sub``) on the way back
        from ``tensor`` to the ``Conv``/``Gemm``/``MatMul`` that computed it."""
        if self.residual_of(acc) is not None:
            return "a float bias is added to the accumulator before it"
        names = {self.layers[acc.pos - 1].name, getattr(self, "bias_residual_node", {}).get(acc.pos)} - {None, ""}
        if any(n.startswith(f"{src}: {what}") for n in self.notes for src in names
               for what in ("real bias rounded", "integer bias", "BatchNormalization")):
            return "a bias that is not an exact integer is added to the accumulator before it"
        producers = {o: n for n in self.model.graph.node for o in n.output}  # type: ignore[attr-defined]
        seen = 0
        while tensor in producers and seen < 64:
            n = producers[tensor]
            if n.op_type in ("Conv", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul", "MatMulInteger"):
                return ""
            if n.op_type in ("Relu", "Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                             "MaxPool", "Cast", "Clip"):
                tensor, seen = n.input[0], seen + 1
                continue
            return f"the float operator {n.op_type} ({n.name!r}) computes its input"
        return ""

    def bipolar_of_float(self, node: Any, why: str) -> Any:
        """The hook for binarized networks: a ``BipolarQuant`` (or ``Sign``) of a float value is a float32
        threshold: the whole graph is imported by :mod:`qverify.io.binarized` instead (float32 bands around the
        thresholds), which :func:`qverify.io.onnx.load_onnx` does on this exception."""
        from qverify.io.binarized import NeedsBinarized

        raise NeedsBinarized(f"{node.op_type} {node.name!r} of a float value ({why})")

    # ---------------- Trunc
    def op_Trunc(self, node: Any) -> Any:
        """QONNX ``Trunc`` (opset 2: ``x, scale, zeropt, in_bits, out_scale, out_bits``; opset 1: ``x, scale,
        zeropt, in_bits, out_bits``) of an accumulator or a quantized activation; see the module docstring."""
        from qverify.io.onnx import _Acc, _kind, _Quant, _Real

        self.forms.add("QONNX")
        version = next((o.version for o in self.model.opset_import if o.domain == node.domain), 2)  # type: ignore
        v2 = version >= 2 or len(node.input) >= 6
        need = 6 if v2 else 5
        if len(node.input) < need or not all(node.input[:need]):
            raise self.error(f"Trunc (opset {2 if v2 else 1}) needs {need} inputs")  # type: ignore[attr-defined]
        x = self.get(node.input[0])  # type: ignore[attr-defined]
        s = self.qonnx_scalar(node.input[1], "scale")
        z = self.qonnx_zero_point(node.input[2])
        mode = self.qonnx_mode("FLOOR")
        if v2:
            s_out = self.qonnx_scalar(node.input[4], "output scale")
            bits = self.qonnx_bits(node.input[5], "output bit width")
            ratio = s_out / s
            k = int(np.round(np.log2(float(ratio))))
            if Fraction(2) ** k != ratio:
                self.notes.append(f"{node.name}: Trunc scale ratio {float(ratio)!r} is not a power of two; "
                                  f"qonnx rounds it to 2^{k}")
            signed = bool(int(self.attr("signed", 1)))  # type: ignore[attr-defined]
            narrow = bool(int(self.attr("narrow", 0)))  # type: ignore[attr-defined]
            lo, hi = quant_int_range(bits, signed, narrow)
            big_t = Fraction(2) ** k
            z_out = Fraction(z) / big_t
            if z_out.denominator != 1:
                raise self.error(f"Trunc output zero point {float(z_out)!r} is not an integer")  # type: ignore
            out_scale = s_out
        else:
            raise self.error("Trunc of QONNX opset 1 (no output clamp, output scale = input scale) is not "
                             "supported; Brevitas writes opset 2")  # type: ignore[attr-defined]
        if big_t.denominator != 1:
            raise self.error(f"Trunc by 2^{k} < 1 is not supported")  # type: ignore[attr-defined]
        if isinstance(x, _Acc):
            self.take(x)  # type: ignore[attr-defined]
            if x.clip != (None, None):
                raise self.error("Trunc of a Relu/Clip of an accumulator is not supported")  # type: ignore
            res = self.residual_of(x)
            if res is not None:
                self.bias_exact_note(x)
            mult = [m / s for m in x.mult]
            offsets = res if res is not None else [Fraction(0)]
            pos, shape = x.pos, x.shape
        elif isinstance(x, _Real):
            if x.clip != (None, None):
                raise self.error("Trunc of a Relu/Clip of a dequantized value is not supported")  # type: ignore
            mult, offsets = [x.scale / s], [Fraction(-x.zero_point)]
            pos, shape = x.q.pos, x.q.shape
        else:
            raise self.error(f"Trunc of {_kind(x)} is not supported")  # type: ignore[attr-defined]
        n = shape[0] if shape else 1
        layers = self.exact_step(mult, offsets, Fraction(z), lo, hi, "HALF_EVEN", n, node.name,
                                 trunc=(int(big_t), mode))
        q = _Quant(self.chain(layers, pos), shape, lo, hi, out_scale, int(z_out), container(lo, hi))
        return _Real(q, out_scale, int(z_out))


# ---------------------------------------------------------------------------------------------- QONNX replay
@functools.lru_cache(maxsize=8)
def _wrapper(path: str, mtime: float) -> Any:
    """The file as a qonnx ``ModelWrapper`` with its tensor shapes inferred (qonnx's ``InferShapes``, which
    ``execute_onnx`` needs and Brevitas's TorchScript exports leave out; it changes no value)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    model = ModelWrapper(path)
    return model.transform(InferShapes())


def qonnx_real_inputs(net: QNetwork, x_int: np.ndarray, mode: str) -> np.ndarray:
    """float32 inputs that QONNX's input ``Quant`` (``R(fl32(x / s) + z)``, mode ``mode``) maps to ``x_int``: per
    element the first of ``fl32(s (q - z + d))``, ``d = 0, 1/2, -1/2``, that round-trips there (checked with the
    same float32 operations); a point none of them reaches raises ``ValueError``."""
    from qonnx.custom_op.general.quant import resolve_rounding_mode

    x = np.asarray(x_int, dtype=np.int64)
    s32 = np.float32(float(net.input_scale))
    z = net.input_zero_point
    fn = resolve_rounding_mode(mode)
    out = np.zeros(x.shape, dtype=np.float32)
    done = np.zeros(x.shape, dtype=bool)
    for d in (0.0, 0.5, -0.5, 0.25, -0.25):
        xr = ((x - z).astype(np.float64) + d) * float(s32)
        xr = xr.astype(np.float32)
        with np.errstate(all="ignore"):
            back = fn(xr / s32 + np.float32(z)).astype(np.float64)
        ok = (back == x) & ~done
        out[ok] = xr[ok]
        done |= ok
    if not done.all():
        i = tuple(np.argwhere(~done)[0])
        raise ValueError(f"input {int(x[i])} does not round-trip through QONNX's float32 input Quant")
    return out


def qonnx_integer_outputs(net: QNetwork, x_int: np.ndarray) -> np.ndarray:
    """Run the original QONNX file on ``qonnx.core.onnx_exec.execute_onnx`` (one sample at a time when the file's
    batch is fixed) on integer inputs; return the integer outputs ``[B, num_outputs]`` matching the executor's:
    for a final ``Quant`` (``dequantized``), ``q = z + rint(y / s)``, checked by recomputing ``fl32(fl32(q - z) s)
    == y``; for a float accumulator output, ``rint(y / M)``."""
    from qonnx.core.onnx_exec import execute_onnx

    meta = net.metadata
    p = str(Path(meta["onnx_path"]).resolve())
    model = _wrapper(p, Path(p).stat().st_mtime)
    x = np.asarray(x_int).reshape(-1, net.num_inputs).astype(np.int64)
    if x.size and (x.min() < net.input_lo or x.max() > net.input_hi):
        raise ValueError(f"inputs outside the grid [{net.input_lo}, {net.input_hi}]")
    dims = [int(d) for d in meta["onnx_input_shape"].split(",")]
    mode = {Rounding.FLOOR: "FLOOR", Rounding.HALF_AWAY: "HALF_UP"}.get(net.input_rounding, "ROUND")  # type: ignore
    feed = qonnx_real_inputs(net, x, mode).reshape((len(x), *dims[1:]))
    step = len(x) if dims[0] == -1 else max(dims[0], 1)
    outs = []
    for i in range(0, len(x), step):
        res = execute_onnx(model, {meta["onnx_input"]: feed[i:i + step]})
        outs.append(np.asarray(res[meta["onnx_output"]]).reshape(min(step, len(x) - i), -1))
    y = np.concatenate(outs) if outs else np.zeros((0, net.num_outputs), np.float32)
    if meta["onnx_output_kind"] == "dequantized":
        s32 = np.float32(float(net.output_scale))
        z = net.output_zero_point
        q = np.rint(y.astype(np.float64) / float(s32)).astype(np.int64) + z
        again = (q - z).astype(np.float32) * s32
        if not np.array_equal(again, y.astype(np.float32)):
            raise RuntimeError("QONNX's dequantized outputs do not map back to integers exactly")
        return q
    if meta["onnx_output_kind"] == "int":
        return y.astype(np.int64)
    return np.rint(y.astype(np.float64) / float(net.output_scale)).astype(np.int64)


def _applies(net: QNetwork) -> bool:
    return bool(net.metadata.get("onnx_path"))


def _outputs(net: QNetwork, x: np.ndarray) -> np.ndarray:
    return qonnx_integer_outputs(net, x)


def _cause(net: QNetwork) -> str:
    return ("QONNX's runtime computes Quant, Conv and Gemm in float32 (x / s, the float bias, the sums), the "
            "integer semantics in exact rationals: they part where a value lies within float32 rounding of a "
            "rounding tie")


register_runtime("qonnx", RuntimeReplay("qonnx execute_onnx", _applies, _outputs, _cause))

__all__ = ["QONNX_DOMAINS", "QonnxOps", "least_reaching", "qonnx_integer_outputs", "qonnx_real_inputs",
           "quant_int_range", "reach", "round_mode"]
