"""Node encoders: a :class:`~qverify.network.QNetwork` graph over an integer input box as an exact integer program.

The equations are written out in ``encodings/network.md``; in short, for every value of the network (index 0 the
input, ``i + 1`` node ``i``'s output) the encoder keeps one :data:`~qverify.encode.program.Value` per (flattened)
neuron: an ``int`` when the bounds fix the neuron, else a linear expression over program variables. The encoder
is a rule table ``{op type: rule}`` (:data:`ENCODE`) walked by :func:`qverify.graph.forward`:

* **Linear maps** (every :class:`~qverify.ops.base.LinearMap`: dense, convolution with groups, sum pooling, the
  residual add; one rule from the op's exact integer matrices ``L_k`` and offset ``c``):
  ``y_r = sum_k sum_j L_k[r, j] x_k[j] + c_r``; zero coefficients and fixed inputs are folded into the constant,
  expression inputs are first materialized as variables (once per value, however many nodes read it). **Data
  movement** (flatten, reshape, transpose, pad, concat) passes each input value through, and a padded cell is the
  constant ``c_r``: no variables, no rows.
* **Requantize** ``y = clamp(R(acc p / q) + z, lo, hi)`` (and :class:`Clamp` as ``p = q = 1``, floor, ``z = 0``):
  with ``f`` that function and the exact cut points ``C(v) = threshold(v - z, p, q, R)`` (``y >= v`` iff
  ``acc >= C(v)`` for ``lo < v <= hi``) the output domain is ``[f(A_lo), f(A_hi)]`` intersected with the given
  output bounds. With ``acc_vars`` the accumulator becomes an integer variable with the bound domain
  ``[A_lo, A_hi]`` and one equality row. A neuron with a single feasible value is a constant. Otherwise, one of two
  encodings:

  - ``onehot`` (QVIP): a binary ``b_v`` per feasible value ``v``, ``sum b_v = 1``, ``y = sum v b_v``,
    ``acc >= sum_v L_v b_v`` and ``acc <= sum_v U_v b_v`` with ``L_v = max(C(v), A_lo)``,
    ``U_v = min(C(v + 1) - 1, A_hi)`` (the aggregated form of ``b_v => C(v) <= acc < C(v + 1)``: exact because
    exactly one ``b_v`` is 1, and with no big-M).
  - ``range`` (compact): ``y`` integer; with ``u = y - z`` the rounding is the pair of exact rows
    ``R(acc p / q) >= u`` and ``R(acc p / q) <= u`` written linearly (``2p acc >= 2q u - q + t_lo``,
    ``2p acc <= 2q u + q - t_hi``; floor: ``p acc >= q u``, ``p acc <= q u + q - 1``) where the tie terms
    ``t`` are 0 for half-up, the parity of ``u`` for half-even and a sign indicator for half-away (binaries only
    when a tie is reachable). The clamp adds a binary per reachable saturation: ``d_lo = 1`` iff ``y = lo``
    (relaxing the lower row by an exact big-M), ``d_hi = 1`` iff ``y = hi`` (relaxing the upper row). A pure
    shift with half-up is the textbook ``2^k y - 2^(k-1) <= acc <= 2^k y + 2^(k-1) - 1`` after the gcd
    normalization of :class:`~qverify.encode.program.Program`. Neurons whose rows would need coefficients of
    ``2^53`` or more (huge affine multipliers) fall back to ``onehot`` (counted in the stats), and so do float32
    requantizations (onnxruntime's ``clamp(rne(fl32(fl32(acc) m)) + z, lo, hi)``): their cut points
    ``C(v) = f32_thresholds(v - z, m)`` are exact, but no pair of ``p, q`` rows describes them.
* **Step** functions ``y = v_0 + sum_k (v_k - v_{k-1}) d_k`` with threshold indicators ``d_k = [x >= T_k]``
  (exact big-M pairs from the integer bounds of ``x``; cut points outside the bounds are constants), see
  :meth:`NetworkEncoder.step`.
* **Lookup** tables (any integer function of one value, ``QLinearSigmoid`` and kin) piecewise: one binary per run
  of equal outputs over the input's bounds, see :meth:`NetworkEncoder.lookup`.
* **Max pooling** exactly with one binary per candidate cell, ``y >= x_j``, ``y <= x_j + M_j (1 - s_j)``,
  ``sum s_j = 1``, see :meth:`NetworkEncoder.max_pool`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qverify import graph
from qverify.encode._bounds import Bounds, box_bounds, normalize_bounds
from qverify.encode.program import LinExpr, Program, Value, Var
from qverify.execute import step_tables
from qverify.network import (
    Add,
    Clamp,
    Concat,
    Conv2d,
    Dense,
    Flatten,
    LinearMap,
    Lookup,
    MaxPool2d,
    Op,
    Pad,
    QNetwork,
    Requantize,
    Reshape,
    Step,
    SumPool2d,
    Transpose,
    Uncertain,
)
from qverify.quant import FLOAT64_EXACT, Rounding, f32_round, f32_thresholds, round_div, threshold

Bound = tuple[np.ndarray, np.ndarray]


def _diag(v: np.ndarray):
    """The sparse diagonal matrix of ``v`` (int64)."""
    from scipy.sparse import diags

    return diags(v, 0, shape=(len(v), len(v)), format="csr", dtype=np.int64)


ENCODINGS = ("range", "onehot")


@dataclass
class NetworkEncoding:
    """The program and, per value (index 0 the input, ``i + 1`` node ``i``'s output), the flattened neuron
    values."""

    program: Program
    layer_values: list[list[Value]]
    encoding: str
    bounds: Bounds
    stats: dict = field(default_factory=dict)
    #: the input and accumulator variables: every other variable (a rounded neuron value, a phase or tie binary) is
    #: an integer function of them, so :meth:`Program.relaxed` on these gives the *relaxed-input program*
    #: (see :func:`qverify.exact.verify_milp`)
    relaxable: list[int] = field(default_factory=list)

    @property
    def inputs(self) -> list[Value]:
        return self.layer_values[0]

    @property
    def outputs(self) -> list[Value]:
        return self.layer_values[-1]

    def decode(self, assignment: list[int] | dict[int, int], layer: int = 0) -> np.ndarray:
        """The integer values of one value's neurons (``layer``: the value index, ``i + 1`` for node ``i``) under an
        (integer) assignment of the variables."""
        return np.array([v.value(assignment) if isinstance(v, LinExpr) else int(v)
                         for v in self.layer_values[layer]], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- helpers
def _is_plain_var(v: Value) -> bool:
    return isinstance(v, LinExpr) and v.const == 0 and len(v.terms) == 1 and next(iter(v.terms.values())) == 1


class _RoundClamp:
    """``f(a) = clamp(R(a p / q) + z, lo, hi)`` of one channel, with its exact cut points; with ``m32`` (a float32
    requantization) ``f(a) = clamp(rne(fl32(fl32(a) m32)) + z, lo, hi)`` and ``p / q`` the exact value of ``m32``."""

    def __init__(self, p: int, q: int, z: int, lo: int, hi: int, mode: Rounding, m32: float | None = None,
                 table: np.ndarray | None = None) -> None:
        self.p, self.q, self.z, self.lo, self.hi, self.mode = int(p), int(q), int(z), int(lo), int(hi), mode
        self.m32 = None if m32 is None else np.float32(m32)
        self.table = table  # the executor's cut points C(lo + 1) .. C(hi) (float32 layers)
        self._cuts: dict[int, int] = {}

    def __call__(self, a: int) -> int:
        if self.m32 is not None:
            r = int(f32_round(np.array([int(a)], dtype=np.int64), self.m32)[0])
        else:
            r = int(round_div(np.array([int(a) * self.p], dtype=object), np.array([self.q], dtype=object),
                              self.mode)[0])
        return min(max(r + self.z, self.lo), self.hi)

    def cut(self, v: int) -> int:
        """``C(v)``: the smallest ``acc`` with ``f(acc) >= v``, for ``lo < v <= hi``."""
        if v not in self._cuts:
            if self.table is not None and self.lo < v <= self.hi:
                self._cuts[v] = int(self.table[v - self.lo - 1])
            elif self.m32 is not None:
                self._cuts[v] = int(f32_thresholds(v - self.z, self.m32))
            else:
                self._cuts[v] = threshold(v - self.z, self.p, self.q, self.mode)
        return self._cuts[v]


class NetworkEncoder:
    """Builds the program node by node (see the module docstring)."""

    def __init__(self, program: Program, bounds: Bounds, encoding: str = "range", acc_vars: bool = True) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        self.prog = program
        self.bounds = bounds
        self.encoding = encoding
        self.acc_vars = acc_vars
        self.relaxable: list[int] = []
        self.stats = {"fixed_neurons": 0, "encoded_neurons": 0, "range_fallback": 0, "tie_binaries": 0,
                      "clamp_binaries": 0, "onehot_binaries": 0, "step_binaries": 0, "maxpool_binaries": 0,
                      "lookup_binaries": 0, "identity_pools": 0}
        self._net: QNetwork | None = None
        self._plain_cache: dict[int, list[Value]] = {}

    @property
    def net(self) -> QNetwork:
        """The network being encoded (set by :meth:`network`)."""
        if self._net is None:
            raise ValueError("NetworkEncoder: no network (call network() first)")
        return self._net

    # ------------------------------------------------------------------ inputs
    def inputs(self, lo: np.ndarray, hi: np.ndarray) -> list[Value]:
        out: list[Value] = []
        for j, (l, h) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
            if l == h:
                out.append(int(l))
                continue
            v = self.prog.add_var(f"x{j}", l, h)
            self.relaxable.append(v.index)
            out.append(LinExpr.var(v))
        return out

    # ------------------------------------------------------------------ linear maps
    def _materialize(self, vals: list[Value], blo: np.ndarray, bhi: np.ndarray, tag: str) -> list[Value]:
        """Make every non-constant value a plain variable (so linear maps stay linear in few terms)."""
        out: list[Value] = []
        for j, v in enumerate(vals):
            if isinstance(v, LinExpr) and not _is_plain_var(v):
                lo, hi = self.prog.expr_bounds(v)
                lo, hi = max(lo, int(blo[j])), min(hi, int(bhi[j]))
                if lo == hi:
                    out.append(lo)
                    continue
                w = self.prog.add_var(f"{tag}_{j}", lo, hi)
                self.prog.add_con(v - LinExpr.var(w), 0, 0, name=f"{tag}_{j}_def")
                out.append(LinExpr.var(w))
            else:
                out.append(v)
        return out

    def _plain(self, value: int, vals: list[Value]) -> list[Value]:
        """Value ``value`` with every expression materialized as a variable (once per value: a value read by
        several nodes, a residual shortcut, keeps one set of variables)."""
        if value not in self._plain_cache:
            self._plain_cache[value] = self._materialize(vals, *self.bounds[value], tag=f"m{value}")
        return self._plain_cache[value]

    def linear(self, i: int, op: LinearMap, ins: list[list[Value]]) -> list[Value]:
        """``y_r = sum_k sum_j L_k[r, j] x_k[j] + c_r`` from the exact integer matrices ``L_k``
        (:meth:`~qverify.ops.base.LinearMap.matrices`) and the offset ``c`` (biases, padded cells).

        Maps with coefficients read their inputs as plain variables or constants (expressions are materialized
        first); constant inputs and zero coefficients fold into the constant, so ``y_r`` is an ``int`` when no
        variable is left. Data movement (``op.movement``: each output one input cell or the constant ``c_r``)
        passes the input values through unchanged: no variable and no row."""
        in_shapes = self.net.in_shapes(i)
        mats = op.matrices(in_shapes)
        off = np.asarray(op.offset(in_shapes), dtype=np.int64).ravel()
        if op.movement:
            return self._gather(mats, off, ins)
        reads = self.net.node_inputs(i)
        const = np.zeros(len(off), dtype=np.int64)
        terms: list[dict[int, int]] = [{} for _ in range(len(off))]
        for value, vals, m in zip(reads, ins, mats, strict=True):
            vals = self._plain(value, vals)
            cvec = np.array([0 if isinstance(v, LinExpr) else int(v) for v in vals], dtype=np.int64)
            var_of = np.array([next(iter(v.terms)) if isinstance(v, LinExpr) else -1 for v in vals],
                              dtype=np.int64)
            const += np.asarray(m @ cvec, dtype=np.int64).ravel()  # exact: |partial sums| <= value_bound < 2^53
            isv = var_of >= 0
            if not isv.any():
                continue
            mv = (m @ _diag(isv.astype(np.int64))).tocsr()
            mv.eliminate_zeros()
            ptr, cols, data = mv.indptr, var_of[mv.indices], mv.data
            for r in np.nonzero(np.diff(ptr))[0].tolist():
                t = terms[r]
                for k, c in zip(cols[ptr[r]:ptr[r + 1]].tolist(), data[ptr[r]:ptr[r + 1]].tolist(), strict=True):
                    t[k] = t.get(k, 0) + c
        out: list[Value] = []
        for r, t in enumerate(terms):
            c0 = int(off[r]) + int(const[r])
            e = LinExpr(t, c0)
            out.append(e if e.terms else c0)
        return out

    @staticmethod
    def _gather(mats: list, off: np.ndarray, ins: list[list[Value]]) -> list[Value]:
        """Data movement: output ``r`` is the input cell its 0/1 row selects (the value itself, passed through), or
        the constant ``off[r]`` (a padded cell). A row of any other form (not produced by the movement ops) is
        written as its exact sum ``sum c x + off[r]``."""
        items: list[list[tuple[int, Value]]] = [[] for _ in range(len(off))]
        for vals, m in zip(ins, mats, strict=True):
            m = m.tocsr()
            for r in np.nonzero(np.diff(m.indptr))[0].tolist():
                for j, c in zip(m.indices[m.indptr[r]:m.indptr[r + 1]].tolist(),
                                m.data[m.indptr[r]:m.indptr[r + 1]].tolist(), strict=True):
                    items[r].append((int(c), vals[j]))
        out: list[Value] = []
        for r, it in enumerate(items):
            if len(it) == 1 and it[0][0] == 1 and off[r] == 0:
                out.append(it[0][1])
            elif not it:
                out.append(int(off[r]))
            else:
                e = LinExpr.weighted_sum(it, int(off[r]))
                out.append(e if e.terms else e.const)
        return out

    # ------------------------------------------------------------------ requantize / clamp
    def requantize(self, i: int, op: Requantize, ins: list[list[Value]]) -> list[Value]:
        """``y = clamp(R(acc p_c / q_c) + z_c, lo, hi)`` per neuron (:meth:`neuron`; float32 requantizations by
        their exact cut points)."""
        fns: dict[int, _RoundClamp] = {}

        def fn(ch: int) -> _RoundClamp:
            cn = ch if len(op.num) > 1 else 0
            cz = ch if op.zero_point.size > 1 else 0
            key = cn * op.zero_point.size + cz
            if key not in fns:
                m32, table = None, None
                if op.float32_scale is not None:
                    m32 = op.float32_scale[cn]
                    tables = step_tables(op)  # cached per op: all cut points of a channel at once
                    table = None if tables is None else tables[ch if len(tables) > 1 else 0]
                fns[key] = _RoundClamp(op.num[cn], op.den[cn], int(op.zero_point[cz]), op.lo, op.hi, op.rounding,
                                       m32, table)
            return fns[key]

        return self._neurons(i, ins[0], fn)

    def clamp(self, i: int, op: Clamp, ins: list[list[Value]]) -> list[Value]:
        """``y = clamp(x, lo, hi)``: the requantization with ``p = q = 1``, ``z = 0``, floor."""
        f = _RoundClamp(1, 1, 0, op.lo, op.hi, Rounding.FLOOR)
        return self._neurons(i, ins[0], lambda ch: f)

    def _neurons(self, i: int, vals: list[Value], fn: Callable[[int], _RoundClamp]) -> list[Value]:
        """Node ``i``'s elementwise function ``fn(channel)`` on every neuron, channels on axis 0 of the value."""
        (value,) = self.net.node_inputs(i)
        shape = self.net.shapes[value]
        alo, ahi = self.bounds[value]
        ylo, yhi = self.bounds[i + 1]
        per = len(vals) // shape[0] if shape else 1  # flattened positions per channel (axis 1 of the batch)
        return [self.neuron(fn(j // per if shape else 0), acc, int(alo[j]), int(ahi[j]), int(ylo[j]), int(yhi[j]),
                            f"l{i}_{j}") for j, acc in enumerate(vals)]

    def neuron(self, f: _RoundClamp, acc: Value, a_lo: int, a_hi: int, y_lo: int, y_hi: int, tag: str) -> Value:
        prog = self.prog
        if not isinstance(acc, LinExpr):
            self.stats["fixed_neurons"] += 1
            return f(acc)
        e_lo, e_hi = prog.expr_bounds(acc)
        a_lo, a_hi = max(a_lo, e_lo), min(a_hi, e_hi)
        y_lo, y_hi = max(y_lo, f(a_lo)), min(y_hi, f(a_hi))
        if y_lo > y_hi:
            raise ValueError(f"neuron {tag}: the bounds leave no feasible value (unsound bounds?)")
        if y_lo == y_hi:
            self.stats["fixed_neurons"] += 1
            return y_lo
        # the accumulator range that maps into [y_lo, y_hi]
        if y_lo > f.lo:
            a_lo = max(a_lo, f.cut(y_lo))
        if y_hi < f.hi:
            a_hi = min(a_hi, f.cut(y_hi + 1) - 1)
        self.stats["encoded_neurons"] += 1
        if self.acc_vars and not _is_plain_var(acc):
            av = prog.add_var(f"a{tag}", a_lo, a_hi)
            self.relaxable.append(av.index)
            prog.add_con(acc - LinExpr.var(av), 0, 0, name=f"a{tag}_def")
            acc = LinExpr.var(av)
        y = prog.add_var(f"y{tag}", y_lo, y_hi)
        if self.encoding == "range" and self._range_fits(f, acc, a_lo, a_hi, y_lo, y_hi):
            self._range(f, acc, y, a_lo, a_hi, tag)
        else:
            if self.encoding == "range":
                self.stats["range_fallback"] += 1
            self._onehot(f, acc, y, a_lo, a_hi, tag)
        return LinExpr.var(y)

    # -- one-hot
    def _onehot(self, f: _RoundClamp, acc: LinExpr, y: Var, a_lo: int, a_hi: int, tag: str) -> None:
        prog = self.prog
        vals = range(y.lo, y.hi + 1)
        bs = [prog.add_binary(f"b{tag}_{v}") for v in vals]
        self.stats["onehot_binaries"] += len(bs)
        lows = [a_lo if v <= f.lo or v == y.lo else max(f.cut(v), a_lo) for v in vals]
        highs = [a_hi if v >= f.hi or v == y.hi else min(f.cut(v + 1) - 1, a_hi) for v in vals]
        one = LinExpr.weighted_sum([(1, LinExpr.var(b)) for b in bs])
        prog.add_con(one, 1, 1, name=f"oh{tag}_one")
        prog.add_con(LinExpr.var(y) - LinExpr.weighted_sum([(v, LinExpr.var(b)) for v, b in zip(vals, bs,
                                                                                                 strict=True)]),
                     0, 0, name=f"oh{tag}_val")
        prog.add_con(acc - LinExpr.weighted_sum([(lv, LinExpr.var(b)) for lv, b in zip(lows, bs, strict=True)]),
                     0, None, name=f"oh{tag}_lo")
        prog.add_con(acc - LinExpr.weighted_sum([(hv, LinExpr.var(b)) for hv, b in zip(highs, bs, strict=True)]),
                     None, 0, name=f"oh{tag}_hi")

    # -- range
    def _range_fits(self, f: _RoundClamp, acc: LinExpr, a_lo: int, a_hi: int, y_lo: int, y_hi: int) -> bool:
        if f.m32 is not None:  # the range rows are written for R(a p / q); a float32 neuron takes its cut points
            return False
        lo, hi = self.prog.expr_bounds(acc)
        m = max(abs(lo), abs(hi), abs(a_lo), abs(a_hi))
        u = max(abs(y_lo - f.z), abs(y_hi - f.z)) + 1
        return 2 * f.p * m + 2 * f.q * u + 2 * f.q < FLOAT64_EXACT

    def _tie_possible(self, f: _RoundClamp, a_lo: int, a_hi: int) -> bool:
        """Whether some ``acc`` in ``[a_lo, a_hi]`` has ``acc p / q`` exactly half-way (``2 p acc = q (2u+1)``)."""
        if f.mode in (Rounding.FLOOR, Rounding.HALF_UP) or f.q % 2:
            return False
        # p acc = q/2 (mod q), gcd(p, q) = 1
        r0 = (f.q // 2) * pow(f.p, -1, f.q) % f.q if f.q > 1 else 0
        first = a_lo + ((r0 - a_lo) % f.q)
        return first <= a_hi

    def _range(self, f: _RoundClamp, acc: LinExpr, y: Var, a_lo: int, a_hi: int, tag: str) -> None:
        prog = self.prog
        p, q, z = f.p, f.q, f.z
        ye = LinExpr.var(y)
        u_lo, u_hi = y.lo - z, y.hi - z
        # Tie terms: t_lo (added to the lower row's right side) and t_hi (subtracted on the upper row), as
        # expressions in {0, 1}, exact for every u in [u_lo, u_hi].
        # (no reachable tie: any t works; t_lo = 0, t_hi = 1 is half-up's exact pair)
        scale = 1 if f.mode is Rounding.FLOOR else 2
        t_lo: LinExpr | int = 0
        t_hi: LinExpr | int = 0 if scale == 1 else 1
        if self._tie_possible(f, a_lo, a_hi):
            if f.mode is Rounding.HALF_EVEN:  # t = [u odd]: u = 2m + s
                s = prog.add_binary(f"par{tag}")
                m = prog.add_var(f"half{tag}", (u_lo - 1) // 2, u_hi // 2)
                prog.add_con(ye - LinExpr.var(m, 2) - LinExpr.var(s), z, z, name=f"par{tag}_def")
                t_lo = t_hi = LinExpr.var(s)
                self.stats["tie_binaries"] += 1
            else:  # half away: t_lo = [u <= 0] = 1 - g, t_hi = [u >= 0] = 1 - h
                if u_lo >= 1:
                    t_lo, t_hi = 0, 1
                elif u_hi <= -1:
                    t_lo, t_hi = 1, 0
                else:
                    if u_hi >= 1:  # g = [u >= 1]
                        g = prog.add_binary(f"pos{tag}")
                        # g = 1 -> u >= 1 ; g = 0 -> u <= 0
                        prog.add_con(ye - LinExpr.var(g, 1 - u_lo), u_lo + z, None, name=f"pos{tag}_1")
                        prog.add_con(ye - LinExpr.var(g, u_hi), None, z, name=f"pos{tag}_0")
                        t_lo = 1 - LinExpr.var(g)
                        self.stats["tie_binaries"] += 1
                    else:
                        t_lo = 1
                    if u_lo <= -1:  # h = [u <= -1]
                        h = prog.add_binary(f"neg{tag}")
                        # h = 1 -> u <= -1 ; h = 0 -> u >= 0
                        prog.add_con(ye + LinExpr.var(h, u_hi + 1), None, u_hi + z, name=f"neg{tag}_1")
                        prog.add_con(ye - LinExpr.var(h, u_lo), z, None, name=f"neg{tag}_0")
                        t_hi = 1 - LinExpr.var(h)
                        self.stats["tie_binaries"] += 1
                    else:
                        t_hi = 1
        # rows in terms of y (s = scale): lower  s p acc - s q y - t_lo >= -s q z - (q if half else 0)
        #                                 upper  s p acc - s q y + t_hi <= -s q z + (q if half else q - 1)
        lower = LinExpr.weighted_sum([(scale * p, acc), (-scale * q, ye), (-1, t_lo)])
        upper = LinExpr.weighted_sum([(scale * p, acc), (-scale * q, ye), (1, t_hi)])
        lower_rhs = -scale * q * z - (q if scale == 2 else 0)
        upper_rhs = -scale * q * z + (q if scale == 2 else q - 1)
        sat_lo = y.lo == f.lo  # the lower clamp is reachable
        sat_hi = y.hi == f.hi
        if sat_lo:
            d = prog.add_binary(f"dlo{tag}")
            self.stats["clamp_binaries"] += 1
            # d = 1 <-> y = lo
            prog.add_con(ye + LinExpr.var(d), f.lo + 1, None, name=f"dlo{tag}_0")
            prog.add_con(ye + LinExpr.var(d, y.hi - f.lo), None, y.hi, name=f"dlo{tag}_1")
            # lower row relaxed when d = 1 (then y = lo): M = rhs - min(lower | y = lo)
            mn = self._min_at(lower, y, f.lo, a_lo, a_hi, acc)
            big = max(0, lower_rhs - mn)
            lower = lower + LinExpr.var(d, big)
        if sat_hi:
            d2 = prog.add_binary(f"dhi{tag}")
            self.stats["clamp_binaries"] += 1
            # d2 = 1 <-> y = hi
            prog.add_con(ye - LinExpr.var(d2), None, f.hi - 1, name=f"dhi{tag}_0")
            prog.add_con(ye - LinExpr.var(d2, f.hi - y.lo), y.lo, None, name=f"dhi{tag}_1")
            mx = -self._min_at(-upper, y, f.hi, a_lo, a_hi, acc)
            big = max(0, mx - upper_rhs)
            upper = upper - LinExpr.var(d2, big)
            if sat_lo:
                prog.add_con(LinExpr.var(d) + LinExpr.var(d2), None, 1, name=f"d{tag}_one")
        prog.add_con(lower, lower_rhs, None, name=f"rlo{tag}")
        prog.add_con(upper, None, upper_rhs, name=f"rhi{tag}")

    def _min_at(self, e: LinExpr, y: Var, yv: int, a_lo: int, a_hi: int, acc: LinExpr) -> int:
        """A lower bound of ``e`` over executions with ``y = yv``: the accumulator in ``[a_lo, a_hi]``, every
        other variable over its domain."""
        ai = next(iter(acc.terms)) if _is_plain_var(acc) else None
        total = e.const
        for k, c in e.terms.items():
            if k == y.index:
                total += c * yv
            elif k == ai:
                total += c * (a_lo if c > 0 else a_hi)
            else:
                v = self.prog.vars[k]
                total += c * (v.lo if c > 0 else v.hi)
        return total

    # ------------------------------------------------------------------ step functions
    def step(self, i: int, op: Step, ins: list[list[Value]]) -> list[Value]:
        """``y = levels[#{k : T_{c,k} <= x}]`` per neuron by threshold indicators (``encodings/network.md``).

        With ``x in [l, u]`` (the value's bounds intersected with the activity of its expression) only the cut
        points ``l < T_k <= u`` whose level jumps (``v_k > v_{k-1}``) can change ``y``; each gets a binary
        ``d_k = [x >= T_k]`` by the exact big-M pair ``x - (T_k - l) d_k >= l`` (``d_k = 1 => x >= T_k``) and
        ``x - (u - T_k + 1) d_k <= T_k - 1`` (``d_k = 0 => x <= T_k - 1``), ordered ``d_k >= d_{k+1}``; then
        ``y = f(l) + sum_k (v_k - v_{k-1}) d_k`` is an expression (no variable). No live cut point: a constant."""
        (value,) = self.net.node_inputs(i)
        shape = self.net.shapes[value]
        xlo, xhi = self.bounds[value]
        vals = ins[0]
        per = len(vals) // shape[0] if shape else 1
        levels = np.asarray(op.levels, dtype=np.int64)
        out: list[Value] = []
        for j, x in enumerate(vals):
            cuts = op.channel_cuts(j // per if shape else 0)

            def f(a: int, cuts: np.ndarray = cuts) -> int:
                return int(levels[int(np.searchsorted(cuts, a, side="right"))])

            if not isinstance(x, LinExpr):
                self.stats["fixed_neurons"] += 1
                out.append(f(int(x)))
                continue
            e_lo, e_hi = self.prog.expr_bounds(x)
            lo, hi = max(int(xlo[j]), e_lo), min(int(xhi[j]), e_hi)
            if lo > hi:
                raise ValueError(f"step {i}_{j}: the bounds leave no feasible value (unsound bounds?)")
            base = f(lo)
            live = [(int(t), int(levels[k + 1] - levels[k])) for k, t in enumerate(cuts.tolist())
                    if lo < t <= hi and levels[k + 1] > levels[k]]
            if not live:
                self.stats["fixed_neurons"] += 1
                out.append(base)
                continue
            self.stats["encoded_neurons"] += 1
            tag = f"s{i}_{j}"
            if self.acc_vars and not _is_plain_var(x):
                av = self.prog.add_var(f"a{tag}", lo, hi)
                self.relaxable.append(av.index)
                self.prog.add_con(x - LinExpr.var(av), 0, 0, name=f"a{tag}_def")
                x = LinExpr.var(av)
            ds = []
            for t, _ in live:
                d = self.prog.add_binary(f"d{tag}_{t}")
                self.prog.add_con(x - LinExpr.var(d, t - lo), lo, None, name=f"d{tag}_{t}_on")
                self.prog.add_con(x - LinExpr.var(d, hi - t + 1), None, t - 1, name=f"d{tag}_{t}_off")
                if ds:
                    self.prog.add_con(LinExpr.var(ds[-1]) - LinExpr.var(d), 0, None, name=f"d{tag}_{t}_order")
                ds.append(d)
            self.stats["step_binaries"] += len(ds)
            out.append(LinExpr.weighted_sum([(dv, LinExpr.var(d)) for (_, dv), d in zip(live, ds, strict=True)],
                                            base))
        return out

    # ------------------------------------------------------------------ lookup tables
    def lookup(self, i: int, op: Lookup, ins: list[list[Value]]) -> list[Value]:
        """``y = table_c[x - start]`` (any integer function, monotone or not) per neuron, piecewise: the table over
        ``x in [l, u]`` splits into maximal runs ``[s_k, e_k]`` of one output ``t_k``; runs whose ``t_k`` leaves
        the output's bounds are dropped (no execution reaches them), and the rest get one binary ``b_k`` each:

        ``sum_k b_k = 1``, ``x >= sum_k s_k b_k``, ``x <= sum_k e_k b_k``, ``y = sum_k t_k b_k``.

        Exactly one ``b_k`` is 1, so the two rows say ``s_k <= x <= e_k`` for the chosen run and ``y = t_k`` is
        the table's value there (the aggregated one-hot form, no big-M; binaries: the number of runs). One run
        left: a constant. With ``acc_vars`` an expression ``x`` first gets an accumulator variable ``a = x``."""
        (value,) = self.net.node_inputs(i)
        shape = self.net.shapes[value]
        xlo, xhi = self.bounds[value]
        ylo, yhi = self.bounds[i + 1]
        vals = ins[0]
        per = len(vals) // shape[0] if shape else 1
        prog = self.prog
        out: list[Value] = []
        for j, x in enumerate(vals):
            table = op.channel_table(j // per if shape else 0)
            if not isinstance(x, LinExpr):
                self.stats["fixed_neurons"] += 1
                out.append(int(table[int(x) - op.start]))
                continue
            e_lo, e_hi = prog.expr_bounds(x)
            lo, hi = max(int(xlo[j]), e_lo, op.start), min(int(xhi[j]), e_hi, op.start + len(table) - 1)
            seg = table[lo - op.start:hi - op.start + 1]
            starts = np.concatenate([[0], np.nonzero(np.diff(seg))[0] + 1])
            ends = np.concatenate([starts[1:] - 1, [len(seg) - 1]])
            runs = [(lo + int(s), lo + int(e), int(seg[s])) for s, e in zip(starts, ends, strict=True)
                    if int(ylo[j]) <= int(seg[s]) <= int(yhi[j])]
            if not runs:
                raise ValueError(f"lookup {i}_{j}: the bounds leave no feasible value (unsound bounds?)")
            if len(runs) == 1:
                self.stats["fixed_neurons"] += 1
                out.append(runs[0][2])
                continue
            self.stats["encoded_neurons"] += 1
            tag = f"t{i}_{j}"
            r_lo, r_hi = runs[0][0], runs[-1][1]
            if self.acc_vars and not _is_plain_var(x):
                av = prog.add_var(f"a{tag}", r_lo, r_hi)
                self.relaxable.append(av.index)
                prog.add_con(x - LinExpr.var(av), 0, 0, name=f"a{tag}_def")
                x = LinExpr.var(av)
            bs = [prog.add_binary(f"b{tag}_{s}") for s, _, _ in runs]
            self.stats["lookup_binaries"] += len(bs)
            prog.add_con(LinExpr.weighted_sum([(1, LinExpr.var(b)) for b in bs]), 1, 1, name=f"b{tag}_one")
            prog.add_con(x - LinExpr.weighted_sum([(s, LinExpr.var(b)) for (s, _, _), b in zip(runs, bs, strict=True)]),
                         0, None, name=f"b{tag}_lo")
            prog.add_con(x - LinExpr.weighted_sum([(e, LinExpr.var(b)) for (_, e, _), b in zip(runs, bs, strict=True)]),
                         None, 0, name=f"b{tag}_hi")
            out.append(LinExpr.weighted_sum([(t, LinExpr.var(b)) for (_, _, t), b in zip(runs, bs, strict=True)]))
        return out

    # ------------------------------------------------------------------ max pooling
    def max_pool(self, i: int, op: MaxPool2d, ins: list[list[Value]]) -> list[Value]:
        """``y = max_j x_j`` over each window's cells (padded cells ignored) with one binary per candidate cell.

        With cell bounds ``[l_j, u_j]`` (value bounds intersected with the activity of the expression) and
        ``L = max_j l_j``: a cell with ``u_j < L`` is never the maximum (dropped; ``y >= L > x_j`` holds anyway); a
        cell with ``l_j >= u_k`` for every other kept ``k`` dominates (``y = x_j``, no variable). Otherwise
        ``y in [L, U]`` (``U = max u_j``, intersected with the output bounds), ``s_j`` binary per kept cell and
        ``M_j = min(U, max_{k != j} u_k) - l_j``: ``y >= x_j``, ``y <= x_j + M_j (1 - s_j)``, ``sum_j s_j = 1`` and
        ``y <= sum_j u_j s_j``. The chosen cell gives ``y = x_j`` and the lower rows make it the maximum; an
        unchosen cell's row holds on every execution (``y`` is another cell, ``<= max_{k != j} u_k``, and
        ``x_j >= l_j``); the last row is the chosen cell's upper bound (implied on the integers, tightens the
        LP)."""
        (value,) = self.net.node_inputs(i)
        in_shape = self.net.shapes[value]
        vals = ins[0]
        blo, bhi = self.bounds[value]
        ylo, yhi = self.bounds[i + 1]
        win = op.window_indices(in_shape)
        win = win.reshape(-1, win.shape[-1])
        prog = self.prog
        out: list[Value] = []
        for r, cells in enumerate(win.tolist()):
            cells = [c for c in cells if c >= 0]
            bounds = []
            for c in cells:
                e_lo, e_hi = prog.expr_bounds(vals[c])
                bounds.append((max(int(blo[c]), e_lo), min(int(bhi[c]), e_hi)))
            if any(lo > hi for lo, hi in bounds):
                raise ValueError(f"max pool {i}_{r}: the bounds leave no feasible value (unsound bounds?)")
            big_l = max(lo for lo, _ in bounds)
            keep = [k for k, (_, hi) in enumerate(bounds) if hi >= big_l]
            dom = [k for k in keep if all(bounds[k][0] >= bounds[m][1] for m in keep if m != k)]
            if dom:
                self.stats["fixed_neurons" if not isinstance(vals[cells[dom[0]]], LinExpr) else "identity_pools"] += 1
                out.append(vals[cells[dom[0]]])
                continue
            y_lo = max(big_l, int(ylo[r]))
            y_hi = min(max(bounds[k][1] for k in keep), int(yhi[r]))
            if y_lo > y_hi:
                raise ValueError(f"max pool {i}_{r}: the bounds leave no feasible value (unsound bounds?)")
            if y_lo == y_hi:
                self.stats["fixed_neurons"] += 1
                out.append(y_lo)
                continue
            self.stats["encoded_neurons"] += 1
            tag = f"p{i}_{r}"
            y = prog.add_var(f"y{tag}", y_lo, y_hi)
            ye = LinExpr.var(y)
            ss = []
            for k in keep:
                x, lk = vals[cells[k]], bounds[k][0]
                # s_k = 0: y is another kept cell, y <= max_{m != k} u_m, and x_k >= l_k (M_k > 0: no dominance)
                big = min(y_hi, max(bounds[m][1] for m in keep if m != k)) - lk
                s = prog.add_binary(f"s{tag}_{k}")
                prog.add_con(ye - x, 0, None, name=f"s{tag}_{k}_ge")
                prog.add_con(ye - x + LinExpr.var(s, big), None, big, name=f"s{tag}_{k}_le")
                ss.append(s)
            prog.add_con(LinExpr.weighted_sum([(1, LinExpr.var(s)) for s in ss]), 1, 1, name=f"s{tag}_one")
            # y <= sum_j u_j s_j: the chosen cell's upper bound (valid on every execution; tightens the LP)
            prog.add_con(ye - LinExpr.weighted_sum([(bounds[k][1], LinExpr.var(s)) for k, s in zip(keep, ss,
                                                                                                   strict=True)]),
                         None, 0, name=f"s{tag}_ub")
            self.stats["maxpool_binaries"] += len(ss)
            out.append(ye)
        return out

    # ------------------------------------------------------------------ set-valued identity
    def uncertain(self, i: int, op: Uncertain, ins: list[list[Value]]) -> list[Value]:
        """``y in [x - d, x + d]`` per neuron (:class:`~qverify.ops.Uncertain`): a new integer variable ``y`` with
        ``y - x >= -d`` and ``y - x <= d``, its domain the input's bounds widened by ``d`` and intersected with
        the output's bounds; ``d = 0`` passes ``x`` through. Exact: the program's solutions are the members of the
        set (every choice of the runtime's deviation)."""
        (value,) = self.net.node_inputs(i)
        shape = self.net.shapes[value]
        deltas = op.deltas(shape).ravel()
        blo, bhi = self.bounds[value]
        ylo, yhi = self.bounds[i + 1]
        out: list[Value] = []
        for j, x in enumerate(ins[0]):
            d = int(deltas[j])
            if d == 0:
                out.append(x)
                continue
            if isinstance(x, LinExpr):
                e_lo, e_hi = self.prog.expr_bounds(x)
                x_lo, x_hi = max(int(blo[j]), e_lo), min(int(bhi[j]), e_hi)
            else:
                x_lo = x_hi = int(x)
            lo, hi = max(x_lo - d, int(ylo[j])), min(x_hi + d, int(yhi[j]))
            if lo > hi:
                raise ValueError(f"uncertain {i}_{j}: the bounds leave no feasible value (unsound bounds?)")
            self.stats["encoded_neurons"] += 1
            y = self.prog.add_var(f"e{i}_{j}", lo, hi)
            diff = LinExpr.var(y) - x
            self.prog.add_con(diff, -d, d, name=f"e{i}_{j}")
            out.append(LinExpr.var(y))
        return out

    # ------------------------------------------------------------------ the whole network
    def network(self, net: QNetwork, lo: np.ndarray, hi: np.ndarray) -> list[list[Value]]:
        """Every value's neurons (index 0 the input, ``i + 1`` node ``i``'s output): :data:`ENCODE` walked by
        :func:`qverify.graph.forward`."""
        self._net = net
        self._plain_cache = {}

        def step(i: int, op: Op, ins: list[list[Value]]) -> list[Value]:
            return graph.rule(ENCODE, op, "integer program encoder")(self, i, op, ins)

        return graph.forward(net, self.inputs(lo, hi), step)  # type: ignore[return-value]


#: the encoder's rule table: ``rule(encoder, node index, op, input values) -> output values`` (flattened)
ENCODE: dict[type, Callable[..., list[Value]]] = {
    Dense: NetworkEncoder.linear, Conv2d: NetworkEncoder.linear, SumPool2d: NetworkEncoder.linear,
    Add: NetworkEncoder.linear, Flatten: NetworkEncoder.linear, Reshape: NetworkEncoder.linear,
    Transpose: NetworkEncoder.linear, Pad: NetworkEncoder.linear, Concat: NetworkEncoder.linear,
    Requantize: NetworkEncoder.requantize, Clamp: NetworkEncoder.clamp, Step: NetworkEncoder.step,
    Lookup: NetworkEncoder.lookup, MaxPool2d: NetworkEncoder.max_pool, Uncertain: NetworkEncoder.uncertain}


def encode_network(net: QNetwork, lo: np.ndarray, hi: np.ndarray, bounds: Bounds | None = None,
                   encoding: str = "range", program: Program | None = None, acc_vars: bool = True
                   ) -> NetworkEncoding:
    """Encode ``net`` over the integer box ``[lo, hi]`` (flattened input) exactly.

    ``bounds``: per-value ``(lo, hi)`` (one per value of the graph, see :mod:`qverify.encode._bounds`), valid on
    the box; default: interval bounds of the box. The input box is intersected with ``bounds[0]``.
    """
    lo = np.asarray(lo, dtype=np.int64).ravel()
    hi = np.asarray(hi, dtype=np.int64).ravel()
    b = box_bounds(net, lo, hi) if bounds is None else normalize_bounds(net, bounds)
    lo = np.maximum(lo, b[0][0])
    hi = np.minimum(hi, b[0][1])
    if np.any(lo > hi):
        raise ValueError("the input box and the input bounds do not intersect")
    prog = program if program is not None else Program()
    enc = NetworkEncoder(prog, b, encoding, acc_vars)
    layers = enc.network(net, lo, hi)
    return NetworkEncoding(prog, layers, encoding, b, dict(enc.stats), list(enc.relaxable))
