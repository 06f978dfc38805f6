"""Re-run recorded QVIP Table 3 instances with the current portfolio (issue 20): the unknowns of earlier runs, and a
sample of the instances they decided, to measure what a change decides and to check that no verdict flips.

    python benchmarks/bench_table3_rerun.py                       # 20 s, 1 worker, both sets
    python benchmarks/bench_table3_rerun.py --decided 40 --timeout 20 --tag opt --report

Reads ``benchmarks/out/table3_grid_t20.jsonl`` and ``table3_p1-8_t20.jsonl`` (``--inputs``; an instance in both
counts once, its first record), runs the ``--decided`` sample first (every k-th decided instance in file order, k
chosen to give that many, misclassified ones skipped), then every unknown, through
:func:`benchmarks.bench_table3.run_group` (the portfolio's batched stages per (net, radius) group, then the rest per
instance in ``--workers`` processes). Records go, one JSON line each, to
``benchmarks/out/table3_rerun_<tag>_t<timeout>.jsonl`` (resumable: instances already there are skipped).

Prints: the unknowns now decided, by deciding stage; the slack brackets' lower ends before and after; the decided
sample's verdicts against the earlier ones - **a robust / counterexample flip is a soundness bug** and is listed
(and makes the script exit with status 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_table3 import OURS, read_jsonl, run_group, time_split  # noqa: E402
from benchmarks.common import OUT, print_table, write_json  # noqa: E402
from benchmarks.qvip_anchor import table3  # noqa: E402

INPUTS = ("table3_grid_t20.jsonl", "table3_p1-8_t20.jsonl")
Key = tuple[str, int, int]


def load_old(names: list[str]) -> dict[Key, dict]:
    """The first record of each (net, radius, id) over the files, in file order."""
    old: dict[Key, dict] = {}
    for name in names:
        for r in read_jsonl(OUT / name):
            old.setdefault((r["net"], r["radius"], r["id"]), r)
    return old


def pick(old: dict[Key, dict], decided: int) -> tuple[list[Key], list[Key]]:
    """(the decided sample, the unknowns), each in file order."""
    dec = [k for k, r in old.items() if r["verdict"] in OURS]
    unk = [k for k, r in old.items() if r["verdict"] == "unknown"]
    if decided <= 0:
        return [], unk
    step = max(1, len(dec) // decided)
    return dec[::step][:decided], unk


def groups_of(keys: list[Key]) -> list[tuple[str, int, list[int]]]:
    out: dict[tuple[str, int], list[int]] = {}
    for n, r, i in keys:
        out.setdefault((n, r), []).append(i)
    return [(n, r, ids) for (n, r), ids in out.items()]


def lower_of(rec: dict) -> int | None:
    return (rec.get("slack") or {}).get("lower")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default=",".join(INPUTS))
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--decided", type=int, default=40, help="size of the decided sample (0: none)")
    ap.add_argument("--tag", default="opt", help="output file tag")
    ap.add_argument("--report", action="store_true", help="only print the tables of the recorded results")
    args = ap.parse_args()
    old = load_old(args.inputs.split(","))
    sample, unk = pick(old, args.decided)
    label = f"table3_rerun_{args.tag}_t{args.timeout:g}"
    path = OUT / f"{label}.jsonl"
    records = read_jsonl(path)
    done = {(x["net"], x["radius"], x["id"]) for x in records}
    pub_all = table3()
    t0 = time.perf_counter()
    if not args.report:
        with open(path, "a") as f:
            def sink(rec: dict) -> None:
                f.write(json.dumps(rec, default=str) + "\n")
                f.flush()
                records.append(rec)
                key = (rec["net"], rec["radius"], rec["id"])
                was = old.get(key, {}).get("verdict")
                print(f"  {key}: {rec['verdict']} by {rec['method'] or '-'} {rec['seconds']:.2f}s (was {was})",
                      flush=True)

            for what, keys in (("decided sample", sample), ("unknowns", unk)):
                for n, r, ids in groups_of([k for k in keys if k not in done]):
                    print(f"{what}: {n} r={r}: {len(ids)} instances", flush=True)
                    run_group(n, r, ids, pub_all[n], args.timeout, args.workers, sink)
    new = {(x["net"], x["radius"], x["id"]): x for x in records}
    # the unknowns
    rows, by_method = [], {}
    for k in unk:
        if k not in new:
            continue
        x = new[k]
        if x["verdict"] in OURS:
            by_method[x["method"]] = by_method.get(x["method"], 0) + 1
        rows.append({"net": k[0], "r": k[1], "id": k[2], "verdict": x["verdict"], "method": x["method"],
                     "lower_before": lower_of(old[k]), "lower_after": lower_of(x),
                     "upper_before": (old[k].get("slack") or {}).get("upper"),
                     "upper_after": (x.get("slack") or {}).get("upper"), "seconds": round(x["seconds"], 2)})
    print(f"\nUnknowns re-run ({len(rows)} of {len(unk)}): decided {sum(by_method.values())}, by stage {by_method}")
    print_table(rows, ["net", "r", "id", "verdict", "method", "lower_before", "lower_after", "upper_before",
                       "upper_after", "seconds"])
    moved = [r for r in rows if r["lower_before"] is not None and r["lower_after"] is not None]
    if moved:
        print(f"lower ends raised on {sum(r['lower_after'] > r['lower_before'] for r in moved)} of {len(moved)}, "
              f"by {sum(r['lower_after'] - r['lower_before'] for r in moved)} steps in all")
    # the decided sample
    flips, same, now_unknown = [], 0, []
    for k in sample:
        if k not in new:
            continue
        a, b = old[k]["verdict"], new[k]["verdict"]
        if b == a:
            same += 1
        elif b in OURS:
            flips.append((*k, a, b))
        else:
            now_unknown.append((*k, a, b))
    print(f"\nDecided sample ({sum(k in new for k in sample)} of {len(sample)}): {same} unchanged, "
          f"{len(now_unknown)} now undecided {now_unknown}, FLIPS (soundness bugs): {flips}")
    split_unk = time_split([new[k] for k in unk if k in new])
    print("seconds per stage over the unknowns:", {c: round(v, 1) for c, v in split_unk.items()})
    out = write_json(label, {"args": vars(args), "unknowns": rows, "decided_by_stage": by_method,
                             "sample_unchanged": same, "sample_now_unknown": now_unknown, "flips": flips,
                             "stage_split_unknowns": split_unk, "wall_s_this_run": time.perf_counter() - t0})
    print("wrote", out, "and", path)
    if flips:
        sys.exit(1)


if __name__ == "__main__":
    main()
