"""The traversal (qverify/graph.py) and the rule tables over it: every op has an entry in every table, the walks
visit the graph as specified, and the executor, interval and symbolic bounds are sound on random graphs."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings

from qverify import graph
from qverify.bounds.interval import interval_bounds
from qverify.bounds.symbolic import symbolic_analysis
from qverify.execute import execute, forward
from qverify.network import Add, Dense, ModelError, QNetwork, Requantize
from qverify.ops import ALL_OPS
from tests.fixtures import GRAPH_BLOCKS, SET_BLOCKS, graph_networks, random_graph_network

#: every rule table of every technique: (module, table name)
RULE_TABLES = [
    ("qverify.execute", "EXECUTE"),
    ("qverify.bounds.interval", "INTERVAL"),
    ("qverify.bounds.symbolic", "BACKSUB"),
    ("qverify.torch_net", "TORCH"),
    ("qverify.torch_net", "SOFT"),
    ("qverify.io.native", "SAVE"),
    ("qverify.encode.network", "ENCODE"),
    ("qverify.encode._bounds", "OWN_INTERVAL"),
    ("qverify.bab", "PULL"),
]


@pytest.mark.parametrize(("module", "table"), RULE_TABLES)
def test_every_op_has_an_entry_in_every_table(module: str, table: str) -> None:
    assert graph.missing_rules(getattr(importlib.import_module(module), table)) == []


def test_missing_rule_names_the_op_and_the_technique() -> None:
    with pytest.raises(ModelError, match="interval bounds: no rule for op Dense 'fc'"):
        graph.rule({}, Dense(np.eye(1, dtype=np.int64), np.zeros(1, np.int64), name="fc"), "interval bounds")


def _residual() -> QNetwork:
    """v1 = W x, v2 = requant(v1), v3 = 2 v2 + x (the shortcut reads value 0), v4 = requant(v3)."""
    w = np.array([[1, -1], [2, 1]])
    return QNetwork((2,), 0, 3, (Dense(w, np.zeros(2, np.int64)), Requantize.pow2(1, 0, 7), Add((2, 1), -1),
                                 Requantize.pow2(0, -8, 7)), inputs=((0,), (1,), (2, 0), (3,)))


def test_forward_reads_the_values_each_node_names() -> None:
    net = _residual()
    x = np.array([[3, 1], [0, 2]])
    v = execute(net, x)
    acc = x @ np.array([[1, -1], [2, 1]]).T
    np.testing.assert_array_equal(v[1], acc)
    h = np.clip(np.floor(acc / 2 + 0.5).astype(np.int64), 0, 7)
    np.testing.assert_array_equal(v[3], 2 * h + x - 1)
    np.testing.assert_array_equal(forward(net, x), np.clip(2 * h + x - 1, -8, 7))
    dropped = graph.forward(net, x, lambda i, op, ins: ins[0] if len(ins) == 1 else ins[0] + ins[1], keep=False)
    assert dropped[0] is None and dropped[1] is None and dropped[-1] is not None


def test_backward_adds_the_rows_of_a_shortcut() -> None:
    """Pulling ``e`` back through ``v3 = 2 v2 + v0`` and ``v2 = v1`` gives rows on v0 from both paths."""
    net = _residual()
    seen = []

    def pull(i: int, op: object, lam: np.ndarray) -> list[np.ndarray]:
        seen.append(i)
        if isinstance(op, Add):
            return [lam * 2, lam * 1]
        if isinstance(op, Dense):
            return [lam @ op.weight]
        return [lam]

    left = graph.backward(net, 4, np.array([1.0, 0.0]), pull, lambda j, a, b: a + b)
    assert seen == [3, 2, 1, 0]
    np.testing.assert_array_equal(left[0], np.array([1.0, 0.0]) + 2 * np.array([1.0, -1.0]))


@settings(max_examples=25, deadline=None)
@given(graph_networks(n_blocks=3))
def test_bounds_are_sound_on_random_graphs(net: QNetwork) -> None:
    """Interval and symbolic bounds (both intermediate modes) contain the executor's values at sampled points of
    each box, collapse to the executor's values on one-point boxes, and bound output rows from below."""
    rng = np.random.default_rng(len(net.layers))
    x = rng.integers(net.input_lo, net.input_hi + 1, size=(4, net.num_inputs))
    lo, hi = np.maximum(x - 2, net.input_lo), np.minimum(x + 1, net.input_hi)
    rows = rng.integers(-2, 3, size=(3, net.num_outputs))
    pts = [rng.integers(lo[k], hi[k] + 1, size=(200, net.num_inputs)) for k in range(len(x))]
    vals = [execute(net, p) for p in pts]
    ivb = interval_bounds(net, lo, hi)
    for mode in ("symbolic", "interval"):
        ana = symbolic_analysis(net, lo, hi, intermediate=mode)
        low = ana.row_lower_bounds(rows)
        for k in range(len(x)):
            for (bl, bh), (il, ih), v in zip(ana.bounds, ivb, vals[k], strict=True):
                assert np.all(v >= bl[k]) and np.all(v <= bh[k])
                assert np.all(bl[k] >= il[k]) and np.all(bh[k] <= ih[k])
            assert np.all((vals[k][-1] @ rows.T).min(axis=0) >= low[k])
    for bounds in (interval_bounds(net, x, x), symbolic_analysis(net, x, x).bounds):
        for (bl, bh), v in zip(bounds, execute(net, x), strict=True):
            np.testing.assert_array_equal(bl, v)
            np.testing.assert_array_equal(bh, v)


@pytest.mark.parametrize("block", GRAPH_BLOCKS)
def test_symbolic_bounds_of_each_block_by_enumeration(block: str) -> None:
    """Per block kind, on a box small enough to enumerate: the output row bounds are sound and the tightened
    output bounds contain the exact range."""
    import itertools

    for seed in range(4):
        net = random_graph_network(np.random.default_rng(seed), [block], n_blocks=2, in_shape=(1, 3, 3))
        lo = np.zeros(net.num_inputs, np.int64)
        hi = lo.copy()
        hi[:4] = 2
        pts = np.array(list(itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi, strict=True)])))
        y = forward(net, pts)
        ana = symbolic_analysis(net, lo, hi)
        out_lo, out_hi = ana.bounds[-1]
        assert np.all(y.min(axis=0) >= out_lo[0]) and np.all(y.max(axis=0) <= out_hi[0])
        rows = np.eye(net.num_outputs, dtype=np.int64) - np.roll(np.eye(net.num_outputs, dtype=np.int64), 1, 1)
        assert np.all((y @ rows.T).min(axis=0) >= ana.row_lower_bounds(rows)[0])


def test_every_op_appears_in_the_random_graphs() -> None:
    kinds = set()
    for seed in range(60):
        kinds |= {type(layer) for layer in random_graph_network(np.random.default_rng(seed), GRAPH_BLOCKS + SET_BLOCKS,
                                                                n_blocks=3).layers}
    assert kinds == set(ALL_OPS)
