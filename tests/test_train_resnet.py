"""The small residual network (``model.arch = "resnet"``): exact export, sound bounds, per-layer bits, every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.bounds.interval import interval_bounds as exact_intervals
from qverify.execute import execute, predict
from qverify.io import load_model
from qverify.network import Add, Conv2d, Requantize
from qverify.quant import Rounding
from qverify.quantize import FakeQuantModel, from_checkpoint, from_quantnet, quantize
from qverify.train.bounds_crown import crown_ibp_margins
from qverify.train.bounds_ibp import interval_bounds
from qverify.train.export import export_qnetwork, parse_layer_bits, save_trained
from qverify.train.layers import ModelConfig, QuantConfig, QuantError, QuantNet, build_model, calibrate
from qverify.train.trainer import ConfigError, dump_config, load_checkpoint, load_config, train
from tests.fixtures import MNIST1000, small_resnet

#: float64 slack of CROWN-IBP's backward pass (slopes are not integers; a training signal, not a verdict)
TOL = 1e-7


@pytest.fixture(scope="module")
def mnist() -> np.ndarray:
    if not MNIST1000.exists():
        pytest.skip("../shared/data not available")
    return np.load(MNIST1000)["images"][:, None].astype(np.int64)


def _assert_layers_equal(model: QuantNet, x: np.ndarray) -> None:
    net = export_qnetwork(model)
    assert not net.is_chain and any(isinstance(layer, Add) for layer in net.layers)
    got = model.layer_values(torch.from_numpy(x))
    want = execute(net, x)
    assert len(got) == len(want) == len(net.layers) + 1
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g.detach().numpy(), w.astype(np.float64))
    assert np.array_equal(model.predict(torch.from_numpy(x)).numpy(), predict(net, x))


# ------------------------------------------------------------------------------------------ exact export
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("scheme,per_channel", [("pow2", False), ("affine", True)])
def test_export_equals_fake_quant_on_mnist(mnist: np.ndarray, bits: int, scheme: str, per_channel: bool) -> None:
    qc = QuantConfig(scheme=scheme, weight_bits=bits, act_bits=bits, out_bits=max(bits, 4), per_channel=per_channel)
    _assert_layers_equal(small_resnet(qc, seed=bits, calib=mnist[:200]), mnist)


@pytest.mark.parametrize("quantizer,wbits", [("binaryrelax", 2), ("binaryrelax", 4), ("pow2-bases", 2)])
def test_export_equals_fake_quant_weight_quantizers(mnist: np.ndarray, quantizer: str, wbits: int) -> None:
    qc = QuantConfig(weight_quantizer=quantizer, weight_bits=wbits, act_bits=4, out_bits=8)
    m = small_resnet(qc, seed=1, calib=mnist[:200])
    _assert_layers_equal(m, mnist)
    if quantizer == "binaryrelax":  # the relaxed phase is not integer: refused; the hard projection exports
        for b in m.affine_blocks:
            b.relax_eta = 1.0
        with pytest.raises(QuantError, match="relax"):
            export_qnetwork(m)


def test_export_structure_and_skip_weights() -> None:
    """The residual block exports conv, 1x1 diagonal skip conv, Add(1, 1), Requantize; in pow2 the skip weight is
    the exact power of two ``s_x / c`` and the multiplier a power of two."""
    m = small_resnet(QuantConfig(), input_shape=(1, 8, 8), input_hi=16, n_classes=3, stem=((2, 3, 1, 1),),
                     hidden=(4,), calib=np.random.default_rng(0).integers(0, 17, (20, 1, 8, 8)))
    net = export_qnetwork(m)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds[:8] == ["Conv2d", "Requantize", "Conv2d", "Requantize", "Conv2d", "Conv2d", "Add", "Requantize"]
    assert net.inputs[5] == (2,) and net.inputs[6] == (5, 6)  # the skip reads the block input (value 2)
    skip = net.layers[5]
    assert isinstance(skip, Conv2d) and skip.weight.shape == (2, 2, 1, 1)
    k = np.diagonal(skip.weight[:, :, 0, 0])
    assert np.all(k >= 1) and np.all(k & (k - 1) == 0) and np.count_nonzero(skip.weight) == 2
    assert net.is_fixed_point()


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(["pow2", "affine"]), st.booleans(), st.integers(2, 8), st.sampled_from(list(Rounding)),
       st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_random_resnets_equal_executor(scheme: str, per_channel: bool, bits: int, rounding: Rounding, blocks: int,
                                       seed: int) -> None:
    qc = QuantConfig(scheme=scheme, weight_bits=bits, act_bits=bits, out_bits=max(bits, 3), per_channel=per_channel,
                     rounding=rounding.value)
    x = np.random.default_rng(seed).integers(0, 256, size=(32, 1, 8, 8))
    m = small_resnet(qc, input_shape=(1, 8, 8), n_classes=4, stem=((3, 3, 2, 1),), blocks=blocks, hidden=(6,),
                     seed=seed, calib=x)
    _assert_layers_equal(m, x)


def test_ptq_of_a_float_resnet(mnist: np.ndarray) -> None:
    """The float resnet as a FloatModel with an ``add`` node; PTQ's fake-quantized model equals its network."""
    m = small_resnet(seed=3)
    m.quantized = False
    fm = from_quantnet(m)
    assert [n.kind for n in fm.nodes].count("add") == 1
    x = torch.from_numpy(mnist[:100])
    assert torch.allclose(fm.values(mnist[:100])[-1].reshape(100, -1), m.layer_values(x)[-1], rtol=1e-12, atol=1e-12)
    for bits in (8, 4, 2):
        res = quantize(fm, mnist[:200], QuantConfig(weight_bits=bits, act_bits=bits, out_bits=max(bits, 4)))
        assert any(isinstance(layer, Add) for layer in res.network.layers)
        fq = FakeQuantModel(res.steps, fm.input_shape, res.qc.mode)
        assert np.array_equal(fq.forward_int(mnist), execute(res.network, mnist)[-1])


