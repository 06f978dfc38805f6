"""VNN-LIB 1.0: hand-written VNN-COMP style files, exact numbers, located errors, exact round trips, QVIP P1-6."""

from __future__ import annotations

import dataclasses
import itertools
import re
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import forward, predict
from qverify.io.vnnlib import (
    parse_ids,
    parse_vnnlib,
    parse_vnnlib_cases,
    write_robustness_properties,
    write_vnnlib,
)
from qverify.network import QNetwork
from qverify.property import Conjunction, Property, PropertyError, pixels_to_grid, robustness_property
from qverify.quant import Rounding, round_fraction
from tests.fixtures import MNIST1000, P1_6, random_dense_network, tiny_networks

# ------------------------------------------------------------------------------------------ helpers
OUT_GRID = np.array(list(itertools.product(range(-12, 13), repeat=3)), dtype=np.int64)  # 3 outputs


def net3(n_in: int = 3, s_in: Fraction = Fraction(1, 10), z_in: int = 0, s_out: Fraction = Fraction(1, 16),
         z_out: int = 0, rounding: Rounding | None = None, hi: int = 15, seed: int = 0) -> QNetwork:
    """A tiny dense network with ``n_in`` inputs on [0, hi], 3 outputs and the given real-unit conventions."""
    base = random_dense_network(np.random.default_rng(seed), n_in=n_in, n_out=3, input_hi=hi)
    return dataclasses.replace(base, input_scale=s_in, input_zero_point=z_in, output_scale=s_out,
                               output_zero_point=z_out, input_rounding=rounding)


def real_y(net: QNetwork, y: np.ndarray) -> list[list[Fraction]]:
    s, z = net.output_scale, net.output_zero_point
    return [[s * (int(v) - z) for v in row] for row in y]


def assert_semantics(prop: Property, net: QNetwork, oracle) -> None:
    """``prop.is_violated`` equals the real-valued ``oracle(Y)`` on every integer output of the test grid."""
    want = np.array([bool(oracle(Y)) for Y in real_y(net, OUT_GRID)])
    got = prop.is_violated(OUT_GRID)
    bad = np.flatnonzero(want != got)
    assert bad.size == 0, f"differs at y={OUT_GRID[bad[0]].tolist()}: oracle {want[bad[0]]}, parsed {got[bad[0]]}"


def same_semantics(p: Property, q: Property) -> None:
    assert np.array_equal(p.lo, q.lo) and np.array_equal(p.hi, q.hi)
    grid = OUT_GRID if p.num_outputs == 3 else None
    assert grid is not None
    assert np.array_equal(p.is_violated(grid), q.is_violated(grid))


def loc(text: str, needle: str, nth: int = 0) -> str:
    """``'line L, column C'`` of the ``nth`` occurrence of ``needle``."""
    i = -1
    for _ in range(nth + 1):
        i = text.index(needle, i + 1)
    line = text.count("\n", 0, i) + 1
    col = i - (text.rfind("\n", 0, i) + 1) + 1
    return f"line {line}, column {col}"


def decl(n_in: int, n_out: int = 3) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))


# ------------------------------------------------------------------------------------------ hand-written files
ACAS_STYLE = """\
; ACAS Xu style property, written by hand
; name: acas-like
; description: hand-written test property
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const X_2 Real)

(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)

; Input constraints:
(assert (<= X_0 0.3))   ; 0.3 / 0.1 = 3 exactly (a float division gives 2.9999999999999996)
(assert (>= X_0 -0.05))
(assert (>= +1.2E0 X_1))  ; bound on the right-hand side
(assert (>= X_1 .25))
(assert (<= X_2 7.e-1))
(assert (<= (* -2 X_2) (- 0.2)))  ; X_2 >= 0.1, negative coefficient

; Output constraints: unsafe if Y_0 is not minimal
(assert (or
    (and (<= Y_1 Y_0))
    (and (>= Y_0 (+ Y_2 0.0625)) (<= Y_0 0.5))
    (and (<= (+ Y_0 (* -1.0 Y_1)) 0.0) (>= Y_2 -1.25e-1))
))
"""


def test_acas_style_file():
    net = net3()  # real input x / 10 on the grid 0..15, real output y / 16
    p = parse_vnnlib(ACAS_STYLE, net)
    # X_0 in [-0.05, 0.3] -> x in [0, 3];  X_1 in [0.25, 1.2] -> [3, 12];  X_2 in [0.1, 0.7] -> [1, 7]
    assert p.lo.tolist() == [0, 3, 1] and p.hi.tolist() == [3, 12, 7]
    assert p.name == "acas-like" and p.metadata["vnnlib_description"] == "hand-written test property"
    assert "contains" in p.description and p.label is None
    assert_semantics(p, net, lambda Y: (Y[1] <= Y[0]) or (Y[0] >= Y[2] + Fraction(1, 16) and Y[0] <= Fraction(1, 2))
                     or (Y[0] - Y[1] <= 0 and Y[2] >= Fraction(-1, 8)))


