"""Mixed-precision search guided by certified robustness (ARQ: Yang, Ugare, Zhao, Singh, Misailovic, arXiv
2410.24214), with the DDPG agent of HAQ (Wang, Liu, Lin, Lin, Han, CVPR 2019) and exhaustive / greedy baselines.

The equations are written out in ``encodings/arq.md``; in short:

Space and cost
--------------
A network of ``L`` affine layers (dense / conv, in order) gets a weight width ``b_w,l`` per layer and an
activation width per *hidden* layer's output (``quant.act_bits``, :class:`qverify.train.layers.QuantConfig`). The
activation width that multiplies layer ``l`` is the width of its **input**: ``b_a,0`` is the input grid's
(``ceil(log2(input_hi + 1))``, 8 for 8-bit pixels; fixed by the model's input quantizer, not searched) and
``b_a,l = act_bits[l - 1]`` for ``l >= 1``. The cost is

    ``BitOps = sum_l MACs_l * b_w,l * b_a,l``,

``MACs`` of a dense layer ``n_in * n_out``, of a conv ``C_out H_out W_out C_in k_h k_w`` (the multiply-accumulates
of one input). In a ``resnet`` the affine layers are counted in the trainer's order (stem convs, ``conv_a``,
``conv_b`` per block, dense layers), each reading the previous one's output; the identity skip folded into
``conv_b`` (one multiply-add per output value) is not counted. A budget is a number of BitOps or a uniform
equivalent ``wXaY`` (the cost of ``b_w,l = X`` for every layer and ``b_a,l = Y`` for every searched activation).
The search decides ``D = 2L - 1`` widths, in the order ``w_0, w_1, a_1, w_2, a_2, ...`` (HAQ's order: a layer's
weights, then its input activations).

Budget rule (HAQ's): when a candidate costs more than the budget, widths are lowered one allowed step at a time,
sweeping the decisions from the last to the first (``a_{L-1}, w_{L-1}, a_{L-2}, ...``) and starting a new sweep
until it fits; a decision at the smallest allowed width is skipped. A budget below the all-minimum cost is an error.

Candidate evaluation (:class:`ARQEvaluator`): from a ``qverify train`` checkpoint (float or Gaussian-noise
trained), the candidate's widths are set in ``[quant]`` and the model is fine-tuned for ``finetune_epochs`` of QAT
with Gaussian noise (``train.noise_sigma = sigma``, what ARQ does per candidate) from the checkpoint's weights,
scales calibrated first; ``finetune_epochs = 0`` is post-training quantization instead (:func:`qverify.quantize.
quantize`). The exported integer network is then smoothed (:func:`qverify.smooth.smooth`, CERTIFY with small
``n`` on the first ``images`` samples, noise seed ``seed + SEARCH_SEED_OFFSET``). Rewards: ``acr`` (average
certified radius) or ``accuracy`` (the clean accuracy of the *base* integer classifier on the same samples, HAQ's
reward; ARQ's baseline). Evaluations are cached by widths in the search trace (JSON), so an interrupted search
resumes where it stopped. The chosen model's certificate (:func:`run_search`) uses the noise seed ``seed``:
noise independent of the noise that chose the model, so its per-sample guarantee is that of a fixed model.

DDPG (:func:`ddpg_search`): one episode visits the ``D`` decisions; the state of a decision holds its layer index,
kind (conv / dense), input / output channels, kernel size, stride, parameter count, input feature-map size (each
min-max normalised over the decisions), whether it is a weight or an activation width, and the previous action.
The actor ``mu(s) in [0, 1]`` and the critic ``Q(s, a)`` are MLPs (two hidden ReLU layers); the action is
``mu(s)`` plus truncated-normal noise on ``[0, 1]`` with standard deviation ``delta_0 * decay^episode`` (uniform
random actions during the warm-up episodes). A continuous action ``a`` becomes the allowed width of index
``min(K - 1, floor(a K))`` (``K`` equal bins). After the budget rule the episode's candidate is evaluated, and
every transition of the episode is stored with the episode's reward minus a moving-average baseline (HAQ's reward
at the episode end, given to each step). Reading chosen where HAQ is vague: the critic regresses ``Q(s_t, a_t)``
on that reward directly (no bootstrapping, since each transition already carries the whole episode's return),
so no target networks are needed; the stored action is the one executed (the bin centre of the width the budget
rule left, where it changed the width). The best candidate seen is the result. Seeded: torch initialisation, the
exploration noise and the replay sampling come from the seed alone (CPU, one thread).

Uniform baseline (:func:`with_uniform_baseline`, on by default in :func:`run_search`; not part of HAQ or ARQ): after
the search, the widest uniform candidate ``wXaX`` within the budget is evaluated too (one more candidate, in the
same trace) and chosen when its search reward beats the searched one (ties: the searched one). A short search can
miss it (measured: 20 DDPG episodes on the MNIST CNN never visited uniform W4A4, whose ACR is higher than the one
found), and a user who asks for a W4A4 budget should never get a model the search itself rates below W4A4.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

TRACE_FORMAT = "qverify-mixed-precision-trace"
TRACE_VERSION = 1
TRACE = "trace.json"
SEARCHES = ("ddpg", "exhaustive", "greedy")
REWARDS = ("acr", "accuracy")
#: exhaustive search refuses larger spaces
MAX_EXHAUSTIVE = 4096
#: the search smooths with noise seed ``seed + SEARCH_SEED_OFFSET``: the chosen model's certificate (seed ``seed``)
#: uses noise independent of the noise that chose it
SEARCH_SEED_OFFSET = 1_000_003


class MixedPrecisionError(ValueError):
    """A bad search setting or input (the message names it)."""


# ------------------------------------------------------------------------------------------------ space and cost
@dataclass(frozen=True)
class Layer:
    """One affine layer: ``kind`` ``dense`` or ``conv``; ``in_hw`` / ``out_hw`` the feature-map sizes ``H W``
    (1 for dense); ``macs`` the multiply-accumulates of one input."""

    index: int
    kind: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    params: int
    in_hw: int
    out_hw: int

    @property
    def macs(self) -> int:
        return self.c_out * self.out_hw * self.c_in * self.kernel * self.kernel


def layers_of(model: Any) -> list[Layer]:
    """The affine layers of a :class:`qverify.train.layers.QuantNet` (dense and conv, in order)."""
    from qverify.train.layers import QAffine, QConv2d

    shape = tuple(int(s) for s in model.input_shape)
    h, w = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
    out: list[Layer] = []
    for blk in model.blocks:
        if not isinstance(blk, QAffine):
            continue
        wt = blk.weight
        params = int(wt.numel()) + int(blk.bias.numel())
        if isinstance(blk, QConv2d):
            k, s, p = int(wt.shape[2]), int(blk.stride), int(blk.padding)
            h2, w2 = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            out.append(Layer(len(out), "conv", int(wt.shape[1]), int(wt.shape[0]), k, s, params, h * w, h2 * w2))
            h, w = h2, w2
        else:
            out.append(Layer(len(out), "dense", int(wt.shape[1]), int(wt.shape[0]), 1, 1, params, 1, 1))
    if not out:
        raise MixedPrecisionError("the model has no affine (dense / conv) layer to quantize")
    return out


@dataclass(frozen=True)
class Candidate:
    """Per-layer widths: ``weight_bits`` (one per affine layer), ``act_bits`` (one per hidden layer's output)."""

    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]

    @property
    def key(self) -> str:
        return "w" + "-".join(map(str, self.weight_bits)) + "_a" + "-".join(map(str, self.act_bits))

    def as_dict(self) -> dict:
        return {"weight_bits": list(self.weight_bits), "act_bits": list(self.act_bits)}


