"""Step-size decisions: the budget planner and the tolerance controller.

Both work in half-log-SNR λ, per sample, so a decision never depends on other images in the batch.

* :func:`plan_lambdas` — the prior plan: n intervals between two λ, uniform in σ_ve^{1/ρ} where
  σ_ve = e^{−λ} is the ve-equivalent noise level (Karras et al. 2022, eq. 5; ρ → ∞ is the λ-uniform
  "logSNR" schedule of Lu et al. 2022).  Working in σ_ve makes the plan the same for ve and flow models.
* :class:`ToleranceController` — classic error-per-step control: the next step is h·(1/err)^{1/(p+1)}
  with a PI term (Gustafsson 1991; Hairer & Wanner, "Solving ODEs II", IV.2), growth/shrink limits, and a
  reservation so that the remaining budget always reaches the end point.
"""
from __future__ import annotations

import math

import torch

#: Treat a flow model's pure-noise start (σ = 1, λ = −∞) as this λ when placing steps.  The first step
#: from pure noise is exact for the constant part of D, so only the spacing after it matters.
PURE_NOISE_PLANNING_LAMBDA = -3.0


def planning_start(lam_start: torch.Tensor) -> torch.Tensor:
    """λ used for planning: the start itself, or :data:`PURE_NOISE_PLANNING_LAMBDA` where it is −∞."""
    return torch.where(torch.isfinite(lam_start), lam_start,
                       torch.full_like(lam_start, PURE_NOISE_PLANNING_LAMBDA))


def plan_lambdas(lam_start: torch.Tensor, lam_end: torch.Tensor, n_intervals: int, rho: float) -> torch.Tensor:
    """Points λ_0 = lam_start < λ_1 < … < λ_n = lam_end, uniform in σ_ve^{1/ρ} (σ_ve = e^{−λ}).

    ``lam_start``/``lam_end`` are per-sample [B] float64; returns [B, n+1].  A start of −∞ (flow, pure
    noise) is kept as the first point and the rest are planned from :data:`PURE_NOISE_PLANNING_LAMBDA`.
    ρ = inf gives λ-uniform points.
    """
    if n_intervals < 1:
        raise ValueError(f"need at least one interval, got {n_intervals}")
    start = planning_start(lam_start)
    u = torch.linspace(0, 1, n_intervals + 1, dtype=torch.float64)[None, :]
    if math.isinf(rho):
        lam = start[:, None] + u * (lam_end - start)[:, None]
    else:
        # σ^{1/ρ} = exp(−λ/ρ); interpolate linearly there
        a, b = torch.exp(-start / rho)[:, None], torch.exp(-lam_end / rho)[:, None]
        lam = -rho * torch.log(a + u * (b - a))
    lam[:, 0] = lam_start
    lam[:, -1] = lam_end
    return lam


class ToleranceController:
    """Per-sample step-size control to a tolerance, capped by a model-call budget.

    ``propose(h, err, order)`` returns the next step size for each sample from the last step h and its
    scaled error (1 = on tolerance).  ``accept(err)`` says which steps are kept.  Factors follow the PI
    controller of Gustafsson (1991) with exponents (0.7, 0.4)/(p+1), limited to [0.2, 4].
    """

    def __init__(self, safety: float = 0.9, min_factor: float = 0.2, max_factor: float = 4.0,
                 accept_limit: float = 1.0) -> None:
        self.safety, self.min_factor, self.max_factor, self.accept_limit = safety, min_factor, max_factor, accept_limit
        self.prev_err: torch.Tensor | None = None

    def accept(self, err: torch.Tensor) -> torch.Tensor:
        """Boolean [B]: the step's error is within tolerance."""
        return err <= self.accept_limit

    def propose(self, h: torch.Tensor, err: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Next step size per sample (float64 [B])."""
        k = order.to(torch.float64) + 1.0
        err = err.clamp_min(1e-10)
        factor = self.safety * err.pow(-0.7 / k)
        if self.prev_err is not None:
            factor = factor * (self.prev_err / err).clamp(max=1e10).pow(0.4 / k)
        self.prev_err = torch.where(err <= self.accept_limit, err, self.prev_err if self.prev_err is not None else err)
        return h * factor.clamp(self.min_factor, self.max_factor)


def reserve_budget(lam: torch.Tensor, h: torch.Tensor, lam_end: torch.Tensor, evals_left: torch.Tensor) -> torch.Tensor:
    """Enlarge h where needed so that ``evals_left`` equal steps still reach ``lam_end``, and never overshoot it.

    ``evals_left`` counts the model calls still allowed after the next one, per sample.
    """
    remaining = lam_end - lam
    needed = remaining / (evals_left.to(torch.float64) + 1.0)
    h = torch.maximum(h, needed)
    # land evenly: a last step of under a quarter of h is merged, one under 2h is split in two
    h = torch.where(remaining <= 2.0 * h, torch.where(remaining <= 1.25 * h, remaining, remaining / 2), h)
    return torch.minimum(h, remaining)
