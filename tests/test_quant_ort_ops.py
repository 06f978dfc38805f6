"""Graph ops (Add, AveragePool, GlobalAveragePool, MaxPool, Concat): qverify.quant's emulation of onnxruntime's CPU
arithmetic against onnxruntime itself, bit for bit, on random and near-tie inputs (``encodings/graph_ops.md``).

Every comparison is exact equality of integer outputs. How often the exact ONNX semantics differs from onnxruntime is
measured and printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import numpy as np
import pytest

from qverify.quant import (
    avgpool_counts,
    avgpool_integer_form,
    avgpool_window_sums,
    exact_qlinear_add,
    exact_qlinear_avgpool,
    exact_qlinear_concat,
    exact_qlinear_global_avgpool,
    exact_requantize,
    f32_add_exact,
    f32_thresholds,
    monotone_int_thresholds,
    ort_avgpool_from_sum,
    ort_avgpool_is_global,
    ort_avgpool_sum_is_exact,
    ort_float_add,
    ort_global_avgpool_multiplier,
    ort_qlinear_add,
    ort_qlinear_avgpool,
    ort_qlinear_concat,
    ort_qlinear_global_avgpool,
    ort_requantize,
    pool_output_shape,
    qmaxpool,
)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F32 = np.float32
DTYPES = (np.uint8, np.int8)


def _x86_avx2_fma() -> bool:
    """onnxruntime picks its AVX2/FMA ``QLinearAdd`` kernel (the one ``ort_qlinear_add`` models) on x86-64 CPUs with
    both features; other CPUs run other arithmetic (``encodings/graph_ops.md``)."""
    import platform
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return True  # not Linux: assume a current x86-64 CPU
    flags = set(info.read_text().split())
    return {"avx2", "fma"} <= flags


avx2_kernel = pytest.mark.skipif(not _x86_avx2_fma(), reason="models onnxruntime's x86-64 AVX2/FMA QLinearAdd kernel")


def _ttype(dt) -> int:
    return TensorProto.UINT8 if np.dtype(dt) == np.uint8 else TensorProto.INT8


def _range(dt) -> tuple[int, int]:
    i = np.iinfo(dt)
    return int(i.min), int(i.max)


def _model(nodes, inputs: dict[str, tuple[int, list]], outputs: list[str], inits: dict, opset: int = 17):
    out_type = next(iter(inputs.values()))[0]  # every output here has the element type of the inputs
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, t, s) for k, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(o, out_type, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=ops, ir_version=8)


def _session(model, level=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _optimized_ops(model, tmp_path) -> list[str]:
    """Op types of the graph onnxruntime runs (default level ``ORT_ENABLE_ALL``)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    out = tmp_path / "opt.onnx"
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(out)).graph.node]


def _report(what: str, compared: int, exact_diff: int) -> None:
    print(f"\n[graph-ops] {what}: {compared} outputs equal to onnxruntime; exact ONNX semantics differs on "
          f"{exact_diff}")


def _params(dt, rng, n):
    lo, hi = _range(dt)
    return [int(v) for v in rng.integers(lo, hi + 1, n)]


# --- float helpers ---------------------------------------------------------------------------------------------------

def test_f32_add_exact_is_correctly_rounded():
    from fractions import Fraction

    rng = np.random.default_rng(1)
    p = rng.integers(-255, 256, 4000).astype(np.float64) * np.float64(F32(rng.uniform(1e-6, 4.0)))
    q = rng.uniform(-300, 300, 4000).astype(F32).astype(np.float64)
    got = f32_add_exact(p, q)  # against the exact Fraction sum, nearest float32, ties to the even bit pattern
    for pi, qi, gi in zip(p[:600], q[:600], got[:600], strict=True):
        exact = Fraction(float(pi)) + Fraction(float(qi))
        lo = F32(float(exact))
        cands = [np.nextafter(lo, F32(-np.inf)), lo, np.nextafter(lo, F32(np.inf))]
        best = min(cands, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(np.uint32)) & 1))
        assert gi == best
    # a constructed double-rounding case: 1 + 2^-24 (a float32 midpoint) + 2^-60 must round up
    assert f32_add_exact(np.float64(1 + 2.0**-24), np.float64(2.0**-60)) == np.nextafter(F32(1), F32(2))
    assert f32_add_exact(np.float64(1 + 2.0**-24), np.float64(-(2.0**-60))) == F32(1)
    assert f32_add_exact(np.float64(1 + 2.0**-24), np.float64(0)) == F32(1)  # tie to even


