"""Rigorous LP bounds of one split domain (dense chains), from a floating-point LP solve and a safe dual bound.

**The relaxation.** Variables are every value of the chain (``z_0`` the input, ``z_{k+1}`` node ``k``'s output),
each in a box that holds on the domain's points: the root bounds for the activations' inputs, the domain's
bounds for every other value. Constraints (all valid on every integer point of the domain):

* dense layers ``z_{k+1} - W z_k = b`` (equalities, integer data);
* per unstable neuron of an activation ``z_{k+1} = f(z_k)``, the lines of the facets of the convex hull of its
  vertex set over the domain's ``[l, u]`` (:func:`qverify.bounds.symbolic.relax`; the slopes of the lower
  envelope's edges, and of the upper one's), each made exactly valid by
  :func:`qverify.bounds.symbolic.exact_lines`: ``a z_k - z_{k+1} <= -b_L``, ``z_{k+1} - a z_k <= b_U``;
* the domain's own bounds of the activations' inputs, as rows ``z_kj <= u_j``, ``-z_kj <= -l_j`` (the split
  constraints; the LP solve gives them elastic slacks of cost ``PENALTY`` so that it always has a solution and
  the duals of an infeasible domain grow large instead of being lost).

**The bound.** The LP ``min c . z_top`` is solved in floating point (scipy's HiGHS); its result is used only
for its dual vector ``y`` (``y_ub <= 0`` on the rows ``A_ub z <= b_ub``, ``y_eq`` free). For *any* such ``y``,
weak duality over the variable box gives, for every point of the domain,

    c . z  >=  b_ub . y_ub + b_eq . y_eq + sum_i min(r_i lo_i, r_i hi_i),    r = c - A_ub^T y_ub - A_eq^T y_eq

(Neumaier and Shcherbina, "Safe bounds in linear and mixed-integer linear programming", Math. Prog. 2004). It
is evaluated in float64 with every rounding charged (Higham's ``gamma`` bounds, as in
:mod:`qverify.bounds.symbolic`): ``r`` to within ``g(k + 2) (|c| + |A|^T |y|)`` (``k`` the most nonzeros of a
column), each product and the final sums to within their own ``gamma``; the data (integers, dyadic slopes, exactly
valid offsets rounded outward) are exact floats. So no float number of the solver decides anything: a poor or
wrong solve gives a looser bound, never an unsound one. ``c . z_top`` is an integer, so its bound is ``ceil``'ed.
"""

from __future__ import annotations

import math

import numpy as np

from qverify.bounds.beta import LayerRelax
from qverify.bounds.symbolic import _U52 as _U
from qverify.bounds.symbolic import _gam, exact_lines
from qverify.network import Dense, QNetwork

#: the elastic slacks' cost in the LP solve (the duals of the split rows are at most this)
PENALTY = 1e4


def _hull_slopes(X: np.ndarray, V: np.ndarray, lower: bool) -> list[float]:
    """Non-negative slopes of the edges of the lower convex (``lower``) or upper concave envelope of the points
    ``(X_k, V_k)`` (floats), with 0 added; any of them gives a valid line through :func:`exact_lines`."""
    pts = sorted(set(zip(X.tolist(), V.tolist(), strict=True)))
    xs: dict[float, float] = {}
    for x, v in pts:  # one point per x: the lowest (lower envelope) or highest (upper)
        xs[x] = min(v, xs[x]) if (x in xs and lower) else (max(v, xs[x]) if x in xs else v)
    P = sorted(xs.items())
    hull: list[tuple[float, float]] = []
    for p in P:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            cross = (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1)
            if (cross <= 0) if lower else (cross >= 0):
                hull.pop()
            else:
                break
        hull.append(p)
    out = {0.0}
    for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
        if x2 > x1:
            out.add(max(0.0, (y2 - y1) / (x2 - x1)))
    return sorted(out)


