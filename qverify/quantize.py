"""Post-training quantization (PTQ): a float model and calibration images in, an exact integer network out.

``qverify quantize`` (:func:`quantize`) reads a float model (:class:`FloatModel`: from an ONNX float graph,
:func:`read_onnx_float`, or from a ``qverify train`` checkpoint, :func:`from_checkpoint`), runs it in float64 on
calibration images, chooses every scale from the data, and builds a :class:`~qverify.network.QNetwork` from the
existing ops only (``Dense``, ``Conv2d``, ``Requantize``, ``Clamp``, ``MaxPool2d``, ``SumPool2d``, ``Add``,
``Flatten``): its integer semantics are the executor's. :class:`FakeQuantModel` is the fake-quantized torch model
of the same quantization (integer units, zero points subtracted explicitly instead of folded); the tests check that
both compute the same integers on every test image.

Settings are the ``[quant]`` section that ``qverify train`` reads (:class:`~qverify.train.layers.QuantConfig`:
``scheme`` ``pow2`` (power-of-two scales) or ``affine`` (real scales), per-layer ``weight_bits`` / ``act_bits``,
``out_bits``, ``bias_bits``, ``per_channel``, ``rounding``, ``mult_bits``), so QAT and PTQ speak one config, and a
``[ptq]`` section (:class:`PTQConfig`: symmetric or affine zero points, the clipping method per layer, its
parameters, the calibration data).

Quantizers. A real value ``r`` is represented by an integer ``q`` with ``r ~ s (q - z)``, ``q`` in ``[lo, hi]``.
From a clipping range ``[a, b]`` (``a <= 0 <= b`` after widening to contain 0) and ``B`` bits:

* symmetric, signed:  ``s = max(|a|, |b|) / (2^(B-1) - 1)``, ``z = 0``, ``[lo, hi] = [-2^(B-1), 2^(B-1) - 1]``;
* non-negative value (a ReLU's output, either mode): ``s = b / (2^B - 1)``, ``z = 0``, ``[0, 2^B - 1]``;
* affine (asymmetric): ``s = (b - a) / (2^B - 1)``, ``z = clamp(rne(-a / s), 0, 2^B - 1)``, ``[0, 2^B - 1]``;
* ``pow2`` rounds the scale up to a power of two, ``s <- 2^ceil(log2 s)`` (the range still fits), then ``z`` is
  recomputed from it. ``q = clamp(rne(r / s) + z, lo, hi)`` quantizes a weight (``rne``: half to even).

A dense or conv layer with input quantizer ``(s_x, z_x)``, integer weights ``W = Q_w - z_w`` (scale ``s_w``, per
tensor or per output channel ``c``), bias ``B = clamp(rne(b / (s_x s_w)), +-2^(bias_bits-1))`` and output quantizer
``(s_y, z_y)`` computes ``acc = W (x - z_x) + B`` and ``y = clamp(R(acc * M_c) + z_y, lo_y, hi_y)`` with
``M_c = s_x s_w,c / s_y`` (``pow2``: an exact power of two; ``affine``: rounded to a dyadic with ``mult_bits``
significant bits) and ``R`` the config's rounding. In the network ``z_x`` is folded into the bias,
``b' = B - z_x sum_k W_ck``, and a conv pads with ``z_x`` (real zero). A ReLU that follows a layer is its clamp to
``[z_y, hi_y] = [0, 2^B - 1]``; a ReLU elsewhere is ``Clamp(z, hi)``. Max pooling and flattening keep the
quantizer. An average pool over ``K`` cells keeps it too: ``y = clamp(R((sum - K z) / K) + z)``. An ``Add`` of two
values brings them to a common unit ``c`` with integer weights ``w_i = s_i / c`` (``pow2``: ``c = min s_i``, exact;
``affine``: ``c = max s_i / 2^(mult_bits - 1)`` and ``w_i = rne(s_i / c)``), then requantizes with ``M = c / s_y``.

Clipping (``[ptq] weight_clipping``, ``act_clipping``, ``out_clipping``: one method or one per layer), on the
calibration sample ``X`` of a tensor (weights: per output channel or per tensor; activations: the float model's
values on the calibration images):

* ``minmax``: ``[a, b] = [min X, max X]`` (symmetric: ``b = max |X|``).
* ``percentile``: with ``p = ptq.percentile`` (default 99.99), ``b = Q_p(|X|)`` symmetric, else
  ``[a, b] = [Q_(100-p)(X), Q_p(X)]`` (``Q_p`` the ``p``-th percentile, linear interpolation): outliers beyond are
  saturated, the bulk gets a finer grid.
* ``mse``: the range among ``[k a_0 / K, k b_0 / K]``, ``k = 1..K`` (``[a_0, b_0]`` the min-max range,
  ``K = ptq.mse_grid``) that minimizes the mean squared error ``mean (X - s (q(X) - z))^2`` of the fake quantizer it
  defines (for ``pow2``, after the rounding of the scale: candidates giving the same scale tie, the smallest ``k``
  wins) - the grid search of Banner et al. / Nagel et al.'s white paper (arXiv 2106.08295, sec. 3.4).
* ``lipschitz``: the layer-wise criterion of Song, Ranjan, Li (arXiv 2110.12308), registered through the named
  hook (:data:`CLIPPING_HOOKS` / :func:`register_clipping`) by :mod:`qverify.lipschitz`: per weight tensor (or
  channel), the range among ``[k a_0 / K, k b_0 / K]`` (``K = ptq.lipschitz_grid``) minimizing
  ``t sigma(Q(W)) + sigma(W - Q(W))`` (spectral norms of the layer's operator by power iteration,
  ``t = ptq.lipschitz_ratio``, ``ptq.lipschitz_iters`` iterations); activations by the MSE search.

Exactness: every decision here (scales, integers) only *produces* the integer network; its function is the
executor's, on exact integers. Calibration statistics are float64 and approximate, which is fine: they choose
parameters, they decide no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qverify.network import QNetwork
from qverify.ops import Add, Clamp, Conv2d, Dense, Flatten, MaxPool2d, Requantize, SumPool2d
from qverify.quant import Rounding
from qverify.train.layers import QuantConfig, QuantError

KINDS = ("dense", "conv", "relu", "flatten", "maxpool", "avgpool", "add")
CLIPPINGS = ("minmax", "percentile", "mse", "lipschitz")
#: widths PTQ supports (1 bit is binary: a method of its own, not a uniform quantizer)
PTQ_BITS = (2, 8)


class QuantizeError(QuantError):
    """A float model or a PTQ setting that cannot be quantized (the message names the node or the setting)."""


# ================================================================================================== float model
@dataclass
class FloatNode:
    """One node of a float graph. ``inputs`` are value indices (0 the input, ``i + 1`` node ``i``'s output).

    ``dense``: ``weight [out, in]``, ``bias [out]``; ``conv``: ``weight [O, C, kh, kw]``, ``bias [O]``, ``stride``,
    ``padding`` (top, left, bottom, right; zero padding); ``maxpool`` / ``avgpool``: ``kernel``, ``stride``,
    ``padding`` (avgpool: none); ``relu``, ``flatten`` (to ``[B, -1]``), ``add`` (two inputs)."""

    kind: str
    inputs: tuple[int, ...]
    name: str = ""
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass
class FloatModel:
    """A float network on the pixel grid ``[0, input_hi]^input_shape``; a pixel ``p`` is the real input
    ``p * input_scale``. The output is the last node's value. ``train_method``: the ``qverify train`` method
    that trained it (a checkpoint's; empty for an ONNX graph)."""

    input_shape: tuple[int, ...]
    input_hi: int
    input_scale: Fraction
    nodes: list[FloatNode]
    name: str = "float-model"
    train_method: str = ""

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.input_scale = Fraction(self.input_scale)
        for i, n in enumerate(self.nodes):
            if n.kind not in KINDS:
                raise QuantizeError(f"node {i} ({n.name!r}): unknown kind {n.kind!r} (known: {', '.join(KINDS)})")
            if any(not 0 <= j <= i for j in n.inputs) or len(n.inputs) != (2 if n.kind == "add" else 1):
                raise QuantizeError(f"node {i} ({n.name!r}): bad inputs {n.inputs}")

    @property
    def affine_nodes(self) -> list[int]:
        """Indices of the dense / conv nodes (the layers the per-layer settings count), in order."""
        return [i for i, n in enumerate(self.nodes) if n.kind in ("dense", "conv")]

    def values(self, pixels: np.ndarray) -> list[Any]:
        """float64 torch tensors of every value (index 0 the real input) on a batch of pixels."""
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(np.asarray(pixels, dtype=np.float64)).reshape((-1, *self.input_shape))
        vals = [x * float(self.input_scale)]
        for n in self.nodes:
            a = vals[n.inputs[0]]
            if n.kind == "dense":
                v = F.linear(a, torch.as_tensor(n.weight), torch.as_tensor(n.bias))
            elif n.kind == "conv":
                t, lft, b, r = n.padding
                v = F.conv2d(F.pad(a, (lft, r, t, b)), torch.as_tensor(n.weight), torch.as_tensor(n.bias),
                             stride=n.stride)
            elif n.kind == "relu":
                v = torch.relu(a)
            elif n.kind == "flatten":
                v = a.reshape(a.shape[0], -1)
            elif n.kind == "maxpool":
                t, lft, b, r = n.padding
                v = F.max_pool2d(F.pad(a, (lft, r, t, b), value=-math.inf), n.kernel, n.stride)
            elif n.kind == "avgpool":
                v = F.avg_pool2d(a, n.kernel, n.stride)
            else:
                v = a + vals[n.inputs[1]]
            vals.append(v)
        return vals

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """The float output ``[B, n_out]``."""
        out = self.values(pixels)[-1]
        return out.reshape(out.shape[0], -1).numpy()

    def predict(self, pixels: np.ndarray, batch: int = 1000) -> np.ndarray:
        return np.concatenate([np.argmax(self.forward(pixels[i:i + batch]), axis=1)
                               for i in range(0, len(pixels), batch)])


def from_quantnet(model: Any, name: str = "checkpoint") -> FloatModel:
    """The float model of a :class:`~qverify.train.layers.QuantNet`: its float (latent) weights, ReLU after every
    hidden block, the input scale it trains with (``1/256`` for pow2, ``1/input_hi`` for affine). A residual conv
    (``resnet``: ``y = relu(conv_b(h) + x)``) becomes ``conv``, ``add`` (of the conv and the block input ``x``) and
    ``relu``, which :func:`quantize` turns into an ``Add`` of two quantized values (module docstring)."""
    from qverify.train.layers import QAffine, QConv2d

    nodes: list[FloatNode] = []
    block_in: list[int] = []
    for i, blk in enumerate(model.blocks):
        v = len(nodes)
        block_in.append(v)
        if isinstance(blk, QAffine):
            w = blk.weight.detach().cpu().numpy().astype(np.float64)
            b = blk.bias.detach().cpu().numpy().astype(np.float64)
            if isinstance(blk, QConv2d):
                p = blk.padding
                nodes.append(FloatNode("conv", (v,), f"conv{i}", w, b, stride=(blk.stride, blk.stride),
                                       padding=(p, p, p, p)))
            else:
                nodes.append(FloatNode("dense", (v,), f"fc{i}", w, b))
            if blk.residual:
                nodes.append(FloatNode("add", (len(nodes), block_in[i - 1]), f"add{i}"))
            if not blk.last:
                nodes.append(FloatNode("relu", (len(nodes),), f"relu{i}"))
        else:
            nodes.append(FloatNode("flatten", (v,), f"flatten{i}"))
    return FloatModel(model.input_shape, model.input_hi, model.input_scale, nodes, name)


def from_checkpoint(path: str | Path) -> tuple[FloatModel, QuantConfig]:
    """The float model of a ``qverify train`` checkpoint (``checkpoint.pt``, or the run directory holding it)
    and the ``[quant]`` settings it was trained with."""
    from qverify.train.trainer import CHECKPOINT, load_checkpoint

    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    cfg, model, _ = load_checkpoint(p)
    fm = from_quantnet(model, name=cfg.name)
    fm.train_method = cfg.train.method
    return fm, cfg.quant


# ------------------------------------------------------------------------------------------ ONNX float graphs
def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def read_onnx_float(path: str | Path, input_hi: int = 255, input_scale: Fraction | str | float | None = None,
                    ) -> FloatModel:
    """A float ONNX graph as a :class:`FloatModel` (a small reader of its own: onnx + numpy).

    Supported: ``Gemm`` (``alpha``, ``beta``, ``transA = 0``, ``transB``), ``MatMul`` with an initializer (and the
    ``Add`` of a constant after it or after ``Conv``/``Gemm``: the bias), ``Conv`` (2-D, ``group = 1``, no dilation),
    ``BatchNormalization`` after a ``Conv`` (folded: ``w' = w g / sqrt(v + eps)``, ``b' = (b - m) g / sqrt(v + eps)
    + beta``), ``Relu``, ``Flatten`` (axis 1), ``Reshape`` to ``[B, -1]``, ``MaxPool``, ``AveragePool`` (no padding),
    ``GlobalAveragePool``, ``Add`` of two activations; ``Identity``, ``Dropout`` and a final ``Softmax`` (argmax
    preserving) are dropped. Anything else is an error naming the node. The input is ``[B, *shape]`` float;
    pixel ``p`` is fed as ``p * input_scale`` (default ``1 / input_hi``)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            inits[n.output[0]] = numpy_helper.to_array(_attr(n, "value", None)).astype(np.float64)
    ins = [i for i in g.input if i.name not in inits]
    if len(ins) != 1:
        raise QuantizeError(f"{path}: expected one graph input, got {[i.name for i in ins]}")
    dims = [d.dim_value for d in ins[0].type.tensor_type.shape.dim][1:]
    if not dims or any(d <= 0 for d in dims):
        raise QuantizeError(f"{path}: input {ins[0].name!r} needs a static shape after the batch axis, got {dims}")
    scale = Fraction(1, int(input_hi)) if input_scale is None else Fraction(input_scale)
    nodes: list[FloatNode] = []
    where: dict[str, int] = {ins[0].name: 0}
    shapes: dict[int, tuple[int, ...]] = {0: tuple(dims)}

    def src(n: Any, k: int = 0) -> int:
        name = n.input[k]
        if name not in where:
            raise QuantizeError(f"{path}: node {n.name!r} ({n.op_type}) reads {name!r}, which is not an activation "
                                f"of a supported node")
        return where[name]

    def add(node: FloatNode, out: str) -> None:
        consumed.update(node.inputs)
        nodes.append(node)
        where[out] = len(nodes)
        shapes[len(nodes)] = _shape_after(node, [shapes[j] for j in node.inputs])

    consumed: set[int] = set()  # values some node has read (a bias may be folded only into an unread value)
    n_nodes = len(g.node)
    for k_node, n in enumerate(g.node):
        op, nm = n.op_type, n.name or n.output[0]
        if op == "Constant":
            continue
        if op in ("Identity", "Dropout") or (op == "Softmax" and k_node == n_nodes - 1):
            where[n.output[0]] = src(n)
            continue
        if op == "Gemm":
            if _attr(n, "transA", 0):
                raise QuantizeError(f"{path}: Gemm {nm!r}: transA is not supported")
            w = inits[n.input[1]] * float(_attr(n, "alpha", 1.0))
            w = w if _attr(n, "transB", 0) else w.T
            b = (inits[n.input[2]] * float(_attr(n, "beta", 1.0)) if len(n.input) > 2 and n.input[2]
                 else np.zeros(w.shape[0]))
            add(FloatNode("dense", (src(n),), nm, w, np.broadcast_to(b, (w.shape[0],)).copy()), n.output[0])
        elif op == "MatMul":
            if n.input[1] not in inits:
                raise QuantizeError(f"{path}: MatMul {nm!r}: the second operand must be an initializer")
            w = inits[n.input[1]].T
            add(FloatNode("dense", (src(n),), nm, w, np.zeros(w.shape[0])), n.output[0])
        elif op == "Conv":
            w = inits[n.input[1]]
            if int(_attr(n, "group", 1)) != 1 or any(d != 1 for d in _attr(n, "dilations", [1, 1])):
                raise QuantizeError(f"{path}: Conv {nm!r}: groups and dilation are not supported")
            if _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise QuantizeError(f"{path}: Conv {nm!r}: auto_pad is not supported (give pads)")
            pads = list(_attr(n, "pads", [0, 0, 0, 0]))
            b = inits[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[0])
            add(FloatNode("conv", (src(n),), nm, w, b.copy(), stride=tuple(_attr(n, "strides", [1, 1])),
                          padding=(pads[0], pads[1], pads[2], pads[3])), n.output[0])
        elif op == "BatchNormalization":
            j = src(n)
            prev = nodes[j - 1] if j > 0 else None
            if prev is None or prev.kind != "conv":
                raise QuantizeError(f"{path}: BatchNormalization {nm!r} must follow a Conv (it is folded into it)")
            gam, bet, mu, var = (inits[n.input[k]] for k in range(1, 5))
            f = gam / np.sqrt(var + float(_attr(n, "epsilon", 1e-5)))
            prev.weight = prev.weight * f[:, None, None, None]
            prev.bias = (prev.bias - mu) * f + bet
            where[n.output[0]] = j
        elif op == "Add":
            consts = [k for k in (0, 1) if n.input[k] in inits]
            if consts:
                j = src(n, 1 - consts[0])
                prev = nodes[j - 1] if j > 0 else None
                if prev is None or prev.kind not in ("dense", "conv"):
                    raise QuantizeError(f"{path}: Add {nm!r} of a constant must follow a Gemm, MatMul or Conv "
                                        f"(it is their bias)")
                c = inits[n.input[consts[0]]]
                if j in consumed:
                    raise QuantizeError(f"{path}: Add {nm!r}: the biased value {n.input[1 - consts[0]]!r} is also "
                                        f"read by another node")
                try:
                    prev.bias = prev.bias + np.broadcast_to(c.reshape(-1), prev.bias.shape)
                except ValueError:
                    raise QuantizeError(f"{path}: Add {nm!r}: constant of shape {c.shape} is not a per-channel "
                                        f"bias") from None
                where[n.output[0]] = j
            else:
                add(FloatNode("add", (src(n, 0), src(n, 1)), nm), n.output[0])
        elif op == "Relu":
            add(FloatNode("relu", (src(n),), nm), n.output[0])
        elif op == "Flatten":
            if int(_attr(n, "axis", 1)) != 1:
                raise QuantizeError(f"{path}: Flatten {nm!r}: only axis 1 is supported")
            add(FloatNode("flatten", (src(n),), nm), n.output[0])
        elif op == "Reshape":
            j = src(n)
            target = [int(v) for v in inits.get(n.input[1], np.array([]))]
            size = int(np.prod(shapes[j]))
            if len(target) != 2 or target[1] not in (-1, size):
                raise QuantizeError(f"{path}: Reshape {nm!r}: only a flatten to [B, -1] is supported, got {target}")
            add(FloatNode("flatten", (j,), nm), n.output[0])
        elif op in ("MaxPool", "AveragePool"):
            k = tuple(_attr(n, "kernel_shape", None))
            pads = list(_attr(n, "pads", [0, 0, 0, 0]))
            if _attr(n, "ceil_mode", 0) or any(d != 1 for d in _attr(n, "dilations", [1, 1])):
                raise QuantizeError(f"{path}: {op} {nm!r}: ceil_mode and dilation are not supported")
            if op == "AveragePool" and any(pads):
                raise QuantizeError(f"{path}: AveragePool {nm!r}: padding is not supported (its border cells "
                                    f"average fewer values)")
            add(FloatNode("maxpool" if op == "MaxPool" else "avgpool", (src(n),), nm, kernel=(k[0], k[1]),
                          stride=tuple(_attr(n, "strides", [1, 1])), padding=(pads[0], pads[1], pads[2], pads[3])),
                n.output[0])
        elif op == "GlobalAveragePool":
            j = src(n)
            _, h, w_ = shapes[j]
            add(FloatNode("avgpool", (j,), nm, kernel=(h, w_), stride=(1, 1)), n.output[0])
            # ONNX keeps [B, C, 1, 1]; a following Flatten makes it a vector
        else:
            raise QuantizeError(f"{path}: node {nm!r}: operator {op} is not supported by qverify quantize "
                                f"(float graphs of Gemm, MatMul, Conv, BatchNormalization, Relu, Flatten, Reshape, "
                                f"MaxPool, AveragePool, GlobalAveragePool, Add)")
    out = g.output[0].name
    if where.get(out) != len(nodes):
        raise QuantizeError(f"{path}: the graph output {out!r} must be the last supported node's value")
    return FloatModel(tuple(dims), int(input_hi), scale, nodes, Path(path).stem)


def _shape_after(n: FloatNode, ins: list[tuple[int, ...]]) -> tuple[int, ...]:
    s = ins[0]
    if n.kind == "dense":
        assert n.weight is not None
        if s != (n.weight.shape[1],):
            raise QuantizeError(f"node {n.name!r}: dense expects ({n.weight.shape[1]},), gets {s}")
        return (n.weight.shape[0],)
    if n.kind in ("conv", "maxpool", "avgpool"):
        kh, kw = (n.weight.shape[2:] if n.kind == "conv" and n.weight is not None else n.kernel)
        t, lft, b, r = n.padding
        c = n.weight.shape[0] if n.kind == "conv" and n.weight is not None else s[0]
        return (c, (s[1] + t + b - kh) // n.stride[0] + 1, (s[2] + lft + r - kw) // n.stride[1] + 1)
    if n.kind == "flatten":
        return (int(np.prod(s)),)
    return s


# ================================================================================================== settings
ClipFn = Callable[[np.ndarray, "ClipContext"], tuple[float, float]]


@dataclass(frozen=True)
class ClipContext:
    """What a clipping rule knows about the tensor it clips: ``what`` (``weight`` / ``activation``), the layer's
    position among the affine layers, its node, the widths, symmetric or not, the config, and the float model
    (the Lipschitz criterion needs the layer's operator)."""

    what: str
    layer: int
    node: int
    bits: int
    symmetric: bool
    signed: bool
    qc: QuantConfig
    ptq: PTQConfig
    model: FloatModel | None = None


#: clipping rules beyond the built-in ones, by name: ``fn(values, ctx) -> (a, b)``. ``lipschitz`` (Song, Ranjan,
#: Li, arXiv 2110.12308: per layer, the setting that minimizes a Lipschitz bound of the quantized network's
#: deviation) is reserved here for the module that implements it (:func:`register_clipping`).
CLIPPING_HOOKS: dict[str, ClipFn] = {}


def register_clipping(name: str, fn: ClipFn) -> None:
    """Register a clipping rule (e.g. ``register_clipping("lipschitz", fn)``); ``name`` must be in
    :data:`CLIPPINGS` or new."""
    CLIPPING_HOOKS[name] = fn


@dataclass(frozen=True)
class PTQConfig:
    """The ``[ptq]`` section of a ``qverify quantize`` config.

    ``symmetric``: zero points 0 (signed ranges where a value can be negative), else affine zero points;
    ``weight_clipping`` one method or one per affine layer; ``act_clipping`` one or one per hidden affine layer;
    ``out_clipping`` the output layer's (methods: :data:`CLIPPINGS`); ``percentile`` (in (50, 100]) and
    ``mse_grid`` (candidates of the MSE search) their parameters; ``calib`` the calibration data set
    (:func:`qverify.train.data.load_dataset` spec, e.g. ``mnist-5k``, ``npz:PATH``) and ``calib_images`` how many
    (0: all); ``max_samples`` caps the activation values a percentile or MSE search reads (seeded subsample);
    ``lipschitz_grid``, ``lipschitz_ratio``, ``lipschitz_iters``: the Lipschitz criterion's (:mod:`qverify.lipschitz`).
    """

    symmetric: bool = True
    weight_clipping: str | tuple[str, ...] = "minmax"
    act_clipping: str | tuple[str, ...] = "minmax"
    out_clipping: str = "minmax"
    percentile: float = 99.99
    mse_grid: int = 64
    calib: str = "mnist-5k"
    calib_images: int = 5000
    max_samples: int = 200_000
    seed: int = 0
    lipschitz_grid: int = 32
    lipschitz_ratio: float = 0.025
    lipschitz_iters: int = 30

    def __post_init__(self) -> None:
        for name in ("weight_clipping", "act_clipping", "out_clipping"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                if name == "out_clipping" or not v:
                    raise QuantizeError(f"ptq.{name} must be one method" + ("" if name == "out_clipping" else
                                                                          " or a non-empty list"))
                object.__setattr__(self, name, tuple(v))
                items = [(f"ptq.{name}[{i}]", m) for i, m in enumerate(v)]
            else:
                items = [(f"ptq.{name}", v)]
            for where, m in items:
                if m not in CLIPPINGS and m not in CLIPPING_HOOKS:
                    raise QuantizeError(f"{where}: unknown clipping method {m!r} (known: {', '.join(CLIPPINGS)})")
        if not 50.0 < self.percentile <= 100.0:
            raise QuantizeError(f"ptq.percentile must be in (50, 100], got {self.percentile}")
        if self.mse_grid < 1 or self.max_samples < 1 or self.calib_images < 0:
            raise QuantizeError("ptq.mse_grid and ptq.max_samples must be >= 1, ptq.calib_images >= 0")
        for name, v in (("lipschitz_grid", self.lipschitz_grid), ("lipschitz_iters", self.lipschitz_iters)):
            if v < 1:
                raise QuantizeError(f"ptq.{name} must be >= 1, got {v}")
        if not self.lipschitz_ratio >= 0:
            raise QuantizeError(f"ptq.lipschitz_ratio must be >= 0, got {self.lipschitz_ratio}")

    def clippings(self, n_affine: int) -> list[tuple[str, str]]:
        """``(weight clipping, output clipping)`` per affine layer; a list of the wrong length names the setting."""
        def per(v: str | tuple[str, ...], n: int, name: str, what: str) -> list[str]:
            if not isinstance(v, tuple):
                return [v] * n
            if len(v) != n:
                raise QuantizeError(f"{name} lists {len(v)} methods {list(v)}, the model has {n} {what}")
            return list(v)

        wc = per(self.weight_clipping, n_affine, "ptq.weight_clipping", "affine (dense / conv) layers")
        ac = per(self.act_clipping, n_affine - 1, "ptq.act_clipping", "hidden affine layers (all but the output)")
        return list(zip(wc, [*ac, self.out_clipping], strict=True))


def check_ptq_bits(qc: QuantConfig, n_affine: int) -> list[tuple[int, int]]:
    """Per-layer ``(weight bits, output bits)`` for PTQ: every width in ``2..8`` (a width of 1 is binary, which a
    uniform quantizer is not), the lists of the right length; errors name the setting."""
    bits = qc.layer_bits(n_affine)
    lo, hi = PTQ_BITS
    for name in ("weight_bits", "act_bits", "out_bits"):
        v = getattr(qc, name)
        for i, b in enumerate(v if isinstance(v, tuple) else (v,)):
            if not lo <= b <= hi:
                where = f"quant.{name}[{i}]" if isinstance(v, tuple) else f"quant.{name}"
                raise QuantizeError(f"{where} = {b}: qverify quantize takes widths {lo}..{hi}")
    return bits


_QUANT_KEYS = ("scheme", "weight_bits", "act_bits", "out_bits", "bias_bits", "per_channel", "rounding", "mult_bits")


def load_ptq_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                    base: QuantConfig | None = None) -> tuple[QuantConfig, PTQConfig]:
    """``([quant], [ptq])`` of a TOML / YAML config (the ``qverify train`` layout; other sections are ignored, so a
    training config quantizes as it trains), then ``section.key=value`` overrides. ``base``: the ``[quant]``
    defaults (a checkpoint's own settings)."""
    import tomllib

    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text) or {}
            else:
                d = tomllib.loads(text)
        except (OSError, tomllib.TOMLDecodeError, ValueError) as e:
            raise QuantizeError(f"{p}: {e}") from None
    quant = {k: v for k, v in (d.get("quant") or {}).items()}
    ptq = dict(d.get("ptq") or {})
    for o in overrides:
        if "=" not in o:
            raise QuantizeError(f"override {o!r} is not KEY=VALUE")
        k, v = (s.strip() for s in o.split("=", 1))
        sec, _, key = k.partition(".")
        try:
            val = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            val = v
        if sec == "quant":
            quant[key] = val
        elif sec == "ptq":
            ptq[key] = val
        else:
            raise QuantizeError(f"override {k!r}: qverify quantize reads sections quant and ptq")
    for key in quant:
        if key not in {f.name for f in fields(QuantConfig)}:
            raise QuantizeError(f"quant.{key}: unknown setting")
    known = {f.name for f in fields(PTQConfig)}
    for key in ptq:
        if key not in known:
            raise QuantizeError(f"ptq.{key}: unknown setting (known: {', '.join(sorted(known))})")
    tup = {k: tuple(v) if isinstance(v, list) else v for k, v in quant.items()}
    # PTQ's quantizers are uniform: a training method's binary / ternary / two-base weight quantizer is not carried
    # over from a checkpoint (quantizing its float weights again, at widths of PTQ's own, is the point)
    tup.setdefault("weight_quantizer", "uniform")
    qc = replace(base, **tup) if base is not None else QuantConfig(**tup)
    return qc, PTQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ptq.items()})


