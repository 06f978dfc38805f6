"""VNN-COMP-style result files and JSON results.

A result file's first line is ``sat`` / ``unsat`` / ``timeout`` / ``unknown`` / ``error``. After ``sat`` comes the
witness in the VNN-COMP form ``((X_0 v) (X_1 v) ... (Y_0 v) ...)`` in the property's real units:
``X_i = s_in (x_i - z_in)``, ``Y_j = s_out (y_j - z_out)``, written as exact decimals when the value is a dyadic
rational (always, for power-of-two scales) and as the shortest float repr otherwise.

A result file that is not ``sat`` may carry comment lines after its first line, ``; ...`` as in SMT-LIB and VNN-LIB:
VNN-COMP's tools read only the first line of such a file (a ``sat`` file's body is the witness, which their checker
parses as a whole, so it gets no comment). qverify writes the integer semantics the verdict is about and, for an ONNX
model, the outcome of the runtime divergence check (:mod:`qverify.divergence`) there.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from qverify.network import QNetwork
from qverify.result import Result


def exact_decimal(q: Fraction) -> str:
    """The finite decimal expansion of a dyadic rational (``5/16 -> 0.3125``); else ``repr(float(q))``."""
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return repr(float(q))
    # q = n / (2^a 5^b): scale by 10^m with m = max(a, b)
    m = 0
    while (q * 10**m).denominator != 1:
        m += 1
    n = int(q * 10**m)
    sign = "-" if n < 0 else ""
    s = str(abs(n)).rjust(m + 1, "0")
    return f"{sign}{s[:-m]}.{s[-m:]}" if m else f"{sign}{s}.0"


def witness_lines(net: QNetwork, x: np.ndarray, y: np.ndarray) -> str:
    """``((X_0 v) ... (Y_0 v) ...)`` in real units."""
    parts = [f"(X_{i} {exact_decimal(net.input_scale * (int(v) - net.input_zero_point))})"
             for i, v in enumerate(np.ravel(x))]
    parts += [f"(Y_{j} {exact_decimal(net.output_scale * (int(v) - net.output_zero_point))})"
              for j, v in enumerate(np.ravel(y))]
    return "(" + "\n ".join(parts) + ")"


def comment_lines(details: dict | None) -> str:
    """The comment lines of a result file that is not ``sat`` (``""`` when there is nothing to say): the semantics
    and the runtime divergence check recorded in a result's ``details``."""
    d = details or {}
    lines = []
    if d.get("semantics"):
        lines.append(f"; qverify: verdict about the integer network under {d['semantics']} semantics")
    div = d.get("divergence") or {}
    if d.get("warning"):
        lines.append(f"; qverify warning: {d['warning']}")
    elif div.get("message"):
        lines.append(f"; qverify: {div['message']}")
    return "".join(" ".join(line.splitlines()) + "\n" for line in lines)


def result_file_text(net: QNetwork, result: Result) -> str:
    status = result.vnncomp_status()
    if status == "sat" and result.counterexample is not None:
        return f"sat\n{witness_lines(net, result.counterexample.x, result.counterexample.y)}\n"
    return f"{status}\n{comment_lines(result.details)}"


def write_result_file(net: QNetwork, result: Result, path: str | Path) -> None:
    """Write the VNN-COMP result file (atomically: a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(result_file_text(net, result))
    tmp.replace(path)


def write_json_result(result: Result, path: str | Path, extra: dict | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**(extra or {}), **result.to_json()}, indent=1, default=str))
    tmp.replace(path)
