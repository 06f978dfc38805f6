"""``semantics="onnxruntime"``: the executor equals onnxruntime on every integer output, bit for bit.

onnxruntime's fused integer kernels requantize in float32 (:mod:`qverify.io.ort_fusion`); under
``load_onnx(path, semantics="onnxruntime")`` the executor runs that arithmetic, so it agrees with onnxruntime on every
output of the models built here, including accumulators built to sit where the float32 and the exact requantization
part (``exact != onnxruntime == qverify-onnxruntime``). Where onnxruntime computes in float32 outside such a kernel
the import is a ModelError naming the node. Weights are 7-bit where onnxruntime's u8 x s8 kernels clip
(``ort_u8s8_saturates``), as in ``tests/test_io_onnx.py``.
"""

from __future__ import annotations

import zlib
from fractions import Fraction

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper  # noqa: E402

from qverify.execute import forward  # noqa: E402
from qverify.io import load_model, save_model  # noqa: E402
from qverify.io.onnx import load_onnx, onnx_integer_outputs, ort_u8s8_saturates  # noqa: E402
from qverify.io.ort_fusion import fused_kernels, kernel_multiplier  # noqa: E402
from qverify.network import ModelError, Requantize  # noqa: E402
from tests.test_io_onnx import _grid, _quantize, _save, _torch_export, models, qdq_matmul_chain  # noqa: E402, F401

F32 = np.float32
#: weights magnitude bound: 7-bit where onnxruntime's u8 x s8 kernels clip pairs of products
WMAX = 64 if ort_u8s8_saturates() else 127

ALL_MODELS = ["mlp-QDQ-per_tensor", "mlp-QDQ-per_channel", "mlp-QOperator-per_tensor", "mlp-QOperator-per_channel",
              "mlp-QOperator-u8weights", "mlp-QDQ-s8act", "cnn-QDQ-per_tensor", "cnn-QDQ-per_channel",
              "cnn-QOperator-per_tensor", "cnn-QOperator-per_channel", "cnn-QOperator-u8weights", "cnn-QDQ-s8act"]