# ================================================================================================== quantizers
@dataclass(frozen=True)
class ValueQuant:
    """The quantizer of one value: real ``~ scale (q - zero)``, ``q`` in ``[lo, hi]``."""

    scale: float
    zero: int
    lo: int
    hi: int


def _pow2_up(s: float) -> float:
    return float(2.0 ** math.ceil(math.log2(s) - 1e-12))


def quantizer(a: float, b: float, bits: int, symmetric: bool, signed: bool, pow2: bool) -> ValueQuant:
    """The quantizer of a clipping range ``[a, b]`` (module docstring). ``signed`` ``False``: the value is known
    to be non-negative (``[0, 2^B - 1]``, zero point 0)."""
    a, b = min(float(a), 0.0), max(float(b), 0.0)
    if not signed:
        top = 2**bits - 1
        s = max(b, 1e-12) / top
        s = _pow2_up(s) if pow2 else s
        return ValueQuant(s, 0, 0, top)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        s = max(-a, b, 1e-12) / top
        s = _pow2_up(s) if pow2 else s
        return ValueQuant(s, 0, -(top + 1), top)
    top = 2**bits - 1
    s = max(b - a, 1e-12) / top
    s = _pow2_up(s) if pow2 else s
    z = int(min(max(round(-a / s), 0), top))
    return ValueQuant(s, z, 0, top)


