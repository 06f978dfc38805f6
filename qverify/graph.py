"""The one traversal of a :class:`~qverify.network.QNetwork` graph: the only loops over its nodes.

Every analysis is a rule table ``{op type: rule}`` plus one call of a walk here (in the style of jax_verify's
``graph_traversal``):

* :func:`forward` - values in topological order: ``v_0 = x``, ``v_{i+1} = rule_i(op_i, [v_j for j in inputs_i])``
  (the executor, interval bounds, the torch view, the encoder);
* :func:`backward` - back-substitution: a row ``lam`` over one value is pulled back node by node in reverse
  topological order, each node adding its contribution to every value it reads (residual branches add up), until
  only values below ``stop`` hold rows (symbolic bounds, branch-and-bound's coefficients).

:func:`rule` looks an op up in a table and names the op and the table when it has no entry (an op without a rule
is an error, never a fallback); ``tests/test_graph.py`` checks that every op has an entry in every table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from qverify.network import ModelError, QNetwork
from qverify.ops import ALL_OPS

T = TypeVar("T")


def rule(table: Mapping[type, Callable], op: object, technique: str) -> Callable:
    """``table[type(op)]``, or a :class:`ModelError` naming the op and the technique that lacks it."""
    fn = table.get(type(op))
    if fn is None:
        raise ModelError(f"{technique}: no rule for op {type(op).__name__} {getattr(op, 'name', '')!r}")
    return fn


def missing_rules(table: Mapping[type, Callable]) -> list[str]:
    """The op types (of :data:`qverify.ops.ALL_OPS`) that ``table`` has no entry for."""
    return [t.__name__ for t in ALL_OPS if t not in table]


def forward(net: QNetwork, x: T, step: Callable[[int, Any, list[T]], T], keep: bool = True,
            stop: int | None = None) -> list[T | None]:
    """``[v_0, ..., v_n]`` with ``v_0 = x`` and ``v_{i+1} = step(i, op_i, [v_j for j in inputs_i])`` for the
    nodes ``i < stop`` (default all). ``keep=False`` drops each value after its last reader (``None`` in the
    list; the last value is always kept): the memory of one forward pass of a wide graph."""
    n = len(net.layers) if stop is None else stop
    values: list[T | None] = [x]
    last: dict[int, int] = {}
    if not keep:
        for i in range(n):
            for j in net.node_inputs(i):
                last[j] = i
    for i in range(n):
        ins = [values[j] for j in net.node_inputs(i)]
        values.append(step(i, net.layers[i], ins))  # type: ignore[arg-type]
        if not keep:
            for j in set(net.node_inputs(i)):
                if last.get(j) == i and j != n:
                    values[j] = None
    return values


def backward(net: QNetwork, top: int, seed: T, pull: Callable[[int, Any, T], Sequence[T]],
             add: Callable[[int, T, T], T], stop: int = 0,
             after: Callable[[int, dict[int, T]], None] | None = None) -> dict[int, T]:
    """Pull a row over value ``top`` back through the graph: ``pending = {top: seed}``; for the nodes
    ``i = top - 1, ..., stop`` (reverse topological order) whose output ``i + 1`` holds a row ``lam``, replace it by
    ``pull(i, op_i, lam)[k]`` added (``add(j, old, new)``, ``j`` the value) to the row of the ``k``-th value node
    ``i`` reads (a value read by several nodes, a residual shortcut, sums their rows); ``after(i,
    pending)`` runs after each node that pulled. Returns the rows left, all over values ``<= stop``."""
    pending: dict[int, T] = {top: seed}
    for i in range(top - 1, stop - 1, -1):
        lam = pending.pop(i + 1, None)
        if lam is None:
            continue
        parts = pull(i, net.layers[i], lam)
        for j, part in zip(net.node_inputs(i), parts, strict=True):
            pending[j] = part if j not in pending else add(j, pending[j], part)
        if after is not None:
            after(i, pending)
    return pending
