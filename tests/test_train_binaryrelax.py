"""BinaryRelax (binary / ternary / 4-bit weights, relaxed then hard projection, natural-adversarial trade-off loss)
and robustness-aware 2-bit quantization (two power-of-two binary bases, feature and spectral-norm terms): the
quantizers and the projection against hand computations, the two-base fit against a brute-force search, each
method trained from the CLI with the integer network equal to the fake-quantized torch model, and the bad
configs naming their setting (issue 18 part 2)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qverify.cli import main
from qverify.execute import predict
from qverify.lipschitz import layer_operator, spectral_norm
from qverify.network import Conv2d, Dense, Requantize
from qverify.train.export import export_qnetwork
from qverify.train.layers import ModelConfig, QuantConfig, QuantError, build_model
from qverify.train.methods import (
    br_eta,
    robust2bit_objective,
    spectral_terms,
    weight_sparsity,
)
from qverify.train.trainer import (
    Config,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from qverify.train.wquant import MAX_SPAN, bases_error, binary, pow2_bases, relax, ternary, uniform
from tests.fixtures import check_export_equals_training, train_cli

T = torch.float64


def _t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=T)


# ------------------------------------------------------------------------------------------ quantizers
def test_binary_by_hand() -> None:
    w = _t([[0.3, -0.1, 0.0, -0.9], [0.5, 0.5, -0.2, 0.2]])
    codes, alpha = binary(w)
    assert codes.tolist() == [[1, -1, 1, -1], [1, 1, -1, 1]]  # sign(0) = +1: no zero code
    assert alpha.tolist() == pytest.approx([2.7 / 8])
    codes, alpha = binary(w, per_channel=True)
    assert alpha.tolist() == pytest.approx([1.3 / 4, 1.4 / 4])


def test_ternary_twn_rule_by_hand() -> None:
    w = _t([[0.9, -0.05, 0.3, -0.5, 0.1, 0.0]])
    codes, alpha = ternary(w)
    # mean |W| = 1.85 / 6, delta = 0.7 * that = 0.2158..: 0.9, 0.3, -0.5 are kept, alpha their mean magnitude
    assert codes.tolist() == [[1, 0, 1, -1, 0, 0]]
    assert float(alpha) == pytest.approx(1.7 / 3)
    # per layer the small second row is all below delta: a zero channel; per channel it keeps its own threshold
    w2 = _t([[1.0, -0.8, 0.9], [0.1, -0.05, 0.02]])
    codes, alpha = ternary(w2)
    assert codes.tolist() == [[1, -1, 1], [0, 0, 0]] and float(alpha) == pytest.approx(0.9)
    codes, alpha = ternary(w2, per_channel=True)
    # row 2: mean 0.17 / 3, delta 0.0397: 0.1 and -0.05 kept, alpha 0.075
    assert codes.tolist() == [[1, -1, 1], [1, -1, 0]] and alpha.tolist() == pytest.approx([0.9, 0.075])


def test_uniform_4bit_least_squares_scale_by_hand() -> None:
    w = _t([[1.75, -0.6, 0.25, 0.1]])
    codes, alpha = uniform(w, 4, iters=0)  # alpha_0 = max |W| / 7
    assert float(alpha) == 0.25 and codes.tolist() == [[7, -2, 1, 0]]
    codes, alpha = uniform(w, 4, iters=1)  # alpha_1 = <W, c> / <c, c> = (12.25 + 1.2 + 0.25) / 54
    assert float(alpha) == pytest.approx(13.7 / 54) and codes.tolist() == [[7, -2, 1, 0]]
    big = _t([[3.0, -100.0, 0.5]])
    assert uniform(big, 4)[0].abs().max() <= 7  # narrow symmetric range {-7..7}


def test_binaryrelax_projection_by_hand() -> None:
    """G = (eta Q(W) + W) / (1 + eta) with Q(W) = alpha sign(W): W = (0.3, -0.1, 0.5, -0.9), alpha = 0.45, eta = 2
    gives G = (0.4, -1/3, 1.4/3, -0.6); the layer computes G / alpha (code units), the gradient reaches W at G
    (dG/dW = 1, Q straight through); eta = None is the hard projection, the codes themselves."""
    w = _t([[0.3, -0.1, 0.5, -0.9]])
    codes, alpha = binary(w)
    assert float(alpha) == pytest.approx(0.45)
    g = relax(codes, w / alpha, 2.0) * alpha
    np.testing.assert_allclose(g.numpy(), [[0.4, -1 / 3, 1.4 / 3, -0.6]], atol=1e-15)
    assert torch.equal(relax(codes, w / alpha, None), codes)
    # in a layer: the relaxed weights in code units, their gradient 1/alpha per unit (= 1 in real units)
    m = build_model(ModelConfig(hidden=()), QuantConfig(weight_quantizer="binaryrelax", weight_bits=1), (4,), 15, 1)
    blk = m.affine_blocks[0]
    with torch.no_grad():
        blk.weight.copy_(w)
    blk.relax_eta = 2.0
    p = blk.qparams(m.in_log2, True)
    np.testing.assert_allclose((p.weight * 0.45).detach().numpy(), [[0.4, -1 / 3, 1.4 / 3, -0.6]], atol=1e-12)
    c = _t([[1.0, 2.0, -3.0, 0.5]])
    (gw,) = torch.autograd.grad((p.weight * alpha * c).sum(), [blk.weight])
    np.testing.assert_allclose(gw.numpy(), c.numpy(), atol=1e-12)
    with pytest.raises(QuantError, match="not integers"):  # a relaxed model is not a quantized network
        export_qnetwork(m)
    blk.relax_eta = None
    assert export_qnetwork(m).layers[0].weight.tolist() == [[1, -1, 1, -1]]


def test_br_eta_schedule() -> None:
    assert br_eta(0, 10) == 1.0 and br_eta(3, 10) == pytest.approx(1.02**3)
    assert br_eta(5, 10, start_epoch=2, eta0=0.5, rho=2.0) == 4.0
    assert br_eta(7, 10) == pytest.approx(1.02**7) and br_eta(8, 10) is None and br_eta(9, 10) is None


# ------------------------------------------------------------------------------------------ two bases
def test_two_bases_exact_case() -> None:
    w = _t([[1.25, 0.75, -1.25, -0.75]])  # 2^0 B_1 + 2^-2 B_2
    codes, scale = pow2_bases(w)
    assert codes.tolist() == [[5, 3, -5, -3]] and scale.tolist() == [0.25]


def _brute(r: np.ndarray) -> float:
    """min over exponent pairs a >= b (a - b <= MAX_SPAN) and over the signs of every entry."""
    best = math.inf
    for a in range(-14, 4):
        for b in range(a - MAX_SPAN, a + 1):
            levels = [s1 * 2.0**a + s2 * 2.0**b for s1, s2 in itertools.product((-1, 1), repeat=2)]
            err = sum(min((x - lv) ** 2 for lv in levels) for x in r)
            best = min(best, err)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_two_bases_fit_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=[[0.05], [0.3], [1.0]], size=(3, 5)) * rng.choice([0.2, 1.0, 4.0])
    for per_channel in (False, True):
        codes, scale = pow2_bases(_t(w), per_channel)
        approx = (codes * scale[:, None]).numpy() if per_channel else codes.numpy() * float(scale)
        rows = w if per_channel else w.reshape(1, -1)
        got = ((rows - approx.reshape(rows.shape)) ** 2).sum(axis=1)
        want = [_brute(r) for r in rows]
        assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15), (seed, per_channel)
        # the codes are 2^(a-b) B_1 + B_2: odd magnitudes 2^k +- 1 (one k per row), scale a power of two
        for row_codes, s in zip(codes.reshape(len(rows), -1).numpy(), np.atleast_1d(scale.numpy()), strict=True):
            assert math.log2(s) == round(math.log2(s))
            mags = set(np.abs(row_codes).astype(int).tolist())
            k = [k for k in range(MAX_SPAN + 1) if mags <= {2**k - 1, 2**k + 1}]
            assert k, (mags, seed)
    r = _t(w).reshape(1, -1)
    a, b = torch.tensor([0.0]), torch.tensor([-2.0])
    want = sum(min((x - lv) ** 2 for lv in (1.25, 0.75, -0.75, -1.25)) for x in w.ravel())
    assert float(bases_error(r, a, b)) == pytest.approx(want)


# ------------------------------------------------------------------------------------------ robust 2-bit terms
def test_spectral_terms_are_the_quantized_operators_norms() -> None:
    """Per layer, sigma of s * codes by the power iteration equals the SVD of the real quantized dense weights and
    lipschitz.spectral_norm of the conv operator; the feature term is the mse of the hidden activations."""
    qc = QuantConfig(weight_quantizer="pow2-bases", weight_bits=2, per_channel=True)
    m = build_model(ModelConfig(arch="cnn", conv=((3, 3, 2, 1),), hidden=(5,)), qc, (1, 6, 6), 15, 3, seed=1)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 16, (4, 1, 6, 6)).astype(np.float64))
    params = m.block_params()
    vals = m.layer_values(x, params)
    sig = [float(s.detach()) for s in spectral_terms(m, params, vals, iters=100)]
    blocks = m.affine_blocks
    for i, (blk, s) in enumerate(zip(blocks, sig, strict=True)):
        codes, scale = pow2_bases(blk.weight.detach(), True)
        real = (codes * scale.reshape((-1,) + (1,) * (codes.ndim - 1))).numpy()
        if i == 0:
            want = spectral_norm(layer_operator(real, "conv", (1, 6, 6), (2, 2), (1, 1, 1, 1)), iters=100)
        else:
            want = float(np.linalg.norm(real, 2))
        assert s == pytest.approx(want, rel=1e-6)
    loss, st = robust2bit_objective(m, x, torch.tensor([0, 1, 2, 0]), feature_weight=0.5, spectral_weight=0.0)
    m.quantized = False
    with torch.no_grad():
        fv = m.layer_values(x)
    m.quantized = True
    q_hidden = [(vals[st_ + 2] * torch.exp2(p.out_log2)).detach() for blk, p, st_ in
                zip(m.blocks, params, m.block_starts(), strict=True) if p is not None and not blk.last]
    f_hidden = [fv[st_ + 2] for blk, st_ in zip(m.blocks, m.block_starts(), strict=True)
                if hasattr(blk, "last") and not blk.last]
    want = 0.5 * sum(float(F.mse_loss(a, b)) for a, b in zip(q_hidden, f_hidden, strict=True))
    assert st.robust == pytest.approx(want, rel=1e-12) and want > 0


# ------------------------------------------------------------------------------------------ end to end (CLI)
TINY = ["data.holdout=300", "model.hidden=[16]", "train.batch_size=64", "train.lr=0.01", "quant.act_bits=6",
        "quant.out_bits=6", "train.warmup_epochs=1.0", "train.ramp_epochs=1.0", "train.pgd_steps=5",
        "train.br_hard_epochs=1"]


def _train_cli(tmp_path, method: str, *extra: str):
    return train_cli(tmp_path, method, [*TINY, *extra])


@pytest.mark.parametrize("method,bits,per_channel,cnn", [
    ("binaryrelax", 1, False, False), ("binaryrelax", 2, False, False), ("binaryrelax", 2, True, True),
    ("binaryrelax", 4, False, False), ("robust2bit", 2, True, False), ("robust2bit", 2, False, True)])
def test_methods_train_from_cli_and_export_exactly(tmp_path, method: str, bits: int, per_channel: bool,
                                                   cnn: bool) -> None:
    arch = ["model.arch='cnn'", "model.conv=[[4, 3, 2, 1]]"] if cnn else []
    out = _train_cli(tmp_path, method, f"quant.weight_bits={bits}", f"quant.per_channel={str(per_channel).lower()}",
                     *arch)
    cfg, model, state, net, x, labels = check_export_equals_training(out, method)
    h = state["history"]
    assert float((predict(net, x) == labels).mean()) > 0.3
    weights = [lay.weight.reshape(lay.weight.shape[0], -1) for lay in net.layers if isinstance(lay, (Dense, Conv2d))]
    assert len(weights) == (3 if cnn else 2)
    sp = weight_sparsity(model)
    assert h[-1]["zero_weights"] == sp["zero_weights"] and net.metadata["zero_weights"] == f"{sp['zero_weights']:.4f}"
    if method == "binaryrelax":
        assert [r["br_eta"] for r in h] == [1.0, pytest.approx(1.02), None]  # relaxed, then the hard phase
        assert h[-1]["robust_loss"] > h[-1]["natural_loss"]  # the adversarial cross entropy (eps ramped to 1)
        top = {1: 1, 2: 1, 4: 7}[bits]
        assert all(np.abs(w).max() <= top for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
        assert zeros == pytest.approx(sp["zero_weights"])
        assert (zeros == 0) if bits == 1 else (zeros > 0.1)  # ternary / 4-bit codes have zeros, binary none
        zero_rows = sum(int((w == 0).all(axis=1).sum()) for w in weights)
        assert zero_rows == sp["zero_channels"] and f"{zero_rows}/" in net.metadata["zero_channels"]
    else:
        assert h[0]["robust_loss"] == 0 and h[-1]["robust_loss"] > 0  # warm-up, then the two terms
        for w in weights:  # per row 2^k B_1 + B_2 (odd magnitudes 2^k +- 1), every multiplier a power of two
            for row in w:
                mags = set(np.abs(row).tolist())
                assert any(mags <= {2**k - 1, 2**k + 1} for k in range(MAX_SPAN + 1)), mags
        for lay in net.layers:
            if isinstance(lay, Requantize):
                assert all(n & (n - 1) == 0 and d & (d - 1) == 0 for n, d in zip(lay.num, lay.den, strict=True))


# ------------------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("override,message", [
    ("quant.weight_bits=3", r"quant\.weight_bits must be 1 \(binary\), 2 \(ternary\) or 4 for train\.method = "
                            r"'binaryrelax', got 3"),
    ("quant.weight_bits=[1, 8]", r"quant\.weight_bits\[1\] must be 1 \(binary\), 2 \(ternary\) or 4"),
    ("train.br_eta0=-1.0", r"train\.br_eta0 must be in \(0, inf\), got -1\.0"),
    ("train.br_rho=0.5", r"train\.br_rho must be in \[1, inf\)"),
    ("train.br_hard_epochs=0", r"train\.br_hard_epochs must be in \[1, inf\)"),
    ("train.br_beta=1.5", r"train\.br_beta must be in \[0, 1\]"),
])
def test_bad_binaryrelax_configs_name_the_setting(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.method='binaryrelax'", "quant.weight_bits=1", override])


def test_bad_quantizer_configs_name_the_setting(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"quant\.weight_bits must be 2 \(two power-of-two binary bases\) for "
                                          r"train\.method = 'robust2bit', got 8"):
        load_config(None, ["train.method='robust2bit'"])  # the default 8 bits
    with pytest.raises(ConfigError, match=r"train\.spectral_weight must be in \[0, inf\)"):
        load_config(None, ["train.method='robust2bit'", "quant.weight_bits=2", "train.spectral_weight=-1.0"])
    # 1 bit for a non-binary method (also in test_train_methods), and a quantizer that contradicts the method
    with pytest.raises(ConfigError, match=r"quant\.weight_bits must be an integer in 2\.\.16 \(1 bit is binary"):
        load_config(None, ["train.method='qat'", "quant.weight_bits=1"])
    p = tmp_path / "c.toml"
    p.write_text('[train]\nmethod = "pgd-at"\n[quant]\nweight_quantizer = "binaryrelax"\nweight_bits = 1\n')
    with pytest.raises(ConfigError, match=r"quant\.weight_quantizer = 'binaryrelax' does not match train\.method = "
                                          r"'pgd-at'"):
        load_config(p)
    # switching the method by an override re-derives the quantizer; a written config reads back
    cfg = load_config(None, ["train.method='binaryrelax'", "quant.weight_bits=2"])
    assert cfg.quant.weight_quantizer == "binaryrelax"
    assert apply_overrides(cfg, ["train.method='qat'"]).quant.weight_quantizer == "uniform"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    built = Config(train=TrainConfig(method="binaryrelax"), quant=QuantConfig(weight_bits=2))  # in Python
    assert built.quant.weight_quantizer == "binaryrelax"
    assert replace(built, train=replace(built.train, method="qat")).quant.weight_quantizer == "uniform"
    o = str(tmp_path / "x")
    assert main(["train", "--method", "binaryrelax", "--set", "quant.weight_bits=3", "-o", o]) == 3
    assert "quant.weight_bits must be 1 (binary), 2 (ternary) or 4" in capsys.readouterr().err
    assert main(["train", "--method", "binaryrelax", "--set", "quant.weight_bits=1",
                 "--set", "train.br_eta0=-0.5", "-o", o]) == 3
    assert "train.br_eta0 must be in (0, inf), got -0.5" in capsys.readouterr().err


def test_binaryrelax_resume_gives_the_uninterrupted_model(tmp_path) -> None:
    """eta is a pure function of the epoch: a run interrupted in its relaxed phase and resumed ends at the same
    hard-quantized model as an uninterrupted one."""
    from qverify.train.trainer import train

    sets = ["data.train='digits'", "progress=false", *TINY, "train.method='binaryrelax'", "quant.weight_bits=2",
            "train.epochs=3", "train.eps=1.0"]
    whole = train(load_config(None, [*sets, f"out_dir='{tmp_path / 'a'}'"]))
    cfg = load_config(None, [*sets, f"out_dir='{tmp_path / 'b'}'"])
    part = train(cfg, stop_after_epoch=0)
    assert part.model.affine_blocks[0].relax_eta == 1.0  # stopped while relaxed
    rest = train(cfg, resume=True)
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, rest.model.state_dict()[k]), k
    assert [r["br_eta"] for r in rest.history] == [r["br_eta"] for r in whole.history]
