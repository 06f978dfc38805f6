"""Symbolic (back-substitution) bounds: exact validity of every relaxation line, soundness of every layer's bounds
and of margin bounds against the executor, certification checked by brute force, and P1-6 on real MNIST."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.bounds.interval import certified_by_interval, interval_bounds
from qverify.bounds.symbolic import (
    ActParams,
    certified_by_symbolic,
    conv_matrix,
    conv_transpose,
    relax,
    rounding_error_bounds,
    symbolic_analysis,
    symbolic_bounds,
    thresholds,
)
from qverify.execute import conv2d_float, execute, predict
from qverify.network import Clamp, Conv2d, Dense, QNetwork, Requantize
from qverify.property import pixels_to_grid, robustness_property
from qverify.quant import Rounding, round_div, threshold
from tests.fixtures import (
    MNIST1000,
    P1_6,
    assert_exact_on_points,
    brute_force,
    least_slack,
    networks_and_properties,
    roundings,
    tiny_networks,
)


# ----------------------------------------------------------------------------------------------- rounding facts
@pytest.mark.parametrize("mode", list(Rounding))
@pytest.mark.parametrize("q", [1, 2, 3, 4, 7, 8, 12, 64])
def test_rounding_error_bounds_are_tight(mode: Rounding, q: int) -> None:
    n = np.arange(-5 * q - 3, 5 * q + 4, dtype=np.int64)
    err_q = round_div(n, q, mode) * q - n  # q * (R(n/q) - n/q), exact
    dL, dU = rounding_error_bounds(q, mode)
    assert err_q.min() == -dL and err_q.max() == dU


@settings(max_examples=200, deadline=None)
@given(roundings, st.integers(1, 40), st.integers(1, 40), st.integers(-5, 5), st.integers(-6, 6))
def test_vectorised_thresholds_match_quant(mode: Rounding, p: int, q: int, z: int, v: int) -> None:
    layer = Requantize((p,), (q,), np.array([z]), -50, 50, mode)
    params = ActParams.of(layer, (1,))
    got = thresholds(params, np.array([v], dtype=object), np.array([0]))[0]
    assert got == threshold(v - z, layer.num[0], layer.den[0], mode)


# ----------------------------------------------------------------------------------------------- relaxations
@st.composite
def activations(draw: st.DrawFn, kinds: tuple[str, ...] = ("pow2", "affine", "float", "clamp")
                ) -> tuple[ActParams, np.ndarray, np.ndarray]:
    kind = draw(st.sampled_from(kinds))
    n = 6
    lo = draw(st.integers(-8, 0))
    hi = lo + draw(st.integers(0, 12))
    mode = draw(roundings)
    if kind == "clamp":
        layer = Clamp(lo, hi)
        scale = 1
    elif kind == "pow2":
        k = draw(st.integers(-1, 6))
        layer = Requantize.pow2(k, lo, hi, mode, zero_point=draw(st.integers(-3, 3)))
        scale = 2 ** max(k, 0)
    elif kind in ("float32", "float32_big"):  # onnxruntime's float32 requantization, per channel
        big = kind == "float32_big"
        ms = [float(np.float32(draw(st.floats(0.5, 3.0)) * (2.0**-12 if big else draw(st.floats(0.003, 1.0)))))
              for _ in range(n)]
        zp = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
        layer = Requantize.float32(ms, zp, lo, hi)
        scale = int(1 / min(ms)) + 1
        if big:  # accumulators around +-2^25, where fl32(acc) rounds to multiples of 4
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            off = int(rng.choice([-(2**25), 2**25]))
            layer = Requantize.float32(ms, [z - round(off * m) for z, m in zip(zp, ms, strict=True)], lo, hi)
            center = off + rng.integers(-scale * (hi - lo + 2), scale * (hi - lo + 2) + 1, size=(3, n))
            width = rng.integers(0, scale * (hi - lo + 2) + 2, size=(3, n))
            l = center - rng.integers(0, width + 1)
            return ActParams.of(layer, (n,)), l.astype(np.int64), (l + width).astype(np.int64)
    elif kind == "affine":
        num = draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
        den = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
        zp = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
        layer = Requantize(tuple(num), tuple(den), np.array(zp), lo, hi, mode)
        scale = max(den)
    else:  # float scales: huge dyadic denominators (the ONNX case)
        m = draw(st.floats(0.003, 3.0))
        layer = Requantize.affine([m], [draw(st.integers(-3, 3))], lo, hi, mode)
        scale = int(1 / m) + 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    center = rng.integers(-6 * scale * (hi - lo + 2), 6 * scale * (hi - lo + 2) + 1, size=(3, n))
    width = rng.integers(0, 3 * scale * (hi - lo + 2) + 2, size=(3, n))
    l = center - rng.integers(0, width + 1)
    u = l + width
    return ActParams.of(layer, (n,)), l.astype(np.int64), u.astype(np.int64)


@settings(max_examples=150, deadline=None)
@given(activations(), st.integers(1, 4))
def test_relaxation_lines_are_exactly_valid(case: tuple, levels: int) -> None:
    """Every line lies below / above f at every integer of [l, u], checked in exact rationals."""
    params, l, u = case
    rel = relax(params, l, u, levels=levels)
    for b in range(l.shape[0]):
        for j in range(l.shape[1]):
            xs = np.arange(l[b, j], u[b, j] + 1, dtype=np.int64)
            if len(xs) > 3000:
                xs = np.unique(np.concatenate([xs[:1000], xs[-1000:], np.linspace(xs[0], xs[-1], 1000)
                                               .astype(np.int64)]))
            full = np.zeros((len(xs), l.shape[1]), dtype=np.int64)
            full[:, j] = xs
            fx = params.apply(full)[:, j]
            aL, bL = Fraction(rel.aL[b, j]), Fraction(rel.bL[b, j])
            aU, bU = Fraction(rel.aU[b, j]), Fraction(rel.bU[b, j])
            assert aL >= 0 and aU >= 0
            for x, y in zip(xs.tolist(), fx.tolist(), strict=True):
                assert aL * x + bL <= y <= aU * x + bU, (b, j, x, y)
            if fx[0] == fx[-1]:  # fixed neuron: the exact constant
                assert aL == aU == 0 and bL == bU == fx[0]


@settings(max_examples=40, deadline=None)
@given(activations(kinds=("float32", "float32_big")), st.integers(1, 4))
def test_float32_relaxation_lines_are_exactly_valid(case: tuple, levels: int) -> None:
    """onnxruntime's float32 requantization (per channel, also on accumulators around 2^25 where fl32(acc) rounds):
    the lines built from its cut points and exact error bounds lie below / above it at every integer."""
    test_relaxation_lines_are_exactly_valid.hypothesis.inner_test(case, levels)


def test_relaxation_of_a_relu_like_requantization_is_tight() -> None:
    """y = clamp(floor(a/4 + 1/2), 0, 7) over a in [-40, 40]: the upper line is the chord-like cover of the
    staircase and the lower line is one of the two DeepPoly choices; both touch the staircase."""
    params = ActParams.of(Requantize.pow2(2, 0, 7, "half_up"), (1,))
    l, u = np.array([[-40]]), np.array([[40]])
    rel = relax(params, l, u)
    xs = np.arange(-40, 41)
    fx = params.apply(xs[:, None])[:, 0]
    gap_hi = rel.aU[0, 0] * xs + rel.bU[0, 0] - fx
    gap_lo = fx - (rel.aL[0, 0] * xs + rel.bL[0, 0])
    assert gap_hi.min() == pytest.approx(0, abs=1e-9) and gap_lo.min() == pytest.approx(0, abs=1e-9)
    assert 0 < rel.aU[0, 0] < 0.25  # between the flat part and the slope 1/4


def test_conv_matrix_is_the_convolution() -> None:
    rng = np.random.default_rng(0)
    layer = Conv2d(rng.integers(-3, 4, (3, 2, 3, 3)), rng.integers(-5, 6, 3), stride=(2, 1), padding=(1, 0, 2, 1),
                   dilation=(1, 2), pad_value=3)
    x = rng.integers(0, 9, (5, 2, 6, 7))
    W, b = conv_matrix(layer, (2, 6, 7))
    np.testing.assert_array_equal(x.reshape(5, -1) @ W.T + b, conv2d_float(layer, x).reshape(5, -1))
    # the transposed convolution used by back-substitution is exactly lam W
    lam = rng.integers(-4, 5, (7, *layer.output_shape((2, 6, 7)))).astype(np.float64)
    back = conv_transpose(lam, layer.weight.astype(np.float64), layer, (2, 6, 7))
    np.testing.assert_array_equal(back.reshape(7, -1), lam.reshape(7, -1) @ W)


# ----------------------------------------------------------------------------------------------- network bounds
@st.composite
def nets_and_boxes(draw: st.DrawFn, conv: bool | None = None, float32: bool = False) -> tuple:
    net = draw(tiny_networks(conv=conv, float32=float32))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = rng.integers(net.input_lo, net.input_hi + 1, size=(3, net.num_inputs))
    r = rng.integers(0, draw(st.integers(1, 3)), size=(3, net.num_inputs))
    return net, np.maximum(c - r, net.input_lo), np.minimum(c + r, net.input_hi)


def _points(lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator, limit: int = 4000) -> np.ndarray:
    size = int(np.prod((hi - lo + 1).astype(float)))
    if size <= limit:
        axes = [np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(lo))
    return np.concatenate([rng.integers(lo, hi + 1, size=(limit, len(lo))), lo[None], hi[None]])


TIGHTER = {"tighter": 0, "looser": 0, "neurons": 0}


@settings(max_examples=100, deadline=None)
@given(nets_and_boxes(), st.sampled_from(["symbolic", "interval"]), st.integers(1, 3))
def test_symbolic_bounds_contain_every_executed_value(case: tuple, intermediate: str, levels: int) -> None:
    net, lo, hi = case
    ana = symbolic_analysis(net, lo, hi, intermediate=intermediate, levels=levels)
    rng = np.random.default_rng(0)
    A = rng.integers(-2, 3, size=(5, net.num_outputs))
    low = ana.row_lower_bounds(A)
    for k in range(len(lo)):
        values = execute(net, _points(lo[k], hi[k], rng))
        for i, ((bl, bh), v) in enumerate(zip(ana.bounds, values, strict=True)):
            assert bl.shape == (len(lo), *net.shapes[i])
            assert np.all(v >= bl[k]) and np.all(v <= bh[k]), f"value {i} escapes its bounds"
        for i, (sl, sh) in ana.symbolic_only.items():  # the pure back-substitution bounds alone are sound
            v = values[i].reshape(len(values[i]), -1)
            assert np.all(v >= sl[k]) and np.all(v <= sh[k])
            il, ih = (a.reshape(len(lo), -1)[k] for a in ana.interval[i])
            m = ana.refined[i][k]
            # one layer down the back-substitution is the interval step, so it never loses to intervals
            assert np.all(sl[k][m] >= il[m]) and np.all(sh[k][m] <= ih[m])
            TIGHTER["neurons"] += int(m.sum())
            TIGHTER["tighter"] += int(np.sum(((sl[k] > il) | (sh[k] < ih))[m]))
            TIGHTER["looser"] += int(np.sum(((sl[k] < il) | (sh[k] > ih))[m]))
        assert np.all(values[-1] @ A.T >= low[k]), "margin bound is not sound"


@settings(max_examples=40, deadline=None)
@given(tiny_networks(), st.integers(0, 2**32 - 1))
def test_point_boxes_are_exact(net: QNetwork, seed: int) -> None:
    assert_exact_on_points(symbolic_bounds, net, seed, 3)


def test_symbolic_is_never_looser_than_interval() -> None:
    rng = np.random.default_rng(7)
    from tests.fixtures import random_dense_network
    net = random_dense_network(rng, n_in=5, hidden=(6, 5), affine=True, per_channel=True)
    c = rng.integers(0, 8, size=(20, 5))
    lo, hi = np.maximum(c - 2, 0), np.minimum(c + 2, 7)
    ivb = interval_bounds(net, lo, hi)
    for (sl, sh), (il, ih) in zip(symbolic_bounds(net, lo, hi), ivb, strict=True):
        assert np.all(sl >= il) and np.all(sh <= ih)


def test_two_affine_layers_compose_exactly() -> None:
    """Dense -> Dense without activation: back-substitution is the exact composed affine map, tighter than
    intervals (which lose the cancellation)."""
    net = QNetwork((2,), 0, 10, (Dense([[1, 1], [1, -1]], [0, 0]), Dense([[1, 1]], [0]), Requantize.pow2(0, -99, 99)))
    lo, hi = np.array([[0, 0]]), np.array([[10, 10]])
    sym = symbolic_bounds(net, lo, hi)
    assert (int(sym[2][0][0, 0]), int(sym[2][1][0, 0])) == (0, 20)  # 2 x0 over [0, 10]
    ivl = interval_bounds(net, lo, hi)
    assert int(ivl[2][0][0, 0]) == -10


def test_fixed_counts_and_formats() -> None:
    net = QNetwork((2,), 0, 3, (Dense([[2, -1], [1, 1], [0, 1]], [1, 0, 20]), Requantize.pow2(1, 0, 7),
                                Dense([[1, -1, 0], [-1, 2, 1]], [0, 1]), Requantize.pow2(0, -8, 7)))
    ana = symbolic_analysis(net, np.array([0, 0]), np.array([3, 3]))
    counts = ana.fixed_counts()
    assert set(counts) == {1, 3}
    assert counts[1].shape == (1,) and counts[1][0] >= 1  # neuron 2: clamp(round((x1 + 20) / 2), 0, 7) = 7 always
    assert np.all(counts[1] >= ana.fixed_counts("interval")[1])


# ----------------------------------------------------------------------------------------------- certification
@settings(max_examples=80, deadline=None)
@given(networks_and_properties())
def test_certified_properties_are_robust(case: tuple) -> None:
    net, prop = case
    cert = certified_by_symbolic(net, prop)
    robust, _ = brute_force(net, prop)
    if cert[0]:
        assert robust
    assert cert[0] or not certified_by_interval(net, prop)[0]  # row bounds take the better of the two
    if prop.box_size() == 1:
        assert bool(cert[0]) == robust


@settings(max_examples=80, deadline=None)
@given(networks_and_properties())
def test_slack_lower_bound_is_sound_and_exact_on_one_point(case: tuple) -> None:
    """The bound of the least slack never exceeds the enumerated least slack; on a one-point box it is that
    point's slack (no relaxation left)."""
    net, prop = case
    ana = symbolic_analysis(net, np.stack([prop.lo, prop.center]), np.stack([prop.hi, prop.center]))
    low = ana.slack_lower_bounds(prop)
    assert low.shape == (2,) and int(low[0]) <= least_slack(net, prop)
    assert int(low[1]) == int(prop.slack(execute(net, prop.center[None])[-1].reshape(1, -1))[0])
    np.testing.assert_array_equal(ana.refutes(prop), low > 0)


