"""Monotone elementwise ops: ``y = f_c(x)`` with ``f_c`` non-decreasing on the integers, channel ``c`` on axis 1.

* :class:`Requantize` ``y = clamp(R(acc * p_c / q_c) + z_c, lo, hi)`` per output channel ``c``, or, with
  ``float32_scale`` (onnxruntime's semantics), ``y = clamp(rne(fl32(fl32(acc) * m_c)) + z_c, lo, hi)``
* :class:`Clamp`      ``y = clamp(x, lo, hi)`` (an integer ReLU is ``clamp(x, z, hi)``)
* :class:`Step`       ``y = v_k`` for ``T_{c,k} <= x < T_{c,k+1}``: a step function with integer cut points
  ``T_c`` (one row per channel, or one shared row) and non-decreasing levels ``v_0 <= ... <= v_K``. ONNX's
  ``Sign`` is ``Step(((0, 1),), (-1, 0, 1))``; the binarizing threshold of a binarized network (Larq's
  ``sign(x) = +1`` for ``x >= 0``, with a folded BatchNorm's per-channel threshold ``t_c``) is
  ``Step(((t_c,) ...), (-1, 1))``.
* :class:`Lookup`     ``y = table_c[x - start]``: any function of one integer on a bounded domain (not a
  :class:`~qverify.ops.Monotone`: its bounds take the table's range over an interval).
* :class:`Uncertain`  ``y in {x - d_c, ..., x + d_c}``: the one *set-valued* op. It stands for the float32 rounding
  a runtime may do where the network computes in floating point (binarized networks: a float first layer, a
  BatchNorm before a ``Sign``, a float last layer): the importer scales the float computation to integers and
  bounds the runtime's deviation from the exact value by ``d_c`` (:mod:`qverify.io.binarized`). A network that
  holds one is set-valued (:attr:`~qverify.network.QNetwork.set_valued`): a ``robust`` verdict covers every
  member of the set (so the runtime's function, whatever its summation order), the executor computes the nominal
  member (``d = 0``), and a counterexample is one only once the runtime confirms it.

The functions themselves are in :mod:`qverify.execute` (the semantics, one home); the classes hold and check the
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from qverify.ops.base import ModelError, Monotone, Op, Shape, int_array, int_scalar
from qverify.quant import (
    F32_SCALE_MAX,
    F32_SCALE_MIN,
    Rounding,
    as_fraction,
    is_float32,
    is_power_of_two,
)


@dataclass(frozen=True, eq=False)
class Requantize(Monotone):
    """``y = clamp(R(acc * num_c / den_c) + zero_point_c, lo, hi)`` per channel ``c`` on axis 1.

    ``num``, ``den`` are positive Python ints (one per channel, or one for the tensor); the exact multiplier is the
    rational ``num / den``. Power-of-two fixed point is ``num = 1, den = 2^k``.

    ``float32_scale`` (one float32 value per channel, or one): the requantization is onnxruntime's float32 one,
    ``y = clamp(rne(fl32(fl32(acc) * m_c)) + zero_point_c, lo, hi)`` (:func:`qverify.quant.f32_round`), which
    then *defines* the function; ``num / den`` hold the exact rational value of each ``m_c`` (the slope that
    linear relaxations and heuristics use) and ``rounding`` is ``half_even``. Build it with :meth:`float32`.
    """

    num: tuple[int, ...]
    den: tuple[int, ...]
    zero_point: np.ndarray
    lo: int
    hi: int
    rounding: Rounding = Rounding.HALF_UP
    name: str = ""
    float32_scale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        num = tuple(int(v) for v in np.atleast_1d(np.asarray(self.num, dtype=object)))
        den = tuple(int(v) for v in np.atleast_1d(np.asarray(self.den, dtype=object)))
        if len(num) != len(den) or not num:
            raise ModelError(f"Requantize {self.name!r}: num and den must have the same non-zero length")
        if min(num) <= 0 or min(den) <= 0:
            raise ModelError(f"Requantize {self.name!r}: multipliers must be positive")
        # reduce each fraction so equal multipliers compare equal
        red = [Fraction(n, d) for n, d in zip(num, den, strict=True)]
        object.__setattr__(self, "num", tuple(f.numerator for f in red))
        object.__setattr__(self, "den", tuple(f.denominator for f in red))
        zp = np.atleast_1d(int_array(self.zero_point, f"Requantize {self.name!r} zero_point"))
        if zp.ndim != 1:
            raise ModelError(f"Requantize {self.name!r}: zero_point must be a scalar or one value per channel, "
                             f"got shape {zp.shape}")
        object.__setattr__(self, "zero_point", zp)
        object.__setattr__(self, "lo", int_scalar(self.lo, f"Requantize {self.name!r} lo"))
        object.__setattr__(self, "hi", int_scalar(self.hi, f"Requantize {self.name!r} hi"))
        try:
            object.__setattr__(self, "rounding", Rounding(self.rounding))
        except ValueError:
            raise ModelError(f"Requantize {self.name!r}: unknown rounding mode {self.rounding!r} "
                             f"(known: {', '.join(r.value for r in Rounding)})") from None
        if self.lo > self.hi:
            raise ModelError(f"Requantize {self.name!r}: empty clamp range [{self.lo}, {self.hi}]")
        if self.float32_scale is not None:
            self._check_float32()

    def _check_float32(self) -> None:
        where = f"Requantize {self.name!r}"
        try:
            ms = tuple(float(v) for v in np.atleast_1d(np.asarray(self.float32_scale, dtype=object)))
        except (TypeError, ValueError, OverflowError) as e:
            raise ModelError(f"{where}: float32_scale must be floats ({e})") from None
        for m in ms:
            if not is_float32(m) or not F32_SCALE_MIN <= m <= F32_SCALE_MAX:
                raise ModelError(f"{where}: float32_scale {m!r} is not a float32 in [2^-126, 2^24]")
        if len(ms) != len(self.num) or [Fraction(m) for m in ms] != self.multipliers():
            raise ModelError(f"{where}: num/den must be the exact values of float32_scale (use Requantize.float32)")
        if self.rounding is not Rounding.HALF_EVEN:
            raise ModelError(f"{where}: a float32 requantization rounds half to even, not {self.rounding.value}")
        object.__setattr__(self, "float32_scale", ms)

    @classmethod
    def float32(cls, multiplier: Sequence[float] | float, zero_point: object, lo: int, hi: int,
                name: str = "") -> Requantize:
        """onnxruntime's float32 requantization ``clamp(rne(fl32(fl32(acc) m_c)) + z_c, lo, hi)`` with the float32
        multipliers ``m_c`` (per tensor or per channel)."""
        ms = [float(m) for m in np.atleast_1d(np.asarray(multiplier, dtype=np.float64))]
        for m in ms:
            if not is_float32(m):
                raise ModelError(f"Requantize {name!r}: multiplier {m!r} is not a float32 value")
        fr = [Fraction(m) for m in ms]
        return cls(tuple(f.numerator for f in fr), tuple(f.denominator for f in fr), np.asarray(zero_point), lo,
                   hi, Rounding.HALF_EVEN, name, tuple(ms))

    @property
    def semantics(self) -> str:
        """``"float32"`` for onnxruntime's float32 requantization, ``"exact"`` for the rational one."""
        return "exact" if self.float32_scale is None else "float32"

    @classmethod
    def pow2(cls, shift: int, lo: int, hi: int, rounding: Rounding | str = Rounding.HALF_UP,
             zero_point: int = 0, name: str = "") -> Requantize:
        """Fixed point: ``y = clamp(R(acc / 2^shift) + zero_point, lo, hi)`` (a negative shift multiplies)."""
        num, den = (1, 2**shift) if shift >= 0 else (2**-shift, 1)
        return cls((num,), (den,), np.array([zero_point]), lo, hi, Rounding(rounding), name)

    @classmethod
    def affine(cls, multiplier: Sequence[float | Fraction] | float | Fraction, zero_point: object, lo: int, hi: int,
               rounding: Rounding | str = Rounding.HALF_EVEN, name: str = "") -> Requantize:
        """Affine: the exact rational value of each (float) multiplier ``s_in s_w / s_out``."""
        ms = [as_fraction(m) for m in np.atleast_1d(np.asarray(multiplier, dtype=object))]
        return cls(tuple(m.numerator for m in ms), tuple(m.denominator for m in ms), np.asarray(zero_point),
                   lo, hi, Rounding(rounding), name)

    @property
    def channels(self) -> int:
        return max(len(self.num), self.zero_point.size)

    @property
    def shift(self) -> int | None:
        """``k`` when every channel is ``acc / 2^k`` (power-of-two fixed point), else ``None`` (also for float32
        requantizations: ``fl32(acc)`` rounds when ``|acc| > 2^24``, so they are not shifts)."""
        if self.float32_scale is not None:
            return None
        if len(set(self.num)) == 1 and len(set(self.den)) == 1 and self.num[0] == 1 and is_power_of_two(self.den[0]):
            return self.den[0].bit_length() - 1
        return None

    def multipliers(self) -> list[Fraction]:
        return [Fraction(n, d) for n, d in zip(self.num, self.den, strict=True)]

    def out_range(self) -> tuple[int, int]:
        return self.lo, self.hi

    def output_shape(self, *in_shapes: Shape) -> Shape:
        in_shape = in_shapes[0]
        c = in_shape[0] if in_shape else 1
        for what, n in (("multiplier", len(self.num)), ("zero_point", self.zero_point.size)):
            if n not in (1, c):
                raise ModelError(f"Requantize {self.name!r}: {n} {what} values for {c} channels (axis 1)")
        return in_shape


