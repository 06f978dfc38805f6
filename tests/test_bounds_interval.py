"""Exact integer interval bounds: soundness against the executor, exactness where intervals are exact, and
certification checked by brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.bounds.interval import (
    INTERVAL,
    _center_radius_dtype,
    _center_radius_exact,
    certified_by_interval,
    interval_bounds,
    interval_output_bounds,
    refutes_unsafe,
    row_lower_bounds,
)
from qverify.execute import execute, forward
from qverify.network import ALL_OPS, Conv2d, Dense, Flatten, QNetwork, Requantize
from qverify.property import robustness_property
from tests.fixtures import (
    all_box_points,
    assert_exact_on_points,
    brute_force,
    networks_and_properties,
    random_conv_network,
    tiny_fixed_point_mlp,
    tiny_networks,
)


@st.composite
def nets_and_boxes(draw: st.DrawFn, conv: bool | None = None, boxes: int = 3, float32: bool = False) -> tuple:
    net = draw(tiny_networks(conv=conv, float32=float32))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = rng.integers(net.input_lo, net.input_hi + 1, size=(boxes, net.num_inputs))
    r = rng.integers(0, draw(st.integers(1, 3)), size=(boxes, net.num_inputs))
    lo = np.maximum(c - r, net.input_lo)
    hi = np.minimum(c + r, net.input_hi)
    return net, lo, hi


def _points(lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator, limit: int = 4000) -> np.ndarray:
    """Every integer point of a small box (random samples plus the corners lo and hi for a big one)."""
    size = int(np.prod((hi - lo + 1).astype(float)))
    if size <= limit:
        axes = [np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(lo))
    pts = rng.integers(lo, hi + 1, size=(limit, len(lo)))
    return np.concatenate([pts, lo[None], hi[None]])


@settings(max_examples=120, deadline=None)
@given(nets_and_boxes())
def test_interval_bounds_contain_every_executed_value(case: tuple) -> None:
    net, lo, hi = case
    bounds = interval_bounds(net, lo, hi)
    assert len(bounds) == len(net.layers) + 1
    rng = np.random.default_rng(0)
    for k in range(len(lo)):
        pts = _points(lo[k], hi[k], rng)
        values = execute(net, pts)
        for i, ((bl, bh), v) in enumerate(zip(bounds, values, strict=True)):
            assert bl.shape == (len(lo), *net.shapes[i]) and bl.dtype == np.int64
            assert np.all(v >= bl[k]) and np.all(v <= bh[k]), f"layer value {i} escapes its interval"


@settings(max_examples=60, deadline=None)
@given(tiny_networks(), st.integers(0, 2**32 - 1))
def test_point_boxes_give_the_exact_values(net: QNetwork, seed: int) -> None:
    """On a one-point box every interval must collapse to the executed value (no slack anywhere)."""
    assert_exact_on_points(interval_bounds, net, seed, 4)


@settings(max_examples=60, deadline=None)
@given(nets_and_boxes())
def test_first_layer_bounds_are_attained(case: tuple) -> None:
    """The first affine layer's interval is the exact range: both ends are attained at box corners."""
    net, lo, hi = case
    layer = net.layers[0]
    bounds = interval_bounds(net, lo, hi)
    for k in range(len(lo)):
        if isinstance(layer, Dense):
            W = layer.weight
            x_lo = np.where(W >= 0, lo[k][None, :], hi[k][None, :])  # minimiser of each row
            x_hi = np.where(W >= 0, hi[k][None, :], lo[k][None, :])
            acc_lo = (W * x_lo).sum(axis=1) + layer.bias
            acc_hi = (W * x_hi).sum(axis=1) + layer.bias
            np.testing.assert_array_equal(bounds[1][0][k], acc_lo)
            np.testing.assert_array_equal(bounds[1][1][k], acc_hi)
        else:  # conv: compare with brute force over the (small) box
            pts = _points(lo[k], hi[k], np.random.default_rng(1), limit=10**6)
            if len(pts) > 20000:
                continue
            acc = execute(net, pts)[1]
            np.testing.assert_array_equal(bounds[1][0][k], acc.min(axis=0))
            np.testing.assert_array_equal(bounds[1][1][k], acc.max(axis=0))


