"""Per-value integer bounds for the encoder: the format, a resolver and a small interval fallback.

Format (shared with :mod:`qverify.bounds`): a list with one ``(lo, hi)`` pair of int64 arrays per value of the
network (the entries of :func:`qverify.execute.execute`'s output: index 0 the input box, ``i + 1`` the output of
node ``i``), each flattened per sample; a leading batch axis of size 1 is accepted. Every execution of the network
on an input of the box must satisfy ``lo <= value <= hi`` at every value (soundness is the caller's promise).

The fallback (:func:`_own_interval`) is plain interval arithmetic, a rule table ``{op type: rule}``
(:data:`OWN_INTERVAL`) walked by :func:`qverify.graph.forward`:

* a linear map ``y = sum_i L_i(x_i) + c`` with coefficients: ``lo' = sum_i L_i+(lo_i) + L_i-(hi_i) + c`` and
  ``hi' = sum_i L_i+(hi_i) + L_i-(lo_i) + c`` (``L+ = max(L, 0)``, ``L- = min(L, 0)``), the exact range of the map
  over the box, in float64: every partial sum is an integer of magnitude at most the map's ``value_bound``, which
  the network's validation keeps below ``2^53``;
* data movement (every output one input cell or a constant): the map of each end, in int64;
* monotone ops (requantize, clamp, step functions) and max pooling are non-decreasing in every input, so the
  bounds are the executor's images of the ends: ``[f(lo), f(hi)]``;
* a lookup table (any function): ``[min, max]`` of the table over the integers of ``[lo, hi]``.

:func:`box_bounds` prefers ``qverify.bounds.interval.interval_bounds`` when that module exists (same contract, the
same exact ranges).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qverify import graph
from qverify.execute import apply_layer
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
    Op,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
    Uncertain,
)

Bounds = list[tuple[np.ndarray, np.ndarray]]
Pair = tuple[np.ndarray, np.ndarray]


def _linear(op: LinearMap, ins: list[Pair]) -> Pair:
    """``[L+ lo + L- hi + c, L+ hi + L- lo + c]`` (float64, exact below ``2^53``); data movement maps the ends."""
    shapes = [lo.shape[1:] for lo, _ in ins]
    off = op.offset(shapes)
    if op.movement:
        return op.linear([lo for lo, _ in ins]) + off, op.linear([hi for _, hi in ins]) + off
    lf = [lo.astype(np.float64) for lo, _ in ins]
    hf = [hi.astype(np.float64) for _, hi in ins]
    lo = op.linear(lf, "pos") + op.linear(hf, "neg") + off
    hi = op.linear(hf, "pos") + op.linear(lf, "neg") + off
    return lo.astype(np.int64), hi.astype(np.int64)


def _table_range(op: Lookup, ins: list[Pair]) -> Pair:
    """A lookup table (monotone or not): ``[min, max]`` of ``table_c`` over the integers of ``[lo, hi]``, element by
    element (a plain loop: this is the fallback)."""
    (lo, hi), = ins
    shape = lo.shape
    per = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 1 else 1
    out_lo, out_hi = np.empty(lo.size, dtype=np.int64), np.empty(lo.size, dtype=np.int64)
    for k, (a, b) in enumerate(zip(lo.ravel().tolist(), hi.ravel().tolist(), strict=True)):
        ch = (k // per) % shape[1] if len(shape) > 1 else 0
        seg = op.channel_table(ch)[a - op.start:b - op.start + 1]
        out_lo[k], out_hi[k] = int(seg.min()), int(seg.max())
    return out_lo.reshape(shape), out_hi.reshape(shape)


def _ends(op: Op, ins: list[Pair]) -> Pair:
    """A non-decreasing op (monotone elementwise, max pooling): the executor's images of the ends."""
    (lo, hi), = ins
    return apply_layer(op, lo), apply_layer(op, hi)


def _widen(op: Uncertain, ins: list[Pair]) -> Pair:
    """The set-valued identity: ``[lo - d, hi + d]``."""
    (lo, hi), = ins
    d = op.deltas(lo.shape[1:])[None]
    return lo - d, hi + d


#: the fallback interval table: ``rule(op, [(lo, hi) per input, each [1, *shape]]) -> (lo, hi)``
OWN_INTERVAL: dict[type, Callable[[Op, list[Pair]], Pair]] = {
    Dense: _linear, Conv2d: _linear, SumPool2d: _linear, Add: _linear, Flatten: _linear, Reshape: _linear,
    Transpose: _linear, Pad: _linear, Concat: _linear, Requantize: _ends, Clamp: _ends, Step: _ends,
    Lookup: _table_range, MaxPool2d: _ends, Uncertain: _widen}


def _own_interval(net: QNetwork, lo: np.ndarray, hi: np.ndarray) -> Bounds:
    """Interval bounds of every value over the box ``[lo, hi]`` by :data:`OWN_INTERVAL` (module docstring)."""
    lo = np.asarray(lo, dtype=np.int64).reshape((1, *net.input_shape))
    hi = np.asarray(hi, dtype=np.int64).reshape((1, *net.input_shape))

    def step(i: int, op: Op, ins: list[Pair]) -> Pair:
        return graph.rule(OWN_INTERVAL, op, "encoder interval bounds")(op, ins)

    vals = graph.forward(net, (lo, hi), step)
    return [(v[0].ravel().copy(), v[1].ravel().copy()) for v in vals]  # type: ignore[index]


def box_bounds(net: QNetwork, lo: np.ndarray, hi: np.ndarray) -> Bounds:
    """Interval bounds of every value over the integer box ``[lo, hi]`` (flattened input)."""
    lo = np.asarray(lo, dtype=np.int64).ravel()
    hi = np.asarray(hi, dtype=np.int64).ravel()
    try:
        from qverify.bounds.interval import interval_bounds  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - the module ships with qverify
        return _own_interval(net, lo, hi)
    return normalize_bounds(net, interval_bounds(net, lo[None, :], hi[None, :]))


def normalize_bounds(net: QNetwork, bounds: Bounds) -> Bounds:
    """Check the shapes of a bounds list and flatten it to one ``(lo, hi)`` int64 pair per value."""
    if len(bounds) != len(net.layers) + 1:
        raise ValueError(f"bounds have {len(bounds)} entries, the network needs {len(net.layers) + 1} "
                         f"(input + one per node)")
    out: Bounds = []
    for i, (l, h) in enumerate(bounds):
        n = int(np.prod(net.shapes[i]))
        l = np.asarray(l, dtype=np.int64)
        h = np.asarray(h, dtype=np.int64)
        if l.size != n or h.size != n:
            raise ValueError(f"bounds entry {i}: {l.size}/{h.size} values, the value has {n} (one sample expected)")
        l, h = l.ravel(), h.ravel()
        if np.any(l > h):
            j = int(np.argmax(l > h))
            raise ValueError(f"bounds entry {i}: empty interval at {j} ([{l[j]}, {h[j]}])")
        out.append((l, h))
    return out


def worst_case_bounds(net: QNetwork) -> Bounds:
    """The network's worst-case value ranges (``net.value_ranges``) as a bounds list (valid for any box)."""
    out: Bounds = []
    for shape, (l, h) in zip(net.shapes, net.value_ranges, strict=True):
        n = int(np.prod(shape))
        out.append((np.full(n, l, dtype=np.int64), np.full(n, h, dtype=np.int64)))
    return out
