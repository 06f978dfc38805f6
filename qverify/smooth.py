"""Randomized smoothing of the bit-exact integer network (Cohen, Rosenfeld, Kolter, ICML 2019), and incremental
re-certification of a quantized variant (Ugare, Suresh, Banerjee, Singh, Misailovic, ICLR 2024).

Base classifier
---------------
The base classifier is the integer network *together with its input quantizer* ``Q``: ``h(v) = f(Q(v))`` for a
real input ``v`` in the model's real input units (``v = s_in (x - z_in)``, or the preprocessed units
``v = (pixel * scale - mean_c) / std_c`` of :mod:`qverify.preprocess` when a preprocessing is given). ``Q`` is the
model's own input quantizer, coordinate by coordinate (:class:`InputQuantizer`):

* a quantizing input (``net.input_rounding`` set): ``x = clamp(R(v / s_in) + z_in, input_lo, input_hi)`` with the
  model's rounding mode ``R``;
* a native integer input (``input_rounding is None``, e.g. pixels 0..255 with ``s_in = 1/256``): the nearest grid
  point, ``x = clamp(rne(v / s_in) + z_in, input_lo, input_hi)`` (ties to even: a set of measure zero);
* onnxruntime semantics (float32 inputs): ``x = clamp(rne(fl32(fl32(v) / fl32(s_in))) + z_in)``, as onnxruntime's
  ``QuantizeLinear`` computes it on the float32 input ``fl32(v)``.

``Q`` is evaluated exactly on the sampled real point ``v0 + eps`` (``eps`` the float64 noise sample): in float64
where the value (in grid units) is farther than ``1e-11 max(1, |lo|, |hi|)`` from a rounding boundary (the
float64 error is below ``1e-13`` there), and
in exact rational arithmetic (:class:`fractions.Fraction`) on the rest. The integer network is run bit-exactly by
the numpy executor (:func:`qverify.execute.forward`) or, on CUDA, by the torch view (:class:`qverify.torch_net.
TorchNet`: float64 linear maps whose sums are exact integers below ``2^53``, the executor's own requantization).
Argmax ties: the first maximal index wins, as everywhere in qverify.

Smoothed classifier and the certificate (Cohen et al., Theorem 1)
-----------------------------------------------------------------
``g(v) = argmax_c P(h(v + eps) = c)``, ``eps ~ N(0, sigma^2 I)``. If ``p_A`` is a lower bound of
``P(h(v + eps) = c_A)`` and ``p_A > 1/2``, then ``g(v + delta) = c_A`` for every ``||delta||_2 < R``,

    ``R = sigma * Phi^{-1}(p_A)``.

CERTIFY (Cohen et al., Algorithm "CERTIFY"): ``n0`` noise samples choose ``c_A`` (their most frequent class); ``n``
fresh samples count ``k = #{h = c_A}``; the one-sided Clopper-Pearson lower bound at level ``1 - alpha``,

    ``p_A = B^{-1}(alpha; k, n - k + 1)``  (the ``alpha`` quantile of the Beta distribution; ``0`` when ``k = 0``),

is the smallest ``p`` with ``P(Bin(n, p) >= k) >= alpha``. ``p_A <= 1/2``: abstain; else the radius above. The
returned radius is wrong (too large) with probability at most ``alpha``.

PREDICT (Cohen et al., Algorithm "PREDICT"): the top two counts ``n_A >= n_B`` of ``n`` samples; the class when the
two-sided binomial test of ``n_A`` successes in ``n_A + n_B`` trials at ``p = 1/2`` has p-value ``<= alpha``, else
abstain. It returns a class other than ``g(v)`` with probability at most ``alpha``. qverify's CERTIFY records also
carry a PREDICT computed on the same ``n`` estimation samples (each guarantee holds by itself).

Summary: certified accuracy at radius ``r`` = fraction of samples with ``c_A = label`` and ``R >= r`` (abstentions
count as wrong); average certified radius ``ACR = mean(R * [c_A = label])``.

Noise and reproducibility
-------------------------
Noise is drawn with numpy's PCG64 generator, in blocks of :data:`NOISE_BLOCK` samples, each block from its own seed
``SeedSequence([seed, sample_id, phase, block])`` (phase 0: selection, 1: estimation; 2 and 3: the fallback of an
incremental run); fewer samples than a block are the block's first rows (a prefix of the generator's stream). The
counts therefore depend on the seed only, not on the batch size or the device: the noise is generated on the CPU and
the device receives the quantized integer inputs.

Floating-point sampling (Voracek and Hein, "Sound randomized smoothing in floating-point arithmetic", ICLR 2023)
---------------------------------------------------------------------------------------------------------------
Voracek and Hein show that a base classifier that looks at the floating-point bits of ``v + eps`` (it can tell the
float grid points that sampling reaches from the rest) can make the computed certificate false. Here the base
classifier sees only ``Q(v + eps)``, an integer grid point whose cells have width ``s_in`` (``1/256`` for 8-bit
pixels), and ``Q`` is computed exactly on the sampled real, so the discreteness of floating point does not reach the
classifier: that attack does not apply. What remains is that the sampler is not an exact Gaussian (float64 samples
of a ziggurat sampler, multiplied by ``sigma`` in float64): the probability of each grid cell differs from the
Gaussian one by about ``2^-50`` relative, so the ``n`` samples' distribution is within total variation about
``n d 2^-50`` of the ideal one (``~1e-7`` for ``n = 1e5``, ``d = 784``), which adds that much to ``alpha``. This is
stated, not proved. The radius and the Clopper-Pearson bound are computed in float64 (scipy's ``beta.ppf``,
``norm.ppf``; relative error about ``1e-15``).

Incremental randomized smoothing (Ugare et al., ICLR 2024)
---------------------------------------------------------
A variant ``h'`` (the same architecture at other bit widths) is certified from a reference certificate ``(c_A, p_A)``
of ``h`` and the reference's cached noise seeds: on the first ``n_p`` of the reference's estimation samples (the
same seeds, hence the same noise) count the disagreements ``k_d = #{h(v + eps_i) != h'(v + eps_i)}`` and bound
``zeta = P(h(v + eps) != h'(v + eps))`` from above by Clopper-Pearson at level ``1 - alpha_zeta``,

    ``zeta_up = B^{-1}(1 - alpha_zeta; k_d + 1, n_p - k_d)``  (``1`` when ``k_d = n_p``).

Since ``P(h' = c_A) >= P(h = c_A) - zeta``, ``p'_A = p_A - zeta_up`` is a lower bound of ``P(h'(v + eps) = c_A)``
and, when ``p'_A > 1/2``, ``R' = sigma * Phi^{-1}(p'_A)`` is certified for ``h'``, wrong with probability at most
``alpha + alpha_zeta`` (union bound; ``c_A`` came from the reference's selection samples, independent of both
estimates). Otherwise (or when the reference abstained) the variant falls back to a full CERTIFY on fresh seeds
(phases 2, 3; or, with ``fallback="abstain"``, abstains); the per-sample failure probability is then at most
``alpha + alpha_zeta + alpha``. The reference's
per-sample predictions on its estimation noise are read from its cache (``cache_predictions=True``) or recomputed
with the reference network.

Results file
------------
The durable, resumable JSON-lines format of :mod:`qverify.certify`, with its own format name
(:data:`SMOOTH_FORMAT`): a ``header`` (model, data, sigma, n0, n, alpha, seed, noise block, quantizer, reuse), one
``session`` per run, ``session_end``, and one ``instance`` record per sample (``id``, ``label``, ``prediction``
(``c_A`` or ``-1``: abstain), ``predict``, ``count``, ``counts``, ``n``, ``p_lower``, ``radius``, ``correct``,
``seconds``, ``method``; incremental ones add ``disagree``, ``n_p``, ``zeta_upper``, ``reference``), each written
and flushed when the sample is done, fsynced in the background; re-running resumes, a truncated last line is
repaired, a file of another run is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from qverify.certify import (
    RecordFile,
    ResultsFileError,
    _now,
    _Writer,
    data_sha256,
    model_info,
    open_record_file,
    read_record_file,
    select_ids,
    versions,
)
from qverify.execute import argmax_first, forward
from qverify.network import QNetwork
from qverify.preprocess import Preprocess
from qverify.property import data_layout, pixels_to_grid
from qverify.quant import Rounding, round_fraction

SMOOTH_FORMAT = "qverify-smooth-results"
SMOOTH_VERSION = 1
#: samples per noise block (each block has its own seed; the counts do not depend on the batch size)
NOISE_BLOCK = 1000
#: the prediction of an abstention
ABSTAIN = -1
#: default radii of the summary (real input units, l2)
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
#: values in grid units closer than this times ``max(1, |lo - 2|, |hi + 2|)`` to a rounding boundary are quantized
#: exactly (rational arithmetic); the float64 error of ``r0 + eps / s`` there is below ``1e-13`` of that magnitude
_TOL = 1e-11


# ------------------------------------------------------------------------------------------------ statistics
def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound of a binomial proportion from ``k`` successes in ``n``:
    ``B^{-1}(alpha; k, n - k + 1)``, ``0`` for ``k = 0`` (``alpha^(1/n)`` for ``k = n``)."""
    from scipy.stats import beta

    _check_counts(k, n, alpha)
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson upper bound: ``B^{-1}(1 - alpha; k + 1, n - k)``, ``1`` for
    ``k = n`` (``1 - alpha^(1/n)`` for ``k = 0``)."""
    from scipy.stats import beta

    _check_counts(k, n, alpha)
    return 1.0 if k == n else float(beta.isf(alpha, k + 1, n - k))


def _check_counts(k: int, n: int, alpha: float) -> None:
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def certified_radius(p_lower: float, sigma: float) -> float | None:
    """``sigma * Phi^{-1}(p_lower)`` for ``p_lower > 1/2``; ``None`` (abstain) otherwise."""
    from scipy.stats import norm

    if p_lower <= 0.5:
        return None
    return float(sigma * norm.ppf(p_lower))


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """Cohen et al.'s PREDICT on class counts: the top class when the two-sided binomial test of the top count
    ``n_A`` against the runner-up ``n_B`` (``n_A`` successes in ``n_A + n_B`` trials, ``p = 1/2``) has p-value
    ``<= alpha``; else :data:`ABSTAIN`. The top class of equal counts is the first (the tie rule)."""
    from scipy.stats import binomtest

    c = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-c, kind="stable")
    na, nb = int(c[order[0]]), int(c[order[1]]) if len(c) > 1 else 0
    if na + nb == 0:
        return ABSTAIN
    return int(order[0]) if binomtest(na, na + nb, 0.5).pvalue <= alpha else ABSTAIN


# ------------------------------------------------------------------------------------------------ quantizer
@dataclass(frozen=True)
class InputQuantizer:
    """The model's input quantizer ``Q`` on real inputs (module docstring), applied to ``center + eps`` exactly.

    Centers are given as ``r0 = v0 / s_in + z_in`` (exact rationals, the real input in grid units; for data on the
    grid, the grid point itself)."""

    scale: Fraction
    zero_point: int
    lo: int
    hi: int
    rounding: Rounding
    float32: bool
    native: bool

    @classmethod
    def of(cls, net: QNetwork) -> InputQuantizer:
        f32 = net.input_rounding is not None and net.metadata.get("semantics") == "onnxruntime"
        mode = Rounding.HALF_EVEN if net.input_rounding is None or f32 else Rounding(net.input_rounding)
        return cls(net.input_scale, net.input_zero_point, net.input_lo, net.input_hi, mode, f32,
                   net.input_rounding is None)

    def describe(self) -> str:
        grid = f"clamped to [{self.lo}, {self.hi}]"
        if self.float32:
            return (f"onnxruntime's input quantizer on the float32 input: x = clamp(rne(fl32(fl32(v) / "
                    f"({self.scale}))) + {self.zero_point}, {self.lo}, {self.hi})")
        if self.native:
            return (f"the nearest grid point (the model's input is the integer grid, v = {self.scale} * (x - "
                    f"{self.zero_point})): x = rne(v / ({self.scale})) + {self.zero_point} (ties to even), {grid}")
        return f"the model's input quantizer x = {self.rounding}(v / ({self.scale})) + {self.zero_point}, {grid}"

    def __call__(self, r0: np.ndarray, r0_exact: Sequence[Fraction] | None, eps: np.ndarray) -> np.ndarray:
        """``Q(v0 + eps)`` as int64 ``[B, d]`` for a center ``r0`` (float64 ``[d]``, exactly ``r0_exact``; ``None``
        when ``r0`` holds integers) and real noise ``eps`` ``[B, d]``."""
        if self.float32:
            return self._float32(r0, r0_exact, eps)
        u = eps * (1.0 / float(self.scale))
        u += r0[None, :]
        lo, hi = self.lo - 2, self.hi + 2  # beyond these the clamp decides (R is monotone)
        np.clip(u, lo, hi, out=u)
        tol = _TOL * max(1.0, abs(lo), abs(hi))  # |u| <= max(|lo|, |hi|): float64 error far below tol
        q = np.floor(u)
        frac = u - q
        if self.rounding == Rounding.FLOOR:
            near = (frac <= tol) | (frac >= 1.0 - tol)
        else:
            frac -= 0.5
            near = np.abs(frac) <= tol
            q += frac >= 0
        if near.any():
            for b, j in zip(*np.nonzero(near), strict=True):
                c = Fraction(int(r0[j])) if r0_exact is None else r0_exact[j]
                q[b, j] = round_fraction(c + Fraction(float(eps[b, j])) / self.scale, self.rounding)
        return np.clip(q, self.lo, self.hi).astype(np.int64)

    def _float32(self, r0: np.ndarray, r0_exact: Sequence[Fraction] | None, eps: np.ndarray) -> np.ndarray:
        s = float(self.scale)
        v = (r0[None, :] - self.zero_point) * s + eps  # the real input v = s (r0 - z) + eps, then fl32
        q = np.float32(v.astype(np.float32)) / np.float32(s)
        q = np.where(np.isfinite(q), q, np.sign(q) * 2.0**40)
        return np.clip(np.rint(q.astype(np.float64)) + self.zero_point, self.lo, self.hi).astype(np.int64)


def centers(net: QNetwork, images: np.ndarray, preprocess: Preprocess | None = None
            ) -> tuple[np.ndarray, list[list[Fraction]] | None]:
    """The real inputs of raw samples in grid units, ``r0 = v0 / s_in + z_in`` (float64 ``[B, d]``), and their
    exact values (``None`` when they are the grid points themselves: data on the grid, no preprocessing)."""
    if preprocess is None:
        return pixels_to_grid(net, images).astype(np.float64), None
    raw = data_layout(net, np.asarray(images)).astype(np.int64)
    shp = net.input_shape
    c = shp[0] if len(shp) == 3 else 1
    ch = np.repeat(np.arange(c), net.num_inputs // c)
    table = [[preprocess.real(p, k) / net.input_scale + net.input_zero_point
              for p in range(preprocess.data_lo, preprocess.data_hi + 1)] for k in range(c)]
    exact = [[table[ch[j]][int(p) - preprocess.data_lo] for j, p in enumerate(row)] for row in raw]
    return np.array([[float(f) for f in row] for row in exact], dtype=np.float64), exact


# ------------------------------------------------------------------------------------------------ engines
class Engine:
    """Classifies integer input batches: the numpy executor (``device`` ``cpu`` or ``numpy``), or the torch view on
    a device (``cuda[:i]``, ``torch:cpu``); ``auto``: CUDA when present, else the numpy executor. Both are exact."""

    def __init__(self, net: QNetwork, device: str = "auto") -> None:
        self.net = net
        self.tn = None
        dev = device
        if device == "auto":
            dev = "cpu"
            try:
                import torch

                if torch.cuda.is_available():
                    dev = "cuda"
            except ImportError:  # pragma: no cover
                pass
        if dev.startswith("torch:"):  # the torch view on this device (e.g. torch:cpu)
            dev = dev.partition(":")[2]
        elif dev in ("cpu", "numpy"):
            dev = "numpy"
        self.device = dev
        if dev != "numpy":
            import torch

            from qverify.torch_net import TorchNet

            if dev.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"device {device!r}: CUDA is not available here (use auto or cpu)")

            self.tn = TorchNet(net, device=dev, check_integers=False)
        self.name = "numpy executor (CPU)" if self.tn is None else f"torch view ({dev})"

    def classes(self, x: np.ndarray) -> np.ndarray:
        """The predicted class of every row of ``x`` (int64 ``[B, d]`` on the grid)."""
        if self.tn is None:
            return argmax_first(forward(self.net, x, batch_size=len(x) or 1))
        import torch

        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(self.tn.device_)
            y = self.tn(t).cpu().numpy()
        return argmax_first(y)


def noise_block(seed: int, sample_id: int, phase: int, block: int, rows: int, dim: int, sigma: float) -> np.ndarray:
    """Block ``block`` of the noise of one sample and phase: ``sigma * N(0, I)`` ``[rows, dim]`` float64 from
    ``PCG64(SeedSequence([seed, sample_id, phase, block]))``."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(sample_id), int(phase),
                                                                       int(block)])))
    return rng.standard_normal((rows, dim)) * float(sigma)