def fake_quant(x: np.ndarray, q: ValueQuant) -> np.ndarray:
    """``s (clamp(rne(x / s) + z, lo, hi) - z)``: the real value a quantizer gives ``x``."""
    return q.scale * (np.clip(np.rint(x / q.scale) + q.zero, q.lo, q.hi) - q.zero)


def clip_range(x: np.ndarray, method: str, ctx: ClipContext) -> tuple[float, float]:
    """``[a, b]`` for a sample by the named method (module docstring)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return 0.0, 0.0
    sym = ctx.symmetric or not ctx.signed
    if method in CLIPPING_HOOKS:
        return CLIPPING_HOOKS[method](x, ctx)
    if method == "lipschitz":
        raise QuantizeError("clipping method 'lipschitz' (Song, Ranjan, Li, arXiv 2110.12308) is not built yet: "
                            "register it with qverify.quantize.register_clipping('lipschitz', fn)")
    if method == "minmax":
        if sym:
            m = float(np.abs(x).max())
            return (-m if ctx.signed else 0.0), m
        return float(x.min()), float(x.max())
    if method == "percentile":
        p = ctx.ptq.percentile
        if sym:
            m = float(np.percentile(np.abs(x), p))
            return (-m if ctx.signed else 0.0), m
        return float(np.percentile(x, 100.0 - p)), float(np.percentile(x, p))
    if method == "mse":
        a0, b0 = clip_range(x, "minmax", ctx)
        k_n = ctx.ptq.mse_grid
        best, best_err = (a0, b0), math.inf
        pow2 = ctx.qc.scheme == "pow2"
        for k in range(1, k_n + 1):
            a, b = a0 * k / k_n, b0 * k / k_n
            q = quantizer(a, b, ctx.bits, ctx.symmetric, ctx.signed, pow2)
            err = float(np.mean((x - fake_quant(x, q)) ** 2))
            if err < best_err:
                best, best_err = (a, b), err
        return best
    raise QuantizeError(f"unknown clipping method {method!r}")  # pragma: no cover - the config checks it


def _dyadic(m: Fraction, bits: int) -> Fraction:
    """``m`` rounded to ``bits`` significant bits (``m_int / 2^k``), nearest, ties to even."""
    mant, e = math.frexp(float(m))
    mi = round(mant * 2**bits)
    return Fraction(mi) * Fraction(2) ** (e - bits)


# ================================================================================================== PTQ
@dataclass
class Step:
    """One block of the quantized model, in the unfolded form :class:`FakeQuantModel` computes (zero points
    explicit): ``kind`` in ``affine`` (dense / conv + requantization), ``clamp``, ``flatten``, ``maxpool``,
    ``avgpool`` (sum + requantization), ``add`` (integer-weighted sum + requantization)."""

    kind: str
    inputs: tuple[int, ...]  # step-value indices (0 the input)
    node: FloatNode | None = None
    weight: np.ndarray | None = None  # integer W = Q_w - z_w
    bias: np.ndarray | None = None  # integer B (zero points not folded)
    in_zero: tuple[int, ...] = (0,)
    add_weights: tuple[int, ...] = ()
    num: tuple[int, ...] = (1,)
    den: tuple[int, ...] = (1,)
    out: ValueQuant | None = None


@dataclass
class PTQResult:
    """The quantized network, its unfolded steps, the quantizer of every float value and the widths used."""

    network: QNetwork
    steps: list[Step]
    quant: dict[int, ValueQuant]
    layer_bits: list[tuple[int, int]]
    qc: QuantConfig
    ptq: PTQConfig
    notes: list[str] = field(default_factory=list)

    def fake_quant_model(self) -> FakeQuantModel:
        return FakeQuantModel(self.steps, self.network.input_shape, self.qc.mode)


def _fold_input_scale(model: FloatModel, s0: Fraction) -> FloatModel:
    """Move ``input_scale / s0`` into the weights of the affine layers that read the input (through flatten and
    max / average pooling, which commute with a positive factor), so the input grid has the scale ``s0``."""
    f = float(model.input_scale / s0)
    nodes = [replace(n) for n in model.nodes]
    todo, seen = [0], set()
    while todo:
        v = todo.pop()
        for i, n in enumerate(nodes):
            if v in n.inputs and i not in seen:
                seen.add(i)
                if n.kind in ("dense", "conv"):
                    assert n.weight is not None
                    n.weight = n.weight * f
                elif n.kind in ("flatten", "maxpool", "avgpool"):
                    todo.append(i + 1)
                else:
                    raise QuantizeError(f"pow2: node {n.name!r} ({n.kind}) reads the input before any dense / conv; "
                                        f"give a power-of-two input scale")
    return FloatModel(model.input_shape, model.input_hi, s0, nodes, model.name, model.train_method)


def _weight_quant(w: np.ndarray, bits: int, clip: str, ctx: ClipContext, per_channel: bool,
                  pow2: bool) -> tuple[np.ndarray, list[ValueQuant]]:
    """Integer weights ``W = clamp(rne(w / s_c) + z_c) - z_c`` and each channel's quantizer."""
    rows = w.reshape(w.shape[0], -1)
    groups = [rows[c] for c in range(len(rows))] if per_channel else [rows]
    qs = []
    for x in groups:
        a, b = clip_range(x, clip, ctx)
        qs.append(quantizer(a, b, bits, ctx.symmetric, True, pow2))
    out = np.empty(rows.shape, dtype=np.int64)
    for c in range(len(rows)):
        q = qs[c] if per_channel else qs[0]
        out[c] = np.clip(np.rint(rows[c] / q.scale) + q.zero, q.lo, q.hi).astype(np.int64) - q.zero
    return out.reshape(w.shape), qs


