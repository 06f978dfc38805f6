"""Replay of candidate counterexamples: the only way a witness becomes a ``counterexample`` verdict.

A candidate ``x`` is confirmed when it lies in the property's input box and the integer executor's outputs on it
lie in the unsafe region. For a model imported from a format whose runtime can run the original file, the same
input is also run there and the outcome recorded separately: a disagreement is reported, never hidden, with the
runtime's known cause when it applies. A *set-valued* network (float32 bands, :class:`~qverify.ops.Uncertain`)
is confirmed on its runtime alone: the executor computes only its nominal member.

Runtimes are a registry, :data:`RUNTIMES` (source format -> :class:`RuntimeReplay`), filled by the importers
themselves: ``qverify.io.onnx`` registers onnxruntime for ``format = "onnx"`` when it is imported. Replay looks the
network's ``metadata["format"]`` up; :data:`RUNTIME_MODULES` names the importer module to import first for a
network that was read back from a ``.qnn`` file (which keeps its source's metadata) in a process that never
imported that importer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qverify.execute import forward
from qverify.network import QNetwork
from qverify.property import Property
from qverify.result import Counterexample


@dataclass(frozen=True)
class RuntimeReplay:
    """How to run a network's original file on its own runtime.

    ``runtime``: the runtime's name (in notes); ``applies(net)``: whether this network can be replayed (its file
    recorded); ``outputs(net, x)``: the runtime's integer outputs ``[B, num_outputs]`` for integer inputs
    ``x [B, n]``, the executor's counterparts; ``cause(net)``: a known reason for a disagreement on this machine
    (``""`` when none applies)."""

    runtime: str
    applies: Callable[[QNetwork], bool]
    outputs: Callable[[QNetwork, np.ndarray], np.ndarray]
    cause: Callable[[QNetwork], str]


#: source format -> its runtime replay (registered by the importer of that format)
RUNTIMES: dict[str, RuntimeReplay] = {}
#: source format -> the importer module that registers its runtime (imported on first use)
RUNTIME_MODULES: dict[str, str] = {"onnx": "qverify.io.onnx", "tflite": "qverify.io.tflite",
                                   "onnx-binarized": "qverify.io.binarized",
                                   "qonnx-binarized": "qverify.io.binarized", "qonnx": "qverify.io.qonnx"}


def register_runtime(fmt: str, replay_hook: RuntimeReplay) -> None:
    """Register (or replace) the runtime replay of networks whose ``metadata["format"]`` is ``fmt``."""
    RUNTIMES[fmt] = replay_hook


def runtime_for(net: QNetwork) -> RuntimeReplay | None:
    """The runtime replay registered for ``net``'s source format that applies to it, or ``None``."""
    fmt = str(net.metadata.get("format", ""))
    if fmt not in RUNTIMES and fmt in RUNTIME_MODULES:
        try:
            importlib.import_module(RUNTIME_MODULES[fmt])
        except ImportError:
            return None
    hook = RUNTIMES.get(fmt)
    return hook if hook is not None and hook.applies(net) else None


def replay(net: QNetwork, prop: Property, x: np.ndarray, onnx_check: bool = True) -> Counterexample:
    """Run ``x`` (flattened integer input) on the executor and check it against ``prop``; with ``onnx_check``
    (the name of the first such runtime), also on the runtime registered for the network's source format."""
    x = np.asarray(x).ravel()
    if x.dtype.kind == "f":
        if not np.all(x == np.round(x)):
            return Counterexample(x.astype(np.int64), np.zeros(0, np.int64), False, None,
                                  "candidate is not an integer point")
    x = x.astype(np.int64)
    if x.size != prop.num_inputs or not prop.contains(x)[0]:
        return Counterexample(x, np.zeros(0, np.int64), False, None, "candidate lies outside the input box")
    y = forward(net, x[None, :])[0]
    if net.set_valued:
        return _replay_set_valued(net, prop, x, y)
    ok = bool(prop.is_violated(y[None, :])[0])
    runtime_ok = None
    note = "" if ok else "executor output is not in the unsafe region"
    hook = runtime_for(net) if ok and onnx_check else None
    if hook is not None:
        try:
            yo = hook.outputs(net, x[None, :])
            runtime_ok = bool(prop.is_violated(yo)[0])
            if not np.array_equal(yo[0], y):
                note = f"{hook.runtime} outputs {yo[0].tolist()} differ from the executor's {y.tolist()}"
                cause = hook.cause(net)
                if cause:
                    note += f" ({cause})"
        except Exception as e:  # the runtime missing or the file moved: say so, keep the executor's verdict
            note = f"{hook.runtime} replay not possible: {e}"
    return Counterexample(x, y, ok, runtime_ok, note)


def _replay_set_valued(net: QNetwork, prop: Property, x: np.ndarray, y: np.ndarray) -> Counterexample:
    """A set-valued network (:attr:`~qverify.network.QNetwork.set_valued`) is the runtime's float arithmetic
    bounded by bands: its executor computes only the nominal member, so a witness is confirmed by the runtime
    alone (``confirmed = onnx_confirmed = the runtime's outputs violate the property``). Without a runtime that
    applies, nothing is confirmed."""
    nominal = bool(prop.is_violated(y[None, :])[0])
    hook = runtime_for(net)
    what = "the nominal executor's outputs " + ("violate" if nominal else "do not violate") + " the property"
    if hook is None:
        return Counterexample(x, y, False, None, f"set-valued network: no runtime to confirm the witness ({what})")
    try:
        yo = hook.outputs(net, x[None, :])
    except Exception as e:  # the runtime missing or the file moved: nothing is confirmed
        return Counterexample(x, y, False, None, f"set-valued network: {hook.runtime} replay not possible: {e}")
    ok = bool(prop.is_violated(yo)[0])
    note = (f"confirmed on {hook.runtime} (outputs {np.round(np.asarray(yo[0], dtype=np.float64), 3).tolist()}); "
            if ok else f"{hook.runtime} does not violate the property; ") + what
    return Counterexample(x, y, ok, ok, note)
