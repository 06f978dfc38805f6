"""The executor: the exact batched forward pass of a :class:`~qverify.network.QNetwork`.

This module *is* the semantics. Bounds, encodings, attacks and the trainer's export are tested against it.

Linear maps (dense, convolution, sum pooling, add) are computed in float64 BLAS: network validation proved every
accumulator (and so every partial sum, whatever the summation order) stays below ``2^53`` in magnitude for any
input of the grid, so the float64 results are the exact integers; data movement runs on the int64 values. Max
pooling is the integer maximum; a :class:`~qverify.ops.Step` counts the cut points at or below its input.
Requantization is :func:`qverify.quant.multiply_round` (exact integer arithmetic), or, for a
float32 requantization (``Requantize.float32_scale``, onnxruntime's semantics), :func:`qverify.quant.f32_round`: the
bit-exact emulation of MLAS ``MlasRequantizeOutput``, ``clamp(rne(fl32(fl32(acc) m_c)) + z_c, lo, hi)``.
"""

from __future__ import annotations

import weakref

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
    LinearMap,
    Lookup,
    MaxPool2d,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
    Uncertain,
)
from qverify.quant import FLOAT32_EXACT, f32_round, f32_thresholds, multiply_round, thresholds


class InputError(ValueError):
    """Inputs that are not on the network's integer grid."""


def linear_map(op: LinearMap, xs: list[np.ndarray], in_shapes: list[tuple[int, ...]] | None = None) -> np.ndarray:
    """``sum_i L_i(x_i) + c`` exactly: for maps with coefficients in float32 when the op's value bound for this
    batch's input magnitudes is below ``2^24`` (every partial sum is then an integer float32 holds exactly: twice
    the BLAS speed), else float64 (exact below ``2^53``, which validation proves); int64 for data movement."""
    shapes = [x.shape[1:] for x in xs] if in_shapes is None else in_shapes
    if op.movement:
        return op.linear(xs) + op.offset(shapes)
    mags = [int(np.abs(x).max(initial=0)) for x in xs]
    dt = np.float32 if op.value_bound(mags, shapes) < FLOAT32_EXACT else np.float64
    acc = op.linear([x.astype(dt) for x in xs])
    acc += op.offset(shapes).astype(dt)
    return acc.astype(np.int64)


