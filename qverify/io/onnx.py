"""Importer for quantized ONNX models (QDQ and QOperator forms) and their replay on onnxruntime.

The graph has one input and one output; in between it may branch and join (a :class:`~qverify.network.QNetwork` is a
graph: each node reads the qverify values it names, a tensor read by two nodes is one value read twice). It is read
node by node (ONNX graphs are topologically sorted) into symbolic values; every tensor is one of

* ``Const``    an initializer or ``Constant`` (float or integer);
* ``ConstDQ``  ``DequantizeLinear`` of an integer constant: ``real = s (q - z)`` elementwise (weights, biases);
* ``Quant``    an integer activation: the qverify value that holds its integers;
* ``Real``     ``DequantizeLinear`` of the live activation, ``real = clip(s (q - z), a, b)`` (``Relu``/``Clip`` widen
  nothing: they only narrow the clip interval ``[a, b]``);
* ``Acc``      an integer accumulator (a value), ``real_c = clip(M_c acc_c, a, b)`` per channel ``c``;
* ``RealConcat`` a ``Concat`` of dequantized activations with different ``(s, z)``, quantized part by part;
* ``Softmax``  a final ``Softmax``/``LogSoftmax`` of the dequantized logits (dropped: argmax-preserving).

Mapping (all exact: Python integers and :class:`~fractions.Fraction` of the float32 scales; ``R`` = round half to
even, as ONNX ``QuantizeLinear`` specifies):

* ``MatMul(DQ(x), DQ(W))``, ``Gemm``, ``QLinearMatMul``, ``QGemm``, ``MatMulInteger``: with ``W`` oriented
  ``[out, in]``, ``sum_k (W_ok - zw_ok)(x_k - zx) = sum_k W'_ok x_k + b'_o``, ``W' = W - zw``,
  ``b'_o = -zx sum_k W'_ok``; ``M_o = s_x s_w,o`` (``alpha`` multiplies it);
* ``Conv(DQ(x), DQ(W))``, ``QLinearConv``: the same per output channel, with the input padded by ``zx``
  (``pad_value``: padding means real zero, so padded cells add nothing to ``sum W'(x - zx)``);
* bias: an integer bias whose scale is ``M_o`` (``QLinearConv``'s ``B``, ``QGemm``'s ``C``, or a ``DequantizeLinear``
  int32 bias whose scale equals ``s_x s_w,o`` up to float32 rounding, as ``quantize_static`` writes it) is added to the
  accumulator; any other bias ``c`` (float) is rounded to accumulator units, ``R(c / M_o)`` (recorded in
  ``metadata['onnx_notes']``): float arithmetic has no exact integer counterpart;
* ``QuantizeLinear(s_y, z_y)`` of an accumulator: ``Requantize`` with multiplier ``M_o / s_y``, zero point ``z_y`` and
  clamp ``[max(lo, R(a / s_y) + z_y), min(hi, R(b / s_y) + z_y)]`` where ``[lo, hi]`` is the range of ``z_y``'s type
  (uint8 ``0..255``, int8 ``-128..127``). This is exact because ``R`` is monotone: ``R(clip(v, a, b)) =
  clip(R(v), R(a), R(b))``. A ``Relu`` is ``a = 0``, so it becomes ``lo = max(lo, z_y)``; ``quantize_static`` folds a
  ``Relu`` into the uint8 range (``z_y = 0``), which is the same clamp;
  Under ``semantics="onnxruntime"`` the multiplier is instead onnxruntime's float32 one, ``Requantize.float32``
  with ``m_c = fl32(fl32(s_x s_w,c) / s_y)`` (``QGemm``: ``fl32(fl32(fl32(alpha s_x) s_w,c) / s_y)``) taken from the
  integer kernel onnxruntime runs for the node (:mod:`qverify.io.ort_fusion`), an int32 bias is added as it is, and
  a requantization that no such kernel computes is a :class:`~qverify.network.ModelError` naming the node;
* ``QuantizeLinear`` of a dequantized activation with the same ``(s, z)``: a ``Clamp`` (or nothing); with other
  parameters, an identity affine layer ``acc = x - z`` then ``Requantize(s / s_y)``;
* ``Add(DQ(x), c)``, ``QLinearAdd(x, c)`` with a constant ``c`` (per channel): the exact identity affine layer
  ``acc = D (x - z_x) + D c / s_x`` with ``D`` the least common denominator of ``c / s_x`` and ``M = s_x / D``;
* ``Flatten``/``Reshape``/``Squeeze``/``Unsqueeze``/``Transpose`` of an activation anywhere (also of an accumulator
  before its ``QuantizeLinear``, PT2E): ``Flatten``, ``Reshape``, ``Transpose`` nodes (a transpose that only moves
  axes of size 1 is a reshape); ``Pad`` (constant): ``Pad`` with the integer ``z + c / s``;
* residual ``Add(DQ(a), DQ(b))`` / ``QLinearAdd(a, b)``: ``Add(weights=(m_A, m_B), bias=-(m_A z_A + m_B z_B))`` with
  ``s_A = m_A g / D``, ``s_B = m_B g / D`` (``D`` the larger power-of-two denominator, ``g`` the gcd), real value
  ``(g / D) acc``, then ``Requantize(g / (D s_C), z_C)`` (:meth:`_Importer.add_activations`);
* ``MaxPool`` on integers (QOperator) or between DQ and Q: ``MaxPool2d`` (``ceil_mode`` = extra bottom/right
  padding); DQ -> MaxPool -> Q with other parameters is MaxPool then an identity layer and a ``Requantize``;
* ``AveragePool``/``GlobalAveragePool`` between DQ and Q, ``QLinearAveragePool``/``QLinearGlobalAveragePool``:
  ``SumPool2d`` (weight ``L / count``), an ``Add`` of the zero-point constant, ``Requantize(s_x / (L s_y))``
  (:meth:`_Importer.average`);
* ``Conv``/``QLinearConv`` with ``group``: ``Conv2d(groups=group)``;
* ``Concat``/``QLinearConcat``: each input quantized to the output's ``(s, z)`` (nothing when it has them), then
  ``Concat``;
* ``Identity``, inference ``Dropout``, ``Cast`` that keeps the values, ``Clip`` of constant weights: nothing.

The network's input is the quantized input: for a float graph input followed by ``QuantizeLinear(s_in, z_in)`` the
grid is the range of ``z_in``'s type, ``input_rounding = half_even`` (a ``Transpose`` that reorders the float input
before it, as TensorFlow conversions of NHWC models write it, becomes a ``Transpose`` node after the quantization: the
network input keeps the graph input's layout); for an integer graph input the grid is its type's
range and ``(s_in, z_in)`` come from its first consumer: the first ``DequantizeLinear`` (or quantized operator) it
reaches, also through ``Reshape``/``Flatten`` (a reshape of the input before any layer becomes the network's input
shape), a ``Transpose`` that only moves axes of size 1 (NHWC to NCHW of one channel), ``Cast`` to an integer type that
holds the values, or ``Identity``, as tf2onnx writes it. INT4 / UINT4 initializers (packed two per byte) are unpacked
exactly (``onnx.numpy_helper.to_array``) and keep their 4-bit range as zero points; only data-movement operators may
act on them before their ``DequantizeLinear`` (anything else is refused, naming the initializer and its type).
The output is the last integer tensor: the input of a final
``DequantizeLinear`` (``output_scale``, ``output_zero_point`` from it), a quantized graph output, or a float
accumulator (``output_scale = M``).

Anything else (an unknown operator, ``BatchNormalization`` left in the graph, float arithmetic between DQ and Q other
than the patterns above) is a :class:`~qverify.network.ModelError` that names the file, the operator and the node.
Under ``semantics="onnxruntime"`` the residual add, the non-global average pools and requantizations outside
onnxruntime's integer kernels are refused (named); ``GlobalAveragePool`` follows onnxruntime's kernel exactly.

onnxruntime replay (:func:`onnx_integer_outputs`) is registered with :mod:`qverify.replay` as the runtime of
``format = "onnx"`` networks when this module is imported.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from qverify.io.ort_fusion import FusedKernel, fused_kernels
from qverify.io.qonnx import QONNX_DOMAINS, QonnxOps
from qverify.network import (
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    ModelError,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    SumPool2d,
    Transpose,
)
from qverify.quant import Rounding, round_fraction
from qverify.replay import RuntimeReplay, register_runtime

#: integer ranges of the ONNX tensor element types that can carry quantized values
_INT_RANGES: dict[int, tuple[str, int, int]] = {
    2: ("uint8", 0, 255),
    3: ("int8", -128, 127),
    4: ("uint16", 0, 65535),
    5: ("int16", -32768, 32767),
    6: ("int32", -(2**31), 2**31 - 1),
    21: ("uint4", 0, 15),
    22: ("int4", -8, 7),
}
_NP_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127), np.dtype(np.uint16): (0, 65535),
              np.dtype(np.int16): (-32768, 32767), np.dtype(np.int32): (-(2**31), 2**31 - 1)}
#: relative tolerance under which a bias scale counts as ``s_x s_w`` (float32 rounding of the product: 2^-24)
_BIAS_SCALE_RTOL = Fraction(1, 2**20)
#: largest denominator accepted for an exact identity layer (``Add`` of a constant to an activation)
_MAX_DEN = 2**40
#: operators that only move data: applied to the three arrays of a dequantized constant alike
_MOVE_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")


# ---------------------------------------------------------------------------------------------- symbolic values
@dataclass
class _Const:
    value: np.ndarray


@dataclass
class _ConstDQ:
    """``real = scale * (q - zp)`` elementwise; all three arrays have ``q``'s shape."""

    q: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    node: str
    dtype: str = ""  # the ONNX element type of the stored integers (``int8``, ``uint8``, ``int4``, ...)
    init: str = ""  # the integer initializer it dequantizes (how onnxruntime's fused kernels name their weight)

    def real(self) -> np.ndarray:
        """The exact values, an object array of :class:`Fraction`."""
        f = np.frompyfunc(lambda s, q, z: Fraction(float(s)) * (int(q) - int(z)), 3, 1)
        return f(self.scale, self.q, self.zp)


@dataclass
class _Input:
    """The float graph input, before its ``QuantizeLinear``; ``pending``: data movement of the float input that
    reorders it (an NHWC -> NCHW ``Transpose`` of a TensorFlow conversion), applied to the integers after the
    quantization (``QuantizeLinear`` is elementwise, so it commutes with any data movement); ``base``: the shape
    the network input keeps then."""

    shape: tuple[int, ...]
    pending: tuple = ()
    base: tuple[int, ...] = ()


@dataclass
class _Quant:
    """An integer activation: qverify value ``pos`` (0: the network input, ``i + 1``: node ``i``'s output)."""

    pos: int
    shape: tuple[int, ...]
    lo: int
    hi: int
    scale: Fraction | None = None
    zero_point: int | None = None
    etype: int = 2  # ONNX element type of the tensor
    raw: bool = False  # the integer graph input itself, moved at most by data-movement operators


@dataclass
class _Real:
    """``clip(scale * (q - zero_point), clip_lo, clip_hi)``."""

    q: _Quant
    scale: Fraction
    zero_point: int
    clip: tuple[Fraction | None, Fraction | None] = (None, None)
    #: the float operator between its ``DequantizeLinear`` and here (a MaxPool, a reshape, ...), ``""`` for none
    via: str = ""


@dataclass
class _Acc:
    """``clip(mult_c * acc_c, clip)`` where ``acc`` is qverify value ``pos`` (an integer linear map's output, or a
    data movement of one)."""

    pos: int
    shape: tuple[int, ...]
    mult: list[Fraction]
    clip: tuple[Fraction | None, Fraction | None] = (None, None)
    integer: bool = False  # MatMulInteger output, before its Cast to float
    kernel: str = ""  # the quantized weight initializer of the affine node (``semantics='onnxruntime'`` looks it up)
    #: the node whose bias a following ``Add`` of a constant may change (``pos - 1`` for a Dense/Conv2d output;
    #: ``-1``: none, e.g. a sum pooling, an add of two activations, a reshape of an accumulator)
    src: int = -1
    #: its layer got a bias after it (an ``Add`` of a constant folded): this tensor is gone
    spent: bool = False
    #: ``semantics='onnxruntime'``, a global average pool ``acc = sum (x - z_x)`` over ``n`` cells: ``(s_x, n)``,
    #: requantized by onnxruntime with ``m = fl32(s_x / fl32(s_y fl32(n)))`` (``qverify.quant``)
    ort_gap: tuple[Fraction, int] | None = None
    #: ``semantics='onnxruntime'``, a windowed average pool with one count ``K`` everywhere: ``(s_x, K, S_min,
    #: S_max)``, requantized as onnxruntime's ``QLinearAveragePool`` (a function of ``S = acc``, ``qverify.quant``)
    ort_avg: tuple[Fraction, int, int, int] | None = None


@dataclass
class _RealConcat:
    """``concat(parts, axis)`` of dequantized activations with different ``(s, z)``: quantized part by part."""

    parts: list[_Real]
    axis: int
    shape: tuple[int, ...]


@dataclass
class _Softmax:
    """``Softmax``/``LogSoftmax`` over the classes of the final dequantized output ``inner`` (ONNX tensor
    ``tensor``): strictly increasing in each logit, so the argmax is that of the logits."""

    inner: _Real | _Acc
    tensor: str


@dataclass
class _RealFn:
    """``f(x)`` of a dequantized activation ``x``: an elementwise float function (``Sigmoid``, ``Tanh``,
    ``LeakyRelu``, ``HardSigmoid``, ``HardSwish``) waiting for its ``QuantizeLinear``; ``attrs`` its attributes,
    ``qoperator`` the contrib op it came from (``QLinearSigmoid``...) or ``""`` for a QDQ group."""

    x: _Real
    op: str
    attrs: dict
    qoperator: str = ""


_Sym = _Const | _ConstDQ | _Input | _Quant | _Real | _Acc | _RealConcat | _Softmax | _RealFn


def _shape_of(x: object) -> tuple[int, ...] | None:
    """The per-sample shape of a symbolic value (a real-valued one's is its quantizer's), ``None`` if it has none."""
    return x.q.shape if isinstance(x, _Real) else getattr(x, "shape", None)


def _kind(sym: _Sym) -> str:
    return {_Const: "a constant", _ConstDQ: "a dequantized constant", _Input: "the float graph input",
            _Quant: "a quantized activation", _Real: "a dequantized activation",
            _Acc: "an accumulator (not yet requantized)",
            _RealConcat: "a concatenation of dequantized activations (not yet quantized)",
            _Softmax: "a Softmax of the output",
            _RealFn: "a float function of a dequantized activation (not followed by a QuantizeLinear)"}[type(sym)]


def _etype(lo: int, hi: int) -> int:
    for et, (_, a, b) in _INT_RANGES.items():
        if (a, b) == (lo, hi):
            return et
    raise ModelError(f"no ONNX integer type has the range [{lo}, {hi}]")


def _frac(x: object) -> Fraction:
    """The exact value of a float (or a Fraction, kept as is); a NaN or infinity is a :class:`ModelError` (the
    node that reads it adds its place)."""
    if isinstance(x, Fraction):
        return x
    v = float(x)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ModelError(f"non-finite value {v} where a real number is needed")
    return Fraction(v)


#: most values in one input sample (224 x 224 x 3 images have 150528)
_MAX_INPUT_SIZE = 2**26
#: fewest inputs of each operator the importer reads (optional inputs in between are empty names)
_MIN_INPUTS = {"QuantizeLinear": 2, "DequantizeLinear": 2, "MatMul": 2, "Gemm": 2, "Conv": 2, "Add": 2, "Mul": 2,
               "Relu": 1, "Clip": 1, "Identity": 1, "Reshape": 2, "Flatten": 1, "Transpose": 1, "Squeeze": 1,
               "Unsqueeze": 1, "Cast": 1, "Shape": 1, "QLinearMatMul": 8, "QLinearConv": 8, "QGemm": 6,
               "MatMulInteger": 2, "QLinearAdd": 7, "Constant": 0, "QLinearAveragePool": 4,
               "QLinearGlobalAveragePool": 4, "QLinearConcat": 5, "Pad": 1, "Concat": 1, "MaxPool": 1,
               "BatchNormalization": 5, "Quant": 4, "BipolarQuant": 2, "Trunc": 5}


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


