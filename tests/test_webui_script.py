"""scripts/ado_sampler.py against fakes of the A1111 1.9/1.10 and Forge host modules (tests/webui_fakes.py):
registration in the Sampling method dropdown, Settings-tab options, steps = NFE budget, CFG, progress,
preview, interrupt, img2img, flow models, infotext written and pasted back."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import webui_fakes
from adaptive_core import Trace, sample_adaptive
from adaptive_core import hosts_common as hc

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ado_sampler.py"
FLAVOURS = ["a1111", "forge"]


def load_script(host):
    """Import the script file as modules/script_loading.py::load_module does (spec from its path)."""
    spec = importlib.util.spec_from_file_location("ado_sampler", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=FLAVOURS)
def host(request, monkeypatch):
    h = webui_fakes.install(monkeypatch, request.param)
    h.flavour = request.param
    h.script = load_script(h)
    return h


def generate(host, **kw):
    """One job through the fake process_images with ADO selected; returns (p, latents, infotexts)."""
    p = host.processing.Processing(sampler_name=hc.SAMPLER_LABEL, **kw)
    latents, infotexts = host.processing.process_images(p)
    return p, latents, infotexts


def direct_run(host, p, seed, model_type="ve", **options):
    """What the host run should equal: sample_adaptive on the same CFG denoiser, σ grid and noise."""
    den = host.shared.sd_model.denoiser
    wrap = webui_fakes.DiscreteSchedule(host.shared.sd_model, host.flavour)
    sigmas = wrap.get_sigmas(p.steps)
    noise = torch.randn(webui_fakes.SHAPE, generator=torch.Generator().manual_seed(seed))[None]
    x = noise * sigmas[0]

    def cfg_model(x, sigma, cond, uncond, cond_scale, **_):
        u = den(x, sigma, uncond)
        return u + (den(x, sigma, cond) - u) * cond_scale
    trace = Trace()
    extra = {"cond": torch.ones(1), "uncond": torch.zeros(1), "cond_scale": p.cfg_scale}
    out = sample_adaptive(cfg_model, x, sigmas, extra, nfe_budget=p.steps, model_type=model_type, trace=trace,
                          **options)
    return out, trace


def test_registered_in_sampling_method_dropdown(host):
    samplers = host.sd_samplers
    assert hc.SAMPLER_LABEL in samplers.visible_sampler_names()
    assert samplers.samplers_map["ado"] == hc.SAMPLER_LABEL
    assert samplers.all_samplers_map[hc.SAMPLER_LABEL].constructor is not None
    if host.flavour == "forge":
        assert samplers.add_sampler_calls == 1   # Forge's own registration path
    else:
        assert not hasattr(samplers, "add_sampler")
    load_script(host)                             # Reload UI imports the script again: still one entry
    assert samplers.visible_sampler_names().count(hc.SAMPLER_LABEL) == 1
    assert isinstance(samplers.create_sampler(hc.SAMPLER_LABEL, host.shared.sd_model),
                      host.sd_samplers_kdiffusion.KDiffusionSampler)


def test_settings_tab_options_carry_infotext_keys(host):
    host.script_callbacks.ui_settings_callback()
    labels = host.shared.opts.data_labels
    for o in hc.HOST_OPTIONS:
        info = labels[o.key]
        assert info.infotext == o.infotext and info.default == o.default
        assert info.section == ("ado", "ADO Adaptive")
        assert info.component is (host.gradio.Radio if o.choices else host.gradio.Slider)


def test_steps_are_the_nfe_budget_with_progress_preview_and_cfg(host):
    p, latents, infotexts = generate(host, steps=8, cfg_scale=4.0, seed=11)
    cfg = p.sampler.model_wrap_cfg
    assert len(cfg.calls) == 8                                     # budget mode spends exactly the steps
    assert all(scale == 4.0 for _, scale in cfg.calls)            # CFG reaches the host's denoiser
    state = host.shared.state
    assert state.sampling_steps == 8 and state.steps_seen == list(range(8))   # progress bar ends full
    assert host.shared.total_tqdm.ticks == 8
    assert state.current_latent is not None                       # live preview fed every call
    expected, _ = direct_run(host, p, seed=11)
    assert torch.equal(latents, expected)
    assert p.sampler.ado_trace.options["max_order"] == 2   # extra_args["cond_scale"] 4 > 2: the guided order
    p1, other, _ = generate(host, steps=8, cfg_scale=1.0, seed=11)
    assert not torch.allclose(other, latents)
    assert p1.sampler.ado_trace.options["max_order"] == 3


def test_infotext_per_image_and_paste_restores_options(host):
    host.script_callbacks.ui_settings_callback()
    host.shared.opts.ado_mode, host.shared.opts.ado_rtol = "tolerance", 0.1
    p, _, infotexts = generate(host, steps=10, batch_size=2, n_iter=2, seed=5)
    assert len(infotexts) == 4
    for i, text in enumerate(infotexts):
        params = host.infotext_utils.parse_generation_parameters(text)
        assert params["Sampler"] == hc.SAMPLER_LABEL and params["Steps"] == "10"
        assert params["ADO mode"] == "tolerance" and params["ADO tolerance"] == "0.1"
        assert params["ADO version"] == hc.__version__
        _, trace = direct_run(host, p, seed=5 + i, mode="tolerance", rtol=0.1)
        assert params["ADO NFE"] == str(len(trace.samples[0]))
        assert params["ADO schedule hash"] == hc.schedule_hash(trace.sigmas_taken(0))
    # the host's other convention (Processed.infotext: whole-job lists, global index) names the same image
    again = host.processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, iteration=1,
                                            position_in_batch=0)
    assert again == infotexts[2]

    host.shared.opts.ado_mode, host.shared.opts.ado_rtol = "budget", 0.05   # user's settings changed since
    params, sampler, overrides = host.infotext_utils.paste(infotexts[1])
    assert sampler == hc.SAMPLER_LABEL
    assert overrides == {"ado_mode": "tolerance", "ado_rtol": 0.1}
    p2, _, again = generate(host, steps=10, batch_size=2, n_iter=2, seed=5, override_settings=overrides)
    assert again == infotexts
    assert host.shared.opts.ado_mode == "budget"                  # overrides last for that job only


def test_pasted_unknown_sampler_is_reported_and_aliases_restored(host):
    text = "a cat\nSteps: 8, Sampler: Foo Sampler, CFG scale: 5, Seed: 1, Size: 48x48"
    params, sampler, _ = host.infotext_utils.paste(text)
    assert sampler == "Euler"                                     # the host's silent fallback...
    assert any("Foo Sampler" in w for w in host.gradio.warnings)  # ...is no longer silent
    host.gradio.warnings.clear()
    _, sampler, _ = host.infotext_utils.paste(text.replace("Foo Sampler", "ado"))
    assert sampler == hc.SAMPLER_LABEL and not host.gradio.warnings
    _, sampler, _ = host.infotext_utils.paste(text.replace("Foo Sampler", "Euler Karras"))
    assert sampler == "Euler" and not host.gradio.warnings        # legacy suffix: known sampler


def test_interrupt_returns_last_latent_without_error(host):
    def interrupt_after_third_step(den):   # cond + uncond: two model calls per step
        if den.calls == 2 * 3:
            host.shared.state.interrupted = True
    host.shared.sd_model.denoiser.on_call = interrupt_after_third_step
    p, latents, _ = generate(host, steps=8, seed=3)
    assert len(p.sampler.model_wrap_cfg.calls) == 3
    assert torch.equal(latents, p.sampler.last_latent)


def test_img2img_budget_is_the_truncated_schedule(host):
    init = torch.zeros(1, *webui_fakes.SHAPE)
    p, latents, infotexts = generate(host, steps=10, denoising_strength=0.5, init_latent=init, seed=2)
    assert host.shared.state.sampling_steps == 6                   # t_enc + 1 = 5 + 1
    assert len(p.sampler.model_wrap_cfg.calls) == 6
    assert torch.isfinite(latents).all()
    params = host.infotext_utils.parse_generation_parameters(infotexts[0])
    assert params["ADO NFE"] == "6"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_flow_model_detected_and_sampled_as_flow(monkeypatch, flavour):
    host = webui_fakes.install(monkeypatch, flavour, model_type="flow")
    host.flavour = flavour
    load_script(host)
    p, latents, _ = generate(host, steps=6, seed=4)
    assert p.sampler.ado_trace.model_type == "flow"
    # the grid ends in a repeated 0 (σ(t = 0) = 0, then the appended 0): still 6 calls, progress ends full
    grid = webui_fakes.DiscreteSchedule(host.shared.sd_model, flavour).get_sigmas(6)
    assert grid[-1] == grid[-2] == 0 and len(grid) == 7
    assert len(p.sampler.model_wrap_cfg.calls) == 6 and host.shared.state.steps_seen[-1] == 5
    expected, _ = direct_run(host, p, seed=4, model_type="flow")
    assert torch.equal(latents, expected)
    # the CFG scale reaches the core in extra_args["cond_scale"]: a guided run keeps the ρ plan in data prediction,
    # an unguided one (Flux in Forge runs at CFG 1) plans in shifted time with hybrid prediction
    assert (p.sampler.ado_trace.options["flow_shift"], p.sampler.ado_trace.options["prediction"]) == (None, "data")
    p, _, _ = generate(host, steps=6, seed=4, cfg_scale=1.0)
    assert p.sampler.ado_trace.options["prediction"] == "hybrid" and p.sampler.ado_trace.options["flow_shift"] > 0


def test_bad_setting_fails_with_its_name(host):
    host.shared.opts.ado_mode = "fastest"
    with pytest.raises(ValueError, match="ado_mode"):
        generate(host, steps=4)


def test_model_output_with_autograd_state_is_sampled_without_grad(host):
    # k-diffusion samplers run under torch.no_grad(); a host model whose output carries autograd state
    # (parameters outside inference mode) must not break ADO
    host.shared.sd_model.denoiser.mean.requires_grad_(True)
    _, latents, _ = generate(host, steps=4, seed=1)
    assert torch.isfinite(latents).all() and not latents.requires_grad