def test_vnncomp_single_assert_with_input_bounds_in_every_disjunct():
    # the common VNN-COMP form: one (assert (or (and <X bounds> <Y atoms>) ...)) repeating the box
    box = "(>= X_0 0.1) (<= X_0 0.5) (>= X_1 0.0) (<= X_1 0.2)"
    text = decl(2) + f"""(assert (or
  (and {box} (>= Y_1 Y_0) (>= Y_1 Y_2))
  (and {box} (>= Y_2 (+ Y_0 0.0625)))
))
"""
    net = net3(n_in=2)
    p = parse_vnnlib(text, net)
    assert p.lo.tolist() == [1, 0] and p.hi.tolist() == [5, 2]
    assert len(p.unsafe) == 2
    assert_semantics(p, net, lambda Y: (Y[1] >= Y[0] and Y[1] >= Y[2]) or Y[2] >= Y[0] + Fraction(1, 16))


def test_same_grid_box_written_differently_is_one_box():
    # 0.45 and 0.49 both keep the grid points 0..4 (scale 1/10), so this is one box
    text = decl(1) + """(assert (or (and (>= X_0 0.0) (<= X_0 0.45) (>= Y_0 Y_1))
                                  (and (>= X_0 0.0) (<= X_0 0.49) (>= Y_0 Y_2))))"""
    p = parse_vnnlib(text, net3(n_in=1))
    assert p.hi.tolist() == [4] and len(p.unsafe) == 2


def test_top_level_input_bounds_and_conjoined_output_asserts():
    text = decl(2) + """
(assert (>= X_0 0.0)) (assert (<= X_0 1.5)) (assert (and (>= X_1 0.2) (<= X_1 0.2)))
(assert (or (>= Y_0 Y_1) (>= Y_0 Y_2)))
(assert (or (<= Y_0 0.25) (and (<= Y_1 -0.25) (not (> Y_2 0.0)))))
(assert (<= Y_1 0.5))
"""
    net = net3(n_in=2)
    p = parse_vnnlib(text, net)
    assert p.lo.tolist() == [0, 2] and p.hi.tolist() == [15, 2]
    assert len(p.unsafe) == 4  # (a or b) and (c or d) and e
    q = Fraction(1, 4)
    assert_semantics(p, net, lambda Y: (Y[0] >= Y[1] or Y[0] >= Y[2]) and (Y[0] <= q or (Y[1] <= -q and Y[2] <= 0))
                     and Y[1] <= Fraction(1, 2))


def test_expression_forms_and_exact_numbers():
    net = net3(n_in=1, s_out=Fraction(1, 3), z_out=2)  # non-dyadic output scale
    text = decl(1) + """(assert (and (>= X_0 0) (<= X_0 1)))
(assert (or
  (< (- Y_0 Y_1) (/ 1 3))                       ; strict, right on a step
  (> (* 2 Y_2) (* Y_0 3.5))
  (= Y_1 (- Y_2 (/ 2 3)))
  (<= -1 Y_0 Y_2)                               ; chain: -1 <= Y_0 and Y_0 <= Y_2
  (not (or (>= Y_2 1e-1) (<= Y_1 -2.5E-1)))
  (and (>= Y_0 Y_0) false)
))
"""
    p = parse_vnnlib(text, net)
    t = Fraction(1, 3)
    assert_semantics(p, net, lambda Y: Y[0] - Y[1] < t or 2 * Y[2] > Fraction(7, 2) * Y[0]
                     or Y[1] == Y[2] - 2 * t or (-1 <= Y[0] <= Y[2])
                     or not (Y[2] >= Fraction(1, 10) or Y[1] <= Fraction(-1, 4)))


def test_no_output_constraint_means_every_output_is_unsafe():
    p = parse_vnnlib(decl(1) + "(assert (<= X_0 0.2)) (assert (>= X_0 0.1)) (assert (or (>= Y_0 Y_0)))",
                     net3(n_in=1))
    assert p.is_violated(OUT_GRID).all()


def test_input_disjunction_is_located_and_split_into_cases():
    text = decl(1) + """(assert (or
  (and (>= X_0 0.0) (<= X_0 0.3) (>= Y_0 Y_1))
  (and (>= X_0 0.5) (<= X_0 0.9) (>= Y_0 Y_2))
))"""
    net = net3(n_in=1)
    with pytest.raises(PropertyError, match="different input boxes") as e:
        parse_vnnlib(text, net)
    assert loc(text, ">= X_0 0.5") in str(e.value)
    cases = parse_vnnlib_cases(text, net)
    assert [(c.lo.tolist(), c.hi.tolist()) for c in cases] == [([0], [3]), ([5], [9])]
    assert_semantics(cases[0], net, lambda Y: Y[0] >= Y[1])
    assert_semantics(cases[1], net, lambda Y: Y[0] >= Y[2])


