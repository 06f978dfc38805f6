"""Randomized smoothing of the integer network (qverify.smooth): statistics against hand values, CERTIFY against a
linear classifier whose smoothed probabilities are known in closed form (input quantizer included), the exact input
quantizer, reproducible counts (batch size, torch view, CUDA), the durable results file, and incremental smoothing
against the exact probabilities of the variant."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, norm

from qverify.network import Dense, QNetwork
from qverify.quant import Rounding, round_fraction
from qverify.smooth import (
    ABSTAIN,
    Engine,
    InputQuantizer,
    Sampler,
    certified_radius,
    certify_sample,
    clopper_pearson_lower,
    clopper_pearson_upper,
    incremental_bound,
    predict_from_counts,
    read_smooth_results,
    sample_classes,
    smooth,
    summarize_smoothing,
)
from tests.fixtures import CUDA, random_dense_network

# ------------------------------------------------------------------------------------------------ statistics


def test_clopper_pearson_hand_values() -> None:
    a = 0.001
    assert clopper_pearson_lower(100, 100, a) == pytest.approx(a ** (1 / 100), rel=1e-12)
    assert clopper_pearson_lower(0, 100, a) == 0.0
    assert clopper_pearson_lower(1, 1, 0.05) == pytest.approx(0.05, rel=1e-12)
    # n = 2, k = 1: P(Bin(2, p) >= 1) = 1 - (1 - p)^2 = alpha
    assert clopper_pearson_lower(1, 2, 0.1) == pytest.approx(1 - math.sqrt(0.9), rel=1e-12)
    # upper: P(Bin(2, p) <= 1) = 1 - p^2 = alpha;  k = 0: (1 - p)^n = alpha
    assert clopper_pearson_upper(1, 2, 0.1) == pytest.approx(math.sqrt(0.9), rel=1e-12)
    assert clopper_pearson_upper(0, 50, 0.01) == pytest.approx(1 - 0.01 ** (1 / 50), rel=1e-12)
    assert clopper_pearson_upper(50, 50, 0.01) == 1.0
    with pytest.raises(ValueError):
        clopper_pearson_lower(3, 2, 0.1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2000), st.data(), st.sampled_from([0.001, 0.01, 0.05, 0.3]))
def test_clopper_pearson_is_the_tail_root(n: int, data: st.DataObject, alpha: float) -> None:
    """The lower bound p solves P(Bin(n, p) >= k) = alpha, the upper bound P(Bin(n, p) <= k) = alpha."""
    k = data.draw(st.integers(0, n))
    lo, hi = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    assert 0 <= lo <= k / n <= hi <= 1
    if k > 0:
        assert binom.sf(k - 1, n, lo) == pytest.approx(alpha, rel=1e-6, abs=1e-12)
    if k < n:
        assert binom.cdf(k, n, hi) == pytest.approx(alpha, rel=1e-6, abs=1e-12)


def test_radius_hand_values() -> None:
    assert certified_radius(norm.cdf(1.0), 0.25) == pytest.approx(0.25, rel=1e-12)
    assert certified_radius(0.975, 0.5) == pytest.approx(0.5 * 1.959963984540054, rel=1e-12)
    assert certified_radius(0.5, 1.0) is None
    assert certified_radius(0.2, 1.0) is None
    zeta, p, r = incremental_bound(0.99, 0, 100, 0.01, 1.0)
    assert zeta == pytest.approx(1 - 0.01 ** 0.01, rel=1e-12)
    assert p == pytest.approx(0.99 - zeta)
    assert r == pytest.approx(norm.ppf(0.99 - zeta), rel=1e-12)
    assert incremental_bound(0.6, 10, 100, 0.01, 1.0)[2] is None


def test_predict_from_counts() -> None:
    assert predict_from_counts(np.array([0, 90, 10]), 0.001) == 1
    assert predict_from_counts(np.array([50, 50, 0]), 0.001) == ABSTAIN
    assert predict_from_counts(np.array([55, 45]), 0.001) == ABSTAIN  # p-value 0.37


# ------------------------------------------------------------------------------------------------ the quantizer
@settings(max_examples=80, deadline=None)
@given(st.sampled_from([Fraction(1, 256), Fraction(1, 3), Fraction(3, 7), Fraction(2)]),
       st.sampled_from(list(Rounding)), st.integers(-3, 3), st.data())
def test_quantizer_is_exact(scale: Fraction, mode: Rounding, zp: int, data: st.DataObject) -> None:
    """``Q(r0 + eps)`` against exact rational rounding, on random noise and on noise placed at (and one float
    step beside) the rounding boundaries."""
    net = QNetwork((4,), -5, 20, (Dense(np.eye(2, 4, dtype=np.int64), [0, 0]),), input_scale=scale,
                   input_zero_point=zp, input_rounding=mode)
    q = InputQuantizer.of(net)
    r0x = [Fraction(data.draw(st.integers(-20, 60)), data.draw(st.sampled_from([1, 2, 3]))) for _ in range(4)]
    r0 = np.array([float(f) for f in r0x])
    rows = []
    for _ in range(6):
        row = []
        for j in range(4):
            kind = data.draw(st.sampled_from(["random", "boundary", "below", "above"]))
            if kind == "random":
                row.append(data.draw(st.floats(-30, 30, allow_nan=False)))
                continue
            m = data.draw(st.integers(-10, 30))
            b = Fraction(m) + (Fraction(1, 2) if mode != Rounding.FLOOR else 0)  # a boundary in grid units
            e = float((b - r0x[j]) * scale)
            row.append(e if kind == "boundary" else float(np.nextafter(e, -np.inf if kind == "below" else np.inf)))
        rows.append(row)
    eps = np.array(rows)
    got = q(r0, r0x, eps)
    want = [[min(max(round_fraction(r0x[j] + Fraction(float(eps[b, j])) / scale, mode), -5), 20) for j in range(4)]
            for b in range(len(rows))]
    assert got.tolist() == want


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-3, 3, width=32, allow_nan=False), min_size=4, max_size=4),
       st.sampled_from([Fraction(1, 100), Fraction(0.0078125), Fraction(3, 70)]), st.integers(-2, 2))
def test_float32_quantizer_is_onnxruntimes(vs: list[float], scale: Fraction, zp: int) -> None:
    """Under onnxruntime semantics ``Q`` is ``rne(fl32(fl32(v) / fl32(s))) + z`` (as :mod:`qverify.property` maps
    float32 box ends); float32 inputs ``v`` are taken as they are."""
    from qverify.property import _f32_quantize

    net = QNetwork((4,), -128, 127, (Dense(np.eye(2, 4, dtype=np.int64), [0, 0]),), input_scale=scale,
                   input_zero_point=zp, input_rounding=Rounding.HALF_EVEN, metadata={"semantics": "onnxruntime"})
    q = InputQuantizer.of(net)
    assert q.float32 and "onnxruntime" in q.describe()
    got = q(np.full(4, float(zp)), None, np.array([vs]))[0]
    want = [min(max(_f32_quantize(Fraction(v), scale, up=True) + zp, -128), 127) for v in vs]
    assert got.tolist() == want


def test_preprocessed_centers_are_exact_and_smoothing_runs_on_them(tmp_path) -> None:  # noqa: ANN001
    """With ``--preprocess scale=1/255`` on a quantizing-input model (``x = rne(v * 64)``), the centers are the exact
    preprocessed values in grid units, and a tiny sigma gives the executor's prediction of the mapped sample."""
    from qverify.execute import predict
    from qverify.preprocess import Preprocess
    from qverify.property import pixels_to_grid
    from qverify.smooth import centers

    net = QNetwork((3,), 0, 63, (Dense([[0, 0, 0], W4], [0, B4]),), input_scale=SCALE,
                   input_rounding=Rounding.HALF_EVEN)
    pre = Preprocess.parse("scale=1/255")
    images = np.array([[160, 80, 120], [120, 120, 88], [40, 200, 20]])
    r0, exact = centers(net, images, pre)
    assert exact is not None and exact[0][0] == Fraction(160, 255) * 64
    assert np.allclose(r0, images * 64 / 255)
    res = smooth(net, images, np.array([1, 1, 0]), 1e-6, results_path=tmp_path / "p.jsonl", n0=10, n=200,
                 alpha=0.01, preprocess=pre, progress=False)
    want = predict(net, pixels_to_grid(net, images, pre))
    assert [r["prediction"] for r in res.records] == want.tolist()
    assert all(r["count"] == 200 for r in res.records)
    assert res.header["preprocess"] == pre.spec() and "input quantizer" in res.header["quantizer"]


