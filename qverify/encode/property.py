"""The unsafe region of a :class:`~qverify.property.Property` over the encoded outputs.

``unsafe(y) = OR_d (A_d y <= b_d)`` with integer rows (the property already carries the argmax tie rule as
integers: under ``first``, class ``i < c`` beats ``c`` when ``y_c - y_i <= 0`` and ``i > c`` when
``y_c - y_i <= -1``). Each row becomes ``sum_j A_dj y_j <= b_d`` over the output values (constants folded).
Disjuncts that cannot hold on the output domains are dropped; none left means the program is infeasible
(robust without a solver); one left is added as plain rows; otherwise one binary ``z_d`` per disjunct,
``sum_d z_d >= 1`` and the indicator rows ``z_d = 1 => A_d y <= b_d`` (big-M from the output domains when
linearized). An optional *margin* objective guides the search towards violations (see :func:`encode_unsafe`).
The equations are in ``encodings/property.md``.
"""

from __future__ import annotations

import numpy as np

from qverify.encode.program import LinExpr, Program, Value
from qverify.property import Property


def unsafe_rows(prop: Property, outputs: list[Value]) -> list[list[tuple[LinExpr, int]]]:
    """The disjuncts as lists of ``(expr, rhs)`` meaning ``expr <= rhs``; constant rows are decided here
    (a false one drops its disjunct, a true one is omitted)."""
    if len(outputs) != prop.num_outputs:
        raise ValueError(f"property has {prop.num_outputs} outputs, the encoding {len(outputs)}")
    out = []
    for conj in prop.unsafe:
        rows = []
        dead = False
        for a, b in zip(conj.A, conj.b, strict=True):
            nz = np.flatnonzero(a)
            e = LinExpr.weighted_sum([(int(a[j]), outputs[j]) for j in nz])
            if e.is_constant:
                if e.const > int(b):
                    dead = True
                    break
                continue
            rows.append((e, int(b)))
        if not dead:
            out.append(rows)
    return out


def encode_unsafe(program: Program, prop: Property, outputs: list[Value], name: str = "unsafe",
                  margin: bool = False) -> None:
    """Add ``OR_d (A_d y <= b_d)`` to ``program`` (see the module docstring).

    ``margin``: also add a variable ``t >= 0`` with ``t <= b_dk - A_dk y`` on every row of the chosen disjunct
    (the rows become ``A_dk y + t <= b_dk``, which imply the unsafe rows) and the objective ``maximize t``: the
    depth of the violation. It does not change the feasible inputs; it only guides a solver towards violations
    (:attr:`Program.meta` ``['objective_is_guide']``: any feasible solution answers the question).
    """
    rows = unsafe_rows(prop, outputs)
    if any(not r for r in rows):  # a disjunct that holds for every output: nothing to add
        return
    if margin:
        live = [d for d in rows if all(program.expr_bounds(e)[0] <= r for e, r in d)]
        top = max((min(r - program.expr_bounds(e)[0] for e, r in d) for d in live), default=0)
        if live and top > 0:
            t = program.add_var(f"{name}_margin", 0, top)
            rows = [[(e + LinExpr.var(t), r) for e, r in d] for d in live]
            program.objective = LinExpr.var(t, -1)
            program.meta["objective_is_guide"] = True
    program.add_disjunction(rows, name=name)
