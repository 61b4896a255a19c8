"""Gaussian mixtures with full covariances: exact denoisers with multi-modal data.

For x0 ~ Σ_k w_k·N(μ_k, Σ_k) and y = e^λ·x0 + ε, each component gives y | k ~ N(e^λ·μ_k, e^{2λ}·Σ_k + I), and
Tweedie's formula (Efron 2011) is the responsibility-weighted mix of the components' Gaussian posteriors,

    E[x0 | y] = Σ_k r_k(y)·(μ_k + Σ_k·e^λ·(e^{2λ}Σ_k + I)^{-1}·(y − e^λ·μ_k)),

computed in each component's eigenbasis Σ_k = V_k·diag(d_k)·V_kᵀ, with the responsibilities r_k from a
log-sum-exp of the component log-likelihoods.  In ve terms (y = x/σ, e^λ = 1/σ) this is the posterior under
N(x; μ_k, Σ_k + σ²I).  :class:`DigitsGMM` is a 16-component fit to scikit-learn's 8×8 digits, shipped in
``data/gmm_digits.safetensors`` (made by ``python -m adaptive_core.testbeds.fit_gmm``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .analytic import AnalyticTestbed

DIGITS_GMM_PATH = Path(__file__).with_name("data") / "gmm_digits.safetensors"


class GaussianMixture(AnalyticTestbed):
    """A Gaussian mixture on samples of a given shape, with its exact denoiser and ODE reference.

    Args:
        weights: [K] mixture weights (normalised here).
        means: [K, n] component means, n = prod(shape).
        eigvecs: [K, n, n] eigenvectors of each covariance, as columns.
        eigvals: [K, n] eigenvalues of each covariance (> 0).
        shape: shape of one sample.
        model_type, shift: see :class:`.analytic.AnalyticTestbed`.
    """

    family = "gmm"

    def __init__(self, weights, means, eigvecs, eigvals, shape, model_type: str = "ve", shift: float = 3.0) -> None:
        super().__init__(model_type, shape, shift)
        weights, means, eigvecs, eigvals = (torch.as_tensor(t, dtype=torch.float64)
                                            for t in (weights, means, eigvecs, eigvals))
        k, n = weights.shape[0], math.prod(self.shape)
        for label, value, expected in (("means", means, (k, n)), ("eigvecs", eigvecs, (k, n, n)),
                                       ("eigvals", eigvals, (k, n))):
            if tuple(value.shape) != expected:
                raise ValueError(f"{label}: expected shape {expected}, got {tuple(value.shape)}")
        if not bool((eigvals > 0).all()):
            raise ValueError("eigvals must be positive")
        self._register(log_weights=(weights / weights.sum()).log(), means=means, eigvecs=eigvecs, eigvals=eigvals,
                       # all eigenbases side by side [n, K·n] and the means in them [K, n]: one GEMM per projection
                       bases=eigvecs.permute(1, 0, 2).reshape(n, k * n),
                       means_in_bases=torch.einsum("kij,ki->kj", eigvecs, means))

    @property
    def n_components(self) -> int:
        return self._params["means"].shape[0]

    def posterior_mean(self, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """E[x0 | y = e^λ·x0 + ε]: responsibility-weighted component posterior means (module docstring)."""
        p = self._on(y.device)
        batch, (k, n) = y.shape[0], p["means"].shape
        s = torch.exp(lam).reshape(-1, 1, 1)                                   # e^λ, [B, 1, 1]
        z = (y.reshape(batch, n) @ p["bases"]).reshape(batch, k, n) - s * p["means_in_bases"]  # V_kᵀ(y − e^λ μ_k)
        var = s * s * p["eigvals"] + 1                                         # eigenvalues of e^{2λ}Σ_k + I
        log_lik = p["log_weights"] - 0.5 * (var.log() + z * z / var).sum(-1)  # log w_k N(y; ·), up to a constant
        resp = torch.softmax(log_lik, dim=-1)                                  # r_k(y), [B, K]
        shrunk = resp[..., None] * (s * p["eigvals"] / var) * z                # r_k · e^λ d/(e^{2λ}d + 1) · z
        x0 = resp @ p["means"] + shrunk.reshape(batch, k * n) @ p["bases"].T   # Σ_k r_k (μ_k + V_k shrunk_k)
        return x0.reshape(y.shape)

    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """n exact samples: a component k ~ w, then μ_k + V_k·(sqrt(d_k)·ε); float64."""
        p, g = self._params, torch.Generator().manual_seed(seed)
        k = torch.multinomial(p["log_weights"].exp(), n, replacement=True, generator=g)
        eps = torch.randn((n, p["means"].shape[1]), generator=g, dtype=torch.float64)
        x0 = p["means"][k] + torch.einsum("bij,bj->bi", p["eigvecs"][k], p["eigvals"][k].sqrt() * eps)
        return x0.reshape(n, *self.shape)

    def data_mean(self) -> torch.Tensor:
        """Mean of the mixture, Σ_k w_k·μ_k, shape ``self.shape``."""
        p = self._params
        return (p["log_weights"].exp() @ p["means"]).reshape(self.shape)

    def data_covariance(self) -> torch.Tensor:
        """Covariance of the flattened mixture, Σ_k w_k·(Σ_k + μ_k·μ_kᵀ) − m·mᵀ, shape [n, n]."""
        p = self._params
        w = p["log_weights"].exp()
        cov = torch.einsum("k,kij,kj,klj->il", w, p["eigvecs"], p["eigvals"], p["eigvecs"])
        m = self.data_mean().reshape(-1)
        return cov + torch.einsum("k,ki,kj->ij", w, p["means"], p["means"]) - torch.outer(m, m)


class DigitsGMM(GaussianMixture):
    """A 16-component full-covariance mixture fitted to scikit-learn's 8×8 digits, pixels mapped to [−1, 1].

    Shape (1, 8, 8).  Loads ``data/gmm_digits.safetensors`` (torch + safetensors only; refit with
    ``python -m adaptive_core.testbeds.fit_gmm``).  ``metadata`` holds the fit's provenance.
    """

    family = "gmm_digits"

    def __init__(self, model_type: str = "ve", shift: float = 3.0, path: str | Path = DIGITS_GMM_PATH) -> None:
        tensors, self.metadata = load_gmm(path)
        super().__init__(tensors["weights"], tensors["means"], tensors["eigvecs"], tensors["eigvals"],
                         shape=(1, 8, 8), model_type=model_type, shift=shift)


def load_gmm(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a mixture file: tensors weights/means/eigvecs/eigvals and its metadata (JSON values decoded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = {key: json.loads(value) for key, value in (f.metadata() or {}).items()}
    return tensors, metadata
