"""Small stand-ins for the parts of ComfyUI that ADO's node pack touches, following hosts.md §1–2.

Each fake names the ComfyUI file and function (commit a125cd84, ComfyUI 0.3.64) whose contract it mirrors;
none of ComfyUI's code is copied.  :func:`install` puts them into ``sys.modules`` (through pytest's
``monkeypatch``, so they are removed after the test) and :func:`load_pack` imports the repository root the
way ComfyUI's ``nodes.py::load_custom_node`` does (``spec_from_file_location`` on ``__init__.py``).

The "model" is an exact denoiser of a Gaussian per conditioning (Tweedie), so runs have known answers.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# --- comfy/model_sampling.py -------------------------------------------------------------------------------

class EPS:
    """Mirrors ``comfy/model_sampling.py::EPS``: noise_scaling x = latent + σ·noise, inverse is identity."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class V_PREDICTION(EPS):
    """Mirrors ``comfy/model_sampling.py::V_PREDICTION`` (same scaling as EPS seen from the sampler)."""


class CONST:
    """Mirrors ``comfy/model_sampling.py::CONST`` (rectified flow): x = σ·noise + (1 − σ)·latent."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


class ModelSamplingDiscrete:
    """Mirrors ``comfy/model_sampling.py::ModelSamplingDiscrete``' σ range (SD1 schedule)."""

    sigma_min = torch.tensor(0.0291675)
    sigma_max = torch.tensor(14.614642)


def time_snr_shift(alpha, t):
    """Mirrors ``comfy/model_sampling.py::time_snr_shift``: σ = α·t / (1 + (α − 1)·t)."""
    return t if alpha == 1.0 else alpha * t / (1 + (alpha - 1) * t)


class ModelSamplingDiscreteFlow:
    """Mirrors ``comfy/model_sampling.py::ModelSamplingDiscreteFlow``: its σ range (shift 1) and
    ``percent_to_sigma`` (1 at 0%, 0 at 100%, else the shifted time of t = 1 − percent)."""

    sigma_min = torch.tensor(0.001)
    sigma_max = torch.tensor(1.0)
    shift = 1.0

    def shifted(self, t):
        """``time_snr_shift(shift, t)``."""
        return time_snr_shift(self.shift, t)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self.shifted(1.0 - percent)


class ModelSamplingFlux(ModelSamplingDiscreteFlow):
    """Mirrors ``comfy/model_sampling.py::ModelSamplingFlux``: the same ``percent_to_sigma`` with
    ``flux_time_shift(shift, 1, t)`` = e^μ / (e^μ + 1/t − 1), μ = ``shift`` (1.15 by default)."""

    shift = 1.15

    def shifted(self, t):
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1))


def model_sampling(kind: str):
    """Mirrors ``comfy/model_base.py::model_sampling``: a class composed of a schedule and a parameterisation."""
    sched, param = {"eps": (ModelSamplingDiscrete, EPS), "v": (ModelSamplingDiscrete, V_PREDICTION),
                    "flow": (ModelSamplingDiscreteFlow, CONST)}[kind]

    class ModelSampling(sched, param):
        pass
    return ModelSampling()


# --- the model: comfy/model_base.py::BaseModel + comfy/model_patcher.py::ModelPatcher -----------------------

class GaussianDenoiser(torch.nn.Module):
    """Exact D(x, σ) of data ~ N(μ_c, diag v) for each conditioning c (ve or flow), counting its calls.

    Conditioning as ComfyUI passes it: a list of ``[tensor, dict]``; μ_c is the tensor's mean (a scalar
    shift), so positive and negative give different predictions.  Works per sample (batch invariant).
    """

    def __init__(self, kind: str, n_features: int):
        super().__init__()
        self.kind = kind
        self.v = torch.logspace(-2, 0.5, n_features).reshape(1, n_features, 1, 1)
        self.calls = 0

    def forward(self, x, sigma, mu):
        v = self.v.to(x.dtype)
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        if self.kind == "flow":
            return mu + v * (1 - s) / (v * (1 - s) ** 2 + s * s) * (x - (1 - s) * mu)
        return mu + v / (v + s * s) * (x - mu)


class LatentFormat:
    """Mirrors ``comfy/latent_formats.py::LatentFormat``: 4 channels, scale 1 (process_in/out are identities)."""

    latent_channels = 4
    latent_dimensions = 2
    latent_rgb_factors = None