def test_empty_input_disjunct_is_dropped():
    # (0.21, 0.29) holds no grid point of scale 1/10: that disjunct can never be satisfied
    text = decl(1) + """(assert (or
  (and (>= X_0 0.21) (<= X_0 0.29) (>= Y_0 Y_1))
  (and (>= X_0 0.0) (<= X_0 0.9) (>= Y_0 Y_2))))"""
    net = net3(n_in=1)
    p = parse_vnnlib(text, net)
    assert p.lo.tolist() == [0] and p.hi.tolist() == [9] and p.metadata["dropped_disjuncts"] == "1"
    assert_semantics(p, net, lambda Y: Y[0] >= Y[2])


def test_robustness_label_is_recognized_in_the_vnncomp_form():
    text = decl(1) + "(assert (>= X_0 0)) (assert (<= X_0 1))\n" + \
        "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 (+ Y_1 0.0625)))))"
    net = net3(n_in=1)
    p = parse_vnnlib(text, net)
    assert p.label == 1
    x = np.zeros((1, 1), dtype=np.int64)
    exact = robustness_property(net, x[0], 1, radius=1)
    same_semantics(dataclasses.replace(exact, lo=p.lo, hi=p.hi), p)


def test_dnf_size_limit():
    ors = " ".join(f"(or (>= Y_0 {i}) (>= Y_1 {i}))" for i in range(12))  # 2^12 disjuncts
    text = decl(1) + "(assert (>= X_0 0)) (assert (<= X_0 1))\n(assert (and " + ors + "))"
    with pytest.raises(PropertyError, match="more than 1000 disjuncts") as e:
        parse_vnnlib(text, net3(n_in=1), max_disjuncts=1000)
    assert loc(text, "and " + ors[:4]) in str(e.value)
    assert len(parse_vnnlib(text, net3(n_in=1), max_disjuncts=5000).unsafe) == 2**12


# ------------------------------------------------------------------------------------------ located errors
BOX1 = "(assert (>= X_0 0.0)) (assert (<= X_0 1.0))\n"
ERRORS = [
    # (text, token whose place the message names, which occurrence of it, fragment of the message)
    (decl(1) + BOX1 + "(assert (>= Y_7 Y_0))", "Y_7", 0, "unknown variable"),
    (decl(1) + BOX1 + "(assert (>= Z Y_0))", "Z", 0, "unknown symbol"),
    (decl(1) + BOX1 + "(assert (>= (* Y_0 Y_1) 0.5))", "Y_1", 1, "non-linear"),
    (decl(1) + BOX1 + "(assert (>= (/ 1 Y_1) 0.5))", "Y_1", 1, "non-linear"),
    (decl(1) + BOX1 + "(assert (>= Y_0 (/ 1 0)))", "0)))", 0, "division by zero"),
    (decl(1) + BOX1 + "(assert (>= Y_0 1.2.3))", "1.2.3", 0, "malformed number"),
    (decl(1) + BOX1 + "(assert (>= Y_0 (exp Y_1)))", "exp", 0, "unsupported term operator"),
    (decl(1) + BOX1 + "(assert (=> (>= Y_0 0) (>= Y_1 0)))", "=>", 0, "unsupported operator"),
    (decl(1) + BOX1 + "(assert (>= Y_0 0.5)", "(assert (>= Y_0", 0, "never closed"),
    (decl(1) + BOX1 + "(assert (>= Y_0 0.5))) ", ") ", 1, "unexpected ')'"),
    (decl(1) + BOX1 + "(assert (>= Y_0 X_0))", ">= Y_0 X_0", 0, "mixes inputs"),
    (decl(1) + BOX1 + "(assert (< X_0 0.5))", "< X_0", 0, "strict bounds"),
    (decl(1) + BOX1 + "(assert (not (<= X_0 0.5)))", "<= X_0 0.5", 0, "strict bounds"),
    (decl(2) + BOX1 + "(assert (<= (+ X_0 X_1) 1.0))", "<= (+", 0, "single inputs"),
    (decl(1) + "(assert (>= X_0 0.0))\n(assert (>= Y_0 Y_1))", "X_0 Real", 0, "no upper bound"),
    (decl(1) + BOX1 + "(declare-const X_0 Real)", "X_0 Real", 1, "declared twice"),
    (decl(1) + "(declare-const Q_0 Real)", "Q_0", 0, "unsupported variable name"),
    (decl(1).replace("X_0 Real", "X_0 Int"), "Int", 0, "sort Real"),
    (decl(2) + BOX1, "X_1 Real", 0, "does not exist"),
    (decl(1) + BOX1 + "(check-sat) (push 1)", "push", 0, "unsupported command"),
    (decl(1) + BOX1 + "(assert (>= Y_0 0.5) (<= Y_0 1))", "(assert (>= Y_0", 0, "one formula"),
    (decl(1) + BOX1 + "(assert Y_0)", "Y_0)", 0, "expected a formula"),
    (decl(1) + BOX1 + "(assert (>= Y_0))", ">= Y_0))", 0, "at least two"),
    (decl(1) + "X_0", "X_0", 1, "expected a command"),
]


