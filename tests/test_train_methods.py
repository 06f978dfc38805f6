"""Robust-quantization training methods (issue 18 part 2): adversarial training (PGD, FGSM-RS) on the fake-quantized
model, the gradient l1 regularizer by double back-propagation, the conv operator's spectral norm, and each method
trained from the CLI with the integer network checked against the fake-quantized torch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qverify.cli import main
from qverify.execute import execute, forward, predict
from qverify.io import load_model
from qverify.lipschitz import layer_operator, spectral_norm
from qverify.train.layers import ModelConfig, QuantConfig, build_model
from qverify.train.methods import adversarial_objective, grad_l1_objective, grad_l1_terms, linf_attack
from qverify.train.trainer import ConfigError, load_checkpoint, load_config, prepare_data, train
from tests.fixtures import check_export_equals_training, train_cli

TINY = ["data.train='digits'", "data.holdout=300", "model.hidden=[16]", "progress=false", "train.batch_size=64",
        "train.lr=0.01", "quant.weight_bits=6", "quant.act_bits=6", "quant.out_bits=6"]


# ------------------------------------------------------------------------------------------ gradient l1
def _float_model(hidden: tuple[int, ...], seed: int = 3):
    m = build_model(ModelConfig(hidden=hidden), QuantConfig(), (5,), 15, 3, seed=seed)
    m.quantized = False
    return m


def test_grad_l1_terms_by_hand_on_a_linear_model() -> None:
    """One dense layer z = W x s + b (s the input scale): grad_W mean CE = (1/B) sum_b (p_b - e_yb) (s x_b)^T, and
    the logits' per-sample gradient is p_b - e_yb, whose l1 norm is 2 (1 - p_b,yb)."""
    m = _float_model(())
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 16, (7, 5)).astype(np.float64))
    y = torch.from_numpy(rng.integers(0, 3, 7))
    ce, w_term, a_term, _ = (t.detach() for t in grad_l1_terms(m, x, y))
    w = m.blocks[0].weight.detach().numpy()
    b = m.blocks[0].bias.detach().numpy()
    xr = x.numpy() * float(m.input_scale)
    z = xr @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(3)[y.numpy()]
    g_w = (p - onehot).T @ xr / len(y)
    assert float(ce) == pytest.approx(float(-np.log(p[np.arange(7), y.numpy()]).mean()), rel=1e-12)
    assert float(w_term) == pytest.approx(float(np.abs(g_w).sum()), rel=1e-10)
    assert float(a_term) == pytest.approx(float((2 * (1 - p[np.arange(7), y.numpy()])).mean()), rel=1e-10)


def test_grad_l1_double_backprop_against_finite_differences() -> None:
    """On a 5-4-3 ReLU MLP in float64: the weight term equals the l1 norm of the finite-difference gradient of the
    CE, and the gradient of the whole regularized loss (double back-propagation) equals its finite differences."""
    m = _float_model((4,))
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 16, (6, 5)).astype(np.float64))
    y = torch.from_numpy(rng.integers(0, 3, 6))
    params = [b.weight for b in m.blocks]
    h = 1e-6

    def ce_value() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    fd_l1 = 0.0
    for p in params:
        for i in range(p.numel()):
            with torch.no_grad():
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + h
                up = ce_value()
                p.view(-1)[i] = old - h
                dn = ce_value()
                p.view(-1)[i] = old
            fd_l1 += abs((up - dn) / (2 * h))
    w_term = grad_l1_terms(m, x, y)[1].detach()
    assert float(w_term) == pytest.approx(fd_l1, rel=1e-6)
    loss, st = grad_l1_objective(m, x, y, lambda_w=0.3, lambda_a=0.2)
    assert st.robust > 0 and st.loss == pytest.approx(st.natural + st.robust)
    grads = torch.autograd.grad(loss, params)
    w0 = params[0]
    differ = 0
    for i in range(w0.numel()):  # every entry of the first layer's weights
        with torch.no_grad():
            old = w0.view(-1)[i].item()
            w0.view(-1)[i] = old + h
        up = float(grad_l1_objective(m, x, y, 0.3, 0.2)[0].detach())
        with torch.no_grad():
            w0.view(-1)[i] = old - h
        dn = float(grad_l1_objective(m, x, y, 0.3, 0.2)[0].detach())
        with torch.no_grad():
            w0.view(-1)[i] = old
        plain = torch.autograd.grad(F.cross_entropy(m(x), y), [w0])[0].view(-1)[i].item()
        want = (up - dn) / (2 * h)
        assert grads[0].view(-1)[i].item() == pytest.approx(want, rel=1e-5, abs=1e-8)
        differ += abs(want - plain) > 1e-4
    assert differ >= 5  # the regularizer's own gradient is there (double back-propagation did something)


# ------------------------------------------------------------------------------------------ attacks
@pytest.fixture(scope="module")
def qat_model():
    res = train(load_config(None, [*TINY, "train.method='qat'", "train.epochs=3"]))
    _, ev = prepare_data(res.config)
    return res.model, torch.from_numpy(ev.images[:200].astype(np.float64)), torch.from_numpy(ev.labels[:200])


