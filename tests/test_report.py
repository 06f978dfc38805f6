"""Certification reports: numbers equal the results file's, self-contained HTML (checked in headless Chromium),
escaping of hostile names, VNN-COMP result files, comparison of two runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from qverify.certify import MISCLASSIFIED, certify
from qverify.execute import predict
from qverify.report import render_report
from qverify.report.images import png_bytes
from qverify.settings import VerifySettings
from tests.fixtures import random_conv_network, random_dense_network

SETTINGS = VerifySettings(timeout=20)
HOSTILE = '<script>alert("x")</script> \'quoted\' & "double" | `tick` *star*'
RADII = [0, 1, 2]


def conv_problem():
    """A tiny conv network on 1x3x3 images with values 0..3; labels = predictions except sample 2."""
    rng = np.random.default_rng(0)
    net = random_conv_network(rng, in_shape=(1, 3, 3), input_hi=3)
    images = rng.integers(0, 4, size=(8, 9)).reshape(8, 1, 3, 3).astype(np.uint8)
    labels = predict(net, images.reshape(8, -1)).astype(np.int64)
    labels[2] = (labels[2] + 1) % 3
    return net, images, labels


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    net, images, labels = conv_problem()
    a = d / "a.jsonl"
    certify(net, images, labels, RADII, results_path=a, settings=SETTINGS, workers=1, progress=False,
            model_name=HOSTILE, data_path=d / 'data "x".npz', command=f"qverify certify {HOSTILE}")
    rng = np.random.default_rng(1)
    dense = random_dense_network(rng, n_in=9, hidden=(6,), n_out=3, input_hi=3)
    b = d / "b.jsonl"
    certify(dense, images, predict(dense, images.reshape(8, -1)), [0, 1], results_path=b, settings=SETTINGS,
            workers=1, progress=False, model_name="plain dense")
    return d, a, b


@pytest.fixture(scope="module")
def report(runs):
    d, a, _ = runs
    return render_report([a], d / "out"), a


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["type"] == "instance"]


class TableParser(HTMLParser):
    """Collects ``data-field`` cells of the summary tables: {(table id, radius, field): text}."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, int, str], str] = {}
        self.table = self.radius = self.field = None
        self.text = ""
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.tags: Counter = Counter()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        if "src" in a:
            self.srcs.append(a["src"])
        if "href" in a:
            self.hrefs.append(a["href"])
        if tag == "table" and "summary" in (a.get("class") or ""):
            self.table = a["id"]
        elif tag == "tr" and self.table and "data-radius" in a:
            self.radius = int(a["data-radius"])
        elif tag == "td" and self.table and "data-field" in a:
            self.field, self.text = a["data-field"], ""

    def handle_data(self, data):
        if self.field:
            self.text += data

    def handle_endtag(self, tag):
        if tag == "td" and self.field:
            self.cells[(self.table, self.radius, self.field)] = self.text
            self.field = None
        elif tag == "table":
            self.table = None


def parse(html: str) -> TableParser:
    p = TableParser()
    p.feed(html)
    return p


