"""The integer program on graph networks: every value of random residual / pooling / depthwise / concat / step /
movement graphs equals the executor's with the input pinned (and no other value is feasible), the step and
max-pool encodings are exact on every input of a box, the rule tables cover every op, and every verdict path
agrees with enumeration on graph knife-edge properties.

The graph cases (:func:`tests.fixtures.graph_case`, :func:`tests.fixtures.graph_knife_edge_case`) are shared with
the other test files through ``tests/fixtures.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify import graph
from qverify.encode import LinExpr, box_bounds, encode_network, worst_case_bounds
from qverify.encode._bounds import OWN_INTERVAL, _own_interval
from qverify.encode.network import ENCODE
from qverify.execute import execute
from qverify.network import Concat, Conv2d, Dense, Flatten, Lookup, MaxPool2d, Pad, QNetwork, Requantize, Step
from qverify.settings import SolverSettings
from qverify.solvers.cpsat import CpSatBackend
from tests.fixtures import (
    GRAPH_BLOCKS,
    VERDICT_PATHS,
    brute_force,
    graph_knife_edge_case,
    judge,
    random_graph_network,
)

CPSAT = CpSatBackend()
ONE = SolverSettings(threads=1)


def _pin(enc, x) -> None:
    for j, v in enumerate(enc.inputs):
        if isinstance(v, LinExpr):
            enc.program.add_con(v, int(x[j]), int(x[j]), name=f"fix{j}")


def _full_box(net: QNetwork) -> tuple[np.ndarray, np.ndarray]:
    return np.full(net.num_inputs, net.input_lo), np.full(net.num_inputs, net.input_hi)


# ------------------------------------------------------------------------------------------ rule tables
def test_every_op_has_an_encoder_and_a_fallback_interval_rule():
    """Every op type of :data:`qverify.ops.ALL_OPS` has an encoder rule and a fallback interval rule."""
    assert graph.missing_rules(ENCODE) == []
    assert graph.missing_rules(OWN_INTERVAL) == []


# ------------------------------------------------------------------------------------------ fixed input
def _fixed_input_check(net: QNetwork, x: np.ndarray, encoding: str) -> dict:
    """Worst-case bounds (every neuron the ops can leave open is encoded), input pinned by rows: the solver's values
    of every value of the graph equal the executor's, and "some neuron differs" is infeasible. Returns the stats."""
    enc = encode_network(net, *_full_box(net), worst_case_bounds(net), encoding)
    _pin(enc, x)
    out = CPSAT.solve(enc.program, ONE, 20)
    assert out.status == "feasible"
    ex = execute(net, x[None, :])
    assert len(enc.layer_values) == len(ex) == len(net.layers) + 1
    for i in range(len(ex)):
        assert np.array_equal(enc.decode(out.values, i), ex[i].ravel()), f"value index {i}"
    rows = []
    for i in range(1, len(ex)):
        for j, v in enumerate(enc.layer_values[i]):
            if isinstance(v, LinExpr):
                w = int(ex[i].ravel()[j])
                rows += [[(v, w - 1)], [(-v, -w - 1)]]
    if rows:
        enc.program.add_disjunction(rows, "differs")
        assert CPSAT.solve(enc.program, ONE, 20).status == "infeasible"
    return enc.stats


@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=25, deadline=None)
def test_fixed_input_every_value_of_a_graph_equals_the_executor(encoding, seed):
    rng = np.random.default_rng(seed)
    net = random_graph_network(rng)
    x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    _fixed_input_check(net, x, encoding)


