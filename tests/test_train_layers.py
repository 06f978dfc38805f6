"""Fake-quant layers: exact rounding (same rule as qverify.quant), dyadic multipliers, straight-through gradients."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.quant import Rounding, round_div
from qverify.train.layers import (
    ModelConfig,
    QuantConfig,
    QuantError,
    build_model,
    calibrate,
    clamp_leaky,
    dyadic_parts,
    round_real,
)
from tests.fixtures import CUDA


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 58), st.sampled_from(list(Rounding)))
def test_round_real_matches_quant_on_dyadics(seed: int, k: int, mode: Rounding) -> None:
    """round_real(n / 2^k) == quant.round_div(n, 2^k) for every mode, ties included (the training relaxation
    uses the same rule as the semantics)."""
    rng = np.random.default_rng(seed)
    ns = [int(v) for v in rng.integers(-(2**50), 2**50, size=300)]
    if k >= 1:  # exact ties and their neighbours
        bmax = max(1, min(1000, 2 ** (51 - k)))
        for b in rng.integers(-bmax, bmax + 1, size=50):
            t = int(b) * 2**k + 2 ** (k - 1)
            ns += [t, t - 1, t + 1, -t]
    ns = [n for n in ns if abs(n) < 2**53]  # exact in float64
    v = torch.tensor([float(n) for n in ns], dtype=torch.float64) * 2.0**-k
    got = round_real(v, mode).numpy()
    want = round_div(np.array(ns, dtype=object), np.array(2**k, dtype=object), mode).astype(np.float64)
    assert np.array_equal(got, want)


def test_round_real_tiny_negative_values() -> None:
    """Values just below -1/2 and just above it (bits below 2^-53) must not be misrounded."""
    v = torch.tensor([-0.5 + 2.0**-54, -0.5 - 2.0**-53, -2.0**-70, 2.0**-70, -0.5, 0.5, -1.5, 2.5],
                     dtype=torch.float64)
    want = {
        Rounding.FLOOR: [-1, -1, -1, 0, -1, 0, -2, 2],
        Rounding.HALF_UP: [0, -1, 0, 0, 0, 1, -1, 3],
        Rounding.HALF_AWAY: [0, -1, 0, 0, -1, 1, -2, 3],
        Rounding.HALF_EVEN: [0, -1, 0, 0, 0, 0, -2, 2],
    }
    for mode, w in want.items():
        assert round_real(v, mode).tolist() == [float(x) for x in w], mode


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=2.0**-40, max_value=2.0**20, allow_nan=False), min_size=1, max_size=8))
def test_dyadic_parts_exact(values: list[float]) -> None:
    num, den = dyadic_parts(np.array(values))
    for v, n, d in zip(values, num, den, strict=True):
        assert Fraction(int(n), int(d)) == Fraction(v)
        assert int(d) & (int(d) - 1) == 0  # a power of two
        assert int(d) == 1 or int(n) % 2 == 1  # reduced


def test_dyadic_parts_rejects_nonpositive() -> None:
    with pytest.raises(QuantError):
        dyadic_parts(np.array([0.0]))


def test_clamp_gradient_leaks() -> None:
    x = torch.tensor([-3.0, 0.5, 9.0], dtype=torch.float64, requires_grad=True)
    clamp_leaky(x, 0, 7, 0.1).sum().backward()
    assert x.grad.tolist() == [0.1, 1.0, 0.1]
    x.grad = None
    clamp_leaky(x, 0, 7, 0.0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("scheme", ["pow2", "affine"])
def test_gradients_reach_every_parameter(scheme: str) -> None:
    """Straight-through estimators: weights, biases (and learned scales) all receive gradients, also from
    saturated neurons (the clamp leaks)."""
    qc = QuantConfig(scheme=scheme, weight_bits=4, act_bits=4, out_bits=4, learn_scales=True)
    m = build_model(ModelConfig(hidden=(6,)), qc, (1, 4, 4), 15, 3, seed=3)
    x = torch.randint(0, 16, (20, 1, 4, 4))
    calibrate(m, x)
    m(x).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(torch.any(p.grad != 0)), name


def test_saturated_neuron_still_learns() -> None:
    """A hidden neuron clamped at 0 on every input gets a (leaked) gradient."""
    qc = QuantConfig(weight_bits=8, act_bits=8, out_bits=8, clamp_leak=0.05)
    m = build_model(ModelConfig(hidden=(2,)), qc, (1, 2, 2), 3, 2, seed=0)
    with torch.no_grad():
        m.blocks[1].bias[0] = -100.0  # neuron 0 is dead for every input
    x = torch.randint(0, 4, (8, 1, 2, 2))
    vals = m.layer_values(x)
    assert bool(torch.all(vals[3][:, 0] == 0))
    m(x)[:, 0].sum().backward()
    assert bool(torch.any(m.blocks[1].weight.grad[0] != 0))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_bit_widths_respected(bits: int) -> None:
    qc = QuantConfig(weight_bits=bits, act_bits=bits, out_bits=bits, per_channel=True, scheme="affine")
    m = build_model(ModelConfig(arch="cnn", conv=((3, 3, 1, 1),), hidden=(5,)), qc, (1, 5, 5), 255, 4, seed=1)
    x = torch.randint(0, 256, (10, 1, 5, 5))
    calibrate(m, x)
    for p in m.block_params():
        if p is None:
            continue
        assert p.weight.min() >= -(2 ** (bits - 1)) and p.weight.max() <= 2 ** (bits - 1) - 1
    vals = m.layer_values(x)
    assert vals[2].min() >= 0 and vals[2].max() <= 2**bits - 1
    assert vals[-1].min() >= -(2 ** (bits - 1)) and vals[-1].max() <= 2 ** (bits - 1) - 1


def test_config_validation() -> None:
    with pytest.raises(QuantError):
        QuantConfig(scheme="log")
    with pytest.raises(QuantError):
        QuantConfig(weight_bits=1)
    with pytest.raises(QuantError):
        QuantConfig(rounding="up")
    with pytest.raises(QuantError):
        QuantConfig.from_dict({"bitz": 3})
    assert QuantConfig().mode is Rounding.HALF_UP
    assert QuantConfig(scheme="affine").mode is Rounding.HALF_EVEN
    assert QuantConfig(scheme="affine").learn and not QuantConfig().learn


@pytest.mark.parametrize("mode", list(Rounding))
def test_requant_on_integers_is_the_executor_rounding(mode: Rounding) -> None:
    """Integer accumulators go through qverify.quant.multiply_round, also for multipliers whose product with the
    accumulator leaves float64 (a 2^-60 denominator)."""
    from qverify.quant import multiply_round
    from qverify.train.layers import _Requant

    rng = np.random.default_rng(5)
    acc = rng.integers(-(2**40), 2**40, size=(50, 3)).astype(np.float64)
    m = np.array([Fraction(0.1234567891234), Fraction(3, 2**60) * 2**58, Fraction(1, 3 * 2**0) * 0 + Fraction(5, 8)])
    num, den = dyadic_parts(np.array([float(v) for v in m]))
    acc_t = torch.from_numpy(acc)
    mult = torch.tensor([float(v) for v in m], dtype=torch.float64)[None, :]
    got = _Requant.apply(acc_t * mult, acc_t, num[None, :], den[None, :], mode).numpy()
    want = multiply_round(acc.astype(np.int64), num[None, :], den[None, :], mode)
    assert np.array_equal(got, want.astype(np.float64))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=40), st.integers(1, 2**20),
       st.sampled_from(list(Rounding)))
def test_round_div_torch_is_the_executor_rounding(n: list[int], q: int, mode: Rounding) -> None:
    """The device-side integer rounding equals qverify.quant.round_div, ties included."""
    from qverify.train.layers import round_div_torch

    ties = [(2 * k + 1) * q // 2 for k in (-2, -1, 0, 1)] if q % 2 == 0 else []  # n / q exactly halfway
    arr = np.array(n + [k * q for k in (-3, -1, 0, 2)] + ties, dtype=np.int64)
    got = round_div_torch(torch.from_numpy(arr), torch.tensor(q), mode).numpy()
    assert np.array_equal(got, round_div(arr, np.int64(q), mode))


@CUDA
@pytest.mark.parametrize("mode", list(Rounding))
def test_cuda_requant_is_the_executor_rounding(mode: Rounding) -> None:
    """On a GPU the requantization rounds in int64 on the device: still the executor's multiply_round."""
    from qverify.quant import multiply_round
    from qverify.train.layers import _Requant

    rng = np.random.default_rng(11)
    acc = rng.integers(-(2**30), 2**30, size=(64, 4)).astype(np.float64)
    acc[:8] = np.array([[-3, -1, 1, 3]]) * 2**9  # ties for the 2^-10 multiplier below
    num, den = dyadic_parts(np.array([2.0**-10, 0.75, 2.0**-3 * 5, 1.0]))
    a = torch.from_numpy(acc).cuda()
    mult = torch.from_numpy(num / den).cuda()[None, :]
    got = _Requant.apply(a * mult, a, num[None, :], den[None, :], mode)
    assert got.device.type == "cuda"
    want = multiply_round(acc.astype(np.int64), num[None, :], den[None, :], mode)
    assert np.array_equal(got.cpu().numpy(), want.astype(np.float64))