# --- QLinearAdd ------------------------------------------------------------------------------------------------------

def _qlinear_add_model(dt, sA, zA, sB, zB, sC, zC, shape_a, shape_b):
    T = _ttype(dt)
    inits = {"sA": F32(sA), "zA": dt(zA), "sB": F32(sB), "zB": dt(zB), "sC": F32(sC), "zC": dt(zC)}
    node = helper.make_node("QLinearAdd", ["a", "sA", "zA", "b", "sB", "zB", "sC", "zC"], ["c"],
                            domain="com.microsoft")
    return _model([node], {"a": (T, list(shape_a)), "b": (T, list(shape_b))}, ["c"], inits)


def _add_scales(rng):
    """Per-tensor scale triples: near-tie ratios (``sA / sC``, ``sB / sC`` exact small dyadics, so that many
    ``(a, b)`` land on a half), decimal scales, random ones, and ratios far from 1."""
    sC = F32(0.0371)
    out = [(F32(sC * F32(0.5)), F32(sC * F32(0.25)), sC), (F32(sC * F32(1.5)), F32(sC * F32(0.75)), sC),
           (F32(0.02), F32(0.01), F32(0.05)), (F32(0.1), F32(0.3), F32(0.2)), (F32(0.5), F32(0.5), F32(1.0))]
    out += [tuple(F32(v) for v in rng.uniform(0.002, 0.1, 3)) for _ in range(3)]
    out += [(F32(0.004), F32(0.9), F32(0.05)), (F32(3e-4), F32(2e-4), F32(0.9))]
    return out


@avx2_kernel
@pytest.mark.parametrize("dt", DTYPES)
def test_qlinear_add_exhaustive_grid(dt):
    """All 65536 ``(a, b)`` pairs of the type, for 10 scale triples with random zero points."""
    rng = np.random.default_rng(7 if dt == np.uint8 else 8)
    lo, hi = _range(dt)
    A, B = np.meshgrid(np.arange(lo, hi + 1), np.arange(lo, hi + 1), indexing="ij")
    a, b = A.reshape(-1).astype(dt), B.reshape(-1).astype(dt)
    compared = diff = 0
    for sA, sB, sC in _add_scales(rng):
        zA, zB, zC = _params(dt, rng, 3)
        sess = _session(_qlinear_add_model(dt, sA, zA, sB, zB, sC, zC, a.shape, b.shape))
        got = sess.run(None, {"a": a, "b": b})[0].astype(np.int64)
        emu = ort_qlinear_add(a, b, sA, zA, sB, zB, sC, zC, dt)
        bad = np.flatnonzero(emu != got)
        assert bad.size == 0, (sA, sB, sC, zA, zB, zC, a[bad[:5]], b[bad[:5]], emu[bad[:5]], got[bad[:5]])
        ex = exact_qlinear_add(a, b, sA, zA, sB, zB, sC, zC, lo, hi)
        compared += got.size
        diff += int((ex != got).sum())
    _report(f"QLinearAdd {np.dtype(dt).name} (all pairs)", compared, diff)


@avx2_kernel
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("scalar_first", [False, True])
def test_qlinear_add_scalar_broadcast(dt, scalar_first):
    """One input of one element (both orders): every scalar value against every tensor value."""
    rng = np.random.default_rng(11 + scalar_first)
    lo, hi = _range(dt)
    vec = np.arange(lo, hi + 1).astype(dt)
    compared = diff = 0
    for sA, sB, sC in _add_scales(rng)[:6]:
        zA, zB, zC = _params(dt, rng, 3)
        sa, sb = ((1,), vec.shape) if scalar_first else (vec.shape, (1,))
        sess = _session(_qlinear_add_model(dt, sA, zA, sB, zB, sC, zC, sa, sb))
        for s in range(lo, hi + 1, 3):
            sc = np.array([s], dtype=dt)
            a, b = (sc, vec) if scalar_first else (vec, sc)
            got = sess.run(None, {"a": a, "b": b})[0].astype(np.int64)
            emu = ort_qlinear_add(a, b, sA, zA, sB, zB, sC, zC, dt)
            assert np.array_equal(emu, got), (sA, sB, sC, zA, zB, zC, s)
            compared += got.size
            diff += int((exact_qlinear_add(a, b, sA, zA, sB, zB, sC, zC, lo, hi) != got).sum())
    _report(f"QLinearAdd {np.dtype(dt).name} scalar {'first' if scalar_first else 'second'}", compared, diff)


