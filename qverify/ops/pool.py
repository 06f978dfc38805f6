"""Max pooling: ``y[c,i,j] = max_{u<kh, v<kw, cell inside} x[c, i s_h + u d_h - p_t, j s_w + v d_w - p_l]``.

Padded cells are ignored (ONNX pads max pooling with ``-inf``; ``ceil_mode`` is extra bottom/right padding, which
the importer adds). On integers the maximum is exact; it commutes with every monotone requantization, so a QDQ
``DQ -> MaxPool -> Q`` with one scale is max pooling of the integers. Every window must hold at least one real cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qverify.ops.base import ModelError, Op, Shape, int_tuple

#: the value padded cells take inside the executor (below every int64 value a network can hold)
NEG = -(2**62)


@dataclass(frozen=True, eq=False)
class MaxPool2d(Op):
    """Max pooling over ``kernel`` windows (NCHW), ``padding = (top, left, bottom, right)`` ignored cells."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    name: str = ""

    def __post_init__(self) -> None:
        where = f"MaxPool2d {self.name!r}"
        object.__setattr__(self, "kernel", int_tuple(self.kernel, f"{where} kernel", 2, 1))
        object.__setattr__(self, "stride", int_tuple(self.stride, f"{where} stride", 2, 1))
        object.__setattr__(self, "padding", int_tuple(self.padding, f"{where} padding", 4, 0))
        object.__setattr__(self, "dilation", int_tuple(self.dilation, f"{where} dilation", 2, 1))
        kh, kw = self.kernel
        if self.padding[0] >= kh or self.padding[2] >= kh or self.padding[1] >= kw or self.padding[3] >= kw:
            raise ModelError(f"{where}: padding {self.padding} must be smaller than the kernel {self.kernel}")

    def summary(self) -> str:
        return f"max {self.kernel[0]}x{self.kernel[1]} stride {self.stride} pad {self.padding}"

    def output_shape(self, *in_shapes: Shape) -> Shape:
        in_shape = in_shapes[0]
        if len(in_shape) != 3:
            raise ModelError(f"MaxPool2d {self.name!r}: expects input [C, H, W], got {in_shape}")
        kh, kw = self.kernel
        ekh = (kh - 1) * self.dilation[0] + 1
        ekw = (kw - 1) * self.dilation[1] + 1
        h = in_shape[1] + self.padding[0] + self.padding[2]
        w = in_shape[2] + self.padding[1] + self.padding[3]
        if h < ekh or w < ekw:
            raise ModelError(f"MaxPool2d {self.name!r}: kernel {kh}x{kw} larger than padded input {h}x{w}")
        return (in_shape[0], (h - ekh) // self.stride[0] + 1, (w - ekw) // self.stride[1] + 1)

    def windows(self, x: np.ndarray, fill: int | float = NEG) -> np.ndarray:
        """``[B, C, H, W] -> [B, C, OH, OW, kh * kw]``: each output's window, padded cells ``fill``."""
        pt, pl, pb, pr = self.padding
        if any(self.padding):
            x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
        kh, kw = self.kernel
        dh, dw = self.dilation
        win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
        win = win[:, :, ::self.stride[0], ::self.stride[1], ::dh, ::dw]
        return win.reshape(*win.shape[:4], kh * kw)

    def window_indices(self, in_shape: Shape) -> np.ndarray:
        """int64 ``[C, OH, OW, kh * kw]``: the flat input index of each window cell, ``-1`` for padded cells."""
        idx = np.arange(int(np.prod(in_shape)), dtype=np.int64).reshape(1, *in_shape)
        return self.windows(idx, -1)[0]
