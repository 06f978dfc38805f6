"""The randomized-smoothing section of a report, from ``qverify smooth`` results files (:mod:`qverify.smooth`).

One *smoothing run* per results file (one model at one sigma): the certified accuracy against the l2 radius (one
curve per run, :func:`qverify.report.plots.smoothing_plot`), and the table of each run's figures: samples,
abstentions, clean accuracy of the smoothed classifier, certified accuracy at :data:`TABLE_RADII`, the average
certified radius (ACR), how many samples were certified incrementally or fell back to a full run, and the time.
Every figure is computed from the records by :func:`qverify.smooth.summarize_smoothing`. Text taken from the files
is escaped as in :mod:`qverify.report.render`.

A mixed-precision search (``qverify mixed-precision`` output directory, or its ``trace.json``;
:mod:`qverify.mixed_precision`) is one smoothing run too: the chosen model's certificate (``certificate.jsonl``)
in the curve and the table, and below them the search: every candidate's BitOps against its search ACR (a scatter
plot in the style of :mod:`qverify.report.plots`, the chosen candidate marked, the budget a vertical line) and the
table of candidates (widths, BitOps, reward, ACR, base accuracy, time).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from qverify.report.text import esc, md, pct
from qverify.smooth import SmoothResults, is_smooth_results, read_smooth_results, summarize_smoothing

#: the radii of the table (l2, real input units)
TABLE_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class SmoothRun:
    """One smoothing results file in a report."""

    label: str
    path: Path
    file: SmoothResults
    sha256: str
    #: the search trace when the run is a mixed-precision search's certificate (``None``: a plain smoothing run)
    search: dict | None = None
    search_path: Path | None = None

    @property
    def header(self) -> dict:
        return self.file.header or {}

    def summary(self) -> dict:
        return summarize_smoothing(self.file.records, TABLE_RADII)

    def curve(self) -> list[float]:
        """Per sample: its certified radius when certified for its label, else ``-1``."""
        return [float(r["radius"]) if r.get("correct") and r.get("radius") is not None else -1.0
                for r in self.file.records]

    def title(self) -> str:
        h = self.header
        return (f"{h['model'].get('name')}, sigma {h.get('sigma'):g}" + (" (incremental)" if h.get("reuse") else "")
                + (" (mixed-precision search)" if self.search else ""))


def _trace_path(path: str | Path) -> Path | None:
    """The ``trace.json`` of a mixed-precision search directory or file, else ``None``."""
    from qverify.mixed_precision import TRACE, TRACE_FORMAT

    p = Path(path)
    t = p / TRACE if p.is_dir() else p
    try:
        if t.suffix == ".json" and t.is_file():
            with open(t, "rb") as f:
                if TRACE_FORMAT.encode() in f.read(200):
                    return t
    except OSError:
        return None
    return None


def is_search(path: str | Path) -> bool:
    """Whether ``path`` is a ``qverify mixed-precision`` output directory or its ``trace.json``."""
    return _trace_path(path) is not None


def is_smoothing(path: str | Path) -> bool:
    """Whether ``path`` is a ``qverify smooth`` results file or a mixed-precision search."""
    return is_search(path) or is_smooth_results(path)


def load_smoothing(paths: list[str | Path], first_label: int = 0) -> list[SmoothRun]:
    """Read smoothing results files and searches (labels ``S1``, ``S2``, ...; a truncated last line is ignored
    and noted). A search needs its ``certificate.jsonl`` (written when the search has finished)."""
    from qverify.mixed_precision import read_trace

    runs = []
    for k, p in enumerate(paths):
        p = Path(p)
        trace, tpath = None, _trace_path(p)
        if tpath is not None:
            trace = read_trace(tpath)
            cert = tpath.parent / "certificate.jsonl"
            if not cert.exists() or "chosen" not in trace:
                raise ValueError(f"{tpath}: the search has not finished (no chosen candidate / {cert.name} yet); "
                                 f"re-run qverify mixed-precision to finish it")
            p = cert
        f = read_smooth_results(p)
        if f.header is None:
            raise ValueError(f"{p}: no header record (empty smoothing results file?)")
        runs.append(SmoothRun(f"S{first_label + k + 1}", p, f, hashlib.sha256(p.read_bytes()[:f.valid_bytes])
                              .hexdigest(), trace, tpath))
    return runs


# ------------------------------------------------------------------------------------------------ searches
_SEARCH_COLUMNS = ("", "candidate", "weight bits", "activation bits", "BitOps", "reward", "ACR", "base accuracy",
                   "seconds")


def _search_rows(run: SmoothRun) -> list[list[str]]:
    t = run.search or {}
    chosen = t.get("chosen")
    rows = []
    for e in sorted(t.get("candidates", []), key=lambda e: (e["bitops"], e["key"])):
        rows.append(["chosen" if e["key"] == chosen else "", e["key"], " ".join(map(str, e["weight_bits"])),
                     " ".join(map(str, e["act_bits"])), str(e["bitops"]), _num(e.get("reward")), _num(e.get("acr")),
                     pct(e.get("accuracy")), f"{e.get('seconds', 0.0):.3g}"])
    return rows


def search_plot(run: SmoothRun) -> bytes:
    """SVG: BitOps (log scale) against the search ACR of every candidate, the chosen one marked, the budget a
    dashed vertical line (the style of :mod:`qverify.report.plots`)."""
    from qverify.report.plots import COLOURS, _figure, _svg

    t = run.search or {}
    pts = [(e["bitops"], e.get("acr") if e.get("acr") is not None else e["reward"]) for e in t.get("candidates", [])]
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=COLOURS[0], alpha=0.7, label="candidates")
    ch = [e for e in t.get("candidates", []) if e["key"] == t.get("chosen")]
    if ch:
        e = ch[0]
        ax.scatter([e["bitops"]], [e.get("acr") if e.get("acr") is not None else e["reward"]], s=90, marker="*",
                   color=COLOURS[1], zorder=3, label="chosen")
    b = t.get("budget_bitops") or (t.get("identity") or {}).get("budget")
    if b:
        ax.axvline(b, color="#7f7f7f", linestyle="--", linewidth=1, label="budget")
    if pts and min(p[0] for p in pts) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("BitOps (sum of MACs x weight bits x input activation bits)")
    ax.set_ylabel("ACR (search samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _svg(fig)


def _search_img(run: SmoothRun) -> str:
    uri = "data:image/svg+xml;base64," + base64.b64encode(search_plot(run)).decode("ascii")
    return (f'<div class="plot"><img id="plot-search-{esc(run.label)}" src="{uri}" '
            f'alt="BitOps against ACR of the search candidates"></div>')


def _search_intro(run: SmoothRun) -> str:
    t = run.search or {}
    idn = t.get("identity") or {}
    return (f"{run.label}: {t.get('search')} search over widths {t.get('allowed_bits')} under a budget of "
            f"{t.get('budget_bitops')} BitOps; reward {idn.get('reward')}; each candidate fine-tuned "
            f"{idn.get('finetune_epochs')} epoch(s) with Gaussian noise (0: post-training quantization) and smoothed "
            f"on {idn.get('images')} samples with n = {idn.get('n')}; {len(t.get('candidates', []))} candidates. "
            f"The chosen candidate's certificate (n = {run.header.get('n')}) is the run's row above.")


def _search_html(run: SmoothRun) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in _SEARCH_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in _search_rows(run))
    return (f'<h3 id="search-{esc(run.label)}">Mixed-precision search ({esc(run.label)})</h3>'
            f"<p>{esc(_search_intro(run))} Trace: <code>{esc(run.search_path)}</code>.</p>{_search_img(run)}"
            f'<table class="search-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def _search_markdown(run: SmoothRun) -> list[str]:
    out = [f"### Mixed-precision search ({md(run.label)})", "", md(_search_intro(run)) + f" Trace: "
           f"`{md(run.search_path)}`.", "", "| " + " | ".join(_SEARCH_COLUMNS) + " |",
           "|" + "---|" * len(_SEARCH_COLUMNS)]
    out += ["| " + " | ".join(md(v) for v in row) + " |" for row in _search_rows(run)]
    return [*out, ""]


def _search_json(run: SmoothRun) -> dict | None:
    if not run.search:
        return None
    t = run.search
    return {"trace": str(run.search_path), "search": t.get("search"), "chosen": t.get("chosen"),
            "budget_bitops": t.get("budget_bitops"), "identity": t.get("identity"),
            "points": [{k: e.get(k) for k in ("key", "weight_bits", "act_bits", "bitops", "reward", "acr",
                                              "accuracy", "seconds")} for e in t.get("candidates", [])]}


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _row(run: SmoothRun) -> list[str]:
    h, s = run.header, run.summary()
    inc = f"{s['incremental']} / {s['fallback']}" if h.get("reuse") else "-"
    return ([run.label, str(h["model"].get("name")), f"{h.get('sigma'):g}", str(h.get("n0")), str(h.get("n")),
             f"{h.get('alpha'):g}", str(s["n"]), str(s["abstain"]), pct(s["clean_accuracy"])]
            + [pct(c["certified_accuracy"]) for c in s["certified"]]
            + [_num(s["acr"]), inc, f"{s['time_total']:.3g}"])


_COLUMNS = (["run", "model", "sigma", "n0", "n", "alpha", "samples", "abstain", "clean acc"]
            + [f"cert acc r={r:g}" for r in TABLE_RADII] + ["ACR", "incremental / fallback", "seconds"])

INTRO = ("Randomized smoothing (Cohen, Rosenfeld, Kolter 2019) of the integer network: Gaussian noise of standard "
         "deviation sigma in the model's real input units, mapped to the integer grid by the model's input "
         "quantizer; the base classifier is the bit-exact integer network. A sample is certified at l2 radius r "
         "when CERTIFY returns its label with radius sigma * Phi^-1(p_A) &ge; r (p_A: Clopper-Pearson lower bound, "
         "each certificate wrong with probability at most alpha; incremental ones (Ugare et al. 2024) at most "
         "alpha + alpha_zeta). ACR: the average certified radius (0 for abstentions and wrong classes).")


def smoothing_html(runs: list[SmoothRun], svg_img: str) -> str:
    """The HTML section: intro, the curve (``svg_img``: an ``<img>`` tag the caller built), the table, the facts."""
    head = "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS)
    cls = {1: ' class="l model-name"'}
    body = "".join("<tr>" + "".join(f"<td{cls.get(i, '')}>{esc(v)}</td>" for i, v in enumerate(_row(r)))
                   + "</tr>" for r in runs)
    facts = []
    for r in runs:
        h = r.header
        reuse = h.get("reuse") or {}
        facts.append(f"<li><b>{esc(r.label)}</b>: <code>{esc(r.path)}</code> (sha256 {esc(r.sha256[:16])}...), "
                     f"seed {esc(h.get('seed'))}; real units {esc(h.get('real_units'))}; quantizer: "
                     f"{esc(h.get('quantizer'))}"
                     + (f"; incremental from <code>{esc(reuse.get('path'))}</code> (n_p {esc(reuse.get('n_p'))}, "
                        f"alpha_zeta {esc(reuse.get('alpha_zeta'))})" if reuse else "")
                     + f"; command <code>{esc(h.get('command') or '(not recorded)')}</code>"
                     + (f' <span class="note">{esc(r.file.truncated)}</span>' if r.file.truncated else "")
                     + "</li>")
    return (f'<h2 id="smoothing">Randomized smoothing</h2><p>{INTRO}</p>{svg_img}'
            f'<table id="smoothing-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f"<ul>{''.join(facts)}</ul>" + "".join(_search_html(r) for r in runs if r.search))


def smoothing_markdown(runs: list[SmoothRun]) -> str:
    """The Markdown section (links ``plots/smoothing.svg``)."""
    out = ["## Randomized smoothing", "", INTRO.replace("&ge;", ">="), "",
           "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    out += ["| " + " | ".join(md(v) for v in _row(r)) + " |" for r in runs]
    out.append("")
    for r in runs:
        h = r.header
        out += [f"{md(r.label)}: `{md(r.path)}`; quantizer: {md(h.get('quantizer'))}; command "
                f"`{md(h.get('command') or '(not recorded)')}`", ""]
    out += ["![certified accuracy vs l2 radius](plots/smoothing.svg)", ""]
    for r in runs:
        if r.search:
            out += _search_markdown(r)
    return "\n".join(out)


def smoothing_json(runs: list[SmoothRun]) -> list[dict]:
    """Every figure of the section, per run."""
    return [{"label": r.label, "results_file": str(r.path), "results_sha256": r.sha256,
             "model": {k: r.header["model"].get(k) for k in ("name", "path", "file_sha256", "network_sha256")},
             **{k: r.header.get(k) for k in ("sigma", "n0", "n", "alpha", "seed", "quantizer", "reuse", "command")},
             "summary": r.summary(), "truncated_last_line": r.file.truncated,
             **({"mixed_precision": _search_json(r)} if r.search else {})}
            for r in runs]


def standalone_html(runs: list[SmoothRun], svg_img: str, css: str, title: str | None = None) -> str:
    """A report of smoothing runs only."""
    t = title or "Randomized smoothing report: " + ", ".join(str(r.header["model"].get("name")) for r in runs)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(t)}</title>'
            f"<style>{css}</style></head>\n<body>\n<h1>{esc(t)}</h1>\n{smoothing_html(runs, svg_img)}\n"
            f"</body></html>\n")


def standalone_markdown(runs: list[SmoothRun], title: str | None = None) -> str:
    t = title or "Randomized smoothing report: " + ", ".join(str(r.header["model"].get("name")) for r in runs)
    return f"# {md(t)}\n\n{smoothing_markdown(runs)}"


__all__ = ["SmoothRun", "TABLE_RADII", "is_search", "is_smoothing", "load_smoothing", "search_plot", "smoothing_html",
           "smoothing_json", "smoothing_markdown", "standalone_html", "standalone_markdown"]
