"""Which nodes of an ONNX graph onnxruntime runs as fused integer kernels, and the float32 multipliers they use.

``load_onnx(path, semantics="onnxruntime")`` gives each requantization the arithmetic onnxruntime's CPU kernels
perform. Those are known only for the integer kernels: ``QLinearMatMul``, ``QLinearConv`` and ``QGemm``
(com.microsoft), whether the graph holds them (QOperator form) or onnxruntime's QDQ transformer builds them from
``DequantizeLinear -> MatMul/Gemm/Conv -> QuantizeLinear`` groups (QDQ form; ``onnxruntime/core/optimizer/
qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc``, run at the *extended* graph optimization
level and above, so at the default level ``all``). The fused node keeps the name of the original compute node and
its quantized weight initializer.

The arithmetic, read from onnxruntime's source:

* the multiplier, once per tensor or per output channel ``c``, in float32 and in C++ evaluation order:
  ``QLinearMatMul`` ``m_c = fl32(fl32(s_x s_w,c) / s_y)`` (``onnxruntime/core/providers/cpu/quantization/
  quantize_linear_matmul.cc``: ``a_scale_data * b_scale_data[i] / y_scale_data``); ``QLinearConv`` the same
  (``qlinearconv.cc``: ``X_scale_value * W_scale_data[i] / Y_scale_value``); ``QGemm``
  ``m_c = fl32(fl32(fl32(alpha s_x) s_w,c) / s_y)`` (``onnxruntime/contrib_ops/cpu/quantization/quant_gemm.cc``,
  ``ComputeOutputScale``: ``alpha_ * a_scale_value * b_scale_data[i]``, then ``/= y_scale``);
* the accumulator ``acc = sum (x - z_x)(w - z_w)`` in int32 plus the int32 bias (``QLinearConv``'s ``B`` is added by
  ``MlasRequantizeOutput``'s ``Bias`` argument, ``QGemm``'s ``C`` pre-fills the int32 output that the GEMM
  accumulates into; the QDQ transformer passes the ``DequantizeLinear`` bias's int32 values as these inputs);
* the requantization, MLAS ``MlasRequantizeOutput`` (``onnxruntime/core/mlas/lib/quantize.cpp``):
  ``clamp(rne(fl32(fl32(acc) m_c)) + z_y, qmin, qmax)`` (see :mod:`qverify.quant`).

Everything else onnxruntime runs in float32 between ``DequantizeLinear`` and ``QuantizeLinear`` (16-bit activation
QDQ graphs, an ``Add`` it does not fuse, a bare ``DequantizeLinear -> QuantizeLinear`` pair with new parameters,
``BatchNormalization``, average pooling with a window) is an order-dependent float32 computation or one the graph
does not fix, and ``QLinearAdd``'s kernel (``onnxruntime/core/mlas/lib/qladd.cpp``) has a float and a fixed-point
variant chosen by the CPU: the importer refuses those under ``semantics="onnxruntime"``
(:class:`~qverify.network.ModelError` naming the node) instead of pretending to model them. Two graph kernels are
one monotone function of one integer and are modelled exactly (``encodings/graph_ops.md``, ``qverify.quant``):
``QLinearGlobalAveragePool`` (an int32 sum, then ``MlasRequantizeOutput`` with ``m = fl32(s_x / fl32(s_y
fl32(n)))``: a float32 ``Requantize``) and the per-input table ``rne(fl32(fl32(s_x (q - z_x)) / s_y)) + z_y`` of
``QLinearConcat`` and of ``DQ -> MaxPool/Reshape/Transpose/... -> Q`` with new parameters (a ``Step``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qverify.network import ModelError

#: the fused integer kernels whose float32 requantization qverify models: op type -> (x scale, w scale, y scale,
#: bias) input indices
KERNELS: dict[str, tuple[int, int, int, int | None]] = {
    "QLinearMatMul": (1, 4, 6, None),
    "QLinearConv": (1, 4, 6, 8),
    "QGemm": (1, 4, 7, 6),
}


@dataclass(frozen=True)
class FusedKernel:
    """One integer kernel of onnxruntime's optimized graph."""

    op_type: str
    name: str
    weight: str
    #: the float32 multipliers ``m_c`` onnxruntime computes (one per tensor, or one per output channel)
    multiplier: tuple[float, ...]
    #: the float32 output scale ``s_y`` (``0.0`` for a ``QGemm`` with a float output)
    y_scale: float
    #: the bias initializer (``""`` when none)
    bias: str


def kernel_multiplier(op_type: str, sx: np.ndarray, sw: np.ndarray, sy: np.ndarray, alpha: float = 1.0
                      ) -> np.ndarray:
    """The float32 multipliers of one kernel, evaluated in onnxruntime's order (module docstring)."""
    f = np.float32
    sx32, sw32, sy32 = f(np.asarray(sx, dtype=f).reshape(-1)[0]), np.asarray(sw, dtype=f).reshape(-1), \
        f(np.asarray(sy, dtype=f).reshape(-1)[0])
    if op_type == "QGemm":
        return ((f(alpha) * sx32) * sw32) / sy32
    return (sx32 * sw32) / sy32


def _optimized_graph(path: Path) -> Any:
    """onnxruntime's graph of ``path`` after its extended-level optimizations (the QDQ fusions), as an ONNX model."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = out
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            return onnx.load(out)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"{path}: semantics='onnxruntime': onnxruntime cannot load the model ({e})") from None


def fused_kernels(path: str | Path) -> dict[str, FusedKernel]:
    """The integer kernels onnxruntime runs for the graph at ``path``, keyed by their quantized weight initializer
    (the fused node keeps it)."""
    from onnx import numpy_helper

    path = Path(path)
    model = _optimized_graph(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out: dict[str, FusedKernel] = {}
    for node in model.graph.node:
        if node.op_type not in KERNELS:
            continue
        ix, iw, iy, ib = KERNELS[node.op_type]
        ins = list(node.input) + [""] * (9 - len(node.input))
        if ins[ix] not in inits or ins[iw] not in inits:
            continue  # scales computed at run time: not a kernel qverify can describe
        alpha = 1.0
        for a in node.attribute:
            if a.name == "alpha":
                alpha = float(a.f)
        has_y = bool(ins[iy]) and ins[iy] in inits
        sy = inits[ins[iy]] if has_y else np.float32(1)
        m = kernel_multiplier(node.op_type, inits[ins[ix]], inits[ins[iw]], sy, alpha)
        out[ins[3]] = FusedKernel(node.op_type, node.name, ins[3], tuple(float(v) for v in m),
                                  float(np.asarray(sy, dtype=np.float32).reshape(-1)[0]) if has_y else 0.0,
                                  ins[ib] if ib is not None else "")
    return out
