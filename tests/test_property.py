from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qverify.execute import forward, predict
from qverify.network import Dense, QNetwork
from qverify.property import (
    Conjunction,
    Property,
    PropertyError,
    box_to_grid,
    pixels_to_grid,
    real_row_to_int,
    robustness_property,
)
from qverify.quant import Rounding
from tests.fixtures import all_box_points, networks_and_properties, tiny_fixed_point_mlp


@given(networks_and_properties())
@settings(max_examples=40, deadline=None)
def test_robustness_unsafe_is_argmax_change(np_pair):
    net, prop = np_pair
    pts = all_box_points(prop)
    assert np.array_equal(prop.is_violated(forward(net, pts)), predict(net, pts) != prop.label)


def test_radius_box_clipped_to_grid():
    net = tiny_fixed_point_mlp()
    p = robustness_property(net, np.array([0, 3]), 1, radius=2)
    assert p.lo.tolist() == [0, 1] and p.hi.tolist() == [2, 3] and p.box_size() == 9
    assert "radius 2" in p.description


def test_eps_box_contained_points():
    net = QNetwork((2,), 0, 255, tiny_fixed_point_mlp().layers, input_scale=Fraction(1, 256))
    p = robustness_property(net, np.array([10, 20]), 0, eps="0.01")  # 0.01 * 256 = 2.56 pixels
    assert p.lo.tolist() == [8, 18] and p.hi.tolist() == [12, 22]
    assert "contains" in p.description


def test_box_to_grid_quantizing_input():
    net = QNetwork((2,), -128, 127, tiny_fixed_point_mlp().layers, input_scale=Fraction(1, 10),
                   input_zero_point=5, input_rounding=Rounding.HALF_EVEN)
    lo, hi, how = box_to_grid(net, [Fraction(-1, 20), Fraction(100)], [Fraction(1, 20), Fraction(200)])
    # -0.5 -> half even 0 (+5); 0.5 -> 0 (+5); 1000 -> clamped to 127
    assert lo.tolist() == [5, 127] and hi.tolist() == [5, 127]
    assert "image under the input quantizer" in how


def test_real_row_to_int_exact():
    net = QNetwork((2,), 0, 3, tiny_fixed_point_mlp().layers, output_scale=Fraction(1, 16), output_zero_point=1)
    # Y0 - 0.5 Y1 <= 0.0625  with Y = (y - 1)/16:  y0/16 - y1/32 <= 1/16 + 1/16 - 1/32
    row, rhs = real_row_to_int(net, {0: Fraction(1), 1: Fraction(-1, 2)}, Fraction(1, 16))
    for y0 in range(-8, 8):
        for y1 in range(-8, 8):
            real = Fraction(y0 - 1, 16) - Fraction(1, 2) * Fraction(y1 - 1, 16) <= Fraction(1, 16)
            assert real == (row[0] * y0 + row[1] * y1 <= rhs)


@given(st.integers(-5, 5), st.integers(-5, 5))
def test_conjunction_holds(a, b):
    c = Conjunction([[1, -1]], [b])
    assert bool(c.holds(np.array([[a, 0]]))[0]) == (a <= b)


def test_property_validation():
    with pytest.raises(PropertyError, match="empty input box at X_1"):
        Property([0, 3], [1, 2], (Conjunction([[1]], [0]),))
    with pytest.raises(PropertyError, match="empty unsafe region"):
        Property([0], [1], ())
    net = tiny_fixed_point_mlp()
    with pytest.raises(PropertyError, match="exactly one"):
        robustness_property(net, np.array([0, 0]), 0)
    p = Property([0, 0, 0], [1, 1, 1], (Conjunction([[1, 0]], [0]),))
    with pytest.raises(PropertyError, match="3 inputs"):
        p.check_network(net)


