"""The verification portfolio: the cheapest method that decides, with a share of the time budget each.

Stages, in order (``VerifySettings.method = 'portfolio'``)::

    center   run the executor on the box center (and the property's sample): a violation is a counterexample
    interval QA-IBP interval bounds: every unsafe conjunction infeasible over the box -> robust
    symbolic linear bounds with rounding error: certify, else tighten every neuron's bounds for the encoder
    attack   PGD (straight-through) + random/corner search, every candidate replayed -> counterexample
    attack-reseed  ``reseed_rounds`` more attack rounds with new seeds (``reseed_share`` of the budget)
    optimized  alpha-CROWN style bounds (qverify.bounds.optimized; dense chains, Flatten allowed;
             ``optimize_share`` of the time left): margin proof -> robust, else tighter bounds for the encoder
    neuron-bab  branch and bound over neuron splits (qverify.neuron_bab; dense chains; ``split_share`` of the
             time left): every disjunct refuted -> robust, a domain's vertex replayed -> counterexample; the
             disjuncts it refuted are skipped by the exact stage
    exact    the relaxed-input program (SCIP; its infeasibility proves robust, its solutions are repaired by local
             search and replayed), then the integer program (CP-SAT by default, HiGHS as the fallback; ``milp``)
             without the disjuncts the relaxation proved, or branch-and-bound (``bab``), with what is left

(symbolic runs before the attack: on robust instances, the majority, it costs a few milliseconds where a failed
attack costs its whole share.)

Each stage appends a :class:`~qverify.result.StageTime`; the deciding stage is the result's ``method``. A single
method can be forced (``attack``, ``interval``, ``symbolic``, ``milp``, ``bab``); the incomplete ones answer
``unknown`` / ``incomplete-method`` when they do not decide. A timeout is ``unknown`` / ``timeout``, never robust.

:func:`verify_batch` verifies many properties of one network with shared work: one batched center pass, one batched
interval pass and one batched attack for all of them, then the remaining ones in a pool of worker processes.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace

import numpy as np

from qverify.execute import forward
from qverify.network import QNetwork
from qverify.property import Property, PropertyError
from qverify.replay import replay
from qverify.result import Reason, Result, StageTime, Verdict
from qverify.settings import SolverSettings, VerifySettings

METHODS = ("portfolio", "attack", "interval", "symbolic", "milp", "bab")
#: share of the per-property budget that the attack stage may use in the portfolio
ATTACK_SHARE = 0.1
#: the most of a property's time the symbolic stage's hidden-node refinements may take (they are skipped, the
#: bounds staying sound, when the prediction says they would run past it)
SYMBOLIC_SHARE = 0.5


class _Clock:
    def __init__(self, timeout: float) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.stages: list[StageTime] = []
        self._last = self.t0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, outcome: str) -> None:
        now = time.monotonic()
        self.stages.append(StageTime(name, now - self._last, outcome))
        self._last = now

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _done(clock: _Clock, verdict: Verdict, method: str, reason: str = "", cex=None, details=None) -> Result:
    return Result(verdict, method, clock.elapsed(), reason, cex, clock.stages, details or {})


def center_points(prop: Property) -> np.ndarray:
    """The property's sample (when it has one inside the box) and the box midpoint, as integer rows."""
    mid = (prop.lo + prop.hi) // 2
    pts = [mid]
    if prop.center is not None and prop.center.size == prop.num_inputs and prop.contains(prop.center)[0]:
        pts.insert(0, prop.center)
    return np.array(pts, dtype=np.int64)


def _center_stage(net: QNetwork, prop: Property, clock: _Clock) -> Result | None:
    pts = center_points(prop)
    bad = prop.is_violated(forward(net, pts))
    if bad.any():
        cex = replay(net, prop, pts[int(np.argmax(bad))])
        if cex.confirmed:
            clock.stage("center", "counterexample")
            return _done(clock, Verdict.COUNTEREXAMPLE, "center", cex=cex)
    clock.stage("center", "undecided")
    return None


