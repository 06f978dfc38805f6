"""qverify's native model format (``.qnn``): a zip archive holding ``manifest.json`` and one ``.npy`` per array.

Self-describing (every layer's kind and fields are named in the manifest), versioned (``format_version``), and safe
to load: arrays are read with ``allow_pickle=False`` and the manifest is plain JSON; nothing is executed.
Exact multipliers and scales are stored as ``"num/den"`` strings.
"""

from __future__ import annotations

import io
import json
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from qverify.network import Clamp, Conv2d, Dense, Flatten, Layer, ModelError, QNetwork, Requantize

FORMAT = "qverify-qnn"
FORMAT_VERSION = 1


def _frac(f: Fraction) -> str:
    return f"{f.numerator}/{f.denominator}"


def _layer_manifest(i: int, layer: Layer, arrays: dict[str, np.ndarray]) -> dict:
    def arr(field: str, a: np.ndarray) -> str:
        key = f"arrays/{i}_{field}.npy"
        arrays[key] = np.ascontiguousarray(a, dtype=np.int64)
        return key

    kind = type(layer).__name__
    d: dict = {"kind": kind, "name": getattr(layer, "name", "")}
    if isinstance(layer, Dense):
        d.update(weight=arr("weight", layer.weight), bias=arr("bias", layer.bias))
    elif isinstance(layer, Conv2d):
        d.update(weight=arr("weight", layer.weight), bias=arr("bias", layer.bias), stride=list(layer.stride),
                 padding=list(layer.padding), dilation=list(layer.dilation), pad_value=layer.pad_value)
    elif isinstance(layer, Requantize):
        d.update(multiplier=[_frac(m) for m in layer.multipliers()], zero_point=arr("zero_point", layer.zero_point),
                 lo=layer.lo, hi=layer.hi, rounding=layer.rounding.value)
    elif isinstance(layer, Clamp):
        d.update(lo=layer.lo, hi=layer.hi)
    elif not isinstance(layer, Flatten):
        raise ModelError(f"cannot save layer {i} of kind {kind}")
    return d


def save_native(net: QNetwork, path: str | Path) -> None:
    """Write ``net`` to ``path`` (``.qnn``)."""
    arrays: dict[str, np.ndarray] = {}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": net.name,
        "input_shape": list(net.input_shape), "input_lo": net.input_lo, "input_hi": net.input_hi,
        "input_scale": _frac(net.input_scale), "input_zero_point": net.input_zero_point,
        "output_scale": _frac(net.output_scale), "output_zero_point": net.output_zero_point,
        "input_rounding": net.input_rounding.value if net.input_rounding is not None else None,
        "tie_rule": net.tie_rule, "metadata": dict(net.metadata),
        "layers": [_layer_manifest(i, layer, arrays) for i, layer in enumerate(net.layers)],
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1))
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            z.writestr(key, buf.getvalue())


def load_native(path: str | Path) -> QNetwork:
    """Read a ``.qnn`` file; every problem is reported with the file and the manifest field."""
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelError(f"{path}: not a qverify model archive ({e})") from None
    with z:
        try:
            m = json.loads(z.read("manifest.json"))
        except KeyError:
            raise ModelError(f"{path}: no manifest.json in the archive") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: manifest.json line {e.lineno} column {e.colno}: {e.msg}") from None

        def field(d: dict, key: str, where: str):
            if key not in d:
                raise ModelError(f"{path}: {where}: missing field {key!r}")
            return d[key]

        def array(d: dict, key: str, where: str) -> np.ndarray:
            name = field(d, key, where)
            try:
                return np.load(io.BytesIO(z.read(name)), allow_pickle=False)
            except KeyError:
                raise ModelError(f"{path}: {where}.{key}: array {name!r} missing from the archive") from None
            except ValueError as e:
                raise ModelError(f"{path}: {where}.{key}: unreadable array ({e})") from None

        if m.get("format") != FORMAT:
            raise ModelError(f"{path}: manifest format is {m.get('format')!r}, expected {FORMAT!r}")
        ver = m.get("format_version")
        if not isinstance(ver, int) or ver > FORMAT_VERSION:
            raise ModelError(f"{path}: format_version {ver!r} is not supported (this qverify reads up to "
                             f"{FORMAT_VERSION})")
        layers: list[Layer] = []
        for i, d in enumerate(field(m, "layers", "manifest")):
            where = f"layers[{i}]"
            kind = field(d, "kind", where)
            name = d.get("name", "")
            try:
                if kind == "Dense":
                    layers.append(Dense(array(d, "weight", where), array(d, "bias", where), name=name))
                elif kind == "Conv2d":
                    layers.append(Conv2d(array(d, "weight", where), array(d, "bias", where),
                                         stride=tuple(field(d, "stride", where)),
                                         padding=tuple(field(d, "padding", where)),
                                         dilation=tuple(d.get("dilation", (1, 1))),
                                         pad_value=int(d.get("pad_value", 0)), name=name))
                elif kind == "Requantize":
                    mult = [Fraction(s) for s in field(d, "multiplier", where)]
                    layers.append(Requantize(tuple(f.numerator for f in mult), tuple(f.denominator for f in mult),
                                             array(d, "zero_point", where), field(d, "lo", where),
                                             field(d, "hi", where), field(d, "rounding", where), name=name))
                elif kind == "Clamp":
                    layers.append(Clamp(field(d, "lo", where), field(d, "hi", where), name=name))
                elif kind == "Flatten":
                    layers.append(Flatten(name=name))
                else:
                    raise ModelError(f"unknown layer kind {kind!r}")
            except (ModelError, ValueError, TypeError, ZeroDivisionError) as e:
                raise ModelError(f"{path}: {where} ({kind}): {e}") from None
        try:
            ir = m.get("input_rounding")
            return QNetwork(
                input_shape=tuple(field(m, "input_shape", "manifest")), input_lo=field(m, "input_lo", "manifest"),
                input_hi=field(m, "input_hi", "manifest"), layers=tuple(layers),
                input_scale=Fraction(m.get("input_scale", "1")), input_zero_point=m.get("input_zero_point", 0),
                output_scale=Fraction(m.get("output_scale", "1")), output_zero_point=m.get("output_zero_point", 0),
                input_rounding=ir, tie_rule=m.get("tie_rule", "first"), name=m.get("name", path.stem),
                metadata=dict(m.get("metadata", {})),
            )
        except (ValueError, TypeError, ZeroDivisionError) as e:
            raise ModelError(f"{path}: {e}") from None
