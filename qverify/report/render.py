"""Certification reports from certify results files: HTML, Markdown, JSON summary, VNN-COMP per-instance files.

:func:`render_report` reads one or more results files (:mod:`qverify.certify`) and writes into ``out_dir``:

* ``report.html``: self-contained (inline CSS, plots as inline SVG data URIs, pictures as inline PNG data URIs; no
  script, no font, nothing fetched from the network): summary table per radius (clean accuracy, certified accuracy,
  falsified, unknown, times), certified-accuracy-vs-radius plot, time distribution, counterexample pictures
  (original, adversarial, difference) with the class scores, per-sample table, reproducibility section; with two or
  more files, a side-by-side comparison;
* ``report.md``: the summary tables and the reproducibility facts, linking ``plots/*.svg``;
* ``summary.json``: every figure of the report, computed by :func:`qverify.certify.summarize`;
* ``results/<id>_r<radius>.txt`` (one run) or ``results/<label>_<stem>/<id>_r<radius>.txt`` (several): the
  VNN-COMP result file of each instance (``sat`` with the witness in real units, ``unsat``, ``timeout``, ...);
* with ``qverify smooth`` results files among the inputs: a randomized-smoothing section
  (:mod:`qverify.report.smoothing`; ``plots/smoothing.svg``), and a smoothing report when they are all such files.

Every figure comes from the results file's records (counts are counted, times are the recorded ``seconds``). Every
string taken from a model, data or property file, a path or a command line is HTML-escaped (``html.escape``) in the
HTML and escaped in the Markdown, so a hostile model name is shown as text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from qverify.certify import MISCLASSIFIED, VERDICTS, ResultsFile, read_results, summarize
from qverify.io.results import comment_lines, witness_lines
from qverify.report import images, plots
from qverify.report.text import esc, md, pct


@dataclass
class Run:
    """One results file in a report."""

    label: str
    path: Path
    file: ResultsFile
    sha256: str

    @property
    def header(self) -> dict:
        return self.file.header or {}

    @property
    def records(self) -> list[dict]:
        return self.file.records

    @property
    def rows(self) -> list[dict]:
        return summarize(self.records, self.header.get("radii"))


@dataclass(frozen=True)
class _Scales:
    """The four scale fields :func:`qverify.io.results.witness_lines` reads from a network."""

    input_scale: Fraction
    input_zero_point: int
    output_scale: Fraction
    output_zero_point: int


def load_runs(results_paths: list[str | Path]) -> list[Run]:
    """Read the results files (a truncated last line is ignored and noted; the file is not modified)."""
    if not results_paths:
        raise ValueError("render_report: no results file given")
    runs = []
    for k, p in enumerate(results_paths):
        p = Path(p)
        f = read_results(p, repair=False)
        if f.header is None:
            raise ValueError(f"{p}: no header record (empty results file?)")
        label = chr(ord("A") + k) if k < 26 else f"R{k}"
        runs.append(Run(label, p, f, hashlib.sha256(p.read_bytes()[:f.valid_bytes]).hexdigest()))
    return runs


# ------------------------------------------------------------------------------------------------ helpers
def sec(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _safe_stem(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", s)[:60] or "run"


def _scales(h: dict) -> _Scales:
    m = h["model"]
    return _Scales(Fraction(m["input_scale"]), int(m["input_zero_point"]), Fraction(m["output_scale"]),
                   int(m["output_zero_point"]))


def vnncomp_text(header: dict, rec: dict) -> str:
    """The VNN-COMP result file of one instance record (``sat`` is followed by the witness in real units)."""
    status = rec.get("status") or "unknown"
    w = rec.get("witness")
    if status == "sat" and w:
        return f"sat\n{witness_lines(_scales(header), w['x'], w['y'])}\n"  # type: ignore[arg-type]
    return f"{status}\n{comment_lines(rec.get('details'))}"


SUMMARY_FIELDS = [("radius", "radius"), ("n", "samples"), ("clean_accuracy", "clean accuracy"),
                  ("certified_accuracy", "certified accuracy"), ("robust", "robust"),
                  ("counterexample", "falsified"), ("unknown", "unknown"), ("timeouts", "of which timeout"),
                  ("error", "error"), (MISCLASSIFIED, "misclassified"), ("time_mean", "mean s"),
                  ("time_median", "median s"), ("time_max", "max s"), ("time_total", "total s")]


#: the summary column of a run whose instances were checked against onnxruntime (:mod:`qverify.divergence`)
DIVERGENCE_FIELD = ("robust_runtime_differs", "robust, onnxruntime differs")


def checked_runtime(run: Run) -> bool:
    """Whether the run's instances were compared with onnxruntime (the header's ``divergence_check``)."""
    return bool((run.header.get("divergence_check") or {}).get("runtime"))


def summary_fields(run: Run) -> list[tuple[str, str]]:
    return SUMMARY_FIELDS + ([DIVERGENCE_FIELD] if checked_runtime(run) else [])


def _warned(run: Run) -> list[dict]:
    """Instance records whose box holds a point where onnxruntime and the executor differ."""
    return sorted((r for r in run.records if (r.get("details") or {}).get("warning")),
                  key=lambda r: (r["radius"], r["id"]))


def semantics_text(run: Run) -> str:
    """The semantics the run's verdicts are about, and how the runtime was checked against them."""
    h = run.header
    sem = h.get("semantics") or "exact"
    dc = h.get("divergence_check") or {}
    if dc.get("runtime"):
        chk = (f"each instance's box was sampled at up to {dc.get('points')} points (center, corners, random grid "
               f"points) and run on {dc['runtime']}")
    elif dc:
        chk = f"no runtime divergence check ({dc.get('skipped') or 'switched off'})"
    else:
        chk = "no runtime divergence check recorded"
    return f"verdicts about the integer network under {sem} semantics; {chk}"


