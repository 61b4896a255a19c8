"""Noise-level maths per model type, and the reference schedules users pick in the hosts.

Two parameterisations of the forward process share one probability-flow ODE (Song et al. 2021,
"Score-Based Generative Modeling through SDEs"; Karras et al. 2022, "Elucidating the Design Space"):

* ``"ve"``   x = x0 + σ·ε            (signal scale α = 1, noise scale σ). SD1.x / SDXL as the hosts present them.
* ``"flow"`` x = (1 − σ)·x0 + σ·ε    (α = 1 − σ, noise scale σ, σ ∈ (0, 1]). SD3, Flux, Wan (rectified flow).

Both are described by the half-log-SNR λ = log(α/σ) (Lu et al. 2022, "DPM-Solver"), in which the
exponential integrators of :mod:`adaptive_core.solver` are written.  A sample of one form maps to the other
by ``x_flow = x_ve / (1 + σ_ve)`` with ``σ_flow = σ_ve / (1 + σ_ve)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

MODEL_TYPES = ("ve", "flow")

#: Align Your Steps, SD1.5, 10 steps (Sabour et al. 2024, arXiv 2404.14507, published table).
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)

#: The σ range of SD1.x's discrete schedule as ComfyUI and A1111 present it.
SD15_SIGMA_MIN = 0.0291675
SD15_SIGMA_MAX = 14.614642


def check_model_type(model_type: str) -> str:
    """Return ``model_type`` if it is one of :data:`MODEL_TYPES`, else raise a ValueError naming it."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}: expected one of {MODEL_TYPES}")
    return model_type


def signal_scale(sigma, model_type: str):
    """α(σ): the scale of the clean sample in x (1 for ve, 1 − σ for flow); floats, arrays or tensors."""
    check_model_type(model_type)
    if model_type == "flow":
        return 1.0 - sigma
    return sigma * 0 + 1.0 if isinstance(sigma, (torch.Tensor, np.ndarray)) else 1.0


def half_log_snr(sigma, model_type: str):
    """λ(σ) = log(α/σ), the half-log signal-to-noise ratio (Lu et al. 2022, DPM-Solver, eq. 3.2).

    ve: λ = −log σ.  flow: λ = log((1 − σ)/σ) = −logit(σ).  σ = 0 gives +inf, flow σ = 1 gives −inf.
    Accepts floats, numpy arrays or tensors.
    """
    check_model_type(model_type)
    if torch.is_tensor(sigma):
        return -torch.logit(sigma) if model_type == "flow" else -torch.log(sigma)
    if isinstance(sigma, np.ndarray):
        with np.errstate(divide="ignore"):
            return np.log1p(-sigma) - np.log(sigma) if model_type == "flow" else -np.log(sigma)
    sigma = float(sigma)
    if sigma <= 0.0:
        return math.inf
    if model_type == "flow":
        return -math.inf if sigma >= 1.0 else math.log((1.0 - sigma) / sigma)
    return -math.log(sigma)


def sigma_from_half_log_snr(lam, model_type: str):
    """Inverse of :func:`half_log_snr`: σ(λ) = e^{−λ} (ve) or sigmoid(−λ) (flow)."""
    check_model_type(model_type)
    if torch.is_tensor(lam):
        return torch.sigmoid(-lam) if model_type == "flow" else torch.exp(-lam)
    if isinstance(lam, np.ndarray):
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(lam)) if model_type == "flow" else np.exp(-lam)
    lam = float(lam)
    if model_type == "flow":
        if lam == math.inf:
            return 0.0
        if lam == -math.inf:
            return 1.0
        return 1.0 / (1.0 + math.exp(lam)) if lam > -700 else 1.0
    return math.exp(-lam) if lam != math.inf else 0.0


def ve_sigma_to_flow(sigma_ve):
    """σ_flow = σ_ve/(1 + σ_ve): the same noise level in flow parameterisation (same λ)."""
    return sigma_ve / (1.0 + sigma_ve)


