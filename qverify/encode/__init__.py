"""Exact integer linear programs of quantized networks and properties (solver-neutral).

:func:`encode` builds the program whose integer solutions are exactly the executions of ``net`` on the
property's input box that land in the unsafe region: it is infeasible iff the property holds.
"""

from __future__ import annotations

from qverify.encode._bounds import Bounds, box_bounds, normalize_bounds, worst_case_bounds
from qverify.encode.network import ENCODINGS, NetworkEncoding, encode_network
from qverify.encode.program import LinCon, LinExpr, Program, Value, Var
from qverify.encode.property import encode_unsafe, unsafe_rows
from qverify.network import QNetwork
from qverify.property import Property

__all__ = ["ENCODINGS", "Bounds", "LinCon", "LinExpr", "NetworkEncoding", "Program", "Value", "Var", "box_bounds",
           "encode", "encode_network", "encode_unsafe", "normalize_bounds", "unsafe_rows", "worst_case_bounds"]


def encode(net: QNetwork, prop: Property, bounds: Bounds | None = None, encoding: str = "range",
           acc_vars: bool = True, margin: bool = False) -> NetworkEncoding:
    """The network over ``prop``'s box plus its unsafe region (``bounds``: see :func:`encode_network`;
    ``margin``: add the violation-depth objective of :func:`encode_unsafe`)."""
    prop.check_network(net)
    enc = encode_network(net, prop.lo, prop.hi, bounds, encoding, acc_vars=acc_vars)
    encode_unsafe(enc.program, prop, enc.outputs, margin=margin)
    enc.program.meta.update({"network": net.name, "property": prop.name, "encoding": encoding})
    return enc