@pytest.mark.parametrize("eps", [1.0, 2.5])
def test_pgd_and_fgsm_examples_stay_in_the_ball_and_grid_and_raise_the_loss(qat_model, eps: float) -> None:
    model, x, y = qat_model
    x = x.reshape((-1, *model.input_shape))
    model.zero_grad(set_to_none=True)  # the last training step's gradients
    with torch.no_grad():
        clean = float(F.cross_entropy(model(x), y))
    for steps, alpha, restarts in ((10, eps / 4, 1), (1, 1.25 * eps, 1), (10, eps / 4, 3)):
        adv = linf_attack(model, x, y, eps, alpha, steps, restarts, generator=torch.Generator().manual_seed(5))
        assert torch.equal(adv, torch.round(adv))  # on the integer grid
        assert float((adv - x).abs().max()) <= np.floor(eps) and adv.min() >= 0 and adv.max() <= model.input_hi
        with torch.no_grad():
            assert float(F.cross_entropy(model(adv), y)) > clean + 0.05, (steps, restarts)
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. the input only
    # off the grid: real-valued examples inside the ball; restarts keep each sample's worst case
    real = linf_attack(model, x, y, eps, eps / 4, 10, 1, grid=False, generator=torch.Generator().manual_seed(5))
    assert float((real - x).abs().max()) <= eps + 1e-12 and not torch.equal(real, torch.round(real))
    one = linf_attack(model, x, y, eps, eps / 4, 10, 1, generator=torch.Generator().manual_seed(7))
    three = linf_attack(model, x, y, eps, eps / 4, 10, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        l1 = F.cross_entropy(model(one), y, reduction="none")
        l3 = F.cross_entropy(model(three), y, reduction="none")
    assert bool(torch.all(l3 >= l1 - 1e-12))
    loss, st = adversarial_objective(model, x, y, eps, "pgd-at", pgd_steps=5)
    assert st.robust > st.natural and st.certified == 0


# ------------------------------------------------------------------------------------------ spectral norm
@pytest.mark.parametrize("stride,padding", [((1, 1), (0, 0, 0, 0)), ((2, 2), (1, 1, 1, 1)), ((2, 1), (1, 0, 2, 1))])
def test_conv_spectral_norm_against_the_dense_matrix_svd(stride, padding) -> None:
    """The conv operator (conv2d on the layer's input shape, conv_transpose2d for its adjoint): its dense matrix,
    built by applying it to the identity basis, has the power iteration's top singular value, and the adjoint is
    that matrix's transpose. The reshaped kernel's norm is a different number."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 2))
    in_shape = (2, 7, 6)
    fwd, adj, shape = layer_operator(w, "conv", in_shape, stride, padding)
    n = int(np.prod(in_shape))
    eye = torch.eye(n, dtype=torch.float64).reshape((n, *in_shape))
    with torch.no_grad():
        dense = fwd(eye).reshape(n, -1).T.numpy()  # column j = A e_j
        m_out = dense.shape[0]
        out_shape = fwd(eye[:1]).shape[1:]
        e_out = torch.eye(m_out, dtype=torch.float64).reshape((m_out, *out_shape))
        dense_t = adj(e_out).reshape(m_out, -1).T.numpy()  # column i = A^T e_i
    np.testing.assert_allclose(dense_t, dense.T, atol=1e-12)
    want = float(np.linalg.svd(dense, compute_uv=False)[0])
    got = spectral_norm((fwd, adj, shape), iters=500)
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(float(np.linalg.norm(w.reshape(3, -1), 2)) - want) > 1e-3
    dense_w = rng.normal(size=(4, 9))
    assert spectral_norm(layer_operator(dense_w, "dense"), iters=500) == pytest.approx(
        float(np.linalg.norm(dense_w, 2)), rel=1e-6)


# ------------------------------------------------------------------------------------------ end to end (CLI)
def _train_cli(tmp_path, method: str, *extra: str):
    return train_cli(tmp_path, method, [*TINY[1:], "train.warmup_epochs=1.0", "train.ramp_epochs=1.0",
                                        "train.pgd_steps=5", *extra])


@pytest.mark.parametrize("method", ["pgd-at", "fgsm-rs"])
def test_adversarial_methods_train_from_cli_and_export_exactly(tmp_path, method: str) -> None:
    out = _train_cli(tmp_path, method)
    _, _, state, net, x, labels = check_export_equals_training(out, method)
    assert state["history"][-1]["eps"] == 1.0 and state["history"][-1]["robust_loss"] > 0
    assert float((predict(net, x) == labels).mean()) > 0.3


def test_float_pgd_at_trains_the_float_model_adversarially_then_quantizes(tmp_path) -> None:
    """float-pgd-at: the checkpoint stays float, the robust (adversarial) loss switches on after the warm-up and is
    above the clean loss, the exported .qnn equals the trainer's post-training quantization of it on every held-out
    image, and the Lipschitz criterion of Song et al. quantizes the checkpoint to 4 bits exactly."""
    from qverify.quantize import PTQConfig, from_checkpoint, quantize
    from qverify.train.trainer import _quantize_now

    out = _train_cli(tmp_path, "float-pgd-at")
    cfg, model, state = load_checkpoint(out / "checkpoint.pt")
    h = state["history"]
    assert not model.quantized and h[0]["robust_loss"] == pytest.approx(h[0]["natural_loss"])  # warm-up: eps 0
    assert h[-1]["eps"] == 1.0 and h[-1]["robust_loss"] > h[-1]["natural_loss"]
    tr, ev = prepare_data(cfg)
    x = ev.images.astype(np.int64)
    net = load_model(out / "model.qnn")
    assert net.metadata["train_method"] == "float-pgd-at"
    _quantize_now(model, torch.as_tensor(tr.images[:cfg.train.calib_images]), weights=True)
    for g, w in zip(model.layer_values(torch.from_numpy(x)), execute(net, x), strict=True):
        assert np.array_equal(g.detach().numpy(), w.astype(np.float64))
    fm, _ = from_checkpoint(out)
    res = quantize(fm, x[:100], QuantConfig(weight_bits=4, act_bits=8, out_bits=8),
                   PTQConfig(weight_clipping="lipschitz"))
    assert np.array_equal(forward(res.network, x), res.fake_quant_model().forward_int(x))


def test_grad_l1_trains_float_and_quantizes_to_every_width(tmp_path) -> None:
    """grad-l1 trains the float model (the checkpoint), exports a post-training-quantized .qnn equal to the trainer's
    fake-quantized model, and `qverify quantize` turns the checkpoint into 8/6/4/2-bit networks, each equal to its
    fake-quantized torch model on every held-out image."""
    from qverify.quantize import PTQConfig, from_checkpoint, quantize

    out = _train_cli(tmp_path, "grad-l1")
    cfg, model, state = load_checkpoint(out / "checkpoint.pt")
    h = state["history"]
    assert not model.quantized and h[0]["robust_loss"] == 0 and h[-1]["robust_loss"] > 0  # warm-up, then the term
    _, ev = prepare_data(cfg)
    x = ev.images.astype(np.int64)
    net = load_model(out / "model.qnn")
    assert net.metadata["train_method"] == "grad-l1"
    from qverify.train.trainer import _quantize_now

    tr, _ = prepare_data(cfg)
    _quantize_now(model, torch.as_tensor(tr.images[:cfg.train.calib_images]), weights=True)  # the trainer's PTQ
    for g, w in zip(model.layer_values(torch.from_numpy(x)), execute(net, x), strict=True):
        assert np.array_equal(g.detach().numpy(), w.astype(np.float64))
    fm, qc = from_checkpoint(out)
    calib = x[:100]
    for bits in (8, 6, 4, 2):
        res = quantize(fm, calib, QuantConfig(weight_bits=bits, act_bits=bits, out_bits=bits),
                       PTQConfig(weight_clipping="lipschitz" if bits <= 4 else "mse"))
        assert np.array_equal(forward(res.network, x), res.fake_quant_model().forward_int(x)), bits
        if bits == 8:
            assert float((predict(res.network, x) == ev.labels).mean()) > 0.3
    q = tmp_path / "q8.qnn"
    assert main(["quantize", str(out), "--bits", "4", "--calib", "digits", "--calib-images", "200",
                 "-o", str(q)]) == 0
    assert load_model(q).metadata["layer_bits"] == "w4a4,w4a4"
    assert load_model(q).metadata["train_method"] == "grad-l1"  # the checkpoint's method names the origin


# ------------------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("override,message", [
    ("train.method='pgd'", r"train\.method must be one of .*'pgd-at'.*got 'pgd'"),
    ("train.lambda_w=-0.1", r"train\.lambda_w must be in \[0, inf\), got -0\.1"),
    ("train.lambda_a=-1.0", r"train\.lambda_a must be in \[0, inf\)"),
    ("train.pgd_steps=0", r"train\.pgd_steps must be in \[1, inf\)"),
    ("train.pgd_alpha=0.0", r"train\.pgd_alpha must be in \(0, inf\)"),
    ("train.fgsm_alpha=-1.0", r"train\.fgsm_alpha must be in \(0, inf\)"),
    ("quant.weight_bits=1", r"quant\.weight_bits must be an integer in 2\.\.16 \(1 bit is binary, which needs a "
                            r"binary method\), got 1"),
])
def test_bad_configs_name_the_setting(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.method='pgd-at'", override])


def test_bad_configs_from_the_cli(tmp_path, capsys) -> None:
    o = str(tmp_path / "x")
    assert main(["train", "--method", "fgsm-rs", "--set", "quant.act_bits=[8, 1]", "-o", o]) == 3
    assert "quant.act_bits[1] must be an integer in 2..16" in capsys.readouterr().err
    assert main(["train", "--method", "grad-l1", "--set", "train.lambda_w=-1.0", "-o", o]) == 3
    assert "train.lambda_w must be in [0, inf), got -1.0" in capsys.readouterr().err
    assert main(["train", "--set", "train.method='madry'", "-o", o]) == 3
    assert "train.method must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "madry", "-o", o])
