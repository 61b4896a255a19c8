"""Fakes of the AUTOMATIC1111 / Forge modules that ``scripts/ado_sampler.py`` uses, for CI.

They follow the host contracts the script relies on, read in the host sources (hosts.md §5):

* Forge: ``lllyasviel/stable-diffusion-webui-forge`` commit ``dfdcbab6`` (2025-06-26).
* A1111 1.10.x: the same files as merged into Forge by "Gradio 4 + WebUI 1.10" (``e26abf87``), with the
  A1111 differences of hosts.md §5.2/§5.3/§5.5: no ``sd_samplers.add_sampler``, ``x * sigmas[0]`` instead of
  the Forge predictor's ``noise_scaling``, a ``CompVisDenoiser`` model wrap instead of ``ForgeScheduleLinker``.
  A1111 1.9 has the same registry, sampler and infotext contract as 1.10 for everything used here.

Each fake names the host file and function it mirrors; only the parts the script touches are modelled,
with the host's names, signatures and order of effects.  :func:`install` puts a fresh set into
``sys.modules`` (``modules``, ``modules.shared``, ...) and a small ``gradio`` stand-in if gradio is absent.

The model is a tiny conditional Gaussian built in code: x0 ~ N(μ_c, diag v) for conditioning c, whose
exact denoiser (Tweedie) is written out for ve (x = x0 + σ·ε) and flow (x = (1−σ)·x0 + σ·ε) models.
"""
from __future__ import annotations

import functools
import json
import re
import sys
import types
from collections import namedtuple
from dataclasses import dataclass, field

import torch

SHAPE = (4, 6, 6)   # latent channels, height, width


# --- the tiny model ------------------------------------------------------------------------------------------

class TinyCondGaussian:
    """Exact denoiser of x0 ~ N(mean·c, diag v) per latent element, conditioned on a scalar tensor c per
    sample; counts its calls.  ``model_type`` "ve" or "flow" picks the noise parameterisation."""

    def __init__(self, model_type="ve"):
        g = torch.Generator().manual_seed(7)
        self.v = torch.logspace(-2, 0.3, SHAPE[0] * SHAPE[1] * SHAPE[2]).reshape(SHAPE)
        self.mean = torch.randn(SHAPE, generator=g)
        self.model_type = model_type
        self.calls = 0
        self.on_call = None   # test aid: called with the model after each call is counted

    def __call__(self, x, sigma, cond):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self)
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        mu = self.mean * cond.to(x.dtype).reshape(-1, 1, 1, 1)
        if self.model_type == "flow":  # E[x0 | x] for x = (1−s)·x0 + s·ε, finite at s = 1
            return mu + self.v * (1 - s) / (self.v * (1 - s) ** 2 + s * s) * (x - (1 - s) * mu)
        return mu + self.v / (self.v + s * s) * (x - mu)


def sd15_sigmas() -> torch.Tensor:
    """The 1000 discrete σ of SD1.x (scaled-linear betas), ascending, as ``model_wrap.sigmas`` holds them."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return ((1 - ac) / ac).sqrt().float()


def flow_shift(t, shift=3.0):
    """σ of a shifted flow model at time t ∈ [0, 1] (k_prediction.py::PredictionDiscreteFlow.sigma)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas() -> torch.Tensor:
    """1000 discrete σ of an SD3-style shifted flow model, ascending, ending at exactly 1."""
    return flow_shift(torch.arange(1, 1001, dtype=torch.float64) / 1000).float()


def interpolate_log_sigma(sigmas, t):
    """σ at fractional index t of an ascending table, interpolated in log σ (k_prediction.py::Prediction.sigma)."""
    t = t.float().clamp(0, len(sigmas) - 1)
    lo, w = t.floor().long(), t - t.floor()
    hi = (lo + 1).clamp(max=len(sigmas) - 1)
    return ((1 - w) * sigmas[lo].log() + w * sigmas[hi].log()).exp()


# --- modules/shared.py, modules/options.py ----------------------------------------------------------------