@pytest.mark.parametrize("text,token,nth,fragment", ERRORS, ids=[e[3] for e in ERRORS])
def test_located_errors(text, token, nth, fragment):
    with pytest.raises(PropertyError) as e:
        parse_vnnlib(text, net3(n_in=1))
    msg = str(e.value)
    assert fragment in msg
    assert msg.startswith(f"<vnnlib>, {loc(text, token, nth)}: "), msg


def test_missing_declaration_is_reported(tmp_path):
    text = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n" + BOX1
    path = tmp_path / "short.vnnlib"
    path.write_text(text)
    with pytest.raises(PropertyError, match=r"short\.vnnlib, line 1, column 1: Y_1 is not declared"):
        parse_vnnlib(path, net3(n_in=1))


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.vnnlib"
    text = decl(1) + BOX1 + "(assert (>= (* Y_0 Y_1) 0.5))\n"
    path.write_text(text)
    for arg in (path, str(path)):
        with pytest.raises(PropertyError) as e:
            parse_vnnlib(arg, net3(n_in=1))
        assert str(e.value).startswith(f"{path}, {loc(text, 'Y_1', 1)}: non-linear")
    with pytest.raises(PropertyError, match="cannot read"):
        parse_vnnlib(tmp_path / "missing.vnnlib", net3(n_in=1))


# ------------------------------------------------------------------------------------------ writing
def test_write_exact_decimals_and_header(tmp_path):
    net = net3(n_in=2, s_in=Fraction(1, 256), s_out=Fraction(1, 16), z_out=1, hi=255)
    p = Property([3, 0], [7, 255], (Conjunction([[1, -1, 0]], [0]), Conjunction([[0, 2, -1], [1, 0, 0]], [3, -2])),
                 name="my prop", description="line one\nline two", label=None)
    path = tmp_path / "p.vnnlib"
    text = write_vnnlib(p, net, path)
    assert path.read_text() == text
    assert "; name: my prop" in text and "; description: line one\n; line two" in text
    assert "(assert (>= X_0 0.01171875))" in text and "(assert (<= X_1 0.99609375))" in text  # 3/256, 255/256
    assert "(>= Y_1 Y_0)" in text  # y0 - y1 <= 0
    # 2 y1 - y2 <= 3:  2 Y1 <= Y2 + (3 - 1) / 16;  y0 <= -2:  Y0 <= -3/16
    assert "(<= (* 2.0 Y_1) (+ Y_2 0.125))" in text and "(<= Y_0 -0.1875)" in text
    q = parse_vnnlib(path, net)
    assert q.name == "my prop" and q.metadata["vnnlib_description"] == "line one"
    same_semantics(p, q)


def test_write_non_dyadic_scales():
    # scale 1/3: 1/3 has no finite decimal; the written numbers must still map back to the same rows and box
    net = net3(n_in=2, s_in=Fraction(1, 3), z_in=1, s_out=Fraction(2, 7), z_out=-1)
    p = Property([0, 4], [5, 9], (Conjunction([[1, -1, 0], [0, 1, 1]], [-1, 2]), Conjunction([[0, 0, -3]], [5])))
    text = write_vnnlib(p, net)
    for num in re.findall(r"-?\d+\.\d+", text):
        Fraction(num)  # plain decimals only
    same_semantics(p, parse_vnnlib(text, net))


@pytest.mark.parametrize("mode", list(Rounding))
@pytest.mark.parametrize("scale", [Fraction(1, 10), Fraction(1, 256), Fraction(3, 7)])
def test_quantizing_input_interval_is_exact_and_largest(mode, scale):
    """For a quantizing input, the written [l, u] quantizes exactly to [lo, hi], and one more unit of the last
    decimal on either side (``l - 10^-k``, ``u + 10^-k``) would leave the box."""
    net = net3(n_in=1, s_in=scale, z_in=-3, rounding=mode, hi=40)
    for lo, hi in [(0, 0), (1, 1), (2, 7), (12, 40), (5, 6)]:
        p = Property([lo], [hi], (Conjunction([[1, -1, 0]], [0]),))
        text = write_vnnlib(p, net)
        ls = re.search(r"\(>= X_0 (\S+)\)\)", text).group(1)
        us = re.search(r"\(<= X_0 (\S+)\)\)", text).group(1)
        l, u = Fraction(ls), Fraction(us)
        k = max(len(ls.split(".")[1]), len(us.split(".")[1]))
        unit = Fraction(1, 10**k)

        def quant(v: Fraction) -> int:
            return round_fraction(v / scale, mode) - 3  # + z_in, unclamped

        assert quant(l) == lo and quant(u) == hi
        assert quant(l - unit) == lo - 1 and quant(u + unit) == hi + 1
        q = parse_vnnlib(text, net)
        assert q.lo.tolist() == [lo] and q.hi.tolist() == [hi]


