import numpy as np
import pytest

from qverify.execute import forward, predict
from qverify.io import load_model
from qverify.io.h5 import guess_bits, load_qvip_h5
from qverify.network import ModelError
from tests.fixtures import MNIST1000, P1_6, QVIP

ALL_H5 = sorted(QVIP.rglob("*.h5"))
pytestmark = pytest.mark.skipif(not P1_6.exists(), reason="../shared anchors not present")


def mnist():
    d = np.load(MNIST1000)
    return d["images"].reshape(len(d["images"]), -1), d["labels"]


def test_p1_6_reproduces_qvip_misclassified_ids():
    """QVIP paper, Table 2: P1-6 misclassifies exactly these ids among 0-399."""
    net = load_qvip_h5(P1_6)
    x, y = mnist()
    p = predict(net, x)
    assert [i for i in range(400) if p[i] != y[i]] == [18, 149, 217, 241, 247, 259, 321, 340, 381]
    assert net.num_outputs == 32 and net.metadata["bits"] == "6"


@pytest.mark.parametrize("path", ALL_H5, ids=[p.name for p in ALL_H5])
def test_every_anchor_loads_within_declared_ranges(path):
    q, inb = guess_bits(path)
    net = load_model(path, fmt="qvip-h5")
    assert len(ALL_H5) == 15
    for layer in net.layers[::2]:
        assert layer.weight.min() >= -(2 ** (q - 1)) and layer.weight.max() <= 2 ** (q - 1) - 1
    x, y = mnist()
    from qverify.property import pixels_to_grid

    out = forward(net, pixels_to_grid(net, x[:200]))
    lo, hi = net.output_range
    assert out.min() >= lo and out.max() <= hi
    if "fashion" not in path.name:
        assert (out.argmax(1) == y[:200]).mean() > 0.6  # every MNIST benchmark net is a working classifier


def test_p1_6_quantized_weight_ranges_match_about():
    net = load_qvip_h5(P1_6)
    w0 = net.layers[0].weight
    b0 = net.layers[0].bias // 2**9
    assert (w0.min(), w0.max()) == (-32, 31)
    assert b0.min() >= -11 and b0.max() <= 22


def test_bad_h5_file_is_a_located_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match="bad.h5"):
        load_qvip_h5(bad, bits=6, input_bits=8)
    with pytest.raises(ModelError, match="bit widths"):
        load_qvip_h5(bad)
