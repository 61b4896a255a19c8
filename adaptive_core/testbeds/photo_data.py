"""Grayscale patches of the two photographs bundled with scikit-learn, for the second trained testbed.

``sklearn.datasets.load_sample_images()`` ships two 427×640 colour photographs (``china.jpg``, ``flower.jpg``).
Each is turned to luminance (ITU-R BT.601 weights 0.299, 0.587, 0.114), averaged over 2×2 blocks (213×320) and
scaled to [−1, 1] (x/127.5 − 1).  Patches are 32×32, the MNIST testbed's size, so the same UNet fits them.
Unlike MNIST digits (sparse strokes on a flat background), photo patches have the roughly power-law spectrum of
natural images (Field 1987, "Relations between the statistics of natural images and the response properties of
cortical cells"), the regime latent diffusion models sample in.

Splits, by column of the downsampled photo so that no pixel is in both: "train" is columns 0–239, "test" is
columns 256–319.  :func:`load_photo_patches` returns the patches of a split on a stride-4 lattice (deterministic);
:func:`random_photo_crops` draws training crops at any position of the train columns, horizontally flipped with
probability 1/2.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

#: Side of a patch (the UNet testbeds' image size).
PATCH = 32
#: Columns of the 2×-downsampled photos in each split: [start, stop).
SPLIT_COLUMNS = {"train": (0, 240), "test": (256, 320)}
#: Lattice stride of :func:`load_photo_patches`.
LATTICE_STRIDE = 4


@lru_cache(maxsize=1)
def photos() -> torch.Tensor:
    """The two bundled photographs as luminance in [−1, 1], 2×2-averaged: float32 [2, 213, 320]."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the photo testbed needs scikit-learn's bundled sample images: pip install scikit-learn "
                          "pillow") from e
    images = np.asarray(load_sample_images().images, dtype=np.float64)   # [2, 427, 640, 3]
    if images.shape != (2, 427, 640, 3):
        raise RuntimeError(f"unexpected scikit-learn sample images: shape {images.shape}")
    luma = images @ np.array([0.299, 0.587, 0.114])
    h, w = luma.shape[1] // 2 * 2, luma.shape[2] // 2 * 2
    luma = luma[:, :h, :w].reshape(2, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return torch.from_numpy(luma / 127.5 - 1.0).to(torch.float32).contiguous()


def _columns(split: str) -> tuple[int, int]:
    if split not in SPLIT_COLUMNS:
        raise ValueError(f"unknown split {split!r}: expected one of {tuple(SPLIT_COLUMNS)}")
    return SPLIT_COLUMNS[split]


def load_photo_patches(split: str = "train") -> torch.Tensor:
    """All 32×32 patches of ``split`` on a stride-4 lattice, both photos: float32 [N, 1, 32, 32] in [−1, 1]
    (train: 4876 patches, test: 828).  Deterministic."""
    lo, hi = _columns(split)
    region = photos()[:, :, lo:hi]
    patches = region.unfold(1, PATCH, LATTICE_STRIDE).unfold(2, PATCH, LATTICE_STRIDE)   # [2, R, C, 32, 32]
    return patches.reshape(-1, 1, PATCH, PATCH).contiguous()


def random_photo_crops(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` training crops [n, 1, 32, 32]: a photo, a position inside the train columns, a horizontal flip with
    probability 1/2, all drawn from ``generator``."""
    lo, hi = _columns("train")
    base = photos()
    which = torch.randint(0, base.shape[0], (n,), generator=generator)
    rows = torch.randint(0, base.shape[1] - PATCH + 1, (n,), generator=generator)
    cols = torch.randint(lo, hi - PATCH + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([base[w, r:r + PATCH, c:c + PATCH] for w, r, c in zip(which.tolist(), rows.tolist(),
                                                                         cols.tolist())])
    out[flip] = out[flip].flip(-1)
    return out[:, None].contiguous()


__all__ = ["PATCH", "SPLIT_COLUMNS", "load_photo_patches", "photos", "random_photo_crops"]