class OptionInfo:
    """mirrors modules/options.py::OptionInfo (the fields A1111 1.10 / Forge read)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section, self.infotext, self.comment_after = section, infotext, comment_after

    def info(self, info):
        """mirrors OptionInfo.info: appends the help text after the label."""
        self.comment_after += f"<span class='info'>({info})</span>"
        return self


class Options:
    """mirrors modules/options.py::Options: ``data`` (saved values), ``data_labels`` (OptionInfo by key),
    ``add_option``, ``__getattr__`` (saved value, else the default, else AttributeError), ``cast_value``."""

    def __init__(self, defaults):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {k: OptionInfo(v) for k, v in defaults.items()})

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value

    def add_option(self, key, info):
        """mirrors Options.add_option: registers the OptionInfo and keeps a saved value."""
        self.data_labels[key] = info
        if key not in self.data and not getattr(info, "do_not_save", False):
            self.data[key] = info.default

    def cast_value(self, key, value):
        """mirrors Options.cast_value: the text of an infotext cast to the type of the setting's default."""
        if value is None:
            return None
        default_value = self.data_labels[key].default
        if default_value is None:
            default_value = getattr(self, key, None)
        if default_value is None:
            return None
        expected_type = type(default_value)
        if expected_type == bool and value == "False":
            return False
        return expected_type(value)


@dataclass
class State:
    """mirrors modules/shared_state.py::State (sampling progress, interrupt flags, preview latent)."""
    interrupted: bool = False
    skipped: bool = False
    sampling_step: int = 0
    sampling_steps: int = 0
    current_latent: object = None
    steps_seen: list = field(default_factory=list)   # test aid: every sampling_step value set


class TotalTqdm:
    """mirrors modules/shared_total_tqdm.py::TotalTQDM.update (one tick per sampler callback)."""

    def __init__(self):
        self.ticks = 0

    def update(self):
        self.ticks += 1


# --- modules/sd_samplers_common.py ----------------------------------------------------------------------------

class InterruptedException(BaseException):
    """mirrors modules/sd_samplers_common.py::InterruptedException (a BaseException)."""


SamplerDataTuple = namedtuple('SamplerData', ['name', 'constructor', 'aliases', 'options'])


class SamplerData(SamplerDataTuple):
    """mirrors modules/sd_samplers_common.py::SamplerData (total_steps doubles for second_order)."""

    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


def build(flavour: str, model_type: str = "ve") -> dict[str, types.ModuleType]:
    """A fresh set of fake host modules; ``flavour`` "a1111" (1.9/1.10) or "forge"; the loaded model is
    a :class:`TinyCondGaussian` of ``model_type``."""
    if flavour not in ("a1111", "forge"):
        raise ValueError(f"flavour must be 'a1111' or 'forge', got {flavour!r}")
    mods = {name: types.ModuleType(name) for name in (
        "modules", "modules.shared", "modules.script_callbacks", "modules.sd_samplers_common",
        "modules.sd_samplers_kdiffusion", "modules.sd_samplers", "modules.sd_schedulers",
        "modules.infotext_utils", "modules.processing")}
    m = types.SimpleNamespace(**{k.split(".")[-1]: v for k, v in mods.items()})
    for name, mod in mods.items():
        if "." in name:
            setattr(m.modules, name.split(".")[-1], mod)
    m.modules.__path__ = []

    # modules/shared.py
    sh = m.shared
    sh.opts = Options({"hide_samplers": [], "live_previews_enable": True, "show_progress_every_n_steps": 1,
                       "img2img_fix_steps": False})
    sh.OptionInfo = OptionInfo
    sh.state = State()
    sh.total_tqdm = TotalTqdm()
    sh.flavour = flavour
    sh.sd_model = FakeSDModel(flavour, model_type)

    # modules/script_callbacks.py
    cb = m.script_callbacks
    cb.callback_map = {"ui_settings": [], "infotext_pasted": []}
    cb.on_ui_settings = lambda fn, *, name=None: cb.callback_map["ui_settings"].append(fn)
    cb.on_infotext_pasted = lambda fn, *, name=None: cb.callback_map["infotext_pasted"].append(fn)
    cb.ui_settings_callback = lambda: [fn() for fn in cb.callback_map["ui_settings"]]
    cb.infotext_pasted_callback = lambda text, params: [fn(text, params) for fn in cb.callback_map["infotext_pasted"]]

    _fill_sampler_modules(m, flavour)
    _fill_infotext_modules(m)
    return mods


