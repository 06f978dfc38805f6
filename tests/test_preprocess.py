"""Data in the units a model expects (qverify/preprocess.py): raw pixels through a stated preprocessing to the grid."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from qverify.certify import ResultsFileError, certify
from qverify.network import Dense, QNetwork, Requantize
from qverify.preprocess import Preprocess
from qverify.property import PropertyError, pixels_to_grid
from qverify.quant import Rounding, round_fraction


def _net(scale: Fraction, rounding: Rounding | None = Rounding.HALF_EVEN, lo: int = 0, hi: int = 127,
         semantics: str | None = None, n: int = 4) -> QNetwork:
    """A 4-input model whose input quantizer is ``x = R(v / scale)`` on ``[lo, hi]`` (or an integer input)."""
    w = np.array([[1, -1, 2, 0], [0, 1, -1, 1], [-1, 0, 1, 1]])[:, :n]
    meta = {"semantics": semantics} if semantics else {}
    return QNetwork((n,), lo, hi, (Dense(w, np.zeros(3, np.int64)), Requantize.pow2(1, -8, 7)),
                    input_scale=scale, input_rounding=rounding, metadata=meta)


def test_parse_and_spec_round_trip() -> None:
    p = Preprocess.parse("scale=1/255, mean=0.1307, std=0.3081")
    assert p.scale == Fraction(1, 255) and p.mean == (Fraction("0.1307"),) and p.std == (Fraction("0.3081"),)
    assert Preprocess.parse(p.spec()) == p
    assert Preprocess.parse("mean=0.485:0.456:0.406,std=0.229:0.224:0.225").mean[2] == Fraction("0.406")
    with pytest.raises(PropertyError, match="keys scale, mean, std, range"):
        Preprocess.parse("gain=2")
    with pytest.raises(PropertyError, match="std > 0"):
        Preprocess.parse("std=0")


def test_quantizing_input_maps_pixels_and_boxes_exactly() -> None:
    """A model trained on ``pixel / 255`` with input scale ``2/255``: ``x = rne(p / 2)``; the radius-r box is the
    image of the pixel box, every pixel of which lands inside it (enumerated)."""
    net = _net(Fraction(2, 255))
    pre = Preprocess.parse("scale=1/255")
    px = np.array([[0, 1, 3, 255], [128, 5, 6, 7]])
    x = pixels_to_grid(net, px, pre)
    want = [[round_fraction(Fraction(int(p), 2), Rounding.HALF_EVEN) for p in row] for row in px]
    np.testing.assert_array_equal(x, np.minimum(want, 127))
    with pytest.raises(PropertyError, match="leave the network's input grid.*--preprocess scale=1/255"):
        pixels_to_grid(net, px)
    for r in (0, 1, 3):
        prop = pre.robustness_property(net, px[0], 1, r)
        for k, p in enumerate(px[0]):
            inside = [int(pixels_to_grid(net, np.array([[q] * 4]), pre)[0, k])
                      for q in range(max(0, p - r), min(255, p + r) + 1)]
            assert prop.lo[k] == min(inside) and prop.hi[k] == max(inside)
        assert prop.metadata["preprocess"] == pre.spec()


def test_mean_std_on_an_integer_input_model() -> None:
    """An integer-input model whose grid is ``v = (x - 0) / 10`` on ``[-30, 30]``: a preprocessing that hits the grid
    maps exactly; one that does not is an error naming the pixel."""
    net = _net(Fraction(1, 10), rounding=None, lo=-30, hi=30)
    pre = Preprocess.parse("scale=1/10,mean=1,std=1,range=0:20")  # v = p / 10 - 1, so x = 10 v = p - 10
    x = pixels_to_grid(net, np.array([[0, 10, 20, 5]]), pre)
    np.testing.assert_array_equal(x, [[-10, 0, 10, -5]])
    off = Preprocess.parse("scale=1/20,range=0:20")
    with pytest.raises(PropertyError, match="pixel 1 of input 0 .*not a point of the model's input grid"):
        pixels_to_grid(net, np.array([[1, 2, 4, 6]]), off)


def test_float32_inputs_under_onnxruntime_semantics_are_covered() -> None:
    """Under onnxruntime semantics the model quantizes float32 inputs; the box must contain the grid point of the
    nearest float32 of every pixel's real value (and of its neighbours)."""
    net = _net(Fraction(0.0078125), semantics="onnxruntime", hi=255)
    pre = Preprocess.parse("scale=1/255,mean=0.5,std=0.5")
    px = np.arange(0, 256, 37)[:4]
    prop = pre.robustness_property(net, px, 0, 2)
    for k, p in enumerate(px):
        for q in range(max(0, p - 2), min(255, p + 2) + 1):
            v = np.float32((np.float32(q) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))
            g = int(np.clip(np.rint(np.float32(v) / np.float32(0.0078125)), 0, 255))
            assert prop.lo[k] <= g <= prop.hi[k]


def test_certify_stores_the_preprocessing_and_refuses_another(tmp_path) -> None:
    net = _net(Fraction(2, 255))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 4))
    labels = np.zeros(6, np.int64)
    out = tmp_path / "r.jsonl"
    pre = Preprocess.parse("scale=1/255")
    summary = certify(net, images, labels, [1], results_path=out, preprocess=pre, progress=False, workers=1,
                      divergence_points=0)
    header = json.loads(out.read_text().splitlines()[0])
    assert header["preprocess"] == pre.spec()
    assert len(summary.records) == 6
    with pytest.raises(ResultsFileError, match="preprocess"):
        certify(net, images, labels, [1], results_path=out, preprocess=Preprocess.parse("scale=1/256"),
                progress=False, workers=1, divergence_points=0)
