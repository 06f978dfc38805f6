"""Counterexample search on the integer network: centre check, random and vertex search, PGD through a
straight-through estimator projected onto the integer box, then a greedy coordinate search. Every candidate is
replayed on the executor; only a confirmed witness is returned, so an attack can only ever *falsify*.

Loss. A property's unsafe region is ``OR_d (A_d y <= b_d)``. With ``v_dk(y) = (A_d y - b_d)_k`` the output ``y`` is
unsafe iff ``min_d max_k v_dk(y) <= 0``. PGD minimizes a smooth version with temperature ``T``::

    untargeted:   loss(u) = softmin_d^T  softmax_k^T  v_dk(u)       targeted at d:   loss(u) = softmax_k^T v_dk(u)
    softmax^T(v) = T log sum exp(v / T),  softmin^T(v) = -softmax^T(-v)

evaluated on the *soft logits* ``u`` (:meth:`~qverify.torch_net.TorchNet.soft_logits`: the last layer's
``acc m + z`` before its rounding, clamped to ``[lo - 1/2, hi + 1/2]`` or not clamped at all) of the exact
integer network, whose gradient is the straight-through estimator. ``T -> 0`` gives the exact margin; a larger ``T``
spreads the gradient over the nearly-worst disjuncts, which keeps gradients alive on integer logits.

Restarts (all restarts of all properties run as one batch). Restart ``r`` uses the clamped soft logits when ``r``
is even and the unclamped ones when ``r`` is odd (a tie at a saturated top logit is found by the first, a saturated
label logit that must come down by the second); restarts 0 and 1 start at the centre and are untargeted, restarts
``2j, 2j + 1`` target the ``j``-th most promising disjunct at the centre (when there is one) and start at a uniform
random grid point and a random vertex of the box.

Iterates. Each restart keeps a continuous iterate ``z`` in the real box ``[lo, hi]``; the evaluated point is its
nearest grid point ``x = round(z)``, whose network output is exact. A step is ``z <- clip(z - a_t sign(grad), lo,
hi)`` with a per-dimension step ``a_t = s_t (hi - lo)`` decaying linearly from ``step_size`` to a tenth of it. At
every step the *sign-gradient vertex* (``lo`` where the gradient is positive, ``hi`` where it is negative, ``x``
where it is zero) is evaluated too: on nearly linear regions the worst point of a box is a vertex.

Local search. The sign-gradient walk stalls on vertices where the rounding of hidden neurons makes the network
non-linear below one grid step; from the best points of the best restarts a greedy coordinate descent on the same
loss evaluates every one-coordinate move (to ``lo``, ``hi``, ``x +- 1, 2, 4`` and the midpoints) exactly and takes
the best strictly improving one.

Deadlines are absolute :func:`time.monotonic` timestamps (``None``: no limit).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from qverify.execute import forward
from qverify.network import LinearMap, QNetwork
from qverify.property import Property
from qverify.quant import FLOAT64_EXACT
from qverify.replay import replay
from qverify.result import Counterexample, Reason, Result, StageTime, Verdict
from qverify.settings import VerifySettings
from qverify.torch_net import TorchNet, limit_threads, ste_round

_BIG = 1e9


@dataclass(frozen=True)
class AttackSettings:
    restarts: int = 8            # PGD restarts per property (see the module docstring for their starts and targets)
    steps: int = 40              # PGD steps per restart
    step_size: float = 0.25      # first step as a fraction of each dimension's box width (decays to a tenth)
    temperature: float = 1.0     # T of the smooth max/min of the margin (output units)
    leak: float = 0.1            # gradient leak through saturated clamps (0: plain straight-through clamp)
    random_points: int = 16      # uniform random grid points per property, checked before PGD
    random_vertices: int = 16    # random box vertices per property, checked before PGD
    local_steps: int = 8         # greedy coordinate-descent moves per local-search start
    local_starts: int = 4        # local searches per unfound property (from its best restarts' best points)
    local_rows: int = 16384      # neighbours per local-search iteration (10 per coordinate; fewer coordinates if
    #                              the input is larger: a random subset each iteration)
    seed: int = 0                # seed of every random choice (determinism)
    max_rows: int = 4096         # rows (restarts x properties) per batched forward pass
    threads: int = 1             # numpy/torch threads while attacking (0: leave as set; small batches run best
    #                              on one thread)

    @classmethod
    def from_verify(cls, s: VerifySettings) -> AttackSettings:
        """Restarts, steps and seed from the verification settings; the rest default."""
        return cls(restarts=s.attack_restarts, steps=s.attack_steps, seed=s.seed)


def _settings(s: AttackSettings | VerifySettings | None) -> AttackSettings:
    if s is None:
        return AttackSettings()
    if isinstance(s, VerifySettings):
        return AttackSettings.from_verify(s)
    return s


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def center_of(prop: Property) -> np.ndarray:
    """The property's centre when it lies in the box, else the box midpoint ``floor((lo + hi) / 2)``."""
    if prop.center is not None and prop.center.size == prop.num_inputs and prop.contains(prop.center)[0]:
        return prop.center.copy()
    return (prop.lo + prop.hi) // 2


