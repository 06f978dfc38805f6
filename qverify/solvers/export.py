"""Writers for the CPLEX LP and free MPS formats (for Gurobi, CPLEX, HiGHS, SCIP, CBC users).

The written program is :meth:`Program.linearized`: indicators become their exact big-M rows, every variable is an
integer with explicit bounds (binaries in the ``Binary`` section / ``BV`` bounds) unless a relaxation made it
continuous, ranged rows are split into two
rows (``NAME_lo``/``NAME_hi``), the objective is the program's (a feasibility program writes ``0``; it is
infeasible iff the property holds). Coefficients are exact integers written in decimal. Output is deterministic
(the golden files in ``encodings/golden/`` are compared byte for byte).
"""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path
from typing import TextIO

from qverify.encode.program import LinCon, Program, Var

_BAD = re.compile(r"[^A-Za-z0-9_.\[\]]")


def _prepare(program: Program) -> Program:
    """The linearized program; one that the encoder proved infeasible gets an explicit contradiction (a variable
    fixed to 0 and the row ``infeasible: v >= 1``) so that every reader sees an infeasible file."""
    prog = program.linearized()
    if prog.trivially_infeasible:
        v = Var(len(prog.vars), "qverify_infeasible", 0, 0)
        prog.vars.append(v)
        prog.cons.append(LinCon(((v.index, 1),), 1, None, "infeasible"))
    return prog


def _names(prog: Program) -> list[str]:
    """LP/MPS-safe unique variable names (``-`` becomes ``m``; a clash gets the index appended)."""
    out, seen = [], set()
    for v in prog.vars:
        n = _BAD.sub("_", v.name.replace("-", "m")) or f"v{v.index}"
        if n[0].isdigit() or n[0] == ".":
            n = "v" + n
        if n in seen:
            n = f"{n}__{v.index}"
        seen.add(n)
        out.append(n)
    return out


def _rows(prog: Program) -> list[tuple[str, LinCon, str, int]]:
    """``(name, row, sense, rhs)`` with sense ``<=``, ``>=`` or ``=`` (ranged rows split)."""
    out, seen = [], set()
    for i, c in enumerate(prog.cons):
        base = _BAD.sub("_", c.name.replace("-", "m")) or f"c{i}"
        if base in seen:
            base = f"{base}__{i}"
        seen.add(base)
        if c.lo is not None and c.hi is not None:
            if c.lo == c.hi:
                out.append((base, c, "=", c.lo))
            else:
                out.append((base + "_lo", c, ">=", c.lo))
                out.append((base + "_hi", c, "<=", c.hi))
        elif c.lo is not None:
            out.append((base, c, ">=", c.lo))
        else:
            out.append((base, c, "<=", c.hi))
    return out


def _terms(terms: list[tuple[int, int]], names: list[str]) -> list[str]:
    parts = []
    for k, a in terms:
        sign = "-" if a < 0 else "+"
        mag = abs(a)
        parts.append(f"{sign} {names[k]}" if mag == 1 else f"{sign} {mag} {names[k]}")
    return parts


def _wrap(prefix: str, parts: list[str], suffix: str, width: int = 100) -> str:
    lines, cur = [], prefix
    for p in parts:
        if len(cur) + 1 + len(p) > width and cur.strip():
            lines.append(cur)
            cur = "  "
        cur = f"{cur} {p}" if cur.strip() else f"{cur}{p}"
    cur = f"{cur} {suffix}" if suffix else cur
    lines.append(cur)
    return "\n".join(lines)


