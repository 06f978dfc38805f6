"""Branch and bound: split heuristics side by side, and the attack on QVIP's P1-6 instances.

Usage::

    python benchmarks/bench_bab.py [--quick] [--timeout S] [--sets dense,conv,p16] [--attack] [--json PATH]

Section 1 (``--sets``) runs :func:`qverify.bab.bab` with every split heuristic on the same instances and prints,
per heuristic: instances decided (robust / counterexample / unknown), boxes bounded (queued boxes plus the
children bounded by the look-ahead), CPU seconds, and the geometric mean of the CPU-time ratio to ``widest`` on
the instances both decided that needed branching (``widest`` bounded more than one box). The time limit is wall
time; the ratios use CPU time, which other processes on the machine do not inflate. Instance sets (all
robustness properties of the predicted class, fixed seeds):

* ``dense``: random dense nets 10-16-12-4 (inputs 0..15, power-of-two requantization), radius 3, boxes neither
  certified by intervals at the root nor falsified by the default attack (the hard, mostly robust ones);
* ``conv``: random conv nets (1x5x5 input 0..7, 3 channels, 3x3 kernel, padding 1, then dense to 4 outputs),
  radius 1, boxes neither certified by intervals nor falsified by the default attack (the hard, mostly robust
  ones);
* ``p16``: QVIP's P1-6 (MNIST 784-64-32) on the MNIST test images that the interval bounds do not certify at the
  root and that input splitting decides in the time limit: id 92 (r = 1), id 184 (r = 2), and the four non-robust
  ids 104, 115, 151, 158 (r = 2; QVIP Table 2) that the root attack decides.

Section 2 (``--attack``): :func:`qverify.attack.attack_batch` on P1-6, ids 100-199 (r = 2), 200-299 (r = 3),
300-399 (r = 4) - QVIP Table 2's instances - counting the non-robust ids found against QVIP's lists, and the time.

Runs single-threaded (``OMP_NUM_THREADS=1``; torch one thread) so that it leaves the other core alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qverify.attack import AttackSettings, attack, attack_batch  # noqa: E402
from qverify.bab import BabSettings, bab  # noqa: E402
from qverify.bounds.interval import certified_by_interval  # noqa: E402
from qverify.execute import predict  # noqa: E402
from qverify.network import QNetwork  # noqa: E402
from qverify.property import Property, pixels_to_grid, robustness_property  # noqa: E402
from tests.fixtures import MNIST1000, P1_6, random_conv_network, random_dense_network  # noqa: E402

torch.set_num_threads(1)

#: QVIP Table 2, P1-6: the non-robust ids per radius (``../shared/anchors/qvip``, sec_5_2_Table_2.csv)
QVIP_NON_ROBUST = {2: [104, 115, 151, 158], 3: [233, 257, 266, 282, 290],
                   4: [300, 303, 320, 324, 352, 359, 376, 386]}
HEURISTICS = [("bound", "bound", 0), ("lookahead-4", "lookahead", 4), ("gradient", "gradient", 0),
              ("widest", "widest", 0)]

Instance = tuple[str, QNetwork, Property]


def _undecided_instances(prefix: str, count: int, seed: int,
                         draw: Callable[[np.random.Generator], tuple[QNetwork, np.ndarray, int]]) -> list[Instance]:
    """``count`` robustness instances around the network's own prediction that neither the interval bounds nor
    the attack decide; ``draw(rng)`` gives a network, an input and a radius."""
    rng = np.random.default_rng(seed)
    out: list[Instance] = []
    while len(out) < count:
        net, x, radius = draw(rng)
        p = robustness_property(net, x, int(predict(net, x[None])[0]), radius=radius)
        if certified_by_interval(net, p)[0] or attack(net, p) is not None:
            continue
        out.append((f"{prefix}-{len(out)}", net, p))
    return out


def dense_instances(count: int) -> list[Instance]:
    return _undecided_instances("dense", count, 0, lambda rng: (
        random_dense_network(rng, n_in=10, hidden=(16, 12), n_out=4, input_hi=15, wmax=3),
        rng.integers(0, 16, size=10), 3))


def conv_instances(count: int) -> list[Instance]:
    return _undecided_instances("conv", count, 1, lambda rng: (
        random_conv_network(rng, in_shape=(1, 5, 5), channels=3, n_out=4, input_hi=7, padding=1),
        rng.integers(0, 8, size=25), 1))


def _p16() -> tuple[QNetwork, np.ndarray, np.ndarray]:
    from qverify.io.h5 import load_qvip_h5

    net = load_qvip_h5(P1_6)
    d = np.load(MNIST1000)
    return net, pixels_to_grid(net, d["images"]), d["labels"]


def p16_instances() -> list[Instance]:
    net, x, y = _p16()
    ids = [(92, 1), (184, 2), (104, 2), (115, 2), (151, 2), (158, 2)]
    return [(f"p1-6 id {i} r={r}", net, robustness_property(net, x[i], int(y[i]), radius=r)) for i, r in ids]


def run_set(name: str, instances: list[Instance], timeout: float) -> dict:
    print(f"\n== {name}: {len(instances)} instances, {timeout:g} s each ==")
    print(f"{'heuristic':<13} {'robust':>6} {'cex':>4} {'unknown':>7} {'boxes bounded':>14} {'cpu s':>8} "
          f"{'cpu / widest (geo-mean, both decided)':>40}")
    table: dict[str, list[dict]] = {}
    for label, split, k in HEURISTICS:
        rows = []
        for iname, net, prop in instances:
            c0 = time.process_time()
            res = bab(net, prop, deadline=time.monotonic() + timeout, split=split,
                      settings=BabSettings(lookahead=max(k, 1)))
            rows.append({"instance": iname, "verdict": res.verdict.value, "reason": res.reason,
                         "cpu": time.process_time() - c0, "wall": res.seconds,
                         "boxes": res.details["boxes"] + res.details["lookahead_boxes"],
                         "queued_boxes": res.details["boxes"]})
        table[label] = rows
    base = table["widest"]
    for label, rows in table.items():
        rob = sum(r["verdict"] == "robust" for r in rows)
        cex = sum(r["verdict"] == "counterexample" for r in rows)
        unk = sum(r["verdict"] == "unknown" for r in rows)
        both = [(r["cpu"], b["cpu"]) for r, b in zip(rows, base, strict=True)
                if r["verdict"] != "unknown" and b["verdict"] != "unknown" and b["boxes"] > 1]
        logs = [math.log(max(a, 1e-4) / max(b, 1e-4)) for a, b in both]
        geo = math.exp(sum(logs) / len(logs)) if logs else float("nan")
        print(f"{label:<13} {rob:>6} {cex:>4} {unk:>7} {sum(r['boxes'] for r in rows):>14} "
              f"{sum(r['cpu'] for r in rows):>8.1f} {geo:>34.2f} ({len(both)})")
    print("per instance (verdict, boxes bounded, cpu s):")
    for i, (iname, _, _) in enumerate(instances):
        cells = "  ".join(f"{label}: {table[label][i]['verdict'][:3]} {table[label][i]['boxes']} "
                          f"{table[label][i]['cpu']:.2f}" for label, _, _ in HEURISTICS)
        print(f"  {iname:<18} {cells}")
    return table


def run_attack(radii: list[int]) -> dict:
    net, x, y = _p16()
    out = {}
    print("\n== attack on P1-6 (QVIP Table 2 instances) ==")
    for r in radii:
        ids = list(range((r - 1) * 100, r * 100))
        props = [robustness_property(net, x[i], int(y[i]), radius=r) for i in ids]
        mis = {i for i in ids if predict(net, x[i][None])[0] != y[i]}
        c0, t0 = time.process_time(), time.monotonic()
        stats: dict = {}
        res = attack_batch(net, props, AttackSettings(), stats=stats)
        cpu, wall = time.process_time() - c0, time.monotonic() - t0
        found = {i for i, c in zip(ids, res, strict=True) if c is not None}
        nonrob = sorted(found - mis)
        qv = QVIP_NON_ROBUST.get(r, [])
        print(f"r={r} ids {ids[0]}-{ids[-1]}: non-robust found {len(nonrob)} (QVIP: {len(qv)}; missed "
              f"{sorted(set(qv) - set(nonrob))}, beyond QVIP {sorted(set(nonrob) - set(qv))}), misclassified "
              f"{len(found & mis)}/{len(mis)} at the centre; {wall:.1f} s wall, {cpu:.1f} s cpu for 100 properties")
        out[r] = {"found": nonrob, "qvip": qv, "misclassified": sorted(mis), "cpu": cpu, "wall": wall,
                  "phases": {i: ph for i, ph in zip(ids, stats["phases"], strict=True) if ph}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer instances, shorter time limit")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per instance and heuristic")
    ap.add_argument("--sets", default="dense,conv,p16")
    ap.add_argument("--attack", action="store_true", help="also run the P1-6 attack measurement")
    ap.add_argument("--json", default=None, help="write the raw figures here")
    a = ap.parse_args()
    timeout = a.timeout or (5.0 if a.quick else 20.0)
    count = 4 if a.quick else 10
    result: dict = {"timeout": timeout}
    sets = [s for s in a.sets.split(",") if s]
    have_p16 = P1_6.exists() and MNIST1000.exists()
    for name in sets:
        if name == "dense":
            result[name] = run_set(name, dense_instances(count), timeout)
        elif name == "conv":
            result[name] = run_set(name, conv_instances(count), timeout)
        elif name == "p16" and have_p16:
            result[name] = run_set(name, p16_instances(), timeout)
    if a.attack and have_p16:
        result["attack"] = run_attack([2, 3, 4])
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
