"""Models side by side by quantization method and bit width: certified accuracy against bits, per method.

When a report compares several ``qverify certify`` results files, each file's header names how its network was
quantized (``model.quantization``, written by :func:`qverify.certify.quantization_info` from the network's metadata:
the training method, ``source = qverify.quantize`` and the clipping for a post-training-quantized network, and the
per-layer widths ``layer_bits = "w8a8,w4a4,..."``, the last ``a`` the output's). This module turns those into:

* one table: per run, its method, weight and activation widths, and per radius the certified accuracy with the
  counterexample and unknown counts (certified accuracy is a lower bound of the robust accuracy; with unknowns
  the gap to the not-falsified share is open);
* one plot (:func:`qverify.report.plots.bits_plot`): certified accuracy (%) against the weight width, one line per
  method series and radius.

Widths of a network: ``w`` is the mean of its layers' weight widths, ``a`` the mean of its hidden layers'
activation widths (the output layer's width is not counted: the benchmarks keep it at 8 bits). A uniform network
has ``w`` and ``a`` the integers it was quantized to; a mixed-precision one gets the means. A series is a method
label plus the activation widths when they differ from the weight widths (``"qat"`` holds W8A8, W4A4, W2A2;
``"float PTQ minmax (a8)"`` holds W4A8, W2A8), so every point of one line differs only in its weight width.

Runs whose header has no ``quantization`` record (an imported ONNX model, or a results file written before the
record existed) are listed as such and left out of the table and the plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QuantRow:
    """One run in the bits comparison. ``per_radius`` maps a radius to its :func:`qverify.certify.summarize` row."""

    run: str
    model: str
    method: str
    weight_bits: float
    act_bits: float
    layer_bits: str
    per_radius: dict[int, dict] = field(default_factory=dict)

    @property
    def series(self) -> str:
        """The plot line this run belongs to (module docstring)."""
        if self.act_bits == self.weight_bits:
            return self.method
        return f"{self.method} (a{_num(self.act_bits)})"


def _num(v: float) -> str:
    return f"{v:g}" if v == int(v) else f"{v:.2f}"


def method_label(q: dict[str, str]) -> str:
    """The method of a ``quantization`` record: the training method, with ``PTQ <clipping>`` when the network was
    post-training quantized (one clipping when every layer used the same weight clipping)."""
    method = q.get("train_method") or "?"
    if method == "float-ibp":
        method = "float"
    if q.get("source") == "qverify.quantize":
        clips = {c.split("/")[0] for c in (q.get("clipping") or "").split(",") if c}
        method += " PTQ" + (f" {clips.pop()}" if len(clips) == 1 else "")
    return method


def widths(layer_bits: str) -> tuple[float, float]:
    """``(w, a)``: the mean weight width over all layers and the mean activation width over the hidden layers
    (the output's width when there is only one layer)."""
    from qverify.train.export import parse_layer_bits

    bits = parse_layer_bits(layer_bits)
    w = sum(b[0] for b in bits) / len(bits)
    hidden = [b[1] for b in bits[:-1]] or [bits[-1][1]]
    return w, sum(hidden) / len(hidden)


def quant_rows(runs: Sequence[Any]) -> tuple[list[QuantRow], list[str]]:
    """The runs (:class:`qverify.report.render.Run`) with a quantization record as :class:`QuantRow`, sorted by
    series and weight width, and the labels of the runs without one."""
    rows, missing = [], []
    for run in runs:
        model = run.header.get("model") or {}
        q = model.get("quantization")
        if not q or "layer_bits" not in q:
            missing.append(run.label)
            continue
        try:
            w, a = widths(q["layer_bits"])
        except ValueError as e:
            raise ValueError(f"{run.path}: header model.quantization: {e}") from None
        rows.append(QuantRow(run.label, str(model.get("name")), method_label(q), w, a, q["layer_bits"],
                             {int(r["radius"]): r for r in run.rows}))
    rows.sort(key=lambda r: (r.series, -r.weight_bits, r.run))
    return rows, missing


def radii_of(rows: Sequence[QuantRow]) -> list[int]:
    return sorted({rad for r in rows for rad in r.per_radius})


def plot_series(rows: Sequence[QuantRow]) -> list[tuple[str, int, list[tuple[float, float]]]]:
    """``[(series, radius, [(weight bits, certified accuracy %), ...]), ...]`` for :func:`plots.bits_plot`; a
    series with two runs at the same weight width keeps both points (the table tells them apart)."""
    out = []
    for rad in radii_of(rows):
        by: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            s = r.per_radius.get(rad)
            if s and s["n"] and s["certified_accuracy"] is not None:
                by.setdefault(r.series, []).append((r.weight_bits, 100.0 * s["certified_accuracy"]))
        out += [(name, rad, sorted(pts)) for name, pts in sorted(by.items())]
    return out


def quantization_json(rows: Sequence[QuantRow], missing: Sequence[str]) -> dict:
    return {"rows": [{"run": r.run, "model": r.model, "method": r.method, "series": r.series,
                      "weight_bits": r.weight_bits, "act_bits": r.act_bits, "layer_bits": r.layer_bits,
                      "per_radius": {str(k): {f: v[f] for f in ("n", "certified_accuracy", "robust", "counterexample",
                                                                 "unknown", "clean_accuracy")}
                                     for k, v in sorted(r.per_radius.items())}} for r in rows],
            "runs_without_quantization_record": list(missing)}


def _cells(r: QuantRow, rad: int) -> tuple[str, str, str]:
    s = r.per_radius.get(rad)
    if not s or not s["n"]:
        return "-", "-", "-"
    return f"{100 * s['certified_accuracy']:.1f}%", str(s["counterexample"]), str(s["unknown"])


def _clean(r: QuantRow) -> str:
    vals = [s["clean_accuracy"] for s in r.per_radius.values() if s["n"] and s["clean_accuracy"] is not None]
    return f"{100 * vals[0]:.1f}%" if vals else "-"


INTRO = ("Each run's network by how it was quantized: <b>w</b> / <b>a</b> are the mean weight width over its layers "
         "and the mean activation width over its hidden layers; per radius the certified accuracy (a proof for "
         "each instance counted), the replayed counterexamples and the undecided instances.")


def quantization_html(rows: Sequence[QuantRow], missing: Sequence[str], svg_img: str) -> str:
    from qverify.report.text import esc

    radii = radii_of(rows)
    head = ("<th>run</th><th class='l'>model</th><th class='l'>method</th><th>w</th><th>a</th>"
            "<th class='l'>layers</th><th>clean</th>"
            + "".join(f"<th>r={rad} certified</th><th>r={rad} cex</th><th>r={rad} unknown</th>" for rad in radii))
    body = []
    for r in rows:
        cells = "".join(f'<td data-radius="{rad}" data-field="{f}">{esc(v)}</td>' for rad in radii
                        for f, v in zip(("certified", "counterexample", "unknown"), _cells(r, rad), strict=True))
        body.append(f'<tr data-run="{esc(r.run)}"><td>{esc(r.run)}</td><td class="l">{esc(r.model)}</td>'
                    f'<td class="l">{esc(r.method)}</td><td>{esc(_num(r.weight_bits))}</td>'
                    f'<td>{esc(_num(r.act_bits))}</td><td class="l"><code>{esc(r.layer_bits)}</code></td>'
                    f"<td>{esc(_clean(r))}</td>{cells}</tr>")
    out = ['<h2 id="quantization">Certified accuracy by method and bit width</h2>', f"<p>{INTRO}</p>",
           f'<table id="quantization-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
           svg_img]
    if missing:
        out.append(f"<p>Runs without a quantization record (left out): {esc(', '.join(missing))}.</p>")
    return "\n".join(out)


def quantization_markdown(rows: Sequence[QuantRow], missing: Sequence[str]) -> str:
    radii = radii_of(rows)
    cols = ["run", "model", "method", "w", "a", "layers", "clean",
            *[f"r={rad} {t}" for rad in radii for t in ("certified", "cex", "unknown")]]
    out = ["## Certified accuracy by method and bit width", "",
           INTRO.replace("<b>", "**").replace("</b>", "**"), "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [c for rad in radii for c in _cells(r, rad)]
        out.append("| " + " | ".join([r.run, r.model.replace("|", "\\|"), r.method, _num(r.weight_bits),
                                      _num(r.act_bits), f"`{r.layer_bits}`", _clean(r), *cells]) + " |")
    out += ["", "![certified accuracy vs bits](plots/bits.svg)", ""]
    if missing:
        out += [f"Runs without a quantization record (left out): {', '.join(missing)}.", ""]
    return "\n".join(out)