@settings(max_examples=20, deadline=None)
@given(networks_and_properties())
def test_batched_and_subbox_forms_agree(case: tuple) -> None:
    net, prop = case
    rng = np.random.default_rng(1)
    props = [prop] + [robustness_property(net, rng.integers(net.input_lo, net.input_hi + 1, net.num_inputs),
                                          int(rng.integers(0, net.num_outputs)), radius=1) for _ in range(3)]
    batched = certified_by_symbolic(net, props)
    np.testing.assert_array_equal(batched, [certified_by_symbolic(net, p)[0] for p in props])
    sub = certified_by_symbolic(net, prop, boxes=(np.stack([prop.lo, prop.lo]), np.stack([prop.hi, prop.lo])))
    assert sub.shape == (2,) and (sub[1] or not sub[0])  # the one-point sub-box is easier
    ana = symbolic_analysis(net, np.stack([prop.lo, prop.lo]), np.stack([prop.hi, prop.lo]))
    np.testing.assert_array_equal(ana.refutes(prop), sub)


@pytest.mark.skipif(not P1_6.exists() or not MNIST1000.exists(), reason="QVIP anchors not available")
def test_p1_6_real_mnist_sound_and_tighter() -> None:
    """P1-6 at r = 3 on 12 real MNIST test images: bounds are sound on sampled box points (corners included),
    and symbolic certifies at least as many properties as intervals."""
    from qverify.io.h5 import load_qvip_h5

    net = load_qvip_h5(P1_6)
    data = np.load(MNIST1000)
    ids = range(200, 212)
    x = pixels_to_grid(net, data["images"][list(ids)])
    labels = data["labels"][list(ids)]
    props = [robustness_property(net, x[k], int(labels[k]), radius=3) for k in range(len(x))]
    lo = np.stack([p.lo for p in props])
    hi = np.stack([p.hi for p in props])
    ana = symbolic_analysis(net, lo, hi)
    rng = np.random.default_rng(0)
    for k in range(len(x)):
        pts = np.concatenate([rng.integers(lo[k], hi[k] + 1, size=(300, 784)),
                              np.where(rng.random((100, 784)) < 0.5, lo[k], hi[k]), lo[k:k + 1], hi[k:k + 1]])
        vals = execute(net, pts)
        for (bl, bh), v in zip(ana.bounds, vals, strict=True):
            assert np.all(v >= bl[k]) and np.all(v <= bh[k])
    cs = certified_by_symbolic(net, props)
    ci = certified_by_interval(net, props)
    assert np.all(cs >= ci) and cs.sum() > ci.sum()
    assert not np.any(cs & (predict(net, x) != labels))


