"""Optimized (alpha-CROWN style) bounds: exact validity of the lines for any float slope, soundness of every value's
bounds and of the margin bound against the executor (sampled and exhaustive), never looser than the symbolic
bounds, strictly tighter (and a proof) on a hand-checked network, and the portfolio stage."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.bounds.optimized import optimized_bounds, supports
from qverify.bounds.symbolic import ActParams, exact_lines, relax, symbolic_analysis
from qverify.execute import execute, predict
from qverify.network import Conv2d, Dense, Flatten, QNetwork, Requantize
from qverify.property import robustness_property
from qverify.quant import Rounding
from tests.fixtures import all_box_points, brute_force, least_slack, networks_and_properties, roundings


def _hand_net() -> QNetwork:
    """3 inputs in [0, 7], hidden layers of 4 and 3 (affine requantizations 4/15 and 2/13, half up), 3 outputs."""
    return QNetwork((3,), 0, 7, (
        Dense(np.array([[3, -4, -3], [-2, -3, 3], [3, 1, -4], [-4, -2, -1]]), np.array([3, -1, -6, -9])),
        Requantize((4,), (15,), np.array([0]), 0, 7, Rounding.HALF_UP),
        Dense(np.array([[-3, 0, -1, 3], [0, -1, -1, 1], [1, -3, 2, 2]]), np.array([11, 7, -5])),
        Requantize((2,), (13,), np.array([1]), 0, 7, Rounding.HALF_UP),
        Dense(np.array([[2, 3, -2], [4, -4, -4], [4, 4, -2]]), np.array([-9, -5, -11])),
        Requantize((10,), (27,), np.array([-7]), -8, 7, Rounding.HALF_UP)), name="hand")


def _assert_sound(net: QNetwork, prop, ob) -> None:
    pts = all_box_points(prop)
    vals = execute(net, pts)
    for k, ((lo, hi), v) in enumerate(zip(ob.bounds, vals, strict=True)):
        v = np.asarray(v).reshape(len(pts), -1)
        assert np.all(v >= lo[None]) and np.all(v <= hi[None]), f"value {k} escapes its optimized bounds"
    assert ob.slack_lower <= least_slack(net, prop)


# ----------------------------------------------------------------------------------------------- lines
@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(2, 40), st.integers(-3, 3), roundings, st.integers(-60, 20),
       st.integers(1, 90), st.lists(st.floats(0.0, 3.0), min_size=2, max_size=2))
def test_exact_lines_are_valid_for_any_slope(p: int, q: int, z: int, mode: Rounding, lo: int, width: int,
                                              mult: list[float]) -> None:
    layer = Requantize((p,), (q,), np.array([z]), -4, 5, mode)
    params = ActParams.of(layer, (1,))
    l, u = np.array([[lo]]), np.array([[lo + width]])
    vert: dict = {}
    relax(params, l, u, vertices=vert)
    if not vert or not len(vert["ji"]):
        return
    s = p / q
    aL, bL, aU, bU = exact_lines(vert["XL"], vert["VL"], vert["XU"], vert["VU"], vert["q"],
                                 np.array([mult[0] * s]), np.array([mult[1] * s]))
    a = np.arange(lo, lo + width + 1)
    f = params.apply(a[:, None])[:, 0]
    for x, y in zip(a.tolist(), f.tolist(), strict=True):
        assert Fraction(aL[0]) * x + Fraction(bL[0]) <= y <= Fraction(aU[0]) * x + Fraction(bU[0])


# ----------------------------------------------------------------------------------------------- soundness
@settings(max_examples=60, deadline=None)
@given(networks_and_properties(conv=False, max_points=3000))
def test_optimized_bounds_are_sound_and_never_looser(case: tuple) -> None:
    net, prop = case
    assert supports(net)
    ana = symbolic_analysis(net, prop.lo[None], prop.hi[None])
    ob = optimized_bounds(net, prop.lo, prop.hi, prop, ana=ana, steps=15)
    _assert_sound(net, prop, ob)  # exhaustive over the box
    for (lo, hi), (sl, sh) in zip(ob.bounds, ana.bounds, strict=True):
        assert np.all(lo >= sl.ravel()) and np.all(hi <= sh.ravel())
    assert ob.slack_lower >= int(ana.slack_lower_bounds(prop)[0]) == ob.symbolic_lower


@settings(max_examples=25, deadline=None)
@given(networks_and_properties(conv=False, max_points=3000, float32=True))
def test_optimized_bounds_are_sound_on_float32_requantizations(case: tuple) -> None:
    net, prop = case
    _assert_sound(net, prop, optimized_bounds(net, prop.lo, prop.hi, prop, steps=15))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_optimized_bounds_hold_on_sampled_points_of_wider_boxes(seed: int) -> None:
    """Boxes too large to enumerate (8 inputs, radius 3): random points and the corners stay inside."""
    from tests.fixtures import random_dense_network

    rng = np.random.default_rng(seed)
    net = random_dense_network(rng, n_in=8, hidden=(6, 5), affine=bool(seed % 2), wmax=6)
    x = rng.integers(0, 8, size=8)
    prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=3)
    ob = optimized_bounds(net, prop.lo, prop.hi, prop, steps=20)
    pts = np.concatenate([rng.integers(prop.lo, prop.hi + 1, size=(3000, 8)),
                          np.where(rng.random((500, 8)) < 0.5, prop.lo, prop.hi)])
    for (lo, hi), v in zip(ob.bounds, execute(net, pts), strict=True):
        v = np.asarray(v).reshape(len(pts), -1)
        assert np.all(v >= lo[None]) and np.all(v <= hi[None])
    assert ob.slack_lower <= int(prop.slack(execute(net, pts)[-1]).min())


# ----------------------------------------------------------------------------------------------- tightness
def test_optimized_bounds_prove_what_symbolic_bounds_do_not() -> None:
    """Hand-checked: on this box the least slack is 1 (enumerated: robust); DeepPoly's slopes give the margin lower
    bound 0 (no proof), the optimized slopes 1 (a proof), and some hidden bounds get strictly tighter."""
    net = _hand_net()
    x = np.array([1, 3, 1])
    prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=2)
    assert least_slack(net, prop) == 1 and brute_force(net, prop)[0]
    ana = symbolic_analysis(net, prop.lo[None], prop.hi[None])
    assert int(ana.slack_lower_bounds(prop)[0]) == 0
    ob = optimized_bounds(net, prop.lo, prop.hi, prop, ana=ana)
    assert ob.slack_lower == 1
    tighter = [k for k, ((lo, hi), (sl, sh)) in enumerate(zip(ob.bounds, ana.bounds, strict=True))
               if np.any(lo > sl.ravel()) or np.any(hi < sh.ravel())]
    assert tighter  # the second hidden layer's accumulator bounds (value 3) and what follows
    _assert_sound(net, prop, ob)


def test_deadline_in_the_past_keeps_sound_bounds() -> None:
    import time

    net = _hand_net()
    x = np.array([1, 3, 1])
    prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=2)
    ob = optimized_bounds(net, prop.lo, prop.hi, prop, deadline=time.monotonic() - 1)
    assert not ob.complete
    _assert_sound(net, prop, ob)


def test_unsupported_network_is_refused_clearly() -> None:
    conv = QNetwork((1, 3, 3), 0, 3, (Conv2d(np.ones((1, 1, 2, 2), dtype=np.int64), np.zeros(1, np.int64)),
                                      Requantize.pow2(1, 0, 7, Rounding.FLOOR), Flatten()), name="conv")
    assert not supports(conv)
    with pytest.raises(ValueError, match="chain of Dense"):
        optimized_bounds(conv, np.zeros(9, np.int64), np.ones(9, np.int64))


# ----------------------------------------------------------------------------------------------- portfolio
def test_portfolio_decides_the_hand_network_by_the_optimized_stage() -> None:
    from qverify.settings import VerifySettings
    from qverify.verify import verify

    net = _hand_net()
    x = np.array([1, 3, 1])
    prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=2)
    # warm-up: a process's first optimization pays torch's import and its optimizer's lazy set-up (about 2 s on the
    # loaded 2-core machine), which would eat the stage's time share
    optimized_bounds(net, prop.lo, prop.hi, prop, steps=1)
    # a generous budget: the stage's share is 10% of what is left, and this test asserts what decides, not how fast
    res = verify(net, prop, VerifySettings(timeout=200.0))
    assert res.verdict.value == "robust" and res.method == "optimized"
    assert [s.stage for s in res.stages][-1] == "optimized"
    off = verify(net, prop, VerifySettings(timeout=20.0, optimize_share=0.0))
    assert off.verdict.value == "robust" and off.method != "optimized"


@settings(max_examples=15, deadline=None)
@given(networks_and_properties(conv=False, max_points=2000))
def test_portfolio_with_the_new_stages_agrees_with_brute_force(case: tuple) -> None:
    from qverify.settings import VerifySettings
    from qverify.verify import _Clock, _optimized_stage, _reseed_stage

    net, prop = case
    robust, _ = brute_force(net, prop)
    clock = _Clock(10.0)
    r, _ = _reseed_stage(net, prop, clock, VerifySettings(timeout=10.0), 10.0)
    if r is not None:
        assert not robust and r.counterexample.confirmed
    r, bounds, lower = _optimized_stage(net, prop, clock, VerifySettings(timeout=10.0), None, None)
    if r is not None:
        assert robust
    if lower is not None:
        assert lower <= least_slack(net, prop)


# ----------------------------------------------------------------------------------------------- encoders
def test_optimized_bounds_reach_the_encoder_and_fix_more_neurons() -> None:
    """The encoder reads the optimized bounds (format of :mod:`qverify.encode._bounds`): no fewer fixed neurons than
    with the symbolic ones on the hand network, and the integer program decides it as brute force does."""
    from qverify.encode import encode_network
    from qverify.exact import verify_milp
    from qverify.settings import SolverSettings

    net = _hand_net()
    x = np.array([1, 3, 1])
    prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=2)
    ana = symbolic_analysis(net, prop.lo[None], prop.hi[None])
    sym = [(lo[0].ravel(), hi[0].ravel()) for lo, hi in ana.bounds]
    ob = optimized_bounds(net, prop.lo, prop.hi, prop, ana=ana)
    fixed_sym = encode_network(net, prop.lo, prop.hi, sym).stats["fixed_neurons"]
    fixed_opt = encode_network(net, prop.lo, prop.hi, ob.bounds).stats["fixed_neurons"]
    assert fixed_opt >= fixed_sym
    res = verify_milp(net, prop, SolverSettings(backend="cpsat", time_limit=20.0), bounds=ob.bounds)
    assert res.verdict.value == "robust"


@settings(max_examples=15, deadline=None)
@given(networks_and_properties(conv=False, max_points=2000))
def test_integer_program_on_optimized_bounds_agrees_with_brute_force(case: tuple) -> None:
    from qverify.exact import verify_milp
    from qverify.settings import SolverSettings

    net, prop = case
    robust, _ = brute_force(net, prop)
    ob = optimized_bounds(net, prop.lo, prop.hi, prop, steps=10)
    res = verify_milp(net, prop, SolverSettings(backend="cpsat", time_limit=20.0), bounds=ob.bounds)
    assert res.verdict.value == ("robust" if robust else "counterexample")


@settings(max_examples=30, deadline=None)
@given(networks_and_properties(conv=False, max_points=3000))
def test_a_leading_flatten_changes_no_optimized_bound(case: tuple) -> None:
    """An exporter's ``Flatten`` of a ``[1, 1, n]`` image before the first dense layer: the same bounds of every
    value (the flatten's output equal to the input's) and the same margin bound as the flat network's, bit for bit,
    and the flat-input network is still supported with a Reshape after its first activation."""
    from qverify.network import Reshape

    net, prop = case
    n = net.input_shape[0]
    img = QNetwork((1, 1, n), net.input_lo, net.input_hi, (Flatten(), *net.layers), name="flattened")
    assert supports(img)
    ob = optimized_bounds(net, prop.lo, prop.hi, prop, steps=10)
    ob2 = optimized_bounds(img, prop.lo, prop.hi, prop, steps=10)
    assert ob2.slack_lower == ob.slack_lower
    got = [ob2.bounds[0], *ob2.bounds[2:]]
    assert len(got) == len(ob.bounds)
    for (lo, hi), (lo2, hi2) in zip(ob.bounds, got, strict=True):
        assert np.array_equal(lo, lo2) and np.array_equal(hi, hi2)
    assert np.array_equal(ob2.bounds[1][0], ob.bounds[0][0]) and np.array_equal(ob2.bounds[1][1], ob.bounds[0][1])
    k = 2  # Dense, activation, then a Reshape to the same flat shape
    mid = QNetwork(net.input_shape, net.input_lo, net.input_hi,
                   (*net.layers[:k], Reshape(net.shapes[k]), *net.layers[k:]), name="reshaped")
    assert supports(mid)
    _assert_sound(mid, prop, optimized_bounds(mid, prop.lo, prop.hi, prop, steps=10))
