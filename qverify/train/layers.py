"""Fake-quantized layers for quantization-aware (and QA-IBP) training, exact in their integer semantics.

Units. A quantized :class:`QuantNet` computes on *integer units* held in float64 tensors, the very integers of the
exported :class:`~qverify.network.QNetwork`. Block ``l`` (dense or conv) with input scale ``s_in = 2^p_in``,
weight scale ``s_w = 2^p_w`` (per tensor or per output channel ``c``) and output scale ``s_out = 2^p_out``:

* weights  ``W = clamp(rne(w / s_w), -2^(b_w-1), 2^(b_w-1) - 1)``             (``rne``: round half to even)
* bias     ``B = clamp(rne(b / (s_in s_w)), -2^(b_b-1), 2^(b_b-1) - 1)``       (at the accumulator scale)
* acc      ``acc = W x + B``                                                   (exact integers in float64)
* requant  ``y = clamp(R(acc * M_c), lo, hi)``, ``M_c = s_in s_w,c / s_out``   (zero points are 0)

with ``[lo, hi] = [0, 2^b_a - 1]`` for hidden blocks (the clamp is the ReLU) and the signed ``b_o``-bit range for
the output block. The real value of an activation is ``s_out * y``. Weight and bias rounding only *produce*
integer parameters (any fixed rule would do); the requantization ``R`` is the semantics and is the model's
rounding mode (``qverify.quant.Rounding``).

Scales. ``pow2`` (fixed point, QVIP / QA-IBP): every ``p`` is an integer, so ``M_c = 2^-k`` exactly; scales are
fixed (from the config or a calibration) or learned through a rounded log2 with a straight-through estimator.
``affine``: ``p`` is a learned real log2 scale (LSQ/PACT-style: the clip threshold ``s_out * hi`` moves with
the loss), and ``M_c`` is rounded to a dyadic ``m_c / 2^k_c`` with ``mult_bits`` significant bits (straight
through), so the exported multiplier is exactly the one the torch forward used.

Exactness. On integer inputs the forward pass computes the integer network bit for bit: float64 sums of integer
products below ``2^53`` are exact, and the rounding of ``acc * m_c / 2^k_c`` is done by
:func:`qverify.quant.multiply_round` (the one place rounding is written) on the integer accumulators.
Off the grid (real-valued training boxes during the epsilon ramp) the rounding of a real ``v`` is the same rule
applied to the real number (:func:`round_real`), a relaxation used only for training.

Residual blocks (``model.arch = "resnet"``). After the stem convs, each identity block computes
``h = relu(Q(conv_a(x)))`` and ``y = relu(Q(conv_b(h) + x))`` (3x3, stride 1, padding 1, the stem's channels).
The skip is folded into ``conv_b``'s accumulator, so the block has one requantization after the add (not the
two of :mod:`qverify.quantize`'s ``Add``). With ``s_x`` the scale of the block input ``x`` and
``u_c = s_h s_w,c`` the accumulator scale of ``conv_b``:

* ``f_c = 2^max(0, ceil(log2(P u_c / s_x)))`` and the common unit ``c_c = u_c / f_c``;
* ``acc_c = f_c (W_b h + B_b)_c + k_c x_c`` with the integer skip weight ``k_c = rne(s_x / c_c)``;
* ``y = clamp(R(acc * M_c), 0, 2^b_a - 1)`` with ``M_c = c_c / s_out`` (dyadic-rounded as any multiplier).

In real units ``c_c acc_c = u_c (W_b h + B_b)_c + (c_c k_c) x_c`` with ``c_c k_c ~ s_x``: the real sum
``conv_b(h) + x`` of the two quantized values. ``P = 1`` when every scale is a power of two (``pow2`` with
uniform weights): then ``k_c = s_x / c_c = 2^max(p_x - p_u, 0)`` exactly (no rounding) and ``M_c`` is an exact
power of two (the block stays fixed point). Otherwise ``P = RESIDUAL_PRECISION`` (``2^8``), so that
``k_c >= 2^8`` carries the real ratio to within ``2^-9`` relative. In either case ``k_c`` and ``f_c W_b``,
``f_c B_b`` are the integers both the torch forward and the export use, so the two agree bit for bit (``k`` takes
a straight-through gradient to the scales). ``f`` and ``k`` widen the accumulator; the export checks from
worst-case ranges that ``|acc| num_c < 2^53`` (float64 exactness) and names the layer otherwise. The export is
four nodes: ``Conv2d(f W_b, f B_b)`` on ``h``, a 1x1 ``Conv2d`` with the diagonal weights ``k_c`` (bias 0) on
``x``, ``Add((1, 1))`` of the two, and the ``Requantize``. Float mode: ``k = 1``, ``y = relu(conv_b(h) + x)``.
Per-layer widths count the affine layers in the order stem convs, then ``conv_a``, ``conv_b`` of each block, then
the dense layers and the output layer; ``act_bits[i]`` of a ``conv_b`` is the width of the block output ``y``.

Gradients (straight-through estimators): ``d R(v) / dv = 1``; the clamps pass ``1`` inside ``[lo, hi]`` and
``leak`` outside (``clamp_leak``), so the gradient of a saturated neuron or weight does not silently die; in the
affine scheme the activation clip ``s_out * hi`` also learns (PACT-like) through ``s_out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qverify.quant import INT64_SAFE, Rounding, multiply_round
from qverify.torch_net import LeakyClamp

SCHEMES = ("pow2", "affine")
#: weight quantizers: ``uniform`` (the module docstring's rounding and clamp), ``binaryrelax`` (per layer by its
#: width: 1 bit binary, 2 bits ternary, 4 bits uniform with a least-squares scale) and ``pow2-bases`` (2-bit weights
#: as two power-of-two binary bases), the last two set by ``train.method`` (:mod:`qverify.train.wquant`)
WEIGHT_QUANTIZERS = ("uniform", "binaryrelax", "pow2-bases")
#: the widths each non-uniform weight quantizer accepts, and what it makes of them
_QUANTIZER_BITS = {"binaryrelax": ({1: "binary", 2: "ternary", 4: "uniform"},
                                   "1 (binary), 2 (ternary) or 4 for train.method = 'binaryrelax'"),
                   "pow2-bases": ({2: "pow2-bases"}, "2 (two power-of-two binary bases) for train.method = "
                                                     "'robust2bit'")}
DTYPE = torch.float64
#: |acc * m| below this is an exact float64 integer and fits int64 arithmetic in multiply_round
_EXACT = 2**53
#: the smallest skip weight ``k`` of a residual conv whose scales are not all powers of two (affine scheme, or a
#: non-uniform weight quantizer): ``k = rne(s_x / c)`` is then within ``1 / (2 P)`` of the real ratio
RESIDUAL_PRECISION = 2**8


class QuantError(ValueError):
    """A quantization setting or state that cannot be trained or exported exactly."""


@dataclass(frozen=True)
class QuantConfig:
    """How a :class:`QuantNet` quantizes (see the module docstring for the arithmetic).

    ``rounding`` ``None`` means ``half_up`` for ``pow2`` (QVIP) and ``half_even`` for ``affine`` (ONNX).
    ``learn_scales`` ``None`` means ``False`` for ``pow2`` and ``True`` for ``affine``.
    ``*_int_bits`` set the initial (pow2: fixed) ranges: weights ``[-2^i, 2^i)``, hidden activations
    ``[0, 2^i)``, outputs ``[-2^i, 2^i)``; a calibration (:func:`calibrate`) overrides them from data.

    Mixed precision: ``weight_bits`` is one width for every affine (dense / conv) layer or a list with one width
    per affine layer, in order (a ``resnet``: the stem convs, ``conv_a`` and ``conv_b`` of each residual block, the
    dense layers, the output layer); ``act_bits`` one width or a list with one per *hidden* affine layer (the width of
    its requantized output); ``out_bits`` is the output layer's. The same lists drive ``qverify quantize``
    (:mod:`qverify.quantize`), so QAT and PTQ read one config. :meth:`layer_bits` resolves them for a model and
    names the setting whose list has the wrong length.

    ``weight_quantizer`` (derived from ``train.method`` by the trainer's config reader): ``uniform`` (the module
    docstring's weights), ``binaryrelax`` (``weight_bits`` per layer 1: binary, 2: ternary, 4: 4-bit with a
    least-squares scale) or ``pow2-bases`` (``weight_bits = 2``: two power-of-two binary bases); the last two
    compute codes times a scale (:mod:`qverify.train.wquant`), the scale folded into the requantization multiplier.
    """

    scheme: str = "pow2"
    weight_bits: int | tuple[int, ...] = 8
    act_bits: int | tuple[int, ...] = 8
    out_bits: int = 8
    bias_bits: int = 32
    per_channel: bool = False
    rounding: str | None = None
    learn_scales: bool | None = None
    weight_int_bits: int = 0
    act_int_bits: int = 2
    out_int_bits: int = 3
    clamp_leak: float = 0.01
    mult_bits: int = 16
    calibrate: bool = True
    weight_quantizer: str = "uniform"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantError(f"quant.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise QuantError(f"quant.weight_quantizer must be one of {WEIGHT_QUANTIZERS}, got "
                             f"{self.weight_quantizer!r}")
        for name in ("weight_bits", "act_bits", "out_bits"):
            b = getattr(self, name)
            if isinstance(b, (list, tuple)):
                if name == "out_bits" or not b:
                    raise QuantError(f"quant.{name} must be one integer{' or a non-empty list' if b == () else ''}"
                                     f", got {list(b)}")
                object.__setattr__(self, name, tuple(b))
                items = [(f"quant.{name}[{i}]", v) for i, v in enumerate(b)]
            else:
                items = [(f"quant.{name}", b)]
            for where, v in items:
                if name == "weight_bits" and self.weight_quantizer in _QUANTIZER_BITS:
                    allowed, what = _QUANTIZER_BITS[self.weight_quantizer]
                    if isinstance(v, bool) or v not in allowed:
                        raise QuantError(f"{where} must be {what}, got {v!r}")
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 2 <= v <= 16:
                    raise QuantError(f"{where} must be an integer in 2..16 (1 bit is binary, which needs a binary "
                                     f"method), got {v!r}")
        if not 4 <= self.bias_bits <= 48:
            raise QuantError(f"quant.bias_bits must be in 4..48, got {self.bias_bits}")
        if not 2 <= self.mult_bits <= 31:
            raise QuantError(f"quant.mult_bits must be in 2..31, got {self.mult_bits}")
        if not 0.0 <= self.clamp_leak <= 1.0:
            raise QuantError(f"quant.clamp_leak must be in [0, 1], got {self.clamp_leak}")
        if self.rounding is not None:
            try:
                Rounding(self.rounding)
            except ValueError:
                raise QuantError(f"quant.rounding: unknown mode {self.rounding!r} "
                                 f"(known: {', '.join(r.value for r in Rounding)})") from None

    @property
    def mode(self) -> Rounding:
        if self.rounding is not None:
            return Rounding(self.rounding)
        return Rounding.HALF_UP if self.scheme == "pow2" else Rounding.HALF_EVEN

    @property
    def max_bits(self) -> int:
        """The widest of the weight, activation and output widths (over every layer)."""
        return max(max(_as_tuple(self.weight_bits)), max(_as_tuple(self.act_bits)), self.out_bits)

    def layer_bits(self, n_affine: int) -> list[tuple[int, int]]:
        """``(weight bits, output bits)`` of each of ``n_affine`` affine layers (the last one's output bits are
        ``out_bits``); a per-layer list of another length is an error naming the setting."""
        if n_affine < 1:
            raise QuantError("a quantized model needs at least one affine (dense / conv) layer")
        wb = _per_layer(self.weight_bits, n_affine, "quant.weight_bits", "affine (dense / conv) layers")
        ab = _per_layer(self.act_bits, n_affine - 1, "quant.act_bits", "hidden affine layers (all but the output)")
        return [(w, a) for w, a in zip(wb, [*ab, self.out_bits], strict=True)]

    @property
    def learn(self) -> bool:
        return (self.scheme == "affine") if self.learn_scales is None else bool(self.learn_scales)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise QuantError(f"unknown quant settings {sorted(bad)} (known: {sorted(known)})")
        return cls(**d)


def _as_tuple(b: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(v) for v in b) if isinstance(b, (list, tuple)) else (int(b),)


def _per_layer(b: int | tuple[int, ...], n: int, name: str, what: str) -> list[int]:
    """One width per layer from a single width or a per-layer list (of exactly ``n`` entries)."""
    if not isinstance(b, (list, tuple)):
        return [int(b)] * n
    if len(b) != n:
        raise QuantError(f"{name} lists {len(b)} widths {list(b)}, the model has {n} {what}")
    return [int(v) for v in b]


# ------------------------------------------------------------------------------------------ rounding
def round_real(v: torch.Tensor, mode: Rounding | str) -> torch.Tensor:
    """``R(v)`` of real (float64) values, by the rule of ``mode`` (same definitions as :mod:`qverify.quant`).

    With ``r = floor(v)`` and ``h = r + 1/2``: floor ``r``; half_up ``r + [v >= h]``; half_even ties to the even
    one; half_away ties away from zero. Comparisons against ``h`` are exact (no ``v - r`` is formed). Used off the
    integer grid only (training relaxation); grid values go through :func:`qverify.quant.multiply_round`.
    """
    mode = Rounding(mode)
    r = torch.floor(v)
    if mode is Rounding.FLOOR:
        return r
    h = r + 0.5
    above = v > h
    tie = (v == h) & (v != r)
    if mode is Rounding.HALF_UP:
        up = above | tie
    elif mode is Rounding.HALF_EVEN:
        up = above | (tie & (torch.remainder(r, 2) == 1))
    else:
        up = above | (tie & (v > 0))
    return r + up.to(v.dtype)


def dyadic_parts(mult: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(num, den)`` with ``mult = num / den`` (reduced; ``den`` a power of two) for positive float64
    values: int64 arrays when they fit, else object arrays of Python ints."""
    m = np.asarray(mult, dtype=np.float64)
    if np.any(~np.isfinite(m)) or np.any(m <= 0):
        raise QuantError(f"requantization multipliers must be positive and finite, got {m}")
    fr = [Fraction(float(v)) for v in m.ravel()]
    num = np.array([f.numerator for f in fr], dtype=object).reshape(m.shape)
    den = np.array([f.denominator for f in fr], dtype=object).reshape(m.shape)
    if all(f.numerator < 2**62 and f.denominator < 2**62 for f in fr):
        return num.astype(np.int64), den.astype(np.int64)
    return num, den