@avx2_kernel
def test_qlinear_add_is_not_a_function_of_one_accumulator():
    """Pairs with the same exact integer accumulator ``mA (a - zA) + mB (b - zB)`` and different onnxruntime outputs
    exist (so no requantization of one integer describes onnxruntime's QLinearAdd), and its output is not monotone
    in that accumulator either, while it is monotone in each input separately (checked against onnxruntime)."""
    from qverify.quant import qlinear_add_integer_form

    dt = np.uint8
    sA, sB, sC = F32(0.35551512241363525), F32(0.04443939030170441), F32(0.059250570833683014)
    zA, zB, zC = 174, 45, 143
    A, B = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    a, b = A.reshape(-1).astype(dt), B.reshape(-1).astype(dt)
    out = ort_qlinear_add(a, b, sA, zA, sB, zB, sC, zC, dt)
    got = _session(_qlinear_add_model(dt, sA, zA, sB, zB, sC, zC, a.shape, b.shape)).run(None, {"a": a, "b": b})[0]
    assert np.array_equal(out, got.astype(np.int64))
    out = out.reshape(256, 256)
    assert (np.diff(out, axis=0) >= 0).all() and (np.diff(out, axis=1) >= 0).all()
    mA, mB, _, _ = qlinear_add_integer_form(sA, sB, sC)
    acc = mA * (A - zA) + mB * (B - zB)
    order = np.argsort(acc, axis=None, kind="stable")
    acc_s, out_s = acc.reshape(-1)[order], out.reshape(-1)[order]
    conflicts = int(((acc_s[1:] == acc_s[:-1]) & (out_s[1:] != out_s[:-1])).sum())
    inversions = int((out_s[1:] < out_s[:-1]).sum())
    print(f"\n[graph-ops] QLinearAdd sA = 8 sB: {conflicts} equal-accumulator pairs with different outputs, "
          f"{inversions} order inversions")
    assert conflicts > 0 and inversions > 0


@avx2_kernel
def test_qlinear_add_fma_contraction_cases():
    """Scales on which the FMA contraction of the fixed part (vector case) and of ``F + b rB`` (scalar case)
    changes onnxruntime's output: the contracted forms are what onnxruntime computes."""
    from qverify.quant import ort_qlinear_add_fixed_part

    dt = np.uint8
    sA, sB, sC, zA, zB, zC = F32(0.09617750346660614), F32(0.05549245327711105), F32(0.008422308601439), 183, 50, 54
    rA, rB, fixed = ort_qlinear_add_fixed_part(sA, zA, sB, zB, sC, zC)
    assert fixed != F32(F32(zC) - F32(F32(rA * F32(zA)) + F32(rB * F32(zB))))  # the uncontracted value differs
    A, B = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    a, b = A.reshape(-1).astype(dt), B.reshape(-1).astype(dt)
    got = _session(_qlinear_add_model(dt, sA, zA, sB, zB, sC, zC, a.shape, b.shape)).run(None, {"a": a, "b": b})[0]
    assert np.array_equal(ort_qlinear_add(a, b, sA, zA, sB, zB, sC, zC, dt), got.astype(np.int64))
    vec = np.arange(256).astype(dt)
    for sA, sB, sC, zA, zB, zC, s in [
            (0.01041092723608017, 0.08480282872915268, 0.03805231302976608, 238, 250, 243, 251),
            (0.01660575531423092, 0.022936243563890457, 0.021915031597018242, 10, 66, 12, 215),
            (0.0400250107049942, 0.09485418349504471, 0.03868234530091286, 17, 225, 167, 226)]:
        sA, sB, sC = F32(sA), F32(sB), F32(sC)
        rA, rB, fixed = ort_qlinear_add_fixed_part(sA, zA, sB, zB, sC, zC)
        assert f32_add_exact(np.float64(s) * np.float64(rB), np.float64(fixed)) != F32(fixed + F32(F32(s) * rB))
        sess = _session(_qlinear_add_model(dt, sA, zA, sB, zB, sC, zC, vec.shape, (1,)))
        got = sess.run(None, {"a": vec, "b": np.array([s], dtype=dt)})[0]
        assert np.array_equal(ort_qlinear_add(vec, np.array([s], dtype=dt), sA, zA, sB, zB, sC, zC, dt),
                              got.astype(np.int64))


