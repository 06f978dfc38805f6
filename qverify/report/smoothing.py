"""The randomized-smoothing section of a report, from ``qverify smooth`` results files (:mod:`qverify.smooth`).

One *smoothing run* per results file (one model at one sigma): the certified accuracy against the l2 radius (one
curve per run, :func:`qverify.report.plots.smoothing_plot`), and the table of each run's figures: samples,
abstentions, clean accuracy of the smoothed classifier, certified accuracy at :data:`TABLE_RADII`, the average
certified radius (ACR), how many samples were certified incrementally or fell back to a full run, and the time.
Every figure is computed from the records by :func:`qverify.smooth.summarize_smoothing`. Text taken from the files
is escaped as in :mod:`qverify.report.render`.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from pathlib import Path

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
        return f"{h['model'].get('name')}, sigma {h.get('sigma'):g}" + (" (incremental)" if h.get("reuse") else "")


def is_smoothing(path: str | Path) -> bool:
    """Whether ``path`` is a ``qverify smooth`` results file."""
    return is_smooth_results(path)


def load_smoothing(paths: list[str | Path], first_label: int = 0) -> list[SmoothRun]:
    """Read smoothing results files (labels ``S1``, ``S2``, ...; a truncated last line is ignored and noted)."""
    runs = []
    for k, p in enumerate(paths):
        p = Path(p)
        f = read_smooth_results(p)
        if f.header is None:
            raise ValueError(f"{p}: no header record (empty smoothing results file?)")
        runs.append(SmoothRun(f"S{first_label + k + 1}", p, f, hashlib.sha256(p.read_bytes()[:f.valid_bytes])
                              .hexdigest()))
    return runs


def _esc(v: object) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _md(v: object) -> str:
    s = html.escape("" if v is None else str(v), quote=False)
    s = re.sub(r"[\r\n]+", " ", s)
    return re.sub(r"([\\`*_\[\]|#!{}])", r"\\\1", s)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _row(run: SmoothRun) -> list[str]:
    h, s = run.header, run.summary()
    inc = f"{s['incremental']} / {s['fallback']}" if h.get("reuse") else "-"
    return ([run.label, str(h["model"].get("name")), f"{h.get('sigma'):g}", str(h.get("n0")), str(h.get("n")),
             f"{h.get('alpha'):g}", str(s["n"]), str(s["abstain"]), _pct(s["clean_accuracy"])]
            + [_pct(c["certified_accuracy"]) for c in s["certified"]]
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
    head = "".join(f"<th>{_esc(c)}</th>" for c in _COLUMNS)
    cls = {1: ' class="l model-name"'}
    body = "".join("<tr>" + "".join(f"<td{cls.get(i, '')}>{_esc(v)}</td>" for i, v in enumerate(_row(r)))
                   + "</tr>" for r in runs)
    facts = []
    for r in runs:
        h = r.header
        reuse = h.get("reuse") or {}
        facts.append(f"<li><b>{_esc(r.label)}</b>: <code>{_esc(r.path)}</code> (sha256 {_esc(r.sha256[:16])}...), "
                     f"seed {_esc(h.get('seed'))}; real units {_esc(h.get('real_units'))}; quantizer: "
                     f"{_esc(h.get('quantizer'))}"
                     + (f"; incremental from <code>{_esc(reuse.get('path'))}</code> (n_p {_esc(reuse.get('n_p'))}, "
                        f"alpha_zeta {_esc(reuse.get('alpha_zeta'))})" if reuse else "")
                     + f"; command <code>{_esc(h.get('command') or '(not recorded)')}</code>"
                     + (f' <span class="note">{_esc(r.file.truncated)}</span>' if r.file.truncated else "")
                     + "</li>")
    return (f'<h2 id="smoothing">Randomized smoothing</h2><p>{INTRO}</p>{svg_img}'
            f'<table id="smoothing-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f"<ul>{''.join(facts)}</ul>")


def smoothing_markdown(runs: list[SmoothRun]) -> str:
    """The Markdown section (links ``plots/smoothing.svg``)."""
    out = ["## Randomized smoothing", "", INTRO.replace("&ge;", ">="), "",
           "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    out += ["| " + " | ".join(_md(v) for v in _row(r)) + " |" for r in runs]
    out.append("")
    for r in runs:
        h = r.header
        out += [f"{_md(r.label)}: `{_md(r.path)}`; quantizer: {_md(h.get('quantizer'))}; command "
                f"`{_md(h.get('command') or '(not recorded)')}`", ""]
    out += ["![certified accuracy vs l2 radius](plots/smoothing.svg)", ""]
    return "\n".join(out)


def smoothing_json(runs: list[SmoothRun]) -> list[dict]:
    """Every figure of the section, per run."""
    return [{"label": r.label, "results_file": str(r.path), "results_sha256": r.sha256,
             "model": {k: r.header["model"].get(k) for k in ("name", "path", "file_sha256", "network_sha256")},
             **{k: r.header.get(k) for k in ("sigma", "n0", "n", "alpha", "seed", "quantizer", "reuse", "command")},
             "summary": r.summary(), "truncated_last_line": r.file.truncated}
            for r in runs]


def standalone_html(runs: list[SmoothRun], svg_img: str, css: str, title: str | None = None) -> str:
    """A report of smoothing runs only."""
    t = title or "Randomized smoothing report: " + ", ".join(str(r.header["model"].get("name")) for r in runs)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_esc(t)}</title>'
            f"<style>{css}</style></head>\n<body>\n<h1>{_esc(t)}</h1>\n{smoothing_html(runs, svg_img)}\n"
            f"</body></html>\n")


def standalone_markdown(runs: list[SmoothRun], title: str | None = None) -> str:
    t = title or "Randomized smoothing report: " + ", ".join(str(r.header["model"].get("name")) for r in runs)
    return f"# {_md(t)}\n\n{smoothing_markdown(runs)}"


__all__ = ["SmoothRun", "TABLE_RADII", "is_smoothing", "load_smoothing", "smoothing_html", "smoothing_json",
           "smoothing_markdown", "standalone_html", "standalone_markdown"]
