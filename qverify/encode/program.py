"""A solver-neutral integer linear program: bounded integer variables, linear constraints with integer
coefficients, and indicator constraints.

Everything is exact Python integers. A :class:`Program` is a *feasibility* problem (no objective unless one is set):
the verification question "is there an input in the box whose output is unsafe?" is the question whether the
program has an integer solution.

* :class:`Var` ``lo <= v <= hi``, integer (a binary is an integer in ``[0, 1]``).
* :class:`LinExpr` ``sum_i c_i v_i + c0`` with integer ``c_i``, ``c0``.
* :class:`LinCon` ``lo <= sum_i c_i v_i <= hi`` (either side may be absent). Constraints are normalized on entry:
  the constant moves to the bounds, zero coefficients are dropped, and the row is divided by the gcd ``g`` of its
  coefficients with ``lo -> ceil(lo / g)``, ``hi -> floor(hi / g)`` (exact for integer variables: a row of
  multiples of ``g`` takes only multiples of ``g``).
* An *indicator* constraint carries an enforcement literal ``(v, value)``: the row must hold when ``v == value``
  (``v`` binary). Back ends with native support (CP-SAT ``OnlyEnforceIf``) use it; the others use the big-M form
  ``expr <= hi + (U - hi) * (1 - [v == value])`` where ``U`` is an upper bound of ``expr`` valid on every feasible
  point (by default the activity bound over the variable domains; the encoder may pass a tighter valid bound).
  :meth:`Program.linearized` gives the pure big-M program (what the exporters write).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Var:
    """A variable ``lo <= v <= hi`` (``index`` is its position in :attr:`Program.vars`), integer unless a
    relaxation (:meth:`Program.relaxed`) dropped its integrality."""

    index: int
    name: str
    lo: int
    hi: int
    integer: bool = True

    @property
    def is_binary(self) -> bool:
        return self.integer and self.lo >= 0 and self.hi <= 1


class LinExpr:
    """``sum_i c_i v_i + const`` over variable indices, integer coefficients (immutable by convention)."""

    __slots__ = ("terms", "const")

    def __init__(self, terms: Mapping[int, int] | None = None, const: int = 0) -> None:
        self.terms: dict[int, int] = {int(k): int(c) for k, c in (terms or {}).items() if c != 0}
        self.const: int = int(const)

    @classmethod
    def var(cls, v: Var | int, coef: int = 1) -> LinExpr:
        return cls({v.index if isinstance(v, Var) else int(v): coef})

    @classmethod
    def constant(cls, c: int) -> LinExpr:
        return cls(None, c)

    @classmethod
    def weighted_sum(cls, items: Iterable[tuple[int, LinExpr | int]], const: int = 0) -> LinExpr:
        """``sum_j w_j e_j + const`` for integer weights ``w_j`` and expressions or integers ``e_j``."""
        terms: dict[int, int] = {}
        c = int(const)
        for w, e in items:
            w = int(w)
            if w == 0:
                continue
            if isinstance(e, LinExpr):
                c += w * e.const
                for k, v in e.terms.items():
                    terms[k] = terms.get(k, 0) + w * v
            else:
                c += w * int(e)
        return cls(terms, c)

    @property
    def is_constant(self) -> bool:
        return not self.terms

    def __add__(self, other: LinExpr | int) -> LinExpr:
        return LinExpr.weighted_sum([(1, self), (1, other)])

    __radd__ = __add__

    def __sub__(self, other: LinExpr | int) -> LinExpr:
        return LinExpr.weighted_sum([(1, self), (-1, other)])

    def __rsub__(self, other: LinExpr | int) -> LinExpr:
        return LinExpr.weighted_sum([(-1, self), (1, other)])

    def __mul__(self, k: int) -> LinExpr:
        return LinExpr.weighted_sum([(int(k), self)])

    __rmul__ = __mul__

    def __neg__(self) -> LinExpr:
        return self * -1

    def value(self, assignment: Mapping[int, int] | list[int]) -> int:
        """The exact value under an integer assignment (indexable by variable index)."""
        return self.const + sum(c * int(assignment[k]) for k, c in self.terms.items())

    def __repr__(self) -> str:
        parts = [f"{c:+d}*v{k}" for k, c in sorted(self.terms.items())]
        if self.const or not parts:
            parts.append(f"{self.const:+d}")
        return "LinExpr(" + " ".join(parts) + ")"


Value = LinExpr | int
"""A neuron's value in an encoding: a constant (fixed by the bounds) or a linear expression over variables."""


@dataclass(frozen=True)
class LinCon:
    """``lo <= sum terms <= hi`` (``None`` = unbounded side), enforced only when ``enforce`` holds (if given).

    ``act_lo``/``act_hi`` (indicators only) are valid lower/upper bounds of the row's activity on every feasible
    point, used as the big-M constants when the indicator is linearized.
    """

    terms: tuple[tuple[int, int], ...]
    lo: int | None
    hi: int | None
    name: str
    enforce: tuple[int, int] | None = None
    act_lo: int | None = None
    act_hi: int | None = None


