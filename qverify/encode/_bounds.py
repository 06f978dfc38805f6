"""Per-layer integer bounds for the encoder: the format, a resolver and a small interval fallback.

Format (shared with :mod:`qverify.bounds`): a list with one ``(lo, hi)`` pair of int64 arrays per entry of
:func:`qverify.execute.execute`'s output (index 0 the input box, ``i + 1`` the output of layer ``i``), each
flattened per sample; a leading batch axis of size 1 is accepted. Every execution of the network on an input of
the box must satisfy ``lo <= value <= hi`` at every layer (soundness is the caller's promise).

The fallback is plain interval arithmetic: affine layers split the weights by sign (exact int64/float64, the
network's validation keeps every magnitude below ``2^53``), requantization and clamps are monotone so the bounds
are their images of the endpoints. :func:`box_bounds` prefers ``qverify.bounds.interval.interval_bounds`` when that
module exists (same contract).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qverify.execute import apply_layer, conv2d_float
from qverify.network import Clamp, Conv2d, Dense, Flatten, QNetwork, Requantize

Bounds = list[tuple[np.ndarray, np.ndarray]]


def _own_interval(net: QNetwork, lo: np.ndarray, hi: np.ndarray) -> Bounds:
    lo = lo.reshape((1, *net.input_shape)).astype(np.int64)
    hi = hi.reshape((1, *net.input_shape)).astype(np.int64)
    out: Bounds = [(lo.ravel().copy(), hi.ravel().copy())]
    for layer in net.layers:
        if isinstance(layer, Dense):
            wp = np.maximum(layer.weight, 0)
            wn = np.minimum(layer.weight, 0)
            lo, hi = lo @ wp.T + hi @ wn.T + layer.bias, hi @ wp.T + lo @ wn.T + layer.bias
        elif isinstance(layer, Conv2d):
            pos = replace(layer, weight=np.maximum(layer.weight, 0), bias=layer.bias)
            neg = replace(layer, weight=np.minimum(layer.weight, 0), bias=np.zeros_like(layer.bias))
            # padded cells hold pad_value in both terms (W+ pad + W- pad = W pad); the bias is added once
            a = conv2d_float(pos, lo) + conv2d_float(neg, hi)
            b = conv2d_float(pos, hi) + conv2d_float(neg, lo)
            lo, hi = a.astype(np.int64), b.astype(np.int64)
        elif isinstance(layer, (Requantize, Clamp, Flatten)):
            lo, hi = apply_layer(layer, lo), apply_layer(layer, hi)
        else:  # pragma: no cover - QNetwork validation rejects other layers
            raise TypeError(f"no bounds for layer {type(layer).__name__}")
        out.append((lo.ravel().copy(), hi.ravel().copy()))
    return out


def box_bounds(net: QNetwork, lo: np.ndarray, hi: np.ndarray) -> Bounds:
    """Interval bounds of every layer over the integer box ``[lo, hi]`` (flattened input)."""
    lo = np.asarray(lo, dtype=np.int64).ravel()
    hi = np.asarray(hi, dtype=np.int64).ravel()
    try:
        from qverify.bounds.interval import interval_bounds  # type: ignore[import-not-found]
    except ImportError:
        return _own_interval(net, lo, hi)
    return normalize_bounds(net, interval_bounds(net, lo[None, :], hi[None, :]))


def normalize_bounds(net: QNetwork, bounds: Bounds) -> Bounds:
    """Check the shapes of a bounds list and flatten it to one ``(lo, hi)`` int64 pair per layer."""
    if len(bounds) != len(net.layers) + 1:
        raise ValueError(f"bounds have {len(bounds)} entries, the network needs {len(net.layers) + 1} "
                         f"(input + one per layer)")
    out: Bounds = []
    for i, (l, h) in enumerate(bounds):
        n = int(np.prod(net.shapes[i]))
        l = np.asarray(l, dtype=np.int64)
        h = np.asarray(h, dtype=np.int64)
        if l.size != n or h.size != n:
            raise ValueError(f"bounds entry {i}: {l.size}/{h.size} values, layer has {n} (one sample expected)")
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