# ---------------------------------------------------------------------------------------------- the importer
@dataclass
class _Importer(QonnxOps):  # QONNX Quant / BipolarQuant / Trunc: qverify/io/qonnx.py
    path: Path
    model: Any
    syms: dict[str, _Sym] = field(default_factory=dict)
    layers: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    input_name: str = ""
    input_shape_full: tuple[int, ...] = ()
    input_dtype: str = ""
    input_lo: int = 0
    input_hi: int = 0
    input_scale: Fraction | None = None
    input_zero_point: int | None = None
    input_rounding: Rounding | None = None
    forms: set[str] = field(default_factory=set)
    net_input_shape: tuple[int, ...] = ()
    tensors: dict[int, tuple[str, int]] = field(default_factory=dict)
    node: Any = None
    #: constants stored as INT4 / UINT4 (unpacked to int8 / uint8 arrays): name -> ONNX element type
    narrow: dict[str, int] = field(default_factory=dict)
    #: ``exact`` (the ONNX specification's rational requantization) or ``onnxruntime`` (its float32 kernels)
    semantics: str = "exact"
    #: under ``onnxruntime``: the integer kernels of onnxruntime's optimized graph, by quantized weight initializer
    fused: dict = field(default_factory=dict)
    #: per affine layer index: (activation type, weight type, form of the node: ``QDQ`` or ``QOperator``)
    affine_types: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    #: per node: the qverify values it reads (the graph of the network being built)
    inputs: list[tuple[int, ...]] = field(default_factory=list)
    #: values some node reads already: their producing layer can no longer change (a bias folded later)
    sealed: set[int] = field(default_factory=set)
    #: per accumulator value: the exact fractions ``c / M - R(c / M)`` of a float bias rounded into its layer, and
    #: the node that added it (QONNX ``Quant`` keeps them exactly: :mod:`qverify.io.qonnx`)
    bias_residual: dict[int, list[Fraction]] = field(default_factory=dict)
    bias_residual_node: dict[int, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ errors and lookups
    def where(self) -> str:
        n = self.node
        if n is None:
            return f"{self.path}"
        dom = f" ({n.domain})" if n.domain not in ("", "ai.onnx") else ""
        return f"{self.path}: node {n.name or '<unnamed>'!r} ({n.op_type}{dom})"

    def error(self, msg: str) -> ModelError:
        return ModelError(f"{self.where()}: {msg}")

    def get(self, name: str) -> _Sym | None:
        if not name:
            return None
        if name not in self.syms:
            raise self.error(f"input {name!r} is not produced by any earlier node")
        return self.syms[name]

    def const(self, name: str, what: str) -> np.ndarray | None:
        sym = self.get(name)
        if sym is None:
            return None
        if not isinstance(sym, _Const):
            raise self.error(f"{what} ({name!r}) must be a constant, got {_kind(sym)}")
        return sym.value

    def scalar_scale(self, name: str, what: str) -> Fraction:
        v = self.const(name, what)
        if v is None:
            raise self.error(f"{what} is missing")
        if v.size != 1:
            raise self.error(f"{what} must be a single value (per-tensor) here, got shape {v.shape}")
        s = _frac(v.ravel()[0])
        if s <= 0:
            raise self.error(f"{what} must be positive, got {float(s)}")
        return s

    def zero_point(self, name: str, what: str, default_type: int = 2) -> tuple[int, int, int]:
        """``(z, lo, hi)``: a per-tensor zero point and the range of its type (uint8 when absent)."""
        sym = self.get(name)
        if sym is None:
            _, lo, hi = _INT_RANGES[default_type]
            return 0, lo, hi
        if not isinstance(sym, _Const):
            raise self.error(f"{what} ({name!r}) must be a constant")
        v = sym.value
        if v.size != 1:
            raise self.error(f"{what} must be a single value (per-tensor) here, got shape {v.shape}")
        if name in self.narrow:
            _, lo, hi = _INT_RANGES[self.narrow[name]]
        elif v.dtype in _NP_RANGES:
            lo, hi = _NP_RANGES[v.dtype]
        else:
            raise self.error(f"{what} {name!r} has unsupported type {v.dtype} (quantized types: uint8, int8, "
                             f"uint16, int16, int32, uint4, int4)")
        return int(v.ravel()[0]), lo, hi

    def attr(self, name: str, default: object = None) -> object:
        from onnx import helper

        for a in self.node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                v = v.decode(errors="replace") if isinstance(v, bytes) else v
                if default is None:
                    return v
                # the attribute must have the type of its default (the operator's schema type)
                ok = (isinstance(v, int) if isinstance(default, int) else
                      isinstance(v, (int, float)) and math.isfinite(v) if isinstance(default, float) else
                      isinstance(v, str) if isinstance(default, str) else
                      isinstance(v, list) and all(isinstance(e, int) for e in v) if isinstance(default, list) else
                      True)
                if not ok:
                    raise self.error(f"attribute {name!r} must be {type(default).__name__} like {default!r}, got "
                                     f"{v!r}"[:300])
                return v
        return default

    def append(self, layer: Any, ins: Sequence[int]) -> int:
        """Add node ``layer`` reading the values ``ins``; returns the index of its output value."""
        self.layers.append(layer)
        self.inputs.append(tuple(int(v) for v in ins))
        self.sealed.update(ins)
        return len(self.layers)

    def take(self, sym: _Sym) -> None:
        """An accumulator whose layer was changed after it (a bias added: ``spent``) is no tensor anymore."""
        if isinstance(sym, _Acc) and sym.spent:
            raise self.error("the accumulator before a folded bias is read by another node too (the bias was added "
                             "to its layer): not supported")

    # ------------------------------------------------------------------ layer builders
    def expand(self, param: np.ndarray, axis: int, shape: tuple[int, ...], what: str) -> np.ndarray:
        """Broadcast a per-tensor or per-axis quantization parameter to ``shape``."""
        p = np.asarray(param)
        if p.size == 1:
            return np.broadcast_to(p.reshape(()), shape).copy()
        if p.ndim != 1:
            raise self.error(f"{what} of shape {p.shape}: blocked quantization is not supported")
        ax = axis + len(shape) if axis < 0 else axis
        if not 0 <= ax < len(shape) or shape[ax] != p.size:
            raise self.error(f"{what} has {p.size} values for axis {axis} of a tensor of shape {shape}")
        view = [1] * len(shape)
        view[ax] = p.size
        return np.broadcast_to(p.reshape(view), shape).copy()

    def per_channel(self, arr: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        """A constant broadcast against a batched activation of per-sample ``shape``: its per-channel vector."""
        a = np.asarray(arr)
        try:
            b = np.broadcast_to(a, (1, *shape) if a.ndim > len(shape) else shape)
        except ValueError:
            raise self.error(f"{what} of shape {a.shape} does not broadcast to the activation {shape}") from None
        if b.ndim == len(shape) + 1:
            b = b[0]
        if len(shape) == 1:
            return np.array(b)
        if len(shape) == 3:
            ch = b[:, :1, :1]
            if not np.all(b == ch):
                raise self.error(f"{what} of shape {a.shape} varies within a channel: only per-channel constants "
                                 f"can be folded into a layer")
            return np.array(ch[:, 0, 0])
        raise self.error(f"activation of shape {shape} is not supported")

    def weight_oriented(self, w: _ConstDQ, transpose: bool, what: str) -> tuple[np.ndarray, list[Fraction]]:
        """``W'`` (``[out, ...]``, zero point folded) and the per-output-channel weight scales."""
        q, s, z = w.q, w.scale, w.zp
        if q.size == 0:
            raise self.error(f"{what} is empty (shape {q.shape})")
        if transpose:
            q, s, z = q.T, s.T, z.T
        sflat = s.reshape(s.shape[0], -1)
        if not np.all(np.isfinite(sflat)):
            raise self.error(f"{what} scale has a non-finite value ({sflat[~np.isfinite(sflat)][0]})")
        if not np.all(sflat == sflat[:, :1]):
            raise self.error(f"{what} scale varies along the reduction axis (blocked or per-input-channel "
                             f"quantization is not supported)")
        scales = [_frac(v) for v in sflat[:, 0]]
        if min(scales) <= 0:
            raise self.error(f"{what} scales must be positive")
        if len(set(scales)) == 1:
            scales = scales[:1]  # per-tensor
        return (q - z).astype(np.int64), scales

    def dense(self, x: _Real, w: _ConstDQ, transpose: bool, alpha: float = 1.0) -> _Acc:
        """``MatMul``/``Gemm`` of a dequantized activation by a dequantized weight (``transpose``: ``W`` is
        ``[in, out]`` as in ``MatMul``)."""
        self.take(x)
        if x.clip != (None, None):
            raise self.error("Relu/Clip of a dequantized activation must be followed by QuantizeLinear")
        if len(x.q.shape) != 1:
            raise self.error(f"MatMul/Gemm input must be [batch, n], got per-sample shape {x.q.shape}")
        if w.q.ndim != 2:
            raise self.error(f"weight must be 2-D, got shape {w.q.shape}")
        wp, ws = self.weight_oriented(w, transpose, "weight")
        if wp.shape[1] != x.q.shape[0]:
            raise self.error(f"weight of shape {w.q.shape} does not match input size {x.q.shape[0]}")
        bias = -x.zero_point * wp.sum(axis=1)
        v = self.append(Dense(wp, bias, name=self.node.name), (x.q.pos,))
        self.record_types(x, w)
        mult = [x.scale * s * _frac(alpha) for s in ws]
        return _Acc(v, (wp.shape[0],), mult, kernel=w.init, src=v - 1)

    def conv(self, x: _Real, w: _ConstDQ) -> _Acc:
        self.take(x)
        if x.clip != (None, None):
            raise self.error("Relu/Clip of a dequantized activation must be followed by QuantizeLinear")
        if len(x.q.shape) != 3 or w.q.ndim != 4:
            raise self.error(f"only 2-D convolutions are supported (input {x.q.shape}, weight {w.q.shape})")
        group = int(self.attr("group", 1))
        if group < 1 or x.q.shape[0] != w.q.shape[1] * group or w.q.shape[0] % group:
            raise self.error(f"convolution with group={group}: weight {w.q.shape} does not fit the input "
                             f"{x.q.shape} (weight [O, C / group, kh, kw] with group dividing O)")
        wp, ws = self.weight_oriented(w, False, "weight")
        kh, kw = wp.shape[2:]
        strides = tuple(self.attr("strides", [1, 1]))
        dil = tuple(self.attr("dilations", [1, 1]))
        pads = self.spatial_pads(x.q.shape, (kh, kw), strides, dil)
        wsum = wp.reshape(wp.shape[0], -1).sum(axis=1)
        layer = Conv2d(wp, -x.zero_point * wsum, stride=strides, padding=pads, dilation=dil,
                       pad_value=x.zero_point, name=self.node.name, groups=group)
        try:
            shape = layer.output_shape(x.q.shape)
        except ModelError as e:
            raise self.error(str(e)) from None
        v = self.append(layer, (x.q.pos,))
        self.record_types(x, w)
        return _Acc(v, shape, [x.scale * s for s in ws], kernel=w.init, src=v - 1)

    def spatial_pads(self, shape: tuple[int, ...], kernel: tuple[int, int], strides: Sequence[int],
                     dil: Sequence[int]) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` from ``pads`` (ONNX order ``[top, left, bottom, right]``) or ``auto_pad``
        (``SAME_*``: total ``(ceil(H / s) - 1) s + (k - 1) d + 1 - H``, the odd cell at the end for ``SAME_UPPER``)."""
        if len(shape) != 3:
            raise self.error(f"only 2-D spatial operators are supported (input {shape})")
        auto_pad = self.attr("auto_pad", "NOTSET")
        if auto_pad in ("NOTSET", ""):
            pads = tuple(int(p) for p in self.attr("pads", [0, 0, 0, 0]))
        elif auto_pad == "VALID":
            pads = (0, 0, 0, 0)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            tot = []
            for size, k, s, d in zip(shape[1:], kernel, strides, dil, strict=True):
                out = -(-size // s)
                tot.append(max(0, (out - 1) * s + (k - 1) * d + 1 - size))
            small = [t // 2 for t in tot]
            big = [t - t // 2 for t in tot]
            pads = (*small, *big) if auto_pad == "SAME_UPPER" else (*big, *small)
        else:
            raise self.error(f"unknown auto_pad {auto_pad!r}")
        if len(pads) != 4 or min(pads) < 0:
            raise self.error(f"pads must be 4 non-negative integers, got {list(pads)}")
        return pads  # type: ignore[return-value]

    def record_types(self, x: _Real, w: _ConstDQ) -> None:
        """Remember the element types of the affine layer just built: which onnxruntime kernel runs it
        (:func:`ort_may_clip`). ``MatMul``/``Gemm``/``Conv`` on dequantized values are the QDQ form."""
        form = "QDQ" if self.node.op_type in ("MatMul", "Gemm", "Conv") else "QOperator"
        act = _INT_RANGES[x.q.etype][0] if x.q.etype in _INT_RANGES else "?"
        self.affine_types[len(self.layers) - 1] = (act, w.dtype or "?", form)

    def type_name(self, name: str, arr: np.ndarray) -> str:
        """The ONNX element type name of a constant (``int4`` / ``uint4`` for the unpacked 4-bit ones)."""
        return _INT_RANGES[self.narrow[name]][0] if name in self.narrow else str(arr.dtype)

    def bias_units(self, v: int, channel: int) -> int:
        """A bias in accumulator units, refused beyond 2^53 (accumulators are exact below it)."""
        if abs(v) >= 2**53:
            raise self.error(f"bias of channel {channel} is {v} accumulator units (|bias| >= 2^53: the scales are "
                             f"too small for an exact integer layer)")
        return v

    def set_bias(self, acc: _Acc, add: np.ndarray) -> None:
        """Add ``add`` to the bias of the layer that computes ``acc`` (which no node may read yet)."""
        idx = acc.pos - 1
        if acc.src != idx or acc.pos in self.sealed:
            raise self.error("a constant added to an accumulator that is not a fresh Dense/Conv output (it is read "
                             "by another node, or moved, pooled or added): cannot be folded into a bias")
        layer = self.layers[idx]
        self.layers[idx] = replace(layer, bias=layer.bias + np.asarray(add, dtype=np.int64))
        acc.spent = True

    def add_int_bias(self, acc: _Acc, b: np.ndarray) -> _Acc:
        """An integer bias in accumulator units (``QLinearConv``'s ``B``, ``QGemm``'s ``C``)."""
        self.take(acc)
        vec = self.per_channel(np.asarray(b, dtype=np.int64), acc.shape, "bias")
        self.set_bias(acc, np.broadcast_to(vec, (acc.shape[0],)))
        return replace(acc, spent=False)

    def add_const_to_acc(self, acc: _Acc, c: _Const | _ConstDQ) -> _Acc:
        self.take(acc)
        if acc.clip != (None, None):
            raise self.error("Add after Relu/Clip of an accumulator cannot be folded into the layer")
        n = acc.shape[0]
        mult = acc.mult if len(acc.mult) == n else acc.mult * n
        out = np.zeros(n, dtype=np.int64)
        rounded = 0
        if isinstance(c, _ConstDQ):
            qv = np.broadcast_to(self.per_channel(c.q, acc.shape, "bias"), (n,))
            sv = np.broadcast_to(self.per_channel(c.scale, acc.shape, "bias scale"), (n,))
            zv = np.broadcast_to(self.per_channel(c.zp, acc.shape, "bias zero point"), (n,))
            approx = 0
            if self.semantics == "onnxruntime":
                if c.q.dtype.kind not in "iu" or np.any(zv != 0):
                    raise self.error(f"semantics='onnxruntime': bias {c.node!r} must be integers with zero point 0 "
                                     f"(onnxruntime's fused kernels add the int32 bias as it is)")
                self.set_bias(acc, np.asarray(qv, dtype=np.int64))
                return replace(acc, spent=False)
            for i in range(n):
                sb = _frac(sv[i])
                if sb == mult[i] or abs(sb / mult[i] - 1) <= _BIAS_SCALE_RTOL:
                    out[i] = int(qv[i]) - int(zv[i])
                    approx += sb != mult[i]
                else:
                    out[i] = self.bias_units(round_fraction(sb * (int(qv[i]) - int(zv[i])) / mult[i],
                                                            Rounding.HALF_EVEN), i)
                    rounded += 1
            if approx:
                self.notes.append(f"{self.node.name}: integer bias {c.node!r} has scale s_x*s_w up to float32 "
                                  f"rounding ({approx} channels); added to the accumulator as is")
        else:
            kernel = ""  # a float bias is no input of onnxruntime's integer kernels (semantics='onnxruntime')
            cv = np.broadcast_to(self.per_channel(c.value.astype(np.float64), acc.shape, "bias"), (n,))
            exact = []
            for i in range(n):
                f = _frac(cv[i]) / mult[i]
                out[i] = self.bias_units(round_fraction(f, Rounding.HALF_EVEN), i)
                rounded += f.denominator != 1
                exact.append(f - int(out[i]))
            prev = self.bias_residual.get(acc.pos, [Fraction(0)] * n)  # a second float Add: the fractions add
            self.bias_residual[acc.pos] = [a + b for a, b in zip(prev, exact, strict=True)]
            self.bias_residual_node[acc.pos] = self.node.name
        if rounded:
            self.notes.append(f"{self.node.name}: real bias rounded to accumulator units R(c/(s_x*s_w)) "
                              f"({rounded} channels)")
        self.set_bias(acc, out)
        return replace(acc, spent=False) if isinstance(c, _ConstDQ) else replace(acc, kernel=kernel, spent=False)

    def identity(self, x: _Real, offset: np.ndarray | None) -> _Acc:
        """The exact identity affine layer ``acc = D (x - z) + D c / s``, ``M = s / D`` (``c`` per channel)."""
        shape = x.q.shape
        n = shape[0]
        ratios = [Fraction(0)] * n
        if offset is not None:
            if x.clip != (None, None):
                raise self.error("Add after Relu/Clip of a dequantized activation is not supported")
            vec = np.broadcast_to(self.per_channel(offset, shape, "added constant"), (n,))
            ratios = [_frac(v) / x.scale for v in vec]
        d = _lcm([r.denominator for r in ratios])
        if d > _MAX_DEN:
            raise self.error(f"the added constant needs a common denominator {d} > 2^40 relative to the input "
                             f"scale: no exact integer layer")
        bias = np.array([self.bias_units(int(r * d) - d * x.zero_point, i) for i, r in enumerate(ratios)],
                        dtype=np.int64)
        if len(shape) == 1:
            layer = Dense(d * np.eye(n, dtype=np.int64), bias, name=f"{self.node.name}/identity")
        elif len(shape) == 3:
            w = (d * np.eye(n, dtype=np.int64))[:, :, None, None]
            layer = Conv2d(w, bias, name=f"{self.node.name}/identity")
        else:
            raise self.error(f"activation of shape {shape} is not supported")
        v = self.append(layer, (x.q.pos,))
        return _Acc(v, shape, [x.scale / d], x.clip, src=v - 1)

    def clipped_range(self, clip: tuple, s: Fraction, z: int, lo: int, hi: int) -> tuple[int, int]:
        """``[lo, hi]`` narrowed by a real clip interval ``(a, b)`` (``None`` = open) quantized with scale ``s`` and
        zero point ``z``: ``lo' = max(lo, R(a / s) + z)``, ``hi' = min(hi, R(b / s) + z)``, R half-even."""
        a, b = clip
        if a is not None:
            lo = max(lo, round_fraction(a / s, Rounding.HALF_EVEN) + z)
        if b is not None:
            hi = min(hi, round_fraction(b / s, Rounding.HALF_EVEN) + z)
        if lo > hi:
            raise self.error(f"the clip interval leaves no integer output (range [{lo}, {hi}])")
        return lo, hi

    def requantize(self, acc: _Acc, s: Fraction, z: int, lo: int, hi: int, name: str) -> _Quant:
        self.take(acc)
        if acc.integer:
            raise self.error("integer accumulator must be Cast to float before QuantizeLinear")
        etype = _etype(lo, hi)
        lo, hi = self.clipped_range(acc.clip, s, z, lo, hi)
        if self.semantics == "onnxruntime" and acc.ort_avg is not None:
            from qverify.quant import ort_avgpool_from_sum

            if acc.clip != (None, None):
                raise self.error("semantics='onnxruntime': Relu/Clip between AveragePool and QuantizeLinear")
            sx, count, smin, smax = acc.ort_avg
            ss = np.arange(smin, smax + 1, dtype=np.int64)
            ys = ort_avgpool_from_sum(ss, count, float(sx), float(s), int(z), lo, hi).astype(np.int64)
            return self.table_step(acc.pos, ss, ys, acc.shape, s, z, lo, hi, name)
        if self.semantics == "onnxruntime" and acc.ort_gap is not None:
            from qverify.quant import ort_global_avgpool_multiplier

            try:
                m32 = [float(ort_global_avgpool_multiplier(float(acc.ort_gap[0]), float(s), acc.ort_gap[1]))]
            except ValueError as e:
                raise self.error(f"semantics='onnxruntime': {e}") from None
            layer = Requantize.float32(m32, z, lo, hi, name=name)
        elif self.semantics == "onnxruntime":
            m32 = self.ort_multiplier(acc, s)
            try:
                layer = Requantize.float32(m32, z, lo, hi, name=name)
            except ModelError as e:
                raise self.error(f"semantics='onnxruntime': {e}") from None
        else:
            layer = Requantize.affine([m / s for m in acc.mult], z, lo, hi, Rounding.HALF_EVEN, name=name)
        return _Quant(self.append(layer, (acc.pos,)), acc.shape, lo, hi, s, z, etype)

    def ort_kernel(self, acc: _Acc) -> FusedKernel:
        """The onnxruntime integer kernel that computes ``acc`` (``semantics='onnxruntime'``), or a ModelError that
        says why onnxruntime's arithmetic there is not modelled."""
        k = self.fused.get(acc.kernel) if acc.kernel else None
        src = self.layers[acc.pos - 1].name if acc.pos else ""
        if not acc.kernel and src.endswith("/identity"):
            raise self.error(f"semantics='onnxruntime': node {src.removesuffix('/identity')!r} (an Add of a constant, "
                             f"QLinearAdd, or a new quantization of a dequantized value) is not one of onnxruntime's "
                             f"integer matrix kernels: onnxruntime computes it in float32 (QLinearAdd in float or "
                             f"fixed point depending on the CPU), which qverify does not model; use semantics='exact'")
        if k is None or (src and k.name and k.name != src):
            what = f"node {src!r}" if src else "this requantization"
            raise self.error(f"semantics='onnxruntime': onnxruntime does not run {what} as a fused integer kernel "
                             f"(QLinearMatMul, QLinearConv, QGemm) but in float32 between DequantizeLinear and "
                             f"QuantizeLinear (or with a kernel qverify does not model): its result depends on the "
                             f"float32 evaluation order, so qverify cannot state onnxruntime's function exactly; "
                             f"use semantics='exact'")
        return k

    def ort_multiplier(self, acc: _Acc, s: Fraction) -> list[float]:
        """onnxruntime's float32 multipliers ``m_c`` for requantizing ``acc`` to scale ``s``
        (:mod:`qverify.io.ort_fusion`), one per tensor or per channel."""
        k = self.ort_kernel(acc)
        if k.y_scale == 0.0 or Fraction(k.y_scale) != s:
            raise self.error(f"semantics='onnxruntime': onnxruntime's kernel {k.name!r} requantizes to scale "
                             f"{k.y_scale!r}, not to this QuantizeLinear's {float(s)!r}")
        m = list(k.multiplier)
        if len(set(m)) == 1:
            m = m[:1]
        if len(m) not in (1, acc.shape[0]) or (len(acc.mult) > 1 and len(m) != len(acc.mult)):
            raise self.error(f"semantics='onnxruntime': kernel {k.name!r} has {len(m)} multipliers for "
                             f"{acc.shape[0]} channels")
        return m

    def quantize_real(self, x: _Real, s: Fraction, z: int, lo: int, hi: int, name: str, in_kernel: bool = False
                      ) -> _Quant:
        """``Q(clip(DQ(q)))``: a clamp (or nothing) with the same parameters; with new ones an identity layer and a
        ``Requantize`` (``exact``), or under ``semantics='onnxruntime'`` onnxruntime's float32 table
        (:meth:`ort_requantize_step`) where onnxruntime computes that table: inside ``QLinearConcat`` (``in_kernel``)
        or around a float operator between the ``DequantizeLinear`` and the ``QuantizeLinear`` (``x.via``). A bare
        ``DQ -> Q`` pair with new parameters is refused there: onnxruntime's graph transformers may rewrite such
        pairs (double-QDQ removal), so the arithmetic it runs is not fixed by the graph."""
        if s == x.scale and z == x.zero_point and (lo, hi) == (_INT_RANGES[x.q.etype][1:]):
            # Q(clip(DQ(q))) with the same parameters and type: a clamp
            qlo, qhi = self.clipped_range(x.clip, s, z, max(lo, x.q.lo), min(hi, x.q.hi))
            if (qlo, qhi) == (x.q.lo, x.q.hi):
                return _Quant(x.q.pos, x.q.shape, qlo, qhi, s, z, x.q.etype, x.q.raw)
            return _Quant(self.append(Clamp(qlo, qhi, name=name), (x.q.pos,)), x.q.shape, qlo, qhi, s, z, x.q.etype)
        if self.semantics == "onnxruntime" and (in_kernel or x.via):
            return self.ort_requantize_step(x, s, z, lo, hi, name)
        return self.requantize(self.identity(x, None), s, z, lo, hi, name)

    def ort_requantize_step(self, x: _Real, s: Fraction, z: int, lo: int, hi: int, name: str) -> _Quant:
        """``semantics='onnxruntime'``: a dequantized activation quantized with new parameters, as onnxruntime
        computes it (``QLinearConcat``'s lookup table, or the separate float kernels of an unfused ``DQ -> Q`` /
        ``DQ -> MaxPool/Reshape/Transpose -> Q``; ``encodings/graph_ops.md``): ``y = clamp(rne(fl32(fl32(s_x (q -
        z_x)) / s_y)) + z_y)``, a non-decreasing function of the one integer ``q`` (:func:`qverify.quant.
        ort_requantize`), evaluated on every ``q`` of its range and stored exactly as a ``Step`` (cut points: the
        first ``q`` of each level)."""
        from qverify.quant import ort_requantize

        if x.clip != (None, None):
            raise self.error("semantics='onnxruntime': a Relu/Clip between DequantizeLinear and a QuantizeLinear with "
                             "new parameters runs in float32 kernels qverify does not model; use semantics='exact'")
        if x.q.hi - x.q.lo > 1 << 16:
            raise self.error(f"semantics='onnxruntime': requantizing a value of range [{x.q.lo}, {x.q.hi}] by table "
                             f"is too wide")
        qs = np.arange(x.q.lo, x.q.hi + 1, dtype=np.int64)
        ys = ort_requantize(qs, float(x.scale), int(x.zero_point), float(s), int(z), lo, hi).astype(np.int64)
        return self.table_step(x.q.pos, qs, ys, x.q.shape, s, z, lo, hi, name)

    def table_step(self, src: int, qs: np.ndarray, ys: np.ndarray, shape: tuple[int, ...], s: Fraction, z: int,
                   lo: int, hi: int, name: str) -> _Quant:
        """The non-decreasing integer function ``q -> y`` given on every ``q`` of value ``src``'s range (``qs``
        consecutive) as a ``Step`` node: levels = its values, cut point of each level = the first ``q`` reaching
        it (exact, no interpolation)."""
        from qverify.network import Step

        if np.any(np.diff(ys) < 0):
            raise self.error("semantics='onnxruntime': onnxruntime's requantization table is not monotone")
        levels = sorted({int(v) for v in ys})
        if len(levels) == 1:
            layer: Any = Clamp(levels[0], levels[0], name=name)
        else:
            cuts = [int(qs[np.searchsorted(ys, v, side="left")]) for v in levels[1:]]
            layer = Step(np.array([cuts], dtype=np.int64), tuple(levels), name=name)
        return _Quant(self.append(layer, (src,)), shape, levels[0], levels[-1], s, z, _etype(lo, hi))

    def flatten_to(self, sym: _Sym, target: tuple[int, ...]) -> _Sym:
        """Reshape to per-sample ``target`` (C order): a ``Flatten`` node when ``target`` is a vector, else a
        ``Reshape`` node (the integer graph input itself, before any node, takes the new shape instead)."""
        if isinstance(sym, _Input):
            if int(np.prod(target)) != int(np.prod(sym.shape)):
                raise self.error(f"cannot reshape the input {sym.shape} to {target}")
            if sym.pending:
                op = Flatten(name=self.node.name) if len(target) == 1 else Reshape(target, name=self.node.name)
                return _Input(target, (*sym.pending, (op, target)), sym.base)
            return _Input(target)
        if isinstance(sym, _Acc):
            return self.move_acc(sym, target)
        q = sym.q if isinstance(sym, _Real) else sym
        if not isinstance(q, _Quant):
            raise self.error(f"Flatten/Reshape of {_kind(sym)} is not supported")
        if target == q.shape:
            return sym
        if int(np.prod(target)) != int(np.prod(q.shape)) or min(target, default=1) < 1:
            raise self.error(f"cannot reshape {q.shape} to {target}")
        if q.raw and q.pos == 0 and not self.layers and target != (int(np.prod(q.shape)),):
            # the integer graph input itself, before any layer: the network's input takes the new shape (C order)
            self.net_input_shape = target
            self.notes.append(f"input reshaped from {self.input_shape_full[1:]} to {target}")
            nq = replace(q, shape=target)
            return replace(sym, q=nq) if isinstance(sym, _Real) else nq
        op = Flatten(name=self.node.name) if len(target) == 1 else Reshape(target, name=self.node.name)
        return self.move_act(sym, op, target)

    def move_act(self, sym: _Quant | _Real, op: Any, shape: tuple[int, ...], fill: int | None = None) -> _Quant | _Real:
        """A data-movement node ``op`` on an activation (``fill``: the constant it may output, a pad value): the
        integers move, the real interpretation ``s (q - z)`` (and a pending clip) stays."""
        q = sym.q if isinstance(sym, _Real) else sym
        lo, hi = (q.lo, q.hi) if fill is None else (min(q.lo, fill), max(q.hi, fill))
        nq = _Quant(self.append(op, (q.pos,)), shape, lo, hi, q.scale, q.zero_point, q.etype, q.raw)
        return replace(sym, q=nq, via=op.name or op.kind) if isinstance(sym, _Real) else nq

    def move_acc(self, acc: _Acc, target: tuple[int, ...], perm: tuple[int, ...] | None = None) -> _Acc:
        """A ``Reshape`` (or ``Transpose`` with ``perm``) of an accumulator before its requantization (PT2E
        exports): the requantization's channels are axis 0 of the moved value, so a per-channel multiplier must
        stay on axis 0 (a reshape that keeps the leading dimension, a transpose that keeps axis 0)."""
        self.take(acc)
        if acc.integer:
            raise self.error("movement of an integer accumulator before its Cast is not supported")
        if target == acc.shape and perm is None:
            return acc
        if len(set(acc.mult)) > 1 and not (target and acc.shape and target[0] == acc.shape[0] == len(acc.mult)
                                           and (perm is None or perm[0] == 0)):
            raise self.error(f"movement of an accumulator with per-channel scales from {acc.shape} to {target} moves "
                             f"its channel axis: not supported")
        if perm is not None:
            op: Any = Transpose(perm, name=self.node.name)
        else:
            if int(np.prod(target)) != int(np.prod(acc.shape)):
                raise self.error(f"cannot reshape {acc.shape} to {target}")
            op = Flatten(name=self.node.name) if len(target) == 1 else Reshape(target, name=self.node.name)
        mult = acc.mult if len(set(acc.mult)) > 1 else acc.mult[:1]
        return _Acc(self.append(op, (acc.pos,)), target, list(mult), acc.clip, kernel="")

    def use_input_params(self, q: _Quant, s: Fraction, z: int) -> None:
        """An integer graph input takes its real interpretation ``s (x - z)`` from its first consumer: the first
        ``DequantizeLinear`` (or quantized operator) it reaches, also after ``Reshape``, ``Flatten``, a ``Transpose``
        that keeps the memory order, ``Cast`` or ``Identity`` (tf2onnx reshapes an int8 input before its first
        ``DequantizeLinear``)."""
        if self.input_scale is None and q.raw and self.input_dtype != "float":
            self.input_scale, self.input_zero_point = s, z
            q.scale, q.zero_point = s, z

    # ------------------------------------------------------------------ node handlers
    def run(self) -> QNetwork:
        from onnx import numpy_helper

        graph = self.model.graph
        for init in graph.initializer:
            try:
                arr = numpy_helper.to_array(init)
            except Exception as e:
                raise self.error(f"initializer {init.name!r} (element type {init.data_type}) cannot be read: "
                                 f"{e}") from None
            self.syms[init.name] = _Const(self.unpack_narrow(init.name, arr, init.data_type))
        inputs = [i for i in graph.input if i.name not in self.syms]
        if len(inputs) != 1:
            raise self.error(f"expected one graph input, found {len(inputs)} ({[i.name for i in inputs]})")
        self.start(inputs[0])
        for node in graph.node:
            self.node = node
            self.visit(node)
        self.node = None
        if len(graph.output) != 1:
            raise self.error(f"expected one graph output, found {len(graph.output)}")
        return self.finish(graph.output[0].name)

    def start(self, inp: Any) -> None:
        tt = inp.type.tensor_type
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif i == 0:
                dims.append(-1)
            else:
                raise self.error(f"input {inp.name!r}: dimension {i} is not static ({d.dim_param!r})")
        if len(dims) < 2:
            raise self.error(f"input {inp.name!r} must be [batch, ...], got shape {dims}")
        if min(dims[1:]) < 1 or math.prod(dims[1:]) > _MAX_INPUT_SIZE or dims[0] == 0:
            raise self.error(f"input {inp.name!r} has shape {dims}: every dimension must be positive and a sample "
                             f"at most {_MAX_INPUT_SIZE} values")
        self.input_name = inp.name
        self.input_shape_full = tuple(dims)
        shape = tuple(dims[1:])
        et = tt.elem_type
        if et in (1, 10, 11, 16):  # float, float16, double, bfloat16
            self.input_dtype = "float"
            self.syms[inp.name] = _Input(shape)
        elif et in _INT_RANGES and et != 6:
            self.input_dtype, self.input_lo, self.input_hi = _INT_RANGES[et]
            self.syms[inp.name] = _Quant(0, shape, self.input_lo, self.input_hi, etype=et, raw=True)
            self.net_input_shape = shape
        else:
            raise self.error(f"input {inp.name!r} has unsupported element type {et}")

    def visit(self, node: Any) -> None:
        op = node.op_type
        dom = node.domain if node.domain not in ("ai.onnx",) else ""
        handler = getattr(self, f"op_{op}", None)
        if (handler is not None and dom == "" and op not in ("Constant", "QuantizeLinear", "DequantizeLinear")
                and node.input and self.all_const(node)):
            handler = None  # constants only (shape arithmetic, weight preprocessing): evaluated, whatever the op
        if dom not in ("", "com.microsoft", *QONNX_DOMAINS) or handler is None:
            if self.all_const(node) and dom == "":
                self.fold(node)
                return
            raise self.error(f"unsupported operator {op!r}" + (f" (domain {dom!r})" if dom else ""))
        need = _MIN_INPUTS.get(op, 1)
        if len(node.input) < need or any(not node.input[k] for k in range(min(need, 2))) or not node.output:
            raise self.error(f"needs at least {need} inputs (the first {min(need, 2)} named) and an output, got "
                             f"inputs {list(node.input)} and outputs {list(node.output)}")
        before = len(self.layers)
        try:
            out = handler(node)
        except ModelError as e:  # raised below the importer (a layer constructor, _frac): add the place
            if str(e).startswith(f"{self.path}:"):
                raise
            raise self.error(str(e)) from None
        except (ValueError, TypeError, IndexError, OverflowError, ZeroDivisionError, MemoryError) as e:
            # malformed tensors or attributes that no check above names (e.g. a value beyond int64, or padding
            # attributes that make a tensor too large to hold)
            raise self.error(f"malformed node ({type(e).__name__}: {e})") from None
        if out is not None:
            self.syms[node.output[0]] = out
            if isinstance(out, _Quant) and 0 < out.pos and (out.pos > before or out.pos == len(self.layers)):
                self.tensors.setdefault(out.pos - 1, (node.output[0], out.etype))

    def all_const(self, node: Any) -> bool:
        return all(not i or isinstance(self.syms.get(i), _Const) for i in node.input)

    def unpack_narrow(self, name: str, arr: np.ndarray, etype: int | None = None) -> np.ndarray:
        """An INT4 / UINT4 constant (packed two per byte in the file; ``onnx.numpy_helper.to_array`` unpacks it to
        an ``ml_dtypes`` array) as an exact int8 / uint8 array; its 4-bit type is remembered in ``narrow`` so that
        zero points get the 4-bit range and no arithmetic is folded in 8 bits."""
        kind = {21: "uint4", 22: "int4"}.get(etype or 0, str(arr.dtype))
        if kind not in ("int4", "uint4"):
            return arr
        self.narrow[name] = 22 if kind == "int4" else 21
        return np.asarray(arr).astype(np.int8 if kind == "int4" else np.uint8)

    def fold(self, node: Any) -> None:
        """Evaluate a node whose inputs are all constants (shape arithmetic, weight transposes) with the ONNX
        reference implementation. 4-bit constants only move (``Transpose``, ``Reshape``, ...): arithmetic on their
        unpacked 8-bit copies would not wrap as 4-bit arithmetic does."""
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        narrow = [i for i in node.input if i in self.narrow]
        if narrow and node.op_type not in _MOVE_OPS:
            i = narrow[0]
            raise self.error(f"initializer {i!r} of type {_INT_RANGES[self.narrow[i]][0].upper()} reaches "
                             f"{node.op_type}: only DequantizeLinear, QuantizeLinear zero points and the data-"
                             f"movement operators {', '.join(_MOVE_OPS)} take 4-bit constants here")
        for i in node.input:  # e.g. Reshape(constant, activation): nothing to fold
            if i and not isinstance(self.get(i), _Const):
                raise self.error(f"input {i!r} must be a constant here, got {_kind(self.get(i))}")  # type: ignore
        feeds = {i: self.syms[i].value for i in node.input if i}  # type: ignore[union-attr]
        g = helper.make_graph([node], "fold", [helper.make_tensor_value_info(i, 0, None) for i in feeds],
                              [helper.make_tensor_value_info(o, 0, None) for o in node.output])
        opsets = [o for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        m = helper.make_model(g, opset_imports=opsets)
        try:
            outs = ReferenceEvaluator(m).run(None, feeds)
        except Exception as e:
            raise self.error(f"cannot evaluate constant node: {e}") from None
        for name, v in zip(node.output, outs, strict=True):
            if narrow and node.op_type in _MOVE_OPS and name == node.output[0]:
                v = np.asarray(v).astype(self.syms[narrow[0]].value.dtype)  # type: ignore[union-attr]
                self.narrow[name] = self.narrow[narrow[0]]
            self.syms[name] = _Const(self.unpack_narrow(name, np.asarray(v)))

    def move(self, node: Any, sym: _ConstDQ) -> _ConstDQ:
        """A data-movement op on a dequantized constant: applied to ``q``, ``scale`` and ``zp`` alike."""
        outs = []
        for arr in (sym.q, sym.scale, sym.zp):
            saved = dict(self.syms)
            self.syms[node.input[0]] = _Const(arr)
            self.fold(node)
            outs.append(self.syms[node.output[0]].value)  # type: ignore[union-attr]
            self.syms = saved
        return _ConstDQ(outs[0], outs[1], outs[2], sym.node, sym.dtype, sym.init)

    # ---------------- quantize / dequantize
    def op_QuantizeLinear(self, node: Any) -> _Sym:
        self.forms.add("QDQ")
        if int(self.attr("block_size", 0) or 0):
            raise self.error("blocked quantization is not supported")
        x = self.get(node.input[0])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        out_type = int(self.attr("output_dtype", 0) or 0) or 2
        if isinstance(x, _Const):
            return self.quantize_const(node, x.value, out_type)
        s = self.scalar_scale(node.input[1], "activation scale")
        z, lo, hi = self.zero_point(zp_name, "activation zero point", out_type)
        if isinstance(x, _Input):
            if self.layers or self.input_scale is not None:
                raise self.error("the float input is quantized twice")
            self.input_lo, self.input_hi = lo, hi
            self.input_scale, self.input_zero_point = s, z
            self.input_rounding = Rounding.HALF_EVEN
            shape0 = x.base if x.pending else x.shape
            self.net_input_shape = shape0
            if shape0 != self.input_shape_full[1:]:
                self.notes.append(f"input reshaped from {self.input_shape_full[1:]} to {shape0} before quantization")
            q: _Quant = _Quant(0, shape0, lo, hi, s, z, _etype(lo, hi))
            for op, shape in x.pending:  # the float input's data movement, on the integers
                q = self.move_act(q, op, shape)  # type: ignore[assignment]
            if x.pending:
                self.notes.append(f"the float input's {', '.join(op.kind for op, _ in x.pending)} applied after its "
                                  f"quantization (the network input keeps the graph input's layout {shape0})")
            return q
        if isinstance(x, _Acc):
            return self.requantize(x, s, z, lo, hi, node.name)
        if isinstance(x, _Real):
            return self.quantize_real(x, s, z, lo, hi, node.name)
        if isinstance(x, _RealConcat):
            return self.quantize_concat(x, s, z, lo, hi, node.name)
        if isinstance(x, _RealFn):
            return self.quantize_fn(x, s, z, lo, hi, node.name, out_type)
        raise self.error(f"QuantizeLinear of {_kind(x)} is not supported")

    def quantize_const(self, node: Any, x: np.ndarray, out_type: int) -> _Const:
        """Exact ``clamp(R(x / s) + z)`` of a float constant (fake-quantized weights exported by PyTorch)."""
        axis = int(self.attr("axis", 1))
        s = self.expand(self.const(node.input[1], "scale"), axis, x.shape, "scale")
        zname = node.input[2] if len(node.input) > 2 else ""
        zv = self.const(zname, "zero point") if zname else None
        if zv is not None:
            dtype = zv.dtype
            z = self.expand(zv, axis, x.shape, "zero point").astype(np.int64)
            out_type = self.narrow.get(zname, 0)
        else:
            dtype = np.dtype({2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 21: np.uint8,
                              22: np.int8}.get(out_type, np.uint8))
            z = np.zeros(x.shape, dtype=np.int64)
        if np.dtype(dtype) not in _NP_RANGES:
            raise self.error(f"QuantizeLinear to type {dtype} is not supported")
        lo, hi = _INT_RANGES[out_type][1:] if out_type in (21, 22) else _NP_RANGES[np.dtype(dtype)]
        flat = [round_fraction(_frac(a) / _frac(b), Rounding.HALF_EVEN) for a, b in zip(x.ravel(), s.ravel(),
                                                                                       strict=True)]
        q = np.clip(np.array(flat, dtype=np.int64).reshape(x.shape) + z, lo, hi)
        if out_type in (21, 22):
            self.narrow[node.output[0]] = out_type
        return _Const(q.astype(dtype))

    def op_DequantizeLinear(self, node: Any) -> _Sym:
        self.forms.add("QDQ")
        if int(self.attr("block_size", 0) or 0):
            raise self.error("blocked quantization is not supported")
        x = self.get(node.input[0])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if isinstance(x, _Const):
            if not np.issubdtype(x.value.dtype, np.integer):
                raise self.error(f"DequantizeLinear of constant {node.input[0]!r} of type {x.value.dtype}: only "
                                 f"integer constants (int4, uint4, int8, uint8, int16, uint16, int32) dequantize")
            axis = int(self.attr("axis", 1))
            q = x.value.astype(np.int64)
            s = self.expand(self.const(node.input[1], "scale"), axis, q.shape, "scale").astype(np.float64)
            zv = self.const(zp_name, "zero point") if zp_name else None
            z = (self.expand(zv, axis, q.shape, "zero point").astype(np.int64) if zv is not None
                 else np.zeros(q.shape, dtype=np.int64))
            return _ConstDQ(q, s, z, node.name, self.type_name(node.input[0], x.value), node.input[0])
        if isinstance(x, _Quant):
            s = self.scalar_scale(node.input[1], "activation scale")
            z, _, _ = self.zero_point(zp_name, "activation zero point")
            self.use_input_params(x, s, z)
            return _Real(x, s, z)
        raise self.error(f"DequantizeLinear of {_kind(x)} is not supported")

    # ---------------- float-graph ops (QDQ form)
    def real_and_weight(self, node: Any, xi: str, wi: str) -> tuple[_Real, _ConstDQ]:
        x, w = self.get(xi), self.get(wi)
        if isinstance(x, (_Real, _Acc, _Quant)) and isinstance(w, (_Real, _Acc, _Quant)):
            raise self.error(f"{node.op_type} of two activations is not supported (weights must be constants)")
        if not isinstance(x, _Real):
            raise self.error(f"{node.op_type} input must be a dequantized activation, got {_kind(x)}"
                             if x is not None else "missing input")
        if isinstance(w, _Const):
            raise self.error(f"{node.op_type} weight {wi!r} is not quantized (no DequantizeLinear of integers)")
        if not isinstance(w, _ConstDQ):
            raise self.error(f"{node.op_type} weight must be a dequantized constant, got {_kind(w)}")
        return x, w

    def op_MatMul(self, node: Any) -> _Sym:
        x, w = self.real_and_weight(node, node.input[0], node.input[1])
        return self.dense(x, w, transpose=True)

    def op_Gemm(self, node: Any) -> _Sym:
        if int(self.attr("transA", 0)):
            raise self.error("Gemm with transA=1 is not supported")
        x, w = self.real_and_weight(node, node.input[0], node.input[1])
        acc = self.dense(x, w, transpose=not int(self.attr("transB", 0)), alpha=float(self.attr("alpha", 1.0)))
        if len(node.input) > 2 and node.input[2]:
            if float(self.attr("beta", 1.0)) != 1.0:
                raise self.error("Gemm with beta != 1 is not supported")
            acc = self.add_bias_sym(acc, self.get(node.input[2]))
        return acc

    def op_Conv(self, node: Any) -> _Sym:
        x, w = self.real_and_weight(node, node.input[0], node.input[1])
        acc = self.conv(x, w)
        if len(node.input) > 2 and node.input[2]:
            b = self.get(node.input[2])
            if isinstance(b, _Const):
                b = _Const(b.value.reshape(-1, 1, 1))
            elif isinstance(b, _ConstDQ):
                b = _ConstDQ(b.q.reshape(-1, 1, 1), b.scale.reshape(-1, 1, 1), b.zp.reshape(-1, 1, 1), b.node)
            acc = self.add_bias_sym(acc, b)
        return acc

    def add_bias_sym(self, acc: _Acc, b: _Sym | None) -> _Acc:
        if isinstance(b, (_Const, _ConstDQ)):
            return self.add_const_to_acc(acc, b)
        raise self.error(f"bias must be a constant, got {_kind(b) if b is not None else 'nothing'}")

    def op_Add(self, node: Any) -> _Sym:
        a, b = self.get(node.input[0]), self.get(node.input[1])
        if isinstance(a, (_Const, _ConstDQ)) and not isinstance(b, (_Const, _ConstDQ)):
            a, b = b, a
        if isinstance(b, (_Const, _ConstDQ)):
            if isinstance(a, _Acc):
                return self.add_const_to_acc(a, b)
            if isinstance(a, _Real):
                return self.identity(a, b.real() if isinstance(b, _ConstDQ) else b.value)
            raise self.error(f"Add of a constant to {_kind(a)} is not supported")
        if isinstance(a, _Real) and isinstance(b, _Real):
            return self.add_activations(a, b, "QDQ Add")
        raise self.error(f"Add of {_kind(a)} and {_kind(b)} is not supported (a residual Add takes two dequantized "
                         f"activations)")

    def add_activations(self, a: _Real, b: _Real, what: str) -> _Acc:
        """The residual add of two activations, ``s_A (a - z_A) + s_B (b - z_B)``, as an exact integer ``Add``.

        Float32 scales are dyadic: with ``D`` the larger of their denominators (a power of two) ``m_A = s_A D`` and
        ``m_B = s_B D`` are integers; divided by ``g = gcd(m_A, m_B)``, ``s_A (a - z_A) + s_B (b - z_B) =
        (g / D) acc`` with ``acc = m_A' a + m_B' b - (m_A' z_A + m_B' z_B)``: an ``Add(weights=(m_A', m_B'),
        bias)`` node whose real value is ``(g / D) acc``; the ``QuantizeLinear(s_C, z_C)`` after it is then
        ``Requantize(g / (D s_C), z_C)``, exactly ``R((s_A (a - z_A) + s_B (b - z_B)) / s_C) + z_C``."""
        if self.semantics == "onnxruntime":
            raise self.error(f"semantics='onnxruntime': {what} of two activations: onnxruntime computes it in float "
                             f"(QLinearAdd's float or fixed-point kernel, chosen by the CPU), which qverify does not "
                             f"model; use semantics='exact'")
        if a.clip != (None, None) or b.clip != (None, None):
            raise self.error(f"{what} of a Relu/Clip of a dequantized activation is not supported")
        if a.q.shape != b.q.shape:
            raise self.error(f"{what} of activations of shapes {a.q.shape} and {b.q.shape}: broadcasting two "
                             f"activations is not supported")
        den = max(a.scale.denominator, b.scale.denominator)
        ma, mb = a.scale * den, b.scale * den
        if ma.denominator != 1 or mb.denominator != 1:
            raise self.error(f"{what}: scales {float(a.scale)!r}, {float(b.scale)!r} are not dyadic rationals")
        g = math.gcd(int(ma), int(mb))
        wa, wb = int(ma) // g, int(mb) // g
        bias = -(wa * a.zero_point + wb * b.zero_point)
        bound = (wa * max(abs(a.q.lo - a.zero_point), abs(a.q.hi - a.zero_point))
                 + wb * max(abs(b.q.lo - b.zero_point), abs(b.q.hi - b.zero_point)))
        worst = wa * max(abs(a.q.lo), abs(a.q.hi)) + wb * max(abs(b.q.lo), abs(b.q.hi)) + abs(bias)
        if max(bound, worst) >= 2**53:
            raise self.error(f"{what}: the scales {float(a.scale)!r} and {float(b.scale)!r} need integer weights "
                             f"{wa}, {wb}: the accumulator may reach {max(bound, worst)} >= 2^53 (no exact integer "
                             f"form)")
        v = self.append(Add((wa, wb), bias, name=self.node.name), (a.q.pos, b.q.pos))
        return _Acc(v, a.q.shape, [Fraction(g, den)])

    def op_Mul(self, node: Any) -> _Sym:
        a, b = self.get(node.input[0]), self.get(node.input[1])
        if isinstance(a, _Const):
            a, b = b, a
        if isinstance(a, _Acc) and isinstance(b, _Const):
            self.take(a)
            if a.clip != (None, None):
                raise self.error("Mul after Relu/Clip of an accumulator is not supported")
            vec = self.per_channel(b.value.astype(np.float64), a.shape, "multiplier")
            fr = [_frac(v) for v in vec.ravel()]
            if min(fr) <= 0:
                raise self.error("only positive multipliers of an accumulator are supported")
            n = a.shape[0]
            if len(fr) == 1 and len(a.mult) == 1:
                mult = [a.mult[0] * fr[0]]
            else:
                fr = fr if len(fr) == n else fr * n
                am = a.mult if len(a.mult) == n else a.mult * n
                mult = [m * f for m, f in zip(am, fr, strict=True)]
            # a float Mul is not part of an onnxruntime integer kernel: semantics='onnxruntime' refuses the result
            return replace(a, mult=mult, kernel="")
        raise self.error(f"Mul of {_kind(a)} by {_kind(b)} is not supported")

    def clip_sym(self, sym: _Sym, lo: Fraction | None, hi: Fraction | None) -> _Sym:
        if not isinstance(sym, (_Acc, _Real)):
            raise self.error(f"Relu/Clip of {_kind(sym)} is not supported")
        a, b = sym.clip
        if lo is not None:
            a = lo if a is None else max(a, lo)
        if hi is not None:
            b = hi if b is None else min(b, hi)
        return replace(sym, clip=(a, b))

    def op_Relu(self, node: Any) -> _Sym:
        return self.clip_sym(self.get(node.input[0]), Fraction(0), None)

    def op_Clip(self, node: Any) -> _Sym:
        if len(node.input) > 1 or not node.attribute:
            lo = self.const(node.input[1], "Clip min") if len(node.input) > 1 else None
            hi = self.const(node.input[2], "Clip max") if len(node.input) > 2 else None
        else:
            lo, hi = self.attr("min"), self.attr("max")
        x = self.get(node.input[0])
        flo = None if lo is None else _frac(np.asarray(lo).ravel()[0])
        fhi = None if hi is None else _frac(np.asarray(hi).ravel()[0])
        if isinstance(x, _Const):  # Clip of constant weights (Brevitas QCDQ): folded
            self.fold(node)
            return self.syms[node.output[0]]
        if isinstance(x, _ConstDQ):
            real = x.real()
            if (flo is None or all(v >= flo for v in real.ravel())) and (fhi is None or all(v <= fhi
                                                                                            for v in real.ravel())):
                return x  # the dequantized constant lies in the interval: nothing changes
            raise self.error("Clip of a dequantized constant that changes its values is not supported")
        if isinstance(x, _Quant):  # Clip of the integers between Q and DQ (Brevitas, narrow bit widths)
            for v in (flo, fhi):
                if v is not None and v.denominator != 1:
                    raise self.error(f"Clip of an integer activation with a non-integer bound {float(v)!r}")
            qlo = x.lo if flo is None else max(x.lo, int(flo))
            qhi = x.hi if fhi is None else min(x.hi, int(fhi))
            if qlo > qhi:
                raise self.error(f"Clip of an integer activation to an empty range [{qlo}, {qhi}]")
            if (qlo, qhi) == (x.lo, x.hi):
                return x
            return replace(x, pos=self.append(Clamp(qlo, qhi, name=node.name), (x.pos,)), lo=qlo, hi=qhi, raw=False)
        return self.clip_sym(x, flo, fhi)

    def op_Dropout(self, node: Any) -> _Sym:
        """Inference-mode ``Dropout`` is the identity (``training_mode`` absent or false; no mask output read)."""
        if len(node.input) > 2 and node.input[2]:
            t = self.const(node.input[2], "Dropout training_mode")
            if t is not None and bool(np.asarray(t).ravel()[0]):
                raise self.error("Dropout in training mode is random: not an inference graph")
        if len(node.output) > 1 and node.output[1] and self.consumed(node.output[1]):
            raise self.error("the mask output of Dropout is used: not supported")
        return self.get(node.input[0])  # type: ignore[return-value]

    def consumed(self, name: str) -> bool:
        """Whether some node or graph output reads tensor ``name``."""
        g = self.model.graph
        return any(name in n.input for n in g.node) or any(o.name == name for o in g.output)

    def op_Softmax(self, node: Any) -> _Sym:
        """``Softmax``/``LogSoftmax`` of the final dequantized logits: strictly increasing in each logit, so it keeps
        the argmax (the first maximal index stays first; equal logits give equal probabilities). It is dropped: the
        network's outputs are the logits and properties are stated on them (``onnx_notes`` says so)."""
        x = self.get(node.input[0])
        shape = _shape_of(x)
        if not isinstance(x, (_Real, _Acc)) or shape is None or len(shape) != 1:
            raise self.error(f"{node.op_type} of {_kind(x)} of shape {shape}: only a final {node.op_type} over the "
                             f"classes of a dequantized vector is supported")
        axis = int(self.attr("axis", -1))
        if axis not in (1, -1):
            raise self.error(f"{node.op_type} over axis {axis}: only over the classes (axis 1 / -1)")
        if isinstance(x, _Acc) and len(set(x.mult)) > 1:
            raise self.error(f"{node.op_type} of an accumulator with per-channel scales: not argmax-preserving")
        return _Softmax(x, node.input[0])

    op_LogSoftmax = op_Softmax

    # ------------------------------------------------------------------ functions of one quantized value
    def _real_fn(self, node: Any) -> _RealFn:
        x = self.get(node.input[0])
        if not isinstance(x, _Real):
            raise self.error(f"{node.op_type} of {_kind(x)}: only of a dequantized activation (DQ -> "
                             f"{node.op_type} -> Q) is supported")
        attrs = {}
        if node.op_type == "LeakyRelu":
            attrs["alpha"] = float(self.attr("alpha", 0.01))
        elif node.op_type == "HardSigmoid":
            attrs["alpha"], attrs["beta"] = float(self.attr("alpha", 0.2)), float(self.attr("beta", 0.5))
        return _RealFn(x, node.op_type, attrs)

    op_Sigmoid = op_Tanh = op_LeakyRelu = op_HardSigmoid = op_HardSwish = _real_fn

    def op_QLinearSigmoid(self, node: Any) -> _Sym:
        """com.microsoft ``QLinearSigmoid(X, X_scale, X_zp, Y_scale, Y_zp)`` (and ``QLinearLeakyRelu`` with
        ``alpha``): ``y = clamp(R(f(s_x (x - z_x)) / s_y) + z_y)``, a function of the one integer ``x``."""
        self.forms.add("QOperator")
        i = list(node.input)
        if len(i) < 4:
            raise self.error(f"{node.op_type} needs X, X_scale, X_zero_point, Y_scale[, Y_zero_point]")
        x = self.quant_input(i[0], i[1], i[2] if len(i) > 2 else "", "input")
        s = self.scalar_scale(i[3], "output scale")
        z, lo, hi = self.zero_point(i[4] if len(i) > 4 else "", "output zero point")
        op = node.op_type[len("QLinear"):]
        attrs = {"alpha": float(self.attr("alpha", 0.01))} if op == "LeakyRelu" else {}
        return self.quantize_fn(_RealFn(x, op, attrs, node.op_type), s, z, lo, hi, node.name, x.q.etype)

    op_QLinearLeakyRelu = op_QLinearSigmoid

    def quantize_fn(self, f: _RealFn, s: Fraction, z: int, lo: int, hi: int, name: str, out_type: int) -> _Quant:
        """``Q(f(DQ(q)))``: on every integer ``q`` of the input's range (at most ``2^16`` values) the table
        ``y(q) = clamp(R(f(clip(s_x (q - z_x))) / s_y) + z_y, lo, hi)``: ``exact`` computes ``f`` exactly (rational
        for LeakyRelu, HardSigmoid, HardSwish; Sigmoid and Tanh to 120 digits, :func:`qverify.quant.
        exact_function_table`), ``onnxruntime`` runs onnxruntime itself on the same ``DQ -> f -> Q`` group (or
        contrib op) over every ``q`` (what its kernels compute, whatever they fuse it into). A non-decreasing table
        is a ``Step``, any other a ``Lookup``."""
        from qverify.network import Lookup
        from qverify.quant import exact_function_table

        x = f.x
        if x.q.hi - x.q.lo > 1 << 16:
            raise self.error(f"{f.op} of a value of range [{x.q.lo}, {x.q.hi}]: a table would be too large")
        qs = np.arange(x.q.lo, x.q.hi + 1, dtype=np.int64)
        if self.semantics == "onnxruntime":
            if x.clip != (None, None):
                raise self.error(f"semantics='onnxruntime': a Relu/Clip before {f.op} runs in float kernels qverify "
                                 f"does not model; use semantics='exact'")
            ys = ort_function_table(f, qs, s, z, out_type)
        else:
            try:
                ys = exact_function_table(f.op, f.attrs, qs, x.scale, x.zero_point, x.clip, s, z, lo, hi)
            except ValueError as e:
                raise self.error(str(e)) from None
        self.notes.append(f"{name or f.op}: {f.qoperator or f.op} of one quantized value as its exact table over "
                          f"[{x.q.lo}, {x.q.hi}] ({self.semantics} semantics)")
        if np.all(np.diff(ys) >= 0):
            return self.table_step(x.q.pos, qs, ys, x.q.shape, s, z, lo, hi, name)
        table = Lookup(int(x.q.lo), ys, name=name)
        return _Quant(self.append(table, (x.q.pos,)), x.q.shape, int(ys.min()), int(ys.max()), s, z, _etype(lo, hi))

    def op_Identity(self, node: Any) -> _Sym:
        return self.get(node.input[0])  # type: ignore[return-value]

    def op_Constant(self, node: Any) -> None:
        self.fold(node)

    def target_shape(self, sym: _Sym, target: Sequence[int], allowzero: bool) -> tuple[int, ...]:
        cur = sym.q.shape if isinstance(sym, _Real) else getattr(sym, "shape", None)
        if cur is None:
            raise self.error(f"Reshape of {_kind(sym)} is not supported")
        full = [1, *cur]
        t = [int(v) for v in target]
        t = [full[i] if (v == 0 and not allowzero and i < len(full)) else v for i, v in enumerate(t)]
        if not t or t[0] not in (1, -1):
            raise self.error(f"Reshape target {list(target)} does not keep the batch axis first")
        rest = t[1:]
        n = int(np.prod(cur))
        if rest.count(-1) > 1:
            raise self.error(f"Reshape target {list(target)} has two -1")
        if -1 in rest:
            known = int(np.prod([v for v in rest if v != -1]))
            rest[rest.index(-1)] = n // known if known else 0
        if t[0] == -1 and int(np.prod(rest)) != n:
            raise self.error(f"Reshape target {list(target)} does not keep the per-sample size {n}")
        return tuple(rest)

    def pass_constant(self, node: Any, x: _Sym | None) -> _Sym | None:
        """A shape operator on a constant: a dequantized constant moves along unchanged, a plain one is folded
        (``None`` for an activation: the operator's own rule applies)."""
        if isinstance(x, _ConstDQ):
            return self.move(node, x)
        if isinstance(x, _Const):
            self.fold(node)
            return self.syms[node.output[0]]
        return None

    def op_Reshape(self, node: Any) -> _Sym:
        x = self.get(node.input[0])
        done = self.pass_constant(node, x)
        if done is not None:
            return done
        shape = self.const(node.input[1], "Reshape shape")
        if shape is None or shape.ndim != 1 or not np.issubdtype(shape.dtype, np.integer):
            raise self.error(f"Reshape shape must be a 1-D integer constant, got "
                             f"{'nothing' if shape is None else f'{shape.dtype} of shape {shape.shape}'}")
        return self.flatten_to(x, self.target_shape(x, shape, bool(self.attr("allowzero", 0))))

    def op_Flatten(self, node: Any) -> _Sym:
        x = self.get(node.input[0])
        done = self.pass_constant(node, x)
        if done is not None:
            return done
        if int(self.attr("axis", 1)) != 1:
            raise self.error("Flatten with axis != 1 is not supported")
        cur = _shape_of(x) or ()
        return self.flatten_to(x, (int(np.prod(cur)),))

    def op_Transpose(self, node: Any) -> _Sym:
        x = self.get(node.input[0])
        done = self.pass_constant(node, x)
        if done is not None:
            return done
        cur = _shape_of(x)
        if cur is None:
            raise self.error(f"Transpose of {_kind(x)} is not supported")
        full = (1, *cur)
        perm = [int(p) for p in (self.attr("perm") or range(len(full) - 1, -1, -1))]
        if sorted(perm) != list(range(len(full))):
            raise self.error(f"Transpose perm {perm} does not fit a tensor of rank {len(full)}")
        moved = [p for p in perm if full[p] != 1]
        target = tuple(full[p] for p in perm[1:])
        if perm[0] == 0 and moved == sorted(moved):  # it keeps the memory order: a reshape
            return self.flatten_to(x, target)
        if perm[0] != 0:
            raise self.error(f"Transpose of {_kind(x)} with perm {perm} moves the batch axis: not supported")
        inner = tuple(p - 1 for p in perm[1:])
        if isinstance(x, _Acc):
            return self.move_acc(x, target, inner)
        if isinstance(x, (_Quant, _Real)):
            return self.move_act(x, Transpose(inner, name=node.name), target)
        if isinstance(x, _Input):
            return _Input(target, (*x.pending, (Transpose(inner, name=node.name), target)), x.base or x.shape)
        raise self.error(f"Transpose of {_kind(x)} with perm {perm} (shape {list(full)}) reorders the data: only "
                         f"a transpose of a quantized activation, or one that keeps the memory order, is supported")

    def op_Squeeze(self, node: Any) -> _Sym:
        x = self.get(node.input[0])
        done = self.pass_constant(node, x)
        if done is not None:
            return done
        cur = _shape_of(x)
        if cur is None:
            raise self.error(f"{node.op_type} of {_kind(x)} is not supported")
        full = [1, *cur]
        if len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1], f"{node.op_type} axes")
            axes = [] if axes is None else [int(a) for a in np.asarray(axes).ravel()]
        else:
            axes = [int(a) for a in (self.attr("axes") or [])]
        if node.op_type == "Squeeze":
            if not axes:
                axes = [i for i in range(1, len(full)) if full[i] == 1]
            axes = [a + len(full) if a < 0 else a for a in axes]
            if 0 in axes or any(not 0 < a < len(full) or full[a] != 1 for a in axes):
                raise self.error(f"Squeeze axes {axes} of a tensor of shape {full}: only axes of size 1 after the "
                                 f"batch axis")
            target = tuple(d for i, d in enumerate(full) if i not in axes)[1:]
        else:
            rank = len(full) + len(axes)
            axes = sorted(a + rank if a < 0 else a for a in axes)
            if 0 in axes or any(not 0 < a < rank for a in axes) or len(set(axes)) != len(axes):
                raise self.error(f"Unsqueeze axes {axes} of a tensor of shape {full}: not supported")
            it = iter(full)
            out = [1 if i in axes else next(it) for i in range(rank)]
            target = tuple(out[1:])
        return self.flatten_to(x, target)

    op_Unsqueeze = op_Squeeze

    def op_Cast(self, node: Any) -> _Sym:
        x = self.get(node.input[0])
        to = int(self.attr("to", 0))
        if isinstance(x, _Const):
            self.fold(node)
            return self.syms[node.output[0]]
        if isinstance(x, _Acc) and x.integer and to in (1, 11):
            return replace(x, integer=False)
        if isinstance(x, _Quant) and to in _INT_RANGES and _INT_RANGES[to][1] <= x.lo and x.hi <= _INT_RANGES[to][2]:
            return replace(x, etype=to)  # an integer type that holds every value: the values do not change
        if isinstance(x, _Input) and to in (1, 10, 11, 16):
            return x
        if isinstance(x, (_Real, _Softmax)) and to == 1:
            return x  # dequantized values are float32 already: a no-op
        raise self.error(f"Cast of {_kind(x)} to type {to} is not supported")

    def op_Shape(self, node: Any) -> _Sym:
        x = self.get(node.input[0])
        cur = _shape_of(x)
        if isinstance(x, _Const) or cur is None:
            self.fold(node)
            return self.syms[node.output[0]]
        if node.attribute:
            raise self.error("Shape with start/end attributes of an activation is not supported")
        return _Const(np.array([1, *cur], dtype=np.int64))

    # ---------------- BatchNormalization left in the graph
    def op_BatchNormalization(self, node: Any) -> _Sym:
        """Inference ``BatchNormalization`` of a dequantized activation (between ``DequantizeLinear`` and
        ``QuantizeLinear``, as ``quantize_static`` leaves it when the exporter kept it): per channel ``c``,
        ``y_c = a_c s_x (q - z) + b_c`` with ``a_c = gamma_c / sqrt(var_c + eps)`` and ``b_c = beta_c - a_c mu_c``.

        ``a_c`` is irrational in general: float arithmetic with no exact integer counterpart. It is taken as the
        float64 value of ``gamma_c / sqrt(var_c + eps)`` (the exact values of the float32 constants), and the layer
        is a depthwise 1x1 ``Conv2d`` ``acc_c = sign(a_c) K (q - z) + B_c`` (``K = 2^16``) read as ``M_c acc_c``
        with ``M_c = |a_c| s_x / K``, ``B_c = R(b_c / M_c)``: the shift is rounded to ``M_c / 2`` in real units.
        Both roundings are recorded in ``metadata['onnx_notes']``."""
        if self.semantics == "onnxruntime":
            raise self.error("semantics='onnxruntime': BatchNormalization runs in float32 kernels qverify does not "
                             "model; use semantics='exact'")
        if int(self.attr("training_mode", 0)):
            raise self.error("BatchNormalization in training mode is not an inference graph")
        if any(o and self.consumed(o) for o in node.output[1:]):
            raise self.error("the running-statistics outputs of BatchNormalization are used: not supported")
        x = self.get(node.input[0])
        if not isinstance(x, _Real) or x.clip != (None, None):
            raise self.error(f"BatchNormalization of {_kind(x)} is not supported (only of a dequantized activation)")
        c = x.q.shape[0] if x.q.shape else 0
        if len(x.q.shape) not in (1, 3) or len(node.input) < 5:
            raise self.error(f"BatchNormalization of shape {x.q.shape} with {len(node.input)} inputs: not supported")

        def vec(name: str, what: str) -> list[Fraction]:
            sym = self.get(name)
            if isinstance(sym, _ConstDQ):
                vals = list(sym.real().ravel())
            elif isinstance(sym, _Const):
                vals = [_frac(v) for v in np.asarray(sym.value, dtype=np.float64).ravel()]
            else:
                raise self.error(f"BatchNormalization {what} must be a constant, got {_kind(sym)}")
            if len(vals) != c:
                raise self.error(f"BatchNormalization {what} has {len(vals)} values for {c} channels")
            return vals

        gamma, beta, mean, var = (vec(node.input[k], w) for k, w in
                                  ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
        eps = Fraction(float(np.float32(float(self.attr("epsilon", 1e-5)))))
        k_units = 1 << 16
        weight = np.zeros((c, 1, 1, 1), dtype=np.int64)
        bias = np.zeros(c, dtype=np.int64)
        mult: list[Fraction] = []
        for ch in range(c):
            if var[ch] + eps <= 0:
                raise self.error(f"BatchNormalization channel {ch}: var + epsilon <= 0")
            a = Fraction(float(gamma[ch]) / math.sqrt(float(var[ch] + eps)))
            if a == 0:
                raise self.error(f"BatchNormalization channel {ch} has scale 0: a constant channel, not supported")
            m = abs(a) * x.scale / k_units
            sign = 1 if a > 0 else -1
            weight[ch, 0, 0, 0] = sign * k_units
            b = beta[ch] - a * mean[ch]
            bias[ch] = self.bias_units(round_fraction(b / m, Rounding.HALF_EVEN), ch) - sign * k_units * x.zero_point
            mult.append(m)
        self.notes.append(f"{node.name}: BatchNormalization folded with a = gamma / sqrt(var + eps) rounded to "
                          f"float64 and its shift rounded to 2^-16 of an input step ({c} channels)")
        if len(x.q.shape) == 1:
            layer: Any = Dense(weight.reshape(c, 1) * np.eye(c, dtype=np.int64), bias, name=node.name)
        else:
            layer = Conv2d(weight, bias, name=node.name, groups=c)
        v = self.append(layer, (x.q.pos,))
        return _Acc(v, x.q.shape, mult, src=v - 1)

    # ---------------- pooling, concatenation, padding
    def pool_geometry(self, shape: tuple[int, ...], global_pool: bool = False, dilations: bool = True
                      ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int], tuple[int, int],
                                 tuple[int, int], tuple[int, int]]:
        """``(kernel, strides, pads, extra, dilations, out)`` of a 2-D pooling node on a ``[C, H, W]`` value.

        ``pads = (top, left, bottom, right)`` as declared; ``extra = (bottom, right)``: the cells ``ceil_mode``
        adds past them, ``out = ceil((H + p_t + p_b - ((k - 1) d + 1)) / s) + 1`` (floor without ``ceil_mode``),
        less one when that last window would start past the input and the leading padding (the rule of
        onnxruntime and PyTorch: every window starts inside)."""
        if len(shape) != 3:
            raise self.error(f"only 2-D pooling of [N, C, H, W] tensors is supported (per-sample shape {shape})")
        if global_pool:
            return (shape[1], shape[2]), (1, 1), (0, 0, 0, 0), (0, 0), (1, 1), (1, 1)
        ks = self.attr("kernel_shape")
        if not isinstance(ks, list) or len(ks) != 2:
            raise self.error(f"kernel_shape must be two integers, got {ks!r}")
        kernel = (int(ks[0]), int(ks[1]))
        strides = tuple(int(v) for v in self.attr("strides", [1, 1]))
        dil = tuple(int(v) for v in self.attr("dilations", [1, 1]))
        if len(strides) != 2 or len(dil) != 2 or min(strides + dil + kernel) < 1:
            raise self.error(f"strides {list(strides)}, dilations {list(dil)}, kernel {list(kernel)} must be two "
                             f"positive integers each")
        if not dilations and dil != (1, 1):
            raise self.error(f"{self.node.op_type} with dilations {list(dil)} is not supported")
        pads = self.spatial_pads(shape, kernel, strides, dil)
        ceil = int(self.attr("ceil_mode", 0))
        out, extra = [], []
        for ax in range(2):
            size = shape[1 + ax]
            head, tail = pads[ax], pads[2 + ax]
            ek = (kernel[ax] - 1) * dil[ax] + 1
            span = size + head + tail - ek
            if span < 0:
                raise self.error(f"kernel {list(kernel)} larger than the padded input {shape[1:]}")
            n = (-(-span // strides[ax]) if ceil else span // strides[ax]) + 1
            if ceil and (n - 1) * strides[ax] >= size + head:
                n -= 1
            out.append(n)
            extra.append(max(0, (n - 1) * strides[ax] + ek - (size + head + tail)))
        return kernel, strides, pads, (extra[0], extra[1]), dil, (out[0], out[1])  # type: ignore[return-value]

    def op_MaxPool(self, node: Any) -> _Sym:
        """Max pooling of the integers (QOperator: ``MaxPool`` on a uint8/int8 tensor; QDQ: between ``DequantizeLinear``
        and ``QuantizeLinear``): ``max`` commutes with the non-decreasing ``q -> clip(s (q - z))``, so the pooled
        integers carry the same ``(s, z)`` (and a pending clip); padded cells are ignored, ``ceil_mode`` is extra
        bottom/right padding."""
        x = self.get(node.input[0])
        if isinstance(x, _Const):
            self.fold(node)
            return self.syms[node.output[0]]
        if not isinstance(x, (_Quant, _Real)):
            raise self.error(f"MaxPool of {_kind(x)} is not supported")
        if len(node.output) > 1 and node.output[1] and self.consumed(node.output[1]):
            raise self.error("the Indices output of MaxPool is used: not supported")
        if int(self.attr("storage_order", 0)) != 0:
            raise self.error("MaxPool with storage_order=1 is not supported")
        q = x.q if isinstance(x, _Real) else x
        kernel, strides, pads, extra, dil, out = self.pool_geometry(q.shape)
        padding = (pads[0], pads[1], pads[2] + extra[0], pads[3] + extra[1])
        op = MaxPool2d(kernel, strides, padding, dil, name=node.name)
        shape = op.output_shape(q.shape)
        if shape[1:] != out:
            raise self.error(f"internal: pooled shape {shape} differs from {out}")
        return self.move_act(x, op, shape)

    def average(self, x: _Real, global_pool: bool = False) -> _Acc:
        """Average pooling of a dequantized activation, exactly: ``avg = s_x / count sum_window (x - z_x)`` (padded
        cells are real zero; ``count``: the kernel size with ``count_include_pad``, else the real cells of the
        window). With ``L`` the lcm of the counts and the integer weight ``k = L / count`` per output position,
        ``avg = (s_x / L) acc``, ``acc = k sum_window (x - z_x)``: a ``SumPool2d`` (weight ``k``; padded cells
        ``p``) and, for ``z_x != 0``, an ``Add`` of the constant that makes ``acc`` exact: ``-L z_x`` when every
        count is the window's real cells (``p = 0``), ``-K z_x`` when every count is the kernel size ``K``
        (``p = z_x``, ``k = 1``). The ``QuantizeLinear(s_y, z_y)`` after it is ``Requantize(s_x / (L s_y))``."""
        if x.clip != (None, None):
            raise self.error("AveragePool of a Relu/Clip of a dequantized activation is not supported (the clip must "
                             "be quantized first)")
        q = x.q
        if not global_pool and int(self.attr("channels_last", 0)):
            raise self.error("channels_last=1 is not supported")
        kernel, strides, pads, extra, dil, out = self.pool_geometry(q.shape, global_pool, dilations=False)
        include = bool(int(self.attr("count_include_pad", 0))) if not global_pool else False
        _, h, w = q.shape
        padding = (pads[0], pads[1], pads[2] + extra[0], pads[3] + extra[1])
        probe = SumPool2d(kernel, strides, padding, name=self.node.name)
        real = probe.linear([np.ones((1, 1, h, w))])[0, 0]  # real cells per window
        if include:
            region = np.ones((1, 1, h + pads[0] + pads[2], w + pads[1] + pads[3]))  # the declared padded area
            declared = SumPool2d(kernel, strides, (0, 0, extra[0], extra[1])).linear([region])[0, 0]
            counts = np.rint(declared).astype(np.int64)
        else:
            counts = np.rint(real).astype(np.int64)
        if counts.min() < 1:
            raise self.error("a pooling window holds no cell to average")
        lcm = _lcm(sorted({int(c) for c in counts.ravel()}))
        k = lcm // counts
        nreal = np.rint(real).astype(np.int64)
        z = x.zero_point
        if z == 0:
            pad_value, const = 0, 0
        elif np.array_equal(counts, nreal):
            pad_value, const = 0, -lcm * z
        elif np.all(counts == counts.ravel()[0]):
            pad_value, const = z, -int(counts.ravel()[0]) * z
        else:
            raise self.error("average pooling with count_include_pad=1 whose ceil_mode cells change the count at "
                             "the border, of a tensor with a non-zero zero point: not supported")
        op = SumPool2d(kernel, strides, padding, pad_value, None if np.all(k == 1) else k, name=self.node.name)
        v = self.append(op, (q.pos,))
        shape = op.output_shape(q.shape)
        if const:
            v = self.append(Add((1,), const, name=f"{self.node.name}/zero_point"), (v,))
        return _Acc(v, shape, [x.scale / lcm])

    def op_AveragePool(self, node: Any) -> _Sym:
        x = self.get(node.input[0])
        if not isinstance(x, _Real):
            raise self.error(f"{node.op_type} of {_kind(x)} is not supported (QDQ: DequantizeLinear -> "
                             f"{node.op_type} -> QuantizeLinear)")
        return self.pool_average(x, node.op_type == "GlobalAveragePool")

    def pool_average(self, x: _Real, global_pool: bool) -> _Acc:
        """:meth:`average`; under ``semantics='onnxruntime'`` only the global pool, whose kernel
        (``MlasQLinearGlobalAveragePoolNchw``: an exact int32 sum ``sum (x - z_x)``, then ``MlasRequantizeOutput``
        with ``m = fl32(s_x / fl32(s_y fl32(n)))``; ``encodings/graph_ops.md``) is one float32 requantization of
        the integer sum (QDQ ``DQ -> GlobalAveragePool -> Q`` is fused into it)."""
        if not global_pool and self.semantics == "onnxruntime":
            return self.ort_window_average(x)
        acc = self.average(x, global_pool)
        if global_pool and self.semantics == "onnxruntime":
            n = int(x.q.shape[1] * x.q.shape[2])
            if acc.mult != [x.scale / n]:
                raise self.error("internal: the global pool's sum is not sum (x - z_x)")
            return replace(acc, ort_gap=(x.scale, n))
        return acc

    op_GlobalAveragePool = op_AveragePool

    def ort_window_average(self, x: _Real) -> _Acc:
        """``semantics='onnxruntime'``: a windowed ``QLinearAveragePool`` (or the fused ``DQ -> AveragePool -> Q``).
        onnxruntime sums the dequantized window in float32, divides by the count and by ``s_y``, adds ``z_y`` and
        rounds (``encodings/graph_ops.md``). That is a function of the integer ``S = sum (x - z_x)`` alone when the
        float32 sum is exact (:func:`qverify.quant.ort_avgpool_sum_is_exact`), and one function for the whole
        tensor when every window has the same count ``K`` (no padding, or ``count_include_pad``; no ``ceil_mode``
        cells): then ``S`` is the exact accumulator of :meth:`average` and the requantization is that function's
        table over ``S`` (a ``Step``). A kernel of the whole image without pads is onnxruntime's global kernel.
        Anything else is refused."""
        from qverify.quant import ort_avgpool_sum_is_exact

        q = x.q
        kernel, _, pads, extra, _, _ = self.pool_geometry(q.shape, False, dilations=False)
        if kernel == q.shape[1:] and not any(pads) and not any(extra):
            return self.pool_average(x, True)
        include = bool(int(self.attr("count_include_pad", 0)))
        if any(extra) or (any(pads) and not include):
            self.ort_pool_refusal()
        k_cells = kernel[0] * kernel[1]
        kmax = max(abs(q.lo - x.zero_point), abs(q.hi - x.zero_point))
        if not ort_avgpool_sum_is_exact(float(x.scale), kmax, k_cells):
            raise self.error(f"semantics='onnxruntime': {self.node.op_type}: onnxruntime's float32 window sum is not "
                             f"exact at scale {float(x.scale)!r} (it depends on the summation order); use "
                             f"semantics='exact'")
        acc = self.average(x, False)
        if acc.mult != [x.scale / k_cells]:
            raise self.error("internal: the average pool's sum is not sum (x - z_x)")
        return replace(acc, ort_avg=(x.scale, k_cells, k_cells * (q.lo - x.zero_point),
                                     k_cells * (q.hi - x.zero_point)))

    def ort_pool_refusal(self) -> None:
        if self.semantics == "onnxruntime":
            raise self.error(f"semantics='onnxruntime': {self.node.op_type}: onnxruntime divides each window by its "
                             f"count in float32, and the count varies at the border (count_include_pad=0 with pads, "
                             f"or ceil_mode cells): a per-position function that no per-channel requantization "
                             f"states; use semantics='exact'")

    def op_QLinearAveragePool(self, node: Any) -> _Sym:
        """com.microsoft ``QLinearAveragePool(X, x_scale, x_zp, y_scale, y_zp)`` (and the global one):
        ``y = clamp(R(s_x / (s_y count) sum_window (x - z_x)) + z_y)`` exactly (:meth:`average`)."""
        self.forms.add("QOperator")
        i = list(node.input) + [""] * (5 - len(node.input))
        x = self.quant_input(i[0], i[1], i[2], "input X")
        if int(self.attr("channels_last", 0)):
            raise self.error("channels_last=1 is not supported")
        acc = self.pool_average(x, node.op_type == "QLinearGlobalAveragePool")
        return self.output_q(acc, i[3], i[4])

    op_QLinearGlobalAveragePool = op_QLinearAveragePool

    def concat_axis(self, rank: int) -> int:
        axis = int(self.attr("axis", 1))
        axis = axis + rank + 1 if axis < 0 else axis
        if not 1 <= axis <= rank:
            raise self.error(f"Concat along axis {axis} of a rank-{rank + 1} tensor: only axes after the batch axis")
        return axis - 1

    def op_Concat(self, node: Any) -> _Sym:
        """``Concat`` of activations: of integer tensors with one ``(s, z)`` (QOperator), or of dequantized ones
        (QDQ); with different ``(s, z)`` each part is quantized to the ``QuantizeLinear`` after it first."""
        xs = [self.get(n) for n in node.input if n]
        if all(isinstance(x, _Const) for x in xs):
            self.fold(node)
            return self.syms[node.output[0]]
        shape0 = xs[0].q.shape if isinstance(xs[0], _Real) else getattr(xs[0], "shape", ())
        axis = self.concat_axis(len(shape0))
        if all(isinstance(x, _Quant) for x in xs):
            if len({(x.scale, x.zero_point, x.etype) for x in xs}) != 1:  # type: ignore[union-attr]
                raise self.error("Concat of integer tensors with different scales or zero points")
            return self.concat_values(xs, axis)  # type: ignore[arg-type]
        if all(isinstance(x, _Real) for x in xs):
            reals: list[_Real] = xs  # type: ignore[assignment]
            shapes = [r.q.shape for r in reals]
            try:
                shape = Concat(axis, len(reals)).output_shape(*shapes)
            except ModelError as e:
                raise self.error(str(e)) from None
            if len({(r.scale, r.zero_point, r.q.etype, r.clip) for r in reals}) == 1:
                q = self.concat_values([r.q for r in reals], axis)
                return replace(reals[0], q=q, via=node.name)
            return _RealConcat(reals, axis, shape)
        raise self.error(f"Concat of {', '.join(sorted({_kind(x) for x in xs}))} is not supported")

    def concat_values(self, qs: list[_Quant], axis: int) -> _Quant:
        op = Concat(axis, len(qs), name=self.node.name)
        try:
            shape = op.output_shape(*[q.shape for q in qs])
        except ModelError as e:
            raise self.error(str(e)) from None
        q0 = qs[0]
        v = self.append(op, [q.pos for q in qs])
        return _Quant(v, shape, min(q.lo for q in qs), max(q.hi for q in qs), q0.scale, q0.zero_point, q0.etype)

    def quantize_concat(self, x: _RealConcat, s: Fraction, z: int, lo: int, hi: int, name: str) -> _Quant:
        """``Q(concat(parts))`` is ``concat(Q(part))``: each part quantized to ``(s, z)`` (nothing, a clamp, or an
        identity layer and a requantization), then one ``Concat``."""
        parts = [self.quantize_real(r, s, z, lo, hi, f"{name}/part{k}", in_kernel=True)
                 for k, r in enumerate(x.parts)]
        return self.concat_values(parts, x.axis)

    def op_QLinearConcat(self, node: Any) -> _Sym:
        """com.microsoft ``QLinearConcat(Y_scale, Y_zp, X_1, s_1, z_1, ...)``: ``y = concat(clamp(R(s_i (x_i - z_i)
        / s_y) + z_y))``, each input requantized to the output parameters unless it has them."""
        self.forms.add("QOperator")
        i = list(node.input)
        if len(i) < 5 or (len(i) - 2) % 3:
            raise self.error(f"QLinearConcat needs Y_scale, Y_zero_point and (X, X_scale, X_zero_point) triples, got "
                             f"{len(i)} inputs")
        reals = [self.quant_input(i[k], i[k + 1], i[k + 2], f"input {(k - 2) // 3}") for k in range(2, len(i), 3)]
        s = self.scalar_scale(i[0], "output scale")
        z, lo, hi = self.zero_point(i[1], "output zero point")
        axis = self.concat_axis(len(reals[0].q.shape))
        shape = Concat(axis, len(reals)).output_shape(*[r.q.shape for r in reals])
        return self.quantize_concat(_RealConcat(reals, axis, shape), s, z, lo, hi, node.name)

    def op_Pad(self, node: Any) -> _Sym:
        """``Pad`` (constant mode) of an activation: the integers padded with ``z + c / s`` for the real constant
        ``c`` of a dequantized activation (real zero is ``z``), or with the integer constant of an integer one."""
        x = self.get(node.input[0])
        done = self.pass_constant(node, x)
        if done is not None:
            return done
        if not isinstance(x, (_Quant, _Real)):
            raise self.error(f"Pad of {_kind(x)} is not supported")
        if self.attr("mode", "constant") != "constant":
            raise self.error(f"Pad mode {self.attr('mode')!r}: only constant padding is supported")
        q = x.q if isinstance(x, _Real) else x
        rank = len(q.shape) + 1
        pads_in = self.const(node.input[1], "Pad pads") if len(node.input) > 1 and node.input[1] else None
        pads = [int(v) for v in (np.asarray(pads_in).ravel() if pads_in is not None else self.attr("pads", []))]
        if len(node.input) > 3 and node.input[3]:
            axes = [int(a) + (rank if int(a) < 0 else 0) for a in np.asarray(self.const(node.input[3], "Pad axes"))]
            full = [0] * (2 * rank)
            for j, a in enumerate(axes):
                full[a], full[rank + a] = pads[j], pads[len(axes) + j]
            pads = full
        if len(pads) != 2 * rank or min(pads, default=0) < 0 or pads[0] or pads[rank]:
            raise self.error(f"Pad pads {pads}: need {2 * rank} non-negative values and no padding of the batch axis")
        cval = self.const(node.input[2], "Pad constant_value") if len(node.input) > 2 and node.input[2] else None
        c = (np.asarray(cval).ravel()[0] if cval is not None and np.asarray(cval).size
             else float(self.attr("value", 0.0)))  # opset < 11: the ``value`` attribute
        if isinstance(x, _Real):
            r = _frac(c) / x.scale
            if r.denominator != 1:
                raise self.error(f"Pad constant {float(c)!r} is not on the integer grid of scale {float(x.scale)!r}")
            fill = x.zero_point + int(r)
            lo_c, hi_c = x.clip
            if (lo_c is not None and _frac(c) < lo_c) or (hi_c is not None and _frac(c) > hi_c):
                raise self.error("Pad of a Relu/Clip of a dequantized activation with a constant outside the clip")
        else:
            fill = int(c)
        inner = tuple(pads[1:rank]) + tuple(pads[rank + 1:])
        op = Pad(inner, fill, name=node.name)
        return self.move_act(x, op, op.output_shape(q.shape), fill)

    # ---------------- QOperator form
    def quant_input(self, name: str, sname: str, zname: str, what: str) -> _Real:
        x = self.get(name)
        if not isinstance(x, _Quant):
            raise self.error(f"{what} must be a quantized activation, got {_kind(x) if x else 'nothing'}")
        s = self.scalar_scale(sname, f"{what} scale")
        z, _, _ = self.zero_point(zname, f"{what} zero point")
        self.use_input_params(x, s, z)
        return _Real(x, s, z)

    def quant_weight(self, name: str, sname: str, zname: str, axis: int) -> _ConstDQ:
        q = self.const(name, "weight")
        if q is None or not np.issubdtype(q.dtype, np.integer):
            raise self.error("weight must be an integer constant")
        s = self.expand(self.const(sname, "weight scale"), axis, q.shape, "weight scale").astype(np.float64)
        zv = self.const(zname, "weight zero point") if zname else None
        dtype = self.type_name(name, q)
        q = q.astype(np.int64)
        z = (self.expand(zv, axis, q.shape, "weight zero point").astype(np.int64) if zv is not None
             else np.zeros(q.shape, dtype=np.int64))
        return _ConstDQ(q, s, z, self.node.name, dtype, name)

    def output_q(self, acc: _Acc, sname: str, zname: str) -> _Quant:
        s = self.scalar_scale(sname, "output scale")
        z, lo, hi = self.zero_point(zname, "output zero point")
        return self.requantize(acc, s, z, lo, hi, f"{self.node.name}/requant")

    def op_QLinearMatMul(self, node: Any) -> _Sym:
        self.forms.add("QOperator")
        i = list(node.input)
        x = self.quant_input(i[0], i[1], i[2], "input a")
        w = self.quant_weight(i[3], i[4], i[5], axis=-1)
        return self.output_q(self.dense(x, w, transpose=True), i[6], i[7])

    def op_QLinearConv(self, node: Any) -> _Sym:
        self.forms.add("QOperator")
        i = list(node.input) + [""] * (9 - len(node.input))
        x = self.quant_input(i[0], i[1], i[2], "input x")
        w = self.quant_weight(i[3], i[4], i[5], axis=0)
        acc = self.conv(x, w)
        if i[8]:
            acc = self.add_int_bias(acc, self.const(i[8], "bias").reshape(-1, 1, 1))
        return self.output_q(acc, i[6], i[7])

    def op_QGemm(self, node: Any) -> _Sym:
        self.forms.add("QOperator")
        if int(self.attr("transA", 0)):
            raise self.error("QGemm with transA=1 is not supported")
        i = list(node.input) + [""] * (9 - len(node.input))
        x = self.quant_input(i[0], i[1], i[2], "input A")
        trans_b = int(self.attr("transB", 0))
        w = self.quant_weight(i[3], i[4], i[5], axis=0 if trans_b else -1)
        acc = self.dense(x, w, transpose=not trans_b, alpha=float(self.attr("alpha", 1.0)))
        if i[6]:
            acc = self.add_int_bias(acc, self.const(i[6], "bias C"))
        if not i[7]:
            return acc  # float output: the accumulator times the scale
        return self.output_q(acc, i[7], i[8])

    def op_MatMulInteger(self, node: Any) -> _Sym:
        self.forms.add("QOperator")
        i = list(node.input) + [""] * (4 - len(node.input))
        x = self.get(i[0])
        if not isinstance(x, _Quant):
            raise self.error(f"input A must be a quantized activation, got {_kind(x) if x else 'nothing'}")
        z, _, _ = self.zero_point(i[2], "a_zero_point")
        self.use_input_params(x, Fraction(1), z)
        q = self.const(i[1], "weight B")
        if q is None or not np.issubdtype(q.dtype, np.integer):
            raise self.error("weight B must be an integer constant")
        zb = self.const(i[3], "b_zero_point") if i[3] else None
        zfull = (self.expand(zb, -1, q.shape, "b_zero_point").astype(np.int64) if zb is not None
                 else np.zeros(q.shape, dtype=np.int64))
        wdq = _ConstDQ(q.astype(np.int64), np.ones(q.shape), zfull, node.name, self.type_name(i[1], q))
        acc = self.dense(_Real(x, Fraction(1), z), wdq, transpose=True)
        return replace(acc, integer=True)

    def op_QLinearAdd(self, node: Any) -> _Sym:
        self.forms.add("QOperator")
        i = list(node.input)
        a, b = self.get(i[0]), self.get(i[3])
        if isinstance(a, _Quant) and isinstance(b, _Quant):
            xa = self.quant_input(i[0], i[1], i[2], "input A")
            xb = self.quant_input(i[3], i[4], i[5], "input B")
            return self.output_q(self.add_activations(xa, xb, "QLinearAdd"), i[6], i[7] if len(i) > 7 else "")
        xa, ca = (i[0:3], i[3:6]) if isinstance(a, _Quant) else (i[3:6], i[0:3])
        x = self.quant_input(xa[0], xa[1], xa[2], "input")
        cq = self.const(ca[0], "constant operand")
        if cq is None or not np.issubdtype(cq.dtype, np.integer):
            raise self.error("the constant operand must be an integer constant")
        cs = self.scalar_scale(ca[1], "constant scale")
        cz, _, _ = self.zero_point(ca[2], "constant zero point")
        real_c = _ConstDQ(cq.astype(np.int64), np.full(cq.shape, float(cs)), np.full(cq.shape, cz), node.name).real()
        acc = self.identity(x, real_c)
        return self.output_q(acc, i[6], i[7] if len(i) > 7 else "")

    # ------------------------------------------------------------------ the network
    def node_type(self, tensor: str) -> str:
        return next((n.op_type for n in self.model.graph.node if tensor in n.output), "node")

    def prune(self) -> None:
        """Drop the nodes whose value does not reach the output (the last value), renumbering the values (and the
        recorded tensors and layer types, keyed by node index)."""
        n = len(self.layers)
        live = {n}
        for i in range(n - 1, -1, -1):
            if i + 1 in live:
                live.update(self.inputs[i])
        if len(live) == n + 1:
            return
        new_of = {0: 0}
        layers, inputs = [], []
        for i in range(n):
            if i + 1 in live:
                layers.append(self.layers[i])
                inputs.append(tuple(new_of[j] for j in self.inputs[i]))
                new_of[i + 1] = len(layers)
        self.notes.append(f"{n - len(layers)} nodes that do not reach the output left out")
        self.layers, self.inputs = layers, inputs
        self.tensors = {new_of[k + 1] - 1: v for k, v in self.tensors.items() if k + 1 in new_of}
        self.affine_types = {new_of[k + 1] - 1: v for k, v in self.affine_types.items() if k + 1 in new_of}

    def finish(self, out_name: str) -> QNetwork:
        sym = self.syms.get(out_name)
        if sym is None:
            raise self.error(f"graph output {out_name!r} is not produced by any node")
        out_scale: Fraction = Fraction(1)
        out_zp = 0
        out_tensor = out_name
        if isinstance(sym, _Softmax):
            out_tensor = sym.tensor
            self.notes.append(f"the final {self.node_type(out_name)} (argmax-preserving: strictly increasing in each "
                              f"logit) is left out: the network's outputs are the logits {sym.tensor!r}, and "
                              f"properties are stated on them")
            sym = sym.inner
        if isinstance(sym, _Real):
            if sym.clip != (None, None):
                raise self.error("the graph output is a Relu/Clip of a dequantized value (no integer output)")
            kind, q = "dequantized", sym.q
            out_scale, out_zp = sym.scale, sym.zero_point
        elif isinstance(sym, _Quant):
            kind, q = "int", sym
            out_scale = sym.scale if sym.scale is not None else Fraction(1)
            out_zp = sym.zero_point or 0
        elif isinstance(sym, _Acc):
            if sym.clip != (None, None) or len(set(sym.mult)) != 1 or sym.integer:
                raise self.error("the graph output is a float accumulator with per-channel scales, a clip or an "
                                 "integer type: no single output scale")
            if self.semantics == "onnxruntime":
                raise self.error("semantics='onnxruntime': the graph output is a float accumulator, which "
                                 "onnxruntime scales in float32 (fl32(acc) * scale, whose ties are not the integer "
                                 "order); use semantics='exact' or end the graph with QuantizeLinear")
            kind, q = "accumulator", sym
            out_scale = sym.mult[0]
        else:
            raise self.error(f"the graph output is {_kind(sym)}, not a quantized value")
        if not self.layers:
            raise self.error("the graph has no layers")
        if len(q.shape) != 1 or q.pos != len(self.layers):
            # the output value must be the last one (and a vector): a Flatten of it (the identity on a vector)
            self.append(Flatten(name="output/flatten"), (q.pos,))
        self.prune()
        if self.input_scale is None:
            self.input_scale, self.input_zero_point = Fraction(1), 0
            self.notes.append("the integer input reaches no DequantizeLinear or quantized operator: input units "
                              "1 * (x - 0)")
        metadata = {
            "format": "qonnx" if "QONNX" in self.forms else "onnx",
            "onnx_path": str(self.path.resolve()),
            "onnx_form": "+".join(sorted(self.forms)) or "none",
            "onnx_input": self.input_name,
            "onnx_input_dtype": self.input_dtype,
            "onnx_input_shape": ",".join(str(d) for d in self.input_shape_full),
            "onnx_output": out_tensor,
            "onnx_output_is_graph_output": "1" if out_tensor == out_name else "0",
            "onnx_output_kind": kind,
            "onnx_opset": ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in self.model.opset_import),
            "onnx_producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
            "onnx_notes": "; ".join(self.notes),
            "semantics": self.semantics,
            "onnx_layer_outputs": json.dumps({str(k): list(v) for k, v in sorted(self.tensors.items())}),
            "onnx_affine_types": json.dumps({str(k): list(v) for k, v in sorted(self.affine_types.items())}),
        }
        try:
            chain = all(row == (i,) for i, row in enumerate(self.inputs))
            return QNetwork(self.net_input_shape, self.input_lo, self.input_hi, tuple(self.layers),
                            input_scale=self.input_scale,
                            input_zero_point=int(self.input_zero_point or 0), output_scale=out_scale,
                            output_zero_point=out_zp, input_rounding=self.input_rounding, name=self.path.stem,
                            metadata=metadata, inputs=None if chain else tuple(self.inputs))
        except ModelError as e:
            raise ModelError(f"{self.path}: {e}") from None



#: the requantization arithmetics an ONNX model can be imported with
SEMANTICS = ("exact", "onnxruntime")


def ort_function_table(f: _RealFn, qs: np.ndarray, s: Fraction, z: int, out_type: int) -> np.ndarray:
    """onnxruntime's own integer outputs of ``Q(f(DQ(q)))`` (or of the contrib op ``f.qoperator``) for every ``q``
    of ``qs``: a one-node-group model run on onnxruntime with the default graph optimizations (so that the group
    is fused, or not, as in the full model)."""
    from onnx import TensorProto, helper, numpy_helper

    x = f.x
    in_np = np.uint8 if x.q.etype == 2 else np.int8
    out_np = np.uint8 if out_type == 2 else np.int8
    ein = TensorProto.UINT8 if in_np is np.uint8 else TensorProto.INT8
    eout = TensorProto.UINT8 if out_np is np.uint8 else TensorProto.INT8
    inits = [numpy_helper.from_array(np.array(float(x.scale), np.float32), "sx"),
             numpy_helper.from_array(np.array(x.zero_point, in_np), "zx"),
             numpy_helper.from_array(np.array(float(s), np.float32), "sy"),
             numpy_helper.from_array(np.array(z, out_np), "zy")]
    if f.qoperator:
        nodes = [helper.make_node(f.qoperator, ["q", "sx", "zx", "sy", "zy"], ["y"], domain="com.microsoft",
                                  **f.attrs)]
    else:
        nodes = [helper.make_node("DequantizeLinear", ["q", "sx", "zx"], ["r"]),
                 helper.make_node(f.op, ["r"], ["fr"], **f.attrs),
                 helper.make_node("QuantizeLinear", ["fr", "sy", "zy"], ["y"])]
    g = helper.make_graph(nodes, "fn", [helper.make_tensor_value_info("q", ein, [len(qs)])],
                          [helper.make_tensor_value_info("y", eout, [len(qs)])], inits)
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(g, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops[:1], True))
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"q": qs.astype(in_np)})[0].astype(np.int64)


def load_onnx(path: str | Path, semantics: str = "exact") -> QNetwork:
    """Import a quantized ONNX model (QDQ or QOperator form) as an exact integer :class:`QNetwork`.

    See the module docstring for the mapping. ``metadata`` records ``format='onnx'``, the absolute ``onnx_path``, the
    graph's input and output names, the input element type and full shape, how the integer outputs relate to the
    graph output (``onnx_output_kind``: ``dequantized``, ``int`` or ``accumulator``), ``onnx_notes`` (every place
    where a real constant had to be rounded) and ``semantics``.

    ``semantics``: ``"exact"`` (the ONNX specification: the rational multiplier ``s_x s_w / s_y``, round half to
    even) or ``"onnxruntime"`` (what onnxruntime's CPU kernels compute: every requantization is the float32 one of
    the integer kernel onnxruntime runs, :mod:`qverify.io.ort_fusion`; a requantization onnxruntime computes in
    float32 outside such a kernel is a :class:`ModelError` that names the node).
    """
    import onnx

    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ModelError(f"{path}: not a readable ONNX model ({e})") from None
    from qverify.io.binarized import NeedsBinarized, is_binarized, load_binarized

    if is_binarized(model):  # a float graph with Sign activations: set-valued, onnxruntime's float32 in its bands
        return load_binarized(path, model)
    try:
        if semantics == "onnxruntime":
            net = _Importer(path, model, semantics=semantics, fused=fused_kernels(path)).run()
            _check_ort_int32(net, path)
            return net
        return _Importer(path, model).run()
    except NeedsBinarized:  # a QONNX BipolarQuant of float arithmetic (Brevitas binarized networks)
        return load_binarized(path, model)


def _check_ort_int32(net: QNetwork, path: Path) -> None:
    """onnxruntime accumulates in int32 and converts ``fl32(acc) m`` back to int32: refuse a model whose worst-case
    accumulators (over the whole input grid) could wrap or leave that range, where the float32 formula no longer
    describes the kernel."""
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Requantize) and layer.float32_scale is not None:
            lo, hi = net.value_ranges[net.node_inputs(i)[0]]
            a = max(abs(lo), abs(hi))
            if a >= 2**31 or a * max(layer.float32_scale) >= 2**31 - 2**16:
                raise ModelError(f"{path}: layer {i} ({layer.name!r}): semantics='onnxruntime': accumulators may "
                                 f"reach {a}, beyond onnxruntime's int32 arithmetic")


# ---------------------------------------------------------------------------------------------- onnxruntime replay
_SESSIONS: dict[tuple[str, float, str], Any] = {}
_OPT_LEVELS = ("all", "extended", "basic", "none")


def onnx_session(path: str | Path, optimization: str = "all") -> Any:
    """A cached single-threaded CPU ``InferenceSession`` (``optimization``: all, extended, basic or none)."""
    import onnxruntime as ort

    if optimization not in _OPT_LEVELS:
        raise ValueError(f"optimization must be one of {_OPT_LEVELS}")
    p = str(Path(path).resolve())
    key = (p, Path(p).stat().st_mtime, optimization)
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(p, _session_options(optimization), providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def _session_options(optimization: str) -> Any:
    """Single-threaded, quiet onnxruntime session options at one graph optimization level."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def _output_session(meta: dict, optimization: str) -> Any:
    """The session that yields the network's output tensor: the file's own, or (when that tensor is not a graph
    output: the logits before a final Softmax) the graph with the tensor added as an output. Adding an output
    can change onnxruntime's fusions only around that tensor (a DequantizeLinear's output, which no fusion
    consumes once the Softmax is its only reader)."""
    if meta.get("onnx_output_is_graph_output", "1") == "1":
        return onnx_session(meta["onnx_path"], optimization)
    import onnx
    import onnxruntime as ort

    p = str(Path(meta["onnx_path"]).resolve())
    key = (f"{p}#{meta['onnx_output']}", Path(p).stat().st_mtime, optimization)
    if key not in _SESSIONS:
        model = onnx.load(p)
        model.graph.output.append(onnx.helper.make_tensor_value_info(meta["onnx_output"], 1, None))
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), _session_options(optimization),
                                              providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def onnx_real_inputs(net: QNetwork, x_int: np.ndarray) -> np.ndarray:
    """The float32 inputs that the graph's ``QuantizeLinear`` maps back to ``x_int`` exactly.

    ``x_real = fl32(s_in (x - z_in))`` (the float64 product is exact, one rounding to float32); onnxruntime computes
    ``R(fl32(x_real / s_in)) + z_in`` and the relative error ``<= 2^-23`` of the two roundings cannot move
    ``x - z_in`` (``|x - z_in| < 2^21``) across a rounding boundary. The round trip is checked here with the same
    float32 operations (IEEE division, round half to even); a point that does not round-trip raises ``ValueError``.
    """
    x = np.asarray(x_int, dtype=np.int64).reshape(len(np.asarray(x_int)), -1)
    s32 = np.float32(float(net.input_scale))
    z = net.input_zero_point
    xr = ((x - z).astype(np.float64) * float(s32)).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        back = np.rint(xr / s32).astype(np.float64) + z
    bad = np.argwhere(back != x)
    if bad.size:
        i, j = bad[0]
        raise ValueError(f"input {int(x[i, j])} at position {int(j)} does not round-trip through float32 "
                         f"with scale {float(s32)!r}, zero point {z}")
    return xr


def qlinear_matmul_session(w: np.ndarray, sy: float) -> Any:
    """A session of one ``QLinearMatMul``, ``u8 [1, K] @ s8 [K, N]`` (``w``) at unit input scales and zero points,
    output scale ``sy`` (uint8): ``y = clip(R(x @ w / sy), 0, 255)`` when onnxruntime computes exactly."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.asarray(w)
    inits = {"sa": np.float32(1.0), "za": np.uint8(0), "w": w.astype(np.int8), "sb": np.float32(1.0),
             "zb": np.int8(0), "sy": np.float32(sy), "zy": np.uint8(0)}
    node = helper.make_node("QLinearMatMul", ["x", "sa", "za", "w", "sb", "zb", "sy", "zy"], ["y"])
    k, n = w.shape
    graph = helper.make_graph([node], "qlinear_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, n])],
                              [numpy_helper.from_array(np.asarray(v), name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    return ort.InferenceSession(model.SerializeToString(), _session_options("all"),
                                providers=["CPUExecutionProvider"])


@functools.cache
def ort_u8s8_saturates() -> bool:
    """Whether onnxruntime's u8 x s8 integer kernels clip on this CPU (``False`` without onnxruntime).

    x86-64 CPUs with AVX2 but no VNNI sum each pair of adjacent ``u8 * s8`` products in a saturating 16-bit lane
    (``vpmaddubsw``): a pair ``a_1 w_1 + a_2 w_2`` above ``32767`` comes out as ``32767`` (``255 * 127 * 2 = 64770``
    does not fit), so onnxruntime parts from the integer semantics on models with 8-bit weights. With 7-bit weights
    (``|w| <= 64``) no pair can clip: ``255 * 64 * 2 = 32640``. Probed once with one ``QLinearMatMul``
    (:func:`qlinear_matmul_session`): ``[255, 255] @ [[127], [127]]`` at output scale 256 is ``R(64770 / 256) =
    253`` exactly and ``128`` when clipped.
    """
    try:
        sess = qlinear_matmul_session(np.full((2, 1), 127), 256.0)
    except ImportError:
        return False
    y = int(sess.run(None, {"x": np.full((1, 2), 255, dtype=np.uint8)})[0][0, 0])
    return y != 253


def u8s8_pair_bounds(net: QNetwork) -> dict[int, int]:
    """The affine layers of an ONNX-imported ``net`` that onnxruntime runs through its u8 x s8 integer kernels on
    x86-64, each with the largest magnitude a pair of adjacent products ``a_1 w_1 + a_2 w_2`` can reach there.

    Which kernel runs a layer (onnxruntime/core/mlas/lib/qgemm.h, ``MlasGemmQuantGetDispatch``, on
    ``MLAS_TARGET_AMD64_IX86``): uint8 activations x int8 weights take ``GemmU8S8Dispatch`` (on AVX2 without VNNI,
    ``vpmaddubsw``: pairs saturate to 16 bits); uint8 x uint8 take ``GemmU8U8Dispatch`` (16-bit operands,
    ``vpmaddwd``: exact); int8 x int8 take ``MlasGemmQuantDispatchDefault`` (portable C++, exact int32 sums); the
    convolution's symmetric path (convsym) is u8 x s8 only. A QDQ graph's int8 activations are moved to uint8
    (``+128``) by ``QDQS8ToU8Transformer`` before the QDQ fusion, because ``QDQIsInt8Allowed()`` is false off ARM
    (onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.h): QDQ int8 x
    int8 runs on the u8 x s8 kernels, QOperator int8 x int8 does not.

    The kernel multiplies the stored values: uint8 activations ``a`` in the layer's input range (``+128`` for moved
    int8 ones) and the stored int8 weights (``W' = W - z_w``, equal to them for the symmetric int8 weights that
    ``quantize_static`` writes). Two products of opposite signs cannot leave 16 bits (``255 * 128 < 32767``); a pair
    of the same sign reaches ``a_max (|w_1| + |w_2|)``, bounded here by the two largest weights of that sign in each
    output channel (any pair, whatever the packing order). Clipping is possible iff a bound exceeds ``32767`` (a
    negative pair's bound is reported one lower: it clips only below ``-32768``).
    Layers whose types were not recorded (models imported before this was recorded) are not listed.
    """
    types = json.loads(net.metadata.get("onnx_affine_types", "{}") or "{}")
    ranges = net.value_ranges
    out: dict[int, int] = {}
    for key, (act, wtype, form) in types.items():
        k = int(key)
        layer = net.layers[k]
        if wtype != "int8" or not isinstance(layer, (Dense, Conv2d)):
            continue
        if act == "uint8":
            shift = 0
        elif act == "int8" and form == "QDQ":
            shift = 128
        else:
            continue
        lo, hi = ranges[net.node_inputs(k)[0]]
        if isinstance(layer, Conv2d):
            lo, hi = min(lo, layer.pad_value), max(hi, layer.pad_value)
        a_max = max(0, hi + shift)
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        pos = np.sort(np.clip(w, 0, None), axis=1)[:, -2:].sum(axis=1)
        neg = np.sort(np.clip(-w, 0, None), axis=1)[:, -2:].sum(axis=1)
        # a negative pair clips below -32768: report it one lower, so that "> 32767" reads the same for both signs
        out[k] = max(a_max * int(pos.max(initial=0)), a_max * int(neg.max(initial=0)) - 1)
    return out


def ort_may_clip(net: QNetwork) -> bool:
    """Whether onnxruntime on this CPU can part from the integer semantics of ``net`` by 16-bit clipping: the CPU
    clips (:func:`ort_u8s8_saturates`) and some layer that runs on the u8 x s8 kernels can reach a pair above
    ``32767`` (:func:`u8s8_pair_bounds`). For a network whose layer types were not recorded, the old sufficient
    test: some dense or convolution weight has ``|w| > 64``."""
    if "onnx_affine_types" in net.metadata:
        reach = any(v > 32767 for v in u8s8_pair_bounds(net).values())
    else:
        reach = any(isinstance(layer, (Dense, Conv2d)) and layer.weight.size
                    and int(np.abs(layer.weight).max()) > 64 for layer in net.layers)
    return reach and ort_u8s8_saturates()


U8S8_CLIP_NOTE = ("onnxruntime's u8 x s8 kernels clip pairs of products to 16 bits on this CPU (AVX2 without VNNI); "
                  "weights of at most 7 bits replay exactly here")


def onnx_integer_outputs(net: QNetwork, x_int: np.ndarray, optimization: str = "all") -> np.ndarray:
    """Run the original ONNX file (``net.metadata['onnx_path']``) in onnxruntime on integer inputs; return the integer
    outputs ``[B, num_outputs]`` that correspond to the executor's.

    Inputs: a float graph input receives :func:`onnx_real_inputs` (which its ``QuantizeLinear`` maps back to ``x_int``
    exactly); an integer graph input receives ``x_int`` as its type. Outputs (``metadata['onnx_output_kind']``):

    * ``int``: the graph output is the integer tensor;
    * ``dequantized``: the graph ends with ``DequantizeLinear``, ``y = fl32((q - z) s)`` (one rounding, relative error
      ``2^-24``); ``q = z + rint(y / s)`` recovers ``q`` exactly (``|q - z| < 2^22``), and the recovery is checked by
      recomputing ``fl32((q - z) s) == y``;
    * ``accumulator``: a float output ``M acc``; ``rint(y / M)`` (exact for kernels that compute ``fl32(acc M)`` with
      ``|acc| < 2^21``; a float32 graph can be off by its own rounding errors).

    The graph is not modified (no extra outputs), so onnxruntime optimizes it as it would when deployed
    (``optimization='all'``; ``'none'`` runs the unfused reference kernels).
    """
    meta = net.metadata
    if meta.get("format") != "onnx" or not meta.get("onnx_path"):
        raise ValueError(f"network {net.name!r} was not imported from ONNX")
    sess = _output_session(meta, optimization)
    x = np.asarray(x_int)
    b = x.shape[0] if x.ndim > 1 else 1
    x = x.reshape(b, -1).astype(np.int64)
    if x.shape[1] != net.num_inputs:
        raise ValueError(f"inputs of size {x.shape[1]} for a network with {net.num_inputs} inputs")
    if x.size and (x.min() < net.input_lo or x.max() > net.input_hi):
        raise ValueError(f"inputs outside the grid [{net.input_lo}, {net.input_hi}]")
    dims = [int(d) for d in meta["onnx_input_shape"].split(",")]
    per_sample = tuple(dims[1:])
    if meta["onnx_input_dtype"] == "float":
        feed = onnx_real_inputs(net, x)
    else:
        feed = x.astype(np.dtype(meta["onnx_input_dtype"]))
    feed = feed.reshape((b, *per_sample))
    in_name, out_name = meta["onnx_input"], meta["onnx_output"]
    if dims[0] == -1:
        y = sess.run([out_name], {in_name: feed})[0]
    else:
        step = dims[0]
        if b % step:
            raise ValueError(f"the model's fixed batch size {step} does not divide {b}")
        y = np.concatenate([sess.run([out_name], {in_name: feed[i:i + step]})[0] for i in range(0, b, step)])
    y = y.reshape(b, -1)
    kind = meta["onnx_output_kind"]
    if kind == "int":
        return y.astype(np.int64)
    s = net.output_scale
    if kind == "dequantized":
        s32 = np.float32(float(s))
        z = net.output_zero_point
        q = np.rint(y.astype(np.float64) / float(s32)).astype(np.int64) + z
        again = (q - z).astype(np.float32) * s32
        if not np.array_equal(again, y.astype(np.float32)):
            raise RuntimeError("onnxruntime's dequantized outputs do not map back to integers exactly")
        return q
    return np.rint(y.astype(np.float64) / float(s)).astype(np.int64)


def onnx_layer_outputs(net: QNetwork, x_int: np.ndarray, optimization: str = "all") -> dict[int, np.ndarray]:
    """onnxruntime's integer tensors at every node output that exists in the graph: ``{node index: [B, n]}``, node
    ``i``'s tensor holding qverify value ``i + 1`` (``metadata['onnx_layer_outputs']`` names the tensor of each node;
    a graph model has several such tensors live at once, each mapped to its own value). The graph is run with those
    tensors added as outputs, so ``optimization='all'`` may fuse slightly differently than the unmodified graph; use
    it to locate where onnxruntime and the executor part, not as the replay itself (:func:`onnx_integer_outputs`).
    """
    import onnx
    import onnxruntime as ort

    meta = net.metadata
    tensors = {int(k): (v[0], int(v[1])) for k, v in json.loads(meta.get("onnx_layer_outputs", "{}")).items()}
    model = onnx.load(meta["onnx_path"])
    known = {o.name for o in model.graph.output}
    for name, et in tensors.values():
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, et, None))
            known.add(name)
    sess = ort.InferenceSession(model.SerializeToString(), _session_options(optimization),
                                providers=["CPUExecutionProvider"])
    x = np.asarray(x_int).reshape(-1, net.num_inputs).astype(np.int64)
    dims = [int(d) for d in meta["onnx_input_shape"].split(",")]
    if meta["onnx_input_dtype"] == "float":
        feed = onnx_real_inputs(net, x)
    else:
        feed = x.astype(np.dtype(meta["onnx_input_dtype"]))
    feed = feed.reshape((len(x), *dims[1:]))
    names = [v[0] for v in tensors.values()]
    step = len(x) if dims[0] == -1 else dims[0]
    runs = [sess.run(names, {meta["onnx_input"]: feed[i:i + step]}) for i in range(0, len(x), max(step, 1))]
    return {k: np.concatenate([r[j] for r in runs]).reshape(len(x), -1).astype(np.int64)
            for j, k in enumerate(tensors)}


__all__ = ["U8S8_CLIP_NOTE", "load_onnx", "onnx_integer_outputs", "onnx_layer_outputs", "onnx_real_inputs",
           "onnx_session", "ort_may_clip", "ort_u8s8_saturates", "qlinear_matmul_session", "u8s8_pair_bounds"]


def _replay_applies(net: QNetwork) -> bool:
    return bool(net.metadata.get("onnx_path"))


def _replay_cause(net: QNetwork) -> str:
    return U8S8_CLIP_NOTE if ort_may_clip(net) else ""


def _replay_outputs(net: QNetwork, x: np.ndarray) -> np.ndarray:
    return onnx_integer_outputs(net, x)  # looked up at call time (a stand-in may replace it)


register_runtime("onnx", RuntimeReplay("onnxruntime", _replay_applies, _replay_outputs, _replay_cause))