@dataclass(frozen=True)
class Space:
    """The search space: layers, the (fixed) input width, the allowed widths (sorted, distinct)."""

    layers: tuple[Layer, ...]
    input_bits: int
    allowed: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.allowed:
            raise MixedPrecisionError("--bits: give at least one width")
        bad = [b for b in self.allowed if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not
               2 <= int(b) <= 16]
        if bad:
            raise MixedPrecisionError(f"--bits: unknown bit width(s) {bad} (allowed widths are integers in 2..16)")
        object.__setattr__(self, "allowed", tuple(sorted({int(b) for b in self.allowed})))
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def decisions(self) -> list[tuple[str, int]]:
        """``("w", l)`` and ``("a", l)`` (the input activation of layer ``l >= 1``) in the search order."""
        out: list[tuple[str, int]] = [("w", 0)]
        for lay in range(1, self.n_layers):
            out += [("w", lay), ("a", lay)]
        return out

    def flat(self, c: Candidate) -> tuple[int, ...]:
        return tuple(c.weight_bits[lay] if k == "w" else c.act_bits[lay - 1] for k, lay in self.decisions)

    def from_flat(self, bits: Sequence[int]) -> Candidate:
        w = [0] * self.n_layers
        a = [0] * (self.n_layers - 1)
        for (k, lay), b in zip(self.decisions, bits, strict=True):
            if k == "w":
                w[lay] = int(b)
            else:
                a[lay - 1] = int(b)
        return Candidate(tuple(w), tuple(a))

    def uniform(self, wb: int, ab: int) -> Candidate:
        return Candidate((int(wb),) * self.n_layers, (int(ab),) * (self.n_layers - 1))

    def bitops(self, c: Candidate) -> int:
        """``sum_l MACs_l * b_w,l * b_a,l`` with ``b_a,0`` the input width (module docstring)."""
        if len(c.weight_bits) != self.n_layers or len(c.act_bits) != self.n_layers - 1:
            raise MixedPrecisionError(f"candidate {c.key}: needs {self.n_layers} weight and {self.n_layers - 1} "
                                      f"activation widths")
        a_in = (self.input_bits, *c.act_bits)
        return sum(lay.macs * int(wb) * int(ab) for lay, wb, ab in zip(self.layers, c.weight_bits, a_in,
                                                                       strict=True))

    def check(self, c: Candidate) -> None:
        bad = [b for b in (*c.weight_bits, *c.act_bits) if b not in self.allowed]
        if bad:
            raise MixedPrecisionError(f"candidate {c.key}: widths {sorted(set(bad))} not in --bits "
                                      f"{list(self.allowed)}")

    def all_candidates(self) -> list[Candidate]:
        return [self.from_flat(f) for f in itertools.product(self.allowed, repeat=len(self.decisions))]


