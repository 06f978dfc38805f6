"""VNN-LIB 1.0 properties (the VNN-COMP form): an exact parser and writer.

A VNN-LIB file declares real inputs ``X_0 .. X_{n-1}`` (the network's input, flattened in C order) and real outputs
``Y_0 .. Y_{m-1}`` and asserts constraints over them; the property is *violated* (VNN-COMP ``sat``) iff some input
satisfies every assertion together with its outputs. qverify reads it into a :class:`~qverify.property.Property`:

* **Numbers** (``1``, ``-0.5``, ``+.25``, ``6.25e-2``, ``(- 3)``, ``(/ 1 3)``) are exact rationals
  (:class:`fractions.Fraction` built from the decimal digits, never a float), written with ASCII digits, at most
  :data:`MAX_DIGITS` digits and a decimal exponent of magnitude at most :data:`MAX_EXPONENT` (``1e260`` is read
  exactly; ``1e99999`` is a located error rather than a slow exact power). Parentheses nest at most
  :data:`MAX_DEPTH` levels.
* **Terms** are linear: ``(+ t ...)``, ``(- t)``, ``(- t u ...)``, ``(* c t)`` / ``(* t c)`` with at most one
  non-constant factor, ``(/ t c)``; anything else (``(* Y_0 Y_1)``) is an error at the offending token.
* **Formulas**: ``<=``, ``>=``, ``<``, ``>``, ``=`` (chainable, as in SMT-LIB), ``and``, ``or``, ``not`` (pushed to
  the comparisons), ``true``, ``false``. All assertions are conjoined and brought into disjunctive normal form
  ``OR_d (AND of atoms)``, at most ``max_disjuncts`` disjuncts (also for every intermediate product), and at most
  :data:`WORK_FACTOR` ``* max_disjuncts`` disjuncts built in all.
* **Input atoms** must bound one input: ``a X_i + k (<=|>=|=) 0``. Each disjunct's input atoms give a real box
  ``[l, u]`` (every ``X_i`` needs both bounds), mapped to the integer grid by
  :func:`~qverify.property.box_to_grid` (native-integer grid: the grid points the box contains; quantizing input: the
  image of the box under the input quantizer). The common VNN-COMP form ``(assert (or (and <X bounds> <Y atoms>)
  ...))`` is supported when every disjunct has the same grid box (the usual case: the bounds are repeated in every
  disjunct) or the bounds are top-level assertions. Disjuncts whose box holds no grid point are dropped (they cannot
  be satisfied). Bounds of any size are exact: one beyond the grid (``(<= X_0 1e260)`` on pixels ``[0, 255]``) is
  the grid's end (:func:`~qverify.property.box_to_grid` clips in exact integers). Different boxes in different
  disjuncts are a *disjunction of input regions*:
  :func:`parse_vnnlib` rejects it with the place where it starts, :func:`parse_vnnlib_cases` returns one
  property per box (the file is violated iff one of them is).
* **Output atoms** ``sum_j a_j Y_j + k op 0`` over the real outputs ``Y_j = s_out (y_j - z_out)`` become exact integer
  rows with :func:`~qverify.property.real_row_to_int`: ``<=`` directly, ``>=`` negated into ``<=``; a strict
  ``a.Y < c`` is the negation of ``-a.Y <= -c``, whose integer form ``R y <= r`` gives ``-R y <= -r - 1`` (exact
  because ``R y`` is an integer); ``=`` is two rows. Rows are divided by the gcd of their coefficients (right-hand side
  floored: exact for integer ``y``). A row with no coefficient left is the constant ``0 <= r``. Every output the
  network can produce has ``|y_j| <= M`` (``M`` from ``net.output_range``), so ``|R y| <= span = M sum_j |R_j|``;
  a ``span >= 2^62`` (coefficients such as ``(* 1e260 Y_0)``) is a located error, since the row could not be
  evaluated exactly in int64, and a right-hand side with ``|r| >= 2^62 > span`` (``(<= Y_0 1e260)``) is the
  constant it is on every output the network can produce: true for ``r > 0``, false for ``r < 0``. Assertions
  whose normal form has no disjunct left (``(assert false)``, ``(<= Y_0 -1e260)``) can never be violated: a
  located error says so.

Errors (malformed s-expressions, unknown variables or operators, non-linear terms, missing bounds, bad numbers,
bytes that are not UTF-8) raise :class:`~qverify.property.PropertyError` naming the file, line and column (1-based)
of the offending token; no other exception leaves the parser (``tests/fuzzing.py`` checks it, and
``benchmarks/bench_fuzz.py`` fuzzes it for minutes).

Writing (:func:`write_vnnlib`) is exact, in real units, with finite decimal numbers:

* **Input box.** Native-integer grid (``net.input_rounding is None``): ``X_i`` in ``[s (lo - z), s (hi - z)]``, the
  exact real values of the grid end points, written exactly when they are finite decimals (the scale's denominator
  has no prime factor but 2 and 5, as for every float scale). Otherwise ``s (lo - z)`` is rounded *down* and
  ``s (hi - z)`` *up* to ``k`` decimals with ``10^-k <= s``, which keeps the same grid points (the rounding error
  is below one grid step). Quantizing input (``x = R(X / s) + z``): the interval whose quantization is exactly
  ``[lo, hi]`` and that is largest among intervals with ``k``-decimal end points, ``l = 10^-k threshold(lo - z)``,
  ``u = 10^-k (threshold(hi - z + 1) - 1)`` with :func:`~qverify.quant.threshold` over the multiplier
  ``10^-k / s``. ``k`` is the number of decimals of ``s / 2`` (then every rounding cut ``s (t +- 1/2)`` and ``s t``
  is a ``k``-decimal, so closed bucket edges are written exactly and open ones one unit ``10^-k`` inside), or, for
  a non-decimal scale, the first ``k`` with ``10^-k <= s / 10^6``. At the ends of the grid this is the bucket of the
  unclamped quantizer (the clamp would extend it to infinity).
* **Outputs.** Each integer row ``a'y <= b'`` is written as ``sum a'_j Y_j <= d``, where ``d`` is
  ``c = s_out (b' - z_out sum a')`` when that is a finite decimal, else ``c`` rounded up to ``k`` decimals with
  ``10^-k <= s_out`` (on integer outputs ``sum a'_j Y_j <= d`` iff ``a'y <= floor(d / s_out + z_out sum a')``, so
  every ``d`` in ``[c, c + s_out)`` gives the row ``a'y <= b'``). Rows ``y_c - y_i <= b'`` are
  written in the VNN-COMP form ``(>= Y_i Y_c)`` / ``(>= Y_i (+ Y_c e))``, so a robustness property (first-max tie
  rule: ``y_i >= y_c`` for ``i < c``, ``y_i >= y_c + 1`` for ``i > c``) reads
  ``(assert (or (and (>= Y_0 Y_7)) ... (and (>= Y_8 (+ Y_7 0.0625))) ...))`` (one output step ``s_out``; exact on
  the integer outputs).
* Header comments carry the name (read back by the parser), description, label and the unit conventions.

Round trip: ``parse_vnnlib(write_vnnlib(p, net), net)`` has the same box and the same unsafe region as ``p`` (rows
may be scaled or reordered).
"""

