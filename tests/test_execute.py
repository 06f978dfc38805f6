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
