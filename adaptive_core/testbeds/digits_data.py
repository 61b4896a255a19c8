"""scikit-learn's 8×8 handwritten digits, upsampled to 32×32, for the third trained testbed (``digits_unet``).

``sklearn.datasets.load_digits()`` ships 1797 images of 8×8 pixels with 17 grey levels (0–16), labels 0–9 (the UCI
"optical recognition of handwritten digits" set).  They are scaled to [−1, 1] (x/8 − 1, background −1) and
upsampled ×4 bilinearly to 32×32, so they are smooth, low-detail digits that fill the frame: a distribution unlike
MNIST's sharp 28×28 strokes on a padded background, for a network that no policy was trained on.
Splits: "train" is images 0–1439, "test" images 1440–1796 (the file's order cycles through the classes).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

#: Split names and their image index ranges [start, stop).
SPLITS = {"train": (0, 1440), "test": (1440, 1797)}
#: Side of the returned images.
IMAGE_SIZE = 32


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images as float32 [1797, 1, 32, 32] in [−1, 1] and their labels int64 [1797]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits testbed needs scikit-learn's bundled digits: pip install scikit-learn") from e
    d = load_digits()
    images, labels = np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64)
    if images.shape != (1797, 8, 8):
        raise RuntimeError(f"unexpected scikit-learn digits: shape {images.shape}")
    x = torch.from_numpy(images / 8.0 - 1.0).to(torch.float32)[:, None]
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).contiguous(), torch.from_numpy(labels)


def load_digits_images(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 32, 32] in [−1, 1], labels int64 [N]) of ``split`` ("train": 1440, "test": 357)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {tuple(SPLITS)}")
    lo, hi = SPLITS[split]
    images, labels = _all_digits()
    return images[lo:hi], labels[lo:hi]


__all__ = ["IMAGE_SIZE", "SPLITS", "load_digits_images"]
