"""Exact integer interval bound propagation (QA-IBP) over a :class:`~qverify.network.QNetwork`, batched over boxes.

For a batch of integer input boxes ``lo <= x <= hi`` every layer maps an integer interval to an integer interval
that contains every value the executor (:func:`qverify.execute.execute`) can produce for an input of the box:

* linear maps (dense, conv, sum pooling, add), by midpoint and radius in doubled integers (no halves):
  ``c = lo + hi`` (``= 2 mu``), ``d = hi - lo`` (``= 2 r``), ``C = W c + 2 b``, ``D = |W| d``, and
  ``[lo', hi'] = [(C - D) / 2, (C + D) / 2]`` - which equals ``[W+ lo + W- hi + b, W+ hi + W- lo + b]``,
  the exact range of the affine map over the box (``C - D`` and ``C + D`` are even). A convolution's padded
  cells hold the constant ``pad_value`` (radius 0): the center pass pads ``c`` with ``2 pad_value``, the radius
  pass pads ``d`` with 0.
* requantization ``clamp(R(acc p / q) + z, lo, hi)`` and clamp: monotone non-decreasing, so they map the ends:
  ``[f(lo), f(hi)]`` (the executor's own :func:`qverify.execute.requantize`, exact integer rounding).
* data movement (flatten, reshape, transpose, pad, concat): the map of each end; max pooling (non-decreasing in
  every cell) and step functions likewise map the ends; a lookup table gives its exact range over the interval
  (range-minimum queries, :func:`lookup_range`).

**Exactness of the float64 BLAS.** The affine passes run in float64. Network validation bounds every accumulator
by ``V = max_o sum_i |W_oi| * m + max |b| (+ sum |W| |pad_value|)`` with ``m`` the largest magnitude of the
layer's input range, and ``V < 2^53``. Every box handled here lies inside the input grid, so (by induction) every
interval lies inside the layer's worst-case range, ``|c| <= 2m`` and ``0 <= d <= 2m``: every partial sum of
``W c + 2b``, of ``|W| d`` and the results ``C +- D`` are integers of magnitude ``<= 2V``. When ``2V < 2^53`` every
float64 operation is exact; when even ``2V < 2^24`` the same holds in float32, which halves the BLAS time
(:func:`_center_radius_dtype`). Otherwise (``2^52 <= V < 2^53``, only for huge weights) the layer uses positive
and negative weight parts, ``W+ lo + W- hi + b``, whose partial sums stay below ``V``, also exact.

The propagation is a table ``{op type: function}`` (:data:`INTERVAL`) walked by :func:`qverify.graph.forward`
(:func:`interval_bounds`), in the style of jax_verify's bound propagation. Each table function takes
``(op, input bounds, in_bounds)`` where ``in_bounds`` are the largest magnitudes of the op's worst-case input
ranges (``net.value_ranges``) and returns the output ``(lo, hi)``.

Deciding properties: an unsafe conjunction ``A y <= b`` is infeasible over the box when for some row
``min_{y in [ylo, yhi]} a.y = sum a+ ylo + sum a- yhi > b`` (exact integers); a property is certified when every
disjunct is infeasible (:func:`refutes_unsafe`, :func:`certified_by_interval`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import numpy as np

from qverify import graph
from qverify.execute import check_inputs, max_pool, requantize, step_function
from qverify.network import (
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
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
from qverify.property import Property
from qverify.quant import FLOAT32_EXACT, FLOAT64_EXACT, INT64_SAFE

Bounds = tuple[np.ndarray, np.ndarray]
IntervalFn = Callable[..., Bounds]


# ----------------------------------------------------------------------------------------------- linear maps
def affine_value_bound(layer: LinearMap, in_bound: int | Sequence[int], in_shapes: Sequence[tuple] | None = None
                       ) -> int:
    """``V``: the largest value (and partial sum) magnitude of a linear map over inputs of magnitude
    ``<= in_bound`` (one bound per input; as network validation)."""
    bounds = [int(in_bound)] if isinstance(in_bound, (int, np.integer)) else [int(b) for b in in_bound]
    return layer.value_bound(bounds, in_shapes if in_shapes is not None else [()] * len(bounds))


def _center_radius_exact(layer: LinearMap, in_bound: int | Sequence[int]) -> bool:
    return 2 * affine_value_bound(layer, in_bound) < FLOAT64_EXACT


def _center_radius_dtype(layer: LinearMap, in_bound: int | Sequence[int]) -> type:
    """float32 when ``2V < 2^24`` (every integer up to ``2^24`` is a float32, so the same argument as for float64
    applies and BLAS runs twice as fast), else float64."""
    return np.float32 if 2 * affine_value_bound(layer, in_bound) < FLOAT32_EXACT else np.float64


def _halves(cc: np.ndarray, dd: np.ndarray) -> Bounds:
    """``((C - D) / 2, (C + D) / 2)`` as int64 (exact: ``C +- D`` are even integers below ``2^53``)."""
    lo = cc - dd
    lo *= 0.5
    cc += dd
    cc *= 0.5
    return lo.astype(np.int64), cc.astype(np.int64)


def _linear(layer: LinearMap, ins: list[Bounds], in_bounds: list[int]) -> Bounds:
    """``C = L(c) + 2 off``, ``D = |L|(d)`` (center and radius, doubled); data movement maps the ends; maps whose
    doubled values could reach ``2^53`` use ``L+ lo + L- hi + off`` (partial sums below ``V``)."""
    shapes = [lo.shape[1:] for lo, _ in ins]
    off = layer.offset(shapes)
    if layer.movement:
        return layer.linear([lo for lo, _ in ins]) + off, layer.linear([hi for _, hi in ins]) + off
    if _center_radius_exact(layer, in_bounds):
        dt = _center_radius_dtype(layer, in_bounds)
        cc = layer.linear([np.add(lo, hi, dtype=dt) for lo, hi in ins], "w")
        cc += (2 * off).astype(dt)
        dd = layer.linear([np.subtract(hi, lo, dtype=dt) for lo, hi in ins], "abs")
        return _halves(cc, dd)
    lf = [lo.astype(np.float64) for lo, _ in ins]
    hf = [hi.astype(np.float64) for _, hi in ins]
    out_lo = layer.linear(lf, "pos") + layer.linear(hf, "neg") + off
    out_hi = layer.linear(hf, "pos") + layer.linear(lf, "neg") + off
    return out_lo.astype(np.int64), out_hi.astype(np.int64)


def _requantize(layer: Requantize, ins: list[Bounds], in_bounds: list[int]) -> Bounds:
    (lo, hi), = ins
    return requantize(layer, lo), requantize(layer, hi)


def _clamp(layer: Clamp, ins: list[Bounds], in_bounds: list[int]) -> Bounds:
    (lo, hi), = ins
    return np.clip(lo, layer.lo, layer.hi), np.clip(hi, layer.lo, layer.hi)


def _step(layer: Step, ins: list[Bounds], in_bounds: list[int]) -> Bounds:
    (lo, hi), = ins
    return step_function(layer, lo), step_function(layer, hi)


_RMQ: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sparse_tables(layer: Lookup) -> tuple[np.ndarray, np.ndarray]:
    """Range-minimum and -maximum tables ``[K, C, D]``: level ``k`` holds ``min``/``max`` of ``table_c[i : i + 2^k]``
    (cached per op)."""
    if layer not in _RMQ:
        mins, maxs = [layer.table], [layer.table]
        d = layer.table.shape[1]
        k = 1
        while (1 << k) <= d:
            h = 1 << (k - 1)
            mins.append(np.minimum(mins[-1][:, :-h], mins[-1][:, h:]))
            maxs.append(np.maximum(maxs[-1][:, :-h], maxs[-1][:, h:]))
            k += 1
        pad = [np.pad(m, ((0, 0), (0, d - m.shape[1]))) for m in mins]
        padx = [np.pad(m, ((0, 0), (0, d - m.shape[1]))) for m in maxs]
        _RMQ[layer] = (np.stack(pad), np.stack(padx))
    return _RMQ[layer]


def lookup_range(layer: Lookup, lo: np.ndarray, hi: np.ndarray) -> Bounds:
    """``(min, max)`` of ``table_c`` over the integers of ``[lo, hi]`` elementwise: two overlapping power-of-two
    windows of the sparse tables, ``k = floor(log2(hi - lo + 1))`` (exact, O(1) per element)."""
    mins, maxs = _sparse_tables(layer)
    a = np.asarray(lo, dtype=np.int64) - layer.start
    b = np.asarray(hi, dtype=np.int64) - layer.start
    k = np.floor(np.log2(b - a + 1)).astype(np.int64)
    k = np.where((1 << (k + 1)) <= b - a + 1, k + 1, k)  # guard the float log2 at powers of two
    k = np.where((1 << k) > b - a + 1, k - 1, k)
    shape = a.shape
    ch = np.zeros(shape, dtype=np.int64) if layer.channels == 1 else np.broadcast_to(
        np.arange(layer.channels).reshape((1, -1) + (1,) * (a.ndim - 2)), shape)
    right = b - (1 << k) + 1
    out_lo = np.minimum(mins[k, ch, a], mins[k, ch, right])
    out_hi = np.maximum(maxs[k, ch, a], maxs[k, ch, right])
    return out_lo, out_hi


def _lookup(layer: Lookup, ins: list[Bounds], in_bounds: list[int]) -> Bounds:
    (lo, hi), = ins
    return lookup_range(layer, lo, hi)


def _max_pool(layer: MaxPool2d, ins: list[Bounds], in_bounds: list[int]) -> Bounds:
    """The maximum is non-decreasing in every cell: ``[max lo, max hi]`` per window (exact ends)."""
    (lo, hi), = ins
    return max_pool(layer, lo), max_pool(layer, hi)


def _uncertain(layer: Uncertain, ins: list[Bounds], in_bounds: list[int]) -> Bounds:
    """The set-valued identity ``y in [x - d, x + d]``: ``[lo - d, hi + d]`` (exact over the set)."""
    (lo, hi), = ins
    d = layer.deltas(lo.shape[1:])[None]
    return lo - d, hi + d


#: the interval table: one exact function per op type, ``fn(op, input bounds, input magnitudes) -> (lo, hi)``
INTERVAL: dict[type, IntervalFn] = {Dense: _linear, Conv2d: _linear, SumPool2d: _linear, Add: _linear,
                                    Flatten: _linear, Reshape: _linear, Transpose: _linear, Pad: _linear,
                                    Concat: _linear, Requantize: _requantize, Clamp: _clamp, Step: _step,
                                    Lookup: _lookup, MaxPool2d: _max_pool, Uncertain: _uncertain}


def node_interval(net: QNetwork, index: int, ins: list[Bounds]) -> Bounds:
    """Bounds of node ``index``'s output for bounds ``ins`` of the values it reads (``[B, *shape]`` each)."""
    layer = net.layers[index]
    mags = [max(abs(a), abs(b)) for a, b in (net.value_ranges[j] for j in net.node_inputs(index))]
    return graph.rule(INTERVAL, layer, "interval bounds")(layer, ins, mags)