def _cell(key: str, v: object) -> str:
    if key.endswith("accuracy"):
        return pct(v)  # type: ignore[arg-type]
    if key.startswith("time_"):
        return sec(v)  # type: ignore[arg-type]
    return str(v)


# ------------------------------------------------------------------------------------------------ summary
def summary_json(runs: list[Run]) -> dict:
    """Every figure of the report (per run and radius), plus the comparison of the runs."""
    out: dict = {"format": "qverify-certify-summary", "runs": []}
    for run in runs:
        h = run.header
        totals = Counter(r["verdict"] for r in run.records)
        out["runs"].append({
            "label": run.label, "results_file": str(run.path), "results_sha256": run.sha256,
            "model": {k: h["model"].get(k) for k in ("name", "path", "file_sha256", "network_sha256")},
            "data": h.get("data"), "radii": h.get("radii"), "selection": h.get("selection"),
            "settings": h.get("settings"), "seed": h.get("seed"), "versions": h.get("versions"),
            "command": h.get("command"), "instances": len(run.records),
            "semantics": h.get("semantics") or "exact", "divergence_check": h.get("divergence_check"),
            "runtime_differs": [{"id": r["id"], "radius": r["radius"], "verdict": r["verdict"],
                                 "warning": r["details"]["warning"]} for r in _warned(run)],
            "totals": {v: totals.get(v, 0) for v in VERDICTS}, "per_radius": run.rows,
            "truncated_last_line": run.file.truncated, "duplicate_records": run.file.duplicates,
            "wall_seconds": sum(float(s.get("wall_seconds", 0)) for s in run.file.sessions
                                if s["type"] == "session_end"),
        })
    if len(runs) > 1:
        out["comparison"] = _comparison(runs)
    return out


def _comparison(runs: list[Run]) -> dict:
    """Certified accuracy per radius side by side, and the instances whose verdicts differ between runs."""
    radii = sorted({r["radius"] for run in runs for r in run.rows})
    table = []
    for rad in radii:
        row: dict = {"radius": rad}
        for run in runs:
            rr = next((r for r in run.rows if r["radius"] == rad), None)
            row[run.label] = {k: rr[k] for k in ("n", "certified_accuracy", "robust", "counterexample", "unknown",
                                                  "clean_accuracy", "time_mean")} if rr else None
        table.append(row)
    maps = [{(r["id"], r["radius"]): r["verdict"] for r in run.records} for run in runs]
    keys = sorted(set.intersection(*(set(m) for m in maps)))
    diffs = [{"id": i, "radius": rad, **{run.label: m[(i, rad)] for run, m in zip(runs, maps, strict=True)}}
             for i, rad in keys if len({m[(i, rad)] for m in maps}) > 1]
    return {"per_radius": table, "common_instances": len(keys), "differences": diffs}