def quantize(model: FloatModel, calib: np.ndarray, qc: QuantConfig | None = None, ptq: PTQConfig | None = None,
             name: str | None = None, metadata: Mapping[str, str] | None = None) -> PTQResult:
    """Post-training quantization of ``model`` with the calibration pixels ``calib`` (module docstring)."""
    qc = qc or QuantConfig()
    ptq = ptq or PTQConfig()
    pow2 = qc.scheme == "pow2"
    aff = model.affine_nodes
    bits = check_ptq_bits(qc, len(aff))
    clips = ptq.clippings(len(aff))
    layer_of = {node: i for i, node in enumerate(aff)}
    notes: list[str] = []
    s0 = model.input_scale
    if pow2 and not _is_pow2(s0):
        s0 = Fraction(2) ** math.floor(math.log2(s0))  # 1/255 -> 1/256, as qverify train's pow2 input grid
        notes.append(f"pow2: the input grid has scale {s0} (the model's {model.input_scale}); the weights of the "
                     f"layers reading the input are scaled by {float(model.input_scale / s0):.6g}")
        model = _fold_input_scale(model, s0)
    calib = np.asarray(calib)
    vals = [v.numpy() for v in model.values(calib)]
    rng = np.random.default_rng(ptq.seed)

    def sample(v: np.ndarray) -> np.ndarray:
        flat = v.ravel()
        if flat.size > ptq.max_samples:
            flat = flat[rng.choice(flat.size, ptq.max_samples, replace=False)]
        return flat

    consumers: dict[int, list[int]] = {}
    for i, n in enumerate(model.nodes):
        for j in n.inputs:
            consumers.setdefault(j, []).append(i)
    # quantizer, network value index and sign of every float value
    vq: dict[int, ValueQuant] = {0: ValueQuant(float(s0), 0, 0, model.input_hi)}
    nonneg: dict[int, bool] = {0: True}
    net_val: dict[int, int] = {0: 0}
    step_val: dict[int, int] = {0: 0}
    ops: list = []
    op_inputs: list[tuple[int, ...]] = []
    steps: list[Step] = []
    fused: set[int] = set()
    last_affine = aff[-1] if aff else -1
    mode = qc.mode

    def emit(op: Any, ins: tuple[int, ...]) -> int:
        ops.append(op)
        op_inputs.append(ins)
        return len(ops)

    def requant_mult(m: Fraction) -> Fraction:
        return m if pow2 else _dyadic(m, qc.mult_bits)

    def out_quant(i: int, v: int, layer: int, clip_i: int, signed: bool) -> ValueQuant:
        ob = bits[layer][1]
        ctx = ClipContext("activation", layer, i, ob, ptq.symmetric, signed, qc, ptq, model)
        a, b = clip_range(sample(vals[v]), clips[layer][clip_i], ctx)
        return quantizer(a, b, ob, ptq.symmetric, signed, pow2)

    for i, n in enumerate(model.nodes):
        v_out = i + 1
        if i in fused:
            continue
        src = n.inputs[0]
        if n.kind in ("dense", "conv"):
            layer = layer_of[i]
            wb, _ = bits[layer]
            cons = consumers.get(v_out, [])
            relu = len(cons) == 1 and model.nodes[cons[0]].kind == "relu" and i != last_affine
            v_q = cons[0] + 1 if relu else v_out
            if relu:
                fused.add(cons[0])
            xq = vq[src]
            assert n.weight is not None and n.bias is not None
            wctx = ClipContext("weight", layer, i, wb, ptq.symmetric, True, qc, ptq, model)
            w_int, wqs = _weight_quant(n.weight, wb, clips[layer][0], wctx, qc.per_channel, pow2)
            sw = np.array([q.scale for q in wqs])
            s_acc = xq.scale * (sw if qc.per_channel else np.full(n.weight.shape[0], sw[0]))
            bq = 2 ** (qc.bias_bits - 1)
            b_int = np.clip(np.rint(n.bias / s_acc), -bq, bq - 1).astype(np.int64)
            signed = not relu
            oq = out_quant(i, v_q, layer, 1, signed)
            mults = [requant_mult(Fraction(float(s)) / Fraction(oq.scale)) for s in s_acc]
            if not qc.per_channel:
                mults = mults[:1]
            num = tuple(m.numerator for m in mults)
            den = tuple(m.denominator for m in mults)
            w_sum = w_int.reshape(w_int.shape[0], -1).sum(axis=1)
            folded = b_int - xq.zero * w_sum
            if n.kind == "dense":
                op = Dense(w_int, folded, name=n.name)
            else:
                op = Conv2d(w_int, folded, stride=n.stride, padding=n.padding, pad_value=xq.zero, name=n.name)
            a_idx = emit(op, (net_val[src],))
            r_idx = emit(Requantize(num, den, np.array([oq.zero]), oq.lo, oq.hi, mode, name=f"{n.name}/requant"),
                         (a_idx,))
            steps.append(Step("affine", (step_val[src],), n, w_int, b_int, (xq.zero,), (), num, den, oq))
            vq[v_q], nonneg[v_q], net_val[v_q], step_val[v_q] = oq, not signed, r_idx, len(steps)
        elif n.kind == "relu":
            q = vq[src]
            net_val[v_out] = emit(Clamp(q.zero, q.hi, name=n.name), (net_val[src],))
            steps.append(Step("clamp", (step_val[src],), n, out=ValueQuant(q.scale, q.zero, q.zero, q.hi)))
            vq[v_out] = ValueQuant(q.scale, q.zero, q.zero, q.hi)
            nonneg[v_out], step_val[v_out] = True, len(steps)
        elif n.kind in ("flatten", "maxpool"):
            op = (Flatten(name=n.name) if n.kind == "flatten" else
                  MaxPool2d(n.kernel, n.stride, n.padding, name=n.name))
            net_val[v_out] = emit(op, (net_val[src],))
            steps.append(Step(n.kind, (step_val[src],), n, out=vq[src]))
            vq[v_out], nonneg[v_out], step_val[v_out] = vq[src], nonneg[src], len(steps)
        elif n.kind == "avgpool":
            q = vq[src]
            k = n.kernel[0] * n.kernel[1]
            s_idx = emit(SumPool2d(n.kernel, n.stride, name=n.name), (net_val[src],))
            # sum (x - z) = sum x - K z: an Add of the constant (none when z = 0)
            b_idx = emit(Add((1,), -k * q.zero, name=f"{n.name}/zero"), (s_idx,)) if q.zero else s_idx
            net_val[v_out] = emit(Requantize((1,), (k,), np.array([q.zero]), q.lo, q.hi, mode,
                                             name=f"{n.name}/requant"), (b_idx,))
            steps.append(Step("avgpool", (step_val[src],), n, in_zero=(q.zero,), num=(1,), den=(k,), out=q))
            vq[v_out], nonneg[v_out], step_val[v_out] = q, nonneg[src], len(steps)
        else:  # add
            a_v, b_v = n.inputs
            qa, qb = vq[a_v], vq[b_v]
            # the add's output takes the widths and clipping of the affine layer before it
            layer = max([layer_of[j] for j in aff if j < i], default=0)
            signed = not (nonneg[a_v] and nonneg[b_v])
            oq = out_quant(i, v_out, layer, 1, signed)
            if pow2:
                c = Fraction(min(qa.scale, qb.scale))
                ws = (int(Fraction(qa.scale) / c), int(Fraction(qb.scale) / c))
            else:
                c = Fraction(max(qa.scale, qb.scale)) / 2 ** (qc.mult_bits - 1)
                ws = (max(1, round(Fraction(qa.scale) / c)), max(1, round(Fraction(qb.scale) / c)))
            m = requant_mult(c / Fraction(oq.scale))
            s_idx = emit(Add(ws, -(ws[0] * qa.zero + ws[1] * qb.zero), name=n.name), (net_val[a_v], net_val[b_v]))
            net_val[v_out] = emit(Requantize((m.numerator,), (m.denominator,), np.array([oq.zero]), oq.lo, oq.hi,
                                             mode, name=f"{n.name}/requant"), (s_idx,))
            steps.append(Step("add", (step_val[a_v], step_val[b_v]), n, in_zero=(qa.zero, qb.zero), add_weights=ws,
                              num=(m.numerator,), den=(m.denominator,), out=oq))
            vq[v_out], nonneg[v_out], step_val[v_out] = oq, not signed, len(steps)
    oq = vq[len(model.nodes)]
    meta = {"source": "qverify.quantize", "scheme": qc.scheme, "symmetric": str(ptq.symmetric).lower(),
            "per_channel": str(qc.per_channel).lower(), "rounding": mode.value,
            "weight_bits": _one_or_list([b[0] for b in bits]),
            "act_bits": _one_or_list([b[1] for b in bits[:-1]]) if len(bits) > 1 else str(qc.act_bits),
            "out_bits": str(bits[-1][1]), "layer_bits": ",".join(f"w{w}a{a}" for w, a in bits),
            "clipping": ",".join(f"{w}/{a}" for w, a in clips), "calib": ptq.calib}
    meta.update(metadata or {})
    net = QNetwork(input_shape=model.input_shape, input_lo=0, input_hi=model.input_hi, layers=tuple(ops),
                   input_scale=s0, input_zero_point=0, output_scale=Fraction(oq.scale), output_zero_point=oq.zero,
                   input_rounding=None, tie_rule="first", name=name or model.name, metadata=meta,
                   inputs=tuple(op_inputs))
    return PTQResult(net, steps, vq, bits, qc, ptq, notes)


