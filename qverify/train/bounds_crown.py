"""Differentiable CROWN-IBP margin bounds (Zhang et al., ICLR 2020) over a :class:`qverify.train.QuantNet`.

CROWN-IBP takes the intermediate bounds from interval propagation (:mod:`qverify.train.bounds_ibp`) and bounds the
margins ``z_y - z_j`` by one backward linear pass from the output. With ``Lambda = C`` (the rows ``e_y - e_j``)
and ``b = 0``, each block is passed backwards:

* activation ``phi(a) = clamp(R(a M), lo, hi)`` on ``a in [l, u]`` (the IBP bounds of the accumulator): a lower and
  an upper line ``alpha_l a + beta_l <= phi(a) <= alpha_u a + beta_u``; positive entries of ``Lambda`` take the
  lower line, negative ones the upper: ``b += Lambda+ beta_l + Lambda- beta_u``,
  ``Lambda <- Lambda+ alpha_l + Lambda- alpha_u``;
* affine ``a = W x + B``: ``b += Lambda B``, ``Lambda <- Lambda W`` (a transposed convolution for conv layers);
* a residual conv ``a = W h + B + k x`` (``resnet``, :mod:`qverify.train.layers`): besides ``Lambda W`` to ``h``,
  the rows ``Lambda k`` go to the block input ``x`` and are added to the rows that reach ``x`` through the block's
  first conv (the backward pass of a graph: a value read twice sums its rows);

and at the input box ``[lo, hi]``: ``lb = b + Lambda+ lo + Lambda- hi``, a lower bound of every margin.

**Lines of the quantized activation.** The rounding stays within ``R(v) in [v - d_l, v + d_h]`` (half modes
``d = 1/2``; floor ``d_l = 1, d_h = 0``), and clamp is monotone, so ``clamp(aM - d_l) <= phi(a) <= clamp(aM + d_h)``;
each side is a clamped line, bounded by a line on ``[l, u]``: the line itself where the clamp is inactive, the
chord where the clamped piece is concave (lower line) or convex (upper line), CROWN's adaptive choice between the
line and a constant where it is convex (lower) or concave (upper), and the exact interval ends ``phi(l)``, ``phi(u)``
(constants) when the clamp is active over the whole range or on both sides. In float mode the activation is ReLU
(``M = 1``, ``d = 0``, ``[0, inf)``) and the last layer the identity: classic CROWN-IBP.

The bounds are a training signal (float64, tolerance-free only up to float rounding, tested for soundness on
sampled points of the executor); verdicts come from :mod:`qverify.bounds.interval` and the exact encodings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qverify.quant import Rounding
from qverify.train.bounds_ibp import Interval, interval_bounds
from qverify.train.layers import DTYPE, BlockParams, QAffine, QConv2d, QuantNet

_INF = float("inf")


def _line_bounds(l: torch.Tensor, u: torch.Tensor, m: torch.Tensor | float, d_lo: float, d_hi: float, lo: float,
                 hi: float, q_lo: torch.Tensor, q_hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(alpha_l, beta_l, alpha_u, beta_u)`` with ``alpha_l a + beta_l <= phi(a) <= alpha_u a + beta_u`` on
    ``[l, u]`` (module docstring); ``q_lo = phi(l)``, ``q_hi = phi(u)`` are the exact interval ends."""
    m = torch.as_tensor(m, dtype=l.dtype, device=l.device)
    width = u - l
    flat = width <= 0
    w = torch.where(flat, torch.ones_like(width), width)
    zero = torch.zeros_like(l)
    # lower side: clamp(t) with t = a m - d_lo on [tl, tu]
    tl, tu = l * m - d_lo, u * m - d_lo
    inside = (tl >= lo) & (tu <= hi)
    convex = (tl < lo) & (tu > lo) & (tu <= hi)              # max(lo, t): the line t, or the constant
    concave = (tl >= lo) & (tl < hi) & (tu > hi)             # min(t, hi): the chord lies below
    use_line = inside | (convex & ((tu - lo) > (lo - tl)))
    chord_l = (hi - tl) / w
    a_l = torch.where(use_line, m, torch.where(concave, chord_l, zero))
    b_l = torch.where(use_line, torch.full_like(l, -d_lo), torch.where(concave, tl - chord_l * l, q_lo))
    # upper side: clamp(t') with t' = a m + d_hi
    sl, su = l * m + d_hi, u * m + d_hi
    inside_u = (sl >= lo) & (su <= hi)
    convex_u = (sl < lo) & (su > lo) & (su <= hi)            # max(lo, t'): the chord lies above
    concave_u = (sl >= lo) & (sl < hi) & (su > hi)           # min(t', hi): the line t', or the constant
    use_line_u = inside_u | (concave_u & ((su - hi) < (hi - sl)))
    chord_u = (su - lo) / w
    a_u = torch.where(use_line_u, m, torch.where(convex_u, chord_u, zero))
    b_u = torch.where(use_line_u, torch.full_like(l, d_hi), torch.where(convex_u, lo - chord_u * l, q_hi))
    a_l, a_u = torch.where(flat, zero, a_l), torch.where(flat, zero, a_u)
    b_l, b_u = torch.where(flat, q_lo, b_l), torch.where(flat, q_hi, b_u)
    return a_l, b_l, a_u, b_u