@dataclass
class PaddedRegions:
    """The unsafe regions of ``P`` properties padded to a common shape ``[P, D, K]``.

    ``A [P, D, K, n_out]`` and ``b [P, D, K]`` (int64), ``row_mask [P, D, K]`` (real rows), ``dis_mask [P, D]``
    (real disjuncts). Padded rows never bind, padded disjuncts never hold.
    """

    A: np.ndarray
    b: np.ndarray
    row_mask: np.ndarray
    dis_mask: np.ndarray

    @classmethod
    def of(cls, props: Sequence[Property]) -> PaddedRegions:
        P = len(props)
        D = max(len(p.unsafe) for p in props)
        K = max(c.A.shape[0] for p in props for c in p.unsafe)
        n_out = props[0].num_outputs
        A = np.zeros((P, D, K, n_out), dtype=np.int64)
        b = np.zeros((P, D, K), dtype=np.int64)
        rm = np.zeros((P, D, K), dtype=bool)
        dm = np.zeros((P, D), dtype=bool)
        for i, p in enumerate(props):
            for d, c in enumerate(p.unsafe):
                k = c.A.shape[0]
                A[i, d, :k], b[i, d, :k], rm[i, d, :k] = c.A, c.b, True
                dm[i, d] = True
        return cls(A, b, rm, dm)

    def take(self, idx: np.ndarray) -> PaddedRegions:
        return PaddedRegions(self.A[idx], self.b[idx], self.row_mask[idx], self.dis_mask[idx])

    def margins(self, y: np.ndarray) -> np.ndarray:
        """Exact ``max_k v_dk(y)`` per disjunct, ``[P, R, D]`` int64 (padded disjuncts: a huge value) for integer
        outputs ``y [P, R, n_out]``; the row is unsafe iff some entry is ``<= 0``."""
        P, R, o = y.shape
        D, K = self.b.shape[1:]
        At = np.ascontiguousarray(self.A.reshape(P, D * K, o).transpose(0, 2, 1))
        ymax = int(np.abs(y).max()) if y.size else 0
        if ymax * int(np.abs(self.A).sum(axis=3).max(initial=0)) < FLOAT64_EXACT:  # every partial sum exact
            y, At = y.astype(np.float64), At.astype(np.float64)
        v = (y[0] @ At[0])[None] if P == 1 else np.matmul(y, At)
        v = v.astype(np.int64).reshape(P, R, D, K) - self.b[:, None]
        if not self.row_mask.all():
            v = np.where(self.row_mask[:, None], v, np.iinfo(np.int64).min)
        m = v.max(axis=3) if K > 1 else v[..., 0]
        if not self.dis_mask.all():
            m = np.where(self.dis_mask[:, None], m, np.iinfo(np.int64).max)
        return m

    def violated(self, y: np.ndarray) -> np.ndarray:
        """Exact: ``y [P, R, n_out]`` int64 -> bool ``[P, R]``, whether each row is in its property's region."""
        return np.any(self.margins(y) <= 0, axis=2)

    def loss(self, u: torch.Tensor, temperature: float, target: torch.Tensor | None = None) -> torch.Tensor:
        """Smooth margin ``[P, R]`` of float outputs ``u [P, R, n_out]`` (module docstring); ``target [P, R]``
        holds the targeted disjunct of each row, ``-1`` for untargeted."""
        P, R, o = u.shape
        D, K = self.b.shape[1:]
        A = torch.from_numpy(self.A.reshape(P, D * K, o).astype(np.float64))
        v = (torch.matmul(u, A.transpose(1, 2)).reshape(P, R, D, K)
             - torch.from_numpy(self.b.astype(np.float64))[:, None])
        v = torch.where(torch.from_numpy(self.row_mask)[:, None], v, torch.full_like(v, -_BIG))
        t = float(temperature)
        dis = t * torch.logsumexp(v / t, dim=3) if K > 1 else v[..., 0]
        dis = torch.where(torch.from_numpy(self.dis_mask)[:, None], dis, torch.full_like(dis, _BIG))
        out = -t * torch.logsumexp(-dis / t, dim=2)
        if target is not None:
            tgt = torch.gather(dis, 2, target.clamp(min=0)[..., None])[..., 0]
            out = torch.where(target >= 0, tgt, out)
        return out


