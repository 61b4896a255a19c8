"""Grayscale 32×32 patches of scikit-image's sample photographs and textures, for the fourth trained testbed
(``skimage_unet``), a network held out from policy training.

``skimage.data`` ships a few images inside the wheel (no download).  Ten are used, at their native resolution:
five photographs (``camera``, ``astronaut``, ``coffee``, ``chelsea``, ``rocket``), three textures (``brick``,
``grass``, ``gravel``), a telescope image (``moon``) and a scan (``coins``).  Colour images are turned to luminance
(ITU-R BT.601 weights 0.299, 0.587, 0.114) and all are scaled to [−1, 1] (x/127.5 − 1).  Unlike the photo testbed
(:mod:`.photo_data`: two photographs, 2×2-averaged) the patches are not downsampled, so they mix smooth regions
of photographs with the fine, rough detail of the textures: another spectrum and another imperfect network for
checking that a step policy carries over (the "other data" a plug-in meets; Field 1987 on natural-image spectra).

Splits, by column of each image so that no pixel is in both: "train" is the first 80 % of the columns, "test" the
rest.  :func:`load_skimage_patches` returns the patches of a split on a stride-16 lattice (deterministic);
:func:`random_skimage_crops` draws training crops: an image (uniformly), a position inside its train columns, and a
horizontal flip with probability 1/2.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

#: Side of a patch (the UNet testbeds' image size).
PATCH = 32
#: The ``skimage.data`` images used, in this order.
IMAGE_NAMES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "moon", "coins")
#: Share of each image's columns in the train split (the rest is the test split).
TRAIN_SHARE = 0.8
#: Lattice stride of :func:`load_skimage_patches`.
LATTICE_STRIDE = 16


@lru_cache(maxsize=1)
def skimage_images() -> tuple[torch.Tensor, ...]:
    """The ten images of :data:`IMAGE_NAMES` as luminance in [−1, 1]: float32 [H, W] each (sizes differ)."""
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the skimage testbed needs scikit-image's bundled sample images: pip install "
                          "scikit-image") from e
    out = []
    for name in IMAGE_NAMES:
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if image.ndim == 3:
            image = image[..., :3] @ np.array([0.299, 0.587, 0.114])
        if image.ndim != 2 or min(image.shape) < 4 * PATCH:
            raise RuntimeError(f"unexpected scikit-image sample image {name!r}: shape {image.shape}")
        out.append(torch.from_numpy(image / 127.5 - 1.0).to(torch.float32).contiguous())
    return tuple(out)


def _columns(image: torch.Tensor, split: str) -> tuple[int, int]:
    """The [start, stop) columns of ``split`` in ``image``."""
    cut = int(image.shape[1] * TRAIN_SHARE)
    if split == "train":
        return 0, cut
    if split == "test":
        return cut, image.shape[1]
    raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'")


def load_skimage_patches(split: str = "train") -> torch.Tensor:
    """All 32×32 patches of ``split`` on a stride-16 lattice, every image: float32 [N, 1, 32, 32] in [−1, 1]
    (train: 6598 patches, test: 1368).  Deterministic."""
    patches = []
    for image in skimage_images():
        lo, hi = _columns(image, split)
        region = image[:, lo:hi]
        tiles = region.unfold(0, PATCH, LATTICE_STRIDE).unfold(1, PATCH, LATTICE_STRIDE)   # [R, C, 32, 32]
        patches.append(tiles.reshape(-1, PATCH, PATCH))
    return torch.cat(patches)[:, None].contiguous()


def random_skimage_crops(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` training crops [n, 1, 32, 32]: an image, a position inside its train columns, a horizontal flip with
    probability 1/2, all drawn from ``generator``."""
    images = skimage_images()
    which = torch.randint(0, len(images), (n,), generator=generator).tolist()
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64).tolist()
    flip = torch.rand(n, generator=generator) < 0.5
    crops = []
    for w, (ur, uc) in zip(which, u):
        image = images[w]
        lo, hi = _columns(image, "train")
        r = int(ur * (image.shape[0] - PATCH + 1))
        c = lo + int(uc * (hi - lo - PATCH + 1))
        crops.append(image[r:r + PATCH, c:c + PATCH])
    out = torch.stack(crops)
    out[flip] = out[flip].flip(-1)
    return out[:, None].contiguous()


__all__ = ["IMAGE_NAMES", "PATCH", "TRAIN_SHARE", "load_skimage_patches", "random_skimage_crops",
           "skimage_images"]
