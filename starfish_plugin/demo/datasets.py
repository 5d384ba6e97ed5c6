"""Real image data that works offline: Fashion-MNIST (Debian package) and scikit-learn's digits."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from starfish_plugin.errors import DemoError

FASHION_MNIST_DIRS = (
    os.environ.get("STARFISH_FASHION_MNIST", ""),
    "/usr/share/datasets/fashion-mnist",
)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def fashion_mnist_root() -> Path | None:
    """Return the folder holding Fashion-MNIST's IDX files, or ``None`` if it is not installed."""
    for folder in FASHION_MNIST_DIRS:
        if folder and Path(folder, "t10k-labels-idx1-ubyte.gz").exists():
            return Path(folder)
        if folder and Path(folder, "t10k-labels-idx1-ubyte").exists():
            return Path(folder)
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise DemoError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split as normalized ``[N, 1, 28, 28]`` float images and int64 labels.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: folder with the IDX files; defaults to Debian's ``dataset-fashion-mnist`` location.
    """
    if split not in _FILES:
        raise DemoError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else fashion_mnist_root()
    if folder is None:
        raise FileNotFoundError(
            "Fashion-MNIST is not installed; run `apt-get install -y dataset-fashion-mnist` "
            "or set STARFISH_FASHION_MNIST to a folder with the IDX files"
        )
    arrays = []
    for stem in _FILES[split]:
        path = folder / f"{stem}.gz"
        arrays.append(_read_idx(path if path.exists() else folder / stem))
    images = torch.from_numpy(arrays[0].copy()).float().div_(255.0).unsqueeze(1)
    images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return images, torch.from_numpy(arrays[1].astype(np.int64))


def load_digits_split(seed: int = 0, n_test: int = 597) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 1,797 8x8 digits as ``[N, 1, 8, 8]`` images in [0, 1], split train/test.

    The split is a fixed permutation drawn from ``seed``; the test part has ``n_test`` images.
    """
    from starfish_plugin.extras import need

    digits = need("sklearn.datasets", "the digits data (scikit-learn)").load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