@pytest.mark.parametrize("block", GRAPH_BLOCKS)
def test_fixed_input_per_block(block):
    """Each block kind alone (two of them per network, eight networks): exact, and the ops that need binaries got
    them somewhere (max pooling, steps), so the test is not passing on constants."""
    stats = {"maxpool_binaries": 0, "step_binaries": 0, "lookup_binaries": 0}
    for s in range(8):
        rng = np.random.default_rng(100 * GRAPH_BLOCKS.index(block) + s)
        net = random_graph_network(rng, (block,))
        x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
        st_ = _fixed_input_check(net, x, ("range", "onehot")[s % 2])
        for k in stats:
            stats[k] += st_[k]
    if block == "maxpool":
        assert stats["maxpool_binaries"] > 0
    if block == "step":
        assert stats["step_binaries"] > 0
    if block == "lookup":
        assert stats["lookup_binaries"] > 0


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=20, deadline=None)
def test_a_point_box_of_a_graph_needs_no_variables(seed):
    rng = np.random.default_rng(seed)
    net = random_graph_network(rng)
    x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    enc = encode_network(net, x, x)
    assert not enc.program.vars and not enc.program.cons
    for i, v in enumerate(execute(net, x[None, :])):
        assert np.array_equal(enc.decode([], i), v.ravel())


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=25, deadline=None)
def test_box_bounds_of_a_graph_contain_every_execution_and_equal_the_fallback(seed):
    rng = np.random.default_rng(seed)
    net = random_graph_network(rng)
    a = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    b = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    bounds, own = box_bounds(net, lo, hi), _own_interval(net, lo, hi)
    xs = rng.integers(lo, hi + 1, size=(64, net.num_inputs))
    for i, vals in enumerate(execute(net, xs)):
        flat = vals.reshape(len(xs), -1)
        assert np.all(flat >= bounds[i][0]) and np.all(flat <= bounds[i][1])
        assert np.array_equal(bounds[i][0], own[i][0]) and np.array_equal(bounds[i][1], own[i][1])


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=15, deadline=None)
def test_graph_relaxable_variables_are_inputs_and_accumulators_and_executions_stay_solutions(seed):
    rng = np.random.default_rng(seed)
    net = random_graph_network(rng)
    lo = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    hi = np.minimum(lo + rng.integers(0, 3, size=net.num_inputs), net.input_hi)
    enc = encode_network(net, lo, hi)
    assert {enc.program.vars[k].name[0] for k in enc.relaxable} <= {"x", "a"}
    x = rng.integers(lo, hi + 1)
    _pin(enc, x)
    sol = CPSAT.solve(enc.program, ONE, 10)
    assert sol.status == "feasible" and not enc.program.relaxed(enc.relaxable).check(sol.values)
    assert np.array_equal(enc.decode(sol.values, -1), execute(net, x[None])[-1].ravel())


def test_a_shared_value_is_materialized_once():
    """A value read by two linear maps (the two branches of a concat) gets one set of variables."""
    w = np.array([[1, -2], [3, 1]])
    layers = (Dense(w, [0, 1]), Dense(w, [1, 0]), Dense(-w, [2, 2]), Concat(0, 2), Requantize.pow2(1, -8, 7))
    net = QNetwork((2,), 0, 7, layers, inputs=((0,), (1,), (1,), (2, 3), (4,)))
    enc = encode_network(net, np.zeros(2, np.int64), np.full(2, 7))
    names = [v.name for v in enc.program.vars]
    assert sum(n.startswith("m1_") for n in names) == 2 and not any(n.startswith("m2_") for n in names)
    for x in ([0, 0], [7, 3], [2, 6]):
        e = encode_network(net, np.zeros(2, np.int64), np.full(2, 7))
        _pin(e, x)
        out = CPSAT.solve(e.program, ONE, 10)
        assert np.array_equal(e.decode(out.values, -1), execute(net, np.array([x]))[-1].ravel())


# ------------------------------------------------------------------------------------------ exhaustive ops
def _no_input_differs(enc, table_fn) -> bool:
    """CP-SAT finds no input of the box whose encoded outputs differ from ``table_fn(model, xvars)`` (the exact
    function written with CP-SAT's own element / max constraints)."""
    from ortools.sat.python import cp_model

    from qverify.solvers.cpsat import build_cpsat

    model, xv = build_cpsat(enc.program)
    inputs = [xv[next(iter(v.terms))] if isinstance(v, LinExpr) else int(v) for v in enc.inputs]
    want = table_fn(model, inputs)
    diffs = []
    for k, (y, f) in enumerate(zip(enc.outputs, want, strict=True)):
        ye = (sum(c * xv[i] for i, c in y.terms.items()) + y.const) if isinstance(y, LinExpr) else int(y)
        b = model.new_bool_var(f"diff{k}")
        model.add(ye != f).only_enforce_if(b)
        diffs.append(b)
    model.add_bool_or(diffs)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    return solver.solve(model) == cp_model.INFEASIBLE


