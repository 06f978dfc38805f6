"""qverify's native model format (``.qnn``): a zip archive holding ``manifest.json`` and one ``.npy`` per array.

Self-describing (every layer's kind and fields are named in the manifest), versioned (``format_version``), and safe
to load: arrays are read with ``allow_pickle=False`` and the manifest is plain JSON; nothing is executed.
Exact multipliers and scales are stored as ``"num/den"`` strings; a float32 requantization (onnxruntime's
semantics) also stores ``float32_scale``, its float32 multipliers as exact hexadecimal floats (``float.hex``).
Version 2 is version 1 plus ``float32_scale``; a file is written as version 1 when it has no float32
requantization (so older readers still read it) and as version 2 when it has (so an older reader refuses it rather
than run the exact fraction in its place). ``metadata["semantics"]`` travels with the metadata.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np

from qverify.network import Clamp, Conv2d, Dense, Flatten, Layer, ModelError, QNetwork, Requantize

FORMAT = "qverify-qnn"
FORMAT_VERSION = 2
#: the version written for networks without float32 requantizations
FORMAT_VERSION_EXACT = 1


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
        if layer.float32_scale is not None:
            d["float32_scale"] = [float(m).hex() for m in layer.float32_scale]
    elif isinstance(layer, Clamp):
        d.update(lo=layer.lo, hi=layer.hi)
    elif not isinstance(layer, Flatten):
        raise ModelError(f"cannot save layer {i} of kind {kind}")
    return d


def save_native(net: QNetwork, path: str | Path) -> None:
    """Write ``net`` to ``path`` (``.qnn``)."""
    arrays: dict[str, np.ndarray] = {}
    f32 = any(isinstance(layer, Requantize) and layer.float32_scale is not None for layer in net.layers)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION if f32 else FORMAT_VERSION_EXACT, "name": net.name,
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
        for i, d in enumerate(entries):
            where = f"layers[{i}]"
            if not isinstance(d, dict):
                raise r.error(where, f"expected a JSON object, got {_show(d)}")
            kind = r.str(d, "kind", where)
            name = r.str(d, "name", where, "")
            try:
                if kind == "Dense":
                    layers.append(Dense(r.array(d, "weight", where, (2,)), r.array(d, "bias", where, (1,)),
                                        name=name))
                elif kind == "Conv2d":
                    layers.append(Conv2d(r.array(d, "weight", where, (4,)), r.array(d, "bias", where, (1,)),
                                         stride=r.ints(d, "stride", where, 2),
                                         padding=r.ints(d, "padding", where, 4),
                                         dilation=r.ints(d, "dilation", where, 2, [1, 1]),
                                         pad_value=r.int(d, "pad_value", where, 0), name=name))
                elif kind == "Requantize":
                    ms = r.get(d, "multiplier", where)
                    if not isinstance(ms, list) or not ms:
                        raise r.error(f"{where}.multiplier", f"expected a list of rationals, got {_show(ms)}")
                    mult = [r.fraction(v, f"{where}.multiplier[{k}]") for k, v in enumerate(ms)]
                    f32 = d.get("float32_scale")
                    if f32 is not None:
                        if not isinstance(f32, list) or not all(isinstance(v, str) for v in f32):
                            raise ModelError("float32_scale must be a list of hexadecimal float strings")
                        f32 = tuple(float.fromhex(v) for v in f32)
                    layers.append(Requantize(tuple(f.numerator for f in mult), tuple(f.denominator for f in mult),
                                             r.array(d, "zero_point", where, (0, 1)), r.int(d, "lo", where),
                                             r.int(d, "hi", where), r.str(d, "rounding", where), name=name,
                                             float32_scale=f32))
                elif kind == "Clamp":
                    layers.append(Clamp(r.int(d, "lo", where), r.int(d, "hi", where), name=name))
                elif kind == "Flatten":
                    layers.append(Flatten(name=name))
                else:
                    raise ModelError(f"unknown layer kind {kind!r}")
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
            )
        except ModelError as e:
            if str(e).startswith(f"{path}: "):
                raise
            raise ModelError(f"{path}: {e}") from None
        except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
            raise ModelError(f"{path}: {e}") from None