def _is_pow2(f: Fraction) -> bool:
    n, d = f.numerator, f.denominator
    return n > 0 and (n & (n - 1)) == 0 and (d & (d - 1)) == 0


def _one_or_list(v: list[int]) -> str:
    return str(v[0]) if len(set(v)) == 1 else ",".join(str(x) for x in v)


# ================================================================================================== fake quant
class FakeQuantModel(torch.nn.Module):
    """The fake-quantized torch model of a :class:`PTQResult`, in integer units (float64 tensors holding exact
    integers): each affine step computes ``F.linear / F.conv2d`` of ``x - z_x`` (zero-padded: real zero) with the
    integer weights and the *unfolded* bias, then ``clamp(R(acc * M) + z_y, lo, hi)`` with the exact rounding of
    :func:`qverify.quant.multiply_round` (through the training layers' requantization,
    :class:`qverify.train.layers._Requant`: exact on integers, straight-through gradient ``dR(v)/dv = 1``); pools,
    clamps and adds likewise on explicit zero points. The network of :func:`quantize` folds the zero points
    instead; the two agree on every input (tested). :meth:`forward` gives the real logits ``s_y (y - z_y)``,
    differentiable in the input (attacks, fine-tuning studies)."""

    def __init__(self, steps: list[Step], input_shape: tuple[int, ...], mode: Rounding) -> None:
        super().__init__()
        self.steps = steps
        self.input_shape = tuple(input_shape)
        self.mode = Rounding(mode)

    def _requant(self, acc: torch.Tensor, st: Step) -> torch.Tensor:
        from qverify.train.layers import _Requant

        assert st.out is not None
        shape = (1, -1) + (1,) * (acc.ndim - 2) if len(st.num) > 1 else ()
        num = np.asarray(st.num, dtype=np.int64).reshape(shape)
        den = np.asarray(st.den, dtype=np.int64).reshape(shape)
        mult = torch.as_tensor(num / den, dtype=torch.float64)
        r = _Requant.apply(acc * mult, acc, num, den, self.mode)
        return torch.clamp(r + st.out.zero, st.out.lo, st.out.hi)

    def values(self, pixels: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """Every step's integer values (index 0 the input)."""
        import torch.nn.functional as F

        x = torch.as_tensor(pixels).to(torch.float64).reshape((-1, *self.input_shape))
        vals = [x]
        for st in self.steps:
            a = vals[st.inputs[0]]
            n = st.node
            assert n is not None
            if st.kind == "affine":
                assert st.weight is not None and st.bias is not None
                xc = a - st.in_zero[0]
                w = torch.from_numpy(st.weight.astype(np.float64))
                b = torch.from_numpy(st.bias.astype(np.float64))
                if n.kind == "dense":
                    acc = F.linear(xc, w, b)
                else:
                    t, lft, bt, r = n.padding
                    acc = F.conv2d(F.pad(xc, (lft, r, t, bt)), w, b, stride=n.stride)
                v = self._requant(acc, st)
            elif st.kind == "clamp":
                assert st.out is not None
                v = torch.clamp(a, st.out.lo, st.out.hi)
            elif st.kind == "flatten":
                v = a.reshape(a.shape[0], -1)
            elif st.kind == "maxpool":
                t, lft, bt, r = n.padding
                v = F.max_pool2d(F.pad(a, (lft, r, t, bt), value=-math.inf), n.kernel, n.stride)
            elif st.kind == "avgpool":
                v = self._requant(F.avg_pool2d(a - st.in_zero[0], n.kernel, n.stride, divisor_override=1), st)
            else:
                b_ = vals[st.inputs[1]]
                acc = st.add_weights[0] * (a - st.in_zero[0]) + st.add_weights[1] * (b_ - st.in_zero[1])
                v = self._requant(acc, st)
            vals.append(v)
        return vals

    def forward_int(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """The output integers ``[B, n_out]`` as int64."""
        with torch.no_grad():
            out = self.values(pixels)[-1]
        return out.reshape(out.shape[0], -1).numpy().astype(np.int64)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Real logits ``s_y (y - z_y)`` ``[B, n_out]``."""
        out = self.values(pixels)[-1]
        q = self.steps[-1].out
        assert q is not None
        return (out.reshape(out.shape[0], -1) - q.zero) * q.scale


# ================================================================================================== ONNX export
def export_onnx(res: PTQResult, path: str | Path, opset: int = 13) -> None:
    """Write the quantized network as a QDQ ONNX graph (``QuantizeLinear`` input, ``DequantizeLinear`` weights per
    tensor or per axis, ``Gemm`` / ``Conv``, ``Clip`` where the range is narrower than 8 bits, ``QuantizeLinear``;
    ``Flatten`` and ``MaxPool`` between a ``DequantizeLinear`` and a ``QuantizeLinear`` of the same parameters).
    Like :func:`qverify.train.export.export_onnx`, the ONNX scales are chosen so that the importer's
    ``s_x s_w / s_y`` is exactly each ``M_c``: activation scales ``t = 2^round(log2 s)``, weight scales
    ``M_c t_y / t_x`` (exact float32 since ``M_c`` has at most ``mult_bits <= 24`` significant bits).
    Requirements: rounding ``half_even``, widths <= 8, input grid ``[0, 255]``, and the ops above (average pooling
    and adds of two activations are refused: their integer weights have no QDQ form)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    qc, net = res.qc, res.network
    if qc.mode is not Rounding.HALF_EVEN:
        raise QuantizeError(f"ONNX export: QuantizeLinear rounds half to even, the model rounds {qc.mode.value}; "
                            f"set quant.rounding = 'half_even'")
    if net.input_hi != 255:
        raise QuantizeError(f"ONNX export: the input grid must be [0, 255], it is [0, {net.input_hi}]")
    inits: list = []
    nodes: list = []

    def const(nm: str, a: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(a), nm))
        return nm

    def f32(v: float | Fraction, what: str) -> np.float32:
        f = np.float32(float(v))
        if Fraction(float(f)) != Fraction(v) or f == 0:
            raise QuantizeError(f"ONNX export: {what} {float(v)!r} is not exactly a float32")
        return f

    def t_of(q: ValueQuant) -> Fraction:
        return Fraction(2) ** round(math.log2(q.scale))

    def ztype(q: ValueQuant) -> tuple[Any, int, int]:
        if q.lo >= 0:
            return np.uint8, 0, 255
        return np.int8, -128, 127

    qin = ValueQuant(float(net.input_scale), 0, 0, 255)
    t_in = Fraction(net.input_scale)
    if not _is_pow2(t_in):
        raise QuantizeError(f"ONNX export: the input scale {t_in} is not a power of two, so the weight scales "
                            f"M t_y / t_x have no exact float32 form; quantize with quant.scheme = 'pow2' (which "
                            f"moves the input scale into the first layer) or --input-scale 1/256")
    const("s0", np.array(f32(t_in, "input scale")))
    const("z0", np.array(0, dtype=np.uint8))
    nodes.append(helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["q0"], name="quant_input"))
    names = {0: ("q0", "s0", "z0", t_in, qin)}
    for k, st in enumerate(res.steps, start=1):
        n = st.node
        assert n is not None
        q_in, s_in, z_in, t_x, qx = names[st.inputs[0]]
        d = f"d{k}"
        nodes.append(helper.make_node("DequantizeLinear", [q_in, s_in, z_in], [d], name=f"dequant{k}"))
        if st.kind in ("flatten", "maxpool"):
            if st.kind == "flatten":
                nodes.append(helper.make_node("Flatten", [d], [f"f{k}"], name=n.name or f"flatten{k}", axis=1))
            else:
                t, lft, b, r = n.padding
                nodes.append(helper.make_node("MaxPool", [d], [f"f{k}"], name=n.name or f"maxpool{k}",
                                              kernel_shape=list(n.kernel), strides=list(n.stride),
                                              pads=[t, lft, b, r]))
            nodes.append(helper.make_node("QuantizeLinear", [f"f{k}", s_in, z_in], [f"q{k}"], name=f"requant{k}"))
            names[k] = (f"q{k}", s_in, z_in, t_x, qx)
            continue
        if st.kind != "affine":
            raise QuantizeError(f"ONNX export: node {n.name!r} ({n.kind}) has no QDQ form here (only dense, conv, "
                                f"relu after them, flatten, max pooling)")
        oq = st.out
        assert oq is not None and st.weight is not None and st.bias is not None
        if ztype(oq)[0] is np.int8 and oq.zero:
            raise QuantizeError("ONNX export: signed values with a zero point")  # pragma: no cover
        if oq.hi - oq.lo > 255:
            raise QuantizeError(f"ONNX export: node {n.name!r}: widths above 8 bits")
        t_y = t_of(oq)
        mults = [Fraction(a, b) for a, b in zip(st.num, st.den, strict=True)]
        sw = np.array([f32(m * t_y / t_x, f"weight scale of {n.name!r}") for m in mults], dtype=np.float32)
        sb = np.array([f32(Fraction(float(t_x)) * Fraction(float(v)), f"bias scale of {n.name!r}") for v in sw],
                      dtype=np.float32)
        w = st.weight
        per = len(sw) > 1
        o = w.shape[0]
        rows = w.reshape(o, -1)
        if w.min() >= -128 and w.max() <= 127:
            wq, zw = w.astype(np.int8), np.zeros(o, dtype=np.int8)
        else:  # affine weights (W = Q_w - z_w spans 9 bits): uint8 Q_w with a zero point per channel or tensor
            zc = -rows.min(axis=1) if per else np.full(o, -rows.min())
            if np.any(rows.max(axis=1) + zc > 255) or np.any(zc > 255):
                raise QuantizeError(f"ONNX export: node {n.name!r}: weights span more than 8 bits")
            wq = (rows + zc[:, None]).reshape(w.shape).astype(np.uint8)
            zw = zc.astype(np.uint8)
        if np.abs(st.bias).max(initial=0) >= 2**31:
            raise QuantizeError(f"ONNX export: node {n.name!r}: bias does not fit int32")
        const(f"w{k}", wq)
        const(f"sw{k}", sw if per else sw.reshape(()))
        const(f"zw{k}", zw if per else zw[:1].reshape(()))
        const(f"b{k}", st.bias.astype(np.int32))
        const(f"sb{k}", sb if per else sb.reshape(()))
        const(f"zb{k}", np.zeros(o, dtype=np.int32) if per else np.array(0, dtype=np.int32))
        kw = {"axis": 0} if per else {}
        nodes.append(helper.make_node("DequantizeLinear", [f"w{k}", f"sw{k}", f"zw{k}"], [f"wd{k}"],
                                      name=f"dequant_w{k}", **kw))
        nodes.append(helper.make_node("DequantizeLinear", [f"b{k}", f"sb{k}", f"zb{k}"], [f"bd{k}"],
                                      name=f"dequant_b{k}", **kw))
        if n.kind == "conv":
            t, lft, b, r = n.padding
            nodes.append(helper.make_node("Conv", [d, f"wd{k}", f"bd{k}"], [f"a{k}"], name=n.name or f"conv{k}",
                                          strides=list(n.stride), pads=[t, lft, b, r]))
        else:
            nodes.append(helper.make_node("Gemm", [d, f"wd{k}", f"bd{k}"], [f"a{k}"], name=n.name or f"gemm{k}",
                                          transB=1))
        dt, tlo, thi = ztype(oq)
        const(f"s{k}", np.array(f32(t_y, "activation scale")))
        const(f"z{k}", np.array(oq.zero, dtype=dt))
        src = f"a{k}"
        if (oq.lo, oq.hi) != (tlo, thi):
            lo_r, hi_r = (oq.lo - oq.zero) * t_y, (oq.hi - oq.zero) * t_y
            const(f"cmin{k}", np.array(np.float32(float(lo_r))))
            const(f"cmax{k}", np.array(f32(hi_r, "clip bound")))
            nodes.append(helper.make_node("Clip", [src, f"cmin{k}", f"cmax{k}"], [f"c{k}"], name=f"clip{k}"))
            src = f"c{k}"
        nodes.append(helper.make_node("QuantizeLinear", [src, f"s{k}", f"z{k}"], [f"q{k}"], name=f"quant{k}"))
        names[k] = (f"q{k}", f"s{k}", f"z{k}", t_y, oq)
    last = names[len(res.steps)]
    nodes.append(helper.make_node("DequantizeLinear", [last[0], last[1], last[2]], ["y"], name="dequant_output"))
    n_out = net.shapes[-1][0]
    graph = helper.make_graph(nodes, net.name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *net.input_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])], inits)
    ops = [helper.make_opsetid("", opset)]
    om = helper.make_model(graph, opset_imports=ops, producer_name="qverify.quantize",
                           ir_version=helper.find_min_ir_version_for(ops))
    onnx.checker.check_model(om)
    onnx.save(om, str(path))