@pytest.mark.parametrize("cuts,levels", [
    ([[0, 1]], (-1, 0, 1)),                    # ONNX Sign
    ([[-3], [2]], (-1, 1)),                    # per-channel binarizing thresholds
    ([[-5, -1, 0, 4, 9]], (0, 1, 1, 3, 7, 8)),  # a staircase with a flat step
    ([[-40, 40]], (2, 3, 5)),                  # cut points outside every accumulator: a constant
])
def test_step_is_exact_on_every_input(cuts, levels):
    """``Dense -> Step`` over a whole input box: no input whose encoded output differs from the step function of the
    accumulator (CP-SAT's element constraint on the exact table)."""
    w = np.array([[3, -2], [-1, 2]])
    b = np.array([-4, 1])
    net = QNetwork((2,), 0, 7, (Dense(w, b), Step(np.array(cuts), levels)))
    enc = encode_network(net, np.zeros(2, np.int64), np.full(2, 7))
    grid = np.array([[i, j] for i in range(8) for j in range(8)])
    table = execute(net, grid)[-1]  # [64, 2]

    def fn(model, xs):
        out = []
        for c in range(2):
            idx = model.new_int_var(0, 63, f"idx{c}")
            model.add(idx == 8 * xs[0] + xs[1])
            f = model.new_int_var(int(table[:, c].min()), int(table[:, c].max()), f"f{c}")
            model.add_element(idx, [int(t) for t in table[:, c]], f)
            out.append(f)
        return out

    assert _no_input_differs(enc, fn)
    if cuts == [[-40, 40]]:
        assert enc.stats["step_binaries"] == 0 and not any(isinstance(v, LinExpr) for v in enc.outputs)
    else:
        assert enc.stats["step_binaries"] > 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_lookup_is_exact_on_every_input(per_channel):
    """``Dense -> Lookup`` with non-monotone tables (runs of equal values, isolated spikes): no input of the box whose
    encoded output differs from the table of the accumulator (CP-SAT's element constraint)."""
    rng = np.random.default_rng(11)
    w = np.array([[3, -2], [-1, 2]])
    b = np.array([-4, 1])
    # accumulators lie in [-18, 21]; the table covers the worst-case range [-39, 39] that validation asks for
    table = rng.integers(-3, 4, size=(2 if per_channel else 1, 79))
    table[:, 25:32] = 2  # a long run: one binary for all of it
    net = QNetwork((2,), 0, 7, (Dense(w, b), Lookup(-39, table)))
    enc = encode_network(net, np.zeros(2, np.int64), np.full(2, 7))
    grid = np.array([[i, j] for i in range(8) for j in range(8)])
    want = execute(net, grid)[-1]

    def fn(model, xs):
        out = []
        for c in range(2):
            idx = model.new_int_var(0, 63, f"idx{c}")
            model.add(idx == 8 * xs[0] + xs[1])
            f = model.new_int_var(int(want[:, c].min()), int(want[:, c].max()), f"f{c}")
            model.add_element(idx, [int(t) for t in want[:, c]], f)
            out.append(f)
        return out

    assert _no_input_differs(enc, fn)
    assert 0 < enc.stats["lookup_binaries"] < 2 * 40


@pytest.mark.parametrize("kernel,stride,padding", [((2, 2), (1, 1), (0, 0, 0, 0)), ((2, 2), (2, 2), (1, 1, 0, 0)),
                                                   ((3, 3), (1, 1), (1, 1, 1, 1)), ((1, 2), (1, 1), (0, 0, 0, 1))])
def test_max_pool_is_exact_on_every_input(kernel, stride, padding):
    """Max pooling of the input (overlapping, strided, padded windows): no input of the box whose encoded outputs
    differ from CP-SAT's own max of the window."""
    pool = MaxPool2d(kernel, stride, padding)
    net = QNetwork((1, 3, 3), 0, 3, (pool, Flatten()))
    lo = np.array([0, 1, 0, 2, 0, 0, 3, 0, 1])
    hi = np.array([3, 2, 3, 3, 1, 3, 3, 0, 2])
    enc = encode_network(net, lo, hi)
    cells = pool.window_indices((1, 3, 3)).reshape(-1, kernel[0] * kernel[1])

    def fn(model, xs):
        out = []
        for r, row in enumerate(cells.tolist()):
            m = model.new_int_var(0, 3, f"max{r}")
            model.add_max_equality(m, [xs[c] for c in row if c >= 0])
            out.append(m)
        return out

    assert _no_input_differs(enc, fn)
    assert enc.stats["maxpool_binaries"] > 0