def _interval_stage(net: QNetwork, prop: Property, clock: _Clock) -> Result | None:
    from qverify.bounds.interval import certified_by_interval

    ok = bool(np.asarray(certified_by_interval(net, [prop]))[0])
    clock.stage("interval", "robust" if ok else "undecided")
    return _done(clock, Verdict.ROBUST, "interval") if ok else None


#: the nearest miss of an attack: (its exact slack, the grid point)
Near = tuple[int, np.ndarray]
#: a property's per-value bounds (``(lo, hi)`` per value index of one box) and its slack lower bound
PreBounds = tuple[list[tuple[np.ndarray, np.ndarray]], int]


def _attack_stage(net: QNetwork, prop: Property, clock: _Clock, settings: VerifySettings, share: float
                  ) -> tuple[Result | None, Near | None]:
    from qverify.attack import attack_report

    rep = attack_report(net, [prop], settings, deadline=time.monotonic() + max(0.0, share))
    cex = rep.found[0]
    clock.stage("attack", "counterexample" if cex is not None else "undecided")
    if cex is not None:
        return _done(clock, Verdict.COUNTEREXAMPLE, "attack", cex=cex), None
    return None, (int(rep.slack[0]), rep.x[0])


def symbolic_check(net: QNetwork, prop: Property) -> tuple[bool, list]:
    """One symbolic analysis of the property's box: whether the margin bounds refute every unsafe conjunction
    (some row's lower bound above its right-hand side), and the tightened per-layer bounds for the encoder."""
    ok, bounds, _ = _symbolic(net, prop)
    return ok, bounds


def _symbolic(net: QNetwork, prop: Property, deadline: float | None = None) -> tuple[bool, list, int]:
    """:func:`symbolic_check` and the lower bound of the least slack over the box that the same bounds give. On a
    graph network the cheap CROWN-IBP pass runs first; the full one (DeepPoly) only when that does not prove it,
    its hidden refinements bounded by ``deadline``."""
    from qverify.bounds.symbolic import symbolic_analysis

    if not net.is_chain:
        ana = symbolic_analysis(net, prop.lo[None, :], prop.hi[None, :], intermediate="interval")
        lower = int(ana.slack_lower_bounds(prop)[0])
        if lower > 0:
            return True, [(lo[0], hi[0]) for lo, hi in ana.bounds], lower
    ana = symbolic_analysis(net, prop.lo[None, :], prop.hi[None, :], deadline=deadline)
    bounds = [(lo[0], hi[0]) for lo, hi in ana.bounds]
    lower = int(ana.slack_lower_bounds(prop)[0])
    return lower > 0, bounds, lower


def _symbolic_stage(net: QNetwork, prop: Property, clock: _Clock) -> tuple[Result | None, list | None, int]:
    ok, bounds, lower = _symbolic(net, prop, time.monotonic() + SYMBOLIC_SHARE * clock.left())
    clock.stage("symbolic", "robust" if ok else "undecided")
    return (_done(clock, Verdict.ROBUST, "symbolic") if ok else None), bounds, lower


