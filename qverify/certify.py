"""Certify a model over a data set: every (sample, radius) robustness instance, with durable, resumable results.

An *instance* is the local-robustness property of one sample at one L-inf radius ``r`` in integer input units
(:func:`~qverify.property.robustness_property`): for every integer input ``x'`` of the grid with
``|x' - x|_inf <= r`` the network's argmax (first maximal index wins) is the label. Each instance is verified with the
portfolio (:func:`~qverify.verify.verify_batch`) under a per-instance time limit (``settings.timeout``). A sample
that the integer executor already misclassifies is recorded as ``misclassified`` at every radius without being
verified (QVIP's convention): its property is violated at the sample itself.

Results file (JSON lines, UTF-8, one record per line, append-only)
------------------------------------------------------------------
* line 1, ``{"type": "header", ...}``: format and version, model (name, path, sha256 of the file, sha256 of the
  network's native serialization, input/output grid and scales), data (path, sha256 of the arrays, sample shape),
  radii and sample selection, verification settings, versions, seed, command line;
* ``{"type": "session", ...}``: one per run of :func:`certify` (the command, radii and samples asked for, workers or
  Ray address, how many instances were already done); ``{"type": "session_end", ...}`` when the run finished;
* ``{"type": "instance", ...}``: one per decided instance: ``id``, ``radius``, ``label``, ``prediction``,
  ``verdict`` (robust | counterexample | unknown | error | misclassified), ``status`` (VNN-COMP word), ``method``,
  ``reason``, ``seconds``, ``stages`` (name, seconds, outcome), ``scores`` (integer outputs on the sample),
  ``witness`` (integer ``x`` and ``y`` of a replay-confirmed counterexample), ``x0`` (the sample's integer input,
  for counterexamples and misclassified samples), ``property`` (name, description), ``details``.

Durability: each record is written and flushed as soon as its instance is decided, so killing the process loses only
the instances in flight; a background thread fsyncs the file after every write (coalescing the writes that arrive
during one fsync), so a power loss loses at most the records of the last few milliseconds. A record cut short by a
crash leaves a truncated last line: :func:`read_results` detects it, and on resume it is reported and dropped (the file
is truncated back to the last complete record). Re-running the same command resumes: finished ``(id, radius)`` pairs
are not redone. A results file written for another model, data set or settings is refused (:class:`ResultsFileError`;
solver threads and the watchdog may change: :data:`RESOURCE_SETTINGS`) unless ``overwrite=True`` (the old file is
kept as ``<name>.bak``). A run holds an exclusive lock on the file, so two runs cannot interleave records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qverify.divergence import Divergence, annotate, check_properties, runtime_label, semantics_of, unavailable
from qverify.execute import forward, predict
from qverify.network import QNetwork
from qverify.preprocess import Preprocess
from qverify.property import Property, PropertyError, data_layout, pixels_to_grid, robustness_property
from qverify.result import Result
from qverify.settings import VerifySettings

RESULTS_FORMAT = "qverify-certify-results"
RESULTS_VERSION = 1
#: verdict of a sample the executor misclassifies (recorded at every radius, not verified)
MISCLASSIFIED = "misclassified"
VERDICTS = ("robust", "counterexample", "unknown", "error", MISCLASSIFIED)


class ResultsFileError(ValueError):
    """A results file that cannot be used: corrupt (the message names the line), incompatible, or locked."""


# ------------------------------------------------------------------------------------------------ hashing
def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def network_sha256(net: QNetwork) -> str:
    """sha256 of the network's native (``.qnn``) serialization: every archive member's name and bytes, in order.

    The zip container itself (timestamps) is left out, so the hash depends only on the network.
    """
    from qverify.io.native import save_native

    buf = io.BytesIO()
    save_native(net, buf)  # type: ignore[arg-type]  # zipfile accepts a binary file object
    h = hashlib.sha256()
    with zipfile.ZipFile(buf) as z:
        for name in sorted(z.namelist()):
            data = z.read(name)
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def data_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the shapes, dtypes and bytes of the (raw) images and labels."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(images), np.ascontiguousarray(labels)):
        h.update(f"{a.dtype.str}{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of qverify, Python and the libraries a verdict may depend on (``None`` = not installed)."""
    from importlib import metadata

    from qverify import __version__

    out: dict[str, str] = {"qverify": __version__, "python": platform.python_version(),
                           "platform": platform.platform()}
    for dist in ("numpy", "ortools", "torch", "pulp", "onnxruntime", "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None  # type: ignore[assignment]
    return out


def _frac(f: object) -> str:
    from fractions import Fraction

    q = Fraction(f)  # type: ignore[arg-type]
    return f"{q.numerator}/{q.denominator}"


def model_info(net: QNetwork, model_path: str | Path | None = None, model_name: str | None = None) -> dict:
    """The header's ``model`` record: names, hashes, grid and scales (exact, as ``"num/den"``)."""
    return {
        "name": model_name or net.name,
        "path": str(model_path) if model_path is not None else None,
        "file_sha256": file_sha256(model_path) if model_path is not None else None,
        "network_sha256": network_sha256(net),
        "format": net.metadata.get("format"),
        "input_shape": list(net.input_shape), "input_grid": [net.input_lo, net.input_hi],
        "input_scale": _frac(net.input_scale), "input_zero_point": net.input_zero_point,
        "output_scale": _frac(net.output_scale), "output_zero_point": net.output_zero_point,
        "num_outputs": net.num_outputs, "tie_rule": net.tie_rule,
        "quantization": quantization_info(net),
    }


#: the network metadata keys that describe how it was quantized (``qverify train`` / ``qverify quantize``)
QUANT_KEYS = ("train_method", "source", "clipping", "scheme", "weight_bits", "act_bits", "out_bits", "layer_bits")


def quantization_info(net: QNetwork) -> dict | None:
    """How the network was quantized, from its metadata (the keys of :data:`QUANT_KEYS` it has; ``None`` without a
    ``layer_bits`` entry, e.g. for an imported ONNX model): what ``qverify report`` puts side by side when it
    compares models by method and bit width."""
    md = net.metadata
    if "layer_bits" not in md:
        return None
    return {k: str(md[k]) for k in QUANT_KEYS if k in md}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------- results file
@dataclass
class RecordFile:
    """A parsed durable record file (:func:`read_record_file`): its header, its records (the first of each key),
    its session records."""

    path: Path
    header: dict | None
    records: list[dict] = field(default_factory=list)
    sessions: list[dict] = field(default_factory=list)
    #: what was wrong with the last line (``None`` when the file ended with a complete record)
    truncated: str | None = None
    #: byte offset where the valid content ends (the truncated line starts here)
    valid_bytes: int = 0
    #: records of a key seen before (ignored; only possible if the file was edited by hand)
    duplicates: int = 0


@dataclass
class ResultsFile(RecordFile):
    """A parsed certify results file. ``records`` are the instance records, first occurrence of each
    ``(id, radius)``."""

    def done(self) -> set[tuple[int, int]]:
        return {(int(r["id"]), int(r["radius"])) for r in self.records}


def read_results(path: str | Path, repair: bool = False) -> ResultsFile:
    """Parse a results file.

    A last line that is not a complete JSON record (the process died while writing it) is reported in
    ``truncated`` and ignored; with ``repair=True`` the file is truncated back to ``valid_bytes``. Any other
    malformed line raises :class:`ResultsFileError` naming the line: it cannot be the result of an interrupted
    append, so the file was damaged otherwise and is not repaired silently.
    """
    return read_record_file(path, ResultsFile(Path(path), None), RESULTS_FORMAT, RESULTS_VERSION, "certify",
                            lambda rec: (int(rec["id"]), int(rec["radius"])), repair)


def read_record_file(path: str | Path, out: Any, fmt: str, version: int, command: str,
                     key: Callable[[dict], object], repair: bool = False) -> Any:
    """Parse a durable JSON-lines record file into ``out`` (a results object with ``header``, ``records``,
    ``sessions``, ``truncated``, ``valid_bytes``, ``duplicates``): line 1 a ``{"type": "header", "format": fmt}``
    record of a version up to ``version``, then ``instance`` records (the first of each ``key(rec)`` kept, later
    ones counted in ``duplicates``) and ``session`` / ``session_end`` records. A truncated last line (the process
    died while writing it) is reported in ``truncated`` and, with ``repair``, cut off (or its lost newline
    restored); any other malformed line raises :class:`ResultsFileError` naming the file and the line. Shared by
    ``certify`` and ``smooth`` (``command`` names the writer in messages)."""
    path = Path(path)
    data = path.read_bytes()
    pos = 0
    lineno = 0
    seen: set = set()
    while pos < len(data):
        lineno += 1
        end = data.find(b"\n", pos)
        last = end < 0 or data[end + 1:].strip() == b""
        chunk = data[pos:] if end < 0 else data[pos:end]
        try:
            rec = json.loads(chunk.decode("utf-8"))
            if not isinstance(rec, dict) or "type" not in rec:
                raise ValueError("not a record object")
        except (UnicodeDecodeError, ValueError) as e:
            if last:
                out.truncated = (f"{path}: line {lineno} is incomplete ({len(data) - pos} bytes: {e}); "
                                 "it was being written when the run stopped and is dropped")
                break
            raise ResultsFileError(f"{path}: line {lineno} is not a valid record ({e}); only a truncated last line "
                                   "is repaired automatically") from None
        if end < 0:  # a complete record whose newline was lost: keep it, restore the newline on repair
            out.truncated = f"{path}: line {lineno} lacks its final newline (restored)"
        kind = rec["type"]
        if lineno == 1:
            if kind != "header" or rec.get("format") != fmt:
                raise ResultsFileError(f"{path}: line 1 is not a {fmt} header (is this a {command} results file?)")
            if int(rec.get("format_version", 0)) > version:
                raise ResultsFileError(f"{path}: format version {rec.get('format_version')} is newer than this "
                                       f"qverify reads ({version})")
            out.header = rec
        elif kind == "instance":
            k = key(rec)
            if k in seen:
                out.duplicates += 1
            else:
                seen.add(k)
                out.records.append(rec)
        elif kind in ("session", "session_end"):
            out.sessions.append(rec)
        pos = len(data) if end < 0 else end + 1
        out.valid_bytes = pos
    if repair and out.truncated is not None:
        with open(path, "r+b") as f:
            f.truncate(out.valid_bytes)
            if out.valid_bytes and data[out.valid_bytes - 1:out.valid_bytes] != b"\n":
                f.seek(out.valid_bytes)
                f.write(b"\n")
                out.valid_bytes += 1
            f.flush()
            os.fsync(f.fileno())
    return out


def resume_record_file(path: Path, header: dict, overwrite: bool, writer: _Writer, log: Callable[[str], None],
                       read: Callable[..., Any], compatible: Callable[[dict, dict], list[str]]
                       ) -> tuple[Any, str | None]:
    """Resume a durable record file (shared by ``certify`` and ``smooth``): an empty file starts anew;
    ``overwrite`` keeps a ``.bak`` copy and starts anew; a file holding only a truncated header starts anew; a
    header that ``compatible`` finds differences with is refused; a truncated last line is repaired. Returns the
    parsed previous content (``read(path, repair=...)``, or ``None``) and what was repaired."""
    if path.stat().st_size == 0:
        return None, None
    if overwrite:
        bak = path.with_name(path.name + ".bak")
        shutil.copyfile(path, bak)
        writer.truncate()
        log(f"{path}: overwriting (the old file is kept as {bak.name})")
        return None, None
    old = read(path, repair=False)
    if old.header is None:  # only a truncated header: nothing was done yet
        writer.truncate()
        log(f"recovered: {old.truncated}")
        return None, old.truncated
    diffs = compatible(old.header, header)
    if diffs:
        raise ResultsFileError(f"{path} belongs to another run and cannot be resumed: " + "; ".join(diffs)
                               + ". Use another results file, or overwrite it (--overwrite).")
    if old.truncated is None:
        return old, None
    log(f"recovered: {old.truncated}")
    return read(path, repair=True), old.truncated


@dataclass
class Resumed:
    """A record file opened for appending: the header in force (the old one when resuming), the keys already
    done, the old records (all empty for a new file) and what was repaired."""

    header: dict
    done: set
    records: list
    repaired: str | None


def open_record_file(path: Path, header: dict, overwrite: bool, writer: _Writer, log: Callable[[str], None],
                     read: Callable[..., Any], compatible: Callable[[dict, dict], list[str]]) -> Resumed:
    """:func:`resume_record_file`, then a new file gets ``header`` written and synced (file and directory)."""
    old, repaired = resume_record_file(path, header, overwrite, writer, log, read, compatible)
    if old is None:
        writer.write(header, sync=True)
        _fsync_dir(path)
        return Resumed(header, set(), [], repaired)
    return Resumed(old.header, old.done(), list(old.records), repaired)


class _Writer:
    """Append-only JSON-lines writer: write + flush per record, fsync in a background thread (coalesced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise ResultsFileError(f"{path}: in use by another qverify certify run (locked)") from None
        self._dirty = threading.Event()
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sync_loop, name="qverify-fsync", daemon=True)
        self._thread.start()

    def _sync_loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            with contextlib.suppress(OSError, ValueError):
                os.fsync(self.f.fileno())
            if self._stop and not self._dirty.is_set():
                return

    def write(self, rec: dict, sync: bool = False) -> None:
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            self.f.write(line)
            self.f.flush()
        if sync:
            os.fsync(self.f.fileno())
        else:
            self._dirty.set()

    def truncate(self) -> None:
        """Empty the file (under the lock)."""
        with self._lock:
            self.f.flush()
            os.ftruncate(self.f.fileno(), 0)
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self._stop = True
        self._dirty.set()
        self._thread.join()
        with contextlib.suppress(OSError, ValueError):
            self.f.flush()
            os.fsync(self.f.fileno())
        self.f.close()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------ summary
def summarize(records: Sequence[dict], radii: Sequence[int] | None = None) -> list[dict]:
    """Per-radius figures from instance records.

    ``n`` instances (samples) at the radius; counts of every verdict; ``clean_accuracy = (n - misclassified) / n``;
    ``certified_accuracy = robust / n``; ``falsified = counterexample``; time figures over the verified instances
    (misclassified ones are not verified): total, mean, median, max seconds, and the number of timeouts;
    ``runtime_differs`` (``robust_runtime_differs``): instances (robust ones) whose box holds a point where onnxruntime
    and the executor differ (:mod:`qverify.divergence`).
    """
    by_r: dict[int, list[dict]] = {}
    for rec in records:
        by_r.setdefault(int(rec["radius"]), []).append(rec)
    rows = []
    for r in sorted(set(by_r) | set(radii or ())):
        recs = by_r.get(r, [])
        c = Counter(rec["verdict"] for rec in recs)
        n = len(recs)
        times = sorted(float(rec["seconds"]) for rec in recs if rec["verdict"] != MISCLASSIFIED)
        row = {"radius": r, "n": n, **{v: c.get(v, 0) for v in VERDICTS},
               "timeouts": sum(1 for rec in recs if rec["verdict"] == "unknown" and rec.get("reason") == "timeout"),
               "clean_accuracy": (n - c.get(MISCLASSIFIED, 0)) / n if n else None,
               "certified_accuracy": c.get("robust", 0) / n if n else None,
               "time_total": sum(times), "time_mean": sum(times) / len(times) if times else None,
               "time_median": (times[(len(times) - 1) // 2] + times[len(times) // 2]) / 2 if times else None,
               "time_max": times[-1] if times else None,
               "runtime_differs": sum(1 for rec in recs if (rec.get("details") or {}).get("warning")),
               "robust_runtime_differs": sum(1 for rec in recs if rec["verdict"] == "robust"
                                             and (rec.get("details") or {}).get("warning"))}
        rows.append(row)
    return rows


@dataclass
class CertifySummary:
    """What :func:`certify` did: the results file, its header, every instance record (old and new), per radius."""

    results_path: Path
    header: dict
    records: list[dict]
    new: int
    resumed: int
    repaired: str | None
    wall_seconds: float

    def rows(self) -> list[dict]:
        return summarize(self.records, self.header.get("radii"))

    def counts(self) -> dict[str, int]:
        c = Counter(r["verdict"] for r in self.records)
        return {v: c.get(v, 0) for v in VERDICTS}

    def format_table(self) -> str:
        """A plain-text table per radius (for the command line)."""
        cols = ["radius", "n", "clean acc", "certified acc", "robust", "counterexample", "unknown", "error",
                "misclassified", "mean s", "max s"]
        lines = []
        for r in self.rows():
            def pct(v: float | None) -> str:
                return "-" if v is None else f"{100 * v:.1f}%"

            def sec(v: float | None) -> str:
                return "-" if v is None else f"{v:.3g}"

            lines.append([str(r["radius"]), str(r["n"]), pct(r["clean_accuracy"]), pct(r["certified_accuracy"]),
                          str(r["robust"]), str(r["counterexample"]), str(r["unknown"]), str(r["error"]),
                          str(r[MISCLASSIFIED]), sec(r["time_mean"]), sec(r["time_max"])])
        w = [max(len(c), *(len(row[i]) for row in lines)) if lines else len(c) for i, c in enumerate(cols)]
        out = ["  ".join(c.rjust(w[i]) for i, c in enumerate(cols))]
        out += ["  ".join(v.rjust(w[i]) for i, v in enumerate(row)) for row in lines]
        return "\n".join(out)


# ------------------------------------------------------------------------------------------------ certify
def select_ids(n: int, ids: Sequence[int] | None = None, sample: int | None = None, seed: int = 0) -> list[int]:
    """The samples to certify: ``ids`` as given, or ``sample`` ids drawn without replacement (seeded, sorted)."""
    if ids is not None and sample is not None:
        raise ValueError("give ids or sample, not both")
    if sample is not None:
        if not 0 < sample <= n:
            raise ValueError(f"sample={sample}: must be between 1 and the data set's {n} samples")
        return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=sample, replace=False))
    out = list(range(n)) if ids is None else [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"ids {bad[:5]} outside the data set's {n} samples")
    if len(set(out)) != len(out):
        raise ValueError("ids contain duplicates")
    return out


def _settings_json(settings: VerifySettings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


#: solver settings that change how fast a run goes, not what its verdicts mean: a resumed run may change them
#: (threads; the watchdog, which older results files do not record)
RESOURCE_SETTINGS = ("threads", "watchdog")


def _verdict_settings(settings: dict) -> dict:
    """The settings without the solver's :data:`RESOURCE_SETTINGS` (a copy)."""
    solver = {k: v for k, v in settings.get("solver", {}).items() if k not in RESOURCE_SETTINGS}
    return {**settings, "solver": solver}


def _compatible(old: dict, new: dict) -> list[str]:
    """Differences that make resuming unsound: another network, data set or verification settings (those of
    :data:`RESOURCE_SETTINGS` may differ)."""
    diffs = []
    if old["model"]["network_sha256"] != new["model"]["network_sha256"]:
        diffs.append(f"model: the file was written for network sha256 {old['model']['network_sha256'][:16]}... "
                     f"({old['model'].get('name')!r}), this run's network is "
                     f"{new['model']['network_sha256'][:16]}... ({new['model'].get('name')!r})")
    if old["data"]["sha256"] != new["data"]["sha256"]:
        diffs.append(f"data: the file was written for data sha256 {old['data']['sha256'][:16]}... "
                     f"({old['data'].get('path')!r}), this run's data is {new['data']['sha256'][:16]}... "
                     f"({new['data'].get('path')!r})")
    if old.get("preprocess") != new.get("preprocess"):
        diffs.append(f"preprocess: the file was written with {old.get('preprocess')!r}, this run uses "
                     f"{new.get('preprocess')!r}")
    so, sn = _verdict_settings(old["settings"]), _verdict_settings(new["settings"])
    if so != sn:
        keys = sorted(k for k in set(so) | set(sn) if so.get(k) != sn.get(k))
        diffs.append("settings: " + ", ".join(f"{k} was {so.get(k)!r}, now {sn.get(k)!r}" for k in keys))
    return diffs


def _instance_record(i: int, radius: int, label: int, pred: int, scores: np.ndarray, x0: np.ndarray,
                     prop: Property | None, res: Result | None) -> dict:
    rec: dict = {"type": "instance", "id": int(i), "radius": int(radius), "label": int(label),
                 "prediction": int(pred)}
    if res is None:  # misclassified: the property is violated at the sample itself
        rec.update(verdict=MISCLASSIFIED, status="sat", method="executor", reason="", seconds=0.0, stages=[],
                   witness={"x": [int(v) for v in x0], "y": [int(v) for v in scores], "confirmed": True,
                            "onnx_confirmed": None, "note": "the sample itself is misclassified"})
    else:
        j = res.to_json()
        rec.update(verdict=j["verdict"], status=j["status"], method=j["method"], reason=j["reason"],
                   seconds=j["seconds"], stages=j["stages"], witness=j["counterexample"])
    rec["scores"] = [int(v) for v in scores]
    if rec["verdict"] in ("counterexample", MISCLASSIFIED):
        rec["x0"] = [int(v) for v in x0]
    if prop is not None:
        rec["property"] = {"name": prop.name, "description": prop.description}
    else:
        rec["property"] = {"name": f"sample{i}_r{radius}",
                           "description": f"robustness of class {int(label)} at L-inf radius {int(radius)} "
                                          "(not verified: the executor misclassifies the sample)"}
    if res is not None and res.details:
        rec["details"] = res.details
    rec["finished"] = _now()
    return rec


class _Progress:
    """tqdm bar with running counts (robust / counterexample / unknown / misclassified) and its ETA."""

    def __init__(self, total: int, initial: Counter, enabled: bool) -> None:
        self.counts = Counter(initial)
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=sum(initial.values()), desc="certify", unit="inst",
                            dynamic_ncols=True, smoothing=0.05)
            self._post()

    def _post(self) -> None:
        c = self.counts
        post = {"robust": c["robust"], "cex": c["counterexample"], "unknown": c["unknown"],
                "miscl": c[MISCLASSIFIED]}
        if c["error"]:
            post["error"] = c["error"]
        self.bar.set_postfix(post, refresh=False)  # type: ignore[union-attr]

    def update(self, verdict: str) -> None:
        self.counts[verdict] += 1
        if self.bar is not None:
            self._post()
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def certify(net: QNetwork, images: np.ndarray, labels: np.ndarray, radii: Sequence[int], *,
            results_path: str | Path, ids: Sequence[int] | None = None, sample: int | None = None, seed: int = 0,
            settings: VerifySettings | None = None, workers: int = 0, progress: bool = True,
            ray_address: str | None = None, ray_chunk: int | None = None, model_path: str | Path | None = None,
            model_name: str | None = None, data_path: str | Path | None = None, command: str | None = None,
            overwrite: bool = False, on_record: Callable[[dict], None] | None = None,
            log: Callable[[str], None] | None = None, divergence_points: int = 256,
            preprocess: Preprocess | None = None) -> CertifySummary:
    """Verify every ``(sample, radius)`` instance and append each decided one to ``results_path`` (JSON lines).

    ``images`` are raw data (e.g. uint8 pixels, mapped to the network's grid by
    :func:`~qverify.property.pixels_to_grid`), ``labels`` the classes. ``ids`` (default: all) or ``sample`` (that
    many ids drawn with ``seed``) select the samples. Each instance gets ``settings.timeout`` seconds; ``workers``
    processes verify in parallel (0 = one per core). ``ray_address`` runs the instances as Ray tasks instead
    (``"local"`` starts a local Ray with ``workers`` CPUs; anything else is passed to ``ray.init(address=...)``;
    an already initialized Ray is used as it is); the driver writes the file either way. ``on_record(record)`` is
    called after each record is written (an exception from it stops the run, the file keeps what was written).
    ``log`` receives notes (resume, repair); default: stderr when ``progress`` else nothing. ``preprocess``: the
    data are raw pixels that the model takes through this preprocessing (:mod:`qverify.preprocess`; radii are then
    in pixels of the raw data); stored in the header, and a file written with another one is not resumed.

    ``divergence_points`` (0: off): for a model imported from ONNX, that many points of each instance's box (center,
    corners, random grid points; :mod:`qverify.divergence`) are run on onnxruntime and the executor before the
    verification, and each record's ``details`` get ``semantics``, ``divergence`` and, where some integer output
    differs, ``warning`` (a ``robust`` verdict then holds for the executor's function, not for onnxruntime's).

    Resuming: an existing file with the same network, data and settings is continued (finished pairs are skipped,
    a truncated last line is dropped and the file repaired); another network, data set or settings raises
    :class:`ResultsFileError` unless ``overwrite`` (the old file is renamed to ``<name>.bak``).
    """
    t_start = time.monotonic()
    settings = settings or VerifySettings()
    if log is None:
        def log(msg: str) -> None:
            if progress:
                print(f"qverify certify: {msg}", file=sys.stderr)
    radii = sorted({int(r) for r in radii})
    if not radii or radii[0] < 0:
        raise ValueError(f"radii must be non-negative integers, got {radii}")
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    sel = select_ids(len(images), ids, sample, seed)
    bad = [i for i in sel if not 0 <= labels[i] < net.num_outputs]
    if bad:
        raise PropertyError(f"labels of samples {bad[:5]} lie outside the network's {net.num_outputs} outputs")
    x = pixels_to_grid(net, images[sel], preprocess) if sel else np.zeros((0, net.num_inputs), np.int64)
    raw = data_layout(net, images[sel]) if sel and preprocess is not None else None
    path = Path(results_path)

    header = {
        "type": "header", "format": RESULTS_FORMAT, "format_version": RESULTS_VERSION, "created": _now(),
        "model": model_info(net, model_path, model_name),
        "data": {"path": str(data_path) if data_path is not None else None,
                 "sha256": data_sha256(images, labels), "n_samples": int(len(images)),
                 "sample_shape": list(images.shape[1:])},
        "radii": radii,
        "selection": {"ids": sel if ids is not None else None, "sample": sample, "seed": seed,
                      "n": len(sel)},
        "settings": _settings_json(settings), "seed": settings.seed, "versions": versions(),
        "command": command, "semantics": semantics_of(net),
        "preprocess": preprocess.spec() if preprocess is not None else None,
        "divergence_check": {"points": int(divergence_points), "runtime": runtime_label(net) or None
                             if divergence_points else None,
                             "skipped": unavailable(net) if divergence_points else "switched off"},
    }

    # ---- open (and lock) the file, then resume, repair or start over
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(path)  # creates the file if needed; holds an exclusive lock from here on
    try:
        opened = open_record_file(path, header, overwrite, writer, log, read_results, _compatible)
        header, done, old_records, repaired = opened.header, opened.done, opened.records, opened.repaired
        if done:
            log(f"resuming {path}: {len(done)} instances already done")
        todo = [(k, r) for r in radii for k in range(len(sel)) if (sel[k], r) not in done]
        writer.write({"type": "session", "started": _now(), "command": command, "radii": radii,
                      "n_samples": len(sel), "instances": len(sel) * len(radii), "already_done": len(sel) * len(radii)
                      - len(todo), "workers": workers, "ray_address": ray_address, "pid": os.getpid(),
                      "host": platform.node(), "repaired": repaired}, sync=True)

        wanted = {(i, r) for i in sel for r in radii}
        prior = Counter(rec["verdict"] for rec in old_records if (rec["id"], rec["radius"]) in wanted)
        bar = _Progress(len(sel) * len(radii), prior, progress)
        new_records: list[dict] = []

        def emit(rec: dict) -> None:
            writer.write(rec)
            new_records.append(rec)
            bar.update(rec["verdict"])
            if on_record is not None:
                on_record(rec)

        try:
            if todo:
                scores = forward(net, x)
                preds = predict(net, x)
                verify_list: list[tuple[int, int]] = []
                for k, r in todo:
                    if preds[k] != labels[sel[k]]:
                        emit(_instance_record(sel[k], r, labels[sel[k]], preds[k], scores[k], x[k], None, None))
                    else:
                        verify_list.append((k, r))
                props = [robustness_property(net, x[k], int(labels[sel[k]]), radius=r, name=f"sample{sel[k]}_r{r}")
                         if raw is None else
                         preprocess.robustness_property(net, raw[k], int(labels[sel[k]]), r,  # type: ignore[union-attr]
                                                        name=f"sample{sel[k]}_r{r}")
                         for k, r in verify_list]
                divs = _divergences(net, props, divergence_points, settings.seed)

                def on_result(j: int, res: Result) -> None:
                    k, r = verify_list[j]
                    if divs is not None:
                        annotate(res, divs[j])
                    else:
                        res.details["semantics"] = semantics_of(net)
                    emit(_instance_record(sel[k], r, labels[sel[k]], preds[k], scores[k], x[k], props[j], res))

                if props:
                    if ray_address is not None:
                        _run_ray(net, props, settings, ray_address, workers, ray_chunk, on_result)
                    else:
                        from qverify.verify import verify_batch

                        verify_batch(net, props, settings, workers=workers, on_result=on_result)
        finally:
            bar.close()
        wall = time.monotonic() - t_start
        writer.write({"type": "session_end", "finished": _now(), "wall_seconds": wall, "new": len(new_records)},
                     sync=True)
    finally:
        writer.close()
    return CertifySummary(path, header, old_records + new_records, len(new_records), len(old_records), repaired,
                          time.monotonic() - t_start)


