"""Complete branch and bound over integer input boxes (QA-IBP's Algorithm 1, made to terminate).

Invariant: the boxes in the queue cover every integer point of the property's box that is not yet decided, each
point exactly once. Before branching, an attack (:func:`qverify.attack.attack_batch`, ``BabSettings.attack``) runs
on the whole box. Then one round takes a batch of boxes from the top of a stack (depth first) and, per box:

1. **bound** it: exact interval bounds (:func:`qverify.bounds.interval.interval_bounds`); optionally symbolic
   bounds (:func:`qverify.bounds.symbolic.certified_by_symbolic`) for the boxes intervals do not decide. A box
   whose bounds refute every unsafe disjunct holds: it is dropped;
2. **evaluate** candidates on the executor: the box's centre, the *gradient vertex* (``lo`` where the
   straight-through gradient of the worst unsafe row at the centre is positive, ``hi`` where it is negative) and
   the *bound vertex* (the same with the signed linearisation of the network that keeps the neurons the interval
   bounds leave unfixed). A candidate whose outputs lie in the unsafe region is replayed
   (:func:`qverify.replay.replay`) and, once confirmed, is the answer;
3. **split** it on one input dimension ``j`` with ``lo_j < hi_j`` at ``m = floor((lo_j + hi_j) / 2)`` into
   ``[lo_j, m]`` and ``[m + 1, hi_j]``: two non-empty integer boxes that partition the integer points, so no
   point is lost or counted twice (:func:`split_boxes`). A box that is a single point is decided by step 2 (its
   centre is the point; the interval bounds of a point are its exact values) and never split. The children of
   the boxes whose candidates came closest to the unsafe region (exact margin) go on top of the stack;
4. while attacks have taken less than ``attack_share`` of the time so far, a light attack on the
   ``attack_boxes`` most promising boxes of the round.

Every split strictly shrinks a box and single points are never split, so the search terminates; the verdict is
``robust`` only when the queue is empty (and, on a set-valued network (:class:`~qverify.ops.Uncertain`), no single
point was left open by its bounds: its nominal value does not decide it, so the verdict is then ``unknown``
/ ``set-valued``), ``counterexample`` only after replay, ``unknown`` (``timeout``) when the
deadline passes first and ``unknown`` (``memory``) when the queue outgrows ``max_queue`` boxes.

**Split heuristics** (``split=``), scores over the dimensions with ``lo_j < hi_j``, the largest wins (first on
ties). The *worst row* of a box is the unsafe row ``a`` (with right-hand side ``b``) of the disjunct that the
interval bounds are farthest from refuting, taken in that disjunct as the row closest to refuting it.

* ``"widest"``: ``hi_j - lo_j``;
* ``"gradient"``: ``|d(a . u)/dx_j| (hi_j - lo_j)``, the straight-through gradient of the worst row's soft logits
  at the centre (:class:`~qverify.torch_net.TorchNet`) times the width;
* ``"bound"`` (default): the interval bound's own sensitivity. Interval propagation maps input widths ``w`` to output
  widths linearly while the neuron pattern is fixed: ``w_out = |W_L| M_{L-1} ... M_1 |W_1| w`` with ``M_i`` the
  diagonal of ``m_c`` (the requantization multiplier) on neurons the bounds leave unfixed and ``0`` on fixed
  ones. The looseness of the worst row's lower bound is ``|a| . w_out = sum_j c_j w_j`` with
  ``c = |a| |W_L| M ... |W_1|``; ``c_j w_j`` is dimension ``j``'s share, and halving ``w_j`` removes about half of
  it: the estimated bound improvement of splitting ``j`` (BaBSR-style, on the input). Zero scores fall back to
  the width;
* ``"lookahead"``: the ``lookahead`` dimensions of best ``"bound"`` score are split tentatively and both children
  bounded; the dimension whose worse child has the best worst-disjunct score wins (the measured, not estimated,
  bound improvement), and children certified on the way are never queued (:func:`_lookahead`).

Deadlines are absolute :func:`time.monotonic` timestamps (``None``: no limit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from qverify import graph
from qverify.attack import AttackSettings, PaddedRegions, attack_batch
from qverify.bounds.interval import interval_bounds, row_lower_bounds
from qverify.execute import forward, lookup
from qverify.network import (
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    LinearMap,
    Lookup,
    MaxPool2d,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
    Uncertain,
)
from qverify.property import Property
from qverify.replay import replay
from qverify.result import Counterexample, Reason, Result, StageTime, Verdict
from qverify.torch_net import TorchNet, limit_threads

SPLITS = ("bound", "lookahead", "gradient", "widest")


#: the attack run on the whole box before branching (``BabSettings.attack``)
ROOT_ATTACK = AttackSettings(restarts=8, steps=20, local_steps=4, local_starts=1)
#: the light attack run on the most promising open boxes (``BabSettings.attack_share``)
BOX_ATTACK = AttackSettings(restarts=2, steps=10, random_points=0, random_vertices=0, local_steps=0)


@dataclass(frozen=True)
class BabSettings:
    split: str = "bound"          # split heuristic: bound | lookahead | gradient | widest (module docstring)
    lookahead: int = 4            # dimensions (best "bound" scores) whose split is tried per box by "lookahead"
    batch_size: int = 256         # boxes bounded per round
    symbolic: bool = False        # also try symbolic bounds on boxes the intervals do not decide
    attack: AttackSettings | None = ROOT_ATTACK  # attack on the whole box first (None: no attack)
    attack_share: float = 0.1     # light attacks on the most promising open boxes while attacks took less than
    #                               this share of the time so far (0: never)
    attack_boxes: int = 4         # boxes per light attack
    max_queue: int = 2_000_000    # queued boxes before giving up with unknown (memory)
    leak: float = 0.1             # TorchNet clamp leak for the gradient vertex and the gradient split
    threads: int = 1              # numpy/torch threads while searching (0: leave as set; see limit_threads)


@dataclass
class BabStats:
    """Counters of one run (returned in ``Result.details``)."""

    rounds: int = 0
    boxes: int = 0                # boxes bounded
    certified_interval: int = 0   # boxes dropped by interval bounds
    certified_symbolic: int = 0   # boxes dropped by symbolic bounds
    certified_lookahead: int = 0  # children certified while choosing the split (never queued)
    lookahead_boxes: int = 0      # children bounded while choosing splits
    attacks: int = 0              # attack runs (root and boxes)
    points: int = 0               # single-point boxes decided by the executor
    splits: int = 0
    candidates: int = 0           # points evaluated on the executor
    max_queue: int = 0
    seconds_bounds: float = 0.0
    seconds_eval: float = 0.0
    seconds_split: float = 0.0
    seconds_attack: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


# ------------------------------------------------------------------------------------------ bounds per box
def disjunct_scores(prop: Property, ylo: np.ndarray, yhi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact refutation scores from output bounds ``[B, n_out]``.

    ``score[b, d] = max_k (min_{y in box} (A_d y)_k - b_dk)``: disjunct ``d`` is infeasible on box ``b`` iff
    ``score > 0``; the property holds on the box iff every score is positive. Also returns ``krow[b, d]``, the row
    attaining the max (the one closest to refuting ``d``)."""
    B = len(ylo)
    score = np.empty((B, len(prop.unsafe)), dtype=np.int64)
    krow = np.empty((B, len(prop.unsafe)), dtype=np.int64)
    for d, conj in enumerate(prop.unsafe):
        lb = np.asarray(row_lower_bounds(conj.A, ylo, yhi)) - conj.b[None, :]
        k = np.argmax(lb, axis=1)
        krow[:, d] = k
        v = lb[np.arange(B), k]
        score[:, d] = np.clip(v, -(2**62), 2**62).astype(np.int64) if v.dtype == object else v
    return score, krow