def layer_interval(net: QNetwork, index: int, lo: np.ndarray, hi: np.ndarray) -> Bounds:
    """Bounds of one-input node ``index``'s output for input bounds ``[lo, hi]``."""
    return node_interval(net, index, [(lo, hi)])


def _walk(net: QNetwork, lo: np.ndarray, hi: np.ndarray, keep: bool) -> list[Bounds | None]:
    return graph.forward(net, (lo, hi), lambda i, layer, ins: node_interval(net, i, ins), keep=keep)


# ----------------------------------------------------------------------------------------------- entry point
def check_boxes(net: QNetwork, lo: np.ndarray, hi: np.ndarray) -> Bounds:
    """Validate a batch of boxes (``[B, n]``, ``[B, *input_shape]`` or one box ``[n]``) against the network's
    input grid and return them as int64 ``[B, *input_shape]`` (no copy when they already are int64)."""
    lo_a = np.asarray(lo)
    hi_a = np.asarray(hi)
    if lo_a.shape != hi_a.shape:
        raise ValueError(f"lo and hi differ in shape ({lo_a.shape} vs {hi_a.shape})")
    if not (np.issubdtype(lo_a.dtype, np.integer) and np.issubdtype(hi_a.dtype, np.integer)):
        lo_a, hi_a = check_inputs(net, lo_a), check_inputs(net, hi_a)  # validates non-integer dtypes
    if lo_a.ndim == 0 or lo_a.size % net.num_inputs:
        raise ValueError(f"box of shape {lo_a.shape} does not match the network input {net.input_shape}")
    lo_a = lo_a.astype(np.int64, copy=False).reshape((-1, *net.input_shape))
    hi_a = hi_a.astype(np.int64, copy=False).reshape((-1, *net.input_shape))
    if lo_a.size:
        if np.any(lo_a > hi_a):
            raise ValueError("empty input box: lo > hi somewhere")
        if lo_a.min() < net.input_lo or hi_a.max() > net.input_hi:
            raise ValueError(f"box leaves the input grid [{net.input_lo}, {net.input_hi}]")
    return lo_a, hi_a