def round_div_torch(n: torch.Tensor, q: torch.Tensor, mode: Rounding) -> torch.Tensor:
    """``R(n / q)`` for int64 tensors ``n`` and positive ``q`` (broadcast) on any device: the integer formulas of
    :func:`qverify.quant.round_div` (floor ``n // q``; half up ``(2n + q) // 2q``; half away on ``|n|``; half even
    from the floor and the remainder), in torch int64, whose ``//`` floors as Python's does. Exact while
    ``2|n| + 2q < 2^63`` (callers check); tested equal to the executor's rounding."""
    if mode is Rounding.FLOOR:
        return n // q
    if mode is Rounding.HALF_UP:
        return (2 * n + q) // (2 * q)
    if mode is Rounding.HALF_AWAY:
        return torch.sign(n) * ((2 * n.abs() + q) // (2 * q))
    f = n // q
    twice = 2 * (n - f * q)
    return f + ((twice > q) | ((twice == q) & (f % 2 != 0))).to(torch.int64)


class _Requant(torch.autograd.Function):
    """``R(v)`` with ``v = acc * M``: exact integer rounding on the grid, straight-through gradient."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, acc: torch.Tensor, num: np.ndarray, den: np.ndarray,  # type: ignore[override]
                mode: Rounding) -> torch.Tensor:
        a = acc.detach()
        if a.numel() and bool(torch.all(a == torch.floor(a))):
            amax = float(a.abs().max())
            if (amax < _EXACT and a.device.type != "cpu" and np.asarray(num).dtype != object
                    and np.asarray(den).dtype != object
                    and amax * float(np.max(num)) + 2 * float(np.max(den)) < INT64_SAFE / 2):
                # on a GPU: the same integer rounding in int64 on the device (no round trip through the host)
                nt = torch.as_tensor(np.asarray(num, dtype=np.int64), device=a.device)
                dt = torch.as_tensor(np.asarray(den, dtype=np.int64), device=a.device)
                return round_div_torch(a.to(torch.int64) * nt, dt, mode).to(torch.float64)
            if amax < _EXACT:  # exact integers: the executor's rounding (Python ints where int64 could overflow)
                ai = a.cpu().numpy().astype(np.int64)
                out = multiply_round(ai, num, den, mode, acc_bound=int(amax))
                return torch.from_numpy(out.astype(np.float64)).to(v.device)
        return round_real(v.detach(), mode)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, None, None, None, None


class _RoundParam(torch.autograd.Function):
    """Round half to even with identity gradient (produces integer parameters)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g


class _Pow2(torch.autograd.Function):
    """``2^round(p)`` exactly (ldexp), gradient ``ln 2 * 2^round(p)`` (straight through the rounding)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.ldexp(torch.ones_like(p), torch.round(p).to(torch.int64))
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return g * out * math.log(2.0)


class _Dyadic(torch.autograd.Function):
    """``m * 2^-k`` nearest to ``x`` with ``mult_bits`` significant bits; identity gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        mant, e = torch.frexp(x)
        m = torch.round(torch.ldexp(mant, torch.tensor(bits, device=x.device)))
        return torch.ldexp(m, e - bits)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, None


def clamp_leaky(x: torch.Tensor, lo: float, hi: float, leak: float) -> torch.Tensor:
    return LeakyClamp.apply(x, float(lo), float(hi), float(leak))


def round_param(x: torch.Tensor) -> torch.Tensor:
    return _RoundParam.apply(x)


# ------------------------------------------------------------------------------------------ blocks
class BlockParams(NamedTuple):
    """One block's effective parameters for one forward pass (integer units when quantized, real otherwise)."""

    weight: torch.Tensor
    bias: torch.Tensor
    mult: torch.Tensor | None  # requantization multiplier M_c (float64 dyadic), broadcast shape
    num: np.ndarray | None  # exact M_c = num / den
    den: np.ndarray | None
    out_log2: torch.Tensor  # log2 of the output scale (per tensor)
    #: a residual conv's integer skip weights ``k_c`` (broadcast ``[1, C, 1, 1]``; ``1`` in float mode), else None
    skip: torch.Tensor | None = None


def _log2_param(shape: tuple[int, ...], value: float, learn: bool) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, float(value), dtype=DTYPE), requires_grad=learn)