def test_native_input_quantizer_is_nearest_grid_point() -> None:
    net = QNetwork((2,), 0, 255, (Dense([[1, 0]], [0]),), input_scale=Fraction(1, 256))
    q = InputQuantizer.of(net)
    assert "nearest grid point" in q.describe()
    x = q(np.array([10.0, 250.0]), None, np.array([[0.4 / 256, 10 / 256], [-0.6 / 256, -300 / 256]]))
    assert x.tolist() == [[10, 255], [9, 0]]


# ------------------------------------------------------------------------------------------------ closed form
SCALE = Fraction(1, 64)
GRID = (0, 63)


def linear_net(w: list[int], b: int) -> QNetwork:
    """Two classes on a native integer input grid 0..63 (real v = x / 64): class 1 iff ``w . x + b > 0`` (a tie
    goes to class 0, the first maximal index)."""
    return QNetwork((len(w),), *GRID, (Dense([[0] * len(w), w], [0, b], name="linear"),), input_scale=SCALE,
                    name="linear")


def cell_pmf(v0: float, sigma: float) -> np.ndarray:
    """``P(Q(v0 + eps) = k)`` for ``k`` in the grid: the quantizer's cell ``[s(k - 1/2), s(k + 1/2))`` under
    ``N(v0, sigma^2)``, the end cells taking the saturated tails."""
    s = float(SCALE)
    edges = np.array([s * (k + 0.5) for k in range(GRID[0], GRID[1])])
    cdf = norm.cdf((edges - v0) / sigma)
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def p_class1(w: list[int], b: int, v0: np.ndarray, sigma: float) -> float:
    """Exactly (to float rounding) ``P(w . Q(v0 + eps) + b > 0)``: the distribution of ``w . x`` is the
    convolution of the coordinates' cell distributions (each ``x_i`` independent)."""
    lo = 0
    pmf = np.array([1.0])
    for wi, vi in zip(w, v0, strict=True):
        cells = cell_pmf(float(vi), sigma)
        term = np.zeros(abs(wi) * (GRID[1] - GRID[0]) + 1)
        idx = np.arange(GRID[0], GRID[1] + 1) * abs(wi)
        term[idx - idx.min()] = cells
        if wi < 0:
            term = term[::-1]
        lo += min(0, wi * GRID[1])
        pmf = np.convolve(pmf, term)
    values = lo + np.arange(len(pmf))
    return float(pmf[values + b > 0].sum())