# ------------------------------------------------------------------------------------------------ numbers
def test_summary_numbers_equal_the_results_file(report):
    paths, a = report
    recs = records(a)
    summary = json.loads(paths["summary"].read_text())
    run = summary["runs"][0]
    assert run["instances"] == len(recs) == 8 * len(RADII)
    assert run["totals"] == {v: Counter(r["verdict"] for r in recs)[v] for v in run["totals"]}
    cells = parse(paths["html"].read_text()).cells
    md = paths["markdown"].read_text()
    for row in run["per_radius"]:
        mine = [r for r in recs if r["radius"] == row["radius"]]
        c = Counter(r["verdict"] for r in mine)
        n = len(mine)
        times = [r["seconds"] for r in mine if r["verdict"] != MISCLASSIFIED]
        expect = {"n": n, "robust": c["robust"], "counterexample": c["counterexample"], "unknown": c["unknown"],
                  "error": c["error"], MISCLASSIFIED: c[MISCLASSIFIED],
                  "certified_accuracy": c["robust"] / n, "clean_accuracy": (n - c[MISCLASSIFIED]) / n,
                  "time_max": max(times), "time_total": sum(times)}
        for k, v in expect.items():
            assert row[k] == pytest.approx(v), (row["radius"], k)
        key = ("summary-A", row["radius"])
        assert cells[key + ("robust",)] == str(c["robust"])
        assert cells[key + ("counterexample",)] == str(c["counterexample"])
        assert cells[key + (MISCLASSIFIED,)] == str(c[MISCLASSIFIED])
        assert cells[key + ("n",)] == str(n)
        assert cells[key + ("certified_accuracy",)] == f"{100 * c['robust'] / n:.1f}%"
        assert cells[key + ("clean_accuracy",)] == f"{100 * (n - c[MISCLASSIFIED]) / n:.1f}%"
        assert cells[key + ("time_max",)] == f"{max(times):.3g}"
        assert (f"| {row['radius']} | {n} | {100 * (n - c[MISCLASSIFIED]) / n:.1f}% | "
                f"{100 * c['robust'] / n:.1f}% | {c['robust']} | {c['counterexample']} |") in md
    kinds = Counter(r["verdict"] for r in recs)
    assert kinds["robust"] and kinds["counterexample"] and kinds[MISCLASSIFIED] == len(RADII)


def test_vnncomp_result_files(report):
    paths, a = report
    (paths["results"] / "999_r9.txt").write_text("unsat\n")  # left by an earlier report: removed on re-render
    (paths["results"] / "notes.txt").write_text("mine")  # not a result file: kept
    assert render_report([a], paths["html"].parent) == paths
    assert not (paths["results"] / "999_r9.txt").exists() and (paths["results"] / "notes.txt").exists()
    (paths["results"] / "notes.txt").unlink()
    h = json.loads(a.read_text().splitlines()[0])
    s_in, z_in = Fraction(h["model"]["input_scale"]), h["model"]["input_zero_point"]
    files = sorted(paths["results"].glob("*.txt"))
    recs = records(a)
    assert len(files) == len(recs)
    for r in recs:
        text = (paths["results"] / f"{r['id']}_r{r['radius']}.txt").read_text()
        status = {"robust": "unsat", "counterexample": "sat", MISCLASSIFIED: "sat"}[r["verdict"]]
        assert text.splitlines()[0] == status
        if status == "sat":
            xs = [Fraction(v) for v in re.findall(r"\(X_\d+ ([-0-9.e]+)\)", text)]
            assert xs == [s_in * (v - z_in) for v in r["witness"]["x"]]
            assert len(re.findall(r"\(Y_\d+ ", text)) == len(r["witness"]["y"])


# ------------------------------------------------------------------------------------------------ HTML
def test_html_is_self_contained(report):
    paths, _ = report
    html = paths["html"].read_text()
    p = parse(html)
    assert p.srcs and all(s.startswith("data:image/") for s in p.srcs)
    assert all(h.startswith(("#", "data:")) for h in p.hrefs)
    assert p.tags["script"] == 0 and p.tags["link"] == 0 and p.tags["iframe"] == 0
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    assert "@import" not in html and "url(" not in html
    # pictures: 3 per counterexample (original, adversarial, difference) + 2 plots
    n_cex = sum(r["verdict"] == "counterexample" for r in records(report[1]))
    assert sum(s.startswith("data:image/png") for s in p.srcs) == 3 * n_cex
    assert sum(s.startswith("data:image/svg+xml") for s in p.srcs) == 2


def test_hostile_text_is_escaped(report):
    paths, _ = report
    html = paths["html"].read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "&#x27;quoted&#x27;" in html and "data &quot;x&quot;.npz" in html
    md = paths["markdown"].read_text()
    assert "<script" not in md and "&lt;script&gt;" in md
    summary = json.loads(paths["summary"].read_text())
    assert summary["runs"][0]["model"]["name"] == HOSTILE  # JSON keeps the exact text


