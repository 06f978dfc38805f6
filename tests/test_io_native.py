import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings

from qverify.execute import execute
from qverify.io import load_model, save_model
from qverify.network import ModelError
from tests.fixtures import graph_networks, tiny_networks


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


@given(graph_networks(n_blocks=3))
@settings(max_examples=25, deadline=None)
def test_graph_round_trip_is_exact(tmp_path_factory, net):
    """A graph (branches, every graph op) is written as version 3 with each layer's inputs, and reads back to the
    same function, the same edges and the same ops."""
    path = tmp_path_factory.mktemp("g") / "g.qnn"
    save_model(net, path)
    with zipfile.ZipFile(path) as z:
        m = json.loads(z.read("manifest.json"))
    assert m["format_version"] == (3 if not net.is_chain else m["format_version"])
    back = load_model(path)
    assert back.inputs == net.inputs and back.shapes == net.shapes
    x = np.random.default_rng(1).integers(net.input_lo, net.input_hi + 1, size=(6, *net.input_shape))
    for a, b in zip(execute(net, x), execute(back, x), strict=True):
        assert np.array_equal(a, b)
    assert [type(la) for la in net.layers] == [type(lb) for lb in back.layers]


def test_graph_ops_need_version_3(tmp_path):
    """An older version's file that names a graph op or edges is refused, never read as something else."""
    import numpy as np

    from qverify.network import Add, Dense, QNetwork

    net = QNetwork((2,), 0, 3, (Dense(np.eye(2, dtype=np.int64), np.zeros(2, np.int64)), Add((1, 1))),
                   inputs=((0,), (0, 1)))
    path = tmp_path / "g.qnn"
    save_model(net, path)
    bad = tmp_path / "bad.qnn"
    _rewrite(path, bad, lambda m, files: m.update(format_version=1))
    with pytest.raises(ModelError, match=r"layers\[0\].*'inputs' and 'groups' need format_version 3"):
        load_model(bad)
    _rewrite(path, bad, lambda m, files: (m.update(format_version=2), [d.pop("inputs") for d in m["layers"]]))
    with pytest.raises(ModelError, match=r"layers\[1\] \(Add\).*version-3 op in a version-2 file"):
        load_model(bad)
    _rewrite(path, bad, lambda m, files: m["layers"][1].update(inputs=[0, 5]))
    with pytest.raises(ModelError, match="must be earlier values"):
        load_model(bad)


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


@given(tiny_networks(float32=True))
@settings(max_examples=20, deadline=None)
def test_float32_round_trip_keeps_the_semantics(tmp_path_factory, net):
    """onnxruntime's float32 requantizations survive save/load bit for bit (format version 2), and so does
    ``metadata["semantics"]``; exact networks are still written as version 1."""
    from dataclasses import replace

    net = replace(net, metadata={"semantics": "onnxruntime"})
    path = tmp_path_factory.mktemp("n") / "m.qnn"
    save_model(net, path)
    with zipfile.ZipFile(path) as z:
        m = json.loads(z.read("manifest.json"))
    assert m["format_version"] == 2 and all("float32_scale" in d for d in m["layers"] if d["kind"] == "Requantize")
    back = load_model(path)
    assert back.semantics == "onnxruntime" and back.metadata["semantics"] == "onnxruntime"
    for la, lb in zip(net.layers, back.layers, strict=True):
        assert getattr(la, "float32_scale", None) == getattr(lb, "float32_scale", None)
    x = np.random.default_rng(0).integers(net.input_lo, net.input_hi + 1, size=(20, *net.input_shape))
    for a, b in zip(execute(net, x), execute(back, x), strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(ModelError, match="semantics is 'onnxruntime'"):
        load_model(path, semantics="exact")
    assert load_model(path, semantics="onnxruntime").semantics == "onnxruntime"


def test_float32_scale_errors_name_the_field(tmp_path):
    from tests.fixtures import random_dense_network, tiny_fixed_point_mlp

    p = tmp_path / "e.qnn"
    save_model(tiny_fixed_point_mlp(), p)
    with zipfile.ZipFile(p) as z:
        assert json.loads(z.read("manifest.json"))["format_version"] == 1
    p = tmp_path / "m.qnn"
    save_model(random_dense_network(np.random.default_rng(0), float32=True), p)
    bad = tmp_path / "bad.qnn"
    _rewrite(p, bad, lambda m, f: m["layers"][1].update(float32_scale=["0x1.8p+999999"]))
    with pytest.raises(ModelError, match=r"bad.qnn: layers\[1\] \(Requantize\)"):
        load_model(bad)
    _rewrite(p, bad, lambda m, f: m["layers"][1].update(float32_scale=[0.5]))
    with pytest.raises(ModelError, match=r"layers\[1\].*hexadecimal"):
        load_model(bad)
    _rewrite(p, bad, lambda m, f: m["layers"][1].update(float32_scale=["0x1.0p-1"]))  # not the stored multiplier
    with pytest.raises(ModelError, match=r"layers\[1\].*exact values of float32_scale"):
        load_model(bad)


# ---------------------------------------------------------------------------------------------- fuzzer regressions
def _saved(tmp_path):
    from tests.fixtures import tiny_fixed_point_mlp

    p = tmp_path / "m.qnn"
    save_model(tiny_fixed_point_mlp(), p)
    return p


def _corrupt_member(path, out, member, offset, compression):
    """Rewrite ``path`` with ``compression`` and xor one byte of ``member``'s stored data."""
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(out, "w", compression=compression) as z:
        for n, b in files.items():
            z.writestr(n, b)
    data = bytearray(out.read_bytes())
    with zipfile.ZipFile(out) as z:
        info = z.getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + offset] ^= 0x5A
    out.write_bytes(bytes(data))


