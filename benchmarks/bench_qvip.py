"""QVIP's benchmark: Table 2 (P1-6, MNIST ids 0-399, r = 1..4 by id range) and Table 3 slices.

    python benchmarks/bench_qvip.py table2 [--timeout 60] [--method portfolio] [--ids-per-radius 100]
    python benchmarks/bench_qvip.py table3 [--nets P1-4,P2-6,...] [--radii 2,4,6,10] [--timeout 60]
    python benchmarks/bench_qvip.py compare [--ids-per-radius 25]     # encodings and back ends side by side
    python benchmarks/bench_qvip.py stages [--timeout 60]             # portfolio vs exact alone, per stage

Per radius it prints robust / counterexample / unknown / misclassified, the agreement with QVIP's published
per-sample verdicts, and the median, mean and max time next to QVIP's published mean time (Gurobi, 28 threads).
Every instance's verdict and time go to ``benchmarks/out/<name>.json``.

Time per instance: the portfolio runs :func:`qverify.verify.verify_batch` with one worker per radius group, so the
shared batched stages (center, interval, attack) are split evenly over the instances they covered and the exact
stage runs with both cores; a forced method runs :func:`qverify.verify.verify` per instance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MNIST1000, print_table, write_json  # noqa: E402
from benchmarks.qvip_anchor import TABLE3_RADII, network_path, table2, table3  # noqa: E402
from qverify.execute import predict  # noqa: E402
from qverify.io.h5 import load_qvip_h5  # noqa: E402
from qverify.network import QNetwork  # noqa: E402
from qverify.property import pixels_to_grid, robustness_property  # noqa: E402
from qverify.settings import SolverSettings, VerifySettings  # noqa: E402
from qverify.verify import verify, verify_batch  # noqa: E402

OURS = {"robust": "Robust", "counterexample": "Non-robust"}


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    d = np.load(MNIST1000)
    return d["images"].reshape(len(d["images"]), -1), d["labels"].astype(int)


def run_instances(net: QNetwork, ids: list[int], radius: int, settings: VerifySettings, workers: int = 1
                  ) -> list[dict]:
    """Verify ``ids`` at ``radius``; misclassified samples are recorded, not verified (QVIP's convention)."""
    images, labels = load_mnist()
    x = pixels_to_grid(net, images[ids])
    pred = predict(net, x)
    rows: list[dict] = []
    props, where = [], []
    for k, i in enumerate(ids):
        if pred[k] != labels[i]:
            rows.append({"id": i, "radius": radius, "verdict": "misclassified", "method": "", "seconds": 0.0})
            continue
        props.append(robustness_property(net, x[k], int(labels[i]), radius=radius, name=f"id{i}_r{radius}"))
        where.append(i)
    if settings.method == "portfolio":
        results = verify_batch(net, props, settings, workers=workers)
    else:
        results = [verify(net, p, settings) for p in props]
    for i, r in zip(where, results, strict=True):
        rows.append({"id": i, "radius": radius, "verdict": r.verdict.value, "reason": r.reason, "method": r.method,
                     "seconds": r.seconds, "stages": [(s.stage, round(s.seconds, 5), s.outcome) for s in r.stages]})
    return sorted(rows, key=lambda r: r["id"])


def summarize(rows: list[dict], published: dict) -> dict:
    ver = [r for r in rows if r["verdict"] != "misclassified"]
    times = [r["seconds"] for r in ver]
    agree = disagree = 0
    disagreements = []
    for r in rows:
        p = published.get((r["id"], r["radius"]))
        if p is None:
            continue
        ours = OURS.get(r["verdict"], "NA")
        if r["verdict"] == "misclassified":
            ours = "NA"
        if p.result == "NA" and r["verdict"] == "misclassified":
            agree += 1
        elif p.result == ours:
            agree += 1
        else:
            disagree += 1
            disagreements.append((r["id"], p.result, r["verdict"]))
    qt = [p.qvip_time for (i, rr), p in published.items() if p.qvip_time is not None
          and any(r["id"] == i and r["radius"] == rr for r in rows)]
    return {
        "robust": sum(r["verdict"] == "robust" for r in rows),
        "counterexample": sum(r["verdict"] == "counterexample" for r in rows),
        "unknown": sum(r["verdict"] == "unknown" for r in rows),
        "misclassified": sum(r["verdict"] == "misclassified" for r in rows),
        "agree": f"{agree}/{agree + disagree}",
        "median_s": statistics.median(times) if times else 0.0,
        "mean_s": statistics.mean(times) if times else 0.0,
        "max_s": max(times) if times else 0.0,
        "qvip_mean_s": statistics.mean(qt) if qt else float("nan"),
        "disagreements": disagreements,
    }


def settings_from(args: argparse.Namespace, method: str | None = None, **solver) -> VerifySettings:
    s = SolverSettings(backend=solver.get("backend", args.solver), encoding=solver.get("encoding", args.encoding),
                       time_limit=args.timeout, threads=args.threads)
    return VerifySettings(method=method or args.method, timeout=args.timeout, solver=s)


def cmd_table2(args: argparse.Namespace) -> None:
    net = load_qvip_h5(network_path("P1-6"))
    pub = table2("MNIST")
    rows_out, all_rows = [], []
    for r in (1, 2, 3, 4):
        ids = list(range(100 * (r - 1), 100 * (r - 1) + args.ids_per_radius))
        t = time.perf_counter()
        rows = run_instances(net, ids, r, settings_from(args))
        wall = time.perf_counter() - t
        s = summarize(rows, pub)
        all_rows += rows
        rows_out.append({"r": r, "ids": f"{ids[0]}-{ids[-1]}", **{k: v for k, v in s.items() if k != "disagreements"},
                         "wall_s": wall})
        if s["disagreements"]:
            print(f"r={r}: disagreements with QVIP (id, QVIP, qverify): {s['disagreements']}")
    print(f"\nQVIP Table 2, P1-6, method={args.method}, timeout={args.timeout}s")
    print_table(rows_out, ["r", "ids", "robust", "counterexample", "unknown", "misclassified", "agree", "median_s",
                           "mean_s", "max_s", "qvip_mean_s", "wall_s"])
    print("wrote", write_json(f"qvip_table2_{args.method}", {"summary": rows_out, "instances": all_rows,
                                                              "args": vars(args)}))


def cmd_table3(args: argparse.Namespace) -> None:
    pub_all = table3()
    nets = args.nets.split(",") if args.nets else list(pub_all)
    radii = [int(r) for r in args.radii.split(",")] if args.radii else list(TABLE3_RADII)
    rows_out, all_rows = [], []
    for name in nets:
        net = load_qvip_h5(network_path(name))
        pub = pub_all[name]
        for r in radii:
            ids = sorted(i for (i, rr) in pub if rr == r and i < 1000
                         and (not args.only_qvip_na or pub[(i, rr)].result == "NA"))[: args.ids_per_radius]
            if not ids:
                continue
            rows = run_instances(net, ids, r, settings_from(args), workers=args.workers)
            s = summarize(rows, pub)
            qvip_to = [i for i in ids if pub[(i, r)].result == "NA"]
            mis = {x["id"] for x in rows if x["verdict"] == "misclassified"}
            decided_to = sum(1 for x in rows if x["id"] in qvip_to and x["id"] not in mis
                             and x["verdict"] in ("robust", "counterexample"))
            all_rows += [{**x, "net": name} for x in rows]
            rows_out.append({"net": name, "r": r, "n": len(ids), **{k: v for k, v in s.items() if k != "disagreements"},
                             "qvip_NA_not_misclassified": len([i for i in qvip_to if i not in mis]),
                             "qverify_decides_of_those": decided_to})
            if s["disagreements"]:
                print(f"{name} r={r}: disagreements (id, QVIP, qverify): {s['disagreements']}")
    print(f"\nQVIP Table 3 slices (ids < 1000), method={args.method}, timeout={args.timeout}s")
    print_table(rows_out, ["net", "r", "n", "robust", "counterexample", "unknown", "misclassified", "agree",
                           "qvip_NA_not_misclassified", "qverify_decides_of_those", "median_s", "mean_s", "max_s",
                           "qvip_mean_s"])
    print("wrote", write_json(f"qvip_table3_{args.method}", {"summary": rows_out, "instances": all_rows,
                                                              "args": vars(args)}))


def cmd_compare(args: argparse.Namespace) -> None:
    """Encodings and back ends of the exact stage side by side on the same instances (method milp)."""
    net = load_qvip_h5(network_path("P1-6"))
    configs = [("cpsat", "range"), ("cpsat", "onehot"), ("scip", "range"), ("highs", "range"), ("cbc", "range")]
    if args.configs:
        configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    out = []
    for backend, enc in configs:
        total, decided, n = 0.0, 0, 0
        verdicts = {}
        for r in (1, 2, 3, 4):
            ids = list(range(100 * (r - 1), 100 * (r - 1) + args.ids_per_radius))
            rows = run_instances(net, ids, r, settings_from(args, "milp", backend=backend, encoding=enc))
            for x in rows:
                if x["verdict"] == "misclassified":
                    continue
                n += 1
                total += x["seconds"]
                decided += x["verdict"] in ("robust", "counterexample")
                verdicts[(x["id"], r)] = x["verdict"]
        out.append({"backend": backend, "encoding": enc, "instances": n, "decided": decided, "total_s": total,
                    "verdicts": verdicts})
    base = out[0]["total_s"]
    for o in out:
        o["ratio_to_first"] = o["total_s"] / base if base else float("nan")
        o["same_verdicts_as_first"] = all(o["verdicts"].get(k) == v for k, v in out[0]["verdicts"].items()
                                          if v != "unknown" and o["verdicts"].get(k) != "unknown")
    print(f"\nExact stage alone on P1-6 ({args.ids_per_radius} ids per radius, r=1..4), timeout={args.timeout}s")
    print_table(out, ["backend", "encoding", "instances", "decided", "total_s", "ratio_to_first",
                      "same_verdicts_as_first"])
    for o in out:
        o["verdicts"] = {f"{k[0]}_r{k[1]}": v for k, v in o["verdicts"].items()}
    print("wrote", write_json("qvip_compare_backends", {"rows": out, "args": vars(args)}))


def cmd_stages(args: argparse.Namespace) -> None:
    """The portfolio against the exact solver alone on Table 2; which stage decides how many instances."""
    net = load_qvip_h5(network_path("P1-6"))
    pub = table2("MNIST")
    out = []
    per_stage: dict[str, int] = {}
    for method in ("portfolio", "milp"):
        total = 0.0
        agree_all = []
        for r in (1, 2, 3, 4):
            ids = list(range(100 * (r - 1), 100 * (r - 1) + args.ids_per_radius))
            rows = run_instances(net, ids, r, settings_from(args, method))
            s = summarize(rows, pub)
            agree_all.append(s["agree"])
            total += sum(x["seconds"] for x in rows)
            if method == "portfolio":
                for x in rows:
                    if x["verdict"] != "misclassified":
                        per_stage[x["method"]] = per_stage.get(x["method"], 0) + 1
        out.append({"method": method, "total_s": total, "agree_per_radius": " ".join(agree_all)})
    ratio = out[1]["total_s"] / out[0]["total_s"] if out[0]["total_s"] else float("nan")
    print(f"\nPortfolio vs exact alone, P1-6 Table 2 ({args.ids_per_radius} ids per radius)")
    print_table(out, ["method", "total_s", "agree_per_radius"])
    print(f"speed-up of the portfolio over the exact solver alone: {ratio:.2f}x")
    print("instances decided per stage (portfolio):", per_stage)
    print("wrote", write_json("qvip_stages", {"rows": out, "ratio": ratio, "per_stage": per_stage,
                                               "args": vars(args)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["table2", "table3", "compare", "stages"])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per instance")
    ap.add_argument("--method", default="portfolio", help="portfolio | milp | bab | ...")
    ap.add_argument("--solver", default="cpsat")
    ap.add_argument("--encoding", default="range")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ids-per-radius", type=int, default=100)
    ap.add_argument("--nets", default=None, help="table3: comma-separated, e.g. P1-4,P2-6")
    ap.add_argument("--radii", default=None, help="table3: comma-separated radii")
    ap.add_argument("--configs", default=None, help="compare: backend:encoding,... (default: all)")
    ap.add_argument("--only-qvip-na", action="store_true",
                    help="table3: only the instances QVIP left NA (2 h timeout, or misclassified)")
    ap.add_argument("--workers", type=int, default=1, help="table3: worker processes for the exact stage")
    args = ap.parse_args()
    {"table2": cmd_table2, "table3": cmd_table3, "compare": cmd_compare, "stages": cmd_stages}[args.mode](args)


if __name__ == "__main__":
    main()
