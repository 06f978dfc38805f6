"""Attacks: only replay-confirmed counterexamples come back; easy ones are found; exact region checks."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.attack import (
    AttackSettings,
    PaddedRegions,
    attack,
    attack_batch,
    attack_report,
    attack_result,
    descend,
)
from qverify.execute import forward, predict
from qverify.network import Add, Conv2d, Dense, Flatten, MaxPool2d, QNetwork, Requantize
from qverify.property import Conjunction, Property, pixels_to_grid, robustness_property
from qverify.replay import replay
from qverify.result import Verdict
from qverify.settings import VerifySettings
from qverify.torch_net import TorchNet, limit_threads
from tests.fixtures import (
    MNIST1000,
    P1_6,
    brute_force,
    graph_networks,
    least_slack,
    networks_and_properties,
    tiny_networks,
)

FAST = AttackSettings(restarts=4, steps=10, random_points=4, random_vertices=4, local_steps=2, local_starts=1)


@settings(max_examples=60, deadline=None)
@given(networks_and_properties(), st.integers(0, 3), st.sampled_from([20, 16384]))
def test_only_confirmed_witnesses(np_: tuple[QNetwork, Property], seed: int, local_rows: int) -> None:
    net, prop = np_
    robust, _ = brute_force(net, prop)
    ce = attack(net, prop, AttackSettings(restarts=4, steps=8, seed=seed, local_steps=2, local_rows=local_rows,
                                          max_rows=16))
    if robust:
        assert ce is None
    if ce is not None:
        assert ce.confirmed and prop.contains(ce.x)[0]
        assert replay(net, prop, ce.x).confirmed
        assert np.array_equal(ce.y, forward(net, ce.x[None])[0])
        assert prop.is_violated(ce.y[None])[0]


@settings(max_examples=40, deadline=None)
@given(networks_and_properties(), st.integers(0, 2**32 - 1))
def test_padded_regions_exact(np_: tuple[QNetwork, Property], seed: int) -> None:
    """The batched region check equals ``Property.is_violated`` (also for multi-row, multi-disjunct regions)."""
    net, prop = np_
    rng = np.random.default_rng(seed)
    n_out = net.num_outputs
    extra = Property(prop.lo, prop.hi, (Conjunction(rng.integers(-3, 4, size=(3, n_out)), rng.integers(-5, 6, 3)),
                                        Conjunction(rng.integers(-3, 4, size=(1, n_out)), rng.integers(-5, 6, 1))))
    props = [prop, extra]
    regions = PaddedRegions.of(props)
    y = rng.integers(-8, 8, size=(2, 50, n_out))
    got = regions.violated(y)
    for i, p in enumerate(props):
        assert np.array_equal(got[i], p.is_violated(y[i]))


@settings(max_examples=50, deadline=None)
@given(networks_and_properties(), st.integers(0, 3))
def test_nearest_miss_is_an_exact_upper_bound_of_the_least_slack(np_: tuple[QNetwork, Property], seed: int) -> None:
    """Per property, the nearest miss lies in the box, its slack is the executor's, and it bounds the enumerated
    least slack from above; it is a violation exactly when a witness was found."""
    net, prop = np_
    other = robustness_property(net, prop.center, (int(prop.label) + 1) % net.num_outputs, radius=0)
    props = [prop, other]
    rep = attack_report(net, props, replace(FAST, seed=seed))
    assert rep.x.shape == (2, net.num_inputs) and rep.slack.dtype == np.int64
    for p, x, sl, ce in zip(props, rep.x, rep.slack, rep.found, strict=True):
        assert p.contains(x)[0]
        assert int(p.slack(forward(net, x[None]))[0]) == sl >= least_slack(net, p)
        if ce is not None:
            assert sl <= 0
        elif least_slack(net, p) == sl:
            assert sl > 0  # the least slack reached and no witness: there is none


def _sum_net() -> QNetwork:
    """y0 = x0 + x1 + x2 + x3 (0..28), y1 = 25: class 0 wins (index 0 < 1 on ties) iff the sum is >= 25."""
    return QNetwork((4,), 0, 7, (Dense([[1, 1, 1, 1], [0, 0, 0, 0]], [0, 25]), Requantize.pow2(0, -64, 63)))


def _tent_net() -> QNetwork:
    """One input in 0..7: y0 = 10 - 11 (|x - 4|), y1 = 0: class 0 iff x == 4 (an interior point)."""
    return QNetwork((1,), 0, 7, (
        Dense([[1], [-1]], [-4, 4]), Requantize.pow2(0, 0, 15),
        Dense([[-11, -11], [0, 0]], [10, 0]), Requantize.pow2(0, -64, 63)))


def test_centre_misclassified_is_found() -> None:
    net = _sum_net()
    x = np.array([7, 7, 7, 7])
    prop = robustness_property(net, x, 1, radius=0)
    ce = attack(net, prop, FAST)
    assert ce is not None and ce.note.startswith("attack: centre")


def test_pgd_finds_the_corner() -> None:
    net = _sum_net()
    prop = robustness_property(net, np.array([0, 0, 0, 0]), 1, radius=7)
    assert predict(net, np.zeros((1, 4), dtype=np.int64))[0] == 1
    ce = attack(net, prop, AttackSettings(restarts=2, steps=10, random_points=0, random_vertices=0, local_steps=0))
    assert ce is not None and "pgd" in ce.note
    assert ce.x.sum() >= 25


def test_interior_counterexample_is_found() -> None:
    net = _tent_net()
    prop = robustness_property(net, np.array([0]), 1, radius=7)
    ce = attack(net, prop, AttackSettings(restarts=2, steps=10, random_points=0, random_vertices=0))
    assert ce is not None and ce.x.tolist() == [4]


def test_local_search_without_dense_first_layer() -> None:
    """The tent behind a 1x1 convolution: PGD cannot reach x = 4 in one step, the local search evaluates it."""
    conv = QNetwork((1, 1, 1), 0, 7, (
        Conv2d(np.array([[[[1]]], [[[-1]]]]), np.array([-4, 4])), Requantize.pow2(0, 0, 15), Flatten(),
        Dense([[-11, -11], [0, 0]], [10, 0]), Requantize.pow2(0, -64, 63)))
    prop = robustness_property(conv, np.array([0]), 1, radius=7)
    ce = attack(conv, prop, AttackSettings(restarts=1, steps=1, random_points=0, random_vertices=0, local_steps=3))
    assert ce is not None and ce.x.tolist() == [4] and "local search" in ce.note


def test_robust_gives_none() -> None:
    net = _sum_net()
    prop = robustness_property(net, np.array([1, 1, 1, 1]), 1, radius=2)
    assert brute_force(net, prop)[0]
    assert attack(net, prop, FAST) is None
    res = attack_result(net, prop, FAST)
    assert res.verdict is Verdict.UNKNOWN and res.reason == "incomplete-method"


def test_batch_and_result() -> None:
    net = _sum_net()
    props = [robustness_property(net, np.array([0, 0, 0, 0]), 1, radius=7),
             robustness_property(net, np.array([1, 1, 1, 1]), 1, radius=2),
             robustness_property(net, np.array([7, 7, 7, 7]), 1, radius=1)]
    stats: dict = {}
    out = attack_batch(net, props, FAST, stats=stats)
    assert [c is not None for c in out] == [True, False, True]
    assert stats["found"] == 2 and stats["phases"][1] is None
    for p, c in zip(props, out, strict=True):
        if c is not None:
            assert replay(net, p, c.x).confirmed
    res = attack_result(net, props[0], FAST)
    assert res.verdict is Verdict.COUNTEREXAMPLE and res.method == "attack"


def test_expired_deadline_stops() -> None:
    net = _sum_net()
    prop = robustness_property(net, np.array([0, 0, 0, 0]), 1, radius=7)
    t = time.monotonic()
    out = attack(net, prop, AttackSettings(random_points=0, random_vertices=0), deadline=t - 1)
    assert out is None  # only the centre was checked, and it is safe
    res = attack_result(net, prop, AttackSettings(random_points=0, random_vertices=0), deadline=t - 1)
    assert res.verdict is Verdict.UNKNOWN and res.reason == "timeout"


def test_settings_from_verify() -> None:
    s = AttackSettings.from_verify(VerifySettings(attack_restarts=3, attack_steps=7, seed=5))
    assert (s.restarts, s.steps, s.seed) == (3, 7, 5)


@pytest.mark.skipif(not (P1_6.exists() and MNIST1000.exists()), reason="QVIP anchors / MNIST not available")
def test_p1_6_known_counterexamples() -> None:
    """QVIP Table 2 (r = 4): ids 303, 320, 324, 376 are non-robust, 321, 340 misclassified."""
    from qverify.io.h5 import load_qvip_h5

    net = load_qvip_h5(P1_6)
    d = np.load(MNIST1000)
    x = pixels_to_grid(net, d["images"])
    ids = [303, 320, 321, 324, 340, 376, 301]
    props = [robustness_property(net, x[i], int(d["labels"][i]), radius=4) for i in ids]
    out = attack_batch(net, props, AttackSettings(local_steps=0))
    assert [c is not None for c in out] == [True] * 6 + [False]  # 301 is robust (QVIP)
    for p, c in zip(props, out, strict=True):
        if c is not None:
            assert replay(net, p, c.x).confirmed


def test_descend_reaches_the_interior_counterexample_from_a_start() -> None:
    """From x = 0 of the tent the local search walks to x = 4 (the only violation); a robust box gives None."""
    net = _tent_net()
    prop = robustness_property(net, np.array([0]), 1, radius=7)
    ce = descend(net, prop, np.array([[0]]), AttackSettings(local_steps=10))
    assert ce is not None and ce.confirmed and ce.x.tolist() == [4]
    near = descend(net, prop, np.array([[4]]), AttackSettings(local_steps=0))
    assert near is not None and "start" in near.note
    robust = robustness_property(_sum_net(), np.array([1, 1, 1, 1]), 1, radius=2)
    assert descend(_sum_net(), robust, np.array([[0, 0, 0, 0], [3, 3, 3, 3]]), AttackSettings(local_steps=10)) is None


# ------------------------------------------------------------------------------------------ graph networks
@st.composite
def graphs_and_properties(draw: st.DrawFn) -> tuple[QNetwork, Property]:
    """A random graph network (:func:`tests.fixtures.random_graph_network`: residual, pooling, depthwise, concat,
    step, ... blocks) and a robustness property that frees 1..5 input coordinates by 1 or 2 around a grid point (a
    box of at most 3125 points, enumerated by the oracle)."""
    net = draw(graph_networks())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = net.num_inputs
    x = rng.integers(net.input_lo, net.input_hi + 1, size=n)
    label = int(predict(net, x[None])[0]) if draw(st.booleans()) else int(rng.integers(0, net.num_outputs))
    free = rng.choice(n, size=draw(st.integers(1, 5)), replace=False)
    r = draw(st.integers(1, 2))
    lo, hi = x.copy(), x.copy()
    lo[free] = np.maximum(x[free] - r, net.input_lo)
    hi[free] = np.minimum(x[free] + r, net.input_hi)
    base = robustness_property(net, x, label, radius=0)
    return net, Property(lo, hi, base.unsafe, label=label, center=x)


@settings(max_examples=40, deadline=None)
@given(graphs_and_properties(), st.integers(0, 3))
def test_graph_only_confirmed_witnesses_and_exact_nearest_miss(np_: tuple[QNetwork, Property], seed: int) -> None:
    """On graphs too: a robust box (by enumeration) gives nothing, every witness replays on the executor, and the
    nearest miss is an exact upper bound of the least slack."""
    net, prop = np_
    robust, _ = brute_force(net, prop)
    rep = attack_report(net, [prop], AttackSettings(restarts=4, steps=8, seed=seed, local_steps=2, max_rows=64))
    ce = rep.found[0]
    if robust:
        assert ce is None
    if ce is not None:
        assert ce.confirmed and prop.contains(ce.x)[0] and replay(net, prop, ce.x).confirmed
        assert np.array_equal(ce.y, forward(net, ce.x[None])[0]) and prop.is_violated(ce.y[None])[0]
    assert prop.contains(rep.x[0])[0]
    assert int(prop.slack(forward(net, rep.x[:1]))[0]) == rep.slack[0] >= least_slack(net, prop)


def _residual_graph() -> QNetwork:
    """``v = clamp(R((2x - 3) / 2), 0, 7) + x`` per pixel (a residual add of the input), ``y0 = sum v - 44``,
    ``y1 = 0``: class 0 iff ``sum v >= 44``, which needs every pixel at 6 or more."""
    layers = (Conv2d(np.array([[[[2]]]]), np.array([-3])), Requantize.pow2(1, 0, 7), Add((1, 1), 0), Flatten(),
              Dense([[1, 1, 1, 1], [0, 0, 0, 0]], [-44, 0]), Requantize.pow2(0, -64, 63))
    return QNetwork((1, 2, 2), 0, 7, layers, inputs=((0,), (1,), (2, 0), (3,), (4,), (5,)), name="residual")


def _maxpool_graph() -> QNetwork:
    """2x2 max pooling (stride 1, one padded row on top) of a 2x3 image in 0..3, ``y0 = sum of the 4 maxima - 12``,
    ``y1 = 0``: class 0 iff every window's maximum is 3 (pixel (0, 1), or pixels (0, 0) and (0, 2), and more)."""
    layers = (MaxPool2d((2, 2), (1, 1), (1, 0, 0, 0)), Flatten(), Dense([[1, 1, 1, 1], [0, 0, 0, 0]], [-12, 0]),
              Requantize.pow2(0, -64, 63))
    return QNetwork((1, 2, 3), 0, 3, layers, name="maxpool")


