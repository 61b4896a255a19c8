"""Trajectory-error metrics: a sampler's output against the reference ODE solution from the same noise."""
from __future__ import annotations

import math

import torch

#: Peak-to-peak range used for PSNR: data scaled to [−1, 1] (pixels, and latents of about unit scale).
PSNR_PEAK = 2.0


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square error over all elements of all samples (float64)."""
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())


def psnr(rmse_value: float, peak: float = PSNR_PEAK) -> float:
    """Peak signal-to-noise ratio in dB, 20·log10(peak / RMSE)."""
    return math.inf if rmse_value == 0 else 20.0 * math.log10(peak / rmse_value)


def median_sample_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over samples of each sample's RMSE: robust to the few noises near a mode boundary whose
    trajectories are very sensitive and dominate the pooled RMSE."""
    per = (a.to(torch.float64) - b.to(torch.float64)).flatten(1).pow(2).mean(1).sqrt()
    return float(per.median())
