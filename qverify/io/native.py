"""qverify's native model format (``.qnn``): a zip archive holding ``manifest.json`` and one ``.npy`` per array.

Self-describing (every layer's kind and fields are named in the manifest), versioned (``format_version``), and safe
to load: arrays are read with ``allow_pickle=False`` and the manifest is plain JSON; nothing is executed.
Exact multipliers and scales are stored as ``"num/den"`` strings; a float32 requantization (onnxruntime's
semantics) also stores ``float32_scale``, its float32 multipliers as exact hexadecimal floats (``float.hex``).
Version 2 is version 1 plus ``float32_scale``; version 3 holds graphs: every layer entry names the values it reads
(``inputs``: value 0 is the network input, value ``k + 1`` layer ``k``'s output) and the graph ops (``Add``,
``SumPool2d``, ``MaxPool2d``, ``Step``, ``Lookup``, ``Reshape``, ``Transpose``, ``Pad``, ``Concat``,
``Conv2d.groups``) are allowed. A file is written in the oldest version that holds the network
(:func:`format_version`), so older readers still read chains and refuse what they could not run rather than run
something else in its place.
``metadata["semantics"]`` travels with the metadata.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from qverify import graph
from qverify.network import (
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    Layer,
    Lookup,
    MaxPool2d,
    ModelError,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
    Uncertain,
)
from qverify.ops import CHAIN_OPS

FORMAT = "qverify-qnn"
FORMAT_VERSION = 3
#: the version written for networks without float32 requantizations
FORMAT_VERSION_EXACT = 1


def _frac(f: Fraction) -> str:
    return f"{f.numerator}/{f.denominator}"


def _arrays(i: int, arrays: dict[str, np.ndarray]) -> Callable[[str, np.ndarray], str]:
    def arr(field: str, a: np.ndarray) -> str:
        key = f"arrays/{i}_{field}.npy"
        arrays[key] = np.ascontiguousarray(a, dtype=np.int64)
        return key
    return arr


def _save_requantize(layer: Requantize, arr: Callable) -> dict:
    d = {"multiplier": [_frac(m) for m in layer.multipliers()], "zero_point": arr("zero_point", layer.zero_point),
         "lo": layer.lo, "hi": layer.hi, "rounding": layer.rounding.value}
    if layer.float32_scale is not None:
        d["float32_scale"] = [float(m).hex() for m in layer.float32_scale]
    return d


def _save_conv(layer: Conv2d, arr: Callable) -> dict:
    d = {"weight": arr("weight", layer.weight), "bias": arr("bias", layer.bias), "stride": list(layer.stride),
         "padding": list(layer.padding), "dilation": list(layer.dilation), "pad_value": layer.pad_value}
    if layer.groups != 1:
        d["groups"] = layer.groups
    return d


def _save_sum_pool(layer: SumPool2d, arr: Callable) -> dict:
    d = {"kernel": list(layer.kernel), "stride": list(layer.stride), "padding": list(layer.padding),
         "pad_value": layer.pad_value}
    if layer.weight is not None:
        d["weight"] = arr("weight", layer.weight)
    return d


#: the writer's table: the manifest fields of each op type (arrays go to ``.npy`` members via ``arr``)
SAVE: dict[type, Callable[[Any, Callable], dict]] = {
    Dense: lambda layer, arr: {"weight": arr("weight", layer.weight), "bias": arr("bias", layer.bias)},
    Conv2d: _save_conv,
    SumPool2d: _save_sum_pool,
    Add: lambda layer, arr: {"weights": list(layer.weights), "bias": layer.bias},
    Flatten: lambda layer, arr: {},
    Reshape: lambda layer, arr: {"shape": list(layer.shape)},
    Transpose: lambda layer, arr: {"perm": list(layer.perm)},
    Pad: lambda layer, arr: {"pads": list(layer.pads), "value": layer.value},
    Concat: lambda layer, arr: {"axis": layer.axis, "count": layer.inputs},
    Requantize: _save_requantize,
    Clamp: lambda layer, arr: {"lo": layer.lo, "hi": layer.hi},
    Step: lambda layer, arr: {"cuts": arr("cuts", layer.cuts), "levels": list(layer.levels)},
    Lookup: lambda layer, arr: {"start": layer.start, "table": arr("table", layer.table)},
    MaxPool2d: lambda layer, arr: {"kernel": list(layer.kernel), "stride": list(layer.stride),
                                   "padding": list(layer.padding), "dilation": list(layer.dilation)},
    Uncertain: lambda layer, arr: {"delta": arr("delta", layer.delta)},
}


def _layer_manifest(i: int, layer: Layer, arrays: dict[str, np.ndarray], inputs: tuple[int, ...] | None) -> dict:
    d: dict = {"kind": type(layer).__name__, "name": getattr(layer, "name", "")}
    try:
        d.update(graph.rule(SAVE, layer, "the .qnn writer")(layer, _arrays(i, arrays)))
    except ModelError as e:
        raise ModelError(f"cannot save layer {i}: {e}") from None
    if inputs is not None:
        d["inputs"] = list(inputs)
    return d


def format_version(net: QNetwork) -> int:
    """The oldest format that holds ``net``: 1 (an exact chain), 2 (float32 requantizations), 3 (a graph: branches,
    or ops beyond the five chain ops, or grouped convolutions), so an older reader refuses what it cannot run."""
    if not net.is_chain or any(isinstance(layer, Conv2d) and layer.groups != 1 for layer in net.layers):
        return FORMAT_VERSION
    if any(isinstance(layer, Requantize) and layer.float32_scale is not None for layer in net.layers):
        return 2
    return FORMAT_VERSION_EXACT


def save_native(net: QNetwork, path: str | Path) -> None:
    """Write ``net`` to ``path`` (``.qnn``)."""
    arrays: dict[str, np.ndarray] = {}
    version = format_version(net)
    manifest = {
        "format": FORMAT, "format_version": version, "name": net.name,
        "input_shape": list(net.input_shape), "input_lo": net.input_lo, "input_hi": net.input_hi,
        "input_scale": _frac(net.input_scale), "input_zero_point": net.input_zero_point,
        "output_scale": _frac(net.output_scale), "output_zero_point": net.output_zero_point,
        "input_rounding": net.input_rounding.value if net.input_rounding is not None else None,
        "tie_rule": net.tie_rule, "metadata": dict(net.metadata),
        "layers": [_layer_manifest(i, layer, arrays, net.node_inputs(i) if version == FORMAT_VERSION else None)
                   for i, layer in enumerate(net.layers)],
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1))
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            z.writestr(key, buf.getvalue())


#: largest uncompressed member read from an archive (the bundled MNIST model's largest array is 0.6 MB)
MAX_MEMBER_BYTES = 1 << 30
#: stored integers (clamp ranges, zero points, grid ends, pad values) are below 2^53 in magnitude, like the
#: accumulators (:data:`qverify.network.FLOAT64_EXACT`), so every later int64 (and float64) computation is exact
MAX_STORED_INT = 2**53
#: longest exact rational string (``"num/den"`` or a decimal) read from the manifest
MAX_FRACTION_CHARS = 600
_FRACTION = re.compile(r"[+-]?\d+(?:/\d+)?|[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?", re.ASCII)
_MISSING = object()


class _Reader:
    """Typed access to the archive and its manifest: every problem is a :class:`ModelError` naming the file, the
    manifest field (``layers[2].lo``) or the zip member."""

    def __init__(self, path: Path, z: zipfile.ZipFile) -> None:
        self.path = path
        self.z = z

    def error(self, where: str, msg: str) -> ModelError:
        return ModelError(f"{self.path}: {where}: {msg}")

    def member(self, name: str, where: str) -> bytes:
        try:
            info = self.z.getinfo(name)
        except KeyError:
            raise self.error(where, f"array {name!r} missing from the archive") from None
        if info.file_size > MAX_MEMBER_BYTES:
            raise self.error(where, f"zip member {name!r} is {info.file_size} bytes (more than {MAX_MEMBER_BYTES})")
        try:
            return self.z.read(info)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError, ValueError,
                OverflowError) as e:  # corrupt data, bad CRC, encryption, unknown compression
            raise self.error(where, f"zip member {name!r} is unreadable ({type(e).__name__}: {e})") from None

    def get(self, d: dict, key: str, where: str, default: object = _MISSING) -> object:
        if key not in d:
            if default is _MISSING:
                raise ModelError(f"{self.path}: {where}: missing field {key!r}")
            return default
        return d[key]

    def int(self, d: dict, key: str, where: str, default: object = _MISSING) -> int:
        v = self.get(d, key, where, default)
        if type(v) is not int:
            raise self.error(f"{where}.{key}", f"expected an integer, got {_show(v)}")
        if abs(v) >= MAX_STORED_INT:
            raise self.error(f"{where}.{key}", f"{v} is out of range (|value| < 2^53)")
        return v

    def str(self, d: dict, key: str, where: str, default: object = _MISSING) -> str:
        v = self.get(d, key, where, default)
        if not isinstance(v, str):
            raise self.error(f"{where}.{key}", f"expected a string, got {_show(v)}")
        return v

    def ints(self, d: dict, key: str, where: str, n: int | None, default: object = _MISSING) -> tuple[int, ...]:
        v = self.get(d, key, where, default)
        if isinstance(v, tuple):
            v = list(v)
        if not isinstance(v, list) or (n is not None and len(v) != n) or \
                any(type(x) is not int or abs(x) >= MAX_STORED_INT for x in v):
            raise self.error(f"{where}.{key}", f"expected a list of {n or 'some'} integers, got {_show(v)}")
        return tuple(v)

    def fraction(self, v: object, where: str) -> Fraction:
        """An exact rational from ``"num/den"``, a decimal string or an integer."""
        if type(v) is int:
            return Fraction(v)
        if not isinstance(v, str) or len(v) > MAX_FRACTION_CHARS or not _FRACTION.fullmatch(v):
            raise self.error(where, f"expected an exact rational such as \"3/1024\", got {_show(v)}")
        try:
            return Fraction(v)
        except ZeroDivisionError:
            raise self.error(where, f"{v!r} divides by zero") from None

    def array(self, d: dict, key: str, where: str, ndim: tuple[int, ...]) -> np.ndarray:
        """An integer ``.npy`` member (``allow_pickle=False``: object arrays are refused) of one of the ``ndim``."""
        name = self.str(d, key, where)
        data = self.member(name, f"{where}.{key}")
        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, EOFError, OSError, SyntaxError, TypeError, OverflowError, MemoryError) as e:
            raise self.error(f"{where}.{key}", f"unreadable array {name!r} ({type(e).__name__}: {e})") from None
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
            raise self.error(f"{where}.{key}", f"array {name!r} must hold integers, got dtype "
                                               f"{getattr(a, 'dtype', type(a).__name__)}")
        if a.ndim not in ndim:
            raise self.error(f"{where}.{key}", f"array {name!r} has {a.ndim} dimensions (expected "
                                               f"{' or '.join(map(str, ndim))})")
        if a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.size and int(a.max()) >= 2**63:
            raise self.error(f"{where}.{key}", f"array {name!r} holds values beyond int64")
        return a.astype(np.int64)


def _show(v: object) -> str:
    t = repr(v)
    return f"{type(v).__name__} {t[:60]}{'...' if len(t) > 60 else ''}"


def _load_requantize(r: _Reader, d: dict, where: str, name: str) -> Requantize:
    ms = r.get(d, "multiplier", where)
    if not isinstance(ms, list) or not ms:
        raise r.error(f"{where}.multiplier", f"expected a list of rationals, got {_show(ms)}")
    mult = [r.fraction(v, f"{where}.multiplier[{k}]") for k, v in enumerate(ms)]
    f32 = d.get("float32_scale")
    if f32 is not None:
        if not isinstance(f32, list) or not all(isinstance(v, str) for v in f32):
            raise ModelError("float32_scale must be a list of hexadecimal float strings")
        f32 = tuple(float.fromhex(v) for v in f32)
    return Requantize(tuple(f.numerator for f in mult), tuple(f.denominator for f in mult),
                      r.array(d, "zero_point", where, (0, 1)), r.int(d, "lo", where), r.int(d, "hi", where),
                      r.str(d, "rounding", where), name=name, float32_scale=f32)


def _load_conv(r: _Reader, d: dict, where: str, name: str) -> Conv2d:
    return Conv2d(r.array(d, "weight", where, (4,)), r.array(d, "bias", where, (1,)),
                  stride=r.ints(d, "stride", where, 2), padding=r.ints(d, "padding", where, 4),
                  dilation=r.ints(d, "dilation", where, 2, [1, 1]), pad_value=r.int(d, "pad_value", where, 0),
                  name=name, groups=r.int(d, "groups", where, 1))


def _load_sum_pool(r: _Reader, d: dict, where: str, name: str) -> SumPool2d:
    weight = r.array(d, "weight", where, (2,)) if "weight" in d else None
    return SumPool2d(r.ints(d, "kernel", where, 2), r.ints(d, "stride", where, 2), r.ints(d, "padding", where, 4),
                     r.int(d, "pad_value", where, 0), weight, name=name)


def _load_step(r: _Reader, d: dict, where: str, name: str) -> Step:
    return Step(r.array(d, "cuts", where, (2,)), r.ints(d, "levels", where, None), name=name)


#: the reader's table: one builder per layer kind (the manifest's ``kind``)
LOAD: dict[str, Callable[[_Reader, dict, str, str], Layer]] = {
    "Dense": lambda r, d, w, n: Dense(r.array(d, "weight", w, (2,)), r.array(d, "bias", w, (1,)), name=n),
    "Conv2d": _load_conv,
    "SumPool2d": _load_sum_pool,
    "Add": lambda r, d, w, n: Add(r.ints(d, "weights", w, None), r.int(d, "bias", w, 0), name=n),
    "Flatten": lambda r, d, w, n: Flatten(name=n),
    "Reshape": lambda r, d, w, n: Reshape(r.ints(d, "shape", w, None), name=n),
    "Transpose": lambda r, d, w, n: Transpose(r.ints(d, "perm", w, None), name=n),
    "Pad": lambda r, d, w, n: Pad(r.ints(d, "pads", w, None), r.int(d, "value", w, 0), name=n),
    "Concat": lambda r, d, w, n: Concat(r.int(d, "axis", w), r.int(d, "count", w), name=n),
    "Requantize": _load_requantize,
    "Clamp": lambda r, d, w, n: Clamp(r.int(d, "lo", w), r.int(d, "hi", w), name=n),
    "Step": _load_step,
    "Lookup": lambda r, d, w, n: Lookup(r.int(d, "start", w), r.array(d, "table", w, (1, 2)), name=n),
    "MaxPool2d": lambda r, d, w, n: MaxPool2d(r.ints(d, "kernel", w, 2), r.ints(d, "stride", w, 2),
                                              r.ints(d, "padding", w, 4), r.ints(d, "dilation", w, 2, [1, 1]),
                                              name=n),
    "Uncertain": lambda r, d, w, n: Uncertain(r.array(d, "delta", w, (1,)), name=n),
}
#: the kinds of format versions 1 and 2
CHAIN_KINDS = frozenset(t.__name__ for t in CHAIN_OPS)


def load_native(path: str | Path) -> QNetwork:
    """Read a ``.qnn`` file; every problem is a :class:`ModelError` naming the file and the manifest field or zip
    member (never another exception). Fields are type-checked (an integer field must be a JSON integer, not ``2.0``
    or ``true``; stored integers are below 2^53), arrays must be integer ``.npy`` members of the right rank (no
    pickle), exact rationals are ``"num/den"`` or decimal strings of bounded size, and each member is read only up to
    :data:`MAX_MEMBER_BYTES`."""
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, OverflowError, NotImplementedError) as e:
        raise ModelError(f"{path}: not a qverify model archive ({e})") from None
    with z:
        r = _Reader(path, z)
        if "manifest.json" not in z.namelist():
            raise ModelError(f"{path}: no manifest.json in the archive")
        raw = r.member("manifest.json", "manifest.json")
        try:
            m = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ModelError(f"{path}: manifest.json byte {e.start}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: manifest.json line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise ModelError(f"{path}: manifest.json is nested too deeply") from None
        if not isinstance(m, dict):
            raise ModelError(f"{path}: manifest.json must be a JSON object, got {_show(m)}")
        if m.get("format") != FORMAT:
            raise ModelError(f"{path}: manifest format is {_show(m.get('format'))}, expected {FORMAT!r}")
        ver = m.get("format_version")
        if type(ver) is not int or not 1 <= ver <= FORMAT_VERSION:
            raise ModelError(f"{path}: format_version {ver!r} is not supported (this qverify reads 1 to "
                             f"{FORMAT_VERSION})")
        entries = r.get(m, "layers", "manifest")
        if not isinstance(entries, list):
            raise r.error("manifest.layers", f"expected a list of layers, got {_show(entries)}")
        layers: list[Layer] = []
        inputs: list[tuple[int, ...]] = []
        for i, d in enumerate(entries):
            where = f"layers[{i}]"
            if not isinstance(d, dict):
                raise r.error(where, f"expected a JSON object, got {_show(d)}")
            kind = r.str(d, "kind", where)
            name = r.str(d, "name", where, "")
            try:
                build = LOAD.get(kind)
                if build is None or (ver < FORMAT_VERSION and kind not in CHAIN_KINDS):
                    raise ModelError(f"unknown layer kind {kind!r}" + (
                        f" (a version-{FORMAT_VERSION} op in a version-{ver} file)" if build is not None else ""))
                layers.append(build(r, d, where, name))
                if ver >= FORMAT_VERSION:
                    inputs.append(r.ints(d, "inputs", where, None, [i]))
                elif "inputs" in d or "groups" in d:
                    raise ModelError(f"'inputs' and 'groups' need format_version {FORMAT_VERSION}")
            except ModelError as e:
                if str(e).startswith(f"{path}: "):
                    raise
                raise ModelError(f"{path}: {where} ({kind}): {e}") from None
            except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
                raise ModelError(f"{path}: {where} ({kind}): {e}") from None
        shape = r.ints(m, "input_shape", "manifest", None)
        if not shape or min(shape) < 1:
            raise r.error("manifest.input_shape", f"expected positive dimensions, got {list(shape)}")
        meta = m.get("metadata", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise r.error("manifest.metadata", f"expected an object of strings, got {_show(meta)}")
        ir = m.get("input_rounding")
        if ir is not None and not isinstance(ir, str):
            raise r.error("manifest.input_rounding", f"expected a rounding mode or null, got {_show(ir)}")
        try:
            return QNetwork(
                input_shape=shape, input_lo=r.int(m, "input_lo", "manifest"),
                input_hi=r.int(m, "input_hi", "manifest"), layers=tuple(layers),
                input_scale=r.fraction(m.get("input_scale", "1"), "manifest.input_scale"),
                input_zero_point=r.int(m, "input_zero_point", "manifest", 0),
                output_scale=r.fraction(m.get("output_scale", "1"), "manifest.output_scale"),
                output_zero_point=r.int(m, "output_zero_point", "manifest", 0),
                input_rounding=ir, tie_rule=r.str(m, "tie_rule", "manifest", "first"),
                name=r.str(m, "name", "manifest", path.stem), metadata=dict(meta),
                inputs=tuple(inputs) if ver >= FORMAT_VERSION else None,
            )
        except ModelError as e:
            if str(e).startswith(f"{path}: "):
                raise
            raise ModelError(f"{path}: {e}") from None
        except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
            raise ModelError(f"{path}: {e}") from None