@pytest.mark.parametrize("compression, offset", [(zipfile.ZIP_STORED, 40), (zipfile.ZIP_DEFLATED, 2),
                                                 (zipfile.ZIP_STORED, -3), (zipfile.ZIP_STORED, -49)],
                         ids=["bad-crc", "bad-deflate", "header-name-differs", "bad-header-magic"])
def test_corrupt_zip_members_name_the_member(tmp_path, compression, offset):
    """A flipped byte inside a member or its local header raised zipfile.BadZipFile (bad CRC, names that differ,
    bad magic number) or zlib.error."""
    p, bad = _saved(tmp_path), tmp_path / "bad.qnn"
    _corrupt_member(p, bad, "arrays/0_weight.npy", offset, compression)
    with pytest.raises(ModelError, match=r"bad\.qnn: layers\[0\]\.weight: zip member 'arrays/0_weight\.npy' is "
                                         r"unreadable"):
        load_model(bad)


@pytest.mark.parametrize("manifest, message", [
    (b"\xe9t\xe9", r"manifest\.json byte 0: not UTF-8"),  # json.loads guessed UTF-16 and raised UnicodeDecodeError
    (b"[" * 100_000, r"manifest\.json (is nested too deeply|line 1 column)"),
    (b"[1, 2]", r"manifest\.json must be a JSON object, got list"),  # AttributeError: 'list' has no 'get'
])
def test_malformed_manifests_are_model_errors(tmp_path, manifest, message):
    p, bad = _saved(tmp_path), tmp_path / "bad.qnn"
    _rewrite(p, bad, lambda m, f: None)
    with zipfile.ZipFile(bad) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files["manifest.json"] = manifest
    with zipfile.ZipFile(bad, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    with pytest.raises(ModelError, match=rf"bad\.qnn: {message}"):
        load_model(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["layers"][1].update(lo=2.0), r"layers\[1\]\.lo: expected an integer, got float 2\.0"),
    (lambda m: m["layers"][1].update(hi=True), r"layers\[1\]\.hi: expected an integer, got bool True"),
    (lambda m: m["layers"][1].update(lo="0"), r"layers\[1\]\.lo: expected an integer, got str '0'"),
    (lambda m: m["layers"][1].update(hi=2**60), r"layers\[1\]\.hi: \d+ is out of range \(\|value\| < 2\^53\)"),
    (lambda m: m.update(input_hi=1e308), r"manifest\.input_hi: expected an integer"),  # OverflowError in QNetwork
    (lambda m: m.update(input_shape=[2.0]), r"manifest\.input_shape: expected a list of some integers"),
    (lambda m: m.update(input_shape=[0]), r"manifest\.input_shape: expected positive dimensions"),
    (lambda m: m["layers"][0].update(name=5), r"layers\[0\]\.name: expected a string, got int 5"),
    (lambda m: m.update(metadata={"a": 1}), r"manifest\.metadata: expected an object of strings"),
    (lambda m: m.update(layers=7), r"manifest\.layers: expected a list of layers, got int 7"),  # TypeError
    (lambda m: m["layers"].__setitem__(0, 3.5), r"layers\[0\]: expected a JSON object, got float"),  # TypeError
    (lambda m: m.update(format_version=0), r"format_version 0 is not supported"),
    (lambda m: m.update(format_version=True), r"format_version True is not supported"),
    (lambda m: m.update(input_scale="1e-99999999"), r"manifest\.input_scale: expected an exact rational"),  # a hang
    (lambda m: m.update(output_scale="1/0"), r"manifest\.output_scale: '1/0' divides by zero"),
    (lambda m: m["layers"][1].update(multiplier=["nan"]), r"layers\[1\]\.multiplier\[0\]: expected an exact"),
])
def test_type_breaking_fields_are_refused_by_name(tmp_path, edit, message):
    """Each of these was read as another value (``2.0`` as 2, ``true`` as 1, ``"0"`` as 0), crashed with a
    TypeError/AttributeError/OverflowError, or (``1e-99999999``) ran for minutes."""
    p, bad = _saved(tmp_path), tmp_path / "bad.qnn"
    _rewrite(p, bad, lambda m, f: edit(m))
    with pytest.raises(ModelError, match=rf"bad\.qnn: {message}"):
        load_model(bad)


