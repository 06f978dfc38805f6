"""The pure helpers of ``benchmarks/bench_table3.py``: slices, stage categories, summaries, the JSON-lines reader."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_table3 import (
    exact_outcomes,
    group_summary,
    ran_out,
    read_jsonl,
    slice_groups,
    stage_category,
    stage_split,
    time_split,
)
from benchmarks.qvip_anchor import Published


def _pub() -> dict[str, dict[tuple[int, int], Published]]:
    out = {}
    for n in ("P1-8", "P2-6", "P3-6"):
        d = {}
        for r, base in ((2, 100), (4, 300), (6, 500), (10, 900), (20, 1900)):
            for i in range(base, base + 10):
                d[(i, r)] = Published(i, r, "Robust", 1.0)
        out[n] = d
    return out


def test_slices() -> None:
    pub = _pub()
    g = slice_groups("grid", pub, ids_per_radius=3)
    assert ("P2-6", 4, [300, 301, 302]) in g
    assert all(r in (2, 4, 6, 10) and len(ids) == 3 for _, r, ids in g)
    assert {n for n, _, _ in g} == {"P1-8", "P2-6", "P3-6"}
    assert slice_groups("p1-8", pub) == [("P1-8", 10, list(range(900, 910)))]
    assert [(n, r) for n, r, _ in slice_groups("p2-6", pub)] == [("P2-6", 4), ("P2-6", 6)]
    full = slice_groups("full", pub, nets=["P3-6"])
    assert [r for _, r, _ in full] == [2, 4, 6, 10]  # r = 20 has ids >= 1000 only
    assert slice_groups("grid", pub, radii=[10], nets=["P3-6"]) == [("P3-6", 10, [900, 901, 902, 903, 904])]
    assert len(slice_groups("issue", pub)) == len(slice_groups("grid", pub)) + 3


STAGES = [["center", 0.01, "undecided"], ["interval", 0.01, "undecided"], ["symbolic", 0.1, "undecided"],
          ["attack", 0.5, "undecided"], ["bounds", 0.2, "tightened"], ["milp-scip-range-relaxed", 3.0, "timeout"],
          ["milp-cpsat-range", 2.0, "timeout"], ["milp", 5.0, "timeout"]]


def test_stage_categories() -> None:
    assert stage_category("bounds", []) == "symbolic"
    assert stage_category("milp", ["milp-scip-range-relaxed"]) == "exact"
    assert stage_category("milp", ["milp-scip-range-relaxed", "milp-cpsat-range"]) == "fallback"
    s = stage_split(STAGES, "milp-highs-range")
    assert abs(s["symbolic"] - 0.3) < 1e-12 and s["relaxed"] == 3.0 and s["exact"] == 2.0 and s["fallback"] == 5.0
    assert ran_out(STAGES, "milp-highs-range") == "relaxed+exact+fallback"
    assert exact_outcomes(STAGES) == "relaxed:timeout exact:timeout fallback:timeout"
    # decided by the relaxed program: its closing 'milp' stage is the relaxed one
    dec = [["attack", 0.5, "undecided"], ["bounds", 0.2, "tightened"], ["milp", 1.0, "robust"]]
    assert stage_split(dec, "milp-scip-range-relaxed")["relaxed"] == 1.0
    assert ran_out([{"stage": "attack", "seconds": 1.0, "outcome": "undecided"}]) == "attack:undecided"
    assert ran_out([]) == "-"
    # the reseeded attack rounds and the optimized bounds have their own categories, before the exact stages
    new = [["attack", 0.5, "undecided"], ["bounds", 0.2, "tightened"], ["attack-reseed", 0.7, "undecided"],
           ["optimized", 0.1, "tightened"], ["milp-scip-range-relaxed", 3.0, "timeout"], ["milp", 2.0, "robust"]]
    assert stage_category("attack-reseed", []) == "reseed" and stage_category("optimized", []) == "optimized"
    s = stage_split(new, "milp-cpsat-range")
    assert s["reseed"] == 0.7 and s["optimized"] == 0.1 and s["relaxed"] == 3.0 and s["exact"] == 2.0


def test_summaries(tmp_path: Path) -> None:
    rows = [{"verdict": "robust", "qvip": "Robust", "seconds": 1.0, "split": {"symbolic": 1.0}},
            {"verdict": "counterexample", "qvip": "Robust", "seconds": 2.0, "split": {"attack": 2.0}},
            {"verdict": "unknown", "qvip": "NA", "seconds": 20.0, "split": {"exact": 20.0}},
            {"verdict": "misclassified", "qvip": "NA", "seconds": 0.0, "split": {}}]
    s = group_summary(rows)
    assert (s["decided"], s["unknown"], s["misclassified"], s["agree"]) == (2, 1, 1, "1/2")
    assert s["qvip_robust_refuted"] == 1 and s["qvip_na_decided"] == 0
    assert time_split(rows)["total"] == 23.0
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n'
