"""SCIP and HiGHS through OR-Tools ``pywraplp`` (floating-point MIP solvers with tolerances).

Indicators are linearized with exact big-M constants (:meth:`Program.linearized`). Status mapping:
``INFEASIBLE`` -> ``UNCONFIRMED`` (a floating-point claim, not a proof: :func:`qverify.solvers.base.solve` has it
confirmed by an exact back end) unless the run used up its time limit (then it is not trusted at all: timeout);
``OPTIMAL``/``FEASIBLE`` -> candidate (values rounded to the nearest integer; with integrality tolerances a
solution may not replay, which the caller reports as ``unknown``/``replay-failed``, never as a verdict);
any other status (``NOT_SOLVED``, HiGHS's unnamed 99, ``ABNORMAL``, ``UNBOUNDED``) -> timeout when the time is used
up, else unknown; ``MODEL_INVALID`` -> error.
"""

from __future__ import annotations

import time

from ortools.linear_solver import pywraplp

from qverify.encode.program import Program
from qverify.settings import SolverSettings
from qverify.solvers.base import SolveOutcome, SolveStatus, round_values, stopped_by_time, trivial_outcome

_IDS = {"scip": "SCIP", "highs": "HIGHS"}
_NAMES = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE",
          pywraplp.Solver.INFEASIBLE: "INFEASIBLE", pywraplp.Solver.UNBOUNDED: "UNBOUNDED",
          pywraplp.Solver.ABNORMAL: "ABNORMAL", pywraplp.Solver.NOT_SOLVED: "NOT_SOLVED",
          pywraplp.Solver.MODEL_INVALID: "MODEL_INVALID"}


def fill_solver(s: pywraplp.Solver, program: Program, integer: bool = True) -> list:
    """Add ``program`` (indicators linearized with exact big-M, :meth:`Program.linearized`) to the empty solver
    ``s`` as variables, rows and a minimized objective; returns the variables by index. Variables a relaxation made
    continuous (:meth:`Program.relaxed`) stay continuous; ``integer=False`` gives the LP relaxation (every variable
    continuous), e.g. for GLOP."""
    lin = program.linearized()
    inf = s.infinity()
    xs = [(s.IntVar if integer and v.integer else s.NumVar)(float(v.lo), float(v.hi), v.name) for v in lin.vars]
    for c in lin.cons:
        row = s.RowConstraint(-inf if c.lo is None else float(c.lo), inf if c.hi is None else float(c.hi), c.name)
        for k, a in c.terms:
            row.SetCoefficient(xs[k], float(a))
    obj = s.Objective()
    if lin.objective is not None:
        for k, a in lin.objective.terms.items():
            obj.SetCoefficient(xs[k], float(a))
        obj.SetOffset(float(lin.objective.const))
    obj.SetMinimization()
    return xs


class OrToolsMipBackend:
    exact = False  # tolerances: its infeasible is a claim (UNCONFIRMED), see qverify.solvers.base
    overruns = True  # both check the time limit only between phases (see qverify.solvers.watchdog)

    def __init__(self, which: str = "scip") -> None:
        if which not in _IDS:
            raise ValueError(f"unknown OR-Tools MIP solver {which!r} (known: {', '.join(_IDS)})")
        self.name = which

    def solve(self, program: Program, settings: SolverSettings, time_limit: float) -> SolveOutcome:
        triv = trivial_outcome(program, self.name)
        if triv is not None:
            return triv
        t0 = time.perf_counter()
        s = pywraplp.Solver.CreateSolver(_IDS[self.name])
        if s is None:
            return SolveOutcome(SolveStatus.ERROR, self.name, 0.0, "unavailable",
                                message=f"OR-Tools was built without {_IDS[self.name]}")
        xs = fill_solver(s, program)
        threads_ok = s.SetNumThreads(settings.num_threads)
        s.SetTimeLimit(max(1, int(time_limit * 1000)))
        if self.name == "scip":
            params = f"randomization/randomseedshift = {int(settings.seed)}\n"
        else:
            # OR-Tools' HiGHS wrapper drops SetTimeLimit once an options string is given, so the limit is
            # repeated here; it answers False even when it applies the options.
            params = (f"output_flag = false\nrandom_seed = {int(settings.seed)}\n"
                      f"time_limit = {max(0.001, float(time_limit))}\n")
        seed_ok = s.SetSolverSpecificParametersAsString(params)
        build = time.perf_counter() - t0
        st = s.Solve()
        secs = time.perf_counter() - t0
        name = _NAMES.get(st, str(st))
        stats = {"build_seconds": build, "threads_set": bool(threads_ok), "seed_set": bool(seed_ok),
                 "nodes": s.nodes() if hasattr(s, "nodes") else None}
        solve_secs = secs - build
        if st == pywraplp.Solver.INFEASIBLE:
            if stopped_by_time(solve_secs, time_limit):
                return SolveOutcome(SolveStatus.TIMEOUT, self.name, secs, name, stats=stats,
                                    message="INFEASIBLE reported at the time limit: not trusted as a proof")
            return SolveOutcome(SolveStatus.UNCONFIRMED, self.name, secs, name, stats=stats)
        if st in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            raw = [x.solution_value() for x in xs]
            return SolveOutcome(SolveStatus.FEASIBLE, self.name, secs, name, values=round_values(raw),
                                raw_values=raw, stats=stats)
        if st == pywraplp.Solver.MODEL_INVALID:
            return SolveOutcome(SolveStatus.ERROR, self.name, secs, name, message="model rejected", stats=stats)
        if stopped_by_time(solve_secs, time_limit):  # NOT_SOLVED, or HiGHS's unnamed status 99
            return SolveOutcome(SolveStatus.TIMEOUT, self.name, secs, name, stats=stats,
                                message=f"stopped after {secs:.2f} s without a proof or a solution")
        return SolveOutcome(SolveStatus.UNKNOWN, self.name, secs, name, stats=stats,
                            message=f"solver status {name}: neither a proof nor a solution")
