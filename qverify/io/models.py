"""Load any supported model format into a :class:`~qverify.network.QNetwork`, choosing by extension or ``fmt``."""

from __future__ import annotations

from pathlib import Path

from qverify.network import ModelError, QNetwork

FORMATS = ("native", "qvip-h5", "onnx", "tflite")


def detect_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".qnn":
        return "native"
    if suffix == ".h5":
        return "qvip-h5"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite":
        return "tflite"
    raise ModelError(f"{path}: unknown model format {suffix!r} (supported: .qnn, .onnx, .tflite, .h5 with --format "
                     f"qvip-h5)")


def load_model(path: str | Path, fmt: str | None = None, bits: int | None = None,
               input_bits: int | None = None, semantics: str | None = None) -> QNetwork:
    """Load a model: native ``.qnn``, ONNX (QDQ or QOperator), or a QVIP/AAAI'21 ``.h5`` (``bits``, ``input_bits``).

    ``semantics`` (``"exact"`` or ``"onnxruntime"``) chooses the requantization arithmetic of an ONNX model
    (:func:`qverify.io.onnx.load_onnx`; default ``exact``). A ``.qnn`` file carries its own (its float32
    requantizations and ``metadata["semantics"]``) and ``.h5`` networks are exact: asking those for another
    semantics is a :class:`ModelError`. ``None`` takes the file's own.
    """
    from qverify.io.onnx import SEMANTICS

    if semantics is not None and semantics not in SEMANTICS:
        raise ModelError(f"{path}: unknown semantics {semantics!r} (known: {', '.join(SEMANTICS)})")
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    fmt = fmt or detect_format(path)
    if fmt == "native":
        from qverify.io.native import load_native

        return _same_semantics(load_native(path), semantics, path)
    if fmt == "qvip-h5":
        from qverify.io.h5 import load_qvip_h5

        return _same_semantics(load_qvip_h5(path, bits=bits, input_bits=input_bits), semantics, path)
    if fmt == "onnx":
        from qverify.io.onnx import load_onnx

        return load_onnx(path, semantics=semantics or "exact")
    if fmt == "tflite":
        from qverify.io.tflite import load_tflite

        return _same_semantics(load_tflite(path), semantics, path)
    raise ModelError(f"{path}: unknown format {fmt!r} (supported: {', '.join(FORMATS)})")


def _same_semantics(net: QNetwork, semantics: str | None, path: Path) -> QNetwork:
    """``net`` if its semantics is ``semantics`` (or none was asked for), else a ModelError: only ONNX models are
    imported under a chosen semantics; other files store theirs."""
    if semantics is not None and net.semantics != semantics:
        raise ModelError(f"{path}: the model's semantics is {net.semantics!r}; semantics={semantics!r} applies to "
                         f"ONNX imports (re-import the ONNX model with it)")
    return net


def save_model(net: QNetwork, path: str | Path) -> None:
    """Save ``net`` in the native format."""
    from qverify.io.native import save_native

    save_native(net, path)