def teardown_module() -> None:
    if TIGHTER["neurons"]:
        print(f"\nsymbolic vs interval on refined layers: tighter {TIGHTER['tighter']}, looser {TIGHTER['looser']}"
              f" of {TIGHTER['neurons']} neurons")


def test_rows_with_huge_coefficients_fall_back_to_exact_intervals() -> None:
    net = QNetwork((2,), 0, 3, (Dense([[2, -1], [1, 1]], [1, 0]), Requantize.pow2(1, 0, 7),
                                Dense([[1, -1], [-1, 2]], [0, 1]), Requantize.pow2(0, -8, 7)))
    lo, hi = np.array([[0, 0]]), np.array([[3, 3]])
    ana = symbolic_analysis(net, lo, hi)
    rows = np.array([[2**60, -(2**60)], [1, -1]])
    low = ana.row_lower_bounds(rows)
    y = execute(net, np.array([[a, b] for a in range(4) for b in range(4)]))[-1]
    true_min = [min(int(r[0]) * int(v[0]) + int(r[1]) * int(v[1]) for v in y) for r in rows]
    assert int(low[0, 0]) <= true_min[0] and int(low[0, 1]) <= true_min[1]
    assert int(low[0, 0]) == 2**60 * (int(ana.bounds[-1][0][0, 0]) - int(ana.bounds[-1][1][0, 1]))



