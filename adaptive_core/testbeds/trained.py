"""Trained testbeds: the small UNets shipped in ``testbeds/data``.

* ``mnist_unet`` (:class:`TrainedDenoiser`): class-conditional, on MNIST digits;
* ``photo_unet`` (:class:`PhotoDenoiser`): unconditional, on 32×32 patches of two photographs
  (:mod:`.photo_data`), a second network with natural-image statistics;
* ``digits_unet`` (:class:`DigitsDenoiser`): class-conditional, on scikit-learn's 8×8 digits upsampled to 32×32
  (:mod:`.digits_data`), a third network;
* ``skimage_unet`` (:class:`SkimageDenoiser`): unconditional, a narrower UNet without attention on 32×32 patches of
  scikit-image's sample photographs and textures (:mod:`.skimage_data`), a fourth network;
* ``mpl_unet`` (:class:`MplDenoiser`): unconditional, another architecture (channels 40-64-96, a 64-wide
  embedding), on 32×32 patches of matplotlib's sample terrain, MRI slice and portrait (:mod:`.mpl_data`), a fifth.

The later ones are for checking that what was tuned on the first carries over to networks it never saw.

Unlike the analytic testbeds, their denoisers are networks (:mod:`.unet`, trained by :mod:`.train`), so the
reference is not exact: it is a fine solve of the same probability-flow ODE with this library's own
high-order integrator (:meth:`TrainedDenoiser.reference`, checked by
:meth:`TrainedDenoiser.reference_converged_check`).  It is what a real host model looks like to a sampler:
class conditioning, classifier-free guidance (Ho & Salimans 2022) counted as ComfyUI counts it (the
cond + uncond pass is one batched call of 2B samples, one NFE), float32 compute, and noise ranges of SD1.x
(ve, Karras et al. 2022 preconditioning) and SD3/Flux (flow, Lipman et al. 2023; Esser et al. 2024, with the
timestep shift).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..schedules import karras_sigmas, lambda_uniform_sigmas
from .base import Testbed
from .train import load_denoiser, weights_path
from .unet import NULL_CLASS

#: Steps of the reference solve and of its convergence check (see :meth:`TrainedDenoiser.reference`).
#: Measured on 8 seeds (labels 0–7, CFG 1), RMS gap of the λ-uniform solves 512 vs 1024 steps: ve 1.7e-5,
#: flow 4.1e-4 (outputs have RMS ≈ 0.95; ADO at 30 NFE is ≈ 1.2e-2 away).  A Karras grid converges more slowly
#: on the flow model (256 vs 512: 2.9e-3, 512 vs 1024: 1.8e-3), hence the λ-uniform grid.
REFERENCE_STEPS = 512
REFERENCE_CHECK_STEPS = 1024


class TrainedDenoiser(Testbed):
    """The MNIST UNet of ``model_type`` as a k-diffusion denoiser, with optional class labels and CFG.

    Args:
        model_type: "ve" (σ ∈ [0.0291675, 14.614642], SD1.x's range) or "flow" (σ ∈ [shift(0.001), 1]).
        shift: flow timestep shift of σ_min (SD3 uses 3.0); ignored for ve.
        labels: class ids (0–9) per sample, or None for unconditional sampling (the null class); see
            :meth:`set_labels`.
        cfg_scale: classifier-free guidance scale s: D = D_uncond + s·(D_cond − D_uncond).  1.0 is the plain
            conditional prediction (one pass of B samples); any other value runs cond and uncond as one
            batched pass of 2B samples, counted as ONE model call, as ComfyUI counts it.
        path: weights file (default: the shipped ``data/mnist_unet_{model_type}.safetensors``).

    The network runs in float32 on the input's device; the output has the input's dtype.  Convolutions of a
    batch may round differently from the same sample alone (≈1e-6 relative): per-sample results are
    batch-invariant to float32 rounding, not bit for bit.
    """

    family = "mnist_unet"
    #: The training data of the shipped weights (:data:`.train.DATASETS`).
    data = "mnist"
    #: Whether the network takes class labels (and so classifier-free guidance).
    conditional = True
    shape = (1, 32, 32)

    def __init__(self, model_type: str = "ve", shift: float = 3.0, labels=None, cfg_scale: float = 1.0,
                 path: str | Path | None = None) -> None:
        self._set_noise_range(model_type, shift)
        self.path = Path(path) if path is not None else weights_path(model_type, self.data)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.family}: no weights file {self.path}")
        self.net, self.meta = load_denoiser(self.path, torch.float32)
        if self.net.model_type != model_type:
            raise ValueError(f"{self.path} holds a {self.net.model_type!r} model, not {model_type!r}")
        if not self.conditional and float(cfg_scale) != 1.0:
            raise ValueError(f"{self.name} is unconditional: classifier-free guidance needs labels, got cfg_scale "
                             f"{cfg_scale}")
        self.cfg_scale = float(cfg_scale)
        self.set_labels(labels)
        super().__init__()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, sigma_min={self.sigma_min:.6g}, "
                f"sigma_max={self.sigma_max:.6g}, shift={self.shift}, cfg_scale={self.cfg_scale})")

    # --- conditioning -----------------------------------------------------------------------------------
    def set_labels(self, labels) -> None:
        """Class ids for the samples of the next runs (a batch of B uses ``labels[:B]``), or None = unconditional."""
        if labels is None:
            self.labels = None
            return
        if not self.conditional:
            raise ValueError(f"{self.name} is unconditional: it takes no class labels")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if labels.numel() and (labels.min() < 0 or labels.max() > NULL_CLASS):
            raise ValueError(f"labels must be class ids in 0..{NULL_CLASS} ({NULL_CLASS} = null), got {labels}")
        self.labels = labels

    def _labels_for(self, batch: int, device) -> torch.Tensor:
        if self.labels is None:
            return torch.full((batch,), NULL_CLASS, dtype=torch.long, device=device)
        if self.labels.numel() < batch:
            raise ValueError(f"{self.name}: {self.labels.numel()} labels set for a batch of {batch}")
        return self.labels[:batch].to(device)

    # --- the denoiser -----------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x, σ) of the network for x [B, 1, 32, 32] and σ [B] (one per sample), with labels and CFG."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.name}: expected samples of shape {self.shape}, got {tuple(x.shape[1:])}")
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(batch).to(torch.float32)
        self.net.to(x.device)
        xf = x.to(torch.float32)
        cond = self._labels_for(batch, x.device)
        if self.labels is None or self.cfg_scale == 1.0:
            out = self.net(xf, sigma, cond)
        else:  # Ho & Salimans 2022: one batched pass of cond and uncond
            null = torch.full_like(cond, NULL_CLASS)
            both = self.net(torch.cat([xf, xf]), torch.cat([sigma, sigma]), torch.cat([cond, null]))
            d_cond, d_uncond = both[:batch], both[batch:]
            out = d_uncond + self.cfg_scale * (d_cond - d_uncond)
        return out.to(x.dtype)

    # --- reference and data -----------------------------------------------------------------------------
    def solve(self, x: torch.Tensor, steps: int = REFERENCE_STEPS, grid: str = "lambda") -> torch.Tensor:
        """A fixed-grid solve of the probability-flow ODE from x at σ_max: ``steps`` levels to σ_min, uniform in
        half-log-SNR λ (``grid="lambda"``) or Karras ρ = 7 (``grid="karras"``), with ADO's integrator
        (DPM-Solver++(3M) + UniC, exact interpolant; Lu et al. 2022, Zhao et al. 2023), ending with D at σ_min.
        The current labels and CFG scale apply."""
        from ..sampler import sample_adaptive
        if grid == "lambda":
            sigmas = lambda_uniform_sigmas(steps, self.sigma_min, self.sigma_max, self.model_type)
        elif grid == "karras":
            sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max)
        else:
            raise ValueError(f"unknown grid {grid!r}: expected 'lambda' or 'karras'")
        nfe = self.nfe
        out = sample_adaptive(self, x, sigmas, model_type=self.model_type, mode="fixed", predictor="exact")
        self.nfe = nfe  # reference solves are not counted
        return out

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference output from x at σ_max: :meth:`solve` with :data:`REFERENCE_STEPS` steps."""
        return self.solve(x, REFERENCE_STEPS)

    def reference_converged_check(self, x: torch.Tensor, steps: int = REFERENCE_STEPS,
                                  fine_steps: int = REFERENCE_CHECK_STEPS) -> dict:
        """RMS gap between the ``steps`` and ``fine_steps`` solves from x: how far the reference is from converged."""
        coarse, fine = self.solve(x, steps), self.solve(x, fine_steps)  # the check costs steps + fine_steps calls
        gap = (coarse.double() - fine.double()).pow(2).mean().sqrt().item()
        scale = fine.double().pow(2).mean().sqrt().item()
        return {"steps": steps, "fine_steps": fine_steps, "rms_gap": gap, "rms_output": scale}

    def train_images(self) -> torch.Tensor:
        """The training images of the network, float32 [N, 1, 32, 32] in [−1, 1] (MNIST's train split)."""
        from .mnist_data import load_mnist
        return load_mnist("train")[0]

    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """n real images (float64 [n, 1, 32, 32] in [−1, 1]) drawn without replacement from :meth:`train_images`."""
        images = self.train_images()
        idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n]
        return images[idx].to(torch.float64)


