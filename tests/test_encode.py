"""The encoder: program primitives, exactness of every layer encoding against the executor, golden .lp files."""

from __future__ import annotations

import itertools
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.encode import (
    LinExpr,
    Program,
    box_bounds,
    encode,
    encode_network,
    worst_case_bounds,
)
from qverify.encode._bounds import _own_interval
from qverify.encode.network import _RoundClamp
from qverify.encode.program import big_m_rows
from qverify.execute import execute
from qverify.network import Dense, QNetwork, Requantize
from qverify.property import robustness_property
from qverify.quant import Rounding
from qverify.settings import SolverSettings
from qverify.solvers.cpsat import CpSatBackend
from qverify.solvers.export import to_lp_string
from tests.fixtures import random_dense_network, tiny_fixed_point_mlp, tiny_networks

GOLDEN = Path(__file__).resolve().parents[1] / "encodings" / "golden"
REGEN = os.environ.get("QVERIFY_REGEN_GOLDEN") == "1"
CPSAT = CpSatBackend()
ONE = SolverSettings(threads=1)


# ------------------------------------------------------------------------------------------ program primitives
def test_gcd_normalization_rounds_the_bounds_inward():
    p = Program()
    x, y = p.add_var("x", -10, 10), p.add_var("y", -10, 10)
    c = p.add_con(LinExpr({x.index: 2, y.index: 4}), -5, 5)
    assert c is not None and c.terms == ((0, 1), (1, 2)) and (c.lo, c.hi) == (-2, 2)
    # an equality with no integer solution is infeasible by construction
    q = Program()
    z = q.add_var("z", -10, 10)
    assert q.add_con(LinExpr({z.index: 2}), 3, 3) is None
    assert q.trivially_infeasible


def test_redundant_rows_are_dropped_and_impossible_rows_detected():
    p = Program()
    x = p.add_var("x", 0, 3)
    assert p.add_con(LinExpr.var(x), -1, 3) is None and not p.cons
    assert p.add_con(LinExpr.var(x) + 10, None, 5) is None
    assert p.trivially_infeasible


def test_impossible_indicator_switches_its_literal_off():
    p = Program()
    x = p.add_var("x", 0, 3)
    b = p.add_binary("b")
    p.add_indicator(b, 1, LinExpr.var(x), 7, None)
    assert not p.trivially_infeasible
    assert [c.name for c in p.cons] and p.check({0: 0, 1: 1}) and not p.check({0: 0, 1: 0})


@given(st.integers(-3, 3), st.integers(-3, 3), st.integers(-4, 4), st.integers(-4, 4), st.sampled_from([0, 1]))
@settings(max_examples=60, deadline=None)
def test_big_m_rows_are_exactly_the_indicator(a, b, lo, width, val):
    """On every integer point of the domains, the big-M rows hold iff the indicator does."""
    p = Program()
    x, y = p.add_var("x", -2, 3), p.add_var("y", -1, 2)
    z = p.add_binary("z")
    e = LinExpr({x.index: a, y.index: b})
    c = p.add_indicator(z, val, e, lo, lo + abs(width))
    if c is None:
        return
    rows = big_m_rows(c)
    for xv, yv, zv in itertools.product(range(-2, 4), range(-1, 3), (0, 1)):
        asg = {x.index: xv, y.index: yv, z.index: zv}
        ind = zv != val or (c.lo is None or sum(k * asg[i] for i, k in c.terms) >= c.lo) and (
            c.hi is None or sum(k * asg[i] for i, k in c.terms) <= c.hi)
        lin = all((r.lo is None or sum(k * asg[i] for i, k in r.terms) >= r.lo)
                  and (r.hi is None or sum(k * asg[i] for i, k in r.terms) <= r.hi) for r in rows)
        assert ind == lin


# ------------------------------------------------------------------------------------------ cut points
@given(st.integers(1, 9), st.integers(1, 40), st.integers(-3, 3), st.sampled_from(list(Rounding)))
@settings(max_examples=80, deadline=None)
def test_cut_points_split_the_accumulator_axis(p, q, z, mode):
    f = _RoundClamp(p, q, z, -5, 6, mode)
    for v in range(f.lo + 1, f.hi + 1):
        c = f.cut(v)
        assert f(c) >= v and f(c - 1) < v


