"""Divergence check: does the deployed runtime compute the function that qverify reasons about?

A verdict is about the network's integer semantics (``net.metadata['semantics']``: ``exact``, the ONNX
specification's arithmetic, unless the model was loaded with another). For a model imported from ONNX, the runtime
that ships it is onnxruntime, and it does not always compute that function: on x86-64 CPUs with AVX2 but no VNNI its
u8 x s8 kernels saturate pairs of products to 16 bits (:func:`qverify.io.onnx.ort_may_clip`), and its fused kernels
requantize in float32. A ``robust`` verdict says nothing about inputs where the two differ.

The check runs the original ONNX file on onnxruntime (one cached session per model,
:func:`qverify.io.onnx.onnx_session`; batched runs, :func:`qverify.io.onnx.onnx_integer_outputs`) over a set of
integer input points and compares every integer output with the executor (:func:`qverify.execute.forward`):

* a property's box (:func:`box_points`): its center, its corners (all of them up to 2^7, else a seeded sample) and
  seeded uniform grid points of the box, ``max_points`` in all;
* a data set's samples (``certify``, ``run``);
* seeded uniform points of the whole input grid (``info``, :func:`grid_points`).

It is a test, not a proof: *no difference found* on a few hundred points does not show that the runtime agrees
everywhere; *a difference found* is a fact (the example point is returned with both outputs). The cause is named only
where it is known to apply: the 16-bit clipping of the u8 x s8 kernels on a CPU where
:func:`qverify.io.onnx.ort_u8s8_saturates` is true and some weight pair can reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qverify.execute import argmax_first, forward
from qverify.network import QNetwork
from qverify.property import Property
from qverify.result import Result

#: points of a property's box checked by default
DEFAULT_POINTS = 256
#: corners enumerated exhaustively up to this many inputs (2^7 = 128 corners)
ALL_CORNERS_MAX_INPUTS = 7
#: boxes of at most this many integer points are sampled without repeats from their enumeration
ENUMERATE_MAX = 1 << 14


@dataclass
class DivergencePoint:
    """One input where the runtime and the executor differ: its ``index`` among the points checked, ``x`` (integer
    input) and both integer outputs."""

    index: int
    x: list[int]
    executor: list[int]
    runtime: list[int]

    def to_json(self) -> dict:
        return {"index": self.index, "x": self.x, "executor": self.executor, "runtime": self.runtime}


@dataclass
class Divergence:
    """The outcome of one divergence check.

    ``checked`` points were run on both; on ``differing`` of them some integer output differs
    (``outputs_differing`` outputs in all), on ``classes_differing`` the argmax (first maximal index) differs.
    ``skipped`` says why nothing was checked (not an ONNX model, onnxruntime missing, the file moved).
    """

    where: str
    semantics: str
    runtime: str = ""
    checked: int = 0
    differing: int = 0
    outputs_differing: int = 0
    classes_differing: int = 0
    example: DivergencePoint | None = None
    cause: str = ""
    skipped: str = ""

    @property
    def differs(self) -> bool:
        return self.differing > 0

    def message(self) -> str:
        """One line for the command line, the result file's comment and the report."""
        if self.skipped:
            return f"runtime divergence check skipped: {self.skipped}"
        what = {"box": "points of the property's box", "data": "samples of the data",
                "grid": "random points of the input grid"}.get(self.where, "points")
        if not self.differs:
            return (f"{self.runtime} agrees with the executor ({self.semantics} semantics) on all {self.checked} "
                    f"{what} checked")
        ex = self.example
        line = (f"{self.runtime} differs from the executor ({self.semantics} semantics) on {self.differing} of "
                f"{self.checked} {what} ({self.classes_differing} with another class)")
        if ex is not None:
            line += f"; e.g. point {ex.index}: executor {ex.executor}, {self.runtime.split()[0]} {ex.runtime}"
        line += f"; likely cause: {self.cause}" if self.cause else "; cause not identified"
        return line

    def to_json(self) -> dict:
        out = {"where": self.where, "semantics": self.semantics, "runtime": self.runtime, "checked": self.checked,
               "differing": self.differing, "outputs_differing": self.outputs_differing,
               "classes_differing": self.classes_differing, "cause": self.cause, "skipped": self.skipped,
               "message": self.message()}
        if self.example is not None:
            out["example"] = self.example.to_json()
        return out


def semantics_of(net: QNetwork) -> str:
    """The integer semantics the executor follows for ``net`` (``exact`` unless the model says otherwise)."""
    sem = getattr(net, "semantics", None)  # QNetwork.semantics where the semantics choice is available
    return str(sem or net.metadata.get("semantics", "exact") or "exact")


def unavailable(net: QNetwork) -> str:
    """Why the runtime cannot be run for ``net`` (``""``: it can)."""
    from pathlib import Path

    meta = net.metadata
    if meta.get("format") not in ("onnx", None, ""):
        from qverify.replay import RUNTIME_MODULES, runtime_for

        if meta.get("format") in RUNTIME_MODULES:
            return "" if runtime_for(net) is not None else (
                f"the {meta.get('format')} runtime cannot run this model (its file is not recorded or no longer "
                f"there, or the runtime is not installed)")
    if meta.get("format") != "onnx" or not meta.get("onnx_path"):
        return "not an ONNX model (the executor is the runtime)"
    if not Path(meta["onnx_path"]).exists():
        return f"the ONNX file {meta['onnx_path']} is no longer there"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    return ""