class _LinearChain:
    """The network's linear parts for the ``bound`` heuristic and the bound vertex (module docstring), pulled back
    through the graph by :func:`qverify.graph.backward` with the rule table :data:`PULL`.

    Each rule maps rows ``lam [N, *out]`` over a node's output to rows over each of its inputs ``[N, *in_k]``:

    * linear maps: ``L_k^T lam`` (``|L_k|^T lam`` with ``absolute``), the op's own :meth:`transpose`, so a residual
      branch's rows add up where the branches meet;
    * requantization: ``m_c lam`` on the neurons the bounds leave unfixed (``lo < hi``), ``0`` on fixed ones
      (``m_c = p_c / q_c``, the slope with which interval widths pass the rounding); clamp: the 0/1 mask alone;
    * step functions: the secant slope ``(f(hi) - f(lo)) / (hi - lo)`` of the neuron over its input bounds
      (exactly the factor by which interval propagation maps the input width to the output width), ``0`` when
      fixed;
    * lookup tables (any function): with ``absolute`` the width ratio ``(y_hi - y_lo) / (x_hi - x_lo)`` of the
      interval bounds (as for a step function); signed, the table's secant ``(f(x_hi) - f(x_lo)) / (x_hi - x_lo)``
      between the input's ends (a heuristic direction for the bound vertex; a non-monotone table has no sign);
    * max pooling: ``lam`` goes to the cell of largest upper bound of each window whose output is unfixed (first on
      ties): the subgradient of the interval upper bound ``max_j hi_j``; ``0`` for a fixed output.
    """

    def __init__(self, net: QNetwork) -> None:
        self.net = net

    def coefficients(self, rows: np.ndarray, ivb: list, idx: np.ndarray, absolute: bool) -> np.ndarray:
        """``rows [B, n_out]`` pulled back to the input, ``[B, n]``: ``rows^T W_L M ... W_1`` over the graph
        (``absolute``: with ``|rows|`` and ``|W|``). ``M`` keeps the neurons that the bounds ``ivb`` (of boxes
        ``idx``) leave unfixed."""
        net = self.net
        part = "abs" if absolute else "w"
        r = np.asarray(rows, dtype=np.float64)
        seed = (np.abs(r) if absolute else r).reshape(len(idx), *net.shapes[-1])

        def pull(i: int, op: object, lam: np.ndarray) -> list[np.ndarray]:
            return graph.rule(PULL, op, "branch and bound coefficients")(net, i, op, lam, ivb, idx, part)

        rows_at = graph.backward(net, len(net.layers), seed, pull, lambda j, a, b: a + b)
        out = rows_at.get(0)
        if out is None:  # the output does not depend on the input
            return np.zeros((len(idx), net.num_inputs))
        return np.asarray(out).reshape(len(idx), -1)