def _both(path, n=3000, seed=0):
    """(exact net, onnxruntime net, grid inputs, onnxruntime's outputs)."""
    ne, no = load_onnx(path), load_onnx(path, semantics="onnxruntime")
    x = _grid(no, n, seed=seed)
    return ne, no, x, onnx_integer_outputs(no, x, "all")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_quantize_static_models_equal_onnxruntime(models, name):  # noqa: F811
    """QDQ (fused by onnxruntime) and QOperator, per-tensor and per-channel, MatMul/Gemm/Conv: every output equals
    onnxruntime's, and every requantization is the float32 one of the kernel onnxruntime runs."""
    path = models[name]
    ne, no, x, theirs = _both(path, 4000, seed=zlib.crc32(name.encode()))
    assert no.metadata["semantics"] == "onnxruntime" and ne.metadata["semantics"] == "exact"
    assert no.semantics == "onnxruntime" and ne.semantics == "exact"
    rq = [layer for layer in no.layers if isinstance(layer, Requantize)]
    assert rq and all(layer.float32_scale is not None for layer in rq)
    np.testing.assert_array_equal(forward(no, x), theirs)
    # the same integer layers as the exact import, only the requantization arithmetic differs
    for a, b in zip(ne.layers, no.layers, strict=True):
        assert type(a) is type(b)
        if isinstance(a, Requantize):
            assert (a.lo, a.hi) == (b.lo, b.hi) and np.array_equal(a.zero_point, b.zero_point)
            ma, mb = a.multipliers(), b.multipliers()
            n = max(len(ma), len(mb))
            ma, mb = ma * (n // len(ma)), mb * (n // len(mb))
            assert all(abs(float(u / v) - 1) < 2**-21 for u, v in zip(ma, mb, strict=True))  # float32 error only


@pytest.mark.parametrize("name", ["matmul_add-QDQ-QUInt8", "matmul_add-QOperator-QUInt8", "matmul_add-QDQ-QInt8"])
def test_add_of_a_constant_is_refused_by_name(models, name):  # noqa: F811
    """QLinearAdd (and the unfused float Add of the int8 QDQ graph) are not modelled: a ModelError names the node."""
    with pytest.raises(ModelError, match=r"semantics='onnxruntime': node 'add1.*QLinearAdd"):
        load_onnx(models[name], semantics="onnxruntime")
    load_onnx(models[name])  # the exact semantics still imports it


def test_16_bit_activations_run_in_float32_and_are_refused(tmp_path):
    """onnxruntime has no 16-bit fused kernel: the QDQ graph runs as float32 Gemm between DequantizeLinear and
    QuantizeLinear (an order-dependent float sum), so the onnxruntime semantics refuses it and names the node."""
    src, shape = _torch_export("mlp", tmp_path / "mlp.onnx")
    q = _quantize(src, tmp_path / "mlp16.onnx", shape, "QDQ", True, act="QUInt16")
    with pytest.raises(ModelError, match=r"mlp16\.onnx.*semantics='onnxruntime'.*'/0/Gemm'.*float32"):
        load_onnx(q, semantics="onnxruntime")
    assert load_onnx(q).semantics == "exact"


def _qlinear_matmul(path, w, sa, sb, sy, za=0, zy=0):
    inits = {"sa": F32(sa), "za": np.uint8(za), "w": w.astype(np.int8), "sb": np.asarray(sb, dtype=F32),
             "zb": np.zeros(np.shape(sb), dtype=np.int8) if np.ndim(sb) else np.int8(0), "sy": F32(sy),
             "zy": np.uint8(zy)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="q_in"),
             helper.make_node("QLinearMatMul", ["xq", "sa", "za", "w", "sb", "zb", "sy", "zy"], ["yq"], name="qmm"),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dq_out")]
    return _save(nodes, inits, path, ("N", w.shape[0]), ("N", w.shape[1]))


def test_the_issues_near_tie_accumulator(tmp_path):
    """acc = 93843 with an exact product just above 138.5 (exact rounding: 139) where float32 computes exactly 138.5
    (half to even: 138): exact != onnxruntime == qverify under semantics='onnxruntime'."""
    acc = 93843
    sa, sb = F32(0.02), F32(0.01)
    sy = F32(F32(sa * sb) * acc / F32(138.5))
    found = None
    for _ in range(4000):  # walk the float32 output scales near the tie
        exact = Fraction(acc) * Fraction(float(sa)) * Fraction(float(sb)) / Fraction(float(sy))
        m32 = (sa * sb) / sy
        f32 = F32(F32(acc) * m32)
        if Fraction(277, 2) < exact < Fraction(277, 2) + Fraction(1, 10**4) and f32 <= F32(138.5):
            found = sy
            break
        sy = np.nextafter(sy, F32(0)) if exact <= Fraction(277, 2) else np.nextafter(sy, F32(1))
    assert found is not None
    w = np.array([[WMAX]] * 6 + [[1]])
    s6, r = divmod(acc, WMAX)  # acc = WMAX * (x_0 + ... + x_5) + x_6
    xs = np.array([[min(255, max(0, s6 - 255 * k)) for k in range(6)] + [r]])
    assert int((xs @ w)[0, 0]) == acc and xs.max() <= 255
    path = _qlinear_matmul(tmp_path / "tie.onnx", w, sa, sb, found)
    ne, no = load_onnx(path), load_onnx(path, semantics="onnxruntime")
    theirs = onnx_integer_outputs(no, xs)
    assert int(forward(ne, xs)[0, 0]) == 139
    assert int(theirs[0, 0]) == 138 == int(forward(no, xs)[0, 0])


def test_constructed_near_ties_vanish(tmp_path):
    """A QLinearMatMul whose exact multiplier is 1/2 + 2^-27 and float32 multiplier exactly 1/2: every odd
    accumulator is a near-tie the exact semantics rounds up and onnxruntime to even."""
    sa, sb = F32(0.1), F32(0.3)
    sy = F32(sa * sb) * F32(2)
    w = np.random.default_rng(5).integers(-1, 2, size=(3, 4))
    path = _qlinear_matmul(tmp_path / "ties.onnx", w, sa, sb, sy, zy=128)
    ne, no, x, theirs = _both(path, 3000, seed=1)
    assert no.layers[1].float32_scale == (0.5,)
    assert int(np.count_nonzero(forward(ne, x) != theirs)) > 100
    np.testing.assert_array_equal(forward(no, x), theirs)


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_matmul_with_decimal_scales(tmp_path, per_channel):
    """``DQ -> MatMul -> Q`` (onnxruntime fuses it into QLinearMatMul) with decimal scales ``s_x = 0.02``,
    ``s_w = 0.01`` and ``s_y = fl32(s_x s_w) 64``: the float32 multiplier is exactly 1/64, the exact one is 1/64 times
    ``s_x s_w / fl32(s_x s_w) != 1``, so every accumulator ``= 32 (mod 64)`` is a tie for onnxruntime (to even) and
    not for the exact semantics. The exact semantics parts from onnxruntime there; the onnxruntime semantics does
    not, per tensor and per channel."""
    rng = np.random.default_rng(9)
    n_in, n_out = 16, 8
    sx = F32(0.02)
    sw0 = F32(0.01)
    sy = F32(F32(sx * sw0) * F32(64))
    assert (sx * sw0) / sy == F32(1 / 64) and Fraction(float(sx)) * Fraction(float(sw0)) / Fraction(float(sy)) != \
        Fraction(1, 64)
    sw = np.array([sw0 if k % 2 == 0 else F32(0.01 * (1 + k % 3)) for k in range(n_out)], dtype=F32) \
        if per_channel else sw0
    inits = {"sx": sx, "zx": np.uint8(3), "w": rng.integers(-2, 3, size=(n_in, n_out)).astype(np.int8),
             "sw": sw, "zw": np.zeros(n_out, np.int8) if per_channel else np.int8(0), "sy": sy,
             "zy": np.uint8(128)}
    path = _save(qdq_matmul_chain(), inits, tmp_path / "mm.onnx", ("N", n_in), ("N", n_out))
    assert fused_kernels(path)["w"].op_type == "QLinearMatMul"
    ne, no, x, theirs = _both(path, 6000, seed=4)
    np.testing.assert_array_equal(forward(no, x), theirs)
    n_exact = int(np.count_nonzero(forward(ne, x) != theirs))
    assert n_exact > 0
    MEASURED[f"QDQ MatMul decimal scales per_channel={per_channel}"] = (
        f"exact semantics differs on {n_exact} of {theirs.size}; onnxruntime on 0")


def _random_scales(rng, n):
    return [F32(rng.uniform(0.002, 0.05)) for _ in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_per_channel_qgemm_with_alpha_and_qlinearconv(tmp_path, seed):
    """Random float32 scales (per channel), QGemm with alpha != 1 (``fl32(fl32(fl32(alpha s_x) s_w) / s_y)``) and
    a QLinearConv with an int32 bias: equal to onnxruntime on every output; the exact semantics parts from it."""
    rng = np.random.default_rng(seed)
    sx, sh, sy = (F32(v) for v in rng.uniform(0.005, 0.05, size=3))
    c, k = 6, 3
    wc = rng.integers(-WMAX, WMAX + 1, size=(c, 2, k, k)).astype(np.int8)
    swc = np.array(_random_scales(rng, c), dtype=F32)
    bc = rng.integers(-20000, 20000, size=c).astype(np.int32)
    n_flat = c * 4 * 4
    wg = rng.integers(-WMAX, WMAX + 1, size=(5, n_flat)).astype(np.int8)
    swg = np.array(_random_scales(rng, 5), dtype=F32)
    alpha = float(F32(rng.uniform(0.3, 3.0)))
    inits = {"sx": sx, "zx": np.uint8(rng.integers(0, 256)), "wc": wc, "swc": swc, "zwc": np.zeros(c, np.int8),
             "bc": bc, "sh": sh, "zh": np.uint8(rng.integers(0, 40)), "shape": np.array([-1, n_flat], np.int64),
             "wg": wg, "swg": swg, "zwg": np.zeros(5, np.int8), "sy": sy, "zy": np.uint8(128)}
    # scale the output scales so the outputs use their range (the accumulators reach ~10^5)
    inits["sh"] = F32(sh * 40)
    inits["sy"] = F32(sy * 40)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("QLinearConv", ["xq", "sx", "zx", "wc", "swc", "zwc", "sh", "zh", "bc"], ["h"],
                              name="qconv", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Reshape", ["h", "shape"], ["hf"], name="flat"),
             helper.make_node("QGemm", ["hf", "sh", "zh", "wg", "swg", "zwg", "", "sy", "zy"], ["yq"],
                              name="qgemm", domain="com.microsoft", transB=1, alpha=alpha),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dq_out")]
    path = _save(nodes, inits, tmp_path / f"cg{seed}.onnx", ("N", 2, 8, 8), ("N", 5), ms=True)
    ne, no, x, theirs = _both(path, 3000, seed=seed)
    np.testing.assert_array_equal(forward(no, x), theirs)
    assert len(np.unique(theirs)) > 20  # the outputs use their range (not saturated)
    kern = fused_kernels(path)
    assert set(kern) == {"wc", "wg"} and kern["wg"].op_type == "QGemm"
    m = kernel_multiplier("QGemm", inits["sh"], swg, inits["sy"], alpha)
    assert no.layers[-1].float32_scale == tuple(float(v) for v in m)
    assert kern["wc"].bias == "bc"
    n_exact = int(np.count_nonzero(forward(ne, x) != theirs))
    MEASURED[f"qconv+qgemm seed {seed}"] = f"exact semantics differs on {n_exact} of {theirs.size}; onnxruntime on 0"


MEASURED: dict[str, str] = {}


def _qdq_gemm(path, bias_scale_factor):
    rng = np.random.default_rng(0)
    sx, sw, sy = F32(0.02), F32(0.01), F32(0.05)
    inits = {"sx": sx, "zx": np.uint8(128), "W": rng.integers(-WMAX, WMAX, size=(6, 8)).astype(np.int8),
             "sw": sw, "zw": np.int8(0), "b": rng.integers(-3000, 3000, size=6).astype(np.int32),
             "sb": F32(sx * sw * F32(bias_scale_factor)), "zb": np.int32(0), "sy": sy, "zy": np.uint8(100)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["W", "sw", "zw"], ["Wd"], name="dqw"),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], name="dqb"),
             helper.make_node("Gemm", ["xd", "Wd", "bd"], ["g"], name="gemm", transB=1),
             helper.make_node("QuantizeLinear", ["g", "sy", "zy"], ["yq"], name="qy"),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dqy")]
    return _save(nodes, inits, path, ("N", 8), ("N", 6))


def test_fused_bias_is_added_as_its_int32_values(tmp_path):
    """onnxruntime's QDQ fusion passes a DequantizeLinear int32 bias to QGemm as it is, whatever its scale: with a
    bias scale of 2 s_x s_w the exact semantics (which rounds the real bias into accumulator units) parts from
    onnxruntime everywhere, the onnxruntime semantics nowhere."""
    ne, no, x, theirs = _both(_qdq_gemm(tmp_path / "gb.onnx", 2.0), 1000)
    np.testing.assert_array_equal(forward(no, x), theirs)
    assert np.count_nonzero(forward(ne, x) != theirs) > 500


def test_float_accumulator_output_is_refused(tmp_path):
    inits = {"sx": F32(0.013), "zx": np.uint8(9), "w": np.ones((5, 7), np.int8), "sw": F32(0.021),
             "zw": np.int8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("QGemm", ["xq", "sx", "zx", "w", "sw", "zw"], ["y"], name="qgemm",
                              domain="com.microsoft", transB=1)]
    path = _save(nodes, inits, tmp_path / "qf.onnx", ("N", 7), ("N", 5), ms=True)
    with pytest.raises(ModelError, match="semantics='onnxruntime': the graph output is a float accumulator"):
        load_onnx(path, semantics="onnxruntime")


def test_int32_overflow_of_the_worst_case_is_refused(tmp_path):
    k = 70_000  # 255 * 127 * k > 2^31
    path = _qlinear_matmul(tmp_path / "wide.onnx", np.full((k, 1), 127), 0.02, 0.01, 0.5)
    with pytest.raises(ModelError, match="int32"):
        load_onnx(path, semantics="onnxruntime")


def test_round_trip_and_load_model(tmp_path, models):  # noqa: F811
    path = models["cnn-QOperator-per_channel"]
    no = load_model(path, semantics="onnxruntime")
    assert no.semantics == "onnxruntime"
    save_model(no, tmp_path / "m.qnn")
    back = load_model(tmp_path / "m.qnn")
    assert back.semantics == "onnxruntime"
    x = _grid(no, 500, seed=3)
    np.testing.assert_array_equal(forward(back, x), onnx_integer_outputs(no, x))
    with pytest.raises(ModelError, match="unknown semantics 'tflite'"):
        load_model(path, semantics="tflite")
    with pytest.raises(ValueError, match="semantics must be one of"):
        load_onnx(path, semantics="tflite")


def test_report():
    for k, v in MEASURED.items():
        print(f"{k}: {v}")


def test_float_bias_is_refused(tmp_path):
    """A float bias after a QDQ MatMul is no input of an integer kernel: refused under onnxruntime's semantics."""
    rng = np.random.default_rng(2)
    inits = {"sx": F32(0.02), "zx": np.uint8(0), "w": rng.integers(-5, 5, size=(4, 3)).astype(np.int8),
             "sw": F32(0.01), "zw": np.int8(0), "c": rng.normal(size=3).astype(F32), "sy": F32(0.05),
             "zy": np.uint8(128)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_in"),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w"),
             helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "c"], ["a"], name="add_float_bias"),
             helper.make_node("QuantizeLinear", ["a", "sy", "zy"], ["aq"], name="q_a"),
             helper.make_node("DequantizeLinear", ["aq", "sy", "zy"], ["y"], name="dq_out")]
    path = _save(nodes, inits, tmp_path / "fb.onnx", ("N", 4), ("N", 3))
    load_onnx(path)
    with pytest.raises(ModelError, match=r"semantics='onnxruntime': onnxruntime does not run node 'mm'"):
        load_onnx(path, semantics="onnxruntime")