def _runtime_name() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__}"


def runtime_label(net: QNetwork) -> str:
    """The runtime the divergence check runs for ``net`` (``""`` when none can)."""
    if unavailable(net):
        return ""
    if net.metadata.get("format") == "onnx":
        return "onnxruntime"
    from qverify.replay import runtime_for

    hook = runtime_for(net)
    return hook.runtime if hook is not None else ""


def box_points(lo: np.ndarray, hi: np.ndarray, max_points: int = DEFAULT_POINTS, seed: int = 0) -> np.ndarray:
    """Integer points of the box ``[lo, hi]`` (int64 ``[P, n]``, ``P <= max_points``, no duplicates): the center
    ``floor((lo + hi) / 2)``, the corners (all ``2^n`` when ``n <= 7``, else ``lo``, ``hi`` and seeded random
    corners, a quarter of the budget), then seeded grid points of the box (drawn without repeats from the box's
    enumeration when it has at most :data:`ENUMERATE_MAX` points, else uniform)."""
    lo = np.asarray(lo, dtype=np.int64).ravel()
    hi = np.asarray(hi, dtype=np.int64).ravel()
    if max_points < 1:
        raise ValueError(f"max_points must be positive, got {max_points}")
    n = lo.size
    rng = np.random.default_rng(seed)
    rows = [(lo + hi) // 2]
    if n <= ALL_CORNERS_MAX_INPUTS:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        rows.extend(np.where(bits == 1, hi, lo))
    else:
        rows += [lo, hi]
        k = max(0, max_points // 4 - 2)
        rows.extend(np.where(rng.integers(0, 2, size=(k, n)) == 1, hi, lo))
    pts = _dedupe(np.stack(rows))
    if len(pts) > max_points:  # keep the center, a seeded sample of the corners
        pick = np.sort(rng.choice(len(pts) - 1, size=max_points - 1, replace=False)) + 1
        return np.concatenate([pts[:1], pts[pick]])
    if len(pts) < max_points and grid_size(lo, hi) <= ENUMERATE_MAX:  # a small box: a sample of its other points
        grid = box_grid(lo, hi)
        taken = {r.tobytes() for r in pts}
        rest = grid[[r.tobytes() not in taken for r in grid]]
        pick = np.sort(rng.choice(len(rest), size=min(len(rest), max_points - len(pts)), replace=False))
        pts = np.concatenate([pts, rest[pick]])
    for _ in range(4):  # a large box: uniform points (repeats are rare; a few rounds refill them)
        if len(pts) >= max_points:
            break
        pts = _dedupe(np.concatenate([pts, rng.integers(lo, hi + 1, size=(max_points - len(pts), n))]))
    return pts


def grid_size(lo: np.ndarray, hi: np.ndarray) -> int:
    """Number of integer points of the box ``[lo, hi]``, capped at ``2^62``."""
    total = 1
    for w in (np.asarray(hi) - np.asarray(lo) + 1).tolist():
        total = min(total * w, 1 << 62)
    return total


def box_grid(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Every integer point of a small box ``[lo, hi]`` (int64 ``[P, n]``, C order), enumerated over its free
    dimensions only (numpy's meshgrid takes at most 64 arrays; a radius-0 image box has none free)."""
    lo = np.asarray(lo, dtype=np.int64).ravel()
    hi = np.asarray(hi, dtype=np.int64).ravel()
    var = np.flatnonzero(hi > lo)
    grid = np.repeat(lo[None], grid_size(lo, hi), axis=0)
    if len(var):
        grid[:, var] = np.stack(np.meshgrid(*[np.arange(lo[j], hi[j] + 1) for j in var], indexing="ij"),
                                axis=-1).reshape(-1, len(var))
    return grid


def _dedupe(a: np.ndarray) -> np.ndarray:
    """The rows of ``a`` without repeats, in the order of their first occurrence."""
    return a[np.sort(np.unique(a, axis=0, return_index=True)[1])]


def grid_points(net: QNetwork, n: int = DEFAULT_POINTS, seed: int = 0) -> np.ndarray:
    """``n`` seeded points of the whole input grid (the two constant points ``lo`` and ``hi`` first)."""
    k = net.num_inputs
    lo = np.full(k, net.input_lo, dtype=np.int64)
    hi = np.full(k, net.input_hi, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.concatenate([lo[None], hi[None], rng.integers(lo, hi + 1, size=(max(0, n - 2), k))])[:n]


def _check_blocks(net: QNetwork, blocks: list[np.ndarray], where: str) -> list[Divergence]:
    """Run all blocks of integer inputs in one batched onnxruntime run and compare each block with the executor."""
    sem = semantics_of(net)
    why = unavailable(net)
    if why:
        return [Divergence(where, sem, skipped=why) for _ in blocks]
    blocks = [np.asarray(b, dtype=np.int64).reshape(-1, net.num_inputs) for b in blocks]
    x = np.concatenate(blocks) if blocks else np.zeros((0, net.num_inputs), np.int64)
    if net.metadata.get("format") == "onnx":
        from qverify.io.onnx import U8S8_CLIP_NOTE, onnx_integer_outputs, ort_may_clip

        runtime = _runtime_name()
        run = onnx_integer_outputs

        def cause_of() -> str:
            return U8S8_CLIP_NOTE if ort_may_clip(net) else ""
    else:  # another registered runtime (qverify.replay.RUNTIMES: the TFLite interpreter)
        from qverify.replay import runtime_for

        hook = runtime_for(net)
        assert hook is not None  # unavailable() said it applies
        runtime, run = hook.runtime, hook.outputs

        def cause_of() -> str:
            if net.set_valued:
                return ("set-valued network: the runtime's float32 outputs leave the output band here, which a sign "
                        "inside its float32 band can do; verdicts cover every member of the set")
            return hook.cause(net)
    try:
        theirs = run(net, x) if len(x) else np.zeros((0, net.num_outputs), np.int64)
    except Exception as e:  # a runtime that cannot run the file: say so, never a silent pass
        return [Divergence(where, sem, runtime=runtime, skipped=f"{runtime} could not run the model: {e}")
                for _ in blocks]
    ours = forward(net, x)
    # a set-valued network's runtime outputs are real (float32 logits in the output units): they differ where they
    # leave the output band of the nominal member
    band = _output_band(net)
    clip: str | None = None
    outs = []
    start = 0
    for blk in blocks:
        a, b = ours[start:start + len(blk)], theirs[start:start + len(blk)]
        start += len(blk)
        diff = np.abs(a - b) > band + 0.5 if net.set_valued else a != b
        rows = np.flatnonzero(diff.any(axis=1))
        cls = np.flatnonzero(argmax_first(a) != argmax_first(b)) if len(blk) else np.zeros(0, np.int64)
        d = Divergence(where, sem, runtime=runtime, checked=len(blk), differing=int(rows.size),
                       outputs_differing=int(diff.sum()), classes_differing=int(cls.size))
        if rows.size:
            i = int(cls[0]) if cls.size else int(rows[0])  # a point where the class differs, if there is one
            d.example = DivergencePoint(i, [int(v) for v in blk[i]], [int(v) for v in a[i]],
                                        [int(np.rint(v)) for v in b[i]])
            if clip is None:
                clip = cause_of()
            d.cause = clip
        outs.append(d)
    return outs


def _output_band(net: QNetwork) -> np.ndarray | int:
    """The band of a set-valued network's outputs (its last op when that is an ``Uncertain``), else 0."""
    from qverify.network import Uncertain

    last = net.layers[-1]
    return last.deltas(net.shapes[-1])[None] if isinstance(last, Uncertain) else 0


def check_points(net: QNetwork, x: np.ndarray, where: str = "points") -> Divergence:
    """Run the integer inputs ``x`` (``[P, n]``) on the executor and on onnxruntime and compare every output
    (``where``: ``box``, ``data``, ``grid`` or ``points``, for the message)."""
    return _check_blocks(net, [np.asarray(x)], where)[0]


def check_property(net: QNetwork, prop: Property, max_points: int = DEFAULT_POINTS, seed: int = 0) -> Divergence:
    """:func:`check_points` over :func:`box_points` of the property's box."""
    return check_properties(net, [prop], max_points, seed)[0]


def check_properties(net: QNetwork, props: list[Property], max_points: int = DEFAULT_POINTS,
                     seed: int = 0) -> list[Divergence]:
    """:func:`check_property` for many properties of one model, in one batched onnxruntime run."""
    if unavailable(net):
        return [Divergence("box", semantics_of(net), skipped=unavailable(net)) for _ in props]
    return _check_blocks(net, [box_points(p.lo, p.hi, max_points, seed) for p in props], "box")


def annotate(result: Result, div: Divergence) -> Result:
    """Record the check in ``result.details`` (in place; returned for chaining): ``semantics`` always,
    ``divergence`` (:meth:`Divergence.to_json`) when it ran or was skipped for a reason other than the model not
    being ONNX, and ``warning`` (the message, with the count) when the runtime differs on some point of the box:
    a ``robust`` verdict then holds for the executor's function, not for what onnxruntime computes there."""
    result.details["semantics"] = div.semantics
    if div.skipped and div.skipped.startswith("not an ONNX model"):
        return result
    result.details["divergence"] = div.to_json()
    if div.differs:
        rt = (div.runtime or "onnxruntime").split()[0]
        what = f"the verdict holds for the executor's function, not for {rt}'s" if (
            result.verdict.value == "robust") else f"{rt} computes another function here"
        result.details["warning"] = f"{div.message()} ({what})"
    return result


__all__ = ["DEFAULT_POINTS", "Divergence", "DivergencePoint", "annotate", "box_points", "check_points",
           "check_properties", "check_property", "grid_points", "runtime_label", "semantics_of", "unavailable"]