def interval_bounds(net: QNetwork, lo: np.ndarray, hi: np.ndarray, batch_size: int = 4096) -> list[Bounds]:
    """Exact integer interval bounds of every layer for a batch of integer input boxes.

    ``lo``, ``hi``: int ``[B, n_inputs]`` (flattened), ``[B, *input_shape]`` or one box ``[n_inputs]``, inside the
    network's input grid. Returns one ``(lo, hi)`` pair per element of :func:`qverify.execute.execute`'s output
    (index 0 the input box, index ``i + 1`` layer ``i``'s output), each int64 ``[B, *shape]``. For every integer
    ``x`` of box ``k`` the executor's values of layer ``i`` lie in ``[lo[k], hi[k]]`` (see the module docstring).
    The batch is processed in chunks of ``batch_size`` boxes.
    """
    lo_a, hi_a = check_boxes(net, lo, hi)
    n = len(lo_a)
    if n <= batch_size:
        return _walk(net, lo_a, hi_a, True)  # type: ignore[return-value]
    out = [(lo_a, hi_a)] + [(np.empty((n, *shape), dtype=np.int64), np.empty((n, *shape), dtype=np.int64))
                            for shape in net.shapes[1:]]
    for s in range(0, n, batch_size):
        vals = _walk(net, lo_a[s:s + batch_size], hi_a[s:s + batch_size], True)
        for i in range(len(net.layers)):
            out[i + 1][0][s:s + batch_size] = vals[i + 1][0]  # type: ignore[index]
            out[i + 1][1][s:s + batch_size] = vals[i + 1][1]  # type: ignore[index]
    return out


