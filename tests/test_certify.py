"""certify: verdicts against brute force, durable JSON-lines results, resume after a kill, repair, Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qverify.certify import (
    MISCLASSIFIED,
    ResultsFileError,
    _Writer,
    certify,
    network_sha256,
    read_results,
    select_ids,
    summarize,
)
from qverify.execute import predict
from qverify.property import robustness_property
from qverify.replay import replay
from qverify.settings import VerifySettings
from tests.fixtures import brute_force, random_dense_network

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = VerifySettings(timeout=20)
RADII = [0, 1, 2]
N = 10
#: samples whose label is flipped: the executor misclassifies them
FLIPPED = (1, 6)


def make_problem(seed: int = 3):
    """A tiny dense network on 2x2 'images' with pixels 0..7, labels = predictions except FLIPPED."""
    rng = np.random.default_rng(seed)
    net = random_dense_network(rng, n_in=4, hidden=(5, 4), n_out=3, input_hi=7)
    images = rng.integers(0, 8, size=(N, 2, 2)).astype(np.uint8)
    labels = predict(net, images.reshape(N, -1)).astype(np.int64)
    for i in FLIPPED:
        labels[i] = (labels[i] + 1) % 3
    return net, images, labels


@pytest.fixture(scope="module")
def problem():
    return make_problem()


@pytest.fixture(scope="module")
def reference(problem, tmp_path_factory):
    """An uninterrupted run: the ground truth the resumed runs must reproduce."""
    net, images, labels = problem
    path = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    s = certify(net, images, labels, RADII, results_path=path, settings=SETTINGS, workers=1, progress=False)
    return path, s


def instance_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if '"type":"instance"' in line]


def verdicts(records) -> dict[tuple[int, int], tuple]:
    return {(r["id"], r["radius"]): (r["verdict"], r["label"], r["prediction"]) for r in records}


# ------------------------------------------------------------------------------------------------ verdicts
def test_verdicts_match_brute_force(problem, reference):
    net, images, labels = problem
    path, s = reference
    recs = instance_lines(path)
    assert len(recs) == N * len(RADII) and len(verdicts(recs)) == N * len(RADII)
    assert s.new == N * len(RADII) and s.resumed == 0
    kinds = Counter(r["verdict"] for r in recs)
    assert kinds[MISCLASSIFIED] == len(FLIPPED) * len(RADII)
    assert kinds["robust"] > 0 and kinds["counterexample"] > 0, kinds  # the fixture exercises both
    x = images.reshape(N, -1).astype(np.int64)
    for r in recs:
        i, rad = r["id"], r["radius"]
        prop = robustness_property(net, x[i], int(labels[i]), radius=rad)
        ok, _ = brute_force(net, prop)
        if r["verdict"] == MISCLASSIFIED:
            assert i in FLIPPED and r["prediction"] != r["label"] and r["method"] == "executor"
            assert r["x0"] == x[i].tolist() and r["status"] == "sat" and not ok
            continue
        assert i not in FLIPPED
        assert r["verdict"] == ("robust" if ok else "counterexample"), (i, rad, r)
        assert r["status"] == ("unsat" if ok else "sat")
        assert r["scores"] and r["seconds"] >= 0 and r["stages"] and r["property"]["description"]
        if not ok:
            w = r["witness"]
            assert w["confirmed"] and replay(net, prop, np.array(w["x"])).confirmed
            assert r["x0"] == x[i].tolist()


def test_header_records_everything(problem, reference):
    net, images, labels = problem
    path, _ = reference
    f = read_results(path)
    h = f.header
    assert h["format"] == "qverify-certify-results" and h["radii"] == RADII
    assert h["model"]["network_sha256"] == network_sha256(net)
    assert h["settings"]["timeout"] == SETTINGS.timeout and h["seed"] == SETTINGS.seed
    for lib in ("qverify", "numpy", "ortools", "torch"):
        assert h["versions"][lib]
    assert [s["type"] for s in f.sessions] == ["session", "session_end"]
    assert f.truncated is None and f.duplicates == 0


def test_network_hash_sees_every_weight(problem):
    net, _, _ = problem
    other = make_problem(seed=4)[0]
    assert network_sha256(net) == network_sha256(make_problem()[0])
    assert network_sha256(net) != network_sha256(other)


def test_select_ids():
    assert select_ids(10) == list(range(10))
    a = select_ids(100, sample=7, seed=5)
    assert a == select_ids(100, sample=7, seed=5) and len(set(a)) == 7 and a == sorted(a)
    assert a != select_ids(100, sample=7, seed=6)
    with pytest.raises(ValueError):
        select_ids(10, ids=[3, 10])
    with pytest.raises(ValueError):
        select_ids(10, ids=[1], sample=1)


def test_progress_bar_shows_running_counts(problem, tmp_path, capsys):
    net, images, labels = problem
    certify(net, images, labels, [0], ids=[0, 1, 2], results_path=tmp_path / "p.jsonl", settings=SETTINGS,
            workers=1, progress=True)
    err = capsys.readouterr().err
    assert "certify" in err and "robust=" in err and "miscl=1" in err and "3/3" in err


# ------------------------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_mid_run(problem, reference, tmp_path):
    """A process killed with SIGKILL after 7 records: re-running finishes the rest, no duplicate, no loss."""
    path = tmp_path / "killed.jsonl"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_certify import make_problem, RADII, SETTINGS
        from qverify.certify import certify
        net, images, labels = make_problem()
        n = [0]
        def on_record(rec):
            n[0] += 1
            if n[0] == 7:
                os.kill(os.getpid(), signal.SIGKILL)
        if __name__ == "__main__":
            certify(net, images, labels, RADII, results_path={str(path)!r}, settings=SETTINGS, workers=1,
                    progress=False, on_record=on_record)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len(instance_lines(path)) == 7
    net, images, labels = problem
    s = certify(net, images, labels, RADII, results_path=path, settings=SETTINGS, workers=1, progress=False)
    assert s.resumed == 7 and s.new == N * len(RADII) - 7
    recs = instance_lines(path)
    keys = [(r["id"], r["radius"]) for r in recs]
    assert len(keys) == len(set(keys)) == N * len(RADII)
    assert verdicts(recs) == verdicts(instance_lines(reference[0]))
    f = read_results(path)
    assert [x["type"] for x in f.sessions] == ["session", "session", "session_end"]
    assert f.sessions[1]["already_done"] == 7
    # a third run has nothing to do
    s3 = certify(net, images, labels, RADII, results_path=path, settings=SETTINGS, workers=1, progress=False)
    assert s3.new == 0 and s3.resumed == N * len(RADII) and len(instance_lines(path)) == N * len(RADII)


def test_resume_after_exception_in_pool(problem, reference, tmp_path):
    """Stopped by an exception (like Ctrl-C) while two worker processes run: the rest is done on resume.

    The exact method is forced so that every instance goes through the process pool (the portfolio decides most
    tiny instances in its shared, in-process stages); its verdicts must equal the portfolio's.
    """
    net, images, labels = problem
    path = tmp_path / "stopped.jsonl"
    milp = replace(SETTINGS, method="milp")

    class Stop(Exception):
        pass

    def stop_after(k):
        n = [0]

        def cb(rec):
            n[0] += 1
            if n[0] == k:
                raise Stop

        return cb

    with pytest.raises(Stop):
        certify(net, images, labels, RADII, results_path=path, settings=milp, workers=2, progress=False,
                on_record=stop_after(12))
    assert len(instance_lines(path)) == 12
    s = certify(net, images, labels, RADII, results_path=path, settings=milp, workers=1, progress=False)
    assert s.resumed == 12
    recs = instance_lines(path)
    assert len(recs) == len({(r["id"], r["radius"]) for r in recs}) == N * len(RADII)
    assert verdicts(recs) == verdicts(instance_lines(reference[0]))
    assert verdicts(s.records) == verdicts(recs)


def test_truncated_last_line_is_detected_and_repaired(problem, reference, tmp_path):
    net, images, labels = problem
    path = tmp_path / "cut.jsonl"
    lines = reference[0].read_text().splitlines(keepends=True)
    inst = [k for k, line in enumerate(lines) if '"type":"instance"' in line]
    keep = lines[:inst[-1]]  # everything up to the last instance record ...
    lost = json.loads(lines[inst[-1]])
    path.write_text("".join(keep) + lines[inst[-1]][:57])  # ... which was cut short by a power loss
    f = read_results(path)
    assert f.truncated and "line" in f.truncated and (lost["id"], lost["radius"]) not in f.done()
    assert path.read_text().endswith(lines[inst[-1]][:57])  # reading alone does not modify the file
    notes = []
    s = certify(net, images, labels, RADII, results_path=path, settings=SETTINGS, workers=1, progress=False,
                log=notes.append)
    assert s.repaired and any("recovered" in n for n in notes)
    assert s.new == 1  # only the lost instance is redone
    text = path.read_text()
    assert all(json.loads(line) for line in text.splitlines())  # every line parses again
    recs = instance_lines(path)
    assert len(recs) == N * len(RADII) and verdicts(recs) == verdicts(instance_lines(reference[0]))
    assert read_results(path).truncated is None


def test_damaged_middle_line_is_an_error(reference, tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = reference[0].read_text().splitlines(keepends=True)
    lines[3] = lines[3][:20] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(ResultsFileError, match="line 4"):
        read_results(path)


def test_truncated_header_starts_over(problem, tmp_path):
    net, images, labels = problem
    path = tmp_path / "h.jsonl"
    path.write_text('{"type":"header","format":"qverify-cert')
    s = certify(net, images, labels, [0], ids=[0, 2], results_path=path, settings=SETTINGS, workers=1,
                progress=False)
    assert s.repaired and s.new == 2 and read_results(path).header["radii"] == [0]


def test_incompatible_file_is_refused_unless_overwrite(problem, reference, tmp_path):
    net, images, labels = problem
    path = tmp_path / "r.jsonl"
    path.write_bytes(reference[0].read_bytes())
    with pytest.raises(ResultsFileError, match="settings: timeout was 20"):
        certify(net, images, labels, RADII, results_path=path, settings=replace(SETTINGS, timeout=5), workers=1,
                progress=False)
    other = make_problem(seed=4)[0]
    with pytest.raises(ResultsFileError, match="model"):
        certify(other, images, labels, RADII, results_path=path, settings=SETTINGS, workers=1, progress=False)
    with pytest.raises(ResultsFileError, match="data"):
        certify(net, images[::-1].copy(), labels, RADII, results_path=path, settings=SETTINGS, workers=1,
                progress=False)
    assert path.read_bytes() == reference[0].read_bytes()  # refused runs leave the file alone
    with pytest.raises(ResultsFileError, match="settings: solver was .*'encoding': 'range'.* now .*'onehot'"):
        certify(net, images, labels, RADII, results_path=path, workers=1, progress=False,
                settings=replace(SETTINGS, solver=replace(SETTINGS.solver, encoding="onehot")))
    s = certify(net, images, labels, [0], ids=[0], results_path=path, settings=replace(SETTINGS, timeout=5),
                workers=1, progress=False, overwrite=True)
    assert s.new == 1 and s.resumed == 0
    assert (tmp_path / "r.jsonl.bak").read_bytes() == reference[0].read_bytes()


def test_more_radii_and_samples_extend_a_run(problem, reference, tmp_path):
    net, images, labels = problem
    path = tmp_path / "x.jsonl"
    certify(net, images, labels, [0], ids=[0, 1, 2], results_path=path, settings=SETTINGS, workers=1,
            progress=False)
    s = certify(net, images, labels, RADII, results_path=path, settings=SETTINGS, workers=1, progress=False)
    assert s.resumed == 3 and s.new == N * len(RADII) - 3
    assert verdicts(instance_lines(path)) == verdicts(instance_lines(reference[0]))


def test_a_locked_file_is_refused(problem, tmp_path):
    net, images, labels = problem
    path = tmp_path / "l.jsonl"
    w = _Writer(path)
    try:
        with pytest.raises(ResultsFileError, match="in use"):
            certify(net, images, labels, [0], results_path=path, settings=SETTINGS, workers=1, progress=False)
    finally:
        w.close()


def test_summarize_counts(reference):
    recs = instance_lines(reference[0])
    rows = summarize(recs)
    assert [r["radius"] for r in rows] == RADII
    for row in rows:
        mine = [r for r in recs if r["radius"] == row["radius"]]
        c = Counter(r["verdict"] for r in mine)
        assert row["n"] == len(mine) == N
        assert row["robust"] == c["robust"] and row["counterexample"] == c["counterexample"]
        assert row[MISCLASSIFIED] == c[MISCLASSIFIED] == len(FLIPPED)
        assert row["certified_accuracy"] == c["robust"] / N
        assert row["clean_accuracy"] == (N - len(FLIPPED)) / N
        verified = [r["seconds"] for r in mine if r["verdict"] != MISCLASSIFIED]
        assert row["time_total"] == pytest.approx(sum(verified)) and row["time_max"] == max(verified)


def test_bad_labels_are_rejected(problem, tmp_path):
    from qverify.property import PropertyError

    net, images, labels = problem
    bad = labels.copy()
    bad[0] = 7
    with pytest.raises(PropertyError, match="labels"):
        certify(net, images, bad, [0], results_path=tmp_path / "b.jsonl", settings=SETTINGS, workers=1,
                progress=False)
    assert not os.path.exists(tmp_path / "b.jsonl")


# ------------------------------------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="the Ray path needs the optional extra: pip install 'qverify[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_path_same_results_and_resume(problem, reference, ray_local, tmp_path):
    net, images, labels = problem
    path = tmp_path / "ray.jsonl"

    class Stop(Exception):
        pass

    n = [0]

    def cb(rec):
        n[0] += 1
        if n[0] == 9:
            raise Stop

    with pytest.raises(Stop):
        certify(net, images, labels, RADII, results_path=path, settings=SETTINGS, ray_address="auto", ray_chunk=2,
                progress=False, on_record=cb)
    assert len(instance_lines(path)) == 9
    s = certify(net, images, labels, RADII, results_path=path, settings=SETTINGS, ray_address="auto", ray_chunk=2,
                progress=False)
    assert s.resumed == 9 and s.new == N * len(RADII) - 9
    recs = instance_lines(path)
    assert len(recs) == len({(r["id"], r["radius"]) for r in recs}) == N * len(RADII)
    assert verdicts(recs) == verdicts(instance_lines(reference[0]))
    assert read_results(path).sessions[-2]["ray_address"] == "auto"


def test_resume_may_change_threads_and_reads_files_without_the_watchdog_setting(problem, reference, tmp_path):
    """Solver threads and the watchdog change the speed of a run, not the meaning of its verdicts: a results file
    resumes under other values, and one written before the watchdog setting existed resumes too."""
    net, images, labels = problem
    path = tmp_path / "r.jsonl"
    lines = reference[0].read_text().splitlines(keepends=True)
    head = json.loads(lines[0])
    del head["settings"]["solver"]["watchdog"]  # as written by an older qverify
    head["settings"]["solver"]["threads"] = 7
    path.write_text(json.dumps(head) + "\n" + "".join(lines[1:]))
    s = certify(net, images, labels, RADII, results_path=path, workers=1, progress=False,
                settings=replace(SETTINGS, solver=replace(SETTINGS.solver, threads=1, watchdog=False)))
    assert s.new == 0 and s.resumed == len(reference[1].records)
