"""The integer network: layer dataclasses and their validation.

A :class:`QNetwork` is a sequence of integer layers applied to a batch of integer inputs on the grid
``[input_lo, input_hi]^input_shape`` (channels first, no batch axis in the shapes):

* :class:`Dense`      ``acc = W x + b``                          (``W`` int ``[out, in]``, ``b`` int ``[out]``)
* :class:`Conv2d`     ``acc[o,i,j] = sum_{c,u,v} W[o,c,u,v] xpad[c, i*sh + u*dh, j*sw + v*dw] + b[o]``,
  where ``xpad`` is ``x`` padded with ``pad_value`` (the input zero point, so padding means real zero)
* :class:`Flatten`    ``[C, H, W] -> [C*H*W]`` in C order
* :class:`Requantize` ``y = clamp(R(acc * p_c / q_c) + z_c, lo, hi)`` per output channel ``c`` (axis 1 of the batch),
  or, with ``float32_scale`` (onnxruntime's semantics), ``y = clamp(rne(fl32(fl32(acc) * m_c)) + z_c, lo, hi)``
* :class:`Clamp`      ``y = clamp(x, lo, hi)`` (an integer ReLU is ``clamp(x, z, hi)``)

Zero points of weights and of layer inputs are folded into ``W`` and ``b`` by the importers (exact integer
algebra: ``sum (w - z_w)(x - z_x) = sum w' x + b'``), so a layer sees plain integers. The real-valued view of the
network is ``x_real = s_in (x - z_in)`` at the input and ``y_real = s_out (y - z_out)`` at the output.

The output is the last layer's values (flattened); the predicted class is the argmax with the network's tie rule
(``first``: the first maximal index wins, as numpy and QVIP do).

Validation (on construction) checks shapes, integrality, that every accumulator stays below ``2^53`` in magnitude
for every input of the grid (so float64 BLAS is exact), and names the layer and the field that is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from qverify.quant import (
    F32_SCALE_MAX,
    F32_SCALE_MIN,
    FLOAT64_EXACT,
    Rounding,
    as_fraction,
    is_float32,
    is_power_of_two,
)


class ModelError(ValueError):
    """A malformed model: the message names the file (when known), the layer and what is wrong."""


def _int_array(value: object, what: str) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype == object:
        try:
            a = a.astype(np.int64)
        except (OverflowError, TypeError) as e:
            raise ModelError(f"{what}: values must be int64 integers ({e})") from None
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ModelError(f"{what}: values must be integers, found non-integer floats")
        if a.size and np.max(np.abs(a)) >= 2**62:
            raise ModelError(f"{what}: values out of int64 range")
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ModelError(f"{what}: integer array expected, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ModelError(f"{what}: values out of int64 range (unsigned values up to {int(a.max())})")
    return a.astype(np.int64, copy=False)


def _int_scalar(value: object, what: str) -> int:
    """An integer field (a clamp bound, a stride, a padding): an int, a numpy integer, or an integral float;
    anything else (a fraction, NaN, a string, a bool) is a :class:`ModelError` instead of a silent ``int()``."""
    if isinstance(value, (bool, np.bool_)):
        raise ModelError(f"{what}: integer expected, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ModelError(f"{what}: integer expected, got {value!r}")


@dataclass(frozen=True, eq=False)
class Dense:
    """``acc = W x + b`` with ``W`` int64 ``[out, in]`` and ``b`` int64 ``[out]``."""

    weight: np.ndarray
    bias: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _int_array(self.weight, f"Dense {self.name!r} weight"))
        object.__setattr__(self, "bias", _int_array(self.bias, f"Dense {self.name!r} bias"))
        if self.weight.ndim != 2:
            raise ModelError(f"Dense {self.name!r}: weight must be 2-D [out, in], got shape {self.weight.shape}")
        if self.bias.shape != (self.weight.shape[0],):
            raise ModelError(f"Dense {self.name!r}: bias shape {self.bias.shape} does not match "
                             f"weight rows {self.weight.shape[0]}")

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if in_shape != (self.weight.shape[1],):
            raise ModelError(f"Dense {self.name!r}: weight expects input ({self.weight.shape[1]},), "
                             f"got {in_shape}")
        return (self.weight.shape[0],)


@dataclass(frozen=True, eq=False)
class Conv2d:
    """2-D convolution (cross-correlation, as ONNX/PyTorch), NCHW, ``groups = 1``.

    ``padding`` is ``(top, left, bottom, right)``; padded cells hold ``pad_value``.
    """

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    pad_value: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _int_array(self.weight, f"Conv2d {self.name!r} weight"))
        object.__setattr__(self, "bias", _int_array(self.bias, f"Conv2d {self.name!r} bias"))
        for field_name in ("stride", "padding", "dilation"):
            what = f"Conv2d {self.name!r} {field_name}"
            try:
                vals = tuple(_int_scalar(v, what) for v in getattr(self, field_name))
            except TypeError:
                raise ModelError(f"{what}: a sequence of integers expected") from None
            object.__setattr__(self, field_name, vals)
        object.__setattr__(self, "pad_value", _int_scalar(self.pad_value, f"Conv2d {self.name!r} pad_value"))
        if self.weight.ndim != 4:
            raise ModelError(f"Conv2d {self.name!r}: weight must be 4-D [out, in, kh, kw], got {self.weight.shape}")
        if self.bias.shape != (self.weight.shape[0],):
            raise ModelError(f"Conv2d {self.name!r}: bias shape {self.bias.shape} does not match "
                             f"{self.weight.shape[0]} output channels")
        if len(self.stride) != 2 or min(self.stride) < 1:
            raise ModelError(f"Conv2d {self.name!r}: stride must be two positive ints, got {self.stride}")
        if len(self.dilation) != 2 or min(self.dilation) < 1:
            raise ModelError(f"Conv2d {self.name!r}: dilation must be two positive ints, got {self.dilation}")
        if len(self.padding) != 4 or min(self.padding) < 0:
            raise ModelError(f"Conv2d {self.name!r}: padding must be 4 non-negative ints, got {self.padding}")

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        o, c, kh, kw = self.weight.shape
        if len(in_shape) != 3 or in_shape[0] != c:
            raise ModelError(f"Conv2d {self.name!r}: expects input [{c}, H, W], got {in_shape}")
        h = in_shape[1] + self.padding[0] + self.padding[2]
        w = in_shape[2] + self.padding[1] + self.padding[3]
        ekh = (kh - 1) * self.dilation[0] + 1
        ekw = (kw - 1) * self.dilation[1] + 1
        if h < ekh or w < ekw:
            raise ModelError(f"Conv2d {self.name!r}: kernel {kh}x{kw} larger than padded input {h}x{w}")
        return (o, (h - ekh) // self.stride[0] + 1, (w - ekw) // self.stride[1] + 1)


@dataclass(frozen=True, eq=False)
class Flatten:
    """``[C, H, W] -> [C*H*W]`` (C order)."""

    name: str = ""

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(np.prod(in_shape)),)


@dataclass(frozen=True, eq=False)
class Requantize:
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
        zp = np.atleast_1d(_int_array(self.zero_point, f"Requantize {self.name!r} zero_point"))
        if zp.ndim != 1:
            raise ModelError(f"Requantize {self.name!r}: zero_point must be a scalar or one value per channel, "
                             f"got shape {zp.shape}")
        object.__setattr__(self, "zero_point", zp)
        object.__setattr__(self, "lo", _int_scalar(self.lo, f"Requantize {self.name!r} lo"))
        object.__setattr__(self, "hi", _int_scalar(self.hi, f"Requantize {self.name!r} hi"))
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

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        c = in_shape[0] if in_shape else 1
        for what, n in (("multiplier", len(self.num)), ("zero_point", self.zero_point.size)):
            if n not in (1, c):
                raise ModelError(f"Requantize {self.name!r}: {n} {what} values for {c} channels (axis 1)")
        return in_shape


@dataclass(frozen=True, eq=False)
class Clamp:
    """``y = clamp(x, lo, hi)`` on integers (an integer ReLU is ``Clamp(z, hi)``)."""

    lo: int
    hi: int
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", _int_scalar(self.lo, f"Clamp {self.name!r} lo"))
        object.__setattr__(self, "hi", _int_scalar(self.hi, f"Clamp {self.name!r} hi"))
        if self.lo > self.hi:
            raise ModelError(f"Clamp {self.name!r}: empty range [{self.lo}, {self.hi}]")

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape


Layer = Dense | Conv2d | Flatten | Requantize | Clamp
AFFINE_LAYERS = (Dense, Conv2d)


def _bits_signed(lo: int, hi: int) -> int:
    """Smallest two's-complement width holding ``[lo, hi]``."""
    b = 1
    while not (-(2 ** (b - 1)) <= lo and hi <= 2 ** (b - 1) - 1):
        b += 1
    return b


