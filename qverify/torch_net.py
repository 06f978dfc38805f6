"""A differentiable torch view of a :class:`~qverify.network.QNetwork` for attacks and split heuristics.

Forward pass: the executor's integers, exactly. Affine layers run in float64 (network validation proved
every accumulator, and so every partial sum in any order, stays below ``2^53`` in magnitude for inputs of the
grid, so float64 sums of integer products are the exact integers). Each requantization hands the integer
accumulator to :func:`qverify.execute.requantize` (the executor's own exact integer rounding, never
re-implemented here), so on integer inputs ``TorchNet(net)(x) == qverify.execute.forward(net, x)`` bit for bit.

Backward pass (straight-through estimator, STE): for ``y = clamp(R(acc * m_c) + z_c, lo, hi)`` with
``m_c = num_c / den_c``,

    dy/dacc = m_c * g,   g = 1      if lo - 1/2 <= acc * m_c + z_c <= hi + 1/2  (the clamp is not active)
                         g = leak   otherwise

so the rounding passes gradients straight through and the clamp (the integer ReLU) leaks ``leak`` (``0`` is
the plain straight-through clamp, whose gradient vanishes on saturated neurons). ``Clamp`` layers use the same
rule. ``output_leak`` overrides the leak of the last clamping layer (the logits). The gradient is a heuristic;
nothing decided from it is trusted without the exact executor.

Inputs must be integer-valued float64 tensors on the grid (the forward pass checks it); attacks that move a
continuous iterate use :func:`ste_round` to put it on the grid with a straight-through gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from qverify.execute import requantize
from qverify.network import Clamp, Conv2d, Dense, Flatten, QNetwork, Requantize


class _RequantizeSTE(torch.autograd.Function):
    """Exact requantization forward (via the executor), straight-through backward."""

    @staticmethod
    def forward(ctx, acc: torch.Tensor, layer: Requantize, mult: torch.Tensor, zp: torch.Tensor,  # type: ignore[override]
                leak: float, check: bool) -> torch.Tensor:
        a = acc.detach().cpu().numpy()
        ai = a.astype(np.int64)
        if check and not np.array_equal(ai, a):
            raise ValueError(f"requantize {layer.name!r}: non-integer accumulator (inputs must be integers)")
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


class TorchNet(torch.nn.Module):
    """Differentiable view of ``net``: exact integer forward pass in float64, STE backward (module docstring).

    ``forward(x)`` takes ``[B, n]`` or ``[B, *input_shape]`` integer-valued inputs and returns ``[B, n_out]``.
    ``leak`` is the gradient leak of saturated clamps, ``output_leak`` that of the last one (default ``leak``).
    """

    def __init__(self, net: QNetwork, leak: float = 0.0, device: str | torch.device = "cpu",
                 check_integers: bool = True, output_leak: float | None = None) -> None:
        super().__init__()
        self.net = net
        self.leak = float(leak)
        self.output_leak = self.leak if output_leak is None else float(output_leak)
        clamps = [i for i, layer in enumerate(net.layers) if isinstance(layer, (Requantize, Clamp))]
        self._last_clamp = clamps[-1] if clamps else -1
        self.check_integers = check_integers
        self.device_ = torch.device(device)
        self._params: list[tuple[torch.Tensor, ...]] = []
        for layer in net.layers:
            if isinstance(layer, (Dense, Conv2d)):
                w = torch.as_tensor(layer.weight, dtype=torch.float64, device=self.device_)
                b = torch.as_tensor(layer.bias, dtype=torch.float64, device=self.device_)
                self._params.append((w, b))
            elif isinstance(layer, Requantize):
                c = len(layer.num)
                mult = torch.tensor([n / d for n, d in zip(layer.num, layer.den, strict=True)],
                                    dtype=torch.float64, device=self.device_)
                zp = torch.as_tensor(layer.zero_point, dtype=torch.float64, device=self.device_)
                self._params.append((mult, zp, torch.tensor(c)))
            else:
                self._params.append(())

    @staticmethod
    def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        return t.reshape((1, -1) + (1,) * (ndim - 2))

    def layer_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's values (index 0 = the input reshaped to ``[B, *input_shape]``), like ``execute``."""
        net = self.net
        v = torch.as_tensor(x, dtype=torch.float64, device=self.device_).reshape((-1, *net.input_shape))
        if self.check_integers:
            vd = v.detach()
            if not bool(torch.all(vd == torch.round(vd))) or (vd.numel() and (
                    float(vd.min()) < net.input_lo or float(vd.max()) > net.input_hi)):
                raise ValueError("TorchNet inputs must be integers on the network's grid")
        return [v, *self.layer_values_from(0, v)]

    def layer_values_from(self, start: int, v: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of layers ``start, start + 1, ...`` given ``v``, the (integer) input of layer ``start``."""
        out = []
        for i in range(start, len(self.net.layers)):
            v = self._apply(i, v)
            out.append(v)
        return out

    def _apply(self, i: int, v: torch.Tensor) -> torch.Tensor:
        layer, p = self.net.layers[i], self._params[i]
        leak = self.output_leak if i == self._last_clamp else self.leak
        if isinstance(layer, Dense):
            return F.linear(v, p[0], p[1])
        if isinstance(layer, Conv2d):
            pt, pl, pb, pr = layer.padding
            if any(layer.padding):
                v = F.pad(v, (pl, pr, pt, pb), mode="constant", value=float(layer.pad_value))
            return F.conv2d(v, p[0], p[1], stride=layer.stride, dilation=layer.dilation)
        if isinstance(layer, Requantize):
            mult = self._channel_view(p[0], v.ndim)
            zp = self._channel_view(p[1], v.ndim)
            return _RequantizeSTE.apply(v, layer, mult, zp, leak, self.check_integers)
        if isinstance(layer, Clamp):
            return LeakyClamp.apply(v, layer.lo, layer.hi, leak)
        if isinstance(layer, Flatten):
            return v.reshape(v.shape[0], -1)
        raise TypeError(f"unsupported layer {type(layer).__name__}")  # pragma: no cover

    def soft_logits(self, values: list[torch.Tensor], clamp: bool = True) -> torch.Tensor:
        """``[B, n_out]`` real-valued outputs without the last rounding, from :meth:`layer_values`.

        For a last layer ``clamp(R(acc m + z), lo, hi)`` this is ``clamp(acc m + z, lo - 1/2, hi + 1/2)`` (float64;
        a heuristic for losses, with the gradient of the last clamp leaking ``output_leak``): unlike the integer
        outputs it moves with changes smaller than one rounding step, and a saturated logit stays saturated (a
        tie at the top of the range is as good as passing). ``clamp=False`` drops the clamp (a saturated logit
        still shows how far it is inside). Networks whose last clamping layer is followed by anything but
        ``Flatten`` get their outputs.
        """
        i = self._last_clamp
        if i < 0 or not all(isinstance(layer, Flatten) for layer in self.net.layers[i + 1:]):
            v = values[-1]
        else:
            layer, v = self.net.layers[i], values[i]  # values[i] is the input of layer i
            if isinstance(layer, Requantize):
                mult, zp = self._params[i][0], self._params[i][1]
                v = v * self._channel_view(mult, v.ndim) + self._channel_view(zp, v.ndim)
            if clamp:
                v = LeakyClamp.apply(v, layer.lo - 0.5, layer.hi + 0.5, self.output_leak)
        return v.reshape(v.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        v = self.layer_values(x)[-1]
        return v.reshape(v.shape[0], -1)
