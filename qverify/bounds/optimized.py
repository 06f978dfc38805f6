"""Optimized linear bounds (alpha-CROWN style) for chains of dense layers and requantizations / clamps.

The symbolic bounds (:mod:`qverify.bounds.symbolic`) relax every unstable activation ``y = f(a)`` with *one* pair of
lines ``aL a + bL <= f(a) <= aU a + bU``, the slopes chosen per neuron by DeepPoly's heuristic (the line best at the
middle of ``[l, u]``). Every slope ``a >= 0`` gives a valid line once its offset is the vertex minimum (maximum) of
the module docstring there: ``bL(a) = min_k (V_k - a X_k)``, ``bU(a) = max_k (V_k - a X_k)`` over the vertex
sets of :func:`qverify.bounds.symbolic.relax` (the ``vertices`` it reports). The bound of a row ``c . v_top``
that back-substitution gives is then a function of the slopes, and different rows may use different slopes
(Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and Massively Parallel
Incomplete Verifiers", ICLR 2021 - alpha-CROWN - there for ReLU lower slopes in ``[0, 1]``; here both the lower and
the upper slope of every unstable neuron, in ``[0, s_max]`` with ``s_max`` the steepest vertex chord, since a
requantization's upper line is not fixed either).

**Procedure** (one box; :func:`optimized_bounds`):

1. the symbolic analysis of the box (its bounds and relaxations) is the start, and the result is never looser:
   every bound is intersected with it;
2. for each activation layer ``k`` in order whose input is a dense layer with an activation below it, the rows
   ``+e_j`` and ``-e_j`` of its unstable neurons (``f(l_j) < f(u_j)``) are bounded with slopes optimized per row
   (step 3), the neurons' bounds tightened, and the layer's relaxation (vertices, DeepPoly lines) rebuilt from the
   tightened bounds - so the tightening of one layer feeds the relaxations of the next, and all of it is shared by
   every disjunct of the property;
3. per row, the slopes ``theta in [0, 1]`` (``a = theta s_max``) of every unstable neuron below are optimized by
   projected gradient ascent (Adam on ``-sum of the rows' bounds``; ``steps`` iterations, in torch float64, on the
   float model of the back-substitution ``lam . v >= mu . x + nu`` through each layer, without DeepPoly's
   intermediate concretizations), starting from the DeepPoly slopes;
4. the margin rows of the property's unsafe disjuncts get the same treatment at the output.

**Soundness: the float optimization is only a choice.** The optimized float slopes are handed to
:func:`qverify.bounds.symbolic.exact_lines`, which rounds each slope to a dyadic ``A / 2^t`` and computes its
offset *exactly* (Python integers over the vertex values, then rounded outward to a float64), so every line is
exactly valid on the integers of the neuron's bounds. The bound of each row is then computed by the symbolic
module's rigorous back-substitution (:func:`qverify.bounds.symbolic._backsub_lower`: float64 with Higham's
error terms charged to a slack, the result lowered and ceil'ed; one "box" per row, each with its own lines), whose
proof is in that module's docstring. No number of the float optimization enters a bound except through these
two exact steps; a bad optimization can only give a looser bound, and the intersection with the symbolic bounds
makes it never looser than those.

Scope: chain networks of :class:`~qverify.network.Dense`, :class:`~qverify.network.Requantize` (exact or float32)
and :class:`~qverify.network.Clamp` nodes (the QVIP MLPs), with ``Flatten`` / ``Reshape`` nodes anywhere (an
exporter's flatten of the input image: the identity on flat vectors); :func:`supports` says whether a network
qualifies.
torch is imported only when an optimization runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from qverify.bounds.symbolic import (
    ActParams,
    Relaxation,
    SymbolicAnalysis,
    _backsub_lower,
    _chords,
    _to_float,
    exact_lines,
    relax,
    symbolic_analysis,
)
from qverify.network import Clamp, Dense, Flatten, QNetwork, Requantize, Reshape
from qverify.property import Property

#: projected-gradient iterations per row block (``benchmarks/bench_optimized.py --steps N --limit 30``, the first 30
#: QVIP Table 3 unknowns, the P3 nets: 10 steps raise no margin bound, 40 and 150 by at most one step, mean 0.1-0.3)
STEPS = 40
#: Adam's step on the normalized slopes theta in [0, 1]
LR = 0.05
#: the largest slope searched, in units of the requantization's slope ``p / q``
SLOPE_CAP = 2.0


#: data movement that keeps the C-order flattened values in place (the identity on the flat vectors these bounds
#: work on): a model's leading ``Flatten`` of its ``[C, H, W]`` image, a ``Reshape``
_IDENTITY = (Flatten, Reshape)


def supports(net: QNetwork) -> bool:
    """Whether :func:`optimized_bounds` handles ``net``: a chain of dense layers and requantizations / clamps with
    at least two activations (with one the first dense layer's bounds are already exact and DeepPoly's margin
    bound is the only thing to optimize; that case is handled too: at least one activation). ``Flatten`` and
    ``Reshape`` nodes may stand anywhere: on C-order flat vectors they are the identity."""
    sequential = all(row == (i,) for i, row in enumerate(net.inputs))  # value i + 1 = node i(value i)
    return (sequential and bool(net.layers)
            and all(isinstance(op, (Dense, Requantize, Clamp, *_IDENTITY)) for op in net.layers)
            and any(isinstance(op, Requantize | Clamp) for op in net.layers))


@dataclass
class _Act:
    """One activation layer's relaxation state for a single box: the DeepPoly lines ``rel`` ``[1, n]`` and the
    unstable neurons' vertex sets (``vert``: see :func:`qverify.bounds.symbolic.relax`), with float copies and the
    slope caps ``smax`` ``[N]``."""

    params: ActParams
    rel: Relaxation
    vert: dict
    XLf: np.ndarray
    VLf: np.ndarray
    XUf: np.ndarray
    VUf: np.ndarray
    smax: np.ndarray

    @property
    def ji(self) -> np.ndarray:
        return self.vert.get("ji", np.zeros(0, dtype=np.int64))

    @classmethod
    def build(cls, net: QNetwork, i: int, lo: np.ndarray, hi: np.ndarray, levels: int) -> _Act:
        params = ActParams.of(net.layers[i], net.shapes[i + 1])
        vert: dict = {}
        rel = relax(params, lo, hi, levels=levels, vertices=vert)
        if not vert or len(vert["ji"]) == 0:
            z = np.zeros((0, 1))
            return cls(params, rel, {}, z, z, z, z, np.zeros(0))
        q = vert["q"]

        def fl(V: np.ndarray) -> np.ndarray:
            return np.stack([_to_float(V[:, k], q) for k in range(V.shape[1])], axis=1)

        XLf, XUf = vert["XL"].astype(np.float64), vert["XU"].astype(np.float64)
        VLf, VUf = fl(vert["VL"]), fl(vert["VU"])
        chord = np.maximum(_chords(XLf, VLf).max(axis=1), _chords(XUf, VUf).max(axis=1))
        # the scale of theta: the requantization's own slope p / q (a clamp: 1); slopes are searched in
        # [0, SLOPE_CAP p / q] (and not beyond the steepest vertex chord): the steep chords of adjacent levels
        # are useless for a wide neuron and would make the step sizes meaningless
        smax = np.maximum(np.minimum(chord, SLOPE_CAP * vert["slope"]), 1e-300)
        return cls(params, rel, vert, XLf, VLf, XUf, VUf, smax)


@dataclass
class OptimizedBounds:
    """Result of :func:`optimized_bounds` for one box: ``bounds`` (one flattened ``(lo, hi)`` int64 pair per value,
    the encoder format of :mod:`qverify.encode`), ``slack_lower`` (integer lower bound of the property's least
    slack, or ``None`` without a property), ``symbolic_lower`` (DeepPoly's, for comparison), ``rows`` (rows
    optimized) and ``seconds``."""

    bounds: list[tuple[np.ndarray, np.ndarray]]
    slack_lower: int | None
    symbolic_lower: int | None
    rows: int
    seconds: float
    complete: bool = True


def _torch():
    import torch

    return torch


class _Adam:
    """Projected Adam (Kingma and Ba 2015, torch's default constants) on parameters in ``[0, 1]`` (``bounded``;
    otherwise plain Adam on free parameters):
    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``p <- clip(p - lr_t (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), 0, 1)``, ``lr_t = lr decay^(t - 1)``.

    Written out rather than ``torch.optim.Adam``, whose first construction in a process imports ``torch._dynamo``
    (and sympy): measured 45-80 s in a fresh Ray worker on the loaded 2-core machine, which ran the ``optimized``
    stage far past its share of the budget. Only a choice of slopes comes out of it (module docstring)."""

    B1, B2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, params: list, lr: float, bounded: bool = True, decay: float = 1.0) -> None:
        torch = _torch()
        self.params, self.lr, self.t, self.bounded, self.decay = params, lr, 0, bounded, decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self) -> None:
        torch = _torch()
        self.t += 1
        lr = self.lr * self.decay ** (self.t - 1)
        c1, c2 = 1.0 - self.B1 ** self.t, (1.0 - self.B2 ** self.t) ** 0.5
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                if p.grad is None:
                    continue
                g = p.grad
                m.mul_(self.B1).add_(g, alpha=1.0 - self.B1)
                v.mul_(self.B2).addcmul_(g, g, value=1.0 - self.B2)
                p.addcdiv_(m, (v.sqrt() / c2).add_(self.EPS), value=-lr / c1)
                if self.bounded:
                    p.clamp_(0.0, 1.0)


def _optimize_slopes(net: QNetwork, top: int, lam0: np.ndarray, acts: dict[int, _Act], box: tuple[np.ndarray, ...],
                     steps: int, lr: float, deadline: float | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Float slopes ``{layer: (aL [R, N], aU [R, N])}`` for the rows ``lam0 [R, n_top]`` over value ``top``, by
    projected Adam ascent on the float model of the back-substitution bound (module docstring, step 3)."""
    torch = _torch()
    dt = torch.float64
    R = lam0.shape[0]
    lo0 = torch.as_tensor(box[0].reshape(-1).astype(np.float64), dtype=dt)
    hi0 = torch.as_tensor(box[1].reshape(-1).astype(np.float64), dtype=dt)
    mats = {}
    thetas: dict[int, tuple] = {}
    for k in range(top):
        op = net.layers[k]
        if isinstance(op, Dense):
            mats[k] = (torch.as_tensor(op.weight.astype(np.float64), dtype=dt),
                       torch.as_tensor(op.bias.astype(np.float64), dtype=dt))
        elif k in acts and len(acts[k].ji):
            a = acts[k]
            j = a.ji
            tl = np.clip(a.rel.aL[0, j] / a.smax, 0.0, 1.0)
            tu = np.clip(a.rel.aU[0, j] / a.smax, 0.0, 1.0)
            thetas[k] = (torch.tensor(np.tile(tl, (R, 1)), dtype=dt, requires_grad=True),
                         torch.tensor(np.tile(tu, (R, 1)), dtype=dt, requires_grad=True))
    if not thetas:
        return {}
    consts = {k: tuple(torch.as_tensor(x, dtype=dt) for x in (acts[k].XLf, acts[k].VLf, acts[k].XUf, acts[k].VUf,
                                                               acts[k].smax))
              for k in thetas}
    base = {k: tuple(torch.as_tensor(x[0], dtype=dt) for x in (a.rel.aL, a.rel.bL, a.rel.aU, a.rel.bU))
            for k, a in acts.items() if k < top}
    lam_init = torch.as_tensor(lam0.astype(np.float64), dtype=dt)
    params = [t for pair in thetas.values() for t in pair]
    adam = _Adam(params, lr)

    def bound() -> torch.Tensor:
        lam = lam_init
        c = torch.zeros(R, dtype=dt)
        for k in range(top - 1, -1, -1):
            if k in mats:
                W, b = mats[k]
                c = c + lam @ b
                lam = lam @ W
                continue
            if isinstance(net.layers[k], _IDENTITY):
                continue
            aL0, bL0, aU0, bU0 = base[k]
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            aL = aL0.expand(R, -1)
            aU = aU0.expand(R, -1)
            bL = bL0.expand(R, -1)
            bU = bU0.expand(R, -1)
            if k in thetas:
                XL, VL, XU, VU, smax = consts[k]
                j = torch.as_tensor(acts[k].ji)
                sl = thetas[k][0] * smax
                su = thetas[k][1] * smax
                bl = (VL[None] - sl[:, :, None] * XL[None]).amin(dim=2)
                bu = (VU[None] - su[:, :, None] * XU[None]).amax(dim=2)
                aL, aU, bL, bU = aL.clone(), aU.clone(), bL.clone(), bU.clone()
                aL[:, j], aU[:, j], bL[:, j], bU[:, j] = sl, su, bl, bu
            c = c + (pos * bL).sum(1) + (neg * bU).sum(1)
            lam = pos * aL + neg * aU
        return c + (lam.clamp(min=0) * lo0).sum(1) + (lam.clamp(max=0) * hi0).sum(1)

    best_val = torch.full((R,), -float("inf"), dtype=dt)
    best = {k: (tl.detach().clone(), tu.detach().clone()) for k, (tl, tu) in thetas.items()}
    for it in range(steps + 1):
        for t in params:
            t.grad = None
        val = bound()
        with torch.no_grad():  # keep each row's best slopes (Adam is not monotone)
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            for k, (tl, tu) in thetas.items():
                best[k][0][better] = tl[better]
                best[k][1][better] = tu[better]
        if it == steps or (deadline is not None and time.monotonic() >= deadline):
            break
        (-val.sum()).backward()
        adam.step()
    return {k: ((tl.numpy() * acts[k].smax[None]), (tu.numpy() * acts[k].smax[None]))
            for k, (tl, tu) in best.items()}