def test_write_rejects_unsatisfiable_and_mismatched_properties():
    net = net3(n_in=1)
    with pytest.raises(PropertyError, match="unsatisfiable"):
        write_vnnlib(Property([0], [1], (Conjunction([[0, 0, 0]], [-1]),)), net)
    with pytest.raises(PropertyError, match="inputs"):
        write_vnnlib(Property([0, 0], [1, 1], (Conjunction([[1, 0, 0]], [0]),)), net)
    # a zero row with b >= 0 is true: the disjunct is "every output"
    p = Property([0], [1], (Conjunction([[0, 0, 0], [1, 0, 0]], [0, 2]), Conjunction([[0, 0, 0]], [3])))
    same_semantics(p, parse_vnnlib(write_vnnlib(p, net), net))


# ------------------------------------------------------------------------------------------ round trips
SCALES = [Fraction(1), Fraction(1, 256), Fraction(1, 16), Fraction(1, 10), Fraction(3, 5), Fraction(1, 3),
          Fraction(2, 7), Fraction(5, 12), Fraction(float(np.float32(1 / 255)))]


@st.composite
def nets_with_units(draw: st.DrawFn) -> QNetwork:
    net = draw(tiny_networks())
    return dataclasses.replace(
        net, input_scale=draw(st.sampled_from(SCALES)), input_zero_point=draw(st.integers(-3, 3)),
        output_scale=draw(st.sampled_from(SCALES)), output_zero_point=draw(st.integers(-3, 3)),
        input_rounding=draw(st.one_of(st.none(), st.sampled_from(list(Rounding)))))


@st.composite
def random_properties(draw: st.DrawFn, net: QNetwork) -> Property:
    n, m = net.num_inputs, net.num_outputs
    lo = np.array(draw(st.lists(st.integers(net.input_lo, net.input_hi), min_size=n, max_size=n)))
    width = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    hi = np.minimum(lo + width, net.input_hi)
    conjs = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(1, 3))
        rows = [draw(st.lists(st.integers(-3, 3), min_size=m, max_size=m).filter(any)) for _ in range(k)]
        conjs.append(Conjunction(rows, draw(st.lists(st.integers(-12, 12), min_size=k, max_size=k))))
    return Property(lo, hi, tuple(conjs), name=draw(st.sampled_from(["", "p", "prop 1"])))


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_round_trip_random_properties(data):
    net = data.draw(nets_with_units())
    p = data.draw(random_properties(net))
    text = write_vnnlib(p, net)
    q = parse_vnnlib(text, net)
    same_semantics(p, q)
    assert q.name == (p.name or "vnnlib")
    assert parse_vnnlib(write_vnnlib(q, net), net).is_violated(OUT_GRID).tolist() == q.is_violated(OUT_GRID).tolist()


@given(st.data())
@settings(max_examples=40, deadline=None)
def test_round_trip_robustness_properties(data):
    net = data.draw(nets_with_units())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    label = data.draw(st.integers(0, net.num_outputs - 1))
    p = robustness_property(net, x, label, radius=data.draw(st.integers(0, 3)), name="rob")
    text = write_vnnlib(p, net)
    assert text.count("(and (>= Y_") == net.num_outputs - 1  # the VNN-COMP form
    q = parse_vnnlib(text, net)
    same_semantics(p, q)
    assert q.label == label
    # and the parsed property says exactly "the prediction changes" on the network itself
    pts = rng.integers(q.lo, q.hi + 1, size=(64, net.num_inputs))
    assert np.array_equal(q.is_violated(forward(net, pts)), predict(net, pts) != label)


# ------------------------------------------------------------------------------------------ QVIP P1-6 on MNIST
needs_shared = pytest.mark.skipif(not (P1_6.exists() and MNIST1000.exists()), reason="../shared data not present")


@pytest.fixture(scope="module")
def p16():
    from qverify.io.h5 import load_qvip_h5

    data = np.load(MNIST1000)
    return load_qvip_h5(P1_6), data["images"], data["labels"]


def _decimal(q: Fraction) -> str:
    with localcontext() as ctx:
        ctx.prec = 50
        return str(Decimal(q.numerator) / Decimal(q.denominator))