def parse_budget(spec: str | int | float, space: Space) -> int:
    """BitOps of a budget: a number (``"1.5e6"``) or a uniform equivalent ``wXaY``; below the all-minimum-widths
    cost is an error naming ``--budget``."""
    s = str(spec).strip().lower()
    m = re.fullmatch(r"w(\d+)a(\d+)", s)
    if m:
        budget = space.bitops(space.uniform(int(m.group(1)), int(m.group(2))))
    else:
        try:
            v = float(s)
        except ValueError:
            raise MixedPrecisionError(f"--budget {spec!r}: give a number of BitOps or a uniform equivalent like "
                                      f"'w4a4'") from None
        if not math.isfinite(v) or v <= 0:
            raise MixedPrecisionError(f"--budget {spec!r} must be a positive number of BitOps")
        budget = int(v)
    lo = min(space.allowed)
    floor = space.bitops(space.uniform(lo, lo))
    if budget < floor:
        raise MixedPrecisionError(f"--budget {spec!r} = {budget} BitOps is below the cost of every layer at the "
                                  f"smallest width {lo} ({floor} BitOps): no candidate fits")
    return budget


def enforce_budget(space: Space, c: Candidate, budget: int) -> Candidate:
    """HAQ's budget rule (module docstring): lower widths one allowed step at a time, sweeping from the last
    decision to the first, until the cost is within ``budget``."""
    bits = list(space.flat(c))
    allowed = space.allowed

    def cost() -> int:
        return space.bitops(space.from_flat(bits))

    while cost() > budget:
        lowered = False
        for i in reversed(range(len(bits))):
            k = allowed.index(bits[i]) if bits[i] in allowed else None
            below = [b for b in allowed if b < bits[i]] if k is None else list(allowed[:k])
            if below:
                bits[i] = below[-1]
                lowered = True
                if cost() <= budget:
                    break
        if not lowered:
            raise MixedPrecisionError(f"budget {budget} BitOps cannot be met even at the smallest widths")
    return space.from_flat(bits)


# ------------------------------------------------------------------------------------------------ evaluations
@dataclass
class Evaluation:
    """One evaluated candidate (a trace entry)."""

    candidate: Candidate
    bitops: int
    reward: float
    acr: float | None = None
    accuracy: float | None = None
    smoothed_accuracy: float | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"key": self.candidate.key, **self.candidate.as_dict(), "bitops": self.bitops, "reward": self.reward,
                "acr": self.acr, "accuracy": self.accuracy, "smoothed_accuracy": self.smoothed_accuracy,
                "seconds": self.seconds, **self.extra}


RewardFn = Callable[[Candidate], "dict | float"]


class Trace:
    """Every evaluated candidate, cached by widths and written to a JSON file after each evaluation (atomic
    replace): re-running with the same ``identity`` resumes from it; another identity is refused unless
    ``overwrite``."""

    def __init__(self, space: Space, fn: RewardFn, path: str | Path | None = None, identity: dict | None = None,
                 overwrite: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.space, self.fn = space, fn
        self.path = Path(path) if path is not None else None
        self.identity = identity or {}
        self.entries: dict[str, dict] = {}
        self.order: list[str] = []
        self.episodes: list[dict] = []
        self.calls = 0
        self.hits = 0
        self.log = log or (lambda _m: None)
        if self.path is not None and self.path.exists() and not overwrite:
            try:
                old = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise MixedPrecisionError(f"{self.path}: not a readable search trace ({e})") from None
            if old.get("format") != TRACE_FORMAT:
                raise MixedPrecisionError(f"{self.path}: not a {TRACE_FORMAT} file")
            if old.get("identity") != self.identity:
                diff = sorted(k for k in set(old.get("identity", {})) | set(self.identity)
                              if old.get("identity", {}).get(k) != self.identity.get(k))
                raise MixedPrecisionError(f"{self.path} is the trace of another search (differs in {diff}); use "
                                          f"another --out or --overwrite")
            for e in old.get("candidates", []):
                self.entries[e["key"]] = e
                self.order.append(e["key"])
            if self.entries:
                self.log(f"resuming from {self.path}: {len(self.entries)} cached evaluations")

    def __call__(self, c: Candidate, source: str = "") -> dict:
        self.space.check(c)
        self.calls += 1
        if c.key in self.entries:
            self.hits += 1
            return self.entries[c.key]
        t0 = time.monotonic()
        r = self.fn(c)
        dt = time.monotonic() - t0
        d = dict(r) if isinstance(r, dict) else {"reward": float(r)}
        e = {"key": c.key, **c.as_dict(), "bitops": self.space.bitops(c), "reward": float(d.pop("reward")),
             "seconds": dt, "source": source, "index": len(self.order), **d}
        self.entries[c.key] = e
        self.order.append(c.key)
        self.save()
        return e

    def reward(self, c: Candidate, source: str = "") -> float:
        return float(self(c, source)["reward"])

    def document(self, extra: dict | None = None) -> dict:
        return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "identity": self.identity,
                "allowed_bits": list(self.space.allowed), "input_bits": self.space.input_bits,
                "layers": [{**lay.__dict__, "macs": lay.macs} for lay in self.space.layers],
                "candidates": [self.entries[k] for k in self.order], "episodes": self.episodes, **(extra or {})}

    def save(self, extra: dict | None = None) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.document(extra), indent=1))
        os.replace(tmp, self.path)


