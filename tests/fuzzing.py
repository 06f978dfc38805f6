"""Fuzzers of the three input readers (issue 16): hypothesis strategies and the contract every reader must keep.

A reader either returns a valid object or raises its documented error whose message names the file and the place:

* VNN-LIB (:func:`qverify.io.vnnlib.parse_vnnlib`, :func:`~qverify.io.vnnlib.parse_vnnlib_cases`): a
  :class:`~qverify.property.PropertyError` reading ``SOURCE, line L, column C: ...``;
* ``.qnn`` (:func:`qverify.io.native.load_native`) and ONNX (:func:`qverify.io.onnx.load_onnx`): a
  :class:`~qverify.network.ModelError` whose message starts with the file's path.

Anything else (another exception type, an error without its place) is a *crash*. A returned object is checked too:
a generated VNN-LIB file whose meaning is known must parse to exactly that meaning (box and unsafe region, compared
on every integer output of the network's output range); a mutation that breaks a field's type must be refused, never
read as some other value; a loaded model must run on the executor.

Used by ``tests/test_fuzz_readers.py`` (a short, seeded run) and ``benchmarks/bench_fuzz.py`` (minutes per reader).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import json
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from qverify.network import ModelError, QNetwork
from qverify.property import Property, PropertyError, box_to_grid
from qverify.quant import Rounding
from tests.fixtures import random_conv_network, random_dense_network

VALID, DOCUMENTED, CRASH = "valid", "documented error", "crash"
_LOCATED = re.compile(r"^(?P<src>.+?), line (?P<line>\d+), column (?P<col>\d+): ")


@dataclass
class Outcome:
    """What a reader did with one input: ``kind`` is :data:`VALID`, :data:`DOCUMENTED` or :data:`CRASH`."""

    kind: str
    detail: str = ""

    @property
    def crashed(self) -> bool:
        return self.kind == CRASH


def _crash(e: BaseException, why: str = "") -> Outcome:
    tb = e.__traceback__
    where = ""
    while tb is not None:
        where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
        tb = tb.tb_next
    return Outcome(CRASH, f"{why}{type(e).__name__} at {where}: {str(e)[:300]}")


# ============================================================================================== VNN-LIB
def vnnlib_network(kind: int) -> QNetwork:
    """The networks the VNN-LIB fuzzer parses against (native-integer and quantizing inputs, zero points)."""
    base = random_dense_network(np.random.default_rng(kind), n_in=2 + kind % 2, n_out=3, input_hi=15)
    units = [dict(input_scale=Fraction(1, 10)), dict(input_scale=Fraction(1, 255), input_zero_point=3),
             dict(input_scale=Fraction(1, 8), input_rounding=Rounding.HALF_EVEN),
             dict(input_scale=Fraction(3, 7), input_zero_point=-2, input_rounding=Rounding.FLOOR)][kind % 4]
    outs = [dict(output_scale=Fraction(1, 16)), dict(output_scale=Fraction(1, 3), output_zero_point=2)][kind % 2]
    return dataclasses.replace(base, **units, **outs)


VNNLIB_NETS = [vnnlib_network(k) for k in range(4)]
#: every integer output of the networks above (their last Requantize clamps to [-8, 7])
OUTPUT_POINTS = np.array(list(itertools.product(range(-8, 8), repeat=3)), dtype=np.int64)


def _dec_text(q: Fraction) -> str | None:
    """The exact decimal spelling of ``q`` (``None`` when its expansion does not terminate)."""
    d, k = q.denominator, 0
    while d % 10 == 0 or d % 2 == 0 or d % 5 == 0:
        d, k = (d // 10, k + 1) if d % 10 == 0 else ((d // 2, k + 1) if d % 2 == 0 else (d // 5, k + 1))
    if d != 1:
        return None
    n = abs(q.numerator) * 10**k // q.denominator
    s = str(n).rjust(k + 1, "0")
    whole, frac = s[: len(s) - k], s[len(s) - k:]
    return ("-" if q < 0 else "") + whole + ("." + frac if frac else "")


@st.composite
def number_text(draw: st.DrawFn, q: Fraction) -> str:
    """A VNN-LIB term whose exact value is ``q``, in one of many spellings."""
    forms = ["frac", "neg_frac"]
    dec = _dec_text(q)
    if dec is not None:
        forms += ["dec", "dec", "sci", "plus", "lead0"]
    form = draw(st.sampled_from(forms))
    if form == "frac" or (form == "neg_frac" and q == 0):
        return f"(/ {q.numerator} {q.denominator})" if q.denominator != 1 or draw(st.booleans()) else str(q)
    if form == "neg_frac":
        return f"(- (/ {-q.numerator} {q.denominator}))"
    assert dec is not None
    if form == "dec":
        return dec
    if form == "plus":
        return dec if dec.startswith("-") else "+" + dec
    if form == "lead0":
        return dec.replace("-", "-00") if dec.startswith("-") else "00" + dec
    e = draw(st.integers(-5, 5))  # q = m * 10^e with m = q / 10^e, a decimal too
    mt = _dec_text(q / Fraction(10) ** e)
    assert mt is not None
    return f"{mt}{draw(st.sampled_from('eE'))}{e}"


@dataclass
class VnnCase:
    """A generated VNN-LIB text and its meaning (``None`` after a mutation: only the contract is checked)."""

    text: str
    net_kind: int
    lo: list[Fraction] | None = None
    hi: list[Fraction] | None = None
    #: unsafe region in real outputs: OR of AND of (coeffs {j: a_j}, const k, op) meaning sum a_j Y_j + k op 0
    unsafe: list[list[tuple[dict[int, Fraction], Fraction, str]]] | None = None
    mutation: str = ""


_OPS = ("<=", ">=", "<", ">", "=")
_SMALL = st.fractions(min_value=-4, max_value=4, max_denominator=12)


@st.composite
def _linear_text(draw: st.DrawFn, coeffs: dict[int, Fraction], k: Fraction) -> str:
    """A term equal to ``sum a_j Y_j + k``."""
    parts = []
    for j, a in coeffs.items():
        if a == 1 and draw(st.booleans()):
            parts.append(f"Y_{j}")
        elif draw(st.booleans()):
            parts.append(f"(* {draw(number_text(a))} Y_{j})")
        else:
            parts.append(f"(* Y_{j} {draw(number_text(a))})")
    if k != 0 or not parts:
        parts.append(draw(number_text(k)))
    return parts[0] if len(parts) == 1 else f"(+ {' '.join(parts)})"


@st.composite
def vnnlib_cases(draw: st.DrawFn) -> VnnCase:
    """A valid VNN-LIB 1.0 file for one of :data:`VNNLIB_NETS` with a known meaning (box, unsafe region)."""
    kind = draw(st.integers(0, len(VNNLIB_NETS) - 1))
    net = VNNLIB_NETS[kind]
    n_in, n_out = net.num_inputs, net.num_outputs
    s, z = net.input_scale, net.input_zero_point
    lo, hi = [], []
    for _ in range(n_in):
        a = draw(st.integers(net.input_lo - 2, net.input_hi + 2))
        b = draw(st.integers(a, net.input_hi + 3))
        jitter = draw(st.sampled_from([Fraction(0), Fraction(1, 3), Fraction(-1, 7), Fraction(1, 2)]))
        lo.append(s * (a - z + jitter))
        hi.append(s * (b - z + draw(st.sampled_from([Fraction(0), Fraction(-1, 3), Fraction(2, 5)]))))
    unsafe = []
    for _ in range(draw(st.integers(1, 3))):
        conj = []
        for _ in range(draw(st.integers(1, 2))):
            js = draw(st.lists(st.integers(0, n_out - 1), min_size=1, max_size=3, unique=True))
            coeffs = {j: draw(_SMALL.filter(lambda v: v != 0)) for j in js}
            conj.append((coeffs, draw(_SMALL), draw(st.sampled_from(_OPS))))
        unsafe.append(conj)
    decls = [f"(declare-const X_{i} Real)" for i in range(n_in)] + [f"(declare-const Y_{j} Real)" for j in
                                                                    range(n_out)]
    decls = draw(st.permutations(decls))
    bounds = []
    for i in range(n_in):
        lt, ht = draw(number_text(lo[i])), draw(number_text(hi[i]))
        bounds.append(draw(st.sampled_from([f"(>= X_{i} {lt})", f"(<= {lt} X_{i})"])))
        bounds.append(draw(st.sampled_from([f"(<= X_{i} {ht})", f"(>= {ht} X_{i})"])))
    rows = []
    for conj in unsafe:
        atoms = []
        for coeffs, k, op in conj:
            lhs = draw(_linear_text(coeffs, k))
            atoms.append(f"({op} {lhs} 0)" if draw(st.booleans()) else f"({_flip(op)} 0 {lhs})")
        rows.append(atoms)
    layout = draw(st.sampled_from(["top", "vnncomp"]))
    lines = ["; generated by tests/fuzzing.py", *decls]
    if layout == "top":
        lines += [f"(assert {b})" for b in bounds]
        lines.append("(assert (or " + " ".join(f"(and {' '.join(a)})" for a in rows) + "))")
    else:
        lines.append("(assert (or " + " ".join(f"(and {' '.join(bounds)} {' '.join(a)})" for a in rows) + "))")
    return VnnCase("\n".join(lines) + "\n", kind, lo, hi, unsafe)


def _flip(op: str) -> str:
    return {"<=": ">=", ">=": "<=", "<": ">", ">": "<", "=": "="}[op]


def check_vnnlib_meaning(case: VnnCase, props: list[Property]) -> str | None:
    """``None`` when the parsed properties mean exactly what the case was generated to mean, else the difference."""
    net = VNNLIB_NETS[case.net_kind]
    assert case.lo is not None and case.hi is not None and case.unsafe is not None
    glo, ghi, _ = box_to_grid(net, case.lo, case.hi)
    if len(props) != 1:
        return f"{len(props)} properties for one box"
    p = props[0]
    if not (np.array_equal(p.lo, glo) and np.array_equal(p.hi, ghi)):
        return f"box [{p.lo.tolist()}, {p.hi.tolist()}], expected [{glo.tolist()}, {ghi.tolist()}]"
    got = p.is_violated(OUTPUT_POINTS)
    want = unsafe_on_outputs(net, case.unsafe)
    bad = np.flatnonzero(got != want)
    if bad.size:
        y = OUTPUT_POINTS[bad[0]].tolist()
        return f"unsafe region differs at y={y}: expected {bool(want[bad[0]])}, parsed {bool(got[bad[0]])}"
    return None


def _atom_on_outputs(net: QNetwork, coeffs: dict[int, Fraction], k: Fraction, op: str) -> np.ndarray:
    """``sum a_j Y_j + k op 0`` on every row of :data:`OUTPUT_POINTS`, exactly: with ``Y_j = s (y_j - z)`` the
    value times the common denominator ``D > 0`` is the integer ``sum (D a_j s) y_j + D (k - s z sum a_j)``."""
    s, z = net.output_scale, net.output_zero_point
    c = {j: a * s for j, a in coeffs.items()}
    c0 = k - s * z * sum(coeffs.values(), Fraction(0))
    d = math.lcm(c0.denominator, *(f.denominator for f in c.values()))
    v = np.full(len(OUTPUT_POINTS), int(c0 * d), dtype=np.int64)
    for j, f in c.items():
        v += int(f * d) * OUTPUT_POINTS[:, j]
    return {"<=": v <= 0, ">=": v >= 0, "<": v < 0, ">": v > 0, "=": v == 0}[op]


def unsafe_on_outputs(net: QNetwork, unsafe: list) -> np.ndarray:
    """The generated unsafe region (OR of AND of atoms in real outputs) on every row of :data:`OUTPUT_POINTS`."""
    out = np.zeros(len(OUTPUT_POINTS), dtype=bool)
    for conj in unsafe:
        here = np.ones(len(OUTPUT_POINTS), dtype=bool)
        for coeffs, k, op in conj:
            here &= _atom_on_outputs(net, coeffs, k, op)
        out |= here
    return out


def _expected_refusal(case: VnnCase, msg: str) -> bool:
    """Whether a generated file is rightly refused: its box holds no grid point, or no output of the network's
    range is unsafe (the assertions are unsatisfiable)."""
    net = VNNLIB_NETS[case.net_kind]
    assert case.lo is not None and case.hi is not None and case.unsafe is not None
    glo, ghi, _ = box_to_grid(net, case.lo, case.hi)
    if "no point of the network's integer input grid" in msg:
        return bool(np.any(glo > ghi) or any(a > b for a, b in zip(case.lo, case.hi, strict=True)))
    if "unsatisfiable" in msg:
        return not unsafe_on_outputs(net, case.unsafe).any()
    return False


def check_property_object(p: Property, net: QNetwork) -> str | None:
    """Invariants of any parsed property: fits the network, every row evaluates exactly in int64."""
    try:
        p.check_network(net)
    except PropertyError as e:
        return f"parsed property does not fit the network: {e}"
    lo, hi = net.output_range
    m = max(abs(lo), abs(hi))
    for c in p.unsafe:
        for row, b in zip(c.A.tolist(), c.b.tolist(), strict=True):
            if sum(abs(a) for a in row) * m + abs(b) >= 2**63:
                return f"row {row} <= {b} can overflow int64 on outputs in [{lo}, {hi}]"
    return None


# ---------------------------------------------------------------------------------------------- mutations
HUGE_NUMBERS = ["1e260", "-1e260", "1e-260", "1e400", "-1e400", "1e401", "1e-401", "1e99999", "9" * 30,
                "-" + "9" * 25, "0." + "0" * 300 + "1", "1" * 5000, "0x1F", "#x1F", "#b101", "1.2.3", "1e", ".",
                "-", "+", "+-1", "--1", "1/3", "1_000", "NaN", "nan", "inf", "-Infinity", "1e+", ".e1", "1.e2",
                "\u0663", "\u0661.\u0665", "１", "1e٣", "+.5e-3", "00000", "-0", "1E2", "1e0400"]
UNKNOWN_OPS = ["max", "ite", "=>", "xor", "distinct", "abs", "exp", "*", "/", "+", "-", "and", "or", "not",
               "assert", "declare-const", "let", "forall", "_", "!", "|x|"]
ODD_NAMES = ["X_99", "Y_17", "Z_0", "X_01", "X_-1", "x_0", "X_" + "1" * 5000, "X_\u0663", "X_0_0", "X", "Y_",
             "|X_0|", "X_0.5", "Y_3", "X_2", "X_1e3", "Y_\u00b2"]


@st.composite
def mutated_vnnlib(draw: st.DrawFn) -> VnnCase:
    """A valid generated file (or one written by qverify) with one to three mutations (its meaning is then unknown)."""
    base = draw(vnnlib_cases()) if draw(st.integers(0, 3)) else draw(written_vnnlib())
    text = base.text
    names = []
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(sorted(_MUTATORS)))
        text = _MUTATORS[how](draw, text)
        names.append(how)
    return VnnCase(text, base.net_kind, mutation="+".join(names))


def _spans(text: str, pattern: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(pattern, text)]


def _replace_one(draw: st.DrawFn, text: str, pattern: str, options: list[str]) -> str:
    spans = _spans(text, pattern)
    if not spans:
        return text
    a, b = draw(st.sampled_from(spans))
    return text[:a] + draw(st.sampled_from(options)) + text[b:]


def _m_number(draw, text):
    return _replace_one(draw, text, r"(?<![\w_.])[+-]?\d[\w.+-]*|(?<=\s)\.\d+", HUGE_NUMBERS)


def _m_operator(draw, text):
    return _replace_one(draw, text, r"(?<=\()[^\s()]+", UNKNOWN_OPS + ["<=", ">=", "<", ">", "="])


def _m_name(draw, text):
    return _replace_one(draw, text, r"\b[XY]_\d+\b", ODD_NAMES)


def _m_paren(draw, text):
    spans = _spans(text, r"[()]")
    if not spans:
        return text
    a, _ = draw(st.sampled_from(spans))
    if draw(st.booleans()):
        return text[:a] + text[a + 1:]
    return text[:a] + draw(st.sampled_from("()")) + text[a:]


def _m_line(draw, text):
    lines = text.split("\n")
    i = draw(st.integers(0, len(lines) - 1))
    op = draw(st.sampled_from(["delete", "duplicate", "swap"]))
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(i, lines[i])
    else:
        j = draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def _m_invert(draw, text):
    """Swap <= and >= in one bound (inverted or one-sided bounds)."""
    spans = _spans(text, r"\((<=|>=) X_")
    if not spans:
        return text
    a, _ = draw(st.sampled_from(spans))
    op = text[a + 1:a + 3]
    return text[:a + 1] + ("<=" if op == ">=" else ">=") + text[a + 3:]


def _m_nest(draw, text):
    """Wrap one formula or term in many levels of nesting."""
    spans = _spans(text, r"\((?:<=|>=|<|>|=) ")
    if not spans:
        return text
    a, _ = draw(st.sampled_from(spans))
    depth = draw(st.sampled_from([10, 100, 500, 2000, 20000]))
    close = _matching(text, a)
    if close is None:
        return text
    wrap = draw(st.sampled_from(["and", "or", "not not", "+"]))
    if wrap == "not not":
        depth -= depth % 2
        return text[:a] + "(not " * depth + text[a:close + 1] + ")" * depth + text[close + 1:]
    if wrap == "+":  # a deep term: (+ (+ ... Y_0))
        return text[:a] + f"(<= {'(+ ' * depth}Y_0{')' * depth} 1)" + text[close + 1:]
    return text[:a] + f"({wrap} " * depth + text[a:close + 1] + ")" * depth + text[close + 1:]


def _matching(text: str, a: int) -> int | None:
    depth = 0
    for i in range(a, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return None


def _m_blowup(draw, text):
    """An ``and`` of many two-way ``or``s: 2^n disjuncts (the DNF limit must stop it)."""
    n = draw(st.sampled_from([5, 12, 14, 20, 40]))
    ors = " ".join(f"(or (<= Y_0 {i}) (>= Y_1 {i}))" for i in range(n))
    copies = draw(st.sampled_from([1, 1, 3, 30]))  # repeated big subformulas: the total work limit
    return text + f"(assert (or {' '.join([f'(and {ors})'] * copies)}))\n"


def _m_unicode(draw, text):
    i = draw(st.integers(0, len(text)))
    ch = draw(st.sampled_from(["\u00e9", "\u0663", "\u00a0", "\u2028", "\ufeff", "\x00", "\u200b", "\U0001F600",
                               "\r", "\t", "\x0b", ";", "|", '"', "\\"]))
    return text[:i] + ch + text[i:]


def _m_long(draw, text):
    """A very long line: a sum of many terms, or a very long comment."""
    n = draw(st.sampled_from([1000, 20000]))
    if draw(st.booleans()):
        return text + f"(assert (<= (+ {' '.join(['Y_0'] * n)}) 1))\n"
    return text + ";" + "x" * (n * 10) + "\n"


def _m_empty(draw, text):
    """Empty boxes and empty formulas."""
    return text + draw(st.sampled_from(["(assert (<= X_0 -1e9))\n", "(assert (>= X_0 1e9))\n", "(assert)\n",
                                        "(assert ())\n", "()\n", "(assert (and))\n", "(assert (or))\n",
                                        "(assert false)\n", "(assert (<= X_0 X_1))\n", "(assert (= Y_0))\n",
                                        "(assert (<= (* Y_0 Y_1) 0))\n", "(assert (<= (/ 1 0) Y_0))\n",
                                        "(assert (< X_0 1))\n", "(assert (<= (+ X_0 Y_0) 1))\n",
                                        "(declare-const X_0 Int)\n", "(check-sat)\n", "(push 1)\n"]))


def _m_bytes(draw, text):
    """Byte-level: delete, duplicate or overwrite a short run of characters."""
    if not text:
        return text
    a = draw(st.integers(0, len(text) - 1))
    b = min(len(text), a + draw(st.integers(1, 8)))
    op = draw(st.sampled_from(["delete", "duplicate", "overwrite"]))
    if op == "delete":
        return text[:a] + text[b:]
    if op == "duplicate":
        return text[:b] + text[a:b] + text[b:]
    junk = draw(st.text(alphabet=st.sampled_from("()XY_0123456789.-+e; \n<=>/*andort"), min_size=1, max_size=8))
    return text[:a] + junk + text[b:]


_MUTATORS: dict[str, Callable] = {
    "number": _m_number, "operator": _m_operator, "name": _m_name, "paren": _m_paren, "line": _m_line,
    "invert": _m_invert, "nest": _m_nest, "blowup": _m_blowup, "unicode": _m_unicode, "long": _m_long,
    "empty": _m_empty, "bytes": _m_bytes,
}


@st.composite
def written_vnnlib(draw: st.DrawFn) -> VnnCase:
    """A file written by :func:`qverify.io.vnnlib.write_vnnlib` (a robustness property) for one of the networks."""
    from qverify.io.vnnlib import write_vnnlib
    from qverify.property import robustness_property

    kind = draw(st.integers(0, len(VNNLIB_NETS) - 1))
    net = VNNLIB_NETS[kind]
    x = np.array([draw(st.integers(net.input_lo, net.input_hi)) for _ in range(net.num_inputs)])
    prop = robustness_property(net, x, draw(st.integers(0, net.num_outputs - 1)), radius=draw(st.integers(0, 3)),
                               name="written")
    return VnnCase(write_vnnlib(prop, net), kind)


def run_vnnlib(case: VnnCase, tmp: Path | None = None) -> Outcome:
    """Parse ``case`` with both entry points (from a file when ``tmp`` is a directory) and classify what happened."""
    from qverify.io.vnnlib import parse_vnnlib, parse_vnnlib_cases

    net = VNNLIB_NETS[case.net_kind]
    source: str | Path = case.text
    name = "<vnnlib>"
    if tmp is not None:
        source = tmp / "fuzz.vnnlib"
        source.write_bytes(case.text.encode("utf-8", "surrogatepass"))
        name = str(source)
    try:
        props = parse_vnnlib_cases(source, net)
    except PropertyError as e:
        m = _LOCATED.match(str(e))
        if m is None or m.group("src") != name:
            return Outcome(CRASH, f"PropertyError without its place: {str(e)[:300]}")
        if case.unsafe is not None and not _expected_refusal(case, str(e)):
            return Outcome(CRASH, f"a valid file was refused: {str(e)[:300]}")
        return Outcome(DOCUMENTED, str(e)[:200])
    except RecursionError as e:  # noqa: B014 - named for the report
        return _crash(e)
    except Exception as e:
        return _crash(e)
    for p in props:
        bad = check_property_object(p, net)
        if bad:
            return Outcome(CRASH, f"wrong object: {bad}")
    if case.unsafe is not None:
        bad = check_vnnlib_meaning(case, props)
        if bad:
            return Outcome(CRASH, f"wrong meaning: {bad}")
    if len(props) == 1:
        try:
            parse_vnnlib(source, net)
        except Exception as e:
            return _crash(e, "parse_vnnlib after parse_vnnlib_cases gave one property: ")
    return Outcome(VALID)


# ============================================================================================== .qnn
def qnn_networks() -> list[QNetwork]:
    """The networks whose ``.qnn`` files are mutated (dense and conv, fixed point and affine)."""
    rng = np.random.default_rng(7)
    return [random_dense_network(rng, n_in=3, hidden=(4,), rounding=Rounding.HALF_EVEN, affine=True,
                                 per_channel=True),
            random_dense_network(rng, n_in=2, hidden=(3,)),
            random_conv_network(rng, padding=1, pad_value=1, with_clamp=True, affine=True)]


def qnn_bytes(net: QNetwork) -> bytes:
    from qverify.io.native import save_native

    buf = io.BytesIO()
    save_native(net, buf)  # type: ignore[arg-type]  # zipfile takes a file object
    return buf.getvalue()


QNN_BASES: list[bytes] = []


def _qnn_bases() -> list[bytes]:
    if not QNN_BASES:
        QNN_BASES.extend(qnn_bytes(n) for n in qnn_networks())
    return QNN_BASES


@dataclass
class QnnCase:
    data: bytes
    mutation: str
    must_fail: bool = False  # a type-breaking mutation: the loader must refuse it


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist()}


def _zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        for n, b in files.items():
            z.writestr(n, b)
    return buf.getvalue()


def _json_paths(v: object, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _json_paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _json_paths(x, (*path, i))
    return out


def _get(v: object, path: tuple) -> object:
    for p in path:
        v = v[p]  # type: ignore[index]
    return v


#: fields whose JSON value must be an int (bool excluded), and those that must be strings
_INT_FIELDS = {"format_version", "input_lo", "input_hi", "input_zero_point", "output_zero_point", "lo", "hi",
               "pad_value"}
_STR_FIELDS = {"format", "name", "kind", "rounding", "tie_rule", "weight", "bias", "zero_point"}
#: exact rationals: a string ("3/1024") or a JSON integer
_RATIONAL_FIELDS = {"input_scale", "output_scale"}
_JSON_VALUES = [None, True, False, 0, 1, -1, 0.5, 2.0, 1e308, float("nan"), float("inf"), -float("inf"), 10**30,
                -(10**30), 2**63, "", "x", "7", "1/0", "0/1", "-1/3", "1e-99999999", "nan", "1e400", "first",
                "half_even", "Dense", [], [1], [1.5, 2], [[1]], {}, {"a": 1}, [[[[[[[[[[[]]]]]]]]]]]]


@st.composite
def mutated_qnn(draw: st.DrawFn) -> QnnCase:
    """A ``.qnn`` archive of one of :func:`qnn_networks` with one mutation of its bytes, zip members, manifest
    fields or arrays."""
    base = draw(st.sampled_from(_qnn_bases()))
    level = draw(st.sampled_from(["bytes", "zip", "manifest", "manifest", "manifest", "array", "array"]))
    if level == "bytes":
        op = draw(st.sampled_from(["truncate", "flip", "insert"]))
        i = draw(st.integers(0, len(base) - 1))
        if op == "truncate":
            return QnnCase(base[:i], "bytes:truncate")
        if op == "flip":
            return QnnCase(base[:i] + bytes([base[i] ^ draw(st.integers(1, 255))]) + base[i + 1:], "bytes:flip")
        return QnnCase(base[:i] + draw(st.binary(min_size=1, max_size=16)) + base[i:], "bytes:insert")
    files = _members(base)
    if level == "zip":
        op = draw(st.sampled_from(["drop", "rename", "add", "stored", "empty", "garbage-manifest"]))
        names = sorted(files)
        if op == "drop":
            del files[draw(st.sampled_from(names))]
        elif op == "rename":
            n = draw(st.sampled_from(names))
            files[n + ".bak"] = files.pop(n)
        elif op == "add":
            files["../evil.npy"] = b"x"
        elif op == "empty":
            files = {}
        elif op == "garbage-manifest":
            files["manifest.json"] = draw(st.sampled_from([b"", b"\xff\xfe\x00", b"[" * 100000, b"null", b"[]",
                                                           b"1", b'"x"', b"{", b"\x00" * 10, "é".encode("latin-1")]))
        return QnnCase(_zip(files, zipfile.ZIP_STORED if op == "stored" else zipfile.ZIP_DEFLATED), f"zip:{op}")
    if level == "manifest":
        m = json.loads(files["manifest.json"])
        paths = [p for p in _json_paths(m) if p]
        path = draw(st.sampled_from(paths))
        parent = _get(m, path[:-1])
        key = path[-1]
        op = draw(st.sampled_from(["delete", "replace", "replace"]))
        must_fail = False
        if op == "delete":
            if isinstance(parent, dict):
                del parent[key]
            else:
                del parent[key]  # type: ignore[arg-type]
        else:
            new = draw(st.sampled_from(_JSON_VALUES))
            old = parent[key]  # type: ignore[index]
            parent[key] = new  # type: ignore[index]
            name = key if isinstance(key, str) else None
            if name in _INT_FIELDS and type(new) is not int:
                must_fail = True
            if name in _STR_FIELDS and not isinstance(new, str):
                must_fail = True
            if name in _RATIONAL_FIELDS and not (isinstance(new, str) or type(new) is int):
                must_fail = True
            if isinstance(key, int) and len(path) >= 2 and path[-2] == "multiplier" and not (
                    isinstance(new, str) or type(new) is int):
                must_fail = True
            if name in ("stride", "padding", "dilation", "input_shape") and not (
                    isinstance(new, list) and all(type(v) is int for v in new)):
                must_fail = True
            if isinstance(key, int) and len(path) >= 2 and path[-2] in ("stride", "padding", "dilation",
                                                                        "input_shape") and type(new) is not int:
                must_fail = True
            if name == "metadata" and not (isinstance(new, dict) and all(isinstance(v, str) for v in new.values())):
                must_fail = True
            if len(path) >= 2 and path[-2] == "metadata" and not isinstance(new, str):
                must_fail = True
            if type(old) is type(new) and old == new:
                must_fail = False
        text = json.dumps(m, allow_nan=True)
        files["manifest.json"] = text.encode()
        return QnnCase(_zip(files), f"manifest:{op}:{'.'.join(map(str, path))}", must_fail)
    # array level
    names = sorted(n for n in files if n.endswith(".npy"))
    n = draw(st.sampled_from(names))
    arr = np.load(io.BytesIO(files[n]))
    op = draw(st.sampled_from(["float-frac", "nan", "inf", "huge-uint64", "bool", "complex", "object", "str",
                               "ndim+", "ndim-", "shape", "empty", "int8", "float-int", "big-endian", "fortran",
                               "truncate", "garbage", "huge-int64", "structured", "datetime"]))
    must_fail = op in ("float-frac", "nan", "inf", "huge-uint64", "bool", "complex", "object", "str",
                       "structured", "datetime", "truncate", "garbage")
    buf = io.BytesIO()
    if op == "truncate":
        files[n] = files[n][:draw(st.integers(0, len(files[n]) - 1))]
    elif op == "garbage":
        files[n] = draw(st.binary(max_size=64))
    else:
        if op == "float-frac":
            new = arr.astype(np.float64) + 0.5
        elif op == "nan":
            new = arr.astype(np.float64)
            new.flat[0] = np.nan
        elif op == "inf":
            new = arr.astype(np.float64)
            new.flat[0] = np.inf
        elif op == "huge-uint64":
            new = np.abs(arr).astype(np.uint64)
            new.flat[0] = np.uint64(2**63 + 5)
        elif op == "huge-int64":
            new = arr.copy()
            new.flat[0] = 2**62 + 1
        elif op == "bool":
            new = arr != 0
        elif op == "complex":
            new = arr.astype(np.complex128)
        elif op == "object":
            new = arr.astype(object)
        elif op == "str":
            new = arr.astype(str)
        elif op == "ndim+":
            new = arr[None]
        elif op == "ndim-":
            new = arr.ravel()[:1].reshape(())
        elif op == "shape":
            new = np.concatenate([arr.ravel(), arr.ravel()[:1]])
        elif op == "empty":
            new = arr.ravel()[:0]
        elif op == "int8":
            new = arr.astype(np.int8)
        elif op == "float-int":
            new = arr.astype(np.float64)
        elif op == "big-endian":
            new = arr.astype(">i8")
        elif op == "fortran":
            new = np.asfortranarray(arr)
        elif op == "structured":
            new = np.zeros(arr.shape, dtype=[("a", "<i8")])
        else:
            new = np.zeros(arr.shape, dtype="datetime64[s]")
        np.save(buf, new, allow_pickle=(op == "object"))
        files[n] = buf.getvalue()
    if op in ("float-int", "big-endian", "fortran", "int8") and op == "int8" and np.any(arr != arr.astype(np.int8)):
        must_fail = False
    return QnnCase(_zip(files), f"array:{op}:{n}", must_fail)


def run_qnn(case: QnnCase, tmp: Path) -> Outcome:
    """Load the mutated archive from a file and classify what happened."""
    from qverify.io.native import load_native

    path = tmp / "fuzz.qnn"
    path.write_bytes(case.data)
    net = _load_model(load_native, path)
    if isinstance(net, Outcome):
        return net
    if case.must_fail:
        return Outcome(CRASH, f"wrong object: {case.mutation} was read as a valid network")
    return _check_runs(net)


def _load_model(load, path: Path) -> QNetwork | Outcome:
    """``load(path)``, or the outcome of its failure: a ModelError that names the file is documented, one that does
    not, and any other exception, is a crash."""
    try:
        return load(path)
    except ModelError as e:
        if not str(e).startswith(str(path)):
            return Outcome(CRASH, f"ModelError without the file: {str(e)[:300]}")
        return Outcome(DOCUMENTED, str(e)[:200])
    except Exception as e:
        return _crash(e)


def _check_runs(net: QNetwork) -> Outcome:
    from qverify.execute import forward

    try:
        rng = np.random.default_rng(0)
        x = rng.integers(net.input_lo, net.input_hi, size=(3, net.num_inputs), endpoint=True)
        y = forward(net, x)
        if y.shape != (3, net.num_outputs):
            return Outcome(CRASH, f"wrong object: outputs of shape {y.shape}")
    except Exception as e:
        return _crash(e, "loaded network does not run: ")
    return Outcome(VALID)


# ============================================================================================== ONNX
def onnx_base_models() -> dict[str, bytes]:
    """Small valid QDQ and QOperator models built with ``onnx.helper`` (serialized)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    f32 = np.float32

    def model(nodes, inits, in_shape, out_shape, in_type=TensorProto.FLOAT, ms=False):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", in_type, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        ops = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
        m = helper.make_model(g, opset_imports=ops, ir_version=8)
        return m.SerializeToString()

    out = {}
    # QDQ MLP: Q -> DQ -> MatMul(DQ W per-channel) -> Add(DQ int32 bias) -> Relu -> Q -> DQ -> MatMul -> Q -> DQ
    w1 = rng.integers(-60, 61, size=(6, 5)).astype(np.int8)
    w2 = rng.integers(-60, 61, size=(5, 3)).astype(np.int8)
    sx, s1, sh, s2, sy = f32(0.02), rng.uniform(0.005, 0.02, 5).astype(f32), f32(0.05), f32(0.01), f32(0.1)
    inits = {"sx": sx, "zx": np.uint8(3), "w1": w1, "s1": s1, "z1": np.zeros(5, np.int8),
             "b1": rng.integers(-200, 200, 5).astype(np.int32), "sb1": (sx * s1).astype(f32),
             "zb1": np.zeros(5, np.int32), "sh": sh, "zh": np.uint8(0), "w2": w2, "s2": s2, "z2": np.int8(0),
             "sy": sy, "zy": np.int8(-2)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_in"),
             helper.make_node("DequantizeLinear", ["w1", "s1", "z1"], ["w1d"], name="dq_w1", axis=1),
             helper.make_node("MatMul", ["xd", "w1d"], ["m1"], name="mm1"),
             helper.make_node("DequantizeLinear", ["b1", "sb1", "zb1"], ["b1d"], name="dq_b1", axis=0),
             helper.make_node("Add", ["m1", "b1d"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("QuantizeLinear", ["r1", "sh", "zh"], ["hq"], name="q_h"),
             helper.make_node("DequantizeLinear", ["hq", "sh", "zh"], ["hd"], name="dq_h"),
             helper.make_node("DequantizeLinear", ["w2", "s2", "z2"], ["w2d"], name="dq_w2"),
             helper.make_node("MatMul", ["hd", "w2d"], ["m2"], name="mm2"),
             helper.make_node("QuantizeLinear", ["m2", "sy", "zy"], ["yq"], name="q_y"),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dq_y")]
    out["qdq-mlp"] = model(nodes, inits, (1, 6), (1, 3))
    # QOperator CNN: Q -> QLinearConv -> Flatten -> QLinearMatMul -> QLinearAdd -> DQ
    wc = rng.integers(-50, 51, size=(2, 1, 3, 3)).astype(np.int8)
    wm = rng.integers(-50, 51, size=(8, 3)).astype(np.int8)
    inits = {"sx": f32(1 / 255), "zx": np.uint8(0), "wc": wc, "swc": rng.uniform(0.01, 0.03, 2).astype(f32),
             "zwc": np.zeros(2, np.int8), "sc": f32(0.04), "zc": np.uint8(5),
             "bc": rng.integers(-100, 100, 2).astype(np.int32), "shape": np.array([1, 8], np.int64),
             "wm": wm, "swm": f32(0.02), "zwm": np.int8(0), "sm": f32(0.08), "zm": np.uint8(128),
             "cst": rng.integers(0, 255, 3).astype(np.uint8), "scst": f32(0.03), "zcst": np.uint8(100),
             "sa": f32(0.1), "za": np.uint8(120)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_in"),
             helper.make_node("QLinearConv", ["xq", "sx", "zx", "wc", "swc", "zwc", "sc", "zc", "bc"], ["c"],
                              name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["cf"], name="flat"),
             helper.make_node("QLinearMatMul", ["cf", "sc", "zc", "wm", "swm", "zwm", "sm", "zm"], ["mm"],
                              name="qmm"),
             helper.make_node("QLinearAdd", ["mm", "sm", "zm", "cst", "scst", "zcst", "sa", "za"], ["ad"],
                              name="qadd", domain="com.microsoft"),
             helper.make_node("DequantizeLinear", ["ad", "sa", "za"], ["y"], name="dq_y")]
    out["qop-cnn"] = model(nodes, inits, (1, 1, 4, 4), (1, 3), ms=True)
    # integer input, QGemm with float output
    wg = rng.integers(-20, 21, size=(3, 4)).astype(np.int8)
    inits = {"sx": f32(0.5), "zx": np.uint8(10), "wg": wg, "swg": f32(0.25), "zwg": np.int8(0),
             "cg": rng.integers(-50, 50, 3).astype(np.int32)}
    nodes = [helper.make_node("QGemm", ["x", "sx", "zx", "wg", "swg", "zwg", "cg"], ["y"], name="qgemm",
                              domain="com.microsoft", transB=1)]
    out["qgemm-u8in"] = model(nodes, inits, (1, 4), (1, 3), in_type=TensorProto.UINT8, ms=True)
    return out


ONNX_BASES: dict[str, bytes] = {}


def _onnx_bases() -> dict[str, bytes]:
    if not ONNX_BASES:
        ONNX_BASES.update(onnx_base_models())
    return ONNX_BASES


@dataclass
class OnnxCase:
    data: bytes
    mutation: str


_BAD_FLOATS = [0.0, -0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-45, 3e38, 1e-30]


@st.composite
def mutated_onnx(draw: st.DrawFn) -> OnnxCase:
    """One of :func:`onnx_base_models` with one or two structural mutations (or truncated/flipped bytes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    key = draw(st.sampled_from(sorted(_onnx_bases())))
    data = _onnx_bases()[key]
    if draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            return OnnxCase(data[:i], f"{key}:truncate")
        return OnnxCase(data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:], f"{key}:flip")
    m = onnx.ModelProto()
    m.ParseFromString(data)
    g = m.graph
    names = []
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["drop-init", "retype-init", "reshape-init", "bad-scale", "zero-point",
                                   "attr", "cycle", "unknown-op", "drop-input", "empty-input", "drop-node",
                                   "swap-nodes", "input-type", "input-dim", "rename-output", "extra-output",
                                   "init-value", "dup-node", "raw-truncate"]))
        names.append(op)
        inits = list(g.initializer)
        nodes = list(g.node)
        if op == "drop-init" and inits:
            g.initializer.remove(draw(st.sampled_from(inits)))
        elif op == "retype-init" and inits:
            t = draw(st.sampled_from(inits))
            a = _to_array(t)
            dt = draw(st.sampled_from([np.float32, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64,
                                       np.uint16, np.float16, np.bool_]))
            t.CopyFrom(numpy_helper.from_array(a.astype(dt), t.name))
        elif op == "reshape-init" and inits:
            t = draw(st.sampled_from(inits))
            a = _to_array(t)
            shape = draw(st.sampled_from([(), (1,), (a.size,), (1, a.size), (a.size, 1), (2, 2), (0,)]))
            b = np.resize(a, shape) if int(np.prod(shape)) else a.ravel()[:0].reshape(shape)
            t.CopyFrom(numpy_helper.from_array(b, t.name))
        elif op == "bad-scale":
            scales = [t for t in inits if t.data_type == TensorProto.FLOAT]
            if scales:
                t = draw(st.sampled_from(scales))
                a = _to_array(t).copy()
                if a.size:
                    a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(_BAD_FLOATS))
                t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
        elif op == "zero-point":
            zps = [t for t in inits if t.data_type in (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)]
            if zps:
                t = draw(st.sampled_from(zps))
                a = _to_array(t).astype(np.int64)
                v = draw(st.sampled_from([-1, 256, 300, -129, 128, 2**31, 70000]))
                a = a.copy()
                if a.size:
                    a.flat[0] = v
                dt = draw(st.sampled_from([np.int32, np.int64, np.int16, np.uint16]))
                t.CopyFrom(numpy_helper.from_array(a.astype(dt), t.name))
        elif op == "attr" and nodes:
            n = draw(st.sampled_from(nodes))
            name = draw(st.sampled_from(["axis", "strides", "pads", "group", "transB", "transA", "auto_pad",
                                         "dilations", "alpha", "beta", "allowzero", "block_size", "to",
                                         "kernel_shape", "output_dtype", "saturate"]))
            val = draw(st.sampled_from([0, 1, 2, -1, 5, -7, 2**40, 1.5, "SAME_UPPER", "FOO", [0, 0], [1, 1],
                                        [-1, 2], [3], [1, 1, 1, 1], [9, 9, 9, 9], [0, 0, 0, 0, 0], 1e30]))
            kept = [a for a in n.attribute if a.name != name]
            del n.attribute[:]
            n.attribute.extend(kept)
            n.attribute.append(helper.make_attribute(name, val))
        elif op == "cycle" and len(nodes) > 1:
            i = draw(st.integers(0, len(nodes) - 2))
            j = draw(st.integers(i + 1, len(nodes) - 1))
            if nodes[i].input and nodes[j].output:
                nodes[i].input[0] = nodes[j].output[0]
        elif op == "unknown-op" and nodes:
            n = draw(st.sampled_from(nodes))
            n.op_type = draw(st.sampled_from(["Sigmoid", "MaxPool", "FooBar", "", "Conv", "MatMul", "Gemm",
                                              "QuantizeLinear", "DequantizeLinear", "Add", "Mul", "Relu",
                                              "Reshape", "Flatten", "Cast", "Clip", "Shape", "Identity",
                                              "QLinearMatMul", "QLinearConv", "MatMulInteger", "QGemm",
                                              "QLinearAdd", "Constant", "Transpose"]))
            if draw(st.booleans()):
                n.domain = draw(st.sampled_from(["", "com.microsoft", "ai.onnx", "com.example"]))
        elif op == "drop-input" and nodes:
            n = draw(st.sampled_from(nodes))
            if n.input:
                k = draw(st.integers(0, len(n.input) - 1))
                del n.input[k:]
        elif op == "empty-input" and nodes:
            n = draw(st.sampled_from(nodes))
            if n.input:
                n.input[draw(st.integers(0, len(n.input) - 1))] = draw(st.sampled_from(["", "nope", "x", "y"]))
        elif op == "drop-node" and nodes:
            g.node.remove(draw(st.sampled_from(nodes)))
        elif op == "swap-nodes" and len(nodes) > 1:
            i, j = draw(st.integers(0, len(nodes) - 1)), draw(st.integers(0, len(nodes) - 1))
            a, b = copy.deepcopy(nodes[i]), copy.deepcopy(nodes[j])
            g.node[i].CopyFrom(b)
            g.node[j].CopyFrom(a)
        elif op == "dup-node" and nodes:
            g.node.append(copy.deepcopy(draw(st.sampled_from(nodes))))
        elif op == "input-type":
            g.input[0].type.tensor_type.elem_type = draw(st.sampled_from([0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 16,
                                                                          21, 22, 99]))
        elif op == "input-dim":
            dims = g.input[0].type.tensor_type.shape.dim
            if dims:
                d = dims[draw(st.integers(0, len(dims) - 1))]
                if draw(st.booleans()):
                    d.dim_value = draw(st.sampled_from([0, 2, 3, 7, 2**40]))
                else:
                    d.dim_param = "N"
                if draw(st.booleans()):
                    del dims[-1]
        elif op == "rename-output":
            g.output[0].name = draw(st.sampled_from(["nope", "x", "xq", ""]))
        elif op == "extra-output":
            g.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
        elif op == "init-value" and inits:
            t = draw(st.sampled_from(inits))
            a = _to_array(t).copy()
            if a.size:
                if np.issubdtype(a.dtype, np.integer):
                    info = np.iinfo(a.dtype)
                    a.flat[0] = draw(st.sampled_from([info.min, info.max, 0]))
                else:
                    a.flat[0] = draw(st.sampled_from(_BAD_FLOATS))
                t.CopyFrom(numpy_helper.from_array(a, t.name))
        elif op == "raw-truncate" and inits:
            t = draw(st.sampled_from(inits))
            if t.raw_data:
                t.raw_data = t.raw_data[:draw(st.integers(0, len(t.raw_data) - 1))]
            else:
                t.dims.append(3)
    return OnnxCase(m.SerializeToString(), f"{key}:{'+'.join(names)}")


def _to_array(t: object) -> np.ndarray:
    """An initializer's array; an earlier mutation may have broken it: then a placeholder the next one can use."""
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(t)
    except Exception:
        return np.zeros(1, dtype=np.float32)


def run_onnx(case: OnnxCase, tmp: Path, compare: bool = False) -> Outcome:
    """Import the mutated model from a file and classify what happened. With ``compare``, a model that both qverify
    and onnxruntime accept is run on both (``detail`` says ``onnxruntime differs`` where the integer outputs part:
    informational, since onnxruntime requantizes in float32 and the mutations reach extreme scales)."""
    from qverify.io.onnx import load_onnx, onnx_integer_outputs

    _ONNX_COUNT[0] += 1
    path = tmp / f"fuzz{_ONNX_COUNT[0]}.onnx"
    path.write_bytes(case.data)
    try:
        net = _load_model(load_onnx, path)
        if isinstance(net, Outcome):
            return net
        out = _check_runs(net)
        if out.crashed or not compare:
            return out
        from qverify.execute import forward

        x = np.random.default_rng(1).integers(net.input_lo, net.input_hi, size=(8, net.num_inputs), endpoint=True)
        try:
            theirs = onnx_integer_outputs(net, x)
        except Exception:  # onnxruntime refuses the mutated model, or its outputs are not integers
            return out
        ours = forward(net, x)
        if not np.array_equal(theirs, ours):
            return Outcome(VALID, f"onnxruntime differs by up to {int(np.abs(theirs - ours).max())} output steps")
        return out
    finally:
        path.unlink(missing_ok=True)


_ONNX_COUNT = [0]


READERS: dict[str, tuple[Callable[[], st.SearchStrategy], Callable]] = {
    "vnnlib": (lambda: st.one_of(vnnlib_cases(), mutated_vnnlib()), run_vnnlib),
    "qnn": (mutated_qnn, run_qnn),
    "onnx": (mutated_onnx, run_onnx),
}