def value_bits(lo: int, hi: int) -> str:
    """``'u8'``/``'i6'`` style description of an integer range."""
    if lo >= 0:
        return f"u{max(1, int(hi).bit_length())}"
    return f"i{_bits_signed(lo, hi)}"


@dataclass(frozen=True, eq=False)
class QNetwork:
    """An integer network (see the module docstring for the semantics).

    ``input_rounding`` says how a real input box maps to the integer grid: ``None`` means the model's input *is*
    the integer grid (pixels), and a real box stands for the grid points it contains; a rounding mode means the
    model quantizes real inputs (``x = clamp(R(x_real / s_in) + z_in)``), and a real box stands for its image under
    that quantizer.
    """

    input_shape: tuple[int, ...]
    input_lo: int
    input_hi: int
    layers: tuple[Layer, ...]
    input_scale: Fraction = Fraction(1)
    input_zero_point: int = 0
    output_scale: Fraction = Fraction(1)
    output_zero_point: int = 0
    input_rounding: Rounding | None = None
    tie_rule: str = "first"
    name: str = "qnetwork"
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "input_lo", int(self.input_lo))
        object.__setattr__(self, "input_hi", int(self.input_hi))
        object.__setattr__(self, "input_scale", as_fraction(self.input_scale))
        object.__setattr__(self, "output_scale", as_fraction(self.output_scale))
        object.__setattr__(self, "input_zero_point", int(self.input_zero_point))
        object.__setattr__(self, "output_zero_point", int(self.output_zero_point))
        if self.input_rounding is not None:
            object.__setattr__(self, "input_rounding", Rounding(self.input_rounding))
        if self.tie_rule not in ("first",):
            raise ModelError(f"network {self.name!r}: unknown tie rule {self.tie_rule!r} (known: first)")
        if self.input_scale <= 0 or self.output_scale <= 0:
            raise ModelError(f"network {self.name!r}: input and output scales must be positive")
        if self.input_lo > self.input_hi:
            raise ModelError(f"network {self.name!r}: empty input grid [{self.input_lo}, {self.input_hi}]")
        if not self.layers:
            raise ModelError(f"network {self.name!r}: no layers")
        shapes = [self.input_shape]
        ranges: list[tuple[int, int]] = [(self.input_lo, self.input_hi)]
        for i, layer in enumerate(self.layers):
            where = f"network {self.name!r}, layer {i} ({type(layer).__name__} {getattr(layer, 'name', '')!r})"
            if not isinstance(layer, Layer):
                raise ModelError(f"{where}: not a qverify layer")
            try:
                shapes.append(layer.output_shape(shapes[-1]))
            except ModelError as e:
                raise ModelError(f"{where}: {e}") from None
            lo, hi = ranges[-1]
            if isinstance(layer, AFFINE_LAYERS):
                m = max(abs(lo), abs(hi))
                wabs = np.abs(layer.weight).reshape(layer.weight.shape[0], -1).sum(axis=1)
                bound = int(wabs.max()) * m + int(np.abs(layer.bias).max()) if wabs.size else 0
                if isinstance(layer, Conv2d):
                    bound += int(wabs.max()) * abs(layer.pad_value)
                if bound >= FLOAT64_EXACT:
                    raise ModelError(f"{where}: accumulators may reach {bound} >= 2^53; not exactly representable")
                ranges.append((-bound, bound))
            elif isinstance(layer, (Requantize, Clamp)):
                ranges.append((layer.lo, layer.hi))
            else:
                ranges.append((lo, hi))
        if len(shapes[-1]) != 1:
            raise ModelError(f"network {self.name!r}: output must be a vector, got shape {shapes[-1]} "
                             f"(add a Flatten)")
        if self.metadata.get("semantics") == "exact" and self._has_float32():
            raise ModelError(f"network {self.name!r}: metadata says semantics 'exact' but some requantization is "
                             f"float32 (onnxruntime's)")
        object.__setattr__(self, "_shapes", tuple(shapes))
        object.__setattr__(self, "_ranges", tuple(ranges))

    # ------------------------------------------------------------------ derived facts
    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the input (index 0) and of every layer's output (index ``i + 1``)."""
        return self._shapes  # type: ignore[attr-defined]

    @property
    def value_ranges(self) -> tuple[tuple[int, int], ...]:
        """Worst-case integer range of the input (index 0) and of every layer's output over the whole grid."""
        return self._ranges  # type: ignore[attr-defined]

    @property
    def num_inputs(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def num_outputs(self) -> int:
        return self.shapes[-1][0]

    @property
    def output_range(self) -> tuple[int, int]:
        return self.value_ranges[-1]

    def parameter_count(self) -> int:
        n = 0
        for layer in self.layers:
            if isinstance(layer, AFFINE_LAYERS):
                n += layer.weight.size + layer.bias.size
        return n

    @property
    def semantics(self) -> str:
        """The arithmetic the network's requantizations follow: ``"onnxruntime"`` when some requantization is
        float32, else ``metadata["semantics"]`` where an importer recorded it (``"exact"`` or ``"onnxruntime"``: an
        ONNX model imported under onnxruntime's semantics whose layers need no float32 requantization), else
        ``"exact"``."""
        if self._has_float32():
            return "onnxruntime"
        return str(self.metadata.get("semantics", "exact"))

    def _has_float32(self) -> bool:
        return any(isinstance(layer, Requantize) and layer.float32_scale is not None for layer in self.layers)

    def is_fixed_point(self) -> bool:
        """True when every requantization is a power-of-two shift (the QVIP family)."""
        return all(layer.shift is not None for layer in self.layers if isinstance(layer, Requantize))

    def describe(self) -> list[dict[str, object]]:
        """One row per layer: kind, name, output shape, output value range and bit width, parameters."""
        rows = []
        for i, layer in enumerate(self.layers):
            lo, hi = self.value_ranges[i + 1]
            row: dict[str, object] = {"index": i, "kind": type(layer).__name__, "name": getattr(layer, "name", ""),
                                      "shape": self.shapes[i + 1], "range": (lo, hi), "bits": value_bits(lo, hi)}
            if isinstance(layer, AFFINE_LAYERS):
                row["params"] = layer.weight.size + layer.bias.size
                row["weight_bits"] = value_bits(int(layer.weight.min()), int(layer.weight.max()))
            if isinstance(layer, Requantize):
                k = layer.shift
                kind = "float32" if layer.float32_scale is not None else "affine"
                row["requant"] = (f"/2^{k}" if k is not None else
                                  (kind if len(layer.num) == 1 else f"{kind} per-channel ({len(layer.num)})"))
                row["rounding"] = layer.rounding.value
                row["semantics"] = layer.semantics
            rows.append(row)
        return rows


def pixel_units_network(image_shape: tuple[int, ...], num_outputs: int) -> QNetwork:
    """A placeholder network that only carries units, for writing properties without a model: 8-bit pixels
    ``0..255`` with real value ``pixel / 256`` (the QVIP convention and qverify's own models'), HWC images taken
    channels-first, ``num_outputs`` outputs in identity units. Its single layer is all zeros; never verify it."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 3 and shape[-1] in (1, 3):
        shape = (shape[2], shape[0], shape[1])
    n = int(np.prod(shape))
    zeros = Dense(np.zeros((num_outputs, n), np.int64), np.zeros(num_outputs, np.int64))
    layers: tuple[Layer, ...] = (Flatten(), zeros)
    if len(shape) == 1:
        layers = layers[1:]
    return QNetwork(shape, 0, 255, layers, input_scale=Fraction(1, 256), name="pixel-units",
                    metadata={"placeholder": "units only"})
