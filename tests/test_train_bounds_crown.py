"""CROWN-IBP margin bounds: sound on sampled points of the executor, exact on single points, differentiable."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import execute
from qverify.train.bounds_crown import _line_bounds, crown_ibp_margins
from qverify.train.bounds_ibp import margin_lower_bounds, output_bounds
from qverify.train.export import export_qnetwork
from qverify.train.layers import ModelConfig, QuantConfig, QuantNet, build_model, calibrate
from tests.fixtures import CUDA
from tests.test_train_bounds_ibp import image_box, quant_models

#: float64 slack of the backward pass (slopes are not integers); the bounds are a training signal, not a verdict
TOL = 1e-7


@settings(max_examples=40, deadline=None)
@given(quant_models(), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_margins_below_sampled_points(mx: tuple[QuantNet, np.ndarray], radius: int, seed: int) -> None:
    model, x = mx
    net = export_qnetwork(model)
    lo, hi = image_box(model, x, radius)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, model.n_classes, size=len(x))
    lb = crown_ibp_margins(model, torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(labels))
    lb = lb.detach().numpy()
    assert lb.shape == (len(x), model.n_classes)
    assert np.all(lb[np.arange(len(x)), labels] == 0)
    for pts in [lo, hi, *(rng.integers(lo, hi + 1) for _ in range(6))]:
        out = execute(net, pts)[-1].reshape(len(x), -1).astype(np.float64)
        margins = out[np.arange(len(x)), labels][:, None] - out
        assert np.all(lb <= margins + TOL)


@settings(max_examples=20, deadline=None)
@given(quant_models())
def test_point_boxes_give_the_exact_margins(mx: tuple[QuantNet, np.ndarray]) -> None:
    """On a box of one point every interval is a point, every line a constant: the margins themselves."""
    model, x = mx
    labels = np.zeros(len(x), dtype=np.int64)
    lb = crown_ibp_margins(model, torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(labels))
    out = execute(export_qnetwork(model), x)[-1].reshape(len(x), -1).astype(np.float64)
    assert np.allclose(lb.detach().numpy(), out[:, :1] - out, atol=TOL, rtol=0)


@settings(max_examples=200, deadline=None)
@given(st.floats(-50, 50), st.floats(0, 60), st.sampled_from([0.25, 1.0, 3.0]),
       st.sampled_from([(0.5, 0.5), (1.0, 0.0)]), st.sampled_from([(0.0, 7.0), (-4.0, 3.0), (0.0, float("inf"))]))
def test_lines_enclose_the_activation(l: float, width: float, m: float, slack: tuple[float, float],
                                      rng_: tuple[float, float]) -> None:
    """``alpha_l a + beta_l <= clamp(a m + e, lo, hi) <= alpha_u a + beta_u`` for every rounding error ``e`` in
    ``[-d_l, d_h]`` and every ``a`` of ``[l, u]`` (grid of 201 points)."""
    lo, hi = rng_
    u = l + width
    d_lo, d_hi = slack
    f_lo = lambda a: np.clip(a * m - d_lo, lo, hi)  # noqa: E731
    f_hi = lambda a: np.clip(a * m + d_hi, lo, hi)  # noqa: E731
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    a_l, b_l, a_u, b_u = (v.item() for v in _line_bounds(t(l), t(u), m, d_lo, d_hi, lo, hi, t(f_lo(l)), t(f_hi(u))))
    a = np.linspace(l, u, 201)
    assert np.all(a_l * a + b_l <= f_lo(a) + 1e-9)
    assert np.all(a_u * a + b_u >= f_hi(a) - 1e-9)


def test_tighter_than_intervals_on_a_trained_style_model() -> None:
    """On a calibrated MLP the backward pass beats the interval margins on average, and gradients flow."""
    m = build_model(ModelConfig(hidden=(32,)), QuantConfig(), (1, 8, 8), 16, 10, seed=3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, size=(64, 1, 8, 8))
    calibrate(m, torch.from_numpy(x))
    y = torch.from_numpy(rng.integers(0, 10, size=64))
    lo, hi = torch.from_numpy(np.maximum(x - 1, 0)), torch.from_numpy(np.minimum(x + 1, 16))
    crown = crown_ibp_margins(m, lo, hi, y)
    ibp = margin_lower_bounds(*output_bounds(m, lo, hi), y)
    assert float(crown.detach().mean()) > float(ibp.detach().mean())
    crown.sum().backward()
    assert any(p.grad is not None and bool(torch.any(p.grad != 0)) for p in m.parameters())


@CUDA
@settings(max_examples=15, deadline=None)
@given(quant_models(), st.integers(0, 3))
def test_cuda_margins_equal_cpu_margins(mx: tuple[QuantNet, np.ndarray], radius: int) -> None:
    """The backward pass on a GPU gives the CPU's bounds (float64 sums in another order: within TOL)."""
    model, x = mx
    lo, hi = image_box(model, x, radius)
    y = torch.from_numpy(np.arange(len(x)) % model.n_classes)
    cpu = crown_ibp_margins(model, torch.from_numpy(lo), torch.from_numpy(hi), y).detach().numpy()
    model = model.to("cuda")
    gpu = crown_ibp_margins(model, torch.from_numpy(lo).cuda(), torch.from_numpy(hi).cuda(), y.cuda())
    assert gpu.device.type == "cuda"
    assert np.allclose(gpu.detach().cpu().numpy(), cpu, atol=TOL, rtol=0)


@settings(max_examples=20, deadline=None)
@given(quant_models(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_float_mode_margins_below_sampled_points(mx: tuple[QuantNet, np.ndarray], radius: int, seed: int) -> None:
    """In float mode (float-IBP training) the activation is ReLU and the bound classic CROWN-IBP: still sound."""
    model, x = mx
    model.quantized = False
    lo, hi = image_box(model, x, radius)
    y = np.arange(len(x)) % model.n_classes
    lb = crown_ibp_margins(model, torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(y)).detach().numpy()
    rng = np.random.default_rng(seed)
    for pts in [lo, hi, *(rng.integers(lo, hi + 1) for _ in range(6))]:
        out = model.layer_values(torch.from_numpy(pts))[-1].detach().numpy().reshape(len(x), -1)
        assert np.all(lb <= out[np.arange(len(x)), y][:, None] - out + TOL)
