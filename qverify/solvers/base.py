"""The back-end protocol and the explicit status mapping.

A back end translates a :class:`~qverify.encode.program.Program` to one solver and answers with a
:class:`SolveOutcome`. The status is one of :class:`SolveStatus`; only ``INFEASIBLE`` (a proof that no solution
exists) can become a ``robust`` verdict, and only an *exact* back end may answer it: CP-SAT (integer arithmetic, no
tolerances) and the checked branch and bound (:mod:`qverify.solvers.checked`: float LPs, every refutation checked
in integers). The floating-point MIP solvers (SCIP, HiGHS, CBC) work with tolerances, and their "infeasible" has
been measured wrong (``../shared/repro/edge70``: SCIP's cuts and CBC both remove the only violating point), so
they answer ``UNCONFIRMED``; :func:`solve` then gives the program to the exact confirmers
(``SolverSettings.confirm``, default ``auto``: CP-SAT, then the checked branch and bound) for as long again as
the claim took, and answers ``INFEASIBLE`` only when a confirmer proves it, ``FEASIBLE`` when one finds a solution
the float solver missed, and ``UNCONFIRMED`` otherwise (an ``unknown`` verdict, never ``robust``). ``FEASIBLE``
carries a candidate assignment, which is only a candidate: the caller decodes the input and replays it on the
executor. Every solver status that is not a proof or a solution (time limit, node limit, numerical trouble,
abnormal stop) maps to ``TIMEOUT`` or ``UNKNOWN``; a malformed model to ``ERROR``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from qverify.encode.program import Program
from qverify.settings import SolverSettings


class SolveStatus(StrEnum):
    INFEASIBLE = "infeasible"   # proven by an exact back end: no integer solution
    UNCONFIRMED = "unconfirmed"  # a floating-point solver's "infeasible" that no exact check has confirmed
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
    #: its INFEASIBLE is an exact proof (integer arithmetic or exactly checked certificates)
    exact: bool
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


BACKENDS = ("cpsat", "scip", "highs", "cbc", "checked")


def get_backend(name: str) -> Backend:
    """The back end named ``cpsat`` (default), ``scip``, ``highs``, ``cbc`` or ``checked``."""
    name = name.lower()
    if name == "cpsat":
        from qverify.solvers.cpsat import CpSatBackend

        return CpSatBackend()
    if name == "checked":
        from qverify.solvers.checked import CheckedBackend

        return CheckedBackend()
    if name in ("scip", "highs"):
        from qverify.solvers.ortools_mip import OrToolsMipBackend

        return OrToolsMipBackend(name)
    if name == "cbc":
        from qverify.solvers.cbc import CbcBackend

        return CbcBackend()
    raise ValueError(f"unknown solver back end {name!r} (known: {', '.join(BACKENDS)})")


def _run(backend: Backend, program: Program, settings: SolverSettings, limit: float) -> SolveOutcome:
    if settings.watchdog and backend.overruns:
        from qverify.solvers.watchdog import solve_killable

        return solve_killable(lambda lim: backend.solve(program, settings, lim), limit, backend.name)
    return backend.solve(program, settings, limit)


def solve(program: Program, settings: SolverSettings, deadline: float | None = None,
          confirm_deadline: float | None = None) -> SolveOutcome:
    """Solve with ``settings.backend`` within ``min(settings.time_limit, deadline - now)`` (``deadline`` on
    :func:`time.monotonic`'s clock). A back end that ``overruns`` its limit runs under the watchdog
    (:mod:`qverify.solvers.watchdog`: killed one second after the limit) unless ``settings.watchdog`` is off.

    A floating-point back end's ``UNCONFIRMED`` goes to :func:`confirm` for as long again as the claim's own
    limit, but not past ``confirm_deadline`` (default: no further cap)."""
    t0 = time.monotonic()
    limit = settings.time_limit
    if deadline is not None:
        limit = min(limit, deadline - t0)
    if limit <= 0:
        return SolveOutcome(SolveStatus.TIMEOUT, settings.backend, 0.0, "deadline", message="no time left")
    backend = get_backend(settings.backend)
    out = _run(backend, program, settings, limit)
    if out.status is SolveStatus.INFEASIBLE and not backend.exact and not program.trivially_infeasible:
        out = replace(out, status=SolveStatus.UNCONFIRMED)  # a floating back end never proves (defensive)
    if out.status is not SolveStatus.UNCONFIRMED:
        return out
    end = time.monotonic() + limit
    if confirm_deadline is not None:
        end = min(end, confirm_deadline)
    return confirm(program, settings, out, end)


#: under ``confirm = 'auto'``, CP-SAT's share of the confirmation time on a pure integer program (the checked
#: branch and bound gets the rest): CP-SAT's presolve closes small one-hot programs at once that the LP-based search
#: needs thousands of nodes for; the checked search closes LP-tight claims at its root
AUTO_CPSAT_SHARE = 1 / 3


def confirmers(program: Program, which: str) -> list[str]:
    """The exact back ends that check a claim on ``program``, in turn: ``auto`` is CP-SAT then the checked branch
    and bound for a pure integer program, the checked one alone when there are continuous variables (CP-SAT takes
    none); ``cpsat`` falls back to ``checked`` there too."""
    if which in ("", "none"):
        return []
    if not program.is_pure_integer:
        return ["checked"]
    return ["cpsat", "checked"] if which == "auto" else [which]


def confirm(program: Program, settings: SolverSettings, claim: SolveOutcome, end: float) -> SolveOutcome:
    """Check a floating-point solver's infeasibility ``claim`` on ``program`` with the exact back ends of
    ``settings.confirm`` (:func:`confirmers`) until ``end`` (:func:`time.monotonic`): ``INFEASIBLE`` when one
    proves it, ``FEASIBLE`` (its values) when one finds a solution (the claim was wrong), else ``UNCONFIRMED`` with
    the reason."""
    chain = confirmers(program, settings.confirm)
    if not chain or end - time.monotonic() <= 0:
        why = "no exact confirmer configured" if not chain else "no time left to confirm it"
        return replace(claim, message=f"{claim.solver} reported infeasible; {why}: not a proof")
    seconds = claim.seconds
    tried: list[dict] = []
    out = claim
    for k, which in enumerate(chain):
        left = end - time.monotonic()
        if left <= 0:
            break
        share = left * AUTO_CPSAT_SHARE if k < len(chain) - 1 else left
        checker = get_backend(which)
        out = _run(checker, program, replace(settings, backend=which, time_limit=share), share)
        seconds += out.seconds
        tried.append({"solver": checker.name, "status": out.status.value, "seconds": out.seconds, **out.stats})
        if out.status in (SolveStatus.INFEASIBLE, SolveStatus.FEASIBLE):
            break
    solver = f"{claim.solver}+{out.solver if tried else 'none'}"
    stats = {"claim": {"solver": claim.solver, "raw_status": claim.raw_status, "seconds": claim.seconds,
                       **claim.stats}, "confirm": tried}
    raw = f"{claim.raw_status}/{out.raw_status}"
    if out.status is SolveStatus.INFEASIBLE and tried:
        return SolveOutcome(SolveStatus.INFEASIBLE, solver, seconds, raw, stats=stats,
                            message=f"{claim.solver}'s infeasibility confirmed by {out.solver}")
    if out.status is SolveStatus.FEASIBLE and tried:
        return SolveOutcome(SolveStatus.FEASIBLE, solver, seconds, raw, values=out.values,
                            raw_values=out.raw_values, stats=stats,
                            message=f"{claim.solver} reported infeasible; {out.solver} found a solution")
    names = ", ".join(t["solver"] for t in tried) or "the confirmer"
    return SolveOutcome(SolveStatus.UNCONFIRMED, solver, seconds, raw, stats=stats,
                        message=f"{claim.solver} reported infeasible; {names} did not confirm it "
                                f"({out.status.value}{': ' + out.message if out.message else ''})")