@needs_shared
@pytest.mark.parametrize("sid,r", [(0, 1), (18, 2), (149, 3)])
def test_qvip_real_box_maps_to_pixel_box(p16, sid, r):
    net, images, labels = p16
    assert net.input_scale == Fraction(1, 256) and net.output_scale == Fraction(1, 16)
    x = pixels_to_grid(net, images[sid:sid + 1])[0]
    c = int(labels[sid])
    # the box in real units as a VNN-COMP benchmark would state it: pixel / 256 +- r / 256, unclipped
    lines = [f"(declare-const X_{i} Real)" for i in range(784)] + [f"(declare-const Y_{j} Real)" for j in range(32)]
    for i, v in enumerate(x.tolist()):
        lines.append(f"(assert (>= X_{i} {_decimal(Fraction(v - r, 256))}))")
        lines.append(f"(assert (<= X_{i} {_decimal(Fraction(v + r, 256))}))")
    dis = [f"(and (>= Y_{i} Y_{c}))" if i < c else f"(and (>= Y_{i} (+ Y_{c} 0.0625)))" for i in range(32) if i != c]
    lines.append("(assert (or " + " ".join(dis) + "))")
    p = parse_vnnlib("\n".join(lines), net)
    want = robustness_property(net, x, c, radius=r)
    assert np.array_equal(p.lo, want.lo) and np.array_equal(p.hi, want.hi)
    assert p.label == c
    for a, b in zip(p.unsafe, want.unsafe, strict=True):  # exactly the integer rows of the tie rule
        assert np.array_equal(a.A, b.A) and np.array_equal(a.b, b.b)
    # the center is a counterexample iff the sample is misclassified (18 and 149 are, in the QVIP paper)
    assert bool(p.is_violated(forward(net, x[None, :]))[0]) == (sid in (18, 149))


@needs_shared
def test_qvip_eps_box_and_written_files(p16, tmp_path):
    net, images, labels = p16
    ids = parse_ids("0:3,18")
    assert ids == [0, 1, 2, 18]
    paths = write_robustness_properties(net, images, labels, ids, radius=2, out_dir=tmp_path / "props")
    assert [p.name for p in paths] == [f"prop_{i}_r2.vnnlib" for i in ids]
    xs = pixels_to_grid(net, images[ids])
    for sid, x, path in zip(ids, xs, paths, strict=True):
        q = parse_vnnlib(path, net)
        want = robustness_property(net, x, int(labels[sid]), radius=2)
        same = np.array_equal(q.lo, want.lo) and np.array_equal(q.hi, want.hi)
        assert same and q.label == int(labels[sid]) and q.name == f"prop_{sid}_r2"
        assert all(np.array_equal(a.A, b.A) and np.array_equal(a.b, b.b)
                   for a, b in zip(q.unsafe, want.unsafe, strict=True))
        assert f"sample {sid}" in path.read_text()
    # a real epsilon of 2.5 pixels keeps the same grid points as radius 2 (native integer grid)
    eps_paths = write_robustness_properties(net, images, labels, [0], eps="0.009765625", out_dir=tmp_path)
    assert eps_paths[0].name == "prop_0_eps0.009765625.vnnlib"
    q = parse_vnnlib(eps_paths[0], net)
    want = robustness_property(net, xs[0], int(labels[0]), radius=2)
    assert np.array_equal(q.lo, want.lo) and np.array_equal(q.hi, want.hi)


def test_write_robustness_properties_validates(tmp_path):
    net = net3(n_in=4, hi=255, s_in=Fraction(1, 256))
    images = np.arange(8, dtype=np.uint8).reshape(2, 4)
    with pytest.raises(PropertyError, match="exactly one"):
        write_robustness_properties(net, images, [0, 1], [0], out_dir=tmp_path)
    with pytest.raises(PropertyError, match="outside the data"):
        write_robustness_properties(net, images, [0, 1], [2], radius=1, out_dir=tmp_path)
    paths = write_robustness_properties(net, images, [0, 2], [1, 0], radius=1, out_dir=tmp_path / "a" / "b")
    assert [p.name for p in paths] == ["prop_1_r1.vnnlib", "prop_0_r1.vnnlib"]
    q = parse_vnnlib(paths[0], net)
    assert q.lo.tolist() == [3, 4, 5, 6] and q.hi.tolist() == [5, 6, 7, 8] and q.label == 2


def test_parse_ids():
    assert parse_ids("0:5") == [0, 1, 2, 3, 4]
    assert parse_ids("7") == [7]
    assert parse_ids("1,3, 8:10") == [1, 3, 8, 9]
    assert parse_ids("0:10:4") == [0, 4, 8]
    assert parse_ids("8:", n=10) == [8, 9]
    for bad in ("a:b", "1:2:3:4", "8:"):
        with pytest.raises(PropertyError):
            parse_ids(bad)


def test_path_argument_forms(tmp_path):
    net = net3(n_in=1)
    p = Property([1], [2], (Conjunction([[1, -1, 0]], [0]),))
    path = tmp_path / "named.vnnlib"
    write_vnnlib(dataclasses.replace(p, name=""), net, path)
    assert parse_vnnlib(path, net).name == "named"  # no name header: the file's stem
    assert parse_vnnlib(str(path), net, name="given").name == "given"
    assert Path(parse_vnnlib(path, net).metadata["source"]) == path


# ------------------------------------------------------------------------------ fuzzer regressions (issue 16)
BOX3 = "".join(f"(assert (>= X_{i} 0.0)) (assert (<= X_{i} 1.0))\n" for i in range(3))


