"""Weight quantizers of the binary / ternary / shift-add training methods: integer codes times a per-layer or
per-channel scale, ``Q(W) = s * codes``.

Each function takes a float weight tensor ``W`` ``[out, ...]`` (detached float64) and returns ``(codes, scale)``:
``codes`` integers held in float64 with ``W``'s shape, ``scale`` positive ``[out]`` (``per_channel``: one per
output channel, its row or filter) or ``[1]`` (per layer). The fake-quantized layer computes with ``codes`` and
folds ``scale`` into its requantization multiplier (:class:`qverify.train.layers.QAffine`), so the exported integer
network's weights are exactly ``codes``.

* binary (Rastegari et al.'s XNOR scaling, as used by BinaryRelax, Yin et al. 2018):
  ``codes = sign(W)`` (``sign(0) = +1``), ``alpha = mean |W|`` (the l2-optimal scale for fixed signs);
* ternary (Li, Zhang, Liu, "Ternary Weight Networks", 2016, the rule BinaryRelax uses):
  ``delta = 0.7 mean |W|``, ``codes = sign(W) [|W| > delta]``, ``alpha = mean_{|W| > delta} |W|``;
* ``b``-bit uniform (BinaryRelax's multi-bit case): narrow symmetric codes ``{-q..q}``, ``q = 2^(b-1) - 1``, and
  ``alpha`` by alternating least squares (Lloyd iterations) from ``alpha_0 = max |W| / q``:
  ``codes = clamp(rne(W / alpha), -q, q)``, ``alpha <- <W, codes> / <codes, codes>``, ``iters`` times, the codes
  recomputed from the last ``alpha``;
* two power-of-two binary bases (Li, Jiang, Huang, Tian, arXiv 2010.11271, 2-bit shift-add weights):
  ``W ~ 2^a B_1 + 2^b B_2``, ``B_i in {-1, +1}``, integers ``a >= b``, ``a - b <= max_span``; codes
  ``2^(a-b) B_1 + B_2`` times the scale ``2^b`` (:func:`pow2_bases`).

A layer (or channel) whose weights are all zero gets the scale 1 (its codes are 0 or +-1 times a zero-error fit
anyway), so no multiplier is 0.
"""

from __future__ import annotations

import torch

#: largest exponent gap of the two power-of-two bases: codes ``2^(a-b) B_1 + B_2`` stay within int8 (+-65)
MAX_SPAN = 6
#: exponents are clamped to this range (all-zero or tiny weights)
_EXP_LO, _EXP_HI = -40, 40


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``[C, n]`` (per channel) or ``[1, N]`` view of the weights."""
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _safe(alpha: torch.Tensor) -> torch.Tensor:
    return torch.where(alpha > 0, alpha, torch.ones_like(alpha))


@torch.no_grad()
def binary(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sign(W), mean |W|)`` with ``sign(0) = +1`` (module docstring)."""
    r = _rows(w, per_channel)
    codes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    return codes, _safe(r.abs().mean(dim=1))