@dataclass(frozen=True, eq=False)
class Clamp(Monotone):
    """``y = clamp(x, lo, hi)`` on integers (an integer ReLU is ``Clamp(z, hi)``)."""

    lo: int
    hi: int
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", int_scalar(self.lo, f"Clamp {self.name!r} lo"))
        object.__setattr__(self, "hi", int_scalar(self.hi, f"Clamp {self.name!r} hi"))
        if self.lo > self.hi:
            raise ModelError(f"Clamp {self.name!r}: empty range [{self.lo}, {self.hi}]")

    def out_range(self) -> tuple[int, int]:
        return self.lo, self.hi


@dataclass(frozen=True, eq=False)
class Step(Monotone):
    """``y = levels[#{k : cuts[c, k] <= x}]`` per channel ``c`` (axis 1): cut points int64 ``[C, K]`` (or
    ``[1, K]`` shared), strictly increasing in ``k``; ``levels`` ``K + 1`` non-decreasing integers."""

    cuts: np.ndarray
    levels: tuple[int, ...]
    name: str = ""

    def __post_init__(self) -> None:
        where = f"Step {self.name!r}"
        cuts = int_array(self.cuts, f"{where} cuts")
        if cuts.ndim == 1:
            cuts = cuts[None, :]
        if cuts.ndim != 2 or cuts.shape[1] < 1:
            raise ModelError(f"{where}: cuts must be [channels, K] with K >= 1, got shape {cuts.shape}")
        if cuts.shape[1] > 1 and np.any(np.diff(cuts, axis=1) <= 0):
            raise ModelError(f"{where}: cut points must increase strictly along each channel")
        levels = tuple(int_scalar(v, f"{where} levels") for v in self.levels)
        if len(levels) != cuts.shape[1] + 1:
            raise ModelError(f"{where}: {cuts.shape[1]} cut points need {cuts.shape[1] + 1} levels, got {len(levels)}")
        if any(b < a for a, b in zip(levels, levels[1:], strict=False)):
            raise ModelError(f"{where}: levels must be non-decreasing, got {levels}")
        object.__setattr__(self, "cuts", cuts)
        object.__setattr__(self, "levels", levels)

    @classmethod
    def sign(cls, name: str = "") -> Step:
        """ONNX ``Sign`` on integers: ``-1, 0, +1``."""
        return cls(np.array([[0, 1]]), (-1, 0, 1), name)

    @property
    def channels(self) -> int:
        return self.cuts.shape[0]

    def summary(self) -> str:
        k = self.cuts.shape[1]
        if k > 6:
            where = f"{k} cut points" + (f" per channel ({self.channels})" if self.channels > 1 else "")
            return f"levels {self.levels[0]}..{self.levels[-1]}, {where}"
        cuts = self.cuts[0].tolist() if self.channels == 1 else f"{self.channels} channels of cut points"
        return f"levels {list(self.levels)} at {cuts}"

    def out_range(self) -> tuple[int, int]:
        return self.levels[0], self.levels[-1]

    def output_shape(self, *in_shapes: Shape) -> Shape:
        in_shape = in_shapes[0]
        c = in_shape[0] if in_shape else 1
        if self.channels not in (1, c):
            raise ModelError(f"Step {self.name!r}: {self.channels} rows of cut points for {c} channels (axis 1)")
        return in_shape

    def channel_cuts(self, ch: int) -> np.ndarray:
        return self.cuts[ch if self.channels > 1 else 0]


