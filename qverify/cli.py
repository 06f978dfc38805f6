"""The ``qverify`` command line: the only module that reads argv, prints, and sets exit codes.

Exit codes (all commands): 0 success; 2 usage error (argparse); 3 bad input (model, property or data file: the
message names the file and the place). ``qverify verify`` with one property: 0 robust, 10 counterexample,
20 unknown (timeout, memory, incomplete method), 3 error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EXIT_OK = 0
EXIT_BAD_INPUT = 3
EXIT_COUNTEREXAMPLE = 10
EXIT_UNKNOWN = 20


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 3."""


# ----------------------------------------------------------------------------------------------- helpers
def _load(args: argparse.Namespace, path: str | None = None):
    from qverify.io import load_model

    return load_model(path or args.model, fmt=getattr(args, "format", None), bits=getattr(args, "bits", None),
                      input_bits=getattr(args, "input_bits", None))


def _load_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    from qverify.io.datasets import load_npz

    return load_npz(path)


def _parse_ids(spec: str | None, n: int) -> list[int]:
    """``0:100``, ``5``, ``1,4,9`` or ``10:20,30`` (python slices, end exclusive)."""
    if not spec:
        return list(range(n))
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                ids.extend(range(int(a or 0), int(b) if b else n))
            else:
                ids.append(int(part))
        except ValueError:
            raise CliError(f"--ids: cannot parse {part!r} (use e.g. 0:100 or 1,4,9)") from None
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise CliError(f"--ids: {bad[:5]} outside the data set's {n} samples")
    return ids


def _model_args(p: argparse.ArgumentParser, name: str = "model") -> None:
    p.add_argument(name, help="model file: .qnn (native), .onnx (QDQ or QOperator), .h5 (QVIP/AAAI'21 with --format)")
    p.add_argument("--format", choices=["native", "onnx", "qvip-h5"], default=None,
                   help="model format (default: from the extension)")
    p.add_argument("--bits", type=int, default=None, help="Q, bit width of a QVIP .h5 model (default: from the name)")
    p.add_argument("--input-bits", type=int, default=None, help="IN, input bits of a QVIP .h5 model")


