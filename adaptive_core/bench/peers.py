"""The peer samplers of the benchmark, behind one interface.

Every peer is run as ``run_peer(name, model, x, nfe, model_type=..., sigma_min=..., sigma_max=..., shift=...)``
on a k-diffusion denoiser ``model(x, σ_vector) -> denoised`` that counts its calls in ``model.nfe``.
It starts from the given ``x`` at σ_max (ve: σ_max·ε; flow: σ_max = 1 and x = ε), integrates the
probability-flow ODE down to the testbed's σ_min and ends with the denoised prediction there (the last step
σ_min → 0 of every host sampler), and returns ``(sample, real NFE)``.  Exceptions are named in the docstring
of the peer family concerned (LMS's last step, DEIS's grid end, the diffusers flow start, dpm_adaptive's NFE).

Names are ``"<sampler>+<schedule>"``:

* k-diffusion (Crowson; the samplers of Karras et al. 2022 "Elucidating the Design Space of Diffusion-Based
  Generative Models" (EDM), Lu et al. 2022 "DPM-Solver" / "DPM-Solver++"): ``euler``, ``heun``, ``dpm_2``,
  ``lms``, ``dpmpp_2m``, ``dpmpp_3m`` (k-diffusion's ``sample_dpmpp_3m_sde`` at η = 0: deterministic
  third-order multistep DPM-Solver++), each on the schedules ``karras``, ``exponential``, ``ays`` (ve;
  Sabour et al. 2024 "Align Your Steps") or ``simple`` (the SD3/Flux shifted schedule), ``karras``,
  ``exponential`` (flow, σ_max = 1).  For flow models they run directly on the flow σ's, as ComfyUI users do:
  the ODE dx/dσ = (x − D)/σ is the same in both parameterisations, so Euler is exact flow-matching Euler.
* ``dpm_fast`` and ``dpm_adaptive`` (Lu et al. 2022, DPM-Solver-fast and DPM-Solver-23 with error control).
* diffusers schedulers through an adapter: ``diffusers_dpmpp_2m`` (DPMSolverMultistepScheduler, Lu et al.
  2022 DPM-Solver++), ``diffusers_unipc_2``/``_3`` (UniPCMultistepScheduler bh2, Zhao et al. 2023 "UniPC"),
  ``diffusers_deis_2``/``_3`` (DEISMultistepScheduler, Zhang & Chen 2022 "DEIS"), on ``karras`` (ve, flow)
  and ``simple`` (flow).
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import schedules
from .kdiffusion_loader import load_kdiffusion_sampling


@dataclass(frozen=True)
class Setting:
    """Where a peer runs: the model type and the testbed's noise range (flow: σ_max = 1, shift)."""

    model_type: str
    sigma_min: float
    sigma_max: float
    shift: float | None = None


@dataclass(frozen=True)
class Peer:
    """One registered peer: ``run(model, x, nfe, setting) -> sample`` spends at most ``nfe`` model calls,
    unless ``exact_budget`` is False (dpm_adaptive: NFE set by a tolerance, reported)."""

    name: str
    model_types: tuple[str, ...]
    run: Callable[..., torch.Tensor]
    exact_budget: bool = True
    requires: str = "k_diffusion"  # the package it needs; peers whose package is missing are not listed


_PEERS: dict[str, Peer] = {}

SCHEDULES = {"ve": ("karras", "exponential", "ays"), "flow": ("simple", "karras", "exponential")}


def _register(name: str, model_types, run, exact_budget: bool = True, requires: str = "k_diffusion") -> None:
    _PEERS[name] = Peer(name, tuple(model_types), run, exact_budget, requires)


def peer_names(model_type: str) -> list[str]:
    """Names of the peers that run on ``model_type`` ("ve" or "flow"), in registry order.

    Peers whose package (k-diffusion, diffusers) is not installed are left out.
    """
    schedules.check_model_type(model_type)
    installed = {req: importlib.util.find_spec(req) is not None for req in {p.requires for p in _PEERS.values()}}
    return [p.name for p in _PEERS.values() if model_type in p.model_types and installed[p.requires]]


