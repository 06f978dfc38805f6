"""A short, derandomized run of the reader fuzzers of ``tests/fuzzing.py`` (issue 16, part 3).

Each reader must return a valid object (the generated meaning, where it is known) or raise its documented, located
error; ``benchmarks/bench_fuzz.py`` runs the same strategies for minutes. The regression tests of the crashes the
fuzzers found live with their readers' tests (``test_io_vnnlib.py``, ``test_io_native.py``, ``test_io_onnx.py``).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzzing import mutated_onnx, mutated_qnn, mutated_vnnlib, run_onnx, run_qnn, run_vnnlib, vnnlib_cases

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


@fuzz(150)
@given(vnnlib_cases())
def test_generated_vnnlib_parses_to_its_meaning(tmp_path_factory, case):
    out = run_vnnlib(case, tmp_path_factory.mktemp("v") if case.net_kind % 2 else None)
    assert not out.crashed, out.detail


@fuzz(200)
@given(mutated_vnnlib())
def test_mutated_vnnlib_is_parsed_or_a_located_error(case):
    out = run_vnnlib(case)
    assert not out.crashed, f"{case.mutation}: {out.detail}"


@fuzz(250)
@given(mutated_qnn())
def test_mutated_qnn_loads_or_is_a_located_error(tmp_path_factory, case):
    out = run_qnn(case, tmp_path_factory.mktemp("q"))
    assert not out.crashed, f"{case.mutation}: {out.detail}"


@fuzz(200)
@given(mutated_onnx())
def test_mutated_onnx_imports_or_is_a_located_error(tmp_path_factory, case):
    pytest.importorskip("onnx")
    out = run_onnx(case, tmp_path_factory.mktemp("o"))
    assert not out.crashed, f"{case.mutation}: {out.detail}"
