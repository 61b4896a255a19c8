"""Variable-step multistep exponential integrator in half-log-SNR, with a free error estimate.

The probability-flow ODE in data-prediction form (Lu et al. 2022, "DPM-Solver++", eq. 9) is

    x_t / σ_t = x_s / σ_s + ∫_{λ_s}^{λ_t} e^{λ} D(x_λ, λ) dλ,      λ = log(α/σ),

valid for every model type that is a scaled-and-noised data sample (ve and flow alike).  Replacing D by
the polynomial in τ = λ − λ_s that interpolates the last evaluations (at arbitrary, variable spacings)
and integrating exactly gives the multistep update

    x_t = (σ_t/σ_s)·x_s + α_t · Σ_j w_j D_j,     w_j = Σ_k a_jk · I_k(h),    I_k(h) = ∫_0^h e^{τ−h} τ^k dτ,

where a_jk are the monomial coefficients of the j-th Lagrange basis polynomial.  With p nodes the local
error is O(h^{p+1}): this is DPM-Solver++(pM) for variable steps (Lu et al. 2022; Zhang & Chen 2022, DEIS).
After the model is evaluated at the new point, the same formula with that point added as a node is a
corrector one order higher (Zhao et al. 2023, "UniPC", the UniC idea); the gap between predictor and
corrector is an error estimate that costs no model call.

Everything here works per sample: λ has one value per sample, so each image may take its own steps.
Coefficients are computed in float64 numpy arrays [B] and cast to the sample's dtype and device at the end.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


#: Below this step (in λ) the φ-integrals use their power series instead of the recurrence.
SERIES_BELOW = 0.05


def phi_integrals(h: np.ndarray, max_power: int) -> list[np.ndarray]:
    """I_k(h) = ∫_0^h e^{τ−h} τ^k dτ for k = 0..max_power (float64, elementwise in h ≥ 0).

    I_k(h) = k!·h^{k+1}·φ_{k+1}(−h) with the φ-functions of exponential integrators (Hochbruck & Ostermann
    2010).  Uses the recurrence I_k = h^k − k·I_{k−1} (integration by parts), and a power series for
    h < :data:`SERIES_BELOW` where the recurrence cancels; h = +inf is allowed for k = 0 only (I_0 = 1).
    """
    h = np.asarray(h, dtype=np.float64)
    out = [-np.expm1(-h)]
    small = h < SERIES_BELOW
    any_small = bool(small.any())
    hs = np.where(small, h, 0.0)
    for k in range(1, max_power + 1):
        rec = h ** k - k * out[k - 1]  # integration by parts; loses ~k·log10(1/h) digits for small h
        if not any_small:
            out.append(rec)
            continue
        # series: I_k(h) = k!·Σ_{m≥0} (−h)^m h^{k+1} / (k+1+m)!  (alternating, terms shrink fast for h < 0.05)
        term = hs ** (k + 1) / (k + 1)
        series = term.copy()
        for m in range(1, 12):
            term = term * (-hs) / (k + 1 + m)
            series = series + term
        out.append(np.where(small, series, rec))
    return out


def noise_integrals(h: np.ndarray, max_power: int) -> list[np.ndarray]:
    """J_k(h) = ∫_0^h e^{−τ} τ^k dτ for k = 0..max_power (the lower incomplete gamma γ(k+1, h)).

    These are the moments of the noise-prediction exponential integrator (Lu et al. 2022, DPM-Solver;
    Zhang & Chen 2022, DEIS).  Recurrence J_k = k·J_{k−1} − h^k e^{−h}, and a power series for h < 0.5.
    """
    h = np.asarray(h, dtype=np.float64)
    out = [-np.expm1(-h)]
    small = h < 0.5
    hs = np.where(small, h, 0.0)
    for k in range(1, max_power + 1):
        rec = k * out[k - 1] - h ** k * np.exp(-h)
        # series: Σ_m (−1)^m h^{k+1+m} / (m!·(k+1+m))
        term, series = hs ** (k + 1), hs ** (k + 1) / (k + 1)
        for m in range(1, 20):
            term = term * (-hs) / m
            series = series + term / (k + 1 + m)
        out.append(np.where(small, series, rec))
    return out


def _moment_weights(nodes: Sequence[np.ndarray], moments: np.ndarray) -> np.ndarray:
    """Weights w [B, n] with Σ_j w_j·τ_j^k = moments[:, k] for k < n: a quadrature exact on polynomials of
    degree < n through the nodes τ_j (a transposed Vandermonde solve per sample)."""
    tau = np.stack(nodes, 1)                                                       # [B, n]
    vander_t = tau[:, None, :] ** np.arange(len(nodes))[None, :, None]             # [B, k, j] = τ_j^k
    return np.linalg.solve(vander_t, moments[..., None])[..., 0]


def multistep_weights(h: np.ndarray, nodes: Sequence[np.ndarray], prediction: str = "data") -> np.ndarray:
    """Weights w [B, n] of the exponential multistep update for values sampled at ``nodes`` (τ_j = λ_j − λ_s).

    Data prediction: Σ_j w_j D_j = ∫_0^h e^{τ−h} P(τ) dτ (moments I_k of :func:`phi_integrals`); noise
    prediction: Σ_j w_j ε_j = ∫_0^h e^{−τ} P(τ) dτ (moments J_k of :func:`noise_integrals`), with P the
    polynomial through the nodes.  One node gives w = 1 − e^{−h} (DDIM) in both forms.
    """
    ints = (noise_integrals if prediction == "noise" else phi_integrals)(h, len(nodes) - 1)
    if len(nodes) == 1:
        return ints[0][:, None]
    return _moment_weights(nodes, np.stack(ints, 1))


def midpoint_weights(h: np.ndarray, nodes: Sequence[np.ndarray], prediction: str = "data") -> np.ndarray:
    """Damped multistep weights w [B, n]: w_j = (1 − e^{−h})·L_j(h/2), the interpolant taken at mid-step.

    For two nodes this is DPM-Solver++(2M) as published (Lu et al. 2022, Alg. 2), and UniPC's order-2
    predictor (Zhao et al. 2023); with noise prediction, DPM-Solver-2M's form.  It extrapolates the
    interpolant only half a step, more robust than exact integration for long steps; formally second order.
    """
    i0 = -np.expm1(-h)
    if len(nodes) == 1:
        return i0[:, None]
    mid_powers = (h / 2)[:, None] ** np.arange(len(nodes))[None, :]
    return _moment_weights(nodes, i0[:, None] * mid_powers)


def per_sample(v: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A per-sample float64 array [B] as a tensor broadcastable against ``like`` (its dtype and device)."""
    return torch.from_numpy(np.ascontiguousarray(v)).to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def exponential_step(x_s: torch.Tensor, sigma_s: np.ndarray, sigma_t: np.ndarray, alpha_t: np.ndarray,
                     h: np.ndarray, nodes: Sequence[np.ndarray], values: Sequence[torch.Tensor],
                     weights: str = "exact", prediction: str = "data") -> torch.Tensor:
    """One exponential-integrator step x_s → x_t from model outputs at variable nodes.

    ``prediction="data"`` (DPM-Solver++ form, Lu et al. 2022b): ``values`` are D at the nodes and
    x_t = (σ_t/σ_s)·x_s + α_t·Σ w_j D_j.  ``prediction="noise"`` (DPM-Solver / DEIS form): ``values`` are
    ε̂ = (x − α·D)/σ and x_t = (α_t/α_s)·x_s − α_t·(σ_s/α_s)·Σ w_j ε̂_j.  ``sigma_*``, ``alpha_t``,
    ``h`` = λ_t − λ_s and the nodes are per-sample float64 arrays [B].  With data prediction σ_s may be 1
    and α_s = 0 (flow at pure noise; h = inf, one node).  ``weights``: "exact" or "midpoint".
    """
    w = (midpoint_weights if weights == "midpoint" else multistep_weights)(h, nodes, prediction)
    if prediction == "noise":
        alpha_s = alpha_t * np.exp(-h) * sigma_s / sigma_t  # α_s from λ_s = λ_t − h
        first, mult = alpha_t / alpha_s, -alpha_t * sigma_s / alpha_s
    else:
        first, mult = sigma_t / sigma_s, alpha_t
    scales = np.concatenate([first[None, :], (mult[:, None] * w).T], 0)  # [1 + n, B]
    coef = torch.from_numpy(np.ascontiguousarray(scales)).to(x_s.device, x_s.dtype)
    coef = coef.reshape(len(values) + 1, -1, *([1] * (x_s.ndim - 1)))
    out = x_s * coef[0]
    for j, v in enumerate(values):
        out.addcmul_(v, coef[j + 1])
    return out


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square per sample (over all but the first dimension), float64 [B]."""
    norm = torch.linalg.vector_norm(x.flatten(1), dim=1, dtype=torch.float32 if x.dtype != torch.float64 else None)
    return norm.to(torch.float64) / math.sqrt(x[0].numel())


def scaled_error(x_pred: torch.Tensor, x_corr: torch.Tensor, x_prev: torch.Tensor,
                 rtol: float, atol: float) -> torch.Tensor:
    """Per-sample error norm ‖(x_c − x_p) / (atol + rtol·max(|x_prev|, |x_c|))‖_rms (Hairer et al. 1993, II.4).

    With x measured relative to its own size, an error in a still-noisy sample counts as little as it
    will matter at the end (the ODE shrinks earlier errors by about the ratio of scales).
    """
    scale = torch.maximum(x_prev.abs(), x_corr.abs()).mul_(rtol).add_(atol)
    return rms((x_corr - x_pred).div_(scale))


def nan_guard(x: torch.Tensor, what: str) -> None:
    """Raise a FloatingPointError naming ``what`` if x holds NaN or inf."""
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # one reduction in the usual case
        raise FloatingPointError(f"{what} is not finite (NaN or inf): the model returned a non-finite value")


__all__ = ["phi_integrals", "noise_integrals", "multistep_weights", "midpoint_weights", "per_sample", "exponential_step", "rms",
           "scaled_error", "nan_guard"]
