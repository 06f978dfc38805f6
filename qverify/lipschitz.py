"""The Lipschitz layer-wise clipping criterion of ``qverify quantize`` (``[ptq] weight_clipping = "lipschitz"``).

Source: Song, Ranjan, Li, "A Layer-wise Adversarial-aware Quantization Optimization for Improving Robustness",
arXiv 2110.12308 (2021): per layer, among candidate quantization settings, choose the one that minimizes a bound,
through Lipschitz constants, of the deviation of the quantized network under an adversarial input - a criterion
meant for adversarially trained models, which lose more to quantization than plain ones.

The bound. A layer ``y = W x`` (dense, or a convolution: ``W`` is then the linear *operator* of the conv, not its
reshaped kernel) is quantized to ``Q(W)`` and receives, instead of its float input ``x``, an input ``x + d`` that
carries the adversarial perturbation and the upstream quantization error. Its output deviates by::

    ||Q(W)(x + d) - W x||_2 <= ||Q(W)||_2 ||d||_2 + ||W - Q(W)||_2 ||x||_2,

the first term the Lipschitz constant of the quantized layer (spectral norm of ``Q(W)``) times the deviation it
amplifies, the second the weight error's operator norm times the input's size. Dividing by ``||x||``, the layer's
criterion for a candidate ``c`` is::

    B(c) = t * sigma(Q_c(W)) + sigma(W - Q_c(W)),        t = ||d|| / ||x||  (ptq.lipschitz_ratio)

and the candidate with the smallest ``B`` wins (ties: the narrowest range). ``sigma`` is computed by power iteration
on the layer's operator: ``A v`` is ``F.linear`` / ``F.conv2d`` (with the layer's stride and padding, on the layer's
input shape) and ``A^T u`` is ``F.linear`` with the transposed matrix / ``F.conv_transpose2d`` (cropped to the
unpadded input): ``sigma^2 = lim ||A^T A v|| / ||v||``, ``ptq.lipschitz_iters`` iterations from a seeded start.

Readings where the paper leaves details open (each the simplest that matches its description; a setting where it
is a number):

* the candidates are clipping ranges ``[k a_0 / K, k b_0 / K]``, ``k = 1..K`` (``[a_0, b_0]`` the min-max range,
  ``K = ptq.lipschitz_grid``), as in the MSE search; widths and granularity are the config's per-layer settings;
* the criterion combines the two terms as a *sum* (the bound above). The literal product
  ``sigma(Q_c(W)) * ||W - Q_c(W)||`` is not used: as the range shrinks, ``Q_c(W) -> 0`` (every weight saturates at
  ``+-b``), so the product tends to 0 and would always pick the narrowest range, a network of near-zero weights;
* ``t`` is one ratio for every layer (``lipschitz_ratio``, default 0.025: an l-inf ball of radius 2 pixels on a
  28x28 image has l2 radius 56, a mean MNIST test image has l2 norm 2262 pixels), not propagated layer by layer;
* per output channel (``quant.per_channel``), each channel's range is chosen on its own operator (that filter's
  conv / that row);
* activations: the error an activation quantizer introduces reaches the output through the next layer's
  Lipschitz constant, which does not depend on the activation's candidate range, so the bound reduces to the
  activation's own quantization error: activation (and output) clipping by ``lipschitz`` is the MSE search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from qverify.quantize import ClipContext, FloatModel, FloatNode

Operator = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], tuple[int, ...]]


def layer_operator(weight: np.ndarray | torch.Tensor, kind: str, in_shape: tuple[int, ...] = (),
                   stride: tuple[int, int] = (1, 1), padding: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Operator:
    """``(A, A^T, input shape)`` of a dense layer (``weight [out, in]``) or a 2-D convolution (``weight [O, C, kh,
    kw]`` on inputs ``in_shape = (C, H, W)``, zero padding ``(top, left, bottom, right)``), both acting on float64
    batches ``[B, *shape]``. The conv's transpose is ``conv_transpose2d`` onto the padded input, cropped."""
    w = torch.as_tensor(np.asarray(weight, dtype=np.float64))
    if kind == "dense":
        return (lambda v: F.linear(v, w)), (lambda u: F.linear(u, w.t())), (int(w.shape[1]),)
    if kind != "conv":
        raise ValueError(f"layer_operator: kind must be 'dense' or 'conv', got {kind!r}")
    c, h, wd = (int(s) for s in in_shape)
    t, lft, b, r = (int(p) for p in padding)
    sh, sw = (int(s) for s in stride)
    kh, kw = int(w.shape[2]), int(w.shape[3])
    hp, wp = h + t + b, wd + lft + r
    op_h, op_w = (hp - kh) % sh, (wp - kw) % sw  # rows / columns of the padded input that no window reaches

    def fwd(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(v, (lft, r, t, b)), w, stride=(sh, sw))

    def adj(u: torch.Tensor) -> torch.Tensor:
        full = F.conv_transpose2d(u, w, stride=(sh, sw), output_padding=(op_h, op_w))
        return full[:, :, t:t + h, lft:lft + wd]

    return fwd, adj, (c, h, wd)


