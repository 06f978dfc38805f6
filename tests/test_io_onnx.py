"""ONNX import (QDQ and QOperator) against onnxruntime and against an independent exact oracle.

The executor follows the ONNX specification exactly (rational requantization multiplier, round half to even).
onnxruntime's CPU kernels compute the multiplier ``fl32(fl32(s_x s_w) / s_y)`` and round ``fl32(fl32(acc) m32)``
(MLAS ``MlasRequantizeOutput``), and its unfused float kernels round every float32 operation. These tests do not bend
qverify to that: they measure the differences, show that each one sits at an exact value within float32 error of a
rounding tie and is one LSB, and that they vanish when the float32 requantization is emulated.
"""

from __future__ import annotations

import json
import logging
import warnings
import zlib
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qverify.execute import apply_layer, forward  # noqa: E402
from qverify.io import load_model  # noqa: E402
from qverify.io.onnx import (  # noqa: E402
    load_onnx,
    onnx_integer_outputs,
    onnx_layer_outputs,
    onnx_real_inputs,
    ort_u8s8_saturates,
    qlinear_matmul_session,
)
from qverify.network import Clamp, Conv2d, Dense, Flatten, ModelError, Requantize  # noqa: E402
from qverify.quant import Rounding  # noqa: E402

F32 = np.float32
#: measured differences, printed by test_report (run with -s to see them)
MEASURED: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------- model builders
def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _save(nodes, inits, path, in_shape, out_shape, in_type=TensorProto.FLOAT, opset=17, ms=False):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", in_type, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                          [_init(k, v) for k, v in inits.items()])
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    onnx.save(helper.make_model(g, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops, True)), str(path))
    return path


class _Calib:
    def __init__(self, shape, n=16, seed=0):
        rng = np.random.default_rng(seed)
        self.data = iter([{"x": rng.random(shape).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self.data, None)


def _quantize(src, dst, shape, fmt, per_channel, act="QUInt8", weight="QInt8"):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(_Calib, CalibrationDataReader):
        pass

    logging.disable(logging.WARNING)
    try:
        # 7-bit weights where onnxruntime's u8 x s8 kernels clip (AVX2 without VNNI): there it is exact only so
        quantize_static(str(src), str(dst), Reader(shape), quant_format=getattr(QuantFormat, fmt),
                        per_channel=per_channel, activation_type=getattr(QuantType, act),
                        weight_type=getattr(QuantType, weight), reduce_range=ort_u8s8_saturates())
    finally:
        logging.disable(logging.NOTSET)
    return dst


def _torch_export(kind: str, path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1 if kind == "mlp" else 2)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
        shape = (1, 20)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, stride=2), torch.nn.ReLU(),
                                    torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(64, 10))
        shape = (1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.rand(shape), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17)
    return path, shape