@avx2_kernel
@pytest.mark.parametrize("dt", DTYPES)
def test_qdq_add_fusion(dt, tmp_path):
    """``DQ(a), DQ(b) -> Add -> Q``: onnxruntime fuses it into QLinearAdd (CPU, uint8 and int8); the outputs are
    the QLinearAdd emulation at the default level and the float emulation at ``ORT_DISABLE_ALL``."""
    rng = np.random.default_rng(21)
    lo, hi = _range(dt)
    T = _ttype(dt)
    A, B = np.meshgrid(np.arange(lo, hi + 1), np.arange(lo, hi + 1), indexing="ij")
    a, b = A.reshape(-1).astype(dt), B.reshape(-1).astype(dt)
    compared = diff_float = 0
    for sA, sB, sC in _add_scales(rng)[:5]:
        zA, zB, zC = _params(dt, rng, 3)
        inits = {"sA": F32(sA), "zA": dt(zA), "sB": F32(sB), "zB": dt(zB), "sC": F32(sC), "zC": dt(zC)}
        nodes = [helper.make_node("DequantizeLinear", ["a", "sA", "zA"], ["da"]),
                 helper.make_node("DequantizeLinear", ["b", "sB", "zB"], ["db"]),
                 helper.make_node("Add", ["da", "db"], ["s"]),
                 helper.make_node("QuantizeLinear", ["s", "sC", "zC"], ["c"])]
        m = _model(nodes, {"a": (T, [a.size]), "b": (T, [b.size])}, ["c"], inits)
        ops = _optimized_ops(m, tmp_path)
        assert ops == ["QLinearAdd"], ops
        got = _session(m).run(None, {"a": a, "b": b})[0].astype(np.int64)
        assert np.array_equal(got, ort_qlinear_add(a, b, sA, zA, sB, zB, sC, zC, dt))
        got_f = _session(m, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"a": a, "b": b})[0]
        emu_f = ort_float_add(a, b, sA, zA, sB, zB, sC, zC, lo, hi)
        assert np.array_equal(got_f.astype(np.int64), emu_f)
        compared += 2 * got.size
        diff_float += int((emu_f != got).sum())
    print(f"\n[graph-ops] QDQ Add {np.dtype(dt).name}: fused to QLinearAdd; {compared} outputs equal; the unfused "
          f"float path differs from the fused kernel on {diff_float} of {compared // 2}")


# --- AveragePool -----------------------------------------------------------------------------------------------------

POOL_CASES = [  # kernel, strides, pads [top, left, bottom, right]
    ((2, 2), (2, 2), (0, 0, 0, 0)),
    ((2, 2), (1, 1), (1, 1, 1, 1)),
    ((3, 3), (1, 1), (1, 1, 1, 1)),
    ((3, 3), (2, 2), (1, 0, 1, 2)),
    ((3, 2), (2, 1), (2, 1, 0, 1)),
    ((1, 3), (1, 2), (0, 2, 0, 1)),
]


def _avgpool_model(dt, sx, zx, sy, zy, shape, kernel, strides, pads, cip, qdq=False):
    T = _ttype(dt)
    inits = {"sx": F32(sx), "zx": dt(zx), "sy": F32(sy), "zy": dt(zy)}
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads), count_include_pad=int(cip))
    if qdq:
        nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["dx"]),
                 helper.make_node("AveragePool", ["dx"], ["p"], **attrs),
                 helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"])]
    else:
        nodes = [helper.make_node("QLinearAveragePool", ["x", "sx", "zx", "sy", "zy"], ["y"],
                                  domain="com.microsoft", **attrs)]
    return _model(nodes, {"x": (T, list(shape))}, ["y"], inits)


def _pool_scales(rng):
    """``(sx, sy)``: equal scales (the average ``S / count`` is a half for many windows: ties), decimal, random."""
    return [(F32(0.05), F32(0.05)), (F32(0.02), F32(0.05)), (F32(0.1), F32(0.3)), (F32(2.0**-5), F32(2.0**-4)),
            tuple(F32(v) for v in rng.uniform(0.005, 0.1, 2))]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("cip", [False, True])
