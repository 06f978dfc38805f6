"""Certified training of quantized networks: fake-quantized layers, the QA-IBP objective, schedules, data, the
training loop, the differentiable bounds of the training model (:mod:`qverify.train.bounds_ibp`: QA-IBP intervals,
:mod:`qverify.train.bounds_crown`: CROWN-IBP margins), and exact export to :class:`qverify.network.QNetwork` (see
each module's docstring).

Names are imported lazily (importing :mod:`qverify.train` loads no torch module until a name is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_qnetwork": "export", "save_trained": "export",
    "ModelConfig": "layers", "QuantConfig": "layers", "QuantError": "layers", "QuantNet": "layers",
    "build_model": "layers", "calibrate": "layers",
    "Config": "trainer", "ConfigError": "trainer", "DataConfig": "trainer", "EvalResult": "trainer",
    "TrainConfig": "trainer", "TrainResult": "trainer", "apply_overrides": "trainer", "dump_config": "trainer",
    "evaluate": "trainer", "load_checkpoint": "trainer", "load_config": "trainer", "train": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'qverify.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qverify.train.{mod}"), name)
