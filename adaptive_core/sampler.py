"""``sample_adaptive``: ADO's k-diffusion-style entry point.

The loop per model call: evaluate D at the current point → correct the last step with it (UniC-style,
one order higher, Zhao et al. 2023) and read the predictor–corrector gap as the error estimate → report
(callback, trace) → decide the next noise level (budget plan or tolerance control) → predict the next
point with the variable-step multistep exponential integrator (:mod:`adaptive_core.solver`).

All decisions are per sample, in half-log-SNR λ, so an image's result does not depend on its batch and
the same code serves ve and flow models.  The model is called with one σ per sample.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from . import controller as ctl
from .domain import AUTO_POLICY
from .schedules import check_model_type, half_log_snr, sigma_from_half_log_snr, signal_scale
from .solver import exponential_step, nan_guard, per_sample, scaled_error
from .trace import StepRecord, Trace

MODES = ("budget", "tolerance", "fixed")

#: Default options of :func:`sample_adaptive` (chosen on the benchmark across all four testbed
#: configurations together, not per testbed).
DEFAULTS = dict(mode="budget", rtol=0.05, atol=0.0078, max_order="auto", corrector=True, rho=10.0,
                schedule="ado", final_correction=True, predictor="auto",
                adapt=True, activity_exponent=0.25, high_order_max_step=1.5, second_order_max_step="auto",
                prediction="auto", flow_shift="auto")

#: The time shift of a flow model's plan when the model declares none: SD3's default (Esser et al. 2024).
DEFAULT_FLOW_SHIFT = 3.0

#: Options of the quality monitor (:mod:`adaptive_core.monitor`); all off by default, and recorded in the
#: trace's options only when used.
MONITOR_OPTIONS = dict(quality_target=None, monitor=None, monitor_device="cpu")

#: Who decides the step sizes: None / "heuristic" (the budget planner, the default), "policy:NAME" (a PPO policy
#: of :mod:`adaptive_core.policy`, by bundled name or manifest path), "policy:auto" (the bundled policy that
#: :mod:`adaptive_core.domain` picks for the run's model type and guidance, else the heuristic) or a policy object
#: with ``decide``.  Recorded in the trace's options only when given (for "policy:auto", the choice made).
CONTROLLER_OPTIONS = dict(controller=None)


def _model_sampling(model):
    """ComfyUI's model_sampling object behind a sampler's ``model``, or None: ``model.inner_model.model_patcher
    .get_model_object("model_sampling")`` (``comfy/samplers.py::KSamplerX0Inpaint``) or
    ``model.inner_model.inner_model.model_sampling``."""
    inner = getattr(model, "inner_model", None)
    ms = None
    patcher = getattr(inner, "model_patcher", None)
    if patcher is not None and hasattr(patcher, "get_model_object"):
        try:
            ms = patcher.get_model_object("model_sampling")
        except Exception:  # a host without that object: fall back below
            ms = None
    if ms is None:
        ms = getattr(getattr(inner, "inner_model", None), "model_sampling", None)
    return ms


def detect_model_type(model) -> str:
    """"flow" if ``model`` wraps a ComfyUI model whose model_sampling is CONST (rectified flow), else "ve".

    Finds the model_sampling object as :func:`_model_sampling` does and checks its class hierarchy by name, so
    no host module is imported.
    """
    ms = _model_sampling(model)
    if ms is not None and any(c.__name__ == "CONST" for c in type(ms).__mro__):
        return "flow"
    return "ve"


def detect_flow_shift(model) -> float | None:
    """The time shift s a flow model declares (σ = s·t / (1 + (s − 1)·t), Esser et al. 2024), or None.

    ComfyUI: σ at half the schedule, ``model_sampling.percent_to_sigma(0.5)`` = s/(1 + s), which covers both
    ``time_snr_shift`` (SD3, AuraFlow, …: s = ``shift``) and ``flux_time_shift`` (s = e^μ), so s = σ/(1 − σ).
    Otherwise a ``shift`` attribute of ``model`` (ADO's testbeds and peers' settings declare it).  Anything
    that is not a finite number > 0 counts as undeclared.
    """
    value = None
    ms = _model_sampling(model)
    half = getattr(ms, "percent_to_sigma", None)
    if callable(half):
        try:
            sigma = float(half(0.5))
            value = sigma / (1.0 - sigma) if 0.0 < sigma < 1.0 else None
        except (AttributeError, TypeError, ValueError, RuntimeError):  # a host object that cannot answer
            value = None
    if value is None:
        value = getattr(model, "shift", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


#: Where ``prediction="hybrid"`` switches from the data- to the noise-prediction form: steps that start at
#: λ ≥ this (σ_ve ≤ e; flow σ ≤ 0.73) take the noise form.
HYBRID_SWITCH_LAMBDA = -1.0
#: Budgets up to this many model calls count as few-step: there a flow model plans in shifted time.
FEW_STEP_BUDGET = 10
#: Guided runs above this CFG scale take ``max_order="auto"`` as 2 (:func:`resolve_max_order`).
HIGH_GUIDANCE_SCALE = 2.0
#: ``max_order="auto"`` everywhere else: the order the sampler had before the rule, and every policy trained on.
DEFAULT_MAX_ORDER = 3
#: On guided runs at CFG :data:`LONG_STEP_ORDER1_SCALE` or above, ``second_order_max_step="auto"`` allows predictor
#: order 2 only for steps up to this length in λ; longer steps take order 1 (:func:`resolve_second_order_max_step`).
GUIDED_SECOND_ORDER_MAX_STEP = 1.0
LONG_STEP_ORDER1_SCALE = 3.0


def noise_form_from_lambda(prediction: str) -> float:
    """The λ from which steps take the noise-prediction form: −inf ("noise"), +inf ("data") or
    :data:`HYBRID_SWITCH_LAMBDA` ("hybrid")."""
    return {"noise": -math.inf, "data": math.inf, "hybrid": HYBRID_SWITCH_LAMBDA}[prediction]


def check_flow_plan_options(opt: dict) -> None:
    """Raise ValueError unless ``prediction`` is "auto", "data", "noise" or "hybrid", ``predictor`` is "auto",
    "midpoint" or "exact", and ``flow_shift`` is "auto", None or a finite number > 0."""
    prediction, shift = opt["prediction"], opt["flow_shift"]
    if prediction not in ("auto", "data", "noise", "hybrid"):
        raise ValueError(f"unknown prediction {prediction!r}: expected 'auto', 'data', 'noise' or 'hybrid'")
    if opt["predictor"] not in ("auto", "midpoint", "exact"):
        raise ValueError(f"unknown predictor {opt['predictor']!r}: expected 'auto', 'midpoint' or 'exact'")
    if shift is not None and shift != "auto" and (isinstance(shift, bool) or not isinstance(shift, (int, float))
                                                  or not math.isfinite(shift) or shift <= 0):
        raise ValueError(f"flow_shift must be 'auto', None or a finite number > 0, got {shift!r}")


def resolve_max_order(max_order, model, extra_args: dict | None = None) -> int:
    """The predictor's highest order for a run: ``max_order`` as given (1, 2 or 3), or for "auto" 2 on a guided run
    whose CFG scale (:func:`detect_guidance_scale`) is above :data:`HIGH_GUIDANCE_SCALE`, else
    :data:`DEFAULT_MAX_ORDER`.  ValueError for anything else.

    Why: under large guidance the denoised prediction is far from smooth in λ, and extrapolating it with a
    quadratic overshoots.  DPM-Solver++ (Lu et al. 2022b, §5) finds its third-order multistep solver unstable
    under large CFG scales and recommends the second-order one (2M) for guided sampling; UniPC (Zhao et al. 2023)
    likewise runs order 2 there.  The threshold was chosen on the two class-conditional networks (ve and flow,
    validation seeds 20000–20063): order 2 won at CFG 2.5–7 from 6 NFE on, and had a mixed record at CFG 1.5–2
    (1.05–1.12× the error of order 3 on the MNIST network at CFG 2, below 1 on the digits one).  Measured on seeds
    30000–30063 (``python -m adaptive_core.bench.guided_order``, ``docs/bench/guided_order.md``): at CFG 2.5–7,
    0.80× the error of order 3 in geometric mean over 96 cells (0.73–0.80× at each budget from 6 to 20 NFE, 1.02×
    at 5); against the best fixed peer, ADO went from 0.92× to 0.80× its error on flow runs and from 1.68× to 1.23×
    on ve runs.  An unknown scale keeps the default.
    """
    if max_order == "auto":
        scale = detect_guidance_scale(model, extra_args)
        return 2 if scale is not None and scale > HIGH_GUIDANCE_SCALE else DEFAULT_MAX_ORDER
    if isinstance(max_order, bool) or not isinstance(max_order, (int, float)) or max_order not in (1, 2, 3):
        raise ValueError(f"max_order must be 1, 2, 3 or 'auto', got {max_order!r}")
    return int(max_order)


def resolve_second_order_max_step(value, model, extra_args: dict | None = None, order_is_auto: bool = True
                                  ) -> float | None:
    """The longest step in λ the predictor may take at order 2 or above (longer steps take order 1, the exponential
    Euler step of DDIM, with the UniC corrector after it as always): ``value`` as given (a number > 0, or None for
    no limit), or for "auto" :data:`GUIDED_SECOND_ORDER_MAX_STEP` on a guided run whose CFG scale
    (:func:`detect_guidance_scale`) is at least :data:`LONG_STEP_ORDER1_SCALE` and whose ``max_order`` is "auto"
    (``order_is_auto``; a run that names its order, e.g. a saved ComfyUI workflow, keeps it), else None.
    ValueError for anything else.

    Why: a multistep predictor extrapolates the denoised prediction from earlier points, and under large guidance
    that prediction is rough in λ, so over a long step the extrapolation overshoots; the corrector, which
    interpolates with the new evaluation, does not.  With few steps every step is long, which is where DPM-Solver
    (Lu et al. 2022) already lowers the order, and where, under large CFG scales, first-order samplers (DDIM, Euler)
    beat the multistep ones.  The limit was chosen on the two class-conditional networks at CFG 3/5/7, ve and
    flow, 5/6/8/10/15 calls (validation seeds 20000–20031): limits of 0.6/0.8/1.0/1.2 in λ gave 0.825/0.831/
    0.822/0.879× the error of order 2 without a limit on ve runs (worst cells 1.25/1.09/1.08/1.11) and 0.863/0.876/
    0.874/0.922× on flow runs; 1.0 had the fewest cells above 1.05.  The gain is at 5–8 calls, where every step is
    long, and grows with the scale: at CFG 2.5 the limit was level (1.02× on ve, 1.00× on flow; worst cells 1.15 and
    1.37 at 5 calls), at 3 a gain (about 0.95×), at 5 and 7 a large one, hence the scale threshold.  Measured on
    seeds 30000–30063 (``python -m adaptive_core.bench.guided_order``, ``docs/bench/guided_order.md``).
    """
    if value == "auto":
        scale = detect_guidance_scale(model, extra_args)
        guided = scale is not None and scale >= LONG_STEP_ORDER1_SCALE
        return GUIDED_SECOND_ORDER_MAX_STEP if guided and order_is_auto else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"second_order_max_step must be a number > 0, None or 'auto', got {value!r}")
    return float(value)


def detect_guidance_scale(model, extra_args: dict | None = None) -> float | None:
    """The classifier-free guidance scale of a run (Ho & Salimans 2022), or None where it declares none.

    ComfyUI: the guider the sampler's model wraps, ``model.inner_model.cfg`` (``comfy/samplers.py::CFGGuider``;
    Flux's basic guider keeps 1).  A1111/Forge: ``extra_args["cond_scale"]`` (``p.cfg_scale``, which
    ``modules/sd_samplers_kdiffusion.py::KDiffusionSampler`` hands its CFG denoiser).  Otherwise a ``cfg_scale``
    attribute of ``model`` (ADO's testbeds).
    """
    from_args = extra_args.get("cond_scale") if isinstance(extra_args, dict) else None
    for value in (getattr(getattr(model, "inner_model", None), "cfg", None), from_args,
                  getattr(model, "cfg_scale", None)):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def resolve_predictor(predictor: str, flow_shift: float | None) -> str:
    """The predictor's weights for a run: "auto" is "exact" integration of the interpolant on a flow model's
    shifted-time plan and the damped "midpoint" weights (DPM-Solver++(2M), Lu et al. 2022b) otherwise.  On the
    shifted-time plan the last step is long and starts at low noise, where the noise prediction it extrapolates
    barely changes; there "exact" had 0.95× the error of "midpoint" at 5–10 NFE (geometric mean over seven
    unguided flow testbeds, validation seeds; ``docs/bench/flow_plan.md``) and lowered the FD of the MNIST
    network's samples at 5–6 NFE from 22 to 14."""
    if predictor != "auto":
        return predictor
    return "exact" if flow_shift is not None else "midpoint"


def resolve_flow_plan(model, opt: dict, model_type: str, budget: int,
                      extra_args: dict | None = None) -> tuple[float | None, str]:
    """(flow_shift, prediction) that a run with ``budget`` model calls uses, from the options (checked by
    :func:`check_flow_plan_options`).

    "auto" (both defaults) changes only unguided flow runs, those whose guidance scale is known to be 1
    (:func:`detect_guidance_scale`): there ``flow_shift`` is the model's own shift (:func:`detect_flow_shift`,
    else :data:`DEFAULT_FLOW_SHIFT`) in budget mode with ADO's own plan and at most :data:`FEW_STEP_BUDGET`
    calls, where the plan is uniform in shifted time (:func:`~adaptive_core.controller.plan_time_shift`), and
    ``prediction`` is "hybrid" outside tolerance mode.  Everywhere else "auto" resolves to None (the ρ plan)
    and "data".  A number for ``flow_shift``, or a named prediction, is used as given (a shift only where the
    few-step plan applies; None keeps the ρ plan).

    "hybrid" takes the data-prediction form (DPM-Solver++, Lu et al. 2022b) for steps that start at high
    noise and the noise-prediction form (DPM-Solver / DEIS, Lu et al. 2022a; Zhang & Chen 2022) from
    :data:`HYBRID_SWITCH_LAMBDA` on.  Why: along a flow model's ODE the denoised prediction changes little at
    high noise and the noise prediction changes little at low noise, and each form extrapolates the quantity
    that changes least.  On seven unguided flow testbeds (five trained networks, two analytic) at 5–30 NFE,
    the unguided rule (with :func:`resolve_predictor`) has 0.73× the error of the ρ plan in data prediction
    (geometric mean on seeds it was not chosen on; 0.62× at ≤ 10 NFE).  Under guidance (CFG 2 on the two
    class-conditional networks) it was 1.3–1.9× worse at 8–10 NFE, as noise-prediction solvers are under large
    guidance (Lu et al. 2022b), so a guided run keeps the data form and the ρ plan (``docs/bench/flow_plan.md``).
    """
    shift, prediction = opt["flow_shift"], opt["prediction"]
    unguided_flow = model_type == "flow" and detect_guidance_scale(model, extra_args) == 1.0
    few_step = opt["mode"] == "budget" and opt["schedule"] == "ado" and budget <= FEW_STEP_BUDGET
    if model_type != "flow" or not few_step or (shift == "auto" and not unguided_flow):
        shift = None
    elif shift == "auto":
        detected = detect_flow_shift(model)
        shift = DEFAULT_FLOW_SHIFT if detected is None else detected
    shift = None if shift is None else float(shift)
    if prediction == "auto":
        prediction = "hybrid" if unguided_flow and opt["mode"] != "tolerance" else "data"
    return shift, prediction


def validate_sigmas(sigmas, model_type: str) -> torch.Tensor:
    """Check a host's σ plan and return it as float64 on the CPU, trailing repeated zeros removed.

    Raises ValueError for: not 1-D, fewer than two values, NaN/inf, negative values, values not sorted
    descending (strictly, except a repeated trailing 0 as Forge sends), or flow σ above 1.
    """
    if not torch.is_tensor(sigmas):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    s = sigmas.detach().to("cpu", torch.float64)
    if s.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor of noise levels, got shape {tuple(s.shape)}")
    if s.numel() == 0:
        raise ValueError("sigmas is empty: expected the host's noise levels, descending, usually ending in 0")
    if not torch.isfinite(s).all():
        raise ValueError(f"sigmas contains NaN or inf: {s.tolist()}")
    if (s < 0).any():
        raise ValueError(f"sigmas contains negative values: {s.tolist()}")
    while s.numel() >= 2 and s[-1] == 0 and s[-2] == 0:
        s = s[:-1]
    if s.numel() < 2:
        raise ValueError(f"sigmas needs at least a start and an end noise level, got {s.tolist()}")
    if not (s[1:] < s[:-1]).all():
        raise ValueError(f"sigmas must be sorted strictly descending (a repeated trailing 0 is allowed): {s.tolist()}")
    if model_type == "flow" and s[0] > 1.0:
        raise ValueError(f"flow-model sigmas must lie in [0, 1], got a first value {float(s[0])}")
    return s


_sig = sigma_from_half_log_snr
_alpha = signal_scale


def _host_plan(grid: torch.Tensor, n_intervals: int, model_type: str, batch: int) -> np.ndarray:
    """The host's own grid as the plan (resampled in λ over a uniform index if the counts differ)."""
    lam = half_log_snr(grid.numpy(), model_type)
    if lam.size != n_intervals + 1:
        lam_f = np.concatenate([ctl.planning_start(lam[:1]), lam[1:]])
        pos = np.linspace(0, lam.size - 1, n_intervals + 1)
        lam_new = np.interp(pos, np.arange(lam.size), lam_f)
        lam_new[0], lam_new[-1] = lam[0], lam[-1]
        lam = lam_new
    return np.repeat(lam[None, :], batch, 0)


@torch.no_grad()
def sample_adaptive(model: Callable, x: torch.Tensor, sigmas, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None, *,
                    nfe_budget: int | None = None, model_type: str | None = None, trace: Trace | None = None,
                    **options) -> torch.Tensor:
    """Sample the probability-flow ODE from ``x`` at ``sigmas[0]`` to ``sigmas[-1]`` within ``nfe_budget`` calls.

    Args:
        model: k-diffusion denoiser, ``model(x, sigma_vector, **extra_args)`` → denoised; one call = one NFE.
        x: the host's initial sample at ``sigmas[0]`` (batch first).
        sigmas: the host's plan, descending, usually ending in 0 (a repeated trailing 0 is allowed).  ADO
            uses its endpoints (``schedule="ado"``) or the grid itself (``schedule="host"``).  A plan that
            ends above 0 returns x at that level, as k-diffusion samplers do.
        extra_args: passed to the model unchanged.
        callback: called once per model call with a k-diffusion dict (``x``, ``i``, ``sigma``, ``sigma_hat``,
            ``denoised``) plus ``nfe``, ``nfe_budget`` and ``error``; ``i`` is monotone and the last call
            reports ``i = nfe_budget − 1`` so host progress bars end full.
        disable: accepted for the k-diffusion signature (ADO draws no progress bar itself).
        nfe_budget: hard cap on model calls, rejected steps included; default ``len(sigmas) − 1`` (the
            host's step count, counted before a repeated trailing 0 is dropped).  Runs without autograd, as
            k-diffusion's samplers do.
        model_type: "ve" or "flow"; None detects a ComfyUI flow model (CONST), else "ve".
        trace: a :class:`~adaptive_core.trace.Trace` to fill with what the run did.
        **options (defaults in :data:`DEFAULTS`; an unknown name raises TypeError):
            ``mode``: "budget" (plan the budget's steps), "tolerance" (steps sized to ``rtol``/``atol``,
            stopping early when the estimate allows) or "fixed" (follow the host grid exactly);
            ``rtol``, ``atol``: tolerances of the scaled error estimate (Hairer et al. 1993);
            ``max_order`` (1–3, or "auto": 2 on guided runs above CFG 2, else 3; :func:`resolve_max_order`):
            predictor order, the corrector adds one; ``high_order_max_step``: order 3
            only for steps up to this length in λ (None: always); ``second_order_max_step``: orders 2–3 only for
            steps up to this length in λ (None: always; "auto": 1.0 on guided runs at CFG 3 or above whose
            ``max_order`` is "auto", else None;
            :func:`resolve_second_order_max_step`); ``corrector`` (bool): UniC corrector;
            ``predictor``: "midpoint" (damped, DPM-Solver++(2M)-style), "exact" integration of the interpolant, or
            "auto" (exact on a flow model's shifted-time plan, else midpoint; :func:`resolve_predictor`);
            ``prediction``: "data" (DPM-Solver++), "noise" (DPM-Solver/DEIS form), "hybrid" (data form at high
            noise, noise form from λ = :data:`HYBRID_SWITCH_LAMBDA` on) or "auto" (hybrid for unguided flow runs
            outside tolerance mode, else data; :func:`resolve_flow_plan`); ``schedule``: "ado" (own plan) or "host"
            (the host grid as plan); ``rho``: shape of the first plan (uniform in σ^{1/ρ}; inf = λ-uniform; "prior"
            = the activity prior of :func:`~adaptive_core.controller.prior_plan`); ``flow_shift``: a flow model's
            few-step plan (budget mode, at most :data:`FEW_STEP_BUDGET` calls) is uniform in shifted time with this
            shift ("auto": the model's own, :func:`detect_flow_shift`, else :data:`DEFAULT_FLOW_SHIFT`, on unguided
            runs only, :func:`detect_guidance_scale`; None: the ρ plan); ``adapt`` (bool): re-plan the remaining
            steps (ρ plans) of a sample once its measured activity decays faster than the plan assumes, with
            ``activity_exponent`` (see :func:`~adaptive_core.controller.replan_lambdas`); ``final_correction``
            (bool): apply the last corrector to the returned sample.
            Quality monitor (defaults in :data:`MONITOR_OPTIONS`): ``quality_target`` (RMSE > 0, budget mode
            with a plan ending in 0 only): each image stops, from its third call on, as soon as the estimated
            RMSE between its current denoised prediction and the sample its whole budget would give is at
            most the target, and returns that prediction (corrected as a final sample); a planned step that
            would overshoot the target by far is shortened to land on it (:func:`_land_on_target`); never
            more calls than the budget.  ``monitor``: the learned estimator (None: the bundled one when a quality
            target is set, else none; True or "bundled"; a manifest path; a
            :class:`~adaptive_core.monitor.QualityMonitor`; False: the model-free heuristic of
            :func:`~adaptive_core.features.heuristic_remaining_error`).  A monitor that cannot be loaded
            (missing, corrupt: sha256 mismatch, no ONNX Runtime) falls back to the heuristic with a warning,
            also written to ``trace.notes``.  ``monitor_device``: "cpu", "cuda" or "auto" (ONNX Runtime's
            execution provider).  With a monitor or target, every trace record holds the estimates and the
            callback dict gets ``remaining_error`` and ``reference_error`` (float64 [B], NaN where none).
            Controller (default in :data:`CONTROLLER_OPTIONS`): ``controller`` = None or "heuristic" (the budget
            planner above, bit-identical to not passing it) or "policy:NAME" (a PPO step policy of
            :mod:`adaptive_core.policy`, by bundled name in policies/ or manifest path; budget mode with a plan
            ending in 0): after each call the policy scales the plan's next step as a share of the remaining
            λ-span (TPDM-style), may end an image early, never moves the last call off the end point (the
            budget holds), and falls back to the plan's step where the observation leaves its training range
            (``decision="policy-fallback"`` and a note in the trace).  It reads the bundled quality monitor's
            estimate; a policy or monitor that cannot be loaded falls back to the heuristic with a warning and
            a trace note.  "policy:auto": the domain adapter (:mod:`adaptive_core.domain`) picks the bundled
            policy whose scope covers the run's model type, guidance and budget (the narrowest), or the heuristic
            where none does; the trace notes which.

    Returns:
        The sample at ``sigmas[-1]``: the denoised sample when the plan ends in 0.

    The integrator is DPM-Solver++(pM) for variable steps (Lu et al. 2022) with a UniC corrector (Zhao et al.
    2023), in data- or noise-prediction form per step; the tolerance controller is a PI controller (Gustafsson
    1991).
    """
    unknown = set(options) - set(DEFAULTS) - set(MONITOR_OPTIONS) - set(CONTROLLER_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; "
                        f"known: {sorted({**DEFAULTS, **MONITOR_OPTIONS, **CONTROLLER_OPTIONS})}")
    controller_spec = options.pop("controller", None)
    model_type = detect_model_type(model) if model_type is None else model_type
    check_model_type(model_type)
    grid = validate_sigmas(sigmas, model_type)
    if nfe_budget is None:  # the host's step count, a repeated trailing 0 included (Forge's flow grids)
        nfe_budget = len(sigmas) - 1
    if isinstance(nfe_budget, bool) or not isinstance(nfe_budget, int) or nfe_budget < 1:
        raise ValueError(f"nfe_budget must be an integer ≥ 1, got {nfe_budget!r}")
    domain_note = None
    if isinstance(controller_spec, str) and controller_spec == AUTO_POLICY:   # the budget is part of the job
        controller_spec, domain_note = _policy_for_job(model, model_type, extra_args, nfe_budget)
    using_policy = controller_spec is not None and not (isinstance(controller_spec, str) and controller_spec == "heuristic")
    watching = using_policy or any(options.get(k, v) is not v for k, v in MONITOR_OPTIONS.items()
                                   if k != "monitor_device")
    opt = {**DEFAULTS, **(MONITOR_OPTIONS if watching else {}), **options}
    if using_policy:   # the plan the policy learned on, unless the caller chose (adaptive_core.policy.LEGACY_BASE_PLAN)
        from .policy import policy_base_options
        opt.update({k: v for k, v in policy_base_options(controller_spec).items() if k not in options})
    if controller_spec is not None:
        opt["controller"] = controller_spec if isinstance(controller_spec, str) else repr(controller_spec)
    mode = opt["mode"]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
    if opt["schedule"] not in ("ado", "host"):
        raise ValueError(f"unknown schedule {opt['schedule']!r}: expected 'ado' or 'host'")
    opt["second_order_max_step"] = resolve_second_order_max_step(opt["second_order_max_step"], model, extra_args,
                                                                 order_is_auto=opt["max_order"] == "auto")
    opt["max_order"] = max_order = resolve_max_order(opt["max_order"], model, extra_args)
    if float(opt["rtol"]) <= 0 or float(opt["atol"]) < 0:
        raise ValueError(f"rtol must be > 0 and atol ≥ 0, got rtol={opt['rtol']} atol={opt['atol']}")
    check_flow_plan_options(opt)
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError(f"x must be a batched tensor [B, ...], got {type(x).__name__} "
                         f"{tuple(x.shape) if torch.is_tensor(x) else ''}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    if mode == "fixed" and nfe_budget < grid.numel() - 1:
        raise ValueError(f"mode='fixed' follows the grid's {grid.numel() - 1} steps, above nfe_budget={nfe_budget}")
    extra_args = {} if extra_args is None else extra_args

    ends_in_zero = bool(grid[-1] == 0)
    sigma_lo = float(grid[-2] if ends_in_zero else grid[-1])
    B = x.shape[0]
    budget = nfe_budget if mode != "fixed" else grid.numel() - 1
    opt["flow_shift"], opt["prediction"] = resolve_flow_plan(model, opt, model_type, budget, extra_args)
    opt["predictor"] = resolve_predictor(opt["predictor"], opt["flow_shift"])
    lam_start = np.full(B, half_log_snr(float(grid[0]), model_type))
    lam_lo = np.full(B, half_log_snr(sigma_lo, model_type))
    # the plan: evaluation points, plus (for a plan ending above 0) the end point reached without a call
    n_intervals = budget - 1 if ends_in_zero else budget
    if n_intervals < 1:
        plan = lam_start[:, None].copy()
    elif mode == "fixed" or opt["schedule"] == "host":
        plan = _host_plan(grid[:-1] if ends_in_zero else grid, n_intervals, model_type, B)
    elif opt["flow_shift"] is not None:
        plan = ctl.plan_time_shift(lam_start, lam_lo, n_intervals, opt["flow_shift"])
    elif opt["rho"] == "prior":
        plan = ctl.prior_plan(lam_start, lam_lo, n_intervals, float(opt["activity_exponent"]))
    else:
        plan = ctl.plan_lambdas(lam_start, lam_lo, n_intervals, float(opt["rho"]))
    if using_policy:
        _check_policy_run(controller_spec, mode, ends_in_zero)
    if trace is not None:
        trace.start(B, model_type, budget, grid.tolist(), {**opt, "nfe_budget": budget})
        if domain_note is not None:
            trace.notes.append(domain_note)
    watch = _quality_watch(opt, mode, ends_in_zero, lam_start, lam_lo, budget, trace) if watching else None
    policy = _load_step_policy(controller_spec, watch, opt, trace) if using_policy else None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # ±inf λ are handled explicitly
        return _run(model, x, extra_args, callback, trace, opt, mode, model_type, budget, ends_in_zero,
                    n_intervals, lam_start, lam_lo, plan, max_order, watch, policy)


def _policy_for_job(model, model_type, extra_args, nfe_budget=None):
    """("policy:NAME" of the bundled policy the domain adapter picks for this run, or "heuristic" where none
    covers it; the trace note saying which and why): :func:`adaptive_core.domain.select_policy`."""
    from .domain import job_domain, select_policy
    domain = job_domain(model, model_type, extra_args, nfe_budget)
    name = select_policy(domain)
    if name is None:
        return "heuristic", f"domain adapter: {domain.describe()} -> heuristic (no bundled policy covers it)"
    return f"policy:{name}", f"domain adapter: {domain.describe()} -> policy:{name}"


def _check_policy_run(spec, mode, ends_in_zero):
    """Validate ``controller``: "heuristic", "policy:NAME" or an object with ``decide``; budget mode, plan ending in 0."""
    if isinstance(spec, str):
        if not spec.startswith("policy:") or len(spec) <= len("policy:"):
            raise ValueError(f"controller must be 'heuristic' or 'policy:NAME' (a bundled policy name or a manifest "
                             f"path), got {spec!r}")
    elif not callable(getattr(spec, "decide", None)):
        raise TypeError(f"controller must be 'heuristic', 'policy:NAME' or a policy object with decide(), "
                        f"got {type(spec).__name__}")
    if mode != "budget":
        raise ValueError(f"a policy controller decides the steps of a budget plan: it needs mode='budget', got {mode!r}")
    if not ends_in_zero:
        raise ValueError("a policy controller needs a σ plan that ends in 0")


def _load_step_policy(spec, watch, opt, trace):
    """The policy object of a run, or None (heuristic) with a warning and a trace note when it cannot be used:
    the policy file cannot be loaded, or the quality monitor its observations need is unavailable."""
    import warnings

    from .policy import PolicyLoadError, load_policy
    note = None
    policy = None
    if isinstance(spec, str):
        try:
            policy = load_policy(spec, opt.get("monitor_device", "cpu"))
        except PolicyLoadError as e:
            note = f"policy unavailable ({e}); using the heuristic controller instead"
    else:
        policy = spec
    if policy is not None and (watch is None or watch.monitor is None):
        policy, note = None, "policy needs the quality monitor's estimate, which is unavailable; using the heuristic controller"
    if note is not None:
        warnings.warn(note)
        if trace is not None:
            trace.notes.append(note)
    elif trace is not None:
        trace.notes.append(f"controller: {getattr(policy, 'name', type(policy).__name__)} (PPO policy)")
    return policy


def _quality_watch(opt, mode, ends_in_zero, lam_start, lam_lo, budget, trace):
    """Validate the monitor options and build the :class:`~adaptive_core.monitor.QualityWatch` of a run."""
    import warnings

    from .monitor import MonitorLoadError, QualityMonitor, QualityWatch, load_monitor_cached
    target, spec = opt["quality_target"], opt["monitor"]
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
            raise ValueError(f"quality_target must be a finite RMSE > 0, got {target!r}")
        if mode != "budget":
            raise ValueError(f"quality_target stops a budget plan early: it needs mode='budget', got mode={mode!r}")
        if not ends_in_zero:
            raise ValueError("quality_target needs a σ plan that ends in 0 (the run returns a denoised prediction)")
    if opt["monitor_device"] not in ("cpu", "cuda", "auto"):
        raise ValueError(f"monitor_device must be 'cpu', 'cuda' or 'auto', got {opt['monitor_device']!r}")
    if not (spec is None or isinstance(spec, (bool, str, QualityMonitor)) or hasattr(spec, "__fspath__")):
        raise TypeError(f"monitor must be None, a bool, 'bundled', a manifest path or a QualityMonitor, "
                        f"got {type(spec).__name__}")
    monitor = None
    if spec is not False:
        try:
            monitor = load_monitor_cached(spec, opt["monitor_device"])
        except MonitorLoadError as e:
            note = f"quality monitor unavailable ({e}); using the heuristic estimate instead"
            warnings.warn(note)
            if trace is not None:
                trace.notes.append(note)
    watch = QualityWatch(monitor, lam_start, lam_lo, budget)
    if trace is not None:
        trace.notes.append(f"quality estimate: {watch.source}" + (f" ({monitor.path.name}, {monitor.providers[0]})"
                                                                   if monitor is not None else ""))
    return watch


def _run(model, x, extra_args, callback, trace, opt, mode, model_type, budget, ends_in_zero, n_intervals,
         lam_start, lam_lo, plan, max_order, watch=None, policy=None):
    """The sampling loop of :func:`sample_adaptive` (arguments validated there)."""
    B = x.shape[0]
    rtol, atol = float(opt["rtol"]), float(opt["atol"])
    tol_ctl = ctl.ToleranceController() if mode == "tolerance" else None
    out = torch.empty_like(x)
    done = np.zeros(B, dtype=bool)
    hist_lam: list[np.ndarray] = []   # most recent last; per-sample λ of accepted evaluations
    hist_d: list[torch.Tensor] = []
    hist_e: list[torch.Tensor] = []      # ε̂ = (x − α·D)/σ at the same points (noise prediction only)
    hist_n = np.zeros(B, dtype=np.int64)  # valid (finite-λ) history entries per sample
    noise_from = noise_form_from_lambda(opt["prediction"])
    noise_form = noise_from < math.inf   # ε̂ history kept (noise-prediction steps from λ ≥ noise_from)
    x_acc, lam_acc = x, lam_start.copy()       # last accepted state
    x_eval, lam_eval = x, lam_start.copy()     # point of the next model call
    order_used = np.zeros(B, dtype=np.int64)
    plan_idx = np.zeros(B, dtype=np.int64)     # accepted evaluations so far (budget/fixed modes)
    h_next = plan[:, 1] - ctl.planning_start(plan[:, 0]) if plan.shape[1] > 1 else lam_lo - ctl.planning_start(lam_start)
    nfe = 0
    # the shifted-time plan of a few-step flow run is kept as planned: the re-planner reads the activity of the
    # denoised prediction, which sizes the error of data-prediction steps (resolve_flow_plan)
    adapting = (mode == "budget" and opt["schedule"] == "ado" and bool(opt["adapt"]) and ends_in_zero
                and opt["flow_shift"] is None)
    act_prev = None
    if adapting:
        planned_slope = ctl.planned_activity_slope(opt["rho"], float(opt["activity_exponent"]))
    target = opt.get("quality_target")
    estimates = None   # (remaining, reference) per sample, when a quality watch runs
    prev_estimate = None  # (λ, remaining) of the previous call
    labels = None  # per-sample decision labels of a policy step (trace)
    order_delta = None  # per-sample solver-order change a policy chose for the next step (None: the heuristic's)

    while True:
        sigma_eval = _sig(lam_eval, model_type)
        sigma_vec = torch.from_numpy(sigma_eval).to(x.device, x.dtype)
        denoised = model(x_eval, sigma_vec, **extra_args)
        nfe += 1
        nan_guard(denoised, f"the model output at call {nfe}")
        eps = _noise_of(x_eval, denoised, sigma_eval, model_type) if noise_form else None
        err = np.full(B, np.nan)
        accepted = ~done
        h_taken = lam_eval - lam_acc
        # a step from pure noise (flow, λ = −∞) is exact for the constant part of D and infinitely long in λ: its
        # predictor–corrector gap does not shrink with the step, so the tolerance controller neither rejects it nor
        # sizes the next step from it (that step keeps the plan's), or the run would retry it or jump to the end
        from_noise = ~np.isfinite(lam_acc)
        x_corr = x_eval
        if nfe > 1 and opt["corrector"]:
            x_corr = _corrector(x_acc, x_eval, lam_acc, lam_eval, hist_lam, hist_d, hist_n, denoised,
                                order_used, model_type, hist_e if noise_form else None, eps, noise_from)
            # measured on x/α (the ve-equivalent sample), so ve and flow runs decide alike
            if model_type == "ve":
                err = scaled_error(x_eval, x_corr, x_acc, rtol, atol).cpu().numpy()
            else:
                inv_a_t = per_sample(1.0 / _alpha(sigma_eval, model_type), x)
                inv_a_s = per_sample(np.where(np.isfinite(lam_acc), 1.0 / _alpha(_sig(lam_acc, model_type), model_type),
                                              0.0), x)
                err = scaled_error(x_eval * inv_a_t, x_corr * inv_a_t, x_acc * inv_a_s, rtol, atol).cpu().numpy()
            if tol_ctl is not None and budget - nfe >= 1:  # a rejection must leave a call for the retry
                accepted = accepted & (tol_ctl.accept(err) | np.isnan(err) | from_noise
                                       | ~_retry_can_pass(err, h_taken, order_used, lam_acc, lam_lo, budget - nfe,
                                                          ends_in_zero))
        x_acc = _select(accepted, x_corr, x_acc)
        lam_acc = np.where(accepted, lam_eval, lam_acc)
        _push_history(hist_lam, [(hist_d, denoised)] + ([(hist_e, eps)] if noise_form else []), hist_n,
                      lam_eval, accepted, max_order + 1)
        plan_idx = plan_idx + accepted
        running = ~done   # samples a quality target stopped early are done; the others stay in lockstep
        if adapting and len(hist_d) >= 2 and running.any() and bool(accepted[running].all()):
            # per-sample activity of D and its log-slope in λ → re-plan the points still to come
            act = np.maximum(ctl.activity(hist_d[-1], hist_d[-2], hist_lam[-1] - hist_lam[-2]), 1e-30)
            mid = (ctl.planning_start(hist_lam[-2]) + hist_lam[-1]) / 2
            if act_prev is not None:
                slope = (np.log(act) - np.log(act_prev[0])) / (mid - act_prev[1])
                step_idx = int(plan_idx[np.argmax(running)])
                remaining = n_intervals + 1 - step_idx
                if remaining >= 2:
                    # coarsen the rest only where the run shows a faster decay than the plan assumes
                    faster = slope < planned_slope
                    new_pts = ctl.replan_lambdas(lam_acc, lam_lo, remaining, slope, float(opt["activity_exponent"]))
                    plan[:, step_idx:] = np.where(faster[:, None], new_pts, plan[:, step_idx:])
            act_prev = (act, mid)

        quality_stop = None
        if watch is not None:
            estimates = watch.observe(denoised, lam_eval, err)
            if target is not None and nfe >= 3:
                quality_stop = running & accepted & (estimates[0] <= target)

        # which samples end with this call (plans ending in 0 end with the denoised sample)
        if not ends_in_zero:
            finishing = np.zeros(B, dtype=bool)
        elif mode == "tolerance":  # at the end, or out of calls (a budget of 1: the first prediction)
            finishing = ~done & ((accepted & (lam_acc >= lam_lo)) | (nfe >= budget))
        else:
            finishing = accepted & (plan_idx > n_intervals)
            if policy is not None:  # a policy may jump to the end early
                finishing = finishing | (accepted & (lam_acc >= lam_lo))
            if quality_stop is not None:
                quality_stop = quality_stop & ~finishing
                finishing = finishing | quality_stop
        if finishing.any():
            final = denoised
            if opt["final_correction"] and nfe > 1:  # D(x_corr) ≈ D(x_eval) + (x_corr − x_eval)/α
                final = denoised + (x_corr - x_eval) / per_sample(_alpha(_sig(lam_acc, model_type), model_type), x)
            out = _select(finishing, final, out)

        # the next evaluation point
        if mode == "tolerance":
            lam_next, h_next = _tolerance_next(tol_ctl, lam_acc, h_taken, h_next, np.where(from_noise, np.nan, err),
                                               accepted, order_used, lam_lo, budget - nfe, ends_in_zero)
        else:
            lam_next = plan[np.arange(B), np.minimum(plan_idx, plan.shape[1] - 1)]
            if quality_stop is not None:  # shorten a step that would overshoot the target (land on it instead)
                lam_next = _land_on_target(lam_next, lam_eval, estimates[0], prev_estimate, target,
                                           running & ~finishing & ~(plan_idx >= n_intervals))
            if policy is not None:
                lam_next, labels, order_delta = _policy_next(policy, plan, plan_idx, n_intervals, lam_acc, lam_lo,
                                                             lam_next, watch.last_features, estimates,
                                                             running & ~finishing, opt, trace, nfe)
        if watch is not None:
            prev_estimate = (lam_eval.copy(), np.asarray(estimates[0], dtype=np.float64).copy())
        if trace is not None:
            _record(trace, nfe, sigma_eval, lam_next, order_used, err, accepted, done, finishing, mode,
                    model_type, estimates, quality_stop, labels)
            labels = None
        done = done | finishing
        if not ends_in_zero:  # a plan ending above 0: the step onto the end point needs no model call
            last_step = ~done & ((lam_next >= lam_lo) | (nfe >= budget))
            if last_step.any():
                x_end = _predict(x_acc, lam_acc, lam_lo, hist_lam, hist_d, hist_n, max_order, model_type,
                                 opt["predictor"], None, hist_e if noise_form else None, None, noise_from,
                                 opt["second_order_max_step"])[0]
                out = _select(last_step, x_end, out)
                done = done | last_step
        if callback is not None:
            info = {"x": x_acc, "i": budget - 1 if done.all() else nfe - 1, "sigma": sigma_vec,
                    "sigma_hat": sigma_vec, "denoised": denoised, "nfe": nfe, "nfe_budget": budget,
                    "error": torch.from_numpy(err)}
            if estimates is not None:
                info["remaining_error"] = torch.from_numpy(np.asarray(estimates[0], dtype=np.float64))
                info["reference_error"] = torch.from_numpy(np.asarray(estimates[1], dtype=np.float64))
            callback(info)
        if done.all():
            break
        if nfe >= budget:  # unreachable: plans and the reservation end every sample within the budget
            raise RuntimeError("internal error: the budget is spent before every sample reached the end")
        lam_next = np.where(done, lam_acc, lam_next)
        x_pred, order = _predict(x_acc, lam_acc, lam_next, hist_lam, hist_d, hist_n, max_order, model_type,
                                 opt["predictor"], opt["high_order_max_step"], hist_e if noise_form else None,
                                 order_delta, noise_from, opt["second_order_max_step"])
        order_used = np.where(done, order_used, order)
        x_eval = _select(done, x_acc, x_pred)
        lam_eval = lam_next
    if trace is not None:
        trace.nfe = nfe
    return out


#: Quality-target mode shortens a step whose extrapolated remaining error would fall below QUALITY_BAND_LOW ×
#: target, aiming it at QUALITY_AIM × target (chosen on seeds 100–115 of the four analytic testbeds, budgets
#: 20/30/50, targets 0.003–0.03: aims of 0.8 / 0.9 / 1.0 landed 70% / 80% / 88% of the images within ±25%).
QUALITY_AIM = 1.0
QUALITY_BAND_LOW = 0.9


def _land_on_target(lam_next, lam_now, remaining, prev, target, eligible):
    """Per sample: where the remaining-error estimate, extrapolated log-linearly in λ from the last two calls,
    would fall below ``QUALITY_BAND_LOW·target`` at the planned next point, move that point to where it reaches
    ``QUALITY_AIM·target`` (at least a quarter of the planned step), so the run stops close to the target rather
    than far below it (late in a plan the remaining error falls 1.5–3× per call, which steps over a ±25% band):
    a step-size choice from an error model, as in classic step-size control (Hairer et al. 1993, II.4).  The last
    planned point is never moved (a run that reaches it returns its whole-budget result); other samples keep
    the plan."""
    if prev is None:
        return lam_next
    lam_prev, rem_prev = prev
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (np.log(remaining) - np.log(rem_prev)) / (lam_now - lam_prev)   # d log(error) / dλ, < 0
        predicted = np.log(remaining) + slope * (lam_next - lam_now)
        lam_aim = lam_now + (np.log(QUALITY_AIM * target) - np.log(remaining)) / slope
    ok = (eligible & np.isfinite(slope) & (slope < 0) & np.isfinite(lam_now) & (remaining > target)
          & (predicted < np.log(QUALITY_BAND_LOW * target)))
    lam_aim = np.clip(np.nan_to_num(lam_aim, nan=0.0), lam_now + 0.25 * (lam_next - lam_now), lam_next)
    return np.where(ok, lam_aim, lam_next)


def _policy_next(policy, plan, plan_idx, n_intervals, lam_acc, lam_lo, lam_planned, features, estimates, eligible,
                 opt, trace, nfe):
    """Next λ per sample chosen by a step policy (TPDM-style: a learned controller picks the next noise level;
    Schulman et al. 2017 PPO trains it offline, :mod:`adaptive_core.tune.policy_env`).

    The heuristic plan's next point gives the base share of the remaining λ-span; the policy scales it
    (:func:`adaptive_core.policy.share_from_action`).  Where that share would be below the policy's
    ``min_share`` (a shifted-time plan's short first steps), shares are measured from one planned step back, so
    that action 0 still keeps the plan.  The last call of the budget stays on the end point, so
    the budget is never exceeded; a share of 1 ends the image early.  Where the policy moved a point, the rest of
    that image's plan is re-laid from it as the first plan was (uniform in σ^{1/ρ}, the prior plan, or in shifted
    time).  Rows whose observation is out
    of the training range keep the heuristic step (the policy's ``decide`` says so) and the trace notes it.
    Rows before the policy's ``min_lambda_progress`` share of the λ-span keep the heuristic's step and order
    without asking it (:mod:`adaptive_core.policy`, "Where it acts"); on the rows it decides before its
    ``early_step_cap`` share, the step action is capped (:func:`adaptive_core.policy.cap_early_step_actions`).
    A policy with a second action also picks the solver order of the step
    (:func:`adaptive_core.policy.order_delta_from_action`).
    Returns (λ_next [B], decision labels [B] or None, order change [B] or None).
    """
    from .policy import (LAMBDA_PROGRESS_INDEX, ORDER_DEAD_ZONE, cap_early_step_actions, order_delta_from_action,
                         policy_observation, share_from_action)
    B = lam_acc.shape[0]
    free = eligible & (plan_idx < n_intervals)   # the last evaluation is forced onto the end point
    if not free.any():
        return lam_planned, None, None
    start = ctl.planning_start(lam_acc)
    span = np.maximum(lam_lo - start, 1e-12)
    base = (lam_planned - start) / span
    min_share = float(getattr(policy, "min_share"))
    short = base < min_share
    if short.any():
        # a planned step the share cannot express (below the floor min_share, or one that starts before the
        # planning start of a pure-noise row, as a shifted-time plan's first can): measure the shares from a start
        # one planned step back (at least one giving a share of 2·min_share), so that action 0 keeps the plan
        step = plan[np.arange(B), np.minimum(plan_idx + 1, plan.shape[1] - 1)] - lam_planned
        reach = np.maximum(lam_lo - lam_planned, 0.0)
        back = np.maximum(step, 2.0 * min_share * reach / (1.0 - 2.0 * min_share))
        start = np.where(short, lam_planned - np.maximum(back, 1e-9), start)
        span = np.maximum(lam_lo - start, 1e-12)
        base = (lam_planned - start) / span
    base = np.clip(base, 1e-6, 1.0)
    obs = policy_observation(features, estimates, base)
    acts_from = float(getattr(policy, "min_lambda_progress", 0.0))
    if acts_from > 0:   # (a NaN progress compares False: the row stays with the policy, whose fallback takes it)
        free &= ~(obs[:, LAMBDA_PROGRESS_INDEX] < acts_from)
        if not free.any():
            return lam_planned, None, None
    rows = np.flatnonzero(free)
    actions, reasons = policy.decide(obs[rows])
    actions = np.asarray(actions, dtype=np.float64).reshape(len(rows), -1)   # [rows, n_actions]
    cap = getattr(policy, "early_step_cap", None)
    if cap is not None:
        actions = cap_early_step_actions(actions, obs[rows], np.array([r is None for r in reasons]), cap)
    share = share_from_action(base[rows], actions[:, 0], float(getattr(policy, "action_scale")), min_share)
    order_delta = None
    if actions.shape[1] > 1:   # fallback rows act 0: the heuristic's order
        order_delta = np.zeros(B, dtype=np.int64)
        order_delta[rows] = order_delta_from_action(actions[:, 1], float(getattr(policy, "order_dead_zone",
                                                                                  ORDER_DEAD_ZONE)))
    lam_next = lam_planned.copy()
    labels: list = [None] * B
    gain_of = getattr(policy, "action_gain", None) if trace is not None else None
    gains = np.ones(len(rows)) if gain_of is None else np.asarray(gain_of(obs[rows]), dtype=np.float64)
    for k, b in enumerate(rows):
        if reasons[k] is not None:
            labels[b] = "policy-fallback"
            if trace is not None:
                trace.notes.append(f"call {nfe}, sample {b}: policy fallback to the heuristic step ({reasons[k]})")
            continue
        labels[b] = "policy"
        if gains[k] < 1.0:
            soft, hard = float(policy.soft_z), float(policy.ood_z)
            trace.notes.append(f"call {nfe}, sample {b}: policy action damped to {gains[k]:.2f} of itself (features "
                               f"{hard - gains[k] * (hard - soft):.1f} std from the training mean; damping from "
                               f"{soft:g}, fallback at {hard:g})")
        new = float(lam_lo[b]) if share[k] >= 1.0 else float(min(start[b] + share[k] * span[b], lam_lo[b]))
        if abs(new - lam_next[b]) > 1e-9 * max(1.0, abs(new)):   # (a = 0 is the planned point, up to rounding)
            lam_next[b] = new
            i = int(plan_idx[b])
            if n_intervals - i < 1:
                plan[b, i:] = new
            elif opt["flow_shift"] is not None:
                plan[b, i:] = ctl.plan_time_shift(np.array([new]), lam_lo[b:b + 1], n_intervals - i,
                                                  opt["flow_shift"])[0]
            elif opt["rho"] == "prior":
                plan[b, i:] = ctl.prior_plan(np.array([new]), lam_lo[b:b + 1], n_intervals - i,
                                             float(opt["activity_exponent"]))[0]
            else:
                plan[b, i:] = ctl.plan_lambdas(np.array([new]), lam_lo[b:b + 1], n_intervals - i,
                                               float(opt["rho"]))[0]
    return lam_next, labels, order_delta


def _retry_can_pass(err, h_taken, order, lam_acc, lam_lo, evals_left, ends_in_zero):
    """Per sample [B]: whether a retry of a failed step, as short as the budget still allows, is predicted to meet
    the tolerance.

    The retry starts from the same λ with one call fewer, so the budget reservation (:func:`_tolerance_next`) makes
    it at least (λ_end − λ) / (calls left + 1) long. Its error is predicted as err · (h_retry / h)^(p+1), the
    local error order of a p-th order step (Hairer et al. 1993, II.4). Where even that retry would fail, rejecting
    only spends a call and lengthens every later step, the spiral that ruined tolerance runs at large CFG scales:
    the step is kept instead, as a fixed-budget sampler would keep it.
    """
    shortest_retry = (lam_lo - ctl.planning_start(lam_acc)) / (_calls_to_reserve(evals_left, ends_in_zero) + 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        predicted = err * (shortest_retry / np.maximum(h_taken, 1e-12)) ** (np.maximum(order, 1) + 1.0)
    return ~(predicted > 1.0)


def _calls_to_reserve(evals_left: int, ends_in_zero: bool) -> int:
    """Calls the tolerance mode keeps for the steps after the next one (the last call of a plan ending in 0
    evaluates the end point itself)."""
    return max(evals_left - 1 if ends_in_zero else evals_left, 0)


def _tolerance_next(tol_ctl, lam_acc, h_taken, h_prev, err, accepted, order, lam_lo, evals_left, ends_in_zero):
    """Next λ in tolerance mode: PI step-size proposal, then the budget reservation."""
    has_err = ~np.isnan(err)
    h = np.where(has_err, tol_ctl.propose(np.maximum(h_taken, 1e-12), np.nan_to_num(err, nan=1.0), order), h_prev)
    h = np.where(accepted | has_err, h, h_prev)
    start = ctl.planning_start(lam_acc)
    h = ctl.reserve_budget(start, h, lam_lo, np.full_like(h, _calls_to_reserve(evals_left, ends_in_zero)))
    return np.where(h >= lam_lo - start, lam_lo, start + h), h


def _record(trace, nfe, sigma_eval, lam_next, order, err, accepted, done, finishing, mode, model_type,
            estimates=None, quality_stop=None, labels=None):
    """Append one StepRecord per sample still running (with the quality estimates when a watch runs)."""
    sigma_next = _sig(lam_next, model_type)
    for b in range(len(trace.samples)):
        if done[b]:
            continue
        if nfe == 1:
            decision = "start"
        elif quality_stop is not None and quality_stop[b]:
            decision = "quality-stop"
        elif finishing[b]:
            decision = "final"
        elif not accepted[b]:
            decision = "reject"
        elif labels is not None and labels[b] is not None:
            decision = labels[b]
        else:
            decision = "tolerance" if mode == "tolerance" else "plan"
        e = float(err[b])
        est = {}
        if estimates is not None:
            est = {key: (None if not math.isfinite(float(v[b])) else float(v[b]))
                   for key, v in zip(("estimated_remaining_error", "estimated_reference_error"), estimates)}
        trace.record(b, StepRecord(nfe=nfe, sigma=float(sigma_eval[b]),
                                   sigma_next=0.0 if finishing[b] else float(sigma_next[b]),
                                   order=int(order[b]) if nfe > 1 else 0, error=None if math.isnan(e) else e,
                                   accepted=bool(accepted[b]), decision=decision, **est))


def _select(mask: np.ndarray, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample: a where mask, else b (no copy when the mask is uniform, the usual case)."""
    if mask.all():
        return a
    if not mask.any():
        return b
    return torch.where(torch.from_numpy(mask).to(a.device).reshape(-1, *([1] * (a.ndim - 1))), a, b)


def _push_history(hist_lam, series, hist_n, lam, push, depth):
    """Append λ and each (history list, new value) of ``series`` for samples in ``push``; other samples
    keep their history (all lists stay aligned, newest last, at most ``depth`` long)."""
    finite = push & np.isfinite(lam)
    if not hist_lam or push.all():
        hist_lam.append(lam.copy())
        for hist, value in series:
            hist.append(value)
    else:  # shift only the pushing samples: entry i ← entry i+1, newest ← new value
        grow = len(hist_lam) < depth
        for hist, value in [(hist_lam, lam)] + series:
            if grow:
                hist.insert(0, hist[0])
            pick = (lambda a, b: np.where(push, a, b)) if hist is hist_lam else (lambda a, b: _select(push, a, b))
            for i in range(len(hist) - 1):
                hist[i] = pick(hist[i + 1], hist[i])
            hist[-1] = pick(value, hist[-1])
    for hist in [hist_lam] + [h for h, _ in series]:
        del hist[:-depth]
    hist_n[:] = np.minimum(np.where(finite, hist_n + 1, np.where(push, 0, hist_n)), depth)


def _noise_of(x: torch.Tensor, denoised: torch.Tensor, sigma: np.ndarray, model_type: str) -> torch.Tensor:
    """ε̂ = (x − α·D)/σ, the noise prediction implied by the denoiser output (σ > 0)."""
    return (x - denoised * per_sample(_alpha(sigma, model_type), x)) / per_sample(sigma, x)


def _nodes(hist_lam, hist_n, lam_s, count):
    """The last ``count`` history λ relative to λ_s, newest first, padded where a sample has fewer."""
    nodes = []
    for j in range(count):
        lam_j = hist_lam[-1 - j] if j < len(hist_lam) else hist_lam[0]
        # padding for unused slots: distinct dummy values keep the Vandermonde solve regular
        nodes.append(np.where(hist_n > j, lam_j - lam_s, -1.0 - j))
    return nodes


def _predict(x_s, lam_s, lam_t, hist_lam, hist_d, hist_n, max_order, model_type, weights="exact",
             high_order_max_step=None, hist_e=None, order_delta=None, noise_from=-math.inf,
             second_order_max_step=None):
    """Predictor x_s → x_t with per-sample order min(max_order, finite history); returns (x_t, order).

    With ``high_order_max_step``, orders above 2 are used only for steps of at most that many units of λ
    (long steps extrapolate a quadratic too far; Lu et al. 2022 likewise lower the order for few steps); with
    ``second_order_max_step``, orders above 1 only for steps up to that length (guided runs,
    :func:`resolve_second_order_max_step`).
    ``hist_e`` (ε̂ history) selects the noise-prediction form for the steps that start at λ ≥ ``noise_from``,
    except for steps from pure noise.  ``order_delta`` (per sample, a policy's choice,
    :func:`adaptive_core.policy.order_delta_from_action`): −1 lowers that order by one (at least 1), +1 drops the
    long-step limits, 0 keeps them.
    """
    noise_rows = _noise_rows(hist_e, lam_s, noise_from)
    history_order = np.clip(hist_n, 1, max_order)
    order = history_order
    h = lam_t - lam_s
    if high_order_max_step is not None:
        order = np.where(h > high_order_max_step, np.minimum(order, 2), order)
    if second_order_max_step is not None:
        order = np.where(h > second_order_max_step, 1, order)
    if order_delta is not None:
        order = np.where(order_delta > 0, history_order, np.where(order_delta < 0, np.maximum(order - 1, 1), order))
    sigma_s, sigma_t = _sig(lam_s, model_type), _sig(lam_t, model_type)
    alpha_t = _alpha(sigma_t, model_type)
    out = None
    for noise in (False, True):
        rows = noise_rows if noise else ~noise_rows
        if not rows.any():
            continue
        values = hist_e if noise else hist_d
        for p in np.unique(order[rows]):
            sel = rows & (order == p)
            nodes = [np.zeros_like(h)] if p == 1 else _nodes(hist_lam, hist_n, lam_s, p)
            res = exponential_step(x_s, sigma_s, sigma_t, alpha_t, np.where(sel, h, 1.0),
                                   nodes, [values[-1 - j] for j in range(p)], weights, "noise" if noise else "data")
            out = res if out is None else _select(sel, res, out)
    return out, order


def _noise_rows(hist_e, lam_s, noise_from) -> np.ndarray:
    """Per sample [B]: whether its step from λ_s takes the noise-prediction form (finite λ_s ≥ ``noise_from``
    and an ε̂ history kept)."""
    if hist_e is None:
        return np.zeros(np.shape(lam_s), dtype=bool)
    return np.isfinite(lam_s) & (lam_s >= noise_from)


def _corrector(x_s, x_pred, lam_s, lam_t, hist_lam, hist_d, hist_n, d_t, order_used, model_type,
               hist_e=None, eps_t=None, noise_from=-math.inf):
    """UniC-style corrector: redo the step x_s → x_t with D(x_t) as an extra node (order + 1).

    A step from pure noise (flow σ = 1, λ_s = −∞) has no finite λ node; there D is interpolated linearly in
    u = e^λ = α/σ instead, between D(pure noise) at u = 0 and D_t, which integrates exactly to the
    trapezoid x_t = σ_t·x_s + α_t·(D_s + D_t)/2 (D is linear in u at high noise, so this is second order).
    With ``hist_e``/``eps_t`` the other steps that start at λ ≥ ``noise_from`` use the noise-prediction form.
    """
    noise_rows = _noise_rows(hist_e, lam_s, noise_from)
    sigma_s, sigma_t = _sig(lam_s, model_type), _sig(lam_t, model_type)
    alpha_t = _alpha(sigma_t, model_type)
    finite = np.isfinite(lam_s)
    # samples that did not move (finished ones) get a dummy unit step: their result is not used
    h = np.where(finite & (lam_t > lam_s), lam_t - lam_s, 1.0)
    lam_s = np.where(finite, lam_s, lam_t - 1.0)
    p_all = np.maximum(order_used, 1)
    out = x_pred
    if not finite.all():
        trapezoid = x_s * per_sample(sigma_t / sigma_s, x_s) + per_sample(alpha_t, x_s) * (hist_d[-1] + d_t) / 2
        out = _select(~finite, trapezoid, out)
    for noise in (False, True):
        rows = finite & (noise_rows if noise else ~noise_rows)
        for p in np.unique(p_all[rows]):
            sel = rows & (p_all == p)
            nodes = [h] + _nodes(hist_lam, hist_n, lam_s, p)
            nodes = [np.where(sel, n, 2.0 + i) for i, n in enumerate(nodes)]
            values = ([eps_t] + [hist_e[-1 - j] for j in range(p)] if noise
                      else [d_t] + [hist_d[-1 - j] for j in range(p)])
            res = exponential_step(x_s, sigma_s, sigma_t, alpha_t, np.where(sel, h, 1.0), nodes,
                                   values, prediction="noise" if noise else "data")
            out = _select(sel, res, out)
    return out
