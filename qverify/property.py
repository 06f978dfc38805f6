"""The normalized property form: an input box on the model's integer grid plus an unsafe output region.

A :class:`Property` says: for every integer input ``x`` with ``lo <= x <= hi`` (elementwise, flattened input), the
network's integer output ``y`` must avoid the *unsafe region*, a disjunction of conjunctions::

    unsafe(y)  =  OR_d  ( A_d y <= b_d )          (A_d int64 [k_d, n_out], b_d int64 [k_d])

All coefficients are integers: real-valued constraints over the real outputs ``Y = s_out (y - z_out)`` are turned
into exact integer rows by :func:`real_row_to_int` (multiply by the common denominator; the right-hand side is
floored, which is exact because the left-hand side is an integer).

Local robustness of label ``c`` under the ``first`` tie rule (the first maximal index wins) is violated iff some
``i != c`` has ``y_i >= y_c`` (``i < c``) or ``y_i > y_c``, i.e. ``y_c - y_i <= -1`` (``i > c``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from qverify.network import QNetwork
from qverify.quant import Rounding, as_fraction, round_fraction


class PropertyError(ValueError):
    """A malformed or unsatisfiable property (the message names the file and place when known)."""


@dataclass(frozen=True, eq=False)
class Conjunction:
    """``A y <= b`` over the integer outputs."""

    A: np.ndarray
    b: np.ndarray

    def __post_init__(self) -> None:
        A = np.atleast_2d(np.asarray(self.A, dtype=np.int64))
        b = np.atleast_1d(np.asarray(self.b, dtype=np.int64))
        if A.shape[0] != b.shape[0]:
            raise PropertyError(f"conjunction has {A.shape[0]} rows but {b.shape[0]} right-hand sides")
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "b", b)

    def holds(self, y: np.ndarray) -> np.ndarray:
        """Boolean ``[B]``: whether each output row satisfies every constraint (exact int64)."""
        y = np.atleast_2d(np.asarray(y, dtype=np.int64))
        return np.all(y @ self.A.T <= self.b, axis=1)


@dataclass(frozen=True, eq=False)
class Property:
    """Input box ``[lo, hi]`` (int64, flattened input) and unsafe region ``OR_d (A_d y <= b_d)``."""

    lo: np.ndarray
    hi: np.ndarray
    unsafe: tuple[Conjunction, ...]
    name: str = ""
    description: str = ""
    label: int | None = None
    center: np.ndarray | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lo = np.asarray(self.lo, dtype=np.int64).ravel()
        hi = np.asarray(self.hi, dtype=np.int64).ravel()
        if lo.shape != hi.shape:
            raise PropertyError(f"property {self.name!r}: lo and hi differ in size ({lo.size} vs {hi.size})")
        if np.any(lo > hi):
            i = int(np.argmax(lo > hi))
            raise PropertyError(f"property {self.name!r}: empty input box at X_{i} ([{lo[i]}, {hi[i]}])")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "unsafe", tuple(self.unsafe))
        if not self.unsafe:
            raise PropertyError(f"property {self.name!r}: empty unsafe region (nothing to verify)")
        n_out = {c.A.shape[1] for c in self.unsafe}
        if len(n_out) != 1:
            raise PropertyError(f"property {self.name!r}: conjunctions disagree on the number of outputs")
        if self.center is not None:
            object.__setattr__(self, "center", np.asarray(self.center, dtype=np.int64).ravel())

    @property
    def num_inputs(self) -> int:
        return self.lo.size

    @property
    def num_outputs(self) -> int:
        return self.unsafe[0].A.shape[1]

    def box_size(self) -> int:
        """Number of integer points in the input box (a Python int; can be astronomically large)."""
        return math.prod(int(h - l + 1) for l, h in zip(self.lo, self.hi, strict=True))

    def contains(self, x: np.ndarray) -> np.ndarray:
        """Boolean ``[B]``: whether each (flattened) input lies in the box."""
        x = np.asarray(x, dtype=np.int64).reshape(-1, self.num_inputs)
        return np.all((x >= self.lo) & (x <= self.hi), axis=1)

    def is_violated(self, y: np.ndarray) -> np.ndarray:
        """Boolean ``[B]``: whether each output row lies in the unsafe region."""
        y = np.atleast_2d(np.asarray(y, dtype=np.int64))
        out = np.zeros(len(y), dtype=bool)
        for c in self.unsafe:
            out |= c.holds(y)
        return out

    def slack(self, y: np.ndarray) -> np.ndarray:
        """Exact int64 ``[B]``: how far each output row is from the unsafe region,

            slack(y) = min_d max_k (A_d y - b_d)_k,

        so ``y`` is unsafe iff ``slack(y) <= 0``. For a robustness property of label ``c`` (first-index tie rule) it
        is ``min_j (y_c - y_j + [j > c])``: a margin of ``y_c - y_j = 1`` over a class ``j > c`` leaves a slack of 2
        output steps. The minimum of the slack over the box decides the property (robust iff it is ``>= 1``); an
        ``unknown`` verdict brackets it (``Result.details['slack']``)."""
        y = np.atleast_2d(np.asarray(y, dtype=np.int64))
        per = [np.max(y @ c.A.T - c.b[None, :], axis=1) for c in self.unsafe]
        return np.min(np.stack(per, axis=1), axis=1)

    def check_network(self, net: QNetwork) -> None:
        """Raise :class:`PropertyError` unless the property fits the network's input and output sizes and grid."""
        if self.num_inputs != net.num_inputs:
            raise PropertyError(f"property {self.name!r} has {self.num_inputs} inputs, network {net.name!r} "
                                f"has {net.num_inputs}")
        if self.num_outputs != net.num_outputs:
            raise PropertyError(f"property {self.name!r} has {self.num_outputs} outputs, network {net.name!r} "
                                f"has {net.num_outputs}")
        if self.lo.min() < net.input_lo or self.hi.max() > net.input_hi:
            raise PropertyError(f"property {self.name!r}: input box leaves the grid [{net.input_lo}, "
                                f"{net.input_hi}]")


