"""Layer encoders: a :class:`~qverify.network.QNetwork` over an integer input box as an exact integer program.

The equations are written out in ``encodings/network.md``; in short, for every layer of the network the encoder
keeps one :data:`~qverify.encode.program.Value` per (flattened) neuron: an ``int`` when the bounds fix the neuron,
else a linear expression over program variables.

* **Affine** (:class:`Dense`, :class:`Conv2d`, unrolled): ``acc_i = sum_j W_ij x_j + b_i``; zero weights and fixed
  inputs are folded into the constant. With ``acc_vars`` the accumulator becomes an integer variable with the
  bound domain ``[A_lo, A_hi]`` and one equality row.
* **Requantize** ``y = clamp(R(acc p / q) + z, lo, hi)`` (and :class:`Clamp` as ``p = q = 1``, floor, ``z = 0``):
  with ``f`` that function and the exact cut points ``C(v) = threshold(v - z, p, q, R)`` (``y >= v`` iff
  ``acc >= C(v)`` for ``lo < v <= hi``) the output domain is ``[f(A_lo), f(A_hi)]`` intersected with the given
  output bounds. A neuron with a single feasible value is a constant. Otherwise, one of two encodings:

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
* :class:`Flatten` is the identity on the flattened values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qverify.encode._bounds import Bounds, box_bounds, normalize_bounds
from qverify.encode.program import LinExpr, Program, Value, Var
from qverify.execute import step_tables
from qverify.network import Clamp, Conv2d, Dense, Flatten, QNetwork, Requantize
from qverify.quant import FLOAT64_EXACT, Rounding, f32_round, f32_thresholds, round_div, threshold

ENCODINGS = ("range", "onehot")


@dataclass
class NetworkEncoding:
    """The program and, per layer (index 0 the input, ``i + 1`` layer ``i``), the flattened neuron values."""

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
        """The integer values of one layer's neurons under an (integer) assignment of the variables."""
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
    """Builds the program layer by layer (see the module docstring)."""

    def __init__(self, program: Program, bounds: Bounds, encoding: str = "range", acc_vars: bool = True) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
        self.prog = program
        self.bounds = bounds
        self.encoding = encoding
        self.acc_vars = acc_vars
        self.relaxable: list[int] = []
        self.stats = {"fixed_neurons": 0, "encoded_neurons": 0, "range_fallback": 0, "tie_binaries": 0,
                      "clamp_binaries": 0, "onehot_binaries": 0}

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

    # ------------------------------------------------------------------ affine
    def _materialize(self, vals: list[Value], blo: np.ndarray, bhi: np.ndarray, tag: str) -> list[Value]:
        """Make every non-constant value a plain variable (so affine layers stay linear in few terms)."""
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

    def _affine_rows(self, W: np.ndarray, b: np.ndarray, vals: list[Value], idx: np.ndarray | None,
                     pad_value: int = 0) -> list[Value]:
        """``acc_i = sum_j W[i, j] * vals[idx[i, j]] + b_i`` (``idx = -1``: a padded cell holding ``pad_value``)."""
        n_in = len(vals)
        const = np.zeros(n_in + 1, dtype=np.int64)
        var_of = np.full(n_in + 1, -1, dtype=np.int64)
        for j, v in enumerate(vals):
            if isinstance(v, LinExpr):
                var_of[j] = next(iter(v.terms))
            else:
                const[j] = v
        const[n_in] = pad_value  # index -1 -> the last slot
        out: list[Value] = []
        for i in range(W.shape[0]):
            cols = np.arange(n_in) if idx is None else np.where(idx[i] < 0, n_in, idx[i])
            w = W[i]
            nz = w != 0
            w, cols = w[nz], cols[nz]
            c0 = int(b[i]) + int(np.dot(w, const[cols]))
            vv = var_of[cols]
            isv = vv >= 0
            terms: dict[int, int] = {}
            for k, c in zip(vv[isv].tolist(), w[isv].tolist(), strict=True):
                terms[k] = terms.get(k, 0) + c
            out.append(LinExpr(terms, c0) if terms else c0)
        return out

    def dense(self, layer: Dense, vals: list[Value]) -> list[Value]:
        return self._affine_rows(layer.weight, layer.bias, vals, None)

    def conv(self, layer: Conv2d, vals: list[Value], in_shape: tuple[int, ...]) -> list[Value]:
        c, h, w = in_shape
        o, _, kh, kw = layer.weight.shape
        pt, pl, pb, pr = layer.padding
        grid = np.full((c, h + pt + pb, w + pl + pr), -1, dtype=np.int64)
        grid[:, pt:pt + h, pl:pl + w] = np.arange(c * h * w).reshape(c, h, w)
        dh, dw = layer.dilation
        sh, sw = layer.stride
        win = np.lib.stride_tricks.sliding_window_view(grid, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
        win = win[:, ::sh, ::sw, ::dh, ::dw]  # [C, OH, OW, kh, kw]
        oh, ow = win.shape[1], win.shape[2]
        cols = win.transpose(1, 2, 0, 3, 4).reshape(oh * ow, c * kh * kw)  # per output position
        wflat = layer.weight.reshape(o, c * kh * kw)
        W = np.repeat(wflat, oh * ow, axis=0)  # row (o, pos) in C order: o major
        idx = np.tile(cols, (o, 1))
        bias = np.repeat(layer.bias, oh * ow)
        return self._affine_rows(W, bias, vals, idx, layer.pad_value)

    # ------------------------------------------------------------------ requantize / clamp
    def requant(self, layer: Requantize | Clamp, vals: list[Value], shape: tuple[int, ...], li: int) -> list[Value]:
        alo, ahi = self.bounds[li]
        ylo, yhi = self.bounds[li + 1]
        n = len(vals)
        per = n // shape[0] if shape else 1  # flattened positions per channel (axis 1 of the batch)
        out: list[Value] = []
        fns: dict[tuple[int, int], _RoundClamp] = {}
        for j, acc in enumerate(vals):
            ch = j // per if shape else 0
            if isinstance(layer, Clamp):
                key = (0, 0)
                if key not in fns:
                    fns[key] = _RoundClamp(1, 1, 0, layer.lo, layer.hi, Rounding.FLOOR)
            else:
                cn = ch if len(layer.num) > 1 else 0
                cz = ch if layer.zero_point.size > 1 else 0
                key = (cn, cz)
                if key not in fns:
                    m32, table = None, None
                    if layer.float32_scale is not None:
                        m32 = layer.float32_scale[cn]
                        tables = step_tables(layer)  # cached per layer: all cut points of a channel at once
                        table = None if tables is None else tables[ch if len(tables) > 1 else 0]
                    fns[key] = _RoundClamp(layer.num[cn], layer.den[cn], int(layer.zero_point[cz]), layer.lo,
                                           layer.hi, layer.rounding, m32, table)
            out.append(self.neuron(fns[key], acc, int(alo[j]), int(ahi[j]), int(ylo[j]), int(yhi[j]),
                                   f"l{li}_{j}"))
        return out

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

    # ------------------------------------------------------------------ the whole network
    def network(self, net: QNetwork, lo: np.ndarray, hi: np.ndarray) -> list[list[Value]]:
        vals = self.inputs(lo, hi)
        layers = [vals]
        for i, layer in enumerate(net.layers):
            shape_in = net.shapes[i]
            if isinstance(layer, (Dense, Conv2d)):
                vals = self._materialize(vals, *self.bounds[i], tag=f"m{i}")
                vals = self.dense(layer, vals) if isinstance(layer, Dense) else self.conv(layer, vals, shape_in)
            elif isinstance(layer, (Requantize, Clamp)):
                vals = self.requant(layer, vals, shape_in, i)
            elif isinstance(layer, Flatten):
                vals = list(vals)
            else:  # pragma: no cover
                raise TypeError(f"cannot encode layer {type(layer).__name__}")
            layers.append(vals)
        return layers


def encode_network(net: QNetwork, lo: np.ndarray, hi: np.ndarray, bounds: Bounds | None = None,
                   encoding: str = "range", program: Program | None = None, acc_vars: bool = True
                   ) -> NetworkEncoding:
    """Encode ``net`` over the integer box ``[lo, hi]`` (flattened input) exactly.

    ``bounds``: per-layer ``(lo, hi)`` (see :mod:`qverify.encode._bounds`), valid on the box; default: interval
    bounds of the box. The input box is intersected with ``bounds[0]``.
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