# ----------------------------------------------------------------------------------------------- commands
def cmd_convert(args: argparse.Namespace) -> int:
    from qverify.io import save_model

    net = _load(args, args.src)
    save_model(net, args.output)
    print(f"wrote {args.output}: {net.name}, {len(net.layers)} layers, {net.parameter_count()} parameters")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    net = _load(args)
    rows = net.describe()
    if args.json:
        print(json.dumps({"name": net.name, "input_shape": net.input_shape, "input_grid": [net.input_lo, net.input_hi],
                          "input_scale": str(net.input_scale), "output_scale": str(net.output_scale),
                          "parameters": net.parameter_count(), "fixed_point": net.is_fixed_point(),
                          "metadata": net.metadata, "layers": rows}, default=str))
        return EXIT_OK
    print(f"{net.name}: input {net.input_shape} on the integer grid [{net.input_lo}, {net.input_hi}] "
          f"(real = {net.input_scale} * (x - {net.input_zero_point})), {net.num_outputs} outputs "
          f"(real = {net.output_scale} * (y - {net.output_zero_point})), argmax ties: {net.tie_rule}")
    print(f"{'#':>3}  {'layer':<11} {'name':<28} {'shape':<16} {'values':<22} {'params':>8}  details")
    for r in rows:
        det = []
        if "weight_bits" in r:
            det.append(f"weights {r['weight_bits']}")
        if "requant" in r:
            det.append(f"{r['requant']} {r['rounding']}")
        lo, hi = r["range"]
        print(f"{r['index']:>3}  {r['kind']:<11} {str(r['name'])[:28]:<28} {str(r['shape']):<16} "
              f"{r['bits'] + f' [{lo}, {hi}]':<22} {r.get('params', ''):>8}  {', '.join(det)}")
    kind = "fixed point (power-of-two scales)" if net.is_fixed_point() else "affine scales"
    print(f"parameters: {net.parameter_count()}; requantization: {kind}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from qverify.execute import predict
    from qverify.property import pixels_to_grid

    net = _load(args)
    images, labels = _load_data(args.data)
    ids = _parse_ids(args.ids, len(images))
    x = pixels_to_grid(net, images[ids])
    pred = predict(net, x)
    acc = float(np.mean(pred == labels[ids])) if len(ids) else 0.0
    if args.json:
        print(json.dumps({"model": net.name, "data": args.data, "n": len(ids), "accuracy": acc,
                          "predictions": [int(p) for p in pred]}))
    else:
        print(f"{net.name} on {args.data}: accuracy {acc:.4f} ({int(np.sum(pred == labels[ids]))}/{len(ids)})")
    return EXIT_OK


def cmd_property(args: argparse.Namespace) -> int:
    from qverify.io.vnnlib import write_robustness_properties

    if (args.radius is None) == (args.eps is None):
        raise CliError("give exactly one of --radius (input units) and --eps (real units)")
    images, labels = _load_data(args.data)
    if args.model:
        net = _load(args)
    else:
        from qverify.network import pixel_units_network

        n_out = args.num_outputs or int(labels.max()) + 1
        net = pixel_units_network(images.shape[1:], n_out)
    ids = _parse_ids(args.ids, len(images))
    paths = write_robustness_properties(net, images, labels, ids, out_dir=args.output, radius=args.radius,
                                        eps=args.eps)
    print(f"wrote {len(paths)} properties to {args.output}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from qverify import __version__

    p = argparse.ArgumentParser(prog="qverify", description="Bit-exact verification of quantized neural networks.")
    p.add_argument("--version", action="version", version=f"qverify {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a model (ONNX, QVIP .h5) to the native .qnn format",
                       description="Convert a supported model into qverify's native format.")
    _model_args(c, "src")
    c.add_argument("-o", "--output", required=True, help="destination .qnn file")
    c.set_defaults(func=cmd_convert)

    c = sub.add_parser("info", help="layers, bit widths and parameter count of a model",
                       description="Describe a model: layers, value ranges and bit widths, parameters.")
    _model_args(c)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_info)

    c = sub.add_parser("run", help="run the exact integer executor on a data file and print accuracy",
                       description="Run the executor on DATA.npz (arrays 'images' and 'labels').")
    _model_args(c)
    c.add_argument("data", help=".npz with 'images' (raw pixels) and 'labels'")
    c.add_argument("--ids", default=None, help="samples to run, e.g. 0:100 (default: all)")
    c.add_argument("--json", action="store_true", help="print {'predictions': [...], 'accuracy': ...}")
    c.set_defaults(func=cmd_run)

    c = sub.add_parser("property", help="write VNN-LIB robustness properties for samples of a data file",
                       description="Write one VNN-LIB local-robustness property per sample.")
    c.add_argument("data", help=".npz with 'images' and 'labels'")
    c.add_argument("--model", default=None,
                   help="model the properties are for (sets the real input/output units and the number of outputs; "
                        "default: real input = pixel / 256, outputs as given by --num-outputs)")
    c.add_argument("--num-outputs", type=int, default=None,
                   help="number of outputs Y_j without --model (default: largest label + 1)")
    c.add_argument("--format", choices=["native", "onnx", "qvip-h5"], default=None, help="model format")
    c.add_argument("--bits", type=int, default=None, help="Q of a QVIP .h5 model")
    c.add_argument("--input-bits", type=int, default=None, help="IN of a QVIP .h5 model")
    c.add_argument("--ids", default=None, help="samples, e.g. 0:100 (default: all)")
    c.add_argument("--radius", type=int, default=None, help="L-inf radius in input units (pixels)")
    c.add_argument("--eps", default=None, help="L-inf radius in real input units (e.g. 0.02)")
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.set_defaults(func=cmd_property)

    return p


def main(argv: Sequence[str] | None = None) -> int:
    from qverify.io.datasets import DataError
    from qverify.network import ModelError
    from qverify.property import PropertyError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ModelError, PropertyError, DataError, CliError, FileNotFoundError) as e:
        print(f"qverify {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"qverify {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