def _as_trace(space: Space, evaluate: RewardFn | Trace) -> Trace:
    return evaluate if isinstance(evaluate, Trace) else Trace(space, evaluate)


def _best(trace: Trace, keys: Sequence[str], budget: int) -> dict:
    """The highest reward within the budget; ties: fewer BitOps, then the first evaluated."""
    within = [trace.entries[k] for k in keys if trace.entries[k]["bitops"] <= budget]
    if not within:
        raise MixedPrecisionError("no evaluated candidate is within the budget")
    return min(within, key=lambda e: (-e["reward"], e["bitops"], trace.order.index(e["key"])))


@dataclass
class SearchResult:
    best: dict
    trace: Trace
    search: str
    budget: int
    seconds: float

    @property
    def candidate(self) -> Candidate:
        return Candidate(tuple(self.best["weight_bits"]), tuple(self.best["act_bits"]))


def uniform_baseline(space: Space, budget: int) -> Candidate | None:
    """The widest uniform candidate ``wXaX`` (``X`` from the allowed widths) within the budget, if any."""
    for x in sorted(space.allowed, reverse=True):
        c = space.uniform(x, x)
        if space.bitops(c) <= budget:
            return c
    return None


def with_uniform_baseline(res: SearchResult) -> tuple[SearchResult, dict | None]:
    """``res`` with the uniform baseline (:func:`uniform_baseline`) evaluated in its trace: the baseline's entry,
    and the result with the baseline as ``best`` where its reward is strictly higher (module docstring)."""
    space, tr = res.trace.space, res.trace
    c = uniform_baseline(space, res.budget)
    if c is None:
        return res, None
    t0 = time.monotonic()
    e = tr(c, "uniform baseline")
    best = e if e["reward"] > res.best["reward"] else res.best
    return replace(res, best=best, seconds=res.seconds + time.monotonic() - t0), e


# ------------------------------------------------------------------------------------------------ baselines
def exhaustive_search(space: Space, budget: int, evaluate: RewardFn | Trace,
                      max_candidates: int = MAX_EXHAUSTIVE) -> SearchResult:
    """Every candidate within the budget (the ground truth on small spaces)."""
    t0 = time.monotonic()
    tr = _as_trace(space, evaluate)
    total = len(space.allowed) ** len(space.decisions)
    if total > max_candidates:
        raise MixedPrecisionError(f"--search exhaustive: {total} candidates ({len(space.allowed)} widths ^ "
                                  f"{len(space.decisions)} decisions) exceed {max_candidates}; use ddpg or greedy")
    keys = []
    for c in space.all_candidates():
        if space.bitops(c) <= budget:
            tr(c, "exhaustive")
            keys.append(c.key)
    return SearchResult(_best(tr, keys, budget), tr, "exhaustive", budget, time.monotonic() - t0)


def greedy_search(space: Space, budget: int, evaluate: RewardFn | Trace) -> SearchResult:
    """Start at the widest widths; while over the budget, lower (one allowed step) the decision that loses the
    least reward per BitOps saved, ``(r(c) - r(c')) / (cost(c) - cost(c'))`` (ties: the larger saving, then the
    later decision)."""
    t0 = time.monotonic()
    tr = _as_trace(space, evaluate)
    hi = max(space.allowed)
    cur = space.flat(space.uniform(hi, hi))
    r_cur = tr.reward(space.from_flat(cur), "greedy")
    path = [space.from_flat(cur).key]
    while space.bitops(space.from_flat(cur)) > budget:
        c_cost = space.bitops(space.from_flat(cur))
        options = []
        for i, b in enumerate(cur):
            k = space.allowed.index(b)
            if k == 0:
                continue
            nxt = list(cur)
            nxt[i] = space.allowed[k - 1]
            cand = space.from_flat(nxt)
            saved = c_cost - space.bitops(cand)
            if saved <= 0:
                continue
            r = tr.reward(cand, "greedy")
            options.append(((r_cur - r) / saved, -saved, -i, tuple(nxt), r))
        if not options:
            raise MixedPrecisionError("greedy search: cannot lower any width further")
        _, _, _, cur, r_cur = min(options)
        path.append(space.from_flat(cur).key)
    best = tr.entries[space.from_flat(cur).key]
    tr.episodes = [{"step": i, "key": k} for i, k in enumerate(path)]
    return SearchResult(best, tr, "greedy", budget, time.monotonic() - t0)


