"""TFLite full-integer int8 import: TFLite's integer arithmetic (``qverify.quant``'s TFLite section) against
independent reasoning and against ai-edge-litert's reference kernels, and every integer output of the executor
against the interpreter on MNIST images and random grid points, op by op and in combination.

The semantics is TFLite's reference kernels (``OpResolverType.BUILTIN_REF``). The optimized builtin kernels and the
default XNNPACK delegate compute other functions at near-ties; ``test_optimized_kernels_differ_at_ties`` pins the
measured difference of the optimized CONV_2D (its rounding right shift rounds half up, not half away).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tflite")
pytest.importorskip("ai_edge_litert")

from qverify.execute import forward  # noqa: E402
from qverify.io.models import load_model  # noqa: E402
from qverify.io.tflite import load_tflite, tflite_integer_outputs  # noqa: E402
from qverify.network import ModelError, Step  # noqa: E402
from qverify.quant import (  # noqa: E402
    tflite_activation_range,
    tflite_add,
    tflite_avgpool_round,
    tflite_conv_multiplier,
    tflite_fc_reference_requantize,
    tflite_multiply_by_quantized_multiplier,
    tflite_quantize_multiplier,
    tflite_requantize,
    tflite_rounding_divide_by_pot,
    tflite_srdhm,
)
from tests.tflite_builders import TFLiteBuilder, mnist_cnn, residual_block  # noqa: E402

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_test_first1000.npz"
if not MNIST.exists():
    MNIST = Path("/work/shared/data/mnist_test_first1000.npz")


def mnist_int8(n: int = 1000) -> np.ndarray:
    """MNIST test images as the int8 input of a model with scale 1/255 and zero point -128: ``q = pixel - 128``."""
    if not MNIST.exists():
        pytest.skip("MNIST test images not available")
    with np.load(MNIST) as d:
        img = d["images"][:n].astype(np.int64)
    return (img - 128)[..., None]


def _half_up(x: Fraction) -> int:
    return int((x + Fraction(1, 2)).__floor__())


def _half_away(x: Fraction) -> int:
    return _half_up(x) if x >= 0 else -_half_up(-x)


def _c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


# ============================================================================================ arithmetic
def test_quantize_multiplier_independent() -> None:
    assert tflite_quantize_multiplier(0.5) == (2**30, 0)
    assert tflite_quantize_multiplier(1.0) == (2**30, 1)
    assert tflite_quantize_multiplier(0.25) == (2**30, -1)
    assert tflite_quantize_multiplier(0.0) == (0, 0)
    assert tflite_quantize_multiplier(2.0**-40) == (0, 0)  # shift < -31 flushes to zero
    assert tflite_quantize_multiplier(1 - 2.0**-40) == (2**30, 1)  # q 2^31 rounds to 2^31: halved, shift + 1
    rng = np.random.default_rng(0)
    for real in np.exp(rng.uniform(np.log(1e-6), np.log(100.0), 300)):
        m, s = tflite_quantize_multiplier(float(real))
        assert 2**30 <= m < 2**31
        # the nearest 31-bit significand: |real - m 2^(s-31)| <= 2^(s-32), and real in [2^(s-1), 2^s)
        assert abs(Fraction(float(real)) - Fraction(m) * Fraction(2) ** (s - 31)) <= Fraction(2) ** (s - 32)
        assert Fraction(2) ** (s - 1) <= Fraction(float(real)) < Fraction(2) ** s


def test_srdhm_and_rounding_shift_independent() -> None:
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.integers(-(2**31), 2**31, 3000), [-(2**31), 2**31 - 1, 0, 1, -1, -3, 3]])
    b = np.concatenate([rng.integers(0, 2**31, 3000), [-(2**31), 2**31 - 1, 2**30, 2**30, 2**30, 2**30, 2**30]])
    got = tflite_srdhm(a, b)
    for ai, bi, g in zip(a.tolist(), b.tolist(), got.tolist(), strict=True):
        if ai == bi == -(2**31):
            assert g == 2**31 - 1
            continue
        ab = ai * bi  # gemmlowp's C: (ab + nudge) / 2^31, truncated, nudge by the sign of ab
        nudge = 2**30 if ab >= 0 else 1 - 2**30
        assert g == _c_div(ab + nudge, 2**31) == _half_up(Fraction(ab, 2**31))
    x = rng.integers(-(2**31), 2**31, 2000)
    for e in (0, 1, 2, 5, 17, 31):
        got = tflite_rounding_divide_by_pot(x, e)
        assert got.tolist() == [_half_away(Fraction(int(v), 2**e)) for v in x]


def test_mbqm_is_two_roundings() -> None:
    """``MBQM(x, M, s)`` = half-away(half-up(x 2^max(s,0) M / 2^31) / 2^max(-s,0)), and non-decreasing in ``x``."""
    rng = np.random.default_rng(2)
    for _ in range(20):
        m, s = tflite_quantize_multiplier(float(np.exp(rng.uniform(np.log(1e-5), np.log(0.9)))))
        x = np.sort(rng.integers(-(2**24), 2**24, 400))
        got = tflite_multiply_by_quantized_multiplier(x, m, s)
        want = [_half_away(Fraction(_half_up(Fraction(int(v) * m, 2**31)), 2 ** max(-s, 0))) for v in x]
        assert got.tolist() == want
        assert np.all(np.diff(got) >= 0)
    # a left shift (multiplier >= 1) multiplies first, in int32
    assert tflite_multiply_by_quantized_multiplier(np.array([3]), 2**30, 2).tolist() == [6]


def test_avgpool_round_and_activation_range_independent() -> None:
    s = np.arange(-300, 301)
    for n in (1, 2, 3, 4, 6, 9):
        assert tflite_avgpool_round(s, n).tolist() == [_half_away(Fraction(int(v), n)) for v in s]
    assert tflite_activation_range("relu", 0.05, -20, -128, 127) == (-20, 127)
    assert tflite_activation_range("relu6", 0.05, -20, -128, 127) == (-20, 100)  # -20 + round(6 / 0.05)
    assert tflite_activation_range("relu6", 0.01, 0, -128, 127) == (0, 127)
    assert tflite_activation_range("none", 0.05, 3, -128, 127) == (-128, 127)


def _tie_model(kind: str, s_out: float, act: str = "none") -> tuple[bytes, np.ndarray, np.ndarray]:
    """A one-op model whose accumulators are ``x + bias_c`` for every int8 ``x``: ``s_x = s_w = 1``, weight 1,
    so the real multiplier is ``1 / s_out`` (exact ties for ``s_out`` = 2, 4, ...)."""
    b = TFLiteBuilder()
    bias = np.array([0, 256, -256, 77, -1000, 1001])
    if kind == "fc":
        x = b.input((1, 1), 1.0, 0)
        y = b.fully_connected(x, np.ones((6, 1)), bias, [1.0] * 6, s_out, 3, act)
    elif kind == "fc_tensor":
        x = b.input((1, 1), 1.0, 0)
        y = b.fully_connected(x, np.ones((6, 1)), bias, 1.0, s_out, 3, act)
    elif kind == "conv":
        x = b.input((1, 1, 1, 1), 1.0, 0)
        y = b.conv(x, np.ones((6, 1, 1, 1)), bias, [1.0] * 6, s_out, 3, act=act)
    else:
        x = b.input((1, 1, 1, 1), 1.0, 0)
        y = b.depthwise(x, np.ones((1, 1, 1, 6)), bias, [1.0] * 6, s_out, 3, act=act, depth_multiplier=6)
    xs = np.arange(-128, 128)
    return b.finish([y]), xs, xs[:, None] + bias[None, :]


@pytest.mark.parametrize("s_out", [4.0, 3.0, 2.5, 0.37, 1 / 1024, 0.011])
def test_requantization_against_interpreter_near_ties(tmp_path: Path, s_out: float) -> None:
    """CONV_2D / DEPTHWISE_CONV_2D: ``clamp(MBQM(acc) + z)``; FULLY_CONNECTED (reference): ``clamp(round(acc e) +
    z)``; bit for bit on accumulators that hit ties of ``acc / s_out`` exactly."""
    m, s = tflite_quantize_multiplier(tflite_conv_multiplier(1.0, 1.0, s_out))
    for kind in ("conv", "depthwise", "fc", "fc_tensor"):
        for act in ("none", "relu"):
            model, xs, acc = _tie_model(kind, s_out, act)
            p = tmp_path / f"{kind}.tflite"
            p.write_bytes(model)
            lo, hi = tflite_activation_range(act, s_out, 3, -128, 127)
            if kind.startswith("fc"):
                want = tflite_fc_reference_requantize(acc, tflite_conv_multiplier(1.0, 1.0, s_out), 3, lo, hi)
            else:
                want = tflite_requantize(acc, m, s, 3, lo, hi)
            got = tflite_integer_outputs(p, xs.reshape(-1, *([1] * (3 if kind in ("conv", "depthwise") else 1))))
            assert np.array_equal(got, want), (kind, act, int((got != want).sum()))
            # and the importer's Step is the same function
            net = load_tflite(p)
            assert np.array_equal(forward(net, xs.reshape(len(xs), *net.input_shape)), want)


def test_optimized_kernels_differ_at_ties(tmp_path: Path) -> None:
    """A measured divergence, not qverify's semantics: the optimized CONV_2D (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``)
    rounds its final right shift half *up* (``floor(SRDHM / 2^e + 1/2)``), where the reference kernel's gemmlowp
    ``RoundingDivideByPOT`` rounds half away from zero: they differ exactly at negative ties."""
    model, xs, acc = _tie_model("conv", 4.0)
    p = tmp_path / "conv.tflite"
    p.write_bytes(model)
    m, s = tflite_quantize_multiplier(0.25)
    a = tflite_srdhm(acc, m)
    half_up = np.clip(((a + 1) >> 1) + 3, -128, 127)
    opt = tflite_integer_outputs(p, xs.reshape(-1, 1, 1, 1), "builtin")
    ref = tflite_integer_outputs(p, xs.reshape(-1, 1, 1, 1), "reference")
    assert np.array_equal(opt, half_up)
    assert not np.array_equal(opt, ref)
    assert np.array_equal(ref, tflite_requantize(acc, m, s, 3, -128, 127))


@pytest.mark.parametrize("scales", [(0.05, 0.05, 0.1), (0.05, 0.031, 0.07), (0.02, 0.09, 0.01), (0.1, 0.1, 0.1),
                                    (0.0123, 0.0456, 0.0789)])
def test_add_against_interpreter_all_pairs(tmp_path: Path, scales: tuple[float, float, float]) -> None:
    """TFLite's int8 ADD on all 65536 pairs of inputs (a two-input model), with fused RELU too."""
    s1, s2, so = scales
    g = np.arange(-128, 128)
    a, b_ = np.meshgrid(g, g, indexing="ij")
    for act in ("none", "relu"):
        bld = TFLiteBuilder()
        x1 = bld.input((1, 256, 256, 1), s1, 5)
        x2 = bld.input((1, 256, 256, 1), s2, -7)
        y = bld.add(x1, x2, so, -3, act)
        p = tmp_path / "add.tflite"
        p.write_bytes(bld.finish([y]))
        from qverify.io.tflite import tflite_interpreter

        it = tflite_interpreter(p)
        ins = it.get_input_details()
        it.set_tensor(ins[0]["index"], a.astype(np.int8)[None, ..., None])
        it.set_tensor(ins[1]["index"], b_.astype(np.int8)[None, ..., None])
        it.invoke()
        got = it.get_tensor(it.get_output_details()[0]["index"])[0, ..., 0].astype(np.int64)
        lo, hi = tflite_activation_range(act, so, -3, -128, 127)
        assert np.array_equal(got, tflite_add(a, b_, s1, 5, s2, -7, so, -3, lo, hi))


