"""Checked branch and bound: floating-point LPs guide the search, every conclusion is checked in exact integers.

The MIP back ends (SCIP, HiGHS, CBC) work in floating point with tolerances, and their ``infeasible`` is not a
proof: on the knife-edge property ``../shared/repro/edge70`` (one violating point among 1296) SCIP declares the
relaxed-input program infeasible (its root cuts cut off the only solution; with separation or presolve off it
finds it) and CBC the integer program. This back end decides a :class:`~qverify.encode.program.Program` (its
big-M linearization: rows ``lo_i <= a_i . x <= hi_i`` with integer coefficients and sides, integer variable
bounds ``l <= x <= u``) so that ``INFEASIBLE`` is a proof whose every step is exact integer arithmetic, and
``FEASIBLE`` on a pure integer program is an assignment checked row by row in integers.

A node is a box ``[l, u]`` of the variables. At each node:

1. **Exact bound propagation** (int64, with the magnitudes checked below ``2^62`` once for the whole program).
   With ``m_i = sum_j min(a_ij l_j, a_ij u_j)`` and ``M_i = sum_j max(a_ij l_j, a_ij u_j)`` the row activity
   bounds: ``M_i < lo_i`` or ``m_i > hi_i`` proves the node empty; otherwise every term is bounded by the rest of
   its row, ``a_ij x_j <= hi_i - (m_i - min(a_ij l_j, a_ij u_j))`` and ``a_ij x_j >= lo_i - (M_i - max(...))``,
   which gives ``x_j <= floor(.../a_ij)`` or ``x_j >= ceil(.../a_ij)`` for an integer variable (outward rounding,
   ``ceil``/``floor``, for a continuous one). Repeated to a fixed point or a round limit; an empty domain proves
   the node empty.
2. **A Farkas certificate from an LP.** The phase-one LP ``min sum (s_i^+ + s_i^-)`` subject to
   ``lo_i <= a_i . x + s_i^+ - s_i^- <= hi_i``, ``l <= x <= u``, ``s >= 0`` is solved by GLOP (floats). Its row
   duals ``pi`` are scaled and rounded to integers ``y`` (any integers are valid multipliers; the rounding only
   weakens the certificate). With ``y_i > 0`` only on rows with a lower side and ``y_i < 0`` only on rows with an
   upper side, every solution satisfies the aggregated row ``d . x >= beta`` with ``d = A^T y`` and
   ``beta = sum_{y_i > 0} y_i lo_i + sum_{y_i < 0} y_i hi_i``. When ``max_{x in [l, u]} d . x =
   sum_j max(d_j l_j, d_j u_j) < beta`` (computed in Python integers) the node is empty: that is the proof,
   checked exactly whatever GLOP's tolerances were (Neumaier and Shcherbina, "Safe bounds in linear and
   mixed-integer linear programming", Math. Programming 99, 2004, give the same argument for safe dual bounds).
3. Otherwise the LP point guides: on a pure integer program its rounding is checked exactly (a solution ends the
   search); the integer variable farthest from an integer in the LP point is branched on (``x_j <= floor(v)`` /
   ``x_j >= floor(v) + 1``, the nearer side first, depth first). A node whose LP point is integral on the integer
   variables but whose rounding fails the exact check branches on its widest integer variable instead; a node
   with every integer variable fixed is decided by propagation and the certificate alone (pure integer: the
   exact row check).

The search covers the box: the children of a node split an integer variable's domain, so ``INFEASIBLE`` (every
leaf proved empty) is a proof. A program with continuous variables (the relaxed-input program) whose leaf has an
LP point that no certificate refutes answers ``FEASIBLE`` with that point (not checked: a relaxation's solution
proves nothing, and its caller only rounds and replays it). Every other stop is ``TIMEOUT`` (the deadline) or
``ERROR`` (magnitudes beyond int64, GLOP unavailable).
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy import sparse

from qverify.encode.program import Program
from qverify.settings import SolverSettings
from qverify.solvers.base import SolveOutcome, SolveStatus, trivial_outcome

#: bound propagation rounds per node
PROPAGATION_ROUNDS = 12
#: integer magnitudes the int64 arithmetic must stay below (products and row sums)
SAFE = 2**62
#: the certificate's multipliers are rounded to integers after scaling the largest to ``2^MULTIPLIER_BITS``
MULTIPLIER_BITS = 40
BINARY_PRIORITY = 2.0
#: GLOP: dual simplex (warm starts after bound changes), no presolve (it would discard the basis)
GLOP_PARAMETERS = "use_dual_simplex: true, use_preprocessing: false"


class _Rows:
    """The linearized program as sparse int64 arrays (rows ``lo <= A x <= hi``, ``has_lo``/``has_hi`` flags)."""

    def __init__(self, program: Program) -> None:
        lin = program.linearized()
        self.n = len(lin.vars)
        self.lo0 = [int(v.lo) for v in lin.vars]
        self.hi0 = [int(v.hi) for v in lin.vars]
        self.integer = np.array([v.integer for v in lin.vars], dtype=bool)
        self.binary = np.array([v.integer and v.lo == 0 and v.hi == 1 for v in lin.vars], dtype=bool)
        rows, cols, vals = [], [], []
        rlo, rhi, has_lo, has_hi = [], [], [], []
        for i, c in enumerate(lin.cons):
            for k, a in c.terms:
                rows.append(i)
                cols.append(k)
                vals.append(int(a))
            has_lo.append(c.lo is not None)
            has_hi.append(c.hi is not None)
            rlo.append(int(c.lo) if c.lo is not None else 0)
            rhi.append(int(c.hi) if c.hi is not None else 0)
        self.m = len(lin.cons)
        bmax = max([abs(v) for v in self.lo0 + self.hi0], default=0)
        amax = max([abs(v) for v in vals], default=0)
        counts = np.bincount(np.asarray(rows, dtype=np.int64), minlength=self.m) if rows else np.zeros(0, np.int64)
        widest = int(counts.max()) if counts.size else 0
        sides = max([abs(v) for v in rlo + rhi], default=0)
        # every activity sum (and its difference with a side) stays below 2^62 in magnitude
        self.fits = amax * bmax * max(1, widest) + sides < SAFE // 4 and bmax < SAFE // 4
        self.lin = lin
        if not self.fits:
            return
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = np.asarray(cols, dtype=np.int64)
        self.vals = np.asarray(vals, dtype=np.int64)
        self.rlo = np.asarray(rlo, dtype=np.int64)
        self.rhi = np.asarray(rhi, dtype=np.int64)
        self.has_lo = np.asarray(has_lo, dtype=bool)
        self.has_hi = np.asarray(has_hi, dtype=bool)
        shape = (self.m, self.n)
        pos = self.vals > 0
        self.A = sparse.csr_matrix((self.vals, (self.rows, self.cols)), shape=shape, dtype=np.int64)
        self.Apos = sparse.csr_matrix((np.where(pos, self.vals, 0), (self.rows, self.cols)), shape=shape,
                                      dtype=np.int64)
        self.Aneg = sparse.csr_matrix((np.where(pos, 0, self.vals), (self.rows, self.cols)), shape=shape,
                                      dtype=np.int64)
        self.AT = self.A.T.tocsr()
        # the nonzeros sorted by column, for the per-column reductions of the propagation
        self.perm = np.argsort(self.cols, kind="stable")
        sc = self.cols[self.perm]
        self.starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]]) if sc.size else np.zeros(0, np.int64)
        self.col_ids = sc[self.starts] if sc.size else np.zeros(0, np.int64)
        self.absAT = abs(self.A).T.tocsr().astype(np.float64)

    # ------------------------------------------------------------------ exact checks
    def satisfied(self, x: np.ndarray) -> bool:
        """Whether the integer point ``x`` (inside the variable bounds) satisfies every row, exactly."""
        act = self.A @ x
        return bool(np.all(~self.has_lo | (act >= self.rlo)) and np.all(~self.has_hi | (act <= self.rhi)))

    def propagate(self, l: np.ndarray, u: np.ndarray) -> bool:
        """Tighten ``[l, u]`` in place by exact bound propagation; False when the node is proved empty.

        Every nonzero ``a = a_ij`` gives one upper and one lower candidate bound of ``x_j``: from the upper side
        ``a x_j <= s_hi = hi_i - (m_i - min(a l_j, a u_j))`` and the lower side ``a x_j >= s_lo = lo_i - (M_i -
        max(a l_j, a u_j))``, divided by ``a`` (its sign picks the direction); a column's bound is the tightest of
        its candidates (one ``reduceat`` over the column-sorted nonzeros)."""
        a, r, c = self.vals, self.rows, self.cols
        if not a.size:
            return bool(np.all(l <= u))
        pos = a > 0
        integ = self.integer[c]
        big = np.int64(SAFE)
        for _ in range(PROPAGATION_ROUNDS):
            mn = self.Apos @ l + self.Aneg @ u
            mx = self.Apos @ u + self.Aneg @ l
            if np.any(self.has_lo & (mx < self.rlo)) or np.any(self.has_hi & (mn > self.rhi)):
                return False
            tmin = np.where(pos, a * l[c], a * u[c])
            tmax = np.where(pos, a * u[c], a * l[c])
            s_hi = self.rhi[r] - (mn[r] - tmin)
            s_lo = self.rlo[r] - (mx[r] - tmax)
            fl_hi, ce_hi = s_hi // a, -((-s_hi) // a)
            fl_lo, ce_lo = s_lo // a, -((-s_lo) // a)
            hh, hl = self.has_hi[r], self.has_lo[r]
            # x_j <= ... : a > 0 from the upper side, a < 0 from the lower side (floor if integer, else ceil)
            up = np.where(pos, np.where(hh, np.where(integ, fl_hi, ce_hi), big),
                          np.where(hl, np.where(integ, fl_lo, ce_lo), big))
            # x_j >= ... : a > 0 from the lower side, a < 0 from the upper side (ceil if integer, else floor)
            dn = np.where(pos, np.where(hl, np.where(integ, ce_lo, fl_lo), -big),
                          np.where(hh, np.where(integ, ce_hi, fl_hi), -big))
            nu = u.copy()
            nl = l.copy()
            cols = self.col_ids
            nu[cols] = np.minimum(u[cols], np.minimum.reduceat(up[self.perm], self.starts))
            nl[cols] = np.maximum(l[cols], np.maximum.reduceat(dn[self.perm], self.starts))
            if np.any(nl > nu):
                return False
            if np.array_equal(nl, l) and np.array_equal(nu, u):
                return True
            l[:] = nl
            u[:] = nu
        return True

    def refutes(self, pi: np.ndarray, l: np.ndarray, u: np.ndarray) -> bool:
        """Whether the multipliers ``pi`` (floats, any sign) give an exact Farkas certificate that no point of
        ``[l, u]`` satisfies the rows (module docstring, step 2). Both signs of ``pi`` are tried (the LP's dual
        sign convention then does not matter)."""
        top = float(np.max(np.abs(pi))) if pi.size else 0.0
        if not np.isfinite(top) or top <= 0:
            return False
        # scale so that |A^T y| stays far below 2^62 (float estimate with a wide margin)
        colmag = float(np.max(self.absAT @ np.abs(pi))) / top if self.m else 0.0
        bits = MULTIPLIER_BITS
        while bits > 0 and colmag * 2.0**bits >= 2.0**60:
            bits -= 8
        if bits <= 0:
            return False
        for sign in (1.0, -1.0):
            y = np.rint(sign * pi / top * 2.0**bits).astype(np.int64)
            y = np.where(((y > 0) & self.has_lo) | ((y < 0) & self.has_hi), y, 0)
            if not np.any(y):
                continue
            d = self.AT @ y  # exact: |A^T y| < 2^62 by the scaling above (the float estimate has margin 4)
            beta = int(np.dot(np.where(y > 0, y, 0).astype(object), self.rlo.astype(object))) + int(
                np.dot(np.where(y < 0, y, 0).astype(object), self.rhi.astype(object)))
            do = d.astype(object)
            best = int(np.sum(np.where(d > 0, do * u.astype(object), do * l.astype(object))))
            if best < beta:
                return True
        return False


class _Lp:
    """The phase-one LP of the program in GLOP, built once; nodes change only the variable bounds."""

    def __init__(self, rows: _Rows) -> None:
        from ortools.linear_solver import pywraplp

        from qverify.solvers.ortools_mip import fill_solver

        self.s = pywraplp.Solver.CreateSolver("GLOP")
        if self.s is None:  # pragma: no cover - OR-Tools always ships GLOP
            raise RuntimeError("OR-Tools GLOP is unavailable")
        s = self.s
        inf = s.infinity()
        self.xs = fill_solver(s, rows.lin, integer=False)  # the LP relaxation, rows in the order of rows.lin.cons
        self.cons = s.constraints()
        obj = s.Objective()
        obj.Clear()  # phase one: the program's own objective is replaced by the total slack
        for c, row in zip(rows.lin.cons, self.cons, strict=True):
            if c.lo is not None:
                sp = s.NumVar(0.0, inf, "")
                row.SetCoefficient(sp, 1.0)
                obj.SetCoefficient(sp, 1.0)
            if c.hi is not None:
                sm = s.NumVar(0.0, inf, "")
                row.SetCoefficient(sm, -1.0)
                obj.SetCoefficient(sm, 1.0)
        obj.SetMinimization()
        # after a branching step only variable bounds change: the dual simplex restarts from the last basis
        s.SetSolverSpecificParametersAsString(GLOP_PARAMETERS)
        self.cur_l = np.array(rows.lo0, dtype=np.int64)
        self.cur_u = np.array(rows.hi0, dtype=np.int64)

    def solve(self, l: np.ndarray, u: np.ndarray, seconds: float) -> tuple[bool, np.ndarray, np.ndarray, float]:
        """Solve at the node ``[l, u]``: (solved, x, row duals, objective)."""
        from ortools.linear_solver import pywraplp

        changed = np.flatnonzero((l != self.cur_l) | (u != self.cur_u))
        for j in changed.tolist():
            self.xs[j].SetBounds(float(l[j]), float(u[j]))
        self.cur_l, self.cur_u = l.copy(), u.copy()
        self.s.SetTimeLimit(max(1, int(seconds * 1000)))
        st = self.s.Solve()
        if st not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            return False, np.zeros(0), np.zeros(0), math.inf
        x = np.array([v.solution_value() for v in self.xs])
        pi = np.array([c.dual_value() for c in self.cons])
        return True, x, pi, float(self.s.Objective().Value())


class CheckedBackend:
    """Branch and bound with exact certificates (module docstring): ``INFEASIBLE`` is an exact proof."""

    name = "checked"
    overruns = False  # the deadline is checked between nodes; each LP gets the time that is left
    exact = True

    def solve(self, program: Program, settings: SolverSettings, time_limit: float) -> SolveOutcome:
        triv = trivial_outcome(program, self.name)
        if triv is not None:
            return triv
        t0 = time.perf_counter()
        end = time.monotonic() + max(0.0, time_limit)
        rows = _Rows(program)
        if not rows.fits:
            return SolveOutcome(SolveStatus.ERROR, self.name, time.perf_counter() - t0, "magnitudes",
                                message="coefficients times bounds reach 2^60: beyond the checked back end's "
                                        "int64 arithmetic")
        lp = _Lp(rows)
        pure = bool(np.all(rows.integer))
        stack = [(np.array(rows.lo0, dtype=np.int64), np.array(rows.hi0, dtype=np.int64))]
        stats = {"nodes": 0, "lp_solves": 0, "by_propagation": 0, "by_certificate": 0, "max_depth": 0}
        depth_of = [0]
        while stack:
            if time.monotonic() >= end:
                stats["open_nodes"] = len(stack)
                return SolveOutcome(SolveStatus.TIMEOUT, self.name, time.perf_counter() - t0, "time limit",
                                    message=f"{stats['nodes']} nodes, {len(stack)} open at the deadline",
                                    stats=stats)
            l, u = stack.pop()
            depth = depth_of.pop()
            stats["nodes"] += 1
            stats["max_depth"] = max(stats["max_depth"], depth)
            if not rows.propagate(l, u):
                stats["by_propagation"] += 1
                continue
            fixed = rows.integer & (l == u)
            if pure and np.all(fixed):
                if rows.satisfied(l):
                    return self._found(l, None, t0, stats)
                stats["by_propagation"] += 1  # the exact row check of a fully fixed node
                continue
            ok, x, pi, val = lp.solve(l, u, max(0.001, end - time.monotonic()))
            stats["lp_solves"] += 1
            if not ok:  # GLOP stopped (time, numerics): branch without guidance
                x = (l + u) / 2.0
                pi = np.zeros(rows.m)
            elif rows.refutes(pi, l, u):
                stats["by_certificate"] += 1
                continue
            if pure:
                xr = np.clip(np.floor(x + 0.5).astype(np.int64), l, u)
                if rows.satisfied(xr):
                    return self._found(xr, x, t0, stats)
            frac = np.abs(x - np.floor(x + 0.5))
            cand = rows.integer & (l < u) & (frac > 1e-6)
            if np.any(cand):
                # binaries first (the phase, tie and one-hot indicators decide the big-M rows), then the widest
                # fractional integer
                score = np.where(cand, frac + BINARY_PRIORITY * rows.binary, -1.0)
                j = int(np.argmax(score))
                v = math.floor(float(x[j]))
                near_up = float(x[j]) - v >= 0.5
            else:
                open_int = rows.integer & (l < u)
                if not np.any(open_int):
                    # every integer variable fixed, continuous ones left, no certificate: a relaxed solution
                    return self._found(np.floor(x + 0.5).astype(np.int64), x, t0, stats, checked=False)
                if ok and val <= 1e-9 and not pure:
                    # an LP point integral on the integer variables: the relaxation is (numerically) feasible
                    return self._found(np.floor(x + 0.5).astype(np.int64), x, t0, stats, checked=False)
                j = int(np.argmax(np.where(open_int, u - l, -1)))
                v = int(l[j] + u[j]) // 2
                near_up = False
            v = min(max(int(v), int(l[j])), int(u[j]) - 1)
            down = (l.copy(), u.copy())
            down[1][j] = v
            up = (l.copy(), u.copy())
            up[0][j] = v + 1
            first, second = (up, down) if near_up else (down, up)
            stack.append(second)
            depth_of.append(depth + 1)
            stack.append(first)
            depth_of.append(depth + 1)
        return SolveOutcome(SolveStatus.INFEASIBLE, self.name, time.perf_counter() - t0, "INFEASIBLE",
                            message=f"every node refuted exactly ({stats['by_propagation']} by propagation, "
                                    f"{stats['by_certificate']} by LP certificates)", stats=stats)

    def _found(self, x: np.ndarray, raw: np.ndarray | None, t0: float, stats: dict,
               checked: bool = True) -> SolveOutcome:
        return SolveOutcome(SolveStatus.FEASIBLE, self.name, time.perf_counter() - t0,
                            "FEASIBLE" if checked else "RELAXATION_FEASIBLE", values=[int(v) for v in x],
                            raw_values=None if raw is None else [float(v) for v in raw], stats=stats)
