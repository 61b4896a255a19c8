"""Grayscale 32×32 patches of scikit-image's sample photographs and textures, for the fourth trained testbed
(``skimage_unet``), a network held out from policy training.

``skimage.data`` ships a few images inside the wheel (no download).  Ten are used, at their native resolution:
five photographs (``camera``, ``astronaut``, ``coffee``, ``chelsea``, ``rocket``), three textures (``brick``,
``grass``, ``gravel``), a telescope image (``moon``) and a scan (``coins``).  Colour images are turned to luminance
(ITU-R BT.601 weights 0.299, 0.587, 0.114) and all are scaled to [−1, 1] (x/127.5 − 1).  Unlike the photo testbed
(:mod:`.photo_data`: two photographs, 2×2-averaged) the patches are not downsampled, so they mix smooth regions
of photographs with the fine, rough detail of the textures: another spectrum and another imperfect network for
checking that a step policy carries over (the "other data" a plug-in meets; Field 1987 on natural-image spectra).

Splits, by column of each image (:mod:`.patch_sets`): "train" is the first 80 % of the columns, "test" the rest.
:func:`load_skimage_patches` returns the patches of a split on a stride-16 lattice (deterministic);
:func:`random_skimage_crops` draws training crops with horizontal flips.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .patch_sets import PATCH, lattice_patches, random_crops

#: The ``skimage.data`` images used, in this order.
IMAGE_NAMES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "moon", "coins")
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


def load_skimage_patches(split: str = "train") -> torch.Tensor:
    """All 32×32 patches of ``split`` on a stride-16 lattice, every image: float32 [N, 1, 32, 32] in [−1, 1]
    (train: 6598 patches, test: 1368).  Deterministic."""
    return lattice_patches(skimage_images(), split, LATTICE_STRIDE)


def random_skimage_crops(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` training crops [n, 1, 32, 32] of the train columns (:func:`.patch_sets.random_crops`)."""
    return random_crops(skimage_images(), n, generator)


__all__ = ["IMAGE_NAMES", "load_skimage_patches", "random_skimage_crops", "skimage_images"]