# ------------------------------------------------------------------------------------------ bounds
@st.composite
def resnets(draw: st.DrawFn) -> tuple[QuantNet, np.ndarray]:
    bits = draw(st.integers(2, 8))
    qc = QuantConfig(scheme=draw(st.sampled_from(["pow2", "affine"])), weight_bits=bits,
                     act_bits=draw(st.integers(2, 8)), out_bits=draw(st.integers(2, 8)),
                     per_channel=draw(st.booleans()), rounding=draw(st.sampled_from([r.value for r in Rounding])),
                     bias_bits=draw(st.sampled_from([8, 16])))  # 32-bit biases of random scales may pass 2^53
    hi = draw(st.sampled_from([3, 15, 255]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = np.random.default_rng(seed).integers(0, hi + 1, size=(16, 1, 6, 6))
    m = small_resnet(qc, input_shape=(1, 6, 6), input_hi=hi, n_classes=3,
                     stem=((draw(st.integers(1, 3)), 3, draw(st.integers(1, 2)), 1),), blocks=draw(st.integers(0, 2)),
                     hidden=(draw(st.integers(2, 5)),), seed=seed)
    calibrate(m, torch.from_numpy(x), quantile=draw(st.sampled_from([1.0, 0.9])))
    return m, x


@settings(max_examples=30, deadline=None)
@given(resnets(), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_ibp_bounds_exact_and_sound(mx: tuple[QuantNet, np.ndarray], radius: int, seed: int) -> None:
    """QA-IBP through the residual add: the exact integer intervals of the export, containing sampled points."""
    model, x = mx
    net = export_qnetwork(model)
    lo, hi = np.maximum(x - radius, 0), np.minimum(x + radius, model.input_hi)
    got = interval_bounds(model, torch.from_numpy(lo), torch.from_numpy(hi))
    want = exact_intervals(net, lo, hi)
    assert len(got) == len(want)
    for (gl, gh), (wl, wh) in zip(got, want, strict=True):
        assert np.array_equal(gl.detach().numpy().ravel(), wl.astype(np.float64).ravel())
        assert np.array_equal(gh.detach().numpy().ravel(), wh.astype(np.float64).ravel())
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, model.n_classes, size=len(x))
    lb = crown_ibp_margins(model, torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(labels),
                           ibp=got).detach().numpy()
    for pts in [lo, hi, *(rng.integers(lo, hi + 1) for _ in range(5))]:
        vals = execute(net, pts)
        for (bl, bh), v in zip(got, vals, strict=True):
            assert np.all(bl.detach().numpy() <= v) and np.all(v <= bh.detach().numpy())
        out = vals[-1].reshape(len(x), -1).astype(np.float64)
        assert np.all(lb <= out[np.arange(len(x)), labels][:, None] - out + TOL)


def test_float_mode_bounds_and_crown_point_boxes() -> None:
    """Float mode (real units, ReLU): IBP and CROWN-IBP contain the float model's values; a point box gives the
    exact margins in quantized mode."""
    x = np.random.default_rng(1).integers(0, 256, size=(8, 1, 6, 6))
    m = small_resnet(input_shape=(1, 6, 6), n_classes=3, stem=((2, 3, 1, 1),), blocks=2, hidden=(4,), calib=x)
    labels = torch.zeros(len(x), dtype=torch.int64)
    lb = crown_ibp_margins(m, torch.from_numpy(x), torch.from_numpy(x), labels).detach().numpy()
    out = execute(export_qnetwork(m), x)[-1].astype(np.float64)
    assert np.allclose(lb, out[:, :1] - out, atol=TOL, rtol=0)
    m.quantized = False
    lo, hi = np.maximum(x - 3, 0), np.minimum(x + 3, 255)
    b = interval_bounds(m, torch.from_numpy(lo), torch.from_numpy(hi))
    lbf = crown_ibp_margins(m, torch.from_numpy(lo), torch.from_numpy(hi), labels, ibp=b).detach()
    for pts in (lo, hi, np.random.default_rng(2).integers(lo, hi + 1)):
        vals = m.layer_values(torch.from_numpy(pts))
        for (bl, bh), v in zip(b, vals, strict=True):
            assert torch.all(bl <= v + 1e-9) and torch.all(v <= bh + 1e-9)
        z = vals[-1].detach()
        assert torch.all(lbf <= z[:, :1] - z + TOL)


# ------------------------------------------------------------------------------------------ settings
def test_per_layer_bits_round_trip(tmp_path) -> None:
    """Affine layers in the order stem conv, conv_a, conv_b, dense, output: config -> checkpoint -> .qnn."""
    sets = ["data.train='digits'", "data.train_limit=60", "data.holdout=20", "train.method='qat'", "train.epochs=1",
            "model.arch='resnet'", "model.conv=[[3, 3, 1, 1]]", "model.blocks=1", "model.hidden=[8]",
            "quant.weight_bits=[8, 4, 6, 8, 8]", "quant.act_bits=[8, 6, 4, 8]", "quant.out_bits=8",
            "progress=false", f"out_dir='{tmp_path}'"]
    cfg = load_config(None, sets)
    (tmp_path / "c.toml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.toml") == cfg
    res = train(cfg)
    want = [(8, 8), (4, 6), (6, 4), (8, 8), (8, 8)]
    assert [(b.weight_bits, b.out_bits) for b in res.model.affine_blocks] == want
    _, model, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert [(b.weight_bits, b.out_bits) for b in model.affine_blocks] == want
    path = tmp_path / "m.qnn"
    net = save_trained(model, path)
    loaded = load_model(path)
    assert parse_layer_bits(loaded.metadata["layer_bits"]) == want
    assert loaded.inputs == net.inputs and not loaded.is_chain
    x = np.random.default_rng(0).integers(0, 17, size=(50, 1, 8, 8))
    for a, b in zip(execute(loaded, x), execute(net, x), strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(execute(loaded, x)[-1], model.forward_int(torch.from_numpy(x)).detach().numpy())
    rq = [layer for layer in loaded.layers if isinstance(layer, Requantize)]
    assert [layer.hi for layer in rq[:3]] == [255, 63, 15]
    with pytest.raises(QuantError, match=r"quant.weight_bits lists 4 widths"):
        train(load_config(None, [*sets[:-1], "quant.weight_bits=[8, 4, 6, 8]"]))


@pytest.mark.parametrize("sets,match", [(["model.blocks=-1"], "model.blocks"),
                                        (["model.conv=[]"], "model.conv"),
                                        (["model.blocks=1.5"], "blocks")])
def test_bad_settings_name_the_setting(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.arch='resnet'", *sets])


def test_bad_models_are_refused() -> None:
    with pytest.raises(QuantError, match="model.blocks"):
        ModelConfig(arch="resnet", blocks=-2)
    with pytest.raises(QuantError, match="needs a conv stem"):
        ModelConfig(arch="resnet", conv=())
    with pytest.raises(QuantError, match=r"\[C, H, W\]"):
        build_model(ModelConfig(arch="resnet", conv=((2, 3, 1, 1),)), QuantConfig(), (16,), 255, 2)


def test_onnx_export_refused_with_the_arch(tmp_path) -> None:
    from qverify.train.export import export_onnx

    m = small_resnet(QuantConfig(rounding="half_even"), input_shape=(1, 6, 6), n_classes=3, stem=((2, 3, 1, 1),),
                     hidden=(4,))
    with pytest.raises(QuantError, match="resnet"):
        export_onnx(m, tmp_path / "m.onnx")


# ------------------------------------------------------------------------------------------ every method
METHODS = [("qaibp", []), ("qaibp", ["train.bound='crown-ibp'"]), ("ibp", []), ("qat", []), ("float-ibp", []),
           ("pgd-at", []), ("fgsm-rs", []), ("float-pgd-at", []), ("grad-l1", []),
           ("binaryrelax", ["quant.weight_bits=2", "quant.act_bits=4", "train.br_hard_epochs=1"]),
           ("robust2bit", ["quant.weight_bits=2", "quant.act_bits=4", "train.float_epochs=1"])]


@pytest.mark.parametrize("method,extra", METHODS)
def test_every_method_trains_and_exports_exactly(tmp_path, method: str, extra: list[str]) -> None:
    epochs = 2 if method in ("robust2bit", "binaryrelax") else 1
    cfg = load_config(None, ["data.train='digits'", "data.train_limit=40", "data.holdout=20",
                             f"train.method='{method}'", f"train.epochs={epochs}", "train.warmup_epochs=0.0",
                             "train.ramp_epochs=0.5", "train.eps=1.0", "train.pgd_steps=2", "train.batch_size=20",
                             "model.arch='resnet'", "model.conv=[[3, 3, 1, 1]]",
                             "model.hidden=[8]", "progress=false", f"out_dir='{tmp_path}'", *extra])
    res = train(cfg)
    assert res.model.quantized and len(res.history) >= 1
    assert all(np.isfinite(r.get("loss", 0.0)) for r in res.history)
    if method == "binaryrelax":
        from qverify.train.methods import set_relaxation

        set_relaxation(res.model, None)
    x = np.random.default_rng(0).integers(0, 17, size=(40, 1, 8, 8))
    _assert_layers_equal(res.model, x)
    if method in ("float-ibp", "grad-l1", "float-pgd-at"):  # the float checkpoint quantizes with an Add
        fm, qc = from_checkpoint(tmp_path)
        assert "add" in [n.kind for n in fm.nodes]
        ptq = quantize(fm, x, qc)
        fq = FakeQuantModel(ptq.steps, fm.input_shape, ptq.qc.mode)
        assert np.array_equal(fq.forward_int(x), execute(ptq.network, x)[-1])


def test_robust2bit_terms_see_the_residual_layers(mnist: np.ndarray) -> None:
    """The spectral term counts every affine layer, and conv_b's is that of its own weights ``s_w W`` whether or
    not the skip is folded in (``f W`` at the unit ``u / f``); the feature term reaches conv_b's weights."""
    import copy

    from qverify.train.methods import robust2bit_objective, spectral_terms

    qc = QuantConfig(weight_quantizer="pow2-bases", weight_bits=2, act_bits=4)
    m = small_resnet(qc, seed=5, calib=mnist[:100])
    x = torch.from_numpy(mnist[:20])
    params = m.block_params()
    res = spectral_terms(m, params, m.layer_values(x, params), iters=30)
    assert len(res) == len(m.affine_blocks) == 5
    plain = copy.deepcopy(m)
    plain.blocks[2].residual, plain.blocks[2].n_layers = False, 2
    pp = plain.block_params()
    assert float(params[2].weight.detach().abs().max()) > float(pp[2].weight.detach().abs().max())  # f > 1
    ref = spectral_terms(plain, pp, plain.layer_values(x, pp), iters=30)
    a, b = float(res[2].detach()), float(ref[2].detach())
    assert abs(a - b) <= 1e-9 * b
    loss, _ = robust2bit_objective(m, x, torch.zeros(20, dtype=torch.int64), feature_weight=1.0, spectral_weight=0.0)
    ce, _ = robust2bit_objective(m, x, torch.zeros(20, dtype=torch.int64), feature_weight=0.0, spectral_weight=0.0)
    (loss - ce).backward()
    assert m.blocks[2].weight.grad is not None and bool(torch.any(m.blocks[2].weight.grad != 0))
