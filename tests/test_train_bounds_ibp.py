"""Torch QA-IBP intervals: exactly the integer intervals of the exported network, sound, differentiable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import apply_layer, execute
from qverify.network import Conv2d, Dense, QNetwork
from qverify.quant import Rounding
from qverify.train.bounds_ibp import (
    certified_by_bounds,
    input_box,
    interval_bounds,
    margin_lower_bounds,
    output_bounds,
    worst_case_logits,
)
from qverify.train.export import export_qnetwork
from qverify.train.layers import ModelConfig, QuantConfig, QuantNet, build_model, calibrate
from tests.fixtures import CUDA


def reference_intervals(net: QNetwork, lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact integer intervals built from the executor only: affine layers split into W+ and W- (both applied
    by the executor), monotone layers applied to both ends."""
    lo = lo.reshape((-1, *net.input_shape)).astype(np.int64)
    hi = hi.reshape((-1, *net.input_shape)).astype(np.int64)
    out = [(lo, hi)]
    for layer in net.layers:
        if isinstance(layer, (Dense, Conv2d)):
            wp, wn = np.maximum(layer.weight, 0), np.minimum(layer.weight, 0)
            zero = np.zeros_like(layer.bias)
            if isinstance(layer, Dense):
                pos, neg = Dense(wp, layer.bias), Dense(wn, zero)
            else:
                kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                          pad_value=layer.pad_value)
                pos, neg = Conv2d(wp, layer.bias, **kw), Conv2d(wn, zero, **kw)
            lo, hi = apply_layer(pos, lo) + apply_layer(neg, hi), apply_layer(pos, hi) + apply_layer(neg, lo)
        else:
            lo, hi = apply_layer(layer, lo), apply_layer(layer, hi)
        out.append((lo, hi))
    return out


def _numpy_interval_module():
    """qverify.bounds.interval.interval_bounds when it exists (written by the bounds helper)."""
    try:
        from qverify.bounds.interval import interval_bounds as ib
    except ImportError:
        return None
    return ib


def _as_pairs(res: object) -> list[tuple[np.ndarray, np.ndarray]]:
    """Accept a list of (lo, hi) pairs or a (list of lo, list of hi) pair."""
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[0], list):
        return list(zip(res[0], res[1], strict=True))
    return [(np.asarray(a), np.asarray(b)) for a, b in res]  # type: ignore[union-attr]


@st.composite
def quant_models(draw: st.DrawFn) -> tuple[QuantNet, np.ndarray]:
    """A random small QuantNet (dense or conv, pow2 or affine, per tensor or channel, 2..8 bits, any rounding)
    calibrated on random images, with its grid inputs."""
    conv = draw(st.booleans())
    bits = draw(st.integers(2, 8))
    qc = QuantConfig(scheme=draw(st.sampled_from(["pow2", "affine"])), weight_bits=bits,
                     act_bits=draw(st.integers(2, 8)), out_bits=draw(st.integers(2, 8)),
                     per_channel=draw(st.booleans()), rounding=draw(st.sampled_from([r.value for r in Rounding])),
                     bias_bits=draw(st.sampled_from([8, 16, 32])))
    hi = draw(st.sampled_from([3, 15, 255]))
    mc = ModelConfig(arch="cnn" if conv else "mlp", hidden=(draw(st.integers(2, 6)),),
                     conv=((draw(st.integers(1, 3)), 3, draw(st.integers(1, 2)), draw(st.integers(0, 1))),))
    seed = draw(st.integers(0, 2**31 - 1))
    m = build_model(mc, qc, (1, 5, 5), hi, 3, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, hi + 1, size=(24, 1, 5, 5))
    calibrate(m, torch.from_numpy(x), quantile=draw(st.sampled_from([1.0, 0.9])))
    return m, x


