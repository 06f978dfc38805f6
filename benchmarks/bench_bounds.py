"""Bound throughput and certification power.

    python benchmarks/bench_bounds.py [--boxes 10000] [--repeats 3] [--no-certify] [--no-affine-conv]

1. Throughput: exact integer interval bounds (every layer, and output only) for ``--boxes`` input boxes
   (MNIST test images tiled, L-inf radius 1..4 cycling) as a ratio to a plain exact forward pass
   (:func:`qverify.execute.forward`) of the box centers, same batch; medians over ``--repeats`` runs after a
   warm-up. Networks: QVIP's P1-6 (784-64-32, power-of-two requantization), a convolutional network built here
   with random integer weights and power-of-two shifts calibrated on the images (1x28x28 -> conv 16 4x4 s2 ->
   conv 32 4x4 s2 -> dense 100 -> 10), and the same architecture with affine per-channel requantization (float
   scales, the ONNX case; ``benchmarks/bench_executor.py``'s model). Symbolic bounds of P1-6 are timed on 400
   boxes for reference.
2. Certification (QVIP Table 2 instances, P1-6, ids 0-399, r = 1..4): robustness properties proved by interval
   and by symbolic bounds, mean fixed neurons per box, and times.

Prints tables and writes ``benchmarks/out/bench_bounds.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MNIST1000, P1_6, median_time, print_table, write_json  # noqa: E402
from qverify.bounds.interval import certified_by_interval, interval_bounds, interval_output_bounds  # noqa: E402
from qverify.bounds.symbolic import certified_by_symbolic, symbolic_analysis  # noqa: E402
from qverify.execute import execute, forward, predict  # noqa: E402
from qverify.io.h5 import load_qvip_h5  # noqa: E402
from qverify.network import Conv2d, Dense, Flatten, QNetwork, Requantize  # noqa: E402
from qverify.property import pixels_to_grid, robustness_property  # noqa: E402

#: QVIP Table 2, P1-6 robust counts (ids 0-99 r=1, 100-199 r=2, 200-299 r=3, 300-399 r=4)
QVIP_ROBUST = {1: 99, 2: 95, 3: 91, 4: 89}


def conv_pow2_model(images: np.ndarray, seed: int = 0) -> QNetwork:
    """1x28x28 -> conv 16 4x4 s2 p1 -> conv 32 4x4 s2 p1 -> dense 100 -> 10, int8 weights, fixed point:
    each shift is the smallest k with the 99th percentile of |acc| / 2^k within the 8-bit output range on
    ``images`` (so the activations are neither all zero nor all saturated)."""
    rng = np.random.default_rng(seed)
    specs = [Conv2d(rng.integers(-128, 128, (16, 1, 4, 4)), rng.integers(-4000, 4000, 16), stride=(2, 2),
                    padding=(1, 1, 1, 1), name="conv1"),
             Conv2d(rng.integers(-128, 128, (32, 16, 4, 4)), rng.integers(-4000, 4000, 32), stride=(2, 2),
                    padding=(1, 1, 1, 1), name="conv2"),
             Flatten(),
             Dense(rng.integers(-128, 128, (100, 32 * 7 * 7)), rng.integers(-4000, 4000, 100), name="fc1"),
             Dense(rng.integers(-128, 128, (10, 100)), rng.integers(-4000, 4000, 10), name="fc2")]
    layers: list = []
    x = images.reshape(len(images), 1, 28, 28).astype(np.int64)
    for k, spec in enumerate(specs):
        layers.append(spec)
        if isinstance(spec, Flatten):
            continue
        last = k == len(specs) - 1
        lo, hi = (-128, 127) if last else (0, 255)
        probe = QNetwork((1, 28, 28), 0, 255, (*layers, Requantize.pow2(0, -(2**40), 2**40), Flatten()))
        acc = execute(probe, x)[-3]
        p99 = float(np.percentile(np.abs(acc), 99)) + 1
        shift = max(0, int(np.ceil(np.log2(p99 / hi))))
        layers.append(Requantize.pow2(shift, lo, hi, "half_up", name=f"rq{k}"))
    return QNetwork((1, 28, 28), 0, 255, tuple(layers), name="conv-pow2")


def boxes(images: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.tile(images.reshape(len(images), -1).astype(np.int64), (n // len(images) + 1, 1))[:n]
    r = (np.arange(n) % 4 + 1)[:, None]
    return x, np.maximum(x - r, 0), np.minimum(x + r, 255)


def throughput(nets: list[QNetwork], images: np.ndarray, n: int, repeats: int) -> list[dict]:
    rows = []
    for net in nets:
        x, lo, hi = boxes(images, n)
        t_fwd = median_time(lambda net=net, x=x: forward(net, x), repeats)
        t_all = median_time(lambda net=net, lo=lo, hi=hi: interval_bounds(net, lo, hi), repeats)
        t_out = median_time(lambda net=net, lo=lo, hi=hi: interval_output_bounds(net, lo, hi), repeats)
        rows.append({"network": net.name, "boxes": n, "forward_s": t_fwd, "interval_all_s": t_all,
                     "interval_out_s": t_out, "ratio_all": t_all / t_fwd, "ratio_out": t_out / t_fwd,
                     "boxes_per_s": n / t_out})
    return rows


def certification(net: QNetwork, x: np.ndarray, labels: np.ndarray) -> list[dict]:
    rows = []
    for r in (1, 2, 3, 4):
        ids = list(range(100 * (r - 1), 100 * r))
        props = [robustness_property(net, x[i], int(labels[i]), radius=r) for i in ids]
        correct = int((predict(net, x[ids]) == labels[ids]).sum())
        t = time.perf_counter()
        ci = certified_by_interval(net, props)
        t_i = time.perf_counter() - t
        t = time.perf_counter()
        cs = certified_by_symbolic(net, props)
        t_s = time.perf_counter() - t
        lo = np.stack([p.lo for p in props])
        hi = np.stack([p.hi for p in props])
        ana = symbolic_analysis(net, lo, hi)
        fixed_i = sum(int(v.sum()) for v in ana.fixed_counts("interval").values()) / len(ids)
        fixed_s = sum(int(v.sum()) for v in ana.fixed_counts().values()) / len(ids)
        rows.append({"r": r, "ids": f"{ids[0]}-{ids[-1]}", "correct": correct, "qvip_robust": QVIP_ROBUST[r],
                     "interval": int(ci.sum()), "symbolic": int(cs.sum()), "interval_s": t_i, "symbolic_s": t_s,
                     "fixed_interval": fixed_i, "fixed_symbolic": fixed_s})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-certify", action="store_true")
    ap.add_argument("--no-affine-conv", action="store_true", help="skip the (slow, object-arithmetic) affine conv")
    args = ap.parse_args()
    data = np.load(MNIST1000)
    images, labels = data["images"], data["labels"]
    p16 = load_qvip_h5(P1_6)
    nets = [p16, conv_pow2_model(images[:200])]
    if not args.no_affine_conv:
        from benchmarks.bench_executor import conv_model

        nets.append(conv_model())
    payload: dict = {"boxes": args.boxes, "repeats": args.repeats}
    rows = throughput(nets, images, args.boxes, args.repeats)
    print(f"\nInterval bounds vs exact forward pass, {args.boxes} boxes (median of {args.repeats})")
    print_table(rows, ["network", "boxes", "forward_s", "interval_all_s", "interval_out_s", "ratio_all",
                       "ratio_out", "boxes_per_s"])
    payload["throughput"] = rows
    _, lo, hi = boxes(images, 400)
    t_sym = median_time(lambda: symbolic_analysis(p16, lo, hi), 1)
    payload["symbolic_p1_6_400_boxes_s"] = t_sym
    print(f"\nsymbolic bounds (every layer), P1-6, 400 boxes: {t_sym:.3f} s ({400 / t_sym:.0f} boxes/s)")
    if not args.no_certify:
        x = pixels_to_grid(p16, images)
        cert = certification(p16, x, labels)
        print("\nP1-6, QVIP Table 2 instances: robustness properties certified")
        print_table(cert, ["r", "ids", "correct", "qvip_robust", "interval", "symbolic", "interval_s", "symbolic_s",
                           "fixed_interval", "fixed_symbolic"])
        payload["certification"] = cert
    path = write_json("bench_bounds", payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
