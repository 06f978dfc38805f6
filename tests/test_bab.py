"""Branch and bound: agrees with brute force, splits partition the integer points, timeouts are never robust."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.bab import SPLITS, BabSettings, bab, disjunct_scores, split_boxes
from qverify.bounds.interval import interval_bounds
from qverify.execute import forward, predict
from qverify.network import QNetwork
from qverify.property import Property, pixels_to_grid, robustness_property
from qverify.replay import replay
from qverify.result import Verdict
from tests.fixtures import MNIST1000, P1_6, brute_force, graph_cases, networks_and_properties, random_dense_network


def _check_against_oracle(net: QNetwork, prop: Property, res, robust: bool) -> None:
    assert res.method == "bab"
    if robust:
        assert res.verdict is Verdict.ROBUST, res
    else:
        assert res.verdict is Verdict.COUNTEREXAMPLE, res
        assert res.counterexample.confirmed and prop.contains(res.counterexample.x)[0]
        assert replay(net, prop, res.counterexample.x).confirmed


@settings(max_examples=60, deadline=None)
@given(networks_and_properties(), st.sampled_from(SPLITS), st.booleans(), st.sampled_from([1, 3, 64]),
       st.booleans())
def test_agrees_with_brute_force(np_: tuple[QNetwork, Property], split: str, symbolic: bool, batch: int,
                                 use_attack: bool) -> None:
    net, prop = np_
    robust, _ = brute_force(net, prop)
    kw = {} if use_attack else {"attack": None, "attack_share": 0.0}
    res = bab(net, prop, split=split, settings=BabSettings(symbolic=symbolic, batch_size=batch, **kw))
    _check_against_oracle(net, prop, res, robust)


def test_agrees_on_boxes_that_need_splitting() -> None:
    """Wider boxes (up to 7^4 points) on dense nets: many are neither certified at the root nor falsified by its
    candidates; the counters show the search really splits and bounds."""
    rng = np.random.default_rng(0)
    split_runs = 0
    for _ in range(25):
        net = random_dense_network(rng, n_in=4, hidden=(6, 5), rounding=str(rng.choice(["half_up", "half_even"])))
        x = rng.integers(0, 8, size=4)
        prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=3)
        robust, _ = brute_force(net, prop)
        for split in SPLITS:
            res = bab(net, prop, split=split, settings=BabSettings(batch_size=8, attack=None, attack_share=0.0))
            _check_against_oracle(net, prop, res, robust)
            split_runs += res.details["splits"] > 0
            if robust:
                d = res.details
                assert d["certified_interval"] + d["certified_lookahead"] + d["certified_symbolic"] + d["points"] >= 1
    assert split_runs >= 10


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_split_partitions_integer_points(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    lo = rng.integers(-3, 3, size=(5, n))
    hi = lo + rng.integers(0, 4, size=(5, n))
    hi[:, 0] = lo[:, 0] + rng.integers(1, 4, size=5)  # dimension 0 splittable everywhere
    dim = np.zeros(5, dtype=np.int64)
    (l1, h1), (l2, h2) = split_boxes(lo, hi, dim)
    for b in range(5):
        def pts(l, h):
            return set(itertools.product(*[range(a, c + 1) for a, c in zip(l, h, strict=True)]))
        parent, left, right = pts(lo[b], hi[b]), pts(l1[b], h1[b]), pts(l2[b], h2[b])
        assert left and right and not (left & right) and (left | right) == parent
    with pytest.raises(ValueError):
        split_boxes(lo, lo, dim)


def test_disjunct_scores_match_refutation() -> None:
    rng = np.random.default_rng(3)
    net = random_dense_network(rng)
    prop = robustness_property(net, np.array([3, 3, 3, 3]), 0, radius=2)
    lo, hi = prop.lo[None].repeat(3, 0), prop.hi[None].repeat(3, 0)
    ivb = interval_bounds(net, lo, hi)
    score, _ = disjunct_scores(prop, ivb[-1][0], ivb[-1][1])
    for d, conj in enumerate(prop.unsafe):
        a, b = conj.A[0], conj.b[0]
        low = (np.maximum(a, 0) * ivb[-1][0] + np.minimum(a, 0) * ivb[-1][1]).sum(axis=1)
        assert np.array_equal(score[:, d], low - b)


def _hard_p1_6_instance():
    from qverify.io.h5 import load_qvip_h5

    net = load_qvip_h5(P1_6)
    d = np.load(MNIST1000)
    x = pixels_to_grid(net, d["images"])
    return net, x, d["labels"]


def test_expired_deadline_is_unknown_never_robust() -> None:
    rng = np.random.default_rng(1)
    net = random_dense_network(rng)
    prop = robustness_property(net, np.array([3, 3, 3, 3]), int(predict(net, np.array([[3, 3, 3, 3]]))[0]),
                               radius=1)
    res = bab(net, prop, deadline=time.monotonic() - 1.0)
    assert res.verdict is Verdict.UNKNOWN and res.reason == "timeout"
    assert res.vnncomp_status() == "timeout"


@pytest.mark.skipif(not (P1_6.exists() and MNIST1000.exists()), reason="QVIP anchors / MNIST not available")
def test_p1_6() -> None:
    net, x, labels = _hard_p1_6_instance()
    # id 92, r = 1: intervals do not decide the whole box, splitting does (QVIP: robust)
    res = bab(net, robustness_property(net, x[92], int(labels[92]), radius=1))
    assert res.verdict is Verdict.ROBUST and res.details["splits"] > 0
    # id 18 is misclassified: the centre is a counterexample
    res = bab(net, robustness_property(net, x[18], int(labels[18]), radius=1))
    assert res.verdict is Verdict.COUNTEREXAMPLE
    # id 125, r = 2 (QVIP: robust) is far beyond input splitting in 1 s: unknown (timeout), never robust
    res = bab(net, robustness_property(net, x[125], int(labels[125]), radius=2), deadline=time.monotonic() + 1.0,
              settings=BabSettings(attack=None))
    assert res.verdict is Verdict.UNKNOWN and res.reason == "timeout" and res.details["boxes"] > 1
    # a queue cap gives unknown (memory)
    res = bab(net, robustness_property(net, x[125], int(labels[125]), radius=2),
              settings=BabSettings(max_queue=100, batch_size=64, attack=None))
    assert res.verdict is Verdict.UNKNOWN and res.reason == "memory"


@settings(max_examples=30, deadline=None)
@given(networks_and_properties(float32=True), st.sampled_from(SPLITS), st.booleans())
def test_float32_networks_agree_with_brute_force(np_: tuple[QNetwork, Property], split: str, symbolic: bool) -> None:
    """Branch-and-bound on networks with onnxruntime's float32 requantizations (its bounds, cut points and replay)."""
    net, prop = np_
    robust, _ = brute_force(net, prop)
    res = bab(net, prop, split=split, settings=BabSettings(symbolic=symbolic))
    _check_against_oracle(net, prop, res, robust)