from __future__ import annotations

import bisect
import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from qverify.network import QNetwork
from qverify.property import (
    Conjunction,
    Property,
    PropertyError,
    box_to_grid,
    data_layout,
    pixels_to_grid,
    real_row_to_int,
    robustness_property,
)
from qverify.quant import INT64_SAFE, threshold

__all__ = ["parse_vnnlib", "parse_vnnlib_cases", "write_vnnlib", "write_robustness_properties", "parse_ids",
           "MAX_DISJUNCTS", "MAX_DEPTH", "MAX_DIGITS", "MAX_EXPONENT", "WORK_FACTOR"]

#: default limit on the number of disjuncts of the DNF (and of every intermediate product)
MAX_DISJUNCTS = 10_000
#: the disjuncts built while normalizing (all intermediate products and unions) are at most this many times
#: ``max_disjuncts``: a file that repeats a big subformula cannot take minutes
WORK_FACTOR = 20
#: deepest nesting of parentheses accepted (the formula and term readers recurse once per level)
MAX_DEPTH = 200
#: most digits of a numeral, and largest decimal exponent magnitude (``1e400``): bigger ones are located errors
MAX_DIGITS = 1000
MAX_EXPONENT = 400

_TOKEN = re.compile(r"(\s+)|(;[^\n]*)|(\()|(\))|([^\s();]+)")
_NUMBER = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?", re.ASCII)
_VAR = re.compile(r"([XY])_(0|[1-9]\d{0,17})", re.ASCII)
_HEADER = re.compile(r";+\s*(name|description)\s*:\s?(.*)")
_COMPARISONS = ("<=", ">=", "<", ">", "=")
_NEGATED = {"<=": ">", ">=": "<", "<": ">=", ">": "<="}
_IGNORED_COMMANDS = ("set-logic", "set-info", "set-option", "check-sat", "get-model", "exit")


# ------------------------------------------------------------------------------------------ reading
class _Atom(NamedTuple):
    text: str
    pos: int  # offset in the text (line and column are computed for error messages only)


class _List(NamedTuple):
    items: tuple[_Atom | _List, ...]
    pos: int


_Node = _Atom | _List


class _Source:
    """The text, its name and the line starts, for located errors."""

    def __init__(self, text: str, name: str) -> None:
        self.text = text
        self.name = name
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def where(self, offset: int) -> tuple[int, int]:
        """1-based line and column of a text offset."""
        i = bisect.bisect_right(self.starts, offset) - 1
        return i + 1, offset - self.starts[i] + 1

    def error(self, node: _Node | int, msg: str) -> PropertyError:
        line, col = self.where(node.pos if isinstance(node, (_Atom, _List)) else node)
        return PropertyError(f"{self.name}, line {line}, column {col}: {msg}")


def _read(src: _Source) -> list[_Node]:
    """The top-level s-expressions (iterative, so deep nesting is no problem)."""
    stack: list[list[_Node]] = [[]]
    opens: list[int] = []
    top = stack[-1]
    for m in _TOKEN.finditer(src.text):
        kind = m.lastindex
        if kind == 5:
            top.append(_Atom(m.group(5), m.start()))
        elif kind == 3:
            opens.append(m.start())
            if len(opens) > MAX_DEPTH:
                raise src.error(m.start(), f"parentheses nested deeper than {MAX_DEPTH} levels")
            top = []
            stack.append(top)
        elif kind == 4:
            if not opens:
                raise src.error(m.start(), "unexpected ')' (no matching '(')")
            items = stack.pop()
            top = stack[-1]
            top.append(_List(tuple(items), opens.pop()))
    if opens:
        raise src.error(opens[-1], "'(' is never closed")
    return stack[0]


class _NumberError(ValueError):
    """A token that is a number but out of the supported size (the caller adds the place)."""


