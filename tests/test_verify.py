"""The portfolio and every forced method against brute-force enumeration on tiny networks."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import forward, predict
from qverify.property import Property, robustness_property
from qverify.result import Reason, Verdict
from qverify.settings import VerifySettings
from qverify.verify import METHODS, verify, verify_batch
from tests.fixtures import (
    brute_force,
    graph_cases,
    least_slack,
    networks_and_properties,
    random_dense_network,
)


def _check(net, prop, res, robust):
    if res.verdict is Verdict.ROBUST:
        assert robust, res
    elif res.verdict is Verdict.COUNTEREXAMPLE:
        assert not robust and res.counterexample.confirmed
        assert prop.is_violated(res.counterexample.y[None, :])[0]
    assert res.stages and abs(res.seconds - sum(s.seconds for s in res.stages)) < 0.5


@given(networks_and_properties(max_points=2000))
@settings(max_examples=25, deadline=None)
def test_portfolio_is_complete_and_agrees_with_brute_force(pair):
    net, prop = pair
    robust, _ = brute_force(net, prop)
    res = verify(net, prop, VerifySettings(timeout=30))
    _check(net, prop, res, robust)
    assert res.verdict in (Verdict.ROBUST, Verdict.COUNTEREXAMPLE)  # complete on tiny nets


@pytest.mark.parametrize("method", [m for m in METHODS if m != "portfolio"])
def test_forced_methods_are_sound(method):
    rng = np.random.default_rng(5)
    for k in range(6):
        net = random_dense_network(np.random.default_rng(k), n_in=3, hidden=(4,))
        x = rng.integers(0, 8, size=3)
        prop = robustness_property(net, x, int(rng.integers(0, 3)), radius=1)
        robust, _ = brute_force(net, prop)
        res = verify(net, prop, VerifySettings(method=method, timeout=20))
        _check(net, prop, res, robust)
        if method in ("milp", "bab"):
            assert res.verdict is not Verdict.UNKNOWN
        elif res.verdict is Verdict.UNKNOWN:
            assert res.reason in (Reason.INCOMPLETE, Reason.TIMEOUT)


def test_batch_equals_single_and_reports_each():
    rng = np.random.default_rng(1)
    net = random_dense_network(rng, n_in=4, hidden=(5, 4))
    props = [robustness_property(net, rng.integers(0, 8, size=4), int(rng.integers(0, 3)), radius=int(r))
             for r in rng.integers(0, 3, size=12)]
    seen = []
    out = verify_batch(net, props, VerifySettings(timeout=20), workers=1, on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(12))
    for p, r in zip(props, out, strict=True):
        assert r.verdict is verify(net, p, VerifySettings(timeout=20)).verdict
        assert r.verdict is Verdict.ROBUST if brute_force(net, p)[0] else r.verdict is Verdict.COUNTEREXAMPLE


def test_timeout_is_never_robust():
    from tests.fixtures import MNIST1000, P1_6

    if not P1_6.exists():
        pytest.skip("../shared anchors not present")
    from qverify.io.h5 import load_qvip_h5

    net = load_qvip_h5(P1_6)
    d = np.load(MNIST1000)
    # id 175 at r=2 is robust but needs the exact stage; a 0.05 s budget cannot prove it
    prop = robustness_property(net, d["images"][175].ravel(), int(d["labels"][175]), radius=2)
    res = verify(net, prop, VerifySettings(method="milp", timeout=0.05))
    assert res.verdict is Verdict.UNKNOWN and res.reason == Reason.TIMEOUT
    assert res.vnncomp_status() == "timeout"


def test_property_of_another_network_is_an_error():
    net = random_dense_network(np.random.default_rng(0), n_in=4)
    other = random_dense_network(np.random.default_rng(0), n_in=3)
    prop = robustness_property(other, np.zeros(3, int), 0, radius=1)
    res = verify(net, prop)
    assert res.verdict is Verdict.ERROR and "3 inputs" in res.reason


def _fake_milp(calls, answers):
    """A stand-in for ``verify_milp`` that records (back end, time limit) and answers from ``answers``."""
    from qverify.result import Result as R

    def fake(net, prop, solver, bounds=None, deadline=None, relax=False, exclude=()):
        key = solver.backend + ("-relaxed" if relax else "")
        calls.append((key, solver.time_limit, tuple(exclude)))
        verdict, reason, *proved = answers[key]
        return R(verdict, f"milp-{solver.backend}-{solver.encoding}" + ("-relaxed" if relax else ""), 0.0, reason,
                 details={"proved_disjuncts": proved[0]} if proved else {})
    return fake


@pytest.mark.parametrize("first, expect_calls", [
    ((Verdict.UNKNOWN, Reason.TIMEOUT), ["cpsat", "highs"]),   # the first times out: the fallback decides
    ((Verdict.ROBUST, ""), ["cpsat"]),                         # the first decides: no fallback
    ((Verdict.UNKNOWN, Reason.SOLVER), ["cpsat"]),      # not a timeout: reported as it is
])
def test_portfolio_exact_stage_falls_back_only_after_a_timeout(monkeypatch, first, expect_calls):
    import qverify.exact
    from qverify.verify import _Clock, _exact_stage

    net = random_dense_network(np.random.default_rng(0), n_in=3, hidden=(4,))
    prop = robustness_property(net, np.array([3, 4, 5]), 0, radius=1)
    calls: list = []
    monkeypatch.setattr(qverify.exact, "verify_milp",
                        _fake_milp(calls, {"cpsat": first, "highs": (Verdict.ROBUST, "")}))
    res = _exact_stage(net, prop, _Clock(10.0), VerifySettings(timeout=10.0, fallback="highs", relax=""), "milp",
                       None)
    assert [c[0] for c in calls] == expect_calls
    if len(calls) == 2:
        assert res.verdict is Verdict.ROBUST and res.method == "milp-highs-range"
        assert calls[0][1] == pytest.approx(3.0, abs=0.2)  # 1 - fallback_share of the stage's time
        assert calls[1][1] == pytest.approx(10.0, abs=0.2)  # all that is left (the fake returned at once)
        assert [s.stage for s in res.stages] == ["milp-cpsat-range", "milp"]
    else:
        assert res.verdict is first[0] and calls[0][1] == pytest.approx(3.0, abs=0.2)


@pytest.mark.parametrize("settings_", [VerifySettings(method="milp", fallback="highs"),
                                       VerifySettings(fallback="", relax=""),
                                       VerifySettings(fallback="cpsat", relax="")])
def test_no_fallback_for_a_forced_milp_or_when_switched_off(monkeypatch, settings_):
    import qverify.exact
    from qverify.verify import _Clock, _exact_stage

    net = random_dense_network(np.random.default_rng(0), n_in=3, hidden=(4,))
    prop = robustness_property(net, np.array([3, 4, 5]), 0, radius=1)
    calls: list = []
    monkeypatch.setattr(qverify.exact, "verify_milp", _fake_milp(calls, {"cpsat": (Verdict.UNKNOWN, Reason.TIMEOUT),
                                                                          "highs": (Verdict.ROBUST, "")}))
    res = _exact_stage(net, prop, _Clock(5.0), settings_, "milp", None)
    assert [c[0] for c in calls] == ["cpsat"] and res.verdict is Verdict.UNKNOWN and res.reason == Reason.TIMEOUT


@pytest.mark.parametrize("relaxed, expect", [
    ((Verdict.ROBUST, ""), ["scip-relaxed"]),                                   # the relaxation proves it
    ((Verdict.UNKNOWN, Reason.INCOMPLETE, [2]), ["scip-relaxed", "cpsat", "highs"]),  # it proves disjunct 2 only
    ((Verdict.UNKNOWN, Reason.TIMEOUT), ["scip-relaxed", "cpsat", "highs"]),
])
def test_portfolio_tries_the_relaxed_program_first(monkeypatch, relaxed, expect):
    import qverify.exact
    from qverify.verify import _Clock, _exact_stage

    net = random_dense_network(np.random.default_rng(0), n_in=3, hidden=(4,))
    prop = robustness_property(net, np.array([3, 4, 5]), 0, radius=1)
    calls: list = []
    monkeypatch.setattr(qverify.exact, "verify_milp", _fake_milp(calls, {
        "scip-relaxed": relaxed, "cpsat": (Verdict.UNKNOWN, Reason.TIMEOUT), "highs": (Verdict.ROBUST, "")}))
    res = _exact_stage(net, prop, _Clock(10.0), VerifySettings(timeout=10.0), "milp", None)
    assert [c[0] for c in calls] == expect and res.verdict is Verdict.ROBUST
    assert calls[0][1] == pytest.approx(3.0, abs=0.2)  # relax_share of the stage's time
    proved = tuple(relaxed[2]) if len(relaxed) > 2 else ()
    assert all(c[2] == proved for c in calls[1:])  # later programs skip what the relaxation proved



def _stuck_exact(mp: pytest.MonkeyPatch) -> None:
    """Make the exact stage give up (timeout), as it does on a hard near-tie, so the result stays unknown; the
    neuron branch and bound before it (complete too) is skipped."""
    import qverify.verify as qv
    from qverify.result import Result

    mp.setattr(qv, "_split_stage", lambda net, prop, clock, settings, bounds: (None, []))

    mp.setattr(qv, "_exact_stage", lambda net, prop, clock, settings, method, bounds, proved=(): Result(
        Verdict.UNKNOWN, method, clock.elapsed(), Reason.TIMEOUT, None, list(clock.stages), {"kept": 1}))


@settings(max_examples=25, deadline=None)
@given(networks_and_properties())
def test_unknown_results_bracket_the_least_slack(pair):
    """An undecided instance says what is known of ``s* = min_box slack``: ``lower <= s* <= upper``, with ``upper``
    the exact slack of the nearest miss it reports; the same from one property and from a batch."""
    net, prop = pair
    s_star = least_slack(net, prop)
    fast = VerifySettings(timeout=5)
    with pytest.MonkeyPatch.context() as mp:
        _stuck_exact(mp)
        results = [verify(net, prop, fast), verify_batch(net, [prop], fast, workers=1)[0]]
    for res in results:
        if res.verdict is not Verdict.UNKNOWN:
            assert "slack" not in res.details and (res.verdict is Verdict.ROBUST) == (s_star > 0)
            continue
        sl = res.details["slack"]
        assert res.details["kept"] == 1  # the exact stage's own details are kept
        assert sl["lower"] <= s_star <= sl["upper"] and sl["upper"] >= 1
        x = np.array(sl["nearest"]["x"])
        assert prop.contains(x)[0] and sl["nearest"]["y"] == forward(net, x[None])[0].tolist()
        assert int(prop.slack(np.array([sl["nearest"]["y"]]))[0]) == sl["upper"]


def test_incomplete_methods_give_the_end_of_the_bracket_they_know():
    net = random_dense_network(np.random.default_rng(5), n_in=6, hidden=(8, 6))
    for seed in range(200):  # a property that the bounds do not prove
        x = np.random.default_rng(seed).integers(net.input_lo, net.input_hi + 1, net.num_inputs)
        prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=3)
        sym = verify(net, prop, VerifySettings(method="symbolic"))
        if sym.verdict is Verdict.UNKNOWN:
            break
    else:
        pytest.skip("no undecided property found")
    assert sym.details["slack"]["upper"] is None and sym.details["slack"]["lower"] <= 0
    att = verify(net, prop, VerifySettings(method="attack", timeout=2))
    if att.verdict is Verdict.UNKNOWN:
        assert att.details["slack"]["lower"] is None and att.details["slack"]["upper"] >= 1


def test_near_ties_of_random_networks_are_bracketed_alone_and_in_a_batch():
    """Properties the bounds leave open and the exact stage (stubbed to time out) does not decide: every one is
    bracketed soundly, by :func:`verify` and by :func:`verify_batch` alike."""
    props, nets = [], []
    for seed in range(400):
        rng = np.random.default_rng(seed)
        net = random_dense_network(rng, n_in=4, hidden=(6, 5))
        x = rng.integers(net.input_lo, net.input_hi + 1, net.num_inputs)
        prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=2)
        if prop.box_size() <= 5000:
            nets.append(net)
            props.append(prop)
    fast = VerifySettings(timeout=5)
    checked = 0
    with pytest.MonkeyPatch.context() as mp:
        _stuck_exact(mp)
        for net, prop in zip(nets, props, strict=True):
            res = verify(net, prop, fast)
            if res.verdict is not Verdict.UNKNOWN:
                continue
            batch = verify_batch(net, [prop, prop], fast, workers=1)
            s_star = least_slack(net, prop)
            for r in (res, *batch):
                sl = r.details["slack"]
                assert sl["lower"] <= s_star <= sl["upper"]
                assert int(prop.slack(forward(net, np.array(sl["nearest"]["x"])[None]))[0]) == sl["upper"]
            checked += 1
            if checked == 8:
                break
    assert checked == 8


@settings(max_examples=25, deadline=None)
@given(pair=st.one_of(networks_and_properties(max_points=400), graph_cases(max_points=400)))
def test_kept_symbolic_bounds_equal_a_fresh_analysis_of_the_box(pair):
    """The batched symbolic pass hands each property it leaves open its bounds and slack lower bound, so the
    exact stage does not recompute them: they must be what the one-box analysis gives (bit for bit)."""
    from qverify.bounds.symbolic import certified_by_symbolic
    from qverify.verify import _symbolic

    net, prop = pair
    other = Property(prop.lo, np.minimum(prop.hi, prop.lo + 1), prop.unsafe)  # a second box in the same batch
    keep: dict = {}
    cert = certified_by_symbolic(net, [prop, other], keep=keep)
    for i, p in enumerate((prop, other)):
        ok, bounds, lower = _symbolic(net, p)
        assert bool(cert[i]) == ok
        if ok:
            assert i not in keep
            continue
        assert i in keep
        kb, kl = keep[i]
        assert kl == lower
        assert len(kb) == len(bounds)
        for (a, b), (c, d) in zip(kb, bounds, strict=True):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)


def test_a_deadline_cut_symbolic_pass_keeps_nothing():
    """Bounds of a pass whose refinements were skipped are looser than a full analysis: not kept."""
    from qverify.bounds.symbolic import certified_by_symbolic

    rng = np.random.default_rng(3)
    net = random_dense_network(rng, n_in=6, hidden=(8, 8, 8))
    x = rng.integers(net.input_lo, net.input_hi + 1, size=net.num_inputs)
    prop = robustness_property(net, x, int(predict(net, x[None])[0]), radius=3)
    keep: dict = {}
    assert not certified_by_symbolic(net, [prop], deadline=time.monotonic() - 1.0, keep=keep)[0]
    assert keep == {}
    assert not certified_by_symbolic(net, [prop], keep=keep)[0]
    assert list(keep) == [0]  # without the deadline the same open property is kept
