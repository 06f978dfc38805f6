import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings

from qverify.execute import execute
from qverify.io import load_model, save_model
from qverify.network import ModelError
from tests.fixtures import tiny_networks


@given(tiny_networks())
@settings(max_examples=30, deadline=None)
def test_round_trip_is_exact(tmp_path_factory, net):
    path = tmp_path_factory.mktemp("n") / "m.qnn"
    save_model(net, path)
    back = load_model(path)
    assert back.input_shape == net.input_shape and back.shapes == net.shapes
    rng = np.random.default_rng(0)
    x = rng.integers(net.input_lo, net.input_hi + 1, size=(5, *net.input_shape))
    for a, b in zip(execute(net, x), execute(back, x), strict=True):
        assert np.array_equal(a, b)
    for la, lb in zip(net.layers, back.layers, strict=True):
        assert type(la) is type(lb) and getattr(la, "name", "") == getattr(lb, "name", "")


def _rewrite(path, out, fn):
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    m = json.loads(files["manifest.json"])
    fn(m, files)
    files["manifest.json"] = json.dumps(m).encode()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)


def test_errors_name_file_and_field(tmp_path):
    from tests.fixtures import tiny_fixed_point_mlp

    p = tmp_path / "m.qnn"
    save_model(tiny_fixed_point_mlp(), p)
    bad = tmp_path / "bad.qnn"
    _rewrite(p, bad, lambda m, f: m["layers"][1].pop("lo"))
    with pytest.raises(ModelError, match=r"bad.qnn: layers\[1\]: missing field 'lo'"):
        load_model(bad)
    _rewrite(p, bad, lambda m, f: m.update(format_version=99))
    with pytest.raises(ModelError, match="format_version 99"):
        load_model(bad)
    _rewrite(p, bad, lambda m, f: m["layers"][0].update(kind="Magic"))
    with pytest.raises(ModelError, match=r"layers\[0\].*unknown layer kind 'Magic'"):
        load_model(bad)
    _rewrite(p, bad, lambda m, f: f.pop(m["layers"][0]["weight"]))
    with pytest.raises(ModelError, match=r"layers\[0\].weight: array .* missing"):
        load_model(bad)
    (tmp_path / "junk.qnn").write_text("hello")
    with pytest.raises(ModelError, match="junk.qnn: not a qverify model archive"):
        load_model(tmp_path / "junk.qnn")


def test_pickled_arrays_are_refused(tmp_path):
    import io

    from tests.fixtures import tiny_fixed_point_mlp

    p = tmp_path / "m.qnn"
    save_model(tiny_fixed_point_mlp(), p)
    bad = tmp_path / "pickle.qnn"

    def poison(m, f):
        buf = io.BytesIO()
        np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        f[m["layers"][0]["weight"]] = buf.getvalue()

    _rewrite(p, bad, poison)
    with pytest.raises(ModelError, match="unreadable array"):
        load_model(bad)
