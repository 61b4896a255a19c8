"""The interface every testbed follows: a k-diffusion denoiser with a known answer.

A testbed is a data distribution whose ideal denoiser D(x, σ) = E[x0 | x] is known (analytically or as a
trained network), presented in one model type ("ve" or "flow", see :mod:`adaptive_core.schedules`).
It gives the initial noise for a list of seeds and the reference solution of the probability-flow ODE
from that noise, so that any sampler's error can be measured against it.

The reference follows the hosts' convention for the last step: the ODE is solved exactly (or to far
below the errors compared) from σ_max down to σ_min, and the sample is the denoiser's output there,
D(x(σ_min), σ_min) — real models are not evaluated below their σ_min, and every host sampler ends that way.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..schedules import SD15_SIGMA_MAX, SD15_SIGMA_MIN, check_model_type, flow_time_shift

#: The smallest flow time of ComfyUI's ModelSamplingDiscreteFlow table (t = 1/1000): σ_min = shift(FLOW_T_MIN).
FLOW_T_MIN = 1e-3


class Testbed(ABC):
    """A denoiser with a known probability-flow ODE solution.

    Attributes:
        name: short identifier, e.g. ``"gmm_digits-ve"``.
        model_type: ``"ve"`` or ``"flow"``.
        shape: shape of one sample, e.g. ``(1, 8, 8)`` or ``(4, 16, 16)``.
        sigma_min, sigma_max: the noise range a host would sample over (flow: σ_max = 1).
        shift: the flow timestep shift (flow only; None for ve).
        cfg_scale: the classifier-free guidance scale the denoiser applies (1: unguided, as every exact one).
    """

    family: str = "testbed"
    name: str
    model_type: str
    shape: tuple
    sigma_min: float
    sigma_max: float
    shift: float | None = None
    cfg_scale: float = 1.0

    def __init__(self) -> None:
        check_model_type(self.model_type)
        self.nfe = 0  # model calls counted since the last reset_nfe(), one per __call__

    def _set_noise_range(self, model_type: str, shift: float) -> None:
        """Set model_type, name and the σ range as hosts present it: ve → SD1.x's [0.0292, 14.61] (no shift);
        flow → σ_max = 1 and σ_min = flow_time_shift(FLOW_T_MIN, shift) (SD3/Flux timestep shift)."""
        self.model_type = check_model_type(model_type)
        self.name = f"{self.family}-{model_type}"
        if model_type == "ve":
            self.sigma_min, self.sigma_max, self.shift = SD15_SIGMA_MIN, SD15_SIGMA_MAX, None
        else:
            self.shift = float(shift)
            self.sigma_min, self.sigma_max = flow_time_shift(FLOW_T_MIN, self.shift), 1.0

    # --- the k-diffusion model interface -------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        """Denoised prediction D(x, σ) for a batch; ``sigma`` is a vector with one value per sample."""
        self.nfe += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        return self.denoise(x, sigma)

    def reset_nfe(self) -> None:
        self.nfe = 0

    @abstractmethod
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact D(x, σ) = E[x0 | x_σ = x] in this testbed's model type; sigma has shape [B]."""

    # --- noise, data, reference ----------------------------------------------------------------------
    def noise(self, seeds: Sequence[int], dtype=torch.float64) -> torch.Tensor:
        """The initial sample x at σ_max for each seed: σ_max·ε (ve) or ε (flow with σ_max = 1)."""
        eps = torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(int(s)),
                                       dtype=torch.float64) for s in seeds])
        scale = self.sigma_max if self.model_type == "ve" else 1.0
        if self.model_type == "flow" and self.sigma_max < 1.0:
            raise NotImplementedError("flow testbeds start from pure noise at σ = 1")
        return (scale * eps).to(dtype)

    @abstractmethod
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Reference output from initial samples x at σ_max: D(x*(σ_min), σ_min) with x* the exact ODE path."""

    @abstractmethod
    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """n samples of the clean data distribution (for distribution metrics)."""
