"""Near-tie diagnosis of robustness instances the portfolio leaves unknown (issue 5's remaining unknowns).

For each image and each class ``j`` whose violation the symbolic bounds do not exclude, it prints:

* ``need``: the margin ``y_c - y_j`` (``c`` the label) that a violation must reach under the first-index tie rule
  (``-1`` when ``j > c``, ``0`` when ``j < c``);
* ``lp``: the LP relaxation's minimum of that margin (the range encoding of :mod:`qverify.encode`, symbolic
  bounds, solved by GLOP): the instance is open because ``lp <= need``;
* ``lp_round``: the exact margin (integer executor) at the LP's optimal input rounded to the grid;
* ``local``: the margin after a greedy exact local search from there (every single-pixel move to any value of its
  range, best by margin and then by the output accumulators' difference, until no move improves);
* ``slack``: where the LP gap comes from, layer by layer: for each requantization layer ``L``, how much the LP
  minimum rises when that layer's rounding error is taken out (``q (y - z) = p acc`` imposed on each of its
  encoded neurons that cannot saturate); ``lp_exact`` is the LP minimum with every layer's rounding error taken out
  (the network without rounding, clamps relaxed as in the LP). These LPs are attributions, not relaxations: they
  say which layer's roundings a proof has to resolve (a layer with a large slack), and prove nothing.

Rows with ``lp > need`` are classes the LP already excludes (the symbolic bounds did not). An instance with
``local`` a few steps above ``need`` and ``lp`` below it is a near-tie: a counterexample is
not found and a proof needs the integrality of the roundings (see RESULTS.md).

    python benchmarks/bench_near_ties.py --model benchmarks/out/train/mlp-qaibp-r2.qnn --radius 2 --ids 126
    python benchmarks/bench_near_ties.py --model benchmarks/out/train/cnn-qaibp-r2.qnn --radius 2 --unknowns

``--unknowns`` takes the ids that ``bench_train.py`` left unknown for that model and radius (its result file).
The LP and the search are diagnostics: nothing here decides a verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ortools.linear_solver import pywraplp  # noqa: E402  (OR-Tools before anything that may load highspy)

from benchmarks.common import MNIST1000, print_table, write_json  # noqa: E402


def _value(e, sol: np.ndarray) -> float:
    if isinstance(e, (int, np.integer)):
        return float(e)
    return sum(a * sol[k] for k, a in e.terms.items()) + e.const


def _local_search(net, lo: np.ndarray, hi: np.ndarray, x: np.ndarray, c: int, j: int, need: int,
                  steps: int = 300) -> int:
    """Greedy exact descent of ``(margin, accumulator difference)`` over single-pixel moves."""
    from qverify.execute import execute

    shape = (-1, *net.input_shape)

    def score(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vals = execute(net, pts.reshape(shape))
        acc, out = vals[-2].reshape(len(pts), -1), vals[-1].reshape(len(pts), -1)
        return out[:, c] - out[:, j], acc[:, c] - acc[:, j]

    m, a = (v[0] for v in score(x[None]))
    dims = np.nonzero(hi > lo)[0]
    for _ in range(steps):
        if m <= need:
            break
        cands = []
        for dv in range(-int((hi - lo).max()), int((hi - lo).max()) + 1):
            if dv == 0:
                continue
            ok = dims[(x[dims] + dv >= lo[dims]) & (x[dims] + dv <= hi[dims])]
            if len(ok):
                cand = np.repeat(x[None], len(ok), axis=0)
                cand[np.arange(len(ok)), ok] += dv
                cands.append(cand)
        pts = np.concatenate(cands)
        ms, acs = score(pts)
        best = int(np.lexsort((acs, ms))[0])
        if (ms[best], acs[best]) >= (m, a):
            break
        x, m, a = pts[best], ms[best], acs[best]
    return int(m)


def _lp_min(net, enc, expr, exact: tuple[int, ...] = ()) -> tuple[float, np.ndarray] | None:
    """GLOP minimum of ``expr`` over the LP of ``enc``, with the rounding error of the requantization layers in
    ``exact`` (layer indices) taken out: ``q (y - z) = p acc`` on every encoded neuron whose value range stays
    inside the clamp (a saturating neuron keeps its rows). ``None`` when the LP is not solved to optimality."""
    from qverify.encode.program import LinExpr
    from qverify.solvers.ortools_mip import fill_solver

    solver = pywraplp.Solver.CreateSolver("GLOP")
    xs = fill_solver(solver, enc.program, integer=False)
    for li in exact:
        layer = net.layers[li]
        per = len(enc.layer_values[li]) // (net.shapes[li][0] if net.shapes[li] else 1)
        for n, (acc, y) in enumerate(zip(enc.layer_values[li], enc.layer_values[li + 1], strict=True)):
            if not (isinstance(y, LinExpr) and isinstance(acc, LinExpr)):
                continue
            ch = n // per
            p = int(layer.num[ch if len(layer.num) > 1 else 0])
            q = int(layer.den[ch if len(layer.den) > 1 else 0])
            z = int(layer.zero_point[ch if layer.zero_point.size > 1 else 0])
            yv = enc.program.vars[next(iter(y.terms))]
            if layer.lo < yv.lo and yv.hi < layer.hi:
                a = acc.const + sum(c * xs[k] for k, c in acc.terms.items())
                solver.Add(q * (xs[yv.index] - z) == p * a)
    obj = solver.Objective()
    obj.Clear()
    for k, a in expr.terms.items():
        obj.SetCoefficient(xs[k], float(a))
    obj.SetMinimization()
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return None
    return obj.Value() + expr.const, np.array([v.solution_value() for v in xs])


def slack_by_layer(net, enc, expr, base: float) -> tuple[dict[str, float], float | None]:
    """Per requantization layer (by name), the rise of the LP minimum of ``expr`` above ``base`` (its plain LP
    minimum, :func:`_lp_min` with nothing exact) when that layer's rounding error is taken out, and the LP minimum
    with every layer's taken out."""
    from qverify.network import Requantize

    layers = tuple(i for i, layer in enumerate(net.layers) if isinstance(layer, Requantize))
    out: dict[str, float] = {}
    for li in layers:
        one = _lp_min(net, enc, expr, (li,))
        if one is not None:
            out[net.layers[li].name or f"layer{li}"] = round(one[0] - base, 3)
    full = _lp_min(net, enc, expr, layers)
    return out, None if full is None else round(full[0], 3)