class BaseModel:
    """Mirrors what samplers see of ``comfy/model_base.py::BaseModel``: model_sampling, latent format,
    ``process_latent_in/out`` and ``scale_latent_inpaint`` (flow: σ·noise + (1−σ)·latent)."""

    def __init__(self, kind: str, channels: int = 4):
        self.model_sampling = model_sampling(kind)
        self.latent_format = LatentFormat()
        self.diffusion_model = GaussianDenoiser(kind, channels)

    def process_latent_in(self, x):
        return x

    def process_latent_out(self, x):
        return x

    def scale_latent_inpaint(self, x, sigma, noise, latent_image):
        return self.model_sampling.noise_scaling(sigma.reshape([sigma.shape[0]] + [1] * (len(noise.shape) - 1)),
                                                 noise, latent_image)


class ModelPatcher:
    """Mirrors ``comfy/model_patcher.py::ModelPatcher``: ``model``, ``model_options``, ``load_device``,
    ``get_model_object(name)`` (``model_sampling`` / ``latent_format``)."""

    def __init__(self, kind: str = "eps", channels: int = 4):
        self.model = BaseModel(kind, channels)
        self.model_options = {"transformer_options": {}}
        self.load_device = torch.device("cpu")

    def get_model_object(self, name):
        return getattr(self.model, name)

    @property
    def calls(self):
        return self.model.diffusion_model.calls


# --- comfy/samplers.py ---------------------------------------------------------------------------------------

class CFGGuider:
    """Mirrors ``comfy/samplers.py::CFGGuider``: holds conds, cfg, model_patcher and inner_model (the
    BaseModel); one call evaluates cond and uncond in one batched model forward (``calc_cond_batch``) and
    mixes them as ``uncond + (cond − uncond)·cfg`` (``cfg_function``)."""

    def __init__(self, model_patcher: ModelPatcher):
        self.model_patcher = model_patcher
        self.inner_model = model_patcher.model
        self.model_options = model_patcher.model_options
        self.conds, self.cfg = {}, 1.0

    def set_conds(self, positive, negative):
        self.conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg):
        self.cfg = cfg

    @staticmethod
    def _mu(cond):
        return float(cond[0][0].float().mean())

    def __call__(self, x, sigma, model_options={}, seed=None):
        net = self.inner_model.diffusion_model
        net.calls += 1
        cond = net(x, sigma, self._mu(self.conds["positive"]))
        if math.isclose(self.cfg, 1.0):
            return cond
        uncond = net(x, sigma, self._mu(self.conds["negative"]))
        return uncond + (cond - uncond) * self.cfg

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        """Mirrors ``CFGGuider.sample`` → ``inner_sample``: extra_args = {model_options (clone with
        sample_sigmas), seed}; latent in/out processing; the sampler adds denoise_mask."""
        latent_image = self.inner_model.process_latent_in(latent_image)
        opts = {**self.model_options, "transformer_options": {**self.model_options.get("transformer_options", {}),
                                                               "sample_sigmas": sigmas}}
        extra_args = {"model_options": opts, "seed": seed}
        samples = sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        return self.inner_model.process_latent_out(samples.to(torch.float32))


class KSamplerX0Inpaint:
    """Mirrors ``comfy/samplers.py::KSamplerX0Inpaint``: the ``model`` a sampler function receives; blends the
    kept region (mask 0) with the re-noised latent before the call and with the latent after it."""

    def __init__(self, model, sigmas):
        self.inner_model = model
        self.sigmas = sigmas

    def __call__(self, x, sigma, denoise_mask, model_options={}, seed=None):
        if denoise_mask is not None:
            latent_mask = 1.0 - denoise_mask
            x = x * denoise_mask + self.inner_model.inner_model.scale_latent_inpaint(
                x=x, sigma=sigma, noise=self.noise, latent_image=self.latent_image) * latent_mask
        out = self.inner_model(x, sigma, model_options=model_options, seed=seed)
        if denoise_mask is not None:
            out = out * denoise_mask + self.latent_image * latent_mask
        return out


class KSAMPLER:
    """Mirrors ``comfy/samplers.py::KSAMPLER``: noise scaling at sigmas[0], the callback wrapper with a fixed
    ``total_steps = len(sigmas) − 1``, ``extra_options`` as keyword arguments, inverse noise scaling."""

    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options
        self.inpaint_options = inpaint_options

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        model_k.noise = noise
        ms = model_wrap.inner_model.model_sampling
        x = ms.noise_scaling(sigmas[0], noise, latent_image)
        total_steps = len(sigmas) - 1
        k_callback = None
        if callback is not None:
            def k_callback(d):
                callback(d["i"], d["denoised"], d["x"], total_steps)
        samples = self.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=k_callback,
                                        disable=disable_pbar, **self.extra_options)
        return ms.inverse_noise_scaling(sigmas[-1], samples)


