"""The probability-flow ODE in half-log-SNR coordinates, shared by every analytic testbed.

Both model types (see :mod:`adaptive_core.schedules`) write x = α·x0 + σ·ε.  Dividing by σ gives

    y = x/σ = e^λ·x0 + ε,        λ = log(α/σ)  (the half-log-SNR),

which is the same quantity for "ve" and "flow" at equal λ.  A denoiser is therefore one function
``posterior_mean(y, λ) = E[x0 | y]`` (Tweedie's formula, Efron 2011), and the probability-flow ODE of both
forms is the DPM-Solver++ equation (Lu et al. 2022, "DPM-Solver++", eq. 9)

    dy/dλ = e^λ · E[x0 | y].

Pure flow noise (σ = 1, x = ε) is y = ε at λ = −∞; everything below is finite there (e^λ = 0).
This module converts between (x, σ) and (y, λ) and solves that ODE to high accuracy for references.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..schedules import half_log_snr, sigma_from_half_log_snr

#: Where the ODE of a flow model is started when σ_max = 1 (λ = −∞): y = ε there, off by O(e^λ) ≈ 1e-13.
LAMBDA_PURE_NOISE = -30.0

#: Tolerances of the reference solve (scipy DOP853, Hairer et al.): far below the ~1e-3 errors compared.
REFERENCE_RTOL = 1e-10
REFERENCE_ATOL = 1e-12

PosteriorMean = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_snr_coordinates(x: torch.Tensor, sigma: torch.Tensor, model_type: str):
    """(x, σ) → (y, λ) with y = x/σ and λ = log(α/σ); σ broadcasts over x's trailing dimensions.

    Flow σ = 1 gives λ = −∞ and y = x (pure noise); σ = 0 gives λ = +∞ (the caller handles clean input).
    """
    lam = half_log_snr(sigma, model_type)
    return x / _per_sample(sigma, x), lam


def from_snr_coordinates(y: torch.Tensor, lam: torch.Tensor, model_type: str) -> tuple:
    """(y, λ) → (x, σ): inverse of :func:`to_snr_coordinates`."""
    sigma = sigma_from_half_log_snr(lam, model_type)
    return y * _per_sample(sigma, y), sigma


def start_lambda(sigma_max: float, model_type: str) -> float:
    """λ at which a reference solve starts: λ(σ_max), or :data:`LAMBDA_PURE_NOISE` for flow σ_max = 1."""
    return max(half_log_snr(sigma_max, model_type), LAMBDA_PURE_NOISE)


def solve_pf_ode(posterior_mean: PosteriorMean, y: torch.Tensor, lam_start: float, lam_end: float,
                 rtol: float = REFERENCE_RTOL, atol: float = REFERENCE_ATOL) -> torch.Tensor:
    """Integrate dy/dλ = e^λ·E[x0 | y, λ] from ``lam_start`` to ``lam_end`` for a whole batch (float64).

    The probability-flow ODE (Song et al. 2021; Karras et al. 2022, EDM) in the exponential-integrator form of
    DPM-Solver++ (Lu et al. 2022), solved by scipy's adaptive 8th-order Dormand–Prince (DOP853) on the
    flattened batch.  ``posterior_mean(y, lam)`` takes y of shape [B, ...] and λ of shape [B].
    The step sizes are shared by the batch, so a sample's result depends on its batch only at the level of
    the tolerances (≈1e-10), far below any error this reference is used to measure.
    Runs single-threaded (see :func:`single_threaded`).
    """
    y = y.detach().to(torch.float64).cpu()
    shape, batch = y.shape, y.shape[0]

    def rhs(lam: float, flat: np.ndarray) -> np.ndarray:
        yt = torch.from_numpy(flat).reshape(shape)
        lam_vec = torch.full((batch,), lam, dtype=torch.float64)
        return (math.exp(lam) * posterior_mean(yt, lam_vec)).reshape(-1).numpy()

    with single_threaded():
        sol = solve_ivp(rhs, (lam_start, lam_end), y.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, then restore the previous count.

    The ODE's right-hand side is thousands of small tensor ops: thread hand-offs cost more than they save, and
    on a machine whose cores are shared they stall for whole scheduler slices (observed: 10x-100x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector [B] reshaped to broadcast against ``like`` of shape [B, ...]."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))