class PhotoDenoiser(TrainedDenoiser):
    """The unconditional UNet trained on patches of two photographs (:mod:`.photo_data`), as a k-diffusion
    denoiser.  The same arguments as :class:`TrainedDenoiser`, except that it takes no labels and no CFG scale
    other than 1; default weights ``data/photo_unet_{model_type}.safetensors``."""

    family = "photo_unet"
    data = "photo"
    conditional = False

    def train_images(self) -> torch.Tensor:
        """The patches of the train columns on the stride-4 lattice (:func:`.photo_data.load_photo_patches`)."""
        from .photo_data import load_photo_patches
        return load_photo_patches("train")


class DigitsDenoiser(TrainedDenoiser):
    """The class-conditional UNet trained on scikit-learn's 8×8 digits upsampled to 32×32 (:mod:`.digits_data`), as
    a k-diffusion denoiser: the same arguments as :class:`TrainedDenoiser`; default weights
    ``data/digits_unet_{model_type}.safetensors``."""

    family = "digits_unet"
    data = "digits"

    def train_images(self) -> torch.Tensor:
        """The train split of :func:`.digits_data.load_digits_images`."""
        from .digits_data import load_digits_images
        return load_digits_images("train")[0]


class SkimageDenoiser(PhotoDenoiser):
    """The unconditional UNet (narrower, no attention) trained on patches of scikit-image's sample photographs and
    textures (:mod:`.skimage_data`), as a k-diffusion denoiser: the arguments of :class:`PhotoDenoiser`; default
    weights ``data/skimage_unet_{model_type}.safetensors``."""

    family = "skimage_unet"
    data = "skimage"

    def train_images(self) -> torch.Tensor:
        """The patches of the train columns on the stride-16 lattice (:func:`.skimage_data.load_skimage_patches`)."""
        from .skimage_data import load_skimage_patches
        return load_skimage_patches("train")


