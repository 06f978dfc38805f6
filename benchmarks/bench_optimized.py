"""Bounds only (no solver) on the QVIP Table 3 unknowns: symbolic (DeepPoly) against optimized (alpha-CROWN style,
:mod:`qverify.bounds.optimized`) intermediate bounds and margin lower ends (issue 20).

    python benchmarks/bench_optimized.py                        # the unknowns of the t20 grid and P1-8 runs
    python benchmarks/bench_optimized.py --steps 40 --limit 10  # fewer instances, other iteration counts
    python benchmarks/bench_optimized.py --lp                   # also the float LP bound (diagnostic, below)
    python benchmarks/bench_optimized.py --attack               # attack variants instead (restarts, seeds)

Reads the unknowns from ``benchmarks/out/table3_grid_t20.jsonl`` and ``table3_p1-8_t20.jsonl`` (``--inputs``), and
per instance records: per activation layer the number of unstable neurons (``f(l) != f(u)``) and the mean width
``hi - lo`` of its output, under both bounds; the margin lower end (least slack's lower bound, a proof needs >= 1)
of each; the seconds of each. Prints a summary table and writes ``benchmarks/out/table3_bounds_unknowns.json``
(``_s<steps>`` / ``_n<limit>`` appended to the name when those are given).

``--lp`` adds, per instance, the optimum of the LP relaxation with every unstable neuron relaxed by *all* lines
of its vertex family (slopes 0, ``p / q`` and every vertex chord, offsets from the vertices) over the optimized
intermediate bounds, one LP per margin row (scipy's HiGHS, float): the best any choice of per-neuron lines can
give jointly (the single-neuron relaxation barrier; Salman et al., NeurIPS 2019). A **diagnostic only**: a
float LP value decides nothing here.

``--attack`` instead runs attack variants on each unknown (1 s each, every candidate replayed): the portfolio's
8 restarts with three new seeds (1000-1002), and 32 or 64 restarts (targets on every disjunct) from seed 0, 64 from
seed 1000 (three rounds each, seeds counting up);
writes ``benchmarks/out/table3_attack_variants.json``.
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
from benchmarks.qvip_anchor import network_path  # noqa: E402

INPUTS = ("table3_grid_t20.jsonl", "table3_p1-8_t20.jsonl")


def layer_stats(net, bounds: list) -> dict[str, list]:
    """Per activation layer (index ``i``, value ``i + 1``): unstable neurons and mean output width."""
    from qverify.network import Clamp, Requantize

    unstable, width = [], []
    for i, op in enumerate(net.layers):
        if isinstance(op, Requantize | Clamp):
            lo, hi = (np.asarray(b).reshape(-1) for b in bounds[i + 1])
            unstable.append(int((lo != hi).sum()))
            width.append(round(float((hi - lo).mean()), 2))
    return {"unstable": unstable, "width": width}


def lp_margin(net, prop, bounds: list) -> float:
    """The float LP bound of the least slack (module docstring, ``--lp``): ``min_d max_k (LP_dk - b_dk)``."""
    import scipy.sparse as sp
    from scipy.optimize import linprog

    from qverify.bounds.optimized import _Act
    from qverify.bounds.symbolic import _chords
    from qverify.network import Dense

    flat = [(np.asarray(lo).reshape(1, -1), np.asarray(hi).reshape(1, -1)) for lo, hi in bounds]
    off = np.cumsum([0] + [lo.size for lo, _ in flat])
    N = int(off[-1])
    lb = np.concatenate([lo.ravel() for lo, _ in flat]).astype(float)
    ub = np.concatenate([hi.ravel() for _, hi in flat]).astype(float)
    eqs, beq, ubs, bub = [], [], [], []
    for k, op in enumerate(net.layers):
        if isinstance(op, Dense):
            n_out = op.weight.shape[0]
            M = sp.lil_matrix((n_out, N))
            M[:, off[k]:off[k + 1]] = op.weight.astype(float)
            M[:, off[k + 1]:off[k + 2]] = -np.eye(n_out)
            eqs.append(M.tocsr())
            beq.append(-op.bias.astype(float))
            continue
        a = _Act.build(net, k, flat[k][0], flat[k][1], 3)
        for t, j in enumerate(a.ji):
            for X, V, lower in ((a.XLf[t], a.VLf[t], True), (a.XUf[t], a.VUf[t], False)):
                for sl in np.unique(np.concatenate([[0.0, a.vert["slope"][t]], _chords(X[None], V[None])[0]])):
                    row = np.zeros(N)
                    if lower:  # y >= s x + min(V - s X)
                        row[off[k] + j], row[off[k + 1] + j] = sl, -1.0
                        bub.append(-(V - sl * X).min())
                    else:  # y <= s x + max(V - s X)
                        row[off[k] + j], row[off[k + 1] + j] = -sl, 1.0
                        bub.append((V - sl * X).max())
                    ubs.append(row)
    A_eq, b_eq = sp.vstack(eqs), np.concatenate(beq)
    A_ub = sp.csr_matrix(np.array(ubs)) if ubs else None
    b_ub = np.array(bub) if ubs else None
    per = []
    for conj in prop.unsafe:
        best = -np.inf
        for row, b in zip(conj.A, conj.b, strict=True):
            c = np.zeros(N)
            c[off[-2]:off[-1]] = row
            res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=list(zip(lb, ub, strict=True)),
                          method="highs")
            best = max(best, res.fun - b if res.status == 0 else np.nan)
        per.append(best)
    return float(min(per))


def attack_variants(net, prop) -> dict[str, float | None]:
    """Seconds to the first replayed counterexample (``None``: none in 1 s) per attack variant (``--attack``)."""
    from qverify.attack import AttackSettings, attack_report

    variants = {"r8_seeds1000-1002": [AttackSettings(seed=1000 + k) for k in range(3)]}
    for R, seed in ((32, 0), (64, 0), (64, 1000)):
        variants[f"r{R}_seed{seed}"] = [AttackSettings(seed=seed + k, restarts=R) for k in range(3)]
    out: dict[str, float | None] = {}
    for name, rounds in variants.items():
        t0 = time.monotonic()
        out[name] = None
        for s in rounds:
            rep = attack_report(net, [prop], s, deadline=t0 + 1.0)
            if rep.found[0] is not None:
                out[name] = time.monotonic() - t0
                break
            if time.monotonic() > t0 + 1.0:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default=",".join(INPUTS))
    ap.add_argument("--steps", type=int, default=None, help="optimization steps (default: the module's STEPS)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N unknowns (0: all)")
    ap.add_argument("--lp", action="store_true", help="also the float LP bound (diagnostic)")
    ap.add_argument("--attack", action="store_true", help="attack variants instead of bounds")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from benchmarks.bench_qvip import load_mnist
    from qverify.bounds import optimized
    from qverify.bounds.symbolic import symbolic_analysis
    from qverify.io.h5 import load_qvip_h5
    from qverify.property import pixels_to_grid, robustness_property

    unk, seen = [], set()
    for name in args.inputs.split(","):
        for line in open(OUT / name):
            r = json.loads(line)
            if r["verdict"] == "unknown" and (r["net"], r["radius"], r["id"]) not in seen:
                seen.add((r["net"], r["radius"], r["id"]))
                unk.append(r)
    if args.limit:
        unk = unk[:args.limit]
    images, labels = load_mnist()
    nets: dict = {}
    recs = []
    steps = optimized.STEPS if args.steps is None else args.steps
    for x in unk:
        name, r, i = x["net"], x["radius"], x["id"]
        if name not in nets:
            nets[name] = load_qvip_h5(network_path(name))
        net = nets[name]
        prop = robustness_property(net, pixels_to_grid(net, images[[i]])[0], int(labels[i]), radius=r)
        if args.attack:
            rec = {"net": name, "radius": r, "id": i, **attack_variants(net, prop)}
            recs.append(rec)
            print(rec, flush=True)
            continue
        t0 = time.monotonic()
        ana = symbolic_analysis(net, prop.lo[None], prop.hi[None])
        sym_lower = int(ana.slack_lower_bounds(prop)[0])
        t1 = time.monotonic()
        ob = optimized.optimized_bounds(net, prop.lo, prop.hi, prop, ana=ana, steps=steps)
        t2 = time.monotonic()
        q_bits = int(name.split("-")[1])
        rec = {"net": name, "radius": r, "id": i, "qvip": x.get("qvip"), "trivial": -(2**q_bits - 1),
               "sym_lower": sym_lower, "opt_lower": ob.slack_lower, "upper": (x.get("slack") or {}).get("upper"),
               "sym": layer_stats(net, [(lo[0], hi[0]) for lo, hi in ana.bounds]),
               "opt": layer_stats(net, ob.bounds), "sym_s": t1 - t0, "opt_s": t2 - t1, "rows": ob.rows}
        if args.lp:
            rec["lp_lower_float"] = round(lp_margin(net, prop, ob.bounds), 3)
        recs.append(rec)
        print(f"{name} r={r} id={i}: margin lower {sym_lower} -> {ob.slack_lower} (upper {rec['upper']}), "
              f"unstable {rec['sym']['unstable']} -> {rec['opt']['unstable']}, width {rec['sym']['width']} -> "
              f"{rec['opt']['width']}, {t2 - t1:.2f}s" + (f", LP {rec['lp_lower_float']}" if args.lp else ""),
              flush=True)
    if args.attack:
        names = [k for k in recs[0] if k not in ("net", "radius", "id")] if recs else []
        print_table([{"variant": v, "refuted": sum(r[v] is not None for r in recs),
                      "max_s": max((r[v] for r in recs if r[v] is not None), default=None)} for v in names],
                    ["variant", "refuted", "max_s"])
        print("wrote", write_json("table3_attack_variants", {"records": recs}))
        return
    rows = []
    for net_name in dict.fromkeys(r["net"] for r in recs):
        g = [r for r in recs if r["net"] == net_name]
        rows.append({"net": net_name, "n": len(g),
                     "proved_sym": sum(r["sym_lower"] >= 1 for r in g),
                     "proved_opt": sum(r["opt_lower"] >= 1 for r in g),
                     "gain_mean": statistics.mean(r["opt_lower"] - r["sym_lower"] for r in g),
                     "gain_max": max(r["opt_lower"] - r["sym_lower"] for r in g),
                     "trivial_sym": sum(r["sym_lower"] <= r["trivial"] + 2 for r in g),
                     "trivial_opt": sum(r["opt_lower"] <= r["trivial"] + 2 for r in g),
                     "unstable_sym": [round(statistics.mean(r["sym"]["unstable"][k] for r in g), 1)
                                      for k in range(len(g[0]["sym"]["unstable"]))],
                     "unstable_opt": [round(statistics.mean(r["opt"]["unstable"][k] for r in g), 1)
                                      for k in range(len(g[0]["opt"]["unstable"]))],
                     "opt_s_mean": statistics.mean(r["opt_s"] for r in g)})
        if args.lp:
            rows[-1]["proved_lp_float"] = sum(r["lp_lower_float"] > 0 for r in g)
            rows[-1]["lp_minus_opt_max"] = max(r["lp_lower_float"] - r["opt_lower"] for r in g)
    print_table(rows, list(rows[0]) if rows else [])
    tag = (f"_s{args.steps}" if args.steps is not None else "") + (f"_n{args.limit}" if args.limit else "")
    out = write_json(f"table3_bounds_unknowns{tag}", {"steps": steps, "lp": args.lp, "records": recs,
                                                       "summary": rows})
    print("wrote", out)


if __name__ == "__main__":
    main()
