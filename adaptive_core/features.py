"""Per-step, per-image signals shared by the quality monitor, the policy, the domain adapter and the trace.

After every model call the sampler knows, for each image: where it is between the run's endpoints (in
half-log-SNR λ, Lu et al. 2022), how much of its call budget is spent, the solver's embedded error estimate
(:func:`adaptive_core.solver.scaled_error`), and the denoised prediction D.  :class:`FeatureTracker` turns
these into a fixed-length vector of numbers per image, :data:`FEATURE_NAMES`, chosen to mean the same on
every model type (ve or flow: everything is measured in λ or relative to D's own size) and latent size
(RMS over elements, energy *shares* of a coarse spectrum):

==========================  ===============================================================================
``lambda_progress``         (λ − λ_start)/(λ_end − λ_start) ∈ [0, 1]; a flow start from pure noise (λ = −∞)
                            counts from :data:`~adaptive_core.controller.PURE_NOISE_PLANNING_LAMBDA`.
``lambda_level``            λ/4, clipped to [−2, 2.5]: the absolute noise level (λ = 0 is SNR 1, where the
                            structure of unit-scale data appears); ve σ and flow σ map to the same λ.
``budget_used``             model calls so far / budget.
``step_lambda``             λ step since the previous call (clipped to [0, 4]); 0 at the first call.
``log_error_estimate``      log10 of the solver's scaled predictor–corrector gap / 4 (0 where none).
``has_error_estimate``      1 where the sampler gave an error estimate, else 0 (peers, first call).
``log_change``              log10(RMS(D_t − D_{t−1}) / (RMS(D_t) + 0.01)) / 4: relative change of D between
                            calls, the "change of the denoised prediction" signal (Castillo et al. 2023).
``log_change_rate``         the same per unit λ: log10(change / step_lambda) / 4.
``log_curvature``           log10(RMS(D_t − D̂_t) / (RMS(D_t) + 0.01)) / 4, D̂_t the linear extrapolation in λ
                            of the two previous D: how far D departs from a straight path (a second
                            difference; cf. the residual-norm ratios of adaptive step-size control).
``change_ratio``            log10(change_t / change_{t−1}) / 2: is the change still shrinking (< 0)?
``has_history``             number of earlier calls that the change/curvature features used, / 2 (0, ½, 1).
``log_rms_denoised``        log10 RMS(D_t): the prediction's own scale (unit-scale latents: about 0).
``highfreq_share``          share of D's energy in its finest octave: ‖D − up(pool₂(D))‖² / ‖D‖², a
                            two-band coarse spectrum (pooling over the last two axes, or the last axis of
                            1-D samples).
``change_highfreq_share``   the same share for D_t − D_{t−1} (late changes are fine detail).
==========================  ===============================================================================

Logs use a floor of 1e-12; every feature is finite.  Computing them costs a few reductions over D per call.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .controller import planning_start
from .solver import rms

FEATURE_NAMES = ("lambda_progress", "lambda_level", "budget_used", "step_lambda", "log_error_estimate",
                 "has_error_estimate", "log_change", "log_change_rate", "log_curvature", "change_ratio",
                 "has_history", "log_rms_denoised", "highfreq_share", "change_highfreq_share")
N_FEATURES = len(FEATURE_NAMES)

#: Added to RMS(D) before dividing by it: D near zero (a blank latent) must not blow the relative change up.
RELATIVE_FLOOR = 0.01
_LOG_FLOOR = 1e-12


def _log10(v: np.ndarray) -> np.ndarray:
    return np.log10(np.maximum(v, _LOG_FLOOR))


def _core_and_pooled(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the part of D that 2×2 blocks tile, its block means): last two axes of [B, C, H, W]-like samples, else
    pairs along the flattened sample; an odd last row/column is left out of both."""
    if d.ndim >= 4 and d.shape[-1] >= 2 and d.shape[-2] >= 2:
        h, w = d.shape[-2] // 2 * 2, d.shape[-1] // 2 * 2
        core = d[..., :h, :w]
        pooled = torch.nn.functional.avg_pool2d(d.reshape(d.shape[0], -1, *d.shape[-2:]), 2)
        return core, pooled.reshape(*d.shape[:-2], h // 2, w // 2)
    flat = d.reshape(d.shape[0], -1)
    n = flat.shape[1] // 2 * 2
    core = flat[:, :n]
    return core, core.reshape(flat.shape[0], n // 2, 2).mean(-1)


def coarse_pool(d: torch.Tensor) -> torch.Tensor:
    """D averaged over 2×2 blocks (last two axes; pairs of the flattened sample otherwise) and repeated back to
    D's shape: the lower octave of a two-band spectrum.  An odd last row/column is kept unpooled."""
    core, pooled = _core_and_pooled(d)
    out = d.clone()
    if d.ndim >= 4 and d.shape[-1] >= 2 and d.shape[-2] >= 2:
        out[..., :core.shape[-2], :core.shape[-1]] = pooled.repeat_interleave(2, -2).repeat_interleave(2, -1)
    else:
        flat = out.reshape(d.shape[0], -1)
        flat[:, :core.shape[1]] = pooled.repeat_interleave(2, -1)
        out = flat.reshape(d.shape)
    return out


def highfreq_share(d: torch.Tensor, rms_d: np.ndarray | None = None) -> np.ndarray:
    """Per sample, the share of ‖d‖² in the finest octave, ‖d − coarse_pool(d)‖²/‖d‖² ∈ [0, 1] (float64 [B]).

    coarse_pool is an orthogonal projection, so the fine energy is ‖core‖² − 4·‖block means‖² (2-D; 2· for
    pairs): one pooling and two or three reductions, no upsampled copy (Parseval, for the Haar split).
    ``rms_d``: RMS(d) per sample if already known.
    """
    core, pooled = _core_and_pooled(d)
    block = core.numel() // max(pooled.numel(), 1)
    total = (rms(d).cpu().numpy() if rms_d is None else rms_d) ** 2 * d[0].numel()
    if core.numel() == d.numel():
        core_energy = total
    else:
        core_energy = rms(core).cpu().numpy() ** 2 * core[0].numel() if core.numel() else np.zeros(d.shape[0])
    coarse_energy = rms(pooled).cpu().numpy() ** 2 * pooled[0].numel() * block if pooled.numel() else 0.0
    fine = np.maximum(core_energy - coarse_energy, 0.0)
    return np.where(total > 0, fine / np.maximum(total, 1e-300), 0.0).clip(0.0, 1.0)


class FeatureTracker:
    """Computes :data:`FEATURE_NAMES` for a batch after each model call, keeping the two previous predictions.

    Args:
        lambda_start, lambda_end: the run's endpoints in λ, per sample [B] (or scalars); a flow start from
            pure noise may be −∞ (NaN raises ValueError).
        budget: the run's model-call budget.

    Call :meth:`update` once per model call, in order.  Every quantity is per sample, so an image's features
    do not depend on the rest of its batch (up to the rounding of per-sample reductions).
    """

    def __init__(self, lambda_start, lambda_end, budget: int) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer ≥ 1, got {budget!r}")
        self.lambda_start = np.atleast_1d(np.asarray(lambda_start, dtype=np.float64))
        self.lambda_end = np.atleast_1d(np.asarray(lambda_end, dtype=np.float64))
        if np.isnan(self.lambda_end).any() or np.isnan(self.lambda_start).any():
            raise ValueError(f"lambda_start/lambda_end must not be NaN, got {self.lambda_start}, {self.lambda_end}")
        # a one-call plan from pure noise ends where it starts (λ = −∞): plan from the same finite stand-in
        self.lambda_end = planning_start(self.lambda_end)
        self.budget = budget
        self._prev: list[tuple[torch.Tensor, np.ndarray]] = []   # (D, λ) of the last calls, newest last
        self._prev_change: np.ndarray | None = None
        self.calls = 0

    def update(self, denoised: torch.Tensor, lam: np.ndarray, error_estimate: np.ndarray | None = None) -> np.ndarray:
        """Features [B, N_FEATURES] (float32) after a model call that returned ``denoised`` at λ = ``lam`` [B].

        ``error_estimate`` [B] is the solver's scaled error (NaN or None where there is none).
        """
        if not torch.is_tensor(denoised) or denoised.ndim < 2:
            raise ValueError(f"denoised must be a batched tensor [B, ...], got {type(denoised).__name__}")
        batch = denoised.shape[0]
        lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (batch,))
        self.calls += 1
        start = planning_start(self.lambda_start)
        lam_planning = np.where(np.isfinite(lam), lam, start)
        span = np.maximum(self.lambda_end - start, 1e-9)
        f = np.zeros((batch, N_FEATURES), dtype=np.float64)
        f[:, 0] = np.clip((lam_planning - start) / span, -0.25, 1.25)
        f[:, 1] = np.clip(lam_planning / 4.0, -2.0, 2.5)
        f[:, 2] = self.calls / self.budget
        if error_estimate is not None:
            err = np.broadcast_to(np.asarray(error_estimate, dtype=np.float64), (batch,))
            has = np.isfinite(err)
            f[:, 4] = np.where(has, _log10(np.where(has, err, 1.0)) / 4.0, 0.0)
            f[:, 5] = has
        d = denoised.detach()
        rms_d = rms(d).cpu().numpy()
        scale = rms_d + RELATIVE_FLOOR
        f[:, 11] = np.clip(_log10(rms_d), -4.0, 2.0)
        f[:, 12] = highfreq_share(d, rms_d)
        if self._prev:
            d1, lam1 = self._prev[-1]
            h = np.clip(np.nan_to_num(lam_planning - lam1, nan=0.0, posinf=4.0, neginf=0.0), 0.0, 4.0)
            diff = d - d1
            rms_diff = rms(diff).cpu().numpy()
            change = rms_diff / scale
            f[:, 3] = h
            f[:, 6] = _log10(change) / 4.0
            f[:, 7] = _log10(change / np.maximum(h, 1e-3)) / 4.0
            f[:, 10] = 0.5
            f[:, 13] = highfreq_share(diff, rms_diff)
            if len(self._prev) >= 2:
                d2, lam2 = self._prev[-2]
                h_prev = lam1 - lam2
                ratio = np.where(h_prev > 1e-9, h / np.maximum(h_prev, 1e-9), 1.0)
                ratio_t = torch.from_numpy(ratio).to(d.device, d.dtype).reshape(-1, *([1] * (d.ndim - 1)))
                # D_t − (D_{t−1} + (D_{t−1} − D_{t−2})·ratio), written as diff − (D_{t−1} − D_{t−2})·ratio
                f[:, 8] = _log10(rms(diff - (d1 - d2) * ratio_t).cpu().numpy() / scale) / 4.0
                f[:, 9] = np.clip(_log10(change) - _log10(self._prev_change), -4.0, 4.0) / 2.0
                f[:, 10] = 1.0
            self._prev_change = change
        self._prev = (self._prev + [(d, lam_planning)])[-2:]
        if not np.isfinite(f).all():  # a non-finite feature would poison the monitor: name it
            bad = [FEATURE_NAMES[j] for j in range(N_FEATURES) if not np.isfinite(f[:, j]).all()]
            raise FloatingPointError(f"non-finite feature(s) {bad} at call {self.calls}")
        return f.astype(np.float32)


def features_as_dict(row: np.ndarray) -> dict[str, float]:
    """One image's feature vector as {name: value} (for traces and debugging)."""
    row = np.asarray(row).reshape(-1)
    if row.size != N_FEATURES:
        raise ValueError(f"expected {N_FEATURES} features {FEATURE_NAMES}, got {row.size}")
    return {name: float(v) for name, v in zip(FEATURE_NAMES, row)}


def heuristic_remaining_error(features: np.ndarray, rms_denoised: np.ndarray | None = None) -> np.ndarray:
    """Remaining RMSE to the run's end estimated without a model, per image [B] (the monitor's fallback).

    If the change of D shrinks by a ratio r < 1 per call, the changes still to come sum to about
    change·r/(1 − r) (a geometric tail, as in Richardson-style error estimates); the change is returned to
    absolute units with RMS(D).  Images without two changes yet get +inf (never "converged").
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != N_FEATURES:
        raise ValueError(f"features must be [B, {N_FEATURES}], got shape {f.shape}")
    rms_d = 10.0 ** f[:, 11] if rms_denoised is None else np.asarray(rms_denoised, dtype=np.float64)
    change = 10.0 ** (4.0 * f[:, 6]) * (rms_d + RELATIVE_FLOOR)
    r = np.clip(10.0 ** (2.0 * f[:, 9]), 0.0, 0.95)
    out = change * r / (1.0 - r)
    return np.where(f[:, 10] >= 1.0, out, math.inf)


__all__ = ["FEATURE_NAMES", "N_FEATURES", "FeatureTracker", "coarse_pool", "features_as_dict", "highfreq_share",
           "heuristic_remaining_error"]
