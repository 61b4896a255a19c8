"""Patches of a few grayscale images, split by column: the data of the unconditional trained testbeds that are not
the photo testbed (:mod:`.skimage_data`, :mod:`.mpl_data`).

Each image's first :data:`TRAIN_SHARE` of its columns is the "train" split and the rest the "test" split, so that
no pixel is in both.  :func:`lattice_patches` returns a split's 32×32 patches on a lattice (deterministic);
:func:`random_crops` draws training crops: an image (uniformly), a position inside its train columns, and a
horizontal flip with probability 1/2 (the augmentation of the photo testbed, :mod:`.photo_data`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

#: Side of a patch (the UNet testbeds' image size).
PATCH = 32
#: Share of each image's columns in the train split (the rest is the test split).
TRAIN_SHARE = 0.8


def split_columns(image: torch.Tensor, split: str) -> tuple[int, int]:
    """The [start, stop) columns of ``split`` ("train" or "test") in ``image`` [H, W]."""
    cut = int(image.shape[1] * TRAIN_SHARE)
    if split == "train":
        return 0, cut
    if split == "test":
        return cut, image.shape[1]
    raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'")


def lattice_patches(images: Sequence[torch.Tensor], split: str, stride: int) -> torch.Tensor:
    """All 32×32 patches of ``split`` of every image [H, W] on a lattice of ``stride`` pixels: float32
    [N, 1, 32, 32], image by image, row by row."""
    patches = []
    for image in images:
        lo, hi = split_columns(image, split)
        tiles = image[:, lo:hi].unfold(0, PATCH, stride).unfold(1, PATCH, stride)   # [R, C, 32, 32]
        patches.append(tiles.reshape(-1, PATCH, PATCH))
    return torch.cat(patches)[:, None].contiguous()


def random_crops(images: Sequence[torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` training crops [n, 1, 32, 32]: an image, a position inside its train columns and a horizontal flip
    with probability 1/2, all drawn from ``generator``."""
    which = torch.randint(0, len(images), (n,), generator=generator).tolist()
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64).tolist()
    flip = torch.rand(n, generator=generator) < 0.5
    crops = []
    for w, (ur, uc) in zip(which, u):
        image = images[w]
        lo, hi = split_columns(image, "train")
        r = int(ur * (image.shape[0] - PATCH + 1))
        c = lo + int(uc * (hi - lo - PATCH + 1))
        crops.append(image[r:r + PATCH, c:c + PATCH])
    out = torch.stack(crops)
    out[flip] = out[flip].flip(-1)
    return out[:, None].contiguous()


__all__ = ["PATCH", "TRAIN_SHARE", "lattice_patches", "random_crops", "split_columns"]
