"""Exact export of a trained :class:`~qverify.train.layers.QuantNet` to a :class:`~qverify.network.QNetwork`.

The exported integers are the very tensors the torch forward pass uses (``QAffine.qparams``): weights, biases at
the accumulator scale, and each requantization multiplier ``M_c = num_c / den_c`` (a dyadic rational, exact), with
the model's rounding mode and zero points 0. A :class:`QFlatten` becomes a ``Flatten``. A residual conv (the
second conv of a ``resnet`` block, :mod:`qverify.train.layers`, "Residual blocks") becomes four nodes of a graph
network: ``Conv2d(f W, f B)`` on its input ``h``, a 1x1 ``Conv2d`` with diagonal weights ``k_c`` on the block input
``x``, ``Add((1, 1))`` of the two (``acc = f (W h + B) + k x``) and the ``Requantize``; the network's ``inputs`` say
which value each node reads (a chain model exports a chain). So on every integer input
the exported network's values equal the fake-quantized torch model's, layer by layer (tested), provided every
product ``acc * num_c`` stays below ``2^53`` (checked here from the network's worst-case ranges).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from qverify.network import Add, Conv2d, Dense, Flatten, Layer, QNetwork, Requantize
from qverify.quant import Rounding
from qverify.train.layers import QAffine, QConv2d, QuantConfig, QuantError, QuantNet

_EXACT = 2**53


def bits_metadata(model: QuantNet) -> dict[str, str]:
    """The widths as ``.qnn`` metadata: ``weight_bits`` / ``act_bits`` one number when every layer has the same,
    else a comma-separated per-layer list (``act_bits``: hidden layers), ``layer_bits`` always per layer
    (``"w8a8,w4a8,w8a8"``, the last ``a`` the output's), ``out_bits`` the output's. :func:`parse_layer_bits`
    reads ``layer_bits`` back."""
    blocks = model.affine_blocks
    wb = [b.weight_bits for b in blocks]
    ab = [b.out_bits for b in blocks[:-1]]

    def one_or_list(v: list[int]) -> str:
        return str(v[0]) if len(set(v)) == 1 else ",".join(str(x) for x in v)

    qa = model.qc.act_bits
    return {"weight_bits": one_or_list(wb), "act_bits": one_or_list(ab) if ab else str(qa if isinstance(qa, int)
                                                                                         else ""),
            "out_bits": str(blocks[-1].out_bits), "layer_bits": ",".join(f"w{b.weight_bits}a{b.out_bits}"
                                                                          for b in blocks)}


def parse_layer_bits(text: str) -> list[tuple[int, int]]:
    """``"w8a8,w4a6"`` -> ``[(8, 8), (4, 6)]`` (the ``layer_bits`` metadata of :func:`bits_metadata`)."""
    out = []
    for item in text.split(","):
        w, _, a = item.strip().removeprefix("w").partition("a")
        if not (w.isdigit() and a.isdigit()):
            raise QuantError(f"layer_bits: bad entry {item!r} (expected wNaM)")
        out.append((int(w), int(a)))
    return out


def export_qnetwork(model: QuantNet, name: str = "qverify-trained",
                    metadata: dict[str, str] | None = None) -> QNetwork:
    """The integer network computed by ``model`` (which must be in quantized mode)."""
    if not model.quantized:
        raise QuantError("export needs a quantized model (a float model must be quantized first: "
                         "calibrate(model, x); model.quantized = True)")
    with torch.no_grad():
        params = model.block_params()
    layers: list[Layer] = []
    inputs: list[tuple[int, ...]] = []
    cur = 0  # the value index of the current block's input
    block_in: list[int] = []

    def emit(layer: Layer, ins: tuple[int, ...]) -> int:
        layers.append(layer)
        inputs.append(ins)
        return len(layers)

    for i, (blk, p) in enumerate(zip(model.blocks, params, strict=True)):
        block_in.append(cur)
        if isinstance(blk, QAffine):
            assert p is not None and p.num is not None and p.den is not None
            w = p.weight.detach().cpu().numpy()
            b = p.bias.detach().cpu().numpy()
            if not np.array_equal(w, np.round(w)):
                raise QuantError(f"block {i}: the weights are not integers (BinaryRelax's relaxed phase, "
                                 f"relax_eta = {blk.relax_eta}); export needs the hard projection (relax_eta = None)")
            if isinstance(blk, QConv2d):
                pad = blk.padding
                acc = emit(Conv2d(w, b, stride=(blk.stride, blk.stride), padding=(pad, pad, pad, pad),
                                  pad_value=0, name=f"conv{i}"), (cur,))
            else:
                acc = emit(Dense(w, b, name=f"fc{i}"), (cur,))
            if blk.residual:
                assert p.skip is not None
                c = w.shape[0]
                k = np.broadcast_to(p.skip.detach().cpu().numpy().reshape(-1), (c,)).astype(np.float64)
                if not np.array_equal(k, np.round(k)) or k.min() < 1:
                    raise QuantError(f"block {i}: residual skip weights {k} are not positive integers")
                diag = np.zeros((c, c, 1, 1), dtype=np.int64)
                diag[np.arange(c), np.arange(c), 0, 0] = k.astype(np.int64)
                skip = emit(Conv2d(diag, np.zeros(c, dtype=np.int64), stride=(1, 1), padding=(0, 0, 0, 0),
                                   pad_value=0, name=f"skip{i}"), (block_in[i - 1],))
                acc = emit(Add((1, 1), 0, name=f"add{i}"), (acc, skip))
            num = tuple(int(v) for v in np.atleast_1d(p.num).ravel())
            den = tuple(int(v) for v in np.atleast_1d(p.den).ravel())
            cur = emit(Requantize(num, den, np.zeros(1, dtype=np.int64), blk.lo, blk.hi, model.qc.mode,
                                  name=f"requant{i}"), (acc,))
        else:
            cur = emit(Flatten(name=f"flatten{i}"), (cur,))
    out_log2 = float([p for p in params if p is not None][-1].out_log2.detach().reshape(()))
    meta = {"source": "qverify.train", "scheme": model.qc.scheme, **bits_metadata(model),
            "rounding": model.qc.mode.value}
    meta.update(metadata or {})
    net = QNetwork(input_shape=model.input_shape, input_lo=0, input_hi=model.input_hi, layers=tuple(layers),
                   input_scale=model.input_scale, input_zero_point=0,
                   output_scale=Fraction(2.0**out_log2), output_zero_point=0, input_rounding=None,
                   tie_rule="first", name=name, metadata=meta,
                   inputs=None if all(row == (j,) for j, row in enumerate(inputs)) else tuple(inputs))
    # the torch forward rounds acc * M exactly when |acc| * num < 2^53 (see layers._Requant)
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Requantize):
            lo, hi = net.value_ranges[net.node_inputs(i)[0]]
            if max(abs(lo), abs(hi)) * max(layer.num) >= _EXACT:
                raise QuantError(f"layer {i}: accumulator range {lo}..{hi} times multiplier numerator "
                                 f"{max(layer.num)} reaches 2^53; lower mult_bits or bias_bits")
    return net


def save_trained(model: QuantNet, path: str | Path, name: str | None = None,
                 metadata: dict[str, str] | None = None) -> QNetwork:
    """Export and write the native ``.qnn`` model; returns the exported network."""
    from qverify.io import save_model

    path = Path(path)
    net = export_qnetwork(model, name=name or path.stem, metadata=metadata)
    save_model(net, path)
    return net


# ------------------------------------------------------------------------------------------ ONNX (QDQ)
def _f32_exact(v: float, what: str, zero: bool = False) -> np.float32:
    f = np.float32(v)
    if float(f) != v or not np.isfinite(f) or (f == 0 and not zero):
        raise QuantError(f"ONNX export: {what} {v!r} is not exactly a float32")
    return f


def onnx_export_problem(qc: QuantConfig, input_hi: int, arch: str | None = None) -> str | None:
    """Why a model quantized per ``qc`` on the input grid ``[0, input_hi]`` (of ``model.arch = arch`` when
    given) cannot be exported to ONNX exactly (:func:`export_onnx`), or ``None`` when it can: known before
    training, so a run can refuse up front."""
    if arch == "resnet":
        return ("model.arch = 'resnet' has no QDQ ONNX export yet (its residual add folds the skip into the "
                "second conv's accumulator with integer skip weights, which a QDQ graph does not express); export "
                "the .qnn model instead")
    if qc.mode is not Rounding.HALF_EVEN:
        return (f"QuantizeLinear rounds half to even, the model rounds {qc.mode.value}; "
                f"train with quant.rounding = 'half_even'")
    if qc.max_bits > 8:
        return "weight, activation and output bits must be <= 8"
    if input_hi != 255:
        return f"the input grid must be the 8-bit [0, 255], the data's is [0, {input_hi}]"
    return None


def export_onnx(model: QuantNet, path: str | Path, opset: int = 13) -> QNetwork:
    """Write ``model`` as a QDQ ONNX graph that :func:`qverify.io.onnx.load_onnx` imports as exactly the integer
    network of :func:`export_qnetwork` (same weights, biases, multipliers, clamps); returns that network.

    Graph: ``x`` (float32 ``[B, *input_shape]``) -> ``QuantizeLinear(s_0, 0)`` (uint8) -> per block
    ``DequantizeLinear`` -> ``Gemm``/``Conv`` with ``DequantizeLinear`` int8 weights (per-axis scales) and an int32
    bias at scale ``s_in * s_w,c`` -> [``Clip`` for ranges narrower than the 8-bit type] -> ``QuantizeLinear``
    (uint8 hidden, int8 output) -> ... -> ``DequantizeLinear`` -> ``y``.

    Scales: ONNX activation scales are powers of two (``2^round(log2 s)``; exactly the model's in the pow2
    scheme) and weight scales ``s_w,c = M_c s_out / s_in``, so every scale is an exact float32 and the importer's
    ``s_in s_w,c / s_out`` is exactly the model's ``M_c``. Requirements: rounding ``half_even`` (ONNX
    ``QuantizeLinear``), weight and activation bits <= 8, input grid ``[0, 255]``. onnxruntime computes in float32
    and may differ from the integer semantics on rare inputs (compare with
    :func:`qverify.io.onnx.onnx_integer_outputs`).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    qc = model.qc
    arch = "resnet" if any(isinstance(b, QAffine) and b.residual for b in model.blocks) else None
    problem = onnx_export_problem(qc, model.input_hi, arch)
    if problem:
        raise QuantError(f"ONNX export: {problem}")
    net = export_qnetwork(model)
    with torch.no_grad():
        params = model.block_params()
    inits: list = []
    nodes: list = []

    def const(name: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def pow2_of(log2: float) -> float:
        return float(2.0 ** round(log2))

    s_in = pow2_of(float(model.in_log2))
    s_in32 = _f32_exact(s_in, "input scale")
    const("s0", np.array(s_in32))
    const("z_u8", np.array(0, dtype=np.uint8))
    const("z_i8", np.array(0, dtype=np.int8))
    nodes.append(helper.make_node("QuantizeLinear", ["x", "s0", "z_u8"], ["q0"], name="quant_input"))
    cur_q, cur_s, cur_z = "q0", "s0", "z_u8"
    for i, (blk, p) in enumerate(zip(model.blocks, params, strict=True)):
        d = f"d{i}"
        nodes.append(helper.make_node("DequantizeLinear", [cur_q, cur_s, cur_z], [d], name=f"dequant{i}"))
        if not isinstance(blk, QAffine):
            nodes.append(helper.make_node("Flatten", [d], [f"f{i}"], name=f"flatten{i}", axis=1))
            # a flatten moves the live integer tensor: re-quantize with the same parameters (a no-op)
            nodes.append(helper.make_node("QuantizeLinear", [f"f{i}", cur_s, cur_z], [f"q{i + 1}"],
                                          name=f"requant_flat{i}"))
            cur_q = f"q{i + 1}"
            continue
        assert p is not None and p.num is not None and p.den is not None
        s_out = pow2_of(float(p.out_log2.detach().reshape(())))
        mult = [Fraction(int(n), int(dd)) for n, dd in zip(np.atleast_1d(p.num).ravel(),
                                                           np.atleast_1d(p.den).ravel(), strict=True)]
        sw = np.array([_f32_exact(float(m * Fraction(s_out) / Fraction(s_in)), f"weight scale of block {i}")
                       for m in mult], dtype=np.float32)
        sb = np.array([_f32_exact(float(Fraction(float(s_in32)) * Fraction(float(v))), f"bias scale of block {i}")
                       for v in sw], dtype=np.float32)
        w = p.weight.detach().numpy().astype(np.int64)
        b = p.bias.detach().numpy().astype(np.int64)
        if np.abs(b).max(initial=0) >= 2**31:
            raise QuantError(f"ONNX export: block {i} bias does not fit int32")
        if w.size and (w.min() < -128 or w.max() > 127):
            raise QuantError(f"ONNX export: block {i} weights do not fit int8 (range [{w.min()}, {w.max()}])")
        per = len(sw) > 1
        sw_t = sw if per else sw.reshape(())
        sb_t = sb if per else sb.reshape(())
        o = w.shape[0]
        const(f"w{i}", w.astype(np.int8))
        const(f"sw{i}", sw_t)
        const(f"zw{i}", np.zeros(o, dtype=np.int8) if per else np.array(0, dtype=np.int8))
        const(f"b{i}", b.astype(np.int32))
        const(f"sb{i}", sb_t)
        const(f"zb{i}", np.zeros(o, dtype=np.int32) if per else np.array(0, dtype=np.int32))
        kw = {"axis": 0} if per else {}
        nodes.append(helper.make_node("DequantizeLinear", [f"w{i}", f"sw{i}", f"zw{i}"], [f"wd{i}"],
                                      name=f"dequant_w{i}", **kw))
        nodes.append(helper.make_node("DequantizeLinear", [f"b{i}", f"sb{i}", f"zb{i}"], [f"bd{i}"],
                                      name=f"dequant_b{i}", **kw))
        if isinstance(blk, QConv2d):
            pad = blk.padding
            nodes.append(helper.make_node("Conv", [d, f"wd{i}", f"bd{i}"], [f"a{i}"], name=f"conv{i}",
                                          strides=[blk.stride, blk.stride], pads=[pad, pad, pad, pad]))
        else:
            nodes.append(helper.make_node("Gemm", [d, f"wd{i}", f"bd{i}"], [f"a{i}"], name=f"gemm{i}", transB=1))
        s_out32 = _f32_exact(s_out, f"activation scale of block {i}")
        const(f"s{i + 1}", np.array(s_out32))
        zname = "z_i8" if blk.last else "z_u8"
        tlo, thi = (-128, 127) if blk.last else (0, 255)
        src = f"a{i}"
        if (blk.lo, blk.hi) != (tlo, thi):
            const(f"cmin{i}", np.array(_f32_exact(blk.lo * s_out, "clip bound", zero=True), dtype=np.float32))
            const(f"cmax{i}", np.array(_f32_exact(blk.hi * s_out, "clip bound"), dtype=np.float32))
            nodes.append(helper.make_node("Clip", [src, f"cmin{i}", f"cmax{i}"], [f"c{i}"], name=f"clip{i}"))
            src = f"c{i}"
        cur_q, cur_s, cur_z = f"q{i + 1}", f"s{i + 1}", zname
        nodes.append(helper.make_node("QuantizeLinear", [src, cur_s, cur_z], [cur_q], name=f"quant{i}"))
        s_in, s_in32 = s_out, s_out32  # the next block's input scale
    nodes.append(helper.make_node("DequantizeLinear", [cur_q, cur_s, cur_z], ["y"], name="dequant_output"))
    graph = helper.make_graph(
        nodes, net.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *model.input_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", model.n_classes])], inits)
    ops = [helper.make_opsetid("", opset)]
    # the oldest IR version that carries the opset, not the installed onnx package's newest: runtimes older
    # than that package still load the file (onnx 1.23 writes IR 14, which onnxruntime 1.30 refuses)
    om = helper.make_model(graph, opset_imports=ops, producer_name="qverify.train",
                           ir_version=helper.find_min_ir_version_for(ops))
    onnx.checker.check_model(om)
    onnx.save(om, str(path))
    return net