@pytest.mark.parametrize("make, centre, radius", [(_residual_graph, 1, 6), (_maxpool_graph, 1, 2)])
def test_pgd_finds_known_graph_counterexamples(make, centre: int, radius: int) -> None:
    """PGD alone (no random points, no local search) finds the violation that enumeration shows, through a
    residual add and through max pooling; the witness replays."""
    net = make()
    x = np.full(net.num_inputs, centre)
    prop = robustness_property(net, x, 1, radius=radius)
    assert predict(net, x[None])[0] == 1
    robust, witness = brute_force(net, prop)
    assert not robust and witness is not None
    ce = attack(net, prop, AttackSettings(restarts=2, steps=10, random_points=0, random_vertices=0, local_steps=0))
    assert ce is not None and "pgd" in ce.note
    assert replay(net, prop, ce.x).confirmed and prop.is_violated(forward(net, ce.x[None]))[0]


def test_local_search_on_a_graph() -> None:
    """A tent plus a linear shortcut of the input, ``y0 = 10 - 12 |x - 4| + (x - 4)``, ``y1 = 0`` (the input is
    read twice, so the neighbours are evaluated in full): only x = 4 violates; PGD cannot reach it in one step,
    the local search does."""
    layers = (Dense([[1], [-1]], [-4, 4]), Requantize.pow2(0, 0, 15), Dense([[-12, -12], [0, 0]], [10, 0]),
              Dense([[1], [0]], [-4, 0]), Add((1, 1), 0), Requantize.pow2(0, -64, 63))
    net = QNetwork((1,), 0, 7, layers, inputs=((0,), (1,), (2,), (0,), (3, 4), (5,)))
    prop = robustness_property(net, np.array([0]), 1, radius=7)
    assert brute_force(net, prop)[1].tolist() == [4]
    ce = attack(net, prop, AttackSettings(restarts=1, steps=1, random_points=0, random_vertices=0, local_steps=3))
    assert ce is not None and ce.x.tolist() == [4] and "local search" in ce.note


