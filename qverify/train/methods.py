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

BinaryRelax with a trade-off loss (``"binaryrelax"``; Yin, Zhang, Lyu, Osher, Qi, Xin, "BinaryRelax: A Relaxation
Approach for Training Deep Neural Networks with Quantized Weights", SIAM J. Imaging Sci. 2018; its adversarial
use: Li, Wang, Xin, arXiv 2008.13305). The quantization constraint ``W in Q`` is relaxed into the Moreau-envelope
penalty ``eta/2 dist(W, Q)^2``, whose minimizer is the pseudo-quantized weight the forward pass uses::

    G = (eta Q(W) + W) / (1 + eta),       eta_e = eta_0 rho^e  (epoch e of quantized training),

the latent float ``W`` updated by the gradient at ``G`` (``dG/dW = 1``, ``Q`` straight through:
:func:`qverify.train.wquant.relax`); in the last ``train.br_hard_epochs`` epochs the hard projection ``G = Q(W)``
(the paper's second phase), so the trained model, its checkpoint and the exported network are exactly quantized.
Defaults ``eta_0 = 1``, ``rho = 1.02`` per epoch (``train.br_eta0``, ``train.br_rho``: the continuation as we
read the paper's experiments; not re-checked against its text here), ``br_hard_epochs = 2``. ``Q`` per layer by its
width ``quant.weight_bits``: 1 binary ``alpha sign(W)`` (``alpha = mean |W|``), 2 ternary (TWN: ``delta = 0.7
mean |W|``, ``alpha`` the mean of the kept ``|W|``), 4 the narrow 4-bit grid with a least-squares ``alpha``;
``alpha`` per layer or per output channel (``quant.per_channel``) (:mod:`qverify.train.wquant`). The exported
weights are the codes in ``{-1, 0, 1}`` (``{-7..7}``); ``alpha`` is folded into the requantization multiplier
``s_in alpha / s_out`` (rounded to ``quant.mult_bits`` significant bits, the multiplier the torch forward uses).
The loss trades natural against adversarial cross entropy::

    L = (1 - beta) CE(f_G(x), y) + beta CE(f_G(x_adv), y),      beta = train.br_beta (default 0.5),

``x_adv`` the PGD example of :func:`linf_attack` on the current (relaxed) model with the ``pgd_*`` settings and the
radius ramp of ``pgd-at``. Li, Wang and Xin trade the natural loss against an adversarial one without fixing the
form here; this convex combination (TRADES-like in spirit, with the adversarial cross entropy instead of a KL term)
is the simplest reading, and ``beta`` is the setting. The channel sparsity the ternary projection produces (the
fraction of zero codes, and output channels whose codes are all zero) is logged per epoch
(:func:`weight_sparsity`).

Robustness-aware 2-bit quantization (``"robust2bit"``; Li, Jiang, Huang, Tian, arXiv 2010.11271). The 2-bit
weights are two binary bases with power-of-two scales, ``W ~ 2^a B_1 + 2^b B_2`` (shift-add inference), fitted
per layer or channel by alternating least squares with rounded exponents
(:func:`qverify.train.wquant.pow2_bases_exponents`); the exported weights are the integers ``2^(a-b) B_1 + B_2``
at the scale ``2^b``. The loss::

    L = CE(f_q(x), y) + lambda_f sum_l mean (phi_l^q(x) - phi_l^f(x))^2 + lambda_s sum_l sigma(Q(W_l)),

``phi_l^q`` the quantized model's hidden activations (real values) and ``phi_l^f`` the float model's on the same
batch (no gradient), ``sigma`` the spectral norm of the layer's quantized operator (dense matrix or conv operator,
:func:`qverify.lipschitz.layer_operator`; its top right singular vector ``v`` by ``train.spectral_iters`` power
iterations without gradient, then ``sigma = ||A v||`` with the live weights, whose gradient is ``u v^T``).
Readings where the paper leaves details open: its structural loss compares the quantized and the full-precision
model's features through a discriminator; the simplest reading that matches that description is a fixed
discriminator, the l2 distance of the features (feature matching), with weight ``train.feature_weight`` (default
0.1); the float model is the same network's latent float weights evaluated in float (the model the quantized
weights are fitted to), so no second model is trained or stored; the robustness term is the plain sum of the
layers' spectral norms, weight ``train.spectral_weight`` (default 0.01). Both weights follow the trainer's warm-up
and ramp (``f(t) lambda``), as ``grad-l1``'s do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qverify.lipschitz import layer_operator
from qverify.train.layers import QAffine, QConv2d, QuantNet
from qverify.train.loss import LossStats

