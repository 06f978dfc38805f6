"""Larq-style binarized ONNX models for the tests (built with ``onnx.helper``, as Larq + tf2onnx lay them out).

``larq_cnn`` writes a small binarized CNN on 28x28 pixels ``0..255`` given as floats: a first ``Conv`` on the real
pixels (``+-1`` weights, Larq's ``kernel_quantizer="ste_sign"``, or float weights), ``MaxPool``, a
``BatchNormalization`` and Larq's ``Sign(Sign(y) + 0.1)``; a second ``+-1`` ``Conv`` on the signs with the same
pool / BatchNorm / sign; ``Flatten``; a final ``MatMul`` (float weights fitted by least squares on the sign
features, or ``+-1``) with a per-class ``BatchNormalization`` and ``Softmax``. The BatchNorm statistics are the
batch's own (as a trained BatchNorm's running averages would be), their ``gamma`` random with random signs, so
thresholds land anywhere. Variants put the BatchNorm before the pool, read an NHWC input through a Transpose, or
use ``Mul`` / ``Add`` instead of a BatchNorm before a sign.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def larq_cnn(path: Path, images: np.ndarray, labels: np.ndarray, seed: int = 0, float_first: bool = False,
             bn_before_pool: bool = False, nhwc: bool = False, mul_add: bool = False, binary_last: bool = False,
             channels: tuple[int, int] = (8, 12), input_scale: float = 1.0) -> Path:
    """Write the model (module docstring) to ``path``; ``images`` ``[N, 28, 28]`` pixels (calibration);
    ``input_scale``: the model takes ``pixel * input_scale`` (a model trained on ``pixel / 255``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c1, c2 = channels
    x = torch.as_tensor(images, dtype=torch.float64)[:, None] * float(np.float32(input_scale))
    w1 = rng.normal(0, 0.5, size=(c1, 1, 3, 3)) if float_first else rng.choice([-1.0, 1.0], size=(c1, 1, 3, 3))
    w1 = w1.astype(np.float32).astype(np.float64)
    w2 = rng.choice([-1.0, 1.0], size=(c2, c1, 3, 3))
    inits: list = []
    nodes: list = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def bn_params(y: torch.Tensor, name: str) -> tuple[np.ndarray, ...]:
        dims = [0, 2, 3] if y.ndim == 4 else [0]
        mean = y.mean(dim=dims).numpy()
        var = y.var(dim=dims).numpy() + 1e-3
        gamma = rng.uniform(0.5, 2.0, size=mean.shape) * rng.choice([-1.0, 1.0], size=mean.shape)
        beta = rng.normal(0, 0.3, size=mean.shape)
        return tuple(a.astype(np.float32).astype(np.float64) for a in (gamma, beta, mean, var))

    def bn_apply(y: torch.Tensor, p: tuple[np.ndarray, ...]) -> torch.Tensor:
        g, b, m, v = (torch.as_tensor(a) for a in p)
        shape = (1, -1, 1, 1) if y.ndim == 4 else (1, -1)
        return (y - m.view(shape)) / torch.sqrt(v.view(shape) + 1e-5) * g.view(shape) + b.view(shape)

    def bn_node(inp: str, out: str, p: tuple[np.ndarray, ...], tag: str) -> None:
        names = [const(f"{tag}_{k}", a) for k, a in zip(("gamma", "beta", "mean", "var"), p, strict=True)]
        nodes.append(helper.make_node("BatchNormalization", [inp, *names], [out], name=tag, epsilon=1e-5))

    def sign_nodes(inp: str, out: str, tag: str) -> None:
        nodes.append(helper.make_node("Sign", [inp], [f"{tag}_s0"], name=f"{tag}_sign0"))
        nodes.append(helper.make_node("Add", [f"{tag}_s0", const(f"{tag}_c", np.array(0.1))], [f"{tag}_s1"],
                                      name=f"{tag}_plus"))
        nodes.append(helper.make_node("Sign", [f"{tag}_s1"], [out], name=tag))

    def affine_before_sign(y: torch.Tensor, inp: str, out: str, tag: str) -> torch.Tensor:
        if mul_add:
            dims = [0, 2, 3] if y.ndim == 4 else [0]
            scale = (rng.uniform(0.5, 2.0, size=y.shape[1]) * rng.choice([-1.0, 1.0], size=y.shape[1])
                     ).astype(np.float32).astype(np.float64)
            shift = (-y.mean(dim=dims).numpy() * scale).astype(np.float32).astype(np.float64)
            shape4 = (-1, 1, 1) if y.ndim == 4 else (-1,)
            nodes.append(helper.make_node("Mul", [inp, const(f"{tag}_mul", scale.reshape(shape4))], [f"{tag}_m"],
                                          name=f"{tag}_mul"))
            nodes.append(helper.make_node("Add", [f"{tag}_m", const(f"{tag}_add", shift.reshape(shape4))], [out],
                                          name=f"{tag}_add"))
            sv = (1, -1, 1, 1) if y.ndim == 4 else (1, -1)
            return y * torch.as_tensor(scale).view(sv) + torch.as_tensor(shift).view(sv)
        p = bn_params(y, tag)
        bn_node(inp, out, p, tag)
        return bn_apply(y, p)

    def block(h: torch.Tensor, inp: str, w: np.ndarray, tag: str) -> tuple[torch.Tensor, str]:
        nodes.append(helper.make_node("Conv", [inp, const(f"{tag}_w", w)], [f"{tag}_conv"], name=f"{tag}_conv",
                                      pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        y = F.conv2d(h, torch.as_tensor(w), padding=1)
        if bn_before_pool:
            y = affine_before_sign(y, f"{tag}_conv", f"{tag}_bn", f"{tag}_bn")
            nodes.append(helper.make_node("MaxPool", [f"{tag}_bn"], [f"{tag}_pool"], name=f"{tag}_pool",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            y = F.max_pool2d(y, 2)
            sign_nodes(f"{tag}_pool", f"{tag}_out", f"{tag}_act")
        else:
            nodes.append(helper.make_node("MaxPool", [f"{tag}_conv"], [f"{tag}_pool"], name=f"{tag}_pool",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            y = F.max_pool2d(y, 2)
            y = affine_before_sign(y, f"{tag}_pool", f"{tag}_bn", f"{tag}_bn")
            sign_nodes(f"{tag}_bn", f"{tag}_out", f"{tag}_act")
        return _sign(y), f"{tag}_out"

    inp_name = "image"
    if nhwc:
        nodes.append(helper.make_node("Transpose", [inp_name], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
        first = "nchw"
    else:
        first = inp_name
    h, name = block(x, first, w1, "b1")
    h, name = block(h, name, w2, "b2")
    nodes.append(helper.make_node("Flatten", [name], ["flat"], name="flatten", axis=1))
    feats = h.reshape(len(h), -1).numpy()
    n_feat = feats.shape[1]
    if binary_last:
        w3 = rng.choice([-1.0, 1.0], size=(n_feat, 10))
    else:
        onehot = np.eye(10)[labels]
        w3 = np.linalg.lstsq(np.c_[feats, np.ones(len(feats))], onehot, rcond=None)[0][:-1]
        w3 = (w3 / np.abs(w3).max()).astype(np.float32).astype(np.float64)
    nodes.append(helper.make_node("MatMul", ["flat", const("fc_w", w3)], ["fc"], name="fc"))
    logits = torch.as_tensor(feats @ w3)
    p = bn_params(logits, "fc_bn")
    # near the identity with positive per-class scales, as a trained output BatchNorm is
    p = (np.sqrt(p[3] + 1e-5) * rng.uniform(0.8, 1.2, size=10), p[2] + rng.normal(0, 0.05, size=10), p[2], p[3])
    p = tuple(a.astype(np.float32).astype(np.float64) for a in p)
    bn_node("fc", "fc_bn_out", p, "fc_bn")
    nodes.append(helper.make_node("Softmax", ["fc_bn_out"], ["probs"], name="softmax", axis=1))
    in_shape = ["N", 28, 28, 1] if nhwc else ["N", 1, 28, 28]
    graph = helper.make_graph(nodes, "larq-cnn", [helper.make_tensor_value_info(inp_name, TensorProto.FLOAT,
                                                                               in_shape)],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def with_outputs(path: Path, names: list[str], out: Path) -> Path:
    """A copy of the model that also outputs the tensors ``names`` (for per-layer comparisons)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    for n in names:
        model.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    onnx.save(model, str(out))
    return out