# ------------------------------------------------------------------------------------------------ DDPG
@dataclass(frozen=True)
class DDPGSettings:
    """HAQ's agent settings (scaled down: the spaces here are small)."""

    episodes: int = 100
    warmup: int = 10
    hidden: int = 64
    lr_actor: float = 1e-3
    lr_critic: float = 2e-3
    batch: int = 64
    updates: int = 20
    buffer: int = 4000
    delta0: float = 0.5
    decay: float = 0.97
    baseline: float = 0.9

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise MixedPrecisionError(f"--episodes must be >= 1, got {self.episodes}")
        if self.warmup < 0 or self.hidden < 1 or self.batch < 1 or self.updates < 0 or self.buffer < 1:
            raise MixedPrecisionError("DDPG: warmup, updates >= 0; hidden, batch, buffer >= 1")
        if not (0 < self.decay <= 1 and self.delta0 >= 0 and 0 <= self.baseline < 1):
            raise MixedPrecisionError("DDPG: need 0 < decay <= 1, delta0 >= 0, 0 <= baseline < 1")


def states(space: Space) -> np.ndarray:
    """The static part of each decision's state ``[D, 9]`` (module docstring), min-max normalised per feature;
    the previous action is appended per step."""
    rows = []
    n = max(1, space.n_layers - 1)
    for k, lay in space.decisions:
        L = space.layers[lay]
        rows.append([lay / n, 1.0 if L.kind == "conv" else 0.0, L.c_in, L.c_out, L.kernel, L.stride, L.params,
                     L.in_hw, 1.0 if k == "w" else 0.0])
    a = np.asarray(rows, dtype=np.float64)
    lo, hi = a.min(axis=0), a.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, (a - lo) / span, a.clip(0, 1))


def action_to_bits(a: float, allowed: Sequence[int]) -> int:
    """The allowed width of bin ``min(K - 1, floor(a K))`` (``K`` equal bins on ``[0, 1]``)."""
    k = len(allowed)
    return int(allowed[min(k - 1, max(0, int(math.floor(a * k))))])


def _truncnorm(rng: np.random.Generator, mu: float, sd: float) -> float:
    """A draw of ``N(mu, sd^2)`` truncated to ``[0, 1]`` (inverse CDF from a seeded uniform)."""
    from scipy.stats import norm

    if sd <= 0:
        return float(min(1.0, max(0.0, mu)))
    lo, hi = norm.cdf((0.0 - mu) / sd), norm.cdf((1.0 - mu) / sd)
    u = lo + (hi - lo) * rng.random()
    if hi - lo < 1e-12:
        return float(min(1.0, max(0.0, mu)))
    return float(min(1.0, max(0.0, mu + sd * norm.ppf(u))))


