"""A hard deadline for solvers that cannot be interrupted: the solve runs in a forked child that is killed.

HiGHS and SCIP (through OR-Tools) check their time limit only between phases: measured on a CNN program of
3197 integer variables, HiGHS spent 9.3 s in root cut separation under a 2 s limit, and neither OR-Tools'
``InterruptSolve`` (it answers False for HiGHS) nor highspy's interrupt callbacks (9 calls, all before the cuts)
could stop it. :func:`solve_killable` therefore forks, solves in the child with the caller's limit, and sends the
:class:`~qverify.solvers.base.SolveOutcome` back through a pipe; when no answer has come ``grace`` seconds after
the limit, the child is killed (``SIGKILL``) and the outcome is ``TIMEOUT``. Nothing is trusted from a killed
child, so the kill can only turn a late answer into ``unknown``, never into a verdict.

The child is a ``fork`` of the caller (no pickling of the program, a few milliseconds); where ``fork`` is not
available (Windows, macOS' default) the solve runs in the calling process, limit as before.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable

from qverify.solvers.base import SolveOutcome, SolveStatus

#: seconds a child may overrun its limit before it is killed
GRACE = 1.0


def fork_available() -> bool:
    """Whether the watchdog can fork (POSIX with the ``fork`` start method)."""
    return "fork" in mp.get_all_start_methods() and os.name == "posix"


def _child(conn, fn: Callable[[float], SolveOutcome], limit: float) -> None:  # pragma: no cover - in the child
    try:
        out = fn(limit)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent as an outcome
        out = SolveOutcome(SolveStatus.ERROR, "watchdog", 0.0, "exception", message=f"{type(e).__name__}: {e}")
    try:
        conn.send(out)
    finally:
        conn.close()


def solve_killable(fn: Callable[[float], SolveOutcome], limit: float, solver: str,
                   grace: float = GRACE) -> SolveOutcome:
    """``fn(limit)`` in a forked child, killed ``grace`` seconds after ``limit`` (see the module docstring).

    A child that dies without answering (a solver crash, out of memory) gives ``ERROR`` with its exit code; a
    killed child gives ``TIMEOUT`` with ``raw_status = 'killed'``."""
    if not fork_available():
        return fn(limit)
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(send, fn, limit), daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(max(0.0, limit) + grace):
            try:
                out = recv.recv()
            except EOFError:
                out = None
            proc.join(grace)
            if out is not None:
                return out
            return SolveOutcome(SolveStatus.ERROR, solver, time.perf_counter() - t0, "crashed",
                                message=f"the solver process ended without an answer (exit code {proc.exitcode})")
        secs = time.perf_counter() - t0
        return SolveOutcome(SolveStatus.TIMEOUT, solver, secs, "killed",
                            message=f"no answer {grace:g} s after the {limit:.2f} s limit: the solver process "
                                    f"was killed after {secs:.2f} s")
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