def _npy(a, allow_pickle=False):
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("member, data, message", [
    # uint64 values beyond int64 wrapped to negative weights
    ("weight", _npy(np.array([[2**63 + 5, 1], [1, 1]], dtype=np.uint64)), "holds values beyond int64"),
    ("weight", _npy(np.array([[0.5, 1.0], [1.0, 1.0]])), "must hold integers, got dtype float64"),
    ("weight", _npy(np.ones((2, 2), dtype=bool)), "must hold integers, got dtype bool"),
    ("weight", _npy(np.ones((2, 2), dtype="datetime64[s]")), "must hold integers"),
    ("weight", _npy(np.ones((1, 2, 2), dtype=np.int64)), "has 3 dimensions \\(expected 2\\)"),
    ("weight", _npy(np.ones((2, 2), dtype=np.int64))[:-3], "unreadable array .*expected 32 bytes got 29"),
    ("weight", b"", "unreadable array .*EOFError"),  # np.load's EOFError escaped
    ("zero_point", _npy(np.zeros((1, 1), dtype=np.int64)), "has 2 dimensions \\(expected 0 or 1\\)"),
], ids=["uint64-beyond-int64", "float", "bool", "datetime", "rank-3-weight", "truncated", "empty", "rank-2-zp"])
def test_bad_arrays_are_refused_by_name(tmp_path, member, data, message):
    """``zero_point`` of rank 2 loaded and then crashed the executor; the others were a silent wrap or escaped."""
    p, bad = _saved(tmp_path), tmp_path / "bad.qnn"
    layer = 1 if member == "zero_point" else 0

    def put(m, f):
        f[m["layers"][layer][member]] = data

    _rewrite(p, bad, put)
    with pytest.raises(ModelError, match=rf"bad\.qnn: layers\[{layer}\]\.{member}: .*{message}"):
        load_model(bad)


def test_oversized_members_are_refused_before_reading(tmp_path, monkeypatch):
    import qverify.io.native as native

    p = _saved(tmp_path)
    monkeypatch.setattr(native, "MAX_MEMBER_BYTES", 100)
    with pytest.raises(ModelError, match=r"m\.qnn: manifest\.json: zip member 'manifest\.json' is \d+ bytes"):
        load_model(p)


@pytest.mark.parametrize("field, value", [("stride", [1.5, 1]), ("padding", [1, 1, 1]), ("dilation", "2"),
                                          ("pad_value", 0.0)])
def test_conv_fields_are_type_checked(tmp_path, field, value):
    """``stride: [1.5, 1]`` was read as ``(1, 1)``."""
    from tests.fixtures import random_conv_network

    p, bad = tmp_path / "c.qnn", tmp_path / "bad.qnn"
    save_model(random_conv_network(np.random.default_rng(0)), p)
    _rewrite(p, bad, lambda m, f: m["layers"][0].update({field: value}))
    with pytest.raises(ModelError, match=rf"bad\.qnn: layers\[0\]\.{field}: expected "):
        load_model(bad)
