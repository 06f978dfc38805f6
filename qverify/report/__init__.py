"""Certification reports (HTML, Markdown, JSON summary, VNN-COMP result files) from ``certify`` results files."""

from qverify.report.render import load_runs, render_report, summary_json

__all__ = ["load_runs", "render_report", "summary_json"]