def get_peer(name: str) -> Peer:
    """The registered :class:`Peer` called ``name`` (KeyError listing the known names otherwise)."""
    try:
        return _PEERS[name]
    except KeyError:
        raise KeyError(f"unknown peer {name!r}; known: {sorted(_PEERS)}") from None


def run_peer(name: str, model, x: torch.Tensor, nfe: int, *, model_type: str, sigma_min: float,
             sigma_max: float, shift: float | None = None) -> tuple[torch.Tensor, int]:
    """Run peer ``name`` from ``x`` at σ_max with a budget of ``nfe`` model calls; return (sample, real NFE).

    ``model`` is a k-diffusion denoiser with ``reset_nfe()`` and an ``nfe`` counter (see
    :class:`adaptive_core.testbeds.base.Testbed`).  The real NFE is what the model counted; it never exceeds
    ``nfe`` except for ``dpm_adaptive``, whose tolerance is tuned to land near it (see :func:`_dpm_adaptive`).
    """
    peer = get_peer(name)
    schedules.check_model_type(model_type)
    if model_type not in peer.model_types:
        raise ValueError(f"peer {name!r} does not run on {model_type!r} models")
    if nfe < 2:
        raise ValueError(f"nfe must be >= 2, got {nfe}")
    if model_type == "flow" and (sigma_max != 1.0 or shift is None):
        raise ValueError("flow peers start from pure noise at sigma_max = 1 and need the model's shift")
    setting = Setting(model_type, float(sigma_min), float(sigma_max), shift)
    model.reset_nfe()
    out = peer.run(model, x, nfe, setting)
    used = model.nfe
    if peer.exact_budget and used > nfe:
        raise RuntimeError(f"peer {name!r} used {used} model calls for a budget of {nfe}")
    return out, used


# --- schedules ---------------------------------------------------------------------------------------------

def peer_sigmas(schedule: str, n: int, setting: Setting) -> torch.Tensor:
    """n noise levels from the testbed's σ_max to its σ_min, then 0 (float64).

    ``karras``: Karras et al. 2022 (EDM) eq. 5, ρ = 7.  ``exponential``: uniform in log σ.  ``ays``: Align Your
    Steps for SD1.5 (Sabour et al. 2024), mapped onto the testbed's range (a no-op for the SD1.5 range).
    ``simple``: SD3/Flux shifted-time schedule ending at σ_min (Esser et al. 2024).  n = 1 is σ_max → 0.
    """
    lo, hi = setting.sigma_min, setting.sigma_max
    if n == 1:
        return torch.tensor([hi, 0.0], dtype=torch.float64)
    if schedule == "karras":
        return schedules.karras_sigmas(n, lo, hi)
    if schedule == "exponential":
        return schedules.exponential_sigmas(n, lo, hi)
    if schedule == "ays":
        return schedules.ays_sigmas(n, lo, hi)
    if schedule == "simple":
        return schedules.flow_shift_sigmas(n, setting.shift, sigma_min=lo)
    raise ValueError(f"unknown schedule {schedule!r}")


# --- k-diffusion samplers on a σ grid ------------------------------------------------------------------

def _no_noise(*_args):
    raise RuntimeError("a deterministic peer asked for noise")


def _zero_noise(*_args):
    return 0.0  # DPM-Solver-fast/-adaptive add su·noise with su = 0 at η = 0; don't draw from the global RNG


#: name -> (k-diffusion function, extra kwargs, model calls per step; Heun-type steps to σ = 0 take one)
_KDIFF_GRID = {
    "euler": ("sample_euler", {}, 1),       # Karras et al. 2022, Algorithm 2 without churn (Euler)
    "heun": ("sample_heun", {}, 2),         # Karras et al. 2022, Algorithm 2 (Heun, last step Euler)
    "dpm_2": ("sample_dpm_2", {}, 2),       # DPM-Solver-2 (Lu et al. 2022) in Karras' σ form
    "lms": ("sample_lms", {}, 1),           # 4th-order linear multistep in σ (k-diffusion)
    "dpmpp_2m": ("sample_dpmpp_2m", {}, 1),  # DPM-Solver++(2M), Lu et al. 2022b
    "dpmpp_3m": ("sample_dpmpp_3m_sde", {"eta": 0.0, "noise_sampler": _no_noise}, 1),  # DPM-Solver++(3M), η = 0
}


