"""The integer network: a graph of integer ops, with its validation.

A :class:`QNetwork` is a directed acyclic graph of integer ops (:mod:`qverify.ops`) applied to a batch of integer
inputs on the grid ``[input_lo, input_hi]^input_shape`` (channels first, no batch axis in the shapes). Its values
are numbered: value 0 is the input and value ``i + 1`` is node ``i``'s output; node ``i`` (``layers[i]``) reads
the values ``inputs[i]`` (all ``<= i``, so ``layers`` is in topological order). A chain (``inputs=None``) reads
the previous value at every node: ``inputs[i] = (i,)``, so value ``i + 1`` is layer ``i``'s output, as before
graphs. The output is the last value (a vector); the predicted class is its argmax with the network's tie rule
(``first``: the first maximal index wins, as numpy and QVIP do).

The ops' semantics (:mod:`qverify.ops`, executed by :mod:`qverify.execute`):

* integer linear maps (:class:`~qverify.ops.LinearMap`): :class:`Dense` ``W x + b``, :class:`Conv2d` (strides,
  padding with the input zero point, dilation, groups / depthwise), :class:`SumPool2d`, :class:`Add`
  ``sum w_i x_i + b`` (residual adds), and data movement: :class:`Flatten`, :class:`Reshape`, :class:`Transpose`,
  :class:`Pad`, :class:`Concat`;
* monotone elementwise ops (:class:`~qverify.ops.Monotone`): :class:`Requantize`
  ``clamp(R(acc * p_c / q_c) + z_c, lo, hi)`` (or onnxruntime's float32 ``clamp(rne(fl32(fl32(acc) m_c)) + z_c)``),
  :class:`Clamp`, :class:`Step` (``Sign`` and binarizing thresholds);
* :class:`Lookup` (any function of one integer, as a table) and :class:`MaxPool2d`;
* :class:`Uncertain` ``y in [x - d_c, x + d_c]``, the one set-valued op (the float32 band of a binarized
  network's float arithmetic): a network that holds one (:attr:`QNetwork.set_valued`) is the set of functions of
  every choice inside its bands, and the executor computes its nominal member (``d = 0``).

Zero points of weights and of layer inputs are folded into ``W`` and ``b`` by the importers (exact integer
algebra: ``sum (w - z_w)(x - z_x) = sum w' x + b'``), so an op sees plain integers. The real-valued view of the
network is ``x_real = s_in (x - z_in)`` at the input and ``y_real = s_out (y - z_out)`` at the output.

Validation (on construction) checks the graph (every node reads earlier values, with the number of inputs its op
takes), shapes, integrality, that every linear map's values and partial sums stay below ``2^53`` in magnitude for
every input of the grid (so float64 BLAS is exact), and names the node and the field that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from qverify.ops import (
    ALL_OPS,
    CHAIN_OPS,
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    LinearMap,
    Lookup,
    MaxPool2d,
    ModelError,
    Monotone,
    Op,
    Pad,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
    Uncertain,
)
from qverify.ops.base import int_array as _int_array
from qverify.ops.base import int_scalar as _int_scalar
from qverify.quant import FLOAT64_EXACT, Rounding, as_fraction

#: any op of the graph (the name the chain era used)
Layer = Op
#: ops with a weight tensor
AFFINE_LAYERS = (Dense, Conv2d)

__all__ = ["AFFINE_LAYERS", "ALL_OPS", "Add", "Clamp", "Concat", "Conv2d", "Dense", "Flatten", "Layer",
           "LinearMap", "Lookup", "MaxPool2d", "ModelError", "Monotone", "Op", "Pad", "QNetwork", "Requantize",
           "Reshape", "Step", "SumPool2d", "Transpose", "Uncertain", "_int_array", "_int_scalar", "pixel_units_network",
           "value_bits"]


def _bits_signed(lo: int, hi: int) -> int:
    """Smallest two's-complement width holding ``[lo, hi]``."""
    b = 1
    while not (-(2 ** (b - 1)) <= lo and hi <= 2 ** (b - 1) - 1):
        b += 1
    return b