class _Nearest:
    """Per property, the evaluated grid point of least exact slack (``Property.slack``) and that slack."""

    def __init__(self, starts: np.ndarray) -> None:
        self.x = np.array(starts, dtype=np.int64, copy=True)  # [P, n]
        self.slack = np.full(len(starts), np.iinfo(np.int64).max, dtype=np.int64)

    def note(self, pids: np.ndarray, pts: np.ndarray, margins: np.ndarray) -> None:
        """Points ``pts [P_act, R, n]`` of properties ``pids`` with exact per-disjunct margins ``[P_act, R, D]``."""
        if not margins.size:
            return
        s = margins.min(axis=2)  # [P_act, R]: the slack of each point
        r = np.argmin(s, axis=1)
        val = s[np.arange(len(s)), r]
        better = val < self.slack[pids]
        if better.any():
            self.slack[pids[better]] = val[better]
            self.x[pids[better]] = pts[np.nonzero(better)[0], r[better]]


@dataclass
class AttackReport:
    """What a batched attack found, per property: ``found`` (a counterexample confirmed by replay, or ``None``)
    and the *nearest miss*, the evaluated grid point ``x [P, n]`` of least exact slack ``slack [P]`` (int64;
    ``Property.slack``: ``<= 0`` exactly for the found ones). The nearest miss bounds the property's least slack
    from above; it proves nothing about robustness."""

    found: list[Counterexample | None]
    slack: np.ndarray
    x: np.ndarray


def _confirm(net: QNetwork, prop: Property, x: np.ndarray, how: str) -> Counterexample | None:
    ce = replay(net, prop, x)
    if not ce.confirmed:
        return None
    ce.note = f"attack: {how}" + (f"; {ce.note}" if ce.note else "")
    return ce


def _record(net: QNetwork, props: Sequence[Property], found: list, pids: np.ndarray, cands: np.ndarray,
            hit: np.ndarray, how: str) -> None:
    """Replay the flagged candidates ``cands[i, r]`` (``hit[i, r]``) of properties ``pids[i]``."""
    for i, r in zip(*np.nonzero(hit), strict=True):
        p = int(pids[i])
        if found[p] is None:
            found[p] = _confirm(net, props[p], cands[i, r], f"{how} (row {r})")


