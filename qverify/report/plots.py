"""Report plots as self-contained SVG (matplotlib without pyplot: no global backend, text drawn as paths).

* certified accuracy vs radius: certified accuracy (solid), and the "not falsified" upper bound
  ``(robust + unknown + error) / n`` (dotted), one colour per run; the gap between them is what is still unknown;
* time distribution: histogram of per-instance verification time (log-spaced bins, stacked by verdict) and the
  cactus plot (number of instances decided within time t), one line per run;
* randomized smoothing: certified accuracy vs l2 radius, one curve per smoothing run (model or sigma);
* certified accuracy vs bit width: one line per quantization method and radius (:mod:`qverify.report.quantization`).

Run labels in plots are short identifiers chosen by the report (``A``, ``B``), never text from model files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
VERDICT_COLOURS = {"robust": "#2ca02c", "counterexample": "#d62728", "unknown": "#ff7f0e", "error": "#7f7f7f"}


def _svg(fig) -> bytes:  # noqa: ANN001 - a matplotlib Figure
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "qverify"}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return buf.getvalue()


def _figure(w: float, h: float):  # noqa: ANN202
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100)


def accuracy_plot(runs: Sequence[tuple[str, list[dict]]]) -> bytes:
    """SVG of certified accuracy (%) vs radius; ``runs`` = ``[(label, summarize rows), ...]``."""
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    for k, (label, rows) in enumerate(runs):
        rows = [r for r in rows if r["n"]]
        if not rows:
            continue
        c = COLOURS[k % len(COLOURS)]
        r = [row["radius"] for row in rows]
        cert = [100 * row["robust"] / row["n"] for row in rows]
        upper = [100 * (row["n"] - row["counterexample"] - row["misclassified"]) / row["n"] for row in rows]
        name = f"{label}: " if label else ""
        ax.plot(r, cert, "-o", color=c, label=f"{name}certified")
        ax.plot(r, upper, ":", marker=".", color=c, label=f"{name}not falsified")
        ax.fill_between(r, cert, upper, color=c, alpha=0.12, linewidth=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("radius (integer input units, L-inf)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _svg(fig)


def time_plot(runs: Sequence[tuple[str, list[dict]]]) -> bytes:
    """SVG: histogram of verification times stacked by verdict (all runs pooled per run), and a cactus plot.

    ``runs`` = ``[(label, instance records), ...]``; misclassified instances (not verified) are left out.
    """
    fig = _figure(9.0, 3.4)
    ax_h, ax_c = fig.subplots(1, 2)
    all_t = [float(r["seconds"]) for _, recs in runs for r in recs if r["verdict"] != "misclassified"]
    if all_t:
        lo = max(min(all_t), 1e-5)
        hi = max(max(all_t), lo * 10)
        bins = np.logspace(math.floor(math.log10(lo)), math.ceil(math.log10(hi)), 25)
        multi = len(runs) > 1
        for k, (label, recs) in enumerate(runs):
            stacks, colours, names = [], [], []
            for v, c in VERDICT_COLOURS.items():
                ts = [max(float(r["seconds"]), lo) for r in recs if r["verdict"] == v]
                if ts:
                    stacks.append(ts)
                    colours.append(c)
                    names.append(f"{label}: {v}" if multi else v)
            if stacks:
                ax_h.hist(stacks, bins=bins, stacked=True, color=colours, label=names,
                          histtype="stepfilled" if not multi else "step", alpha=0.8 if not multi else 1.0,
                          linestyle="-" if k == 0 else "--", linewidth=1.2)
        ax_h.set_xscale("log")
        ax_h.set_xlabel("seconds per instance")
        ax_h.set_ylabel("instances")
        ax_h.legend(fontsize=7)
        for k, (label, recs) in enumerate(runs):
            ts = sorted(float(r["seconds"]) for r in recs if r["verdict"] in ("robust", "counterexample"))
            if ts:
                ax_c.step(np.maximum(ts, lo), np.arange(1, len(ts) + 1), where="post",
                          color=COLOURS[k % len(COLOURS)], label=label or "decided")
        ax_c.set_xscale("log")
        ax_c.set_xlabel("time limit t (s)")
        ax_c.set_ylabel("instances decided within t")
        ax_c.legend(fontsize=8)
    for ax in (ax_h, ax_c):
        ax.grid(alpha=0.3)
    return _svg(fig)


def smoothing_plot(runs: Sequence[tuple[str, list[float]]]) -> bytes:
    """SVG of randomized-smoothing certified accuracy (%) vs l2 radius, one step curve per run.

    ``runs`` = ``[(label, radii), ...]`` with one entry per sample: its certified radius when it is certified for
    its label, ``-1`` otherwise (abstained or wrong); the curve at ``r`` is the share of entries ``>= r``.
    """
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    top = max([max((r for r in radii), default=0.0) for _, radii in runs] + [0.25])
    grid = np.linspace(0.0, top * 1.05, 400)
    for k, (label, radii) in enumerate(runs):
        if not radii:
            continue
        a = np.asarray(radii, dtype=np.float64)
        ax.plot(grid, [100 * float(np.mean(a >= t)) for t in grid], "-", color=COLOURS[k % len(COLOURS)],
                label=label or "certified")
    ax.set_xlabel("radius (l2, real input units)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _svg(fig)


def bits_plot(series: Sequence[tuple[str, int, list[tuple[float, float]]]]) -> bytes:
    """SVG of certified accuracy (%) against the weight width (log2 axis), one line per ``(method series,
    radius)``: ``series = [(name, radius, [(weight bits, certified %), ...]), ...]``; one colour per method, one
    line style per radius. A series with two models at one width (the same method trained two ways) is drawn as
    points without a line."""
    fig = _figure(6.4, 3.8)
    ax = fig.subplots()
    names = sorted({s[0] for s in series})
    radii = sorted({s[1] for s in series})
    styles = ("-o", "--s", ":^", "-.d")
    ticks: set[float] = set()
    import matplotlib

    cmap = matplotlib.colormaps["tab20"] if len(names) > len(COLOURS) else None
    for name, rad, pts in series:
        if not pts:
            continue
        k = names.index(name)
        c = cmap(k % 20) if cmap is not None else COLOURS[k % len(COLOURS)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ticks.update(xs)
        style = styles[radii.index(rad) % len(styles)]
        if len(set(xs)) < len(xs):  # two models of one series at one width: points only (a line would join them)
            style = style.lstrip("-:.")
        ax.plot(xs, ys, style, color=c, label=f"{name}, r={rad}")
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(sorted(ticks))
        ax.set_xticklabels([f"{t:g}" for t in sorted(ticks)])
    ax.set_xlabel("weight bits (mean over layers)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _svg(fig)
