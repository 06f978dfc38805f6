"""The runtime divergence check (qverify.divergence): onnxruntime against the executor, where verdicts are made.

The warning must appear exactly where onnxruntime's integer outputs differ from the executor's: that is checked here
against an independent comparison (``onnx_integer_outputs`` vs ``forward`` on the same points), on a model built so
that onnxruntime's float32 requantization differs on every CPU, on its twin where the two agree, and on
``quantize_static``'s per-channel MNIST MLP (the u8 x s8 clipping case, on CPUs that clip).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qverify import divergence  # noqa: E402
from qverify.divergence import annotate, box_points, check_points, check_property, grid_points  # noqa: E402
from qverify.execute import argmax_first, forward  # noqa: E402
from qverify.io.onnx import (  # noqa: E402
    U8S8_CLIP_NOTE,
    load_onnx,
    onnx_integer_outputs,
    ort_may_clip,
    ort_u8s8_saturates,
    u8s8_pair_bounds,
)
from qverify.property import robustness_property  # noqa: E402
from qverify.result import Result, Verdict  # noqa: E402
from qverify.settings import VerifySettings  # noqa: E402
from tests.fixtures import tiny_fixed_point_mlp  # noqa: E402
from tests.onnx_builders import mnist_float_mlp, mnist_grid, near_tie_model, quantize  # noqa: E402

SETTINGS = VerifySettings(timeout=20)


# ---------------------------------------------------------------------------------------------- box points
@pytest.mark.parametrize("n, budget", [(3, 256), (3, 5), (7, 256), (20, 64), (784, 256)])
def test_box_points_center_corners_and_grid(n, budget):
    rng = np.random.default_rng(n)
    lo = rng.integers(-5, 5, size=n)
    hi = lo + rng.integers(0, 4, size=n)
    pts = box_points(lo, hi, budget, seed=1)
    assert pts.dtype == np.int64 and pts.shape[1] == n and 1 <= len(pts) <= budget
    assert np.all(pts >= lo) and np.all(pts <= hi)
    assert len(np.unique(pts, axis=0)) == len(pts)
    assert np.array_equal(pts[0], (lo + hi) // 2)
    corners = [tuple(r) for r in pts if np.all((r == lo) | (r == hi))]
    n_corners = len({tuple(np.where(b, hi, lo)) for b in np.ndindex(*([2] * n))}) if n <= 7 else None
    if n_corners is not None and budget > n_corners:
        assert len(corners) == n_corners  # every corner, then grid points
        assert len(pts) == min(budget, int(np.prod(hi - lo + 1)))
    elif n > 7:
        assert tuple(lo) in corners and tuple(hi) in corners
    assert np.array_equal(pts, box_points(lo, hi, budget, seed=1))  # seeded


def test_box_points_of_a_wide_box_with_few_free_dimensions():
    """An image-sized box (784 inputs) with two free pixels: every one of its 6 points, enumerated over the free
    dimensions only (numpy's meshgrid takes at most 64 arrays), and the single-point box of a radius-0 property."""
    lo = np.arange(784) % 7
    hi = lo.copy()
    hi[[3, 500]] += [1, 2]
    pts = box_points(lo, hi, 64, seed=0)
    assert len(pts) == 6 and len({p.tobytes() for p in pts}) == 6
    assert np.all((pts >= lo) & (pts <= hi))
    assert np.array_equal(box_points(lo, lo, 64), lo[None])


def test_box_points_of_a_single_point_box():
    lo = np.array([4, -2, 7])
    assert np.array_equal(box_points(lo, lo), lo[None])


# ---------------------------------------------------------------------------------------------- near ties
@pytest.fixture(scope="module")
def tie_nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("ties")
    return {t: load_onnx(near_tie_model(d / f"ties_{t}.onnx", ties=t)) for t in (True, False)}


def _independent(net, pts):
    """The comparison the check must reproduce: rows where some integer output differs, and class differences."""
    ours, theirs = forward(net, pts), onnx_integer_outputs(net, pts)
    return int(np.count_nonzero((ours != theirs).any(axis=1))), int(np.count_nonzero(
        argmax_first(ours) != argmax_first(theirs)))


@pytest.mark.parametrize("ties", [True, False])
def test_warning_exactly_where_onnxruntime_differs(tie_nets, ties):
    """A robust verdict on the near-tie model carries the warning and the count; on its twin, where onnxruntime
    agrees on every point, there is no warning."""
    from qverify.verify import verify

    net = tie_nets[ties]
    x0 = np.array([100, 101, 99])
    prop = robustness_property(net, x0, 0, radius=3)
    result = verify(net, prop, SETTINGS)
    assert result.verdict is Verdict.ROBUST
    div = check_property(net, prop)
    pts = box_points(prop.lo, prop.hi)
    assert len(pts) == 7**3 or len(pts) == divergence.DEFAULT_POINTS
    differing, classes = _independent(net, pts)
    assert (div.checked, div.differing, div.classes_differing) == (len(pts), differing, classes)
    annotate(result, div)
    assert result.details["semantics"] == divergence.semantics_of(net)
    assert result.details["divergence"]["differing"] == differing
    if ties and divergence.semantics_of(net) == "exact":
        # odd sums x1 + x2 + x3 = 2k + 1 with k even: the executor rounds k + 1/2 + 2^-26 k up, onnxruntime to k
        assert differing > 0 and classes == 0
        assert div.example is not None
        ex = div.example
        assert ex.executor != ex.runtime and ex.x == [int(v) for v in pts[ex.index]]
        assert ex.executor == forward(net, np.array([ex.x]))[0].tolist()
        assert f"on {differing} of {len(pts)} points of the property's box" in result.details["warning"]
        assert "holds for the executor's function" in result.details["warning"]
        assert not div.cause  # float32 rounding, not the 16-bit clipping: no cause is named
    else:
        assert differing == 0 and "warning" not in result.details
        assert "agrees with the executor" in result.details["divergence"]["message"]


def test_data_and_grid_checks_count_like_the_independent_comparison(tie_nets):
    net = tie_nets[True]
    for where, pts in (("grid", grid_points(net, 300, seed=2)),
                       ("data", np.random.default_rng(3).integers(0, 256, size=(50, 3)))):
        div = check_points(net, pts, where)
        assert (div.differing, div.classes_differing) == _independent(net, pts)
        assert div.checked == len(pts) and div.where == where


def test_not_onnx_gets_the_semantics_only():
    net = tiny_fixed_point_mlp()
    div = check_property(net, robustness_property(net, np.array([1, 2]), 0, radius=1))
    assert div.skipped.startswith("not an ONNX model") and div.checked == 0
    r = annotate(Result(Verdict.ROBUST, "interval", 0.0), div)
    assert r.details == {"semantics": "exact"}


def test_a_moved_onnx_file_is_skipped_with_the_reason(tie_nets, tmp_path):
    from dataclasses import replace

    net = tie_nets[True]
    moved = replace(net, metadata={**net.metadata, "onnx_path": str(tmp_path / "gone.onnx")})
    div = check_points(moved, np.zeros((2, 3), np.int64))
    assert "no longer there" in div.skipped and not div.differs
    r = annotate(Result(Verdict.ROBUST, "interval", 0.0), div)
    assert "warning" not in r.details and "skipped" in r.details["divergence"]["message"]


# ---------------------------------------------------------------------------------------------- quantize_static
@pytest.fixture(scope="module")
def mnist_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist")
    src, calib = mnist_float_mlp(d / "mlp.onnx")
    return {name: quantize(src, d / f"{name}.onnx", calib, fmt, act)
            for name, fmt, act in (("qdq-s8", "QDQ", "QInt8"), ("qop-s8s8", "QOperator", "QInt8"),
                                   ("qop-u8s8", "QOperator", "QUInt8"), ("qdq-u8", "QDQ", "QUInt8"))}


def test_which_layers_run_on_the_u8s8_kernels(mnist_models, monkeypatch):
    """QDQ int8 activations are moved to uint8 by onnxruntime on x86-64 (u8 x s8 kernels), QOperator int8 x int8
    runs on the exact default kernel: only the first kind is flagged, whatever this CPU does."""
    import qverify.io.onnx as qonnx

    nets = {k: load_onnx(p) for k, p in mnist_models.items()}
    bounds = {k: u8s8_pair_bounds(n) for k, n in nets.items()}
    assert bounds["qop-s8s8"] == {}
    for k in ("qdq-s8", "qop-u8s8", "qdq-u8"):
        assert sorted(bounds[k]) == [0, 2]  # both MatMuls; per-channel 8-bit weights reach past 16 bits
        assert max(bounds[k].values()) > 32767
    monkeypatch.setattr(qonnx, "ort_u8s8_saturates", lambda: True)
    assert {k: ort_may_clip(n) for k, n in nets.items()} == {"qdq-s8": True, "qop-s8s8": False, "qop-u8s8": True,
                                                              "qdq-u8": True}
    monkeypatch.setattr(qonnx, "ort_u8s8_saturates", lambda: False)
    assert not any(ort_may_clip(n) for n in nets.values())


@pytest.mark.skipif(not ort_u8s8_saturates(), reason="this CPU's onnxruntime u8 x s8 kernels do not clip (AVX-VNNI, "
                    "AVX512-VNNI or not x86-64): the clipping case cannot be reproduced here; "
                    "test_mnist_mlp_without_clipping checks that no clipping cause is named instead")
def test_mnist_mlp_clipping_is_named_and_a_robust_verdict_warns(mnist_models):
    """quantize_static's per-channel QDQ MLP (int8 activations, 8-bit weights) on a CPU that clips: onnxruntime
    gives other classes to some MNIST images; a robust verdict at radius 0 on one of them carries the warning."""
    from qverify.verify import verify

    net = load_onnx(mnist_models["qdq-s8"])
    x, _ = mnist_grid(net, 200)
    div = check_points(net, x, "data")
    assert div.differing > 0 and div.cause == U8S8_CLIP_NOTE
    assert (div.differing, div.classes_differing) == _independent(net, x)
    ours, theirs = forward(net, x), onnx_integer_outputs(net, x)
    i = int(np.flatnonzero((ours != theirs).any(axis=1))[0])
    prop = robustness_property(net, x[i], int(argmax_first(ours[i:i + 1])[0]), radius=0)
    result = annotate(verify(net, prop, SETTINGS), check_property(net, prop))
    assert result.verdict is Verdict.ROBUST
    assert "1 of 1 points" in result.details["warning"] and U8S8_CLIP_NOTE in result.details["warning"]


@pytest.mark.skipif(ort_u8s8_saturates(), reason="this CPU clips: test_mnist_mlp_clipping_is_named_... applies")
@pytest.mark.parametrize("name", ["qdq-s8", "qop-s8s8", "qop-u8s8"])
def test_mnist_mlp_without_clipping(mnist_models, name):
    """Where the kernels do not clip, no clipping cause is named, and a warning appears iff outputs differ."""
    net = load_onnx(mnist_models[name])
    x, _ = mnist_grid(net, 200)
    div = check_points(net, x, "data")
    assert (div.differing, div.classes_differing) == _independent(net, x)
    assert div.cause == ""
    r = annotate(Result(Verdict.ROBUST, "interval", 0.0), div)
    assert ("warning" in r.details) == (div.differing > 0)


def test_under_onnxruntime_semantics_the_near_ties_agree(tmp_path):
    """Compared under the network's semantics: with onnxruntime's float32 requantization the executor follows
    onnxruntime, the near-ties agree and no warning is given; the semantics is stated in the result."""
    path = near_tie_model(tmp_path / "ties.onnx")
    try:
        net = load_onnx(path, semantics="onnxruntime")
    except TypeError:
        pytest.skip("load_onnx has no semantics choice yet")
    assert divergence.semantics_of(net) == "onnxruntime"
    prop = robustness_property(net, np.array([100, 101, 99]), 0, radius=3)
    div = check_property(net, prop)
    assert div.checked == len(box_points(prop.lo, prop.hi)) and div.differing == 0
    r = annotate(Result(Verdict.ROBUST, "interval", 0.0), div)
    assert r.details["semantics"] == "onnxruntime" and "warning" not in r.details
    assert "(onnxruntime semantics)" in r.details["divergence"]["message"]
