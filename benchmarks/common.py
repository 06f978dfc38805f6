"""Shared helpers of the benchmark scripts: paths to ../shared, timing, table printing, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
QVIP = SHARED / "anchors" / "qvip"
QVIP_NETS = QVIP / "S3L-official_QVIP" / "QNN_benchmark"
P1_6 = QVIP_NETS / "mnist_mlp.h5"
MNIST1000 = SHARED / "data" / "mnist_test_first1000.npz"
OUT = ROOT / "benchmarks" / "out"


def median_time(fn: Callable[[], object], repeats: int = 7) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).ljust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_json(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"machine": platform.platform(), "python": platform.python_version(), **payload}
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def certify_counts(records: list[dict], radii: list[int]) -> list[dict]:
    """Per radius: instances, clean (not misclassified), certified, counterexample and unknown counts of
    ``certify``'s records."""
    rows = []
    for r in radii:
        recs = [rec for rec in records if rec["radius"] == r]
        cnt = {v: sum(rec["verdict"] == v for rec in recs) for v in
               ("robust", "counterexample", "unknown", "misclassified")}
        rows.append({"r": r, "n": len(recs), "clean": len(recs) - cnt["misclassified"], "certified": cnt["robust"],
                     "counterexample": cnt["counterexample"], "unknown": cnt["unknown"]})
    return rows
