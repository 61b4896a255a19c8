"""The "oracle" fixed schedule: the best σ grid for a given integrator, found with the reference in the loop.

This is the limit a fixed schedule can reach for one testbed and budget (cf. "optimal stepsize" OSS,
Sabour et al.'s AYS, and the DMN trust-region search, arXiv 2402.17376): coordinate descent over the
interior evaluation points in half-log-SNR λ, each moved by a golden-section search between its
neighbours, minimising the RMSE of the sampler's output to the reference ODE solution.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..schedules import half_log_snr, sigma_from_half_log_snr
from .metrics import rmse

GOLDEN = (math.sqrt(5) - 1) / 2


#: Rademacher patterns of the jittered objective are drawn from this seed (the same for every grid and call).
JITTER_SEED = 0


def jitter_patterns(n_points: int, draws: int, seed: int = JITTER_SEED) -> torch.Tensor:
    """``draws`` fixed ±1 patterns [draws, n_points] (Rademacher, seeded): the directions in which
    :func:`optimize_schedule` moves a grid's interior points to score its robustness.  The same patterns serve
    every candidate grid (common random numbers), so the objective stays a deterministic function of the grid."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (draws, n_points), generator=gen).to(torch.float64) * 2 - 1


def optimize_schedule(run: Callable[[torch.Tensor], torch.Tensor], reference: torch.Tensor, init_sigmas: torch.Tensor,
                      model_type: str, sweeps: int = 3, iters: int = 10, jitter: float = 0.0,
                      jitter_draws: int = 2) -> tuple[torch.Tensor, float]:
    """Coordinate descent on a σ grid (descending, ending in 0; ends fixed) minimising RMSE to ``reference``.

    ``run(sigmas)`` samples with the fixed grid and returns the outputs.  Each interior evaluation point is
    moved in λ by a golden-section search between its neighbours; ``sweeps`` passes over all points.
    A flow grid starting at σ = 1 (λ = −∞) keeps that point and optimises the rest.  Returns (grid, rmse).

    With ``jitter`` > 0 the objective is the root mean square of the RMSE of the grid and of the grid with every
    interior point moved by ±``jitter`` in λ along ``jitter_draws`` fixed sign patterns and their opposites
    (:func:`jitter_patterns`; antithetic pairs): the best grid whose gain survives that much imprecision, as a
    step policy that lands near a grid point keeps it (robust optimisation against implementation error,
    Ben-Tal et al. 2009, "Robust Optimization").  A sharp optimum (a network's D(x, σ) can ripple in σ, and a
    grid can sit on a lucky phase) scores its neighbourhood instead.  The returned RMSE is that objective.
    """
    if not jitter >= 0 or jitter_draws < 1:
        raise ValueError(f"need jitter ≥ 0 and jitter_draws ≥ 1, got {jitter} and {jitter_draws}")
    grid = init_sigmas.to(torch.float64).clone()
    nonzero = grid[grid > 0]
    lam = torch.tensor([half_log_snr(float(s), model_type) for s in nonzero], dtype=torch.float64)
    patterns = jitter_patterns(lam.numel(), jitter_draws) if jitter > 0 else None

    def plain_loss(lam_vec: torch.Tensor) -> float:
        sig = torch.tensor([sigma_from_half_log_snr(float(v), model_type) for v in lam_vec], dtype=torch.float64)
        return rmse(run(torch.cat([sig, grid.new_zeros(1)])), reference)

    def loss_of(lam_vec: torch.Tensor) -> float:
        if patterns is None:
            return plain_loss(lam_vec)
        losses = [plain_loss(lam_vec)]
        for pattern in torch.cat([patterns, -patterns]):
            moved = lam_vec.clone()
            moved[1:-1] += jitter * pattern[1:-1]
            finite = moved[torch.isfinite(moved)]
            if bool((finite[1:] > finite[:-1]).all()):   # a move that would reorder points is not scored
                losses.append(plain_loss(moved))
        return math.sqrt(sum(v * v for v in losses) / len(losses))

    best = loss_of(lam)
    for _ in range(sweeps):
        improved = False
        for i in range(1, lam.numel() - 1):
            lo = lam[i - 1] if math.isfinite(float(lam[i - 1])) else lam[i] - 3.0
            hi = lam[i + 1]
            a, b = float(lo), float(hi)
            # golden-section search in (a, b) for point i
            c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)

            def at(v: float) -> float:
                trial = lam.clone()
                trial[i] = v
                return loss_of(trial)
            fc, fd = at(c), at(d)
            for _ in range(iters):
                if fc < fd:
                    b, d, fd = d, c, fc
                    c = b - GOLDEN * (b - a)
                    fc = at(c)
                else:
                    a, c, fc = c, d, fd
                    d = a + GOLDEN * (b - a)
                    fd = at(d)
            v, fv = (c, fc) if fc < fd else (d, fd)
            if fv < best:
                lam[i], best, improved = v, fv, True
        if not improved:
            break
    sig = torch.tensor([sigma_from_half_log_snr(float(v), model_type) for v in lam], dtype=torch.float64)
    return torch.cat([sig, grid.new_zeros(1)]), best
