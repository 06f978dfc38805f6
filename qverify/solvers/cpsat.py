"""OR-Tools CP-SAT back end: exact integer arithmetic (no tolerances), native indicator constraints.

Status mapping: ``INFEASIBLE`` -> proof (robust); ``FEASIBLE``/``OPTIMAL`` -> candidate; ``UNKNOWN`` -> timeout
(CP-SAT returns it when a limit stops the search); ``MODEL_INVALID`` -> error (with CP-SAT's validation message).
``num_workers`` is ``settings.num_threads`` (``threads = 0``: all cores), ``max_time_in_seconds`` the time limit,
``random_seed`` the seed. A program whose objective is only a guide (``meta['objective_is_guide']``) stops at the
first solution.
"""

from __future__ import annotations

import time

from ortools.sat.python import cp_model

from qverify.encode.program import Program
from qverify.settings import SolverSettings
from qverify.solvers.base import SolveOutcome, SolveStatus, trivial_outcome


def build_cpsat(program: Program) -> tuple[cp_model.CpModel, list]:
    """The CP-SAT model of a program (indicators as ``only_enforce_if``) and its variables by index."""
    m = cp_model.CpModel()
    xs = [m.new_int_var(v.lo, v.hi, v.name) for v in program.vars]
    for c in program.cons:
        idx = [k for k, _ in c.terms]
        expr = cp_model.LinearExpr.weighted_sum([xs[k] for k in idx], [a for _, a in c.terms])
        ct = m.add_linear_constraint(expr, cp_model.INT_MIN if c.lo is None else c.lo,
                                     cp_model.INT_MAX if c.hi is None else c.hi)
        if c.enforce is not None:
            k, val = c.enforce
            ct.only_enforce_if(xs[k] if val == 1 else ~xs[k])
    if program.objective is not None:
        o = program.objective
        m.minimize(cp_model.LinearExpr.weighted_sum([xs[k] for k in o.terms], list(o.terms.values())) + o.const)
    return m, xs


class CpSatBackend:
    name = "cpsat"
    exact = True  # integer arithmetic: INFEASIBLE is a proof
    overruns = False  # stops within milliseconds of max_time_in_seconds

    def solve(self, program: Program, settings: SolverSettings, time_limit: float) -> SolveOutcome:
        triv = trivial_outcome(program, self.name)
        if triv is not None:
            return triv
        t0 = time.perf_counter()
        if not program.is_pure_integer:
            return SolveOutcome(SolveStatus.ERROR, self.name, 0.0, "build",
                                message="CP-SAT solves integer programs only: this program has continuous "
                                        "variables (a relaxation; use scip, highs or cbc)")
        try:
            model, xs = build_cpsat(program)
        except Exception as e:  # coefficient overflow and the like
            return SolveOutcome(SolveStatus.ERROR, self.name, time.perf_counter() - t0, "build",
                                message=f"cannot build the CP-SAT model: {e}")
        build = time.perf_counter() - t0
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = settings.num_threads
        solver.parameters.max_time_in_seconds = max(0.001, float(time_limit))
        solver.parameters.random_seed = int(settings.seed)
        if program.objective is not None and program.meta.get("objective_is_guide"):
            solver.parameters.stop_after_first_solution = True  # any solution answers; the objective only guides
        st = solver.solve(model)
        secs = time.perf_counter() - t0
        name = solver.status_name(st)
        stats = {"build_seconds": build, "wall_time": solver.wall_time, "branches": solver.num_branches,
                 "conflicts": solver.num_conflicts, "workers": settings.num_threads}
        if st == cp_model.INFEASIBLE:
            return SolveOutcome(SolveStatus.INFEASIBLE, self.name, secs, name, stats=stats)
        if st in (cp_model.FEASIBLE, cp_model.OPTIMAL):
            vals = [int(solver.value(x)) for x in xs]
            return SolveOutcome(SolveStatus.FEASIBLE, self.name, secs, name, values=vals, stats=stats)
        if st == cp_model.MODEL_INVALID:
            return SolveOutcome(SolveStatus.ERROR, self.name, secs, name, message=model.validate(), stats=stats)
        return SolveOutcome(SolveStatus.TIMEOUT, self.name, secs, name,
                            message=f"CP-SAT stopped without a proof or a solution after {secs:.2f} s", stats=stats)
