"""TorchNet: exact equality with the executor on integer inputs; straight-through gradients."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import execute, forward
from qverify.network import Dense, QNetwork, Requantize
from qverify.quant import Rounding
from qverify.torch_net import TorchNet, ste_round
from tests import fixtures as fx
from tests.fixtures import P1_6, random_conv_network, random_dense_network, tiny_networks


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
    from qverify.torch_net import limit_threads

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
