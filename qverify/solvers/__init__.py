"""Solver back ends for :class:`~qverify.encode.program.Program`: CP-SAT (default), SCIP/HiGHS, CBC, exporters."""

from qverify.solvers.base import BACKENDS, Backend, SolveOutcome, SolveStatus, get_backend, solve

__all__ = ["BACKENDS", "Backend", "SolveOutcome", "SolveStatus", "get_backend", "solve"]
