"""Fuzz the three input readers (issue 16, part 3): VNN-LIB, ``.qnn`` and ONNX.

Each reader gets its hypothesis strategy from ``tests/fuzzing.py`` (grammar-aware VNN-LIB with a known meaning and
mutations of it and of files qverify writes; byte, zip, manifest and array mutations of ``.qnn`` archives;
structural and byte mutations of small QDQ and QOperator ONNX models) and runs for ``--seconds`` (or
``--examples``) per reader, in rounds of ``--chunk`` examples with a new seed each. The contract checked on every
case (see ``tests/fuzzing.py``): a valid object (right meaning where it is known, refused type-breaking mutations,
a network that runs) or the documented, located error. A case that breaks it is a *crash*: hypothesis shrinks it,
the minimized input is written to ``benchmarks/out/fuzz_crashes/`` (one file per distinct crash: exception type and
place, or the broken rule; a case slower than ``--slow`` seconds counts as a hang) and that crash is not reported
again in later rounds. ONNX models that both qverify and
onnxruntime accept are also run on onnxruntime (``ort differs``: informational, onnxruntime requantizes in float32
and the mutations reach extreme scales; the divergence check of issue 16 part 2 measures it properly).
``via catch-all`` counts the documented errors that only the ONNX importer's last-resort conversion of a numeric
exception into a located ``ModelError`` ("malformed node") produced: each is a cause still to be named.

    python benchmarks/bench_fuzz.py --seconds 300
    python benchmarks/bench_fuzz.py --readers vnnlib --examples 2000

Prints a table (reader, cases, valid, documented errors, crashes) and writes ``benchmarks/out/bench_fuzz.json``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from benchmarks.common import OUT, print_table, write_json  # noqa: E402
from tests.fuzzing import CRASH, DOCUMENTED, READERS, VALID, OnnxCase, Outcome, QnnCase, VnnCase  # noqa: E402

_SIG = re.compile(r"^(?:loaded network does not run: )?(\w+ at [\w.]+:\d+)")


class _Found(Exception):
    """A new crash (raised inside the hypothesis test so that it shrinks the input)."""


def signature(o: Outcome) -> str:
    """What makes two crashes the same: the exception type and innermost place, or the broken rule."""
    m = _SIG.match(o.detail)
    if m:
        return m.group(1)
    return re.sub(r"\d+|'[^']*'|/\S+", "_", o.detail)[:80]


def case_bytes(case: object) -> tuple[bytes, str]:
    if isinstance(case, VnnCase):
        return case.text.encode("utf-8", "surrogatepass"), "vnnlib"
    if isinstance(case, QnnCase):
        return case.data, "qnn"
    assert isinstance(case, OnnxCase)
    return case.data, "onnx"


def fuzz(reader: str, seconds: float, examples: int | None, chunk: int, tmp: Path, crash_dir: Path,
         slow: float) -> dict:
    strategy, run = READERS[reader]
    counts: Counter = Counter()
    known: dict[str, dict] = {}
    last: dict[str, tuple[object, Outcome]] = {}
    t0 = time.perf_counter()
    done = [0]
    slowest = [0.0]
    ort_steps: Counter = Counter()  # largest output difference (steps) of each case onnxruntime computes otherwise
    ort_kinds: Counter = Counter()  # the mutations of those cases

    def body(case: object) -> None:
        t = time.perf_counter()
        o = run(case, tmp, compare=True) if reader == "onnx" else run(case, tmp)
        dt = time.perf_counter() - t
        slowest[0] = max(slowest[0], dt)
        if dt > slow and not o.crashed:  # never a hang: a case slower than --slow seconds breaks the contract
            kinds = "+".join(sorted(set(re.findall(r"[a-z-]+", getattr(case, "mutation", "") or "generated"))))
            o = Outcome(CRASH, f"slow ({dt:.1f} s > {slow:g} s): {kinds}")
        if o.crashed:
            sig = signature(o)
            if sig not in known:
                last[sig] = (case, o)
                raise _Found(sig)
            counts[CRASH] += 1
            known[sig]["hits"] += 1
        else:
            counts[o.kind] += 1
            if o.kind == DOCUMENTED and "malformed node" in o.detail:
                counts["catch-all"] += 1  # a ModelError from the ONNX importer's last-resort net
            if o.detail.startswith("onnxruntime differs"):
                counts["ort differs"] += 1
                steps = int(re.findall(r"\d+", o.detail)[0])
                ort_steps[steps] += 1
                for kind in set(re.findall(r"[a-z-]+", getattr(case, "mutation", "").split(":", 1)[-1])):
                    ort_kinds[kind] += 1
        done[0] += 1

    round_ = 0
    while True:
        left = None if examples is None else examples - done[0]
        if (examples is None and time.perf_counter() - t0 >= seconds) or (left is not None and left <= 0):
            break
        n = chunk if left is None else min(chunk, left)
        test = settings(max_examples=n, deadline=None, database=None, report_multiple_bugs=False,
                        suppress_health_check=list(HealthCheck))(given(strategy())(body))
        try:
            seed(round_)(test)()
        except _Found as e:
            sig = str(e)
            case, o = last[sig]  # the last failing call is hypothesis' minimized example
            data, ext = case_bytes(case)
            crash_dir.mkdir(parents=True, exist_ok=True)
            f = crash_dir / f"{reader}-{len(known):02d}.{ext}"
            f.write_bytes(data)
            known[sig] = {"detail": o.detail, "mutation": getattr(case, "mutation", ""), "file": str(f), "hits": 1}
            counts[CRASH] += 1
        round_ += 1
    elapsed = time.perf_counter() - t0
    return {"reader": reader, "cases": done[0] + len(known), "valid": counts[VALID],
            "documented errors": counts[DOCUMENTED], "via catch-all": counts["catch-all"],
            "crashes": counts[CRASH], "distinct crashes": len(known), "ort differs": counts["ort differs"],
            "seconds": round(elapsed, 1), "slowest case s": round(slowest[0], 2), "rounds": round_,
            "ort differs by steps": dict(sorted(ort_steps.items())), "ort differs mutations": dict(ort_kinds),
            "crash list": known}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="time per reader (default 60)")
    ap.add_argument("--examples", type=int, default=None, help="examples per reader instead of a time budget")
    ap.add_argument("--readers", default="vnnlib,qnn,onnx", help="comma-separated: vnnlib, qnn, onnx")
    ap.add_argument("--chunk", type=int, default=300, help="examples per hypothesis round (one seed each)")
    ap.add_argument("--slow", type=float, default=10.0, help="a case slower than this (seconds) is a crash (a hang)")
    args = ap.parse_args(argv)
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    except ImportError:
        pass
    rows = []
    crash_dir = OUT / "fuzz_crashes"
    with tempfile.TemporaryDirectory() as d:
        for reader in [r.strip() for r in args.readers.split(",") if r.strip()]:
            if reader not in READERS:
                ap.error(f"unknown reader {reader!r} (known: {', '.join(READERS)})")
            rows.append(fuzz(reader, args.seconds, args.examples, args.chunk, Path(d), crash_dir, args.slow))
    print_table(rows, ["reader", "cases", "valid", "documented errors", "via catch-all", "crashes", "distinct crashes",
                       "ort differs", "slowest case s", "seconds"])
    for r in rows:
        for sig, k in r["crash list"].items():
            print(f"  {r['reader']}: {sig} ({k['hits']} cases; minimized: {k['file']}): {k['detail'][:160]}")
        if r["ort differs"]:
            print(f"  {r['reader']}: onnxruntime differs, by steps {r['ort differs by steps']}; mutations "
                  f"{dict(Counter(r['ort differs mutations']).most_common(6))}")
    path = write_json("bench_fuzz", {"seconds_per_reader": args.seconds, "examples_per_reader": args.examples,
                                     "rows": rows})
    print(f"wrote {path}")
    return 1 if any(r["crashes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
