"""TorchNet: exact equality with the executor on integer inputs; straight-through gradients."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import execute, forward
from qverify.network import (
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
)
from qverify.quant import Rounding
from qverify.torch_net import TorchNet, limit_threads, ste_round
from tests import fixtures as fx
from tests.fixtures import P1_6, GraphBuilder, random_conv_network, random_dense_network, tiny_networks


def _grid_points(net: QNetwork, rng: np.random.Generator, n: int = 64) -> np.ndarray:
    return rng.integers(net.input_lo, net.input_hi + 1, size=(n, net.num_inputs))


@settings(max_examples=60, deadline=None)
@given(tiny_networks(), st.integers(0, 2**32 - 1))
def test_forward_equals_executor_every_layer(net: QNetwork, seed: int) -> None:
    x = _grid_points(net, np.random.default_rng(seed))
    tn = TorchNet(net)
    got = tn.layer_values(torch.from_numpy(x.astype(np.float64)))
    want = execute(net, x)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.array_equal(g.detach().numpy().astype(np.int64), w)
        assert np.array_equal(g.detach().numpy(), w.astype(np.float64))
    assert np.array_equal(tn(torch.from_numpy(x.astype(np.float64))).detach().numpy(),
                          forward(net, x).astype(np.float64))


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_every_mode_and_family(rounding: Rounding, affine: bool, conv: bool) -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        if conv:
            net = random_conv_network(rng, rounding=rounding, affine=affine, padding=1, pad_value=1,
                                      with_clamp=True)
        else:
            net = random_dense_network(rng, rounding=rounding, affine=affine, per_channel=True)
        x = _grid_points(net, rng, 200)
        y = TorchNet(net)(torch.from_numpy(x.astype(np.float64))).detach().numpy()
        assert np.array_equal(y, forward(net, x).astype(np.float64))


def test_ties_are_exact() -> None:
    """acc * m lands exactly on .5 for many inputs: each rounding mode must match the executor there."""
    for mode in Rounding:
        net = QNetwork((1,), -40, 40, (Dense([[1]], [0]), Requantize.pow2(2, -20, 20, mode), Dense([[3]], [1]),
                                        Requantize((3,), (2,), np.array([1]), -60, 60, mode)))
        x = np.arange(-40, 41)[:, None]
        y = TorchNet(net)(torch.from_numpy(x.astype(np.float64))).detach().numpy()
        assert np.array_equal(y, forward(net, x).astype(np.float64)), mode


def test_huge_affine_multiplier_is_exact() -> None:
    """A float64 scale's exact rational has a ~2^60 denominator: the product must not go through float."""
    m = Fraction(0.1234567891234)
    net = QNetwork((2,), 0, 255, (Dense([[1000, -999], [7, 5]], [3, -2]),
                                  Requantize((m.numerator,), (m.denominator,), np.array([3]), -128, 127,
                                             Rounding.HALF_EVEN)))
    x = np.random.default_rng(0).integers(0, 256, size=(500, 2))
    y = TorchNet(net)(torch.from_numpy(x.astype(np.float64))).detach().numpy()
    assert np.array_equal(y, forward(net, x).astype(np.float64))


