"""QVIP Table 3 slices (issue 20): verdicts, agreement with QVIP, and where the time goes, per stage.

    python benchmarks/bench_table3.py [--slice grid] [--timeout 60] [--workers 2]
    python benchmarks/bench_table3.py --slice p1-8                 # P1-8, r = 10, ids 900-999
    python benchmarks/bench_table3.py --slice p2-6                 # P2-6, r = 4 (ids 300-399) and r = 6 (500-599)
    python benchmarks/bench_table3.py --slice issue                # the three slices above, one after the other
    python benchmarks/bench_table3.py --slice full                 # all of Table 3 with ids < 1000 (long)
    python benchmarks/bench_table3.py --slice grid --nets P3-4,P3-6,P3-8,P3-10 --timeout 20   # a part of a slice
    python benchmarks/bench_table3.py --slice grid --report        # the tables of what is recorded, no new runs

Slices (ids < 1000, QVIP's Table 3 blocks, read by ``qvip_anchor.table3``):

- ``grid``: all 12 networks (P1/P2/P3 at Q = 4, 6, 8, 10), r = 2, 4, 6, 10, the first ``--ids-per-radius`` (5) ids
  of each radius;
- ``p1-8``: P1-8 at r = 10, ids 900-999; ``p2-6``: P2-6 at r = 4 and 6, ids 300-399 and 500-599;
- ``full``: every network, every radius, every id < 1000 (r = 2, 4, 6, 10; r = 20 and 30 use ids >= 1000).

``--nets`` and ``--radii`` restrict a slice. Each (network, radius) group runs the portfolio through
:func:`qverify.verify.verify_batch` with ``--workers`` processes (the batched center / interval / symbolic / attack
stages first, their time split evenly over the instances they covered, then the exact stage per instance).
Misclassified samples are recorded, not verified (QVIP's convention).

**Resumable.** Every finished instance is appended at once, as one JSON line, to
``benchmarks/out/table3_<slice>_t<timeout>.jsonl``; a re-run of the same command skips the (net, r, id) triples
already there (``--fresh`` starts over). A truncated last line (a killed run) is dropped. ``--max-minutes`` stops
starting new groups after that much wall time.

Printed and written to ``benchmarks/out/table3_<slice>_t<timeout>.json``:

1. per net and radius: decided / robust / counterexample / unknown / misclassified, agreement with QVIP where both
   decided, QVIP ``Robust`` verdicts refuted by a replayed counterexample, QVIP ``NA`` instances decided;
2. the time per stage (center, interval, symbolic, attack, relaxed program, exact back end, fallback), summed over
   all verified instances and over the unknowns, from each result's ``stages``;
3. per unknown: the slack bracket ``details['slack']`` (lower end: symbolic bounds; upper end: the attack's nearest
   miss; a violation iff the least slack is <= 0, a proof needs lower >= 1) and the stage that ran out of time.

Stage names (``qverify.verify``): ``center``, ``interval``, ``symbolic`` and ``bounds`` (the worker's re-run of the
symbolic bounds for the encoder: counted as symbolic), ``attack``, ``attack-reseed`` (the reseeded rounds: category
``reseed``), ``optimized`` (alpha-CROWN style bounds), ``milp-<backend>-<enc>-relaxed`` (the relaxed-input
program), ``milp-<backend>-<enc>`` (the configured back end when the fallback ran after it) and the closing ``milp``
stage: the fallback when a back-end stage precedes it, else the configured back end (or the relaxed program when it
decided).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import OUT, print_table, write_json  # noqa: E402
from benchmarks.qvip_anchor import Published, network_path, table3  # noqa: E402
from qverify.network import QNetwork  # noqa: E402
from qverify.result import Result  # noqa: E402

NETS = [f"P{k}-{q}" for k in (1, 2, 3) for q in (4, 6, 8, 10)]
GRID_RADII = (2, 4, 6, 10)
SLICES = ("grid", "p1-8", "p2-6", "issue", "full")
#: stage categories in the order of the portfolio
CATEGORIES = ("center", "interval", "symbolic", "attack", "reseed", "optimized", "split", "relaxed", "exact",
              "fallback")
OURS = {"robust": "Robust", "counterexample": "Non-robust"}
Key = tuple[str, int, int]  # (net, radius, id)


# ------------------------------------------------------------------------------------------------ pure helpers
def slice_groups(name: str, pub_all: dict[str, dict[tuple[int, int], Published]], ids_per_radius: int = 5,
                 nets: Iterable[str] | None = None, radii: Iterable[int] | None = None
                 ) -> list[tuple[str, int, list[int]]]:
    """The (net, radius, ids) groups of a slice, ids < 1000 that QVIP's Table 3 lists, restricted to ``nets`` /
    ``radii`` when given."""
    if name == "issue":
        return [g for s in ("grid", "p1-8", "p2-6") for g in slice_groups(s, pub_all, ids_per_radius, nets, radii)]
    if name not in SLICES:
        raise ValueError(f"unknown slice {name!r} (known: {', '.join(SLICES)})")

    def ids_at(net: str, r: int, lo: int = 0, hi: int = 1000) -> list[int]:
        return sorted(i for (i, rr) in pub_all.get(net, {}) if rr == r and lo <= i < hi)

    if name == "grid":
        groups = [(n, r, ids_at(n, r)[:ids_per_radius]) for n in NETS for r in GRID_RADII]
    elif name == "p1-8":
        groups = [("P1-8", 10, ids_at("P1-8", 10, 900, 1000))]
    elif name == "p2-6":
        groups = [("P2-6", 4, ids_at("P2-6", 4, 300, 400)), ("P2-6", 6, ids_at("P2-6", 6, 500, 600))]
    else:  # full
        groups = [(n, r, ids_at(n, r)) for n in NETS for r in sorted({rr for (_, rr) in pub_all.get(n, {})})]
    keep_n = set(nets) if nets else None
    keep_r = set(radii) if radii else None
    return [(n, r, ids) for n, r, ids in groups if ids and (keep_n is None or n in keep_n)
            and (keep_r is None or r in keep_r)]


def stage_category(name: str, before: list[str]) -> str:
    """The category (:data:`CATEGORIES`) of a stage called ``name`` that follows the stages ``before``."""
    if name in ("center", "interval", "symbolic", "attack", "optimized"):
        return name
    if name == "attack-reseed":
        return "reseed"
    if name == "neuron-bab":
        return "split"
    if name == "bounds":
        return "symbolic"
    if name.endswith("-relaxed"):
        return "relaxed"
    if name.startswith("milp-") or name == "bab":
        return "exact"
    if name == "milp":
        if any(b.startswith("milp-") and not b.endswith("-relaxed") for b in before):
            return "fallback"
        return "exact"
    return "exact"


def stage_split(stages: list, method: str = "") -> dict[str, float]:
    """Seconds per category of one result's ``stages`` (``[name, seconds, outcome]`` triples or dicts). The closing
    ``milp`` stage of a result the relaxed program decided (``method`` ends in ``-relaxed``) is the relaxed one."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    names: list[str] = []
    for s in stages:
        name, secs, _ = _triple(s)
        cat = stage_category(name, names)
        if name == "milp" and cat == "exact" and method.endswith("-relaxed"):
            cat = "relaxed"
        out[cat] += secs
        names.append(name)
    return out


