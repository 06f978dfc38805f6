"""Randomized smoothing of integer networks: certified accuracy, ACR, sampling throughput, incremental speed-up.

    python benchmarks/bench_smooth.py [--images 100] [--n 10000] [--n0 100] [--sigma 0.25 ...] [--alpha 0.001]
                                      [--n-p N] [--train-epochs 5]

Models (all 784-100-10 MLPs on native 8-bit pixels, real input v = x / 256, so sigma is in [0, 1] pixel units up
to the factor 256/255):

* ``w8a8``: the bundled ``qverify/data/mnist_mlp_qaibp.qnn`` (8-bit, QA-IBP trained; not trained with noise);
* ``w4a8-ptq``: its weights and biases rounded to 4 bits (``rne(W / 16)``, the requantization shift lowered by 4):
  the quantized variant incremental smoothing is made for;
* ``w4a4-qat``: a 4-bit weight / 4-bit activation model trained by ``qverify train`` (plain QAT, the bundled
  config with ``quant.weight_bits = quant.act_bits = 4``, ``--train-epochs`` epochs).

Data: the first ``--images`` MNIST test images of ``../shared/data/mnist_test_first1000.npz``. For each sigma:
CERTIFY (n0, n, alpha) of every model (the reference ``w8a8`` caching its per-sample predictions), certified
accuracy at l2 radii 0.25 / 0.5 / 1.0 and ACR; incremental re-certification (Ugare et al. 2024; n_p = n / 10 by
default) of the two 4-bit models from the ``w8a8`` certificate, falling back to a full CERTIFY (``full``) or
abstaining (``abstain``) where the bound is too weak, with its time against the full run (ratio of CPU seconds of
this process, which a machine shared with other jobs distorts less than wall time; wall time beside it).
Throughput: noisy inputs classified per second by the integer executor and by the float32 torch model of the same
weights (no rounding, ``bench_executor.torch_float``), on the same 10000 quantized noisy inputs (ratio), and
end-to-end (noise generation and exact quantization included) during the full runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_executor import torch_float  # noqa: E402
from benchmarks.common import MNIST1000, ROOT, print_table, write_json  # noqa: E402
from qverify.io import load_model  # noqa: E402
from qverify.network import Dense, QNetwork, Requantize  # noqa: E402
from qverify.smooth import Engine, InputQuantizer, Sampler, centers, smooth  # noqa: E402

BUNDLED = ROOT / "qverify" / "data" / "mnist_mlp_qaibp.qnn"
CONFIG = ROOT / "qverify" / "data" / "mnist_mlp_qaibp.toml"


def ptq_weights(net: QNetwork, drop: int) -> QNetwork:
    """The same network with every dense layer's weights and bias divided by ``2^drop`` (rounded half to even)
    and the power-of-two requantization after it shifted ``drop`` bits less."""
    layers = []
    for layer in net.layers:
        if isinstance(layer, Dense):
            layer = Dense(np.rint(layer.weight / 2**drop).astype(np.int64),
                          np.rint(layer.bias / 2**drop).astype(np.int64), name=layer.name)
        elif isinstance(layer, Requantize) and layer.shift is not None:
            layer = Requantize.pow2(layer.shift - drop, layer.lo, layer.hi, layer.rounding)
        layers.append(layer)
    ws = [layer.weight for layer in layers if isinstance(layer, Dense)]
    lo, hi = min(int(w.min()) for w in ws), max(int(w.max()) for w in ws)
    bits = next(b for b in range(1, 64) if -(2 ** (b - 1)) <= lo and hi < 2 ** (b - 1))
    return QNetwork(net.input_shape, net.input_lo, net.input_hi, tuple(layers), input_scale=net.input_scale,
                    input_zero_point=net.input_zero_point, name=f"{net.name}-w{bits}ptq",
                    metadata={**net.metadata, "weight_bits": str(bits)})


def train_4bit(epochs: int) -> QNetwork:
    from qverify.train import load_config, train

    cfg = load_config(str(CONFIG), ["quant.weight_bits=4", "quant.act_bits=4", "train.method=qat",
                                    f"train.epochs={epochs}", "train.lr_milestones=[]", "progress=false",
                                    "name=mnist_mlp_w4a4_qat"])
    return train(cfg).network("mnist_mlp_w4a4_qat")


def throughput(net: QNetwork, images: np.ndarray, sigma: float, rows: int = 10_000) -> dict:
    """Classified noisy inputs per second: the integer executor vs the float32 torch model, same inputs."""
    r0, _ = centers(net, images[:1])
    smp = Sampler(InputQuantizer.of(net), r0[0], None, sigma, 0, 0)
    x = np.concatenate(list(smp.batches(1, rows, rows)))
    eng = Engine(net, "numpy")
    fl = torch_float(net).eval()
    xt = torch.tensor(x.reshape(-1, *net.input_shape), dtype=torch.float32)

    def best(fn) -> float:  # noqa: ANN001
        fn()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    t_int = best(lambda: eng.classes(x))
    with torch.no_grad():
        t_float = best(lambda: fl(xt).argmax(1))
    return {"model": net.name, "int_per_s": rows / t_int, "float_per_s": rows / t_float,
            "int_over_float": t_float / t_int}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.25])
    ap.add_argument("--n-p", type=int, default=None)
    ap.add_argument("--train-epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = np.load(MNIST1000)
    images, labels = d["images"][:args.images], d["labels"][:args.images]
    t = time.perf_counter()
    w8 = load_model(str(BUNDLED))
    ptq = ptq_weights(w8, 4)
    qat = train_4bit(args.train_epochs)
    t_train = time.perf_counter() - t
    models = {"w8a8": w8, "w4a8-ptq": ptq, "w4a4-qat": qat}
    rows, inc_rows = [], []
    kw = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch=1000, seed=0, progress=False, device="numpy")
    with tempfile.TemporaryDirectory() as tmp:
        for sigma in args.sigma:
            ref_path = Path(tmp) / f"w8a8_{sigma}.jsonl"
            full, cpu = {}, {}
            for name, net in models.items():
                path = ref_path if name == "w8a8" else Path(tmp) / f"{name}_{sigma}.jsonl"
                c0 = time.process_time()
                s = smooth(net, images, labels, sigma, results_path=path, cache_predictions=name == "w8a8", **kw)
                full[name] = s
                cpu[name] = time.process_time() - c0
                print(f"sigma {sigma} {name}: {s.wall_seconds:.1f} s", file=sys.stderr)
                summ = s.summary([0.25, 0.5, 1.0])
                rows.append({"sigma": sigma, "model": name, "clean": summ["clean_accuracy"],
                             **{f"cert@{c['radius']:g}": c["certified_accuracy"] for c in summ["certified"]},
                             "ACR": summ["acr"], "abstain": summ["abstain"], "seconds": s.wall_seconds,
                             "samples_per_s": s.samples_per_second})
            for name in ("w4a8-ptq", "w4a4-qat"):
                for fb in ("full", "abstain"):
                    c0 = time.process_time()
                    s = smooth(models[name], images, labels, sigma, reuse=ref_path, n_p=args.n_p, fallback=fb,
                               results_path=Path(tmp) / f"{name}_{sigma}_inc_{fb}.jsonl", **kw)
                    c_inc = time.process_time() - c0
                    summ = s.summary([0.25, 0.5, 1.0])
                    fs = full[name].summary([0.25, 0.5, 1.0])
                    inc_rows.append({"sigma": sigma, "model": name, "fallback": fb, "n_p": s.header["reuse"]["n_p"],
                                     "inc/fb": f"{summ['incremental']}/{summ['fallback']}",
                                     **{f"cert@{c['radius']:g}": c["certified_accuracy"] for c in summ["certified"]},
                                     "ACR": summ["acr"], "full ACR": fs["acr"], "inc cpu s": c_inc,
                                     "full cpu s": cpu[name], "cpu ratio": cpu[name] / c_inc,
                                     "wall ratio": full[name].wall_seconds / s.wall_seconds})
                    print(f"sigma {sigma} {name} incremental ({fb}): {s.wall_seconds:.1f} s", file=sys.stderr)
    thr = [throughput(net, images, args.sigma[0]) for net in models.values()]
    print(f"{args.images} MNIST test images, n0 {args.n0}, n {args.n}, alpha {args.alpha}; models trained/derived "
          f"in {t_train:.1f}s; executor: numpy, {args.threads} torch thread(s)")
    print("\nCertified accuracy (l2 radius in real input units, v = x / 256) and ACR")
    print_table(rows, ["sigma", "model", "clean", "cert@0.25", "cert@0.5", "cert@1", "ACR", "abstain", "seconds",
                       "samples_per_s"])
    print("(samples_per_s: noise generation, exact quantization and the executor, end to end)")
    print("\nIncremental re-certification from the w8a8 certificate (cached predictions) vs a full run")
    print_table(inc_rows, ["sigma", "model", "fallback", "n_p", "inc/fb", "cert@0.25", "cert@0.5", "cert@1", "ACR",
                           "full ACR", "inc cpu s", "full cpu s", "cpu ratio", "wall ratio"])
    print("\nThroughput: noisy inputs classified per second (10000 inputs, one batch)")
    print_table(thr, ["model", "int_per_s", "float_per_s", "int_over_float"])
    path = write_json("bench_smooth", {"args": vars(args), "certified": rows, "incremental": inc_rows,
                                       "throughput": thr, "train_seconds": t_train})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
