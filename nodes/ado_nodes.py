"""ADO's ComfyUI nodes (classic node API): thin declarations over :mod:`adaptive_core`.

Node ids are saved in users' workflows and never change.  Widgets are positional in saved workflows: new
ones go last and are optional with a Python default, so old workflows keep loading.
ComfyUI modules are imported inside the methods, so this file imports without ComfyUI.
"""
from __future__ import annotations

from ..adaptive_core import Trace, replay_sigmas
from ..adaptive_core.domain import controller_choices
from ..adaptive_core.sampler import DEFAULTS, MODES
from .comfy_sampler import AUTO, core_options, sample_ado
from .trace_view import chart_payload

TRACE_TYPE = "ADO_TRACE"
#: Fallback scheduler names when ComfyUI's list cannot be read (only used outside ComfyUI).
_FALLBACK_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                        "linear_quadratic", "kl_optimal"]

_TIP_BUDGET = "Hard cap on model evaluations (NFE), rejected steps included. 0 = one per step of the sigmas."
_TIP_MODE = ("budget: plan the budget's steps and adapt them to what the run shows; tolerance: size steps to "
             "the error tolerance and stop early when it allows; fixed: follow the sigmas exactly.")
_TIP_RTOL = "Relative tolerance of the per-step error estimate (tolerance mode; smaller = more accurate, more NFE)."


_TIP_CONTROLLER = ("heuristic: ADO's budget planner (default). policy:NAME: a bundled PPO step policy that adjusts "
                   "each step from what the run shows (budget mode only; it falls back to the heuristic where it is "
                   "unsure, and says so in the trace). policy:auto: the bundled policy made for the model type and "
                   "guidance of the run (e.g. unguided flow), else the heuristic. Policies were tuned on small test "
                   "networks: on your model, compare with the heuristic on a few seeds.")


def _schedulers() -> list[str]:
    """ComfyUI's scheduler names (the same list KSampler offers), or a fallback outside ComfyUI."""
    try:
        import comfy.samplers
        return list(comfy.samplers.KSampler.SCHEDULERS)
    except Exception:
        return list(_FALLBACK_SCHEDULERS)


def planned_sigmas(model, scheduler: str, steps: int, denoise: float):
    """The host's σ grid for ``steps`` steps at ``denoise``, as ComfyUI's BasicScheduler builds it.

    ``comfy.samplers.calculate_sigmas`` over ``int(steps/denoise)`` steps, of which the last ``steps + 1``
    values are kept (``comfy_extras/nodes_custom_sampler.py::BasicScheduler.get_sigmas``).  Empty for
    ``denoise ≤ 0``.
    """
    import comfy.samplers
    import torch
    if denoise <= 0.0:
        return torch.zeros(0)
    total = int(steps / denoise) if denoise < 1.0 else int(steps)
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sig[-(int(steps) + 1):]


class ADOAdaptiveSampler:
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced: ADO with its options as widgets."""

    @classmethod
    def INPUT_TYPES(cls):
        """Widgets: the options of :func:`adaptive_core.sample_adaptive` (saved order; append only)."""
        return {"required": {
            "nfe_budget": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": _TIP_BUDGET}),
            "mode": (list(MODES), {"default": DEFAULTS["mode"], "tooltip": _TIP_MODE}),
            "rtol": ("FLOAT", {"default": DEFAULTS["rtol"], "min": 0.001, "max": 1.0, "step": 0.001,
                               "tooltip": _TIP_RTOL}),
            "atol": ("FLOAT", {"default": DEFAULTS["atol"], "min": 0.0, "max": 1.0, "step": 0.0001,
                               "tooltip": "Absolute tolerance of the error estimate (tolerance mode)."}),
            "schedule": (["ado", "host"], {"default": DEFAULTS["schedule"],
                                           "tooltip": "ado: ADO plans its own noise levels between the sigmas' "
                                                      "ends; host: the connected sigmas are the plan."}),
            "max_order": ("INT", {"default": 0, "min": 0, "max": 3,
                                  "tooltip": "Highest order of the multistep predictor (the corrector adds one). "
                                             "0 = auto: 2 on guided runs above CFG 2 (from CFG 3, 1 on steps "
                                             "longer than 1 in log-SNR/2), else 3."}),
            "model_type": ([AUTO, "ve", "flow"], {"default": AUTO,
                                                   "tooltip": "auto: flow for rectified-flow models (SD3, Flux, "
                                                              "Wan…), ve for eps / v models (SD1.x, SDXL)."}),
        }, "optional": {
            "controller": (controller_choices(), {"default": "heuristic", "tooltip": _TIP_CONTROLLER}),
        }}

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("ADO, for SamplerCustom or SamplerCustomAdvanced. Its chart appears on the sampling node.",)
    FUNCTION = "get_sampler"
    CATEGORY = "sampling/custom_sampling/samplers"
    DESCRIPTION = ("Adaptive Diffusion Optimizer: chooses the noise levels during sampling, never more model "
                   "evaluations than the budget.")

    def get_sampler(self, nfe_budget=0, mode=DEFAULTS["mode"], rtol=DEFAULTS["rtol"], atol=DEFAULTS["atol"],
                    schedule=DEFAULTS["schedule"], max_order=0, model_type=AUTO,
                    controller="heuristic"):
        """Return ``(KSAMPLER(sample_ado, options),)`` for ComfyUI's custom-sampling nodes."""
        import comfy.samplers
        opts = core_options(nfe_budget, mode, rtol, atol, schedule, max_order, model_type)
        if controller and controller != "heuristic":   # a PPO step policy (adaptive_core.policy), budget mode
            opts["controller"] = controller
        return (comfy.samplers.KSAMPLER(sample_ado, extra_options=opts),)