def ran_out(stages: list, method: str = "") -> str:
    """Which stages ran out of time: the categories of the stages whose outcome is ``timeout``, joined by ``+`` in
    order (e.g. ``relaxed+exact+fallback``); when none timed out, the last stage's ``category:outcome`` (``-``
    without stages)."""
    names: list[str] = []
    last = "-"
    hit: list[str] = []
    for s in stages:
        name, _, outcome = _triple(s)
        cat = stage_category(name, names)
        if name == "milp" and cat == "exact" and method.endswith("-relaxed"):
            cat = "relaxed"
        last = f"{cat}:{outcome}"
        if outcome == "timeout" and cat not in hit:
            hit.append(cat)
        names.append(name)
    return "+".join(hit) if hit else last


def exact_outcomes(stages: list, method: str = "") -> str:
    """The outcomes of the exact stages (relaxed, exact, fallback) in order, e.g. ``relaxed:timeout exact:timeout``."""
    names: list[str] = []
    out = []
    for s in stages:
        name, _, outcome = _triple(s)
        cat = stage_category(name, names)
        if name == "milp" and cat == "exact" and method.endswith("-relaxed"):
            cat = "relaxed"
        if cat in ("relaxed", "exact", "fallback"):
            out.append(f"{cat}:{outcome}")
        names.append(name)
    return " ".join(out) or "-"


