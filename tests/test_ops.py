"""The ops (qverify/ops/): each op's executor semantics against an independent reference (torch, loops), and the
linear-map protocol's identities (transpose is the adjoint, the parts add up, the matrices are the map)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import apply_layer
from qverify.network import (
    Add,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    LinearMap,
    MaxPool2d,
    ModelError,
    Pad,
    QNetwork,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
)


def _conv_case(rng: np.random.Generator) -> tuple[Conv2d, tuple[int, int, int]]:
    groups = int(rng.choice([1, 2]))
    cg = int(rng.integers(1, 3))
    og = int(rng.integers(1, 3))
    k = int(rng.integers(1, 4))
    conv = Conv2d(rng.integers(-4, 5, size=(og * groups, cg, k, k)), rng.integers(-5, 6, size=og * groups),
                  stride=tuple(int(s) for s in rng.integers(1, 3, size=2)),
                  padding=tuple(int(p) for p in rng.integers(0, 2, size=4)),
                  dilation=tuple(int(d) for d in rng.integers(1, 3, size=2)), pad_value=int(rng.integers(0, 4)),
                  groups=groups)
    return conv, (cg * groups, int(rng.integers(4, 7)), int(rng.integers(4, 7)))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_grouped_conv_is_torchs_conv2d(seed: int) -> None:
    """``y = conv(pad(x, pad_value), W, stride, dilation, groups) + b``, by torch in float64."""
    rng = np.random.default_rng(seed)
    conv, shape = _conv_case(rng)
    try:
        conv.output_shape(shape)
    except ModelError:
        return
    x = rng.integers(0, 16, size=(3, *shape))
    pt, pl, pb, pr = conv.padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=conv.pad_value)
    f64 = torch.float64
    ref = torch.nn.functional.conv2d(torch.tensor(xp, dtype=f64), torch.tensor(conv.weight, dtype=f64),
                                     torch.tensor(conv.bias, dtype=f64), conv.stride, 0, conv.dilation, conv.groups)
    np.testing.assert_array_equal(apply_layer(conv, x), ref.numpy().astype(np.int64))


def test_depthwise_conv_by_hand() -> None:
    """groups = channels: each output channel sees only its own input channel."""
    w = np.array([[[[1, 0], [0, 0]]], [[[0, 0], [0, 2]]]])
    conv = Conv2d(w, np.array([0, 1]), groups=2)
    x = np.arange(2 * 3 * 3).reshape(1, 2, 3, 3)
    y = apply_layer(conv, x)
    np.testing.assert_array_equal(y[0, 0], x[0, 0, :2, :2])
    np.testing.assert_array_equal(y[0, 1], 2 * x[0, 1, 1:, 1:] + 1)


def _naive_pool(x: np.ndarray, kernel, stride, padding, fill, reduce, dilation=(1, 1)) -> np.ndarray:
    b, c, h, w = x.shape
    pt, pl, pb, pr = padding
    oh = (h + pt + pb - (kernel[0] - 1) * dilation[0] - 1) // stride[0] + 1
    ow = (w + pl + pr - (kernel[1] - 1) * dilation[1] - 1) // stride[1] + 1
    out = np.zeros((b, c, oh, ow), dtype=np.int64)
    for n, ch, i, j in itertools.product(range(b), range(c), range(oh), range(ow)):
        cells = []
        for u, v in itertools.product(range(kernel[0]), range(kernel[1])):
            r, q = i * stride[0] + u * dilation[0] - pt, j * stride[1] + v * dilation[1] - pl
            if 0 <= r < h and 0 <= q < w:
                cells.append(int(x[n, ch, r, q]))
            elif fill is not None:
                cells.append(fill)
        out[n, ch, i, j] = reduce(cells)
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_max_pool_by_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = tuple(int(v) for v in rng.integers(1, 4, size=2))
    pad = tuple(int(rng.integers(0, k[i % 2])) for i in range(4))
    pool = MaxPool2d(k, tuple(int(s) for s in rng.integers(1, 3, size=2)), pad,
                     tuple(int(d) for d in rng.integers(1, 3, size=2)))
    x = rng.integers(-50, 50, size=(2, 2, 6, 5))
    try:
        pool.output_shape(x.shape[1:])
    except ModelError:
        return
    ref = _naive_pool(x, pool.kernel, pool.stride, pool.padding, None, max, pool.dilation)
    np.testing.assert_array_equal(apply_layer(pool, x), ref)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_sum_pool_by_loops(seed: int) -> None:
    """``k[i, j] * (sum of the window, padded cells pad_value)``."""
    rng = np.random.default_rng(seed)
    k = tuple(int(v) for v in rng.integers(1, 4, size=2))
    pad = tuple(int(p) for p in rng.integers(0, 2, size=4))
    stride = tuple(int(s) for s in rng.integers(1, 3, size=2))
    x = rng.integers(0, 20, size=(2, 3, 5, 6))
    plain = SumPool2d(k, stride, pad, int(rng.integers(0, 5)))
    oh, ow = plain.output_shape(x.shape[1:])[1:]
    weight = rng.integers(1, 5, size=(oh, ow))
    pool = SumPool2d(k, stride, pad, plain.pad_value, weight)
    ref = _naive_pool(x, k, stride, pad, plain.pad_value, sum)
    np.testing.assert_array_equal(apply_layer(plain, x), ref)
    np.testing.assert_array_equal(apply_layer(pool, x), ref * weight)


def test_movement_ops_are_numpys() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-9, 9, size=(2, 2, 3, 4))
    np.testing.assert_array_equal(apply_layer(Flatten(), x), x.reshape(2, -1))
    np.testing.assert_array_equal(apply_layer(Reshape((6, 4)), x), x.reshape(2, 6, 4))
    np.testing.assert_array_equal(apply_layer(Transpose((1, 2, 0)), x), x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(apply_layer(Pad((1, 0, 0, 1, 0, 2), 7), x),
                                  np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 2)), constant_values=7))
    z = rng.integers(-9, 9, size=(2, 1, 3, 4))
    np.testing.assert_array_equal(apply_layer(Concat(0, 2), [x, z]), np.concatenate([x, z], axis=1))
    np.testing.assert_array_equal(apply_layer(Add((2, -3), 5), [x, x[:, ::-1]]), 2 * x - 3 * x[:, ::-1] + 5)


def test_step_functions() -> None:
    x = np.array([[-3, -1, 0, 1, 4]])
    np.testing.assert_array_equal(apply_layer(Step.sign(), x), np.sign(x))
    larq = Step(np.array([[0]]), (-1, 1))  # Larq's sign: 0 goes to +1
    np.testing.assert_array_equal(apply_layer(larq, x), np.where(x >= 0, 1, -1))
    per_channel = Step(np.array([[2], [-1]]), (-1, 1))
    x2 = np.array([[[1, 2, 3], [-2, -1, 0]]])
    np.testing.assert_array_equal(apply_layer(per_channel, x2), [[[-1, 1, 1], [-1, 1, 1]]])
    with pytest.raises(ModelError, match="increase strictly"):
        Step(np.array([[1, 1]]), (0, 1, 2))
    with pytest.raises(ModelError, match="non-decreasing"):
        Step(np.array([[0]]), (1, -1))


# --------------------------------------------------------------------------------- the linear-map protocol
def _linear_cases(rng: np.random.Generator) -> list[tuple[LinearMap, list[tuple[int, ...]]]]:
    conv, shape = _conv_case(rng)
    try:
        conv.output_shape(shape)
    except ModelError:
        conv, shape = Conv2d(rng.integers(-3, 4, size=(2, 1, 2, 2)), np.array([1, -1])), (1, 4, 4)
    return [
        (Dense(rng.integers(-5, 6, size=(3, 4)), rng.integers(-5, 6, size=3)), [(4,)]),
        (conv, [shape]),
        (SumPool2d((2, 2), (1, 2), (1, 0, 0, 1), 3, rng.integers(1, 4, size=(4, 3))), [(2, 4, 5)]),
        (Add((3, -2), 4), [(2, 3), (2, 3)]),
        (Flatten(), [(2, 2, 3)]),
        (Reshape((3, 4)), [(2, 2, 3)]),
        (Transpose((2, 0, 1)), [(2, 2, 3)]),
        (Pad((1, 0, 0, 2), -3), [(2, 3)]),
        (Concat(1, 3), [(2, 1, 3), (2, 2, 3), (2, 1, 3)]),
    ]


@pytest.mark.parametrize("seed", range(5))
def test_linear_map_protocol(seed: int) -> None:
    """For every linear map: ``lam . L(x) = sum_i T_i(lam) . x_i`` (transpose is the adjoint) for each part;
    ``L = L+ + L-`` and ``|L| = L+ - L-``; ``matrices`` equal the map; ``forward = L(x) + offset``; the value
    bound holds."""
    rng = np.random.default_rng(seed)
    for op, shapes in _linear_cases(rng):
        out_shape = op.output_shape(*shapes)
        xs = [rng.integers(-6, 7, size=(3, *s)).astype(np.float64) for s in shapes]
        lam = rng.integers(-4, 5, size=(2, *out_shape)).astype(np.float64)
        for part in ("w", "abs", "pos", "neg"):
            y = op.linear(xs, part)
            back = op.transpose(lam, shapes, part)
            lhs = np.einsum("rk,bk->br", lam.reshape(2, -1), y.reshape(3, -1))
            rhs = sum(np.einsum("rk,bk->br", t.reshape(2, -1), x.reshape(3, -1)) for t, x in zip(back, xs, strict=True))
            np.testing.assert_array_equal(lhs, rhs, err_msg=f"{op.kind} {part}")
        np.testing.assert_array_equal(op.linear(xs, "pos") + op.linear(xs, "neg"), op.linear(xs, "w"))
        np.testing.assert_array_equal(op.linear([np.abs(x) for x in xs], "pos")
                                      - op.linear([np.abs(x) for x in xs], "neg"),
                                      op.linear([np.abs(x) for x in xs], "abs"))
        mats = op.matrices(shapes)
        via = sum(x.reshape(3, -1) @ m.toarray().T for m, x in zip(mats, xs, strict=True))
        np.testing.assert_array_equal(via, op.linear(xs).reshape(3, -1))
        ints = [x.astype(np.int64) for x in xs]
        y = apply_layer(op, ints if len(ints) > 1 else ints[0])
        np.testing.assert_array_equal(y, op.linear(xs) + op.offset(shapes))
        bound = op.value_bound([6] * len(shapes), shapes)
        assert np.abs(y).max() <= bound


def test_graph_validation_names_the_node() -> None:
    dense = Dense(np.eye(2, dtype=np.int64), np.zeros(2, np.int64))
    with pytest.raises(ModelError, match=r"layer 1 .*reads 1 values, the op takes 2"):
        QNetwork((2,), 0, 3, (dense, Add((1, 1))), inputs=((0,), (1,)))
    with pytest.raises(ModelError, match=r"node 1: inputs \(2,\) must be earlier values"):
        QNetwork((2,), 0, 3, (dense, dense), inputs=((0,), (2,)))
    with pytest.raises(ModelError, match="inputs of different shapes"):
        QNetwork((2,), 0, 3, (Dense(np.ones((3, 2), np.int64), np.zeros(3, np.int64)), Add((1, 1))),
                 inputs=((0,), (0, 1)))
    net = QNetwork((2,), 0, 3, (dense, Add((1, 2), 1)), inputs=((0,), (0, 1)))
    assert not net.is_chain
    with pytest.raises(ModelError, match="chain networks only .*Add"):
        net.require_chain("this method")
    assert net.value_ranges[2] == (-10, 10)


def test_lookup_tables() -> None:
    """``table_c[x - start]`` per channel; the domain must cover the input's range (validation)."""
    from qverify.network import Lookup, Requantize

    t = np.array([5, -2, 7, 0])
    x = np.array([[[3, 4], [5, 6]]])  # domain 3..6
    np.testing.assert_array_equal(apply_layer(Lookup(3, t), x), t[x - 3])
    per = Lookup(3, np.stack([t, -t]))
    y = apply_layer(per, np.array([[[3, 4], [5, 6]]]).reshape(1, 2, 2))
    np.testing.assert_array_equal(y, [[t[[0, 1]], -t[[2, 3]]]])
    dense = Dense(np.eye(2, dtype=np.int64), np.zeros(2, np.int64))
    with pytest.raises(ModelError, match=r"input values \[0, 7\] leave the table's domain \[3, 6\]"):
        QNetwork((2,), 0, 3, (dense, Requantize.pow2(0, 0, 7), Lookup(3, t)))
    net = QNetwork((2,), 0, 3, (dense, Requantize.pow2(0, 3, 6), Lookup(3, t)))
    assert net.value_ranges[-1] == (-2, 7)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_lookup_interval_is_the_exact_range(seed: int) -> None:
    """The range-minimum queries give the exact min and max of the table over every interval."""
    from qverify.bounds.interval import lookup_range
    from qverify.network import Lookup

    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 70))
    op = Lookup(int(rng.integers(-5, 5)), rng.integers(-50, 50, size=(2, d)))
    a = rng.integers(0, d, size=(30, 2))
    b = np.minimum(a + rng.integers(0, d, size=(30, 2)), d - 1)
    lo, hi = lookup_range(op, a + op.start, b + op.start)
    for k in range(30):
        for ch in range(2):
            seg = op.table[ch, a[k, ch]:b[k, ch] + 1]
            assert lo[k, ch] == seg.min() and hi[k, ch] == seg.max()