def _unfixed(ivb: list, value: int, idx: np.ndarray) -> np.ndarray:
    lo, hi = ivb[value]
    return (lo[idx] < hi[idx]).astype(np.float64)


def _pull_linear(net: QNetwork, i: int, op: LinearMap, lam: np.ndarray, ivb: list, idx: np.ndarray,
                 part: str) -> list[np.ndarray]:
    return op.transpose(lam, net.in_shapes(i), part)


def _channels(t: np.ndarray, ndim: int) -> np.ndarray:
    return t.reshape(()) if t.size == 1 else t.reshape((1, -1) + (1,) * (ndim - 2))


def _pull_requantize(net: QNetwork, i: int, op: Requantize, lam: np.ndarray, ivb: list, idx: np.ndarray,
                     part: str) -> list[np.ndarray]:
    m = np.array([n / d for n, d in zip(op.num, op.den, strict=True)], dtype=np.float64)
    return [lam * _channels(m, lam.ndim) * _unfixed(ivb, i + 1, idx)]


def _pull_clamp(net: QNetwork, i: int, op: Clamp, lam: np.ndarray, ivb: list, idx: np.ndarray,
                part: str) -> list[np.ndarray]:
    return [lam * _unfixed(ivb, i + 1, idx)]


def _pull_step(net: QNetwork, i: int, op: Step, lam: np.ndarray, ivb: list, idx: np.ndarray,
               part: str) -> list[np.ndarray]:
    (value,) = net.node_inputs(i)
    xlo, xhi = (b[idx].astype(np.float64) for b in ivb[value])
    ylo, yhi = (b[idx].astype(np.float64) for b in ivb[i + 1])
    width = xhi - xlo
    slope = np.divide(yhi - ylo, width, out=np.zeros_like(width), where=width > 0)
    return [lam * slope]