def _kdiff_grid_runner(sampler: str, schedule: str):
    """A k-diffusion sampler on a ``schedule`` grid with the most steps whose model calls fit the budget.

    n levels cost n calls, or 2n − 1 for Heun-type samplers (two per step, one Euler call for the step to 0), so
    an even budget leaves one call unused there.  Every sampler's step to σ = 0 returns the denoised, except
    LMS, whose last step is its own 4th-order extrapolation to σ = 0 (k-diffusion's convention, kept).
    """
    fn_name, kwargs, calls_per_step = _KDIFF_GRID[sampler]

    def run(model, x, nfe, setting):
        n = nfe if calls_per_step == 1 else (nfe + 1) // 2
        sigmas = peer_sigmas(schedule, n, setting).to(device=x.device, dtype=x.dtype)
        return getattr(load_kdiffusion_sampling(), fn_name)(model, x, sigmas, disable=True, **kwargs)

    return run


for _sampler in _KDIFF_GRID:
    for _schedule in dict.fromkeys(SCHEDULES["ve"] + SCHEDULES["flow"]):
        _register(f"{_sampler}+{_schedule}", [mt for mt in SCHEDULES if _schedule in SCHEDULES[mt]],
                  _kdiff_grid_runner(_sampler, _schedule))


# --- DPM-Solver-fast and DPM-Solver-23 adaptive (Lu et al. 2022) -----------------------------------------

def _denoise_at(model, x, sigma: float) -> torch.Tensor:
    return model(x, x.new_full([x.shape[0]], sigma))


def _dpm_fast(model, x, nfe, setting):
    """k-diffusion ``sample_dpm_fast`` (Lu et al. 2022, DPM-Solver-fast: orders 3,...,3,2,1 uniform in log σ).

    It ends at σ_min with x, not the denoised; to end like the other peers the last of the ``nfe`` calls is
    D(x, σ_min), so DPM-Solver-fast itself gets ``nfe − 1`` calls.
    """
    k = load_kdiffusion_sampling()
    x = k.sample_dpm_fast(model, x, setting.sigma_min, setting.sigma_max, nfe - 1, disable=True,
                          noise_sampler=_zero_noise)
    return _denoise_at(model, x, setting.sigma_min)


#: ratio atol/rtol of k-diffusion's defaults (0.0078 / 0.05), kept while rtol is tuned
DPM_ADAPTIVE_ATOL_RATIO = 0.0078 / 0.05
_RTOL_CACHE: dict[tuple, float] = {}


def _dpm_adaptive_once(model, x, setting, rtol, max_calls):
    def guarded(x, sigma, **extra_args):  # a non-finite error estimate makes the controller loop forever
        if model.nfe >= max_calls:
            raise RuntimeError(f"dpm_adaptive passed {max_calls} model calls (rtol {rtol:.3g}): non-finite model?")
        return model(x, sigma, **extra_args)

    model.reset_nfe()
    x = load_kdiffusion_sampling().sample_dpm_adaptive(
        guarded, x, setting.sigma_min, setting.sigma_max, order=3, rtol=rtol, atol=rtol * DPM_ADAPTIVE_ATOL_RATIO,
        eta=0.0, noise_sampler=_zero_noise, disable=True)
    return _denoise_at(model, x, setting.sigma_min), model.nfe