def _rounding_slack(mode: Rounding) -> tuple[float, float]:
    """``(d_l, d_h)`` with ``v - d_l <= R(v) <= v + d_h``."""
    return (1.0, 0.0) if mode is Rounding.FLOOR else (0.5, 0.5)


def _activation_lines(blk: QAffine, p: BlockParams, acc: Interval, act: Interval, quantized: bool
                      ) -> tuple[torch.Tensor, ...]:
    l, u = acc
    if quantized:
        assert p.mult is not None
        d_lo, d_hi = _rounding_slack(blk.qc.mode)
        return _line_bounds(l, u, p.mult, d_lo, d_hi, float(blk.lo), float(blk.hi), act[0], act[1])
    if blk.last:
        return _line_bounds(l, u, 1.0, 0.0, 0.0, -_INF, _INF, act[0], act[1])
    return _line_bounds(l, u, 1.0, 0.0, 0.0, 0.0, _INF, act[0], act[1])


def _back_affine(blk: QAffine, p: BlockParams, lam: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """``Lambda W`` for ``Lambda`` of shape ``[B, K, *out_shape]``; returns ``[B, K, *in_shape]``."""
    B, K = lam.shape[:2]
    if isinstance(blk, QConv2d):
        flat = lam.reshape(B * K, *lam.shape[2:])
        k = p.weight.shape[-1]
        out_pad = [in_shape[d + 1] - ((lam.shape[3 + d] - 1) * blk.stride - 2 * blk.padding + k) for d in (0, 1)]
        back = F.conv_transpose2d(flat, p.weight, stride=blk.stride, padding=blk.padding, output_padding=out_pad)
        return back.reshape(B, K, *in_shape)
    return lam @ p.weight


def crown_ibp_margins(model: QuantNet, lo: torch.Tensor, hi: torch.Tensor, labels: torch.Tensor,
                      params: list[BlockParams | None] | None = None,
                      ibp: list[Interval] | None = None) -> torch.Tensor:
    """CROWN-IBP lower bounds ``[B, n_classes]`` of the margins ``z_y - z_j`` in output units over the input boxes
    ``[lo, hi]`` (column ``j = y`` is 0); ``ibp``: the interval bounds of these boxes when already computed."""
    params = model.block_params() if params is None else params
    ib = interval_bounds(model, lo, hi, params) if ibp is None else ibp
    q = model.quantized
    labels = torch.as_tensor(labels, dtype=torch.int64, device=ib[0][0].device)
    B, n = labels.shape[0], model.n_classes
    k = n - 1
    eye = torch.eye(n, dtype=DTYPE, device=labels.device)
    # the other classes of each sample: others[b, r] = r + (r >= y_b), so row r is e_y - e_{others[b, r]}
    others = torch.arange(k, device=labels.device)[None, :].expand(B, k)
    others = others + (others >= labels[:, None]).to(others.dtype)
    lam = eye[labels][:, None, :] - eye[others]               # [B, K, n] with K = n - 1
    bias = torch.zeros((B, k), dtype=DTYPE, device=labels.device)
    starts = model.block_starts()
    pending: dict[int, torch.Tensor] = {}  # rows of a residual skip, over the input of the block they reach
    for i in range(len(model.blocks) - 1, -1, -1):
        blk, p, s = model.blocks[i], params[i], starts[i]
        if isinstance(blk, QAffine):
            assert p is not None
            acc, act = ib[s + blk.n_layers - 1], ib[s + blk.n_layers]
            a_l, b_l, a_u, b_u = _activation_lines(blk, p, acc, act, q)
            lam = lam.reshape(B, k, *acc[0].shape[1:])
            pos = lam >= 0
            dims = tuple(range(2, lam.ndim))
            bias = bias + (lam * torch.where(pos, b_l[:, None], b_u[:, None])).sum(dim=dims)
            lam = lam * torch.where(pos, a_l[:, None], a_u[:, None])
            bshape = (1, 1, -1) + (1,) * (lam.ndim - 3)
            bias = bias + (lam * p.bias.reshape(bshape)).sum(dim=dims)
            if blk.residual:  # acc = conv(h) + k x: the rows over acc reach x (the input of block i - 1) times k
                assert p.skip is not None
                pending[i - 1] = lam * (p.skip.reshape(bshape) if p.skip.numel() > 1 else p.skip)
            lam = _back_affine(blk, p, lam, tuple(ib[s][0].shape[1:]))
        else:
            lam = lam.reshape(B, k, *ib[s][0].shape[1:])
        if i in pending:
            lam = lam + pending.pop(i).reshape(lam.shape)
    x_lo, x_hi = ib[0]
    lam = lam.reshape(B, k, *x_lo.shape[1:])
    dims = tuple(range(2, lam.ndim))
    lb = bias + (lam * torch.where(lam >= 0, x_lo[:, None], x_hi[:, None])).sum(dim=dims)
    out = torch.zeros((B, n), dtype=DTYPE, device=labels.device)
    return out.scatter(1, others, lb)
