"""ADO for AUTOMATIC1111 (1.9, 1.10) and Forge: "ADO Adaptive" in the Sampling method dropdown.

A1111 imports every ``scripts/*.py`` of an extension at start-up with the extension folder on ``sys.path``
(``modules/scripts.py::load_scripts``), before the UI reads the sampler list, so the sampler is registered
at import.  This file only connects the host to :mod:`adaptive_core`; the option checks, infotext entries
and schedule hash live in :mod:`adaptive_core.hosts_common`.

* Sampler: a ``KDiffusionSampler`` whose function is :func:`adaptive_core.sample_adaptive`.  The host
  passes its σ schedule (``steps`` + 1 values), so "Sampling steps" is ADO's NFE budget; CFG, progress,
  live preview and interrupt work through the host's CFG denoiser and ``callback_state`` as for any
  k-diffusion sampler (hosts.md §5.3).
* Settings tab, section "ADO Adaptive": mode, tolerance, noise levels, model type.  Each setting carries
  an infotext key, so pasting an image's parameters restores it through the host's "Override settings".
* Infotext: the options, the ADO version, and per image the realised NFE and schedule hash.  A pasted
  sampler name the host does not know is reported instead of silently replaced (hosts.md §5.6).
"""
from __future__ import annotations

import logging

from modules import script_callbacks, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion, shared

from adaptive_core import Trace, sample_adaptive
from adaptive_core import hosts_common as hc

log = logging.getLogger("ado")


def current_option_values() -> dict:
    """ADO's settings as the host holds them now (defaults where the Settings tab never registered them,
    e.g. API-only start)."""
    return {o.key: getattr(shared.opts, o.key, o.default) for o in hc.HOST_OPTIONS}


class AdoSampler(sd_samplers_kdiffusion.KDiffusionSampler):
    """``KDiffusionSampler`` running :func:`sample_adaptive` with the Settings-tab options; after each run
    it writes the options and, per image, the realised NFE and schedule hash into the infotext."""

    def __init__(self, sd_model):
        super().__init__(sample_adaptive, sd_model)
        self.ado_trace: Trace | None = None

    def initialize(self, p) -> dict:
        """The host's per-run set-up, then ADO's options bound into ``self.func`` (the host injects the
        ``sigmas`` argument by name, as for every k-diffusion sampler)."""
        kwargs = super().initialize(p)
        values = current_option_values()
        options, model_type = hc.sampler_kwargs(values)
        if model_type is None:
            model_type = hc.webui_model_type(self.model_wrap, getattr(p, "sd_model", None))
        self.ado_trace = Trace()

        def ado(model, x, sigmas, extra_args=None, callback=None, disable=None):
            # the core's default budget is len(sigmas) − 1, a repeated final 0 included (Forge, flow models):
            # "Sampling steps" = model calls and the progress bar ends full; it runs without autograd
            return sample_adaptive(model, x, sigmas, extra_args, callback, disable,
                                   model_type=model_type, trace=self.ado_trace, **options)

        self.func = ado
        p.extra_generation_params.update(hc.option_params(values))
        return kwargs

    def sample(self, p, *args, **kwargs):
        """txt2img (and the hires-fix pass): the host's sampling, then the run's infotext entries."""
        samples = super().sample(p, *args, **kwargs)
        self._record_run(p)
        return samples

    def sample_img2img(self, p, *args, **kwargs):
        """img2img: the host's sampling over the truncated schedule, then the run's infotext entries."""
        samples = super().sample_img2img(p, *args, **kwargs)
        self._record_run(p)
        return samples

    def _record_run(self, p) -> None:
        """Per image of this batch: realised NFE and schedule hash, keyed by (seed, subseed)."""
        trace = self.ado_trace
        if trace is None or not trace.samples:
            return
        hires = bool(getattr(p, "is_hr_pass", False))
        seeds = list(getattr(p, "seeds", None) or [])
        subseeds = list(getattr(p, "subseeds", None) or [None] * len(seeds))
        for key in hc.run_keys(hires):
            if not isinstance(p.extra_generation_params.get(key), hc.SeedKeyedValue):
                p.extra_generation_params[key] = hc.SeedKeyedValue()
        for b in range(min(len(trace.samples), len(seeds))):
            if not trace.samples[b]:
                continue  # interrupted before this image's first call
            for key, text in hc.run_params(trace, b, hires).items():
                p.extra_generation_params[key].set(seeds[b], subseeds[b], text)


def sampler_data():
    """The host's ``SamplerData`` entry for ADO (``modules/sd_samplers_common.py::SamplerData``)."""
    return sd_samplers_common.SamplerData(hc.SAMPLER_LABEL, lambda model: AdoSampler(model),
                                          list(hc.SAMPLER_ALIASES), {})


def register_sampler() -> None:
    """Add "ADO Adaptive" to the host's sampler list, replacing an entry left by an earlier import of this
    file (Reload UI).  Forge: ``modules/sd_samplers.py::add_sampler``; A1111 1.9/1.10 has no such function:
    extend ``all_samplers``, rebuild ``all_samplers_map`` and call ``set_samplers()``."""
    sd_samplers.all_samplers[:] = [s for s in sd_samplers.all_samplers if s.name != hc.SAMPLER_LABEL]
    data = sampler_data()
    if hasattr(sd_samplers, "add_sampler"):
        sd_samplers.add_sampler(data)
    else:
        sd_samplers.all_samplers.append(data)
        sd_samplers.all_samplers_map = {x.name: x for x in sd_samplers.all_samplers}
        sd_samplers.set_samplers()
    cached = getattr(sd_samplers, "get_sampler_and_scheduler", None)
    if hasattr(cached, "cache_clear"):  # @functools.cache: forget lookups made before ADO existed
        cached.cache_clear()


def on_ui_settings() -> None:
    """Settings tab, section "ADO Adaptive": one entry per :data:`hosts_common.HOST_OPTIONS`, each with
    its infotext key so pasted parameters restore it."""
    import gradio as gr

    section = ("ado", "ADO Adaptive")
    for o in hc.HOST_OPTIONS:
        if o.choices is not None:
            component, args = gr.Radio, {"choices": list(o.choices)}
        else:
            component, args = gr.Slider, {"minimum": o.minimum, "maximum": o.maximum, "step": o.step}
        info = shared.OptionInfo(o.default, o.label, component, args, section=section, infotext=o.infotext)
        shared.opts.add_option(o.key, info.info(o.help))


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """Restore ADO aliases to the sampler label and warn (console and UI) about a sampler name the host
    does not know, which it would otherwise replace by its default without a word."""
    schedulers = []
    try:
        from modules import sd_schedulers
        for s in sd_schedulers.schedulers:
            schedulers += [s.label, s.name, *(getattr(s, "aliases", None) or [])]
    except ImportError:  # A1111 before 1.9 has no scheduler list
        pass
    for problem in hc.pasted_sampler_problems(params, sd_samplers.all_samplers_map, schedulers):
        log.warning("ADO: %s", problem)
        print(f"ADO: {problem}")
        try:
            import gradio as gr
            gr.Warning(problem)
        except Exception:  # outside a gradio event, or a gradio without toasts: the console line stays
            pass


register_sampler()
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_infotext_pasted(on_infotext_pasted)