def flow_sigma_to_ve(sigma_flow):
    """σ_ve = σ_flow/(1 − σ_flow): the same noise level in ve parameterisation (same λ)."""
    return sigma_flow / (1.0 - sigma_flow)


def flow_time_shift(t, shift: float):
    """σ(t) = shift·t / (1 + (shift − 1)·t): the timestep shift of SD3 (Esser et al. 2024, eq. 23) and Flux."""
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from σ_max to σ_min, uniform in σ^{1/ρ}, then 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n noise levels uniform in log σ from σ_max to σ_min, then 0 (k-diffusion's "exponential")."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def loglinear_interp(levels: Sequence[float], n: int) -> torch.Tensor:
    """Resample a decreasing table of noise levels to n values, linear in log σ over a uniform grid.

    This is how Align Your Steps tables are adapted to other step counts (Sabour et al. 2024, §3.3).
    """
    levels = torch.tensor(levels, dtype=torch.float64)
    if n == 1:
        return levels[:1].clone()
    xs = torch.linspace(0, 1, len(levels), dtype=torch.float64)
    ys = levels.log().flip(0)
    new_xs = torch.linspace(0, 1, n, dtype=torch.float64)
    idx = torch.searchsorted(xs, new_xs, right=True).clamp(1, len(xs) - 1)
    x0, x1 = xs[idx - 1], xs[idx]
    y0, y1 = ys[idx - 1], ys[idx]
    new_ys = y0 + (y1 - y0) * (new_xs - x0) / (x1 - x0)
    return new_ys.flip(0).exp()


def ays_sigmas(n: int, sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """Align Your Steps for SD1.5 (published 10-step table), n noise levels then 0.

    n = 11 uses the table as is; other n are log-linearly interpolated (Sabour et al. 2024).  If σ_min/σ_max
    are given, the table's log σ range is mapped affinely onto [log σ_min, log σ_max] so the schedule fits
    another model's range (e.g. a flow model's σ ∈ (0, 1] via its ve-equivalent range).
    """
    sigmas = loglinear_interp(AYS_SD15_SIGMAS, n)
    if sigma_min is not None and sigma_max is not None:
        lo, hi = math.log(AYS_SD15_SIGMAS[-1]), math.log(AYS_SD15_SIGMAS[0])
        u = (sigmas.log() - lo) / (hi - lo)
        sigmas = (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp()
    return _append_zero(sigmas)


def flow_shift_sigmas(n: int, shift: float = 3.0, sigma_min: float | None = None) -> torch.Tensor:
    """SD3/Flux "simple" schedule: n levels uniform in t ∈ [1, t_min], shifted by :func:`flow_time_shift`, then 0.

    t_min is chosen so that the last level is ``sigma_min`` when given, else t_min = 1/n as in ComfyUI's
    "simple" scheduler over a 1000-step table.
    """
    if sigma_min is None:
        t_min = 1.0 / n
    else:  # invert the shift for the last level
        t_min = sigma_min / (shift - (shift - 1.0) * sigma_min)
    t = torch.linspace(1.0, t_min, n, dtype=torch.float64)
    return _append_zero(flow_time_shift(t, shift))


def lambda_uniform_sigmas(n: int, sigma_min: float, sigma_max: float, model_type: str) -> torch.Tensor:
    """n noise levels uniform in half-log-SNR λ between the endpoints, then 0 (DPM-Solver's "logSNR" schedule).

    For flow models σ_max = 1 (λ = −inf) is kept as the first level and the rest are uniform in λ from the
    second level's λ, chosen one spacing below the ve-equivalent of σ = 1 − 1e-3.
    """
    check_model_type(model_type)
    lam_lo = half_log_snr(min(sigma_max, 1 - 1e-3) if model_type == "flow" else sigma_max, model_type)
    lam_hi = half_log_snr(sigma_min, model_type)
    lam = torch.linspace(lam_lo, lam_hi, n, dtype=torch.float64)
    sigmas = sigma_from_half_log_snr(lam, model_type)
    if model_type == "flow" and sigma_max >= 1.0:
        sigmas[0] = 1.0
    return _append_zero(sigmas)