def calculate_sigmas(model_sampling, scheduler_name, steps):
    """Mirrors ``comfy/samplers.py::calculate_sigmas`` for two schedulers: ``karras`` (ρ = 7) and
    ``simple`` (uniform in σ here); float32, ending in 0."""
    lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    if scheduler_name == "karras":
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        s = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    elif scheduler_name == "simple":
        s = torch.linspace(hi, lo, steps, dtype=torch.float64)
    else:
        raise ValueError(f"fake calculate_sigmas: unknown scheduler {scheduler_name}")
    return torch.cat([s, s.new_zeros(1)]).float()


def make_samplers_module(k_sampling):
    """``comfy.samplers`` with the names ADO uses; ``KSampler.SAMPLERS is SAMPLER_NAMES`` as in 0.3.64."""
    m = types.ModuleType("comfy.samplers")
    names = ["euler", "dpmpp_2m", "dpm_adaptive", "ddim", "uni_pc", "uni_pc_bh2"]

    class KSampler:  # mirrors comfy/samplers.py::KSampler (the lists the KSampler node reads)
        SCHEDULERS = ["simple", "karras"]
        SAMPLERS = names

    def ksampler(sampler_name, extra_options={}, inpaint_options={}):
        """Mirrors ``comfy/samplers.py::ksampler``: ``sample_<name>`` looked up in k-diffusion's module."""
        return KSAMPLER(getattr(k_sampling, "sample_" + sampler_name), extra_options, inpaint_options)

    def sample(model, noise, positive, negative, cfg, device, sampler, sigmas, model_options={}, latent_image=None,
               denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        """Mirrors ``comfy/samplers.py::sample``: a CFGGuider with the conds and cfg runs the sampler."""
        guider = CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return guider.sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    m.KSampler, m.SAMPLER_NAMES, m.KSAMPLER, m.CFGGuider = KSampler, names, KSAMPLER, CFGGuider
    m.KSamplerX0Inpaint, m.calculate_sigmas, m.ksampler, m.sample = KSamplerX0Inpaint, calculate_sigmas, ksampler, sample
    m.sampler_object = ksampler  # comfy/samplers.py::sampler_object (aliases not needed here)
    return m


# --- comfy/k_diffusion/sampling.py -------------------------------------------------------------------------

def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Mirrors ``comfy/k_diffusion/sampling.py::sample_euler`` (s_churn = 0): one call per interval."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


# --- comfy/model_management.py, comfy/utils.py, latent_preview.py, comfy/sample.py ---------------------------

class InterruptProcessingException(Exception):
    """Mirrors ``comfy/model_management.py::InterruptProcessingException``."""


def make_model_management():
    """``comfy.model_management``: ``interrupt_current_processing(value)`` sets the flag that
    ``throw_exception_if_processing_interrupted()`` raises on (and clears), as in ComfyUI."""
    m = types.ModuleType("comfy.model_management")
    m.InterruptProcessingException = InterruptProcessingException
    m.interrupted = False

    def interrupt_current_processing(value=True):
        m.interrupted = value

    def throw_exception_if_processing_interrupted():
        if m.interrupted:
            m.interrupted = False
            raise InterruptProcessingException()

    m.interrupt_current_processing = interrupt_current_processing
    m.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    m.intermediate_device = lambda: torch.device("cpu")
    return m


def make_utils(mm):
    """``comfy.utils``: ``ProgressBar.update_absolute`` clamps to the total and calls the global hook, which
    in ComfyUI (``main.py::hijack_progress``) first checks for an interrupt; every update is recorded."""
    m = types.ModuleType("comfy.utils")
    m.PROGRESS_BAR_ENABLED = True
    m.updates = []  # (value, total, preview)

    class ProgressBar:
        def __init__(self, total):
            self.total, self.current = total, 0

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            value = min(value, self.total)
            self.current = value
            mm.throw_exception_if_processing_interrupted()
            m.updates.append((value, self.total, preview))

    m.ProgressBar = ProgressBar
    return m


def make_latent_preview(utils):
    """``latent_preview.prepare_callback(model, steps, x0_output_dict)``: stores x0, makes a "preview" of
    x0[:1] and updates a ProgressBar to ``step + 1`` of ``total_steps``."""
    m = types.ModuleType("latent_preview")

    def prepare_callback(model, steps, x0_output_dict=None):
        pbar = utils.ProgressBar(steps)

        def callback(step, x0, x, total_steps):
            if x0_output_dict is not None:
                x0_output_dict["x0"] = x0
            pbar.update_absolute(step + 1, total_steps, ("preview", tuple(x0[:1].shape)))
        return callback

    m.prepare_callback = prepare_callback
    return m


def make_sample(samplers):
    """``comfy.sample``: ``prepare_noise`` (one CPU generator seeded with ``seed`` for the whole batch),
    ``fix_empty_latent_channels`` (identity for 4-channel latents) and ``sample_custom``."""
    m = types.ModuleType("comfy.sample")

    def prepare_noise(latent_image, seed, noise_inds=None):
        generator = torch.manual_seed(seed)
        return torch.randn(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                           generator=generator, device="cpu")

    def sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, noise_mask=None,
                      callback=None, disable_pbar=False, seed=None):
        return samplers.sample(model, noise, positive, negative, cfg, model.load_device, sampler, sigmas,
                               model_options=model.model_options, latent_image=latent_image, denoise_mask=noise_mask,
                               callback=callback, disable_pbar=disable_pbar, seed=seed)

    m.prepare_noise, m.sample_custom = prepare_noise, sample_custom
    m.fix_empty_latent_channels = lambda model, latent_image: latent_image
    return m


