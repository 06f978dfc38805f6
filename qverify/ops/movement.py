"""Data-movement ops: each output is one input element or a constant (coefficients 0 and 1).

* :class:`Flatten`   ``[C, H, W] -> [C*H*W]`` (C order)
* :class:`Reshape`   to ``shape`` (C order; sizes must agree)
* :class:`Transpose` ``y = x.transpose(perm)`` over the value's axes (no batch axis): the NHWC <-> NCHW pairs of
  TensorFlow/TFLite conversions
* :class:`Pad`       ``y = x`` padded with the constant ``value`` (``pads``: before/after per axis)
* :class:`Concat`    ``y = concat(x_1, ..., x_k, axis)``

They are :class:`~qverify.ops.base.LinearMap` s with ``movement = True``: exact in any dtype, their ``|L|`` and
``L+`` are ``L`` and ``L-`` is 0, and a value range passes through (united with the fill constant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qverify.ops.base import LinearMap, ModelError, Shape, check_part, int_scalar, int_tuple, size


def _csr_gather(src: np.ndarray, in_sizes: Sequence[int]) -> list:
    """Per input, the 0/1 matrix ``[out_n, in_n]`` of the gather ``y[k] = cat(x)[src[k]]`` (``src = -1``: fill)."""
    from scipy.sparse import coo_matrix

    mats, start = [], 0
    for n in in_sizes:
        rows = np.nonzero((src >= start) & (src < start + n))[0]
        mats.append(coo_matrix((np.ones(len(rows), dtype=np.int64), (rows, src[rows] - start)),
                               shape=(len(src), n)).tocsr())
        start += n
    return mats


class _Movement(LinearMap):
    movement = True

    def index_map(self, in_shapes: Sequence[Shape]) -> np.ndarray:
        """``src [out_n]``: the index into the concatenated flattened inputs of each output, ``-1`` for the fill
        constant; computed by running the op on the index arrays (so it is the op's own semantics)."""
        sizes = [size(s) for s in in_shapes]
        starts = np.cumsum([0, *sizes[:-1]])
        xs = [(np.arange(n, dtype=np.int64) + s + 1).reshape(1, *shape)
              for n, s, shape in zip(sizes, starts, in_shapes, strict=True)]
        return self.linear(xs).reshape(-1) - 1

    def offset(self, in_shapes: Sequence[Shape]) -> np.ndarray:
        return np.zeros(self.output_shape(*in_shapes), dtype=np.int64)

    def value_bound(self, in_bounds: Sequence[int], in_shapes: Sequence[Shape]) -> int:
        return max([int(m) for m in in_bounds] + [abs(v) for v in self.fill_values()])

    def matrices(self, in_shapes: Sequence[Shape]) -> list:
        return _csr_gather(self.index_map(in_shapes), [size(s) for s in in_shapes])

    @staticmethod
    def _zero_if_neg(part: str) -> bool:
        """``L-`` of a data-movement op is 0 (every coefficient is 0 or 1)."""
        check_part(part)
        return part == "neg"


@dataclass(frozen=True, eq=False)
class Flatten(_Movement):
    """``[C, H, W] -> [C*H*W]`` (C order)."""

    name: str = ""

    def output_shape(self, *in_shapes: Shape) -> Shape:
        return (size(in_shapes[0]),)

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        y = xs[0].reshape(len(xs[0]), -1)
        return np.zeros_like(y) if self._zero_if_neg(part) else y

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        t = lam.reshape(len(lam), *in_shapes[0])
        return [np.zeros_like(t) if part == "neg" else t]


@dataclass(frozen=True, eq=False)
class Reshape(_Movement):
    """``x.reshape(shape)`` in C order (no batch axis in ``shape``)."""

    shape: tuple[int, ...]
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", int_tuple(self.shape, f"Reshape {self.name!r} shape", minimum=1))

    def summary(self) -> str:
        return f"to {self.shape}"

    def output_shape(self, *in_shapes: Shape) -> Shape:
        if size(in_shapes[0]) != size(self.shape):
            raise ModelError(f"Reshape {self.name!r}: cannot reshape {in_shapes[0]} to {self.shape}")
        return self.shape

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        y = xs[0].reshape(len(xs[0]), *self.shape)
        return np.zeros_like(y) if self._zero_if_neg(part) else y

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        t = lam.reshape(len(lam), *in_shapes[0])
        return [np.zeros_like(t) if part == "neg" else t]


@dataclass(frozen=True, eq=False)
class Transpose(_Movement):
    """``y = x.transpose(perm)`` over the value's own axes (``perm`` a permutation of ``range(ndim)``)."""

    perm: tuple[int, ...]
    name: str = ""

    def __post_init__(self) -> None:
        perm = int_tuple(self.perm, f"Transpose {self.name!r} perm")
        if sorted(perm) != list(range(len(perm))):
            raise ModelError(f"Transpose {self.name!r}: perm {perm} is not a permutation")
        object.__setattr__(self, "perm", perm)

    def summary(self) -> str:
        return f"perm {self.perm}"

    def output_shape(self, *in_shapes: Shape) -> Shape:
        if len(in_shapes[0]) != len(self.perm):
            raise ModelError(f"Transpose {self.name!r}: perm {self.perm} for an input of shape {in_shapes[0]}")
        return tuple(in_shapes[0][p] for p in self.perm)

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        y = np.ascontiguousarray(xs[0].transpose(0, *[p + 1 for p in self.perm]))
        return np.zeros_like(y) if self._zero_if_neg(part) else y

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        inv = np.argsort(self.perm)
        t = np.ascontiguousarray(lam.transpose(0, *[int(p) + 1 for p in inv]))
        return [np.zeros_like(t) if part == "neg" else t]


@dataclass(frozen=True, eq=False)
class Pad(_Movement):
    """``x`` padded with the constant ``value``: ``pads = (b_1, ..., b_n, a_1, ..., a_n)`` cells before/after each
    of the value's ``n`` axes (ONNX's order, without the batch axis)."""

    pads: tuple[int, ...]
    value: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "pads", int_tuple(self.pads, f"Pad {self.name!r} pads", minimum=0))
        object.__setattr__(self, "value", int_scalar(self.value, f"Pad {self.name!r} value"))
        if len(self.pads) % 2:
            raise ModelError(f"Pad {self.name!r}: pads must have two entries per axis, got {self.pads}")

    def output_shape(self, *in_shapes: Shape) -> Shape:
        n = len(self.pads) // 2
        if len(in_shapes[0]) != n:
            raise ModelError(f"Pad {self.name!r}: {n} axes of pads for an input of shape {in_shapes[0]}")
        return tuple(d + self.pads[i] + self.pads[n + i] for i, d in enumerate(in_shapes[0]))

    def fill_values(self) -> tuple[int, ...]:
        return (self.value,)

    def summary(self) -> str:
        return f"pads {self.pads} value {self.value}"

    def _widths(self) -> list[tuple[int, int]]:
        n = len(self.pads) // 2
        return [(0, 0)] + [(self.pads[i], self.pads[n + i]) for i in range(n)]

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        y = np.pad(xs[0], self._widths())
        return np.zeros_like(y) if self._zero_if_neg(part) else y

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        sl = tuple(slice(b, b + d) for (b, _), d in zip(self._widths(), (len(lam), *in_shapes[0]), strict=True))
        t = np.ascontiguousarray(lam[sl])
        return [np.zeros_like(t) if part == "neg" else t]

    def offset(self, in_shapes: Sequence[Shape]) -> np.ndarray:
        inner = np.zeros((1, *in_shapes[0]), dtype=np.int64)
        return np.pad(inner, self._widths(), constant_values=self.value)[0]