def diagnose(net, image: np.ndarray, label: int, radius: int) -> list[dict]:
    from qverify.encode import encode_network
    from qverify.execute import forward
    from qverify.property import pixels_to_grid, robustness_property
    from qverify.verify import symbolic_check

    x = pixels_to_grid(net, image[None])[0]
    prop = robustness_property(net, x, label, radius=radius)
    _, bounds = symbolic_check(net, prop)
    flat = [(lo_.ravel(), hi_.ravel()) for lo_, hi_ in bounds]
    enc = encode_network(net, prop.lo, prop.hi, flat, "range")
    lo, hi = prop.lo.ravel().astype(np.int64), prop.hi.ravel().astype(np.int64)
    rows = []
    for j in range(len(enc.outputs)):
        need = -1 if j > label else 0
        if j == label or flat[-1][0][label] - flat[-1][1][j] > need:
            continue  # the symbolic bounds exclude this class
        expr = enc.outputs[label] - enc.outputs[j]
        solved = _lp_min(net, enc, expr)
        if solved is None:
            continue
        lp, sol = solved
        xr = np.clip(np.rint([_value(e, sol) for e in enc.inputs]), lo, hi).astype(np.int64)
        out = forward(net, xr.reshape((1, *net.input_shape)))[0]
        slack, exact = slack_by_layer(net, enc, expr, lp)
        rows.append({"class": j, "need": need, "lp": round(lp, 3), "lp_round": int(out[label] - out[j]),
                     "local": _local_search(net, lo, hi, xr, label, j, need),
                     "slack": " ".join(f"{k}={v:g}" for k, v in slack.items()), "lp_exact": exact})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model file (.qnn, .onnx, ...)")
    ap.add_argument("--radius", type=int, default=2)
    ap.add_argument("--ids", type=int, nargs="*", default=[])
    ap.add_argument("--unknowns", action="store_true",
                    help="the ids bench_train.py left unknown for this model and radius (its .result.json)")
    args = ap.parse_args(argv)
    from qverify.io import load_model

    model = Path(args.model)
    net = load_model(model)
    ids = list(args.ids)
    if args.unknowns:
        state = json.loads(model.with_suffix(".result.json").read_text())
        for key, row in state["verified"].items():
            # the rows of the library's defaults (HiGHS fallback, relaxed-input program on SCIP)
            if row["r"] == args.radius and {"fallback=highs", "relax=scip"} <= set(key.split()):
                ids += [i for i in row.get("unknown_ids", []) if i not in ids]
    data = np.load(MNIST1000)
    table = []
    for i in ids:
        t = time.perf_counter()
        for row in diagnose(net, data["images"][i], int(data["labels"][i]), args.radius):
            table.append({"id": i, "label": int(data["labels"][i]), **row,
                          "seconds": round(time.perf_counter() - t, 1)})
    print_table(table, ["id", "label", "class", "need", "lp", "lp_round", "local", "slack", "lp_exact", "seconds"])
    write_json(f"near_ties_{model.stem}_r{args.radius}", {"model": str(model), "radius": args.radius, "rows": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