# ------------------------------------------------------------------------------------------ graph networks
def test_every_op_has_a_coefficient_rule() -> None:
    from qverify import graph
    from qverify.bab import PULL

    assert graph.missing_rules(PULL) == []


@settings(max_examples=40, deadline=None)
@given(graph_cases(), st.sampled_from(SPLITS), st.booleans(), st.sampled_from([1, 8, 64]), st.booleans())
def test_graph_networks_agree_with_brute_force(np_: tuple[QNetwork, Property], split: str, symbolic: bool,
                                               batch: int, use_attack: bool) -> None:
    """Residual / pooling / depthwise / concat / step / movement graphs, boxes of up to 2000 points."""
    net, prop = np_
    robust, _ = brute_force(net, prop)
    kw = {} if use_attack else {"attack": None, "attack_share": 0.0}
    res = bab(net, prop, split=split, settings=BabSettings(symbolic=symbolic, batch_size=batch, **kw))
    _check_against_oracle(net, prop, res, robust)


def _linear_graph(rng: np.random.Generator) -> QNetwork:
    """Only linear maps: a grouped conv stem, a residual add of two branches, a concat, sum pooling, padding and a
    transpose / reshape pair, flatten, dense: the output is ``A x + c`` exactly."""
    from qverify.network import Add, Concat, Conv2d, Dense, Flatten, Pad, Reshape, SumPool2d, Transpose

    layers = [Conv2d(rng.integers(-2, 3, size=(2, 1, 3, 3)), [1, -1], padding=(1, 1, 1, 1), pad_value=1),  # v1
              Conv2d(rng.integers(-2, 3, size=(2, 1, 3, 3)), [0, 2], padding=(1, 1, 1, 1), groups=2),  # v2
              Add((2, -1), 3),                                                                        # v3
              Concat(0, 2),                                                                            # v4
              SumPool2d((2, 2), padding=(1, 0, 0, 1), pad_value=2),                                    # v5
              Pad((0, 0, 1, 0, 1, 0), 3),                                                              # v6
              Transpose((1, 2, 0)), Reshape((4, 4, 4)), Transpose((2, 0, 1)),                          # v7..v9
              Flatten()]                                                                               # v10
    inputs = [(0,), (1,), (2, 1), (3, 1), (4,), (5,), (6,), (7,), (8,), (9,)]
    layers.append(Dense(rng.integers(-2, 3, size=(3, 64)), [0, 1, 2]))
    inputs.append((10,))
    return QNetwork((1, 3, 3), 0, 3, tuple(layers), inputs=tuple(inputs), name="linear-graph")


