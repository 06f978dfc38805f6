"""Text escaping and number formatting shared by the report's renderers (HTML and Markdown)."""

from __future__ import annotations

import html
import re


def esc(v: object) -> str:
    """HTML text of any value (quotes escaped too: safe in attributes)."""
    return html.escape("" if v is None else str(v), quote=True)


def md(v: object) -> str:
    """Markdown text of any value: HTML-escaped, Markdown punctuation backslash-escaped, one line."""
    s = html.escape("" if v is None else str(v), quote=False)
    s = re.sub(r"[\r\n]+", " ", s)
    return re.sub(r"([\\`*_\[\]|#!{}])", r"\\\1", s)


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal (``-`` for ``None``)."""
    return "-" if v is None else f"{100 * v:.1f}%"


__all__ = ["esc", "md", "pct"]
