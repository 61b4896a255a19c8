"""Grayscale 32×32 patches of three images that matplotlib ships as sample data, for the fifth trained testbed
(``mpl_unet``), a network held out from policy training.

``matplotlib.cbook.get_sample_data`` reads files inside the matplotlib package (no download).  Three unlike
images are used, at native resolution:

* ``jacksboro_fault_dem.npz``: a digital elevation model (344×403 heights in metres, USGS), terrain with the
  steep, roughly power-law spectrum of landscapes (Mandelbrot 1982, "The Fractal Geometry of Nature");
* ``s1045.ima.gz``: an MRI slice of a head (256×256, 16-bit big-endian, values 0–215);
* ``grace_hopper.jpg``: a portrait photograph (600×512, colour; luminance by ITU-R BT.601 weights).

Each is scaled to [−1, 1] by its own minimum and maximum.  Splits and crops are those of :mod:`.patch_sets`: the
first 80 % of each image's columns for training, the rest for the "test" patches (stride-8 lattice).
"""
from __future__ import annotations

import gzip
from functools import lru_cache

import numpy as np
import torch

from .patch_sets import PATCH, lattice_patches, random_crops

#: The matplotlib sample-data files used, in this order.
SAMPLE_FILES = ("jacksboro_fault_dem.npz", "s1045.ima.gz", "grace_hopper.jpg")
#: Lattice stride of :func:`load_mpl_patches`.
LATTICE_STRIDE = 8


def _read(name: str) -> np.ndarray:
    """One sample-data file as a 2-D float64 array (see the module doc for each)."""
    from matplotlib import cbook
    path = cbook.get_sample_data(name, asfileobj=False)
    if name.endswith(".npz"):
        with np.load(path) as data:
            return np.asarray(data["elevation"], dtype=np.float64)
    if name.endswith(".ima.gz"):
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), dtype=">u2").reshape(256, 256).astype(np.float64)
    from PIL import Image
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])


@lru_cache(maxsize=1)
def mpl_images() -> tuple[torch.Tensor, ...]:
    """The three images of :data:`SAMPLE_FILES`, each scaled to [−1, 1] by its range: float32 [H, W] each."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the mpl testbed needs matplotlib's bundled sample data: pip install matplotlib pillow") from e
    out = []
    for name in SAMPLE_FILES:
        image = _read(name)
        lo, hi = float(image.min()), float(image.max())
        if image.ndim != 2 or min(image.shape) < 4 * PATCH or not hi > lo:
            raise RuntimeError(f"unexpected matplotlib sample data {name!r}: shape {image.shape}, range {lo}–{hi}")
        out.append(torch.from_numpy(2.0 * (image - lo) / (hi - lo) - 1.0).to(torch.float32).contiguous())
    return tuple(out)


def load_mpl_patches(split: str = "train") -> torch.Tensor:
    """All 32×32 patches of ``split`` on a stride-8 lattice, every image: float32 [N, 1, 32, 32] in [−1, 1].
    Deterministic."""
    return lattice_patches(mpl_images(), split, LATTICE_STRIDE)


def random_mpl_crops(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` training crops [n, 1, 32, 32] of the train columns (:func:`.patch_sets.random_crops`)."""
    return random_crops(mpl_images(), n, generator)


__all__ = ["SAMPLE_FILES", "load_mpl_patches", "mpl_images", "random_mpl_crops"]