def ddpg_search(space: Space, budget: int, evaluate: RewardFn | Trace, settings: DDPGSettings | None = None,
                seed: int = 0, log: Callable[[str], None] | None = None) -> SearchResult:
    """HAQ/ARQ's DDPG agent (module docstring); the best candidate seen over ``settings.episodes`` episodes."""
    import torch

    st = settings or DDPGSettings()
    t0 = time.monotonic()
    tr = _as_trace(space, evaluate)
    static = states(space)
    D = len(static)
    sdim = static.shape[1] + 1
    rng = np.random.default_rng([int(seed), 0x41525121])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        actor = torch.nn.Sequential(torch.nn.Linear(sdim, st.hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(st.hidden, st.hidden), torch.nn.ReLU(),
                                    torch.nn.Linear(st.hidden, 1), torch.nn.Sigmoid()).double()
        critic = torch.nn.Sequential(torch.nn.Linear(sdim + 1, st.hidden), torch.nn.ReLU(),
                                     torch.nn.Linear(st.hidden, st.hidden), torch.nn.ReLU(),
                                     torch.nn.Linear(st.hidden, 1)).double()
    opt_a = torch.optim.Adam(actor.parameters(), lr=st.lr_actor)
    opt_c = torch.optim.Adam(critic.parameters(), lr=st.lr_critic)
    buf_s = np.zeros((st.buffer, sdim))
    buf_a = np.zeros((st.buffer, 1))
    buf_r = np.zeros((st.buffer, 1))
    stored = 0
    baseline: float | None = None
    keys: list[str] = []
    episodes: list[dict] = []
    K = len(space.allowed)
    for ep in range(st.episodes):
        sd = st.delta0 * st.decay ** max(0, ep - st.warmup)
        prev = 0.0
        ss, acts = [], []
        for t in range(D):
            s = np.concatenate([static[t], [prev]])
            if ep < st.warmup:
                a = float(rng.random())
            else:
                with torch.no_grad():
                    mu = float(actor(torch.from_numpy(s[None, :]))[0, 0])
                a = _truncnorm(rng, mu, sd)
            ss.append(s)
            acts.append(a)
            prev = a
        asked = [action_to_bits(a, space.allowed) for a in acts]
        cand = enforce_budget(space, space.from_flat(asked), budget)
        final = space.flat(cand)
        e = tr(cand, f"ddpg episode {ep}")
        r = float(e["reward"])
        keys.append(cand.key)
        episodes.append({"episode": ep, "key": cand.key, "reward": r, "asked": asked, "sd": sd})
        adv = r if baseline is None else r - baseline
        baseline = r if baseline is None else st.baseline * baseline + (1 - st.baseline) * r
        for t in range(D):
            a = acts[t] if final[t] == asked[t] else (space.allowed.index(final[t]) + 0.5) / K
            j = stored % st.buffer
            buf_s[j], buf_a[j], buf_r[j] = ss[t], a, adv
            stored += 1
        if ep + 1 >= st.warmup and stored:
            m = min(stored, st.buffer)
            for _ in range(st.updates):
                idx = rng.integers(0, m, size=min(st.batch, m))
                s_b = torch.from_numpy(buf_s[idx])
                a_b = torch.from_numpy(buf_a[idx])
                r_b = torch.from_numpy(buf_r[idx])
                q = critic(torch.cat([s_b, a_b], dim=1))
                loss_c = torch.mean((q - r_b) ** 2)
                opt_c.zero_grad()
                loss_c.backward()
                opt_c.step()
                loss_a = -critic(torch.cat([s_b, actor(s_b)], dim=1)).mean()
                opt_a.zero_grad()
                loss_a.backward()
                opt_a.step()
        if log is not None and (ep + 1) % max(1, st.episodes // 10) == 0:
            b = _best(tr, keys, budget)
            log(f"episode {ep + 1}/{st.episodes}: {cand.key} reward {r:.4g}; best {b['key']} {b['reward']:.4g}")
    tr.episodes = episodes
    return SearchResult(_best(tr, keys, budget), tr, "ddpg", budget, time.monotonic() - t0)


# ------------------------------------------------------------------------------------------------ ARQ evaluator
class ARQEvaluator:
    """Candidate evaluation from a ``qverify train`` checkpoint (module docstring): fine-tune (or PTQ), export,
    smooth the first ``images`` samples with ``n0`` / ``n`` noise samples; the reward ``acr`` or ``accuracy``."""

    def __init__(self, checkpoint: str | Path, images: np.ndarray, labels: np.ndarray, sigma: float, *,
                 allowed: Sequence[int] = (2, 4, 8), n0: int = 100, n: int = 1000, alpha: float = 0.001,
                 search_images: int = 100, finetune_epochs: int = 1, finetune_lr: float | None = None,
                 reward: str = "acr", seed: int = 0, batch: int = 1000, work_dir: str | Path | None = None,
                 device: str = "cpu", threads: int = 1, train_data: str | None = None, finetune_images: int = 0,
                 log: Callable[[str], None] | None = None) -> None:
        from qverify.train.trainer import CHECKPOINT, load_checkpoint

        if reward not in REWARDS:
            raise MixedPrecisionError(f"--reward must be one of {REWARDS}, got {reward!r}")
        if not sigma > 0:
            raise MixedPrecisionError(f"--sigma must be positive, got {sigma}")
        if finetune_epochs < 0:
            raise MixedPrecisionError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
        if search_images < 1:
            raise MixedPrecisionError(f"--images must be >= 1, got {search_images}")
        p = Path(checkpoint)
        if p.is_dir():
            p = p / CHECKPOINT
        if not p.exists():
            raise MixedPrecisionError(f"{p}: no qverify train checkpoint there")
        self.checkpoint = p
        self.cfg, self.model, self.state = load_checkpoint(p)
        if self.cfg.model.arch not in ("mlp", "cnn", "resnet"):
            raise MixedPrecisionError(f"{p}: model.arch {self.cfg.model.arch!r} is not searched (mlp, cnn, resnet)")
        self.space = Space(tuple(layers_of(self.model)), int(math.ceil(math.log2(self.model.input_hi + 1))),
                           tuple(allowed))
        if finetune_epochs == 0:
            from qverify.quantize import PTQ_BITS

            bad = [b for b in self.space.allowed if not PTQ_BITS[0] <= b <= PTQ_BITS[1]]
            if bad:
                raise MixedPrecisionError(f"--bits {bad}: post-training quantization (--finetune-epochs 0) takes "
                                          f"widths {PTQ_BITS[0]}..{PTQ_BITS[1]}")
        self.images, self.labels = np.asarray(images), np.asarray(labels).astype(np.int64).ravel()
        self.sigma, self.n0, self.n, self.alpha = float(sigma), int(n0), int(n), float(alpha)
        self.ids = list(range(min(int(search_images), len(self.labels))))
        self.finetune_epochs = int(finetune_epochs)
        self.finetune_lr = float(finetune_lr) if finetune_lr is not None else float(self.cfg.train.lr)
        self.reward_kind, self.seed, self.batch = reward, int(seed), int(batch)
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.device, self.threads = device, int(threads)
        self.train_data = train_data
        if finetune_images < 0:
            raise MixedPrecisionError(f"--finetune-images must be >= 0 (0: all), got {finetune_images}")
        self.finetune_images = int(finetune_images)
        self.log = log or (lambda _m: None)
        self._data = None

    def identity(self) -> dict:
        from qverify.certify import file_sha256

        return {"checkpoint_sha256": file_sha256(self.checkpoint), "sigma": self.sigma, "n0": self.n0, "n": self.n,
                "alpha": self.alpha, "images": len(self.ids), "finetune_epochs": self.finetune_epochs,
                "finetune_lr": self.finetune_lr, "reward": self.reward_kind, "seed": self.seed,
                "allowed": list(self.space.allowed), "train_data": self.train_data or self.cfg.data.train,
                "finetune_images": self.finetune_images,
                "data_sha256": _data_sha(self.images, self.labels)}

    def _datasets(self):  # noqa: ANN202 - (train, eval) Datasets
        if self._data is None:
            from qverify.train.trainer import prepare_data

            cfg = self.cfg
            if self.train_data:
                cfg = replace(cfg, data=replace(cfg.data, train=self.train_data))
            if self.finetune_images:
                cfg = replace(cfg, data=replace(cfg.data, train_limit=self.finetune_images))
            tr, ev = prepare_data(replace(cfg, data=replace(cfg.data, eval_limit=min(500, cfg.data.eval_limit or
                                                                                     500))))
            self._data = (tr, ev)
        return self._data

    def network(self, c: Candidate, name: str | None = None):  # noqa: ANN201 - a QNetwork
        """The integer network of a candidate (deterministic: the same widths give the same network)."""
        import torch

        from qverify.train.trainer import config_from_dict, config_to_dict, train

        self.space.check(c)
        name = name or f"{self.cfg.name}-{c.key}"
        cfg = self.cfg
        tr, ev = self._datasets()
        d = config_to_dict(cfg)
        d["quant"] = {**d["quant"], "weight_bits": list(c.weight_bits),
                      "act_bits": list(c.act_bits) if c.act_bits else d["quant"]["act_bits"]}  # one layer: none
        d["quant"].pop("weight_quantizer", None)
        if self.finetune_epochs == 0:
            from qverify.quantize import from_quantnet, quantize

            qc = config_from_dict({"quant": d["quant"]}).quant
            calib = tr.images[:max(1, cfg.train.calib_images)].reshape((-1, *self.model.input_shape))
            return quantize(from_quantnet(self.model, name), calib.astype(np.int64), qc, name=name,
                            metadata={"mixed_precision": c.key, "ptq": "true"}).network
        d["train"] = {**d["train"], "method": "qat", "epochs": self.finetune_epochs, "float_epochs": 0,
                      "noise_sigma": self.sigma, "eps": 0.0, "lr": self.finetune_lr, "lr_milestones": [],
                      "warmup_epochs": 0.0, "ramp_epochs": 0.0}
        d.update(out_dir="", progress=False, device=self.device, threads=self.threads, name=name)
        ft = config_from_dict(d)
        with torch.random.fork_rng(devices=[]):
            res = train(ft, data=(tr, ev), init=self.state["model"])
        net = res.network(name)
        net.metadata["mixed_precision"] = c.key
        net.metadata["finetune_epochs"] = str(self.finetune_epochs)
        return net

    def smooth(self, net: Any, path: Path | None, ids: Sequence[int], n: int, progress: bool = False):  # noqa: ANN201
        """The search's CERTIFY of ``net`` (noise seed ``seed + SEARCH_SEED_OFFSET``)."""
        from qverify.certify import ResultsFileError
        from qverify.smooth import smooth

        kw = dict(n0=self.n0, n=n, alpha=self.alpha, batch=self.batch, seed=self.seed + SEARCH_SEED_OFFSET,
                  ids=list(ids),
                  device="cpu" if self.device == "cpu" else "auto", progress=progress, model_name=net.name)
        if path is None:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                return smooth(net, self.images, self.labels, self.sigma, results_path=Path(d) / "s.jsonl", **kw)
        try:
            return smooth(net, self.images, self.labels, self.sigma, results_path=path, **kw)
        except ResultsFileError:  # a file left by an interrupted evaluation of another network: start over
            return smooth(net, self.images, self.labels, self.sigma, results_path=path, overwrite=True, **kw)

    def __call__(self, c: Candidate) -> dict:
        from qverify.execute import argmax_first, forward
        from qverify.property import pixels_to_grid

        t0 = time.monotonic()
        net = self.network(c)
        t_q = time.monotonic() - t0
        path = self.work_dir / "candidates" / f"{c.key}.jsonl" if self.work_dir is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        s = self.smooth(net, path, self.ids, self.n).summary()
        x = pixels_to_grid(net, self.images[self.ids])
        acc = float(np.mean(argmax_first(forward(net, x)) == self.labels[self.ids]))
        acr = float(s["acr"])
        self.log(f"{c.key}: ACR {acr:.4f}, smoothed accuracy {s['clean_accuracy']:.3f}, base accuracy {acc:.3f} "
                 f"({time.monotonic() - t0:.1f} s)")
        return {"reward": acr if self.reward_kind == "acr" else acc, "acr": acr, "accuracy": acc,
                "smoothed_accuracy": float(s["clean_accuracy"]), "quantize_seconds": t_q,
                "certified": s["certified"]}


def _data_sha(images: np.ndarray, labels: np.ndarray) -> str:
    from qverify.certify import data_sha256

    return data_sha256(images, labels)


# ------------------------------------------------------------------------------------------------ the run
def run_search(checkpoint: str | Path, images: np.ndarray, labels: np.ndarray, sigma: float, out_dir: str | Path, *,
               allowed: Sequence[int] = (2, 4, 8), budget: str | int = "w4a4", search: str = "ddpg",
               episodes: int = 30, reward: str = "acr", n0: int = 100, search_n: int = 1000, n: int = 100_000,
               alpha: float = 0.001, search_images: int = 100, final_ids: Sequence[int] | None = None,
               finetune_epochs: int = 1, finetune_lr: float | None = None, seed: int = 0, batch: int = 1000,
               device: str = "cpu", threads: int = 1, train_data: str | None = None, finetune_images: int = 0,
               overwrite: bool = False, uniform: bool = True,
               ddpg: DDPGSettings | None = None, data_path: str | None = None, command: str | None = None,
               progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """The whole ARQ run into ``out_dir``: ``trace.json`` (every candidate; resumable), ``bits.json`` (the chosen
    widths), ``model.qnn`` (its integer network), ``certificate.jsonl`` (its smoothing certificate at ``n`` on
    ``final_ids``, default all samples; :mod:`qverify.smooth` records) and ``result.json`` (the summary).
    ``uniform``: evaluate the uniform baseline after the search and choose it where it scores higher
    (:func:`with_uniform_baseline`)."""
    from qverify.io import save_model

    if search not in SEARCHES:
        raise MixedPrecisionError(f"--search must be one of {SEARCHES}, got {search!r}")
    log = log or (lambda _m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ev = ARQEvaluator(checkpoint, images, labels, sigma, allowed=allowed, n0=n0, n=search_n, alpha=alpha,
                      search_images=search_images, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                      reward=reward, seed=seed, batch=batch, work_dir=out, device=device, threads=threads,
                      train_data=train_data, finetune_images=finetune_images, log=log)
    space = ev.space
    b = parse_budget(budget, space)
    settings = ddpg or DDPGSettings(episodes=episodes, warmup=max(1, min(10, episodes // 4)))
    identity = {**ev.identity(), "search": search, "budget": b,
                **({"ddpg": settings.__dict__} if search == "ddpg" else {})}
    tr = Trace(space, ev, out / TRACE, identity, overwrite, log)
    if search == "ddpg":
        res = ddpg_search(space, b, tr, settings, seed, log)
    elif search == "greedy":
        res = greedy_search(space, b, tr)
    else:
        res = exhaustive_search(space, b, tr)
    base = None
    if uniform:
        res, base = with_uniform_baseline(res)
    t_search = time.monotonic() - t0
    cand = res.candidate
    net = ev.network(cand, name=f"{ev.cfg.name}-arq-{cand.key}")
    net.metadata.update(arq_bitops=str(space.bitops(cand)), arq_budget=str(b), arq_search=search, arq_reward=reward)
    save_model(net, out / "model.qnn")
    ids = list(final_ids) if final_ids is not None else list(range(len(ev.labels)))
    from qverify.smooth import smooth

    cert = smooth(net, ev.images, ev.labels, sigma, results_path=out / "certificate.jsonl", n0=n0, n=n, alpha=alpha,
                  batch=batch, seed=seed, ids=ids, device="cpu" if device == "cpu" else "auto", progress=progress,
                  model_path=out / "model.qnn", data_path=data_path, command=command, overwrite=overwrite)
    summary = cert.summary()
    chosen = {**cand.as_dict(), "key": cand.key, "bitops": space.bitops(cand), "budget": b,
              "uniform_equivalent": str(budget), "search_reward": res.best["reward"], "search_acr": res.best.get("acr"),
              "source": res.best.get("source", ""),
              "uniform_baseline": None if base is None else {"key": base["key"], "reward": base["reward"]}}
    (out / "bits.json").write_text(json.dumps(chosen, indent=1))
    result = {"format": "qverify-mixed-precision-result", "chosen": chosen, "search": search, "reward": reward,
              "evaluations": len(tr.entries), "calls": tr.calls, "cache_hits": tr.hits, "search_seconds": t_search,
              "certificate": {"path": str(out / "certificate.jsonl"), "n": n, "summary": summary},
              "total_seconds": time.monotonic() - t0, "command": command}
    tr.save({"chosen": chosen["key"], "search": search, "budget_bitops": b})
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def read_trace(path: str | Path) -> dict:
    """A search trace (``trace.json`` or the search directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / TRACE
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise MixedPrecisionError(f"{p}: not a readable search trace ({e})") from None
    if d.get("format") != TRACE_FORMAT:
        raise MixedPrecisionError(f"{p}: not a {TRACE_FORMAT} file")
    return d


__all__ = ["ARQEvaluator", "Candidate", "DDPGSettings", "Layer", "MixedPrecisionError", "REWARDS", "SEARCHES",
           "SEARCH_SEED_OFFSET",
           "SearchResult", "Space", "TRACE_FORMAT", "Trace", "action_to_bits", "ddpg_search", "enforce_budget",
           "exhaustive_search", "greedy_search", "layers_of", "parse_budget", "read_trace", "run_search", "states",
           "uniform_baseline", "with_uniform_baseline"]
