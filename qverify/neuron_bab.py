"""Complete branch and bound over neuron splits (beta-CROWN style) for chains of dense layers and requantizations.

**Domains.** A domain of an unsafe disjunct ``d`` is the input box with integer bounds ``[l_kj, u_kj]`` on every
value ``v_kj`` an activation reads (:mod:`qverify.bounds.beta`); its points are the inputs of the box whose values
lie in those bounds. Invariant: for every open disjunct, every input of the box lies in exactly one queued domain
of that disjunct or in one already refuted. The roots (one per open disjunct) carry the root bounds, valid on the
whole box; splitting a domain on neuron ``j`` of value ``k`` at ``t`` (``l <= t < u``) gives the children
``[l, t]`` and ``[t + 1, u]``, which partition the parent's points (``v_kj`` is an integer).

**A round** takes up to ``batch`` domains with the smallest float bound (best first) and

1. bounds them: slopes and split multipliers optimized per domain (:func:`qverify.bounds.beta.optimize`,
   warm-started from the parent's choice);
2. evaluates each domain's *candidate*, the vertex of the box that minimizes its final linear bound
   (``lo`` where the input coefficient is positive, ``hi`` where negative), on the executor; a point in the unsafe
   region is replayed (:func:`qverify.replay.replay`) and, once confirmed, is the answer;
3. recomputes the bound *rigorously* (:func:`qverify.bounds.beta.rigorous_lower`) for the domains whose float
   bound is within ``rigor_gap`` of a proof; a domain with some row's exact lower bound above its right-hand side
   holds no violation of its disjunct and is dropped;
4. splits each remaining domain on the unstable neuron of largest score ``sum_r |lam_rj| (f(u_j) - f(l_j))``
   (``lam`` the float coefficients on the activation's output, BaBSR-like: the neuron whose relaxation costs the
   bound most), at a *kink*: the last input of ``f``'s bottom clamp or the first of its top clamp, whichever
   splits ``[l, u]`` more evenly (a child at a clamp is exact there), and at the middle level when ``f`` has no
   clamp inside ``[l, u]``.

A domain whose input box has at most ``enumerate_max`` points is decided by evaluating every one of them.

The verdict is ``robust`` only when every disjunct's queue is empty (each of its domains refuted by a rigorous
bound), ``counterexample`` only after replay, and ``unknown`` otherwise: ``timeout`` at the deadline, ``memory``
past ``max_domains`` queued domains, ``incomplete-method`` when only domains with no unstable neuron are left (a
domain whose bounds admit no input can hold a violating constant; nothing is split there).

Deadlines are absolute :func:`time.monotonic` timestamps (``None``: no limit).
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from qverify.bounds.beta import (
    Choice,
    LayerRelax,
    activation_layers,
    initial_choice,
    optimize,
    rigorous_lower,
)
from qverify.bounds.interval import node_interval
from qverify.bounds.optimized import supports
from qverify.bounds.symbolic import thresholds
from qverify.divergence import box_grid, grid_size
from qverify.execute import forward
from qverify.network import QNetwork
from qverify.property import Property
from qverify.replay import replay
from qverify.result import Counterexample, Reason, Verdict
from qverify.torch_net import limit_threads


@dataclass(frozen=True)
class NeuronBabSettings:
    """Defaults measured on QVIP Table 3 instances (``benchmarks/RESULTS.md``, issue 20 step 3): small Adam steps
    matter most (a split domain's warm start is a sharp maximum that large steps leave), then the LP bounds."""

    batch: int = 32            # domains bounded per round
    steps: int = 50            # Adam steps per round (warm-started from the parent's choice)
    root_steps: int = 60       # Adam steps for the root domains
    lr: float = 0.01           # Adam's step on the normalized slopes
    glr: float = 0.001         # Adam's step on the (scaled) split multipliers
    rigor_gap: float = 1.0     # rigorous bounds for domains whose float slack is above -rigor_gap
    max_domains: int = 200_000  # queued domains before giving up (unknown / memory)
    threads: int = 1           # numpy/torch threads while it runs
    enumerate_max: int = 256   # a domain whose input box has at most this many points is decided by evaluating
    #                            them all on the executor (0: never)
    lp: int = 8                # domains per round (the closest to a proof among those the bounds leave open)
    #                            that also get the rigorous LP bound (qverify.bounds.lp); 0: none


@dataclass
class NeuronBabResult:
    """Verdict (``robust`` / ``counterexample`` / ``unknown`` with ``reason``), the replayed witness, and the
    search's size: domains bounded, rounds, domains refuted, the deepest split and the disjuncts left open."""

    verdict: Verdict
    reason: str = ""
    counterexample: Counterexample | None = None
    domains: int = 0
    rounds: int = 0
    refuted: int = 0
    depth: int = 0
    lp: int = 0
    lp_refuted: int = 0
    open_disjuncts: list[int] = field(default_factory=list)
    seconds: float = 0.0
    #: per round: (seconds, domains bounded so far, domains queued, least float slack of the round's domains)
    history: list[tuple[float, int, int, float]] = field(default_factory=list)


@dataclass
class _Domain:
    d: int                                   # disjunct
    pre: dict[int, tuple[np.ndarray, np.ndarray]]  # activation i -> bounds of its input value i ([n] each)
    choice: Choice | None                    # the parent's optimized parameters (batch of one), None at a root
    box: tuple[np.ndarray, np.ndarray]       # the domain's input box (the property's, until an input split)
    depth: int = 0


def _root_flat(net: QNetwork, prop: Property, bounds: list[tuple[np.ndarray, np.ndarray]] | None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    if bounds is None:
        from qverify.bounds.symbolic import symbolic_analysis

        ana = symbolic_analysis(net, prop.lo[None], prop.hi[None])
        bounds = [(lo.reshape(-1), hi.reshape(-1)) for lo, hi in ana.bounds]
    return [(np.asarray(lo, dtype=np.int64).reshape(-1), np.asarray(hi, dtype=np.int64).reshape(-1))
            for lo, hi in bounds]


def _propagate(net: QNetwork, root: list, acts: list[int], doms: list[_Domain]
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Per value ``(lo, hi) [D, n]`` over the domains: interval bounds from each domain's box through the chain,
    intersected with the root's bounds and, at the activations' inputs, with the domain's own (so a split in one
    layer tightens the intervals of the layers above it). Returns them and ``empty [D]``: domains where some
    value's bounds cross (no input of the box lies in such a domain)."""
    D = len(doms)
    lo = np.stack([dm.box[0] for dm in doms])
    hi = np.stack([dm.box[1] for dm in doms])
    flat = [(lo, hi)]
    empty = np.zeros(D, dtype=bool)
    for i in range(len(net.layers)):
        shape = net.shapes[i]
        a, b = node_interval(net, i, [(flat[i][0].reshape(D, *shape), flat[i][1].reshape(D, *shape))])
        a = np.maximum(a.reshape(D, -1), root[i + 1][0][None])
        b = np.minimum(b.reshape(D, -1), root[i + 1][1][None])
        if (i + 1) in acts:
            a = np.maximum(a, np.stack([dm.pre[i + 1][0] for dm in doms]))
            b = np.minimum(b, np.stack([dm.pre[i + 1][1] for dm in doms]))
        bad = np.any(a > b, axis=1)
        empty |= bad
        b = np.where(bad[:, None], a, b)  # keep the arrays well formed; these domains are dropped
        flat.append((a, b))
    return flat, empty


def _enumerate(net: QNetwork, prop: Property, dm: _Domain) -> Counterexample | None:
    """Every point of the domain's (small) box on the executor: a replayed violation of its disjunct, or ``None``
    when there is none (the domain's points are among the box's, so then it holds no violation)."""
    pts = box_grid(*dm.box)
    y = forward(net, pts)
    for b in np.nonzero(prop.unsafe[dm.d].holds(y))[0]:
        ce = replay(net, prop, pts[b])
        if ce.confirmed:
            ce.note = "neuron-bab: enumerated" + (f"; {ce.note}" if ce.note else "")
            return ce
    return None


def _split_point(L: LayerRelax, l: int, u: int, j: int) -> int:
    """``t`` with ``l <= t < u``: children ``[l, t]``, ``[t + 1, u]`` (module docstring, step 4)."""
    p = L.params
    lo_c, hi_c = int(p.layer.lo), int(p.layer.hi)
    one = np.array([j])
    f = lambda a: int(_apply_one(p, a, j))  # noqa: E731
    fl_, fu = f(l), f(u)
    cands = []
    if fl_ == lo_c and fu > lo_c:  # last input at the bottom clamp: T(lo + 1) - 1
        cands.append(int(thresholds(p, np.array([lo_c + 1], dtype=object), one)[0]) - 1)
    if fu == hi_c and fl_ < hi_c:  # last input below the top clamp: T(hi) - 1
        cands.append(int(thresholds(p, np.array([hi_c], dtype=object), one)[0]) - 1)
    cands = [t for t in cands if l <= t < u]
    if cands:
        return min(cands, key=lambda t: abs((t - l) - (u - t)))
    if fu > fl_:
        m = (fl_ + fu + 1) // 2
        t = int(thresholds(p, np.array([m], dtype=object), one)[0]) - 1
        if l <= t < u:
            return t
    return (l + u) // 2 if l < u else l


def _apply_one(params, a: int, j: int) -> int:
    row = np.zeros((1, len(params.p)), dtype=np.int64)
    row[0, j] = a
    return int(params.apply(row)[0, j])


def neuron_bab(net: QNetwork, prop: Property, deadline: float | None = None,
               settings: NeuronBabSettings | None = None, bounds: list | None = None,
               disjuncts: list[int] | None = None) -> NeuronBabResult:
    """Decide ``prop`` by neuron-split branch and bound (module docstring). ``bounds``: root bounds of every value
    over the box (one flat ``(lo, hi)`` pair per value, e.g. the optimized stage's), symbolic ones by default;
    ``disjuncts``: the unsafe disjuncts still open (default: all)."""
    if not supports(net):
        raise ValueError("neuron branch and bound needs a chain of Dense and Requantize/Clamp nodes")
    s = settings or NeuronBabSettings()
    with limit_threads(s.threads):
        return _neuron_bab(net, prop, deadline, s, bounds, disjuncts)


def _neuron_bab(net: QNetwork, prop: Property, deadline: float | None, s: NeuronBabSettings, bounds: list | None,
                disjuncts: list[int] | None) -> NeuronBabResult:
    t0 = time.monotonic()
    prop.check_network(net)
    root = _root_flat(net, prop, bounds)
    acts = activation_layers(net)
    R = max(c.A.shape[0] for c in prop.unsafe)
    n_out = prop.num_outputs
    rows_of = np.zeros((len(prop.unsafe), R, n_out), dtype=np.int64)
    rhs_of = np.full((len(prop.unsafe), R), 2**40, dtype=np.int64)  # padded rows never refute
    for d, c in enumerate(prop.unsafe):
        rows_of[d, : len(c.b)] = c.A
        rhs_of[d, : len(c.b)] = c.b
    if np.abs(rows_of).max(initial=0) >= 2**40:
        return NeuronBabResult(Verdict.UNKNOWN, Reason.INCOMPLETE.value, seconds=time.monotonic() - t0)
    open_d = list(range(len(prop.unsafe))) if disjuncts is None else list(disjuncts)
    seq = itertools.count()
    heap: list = []
    for d in open_d:
        heapq.heappush(heap, (-np.inf, next(seq), _Domain(d, {i: root[i] for i in acts}, None, (prop.lo, prop.hi))))
    res = NeuronBabResult(Verdict.UNKNOWN)
    stuck: set[int] = set()

    def finish(verdict: Verdict, reason: str = "", cex: Counterexample | None = None) -> NeuronBabResult:
        res.verdict, res.reason, res.counterexample = verdict, reason, cex
        res.open_disjuncts = sorted({dm.d for _, _, dm in heap} | stuck)
        res.seconds = time.monotonic() - t0
        return res

    while heap:
        if deadline is not None and time.monotonic() >= deadline:
            return finish(Verdict.UNKNOWN, Reason.TIMEOUT.value)
        if len(heap) > s.max_domains:
            return finish(Verdict.UNKNOWN, Reason.MEMORY.value)
        doms = [heapq.heappop(heap)[2] for _ in range(min(s.batch, len(heap)))]
        if s.enumerate_max > 0:
            small = np.array([grid_size(*dm.box) <= s.enumerate_max for dm in doms])
            for k in np.nonzero(small)[0]:
                ce = _enumerate(net, prop, doms[k])
                if ce is not None:
                    return finish(Verdict.COUNTEREXAMPLE, "", ce)
                res.refuted += 1
            doms = [dm for dm, sm in zip(doms, small, strict=True) if not sm]
            if not doms:
                continue
        D = len(doms)
        flat, empty = _propagate(net, root, acts, doms)
        roots = any(dm.choice is None for dm in doms)
        layers = {i: LayerRelax.build(net, i, flat[i][0], flat[i][1], fit=roots) for i in acts}
        rows = rows_of[[dm.d for dm in doms]]
        rhs = rhs_of[[dm.d for dm in doms]]
        fresh = initial_choice(layers, R)
        parts = [dm.choice if dm.choice is not None else fresh.take(np.array([k])) for k, dm in enumerate(doms)]
        choice = Choice.stack(parts)
        steps = s.root_steps if roots else s.steps
        fb = optimize(net, flat, layers, rows, choice, steps, s.lr, deadline, glr=s.glr)
        res.domains += D
        res.rounds += 1
        # candidates: the sign vertex of every domain's and row's final input coefficients
        mu = fb.mu.reshape(D * R, -1)
        blo, bhi = np.repeat(flat[0][0], R, 0), np.repeat(flat[0][1], R, 0)
        cand = np.where(mu > 0, blo, bhi)
        cand = np.where(mu == 0, (blo + bhi) // 2, cand)
        y = forward(net, cand)
        bad = np.nonzero(prop.is_violated(y))[0]
        for b in bad:
            ce = replay(net, prop, cand[b])
            if ce.confirmed:
                ce.note = "neuron-bab: domain vertex" + (f"; {ce.note}" if ce.note else "")
                return finish(Verdict.COUNTEREXAMPLE, "", ce)
        fslack = (fb.lower - rhs).max(axis=1)
        res.history.append((time.monotonic() - t0, res.domains, len(heap), float(fslack.min())))
        try_idx = np.nonzero(fslack > -s.rigor_gap)[0]
        refuted = empty.copy()
        try_idx = try_idx[~empty[try_idx]]
        if len(try_idx):
            low = rigorous_lower(net, flat, layers, rows, fb.choice, try_idx)
            refuted[try_idx] = (low - rhs[try_idx]).max(axis=1) >= 1
        if s.lp > 0:
            from qverify.bounds.lp import domain_lp_lower

            left = np.nonzero(~refuted)[0]
            for k in left[np.argsort(-fslack[left], kind="stable")][: s.lp]:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                for r in range(R):
                    if rhs[k, r] >= 2**40:
                        continue
                    low = domain_lp_lower(net, flat, root, layers, int(k), rows[k, r])
                    res.lp += 1
                    if low - rhs[k, r] >= 1:
                        refuted[k] = True
                        res.lp_refuted += 1
                        break
        res.refuted += int(refuted.sum())
        for k in np.nonzero(~refuted)[0]:
            dm = doms[k]
            best = None
            for i, L in layers.items():
                if not L.unstable[k].any():
                    continue
                fl_ = flat[i + 1][0][k].astype(np.float64)
                fu = flat[i + 1][1][k].astype(np.float64)
                sc = np.abs(fb.act[i][k]).sum(axis=0) * (fu - fl_) * L.unstable[k]
                j = int(np.argmax(sc))
                if sc[j] > 0 and (best is None or sc[j] > best[0]):
                    best = (sc[j], i, j)
            tight = {i: (flat[i][0][k], flat[i][1][k]) for i in acts}  # the domain's bounds, as propagated
            mine = fb.choice.take(np.array([k]))
            key = float(fslack[k])
            if best is None:
                # nothing to split among the neurons: every relaxation is already its constant. Split the input
                # box instead (its widest dimension at the middle); a single point is exact and never gets here
                # unless its bounds are empty (then it was refuted above) or it violates (found above)
                blo, bhi = flat[0][0][k], flat[0][1][k]
                w = bhi - blo
                j = int(np.argmax(w))
                if w[j] == 0:
                    stuck.add(dm.d)
                    continue
                m = int(blo[j] + bhi[j]) // 2
                for a, b in ((int(blo[j]), m), (m + 1, int(bhi[j]))):
                    nlo, nhi = blo.copy(), bhi.copy()
                    nlo[j], nhi[j] = a, b
                    heapq.heappush(heap, (key, next(seq), _Domain(dm.d, tight, mine, (nlo, nhi), dm.depth + 1)))
                res.depth = max(res.depth, dm.depth + 1)
                continue
            _, i, j = best
            L = layers[i]
            lo_i, hi_i = tight[i]
            t = _split_point(L, int(lo_i[j]), int(hi_i[j]), j)
            for a, b in ((int(lo_i[j]), t), (t + 1, int(hi_i[j]))):
                pre = {kk: (vv[0].copy(), vv[1].copy()) if kk == i else vv for kk, vv in tight.items()}
                pre[i][0][j], pre[i][1][j] = a, b
                heapq.heappush(heap, (key, next(seq), _Domain(dm.d, pre, mine, dm.box, dm.depth + 1)))
            res.depth = max(res.depth, dm.depth + 1)
    if stuck:
        return finish(Verdict.UNKNOWN, Reason.INCOMPLETE.value)
    return finish(Verdict.ROBUST)


__all__ = ["NeuronBabResult", "NeuronBabSettings", "neuron_bab"]