@dataclass(frozen=True, eq=False)
class Concat(_Movement):
    """``y = concat(x_1, ..., x_k)`` along ``axis`` of the value (0: channels); ``inputs`` values."""

    axis: int = 0
    inputs: int = 2
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", int_scalar(self.axis, f"Concat {self.name!r} axis"))
        object.__setattr__(self, "inputs", int_scalar(self.inputs, f"Concat {self.name!r} inputs"))
        if self.inputs < 1 or self.axis < 0:
            raise ModelError(f"Concat {self.name!r}: needs >= 1 input and a non-negative axis")

    @property
    def arity(self) -> int:  # type: ignore[override]
        return self.inputs

    def summary(self) -> str:
        return f"{self.inputs} inputs on axis {self.axis}"

    def output_shape(self, *in_shapes: Shape) -> Shape:
        a = self.axis
        first = in_shapes[0]
        if a >= len(first) or any(len(s) != len(first) or s[:a] != first[:a] or s[a + 1:] != first[a + 1:]
                                  for s in in_shapes):
            raise ModelError(f"Concat {self.name!r}: inputs {list(in_shapes)} do not concatenate on axis {a}")
        return (*first[:a], sum(s[a] for s in in_shapes), *first[a + 1:])

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:
        y = np.concatenate(list(xs), axis=self.axis + 1)
        return np.zeros_like(y) if self._zero_if_neg(part) else y

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        cuts = np.cumsum([s[self.axis] for s in in_shapes])[:-1]
        parts = np.split(lam, cuts, axis=self.axis + 1)
        return [np.zeros_like(p) if part == "neg" else np.ascontiguousarray(p) for p in parts]