def test_qlinear_avgpool(dt, cip):
    rng = np.random.default_rng(31 + cip + 2 * (dt == np.int8))
    lo, hi = _range(dt)
    shape = (2, 3, 7, 8)
    compared = diff = 0
    for kernel, strides, pads in POOL_CASES:
        for sx, sy in _pool_scales(rng):
            zx, zy = _params(dt, rng, 2)
            x = rng.integers(lo, hi + 1, shape).astype(dt)
            x[0, 0] = zx + np.arange(shape[3]) % 3 - 1  # small deviations from zx: sums S near count / 2
            x[0, 0] = np.clip(x[0, 0], lo, hi)
            got = _session(_avgpool_model(dt, sx, zx, sy, zy, shape, kernel, strides, pads, cip)).run(
                None, {"x": x})[0].astype(np.int64)
            emu = ort_qlinear_avgpool(x, sx, zx, sy, zy, kernel, strides, pads, cip, dt)
            assert emu.shape == got.shape
            assert np.array_equal(emu, got), (kernel, strides, pads, sx, sy, zx, zy)
            compared += got.size
            diff += int((exact_qlinear_avgpool(x, sx, zx, sy, zy, kernel, strides, pads, cip, dt) != got).sum())
    _report(f"QLinearAveragePool {np.dtype(dt).name} count_include_pad={int(cip)}", compared, diff)


@pytest.mark.parametrize("dt", DTYPES)
def test_qlinear_avgpool_global_fallback(dt):
    """kernel = spatial shape, pads 0: onnxruntime switches to the integer global-average-pool path."""
    rng = np.random.default_rng(41)
    lo, hi = _range(dt)
    shape = (2, 4, 4, 5)
    assert ort_avgpool_is_global(shape[2:], (4, 5), (0, 0, 0, 0))
    compared = 0
    for sx, sy in _pool_scales(rng):
        zx, zy = _params(dt, rng, 2)
        x = rng.integers(lo, hi + 1, shape).astype(dt)
        for cip in (False, True):
            got = _session(_avgpool_model(dt, sx, zx, sy, zy, shape, (4, 5), (1, 1), (0, 0, 0, 0), cip)).run(
                None, {"x": x})[0].astype(np.int64)
            assert np.array_equal(ort_qlinear_avgpool(x, sx, zx, sy, zy, (4, 5), (1, 1), (0, 0, 0, 0), cip, dt), got)
            compared += got.size
    _report(f"QLinearAveragePool {np.dtype(dt).name} global fallback", compared, 0)


def test_avgpool_integer_form_and_sum_function():
    """The lcm rescaling gives the exact semantics; where the float32 window sum is exact, onnxruntime's output is
    a monotone function of the one integer ``S`` with bisection cut points."""
    counts = avgpool_counts((7, 8), (3, 3), (2, 2), (1, 0, 1, 2), False)
    L, w = avgpool_integer_form(counts)
    assert set(np.unique(counts).tolist()) <= {2, 3, 4, 6, 9} and L == 36 and (w * counts == L).all()
    assert pool_output_shape((7, 8), (3, 3), (2, 2), (1, 0, 1, 2)) == counts.shape
    rng = np.random.default_rng(5)
    lo, hi = 0, 255
    checked = 0
    for sx, sy in [(F32(3 * 2.0**-7), F32(0.05)), (F32(2.0**-5), F32(2.0**-4)), (F32(0.05), F32(0.05)),
                   (F32(0.02), F32(0.05))]:
        x = rng.integers(0, 256, (2, 3, 7, 8)).astype(np.uint8)
        zx, zy = 128, 3
        kernel, strides, pads = (3, 3), (2, 2), (1, 0, 1, 2)
        cnt = avgpool_counts((7, 8), kernel, strides, pads, False)
        if not ort_avgpool_sum_is_exact(sx, 128, int(cnt.max())):
            continue
        S = avgpool_window_sums(x, zx, kernel, strides, pads)
        via_sum = ort_avgpool_from_sum(S, cnt, sx, sy, zy, lo, hi)
        got = _session(_avgpool_model(np.uint8, sx, zx, sy, zy, x.shape, kernel, strides, pads, False)).run(
            None, {"x": x})[0]
        assert np.array_equal(via_sum, got.astype(np.int64))
        checked += 1
        for c in np.unique(cnt):
            def f(s, c=int(c), sx=sx, sy=sy, zy=zy):
                return ort_avgpool_from_sum(s, c, sx, sy, zy, lo, hi)

            cuts = monotone_int_thresholds(f, np.arange(lo + 1, hi + 1), -9 * 128, 9 * 128)
            grid = np.arange(-9 * 128, 9 * 128 + 1)
            vals = f(grid)
            assert (np.diff(vals) >= 0).all()
            for t, cut in zip(range(lo + 1, hi + 1), cuts, strict=True):
                assert ((vals >= t) == (grid >= cut)).all()
    assert checked == 2
    assert ort_avgpool_sum_is_exact(F32(2.0**-7), 255, 9)
    assert not ort_avgpool_sum_is_exact(F32(0.1), 255, 9)