class MplDenoiser(PhotoDenoiser):
    """The unconditional UNet (channels 40-64-96) trained on patches of matplotlib's sample terrain, MRI slice and
    portrait (:mod:`.mpl_data`), as a k-diffusion denoiser: the arguments of :class:`PhotoDenoiser`; default weights
    ``data/mpl_unet_{model_type}.safetensors``."""

    family = "mpl_unet"
    data = "mpl"

    def train_images(self) -> torch.Tensor:
        """The patches of the train columns on the stride-8 lattice (:func:`.mpl_data.load_mpl_patches`)."""
        from .mpl_data import load_mpl_patches
        return load_mpl_patches("train")


#: Trained testbed classes by family name (the ``family`` in a weights file's metadata).
TRAINED_FAMILIES = {cls.family: cls for cls in (TrainedDenoiser, PhotoDenoiser, DigitsDenoiser, SkimageDenoiser,
                                                MplDenoiser)}


def trained_testbed(path: str | Path, **params) -> TrainedDenoiser:
    """The testbed of a weights file written by :mod:`.train` (the class named by its metadata's ``family``,
    MNIST when it names none), in the file's model type, built with ``params`` (shift, labels, cfg_scale)."""
    import json

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("ado", "null") or "null")
    if not isinstance(meta, dict) or "model_type" not in meta:
        raise ValueError(f"{path} is not a weights file written by adaptive_core.testbeds.train (no 'ado' metadata)")
    family = meta.get("family", "mnist_unet")
    if family not in TRAINED_FAMILIES:
        raise ValueError(f"{path}: unknown testbed family {family!r}; expected one of {tuple(TRAINED_FAMILIES)}")
    return TRAINED_FAMILIES[family](model_type=meta["model_type"], path=path, **params)


def sample_grid(testbed: TrainedDenoiser, path: str | Path, n: int = 16, steps: int = 30, seed: int = 0,
                cfg_scale: float = 1.0) -> torch.Tensor:
    """Sample n images (labels 0, 1, …, 9, 0, … in order on a conditional network) with ADO's integrator on a
    ``steps``-level Karras grid and save them as a PNG grid (4 per row); returns the samples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..sampler import sample_adaptive
    labels, scale = testbed.labels, testbed.cfg_scale
    if testbed.conditional:
        testbed.set_labels(torch.arange(n) % 10)
    elif cfg_scale != 1.0:
        raise ValueError(f"{testbed.name} is unconditional: no CFG scale but 1")
    testbed.cfg_scale = cfg_scale
    try:
        x = testbed.noise(range(seed, seed + n), dtype=torch.float32)
        out = sample_adaptive(testbed, x, karras_sigmas(steps, testbed.sigma_min, testbed.sigma_max),
                              model_type=testbed.model_type)
    finally:
        testbed.set_labels(labels)
        testbed.cfg_scale = scale
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.3))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(out[i, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            if testbed.conditional:
                ax.set_title(str(i % 10), fontsize=7)
    cfg_text = f", CFG {cfg_scale:g}" if testbed.conditional else ""
    fig.suptitle(f"{testbed.name}: {steps} NFE{cfg_text}", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return out


__all__ = [
    "REFERENCE_CHECK_STEPS",
    "REFERENCE_STEPS",
    "TRAINED_FAMILIES",
    "MplDenoiser",
    "PhotoDenoiser",
    "SkimageDenoiser",
    "TrainedDenoiser",
    "sample_grid",
    "trained_testbed",
]