def _reseed_stage(net: QNetwork, prop: Property, clock: _Clock, settings: VerifySettings, budget: float
                  ) -> tuple[Result | None, Near | None]:
    """A few more attack rounds with new seeds (``seed + 1000 + k``, ``reseed_rounds`` of them) and enough PGD
    restarts to target every unsafe disjunct (``2 + 2 D``: restarts ``2j, 2j + 1`` target the ``j``-th best
    disjunct at the centre, :func:`qverify.attack._targets`; the batched attack's 8 restarts target only the 3
    nearest), within ``reseed_share`` of the property's budget. Measured on the 87 QVIP Table 3 unknowns at 20 s
    (``benchmarks/bench_optimized.py --attack``): 32 or 64 restarts refute 6 of them in under 0.3 s from seed 0
    or 1000 alike, 8 restarts with three new seeds none: the restarts' targets matter, not the seed. Every
    candidate is replayed (:func:`qverify.attack.attack_report`). Returns the result (a counterexample) or the
    nearest miss."""
    from qverify.attack import AttackSettings, attack_report

    share = min(clock.left(), settings.reseed_share * budget)
    if settings.reseed_rounds <= 0 or share <= 0:
        return None, None
    deadline = time.monotonic() + share
    near: Near | None = None
    base = AttackSettings.from_verify(settings)
    for k in range(settings.reseed_rounds):
        if time.monotonic() >= deadline:
            break
        s = replace(base, seed=settings.seed + 1000 + k, restarts=max(base.restarts, 2 + 2 * len(prop.unsafe)))
        rep = attack_report(net, [prop], s, deadline=deadline)
        if rep.found[0] is not None:
            clock.stage("attack-reseed", "counterexample")
            return _done(clock, Verdict.COUNTEREXAMPLE, "attack-reseed", cex=rep.found[0]), None
        if near is None or int(rep.slack[0]) < near[0]:
            near = (int(rep.slack[0]), rep.x[0])
    clock.stage("attack-reseed", "undecided")
    return None, near


def _optimized_stage(net: QNetwork, prop: Property, clock: _Clock, settings: VerifySettings, bounds: list | None,
                     lower: int | None) -> tuple[Result | None, list | None, int | None]:
    """Optimized (alpha-CROWN style) bounds (:mod:`qverify.bounds.optimized`, chains of dense layers, Flatten
    allowed) within ``optimize_share`` of the time left: ``robust`` when their (exactly re-evaluated) margin bound
    proves the property, else their tighter per-value bounds for the encoder and the better slack lower bound."""
    from qverify.bounds.optimized import optimized_bounds, supports

    if settings.optimize_share <= 0 or clock.left() <= 0 or not supports(net):
        return None, bounds, lower
    ob = optimized_bounds(net, prop.lo, prop.hi, prop,
                          deadline=time.monotonic() + settings.optimize_share * clock.left())
    ok = ob.slack_lower is not None and ob.slack_lower > 0
    clock.stage("optimized", "robust" if ok else "tightened")
    if ok:
        return _done(clock, Verdict.ROBUST, "optimized"), ob.bounds, ob.slack_lower
    best = ob.slack_lower if lower is None or ob.slack_lower is None else max(lower, ob.slack_lower)
    return None, ob.bounds, best


def _split_stage(net: QNetwork, prop: Property, clock: _Clock, settings: VerifySettings, bounds: list | None
                 ) -> tuple[Result | None, list[int]]:
    """Neuron-split branch and bound (:mod:`qverify.neuron_bab`, chains of dense layers) from the optimized
    stage's bounds within ``split_share`` of the time left: ``robust`` when every disjunct's domains are refuted,
    a replayed ``counterexample``, else the disjuncts it refuted completely (the exact stage skips them)."""
    from qverify.bounds.optimized import supports
    from qverify.neuron_bab import neuron_bab

    if settings.split_share <= 0 or clock.left() <= 0 or bounds is None or not supports(net):
        return None, []
    r = neuron_bab(net, prop, deadline=time.monotonic() + settings.split_share * clock.left(), bounds=bounds)
    clock.stage("neuron-bab", r.verdict.value if r.verdict is not Verdict.UNKNOWN else r.reason)
    if r.verdict is Verdict.ROBUST:
        return _done(clock, Verdict.ROBUST, "neuron-bab"), []
    if r.verdict is Verdict.COUNTEREXAMPLE:
        return _done(clock, Verdict.COUNTEREXAMPLE, "neuron-bab", cex=r.counterexample), []
    return None, sorted(set(range(len(prop.unsafe))) - set(r.open_disjuncts))