def test_pixels_to_grid_saturate_and_hwc():
    net = QNetwork((2,), 0, 15, tiny_fixed_point_mlp().layers, metadata={"pixel_transform": "saturate"})
    assert pixels_to_grid(net, np.array([[3, 200]], dtype=np.uint8)).tolist() == [[3, 15]]
    with pytest.raises(PropertyError, match="leave the network's input grid"):
        pixels_to_grid(tiny_fixed_point_mlp(), np.array([[3, 200]]))


@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 3), st.integers(2, 5))
def test_slack_is_nonpositive_exactly_on_the_unsafe_region(seed, n_dis, k, n_out) -> None:
    rng = np.random.default_rng(seed)
    unsafe = [Conjunction(rng.integers(-3, 4, size=(k, n_out)), rng.integers(-5, 6, size=k)) for _ in range(n_dis)]
    prop = Property(np.zeros(1), np.ones(1), tuple(unsafe))
    y = rng.integers(-6, 7, size=(300, n_out))
    np.testing.assert_array_equal(prop.slack(y) <= 0, prop.is_violated(y))
    want = [min(max(int(v) for v in c.A @ row - c.b) for c in unsafe) for row in y]
    np.testing.assert_array_equal(prop.slack(y), want)


def test_robustness_slack_counts_the_tie_rule() -> None:
    # label 1 of 3 outputs, first-index tie rule: class 0 wins a tie, class 2 does not
    prop = robustness_property(QNetwork((1,), 0, 3, (Dense([[1], [1], [1]], [0, 0, 0]),)), np.array([1]), 1,
                               radius=0)
    y = np.array([[5, 7, 7], [7, 7, 5], [5, 7, 6], [8, 7, 5]])
    np.testing.assert_array_equal(prop.slack(y), [1, 0, 2, -1])  # min_j (y_1 - y_j + [j > 1])


def test_onnxruntime_input_quantizer_maps_the_box_as_onnxruntime_does(tmp_path):
    """Under ``semantics='onnxruntime'`` a real box end maps through onnxruntime's own ``QuantizeLinear`` of the
    nearest float32 input inside the box (``rne(fl32(v / s))``), not the exact quotient: checked against onnxruntime
    on ends placed exactly at quantizer ties ``(k + 1/2) s`` and next to them, where the two can differ by one."""
    from fractions import Fraction

    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qverify.io.onnx import load_onnx
    from qverify.property import _f32_quantize, box_to_grid
    from tests.onnx_builders import near_tie_model

    path = near_tie_model(tmp_path / "ties.onnx")
    net_x, net_o = load_onnx(path), load_onnx(path, semantics="onnxruntime")
    s, z = net_o.input_scale, net_o.input_zero_point
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    g = helper.make_graph([q], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [None])],
                          [helper.make_tensor("s", TensorProto.FLOAT, [], [float(s)]),
                           helper.make_tensor("z", TensorProto.UINT8, [], [z])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    tiny = Fraction(1, 10**9)
    ends = [(k + Fraction(1, 2)) * s + d for k in range(0, 250, 7) for d in (0, tiny, -tiny)]
    differ = 0
    for b in ends:
        for up in (True, False):
            v = np.float32(float(b))
            while up and Fraction(float(v)) < b:
                v = np.nextafter(v, np.float32(np.inf))
            while not up and Fraction(float(v)) > b:
                v = np.nextafter(v, np.float32(-np.inf))
            theirs = int(sess.run(None, {"x": np.array([v], np.float32)})[0][0])
            assert min(max(_f32_quantize(b, s, up) + z, 0), 255) == theirs
        lo_o, hi_o, how = box_to_grid(net_o, [b] * 3, [b + s] * 3)
        lo_x, _, _ = box_to_grid(net_x, [b] * 3, [b + s] * 3)
        assert "onnxruntime" in how and lo_o[0] <= hi_o[0] + 1
        differ += int(lo_o[0] != lo_x[0])
    assert differ > 0  # the exact quotient and onnxruntime's float32 quantizer do part at some ties
