"""The back-end protocol and the explicit status mapping.

A back end translates a :class:`~qverify.encode.program.Program` to one solver and answers with a
:class:`SolveOutcome`. The status is one of :class:`SolveStatus`; only ``INFEASIBLE`` (a proof that no solution
exists: the solver finished its search) can become a ``robust`` verdict. ``FEASIBLE`` carries a candidate
assignment, which is only a candidate: the caller decodes the input and replays it on the executor. Every solver
status that is not a proof or a solution (time limit, node limit, numerical trouble, abnormal stop) maps to
``TIMEOUT`` or ``UNKNOWN``; a malformed model to ``ERROR``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from qverify.encode.program import Program
from qverify.settings import SolverSettings


class SolveStatus(StrEnum):
    INFEASIBLE = "infeasible"   # proven: no integer solution
    FEASIBLE = "feasible"       # a candidate solution (values)
    TIMEOUT = "timeout"         # stopped by the time limit without either
    UNKNOWN = "unknown"         # stopped for another reason (limits, numerics)
    ERROR = "error"             # model rejected / solver crashed


@dataclass
class SolveOutcome:
    """What a back end found. ``values`` are integers (MIP solutions rounded to the nearest integer);
    ``raw_values`` keeps a MIP solver's floats."""

    status: SolveStatus
    solver: str
    seconds: float
    raw_status: str = ""
    values: list[int] | None = None
    raw_values: list[float] | None = None
    message: str = ""
    stats: dict = field(default_factory=dict)


class Backend(Protocol):
    """A solver back end: ``solve(program, settings, time_limit)`` (``time_limit`` in seconds, already capped
    by the caller's deadline)."""

    name: str
    #: the back end may overrun its time limit (it checks it only between phases): run it under the watchdog
    overruns: bool

    def solve(self, program: Program, settings: SolverSettings, time_limit: float) -> SolveOutcome: ...


def trivial_outcome(program: Program, solver: str) -> SolveOutcome | None:
    """The outcome when no solver is needed: a program the encoder proved infeasible, or one without variables
    (then every constraint was decided on constants and the empty assignment is a solution)."""
    if program.trivially_infeasible:
        return SolveOutcome(SolveStatus.INFEASIBLE, solver, 0.0, "encoder", message=program.trivially_infeasible)
    if not program.vars:
        return SolveOutcome(SolveStatus.FEASIBLE, solver, 0.0, "encoder", values=[], message="no variables")
    return None


def round_values(xs: list[float]) -> list[int]:
    """Nearest integers of a MIP solution (the replay decides whether they mean anything)."""
    return [int(math.floor(v + 0.5)) for v in xs]


def stopped_by_time(seconds: float, time_limit: float) -> bool:
    """A guard for MIP solvers whose 'infeasible' after a time-limit stop is ambiguous: treat a run that used
    (almost) all of its time as not a proof."""
    return seconds >= 0.98 * time_limit


BACKENDS = ("cpsat", "scip", "highs", "cbc")


def get_backend(name: str) -> Backend:
    """The back end named ``cpsat`` (default), ``scip``, ``highs`` or ``cbc``."""
    name = name.lower()
    if name == "cpsat":
        from qverify.solvers.cpsat import CpSatBackend

        return CpSatBackend()
    if name in ("scip", "highs"):
        from qverify.solvers.ortools_mip import OrToolsMipBackend

        return OrToolsMipBackend(name)
    if name == "cbc":
        from qverify.solvers.cbc import CbcBackend

        return CbcBackend()
    raise ValueError(f"unknown solver back end {name!r} (known: {', '.join(BACKENDS)})")


def solve(program: Program, settings: SolverSettings, deadline: float | None = None) -> SolveOutcome:
    """Solve with ``settings.backend`` within ``min(settings.time_limit, deadline - now)`` (``deadline`` on
    :func:`time.monotonic`'s clock). A back end that ``overruns`` its limit runs under the watchdog
    (:mod:`qverify.solvers.watchdog`: killed one second after the limit) unless ``settings.watchdog`` is off."""
    limit = settings.time_limit
    if deadline is not None:
        limit = min(limit, deadline - time.monotonic())
    if limit <= 0:
        return SolveOutcome(SolveStatus.TIMEOUT, settings.backend, 0.0, "deadline", message="no time left")
    backend = get_backend(settings.backend)
    if settings.watchdog and backend.overruns:
        from qverify.solvers.watchdog import solve_killable

        return solve_killable(lambda lim: backend.solve(program, settings, lim), limit, backend.name)
    return backend.solve(program, settings, limit)