class ADOAdaptiveKSampler:
    """All-in-one like KSampler: steps is the NFE budget; returns the latent and the run's trace."""

    @classmethod
    def INPUT_TYPES(cls):
        """KSampler's inputs with steps = NFE budget, the scheduler as planned grid, then ADO's mode and rtol."""
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "NFE budget: ADO never calls the model more often than this."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale."}),
            "scheduler": (_schedulers(), {"default": "karras",
                                           "tooltip": "The planned grid: its ends bound the run, the chart "
                                                      "compares the noise levels taken with it."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "mode": (list(MODES), {"default": DEFAULTS["mode"], "tooltip": _TIP_MODE}),
            "rtol": ("FLOAT", {"default": DEFAULTS["rtol"], "min": 0.001, "max": 1.0, "step": 0.001,
                               "tooltip": _TIP_RTOL}),
        }}

    RETURN_TYPES = ("LATENT", TRACE_TYPE)
    RETURN_NAMES = ("LATENT", "trace")
    OUTPUT_TOOLTIPS = ("The denoised latent.", "What the run did (noise levels, NFE, errors); replay it with "
                                               "'ADO Trace to Sigmas'.")
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DESCRIPTION = ("KSampler with ADO: adaptive noise levels within an NFE budget of 'steps'; draws the noise "
                   "levels taken, the error estimate and the NFE used on the node.")

    def sample(self, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise=1.0,
               mode=DEFAULTS["mode"], rtol=DEFAULTS["rtol"]):
        """Sample like ``nodes.py::common_ksampler`` with ADO; returns the latent, the trace, and as UI output the
        chart (``ado_trace``) and the full trace as JSON (``ado_trace_json``, for "Copy ADO trace" and sharing)."""
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        trace = Trace()
        out = latent_image.copy()
        sigmas = planned_sigmas(model, scheduler, steps, denoise)
        if sigmas.numel() < 2:  # denoise 0: nothing to do, as KSampler
            return {"ui": {}, "result": (out, trace)}
        x = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(x, seed, latent_image.get("batch_index"))
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        opts = {**core_options(steps, mode, rtol), "trace": trace, "publish": False}
        sampler = comfy.samplers.KSAMPLER(sample_ado, extra_options=opts)
        out["samples"] = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, x, noise_mask=latent_image.get("noise_mask"),
            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return {"ui": {"ado_trace": [chart_payload(trace)], "ado_trace_json": [trace.to_json()]}, "result": (out, trace)}


class ADOTraceToSigmas:
    """SIGMAS of a traced ADO run, so any sampler (or ADO in fixed mode) evaluates the same noise levels."""

    @classmethod
    def INPUT_TYPES(cls):
        """Which image of the batch, and a trace (connected) or its JSON (pasted)."""
        return {"required": {
            "sample": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Which image of the traced batch."}),
        }, "optional": {
            "trace": (TRACE_TYPE, {"tooltip": "The trace output of 'ADO Adaptive KSampler'."}),
            "trace_json": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Or a shared trace as JSON (used when no trace is connected)."}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("The noise levels the run evaluated, descending, ending at its end level.",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/sigmas"
    DESCRIPTION = "Replay a shared ADO run: the σ it took, as SIGMAS for SamplerCustom with any sampler."

    def get_sigmas(self, sample=0, trace=None, trace_json=""):
        """Return ``(sigmas,)`` (float32, CPU) of one sample of ``trace`` or of the JSON ``trace_json``."""
        if trace is None:
            if not (trace_json or "").strip():
                raise ValueError("ADO Trace to Sigmas: connect a trace or paste a trace's JSON")
            try:
                trace = Trace.from_json(trace_json)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"ADO Trace to Sigmas: trace_json is not an ADO trace ({e})") from e
        if not 0 <= sample < len(trace.samples):
            raise ValueError(f"ADO Trace to Sigmas: sample {sample} is outside the traced batch of "
                             f"{len(trace.samples)}")
        return (replay_sigmas(trace, sample).float(),)


NODE_CLASS_MAPPINGS = {
    "ADOAdaptiveSampler": ADOAdaptiveSampler,
    "ADOAdaptiveKSampler": ADOAdaptiveKSampler,
    "ADOTraceToSigmas": ADOTraceToSigmas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ADOAdaptiveSampler": "ADO Adaptive Sampler",
    "ADOAdaptiveKSampler": "ADO Adaptive KSampler",
    "ADOTraceToSigmas": "ADO Trace to Sigmas",
}
