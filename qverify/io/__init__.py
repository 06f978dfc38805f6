"""Model and property input/output: one module per format, and :func:`load_model` that picks by extension."""

from qverify.io.models import load_model, save_model

__all__ = ["load_model", "save_model"]
