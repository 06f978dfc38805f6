"""Differentiable quantization-aware interval bound propagation (QA-IBP) over a :class:`qverify.train.QuantNet`.

One definition, shared with the exact integer intervals of :mod:`qverify.bounds.interval`: for an input box
``[l, u]`` (integer units, per sample) every exported layer maps an interval to an interval,

* affine (dense / conv): ``mu = (l + u) / 2``, ``r = (u - l) / 2``, ``mu' = W mu + B``, ``r' = |W| r``,
  ``[l', u'] = [mu' - r', mu' + r']`` (which is ``W+ l + W- u + B`` and ``W+ u + W- l + B``, exact integers:
  ``mu`` and ``r`` are halves of integers and every sum stays far below ``2^53``);
* requantization ``clamp(R(acc * M_c), lo, hi)``, clamp and flatten: applied to both ends (they are monotone),
  with the model's exact rounding (:func:`qverify.quant.multiply_round` on integer accumulators);
* a residual conv's skip ``k_c x`` (``k_c >= 1``): ``[k_c l_x, k_c u_x]`` of the block input's bounds, and the
  add ``acc + k x``: ``[l_acc + l_skip, u_acc + u_skip]`` (sums of intervals; exact integers on integer boxes).

The propagation calls the same block functions as the model's forward pass (``QAffine.affine``, ``affine_abs``,
``activate``), so on integer boxes the returned list equals, layer by layer, the exact numpy intervals of the
exported :class:`~qverify.network.QNetwork`; gradients flow through the straight-through estimators of the
quantizers (training). Real-valued boxes (the epsilon ramp of training) give sound real relaxations.
In float mode (``model.quantized = False``) this is classic IBP in real units with ReLU.

The list follows :func:`qverify.execute.execute`: element 0 is the input box, element ``i + 1`` the bounds of
exported layer ``i``.
"""

from __future__ import annotations

import torch

from qverify.train.layers import DTYPE, BlockParams, QAffine, QConv2d, QuantNet

Interval = tuple[torch.Tensor, torch.Tensor]


def input_box(x: torch.Tensor, radius: float | torch.Tensor, input_lo: int, input_hi: int) -> Interval:
    """``[max(lo, x - r), min(hi, x + r)]`` on the input grid (``r`` in input units, may be real or per sample)."""
    x = torch.as_tensor(x).to(DTYPE)
    r = torch.as_tensor(radius, dtype=DTYPE)
    if r.ndim == 1:
        r = r.reshape((-1,) + (1,) * (x.ndim - 1))
    return (x - r).clamp(min=float(input_lo)), (x + r).clamp(max=float(input_hi))


def interval_bounds(model: QuantNet, lo: torch.Tensor, hi: torch.Tensor,
                    params: list[BlockParams | None] | None = None) -> list[Interval]:
    """Interval bounds of every exported layer for a batch of input boxes ``[lo, hi]`` (integer input units,
    ``[B, *input_shape]`` or ``[B, n]``); see the module docstring."""
    params = model.block_params() if params is None else params
    lo_v = model.prepare_input(lo)
    hi_v = model.prepare_input(hi)
    if bool(torch.any(lo_v > hi_v)):
        raise ValueError("empty input box (lo > hi)")
    out: list[Interval] = [(lo_v, hi_v)]
    q = model.quantized
    ins: list[Interval] = []
    for blk, p in zip(model.blocks, params, strict=True):
        ins.append((lo_v, hi_v))
        if isinstance(blk, QAffine):
            assert p is not None
            mu = (hi_v + lo_v) / 2
            r = (hi_v - lo_v) / 2
            c = blk.affine(mu, p)
            d = blk.affine_abs(r, p)
            lo_v, hi_v = c - d, c + d
            out.append((lo_v, hi_v))
            if blk.residual:  # k >= 1: the skip is monotone increasing
                assert isinstance(blk, QConv2d)
                s_lo, s_hi = blk.skip_term(ins[-2][0], p), blk.skip_term(ins[-2][1], p)
                out.append((s_lo, s_hi))
                lo_v, hi_v = lo_v + s_lo, hi_v + s_hi
                out.append((lo_v, hi_v))
            lo_v, hi_v = blk.activate(lo_v, p, q), blk.activate(hi_v, p, q)
        else:
            lo_v, hi_v = blk(lo_v), blk(hi_v)
        out.append((lo_v, hi_v))
    return out


def output_bounds(model: QuantNet, lo: torch.Tensor, hi: torch.Tensor,
                  params: list[BlockParams | None] | None = None) -> Interval:
    """Bounds ``[B, n_classes]`` of the output layer (units of the mode)."""
    lo_o, hi_o = interval_bounds(model, lo, hi, params)[-1]
    return lo_o.reshape(-1, model.n_classes), hi_o.reshape(-1, model.n_classes)


def margin_lower_bounds(out_lo: torch.Tensor, out_hi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``lb[b, j] = lo[b, y_b] - hi[b, j]``, a lower bound of the margin ``z_y - z_j`` over the box
    (``[B, K]``; the column ``j = y_b`` is 0)."""
    labels = torch.as_tensor(labels, dtype=torch.int64, device=out_lo.device)
    ly = out_lo.gather(1, labels[:, None])
    lb = ly - out_hi
    return lb.masked_fill(torch.nn.functional.one_hot(labels, out_lo.shape[1]).bool(), 0.0)


def certified_by_bounds(out_lo: torch.Tensor, out_hi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which samples the bounds prove robust under the ``first`` tie rule: for every ``j != y``,
    ``lo_y > hi_j`` when ``j < y`` (a tie would go to ``j``) and ``lo_y >= hi_j`` when ``j > y``."""
    lb = margin_lower_bounds(out_lo, out_hi, labels)
    labels = torch.as_tensor(labels, dtype=torch.int64, device=out_lo.device)
    j = torch.arange(out_lo.shape[1], device=out_lo.device)[None, :]
    before = j < labels[:, None]
    ok = torch.where(before, lb > 0, lb >= 0)
    return ok.all(dim=1)


def worst_case_logits(out_lo: torch.Tensor, out_hi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IBP's worst-case logits: ``lo`` for the label, ``hi`` for every other class."""
    labels = torch.as_tensor(labels, dtype=torch.int64, device=out_lo.device)
    mask = torch.nn.functional.one_hot(labels, out_lo.shape[1]).bool()
    return torch.where(mask, out_lo, out_hi)