def _bracket(net: QNetwork, r: Result, lower: int | None = None, near: Near | None = None) -> Result:
    """An ``unknown`` result with what is known of the property's least slack ``s* = min_box slack``
    (:meth:`~qverify.property.Property.slack`): ``details['slack'] = {'lower': L, 'upper': U, 'nearest': {'x', 'y'}}``
    with ``L <= s* <= U``: ``L`` from the symbolic bounds, ``U`` the exact slack of the attack's nearest miss
    ``nearest.x`` (outputs ``nearest.y``), ``None`` where that stage did not run. Other verdicts pass unchanged."""
    if r.verdict is not Verdict.UNKNOWN:
        return r
    old = r.details.get("slack") or {}
    info = {"lower": old.get("lower") if lower is None else int(lower), "upper": old.get("upper"),
            "nearest": old.get("nearest")}
    if near is not None and (info["upper"] is None or near[0] < info["upper"]):
        x = np.asarray(near[1], dtype=np.int64)
        info["upper"] = int(near[0])
        info["nearest"] = {"x": [int(v) for v in x], "y": [int(v) for v in forward(net, x[None])[0]]}
    if info["lower"] is None and info["upper"] is None:
        return r
    return replace(r, details={**r.details, "slack": info})


def _exact_stage(net: QNetwork, prop: Property, clock: _Clock, settings: VerifySettings, method: str,
                 bounds: list | None, proved: Sequence[int] = ()) -> Result:
    if clock.left() <= 0:
        clock.stage(method, "timeout")
        return _done(clock, Verdict.UNKNOWN, method, Reason.TIMEOUT)
    if method == "bab":
        from qverify.bab import bab

        r = bab(net, prop, deadline=clock.deadline)
    else:
        r = _milp_chain(net, prop, clock, settings, method, bounds, proved)
    clock.stage(method, r.verdict.value if r.verdict is not Verdict.UNKNOWN else r.reason)
    return Result(r.verdict, r.method if r.method else method, clock.elapsed(), r.reason, r.counterexample,
                  clock.stages, r.details)


def _milp_chain(net: QNetwork, prop: Property, clock: _Clock, settings: VerifySettings, method: str,
                bounds: list | None, proved_before: Sequence[int] = ()) -> Result:
    """The exact stage's programs in turn, each on what the earlier ones left: the relaxed-input program (portfolio
    only, ``settings.relax``, ``relax_share`` of the time; it ends the chain when it decides, otherwise the disjuncts
    it proved are skipped after it), the configured back end, then the fallback when that one times out. Returns
    the last result; the stages before it are recorded on ``clock``. ``proved_before``: disjuncts an earlier stage
    refuted (neuron branch and bound), skipped by every program."""
    from qverify.exact import verify_milp

    proved: list[int] = list(proved_before)
    if settings.method == "portfolio" and settings.relax and 0.0 < settings.relax_share <= 1.0:
        solver = replace(settings.solver, backend=settings.relax,
                         time_limit=max(0.01, settings.relax_share * clock.left()))
        r = verify_milp(net, prop, solver, bounds=bounds, deadline=clock.deadline, relax=True,
                        exclude=proved)
        if r.verdict in (Verdict.ROBUST, Verdict.COUNTEREXAMPLE):
            return r
        clock.stage(r.method or method, r.reason or r.verdict.value)
        proved = sorted(set(proved) | set(r.details.get("proved_disjuncts", [])))
    fallback = _fallback(settings)
    left = clock.left()
    first = (1.0 - settings.fallback_share) * left if fallback else left
    r = verify_milp(net, prop, replace(settings.solver, time_limit=max(0.01, first)), bounds=bounds,
                    deadline=clock.deadline, exclude=proved)
    if fallback and r.verdict is Verdict.UNKNOWN and r.reason == Reason.TIMEOUT and clock.left() > 0:
        clock.stage(r.method or method, r.reason)
        solver = replace(settings.solver, backend=fallback, time_limit=max(0.01, clock.left()))
        r = verify_milp(net, prop, solver, bounds=bounds, deadline=clock.deadline, exclude=proved)
    return r