# ------------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f2f2f2}td.l,th.l{text-align:left}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85em}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.v-robust{background:#e3f4e3}.v-counterexample{background:#fbe0e0}.v-unknown{background:#fff1d6}
.v-error{background:#e6e6e6}.v-misclassified{background:#eee6f6}
figure.cex{display:inline-block;border:1px solid #ddd;margin:.4em;padding:.5em;vertical-align:top;max-width:380px}
figure.cex figcaption{font-size:.85em;margin-bottom:.3em}
.pics{display:flex;gap:.6em}.pics div{text-align:center;font-size:.75em}
.pics img{image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #999;display:block}
table.scores{font-size:.75em}.hl{font-weight:bold}
.plot img{max-width:100%;height:auto}.note{color:#a33}.warn{color:#b60}
details{margin:.5em 0}summary{cursor:pointer}
"""

VERDICT_SHORT = {"robust": "robust", "counterexample": "cex", "unknown": "unknown", "error": "error",
                 MISCLASSIFIED: "miscl."}


def _svg_img(svg: bytes, alt: str, ident: str) -> str:
    uri = "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")
    return f'<div class="plot"><img id="{esc(ident)}" src="{uri}" alt="{esc(alt)}"></div>'


def _summary_table(run: Run, ident: str) -> str:
    fields = summary_fields(run)
    head = "".join(f"<th>{esc(t)}</th>" for _, t in fields)
    body = []
    for r in run.rows:
        cells = "".join(f'<td data-field="{esc(k)}">{esc(_cell(k, r[k]))}</td>' for k, _ in fields)
        body.append(f'<tr data-radius="{r["radius"]}">{cells}</tr>')
    return (f'<table class="summary" id="{esc(ident)}" data-run="{esc(run.label)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _comparison_html(runs: list[Run], comp: dict) -> str:
    labels = [r.label for r in runs]
    head = "<th>radius</th>" + "".join(f"<th>{esc(lab)} {t}</th>" for t in ("certified", "falsified", "unknown",
                                                                             "mean s") for lab in labels)
    rows = []
    for row in comp["per_radius"]:
        cells = [f"<td>{row['radius']}</td>"]
        for key in ("certified_accuracy", "counterexample", "unknown", "time_mean"):
            for lab in labels:
                v = row[lab][key] if row[lab] else None
                txt = _cell(key, v) if v is not None else "-"
                cells.append(f'<td data-run="{esc(lab)}" data-field="{key}">{esc(txt)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    out = [f'<table id="comparison"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>']
    diffs = comp["differences"]
    out.append(f"<p>{comp['common_instances']} instances in all runs; verdicts differ on {len(diffs)}.</p>")
    if diffs:
        dh = "<th>id</th><th>radius</th>" + "".join(f"<th>{esc(lab)}</th>" for lab in labels)
        dr = "".join("<tr>" + f"<td>{d['id']}</td><td>{d['radius']}</td>"
                     + "".join(f'<td class="l v-{esc(d[lab])}">{esc(d[lab])}</td>' for lab in labels) + "</tr>"
                     for d in diffs[:500])
        more = f"<p>({len(diffs) - 500} more in summary.json)</p>" if len(diffs) > 500 else ""
        out.append(f"<details><summary>instances whose verdicts differ</summary><table>"
                   f"<thead><tr>{dh}</tr></thead><tbody>{dr}</tbody></table>{more}</details>")
    return "\n".join(out)


def _scores_table(rec: dict, top: int = 3) -> str:
    y0 = rec.get("scores") or []
    y1 = (rec.get("witness") or {}).get("y") or []
    if not y0 or len(y0) != len(y1):
        return ""
    adv = max(range(len(y1)), key=lambda j: (y1[j], -j))
    orig = max(range(len(y0)), key=lambda j: (y0[j], -j))
    keep = {int(rec["label"]), adv, orig}
    keep |= set(sorted(range(len(y0)), key=lambda j: (-y0[j], j))[:top])
    keep |= set(sorted(range(len(y1)), key=lambda j: (-y1[j], j))[:top])
    rows = []
    for j in sorted(keep):
        mark = " (label)" if j == int(rec["label"]) else ""
        mark += " (adversarial argmax)" if j == adv else ""
        cls = ' class="hl"' if j in (int(rec["label"]), adv) else ""
        rows.append(f"<tr{cls}><td class=\"l\">{j}{mark}</td><td>{y0[j]}</td><td>{y1[j]}</td></tr>")
    return ('<table class="scores"><thead><tr><th class="l">class</th><th>original</th><th>adversarial</th></tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def _cex_figures(run: Run, max_pictures: int) -> str:
    h = run.header
    m = h["model"]
    cex = sorted((r for r in run.records if r["verdict"] == "counterexample"), key=lambda r: (r["radius"], r["id"]))
    if not cex:
        return "<p>No counterexamples.</p>"
    layout = images.image_layout(m.get("input_shape") or [], (h.get("data") or {}).get("sample_shape"))
    lo, hi = (m.get("input_grid") or [0, 255])
    out = [f"<p>{len(cex)} counterexamples (each replayed on the integer executor). Scores are the network's integer "
           f"outputs y (real value = {esc(m.get('output_scale'))} &times; (y &minus; "
           f"{esc(m.get('output_zero_point'))})).</p>"]
    for rec in cex[:max_pictures]:
        w = rec.get("witness") or {}
        x0, x1 = rec.get("x0"), w.get("x")
        dist = max((abs(a - b) for a, b in zip(x0, x1, strict=True)), default=0) if x0 and x1 else None
        changed = sum(a != b for a, b in zip(x0, x1, strict=True)) if x0 and x1 else None
        adv_pred = max(range(len(w["y"])), key=lambda j: (w["y"][j], -j)) if w.get("y") else "?"
        cap = (f"sample {rec['id']}, r = {rec['radius']}: label {rec['label']} &rarr; {adv_pred} "
               f"({esc(rec.get('method'))}, {sec(rec.get('seconds'))} s; L&infin; distance {dist}, "
               f"{changed} inputs changed)")
        pics = ""
        if layout is not None and x0 and x1:
            p = images.counterexample_pictures(x0, x1, layout, int(lo), int(hi))
            shape = images.to_image(x0, layout).shape
            scale = max(1, -(-96 // max(shape[0], shape[1])))
            wpx, hpx = shape[1] * scale, shape[0] * scale
            pics = '<div class="pics">' + "".join(
                f'<div><img class="cex-img" src="{p[k]}" width="{wpx}" height="{hpx}" alt="{k}">{k}</div>'
                for k in ("original", "adversarial", "difference")) + "</div>"
        out.append(f'<figure class="cex" id="cex-{esc(run.label)}-{rec["id"]}-r{rec["radius"]}">'
                   f"<figcaption>{cap}</figcaption>{pics}{_scores_table(rec)}</figure>")
    if len(cex) > max_pictures:
        out.append(f"<p>{len(cex) - max_pictures} more counterexamples are in the results file (not drawn).</p>")
    return "\n".join(out)


def _slack_of(rec: dict) -> dict | None:
    """The ``unknown`` record's bracket of its least slack (``details.slack``), or ``None``."""
    sl = (rec.get("details") or {}).get("slack")
    return sl if isinstance(sl, dict) and (sl.get("lower") is not None or sl.get("upper") is not None) else None


def _bracket_text(sl: dict) -> str:
    lo, up = sl.get("lower"), sl.get("upper")
    return f"[{'?' if lo is None else lo}, {'?' if up is None else up}]"


def _unknowns(run: Run) -> list[dict]:
    return sorted((x for x in run.records if x["verdict"] == "unknown"), key=lambda x: (x["radius"], x["id"]))


def _per_run(runs: list, section) -> list[str]:
    """One report section per run: ``section(run)``, headed by the run's label and model when there are several."""
    out: list[str] = []
    for r in runs:
        if len(runs) > 1:
            out.append(f"<h3>{esc(r.label)}: {esc(r.header['model'].get('name'))}</h3>")
        out.append(section(r))
    return out


def _unknown_table(run: Run) -> str:
    """The undecided instances: reason and the bracket ``[L, U]`` of the least slack over the box (a violation is
    slack <= 0; ``U`` is attained by the attack's nearest miss, ``L`` is the symbolic bounds' lower bound)."""
    unk = _unknowns(run)
    if not unk:
        return "<p>None: every instance was decided.</p>"
    rows = []
    for x in unk:
        sl = _slack_of(x) or {}
        near = sl.get("nearest") or {}
        ys = near.get("y")
        rows.append(f"<tr><td>{x['id']}</td><td>{x['radius']}</td><td>{x['label']}</td>"
                    f"<td class=\"l\">{esc(x.get('reason') or '-')}</td><td>{sec(x.get('seconds'))}</td>"
                    f"<td>{'-' if sl.get('lower') is None else sl['lower']}</td>"
                    f"<td>{'-' if sl.get('upper') is None else sl['upper']}</td>"
                    f"<td class=\"l\">{esc(' '.join(str(v) for v in ys)) if ys else '-'}</td></tr>")
    return (f'<table class="unknowns" id="unknowns-{esc(run.label)}"><thead><tr><th>id</th><th>radius</th>'
            "<th>label</th><th class=\"l\">reason</th><th>s</th><th>slack &ge;</th><th>slack &le;</th>"
            "<th class=\"l\">outputs at the nearest miss</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _divergence_html(run: Run) -> str:
    """The instances whose box holds a point where onnxruntime and the executor differ."""
    out = [f"<p>{esc(semantics_text(run))}.</p>"]
    warned = _warned(run)
    if not checked_runtime(run):
        return out[0]
    if not warned:
        return out[0] + "<p>onnxruntime agreed with the executor on every point checked.</p>"
    robust = sum(r["verdict"] == "robust" for r in warned)
    out.append(f'<p class="note">onnxruntime differs from the executor inside the box of {len(warned)} instances, '
               f"{robust} of them <b>robust</b>: those proofs hold for the executor's function, not for what "
               "onnxruntime computes on this machine.</p>")
    rows = []
    for r in warned[:500]:
        d = (r.get("details") or {}).get("divergence") or {}
        ex = d.get("example") or {}
        rows.append(f'<tr><td>{r["id"]}</td><td>{r["radius"]}</td><td class="l v-{esc(r["verdict"])}">'
                    f'{esc(r["verdict"])}</td><td>{esc(d.get("differing"))} / {esc(d.get("checked"))}</td>'
                    f'<td>{esc(d.get("classes_differing"))}</td>'
                    f'<td class="l">{esc(" ".join(map(str, ex.get("executor") or [])))}</td>'
                    f'<td class="l">{esc(" ".join(map(str, ex.get("runtime") or [])))}</td>'
                    f'<td class="l">{esc(d.get("cause") or "not identified")}</td></tr>')
    more = f"<p>({len(warned) - 500} more in the results file.)</p>" if len(warned) > 500 else ""
    out.append(f'<table class="divergence" id="divergence-{esc(run.label)}"><thead><tr><th>id</th><th>radius</th>'
               "<th class=\"l\">verdict</th><th>points differing / checked</th><th>of which another class</th>"
               "<th class=\"l\">executor outputs (example)</th><th class=\"l\">onnxruntime outputs</th>"
               "<th class=\"l\">likely cause</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>" + more)
    return "\n".join(out)


def _per_sample_table(run: Run) -> str:
    radii = sorted({r["radius"] for r in run.records})
    by: dict[int, dict[int, dict]] = {}
    for r in run.records:
        by.setdefault(int(r["id"]), {})[int(r["radius"])] = r
    head = ('<th>id</th><th>label</th><th>prediction</th>'
            + "".join(f"<th>r = {rad}</th>" for rad in radii))
    rows = []
    for i in sorted(by):
        recs = by[i]
        any_rec = next(iter(recs.values()))
        cells = []
        for rad in radii:
            r = recs.get(rad)
            if r is None:
                cells.append("<td>-</td>")
                continue
            tip = f"{r['verdict']} by {r.get('method')} in {sec(r.get('seconds'))} s"
            if r.get("reason"):
                tip += f" ({r['reason']})"
            sl = _slack_of(r)
            if sl:
                tip += f"; least slack in {_bracket_text(sl)}"
            warn = (r.get("details") or {}).get("warning")
            if warn:
                tip += f"; warning: {warn}"
            mark = ' <span class="warn">&#9888;</span>' if warn else ""
            cells.append(f'<td class="l v-{esc(r["verdict"])}" title="{esc(tip)}">'
                         f"{esc(VERDICT_SHORT.get(r['verdict'], r['verdict']))}{mark}</td>")
        rows.append(f'<tr><td>{i}</td><td>{any_rec["label"]}</td><td>{any_rec["prediction"]}</td>{"".join(cells)}</tr>')
    return (f'<table class="per-sample" id="per-sample-{esc(run.label)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _repro(run: Run) -> str:
    h = run.header
    m, d = h.get("model", {}), h.get("data", {})
    sel = h.get("selection") or {}
    if sel.get("sample") is not None:
        how = f"random sample of {sel['sample']} ids, seed {sel.get('seed')}"
    elif sel.get("ids") is not None:
        how = f"{len(sel['ids'])} given ids"
    else:
        how = f"all {d.get('n_samples')} samples"
    facts = [("results file", run.path), ("results file sha256 (valid part)", run.sha256),
             ("created", h.get("created")), ("command", h.get("command") or "(not recorded)"),
             ("model", m.get("name")), ("model file", m.get("path")), ("model file sha256", m.get("file_sha256")),
             ("network sha256 (native serialization)", m.get("network_sha256")),
             ("input", f"shape {m.get('input_shape')}, integer grid {m.get('input_grid')}, real = "
                       f"{m.get('input_scale')} * (x - {m.get('input_zero_point')})"),
             ("argmax ties", m.get("tie_rule")), ("semantics", semantics_text(run)),
             ("data file", d.get("path")), ("data sha256", d.get("sha256")),
             ("samples", how), ("radii", h.get("radii")), ("seed", h.get("seed"))]
    rows = "".join(f'<tr><th class="l">{esc(k)}</th><td class="l"><code>{esc(v)}</code></td></tr>' for k, v in facts)
    vers = "".join(f'<tr><th class="l">{esc(k)}</th><td class="l">{esc(v)}</td></tr>'
                   for k, v in (h.get("versions") or {}).items())
    sess = [s for s in run.file.sessions if s["type"] == "session"]
    srows = "".join(f'<tr><td class="l">{esc(s.get("started"))}</td><td class="l"><code>{esc(s.get("command"))}'
                    f'</code></td><td>{esc(s.get("instances"))}</td><td>{esc(s.get("already_done"))}</td>'
                    f'<td class="l">{esc(s.get("ray_address") or s.get("workers"))}</td>'
                    f'<td class="l">{esc(s.get("repaired") or "")}</td></tr>' for s in sess)
    notes = ""
    if run.file.truncated:
        notes += f'<p class="note">{esc(run.file.truncated)} (ignored in this report).</p>'
    if run.file.duplicates:
        notes += f'<p class="note">{run.file.duplicates} duplicate records ignored (first one kept).</p>'
    return (f'<table class="repro">{rows}</table><h4>Settings</h4><pre>'
            f"{esc(json.dumps(h.get('settings'), indent=1))}</pre><h4>Versions</h4><table>{vers}</table>"
            f"<h4>Runs of the command</h4><table><thead><tr><th>started</th><th>command</th><th>instances</th>"
            f"<th>already done</th><th>workers / Ray</th><th>recovered</th></tr></thead><tbody>{srows}</tbody></table>"
            f"{notes}")


def html_report(runs: list[Run], svgs: dict[str, bytes], max_pictures: int = 100, title: str | None = None,
                quant: tuple[list, list[str]] | None = None) -> str:
    """The HTML page; ``quant`` (:func:`qverify.report.quantization.quant_rows` of ``runs``, with ``svgs["bits"]``)
    adds the comparison by method and bit width."""
    names = ", ".join(str(r.header["model"].get("name")) for r in runs)
    title = title or f"Certification report: {names}"
    parts = [f"<h1>{esc(title)}</h1>"]
    parts.append("<p>Local robustness of each sample at each L&infin; radius (integer input units) of the "
                 "quantized network, decided bit-exactly on its integer semantics: <b>robust</b> is a proof, a "
                 "<b>counterexample</b> is an input of the box that the integer executor misclassifies, "
                 "<b>unknown</b> carries its reason (e.g. timeout). Samples the network already misclassifies are "
                 "counted as misclassified at every radius and not verified. Certified accuracy = robust / samples."
                 "</p>")
    parts.append('<h2 id="runs">Runs</h2><table><thead><tr><th>run</th><th class="l">model</th>'
                 '<th class="l">results file</th><th>instances</th></tr></thead><tbody>'
                 + "".join(f'<tr><td>{esc(r.label)}</td><td class="l model-name">{esc(r.header["model"].get("name"))}'
                           f'</td><td class="l"><code>{esc(r.path)}</code></td><td>{len(r.records)}</td></tr>'
                           for r in runs) + "</tbody></table>")
    for r in runs:
        if r.file.truncated:
            parts.append(f'<p class="note">{esc(r.file.truncated)}</p>')
    parts.append('<h2 id="summary">Summary per radius</h2>')
    for r in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{esc(r.label)}: {esc(r.header['model'].get('name'))}</h3>")
        parts.append(_summary_table(r, f"summary-{r.label}"))
    if len(runs) > 1:
        parts.append('<h2 id="comparison-section">Comparison</h2>')
        parts.append(_comparison_html(runs, _comparison(runs)))
    if quant is not None:
        from qverify.report import quantization

        parts.append(quantization.quantization_html(*quant, _svg_img(
            svgs["bits"], "certified accuracy vs bit width", "plot-bits")))
    parts.append('<h2 id="accuracy">Certified accuracy vs radius</h2>')
    parts.append(_svg_img(svgs["accuracy"], "certified accuracy vs radius", "plot-accuracy"))
    parts.append('<h2 id="times">Time distribution</h2>')
    parts.append(_svg_img(svgs["times"], "time distribution", "plot-times"))
    parts.append('<h2 id="counterexamples">Counterexamples</h2>')
    for r in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{esc(r.label)}: {esc(r.header['model'].get('name'))}</h3>")
        parts.append(_cex_figures(r, max_pictures))
    parts.append('<h2 id="unknown">Undecided instances</h2>'
                 "<p>Each <b>unknown</b> instance with what is known of its least <i>slack</i> over the input box, "
                 "<code>min_d max_k (A_d y - b_d)_k</code> of the property's unsafe region <code>OR_d A_d y &le; "
                 "b_d</code>: a violation is slack &le; 0, robustness is slack &ge; 1 everywhere. The lower end is "
                 "proved by the symbolic bounds; the upper end is the exact slack of the nearest miss the attack "
                 "evaluated (for a robustness property, <code>y_c - y_j</code> plus 1 when the tie goes to the "
                 "label).</p>")
    parts += _per_run(runs, _unknown_table)
    parts.append('<h2 id="divergence">Runtime divergence</h2>'
                 "<p>For a model imported from ONNX, the points of each instance's box checked on onnxruntime: where "
                 "an integer output differs from the executor's, the verdict is about another function than the one "
                 "onnxruntime computes here (marked &#9888; in the per-sample table).</p>")
    parts += _per_run(runs, _divergence_html)
    parts.append('<h2 id="per-sample">Per-sample verdicts</h2>')
    for r in runs:
        parts.append(f"<details{' open' if len(r.records) <= 400 else ''}><summary>{esc(r.label)}: "
                     f"{esc(r.header['model'].get('name'))} ({len(r.records)} instances)</summary>"
                     f"{_per_sample_table(r)}</details>")
    parts.append('<h2 id="reproducibility">Reproducibility</h2>')
    for r in runs:
        parts.append(f"<h3>{esc(r.label)}: {esc(r.header['model'].get('name'))}</h3>{_repro(r)}")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


# ------------------------------------------------------------------------------------------------ Markdown
def markdown_report(runs: list[Run], title: str | None = None, quant: tuple[list, list[str]] | None = None) -> str:
    """The Markdown report; ``quant`` as for :func:`html_report`."""
    names = ", ".join(str(r.header["model"].get("name")) for r in runs)
    out = [f"# {md(title or 'Certification report: ' + names)}", ""]
    for r in runs:
        h = r.header
        out += [f"## {md(r.label)}: {md(h['model'].get('name'))}", "",
                f"Results file `{md(r.path)}`; model sha256 {md(h['model'].get('file_sha256') or '-')}, network "
                f"sha256 {md(h['model'].get('network_sha256'))}; data {md(h['data'].get('path'))} "
                f"(sha256 {md(h['data'].get('sha256'))}); radii {md(h.get('radii'))}; seed {md(h.get('seed'))}.", ""]
        if r.file.truncated:
            out += [f"Note: {md(r.file.truncated)}.", ""]
        fields = summary_fields(r)
        out += [f"Semantics: {md(semantics_text(r))}.", ""]
        out.append("| " + " | ".join(t for _, t in fields) + " |")
        out.append("|" + "---|" * len(fields))
        for row in r.rows:
            out.append("| " + " | ".join(_cell(k, row[k]) for k, _ in fields) + " |")
        out.append("")
        warned = _warned(r)
        if warned:
            robust = sum(x["verdict"] == "robust" for x in warned)
            out += [f"Warning: onnxruntime differs from the executor inside the box of {len(warned)} instances "
                    f"({robust} robust: those proofs hold for the executor's function, not for onnxruntime's): "
                    + ", ".join(f"{x['id']}@r{x['radius']} ({md(x['verdict'])}, "
                                f"{md((x['details'].get('divergence') or {}).get('differing'))}/"
                                f"{md((x['details'].get('divergence') or {}).get('checked'))} points)"
                                for x in warned[:200])
                    + (" ..." if len(warned) > 200 else ""), ""]
        cex = sorted((x for x in r.records if x["verdict"] == "counterexample"), key=lambda x: (x["radius"], x["id"]))
        if cex:
            out += [f"Counterexamples ({len(cex)}): "
                    + ", ".join(f"{x['id']}@r{x['radius']}" for x in cex[:200])
                    + (" ..." if len(cex) > 200 else ""), ""]
        unk = _unknowns(r)
        if unk:
            out += [f"Undecided ({len(unk)}; least slack over the box, a violation is <= 0): "
                    + ", ".join(f"{x['id']}@r{x['radius']} {_bracket_text(_slack_of(x) or {})}" for x in unk[:200])
                    + (" ..." if len(unk) > 200 else ""), ""]
        out += [f"Command: `{md(h.get('command') or '(not recorded)')}`", "",
                "Versions: " + ", ".join(f"{md(k)} {md(v)}" for k, v in (h.get("versions") or {}).items()), "",
                f"Settings: {md(json.dumps(h.get('settings')))}", ""]
    if len(runs) > 1:
        comp = _comparison(runs)
        labels = [r.label for r in runs]
        out += ["## Comparison: certified accuracy", "",
                "| radius | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for row in comp["per_radius"]:
            out.append(f"| {row['radius']} | " + " | ".join(
                pct(row[lab]["certified_accuracy"]) if row[lab] else "-" for lab in labels) + " |")
        out += ["", f"Verdicts differ on {len(comp['differences'])} of {comp['common_instances']} common instances.",
                ""]
        if quant is not None:
            from qverify.report import quantization

            out += [quantization.quantization_markdown(*quant)]
    out += ["![certified accuracy vs radius](plots/accuracy.svg)", "", "![time distribution](plots/times.svg)", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ entry point
_RESULT_NAME = re.compile(r"\d+_r\d+\.txt")


def write_vnncomp_files(runs: list[Run], results_dir: Path) -> list[Path]:
    """One VNN-COMP result file per instance record (see the module docstring for the layout).

    Files named like result files (``<id>_r<radius>.txt``) left in those directories by an earlier report are
    removed first, so the directory holds exactly this report's instances.
    """
    paths = []
    for run in runs:
        d = results_dir if len(runs) == 1 else results_dir / f"{run.label}_{_safe_stem(run.path.stem)}"
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*_r*.txt"):  # result files of an earlier report in the same place
            if _RESULT_NAME.fullmatch(stale.name):
                stale.unlink()
        for rec in run.records:
            p = d / f"{int(rec['id'])}_r{int(rec['radius'])}.txt"
            p.write_text(vnncomp_text(run.header, rec))
            paths.append(p)
    return paths


def render_report(results_paths: list[str | Path], out_dir: str | Path, max_pictures: int = 100,
                  title: str | None = None) -> dict[str, Path]:
    """Render the report of one results file, or the comparison of several, into ``out_dir``.

    Returns the paths written: ``html``, ``markdown``, ``summary`` (JSON), ``results`` (the directory of VNN-COMP
    files), ``accuracy_svg``, ``times_svg``; with two or more runs whose networks carry quantization records, the
    side-by-side table by method and bit width and ``bits_svg`` (:mod:`qverify.report.quantization`); with
    ``qverify smooth`` results files among them, a randomized-smoothing
    section (:mod:`qverify.report.smoothing`) and ``smoothing_svg`` (only smoothing files: a smoothing report).
    """
    from qverify.report import smoothing

    smooth_paths = [p for p in results_paths if smoothing.is_smoothing(p)]
    sruns = smoothing.load_smoothing(smooth_paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sruns:
        ssvg = plots.smoothing_plot([(f"{r.label}: sigma {r.header['sigma']:g}"
                                      + (", incremental" if r.header.get("reuse") else ""), r.curve()) for r in sruns])
        (out / "plots").mkdir(exist_ok=True)
        (out / "plots" / "smoothing.svg").write_bytes(ssvg)
        simg = _svg_img(ssvg, "certified accuracy vs l2 radius", "plot-smoothing")
        if len(smooth_paths) == len(results_paths):
            paths = {"html": out / "report.html", "markdown": out / "report.md", "summary": out / "summary.json",
                     "results": out / "results", "smoothing_svg": out / "plots" / "smoothing.svg"}
            paths["results"].mkdir(exist_ok=True)
            paths["summary"].write_text(json.dumps({"format": "qverify-certify-summary", "runs": [],
                                                    "smoothing": smoothing.smoothing_json(sruns)}, indent=1,
                                                   default=str))
            paths["html"].write_text(smoothing.standalone_html(sruns, simg, CSS, title), encoding="utf-8")
            paths["markdown"].write_text(smoothing.standalone_markdown(sruns, title), encoding="utf-8")
            return paths
    runs = load_runs([p for p in results_paths if p not in smooth_paths])
    single = len(runs) == 1
    svgs = {"accuracy": plots.accuracy_plot([("" if single else r.label, r.rows) for r in runs]),
            "times": plots.time_plot([("" if single else r.label, r.records) for r in runs])}
    from qverify.report import quantization

    qrows, qmissing = quantization.quant_rows(runs)
    quant = (qrows, qmissing) if len(qrows) > 1 else None  # several quantized models: the table and the bits plot
    if quant is not None:
        svgs["bits"] = plots.bits_plot(quantization.plot_series(qrows))
    (out / "plots").mkdir(exist_ok=True)
    for k, v in svgs.items():
        (out / "plots" / f"{k}.svg").write_bytes(v)
    summary = summary_json(runs)
    paths = {"html": out / "report.html", "markdown": out / "report.md", "summary": out / "summary.json",
             "results": out / "results", "accuracy_svg": out / "plots" / "accuracy.svg",
             "times_svg": out / "plots" / "times.svg"}
    if quant is not None:
        summary["quantization"] = quantization.quantization_json(qrows, qmissing)
        paths["bits_svg"] = out / "plots" / "bits.svg"
    page, text = html_report(runs, svgs, max_pictures, title, quant), markdown_report(runs, title, quant)
    if sruns:  # the smoothing section after the certification report
        summary["smoothing"] = smoothing.smoothing_json(sruns)
        paths["smoothing_svg"] = out / "plots" / "smoothing.svg"
        page = page.replace("\n</body></html>", "\n" + smoothing.smoothing_html(sruns, simg) + "\n</body></html>")
        text += "\n" + smoothing.smoothing_markdown(sruns)
    paths["summary"].write_text(json.dumps(summary, indent=1, default=str))
    paths["html"].write_text(page, encoding="utf-8")
    paths["markdown"].write_text(text, encoding="utf-8")
    write_vnncomp_files(runs, paths["results"])
    return paths