def image_box(model: QuantNet, x: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The L-inf boxes of ``radius`` around the images ``x``, cut to the model's input range."""
    return np.maximum(x - radius, 0), np.minimum(x + radius, model.input_hi)


@settings(max_examples=40, deadline=None)
@given(quant_models(), st.integers(0, 3))
def test_torch_intervals_equal_exact_integer_intervals(mx: tuple[QuantNet, np.ndarray], radius: int) -> None:
    model, x = mx
    net = export_qnetwork(model)
    lo, hi = image_box(model, x, radius)
    got = interval_bounds(model, torch.from_numpy(lo), torch.from_numpy(hi))
    want = reference_intervals(net, lo, hi)
    assert len(got) == len(want) == len(net.layers) + 1
    for (gl, gh), (wl, wh) in zip(got, want, strict=True):
        assert np.array_equal(gl.detach().numpy(), wl.astype(np.float64))
        assert np.array_equal(gh.detach().numpy(), wh.astype(np.float64))
    ib = _numpy_interval_module()
    if ib is not None:
        for (gl, gh), (nl, nh) in zip(got, _as_pairs(ib(net, lo, hi)), strict=True):
            assert np.array_equal(gl.detach().numpy().ravel(), np.asarray(nl).astype(np.float64).ravel())
            assert np.array_equal(gh.detach().numpy().ravel(), np.asarray(nh).astype(np.float64).ravel())
    # radius 0: the bounds are the executor's values
    pts = interval_bounds(model, torch.from_numpy(x), torch.from_numpy(x))
    for (pl, ph), v in zip(pts, execute(net, x), strict=True):
        assert np.array_equal(pl.detach().numpy(), v.astype(np.float64))
        assert np.array_equal(ph.detach().numpy(), v.astype(np.float64))



@CUDA
@settings(max_examples=20, deadline=None)
@given(quant_models(), st.integers(0, 3))
def test_cuda_intervals_equal_exact_integer_intervals(mx: tuple[QuantNet, np.ndarray], radius: int) -> None:
    """The training bounds computed on a GPU are the exact integer intervals too, and they stay differentiable."""
    model, x = mx
    net = export_qnetwork(model)
    lo, hi = image_box(model, x, radius)
    model = model.to("cuda")
    got = interval_bounds(model, torch.from_numpy(lo).cuda(), torch.from_numpy(hi).cuda())
    for (gl, gh), (wl, wh) in zip(got, reference_intervals(net, lo, hi), strict=True):
        assert gl.device.type == "cuda"
        assert np.array_equal(gl.detach().cpu().numpy(), wl.astype(np.float64))
        assert np.array_equal(gh.detach().cpu().numpy(), wh.astype(np.float64))
    (got[-1][1] - got[-1][0]).sum().backward()
    assert all(p.grad is None or p.grad.device.type == "cuda" for p in model.parameters())


@settings(max_examples=20, deadline=None)
@given(quant_models(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_intervals_contain_sampled_points(mx: tuple[QuantNet, np.ndarray], radius: int, seed: int) -> None:
    model, x = mx
    net = export_qnetwork(model)
    lo, hi = image_box(model, x, radius)
    bounds = interval_bounds(model, torch.from_numpy(lo), torch.from_numpy(hi))
    rng = np.random.default_rng(seed)
    for _ in range(5):
        pts = rng.integers(lo, hi + 1)
        for (bl, bh), v in zip(bounds, execute(net, pts), strict=True):
            assert np.all(bl.detach().numpy() <= v) and np.all(v <= bh.detach().numpy())


def test_exact_on_the_bundled_style_model() -> None:
    """A 784-32-10 pow2 model on MNIST-sized boxes (the size the bundled model has)."""
    qc = QuantConfig(weight_bits=8, act_bits=8, out_bits=8)
    m = build_model(ModelConfig(hidden=(32,)), qc, (1, 28, 28), 255, 10, seed=5)
    x = np.random.default_rng(0).integers(0, 256, size=(30, 1, 28, 28))
    calibrate(m, torch.from_numpy(x), weights=False)
    net = export_qnetwork(m)
    lo, hi = np.maximum(x - 2, 0), np.minimum(x + 2, 255)
    got = interval_bounds(m, torch.from_numpy(lo), torch.from_numpy(hi))
    for (gl, gh), (wl, wh) in zip(got, reference_intervals(net, lo, hi), strict=True):
        assert np.array_equal(gl.detach().numpy(), wl) and np.array_equal(gh.detach().numpy(), wh)


def test_bounds_are_differentiable() -> None:
    qc = QuantConfig(scheme="affine", weight_bits=6, act_bits=6, out_bits=6, per_channel=True)
    m = build_model(ModelConfig(arch="cnn", conv=((2, 3, 1, 1),), hidden=(4,)), qc, (1, 4, 4), 255, 3, seed=0)
    x = torch.randint(0, 256, (6, 1, 4, 4))
    calibrate(m, x)
    lo, hi = input_box(x, 1.5, 0, 255)  # a real-valued training box
    olo, ohi = output_bounds(m, lo, hi)
    (ohi - olo).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert any(bool(torch.any(p.grad != 0)) for p in m.parameters() if p.requires_grad)


def test_margin_and_certification_rule() -> None:
    """First-max tie rule: a tie with an earlier class is not certified, with a later class it is."""
    lo = torch.tensor([[0.0, 5.0, 1.0], [3.0, 3.0, 0.0], [3.0, 3.0, 0.0]], dtype=torch.float64)
    hi = torch.tensor([[5.0, 7.0, 5.0], [3.0, 3.0, 3.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([1, 0, 1])
    lb = margin_lower_bounds(lo, hi, y)
    assert lb.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # sample 0: lo_y = 5 >= hi_0 = 5 (earlier class 0: tie goes to 0 -> not certified)
    assert certified_by_bounds(lo, hi, y).tolist() == [False, True, False]
    wc = worst_case_logits(lo, hi, y)
    assert wc[0].tolist() == [5.0, 5.0, 5.0]


def test_input_box_clips_to_grid() -> None:
    x = torch.tensor([[0, 5, 255]])
    lo, hi = input_box(x, 2, 0, 255)
    assert lo.tolist() == [[0, 3, 253]] and hi.tolist() == [[2, 7, 255]]
    lo, hi = input_box(x, torch.tensor([1.0]), 0, 255)
    assert lo.tolist() == [[0, 4, 254]]


def test_empty_box_rejected() -> None:
    m = build_model(ModelConfig(hidden=(2,)), QuantConfig(), (1, 2, 2), 3, 2)
    with pytest.raises(ValueError):
        interval_bounds(m, torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_verification_bounds_do_not_import_torch() -> None:
    """The torch bounds of the training model live in ``qverify.train``: importing the verification bounds
    (interval, symbolic) loads no torch."""
    import subprocess
    import sys

    code = "import sys, qverify.bounds; assert 'torch' not in sys.modules, 'qverify.bounds imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
