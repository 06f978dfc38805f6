"""Training objectives: natural cross entropy, the QA-IBP objective, and classic IBP / CROWN-IBP-style kappa mixing.

With ``z`` the real logits, ``[l, u]`` the quantization-aware interval bounds of the outputs over the input box of
radius ``eps(t)`` (:mod:`qverify.train.bounds_ibp`), ``s`` the output scale and ``lb_j = s (l_y - u_j)`` the lower
bound of the margin ``z_y - z_j``:

* QA-IBP (``robust = "hinge"``)::

      L = kappa(t) CE(z, y) + lambda(t) * mean_b sum_{j != y} max(0, margin - lb_j) + rho(t) * W

  where ``W`` is the bound-width regularizer: the mean over hidden activation layers of the mean real width
  ``s_l (u - l)`` of their bounds (it rewards tight, stable intermediate bounds);
* IBP (``robust = "ce"``, Gowal et al. 2018; the kappa schedule of CROWN-IBP, Zhang et al. 2020)::

      L = kappa(t) CE(z, y) + lambda(t) CE(z_worst, y) + rho(t) W,   z_worst = s * (l_y, u_{j != y})

  (the trainer sets ``lambda = 1 - kappa`` for the ``ibp`` methods, ``kappa`` ramping from 1 to ``kappa_end``);
* plain QAT: ``kappa = 1``, ``lambda = rho = 0`` (no bounds are computed);
* CROWN-IBP (``beta > 0``, any robust term): ``lb = beta lb_CROWN-IBP + (1 - beta) lb_IBP`` in place of the interval
  margin bounds (Zhang et al. 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qverify.train.bounds_crown import crown_ibp_margins
from qverify.train.bounds_ibp import (
    certified_by_bounds,
    input_box,
    interval_bounds,
    margin_lower_bounds,
    worst_case_logits,
)
from qverify.train.layers import QAffine, QuantNet

ROBUST_TERMS = ("hinge", "ce")


@dataclass(frozen=True)
class LossStats:
    """Per-batch figures (floats, detached) for progress bars and history."""

    loss: float
    natural: float
    robust: float
    width: float
    correct: int
    certified: int
    n: int


def hinge_loss(lb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean_b sum_{j != y_b} max(0, margin - lb[b, j])`` (``lb`` real margin lower bounds ``[B, K]``)."""
    mask = 1.0 - F.one_hot(torch.as_tensor(labels, dtype=torch.int64), lb.shape[1]).to(lb.dtype)
    return (F.relu(margin - lb) * mask).sum(dim=1).mean()


def width_regularizer(model: QuantNet, bounds: list[tuple[torch.Tensor, torch.Tensor]],
                      params: list) -> torch.Tensor:
    """Mean over hidden affine blocks of the mean real width of their activation bounds."""
    terms = []
    for blk, p, s in zip(model.blocks, params, model.block_starts(), strict=True):
        if isinstance(blk, QAffine) and not blk.last:
            lo, hi = bounds[s + blk.n_layers]  # the block's activation
            scale = torch.exp2(p.out_log2).reshape(()) if model.quantized else 1.0
            terms.append(((hi - lo) * scale).mean())
    if not terms:
        return torch.zeros((), dtype=bounds[0][0].dtype)
    return torch.stack(terms).mean()


def objective(model: QuantNet, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float, lam: float,
              rho: float, robust: str = "hinge", margin: float = 0.5,
              beta: float = 0.0) -> tuple[torch.Tensor, LossStats]:
    """The training loss of one batch (module docstring) and its statistics.

    ``x`` integer pixels ``[B, ...]``, ``y`` labels, ``eps`` the (real-valued) training radius in input units.
    Bounds are computed only when ``eps > 0`` and a bound term has weight; ``certified`` counts the samples the
    batch's interval bounds at this ``eps`` prove robust. ``beta > 0``: the margin lower bounds of the robust term
    are ``beta lb_CROWN-IBP + (1 - beta) lb_IBP`` (:func:`qverify.train.bounds_crown.crown_ibp_margins`); the CE
    term then reads ``CE(-s lb, y)``, which is ``CE(z_worst, y)`` when ``beta = 0``.
    """
    if robust not in ROBUST_TERMS:
        raise ValueError(f"robust term must be one of {ROBUST_TERMS}, got {robust!r}")
    params = model.block_params()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    vals = model.layer_values(x, params)
    scale = model.output_scale(params)
    logits = vals[-1].reshape(-1, model.n_classes) * scale
    nat = F.cross_entropy(logits, y)
    loss = kappa * nat if kappa != 1.0 else nat
    rob, width = zero, zero
    certified = 0
    if eps > 0 and (lam > 0 or rho > 0):
        lo, hi = input_box(x, eps, 0, model.input_hi)
        bounds = interval_bounds(model, lo, hi, params)
        out_lo = bounds[-1][0].reshape(-1, model.n_classes)
        out_hi = bounds[-1][1].reshape(-1, model.n_classes)
        if lam > 0:
            lb = margin_lower_bounds(out_lo, out_hi, y)
            if beta > 0:
                lb = beta * crown_ibp_margins(model, lo, hi, y, params, bounds) + (1.0 - beta) * lb
            if robust == "hinge":
                rob = hinge_loss(lb * scale, y, margin)
            elif beta > 0:
                rob = F.cross_entropy(-lb * scale, y)
            else:
                rob = F.cross_entropy(worst_case_logits(out_lo, out_hi, y) * scale, y)
            loss = loss + lam * rob
        if rho > 0:
            width = width_regularizer(model, bounds, params)
            loss = loss + rho * width
        with torch.no_grad():
            certified = int(certified_by_bounds(out_lo.detach(), out_hi.detach(), y).sum())
    with torch.no_grad():
        correct = int((torch.argmax(logits.detach(), dim=1) == y).sum())
    stats = LossStats(float(loss.detach()), float(nat.detach()), float(rob.detach()), float(width.detach()),
                      correct, certified, int(len(y)))
    return loss, stats
