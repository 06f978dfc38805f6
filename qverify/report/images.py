"""Counterexample pictures: integer inputs back to images, encoded as PNG (written here with zlib, no dependency).

The network's integer input ``x`` (flattened) is shown as an image when its layout is known: a ``(C, H, W)`` network
input (shown as ``H x W x C``), or the data file's sample shape (``H x W`` or ``H x W x C``) when the network input is
flat. Grid values ``[lo, hi]`` are mapped linearly to ``[0, 255]`` for display only. The difference
``x_adv - x0`` is drawn on white: red for increased values, blue for decreased ones, full colour at ``max |d|``.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence

import numpy as np


def png_bytes(img: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB)."""
    a = np.ascontiguousarray(img, dtype=np.uint8)
    if a.ndim == 2:
        colour = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"png_bytes: expected [H, W] or [H, W, 3], got {a.shape}")
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_layout(input_shape: Sequence[int], sample_shape: Sequence[int] | None) -> tuple[tuple[int, ...], bool] | None:
    """How to turn a flat input into ``H x W [x C]``: ``(reshape_to, chw)``; ``None`` when it is not an image.

    ``chw=True``: reshape to ``(C, H, W)`` then move the channels last.
    """
    shp = tuple(int(v) for v in input_shape)
    n = int(np.prod(shp)) if shp else 0
    if len(shp) == 3 and shp[0] in (1, 3) and min(shp[1:]) > 1:
        return shp, True
    if sample_shape:
        ss = tuple(int(v) for v in sample_shape)
        if int(np.prod(ss)) == n and (len(ss) == 2 and min(ss) > 1 or len(ss) == 3 and ss[2] in (1, 3)):
            return ss, False
    return None


def to_image(x: Sequence[int], layout: tuple[tuple[int, ...], bool]) -> np.ndarray:
    """Flat integer input to ``[H, W]`` or ``[H, W, 3]`` (integers, not yet scaled)."""
    shape, chw = layout
    a = np.asarray(x, dtype=np.int64).reshape(shape)
    if chw:
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return a


def display(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Grid values ``[lo, hi]`` to uint8 ``[0, 255]``: ``round(255 (a - lo) / (hi - lo))``."""
    span = max(1, hi - lo)
    return ((np.clip(a, lo, hi) - lo) * 255 * 2 + span) // (2 * span)


def difference_image(d: np.ndarray) -> np.ndarray:
    """``d = x_adv - x0`` as RGB on white: red where it grew, blue where it shrank (summed over channels)."""
    if d.ndim == 3:
        d = d.sum(axis=2)
    m = max(1, int(np.abs(d).max()))
    fade = 255 - (np.abs(d) * 255 * 2 + m) // (2 * m)
    rgb = np.full(d.shape + (3,), 255, dtype=np.int64)
    pos, neg = d > 0, d < 0
    rgb[pos, 1] = fade[pos]
    rgb[pos, 2] = fade[pos]
    rgb[neg, 0] = fade[neg]
    rgb[neg, 1] = fade[neg]
    return rgb.astype(np.uint8)


def counterexample_pictures(x0: Sequence[int], x_adv: Sequence[int], layout: tuple[tuple[int, ...], bool],
                            lo: int, hi: int) -> dict[str, str]:
    """``{"original", "adversarial", "difference"}`` as PNG data URIs."""
    a0 = to_image(x0, layout)
    a1 = to_image(x_adv, layout)
    return {"original": data_uri(png_bytes(display(a0, lo, hi))),
            "adversarial": data_uri(png_bytes(display(a1, lo, hi))),
            "difference": data_uri(png_bytes(difference_image(a1 - a0)))}
