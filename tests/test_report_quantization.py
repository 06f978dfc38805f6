"""The report's comparison by quantization method and bit width: widths and labels from the header's
quantization record, the table's numbers equal to the results files', the bits plot, runs without a record."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from qverify.certify import certify, quantization_info, read_results, summarize
from qverify.execute import predict
from qverify.report import render_report
from qverify.report.quantization import QuantRow, method_label, plot_series, widths
from qverify.settings import VerifySettings
from tests.fixtures import random_dense_network


def test_widths_are_means_over_layers_and_hidden_activations() -> None:
    assert widths("w8a8,w8a8") == (8, 8)
    assert widths("w4a4,w4a4,w8a8") == (pytest.approx(16 / 3), 4)  # the output's width is not an activation
    assert widths("w2a8") == (2, 8)  # one layer: its output width
    with pytest.raises(ValueError, match="bad entry 'x4'"):
        widths("w8a8,x4")


def test_method_labels_and_series() -> None:
    assert method_label({"train_method": "qat"}) == "qat"
    assert method_label({"train_method": "float-ibp", "source": "qverify.quantize",
                         "clipping": "mse/mse,mse/minmax"}) == "float PTQ mse"
    assert method_label({"train_method": "grad-l1", "source": "qverify.quantize",
                         "clipping": "mse/mse,minmax/mse"}) == "grad-l1 PTQ"  # mixed weight clippings
    assert method_label({}) == "?"
    uniform = QuantRow("A", "m", "qat", 4, 4, "w4a4,w4a4")
    weight_only = QuantRow("B", "m", "binaryrelax", 2, 8, "w2a8,w2a8")
    assert (uniform.series, weight_only.series) == ("qat", "binaryrelax (a8)")


def test_quantization_info_reads_the_metadata() -> None:
    net = random_dense_network(np.random.default_rng(0), n_in=4, hidden=(3,), n_out=2, input_hi=3)
    assert quantization_info(net) is None  # no layer_bits: not a qverify-quantized network
    tagged = dataclasses.replace(net, metadata={**net.metadata, "layer_bits": "w4a4,w4a8", "train_method": "qat",
                                                "unrelated": "x"})
    assert quantization_info(tagged) == {"train_method": "qat", "layer_bits": "w4a4,w4a8"}


MODELS = [("qat", "w8a8,w8a8", {}), ("qat", "w4a4,w4a8", {}),
          ("float-ibp", "w4a8,w4a8", {"source": "qverify.quantize", "clipping": "minmax/minmax,minmax/minmax"}),
          (None, None, {})]


@pytest.fixture(scope="module")
def quant_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("qreport")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 4, size=(8, 9)).astype(np.uint8)
    paths = []
    for k, (method, bits, extra) in enumerate(MODELS):
        net = random_dense_network(np.random.default_rng(10 + k), n_in=9, hidden=(5,), n_out=3, input_hi=3)
        if bits is not None:
            net = dataclasses.replace(net, metadata={**net.metadata, "layer_bits": bits, "train_method": method,
                                                     **extra})
        labels = predict(net, images).astype(np.int64)
        labels[k] = (labels[k] + 1) % 3  # one misclassified sample each
        p = d / f"run{k}.jsonl"
        certify(net, images, labels, [0, 1], results_path=p, settings=VerifySettings(timeout=20), workers=1,
                progress=False, model_name=f"model {k}")
        paths.append(p)
    return d, paths


def test_side_by_side_table_plot_and_summary(quant_runs) -> None:
    d, paths = quant_runs
    out = render_report(paths, d / "out")
    assert out["bits_svg"].exists() and out["bits_svg"].read_bytes().startswith(b"<?xml")
    page = out["html"].read_text()
    assert 'id="quantization-table"' in page and 'id="plot-bits"' in page
    summary = json.loads(out["summary"].read_text())["quantization"]
    assert summary["runs_without_quantization_record"] == ["D"]
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"A", "B", "C"}
    assert (rows["A"]["method"], rows["A"]["weight_bits"], rows["A"]["act_bits"]) == ("qat", 8, 8)
    assert (rows["B"]["series"], rows["B"]["weight_bits"], rows["B"]["act_bits"]) == ("qat", 4, 4)
    assert (rows["C"]["method"], rows["C"]["series"]) == ("float PTQ minmax", "float PTQ minmax (a8)")
    for label, path in zip("ABC", paths, strict=False):
        want = {r["radius"]: r for r in summarize(read_results(path).records)}
        for rad, got in rows[label]["per_radius"].items():
            w = want[int(rad)]
            assert got["certified_accuracy"] == w["certified_accuracy"]
            assert (got["robust"], got["counterexample"], got["unknown"]) == (w["robust"], w["counterexample"],
                                                                            w["unknown"])
            cell = re.search(rf'<tr data-run="{label}">.*?data-radius="{rad}" data-field="certified">([^<]*)<',
                             page, re.S)
            assert cell and cell.group(1) == f"{100 * w['certified_accuracy']:.1f}%"
    text = out["markdown"].read_text()
    assert "## Certified accuracy by method and bit width" in text and "plots/bits.svg" in text
    assert "left out): D" in text


def test_plot_series_groups_by_series_and_radius(quant_runs) -> None:
    from qverify.report.quantization import quant_rows
    from qverify.report.render import load_runs

    _, paths = quant_runs
    rows, missing = quant_rows(load_runs(paths))
    assert missing == ["D"]
    series = plot_series(rows)
    assert {(name, rad) for name, rad, _ in series} == {("qat", 0), ("qat", 1), ("float PTQ minmax (a8)", 0),
                                                        ("float PTQ minmax (a8)", 1)}
    qat1 = next(pts for name, rad, pts in series if (name, rad) == ("qat", 1))
    assert [x for x, _ in qat1] == [4, 8]  # sorted by weight width


def test_one_quantized_run_has_no_bits_section(quant_runs) -> None:
    d, paths = quant_runs
    out = render_report([paths[0], paths[3]], d / "one")
    assert "bits_svg" not in out and "quantization-table" not in out["html"].read_text()