def write_lp(program: Program, out: str | Path | TextIO, comment: str = "") -> None:
    """Write ``program`` in CPLEX LP format."""
    prog = _prepare(program)
    names = _names(prog)
    buf = StringIO()
    buf.write("\\ qverify integer program (feasible iff the property is violated)\n")
    for key in sorted(prog.meta):
        buf.write(f"\\ {key}: {prog.meta[key]}\n")
    if comment:
        for line in comment.splitlines():
            buf.write(f"\\ {line}\n")
    if prog.trivially_infeasible:
        buf.write(f"\\ infeasible by construction: {prog.trivially_infeasible}\n")
    buf.write("Minimize\n")
    # every variable appears in the objective (with 0 when it has no cost): LP readers such as CBC's reject a
    # variable that is declared only in the Bounds section
    coefs = dict(prog.objective.terms) if prog.objective is not None else {}
    parts = [f"+ {c} {n}" if c >= 0 else f"- {-c} {n}" for n, c in ((n, coefs.get(k, 0))
                                                                  for k, n in enumerate(names))]
    buf.write(_wrap(" obj:", parts, "") + "\n")
    buf.write("Subject To\n")
    for name, c, sense, rhs in _rows(prog):
        parts = _terms(list(c.terms), names) or [f"0 {names[0]}"] if prog.vars else []
        buf.write(_wrap(f" {name}:", parts, f"{sense} {rhs}") + "\n")
    buf.write("Bounds\n")
    for v, n in zip(prog.vars, names, strict=True):
        if v.is_binary and v.lo == 0 and v.hi == 1:
            continue
        buf.write(f" {n} = {v.lo}\n" if v.lo == v.hi else f" {v.lo} <= {n} <= {v.hi}\n")
    gens = [n for v, n in zip(prog.vars, names, strict=True)
            if v.integer and not (v.is_binary and v.lo == 0 and v.hi == 1)]
    bins = [n for v, n in zip(prog.vars, names, strict=True) if v.is_binary and v.lo == 0 and v.hi == 1]
    if gens:
        buf.write("General\n" + _wrap("", gens, "") + "\n")
    if bins:
        buf.write("Binary\n" + _wrap("", bins, "") + "\n")
    buf.write("End\n")
    _emit(buf.getvalue(), out)


def write_mps(program: Program, out: str | Path | TextIO, name: str = "QVERIFY") -> None:
    """Write ``program`` in free MPS format (integer columns between ``MARKER`` lines, explicit bounds)."""
    prog = _prepare(program)
    names = _names(prog)
    rows = _rows(prog)
    buf = StringIO()
    # "FREE" after the name tells CoinMps (CBC) that this is free MPS; other readers take it as part of the name
    buf.write(f"NAME {_BAD.sub('_', name)} FREE\n")
    buf.write("ROWS\n N obj\n")
    code = {"<=": "L", ">=": "G", "=": "E"}
    for rname, _, sense, _ in rows:
        buf.write(f" {code[sense]} {rname}\n")
    cols: list[list[tuple[str, int]]] = [[] for _ in prog.vars]
    if prog.objective is not None:
        for k, a in sorted(prog.objective.terms.items()):
            cols[k].append(("obj", a))
    for rname, c, _, _ in rows:
        for k, a in c.terms:
            if a:
                cols[k].append((rname, a))
    buf.write("COLUMNS\n")
    for integer in (False, True):  # continuous columns (a relaxation's) first, then the integer ones
        ks = [k for k, v in enumerate(prog.vars) if v.integer == integer]
        if not ks:
            continue
        if integer:
            buf.write(" MARKER 'MARKER' 'INTORG'\n")
        for k in ks:
            for rname, a in cols[k] or [("obj", 0)]:
                buf.write(f" {names[k]} {rname} {a}\n")
        if integer:
            buf.write(" MARKER 'MARKER' 'INTEND'\n")
    buf.write("RHS\n")
    for rname, _, _, rhs in rows:
        if rhs:
            buf.write(f" rhs {rname} {rhs}\n")
    buf.write("BOUNDS\n")
    for v, n in zip(prog.vars, names, strict=True):
        if v.is_binary and v.lo == 0 and v.hi == 1:
            buf.write(f" BV bnd {n}\n")
        elif v.lo == v.hi:
            buf.write(f" FX bnd {n} {v.lo}\n")
        else:  # (a lower bound of 0 is MPS's default)
            if v.lo != 0:
                buf.write(f" LO bnd {n} {v.lo}\n")
            buf.write(f" UP bnd {n} {v.hi}\n")
    buf.write("ENDATA\n")
    _emit(buf.getvalue(), out)


def to_lp_string(program: Program, comment: str = "") -> str:
    s = StringIO()
    write_lp(program, s, comment)
    return s.getvalue()


def to_mps_string(program: Program) -> str:
    s = StringIO()
    write_mps(program, s)
    return s.getvalue()


def export(program: Program, path: str | Path, comment: str = "") -> Path:
    """Write ``program`` to ``path`` in the format of its suffix (``.lp`` or ``.mps``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".lp":
        write_lp(program, path, comment)
    elif suffix == ".mps":
        write_mps(program, path, path.stem)
    else:
        raise ValueError(f"{path}: unknown export format {suffix!r} (use .lp or .mps)")
    return path


def _emit(text: str, out: str | Path | TextIO) -> None:
    if isinstance(out, (str, Path)):
        Path(out).write_text(text)
    else:
        out.write(text)
