"""Data loaders: IDX (gz or not), Keras npz, CIFAR-10 python batches, npz, bundled sets; no downloads."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

from qverify.train.data import DataError, load_dataset, load_idx
from tests.fixtures import MNIST1000


def _idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_and_pair(tmp_path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 5, 4)).astype(np.uint8)
    y = rng.integers(0, 10, size=7).astype(np.uint8)
    for name, a in (("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)):
        data = _idx_bytes(a)
        if gz:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (tmp_path / name).write_bytes(data)
    ds = load_dataset(f"idx:{tmp_path}:test")
    assert ds.images.shape == (7, 1, 5, 4) and np.array_equal(ds.images[:, 0], x)
    assert np.array_equal(ds.labels, y) and ds.input_hi == 255
    suffix = ".gz" if gz else ""
    pair = load_dataset(f"idx:{tmp_path}/t10k-images-idx3-ubyte{suffix},{tmp_path}/t10k-labels-idx1-ubyte{suffix}")
    assert np.array_equal(pair.images, ds.images)
    with pytest.raises(DataError):
        load_dataset(f"idx:{tmp_path}:train")


def test_idx_rejects_bad_files(tmp_path) -> None:
    p = tmp_path / "bad"
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # says 5 bytes, holds 3
    with pytest.raises(DataError):
        load_idx(p)
    p.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError):
        load_idx(p)


def test_keras_npz(tmp_path) -> None:
    rng = np.random.default_rng(1)
    p = tmp_path / "mnist.npz"
    np.savez(p, x_train=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), y_train=np.arange(6),
             x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), y_test=np.arange(3))
    assert load_dataset(f"keras-npz:{p}").images.shape == (6, 1, 28, 28)
    te = load_dataset(f"keras-npz:{p}:test")
    assert te.images.shape == (3, 1, 28, 28) and te.labels.tolist() == [0, 1, 2]


def test_cifar10_batches(tmp_path) -> None:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [3, 1, 4, 1]}, f)
    ds = load_dataset(f"cifar10:{tmp_path}:test")
    assert ds.images.shape == (4, 3, 32, 32)
    assert np.array_equal(ds.images[0, 0].ravel(), data[0, :1024])  # channel-major rows
    assert ds.labels.tolist() == [3, 1, 4, 1]
    with pytest.raises(DataError):
        load_dataset(f"cifar10:{tmp_path}")


def test_npz_hwc_to_chw(tmp_path) -> None:
    x = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    p = tmp_path / "c.npz"
    np.savez(p, images=x, labels=np.arange(5))
    ds = load_dataset(f"npz:{p}")
    assert ds.images.shape == (5, 3, 32, 32) and np.array_equal(ds.images[2, 1], x[2, :, :, 1])


def test_bundled_sets() -> None:
    d = load_dataset("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.input_hi == 16 and d.images.max() == 16
    m = load_dataset("mnist-5k")
    assert m.images.shape == (5000, 1, 28, 28) and m.input_hi == 255 and sorted(set(m.labels)) == list(range(10))


@pytest.mark.skipif(not MNIST1000.exists(), reason="../shared/data not available")
def test_shared_mnist() -> None:
    ds = load_dataset(f"npz:{MNIST1000}")
    assert ds.images.shape == (1000, 1, 28, 28) and ds.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_unknown_spec() -> None:
    with pytest.raises(DataError):
        load_dataset("imagenet")
    with pytest.raises(DataError):
        load_dataset("npz:/nonexistent/file.npz")
