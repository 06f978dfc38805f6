"""What every op shares: the model error, integer field checks, and the three op families' protocols.

An op is one node of a :class:`~qverify.network.QNetwork` graph. It belongs to exactly one family, and each family
is a small protocol that the analyses' rule tables (:mod:`qverify.graph`) are written against:

* :class:`LinearMap` - ``y = sum_i L_i(x_i) + c``: integer linear maps of one or more input values plus a constant
  offset (dense, convolution with groups, sum pooling, the add of two activations, and the data-movement ops:
  flatten, reshape, transpose, pad, concat). Each gives, on batches, its linear part ``L`` (and ``|L|``, ``L+``,
  ``L-``), its transpose ``L^T`` (for back-substitution), its offset ``c``, an exact bound of ``|y|`` (validation:
  below ``2^53`` float64 is exact), and its coefficients as exact integer sparse matrices (encoders).
* :class:`Monotone` - ``y = f_c(x)`` elementwise with ``f_c`` a non-decreasing integer function per channel
  (requantize, clamp, step functions such as the binarizing ``Sign``). Bounds map interval ends; encodings take
  the cut points.
* :class:`MaxPool2d` (:mod:`qverify.ops.pool`) - the one piecewise-linear op that is neither.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Shape = tuple[int, ...]

#: the parts of a linear map: the map itself, its elementwise absolute value, its positive and negative parts
PARTS = ("w", "abs", "pos", "neg")


class ModelError(ValueError):
    """A malformed model: the message names the file (when known), the node and what is wrong."""


def int_array(value: object, what: str) -> np.ndarray:
    """``value`` as int64, or a :class:`ModelError` naming ``what`` (non-integers, out of int64 range)."""
    a = np.asarray(value)
    if a.dtype == object:
        try:
            a = a.astype(np.int64)
        except (OverflowError, TypeError) as e:
            raise ModelError(f"{what}: values must be int64 integers ({e})") from None
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ModelError(f"{what}: values must be integers, found non-integer floats")
        if a.size and np.max(np.abs(a)) >= 2**62:
            raise ModelError(f"{what}: values out of int64 range")
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ModelError(f"{what}: integer array expected, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ModelError(f"{what}: values out of int64 range (unsigned values up to {int(a.max())})")
    return a.astype(np.int64, copy=False)


def int_scalar(value: object, what: str) -> int:
    """An integer field (a clamp bound, a stride, a padding): an int, a numpy integer, or an integral float;
    anything else (a fraction, NaN, a string, a bool) is a :class:`ModelError` instead of a silent ``int()``."""
    if isinstance(value, (bool, np.bool_)):
        raise ModelError(f"{what}: integer expected, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ModelError(f"{what}: integer expected, got {value!r}")


def int_tuple(value: object, what: str, n: int | None = None, minimum: int | None = None) -> tuple[int, ...]:
    """A tuple of integer fields (strides, paddings, a permutation), checked for length and minimum."""
    try:
        vals = tuple(int_scalar(v, what) for v in value)  # type: ignore[attr-defined]
    except TypeError:
        raise ModelError(f"{what}: a sequence of integers expected") from None
    if n is not None and len(vals) != n:
        raise ModelError(f"{what}: {n} integers expected, got {vals}")
    if minimum is not None and vals and min(vals) < minimum:
        raise ModelError(f"{what}: values must be >= {minimum}, got {vals}")
    return vals


def size(shape: Shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


class Op:
    """Base of every op: ``arity`` input values, a name, and its output shape from its input shapes."""

    name: str
    #: number of input values (``None``: any number >= 1, as concat)
    arity: int | None = 1

    @property
    def kind(self) -> str:
        return type(self).__name__

    def where(self) -> str:
        return f"{self.kind} {self.name!r}"

    def output_shape(self, *in_shapes: Shape) -> Shape:  # pragma: no cover - every op overrides
        raise NotImplementedError

    def parameter_count(self) -> int:
        return 0

    def summary(self) -> str:
        """The op's parameters in a few words (for ``qverify info``)."""
        return ""


class LinearMap(Op):
    """``y = sum_i L_i(x_i) + c`` with integer coefficients (the family protocol).

    * :meth:`linear` ``(xs, part)``: ``sum_i P_i(x_i)`` on float batches ``[B, *in_i] -> [B, *out]`` where ``P`` is
      the map (``part="w"``), ``|L|`` (``"abs"``), ``L+ = max(L, 0)`` (``"pos"``) or ``L- = min(L, 0)`` (``"neg"``),
      in the dtype of the inputs. Exact for integer operands whenever every partial sum is an integer below
      ``2^53`` (float64) / ``2^24`` (float32): :meth:`value_bound` bounds them (callers check).
    * :meth:`transpose` ``(lam, in_shapes, part)``: the rows ``lam [N, *out]`` pulled back through ``P``:
      ``[N, *in_i]`` per input, ``(lam . P(x) = sum_i T_i(lam) . x_i)``.
    * :meth:`offset` ``(in_shapes)``: the constant ``c`` (int64 ``[*out]``): biases and padded cells.
    * :meth:`value_bound` ``(in_bounds, in_shapes)``: an exact integer ``V >= max |y|`` and ``>=`` every partial
      sum's magnitude when every ``|x_i| <= in_bounds[i]``.
    * :meth:`matrices` ``(in_shapes)``: ``L_i`` as exact int64 ``scipy.sparse.csr_matrix [out_n, in_n_i]``.
    * ``movement``: a data-movement op (every coefficient 0 or 1, each output one input or the constant): exact in
      any dtype, and it maps value ranges to the union of its inputs' (and its fill constant's).
    """

    movement: bool = False

    def linear(self, xs: Sequence[np.ndarray], part: str = "w") -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def transpose(self, lam: np.ndarray, in_shapes: Sequence[Shape], part: str = "w") -> list[np.ndarray]:
        raise NotImplementedError  # pragma: no cover

    def offset(self, in_shapes: Sequence[Shape]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def value_bound(self, in_bounds: Sequence[int], in_shapes: Sequence[Shape]) -> int:  # pragma: no cover
        raise NotImplementedError

    def matrices(self, in_shapes: Sequence[Shape]) -> list:  # pragma: no cover
        raise NotImplementedError

    def fill_values(self) -> tuple[int, ...]:
        """The constants a movement op may output (a pad value), for its value range."""
        return ()


class Monotone(Op):
    """``y = f_c(x)`` elementwise, ``f_c`` non-decreasing on the integers, channel ``c`` on axis 1 of the batch
    (the family protocol). ``apply(x)`` is the exact function on int64 batches (:mod:`qverify.execute` holds
    the functions); ``out_range`` the values it can take."""

    def output_shape(self, *in_shapes: Shape) -> Shape:
        return in_shapes[0]

    def out_range(self) -> tuple[int, int]:  # pragma: no cover
        raise NotImplementedError


def check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def split_parts(W: np.ndarray, part: str) -> np.ndarray:
    """``W``, ``|W|``, ``max(W, 0)`` or ``min(W, 0)``."""
    check_part(part)
    if part == "w":
        return W
    if part == "abs":
        return np.abs(W)
    return np.maximum(W, 0) if part == "pos" else np.minimum(W, 0)