# ---------------------------------------------------------------------------------------------- builders
TIE_RULES = ("first", "any")


def robustness_unsafe(label: int, num_outputs: int, tie_rule: str = "first") -> tuple[Conjunction, ...]:
    """Unsafe region of "argmax stays ``label``" under the tie rule: ``first`` (the first maximal index wins; see the
    module docstring) or ``any`` (VNN-COMP's convention: any ``y_i >= y_c`` is a violation, ties included)."""
    if tie_rule not in TIE_RULES:
        raise PropertyError(f"unknown tie rule {tie_rule!r} (known: {', '.join(TIE_RULES)})")
    if not 0 <= label < num_outputs:
        raise PropertyError(f"label {label} outside the {num_outputs} outputs")
    out = []
    for i in range(num_outputs):
        if i == label:
            continue
        a = np.zeros(num_outputs, dtype=np.int64)
        a[label], a[i] = 1, -1
        out.append(Conjunction(a[None, :], np.array([0 if i < label or tie_rule == "any" else -1])))
    return tuple(out)


def robustness_property(net: QNetwork, x: np.ndarray, label: int, radius: int | None = None,
                        eps: float | Fraction | str | None = None, name: str = "", ties: str | None = None
                        ) -> Property:
    """Local robustness of ``label`` around the integer input ``x``.

    ``radius`` is in integer input units (pixels): ``max(grid_lo, x - r) <= x' <= min(grid_hi, x + r)``.
    ``eps`` is a real L-inf radius: the real box ``[s(x - z) - eps, s(x - z) + eps]`` mapped to the grid by
    :func:`box_to_grid`. Exactly one of them must be given. ``ties`` overrides the network's tie rule (``any``:
    VNN-COMP's convention, a tie is a violation).
    """
    x = np.asarray(x, dtype=np.int64).ravel()
    if (radius is None) == (eps is None):
        raise PropertyError("give exactly one of radius (input units) and eps (real units)")
    if radius is not None:
        r = int(radius)
        if r < 0:
            raise PropertyError(f"radius must be >= 0, got {r}")
        lo = np.maximum(x - r, net.input_lo)
        hi = np.minimum(x + r, net.input_hi)
        how = (f"L-inf radius {r} in input units around the sample, intersected with the grid "
               f"[{net.input_lo}, {net.input_hi}]")
    else:
        e = as_fraction(eps)
        s, z = net.input_scale, net.input_zero_point
        center = [s * (int(v) - z) for v in x]
        lo, hi, how = box_to_grid(net, [c - e for c in center], [c + e for c in center])
        how = f"real L-inf radius {e} around the sample; {how}"
    return Property(lo, hi, robustness_unsafe(int(label), net.num_outputs, ties or net.tie_rule), name=name,
                    description=f"robustness of class {int(label)}: {how}", label=int(label), center=x)