def domain_lp_lower(net: QNetwork, flat: list[tuple[np.ndarray, np.ndarray]],
                    root: list[tuple[np.ndarray, np.ndarray]], layers: dict[int, LayerRelax], d: int,
                    row: np.ndarray) -> float:
    """Rigorous lower bound (an integer as a float, or ``-inf``) of ``row . z_top`` over the points of domain
    ``d`` of a batch (``flat``: the batch's bounds per value ``[D, n]``; ``layers``: its relaxations; ``root``:
    the root bounds per value ``[n]``), by the LP and the safe dual bound of the module docstring."""
    import scipy.sparse as sp
    from scipy.optimize import linprog

    sizes = [int(np.prod(s)) for s in net.shapes]
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    N = int(off[-1])
    lo = np.concatenate([flat[v][0][d] for v in range(len(sizes))]).astype(np.float64)
    hi = np.concatenate([flat[v][1][d] for v in range(len(sizes))]).astype(np.float64)
    ub_r, ub_c, ub_v, b_ub = [], [], [], []
    eq_r, eq_c, eq_v, b_eq = [], [], [], []
    nrow_ub = 0
    nrow_eq = 0
    for k, op in enumerate(net.layers):
        if isinstance(op, Dense):
            W = op.weight
            n_o, n_i = W.shape
            r, c = np.nonzero(W)
            eq_r += [nrow_eq + r, nrow_eq + np.arange(n_o)]
            eq_c += [off[k] + c, off[k + 1] + np.arange(n_o)]
            eq_v += [-W[r, c].astype(np.float64), np.ones(n_o)]
            b_eq.append(op.bias.astype(np.float64))
            nrow_eq += n_o
            continue
        if k not in layers:  # data movement between equal flat values: z_{k+1} = z_k
            n = sizes[k]
            eq_r += [nrow_eq + np.arange(n)] * 2
            eq_c += [off[k + 1] + np.arange(n), off[k] + np.arange(n)]
            eq_v += [np.ones(n), -np.ones(n)]
            b_eq.append(np.zeros(n))
            nrow_eq += n
            continue
        L = layers[k]
        js = np.nonzero(L.unstable[d])[0]
        if len(js):
            v = L.vert
            p = L.pos[d, js]
            lows = [_hull_slopes(L.XL[d, j], L.VL[d, j], True) for j in js]
            ups = [_hull_slopes(L.XU[d, j], L.VU[d, j], False) for j in js]
            T = max(max(len(a) for a in lows), max(len(a) for a in ups))
            for t in range(T):
                al = np.array([a[min(t, len(a) - 1)] for a in lows])
                au = np.array([a[min(t, len(a) - 1)] for a in ups])
                la, lb, ua, ub = exact_lines(v["XL"][p], v["VL"][p], v["XU"][p], v["VU"][p], v["q"][p], al, au)
                n = len(js)
                ar = np.arange(n)
                # a z_k - z_{k+1} <= -bL  and  z_{k+1} - a z_k <= bU
                ub_r += [nrow_ub + ar, nrow_ub + ar, nrow_ub + n + ar, nrow_ub + n + ar]
                ub_c += [off[k] + js, off[k + 1] + js, off[k + 1] + js, off[k] + js]
                ub_v += [la, -np.ones(n), np.ones(n), -ua]
                b_ub += [-lb, ub]
                nrow_ub += 2 * n
        # the domain's own bounds of the activation's input, as rows (the variables keep the root's)
        dl, du = flat[k][0][d], flat[k][1][d]
        rl, rh = root[k][0], root[k][1]
        lo[off[k]:off[k + 1]] = rl
        hi[off[k]:off[k + 1]] = rh
        tight_u = np.nonzero(du < rh)[0]
        tight_l = np.nonzero(dl > rl)[0]
        for idx, sign, bnd in ((tight_u, 1.0, du), (tight_l, -1.0, -dl)):
            if len(idx):
                ub_r.append(nrow_ub + np.arange(len(idx)))
                ub_c.append(off[k] + idx)
                ub_v.append(np.full(len(idx), sign))
                b_ub.append(bnd[idx].astype(np.float64))
                nrow_ub += len(idx)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    A_ub = sp.csr_matrix((cat(ub_v), (cat(ub_r).astype(np.int64), cat(ub_c).astype(np.int64))), shape=(nrow_ub, N))
    A_eq = sp.csr_matrix((cat(eq_v), (cat(eq_r).astype(np.int64), cat(eq_c).astype(np.int64))), shape=(nrow_eq, N))
    bu = cat(b_ub)
    be = cat(b_eq)
    c = np.zeros(N)
    c[off[-2]:off[-1]] = row.astype(np.float64)
    # the solve: elastic slacks on every inequality row (cost PENALTY) keep it feasible
    m = A_ub.shape[0]
    A_solve = sp.hstack([A_ub, -sp.eye(m, format="csr")], format="csr")
    res = linprog(np.concatenate([c, np.full(m, PENALTY)]), A_ub=A_solve, b_ub=bu,
                  A_eq=sp.hstack([A_eq, sp.csr_matrix((nrow_eq, m))], format="csr"), b_eq=be,
                  bounds=np.stack([np.concatenate([lo, np.zeros(m)]), np.concatenate([hi, np.full(m, np.inf)])],
                                  axis=1), method="highs")
    if res.status != 0 or res.ineqlin is None:
        return -math.inf
    y_ub = np.minimum(np.asarray(res.ineqlin.marginals, dtype=np.float64), 0.0)
    y_eq = np.asarray(res.eqlin.marginals, dtype=np.float64)
    return safe_dual_bound(c, A_ub, bu, y_ub, A_eq, be, y_eq, lo, hi)


def safe_dual_bound(c: np.ndarray, A_ub, b_ub: np.ndarray, y_ub: np.ndarray, A_eq, b_eq: np.ndarray,
                    y_eq: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """``ceil`` of a rigorous lower bound of ``min c . z`` over ``{A_ub z <= b_ub, A_eq z = b_eq, lo <= z <= hi}``
    from any duals ``y_ub <= 0``, ``y_eq`` (module docstring), for an integer-valued objective. All data must be
    exact floats; ``lo``, ``hi`` finite."""
    y_ub = np.minimum(y_ub, 0.0)
    At_ub, At_eq = A_ub.T.tocsr(), A_eq.T.tocsr()
    r = c - At_ub @ y_ub - At_eq @ y_eq
    S = np.abs(c) + abs(At_ub) @ np.abs(y_ub) + abs(At_eq) @ np.abs(y_eq)
    k = int(max(np.diff(At_ub.indptr).max(initial=0), 0) + max(np.diff(At_eq.indptr).max(initial=0), 0))
    err_r = _gam(k + 2) * S
    mag = np.maximum(np.abs(lo), np.abs(hi))
    terms = np.minimum(r * lo, r * hi)
    n = len(terms) + len(b_ub) + len(b_eq)
    val = float(terms.sum() + b_ub @ y_ub + b_eq @ y_eq)
    err = float((err_r * mag).sum() + _U * np.abs(terms).sum()
                + _gam(n) * (np.abs(terms).sum() + np.abs(b_ub) @ np.abs(y_ub) + np.abs(b_eq) @ np.abs(y_eq))
                + _U * abs(val))
    low = val - 2.0 * err - 2.0**-800
    if not math.isfinite(low):
        return -math.inf
    return float(math.ceil(np.nextafter(np.nextafter(low, -np.inf), -np.inf)))


__all__ = ["PENALTY", "domain_lp_lower", "safe_dual_bound"]
