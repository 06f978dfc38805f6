"""The ops of a :class:`~qverify.network.QNetwork` graph, one file per family (see :mod:`qverify.ops.base`).

Adding an op: write its class in the file of its family (its parameters, validation, ``output_shape``, and for a
linear map the protocol methods), add it to :data:`ALL_OPS`, and give it one entry in each rule table
(``tests/test_graph.py`` checks that every op has one in every table).
"""

from qverify.ops.base import LinearMap, ModelError, Monotone, Op
from qverify.ops.elementwise import Clamp, Lookup, Requantize, Step, Uncertain
from qverify.ops.linear import Add, Conv2d, Dense, SumPool2d
from qverify.ops.movement import Concat, Flatten, Pad, Reshape, Transpose
from qverify.ops.pool import MaxPool2d

#: every op type a network may hold
ALL_OPS: tuple[type, ...] = (Dense, Conv2d, SumPool2d, Add, Flatten, Reshape, Transpose, Pad, Concat,
                             Requantize, Clamp, Step, Lookup, MaxPool2d, Uncertain)
#: the five ops of a chain network (the layers qverify had before graphs)
CHAIN_OPS: tuple[type, ...] = (Dense, Conv2d, Flatten, Requantize, Clamp)

__all__ = ["ALL_OPS", "CHAIN_OPS", "Add", "Clamp", "Concat", "Conv2d", "Dense", "Flatten", "LinearMap", "Lookup",
           "MaxPool2d", "ModelError", "Monotone", "Op", "Pad", "Requantize", "Reshape", "Step", "SumPool2d",
           "Transpose", "Uncertain"]
