"""Knife-edge differential benchmark: many random tiny networks, every verdict path, enumeration as the oracle.

    python benchmarks/bench_knife_edge.py --cases 2000 [--paths all|milp-scip-range,...] [--seed 0] [--timeout 20]
    python benchmarks/bench_knife_edge.py --cases 2000 --float32     # onnxruntime's float32 requantizations
    python benchmarks/bench_knife_edge.py --cases 500 --graphs       # half the networks random graphs

Each case (:func:`tests.fixtures.random_knife_edge_case`, seed ``seed + k``) gives two properties at the exact
minimum of a random output row over the box (violated only at the minimizers / robust with zero margin); every
path of :data:`tests.fixtures.VERDICT_PATHS` decides both and is judged against enumeration (``ok``, ``unknown`` or
``wrong``). Prints, per path: cases, ok, unknown, wrong, median and max seconds; writes
``benchmarks/out/knife_edge.json``. Every decided case is appended to ``benchmarks/out/knife_edge.jsonl`` as it is
judged, and a rerun with the same options resumes from it (``--fresh`` starts over). A wrong verdict is saved as
``benchmarks/out/knife_edge_wrong/<path>-<seed>-<edge|tight>.{qnn,vnnlib}`` to become a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import OUT, print_table, write_json  # noqa: E402
from tests.fixtures import VERDICT_PATHS, brute_force, judge, random_knife_edge_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", default="all", help="comma-separated names of tests.fixtures.VERDICT_PATHS, or all")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per property and path")
    ap.add_argument("--max-points", type=int, default=1500, help="largest input box (points)")
    ap.add_argument("--float32", action="store_true", help="onnxruntime's float32 requantizations")
    ap.add_argument("--graphs", action="store_true", help="half the networks random graphs (residual, pooling, "
                                                           "depthwise, concat, step, lookup, data movement)")
    ap.add_argument("--fresh", action="store_true", help="ignore the results of an earlier run")
    args = ap.parse_args(argv)
    paths = sorted(VERDICT_PATHS) if args.paths == "all" else args.paths.split(",")
    unknown_paths = [p for p in paths if p not in VERDICT_PATHS]
    if unknown_paths:
        ap.error(f"unknown paths {unknown_paths} (known: {', '.join(sorted(VERDICT_PATHS))})")
    tag = "knife_edge" + ("_f32" if args.float32 else "") + ("_graphs" if args.graphs else "")
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"{tag}.jsonl"
    done: set[tuple[int, str]] = set()
    rows: list[dict] = []
    if log.exists() and not args.fresh:
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("max_points") == args.max_points and r.get("timeout") == args.timeout:
                    rows.append(r)
                    done.add((r["seed"], r["path"]))
    elif log.exists():
        log.unlink()
    wrong_dir = OUT / f"{tag}_wrong"
    t_start = time.perf_counter()
    with log.open("a") as fh:
        for k in range(args.cases):
            seed = args.seed + k
            todo = [p for p in paths if (seed, p) not in done]
            if not todo:
                continue
            net, edge, tight, count = random_knife_edge_case(np.random.default_rng(seed), args.max_points,
                                                              args.float32, args.graphs)
            truth = {"edge": False, "tight": True}
            for which, prop in (("edge", edge), ("tight", tight)):
                assert brute_force(net, prop)[0] == truth[which]
            for path in todo:
                for which, prop in (("edge", edge), ("tight", tight)):
                    t = time.perf_counter()
                    res = VERDICT_PATHS[path](net, prop, args.timeout)
                    secs = time.perf_counter() - t
                    verdict = judge(net, prop, res, truth[which])
                    row = {"seed": seed, "path": path, "property": which, "judged": verdict,
                           "verdict": res.verdict.value, "reason": str(res.reason), "method": res.method,
                           "seconds": round(secs, 4), "box": int(prop.box_size()), "minimizers": count,
                           "max_points": args.max_points, "timeout": args.timeout}
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                    if verdict == "wrong":
                        _save_wrong(wrong_dir, f"{path}-{seed}-{which}", net, prop)
                fh.flush()
            if (k + 1) % 50 == 0:
                print(f"  {k + 1}/{args.cases} cases, {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    table = []
    for path in paths:
        rs = [r for r in rows if r["path"] == path]
        if not rs:
            continue
        secs = [r["seconds"] for r in rs]
        table.append({"path": path, "properties": len(rs), "ok": sum(r["judged"] == "ok" for r in rs),
                      "unknown": sum(r["judged"] == "unknown" for r in rs),
                      "wrong": sum(r["judged"] == "wrong" for r in rs),
                      "median s": statistics.median(secs), "max s": max(secs)})
    total = {"path": "all", "properties": sum(t["properties"] for t in table), "ok": sum(t["ok"] for t in table),
             "unknown": sum(t["unknown"] for t in table), "wrong": sum(t["wrong"] for t in table)}
    print_table([*table, total], ["path", "properties", "ok", "unknown", "wrong", "median s", "max s"])
    out = write_json(tag, {"command": " ".join(sys.argv), "cases": args.cases, "seed": args.seed,
                           "timeout": args.timeout, "max_points": args.max_points, "float32": args.float32,
                           "graphs": args.graphs, "table": [*table, total]})
    print(f"wrote {out}")
    return 1 if total["wrong"] else 0


def _save_wrong(folder: Path, stem: str, net, prop) -> None:
    from qverify.io.models import save_model
    from qverify.io.vnnlib import write_vnnlib

    folder.mkdir(parents=True, exist_ok=True)
    save_model(net, folder / f"{stem}.qnn")
    write_vnnlib(prop, net, folder / f"{stem}.vnnlib")


if __name__ == "__main__":
    raise SystemExit(main())
