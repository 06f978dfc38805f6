"""Bounds of split domains (beta-CROWN style) for chains of dense layers and requantizations / clamps.

A *domain* is the property's input box together with integer bounds ``l_k <= v_k <= u_k`` of the values ``v_k``
that the activation layers read (their accumulators). At the root these are the symbolic or optimized bounds of
the box; a neuron split (:mod:`qverify.neuron_bab`) replaces one neuron's ``[l, u]`` by ``[l, t]`` in one child
and ``[t + 1, u]`` in the other, so the integer points of the children partition those of the parent. The box
alone does not imply such bounds, so a domain's points are the inputs of the box *whose values lie in the
domain's bounds*; every bound below is a lower bound over those points.

**The bound of a row** ``c . y`` (``y`` the output) over ``D`` domains at once, per domain and row:

    c . y  >=  C + mu . x   over the box, with the terms that back-substitution collects:
    through an activation  v_{k+1} = f(v_k):   lam . v_{k+1} >= (lam+ aL + lam- aU) . v_k + lam+ . bL + lam- . bU
    through a dense layer  v_{k+1} = W v_k + b:   lam . v_{k+1} = (lam W) . v_k + lam . b
    at an activation's input v_k:   add  g_k . v_k - sum_j (g_kj+ u_kj + g_kj- l_kj)   (<= 0 on the domain)

The lines ``(aL, bL)``, ``(aU, bU)`` of each unstable neuron are any slopes ``a >= 0`` with the vertex offsets of
:func:`qverify.bounds.symbolic.relax` over the domain's ``[l, u]`` (alpha), and ``g`` are free multipliers of
the domain's bounds (beta; Wang et al., "Beta-CROWN: Efficient Bound Propagation with Per-neuron Split
Constraints", NeurIPS 2021). Both are chosen per domain and row by projected Adam on the float model of this
bound (:func:`optimize`; warm-started from the parent domain's choice), and the bound is then recomputed
*rigorously* (:func:`rigorous_lower`): slopes made exact by :func:`qverify.bounds.symbolic.exact_lines`, the
multipliers entered through the ``gamma`` terms of :func:`qverify.bounds.symbolic._backsub_lower` with their float
errors charged. No float number decides anything except through that rigorous step: a poor optimization only
gives a looser bound. Intermediate bounds are the parent's (the root's, tightened by the splits): valid on every
subdomain.

Scope: networks that :func:`qverify.bounds.optimized.supports` accepts (dense chains, the QVIP MLPs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from qverify.bounds.optimized import _IDENTITY, SLOPE_CAP, _Adam
from qverify.bounds.symbolic import ActParams, Relaxation, _backsub_lower, _chords, _to_float, exact_lines, relax
from qverify.network import Clamp, Dense, QNetwork, Requantize

#: exact levels per end in each relaxation (:func:`qverify.bounds.symbolic.relax`)
LEVELS = 3


def activation_layers(net: QNetwork) -> list[int]:
    """Indices ``i`` of the activation layers (their input is value ``i``, their output value ``i + 1``)."""
    return [i for i, op in enumerate(net.layers) if isinstance(op, Requantize | Clamp)]


@dataclass
class LayerRelax:
    """One activation layer's relaxation over ``D`` domains: DeepPoly lines ``rel`` ``[D, n]``, the unstable mask
    ``[D, n]``, the vertex sets of :func:`~qverify.bounds.symbolic.relax` (``vert``: object arrays over the
    unstable ``(bi, ji)`` pairs, with ``pos [D, n]`` their index there, ``-1`` elsewhere) and dense float copies
    ``XL, VL, XU, VU [D, n, K]``, slope caps ``smax [D, n]`` and the requantization slopes ``scale [n]``."""

    params: ActParams
    rel: Relaxation
    unstable: np.ndarray
    vert: dict
    pos: np.ndarray
    XL: np.ndarray
    VL: np.ndarray
    XU: np.ndarray
    VU: np.ndarray
    smax: np.ndarray
    scale: np.ndarray

    @classmethod
    def build(cls, net: QNetwork, i: int, lo: np.ndarray, hi: np.ndarray, levels: int = LEVELS,
              fit: bool = True) -> LayerRelax:
        """``fit=False``: no DeepPoly lines for the unstable neurons (their slopes come from a parent's choice;
        :func:`~qverify.bounds.symbolic.relax`)."""
        params = ActParams.of(net.layers[i], net.shapes[i + 1])
        vert: dict = {}
        rel = relax(params, lo, hi, levels=levels, vertices=vert, fit=fit)
        D, n = lo.shape
        unstable = np.zeros((D, n), dtype=bool)
        pos = np.full((D, n), -1, dtype=np.int64)
        scale = _to_float(params.p, params.q)
        K = 2 * levels + 4
        XL, VL, XU, VU = (np.zeros((D, n, K)) for _ in range(4))
        smax = np.ones((D, n))
        if vert and len(vert["bi"]):
            bi, ji = vert["bi"], vert["ji"]
            unstable[bi, ji] = True
            pos[bi, ji] = np.arange(len(bi))
            q = vert["q"]
            xl, xu = vert["XL"].astype(np.float64), vert["XU"].astype(np.float64)
            vl = np.stack([_to_float(vert["VL"][:, k], q) for k in range(vert["VL"].shape[1])], axis=1)
            vu = np.stack([_to_float(vert["VU"][:, k], q) for k in range(vert["VU"].shape[1])], axis=1)
            XL[bi, ji], VL[bi, ji], XU[bi, ji], VU[bi, ji] = xl, vl, xu, vu
            chord = np.maximum(_chords(xl, vl).max(axis=1), _chords(xu, vu).max(axis=1))
            smax[bi, ji] = np.maximum(np.minimum(chord, SLOPE_CAP * vert["slope"]), 1e-300)
        return cls(params, rel, unstable, vert, pos, XL, VL, XU, VU, smax, scale)


@dataclass
class Choice:
    """The optimized parameters of ``D`` domains with ``R`` rows each: per activation layer ``i`` the normalized
    slopes ``theta[i] = (tL, tU)`` in ``[0, 1]`` (``a = t smax``) and the scaled multipliers ``gam[i]`` (``g = gam
    scale``) of its input's bounds, all float64 ``[D, R, n_i]``."""

    theta: dict[int, tuple[np.ndarray, np.ndarray]]
    gam: dict[int, np.ndarray]

    def take(self, idx: np.ndarray) -> Choice:
        return Choice({k: (a[idx], b[idx]) for k, (a, b) in self.theta.items()},
                      {k: g[idx] for k, g in self.gam.items()})

    @classmethod
    def stack(cls, parts: list[Choice]) -> Choice:
        ks = parts[0].theta.keys()
        return Choice({k: (np.concatenate([p.theta[k][0] for p in parts]),
                           np.concatenate([p.theta[k][1] for p in parts])) for k in ks},
                      {k: np.concatenate([p.gam[k] for p in parts]) for k in parts[0].gam})


