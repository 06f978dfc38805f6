"""Import full-integer int8 TFLite models (``.tflite`` flatbuffers) as exact integer networks.

The file is read with the ``tflite`` package's generated flatbuffer readers (schema
``tensorflow/lite/schema/schema.fbs``); nothing runs TensorFlow. Supported: one subgraph with one int8 input and one
int8 output, and the operators

* ``CONV_2D`` (SAME / VALID, strides, dilation, groups), ``DEPTHWISE_CONV_2D`` (depth multiplier),
  ``FULLY_CONNECTED`` (per-tensor or per-channel int8 weights, optional bias): a linear node (:class:`Conv2d` /
  :class:`Dense`, the input zero point folded into the bias exactly, SAME padding with the input zero point, the
  extra cell bottom/right) and a :class:`Step` that *is* the kernel's requantization: for the convolutions
  ``clamp(MBQM(acc, M_c, shift_c) + z_out, act_min, act_max)`` (:func:`qverify.quant.tflite_requantize`, the
  fixed-point multiplier with its two roundings), for the reference FULLY_CONNECTED ``clamp(round(double(acc) e_c)
  + z_out, ...)`` (:func:`qverify.quant.tflite_fc_reference_requantize`). The cut points ``T_t = min{acc : f_c(acc)
  >= t}`` come from exact bisection over the int32 accumulators on the int64 emulation of the kernel's arithmetic.
  A convolution channel whose ``shift_c > 0`` (real multiplier ``>= 1``) has its weights and bias multiplied by
  ``2^shift_c`` (the C code's own ``acc * 2^shift`` left shift), so every step of ``f`` is one level;
* ``ADD`` of two int8 tensors of one shape: TFLite rescales each input alone (``MBQM((x_i - z_i) 2^20, M_i,
  shift_i)``), adds, and requantizes the sum. The input with the larger scale has ``M = 2^30, shift = 0``: its
  term is the exact ``2^19 (x - z)``. When the other input's term is linear on its 256 values (equal scales,
  power-of-two ratios) the op is one :class:`Add` of integer weights and a :class:`Step`; otherwise that input
  first goes through a :class:`Step` holding its exact rescaled values, then the :class:`Add` and the output
  :class:`Step` (``encodings/tflite_import.md``);
* ``AVERAGE_POOL_2D``: TFLite's ``round_half_away(S / n)`` of the raw window sum ``S`` over ``n`` cells inside the
  image, then the activation's clamp: a :class:`SumPool2d` with per-position weights ``L / n(i, j)`` (``L`` the
  lcm of the counts; none when all are equal) and one :class:`Step` of ``clamp(round_half_away(u / L))``, exact
  because ``u / L = S / n``;
* ``MAX_POOL_2D`` (:class:`MaxPool2d`, padded cells ignored, then the activation's :class:`Clamp`), ``RESHAPE``
  (:class:`Reshape` in TFLite's row-major NHWC order).

Layout: TFLite activations are NHWC with batch 1. The network's input is the model's own ``[H, W, C]``; each value
is held channels-first for the convolutions and pools (a :class:`Transpose` ``(2, 0, 1)`` where a value first
needs it) and back in ``H, W, C`` order (``(1, 2, 0)``) before ``RESHAPE``, ``FULLY_CONNECTED`` or the output, so
the integer function is the model's.

Everything else is a :class:`ModelError` naming the file, the operator index and the operator: float or
hybrid operators, ``QUANTIZE``/``DEQUANTIZE``, 16-bit and uint8 activations, broadcasting ``ADD``, weights with a
non-zero zero point, accumulators that could leave int32 (where TFLite's C arithmetic wraps). The semantics is
TFLite's reference kernels (``OpResolverType.BUILTIN_REF``); :func:`tflite_integer_outputs` runs the original file
on ``ai-edge-litert`` for replay and tests. ``metadata["format"] = "tflite"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

from qverify.network import (
    Add,
    Clamp,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    ModelError,
    QNetwork,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
)
from qverify.quant import (
    monotone_int_thresholds,
    tflite_activation_range,
    tflite_add_params,
    tflite_add_rescale,
    tflite_avgpool_round,
    tflite_conv_multiplier,
    tflite_fc_reference_requantize,
    tflite_quantize_multiplier,
    tflite_requantize,
)

__all__ = ["SUPPORTED_OPS", "load_tflite", "tflite_integer_outputs", "tflite_interpreter"]

#: the builtin operators the importer maps
SUPPORTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "AVERAGE_POOL_2D", "MAX_POOL_2D",
                 "RESHAPE")
_I32 = (-(2**31), 2**31 - 1)
_INT8 = (-128, 127)
_ACTS = {0: "none", 1: "relu", 2: "relu_n1_to_1", 3: "relu6"}


def _enum_names(cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


@dataclass
class _Val:
    """A TFLite tensor as a qverify value: ``pos`` (value index), ``chw`` (4-D tensors held channels-first),
    its quantization and the integer range its values can take."""

    pos: int
    shape: tuple[int, ...]  # TFLite's shape without the batch axis (H, W, C for 4-D)
    chw: bool
    scale: float
    zero_point: int
    lo: int
    hi: int


class _Importer:
    def __init__(self, path: Path, buf: bytes) -> None:
        import tflite

        self.tfl = tflite
        self.path = path
        self.buf = buf
        try:
            self.model = tflite.Model.GetRootAs(buf, 0)
            n_sub = self.model.SubgraphsLength()
        except Exception as e:  # a corrupt flatbuffer raises anything
            raise ModelError(f"{path}: not a readable TFLite flatbuffer ({e})") from None
        if n_sub != 1:
            raise ModelError(f"{path}: {n_sub} subgraphs; only single-subgraph models are supported")
        self.sg = self.model.Subgraphs(0)
        self.op_names = _enum_names(tflite.BuiltinOperator)
        self.type_names = _enum_names(tflite.TensorType)
        self.layers: list[Any] = []
        self.inputs: list[tuple[int, ...]] = []
        self.vals: dict[int, _Val] = {}
        self.moved: dict[tuple[int, bool], int] = {}
        self.notes: list[str] = []
        self.where = str(path)

    # ------------------------------------------------------------------ helpers
    def error(self, msg: str) -> ModelError:
        return ModelError(f"{self.where}: {msg}")

    def tensor(self, i: int) -> Any:
        return self.sg.Tensors(int(i))

    def tname(self, i: int) -> str:
        n = self.tensor(i).Name()
        return n.decode() if isinstance(n, bytes) else str(n)

    def ttype(self, i: int) -> str:
        return self.type_names.get(self.tensor(i).Type(), str(self.tensor(i).Type()))

    def tshape(self, i: int) -> tuple[int, ...]:
        t = self.tensor(i)
        return tuple(int(v) for v in t.ShapeAsNumpy()) if t.ShapeLength() else ()

    def quant(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(scales float32 [k], zero points int64 [k], quantized_dimension)``; empty arrays when unquantized."""
        q = self.tensor(i).Quantization()
        if q is None or q.ScaleLength() == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64), 0
        sc = np.asarray(q.ScaleAsNumpy(), dtype=np.float32)
        zp = np.asarray(q.ZeroPointAsNumpy(), dtype=np.int64) if q.ZeroPointLength() else np.zeros(len(sc), np.int64)
        return sc, zp, int(q.QuantizedDimension())

    def const(self, i: int) -> np.ndarray | None:
        """The constant data of tensor ``i`` (shaped, its element type), or ``None`` for an activation."""
        t = self.tensor(i)
        b = self.model.Buffers(t.Buffer())
        raw: bytes | None = None
        if b is not None and b.DataLength() > 0:
            raw = b.DataAsNumpy().tobytes()
        elif b is not None and b.Offset() > 1:
            raw = self.buf[b.Offset():b.Offset() + b.Size()]
        if raw is None:
            return None
        dt = {"INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FLOAT32": np.float32,
              "INT16": np.int16}.get(self.ttype(i))
        if dt is None:
            raise self.error(f"constant tensor {self.tname(i)!r} of type {self.ttype(i)} is not supported")
        return np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<")).astype(dt).reshape(self.tshape(i))

    def append(self, layer: Any, ins: tuple[int, ...]) -> int:
        self.layers.append(layer)
        self.inputs.append(tuple(ins))
        return len(self.layers)

    def as_chw(self, v: _Val, name: str) -> int:
        """The value position of ``v`` channels-first ``[C, H, W]`` (a Transpose (2, 0, 1) the first time)."""
        if len(v.shape) != 3:
            raise self.error(f"expects a 4-D NHWC input, got shape (1, {', '.join(map(str, v.shape))})")
        if v.chw:
            return v.pos
        key = (v.pos, True)
        if key not in self.moved:
            self.moved[key] = self.append(Transpose((2, 0, 1), name=f"{name}/to_chw"), (v.pos,))
        return self.moved[key]

    def as_native(self, v: _Val, name: str) -> int:
        """The value position of ``v`` in TFLite's own (row-major NHWC) order."""
        if not v.chw:
            return v.pos
        key = (v.pos, False)
        if key not in self.moved:
            self.moved[key] = self.append(Transpose((1, 2, 0), name=f"{name}/to_hwc"), (v.pos,))
        return self.moved[key]

    def act_input(self, op_inputs: np.ndarray, k: int, what: str) -> _Val:
        if k >= len(op_inputs) or op_inputs[k] < 0:
            raise self.error(f"missing input {k} ({what})")
        t = int(op_inputs[k])
        if t not in self.vals:
            if self.const(t) is not None:
                raise self.error(f"input {k} ({what}) {self.tname(t)!r} is a constant tensor; only activations are "
                                 f"supported there")
            raise self.error(f"input {k} ({what}) {self.tname(t)!r} is not produced by an earlier operator")
        return self.vals[t]

    def out_quant(self, t: int) -> tuple[float, int, int, int]:
        """``(scale, zero_point, qmin, qmax)`` of an int8 output tensor."""
        self.check_int8(t, "output")
        sc, zp, _ = self.quant(t)
        if len(sc) != 1:
            raise self.error(f"output {self.tname(t)!r} must have one scale, got {len(sc)}")
        return float(sc[0]), int(zp[0]), *_INT8

    def check_int8(self, t: int, what: str) -> None:
        ty = self.ttype(t)
        if ty != "INT8":
            raise self.error(f"{what} tensor {self.tname(t)!r} is {ty}; only int8 activations are supported "
                             f"(full-integer int8 models)")
        if len(self.quant(t)[0]) == 0:
            raise self.error(f"{what} tensor {self.tname(t)!r} has no quantization parameters")

    def options(self, op: Any, kind: str) -> Any:
        table = op.BuiltinOptions()
        if table is None:
            return None
        cls = getattr(self.tfl, kind)
        opt = cls()
        opt.Init(table.Bytes, table.Pos)
        return opt

    def activation(self, opt: Any) -> str:
        a = int(opt.FusedActivationFunction()) if opt is not None else 0
        if a not in _ACTS:
            names = _enum_names(self.tfl.ActivationFunctionType)
            raise self.error(f"fused activation {names.get(a, a)} is not supported (NONE, RELU, RELU6, "
                             f"RELU_N1_TO_1)")
        return _ACTS[a]

    def set_out(self, t: int, pos: int, shape: tuple[int, ...], chw: bool, lo: int, hi: int) -> None:
        sc, zp, _ = self.quant(t)
        self.vals[t] = _Val(pos, shape, chw, float(sc[0]) if len(sc) else 1.0, int(zp[0]) if len(zp) else 0, lo, hi)

    @staticmethod
    def same_pads(n: int, k: int, s: int, d: int, padding: int) -> tuple[int, int, int]:
        """TFLite's ``ComputePaddingHeightWidth`` (``kernels/padding.h``) along one axis: ``(out, before,
        after)``; SAME: ``out = ceil(n / s)``, total ``max((out - 1) s + (k - 1) d + 1 - n, 0)``, ``before =
        total // 2`` (the odd cell goes after); VALID: ``out = ceil((n - (k - 1) d) / s)``, no padding."""
        ek = (k - 1) * d + 1
        if padding == 0:  # SAME
            out = -(-n // s)
            total = max((out - 1) * s + ek - n, 0)
            return out, total // 2, total - total // 2
        out = -(-(n - ek + 1) // s)
        if out < 1:
            raise ValueError(f"kernel {k} (dilation {d}) larger than the input {n}")
        return out, 0, 0

    # ------------------------------------------------------------------ steps
    def step(self, f: Any, rows: int, lo: int, hi: int, name: str, domain: tuple[int, int] = _I32) -> Step | Clamp:
        """The exact :class:`Step` of the non-decreasing functions ``f(acc, r)`` (row ``r``; int64 arrays in and
        out, values in ``[lo, hi]``) over the accumulators of ``domain`` (TFLite's int32): per row ``T_t = min{a :
        f(a) >= t}``, ``t = lo + 1 .. hi``. Levels a row never reaches inside the domain get cut points past it
        (strictly increasing; no accumulator gets there)."""
        ts = np.arange(lo + 1, hi + 1, dtype=np.int64)
        if ts.size == 0:
            return Clamp(lo, hi, name=name)
        dlo, dhi = domain
        cuts = np.empty((rows, ts.size), dtype=np.int64)
        for r in range(rows):
            cuts[r] = monotone_int_thresholds(lambda a, r=r: f(a, r), ts, dlo, dhi)
        for r in range(rows):
            top = cuts[r] > dhi
            cuts[r, top] = dhi + 1 + np.arange(int(top.sum()))
            low = cuts[r] <= dlo
            if low.sum() > 1:
                k = int(low.sum())
                cuts[r, :k] = dlo - (k - 1) + np.arange(k)
        levels = tuple(range(lo, hi + 1))
        if rows > 1 and np.all(cuts == cuts[:1]):
            cuts = cuts[:1]
        if ts.size > 1 and np.any(np.diff(cuts, axis=1) <= 0):
            if cuts.shape[0] > 1:
                raise self.error("a per-channel requantization with a multiplier >= 1 skips output levels at "
                                 "different accumulators per channel (one shared list of levels cannot hold it); "
                                 "not supported")
            # one row: a jump over several levels at one accumulator keeps only the highest level reached there
            row = cuts[0]
            keep = np.append(np.diff(row) > 0, True)
            levels = (lo, *(int(t) for t in ts[keep]))
            cuts = row[keep][None, :]
        return Step(cuts, levels, name=name)

    def requant_step(self, mult: list[tuple[int, int]], z: int, lo: int, hi: int, name: str) -> Step | Clamp:
        """:meth:`step` of ``clamp(MBQM(acc, M_c, min(shift_c, 0)) + z, lo, hi)`` per channel (positive shifts
        have been moved into the weights)."""
        m = np.array([mm for mm, _ in mult], dtype=np.int64)
        e = np.array([min(s, 0) for _, s in mult], dtype=np.int64)
        if len(set(zip(m.tolist(), e.tolist(), strict=True))) == 1:
            m, e = m[:1], e[:1]
        return self.step(lambda a, r: tflite_requantize(a, m[r], e[r], z, lo, hi), len(m), lo, hi, name)

    def check_i32(self, bound: int, what: str) -> None:
        if bound > _I32[1]:
            raise self.error(f"{what} may reach {bound} in magnitude, beyond TFLite's int32 arithmetic (where the "
                             f"C code wraps); not supported")

    # ------------------------------------------------------------------ ops
    def linear_weights(self, op_inputs: np.ndarray, x: _Val, channel_axis: int, n_out: int, s_out: float
                       ) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """The int8 weights (raw, TFLite's layout), the int32 bias (zeros when absent) and the per-output-channel
        real multiplier ``double(s_x) double(s_w) / double(s_out)`` (:func:`tflite_conv_multiplier`)."""
        wt = int(op_inputs[1])
        w = self.const(wt)
        if w is None:
            raise self.error(f"weights {self.tname(wt)!r} are not a constant tensor")
        if self.ttype(wt) != "INT8":
            raise self.error(f"weights {self.tname(wt)!r} are {self.ttype(wt)}; only int8 weights are supported")
        ws, wz, qdim = self.quant(wt)
        if len(ws) == 0:
            raise self.error(f"weights {self.tname(wt)!r} have no quantization parameters (hybrid model?)")
        if np.any(wz != 0):
            raise self.error(f"weights {self.tname(wt)!r} have a non-zero zero point {wz.tolist()} (TFLite's int8 "
                             f"kernels assume symmetric weights)")
        if len(ws) > 1 and (qdim != channel_axis or len(ws) != n_out):
            raise self.error(f"weights {self.tname(wt)!r}: {len(ws)} scales on axis {qdim}; expected one or "
                             f"{n_out} on axis {channel_axis}")
        b = np.zeros(n_out, dtype=np.int64)
        if len(op_inputs) > 2 and op_inputs[2] >= 0:
            bt = int(op_inputs[2])
            bv = self.const(bt)
            if bv is None or self.ttype(bt) != "INT32":
                raise self.error(f"bias {self.tname(bt)!r} must be a constant int32 tensor, got {self.ttype(bt)}")
            b = bv.astype(np.int64).reshape(-1)
            if b.size != n_out:
                raise self.error(f"bias {self.tname(bt)!r} has {b.size} values for {n_out} output channels")
        scales = [float(s) for s in (ws if len(ws) > 1 else np.repeat(ws, n_out))]
        return w.astype(np.int64), b, [tflite_conv_multiplier(x.scale, s, s_out) for s in scales]

    def scaled(self, w: np.ndarray, b: np.ndarray, mult: list[tuple[int, int]], x: _Val, what: str
               ) -> tuple[np.ndarray, np.ndarray]:
        """Check TFLite's int32 accumulator ``sum w (x - z) + b`` and its ``acc 2^shift`` (``shift > 0``) stay in
        int32 over the input's range, and move ``2^shift`` into the weights (``w``: ``[O, ...]``)."""
        amax = max(abs(x.lo - x.zero_point), abs(x.hi - x.zero_point))
        w_abs = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
        for c, (_, s) in enumerate(mult):
            acc = int(w_abs[c]) * amax + abs(int(b[c]))
            self.check_i32(acc, f"the accumulator of {what} channel {c}")
            if s > 0:
                self.check_i32(acc << s, f"the accumulator of {what} channel {c} times 2^{s} (its multiplier "
                                         f">= 1)")
        k = np.array([1 << max(s, 0) for _, s in mult], dtype=np.int64)
        return w * k.reshape(-1, *([1] * (w.ndim - 1))), b * k

    def unary(self, op: Any) -> tuple[np.ndarray, Any, int]:
        """An operator's input tensor indices, its int8 activation input 0 and its output tensor index."""
        ins = op.InputsAsNumpy()
        x = self.act_input(ins, 0, "input")
        self.check_int8(int(ins[0]), "input")
        return ins, x, int(op.OutputsAsNumpy()[0])

    def op_conv(self, op: Any, name: str, depthwise: bool) -> None:
        ins, x, yt = self.unary(op)
        s_out, z_out, qmin, qmax = self.out_quant(yt)
        opt = self.options(op, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
        if opt is None:
            raise self.error("no convolution options")
        act = self.activation(opt)
        h, w_in, c = x.shape
        wshape = self.tshape(int(ins[1]))
        if len(wshape) != 4:
            raise self.error(f"weights of shape {wshape}; expected 4-D")
        if depthwise:
            _, kh, kw, oc = wshape
            dm = int(opt.DepthMultiplier()) or 1
            if oc != c * dm:
                raise self.error(f"depthwise weights with {oc} channels for {c} input channels x depth multiplier "
                                 f"{dm}")
            w, b, eff = self.linear_weights(ins, x, 3, oc, s_out)
            w = w.transpose(3, 0, 1, 2)  # [1, kh, kw, OC] -> [OC, 1, kh, kw]: group g = oc // dm reads channel g
            groups = c
        else:
            oc, kh, kw, cin = wshape
            if cin < 1 or c % cin:
                raise self.error(f"weights with {cin} input channels for an input of {c} channels")
            w, b, eff = self.linear_weights(ins, x, 0, oc, s_out)
            w = w.transpose(0, 3, 1, 2)  # OHWI -> OIHW
            groups = c // cin
            if oc % groups:
                raise self.error(f"{oc} filters do not divide into {groups} groups")
        stride = (int(opt.StrideH()), int(opt.StrideW()))
        dil = (int(opt.DilationHFactor()) or 1, int(opt.DilationWFactor()) or 1)
        try:
            oh, pt, pb = self.same_pads(h, kh, stride[0], dil[0], int(opt.Padding()))
            ow, pl, pr = self.same_pads(w_in, kw, stride[1], dil[1], int(opt.Padding()))
        except ValueError as e:
            raise self.error(str(e)) from None
        if self.tshape(yt)[1:] != (oh, ow, oc):
            raise self.error(f"output shape {self.tshape(yt)} differs from the computed (1, {oh}, {ow}, {oc})")
        mult = [tflite_quantize_multiplier(e) for e in eff]
        w, b = self.scaled(w, b, mult, x, name)
        # sum w (x - z) over the window, padded cells holding z: conv of x padded with z, bias b - z sum w
        bias = b - x.zero_point * w.reshape(w.shape[0], -1).sum(axis=1)
        src = self.as_chw(x, name)
        pos = self.append(Conv2d(w, bias, stride, (pt, pl, pb, pr), dil, x.zero_point, name=name, groups=groups),
                          (src,))
        lo, hi = tflite_activation_range(act, s_out, z_out, qmin, qmax)
        pos = self.append(self.requant_step(mult, z_out, lo, hi, f"{name}/requant"), (pos,))
        self.set_out(yt, pos, (oh, ow, oc), True, lo, hi)

    def op_fully_connected(self, op: Any, name: str) -> None:
        ins, x, yt = self.unary(op)
        s_out, z_out, qmin, qmax = self.out_quant(yt)
        opt = self.options(op, "FullyConnectedOptions")
        act = self.activation(opt)
        if opt is not None and int(opt.WeightsFormat()) != 0:
            raise self.error("shuffled weights format is not supported")
        wshape = self.tshape(int(ins[1]))
        if len(wshape) != 2:
            raise self.error(f"weights of shape {wshape}; expected [units, depth]")
        units, depth = wshape
        n_in = int(np.prod(x.shape))
        if n_in != depth:
            raise self.error(f"input of {n_in} values for weights of depth {depth} (a batch of several rows is not "
                             f"supported)")
        w, b, eff = self.linear_weights(ins, x, 0, units, s_out)
        w, b = self.scaled(w, b, [(0, 0)] * units, x, name)
        src = self.as_native(x, name)
        if len(x.shape) != 1:
            src = self.append(Flatten(name=f"{name}/flatten"), (src,))
        pos = self.append(Dense(w, b - x.zero_point * w.sum(axis=1), name=name), (src,))
        lo, hi = tflite_activation_range(act, s_out, z_out, qmin, qmax)
        e = np.asarray(eff, dtype=np.float64)
        if len(set(eff)) == 1:
            e = e[:1]
        pos = self.append(self.step(lambda a, r: tflite_fc_reference_requantize(a, e[r], z_out, lo, hi), len(e), lo,
                                    hi, f"{name}/requant"), (pos,))
        out_shape = self.tshape(yt)
        if int(np.prod(out_shape)) != units:
            raise self.error(f"output shape {out_shape} does not hold {units} units")
        self.set_out(yt, pos, (units,), False, lo, hi)

    def pool_geometry(self, x: _Val, opt: Any) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int],
                                                         tuple[int, int]]:
        kh, kw = int(opt.FilterHeight()), int(opt.FilterWidth())
        stride = (int(opt.StrideH()), int(opt.StrideW()))
        h, w, _ = x.shape
        try:
            oh, pt, pb = self.same_pads(h, kh, stride[0], 1, int(opt.Padding()))
            ow, pl, pr = self.same_pads(w, kw, stride[1], 1, int(opt.Padding()))
        except ValueError as e:
            raise self.error(str(e)) from None
        return (kh, kw), stride, (pt, pl, pb, pr), (oh, ow)

    def op_max_pool(self, op: Any, name: str) -> None:
        ins, x, yt = self.unary(op)
        s_out, z_out, qmin, qmax = self.out_quant(yt)
        opt = self.options(op, "Pool2DOptions")
        act = self.activation(opt)
        kernel, stride, pads, (oh, ow) = self.pool_geometry(x, opt)
        if (s_out, z_out) != (x.scale, x.zero_point):
            self.notes.append(f"{name}: output quantization ({s_out}, {z_out}) differs from the input's "
                              f"({x.scale}, {x.zero_point}); TFLite's int8 max pool moves the integers unchanged")
        pos = self.append(MaxPool2d(kernel, stride, pads, name=name), (self.as_chw(x, name),))
        a_lo, a_hi = tflite_activation_range(act, s_out, z_out, qmin, qmax)
        if a_lo > x.lo or a_hi < x.hi:  # y = clamp(max x, a_lo, a_hi)
            pos = self.append(Clamp(a_lo, a_hi, name=f"{name}/act"), (pos,))
        lo, hi = (min(max(v, a_lo), a_hi) for v in (x.lo, x.hi))
        self.set_out(yt, pos, (oh, ow, x.shape[2]), True, lo, hi)

    def op_average_pool(self, op: Any, name: str) -> None:
        ins, x, yt = self.unary(op)
        s_out, z_out, qmin, qmax = self.out_quant(yt)
        opt = self.options(op, "Pool2DOptions")
        act = self.activation(opt)
        (kh, kw), stride, pads, (oh, ow) = self.pool_geometry(x, opt)
        h, w, c = x.shape
        if (s_out, z_out) != (x.scale, x.zero_point):
            self.notes.append(f"{name}: output quantization ({s_out}, {z_out}) differs from the input's "
                              f"({x.scale}, {x.zero_point}); TFLite's int8 average pool does not rescale")
        # cells of each window inside the image
        rows = np.array([min(i * stride[0] - pads[0] + kh, h) - max(i * stride[0] - pads[0], 0) for i in range(oh)])
        cols = np.array([min(j * stride[1] - pads[1] + kw, w) - max(j * stride[1] - pads[1], 0) for j in range(ow)])
        counts = rows[:, None] * cols[None, :]
        if counts.min() < 1:
            raise self.error("a pooling window holds no cell of the image")
        big = reduce(math.lcm, (int(v) for v in np.unique(counts)), 1)
        weight = None if counts.min() == counts.max() else (big // counts).astype(np.int64)
        self.check_i32(kh * kw * 128 * big, f"{name}: the weighted window sum")
        pos = self.append(SumPool2d((kh, kw), stride, pads, 0, weight, name=name), (self.as_chw(x, name),))
        lo, hi = tflite_activation_range(act, s_out, z_out, qmin, qmax)
        self.notes.append(f"{name}: average = round_half_away(S / n) of the raw window sum, as the sum weighted by "
                          f"{big} / n over {big}" if weight is not None else
                          f"{name}: average = round_half_away(S / {big}) of the raw window sum")
        pos = self.append(self.step(lambda a, r: np.clip(tflite_avgpool_round(a, big), lo, hi), 1, lo, hi,
                                    f"{name}/average"), (pos,))
        self.set_out(yt, pos, (oh, ow, c), True, lo, hi)

    def op_add(self, op: Any, name: str) -> None:
        ins, outs = op.InputsAsNumpy(), op.OutputsAsNumpy()
        a = self.act_input(ins, 0, "input 1")
        b = self.act_input(ins, 1, "input 2")
        self.check_int8(int(ins[0]), "input 1")
        self.check_int8(int(ins[1]), "input 2")
        yt = int(outs[0])
        s_out, z_out, qmin, qmax = self.out_quant(yt)
        act = self.activation(self.options(op, "AddOptions"))
        if a.shape != b.shape:
            raise self.error(f"broadcasting ADD of shapes {a.shape} and {b.shape} is not supported")
        (m1, e1), (m2, e2), (mo, eo) = tflite_add_params(a.scale, b.scale, s_out)
        chw = a.chw and b.chw
        pa = self.as_chw(a, name) if chw else self.as_native(a, name)
        pb = self.as_chw(b, name) if chw else self.as_native(b, name)
        # each input's exact term g_i(v) = MBQM(v 2^20, M_i, shift_i) over its values v = x - z
        terms = []
        for v, (m, e), p in ((a, (m1, e1), pa), (b, (m2, e2), pb)):
            xs = np.arange(v.lo, v.hi + 1, dtype=np.int64)
            g = tflite_add_rescale(xs - v.zero_point, m, e)
            d = xs - v.zero_point
            k = None
            nz = d != 0
            if nz.any():
                k0 = int(g[nz][0]) // int(d[nz][0])
                if np.array_equal(g, k0 * d):
                    k = k0
            elif np.all(g == 0):
                k = 0
            terms.append((v, xs, g, k, p))
        self.check_i32(sum(int(np.abs(t[2]).max()) for t in terms), f"{name}: the rescaled sum")
        if all(t[3] is not None for t in terms):
            ks = [int(t[3]) for t in terms]
            bias = -sum(k * t[0].zero_point for k, t in zip(ks, terms, strict=True))
            gcd = math.gcd(*ks, bias) or 1
            gcd = 1 << ((gcd & -gcd).bit_length() - 1)  # its power-of-two part
            srcs = (pa, pb)
        else:
            # the non-linear term becomes a Step of its own input: levels = its exact rescaled values
            ks, srcs_l, bias = [], [], 0
            for v, xs, g, k, p in terms:
                if k is not None:
                    ks.append(k)
                    bias -= k * v.zero_point
                    srcs_l.append(p)
                    continue
                change = np.nonzero(np.diff(g))[0] + 1
                if change.size == 0:
                    cuts, levels = np.array([[v.hi + 1]]), (int(g[0]), int(g[0]))
                else:
                    cuts, levels = xs[change][None, :], (int(g[0]), *(int(t) for t in g[change]))
                ks.append(1)
                srcs_l.append(self.append(Step(cuts, levels, name=f"{name}/rescale{len(ks)}"), (p,)))
            srcs, gcd = tuple(srcs_l), 1
            self.notes.append(f"{name}: TFLite rescales the input of the smaller scale alone (MBQM((x - z) 2^20)); "
                              f"held exactly as a step function of that input before the Add")
        lo, hi = tflite_activation_range(act, s_out, z_out, qmin, qmax)
        # y = F(u) of TFLite's raw sum u = gcd * (the Add's output); TFLite's u is int32
        st = self.step(lambda v, r: tflite_requantize(v * gcd, mo, eo, z_out, lo, hi), 1, lo, hi, f"{name}/requant",
                       (_I32[0] // gcd, _I32[1] // gcd))
        pos = self.append(Add(tuple(k // gcd for k in ks), bias // gcd, name=name), srcs)
        pos = self.append(st, (pos,))
        self.set_out(yt, pos, a.shape, chw, lo, hi)

    def op_reshape(self, op: Any, name: str) -> None:
        ins, x, yt = self.unary(op)
        self.check_int8(yt, "output")
        shape = self.tshape(yt)
        if len(shape) >= 2:
            if shape[0] != 1:
                raise self.error(f"output shape {shape}: only batch 1 is supported")
            shape = shape[1:]
        if int(np.prod(shape)) != int(np.prod(x.shape)):
            raise self.error(f"cannot reshape {x.shape} to {shape}")
        sc, zp, _ = self.quant(yt)
        if (float(sc[0]), int(zp[0])) != (x.scale, x.zero_point):
            self.notes.append(f"{name}: output quantization differs from the input's; RESHAPE copies the integers")
        src = self.as_native(x, name)
        pos = src if tuple(shape) == x.shape else self.append(Reshape(tuple(shape), name=name), (src,))
        self.set_out(yt, pos, tuple(shape), False, x.lo, x.hi)

    # ------------------------------------------------------------------ driver
    def run(self) -> QNetwork:
        sg = self.sg
        if sg.InputsLength() != 1 or sg.OutputsLength() != 1:
            raise self.error(f"{sg.InputsLength()} inputs and {sg.OutputsLength()} outputs; exactly one of each is "
                             f"supported")
        ti, to = int(sg.Inputs(0)), int(sg.Outputs(0))
        if self.ttype(ti) == "UINT8":
            raise self.error(f"the input {self.tname(ti)!r} is UINT8: legacy uint8 models are not supported (their "
                             f"kernels take another requantization path); only full-integer int8 models")
        if self.ttype(ti) != "INT8":
            raise self.error(f"the input {self.tname(ti)!r} is {self.ttype(ti)}: not a full-integer int8 model "
                             f"(convert with inference_input_type int8, or drop the QUANTIZE/DEQUANTIZE ops)")
        self.check_int8(ti, "input")
        in_shape = self.tshape(ti)
        if len(in_shape) < 2 or in_shape[0] != 1:
            raise self.error(f"input shape {in_shape}: only batch 1 ([1, ...]) is supported")
        s_in, z_in, _ = self.quant(ti)
        if len(s_in) != 1:
            raise self.error("the input must have one scale")
        self.vals[ti] = _Val(0, in_shape[1:], False, float(s_in[0]), int(z_in[0]), *_INT8)
        handlers = {"CONV_2D": lambda op, n: self.op_conv(op, n, False),
                    "DEPTHWISE_CONV_2D": lambda op, n: self.op_conv(op, n, True),
                    "FULLY_CONNECTED": self.op_fully_connected, "ADD": self.op_add,
                    "AVERAGE_POOL_2D": self.op_average_pool, "MAX_POOL_2D": self.op_max_pool,
                    "RESHAPE": self.op_reshape}
        for k in range(sg.OperatorsLength()):
            op = sg.Operators(k)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            num = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
            opname = self.op_names.get(num, f"builtin {num}")
            if num == self.tfl.BuiltinOperator.CUSTOM:
                cc = code.CustomCode()
                opname = f"CUSTOM {cc.decode() if isinstance(cc, bytes) else cc!r}"
            outs = op.OutputsAsNumpy() if op.OutputsLength() else []
            tag = self.tname(int(outs[0])) if len(outs) else ""
            self.where = f"{self.path}: operator {k} ({opname}{', ' + repr(tag) if tag else ''})"
            if opname not in handlers:
                raise self.error(f"operator {opname} is not supported (supported: {', '.join(SUPPORTED_OPS)})")
            if len(outs) != 1:
                raise self.error(f"{len(outs)} outputs; one expected")
            handlers[opname](op, f"op{k}_{opname.lower()}")
        self.where = str(self.path)
        if to not in self.vals:
            raise self.error(f"the output {self.tname(to)!r} is not produced by a supported operator")
        out = self.vals[to]
        s_out, z_out, _ = self.quant(to)
        pos = self.as_native(out, "output")
        if len(out.shape) != 1:
            pos = self.append(Flatten(name="output/flatten"), (pos,))
        if pos != len(self.layers):  # the output must be the last value
            pos = self.append(Flatten(name="output/flatten"), (pos,))
        if not self.layers:
            raise self.error("the model has no operators")
        meta = {"format": "tflite", "source path": str(self.path.resolve()), "tflite_path": str(self.path.resolve()),
                "tflite_input": self.tname(ti), "tflite_output": self.tname(to), "semantics": "tflite-reference",
                "notes": "; ".join(self.notes)}
        desc = self.model.Description()
        if desc:
            meta["tflite_description"] = desc.decode() if isinstance(desc, bytes) else str(desc)
        try:
            return QNetwork(in_shape[1:], *_INT8, tuple(self.layers), input_scale=Fraction(float(s_in[0])),
                            input_zero_point=int(z_in[0]), output_scale=Fraction(float(s_out[0])),
                            output_zero_point=int(z_out[0]), input_rounding=None, name=self.path.stem,
                            metadata=meta, inputs=tuple(self.inputs))
        except ModelError as e:
            raise ModelError(f"{self.path}: {e}") from None


def load_tflite(path: str | Path) -> QNetwork:
    """Import a full-integer int8 ``.tflite`` model as an exact integer :class:`QNetwork` (see the module
    docstring for the mapping; ``encodings/tflite_import.md`` for the arithmetic). Unsupported content is a
    :class:`ModelError` naming the file, the operator index and the operator."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    buf = path.read_bytes()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ModelError(f"{path}: not a TFLite flatbuffer (no 'TFL3' file identifier)")
    return _Importer(path, buf).run()


# ====================================================================================================== runtime
def tflite_interpreter(path: str | Path, resolver: str = "reference") -> Any:
    """An ``ai-edge-litert`` interpreter of the file: ``resolver`` ``reference`` (TFLite's reference kernels,
    ``BUILTIN_REF``: the semantics qverify imports), ``builtin`` (the optimized builtin kernels, no delegate) or
    ``auto`` (the default, with the XNNPACK delegate)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kinds = {"reference": OpResolverType.BUILTIN_REF, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
             "auto": OpResolverType.AUTO}
    it = Interpreter(model_path=str(path), experimental_op_resolver_type=kinds[resolver])
    it.allocate_tensors()
    return it


def tflite_integer_outputs(net_or_path: QNetwork | str | Path, x: np.ndarray, resolver: str = "reference"
                           ) -> np.ndarray:
    """Run the original ``.tflite`` file on ``ai-edge-litert`` for integer inputs ``x`` (``[B, ...]``, the
    network's input grid, the model's own ``[H, W, C]`` order); returns the int8 outputs ``[B, n]`` as int64."""
    path = net_or_path.metadata["tflite_path"] if isinstance(net_or_path, QNetwork) else net_or_path
    it = tflite_interpreter(path, resolver)
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    shape = tuple(int(s) for s in inp["shape"][1:])
    x = np.asarray(x).reshape(-1, *shape)
    res = []
    for row in x:
        it.set_tensor(inp["index"], row.astype(inp["dtype"])[None])
        it.invoke()
        res.append(np.asarray(it.get_tensor(out["index"])).reshape(-1).astype(np.int64))
    return np.stack(res) if res else np.zeros((0, 0), dtype=np.int64)


def _register_replay() -> None:
    from qverify.replay import RuntimeReplay, register_runtime

    register_runtime("tflite", RuntimeReplay(
        "ai-edge-litert (reference kernels)",
        lambda net: bool(net.metadata.get("tflite_path")) and Path(net.metadata["tflite_path"]).exists(),
        lambda net, x: tflite_integer_outputs(net, x, "reference"), lambda net: ""))


_register_replay()