def box_to_grid(net: QNetwork, real_lo: Sequence[Fraction], real_hi: Sequence[Fraction]
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """Map a real input box to the integer grid, exactly, and say how.

    * Native integer input (``net.input_rounding is None``): the grid points whose real value
      ``s (p - z)`` lies in ``[l, u]``: ``p in [ceil(l / s) + z, floor(u / s) + z]``.
    * Quantizing input (``x = R(x_real / s) + z``): the image of the box, ``[R(l / s) + z, R(u / s) + z]``
      (every real input of the box quantizes into it, and the quantizer is monotone).

    Both are intersected with ``[input_lo, input_hi]``, in exact integers before anything becomes int64: a bound
    beyond the grid (``1e260`` on pixels ``[0, 255]``) is the grid's end, exactly, since no grid point lies
    beyond it. A native-grid lower end above ``input_hi`` becomes ``input_hi + 1`` (an upper end below ``input_lo``
    becomes ``input_lo - 1``), which keeps the box empty; a quantizing input saturates, so its ends are clipped to
    the grid.
    """
    s, z = net.input_scale, net.input_zero_point
    glo, ghi = net.input_lo, net.input_hi
    f32 = net.input_rounding is not None and net.metadata.get("semantics") == "onnxruntime"
    lo, hi = [], []
    for l, u in zip(real_lo, real_hi, strict=True):
        lq, uq = as_fraction(l) / s, as_fraction(u) / s
        if net.input_rounding is None:  # points of the grid inside the box (may be empty: Property says where)
            lo.append(min(max(math.ceil(lq) + z, glo), ghi + 1))
            hi.append(max(min(math.floor(uq) + z, ghi), glo - 1))
        elif f32:  # onnxruntime's quantizer of the float32 inputs of the box (saturating)
            lo.append(min(max(_f32_quantize(as_fraction(l), s, up=True) + z, glo), ghi))
            hi.append(min(max(_f32_quantize(as_fraction(u), s, up=False) + z, glo), ghi))
        else:  # the quantizer saturates
            lo.append(min(max(round_fraction(lq, net.input_rounding) + z, glo), ghi))
            hi.append(min(max(round_fraction(uq, net.input_rounding) + z, glo), ghi))
    lo_a = np.array(lo, dtype=np.int64)
    hi_a = np.array(hi, dtype=np.int64)
    if net.input_rounding is None:
        how = (f"the real box is mapped to the integer grid points it contains (real = {s} * (x - {z}), "
               f"x in [{net.input_lo}, {net.input_hi}])")
    elif f32:
        how = (f"the real box is mapped to the image of its float32 inputs under onnxruntime's input quantizer "
               f"x = clamp(rne(fl32(real / {s})) + {z}, {net.input_lo}, {net.input_hi})")
    else:
        how = (f"the real box is mapped to its image under the input quantizer x = clamp({Rounding(net.input_rounding)}"
               f"(real / {s}) + {z}, {net.input_lo}, {net.input_hi})")
    return lo_a, hi_a, how


#: the largest finite float32
_F32_MAX = Fraction(float(np.finfo(np.float32).max))


def _f32_quantize(bound: Fraction, s: Fraction, up: bool) -> int:
    """onnxruntime's ``rne(fl32(v / s))`` (MLAS ``MlasQuantizeLinear``: a float32 division, rounded half to even) at
    the float32 input ``v`` of the box end ``bound`` nearest to it on the box's side: the smallest float32 ``>=
    bound`` for a lower end (``up``), the largest ``<= bound`` for an upper end. The quantizer is monotone, so the
    box's float32 inputs quantize exactly into ``[q(lower end), q(upper end)]``. Ends beyond the float32 range are
    the range's ends (the grid clip follows)."""
    b = min(max(bound, -_F32_MAX), _F32_MAX)
    v = np.float32(float(b))
    while up and Fraction(float(v)) < b:
        v = np.nextafter(v, np.float32(np.inf))
    while not up and Fraction(float(v)) > b:
        v = np.nextafter(v, np.float32(-np.inf))
    q = np.float32(v) / np.float32(float(s))  # one IEEE float32 division (the scale is a float32 value)
    if not np.isfinite(q):
        return -(2**62) if q < 0 else 2**62
    return int(np.rint(q))  # half to even, exact on float32 values


def real_row_to_int(net: QNetwork, coeffs: dict[int, Fraction], rhs: Fraction) -> tuple[np.ndarray, int]:
    """``sum_j a_j Y_j <= c`` over real outputs ``Y_j = s (y_j - z)`` as an exact integer row ``a' y <= c'``.

    ``sum a_j s y_j <= c + s z sum a_j``; multiplied by the positive common denominator ``D``; the right-hand side
    is floored (the left-hand side is an integer for integer ``y``).
    """
    s, z = net.output_scale, net.output_zero_point
    a = {j: as_fraction(v) * s for j, v in coeffs.items() if v != 0}
    c = as_fraction(rhs) + s * z * sum((as_fraction(v) for v in coeffs.values()), Fraction(0))
    den = math.lcm(*(f.denominator for f in a.values()), 1)
    row = np.zeros(net.num_outputs, dtype=np.int64)
    for j, f in a.items():
        if not 0 <= j < net.num_outputs:
            raise PropertyError(f"output Y_{j} does not exist (the network has {net.num_outputs} outputs)")
        v = f * den
        if abs(v) >= 2**62:
            raise PropertyError(f"coefficient of Y_{j} too large for exact int64 arithmetic")
        row[j] = int(v)
    return row, math.floor(c * den)


def data_layout(net: QNetwork, images: np.ndarray) -> np.ndarray:
    """Raw data ``[B, ...]`` in the network's layout, flattened ``[B, n]`` (HWC images transposed to CHW)."""
    a = np.asarray(images)
    shp = net.input_shape
    if a.ndim == 4 and len(shp) == 3 and a.shape[1:] == (shp[1], shp[2], shp[0]) and a.shape[1:] != shp:
        a = a.transpose(0, 3, 1, 2)  # HWC data for a CHW network
    return a.reshape(len(a), -1)


def pixels_to_grid(net: QNetwork, images: np.ndarray, preprocess: Any = None) -> np.ndarray:
    """Raw data (e.g. uint8 pixels) to the network's integer inputs ``[B, n]``.

    HWC images are transposed to the network's CHW layout. With ``preprocess`` (a
    :class:`qverify.preprocess.Preprocess`) the pixels are mapped through it and the model's input quantizer.
    ``metadata['pixel_transform'] == 'saturate'`` (QVIP's IN < 8 nets) clamps pixels to the grid; otherwise every
    value must already lie on the grid.
    """
    a = data_layout(net, images)
    if preprocess is not None:
        return preprocess.grid_points(net, a)
    x = a.astype(np.int64)
    if net.metadata.get("pixel_transform") == "saturate":
        return np.clip(x, net.input_lo, net.input_hi)
    if x.size and (x.min() < net.input_lo or x.max() > net.input_hi):
        raise PropertyError(f"data values [{x.min()}, {x.max()}] leave the network's input grid "
                            f"[{net.input_lo}, {net.input_hi}] (data in other units, e.g. raw pixels for a model "
                            f"trained on pixel / 255: give the preprocessing, --preprocess scale=1/255)")
    return x
