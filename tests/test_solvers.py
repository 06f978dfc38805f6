"""Solver back ends: agreement with brute force, the explicit status mapping, and the .lp/.mps exporters."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pulp
import pytest
from hypothesis import given, settings
from ortools.linear_solver.python import model_builder as mb

from qverify.encode import LinExpr, Program, encode
from qverify.settings import SolverSettings
from qverify.solvers import BACKENDS, SolveStatus, get_backend, solve
from qverify.solvers.export import export, to_lp_string, to_mps_string
from tests.fixtures import brute_force, networks_and_properties

GOLDEN = Path(__file__).resolve().parents[1] / "encodings" / "golden"
CBC = pulp.PULP_CBC_CMD().path


FLOAT_BACKENDS = ("scip", "highs", "cbc")


def _agrees(backend: str, net, prop, encoding: str, confirm: str = "auto", may_time_out: bool = False) -> None:
    """Through :func:`solve` (the only way a verdict is reached): a float back end's claim is confirmed."""
    robust, _ = brute_force(net, prop)
    enc = encode(net, prop, encoding=encoding)
    out = solve(enc.program, SolverSettings(backend=backend, threads=1, time_limit=20, confirm=confirm))
    if may_time_out and out.status is SolveStatus.TIMEOUT:
        return
    assert out.status in (SolveStatus.INFEASIBLE, SolveStatus.FEASIBLE), out
    assert (out.status is SolveStatus.INFEASIBLE) == robust
    if out.status is SolveStatus.FEASIBLE:
        # the integer solution satisfies every row exactly and its input violates the property
        assert enc.program.check(out.values) == []
        x = enc.decode(out.values, 0)
        from qverify.execute import forward

        assert prop.contains(x)[0] and prop.is_violated(forward(net, x[None, :]))[0]


@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(case=networks_and_properties())
@settings(max_examples=30, deadline=None)
def test_cpsat_agrees_with_brute_force(encoding, case):
    _agrees("cpsat", *case, encoding)


@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(case=networks_and_properties())
@settings(max_examples=30, deadline=None)
def test_checked_branch_and_bound_agrees_with_brute_force(encoding, case):
    """Never wrong; on the range encoding it always decides these tiny programs. On the one-hot encoding an LP-based
    search can need thousands of nodes where CP-SAT's presolve needs none (one 9-input conv case: 16000 nodes), so
    a timeout is allowed there (``confirm = 'auto'`` runs CP-SAT first for that reason)."""
    _agrees("checked", *case, encoding, may_time_out=encoding == "onehot")


@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(case=networks_and_properties())
@settings(max_examples=6, deadline=None)
def test_mip_backends_agree_with_brute_force(backend, encoding, case):
    _agrees(backend, *case, encoding, confirm="checked" if encoding == "range" else "auto")


@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
@given(case=networks_and_properties())
@settings(max_examples=6, deadline=None)
def test_floating_point_back_ends_never_answer_infeasible_themselves(backend, case):
    """Called directly, SCIP, HiGHS and CBC can only claim infeasibility (UNCONFIRMED); without a confirmer the
    claim stays UNCONFIRMED through :func:`solve`."""
    net, prop = case
    prog = encode(net, prop).program
    if prog.trivially_infeasible:  # decided by the encoder in exact integers, no solver involved
        return
    robust, _ = brute_force(net, prop)
    raw = get_backend(backend).solve(prog, SolverSettings(backend=backend, threads=1), 20)
    assert raw.status is not SolveStatus.INFEASIBLE
    out = solve(prog, SolverSettings(backend=backend, threads=1, time_limit=20, confirm="none"))
    assert out.status is not SolveStatus.INFEASIBLE
    if robust:
        assert out.status is SolveStatus.UNCONFIRMED and "not a proof" in out.message