def _sound_rows(net: QNetwork, top: int, lam0: np.ndarray, acts: dict[int, _Act], flat: list,
                slopes: dict[int, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Rigorous integer lower bounds ``[R]`` of the rows ``lam0 [R, n_top]`` with each row's own slopes: exact lines
    from :func:`qverify.bounds.symbolic.exact_lines`, then the symbolic module's rigorous back-substitution with one
    "box" per row (the same box repeated)."""
    R = lam0.shape[0]
    relax_of: dict[int, Relaxation] = {}
    for k, a in acts.items():
        if k >= top:
            continue
        aL, bL = np.repeat(a.rel.aL, R, 0), np.repeat(a.rel.bL, R, 0)
        aU, bU = np.repeat(a.rel.aU, R, 0), np.repeat(a.rel.bU, R, 0)
        if k in slopes:
            N = len(a.ji)
            v = a.vert
            rep = lambda X: np.tile(X, (R, 1))  # noqa: E731
            la, lb, ua, ub = exact_lines(rep(v["XL"]), rep(v["VL"]), rep(v["XU"]), rep(v["VU"]), np.tile(v["q"], R),
                                         slopes[k][0].reshape(-1), slopes[k][1].reshape(-1))
            j = np.tile(a.ji, R)
            r = np.repeat(np.arange(R), N)
            aL[r, j], bL[r, j], aU[r, j], bU[r, j] = la, lb, ua, ub
        relax_of[k] = Relaxation(aL, bL, aU, bU)
    flat_r = [(np.repeat(lo, R, 0), np.repeat(hi, R, 0)) for lo, hi in flat]
    mags = [np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64) for lo, hi in flat_r]
    low = _backsub_lower(net, top, lam0.astype(np.float64)[:, None, :], flat_r, mags, relax_of, slice(0, R))
    return low[:, 0]


def _rows_lower(net: QNetwork, top: int, lam0: np.ndarray, acts: dict[int, _Act], flat: list, steps: int,
                lr: float, deadline: float | None) -> np.ndarray:
    """Optimized rigorous lower bounds of the rows (float ``[R]``, integers or ``-inf``)."""
    slopes = _optimize_slopes(net, top, lam0, acts, flat[0], steps, lr, deadline)
    return _sound_rows(net, top, lam0, acts, flat, slopes)


def optimized_bounds(net: QNetwork, lo: np.ndarray, hi: np.ndarray, prop: Property | None = None,
                     ana: SymbolicAnalysis | None = None, steps: int = STEPS, lr: float = LR, levels: int = 3,
                     deadline: float | None = None, threads: int = 1) -> OptimizedBounds:
    """Optimized bounds of every value over the integer box ``[lo, hi]`` (one box, flattened input) and, with
    ``prop``, the integer lower bound of its least slack ``min_d max_k (L_dk - b_dk)`` from optimized margin rows
    (module docstring). ``ana``: the symbolic analysis of this box when already computed (batch of one).
    ``deadline`` (:func:`time.monotonic`): optimization stops early (the bounds stay sound, only looser; the
    result's ``complete`` is then ``False``). ``threads``: numpy/torch threads while it runs
    (:func:`qverify.torch_net.limit_threads`; small matrices: one thread is fastest, measured on the shared 2-core
    machine 0.2 s against 16 s on a P3-6 instance, 0.09 s against 3.5-5.5 s on a P1-8 one)."""
    if not supports(net):
        raise ValueError("optimized bounds need a chain of Dense and Requantize/Clamp nodes (Flatten/Reshape "
                         "allowed)")
    from qverify.torch_net import limit_threads

    with limit_threads(threads):
        return _optimized_bounds(net, lo, hi, prop, ana, steps, lr, levels, deadline)


def _optimized_bounds(net: QNetwork, lo: np.ndarray, hi: np.ndarray, prop: Property | None,
                      ana: SymbolicAnalysis | None, steps: int, lr: float, levels: int,
                      deadline: float | None) -> OptimizedBounds:
    t0 = time.monotonic()
    lo = np.asarray(lo, dtype=np.int64).reshape(1, -1)
    hi = np.asarray(hi, dtype=np.int64).reshape(1, -1)
    if ana is None:
        ana = symbolic_analysis(net, lo, hi, levels=levels)
    flat = [(a.reshape(1, -1).copy(), b.reshape(1, -1).copy()) for a, b in ana.bounds]
    acts: dict[int, _Act] = {}
    rows_done = 0
    complete = True
    for i, op in enumerate(net.layers):
        if not isinstance(op, Requantize | Clamp):
            continue
        below_act = any(k in acts for k in range(i))
        if i >= 1 and isinstance(net.layers[i - 1], Dense) and below_act:
            l, u = flat[i]
            params = ActParams.of(op, net.shapes[i + 1])
            unstable = np.nonzero(params.apply(l)[0] != params.apply(u)[0])[0]
            if len(unstable) and (deadline is None or time.monotonic() < deadline):
                n = l.shape[1]
                R = len(unstable)
                lam = np.zeros((2 * R, n))
                lam[np.arange(R), unstable] = 1.0
                lam[R + np.arange(R), unstable] = -1.0
                low = _rows_lower(net, i, lam, acts, flat, steps, lr, deadline)
                rows_done += 2 * R
                nl, nh = l.copy(), u.copy()
                ok_l, ok_h = np.isfinite(low[:R]), np.isfinite(low[R:])
                nl[0, unstable[ok_l]] = np.maximum(nl[0, unstable[ok_l]], low[:R][ok_l].astype(np.int64))
                nh[0, unstable[ok_h]] = np.minimum(nh[0, unstable[ok_h]], (-low[R:][ok_h]).astype(np.int64))
                if np.any(nl > nh):  # an empty box cannot happen for a sound bound on a nonempty input box
                    raise RuntimeError(f"optimized bounds of node {i - 1} are empty: unsound relaxation")
                flat[i] = (nl, nh)
                ol, oh = params.apply(nl), params.apply(nh)
                flat[i + 1] = (np.maximum(ol, flat[i + 1][0]), np.minimum(oh, flat[i + 1][1]))
            elif len(unstable):
                complete = False
        acts[i] = _Act.build(net, i, flat[i][0], flat[i][1], levels)
    slack_lower = sym_lower = None
    if prop is not None:
        sym_lower = int(ana.slack_lower_bounds(prop)[0])
        rows = np.concatenate([c.A for c in prop.unsafe]).astype(np.int64)
        base = ana.row_lower_bounds(rows)[0]
        top = len(net.layers)
        if (np.abs(rows).max(initial=0) < 2**53 and (deadline is None or time.monotonic() < deadline)
                and np.any(rows != 0)):
            low = _rows_lower(net, top, rows.astype(np.float64), acts, flat, steps, lr, deadline)
            rows_done += len(rows)
            best = [max(int(b), int(x)) if np.isfinite(x) else int(b) for b, x in zip(base, low, strict=True)]
        else:
            best = [int(b) for b in base]
            complete = complete and not np.any(rows != 0)
        # the output bounds (possibly tightened) also bound each row: the interval bound over them
        ylo, yhi = flat[-1]
        ivl = (np.maximum(rows, 0) @ ylo[0].astype(object) + np.minimum(rows, 0) @ yhi[0].astype(object))
        best = [max(b, int(v)) for b, v in zip(best, ivl, strict=True)]
        per, s = [], 0
        for conj in prop.unsafe:
            k = conj.A.shape[0]
            per.append(max(best[s + t] - int(conj.b[t]) for t in range(k)))
            s += k
        slack_lower = max(min(per), sym_lower) if per else sym_lower
    return OptimizedBounds([(a[0], b[0]) for a, b in flat], slack_lower, sym_lower, rows_done,
                           time.monotonic() - t0, complete)


__all__ = ["OptimizedBounds", "STEPS", "LR", "optimized_bounds", "supports"]