@dataclass
class FloatBounds:
    """:func:`optimize`'s result: the float model's row bounds ``lower [D, R]`` (a choice, not a proof), the
    optimized ``choice``, the coefficients ``mu [D, R, n_in]`` of the input at the end (their sign vertex is the
    domain's candidate point) and the coefficients ``act[i] [D, R, n_i]`` on each activation's output (for the
    split scores)."""

    lower: np.ndarray
    choice: Choice
    mu: np.ndarray
    act: dict[int, np.ndarray]


def initial_choice(layers: dict[int, LayerRelax], R: int) -> Choice:
    """DeepPoly's slopes and zero multipliers, ``R`` rows per domain."""
    theta, gam = {}, {}
    for i, L in layers.items():
        tl = np.clip(L.rel.aL / L.smax, 0.0, 1.0)
        tu = np.clip(L.rel.aU / L.smax, 0.0, 1.0)
        theta[i] = (np.repeat(tl[:, None], R, 1), np.repeat(tu[:, None], R, 1))
        gam[i] = np.zeros((L.smax.shape[0], R, L.smax.shape[1]))
    return Choice(theta, gam)


def _torch():
    import torch

    return torch


def optimize(net: QNetwork, flat: list[tuple[np.ndarray, np.ndarray]], layers: dict[int, LayerRelax],
             rows: np.ndarray, choice: Choice, steps: int, lr: float, deadline: float | None = None,
             glr: float | None = None, decay: float = 1.0) -> FloatBounds:
    """Float row bounds of ``rows [D, R, n_out]`` over ``D`` domains (``flat``: per value ``(lo, hi) [D, n_v]``;
    value 0 is the input box) by ``steps`` projected-Adam steps from ``choice`` on the slopes (in ``[0, 1]``) and
    multipliers (free). Each row keeps its best iterate (Adam is not monotone)."""
    torch = _torch()
    dt = torch.float64
    top = len(net.layers)
    D, R, _ = rows.shape
    T = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    mats = {k: (T(op.weight.astype(np.float64)), T(op.bias.astype(np.float64)))
            for k, op in enumerate(net.layers) if isinstance(op, Dense)}
    cst = {i: {"XL": T(L.XL)[:, None], "VL": T(L.VL)[:, None], "XU": T(L.XU)[:, None], "VU": T(L.VU)[:, None],
               "smax": T(L.smax)[:, None], "U": torch.as_tensor(L.unstable)[:, None],
               "aL": T(L.rel.aL)[:, None], "bL": T(L.rel.bL)[:, None], "aU": T(L.rel.aU)[:, None],
               "bU": T(L.rel.bU)[:, None], "scale": T(L.scale), "lo": T(flat[i][0].astype(np.float64))[:, None],
               "hi": T(flat[i][1].astype(np.float64))[:, None]}
           for i, L in layers.items()}
    lo0 = T(flat[0][0].astype(np.float64))[:, None]
    hi0 = T(flat[0][1].astype(np.float64))[:, None]
    th = {i: (T(a).clone().requires_grad_(True), T(b).clone().requires_grad_(True)) for i, (a, b) in
          choice.theta.items()}
    gm = {i: T(g).clone().requires_grad_(True) for i, g in choice.gam.items() if i >= 1}
    lam0 = T(rows.astype(np.float64))

    def bound():
        lam = lam0
        c = torch.zeros((D, R), dtype=dt)
        act = {}
        for k in range(top - 1, -1, -1):
            op = net.layers[k]
            if (k + 1) in gm:  # the row over value k + 1 (an activation's input) is complete
                C = cst[k + 1]
                g = gm[k + 1] * C["scale"]
                lam = lam + g
                c = c - (g.clamp(min=0) * C["hi"] + g.clamp(max=0) * C["lo"]).sum(-1)
            if isinstance(op, Dense):
                W, b = mats[k]
                c = c + lam @ b
                lam = lam @ W
            elif isinstance(op, _IDENTITY):
                continue
            else:
                C = cst[k]
                act[k] = lam
                pos, neg = lam.clamp(min=0), lam.clamp(max=0)
                sl = th[k][0] * C["smax"]
                su = th[k][1] * C["smax"]
                bl = (C["VL"] - sl[..., None] * C["XL"]).amin(-1)
                bu = (C["VU"] - su[..., None] * C["XU"]).amax(-1)
                U = C["U"]
                aL = torch.where(U, sl, C["aL"])
                bL = torch.where(U, bl, C["bL"])
                aU = torch.where(U, su, C["aU"])
                bU = torch.where(U, bu, C["bU"])
                c = c + (pos * bL).sum(-1) + (neg * bU).sum(-1)
                lam = pos * aL + neg * aU
        val = c + (lam.clamp(min=0) * lo0).sum(-1) + (lam.clamp(max=0) * hi0).sum(-1)
        return val, lam, act

    thetas = [t for pair in th.values() for t in pair]
    adam = _Adam(thetas, lr, decay=decay)
    gadam = _Adam(list(gm.values()), lr if glr is None else glr, bounded=False, decay=decay)
    best_val = torch.full((D, R), -float("inf"), dtype=dt)
    best_th = {i: (a.detach().clone(), b.detach().clone()) for i, (a, b) in th.items()}
    best_gm = {i: g.detach().clone() for i, g in gm.items()}
    best_mu = torch.zeros((D, R, lo0.shape[-1]), dtype=dt)
    best_act: dict = {}
    for it in range(steps + 1):
        for t in thetas + list(gm.values()):
            t.grad = None
        val, mu, act = bound()
        with torch.no_grad():
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            for i, (a, b) in th.items():
                best_th[i][0][better] = a[better]
                best_th[i][1][better] = b[better]
            for i, g in gm.items():
                best_gm[i][better] = g[better]
            best_mu[better] = mu.detach()[better]
            for i, a in act.items():
                if i not in best_act:
                    best_act[i] = a.detach().clone()
                else:
                    best_act[i][better] = a.detach()[better]
        if it == steps or (deadline is not None and time.monotonic() >= deadline):
            break
        (-val.sum()).backward()
        adam.step()
        gadam.step()
    gam = {i: best_gm[i].numpy() if i in best_gm else choice.gam[i] for i in choice.gam}
    out = Choice({i: (a.numpy(), b.numpy()) for i, (a, b) in best_th.items()}, gam)
    return FloatBounds(best_val.numpy(), out, best_mu.numpy(), {i: a.numpy() for i, a in best_act.items()})


