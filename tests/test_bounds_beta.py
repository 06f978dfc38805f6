"""Bounds of split domains (qverify.bounds.beta, qverify.bounds.lp): every rigorous bound, for the optimized
choice and for random slopes and multipliers alike, lies below the least value of its row over the domain's
points, found by enumerating the box on the executor; the LP bound likewise for any dual vector."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.bounds.beta import Choice, LayerRelax, activation_layers, initial_choice, optimize, rigorous_lower
from qverify.bounds.lp import domain_lp_lower, safe_dual_bound
from qverify.bounds.symbolic import symbolic_analysis
from qverify.execute import execute
from qverify.neuron_bab import _Domain, _propagate
from tests.fixtures import all_box_points, networks_and_properties


def _random_domains(net, prop, rng: np.random.Generator, D: int):
    """``D`` random split domains of ``prop``'s box (a few neurons' bounds cut at random points) and, per domain,
    the box points that lie in it (their values within the domain's bounds)."""
    ana = symbolic_analysis(net, prop.lo[None], prop.hi[None])
    root = [(lo.reshape(-1), hi.reshape(-1)) for lo, hi in ana.bounds]
    acts = activation_layers(net)
    doms = []
    for _ in range(D):
        pre = {i: (root[i][0].copy(), root[i][1].copy()) for i in acts}
        for _ in range(int(rng.integers(0, 4))):
            i = int(rng.choice(acts))
            j = int(rng.integers(len(pre[i][0])))
            lo, hi = int(pre[i][0][j]), int(pre[i][1][j])
            if lo < hi:
                t = int(rng.integers(lo, hi))
                if rng.random() < 0.5:
                    pre[i][1][j] = t
                else:
                    pre[i][0][j] = t + 1
        doms.append(_Domain(0, pre, None, (prop.lo, prop.hi)))
    flat, empty = _propagate(net, root, acts, doms)
    pts = all_box_points(prop)
    vals = [np.asarray(v).reshape(len(pts), -1) for v in execute(net, pts)]
    inside = []
    for k in range(D):
        ok = np.ones(len(pts), dtype=bool)
        for i in acts:
            ok &= np.all((vals[i] >= doms[k].pre[i][0]) & (vals[i] <= doms[k].pre[i][1]), axis=1)
        inside.append(ok)
        if ok.any():
            assert not empty[k], "a domain with points was called empty"
            for v, (lo, hi) in enumerate(flat):  # the propagated bounds hold on the domain's points
                assert np.all(vals[v][ok] >= lo[k]) and np.all(vals[v][ok] <= hi[k])
    return root, acts, flat, empty, vals[-1], inside


def _case(net, prop, seed: int, D: int):
    """``_random_domains`` with their relaxations and one unsafe row per domain (``rows [D, 1, n]``, ``r0 [D, n]``)."""
    rng = np.random.default_rng(seed)
    root, acts, flat, empty, y, inside = _random_domains(net, prop, rng, D)
    layers = {i: LayerRelax.build(net, i, flat[i][0], flat[i][1]) for i in acts}
    rows = np.stack([prop.unsafe[k % len(prop.unsafe)].A[:1] for k in range(D)])
    return rng, root, flat, empty, y, inside, layers, rows, rows[:, 0]


@settings(max_examples=40, deadline=None)
@given(networks_and_properties(conv=False, max_points=2000), st.integers(0, 2**32 - 1))
def test_split_domain_bounds_are_sound_for_any_choice(case: tuple, seed: int) -> None:
    net, prop = case
    rng, root, flat, empty, y, inside, layers, rows, r0 = _case(net, prop, seed, 6)
    fresh = initial_choice(layers, 1)
    rand = Choice({i: (rng.random(a.shape), rng.random(b.shape)) for i, (a, b) in fresh.theta.items()},
                  {i: rng.normal(0, 3, g.shape) for i, g in fresh.gam.items()})
    opt = optimize(net, flat, layers, rows, fresh, 30, 0.05, glr=0.05).choice
    idx = np.nonzero(~empty)[0]
    for choice in (fresh, rand, opt):
        low = rigorous_lower(net, flat, layers, rows, choice, idx)[:, 0]
        for k, lb in zip(idx, low, strict=True):
            if inside[k].any():
                assert lb <= int((y[inside[k]] @ r0[k]).min()), "split-domain bound above a point of the domain"


@settings(max_examples=25, deadline=None)
@given(networks_and_properties(conv=False, max_points=2000), st.integers(0, 2**32 - 1))
def test_lp_bound_of_a_domain_is_sound(case: tuple, seed: int) -> None:
    net, prop = case
    _, root, flat, empty, y, inside, layers, _, r0 = _case(net, prop, seed, 4)
    for k in np.nonzero(~empty)[0]:
        lb = domain_lp_lower(net, flat, root, layers, int(k), r0[k])
        if inside[k].any():
            assert lb <= int((y[inside[k]] @ r0[k]).min()), "LP bound above a point of the domain"


def test_the_safe_dual_bound_holds_for_any_dual_vector() -> None:
    """min x1 + x2 over {x1 + x2 >= 3 (as -x1 - x2 <= -3), 0 <= x <= 5} is 3: every dual gives at most 3 and the
    optimal one (y = -1) exactly 3; an integer objective's bound is ceil'ed."""
    import scipy.sparse as sp

    A = sp.csr_matrix(np.array([[-1.0, -1.0]]))
    E = sp.csr_matrix((0, 2))
    lo, hi = np.zeros(2), np.full(2, 5.0)
    c = np.ones(2)
    assert safe_dual_bound(c, A, np.array([-3.0]), np.array([-1.0]), E, np.zeros(0), np.zeros(0), lo, hi) == 3
    rng = np.random.default_rng(0)
    for y in -rng.exponential(2.0, 50):
        assert safe_dual_bound(c, A, np.array([-3.0]), np.array([y]), E, np.zeros(0), np.zeros(0), lo, hi) <= 3