# --- GlobalAveragePool -----------------------------------------------------------------------------------------------

def _gap_model(dt, sx, zx, sy, zy, shape, qdq=False, channels_last=0):
    T = _ttype(dt)
    inits = {"sx": F32(sx), "zx": dt(zx), "sy": F32(sy), "zy": dt(zy)}
    if qdq:
        nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["dx"]),
                 helper.make_node("GlobalAveragePool", ["dx"], ["p"]),
                 helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"])]
    else:
        nodes = [helper.make_node("QLinearGlobalAveragePool", ["x", "sx", "zx", "sy", "zy"], ["y"],
                                  domain="com.microsoft", channels_last=channels_last)]
    return _model(nodes, {"x": (T, list(shape))}, ["y"], inits)


@pytest.mark.parametrize("dt", DTYPES)
def test_qlinear_global_avgpool(dt):
    rng = np.random.default_rng(51)
    lo, hi = _range(dt)
    compared = diff = 0
    for shape in [(2, 4, 4, 4), (3, 5, 5, 7), (1, 16, 2, 2)]:
        for sx, sy in _pool_scales(rng):
            zx, zy = _params(dt, rng, 2)
            x = rng.integers(lo, hi + 1, (64,) + shape[1:]).astype(dt)
            x[:8] = np.clip(zx + rng.integers(-2, 3, (8,) + shape[1:]), lo, hi)  # small sums: ties of S / n
            got = _session(_gap_model(dt, sx, zx, sy, zy, x.shape)).run(None, {"x": x})[0].astype(np.int64)
            emu = ort_qlinear_global_avgpool(x, sx, zx, sy, zy, dt)
            assert np.array_equal(emu, got), (shape, sx, sy, zx, zy)
            # channels_last (NHWC) variant: the same integer sums
            xt = np.ascontiguousarray(np.moveaxis(x, 1, -1))
            got_l = _session(_gap_model(dt, sx, zx, sy, zy, xt.shape, channels_last=1)).run(None, {"x": xt})[0]
            assert np.array_equal(np.moveaxis(got_l, -1, 1).astype(np.int64), emu)
            compared += 2 * got.size
            diff += 2 * int((exact_qlinear_global_avgpool(x, sx, zx, sy, zy, dt) != got).sum())
    _report(f"QLinearGlobalAveragePool {np.dtype(dt).name}", compared, diff)