def test_max_pool_drops_cells_that_cannot_win_and_a_dominating_cell_is_the_identity():
    pool = MaxPool2d((1, 3))
    net = QNetwork((1, 2, 3), 0, 9, (pool, Flatten()))
    # window 0: cell 0 in [0, 1] is below cell 1's lower bound 2 (dropped), cells 1, 2 compete
    # window 1: cell 3 in [8, 9] dominates [0, 3] and [5, 8]
    lo = np.array([0, 2, 1, 8, 0, 5])
    hi = np.array([1, 5, 6, 9, 3, 8])
    enc = encode_network(net, lo, hi)
    assert enc.stats["maxpool_binaries"] == 2 and enc.stats["identity_pools"] == 1
    assert enc.outputs[1] is enc.inputs[3]


def test_pad_cells_are_constants_and_movement_adds_no_variables():
    net = QNetwork((1, 2, 2), 0, 3, (Pad((0, 1, 0, 0, 0, 1), 5), Flatten()))
    enc = encode_network(net, np.zeros(4, np.int64), np.full(4, 3))
    assert len(enc.program.vars) == 4 and not enc.program.cons
    # one row of 5s above, one column of 5s on the right: [1, 3, 3]
    assert [v if isinstance(v, int) else "x" for v in enc.outputs] == [5, 5, 5, "x", "x", 5, "x", "x", 5]
    assert enc.outputs[3] is enc.inputs[0] and enc.outputs[7] is enc.inputs[3]


def test_grouped_convolution_rows_are_the_executor():
    """Depthwise (groups = channels) and grouped convolutions with padding by a zero point: the encoded accumulators
    of random points equal the executor (a direct check of the matrices the encoder reads)."""
    rng = np.random.default_rng(7)
    for groups, out_c in ((2, 2), (2, 4), (1, 3)):
        conv = Conv2d(rng.integers(-3, 4, size=(out_c, 2 // groups, 3, 3)), rng.integers(-4, 5, size=out_c),
                      (1, 1), (1, 1, 1, 1), pad_value=2, groups=groups)
        net = QNetwork((2, 3, 3), 0, 3, (conv, Flatten()))
        for _ in range(5):
            x = rng.integers(0, 4, size=18)
            enc = encode_network(net, np.zeros(18, np.int64), np.full(18, 3))
            _pin(enc, x)
            out = CPSAT.solve(enc.program, ONE, 10)
            assert np.array_equal(enc.decode(out.values, 1), execute(net, x[None])[1].ravel())


# ------------------------------------------------------------------------------------------ every verdict path
GRAPH_PATHS = ("milp-cpsat-range", "milp-cpsat-onehot", "milp-highs-range", "milp-checked-range",
               "relaxed-scip", "portfolio", "bab", "attack", "interval", "symbolic")


@pytest.mark.parametrize("seed", range(4))
def test_graph_knife_edge_every_verdict_path(seed):
    """Knife-edge properties on graphs (violated only at the minimizers of an output row, or robust with zero
    margin): no verdict path is ever wrong, and CP-SAT, the portfolio and branch and bound decide (the other
    complete back ends may time out within their 4 s)."""
    net, edge, tight = graph_knife_edge_case(np.random.default_rng(seed))
    for prop, robust in ((edge, False), (tight, True)):
        assert brute_force(net, prop)[0] is robust
        for name in GRAPH_PATHS:
            must = name.startswith("milp-cpsat") or name in ("portfolio", "bab")
            res = VERDICT_PATHS[name](net, prop, 10.0 if must else 4.0)
            verdict = judge(net, prop, res, robust)
            assert verdict != "wrong", (name, robust, res.verdict, res.reason)
            if must:
                assert verdict == "ok", (name, robust, res.verdict, res.reason)