def _matmul_add_float(path):
    """MatMul + Add + Relu + MatMul + Add (onnx.helper): quantize_static gives QLinearMatMul + QLinearAdd."""
    rng = np.random.default_rng(3)
    inits = {"W1": rng.normal(size=(12, 8)).astype(F32), "b1": rng.normal(size=8).astype(F32),
             "W2": rng.normal(size=(8, 5)).astype(F32), "b2": rng.normal(size=5).astype(F32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "W2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    return _save(nodes, inits, path, (1, 12), (1, 5)), (1, 12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """quantize_static models: {name: path}."""
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for kind in ("mlp", "cnn"):
        src, shape = _torch_export(kind, d / f"{kind}.onnx")
        for fmt in ("QDQ", "QOperator"):
            for pc in (False, True):
                name = f"{kind}-{fmt}-{'per_channel' if pc else 'per_tensor'}"
                out[name] = _quantize(src, d / f"{name}.onnx", shape, fmt, pc)
        # asymmetric uint8 weights (non-zero weight zero points) and int8 activations
        out[f"{kind}-QOperator-u8weights"] = _quantize(src, d / f"{kind}-u8w.onnx", shape, "QOperator", False,
                                                       weight="QUInt8")
        out[f"{kind}-QDQ-s8act"] = _quantize(src, d / f"{kind}-s8a.onnx", shape, "QDQ", True, act="QInt8")
    src, shape = _matmul_add_float(d / "mm.onnx")
    for fmt in ("QDQ", "QOperator"):
        for act in ("QUInt8", "QInt8"):
            name = f"matmul_add-{fmt}-{act}"
            out[name] = _quantize(src, d / f"{name}.onnx", shape, fmt, True, act=act)
    return out


# ---------------------------------------------------------------------------------------------- comparison tools
def _grid(net, n, seed=0):
    return np.random.default_rng(seed).integers(net.input_lo, net.input_hi + 1, size=(n, net.num_inputs))


def _tie_distance(layer: Requantize, acc: np.ndarray, idx: tuple) -> Fraction:
    """Distance of the exact pre-rounding value ``acc * num / den`` to the nearest rounding tie ``k + 1/2``."""
    c = idx[1] if len(layer.num) > 1 else 0
    v = Fraction(int(acc[idx]) * layer.num[c], layer.den[c])
    return abs(v - v.__floor__() - Fraction(1, 2))


def _local_diffs(net, x, optimization):
    """Layer-local comparison: every layer block between two integer tensors of the graph is run by the executor on
    onnxruntime's own input tensor. Returns ``[(layer index, acc, ours, theirs)]`` for every block with differences."""
    ort_vals = onnx_layer_outputs(net, x, optimization)
    prev = np.asarray(x).reshape(len(x), *net.input_shape)
    start = 0
    out = []
    for k in sorted(ort_vals):
        v = prev
        acc = None
        for layer in net.layers[start:k + 1]:
            acc = v
            v = apply_layer(layer, v)
        theirs = ort_vals[k].reshape(v.shape)
        if not np.array_equal(v, theirs):
            out.append((k, acc, v, theirs))
        prev, start = theirs, k + 1
    return out


def _check_explained(net, x, optimization, tie_tol: Fraction) -> tuple[int, int]:
    """Assert every local difference is 1 LSB at a Requantize whose exact value lies within ``tie_tol`` of a tie;
    return (number of differing elements, number of compared elements)."""
    n_diff = 0
    for k, acc, ours, theirs in _local_diffs(net, x, optimization):
        layer = net.layers[k]
        assert isinstance(layer, Requantize), f"difference at non-requantize layer {k} {layer}"
        d = ours - theirs
        assert np.abs(d).max() == 1, f"layer {k}: difference of {np.abs(d).max()} LSB"
        for idx in map(tuple, np.argwhere(d)):
            dist = _tie_distance(layer, acc, idx)
            assert dist <= tie_tol, f"layer {k} {idx}: exact value is {float(dist)} from a tie: not float32 error"
        n_diff += int(np.count_nonzero(d))
    return n_diff, int(sum(np.prod(s) for s in net.shapes[1:]) * len(x))


def _ort_emulated(net, path, x):
    """The executor with every Requantize replaced by onnxruntime's float32 requantization (QOperator graphs with
    QGemm / QLinearMatMul / QLinearConv): ``clamp(rint(fl32(fl32(acc) * m32)) + z)``, ``m32 = fl32(fl32(s_x s_w) /
    s_y)``."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    where = {"QGemm": (1, 4, 7), "QLinearMatMul": (1, 4, 6), "QLinearConv": (1, 4, 6)}
    v = np.asarray(x).reshape(len(x), *net.input_shape)
    for layer in net.layers:
        if not isinstance(layer, Requantize):
            v = apply_layer(layer, v)
            continue
        node = nodes[layer.name.removesuffix("/requant")]
        ia, ib, iy = where[node.op_type]
        sa, sb, sy = (inits[node.input[i]].astype(F32) for i in (ia, ib, iy))
        m32 = ((F32(sa) * np.atleast_1d(sb).astype(F32)) / F32(sy)).astype(F32)
        shape = (1, -1) + (1,) * (v.ndim - 2)
        prod = (v.astype(F32) * m32.reshape(shape)).astype(F32)
        z = int(layer.zero_point[0])
        r = np.rint(prod).astype(np.int64) + z
        v = np.clip(r, layer.lo, layer.hi)
    return v.reshape(len(x), -1)


# ---------------------------------------------------------------------------------------------- quantize_static
QOPERATOR_EMULATED = ("mlp-QOperator-per_tensor", "mlp-QOperator-per_channel", "cnn-QOperator-per_tensor",
                      "cnn-QOperator-per_channel", "mlp-QOperator-u8weights", "cnn-QOperator-u8weights")


@pytest.mark.parametrize("name", [
    "mlp-QDQ-per_tensor", "mlp-QDQ-per_channel", "mlp-QOperator-per_tensor", "mlp-QOperator-per_channel",
    "mlp-QOperator-u8weights", "mlp-QDQ-s8act", "cnn-QDQ-per_tensor", "cnn-QDQ-per_channel",
    "cnn-QOperator-per_tensor", "cnn-QOperator-per_channel", "cnn-QOperator-u8weights", "cnn-QDQ-s8act",
    "matmul_add-QDQ-QUInt8", "matmul_add-QDQ-QInt8", "matmul_add-QOperator-QUInt8", "matmul_add-QOperator-QInt8"])
def test_quantize_static_models_match_onnxruntime(models, name):
    path = models[name]
    net = load_onnx(path)
    m = onnx.load(str(path))
    ops = {n.op_type for n in m.graph.node}
    # structure: the form is recognized, the input is the quantized input grid
    assert net.metadata["format"] == "onnx" and net.metadata["onnx_path"] == str(path.resolve())
    assert net.input_rounding is Rounding.HALF_EVEN and net.metadata["onnx_input_dtype"] == "float"
    q_in = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    zin = inits[q_in.input[2]]
    assert (net.input_lo, net.input_hi) == ((0, 255) if zin.dtype == np.uint8 else (-128, 127))
    assert net.input_scale == Fraction(float(inits[q_in.input[1]]))
    assert net.input_zero_point == int(zin)
    if "QOperator" in name:
        assert ops & {"QGemm", "QLinearConv", "QLinearMatMul"}
    # quantize_static folds the ReLU into the activation range: the hidden clamp's lower end is the zero point
    for layer in net.layers[:-1]:
        if isinstance(layer, Requantize) and name.startswith(("mlp", "cnn")):
            assert layer.lo == int(layer.zero_point[0])
    x = _grid(net, 4000, seed=zlib.crc32(name.encode()))
    ours = forward(net, x)
    counts = []
    for opt in ("all", "none"):
        theirs = onnx_integer_outputs(net, x, opt)
        assert theirs.shape == ours.shape
        counts.append(int(np.count_nonzero(ours != theirs)))
        # the real outputs of the unmodified graph are s_out (y - z_out) (the batch of these exports is fixed to 1)
        if opt == "all":
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            xr = onnx_real_inputs(net, x[:20])
            shape = tuple(int(d) for d in net.metadata["onnx_input_shape"].split(","))[1:]
            y_real = np.concatenate([sess.run(None, {"x": xr[i].reshape(1, *shape)})[0] for i in range(20)])
            expect = (theirs[:20] - net.output_zero_point).astype(F32) * F32(float(net.output_scale))
            assert np.array_equal(y_real.reshape(20, -1), expect)
    # every local difference is a 1-LSB rounding at a float32 near-tie (2^-12 LSB covers float32 sums of the unfused
    # kernels; a wrong zero point or scale would put differences at arbitrary distances)
    tol = Fraction(1, 2**12)
    local = [_check_explained(net, x, opt, tol) for opt in ("all", "none")]
    if name in QOPERATOR_EMULATED:
        emu = _ort_emulated(net, path, x)
        assert np.array_equal(emu, onnx_integer_outputs(net, x, "all")), "float32 emulation must equal onnxruntime"
    MEASURED[name] = (f"final outputs differing: {counts[0]} (optimized) / {counts[1]} (unoptimized) of {ours.size}; "
                      f"layer-local: {local[0][0]} / {local[1][0]} of {local[0][1]} values")
    # the differences stay rare (float32 near-ties only)
    assert local[0][0] <= local[0][1] * 1e-3 and local[1][0] <= local[1][1] * 1e-3


def test_constructed_near_ties_explained_by_float32_requantization(tmp_path):
    """A QLinearMatMul whose exact multiplier is 1/2 + 2^-27 while onnxruntime's float32 multiplier is exactly 1/2:
    every odd accumulator is a near-tie. The executor rounds the exact value; onnxruntime rounds the tie to even. The
    float32 emulation reproduces onnxruntime bit for bit."""
    sa, sb = F32(0.1), F32(0.3)
    sy = F32(sa * sb) * F32(2)  # 0.060000002384...: s_a s_b / s_y = 1/2 + 2^-27 exactly
    m_exact = Fraction(float(sa)) * Fraction(float(sb)) / Fraction(float(sy))
    m32 = F32(F32(sa * sb) / sy)
    assert m32 == 0.5 and m_exact == Fraction(1, 2) + Fraction(1, 2**27)
    rng = np.random.default_rng(5)
    w = rng.integers(-1, 2, size=(3, 4)).astype(np.int8)
    inits = {"sa": sa, "za": np.uint8(0), "w": w, "sb": sb, "zb": np.int8(0), "sy": sy, "zy": np.uint8(128)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="q_in"),
             helper.make_node("QLinearMatMul", ["xq", "sa", "za", "w", "sb", "zb", "sy", "zy"], ["yq"], name="qmm"),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dq_out")]
    path = _save(nodes, inits, tmp_path / "ties.onnx", ("N", 3), ("N", 4))
    net = load_onnx(path)
    assert [type(layer) for layer in net.layers] == [Dense, Requantize]
    assert net.layers[1].multipliers() == [m_exact]
    x = _grid(net, 3000, seed=1)
    ours, theirs = forward(net, x), onnx_integer_outputs(net, x)
    acc = x @ w.astype(np.int64)
    diff = ours != theirs
    # every difference is an odd accumulator (a near-tie), 1 LSB, inside the clamp range
    assert diff.sum() > 100
    assert np.all(acc[diff] % 2 == 1) and np.abs(ours - theirs).max() == 1
    # emulating onnxruntime's float32 requantization removes all of them
    assert np.array_equal(_ort_emulated(net, path, x), theirs)
    MEASURED["constructed near-ties"] = f"{int(diff.sum())} of {diff.size} outputs differ (all odd accumulators)"


# ---------------------------------------------------------------------------------------------- exact oracle
def _oracle_conv_mm(x, p):
    """Independent exact semantics of Q -> QLinearConv -> Flatten -> QLinearMatMul from the ONNX spec, Python
    Fractions and Python's round() (half to even)."""
    def requant(acc, m, z, lo, hi):
        return max(lo, min(hi, round(acc * m) + z))

    b = x.shape[0]
    c_out, c_in, k, _ = p["w1"].shape
    pad = p["pad"]
    xs = x.reshape(b, c_in, p["h"], p["h"]).astype(np.int64) - p["zx"]
    xs = np.pad(xs, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # padding is real zero: x - zx = 0
    oh = (p["h"] + 2 * pad - k) // p["stride"] + 1
    w1 = p["w1"].astype(np.int64) - p["zw1"].reshape(-1, 1, 1, 1)
    h1 = np.zeros((b, c_out, oh, oh), dtype=np.int64)
    for o in range(c_out):
        m = Fraction(float(p["sx"])) * Fraction(float(p["sw1"][o])) / Fraction(float(p["s1"]))
        for i in range(oh):
            for j in range(oh):
                win = xs[:, :, i * p["stride"]:i * p["stride"] + k, j * p["stride"]:j * p["stride"] + k]
                accs = (win * w1[o]).sum(axis=(1, 2, 3)) + int(p["b1"][o])
                h1[:, o, i, j] = [requant(int(a), m, p["z1"], p["lo1"], p["hi1"]) for a in accs]
    flat = h1.reshape(b, -1) - p["z1"]
    w2 = p["w2"].astype(np.int64) - p["zw2"].reshape(1, -1)
    out = np.zeros((b, w2.shape[1]), dtype=np.int64)
    for n in range(w2.shape[1]):
        m = Fraction(float(p["s1"])) * Fraction(float(p["sw2"][n])) / Fraction(float(p["s2"]))
        accs = flat @ w2[:, n]
        out[:, n] = [requant(int(a), m, p["z2"], -128, 127) for a in accs]
    return out


@st.composite
def conv_mm_params(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c_in, c_out, n_out = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, k = draw(st.integers(3, 5)), draw(st.integers(2, 3))
    pad, stride = draw(st.integers(0, 1)), draw(st.integers(1, 2))
    signed = draw(st.booleans())
    lo1, hi1 = (-128, 127) if signed else (0, 255)

    def scale():
        return F32(rng.uniform(0.001, 0.05))

    oh = (h + 2 * pad - k) // stride + 1
    return {
        "c_in": c_in, "h": h, "pad": pad, "stride": stride, "signed": signed, "lo1": lo1, "hi1": hi1,
        "sx": scale(), "zx": int(rng.integers(0, 40)),
        "w1": rng.integers(-128, 128, size=(c_out, c_in, k, k)).astype(np.int8),
        "sw1": np.array([scale() for _ in range(c_out)], dtype=F32),
        "zw1": rng.integers(-5, 6, size=c_out).astype(np.int8),
        "b1": rng.integers(-3000, 3000, size=c_out).astype(np.int32),
        "s1": scale(), "z1": int(rng.integers(lo1, lo1 + 30)),
        "w2": rng.integers(-128, 128, size=(c_out * oh * oh, n_out)).astype(np.int8),
        "sw2": np.array([scale() for _ in range(n_out)], dtype=F32),
        "zw2": rng.integers(-3, 4, size=n_out).astype(np.int8),
        "s2": scale(), "z2": int(rng.integers(-10, 10)),
    }


def _conv_mm_model(p, path):
    """uint8 graph input -> QLinearConv (per-channel scales and zero points, bias) -> Flatten -> QLinearMatMul."""
    t1 = np.int8 if p["signed"] else np.uint8
    inits = {"sx": p["sx"], "zx": np.uint8(p["zx"]), "w1": p["w1"], "sw1": p["sw1"], "zw1": p["zw1"], "b1": p["b1"],
             "s1": p["s1"], "z1": t1(p["z1"]), "w2": p["w2"], "sw2": p["sw2"], "zw2": p["zw2"], "s2": p["s2"],
             "z2": np.int8(p["z2"])}
    k = p["w1"].shape[2]
    nodes = [helper.make_node("QLinearConv", ["x", "sx", "zx", "w1", "sw1", "zw1", "s1", "z1", "b1"], ["h1"],
                              name="conv", kernel_shape=[k, k], pads=[p["pad"]] * 4, strides=[p["stride"]] * 2),
             helper.make_node("Flatten", ["h1"], ["f1"], name="flat"),
             helper.make_node("QLinearMatMul", ["f1", "s1", "z1", "w2", "sw2", "zw2", "s2", "z2"], ["yq"], name="mm"),
             helper.make_node("DequantizeLinear", ["yq", "s2", "z2"], ["y"], name="dq")]
    return _save(nodes, inits, path, (1, p["c_in"], p["h"], p["h"]), (1, p["w2"].shape[1]), in_type=TensorProto.UINT8)


@settings(max_examples=25, deadline=None)
@given(conv_mm_params(), st.integers(0, 2**32 - 1))
def test_executor_equals_exact_spec_oracle(tmp_path_factory, p, seed):
    path = _conv_mm_model(p, tmp_path_factory.mktemp("oracle") / "m.onnx")
    net = load_onnx(path)
    assert net.input_rounding is None and (net.input_lo, net.input_hi) == (0, 255)
    assert net.input_scale == Fraction(float(p["sx"])) and net.input_zero_point == p["zx"]
    assert net.output_scale == Fraction(float(p["s2"])) and net.output_zero_point == p["z2"]
    conv = net.layers[0]
    assert isinstance(conv, Conv2d) and conv.pad_value == p["zx"]
    x = np.random.default_rng(seed).integers(0, 256, size=(40, net.num_inputs))
    assert np.array_equal(forward(net, x), _oracle_conv_mm(x, p))


# ---------------------------------------------------------------------------------------------- other patterns
def test_relu_and_clip_carried_by_the_clamp(tmp_path):
    """DQ -> MatMul -> Add(int32 bias) -> Relu -> Q(z=10) and DQ -> Gemm -> Clip(0, 6*s) -> Q: the ReLU is the clamp's
    lower end lo = z, Clip's upper bound becomes hi = R(6 s / s_y) + z_y."""
    rng = np.random.default_rng(7)
    sx, sw, sy, s2 = F32(0.02), F32(0.01), F32(0.05), F32(0.03)
    w1 = rng.integers(-60, 60, size=(6, 4)).astype(np.int8)
    w2 = rng.integers(-60, 60, size=(3, 4)).astype(np.int8)
    inits = {"sx": sx, "zx": np.uint8(3), "w1": w1, "sw": sw, "zw": np.int8(0),
             "b": rng.integers(-500, 500, size=4).astype(np.int32), "sb": F32(sx * sw), "zb": np.int32(0),
             "sy": sy, "zy": np.uint8(10), "w2": w2, "cmin": F32(0), "cmax": F32(1.5), "s2": s2, "z2": np.uint8(7)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_in"),
             helper.make_node("DequantizeLinear", ["w1", "sw", "zw"], ["w1d"], name="dq_w1"),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], name="dq_b"),
             helper.make_node("MatMul", ["xd", "w1d"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "bd"], ["a"], name="bias"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["hq"], name="q_h"),
             helper.make_node("DequantizeLinear", ["hq", "sy", "zy"], ["hd"], name="dq_h"),
             helper.make_node("DequantizeLinear", ["w2", "sw", "zw"], ["w2d"], name="dq_w2"),
             helper.make_node("Gemm", ["hd", "w2d"], ["g"], name="gemm", transB=1),
             helper.make_node("Clip", ["g", "cmin", "cmax"], ["c"], name="clip"),
             helper.make_node("QuantizeLinear", ["c", "s2", "z2"], ["yq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["yq", "s2", "z2"], ["y"], name="dq_out")]
    path = _save(nodes, inits, tmp_path / "relu.onnx", ("N", 6), ("N", 3))
    net = load_onnx(path)
    r1, r2 = net.layers[1], net.layers[3]
    assert isinstance(r1, Requantize) and (r1.lo, r1.hi) == (10, 255)
    assert isinstance(r2, Requantize) and r2.lo == 7
    assert r2.hi == round(Fraction(float(F32(1.5))) / Fraction(float(s2))) + 7 == 57
    assert net.layers[0].bias.tolist() == (inits["b"].astype(np.int64) - 3 * w1.astype(np.int64).sum(0)).tolist()
    x = _grid(net, 3000, seed=2)
    n, total = _check_explained(net, x, "all", Fraction(1, 2**12))
    n2, _ = _check_explained(net, x, "none", Fraction(1, 2**12))
    MEASURED["QDQ relu/clip (hand-built)"] = f"layer-local differences: {n} (optimized) / {n2} (unoptimized) of {total}"
    theirs = onnx_integer_outputs(net, x)
    assert np.abs(forward(net, x) - theirs).max() <= 1
    assert theirs.min() >= 7 and theirs.max() <= 57


def test_matmul_integer_cast_mul_add_chain(tmp_path):
    """Q -> MatMulInteger -> Cast -> Mul(s_x s_w) -> Add(float bias) -> Q -> DQ; the float bias is rounded to
    accumulator units (a recorded note): at most 1 LSB against onnxruntime's float computation."""
    rng = np.random.default_rng(11)
    sx, sw, sy = F32(0.0123), F32(0.0071), F32(0.02)
    w = rng.integers(0, 256, size=(10, 6)).astype(np.uint8)
    inits = {"sx": sx, "zx": np.uint8(17), "w": w, "zw": np.uint8(128), "m": F32(sx * sw),
             "bias": rng.normal(size=6).astype(F32) * F32(0.3), "sy": sy, "zy": np.int8(-5)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("MatMulInteger", ["xq", "w", "zx", "zw"], ["acc"], name="mmi"),
             helper.make_node("Cast", ["acc"], ["accf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "m"], ["mul"], name="scale"),
             helper.make_node("Add", ["mul", "bias"], ["a"], name="bias_add"),
             helper.make_node("QuantizeLinear", ["a", "sy", "zy"], ["yq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dq_out")]
    path = _save(nodes, inits, tmp_path / "mmi.onnx", ("N", 10), ("N", 6))
    net = load_onnx(path)
    assert [type(layer) for layer in net.layers] == [Dense, Requantize]
    assert "rounded" in net.metadata["onnx_notes"] and "bias_add" in net.metadata["onnx_notes"]
    assert net.layers[1].multipliers()[0] == Fraction(float(F32(sx * sw))) / Fraction(float(sy))
    assert (net.layers[1].lo, net.layers[1].hi) == (-128, 127)
    x = _grid(net, 3000, seed=3)
    d = forward(net, x) - onnx_integer_outputs(net, x)
    assert np.abs(d).max() <= 1
    MEASURED["MatMulInteger chain (float bias rounded)"] = f"{int(np.count_nonzero(d))} of {d.size} outputs differ"


def test_pytorch_fake_quant_export(tmp_path):
    """PyTorch fake quantization exported to ONNX: QuantizeLinear/DequantizeLinear pairs on float weights (quantized
    exactly at import), per-channel conv weights, float biases (rounded to accumulator units)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class FakeQuant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 2, 3)
            self.f = torch.nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            x = torch.fake_quantize_per_tensor_affine(x, 1 / 255, 0, 0, 255)
            w = torch.fake_quantize_per_channel_affine(self.c.weight, torch.tensor([0.01, 0.02]),
                                                       torch.zeros(2, dtype=torch.int32), 0, -128, 127)
            x = torch.relu(torch.nn.functional.conv2d(x, w, self.c.bias))
            x = torch.flatten(torch.fake_quantize_per_tensor_affine(x, 0.02, 0, 0, 255), 1)
            w2 = torch.fake_quantize_per_tensor_affine(self.f.weight, 0.01, 0, -128, 127)
            return torch.fake_quantize_per_tensor_affine(torch.nn.functional.linear(x, w2, self.f.bias),
                                                         0.05, 128, 0, 255)

    path = tmp_path / "fq.onnx"
    model = FakeQuant()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.rand(1, 1, 6, 6), str(path), dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"])
    net = load_onnx(path)
    assert [type(layer) for layer in net.layers] == [Conv2d, Requantize, Flatten, Dense, Requantize]
    assert len(net.layers[1].num) == 2  # per-channel weight scales
    # the float weights are quantized exactly at import: clamp(R(w / s_c), -128, 127), ties to even
    w = model.c.weight.detach().numpy()
    s = [F32(0.01), F32(0.02)]
    expect = [[max(-128, min(127, round(Fraction(float(v)) / Fraction(float(s[o]))))) for v in w[o].ravel()]
              for o in range(2)]
    assert net.layers[0].weight.reshape(2, -1).tolist() == expect
    assert "rounded" in net.metadata["onnx_notes"]
    x = _grid(net, 3000, seed=4)
    d = forward(net, x) - onnx_integer_outputs(net, x)
    assert np.abs(d).max() <= 1
    MEASURED["PyTorch fake-quant export (float biases rounded)"] = f"{int(np.count_nonzero(d))} of {d.size} differ"


def test_qgemm_float_output_is_the_accumulator(tmp_path):
    """QGemm without y_scale writes ``fl32(acc * fl32(s_a s_b))``: the network ends at the accumulator with
    ``output_scale = s_a s_b``; onnxruntime's float output maps back to the exact integer accumulator."""
    rng = np.random.default_rng(12)
    wr = 64 if ort_u8s8_saturates() else 128  # 7-bit weights where onnxruntime's u8 x s8 kernels clip
    inits = {"sx": F32(0.013), "zx": np.uint8(9), "w": rng.integers(-wr, wr, size=(5, 7)).astype(np.int8),
             "sw": F32(0.021), "zw": np.int8(0), "c": rng.integers(-4000, 4000, size=5).astype(np.int32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("QGemm", ["xq", "sx", "zx", "w", "sw", "zw", "c"], ["y"], name="qgemm",
                              domain="com.microsoft", transB=1)]
    path = _save(nodes, inits, tmp_path / "qgemm_float.onnx", ("N", 7), ("N", 5), ms=True)
    net = load_onnx(path)
    assert [type(layer) for layer in net.layers] == [Dense]
    assert net.metadata["onnx_output_kind"] == "accumulator"
    assert net.output_scale == Fraction(float(F32(0.013))) * Fraction(float(F32(0.021)))
    x = _grid(net, 2000, seed=6)
    assert np.array_equal(forward(net, x), onnx_integer_outputs(net, x))


def test_shape_chain_reshape_with_dynamic_batch(tmp_path):
    """``x.view(x.size(0), -1)`` exports Shape -> Gather -> Unsqueeze -> Concat -> Reshape: constant-folded into a
    Flatten; the batch axis is dynamic, so onnxruntime runs the whole batch at once."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)

    class View(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 2, 3)
            self.f = torch.nn.Linear(32, 3)

        def forward(self, x):
            x = torch.relu(self.c(x))
            return self.f(x.view(x.size(0), -1))

    src = tmp_path / "view.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(View(), torch.rand(1, 1, 6, 6), str(src), dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    q = _quantize(src, tmp_path / "view_q.onnx", (1, 1, 6, 6), "QOperator", True)
    assert "Shape" in {n.op_type for n in onnx.load(str(q)).graph.node}
    net = load_onnx(q)
    assert [type(layer) for layer in net.layers] == [Conv2d, Requantize, Flatten, Dense, Requantize]
    assert net.metadata["onnx_input_shape"] == "-1,1,6,6"
    x = _grid(net, 2000, seed=8)
    n, total = _check_explained(net, x, "all", Fraction(1, 2**12))
    MEASURED["dynamic-batch view model (QOperator)"] = f"layer-local differences: {n} of {total}"


def test_load_model_dispatch_fixed_batch_and_layer_map(models):
    net = load_model(models["cnn-QOperator-per_channel"])
    assert net.metadata["onnx_form"] == "QDQ+QOperator"
    assert net.metadata["onnx_input_shape"] == "1,1,8,8"  # fixed batch 1: onnx_integer_outputs runs one at a time
    tensors = json.loads(net.metadata["onnx_layer_outputs"])
    assert all(isinstance(net.layers[int(k)], (Requantize, Flatten, Clamp)) for k in tensors)
    x = _grid(net, 7, seed=9)
    assert onnx_integer_outputs(net, x).shape == (7, net.num_outputs)
    with pytest.raises(ValueError, match="outside the grid"):
        onnx_integer_outputs(net, np.full((1, net.num_inputs), 300))


def test_replay_confirms_on_onnxruntime(models):
    from qverify.property import robustness_property
    from qverify.replay import replay

    net = load_onnx(models["mlp-QOperator-per_tensor"])
    x = _grid(net, 1, seed=10)[0]
    label = int(np.argmax(forward(net, x[None])[0]))
    prop = robustness_property(net, x, (label + 1) % net.num_outputs, radius=0)
    cex = replay(net, prop, x)
    assert cex.confirmed and cex.onnx_confirmed is True and "differ" not in cex.note



@pytest.mark.parametrize("wmax", [64, 127])
def test_u8s8_probe_predicts_onnxruntime_exactness(wmax):
    """Weights ``|w| <= 64`` run exactly on every CPU; full-range 8-bit weights run exactly unless the probe says the
    kernels clip, and then a pair of large products does clip (the probe's own case, on a wider matrix)."""
    rng = np.random.default_rng(wmax)
    k, n, sy = 64, 16, 512.0
    w = rng.integers(-min(wmax, 128), wmax + 1, size=(k, n))
    x = rng.integers(0, 256, size=(200, k))
    sess = qlinear_matmul_session(w, sy)
    got = np.stack([sess.run(None, {"x": xi[None].astype(np.uint8)})[0][0] for xi in x]).astype(np.int64)
    want = np.clip(np.rint((x @ w) / sy), 0, 255).astype(np.int64)  # |x @ w| < 2^22: float64 division is exact
    if wmax <= 64 or not ort_u8s8_saturates():
        assert np.array_equal(got, want)
    else:
        big = np.full((k, n), 127)
        y = qlinear_matmul_session(big, 256.0 * 64).run(None, {"x": np.full((1, k), 255, dtype=np.uint8)})[0]
        assert int(y[0, 0]) < round(255 * 127 * k / (256 * 64))


def test_replay_names_onnxruntime_clipping(monkeypatch):
    """A disagreement of onnxruntime with the executor is reported; the note names the 16-bit clipping when the CPU
    clips and the network has a weight above 64, and only then."""
    import qverify.io.onnx as qonnx
    from qverify.property import robustness_property
    from qverify.replay import replay
    from tests.fixtures import tiny_fixed_point_mlp

    base = tiny_fixed_point_mlp()
    x = np.array([1, 2])
    wrong = lambda net, xs: forward(net, xs) + 1  # noqa: E731 - an onnxruntime stand-in that is off by one
    monkeypatch.setattr(qonnx, "onnx_integer_outputs", wrong)
    notes = {}
    for big in (False, True):
        first = Dense([[100, -1], [1, 1]], [1, 0], name="fc0") if big else base.layers[0]
        net = replace(base, layers=(first, *base.layers[1:]),
                      metadata={"format": "onnx", "onnx_path": "stand-in.onnx"})
        label = int(np.argmax(forward(net, x[None])[0]))
        prop = robustness_property(net, x, 1 - label, radius=0)  # x itself violates it
        for clips in (False, True):
            monkeypatch.setattr(qonnx, "ort_u8s8_saturates", lambda clips=clips: clips)
            cex = replay(net, prop, x)
            assert cex.confirmed and cex.onnx_confirmed is not None and "differ from the executor's" in cex.note
            notes[big, clips] = qonnx.U8S8_CLIP_NOTE in cex.note
    assert notes == {(False, False): False, (False, True): False, (True, False): False, (True, True): True}


# ---------------------------------------------------------------------------------------------- errors
def _qdq_prefix(inits):
    inits.update({"sx": F32(0.02), "zx": np.uint8(0)})
    return [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_in")]


def test_unsupported_operator_names_op_node_and_file(tmp_path):
    inits: dict = {}
    # (Sigmoid, the example until graphs, is now imported between DQ and Q; Erf is not)
    nodes = _qdq_prefix(inits) + [helper.make_node("Erf", ["xd"], ["y"], name="my_erf")]
    path = _save(nodes, inits, tmp_path / "erf.onnx", (1, 4), (1, 4))
    with pytest.raises(ModelError, match=r"erf\.onnx.*'my_erf'.*Erf.*unsupported operator 'Erf'"):
        load_onnx(path)


def test_maxpool_from_quantize_static_imports_and_equals_onnxruntime(tmp_path):
    """Pooling was refused while networks were chains; now a QOperator MaxPool on uint8 is a MaxPool2d node, and
    under onnxruntime's semantics (its fused integer kernels) the executor equals onnxruntime on every output."""
    torch = pytest.importorskip("torch")
    from qverify.network import MaxPool2d

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(18, 3))
    src = tmp_path / "pool.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.rand(1, 1, 8, 8), str(src), dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17)
    q = _quantize(src, tmp_path / "pool_q.onnx", (1, 1, 8, 8), "QOperator", False)
    net = load_onnx(q, semantics="onnxruntime")
    assert any(isinstance(layer, MaxPool2d) for layer in net.layers)
    x = np.random.default_rng(0).integers(net.input_lo, net.input_hi + 1, size=(300, net.num_inputs))
    assert np.array_equal(forward(net, x), onnx_integer_outputs(net, x))


def _residual_model(path):
    rng = np.random.default_rng(0)
    inits = {"w": rng.integers(-5, 5, size=(4, 4)).astype(np.int8), "sw": F32(0.01), "zw": np.int8(0),
             "sh": F32(0.03), "zh": np.uint8(0)}
    nodes = _qdq_prefix(inits) + [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w"),
        helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
        helper.make_node("QuantizeLinear", ["m", "sh", "zh"], ["mq"], name="q_m"),
        helper.make_node("DequantizeLinear", ["mq", "sh", "zh"], ["md"], name="dq_m"),
        helper.make_node("Add", ["md", "xd"], ["y"], name="skip_add")]
    return _save(nodes, inits, path, (1, 4), (1, 4))


def test_residual_add_imports_exactly_and_onnxruntime_semantics_refuses_it(tmp_path):
    """A residual ``Add`` of two activations (refused while networks were chains) is an exact integer ``Add``:
    ``0.03 (h - 0) + 0.02 (x - 0) = 2^-e (m_h h + m_x x)``; the float graph output is that accumulator."""
    from qverify.network import Add

    path = _residual_model(tmp_path / "res.onnx")
    net = load_onnx(path)
    add = next(layer for layer in net.layers if isinstance(layer, Add))
    assert net.node_inputs(net.layers.index(add)) == (2, 0)  # the requantized MatMul and the input
    x = np.random.default_rng(1).integers(0, 256, size=(200, 4))
    h = forward(net.__class__(net.input_shape, net.input_lo, net.input_hi, net.layers[:2]), x)
    sh, sx = Fraction(float(F32(0.03))), Fraction(float(F32(0.02)))
    want = [[sh * int(a) + sx * int(b) for a, b in zip(hr, xr, strict=True)] for hr, xr in zip(h, x, strict=True)]
    got = forward(net, x)
    assert [[net.output_scale * int(v) for v in row] for row in got] == want
    with pytest.raises(ModelError, match=r"res\.onnx: node 'skip_add' \(Add\): semantics='onnxruntime'.*two activ"):
        load_onnx(path, semantics="onnxruntime")


def test_grouped_conv_and_unquantized_weight_errors(tmp_path):
    inits: dict = {"w": np.ones((2, 1, 1, 1), dtype=np.int8), "sw": F32(0.1), "zw": np.int8(0)}
    nodes = _qdq_prefix(inits) + [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="dw_conv", group=2)]
    path = _save(nodes, inits, tmp_path / "grp.onnx", (1, 2, 3, 3), (1, 2, 3, 3))
    assert load_onnx(path).layers[0].groups == 2  # grouped (here depthwise) convolution is supported now
    nodes[-1] = helper.make_node("Conv", ["xd", "wd"], ["y"], name="dw_conv", group=3)
    path = _save(nodes, inits, tmp_path / "grp3.onnx", (1, 2, 3, 3), (1, 2, 3, 3))
    with pytest.raises(ModelError, match=r"'dw_conv' \(Conv\).*group=3"):
        load_onnx(path)
    inits = {"wf": np.ones((4, 3), dtype=F32)}
    nodes = _qdq_prefix(inits) + [helper.make_node("MatMul", ["xd", "wf"], ["y"], name="float_mm")]
    path = _save(nodes, inits, tmp_path / "fw.onnx", (1, 4), (1, 3))
    with pytest.raises(ModelError, match=r"'float_mm' \(MatMul\).*not quantized"):
        load_onnx(path)


# ---------------------------------------------------------------------------------------------- input units
def _int_input_model(path, in_type, in_shape, pre_nodes, first):
    """``x (integer) -> pre_nodes -> DequantizeLinear(sx, zx) [first] -> MatMul/Conv(DQ(W)) -> Q -> DQ -> y``, the
    way tf2onnx writes a model with an integer input."""
    rng = np.random.default_rng(11)
    signed = in_type == TensorProto.INT8
    inits = {"sx": F32(0.0173), "zx": np.int8(-5) if signed else np.uint8(7), "sy": F32(0.21), "zy": np.uint8(3)}
    if first == "matmul":
        inits.update({"w": rng.integers(-90, 90, size=(16, 5)).astype(np.int8), "sw": F32(0.011)})
        body = [helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"], name="dq_w"),
                helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm")]
        out_shape = ("N", 5)
    else:
        inits.update({"w": rng.integers(-90, 90, size=(2, 1, 3, 3)).astype(np.int8), "sw": F32(0.011),
                      "flat": np.array([-1, 8], dtype=np.int64)})
        body = [helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"], name="dq_w"),
                helper.make_node("Conv", ["xd", "wd"], ["m"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1])]
        out_shape = ("N", 8)
    tail = [helper.make_node("QuantizeLinear", ["m", "sy", "zy"], ["mq0" if first == "conv" else "mq"], name="q_out")]
    if first == "conv":
        tail.append(helper.make_node("Reshape", ["mq0", "flat"], ["mq"], name="flatten"))
    tail.append(helper.make_node("DequantizeLinear", ["mq", "sy", "zy"], ["y"], name="dq_out"))
    nodes = pre_nodes + [helper.make_node("DequantizeLinear", ["xm", "sx", "zx"], ["xd"], name="dq_in")] + body + tail
    g = helper.make_graph(nodes, "tf2onnx_like", [helper.make_tensor_value_info("x", in_type, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                          [_init(k, v) for k, v in inits.items()])
    ops = [helper.make_opsetid("", 17)]
    onnx.save(helper.make_model(g, opset_imports=ops, ir_version=8), str(path))
    return path, inits


@pytest.mark.parametrize("case", ["reshape", "flatten", "transpose", "cast+identity"])
def test_integer_input_moved_before_its_dequantize_gets_its_units(tmp_path, case):
    """tf2onnx: an int8 input reshaped (or flattened, transposed keeping the memory order, cast, passed through
    Identity) before its first DequantizeLinear takes that DequantizeLinear's scale and zero point as input units."""
    shape_init = {"shape": np.array([-1, 16], dtype=np.int64)}
    if case == "reshape":
        pre, in_shape, first = ([helper.make_node("Reshape", ["x", "shape"], ["xm"], name="reshape")], ("N", 2, 8),
                                "matmul")
    elif case == "flatten":
        pre, in_shape, first = [helper.make_node("Flatten", ["x"], ["xm"], name="flat")], ("N", 4, 4), "matmul"
    elif case == "transpose":  # NHWC [N, 4, 4, 1] -> NCHW [N, 1, 4, 4]: the memory order is the same
        pre, in_shape, first = ([helper.make_node("Transpose", ["x"], ["xm"], name="nhwc_to_nchw", perm=[0, 3, 1, 2])],
                                ("N", 4, 4, 1), "conv")
    else:
        pre, in_shape, first = ([helper.make_node("Cast", ["x"], ["xc"], name="cast", to=TensorProto.INT8),
                                 helper.make_node("Identity", ["xc"], ["xi"], name="ident"),
                                 helper.make_node("Reshape", ["xi", "shape"], ["xm"], name="reshape")],
                                (1, 16), "matmul")
    path, inits = _int_input_model(tmp_path / f"{case}.onnx", TensorProto.INT8, in_shape, pre, first)
    if case in ("reshape", "cast+identity"):
        m = onnx.load(str(path))
        m.graph.initializer.append(_init("shape", shape_init["shape"]))
        onnx.save(m, str(path))
    net = load_onnx(path)
    assert net.input_scale == Fraction(float(F32(0.0173))) and net.input_zero_point == -5
    assert (net.input_lo, net.input_hi) == (-128, 127)
    if case == "transpose":
        assert net.input_shape == (1, 4, 4)
    x = _grid(net, 500, seed=4)
    ours, theirs = forward(net, x), onnx_integer_outputs(net, x)
    n_diff, _ = _check_explained(net, x, "all", Fraction(1, 2**12))  # only float32 near-ties may differ
    assert int(np.count_nonzero(ours != theirs)) <= max(n_diff, 5)


def test_property_eps_builds_a_real_box_on_an_integer_input_model(tmp_path):
    from qverify.cli import main
    from qverify.io.vnnlib import parse_vnnlib

    pre = [helper.make_node("Reshape", ["x", "shape"], ["xm"], name="reshape")]
    path, _ = _int_input_model(tmp_path / "m.onnx", TensorProto.INT8, ("N", 2, 8), pre, "matmul")
    m = onnx.load(str(path))
    m.graph.initializer.append(_init("shape", np.array([-1, 16], dtype=np.int64)))
    onnx.save(m, str(path))
    net = load_onnx(path)
    images = np.random.default_rng(5).integers(-100, 100, size=(3, 2, 8)).astype(np.int8)
    labels = np.argmax(forward(net, images.reshape(3, -1).astype(np.int64)), axis=1)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    out = tmp_path / "props"
    assert main(["property", str(tmp_path / "d.npz"), "--model", str(path), "--eps", "0.05", "--ids", "0:3",
                 "-o", str(out)]) == 0
    files = sorted(out.glob("*.vnnlib"))
    assert len(files) == 3
    for f, img in zip(files, images, strict=True):
        prop = parse_vnnlib(f, net)
        x = img.reshape(-1).astype(np.int64)
        # eps = 0.05 is 2.89 input steps of 0.0173: the box is x +- 2 on the grid, not a single point
        assert np.array_equal(prop.lo, np.maximum(x - 2, -128)) and np.array_equal(prop.hi, np.minimum(x + 2, 127))


# ---------------------------------------------------------------------------------------------- int4 / uint4
def qdq_matmul_chain() -> list:
    """The QDQ form of one quantized MatMul, ``y = DQ(Q(MatMul(DQ(Q(x; sx, zx)), DQ(w; sw, zw, axis 1)); sy, zy))``,
    over the initializers ``sx, zx, w, sw, zw, sy, zy`` (per-tensor or per-channel weight parameters)."""
    return [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_in"),
            helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w", axis=1),
            helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
            helper.make_node("QuantizeLinear", ["m", "sy", "zy"], ["mq"], name="q_m"),
            helper.make_node("DequantizeLinear", ["mq", "sy", "zy"], ["y"], name="dq_out")]


def _int4_model(path, wtype, per_channel, act4=False):
    """float x -> Q(uint8) -> DQ -> MatMul(DQ(W 4-bit [5, 3], per tensor or per channel, with zero points)) -> Q ->
    DQ (opset 21, onnx's own packing: helper.make_tensor with INT4 / UINT4)."""
    rng = np.random.default_rng(21 + per_channel)
    lo, hi = (-8, 7) if wtype == TensorProto.INT4 else (0, 15)
    w = rng.integers(lo, hi + 1, size=(5, 3))
    zw = rng.integers(lo, hi + 1, size=3 if per_channel else 1)
    sw = rng.uniform(0.01, 0.05, size=3 if per_channel else 1).astype(F32)
    inits = [helper.make_tensor("w", wtype, [5, 3], w.ravel().tolist()),
             helper.make_tensor("zw", wtype, [3] if per_channel else [], zw.tolist()),
             _init("sw", sw if per_channel else sw[0]), _init("sx", F32(0.0071)), _init("zx", np.uint8(9)),
             _init("sy", F32(0.0313))]
    if act4:  # a 4-bit activation: zero point of type INT4
        inits.append(helper.make_tensor("zy", TensorProto.INT4, [], [-2]))
    else:
        inits.append(_init("zy", np.uint8(100)))
    nodes = qdq_matmul_chain()
    g = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path, w, zw


@pytest.mark.parametrize("wtype", [TensorProto.INT4, TensorProto.UINT4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int4_weights_import_exactly(tmp_path, wtype, per_channel):
    path, w, zw = _int4_model(tmp_path / "m.onnx", wtype, per_channel)
    net = load_onnx(path)
    dense = net.layers[0]
    assert isinstance(dense, Dense) and np.array_equal(dense.weight, (w - zw[None, :]).T)
    assert json.loads(net.metadata["onnx_affine_types"])["0"][1] == ("int4" if wtype == TensorProto.INT4 else "uint4")
    x = _grid(net, 2000, seed=6)
    try:
        theirs = onnx_integer_outputs(net, x)
    except Exception as e:  # an onnxruntime without 4-bit DequantizeLinear
        pytest.skip(f"onnxruntime does not run this 4-bit model: {e}")
    ours = forward(net, x)
    # onnxruntime runs DequantizeLinear + a float32 MatMul here: only float32 near-ties may differ, by 1 LSB
    n_diff, n_all = _check_explained(net, x, "all", Fraction(1, 2**12))
    assert int(np.count_nonzero(ours != theirs)) <= n_diff and n_diff <= n_all * 1e-2
    MEASURED[f"int4 weights ({'per channel' if per_channel else 'per tensor'}, type {wtype})"] = (
        f"{int(np.count_nonzero(ours != theirs))} of {ours.size} outputs differ (float32 near-ties)")


def test_int4_activation_gets_the_4_bit_range(tmp_path):
    path, _, _ = _int4_model(tmp_path / "a4.onnx", TensorProto.INT4, False, act4=True)
    net = load_onnx(path)
    req = net.layers[1]
    assert isinstance(req, Requantize) and (req.lo, req.hi) == (-8, 7) and int(req.zero_point[0]) == -2


def test_int4_arithmetic_is_refused_by_name(tmp_path):
    inits = [helper.make_tensor("w4", TensorProto.INT4, [4, 2], [1, -2, 3, 7, -8, 0, 5, 6]), _init("sw", F32(0.1))]
    pre: dict = {}
    nodes = _qdq_prefix(pre) + [helper.make_node("Neg", ["w4"], ["w5"], name="neg_w"),
                                helper.make_node("DequantizeLinear", ["w5", "sw"], ["wd"], name="dq_w"),
                                helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                          inits + [_init(k, v) for k, v in pre.items()])
    path = tmp_path / "neg4.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    with pytest.raises(ModelError, match=r"neg4\.onnx: node 'neg_w' \(Neg\).*'w4' of type INT4 reaches Neg"):
        load_onnx(path)


def test_report():
    """Print the measured onnxruntime differences (pytest -s)."""
    for k, v in MEASURED.items():
        print(f"[onnx vs onnxruntime] {k}: {v}")


# ---------------------------------------------------------------------------------------------- fuzzer regressions
def _qdq_matmul(inits, scale_w=0.01, **mm_attrs):
    inits.update({"w": np.arange(-6, 6, dtype=np.int8).reshape(4, 3), "sw": F32(scale_w), "zw": np.int8(0),
                  "sy": F32(0.05), "zy": np.uint8(0)})
    op = "Gemm" if mm_attrs else "MatMul"
    return _qdq_prefix(inits) + [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w"),
        helper.make_node(op, ["xd", "wd"], ["m"], name="mm", **mm_attrs),
        helper.make_node("QuantizeLinear", ["m", "sy", "zy"], ["mq"], name="q_m"),
        helper.make_node("DequantizeLinear", ["mq", "sy", "zy"], ["y"], name="dq_y")]


def test_fuzz_base_graph_imports(tmp_path):
    inits: dict = {}
    net = load_onnx(_save(_qdq_matmul(inits), inits, tmp_path / "ok.onnx", (1, 4), (1, 3)))
    assert net.num_outputs == 3


def test_missing_node_inputs_name_the_node(tmp_path):
    """A node with fewer inputs than its operator reads raised IndexError."""
    inits: dict = {}
    nodes = _qdq_matmul(inits)
    del nodes[3].input[1:]  # MatMul(xd)
    path = _save(nodes, inits, tmp_path / "short.onnx", (1, 4), (1, 3))
    with pytest.raises(ModelError, match=r"short\.onnx: node 'mm' \(MatMul\): needs at least 2 inputs"):
        load_onnx(path)
    inits = {"sx": F32(0.1), "zx": np.uint8(0), "w": np.ones((4, 3), np.int8), "sw": F32(0.1)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("QLinearMatMul", ["xq", "sx", "zx", "w", "sw"], ["y"], name="qmm")]
    path = _save(nodes, inits, tmp_path / "qshort.onnx", (1, 4), (1, 3))
    with pytest.raises(ModelError, match=r"qshort\.onnx: node 'qmm' \(QLinearMatMul\): needs at least 8 inputs"):
        load_onnx(path)


@pytest.mark.parametrize("where, value, message", [
    ("sy", F32(np.nan), "non-finite value nan"), ("sy", F32(np.inf), "non-finite value inf"),  # OverflowError
    ("sw", F32(np.nan), "weight scale has a non-finite value"), ("sy", F32(0.0), "must be positive"),
    ("sw", F32(-1.0), "must be positive"),
])
def test_non_finite_and_non_positive_scales_name_the_node(tmp_path, where, value, message):
    inits: dict = {}
    nodes = _qdq_matmul(inits)
    inits[where] = value
    path = _save(nodes, inits, tmp_path / "scale.onnx", (1, 4), (1, 3))
    with pytest.raises(ModelError, match=rf"scale\.onnx: node '\w+' \(\w+\): .*{message}"):
        load_onnx(path)


def test_wrongly_typed_attributes_name_the_attribute(tmp_path):
    """``alpha`` given as a list raised TypeError in float()."""
    inits: dict = {}
    nodes = _qdq_matmul(inits, alpha=[1, 2], transB=0)
    path = _save(nodes, inits, tmp_path / "attr.onnx", (1, 4), (1, 3))
    with pytest.raises(ModelError, match=r"attr\.onnx: node 'mm' \(Gemm\): attribute 'alpha' must be float"):
        load_onnx(path)
    inits = {}
    nodes = _qdq_matmul(inits, transB="yes")
    path = _save(nodes, inits, tmp_path / "attr2.onnx", (1, 4), (1, 3))
    with pytest.raises(ModelError, match=r"attribute 'transB' must be int"):
        load_onnx(path)


@pytest.mark.parametrize("dims", [[1, 2**40], [1, 0], [1, -3]], ids=["huge", "zero", "negative"])
def test_input_shapes_that_cannot_be_held_are_refused(tmp_path, dims):
    """An input dimension of 2^40 made numpy try to allocate terabytes (MemoryError)."""
    inits: dict = {}
    path = _save(_qdq_matmul(inits), inits, tmp_path / "dims.onnx", dims, (1, 3))
    with pytest.raises(ModelError, match=r"dims\.onnx: input 'x' has shape .*every dimension must be positive"):
        load_onnx(path)


def test_bias_beyond_int64_is_a_located_error(tmp_path):
    """A weight scale of 1e-45 makes the float bias ``R(c / (s_x s_w))`` exceed int64 (OverflowError)."""
    inits: dict = {}
    nodes = _qdq_matmul(inits, scale_w=1e-45)
    inits["b"] = np.full(3, 1e30, dtype=F32)
    nodes[3] = helper.make_node("MatMul", ["xd", "wd"], ["m0"], name="mm")
    nodes.insert(4, helper.make_node("Add", ["m0", "b"], ["m"], name="add_b"))
    path = _save(nodes, inits, tmp_path / "bias.onnx", (1, 4), (1, 3))
    with pytest.raises(ModelError, match=r"bias\.onnx: node 'add_b' \(Add\): bias of channel 0 is -?\d+ "
                                         r"accumulator units"):
        load_onnx(path)


def test_truncated_initializer_and_model_bytes_are_located_errors(tmp_path):
    """An initializer whose raw bytes are shorter than its shape raised numpy's ValueError; truncated model bytes
    are 'not a readable ONNX model' or a located structural error, never another exception."""
    inits: dict = {}
    path = _save(_qdq_matmul(inits), inits, tmp_path / "ok.onnx", (1, 4), (1, 3))
    m = onnx.load(str(path))
    w = next(t for t in m.graph.initializer if t.name == "w")
    w.raw_data = w.raw_data[:5]
    bad = tmp_path / "trunc_init.onnx"
    bad.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match=r"trunc_init\.onnx: initializer 'w' .*cannot be read"):
        load_onnx(bad)
    data = path.read_bytes()
    for n in (0, 1, 7, len(data) // 3, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.onnx"
        cut.write_bytes(data[:n])
        with pytest.raises(ModelError, match=rf"cut{n}\.onnx: "):
            load_onnx(cut)


def test_constant_folding_of_an_activation_is_a_located_error(tmp_path):
    """Found by bench_fuzz (a QGemm retyped to Constant; a Reshape of a constant by an activation's values):
    folding read ``.value`` of an activation (AttributeError)."""
    inits = {"sx": F32(0.1), "zx": np.uint8(0)}
    nodes = [helper.make_node("Constant", ["x", "sx"], ["y"], name="not_const", domain="com.microsoft")]
    path = _save(nodes, inits, tmp_path / "c.onnx", (1, 4), (1, 4), in_type=TensorProto.UINT8, ms=True)
    with pytest.raises(ModelError, match=r"c\.onnx: node 'not_const' \(Constant.*input 'x' must be a constant"):
        load_onnx(path)
    inits = {"sx": F32(0.1), "zx": np.uint8(0), "data": np.ones((2, 2), F32)}
    nodes = _qdq_prefix(inits) + [helper.make_node("Reshape", ["data", "xq"], ["y"], name="rs")]
    path = _save(nodes, inits, tmp_path / "r.onnx", (1, 4), (1, 4))
    with pytest.raises(ModelError, match=r"r\.onnx: node 'rs' \(Reshape\): input 'xq' must be a constant"):
        load_onnx(path)


def test_reshape_by_a_scalar_and_empty_weights_are_named(tmp_path):
    """Found by bench_fuzz through the catch-all of malformed nodes: now named at their cause."""
    inits = {"sx": F32(0.1), "zx": np.uint8(0), "shape": np.array(4, np.int64)}
    nodes = _qdq_prefix(inits) + [helper.make_node("Reshape", ["xd", "shape"], ["y"], name="rs")]
    path = _save(nodes, inits, tmp_path / "rs.onnx", (1, 4), (1, 4))
    with pytest.raises(ModelError, match=r"rs\.onnx: node 'rs' \(Reshape\): Reshape shape must be a 1-D integer"):
        load_onnx(path)
    inits = {}
    nodes = _qdq_matmul(inits)
    inits["w"] = np.zeros((4, 0), np.int8)
    path = _save(nodes, inits, tmp_path / "empty.onnx", (1, 4), (1, 3))
    with pytest.raises(ModelError, match=r"empty\.onnx: node 'mm' \(MatMul\): weight is empty"):
        load_onnx(path)