@pytest.mark.parametrize("rounding", [None, Rounding.HALF_EVEN])
def test_bounds_beyond_int64_are_the_grid_ends(rounding):
    """``1e260`` (and ``2^63``) on an input whose grid is [0, 15] is the grid's end; it crashed with OverflowError."""
    net = net3(rounding=rounding)
    text = decl(3) + ("(assert (<= X_0 1e260)) (assert (>= X_0 -1e260)) (assert (>= X_1 -9223372036854775808))"
                      "(assert (<= X_1 0.5)) (assert (>= X_2 0.3)) (assert (<= X_2 1e300))"
                      "(assert (>= Y_0 Y_1))")
    p = parse_vnnlib(text, net)
    assert p.lo.tolist() == [0, 0, 3] and p.hi.tolist() == [15, 5, 15]
    # a lower bound beyond the grid empties the box: the located error, not an overflow
    text = decl(3) + BOX3.replace("(>= X_2 0.0)", "(>= X_2 1e260)") + "(assert (>= Y_0 Y_1))"
    with pytest.raises(PropertyError, match=r"<vnnlib>, line 1, column 1: no point of the network's integer input"):
        parse_vnnlib(text, net)


def test_huge_right_hand_sides_are_the_constants_they_are():
    """``Y_0 <= 1e260`` holds for every output the network can produce, ``Y_0 <= -1e260`` for none (both were
    "too large" errors, and the bound form an OverflowError)."""
    net = net3()
    lo, hi = net.output_range
    grid = np.array(list(itertools.product(range(lo, hi + 1), repeat=3)), dtype=np.int64)
    p = parse_vnnlib(decl(3) + BOX3 + "(assert (and (>= Y_0 Y_1) (<= Y_2 1e260)))", net)
    q = parse_vnnlib(decl(3) + BOX3 + "(assert (>= Y_0 Y_1))", net)
    assert np.array_equal(p.is_violated(grid), q.is_violated(grid))
    p = parse_vnnlib(decl(3) + BOX3 + "(assert (or (<= Y_2 -1e260) (>= Y_0 Y_1)))", net)
    assert np.array_equal(p.is_violated(grid), q.is_violated(grid))
    p = parse_vnnlib(decl(3) + BOX3 + "(assert (<= (+ Y_0 Y_1) 1e260))", net)
    assert p.is_violated(grid).all()
    text = decl(3) + BOX3 + "(assert (>= Y_0 Y_1))\n(assert (<= Y_2 -1e260))"
    with pytest.raises(PropertyError, match=rf"{loc(text, '(assert (<= Y_2')}: the assertions are unsatisfiable"):
        parse_vnnlib(text, net)
    with pytest.raises(PropertyError, match=r"unsatisfiable.*can never be violated"):
        parse_vnnlib(decl(3) + BOX3 + "(assert false)", net)


def test_rows_that_could_overflow_int64_are_located_errors():
    """Integer rows must evaluate exactly in int64 on every output the network can produce: ``(2^61 + 1) y_0 + y_1``
    (coprime, so the gcd does not shrink it) reaches ``8 (2^61 + 2) > 2^62`` on outputs in [-8, 7]. It used to be
    accepted, and ``Property.is_violated`` then overflowed."""
    net = net3()  # output scale 1/16: the real coefficient 16 (2^61 + 1) is the integer 2^61 + 1
    text = decl(3) + BOX3 + f"(assert (<= (+ (* {16 * (2**61 + 1)} Y_0) (* 16 Y_1)) 0))"
    with pytest.raises(PropertyError, match=rf"{loc(text, '<= (+ (*')}: coefficients too large"):
        parse_vnnlib(text, net)
    text = decl(3) + BOX3 + "(assert (<= (* 1e260 Y_0) Y_1))"
    with pytest.raises(PropertyError, match=rf"{loc(text, '<= (* 1e260')}: coefficient of Y_0 too large"):
        parse_vnnlib(text, net)


def test_huge_constants_through_the_cli(tmp_path, capsys):
    """``qverify verify`` on the issue's ``1e260`` files: a bound is the grid's end (a verdict), a coefficient is exit 3
    with the file, line and column."""
    from qverify.cli import main
    from qverify.io import save_model

    net = net3()
    model = tmp_path / "m.qnn"
    save_model(net, model)
    ok = tmp_path / "bound.vnnlib"
    ok.write_text(decl(3) + BOX3.replace("(<= X_0 1.0)", "(<= X_0 1e260)") + "(assert (>= Y_0 (+ Y_1 1e-260)))\n")
    assert main(["verify", str(model), str(ok), "--timeout", "20"]) in (0, 10)
    bad = tmp_path / "coeff.vnnlib"
    text = decl(3) + BOX3 + "(assert (>= (* 1e260 Y_0) Y_1))\n"
    bad.write_text(text)
    capsys.readouterr()
    assert main(["verify", str(model), str(bad)]) == 3
    err = capsys.readouterr().err
    assert f"{bad}, {loc(text, '>= (* 1e260')}: coefficient of Y_0 too large" in err


