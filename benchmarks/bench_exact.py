"""The exact stage alone, side by side: encodings x back ends x bounds on the same P1-6 instances.

    python benchmarks/bench_exact.py --ids 300-309 --radius 4 [--encodings range,onehot]
        [--backends cpsat,scip,highs,cbc] [--bounds interval,symbolic] [--timeout 60] [--threads 0]
        [--split on|off] [--per-instance] [--name bench_exact]

``--radius qvip`` takes the radius from the id as QVIP's Table 2 does (ids 0-99: r=1, 100-199: r=2, ...).
Each instance runs :func:`qverify.exact.verify_milp` (no attack, no portfolio: the bounds only shape the program,
a property the bounds decide is counted as robust in ~0 s). Prints, per configuration, robust / counterexample /
unknown counts, the agreement with QVIP's published verdicts, median / mean / max seconds (bounds + encode +
solve + replay), and QVIP's mean over the same instances; writes every row to ``benchmarks/out/<name>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MNIST1000, P1_6, print_table, write_json  # noqa: E402
from benchmarks.qvip_anchor import table2  # noqa: E402
from qverify.exact import verify_milp  # noqa: E402
from qverify.execute import predict  # noqa: E402
from qverify.io.h5 import load_qvip_h5  # noqa: E402
from qverify.property import pixels_to_grid, robustness_property  # noqa: E402
from qverify.settings import SolverSettings  # noqa: E402

OURS = {"robust": "Robust", "counterexample": "Non-robust"}


def parse_ids(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def bounds_for(kind: str, net, prop):
    if kind == "interval":
        return None  # verify_milp's default
    if kind == "symbolic":
        from qverify.bounds.symbolic import symbolic_bounds

        return symbolic_bounds(net, prop.lo[None, :], prop.hi[None, :])
    raise ValueError(f"unknown bounds {kind!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", default="300-309")
    ap.add_argument("--radius", default="qvip")
    ap.add_argument("--encodings", default="range,onehot")
    ap.add_argument("--backends", default="cpsat")
    ap.add_argument("--bounds", default="symbolic")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--split", choices=["on", "off"], default="on")
    ap.add_argument("--per-instance", action="store_true")
    ap.add_argument("--name", default="bench_exact")
    args = ap.parse_args()

    net = load_qvip_h5(P1_6)
    data = np.load(MNIST1000)
    images = pixels_to_grid(net, data["images"])
    labels = data["labels"].astype(int)
    published = table2("MNIST")
    ids = parse_ids(args.ids)
    rows: list[dict] = []
    configs = [(b, e, k) for b in args.backends.split(",") for e in args.encodings.split(",")
               for k in args.bounds.split(",")]
    for i in ids:
        r = (i // 100) + 1 if args.radius == "qvip" else int(args.radius)
        if int(predict(net, images[i][None, :])[0]) != labels[i]:
            rows.append({"id": i, "radius": r, "config": "-", "verdict": "misclassified", "seconds": 0.0})
            continue
        prop = robustness_property(net, images[i], int(labels[i]), radius=r, name=f"id{i}_r{r}")
        pub = published.get((i, r))
        for backend, encoding, bkind in configs:
            t = time.perf_counter()
            b = bounds_for(bkind, net, prop)
            s = SolverSettings(backend=backend, encoding=encoding, time_limit=args.timeout, threads=args.threads)
            res = verify_milp(net, prop, s, bounds=b, split=args.split == "on")
            secs = time.perf_counter() - t
            row = {"id": i, "radius": r, "config": f"{backend}/{encoding}/{bkind}", "verdict": res.verdict.value,
                   "reason": str(res.reason), "seconds": round(secs, 4),
                   "qvip": pub.result if pub else "", "qvip_time": pub.qvip_time if pub else None,
                   "agree": (OURS.get(res.verdict.value) == pub.result) if pub and pub.result != "NA" else None,
                   "live_disjuncts": res.details.get("live_disjuncts")}
            rows.append(row)
            if args.per_instance:
                print(f"{i:4d} r={r} {row['config']:28s} {row['verdict']:15s} {secs:8.3f}s  QVIP "
                      f"{row['qvip']} {row['qvip_time']}", flush=True)
    summary = []
    for backend, encoding, bkind in configs:
        cfg = f"{backend}/{encoding}/{bkind}"
        rs = [r for r in rows if r["config"] == cfg]
        ts = [r["seconds"] for r in rs]
        qt = [r["qvip_time"] for r in rs if r["qvip_time"] is not None]
        summary.append({
            "config": cfg, "n": len(rs),
            "robust": sum(r["verdict"] == "robust" for r in rs),
            "cex": sum(r["verdict"] == "counterexample" for r in rs),
            "unknown": sum(r["verdict"] in ("unknown", "error") for r in rs),
            "agree": f"{sum(r['agree'] is True for r in rs)}/{sum(r['agree'] is not None for r in rs)}",
            "median_s": statistics.median(ts) if ts else 0.0, "mean_s": statistics.mean(ts) if ts else 0.0,
            "max_s": max(ts, default=0.0), "total_s": sum(ts),
            "qvip_mean_s": statistics.mean(qt) if qt else float("nan"),
        })
    mis = sum(r["verdict"] == "misclassified" for r in rows)
    print(f"\n{len(ids)} ids, {mis} misclassified; timeout {args.timeout} s, threads {args.threads or 'all'}, "
          f"split {args.split}")
    print_table(summary, ["config", "n", "robust", "cex", "unknown", "agree", "median_s", "mean_s", "max_s",
                          "total_s", "qvip_mean_s"])
    path = write_json(args.name, {"args": vars(args), "summary": summary, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