def _triple(s: object) -> tuple[str, float, str]:
    if isinstance(s, dict):
        return str(s["stage"]), float(s["seconds"]), str(s["outcome"])
    name, secs, outcome = s  # type: ignore[misc]
    return str(name), float(secs), str(outcome)


def group_summary(rows: list[dict]) -> dict:
    """Counts of one group's records (or any set of records): verdicts, agreement with QVIP where both decided, QVIP
    ``Robust`` refuted by our (replayed) counterexamples, QVIP ``NA`` decided by us, times."""
    ver = [r for r in rows if r["verdict"] != "misclassified"]
    dec = [r for r in ver if r["verdict"] in OURS]
    both = [r for r in dec if r.get("qvip") in ("Robust", "Non-robust")]
    agree = sum(OURS[r["verdict"]] == r["qvip"] for r in both)
    times = [r["seconds"] for r in ver]
    return {
        "n": len(rows), "verified": len(ver), "decided": len(dec),
        "decided_pct": 100.0 * len(dec) / len(ver) if ver else float("nan"),
        "robust": sum(r["verdict"] == "robust" for r in rows),
        "counterexample": sum(r["verdict"] == "counterexample" for r in rows),
        "unknown": sum(r["verdict"] not in OURS and r["verdict"] != "misclassified" for r in rows),
        "misclassified": len(rows) - len(ver),
        "qvip_decided": sum(r.get("qvip") in ("Robust", "Non-robust") for r in ver),
        "agree": f"{agree}/{len(both)}",
        "qvip_robust_refuted": sum(r["verdict"] == "counterexample" and r.get("qvip") == "Robust" for r in ver),
        "qvip_nonrobust_proved": sum(r["verdict"] == "robust" and r.get("qvip") == "Non-robust" for r in ver),
        "qvip_na_decided": sum(r.get("qvip") == "NA" for r in dec),
        "mean_s": statistics.mean(times) if times else 0.0,
        "max_s": max(times) if times else 0.0,
    }