@settings(max_examples=40, deadline=None)
@given(nets_and_boxes(float32=True), st.sampled_from(["symbolic", "interval"]), st.integers(1, 3))
def test_float32_symbolic_bounds_contain_every_executed_value(case: tuple, intermediate: str, levels: int) -> None:
    """The same on networks with onnxruntime's float32 requantizations."""
    test_symbolic_bounds_contain_every_executed_value.hypothesis.inner_test(case, intermediate, levels)


@settings(max_examples=20, deadline=None)
@given(tiny_networks(float32=True), st.integers(0, 2**32 - 1))
def test_float32_point_boxes_are_exact(net: QNetwork, seed: int) -> None:
    assert_exact_on_points(symbolic_bounds, net, seed, 3)


@settings(max_examples=30, deadline=None)
@given(networks_and_properties(float32=True))
def test_float32_certified_properties_are_robust(case: tuple) -> None:
    test_certified_properties_are_robust.hypothesis.inner_test(case)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_step_relaxation_is_exactly_valid(seed: int) -> None:
    """The lines of a step function's relaxation lie below / above it at every integer of the bounds, in exact
    rationals, and beat the constants ``f(l), f(u)`` somewhere (the point of the vertex relaxation)."""
    from fractions import Fraction

    from qverify.bounds.symbolic import _step_relaxation
    from qverify.execute import step_function
    from qverify.network import Step

    rng = np.random.default_rng(seed)
    k, c = int(rng.integers(1, 6)), int(rng.integers(1, 3))
    cuts = np.sort(rng.choice(np.arange(-20, 20), size=(c, k), replace=False), axis=1)
    levels = np.cumsum(np.concatenate([[int(rng.integers(-5, 5))], rng.integers(0, 4, size=k)]))
    op = Step(cuts, tuple(int(v) for v in levels))
    shape = (c, 2)
    lo = rng.integers(-25, 25, size=(3, 2 * c))
    hi = lo + rng.integers(0, 30, size=(3, 2 * c))
    rel = _step_relaxation(op, shape, lo, hi)
    for b in range(3):
        for j in range(2 * c):
            xs = np.arange(lo[b, j], hi[b, j] + 1)
            pts = np.zeros((len(xs), 2 * c), np.int64)
            pts[:, j] = xs
            f = step_function(op, pts.reshape(len(xs), *shape)).reshape(len(xs), -1)[:, j]
            aL, bL, aU, bU = (Fraction(float(v[b, j])) for v in (rel.aL, rel.bL, rel.aU, rel.bU))
            for x, fx in zip(xs.tolist(), f.tolist(), strict=True):
                assert aL * x + bL <= fx <= aU * x + bU


def test_step_relaxation_beats_constants_on_sign() -> None:
    """``Sign`` over ``[-5, 5]``: the constant bounds are ``-1 <= y <= 1``; the lines are tighter at the ends
    (the lower line exceeds -1 at x = 5, the upper one is below 1 at x = -5), so back-substitution gains."""
    from qverify.bounds.symbolic import _step_relaxation
    from qverify.network import Step

    rel = _step_relaxation(Step.sign(), (1,), np.array([[-5]]), np.array([[5]]))
    assert rel.aL[0, 0] > 0 and rel.aL[0, 0] * 5 + rel.bL[0, 0] > -1
    assert rel.aU[0, 0] > 0 and rel.aU[0, 0] * -5 + rel.bU[0, 0] < 1