def test_one_box_as_1d_and_output_only_agree() -> None:
    net = tiny_fixed_point_mlp()
    lo, hi = np.array([0, 1]), np.array([2, 3])
    b = interval_bounds(net, lo, hi)
    assert b[0][0].shape == (1, 2)
    ol, oh = interval_output_bounds(net, lo, hi)
    np.testing.assert_array_equal(ol, b[-1][0])
    np.testing.assert_array_equal(oh, b[-1][1])
    # hand check of the first layer: [2 -1; 1 1] x + [1 0] over [0,2] x [1,3]
    np.testing.assert_array_equal(b[1][0][0], [2 * 0 - 3 + 1, 0 + 1])
    np.testing.assert_array_equal(b[1][1][0], [2 * 2 - 1 + 1, 2 + 3])


def test_chunking_matches_one_pass() -> None:
    net = random_conv_network(np.random.default_rng(3), padding=1, pad_value=2, with_clamp=True)
    rng = np.random.default_rng(4)
    c = rng.integers(0, 4, size=(37, net.num_inputs))
    lo, hi = np.maximum(c - 1, 0), np.minimum(c + 1, 3)
    a = interval_bounds(net, lo, hi)
    b = interval_bounds(net, lo, hi, batch_size=5)
    for (al, ah), (bl, bh) in zip(a, b, strict=True):
        np.testing.assert_array_equal(al, bl)
        np.testing.assert_array_equal(ah, bh)


def test_bad_boxes_are_rejected() -> None:
    net = tiny_fixed_point_mlp()
    with pytest.raises(ValueError, match="empty"):
        interval_bounds(net, np.array([2, 2]), np.array([1, 3]))
    with pytest.raises(ValueError):
        interval_bounds(net, np.array([0, 0]), np.array([0, 9]))  # outside the grid [0, 3]
    with pytest.raises(ValueError):
        interval_bounds(net, np.array([0, 0]), np.array([0, 0, 1]))


def test_table_covers_every_layer_type() -> None:
    assert set(INTERVAL) == set(ALL_OPS)


def _huge_net(conv: bool) -> QNetwork:
    """Accumulators between 2^52 and 2^53: the doubled center would not be exact, the signed parts are."""
    w = 2**42
    if conv:
        layers = (Conv2d(np.array([[[[w, -w], [w - 1, -w + 3]]]]), np.array([-w]), padding=(0, 0, 1, 1),
                         pad_value=200), Flatten(),
                  Requantize.pow2(40, -(2**20), 2**20, "half_even"))
        shape = (1, 2, 2)
    else:
        layers = (Dense(np.array([[w, -w, w, w - 7, -w + 5], [-w, w, 3, 4, 5]]), np.array([12345, -w])),
                  Requantize.pow2(40, -(2**20), 2**20, "floor"))
        shape = (5,)
    return QNetwork(shape, 0, 255, layers)


@pytest.mark.parametrize("conv", [False, True])
def test_float64_center_path_is_exact(conv: bool) -> None:
    """Accumulators beyond 2^24 (so not the float32 path) are still exact (float64 center / radius)."""
    rng = np.random.default_rng(5)
    w = 2**20
    if conv:
        layer = Conv2d(rng.integers(-w, w, (2, 1, 2, 2)), rng.integers(-w, w, 2), padding=(1, 0, 0, 1),
                       pad_value=7)
        net = QNetwork((1, 3, 3), 0, 255, (layer, Flatten(), Requantize.pow2(20, -(2**15), 2**15, "half_even")))
    else:
        layer = Dense(rng.integers(-w, w, (3, 5)), rng.integers(-w, w, 3))
        net = QNetwork((5,), 0, 255, (layer, Requantize.pow2(20, -(2**15), 2**15, "half_away")))
    assert _center_radius_dtype(layer, 255) is np.float64
    x = rng.integers(0, 256, size=(30, net.num_inputs))
    for (bl, bh), v in zip(interval_bounds(net, x, x), execute(net, x), strict=True):
        np.testing.assert_array_equal(bl, v)
        np.testing.assert_array_equal(bh, v)
    lo, hi = np.maximum(x - 2, 0), np.minimum(x + 2, 255)
    bounds = interval_bounds(net, lo, hi)
    for k in range(len(x)):
        vals = execute(net, _points(lo[k], hi[k], rng, limit=500))
        for (bl, bh), v in zip(bounds, vals, strict=True):
            assert np.all(v >= bl[k]) and np.all(v <= bh[k])