class QAffine(nn.Module):
    """Base of :class:`QLinear` and :class:`QConv2d`: quantized weights, bias and output requantization.

    ``n_layers``: the exported nodes of the block (2: affine, requantization; a residual conv: 4), so its
    activated output is value ``start + n_layers`` of :meth:`QuantNet.layer_values`."""

    n_layers = 2
    residual = False
    op_shape: tuple[int, ...] = (1, -1)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, qc: QuantConfig, last: bool,
                 bits: tuple[int, int] | None = None) -> None:
        """``bits``: this layer's ``(weight bits, output bits)`` (default: the config's single widths)."""
        super().__init__()
        self.qc = qc
        self.last = last
        self.weight = nn.Parameter(weight.to(DTYPE))
        self.bias = nn.Parameter(bias.to(DTYPE))
        out = weight.shape[0]
        if bits is None:
            wb = _as_tuple(qc.weight_bits)
            ab = _as_tuple(qc.act_bits)
            if len(wb) > 1 or (len(ab) > 1 and not last):
                raise QuantError("per-layer quant.weight_bits / quant.act_bits need the layer's bits (build_model)")
            bits = (wb[0], qc.out_bits if last else ab[0])
        self.weight_bits, self.out_bits = int(bits[0]), int(bits[1])
        wq = 2 ** (self.weight_bits - 1)
        self.wmin, self.wmax = -wq, wq - 1
        #: the weight quantizer of :mod:`qverify.train.wquant` (``None``: the uniform rounding and clamp)
        self.codes_kind: str | None = None
        #: BinaryRelax's relaxation ``eta`` (``None``: the hard projection ``Q(W)``; set by the trainer per epoch)
        self.relax_eta: float | None = None
        if qc.weight_quantizer in _QUANTIZER_BITS:
            kinds = _QUANTIZER_BITS[qc.weight_quantizer][0]
            if self.weight_bits not in kinds:
                raise QuantError(f"quant.weight_bits must be {_QUANTIZER_BITS[qc.weight_quantizer][1]}, got "
                                 f"{self.weight_bits}")
            self.codes_kind = kinds[self.weight_bits]
            from qverify.train.wquant import MAX_SPAN

            top = {"binary": 1, "ternary": 1, "uniform": wq - 1, "pow2-bases": 2**MAX_SPAN + 1}[self.codes_kind]
            self.wmin, self.wmax = -top, top
        bq = 2 ** (qc.bias_bits - 1)
        self.bmin, self.bmax = -bq, bq - 1
        if last:
            oq = 2 ** (self.out_bits - 1)
            self.lo, self.hi = -oq, oq - 1
            out_log2 = qc.out_int_bits - (self.out_bits - 1)
        else:
            self.lo, self.hi = 0, 2**self.out_bits - 1
            out_log2 = qc.act_int_bits - self.out_bits
        learn = qc.learn
        self.w_log2 = _log2_param((out if qc.per_channel else 1,), qc.weight_int_bits - (self.weight_bits - 1), learn)
        self.a_log2 = _log2_param((1,), out_log2, learn)

    # -- scales
    def _scale(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2^p, p_used)`` for a log2 parameter (pow2: rounded, straight through)."""
        if self.qc.scheme == "pow2":
            s = _Pow2.apply(p)
            return s, torch.log2(s.detach()) + (p - p.detach())
        return torch.exp2(p), p

    def _bshape(self, t: torch.Tensor) -> torch.Tensor:
        """Weight-scale view broadcasting against the weight tensor."""
        return t.reshape((-1,) + (1,) * (self.weight.ndim - 1))

    def qparams(self, in_log2: torch.Tensor, quantized: bool, skip_log2: torch.Tensor | None = None) -> BlockParams:
        """The effective parameters given the input's log2 scale (see the module docstring); a residual conv
        (``self.residual``) also needs ``skip_log2``, the log2 scale of the value its skip connection adds."""
        residual = bool(self.residual)
        if residual and skip_log2 is None:
            raise QuantError("a residual conv's parameters need the scale of its skip input (skip_log2)")
        if not quantized:
            one = torch.ones((), dtype=DTYPE, device=self.weight.device) if residual else None
            return BlockParams(self.weight, self.bias, None, None, None, in_log2, one)
        qc = self.qc
        s_o, po = self._scale(self.a_log2)
        if self.codes_kind is not None:
            # codes times a per-layer / per-channel scale s (wquant); BinaryRelax's relaxed weights G / s while
            # relax_eta is set. s is a real number (binary, ternary, uniform) or a power of two (pow2-bases): the
            # multiplier s_in s / s_out is rounded to a dyadic with mult_bits significant bits below (exact for
            # a power of two), and that dyadic is the one exported
            from qverify.train.wquant import relax, weight_codes

            codes, s_w = weight_codes(self.weight.detach(), self.codes_kind, self.weight_bits, qc.per_channel)
            w_int = relax(codes, self.weight / self._bshape(s_w), self.relax_eta)
        else:
            s_w, _ = self._scale(self.w_log2)
            w_int = clamp_leaky(round_param(self.weight / self._bshape(s_w)), self.wmin, self.wmax, qc.clamp_leak)
        # input scale: pow2 exact; the accumulator scale is s_in * s_w
        s_in = torch.exp2(in_log2) if qc.scheme == "affine" else _Pow2.apply(in_log2)
        s_acc = s_in * s_w
        b_int = clamp_leaky(round_param(self.bias / s_acc), self.bmin, self.bmax, qc.clamp_leak)
        dyadic = qc.scheme == "affine" or self.codes_kind is not None
        skip = None
        if residual:
            # the skip folded into the accumulator (module docstring, "Residual blocks"): unit c = s_acc / f with
            # f = 2^max(0, ceil(log2(P s_acc / s_x))), skip weight k = rne(s_x / c) >= P (exact when P = 1)
            assert skip_log2 is not None
            s_x = torch.exp2(skip_log2) if qc.scheme == "affine" else _Pow2.apply(skip_log2)
            precision = float(RESIDUAL_PRECISION) if dyadic else 1.0
            with torch.no_grad():
                f = torch.exp2(torch.clamp(torch.ceil(torch.log2(precision * s_acc / s_x)), min=0.0))
            k = round_param(s_x * f / s_acc)
            w_int = w_int * self._bshape(f)
            b_int = b_int * f
            s_acc = s_acc / f
            skip = k.reshape(self.op_shape) if k.numel() > 1 else k.reshape(())
        m = s_acc / s_o
        if dyadic:
            m = _Dyadic.apply(m, qc.mult_bits)
        if m.numel() == 1:
            m = m.reshape(())
        num, den = dyadic_parts(np.atleast_1d(m.detach().cpu().numpy().astype(np.float64)))
        if m.ndim:  # per output channel, on axis 1
            mult = m.reshape(self.op_shape)
            shape = tuple(len(num) if s == -1 else s for s in self.op_shape)
            num, den = num.reshape(shape), den.reshape(shape)
        else:
            mult = m
            num, den = num.reshape(()), den.reshape(())
        return BlockParams(w_int, b_int, mult, num, den, po, skip)

    # -- ops
    def affine(self, x: torch.Tensor, p: BlockParams) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def affine_abs(self, r: torch.Tensor, p: BlockParams) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def activate(self, acc: torch.Tensor, p: BlockParams, quantized: bool) -> torch.Tensor:
        """Quantized: ``clamp(R(acc * M), lo, hi)`` (exact on integers); float: ReLU (hidden) or identity."""
        if not quantized:
            return acc if self.last else F.relu(acc)
        assert p.mult is not None and p.num is not None and p.den is not None
        r = _Requant.apply(acc * p.mult, acc, p.num, p.den, self.qc.mode)
        return clamp_leaky(r, self.lo, self.hi, self.qc.clamp_leak)

    def int_weight(self, in_log2: float) -> tuple[np.ndarray, np.ndarray]:
        """Integer ``(W, B)`` of the quantized block for an input log2 scale (as exported)."""
        with torch.no_grad():
            p = self.qparams(torch.tensor(float(in_log2), dtype=DTYPE), True)
        return p.weight.numpy().astype(np.int64), p.bias.numpy().astype(np.int64)


class QLinear(QAffine):
    """Fake-quantized dense layer ``[out, in]`` followed by its requantization."""

    op_shape = (1, -1)

    def __init__(self, n_in: int, n_out: int, qc: QuantConfig, last: bool = False,
                 generator: torch.Generator | None = None, bits: tuple[int, int] | None = None) -> None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        bound = 1.0 / math.sqrt(n_in)
        w = (torch.rand((n_out, n_in), generator=g, dtype=DTYPE) * 2 - 1) * bound
        b = (torch.rand((n_out,), generator=g, dtype=DTYPE) * 2 - 1) * bound
        super().__init__(w, b, qc, last, bits)

    def affine(self, x: torch.Tensor, p: BlockParams) -> torch.Tensor:
        return F.linear(x, p.weight, p.bias)

    def affine_abs(self, r: torch.Tensor, p: BlockParams) -> torch.Tensor:
        return F.linear(r, p.weight.abs())


class QConv2d(QAffine):
    """Fake-quantized 2-D convolution (zero padding = the real zero, zero points are 0) and its requantization.

    ``residual``: the second conv of a residual block, whose accumulator also adds the block's input (the input
    of the block before it in :attr:`QuantNet.blocks`) with the integer skip weights ``k_c`` before the one
    requantization (module docstring, "Residual blocks"); it exports four nodes (conv, skip, add, requantize)."""

    op_shape = (1, -1, 1, 1)

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, qc: QuantConfig,
                 last: bool = False, generator: torch.Generator | None = None,
                 bits: tuple[int, int] | None = None, residual: bool = False) -> None:
        fan_in = c_in * kernel * kernel
        bound = 1.0 / math.sqrt(fan_in)
        shape = (c_out, c_in, kernel, kernel)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        w = (torch.rand(shape, generator=g, dtype=DTYPE) * 2 - 1) * bound
        b = (torch.rand((c_out,), generator=g, dtype=DTYPE) * 2 - 1) * bound
        super().__init__(w, b, qc, last, bits)
        self.stride = int(stride)
        self.padding = int(padding)
        self.residual = bool(residual)
        if self.residual:
            if c_in != c_out or self.stride != 1 or 2 * self.padding != kernel - 1 or last:
                raise QuantError(f"a residual conv keeps its input's shape (channels {c_in} -> {c_out}, kernel "
                                 f"{kernel}, stride {stride}, padding {padding}) and is never the output layer")
            self.n_layers = 4

    def skip_term(self, x: torch.Tensor, p: BlockParams) -> torch.Tensor:
        """``k_c x`` (integer skip weights per output channel; ``x`` in real units and ``k = 1`` in float mode)."""
        assert p.skip is not None
        return x * p.skip

    def affine(self, x: torch.Tensor, p: BlockParams) -> torch.Tensor:
        return F.conv2d(x, p.weight, p.bias, stride=self.stride, padding=self.padding)

    def affine_abs(self, r: torch.Tensor, p: BlockParams) -> torch.Tensor:
        return F.conv2d(r, p.weight.abs(), None, stride=self.stride, padding=self.padding)


class QFlatten(nn.Module):
    """``[B, C, H, W] -> [B, C*H*W]`` (C order, as :class:`qverify.network.Flatten`)."""

    n_layers = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.reshape(x.shape[0], -1)


Block = QLinear | QConv2d | QFlatten


class QuantNet(nn.Module):
    """A fake-quantized network on the integer input grid ``[0, input_hi]^input_shape``.

    ``quantized`` (a buffer, saved in checkpoints) switches between the exact integer forward (integer units) and a
    float forward (real units, ReLU) used for float pre-training and the float-IBP baseline. Inputs are always
    integer-valued pixels; :meth:`forward` returns real logits, :meth:`layer_values` every exported layer's
    values (index 0 the input), in the units of the mode.
    """

    def __init__(self, input_shape: tuple[int, ...], input_hi: int, blocks: list[nn.Module], qc: QuantConfig,
                 n_classes: int) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.input_hi = int(input_hi)
        self.qc = qc
        self.n_classes = int(n_classes)
        self.blocks = nn.ModuleList(blocks)
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, QAffine) and blk.residual:
                prev = self.blocks[i - 1] if i > 0 else None
                if (not isinstance(prev, QConv2d) or prev.weight.shape[1] != blk.weight.shape[0]
                        or prev.stride != 1 or 2 * prev.padding != prev.weight.shape[-1] - 1):
                    raise QuantError(f"block {i}: a residual conv must follow a conv whose input has its "
                                     f"{blk.weight.shape[0]} channels (the block input it adds)")
        if qc.scheme == "pow2":
            self.input_scale = Fraction(1, 2 ** math.ceil(math.log2(self.input_hi + 1)))
        else:
            self.input_scale = Fraction(1, self.input_hi)
        self.register_buffer("in_log2", torch.tensor(math.log2(self.input_scale), dtype=DTYPE))
        self.register_buffer("_quantized", torch.tensor(True))

    @property
    def quantized(self) -> bool:
        return bool(self._quantized)

    @quantized.setter
    def quantized(self, value: bool) -> None:
        self._quantized.fill_(bool(value))

    @property
    def affine_blocks(self) -> list[QAffine]:
        return [b for b in self.blocks if isinstance(b, QAffine)]

    def block_params(self) -> list[BlockParams | None]:
        """Every block's effective parameters for one pass (``None`` for a flatten)."""
        out: list[BlockParams | None] = []
        log2 = self.in_log2
        ins: list[torch.Tensor] = []  # the log2 scale of every block's input
        q = self.quantized
        for i, blk in enumerate(self.blocks):
            ins.append(log2)
            if isinstance(blk, QAffine):
                p = blk.qparams(log2, q, ins[i - 1] if blk.residual else None)
                out.append(p)
                log2 = p.out_log2
            else:
                out.append(None)
        return out

    def skip_sources(self) -> list[int | None]:
        """Per block, the index of the block whose input a residual conv adds (the block before it), else None."""
        return [i - 1 if isinstance(b, QAffine) and b.residual else None for i, b in enumerate(self.blocks)]

    def block_starts(self) -> list[int]:
        """Per block, the index of its input in :meth:`layer_values` (and in the interval bounds' list): a
        quantized affine block adds two exported layers (affine, requantization), a flatten one."""
        starts, i = [], 0
        for blk in self.blocks:
            starts.append(i)
            i += blk.n_layers
        return starts

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Integer pixels as float64 ``[B, *input_shape]`` in the mode's units (real units when not quantized)."""
        v = torch.as_tensor(x).to(DTYPE).reshape((-1, *self.input_shape))
        if not self.quantized:
            v = v * float(self.input_scale)
        return v

    def layer_values(self, x: torch.Tensor, params: list[BlockParams | None] | None = None) -> list[torch.Tensor]:
        """Values of every exported node (index 0 the input), like :func:`qverify.execute.execute` on the export
        (a residual conv appends its conv, skip, sum and activated values)."""
        params = self.block_params() if params is None else params
        v = self.prepare_input(x)
        vals = [v]
        ins: list[torch.Tensor] = []
        q = self.quantized
        for blk, p in zip(self.blocks, params, strict=True):
            ins.append(v)
            if isinstance(blk, QAffine):
                assert p is not None
                v = blk.affine(v, p)
                vals.append(v)
                if blk.residual:
                    sk = blk.skip_term(ins[-2], p)
                    vals.append(sk)
                    v = v + sk
                    vals.append(v)
                v = blk.activate(v, p, q)
            else:
                v = blk(v)
            vals.append(v)
        return vals

    def output_scale(self, params: list[BlockParams | None] | None = None) -> torch.Tensor:
        """Real value of one output unit (``1`` in float mode)."""
        if not self.quantized:
            return torch.ones((), dtype=DTYPE)
        params = self.block_params() if params is None else params
        last = [p for p in params if p is not None][-1]
        return torch.exp2(last.out_log2).reshape(())

    def forward_int(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's values ``[B, n_classes]`` (integers when quantized)."""
        return self.layer_values(x)[-1].reshape(-1, self.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Real-valued logits."""
        params = self.block_params()
        y = self.layer_values(x, params)[-1].reshape(-1, self.n_classes)
        return y * self.output_scale(params)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Argmax with the first-maximum tie rule (``torch.argmax`` returns the first maximal index)."""
        with torch.no_grad():
            return torch.argmax(self.forward_int(x), dim=1)


ARCHS = ("mlp", "cnn", "resnet")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: ``mlp`` (``hidden`` sizes), ``cnn`` (``conv`` = (channels, kernel, stride, padding) per
    layer, then the ``hidden`` dense layers) or ``resnet`` (the ``conv`` layers as the stem, then ``blocks``
    identity residual blocks of two 3x3 convs at the stem's channels, then the ``hidden`` dense layers; module
    docstring, "Residual blocks"); the output layer has one unit per class. ``blocks`` is read by ``resnet``
    only."""

    arch: str = "mlp"
    hidden: tuple[int, ...] = (64,)
    conv: tuple[tuple[int, int, int, int], ...] = ((16, 4, 2, 1), (32, 4, 2, 1))
    blocks: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise QuantError(f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, (int, np.integer)) or self.blocks < 0:
            raise QuantError(f"model.blocks (residual blocks of model.arch = 'resnet') must be an integer >= 0, "
                             f"got {self.blocks!r}")
        if self.arch == "resnet" and not self.conv:
            raise QuantError("model.arch = 'resnet' needs a conv stem: model.conv must list at least one "
                             "[channels, kernel, stride, padding] layer")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "conv", tuple(tuple(int(v) for v in c) for c in self.conv))
        for c in self.conv:
            if len(c) != 4 or min(c[:3]) < 1 or c[3] < 0:
                raise QuantError(f"model.conv entries are [channels, kernel, stride, padding], got {list(c)}")
        if any(h < 1 for h in self.hidden):
            raise QuantError(f"model.hidden widths must be >= 1, got {list(self.hidden)}")


def build_model(mc: ModelConfig, qc: QuantConfig, input_shape: tuple[int, ...], input_hi: int, n_classes: int,
                seed: int = 0) -> QuantNet:
    """A fresh :class:`QuantNet` (weights drawn from a generator seeded with ``seed``: uniform in
    ``+-1/sqrt(fan_in)``, as torch's default initialisation)."""
    g = torch.Generator().manual_seed(int(seed))
    blocks: list[nn.Module] = []
    shape = tuple(int(s) for s in input_shape)
    convs = mc.arch in ("cnn", "resnet")
    n_conv = len(mc.conv) if convs else 0
    n_res = 2 * int(mc.blocks) if mc.arch == "resnet" else 0
    # per-layer widths in the order of the affine layers: stem convs, (conv_a, conv_b) per residual block,
    # hidden dense layers, output (a list of the wrong length fails here)
    bits = qc.layer_bits(n_conv + n_res + len(mc.hidden) + 1)
    if convs:
        if len(shape) != 3:
            raise QuantError(f"a {mc.arch} needs [C, H, W] inputs, got {shape}")
        c, h, w = shape
        for i, (ch, k, s, pad) in enumerate(mc.conv):
            blocks.append(QConv2d(c, ch, k, s, pad, qc, generator=g, bits=bits[i]))
            h_in, w_in = h, w
            h = (h + 2 * pad - k) // s + 1
            w = (w + 2 * pad - k) // s + 1
            if h < 1 or w < 1:
                raise QuantError(f"model.conv[{i}] = {[ch, k, s, pad]} leaves no output pixels of its "
                                 f"{h_in}x{w_in} input (kernel {k} > {h_in}+2*{pad} or {w_in}+2*{pad})")
            c = ch
        for r in range(n_res // 2):
            blocks.append(QConv2d(c, c, 3, 1, 1, qc, generator=g, bits=bits[n_conv + 2 * r]))
            blocks.append(QConv2d(c, c, 3, 1, 1, qc, generator=g, bits=bits[n_conv + 2 * r + 1], residual=True))
        n_conv += n_res
        n = c * h * w
        blocks.append(QFlatten())
    else:
        n = int(np.prod(shape))
        if len(shape) > 1:
            blocks.append(QFlatten())
    for j, hsize in enumerate(mc.hidden):
        blocks.append(QLinear(n, hsize, qc, generator=g, bits=bits[n_conv + j]))
        n = hsize
    blocks.append(QLinear(n, n_classes, qc, last=True, generator=g, bits=bits[-1]))
    return QuantNet(shape, input_hi, blocks, qc, n_classes)


# ------------------------------------------------------------------------------------------ calibration
def _pow2_or_real(x: float, scheme: str) -> float:
    """log2 of the scale that maps ``x`` to the top code: ``ceil`` for pow2 (so ``x`` fits), exact for affine."""
    lx = math.log2(max(x, 1e-12))
    return float(math.ceil(lx - 1e-12)) if scheme == "pow2" else lx


@torch.no_grad()
def calibrate(model: QuantNet, x: torch.Tensor, weights: bool = True, activations: bool = True,
              quantile: float = 1.0, output: bool = True) -> None:
    """Set scales from data (a float pass on ``x``): weight scales from ``max |w|`` (per channel or tensor),
    activation scales from the ``quantile`` of each hidden activation and (``output``) of ``|logits|``. pow2
    scales round up (the value fits); affine scales map it to the top code. A statistic of 0 (a layer dead on the
    sample) keeps that layer's scale (a residual block's skip weight ``s_x / c`` would otherwise explode)."""
    qc = model.qc
    was = model.quantized
    model.quantized = False
    try:
        vals = model.layer_values(x)
    finally:
        model.quantized = was
    i = 1
    for blk in model.blocks:
        if isinstance(blk, QAffine):
            act = vals[i + blk.n_layers - 1]
            if weights:
                w = blk.weight.detach().abs().reshape(blk.weight.shape[0], -1)
                mx = w.max(dim=1).values if qc.per_channel else w.max().reshape(1)
                top = blk.wmax
                blk.w_log2.copy_(torch.tensor([_pow2_or_real(float(m) / top, qc.scheme) for m in mx],
                                              dtype=DTYPE))
            if activations and (output or not blk.last):
                a = act.abs().flatten()
                m = float(torch.quantile(a, quantile)) if quantile < 1.0 and a.numel() <= 16_000_000 else float(a.max())
                if m > 0:  # a dead layer (all zero on the sample) keeps its scale: 0 says nothing about it
                    blk.a_log2.fill_(_pow2_or_real(m / blk.hi, qc.scheme))
            i += blk.n_layers
        else:
            i += 1