def _pull_lookup(net: QNetwork, i: int, op: Lookup, lam: np.ndarray, ivb: list, idx: np.ndarray,
                 part: str) -> list[np.ndarray]:
    (value,) = net.node_inputs(i)
    xlo, xhi = (b[idx] for b in ivb[value])
    width = (xhi - xlo).astype(np.float64)
    if part == "abs":  # the interval width ratio, as for a step function
        rise = (ivb[i + 1][1][idx] - ivb[i + 1][0][idx]).astype(np.float64)
    else:  # the signed secant of the table between the input's ends
        rise = (lookup(op, xhi) - lookup(op, xlo)).astype(np.float64)
    return [lam * np.divide(rise, width, out=np.zeros_like(width), where=width > 0)]


def _pull_max_pool(net: QNetwork, i: int, op: MaxPool2d, lam: np.ndarray, ivb: list, idx: np.ndarray,
                   part: str) -> list[np.ndarray]:
    (value,) = net.node_inputs(i)
    in_shape = net.shapes[value]
    n = len(lam)
    win = op.window_indices(in_shape).reshape(-1, int(np.prod(op.kernel)))  # [n_out, K], -1: padded
    hi = ivb[value][1][idx].reshape(n, -1).astype(np.float64)
    cell_hi = np.where(win[None] >= 0, hi[:, np.maximum(win, 0)], -np.inf)  # [N, n_out, K]
    best = np.take_along_axis(np.broadcast_to(win, cell_hi.shape), cell_hi.argmax(axis=-1)[..., None], -1)[..., 0]
    weight = (lam * _unfixed(ivb, i + 1, idx)).reshape(n, -1)
    out = np.zeros((n, int(np.prod(in_shape))), dtype=np.float64)
    np.add.at(out, (np.arange(n)[:, None], best), weight)
    return [out.reshape(n, *in_shape)]


#: the coefficient pull-back table of :class:`_LinearChain`: ``rule(net, node, op, rows, bounds, boxes, part)``
PULL = {Dense: _pull_linear, Conv2d: _pull_linear, SumPool2d: _pull_linear, Add: _pull_linear,
        Flatten: _pull_linear, Reshape: _pull_linear, Transpose: _pull_linear, Pad: _pull_linear,
        Concat: _pull_linear, Requantize: _pull_requantize, Clamp: _pull_clamp, Step: _pull_step,
        Lookup: _pull_lookup, MaxPool2d: _pull_max_pool, Uncertain: lambda net, i, op, lam, ivb, idx, part: [lam]}