# ============================================================================================ importer
def _compare(p: Path, x: np.ndarray) -> tuple[int, int]:
    """(outputs compared, mismatches) of the executor against the interpreter's reference kernels."""
    net = load_tflite(p)
    y = forward(net, x.reshape(len(x), *net.input_shape))
    r = tflite_integer_outputs(p, x)
    assert r.shape == y.shape
    return int(y.size), int((y != r).sum())


def _grid(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """``n`` random points of the int8 grid, the first two its corners."""
    x = np.random.default_rng(seed).integers(-128, 128, size=(n, *shape))
    x[0], x[1] = -128, 127
    return x


def _single_op_models() -> dict[str, tuple[TFLiteBuilder, int]]:
    rng = np.random.default_rng(7)

    def w(*shape: int) -> np.ndarray:
        return rng.integers(-127, 128, size=shape)

    def bias(n: int) -> np.ndarray:
        return rng.integers(-3000, 3001, size=n)

    out: dict[str, tuple[TFLiteBuilder, int]] = {}
    for name, kw in {"conv_same_s1_relu": dict(stride=(1, 1), padding="same", act="relu"),
                     "conv_same_s2": dict(stride=(2, 2), padding="same"),
                     "conv_valid_s2_relu6": dict(stride=(2, 2), padding="valid", act="relu6"),
                     "conv_valid_dilated": dict(padding="valid", dilation=(2, 2))}.items():
        b = TFLiteBuilder()
        x = b.input((1, 9, 9, 2), 0.02, 3)
        out[name] = b, b.conv(x, w(4, 3, 3, 2), bias(4), [0.004, 0.006, 0.003, 0.01], 0.05, -7, **kw)
    b = TFLiteBuilder()
    x = b.input((1, 9, 9, 2), 0.02, 3)
    out["conv_per_tensor_multiplier_above_1"] = b, b.conv(x, w(3, 2, 2, 2), bias(3), 0.9, 0.01, 0)
    b = TFLiteBuilder()
    x = b.input((1, 7, 7, 4), 0.02, 3)
    out["conv_grouped_2"] = b, b.conv(x, w(6, 3, 3, 2), bias(6), 0.005, 0.05, -7, (1, 1), "same", "relu")
    b = TFLiteBuilder()
    x = b.input((1, 8, 8, 3), 0.03, -4)
    out["depthwise_dm2_same"] = b, b.depthwise(x, w(1, 3, 3, 6), bias(6), list(rng.uniform(0.002, 0.02, 6)), 0.04, 2,
                                               (2, 2), "same", "relu", depth_multiplier=2)
    b = TFLiteBuilder()
    x = b.input((1, 7, 7, 3), 0.03, -4)
    out["maxpool_same_relu"] = b, b.pool("max", x, (3, 3), (2, 2), "same", "relu")
    for pad in ("same", "valid"):
        b = TFLiteBuilder()
        x = b.input((1, 7, 7, 3), 0.03, -4)
        out[f"avgpool_{pad}"] = b, b.pool("avg", x, (3, 2), (2, 2), pad)
    b = TFLiteBuilder()
    x = b.input((1, 7, 7, 3), 0.03, -4)
    out["avgpool_same_s1_relu6"] = b, b.pool("avg", x, (4, 4), (1, 1), "same", "relu6")
    b = TFLiteBuilder()
    x = b.input((1, 4, 4, 2), 0.03, -4)
    r = b.reshape(x, (1, 32))
    out["reshape_fc_relu"] = b, b.fully_connected(r, w(5, 32), bias(5), 0.004, 0.05, 1, "relu")
    b = TFLiteBuilder()
    x = b.input((1, 4, 4, 2), 0.03, -4)
    out["fc_4d_input_per_channel_no_bias"] = b, b.fully_connected(x, w(5, 32), None, list(rng.uniform(.002, .01, 5)),
                                                                  0.05, 1)
    b = TFLiteBuilder()
    x = b.input((1, 6), 0.03, -4)
    out["fc_per_tensor_multiplier_above_1"] = b, b.fully_connected(x, w(4, 6), bias(4), 0.5, 0.01, 0)
    return out


@pytest.mark.parametrize("name", list(_single_op_models()))
def test_single_ops_against_interpreter(tmp_path: Path, name: str) -> None:
    b, y = _single_op_models()[name]
    p = b.save(tmp_path / f"{name}.tflite", [y])
    shape = b.shape(b.inputs[0])[1:]
    n, bad = _compare(p, _grid(shape, 300, 3))
    assert n > 0 and bad == 0


@pytest.mark.parametrize("per_channel", [True, False])
def test_mnist_cnn_against_interpreter(tmp_path: Path, per_channel: bool) -> None:
    """CONV_2D(SAME) -> CONV_2D(VALID, stride 2) -> MAX_POOL_2D -> DEPTHWISE_CONV_2D(SAME, RELU6) ->
    AVERAGE_POOL_2D -> RESHAPE -> FULLY_CONNECTED on the 1000 MNIST test images and 200 random grid points."""
    b = mnist_cnn(seed=1, per_channel=per_channel)
    p = b.save(tmp_path / "cnn.tflite", [len(b.tensors) - 1])
    net = load_model(p)
    assert net.metadata["format"] == "tflite" and net.input_shape == (28, 28, 1)
    assert sum(isinstance(layer, Step) for layer in net.layers) == 5
    x = np.concatenate([mnist_int8(), _grid((28, 28, 1), 200, 4)])
    n, bad = _compare(p, x)
    assert (n, bad) == (12000, 0)


@pytest.mark.parametrize(("same_scale", "add_scale"), [(False, 0.09), (True, 0.09), (True, 0.007)])
def test_residual_add_and_same_avgpool_against_interpreter(tmp_path: Path, same_scale: bool, add_scale: float
                                                           ) -> None:
    """CONV_2D -> CONV_2D + skip ADD (RELU) -> AVERAGE_POOL_2D(SAME, border counts 9/6/4) -> RESHAPE -> FC.
    ``same_scale``: the ADD's input scales are equal, so it is one integer Add; otherwise the smaller-scale input's
    rescaling is its own Step first."""
    b = residual_block(seed=2, hw=12, same_scale=same_scale, add_scale=add_scale)
    p = b.save(tmp_path / "res.tflite", [len(b.tensors) - 1])
    net = load_tflite(p)
    assert sum(type(layer).__name__ == "Add" for layer in net.layers) == 1
    mn = mnist_int8(300)[:, 8:20, 8:20, :]
    n, bad = _compare(p, np.concatenate([mn, _grid((12, 12, 1), 200, 5)]))
    assert n == 5000 and bad == 0


# ============================================================================================ refusals
def test_unsupported_op_is_located(tmp_path: Path) -> None:
    b = TFLiteBuilder()
    x = b.input((1, 4, 4, 1), 0.02, 0)
    c = b.conv(x, np.ones((2, 1, 1, 1)), np.zeros(2), 0.01, 0.05, 0)
    y = b.unary("TANH", c, 1 / 128, 0)
    p = b.save(tmp_path / "tanh.tflite", [y])
    with pytest.raises(ModelError) as e:
        load_tflite(p)
    msg = str(e.value)
    assert "tanh.tflite" in msg and "operator 1" in msg and "TANH" in msg and "not supported" in msg


def test_float_input_and_bad_files_refused(tmp_path: Path) -> None:
    b = TFLiteBuilder()
    x = b.input((1, 4), 1.0, 0, dtype="float32")
    y = b.fully_connected(x, np.ones((2, 4)), None, 0.01, 0.05, 0)
    p = b.save(tmp_path / "float.tflite", [y])
    with pytest.raises(ModelError, match="FLOAT32: not a full-integer int8 model"):
        load_tflite(p)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        load_model(bad)
    with pytest.raises(ModelError, match="no such file"):
        load_tflite(tmp_path / "missing.tflite")


def test_uint8_and_per_channel_fc_above_one_refused(tmp_path: Path) -> None:
    b = TFLiteBuilder()
    x = b.input((1, 4), 0.02, 128, dtype="uint8")
    p = b.save(tmp_path / "u8.tflite", [b.fully_connected(x, np.ones((2, 4)), None, 0.01, 0.05, 0)])
    with pytest.raises(ModelError, match="UINT8: legacy uint8 models are not supported"):
        load_tflite(p)
    b = TFLiteBuilder()
    x = b.input((1, 6), 0.03, -4)
    y = b.fully_connected(x, np.arange(12).reshape(2, 6) - 5, None, [0.5, 0.7], 0.01, 0)
    p = b.save(tmp_path / "fc.tflite", [y])
    with pytest.raises(ModelError, match=r"operator 0 \(FULLY_CONNECTED.*multiplier >= 1"):
        load_tflite(p)


def test_broadcast_add_refused(tmp_path: Path) -> None:
    b = TFLiteBuilder()
    x = b.input((1, 4, 4, 2), 0.02, 0)
    c = b.conv(x, np.ones((2, 1, 1, 2)), np.zeros(2), 0.01, 0.05, 0)
    p1 = b.pool("max", c, (2, 2), (2, 2))
    y = b.add(c, p1, 0.05, 0)
    p = b.save(tmp_path / "bcast.tflite", [y])
    with pytest.raises(ModelError, match=r"operator 2 \(ADD.*broadcasting ADD"):
        load_tflite(p)


# ============================================================================================ verification
def test_verify_small_tflite_model(tmp_path: Path) -> None:
    """``verify`` on a small TFLite CNN: the verdict is robust, or a counterexample that replays on the executor
    and on the interpreter's reference kernels."""
    from qverify.property import robustness_property
    from qverify.replay import runtime_for
    from qverify.result import Verdict
    from qverify.settings import VerifySettings
    from qverify.verify import verify

    rng = np.random.default_rng(11)
    b = TFLiteBuilder()
    x = b.input((1, 6, 6, 1), 1 / 255, -128)
    c = b.conv(x, rng.integers(-127, 128, (3, 3, 3, 1)), rng.integers(-500, 500, 3), [0.01, 0.012, 0.009], 0.04,
               -10, (2, 2), "same", "relu")
    r = b.reshape(c, (1, 27))
    y = b.fully_connected(r, rng.integers(-127, 128, (3, 27)), rng.integers(-500, 500, 3), 0.004, 0.1, 0)
    p = b.save(tmp_path / "small.tflite", [y])
    net = load_model(p)
    assert runtime_for(net) is not None
    seen = set()
    for i in range(6):
        x0 = mnist_int8(6)[i, 11:17, 11:17, 0].reshape(-1)
        label = int(np.argmax(forward(net, x0[None])[0]))
        res = verify(net, robustness_property(net, x0, label, radius=3 if i % 2 else 40),
                     VerifySettings(timeout=20.0))
        seen.add(res.verdict)
        assert res.verdict in (Verdict.ROBUST, Verdict.COUNTEREXAMPLE), res
        if res.verdict is Verdict.COUNTEREXAMPLE:
            cx = res.counterexample
            assert cx is not None and cx.confirmed
            assert cx.onnx_confirmed is True, cx.note  # the runtime replay: the reference kernels agree
            out = forward(net, np.asarray(cx.x).reshape(1, *net.input_shape))
            assert np.array_equal(out[0], np.ravel(cx.y))
            assert int(np.argmax(out[0])) != label or np.sum(out[0] == out[0].max()) > 1
            assert np.array_equal(tflite_integer_outputs(p, np.asarray(cx.x).reshape(1, 6, 6, 1)), out)
    print(sorted(v.value for v in seen))
    assert seen  # each verdict was checked above


@pytest.mark.parametrize(("same_scale", "add_scale"), [(False, 0.09), (True, 0.09), (True, 0.007), (False, 0.007)])
def test_add_nodes_equal_tflite_add_on_all_pairs(tmp_path: Path, same_scale: bool, add_scale: float) -> None:
    """The imported ADD (optional rescaling Step, integer Add, output Step) is TFLite's ADD on every pair of the
    values its inputs can take; ``add_scale`` 0.007 makes the output step jump over levels."""
    from qverify.execute import apply_layer
    from qverify.io.tflite import _Importer

    b = residual_block(seed=3, hw=6, same_scale=same_scale, add_scale=add_scale)
    p = b.save(tmp_path / "res.tflite", [len(b.tensors) - 1])
    imp = _Importer(p, p.read_bytes())
    net = imp.run()
    add_op = next(op for op in b.ops if op.op == "ADD")
    (ta, tb), ty = add_op.inputs, add_op.outputs[0]
    va, vb, vy = imp.vals[ta], imp.vals[tb], imp.vals[ty]
    i_add = next(i for i, layer in enumerate(net.layers) if type(layer).__name__ == "Add")
    rescales = [layer for layer in net.layers if isinstance(layer, Step) and "rescale" in layer.name]
    assert bool(rescales) != same_scale
    ga, gb = np.meshgrid(np.arange(va.lo, va.hi + 1), np.arange(vb.lo, vb.hi + 1), indexing="ij")
    xa, xb = ga.reshape(1, 1, -1, 1), gb.reshape(1, 1, -1, 1)  # [B=1, C=1, H, W]: one channel of pairs
    by_pos = {va.pos: xa, vb.pos: xb}
    srcs = []
    for j in net.node_inputs(i_add):
        if j in by_pos:
            srcs.append(by_pos[j])
        else:  # a rescaling Step of one of the two
            layer = net.layers[j - 1]
            srcs.append(apply_layer(layer, by_pos[net.node_inputs(j - 1)[0]]))
    y = apply_layer(net.layers[i_add + 1], apply_layer(net.layers[i_add], srcs))
    lo, hi = vy.lo, vy.hi
    want = tflite_add(xa, xb, va.scale, va.zero_point, vb.scale, vb.zero_point, vy.scale, vy.zero_point, lo, hi)
    assert np.array_equal(y, want)


def test_native_round_trip_keeps_the_function(tmp_path: Path) -> None:
    from qverify.io.models import save_model

    b = residual_block(seed=4, hw=6)
    p = b.save(tmp_path / "res.tflite", [len(b.tensors) - 1])
    net = load_tflite(p)
    save_model(net, tmp_path / "res.qnn")
    back = load_model(tmp_path / "res.qnn")
    x = _grid(net.input_shape, 100, 9)
    assert np.array_equal(forward(back, x), forward(net, x))
    assert back.metadata["format"] == "tflite"


def test_random_models_against_interpreter(tmp_path: Path) -> None:
    """60 random small CNNs over every supported operator (random sizes, paddings, strides, dilations, scales with
    multipliers above and below 1, activations, residual adds): every output equal to the reference kernels'."""
    from tests.tflite_builders import random_model

    total = 0
    for seed in range(60):
        b = random_model(seed)
        p = b.save(tmp_path / f"r{seed}.tflite", [len(b.tensors) - 1])
        n, bad = _compare(p, _grid(b.shape(b.inputs[0])[1:], 100, seed))
        assert bad == 0, (seed, bad)
        total += n
    assert total == 60 * 100 * 5


def test_divergence_check_runs_the_interpreter(tmp_path: Path) -> None:
    """The runtime divergence check (qverify/divergence.py) runs a TFLite model on its registered runtime, the
    interpreter's reference kernels, over a property's box: they agree with the executor everywhere; once the file
    is gone, the check says why it was skipped."""
    from qverify.divergence import check_property, runtime_label
    from qverify.property import robustness_property

    b = mnist_cnn(seed=1, per_channel=True)
    p = b.save(tmp_path / "cnn.tflite", [len(b.tensors) - 1])
    net = load_model(p)
    x = mnist_int8(1)[0]
    prop = robustness_property(net, x, 0, radius=2)
    div = check_property(net, prop, max_points=64)
    assert runtime_label(net).startswith("ai-edge-litert") and div.checked == 64 and not div.differs
    assert "agrees with the executor" in div.message()
    p.unlink()
    assert "cannot run this model" in check_property(net, prop, max_points=8).skipped
