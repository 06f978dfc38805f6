"""How often onnxruntime's float32 requantization parts from the exact one, and what the float32 semantics costs.

Section 1 (rates): for random float32 scale triples ``(s_x, s_w, s_y)`` (log-uniform, as calibration produces) and
accumulators drawn uniformly from ``[-A, A]``, the fraction of accumulators where
``rne(fl32(fl32(acc) m32))`` (``m32 = fl32(fl32(s_x s_w) / s_y)``, :func:`qverify.quant.f32_round`) differs from the
exact ``R(acc s_x s_w / s_y)`` (half to even), per accumulator range ``A``.

Section 2 (cost): time of the cut points (:func:`qverify.quant.f32_thresholds`) and exact error bounds
(:func:`qverify.quant.f32_error_bounds`) of one 8-bit channel, against the rational thresholds.

    python benchmarks/bench_float32_requant.py [--triples 2000] [--accs 20000]

Prints tables and writes ``benchmarks/out/float32_requant.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_json  # noqa: E402
from qverify.quant import (  # noqa: E402
    Rounding,
    f32_error_bounds,
    f32_round,
    f32_thresholds,
    multiply_round,
    thresholds,
)

F32 = np.float32


def rates(n_triples: int, n_accs: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for amax in (2**12, 2**16, 2**20, 2**24, 2**28):
        diff = total = 0
        for _ in range(n_triples):
            sx, sw = (F32(10.0 ** rng.uniform(-3.5, -1)) for _ in range(2))
            acc = rng.integers(-amax, amax + 1, size=n_accs)
            # an output scale that puts the accumulators of this range on about 256 levels
            sy = F32(float(sx) * float(sw) * amax / 128 * 10.0 ** rng.uniform(-0.3, 0.3))
            m32 = (sx * sw) / sy
            m = Fraction(float(sx)) * Fraction(float(sw)) / Fraction(float(sy))
            exact = multiply_round(acc, np.array([m.numerator], dtype=object), np.array([m.denominator], dtype=object),
                                   Rounding.HALF_EVEN)
            diff += int(np.count_nonzero(f32_round(acc, m32) != np.asarray(exact, dtype=np.int64)))
            total += n_accs
        rows.append({"acc_range": f"2^{amax.bit_length() - 1}", "accumulators": total, "differ": diff,
                     "rate": f"{diff / total:.2e}"})
    return rows


def cost() -> list[dict]:
    m = F32(0.0123)
    f = Fraction(float(m))
    rows = []
    for name, fn in (("f32_thresholds (255 cuts)", lambda: f32_thresholds(np.arange(-127, 128), m)),
                     ("f32_error_bounds (one channel)", lambda: f32_error_bounds(float(m), 3, -128, 127)),
                     ("rational thresholds (255 cuts)", lambda: thresholds(range(-127, 128), f.numerator,
                                                                           f.denominator, Rounding.HALF_EVEN))):
        fn()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        rows.append({"what": name, "ms": f"{(time.perf_counter() - t) / 20 * 1e3:.2f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triples", type=int, default=2000)
    ap.add_argument("--accs", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    r = rates(args.triples, args.accs, args.seed)
    print("float32 vs exact requantization: accumulators that round differently")
    print_table(r, ["acc_range", "accumulators", "differ", "rate"])
    c = cost()
    print("\ncost of the float32 cut points")
    print_table(c, ["what", "ms"])
    write_json("float32_requant", {"rates": r, "cost": c, "triples": args.triples, "accs": args.accs,
                                 "seed": args.seed})


if __name__ == "__main__":
    main()