def _dpm_adaptive(model, x, nfe, setting, max_tries: int = 8):
    """k-diffusion ``sample_dpm_adaptive`` (Lu et al. 2022, DPM-Solver-23 with PID step-size control, η = 0),
    then D(x, σ_min) (one call: it ends at σ_min with x).

    Its NFE follows from a tolerance, not a budget: rtol is found by bisection in log rtol over [1e-6, 1]
    (≤ ``max_tries`` full runs, atol = rtol·0.156, k-diffusion's default ratio) so that the real NFE lands as
    close as possible to ``nfe`` (ties: the run within budget); the tolerance is cached per (model name, model
    type, σ range, nfe), so later calls run once, and the NFE reported is that of the run returned.  Step sizes
    depend on the whole batch (the error norm is over the batch), and with k-diffusion's h_init = 0.05 the
    controller cannot finish in fewer than ~19 calls (SD1.5's σ range; ~22 on a flow range): for smaller
    budgets that minimum is what is reported.  Rejected steps count.
    """
    key = (getattr(model, "name", type(model).__name__), setting, nfe)
    max_calls = 50 * nfe + 1000
    if key in _RTOL_CACHE:
        return _dpm_adaptive_once(model, x, setting, _RTOL_CACHE[key], max_calls)[0]
    lo, hi = math.log(1e-6), 0.0  # NFE falls as log rtol grows
    best = None  # (distance to budget, over budget, rtol, sample, nfe)
    for _ in range(max_tries):
        log_rtol = 0.5 * (lo + hi)
        out, used = _dpm_adaptive_once(model, x, setting, math.exp(log_rtol), max_calls)
        cand = (abs(used - nfe), used > nfe, math.exp(log_rtol), out, used)
        if best is None or cand[:2] < best[:2]:
            best = cand
        if used == nfe:
            break
        if used > nfe:
            lo = log_rtol
        else:
            hi = log_rtol
    _RTOL_CACHE[key] = best[2]
    model.nfe = best[4]  # report the NFE of the run whose sample is returned
    return best[3]


_register("dpm_fast", ("ve", "flow"), _dpm_fast)
_register("dpm_adaptive", ("ve", "flow"), _dpm_adaptive, exact_budget=False)


# --- diffusers schedulers through an adapter -------------------------------------------------------------

#: SD1.5's discrete training schedule: its σ range is the ve testbeds' (14.6146 … 0.0292)
SD15_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
#: flow: UniPC and DEIS take log α, so they start at σ = 1 − 1e-6 (UniPC's own nudge) instead of 1
FLOW_START_NUDGE = 1e-6