def _divergences(net: QNetwork, props: list[Property], points: int, seed: int,
                 batch_points: int = 8192) -> list[Divergence] | None:
    """The runtime divergence check of every instance's box (``None``: off, or not an ONNX model), in batched
    onnxruntime runs of at most ``batch_points`` points."""
    if points <= 0 or unavailable(net).startswith("not an ONNX"):
        return None
    out: list[Divergence] = []
    step = max(1, batch_points // points)
    for i in range(0, len(props), step):
        out += check_properties(net, props[i:i + step], points, seed)
    return out


# ------------------------------------------------------------------------------------------------ ray
def import_ray():  # noqa: ANN201 - the module
    """``ray``, or an ImportError that says how to get it (``pip install 'qverify[ray]'``)."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("the Ray path needs the optional extra: pip install 'qverify[ray]' (or pip install ray)"
                          ) from e
    return ray


def _ray_verify_chunk(net: QNetwork, props: list[Property], settings: VerifySettings) -> list[Result]:
    """One Ray task: a chunk of instances through the batched portfolio, in this worker process."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    from qverify.verify import verify_batch

    return verify_batch(net, props, settings, workers=1)


def _run_ray(net: QNetwork, props: list[Property], settings: VerifySettings, address: str, workers: int,
             chunk: int | None, on_result: Callable[[int, Result], None]) -> None:
    """Instances as Ray tasks of ``chunk`` properties each (default: about 4 tasks per CPU, at most 32 each)."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address == "local":
            ray.init(num_cpus=workers or None, **kw)
        else:
            ray.init(address=address, **kw)
        started = True
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if chunk is None:
            chunk = max(1, min(32, -(-len(props) // (4 * cpus))))
        # one solver thread per task: Ray runs one task per CPU
        solver = dataclasses.replace(settings.solver, threads=settings.solver.threads or 1)
        task_settings = dataclasses.replace(settings, solver=solver)
        remote = ray.remote(num_cpus=1)(_ray_verify_chunk)
        net_ref = ray.put(net)
        pending = {}
        for start in range(0, len(props), chunk):
            idx = list(range(start, min(len(props), start + chunk)))
            pending[remote.remote(net_ref, [props[i] for i in idx], task_settings)] = idx
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    idx = pending.pop(ref)
                    for i, res in zip(idx, ray.get(ref), strict=True):
                        on_result(i, res)
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()


__all__ = ["CertifySummary", "MISCLASSIFIED", "ResultsFile", "ResultsFileError", "certify", "data_sha256",
           "file_sha256", "model_info", "network_sha256", "read_results", "select_ids", "summarize", "versions"]
