"""Flatbuffers builders of small full-integer int8 TFLite models, for the importer's tests.

There is no TensorFlow here: :class:`TFLiteBuilder` writes the ``.tflite`` flatbuffer directly with the ``tflite``
package's generated builders (schema ``tensorflow/lite/schema/schema.fbs``: buffers, tensors with int8 quantization
``scale``/``zero_point`` per tensor or per channel on ``quantized_dimension``, operators with builtin options,
operator codes, one subgraph). Weights are given as integers (int8 weights, int32 biases in units
``s_in s_w``), so a test chooses the integer model and both qverify and ai-edge-litert run it.

Every op method takes the input tensor's index and returns the output tensor's index; the output shape follows
TFLite's rules (``SAME``: ``ceil(in / stride)``, ``VALID``: ``ceil((in - k + 1) / stride)``), activations NHWC with
batch 1. ``finish()`` returns the model's bytes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers
import numpy as np
import tflite

ACT = {"none": tflite.ActivationFunctionType.NONE, "relu": tflite.ActivationFunctionType.RELU,
       "relu6": tflite.ActivationFunctionType.RELU6, "relu_n1_to_1": tflite.ActivationFunctionType.RELU_N1_TO_1,
       "tanh": tflite.ActivationFunctionType.TANH}
PAD = {"same": tflite.Padding.SAME, "valid": tflite.Padding.VALID}
_TYPES = {"int8": tflite.TensorType.INT8, "int32": tflite.TensorType.INT32, "uint8": tflite.TensorType.UINT8,
          "float32": tflite.TensorType.FLOAT32}
_NP = {"int8": np.int8, "int32": np.int32, "uint8": np.uint8, "float32": np.float32}
#: operator versions that accept int8 (the op resolver registers ranges of versions)
_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "AVERAGE_POOL_2D": 2,
             "MAX_POOL_2D": 2, "RESHAPE": 1, "TANH": 2, "LOGISTIC": 2, "SUB": 2, "MUL": 2}


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: list[float] | None = None
    zero_point: list[int] | None = None
    quantized_dimension: int = 0
    data: np.ndarray | None = None


@dataclass
class _Op:
    op: str
    inputs: list[int]
    outputs: list[int]
    options: tuple[str, dict] | None = None


def _out_size(n: int, k: int, s: int, padding: str, d: int = 1) -> int:
    ek = (k - 1) * d + 1
    return -(-n // s) if padding == "same" else -(-(n - ek + 1) // s)


@dataclass
class TFLiteBuilder:
    """Build a one-subgraph TFLite model op by op (see the module docstring)."""

    tensors: list[_Tensor] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ tensors
    def tensor(self, shape: tuple[int, ...], dtype: str = "int8", scale: float | list[float] | None = None,
               zero_point: int | list[int] | None = None, data: np.ndarray | None = None, qdim: int = 0,
               name: str | None = None) -> int:
        sc = None if scale is None else [float(v) for v in np.atleast_1d(scale)]
        zp = None if zero_point is None else [int(v) for v in np.atleast_1d(zero_point)]
        if sc is not None and zp is None:
            zp = [0] * len(sc)
        arr = None if data is None else np.asarray(data).astype(_NP[dtype]).reshape(shape)
        self.tensors.append(_Tensor(name or f"t{len(self.tensors)}", tuple(int(s) for s in shape), dtype, sc, zp,
                                    qdim, arr))
        return len(self.tensors) - 1

    def input(self, shape: tuple[int, ...], scale: float, zero_point: int, dtype: str = "int8") -> int:
        t = self.tensor(shape, dtype, scale, zero_point, name="input")
        self.inputs.append(t)
        return t

    def _act(self, shape: tuple[int, ...], scale: float, zero_point: int, dtype: str = "int8") -> int:
        return self.tensor(shape, dtype, scale, zero_point)

    def shape(self, t: int) -> tuple[int, ...]:
        return self.tensors[t].shape

    def scale(self, t: int) -> float:
        sc = self.tensors[t].scale
        assert sc is not None
        return sc[0]

    # ------------------------------------------------------------------ ops
    def conv(self, x: int, weight: np.ndarray, bias: np.ndarray, w_scale: float | list[float], out_scale: float,
             out_zp: int, stride: tuple[int, int] = (1, 1), padding: str = "valid", act: str = "none",
             dilation: tuple[int, int] = (1, 1)) -> int:
        """CONV_2D: ``weight`` int8 ``[O, kh, kw, C]`` (TFLite's OHWI), ``bias`` int32 ``[O]`` in units ``s_x s_w``;
        ``w_scale`` per tensor or per output channel (``quantized_dimension`` 0)."""
        weight = np.asarray(weight)
        o, kh, kw, _ = weight.shape
        _, h, w, _ = self.shape(x)
        ws = [float(v) for v in np.atleast_1d(w_scale)]
        wt = self.tensor(weight.shape, "int8", ws, [0] * len(ws), weight, qdim=0)
        bt = self.tensor((o,), "int32", [self.scale(x) * s for s in ws], [0] * len(ws), np.asarray(bias), qdim=0)
        oh, ow = (_out_size(h, kh, stride[0], padding, dilation[0]), _out_size(w, kw, stride[1], padding, dilation[1]))
        y = self._act((1, oh, ow, o), out_scale, out_zp)
        self.ops.append(_Op("CONV_2D", [x, wt, bt], [y], ("Conv2DOptions", {
            "Padding": PAD[padding], "StrideW": stride[1], "StrideH": stride[0], "FusedActivationFunction": ACT[act],
            "DilationWFactor": dilation[1], "DilationHFactor": dilation[0]})))
        return y

    def depthwise(self, x: int, weight: np.ndarray, bias: np.ndarray, w_scale: float | list[float], out_scale: float,
                  out_zp: int, stride: tuple[int, int] = (1, 1), padding: str = "valid", act: str = "none",
                  depth_multiplier: int = 1) -> int:
        """DEPTHWISE_CONV_2D: ``weight`` int8 ``[1, kh, kw, C * depth_multiplier]``, per-channel scales on axis 3."""
        weight = np.asarray(weight)
        _, kh, kw, oc = weight.shape
        _, h, w, _ = self.shape(x)
        ws = [float(v) for v in np.atleast_1d(w_scale)]
        wt = self.tensor(weight.shape, "int8", ws, [0] * len(ws), weight, qdim=3)
        bt = self.tensor((oc,), "int32", [self.scale(x) * s for s in ws], [0] * len(ws), np.asarray(bias), qdim=0)
        y = self._act((1, _out_size(h, kh, stride[0], padding), _out_size(w, kw, stride[1], padding), oc),
                      out_scale, out_zp)
        self.ops.append(_Op("DEPTHWISE_CONV_2D", [x, wt, bt], [y], ("DepthwiseConv2DOptions", {
            "Padding": PAD[padding], "StrideW": stride[1], "StrideH": stride[0],
            "DepthMultiplier": depth_multiplier, "FusedActivationFunction": ACT[act],
            "DilationWFactor": 1, "DilationHFactor": 1})))
        return y

    def fully_connected(self, x: int, weight: np.ndarray, bias: np.ndarray | None, w_scale: float | list[float],
                        out_scale: float, out_zp: int, act: str = "none") -> int:
        """FULLY_CONNECTED: ``weight`` int8 ``[units, depth]`` (the input's flattened size), ``bias`` int32 or
        ``None`` (no bias input, index -1)."""
        weight = np.asarray(weight)
        ws = [float(v) for v in np.atleast_1d(w_scale)]
        wt = self.tensor(weight.shape, "int8", ws, [0] * len(ws), weight, qdim=0)
        ins = [x, wt]
        if bias is not None:
            ins.append(self.tensor((weight.shape[0],), "int32", [self.scale(x) * s for s in ws], [0] * len(ws),
                                   np.asarray(bias), qdim=0))
        else:
            ins.append(-1)
        y = self._act((1, weight.shape[0]), out_scale, out_zp)
        self.ops.append(_Op("FULLY_CONNECTED", ins, [y], ("FullyConnectedOptions", {
            "FusedActivationFunction": ACT[act]})))
        return y

    def pool(self, kind: str, x: int, kernel: tuple[int, int], stride: tuple[int, int], padding: str = "valid",
             act: str = "none") -> int:
        """MAX_POOL_2D / AVERAGE_POOL_2D (``kind`` ``max`` / ``avg``); the output keeps the input's scale and zero
        point (TFLite requires it for int8)."""
        _, h, w, c = self.shape(x)
        t = self.tensors[x]
        assert t.scale is not None and t.zero_point is not None
        y = self._act((1, _out_size(h, kernel[0], stride[0], padding), _out_size(w, kernel[1], stride[1], padding), c),
                      t.scale[0], t.zero_point[0])
        self.ops.append(_Op("MAX_POOL_2D" if kind == "max" else "AVERAGE_POOL_2D", [x], [y], ("Pool2DOptions", {
            "Padding": PAD[padding], "StrideW": stride[1], "StrideH": stride[0], "FilterWidth": kernel[1],
            "FilterHeight": kernel[0], "FusedActivationFunction": ACT[act]})))
        return y

    def add(self, a: int, b: int, out_scale: float, out_zp: int, act: str = "none") -> int:
        """ADD of two int8 tensors of one shape."""
        y = self._act(self.shape(a), out_scale, out_zp)
        self.ops.append(_Op("ADD", [a, b], [y], ("AddOptions", {"FusedActivationFunction": ACT[act]})))
        return y

    def reshape(self, x: int, shape: tuple[int, ...]) -> int:
        """RESHAPE to ``shape`` (with the batch axis), the new shape both as ReshapeOptions and as an int32 input."""
        t = self.tensors[x]
        st = self.tensor((len(shape),), "int32", data=np.asarray(shape))
        y = self.tensor(tuple(shape), t.dtype, t.scale, t.zero_point)
        self.ops.append(_Op("RESHAPE", [x, st], [y], ("ReshapeOptions", {"NewShape": list(shape)})))
        return y

    def unary(self, op: str, x: int, out_scale: float, out_zp: int) -> int:
        """An op with one input and no options (``TANH``, ``LOGISTIC``: for the refusal tests)."""
        y = self._act(self.shape(x), out_scale, out_zp)
        self.ops.append(_Op(op, [x], [y]))
        return y

    # ------------------------------------------------------------------ serialization
    def finish(self, outputs: list[int]) -> bytes:
        b = flatbuffers.Builder(1024)
        # buffers: 0 is the empty sentinel; one per constant tensor
        buf_of: dict[int, int] = {}
        buf_data: list[bytes] = [b""]
        for i, t in enumerate(self.tensors):
            if t.data is not None:
                buf_of[i] = len(buf_data)
                buf_data.append(t.data.astype(t.data.dtype.newbyteorder("<")).tobytes())
            else:
                buf_of[i] = 0
        buffers = []
        for raw in buf_data:
            vec = b.CreateByteVector(raw) if raw else None
            tflite.BufferStart(b)
            if vec is not None:
                tflite.BufferAddData(b, vec)
            buffers.append(tflite.BufferEnd(b))
        tensors = []
        for i, t in enumerate(self.tensors):
            name = b.CreateString(t.name)
            shape = b.CreateNumpyVector(np.asarray(t.shape, dtype=np.int32))
            q = None
            if t.scale is not None:
                sc = b.CreateNumpyVector(np.asarray(t.scale, dtype=np.float32))
                zp = b.CreateNumpyVector(np.asarray(t.zero_point, dtype=np.int64))
                tflite.QuantizationParametersStart(b)
                tflite.QuantizationParametersAddScale(b, sc)
                tflite.QuantizationParametersAddZeroPoint(b, zp)
                tflite.QuantizationParametersAddQuantizedDimension(b, t.quantized_dimension)
                q = tflite.QuantizationParametersEnd(b)
            tflite.TensorStart(b)
            tflite.TensorAddShape(b, shape)
            tflite.TensorAddType(b, _TYPES[t.dtype])
            tflite.TensorAddBuffer(b, buf_of[i])
            tflite.TensorAddName(b, name)
            if q is not None:
                tflite.TensorAddQuantization(b, q)
            tensors.append(tflite.TensorEnd(b))
        codes: list[str] = []
        ops = []
        for op in self.ops:
            if op.op not in codes:
                codes.append(op.op)
            opts = None
            if op.options is not None:
                kind, values = op.options
                mod = importlib.import_module(f"tflite.{kind}")
                vec_fields = {k: v for k, v in values.items() if isinstance(v, list)}
                vecs = {k: b.CreateNumpyVector(np.asarray(v, dtype=np.int32)) for k, v in vec_fields.items()}
                getattr(mod, f"{kind}Start")(b)
                for k, v in values.items():
                    getattr(mod, f"{kind}Add{k}")(b, vecs[k] if k in vecs else v)
                opts = (getattr(tflite.BuiltinOptions, kind), getattr(mod, f"{kind}End")(b))
            ins = b.CreateNumpyVector(np.asarray(op.inputs, dtype=np.int32))
            outs = b.CreateNumpyVector(np.asarray(op.outputs, dtype=np.int32))
            tflite.OperatorStart(b)
            tflite.OperatorAddOpcodeIndex(b, codes.index(op.op))
            tflite.OperatorAddInputs(b, ins)
            tflite.OperatorAddOutputs(b, outs)
            if opts is not None:
                tflite.OperatorAddBuiltinOptionsType(b, opts[0])
                tflite.OperatorAddBuiltinOptions(b, opts[1])
            ops.append(tflite.OperatorEnd(b))
        opcodes = []
        for name in codes:
            code = getattr(tflite.BuiltinOperator, name)
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, _VERSIONS.get(name, 1))
            opcodes.append(tflite.OperatorCodeEnd(b))

        def vector(start, items: list[int]) -> int:  # noqa: ANN001 - a generated StartXVector function
            start(b, len(items))
            for it in reversed(items):
                b.PrependUOffsetTRelative(it)
            return b.EndVector()

        t_vec = vector(tflite.SubGraphStartTensorsVector, tensors)
        o_vec = vector(tflite.SubGraphStartOperatorsVector, ops)
        in_vec = b.CreateNumpyVector(np.asarray(self.inputs, dtype=np.int32))
        out_vec = b.CreateNumpyVector(np.asarray(outputs, dtype=np.int32))
        sg_name = b.CreateString("main")
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, t_vec)
        tflite.SubGraphAddInputs(b, in_vec)
        tflite.SubGraphAddOutputs(b, out_vec)
        tflite.SubGraphAddOperators(b, o_vec)
        tflite.SubGraphAddName(b, sg_name)
        sg = tflite.SubGraphEnd(b)
        sg_vec = vector(tflite.ModelStartSubgraphsVector, [sg])
        oc_vec = vector(tflite.ModelStartOperatorCodesVector, opcodes)
        bf_vec = vector(tflite.ModelStartBuffersVector, buffers)
        desc = b.CreateString("qverify test model")
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, oc_vec)
        tflite.ModelAddSubgraphs(b, sg_vec)
        tflite.ModelAddDescription(b, desc)
        tflite.ModelAddBuffers(b, bf_vec)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def save(self, path: str | Path, outputs: list[int]) -> Path:
        path = Path(path)
        path.write_bytes(self.finish(outputs))
        return path


# ====================================================================================================== models
def _w(rng: np.random.Generator, shape: tuple[int, ...], lo: int = -127, hi: int = 127) -> np.ndarray:
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


def _bias(rng: np.random.Generator, n: int, mag: int = 2000) -> np.ndarray:
    return rng.integers(-mag, mag + 1, size=n).astype(np.int32)


def mnist_cnn(seed: int = 0, hw: int = 28, per_channel: bool = True, act: str = "relu") -> TFLiteBuilder:
    """CONV_2D(SAME, stride 1) -> CONV_2D(VALID, stride 2) -> MAX_POOL_2D -> DEPTHWISE_CONV_2D(SAME) ->
    AVERAGE_POOL_2D(VALID) -> RESHAPE -> FULLY_CONNECTED, int8, MNIST-shaped input ``[1, hw, hw, 1]`` with scale
    1/255 and zero point -128 (``q = pixel - 128``). Returns the builder and leaves the output tensor as its last."""
    rng = np.random.default_rng(seed)
    b = TFLiteBuilder()
    x = b.input((1, hw, hw, 1), 1 / 255, -128)

    def scales(n: int, base: float) -> float | list[float]:
        return [base * float(v) for v in rng.uniform(0.6, 1.4, n)] if per_channel else base

    c1 = b.conv(x, _w(rng, (4, 3, 3, 1)), _bias(rng, 4), scales(4, 0.01), 0.05, -20, (1, 1), "same", act)
    c2 = b.conv(c1, _w(rng, (6, 3, 3, 4)), _bias(rng, 6, 5000), scales(6, 0.004), 0.08, 5, (2, 2), "valid", act)
    p1 = b.pool("max", c2, (2, 2), (2, 2), "valid")
    d1 = b.depthwise(p1, _w(rng, (1, 3, 3, 6)), _bias(rng, 6), scales(6, 0.01), 0.06, -3, (1, 1), "same", "relu6")
    p2 = b.pool("avg", d1, (2, 2), (1, 1), "valid")
    n = int(np.prod(b.shape(p2)))
    r = b.reshape(p2, (1, n))
    b.fully_connected(r, _w(rng, (10, n)), _bias(rng, 10, 3000), scales(10, 0.003), 0.1, 2)
    return b


def residual_block(seed: int = 0, hw: int = 8, c: int = 3, same_scale: bool = False, add_scale: float = 0.09
                   ) -> TFLiteBuilder:
    """CONV_2D(SAME) -> CONV_2D(SAME) + skip (ADD of the first conv's output and the second's, fused RELU) ->
    AVERAGE_POOL_2D(SAME, border counts differ) -> RESHAPE -> FULLY_CONNECTED."""
    rng = np.random.default_rng(seed)
    b = TFLiteBuilder()
    x = b.input((1, hw, hw, 1), 1 / 255, -128)
    c1 = b.conv(x, _w(rng, (c, 3, 3, 1)), _bias(rng, c), [0.01, 0.013, 0.008][:c] + [0.01] * (c - 3), 0.05, -10,
                (1, 1), "same", "relu")
    c2 = b.conv(c1, _w(rng, (c, 3, 3, c)), _bias(rng, c), 0.003, 0.05 if same_scale else 0.07, 4, (1, 1), "same")
    a = b.add(c1, c2, add_scale, -5, "relu")
    p = b.pool("avg", a, (3, 3), (2, 2), "same")
    n = int(np.prod(b.shape(p)))
    r = b.reshape(p, (1, n))
    b.fully_connected(r, _w(rng, (10, n)), _bias(rng, 10, 3000), 0.004, 0.1, 0)
    return b


def random_model(seed: int) -> TFLiteBuilder:
    """A random small int8 CNN over the supported operators (for agreement sweeps): random input size and
    quantization, CONV_2D with random padding, stride, dilation, per-channel or per-tensor scales (some with a real
    multiplier above 1), an optional pool, DEPTHWISE_CONV_2D, an optional residual ADD, RESHAPE, FULLY_CONNECTED;
    random fused activations. The output tensor is the last one."""
    rng = np.random.default_rng(seed)
    acts = ["none", "relu", "relu6", "relu_n1_to_1"]
    b = TFLiteBuilder()
    hw = int(rng.integers(5, 12))
    x = b.input((1, hw, hw, int(rng.integers(1, 4))), float(rng.uniform(0.003, 0.05)), int(rng.integers(-128, 128)))

    def scale(n: int, s: float) -> float | list[float]:
        return [s * float(v) for v in rng.uniform(0.5, 1.5, n)] if rng.random() < 0.5 else s

    def act() -> str:
        return str(rng.choice(acts, p=[0.4, 0.3, 0.2, 0.1]))

    c = int(rng.integers(2, 5))
    cin = b.shape(x)[3]
    s_x = b.scale(x)
    wscale = float(rng.uniform(0.002, 0.02))
    out_s = s_x * wscale * float(rng.choice([0.5, 2.0, 20.0, 150.0]))  # multiplier 2 .. 1/150
    pad = str(rng.choice(["same", "valid"]))
    stride = int(rng.integers(1, 3))
    dil = int(rng.integers(1, 3)) if stride == 1 and pad == "valid" and hw >= 7 else 1
    y = b.conv(x, _w(rng, (c, 3, 3, cin)), _bias(rng, c), scale(c, wscale), out_s, int(rng.integers(-20, 20)),
               (stride, stride), pad, act(), (dil, dil))
    if rng.random() < 0.6 and min(b.shape(y)[1:3]) >= 2:
        y = b.pool(str(rng.choice(["max", "avg"])), y, (2, int(rng.integers(1, 4))), (int(rng.integers(1, 3)), 1),
                   str(rng.choice(["same", "valid"])) if min(b.shape(y)[1:3]) >= 3 else "same", act())
    dm = int(rng.integers(1, 3))
    ch = b.shape(y)[3]
    d = b.depthwise(y, _w(rng, (1, 3, 3, ch * dm)), _bias(rng, ch * dm), scale(ch * dm, 0.01), 0.02,
                    int(rng.integers(-10, 10)), (1, 1), "same", act(), depth_multiplier=dm)
    if dm == 1 and rng.random() < 0.7:
        d = b.add(y, d, float(rng.uniform(0.01, 0.1)), int(rng.integers(-10, 10)), act())
    n = int(np.prod(b.shape(d)))
    r = b.reshape(d, (1, n))
    b.fully_connected(r, _w(rng, (5, n)), _bias(rng, 5, 3000), scale(5, 0.003), 0.1, int(rng.integers(-5, 5)),
                      act())
    return b