def test_deep_nesting_is_a_located_error():
    """Thousands of nested parentheses raised RecursionError; the limit is MAX_DEPTH levels."""
    from qverify.io.vnnlib import MAX_DEPTH

    net = net3()
    inner = "(>= Y_0 Y_1)"
    depth = MAX_DEPTH - 5
    p = parse_vnnlib(decl(3) + BOX3 + "(assert " + "(and " * depth + inner + ")" * depth + ")", net)
    assert p.num_outputs == 3
    for wrap in ("(and ", "(not "):
        text = decl(3) + BOX3 + "(assert " + wrap * 5000 + inner + ")" * 5000 + ")"
        with pytest.raises(PropertyError, match=f"nested deeper than {MAX_DEPTH} levels"):
            parse_vnnlib(text, net)
    text = decl(3) + BOX3 + "(assert (<= " + "(+ " * 3000 + "Y_0" + ")" * 3000 + " 1))"
    with pytest.raises(PropertyError, match=r"line 10, column \d+: parentheses nested deeper"):
        parse_vnnlib(text, net)


@pytest.mark.parametrize("number, message", [
    ("1e401", "exponent of '1e401' out of range"),
    ("1e99999999", "out of range"),
    ("1e" + "9" * 5000, "out of range"),  # int() of 5000 digits raised ValueError
    ("1" * 1001, "number with 1001 digits"),
    ("0." + "0" * 2000 + "1", "number with 2002 digits"),
    ("\u0663", "malformed number"),  # an Arabic-Indic three was read as 3
    ("\u0661.\u0665", "malformed number"),
    ("1e\u0663", "malformed number"),
], ids=["1e401", "1e99999999", "5000-digit-exponent", "1001-digits", "2002-digits", "arabic-3", "arabic-1.5",
        "arabic-exponent"])
def test_number_limits_and_ascii_digits(number, message):
    net = net3()
    text = decl(3) + BOX3 + f"(assert (>= Y_0 {number}))"
    with pytest.raises(PropertyError, match=rf"<vnnlib>, line 10, column 17: .*{re.escape(message)}"):
        parse_vnnlib(text, net)
    assert parse_vnnlib(decl(3) + BOX3 + "(assert (>= Y_0 -1e-400))", net).num_outputs == 3


@pytest.mark.parametrize("name, message", [("X_\u0663", "unsupported variable name"),
                                           ("X_" + "1" * 5000, "unsupported variable name"),
                                           ("X_01", "unsupported variable name")], ids=["arabic", "long", "01"])
def test_odd_variable_names_are_located_errors(name, message):
    text = f"(declare-const {name} Real)\n" + decl(3)
    with pytest.raises(PropertyError, match=rf"<vnnlib>, line 1, column 16: {message}"):
        parse_vnnlib(text, net3())


def test_unreadable_files_are_located_errors(tmp_path):
    net = net3()
    path = tmp_path / "latin1.vnnlib"
    path.write_bytes((decl(3) + BOX3 + "; caf").encode() + b"\xe9\n(assert (>= Y_0 Y_1))\n")
    with pytest.raises(PropertyError, match=rf"{re.escape(str(path))}, line 10, column 6: not UTF-8 text \(byte 0xe9"):
        parse_vnnlib(path, net)
    with pytest.raises(PropertyError, match="cannot read the VNN-LIB file"):
        parse_vnnlib("prop\x00.vnnlib", net)  # a NUL byte in the name raised ValueError


def test_repeated_big_subformulas_hit_the_work_limit():
    """Each copy of a 2^12-disjunct ``and`` of ``or``s is within the DNF limit, but 100 copies took 35 s; the total
    work is bounded (WORK_FACTOR * max_disjuncts disjuncts built)."""
    import time

    net = net3()
    big = "(and " + " ".join(f"(or (<= Y_0 {i}) (>= Y_1 {i}))" for i in range(12)) + ")"
    assert len(parse_vnnlib(decl(3) + BOX3 + f"(assert {big})", net).unsafe) == 4096
    t = time.perf_counter()
    with pytest.raises(PropertyError, match=r"line 10, column \d+: the formula is too complex"):
        parse_vnnlib(decl(3) + BOX3 + "(assert (or " + " ".join([big] * 100) + "))", net)
    assert time.perf_counter() - t < 20


def test_file_names_with_parentheses_are_files(tmp_path):
    """The CLI passes a string: ``prop (1).vnnlib`` was parsed as VNN-LIB text ("expected a command")."""
    net = net3()
    path = tmp_path / "prop (1).vnnlib"
    path.write_text(decl(3) + BOX3 + "(assert (>= Y_0 Y_1))")
    assert parse_vnnlib(str(path), net).metadata["source"] == str(path)