def interval_output_bounds(net: QNetwork, lo: np.ndarray, hi: np.ndarray, batch_size: int = 4096) -> Bounds:
    """The last layer's bounds only (``[B, n_out]`` each), without keeping the intermediate layers."""
    lo_a, hi_a = check_boxes(net, lo, hi)
    outs_lo, outs_hi = [], []
    for s in range(0, max(len(lo_a), 1), batch_size):
        l, h = _walk(net, lo_a[s:s + batch_size], hi_a[s:s + batch_size], False)[-1]  # type: ignore[misc]
        outs_lo.append(l.reshape(len(l), -1))
        outs_hi.append(h.reshape(len(h), -1))
    return np.concatenate(outs_lo), np.concatenate(outs_hi)


# ----------------------------------------------------------------------------------------------- properties
def row_lower_bounds(A: np.ndarray, ylo: np.ndarray, yhi: np.ndarray) -> np.ndarray:
    """``min_{ylo <= y <= yhi} A y`` for a batch of output boxes: ``A`` int ``[k, n]``, ``ylo``/``yhi``
    ``[B, n]``; returns ``[B, k]`` exact (int64, or Python ints in an object array when int64 could overflow)."""
    A = np.atleast_2d(np.asarray(A, dtype=np.int64))
    ylo = np.atleast_2d(np.asarray(ylo, dtype=np.int64))
    yhi = np.atleast_2d(np.asarray(yhi, dtype=np.int64))
    ymax = max(int(np.abs(ylo).max(initial=0)), int(np.abs(yhi).max(initial=0)))
    amax = int(np.abs(A).sum(axis=1).max(initial=0))
    Ap, An = np.maximum(A, 0), np.minimum(A, 0)
    if amax * ymax < INT64_SAFE:
        return ylo @ Ap.T + yhi @ An.T
    o = object
    return ylo.astype(o) @ Ap.T.astype(o) + yhi.astype(o) @ An.T.astype(o)