# ================================================================================================== front end
def load_float_model(path: str | Path, input_hi: int = 255, input_scale: Fraction | str | None = None,
                     ) -> tuple[FloatModel, QuantConfig | None]:
    """A float model from an ONNX file, a ``qverify train`` checkpoint (``.pt``) or a run directory; for a
    checkpoint also its ``[quant]`` settings (the defaults of the PTQ)."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".pt":
        return from_checkpoint(p)
    if p.suffix == ".onnx":
        return read_onnx_float(p, input_hi=input_hi, input_scale=input_scale), None
    raise QuantizeError(f"{p}: qverify quantize reads a float .onnx graph or a qverify train checkpoint (.pt or "
                        f"its run directory)")


def calibration_images(ptq: PTQConfig, input_shape: tuple[int, ...]) -> np.ndarray:
    """The ``calib_images`` first images of ``ptq.calib`` as pixels ``[N, *input_shape]``."""
    from qverify.train.data import load_dataset

    ds = load_dataset(ptq.calib)
    x = ds.images[:ptq.calib_images] if ptq.calib_images else ds.images
    if int(np.prod(x.shape[1:])) != int(np.prod(input_shape)):
        raise QuantizeError(f"ptq.calib {ptq.calib!r}: images {x.shape[1:]} do not fit the model input {input_shape}")
    return x.reshape((len(x), *input_shape)).astype(np.int64)


# the Lipschitz criterion registers itself as the ``lipschitz`` clipping method (it imports this module lazily)
from qverify.lipschitz import register as _register_lipschitz  # noqa: E402

_register_lipschitz()
