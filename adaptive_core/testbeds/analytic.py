"""Testbeds whose ideal denoiser has a closed form: the shared machinery.

A subclass gives the posterior mean E[x0 | y] in half-log-SNR coordinates y = e^λ·x0 + ε (see
:mod:`.reference`); this class turns it into the k-diffusion denoiser D(x, σ) of either model type, checks
inputs, keeps results batch-invariant, and solves the probability-flow ODE for the reference.
"""
from __future__ import annotations

from abc import abstractmethod

import torch

from ..schedules import half_log_snr
from .base import Testbed
from .reference import (REFERENCE_ATOL, REFERENCE_RTOL, from_snr_coordinates, solve_pf_ode, start_lambda,
                        to_snr_coordinates)


class AnalyticTestbed(Testbed):
    """A testbed with an exact posterior mean, in the SD1.x σ range (ve) or a shifted flow range (flow).

    Subclasses set ``family`` and implement :meth:`posterior_mean`; parameters registered with
    :meth:`_register` are float64 and follow the input's device.
    """

    family: str = "analytic"

    def __init__(self, model_type: str, shape, shift: float = 3.0) -> None:
        self.shape = tuple(int(d) for d in shape)
        self._set_noise_range(model_type, shift)
        self._params: dict[str, torch.Tensor] = {}
        self._params_on: dict[torch.device, dict[str, torch.Tensor]] = {}
        super().__init__()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, shape={self.shape}, "
                f"sigma_min={self.sigma_min:.6g}, sigma_max={self.sigma_max:.6g}, shift={self.shift})")

    # --- what a subclass provides ----------------------------------------------------------------------
    @abstractmethod
    def posterior_mean(self, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """E[x0 | y] for y = e^λ·x0 + ε (Tweedie's formula, Efron 2011); float64 y [B, *shape], λ [B]."""

    def _register(self, **tensors: torch.Tensor) -> None:
        """Store float64 parameters; :meth:`_on` returns them on a given device (copied once per device)."""
        self._params.update({k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in tensors.items()})
        self._params_on.clear()

    def _on(self, device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self._params_on:
            self._params_on[device] = {k: v.to(device) for k, v in self._params.items()}
        return self._params_on[device]

    # --- the denoiser ----------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact D(x, σ) = E[x0 | x_σ = x] (Tweedie; Karras et al. 2022, EDM), computed in float64.

        Accepts any floating x of shape [B, *shape] and σ of shape [B] (or one value); returns x's dtype.
        Vectorised over the batch: a sample's result agrees with its result alone to rounding (~1e-15
        relative), not bit for bit — ADO's own batch invariance is tested with an elementwise model.
        σ = 0 returns x (clean input).
        """
        self._check_samples(x)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: expected sigma of shape [{x.shape[0]}] (one per sample), "
                             f"got {tuple(sigma.shape)}")
        clean = sigma == 0
        safe = torch.where(clean, torch.ones_like(sigma), sigma)
        y, lam = to_snr_coordinates(x.to(torch.float64), safe.to(torch.float64), self.model_type)
        out = self.posterior_mean(y, lam).to(x.dtype)
        return torch.where(clean.reshape(-1, *([1] * (x.ndim - 1))), x, out)

    # --- reference -------------------------------------------------------------------------------------
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """D(x*(σ_min), σ_min), x* the probability-flow ODE path from x at σ_max (see :meth:`ode_reference`)."""
        return self.ode_reference(x)

    def ode_reference(self, x: torch.Tensor, rtol: float = REFERENCE_RTOL,
                      atol: float = REFERENCE_ATOL) -> torch.Tensor:
        """The reference by numerical solution of dy/dλ = e^λ·E[x0 | y] (DPM-Solver++ form, Lu et al. 2022).

        x are initial samples at σ_max ([B, *shape]); flow models start from pure noise at σ = 1, i.e. y = ε
        at λ = −∞ (started at :data:`.reference.LAMBDA_PURE_NOISE`).  Returns x's dtype.
        """
        self._check_samples(x)
        y0, _ = self._snr_start(x)
        lam_end = half_log_snr(self.sigma_min, self.model_type)
        y1 = solve_pf_ode(self.posterior_mean, y0, start_lambda(self.sigma_max, self.model_type), lam_end,
                          rtol=rtol, atol=atol).to(x.device)
        return self._denoise_at_sigma_min(y1).to(x.dtype)

    def _snr_start(self, x: torch.Tensor):
        """(y, λ) of initial samples x at σ_max, float64."""
        x = x.to(torch.float64)
        return to_snr_coordinates(x, x.new_full((x.shape[0],), self.sigma_max), self.model_type)

    def _denoise_at_sigma_min(self, y: torch.Tensor) -> torch.Tensor:
        """D(x, σ_min) for x = σ_min·y: the hosts' last step, taken at the end of a reference path."""
        lam = y.new_full((y.shape[0],), half_log_snr(self.sigma_min, self.model_type))
        x, sigma = from_snr_coordinates(y, lam, self.model_type)
        return self.denoise(x, sigma)

    # --- checks ----------------------------------------------------------------------------------------
    def _check_samples(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{self.name}: expected x of shape [B, {', '.join(map(str, self.shape))}] "
                             f"(B samples of shape {self.shape}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: expected a floating-point x, got {x.dtype}")