def test_rejects_non_integer_inputs() -> None:
    tn = TorchNet(fx.tiny_fixed_point_mlp())
    with pytest.raises(ValueError):
        tn(torch.tensor([[0.5, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError):
        tn(torch.tensor([[9.0, 1.0]], dtype=torch.float64))


def test_straight_through_gradient() -> None:
    """Unsaturated neurons: dy/dx = W2 diag(m1) W1 m2 exactly (rounding passes straight through)."""
    w1 = np.array([[2, -1], [1, 1]])
    w2 = np.array([[1, -1], [-1, 2]])
    net = QNetwork((2,), 0, 3, (Dense(w1, [20, 20]), Requantize.pow2(1, 0, 63),
                                Dense(w2, [0, 0]), Requantize.pow2(2, -64, 63)))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    y = TorchNet(net)(x)
    jac = np.stack([torch.autograd.grad(y[0, i], x, retain_graph=True)[0][0].numpy() for i in range(2)])
    assert np.allclose(jac, (w2 @ w1) / 2 / 4)


def test_clamp_gradient_leak() -> None:
    """A saturated ReLU passes no gradient with leak 0 and ``leak`` times the gradient otherwise."""
    net = QNetwork((1,), 0, 3, (Dense([[1]], [-10]), Requantize.pow2(0, 0, 7), Dense([[1]], [0]),
                                Requantize.pow2(0, -8, 7)))
    for leak in (0.0, 0.25):
        x = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
        TorchNet(net, leak=leak)(x).sum().backward()
        assert float(x.grad[0, 0]) == pytest.approx(leak)


def test_ste_round() -> None:
    z = torch.tensor([0.4, 1.6, -2.2], dtype=torch.float64, requires_grad=True)
    r = ste_round(z)
    assert r.tolist() == [0.0, 2.0, -2.0]
    r.sum().backward()
    assert z.grad.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.skipif(not P1_6.exists(), reason="QVIP anchors not available")
def test_p1_6_exact() -> None:
    from qverify.io.h5 import load_qvip_h5

    net = load_qvip_h5(P1_6)
    x = np.random.default_rng(1).integers(0, 256, size=(300, 784))
    y = TorchNet(net)(torch.from_numpy(x.astype(np.float64))).detach().numpy()
    assert np.array_equal(y, forward(net, x).astype(np.float64))


@settings(max_examples=30, deadline=None)
@given(tiny_networks(), st.integers(0, 2**32 - 1))
def test_layer_values_from_and_soft_logits(net: QNetwork, seed: int) -> None:
    x = torch.from_numpy(_grid_points(net, np.random.default_rng(seed), 16).astype(np.float64))
    tn = TorchNet(net)
    vals = tn.layer_values(x)
    for k in range(len(net.layers)):
        rest = tn.layer_values_from(k, vals[k])
        assert all(torch.equal(a, b) for a, b in zip(rest, vals[k + 1:], strict=True))
    y = vals[-1].reshape(len(x), -1)
    last = net.layers[-1]
    lo, hi = last.lo, last.hi
    uc, uu = tn.soft_logits(vals), tn.soft_logits(vals, clamp=False)
    assert torch.all(uc >= lo - 0.5) and torch.all(uc <= hi + 0.5)
    assert torch.all((y - uu.clamp(lo, hi)).abs() <= 1.0)  # one rounding away from the real value
    inside = (uu >= lo) & (uu <= hi)
    assert torch.equal(uc[inside], uu[inside])


def test_limit_threads_restores() -> None:
    before = torch.get_num_threads()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with limit_threads(0):
        assert torch.get_num_threads() == before


@fx.CUDA
@settings(max_examples=30, deadline=None)
@given(tiny_networks(), st.integers(0, 2**32 - 1))
def test_cuda_forward_equals_executor_every_layer(net: QNetwork, seed: int) -> None:
    """On a GPU the float64 kernels sum in another order; integer partial sums below 2^53 stay exact."""
    x = _grid_points(net, np.random.default_rng(seed))
    tn = TorchNet(net, device="cuda")
    got = tn.layer_values(torch.from_numpy(x.astype(np.float64)).cuda())
    for g, w in zip(got, execute(net, x), strict=True):
        assert g.device.type == "cuda"
        assert np.array_equal(g.detach().cpu().numpy(), w.astype(np.float64))


@settings(max_examples=25, deadline=None)
@given(tiny_networks(float32=True), st.integers(0, 2**32 - 1))
def test_float32_forward_equals_executor_every_layer(net: QNetwork, seed: int) -> None:
    """onnxruntime's float32 requantizations: the forward pass is the executor's (the slope ``num / den`` is the
    exact value of the float32 multiplier, used by the straight-through gradient only)."""
    test_forward_equals_executor_every_layer.hypothesis.inner_test(net, seed)


# ------------------------------------------------------------------------------------------ graph networks
def _rq(b: GraphBuilder, rng: np.random.Generator, v: int, lo: int = 0, hi: int = 7) -> int:
    c = b.shapes[v][0] if len(b.shapes[v]) > 1 else 1
    mode = list(Rounding)[int(rng.integers(0, len(Rounding)))]
    mult = [Fraction(int(rng.integers(1, 9)), int(rng.integers(2, 30))) for _ in range(c)]
    zp = rng.integers(lo, lo + 2, size=c)
    return b.add(Requantize(tuple(m.numerator for m in mult), tuple(m.denominator for m in mult), zp, lo, hi,
                            mode), v)


def wide_graph(rng: np.random.Generator) -> QNetwork:
    """Every op with the options the fixture's graphs leave out: a grouped (not depthwise) convolution with
    dilation, asymmetric padding and strides; max pooling with dilation and asymmetric padding; weighted sum
    pooling with a zero point and asymmetric padding; a per-channel step function with two cut points; concat on a
    spatial axis; padding on every axis with a negative constant; transpose and reshape; a three-input add; a
    clamp; and an output reached through a concat of two requantizations (the soft logits' path)."""
    b = GraphBuilder((2, 5, 5))
    v = b.add(Conv2d(rng.integers(-2, 3, size=(4, 1, 2, 2)), rng.integers(-3, 4, size=4), (1, 2), (1, 0, 0, 2),
                     (2, 1), pad_value=1, groups=2), 0)
    v = _rq(b, rng, v, -4, 7)  # negative values: max pooling must ignore its padded cells, not read them as 0
    m = b.add(MaxPool2d((2, 3), (1, 1), (1, 1, 0, 1), (1, 2)), v)
    _, oh, ow = b.shapes[m]
    sh, sw = (oh + 1 - 2) // 2 + 1, (ow + 1 - 2) // 1 + 1
    s = _rq(b, rng, b.add(SumPool2d((2, 2), (2, 1), (0, 1, 1, 0), 2, rng.integers(1, 4, size=(sh, sw))), m))
    cuts = np.sort(rng.choice(np.arange(0, 8), size=(4, 2), replace=True), axis=1)
    cuts[:, 1] += (cuts[:, 1] == cuts[:, 0])
    st_ = b.add(Step(cuts, (-2, 0, 3)), s)
    cl = b.add(Clamp(1, 5), s)
    a = b.add(Add((2, -1, 1), 3), s, st_, cl)
    c = b.add(Concat(1, 2), a, s)
    p = b.add(Pad((1, 0, 2, 0, 1, 0), -1), c)
    t = b.add(Transpose((2, 0, 1)), p)
    r = b.add(Reshape((b.shapes[t][0] * b.shapes[t][1], b.shapes[t][2])), t)
    f = b.add(Flatten(), r)
    n = b.shapes[f][0]
    d1 = _rq(b, rng, b.add(Dense(rng.integers(-2, 3, size=(2, n)), rng.integers(-6, 7, size=2)), f), -8, 7)
    d2 = _rq(b, rng, b.add(Dense(rng.integers(-2, 3, size=(1, n)), rng.integers(-6, 7, size=1)), f), -8, 7)
    b.add(Concat(0, 2), d1, d2)
    return b.net(0, 3, "wide")


def _graphs() -> st.SearchStrategy:
    return st.one_of(fx.graph_networks(), st.integers(0, 2**32 - 1).map(
        lambda seed: wide_graph(np.random.default_rng(seed))))


def test_every_op_has_a_torch_rule() -> None:
    from qverify import graph
    from qverify.torch_net import SOFT, TORCH

    assert graph.missing_rules(TORCH) == [] and graph.missing_rules(SOFT) == []


@settings(max_examples=80, deadline=None)
@given(_graphs(), st.integers(0, 2**32 - 1))
def test_graph_forward_equals_executor_every_value(net: QNetwork, seed: int) -> None:
    """Residual, pooling, depthwise, concat, step, transpose, pad graphs: every value bit for bit (one thread:
    small float64 convolutions run fastest on one)."""
    with limit_threads(1):
        test_forward_equals_executor_every_layer.hypothesis.inner_test(net, seed)


@settings(max_examples=30, deadline=None)
@given(_graphs(), st.integers(0, 2**32 - 1))
def test_graph_layer_values_from(net: QNetwork, seed: int) -> None:
    """From any value ``k``: the values later nodes read below ``k`` must be given, and then the rest is equal."""
    x = torch.from_numpy(_grid_points(net, np.random.default_rng(seed), 8).astype(np.float64))
    tn = TorchNet(net)
    n = len(net.layers)
    with limit_threads(1):
        vals = tn.layer_values(x)
        for k in range(n + 1):
            rest = tn.layer_values_from(k, vals[k], {j: vals[j] for j in range(k)})
            assert len(rest) == n - k and all(torch.equal(a, b) for a, b in zip(rest, vals[k + 1:], strict=True))
            if any(j < k for i in range(k, n) for j in net.node_inputs(i)):
                with pytest.raises(ValueError, match="not given"):
                    tn.layer_values_from(k, vals[k])
            else:
                rest = tn.layer_values_from(k, vals[k])
                assert all(torch.equal(a, b) for a, b in zip(rest, vals[k + 1:], strict=True))


@settings(max_examples=30, deadline=None)
@given(_graphs(), st.integers(0, 2**32 - 1))
def test_graph_soft_logits(net: QNetwork, seed: int) -> None:
    """The soft logits are one rounding from the outputs, within the clamp range widened by 1/2, also through the
    output concat of two requantizations (they commute with data movement)."""
    x = torch.from_numpy(_grid_points(net, np.random.default_rng(seed), 16).astype(np.float64))
    tn = TorchNet(net)
    with limit_threads(1):
        vals = tn.layer_values(x)
        uc, uu = tn.soft_logits(vals), tn.soft_logits(vals, clamp=False)
    y = vals[-1].reshape(len(x), -1)
    assert uc.shape == uu.shape == y.shape
    lo, hi = -8, 7  # both kinds of graph end in requantizations to [-8, 7]
    assert torch.all(uc >= lo - 0.5) and torch.all(uc <= hi + 0.5)
    assert torch.all((y - uu.clamp(lo, hi)).abs() <= 1.0)
    inside = (uu >= lo) & (uu <= hi)
    assert torch.equal(uc[inside], uu[inside])


def test_soft_logits_pass_through_max_pooling_and_stop_at_a_dense_output() -> None:
    """``Requantize -> MaxPool -> Flatten``: the soft output is the max pool of ``acc m + z``; a last dense layer
    (no rounding at the output) gives the exact outputs."""
    b = GraphBuilder((1, 2, 2))
    r = b.add(Requantize((1,), (3,), np.array([1]), -8, 7, Rounding.HALF_EVEN), 0)
    b.add(Flatten(), b.add(MaxPool2d((2, 1), (1, 1)), r))
    net = b.net(0, 20, "wide")
    tn = TorchNet(net)
    x = torch.tensor([[0.0, 20.0, 3.0, 5.0]], dtype=torch.float64)
    u = tn.soft_logits(tn.layer_values(x), clamp=False)
    assert torch.allclose(u, torch.tensor([[3 / 3 + 1, 20 / 3 + 1]], dtype=torch.float64))
    dense = QNetwork((2,), 0, 3, (Dense([[1, 2], [3, -1]], [0, 1]), Requantize.pow2(0, 0, 7), Dense([[1, 1]], [0])))
    tn = TorchNet(dense)
    vals = tn.layer_values(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    assert torch.equal(tn.soft_logits(vals), vals[-1])


def test_step_gradient_is_the_chord() -> None:
    """Sign: hard tanh (gradient 1 on [-1, 1], ``leak`` outside); a threshold t with levels -1, 1: slope 2 on
    [t - 1, t]; per channel."""
    sign = QNetwork((1,), -5, 5, (Step.sign(),))
    xs = torch.arange(-5.0, 6.0, dtype=torch.float64)[:, None].requires_grad_(True)
    TorchNet(sign, leak=0.25)(xs).sum().backward()
    want = [0.25 if abs(v) > 1 else 1.0 for v in range(-5, 6)]
    assert xs.grad[:, 0].tolist() == want
    thr = QNetwork((2, 1, 1), -5, 5, (Step(np.array([[2], [-1]]), (-1, 1)), Flatten()))
    x = torch.tensor([[2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    y = TorchNet(thr)(x)
    assert y.tolist() == [[1.0, 1.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[2.0, 0.0]]


def test_max_pool_gradient_reaches_the_maximal_cell() -> None:
    """Padded cells (``-inf``) never win; the gradient goes to the maximum of the window."""
    net = QNetwork((1, 2, 2), -4, 4, (MaxPool2d((2, 2), (1, 1), (1, 1, 0, 0)), Flatten(), Dense([[1, 1, 1, 1]], [0])))
    x = torch.tensor([[-4.0, -3.0, 2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    y = TorchNet(net)(x)
    assert y.item() == float(forward(net, np.array([[-4, -3, 2, -1]]))[0, 0]) == -4 - 3 + 2 + 2
    y.sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 2.0, 0.0]]


@fx.CUDA
@settings(max_examples=30, deadline=None)
@given(_graphs(), st.integers(0, 2**32 - 1))
def test_cuda_graph_forward_equals_executor_every_value(net: QNetwork, seed: int) -> None:
    test_cuda_forward_equals_executor_every_layer.hypothesis.inner_test(net, seed)