@dataclass
class Program:
    """Variables, constraints, an optional linear objective (minimized), and bookkeeping for the encoder."""

    vars: list[Var] = field(default_factory=list)
    cons: list[LinCon] = field(default_factory=list)
    objective: LinExpr | None = None
    #: set when the encoder proved the program infeasible without a solver (e.g. no unsafe disjunct reachable)
    trivially_infeasible: str = ""
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ variables
    def add_var(self, name: str, lo: int, hi: int) -> Var:
        lo, hi = int(lo), int(hi)
        if lo > hi:
            raise ValueError(f"variable {name}: empty domain [{lo}, {hi}]")
        v = Var(len(self.vars), name, lo, hi)
        self.vars.append(v)
        return v

    def add_binary(self, name: str) -> Var:
        return self.add_var(name, 0, 1)

    @property
    def num_binaries(self) -> int:
        return sum(1 for v in self.vars if v.is_binary)

    def copy(self) -> Program:
        """A copy to add rows and variables to without touching this program (variables, rows and expressions
        are immutable and shared)."""
        return Program(list(self.vars), list(self.cons), self.objective, self.trivially_infeasible, dict(self.meta))

    def relaxed(self, indices: Iterable[int]) -> Program:
        """A copy in which the variables ``indices`` are continuous (same bounds, rows and objective).

        Every integer solution of this program is a solution of the copy, so the copy's infeasibility proves this
        program infeasible; a solution of the copy proves nothing (its relaxed variables may be fractional)."""
        drop = set(indices)
        out = self.copy()
        out.vars = [replace(v, integer=False) if v.index in drop else v for v in out.vars]
        return out

    @property
    def is_pure_integer(self) -> bool:
        return all(v.integer for v in self.vars)

    # ------------------------------------------------------------------ activity bounds
    def activity(self, terms: Iterable[tuple[int, int]]) -> tuple[int, int]:
        """Exact min and max of ``sum c_i v_i`` over the variable domains (interval arithmetic)."""
        lo = hi = 0
        for k, c in terms:
            v = self.vars[k]
            if c > 0:
                lo += c * v.lo
                hi += c * v.hi
            else:
                lo += c * v.hi
                hi += c * v.lo
        return lo, hi

    def expr_bounds(self, e: Value) -> tuple[int, int]:
        if isinstance(e, LinExpr):
            a, b = self.activity(e.terms.items())
            return a + e.const, b + e.const
        return int(e), int(e)

    # ------------------------------------------------------------------ constraints
    def add_con(self, expr: LinExpr, lo: int | None = None, hi: int | None = None, name: str = "",
                enforce: tuple[Var | int, int] | None = None, act_lo: int | None = None,
                act_hi: int | None = None) -> LinCon | None:
        """Add ``lo <= expr <= hi`` (normalized, see the module docstring); returns ``None`` when the row is
        redundant on the variable domains. A row that can never hold makes the program trivially infeasible
        (or, for an indicator, forces the literal off)."""
        name = name or f"c{len(self.cons)}"
        c0 = expr.const
        lo = None if lo is None else int(lo) - c0
        hi = None if hi is None else int(hi) - c0
        if act_lo is not None:
            act_lo -= c0
        if act_hi is not None:
            act_hi -= c0
        terms = sorted(expr.terms.items())  # (LinExpr keeps no zero coefficients)
        g = math.gcd(*(c for _, c in terms)) if terms else 0
        if g > 1:
            terms = [(k, c // g) for k, c in terms]
            lo = None if lo is None else -((-lo) // g)
            hi = None if hi is None else hi // g
            act_lo = None if act_lo is None else -((-act_lo) // g)
            act_hi = None if act_hi is None else act_hi // g
        # Redundancy is decided on the variable domains only (they are constraints of the program); the
        # caller's activity bounds (valid on every execution) only tighten big-M constants and may switch an
        # indicator's literal off when its row can never hold on an execution (then no solution has it on).
        dmin, dmax = self.activity(terms)
        amin = dmin if act_lo is None else max(dmin, act_lo)
        amax = dmax if act_hi is None else min(dmax, act_hi)
        if enforce is None:
            amin, amax = dmin, dmax
        lit = None
        if enforce is not None:
            v, val = enforce
            idx = v.index if isinstance(v, Var) else int(v)
            if not self.vars[idx].is_binary or val not in (0, 1):
                raise ValueError(f"{name}: enforcement literal must be a binary variable and 0/1")
            lit = (idx, int(val))
        never = (lo is not None and amax < lo) or (hi is not None and amin > hi) or (
            lo is not None and hi is not None and lo > hi)
        if never:
            if lit is None:
                self.trivially_infeasible = self.trivially_infeasible or f"constraint {name} can never hold"
            else:  # the literal can never be true: fix it
                idx, val = lit
                self.add_con(LinExpr.var(idx), 1 - val, 1 - val, name=f"{name}_off")
            return None
        if lo is not None and dmin >= lo:
            lo = None
        if hi is not None and dmax <= hi:
            hi = None
        if lo is None and hi is None:
            return None
        con = LinCon(tuple(terms), lo, hi, name, lit, amin if lit is not None else None,
                     amax if lit is not None else None)
        self.cons.append(con)
        return con

    def add_indicator(self, lit: Var, value: int, expr: LinExpr, lo: int | None = None, hi: int | None = None,
                      name: str = "", act_lo: int | None = None, act_hi: int | None = None) -> LinCon | None:
        """``lit == value  =>  lo <= expr <= hi`` (``act_lo``/``act_hi``: valid activity bounds of ``expr``)."""
        return self.add_con(expr, lo, hi, name, enforce=(lit, value), act_lo=act_lo, act_hi=act_hi)

    def add_disjunction(self, rows: list[list[tuple[LinExpr, int]]], name: str = "d") -> list[Var] | None:
        """``OR_d AND_k (expr_dk <= rhs_dk)``: one binary per disjunct (``sum >= 1``), indicator rows.

        Disjuncts that can never hold on the variable domains are dropped; when none is left the program is
        trivially infeasible (returns ``None``); a single remaining disjunct is added as plain rows.
        """
        live = []
        for d in rows:
            if all(self.expr_bounds(e)[0] <= r for e, r in d):
                live.append(d)
        if not live:
            self.trivially_infeasible = self.trivially_infeasible or f"{name}: no disjunct can hold"
            return None
        if len(live) == 1:
            for k, (e, r) in enumerate(live[0]):
                self.add_con(e, None, r, name=f"{name}_0_{k}")
            return []
        lits = []
        for j, d in enumerate(live):
            z = self.add_binary(f"{name}_{j}")
            lits.append(z)
            for k, (e, r) in enumerate(d):
                self.add_indicator(z, 1, e, None, r, name=f"{name}_{j}_{k}")
        self.add_con(LinExpr.weighted_sum([(1, LinExpr.var(z)) for z in lits]), 1, None, name=f"{name}_any")
        return lits

    # ------------------------------------------------------------------ views
    def linearized(self) -> Program:
        """The same program with every indicator replaced by its big-M rows (exact: ``M`` from valid bounds)."""
        out = Program(list(self.vars), [], self.objective, self.trivially_infeasible, dict(self.meta))
        for c in self.cons:
            out.cons.extend(big_m_rows(c))
        return out

    def stats(self) -> dict[str, int]:
        cont = sum(1 for v in self.vars if not v.integer)
        return {"variables": len(self.vars), "binaries": self.num_binaries,
                "integers": len(self.vars) - self.num_binaries - cont, "continuous": cont,
                "constraints": len(self.cons),
                "indicators": sum(1 for c in self.cons if c.enforce is not None),
                "nonzeros": sum(len(c.terms) for c in self.cons)}

    def check(self, assignment: Mapping[int, int] | list[int]) -> list[str]:
        """Names of the constraints (and variable bounds) an integer assignment violates (exact)."""
        bad = [f"bound {v.name}" for v in self.vars if not v.lo <= int(assignment[v.index]) <= v.hi]
        for c in self.cons:
            if c.enforce is not None and int(assignment[c.enforce[0]]) != c.enforce[1]:
                continue
            a = sum(k * int(assignment[i]) for i, k in c.terms)
            if (c.lo is not None and a < c.lo) or (c.hi is not None and a > c.hi):
                bad.append(c.name)
        return bad


def big_m_rows(c: LinCon) -> list[LinCon]:
    """An indicator ``[v == val] => lo <= a.x <= hi`` as plain rows, exactly:

    ``a.x >= lo - (lo - L) * (1 - [v == val])`` and ``a.x <= hi + (U - hi) * (1 - [v == val])`` with ``L``, ``U``
    the valid activity bounds stored on the row; ``[v == val]`` is ``v`` or ``1 - v``.
    """
    if c.enforce is None:
        return [c]
    idx, val = c.enforce
    out = []
    # indicator term: t = [v == val] = v (val 1) or 1 - v (val 0)
    for side in ("lo", "hi"):
        rhs = c.lo if side == "lo" else c.hi
        if rhs is None:
            continue
        if side == "lo":  # a.x >= lo - M (1 - t),  M = lo - L
            m = rhs - c.act_lo
            # val 1: a.x - M v >= lo - M ; val 0: a.x + M v >= lo
            terms = dict(c.terms)
            terms[idx] = terms.get(idx, 0) + (-m if val == 1 else m)
            out.append(LinCon(tuple(sorted((k, v) for k, v in terms.items() if v)),
                              rhs - m if val == 1 else rhs, None, c.name + ("_lo" if c.lo is not None and
                                                                            c.hi is not None else "")))
        else:  # a.x <= hi + M (1 - t),  M = U - hi
            m = c.act_hi - rhs
            terms = dict(c.terms)
            terms[idx] = terms.get(idx, 0) + (m if val == 1 else -m)
            out.append(LinCon(tuple(sorted((k, v) for k, v in terms.items() if v)),
                              None, rhs + m if val == 1 else rhs, c.name + ("_hi" if c.lo is not None and
                                                                            c.hi is not None else "")))
    return out
