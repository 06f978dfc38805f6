"""Complete verification by the exact integer program: encode, solve, decode, replay.

``verify_milp`` answers

* ``robust`` only when an exact back end proves the program infeasible (CP-SAT, or the checked branch and bound;
  a floating-point back end's "infeasible" counts only once :func:`qverify.solvers.base.solve` has had it confirmed
  by ``settings.confirm``), or the encoder does (no unsafe disjunct can hold on the bounds); with ``split``, when
  every disjunct's program is proved infeasible;
* ``counterexample`` only when the decoded input, replayed on the integer executor
  (:func:`qverify.replay.replay`), lands in the unsafe region;
* ``unknown`` otherwise: ``timeout`` (the time limit or the deadline), ``replay-failed`` (the solver's solution does
  not replay: a bug report with the solver's and the executor's values in ``details``), ``unconfirmed`` (a
  floating-point solver called a disjunct infeasible and the exact confirmer neither proved it nor found a
  solution in time: a claimed disjunct gets the next rounds' slices for its confirmation), ``solver-status``
  (another solver status);
* ``error`` for a model the solver rejects, or a property that does not fit the network.

**Splitting the disjunction.** An unsafe region ``OR_d C_d`` (for robustness: one disjunct per other class) is
infeasible iff every ``C_d`` is. With ``split`` each disjunct that the bounds do not exclude gets its own program
(the shared network encoding plus ``C_d``; no disjunction binaries), the most promising first (largest bound on
the violation depth). The time is shared in rounds: every open disjunct gets a slice, the slice grows 4x per round,
so one hard disjunct cannot starve an easy counterexample in another. The first confirmed counterexample ends the
search; a disjunct whose solution does not replay stays open (reported).

**The relaxed-input program** (``relax``). The input and accumulator variables are made continuous
(:meth:`Program.relaxed` on :attr:`NetworkEncoding.relaxable`); the rounded neuron values, phase and tie binaries
stay integer. Every integer solution satisfies the relaxed rows, so the relaxed program's infeasibility proves the
disjunct robust. Its solutions prove nothing: the inputs are rounded to the grid and replayed, then descended by the
attack's exact local search (:func:`qverify.attack.descend`); a confirmed point is a counterexample, otherwise the
disjunct stays open (``relaxation-feasible``; the relaxed program is not solved again). Why it pays: the 784 integer
inputs of an MNIST box (and the integer accumulators they define) are what make the branch and bound's root slow,
while the LP gap that has to be closed comes from the rounded neurons; with the inputs continuous the solver
branches on the neurons alone (near-tie ``mlp-qaibp-r2`` id 126: SCIP 2.5 s, HiGHS 12 s, against 68 s for HiGHS on
the full program; benchmarks/RESULTS.md). A relaxed verdict needs a MIP back end (SCIP, HiGHS, CBC), not CP-SAT.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import replace

import numpy as np

from qverify.attack import AttackSettings, descend
from qverify.encode import (
    Bounds,
    NetworkEncoding,
    Program,
    box_bounds,
    encode_network,
    encode_unsafe,
    normalize_bounds,
    unsafe_rows,
)
from qverify.execute import execute
from qverify.network import QNetwork
from qverify.property import Property, PropertyError
from qverify.replay import replay
from qverify.result import Counterexample, Reason, Result, StageTime, Verdict
from qverify.settings import SolverSettings
from qverify.solvers.base import SolveOutcome, SolveStatus, confirmers, solve

#: first time slice of a split search, as a fraction of the limit per open disjunct, and its floor in seconds
SPLIT_FIRST_SHARE = 0.125
SPLIT_MIN_SLICE = 0.5
SPLIT_GROWTH = 4.0
#: the exact local search that repairs a relaxed solution: moves per descent, and its time cap in seconds
REPAIR = AttackSettings(local_steps=200)
REPAIR_SECONDS = 5.0


def _live_by_bounds(prop: Property, ylo: np.ndarray, yhi: np.ndarray) -> bool:
    """Whether some unsafe disjunct can hold on the output box: ``min a.y = a+ . ylo + a- . yhi <= b`` for all
    of its rows (exact int64: outputs and coefficients are small)."""
    for conj in prop.unsafe:
        A = conj.A
        low = np.maximum(A, 0) @ ylo + np.minimum(A, 0) @ yhi
        if np.all(low <= conj.b):
            return True
    return False


def _depth_bound(prog: Program, rows: list) -> int:
    """Upper bound of the violation depth ``min_k (rhs_k - expr_k)`` of one disjunct on the variable domains."""
    return min((r - prog.expr_bounds(e)[0] for e, r in rows), default=2**62)


def verify_milp(net: QNetwork, prop: Property, settings: SolverSettings | None = None,
                bounds: Bounds | None = None, deadline: float | None = None, margin: bool | None = None,
                split: bool | None = None, relax: bool = False, exclude: Collection[int] = ()) -> Result:
    """Decide ``prop`` on ``net`` with the integer program of ``settings.encoding`` solved by
    ``settings.backend``.

    ``bounds``: per-value ``(lo, hi)`` bounds (one per value of the graph) valid on the property's box (see
    :mod:`qverify.encode`); default: interval bounds. ``deadline``: an absolute :func:`time.monotonic` time after
    which the solver must stop
    (the effective limit is ``min(settings.time_limit, deadline - now)``). ``margin``: guide the solver with the
    violation-depth objective (default: on for CP-SAT, which stops at the first solution; off for the MIP
    back ends, which would optimize it to the end). ``split``: one program per unsafe disjunct (default: on).
    ``relax``: solve the relaxed-input programs instead (module docstring): ``robust`` when every one is
    infeasible, ``counterexample`` when a repaired solution replays, else ``unknown``; the indices of the
    disjuncts it proved are in ``details['proved_disjuncts']``. ``exclude``: disjuncts already proved infeasible
    (by an earlier relaxed solve): not solved again.
    """
    settings = settings or SolverSettings()
    method = f"milp-{settings.backend}-{settings.encoding}" + ("-relaxed" if relax else "")
    t0 = time.perf_counter()
    start = time.monotonic()
    end = start + settings.time_limit if deadline is None else min(deadline, start + settings.time_limit)
    stages: list[StageTime] = []
    try:
        prop.check_network(net)
    except PropertyError as e:
        return Result(Verdict.ERROR, method, time.perf_counter() - t0, reason=str(e))
    if margin is None:
        margin = settings.backend == "cpsat"
    if split is None:
        split = True
    bounds = box_bounds(net, prop.lo, prop.hi) if bounds is None else normalize_bounds(net, bounds)
    if not _live_by_bounds(prop, *bounds[-1]):
        t1 = time.perf_counter()
        stages.append(StageTime("bounds", t1 - t0, "robust (decided by the output bounds)"))
        return Result(Verdict.ROBUST, method, t1 - t0, stages=stages,
                      details={"decided_by": "no unsafe disjunct can hold on the output bounds",
                               "backend": settings.backend, "encoding": settings.encoding})
    enc = encode_network(net, prop.lo, prop.hi, bounds, settings.encoding)
    base = enc.program.relaxed(enc.relaxable) if relax else enc.program
    skip = set(exclude)
    parts = []  # (depth bound, index, single-disjunct property)
    for j, conj in enumerate(prop.unsafe):
        if j in skip:
            continue
        sub = Property(prop.lo, prop.hi, (conj,), name=prop.name)
        rows = unsafe_rows(sub, enc.outputs)
        if not rows:
            continue  # a constant row is false: this disjunct cannot hold
        if all(base.expr_bounds(e)[0] <= r for e, r in rows[0]):
            parts.append((_depth_bound(base, rows[0]), j, sub))
    details: dict = {"network_program": base.stats(), "encoder": enc.stats, "backend": settings.backend,
                     "encoding": settings.encoding, "margin_objective": margin,
                     "live_disjuncts": len(parts), "disjuncts": len(prop.unsafe), "excluded": sorted(skip)}
    t1 = time.perf_counter()
    if not parts:
        stages.append(StageTime("encode", t1 - t0, "robust (decided by the bounds)"))
        details["decided_by"] = "no unsafe disjunct can hold on the bounds" + (
            " (the excluded ones were proved before)" if skip else "")
        return Result(Verdict.ROBUST, method, t1 - t0, stages=stages, details=details)
    if not relax and (not split or len(parts) == 1):
        # one program for the live disjuncts (the excluded ones were proved infeasible: not encoded again)
        live = Property(prop.lo, prop.hi, tuple(sub.unsafe[0] for _, _, sub in parts), name=prop.name)
        prog = base.copy()
        encode_unsafe(prog, live, enc.outputs, margin=margin)
        details["program"] = prog.stats()
        stages.append(StageTime("encode", time.perf_counter() - t0, "program built"))
        out = solve(prog, settings, end, confirm_deadline=end)
        return _conclude(net, prop, enc, prog, out, settings, method, t0, stages, details)
    stages.append(StageTime("encode", t1 - t0, f"network encoded; {len(parts)} disjuncts"))
    parts.sort(key=lambda p: (-p[0], p[1]))
    progs = {}
    for _, j, sub in parts:
        prog = base.copy()
        encode_unsafe(prog, sub, enc.outputs, margin=margin)
        progs[j] = prog
    open_ = [j for _, j, _ in parts]
    claimed: set[int] = set()  # disjuncts a floating-point solver called infeasible, not yet confirmed exactly
    status: dict[int, str] = {}
    per: list[dict] = []
    slice_s = max(SPLIT_MIN_SLICE, SPLIT_FIRST_SHARE * settings.time_limit / len(open_))
    failure: tuple[SolveOutcome, Counterexample, int] | None = None
    last_error: SolveOutcome | None = None
    while open_:
        still = []
        for j in open_:
            left = end - time.monotonic()
            if left <= 0:
                still.append(j)
                continue
            ts = time.perf_counter()
            # a claimed disjunct goes straight to the exact confirmer (the float solver already had its say)
            out = solve(progs[j], _confirmer(settings, progs[j]) if j in claimed else settings,
                        min(end, time.monotonic() + slice_s), confirm_deadline=end)
            per.append({"disjunct": j, "slice": round(slice_s, 3), "status": out.status.value,
                        "seconds": round(out.seconds, 4), "solver": out.solver})
            stages.append(StageTime(f"solve-{settings.backend}-d{j}", time.perf_counter() - ts, out.status.value))
            if out.status is SolveStatus.INFEASIBLE:
                status[j] = "infeasible"
                continue
            if out.status is SolveStatus.FEASIBLE and out.values is not None:
                x = enc.decode(out.values, 0)
                cex = replay(net, prop, x)
                if not cex.confirmed and (relax or net.set_valued):
                    found = descend(net, prop, x.reshape(1, -1), REPAIR, min(end, time.monotonic() + REPAIR_SECONDS),
                                    target=j)
                    if found is None:
                        status[j] = "relaxation-feasible"
                        continue
                    cex = found
                if cex.confirmed:
                    stages.append(StageTime("replay", 0.0, "confirmed"))
                    details.update({"split": per, "deciding_disjunct": j, "program": progs[j].stats(),
                                    "solver_status": out.raw_status, "solver_stats": out.stats})
                    return Result(Verdict.COUNTEREXAMPLE, method, time.perf_counter() - t0, counterexample=cex,
                                  stages=stages, details=details)
                failure = (out, cex, j)
                status[j] = "replay-failed"
                continue
            if out.status is SolveStatus.ERROR and j in claimed:
                status[j] = "unconfirmed"  # the confirmer cannot take this program: the claim stays a claim
                continue
            if out.status is SolveStatus.ERROR:
                last_error = out
                status[j] = "error"
                continue
            if out.status is SolveStatus.UNKNOWN:
                status[j] = "unknown"
                continue
            if out.status is SolveStatus.UNCONFIRMED:
                if not confirmers(progs[j], settings.confirm):
                    status[j] = "unconfirmed"  # no exact confirmer configured: the claim stays a claim
                    continue
                claimed.add(j)  # the next round confirms it with a longer slice
            still.append(j)  # timeout: another round with a longer slice
        if not still or time.monotonic() >= end:
            open_ = still
            break
        open_ = still
        slice_s *= SPLIT_GROWTH
    details["split"] = per
    details["disjunct_status"] = {str(k): v for k, v in status.items()} | {
        str(k): "unconfirmed" if k in claimed else "timeout" for k in open_}
    details["proved_disjuncts"] = sorted(k for k, v in status.items() if v == "infeasible")
    secs = time.perf_counter() - t0
    if not open_ and all(v == "infeasible" for v in status.values()):
        return Result(Verdict.ROBUST, method, secs, stages=stages, details=details)
    if not open_ and all(v in ("infeasible", "relaxation-feasible") for v in status.values()):
        return Result(Verdict.UNKNOWN, method, secs, reason=Reason.INCOMPLETE, stages=stages, details=details)
    if last_error is not None:
        return Result(Verdict.ERROR, method, secs, reason=f"{settings.backend}: {last_error.message}",
                      stages=stages, details=details)
    if failure is not None:
        out, cex, j = failure
        details["replay_failure"] = replay_report(net, enc, out.values or [], cex.x, cex.note, out.raw_values)
        details["replay_failure"]["disjunct"] = j
        return Result(Verdict.UNKNOWN, method, secs, reason=_replay_reason(net), counterexample=cex,
                      stages=stages, details=details)
    if open_:
        reason = Reason.UNCONFIRMED if all(k in claimed for k in open_) else Reason.TIMEOUT
        return Result(Verdict.UNKNOWN, method, secs, reason=reason, stages=stages, details=details)
    if "unconfirmed" in status.values():
        return Result(Verdict.UNKNOWN, method, secs, reason=Reason.UNCONFIRMED, stages=stages, details=details)
    return Result(Verdict.UNKNOWN, method, secs, reason=Reason.SOLVER, stages=stages, details=details)


def _confirmer(settings: SolverSettings, prog: Program) -> SolverSettings:
    """The settings that solve a claimed disjunct's ``prog`` with the exact confirmer in a later round: the last of
    :func:`qverify.solvers.base.confirmers` (the checked branch and bound under ``auto``; CP-SAT takes no continuous
    variables). A disjunct is only claimed when that chain is not empty."""
    return replace(settings, backend=confirmers(prog, settings.confirm)[-1])


def _conclude(net: QNetwork, prop: Property, enc: NetworkEncoding, prog: Program, out: SolveOutcome,
              settings: SolverSettings, method: str, t0: float, stages: list[StageTime], details: dict) -> Result:
    """Map one solve of the whole program to a result (the explicit status mapping; replay of candidates)."""
    t1 = time.perf_counter()
    details.update({"solver_status": out.raw_status, "solver_seconds": out.seconds, "solver_stats": out.stats})
    if out.message:
        details["solver_message"] = out.message
    stages.append(StageTime(f"solve-{settings.backend}", out.seconds, out.status.value))
    if out.status is SolveStatus.INFEASIBLE:
        return Result(Verdict.ROBUST, method, t1 - t0, stages=stages, details=details)
    if out.status is SolveStatus.UNCONFIRMED:
        return Result(Verdict.UNKNOWN, method, t1 - t0, reason=Reason.UNCONFIRMED, stages=stages, details=details)
    if out.status is SolveStatus.TIMEOUT:
        return Result(Verdict.UNKNOWN, method, t1 - t0, reason=Reason.TIMEOUT, stages=stages, details=details)
    if out.status is SolveStatus.ERROR:
        return Result(Verdict.ERROR, method, t1 - t0, reason=f"{settings.backend}: {out.message or out.raw_status}",
                      stages=stages, details=details)
    if out.status is not SolveStatus.FEASIBLE or out.values is None:
        return Result(Verdict.UNKNOWN, method, t1 - t0, reason=Reason.SOLVER, stages=stages, details=details)
    x = enc.decode(out.values, 0)
    cex = replay(net, prop, x)
    t2 = time.perf_counter()
    stages.append(StageTime("replay", t2 - t1, "confirmed" if cex.confirmed else "failed"))
    if cex.confirmed:
        return Result(Verdict.COUNTEREXAMPLE, method, t2 - t0, counterexample=cex, stages=stages, details=details)
    details["replay_failure"] = replay_report(net, enc, out.values, x, cex.note, out.raw_values, prog)
    return Result(Verdict.UNKNOWN, method, t2 - t0, reason=_replay_reason(net), counterexample=cex,
                  stages=stages, details=details)


def _replay_reason(net: QNetwork) -> Reason:
    """Why a solution that does not replay leaves the disjunct open: on a set-valued network the program's
    solutions are members of the set the runtime need not compute (``set-valued``), elsewhere a bug
    (``replay-failed``)."""
    return Reason.SET_VALUED if net.set_valued else Reason.REPLAY_FAILED


def replay_report(net: QNetwork, enc: NetworkEncoding, values: list[int], x: np.ndarray, note: str,
                  raw_values: list[float] | None = None, prog: Program | None = None) -> dict:
    """Where the solver's solution and the executor part ways: the first value (in the graph's topological order;
    ``layer_index`` is the value index, ``i + 1`` for node ``i``) whose decoded values differ from
    the executor's on the decoded input, plus the program rows the rounded solution violates (exact check)."""
    rep: dict = {"note": note, "x": [int(v) for v in np.ravel(x)]}
    if not values:
        return rep
    try:
        ex = execute(net, np.asarray(x)[None, :])
        for i in range(len(ex)):
            got = enc.decode(values, i)
            want = ex[i].ravel()
            if not np.array_equal(got, want):
                j = int(np.flatnonzero(got != want)[0])
                rep["first_mismatch"] = {"layer_index": i, "neuron": j, "solver": int(got[j]),
                                         "executor": int(want[j])}
                break
        rep["solver_outputs"] = [int(v) for v in enc.decode(values, len(ex) - 1)]
        rep["executor_outputs"] = [int(v) for v in ex[-1].ravel()]
    except Exception as e:  # an input off the grid, for instance
        rep["execute_error"] = str(e)
    rep["violated_rows"] = (prog or enc.program).check(values)[:20]
    if raw_values is not None:
        frac = [abs(v - round(v)) for v in raw_values]
        rep["max_integrality_violation"] = max(frac) if frac else 0.0
    return rep