def rigorous_lower(net: QNetwork, flat: list[tuple[np.ndarray, np.ndarray]], layers: dict[int, LayerRelax],
                   rows: np.ndarray, choice: Choice, idx: np.ndarray) -> np.ndarray:
    """Rigorous integer lower bounds ``[len(idx), R]`` of ``rows [D, R, n_out]`` (int64, entries below ``2^53``)
    over the domains ``idx`` with their ``choice`` (module docstring): every slope through
    :func:`~qverify.bounds.symbolic.exact_lines`, every multiplier a ``gamma`` term of the rigorous
    back-substitution, and the interval bound of each row over the domain's output bounds; the better of the two."""
    top = len(net.layers)
    R = rows.shape[1]
    E = len(idx)
    dom = np.repeat(idx, R)          # box e = (domain idx[e // R], row e % R)
    row_of = np.tile(np.arange(R), E)
    relax_of: dict[int, Relaxation] = {}
    gamma: dict[int, np.ndarray] = {}
    for i, L in layers.items():
        aL, bL = L.rel.aL[dom].copy(), L.rel.bL[dom].copy()
        aU, bU = L.rel.aU[dom].copy(), L.rel.bU[dom].copy()
        e, j = np.nonzero(L.unstable[dom])
        if len(e):
            p = L.pos[dom[e], j]
            v = L.vert
            tl, tu = choice.theta[i]
            sl = tl[dom[e], row_of[e], j] * L.smax[dom[e], j]
            su = tu[dom[e], row_of[e], j] * L.smax[dom[e], j]
            la, lb, ua, ub = exact_lines(v["XL"][p], v["VL"][p], v["XU"][p], v["VU"][p], v["q"][p], sl, su)
            aL[e, j], bL[e, j], aU[e, j], bU[e, j] = la, lb, ua, ub
        relax_of[i] = Relaxation(aL, bL, aU, bU)
        if i >= 1:
            gamma[i] = (choice.gam[i][dom, row_of] * L.scale[None])[:, None, :]
    flat_r = [(lo[dom], hi[dom]) for lo, hi in flat]
    mags = [np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64) for lo, hi in flat_r]
    lam = rows[dom, row_of].astype(np.float64)[:, None, :]
    low = _backsub_lower(net, top, lam, flat_r, mags, relax_of, slice(0, E * R), gamma)[:, 0]
    ylo, yhi = flat_r[top]
    r_int = rows[dom, row_of]
    ivl = (np.maximum(r_int, 0) * ylo).sum(1) + (np.minimum(r_int, 0) * yhi).sum(1)
    best = np.maximum(np.where(np.isfinite(low), low, -(2.0**62)), ivl.astype(np.float64))
    return best.reshape(E, R).astype(np.int64)


__all__ = ["Choice", "FloatBounds", "LayerRelax", "activation_layers", "initial_choice", "optimize",
           "rigorous_lower"]