def test_model_shapes_that_cannot_be_built_are_named() -> None:
    with pytest.raises(QuantError, match=r"model.hidden widths must be >= 1, got \[8, 0\]"):
        ModelConfig(hidden=(8, 0))
    mc = ModelConfig(arch="cnn", conv=((4, 3, 1, 0), (4, 5, 1, 0)), hidden=(5,))
    with pytest.raises(QuantError, match=r"model.conv\[1\] = \[4, 5, 1, 0\] leaves no output pixels of its 3x3"):
        build_model(mc, QuantConfig(), (1, 5, 5), 255, 3)


def test_per_layer_bits_reach_each_layer() -> None:
    """Mixed precision: ``weight_bits`` one width per affine layer, ``act_bits`` one per hidden one; each layer's
    integer weights and requantized outputs stay in its own ranges."""
    qc = QuantConfig(weight_bits=(8, 3, 5), act_bits=(4, 6), out_bits=7)
    m = build_model(ModelConfig(arch="cnn", conv=((3, 3, 2, 1),), hidden=(6,)), qc, (1, 8, 8), 255, 4, seed=1)
    blocks = m.affine_blocks
    assert [(b.weight_bits, b.out_bits) for b in blocks] == [(8, 4), (3, 6), (5, 7)]
    assert [(b.wmin, b.wmax) for b in blocks] == [(-128, 127), (-4, 3), (-16, 15)]
    assert [(b.lo, b.hi) for b in blocks] == [(0, 15), (0, 63), (-64, 63)]
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 1, 8, 8)))
    calibrate(m, x)
    for blk, p in zip(blocks, [q for q in m.block_params() if q is not None], strict=True):
        assert blk.wmin <= p.weight.min() and p.weight.max() <= blk.wmax
    vals = m.layer_values(x)
    starts = m.block_starts()
    for blk, s in zip(m.blocks, starts, strict=True):
        if blk in blocks:
            out = vals[s + 2]
            assert blk.lo <= out.min() and out.max() <= blk.hi


def test_per_layer_bits_errors_name_the_setting() -> None:
    with pytest.raises(QuantError, match=r"quant\.weight_bits\[1\] must be an integer in 2\.\.16.*got 1"):
        QuantConfig(weight_bits=(8, 1))
    with pytest.raises(QuantError, match=r"quant\.out_bits must be one integer"):
        QuantConfig(out_bits=(8, 8))  # type: ignore[arg-type]
    with pytest.raises(QuantError, match=r"quant\.weight_bits lists 2 widths \[8, 4\], the model has 3"):
        build_model(ModelConfig(hidden=(5, 5)), QuantConfig(weight_bits=(8, 4)), (1, 4, 4), 15, 3)
    with pytest.raises(QuantError, match=r"quant\.act_bits lists 1 widths \[6\], the model has 2 hidden"):
        build_model(ModelConfig(hidden=(5, 5)), QuantConfig(act_bits=(6,)), (1, 4, 4), 15, 3)
    assert QuantConfig(weight_bits=[6, 4]).weight_bits == (6, 4)  # type: ignore[arg-type]
    assert QuantConfig(weight_bits=(6, 4), act_bits=(9,)).max_bits == 9