def refutes_unsafe(prop: Property, ylo: np.ndarray, yhi: np.ndarray) -> np.ndarray:
    """Boolean ``[B]``: for each output box, whether every unsafe disjunct ``A_d y <= b_d`` is infeasible, i.e.
    some row has ``min over the box of a.y > b`` (then no output of the box is unsafe)."""
    ylo = np.atleast_2d(ylo)
    ok = np.ones(len(ylo), dtype=bool)
    for conj in prop.unsafe:
        mins = row_lower_bounds(conj.A, ylo, yhi)
        ok &= np.any(mins > conj.b[None, :], axis=1)
    return ok


def certified_by_interval(net: QNetwork, props: Property | Sequence[Property],
                          boxes: tuple[np.ndarray, np.ndarray] | None = None,
                          batch_size: int = 4096) -> np.ndarray:
    """Decide robustness from interval output bounds; ``True`` means proved (``False``: undecided).

    * ``props`` a sequence of properties (each with its own box): one batched bound pass, result ``[P]``;
    * ``props`` one property and ``boxes = (lo, hi)`` (``[B, n]``, sub-boxes, e.g. of branch and bound): result
      ``[B]``, whether the property holds on each sub-box;
    * one property and no boxes: result ``[1]``.
    """
    plist, lo, hi = property_boxes(net, props, boxes)
    if not plist:
        return np.zeros(0, dtype=bool)
    ylo, yhi = interval_output_bounds(net, lo, hi, batch_size)
    return refutes_each(plist, ylo, yhi)


def property_boxes(net: QNetwork, props: Property | Sequence[Property],
                   boxes: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[list[Property], np.ndarray, np.ndarray]:
    """The two call forms of the certifiers as one list of properties and stacked boxes ``lo, hi [B, n]``.

    A sequence of properties gives their own boxes; one property with ``boxes = (lo, hi)`` (sub-boxes) is repeated
    once per sub-box; one property alone gives its box. Every property is checked against ``net``."""
    if isinstance(props, Property):
        props.check_network(net)
        if boxes is None:
            return [props], props.lo[None, :], props.hi[None, :]
        lo, hi = np.atleast_2d(boxes[0]), np.atleast_2d(boxes[1])
        return [props] * len(lo), lo, hi
    plist = list(props)
    for p in plist:
        p.check_network(net)
    if not plist:
        n = net.num_inputs
        return plist, np.zeros((0, n), dtype=np.int64), np.zeros((0, n), dtype=np.int64)
    return plist, np.stack([p.lo for p in plist]), np.stack([p.hi for p in plist])


def refutes_each(plist: Sequence[Property], ylo: np.ndarray, yhi: np.ndarray) -> np.ndarray:
    """:func:`refutes_unsafe` row by row: ``[B]``, whether property ``plist[i]`` holds on output box ``i``
    (one vectorized call when every row has the same property, as for the sub-boxes of branch and bound)."""
    if plist and all(p is plist[0] for p in plist):
        return refutes_unsafe(plist[0], ylo, yhi)
    return np.array([bool(refutes_unsafe(p, ylo[i:i + 1], yhi[i:i + 1])[0]) for i, p in enumerate(plist)],
                    dtype=bool)
