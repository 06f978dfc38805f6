"""Binarized ONNX networks (Larq-style ``Sign`` activations, float BatchNorm, a float first and last layer) as
set-valued integer networks whose every member a ``robust`` verdict covers, onnxruntime's float32 arithmetic
among them.

A binarized network computes in float32, but most of what it computes is exact: the products of ``+-1``
activations and ``+-1`` (or any dyadic) weights, and their sums below ``2^24``. Only the first layer (real
pixels times float weights), a BatchNorm / Mul / Add folded before a ``Sign``, and the last layer (with its
BatchNorm) round. The importer tracks each float value symbolically as an exact affine function of an integer
value of the network, plus a bound on how far any float32 evaluation can be from it, and emits integer ops only
where the function must be made concrete:

* **the value**: ``y_c = alpha_c (L x)_c + beta_c`` with ``L`` a dense, convolution or identity map of integer
  values ``x`` (inputs in their real units ``s x``), ``alpha``, ``beta`` from the folded BatchNorm
  ``gamma / sqrt(var + eps)``, ``beta - mean gamma / sqrt(var + eps)``, Mul and Add constants (float64; every
  float64 rounding is charged below);
* **the float32 band**: any evaluation of ``y`` in float32 (any summation order, BatchNorm fused into the
  convolution or not, with or without fused multiply-adds) is a sum of the expanded terms of ``y``, each the
  product of at most ``m`` rounded operations, so ``|fl(y) - y| <= gamma_m sum |terms|`` (Higham, *Accuracy and
  Stability of Numerical Algorithms*, 2nd ed., section 3.1, with ``gamma_m = m u / (1 - m u)``, ``u = 2^-24``).
  The importer uses ``E = 2 gamma_m M`` with ``M`` the sum of the terms' magnitudes over the whole input grid and
  ``m = n + 8 + 6 k`` (``n`` terms of the linear map, ``k`` folded elementwise ops; each BatchNorm's own
  ``1 / sqrt(var + eps)`` counted there), a factor 2 on top; plus ``1e-12 M`` for the float64 folding;
* **emission** at a ``Sign``: per channel a power of two ``K_c`` (``1`` when ``K alpha W s`` and
  ``K (alpha b + beta)`` are integers already: the exact case), integer weights ``A = round(K_c alpha_c W s)``,
  bias ``round(K_c (alpha_c b + beta_c))``; ``u = A x + B`` is within ``rho_c = sum |K alpha W s - A| X +
  |...|`` of ``K_c y`` (``X`` the inputs' magnitudes), so the runtime's ``K_c fl(y)`` is within ``D_c = K_c E_c +
  rho_c`` of ``u``, and ``Uncertain(ceil(D_c))`` followed by ``Step(0, (-1, +1))`` covers every decision the
  runtime can make (:class:`qverify.ops.Uncertain`). At a ``MaxPool`` the value is emitted with ``K_c > 0`` (the
  pooled value is within the same bound); at the **output** with one ``K`` for every logit (the argmax compares
  them), ``output_scale = 1 / K``.

``Sign`` forms: Larq's ``sign(sign(y) + c)`` with ``0 < c < 1`` (``y >= 0 -> +1``) and with ``-1 < c < 0``
(``y > 0 -> +1``); ONNX ``Sign`` (``0 -> 0``) where ``y`` is exact (no band); a ``Sign`` of a float value that
float32 can land exactly on 0 is refused with the node's name. Also: ``Conv`` (pads, strides, dilations, group),
``MatMul``, ``Gemm``, ``BatchNormalization``, ``Mul`` / ``Add`` / ``Sub`` / ``Div`` by constants, ``MaxPool``,
``Flatten`` / ``Reshape`` to a vector, an NHWC input read through ``Transpose(0, 3, 1, 2)``, a final ``Softmax``
(dropped: argmax-preserving), ``Identity`` / ``Dropout``. The input grid is the model's float input taken at the
integers ``input_lo..input_hi`` (pixels ``0..255`` as floats) times ``input_scale``.

Replay: every counterexample is confirmed on onnxruntime (format ``onnx-binarized``), whose logits, times ``K``,
are compared with the property.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from qverify.network import Conv2d, Dense, Flatten, MaxPool2d, ModelError, QNetwork, Step, Uncertain

#: unit roundoff of float32
U32 = 2.0**-24
#: integer weights get about this many bits where the float ones do not scale to integers exactly
WEIGHT_BITS = 24
#: relative slack charged for the float64 arithmetic of the folding
F64_SLACK = 1e-12
FORMAT = "onnx-binarized"
#: the format of a QONNX binarized network (Brevitas bipolar), replayed on qonnx's executor
QONNX_FORMAT = "qonnx-binarized"


class NeedsBinarized(ModelError):
    """Raised by the quantized-graph importer for a binarizing threshold of float arithmetic: the graph is a
    binarized network and is imported here."""


def is_binarized(model: Any) -> bool:
    """A float graph with a ``Sign`` and no quantization operators, or a QONNX graph whose ``BipolarQuant`` binarizes
    float arithmetic (a BatchNorm, ``Mul``, ``Add``, ``Sub`` or ``Div`` before it, through pooling and reshapes):
    Brevitas's binarized networks. A ``BipolarQuant`` of an exact integer accumulator stays with the quantized-graph
    importer (which hands a float case it meets over by :class:`NeedsBinarized`)."""
    nodes = model.graph.node
    kinds = {n.op_type for n in nodes}
    quant = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "QGemm",
             "ConvInteger", "Quant", "BipolarQuant"}
    if "Sign" in kinds and not kinds & quant:
        return True
    producer = {o: n for n in nodes for o in n.output}
    for n in nodes:
        if n.op_type != "BipolarQuant" or n.input[0] not in producer:
            continue
        p = producer[n.input[0]]
        while p.op_type in ("MaxPool", "Identity", "Reshape", "Flatten", "Dropout") and p.input[0] in producer:
            p = producer[p.input[0]]
        if p.op_type in ("BatchNormalization", "Mul", "Add", "Sub", "Div"):
            return True
    return False


def _gamma(m: int) -> float:
    return m * U32 / (1 - m * U32)


@dataclass
class _Int:
    """An emitted integer value: ``value`` index, shape (channels first), real value ``scale * x``, ``|x| <= mag``
    elementwise (float64 array of the shape)."""

    value: int
    shape: tuple[int, ...]
    scale: float
    mag: np.ndarray


@dataclass
class _Aff:
    """A float value ``y = alpha (L x) + beta`` over the integer value ``src`` (module docstring); ``alpha``,
    ``beta``, ``absm`` (the terms' magnitude sum) and ``err0`` (a carried float32 error) broadcast to ``shape``;
    ``n`` terms of ``L``, ``k`` folded elementwise ops."""

    src: _Int
    kind: str  # "dense" | "conv" | "diag"
    shape: tuple[int, ...]
    W: np.ndarray | None
    b: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    absm: np.ndarray
    err0: np.ndarray
    n: int
    k: int = 0
    conv: dict = field(default_factory=dict)
    exact: bool = False

    def error(self) -> np.ndarray:
        """``E``: the float32 band of any evaluation, plus the float64 slack (module docstring)."""
        if self.exact:
            return np.zeros(self.shape)
        return self.err0 + 2 * _gamma(self.n + 8 + 6 * self.k) * self.absm + F64_SLACK * self.absm


@dataclass
class _SignOf:
    """``Sign(y)`` not yet emitted (Larq's pattern may follow), with the constant added to it (``None``: none)."""

    aff: _Aff
    plus: float | None = None
    node: str = ""


class _Importer:
    def __init__(self, path: Path, model: Any, input_lo: int, input_hi: int, input_scale: Fraction) -> None:
        import onnx
        from onnx import numpy_helper

        self.path = path
        self.model = model
        self.onnx = onnx
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.syms: dict[str, Any] = {}
        self.layers: list = []
        self.inputs: list[tuple[int, ...]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.input_lo, self.input_hi, self.input_scale = input_lo, input_hi, input_scale
        self.node: Any = None
        self.out_scale = Fraction(1)
        self.layout = "nchw"
        self.input_rounding: Any = None
        self.qonnx = False

    # ------------------------------------------------------------------ helpers
    def error(self, msg: str) -> ModelError:
        where = f"node {self.node.name!r} ({self.node.op_type})" if self.node is not None else "graph"
        return ModelError(f"{self.path}: {where}: {msg}")

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                return self.onnx.helper.get_attribute_value(a)
        return default

    def const(self, name: str) -> np.ndarray | None:
        v = self.consts.get(name)
        return None if v is None else np.asarray(v, dtype=np.float64)

    def emit(self, op: Any, *ins: int) -> int:
        shape = op.output_shape(*[self.shapes[j] for j in ins])
        self.layers.append(op)
        self.inputs.append(tuple(ins))
        self.shapes.append(tuple(shape))
        return len(self.layers)

    def channel(self, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A per-channel (or scalar) constant broadcast to ``shape``."""
        a = np.asarray(arr, dtype=np.float64)
        if a.size == 1:
            return np.full(shape, float(a.reshape(())))
        a = a.reshape(-1)
        if a.size == shape[0]:
            return np.broadcast_to(a.reshape((-1,) + (1,) * (len(shape) - 1)), shape).astype(np.float64)
        if a.size == int(np.prod(shape)):
            return a.reshape(shape)
        raise self.error(f"constant of {a.size} values for a value of shape {shape}")

    # ------------------------------------------------------------------ walk
    def run(self) -> QNetwork:
        g = self.model.graph
        if len(g.input) - len([i for i in g.input if i.name in self.consts]) != 1 or len(g.output) != 1:
            raise ModelError(f"{self.path}: one graph input and one output expected")
        inp = next(i for i in g.input if i.name not in self.consts)
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
        shape = tuple(int(d) for d in dims[1:])
        self.graph_input_shape = shape
        self.shapes.append(shape)
        mag = np.full(shape, float(max(abs(self.input_lo), abs(self.input_hi))))
        self.syms[inp.name] = _Int(0, shape, float(self.input_scale), mag)
        self.input_shape = shape
        for node in g.node:
            self.node = node
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise self.error(f"unsupported operator {node.op_type!r} in a binarized network")
            handler(node)
        self.node = None
        out = self.syms.get(g.output[0].name)
        if out is None:
            raise ModelError(f"{self.path}: the graph output {g.output[0].name!r} is not computed")
        self.finish(out)
        meta = {"format": QONNX_FORMAT if self.qonnx else FORMAT, "onnx_path": str(self.path.resolve()),
                "onnx_input": inp.name,
                "onnx_output": g.output[0].name, "input_layout": self.layout,
                "onnx_input_shape": ",".join(str(d) for d in dims), "semantics": "onnxruntime-float32-bands",
                "output_units": f"logit * {1 / self.out_scale}", "onnx_notes": self.notes()}
        return QNetwork(self.input_shape, self.input_lo, self.input_hi, tuple(self.layers),
                        input_scale=self.input_scale, output_scale=self.out_scale, name=self.path.stem,
                        metadata=meta, inputs=tuple(self.inputs), input_rounding=self.input_rounding)

    def notes(self) -> str:
        """Where float arithmetic has no exact integer form: every band, with its width in its value's units."""
        out = []
        for op in self.layers:
            if isinstance(op, Uncertain):
                lo, hi = int(op.delta.min()), int(op.delta.max())
                width = f"+-{hi}" if lo == hi else f"+-{lo}..{hi}"
                out.append(f"{op.name}: float32 band {width} (float arithmetic with no exact integer form: the "
                           f"network is set-valued there, onnxruntime's float32 result one member)")
        return "; ".join(out)

    def get(self, name: str) -> Any:
        if name in self.syms:
            return self.syms[name]
        if name in self.consts:
            return self.consts[name]
        raise self.error(f"input {name!r} is not computed before this node")

    # ------------------------------------------------------------------ layers
    def op_Transpose(self, node: Any) -> None:
        x = self.get(node.input[0])
        perm = tuple(self.attr("perm", ()))
        if isinstance(x, np.ndarray):  # a constant (Brevitas transposes its quantized weights)
            self.consts[node.output[0]] = np.transpose(x, perm or None)
            return
        if isinstance(x, _Int) and x.value == 0 and perm == (0, 3, 1, 2) and len(x.shape) == 3:
            h, w, c = x.shape
            self.input_shape = (c, h, w)
            self.shapes[0] = self.input_shape
            self.layout = "nhwc"
            self.syms[node.output[0]] = _Int(0, self.input_shape, x.scale, np.transpose(x.mag, (2, 0, 1)))
            return
        raise self.error("Transpose is supported only as the NHWC -> NCHW transpose of the input")

    def op_Constant(self, node: Any) -> None:
        from onnx import numpy_helper

        value = next((a for a in node.attribute if a.name == "value"), None)
        if value is None:
            raise self.error("only a Constant with a tensor 'value' is supported")
        self.consts[node.output[0]] = numpy_helper.to_array(value.t)

    def op_Identity(self, node: Any) -> None:
        self.syms[node.output[0]] = self.get(node.input[0])

    op_Dropout = op_Identity

    def op_Softmax(self, node: Any) -> None:
        if node.output[0] != self.model.graph.output[0].name:
            raise self.error("Softmax is supported only as the graph's output (argmax-preserving)")
        self.syms[node.output[0]] = self.get(node.input[0])

    def _src(self, name: str) -> _Int:
        x = self.get(name)
        if isinstance(x, _SignOf):
            x = self.sign(x)
        if not isinstance(x, _Int):
            raise self.error("a linear layer of a float value: binarized layers read the input or a Sign "
                             "(a float value must pass a Sign or a MaxPool first)")
        return x

    def linear(self, x: _Int, kind: str, W: np.ndarray, b: np.ndarray, conv: dict, out_shape: tuple[int, ...]
               ) -> _Aff:
        Ws = W * x.scale
        if kind == "dense":
            absm = np.abs(Ws) @ x.mag.reshape(-1) + np.abs(b)
            n = W.shape[1] + 1
        else:
            absm_c = self._conv_abs(Ws, x, conv, out_shape)
            absm = absm_c + np.abs(b).reshape(-1, 1, 1)
            n = int(np.prod(W.shape[1:])) + 1
        exact = bool(np.all(Ws == np.round(Ws)) and np.all(b == np.round(b)) and float(absm.max()) < 2**24)
        one = np.ones(out_shape)
        return _Aff(x, kind, out_shape, W, b, one, np.zeros(out_shape), np.broadcast_to(absm, out_shape).copy(),
                    np.zeros(out_shape), n, 0, conv, exact)

    def _conv_abs(self, Ws: np.ndarray, x: _Int, conv: dict, out_shape: tuple[int, ...]) -> np.ndarray:
        """``sum |W s| X`` per output cell by a float convolution of the magnitudes (exact enough: charged by the
        float64 slack)."""
        import torch
        import torch.nn.functional as F

        t, l, b, r = conv["padding"]
        xm = torch.as_tensor(np.pad(x.mag, ((0, 0), (t, b), (l, r))), dtype=torch.float64)[None]
        out = F.conv2d(xm, torch.as_tensor(np.abs(Ws), dtype=torch.float64), None, conv["stride"], 0,
                       conv["dilation"], conv["groups"])
        return out[0].numpy().reshape(out_shape)

    def op_Conv(self, node: Any) -> None:
        x = self._src(node.input[0])
        W = self.const(node.input[1])
        if W is None or W.ndim != 4:
            raise self.error("the weights must be a constant 4-D tensor")
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(W.shape[0])
        if b is None:
            raise self.error("the bias must be a constant")
        if self.attr("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise self.error("auto_pad is not supported (use explicit pads)")
        pads = list(self.attr("pads", [0, 0, 0, 0]))
        conv = {"stride": tuple(self.attr("strides", [1, 1])), "dilation": tuple(self.attr("dilations", [1, 1])),
                "padding": (pads[0], pads[1], pads[2], pads[3]), "groups": int(self.attr("group", 1))}
        probe = Conv2d(np.zeros(W.shape, np.int64), np.zeros(W.shape[0], np.int64), conv["stride"],
                       conv["padding"], conv["dilation"], 0, groups=conv["groups"])
        out_shape = probe.output_shape(x.shape)
        self.syms[node.output[0]] = self.linear(x, "conv", W, b, conv, out_shape)

    def op_MatMul(self, node: Any) -> None:
        x = self._src(node.input[0])
        W = self.const(node.input[1])
        if W is None or W.ndim != 2 or len(x.shape) != 1:
            raise self.error("MatMul of a vector by a constant matrix expected")
        self.syms[node.output[0]] = self.linear(x, "dense", W.T.copy(), np.zeros(W.shape[1]), {}, (W.shape[1],))

    def op_Gemm(self, node: Any) -> None:
        x = self._src(node.input[0])
        W = self.const(node.input[1])
        if W is None or W.ndim != 2 or len(x.shape) != 1 or self.attr("transA", 0):
            raise self.error("Gemm of a vector by a constant matrix expected")
        W = W.T if not self.attr("transB", 0) else W
        W = W * float(self.attr("alpha", 1.0))
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(W.shape[0])
        if b is None:
            raise self.error("the bias must be a constant")
        b = np.broadcast_to(b.reshape(-1) * float(self.attr("beta", 1.0)), (W.shape[0],)).copy()
        self.syms[node.output[0]] = self.linear(x, "dense", W.copy(), b, {}, (W.shape[0],))

    # ------------------------------------------------------------------ elementwise affine ops
    def scale_shift(self, y: _Aff, s: np.ndarray, t: np.ndarray, extra: np.ndarray | None = None) -> _Aff:
        """``s y + t`` (``extra``: magnitudes of further terms, e.g. a BatchNorm's mean times its scale)."""
        absm = np.abs(s) * y.absm + np.abs(t) + (0 if extra is None else extra)
        ok = y.exact and bool(np.all(s == np.round(s)) and np.all(t == np.round(t)) and float(absm.max()) < 2**24)
        return _Aff(y.src, y.kind, y.shape, y.W, y.b, y.alpha * s, y.beta * s + t, absm, np.abs(s) * y.err0,
                    y.n, y.k + 1, y.conv, ok)

    def _aff_arg(self, node: Any) -> tuple[_Aff, np.ndarray]:
        a, b = (self.get(n) for n in node.input[:2])
        if isinstance(a, np.ndarray) and not isinstance(b, np.ndarray):
            a, b = b, a
        if isinstance(a, _Int):
            a = self._diag(a)
        if not isinstance(a, _Aff) or not isinstance(b, np.ndarray):
            raise self.error("an elementwise op of a float value and a constant expected")
        return a, self.channel(b, a.shape)

    def _diag(self, x: _Int) -> _Aff:
        one = np.ones(x.shape)
        return _Aff(x, "diag", x.shape, None, np.zeros(x.shape), one * x.scale, np.zeros(x.shape),
                    x.mag * abs(x.scale), np.zeros(x.shape), 1, 0, {}, x.scale == round(x.scale))

    def op_Add(self, node: Any) -> None:
        a = self.get(node.input[0])
        b = self.get(node.input[1])
        if isinstance(a, np.ndarray) and isinstance(b, _SignOf):
            a, b = b, a
        if isinstance(a, _SignOf) and isinstance(b, np.ndarray) and b.size == 1 and a.plus is None:
            self.syms[node.output[0]] = _SignOf(a.aff, float(b.reshape(())), a.node)
            return
        y, c = self._aff_arg(node)
        self.syms[node.output[0]] = self.scale_shift(y, np.ones(y.shape), c)

    def op_Sub(self, node: Any) -> None:
        b = self.get(node.input[1])
        if not isinstance(b, np.ndarray):
            raise self.error("Sub of a constant from a float value expected")
        y, _ = self._aff_arg(node)
        self.syms[node.output[0]] = self.scale_shift(y, np.ones(y.shape), -self.channel(b, y.shape))

    def op_Mul(self, node: Any) -> None:
        y, c = self._aff_arg(node)
        self.syms[node.output[0]] = self.scale_shift(y, c, np.zeros(y.shape))

    def op_Div(self, node: Any) -> None:
        b = self.get(node.input[1])
        if not isinstance(b, np.ndarray) or np.any(b == 0):
            raise self.error("Div of a float value by a non-zero constant expected")
        y, c = self._aff_arg(node)
        self.syms[node.output[0]] = self.scale_shift(y, 1.0 / c, np.zeros(y.shape))

    def op_BatchNormalization(self, node: Any) -> None:
        y = self.get(node.input[0])
        if isinstance(y, _Int):
            y = self._diag(y)
        if not isinstance(y, _Aff):
            raise self.error("BatchNormalization of a float value expected")
        gamma, beta, mean, var = (self.const(n) for n in node.input[1:5])
        if any(v is None for v in (gamma, beta, mean, var)):
            raise self.error("BatchNormalization parameters must be constants")
        eps = float(self.attr("epsilon", 1e-5))
        s = gamma / np.sqrt(var + np.float64(np.float32(eps)))  # type: ignore[operator]
        S = self.channel(s, y.shape)
        M = self.channel(mean, y.shape)
        Bt = self.channel(beta, y.shape)
        self.syms[node.output[0]] = self.scale_shift(y, S, Bt - M * S, np.abs(M * S) + 0 * Bt)

    # ------------------------------------------------------------------ QONNX (Brevitas binarized networks)
    def op_Quant(self, node: Any) -> None:
        """QONNX ``Quant`` of the graph input: the input grid ``q in [lo, hi]``, real value ``s q`` (zero point
        0), the quantizer's rounding recorded (``input_rounding``); elsewhere refused (a multi-bit activation in a
        binarized network is the quantized-graph importer's)."""
        from qverify.io.qonnx import _AS_ROUNDING, quant_int_range

        x = self.get(node.input[0])
        if not (isinstance(x, _Int) and x.value == 0 and not self.layers):
            raise self.error("a multi-bit Quant inside a binarized network (BipolarQuant of float values) is not "
                             "supported: only the input's Quant")
        s, z, bits = (self.const(n) for n in node.input[1:4])
        if s is None or z is None or bits is None or s.size != 1 or z.size != 1 or bits.size != 1:
            raise self.error("the input Quant needs constant scalar scale, zero point and bit width")
        s, z, bits = (float(v.reshape(-1)[0]) for v in (s, z, bits))
        if z != 0:
            raise self.error("an input Quant with a non-zero zero point is not supported")
        mode = self.attr("rounding_mode", "ROUND")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode.upper() not in _AS_ROUNDING:
            raise self.error(f"input Quant rounding mode {mode!r} is not supported")
        lo, hi = quant_int_range(int(bits), bool(int(self.attr("signed", 1))), bool(int(self.attr("narrow", 0))))
        self.input_lo, self.input_hi = lo, hi
        self.input_scale = Fraction(float(np.float32(float(s))))
        self.input_rounding = _AS_ROUNDING[mode.upper()]
        self.qonnx = True
        mag = np.full(x.shape, float(max(abs(lo), abs(hi))))
        self.syms[node.output[0]] = _Int(0, x.shape, float(self.input_scale), mag)

    def op_BipolarQuant(self, node: Any) -> None:
        """QONNX ``BipolarQuant(x, scale) = scale * (x >= 0 ? 1 : -1)``: of constant weights, the constant; of a
        float value, the binarizing threshold ``y >= 0`` with its float32 band, outputs ``+-scale``."""
        x = self.get(node.input[0])
        s = self.const(node.input[1])
        if s is None or s.size != 1 or float(s.reshape(-1)[0]) <= 0:
            raise self.error("BipolarQuant needs a constant positive scalar scale")
        scale = float(np.float32(float(s.reshape(-1)[0])))
        self.qonnx = True
        if isinstance(x, np.ndarray):
            self.consts[node.output[0]] = np.where(x >= 0, 1.0, -1.0) * scale
            return
        if isinstance(x, _Int):
            x = self._diag(x)
        if not isinstance(x, _Aff):
            raise self.error("BipolarQuant of a float value expected")
        out = self.threshold(x, strict=False)
        self.syms[node.output[0]] = _Int(out.value, out.shape, scale, out.mag)

    # ------------------------------------------------------------------ Sign and pooling
    def op_Sign(self, node: Any) -> None:
        x = self.get(node.input[0])
        if isinstance(x, _SignOf) and x.plus is not None:
            if not -1 < x.plus < 1 or x.plus == 0:
                raise self.error(f"Sign(Sign(y) + {x.plus}): the constant must lie in (-1, 0) or (0, 1)")
            self.syms[node.output[0]] = self.threshold(x.aff, strict=x.plus < 0)
            return
        if isinstance(x, _SignOf):
            x = self.sign(x)
        if isinstance(x, _Int):
            x = self._diag(x)
        if not isinstance(x, _Aff):
            raise self.error("Sign of a float value expected")
        self.syms[node.output[0]] = _SignOf(x, None, node.name)

    def sign(self, s: _SignOf) -> _Int:
        """ONNX ``Sign`` (``0 -> 0``) of a value with no band; refused where float32 could land on 0 or miss it."""
        if s.plus is not None:
            raise self.error("Sign(y) + c used as a value (only Sign(Sign(y) + c) is a binarizing form)")
        if not s.aff.exact:
            raise self.error(f"ONNX Sign of the float value of node {s.node!r} outputs 0 exactly where float32 "
                             f"lands on 0, which qverify does not bound; Larq's Sign(Sign(y) + c) is imported")
        u, _, _, _ = self.integers(s.aff, per_channel=True)
        return _Int(self.emit(Step(np.array([[0, 1]]), (-1, 0, 1), name=s.node), u), s.aff.shape, 1.0,
                    np.ones(s.aff.shape))

    def threshold(self, y: _Aff, strict: bool) -> _Int:
        """``+1`` where ``y >= 0`` (``y > 0`` if ``strict``), else ``-1``, with the float32 band: a linear layer's
        value is emitted as ``u ~ K y`` and thresholded at 0; a value already emitted (after a pooling) is
        thresholded at its own cut (:meth:`diag_threshold`)."""
        if y.kind == "diag":
            return self.diag_threshold(y, strict)
        u, D, _, _ = self.integers(y, per_channel=True)
        d = np.ceil(D).astype(np.int64)
        v = u
        if np.any(d > 0):
            v = self.emit(Uncertain(self._per_channel(d, y.shape), name=f"{self.node.name}/band"), u)
        cut = 1 if strict else 0
        return _Int(self.emit(Step(np.array([[cut]]), (-1, 1), name=self.node.name), v), y.shape, 1.0,
                    np.ones(y.shape))

    def diag_threshold(self, y: _Aff, strict: bool) -> _Int:
        """``y_c = alpha_c u_c + beta_c`` of an emitted ``u`` (after a pooling): with ``sigma_c = sign(alpha_c)``,
        ``y >= 0`` iff ``sigma_c u_c >= t_c = -beta_c / |alpha_c|`` (exact rationals of the float64 values), and
        any float32 evaluation is within ``D_c = E_c / |alpha_c|`` of it in ``u`` units. Where ``D > 0`` the
        value is scaled first, ``u' = sigma_c K_c u`` (a depthwise op; ``K_c`` a power of two with ``K_c D_c``
        about 4, as far as ``|u'| < 2^50`` allows), so that the integer band ``ceil(K_c D_c)`` is as narrow in
        ``u`` as the float32 error itself; then the cut ``ceil(K_c t_c)`` (strict: ``floor(K_c t_c) + 1``)."""
        shape, C = y.shape, y.shape[0]
        alpha = self._channel_values(y.alpha, shape, "scale")
        beta = self._channel_values(y.beta, shape, "shift")
        E = np.zeros(C) if y.exact else self._per_channel(y.error(), shape)
        if np.any((alpha == 0) & (np.abs(beta) <= E)):
            raise self.error("a zero scale before a Sign whose constant lies within the float32 band")
        sigma = np.where(alpha < 0, -1, 1).astype(np.int64)
        mag = float(y.src.mag.max())
        with np.errstate(divide="ignore"):
            D = np.where(alpha != 0, E / np.where(alpha != 0, np.abs(alpha), 1.0), 0.0) * (1 + F64_SLACK)
        room = max(0, 50 - math.ceil(math.log2(mag + 1)))
        K = np.array([2 ** min(room, max(0, math.ceil(math.log2(4 / dc)))) if dc > 0 else 1 for dc in D],
                     dtype=np.int64)
        src = y.src.value
        if np.any(sigma < 0) or np.any(K > 1):
            w = sigma * K
            if len(shape) == 1:
                op: Any = Dense(np.diag(w), np.zeros(C, np.int64), name=f"{self.node.name}/scale")
            else:
                op = Conv2d(w.reshape(C, 1, 1, 1), np.zeros(C, np.int64), groups=C, name=f"{self.node.name}/scale")
            src = self.emit(op, src)
        cuts = np.zeros(C, dtype=np.int64)
        d = np.zeros(C, dtype=np.int64)
        for c in range(C):
            top = int(K[c]) * int(mag) + 1
            if alpha[c] == 0:  # a constant sign: a cut outside the value's range
                cuts[c] = -top if beta[c] > 0 or (beta[c] == 0 and not strict) else top
                continue
            t = Fraction(-float(beta[c])) / abs(Fraction(float(alpha[c]))) * int(K[c])
            cuts[c] = math.floor(t) + 1 if strict else math.ceil(t)
            if D[c] > 0:
                d[c] = math.ceil(float(K[c]) * float(D[c]) + F64_SLACK * (1 + abs(float(t))))
        v = src
        if np.any(d > 0):
            v = self.emit(Uncertain(d, name=f"{self.node.name}/band"), src)
        return _Int(self.emit(Step(cuts.reshape(C, 1), (-1, 1), name=self.node.name), v), shape, 1.0,
                    np.ones(shape))

    def _per_channel(self, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A per-channel array from one broadcast to ``shape`` (its maximum over each channel)."""
        a = np.asarray(arr).reshape(shape[0], -1) if len(shape) > 1 else np.asarray(arr).reshape(-1)
        return a.max(axis=1) if a.ndim == 2 else a

    def integers(self, y: _Aff, per_channel: bool) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Emit ``u ~ K y`` (module docstring): returns the value index and ``D`` (``|K fl(y) - u| <= D``,
        broadcast to ``y.shape``). ``per_channel``: a power of two ``K > 0`` per channel, else one for all.
        Also returns the powers ``K`` (per channel) and a bound of ``|u|`` (broadcast to ``y.shape``)."""
        shape = y.shape
        C = shape[0]
        x = y.src
        alpha_c = self._channel_values(y.alpha, shape, "scale")
        beta_c = self._channel_values(y.beta, shape, "shift")
        if y.kind == "diag":
            if len(shape) == 1:
                W = np.eye(C)
            else:
                W = np.ones((C, 1, 1, 1))
            b = np.zeros(C)
        else:
            W, b = y.W, y.b
        Wr = W.reshape(C, -1) * alpha_c[:, None] * x.scale
        br = alpha_c * b + beta_c
        K = self._powers(Wr, br, per_channel)
        A = np.round(Wr * K[:, None])
        B = np.round(br * K)
        if np.abs(A).max(initial=0) >= 2**52 or np.abs(B).max(initial=0) >= 2**52:
            raise self.error("scaled weights out of range")
        dA = np.abs(Wr * K[:, None] - A)
        dB = np.abs(br * K - B)
        Wi = A.reshape(W.shape).astype(np.int64)
        Bi = B.astype(np.int64)
        if y.kind == "dense" or (y.kind == "diag" and len(shape) == 1):
            op: Any = Dense(Wi, Bi, name=self.node.name if self.node is not None else "out")
            rho = dA @ x.mag.reshape(-1) + dB
            umag = np.abs(A) @ x.mag.reshape(-1) + np.abs(B)
        else:
            conv = y.conv if y.kind == "conv" else {"stride": (1, 1), "dilation": (1, 1), "padding": (0, 0, 0, 0),
                                                     "groups": C}
            op = Conv2d(Wi, Bi, conv["stride"], conv["padding"], conv["dilation"], 0, name=self.node.name,
                        groups=conv["groups"])
            rho = self._conv_abs(dA.reshape(W.shape), x, conv, shape) + dB.reshape(-1, 1, 1)
            umag = self._conv_abs(np.abs(A).reshape(W.shape), x, conv, shape) + np.abs(B).reshape(-1, 1, 1)
        Kb = K.reshape((-1,) + (1,) * (len(shape) - 1))
        D = Kb * y.error() + rho + F64_SLACK * Kb * y.absm
        if y.exact and np.all(dA == 0) and np.all(dB == 0):
            D = np.zeros(shape)
        u = self.emit(op, x.value)
        return u, np.broadcast_to(D, shape), K, np.broadcast_to(umag, shape)

    def _channel_values(self, a: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        flat = np.asarray(a).reshape(shape[0], -1)
        if not np.all(flat == flat[:, :1]):
            raise self.error(f"a per-element {what} inside a channel is not supported")
        return flat[:, 0]

    def _powers(self, Wr: np.ndarray, br: np.ndarray, per_channel: bool) -> np.ndarray:
        """Per channel the smallest power of two making ``K Wr`` and ``K br`` integers if one ``<= 2^24`` does
        (exact), else ``2^(WEIGHT_BITS - ceil(log2 max |Wr|))``; one common power (the largest) unless
        ``per_channel``."""
        C = Wr.shape[0]
        K = np.ones(C)
        for c in range(C):
            vals = np.concatenate([Wr[c], [br[c]]])
            k = 0
            while k <= 24 and not np.all(vals * 2.0**k == np.round(vals * 2.0**k)):
                k += 1
            if k > 24:
                top = float(np.abs(vals).max())
                k = WEIGHT_BITS - math.ceil(math.log2(top)) if top > 0 else 0
            K[c] = 2.0**k
        if not per_channel:
            K[:] = K.max()
        return K

    def op_MaxPool(self, node: Any) -> None:
        x = self.get(node.input[0])
        if isinstance(x, _SignOf):
            x = self.sign(x)
        kernel = tuple(self.attr("kernel_shape"))
        strides = tuple(self.attr("strides", [1, 1]))
        pads = list(self.attr("pads", [0, 0, 0, 0]))
        if self.attr("ceil_mode", 0) or self.attr("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise self.error("ceil_mode and auto_pad are not supported")
        pool = MaxPool2d(kernel, strides, (pads[0], pads[1], pads[2], pads[3]),
                         tuple(self.attr("dilations", [1, 1])), name=node.name)
        if isinstance(x, _Int):
            v = self.emit(pool, x.value)
            self.syms[node.output[0]] = _Int(v, self.shapes[v], x.scale, np.full(self.shapes[v], x.mag.max()))
            return
        if not isinstance(x, _Aff):
            raise self.error("MaxPool of a float value expected")
        u, D, K, umag = self.integers(x, per_channel=True)
        v = self.emit(pool, u)
        shape = self.shapes[v]
        Kb = K.reshape(-1, 1, 1)
        C = x.shape[0]
        carried = np.broadcast_to((D / Kb).reshape(C, -1).max(axis=1).reshape(-1, 1, 1), shape).copy()
        mag = np.broadcast_to(np.asarray(umag).reshape(C, -1).max(axis=1).reshape(-1, 1, 1), shape).copy()
        src = _Int(v, shape, 1.0, mag)
        one = np.ones(shape)
        exact = bool(np.all(D == 0) and np.all(Kb == 1) and x.exact)
        self.syms[node.output[0]] = _Aff(src, "diag", shape, None, np.zeros(shape), one / Kb, np.zeros(shape),
                                         mag / Kb, carried, 1, 0, {}, exact)

    def op_Flatten(self, node: Any) -> None:
        x = self.get(node.input[0])
        if isinstance(x, _SignOf):
            x = self.sign(x)
        n = int(np.prod(x.shape))
        if isinstance(x, _Int):
            v = self.emit(Flatten(name=node.name), x.value)
            self.syms[node.output[0]] = _Int(v, (n,), x.scale, x.mag.reshape(-1))
            return
        if isinstance(x, _Aff) and x.kind == "diag":
            v = self.emit(Flatten(name=node.name), x.src.value)
            src = _Int(v, (n,), x.src.scale, x.src.mag.reshape(-1))
            flat = {k: getattr(x, k).reshape(-1) for k in ("b", "alpha", "beta", "absm", "err0")}
            self.syms[node.output[0]] = _Aff(src, "diag", (n,), None, flat["b"], flat["alpha"], flat["beta"],
                                             flat["absm"], flat["err0"], x.n, x.k, {}, x.exact)
            return
        raise self.error("Flatten of a convolution's float output before its Sign is not supported")

    def op_Reshape(self, node: Any) -> None:
        target = self.const(node.input[1])
        if target is None or target.size != 2:
            raise self.error("Reshape to [batch, n] expected")
        self.op_Flatten(node)

    # ------------------------------------------------------------------ output
    def finish(self, out: Any) -> None:
        if isinstance(out, _SignOf):
            out = self.sign(out)
        if isinstance(out, _Int):
            if len(out.shape) != 1:
                v = self.emit(Flatten(name="flatten"), out.value)
                out = _Int(v, (int(np.prod(out.shape)),), out.scale, out.mag.reshape(-1))
            self.out_scale = Fraction(out.scale)
            return
        if len(out.shape) != 1:
            raise ModelError(f"{self.path}: the output must be a vector")
        self.node = type("N", (), {"name": "logits", "op_type": "output"})()
        u, D, K, _ = self.integers(out, per_channel=False)
        d = np.ceil(D).astype(np.int64)
        if np.any(d > 0):
            self.emit(Uncertain(d, name="logits/band"), u)
        self.out_scale = Fraction(1) / Fraction(int(K[0]))
        self.node = None


def load_binarized(path: str | Path, model: Any | None = None, input_lo: int = 0, input_hi: int = 255,
                   input_scale: Fraction | float = 1) -> QNetwork:
    """Import a binarized float ONNX model (module docstring) as a set-valued integer network over the input grid
    ``input_scale * {input_lo..input_hi}`` (default: pixels ``0..255`` as floats)."""
    import onnx

    path = Path(path)
    if model is None:
        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise ModelError(f"{path}: not a readable ONNX model ({e})") from None
    return _Importer(path, model, int(input_lo), int(input_hi), Fraction(input_scale)).run()


# ------------------------------------------------------------------------------------------------ runtime
_SESSIONS: dict[tuple[str, float], Any] = {}


def _logits_session(path: str) -> tuple[Any, str]:
    """An onnxruntime session of the model whose output is the final Softmax's input (the logits), cached."""
    import onnx
    import onnxruntime as ort

    key = (path, Path(path).stat().st_mtime)
    if key not in _SESSIONS:
        model = onnx.load(path)
        out = model.graph.output[0].name
        last = [n for n in model.graph.node if out in n.output]
        if last and last[0].op_type == "Softmax":
            out = last[0].input[0]
            model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        _SESSIONS[key] = (ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), out)
    return _SESSIONS[key]


def binarized_logits(net: QNetwork, x: np.ndarray) -> np.ndarray:
    """onnxruntime's float32 logits (the input of a final Softmax) for integer grid inputs ``x [B, n]``, in the
    network's output units (``logit / output_scale``, float64)."""
    meta = net.metadata
    sess, out = _logits_session(meta["onnx_path"])
    xr = np.asarray(x, dtype=np.float64).reshape(len(x), *net.input_shape) * float(net.input_scale)
    if meta.get("input_layout") == "nhwc":
        xr = np.transpose(xr, (0, 2, 3, 1))
    xr = xr.astype(np.float32)
    name = meta["onnx_input"]
    if sess.get_inputs()[0].shape[0] == 1:  # a fixed batch of one
        y = np.concatenate([sess.run([out], {name: xr[i:i + 1]})[0] for i in range(len(xr))])
    else:
        y = sess.run([out], {name: xr})[0]
    return np.asarray(y, dtype=np.float64).reshape(len(x), -1) / float(net.output_scale)


def qonnx_binarized_logits(net: QNetwork, x: np.ndarray) -> np.ndarray:
    """qonnx's executor (``execute_onnx``, float32) on integer grid inputs ``x [B, n]`` (fed as float32 values its
    input ``Quant`` maps back to ``x``): the graph's output (the input of a final Softmax where there is one) in the
    network's output units, float64."""
    from qonnx.core.onnx_exec import execute_onnx

    from qverify.io.qonnx import _wrapper, qonnx_real_inputs

    meta = net.metadata
    p = str(Path(meta["onnx_path"]).resolve())
    model = _wrapper(p, Path(p).stat().st_mtime)
    out = meta["onnx_output"]
    last = [n for n in model.graph.node if out in n.output]
    if last and last[0].op_type == "Softmax":
        out = last[0].input[0]
    mode = {"FLOOR": "FLOOR", "HALF_AWAY": "HALF_UP"}.get(getattr(net.input_rounding, "name", ""), "ROUND")
    xs = np.asarray(x, dtype=np.int64).reshape(len(x), -1)
    feed = qonnx_real_inputs(net, xs, mode).reshape(len(xs), *net.input_shape)
    ys = [np.asarray(execute_onnx(model, {meta["onnx_input"]: feed[i:i + 1]}, return_full_exec_context=True)[out],
                     dtype=np.float64).reshape(-1) for i in range(len(xs))]
    y = np.stack(ys) if ys else np.zeros((0, net.num_outputs))
    return y / float(net.output_scale)


def _register_replay() -> None:
    from qverify.replay import RuntimeReplay, register_runtime

    def applies(net: QNetwork) -> bool:
        return bool(net.metadata.get("onnx_path")) and Path(net.metadata["onnx_path"]).exists()

    register_runtime(FORMAT, RuntimeReplay("onnxruntime (float32)", applies, binarized_logits, lambda net: ""))
    register_runtime(QONNX_FORMAT, RuntimeReplay("qonnx execute_onnx (float32)", applies, qonnx_binarized_logits,
                                                 lambda net: ""))


_register_replay()
