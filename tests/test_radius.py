"""Maximum robustness radius: equal to the brute-force radius, witness at radius + 1, fewer decisions than stepping."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import forward, predict
from qverify.property import robustness_property
from qverify.radius import exact_decider, max_radius, shrink_witness
from qverify.replay import replay
from qverify.result import Result, Verdict
from qverify.settings import SolverSettings
from tests.fixtures import brute_force, random_dense_network, random_graph_network, roundings

FAST = SolverSettings(threads=1, time_limit=20)


def _brute_radius(net, x, label, r_max):
    best = -1
    for r in range(0, r_max + 1):
        if not brute_force(net, robustness_property(net, x, label, radius=r))[0]:
            return best
        best = r
    return best


@given(seed=st.integers(0, 2**32 - 1), rounding=roundings, affine=st.booleans(), own=st.booleans())
@settings(max_examples=25, deadline=None)
def test_radius_equals_brute_force(seed, rounding, affine, own):
    rng = np.random.default_rng(seed)
    net = random_dense_network(rng, n_in=3, hidden=(4,), rounding=rounding, affine=affine)
    x = rng.integers(0, 8, size=3)
    label = int(predict(net, x[None, :])[0]) if own else int(rng.integers(0, net.num_outputs))
    res = max_radius(net, x, label, FAST, decide=exact_decider(FAST))
    want = _brute_radius(net, x, label, res.r_max)
    assert res.exact and res.radius == want == res.lower
    if want == res.r_max:  # robust on the whole grid
        assert res.upper is None and res.counterexample is None
    else:
        cex = res.counterexample
        assert res.upper == want + 1 and cex is not None and cex.confirmed
        assert int(np.max(np.abs(cex.x - x))) == want + 1
        assert robustness_property(net, x, label, radius=want + 1).is_violated(forward(net, cex.x[None, :]))[0]
    # exponential + bisection: logarithmic in the radius, not linear
    solver_calls = sum(1 for s in res.steps if s["how"] not in ("sample", "known witness"))
    assert solver_calls <= 2 * math.ceil(math.log2(res.r_max + 2)) + 2


def test_misclassified_sample_has_radius_minus_one():
    rng = np.random.default_rng(0)
    net = random_dense_network(rng, n_in=3, hidden=(4,))
    x = np.array([1, 2, 3])
    wrong = (int(predict(net, x[None, :])[0]) + 1) % net.num_outputs
    res = max_radius(net, x, wrong, FAST, decide=exact_decider(FAST))
    assert res.radius == -1 and res.exact and res.upper == 0 and res.counterexample.confirmed


def test_undecided_radius_leaves_a_gap():
    """A decider that never decides beyond radius 2: the result says robust up to 2 and is not exact."""
    rng = np.random.default_rng(5)
    net = random_dense_network(rng, n_in=3, hidden=(4,))
    x = np.array([3, 4, 3])
    label = int(predict(net, x[None, :])[0])

    def decide(n, prop, deadline):
        r = next(t for t in range(9) if np.array_equal(robustness_property(n, x, label, radius=t).hi, prop.hi)
                 and np.array_equal(robustness_property(n, x, label, radius=t).lo, prop.lo))
        if r <= 2 and brute_force(n, prop)[0]:
            return Result(Verdict.ROBUST, "oracle", 0.0)
        return Result(Verdict.UNKNOWN, "oracle", 0.0, reason="timeout")

    res = max_radius(net, x, label, FAST, decide=decide)
    assert not res.exact and res.upper is None and res.lower <= 2
    assert any(s["verdict"] == "unknown" for s in res.steps)


def test_default_decider_is_the_portfolio_and_agrees():
    rng = np.random.default_rng(9)
    net = random_dense_network(rng, n_in=3, hidden=(4,))
    x = np.array([2, 5, 1])
    label = int(predict(net, x[None, :])[0])
    res = max_radius(net, x, label, SolverSettings(threads=1, time_limit=5))
    want = _brute_radius(net, x, label, res.r_max)
    # sound whatever the timing: proved radius <= true radius < refuted radius; exact -> equal
    assert res.lower <= want and (res.upper is None or res.upper == want + 1 or res.upper > want + 1 and not res.exact)
    assert not res.exact or res.radius == want


def test_shrink_witness_pulls_towards_the_sample():
    rng = np.random.default_rng(2)
    for _ in range(20):
        net = random_dense_network(rng, n_in=3, hidden=(4,))
        x = rng.integers(0, 8, size=3)
        label = int(predict(net, x[None, :])[0])
        pts = rng.integers(0, 8, size=(200, 3))
        bad = [p for p in pts if predict(net, p[None, :])[0] != label]
        if not bad:
            continue
        w = bad[0]

        def prop_at(t, net=net, x=x, label=label):
            return robustness_property(net, x, label, radius=t)

        s = shrink_witness(net, prop_at, x, w, 0)
        d = int(np.max(np.abs(s - x)))
        assert d <= int(np.max(np.abs(w - x)))
        assert prop_at(d).contains(s)[0] and prop_at(d).is_violated(forward(net, s[None, :]))[0]


# ------------------------------------------------------------------------------------------ graph networks
def _oracle(net, prop, deadline):
    """Decide by enumeration: robust, or the first violating point (replayed)."""
    robust, w = brute_force(net, prop)
    if robust:
        return Result(Verdict.ROBUST, "oracle", 0.0)
    return Result(Verdict.COUNTEREXAMPLE, "oracle", 0.0, counterexample=replay(net, prop, w))


@given(seed=st.integers(0, 2**32 - 1), own=st.booleans())
@settings(max_examples=25, deadline=None)
def test_graph_radius_equals_brute_force(seed, own):
    """Residual / pooling / depthwise / concat / step graphs on a 2x2 image: the search (exponential phase,
    bisection, witness shrinking) lands on the enumerated radius, with a witness at radius + 1; the portfolio's
    answer is sound (proved radius <= true radius < refuted radius)."""
    rng = np.random.default_rng(seed)
    net = random_graph_network(rng, in_shape=(1, 2, 2))
    x = rng.integers(0, net.input_hi + 1, size=net.num_inputs)
    label = int(predict(net, x[None, :])[0]) if own else int(rng.integers(0, net.num_outputs))
    res = max_radius(net, x, label, FAST, decide=_oracle)
    want = _brute_radius(net, x, label, res.r_max)
    assert res.exact and res.radius == want == res.lower
    if want < res.r_max:
        cex = res.counterexample
        assert res.upper == want + 1 and cex is not None and cex.confirmed
        assert int(np.max(np.abs(cex.x - x))) == want + 1
        assert robustness_property(net, x, label, radius=want + 1).is_violated(forward(net, cex.x[None, :]))[0]
    port = max_radius(net, x, label, SolverSettings(threads=1, time_limit=5))
    assert port.lower <= want and (port.upper is None or port.upper > want)
    assert not port.exact or port.radius == want
    if port.counterexample is not None:
        assert replay(net, robustness_property(net, x, label, radius=port.upper), port.counterexample.x).confirmed
