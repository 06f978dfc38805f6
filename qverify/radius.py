"""Maximum robustness radius: the largest integer L-inf radius (input units) at which a sample is robust.

Robustness is monotone in the radius (the boxes are nested), so the answer is the ``r*`` with robust at ``r*`` and a
counterexample at ``r* + 1``. QVIP's Algorithm 1 steps the radius up one at a time and bisects. Here:

1. ``r = 0`` is the concrete check (the sample itself; a misclassified sample has radius ``-1``).
2. **Exponential search** ``r = 1, 2, 4, ...`` (capped at ``r_max``, where the box already is the whole grid)
   until a counterexample or an undecided radius; then **bisection** between the largest robust radius and the
   smallest refuted one. ``O(log r*)`` decisions instead of ``r*``.
3. **Reuse.** A confirmed counterexample ``x'`` found at radius ``r`` refutes every radius ``>= d = ||x' - x||_inf``,
   which is often below ``r``: the upper end moves to ``d``, not ``r``. Every witness is first *shrunk* towards the
   sample (``clip(x', x - t, x + t)`` for all ``t < d`` at once on the executor, keeping the smallest ``t`` that
   still violates), and every known witness is checked before a radius is sent to the solver.

Each radius is decided by ``decide(net, prop, deadline)`` (default: the verification portfolio,
:func:`default_decider`; :func:`exact_decider` is bounds + :func:`qverify.exact.verify_milp` alone). Only a proof is
counted as robust and only a replayed witness as a counterexample; an undecided radius leaves a gap, reported as
``lower``/``upper`` with ``exact = False``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from qverify.execute import forward
from qverify.network import ModelError, QNetwork
from qverify.property import Property, robustness_property
from qverify.replay import replay
from qverify.result import Counterexample, Result, Verdict
from qverify.settings import SolverSettings

Decider = Callable[[QNetwork, Property, float | None], Result]


@dataclass
class RadiusResult:
    """``radius``: the maximum robust radius when ``exact`` (else the largest proved, ``lower``); ``upper``: the
    smallest radius with a confirmed counterexample (``None``: none found up to ``r_max``); ``counterexample``: the
    witness at distance ``upper`` (``radius + 1`` when exact)."""

    radius: int
    lower: int
    upper: int | None
    exact: bool
    counterexample: Counterexample | None
    label: int
    r_max: int
    seconds: float
    steps: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"radius": self.radius, "lower": self.lower, "upper": self.upper, "exact": self.exact,
                "label": self.label, "r_max": self.r_max, "seconds": self.seconds, "steps": self.steps,
                "counterexample": self.counterexample.to_json() if self.counterexample else None}


def exact_decider(settings: SolverSettings) -> Decider:
    """Bounds (symbolic if available and the network is one they support, else interval) +
    :func:`qverify.exact.verify_milp`. Symbolic bounds only tighten the program: a network they refuse (a
    :class:`~qverify.network.ModelError` naming what they lack) is decided on the interval bounds."""
    from qverify.exact import verify_milp

    def decide(net: QNetwork, prop: Property, deadline: float | None) -> Result:
        bounds = None
        try:
            from qverify.bounds.symbolic import symbolic_bounds

            bounds = symbolic_bounds(net, prop.lo[None, :], prop.hi[None, :])
        except (ImportError, ModelError):
            pass
        return verify_milp(net, prop, settings, bounds=bounds, deadline=deadline)

    return decide


def default_decider(settings: SolverSettings, fallback: str | None = None) -> Decider:
    """The verification portfolio (:func:`qverify.verify.verify`: center, bounds, attack, then the exact program
    with ``settings``) within ``min(settings.time_limit, deadline - now)``; :func:`exact_decider` when the
    portfolio is not available. Attacks matter here: the exponential phase probes large radii, where a
    counterexample is usually cheap to find by search and expensive for the solver. ``fallback``: the portfolio's
    second exact back end (default: :class:`~qverify.settings.VerifySettings`'s; ``''`` for none)."""
    try:
        from qverify.settings import VerifySettings
        from qverify.verify import verify
    except ImportError:
        return exact_decider(settings)

    def decide(net: QNetwork, prop: Property, deadline: float | None) -> Result:
        limit = settings.time_limit if deadline is None else min(settings.time_limit, deadline - time.monotonic())
        vs = VerifySettings(timeout=max(0.01, limit), solver=settings)
        return verify(net, prop, vs if fallback is None else replace(vs, fallback=fallback))

    return decide


def shrink_witness(net: QNetwork, prop_at: Callable[[int], Property], x: np.ndarray, w: np.ndarray,
                   floor: int) -> np.ndarray:
    """The witness ``w`` pulled towards the sample: ``clip(w, x - t, x + t)`` for the smallest ``t > floor`` whose
    image still violates the property at radius ``t`` (all ``t`` evaluated in one executor batch)."""
    d = int(np.max(np.abs(w - x))) if w.size else 0
    ts = np.arange(floor + 1, d)
    if ts.size == 0:
        return w
    cand = np.clip(w[None, :], x[None, :] - ts[:, None], x[None, :] + ts[:, None])
    y = forward(net, cand)
    for k, t in enumerate(ts.tolist()):
        if prop_at(t).is_violated(y[k:k + 1])[0]:
            return cand[k]
    return w


def max_radius(net: QNetwork, x: np.ndarray, label: int, settings: SolverSettings | None = None,
               r_max: int | None = None, time_budget: float | None = None, decide: Decider | None = None,
               start: int = 1) -> RadiusResult:
    """The largest integer radius at which ``label`` is robust around the integer input ``x`` (see the module
    docstring). ``settings``: the solver of each decision (its ``time_limit`` applies per radius);
    ``time_budget``: seconds for the whole search; ``r_max``: the largest radius considered (default: the radius
    at which the box covers the whole input grid); ``start``: the first radius of the exponential phase."""
    settings = settings or SolverSettings()
    decide = decide or default_decider(settings)
    t0 = time.perf_counter()
    end = None if time_budget is None else time.monotonic() + time_budget
    x = np.asarray(x, dtype=np.int64).ravel()
    label = int(label)
    full = int(max(np.max(x - net.input_lo), np.max(net.input_hi - x))) if x.size else 0
    r_max = full if r_max is None else min(int(r_max), full)
    steps: list[dict] = []

    def prop_at(r: int) -> Property:
        return robustness_property(net, x, label, radius=r)

    # r = 0: the sample itself
    c0 = replay(net, prop_at(0), x)
    if c0.confirmed:
        steps.append({"radius": 0, "verdict": "counterexample", "seconds": 0.0, "how": "sample"})
        return RadiusResult(-1, -1, 0, True, c0, label, r_max, time.perf_counter() - t0, steps)

    lo, hi = 0, None  # robust at lo; counterexample at hi
    best: Counterexample | None = None
    witnesses: list[np.ndarray] = []
    undecided: int | None = None  # smallest radius left undecided

    def known(r: int) -> Counterexample | None:
        for w in witnesses:
            if int(np.max(np.abs(w - x))) <= r:
                return replay(net, prop_at(r), w)
        return None

    def record(cex: Counterexample) -> None:
        nonlocal hi, best
        w = shrink_witness(net, prop_at, x, cex.x, lo)
        d = int(np.max(np.abs(w - x)))
        c = replay(net, prop_at(d), w)
        if not c.confirmed:  # cannot happen for a shrunk witness; keep the solver's own
            c, d = cex, int(np.max(np.abs(cex.x - x)))
        witnesses.append(c.x)
        if hi is None or d < hi:
            hi, best = d, c

    def step(r: int) -> str:
        """Decide radius ``r``: 'robust', 'counterexample' or 'unknown'."""
        nonlocal lo, undecided
        ts = time.perf_counter()
        c = known(r)
        if c is not None and c.confirmed:
            steps.append({"radius": r, "verdict": "counterexample", "seconds": 0.0, "how": "known witness"})
            record(c)
            return "counterexample"
        deadline = end
        if end is not None and time.monotonic() >= end:
            steps.append({"radius": r, "verdict": "unknown", "seconds": 0.0, "how": "time budget spent"})
            undecided = r if undecided is None else min(undecided, r)
            return "unknown"
        res = decide(net, prop_at(r), deadline)
        info = {"radius": r, "verdict": res.verdict.value, "seconds": round(time.perf_counter() - ts, 4),
                "how": res.method}
        if res.reason:
            info["reason"] = str(res.reason)
        steps.append(info)
        if res.verdict is Verdict.ROBUST:
            lo = max(lo, r)
            return "robust"
        if res.verdict is Verdict.COUNTEREXAMPLE and res.counterexample is not None and res.counterexample.confirmed:
            record(res.counterexample)
            return "counterexample"
        undecided = r if undecided is None else min(undecided, r)
        return "unknown"

    # exponential phase
    r = max(1, int(start))
    while hi is None and r <= r_max:
        out = step(r)
        if out != "robust":
            break
        if r == r_max:
            break
        r = min(2 * r, r_max)
    # bisection between lo (robust) and the smallest refuted or undecided radius
    while True:
        if undecided is not None and hi is not None and undecided >= hi:
            undecided = None  # irrelevant: refuted below it
        tops = [v for v in (hi, undecided) if v is not None]
        if not tops or lo + 1 >= min(tops):
            break
        step((lo + min(tops)) // 2)
    if undecided is not None and hi is not None and undecided >= hi:
        undecided = None
    exact = undecided is None and ((hi is not None and lo + 1 == hi) or (hi is None and lo >= r_max))
    cex = best if hi is not None else None
    return RadiusResult(lo, lo, hi, exact, cex, label, r_max, time.perf_counter() - t0, steps)
