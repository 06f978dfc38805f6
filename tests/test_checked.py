"""The checked branch and bound (qverify/solvers/checked.py): its exact steps never remove a solution.

Soundness of ``INFEASIBLE`` rests on two exact steps, each tested on random programs with a planted integer
solution: bound propagation keeps every solution inside the node's box, and no multiplier vector (GLOP's duals or
any other, of any sign and size) makes :meth:`_Rows.refutes` accept a box that holds a solution. Agreement with
enumeration on encoded networks is in tests/test_solvers.py and tests/test_knife_edge.py.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.encode import LinExpr, Program
from qverify.settings import SolverSettings
from qverify.solvers import SolveStatus
from qverify.solvers.checked import CheckedBackend, _Rows


def _planted(seed: int, n: int = 5, m: int = 6, continuous: bool = False) -> tuple[Program, np.ndarray]:
    """A random program with integer rows that the point ``x0`` satisfies, some of them tightly (knife edge)."""
    rng = np.random.default_rng(seed)
    p = Program()
    x0 = rng.integers(-4, 5, size=n)
    lo = x0 - rng.integers(0, 4, size=n)
    hi = x0 + rng.integers(0, 4, size=n)
    vs = [p.add_var(f"x{j}", int(lo[j]), int(hi[j])) for j in range(n)]
    for _ in range(m):
        a = rng.integers(-7, 8, size=n)
        if not a.any():
            continue
        act = int(a @ x0)
        e = LinExpr({v.index: int(c) for v, c in zip(vs, a, strict=True) if c})
        kind = rng.integers(0, 3)
        slack_lo, slack_hi = int(rng.integers(0, 2)), int(rng.integers(0, 2))  # 0: the row is tight at x0
        p.add_con(e, act - slack_lo if kind != 1 else None, act + slack_hi if kind != 0 else None)
    if continuous:
        p = p.relaxed([v.index for v in vs[: n // 2]])
    return p, x0


@given(seed=st.integers(0, 2**32 - 1), continuous=st.booleans())
@settings(max_examples=200, deadline=None)
def test_propagation_keeps_every_solution(seed, continuous):
    prog, x0 = _planted(seed, continuous=continuous)
    rows = _Rows(prog)
    assert rows.fits
    l, u = np.array(rows.lo0, dtype=np.int64), np.array(rows.hi0, dtype=np.int64)
    assert rows.satisfied(x0)
    assert rows.propagate(l, u)
    assert np.all(l <= x0) and np.all(x0 <= u)


@given(seed=st.integers(0, 2**32 - 1), mseed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-9, 1.0, 1e9]))
@settings(max_examples=300, deadline=None)
def test_no_multipliers_refute_a_box_with_a_solution(seed, mseed, scale):
    prog, x0 = _planted(seed)
    rows = _Rows(prog)
    l, u = np.array(rows.lo0, dtype=np.int64), np.array(rows.hi0, dtype=np.int64)
    rng = np.random.default_rng(mseed)
    for _ in range(5):
        pi = rng.normal(size=rows.m) * scale
        pi[rng.random(rows.m) < 0.3] = 0.0
        assert not rows.refutes(pi, l, u)


def test_a_certificate_refutes_an_empty_box():
    """``x + y >= 3`` and ``x + y <= 2``: the multipliers (1, -1) refute it; the LP finds them."""
    p = Program()
    x, y = p.add_var("x", 0, 5), p.add_var("y", 0, 5)
    p.add_con(LinExpr.var(x) + LinExpr.var(y), 3, None)
    p.add_con(LinExpr.var(x) + LinExpr.var(y), None, 2)
    rows = _Rows(p)
    l, u = np.array(rows.lo0, dtype=np.int64), np.array(rows.hi0, dtype=np.int64)
    assert rows.refutes(np.array([1.0, -1.0]), l, u)
    assert not rows.refutes(np.array([1.0, 1.0]), l, u)
    out = CheckedBackend().solve(p, SolverSettings(threads=1), 5)
    assert out.status is SolveStatus.INFEASIBLE


def test_an_integer_gap_needs_branching_and_is_proved():
    """``2x - 2y = 1`` has real solutions but no integer one: the LP is feasible, the leaves are refuted exactly."""
    p = Program()
    x, y = p.add_var("x", -3, 3), p.add_var("y", -3, 3)
    p.add_con(LinExpr({x.index: 2, y.index: 2}), 1, 1)  # gcd normalization makes this trivially infeasible
    assert p.trivially_infeasible
    q = Program()
    x, y, z = q.add_var("x", 0, 7), q.add_var("y", 0, 7), q.add_var("z", 0, 7)
    # 3x + 5y - 7z = 1 with x + y + z <= 2: the only candidates are tiny; none solves it
    q.add_con(LinExpr({x.index: 3, y.index: 5, z.index: -7}), 1, 1)
    q.add_con(LinExpr({x.index: 1, y.index: 1, z.index: 1}), None, 2)
    truth = any(3 * a + 5 * b - 7 * c == 1 and a + b + c <= 2 for a in range(8) for b in range(8) for c in range(8))
    out = CheckedBackend().solve(q, SolverSettings(threads=1), 5)
    assert out.status is (SolveStatus.FEASIBLE if truth else SolveStatus.INFEASIBLE)
    if truth:
        assert q.check(out.values) == []


def test_a_time_limit_is_a_timeout_never_a_proof():
    from tests.test_solvers import _subset_sum

    out = CheckedBackend().solve(_subset_sum(40), SolverSettings(threads=1), 0.3)
    assert out.status in (SolveStatus.TIMEOUT, SolveStatus.FEASIBLE)