def test_pulled_back_rows_of_a_linear_graph_are_its_exact_gradient() -> None:
    """Through linear maps only, ``rows . y(x)`` is affine in ``x`` and the pulled-back coefficients are its
    gradient (every branch's contribution added); the absolute pull-back dominates it elementwise."""
    from qverify.bab import _LinearChain

    rng = np.random.default_rng(0)
    net = _linear_graph(rng)
    n = net.num_inputs
    x0 = np.ones((1, n), dtype=np.int64)
    y0 = forward(net, x0)
    grad_y = np.stack([forward(net, x0 + np.eye(n, dtype=np.int64)[j][None])[0] - y0[0] for j in range(n)])  # [n, out]
    rows = rng.integers(-3, 4, size=(2, net.num_outputs))
    lo, hi = np.zeros((2, n), np.int64), np.full((2, n), 3)
    ivb = interval_bounds(net, lo, hi)
    chain = _LinearChain(net)
    c = chain.coefficients(rows, ivb, np.arange(2), absolute=False)
    assert np.array_equal(c, rows @ grad_y.T)
    ca = chain.coefficients(rows, ivb, np.arange(2), absolute=True)
    assert np.all(ca >= np.abs(c))


def test_max_pool_and_step_coefficients_follow_the_interval_bounds() -> None:
    """Max pooling sends a row to the cell of largest upper bound of each window with an unfixed output; a step
    function scales by its secant slope over the input bounds (0 when fixed)."""
    from qverify.bab import _LinearChain
    from qverify.network import Dense, Flatten, MaxPool2d, Step

    net = QNetwork((1, 1, 4), 0, 9, (MaxPool2d((1, 2), (1, 2)), Flatten(), Step(np.array([[0, 5]]), (0, 1, 3)),
                                     Dense([[1, 1]], [0])), name="pool-step")
    lo = np.array([[0, 2, 6, 6]])
    hi = np.array([[4, 3, 9, 8]])
    ivb = interval_bounds(net, lo, hi)
    c = _LinearChain(net).coefficients(np.array([[2]]), ivb, np.arange(1), absolute=False)
    # window 0: max in [2, 4] -> cell 0 (hi 4); step over [2, 4]: 1 - 1 = 0 -> slope 0
    # window 1: max in [6, 9] -> cell 2 (hi 9); step over [6, 9] is fixed (3) -> 0
    assert np.array_equal(c, np.zeros((1, 4)))
    net2 = QNetwork((1, 1, 4), 0, 9, (MaxPool2d((1, 2), (1, 2)), Flatten(), Step(np.array([[3, 7]]), (0, 1, 3)),
                                      Dense([[1, 1]], [0])), name="pool-step-2")
    ivb2 = interval_bounds(net2, lo, hi)
    c2 = _LinearChain(net2).coefficients(np.array([[2]]), ivb2, np.arange(1), absolute=False)
    # window 0: [2, 4] -> f in [0, 1]: slope 1/2 to cell 0; window 1: [6, 9] -> f in [1, 3]: slope 2/3 to cell 2
    assert np.allclose(c2, [[2 * 0.5, 0, 2 * 2 / 3, 0]])
