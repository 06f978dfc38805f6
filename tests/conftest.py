"""Test session setup: OR-Tools' linear solver is loaded before any test module imports PuLP (see the note in
``qverify/solvers/cbc.py``: with ``highspy`` installed, the other order breaks OR-Tools' HiGHS and SCIP)."""

from ortools.linear_solver import pywraplp  # noqa: F401