def split_boxes(lo: np.ndarray, hi: np.ndarray, dim: np.ndarray
                ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Split boxes ``[B, n]`` on ``dim [B]`` (where ``lo < hi``) at ``m = floor((lo + hi) / 2)``: children
    ``[lo, m]`` and ``[m + 1, hi]``, non-empty, disjoint, and together holding exactly the parent's integer
    points."""
    rr = np.arange(len(lo))
    if np.any(lo[rr, dim] >= hi[rr, dim]):
        raise ValueError("split dimension of zero width")
    mid = (lo[rr, dim] + hi[rr, dim]) // 2
    left_hi = hi.copy()
    left_hi[rr, dim] = mid
    right_lo = lo.copy()
    right_lo[rr, dim] = mid + 1
    return (lo, left_hi), (right_lo, hi)


def _lookahead(net: QNetwork, prop: Property, lo: np.ndarray, hi: np.ndarray, sc: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split choice by exact look-ahead: for each box, among the ``k`` dimensions of best score ``sc`` (``> 0``),
    bound both children of each split and keep the dimension whose worse child has the best worst-disjunct score
    (a certified child counts as the best possible), ties broken by the better child.

    Returns the dimensions ``[B]`` and whether the left / right child of that split is certified ``[B]``."""
    B, n = lo.shape
    k = max(1, min(k, n))
    cand = np.argsort(-sc, axis=1, kind="stable")[:, :k]  # [B, k]
    valid = np.take_along_axis(sc, cand, axis=1) > 0
    valid[:, 0] = True  # the best dimension is splittable (score > 0, or the width fallback)
    dims = np.where(valid, cand, cand[:, :1]).reshape(-1)
    (l1, h1), (l2, h2) = split_boxes(np.repeat(lo, k, axis=0), np.repeat(hi, k, axis=0), dims)
    cl, ch = np.concatenate([l1, l2]), np.concatenate([h1, h2])
    ivb = interval_bounds(net, cl, ch)
    score, _ = disjunct_scores(prop, ivb[-1][0].reshape(len(cl), -1), ivb[-1][1].reshape(len(cl), -1))
    worst = score.min(axis=1)
    ok = worst > 0
    worst = np.minimum(worst, 1)  # every certified child is as good as any other
    w1, w2 = worst[:B * k].reshape(B, k), worst[B * k:].reshape(B, k)
    lo_w, hi_w = np.minimum(w1, w2), np.maximum(w1, w2)
    lo_w = np.where(valid, lo_w, np.iinfo(np.int64).min)
    # lexicographic argmax of (worse child, better child), first candidate on ties
    best = np.lexsort((-np.arange(k)[None].repeat(B, 0), hi_w, lo_w), axis=1)[:, -1]
    rr = np.arange(B)
    ok1, ok2 = ok[:B * k].reshape(B, k), ok[B * k:].reshape(B, k)
    return cand[rr, best], ok1[rr, best], ok2[rr, best]


# ------------------------------------------------------------------------------------------------- search
def bab(net: QNetwork, prop: Property, deadline: float | None = None, split: str | None = None,
        settings: BabSettings | None = None, torch_net: TorchNet | None = None) -> Result:
    """Decide ``prop`` on ``net`` by branch and bound over integer boxes (module docstring).

    ``split`` overrides ``settings.split``. Returns a :class:`~qverify.result.Result` with method ``"bab"``:
    ``robust`` (queue exhausted), ``counterexample`` (replayed), ``unknown`` (``timeout`` / ``memory``);
    ``details`` holds the counters of :class:`BabStats`.
    """
    s = settings or BabSettings()
    split = split or s.split
    if split not in SPLITS:
        raise ValueError(f"unknown split heuristic {split!r} (known: {', '.join(SPLITS)})")
    prop.check_network(net)
    with limit_threads(s.threads):
        return _bab(net, prop, deadline, split, s, torch_net)


def _bab(net: QNetwork, prop: Property, deadline: float | None, split: str, s: BabSettings,
         torch_net: TorchNet | None) -> Result:
    t0 = time.monotonic()
    st = BabStats()
    tn = torch_net if torch_net is not None else TorchNet(net, leak=s.leak)
    chain = _LinearChain(net)
    regions = PaddedRegions.of([prop])
    n = net.num_inputs
    dtype = np.int32 if -(2**31) <= net.input_lo and net.input_hi < 2**31 else np.int64
    stack_lo = [prop.lo.astype(dtype)[None]]
    stack_hi = [prop.hi.astype(dtype)[None]]
    queued = 1
    undecided_points = False

    def finish(verdict: Verdict, reason: str = "", ce: Counterexample | None = None) -> Result:
        dt = time.monotonic() - t0
        st.extra["queue_left"] = queued
        outcome = verdict.value if not reason else f"{verdict.value} ({reason})"
        return Result(verdict, "bab", dt, reason=reason, counterexample=ce,
                      stages=[StageTime(f"bab/{split}", dt, outcome)], details={"split": split, **st.as_dict()})

    def run_attack(boxes_lo: np.ndarray, boxes_hi: np.ndarray, a: AttackSettings) -> Counterexample | None:
        st.attacks += 1
        sub = [Property(lo_, hi_, prop.unsafe, name=prop.name) for lo_, hi_ in zip(boxes_lo, boxes_hi, strict=True)]
        for ce in attack_batch(net, sub, a, deadline, tn):
            if ce is not None:
                ce = replay(net, prop, ce.x)  # confirmed against the property itself
                if ce.confirmed:
                    ce.note = "bab: attack on a box"
                    return ce
        return None

    if s.attack is not None and not _expired(deadline):
        ta = time.monotonic()
        ce = run_attack(prop.lo[None], prop.hi[None], s.attack)
        st.seconds_attack += time.monotonic() - ta
        if ce is not None:
            return finish(Verdict.COUNTEREXAMPLE, ce=ce)

    while queued:
        if _expired(deadline):
            return finish(Verdict.UNKNOWN, Reason.TIMEOUT.value)
        # pop up to batch_size boxes from the top of the stack (depth first)
        take_lo, take_hi, need = [], [], s.batch_size
        while need and stack_lo:
            a, b = stack_lo[-1], stack_hi[-1]
            if len(a) <= need:
                take_lo.append(stack_lo.pop())
                take_hi.append(stack_hi.pop())
                need -= len(a)
            else:
                take_lo.append(a[-need:])
                take_hi.append(b[-need:])
                stack_lo[-1], stack_hi[-1] = a[:-need], b[:-need]
                need = 0
        L = np.concatenate(take_lo).astype(np.int64)
        H = np.concatenate(take_hi).astype(np.int64)
        queued -= len(L)
        st.rounds += 1
        st.boxes += len(L)

        # 1. bounds
        tb = time.monotonic()
        ivb = interval_bounds(net, L, H)
        score, krow = disjunct_scores(prop, ivb[-1][0].reshape(len(L), -1), ivb[-1][1].reshape(len(L), -1))
        open_ = ~np.all(score > 0, axis=1)
        st.certified_interval += int((~open_).sum())
        if s.symbolic and open_.any() and not _expired(deadline):
            from qverify.bounds.symbolic import certified_by_symbolic

            idx = np.nonzero(open_)[0]
            ok = certified_by_symbolic(net, prop, boxes=(L[idx], H[idx]))
            open_[idx[ok]] = False
            st.certified_symbolic += int(ok.sum())
        st.seconds_bounds += time.monotonic() - tb
        idx = np.nonzero(open_)[0]
        if len(idx) == 0:
            continue

        # 2. candidates: centre, gradient vertex, bound vertex
        te = time.monotonic()
        Li, Hi = L[idx], H[idx]
        worst_d = np.argmin(score[idx], axis=1)
        rows = np.stack([prop.unsafe[d].A[krow[i, d]] for i, d in zip(idx, worst_d, strict=True)])
        centre = (Li + Hi) // 2
        xg = torch.as_tensor(centre, dtype=torch.float64).requires_grad_(True)
        vals = tn.layer_values(xg)
        u = tn.soft_logits(vals, clamp=False)
        (grad,) = torch.autograd.grad((u * torch.as_tensor(rows, dtype=torch.float64)).sum(), xg)
        g = grad.numpy()
        y_centre = vals[-1].detach().numpy().reshape(len(idx), -1).astype(np.int64)
        gvert = np.where(g > 0, Li, np.where(g < 0, Hi, centre))
        c_signed = chain.coefficients(rows, ivb, idx, absolute=False)
        bvert = np.where(c_signed > 0, Li, np.where(c_signed < 0, Hi, centre))
        cands = np.stack([centre, gvert, bvert], axis=1)  # [b, 3, n]
        ys = np.concatenate([y_centre[:, None], forward(net, cands[:, 1:].reshape(-1, n)).reshape(len(idx), 2, -1)],
                            axis=1)
        st.candidates += 3 * len(idx)
        cm = regions.margins(ys.reshape(1, -1, ys.shape[-1]))[0].min(axis=1).reshape(len(idx), 3)
        cand_margin = cm.min(axis=1)  # exact: how close the box's best candidate came to the unsafe region
        for i, r in zip(*np.nonzero(cm <= 0), strict=True):
            ce = replay(net, prop, cands[i, r])
            if ce.confirmed:
                ce.note = f"bab: {('centre', 'gradient vertex', 'bound vertex')[r]} of a box" + (
                    f"; {ce.note}" if ce.note else "")
                st.seconds_eval += time.monotonic() - te
                return finish(Verdict.COUNTEREXAMPLE, ce=ce)
        st.seconds_eval += time.monotonic() - te

        # 3. split (single points are decided: their centre is the point and it is safe)
        ts = time.monotonic()
        width = Hi - Li
        point = ~np.any(width > 0, axis=1)
        st.points += int(point.sum())
        # a set-valued network's point is not decided by its nominal value: the bounds left it open
        undecided_points = undecided_points or (net.set_valued and bool(point.any()))
        keep = np.nonzero(~point)[0]
        if len(keep):
            Lk, Hk, wk = Li[keep], Hi[keep], width[keep]
            if split == "widest":
                sc = wk.astype(np.float64)
            elif split == "gradient":
                sc = np.abs(g[keep]) * wk
            else:
                sc = chain.coefficients(rows[keep], ivb, idx[keep], absolute=True) * wk
            sc = np.where(wk > 0, sc, -1.0)
            flat = np.all(sc <= 0, axis=1)  # no sensitivity: fall back to the widest dimension
            sc[flat] = np.where(wk[flat] > 0, wk[flat], -1.0)
            ok1 = ok2 = np.zeros(len(keep), dtype=bool)
            if split == "lookahead":
                dims, ok1, ok2 = _lookahead(net, prop, Lk, Hk, sc, s.lookahead)
                st.lookahead_boxes += 2 * len(keep) * min(s.lookahead, n)
                st.certified_lookahead += int(ok1.sum() + ok2.sum())
            else:
                dims = np.argmax(sc, axis=1)
            (l1, h1), (l2, h2) = split_boxes(Lk, Hk, dims)
            st.splits += len(keep)
            # the most promising boxes (smallest candidate margin) go on top of the stack, each box's left child
            # above its right one; children certified by the look-ahead are not queued
            order = np.argsort(-cand_margin[keep], kind="stable")
            kids_lo = np.stack([l2[order], l1[order]], axis=1).reshape(-1, n)
            kids_hi = np.stack([h2[order], h1[order]], axis=1).reshape(-1, n)
            alive = ~np.stack([ok2[order], ok1[order]], axis=1).reshape(-1)
            stack_lo.append(kids_lo[alive].astype(dtype))
            stack_hi.append(kids_hi[alive].astype(dtype))
            queued += int(alive.sum())
            st.max_queue = max(st.max_queue, queued)
        st.seconds_split += time.monotonic() - ts
        if queued > s.max_queue:
            return finish(Verdict.UNKNOWN, Reason.MEMORY.value)

        # 4. now and then, a light attack on the most promising open boxes
        if (len(keep) and st.seconds_attack < s.attack_share * (time.monotonic() - t0)
                and not _expired(deadline)):
            ta = time.monotonic()
            top = keep[np.argsort(cand_margin[keep], kind="stable")[:s.attack_boxes]]
            ce = run_attack(Li[top], Hi[top], BOX_ATTACK)
            st.seconds_attack += time.monotonic() - ta
            if ce is not None:
                return finish(Verdict.COUNTEREXAMPLE, ce=ce)
    if undecided_points:
        return finish(Verdict.UNKNOWN, Reason.SET_VALUED.value)
    return finish(Verdict.ROBUST)
