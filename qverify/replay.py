"""Replay of candidate counterexamples: the only way a witness becomes a ``counterexample`` verdict.

A candidate ``x`` is confirmed when it lies in the property's input box and the integer executor's outputs on it
lie in the unsafe region. For models imported from ONNX, the same input is also run through onnxruntime (when the
original file is at hand) and the outcome recorded separately: a disagreement is reported, never hidden, and
names onnxruntime's 16-bit clipping of u8 x s8 products when this CPU has it and the weights can trigger it
(:func:`qverify.io.onnx.ort_may_clip`).
"""

from __future__ import annotations

import numpy as np

from qverify.execute import forward
from qverify.network import QNetwork
from qverify.property import Property
from qverify.result import Counterexample


def replay(net: QNetwork, prop: Property, x: np.ndarray, onnx_check: bool = True) -> Counterexample:
    """Run ``x`` (flattened integer input) on the executor and check it against ``prop``."""
    x = np.asarray(x).ravel()
    if x.dtype.kind == "f":
        if not np.all(x == np.round(x)):
            return Counterexample(x.astype(np.int64), np.zeros(0, np.int64), False, None,
                                  "candidate is not an integer point")
    x = x.astype(np.int64)
    if x.size != prop.num_inputs or not prop.contains(x)[0]:
        return Counterexample(x, np.zeros(0, np.int64), False, None, "candidate lies outside the input box")
    y = forward(net, x[None, :])[0]
    ok = bool(prop.is_violated(y[None, :])[0])
    onnx_ok = None
    note = "" if ok else "executor output is not in the unsafe region"
    if ok and onnx_check and net.metadata.get("format") == "onnx" and net.metadata.get("onnx_path"):
        try:
            from qverify.io.onnx import U8S8_CLIP_NOTE, onnx_integer_outputs, ort_may_clip

            yo = onnx_integer_outputs(net, x[None, :])
            onnx_ok = bool(prop.is_violated(yo)[0])
            if not np.array_equal(yo[0], y):
                note = f"onnxruntime outputs {yo[0].tolist()} differ from the executor's {y.tolist()}"
                if ort_may_clip(net):
                    note += f" ({U8S8_CLIP_NOTE})"
        except Exception as e:  # onnxruntime missing or the file moved: say so, keep the executor's verdict
            note = f"onnxruntime replay not possible: {e}"
    return Counterexample(x, y, ok, onnx_ok, note)
