"""Importer for the QVIP / AAAI'21 fixed-point Keras ``.h5`` networks (``save_weights`` files of float shadow
weights; the recipe is in ``../shared/anchors/qvip/ABOUT.md``).

Quantization of the stored float weights (``rnd`` = round half away from zero):

* ``W = rnd(clip(kernel, -1, 1 - 2^-(Q-1)) * 2^(Q-1))``  (Q-1 fraction bits)
* ``b = rnd(clip(bias, -2, 2 - 2^-(Q-2)) * 2^(Q-2))``     (Q-2 fraction bits)

Integer forward pass, layer ``l`` with input fraction bits ``f`` (``f = IN`` at the input, ``Q - 2`` after)::

    k = f + 1,  acc = W x + b * 2^k,  y = clamp(floor(acc / 2^k + 1/2), lo, hi)

hidden layers ``[0, 2^Q - 1]`` (the ReLU), output layer ``[-2^(Q-1), 2^(Q-1) - 1]``. Input ``x = min(pixel, 2^IN - 1)``
(``metadata['pixel_transform'] = 'saturate'``); real input ``x / 2^IN``; real output ``y / 2^(Q-2)``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np

from qverify.network import Dense, ModelError, QNetwork, Requantize
from qverify.quant import Rounding, round_div

_NAME = re.compile(r"in_(\d+)_qu_(\d+)")
#: exact scaling used to turn float32 weights into integers before rounding (see :func:`_quantize`)
_EXP = 40


def guess_bits(path: str | Path) -> tuple[int | None, int | None]:
    """``(Q, IN)`` from a file name ``..._in_{IN}_qu_{Q}.h5``; the AAAI'21 ``*_mlp.h5`` nets are Q=6, IN=8."""
    name = Path(path).name
    m = _NAME.search(name)
    if m:
        return int(m.group(2)), int(m.group(1))
    if name.endswith("mlp.h5") or "784-64-32_q6" in name:
        return 6, 8
    return None, None


def _quantize(values: np.ndarray, lo: float, hi: float, frac_bits: int) -> np.ndarray:
    """``rnd(clip(v, lo, hi) * 2^frac_bits)`` exactly: float32 values times ``2^(frac_bits + 40)`` are integers
    (or below 2^24 in magnitude, where truncation cannot change the rounded result), then an exact integer
    round-half-away division by ``2^40``."""
    v = np.clip(values.astype(np.float64), lo, hi) * 2.0 ** (frac_bits + _EXP)
    n = np.trunc(v).astype(np.int64)
    return round_div(n, np.int64(2**_EXP), Rounding.HALF_AWAY)


def _names(attr: object) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in attr]  # type: ignore[union-attr]


def load_qvip_h5(path: str | Path, bits: int | None = None, input_bits: int | None = None) -> QNetwork:
    """Load a QVIP / AAAI'21 ``.h5`` file as a :class:`QNetwork` with bit width ``bits`` (Q) and ``input_bits`` (IN)."""
    import h5py

    path = Path(path)
    gq, gin = guess_bits(path)
    q = bits if bits is not None else gq
    inb = input_bits if input_bits is not None else gin
    if q is None or inb is None:
        raise ModelError(f"{path}: cannot tell the bit widths from the name; pass --bits Q --input-bits IN")
    if not 2 <= q <= 16 or not 1 <= inb <= 16:
        raise ModelError(f"{path}: unsupported bit widths Q={q}, IN={inb}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ModelError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if "layer_names" not in f.attrs:
            raise ModelError(f"{path}: no 'layer_names' attribute; not a Keras save_weights file")
        dense = []
        for lname in _names(f.attrs["layer_names"]):
            g = f[lname]
            wn = _names(g.attrs.get("weight_names", []))
            if not wn:
                continue  # dropout, flatten
            if not lname.startswith("quantized_dense") or len(wn) != 2:
                raise ModelError(f"{path}: layer {lname!r}: unsupported layer (expected quantized_dense with "
                                 f"kernel and bias)")
            kernel = np.asarray(g[wn[0]][()])
            bias = np.asarray(g[wn[1]][()])
            if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
                raise ModelError(f"{path}: layer {lname!r}: kernel {kernel.shape} / bias {bias.shape} mismatch")
            dense.append((lname, kernel, bias))
    if not dense:
        raise ModelError(f"{path}: no dense layers found")
    layers: list = []
    frac = inb
    for i, (lname, kernel, bias) in enumerate(dense):
        w = _quantize(kernel, -1.0, 1.0 - 2.0 ** -(q - 1), q - 1)
        b = _quantize(bias, -2.0, 2.0 - 2.0 ** -(q - 2), q - 2)
        k = frac + 1
        layers.append(Dense(w.T.copy(), b * 2**k, name=lname))
        last = i == len(dense) - 1
        lo, hi = (-(2 ** (q - 1)), 2 ** (q - 1) - 1) if last else (0, 2**q - 1)
        layers.append(Requantize.pow2(k, lo, hi, Rounding.HALF_UP, name=f"{lname}/requant"))
        frac = q - 2
    n_in = dense[0][1].shape[0]
    return QNetwork(
        input_shape=(n_in,), input_lo=0, input_hi=2**inb - 1, layers=tuple(layers),
        input_scale=Fraction(1, 2**inb), output_scale=Fraction(1, 2 ** (q - 2)),
        name=path.stem,
        metadata={"source": str(path.name), "format": "qvip-h5", "bits": str(q), "input_bits": str(inb),
                  "pixel_transform": "saturate"},
    )
