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
Coefficients are computed in float64 and cast to the sample's dtype at the end.
"""
from __future__ import annotations

from typing import Sequence

import torch


def phi_integrals(h: torch.Tensor, max_power: int) -> list[torch.Tensor]:
    """I_k(h) = ∫_0^h e^{τ−h} τ^k dτ for k = 0..max_power (float64, elementwise in h ≥ 0).

    I_k(h) = k!·h^{k+1}·φ_{k+1}(−h) with the φ-functions of exponential integrators (Hochbruck & Ostermann
    2010).  Uses the recurrence I_k = h^k − k·I_{k−1} (integration by parts) for h ≥ 1, and a power series
    for small h where the recurrence cancels; h = +inf is allowed for k = 0 only (I_0 = 1).
    """
    h = h.to(torch.float64)
    i0 = -torch.expm1(-h)
    out = [i0]
    if max_power == 0:
        return out
    small = h < 1.0
    hs = torch.where(small, h, torch.zeros_like(h))
    for k in range(1, max_power + 1):
        # recurrence (stable for h ≥ 1)
        rec = torch.where(small, torch.zeros_like(h), h ** k - k * out[k - 1])
        # series: I_k(h) = k!·Σ_{m≥0} (−h)^m h^{k+1} / (k+1+m)!  (alternating, terms shrink for h < 1)
        term = hs ** (k + 1) / (k + 1)
        series = term.clone()
        for m in range(1, 24):
            term = term * (-hs) / (k + 1 + m)
            series = series + term
        out.append(torch.where(small, series, rec))
    return out


def lagrange_monomial_coeffs(nodes: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Monomial coefficients a[j][k] of the Lagrange basis polynomials L_j(τ) = Σ_k a[j][k] τ^k.

    ``nodes`` are n tensors (one value per sample) τ_0..τ_{n−1}, pairwise distinct; L_j(τ_m) = δ_jm.
    """
    n = len(nodes)
    coeffs = []
    for j in range(n):
        poly = [torch.ones_like(nodes[j])]  # ascending powers
        denom = torch.ones_like(nodes[j])
        for m in range(n):
            if m == j:
                continue
            # multiply poly by (τ − τ_m)
            new = [torch.zeros_like(nodes[j]) for _ in range(len(poly) + 1)]
            for k, c in enumerate(poly):
                new[k] = new[k] - c * nodes[m]
                new[k + 1] = new[k + 1] + c
            poly = new
            denom = denom * (nodes[j] - nodes[m])
        coeffs.append([c / denom for c in poly])
    return coeffs


def multistep_weights(h: torch.Tensor, nodes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Weights w_j of the exponential multistep update for D sampled at ``nodes`` (τ_j = λ_j − λ_s).

    Returns one weight tensor (per sample) per node such that ∫_0^h e^{τ−h} P(τ) dτ = Σ_j w_j D_j, with P
    the interpolating polynomial through (τ_j, D_j).  One node gives w = 1 − e^{−h} (DDIM / DPM-Solver-1).
    """
    ints = phi_integrals(h, len(nodes) - 1)
    if len(nodes) == 1:
        return [ints[0]]
    coeffs = lagrange_monomial_coeffs(nodes)
    return [sum(a_jk * ints[k] for k, a_jk in enumerate(a_j)) for a_j in coeffs]


def midpoint_weights(h: torch.Tensor, nodes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Damped multistep weights: w_j = (1 − e^{−h})·L_j(h/2), the interpolant taken at the step's midpoint.

    For two nodes this is DPM-Solver++(2M) as published (Lu et al. 2022, Alg. 2) and UniPC's order-2
    predictor (Zhao et al. 2023): it extrapolates the interpolant only half a step, which is more robust
    than exact integration when steps are long (few NFE); formally second order.
    """
    i0 = -torch.expm1(-h.to(torch.float64))
    if len(nodes) == 1:
        return [i0]
    mid = h.to(torch.float64) / 2
    coeffs = lagrange_monomial_coeffs(nodes)
    return [i0 * sum(a_jk * mid ** k for k, a_jk in enumerate(a_j)) for a_j in coeffs]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def exponential_step(x_s: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor, alpha_t: torch.Tensor,
                     h: torch.Tensor, nodes: Sequence[torch.Tensor], denoised: Sequence[torch.Tensor],
                     weights: str = "exact") -> torch.Tensor:
    """One data-prediction exponential-integrator step x_s → x_t (DPM-Solver++ form, variable nodes).

    ``sigma_*``, ``alpha_t``, ``h`` = λ_t − λ_s and each node are per-sample float64 tensors [B];
    ``denoised[j]`` is D at node j.  σ_s may be 1 with α_s = 0 (flow at pure noise): then h = inf, and
    only a single node is allowed (the step is exact for constant D).  ``weights`` is "exact"
    (:func:`multistep_weights`) or "midpoint" (:func:`midpoint_weights`).
    """
    weights = (midpoint_weights if weights == "midpoint" else multistep_weights)(h, nodes)
    ratio = sigma_t / sigma_s
    out = _bcast(ratio, x_s) * x_s
    for w, d in zip(weights, denoised):
        out = out + _bcast(alpha_t * w, x_s) * d
    return out


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square per sample (over all but the first dimension), float64 [B]."""
    return x.to(torch.float64).flatten(1).pow(2).mean(1).sqrt()


def scaled_error(x_pred: torch.Tensor, x_corr: torch.Tensor, x_prev: torch.Tensor,
                 rtol: float, atol: float) -> torch.Tensor:
    """Per-sample error norm ‖(x_c − x_p) / (atol + rtol·max(|x_prev|, |x_c|))‖_rms (Hairer et al. 1993, II.4).

    With x measured relative to its own size, an error in a still-noisy sample counts as little as it
    will matter at the end (the ODE shrinks earlier errors by about the ratio of scales).
    """
    scale = atol + rtol * torch.maximum(x_prev.abs(), x_corr.abs())
    return rms((x_corr - x_pred) / scale)


def nan_guard(x: torch.Tensor, what: str) -> None:
    """Raise a FloatingPointError naming ``what`` if x holds NaN or inf."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{what} is not finite (NaN or inf): the model returned a non-finite value")


__all__ = ["phi_integrals", "lagrange_monomial_coeffs", "multistep_weights", "exponential_step", "rms",
           "scaled_error", "nan_guard"]