def test_closed_form_is_the_normal_cdf_of_the_margin_on_a_fine_grid() -> None:
    """Away from the grid's ends the quantizer only adds the variance of a rounding: the closed form is close to
    ``Phi((w . v0 + b s) / (sigma ||w||))``, the textbook value without the quantizer."""
    w, b, sigma = [2, -1, 3], -60, 0.1
    v0 = np.array([30, 20, 25]) * float(SCALE)
    margin = (np.dot(w, v0) + b * float(SCALE)) / (sigma * np.linalg.norm(w))
    assert p_class1(w, b, v0, sigma) == pytest.approx(norm.cdf(margin), abs=0.02)


def _sampler(net: QNetwork, x0: list[float], sigma: float, seed: int, r0x: list[Fraction] | None = None) -> Sampler:
    return Sampler(InputQuantizer.of(net), np.array(x0, dtype=np.float64), r0x, sigma, seed, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certify_radius_holds_against_the_closed_form(seed: int) -> None:
    w, b, sigma = [2, -1, 3], -60, 0.25
    net = linear_net(w, b)
    x0 = [40, 20, 30]
    v0 = np.array(x0) * float(SCALE)
    p_true = p_class1(w, b, v0, sigma)
    assert p_true > 0.9
    cert, _ = certify_sample(Engine(net, "numpy"), _sampler(net, x0, sigma, seed), 100, 20_000, 0.001, 4096)
    assert cert.prediction == 1 and cert.radius is not None
    assert cert.count == cert.counts[1]
    # the estimate is consistent with the exact probability, and the bound lies below it
    assert abs(cert.count / cert.n - p_true) < 5 * math.sqrt(p_true * (1 - p_true) / cert.n)
    assert cert.p_lower <= p_true
    assert cert.radius <= sigma * norm.ppf(p_true)
    # the smoothed classifier keeps class 1 on sampled perturbations inside the certified radius ...
    rng = np.random.default_rng(seed)
    for _ in range(100):
        d = rng.standard_normal(3)
        d *= cert.radius * rng.uniform(0.5, 0.999) / np.linalg.norm(d)
        assert p_class1(w, b, v0 + d, sigma) > 0.5
    # ... and the radius is not vacuous: along -w, a bit beyond the exact radius, the class changes
    u = -np.array(w) / np.linalg.norm(w)
    beyond = 1.5 * sigma * norm.ppf(p_true)
    assert p_class1(w, b, v0 + beyond * u, sigma) < 0.5


def test_certify_abstains_on_the_decision_boundary() -> None:
    """One coordinate, class 1 iff x > 31: at the real center v0 = 31.5 / 64 (a quantizer boundary) both classes
    have probability exactly 1/2; CERTIFY must abstain and PREDICT (almost always) too."""
    net = linear_net([1], -31)
    assert p_class1([1], -31, np.array([31.5 / 64]), 0.3) == pytest.approx(0.5, abs=1e-12)
    predicted = 0
    for seed in range(20):
        smp = _sampler(net, [31.5], 0.3, seed, [Fraction(63, 2)])
        cert, _ = certify_sample(Engine(net, "numpy"), smp, 100, 2000, 0.001, 2000)
        assert cert.prediction == ABSTAIN and cert.radius is None
        assert cert.p_lower < 0.5
        predicted += cert.predict != ABSTAIN
    assert predicted <= 1
    # just beside the boundary it still abstains (p = 0.5 + tiny), far from it it certifies
    cert, _ = certify_sample(Engine(net, "numpy"), _sampler(net, [32.0], 0.3, 0), 100, 2000, 0.001, 2000)
    assert cert.prediction == ABSTAIN
    cert, _ = certify_sample(Engine(net, "numpy"), _sampler(net, [60.0], 0.3, 0), 100, 2000, 0.001, 2000)
    assert cert.prediction == 1


# ------------------------------------------------------------------------------------------------ reproducibility
def _mlp() -> QNetwork:
    return random_dense_network(np.random.default_rng(3), n_in=6, hidden=(8,), n_out=3, input_hi=15)


def test_counts_do_not_depend_on_batch_size_or_engine() -> None:
    net = _mlp()
    smp = Sampler(InputQuantizer.of(net), np.array([3.0, 7, 1, 12, 9, 5]), None, 3.0, 11, 4)
    ref = sample_classes(Engine(net, "numpy"), smp, 1, 2500, 2500)
    assert np.array_equal(ref, sample_classes(Engine(net, "numpy"), smp, 1, 2500, 7))
    assert np.array_equal(ref[:1700], sample_classes(Engine(net, "numpy"), smp, 1, 1700, 1000))  # a prefix
    assert np.array_equal(ref, sample_classes(Engine(net, "torch:cpu"), smp, 1, 2500, 600))
    assert len(set(ref.tolist())) > 1  # the noise reaches more than one class
    other = Sampler(smp.quantizer, smp.r0, None, 3.0, 12, 4)
    assert not np.array_equal(ref, sample_classes(Engine(net, "numpy"), other, 1, 2500, 2500))


@CUDA
def test_same_counts_on_cuda() -> None:
    net = _mlp()
    smp = Sampler(InputQuantizer.of(net), np.array([3.0, 7, 1, 12, 9, 5]), None, 3.0, 11, 4)
    cpu = sample_classes(Engine(net, "numpy"), smp, 1, 5000, 5000)
    assert np.array_equal(cpu, sample_classes(Engine(net, "cuda"), smp, 1, 5000, 1024))


# ------------------------------------------------------------------------------------------------ results file
def _data(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.integers(0, 16, size=(n, 6)), rng.integers(0, 3, size=n)


def test_smooth_file_resumes_and_repairs(tmp_path) -> None:  # noqa: ANN001
    net = _mlp()
    images, labels = _data()
    kw = dict(n0=50, n=1500, alpha=0.01, batch=700, seed=2, progress=False)
    full = smooth(net, images, labels, 3.0, results_path=tmp_path / "full.jsonl", **kw)
    assert full.new == 6
    path = tmp_path / "part.jsonl"

    class Stop(Exception):
        pass

    def stop_after_two(rec: dict) -> None:
        if rec["id"] == 1:
            raise Stop

    with pytest.raises(Stop):
        smooth(net, images, labels, 3.0, results_path=path, on_record=stop_after_two, **kw)
    assert len(read_smooth_results(path).records) == 2
    with open(path, "a") as f:
        f.write('{"type": "instance", "id": 2, "lab')  # a crash while writing
    res = smooth(net, images, labels, 3.0, results_path=path, **kw)
    assert res.resumed == 2 and res.new == 4 and res.repaired
    keys = ("id", "prediction", "count", "counts", "counts0", "p_lower", "radius")
    assert [{k: r[k] for k in keys} for r in res.records] == [{k: r[k] for k in keys} for r in full.records]
    with pytest.raises(ValueError, match="another run"):
        smooth(net, images, labels, 2.0, results_path=path, **kw)
    s = summarize_smoothing(full.records, [0.0, 1.0])
    correct = [r for r in full.records if r["correct"]]
    assert s["clean_accuracy"] == len(correct) / 6
    assert s["acr"] == pytest.approx(sum(r["radius"] for r in correct) / 6)
    assert s["certified"][1]["certified_accuracy"] == sum(r["radius"] >= 1.0 for r in correct) / 6
    header = json.loads(path.read_text().splitlines()[0])
    assert "nearest grid point" in header["quantizer"]


# ------------------------------------------------------------------------------------------------ incremental
W8, B8 = [22, -9, 31], -600
W4, B4 = [5, -2, 8], -150  # the same classifier at a coarser weight grid


@pytest.mark.parametrize("x0", [[40, 20, 30], [30, 30, 22]])
def test_incremental_never_beats_its_bound(x0: list[int]) -> None:
    """Over many seeds the incremental radius of the variant exceeds its exact radius no more often than
    ``alpha + alpha_zeta`` allows, never exceeds the reference's, and is the stated bound of its counts."""
    sigma, alpha, alpha_z, n, n_p = 0.25, 0.05, 0.05, 4000, 800
    ref, var = linear_net(W8, B8), linear_net(W4, B4)
    v0 = np.array(x0) * float(SCALE)
    p1_var = p_class1(W4, B4, v0, sigma)
    e_ref, e_var = Engine(ref, "numpy"), Engine(var, "numpy")
    seeds, wrong, incremental = 60, 0, 0
    for seed in range(seeds):
        smp = _sampler(ref, x0, sigma, seed)
        cert, cls = certify_sample(e_ref, smp, 100, n, alpha, n, keep=True)
        if cert.prediction == ABSTAIN:
            continue
        mine = sample_classes(e_var, smp, 1, n_p, n_p)
        k = int(np.sum(mine != cls[:n_p]))
        zeta, p, r = incremental_bound(cert.p_lower, k, n_p, alpha_z, sigma)
        assert zeta >= k / n_p and p < cert.p_lower
        if r is None:
            continue
        incremental += 1
        assert r < cert.radius
        full, _ = certify_sample(e_var, _sampler(var, x0, sigma, 1000 + seed), 100, n, alpha, n)
        assert full.prediction == cert.prediction  # the full run agrees on the class it certifies
        p_var = p1_var if cert.prediction == 1 else 1 - p1_var  # the variant's exact probability of c_A
        wrong += r > (sigma * norm.ppf(p_var) if p_var > 0.5 else -1.0)
    assert incremental >= seeds // 2
    assert wrong <= binom.ppf(0.999, incremental, alpha + alpha_z)


def test_incremental_api_reuses_and_falls_back(tmp_path) -> None:  # noqa: ANN001
    images = np.array([[40, 20, 30], [30, 30, 22], [10, 50, 5]])
    labels = np.array([1, 1, 0])
    ref, var = linear_net(W8, B8), linear_net(W4, B4)
    kw = dict(n0=100, n=5000, alpha=0.001, batch=5000, seed=0, progress=False)
    full_ref = smooth(ref, images, labels, 0.25, results_path=tmp_path / "ref.jsonl", cache_predictions=True, **kw)
    assert (tmp_path / "ref.jsonl.cache" / "0.npy").exists()
    inc = smooth(var, images, labels, 0.25, results_path=tmp_path / "inc.jsonl", reuse=tmp_path / "ref.jsonl",
                 n_p=500, **kw)
    # recomputing the reference's classes (no cache) gives the same incremental records
    (tmp_path / "ref.jsonl.cache" / "0.npy").unlink()
    again = smooth(var, images, labels, 0.25, results_path=tmp_path / "inc2.jsonl", reuse=tmp_path / "ref.jsonl",
                   n_p=500, reference_net=ref, **kw)
    assert [r["radius"] for r in again.records] == [r["radius"] for r in inc.records]
    by = {r["id"]: r for r in inc.records}
    refs = {r["id"]: r for r in full_ref.records}
    for i, r in by.items():
        if r["method"] == "incremental":
            assert r["prediction"] == refs[i]["prediction"]
            assert r["radius"] == pytest.approx(certified_radius(refs[i]["p_lower"] - r["zeta_upper"], 0.25))
            assert r["radius"] < refs[i]["radius"]
        else:
            assert r["method"] == "fallback" and r["n"] == 5000
    assert any(r["method"] == "incremental" for r in inc.records)
    # a variant that disagrees everywhere (the opposite classifier) falls back to a full run
    flipped = QNetwork((3,), *GRID, (Dense([[0, 0, 0], [-w for w in W8]], [0, -B8]),), input_scale=SCALE)
    fb = smooth(flipped, images, labels, 0.25, results_path=tmp_path / "fb.jsonl", reuse=tmp_path / "ref.jsonl",
                n_p=200, reference_net=ref, **kw)
    assert all(r["method"] == "fallback" for r in fb.records)
    ab = smooth(flipped, images, labels, 0.25, results_path=tmp_path / "ab.jsonl", reuse=tmp_path / "ref.jsonl",
                n_p=200, reference_net=ref, fallback="abstain", **kw)
    assert all(r["method"] == "abstained" and r["prediction"] == ABSTAIN for r in ab.records)
    assert summarize_smoothing(ab.records)["acr"] == 0
    assert inc.header["reuse"]["path"].endswith("ref.jsonl")


# ------------------------------------------------------------------------------------------------ CLI and report
def test_cli_smooth_reuse_and_report(tmp_path, capsys) -> None:  # noqa: ANN001
    from qverify.certify import certify
    from qverify.cli import main
    from qverify.io import save_model
    from qverify.settings import VerifySettings

    model, variant = tmp_path / "w8.qnn", tmp_path / "w4.qnn"
    save_model(linear_net(W8, B8), model)
    save_model(linear_net(W4, B4), variant)
    images = np.array([[40, 20, 30], [30, 30, 22], [10, 50, 5]])
    labels = np.array([1, 1, 0])
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    common = ["--sigma", "0.25", "--n", "3000", "--no-progress", "--radii", "0", "0.5"]
    assert main(["smooth", str(model), str(tmp_path / "d.npz"), *common, "-o", str(tmp_path / "a"),
                 "--cache-predictions"]) == 0
    out = capsys.readouterr().out
    assert "nearest grid point" in out and "ACR" in out and "3 new" in out
    assert main(["smooth", str(model), str(tmp_path / "d.npz"), *common, "-o", str(tmp_path / "a")]) == 0
    assert "0 new, 3 resumed" in capsys.readouterr().out
    assert main(["smooth", str(variant), str(tmp_path / "d.npz"), *common, "-o", str(tmp_path / "b"),
                 "--reuse", str(tmp_path / "a" / "smooth.jsonl"), "--n-p", "300"]) == 0
    assert "incremental" in capsys.readouterr().out
    assert main(["smooth", str(variant), str(tmp_path / "d.npz"), "--sigma", "0.3", "--n", "3000", "--no-progress",
                 "-o", str(tmp_path / "b"), "--reuse", str(tmp_path / "a" / "smooth.jsonl")]) == 3
    assert "cannot be reused" in capsys.readouterr().err

    # report: smoothing files alone, and beside a certify results file
    smooth_files = [str(tmp_path / d / "smooth.jsonl") for d in ("a", "b")]
    assert main(["report", *smooth_files, "-o", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert 'id="smoothing-table"' in page and page.count("<tr><td>S") == 2
    assert (tmp_path / "rep" / "plots" / "smoothing.svg").read_bytes().startswith(b"<?xml")
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    acr = [s["summary"]["acr"] for s in summary["smoothing"]]
    recs = read_smooth_results(smooth_files[0]).records
    assert acr[0] == pytest.approx(sum(r["radius"] for r in recs if r["correct"]) / 3)
    assert f"{acr[0]:.4f}" in page
    settings = VerifySettings(timeout=5.0)
    certify(linear_net(W8, B8), images, labels, [0, 1], results_path=tmp_path / "c.jsonl", settings=settings,
            workers=1, progress=False, divergence_points=0)
    assert main(["report", str(tmp_path / "c.jsonl"), *smooth_files, "-o", str(tmp_path / "rep2")]) == 0
    page = (tmp_path / "rep2" / "report.html").read_text()
    assert 'id="summary"' in page and 'id="smoothing-table"' in page
    md = (tmp_path / "rep2" / "report.md").read_text()
    assert "## Randomized smoothing" in md and "plots/smoothing.svg" in md
