"""Data in the units a model expects: raw pixels mapped through a stated preprocessing to the model's input grid.

A model trained on ``pixel / 255`` or on mean/std-normalized pixels takes real inputs
``v = (pixel * scale - mean_c) / std_c`` (channel ``c``; exact rationals), which its input quantizer (or, for an
integer-input model, its grid ``v = s (x - z)``) maps to the integer grid. :class:`Preprocess` holds that map and
builds, from raw integer pixels,

* the grid point of a sample: the image of the one-point box ``[v, v]`` under
  :func:`qverify.property.box_to_grid` (a quantizing input: ``R(v / s) + z``; an integer input: ``v`` must be a grid
  point, else the data does not fit the model and a :class:`~qverify.property.PropertyError` says so);
* the box of a robustness property of radius ``r`` pixels: the pixel box ``[max(d_lo, p - r), min(d_hi, p + r)]``
  (``[d_lo, d_hi]`` the raw data range, 0..255) mapped to real units and then to the grid by ``box_to_grid``, so
  the property covers exactly the grid points the model computes on for some pixel input of that box.

The map is increasing (``scale > 0``, ``std > 0``), so both ends are the images of the pixel box's ends; they are
tabulated once per channel for every pixel value (``d_hi - d_lo + 1`` exact evaluations).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from qverify.network import QNetwork
from qverify.property import Property, PropertyError, box_to_grid, robustness_unsafe
from qverify.quant import as_fraction


@dataclass(frozen=True)
class Preprocess:
    """``v = (pixel * scale - mean_c) / std_c`` on raw pixels in ``[data_lo, data_hi]`` (``mean``/``std`` one value,
    or one per channel)."""

    scale: Fraction = Fraction(1)
    mean: tuple[Fraction, ...] = (Fraction(0),)
    std: tuple[Fraction, ...] = (Fraction(1),)
    data_lo: int = 0
    data_hi: int = 255

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", as_fraction(self.scale))
        object.__setattr__(self, "mean", tuple(as_fraction(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(as_fraction(s) for s in self.std))
        if self.scale <= 0 or any(s <= 0 for s in self.std):
            raise PropertyError(f"preprocessing needs scale > 0 and std > 0, got {self.spec()}")
        if not self.mean or not self.std:
            raise PropertyError("preprocessing needs at least one mean and one std value")
        if self.data_lo > self.data_hi:
            raise PropertyError(f"empty data range [{self.data_lo}, {self.data_hi}]")

    @classmethod
    def parse(cls, spec: str) -> Preprocess:
        """``"scale=1/255"``, ``"scale=1/255,mean=0.1307,std=0.3081"``, per channel ``mean=0.485:0.456:0.406``,
        and ``range=0:255`` for the raw data range. Numbers are exact (decimals and fractions)."""
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, val = part.partition("=")
            if not sep or key.strip() not in ("scale", "mean", "std", "range"):
                raise PropertyError(f"--preprocess {spec!r}: expected key=value with keys scale, mean, std, range; "
                                    f"got {part!r}")
            fields[key.strip()] = val.strip()

        def nums(text: str) -> tuple[Fraction, ...]:
            try:
                return tuple(Fraction(v) for v in text.split(":"))
            except (ValueError, ZeroDivisionError):
                raise PropertyError(f"--preprocess {spec!r}: {text!r} is not a number (or a:b:c list)") from None

        lo, hi = (int(v) for v in nums(fields.get("range", "0:255"))) if "range" in fields else (0, 255)
        return cls(nums(fields.get("scale", "1"))[0], nums(fields.get("mean", "0")), nums(fields.get("std", "1")),
                   lo, hi)

    def spec(self) -> str:
        """The canonical spec string (what results files store; :meth:`parse` reads it back)."""
        def j(vals: tuple[Fraction, ...]) -> str:
            return ":".join(str(v) for v in vals)
        return f"scale={self.scale},mean={j(self.mean)},std={j(self.std)},range={self.data_lo}:{self.data_hi}"

    def describe(self) -> str:
        return (f"input = (pixel * {self.scale} - mean) / std with mean {[str(m) for m in self.mean]}, "
                f"std {[str(s) for s in self.std]}, pixels in [{self.data_lo}, {self.data_hi}]")

    def real(self, pixel: int, channel: int) -> Fraction:
        m = self.mean[channel if len(self.mean) > 1 else 0]
        s = self.std[channel if len(self.std) > 1 else 0]
        return (pixel * self.scale - m) / s

    def _channels(self, net: QNetwork) -> np.ndarray:
        """The channel of every flattened input element (CHW: axis 0; a vector input is one channel)."""
        shp = net.input_shape
        c = shp[0] if len(shp) == 3 else 1
        for vals, what in ((self.mean, "mean"), (self.std, "std")):
            if len(vals) not in (1, c):
                raise PropertyError(f"--preprocess: {len(vals)} {what} values for a model with {c} input channels")
        return np.repeat(np.arange(c), net.num_inputs // c)

    def tables(self, net: QNetwork) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(point, lower, upper)`` int64 ``[C, d_hi - d_lo + 1]`` per channel and pixel value: the grid point of
        the pixel (``-2^62`` where its real value is no grid point of an integer-input model), and the lower and
        upper grid ends of the one-pixel box. Under onnxruntime semantics (float32 inputs) the ends are those of the
        float32 neighbours of the correctly rounded float32 of ``v`` (whatever rounds the user's float32
        preprocessing does, its input lies between them), the point that of ``fl32(v)``."""
        return _tables(self, net)

    def grid_points(self, net: QNetwork, pixels: np.ndarray) -> np.ndarray:
        """Raw pixels ``[B, n]`` (network layout) to grid points; a :class:`PropertyError` names a pixel whose real
        value is no grid point (an integer-input model whose grid the preprocessing does not hit)."""
        p = self._pixels(pixels)
        point = self.tables(net)[0]
        ch = self._channels(net)[None, :]
        x = point[ch, p - self.data_lo]
        if np.any(x == _NONE):
            k = np.argwhere(x == _NONE)[0]
            raise PropertyError(f"pixel {int(p[k[0], k[1]])} of input {int(k[1])} maps to the real value "
                                f"{self.real(int(p[k[0], k[1]]), int(ch[0, k[1]]))}, which is not a point of the "
                                f"model's input grid ({self.describe()})")
        return x

    def box(self, net: QNetwork, pixels: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """The grid box of the pixel box ``[max(d_lo, p - r), min(d_hi, p + r)]`` of one sample ``[n]``."""
        p = self._pixels(np.asarray(pixels)[None, :])[0]
        _, lower, upper = self.tables(net)
        ch = self._channels(net)
        plo = np.maximum(p - int(radius), self.data_lo) - self.data_lo
        phi = np.minimum(p + int(radius), self.data_hi) - self.data_lo
        return lower[ch, plo], upper[ch, phi]

    def robustness_property(self, net: QNetwork, pixels: np.ndarray, label: int, radius: int, name: str = "",
                            ties: str | None = None) -> Property:
        """Local robustness of ``label`` for every input within ``radius`` pixels of the raw sample ``pixels``
        (network layout, ``[n]``)."""
        if radius < 0:
            raise PropertyError(f"radius must be >= 0, got {radius}")
        lo, hi = self.box(net, pixels, radius)
        center = self.grid_points(net, np.asarray(pixels)[None, :])[0]
        return Property(lo, hi, robustness_unsafe(int(label), net.num_outputs, ties or net.tie_rule), name=name,
                        description=f"robustness of class {int(label)}: L-inf radius {int(radius)} pixels around "
                                    f"the sample, {self.describe()}, mapped to the model's input grid",
                        label=int(label), center=center, metadata={"preprocess": self.spec()})

    def _pixels(self, pixels: np.ndarray) -> np.ndarray:
        a = np.asarray(pixels)
        if a.dtype.kind == "f" and not np.all(a == np.round(a)):
            raise PropertyError("--preprocess expects raw integer pixels")
        a = a.astype(np.int64)
        if a.size and (a.min() < self.data_lo or a.max() > self.data_hi):
            raise PropertyError(f"data values [{a.min()}, {a.max()}] leave the raw data range "
                                f"[{self.data_lo}, {self.data_hi}] of the preprocessing")
        return a


_NONE = -(2**62)


def _f32_neighbours(v: Fraction) -> tuple[Fraction, Fraction, Fraction]:
    """``(below, nearest, above)``: ``fl32(v)`` (through float64: off by at most one float32 step from the
    correctly rounded value) and its float32 neighbours, as exact fractions."""
    a = np.float32(float(v))
    return (Fraction(float(np.nextafter(a, np.float32(-np.inf)))), Fraction(float(a)),
            Fraction(float(np.nextafter(a, np.float32(np.inf)))))


@functools.lru_cache(maxsize=32)
def _tables(pre: Preprocess, net: QNetwork) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shp = net.input_shape
    c = shp[0] if len(shp) == 3 else 1
    vals = range(pre.data_lo, pre.data_hi + 1)
    f32 = net.input_rounding is not None and net.metadata.get("semantics") == "onnxruntime"
    point = np.empty((c, len(vals)), np.int64)
    lower = np.empty((c, len(vals)), np.int64)
    upper = np.empty((c, len(vals)), np.int64)
    for ch in range(c):
        reals = [pre.real(v, ch) for v in vals]
        if f32:
            nb = [_f32_neighbours(r) for r in reals]
            lower[ch] = box_to_grid(net, [b[0] for b in nb], [b[0] for b in nb])[0]
            upper[ch] = box_to_grid(net, [b[2] for b in nb], [b[2] for b in nb])[1]
            point[ch] = box_to_grid(net, [b[1] for b in nb], [b[1] for b in nb])[0]
            continue
        lo, hi, _ = box_to_grid(net, reals, reals)
        lower[ch], upper[ch] = lo, hi
        point[ch] = np.where(lo == hi, lo, _NONE)
    return point, lower, upper