def time_split(rows: list[dict]) -> dict[str, float]:
    """Seconds per stage category summed over ``rows`` (their ``split``), with the total."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for r in rows:
        for c, v in (r.get("split") or {}).items():
            out[c] = out.get(c, 0.0) + v
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The complete records of a JSON-lines file; a truncated last line (a killed run) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        path.write_bytes(raw[:cut])
        raw = raw[:cut]
    out = []
    for line in raw.decode().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# ------------------------------------------------------------------------------------------------ running
def run_group(net_name: str, radius: int, ids: list[int], pub: dict[tuple[int, int], Published], timeout: float,
              workers: int, sink: Callable[[dict], None]) -> None:
    """Verify one (net, radius) group; each finished instance goes to ``sink(record)`` as soon as it is decided."""
    from benchmarks.bench_qvip import load_mnist
    from qverify.execute import predict
    from qverify.io.h5 import load_qvip_h5
    from qverify.property import pixels_to_grid, robustness_property
    from qverify.settings import VerifySettings
    from qverify.verify import verify_batch

    net = load_qvip_h5(network_path(net_name))
    images, labels = load_mnist()
    x = pixels_to_grid(net, images[ids])
    pred = predict(net, x)

    def base(i: int) -> dict:
        p = pub.get((i, radius))
        return {"net": net_name, "radius": radius, "id": i, "timeout": timeout,
                "qvip": p.result if p else None, "qvip_time": p.qvip_time if p else None}

    props, where = [], []
    for k, i in enumerate(ids):
        if pred[k] != labels[i]:
            sink({**base(i), "verdict": "misclassified", "method": "", "reason": "", "seconds": 0.0, "stages": [],
                  "split": {}})
            continue
        props.append(robustness_property(net, x[k], int(labels[i]), radius=radius, name=f"id{i}_r{radius}"))
        where.append(i)
    if not props:
        return

    def on_result(j: int, r: Result) -> None:
        stages = [[s.stage, round(s.seconds, 5), s.outcome] for s in r.stages]
        slack = (r.details or {}).get("slack") or {}
        sink({**base(where[j]), "verdict": r.verdict.value, "method": r.method, "reason": r.reason,
              "seconds": r.seconds, "stages": stages, "split": stage_split(stages, r.method),
              "ran_out": ran_out(stages, r.method) if r.verdict.value == "unknown" else "",
              "slack": {"lower": slack.get("lower"), "upper": slack.get("upper")} if slack else None,
              "exact_outcomes": exact_outcomes(stages, r.method),
              "program": (r.details or {}).get("program"),
              "disjunct_status": (r.details or {}).get("disjunct_status")})

    verify_batch(net, props, VerifySettings(timeout=timeout), workers=workers, on_result=on_result)


def probe_attack(unknowns: list[dict], seconds: float, sink: Callable[[dict], None]) -> None:
    """Diagnostic (no verdict of the benchmark changes): a longer attack on each unknown, ``seconds`` each in this
    process: rounds of :func:`qverify.attack.attack_report` with 64 restarts x 200 PGD steps and 16 local-search
    starts x 32 moves (the portfolio's defaults: 8 x 40 and 4 x 8, within 10% of the budget for the whole batch),
    a new seed per round, until a replayed counterexample or the time is up. Records the time to the first
    counterexample and the least exact slack seen (the bracket's upper end)."""
    from benchmarks.bench_qvip import load_mnist
    from qverify.attack import AttackSettings, attack_report
    from qverify.io.h5 import load_qvip_h5
    from qverify.property import pixels_to_grid, robustness_property

    images, labels = load_mnist()
    nets: dict[str, QNetwork] = {}
    for x in unknowns:
        name, r, i = x["net"], x["radius"], x["id"]
        if name not in nets:
            nets[name] = load_qvip_h5(network_path(name))
        net = nets[name]
        prop = robustness_property(net, pixels_to_grid(net, images[[i]])[0], int(labels[i]), radius=r)
        t0 = time.monotonic()
        best, found, rounds = None, None, 0
        while found is None and time.monotonic() - t0 < seconds:
            st = AttackSettings(restarts=64, steps=200, local_starts=16, local_steps=32, seed=1000 + rounds)
            rep = attack_report(net, [prop], st, deadline=t0 + seconds)
            rounds += 1
            best = int(rep.slack[0]) if best is None else min(best, int(rep.slack[0]))
            if rep.found[0] is not None and rep.found[0].confirmed:
                found = time.monotonic() - t0
        rec = {"net": name, "radius": r, "id": i, "probe_s": seconds, "found_s": found, "rounds": rounds,
               "best_slack": best, "portfolio_upper": (x.get("slack") or {}).get("upper")}
        sink(rec)
        what = "none" if found is None else f"counterexample at {found:.1f}s"
        print(f"  probe {name} r={r} id={i}: {what}, least slack {best} (portfolio's nearest miss "
              f"{rec['portfolio_upper']})", flush=True)


def report(records: list[dict], groups: list[tuple[str, int, list[int]]], label: str, extra: dict,
           probes: list[dict] | None = None) -> Path:
    want = {(n, r, i) for n, r, ids in groups for i in ids}
    rows = [x for x in records if (x["net"], x["radius"], x["id"]) in want]
    by_group: dict[tuple[str, int], list[dict]] = {}
    for x in rows:
        by_group.setdefault((x["net"], x["radius"]), []).append(x)
    table = []
    for n, r, ids in groups:
        g = by_group.get((n, r), [])
        if g:
            table.append({"net": n, "r": r, "ids": f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]),
                          "done": f"{len(g)}/{len(ids)}", **group_summary(g)})
    total = {"net": "all", "r": "", "ids": "", "done": f"{len(rows)}/{len(want)}", **group_summary(rows)}
    cols = ["net", "r", "ids", "done", "decided", "robust", "counterexample", "unknown", "misclassified",
            "decided_pct", "qvip_decided", "agree", "qvip_robust_refuted", "qvip_na_decided", "mean_s", "max_s"]
    print(f"\nQVIP Table 3, slice {label} (ids < 1000), portfolio defaults")
    print_table([*table, total], cols)
    ver = [x for x in rows if x["verdict"] != "misclassified"]
    unk = [x for x in ver if x["verdict"] not in OURS]
    for x in unk:  # from the stages, so that records of earlier versions of this script read the same
        x["ran_out"] = ran_out(x["stages"], x["method"])
        x["exact_outcomes"] = exact_outcomes(x["stages"], x["method"])
    splits = []
    for what, sel in (("all verified", ver), ("decided", [x for x in ver if x["verdict"] in OURS]),
                      ("unknown", unk)):
        s = time_split(sel)
        splits.append({"instances": what, "n": len(sel), **s,
                       **{f"{c}_pct": 100.0 * s[c] / s["total"] if s["total"] else 0.0 for c in CATEGORIES}})
    print("\nSeconds per stage, summed (and % of the row's total)")
    print_table([{**s, **{c: f"{s[c]:.1f} ({s[c + '_pct']:.0f}%)" for c in CATEGORIES}} for s in splits],
                ["instances", "n", *CATEGORIES, "total"])
    per_net = []
    for n in dict.fromkeys(x["net"] for x in unk):
        s = time_split([x for x in unk if x["net"] == n])
        per_net.append({"net": n, "unknown": sum(x["net"] == n for x in unk), **s})
    if per_net:
        print("\nUnknowns: seconds per stage, per net")
        print_table(per_net, ["net", "unknown", *CATEGORIES, "total"])
        print("\nUnknowns: slack bracket [lower, upper] (violation iff least slack <= 0; proof needs lower >= 1), "
              "the stage that ran out, QVIP's verdict")
        print_table([{"net": x["net"], "r": x["radius"], "id": x["id"], "reason": x["reason"],
                      "bracket": _bracket_text(x.get("slack")), "ran_out": x.get("ran_out", ""),
                      "exact_outcomes": x.get("exact_outcomes", ""), "qvip": x.get("qvip"),
                      "open": _open_disjuncts(x.get("disjunct_status")),
                      "seconds": x["seconds"]} for x in unk],
                    ["net", "r", "id", "reason", "bracket", "ran_out", "exact_outcomes", "open", "seconds", "qvip"])
        outs: dict[str, int] = {}
        for x in unk:
            outs[x.get("ran_out", "")] = outs.get(x.get("ran_out", ""), 0) + 1
        print("unknowns by the stage that ran out:", outs)
    probed = [p for p in probes or [] if (p["net"], p["radius"], p["id"]) in
              {(x["net"], x["radius"], x["id"]) for x in unk}]
    if probed:
        hit = [p for p in probed if p["found_s"] is not None]
        print(f"\nLonger attack on the unknowns ({probed[0]['probe_s']:g} s each, 64 x 200 PGD, new seed per round): "
              f"{len(hit)} of {len(probed)} refuted")
        print_table([{**p, "found_s": "-" if p["found_s"] is None else p["found_s"]} for p in probed],
                    ["net", "radius", "id", "found_s", "rounds", "best_slack", "portfolio_upper"])
    dis = [x for x in ver if x["verdict"] in OURS and x.get("qvip") in ("Robust", "Non-robust")
           and OURS[x["verdict"]] != x["qvip"]]
    if dis:
        print("\ndisagreements with QVIP (net, r, id, QVIP, qverify):",
              [(x["net"], x["radius"], x["id"], x["qvip"], x["verdict"]) for x in dis])
    return write_json(label, {"summary": [*table, total], "stage_split": splits, "unknown_split_per_net": per_net,
                              "unknowns": unk, "disagreements": dis, "attack_probe": probed, **extra})