def test_global_avgpool_cut_points():
    """onnxruntime's global average pool is ``f32_round(acc, m) + zy`` of the one integer ``acc = Σ (x - zx)``:
    ``y >= t`` exactly when ``acc >= f32_thresholds(t - zy, m)`` (checked against onnxruntime on every sum of 4
    int8 cells around the ties of ``S / 4``)."""
    sx, sy, zx, zy = F32(0.05), F32(0.05), 3, -7
    m = ort_global_avgpool_multiplier(sx, sy, 4)
    assert m == F32(0.25)
    acc = np.arange(-4 * 128, 4 * 128)
    base = np.clip(zx + acc[:, None] // 4 + (np.arange(4)[None, :] < acc[:, None] % 4), -128, 127)
    x = base.astype(np.int8).reshape(-1, 1, 2, 2)
    acc = (x.astype(np.int64) - zx).reshape(x.shape[0], -1).sum(axis=1)
    got = _session(_gap_model(np.int8, sx, zx, sy, zy, x.shape)).run(None, {"x": x})[0].reshape(-1).astype(np.int64)
    assert np.array_equal(ort_qlinear_global_avgpool(x, sx, zx, sy, zy, np.int8).reshape(-1), got)
    cuts = f32_thresholds(np.arange(-127, 128) - zy, m)
    for t, c in zip(range(-127, 128), cuts, strict=True):
        assert np.array_equal(got >= t, acc >= c)
    with pytest.raises(ValueError):
        ort_global_avgpool_multiplier(F32(1.0), F32(1e-3), 1)


@avx2_kernel
def test_zero_point_added_before_rounding():
    """QLinearAdd and QLinearAveragePool add the output zero point in float before rounding half to even; where
    the float arithmetic is exact (dyadic scale ratios) onnxruntime computes ``rne(v + zC)`` while the ONNX
    (QuantizeLinear) order is ``rne(v) + zC``: they part exactly at the ties when ``zC`` is odd."""
    from qverify.quant import qlinear_add_integer_form, round_div

    dt, lo, hi = np.uint8, 0, 255
    sC = F32(0.0371)
    sA, sB = F32(sC * F32(0.5)), F32(sC * F32(0.25))
    A, B = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    a, b = A.reshape(-1).astype(dt), B.reshape(-1).astype(dt)
    mA, mB, num, den = qlinear_add_integer_form(sA, sB, sC)
    for zC in (100, 101):
        zA, zB = 7, 200
        got = _session(_qlinear_add_model(dt, sA, zA, sB, zB, sC, zC, a.shape, b.shape)).run(
            None, {"a": a, "b": b})[0].astype(np.int64)
        acc = mA * (a.astype(np.int64) - zA) + mB * (b.astype(np.int64) - zB)
        after = np.clip(round_div(acc * num + zC * den, np.int64(den), "half_even"), lo, hi)
        assert np.array_equal(got, after)
        n_diff = int((exact_qlinear_add(a, b, sA, zA, sB, zB, sC, zC, lo, hi) != got).sum())
        assert (n_diff == 0) == (zC % 2 == 0)
        print(f"\n[graph-ops] QLinearAdd exact-tie scales, zC = {zC}: exact semantics differs on {n_diff} of 65536")


# --- Concat ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", DTYPES)
def test_qlinear_concat(dt, tmp_path):
    """Three inputs, every 8-bit value each, new output parameters (near-tie ratios ``sx / sy = 1/2, 3/2``,
    decimal and random) and one input with the output's own parameters (a copy); QOperator and QDQ forms."""
    rng = np.random.default_rng(61)
    lo, hi = _range(dt)
    T = _ttype(dt)
    vals = np.arange(lo, hi + 1).astype(dt).reshape(1, -1)
    compared = diff = 0
    for trial in range(6):
        sy = F32([0.04, 0.05, 0.013, 0.2, 0.07, 0.9][trial])
        zy = _params(dt, rng, 1)[0]
        ss = [F32(sy * F32(0.5)), F32(sy * F32(1.5)), sy] if trial < 2 else [F32(v) for v in rng.uniform(0.002, 0.2, 3)]
        zs = _params(dt, rng, 3)
        if trial % 2 == 0:
            ss[2], zs[2] = sy, zy  # identical parameters: onnxruntime copies
        inits = {"sy": sy, "zy": dt(zy)}
        for i in range(3):
            inits[f"s{i}"], inits[f"z{i}"] = ss[i], dt(zs[i])
        tuples = [v for i in range(3) for v in (f"x{i}", f"s{i}", f"z{i}")]
        node = helper.make_node("QLinearConcat", ["sy", "zy"] + tuples, ["y"], domain="com.microsoft", axis=0)
        ins = {f"x{i}": (T, [1, vals.shape[1]]) for i in range(3)}
        m = _model([node], ins, ["y"], inits)
        qdq_nodes = [helper.make_node("DequantizeLinear", [f"x{i}", f"s{i}", f"z{i}"], [f"d{i}"]) for i in range(3)]
        qdq_nodes += [helper.make_node("Concat", ["d0", "d1", "d2"], ["c"], axis=0),
                      helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["y"])]
        mq = _model(qdq_nodes, ins, ["y"], inits)
        assert _optimized_ops(mq, tmp_path) == ["QLinearConcat"]
        feeds = {f"x{i}": vals for i in range(3)}
        inputs = [(vals, ss[i], zs[i]) for i in range(3)]
        emu = ort_qlinear_concat(inputs, sy, zy, 0, dt)
        for model in (m, mq):
            got = _session(model).run(None, feeds)[0].astype(np.int64)
            assert np.array_equal(emu, got), (trial, ss, zs, sy, zy)
            compared += got.size
            diff += int((exact_qlinear_concat(inputs, sy, zy, 0, dt) != got).sum())
    _report(f"QLinearConcat {np.dtype(dt).name} (QOperator + QDQ)", compared, diff)