@pytest.mark.parametrize("conv", [False, True])
def test_huge_accumulators_stay_exact(conv: bool) -> None:
    net = _huge_net(conv)
    assert not _center_radius_exact(net.layers[0], 255)  # the signed-parts path is the one under test
    rng = np.random.default_rng(0)
    c = rng.integers(0, 256, size=(50, net.num_inputs))
    lo, hi = np.maximum(c - 3, 0), np.minimum(c + 3, 255)
    lo[0], hi[0] = 0, 255
    bounds = interval_bounds(net, lo, hi)
    # exact Python-int reference for the affine layer over the box corners (dense) / by points (conv)
    for k in range(len(lo)):
        pts = np.concatenate([lo[k:k + 1], hi[k:k + 1], rng.integers(lo[k], hi[k] + 1, (200, net.num_inputs))])
        vals = execute(net, pts)
        for (bl, bh), v in zip(bounds, vals, strict=True):
            assert np.all(v >= bl[k]) and np.all(v <= bh[k])
    if not conv:
        W = [[int(v) for v in row] for row in net.layers[0].weight]
        b = [int(v) for v in net.layers[0].bias]
        for k in range(5):
            for o in range(2):
                exact_lo = b[o] + sum(wi * int(lo[k][i] if wi >= 0 else hi[k][i]) for i, wi in enumerate(W[o]))
                assert int(bounds[1][0][k][o]) == exact_lo


# ----------------------------------------------------------------------------------------------- properties
def test_row_lower_bounds_exact_and_big() -> None:
    A = np.array([[1, -1, 0], [0, 2, -3]])
    ylo = np.array([[0, -1, 2]])
    yhi = np.array([[3, 4, 5]])
    np.testing.assert_array_equal(row_lower_bounds(A, ylo, yhi), [[0 - 4, -2 - 15]])
    big = np.array([[2**61, 2**61]])
    out = row_lower_bounds(big, np.array([[3, 3]]), np.array([[3, 3]]))
    assert int(out[0, 0]) == 3 * 2**62  # beyond int64: exact Python ints


@settings(max_examples=80, deadline=None)
@given(networks_and_properties())
def test_certified_properties_are_robust(case: tuple) -> None:
    net, prop = case
    cert = certified_by_interval(net, prop)
    assert cert.shape == (1,)
    robust, _ = brute_force(net, prop)
    if cert[0]:
        assert robust
    if prop.box_size() == 1:  # one point: the interval is exact, so it decides
        assert bool(cert[0]) == robust


@settings(max_examples=30, deadline=None)
@given(networks_and_properties())
def test_batched_properties_and_subboxes(case: tuple) -> None:
    net, prop = case
    rng = np.random.default_rng(0)
    others = [robustness_property(net, rng.integers(net.input_lo, net.input_hi + 1, net.num_inputs),
                                  int(rng.integers(0, net.num_outputs)), radius=int(rng.integers(0, 2)))
              for _ in range(4)]
    props = [prop, *others]
    batched = certified_by_interval(net, props)
    single = np.array([certified_by_interval(net, p)[0] for p in props])
    np.testing.assert_array_equal(batched, single)
    # sub-boxes: every single point of the box, decided exactly
    pts = all_box_points(prop)[:200]
    sub = certified_by_interval(net, prop, boxes=(pts, pts))
    np.testing.assert_array_equal(sub, ~prop.is_violated(forward(net, pts)))
    ylo, yhi = interval_output_bounds(net, pts, pts)
    np.testing.assert_array_equal(refutes_unsafe(prop, ylo, yhi), sub)



@settings(max_examples=40, deadline=None)
@given(nets_and_boxes(float32=True))
def test_float32_interval_bounds_contain_every_executed_value(case: tuple) -> None:
    """The same on networks with onnxruntime's float32 requantizations (monotone: the endpoints bound them)."""
    test_interval_bounds_contain_every_executed_value.hypothesis.inner_test(case)


@settings(max_examples=20, deadline=None)
@given(tiny_networks(float32=True), st.integers(0, 2**32 - 1))
def test_float32_point_boxes_give_the_exact_values(net: QNetwork, seed: int) -> None:
    test_point_boxes_give_the_exact_values.hypothesis.inner_test(net, seed)