def conv2d_float(layer: Conv2d, x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Convolution in floating point with its bias and padded cells, ``x`` is ``[B, C, H, W]``. Exact for integer
    operands when every partial sum stays below ``2^53`` (float64, what network validation proves) or ``2^24``
    (float32, callers check)."""
    acc = layer.convolve(np.asarray(x).astype(dtype), "w", layer.pad_value)
    return acc + layer.bias.astype(dtype)[None, :, None, None]


#: clamp ranges up to this many values use the step-table path for rational multipliers
STEP_TABLE_MAX = 1 << 16
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_tables(layer: Requantize) -> list[np.ndarray] | None:
    """Per channel, the sorted cut points ``T_t = threshold(t - z)`` for ``t = lo+1 .. hi``, so that
    ``clamp(R(acc m) + z, lo, hi) = lo + #{t : T_t <= acc}`` exactly; ``None`` when the range is too wide or a cut
    leaves int64 (float32 requantizations: ``T_t = f32_thresholds(t - z, m_c)``). Cached per layer."""
    if layer in _STEPS:
        return _STEPS[layer]
    tables = None
    if layer.hi - layer.lo <= STEP_TABLE_MAX:
        c = max(len(layer.num), layer.zero_point.size)
        tables = []
        for ch in range(c):
            n, d = layer.num[ch if len(layer.num) > 1 else 0], layer.den[ch if len(layer.den) > 1 else 0]
            z = int(layer.zero_point[ch if layer.zero_point.size > 1 else 0])
            if layer.float32_scale is not None:
                m = layer.float32_scale[ch if len(layer.float32_scale) > 1 else 0]
                tables.append(f32_thresholds(np.arange(layer.lo + 1 - z, layer.hi + 1 - z), np.float32(m)))
                continue
            t = thresholds(range(layer.lo + 1 - z, layer.hi + 1 - z), n, d, layer.rounding)
            if t.dtype == object:
                tables = None
                break
            tables.append(t)
    _STEPS[layer] = tables
    return tables


def requantize(layer: Requantize, acc: np.ndarray) -> np.ndarray:
    """``clamp(R(acc * num_c / den_c) + z_c, lo, hi)`` with channels on axis 1 (float32 requantizations:
    ``clamp(rne(fl32(fl32(acc) m_c)) + z_c, lo, hi)``)."""
    if layer.float32_scale is not None:
        shape = (1, -1) + (1,) * (acc.ndim - 2)
        ms = np.asarray(layer.float32_scale, dtype=np.float32)
        m = ms.reshape(shape) if ms.size > 1 else ms[0]
        zp = layer.zero_point.reshape(shape) if layer.zero_point.size > 1 else layer.zero_point[0]
        return np.clip(f32_round(acc, m) + zp, layer.lo, layer.hi).astype(np.int64, copy=False)
    if layer.shift is None:
        tables = step_tables(layer)
        if tables is not None:
            acc = np.asarray(acc, dtype=np.int64)
            if len(tables) == 1:
                return layer.lo + np.searchsorted(tables[0], acc, side="right").astype(np.int64)
            out = np.empty_like(acc)
            for ch, t in enumerate(tables):
                out[:, ch] = layer.lo + np.searchsorted(t, acc[:, ch], side="right")
            return out
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    num = np.asarray(layer.num, dtype=object).reshape(shape)
    den = np.asarray(layer.den, dtype=object).reshape(shape)
    k = layer.shift
    if k is not None:  # power of two: one shift for the whole tensor
        num = np.int64(1)
        den = np.int64(2**k) if k < 62 else np.asarray(2**k, dtype=object)
    elif max(layer.num) < 2**62 and max(layer.den) < 2**62:
        num = num.astype(np.int64)
        den = den.astype(np.int64)
    y = multiply_round(acc, num, den, layer.rounding)
    zp = layer.zero_point.reshape(shape) if layer.zero_point.size > 1 else layer.zero_point[0]
    return np.clip(y + zp, layer.lo, layer.hi).astype(np.int64, copy=False)


def _linear(layer: LinearMap, xs: list[np.ndarray]) -> np.ndarray:
    return linear_map(layer, xs)


def _clamp(layer: Clamp, xs: list[np.ndarray]) -> np.ndarray:
    return np.clip(xs[0], layer.lo, layer.hi)


def step_function(layer: Step, x: np.ndarray) -> np.ndarray:
    """``levels[#{k : cuts[c, k] <= x}]`` per channel ``c`` (axis 1)."""
    levels = np.asarray(layer.levels, dtype=np.int64)
    x = np.asarray(x, dtype=np.int64)
    if layer.channels == 1:
        return levels[np.searchsorted(layer.cuts[0], x, side="right")]
    out = np.empty_like(x)
    for ch in range(layer.channels):
        out[:, ch] = levels[np.searchsorted(layer.cuts[ch], x[:, ch], side="right")]
    return out


def lookup(layer: Lookup, x: np.ndarray) -> np.ndarray:
    """``table_c[x - start]`` per channel ``c`` (axis 1); validation proved every input lies in the domain."""
    x = np.asarray(x, dtype=np.int64) - layer.start
    if layer.channels == 1:
        return layer.table[0][x]
    out = np.empty_like(x)
    for ch in range(layer.channels):
        out[:, ch] = layer.table[ch][x[:, ch]]
    return out


def max_pool(layer: MaxPool2d, x: np.ndarray) -> np.ndarray:
    """The maximum of each window's cells (padded cells ignored)."""
    return layer.windows(np.asarray(x)).max(axis=-1)


#: the executor's table: one exact function per op type, ``f(op, input values) -> output value``
EXECUTE = {Dense: _linear, Conv2d: _linear, SumPool2d: _linear, Add: _linear, Flatten: _linear, Reshape: _linear,
           Transpose: _linear, Pad: _linear, Concat: _linear,
           Requantize: lambda layer, xs: requantize(layer, xs[0]), Clamp: _clamp,
           Step: lambda layer, xs: step_function(layer, xs[0]), Lookup: lambda layer, xs: lookup(layer, xs[0]),
           MaxPool2d: lambda layer, xs: max_pool(layer, xs[0]),
           Uncertain: lambda layer, xs: np.asarray(xs[0])}  # the nominal member of the set (e = 0)


def apply_layer(layer: Layer, x: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Apply one op to a batch (a list of batches for an op with several inputs)."""
    xs = x if isinstance(x, list) else [x]
    return graph.rule(EXECUTE, layer, "executor")(layer, xs)


def _step(i: int, layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    return graph.rule(EXECUTE, layer, "executor")(layer, xs)


def check_inputs(net: QNetwork, x: np.ndarray) -> np.ndarray:
    """Validate and reshape a batch of inputs (``[B, *input_shape]`` or ``[B, n]``) to int64 ``[B, *input_shape]``."""
    a = np.asarray(x)
    if a.dtype == object or np.issubdtype(a.dtype, np.floating):
        if not np.all(a == np.round(a.astype(np.float64))):
            raise InputError("inputs must be integers on the network's grid")
    elif not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"integer inputs expected, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.ndim == 0 or a.size % net.num_inputs:
        raise InputError(f"input of shape {a.shape} does not match the network input {net.input_shape}")
    a = a.reshape((-1, *net.input_shape))
    if a.size and (a.min() < net.input_lo or a.max() > net.input_hi):
        raise InputError(f"inputs outside the integer grid [{net.input_lo}, {net.input_hi}] "
                         f"(found [{a.min()}, {a.max()}])")
    return a


def execute(net: QNetwork, x: np.ndarray) -> list[np.ndarray]:
    """Every layer's integer values for a batch ``x``.

    Element 0 is the input, element ``i + 1`` is layer ``i``'s output."""
    return graph.forward(net, check_inputs(net, x), _step)  # type: ignore[return-value]


def forward(net: QNetwork, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """The integer outputs ``[B, num_outputs]`` for a batch ``x`` (processed in chunks of ``batch_size``)."""
    a = check_inputs(net, x)
    outs = []
    for s in range(0, max(len(a), 1), batch_size):
        v = graph.forward(net, a[s:s + batch_size], _step, keep=False)[-1]
        outs.append(v.reshape(len(v), -1))  # type: ignore[union-attr]
    return np.concatenate(outs) if outs else np.zeros((0, net.num_outputs), dtype=np.int64)


def argmax_first(y: np.ndarray) -> np.ndarray:
    """Argmax along the last axis with the ``first`` tie rule (the first maximal index wins)."""
    return np.argmax(y, axis=-1)


def predict(net: QNetwork, x: np.ndarray) -> np.ndarray:
    """Predicted classes under the network's tie rule."""
    return argmax_first(forward(net, x))


def real_outputs(net: QNetwork, y: np.ndarray) -> np.ndarray:
    """Real-valued view of integer outputs, ``s_out (y - z_out)``, as float64 (for display only)."""
    return (np.asarray(y, dtype=np.float64) - net.output_zero_point) * float(net.output_scale)


def real_inputs(net: QNetwork, x: np.ndarray) -> np.ndarray:
    """Real-valued view of integer inputs, ``s_in (x - z_in)``, as float64 (for display only)."""
    return (np.asarray(x, dtype=np.float64) - net.input_zero_point) * float(net.input_scale)