def _fallback(settings: VerifySettings) -> str:
    """The portfolio's second exact back end ('' for none). When the configured one times out after
    ``1 - fallback_share`` of the exact stage's time, the fallback gets the rest (a forced ``milp`` method uses
    its back end alone). The two are complementary: CP-SAT (stop at the first solution) finds counterexamples
    fast; an LP-based branch and cut (HiGHS) proves hard robust instances where the rounding slack of many neurons
    leaves the LP bound less than one output step short (see ``benchmarks/RESULTS.md``)."""
    fb = settings.fallback
    if settings.method != "portfolio" or fb == settings.solver.backend or not 0.0 < settings.fallback_share < 1.0:
        return ""
    return fb


def verify(net: QNetwork, prop: Property, settings: VerifySettings | None = None) -> Result:
    """Verify one property with the configured method (default: the portfolio)."""
    settings = settings or VerifySettings()
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r} (known: {', '.join(METHODS)})")
    clock = _Clock(settings.timeout)
    try:
        prop.check_network(net)
    except PropertyError as e:
        return Result(Verdict.ERROR, settings.method, 0.0, str(e))
    m = settings.method
    if m in ("portfolio", "attack"):
        r = _center_stage(net, prop, clock)
        if r:
            return r
    if m in ("portfolio", "interval"):
        r = _interval_stage(net, prop, clock)
        if r:
            return r
        if m == "interval":
            return _done(clock, Verdict.UNKNOWN, m, Reason.INCOMPLETE)
    bounds, lower, near = None, None, None
    if m in ("portfolio", "symbolic"):
        r, bounds, lower = _symbolic_stage(net, prop, clock)
        if r:
            return r
        if m == "symbolic":
            return _bracket(net, _done(clock, Verdict.UNKNOWN, m, Reason.INCOMPLETE), lower)
    if m in ("portfolio", "attack"):
        share = clock.left() if m == "attack" else min(clock.left(), ATTACK_SHARE * settings.timeout)
        r, near = _attack_stage(net, prop, clock, settings, share)
        if r:
            return r
        if m == "attack":
            return _bracket(net, _done(clock, Verdict.UNKNOWN, m, Reason.TIMEOUT if clock.left() <= 0
                                       else Reason.INCOMPLETE), lower, near)
    if m == "portfolio":
        r, near2 = _reseed_stage(net, prop, clock, settings, settings.timeout)
        if r:
            return r
        if near2 is not None and (near is None or near2[0] < near[0]):
            near = near2
        r, bounds, lower = _optimized_stage(net, prop, clock, settings, bounds, lower)
        if r:
            return r
        r, proved = _split_stage(net, prop, clock, settings, bounds)
        if r:
            return r
    else:
        proved = []
    r = _exact_stage(net, prop, clock, settings, "milp" if m == "portfolio" else m, bounds, proved)
    return _bracket(net, r, lower, near)


# ------------------------------------------------------------------------------------------------ batches
_WORKER_NET: QNetwork | None = None