# ------------------------------------------------------------------------------------------ status mapping
def _subset_sum(n: int = 60, seed: int = 0) -> Program:
    """A hard infeasible-or-not subset-sum equality (no solver decides it in a fraction of a second)."""
    rng = np.random.default_rng(seed)
    p = Program()
    xs = [p.add_binary(f"x{i}") for i in range(n)]
    a = rng.integers(2**29, 2**30, size=n)
    b = int(a.sum() // 2) | 1
    p.add_con(LinExpr.weighted_sum([(int(ai), LinExpr.var(x)) for ai, x in zip(a, xs, strict=True)]), b, b)
    return p


def test_cpsat_time_limit_is_a_timeout_never_a_proof():
    out = get_backend("cpsat").solve(_subset_sum(), SolverSettings(threads=1), 0.05)
    assert out.status is SolveStatus.TIMEOUT and out.raw_status == "UNKNOWN"


@pytest.mark.parametrize("backend", ["scip", "cbc"])
def test_mip_time_limit_is_a_timeout_never_a_proof(backend):
    out = get_backend(backend).solve(_subset_sum(80), SolverSettings(backend=backend, threads=1), 1.0)
    assert out.status in (SolveStatus.TIMEOUT, SolveStatus.FEASIBLE)  # never INFEASIBLE
    if out.status is SolveStatus.FEASIBLE:  # a (lucky) solution must satisfy the rows
        assert _subset_sum(80).check(out.values) == []


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_trivial_programs_are_decided_without_the_solver(backend):
    p = Program()
    x = p.add_var("x", 0, 3)
    p.add_con(LinExpr.var(x), 5, None)
    assert p.trivially_infeasible
    assert get_backend(backend).solve(p, SolverSettings(), 1).status is SolveStatus.INFEASIBLE
    assert get_backend(backend).solve(Program(), SolverSettings(), 1).status is SolveStatus.FEASIBLE


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_infeasible_and_feasible_small_programs(backend):
    p = Program()
    x, y = p.add_var("x", -3, 3), p.add_var("y", -3, 3)
    b = p.add_binary("b")
    p.add_con(LinExpr({x.index: 2, y.index: 2}), 3, 3 + 1)  # 2x + 2y = 4 after rounding inward
    p.add_indicator(b, 1, LinExpr.var(x), 3, None)
    p.add_indicator(b, 0, LinExpr.var(y), 3, None)
    out = solve(p, SolverSettings(backend=backend, threads=1, time_limit=10))
    assert out.status is SolveStatus.FEASIBLE and p.check(out.values) == []
    p.add_con(LinExpr.var(x) + LinExpr.var(y), None, 1)
    out = solve(p, SolverSettings(backend=backend, threads=1, time_limit=10))
    assert out.status is SolveStatus.INFEASIBLE
    if backend in FLOAT_BACKENDS:  # the float solver's claim, then the exact confirmation
        assert get_backend(backend).solve(p, SolverSettings(threads=1), 10).status is SolveStatus.UNCONFIRMED
        assert out.solver == f"{backend}+cpsat" and "confirmed by cpsat" in out.message  # auto: CP-SAT first


def test_deadline_in_the_past_is_a_timeout():
    import time

    out = solve(_subset_sum(10), SolverSettings(), deadline=time.monotonic() - 1)
    assert out.status is SolveStatus.TIMEOUT


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown solver"):
        get_backend("gurobi")


# ------------------------------------------------------------------------------------------ exporters
def _cbc_file_status(path: Path) -> str:
    r = subprocess.run([CBC, "-import", str(path), "-solve"], capture_output=True, text=True, timeout=60)
    # a declared variable that no constraint uses is legal LP; CBC only warns about it
    out = re.sub(r"### CoinLpIO::readLp\(\): Variable \S+ does not appear in objective function or constraints",
                 "", r.stdout.replace("with 0 errors", ""))
    assert not re.search(r"read with [1-9]|### |[Ee]rror", out), r.stdout[-2000:]
    if "Problem is infeasible" in r.stdout or "Pre-processing says infeasible" in r.stdout:
        return "infeasible"  # decided by CBC's presolve (every variable is bounded: not unbounded)
    if "Empty problem" in r.stdout:
        return "feasible" if re.search(r"^Optimal - objective", r.stdout, re.M) else "infeasible"
    m = re.search(r"Result - (.*)", r.stdout)
    assert m, r.stdout[-2000:]
    assert "infeasible" in m.group(1).lower() or "optimal" in m.group(1).lower(), m.group(1)
    return "infeasible" if "infeasible" in m.group(1).lower() else "feasible"


@pytest.mark.parametrize("encoding", ["range", "onehot"])
@given(case=networks_and_properties())
@settings(max_examples=8, deadline=None)
def test_exported_lp_and_mps_read_back_with_the_same_answer(tmp_path_factory, encoding, case):
    """The .lp and .mps files, read by CBC's own readers (and the .mps by OR-Tools + SCIP), give the verdict of
    brute force."""
    net, prop = case
    robust, _ = brute_force(net, prop)
    prog = encode(net, prop, encoding=encoding).program
    d = tmp_path_factory.mktemp("exp")
    want = "infeasible" if robust else "feasible"
    assert _cbc_file_status(export(prog, d / "m.lp")) == want
    assert _cbc_file_status(export(prog, d / "m.mps")) == want
    model = mb.Model()
    assert model.import_from_mps_string(to_mps_string(prog))
    st = mb.Solver("SCIP").solve(model)
    assert (st == mb.SolveStatus.INFEASIBLE) == robust


def test_golden_files_are_valid_lp_with_the_brute_force_answer():
    from tests.test_encode import _golden_cases

    for name, net, prop, _ in _golden_cases():
        robust, _ = brute_force(net, prop)
        assert _cbc_file_status(GOLDEN / f"{name}.lp") == ("infeasible" if robust else "feasible"), name


def test_export_is_deterministic_and_names_are_safe():
    p = Program()
    x = p.add_var("b-3", -2, 2)
    y = p.add_var("b-3", 0, 1)  # a clash after sanitizing
    z = p.add_binary("1bad name")
    p.add_con(LinExpr({x.index: 3, y.index: -1, z.index: 1}), -1, 4, name="row")
    p.add_indicator(z, 1, LinExpr.var(x), 1, None, name="ind")
    a, b = to_lp_string(p), to_lp_string(p)
    assert a == b and to_mps_string(p) == to_mps_string(p)
    assert "bm3" in a and "bm3__1" in a and "v1bad_name" in a
    assert " row_lo:" in a and " row_hi:" in a  # ranged rows split
    with pytest.raises(ValueError, match="unknown export format"):
        export(p, "model.txt")


def test_relaxed_programs_keep_continuous_variables_everywhere():
    """A relaxation's continuous variables: CP-SAT refuses the program, the MIP back ends and the LP/MPS writers
    keep them continuous (x, y in [0, 1] with x + y = 1 and x = y: only x = y = 1/2)."""
    p = Program()
    x, y = p.add_var("x", 0, 1), p.add_var("y", 0, 1)
    p.add_con(LinExpr.var(x) + LinExpr.var(y), 1, 1, name="sum")
    p.add_con(LinExpr.var(x) - LinExpr.var(y), 0, 0, name="equal")
    r = p.relaxed([x.index, y.index])
    assert p.vars[0].integer and not r.vars[0].integer and r.stats()["continuous"] == 2 and r.num_binaries == 0
    assert solve(p, SolverSettings(backend="highs", threads=1)).status is SolveStatus.INFEASIBLE
    for backend in ("scip", "highs", "cbc", "checked"):
        assert solve(r, SolverSettings(backend=backend, threads=1)).status is SolveStatus.FEASIBLE, backend
    out = solve(r, SolverSettings(backend="cpsat", threads=1))
    assert out.status is SolveStatus.ERROR and "continuous" in out.message
    lp = to_lp_string(r)
    assert "General" not in lp and "Binary" not in lp
    mps = to_mps_string(r)
    assert "INTORG" not in mps and "BV" not in mps
    model = mb.Model()
    assert model.import_from_mps_string(mps)
    assert mb.Solver("SCIP").solve(model) in (mb.SolveStatus.OPTIMAL, mb.SolveStatus.FEASIBLE)
