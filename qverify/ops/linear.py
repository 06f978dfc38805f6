"""Integer linear maps with coefficients: dense, 2-D convolution (groups, depthwise), sum pooling, weighted add.

Every op here is a :class:`~qverify.ops.base.LinearMap` ``y = sum_i L_i(x_i) + c`` with int64 coefficients:

* :class:`Dense`     ``y = W x + b``
* :class:`Conv2d`    ``y[o,i,j] = sum_{c,u,v} W[o,c,u,v] xpad[g(o) C_g + c, i s_h + u d_h, j s_w + v d_w] + b[o]``
  with ``groups`` ``G`` (``C_g = C / G`` input channels per group, ``g(o) = o // (O / G)``; depthwise is
  ``G = C``), ``xpad`` the input padded with ``pad_value`` (the input zero point, so padding means real zero)
* :class:`SumPool2d` ``y[c,i,j] = k[i,j] sum_{u<kh, v<kw} xpad[c, i s_h + u, j s_w + v]`` with an integer weight
  ``k`` per output position (``1``; or the integer rescaling ``L / count(i,j)`` that turns an average with a
  border-dependent count into one requantization, see ``encodings/graph_ops.md``); global pooling is the kernel
  of the whole image
* :class:`Add`       ``y = sum_i w_i x_i + b`` elementwise over inputs of one shape (the residual add: the two
  activations brought to a common scale by integer weights, the zero points folded into ``b``)

The linear part pads with 0; the padded cells' constants are part of the offset ``c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from qverify.ops.base import (
    LinearMap,
    ModelError,
    Shape,
    check_part,
    int_array,
    int_scalar,
    int_tuple,
    size,
    split_parts,
)


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]):
    from scipy.sparse import coo_matrix

    return coo_matrix((vals.astype(np.int64), (rows, cols)), shape=shape).tocsr()


def _abs_sums(op: Dense | Conv2d) -> tuple[int, int]:
    """``(max_o sum |W_o.|, max |b|)`` as Python ints, cached per op."""
    got = op._parts.get("abs-sums")
    if got is None:
        wabs = np.abs(op.weight).reshape(op.weight.shape[0], -1).sum(axis=1)
        got = op._parts["abs-sums"] = (int(wabs.max()) if wabs.size else 0,
                                       int(np.abs(op.bias).max()) if op.bias.size else 0)
    return got


# ================================================================================================== dense
@dataclass(frozen=True, eq=False)
class Dense(LinearMap):
    """``acc = W x + b`` with ``W`` int64 ``[out, in]`` and ``b`` int64 ``[out]``."""

    weight: np.ndarray
    bias: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", int_array(self.weight, f"Dense {self.name!r} weight"))
        object.__setattr__(self, "bias", int_array(self.bias, f"Dense {self.name!r} bias"))
        if self.weight.ndim != 2:
            raise ModelError(f"Dense {self.name!r}: weight must be 2-D [out, in], got shape {self.weight.shape}")
        if self.bias.shape != (self.weight.shape[0],):
            raise ModelError(f"Dense {self.name!r}: bias shape {self.bias.shape} does not match "
                             f"weight rows {self.weight.shape[0]}")

    def output_shape(self, *in_shapes: Shape) -> Shape:
        if in_shapes[0] != (self.weight.shape[1],):
            raise ModelError(f"Dense {self.name!r}: weight expects input ({self.weight.shape[1]},), "
                             f"got {in_shapes[0]}")
        return (self.weight.shape[0],)

    def parameter_count(self) -> int:
        return self.weight.size + self.bias.size

    @cached_property
    def _parts(self) -> dict[str, np.ndarray]:
        return {}

    def part_matrix(self, part: str, dtype: type = np.float64) -> np.ndarray:
        """``W`` (or a part of it) as a C-contiguous ``dtype`` matrix ``[out, in]``, cached."""
        key = f"{part}-{np.dtype(dtype).name}"
        m = self._parts.get(key)
        if m is None:
            m = self._parts[key] = np.ascontiguousarray(split_parts(self.weight, part), dtype=dtype)
        return m

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        x = xs[0]
        return x @ self.part_matrix(part, x.dtype).T

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        return [lam @ self.part_matrix(part, lam.dtype)]

    def offset(self, in_shapes: Sequence[Shape]) -> np.ndarray:
        return self.bias

    def value_bound(self, in_bounds: Sequence[int], in_shapes: Sequence[Shape]) -> int:
        wmax, bmax = _abs_sums(self)
        return wmax * int(in_bounds[0]) + bmax

    def matrices(self, in_shapes: Sequence[Shape]) -> list:
        r, c = np.nonzero(self.weight)
        return [_csr(r, c, self.weight[r, c], self.weight.shape)]


# ================================================================================================== conv2d
def _windows(xf: np.ndarray, kh: int, kw: int, stride: tuple[int, int], dilation: tuple[int, int]) -> np.ndarray:
    """``[B, C, H, W] -> [B, C, OH, OW, kh, kw]`` windows (a view)."""
    dh, dw = dilation
    win = np.lib.stride_tricks.sliding_window_view(xf, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1], ::dh, ::dw]


@dataclass(frozen=True, eq=False)
class Conv2d(LinearMap):
    """2-D convolution (cross-correlation, as ONNX/PyTorch), NCHW, with ``groups`` (weight
    ``[O, C / groups, kh, kw]``; depthwise: ``groups = C``).

    ``padding`` is ``(top, left, bottom, right)``; padded cells hold ``pad_value``.
    """

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    pad_value: int = 0
    name: str = ""
    groups: int = 1

    def __post_init__(self) -> None:
        where = f"Conv2d {self.name!r}"
        object.__setattr__(self, "weight", int_array(self.weight, f"{where} weight"))
        object.__setattr__(self, "bias", int_array(self.bias, f"{where} bias"))
        for field_name in ("stride", "padding", "dilation"):
            object.__setattr__(self, field_name, int_tuple(getattr(self, field_name), f"{where} {field_name}"))
        object.__setattr__(self, "pad_value", int_scalar(self.pad_value, f"{where} pad_value"))
        object.__setattr__(self, "groups", int_scalar(self.groups, f"{where} groups"))
        if self.weight.ndim != 4:
            raise ModelError(f"{where}: weight must be 4-D [out, in, kh, kw], got {self.weight.shape}")
        if self.bias.shape != (self.weight.shape[0],):
            raise ModelError(f"{where}: bias shape {self.bias.shape} does not match "
                             f"{self.weight.shape[0]} output channels")
        if len(self.stride) != 2 or min(self.stride) < 1:
            raise ModelError(f"{where}: stride must be two positive ints, got {self.stride}")
        if len(self.dilation) != 2 or min(self.dilation) < 1:
            raise ModelError(f"{where}: dilation must be two positive ints, got {self.dilation}")
        if len(self.padding) != 4 or min(self.padding) < 0:
            raise ModelError(f"{where}: padding must be 4 non-negative ints, got {self.padding}")
        if self.groups < 1 or self.weight.shape[0] % self.groups:
            raise ModelError(f"{where}: groups {self.groups} must be positive and divide the "
                             f"{self.weight.shape[0]} output channels")

    def summary(self) -> str:
        k = "x".join(map(str, self.weight.shape[2:]))
        g = f", groups {self.groups}" + (" (depthwise)" if self.groups == self.in_channels else "") \
            if self.groups != 1 else ""
        return f"{k} stride {self.stride} pad {self.padding} dilation {self.dilation}{g}"

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def output_shape(self, *in_shapes: Shape) -> Shape:
        in_shape = in_shapes[0]
        o, _, kh, kw = self.weight.shape
        c = self.in_channels
        if len(in_shape) != 3 or in_shape[0] != c:
            raise ModelError(f"Conv2d {self.name!r}: expects input [{c}, H, W], got {in_shape}")
        h = in_shape[1] + self.padding[0] + self.padding[2]
        w = in_shape[2] + self.padding[1] + self.padding[3]
        ekh = (kh - 1) * self.dilation[0] + 1
        ekw = (kw - 1) * self.dilation[1] + 1
        if h < ekh or w < ekw:
            raise ModelError(f"Conv2d {self.name!r}: kernel {kh}x{kw} larger than padded input {h}x{w}")
        return (o, (h - ekh) // self.stride[0] + 1, (w - ekw) // self.stride[1] + 1)

    def parameter_count(self) -> int:
        return self.weight.size + self.bias.size

    @cached_property
    def _parts(self) -> dict[str, np.ndarray]:
        return {}

    def part_kernel(self, part: str, dtype: type) -> np.ndarray:
        key = f"{part}-{np.dtype(dtype).name}"
        k = self._parts.get(key)
        if k is None:
            k = self._parts[key] = split_parts(self.weight, part).astype(dtype)
        return k

    def convolve(self, x: np.ndarray, part: str = "w", pad_value: float = 0) -> np.ndarray:
        """``sum P[o,c,u,v] xpad[...]`` without the bias, ``x`` ``[B, C, H, W]`` in its float dtype, padded with
        ``pad_value``."""
        check_part(part)
        pt, pl, pb, pr = self.padding
        if any(self.padding):
            x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=x.dtype.type(pad_value))
        o, cg, kh, kw = self.weight.shape
        win = _windows(x, kh, kw, self.stride, self.dilation)
        k = self.part_kernel(part, x.dtype)
        if self.groups == 1:
            return np.einsum("bchwuv,ocuv->bohw", win, k, optimize=True)
        g = self.groups
        b, _, oh, ow = win.shape[:4]
        wg = win.reshape(b, g, cg, oh, ow, kh, kw)
        kg = k.reshape(g, o // g, cg, kh, kw)
        return np.einsum("bgchwuv,gocuv->bgohw", wg, kg, optimize=True).reshape(b, o, oh, ow)

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        return self.convolve(xs[0], part)

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        """For rows ``lam`` over the output ``[N, O, OH, OW]``, the coefficients over the input ``[N, C, H, W]``
        (padded cells are constants and dropped). One contraction over the output channels per kernel offset."""
        n, o, oh, ow = lam.shape
        c, h, wd = in_shapes[0]
        _, cg, kh, kw = self.weight.shape
        pt, pl, pb, pr = self.padding
        sh, sw = self.stride
        dh, dw = self.dilation
        kern = self.part_kernel(part, lam.dtype)
        if self.groups == 1:
            out = np.zeros((n, h + pt + pb, wd + pl + pr, c), dtype=lam.dtype)  # channels last: contiguous adds
            lam_t = np.ascontiguousarray(lam.transpose(0, 2, 3, 1)).reshape(-1, o)  # [N OH OW, O]
            kt = np.ascontiguousarray(kern.transpose(2, 3, 0, 1))  # [kh, kw, O, C]
            for u in range(kh):
                for v in range(kw):
                    contrib = (lam_t @ kt[u, v]).reshape(n, oh, ow, c)
                    out[:, u * dh:u * dh + (oh - 1) * sh + 1:sh, v * dw:v * dw + (ow - 1) * sw + 1:sw, :] += contrib
            return [np.ascontiguousarray(out[:, pt:pt + h, pl:pl + wd, :].transpose(0, 3, 1, 2))]
        g = self.groups
        out = np.zeros((n, c, h + pt + pb, wd + pl + pr), dtype=lam.dtype)
        lg = lam.reshape(n, g, o // g, oh, ow)
        kg = kern.reshape(g, o // g, cg, kh, kw)
        for u in range(kh):
            for v in range(kw):
                contrib = np.einsum("ngoij,goc->ngcij", lg, kg[:, :, :, u, v], optimize=True).reshape(n, c, oh, ow)
                out[:, :, u * dh:u * dh + (oh - 1) * sh + 1:sh, v * dw:v * dw + (ow - 1) * sw + 1:sw] += contrib
        return [out[:, :, pt:pt + h, pl:pl + wd]]

    def offset(self, in_shapes: Sequence[Shape]) -> np.ndarray:
        key = tuple(in_shapes[0])
        cache = self._parts.setdefault("offset", {})
        if key not in cache:
            z = np.zeros((1, *key))
            acc = self.convolve(z, "w", self.pad_value)[0] if self.pad_value and any(self.padding) else \
                np.zeros(self.output_shape(key))
            cache[key] = np.rint(acc).astype(np.int64) + self.bias[:, None, None]
        return cache[key]

    def value_bound(self, in_bounds: Sequence[int], in_shapes: Sequence[Shape]) -> int:
        wmax, bmax = _abs_sums(self)
        return wmax * int(in_bounds[0]) + bmax + wmax * abs(self.pad_value)

    def matrices(self, in_shapes: Sequence[Shape]) -> list:
        c, h, w = in_shapes[0]
        o, cg, kh, kw = self.weight.shape
        _, oh, ow = self.output_shape(in_shapes[0])
        oo, ii, jj, cc, uu, vv = np.meshgrid(np.arange(o), np.arange(oh), np.arange(ow), np.arange(cg),
                                             np.arange(kh), np.arange(kw), indexing="ij")
        rr = ii * self.stride[0] + uu * self.dilation[0] - self.padding[0]
        qq = jj * self.stride[1] + vv * self.dilation[1] - self.padding[1]
        ch = (oo // (o // self.groups)) * cg + cc
        vals = self.weight[oo, cc, uu, vv]
        ok = (rr >= 0) & (rr < h) & (qq >= 0) & (qq < w) & (vals != 0)
        rows = (oo * oh + ii) * ow + jj
        cols = (ch * h + rr) * w + qq
        return [_csr(rows[ok], cols[ok], vals[ok], (o * oh * ow, c * h * w))]


# ================================================================================================== sum pool
@dataclass(frozen=True, eq=False)
class SumPool2d(LinearMap):
    """``y[c,i,j] = k[i,j] sum_{u<kh, v<kw} xpad[c, i s_h + u, j s_w + v]`` (``k``: ``weight``, int64
    ``[OH, OW]``, default all ones; ``xpad``: padded with ``pad_value``)."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    pad_value: int = 0
    weight: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        where = f"SumPool2d {self.name!r}"
        object.__setattr__(self, "kernel", int_tuple(self.kernel, f"{where} kernel", 2, 1))
        object.__setattr__(self, "stride", int_tuple(self.stride, f"{where} stride", 2, 1))
        object.__setattr__(self, "padding", int_tuple(self.padding, f"{where} padding", 4, 0))
        object.__setattr__(self, "pad_value", int_scalar(self.pad_value, f"{where} pad_value"))
        if self.weight is not None:
            k = int_array(self.weight, f"{where} weight")
            if k.ndim != 2 or (k.size and k.min() < 1):
                raise ModelError(f"{where}: weight must be positive integers [OH, OW], got shape {k.shape}")
            object.__setattr__(self, "weight", k)

    def output_shape(self, *in_shapes: Shape) -> Shape:
        in_shape = in_shapes[0]
        if len(in_shape) != 3:
            raise ModelError(f"SumPool2d {self.name!r}: expects input [C, H, W], got {in_shape}")
        h = in_shape[1] + self.padding[0] + self.padding[2]
        w = in_shape[2] + self.padding[1] + self.padding[3]
        kh, kw = self.kernel
        if h < kh or w < kw:
            raise ModelError(f"SumPool2d {self.name!r}: kernel {kh}x{kw} larger than padded input {h}x{w}")
        shape = (in_shape[0], (h - kh) // self.stride[0] + 1, (w - kw) // self.stride[1] + 1)
        if self.weight is not None and self.weight.shape != shape[1:]:
            raise ModelError(f"SumPool2d {self.name!r}: weight shape {self.weight.shape} does not match the output "
                             f"positions {shape[1:]}")
        return shape

    def summary(self) -> str:
        w = ", per-position weights" if self.weight is not None else ""
        return f"sum {self.kernel[0]}x{self.kernel[1]} stride {self.stride} pad {self.padding}{w}"

    def _k(self, dtype: type) -> np.ndarray | float:
        return 1 if self.weight is None else self.weight.astype(dtype)

    def _sum(self, x: np.ndarray, pad_value: float) -> np.ndarray:
        pt, pl, pb, pr = self.padding
        if any(self.padding):
            x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=x.dtype.type(pad_value))
        win = _windows(x, self.kernel[0], self.kernel[1], self.stride, (1, 1))
        return win.sum(axis=(4, 5))

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        check_part(part)
        x = xs[0]
        if part == "neg":
            return np.zeros((len(x), *self.output_shape(x.shape[1:])), dtype=x.dtype)
        return self._sum(x, 0) * self._k(x.dtype)

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        check_part(part)
        n, c, oh, ow = lam.shape
        _, h, w = in_shapes[0]
        if part == "neg":
            return [np.zeros((n, *in_shapes[0]), dtype=lam.dtype)]
        pt, pl, pb, pr = self.padding
        sh, sw = self.stride
        out = np.zeros((n, c, h + pt + pb, w + pl + pr), dtype=lam.dtype)
        lk = lam * self._k(lam.dtype)
        for u in range(self.kernel[0]):
            for v in range(self.kernel[1]):
                out[:, :, u:u + (oh - 1) * sh + 1:sh, v:v + (ow - 1) * sw + 1:sw] += lk
        return [out[:, :, pt:pt + h, pl:pl + w]]

    def offset(self, in_shapes: Sequence[Shape]) -> np.ndarray:
        shape = self.output_shape(*in_shapes)
        if not self.pad_value or not any(self.padding):
            return np.zeros(shape, dtype=np.int64)
        one = np.zeros((1, 1, *in_shapes[0][1:]))
        cells = np.rint(self._sum(one, 1.0)[0, 0]).astype(np.int64)  # padded cells per window
        k = 1 if self.weight is None else self.weight
        return np.broadcast_to(cells * k * self.pad_value, shape).astype(np.int64)

    def value_bound(self, in_bounds: Sequence[int], in_shapes: Sequence[Shape]) -> int:
        kmax = 1 if self.weight is None or not self.weight.size else int(self.weight.max())
        return kmax * self.kernel[0] * self.kernel[1] * max(int(in_bounds[0]), abs(self.pad_value))

    def matrices(self, in_shapes: Sequence[Shape]) -> list:
        c, h, w = in_shapes[0]
        _, oh, ow = self.output_shape(in_shapes[0])
        kh, kw = self.kernel
        cc, ii, jj, uu, vv = np.meshgrid(np.arange(c), np.arange(oh), np.arange(ow), np.arange(kh), np.arange(kw),
                                         indexing="ij")
        rr = ii * self.stride[0] + uu - self.padding[0]
        qq = jj * self.stride[1] + vv - self.padding[1]
        ok = (rr >= 0) & (rr < h) & (qq >= 0) & (qq < w)
        vals = np.ones(cc.shape, dtype=np.int64) if self.weight is None else self.weight[ii, jj]
        rows = (cc * oh + ii) * ow + jj
        cols = (cc * h + rr) * w + qq
        return [_csr(rows[ok], cols[ok], vals[ok], (c * oh * ow, c * h * w))]


