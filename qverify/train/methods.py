"""Robust-quantization training objectives: adversarial training (PGD, FGSM-RS) and gradient l1 regularization.

Units. Inputs are integer pixels on the grid ``[0, input_hi]``; the radius ``eps`` is in pixels, the trainer's
convention (``train.eps``; it ramps with the trainer's schedule like the bound-based methods' radius). Step sizes
are fractions of ``eps`` (``train.pgd_alpha``, ``train.fgsm_alpha``), so they follow the ramp.

Adversarial training (``train.method = "pgd-at"``; Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning
Models Resistant to Adversarial Attacks", ICLR 2018). The training loss is the cross entropy at the worst case
found by projected gradient ascent in the l-inf ball, on the **fake-quantized** model ``f_q`` (the exact integer
forward of :class:`~qverify.train.layers.QuantNet`, straight-through gradients through rounding and clamps)::

    L = CE(f_q(x_adv), y),   x^0 = x + U(-eps, eps),
    x^{t+1} = Pi_{B(x, eps) cap [0, input_hi]} (x^t + alpha sign(grad_x CE(f_q(x^t), y))),   t < T,

with ``T = train.pgd_steps`` (default 40), ``alpha = train.pgd_alpha * eps`` (default ``eps / 30``: the paper's
MNIST setting, step 0.01 at eps 0.3 over 40 steps) and ``train.pgd_restarts`` random starts (default 1, as in the
paper's training; the restart with the largest per-sample loss is kept).

FGSM with a random start (``"fgsm-rs"``; Wong, Rice, Kolter, "Fast is better than free: revisiting adversarial
training", ICLR 2020): one step from a uniform random start, ``alpha = train.fgsm_alpha * eps`` (default
``1.25 eps``, the paper's choice)::

    x_adv = Pi_{B(x, eps) cap [0, input_hi]} (x + delta_0 + alpha sign(grad_x CE(f_q(x + delta_0), y))),
    delta_0 ~ U(-eps, eps).

Grid. With ``train.adv_grid`` (default true) the final example is rounded to the nearest integer pixel and clamped
to the integer box ``[x - floor(eps), x + floor(eps)] cap [0, input_hi]``: the example is an input of the deployed
integer network, not a point between its pixels (the ascent steps themselves move on real values, where the
fake-quantized model's rounding is relaxed, :func:`qverify.train.layers.round_real`). ``eps < 1`` then leaves
``x`` itself; set ``adv_grid = false`` to train on the real-valued examples.

Gradient l1 regularization (``"grad-l1"``; Alizadeh, Behboodi, van Baalen, Louizos, Blankevoort, Welling,
"Gradient l1 Regularization for Quantization Robustness", ICLR 2020). Quantizing weights or activations is a
bounded perturbation ``||dW||_inf <= Delta / 2``; to first order the loss moves by
``<grad_W L, dW> <= Delta / 2 ||grad_W L||_1`` (the l1 norm is the dual of the l-inf ball), so a small l1 norm
of the gradient makes the model robust to every bit width at once. The **float** model is trained with::

    L = CE + lambda_w sum_l ||grad_{W_l} CE||_1 + lambda_a sum_l mean_b ||grad_{a_l} CE_b||_1

by double back-propagation (``torch.autograd.grad(..., create_graph=True)``), where ``CE`` is the batch mean,
``W_l`` each affine layer's weight tensor (biases are not regularized: the paper's term is on the weights) and
``a_l`` each affine block's activated output (hidden ReLU outputs and the logits: the values the integer network
requantizes), the activation term taken per sample (``CE_b`` the sample's loss) and averaged over the batch. The
paper's term is on the weights; the activation term applies the same first-order argument to the activations'
quantization noise. Defaults ``lambda_w = lambda_a = 0.05`` (the strength the paper reports for its CIFAR-10
models, as we read it; a setting: ``train.lambda_w``, ``train.lambda_a``). In the trainer both ramp like the
bound-based methods' ``lambda`` (``f(t) lambda_w``: plain float training during ``warmup_epochs``, then a linear ramp
over ``ramp_epochs``): from a random initialization the full regularizer first flattens the loss surface at the
uniform prediction (measured: 24 % instead of 85 % held-out accuracy after 3 epochs on ``digits``), so it is switched on
once the model fits. The run ends, as ``float-ibp`` does, with
a post-training quantization at the config's widths for the exported ``.qnn``; the checkpoint keeps the float model,
which ``qverify quantize`` quantizes on demand to 8/6/4/2 bits (:func:`qverify.quantize.from_checkpoint`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qverify.train.layers import QAffine, QuantNet
from qverify.train.loss import LossStats

#: methods of this module: adversarial training on the fake-quantized model, and the float gradient-l1 training
ADVERSARIAL = ("pgd-at", "fgsm-rs")
GRAD_L1 = "grad-l1"


def _project(v: torch.Tensor, x: torch.Tensor, eps: float, hi: int) -> torch.Tensor:
    """The nearest point of ``B_inf(x, eps) cap [0, hi]`` (coordinate-wise clamps)."""
    return torch.minimum(torch.maximum(v, x - eps), x + eps).clamp(0.0, float(hi))


def to_grid(v: torch.Tensor, x: torch.Tensor, eps: float, hi: int) -> torch.Tensor:
    """``v`` rounded to the integer pixel grid inside ``[x - floor(eps), x + floor(eps)] cap [0, hi]`` (``x``
    integer pixels): an input of the integer network within the ball."""
    r = math.floor(eps + 1e-9)
    return torch.minimum(torch.maximum(torch.round(v), x - r), x + r).clamp(0.0, float(hi))


def _per_sample_ce(model: QuantNet, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(v), y, reduction="none")


def linf_attack(model: QuantNet, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                restarts: int = 1, random_start: bool = True, grid: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """An l-inf adversarial example of ``model`` (module docstring): PGD with ``steps`` steps of size ``alpha``
    (pixels) from ``restarts`` uniform random starts (``steps = 1``, ``alpha = 1.25 eps``: FGSM-RS), keeping per
    sample the restart of largest cross entropy; ``grid``: the result is rounded to the integer grid in the ball.
    ``x`` integer pixels ``[B, ...]``. The model's parameters get no gradient (gradients are taken w.r.t. the
    input only); the result is detached."""
    x0 = torch.as_tensor(x).to(torch.float64).reshape((-1, *model.input_shape))
    hi = model.input_hi
    if eps <= 0:
        return x0.clone()
    best, best_loss = x0.clone(), None
    for _ in range(max(1, restarts)):
        if random_start:
            u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
            v = _project(x0 + (2.0 * u - 1.0) * eps, x0, eps, hi)
        else:
            v = x0.clone()
        for _ in range(steps):
            v = v.detach().requires_grad_(True)
            loss = _per_sample_ce(model, v, y).sum()
            (g,) = torch.autograd.grad(loss, v)
            v = _project(v.detach() + alpha * torch.sign(g), x0, eps, hi)
        v = to_grid(v.detach(), x0, eps, hi) if grid else v.detach()
        with torch.no_grad():
            lv = _per_sample_ce(model, v, y)
        if best_loss is None:
            best, best_loss = v, lv
        else:
            better = lv > best_loss
            best = torch.where(better.reshape((-1,) + (1,) * (v.ndim - 1)), v, best)
            best_loss = torch.maximum(lv, best_loss)
    return best


def adversarial_objective(model: QuantNet, x: torch.Tensor, y: torch.Tensor, eps: float, method: str,
                          pgd_steps: int = 40, pgd_alpha: float = 1.0 / 30.0, pgd_restarts: int = 1,
                          fgsm_alpha: float = 1.25, grid: bool = True,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, LossStats]:
    """``CE(f_q(x_adv), y)`` for ``method`` ``pgd-at`` or ``fgsm-rs`` (module docstring; ``eps = 0``: the clean
    loss, plain QAT); the statistics carry the clean loss as ``natural`` and the adversarial one as ``robust``,
    ``certified`` is 0 (a failed attack proves nothing)."""
    if method not in ADVERSARIAL:
        raise ValueError(f"adversarial method must be one of {ADVERSARIAL}, got {method!r}")
    if method == "pgd-at":
        x_adv = linf_attack(model, x, y, eps, pgd_alpha * eps, pgd_steps, pgd_restarts, grid=grid,
                            generator=generator)
    else:
        x_adv = linf_attack(model, x, y, eps, fgsm_alpha * eps, 1, 1, grid=grid, generator=generator)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y)
    with torch.no_grad():
        clean = model(x)
        nat = F.cross_entropy(clean, y)
        correct = int((torch.argmax(clean, dim=1) == y).sum())
    return loss, LossStats(float(loss.detach()), float(nat), float(loss.detach()), 0.0, correct, 0, int(len(y)))


def grad_l1_terms(model: QuantNet, x: torch.Tensor, y: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(CE, sum_l ||grad_{W_l} CE||_1, sum_l mean_b ||grad_{a_l} CE_b||_1, logits)`` of the model in its current
    mode (float for ``grad-l1``), the two norms differentiable (double back-propagation: module docstring)."""
    params = model.block_params()
    vals = model.layer_values(x, params)
    logits = vals[-1].reshape(-1, model.n_classes) * model.output_scale(params)
    per = F.cross_entropy(logits, y, reduction="none")
    ce = per.mean()
    weights = [b.weight for b in model.blocks if isinstance(b, QAffine)]
    acts = [vals[s + 2] for b, s in zip(model.blocks, model.block_starts(), strict=True) if isinstance(b, QAffine)]
    gw = torch.autograd.grad(ce, weights, create_graph=True)
    ga = torch.autograd.grad(per.sum(), acts, create_graph=True)  # per-sample gradients (samples are independent)
    n = max(1, len(y))
    w_term = torch.stack([g.abs().sum() for g in gw]).sum()
    a_term = torch.stack([g.abs().sum() for g in ga]).sum() / n
    return ce, w_term, a_term, logits


def grad_l1_objective(model: QuantNet, x: torch.Tensor, y: torch.Tensor, lambda_w: float = 0.05,
                      lambda_a: float = 0.05) -> tuple[torch.Tensor, LossStats]:
    """``CE + lambda_w sum_l ||grad_W_l CE||_1 + lambda_a sum_l mean_b ||grad_a_l CE_b||_1`` (module docstring);
    ``robust`` in the statistics is the weighted regularizer."""
    if lambda_w < 0 or lambda_a < 0:
        raise ValueError(f"lambda_w and lambda_a must be >= 0, got {lambda_w}, {lambda_a}")
    ce, w_term, a_term, logits = grad_l1_terms(model, x, y)
    reg = lambda_w * w_term + lambda_a * a_term
    loss = ce + reg
    with torch.no_grad():
        correct = int((torch.argmax(logits.detach(), dim=1) == y).sum())
    return loss, LossStats(float(loss.detach()), float(ce.detach()), float(reg.detach()), 0.0, correct, 0,
                           int(len(y)))
