"""Bounds on every layer of a quantized network over integer input boxes.

* :mod:`qverify.bounds.interval` - exact integer interval propagation (QA-IBP), batched over many boxes, and
  property decisions from output intervals;
* :mod:`qverify.bounds.symbolic` - linear (DeepPoly/CROWN-style) back-substitution bounds that carry each
  rounding's error and each clamp's relaxation; tighter per-layer bounds for the encoders and margin bounds that
  certify argmax robustness;
* :mod:`qverify.bounds.optimized` - alpha-CROWN style bounds for dense chains: the relaxation slopes optimized per
  row by projected gradient (torch float64, imported only when it runs), every bound re-evaluated exactly.

The differentiable (torch) bounds of the training model live with training (:mod:`qverify.train.bounds_ibp`,
:mod:`qverify.train.bounds_crown`); nothing in this package imports torch at import time (the optimized bounds use
it as a float optimizer of slopes only, inside the call).
"""

from qverify.bounds.interval import (
    INTERVAL,
    Bounds,
    certified_by_interval,
    interval_bounds,
    interval_output_bounds,
    refutes_unsafe,
    row_lower_bounds,
)
from qverify.bounds.optimized import OptimizedBounds, optimized_bounds
from qverify.bounds.symbolic import (
    SymbolicAnalysis,
    certified_by_symbolic,
    relax,
    symbolic_analysis,
    symbolic_bounds,
)

__all__ = [
    "INTERVAL",
    "Bounds",
    "OptimizedBounds",
    "SymbolicAnalysis",
    "certified_by_interval",
    "certified_by_symbolic",
    "interval_bounds",
    "interval_output_bounds",
    "optimized_bounds",
    "refutes_unsafe",
    "relax",
    "row_lower_bounds",
    "symbolic_analysis",
    "symbolic_bounds",
]
