"""Verdicts and results: what every verification method returns.

``robust`` is a proof (VNN-COMP ``unsat``); ``counterexample`` carries a witness that replayed on the integer
executor (VNN-COMP ``sat``); ``unknown`` carries its reason (``timeout``, ``memory``, ``incomplete-method``, or a
``replay-failed`` bug report); ``error`` carries a message naming the bad input. A timeout is never robust.

An ``unknown`` from the portfolio (or a forced incomplete method) also brackets the property's least slack over the
box (:meth:`qverify.property.Property.slack`; a violation is slack ``<= 0``): ``details['slack'] = {'lower': L,
'upper': U, 'nearest': {'x', 'y'}}`` with ``L <= min_box slack <= U``, ``L`` from the symbolic bounds and ``U`` the
exact slack of the attack's nearest miss ``x`` (``None`` for an end whose stage did not run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class Verdict(StrEnum):
    ROBUST = "robust"
    COUNTEREXAMPLE = "counterexample"
    UNKNOWN = "unknown"
    ERROR = "error"


class Reason(StrEnum):
    """Why a result is ``unknown``."""

    TIMEOUT = "timeout"
    MEMORY = "memory"
    INCOMPLETE = "incomplete-method"
    REPLAY_FAILED = "replay-failed"
    SOLVER = "solver-status"
    UNCONFIRMED = "unconfirmed"  # a floating-point solver reported infeasible; no exact check confirmed it
    #: a set-valued network (float32 bands, :class:`~qverify.ops.Uncertain`): some member of the set violates the
    #: property there, but the runtime does not confirm it (or is not available)
    SET_VALUED = "set-valued"


@dataclass
class Counterexample:
    """An input of the box and the network's integer outputs on it.

    ``confirmed`` is True only when the integer executor, run on ``x``, produced outputs in the unsafe region;
    ``onnx_confirmed`` is the same check on onnxruntime (``None`` when the model did not come from ONNX).
    """

    x: np.ndarray
    y: np.ndarray
    confirmed: bool
    onnx_confirmed: bool | None = None
    note: str = ""

    def to_json(self) -> dict:
        return {"x": [int(v) for v in np.ravel(self.x)], "y": [int(v) for v in np.ravel(self.y)],
                "confirmed": self.confirmed, "onnx_confirmed": self.onnx_confirmed, "note": self.note}


@dataclass
class StageTime:
    """One stage of a method or portfolio: its name, wall time in seconds, and what it concluded."""

    stage: str
    seconds: float
    outcome: str


@dataclass
class Result:
    verdict: Verdict
    method: str
    seconds: float
    reason: str = ""
    counterexample: Counterexample | None = None
    stages: list[StageTime] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.verdict = Verdict(self.verdict)
        if self.verdict is Verdict.COUNTEREXAMPLE and (self.counterexample is None
                                                       or not self.counterexample.confirmed):
            raise ValueError("a counterexample verdict needs a witness confirmed by replay")

    def vnncomp_status(self) -> str:
        """VNN-COMP result word: ``unsat`` (robust), ``sat``, ``timeout``, ``unknown`` or ``error``."""
        if self.verdict is Verdict.ROBUST:
            return "unsat"
        if self.verdict is Verdict.COUNTEREXAMPLE:
            return "sat"
        if self.verdict is Verdict.ERROR:
            return "error"
        return "timeout" if self.reason == Reason.TIMEOUT else "unknown"

    def to_json(self) -> dict:
        return {"verdict": self.verdict.value, "status": self.vnncomp_status(), "method": self.method,
                "seconds": self.seconds, "reason": self.reason,
                "counterexample": self.counterexample.to_json() if self.counterexample else None,
                "stages": [s.__dict__ for s in self.stages], "details": self.details}
