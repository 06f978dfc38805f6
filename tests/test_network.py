from fractions import Fraction

import numpy as np
import pytest

from qverify.network import Clamp, Conv2d, Dense, Flatten, ModelError, QNetwork, Requantize
from tests.fixtures import random_conv_network, tiny_fixed_point_mlp


def test_shapes_and_ranges():
    net = tiny_fixed_point_mlp()
    assert net.shapes == ((2,), (2,), (2,), (2,), (2,))
    assert net.value_ranges[1] == (-10, 10)  # |W| row sums 3*3 + |b| 1
    assert net.num_outputs == 2 and net.parameter_count() == 12
    assert net.is_fixed_point()


def test_dense_shape_mismatch_names_layer():
    with pytest.raises(ModelError, match=r"layer 1 \(Dense 'b'\).*expects input \(3,\)"):
        QNetwork((2,), 0, 3, (Dense(np.ones((4, 2), int), np.zeros(4, int), name="a"),
                              Dense(np.ones((1, 3), int), np.zeros(1, int), name="b")))


def test_non_integer_weights_rejected():
    with pytest.raises(ModelError, match="non-integer"):
        Dense(np.array([[0.5, 1.0]]), [0])


def test_bias_shape_checked():
    with pytest.raises(ModelError, match="bias shape"):
        Dense(np.ones((2, 2), int), [1, 2, 3], name="fc")


def test_overflow_beyond_2_53_rejected():
    with pytest.raises(ModelError, match="2\\^53"):
        QNetwork((2,), 0, 2**40, (Dense([[2**20, 1]], [0]),))


def test_output_must_be_vector():
    with pytest.raises(ModelError, match="Flatten"):
        QNetwork((1, 3, 3), 0, 3, (Conv2d(np.ones((1, 1, 2, 2), int), [0]),))


def test_requantize_validation():
    with pytest.raises(ModelError, match="empty clamp"):
        Requantize.pow2(1, 5, 4)
    with pytest.raises(ModelError, match="rounding"):
        Requantize((1,), (2,), [0], 0, 3, "banker")
    with pytest.raises(ModelError, match="positive"):
        Requantize((0,), (2,), [0], 0, 3)
    r = Requantize.affine([0.25, Fraction(1, 3)], [0, 1], 0, 7)
    assert r.multipliers() == [Fraction(1, 4), Fraction(1, 3)] and r.shift is None
    assert Requantize.pow2(3, 0, 7).shift == 3
    with pytest.raises(ModelError, match="3 multiplier values for 2 channels"):
        QNetwork((2,), 0, 3, (Dense(np.ones((2, 2), int), [0, 0]), Requantize.affine([1, 1, 1], 0, 0, 7)))


def test_conv_shapes_and_describe():
    net = random_conv_network(np.random.default_rng(1), in_shape=(2, 5, 5), padding=1, stride=2, with_clamp=True)
    assert net.shapes[1] == (2, 3, 3)
    rows = net.describe()
    assert [r["kind"] for r in rows] == ["Conv2d", "Requantize", "Clamp", "Flatten", "Dense", "Requantize"]
    assert rows[2]["range"] == (1, 6)


def test_clamp_and_flatten_layers():
    c = Clamp(0, 3)
    assert c.output_shape((4,)) == (4,)
    assert Flatten().output_shape((2, 3, 4)) == (24,)
    with pytest.raises(ModelError):
        Clamp(4, 3)


def test_float32_requantize_validation_and_describe():
    r = Requantize.float32([np.float32(0.1), 0.25], [0, 1], 0, 7, name="rq")
    assert r.float32_scale == (float(np.float32(0.1)), 0.25) and r.rounding == "half_even"
    assert r.multipliers() == [Fraction(float(np.float32(0.1))), Fraction(1, 4)] and r.shift is None
    assert r.semantics == "float32" and Requantize.pow2(1, 0, 7).semantics == "exact"
    with pytest.raises(ModelError, match="not a float32 value"):
        Requantize.float32([0.1 + 2**-40], [0], 0, 7)  # a float64 that no float32 equals
    with pytest.raises(ModelError, match="exact values of float32_scale"):
        Requantize((1,), (3,), [0], 0, 7, "half_even", "x", (0.25,))
    with pytest.raises(ModelError, match="rounds half to even"):
        Requantize((1,), (4,), [0], 0, 7, "half_up", "x", (0.25,))
    with pytest.raises(ModelError, match="float32 in"):
        Requantize.float32([2.0**30], [0], 0, 7)
    net = QNetwork((2,), 0, 3, (Dense(np.ones((2, 2), int), [0, 0]), r))
    row = net.describe()[1]
    assert row["requant"] == "float32 per-channel (2)" and row["semantics"] == "float32"
    assert net.semantics == "onnxruntime" and not net.is_fixed_point()
    assert tiny_fixed_point_mlp().semantics == "exact"
    assert QNetwork((2,), 0, 3, tiny_fixed_point_mlp().layers, metadata={"semantics": "onnxruntime"}).semantics == \
        "onnxruntime"
    with pytest.raises(ModelError, match="semantics 'exact' but some requantization is float32"):
        QNetwork((2,), 0, 3, net.layers, metadata={"semantics": "exact"})


def test_constructors_refuse_what_int_would_silently_change():
    """Found by the reader fuzzers (the .qnn loader guards them too): a zero point of rank 2, uint64 values beyond
    int64, fractional clamp bounds and strides are located ModelErrors, not wrapped or truncated values."""
    import numpy as np
    import pytest

    from qverify.network import Clamp, Conv2d, Dense, ModelError, Requantize

    with pytest.raises(ModelError, match="zero_point must be"):
        Requantize((1,), (2,), np.zeros((2, 2), np.int64), 0, 7)
    with pytest.raises(ModelError, match="int64 range"):
        Dense(np.array([[2**63 + 5]], dtype=np.uint64), np.zeros(1, np.int64))
    with pytest.raises(ModelError, match="lo: integer expected"):
        Clamp(0.5, 3)
    with pytest.raises(ModelError, match="hi: integer expected"):
        Requantize((1,), (2,), np.array([0]), 0, float("nan"))
    with pytest.raises(ModelError, match="stride: integer expected"):
        Conv2d(np.zeros((1, 1, 2, 2), np.int64), np.zeros(1, np.int64), stride=(1.5, 1))
    assert Clamp(np.int32(1), 6.0).hi == 6 and Conv2d(np.zeros((1, 1, 2, 2), np.int64), np.zeros(1, np.int64),
                                                       stride=(np.int64(2), 2.0)).stride == (2, 2)