def _diffusers_scheduler(kind: str, order: int, setting: Setting, **overrides):
    """A diffusers multistep scheduler configured as the adapter drives it.

    x0 ("sample") prediction; DPM-Solver++ midpoint (Lu et al. 2022b), UniPC bh2 with x0 prediction (Zhao et al.
    2023), DEIS log-ρ (Zhang & Chen 2022); lower order on the last steps as diffusers does below 15 steps.
    ve: SD1.5 betas and Karras σ's; flow: flow σ's with the model's shift.  ``overrides`` go to the constructor.
    """
    import diffusers

    cls, kwargs = {
        "dpmpp": (diffusers.DPMSolverMultistepScheduler,
                  dict(algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero")),
        "unipc": (diffusers.UniPCMultistepScheduler, dict(solver_type="bh2", predict_x0=True, final_sigmas_type="zero")),
        "deis": (diffusers.DEISMultistepScheduler, dict(algorithm_type="deis", solver_type="logrho")),
    }[kind]
    if setting.model_type == "ve":
        kwargs.update(SD15_BETAS, use_karras_sigmas=True)
    else:
        kwargs.update(use_flow_sigmas=True, flow_shift=setting.shift)
    kwargs.update(overrides)
    return cls(solver_order=order, prediction_type="sample", lower_order_final=True, **kwargs)


def _timesteps_for(scheduler, sigmas: torch.Tensor, model_type: str) -> torch.Tensor:
    """Training timesteps of the nonzero σ's (ve: interpolated in log σ over the training table; flow: 1000·σ).

    Only the step bookkeeping reads them (their count); the update maths reads ``scheduler.sigmas``.
    """
    s = sigmas[:-1]
    if model_type == "flow":
        return (s * scheduler.config.num_train_timesteps).round().long()
    table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double().log()
    idx = torch.searchsorted(table, s.log()).clamp(1, len(table) - 1)
    w = (s.log() - table[idx - 1]) / (table[idx] - table[idx - 1])
    return (idx - 1 + w).round().long()


def _diffusers_runner(kind: str, order: int, schedule: str):
    """The adapter: a diffusers scheduler driving the k-diffusion denoiser, one model call per scheduler step.

    The scheduler's σ's are replaced by the testbed's grid (:func:`peer_sigmas`, float64), so every peer starts at
    the testbed's σ_max and its last nonzero σ is the testbed's σ_min.  Why: ve — diffusers' own Karras grid for
    SD1.5 betas is the same grid up to float32 rounding (14.614647 … 0.0291675; tests check 1e-3), so this only
    makes it exact; flow — diffusers' own flow grid starts at shift(0.999) = 0.99967 (DPM, DEIS) or 1 − 1e-6
    (UniPC) and ends at shift(0.999/n) or shift(1/n) (0.25 at n = 10, shift 3), far above a testbed's σ_min, and
    its Karras option ignores ``use_flow_sigmas`` in DPM/DEIS (σ's up to 157 used as flow σ's) and maps a VP
    range onto (0.0099, 0.994) in UniPC; so flow karras here is the flow-σ Karras grid the k-diffusion peers use.

    ve: diffusers works on VP latents x_vp = x_ve/√(1 + σ²); each step reads σ = ``sigmas[step_index]``, calls
    ``model(x_vp·√(1 + σ²), σ)`` and hands the scheduler the denoised as a "sample" prediction.  The last step
    (σ_min → 0) returns the denoised (DPM, UniPC: ``final_sigmas_type="zero"``).  Exceptions: DEIS's own grid
    ends σ_min → σ_min (a no-op step, so it returns x(σ_min) and wastes its last call) and its ε-form cannot step
    to σ = 0, so the adapter returns the denoised of that last call itself.  Flow: DPM starts at σ = 1 exactly
    (λ = −∞ gives a DDIM first step); UniPC and DEIS divide by α = 1 − σ and start at 1 − 1e-6 from x = ε (a
    mismatch of order 1e-6).  UniPC's corrector over that first, infinitely long step in λ leaves an error floor
    of ~1e-4 on the Gaussian testbed at ≥ 80 NFE; it is UniPC's own behaviour on flow models (Wan uses it).
    """
    def run(model, x, nfe, setting):
        with warnings.catch_warnings():  # diffusers' numpy calls on torch tensors warn under numpy 2 (harmless)
            warnings.simplefilter("ignore", DeprecationWarning)
            return _drive(model, x, nfe, setting)

    def _drive(model, x, nfe, setting):
        sched = _diffusers_scheduler(kind, order, setting)
        sched.set_timesteps(nfe)
        sigmas = peer_sigmas(schedule, nfe, setting)
        if setting.model_type == "flow" and kind != "dpmpp":
            sigmas[0] = 1.0 - FLOW_START_NUDGE
        sched.sigmas = sigmas
        sched.timesteps = _timesteps_for(sched, sigmas, setting.model_type)
        sched.set_begin_index(0)
        ve = setting.model_type == "ve"
        sample = x / math.sqrt(1.0 + float(sigmas[0]) ** 2) if ve else x
        for i in range(nfe):
            assert sched.step_index in (None, i)  # None before the first step() (begin_index = 0)
            sigma = float(sched.sigmas[i])
            scale = math.sqrt(1.0 + sigma ** 2) if ve else 1.0
            denoised = model(sample * scale, x.new_full([x.shape[0]], sigma))
            if kind == "deis" and i == nfe - 1:
                return denoised
            sample = sched.step(denoised, sched.timesteps[i], sample).prev_sample
        return sample

    return run


_DIFFUSERS = (("diffusers_dpmpp_2m", "dpmpp", 2), ("diffusers_unipc_2", "unipc", 2), ("diffusers_unipc_3", "unipc", 3),
              ("diffusers_deis_2", "deis", 2), ("diffusers_deis_3", "deis", 3))
for _name, _kind, _order in _DIFFUSERS:
    _register(f"{_name}+karras", ("ve", "flow"), _diffusers_runner(_kind, _order, "karras"), requires="diffusers")
    _register(f"{_name}+simple", ("flow",), _diffusers_runner(_kind, _order, "simple"), requires="diffusers")