def _check_points(net: QNetwork, props: Sequence[Property], regions: PaddedRegions, found: list,
                  nearest: _Nearest, active: np.ndarray, pts: np.ndarray, how: str, max_rows: int) -> np.ndarray:
    """Evaluate ``pts [P_act, R, n]`` (one group per active property) exactly; replay and record hits.

    Returns the exact per-disjunct margins ``[P_act, R, D]``."""
    P, R, n = pts.shape
    step = max(1, max_rows // max(R, 1))
    out = []
    for s in range(0, P, step):
        sl = slice(s, s + step)
        y = forward(net, pts[sl].reshape(-1, n)).reshape(-1, R, net.num_outputs)
        m = regions.take(active[sl]).margins(y)
        _record(net, props, found, active[sl], pts[sl], np.any(m <= 0, axis=2), how)
        nearest.note(active[sl], pts[sl], m)
        out.append(m)
    return np.concatenate(out) if out else np.zeros((0, R, regions.b.shape[1]), dtype=np.int64)


def attack_batch(net: QNetwork, props: Sequence[Property], settings: AttackSettings | VerifySettings | None = None,
                 deadline: float | None = None, torch_net: TorchNet | None = None,
                 stats: dict | None = None) -> list[Counterexample | None]:
    """Search counterexamples for many properties of one network at once (batched restarts).

    Returns, per property, a counterexample confirmed by :func:`qverify.replay.replay` or ``None`` (nothing found,
    which proves nothing). ``stats`` (optional) receives the phase that found each witness and the time spent.
    """
    return attack_report(net, props, settings, deadline, torch_net, stats).found


def attack_report(net: QNetwork, props: Sequence[Property], settings: AttackSettings | VerifySettings | None = None,
                  deadline: float | None = None, torch_net: TorchNet | None = None,
                  stats: dict | None = None) -> AttackReport:
    """:func:`attack_batch` with each property's nearest miss (:class:`AttackReport`)."""
    s = _settings(settings)
    with limit_threads(s.threads):
        return _attack_batch(net, props, s, deadline, torch_net, stats)


def _attack_batch(net: QNetwork, props: Sequence[Property], s: AttackSettings, deadline: float | None,
                  torch_net: TorchNet | None, stats: dict | None) -> AttackReport:
    t0 = time.monotonic()
    props = list(props)
    found: list[Counterexample | None] = [None] * len(props)
    if not props:
        return AttackReport(found, np.zeros(0, dtype=np.int64), np.zeros((0, net.num_inputs), dtype=np.int64))
    for p in props:
        p.check_network(net)
    rng = np.random.default_rng(s.seed)
    regions = PaddedRegions.of(props)
    lo_all = np.stack([p.lo for p in props])
    hi_all = np.stack([p.hi for p in props])
    n = net.num_inputs

    def active_ids() -> np.ndarray:
        return np.array([i for i, f in enumerate(found) if f is None], dtype=np.int64)

    # 1. centre of every box (its margins rank the disjuncts for the targeted restarts)
    centers = np.stack([center_of(p) for p in props])
    nearest = _Nearest(centers)
    center_margins = _check_points(net, props, regions, found, nearest, np.arange(len(props)), centers[:, None],
                                   "centre", s.max_rows)[:, 0]
    # 2. random grid points and random vertices
    act = active_ids()
    if len(act) and (s.random_points or s.random_vertices) and not _expired(deadline):
        lo, hi = lo_all[act][:, None], hi_all[act][:, None]
        u = rng.random((len(act), s.random_points, n))
        pts = np.minimum(lo + np.floor(u * (hi - lo + 1)).astype(np.int64), hi)
        vert = np.where(rng.random((len(act), s.random_vertices, n)) < 0.5, lo, hi)
        _check_points(net, props, regions, found, nearest, act, np.concatenate([pts, vert], axis=1),
                      "random search", s.max_rows)
    # 3. PGD, chunks of properties so that a chunk's restarts fit in max_rows
    tn = torch_net if torch_net is not None else TorchNet(net, leak=s.leak)
    R = max(1, s.restarts)
    targets = _targets(center_margins, R)
    best_x = np.repeat(centers[:, None], R, axis=1)  # [P, R, n]: best point seen by each restart
    best_loss = np.full((len(props), R), np.inf)
    act = active_ids()
    chunk = max(1, s.max_rows // R)
    steps_done = 0
    for c0 in range(0, len(act), chunk):
        if _expired(deadline) or s.steps <= 0:
            break
        steps_done += _pgd_chunk(tn, props, regions, found, nearest, act[c0:c0 + chunk], lo_all, hi_all, centers,
                                 targets, rng, s, deadline, best_x, best_loss)
    # 4. local search from the best restarts of the properties still open, most promising first
    act = active_ids()
    local_iters = 0
    if len(act) and s.local_steps > 0 and s.local_starts > 0 and not _expired(deadline):
        local_iters = _local_search(tn, props, regions, found, nearest, act, lo_all, hi_all, best_x, targets, rng,
                                    s, deadline)
    if stats is not None:
        stats.update({"seconds": time.monotonic() - t0, "pgd_steps": steps_done, "local_iterations": local_iters,
                      "found": sum(f is not None for f in found),
                      "phases": [f.note.split(";")[0].removeprefix("attack: ") if f is not None else None
                                 for f in found]})
    return AttackReport(found, nearest.slack, nearest.x)


def _targets(center_margins: np.ndarray, R: int) -> np.ndarray:
    """``[P, R]`` targeted disjunct per restart: ``-1`` for restarts 0, 1; the ``j``-th best disjunct at the
    centre for restarts ``2j, 2j + 1`` (``-1`` when there are fewer disjuncts)."""
    P, D = center_margins.shape
    order = np.argsort(center_margins, axis=1, kind="stable")
    real = np.take_along_axis(center_margins < np.iinfo(np.int64).max, order, axis=1)
    out = np.full((P, R), -1, dtype=np.int64)
    for r in range(2, R):
        j = r // 2 - 1
        if j < D:
            out[:, r] = np.where(real[:, j], order[:, j], -1)
    return out


def _evaluate(tn: TorchNet, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Exact integer outputs, clamped and unclamped soft logits ``[B, n_out]`` of integer inputs ``[B, n]``."""
    with torch.no_grad():
        vals = tn.layer_values(torch.as_tensor(x, dtype=torch.float64))
        y = vals[-1].reshape(vals[-1].shape[0], -1)
        return y.numpy().astype(np.int64), tn.soft_logits(vals), tn.soft_logits(vals, clamp=False)


def _pgd_chunk(tn: TorchNet, props: Sequence[Property], regions: PaddedRegions, found: list, nearest: _Nearest,
               ids: np.ndarray, lo_all: np.ndarray, hi_all: np.ndarray, centers: np.ndarray, targets: np.ndarray,
               rng: np.random.Generator, s: AttackSettings, deadline: float | None,
               best_x: np.ndarray, best_loss: np.ndarray) -> int:
    """PGD with ``s.restarts`` restarts for the properties ``ids``; returns the number of steps run.

    Updates ``best_x [P, R, n]``/``best_loss [P, R]`` with the point of lowest loss seen by each restart.
    """
    net = tn.net
    R, n = max(1, s.restarts), net.num_inputs
    lo_np, hi_np = lo_all[ids][:, None].astype(np.float64), hi_all[ids][:, None].astype(np.float64)
    z0 = lo_np + rng.random((len(ids), R, n)) * (hi_np - lo_np)
    vert = np.where(rng.random((len(ids), R, n)) < 0.5, lo_np, hi_np)
    z0[:, 3::2] = vert[:, 3::2]
    z0[:, :2] = centers[ids][:, None]
    z = torch.from_numpy(z0)
    lo_t, hi_t = torch.from_numpy(lo_np), torch.from_numpy(hi_np)
    width = hi_t - lo_t
    clamped = torch.from_numpy(np.arange(R) % 2 == 0)[None, :, None]
    live = np.ones(len(ids), dtype=bool)
    steps = 0
    for t in range(s.steps):
        if _expired(deadline) or not live.any():
            break
        steps += 1
        sel = np.nonzero(live)[0]
        pids = ids[sel]
        sub = regions.take(pids)
        tg = torch.from_numpy(targets[pids])
        zs = z[sel].clone().requires_grad_(True)
        x = ste_round(zs).clamp(lo_t[sel], hi_t[sel])
        vals = tn.layer_values(x.reshape(-1, n))
        y = vals[-1].reshape(len(sel), R, -1)
        u = torch.where(clamped, tn.soft_logits(vals).reshape(len(sel), R, -1),
                        tn.soft_logits(vals, clamp=False).reshape(len(sel), R, -1))
        loss = sub.loss(u, s.temperature, tg)
        (grad,) = torch.autograd.grad(loss.sum(), zs)
        x_int = x.detach().numpy().astype(np.int64)
        g = grad.numpy()
        corner = np.where(g > 0, lo_all[pids][:, None], np.where(g < 0, hi_all[pids][:, None], x_int))
        yc, uc, ucu = _evaluate(tn, corner.reshape(-1, n))
        with torch.no_grad():
            uc = torch.where(clamped, uc.reshape(len(sel), R, -1), ucu.reshape(len(sel), R, -1))
            loss_c = sub.loss(uc, s.temperature, tg).numpy()
        m = sub.margins(y.detach().numpy().astype(np.int64))
        m_c = sub.margins(yc.reshape(len(sel), R, -1))
        _record(net, props, found, pids, x_int, np.any(m <= 0, axis=2), f"pgd step {t}")
        _record(net, props, found, pids, corner, np.any(m_c <= 0, axis=2), f"pgd sign-gradient vertex, step {t}")
        nearest.note(pids, x_int, m)
        nearest.note(pids, corner, m_c)
        lx = loss.detach().numpy()
        lbest = np.minimum(lx, loss_c)  # [sel, R]
        pts = np.where((lx <= loss_c)[..., None], x_int, corner)
        better = lbest < best_loss[pids]
        best_loss[pids] = np.where(better, lbest, best_loss[pids])
        best_x[pids] = np.where(better[..., None], pts, best_x[pids])
        live[sel] = [found[int(p)] is None for p in pids]
        frac = s.step_size * (1.0 - 0.9 * t / max(1, s.steps - 1))
        with torch.no_grad():
            z[sel] = torch.minimum(torch.maximum(z[sel] - frac * width[sel] * torch.sign(grad), lo_t[sel]),
                                   hi_t[sel])
    return steps


def _first_linear(net: QNetwork) -> int | None:
    """The node ``k`` through which alone the input reaches the rest of the network, when it is a linear map with
    coefficients (dense, convolution, sum pooling) reached from the input through order-preserving data movement
    only (``Flatten``, ``Reshape``: flat index ``j`` of the input is flat index ``j`` of ``k``'s input), every value
    on the way read by exactly one node; else ``None``.

    Then the values ``0 .. k`` are read by these nodes alone, so every later node reads values ``>= k + 1`` only
    (a node ``i <= k`` off the way would read some value ``<= i``, all taken): the rest of the network is a
    function of value ``k + 1``, the accumulator of ``k``."""
    consumers = net.consumers()
    j = 0
    while True:
        readers = consumers[j]
        if len(readers) != 1 or net.node_inputs(readers[0]) != (j,):
            return None
        i = readers[0]
        op = net.layers[i]
        if not isinstance(op, LinearMap):
            return None
        if not op.movement:
            return i
        n = net.num_inputs
        if not np.array_equal(op.index_map(net.in_shapes(i)), np.arange(n)):
            return None
        j = i + 1


_COLUMNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: a linear map's columns are kept as a dense float64 matrix up to this many entries (else as sparse rows)
_DENSE_COLUMNS = 1 << 22


def _columns(net: QNetwork, k: int):
    """``L^T`` of linear node ``k``, ``[in_n, out_n]`` (row ``j``: the column of input ``j``): a float64 tensor
    (exact: integer entries below ``2^53``) when it has at most ``_DENSE_COLUMNS`` entries, else exact int64 CSR;
    cached per op and input shape."""
    op = net.layers[k]
    shape = tuple(net.in_shapes(k)[0])
    cache = _COLUMNS.setdefault(op, {})
    if shape not in cache:
        m = op.matrices([shape])[0].T.tocsr()
        cache[shape] = torch.from_numpy(m.toarray().astype(np.float64)) if m.shape[0] * m.shape[1] <= \
            _DENSE_COLUMNS else m
    return cache[shape]


def _neighbours(tn: TorchNet, x: np.ndarray, coords: np.ndarray, vals: np.ndarray, clamp: bool, max_rows: int
                ) -> tuple[np.ndarray, torch.Tensor]:
    """Exact outputs and soft logits of the ``V * c`` points that change coordinate ``coords[i]`` of ``x`` to
    ``vals[v, i]`` (row ``v * c + i``).

    When the input reaches the network through one linear map ``k`` (:func:`_first_linear`), its accumulators are
    updated by one column each, ``acc(x') = acc(x) + (v - x_j) L[:, j]`` (``L`` the map's exact integer matrix;
    exact: every term and the result are integers below ``2^53``, as the accumulator of a grid point and its
    validated bound), and only the nodes after ``k`` run; otherwise the points are evaluated in full. Rows go in
    blocks of ``max_rows`` (of more when the accumulator is narrow: ``2^22`` accumulator entries a block).
    """
    net = tn.net
    V, c = vals.shape
    k = _first_linear(net)
    rows = np.arange(V * c)
    ys, us = [], []
    with torch.no_grad():
        if k is None:
            for r0 in range(0, V * c, max(1, max_rows)):
                r = rows[r0:r0 + max_rows]
                cand = np.repeat(x[None], len(r), axis=0)
                cand[np.arange(len(r)), coords[r % c]] = vals[r // c, r % c]
                y, uc, uu = _evaluate(tn, cand)
                ys.append(y)
                us.append(uc if clamp else uu)
            return np.concatenate(ys), torch.cat(us)
        from scipy.sparse import diags

        shape = net.shapes[k + 1]
        acc0 = tn.layer_values(torch.as_tensor(x[None], dtype=torch.float64))[k + 1].reshape(1, -1)  # [1, out]
        cols = _columns(net, k)[coords]  # [c, out]: row i is L[:, coords[i]]
        delta = (vals - x[coords][None]).ravel()  # [V * c]
        block = max(1, max_rows, (1 << 22) // max(1, acc0.shape[1]))
        for r0 in range(0, V * c, block):
            r = rows[r0:r0 + block]
            if isinstance(cols, torch.Tensor):  # exact float64 products of integers
                upd = torch.from_numpy(delta[r].astype(np.float64))[:, None] * cols[r % c]
            else:  # exact int64 products
                upd = torch.from_numpy((diags(delta[r], dtype=np.int64) @ cols[r % c]).toarray().astype(np.float64))
            acc = (acc0 + upd.to(acc0.device)).reshape(len(r), *shape)
            vals_all: list = [None] * (k + 1) + [acc, *tn.layer_values_from(k + 1, acc)]
            y = vals_all[-1].reshape(len(r), -1)
            ys.append(y.cpu().numpy().astype(np.int64))
            us.append(tn.soft_logits(vals_all, clamp=clamp))
        return np.concatenate(ys), torch.cat(us)


def _local_search(tn: TorchNet, props: Sequence[Property], regions: PaddedRegions, found: list, nearest: _Nearest,
                  act: np.ndarray, lo_all: np.ndarray, hi_all: np.ndarray, best_x: np.ndarray,
                  targets: np.ndarray, rng: np.random.Generator, s: AttackSettings, deadline: float | None) -> int:
    """Greedy coordinate descent (module docstring) from the ``s.local_starts`` best restarts of every open
    property, each restart with its own loss; properties with the smallest exact margin go first. Each iteration
    tries every coordinate, or ``s.local_rows / 10`` random ones when there are more.
    Returns the number of iterations run (all properties together)."""
    net = tn.net
    n = net.num_inputs
    R = best_x.shape[1]
    # rank every restart's best point by the exact untargeted margin min_d max_k v_dk
    y = forward(net, best_x[act].reshape(-1, n)).reshape(len(act), R, -1)
    exact = regions.take(act).margins(y).min(axis=2)  # [P_act, R]
    starts = []
    for i in np.argsort(exact.min(axis=1), kind="stable"):
        for r in np.argsort(exact[i], kind="stable")[:s.local_starts]:
            starts.append((int(act[i]), int(r)))
    iters = 0
    for p, r in starts:
        if found[p] is not None:
            continue
        x = best_x[p, r].copy()
        lo, hi = lo_all[p], hi_all[p]
        sub = regions.take(np.array([p]))
        tg = torch.from_numpy(targets[p:p + 1, r:r + 1])
        clamp = r % 2 == 0
        _, uc, uu = _evaluate(tn, x[None])
        best = float(sub.loss((uc if clamp else uu)[None], s.temperature, tg)[0, 0])
        for _ in range(s.local_steps):
            if _expired(deadline) or found[p] is not None:
                break
            iters += 1
            coords = np.arange(n)
            if 10 * n > s.local_rows:
                coords = np.sort(rng.choice(n, size=max(1, s.local_rows // 10), replace=False))
            xs, ls, hs = x[coords], lo[coords], hi[coords]
            vals = np.stack([ls, hs, xs - 1, xs + 1, xs - 2, xs + 2, xs - 4, xs + 4, (xs + ls) // 2,
                             (xs + hs + 1) // 2])
            vals = np.clip(vals, ls, hs)  # [V, c]
            V, c = vals.shape
            y, u = _neighbours(tn, x, coords, vals, clamp, s.max_rows)
            m = sub.margins(y[None])  # [1, V * c, D]; row v * c + i sets coordinate coords[i] to vals[v, i]
            hit = np.any(m <= 0, axis=2)
            k = int(np.argmin(m.min(axis=2)[0]))
            near = x.copy()
            near[coords[k % c]] = vals[k // c, k % c]
            nearest.note(np.array([p]), near[None, None], m[:, k:k + 1])
            if hit.any():
                cand = np.repeat(x[None], V * c, axis=0)
                cand[np.arange(V * c), np.tile(coords, V)] = vals.ravel()
                _record(net, props, found, np.array([p]), cand[None], hit, f"local search from restart {r}")
                if found[p] is not None:
                    break
            with torch.no_grad():
                losses = sub.loss(u[None], s.temperature, tg.expand(1, len(u))).numpy()[0]
            losses[(vals == xs[None]).ravel()] = np.inf
            kbest = int(np.argmin(losses))
            if not losses[kbest] < best:
                break
            best = float(losses[kbest])
            x = x.copy()
            x[coords[kbest % c]] = vals[kbest // c, kbest % c]
    return iters


def descend(net: QNetwork, prop: Property, starts: np.ndarray, settings: AttackSettings | VerifySettings | None = None,
            deadline: float | None = None, target: int | None = None) -> Counterexample | None:
    """The local search alone (module docstring) from given grid points of the box, e.g. a relaxation's solution
    rounded to the grid: each start is checked, then descended twice (clamped and unclamped soft logits) for up to
    ``settings.local_steps`` moves, on the loss of disjunct ``target`` (``None``: all of them). Returns a
    counterexample confirmed by replay, or ``None``."""
    s = _settings(settings)
    prop.check_network(net)
    pts = np.clip(np.atleast_2d(np.asarray(starts, dtype=np.int64)), prop.lo, prop.hi)
    found: list[Counterexample | None] = [None]
    regions = PaddedRegions.of([prop])
    one = np.array([0])
    nearest = _Nearest(pts[:1])
    with limit_threads(s.threads):
        _check_points(net, [prop], regions, found, nearest, one, pts[None], "start", s.max_rows)
        if found[0] is not None or s.local_steps <= 0 or _expired(deadline):
            return found[0]
        starts2 = np.repeat(pts, 2, axis=0)[None]  # restart r: clamped soft logits when r is even
        R = starts2.shape[1]
        targets = np.full((1, R), -1 if target is None else int(target), dtype=np.int64)
        _local_search(TorchNet(net, leak=s.leak), [prop], regions, found, nearest, one, prop.lo[None],
                      prop.hi[None], starts2, targets, np.random.default_rng(s.seed), replace(s, local_starts=R),
                      deadline)
    return found[0]


def attack(net: QNetwork, prop: Property, settings: AttackSettings | VerifySettings | None = None,
           deadline: float | None = None, torch_net: TorchNet | None = None) -> Counterexample | None:
    """A counterexample to ``prop`` confirmed by replay, or ``None`` (see :func:`attack_batch`)."""
    return attack_batch(net, [prop], settings, deadline, torch_net)[0]


def attack_result(net: QNetwork, prop: Property, settings: AttackSettings | VerifySettings | None = None,
                  deadline: float | None = None) -> Result:
    """The attack as a verification method: ``counterexample`` or ``unknown`` (incomplete / timeout)."""
    t0 = time.monotonic()
    stats: dict = {}
    ce = attack_batch(net, [prop], settings, deadline, stats=stats)[0]
    dt = time.monotonic() - t0
    if ce is not None:
        return Result(Verdict.COUNTEREXAMPLE, "attack", dt, counterexample=ce,
                      stages=[StageTime("attack", dt, "counterexample")], details=stats)
    reason = Reason.TIMEOUT if _expired(deadline) else Reason.INCOMPLETE
    return Result(Verdict.UNKNOWN, "attack", dt, reason=reason.value,
                  stages=[StageTime("attack", dt, "nothing found")], details=stats)
