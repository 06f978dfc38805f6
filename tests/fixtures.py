"""Shared tiny networks, properties and hypothesis strategies for the whole test suite.

Every network here is small enough that brute-force enumeration of an input box is the oracle.
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from qverify.network import Clamp, Conv2d, Dense, Flatten, QNetwork, Requantize
from qverify.property import Property, robustness_property
from qverify.quant import Rounding

SHARED = Path(__file__).resolve().parents[2] / "shared"
QVIP = SHARED / "anchors" / "qvip"
P1_6 = QVIP / "S3L-official_QVIP" / "QNN_benchmark" / "mnist_mlp.h5"
MNIST1000 = SHARED / "data" / "mnist_test_first1000.npz"
CIFAR100 = SHARED / "data" / "cifar10_sample100.npz"

#: marks a test that needs a CUDA device (skipped on CPU-only machines such as CI; run where a GPU is lent)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _requant(rng: np.random.Generator, channels: int, lo: int, hi: int, rounding: Rounding, affine: bool,
             per_channel: bool) -> Requantize:
    if not affine:
        return Requantize.pow2(int(rng.integers(0, 4)), lo, hi, rounding)
    n = channels if per_channel else 1
    # non-dyadic rationals, as ONNX's s_in * s_w / s_out are
    mult = [Fraction(int(rng.integers(1, 12)), int(rng.integers(3, 40))) for _ in range(n)]
    zp = rng.integers(lo, min(hi, lo + 3) + 1, size=n) if n > 1 else np.array([int(rng.integers(lo, lo + 2))])
    return Requantize(tuple(m.numerator for m in mult), tuple(m.denominator for m in mult), zp, lo, hi, rounding)


def random_dense_network(rng: np.random.Generator, n_in: int = 4, hidden: tuple[int, ...] = (5, 4),
                         n_out: int = 3, input_hi: int = 7, rounding: Rounding = Rounding.HALF_UP,
                         affine: bool = False, per_channel: bool = False, wmax: int = 4) -> QNetwork:
    """Dense network: (Dense, Requantize[0, 7]) per hidden layer, then Dense, Requantize[-8, 7] (signed)."""
    layers: list = []
    sizes = [n_in, *hidden, n_out]
    for i in range(len(sizes) - 1):
        w = rng.integers(-wmax, wmax + 1, size=(sizes[i + 1], sizes[i]))
        b = rng.integers(-3 * wmax, 3 * wmax + 1, size=sizes[i + 1])
        layers.append(Dense(w, b, name=f"fc{i}"))
        last = i == len(sizes) - 2
        lo, hi = (-8, 7) if last else (0, 7)
        layers.append(_requant(rng, sizes[i + 1], lo, hi, rounding, affine, per_channel))
    return QNetwork((n_in,), 0, input_hi, tuple(layers), name="tiny-dense")


def random_conv_network(rng: np.random.Generator, in_shape: tuple[int, int, int] = (1, 3, 3), channels: int = 2,
                        n_out: int = 3, input_hi: int = 3, rounding: Rounding = Rounding.HALF_UP,
                        affine: bool = False, padding: int = 1, stride: int = 1, pad_value: int = 0,
                        with_clamp: bool = False) -> QNetwork:
    """Conv2d(3x3 or 2x2) -> Requantize -> [Clamp] -> Flatten -> Dense -> Requantize (signed)."""
    c, h, w = in_shape
    k = 2 if min(h, w) + 2 * padding < 3 else 3
    conv = Conv2d(rng.integers(-3, 4, size=(channels, c, k, k)), rng.integers(-4, 5, size=channels),
                  stride=(stride, stride), padding=(padding,) * 4, pad_value=pad_value, name="conv")
    layers: list = [conv, _requant(rng, channels, 0, 7, rounding, affine, per_channel=True)]
    if with_clamp:
        layers.append(Clamp(1, 6))
    shape = conv.output_shape(in_shape)
    layers.append(Flatten())
    n = int(np.prod(shape))
    layers += [Dense(rng.integers(-3, 4, size=(n_out, n)), rng.integers(-6, 7, size=n_out), name="fc"),
               _requant(rng, n_out, -8, 7, rounding, affine, per_channel=False)]
    return QNetwork(in_shape, 0, input_hi, tuple(layers), name="tiny-conv")


def brute_force(net: QNetwork, prop: Property, limit: int = 200_000) -> tuple[bool, np.ndarray | None]:
    """Enumerate the integer box: ``(robust, a violating input or None)``. The oracle of every complete method."""
    from qverify.execute import forward

    size = prop.box_size()
    if size > limit:
        raise ValueError(f"box has {size} points, more than the brute-force limit {limit}")
    axes = [np.arange(l, h + 1) for l, h in zip(prop.lo, prop.hi, strict=True)]
    pts = np.array(list(itertools.product(*axes)), dtype=np.int64)
    bad = prop.is_violated(forward(net, pts))
    if bad.any():
        return False, pts[int(np.argmax(bad))]
    return True, None


def least_slack(net: QNetwork, prop: Property, limit: int = 200_000) -> int:
    """``min`` over the integer box of ``prop.slack`` (enumerated): the oracle of every slack bracket."""
    from qverify.execute import forward

    if prop.box_size() > limit:
        raise ValueError(f"box has {prop.box_size()} points, more than the brute-force limit {limit}")
    return int(prop.slack(forward(net, all_box_points(prop))).min())


def assert_exact_on_points(bounds_fn, net: QNetwork, seed: int, n: int) -> None:
    """On ``n`` one-point boxes every per-layer bound of ``bounds_fn(net, lo, hi)`` must collapse to the value the
    executor computes (no slack anywhere)."""
    from qverify.execute import execute

    x = np.random.default_rng(seed).integers(net.input_lo, net.input_hi + 1, size=(n, net.num_inputs))
    for (bl, bh), v in zip(bounds_fn(net, x, x), execute(net, x), strict=True):
        np.testing.assert_array_equal(bl, v)
        np.testing.assert_array_equal(bh, v)


def all_box_points(prop: Property) -> np.ndarray:
    axes = [np.arange(l, h + 1) for l, h in zip(prop.lo, prop.hi, strict=True)]
    return np.array(list(itertools.product(*axes)), dtype=np.int64)


# ------------------------------------------------------------------------------------------ hypothesis
roundings = st.sampled_from(list(Rounding))


@st.composite
def tiny_networks(draw: st.DrawFn, conv: bool | None = None) -> QNetwork:
    """A random tiny dense or conv network (power-of-two or affine, any rounding mode)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rounding = draw(roundings)
    affine = draw(st.booleans())
    use_conv = draw(st.booleans()) if conv is None else conv
    if use_conv:
        return random_conv_network(rng, rounding=rounding, affine=affine, padding=draw(st.integers(0, 1)),
                                   pad_value=draw(st.integers(0, 2)), with_clamp=draw(st.booleans()))
    hidden = tuple(draw(st.lists(st.integers(2, 5), min_size=1, max_size=2)))
    return random_dense_network(rng, n_in=draw(st.integers(2, 5)), hidden=hidden, rounding=rounding,
                                affine=affine, per_channel=draw(st.booleans()))


@st.composite
def networks_and_properties(draw: st.DrawFn, conv: bool | None = None, max_points: int = 5000
                            ) -> tuple[QNetwork, Property]:
    """A tiny network and a robustness property around a random grid point, with a brute-forceable box."""
    net = draw(tiny_networks(conv=conv))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    from qverify.execute import predict

    label = int(predict(net, x[None, :])[0]) if draw(st.booleans()) else int(rng.integers(0, net.num_outputs))
    radius = draw(st.integers(0, 2))
    prop = robustness_property(net, x, label, radius=radius)
    while prop.box_size() > max_points and radius > 0:
        radius -= 1
        prop = robustness_property(net, x, label, radius=radius)
    return net, prop


def tiny_fixed_point_mlp() -> QNetwork:
    """A fixed, hand-checkable 2-2-2 fixed-point network (half-up rounding)."""
    return QNetwork((2,), 0, 3, (
        Dense([[2, -1], [1, 1]], [1, 0], name="fc0"), Requantize.pow2(1, 0, 7),
        Dense([[1, -1], [-1, 2]], [0, 1], name="fc1"), Requantize.pow2(0, -8, 7),
    ), name="hand-2-2-2")