# ------------------------------------------------------------------------------------------ bounds
@given(tiny_networks(), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_box_bounds_contain_every_execution(net, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    b = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    bounds = box_bounds(net, lo, hi)
    own = _own_interval(net, lo, hi)
    xs = rng.integers(lo, hi + 1, size=(64, net.num_inputs))
    for i, vals in enumerate(execute(net, xs)):
        flat = vals.reshape(len(xs), -1)
        assert np.all(flat >= bounds[i][0]) and np.all(flat <= bounds[i][1])
        assert np.array_equal(bounds[i][0], own[i][0]) and np.array_equal(bounds[i][1], own[i][1])


# ------------------------------------------------------------------------------------------ exactness
def _fix_inputs(enc, x):
    for j, v in enumerate(enc.inputs):
        if isinstance(v, LinExpr):
            enc.program.add_con(v, int(x[j]), int(x[j]), name=f"fix{j}")


@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(net=tiny_networks(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=25, deadline=None)
def test_fixed_input_every_layer_equals_the_executor(encoding, net, seed):
    """Free input box (worst-case bounds, so every neuron is encoded), input pinned by rows: the solver's values
    of every layer equal the executor's, and no other value of any neuron is feasible."""
    rng = np.random.default_rng(seed)
    x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    lo = np.full(net.num_inputs, net.input_lo)
    hi = np.full(net.num_inputs, net.input_hi)
    enc = encode_network(net, lo, hi, worst_case_bounds(net), encoding)
    _fix_inputs(enc, x)
    out = CPSAT.solve(enc.program, ONE, 10)
    assert out.status == "feasible"
    ex = execute(net, x[None, :])
    for i in range(len(ex)):
        assert np.array_equal(enc.decode(out.values, i), ex[i].ravel()), f"layer value index {i}"
    # uniqueness: some neuron differing from the executor is infeasible
    rows = []
    for i in range(1, len(ex)):
        for j, v in enumerate(enc.layer_values[i]):
            if isinstance(v, LinExpr):
                w = int(ex[i].ravel()[j])
                rows += [[(v, w - 1)], [(-v, -w - 1)]]
    enc.program.add_disjunction(rows, "differs")
    assert CPSAT.solve(enc.program, ONE, 10).status == "infeasible"


@pytest.mark.parametrize("encoding", ["range", "onehot"])
@pytest.mark.parametrize("mode", list(Rounding))
def test_single_neuron_exhaustively(encoding, mode):
    """One requantized neuron ``y = clamp(R((w x + b) p / q) + z, lo, hi)`` over a whole input range, for many
    multipliers, zero points and clamp ranges (ties, saturation, both signs): CP-SAT finds no input whose ``y``
    differs from the executor's (the table of the executor is an element constraint on the input)."""


    for (p, q), z, (lo, hi), (w, b) in itertools.product(
            [(1, 1), (1, 2), (1, 4), (3, 4), (1, 3), (5, 6), (2, 1), (7, 2)], (-2, 0, 1),
            ((-4, 3), (0, 7), (1, 2)), ((1, -8), (3, -20))):
        net = QNetwork((1,), 0, 15, (Dense([[w]], [b]), Requantize((p,), (q,), np.array([z]), lo, hi, mode)))
        enc = encode_network(net, np.array([0]), np.array([15]), None, encoding)
        y = enc.outputs[0]
        xs = np.arange(16)[:, None]
        table = execute(net, xs)[-1].ravel()
        if not isinstance(y, LinExpr):
            assert np.all(table == y)
            continue
        assert _no_input_differs(enc, y, table), (p, q, z, lo, hi, w, b)


@given(net=tiny_networks(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=20, deadline=None)
def test_a_point_box_needs_no_variables(net, seed):
    """Neurons fixed by the bounds get no variables: a single-point box encodes to constants only."""
    rng = np.random.default_rng(seed)
    x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    enc = encode_network(net, x, x)
    assert not enc.program.vars and not enc.program.cons
    ex = execute(net, x[None, :])
    for i in range(len(ex)):
        assert np.array_equal(enc.decode([], i), ex[i].ravel())


@pytest.mark.parametrize("encoding", ["range", "onehot"])
def test_solutions_of_the_network_program_are_exactly_the_executions(encoding):
    """On a tiny box every input point has a solution, with exactly the executor's outputs."""
    rng = np.random.default_rng(3)
    for rounding in Rounding:
        net = random_dense_network(rng, n_in=2, hidden=(3,), rounding=rounding, affine=rounding != "half_up")
        lo, hi = np.array([1, 2]), np.array([3, 4])
        for x in itertools.product(range(1, 4), range(2, 5)):
            enc = encode_network(net, lo, hi, None, encoding)
            _fix_inputs(enc, x)
            out = CPSAT.solve(enc.program, ONE, 10)
            assert out.status == "feasible"
            assert np.array_equal(enc.decode(out.values, -1), execute(net, np.array([x]))[-1].ravel())


def test_huge_affine_multipliers_fall_back_to_onehot_and_stay_exact():
    m = Fraction(0.1234567890123)  # a float64: a dyadic rational with a ~2^52 numerator
    net = QNetwork((3,), 0, 15, (Dense([[3, -2, 5], [1, 1, -4]], [2, -1]),
                                 Requantize.affine([m], 0, -8, 7, Rounding.HALF_EVEN)))
    lo, hi = np.zeros(3, np.int64), np.full(3, 15)
    enc = encode_network(net, lo, hi, None, "range")
    assert enc.stats["range_fallback"] == 2
    for x in ([0, 0, 0], [15, 0, 15], [7, 9, 3]):
        e = encode_network(net, lo, hi, None, "range")
        _fix_inputs(e, x)
        out = CPSAT.solve(e.program, ONE, 10)
        assert np.array_equal(e.decode(out.values, -1), execute(net, np.array([x]))[-1].ravel())


def test_tie_binaries_only_where_a_tie_is_reachable():
    # /2 with half-even: ties at odd accumulators -> a parity binary
    net = QNetwork((2,), 0, 7, (Dense([[1, 1]], [0]), Requantize.pow2(1, 0, 15, Rounding.HALF_EVEN)))
    enc = encode_network(net, np.array([0, 0]), np.array([7, 7]), None, "range")
    assert enc.stats["tie_binaries"] == 1
    # /3: no ties possible -> none
    net3 = QNetwork((2,), 0, 7, (Dense([[1, 1]], [0]), Requantize((1,), (3,), np.array([0]), 0, 15,
                                                                    Rounding.HALF_EVEN)))
    enc3 = encode_network(net3, np.array([0, 0]), np.array([7, 7]), None, "range")
    assert enc3.stats["tie_binaries"] == 0


def test_pure_shift_half_up_is_the_textbook_range_rows():
    """``2^k y - 2^(k-1) <= acc <= 2^k y + 2^(k-1) - 1`` after normalization (k = 2, no clamp reachable)."""
    net = QNetwork((1,), 0, 7, (Dense([[3]], [8]), Requantize.pow2(2, 0, 63)))
    enc = encode_network(net, np.array([0]), np.array([7]), None, "range", acc_vars=True)
    rows = {c.name: c for c in enc.program.cons}
    a, y = enc.program.vars[1].index, enc.program.vars[2].index
    assert rows["rlol1_0"].terms == ((a, 1), (y, -4)) and rows["rlol1_0"].lo == -2
    assert rows["rhil1_0"].terms == ((a, 1), (y, -4)) and rows["rhil1_0"].hi == 1


# ------------------------------------------------------------------------------------------ golden files
def _golden_cases():
    hand = tiny_fixed_point_mlp()
    prop = robustness_property(hand, np.array([1, 2]), 0, radius=1, name="hand-r1")
    even = QNetwork((2,), 0, 3, (
        Dense([[2, -1], [1, 3]], [1, -2], name="fc0"),
        Requantize((1, 3), (2, 4), np.array([0, 1]), 0, 3, Rounding.HALF_EVEN),
        Dense([[1, -1], [-1, 2]], [0, 1], name="fc1"),
        Requantize.pow2(1, -4, 3, Rounding.HALF_AWAY),
    ), name="hand-affine-even")
    prop2 = robustness_property(even, np.array([1, 3]), 1, radius=2, name="even-r2")
    return [("hand_range", hand, prop, "range"), ("hand_onehot", hand, prop, "onehot"),
            ("affine_even_range", even, prop2, "range"), ("affine_even_onehot", even, prop2, "onehot")]


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c[0])
def test_golden_lp(case):
    """The written program of hand-checkable instances equals the reviewed golden file byte for byte
    (regenerate with QVERIFY_REGEN_GOLDEN=1 after a deliberate encoding change, and review the diff)."""
    name, net, prop, encoding = case
    text = to_lp_string(encode(net, prop, encoding=encoding).program)
    path = GOLDEN / f"{name}.lp"
    if REGEN:
        path.write_text(text)
    assert path.read_text() == text


@given(net=tiny_networks(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_relaxable_variables_are_the_inputs_and_accumulators_and_executions_stay_solutions(net, seed):
    """The relaxed-input program drops the integrality of the inputs and accumulators only, so every execution
    (the pinned-input solution) still satisfies it."""
    rng = np.random.default_rng(seed)
    lo = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    hi = np.minimum(lo + rng.integers(0, 3, size=net.num_inputs), net.input_hi)
    enc = encode_network(net, lo, hi)
    assert {enc.program.vars[k].name[0] for k in enc.relaxable} <= {"x", "a"}
    assert sum(isinstance(v, LinExpr) for v in enc.inputs) == sum(enc.program.vars[k].name[0] == "x"
                                                                  for k in enc.relaxable)
    x = rng.integers(lo, hi + 1)
    _fix_inputs(enc, x)
    relaxed = enc.program.relaxed(enc.relaxable)
    assert relaxed.stats()["continuous"] == len(enc.relaxable)
    sol = CPSAT.solve(enc.program, ONE, 10)
    assert sol.status == "feasible" and not relaxed.check(sol.values)
    assert np.array_equal(enc.decode(sol.values, -1), execute(net, x[None])[-1].ravel())


# ---------------------------------------------------------------------------------------------- float32 neurons
@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(net=tiny_networks(float32=True), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=20, deadline=None)
def test_float32_fixed_input_every_layer_equals_the_executor(encoding, net, seed):
    """onnxruntime's float32 requantizations: the same (the range encoding falls back to their cut points)."""
    test_fixed_input_every_layer_equals_the_executor.hypothesis.inner_test(encoding, net, seed)


@pytest.mark.parametrize("encoding", ["range", "onehot"])
def test_float32_single_neuron_exhaustively_beyond_2_24(encoding):
    """One float32 neuron over accumulators around 2^25 (fl32(acc) rounds to multiples of 4 there) and at the issue's
    near-tie (acc 93843, exact 138.50001 -> 139, float32 138.5 -> 138): CP-SAT finds no input whose ``y`` differs
    from the executor's, and the rational requantization of the same multiplier differs from it."""


    m_tie = np.float32(138.5 / 93843)
    while Fraction(93843) * Fraction(float(m_tie)) <= Fraction(277, 2):
        m_tie = np.nextafter(m_tie, np.float32(1))
    # (m, w, b, z, (lo, hi)): acc = w x + b for x in 0..63
    cases = [(float(m_tie), 1000, 93843 - 40000, 0, (0, 255)),  # the near-tie at x = 40
             (float(np.float32(0.0137)), 16, 2**25 - 30, None, (-8, 7)),
             (float(np.float32(0.7)), 1, -(2**25) - 7, None, (0, 15))]
    for m, w, b, z, (lo, hi) in cases:
        z = -round(m * b) if z is None else z
        net = QNetwork((1,), 0, 63, (Dense([[w]], [b]), Requantize.float32([m], [z], lo, hi)))
        xs = np.arange(64)[:, None]
        table = execute(net, xs)[-1].ravel()
        exact = QNetwork((1,), 0, 63, (Dense([[w]], [b]), Requantize.affine([m], [z], lo, hi, "half_even")))
        if m == float(m_tie):
            assert table[40] == 138 and execute(exact, xs)[-1].ravel()[40] == 139
        enc = encode_network(net, np.array([0]), np.array([63]), None, encoding)
        assert encoding == "onehot" or enc.stats["range_fallback"] == 1
        y = enc.outputs[0]
        assert isinstance(y, LinExpr) and len(set(table.tolist())) > 2
        assert _no_input_differs(enc, y, table), (m, b, z)


def test_float32_cut_points_of_the_encoder():
    f = _RoundClamp(0, 1, 2, -8, 7, Rounding.HALF_EVEN, m32=float(np.float32(0.3)))
    for v in range(-7, 8):
        c = f.cut(v)
        assert f(c) >= v > f(c - 1)


def _no_input_differs(enc, y, table: np.ndarray) -> bool:
    """CP-SAT finds no input of the one-input program ``enc`` whose output ``y`` differs from the executor's table
    (an element constraint on the input)."""
    from ortools.sat.python import cp_model

    from qverify.solvers.cpsat import build_cpsat

    model, xv = build_cpsat(enc.program)
    (xi,) = enc.inputs[0].terms
    fx = model.new_int_var(int(table.min()), int(table.max()), "fx")
    model.add_element(xv[xi], [int(t) for t in table], fx)
    (yi,) = y.terms
    model.add(xv[yi] != fx)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    return solver.solve(model) == cp_model.INFEASIBLE