class FakeSDModel:
    """The loaded checkpoint as the sampler sees it: ``is_sdxl``, ``is_sd3`` (A1111 1.10), Forge's
    ``forge_objects.unet.model.predictor`` (``backend/modules/k_prediction.py``) and the tiny denoiser."""

    def __init__(self, flavour, model_type):
        self.is_sdxl = False
        self.is_sd3 = flavour == "a1111" and model_type == "flow"
        self.denoiser = TinyCondGaussian(model_type)
        sigmas = flow_sigmas() if model_type == "flow" else sd15_sigmas()
        predictor = types.SimpleNamespace(sigmas=sigmas, prediction_type="const" if model_type == "flow" else "eps")
        if model_type == "flow":   # mirrors k_prediction.py::PredictionDiscreteFlow (noise_scaling, sigma)
            predictor.noise_scaling = lambda sigma, noise, latent, max_denoise=False: \
                sigma * noise + (1.0 - sigma) * latent
            predictor.sigma = lambda t: flow_shift(t / 1000.0)
        else:                       # mirrors k_prediction.py::Prediction (noise_scaling, sigma: log-σ interpolation)
            predictor.noise_scaling = lambda sigma, noise, latent, max_denoise=False: noise * sigma + latent
            predictor.sigma = lambda t: interpolate_log_sigma(sigmas, t)
        unet = types.SimpleNamespace(model=types.SimpleNamespace(predictor=predictor))
        self.forge_objects = types.SimpleNamespace(unet=unet)