def value_bits(lo: int, hi: int) -> str:
    """``'u8'``/``'i6'`` style description of an integer range."""
    if lo >= 0:
        return f"u{max(1, int(hi).bit_length())}"
    return f"i{_bits_signed(lo, hi)}"


@dataclass(frozen=True, eq=False)
class QNetwork:
    """An integer network (see the module docstring for the semantics).

    ``input_rounding`` says how a real input box maps to the integer grid: ``None`` means the model's input *is*
    the integer grid (pixels), and a real box stands for the grid points it contains; a rounding mode means the
    model quantizes real inputs (``x = clamp(R(x_real / s_in) + z_in)``), and a real box stands for its image under
    that quantizer.
    """

    input_shape: tuple[int, ...]
    input_lo: int
    input_hi: int
    layers: tuple[Layer, ...]
    input_scale: Fraction = Fraction(1)
    input_zero_point: int = 0
    output_scale: Fraction = Fraction(1)
    output_zero_point: int = 0
    input_rounding: Rounding | None = None
    tie_rule: str = "first"
    name: str = "qnetwork"
    metadata: dict[str, str] = field(default_factory=dict)
    inputs: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "input_lo", int(self.input_lo))
        object.__setattr__(self, "input_hi", int(self.input_hi))
        object.__setattr__(self, "input_scale", as_fraction(self.input_scale))
        object.__setattr__(self, "output_scale", as_fraction(self.output_scale))
        object.__setattr__(self, "input_zero_point", int(self.input_zero_point))
        object.__setattr__(self, "output_zero_point", int(self.output_zero_point))
        if self.input_rounding is not None:
            object.__setattr__(self, "input_rounding", Rounding(self.input_rounding))
        if self.tie_rule not in ("first",):
            raise ModelError(f"network {self.name!r}: unknown tie rule {self.tie_rule!r} (known: first)")
        if self.input_scale <= 0 or self.output_scale <= 0:
            raise ModelError(f"network {self.name!r}: input and output scales must be positive")
        if self.input_lo > self.input_hi:
            raise ModelError(f"network {self.name!r}: empty input grid [{self.input_lo}, {self.input_hi}]")
        if not self.layers:
            raise ModelError(f"network {self.name!r}: no layers")
        object.__setattr__(self, "inputs", self._check_inputs())
        shapes = [self.input_shape]
        ranges: list[tuple[int, int]] = [(self.input_lo, self.input_hi)]
        for i, layer in enumerate(self.layers):
            where = f"network {self.name!r}, layer {i} ({type(layer).__name__} {getattr(layer, 'name', '')!r})"
            if not isinstance(layer, ALL_OPS):
                raise ModelError(f"{where}: not a qverify op")
            ins = self.inputs[i]
            arity = layer.arity
            if arity is not None and len(ins) != arity:
                raise ModelError(f"{where}: reads {len(ins)} values, the op takes {arity}")
            in_shapes = [shapes[j] for j in ins]
            try:
                shapes.append(tuple(layer.output_shape(*in_shapes)))
            except ModelError as e:
                raise ModelError(f"{where}: {e}") from None
            in_ranges = [ranges[j] for j in ins]
            if isinstance(layer, LinearMap) and layer.movement:
                vals = [v for r in in_ranges for v in r] + list(layer.fill_values())
                ranges.append((min(vals), max(vals)))
            elif isinstance(layer, LinearMap):
                bound = layer.value_bound([max(abs(lo), abs(hi)) for lo, hi in in_ranges], in_shapes)
                if bound >= FLOAT64_EXACT:
                    raise ModelError(f"{where}: accumulators may reach {bound} >= 2^53; not exactly representable")
                ranges.append((-bound, bound))
            elif isinstance(layer, Monotone):
                ranges.append(layer.out_range())
            elif isinstance(layer, Lookup):
                try:
                    layer.check_input_range(*in_ranges[0])
                except ModelError as e:
                    raise ModelError(f"{where}: {e}") from None
                ranges.append(layer.out_range())
            elif isinstance(layer, Uncertain):
                d = int(layer.delta.max())
                ranges.append((in_ranges[0][0] - d, in_ranges[0][1] + d))
            else:
                ranges.append(in_ranges[0])
        if len(shapes[-1]) != 1:
            raise ModelError(f"network {self.name!r}: output must be a vector, got shape {shapes[-1]} "
                             f"(add a Flatten)")
        if self.metadata.get("semantics") == "exact" and self._has_float32():
            raise ModelError(f"network {self.name!r}: metadata says semantics 'exact' but some requantization is "
                             f"float32 (onnxruntime's)")
        object.__setattr__(self, "_shapes", tuple(shapes))
        object.__setattr__(self, "_ranges", tuple(ranges))

    def _check_inputs(self) -> tuple[tuple[int, ...], ...]:
        n = len(self.layers)
        if self.inputs is None:
            return tuple((i,) for i in range(n))
        try:
            ins = tuple(tuple(_int_scalar(j, f"network {self.name!r} inputs") for j in row) for row in self.inputs)
        except TypeError:
            raise ModelError(f"network {self.name!r}: inputs must be one sequence of value indices per node") from None
        if len(ins) != n:
            raise ModelError(f"network {self.name!r}: {len(ins)} input lists for {n} nodes")
        for i, row in enumerate(ins):
            if not row or any(j < 0 or j > i for j in row):
                raise ModelError(f"network {self.name!r}, node {i}: inputs {row} must be earlier values 0..{i} "
                                 f"(value 0 is the input, value k + 1 node k's output)")
        return ins

    # ------------------------------------------------------------------ derived facts
    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the input (index 0) and of every layer's output (index ``i + 1``)."""
        return self._shapes  # type: ignore[attr-defined]

    @property
    def value_ranges(self) -> tuple[tuple[int, int], ...]:
        """Worst-case integer range of the input (index 0) and of every layer's output over the whole grid."""
        return self._ranges  # type: ignore[attr-defined]

    @property
    def is_chain(self) -> bool:
        """Every node reads the previous value and is one of the five chain ops (what code written for chains,
        ``value i + 1 = layer i(value i)``, may assume)."""
        return (all(row == (i,) for i, row in enumerate(self.inputs))  # type: ignore[union-attr]
                and all(isinstance(layer, CHAIN_OPS) for layer in self.layers))

    def require_chain(self, what: str) -> None:
        """Refuse a graph network where only chains are supported yet (a named error, never a guess)."""
        if not self.is_chain:
            kinds = sorted({type(layer).__name__ for layer in self.layers if not isinstance(layer, CHAIN_OPS)})
            joins = [i for i, row in enumerate(self.inputs) if row != (i,)]  # type: ignore[union-attr]
            raise ModelError(f"network {self.name!r}: {what} supports chain networks only "
                             f"(ops {', '.join(kinds) or 'none'} / branches at nodes {joins or 'none'})")

    def node_inputs(self, i: int) -> tuple[int, ...]:
        """The value indices node ``i`` reads."""
        return self.inputs[i]  # type: ignore[index]

    def in_shapes(self, i: int) -> list[tuple[int, ...]]:
        """The shapes of the values node ``i`` reads."""
        return [self.shapes[j] for j in self.node_inputs(i)]

    def consumers(self) -> list[list[int]]:
        """Per value, the nodes that read it (ascending)."""
        out: list[list[int]] = [[] for _ in range(len(self.layers) + 1)]
        for i, row in enumerate(self.inputs):  # type: ignore[arg-type]
            for j in sorted(set(row)):
                out[j].append(i)
        return out

    @property
    def num_inputs(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def num_outputs(self) -> int:
        return self.shapes[-1][0]

    @property
    def output_range(self) -> tuple[int, int]:
        return self.value_ranges[-1]

    def parameter_count(self) -> int:
        return sum(layer.parameter_count() for layer in self.layers)

    @property
    def semantics(self) -> str:
        """The arithmetic the network's requantizations follow: ``"onnxruntime"`` when some requantization is
        float32, else ``metadata["semantics"]`` where an importer recorded it (``"exact"`` or ``"onnxruntime"``: an
        ONNX model imported under onnxruntime's semantics whose layers need no float32 requantization), else
        ``"exact"``."""
        if self._has_float32():
            return "onnxruntime"
        return str(self.metadata.get("semantics", "exact"))

    @property
    def set_valued(self) -> bool:
        """Whether the network holds an :class:`~qverify.ops.Uncertain` op: it then stands for a set of functions
        (the runtime's float32 arithmetic is one member, the executor computes the nominal one), a ``robust``
        verdict covers the whole set, and a counterexample must be confirmed on the runtime
        (:func:`qverify.replay.replay`)."""
        return any(isinstance(layer, Uncertain) for layer in self.layers)

    def _has_float32(self) -> bool:
        return any(isinstance(layer, Requantize) and layer.float32_scale is not None for layer in self.layers)

    def is_fixed_point(self) -> bool:
        """True when every requantization is a power-of-two shift (the QVIP family)."""
        rq = [layer for layer in self.layers if isinstance(layer, Requantize)]
        return bool(rq) and all(layer.shift is not None for layer in rq) and not any(
            isinstance(layer, Step) and layer.cuts.shape[1] > 2 for layer in self.layers)

    def describe(self) -> list[dict[str, object]]:
        """One row per layer: kind, name, output shape, output value range and bit width, parameters."""
        rows = []
        chain, consumers = self.is_chain, self.consumers()
        for i, layer in enumerate(self.layers):
            lo, hi = self.value_ranges[i + 1]
            row: dict[str, object] = {"index": i, "kind": type(layer).__name__, "name": getattr(layer, "name", ""),
                                      "shape": self.shapes[i + 1], "range": (lo, hi), "bits": value_bits(lo, hi)}
            if not chain:
                row["reads"] = self.node_inputs(i)
                readers = consumers[i + 1]
                if len(readers) > 1:
                    row["branches_to"] = tuple(readers)
            if layer.summary():
                row["op"] = layer.summary()
            if isinstance(layer, AFFINE_LAYERS):
                row["params"] = layer.weight.size + layer.bias.size
                row["weight_bits"] = value_bits(int(layer.weight.min()), int(layer.weight.max()))
            if isinstance(layer, Requantize):
                k = layer.shift
                kind = "float32" if layer.float32_scale is not None else "affine"
                row["requant"] = (f"/2^{k}" if k is not None else
                                  (kind if len(layer.num) == 1 else f"{kind} per-channel ({len(layer.num)})"))
                row["rounding"] = layer.rounding.value
                row["semantics"] = layer.semantics
            rows.append(row)
        return rows


def pixel_units_network(image_shape: tuple[int, ...], num_outputs: int) -> QNetwork:
    """A placeholder network that only carries units, for writing properties without a model: 8-bit pixels
    ``0..255`` with real value ``pixel / 256`` (the QVIP convention and qverify's own models'), HWC images taken
    channels-first, ``num_outputs`` outputs in identity units. Its single layer is all zeros; never verify it."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 3 and shape[-1] in (1, 3):
        shape = (shape[2], shape[0], shape[1])
    n = int(np.prod(shape))
    zeros = Dense(np.zeros((num_outputs, n), np.int64), np.zeros(num_outputs, np.int64))
    layers: tuple[Layer, ...] = (Flatten(), zeros)
    if len(shape) == 1:
        layers = layers[1:]
    return QNetwork(shape, 0, 255, layers, input_scale=Fraction(1, 256), name="pixel-units",
                    metadata={"placeholder": "units only"})