#: methods of this module: adversarial training on the fake-quantized model, and the float gradient-l1 training
ADVERSARIAL = ("pgd-at", "fgsm-rs")
GRAD_L1 = "grad-l1"
BINARYRELAX = "binaryrelax"
ROBUST2BIT = "robust2bit"
#: the weight quantizer (``quant.weight_quantizer``) each method needs; every other method: ``uniform``
METHOD_WEIGHT_QUANTIZER = {BINARYRELAX: "binaryrelax", ROBUST2BIT: "pow2-bases"}


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
    acts = [vals[s + b.n_layers] for b, s in zip(model.blocks, model.block_starts(), strict=True)
            if isinstance(b, QAffine)]
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


# ------------------------------------------------------------------------------------------ BinaryRelax
def br_eta(epoch: int, epochs: int, start_epoch: int = 0, eta0: float = 1.0, rho: float = 1.02,
           hard_epochs: int = 2) -> float | None:
    """BinaryRelax's ``eta`` in ``epoch`` (module docstring): ``eta0 rho^(epoch - start_epoch)`` in the relaxed
    phase, ``None`` (the hard projection) in the last ``hard_epochs`` of ``epochs``."""
    if epoch >= epochs - hard_epochs:
        return None
    return float(eta0) * float(rho) ** max(0, epoch - start_epoch)


def set_relaxation(model: QuantNet, eta: float | None) -> None:
    """Every affine block's ``relax_eta`` (``None``: hard quantization)."""
    for blk in model.affine_blocks:
        blk.relax_eta = eta