@torch.no_grad()
def ternary(w: torch.Tensor, per_channel: bool = False, delta_factor: float = 0.7,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN: ``delta = delta_factor * mean |W|``, codes ``sign(W)`` where ``|W| > delta`` else 0, ``alpha`` the mean
    ``|W|`` of the kept entries (module docstring)."""
    r = _rows(w, per_channel)
    a = r.abs()
    delta = delta_factor * a.mean(dim=1, keepdim=True)
    keep = a > delta
    alpha = (a * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    codes = (torch.sign(r) * keep).reshape(w.shape).to(w.dtype)
    return codes, _safe(alpha)


@torch.no_grad()
def uniform(w: torch.Tensor, bits: int, per_channel: bool = False, iters: int = 3,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Narrow symmetric ``bits``-bit codes with a least-squares scale (module docstring)."""
    if bits < 2:
        raise ValueError(f"uniform weight codes need >= 2 bits, got {bits}")
    q = 2 ** (bits - 1) - 1
    r = _rows(w, per_channel)
    alpha = _safe(r.abs().amax(dim=1) / q)
    for _ in range(max(0, iters)):
        c = torch.clamp(torch.round(r / alpha[:, None]), -q, q)
        cc = (c * c).sum(dim=1)
        alpha = torch.where(cc > 0, (r * c).sum(dim=1) / cc.clamp(min=1), alpha)
        alpha = _safe(alpha)
    codes = torch.clamp(torch.round(r / alpha[:, None]), -q, q).reshape(w.shape)
    return codes, alpha


def _signs(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The signs of the nearest of the four levels ``+-2^a +-2^b`` (``a >= b``): ``B_1 = sign(r)`` (the levels of
    that sign are the nearer ones), ``B_2 = +1`` where ``|r| >= 2^a`` (the midpoint of ``2^a +- 2^b``)."""
    pa = torch.ldexp(torch.ones_like(a), a.to(torch.int64))[:, None]
    b1 = torch.where(r >= 0, 1.0, -1.0).to(r.dtype)
    b2 = b1 * torch.where(r.abs() >= pa, 1.0, -1.0).to(r.dtype)
    return b1, b2


def bases_error(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, ``min_{B_1, B_2} ||r - 2^a B_1 - 2^b B_2||^2`` (``r`` ``[C, n]``, exponents ``[C]``, ``a >= b``)."""
    b1, b2 = _signs(r, a, b)
    pa = torch.ldexp(torch.ones_like(a), a.to(torch.int64))[:, None]
    pb = torch.ldexp(torch.ones_like(b), b.to(torch.int64))[:, None]
    return ((r - pa * b1 - pb * b2) ** 2).sum(dim=1)


def _log2_round(c: torch.Tensor) -> torch.Tensor:
    return torch.round(torch.log2(c.clamp(min=2.0**_EXP_LO))).clamp(_EXP_LO, _EXP_HI)


@torch.no_grad()
def pow2_bases_exponents(w: torch.Tensor, per_channel: bool = False, iters: int = 10, max_span: int = MAX_SPAN,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer exponents ``(a, b)`` ``[C]`` of ``W ~ 2^a B_1 + 2^b B_2`` fitted by alternating least squares.

    1. Greedy start: ``a = round(log2 mean |W|)``, ``b = round(log2 mean |W - 2^a sign(W)|)``.
    2. ``iters`` rounds of: the signs of the nearest level for the current exponents (:func:`_signs`); the real
       scales ``(c_1, c_2)`` of the least-squares fit ``min ||W - c_1 B_1 - c_2 B_2||`` for those signs (the 2x2
       normal equations); the exponents ``round(log2 |c_i|)``, ordered ``a >= b`` and ``a - b <= max_span``.
    3. A local search on the integer lattice: move to the best of the pairs ``(a + da, b + db)``, ``da, db in
       {-1, 0, 1}``, while that lowers the error with the best signs (:func:`bases_error`); rounding the
       least-squares scales need not give the best pair of exponents, this step makes the result a local
       optimum over exponent pairs (tested equal to the brute-force optimum on small tensors).
    """
    r = _rows(w, per_channel)
    n = r.shape[1]
    a = _log2_round(r.abs().mean(dim=1))
    res = r - torch.ldexp(torch.ones_like(a), a.to(torch.int64))[:, None] * torch.sign(r)
    b = torch.minimum(_log2_round(res.abs().mean(dim=1)), a)

    def order(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        return hi, torch.maximum(lo, hi - max_span)

    a, b = order(a, b)
    for _ in range(max(0, iters)):
        b1, b2 = _signs(r, a, b)
        s12 = (b1 * b2).sum(dim=1)
        t1, t2 = (b1 * r).sum(dim=1), (b2 * r).sum(dim=1)
        det = n * n - s12 * s12
        ok = det > 0
        c1 = torch.where(ok, (n * t1 - s12 * t2) / torch.where(ok, det, 1.0), t1 / n)
        c2 = torch.where(ok, (n * t2 - s12 * t1) / torch.where(ok, det, 1.0), torch.zeros_like(t1))
        na = torch.where(c1.abs() > 0, _log2_round(c1.abs()), a)
        nb = torch.where(c2.abs() > 0, _log2_round(c2.abs()), b)
        na, nb = order(na, nb)
        if torch.equal(na, a) and torch.equal(nb, b):
            break
        # keep a round's exponents only where they do not raise the error (the rounding can)
        better = bases_error(r, na, nb) <= bases_error(r, a, b)
        a, b = torch.where(better, na, a), torch.where(better, nb, b)
    steps = [(da, db) for da in (-1, 0, 1) for db in (-1, 0, 1) if (da, db) != (0, 0)]
    for _ in range(4 * (_EXP_HI - _EXP_LO)):
        best_e = bases_error(r, a, b)
        best_a, best_b = a, b
        for da, db in steps:
            ca, cb = (a + da).clamp(_EXP_LO, _EXP_HI), (b + db).clamp(_EXP_LO, _EXP_HI)
            valid = (cb <= ca) & (ca - cb <= max_span)
            e = torch.where(valid, bases_error(r, ca, torch.minimum(cb, ca)), torch.full_like(best_e, torch.inf))
            take = e < best_e
            best_e = torch.where(take, e, best_e)
            best_a, best_b = torch.where(take, ca, best_a), torch.where(take, cb, best_b)
        if torch.equal(best_a, a) and torch.equal(best_b, b):
            break
        a, b = best_a, best_b
    return a, b


@torch.no_grad()
def pow2_bases(w: torch.Tensor, per_channel: bool = False, iters: int = 10, max_span: int = MAX_SPAN,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of the two-base fit (:func:`pow2_bases_exponents`): ``codes = 2^(a-b) B_1 + B_2``,
    ``scale = 2^b``, so ``scale * codes = 2^a B_1 + 2^b B_2`` exactly (shift-add inference: a code is one shifted
    sign plus another)."""
    a, b = pow2_bases_exponents(w, per_channel, iters, max_span)
    r = _rows(w, per_channel)
    b1, b2 = _signs(r, a, b)
    codes = torch.ldexp(torch.ones_like(a), (a - b).to(torch.int64))[:, None] * b1 + b2
    return codes.reshape(w.shape), torch.ldexp(torch.ones_like(b), b.to(torch.int64))


def weight_codes(w: torch.Tensor, kind: str, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and scale of quantizer ``kind`` (``binary``, ``ternary``, ``uniform``, ``pow2-bases``)."""
    if kind == "binary":
        return binary(w, per_channel)
    if kind == "ternary":
        return ternary(w, per_channel)
    if kind == "uniform":
        return uniform(w, bits, per_channel)
    if kind == "pow2-bases":
        return pow2_bases(w, per_channel)
    raise ValueError(f"unknown weight quantizer {kind!r}")


def relax(codes: torch.Tensor, w_units: torch.Tensor, eta: float | None) -> torch.Tensor:
    """BinaryRelax's pseudo-quantized weights in code units: ``G / s = (eta Q(W) / s + W / s) / (1 + eta)``, the
    hard projection ``Q(W) / s = codes`` when ``eta`` is ``None``. ``w_units = W / s`` carries the gradient;
    ``codes`` enter straight through (``dQ/dW = 1``), so ``dG/dW = 1`` and the latent weights receive the gradient
    at ``G`` (Yin et al. 2018, Algorithm 1)."""
    hard = w_units + (codes - w_units).detach()
    if eta is None:
        return hard
    return (eta * hard + w_units) / (1.0 + eta)
