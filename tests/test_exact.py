"""verify_milp: agreement with brute force for every back end and encoding, replayed counterexamples, the explicit
status mapping (timeouts and unreplayable solutions are never verdicts)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qverify.exact as exact
from qverify.encode import worst_case_bounds
from qverify.exact import verify_milp
from qverify.execute import forward, predict
from qverify.property import Property, robustness_property
from qverify.result import Reason, Verdict
from qverify.settings import SolverSettings
from qverify.solvers.base import SolveOutcome, SolveStatus
from tests.fixtures import (
    MNIST1000,
    P1_6,
    brute_force,
    graph_case,
    graph_cases,
    graph_knife_edge_case,
    networks_and_properties,
    tiny_fixed_point_mlp,
)


def _check(net, prop, res):
    robust, _ = brute_force(net, prop)
    assert res.verdict in (Verdict.ROBUST, Verdict.COUNTEREXAMPLE), (res.verdict, res.reason, res.details)
    assert (res.verdict is Verdict.ROBUST) == robust
    if res.verdict is Verdict.COUNTEREXAMPLE:
        cex = res.counterexample
        assert cex.confirmed and prop.contains(cex.x)[0]
        y = forward(net, cex.x[None, :])
        assert prop.is_violated(y)[0] and np.array_equal(y[0], cex.y)


@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(case=networks_and_properties(), split=st.booleans(), margin=st.booleans(), loose=st.booleans())
@settings(max_examples=30, deadline=None)
def test_cpsat_verdicts_equal_brute_force(encoding, case, split, margin, loose):
    net, prop = case
    bounds = worst_case_bounds(net) if loose else None
    res = verify_milp(net, prop, SolverSettings(encoding=encoding, threads=1), bounds=bounds, margin=margin,
                      split=split)
    _check(net, prop, res)
    assert res.method == f"milp-cpsat-{encoding}" and res.seconds >= 0


@pytest.mark.parametrize("backend", ["scip", "highs", "cbc"])
@given(case=networks_and_properties(), encoding=st.sampled_from(["range", "onehot"]), split=st.booleans())
@settings(max_examples=5, deadline=None)
def test_mip_verdicts_equal_brute_force(backend, case, encoding, split):
    net, prop = case
    res = verify_milp(net, prop, SolverSettings(backend=backend, encoding=encoding, threads=1), split=split)
    _check(net, prop, res)


@given(case=networks_and_properties(conv=True))
@settings(max_examples=10, deadline=None)
def test_conv_networks(case):
    net, prop = case
    _check(net, prop, verify_milp(net, prop, SolverSettings(threads=1), bounds=worst_case_bounds(net)))


def test_disjunction_of_multi_row_conjunctions():
    """A general unsafe region (two rows per disjunct), not a robustness query."""
    net = tiny_fixed_point_mlp()
    lo, hi = np.array([0, 0]), np.array([3, 3])
    ys = forward(net, np.array([[a, b] for a in range(4) for b in range(4)]))
    from qverify.property import Conjunction

    for t0 in range(-3, 4):
        for t1 in range(-2, 8):
            unsafe = (Conjunction(np.array([[1, 0], [0, -1]]), np.array([t0, -t1])),
                      Conjunction(np.array([[-1, 0], [0, 1]]), np.array([-t0 - 2, t1 - 3])))
            prop = Property(lo, hi, unsafe)
            res = verify_milp(net, prop, SolverSettings(threads=1))
            assert (res.verdict is Verdict.ROBUST) == (not prop.is_violated(ys).any())


# ------------------------------------------------------------------------------------------ status mapping
def _hand_case():
    net = tiny_fixed_point_mlp()
    x = np.array([1, 2])
    label = int(predict(net, x[None, :])[0])
    return net, robustness_property(net, x, label, radius=1)


def _fake_solve(status: SolveStatus, values=None, raw=None):
    def fake(program, settings, deadline=None, confirm_deadline=None):
        vals = values(program) if callable(values) else values
        return SolveOutcome(status, "fake", 0.01, f"FAKE_{status.value.upper()}", values=vals, raw_values=raw,
                            message="fake solver")
    return fake


@pytest.mark.parametrize("split", [False, True])
def test_a_solution_that_does_not_replay_is_unknown_never_a_verdict(monkeypatch, split):
    net, prop = _hand_case()
    robust, _ = brute_force(net, prop)
    assert robust  # so no solution can replay
    monkeypatch.setattr(exact, "solve", _fake_solve(SolveStatus.FEASIBLE, lambda p: [v.lo for v in p.vars],
                                                    raw=None))
    res = verify_milp(net, prop, SolverSettings(), bounds=worst_case_bounds(net), split=split)
    assert res.verdict is Verdict.UNKNOWN and res.reason == Reason.REPLAY_FAILED
    rep = res.details["replay_failure"]
    assert "note" in rep and "x" in rep and res.counterexample is not None and not res.counterexample.confirmed


@pytest.mark.parametrize("status,verdict,reason", [
    (SolveStatus.TIMEOUT, Verdict.UNKNOWN, Reason.TIMEOUT),
    (SolveStatus.UNKNOWN, Verdict.UNKNOWN, Reason.SOLVER),
    (SolveStatus.ERROR, Verdict.ERROR, None),
    (SolveStatus.INFEASIBLE, Verdict.ROBUST, None),
    (SolveStatus.UNCONFIRMED, Verdict.UNKNOWN, Reason.UNCONFIRMED),
])
def test_status_mapping(monkeypatch, status, verdict, reason):
    net, prop = _hand_case()
    monkeypatch.setattr(exact, "solve", _fake_solve(status))
    res = verify_milp(net, prop, SolverSettings(), bounds=worst_case_bounds(net), split=False)
    assert res.verdict is verdict
    if reason is not None:
        assert res.reason == reason
    assert res.vnncomp_status() != "unsat" or status is SolveStatus.INFEASIBLE


def test_real_timeout_is_unknown():
    net, prop = _hand_case()
    import time

    res = verify_milp(net, prop, SolverSettings(), bounds=worst_case_bounds(net), deadline=time.monotonic() - 1)
    assert res.verdict is Verdict.UNKNOWN and res.reason == Reason.TIMEOUT


def test_property_that_does_not_fit_is_an_error():
    net, _ = _hand_case()
    prop = robustness_property(tiny_fixed_point_mlp(), np.array([1, 2]), 0, radius=1)
    bad = Property(np.zeros(3, np.int64), np.ones(3, np.int64), prop.unsafe)
    assert verify_milp(net, bad).verdict is Verdict.ERROR


# ------------------------------------------------------------------------------------------ the real benchmark
@pytest.mark.skipif(not (P1_6.exists() and MNIST1000.exists()), reason="QVIP anchors not present")
def test_p1_6_known_instances():
    """QVIP Table 2: id 0 is robust at r=1; id 115 is non-robust at r=2 (QVIP 0.30 s)."""
    from qverify.io.h5 import load_qvip_h5
    from qverify.property import pixels_to_grid

    net = load_qvip_h5(P1_6)
    data = np.load(MNIST1000)
    xs = pixels_to_grid(net, data["images"])
    labels = data["labels"]
    r0 = verify_milp(net, robustness_property(net, xs[0], int(labels[0]), radius=1), SolverSettings(time_limit=30))
    assert r0.verdict is Verdict.ROBUST
    p = robustness_property(net, xs[115], int(labels[115]), radius=2)
    r1 = verify_milp(net, p, SolverSettings(time_limit=30))
    assert r1.verdict is Verdict.COUNTEREXAMPLE and r1.counterexample.confirmed
    assert np.max(np.abs(r1.counterexample.x - xs[115])) <= 2


@pytest.mark.parametrize("backend", ["scip", "highs"])
@given(case=networks_and_properties(), split=st.booleans())
@settings(max_examples=15, deadline=None)
def test_relaxed_program_verdicts_are_sound(backend, case, split):
    """The relaxed-input program: robust only when brute force says so, a counterexample only after replay,
    otherwise unknown (incomplete)."""
    net, prop = case
    robust, _ = brute_force(net, prop)
    res = verify_milp(net, prop, SolverSettings(backend=backend, threads=1), split=split, relax=True)
    assert res.verdict in (Verdict.ROBUST, Verdict.COUNTEREXAMPLE, Verdict.UNKNOWN), (res.verdict, res.details)
    if res.verdict is Verdict.ROBUST:
        assert robust
    elif res.verdict is Verdict.COUNTEREXAMPLE:
        _check(net, prop, res)
    else:
        assert res.reason in (Reason.INCOMPLETE, Reason.TIMEOUT)
    if "proved_disjuncts" in res.details and not robust:  # a proved disjunct holds nowhere on the box
        _, x = brute_force(net, prop)
        y = forward(net, x[None, :])[0]
        for j in res.details["proved_disjuncts"]:
            conj = prop.unsafe[j]
            assert not np.all(conj.A @ y <= conj.b)


def _odd_net():
    """One input x in 0..2: h1 = max(0, 2x - 1), h2 = max(0, 1 - 2x), y0 = 11 (h1 + h2) - 5, y1 = 0. On the grid
    h1 + h2 >= 1, so class 0 always wins; with a continuous x (x = 1/2) h1 = h2 = 0 and class 1 wins."""
    from qverify.network import Dense, QNetwork, Requantize

    return QNetwork((1,), 0, 2, (Dense([[2], [-2]], [-1, 1]), Requantize.pow2(0, 0, 15),
                                 Dense([[11, 11], [0, 0]], [-5, 0]), Requantize.pow2(0, -64, 63)))


def test_a_feasible_relaxation_is_never_robust_and_the_full_program_decides():
    net = _odd_net()
    prop = robustness_property(net, np.array([1]), 0, radius=1)
    assert brute_force(net, prop)[0]
    res = verify_milp(net, prop, SolverSettings(backend="scip", threads=1), relax=True)
    assert res.verdict is Verdict.UNKNOWN and res.reason == Reason.INCOMPLETE
    assert res.method == "milp-scip-range-relaxed" and res.details["disjunct_status"] == {"0": "relaxation-feasible"}
    assert verify_milp(net, prop, SolverSettings(threads=1)).verdict is Verdict.ROBUST


def test_relaxed_program_with_cpsat_is_an_error_and_excluded_disjuncts_are_skipped():
    net = _odd_net()
    prop = robustness_property(net, np.array([1]), 0, radius=1)
    assert verify_milp(net, prop, SolverSettings(threads=1), relax=True).verdict is Verdict.ERROR
    res = verify_milp(net, prop, SolverSettings(threads=1), exclude=[0])
    assert res.verdict is Verdict.ROBUST and res.details["excluded"] == [0] and res.details["live_disjuncts"] == 0


def test_one_program_for_the_live_disjuncts_leaves_the_excluded_ones_out():
    """On the single-program path (no split) an excluded disjunct is not encoded again: here disjunct 0 holds at
    x = 1 (y0 = 6) and disjunct 1 never does (y0 >= 6 > y1 = 0), so with disjunct 0 excluded the program is
    infeasible, and without the exclusion it is the counterexample."""
    from qverify.property import Conjunction

    net = _odd_net()
    prop = Property(np.array([0]), np.array([2]), (Conjunction([[1, 0]], [6]), Conjunction([[1, -1]], [0])))
    assert verify_milp(net, prop, SolverSettings(threads=1), split=False).verdict is Verdict.COUNTEREXAMPLE
    res = verify_milp(net, prop, SolverSettings(threads=1), split=False, exclude=[0])
    assert res.verdict is Verdict.ROBUST and res.details["live_disjuncts"] == 1


@pytest.mark.parametrize("split", [False, True])
def test_an_unconfirmed_claim_is_never_robust(monkeypatch, split):
    """A floating-point back end's 'infeasible' that the confirmer does not confirm: unknown / unconfirmed, on the
    single-program path and in the split rounds (where the claimed disjunct is retried by the confirmer)."""
    net, prop = _hand_case()
    monkeypatch.setattr(exact, "solve", _fake_solve(SolveStatus.UNCONFIRMED))
    res = verify_milp(net, prop, SolverSettings(backend="scip", time_limit=2.0), bounds=worst_case_bounds(net),
                      split=split)
    assert res.verdict is Verdict.UNKNOWN and res.reason == Reason.UNCONFIRMED
    assert res.vnncomp_status() != "unsat"


# ------------------------------------------------------------------------------------------ graph networks
@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(case=graph_cases(), split=st.booleans(), margin=st.booleans(), loose=st.booleans())
@settings(max_examples=20, deadline=None)
def test_graph_cpsat_verdicts_equal_brute_force(encoding, case, split, margin, loose):
    """Residual / pooling / depthwise / concat / step / movement graphs, boxes of up to 2000 points: the verdict is
    the enumerated truth and every counterexample replays."""
    net, prop = case
    bounds = worst_case_bounds(net) if loose else None
    res = verify_milp(net, prop, SolverSettings(encoding=encoding, threads=1), bounds=bounds, margin=margin,
                      split=split)
    _check(net, prop, res)


@given(case=graph_cases(), backend=st.sampled_from(["highs", "scip", "checked"]))
@settings(max_examples=8, deadline=None)
def test_graph_mip_verdicts_equal_brute_force(case, backend):
    net, prop = case
    _check(net, prop, verify_milp(net, prop, SolverSettings(backend=backend, threads=1)))


@given(case=graph_cases(), method=st.sampled_from(["milp", "portfolio", "bab"]))
@settings(max_examples=20, deadline=None)
def test_graph_verify_methods_equal_brute_force(case, method):
    """``qverify.verify.verify`` end to end (``--method milp``, the portfolio, branch and bound) on graphs."""
    from qverify.settings import VerifySettings
    from qverify.verify import verify

    net, prop = case
    s = VerifySettings(method=method, timeout=30.0, solver=SolverSettings(threads=1, time_limit=30.0))
    _check(net, prop, verify(net, prop, s))


def test_replay_report_names_the_first_differing_value_of_a_graph():
    """The mismatch report walks the graph's values (value index = node index + 1): the execution of a pinned
    input, solved by CP-SAT, with one output neuron's variable moved, differs first at the last value."""
    from qverify.encode import LinExpr
    from qverify.solvers.cpsat import CpSatBackend

    net, prop = graph_case(np.random.default_rng(5), ("residual",))
    x = prop.lo.copy()
    enc = exact.encode_network(net, np.full(net.num_inputs, net.input_lo), np.full(net.num_inputs, net.input_hi),
                               worst_case_bounds(net))
    for j, v in enumerate(enc.inputs):
        if isinstance(v, LinExpr):
            enc.program.add_con(v, int(x[j]), int(x[j]))
    values = list(CpSatBackend().solve(enc.program, SolverSettings(threads=1), 10).values)
    last = len(enc.layer_values) - 1
    k = next(j for j, v in enumerate(enc.layer_values[last]) if isinstance(v, LinExpr))
    values[next(iter(enc.layer_values[last][k].terms))] += 1
    rep = exact.replay_report(net, enc, values, x, "test")
    assert rep["first_mismatch"]["layer_index"] == last and rep["first_mismatch"]["neuron"] == k


@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(seed=st.integers(0, 2**32 - 1), split=st.booleans())
@settings(max_examples=15, deadline=None)
def test_graph_knife_edges_are_decided_exactly(encoding, seed, split):
    """Zero-margin graph instances (the bounds rarely decide them, the solver must): the edge property is violated
    exactly at the minimizers of its row, the tight one is robust with no slack."""
    net, edge, tight = graph_knife_edge_case(np.random.default_rng(seed))
    for prop in (edge, tight):
        _check(net, prop, verify_milp(net, prop, SolverSettings(encoding=encoding, threads=1), split=split))