def test_png_encoder_roundtrip():
    PIL = pytest.importorskip("PIL.Image", reason="Pillow decodes the PNG for this check")
    import io

    a = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgb = np.stack([a, 255 - a, a // 2], axis=2)
    assert np.array_equal(np.asarray(PIL.open(io.BytesIO(png_bytes(a)))), a)
    assert np.array_equal(np.asarray(PIL.open(io.BytesIO(png_bytes(rgb)))), rgb)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


PROBE = """<script>
window.addEventListener('load', () => {
  const b = document.body, imgs = [...document.images];
  b.setAttribute('data-imgs', imgs.length);
  b.setAttribute('data-decoded', imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length);
  b.setAttribute('data-scripts', document.scripts.length);
  b.setAttribute('data-summary-rows', document.querySelectorAll('table.summary tbody tr').length);
  b.setAttribute('data-cex-figures', document.querySelectorAll('figure.cex').length);
  const m = document.querySelector('.model-name');
  b.setAttribute('data-model-name', m ? m.textContent : '');
  b.setAttribute('data-probe', 'done');
});
</script>"""


class BodyAttrs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.attrs = dict(attrs)


def test_html_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium): the browser check is skipped")
    paths, a = report
    page = tmp_path / "probe.html"
    page.write_text(paths["html"].read_text().replace("</body>", PROBE + "</body>"), encoding="utf-8")
    profile = tmp_path / "profile"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    body = BodyAttrs()
    body.feed(out.stdout)
    attrs = body.attrs
    assert attrs.get("data-probe") == "done", out.stderr[-2000:]
    n_cex = sum(r["verdict"] == "counterexample" for r in records(a))
    assert int(attrs["data-imgs"]) == 3 * n_cex + 2
    assert attrs["data-decoded"] == attrs["data-imgs"]  # every picture and plot decoded
    assert int(attrs["data-summary-rows"]) == len(RADII)
    assert int(attrs["data-cex-figures"]) == n_cex
    assert attrs["data-scripts"] == "1"  # only the probe: the hostile name did not become a script
    assert attrs["data-model-name"] == HOSTILE  # ... it is shown as text


# ------------------------------------------------------------------------------------------------ comparison
def test_two_runs_side_by_side(runs):
    d, a, b = runs
    paths = render_report([a, b], d / "cmp")
    summary = json.loads(paths["summary"].read_text())
    assert [r["label"] for r in summary["runs"]] == ["A", "B"]
    comp = summary["comparison"]
    ra, rb = records(a), records(b)
    va = {(r["id"], r["radius"]): r["verdict"] for r in ra}
    vb = {(r["id"], r["radius"]): r["verdict"] for r in rb}
    common = set(va) & set(vb)
    assert comp["common_instances"] == len(common)
    assert {(x["id"], x["radius"]) for x in comp["differences"]} == {k for k in common if va[k] != vb[k]}
    for row in comp["per_radius"]:
        for lab, recs in (("A", ra), ("B", rb)):
            mine = [r for r in recs if r["radius"] == row["radius"]]
            if not mine:
                assert row[lab] is None
                continue
            assert row[lab]["certified_accuracy"] == sum(r["verdict"] == "robust" for r in mine) / len(mine)
    html = paths["html"].read_text()
    p = parse(html)
    assert ("summary-A", 0, "robust") in p.cells and ("summary-B", 0, "robust") in p.cells
    assert 'id="comparison"' in html and "plain dense" in html
    assert len(list((paths["results"] / "A_a").glob("*.txt"))) == len(ra)
    assert len(list((paths["results"] / "B_b").glob("*.txt"))) == len(rb)
    assert "## Comparison" in paths["markdown"].read_text()


def test_truncated_results_file_renders_with_a_note(runs, tmp_path):
    _, a, _ = runs
    cut = tmp_path / "cut.jsonl"
    text = a.read_text()
    cut.write_text(text + text.splitlines()[3][:40])
    paths = render_report([cut], tmp_path / "out")
    assert cut.read_text().endswith(text.splitlines()[3][:40])  # the report does not modify the file
    summary = json.loads(paths["summary"].read_text())
    assert summary["runs"][0]["instances"] == len(records(a))
    assert "incomplete" in summary["runs"][0]["truncated_last_line"]
    assert "incomplete" in paths["html"].read_text()


def test_undecided_instances_show_their_slack_bracket(tmp_path):
    """Unknown instances are listed with the bracket of their least slack, as the results file records it."""
    from tests.test_verify import _stuck_exact

    rng = np.random.default_rng(1)
    net = random_dense_network(rng, n_in=4, hidden=(6, 5))
    images = rng.integers(0, net.input_hi + 1, size=(30, 4)).astype(np.uint8)
    labels = predict(net, images.reshape(30, -1)).astype(np.int64)
    path = tmp_path / "u.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        _stuck_exact(mp)
        certify(net, images, labels, [2], results_path=path, settings=VerifySettings(timeout=5), workers=1,
                progress=False, model_name="near ties")
    unk = [r for r in records(path) if r["verdict"] == "unknown"]
    assert unk, "the stubbed exact stage leaves some instance undecided"
    paths = render_report([path], tmp_path / "out")
    html, text = paths["html"].read_text(), paths["markdown"].read_text()
    table = html[html.index('<table class="unknowns"'):].split("</table>")[0]
    assert table.count("<tr>") == len(unk) + 1
    for r in unk:
        sl = r["details"]["slack"]
        assert sl["lower"] <= 0 < sl["upper"]
        assert (f"<tr><td>{r['id']}</td><td>2</td><td>{r['label']}</td><td class=\"l\">timeout</td>" in table)
        assert f"<td>{sl['lower']}</td><td>{sl['upper']}</td>" in table
        assert f"{r['id']}@r2 [{sl['lower']}, {sl['upper']}]" in text


# ------------------------------------------------------------------------------------------------ runtime divergence
def test_runtime_divergence_in_summary_per_instance_and_result_files(tmp_path, report):
    """Instances whose box holds a point where onnxruntime differs are counted per radius, marked per sample, listed
    with their counts, and their non-sat VNN-COMP files carry the warning; a run without the check says so."""
    pytest.importorskip("onnxruntime")
    from qverify.io.onnx import load_onnx
    from tests.onnx_builders import near_tie_model

    model = near_tie_model(tmp_path / "ties.onnx")
    net = load_onnx(model)
    images = np.array([[100, 101, 99], [40, 60, 80], [7, 9, 11]], dtype=np.uint8)
    labels = predict(net, images.astype(np.int64))
    res = tmp_path / "ties.jsonl"
    certify(net, images, labels, [0, 2], results_path=res, settings=SETTINGS, workers=1, progress=False,
            model_path=model, divergence_points=32)
    paths = render_report([res], tmp_path / "out")
    recs = records(res)
    warned = {(r["id"], r["radius"]) for r in recs if (r.get("details") or {}).get("warning")}
    summary = json.loads(paths["summary"].read_text())["runs"][0]
    assert summary["semantics"] == net.semantics and summary["divergence_check"]["points"] == 32
    assert {(w["id"], w["radius"]) for w in summary["runtime_differs"]} == warned
    html = paths["html"].read_text()
    cells = parse(html).cells
    for row in summary["per_radius"]:
        mine = [r for r in recs if r["radius"] == row["radius"] and (r["id"], r["radius"]) in warned]
        n = sum(r["verdict"] == "robust" for r in mine)
        assert row["robust_runtime_differs"] == n
        assert cells[("summary-A", row["radius"], "robust_runtime_differs")] == str(n)
    assert html.count("&#9888;</span>") == len(warned)
    md_text = paths["markdown"].read_text()
    for r in recs:
        text = (paths["results"] / f"{r['id']}_r{r['radius']}.txt").read_text()
        if r["status"] != "sat":
            assert f"under {net.semantics} semantics" in text
            assert ("; qverify warning: onnxruntime" in text) == ((r["id"], r["radius"]) in warned)
    if net.semantics == "exact":  # odd sums are near-ties that onnxruntime rounds to even
        assert warned and 'id="divergence-A"' in html and "Warning: onnxruntime differs" in md_text
    # the other run (.qnn, no onnxruntime): no column, and the section says why
    paths0, _ = report
    html0 = paths0["html"].read_text()
    assert "robust_runtime_differs" not in html0 and "no runtime divergence check (not an ONNX model" in html0