def _open_disjuncts(status: dict | None) -> str:
    """``open/total`` disjuncts of the last exact stage (open: timed out or unconfirmed), ``-`` without them."""
    if not status:
        return "-"
    return f"{sum(v in ('timeout', 'unconfirmed') for v in status.values())}/{len(status)}"


def _bracket_text(slack: dict | None) -> str:
    if not slack:
        return "-"
    return f"[{slack.get('lower')}, {slack.get('upper')}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slice", default="grid", choices=SLICES)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per instance (default 60)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the exact stage (default 2)")
    ap.add_argument("--ids-per-radius", type=int, default=5, help="grid: the first N ids of each radius (default 5)")
    ap.add_argument("--nets", default=None, help="comma-separated networks, e.g. P3-4,P3-6 (default: the slice's)")
    ap.add_argument("--radii", default=None, help="comma-separated radii (default: the slice's)")
    ap.add_argument("--fresh", action="store_true", help="start the results file over instead of resuming it")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="start no new group after this (0: no limit)")
    ap.add_argument("--report", action="store_true", help="only print the tables of the recorded results")
    ap.add_argument("--probe-attack", type=float, default=0.0, metavar="SECONDS",
                    help="diagnostic: a longer attack (SECONDS each) on the unknowns not yet probed")
    args = ap.parse_args()
    pub_all = table3()
    nets = args.nets.split(",") if args.nets else None
    radii = [int(r) for r in args.radii.split(",")] if args.radii else None
    groups = slice_groups(args.slice, pub_all, args.ids_per_radius, nets, radii)
    label = f"table3_{args.slice}_t{args.timeout:g}"
    path = OUT / f"{label}.jsonl"
    OUT.mkdir(parents=True, exist_ok=True)
    if args.fresh and path.exists():
        path.unlink()
    records = read_jsonl(path)
    done: set[Key] = {(x["net"], x["radius"], x["id"]) for x in records}
    t0 = time.perf_counter()
    if not args.report:
        with open(path, "a") as f:
            def sink(rec: dict) -> None:
                f.write(json.dumps(rec, default=str) + "\n")
                f.flush()
                records.append(rec)
                print(f"  {rec['net']} r={rec['radius']} id={rec['id']}: {rec['verdict']} "
                      f"{rec.get('reason', '')} {rec['seconds']:.2f}s", flush=True)

            for n, r, ids in groups:
                todo = [i for i in ids if (n, r, i) not in done]
                if not todo:
                    continue
                if args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes:
                    print(f"--max-minutes reached: stopping before {n} r={r} (re-run to resume)")
                    break
                print(f"{n} r={r}: {len(todo)} instances", flush=True)
                g0 = time.perf_counter()
                run_group(n, r, todo, pub_all[n], args.timeout, args.workers, sink)
                print(f"{n} r={r}: {time.perf_counter() - g0:.1f} s wall", flush=True)
    ppath = OUT / f"{label}_probe.jsonl"
    probes = read_jsonl(ppath)
    if args.probe_attack > 0:
        seen = {(p["net"], p["radius"], p["id"]) for p in probes if p["probe_s"] == args.probe_attack}
        want = {(n, r, i) for n, r, ids in groups for i in ids}
        unk = [x for x in records if (x["net"], x["radius"], x["id"]) in want and x["verdict"] == "unknown"
               and (x["net"], x["radius"], x["id"]) not in seen]
        probes = [p for p in probes if p["probe_s"] == args.probe_attack]
        with open(ppath, "a") as f:
            def psink(rec: dict) -> None:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                probes.append(rec)

            probe_attack(unk, args.probe_attack, psink)
    out = report(records, groups, label, {"args": vars(args), "results": str(path),
                                          "wall_s_this_run": time.perf_counter() - t0}, probes)
    print("wrote", out, "and", path)


if __name__ == "__main__":
    main()