def make_server():
    """``server.PromptServer.instance.send_sync(event, data, sid)``, recording what was sent, and
    ``comfy_execution.utils.get_executing_context()`` returning (prompt_id, node_id, list_index)."""
    server = types.ModuleType("server")

    class PromptServer:
        instance = None

        def __init__(self):
            self.sent, self.client_id = [], "client-1"

        def send_sync(self, event, data, sid=None):
            self.sent.append((event, data, sid))

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer
    ctx = types.ModuleType("comfy_execution.utils")
    ctx.context = None
    ctx.get_executing_context = lambda: ctx.context
    return server, ctx


class Host:
    """The installed fakes, for tests to inspect (``samplers``, ``k_sampling``, ``mm``, ``utils``, ``server``…)."""


def install(monkeypatch) -> Host:
    """Put the fake ComfyUI modules into ``sys.modules`` for one test; returns them."""
    h = Host()
    h.comfy = types.ModuleType("comfy")
    h.comfy.__path__ = []
    h.k_diffusion = types.ModuleType("comfy.k_diffusion")
    h.k_diffusion.__path__ = []
    h.k_sampling = types.ModuleType("comfy.k_diffusion.sampling")
    h.k_sampling.sample_euler = sample_euler
    h.samplers = make_samplers_module(h.k_sampling)
    h.mm = make_model_management()
    h.utils = make_utils(h.mm)
    h.latent_preview = make_latent_preview(h.utils)
    h.sample = make_sample(h.samplers)
    h.server, h.ctx = make_server()
    h.comfy_execution = types.ModuleType("comfy_execution")
    h.comfy_execution.__path__ = []
    h.comfy.samplers, h.comfy.k_diffusion, h.k_diffusion.sampling = h.samplers, h.k_diffusion, h.k_sampling
    h.comfy.model_management, h.comfy.utils, h.comfy.sample = h.mm, h.utils, h.sample
    h.comfy_execution.utils = h.ctx
    mods = {"comfy": h.comfy, "comfy.k_diffusion": h.k_diffusion, "comfy.k_diffusion.sampling": h.k_sampling,
            "comfy.samplers": h.samplers, "comfy.model_management": h.mm, "comfy.utils": h.utils,
            "comfy.sample": h.sample, "latent_preview": h.latent_preview, "server": h.server,
            "comfy_execution": h.comfy_execution, "comfy_execution.utils": h.ctx}
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return h


def hide_comfyui(monkeypatch):
    """Make ``import comfy…`` fail, as outside ComfyUI (also when a real checkout is on sys.path)."""
    for name in ["comfy", "comfy.samplers", "comfy.k_diffusion", "comfy.k_diffusion.sampling",
                 "comfy.model_management", "comfy.utils", "comfy.sample", "latent_preview", "server",
                 "comfy_execution", "comfy_execution.utils"]:
        monkeypatch.setitem(sys.modules, name, None)


def load_pack(name: str = "ado_pack"):
    """Import the repository root as ComfyUI's ``nodes.py::load_custom_node`` does (``spec_from_file_location``
    on ``__init__.py``, registered in ``sys.modules`` first).  Pair with :func:`unload_pack`."""
    unload_pack(name)
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unload_pack(name: str = "ado_pack"):
    """Remove a pack loaded by :func:`load_pack` (and its submodules) from ``sys.modules``."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def cond(value: float, batch: int = 1):
    """ComfyUI conditioning: a list of ``[tensor(B, tokens, dim), dict]``; the fake model reads its mean."""
    return [[torch.full((batch, 3, 8), float(value)), {}]]