def spectral_norm(op: Operator, iters: int = 30, seed: int = 0) -> float:
    """The largest singular value of the operator by power iteration on ``A^T A`` (``iters`` steps from a seeded
    Gaussian start): a lower bound that converges to ``sigma_max`` (quotient ``(sigma_2 / sigma_1)^2`` per step)."""
    fwd, adj, shape = op
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn((1, *shape), generator=g, dtype=torch.float64)
    v = v / v.norm()
    s2 = 0.0
    with torch.no_grad():
        for _ in range(max(1, iters)):
            u = adj(fwd(v))
            s2 = float(u.norm())
            if s2 == 0.0:
                return 0.0
            v = u / s2
        return float(fwd(v).norm())


_SHAPES: dict[int, tuple[object, list[tuple[int, ...]]]] = {}


def _value_shapes(model: FloatModel) -> list[tuple[int, ...]]:
    """Shapes (without the batch axis) of every value of the float model (index 0 the input), cached per model."""
    hit = _SHAPES.get(id(model))
    if hit is not None and hit[0] is model:
        return hit[1]
    vals = model.values(np.zeros((1, *model.input_shape)))
    shapes = [tuple(int(s) for s in v.shape[1:]) for v in vals]
    _SHAPES.clear()  # one model at a time (a quantize run); the entry keeps the model alive, so its id is not reused
    _SHAPES[id(model)] = (model, shapes)
    return shapes


def channel_operator(values: np.ndarray, node: FloatNode, in_shape: tuple[int, ...]) -> tuple[Operator, tuple]:
    """The operator of the weights ``values`` (the whole tensor of ``node``, or one output channel's row) and the
    kernel shape they are reshaped to."""
    w = np.asarray(node.weight)
    per = int(np.prod(w.shape[1:]))
    n_out = values.size // per
    if values.size % per or n_out not in (1, w.shape[0]):
        raise ValueError(f"lipschitz: {values.size} weights do not fit node {node.name!r} of shape {w.shape}")
    shape = (n_out, *w.shape[1:])
    return layer_operator(values.reshape(shape), node.kind, in_shape, node.stride, node.padding), shape


def lipschitz_bounds(values: np.ndarray, ctx: ClipContext) -> list[tuple[float, float, float]]:
    """``(a, b, B(c))`` of every candidate range of a weight sample (module docstring), in candidate order."""
    from qverify.quantize import clip_range, fake_quant, quantizer

    assert ctx.model is not None, "the Lipschitz criterion needs the float model (ClipContext.model)"
    node = ctx.model.nodes[ctx.node]
    in_shape = _value_shapes(ctx.model)[node.inputs[0]]
    x = np.asarray(values, dtype=np.float64).ravel()
    _, kshape = channel_operator(x, node, in_shape)
    a0, b0 = clip_range(x, "minmax", ctx)
    k_n, ratio, iters = ctx.ptq.lipschitz_grid, ctx.ptq.lipschitz_ratio, ctx.ptq.lipschitz_iters
    pow2 = ctx.qc.scheme == "pow2"
    out, seen = [], {}
    for k in range(1, k_n + 1):
        a, b = a0 * k / k_n, b0 * k / k_n
        q = quantizer(a, b, ctx.bits, ctx.symmetric, True, pow2)
        key = (q.scale, q.zero)
        if key not in seen:
            wq = fake_quant(x, q)
            sq = spectral_norm(layer_operator(wq.reshape(kshape), node.kind, in_shape, node.stride, node.padding),
                               iters, ctx.ptq.seed)
            se = spectral_norm(layer_operator((x - wq).reshape(kshape), node.kind, in_shape, node.stride,
                                              node.padding), iters, ctx.ptq.seed)
            seen[key] = ratio * sq + se
        out.append((a, b, seen[key]))
    return out


def lipschitz_clipping(values: np.ndarray, ctx: ClipContext) -> tuple[float, float]:
    """The ``lipschitz`` clipping rule (registered with :func:`qverify.quantize.register_clipping`): for weights
    the candidate range of smallest bound ``B`` (first on ties), for activations the MSE search."""
    from qverify.quantize import clip_range

    if ctx.what != "weight":
        return clip_range(values, "mse", ctx)
    cands = lipschitz_bounds(values, ctx)
    best = min(range(len(cands)), key=lambda i: (cands[i][2], i))
    return cands[best][0], cands[best][1]


def register() -> None:
    """Register :func:`lipschitz_clipping` as the ``lipschitz`` clipping method."""
    from qverify.quantize import register_clipping

    register_clipping("lipschitz", lipschitz_clipping)
