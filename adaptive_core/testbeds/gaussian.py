"""A Gaussian with a power-law spectrum: the simplest testbed with an image-like covariance.

Each channel of x0 is a zero-mean Gaussian field that is diagonal in the orthonormal 2-D DCT-II basis, with
variance ∝ (f_y² + f_x² + f0²)^(−exponent/2) at DCT frequencies f = k/(2N) cycles per pixel (natural images
have exponent ≈ 2), scaled so the mean per-element variance is 1, like SD latents.  Everything is exact:

* D(x, σ) = U·diag(v/(v + σ²))·Uᵀ·x in ve (Tweedie / Wiener filter), the same posterior mean in flow;
* the ODE path, per eigen-component: x(σ) = sqrt((v + σ²)/(v + σ0²))·x(σ0) in ve (Karras et al. 2022, EDM),
  i.e. y(λ) = sqrt((v·e^{2λ} + 1)/(v·e^{2λ0} + 1))·y(λ0) in half-log-SNR coordinates for both model types.
"""
from __future__ import annotations

import math

import torch

from ..schedules import half_log_snr
from .analytic import AnalyticTestbed


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix [n, n] (float64): row k is the k-th cosine basis vector."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = math.sqrt(2.0 / n) * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= math.sqrt(2.0)
    return c


class PowerLawGaussian(AnalyticTestbed):
    """Zero-mean Gaussian, diagonal in each channel's 2-D DCT basis, with a power-law variance spectrum.

    Args:
        model_type: ``"ve"`` (SD1.x σ range) or ``"flow"`` (σ ∈ [shift(1e-3), 1]).
        shape: (channels, height, width) of one sample.
        exponent: the spectrum's power: variance ∝ (f² + f0²)^(−exponent/2).
        shift: flow timestep shift (flow only).
        f0: low-frequency cut-off in cycles per pixel (keeps the DC variance finite).
    """

    family = "gaussian"

    def __init__(self, model_type: str = "ve", shape=(4, 16, 16), exponent: float = 2.0, shift: float = 3.0,
                 f0: float = 1.0 / 16) -> None:
        super().__init__(model_type, shape, shift)
        if len(self.shape) != 3:
            raise ValueError(f"{self.name}: shape must be (channels, height, width), got {self.shape}")
        self.exponent, self.f0 = float(exponent), float(f0)
        channels, height, width = self.shape
        fy = torch.arange(height, dtype=torch.float64)[:, None] / (2 * height)
        fx = torch.arange(width, dtype=torch.float64)[None, :] / (2 * width)
        power = (fy ** 2 + fx ** 2 + self.f0 ** 2) ** (-self.exponent / 2)
        variance = (power / power.mean()).expand(channels, height, width).contiguous()
        self._register(variance=variance, dct_h=dct_matrix(height), dct_w=dct_matrix(width))

    @property
    def variance(self) -> torch.Tensor:
        """Variance of each DCT coefficient, shape (C, H, W): the covariance's eigenvalues."""
        return self._params["variance"]

    def to_spectral(self, x: torch.Tensor) -> torch.Tensor:
        """DCT coefficients Uᵀx of x [..., C, H, W] (per channel, orthonormal)."""
        p = self._on(x.device)
        return p["dct_h"] @ x @ p["dct_w"].T

    def from_spectral(self, c: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_spectral`: U·c."""
        p = self._on(c.device)
        return p["dct_h"].T @ c @ p["dct_w"]

    def posterior_mean(self, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """E[x0 | y = e^λ·x0 + ε] = U·diag(e^λ·v/(e^{2λ}·v + 1))·Uᵀ·y (Tweedie; Wiener filter)."""
        v = self._on(y.device)["variance"]
        s = torch.exp(lam).reshape(-1, 1, 1, 1)
        return self.from_spectral(s * v / (s * s * v + 1) * self.to_spectral(y))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form reference: each eigen-component scales by sqrt((v·e^{2λ1} + 1)/(v·e^{2λ0} + 1)).

        From x at σ_max (flow: pure noise at σ = 1, λ0 = −∞) to σ_min, then D(x*(σ_min), σ_min).
        """
        self._check_samples(x)
        y0, lam0 = self._snr_start(x)
        v = self._on(y0.device)["variance"]
        lam1 = half_log_snr(self.sigma_min, self.model_type)
        gain = torch.sqrt((v * math.exp(2 * lam1) + 1) / (v * torch.exp(2 * lam0).reshape(-1, 1, 1, 1) + 1))
        return self._denoise_at_sigma_min(self.from_spectral(gain * self.to_spectral(y0))).to(x.dtype)

    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """n exact samples x0 = U·(sqrt(v)·ε), float64."""
        eps = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return self.from_spectral(self.variance.sqrt() * eps)

    def data_mean(self) -> torch.Tensor:
        """Mean of the data distribution (zero), shape ``self.shape``."""
        return torch.zeros(self.shape, dtype=torch.float64)

    def eigenbasis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues [n], eigenvectors [n, n] as columns) of the flattened covariance, n = C·H·W."""
        channels = self.shape[0]
        per_channel = torch.kron(self._params["dct_h"], self._params["dct_w"]).T  # columns: basis vectors
        return self.variance.reshape(-1), torch.block_diag(*[per_channel] * channels)

    def data_covariance(self) -> torch.Tensor:
        """Covariance of the flattened data, U·diag(v)·Uᵀ, shape [n, n]."""
        v, u = self.eigenbasis()
        return (u * v) @ u.T
