"""The executor against an independent, slow, pure-Python-integer reference implementation."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import InputError, execute, forward, predict
from qverify.network import Clamp, Conv2d, Dense, Flatten, Requantize
from qverify.quant import round_fraction
from tests.fixtures import tiny_fixed_point_mlp, tiny_networks
from tests.test_quant import f32_reference


def ref_layer(layer, x: list) -> list:
    """Nested lists of Python ints; the textbook definitions."""
    if isinstance(layer, Dense):
        return [sum(int(w) * v for w, v in zip(row, x, strict=True)) + int(b)
                for row, b in zip(layer.weight, layer.bias, strict=True)]
    if isinstance(layer, Conv2d):
        o, c, kh, kw = layer.weight.shape
        h, w = len(x[0]), len(x[0][0])
        pt, pl, pb, pr = layer.padding

        def at(ch, i, j):
            i, j = i - pt, j - pl
            return x[ch][i][j] if 0 <= i < h and 0 <= j < w else layer.pad_value

        oh = (h + pt + pb - (kh - 1) * layer.dilation[0] - 1) // layer.stride[0] + 1
        ow = (w + pl + pr - (kw - 1) * layer.dilation[1] - 1) // layer.stride[1] + 1
        return [[[sum(int(layer.weight[oc, ch, u, v]) * at(ch, i * layer.stride[0] + u * layer.dilation[0],
                                                             j * layer.stride[1] + v * layer.dilation[1])
                      for ch in range(c) for u in range(kh) for v in range(kw)) + int(layer.bias[oc])
                  for j in range(ow)] for i in range(oh)] for oc in range(o)]
    if isinstance(layer, Flatten):
        return list(np.asarray(x, dtype=object).ravel())
    if isinstance(layer, Requantize):
        mults = layer.multipliers()
        zps = [int(z) for z in layer.zero_point]

        def rq(v, ch):
            m = mults[ch if len(mults) > 1 else 0]
            z = zps[ch if len(zps) > 1 else 0]
            if layer.float32_scale is not None:  # onnxruntime's float32 arithmetic, on the exact float32 oracle
                m32 = layer.float32_scale[ch if len(layer.float32_scale) > 1 else 0]
                return min(max(f32_reference(v, m32) + z, layer.lo), layer.hi)
            return min(max(round_fraction(Fraction(v) * m, layer.rounding) + z, layer.lo), layer.hi)

        return [(rq(v, ch) if not isinstance(v, list) else
                 [[rq(e, ch) for e in row] for row in v]) for ch, v in enumerate(x)]
    if isinstance(layer, Clamp):
        def cl(v):
            return [cl(e) for e in v] if isinstance(v, list) else min(max(v, layer.lo), layer.hi)
        return cl(x)
    raise AssertionError(layer)


@given(tiny_networks(), st.integers(0, 2**32 - 1))
@settings(max_examples=80, deadline=None)
def test_executor_matches_reference(net, seed):
    rng = np.random.default_rng(seed)
    xs = rng.integers(net.input_lo, net.input_hi + 1, size=(3, *net.input_shape))
    vals = execute(net, xs)
    for b in range(3):
        v = xs[b].tolist()
        for i, layer in enumerate(net.layers):
            v = ref_layer(layer, v)
            assert np.array_equal(np.asarray(v, dtype=np.int64), vals[i + 1][b]), f"layer {i}"


def test_hand_network():
    net = tiny_fixed_point_mlp()
    # x = (3, 1): fc0 = (2*3 - 1 + 1, 4) = (6, 4); /2 half-up -> (3, 2); fc1 = (1, -3 + 4 + 1) = (1, 2)
    assert forward(net, np.array([[3, 1]])).tolist() == [[1, 2]]
    assert predict(net, np.array([[3, 1]])).tolist() == [1]


def test_argmax_first_tie_rule():
    net = tiny_fixed_point_mlp()
    x = np.array([[a, b] for a in range(4) for b in range(4)])
    y = forward(net, x)
    p = predict(net, x)
    for yy, pp in zip(y, p, strict=True):
        assert pp == min(i for i in range(2) if yy[i] == yy.max())


def test_inputs_checked():
    net = tiny_fixed_point_mlp()
    with pytest.raises(InputError, match="grid"):
        forward(net, np.array([[4, 0]]))
    with pytest.raises(InputError, match="integers"):
        forward(net, np.array([[0.5, 0]]))
    with pytest.raises(InputError, match="shape"):
        forward(net, np.array([[1, 2, 3]]))


def test_large_affine_multiplier_exact():
    # a float64 multiplier with a full 53-bit mantissa, accumulators up to 2^30: products exceed int64
    m = Fraction(0.1234567890123)
    net_layers = (Dense([[2**15, 2**14]], [7]), Requantize.affine([m], 3, -2**40, 2**40, "half_even"))
    from qverify.network import QNetwork

    net = QNetwork((2,), 0, 2**15, net_layers)
    x = np.array([[2**15, 2**15 - 1], [1, 0], [12345, 321]])
    got = forward(net, x)[:, 0].tolist()
    want = [round((Fraction(int(a) * 2**15 + int(b) * 2**14 + 7)) * m) + 3 for a, b in x]
    assert got == want


@given(tiny_networks(float32=True), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_float32_executor_matches_reference(net, seed):
    """Networks with onnxruntime's float32 requantizations (dense and conv, per-tensor and per-channel) against the
    reference on the exact float32 oracle."""
    test_executor_matches_reference.hypothesis.inner_test(net, seed)


@given(st.lists(st.integers(-(2**15), 2**15), min_size=2, max_size=2), st.floats(2.0**-12, 2.0),
       st.integers(-5, 5), st.booleans())
@settings(max_examples=100, deadline=None)
def test_float32_requantization_of_big_accumulators(x, m, z, per_channel):
    """Accumulators far beyond 2^24 (where fl32(acc) rounds): the executor is the float32 arithmetic, not the
    exact fraction, and its step tables (the cut points) agree with its direct evaluation."""
    from qverify.execute import requantize, step_tables
    from qverify.network import QNetwork

    m32 = float(np.float32(m))
    ms = [m32, float(np.float32(m32 * 1.5))] if per_channel else [m32]
    rq = Requantize.float32(ms, [z], -(2**15), 2**15)
    net = QNetwork((2,), -(2**15), 2**15, (Dense([[2**12, 3], [2**11 + 1, -(2**12)]], [5, -7]), rq))
    xs = np.array([x, [2**15, 2**15], [-(2**15), 2**15 - 1]])
    got = forward(net, xs)
    acc = xs @ np.array([[2**12, 3], [2**11 + 1, -(2**12)]]).T + np.array([5, -7])
    for b in range(len(xs)):
        for c in range(2):
            mc = ms[c if per_channel else 0]
            assert got[b, c] == min(max(f32_reference(int(acc[b, c]), mc) + z, -(2**15)), 2**15)
    assert rq.shift is None and rq.semantics == "float32"
    tables = step_tables(rq)
    assert tables is not None
    for c in range(2):
        y = rq.lo + np.searchsorted(tables[c if per_channel else 0], acc[:, c], side="right")
        np.testing.assert_array_equal(y, requantize(rq, acc)[:, c])


def test_float32_is_not_a_shift():
    """A float32 multiplier 1.0 (or 0.5) is not the exact shift: fl32(2^24 + 1) = 2^24."""
    from qverify.network import QNetwork

    acc = np.array([[2**24 + 1]])
    exact = Requantize((1,), (1,), [0], 0, 2**26, "half_even")
    f32 = Requantize.float32([1.0], [0], 0, 2**26)
    assert exact.shift == 0 and f32.shift is None
    net = QNetwork((1,), 0, 2**25, (Dense([[1]], [1]), f32))
    assert forward(net, acc - 1)[0, 0] == 2**24
    net = QNetwork((1,), 0, 2**25, (Dense([[1]], [1]), exact))
    assert forward(net, acc - 1)[0, 0] == 2**24 + 1