# ================================================================================================== add
@dataclass(frozen=True, eq=False)
class Add(LinearMap):
    """``y = sum_i w_i x_i + b`` elementwise over ``len(weights)`` inputs of one shape (int weights, int bias)."""

    weights: tuple[int, ...] = (1, 1)
    bias: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        where = f"Add {self.name!r}"
        object.__setattr__(self, "weights", int_tuple(self.weights, f"{where} weights"))
        object.__setattr__(self, "bias", int_scalar(self.bias, f"{where} bias"))
        if len(self.weights) < 1:
            raise ModelError(f"{where}: at least one input weight expected")

    @property
    def arity(self) -> int:  # type: ignore[override]
        return len(self.weights)

    def output_shape(self, *in_shapes: Shape) -> Shape:
        if any(s != in_shapes[0] for s in in_shapes):
            raise ModelError(f"Add {self.name!r}: inputs of different shapes {list(in_shapes)}")
        return in_shapes[0]

    def parameter_count(self) -> int:
        return len(self.weights) + 1

    def summary(self) -> str:
        terms = " + ".join(f"{w} x{k}" for k, w in enumerate(self.weights))
        return f"{terms} + {self.bias}"

    def _w(self, part: str) -> list[int]:
        return [int(v) for v in split_parts(np.asarray(self.weights), part)]

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        out = np.zeros_like(xs[0])
        for w, x in zip(self._w(part), xs, strict=True):
            if w:
                out += x * x.dtype.type(w)
        return out

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        return [lam * lam.dtype.type(w) for w in self._w(part)]

    def offset(self, in_shapes: Sequence[Shape]) -> np.ndarray:
        return np.full(in_shapes[0], self.bias, dtype=np.int64)

    def value_bound(self, in_bounds: Sequence[int], in_shapes: Sequence[Shape]) -> int:
        return sum(abs(w) * int(m) for w, m in zip(self.weights, in_bounds, strict=True)) + abs(self.bias)

    def matrices(self, in_shapes: Sequence[Shape]) -> list:
        n = size(in_shapes[0])
        idx = np.arange(n)
        return [_csr(idx, idx, np.full(n, w), (n, n)) for w in self.weights]