@dataclass(frozen=True, eq=False)
class Lookup(Op):
    """``y = table_c[x - start]`` elementwise, per channel ``c`` (axis 1): any integer function of one integer value
    on a bounded domain ``[start, start + D - 1]`` (``table`` int64 ``[D]`` shared, or ``[C, D]``), monotone or
    not: ``QLinearSigmoid``, ``QLinearLeakyRelu``, HardSwish between ``DQ`` and ``Q`` on 8-bit values (``D <=
    256``). Network validation checks that the input's worst-case range lies in the domain. A monotone table is
    better given as a :class:`Step` (its bounds and encodings are tighter)."""

    start: int
    table: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        where = f"Lookup {self.name!r}"
        object.__setattr__(self, "start", int_scalar(self.start, f"{where} start"))
        t = int_array(self.table, f"{where} table")
        if t.ndim == 1:
            t = t[None, :]
        if t.ndim != 2 or t.shape[1] < 1:
            raise ModelError(f"{where}: table must be [D] or [channels, D] with D >= 1, got shape {t.shape}")
        if t.shape[1] > 1 << 16:
            raise ModelError(f"{where}: table of {t.shape[1]} entries (at most 65536)")
        object.__setattr__(self, "table", t)

    @property
    def channels(self) -> int:
        return self.table.shape[0]

    @property
    def domain(self) -> tuple[int, int]:
        return self.start, self.start + self.table.shape[1] - 1

    def out_range(self) -> tuple[int, int]:
        return int(self.table.min()), int(self.table.max())

    def summary(self) -> str:
        return f"table of {self.table.shape[1]} values on {list(self.domain)}" + (
            f", {self.channels} channels" if self.channels > 1 else "")

    def output_shape(self, *in_shapes: Shape) -> Shape:
        in_shape = in_shapes[0]
        c = in_shape[0] if in_shape else 1
        if self.channels not in (1, c):
            raise ModelError(f"Lookup {self.name!r}: {self.channels} tables for {c} channels (axis 1)")
        return in_shape

    def check_input_range(self, lo: int, hi: int) -> None:
        """The input's worst-case range must lie in the table's domain (every value has an entry)."""
        a, b = self.domain
        if lo < a or hi > b:
            raise ModelError(f"Lookup {self.name!r}: input values [{lo}, {hi}] leave the table's domain [{a}, {b}]")

    def channel_table(self, ch: int) -> np.ndarray:
        return self.table[ch if self.channels > 1 else 0]