def _init_worker(net: QNetwork) -> None:
    global _WORKER_NET
    _WORKER_NET = net
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def verify_batch(net: QNetwork, props: Sequence[Property], settings: VerifySettings | None = None,
                 workers: int = 0, on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    """Verify many properties of one network; ``on_result(i, result)`` is called as soon as each one is decided.

    Shared work first (portfolio only): one batched center pass, one batched interval pass, one batched symbolic
    pass and one batched attack over all undecided properties; their times are split evenly over the properties
    they covered. The rest go to
    :func:`verify` in ``workers`` processes (0 = one per core; 1 = in this process), each with its own budget
    ``timeout - shared time already spent on it``.
    """
    settings = settings or VerifySettings()
    n = len(props)
    results: list[Result | None] = [None] * n

    def finish(i: int, r: Result) -> None:
        results[i] = r
        if on_result is not None:
            on_result(i, r)

    for i, p in enumerate(props):
        try:
            p.check_network(net)
        except PropertyError as e:
            finish(i, Result(Verdict.ERROR, settings.method, 0.0, str(e)))
    todo = [i for i in range(n) if results[i] is None]
    shared: dict[int, list[StageTime]] = {i: [] for i in todo}
    nears: dict[int, Near] = {}  # the shared attack's nearest miss of each property it left open
    pre: dict[int, PreBounds] = {}  # the shared symbolic pass's bounds of the properties it left open
    if settings.method == "portfolio" and todo:
        todo = _shared_stages(net, props, todo, settings, shared, finish, nears, pre)
    if not todo:
        return [r for r in results if r is not None]
    for i, r in _run_pool(net, props, todo, settings, shared, workers, pre):
        finish(i, _bracket(net, r, near=nears.get(i)))
    return results  # type: ignore[return-value]


def _shared_stages(net: QNetwork, props: Sequence[Property], todo: list[int], settings: VerifySettings,
                   shared: dict[int, list[StageTime]], finish: Callable[[int, Result], None],
                   nears: dict[int, Near], pre: dict[int, PreBounds] | None = None) -> list[int]:
    from qverify.attack import attack_report
    from qverify.bounds.interval import certified_by_interval
    from qverify.bounds.symbolic import certified_by_symbolic

    def close(i: int, verdict: Verdict, method: str, cex=None) -> None:
        secs = sum(s.seconds for s in shared[i])
        finish(i, Result(verdict, method, secs, "", cex, list(shared[i])))

    # center
    t = time.monotonic()
    pts = [center_points(props[i]) for i in todo]
    allp = np.concatenate(pts)
    ys = forward(net, allp)
    off = 0
    decided = {}
    for i, p in zip(todo, pts, strict=True):
        bad = props[i].is_violated(ys[off:off + len(p)])
        if bad.any():
            cex = replay(net, props[i], p[int(np.argmax(bad))])
            if cex.confirmed:
                decided[i] = cex
        off += len(p)
    dt = (time.monotonic() - t) / len(todo)
    for i in todo:
        shared[i].append(StageTime("center", dt, "counterexample" if i in decided else "undecided"))
        if i in decided:
            close(i, Verdict.COUNTEREXAMPLE, "center", decided[i])
    todo = [i for i in todo if i not in decided]
    if not todo:
        return todo
    # interval, then symbolic: one batched pass each over what is still open
    for stage, certifier in (("interval", certified_by_interval), ("symbolic", certified_by_symbolic)):
        t = time.monotonic()
        if stage == "symbolic":  # the batch's share of the instances' budgets
            keep: dict[int, PreBounds] = {}
            cert = np.asarray(certifier(net, [props[i] for i in todo],
                                        deadline=t + SYMBOLIC_SHARE * settings.timeout * len(todo),
                                        keep=keep if pre is not None else None))
            if pre is not None:
                pre.update({todo[k]: v for k, v in keep.items()})
        else:
            cert = np.asarray(certifier(net, [props[i] for i in todo]))
        dt = (time.monotonic() - t) / len(todo)
        for i, ok in zip(todo, cert, strict=True):
            shared[i].append(StageTime(stage, dt, "robust" if ok else "undecided"))
            if ok:
                close(i, Verdict.ROBUST, stage)
        todo = [i for i, ok in zip(todo, cert, strict=True) if not ok]
        if not todo:
            return todo
    # attack: a share of each property's budget, all at once
    t = time.monotonic()
    rep = attack_report(net, [props[i] for i in todo], settings, deadline=t + ATTACK_SHARE * settings.timeout)
    dt = (time.monotonic() - t) / len(todo)
    rest = []
    for k, (i, cex) in enumerate(zip(todo, rep.found, strict=True)):
        shared[i].append(StageTime("attack", dt, "counterexample" if cex is not None else "undecided"))
        if cex is not None:
            close(i, Verdict.COUNTEREXAMPLE, "attack", cex)
        else:
            nears[i] = (int(rep.slack[k]), rep.x[k])
            rest.append(i)
    return rest


def _merge(r: Result, pre: list[StageTime]) -> Result:
    secs = sum(s.seconds for s in pre)
    return Result(r.verdict, r.method, r.seconds + secs, r.reason, r.counterexample, pre + r.stages, r.details)


def _after_shared(settings: VerifySettings, pre: list[StageTime]) -> VerifySettings:
    """Settings for the rest of a property's work: the remaining budget, the stages not yet run."""
    spent = sum(s.seconds for s in pre)
    s = replace(settings, timeout=max(0.01, settings.timeout - spent))
    if pre and settings.method == "portfolio":
        s = replace(s, method="_after_shared")
    return s


def _run_pool(net: QNetwork, props: Sequence[Property], todo: list[int], settings: VerifySettings,
              shared: dict[int, list[StageTime]], workers: int, pre: dict[int, PreBounds] | None = None
              ) -> Iterator[tuple[int, Result]]:
    from qverify.settings import default_threads

    pre = pre or {}
    workers = workers or default_threads()
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        for i in todo:
            yield i, _merge(_verify_rest(net, props[i], _after_shared(settings, shared[i]), pre.get(i)),
                            shared[i])
        return
    solver = replace(settings.solver, threads=max(1, settings.solver.num_threads // workers))
    per = replace(settings, solver=solver)
    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(net,))
    finished = False
    try:
        futs: dict[Future, int] = {}
        pending = list(todo)
        while pending or futs:
            while pending and len(futs) < 2 * workers:
                i = pending.pop(0)
                futs[pool.submit(_verify_rest_in_worker, props[i], _after_shared(per, shared[i]), pre.get(i))] = i
            done, _ = wait(list(futs), return_when=FIRST_COMPLETED)
            for f in done:
                i = futs.pop(f)
                yield i, _merge(f.result(), shared[i])
        finished = True
    finally:
        # on an interruption (Ctrl-C, a callback's exception) do not wait for the instances in flight
        pool.shutdown(wait=finished, cancel_futures=not finished)
        if not finished:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()


def _verify_rest(net: QNetwork, prop: Property, settings: VerifySettings, pre: PreBounds | None = None) -> Result:
    """The stage after the shared ones (exact, on symbolic bounds) or, for a forced method, :func:`verify`.
    ``pre``: the shared symbolic pass's bounds and slack lower bound of this property (kept when that pass
    skipped no refinement: the same bounds a fresh analysis of the one box gives), else they are recomputed."""
    if settings.method != "_after_shared":
        return verify(net, prop, settings)
    settings = replace(settings, method="portfolio")
    clock = _Clock(settings.timeout)
    if pre is not None:
        bounds, lower = pre
        clock.stage("bounds", "reused")
    else:
        _, bounds, lower = _symbolic(net, prop)
        clock.stage("bounds", "tightened")
    r, near = _reseed_stage(net, prop, clock, settings, settings.timeout)
    if r:
        return r
    r, bounds, lower = _optimized_stage(net, prop, clock, settings, bounds, lower)
    if r:
        return r
    r, proved = _split_stage(net, prop, clock, settings, bounds)
    if r:
        return r
    return _bracket(net, _exact_stage(net, prop, clock, settings, "milp", bounds, proved), lower, near)


def _verify_rest_in_worker(prop: Property, settings: VerifySettings, pre: PreBounds | None = None) -> Result:
    assert _WORKER_NET is not None
    return _verify_rest(_WORKER_NET, prop, settings, pre)


__all__ = ["METHODS", "verify", "verify_batch", "SolverSettings"]
