"""Set-valued networks (:class:`qverify.ops.Uncertain`, the float32 bands of binarized networks): every analysis
covers every member of the set, and no verdict rests on the nominal member alone.

The oracle is :func:`tests.fixtures.set_members` / :func:`tests.fixtures.set_brute_force`: every input of the box
and every choice of every band's deviation, enumerated.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qverify.bab import bab
from qverify.bounds.interval import interval_bounds
from qverify.bounds.symbolic import symbolic_analysis
from qverify.encode import encode_network
from qverify.exact import verify_milp
from qverify.execute import forward
from qverify.io.native import load_native, save_native
from qverify.network import Dense, ModelError, QNetwork, Requantize, Step, Uncertain
from qverify.property import Property, robustness_property
from qverify.replay import RUNTIMES, RuntimeReplay, register_runtime, replay
from qverify.result import Reason, Verdict
from qverify.settings import SolverSettings, VerifySettings
from qverify.solvers.cpsat import build_cpsat
from qverify.verify import verify
from tests.fixtures import (
    GRAPH_BLOCKS,
    SET_BLOCKS,
    all_box_points,
    random_graph_network,
    set_brute_force,
    set_members,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def set_case(seed: int, max_points: int = 300) -> tuple[QNetwork, Property]:
    """A random graph with a band block last, and a robustness property of radius 1 on a few pixels."""
    rng = np.random.default_rng(seed)
    blocks = [GRAPH_BLOCKS[int(rng.integers(0, len(GRAPH_BLOCKS)))]] if rng.integers(0, 2) else []
    net = random_graph_network(rng, blocks + list(SET_BLOCKS) if blocks else list(SET_BLOCKS),
                               n_blocks=1, in_shape=(1, 3, 3))
    if not net.set_valued:  # the drawn block was the other one: add the band block
        net = random_graph_network(np.random.default_rng(seed), list(SET_BLOCKS), n_blocks=1, in_shape=(1, 3, 3))
    x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    label = int(np.argmax(forward(net, x[None])[0])) if rng.integers(0, 2) else int(rng.integers(0, net.num_outputs))
    lo, hi = x.copy(), x.copy()
    dims = rng.choice(net.num_inputs, size=int(rng.integers(1, 5)), replace=False)
    lo[dims] = np.maximum(x[dims] - 1, net.input_lo)
    hi[dims] = np.minimum(x[dims] + 1, net.input_hi)
    base = robustness_property(net, x, label, radius=0)
    return net, Property(lo, hi, base.unsafe, name="set-case")


def test_op_validation_and_shapes() -> None:
    with pytest.raises(ModelError, match="delta must be >= 0"):
        Uncertain(np.array([1, -1]))
    with pytest.raises(ModelError, match="delta values for 3 channels"):
        Uncertain(np.array([1, 2])).output_shape((3, 2, 2))
    op = Uncertain(np.array([0, 2]))
    assert op.output_shape((2, 3)) == (2, 3)
    assert op.deltas((2, 3)).tolist() == [[0, 0, 0], [2, 2, 2]]
    assert "set-valued" in op.summary()


def test_network_range_and_flag() -> None:
    net = QNetwork((2,), 0, 3, (Dense(np.eye(2, dtype=np.int64), np.zeros(2, np.int64)), Uncertain(np.array([2]))))
    assert net.set_valued
    assert net.value_ranges[-1] == (-5, 5)  # a linear map's range is symmetric, widened by the band
    members = set_members(net, np.array([[1, 3]]))
    assert members.shape == (1, 25, 2)
    assert members[0, :, 0].min() == -1 and members[0, :, 1].max() == 5


@pytest.mark.parametrize("seed", range(12))
def test_bounds_contain_every_member(seed: int) -> None:
    net, prop = set_case(seed)
    pts = all_box_points(prop)
    members = set_members(net, pts)
    ivb = interval_bounds(net, prop.lo[None], prop.hi[None])
    lo, hi = ivb[-1][0].reshape(-1), ivb[-1][1].reshape(-1)
    assert np.all(members.min(axis=(0, 1)) >= lo) and np.all(members.max(axis=(0, 1)) <= hi)
    ana = symbolic_analysis(net, prop.lo, prop.hi)
    out_lo, out_hi = ana.bounds[-1]
    assert np.all(members.min(axis=(0, 1)) >= out_lo[0]) and np.all(members.max(axis=(0, 1)) <= out_hi[0])
    rows = np.eye(net.num_outputs, dtype=np.int64) - np.roll(np.eye(net.num_outputs, dtype=np.int64), 1, 1)
    flat = members.reshape(-1, members.shape[-1])
    assert np.all((flat @ rows.T).min(axis=0) >= ana.row_lower_bounds(rows)[0])


@pytest.mark.parametrize("seed", range(6))
def test_encoding_at_a_fixed_input_admits_exactly_the_members(seed: int) -> None:
    """With the input fixed, the program's feasible outputs are the set's members (CP-SAT enumerates them)."""
    from ortools.sat.python import cp_model

    net, prop = set_case(seed)
    x = all_box_points(prop)[0]
    enc = encode_network(net, x, x)
    m, vs = build_cpsat(enc.program)
    ys = [sum(coef * vs[k] for k, coef in o.terms.items()) + o.const if hasattr(o, "terms") else int(o)
          for o in enc.layer_values[-1]]
    got: set[tuple[int, ...]] = set()

    class Collect(cp_model.CpSolverSolutionCallback):
        def on_solution_callback(self) -> None:
            got.add(tuple(y if isinstance(y, int) else int(self.Value(y)) for y in ys))

    solver = cp_model.CpSolver()
    solver.parameters.enumerate_all_solutions = True
    solver.parameters.num_workers = 1
    solver.Solve(m, Collect())
    want = {tuple(int(v) for v in row) for row in set_members(net, x[None])[0]}
    assert got == want


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), method=st.sampled_from(["milp", "portfolio", "bab", "symbolic"]))
def test_no_verdict_rests_on_the_nominal_member(seed: int, method: str) -> None:
    """``robust`` only when every member is robust; no ``counterexample`` without a runtime to confirm it."""
    net, prop = set_case(seed)
    robust, _ = set_brute_force(net, prop)
    if method == "milp":
        r = verify_milp(net, prop, SolverSettings(time_limit=20))
    elif method == "bab":
        r = bab(net, prop)
    else:
        r = verify(net, prop, VerifySettings(timeout=20, method=method))
    assert r.verdict in (Verdict.ROBUST, Verdict.UNKNOWN), (r.verdict, r.reason)
    if r.verdict is Verdict.ROBUST:
        assert robust, f"{method}: robust, but some member of the set violates"


def test_bab_leaves_an_open_point_unknown() -> None:
    """A single point whose band straddles the decision: the nominal member is safe, another member is not."""
    # y0 = x (band +-1), y1 = 1: nominal x = 2 is robust for class 0 (2 > 1), x - 1 = 1 ties (first index wins:
    # still class 0), so use a band of 2: x - 2 = 0 < 1 violates
    net = QNetwork((1,), 2, 2, (Dense(np.array([[1], [0]]), np.array([0, 1])), Uncertain(np.array([2, 0]))))
    prop = robustness_property(net, np.array([2]), 0, radius=0)
    assert not set_brute_force(net, prop)[0]
    r = bab(net, prop)
    assert r.verdict is Verdict.UNKNOWN and r.reason == Reason.SET_VALUED
    assert verify_milp(net, prop, SolverSettings(time_limit=10)).verdict is Verdict.UNKNOWN


def test_replay_needs_the_runtime() -> None:
    net = QNetwork((1,), 0, 3, (Dense(np.array([[1], [0]]), np.array([0, 2])), Uncertain(np.array([1])),
                                Requantize.pow2(0, -8, 7)), metadata={"format": "test-set-runtime"})
    prop = robustness_property(net, np.array([0]), 0, radius=0)  # nominal y = (0, 2): violated
    ce = replay(net, prop, np.array([0]))
    assert not ce.confirmed and "no runtime" in ce.note
    try:
        register_runtime("test-set-runtime", RuntimeReplay("fake-runtime", lambda n: True,
                                                           lambda n, x: forward(n, x) + np.array([3, 0]),
                                                           lambda n: ""))
        ce = replay(net, prop, np.array([0]))  # the runtime's outputs (3, 2): not violated
        assert not ce.confirmed and "does not violate" in ce.note
        RUNTIMES["test-set-runtime"] = RuntimeReplay("fake-runtime", lambda n: True, lambda n, x: forward(n, x),
                                                     lambda n: "")
        ce = replay(net, prop, np.array([0]))
        assert ce.confirmed and ce.onnx_confirmed and "confirmed on fake-runtime" in ce.note
    finally:
        RUNTIMES.pop("test-set-runtime", None)


def test_qnn_round_trip(tmp_path) -> None:
    net, _ = set_case(3)
    p = tmp_path / "set.qnn"
    save_native(net, p)
    back = load_native(p)
    assert back.set_valued
    x = np.random.default_rng(0).integers(0, 4, size=(20, net.num_inputs))
    assert np.array_equal(set_members(back, x), set_members(net, x))


def test_step_after_band_matches_a_real_deviation() -> None:
    """The integer band covers a real deviation ``|w - x| <= D`` before a threshold at a real ``t``
    (``d = ceil(D)``): every side of ``t`` that some ``w`` reaches is reached by some member."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        t = float(rng.uniform(-5, 5))
        D = float(rng.uniform(0, 2))
        d = int(np.ceil(D))
        cut = int(np.ceil(t))
        step = Step(np.array([[cut]]), (-1, 1))
        for x in range(-8, 9):
            ws = np.linspace(x - D, x + D, 41)
            runtime = {1 if w >= t else -1 for w in ws}
            members = set(step.levels[int(x + e >= cut)] for e in range(-d, d + 1))
            assert runtime <= members