@dataclass
class Sampler:
    """The noisy integer inputs ``Q(v0 + eps)`` of one sample: rows ``[start, stop)`` of a phase, in batches."""

    quantizer: InputQuantizer
    r0: np.ndarray
    r0_exact: list[Fraction] | None
    sigma: float
    seed: int
    sample_id: int

    def batches(self, phase: int, n: int, batch: int) -> Iterator[np.ndarray]:
        """The integer inputs of the first ``n`` noise samples of ``phase``, as batches of at most ``batch`` rows
        (generated a block at a time)."""
        d = len(self.r0)
        for b0 in range(0, n, NOISE_BLOCK):
            rows = min(NOISE_BLOCK, n - b0)
            # the first rows of a block (a generator's stream: a prefix of the full block's draw)
            eps = noise_block(self.seed, self.sample_id, phase, b0 // NOISE_BLOCK, rows, d, self.sigma)
            for s in range(0, rows, batch):
                yield self.quantizer(self.r0, self.r0_exact, eps[s:s + batch])


def sample_classes(engine: Engine, sampler: Sampler, phase: int, n: int, batch: int,
                   on_rows: Callable[[int], None] | None = None) -> np.ndarray:
    """The base classifier's class on each of the first ``n`` noise samples of ``phase`` (int64 ``[n]``)."""
    out = []
    for x in sampler.batches(phase, n, batch):
        out.append(engine.classes(x))
        if on_rows is not None:
            on_rows(len(x))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _counts(classes: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(classes, minlength=k).astype(np.int64)


# ------------------------------------------------------------------------------------------------ one sample
@dataclass
class Certificate:
    """CERTIFY's answer for one sample (``prediction`` :data:`ABSTAIN` with ``radius`` ``None`` when it abstains)."""

    prediction: int
    radius: float | None
    p_lower: float
    count: int
    n: int
    counts: list[int]
    counts0: list[int]
    predict: int


def certify_sample(engine: Engine, sampler: Sampler, n0: int, n: int, alpha: float, batch: int,
                   phases: tuple[int, int] = (0, 1), keep: bool = False,
                   on_rows: Callable[[int], None] | None = None) -> tuple[Certificate, np.ndarray | None]:
    """Cohen et al.'s CERTIFY for one sample (module docstring); with ``keep`` also the class of every estimation
    sample (for an incremental run's cache)."""
    k = engine.net.num_outputs
    c0 = _counts(sample_classes(engine, sampler, phases[0], n0, batch, on_rows), k)
    ca = int(np.argmax(c0))
    cls = sample_classes(engine, sampler, phases[1], n, batch, on_rows)
    counts = _counts(cls, k)
    p = clopper_pearson_lower(int(counts[ca]), n, alpha)
    r = certified_radius(p, sampler.sigma)
    cert = Certificate(ca if r is not None else ABSTAIN, r, p, int(counts[ca]), n, counts.tolist(), c0.tolist(),
                       predict_from_counts(counts, alpha))
    return cert, (cls if keep else None)


def incremental_bound(p_ref: float, disagree: int, n_p: int, alpha_zeta: float, sigma: float
                      ) -> tuple[float, float, float | None]:
    """``(zeta_up, p'_A, R')``: the Clopper-Pearson upper bound of the disagreement rate from ``disagree`` of
    ``n_p`` samples, ``p'_A = p_ref - zeta_up`` and the radius ``sigma Phi^{-1}(p'_A)`` (``None``: too weak)."""
    zeta = clopper_pearson_upper(disagree, n_p, alpha_zeta)
    p = p_ref - zeta
    return zeta, p, certified_radius(p, sigma)


# ------------------------------------------------------------------------------------------------ results file
@dataclass
class SmoothResults(RecordFile):
    """A parsed smoothing results file (first record of each sample id)."""

    def done(self) -> set[int]:
        return {int(r["id"]) for r in self.records}

    def by_id(self) -> dict[int, dict]:
        return {int(r["id"]): r for r in self.records}


def is_smooth_results(path: str | Path) -> bool:
    """Whether ``path`` starts with a smoothing results header."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
        return json.loads(line.decode("utf-8")).get("format") == SMOOTH_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_smooth_results(path: str | Path, repair: bool = False) -> SmoothResults:
    """Parse a smoothing results file; a truncated last line is reported (and with ``repair`` cut off), any other
    malformed line raises :class:`~qverify.certify.ResultsFileError` naming it."""
    return read_record_file(path, SmoothResults(Path(path), None), SMOOTH_FORMAT, SMOOTH_VERSION, "qverify smooth",
                            lambda rec: int(rec["id"]), repair)


#: header fields that must agree for a file to be resumed
_IDENTITY = ("sigma", "n0", "n", "alpha", "seed", "noise_block", "preprocess", "quantizer", "reuse_identity")


def _diffs(old: dict, new: dict) -> list[str]:
    out = []
    if old["model"]["network_sha256"] != new["model"]["network_sha256"]:
        out.append(f"model: the file was written for network sha256 {old['model']['network_sha256'][:16]}..., this "
                   f"run's network is {new['model']['network_sha256'][:16]}...")
    if old["data"]["sha256"] != new["data"]["sha256"]:
        out.append("data: the file was written for another data set")
    out += [f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in _IDENTITY if old.get(k) != new.get(k)]
    return out


# ------------------------------------------------------------------------------------------------ summary
def summarize_smoothing(records: Sequence[dict], radii: Sequence[float] = DEFAULT_RADII) -> dict:
    """``{"n", "abstain", "clean_accuracy" (c_A = label, radius >= 0), "acr", "certified": [{"radius",
    "certified_accuracy"}], "time_total", "time_mean", "incremental", "fallback"}`` over the records."""
    n = len(records)
    rad = [float(r["radius"]) if r.get("correct") and r.get("radius") is not None else None for r in records]
    cert = [{"radius": float(t), "certified_accuracy": (sum(1 for v in rad if v is not None and v >= t) / n)
             if n else None} for t in radii]
    times = [float(r["seconds"]) for r in records]
    return {"n": n, "abstain": sum(1 for r in records if r["prediction"] == ABSTAIN),
            "clean_accuracy": sum(1 for v in rad if v is not None) / n if n else None,
            "acr": sum(v for v in rad if v is not None) / n if n else None, "certified": cert,
            "time_total": sum(times), "time_mean": sum(times) / n if n else None,
            "incremental": sum(1 for r in records if r.get("method") == "incremental"),
            "fallback": sum(1 for r in records if r.get("method") in ("fallback", "abstained"))}


@dataclass
class SmoothSummary:
    """What :func:`smooth` did."""

    results_path: Path
    header: dict
    records: list[dict]
    new: int
    resumed: int
    repaired: str | None
    wall_seconds: float
    samples_per_second: float | None = None

    def summary(self, radii: Sequence[float] = DEFAULT_RADII) -> dict:
        return summarize_smoothing(self.records, radii)

    def format_table(self, radii: Sequence[float] = DEFAULT_RADII) -> str:
        """Certified accuracy per radius and the ACR, as plain text (for the command line)."""
        s = self.summary(radii)
        h = self.header
        lines = [f"sigma {h['sigma']:g}, n0 {h['n0']}, n {h['n']}, alpha {h['alpha']:g}, {s['n']} samples, "
                 f"{s['abstain']} abstained" + (f", {s['incremental']} incremental / {s['fallback']} fallback"
                                                if h.get("reuse") else ""),
                 "radius (l2, real input units)  certified accuracy"]
        for c in s["certified"]:
            acc = "-" if c["certified_accuracy"] is None else f"{100 * c['certified_accuracy']:.1f}%"
            lines.append(f"{c['radius']:>29g}  {acc}")
        lines.append(f"ACR {s['acr']:.4f}" if s["acr"] is not None else "ACR -")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ runner
def smooth(net: QNetwork, images: np.ndarray, labels: np.ndarray, sigma: float, *, results_path: str | Path,
           n0: int = 100, n: int = 100_000, alpha: float = 0.001, batch: int = 1000, seed: int = 0,
           ids: Sequence[int] | None = None, sample: int | None = None, preprocess: Preprocess | None = None,
           device: str = "auto", progress: bool = True, model_path: str | Path | None = None,
           model_name: str | None = None, data_path: str | Path | None = None, command: str | None = None,
           overwrite: bool = False, cache_predictions: bool = False, reuse: str | Path | None = None,
           reference_net: QNetwork | None = None, n_p: int | None = None, alpha_zeta: float | None = None,
           fallback: str = "full", log: Callable[[str], None] | None = None,
           on_record: Callable[[dict], None] | None = None) -> SmoothSummary:
    """Randomized-smoothing CERTIFY of every selected sample, appended to ``results_path`` (module docstring).

    ``images`` are raw data (grid points, or raw pixels with ``preprocess``), ``labels`` the classes; ``sigma`` is
    in the real input units (``preprocess``'s when given). ``batch`` rows go to the executor at once; ``device``:
    ``auto`` (CUDA when present, else the numpy executor), ``cpu``/``numpy``, ``cuda[:i]``. ``cache_predictions``
    stores the class of every estimation sample in ``<results>.cache/<id>.npy`` (what an incremental run reuses).

    ``reuse``: the results file of a reference run (another network of the same input grid, same data, sigma, n0,
    n, alpha, seed): each sample is certified incrementally from its record (module docstring) with ``n_p``
    (default ``n // 10``) reused noise samples and confidence ``1 - alpha_zeta`` (default ``alpha``) for the
    disagreement bound, falling back to a full CERTIFY where the bound is too weak. The reference's per-sample
    classes come from its cache, or from ``reference_net`` (default: the model file its header names, checked
    against its network hash). ``fallback="abstain"`` abstains instead of running the full CERTIFY (sound, and
    only as costly as the disagreement estimate).
    """
    t_start = time.monotonic()
    if log is None:
        def log(msg: str) -> None:
            if progress:
                print(f"qverify smooth: {msg}", file=sys.stderr)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if n0 < 1 or n < 1 or batch < 1:
        raise ValueError(f"n0, n and batch must be positive (got {n0}, {n}, {batch})")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    sel = select_ids(len(images), ids, sample, seed)
    quant = InputQuantizer.of(net)
    ref = _Reference.open(reuse, net, reference_net, n, n_p, alpha if alpha_zeta is None else alpha_zeta,
                          fallback) if reuse is not None else None
    header = {"type": "header", "format": SMOOTH_FORMAT, "format_version": SMOOTH_VERSION, "created": _now(),
              "model": model_info(net, model_path, model_name),
              "data": {"path": str(data_path) if data_path is not None else None,
                       "sha256": data_sha256(images, labels), "n_samples": int(len(images)),
                       "sample_shape": list(images.shape[1:])},
              "selection": {"ids": sel if ids is not None else None, "sample": sample, "n": len(sel)},
              "sigma": float(sigma), "n0": int(n0), "n": int(n), "alpha": float(alpha), "seed": int(seed),
              "noise_block": NOISE_BLOCK, "noise": "numpy PCG64, SeedSequence([seed, id, phase, block]), "
                                                  "sigma * standard_normal (float64)",
              "preprocess": preprocess.spec() if preprocess is not None else None,
              "real_units": preprocess.describe() if preprocess is not None else
              f"v = {net.input_scale} * (x - {net.input_zero_point})",
              "quantizer": quant.describe(), "reuse": ref.info() if ref else None,
              "reuse_identity": ref.identity() if ref else None, "versions": versions(), "command": command}
    if ref is not None:
        ref.check(header)
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(path)
    try:
        opened = open_record_file(path, header, overwrite, writer, log, read_smooth_results, _diffs)
        header, done, old_records, repaired = opened.header, opened.done, opened.records, opened.repaired
        if done:
            log(f"resuming {path}: {len(done & set(sel))} samples already done")
        todo = [k for k in range(len(sel)) if sel[k] not in done]
        engine = Engine(net, device)
        writer.write({"type": "session", "started": _now(), "command": command, "n_samples": len(sel),
                      "already_done": len(sel) - len(todo), "engine": engine.name, "batch": int(batch),
                      "pid": os.getpid(), "repaired": repaired}, sync=True)
        cache = Path(str(path) + ".cache") if cache_predictions else None
        if cache is not None:
            cache.mkdir(exist_ok=True)
        r0, r0x = centers(net, images[[sel[k] for k in todo]], preprocess) if todo else (None, None)
        new_records: list[dict] = []
        bar = _bar(len(sel), len(sel) - len(todo), progress)
        evaluated = 0
        t_eval = 0.0

        def rows(m: int) -> None:
            nonlocal evaluated
            evaluated += m

        try:
            for j, k in enumerate(todo):
                i = sel[k]
                t0 = time.monotonic()
                smp = Sampler(quant, r0[j], None if r0x is None else r0x[j], float(sigma), int(seed), int(i))
                if ref is not None:
                    rec = ref.certify(engine, smp, i, n0, n, alpha, batch, rows)
                else:
                    cert, cls = certify_sample(engine, smp, n0, n, alpha, batch, keep=cache is not None, on_rows=rows)
                    rec = _record(cert, "full")
                    if cache is not None:
                        _save_cache(cache, i, cls)  # type: ignore[arg-type]
                dt = time.monotonic() - t0
                t_eval += dt
                rec = {"type": "instance", "id": int(i), "label": int(labels[i]), **rec,
                       "correct": bool(rec["prediction"] == int(labels[i])), "seconds": dt, "finished": _now()}
                writer.write(rec)
                new_records.append(rec)
                if bar is not None:
                    bar.set_postfix({"certified": sum(1 for r in new_records if r["correct"]),
                                     "abstain": sum(1 for r in new_records if r["prediction"] == ABSTAIN),
                                     "samples/s": f"{evaluated / max(t_eval, 1e-9):.3g}"}, refresh=False)
                    bar.update(1)
                if on_record is not None:
                    on_record(rec)
        finally:
            if bar is not None:
                bar.close()
        wall = time.monotonic() - t_start
        writer.write({"type": "session_end", "finished": _now(), "wall_seconds": wall, "new": len(new_records),
                      "noise_samples": evaluated}, sync=True)
    finally:
        writer.close()
    return SmoothSummary(path, header, old_records + new_records, len(new_records), len(old_records), repaired,
                         time.monotonic() - t_start, evaluated / t_eval if t_eval > 0 and evaluated else None)


def _record(cert: Certificate, method: str) -> dict:
    return {"prediction": cert.prediction, "predict": cert.predict, "count": cert.count, "n": cert.n,
            "counts": cert.counts, "counts0": cert.counts0, "p_lower": cert.p_lower, "radius": cert.radius,
            "method": method}


def _bar(total: int, initial: int, enabled: bool):  # noqa: ANN202 - a tqdm bar or None
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="smooth", unit="img", dynamic_ncols=True, smoothing=0.05)


def _save_cache(cache: Path, i: int, cls: np.ndarray) -> None:
    tmp = cache / f"{i}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, cls.astype(np.int16))
    tmp.replace(cache / f"{i}.npy")


# ------------------------------------------------------------------------------------------------ incremental
class _Reference:
    """The reference certificate of an incremental run: its results, its cached classes or its network."""

    def __init__(self, path: Path, results: SmoothResults, net: QNetwork | None, n_p: int, alpha_zeta: float,
                 fallback: str = "full") -> None:
        if fallback not in ("full", "abstain"):
            raise ValueError(f"fallback must be 'full' or 'abstain', got {fallback!r}")
        self.fallback = fallback
        self.path, self.results, self.net = path, results, net
        self.records = results.by_id()
        self.n_p, self.alpha_zeta = n_p, alpha_zeta
        self.cache = Path(str(path) + ".cache")
        self.engine: Engine | None = None

    @classmethod
    def open(cls, path: str | Path, net: QNetwork, reference_net: QNetwork | None, n: int, n_p: int | None,
             alpha_zeta: float, fallback: str = "full") -> _Reference:
        p = Path(path)
        res = read_smooth_results(p)
        if res.header is None:
            raise ResultsFileError(f"{p}: no header (empty smoothing results file?)")
        if res.header.get("reuse"):
            raise ResultsFileError(f"{p} is itself an incremental run; reuse the full run it came from")
        n_p = max(1, n // 10) if n_p is None else int(n_p)
        if not 0 < n_p <= int(res.header["n"]):
            raise ValueError(f"n_p = {n_p} must lie in [1, {res.header['n']}] (the reference's estimation samples)")
        if not 0 < alpha_zeta < 1:
            raise ValueError(f"alpha_zeta must lie in (0, 1), got {alpha_zeta}")
        return cls(p, res, reference_net, n_p, alpha_zeta, fallback)

    def identity(self) -> dict:
        h = self.results.header or {}
        return {"network_sha256": h["model"]["network_sha256"], "n_p": self.n_p, "alpha_zeta": self.alpha_zeta,
                "fallback": self.fallback}

    def info(self) -> dict:
        from qverify.certify import file_sha256

        return {"path": str(self.path), "sha256": file_sha256(self.path), **self.identity(),
                "model": (self.results.header or {})["model"].get("name")}

    def check(self, header: dict) -> None:
        h = self.results.header or {}
        bad = [f"{k} {h.get(k)!r} (reference) vs {header.get(k)!r}" for k in ("sigma", "n0", "n", "alpha", "seed",
                                                                              "noise_block", "preprocess")
               if h.get(k) != header.get(k)]
        if h["data"]["sha256"] != header["data"]["sha256"]:
            bad.append("another data set")
        for k in ("input_shape", "input_grid", "input_scale", "input_zero_point", "num_outputs"):
            if h["model"].get(k) != header["model"].get(k):
                bad.append(f"model {k} {h['model'].get(k)!r} (reference) vs {header['model'].get(k)!r}")
        if bad:
            raise ResultsFileError(f"{self.path} cannot be reused for this run: " + "; ".join(bad))

    def _reference_classes(self, smp: Sampler, i: int, batch: int, on_rows: Callable[[int], None], device: str
                           ) -> np.ndarray:
        f = self.cache / f"{i}.npy"
        if f.exists():
            cls = np.load(f)
            if len(cls) >= self.n_p:
                return cls[:self.n_p].astype(np.int64)
        if self.engine is None:
            self.engine = Engine(self._net(), device)
        return sample_classes(self.engine, smp, 1, self.n_p, batch, on_rows)

    def _net(self) -> QNetwork:
        from qverify.certify import network_sha256

        h = self.results.header or {}
        net = self.net
        if net is None:
            where = h["model"].get("path")
            if not where or not Path(where).exists():
                raise ResultsFileError(f"{self.path}: no prediction cache for this sample and the reference model "
                                       f"{where!r} is not at hand (pass the reference network)")
            from qverify.io import load_model

            net = load_model(where)
        if network_sha256(net) != h["model"]["network_sha256"]:
            raise ResultsFileError(f"the reference network does not match {self.path}'s (network sha256)")
        self.net = net
        return net

    def certify(self, engine: Engine, smp: Sampler, i: int, n0: int, n: int, alpha: float, batch: int,
                on_rows: Callable[[int], None]) -> dict:
        rec = self.records.get(int(i))
        if rec is not None and rec["prediction"] != ABSTAIN:
            mine = sample_classes(engine, smp, 1, self.n_p, batch, on_rows)
            theirs = self._reference_classes(smp, i, batch, on_rows, engine.device)
            k = int(np.sum(mine != theirs))
            zeta, p, r = incremental_bound(float(rec["p_lower"]), k, self.n_p, self.alpha_zeta, smp.sigma)
            extra = {"disagree": k, "n_p": self.n_p, "zeta_upper": zeta,
                     "reference": {"prediction": rec["prediction"], "p_lower": rec["p_lower"],
                                   "radius": rec["radius"]}}
            if r is not None:
                return {"prediction": int(rec["prediction"]), "predict": None, "count": None, "n": self.n_p,
                        "counts": None, "counts0": None, "p_lower": p, "radius": r, "method": "incremental",
                        **extra}
        else:
            extra = {"reference": None if rec is None else {"prediction": rec["prediction"],
                                                            "p_lower": rec["p_lower"], "radius": rec["radius"]}}
        if self.fallback == "abstain":  # abstaining is always sound
            return {"prediction": ABSTAIN, "predict": None, "count": None, "n": self.n_p if rec else 0,
                    "counts": None, "counts0": None, "p_lower": 0.0, "radius": None, "method": "abstained", **extra}
        cert, _ = certify_sample(engine, smp, n0, n, alpha, batch, phases=(2, 3), on_rows=on_rows)
        return {**_record(cert, "fallback"), **extra}


__all__ = ["ABSTAIN", "Certificate", "DEFAULT_RADII", "Engine", "InputQuantizer", "NOISE_BLOCK", "SMOOTH_FORMAT",
           "Sampler", "SmoothResults", "SmoothSummary", "centers", "certified_radius", "certify_sample",
           "clopper_pearson_lower", "clopper_pearson_upper", "incremental_bound", "is_smooth_results",
           "noise_block", "predict_from_counts", "read_smooth_results", "sample_classes", "smooth",
           "summarize_smoothing"]