# --- MaxPool ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", DTYPES)
def test_maxpool_int8(dt):
    """Opset-12 ``MaxPool`` on 8-bit tensors is the exact integer maximum (padding never wins)."""
    rng = np.random.default_rng(71)
    lo, hi = _range(dt)
    T = _ttype(dt)
    compared = 0
    for kernel, strides, pads in POOL_CASES:
        x = rng.integers(lo, hi + 1, (2, 3, 7, 8)).astype(dt)
        x[0, 0] = lo  # all-minimum image: a padded cell must not win
        node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                                pads=list(pads))
        got = _session(_model([node], {"x": (T, list(x.shape))}, ["y"], {}, opset=12)).run(None, {"x": x})[0]
        assert np.array_equal(qmaxpool(x, kernel, strides, pads), got.astype(np.int64))
        compared += got.size
    _report(f"MaxPool {np.dtype(dt).name}", compared, 0)


# --- QDQ groups around pooling / shape ops: what onnxruntime makes of them --------------------------------------------

@pytest.mark.parametrize("dt", DTYPES)
def test_qdq_pool_and_shape_groups(dt, tmp_path):
    rng = np.random.default_rng(81)
    lo, hi = _range(dt)
    T = _ttype(dt)
    shape = (2, 3, 6, 6)
    x = rng.integers(lo, hi + 1, shape).astype(dt)
    sx, zx = F32(0.037), _params(dt, rng, 1)[0]
    sy, zy = F32(0.021), _params(dt, rng, 1)[0]
    seen = {}

    def run(nodes, inits, name):
        m = _model(nodes, {"x": (T, list(shape))}, ["y"], inits)
        seen[name] = _optimized_ops(m, tmp_path)
        return _session(m).run(None, {"x": x})[0].astype(np.int64)

    dq = helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["dx"])
    same = {"sx": sx, "zx": dt(zx), "sy": sx, "zy": dt(zx)}
    new = {"sx": sx, "zx": dt(zx), "sy": sy, "zy": dt(zy)}
    q = helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"])
    k, s, p = (3, 3), (2, 2), (1, 1, 1, 1)
    mp = helper.make_node("MaxPool", ["dx"], ["p"], kernel_shape=list(k), strides=list(s), pads=list(p))
    got = run([dq, mp, q], same, "DQ-MaxPool-Q same")
    assert np.array_equal(got, qmaxpool(x, k, s, p))
    got = run([dq, mp, q], new, "DQ-MaxPool-Q new")
    assert np.array_equal(got, ort_requantize(qmaxpool(x, k, s, p), sx, zx, sy, zy, lo, hi))
    exact_diff_mp = int((exact_requantize(qmaxpool(x, k, s, p), sx, zx, sy, zy, lo, hi) != got).sum())
    rs = helper.make_node("Reshape", ["dx", "shape"], ["p"])
    for name, inits in (("DQ-Reshape-Q same", same), ("DQ-Reshape-Q new", new)):
        got = run([dq, rs, q], dict(inits, shape=np.array([2, -1], dtype=np.int64)), name)
        want = x.reshape(2, -1).astype(np.int64)
        if inits is new:
            want = ort_requantize(want, sx, zx, sy, zy, lo, hi)
        assert np.array_equal(got, want)
    tr = helper.make_node("Transpose", ["dx"], ["p"], perm=[0, 2, 3, 1])
    got = run([dq, tr, q], same, "DQ-Transpose-Q same")
    assert np.array_equal(got, np.transpose(x, (0, 2, 3, 1)).astype(np.int64))
    ap = helper.make_node("AveragePool", ["dx"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                          count_include_pad=0)
    got = run([dq, ap, q], new, "DQ-AveragePool-Q")
    assert np.array_equal(got, ort_qlinear_avgpool(x, sx, zx, sy, zy, (3, 3), (2, 2), (1, 1, 1, 1), False, dt))
    gap = helper.make_node("GlobalAveragePool", ["dx"], ["p"])
    got = run([dq, gap, q], new, "DQ-GlobalAveragePool-Q")
    assert np.array_equal(got, ort_qlinear_global_avgpool(x, sx, zx, sy, zy, dt))
    print(f"\n[graph-ops] onnxruntime graphs ({np.dtype(dt).name}): "
          + "; ".join(f"{k}: {' '.join(v)}" for k, v in seen.items())
          + f"; DQ-MaxPool-Q new: exact semantics differs on {exact_diff_mp} of {qmaxpool(x, k, s, p).size}")
    assert seen["DQ-MaxPool-Q same"][-1] != "QuantizeLinear"
    assert "QLinearAveragePool" in seen["DQ-AveragePool-Q"]
    assert "QLinearGlobalAveragePool" in seen["DQ-GlobalAveragePool-Q"]