@functools.lru_cache(maxsize=65536)
def _number(text: str) -> Fraction | None:
    """The exact value of a numeral/decimal token (``None`` when the token is not a number; ASCII digits only).

    Raises :class:`_NumberError` for more than :data:`MAX_DIGITS` digits or an exponent beyond
    :data:`MAX_EXPONENT` (exact, but such sizes only make the rational arithmetic slow)."""
    m = _NUMBER.fullmatch(text)
    if m is None or not (m.group(2) or m.group(3)):
        return None
    sign, whole, frac, exp = m.groups()
    frac = frac or ""
    if len(whole) + len(frac) > MAX_DIGITS:
        raise _NumberError(f"number with {len(whole) + len(frac)} digits (at most {MAX_DIGITS} are supported)")
    v = Fraction(int((whole or "0") + frac), 10 ** len(frac))
    if exp is not None:
        if len(exp.lstrip("+-").lstrip("0")) > 6 or abs(int(exp)) > MAX_EXPONENT:
            raise _NumberError(f"exponent of {text[:40]!r} out of range (|exponent| <= {MAX_EXPONENT})")
        v *= Fraction(10) ** int(exp)
    return -v if sign == "-" else v


# ------------------------------------------------------------------------------------------ parsing
_Var = tuple[str, int]  # ("X", i) or ("Y", j)
_Linear = tuple[dict[_Var, Fraction], Fraction]  # sum coeff * var + const
_Key = tuple  # an atom of the DNF: ("X", i, "lo"|"hi", value) or ("Y", row, rhs)
_Dnf = list[frozenset]