class DiscreteSchedule:
    """mirrors k_diffusion/external.py::DiscreteSchedule (A1111 ``CompVisDenoiser``) and ``ForgeScheduleLinker``:
    ``sigmas`` ascending, ``get_sigmas(n)`` = n σ from the largest to the smallest, then 0."""

    def __init__(self, sd_model, flavour):
        self.inner_model = sd_model
        self._predictor = sd_model.forge_objects.unet.model.predictor
        self.sigmas = self._predictor.sigmas
        if flavour == "forge":
            self.predictor = sd_model.forge_objects.unet.model.predictor

    def get_sigmas(self, n):
        """n σ at t = linspace(len − 1, 0, n) through the predictor's ``sigma(t)``, then a 0.  For Forge's
        flow predictor t is read as a timestep, so the last σ is 0 and the grid ends in a repeated 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self._predictor.sigma(t).float(), torch.zeros(1)])

    def __call__(self, x, sigma, cond):
        return self.inner_model.denoiser(x, sigma, cond)


def _fill_sampler_modules(m, flavour):
    """modules/sd_samplers_common.py, sd_samplers_kdiffusion.py, sd_schedulers.py, sd_samplers.py."""
    sh, common, kd = m.shared, m.sd_samplers_common, m.sd_samplers_kdiffusion
    sched, smp = m.sd_schedulers, m.sd_samplers
    state, opts = sh.state, sh.opts

    common.SamplerData = SamplerData
    common.InterruptedException = InterruptedException

    def store_latent(decoded):
        """mirrors sd_samplers_common.py::store_latent (the live preview's latent)."""
        state.current_latent = decoded
    common.store_latent = store_latent

    def setup_img2img_steps(p, steps=None):
        """mirrors sd_samplers_common.py::setup_img2img_steps."""
        if opts.img2img_fix_steps or steps is not None:
            requested_steps = (steps or p.steps)
            steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
            t_enc = requested_steps - 1
        else:
            steps = p.steps
            t_enc = int(min(p.denoising_strength, 0.999) * steps)
        return steps, t_enc
    common.setup_img2img_steps = setup_img2img_steps

    class Sampler:
        """mirrors sd_samplers_common.py::Sampler (__init__, callback_state, launch_sampling, initialize)."""

        def __init__(self, funcname):
            self.funcname = funcname
            self.func = funcname
            self.extra_params = []
            self.config = None
            self.last_latent = None
            self.s_min_uncond = None
            self.p = None
            self.model_wrap_cfg = None
            self.sampler_extra_args = None
            self.stop_at = None

        def callback_state(self, d):
            step = d['i']
            if self.stop_at is not None and step > self.stop_at:
                raise InterruptedException
            state.sampling_step = step
            state.steps_seen.append(step)
            sh.total_tqdm.update()

        def launch_sampling(self, steps, func):
            self.model_wrap_cfg.steps = steps
            self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
            state.sampling_steps = steps
            state.sampling_step = 0
            try:
                return func()
            except InterruptedException:
                return self.last_latent

        def initialize(self, p) -> dict:
            import inspect
            self.p = p
            self.model_wrap_cfg.p = p
            self.model_wrap_cfg.step = 0
            self.s_min_uncond = getattr(p, 's_min_uncond', 0.0)
            extra_params_kwargs = {}
            for param_name in self.extra_params:
                if hasattr(p, param_name) and param_name in inspect.signature(self.func).parameters:
                    extra_params_kwargs[param_name] = getattr(p, param_name)
            return extra_params_kwargs
    common.Sampler = Sampler

    class CFGDenoiserKDiffusion:
        """mirrors sd_samplers_cfg_denoiser.py::CFGDenoiser.forward: interrupt check first, cond and
        uncond predictions, CFG with ``cond_scale``, ``last_latent``/``store_latent``, ``step += 1``."""

        def __init__(self, sampler):
            self.sampler, self.model_wrap, self.step, self.p = sampler, None, 0, None
            self.steps = self.total_steps = None
            self.calls = []    # test aid: (sigma, cond_scale) per call

        @property
        def inner_model(self):
            if self.model_wrap is None:
                self.model_wrap = DiscreteSchedule(sh.sd_model, flavour)
            return self.model_wrap

        def __call__(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
            if state.interrupted or state.skipped:
                raise InterruptedException
            self.calls.append((sigma.clone(), cond_scale))
            cond_pred = self.inner_model(x, sigma, cond)
            uncond_pred = self.inner_model(x, sigma, uncond)
            denoised = uncond_pred + (cond_pred - uncond_pred) * cond_scale
            self.sampler.last_latent = denoised
            store_latent(denoised)
            self.step += 1
            return denoised
    kd.CFGDenoiserKDiffusion = CFGDenoiserKDiffusion

    def noise_scaling(sampler, sigma, noise, latent):
        """Forge: ``model_wrap.predictor.noise_scaling``; A1111 1.10: ``latent + noise * sigma``."""
        if flavour == "forge":
            return sampler.model_wrap.predictor.noise_scaling(sigma, noise, latent, max_denoise=False)
        return latent + noise * sigma

    class KDiffusionSampler(Sampler):
        """mirrors sd_samplers_kdiffusion.py::KDiffusionSampler (__init__, get_sigmas, sample,
        sample_img2img): σ from the scheduler, arguments injected by parameter name, ``launch_sampling``."""

        def __init__(self, funcname, sd_model, options=None):
            super().__init__(funcname)
            self.options = options or {}
            self.func = funcname if callable(funcname) else None
            self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
            self.model_wrap = self.model_wrap_cfg.inner_model

        def get_sigmas(self, p, steps):
            scheduler_name = (p.hr_scheduler if p.is_hr_pass else p.scheduler) or 'Automatic'
            if scheduler_name == 'Automatic':
                scheduler_name = self.config.options.get('scheduler', None)
            scheduler = sched.schedulers_map.get(scheduler_name)
            m_sigma_min, m_sigma_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
            if scheduler is None or scheduler.function is None:
                sigmas = self.model_wrap.get_sigmas(steps)
            else:
                if scheduler.label != 'Automatic' and not p.is_hr_pass:
                    p.extra_generation_params["Schedule type"] = scheduler.label
                sigmas = scheduler.function(n=steps, sigma_min=m_sigma_min, sigma_max=m_sigma_max, device="cpu")
            return sigmas.cpu()

        def _run(self, p, x, conditioning, unconditional_conditioning, steps, sigmas, launch_steps, n_for_func):
            import inspect
            extra_params_kwargs = self.initialize(p)
            parameters = inspect.signature(self.func).parameters
            if 'n' in parameters:
                extra_params_kwargs['n'] = n_for_func
            if 'sigma_min' in parameters:
                extra_params_kwargs['sigma_min'] = self.model_wrap.sigmas[0].item()
                extra_params_kwargs['sigma_max'] = self.model_wrap.sigmas[-1].item()
            if 'sigmas' in parameters:
                extra_params_kwargs['sigmas'] = sigmas
            self.last_latent = x
            self.sampler_extra_args = {'cond': conditioning, 'image_cond': None, 'uncond': unconditional_conditioning,
                                       'cond_scale': p.cfg_scale, 's_min_uncond': self.s_min_uncond}
            return self.launch_sampling(launch_steps, lambda: self.func(
                self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=False,
                callback=self.callback_state, **extra_params_kwargs))

        def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
            steps = steps or p.steps
            sigmas = self.get_sigmas(p, steps).to(x.device)
            x = noise_scaling(self, sigmas[0], x, torch.zeros_like(x))
            return self._run(p, x, conditioning, unconditional_conditioning, steps, sigmas, steps, steps)

        def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                           image_conditioning=None):
            steps, t_enc = setup_img2img_steps(p, steps)
            sigmas = self.get_sigmas(p, steps).to(x.device)
            sigma_sched = sigmas[steps - t_enc - 1:]
            xi = noise_scaling(self, sigma_sched[0], noise, x)
            self.model_wrap_cfg.init_latent = x
            return self._run(p, xi, conditioning, unconditional_conditioning, steps, sigma_sched, t_enc + 1,
                             len(sigma_sched) - 1)
    kd.KDiffusionSampler = KDiffusionSampler

    def karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
        """mirrors k_diffusion/sampling.py::get_sigmas_karras."""
        ramp = torch.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return torch.cat([(max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, torch.zeros(1)]).to(device)

    @dataclass
    class Scheduler:
        """mirrors sd_schedulers.py::Scheduler."""
        name: str
        label: str
        function: object
        default_rho: float = -1
        need_inner_model: bool = False
        aliases: list = None
    sched.Scheduler = Scheduler
    sched.schedulers = [Scheduler('automatic', 'Automatic', None),
                        Scheduler('karras', 'Karras', karras, default_rho=7.0)]
    sched.schedulers_map = {**{x.name: x for x in sched.schedulers}, **{x.label: x for x in sched.schedulers}}

    # modules/sd_samplers.py
    def euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        """k_diffusion/sampling.py::sample_euler without churn (the host's own built-in sampler here)."""
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **extra_args)
            if callback is not None:
                callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    smp.all_samplers = [SamplerData('Euler', lambda model: KDiffusionSampler(euler, model), ['k_euler'], {})]
    smp.all_samplers_map = {x.name: x for x in smp.all_samplers}
    smp.samplers, smp.samplers_for_img2img, smp.samplers_map, smp.samplers_hidden = [], [], {}, set()

    def set_samplers():
        """mirrors sd_samplers.py::set_samplers (lower-cased name/alias map, hidden set)."""
        smp.samplers_hidden = set(opts.hide_samplers)
        smp.samplers = smp.all_samplers
        smp.samplers_for_img2img = smp.all_samplers
        smp.samplers_map.clear()
        for sampler in smp.all_samplers:
            smp.samplers_map[sampler.name.lower()] = sampler.name
            for alias in sampler.aliases:
                smp.samplers_map[alias.lower()] = sampler.name
    smp.set_samplers = set_samplers

    if flavour == "forge":
        def add_sampler(sampler):
            """mirrors Forge's sd_samplers.py::add_sampler (append if the name is new, rebuild, set_samplers)."""
            smp.add_sampler_calls = getattr(smp, "add_sampler_calls", 0) + 1
            if sampler.name not in [x.name for x in smp.all_samplers]:
                smp.all_samplers.append(sampler)
                smp.all_samplers_map = {x.name: x for x in smp.all_samplers}
                set_samplers()
        smp.add_sampler = add_sampler

    def visible_sampler_names():
        """mirrors sd_samplers.py::visible_sampler_names (the Sampling method dropdown's choices)."""
        return [x.name for x in smp.samplers if x.name not in smp.samplers_hidden]
    smp.visible_sampler_names = visible_sampler_names

    def create_sampler(name, model):
        """mirrors sd_samplers.py::create_sampler (constructor, then ``sampler.config``)."""
        config = smp.all_samplers_map.get(name, None) if name is not None else smp.all_samplers[0]
        assert config is not None, f'bad sampler name: {name}'
        sampler = config.constructor(model)
        sampler.config = config
        return sampler
    smp.create_sampler = create_sampler

    @functools.cache
    def get_sampler_and_scheduler(sampler_name, scheduler_name, *, convert_automatic=True):
        """mirrors sd_samplers.py::get_sampler_and_scheduler: legacy scheduler suffixes stripped, an unknown
        name silently replaced by the default sampler (the behaviour the script warns about)."""
        default_sampler = smp.samplers[0]
        found_scheduler = sched.schedulers_map.get(scheduler_name, sched.schedulers[0])
        name = sampler_name or default_sampler.name
        for scheduler in sched.schedulers:
            for name_option in [scheduler.label, scheduler.name, *(scheduler.aliases or [])]:
                if name.endswith(" " + name_option):
                    found_scheduler = scheduler
                    name = name[0:-(len(name_option) + 1)]
                    break
        sampler = smp.all_samplers_map.get(name, default_sampler)
        if convert_automatic and sampler.options.get('scheduler', None) == found_scheduler.name:
            found_scheduler = sched.schedulers[0]
        return sampler.name, found_scheduler.label
    smp.get_sampler_and_scheduler = get_sampler_and_scheduler
    smp.get_sampler_from_infotext = lambda d: get_sampler_and_scheduler(d.get("Sampler"), d.get("Schedule type"))[0]
    set_samplers()


def _fill_infotext_modules(m):
    """modules/infotext_utils.py and the infotext/process parts of modules/processing.py."""
    it, proc, sh, cb, smp = m.infotext_utils, m.processing, m.shared, m.script_callbacks, m.sd_samplers
    re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

    def quote(text):
        """mirrors infotext_utils.py::quote."""
        if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
            return text
        return json.dumps(text, ensure_ascii=False)
    it.quote = quote

    def parse_generation_parameters(x: str):
        """mirrors infotext_utils.py::parse_generation_parameters (the parameter line; prompt kept whole)."""
        res = {}
        *lines, lastline = x.strip().split("\n")
        if len(re_param.findall(lastline)) < 3:
            lines.append(lastline)
            lastline = ''
        for k, v in re_param.findall(lastline):
            if v and v[0] == '"' and v[-1] == '"':
                v = json.loads(v)
            res[k] = v
        res["Prompt"] = "\n".join(lines)
        return res
    it.parse_generation_parameters = parse_generation_parameters

    def get_override_settings(params, *, skip_fields=None):
        """mirrors infotext_utils.py::get_override_settings: settings whose OptionInfo has an ``infotext``
        key, cast with ``opts.cast_value``, kept only where they differ from the current value."""
        res = []
        mapping = [(info.infotext, k) for k, info in sh.opts.data_labels.items() if info.infotext]
        for param_name, setting_name in mapping:
            if param_name in (skip_fields or {}):
                continue
            v = params.get(param_name, None)
            if v is None:
                continue
            v = sh.opts.cast_value(setting_name, v)
            if v == getattr(sh.opts, setting_name, None):
                continue
            res.append((param_name, setting_name, v))
        return res
    it.get_override_settings = get_override_settings

    def paste(prompt):
        """mirrors infotext_utils.py::connect_paste's paste_func: parse, ``infotext_pasted_callback``, then
        each field's value (sampler via ``get_sampler_from_infotext``) and the override settings."""
        params = parse_generation_parameters(prompt)
        cb.infotext_pasted_callback(prompt, params)
        return params, smp.get_sampler_from_infotext(params), {k: v for _, k, v in get_override_settings(params)}
    it.paste = paste

    def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                        use_main_prompt=False, index=None, all_negative_prompts=None):
        """mirrors processing.py::create_infotext: host fields, ``**p.extra_generation_params`` (list values
        indexed, callables called with ``**locals()``), ``k: quote(v)`` joined by ", "."""
        if use_main_prompt:
            index = 0
        elif index is None:
            index = position_in_batch + iteration * p.batch_size
        generation_params = {"Steps": p.steps, "Sampler": p.sampler_name, "Schedule type": p.scheduler,
                             "CFG scale": p.cfg_scale, "Seed": all_seeds[index], "Size": f"{p.width}x{p.height}",
                             **p.extra_generation_params}
        for key, value in generation_params.items():
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(**locals())
        text = ", ".join([k if k == v else f'{k}: {quote(v)}' for k, v in generation_params.items() if v is not None])
        return f"{all_prompts[index]}\n{text}".strip()
    proc.create_infotext = create_infotext

    class Processing:
        """The fields of processing.py::StableDiffusionProcessing that samplers and infotext read."""

        def __init__(self, **kw):
            self.prompt, self.steps, self.cfg_scale, self.seed, self.subseed = "a tiny model", 8, 5.0, 1, -1
            self.batch_size, self.n_iter, self.width, self.height = 1, 1, 48, 48
            self.sampler_name, self.scheduler, self.hr_scheduler, self.is_hr_pass = "Euler", "Automatic", None, False
            self.denoising_strength, self.init_latent = 0.0, None
            self.override_settings, self.extra_generation_params, self.s_min_uncond = {}, {}, 0.0
            self.sd_model = sh.sd_model
            for k, v in kw.items():
                setattr(self, k, v)
    proc.Processing = Processing

    def process_images(p):
        """mirrors processing.py::process_images + process_images_inner, reduced: override settings applied
        for the job and restored, per iteration ``p.seeds``/``p.subseeds`` and one noise per seed, a sampler
        from ``create_sampler``, ``sample`` (txt2img) or ``sample_img2img``, then one infotext per image via
        ``create_infotext(p, p.prompts, p.seeds, p.subseeds, index=i)``.  Returns (latents, infotexts)."""
        saved = {k: sh.opts.data.get(k) for k in p.override_settings}
        for k, v in p.override_settings.items():
            setattr(sh.opts, k, v)
        try:
            n = p.batch_size * p.n_iter
            p.all_seeds = [p.seed + i for i in range(n)]
            p.all_subseeds = [p.subseed + i for i in range(n)]
            p.all_prompts = [p.prompt] * n
            latents, infotexts = [], []
            for it_no in range(p.n_iter):
                p.iteration = it_no
                sl = slice(it_no * p.batch_size, (it_no + 1) * p.batch_size)
                p.seeds, p.subseeds, p.prompts = p.all_seeds[sl], p.all_subseeds[sl], p.all_prompts[sl]
                noise = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in p.seeds])
                cond = torch.ones(p.batch_size)
                uncond = torch.zeros(p.batch_size)
                p.sampler = smp.create_sampler(p.sampler_name, p.sd_model)
                if p.init_latent is None:
                    out = p.sampler.sample(p, noise, cond, uncond)
                else:
                    out = p.sampler.sample_img2img(p, p.init_latent.expand_as(noise), noise, cond, uncond)
                latents.append(out)
                infotexts += [create_infotext(p, p.prompts, p.seeds, p.subseeds, index=i) for i in range(p.batch_size)]
            return torch.cat(latents), infotexts
        finally:
            for k, v in saved.items():
                if v is None:
                    sh.opts.data.pop(k, None)
                else:
                    sh.opts.data[k] = v
    proc.process_images = process_images


def gradio_stand_in() -> types.ModuleType:
    """A ``gradio`` with the names the script uses (Radio, Slider, Warning), for machines without gradio."""
    gr = types.ModuleType("gradio")
    gr.Radio = type("Radio", (), {})
    gr.Slider = type("Slider", (), {})
    gr.warnings = []

    def warning(message):
        gr.warnings.append(message)
    gr.Warning = warning
    return gr


def install(monkeypatch, flavour: str, model_type: str = "ve"):
    """Put fresh fake host modules (and the gradio stand-in) into ``sys.modules`` for one test; returns
    them as a namespace (``shared``, ``sd_samplers``, ``processing``, ...)."""
    mods = build(flavour, model_type)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "gradio", gradio_stand_in())
    ns = types.SimpleNamespace(**{k.split(".")[-1]: v for k, v in mods.items()})
    ns.gradio = sys.modules["gradio"]
    return ns