@dataclass(frozen=True, eq=False)
class Uncertain(Op):
    """``y = x + e`` elementwise with ``e`` any integer in ``[-delta_c, delta_c]`` (channel ``c`` on axis 1;
    ``delta`` int64 ``[C]`` or ``[1]``, every entry ``>= 0``): a set-valued identity.

    Semantics of a network holding it: the set of functions obtained by every choice of ``e`` at every neuron and
    every input. Analyses treat ``e`` adversarially: interval bounds widen by ``delta``; symbolic bounds take the
    lines ``x - delta <= y <= x + delta`` (exact: the envelope of the set); the integer program adds ``y`` with
    ``x - delta <= y <= x + delta``. The executor and the torch view compute the nominal member ``y = x``.

    Why an integer band covers a real deviation (:mod:`qverify.io.binarized` states the bounds it uses): if the
    runtime's value ``w`` (in the units of ``x``) satisfies ``|w - x| <= D`` and a later threshold compares ``w``
    with a real ``t``, then with ``d = ceil(D)`` some integer ``y`` of ``[x - d, x + d]`` lies on the same side of
    ``t`` as ``w`` (``y = x + d >= w >= t`` gives ``y >= ceil(t)``; ``y = x - d <= w < t`` gives ``y < t``); at the
    outputs, ``y_j = x_j + d_j, y_l = x_l - d_l`` order every pair as ``w`` does or ties it, so every argmax the
    runtime can produce is produced by some member.
    """

    delta: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        where = f"Uncertain {self.name!r}"
        d = np.atleast_1d(int_array(self.delta, f"{where} delta"))
        if d.ndim != 1 or d.size < 1:
            raise ModelError(f"{where}: delta must be a scalar or one value per channel, got shape {d.shape}")
        if int(d.min()) < 0:
            raise ModelError(f"{where}: delta must be >= 0, got {int(d.min())}")
        object.__setattr__(self, "delta", d)

    @property
    def channels(self) -> int:
        return self.delta.size

    def output_shape(self, *in_shapes: Shape) -> Shape:
        in_shape = in_shapes[0]
        c = in_shape[0] if in_shape else 1
        if self.channels not in (1, c):
            raise ModelError(f"Uncertain {self.name!r}: {self.channels} delta values for {c} channels (axis 1)")
        return in_shape

    def deltas(self, shape: Shape) -> np.ndarray:
        """``delta`` broadcast to a value of ``shape`` (no batch axis), int64."""
        d = self.delta.reshape((-1,) + (1,) * (len(shape) - 1)) if shape else self.delta.reshape(())
        return np.broadcast_to(d, shape).astype(np.int64)

    def summary(self) -> str:
        lo, hi = int(self.delta.min()), int(self.delta.max())
        return f"set-valued: +-{hi}" if lo == hi else f"set-valued: +-{lo}..{hi} per channel"