class _Parser:
    def __init__(self, src: _Source, net: QNetwork, max_disjuncts: int) -> None:
        self.src = src
        self.net = net
        self.limit = max_disjuncts
        self.decl: dict[_Var, _Atom] = {}
        self.where: dict[_Key, _Node] = {}  # first place of each atom
        self.assert_nodes: list[_List] = []
        self.work = 0  # disjuncts built so far (see spend)
        lo, hi = net.output_range
        self.out_max = max(abs(lo), abs(hi))  # |y_j| <= out_max for every output the network can produce

    def number(self, node: _Atom) -> Fraction | None:
        try:
            return _number(node.text)
        except _NumberError as e:
            raise self.src.error(node, str(e)) from None

    # ------------------------------------------------------------------ commands
    def run(self) -> list[_Dnf]:
        asserts: list[_Dnf] = []
        for node in _read(self.src):
            if not isinstance(node, _List) or not node.items or not isinstance(node.items[0], _Atom):
                raise self.src.error(node, "expected a command such as (declare-const X_0 Real) or (assert ...)")
            head = node.items[0].text
            if head == "declare-const":
                self.declare(node)
            elif head == "assert":
                if len(node.items) != 2:
                    raise self.src.error(node, f"assert takes one formula, got {len(node.items) - 1}")
                asserts.append(self.dnf(node.items[1], False))
                self.assert_nodes.append(node)
            elif head in _IGNORED_COMMANDS:
                continue
            else:
                raise self.src.error(node.items[0], f"unsupported command {head!r} (VNN-LIB 1.0 has declare-const "
                                                    f"and assert)")
        self.check_declarations()
        return asserts

    def declare(self, node: _List) -> None:
        items = node.items
        if len(items) != 3 or not all(isinstance(t, _Atom) for t in items[1:]):
            raise self.src.error(node, "expected (declare-const NAME Real)")
        name, sort = items[1], items[2]
        assert isinstance(name, _Atom) and isinstance(sort, _Atom)
        m = _VAR.fullmatch(name.text)
        if m is None:
            raise self.src.error(name, f"unsupported variable name {name.text!r} (VNN-LIB 1.0 inputs are X_i, "
                                       f"outputs Y_j)")
        if sort.text != "Real":
            raise self.src.error(sort, f"variable {name.text} must have sort Real, not {sort.text!r}")
        var = (m.group(1), int(m.group(2)))
        if var in self.decl:
            prev = self.decl[var]
            line, col = self.src.where(prev.pos)
            raise self.src.error(name, f"{name.text} is declared twice (first at line {line}, column {col})")
        self.decl[var] = name

    def check_declarations(self) -> None:
        for kind, n, what in (("X", self.net.num_inputs, "inputs"), ("Y", self.net.num_outputs, "outputs")):
            got = sorted(i for k, i in self.decl if k == kind)
            if got == list(range(n)):
                continue
            bad = next((i for i in got if i >= n), None)
            if bad is not None:
                raise self.src.error(self.decl[(kind, bad)], f"{kind}_{bad} does not exist: network "
                                                             f"{self.net.name!r} has {n} {what}")
            missing = next(i for i in range(n) if i not in got)
            raise self.src.error(0, f"{kind}_{missing} is not declared: network {self.net.name!r} has {n} "
                                         f"{what} ({kind}_0 .. {kind}_{n - 1}); the file declares {len(got)}")

    # ------------------------------------------------------------------ terms
    def linear(self, node: _Node) -> _Linear:
        if isinstance(node, _Atom):
            v = self.number(node)
            if v is not None:
                return {}, v
            m = _VAR.fullmatch(node.text)
            if m is not None:
                var = (m.group(1), int(m.group(2)))
                if var in self.decl:
                    return {var: Fraction(1)}, Fraction(0)
                raise self.src.error(node, f"unknown variable {node.text} (not declared)")
            if node.text[:1].isdigit() or node.text[:1] in "+-.":
                raise self.src.error(node, f"malformed number {node.text!r}")
            raise self.src.error(node, f"unknown symbol {node.text!r}")
        if not node.items:
            raise self.src.error(node, "empty term ()")
        head, args = node.items[0], node.items[1:]
        if not isinstance(head, _Atom):
            raise self.src.error(head, "expected an operator")
        op = head.text
        if op not in ("+", "-", "*", "/"):
            raise self.src.error(head, f"unsupported term operator {op!r} (linear terms use + - * /)")
        if not args:
            raise self.src.error(head, f"{op!r} needs arguments")
        terms = [self.linear(a) for a in args]
        if op == "+":
            return _add(terms, [1] * len(terms))
        if op == "-":
            if len(terms) == 1:
                return _add(terms, [-1])
            return _add(terms, [1] + [-1] * (len(terms) - 1))
        if op == "*":
            coeff, lin = Fraction(1), None
            for a, (c, k) in zip(args, terms, strict=True):
                if c:
                    if lin is not None:
                        raise self.src.error(a, "non-linear term: a product of two variable terms")
                    lin = (c, k)
                else:
                    coeff *= k
            if lin is None:
                return {}, coeff
            return _add([lin], [coeff])
        # "/"
        for a, (c, k) in zip(args[1:], terms[1:], strict=True):
            if c:
                raise self.src.error(a, "non-linear term: division by a variable term")
            if k == 0:
                raise self.src.error(a, "division by zero")
        div = math.prod((k for _, k in terms[1:]), start=Fraction(1))
        return _add(terms[:1], [1 / div])

    # ------------------------------------------------------------------ formulas
    def dnf(self, node: _Node, neg: bool) -> _Dnf:
        """Disjunctive normal form of ``node`` (negated when ``neg``), as a list of atom sets."""
        if isinstance(node, _Atom):
            if node.text in ("true", "false"):
                return [frozenset()] if (node.text == "true") != neg else []
            raise self.src.error(node, f"expected a formula, got {node.text!r}")
        if not node.items or not isinstance(node.items[0], _Atom):
            raise self.src.error(node, "expected a formula such as (<= X_0 1.0), (and ...) or (or ...)")
        head, args = node.items[0], node.items[1:]
        op = head.text
        if op in ("and", "or"):
            parts = [self.dnf(a, neg) for a in args]
            return self.conjoin(parts, head) if (op == "and") != neg else self.disjoin(parts, head)
        if op == "not":
            if len(args) != 1:
                raise self.src.error(head, "not takes one formula")
            return self.dnf(args[0], not neg)
        if op in _COMPARISONS:
            if len(args) < 2:
                raise self.src.error(head, f"{op!r} needs at least two arguments")
            if not neg and len(args) == 2 and op in ("<=", ">=", "=") and isinstance(args[0], _Atom) \
                    and isinstance(args[1], _Atom):
                fast = self.bound(args[0], args[1], op, head)
                if fast is not None:
                    return fast
            terms = [self.linear(a) for a in args]
            literals: list[list[_Key | bool]] = []  # a conjunction (not neg) / disjunction (neg) of literals
            for (c1, k1), (c2, k2) in zip(terms, terms[1:], strict=False):
                diff = _add([(c1, k1), (c2, k2)], [1, -1])
                if op == "=":
                    lits = [self.atom(diff, "<=", head), self.atom(diff, ">=", head)] if not neg else \
                        [self.atom(diff, "<", head), self.atom(diff, ">", head)]
                else:
                    lits = [self.atom(diff, _NEGATED[op] if neg else op, head)]
                literals.append(lits)
            # a chain holds iff every literal does; its negation iff some negated literal does
            flat = [_literal_dnf(lit) for lits in literals for lit in lits]
            return self.disjoin(flat, head) if neg else self.conjoin(flat, head)
        raise self.src.error(head, f"unsupported operator {op!r} in a formula (expected and, or, not, <=, >=, <, "
                                   f">, =)")

    def bound(self, a: _Atom, b: _Atom, op: str, where: _Node) -> _Dnf | None:
        """Fast path for the bulk of a VNN-LIB file, ``(op X_i c)`` and ``(op c X_i)`` (``None``: not that form;
        the general path then handles it and reports any error)."""
        m, num = _VAR.fullmatch(a.text), b
        if m is None:
            m, num = _VAR.fullmatch(b.text), a
            if m is None:
                return None
            op = {"<=": ">=", ">=": "<=", "=": "="}[op]
        if m.group(1) != "X" or ("X", int(m.group(2))) not in self.decl:
            return None
        v = self.number(num)
        if v is None:
            return None
        i = int(m.group(2))
        keys = ([("X", i, "hi", v)] if op != ">=" else []) + ([("X", i, "lo", v)] if op != "<=" else [])
        for key in keys:
            self.where.setdefault(key, where)
        return [frozenset(keys)]

    def conjoin(self, parts: list[_Dnf], where: _Node | int) -> _Dnf:
        units: set = set()
        multis: list[_Dnf] = []
        for d in parts:
            if not d:
                return []
            if len(d) == 1:
                units |= d[0]
            else:
                multis.append(d)
        out: _Dnf = [frozenset(units)]
        for d in multis:
            if len(out) * len(d) > self.limit:
                raise self.src.error(where, f"the disjunctive normal form has more than {self.limit} disjuncts "
                                            f"({len(out)} x {len(d)} here); split the property")
            self.spend(len(out) * len(d), where)
            out = list(dict.fromkeys(a | b for a in out for b in d))
        return out

    def spend(self, n: int, where: _Node | int) -> None:
        """Count ``n`` disjuncts built; more than ``WORK_FACTOR * max_disjuncts`` in all is a located error (each
        subformula's normal form is within the limit, but a file can repeat big ones many times)."""
        self.work += n
        if self.work > WORK_FACTOR * self.limit:
            raise self.src.error(where, f"the formula is too complex: bringing it into disjunctive normal form "
                                        f"builds more than {WORK_FACTOR * self.limit} disjuncts in all (here); "
                                        f"split the property")

    def disjoin(self, parts: list[_Dnf], where: _Node) -> _Dnf:
        self.spend(sum(len(d) for d in parts), where)
        out = list(dict.fromkeys(c for d in parts for c in d))
        if len(out) > self.limit:
            raise self.src.error(where, f"the disjunctive normal form has more than {self.limit} disjuncts; "
                                        f"split the property")
        return out

    def atom(self, lin: _Linear, op: str, where: _Node) -> _Key | bool:
        """``lin op 0`` as an atom key (input bound or integer output row), or a constant truth value."""
        coeffs, k = lin
        coeffs = {v: c for v, c in coeffs.items() if c != 0}
        kinds = {v[0] for v in coeffs}
        if not coeffs:
            return {"<=": k <= 0, ">=": k >= 0, "<": k < 0, ">": k > 0}[op]
        if kinds == {"X", "Y"}:
            raise self.src.error(where, "a constraint mixes inputs X and outputs Y; VNN-LIB 1.0 properties bound "
                                        "the inputs and constrain the outputs separately")
        if kinds == {"X"}:
            if len(coeffs) != 1:
                names = ", ".join(f"X_{i}" for _, i in sorted(coeffs))
                raise self.src.error(where, f"only bounds on single inputs are supported, got a linear constraint "
                                            f"over {names}")
            if op in ("<", ">"):
                raise self.src.error(where, "strict bounds on inputs are not supported (use <= or >=)")
            ((_, i), a), = coeffs.items()
            bound = -k / a
            upper = (op == "<=") == (a > 0)
            key: _Key = ("X", i, "hi" if upper else "lo", bound)
            self.where.setdefault(key, where)
            return key
        a = {j: c for (_, j), c in coeffs.items()}
        try:
            if op == "<=":
                row, r = real_row_to_int(self.net, a, -k)
            elif op == ">=":
                row, r = real_row_to_int(self.net, {j: -c for j, c in a.items()}, k)
            elif op == "<":  # a.Y < -k  <=>  not (-a.Y <= k)  <=>  R y >= r' + 1 where (R, r') encodes -a.Y <= k
                nrow, nr = real_row_to_int(self.net, {j: -c for j, c in a.items()}, k)
                row, r = -nrow, -nr - 1
            else:  # a.Y > -k  <=>  not (a.Y <= -k)
                prow, pr = real_row_to_int(self.net, a, -k)
                row, r = -prow, -pr - 1
        except PropertyError as e:
            raise self.src.error(where, str(e)) from None
        nz = [abs(int(v)) for v in row if v != 0]
        if not nz:
            return 0 <= r
        g = math.gcd(*nz)
        row = row // g
        r = r // g
        # every output the network can produce has |y_j| <= out_max, so |row . y| <= span
        span = self.out_max * (sum(nz) // g)
        if span >= INT64_SAFE:
            raise self.src.error(where, f"coefficients too large for exact int64 arithmetic (sum |a_j| * max |y_j| "
                                        f"= {span} >= 2^62 on the outputs of network {self.net.name!r})")
        if abs(r) >= INT64_SAFE:  # then |r| > span: true for every output the network can produce
            return r > 0  # (Y_0 <= 1e260), or for none (Y_0 <= -1e260)
        key = ("Y", tuple(int(v) for v in row), int(r))
        self.where.setdefault(key, where)
        return key


def _add(terms: Sequence[_Linear], weights: Sequence[Fraction | int]) -> _Linear:
    coeffs: dict[_Var, Fraction] = {}
    const = Fraction(0)
    for (c, k), w in zip(terms, weights, strict=True):
        for v, a in c.items():
            coeffs[v] = coeffs.get(v, Fraction(0)) + w * a
        const += w * k
    return coeffs, const


def _literal_dnf(lit: _Key | bool) -> _Dnf:
    if lit is True:
        return [frozenset()]
    if lit is False:
        return []
    return [frozenset([lit])]


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _read_text(path_or_text: str | Path) -> tuple[str, str]:
    """``(text, name)``: a :class:`Path`, a string without ``(`` and newlines, or a one-line string naming an
    existing file (``prop (1).vnnlib``), is a file name."""
    if isinstance(path_or_text, Path) or ("(" not in path_or_text and "\n" not in path_or_text) or \
            ("\n" not in path_or_text and _is_file(path_or_text)):
        p = Path(path_or_text)
        try:
            data = p.read_bytes()
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            raise PropertyError(f"{p}: cannot read the VNN-LIB file ({e})") from None
        try:
            return data.decode("utf-8"), str(p)
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            col = len(data[data.rfind(b"\n", 0, e.start) + 1:e.start].decode("utf-8", "replace")) + 1
            raise PropertyError(f"{p}, line {line}, column {col}: not UTF-8 text (byte {data[e.start]:#04x})") \
                from None
    return path_or_text, "<vnnlib>"


def _header(text: str) -> dict[str, str]:
    """``name`` and ``description`` from the leading comment block (``; name: ...``)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if not s.startswith(";"):
            break
        m = _HEADER.fullmatch(s)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


def _robustness_label(unsafe: Sequence[Conjunction], n_out: int) -> int | None:
    """``c`` when the unsafe region is ``OR_{i != c} (y_c - y_i <= b_i)`` with ``b_i`` in ``{0, -1}`` (robustness of
    class ``c``, with ties counted either way), else ``None``."""
    if len(unsafe) != n_out - 1 or n_out < 2:
        return None
    label, seen = None, set()
    for conj in unsafe:
        if conj.A.shape[0] != 1 or int(conj.b[0]) not in (0, -1):
            return None
        row = conj.A[0]
        pos, neg = np.flatnonzero(row == 1), np.flatnonzero(row == -1)
        if len(pos) != 1 or len(neg) != 1 or np.count_nonzero(row) != 2:
            return None
        c, i = int(pos[0]), int(neg[0])
        if label not in (None, c) or i in seen:
            return None
        label = c
        seen.add(i)
    return label


def _parse(text: str, source: str, net: QNetwork, max_disjuncts: int, name: str | None
           ) -> tuple[list[tuple[Property, frozenset]], dict[_Key, _Node]]:
    """One property per distinct grid box with the input atoms of its first disjunct, and where each atom is."""
    src = _Source(text, source)
    parser = _Parser(src, net, max_disjuncts)
    asserts = parser.run()
    dnf = parser.conjoin(asserts, 0) if asserts else [frozenset()]
    if not dnf:
        first = next((n for n, d in zip(parser.assert_nodes, asserts, strict=True) if not d), None)
        raise src.error(first if first is not None else 0,
                        "the assertions are unsatisfiable" + (" (this one is false for every input and every output "
                                                               "the network can produce)" if first else "")
                        + ": the property can never be violated, so there is nothing to verify")
    header = _header(text)
    n_in, n_out = net.num_inputs, net.num_outputs

    groups: dict[tuple[bytes, bytes], tuple[np.ndarray, np.ndarray, str, list[frozenset], frozenset]] = {}
    boxes: dict[frozenset, tuple[np.ndarray, np.ndarray, str] | None] = {}
    dropped = 0
    for conj in dnf:
        xs = frozenset(a for a in conj if a[0] == "X")
        ys = frozenset(a for a in conj if a[0] == "Y")
        if xs not in boxes:
            boxes[xs] = _grid_box(parser, xs, n_in)
        box = boxes[xs]
        if box is None:
            dropped += 1
            continue
        lo, hi, how = box
        gkey = (lo.tobytes(), hi.tobytes())
        if gkey not in groups:
            groups[gkey] = (lo, hi, how, [], xs)
        groups[gkey][3].append(ys)
    if not groups:
        raise src.error(0, "no point of the network's integer input grid satisfies the input constraints"
                        + (f" ({dropped} disjuncts, each with an empty box)" if dropped else ""))

    if name is None:
        name = header.get("name") or (Path(source).stem if source != "<vnnlib>" else "vnnlib")
    out = []
    for k, (lo, hi, how, conjs, xs) in enumerate(groups.values()):
        unsafe = []
        for ys in conjs:
            rows = sorted(ys, key=lambda a: (a[1], a[2]))
            if not rows:  # no output constraint: every output is unsafe
                unsafe = [Conjunction(np.zeros((0, n_out), dtype=np.int64), np.zeros(0, dtype=np.int64))]
                break
            unsafe.append(Conjunction(np.array([a[1] for a in rows], dtype=np.int64),
                                      np.array([a[2] for a in rows], dtype=np.int64)))
        meta = {"source": source}
        if "description" in header:
            meta["vnnlib_description"] = header["description"]
        if dropped:
            meta["dropped_disjuncts"] = str(dropped)
        try:
            prop = Property(lo, hi, tuple(unsafe), name=name if len(groups) == 1 else f"{name}#{k}",
                            description=f"VNN-LIB property from {source}; {how}",
                            label=_robustness_label(unsafe, n_out), metadata=meta)
        except PropertyError as e:
            raise PropertyError(f"{source}: {e}") from None
        out.append((prop, xs))
    return out, parser.where


def _grid_box(parser: _Parser, xs: frozenset, n_in: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The grid box of one disjunct's input atoms, ``None`` when it holds no grid point."""
    lo: list[Fraction | None] = [None] * n_in
    hi: list[Fraction | None] = [None] * n_in
    for _, i, side, v in xs:
        if side == "lo":
            lo[i] = v if lo[i] is None or v > lo[i] else lo[i]
        else:
            hi[i] = v if hi[i] is None or v < hi[i] else hi[i]
    for i in range(n_in):
        for what, b in (("lower", lo[i]), ("upper", hi[i])):
            if b is None:
                decl = parser.decl[("X", i)]
                raise parser.src.error(decl, f"input X_{i} (declared here) has no {what} bound"
                                       + (" in one of the disjuncts" if xs else ""))
    if any(l > h for l, h in zip(lo, hi, strict=True)):  # type: ignore[operator]
        return None
    glo, ghi, how = box_to_grid(parser.net, lo, hi)  # type: ignore[arg-type]
    if np.any(glo > ghi):
        return None
    return glo, ghi, how


def parse_vnnlib_cases(path_or_text: str | Path, net: QNetwork, max_disjuncts: int = MAX_DISJUNCTS,
                       name: str | None = None) -> list[Property]:
    """Parse a VNN-LIB 1.0 property into one :class:`Property` per distinct input grid box.

    The file is violated iff at least one of the returned properties is. Most files have a single box; see the
    module docstring for the grammar and the exact translation.
    """
    text, source = _read_text(path_or_text)
    return [p for p, _ in _parse(text, source, net, max_disjuncts, name)[0]]


def parse_vnnlib(path_or_text: str | Path, net: QNetwork, max_disjuncts: int = MAX_DISJUNCTS,
                 name: str | None = None) -> Property:
    """Parse a VNN-LIB 1.0 property for ``net`` into a :class:`Property` (see the module docstring).

    ``path_or_text`` is a :class:`~pathlib.Path`, a file name (a string without ``(`` and newlines, or one line
    naming an existing file), or the text itself. The name is ``name``, else the ``; name:`` header comment, else
    the file's stem. Raises :class:`PropertyError` (file, line, column) on malformed input, and when the file is a
    disjunction of different input boxes (:func:`parse_vnnlib_cases` splits those).
    """
    text, source = _read_text(path_or_text)
    cases, where_of = _parse(text, source, net, max_disjuncts, name)
    if len(cases) == 1:
        return cases[0][0]
    own = cases[1][1] - cases[0][1] or cases[1][1]
    nodes = [where_of[a] for a in own]
    where = min(nodes, key=lambda n: n.pos) if nodes else 0
    raise _Source(text, source).error(
        where, f"the property is a disjunction of {len(cases)} different input boxes, which one Property cannot "
               f"hold (parse_vnnlib_cases splits it into one property per box); the second box starts here")


# ------------------------------------------------------------------------------------------ writing
def _is_decimal(q: Fraction) -> bool:
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _decimals(q: Fraction) -> int:
    """Number of decimals of a finite decimal ``q``."""
    d, a, b = q.denominator, 0, 0
    while d % 2 == 0:
        d, a = d // 2, a + 1
    while d % 5 == 0:
        d, b = d // 5, b + 1
    return max(a, b)


def _digits_for(step: Fraction, margin: int = 0) -> int:
    """The smallest ``k >= 1`` with ``10^-k <= step / 10^margin``."""
    k = 1
    while Fraction(1, 10**k) > step / 10**margin:
        k += 1
    return k


def _dec(q: Fraction) -> str:
    """Exact decimal text of a finite decimal rational (``-0.0625``, ``3.0``)."""
    if not _is_decimal(q):
        raise ValueError(f"{q} has no finite decimal expansion")
    k = _decimals(q)
    n = abs(q.numerator) * (10**k // q.denominator)
    s = str(n).rjust(k + 1, "0")
    whole, frac = s[: len(s) - k], s[len(s) - k:]
    frac = frac.rstrip("0") or "0"
    return f"{'-' if q < 0 else ''}{whole}.{frac}"


def _round_dec(q: Fraction, k: int, up: bool) -> Fraction:
    """``q`` rounded down (``up=False``) or up to ``k`` decimals."""
    v = q * 10**k
    n = -((-v.numerator) // v.denominator) if up else v.numerator // v.denominator
    return Fraction(n, 10**k)


class _Writer:
    def __init__(self, net: QNetwork) -> None:
        self.net = net
        s = net.input_scale
        if net.input_rounding is None:
            self.k_in = 0 if _is_decimal(s) else _digits_for(s)
        else:
            self.k_in = _decimals(s / 2) if _is_decimal(s) else _digits_for(s, margin=6)
            mult = Fraction(1, 10**self.k_in) / s
            self.mult = (mult.numerator, mult.denominator)
        self.k_out = 0 if _is_decimal(net.output_scale) else _digits_for(net.output_scale)
        self.cache: dict[tuple[int, bool], Fraction] = {}

    def input_end(self, v: int, upper: bool) -> Fraction:
        """The real end point written for grid end point ``v`` (see the module docstring)."""
        key = (v, upper)
        if key not in self.cache:
            net, s, z = self.net, self.net.input_scale, self.net.input_zero_point
            if net.input_rounding is None:
                c = s * (v - z)
                out = c if _is_decimal(c) else _round_dec(c, self.k_in, up=upper)
            else:
                num, den = self.mult
                if upper:
                    a = threshold(v - z + 1, num, den, net.input_rounding) - 1
                else:
                    a = threshold(v - z, num, den, net.input_rounding)
                out = Fraction(a, 10**self.k_in)
            self.cache[key] = out
        return self.cache[key]

    def rhs(self, row: Sequence[int], b: int) -> Fraction:
        """``d`` with ``sum a_j Y_j <= d`` equivalent to ``a y <= b`` on integer outputs."""
        s, z = self.net.output_scale, self.net.output_zero_point
        c = s * (b - z * sum(row))
        return c if _is_decimal(c) else _round_dec(c, self.k_out, up=True)

    def row(self, row: Sequence[int], b: int) -> str | bool:
        """The VNN-LIB text of ``row . y <= b``, or its truth value when ``row`` is zero."""
        nz = [(j, int(a)) for j, a in enumerate(row) if a != 0]
        if not nz:
            return b >= 0
        d = self.rhs(row, b)
        pos = [(j, a) for j, a in nz if a > 0]
        neg = [(j, -a) for j, a in nz if a < 0]
        if len(pos) == 1 and len(neg) == 1 and pos[0][1] == 1 and neg[0][1] == 1:
            c, i = pos[0][0], neg[0][0]  # Y_c - Y_i <= d  <=>  Y_i >= Y_c - d
            return f"(>= Y_{i} Y_{c})" if d == 0 else f"(>= Y_{i} (+ Y_{c} {_dec(-d)}))"
        if not pos and len(neg) == 1 and neg[0][1] == 1:
            return f"(>= Y_{neg[0][0]} {_dec(-d)})"
        lhs = _sum_text([_term(j, a) for j, a in pos]) if pos else "0.0"
        rterms = [_term(j, a) for j, a in neg] + ([_dec(d)] if d != 0 or not neg else [])
        return f"(<= {lhs} {_sum_text(rterms)})"


def _term(j: int, a: int) -> str:
    return f"Y_{j}" if a == 1 else f"(* {a}.0 Y_{j})"


def _sum_text(terms: list[str]) -> str:
    return terms[0] if len(terms) == 1 else f"(+ {' '.join(terms)})"


def _comment(text: str) -> list[str]:
    return [f"; {line}".rstrip() for line in str(text).splitlines()] or [";"]


def write_vnnlib(prop: Property, net: QNetwork, path: str | Path | None = None) -> str:
    """The VNN-LIB 1.0 text of ``prop`` for ``net`` in real units (written to ``path`` when given).

    The numbers are exact decimals chosen so that :func:`parse_vnnlib` gives back the same grid box and the same
    unsafe region (see the module docstring for the end points and right-hand sides written).
    """
    prop.check_network(net)
    w = _Writer(net)
    n_in, n_out = net.num_inputs, net.num_outputs
    s_in, z_in, s_out, z_out = net.input_scale, net.input_zero_point, net.output_scale, net.output_zero_point
    lines = ["; VNN-LIB 1.0 property written by qverify", f"; name: {' '.join(prop.name.split())}"]
    desc = prop.description.splitlines() or [""]
    lines.append(f"; description: {desc[0]}".rstrip())
    lines += _comment("\n".join(desc[1:])) if len(desc) > 1 else []
    if prop.label is not None:
        lines.append(f"; label: {prop.label}")
    lines.append(f"; network: {net.name} ({n_in} inputs X_i, the input flattened in C order; {n_out} outputs Y_j)")
    if net.input_rounding is None:
        lines.append(f"; inputs: X_i = {s_in} * (x_i - {z_in}) on the integer grid x_i in [{net.input_lo}, "
                     f"{net.input_hi}]; the bounds are the real values of the grid box")
    else:
        lines.append(f"; inputs: quantized as x_i = clamp({net.input_rounding.value}(X_i / {s_in}) + {z_in}, "
                     f"{net.input_lo}, {net.input_hi}); each interval is the largest with {w.k_in}-decimal end "
                     f"points whose quantization is the grid box")
    lines.append(f"; outputs: Y_j = {s_out} * (y_j - {z_out}) for the integer outputs y_j")
    lines.append("; the property is violated iff some input in the box gives outputs satisfying the last assertion")
    lines.append("")
    lines += [f"(declare-const X_{i} Real)" for i in range(n_in)]
    lines.append("")
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    lines.append("")
    lines.append("; input box")
    for i in range(n_in):
        lo, hi = int(prop.lo[i]), int(prop.hi[i])
        lines.append(f"(assert (>= X_{i} {_dec(w.input_end(lo, False))}))")
        lines.append(f"(assert (<= X_{i} {_dec(w.input_end(hi, True))}))")
    lines.append("")
    lines.append("; unsafe outputs")
    disjuncts = []
    for conj in prop.unsafe:
        rows: list[str] = []
        sat = True
        for a, b in zip(conj.A.tolist(), conj.b.tolist(), strict=True):
            r = w.row(a, b)
            if r is False:
                sat = False
                break
            if isinstance(r, str):
                rows.append(r)
        if not sat:
            continue
        disjuncts.append(f"    (and {' '.join(rows) if rows else '(>= Y_0 Y_0)'})")
    if not disjuncts:
        raise PropertyError(f"property {prop.name!r}: every disjunct of the unsafe region is unsatisfiable "
                            f"(0 <= negative); nothing to write")
    lines.append("(assert (or")
    lines += disjuncts
    lines.append("))")
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


# ------------------------------------------------------------------------------------------ robustness files
def parse_ids(spec: str, n: int | None = None) -> list[int]:
    """Sample ids from ``"0:100"`` (Python slice, end exclusive), ``"5"``, ``"1,3,7"``, ``"0:100:2"``, or a
    comma-separated mix; open ends (``"900:"``) need ``n``."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                bits = [int(b) if b.strip() else None for b in part.split(":")]
                if len(bits) > 3:
                    raise ValueError
                start, stop = bits[0] or 0, bits[1]
                step = bits[2] if len(bits) == 3 and bits[2] is not None else 1
                if stop is None:
                    if n is None:
                        raise PropertyError(f"ids {spec!r}: an open range needs the number of samples")
                    stop = n
                out += list(range(start, stop, step))
            else:
                out.append(int(part))
        except ValueError:
            raise PropertyError(f"ids {spec!r}: expected START:STOP[:STEP], an id, or a comma-separated list") \
                from None
    return out


def _tag(v: object) -> str:
    t = str(v)
    return re.sub(r"[^0-9A-Za-z.+-]", "_", t)


def write_robustness_properties(net: QNetwork, images: np.ndarray, labels: Sequence[int] | np.ndarray,
                                ids: Iterable[int], *, radius: int | None = None,
                                eps: float | Fraction | str | None = None, out_dir: str | Path,
                                prefix: str = "prop", ties: str | None = None, preprocess: Any = None) -> list[Path]:
    """One VNN-LIB local-robustness property per sample, ``{out_dir}/{prefix}_{id}_r{radius}.vnnlib`` (or
    ``..._eps{eps}.vnnlib``); returns the paths in ``ids`` order.

    The sample ``images[id]`` is mapped to the integer grid by :func:`~qverify.property.pixels_to_grid`, the box
    built by :func:`~qverify.property.robustness_property` (``radius`` in input units, or a real ``eps``), the
    unsafe region is "some class other than ``labels[id]`` wins" under the network's tie rule (or ``ties``).
    ``preprocess`` (a :class:`qverify.preprocess.Preprocess`): the data are raw pixels the model takes through it;
    ``radius`` is then in raw pixels (``eps`` is not allowed with it).
    """
    ids = [int(i) for i in ids]
    images = np.asarray(images)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise PropertyError(f"{len(images)} images but {len(labels)} labels")
    bad = [i for i in ids if not 0 <= i < len(images)]
    if bad:
        raise PropertyError(f"sample id {bad[0]} outside the data (0 .. {len(images) - 1})")
    if (radius is None) == (eps is None):
        raise PropertyError("give exactly one of radius (input units) and eps (real units)")
    tag = f"r{int(radius)}" if radius is not None else f"eps{_tag(eps)}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if preprocess is not None and radius is None:
        raise PropertyError("--preprocess takes --radius in raw pixels, not --eps")
    xs = pixels_to_grid(net, images[ids], preprocess) if ids else np.zeros((0, net.num_inputs), dtype=np.int64)
    raw = data_layout(net, images[ids]) if ids and preprocess is not None else None
    paths = []
    for k, (sid, x) in enumerate(zip(ids, xs, strict=True)):
        label = int(labels[sid])
        stem = f"{prefix}_{sid}_{tag}"
        if raw is not None:
            prop = preprocess.robustness_property(net, raw[k], label, int(radius), name=stem,  # type: ignore[arg-type]
                                                  ties=ties)
        else:
            prop = robustness_property(net, x, label, radius=radius, eps=eps, name=stem, ties=ties)
        prop = replace(prop, description=f"sample {sid}, {prop.description}",
                       metadata={**prop.metadata, "sample_id": str(sid)})
        path = out / f"{stem}.vnnlib"
        write_vnnlib(prop, net, path)
        paths.append(path)
    return paths
