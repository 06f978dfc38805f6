"""CBC through PuLP (its bundled ``cbc`` binary; a floating-point MIP solver with tolerances).

Indicators are linearized with exact big-M constants. Status mapping (PuLP's reading of CBC's solution file):
``Infeasible`` -> ``UNCONFIRMED`` (a floating-point claim that :func:`qverify.solvers.base.solve` has an exact back
end confirm) unless the time limit was used up (then timeout); ``Optimal`` or a solution
found before a stop -> candidate (rounded values, replayed by the caller); ``Not Solved`` (stopped on time
without a solution) -> timeout; anything else -> unknown. Threads, the time limit and CBC's random seed come from
the settings.
"""

from __future__ import annotations

import time

# OR-Tools first: PuLP imports ``highspy`` when it is installed, and a process that loaded highspy's HiGHS can no
# longer load OR-Tools' (conflicting C++ symbols: ``import pywraplp`` fails). Loaded in this order both work (PuLP
# then skips highspy); measured with OR-Tools 9.x and highspy 1.15.
# isort: off
from ortools.linear_solver import pywraplp  # noqa: F401
import pulp
# isort: on

from qverify.encode.program import Program
from qverify.settings import SolverSettings
from qverify.solvers.base import SolveOutcome, SolveStatus, round_values, stopped_by_time, trivial_outcome


class CbcBackend:
    name = "cbc"
    exact = False  # tolerances: its infeasible is a claim (UNCONFIRMED), see qverify.solvers.base
    overruns = False  # PuLP runs the CBC binary with its own time limit

    def solve(self, program: Program, settings: SolverSettings, time_limit: float) -> SolveOutcome:
        triv = trivial_outcome(program, self.name)
        if triv is not None:
            return triv
        t0 = time.perf_counter()
        lin = program.linearized()
        prob = pulp.LpProblem("qverify", pulp.LpMinimize)
        # PuLP >= 3.3 attaches variables to the problem (constructing LpVariable directly is deprecated there)
        make = getattr(prob, "add_variable", None) or pulp.LpVariable
        xs = [make(f"v{v.index}", v.lo, v.hi, cat=pulp.LpInteger if v.integer else pulp.LpContinuous)
              for v in lin.vars]
        if lin.objective is not None:
            prob += pulp.lpSum(a * xs[k] for k, a in lin.objective.terms.items()) + lin.objective.const
        else:
            prob += pulp.LpAffineExpression([(xs[0], 0)])
        for i, c in enumerate(lin.cons):
            e = pulp.LpAffineExpression([(xs[k], a) for k, a in c.terms])
            if c.lo is not None and c.hi is not None and c.lo == c.hi:
                prob += pulp.LpConstraint(e, pulp.LpConstraintEQ, f"c{i}", c.lo)
                continue
            if c.lo is not None:
                prob += pulp.LpConstraint(e, pulp.LpConstraintGE, f"c{i}l", c.lo)
            if c.hi is not None:
                prob += pulp.LpConstraint(e, pulp.LpConstraintLE, f"c{i}u", c.hi)
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1.0, float(time_limit)), threads=settings.num_threads,
                                options=[f"randomCbcSeed {int(settings.seed) + 1}"])
        build = time.perf_counter() - t0
        try:
            prob.solve(cmd)
        except pulp.PulpSolverError as e:
            return SolveOutcome(SolveStatus.ERROR, self.name, time.perf_counter() - t0, "error", message=str(e))
        secs = time.perf_counter() - t0
        name = pulp.LpStatus.get(prob.status, str(prob.status))
        sol = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
        stats = {"build_seconds": build, "sol_status": sol}
        raw_name = f"{name}/{sol}"
        has_solution = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        if prob.status == pulp.LpStatusInfeasible and not has_solution:
            if stopped_by_time(secs - build, time_limit):
                return SolveOutcome(SolveStatus.TIMEOUT, self.name, secs, raw_name, stats=stats,
                                    message="Infeasible reported at the time limit: not trusted as a proof")
            return SolveOutcome(SolveStatus.UNCONFIRMED, self.name, secs, raw_name, stats=stats)
        if has_solution or prob.status == pulp.LpStatusOptimal:
            # a variable in no row is not passed to CBC (PuLP drops it): any value of its domain will do
            raw = [float(x.varValue) if x.varValue is not None else float(v.lo) for x, v in zip(xs, lin.vars,
                                                                                                 strict=True)]
            return SolveOutcome(SolveStatus.FEASIBLE, self.name, secs, raw_name, values=round_values(raw),
                                raw_values=raw, stats=stats)
        if prob.status == pulp.LpStatusNotSolved:
            return SolveOutcome(SolveStatus.TIMEOUT, self.name, secs, raw_name, stats=stats,
                                message=f"CBC stopped after {secs:.2f} s without a proof or a solution")
        return SolveOutcome(SolveStatus.UNKNOWN, self.name, secs, raw_name, stats=stats,
                            message=f"CBC status {raw_name}: neither a proof nor a solution")