def binaryrelax_objective(model: QuantNet, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float = 0.5,
                          pgd_steps: int = 40, pgd_alpha: float = 1.0 / 30.0, pgd_restarts: int = 1,
                          grid: bool = True, generator: torch.Generator | None = None,
                          ) -> tuple[torch.Tensor, LossStats]:
    """``(1 - beta) CE(f(x), y) + beta CE(f(x_adv), y)`` (module docstring; ``eps = 0``: the natural loss);
    ``natural`` and ``robust`` in the statistics are the two cross entropies."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"train.br_beta must be in [0, 1], got {beta}")
    logits = model(x)
    nat = F.cross_entropy(logits, y)
    if eps > 0 and beta > 0:
        x_adv = linf_attack(model, x, y, eps, pgd_alpha * eps, pgd_steps, pgd_restarts, grid=grid,
                            generator=generator)
        adv = F.cross_entropy(model(x_adv), y)
    else:
        adv = nat
    loss = (1.0 - beta) * nat + beta * adv
    with torch.no_grad():
        correct = int((torch.argmax(logits.detach(), dim=1) == y).sum())
    return loss, LossStats(float(loss.detach()), float(nat.detach()), float(adv.detach()), 0.0, correct, 0,
                           int(len(y)))


@torch.no_grad()
def weight_sparsity(model: QuantNet) -> dict[str, float | int]:
    """Sparsity of the hard-quantized weight codes (:mod:`qverify.train.wquant`; the uniform rounding otherwise):
    ``zero_weights`` the fraction of zero codes over every affine layer, ``zero_channels`` the number of output
    channels (rows, filters) whose codes are all zero, ``channels`` their total, and ``zero_channels_per_layer``
    (a list). The relaxation is switched off while it counts, and restored."""
    saved = [b.relax_eta for b in model.affine_blocks]
    set_relaxation(model, None)
    try:
        params = model.block_params()
    finally:
        for b, e in zip(model.affine_blocks, saved, strict=True):
            b.relax_eta = e
    zeros = total = zch = nch = 0
    per_layer = []
    for p in params:
        if p is None:
            continue
        w = p.weight.reshape(p.weight.shape[0], -1)
        zeros += int((w == 0).sum())
        total += w.numel()
        z = int((w == 0).all(dim=1).sum())
        per_layer.append(z)
        zch += z
        nch += w.shape[0]
    return {"zero_weights": zeros / max(1, total), "zero_channels": zch, "channels": nch,
            "zero_channels_per_layer": per_layer}


# ------------------------------------------------------------------------------------------ robust 2-bit
def _top_right_vector(op: tuple, iters: int, seed: int = 0) -> torch.Tensor:
    """The power iteration of :func:`qverify.lipschitz.spectral_norm` on ``A^T A``, returning the (unit) top right
    singular vector estimate ``[1, *in_shape]`` instead of the norm."""
    fwd, adj, shape = op
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn((1, *shape), generator=g, dtype=torch.float64)
    v = v / v.norm()
    with torch.no_grad():
        for _ in range(max(1, iters)):
            u = adj(fwd(v))
            nu = float(u.norm())
            if nu == 0.0:
                break
            v = u / nu
    return v


def spectral_terms(model: QuantNet, params: list, values: list[torch.Tensor], iters: int = 10,
                   ) -> list[torch.Tensor]:
    """Per affine block, ``sigma(Q(W_l))`` of its real-valued quantized weights ``s * codes`` (module docstring),
    differentiable in the weights (straight through the codes). ``params``/``values``: one quantized pass's
    :meth:`~qverify.train.layers.QuantNet.block_params` and :meth:`~qverify.train.layers.QuantNet.layer_values`."""
    out = []
    starts = model.block_starts()
    log2 = model.in_log2
    for blk, p, st in zip(model.blocks, params, starts, strict=True):
        if not isinstance(blk, QAffine):
            continue
        # the real weight scale: s_w = M s_out / s_in (M the dyadic multiplier the forward uses)
        s_w = (p.mult.reshape(-1) * torch.exp2(p.out_log2.reshape(())) / torch.exp2(torch.as_tensor(log2))).detach()
        w = p.weight * s_w.reshape((-1,) + (1,) * (p.weight.ndim - 1))
        in_shape = tuple(int(s) for s in values[st].shape[1:])
        if isinstance(blk, QConv2d):
            pad = (blk.padding,) * 4
            op = layer_operator(w.detach(), "conv", in_shape, (blk.stride, blk.stride), pad)
            v = _top_right_vector(op, iters)
            av = F.conv2d(F.pad(v, (blk.padding,) * 4), w, stride=blk.stride)
        else:
            op = layer_operator(w.detach(), "dense")
            v = _top_right_vector(op, iters)
            av = F.linear(v, w)
        out.append(av.norm())
        log2 = p.out_log2
    return out


def robust2bit_objective(model: QuantNet, x: torch.Tensor, y: torch.Tensor, feature_weight: float = 0.1,
                         spectral_weight: float = 0.01, spectral_iters: int = 10,
                         ) -> tuple[torch.Tensor, LossStats]:
    """``CE + lambda_f sum_l mean (phi_l^q - phi_l^f)^2 + lambda_s sum_l sigma(Q(W_l))`` (module docstring) of a
    model in quantized mode; ``robust`` in the statistics is the weighted sum of the two terms."""
    if not model.quantized:
        raise ValueError("robust2bit_objective needs a model in quantized mode")
    if feature_weight < 0 or spectral_weight < 0:
        raise ValueError(f"feature_weight and spectral_weight must be >= 0, got {feature_weight}, {spectral_weight}")
    params = model.block_params()
    vals = model.layer_values(x, params)
    logits = vals[-1].reshape(-1, model.n_classes) * model.output_scale(params)
    ce = F.cross_entropy(logits, y)
    reg = ce.new_zeros(())
    hidden = [(st + blk.n_layers, p) for blk, p, st in zip(model.blocks, params, model.block_starts(), strict=True)
              if isinstance(blk, QAffine) and not blk.last]
    if feature_weight > 0 and hidden:
        model.quantized = False  # the float model: the same latent weights, float forward
        try:
            with torch.no_grad():
                fvals = model.layer_values(x)
        finally:
            model.quantized = True
        feat = torch.stack([F.mse_loss(vals[i] * torch.exp2(p.out_log2.reshape(())), fvals[i]) for i, p in hidden])
        reg = reg + feature_weight * feat.sum()
    if spectral_weight > 0:
        reg = reg + spectral_weight * torch.stack(spectral_terms(model, params, vals, spectral_iters)).sum()
    loss = ce + reg
    with torch.no_grad():
        correct = int((torch.argmax(logits.detach(), dim=1) == y).sum())
    return loss, LossStats(float(loss.detach()), float(ce.detach()), float(reg.detach()), 0.0, correct, 0,
                           int(len(y)))
