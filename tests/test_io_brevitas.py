"""Brevitas exports (QONNX and QCDQ ONNX) imported exactly and checked against their own runtimes.

* QONNX (``Quant``, ``BipolarQuant``, ``Trunc``): the executor equals QONNX's runtime
  (``qonnx.core.onnx_exec.execute_onnx``) and the Brevitas torch model itself on every integer output, over real
  MNIST test images and seeded random points of the input grid: no divergence on these models (QONNX's float32
  evaluation parts from the exact rationals only within float32 rounding of a rounding tie, which none of these
  points reaches).
* QCDQ (``QuantizeLinear -> Clip -> DequantizeLinear``): onnxruntime computes float graphs; every difference is
  located layer by layer (each layer block run on onnxruntime's own input tensor) and explained: one step at a
  requantization whose exact value lies within ``m / 2 + 2^-12`` of a rounding tie, where ``m / 2`` is the rounding
  of the float bias to accumulator units that the ONNX importer records (``onnx_notes``: a QCDQ graph adds a float
  bias, whose exact value QONNX imports keep and QDQ imports round) and ``2^-12`` covers onnxruntime's float32 sums;
  the exact ties of ``AveragePool`` (``sum / 4 = k + 1/2``) are at distance 0.
* ``verify`` / ``qverify verify`` decide robustness properties; every counterexample replays on the runtime.
* Unsupported or malformed QONNX nodes are errors that name the file, the node and the operator.
"""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("brevitas")
pytest.importorskip("qonnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from qverify.execute import apply_layer, forward  # noqa: E402
from qverify.io.onnx import load_onnx, onnx_integer_outputs, onnx_layer_outputs, ort_may_clip  # noqa: E402
from qverify.io.qonnx import least_reaching, qonnx_integer_outputs, round_mode  # noqa: E402
from qverify.network import Conv2d, Dense, ModelError, Requantize, Step  # noqa: E402
from tests import brevitas_models as bm  # noqa: E402

#: figures of this module's checks (printed at the end with -s)
MEASURED: dict[str, str] = {}

#: name -> (builder, forms, epochs of training)
MODELS = {
    "mlp8-per-channel": (lambda: bm.mlp(8, per_channel=True), ("qonnx", "qcdq"), 0),
    "mlp8-int32-bias": (lambda: bm.mlp(8, int_bias=True), ("qonnx", "qcdq"), 0),
    "cnn8-per-channel": (lambda: bm.cnn(8, per_channel=True), ("qonnx", "qcdq"), 0),
    "mlp4": (lambda: bm.mlp(4), ("qonnx", "qcdq", "qonnx-dynamo", "qcdq-dynamo"), 1),
    "mlp2": (lambda: bm.mlp(2), ("qonnx", "qcdq"), 0),
    "cnn4-maxpool": (lambda: bm.cnn(4), ("qonnx", "qcdq"), 0),
    "cnn2-truncavgpool": (lambda: bm.cnn(2, pool="trunc"), ("qonnx", "qcdq"), 0),
    "binary-mlp": (lambda: bm.binary_mlp(), ("qonnx",), 0),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Every model of :data:`MODELS` built once and exported in each of its forms: ``{(name, form): (path, torch
    model)}``."""
    d = tmp_path_factory.mktemp("brevitas")
    out = {}
    t0 = time.perf_counter()
    for name, (make, forms, epochs) in MODELS.items():
        path, model = bm.build(make, d / f"{name}-{forms[0]}.onnx", forms[0], seed=0, epochs=epochs, n_train=500)
        out[name, forms[0]] = (path, model)
        for form in forms[1:]:
            out[name, form] = (bm.export(model, d / f"{name}-{form}.onnx", form), model)
    MEASURED["build and export"] = f"{len(out)} files in {time.perf_counter() - t0:.1f} s"
    return out


def _data(net, n_img: int = 60, n_rand: int = 40) -> np.ndarray:
    """Integer inputs: real MNIST test images (the pixels: the input grid is ``p`` itself at scale ``1/255``) and
    seeded random points of the grid."""
    x, _ = bm.images(n_img)
    xi = np.clip(np.rint(x.reshape(len(x), -1) * 255), 0, 255).astype(np.int64)
    rng = np.random.default_rng(5)
    return np.concatenate([xi, rng.integers(net.input_lo, net.input_hi + 1, size=(n_rand, net.num_inputs))])


QONNX_CASES = [(k, f) for k, v in MODELS.items() for f in v[1] if f.startswith("qonnx")]
QCDQ_CASES = [(k, f) for k, v in MODELS.items() for f in v[1] if f.startswith("qcdq")]


# ============================================================================================ exact rounding
@pytest.mark.parametrize("mode", ["ROUND", "HALF_EVEN", "FLOOR", "CEIL", "UP", "DOWN", "HALF_UP", "HALF_DOWN"])
def test_rounding_modes_are_qonnx_s(mode):
    """``round_mode`` is qonnx's ``resolve_rounding_mode`` on exactly representable values (quarters, ties
    included), and ``least_reaching`` is the least integer whose rounded value reaches each level."""
    from qonnx.custom_op.general.quant import resolve_rounding_mode

    fn = resolve_rounding_mode(mode)
    ts = [Fraction(k, 4) for k in range(-40, 41)]
    assert [round_mode(t, mode) for t in ts] == [int(fn(np.float64(t))) for t in ts]
    for m, c in ((Fraction(3, 7), Fraction(1, 3)), (Fraction(5, 2), Fraction(-1, 2)), (Fraction(1, 4), Fraction(0))):
        for v in range(-4, 5):
            a = least_reaching(mode, v, m, c)
            assert round_mode(m * a + c, mode) >= v > round_mode(m * (a - 1) + c, mode)


class _Stub:
    """The importer's error helper alone (``QonnxOps.exact_step`` needs nothing else)."""

    def error(self, msg: str) -> ModelError:
        return ModelError(msg)


@pytest.mark.parametrize("mode", ["HALF_EVEN", "FLOOR", "CEIL", "UP", "DOWN", "HALF_UP", "HALF_DOWN"])
def test_exact_step_is_the_rounded_affine_function(mode):
    """The ``Step`` built from the cut points equals ``clamp(R(m_c (a + o_c) + z))`` on every integer ``a`` of a
    range, per channel, for multipliers below and above 1 (levels merged), and for ``Trunc``'s two roundings."""
    from qverify.io.qonnx import QonnxOps

    rng = np.random.default_rng(3)
    a = np.arange(-300, 301, dtype=np.int64)
    for trial in range(6):
        big = trial % 3 == 2
        chans = 1 if big else 3
        mult = [Fraction(int(rng.integers(1, 200)), int(rng.integers(1, 50) if big else rng.integers(200, 900)))
                for _ in range(chans)]
        offs = [Fraction(int(rng.integers(-8, 9)), int(rng.integers(1, 5))) for _ in range(chans)]
        z, lo, hi = int(rng.integers(-3, 4)), -8, 7
        trunc = (4, mode) if trial % 2 else None
        layers = QonnxOps.exact_step(_Stub(), mult, offs, Fraction(z), lo, hi, "HALF_EVEN" if trunc else mode,
                                     chans, "s", trunc=trunc)
        got = np.broadcast_to(a[None, None, :], (1, chans, a.size)).copy()
        for layer in layers:
            got = apply_layer(layer, got)
        got = got[0]
        for c in range(chans):
            ts = [mult[c] * (int(v) + offs[c]) + z for v in a]
            ys = ([round_mode(t, mode) for t in ts] if trunc is None else
                  [round_mode(Fraction(round_mode(t, "HALF_EVEN"), 4), mode) for t in ts])
            assert got[c].tolist() == [min(hi, max(lo, y)) for y in ys], (mode, trial, c)


# ============================================================================================ QONNX
@pytest.mark.parametrize(("name", "form"), QONNX_CASES)
def test_qonnx_export_equals_qonnx_runtime_and_brevitas(built, name, form):
    """The QONNX import equals QONNX's runtime on every integer output (real MNIST images and random grid points)
    and the Brevitas model's own outputs on the images."""
    path, model = built[name, form]
    net = load_onnx(path)
    ops = set(bm.op_types(path))
    assert net.metadata["format"] == "qonnx" and "QONNX" in net.metadata["onnx_form"]
    assert (net.input_lo, net.input_hi) == (0, 255) and net.input_scale == Fraction(float(np.float32(1 / 255)))
    if "BipolarQuant" in ops:
        assert any(isinstance(layer, Step) and layer.levels == (-1, 1) for layer in net.layers)
    if "Trunc" in ops:
        assert "SumPool2d" in [type(layer).__name__ for layer in net.layers]
    x = _data(net)
    t0 = time.perf_counter()
    theirs = qonnx_integer_outputs(net, x)
    t_run = time.perf_counter() - t0
    ours = forward(net, x)
    diff = int(np.count_nonzero(ours != theirs))
    imgs, _ = bm.images(60)
    tq = bm.torch_outputs(model, imgs)
    tq_int = np.rint(tq / float(net.output_scale)).astype(np.int64) + net.output_zero_point
    torch_diff = int(np.count_nonzero(tq_int != ours[:60]))
    MEASURED[f"{form} {name}"] = (f"{diff} of {ours.size} outputs differ from execute_onnx ({t_run:.1f} s for "
                                 f"{len(x)} inputs), {torch_diff} of {tq_int.size} from Brevitas; layers "
                                 f"{[type(layer).__name__ for layer in net.layers]}")
    assert diff == 0
    assert torch_diff == 0


def test_qonnx_float_bias_is_kept_exactly(built):
    """The float bias of a QONNX ``Gemm`` is exact: its fraction of an accumulator unit moves the cut points of the
    ``Step`` after it (the QCDQ import of the same model rounds it, as its note says)."""
    net = load_onnx(built["mlp4", "qonnx"][0])
    assert "float bias exact" in net.metadata["onnx_notes"] and "real bias rounded" not in net.metadata["onnx_notes"]
    assert isinstance(net.layers[2], Step)
    q = load_onnx(built["mlp4", "qcdq"][0])
    assert "real bias rounded" in q.metadata["onnx_notes"]


def test_qonnx_int32_bias_is_an_integer_bias(built):
    """Brevitas ``Int32Bias``: a ``Quant`` of the bias at scale ``s_x s_w`` (up to float32): an integer bias in
    the accumulator, the requantization a plain ``Requantize``."""
    net = load_onnx(built["mlp8-int32-bias", "qonnx"][0])
    assert [type(layer).__name__ for layer in net.layers] == ["Flatten", "Dense", "Requantize", "Dense", "Requantize"]


# ============================================================================================ QCDQ
def _explained(net, x: np.ndarray, optimization: str) -> tuple[int, int]:
    """Layer-local differences between onnxruntime and the executor (each block between two integer tensors of the
    graph run by the executor on onnxruntime's own input tensor). Each must be explained by the float bias that the
    importer rounded to accumulator units (moving the exact pre-rounding value ``t = m_c acc`` by at most
    ``m_c / 2``) and onnxruntime's float32 sums (``2^-12`` of an output step): onnxruntime's value lies in
    ``[y(t - m_c / 2 - 2^-12), y(t + m_c / 2 + 2^-12)]`` with ``y = clamp(R_half_even(.) + z)``. Returns
    (differing, compared)."""
    from qverify.quant import Rounding, round_fraction

    ort_vals = onnx_layer_outputs(net, x, optimization)
    prev = np.asarray(x).reshape(len(x), *net.input_shape)
    start, n_diff, total = 0, 0, 0
    for k in sorted(ort_vals):
        v, acc, rq = prev, None, None
        for layer in net.layers[start:k + 1]:
            if isinstance(layer, Requantize):
                acc, rq = v, layer
            v = apply_layer(layer, v)
        theirs = ort_vals[k].reshape(v.shape)
        d = v - theirs
        total += d.size
        if np.any(d):
            assert rq is not None, f"difference in block {start}..{k} without a requantization"
            for idx in map(tuple, np.argwhere(d)):
                c = idx[1] if len(rq.num) > 1 else 0
                m = Fraction(rq.num[c], rq.den[c])
                t, slack = int(acc[idx]) * m, m / 2 + Fraction(1, 2**12)
                z = int(rq.zero_point[c if rq.zero_point.size > 1 else 0])
                lo, hi = (min(rq.hi, max(rq.lo, round_fraction(t + e, Rounding.HALF_EVEN) + z))
                          for e in (-slack, slack))
                assert lo <= int(theirs[idx]) <= hi, (f"layer {k} {idx}: onnxruntime {int(theirs[idx])}, executor "
                                                      f"{int(v[idx])}, explained range [{lo}, {hi}]")
            n_diff += int(np.count_nonzero(d))
        prev, start = theirs, k + 1
    return n_diff, total


@pytest.mark.parametrize(("name", "form"), QCDQ_CASES)
def test_qcdq_export_against_onnxruntime(built, name, form):
    """The QCDQ import (weights ``Q -> Clip -> DQ`` of float constants folded to integers, ``Clip`` between Q and
    DQ a clamp of the 2/4-bit or narrow range) against onnxruntime: outputs compared on real and random inputs,
    every layer-local difference explained (module docstring)."""
    path, _ = built[name, form]
    net = load_onnx(path)
    assert net.metadata["format"] == "onnx"
    qn = load_onnx(built[name, form.replace("qcdq", "qonnx")][0])
    # the same weights and ranges as the QONNX export of the same model
    dense = [layer for layer in net.layers if isinstance(layer, (Dense, Conv2d))]
    dense_q = [layer for layer in qn.layers if isinstance(layer, (Dense, Conv2d))]
    assert [layer.weight.shape for layer in dense] == [layer.weight.shape for layer in dense_q]
    for a, b in zip(dense, dense_q, strict=True):
        k = max(1, int(np.abs(b.weight).sum()) // max(1, int(np.abs(a.weight).sum())))  # a refined QONNX layer: 2^j
        assert np.array_equal(a.weight * k, b.weight)
    x = _data(net)
    ours, theirs = forward(net, x), onnx_integer_outputs(net, x)
    out_diff = int(np.count_nonzero(ours != theirs))
    exact_diff = int(np.count_nonzero(forward(qn, x) != theirs))
    # where this CPU's fused u8 x s8 kernels clip pairs of products to 16 bits (AVX2 without VNNI) and the model's
    # 8-bit weights can reach that, the fused run ('all') parts by more than the bias rounding: only the unfused
    # float reference path ('none') is explained layer by layer then (the clipping itself: tests/test_divergence.py)
    clips = ort_may_clip(net)
    local = {opt: _explained(net, x[:30], opt) for opt in (("none",) if clips else ("all", "none"))}
    fused = "not explained: u8 x s8 clipping" if clips else f"{local['all'][0]}"
    MEASURED[f"{form} {name}"] = (f"{out_diff} of {ours.size} outputs differ from onnxruntime ({exact_diff} from the "
                                f"exact-bias QONNX import); layer-local (all / none): "
                                f"{fused} / {local['none'][0]} of {local['none'][1]}, all explained")


# ============================================================================================ verification
@pytest.mark.parametrize(("name", "form"), [("mlp4", "qonnx"), ("mlp4", "qcdq"), ("binary-mlp", "qonnx"),
                                            ("cnn4-maxpool", "qonnx")])
def test_verify_decides_and_counterexamples_replay(built, name, form):
    """``verify`` decides robustness of the predicted label at radii 1 and 8 pixels on three MNIST images; a
    counterexample replays on the executor and on the model's runtime (qonnx's or onnxruntime)."""
    from qverify.property import robustness_property
    from qverify.replay import runtime_for
    from qverify.result import Verdict
    from qverify.settings import VerifySettings
    from qverify.verify import verify

    net = load_onnx(built[name, form][0])
    assert runtime_for(net) is not None
    x = _data(net, 3, 0)
    seen = []
    for i, x0 in enumerate(x):
        label = int(np.argmax(forward(net, x0[None])[0]))
        for r in (1, 8):
            res = verify(net, robustness_property(net, x0, label, radius=r), VerifySettings(timeout=15.0))
            seen.append(res.verdict.value)
            assert res.verdict in (Verdict.ROBUST, Verdict.COUNTEREXAMPLE), (i, r, res)
            if res.verdict is Verdict.COUNTEREXAMPLE:
                cx = res.counterexample
                assert cx is not None and cx.confirmed
                if cx.onnx_confirmed is not True:  # reported, and explained: a sign of an exact zero
                    assert "differ from the executor" in cx.note and "float32" in cx.note, cx.note
                    assert _sign_tie(net, np.asarray(cx.x)), cx.note
                    seen[-1] += " (runtime differs: a sign at an exact zero)"
    MEASURED[f"verify {name} {form}"] = ", ".join(seen)


def _sign_tie(net, x: np.ndarray) -> bool:
    """Whether some sign (``Step`` to ``-1, +1`` at cut 0) of ``x``'s execution reads an accumulator of exactly 0:
    the tie of ``BipolarQuant`` (``0 -> +1``), which QONNX's float32 ``Gemm`` may evaluate to a tiny negative
    number (its float32 sum of the cancelling products ``+-fl32(s_x q) fl32(s_w)`` rounds)."""
    from qverify.execute import execute

    vals = execute(net, x.reshape(1, -1))
    return any(isinstance(layer, Step) and layer.levels == (-1, 1) and np.any(vals[net.node_inputs(i)[0]] == 0)
               for i, layer in enumerate(net.layers))


def test_cli_verify_on_qonnx(built, tmp_path):
    """``qverify verify`` on a QONNX model: a verdict in the result file, the divergence check run on QONNX's
    runtime (no differing point)."""
    from qverify.cli import main
    from qverify.io.vnnlib import write_vnnlib
    from qverify.property import robustness_property

    path = built["mlp4", "qonnx"][0]
    net = load_onnx(path)
    x0 = _data(net, 1, 0)[0]
    label = int(np.argmax(forward(net, x0[None])[0]))
    prop = tmp_path / "p.vnnlib"
    write_vnnlib(robustness_property(net, x0, label, radius=2), net, prop)
    rf, js = tmp_path / "r.txt", tmp_path / "r.json"
    main(["verify", str(path), str(prop), "--result-file", str(rf), "--json", str(js), "--divergence-points", "32"])
    first = rf.read_text().splitlines()[0]
    assert first in ("sat", "unsat"), rf.read_text()
    details = json.loads(js.read_text())["details"]
    assert details["divergence"]["differing"] == 0 and details["divergence"]["checked"] > 0, details["divergence"]
    MEASURED["qverify verify (QONNX mlp4, r=2)"] = first


# ============================================================================================ errors
def _edit(src: Path, dst: Path, fn) -> Path:
    m = onnx.load(str(src))
    fn(m)
    onnx.save(m, str(dst))
    return dst


def test_unsupported_qonnx_operator_is_located(built, tmp_path):
    """A QONNX operator qverify does not know (``MultiThreshold``) names the file, the node and the operator."""
    src = built["mlp4", "qonnx"][0]

    def swap(m):
        n = next(n for n in m.graph.node if n.op_type == "Relu")
        n.op_type, n.domain, n.name = "MultiThreshold", "qonnx.custom_op.general", "mt0"

    p = _edit(src, tmp_path / "mt.onnx", swap)
    with pytest.raises(ModelError) as e:
        load_onnx(p)
    msg = str(e.value)
    assert str(p) in msg and "'mt0'" in msg and "MultiThreshold" in msg and "unsupported operator" in msg


def test_bad_rounding_mode_and_bit_width_are_located(built, tmp_path):
    src = built["mlp4", "qonnx"][0]

    def mode(m):
        n = next(n for n in m.graph.node if n.op_type == "Quant")
        n.name = "q_bad"
        for a in n.attribute:
            if a.name == "rounding_mode":
                a.s = b"STOCHASTIC"

    with pytest.raises(ModelError, match=r"mode\.onnx: node 'q_bad' \(Quant \(qonnx.custom_op.general\)\).*"
                                         r"STOCHASTIC"):
        load_onnx(_edit(src, tmp_path / "mode.onnx", mode))

    def bits(m):
        n = [n for n in m.graph.node if n.op_type == "Quant"][1]
        n.name = "q_bits"
        m.graph.initializer.append(numpy_helper.from_array(np.array(4.5, np.float32), "half_bits"))
        n.input[3] = "half_bits"

    with pytest.raises(ModelError, match=r"node 'q_bits'.*bit width must be one integer"):
        load_onnx(_edit(src, tmp_path / "bits.onnx", bits))


def test_bipolar_of_a_float_value_goes_to_the_binarized_importer(built, tmp_path):
    """``BipolarQuant`` after a float operator (here a ``Mul`` by a float constant, as a folded BatchNorm writes it)
    is a float32 threshold: the graph goes to the binarized importer (:mod:`qverify.io.binarized`, float32 bands),
    which imports Brevitas's binarized CNNs (``tests/test_io_binarized.py``) and names what it cannot take here:
    this MLP's multi-bit output ``Quant``."""
    src = built["binary-mlp", "qonnx"][0]

    def mul(m):
        i, n = next((i, n) for i, n in enumerate(m.graph.node) if n.op_type == "BipolarQuant"
                    and not any(t.name == n.input[0] for t in m.graph.initializer))
        m.graph.initializer.append(numpy_helper.from_array(np.array(0.37, np.float32), "bn_scale"))
        m.graph.node.insert(i, helper.make_node("Mul", [n.input[0], "bn_scale"], ["bn_out"], name="bn_mul"))
        n.input[0], n.name = "bn_out", "sign0"

    with pytest.raises(ModelError) as e:
        load_onnx(_edit(src, tmp_path / "bn.onnx", mul))
    msg = str(e.value)
    assert "bn.onnx" in msg and "(Quant)" in msg and "binarized network" in msg


def test_measured_figures(built):
    """Prints the figures of this module (run with ``-s``)."""
    for k, v in MEASURED.items():
        print(f"{k}: {v}")
