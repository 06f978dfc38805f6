"""A differentiable torch view of a :class:`~qverify.network.QNetwork` graph for attacks and split heuristics.

The view is a rule table (:data:`TORCH`, one entry per op type of :data:`qverify.ops.ALL_OPS`) walked by
:func:`qverify.graph.forward`, on the CPU or a CUDA device.

Forward pass: the executor's integers, exactly, in float64 tensors. Linear maps run in float64: network validation
proved every value and every partial sum of a linear map (in any summation order) stays below ``2^53`` in magnitude
for inputs of the grid, so float64 sums of integer products are the exact integers. Dense is ``F.linear``,
convolution ``F.conv2d(groups=G)`` of the input padded with its zero point, sum pooling a convolution with a kernel
of ones per channel (times the per-position weight), ``Add`` the weighted sum, and the data-movement ops their
torch counterparts (exact in any dtype). On CUDA the convolutions run with cuDNN switched off: cuDNN may choose FFT
or Winograd algorithms, which round; the native kernels sum exact products. Max pooling is ``F.max_pool2d`` of the
input padded with ``-inf`` (padded cells ignored, as ONNX and the executor do). Each requantization hands the
integer accumulator to :func:`qverify.execute.requantize` and each step function to
:func:`qverify.execute.step_function` (the executor's own exact arithmetic, never re-implemented here), so on integer
inputs ``TorchNet(net).layer_values(x) == qverify.execute.execute(net, x)`` value for value, bit for bit.

Backward pass (straight-through estimators, STE):

* requantization ``y = clamp(R(acc * m_c) + z_c, lo, hi)`` with ``m_c = num_c / den_c``::

      dy/dacc = m_c * g,   g = 1      if lo - 1/2 <= acc * m_c + z_c <= hi + 1/2  (the clamp is not active)
                           g = leak   otherwise

  so the rounding passes gradients straight through and the clamp (the integer ReLU) leaks ``leak`` (``0`` is
  the plain straight-through clamp, whose gradient vanishes on saturated neurons). ``Clamp`` uses the same rule.
* step function ``y = v_k`` for ``T_{c,k} <= x < T_{c,k+1}`` (cut points ``T_{c,1} < ... < T_{c,K}``, levels
  ``v_0 <= ... <= v_K``): the clamp rule applied to the *chord* of the step, the line through its first and last
  jump ``y ~ clamp(v_0 + a_c (x - T_{c,1} + 1), v_0, v_K)`` with ``a_c = (v_K - v_0) / (T_{c,K} - T_{c,1} + 1)``
  (it meets the step at ``T_{c,1} - 1`` and at ``T_{c,K}``)::

      dy/dx = a_c * g,     g = 1 if T_{c,1} - 1 <= x <= T_{c,K},  g = leak otherwise

  For ONNX ``Sign`` (cuts ``0, 1``, levels ``-1, 0, 1``) the chord is ``clamp(x, -1, 1)``: BinaryNet's hard-tanh
  straight-through estimator. For a binarizing threshold ``t`` (levels ``-1, 1``) it is a slope-2 ramp over
  ``[t - 1, t]`` that leaks elsewhere.
* lookup table ``y = T_c[x - start]``: the table's central difference ``(T[x + 1] - T[x - 1]) / 2`` at the input.
* max pooling: ``F.max_pool2d``'s gradient (to one maximal cell of each window).

``output_leak`` overrides the leak of the *last* saturating nodes (requantize, clamp, step: the monotone family),
those with a path to the output through no other saturating node (in a chain: the last clamping layer, the
logits). The gradient is a heuristic; nothing decided from it is trusted without the exact executor.

Inputs must be integer-valued float64 tensors on the grid (the forward pass checks it); attacks that move a
continuous iterate use :func:`ste_round` to put it on the grid with a straight-through gradient.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from qverify import graph
from qverify.execute import lookup, requantize, step_function
from qverify.network import (
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    Lookup,
    MaxPool2d,
    Monotone,
    Op,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
    Uncertain,
)


def _integers(x: torch.Tensor, check: bool, where: str) -> np.ndarray:
    """``x`` as an int64 numpy array; with ``check``, a ValueError when some entry is not an integer."""
    a = x.detach().cpu().numpy()
    ai = a.astype(np.int64)
    if check and not np.array_equal(ai, a):
        raise ValueError(f"{where}: non-integer input (inputs must be integers on the network's grid)")
    return ai


class _RequantizeSTE(torch.autograd.Function):
    """Exact requantization forward (via the executor), straight-through backward."""

    @staticmethod
    def forward(ctx, acc: torch.Tensor, layer: Requantize, mult: torch.Tensor, zp: torch.Tensor,  # type: ignore[override]
                leak: float, check: bool) -> torch.Tensor:
        ai = _integers(acc, check, f"requantize {layer.name!r}")
        y = torch.from_numpy(requantize(layer, ai).astype(np.float64)).to(acc.device)
        real = acc * mult + zp
        inside = (real >= layer.lo - 0.5) & (real <= layer.hi + 0.5)
        ctx.save_for_backward(inside, mult)
        ctx.leak = leak
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        inside, mult = ctx.saved_tensors
        g = torch.where(inside, grad, grad * ctx.leak) * mult
        return g, None, None, None, None, None


class _StepSTE(torch.autograd.Function):
    """Exact step function forward (via the executor), the chord's straight-through backward (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Step, slope: torch.Tensor, lo: torch.Tensor,  # type: ignore[override]
                hi: torch.Tensor, leak: float, check: bool) -> torch.Tensor:
        xi = _integers(x, check, f"step {layer.name!r}")
        y = torch.from_numpy(step_function(layer, xi).astype(np.float64)).to(x.device)
        ctx.save_for_backward((x >= lo) & (x <= hi), slope)
        ctx.leak = leak
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        inside, slope = ctx.saved_tensors
        return torch.where(inside, grad, grad * ctx.leak) * slope, None, None, None, None, None, None


_SLOPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _doubled_slopes(layer: Lookup) -> Lookup:
    """Twice the table's central differences, as a table (integers: central differences of integers are halves);
    built once per op."""
    got = _SLOPES.get(layer)
    if got is None:
        t = layer.table.astype(np.float64)
        d = np.gradient(t, axis=1) if t.shape[1] > 1 else np.zeros_like(t)
        got = _SLOPES[layer] = Lookup(layer.start, np.rint(d * 2).astype(np.int64))
    return got


class _LookupSTE(torch.autograd.Function):
    """Exact table lookup forward (via the executor); backward: the table's central difference at the input,
    ``(T[x + 1] - T[x - 1]) / 2`` (one-sided at the domain's ends), a straight-through slope of the function."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Lookup, check: bool) -> torch.Tensor:  # type: ignore[override]
        xi = _integers(x, check, f"lookup {layer.name!r}")
        y = torch.from_numpy(lookup(layer, xi).astype(np.float64)).to(x.device)
        slope = lookup(_doubled_slopes(layer), xi) / 2.0
        ctx.save_for_backward(torch.from_numpy(slope).to(x.device))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


class LeakyClamp(torch.autograd.Function):
    """``clamp(x, lo, hi)`` forward; gradient ``1`` inside ``[lo, hi]`` and ``leak`` outside (so it does not die
    at the bounds). Shared by the attack's network view and the training layers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: int, hi: int, leak: float) -> torch.Tensor:  # type: ignore[override]
        inside = (x >= lo) & (x <= hi)
        ctx.save_for_backward(inside)
        ctx.leak = leak
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, grad * ctx.leak), None, None, None


@contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """Run the enclosed numpy/torch work on at most ``threads`` threads (``0``: leave the settings alone).

    Attacks and branch and bound multiply small matrices many times; there, intra-op threads cost more than they
    bring (measured on a busy 2-core machine: a light attack 0.02 s on one thread, 2 s on two). Restores torch's
    thread count on exit; BLAS pools are limited with ``threadpoolctl`` when it is installed.
    """
    if threads <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, threads))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - optional
            yield
        else:
            with threadpool_limits(threads):
                yield
    finally:
        torch.set_num_threads(old)


def ste_round(z: torch.Tensor) -> torch.Tensor:
    """Nearest grid point of a continuous iterate (a projection, ties to even) with identity gradient."""
    return z + (torch.round(z) - z).detach()


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector broadcast over axis 1 of an ``ndim``-dimensional batch (a scalar when it has one)."""
    if t.numel() == 1:
        return t.reshape(())
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _pad2d(x: torch.Tensor, padding: tuple[int, int, int, int], value: float) -> torch.Tensor:
    """``x [B, C, H, W]`` padded ``(top, left, bottom, right)`` with the constant ``value``."""
    if not any(padding):
        return x
    pt, pl, pb, pr = padding
    return F.pad(x, (pl, pr, pt, pb), mode="constant", value=value)


def _exact_conv(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """cuDNN off on CUDA (its FFT and Winograd algorithms round; the native kernels are exact on integers)."""
    return torch.backends.cudnn.flags(enabled=False) if x.is_cuda else contextlib.nullcontext()


# ================================================================================================ the rule table
#: a rule: ``(view, node index, op, input values) -> output value`` (float64 tensors ``[B, *shape]``)
Rule = Callable[["TorchNet", int, Op, list[torch.Tensor]], torch.Tensor]


def _dense(tn: TorchNet, i: int, op: Dense, xs: list[torch.Tensor]) -> torch.Tensor:
    w = tn.const(i, "weight", lambda: op.weight)
    b = tn.const(i, "bias", lambda: op.bias)
    return F.linear(xs[0], w, b)


def _conv2d(tn: TorchNet, i: int, op: Conv2d, xs: list[torch.Tensor]) -> torch.Tensor:
    """``sum W xpad + b`` with ``xpad`` the input padded with ``pad_value`` (the executor's offset holds exactly the
    padded cells' terms, so padding first gives the same integers)."""
    x = _pad2d(xs[0], op.padding, float(op.pad_value))
    w = tn.const(i, "weight", lambda: op.weight)
    b = tn.const(i, "bias", lambda: op.bias)
    with _exact_conv(x):
        return F.conv2d(x, w, b, stride=op.stride, dilation=op.dilation, groups=op.groups)


def _sum_pool(tn: TorchNet, i: int, op: SumPool2d, xs: list[torch.Tensor]) -> torch.Tensor:
    """``k[i, j] * sum_window xpad``: a depthwise convolution with a kernel of ones (exact integer sums)."""
    x = _pad2d(xs[0], op.padding, float(op.pad_value))
    c = x.shape[1]
    ones = tn.const(i, "ones", lambda: np.ones((c, 1, *op.kernel), dtype=np.int64))
    with _exact_conv(x):
        y = F.conv2d(x, ones, None, stride=op.stride, groups=c)
    if op.weight is not None:
        y = y * tn.const(i, "k", lambda: op.weight)
    return y


def _add(tn: TorchNet, i: int, op: Add, xs: list[torch.Tensor]) -> torch.Tensor:
    y = xs[0] * float(op.weights[0])
    for w, x in zip(op.weights[1:], xs[1:], strict=True):
        y = y + x * float(w)
    return y + float(op.bias)


def _flatten(tn: TorchNet, i: int, op: Flatten, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].reshape(xs[0].shape[0], -1)


def _reshape(tn: TorchNet, i: int, op: Reshape, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].reshape(xs[0].shape[0], *op.shape)


def _transpose(tn: TorchNet, i: int, op: Transpose, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].permute(0, *[p + 1 for p in op.perm])


def _pad(tn: TorchNet, i: int, op: Pad, xs: list[torch.Tensor]) -> torch.Tensor:
    """``pads = (b_1, ..., b_n, a_1, ..., a_n)`` over the value's axes; ``F.pad`` takes them last axis first."""
    n = len(op.pads) // 2
    widths: list[int] = []
    for k in reversed(range(n)):
        widths += [op.pads[k], op.pads[n + k]]
    return F.pad(xs[0], tuple(widths), mode="constant", value=float(op.value))


def _concat(tn: TorchNet, i: int, op: Concat, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs, dim=op.axis + 1)


def _requantize(tn: TorchNet, i: int, op: Requantize, xs: list[torch.Tensor]) -> torch.Tensor:
    v = xs[0]
    mult, zp = tn.requant_params(i, op)
    return _RequantizeSTE.apply(v, op, _channel_view(mult, v.ndim), _channel_view(zp, v.ndim), tn.leak_of(i),
                                tn.check_integers)


def _clamp(tn: TorchNet, i: int, op: Clamp, xs: list[torch.Tensor]) -> torch.Tensor:
    return LeakyClamp.apply(xs[0], op.lo, op.hi, tn.leak_of(i))


def _step(tn: TorchNet, i: int, op: Step, xs: list[torch.Tensor]) -> torch.Tensor:
    v = xs[0]
    first, last = op.cuts[:, 0], op.cuts[:, -1]
    slope = tn.const(i, "slope", lambda: (op.levels[-1] - op.levels[0]) / (last - first + 1).astype(np.float64))
    lo = tn.const(i, "lo", lambda: first - 1)
    hi = tn.const(i, "hi", lambda: last)
    return _StepSTE.apply(v, op, _channel_view(slope, v.ndim), _channel_view(lo, v.ndim), _channel_view(hi, v.ndim),
                          tn.leak_of(i), tn.check_integers)


def _lookup(tn: TorchNet, i: int, op: Lookup, xs: list[torch.Tensor]) -> torch.Tensor:
    return _LookupSTE.apply(xs[0], op, tn.check_integers)


def _max_pool(tn: TorchNet, i: int, op: MaxPool2d, xs: list[torch.Tensor]) -> torch.Tensor:
    """Padded cells hold ``-inf`` (never a window's maximum: every window holds a real cell)."""
    x = _pad2d(xs[0], op.padding, -float("inf"))
    return F.max_pool2d(x, op.kernel, op.stride, 0, op.dilation)


#: the torch view's table: one rule per op type (forward exact, backward straight-through)
TORCH: dict[type, Rule] = {Dense: _dense, Conv2d: _conv2d, SumPool2d: _sum_pool, Add: _add, Flatten: _flatten,
                           Reshape: _reshape, Transpose: _transpose, Pad: _pad, Concat: _concat,
                           Requantize: _requantize, Clamp: _clamp, Step: _step, Lookup: _lookup,
                           MaxPool2d: _max_pool, Uncertain: lambda tn, i, op, xs: xs[0]}  # the nominal member


# ================================================================================================ soft logits
def _soft_requantize(tn: TorchNet, i: int, op: Requantize, acc: torch.Tensor) -> torch.Tensor:
    """The real value before the rounding and the clamp: ``acc m_c + z_c``."""
    mult, zp = tn.requant_params(i, op)
    return acc * _channel_view(mult, acc.ndim) + _channel_view(zp, acc.ndim)


def _soft_clamp(tn: TorchNet, i: int, op: Clamp, x: torch.Tensor) -> torch.Tensor:
    return x


#: a soft-output op passes the soft values of its inputs through its own rule (data movement; max pooling, which
#: commutes with the monotone requantizations)
SOFT_PASS = "pass"
#: a soft-output op that gives its exact output (linear maps with coefficients, step functions)
SOFT_EXACT = "exact"
#: how :meth:`TorchNet.soft_logits` treats each op type: the last requantizations and clamps put their real value
#: before the rounding (``_soft_*(view, i, op, input) -> real``), clamped to ``[lo - 1/2, hi + 1/2]``, in place of
#: their output; ``SOFT_PASS`` and ``SOFT_EXACT`` ops as said there
SOFT: dict[type, Callable | str] = {
    Dense: SOFT_EXACT, Conv2d: SOFT_EXACT, SumPool2d: SOFT_EXACT, Add: SOFT_EXACT, Step: SOFT_EXACT,
    Lookup: SOFT_EXACT,
    Flatten: SOFT_PASS, Reshape: SOFT_PASS, Transpose: SOFT_PASS, Pad: SOFT_PASS, Concat: SOFT_PASS,
    MaxPool2d: SOFT_PASS, Uncertain: SOFT_PASS, Requantize: _soft_requantize, Clamp: _soft_clamp}


def _soft_kind(op: Op) -> Callable | str:
    return graph.rule(SOFT, op, "torch view (soft logits)")  # type: ignore[arg-type]


class TorchNet(torch.nn.Module):
    """Differentiable view of ``net``: exact integer forward pass in float64, STE backward (module docstring).

    ``forward(x)`` takes ``[B, n]`` or ``[B, *input_shape]`` integer-valued inputs and returns ``[B, n_out]``.
    ``leak`` is the gradient leak of saturated clamps, ``output_leak`` that of the last ones (default ``leak``).
    """

    def __init__(self, net: QNetwork, leak: float = 0.0, device: str | torch.device = "cpu",
                 check_integers: bool = True, output_leak: float | None = None) -> None:
        super().__init__()
        self.net = net
        self.leak = float(leak)
        self.output_leak = self.leak if output_leak is None else float(output_leak)
        self.check_integers = check_integers
        self.device_ = torch.device(device)
        self._consts: dict[tuple[int, str], torch.Tensor] = {}
        # the last saturating nodes: reached from the output through no other saturating node
        self._last_saturating = self._walk_back(lambda op: isinstance(op, Monotone),
                                                lambda op: not isinstance(op, Monotone))
        # the nodes the soft output is computed on: reached from the output through SOFT_PASS nodes only
        self._soft_path = self._walk_back(lambda op: _soft_kind(op) != SOFT_EXACT,
                                          lambda op: _soft_kind(op) == SOFT_PASS)

    # ------------------------------------------------------------------ helpers of the rules
    def _walk_back(self, hit: Callable[[Op], bool], through: Callable[[Op], bool]) -> frozenset[int]:
        """The nodes ``i`` with ``hit(op_i)`` reached from the output (the last node included) by a path whose
        nodes after ``i`` all go ``through`` (one :func:`qverify.graph.backward` walk of booleans)."""
        found: set[int] = set()

        def pull(i: int, op: Op, live: bool) -> list[bool]:
            if live and hit(op):
                found.add(i)
            return [live and through(op)] * len(self.net.node_inputs(i))

        graph.backward(self.net, len(self.net.layers), True, pull, lambda j, a, b: a or b)
        return frozenset(found)

    def const(self, i: int, key: str, make: Callable[[], object]) -> torch.Tensor:
        """Node ``i``'s constant ``key`` as a float64 tensor on the view's device (made once by ``make``)."""
        t = self._consts.get((i, key))
        if t is None:
            t = torch.as_tensor(np.asarray(make(), dtype=np.float64), device=self.device_)
            self._consts[(i, key)] = t
        return t

    def requant_params(self, i: int, op: Requantize) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m_c, z_c)`` of requantization node ``i``: the multipliers ``num_c / den_c`` (the slope of the
        straight-through gradient) and the zero points, as float64 tensors."""
        mult = self.const(i, "mult", lambda: [n / d for n, d in zip(op.num, op.den, strict=True)])
        return mult, self.const(i, "zp", lambda: op.zero_point)

    def leak_of(self, i: int) -> float:
        """The gradient leak of saturating node ``i``: ``output_leak`` for the last ones, else ``leak``."""
        return self.output_leak if i in self._last_saturating else self.leak

    def _apply(self, i: int, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        return graph.rule(TORCH, op, "torch view")(self, i, op, xs)

    # ------------------------------------------------------------------ values
    def layer_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every value (index 0 = the input reshaped to ``[B, *input_shape]``, ``i + 1`` node ``i``'s output),
        like :func:`qverify.execute.execute`."""
        net = self.net
        v = torch.as_tensor(x, dtype=torch.float64, device=self.device_).reshape((-1, *net.input_shape))
        if self.check_integers:
            vd = v.detach()
            if not bool(torch.all(vd == torch.round(vd))) or (vd.numel() and (
                    float(vd.min()) < net.input_lo or float(vd.max()) > net.input_hi)):
                raise ValueError("TorchNet inputs must be integers on the network's grid")
        return graph.forward(net, v, self._apply)  # type: ignore[return-value]

    def layer_values_from(self, start: int, v: torch.Tensor,
                          earlier: Mapping[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The outputs of nodes ``start, start + 1, ...`` (values ``start + 1 ..``) given ``v``, the (integer)
        value ``start`` (in a chain: the input of node ``start``).

        On a graph a node ``>= start`` may read values below ``start``: those must be given in ``earlier``
        (``{value index: tensor}``); a ValueError names the node and the value that is missing."""
        known = dict(earlier or {})
        known[start] = v

        def step(i: int, op: Op, xs: list[torch.Tensor | None]) -> torch.Tensor | None:
            if i < start:
                return known.get(i + 1)
            for j, x in zip(self.net.node_inputs(i), xs, strict=True):
                if x is None:
                    raise ValueError(f"layer_values_from({start}): node {i} ({op.kind} {op.name!r}) reads value "
                                     f"{j} < {start}, which is not given (pass it in 'earlier')")
            return self._apply(i, op, xs)  # type: ignore[arg-type]

        return graph.forward(self.net, known.get(0), step)[start + 1:]  # type: ignore[return-value]

    def soft_logits(self, values: list[torch.Tensor], clamp: bool = True) -> torch.Tensor:
        """``[B, n_out]`` real-valued outputs without the last rounding, from :meth:`layer_values`.

        For a last node ``clamp(R(acc m + z), lo, hi)`` this is ``clamp(acc m + z, lo - 1/2, hi + 1/2)`` (float64;
        a heuristic for losses, with the gradient of the last clamp leaking ``output_leak``): unlike the integer
        outputs it moves with changes smaller than one rounding step, and a saturated logit stays saturated (a
        tie at the top of the range is as good as passing). ``clamp=False`` drops the clamp (a saturated logit
        still shows how far it is inside). The output is reached from the last requantize / clamp nodes through
        data movement and max pooling only, which are applied to the soft values (in a chain: the last clamping
        layer followed by ``Flatten`` layers only); networks whose output is computed otherwise (a last dense
        layer, a step function) get their outputs. Only the values the soft output depends on are read
        (``values`` may hold ``None`` elsewhere).
        """
        net = self.net

        def step(i: int, op: Op, xs: list[torch.Tensor | None]) -> torch.Tensor | None:
            if i not in self._soft_path:
                return values[i + 1]
            kind = _soft_kind(op)
            if kind == SOFT_PASS:
                return self._apply(i, op, xs)  # type: ignore[arg-type]
            v = kind(self, i, op, values[net.node_inputs(i)[0]])  # type: ignore[operator]
            return LeakyClamp.apply(v, op.lo - 0.5, op.hi + 0.5, self.output_leak) if clamp else v

        v = graph.forward(net, values[0], step, keep=False)[-1]
        assert v is not None
        return v.reshape(v.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        v = self.layer_values(x)[-1]
        return v.reshape(v.shape[0], -1)
