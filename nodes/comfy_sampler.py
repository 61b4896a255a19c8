"""The ComfyUI side of ADO's sampler: a k-diffusion sampler function and its KSampler-dropdown registration.

:func:`sample_ado` is what ComfyUI calls (through ``comfy.samplers.KSAMPLER``, or as
``comfy.k_diffusion.sampling.sample_ado_adaptive`` when chosen in KSampler's dropdown).  It adds to
:func:`adaptive_core.sample_adaptive` only what the host needs:

* progress: the core reports one callback per model call with ``i`` in ``0 … nfe_budget−1``; ComfyUI's
  wrapper (``comfy/samplers.py::KSAMPLER.sample``) fixes the bar's total at ``len(sigmas) − 1``, so ``i`` is
  rescaled onto that total (monotone, the last call fills the bar);
* cancel: ``comfy.model_management.throw_exception_if_processing_interrupted()`` before every model call,
  so Cancel works within one call even when the host passed no callback;
* what it did: the run's :class:`~adaptive_core.trace.Trace` goes to the caller (``trace=``) and, inside a
  running ComfyUI server, to the browser as an ``ado.trace`` message addressed to the sampling node.

Host modules are looked up in ``sys.modules`` only (never imported here), so this module loads anywhere.
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Callable

import torch

from ..adaptive_core import Trace, sample_adaptive
from .trace_view import chart_payload

log = logging.getLogger("ADO")

#: The sampler's name in ComfyUI's KSampler dropdown.  Saved in users' workflows: never change it.
SAMPLER_NAME = "ado_adaptive"
#: The websocket event carrying a run's chart to the frontend (``web/ado_trace.js``).
TRACE_EVENT = "ado.trace"
#: Node option values that mean "let ADO decide" and map to the core's None.
AUTO = "auto"


def host_progress_index(i: int, nfe_budget: int, host_total: int) -> int:
    """Map the core's call index ``i`` (0 … nfe_budget−1) onto the host's bar (0 … host_total−1).

    Monotone in ``i``; ``i = nfe_budget − 1`` maps to ``host_total − 1`` (the bar ends full).  Identity when
    the budget equals the host's step count, the default.
    """
    if nfe_budget < 1 or host_total < 1:
        raise ValueError(f"nfe_budget and host_total must be ≥ 1, got {nfe_budget} and {host_total}")
    if nfe_budget == host_total:
        return int(i)
    return max(0, min(host_total - 1, math.ceil((int(i) + 1) * host_total / nfe_budget) - 1))


def core_options(nfe_budget: int = 0, mode: str = "budget", rtol: float | None = None, atol: float | None = None,
                 schedule: str | None = None, max_order: int | None = None, model_type: str = AUTO) -> dict:
    """Turn node widget values into keyword arguments of :func:`adaptive_core.sample_adaptive`.

    ``nfe_budget=0`` means "one model call per interval of the host's sigmas" (the core's default);
    ``model_type="auto"`` detects flow models from ComfyUI's CONST model_sampling.  None values, and
    ``max_order=0`` (the widget's "auto"), are left out so the core's defaults apply.  Raises ValueError for a
    negative budget.
    """
    if int(nfe_budget) < 0:
        raise ValueError(f"nfe_budget must be ≥ 0 (0 = the sigmas' step count), got {nfe_budget}")
    out = {"nfe_budget": int(nfe_budget) or None, "mode": mode,
           "model_type": None if model_type in (AUTO, None) else model_type}
    for k, v in (("rtol", rtol), ("atol", atol), ("schedule", schedule), ("max_order", max_order or None)):
        if v is not None:
            out[k] = v
    return out


def _host(name: str):
    """A ComfyUI module if ComfyUI has loaded it, else None (no import is attempted)."""
    return sys.modules.get(name)


class _Interruptible:
    """The host's denoiser, checking ComfyUI's Cancel flag before every call (one call = one NFE)."""

    def __init__(self, model: Callable, check: Callable[[], None] | None):
        self.model, self.check = model, check
        self.inner_model = getattr(model, "inner_model", None)  # keeps detect_model_type working

    def __call__(self, x, sigma, **kwargs):
        if self.check is not None:
            self.check()
        return self.model(x, sigma, **kwargs)


@torch.no_grad()
def sample_ado(model, x, sigmas, extra_args=None, callback=None, disable=None, *, trace: Trace | None = None,
               publish: bool = True, **options) -> torch.Tensor:
    """ComfyUI sampler function: ADO from ``sigmas[0]`` to ``sigmas[-1]``, at most ``nfe_budget`` model calls.

    Same signature as ``comfy/k_diffusion/sampling.py``'s samplers; ``options`` are those of
    :func:`core_options` (node widgets) or of :func:`adaptive_core.sample_adaptive` directly.  Progress is
    reported on every model call on the host's scale of ``len(sigmas) − 1`` steps; Cancel is honoured before
    every call; the trace is filled into ``trace`` (if given) and, with ``publish``, sent to the browser when
    a server runs (the ADO KSampler sends it with its own output instead).  A plan of one σ returns ``x``, as
    k-diffusion's samplers do.
    """
    if len(sigmas) <= 1:  # nothing to integrate (e.g. SplitSigmas at the end): as k-diffusion's samplers
        return x
    kwargs = dict(options)
    if "nfe_budget" in kwargs and not kwargs["nfe_budget"]:
        kwargs["nfe_budget"] = None
    if kwargs.get("model_type") == AUTO:
        kwargs["model_type"] = None
    host_total = len(sigmas) - 1
    run_trace = trace if trace is not None else Trace()

    k_callback = None
    if callback is not None:
        def k_callback(d):
            callback({**d, "i": host_progress_index(d["i"], d["nfe_budget"], host_total)})

    mm = _host("comfy.model_management")
    check = getattr(mm, "throw_exception_if_processing_interrupted", None)
    out = sample_adaptive(_Interruptible(model, check), x, sigmas, extra_args, k_callback, disable,
                          trace=run_trace, **kwargs)
    if publish:
        publish_trace(run_trace)
    return out


def publish_trace(trace: Trace) -> bool:
    """Send the run's chart to the browser, addressed to the node that is sampling (KSampler, SamplerCustom…).

    Uses ``server.PromptServer.instance.send_sync`` and ``comfy_execution.utils.get_executing_context``
    when a ComfyUI server runs; returns False (and does nothing) otherwise.  Never raises: the picture is
    cosmetic and must not fail a finished run.
    """
    server, ctx_mod = _host("server"), _host("comfy_execution.utils")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    get_ctx = getattr(ctx_mod, "get_executing_context", None)
    if instance is None or get_ctx is None:
        return False
    try:
        ctx = get_ctx()
        if ctx is None:
            return False
        instance.send_sync(TRACE_EVENT, {"node": str(ctx.node_id), "prompt_id": ctx.prompt_id,
                                         "trace": chart_payload(trace), "trace_json": trace.to_json()},
                           getattr(instance, "client_id", None))
        return True
    except Exception as e:  # pragma: no cover - depends on the host's server internals
        log.warning("ADO: could not send the trace chart to the browser: %s", e)
        return False


def register_dropdown() -> bool:
    """Offer ``ado_adaptive`` in KSampler / KSamplerAdvanced / KSamplerSelect (idempotent).

    The approach of RES4LYF and smZNodes (hosts.md §1.3): insert the name into
    ``comfy.samplers.KSampler.SAMPLERS`` (the list object that ``SAMPLER_NAMES`` also is) after
    ``uni_pc_bh2``, and set ``comfy.k_diffusion.sampling.sample_ado_adaptive``, which
    ``comfy.samplers.ksampler(name)`` looks up.  If ComfyUI is absent or its internals moved, logs one clear
    line and returns False; the nodes still load.
    """
    try:
        import comfy.k_diffusion.sampling as k_sampling
        import comfy.samplers as samplers
    except Exception as e:
        log.info("ADO: ComfyUI's sampler modules are not importable (%s); '%s' is not added to the KSampler "
                 "dropdown, the ADO nodes still work", e, SAMPLER_NAME)
        return False
    try:
        lists = [samplers.KSampler.SAMPLERS]
        names = getattr(samplers, "SAMPLER_NAMES", None)
        if isinstance(names, list) and names is not lists[0]:
            lists.append(names)
        for names in lists:
            if not isinstance(names, list):
                raise TypeError(f"expected a list of sampler names, found {type(names).__name__}")
            if SAMPLER_NAME not in names:
                anchor = "uni_pc_bh2"
                names.insert(names.index(anchor) + 1 if anchor in names else len(names), SAMPLER_NAME)
        setattr(k_sampling, "sample_" + SAMPLER_NAME, sample_ado)
        return True
    except Exception as e:
        log.warning("ADO: could not add '%s' to the KSampler dropdown (ComfyUI's internals may have moved: %s); "
                    "use the 'ADO Adaptive Sampler' or 'ADO Adaptive KSampler' nodes instead", SAMPLER_NAME, e)
        return False