@settings(max_examples=30, deadline=None)
@given(st.one_of(graph_networks(), tiny_networks()), st.integers(0, 2**32 - 1), st.booleans())
def test_neighbours_equal_full_evaluation(net: QNetwork, seed: int, clamp: bool) -> None:
    """The local search's neighbours (one column update of the first linear map where the input reaches the
    network through it alone, else full evaluation) have exactly the executor's outputs and the soft logits of a
    full evaluation."""
    from qverify.attack import _evaluate, _first_linear, _neighbours

    rng = np.random.default_rng(seed)
    n = net.num_inputs
    x = rng.integers(net.input_lo, net.input_hi + 1, size=n)
    coords = np.sort(rng.choice(n, size=min(n, 3), replace=False))
    vals = rng.integers(net.input_lo, net.input_hi + 1, size=(4, len(coords)))
    tn = TorchNet(net)
    cand = np.repeat(x[None], vals.size, axis=0)
    cand[np.arange(vals.size), np.tile(coords, len(vals))] = vals.ravel()
    with limit_threads(1):
        y, u = _neighbours(tn, x, coords, vals, clamp, max_rows=5)
        _, uc, uu = _evaluate(tn, cand)
    assert np.array_equal(y, forward(net, cand))
    assert torch.equal(u, uc if clamp else uu)
    if net.is_chain or net.node_inputs(0) == (0,) and len(net.consumers()[0]) == 1:
        assert _first_linear(net) == 0  # both kinds start with a dense or conv node reading the input alone
