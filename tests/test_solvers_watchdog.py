"""The watchdog: a solver that overruns its limit is killed and answers ``timeout``, never a verdict."""

from __future__ import annotations

import os
import time

import pytest

from qverify.encode import LinExpr, Program
from qverify.settings import SolverSettings
from qverify.solvers import SolveOutcome, SolveStatus, get_backend, solve
from qverify.solvers.watchdog import fork_available, solve_killable

pytestmark = pytest.mark.skipif(not fork_available(), reason="the watchdog needs the fork start method")


def _sleeper(limit: float) -> SolveOutcome:
    time.sleep(60)  # ignores its limit, like HiGHS in its root cut loop
    return SolveOutcome(SolveStatus.INFEASIBLE, "fake", 60.0, "INFEASIBLE")


def test_an_overrunning_solver_is_killed_and_is_a_timeout():
    t0 = time.perf_counter()
    out = solve_killable(_sleeper, 0.2, "fake", grace=0.3)
    assert time.perf_counter() - t0 < 10
    assert out.status is SolveStatus.TIMEOUT and out.raw_status == "killed"
    assert "killed" in out.message


def test_an_answer_within_the_limit_comes_back_intact():
    def fn(limit: float) -> SolveOutcome:
        return SolveOutcome(SolveStatus.FEASIBLE, "fake", 0.01, "OPTIMAL", values=[3, -2, 2**40],
                            stats={"limit": limit})

    out = solve_killable(fn, 5.0, "fake")
    assert out.status is SolveStatus.FEASIBLE and out.values == [3, -2, 2**40] and out.stats == {"limit": 5.0}


def test_an_exception_in_the_child_is_an_error():
    def fn(limit: float) -> SolveOutcome:
        raise RuntimeError("solver exploded")

    out = solve_killable(fn, 5.0, "fake")
    assert out.status is SolveStatus.ERROR and "solver exploded" in out.message


def test_a_child_that_dies_without_answering_is_an_error():
    def fn(limit: float) -> SolveOutcome:
        os._exit(3)

    out = solve_killable(fn, 5.0, "fake")
    assert out.status is SolveStatus.ERROR and out.raw_status == "crashed" and "exit code 3" in out.message


def _small(infeasible: bool) -> Program:
    p = Program()
    x, y = p.add_var("x", -3, 3), p.add_var("y", -3, 3)
    p.add_con(LinExpr({x.index: 2, y.index: 2}), 3, 4)
    if infeasible:
        p.add_con(LinExpr.var(x) + LinExpr.var(y), None, 1)
    return p


@pytest.mark.parametrize("backend", ["highs", "scip"])
def test_mip_back_ends_run_under_the_watchdog_with_the_same_answers(backend, monkeypatch):
    assert get_backend(backend).overruns and not get_backend("cpsat").overruns
    calls = []
    import qverify.solvers.watchdog as wd

    real = wd.solve_killable
    monkeypatch.setattr(wd, "solve_killable", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    for infeasible in (False, True):
        on = solve(_small(infeasible), SolverSettings(backend=backend, threads=1, time_limit=10))
        off = solve(_small(infeasible), SolverSettings(backend=backend, threads=1, time_limit=10, watchdog=False))
        want = SolveStatus.INFEASIBLE if infeasible else SolveStatus.FEASIBLE
        assert on.status is want and off.status is want
    assert len(calls) == 2 and all(name == backend for _, name in calls)
