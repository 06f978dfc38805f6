"""Executor throughput: exact integer forward pass vs a plain float32 forward pass of the same network.

    python benchmarks/bench_executor.py [--batch 1000] [--repeats 7]

Networks: QVIP's P1-6 (784-64-32, fixed point) on the 1000 MNIST test images, and a convolutional network
(1x28x28 -> conv 16 4x4 s2 -> conv 32 4x4 s2 -> dense 100 -> 10, 8-bit affine per-channel requantization with
random integer weights). The float baseline runs the same weights in float32 (torch, and numpy matmul for the MLP)
with no rounding: the physical floor for a forward pass.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MNIST1000, P1_6, median_time, print_table, write_json  # noqa: E402
from qverify.execute import forward  # noqa: E402
from qverify.io.h5 import load_qvip_h5  # noqa: E402
from qverify.network import Conv2d, Dense, Flatten, QNetwork, Requantize  # noqa: E402


def conv_model(seed: int = 0) -> QNetwork:
    rng = np.random.default_rng(seed)
    c1 = Conv2d(rng.integers(-127, 128, (16, 1, 4, 4)), rng.integers(-2000, 2000, 16), stride=(2, 2),
                padding=(1, 1, 1, 1))
    c2 = Conv2d(rng.integers(-127, 128, (32, 16, 4, 4)), rng.integers(-2000, 2000, 32), stride=(2, 2),
                padding=(1, 1, 1, 1))
    d1 = Dense(rng.integers(-127, 128, (100, 32 * 7 * 7)), rng.integers(-2000, 2000, 100))
    d2 = Dense(rng.integers(-127, 128, (10, 100)), rng.integers(-2000, 2000, 10))

    def rq(c: int, lo: int, hi: int) -> Requantize:
        return Requantize.affine([Fraction(1, int(v)) * Fraction(0.37) for v in rng.integers(200, 3000, c)],
                                 np.zeros(c, int), lo, hi, "half_even")

    return QNetwork((1, 28, 28), 0, 255, (c1, rq(16, 0, 255), c2, rq(32, 0, 255), Flatten(), d1, rq(100, 0, 255),
                                          d2, rq(10, -128, 127)), name="conv-8bit")


def torch_float(net: QNetwork) -> torch.nn.Module:
    mods: list[torch.nn.Module] = []
    for layer in net.layers:
        if isinstance(layer, Dense):
            m = torch.nn.Linear(layer.weight.shape[1], layer.weight.shape[0])
            m.weight.data = torch.tensor(layer.weight, dtype=torch.float32)
            m.bias.data = torch.tensor(layer.bias, dtype=torch.float32)
            mods.append(m)
        elif isinstance(layer, Conv2d):
            o, c, kh, kw = layer.weight.shape
            m = torch.nn.Conv2d(c, o, (kh, kw), stride=layer.stride, padding=layer.padding[:2])
            m.weight.data = torch.tensor(layer.weight, dtype=torch.float32)
            m.bias.data = torch.tensor(layer.bias, dtype=torch.float32)
            mods.append(m)
        elif isinstance(layer, Flatten):
            mods.append(torch.nn.Flatten())
        else:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    d = np.load(MNIST1000)
    images = d["images"][: args.batch]
    rows = []
    for net in (load_qvip_h5(P1_6), conv_model()):
        x = images.reshape(len(images), *net.input_shape).astype(np.int64)
        tf = torch_float(net)
        xt = torch.tensor(x, dtype=torch.float32)
        t_exact = median_time(lambda net=net, x=x: forward(net, x), args.repeats)
        with torch.no_grad():
            t_torch = median_time(lambda tf=tf, xt=xt: tf(xt), args.repeats)
        rows.append({"network": net.name, "batch": len(x), "exact_s": t_exact, "exact_img_per_s": len(x) / t_exact,
                     "float32_torch_s": t_torch, "float32_img_per_s": len(x) / t_torch,
                     "ratio_exact_over_float": t_exact / t_torch})
    print_table(rows, ["network", "batch", "exact_s", "exact_img_per_s", "float32_torch_s", "float32_img_per_s",
                       "ratio_exact_over_float"])
    print("wrote", write_json("executor", {"rows": rows, "args": vars(args)}))


if __name__ == "__main__":
    main()
