"""Opt-in: ADO's node pack inside the real ComfyUI (``COMFYUI_DIR``), on the CPU, with a tiny model built
in code (tests/comfyui_test_pack/tiny_model.py) for the EPS, V_PREDICTION and FLOW model types.

KSampler with ``sampler_name="ado_adaptive"`` (ComfyUI's ``nodes.py::common_ksampler``), SamplerCustom
with the ADO Adaptive Sampler node, the ADO Adaptive KSampler (denoise < 1, inpainting mask), replay,
interruption and batch invariance.  Checks NFE ≤ steps, finite output, a filled trace, a progress update
(with a preview) on every model call ending at 100 %, and Cancel within one model call.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

import comfy_fakes as fakes
import comfyui_host

KINDS = ["eps", "v", "flow"]
PACK = "ado_pack_real"


@pytest.fixture(scope="module")
def real():
    """The real ComfyUI modules, ADO loaded as a custom node on top, and the tiny-model builder."""
    path = comfyui_host.comfyui_dir()
    if path is None:
        pytest.skip(comfyui_host.SKIP_REASON)
    try:
        comfy = comfyui_host.import_comfy(path)
    except Exception as e:  # a Python without ComfyUI's requirements
        pytest.skip(f"ComfyUI at {path} does not import with {sys.executable}: {e!r}")
    import comfy_extras.nodes_custom_sampler as custom_sampler
    import latent_preview
    import nodes as comfy_nodes
    from comfy.cli_args import LatentPreviewMethod, args
    from comfyui_test_pack import tiny_model
    args.preview_method = LatentPreviewMethod.Latent2RGB  # previews on, as in the UI with "latent2rgb"
    ns = types.SimpleNamespace(comfy=comfy, nodes=comfy_nodes, cs=custom_sampler, latent_preview=latent_preview,
                               build=tiny_model.build, pack=fakes.load_pack(PACK), commit=comfyui_host.commit(path))
    print(f"\nComfyUI under test: {path} at {ns.commit}")
    yield ns
    fakes.unload_pack(PACK)


@pytest.fixture
def progress(real):
    """Every ProgressBar update as the server's hook sees it: (value, total, has_preview)."""
    seen = []
    real.comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: seen.append((value, total, preview is not None)))
    yield seen
    real.comfy.utils.set_progress_bar_global_hook(None)


@pytest.fixture
def sent(real, monkeypatch):
    """Messages the sampler sends to the browser, with ComfyUI's real executing-node context set."""
    from comfy_execution.utils import CurrentNodeContext
    box = []

    class Instance:
        client_id = "test"

        def send_sync(self, event, data, sid=None):
            box.append((event, data))
    if "server" not in sys.modules:  # the real server.py is not imported in-process
        monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
            instance=Instance())))
    with CurrentNodeContext("prompt-1", "7"):
        yield box


def conds():
    return [[torch.full((1, 3, 16), 1.0), {}]], [[torch.full((1, 3, 16), -1.0), {}]]


def forwards(model):
    return model.model.diffusion_model.forwards


def check_progress(progress, calls, total):
    values = [v for v, _, _ in progress]
    assert len(values) == calls, "one progress update per model call"
    assert values == sorted(values) and values[-1] == total and progress[-1][1] == total
    assert all(p for _, _, p in progress), "a latent preview with every update"


def test_dropdown_lists_ado(real):
    assert "ado_adaptive" in real.comfy.samplers.KSampler.SAMPLERS
    for node in (real.nodes.KSampler, real.nodes.KSamplerAdvanced, real.cs.KSamplerSelect):
        assert "ado_adaptive" in node.INPUT_TYPES()["required"]["sampler_name"][0]
    assert real.comfy.samplers.KSampler.SAMPLERS.count("ado_adaptive") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_ksampler_with_ado_in_the_dropdown(real, progress, sent, kind):
    model = real.build(kind)
    pos, neg = conds()
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    (out,) = real.nodes.common_ksampler(model, 3, 8, 4.0, "ado_adaptive", "karras", pos, neg, latent)
    x = out["samples"]
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    assert 1 <= forwards(model) <= 8
    check_progress(progress, forwards(model), 8)
    (event, data), = sent
    assert event == "ado.trace" and data["node"] == "7" and data["prompt_id"] == "prompt-1"
    chart = data["trace"]
    assert chart["nfe"] == forwards(model) and chart["nfe_budget"] == 8 and chart["batch"] == 2
    assert chart["model_type"] == ("flow" if kind == "flow" else "ve")
    assert chart["calls"] and chart["taken"][-1] == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["budget", "tolerance"])
def test_sampler_custom_with_the_ado_node(real, progress, kind, mode):
    model = real.build(kind)
    pos, neg = conds()
    (sampler,) = real.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(0, mode, 0.05)
    trace = real.pack.nodes.comfy_sampler.Trace()
    sampler.extra_options["trace"] = trace
    (sigmas,) = real.cs.BasicScheduler().get_sigmas(model, "karras", 9, 1.0)
    out, denoised = real.cs.SamplerCustom().sample(model, True, 11, 3.0, pos, neg, sampler, sigmas,
                                                   {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.isfinite(out["samples"]).all() and torch.isfinite(denoised["samples"]).all()
    assert forwards(model) == trace.nfe <= 9
    assert trace.model_type == ("flow" if kind == "flow" else "ve")
    if kind == "flow":   # CFG 3 read from the real guider: the guided run keeps the ρ plan in data prediction
        assert (trace.options["flow_shift"], trace.options["prediction"]) == (None, "data")
    assert len(trace.samples[0]) == trace.nfe and trace.samples[0][0].sigma == pytest.approx(float(sigmas[0]))
    check_progress(progress, trace.nfe, 9)


def test_unguided_flow_run_plans_in_the_models_shifted_time(real):
    """CFG 1 through the real CFGGuider and the shift through the real model_sampling (tiny model: shift 1):
    a few-step run takes the shifted-time plan with hybrid prediction."""
    model = real.build("flow")
    pos, neg = conds()
    (sampler,) = real.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(0, "budget", 0.05)
    trace = real.pack.nodes.comfy_sampler.Trace()
    sampler.extra_options["trace"] = trace
    (sigmas,) = real.cs.BasicScheduler().get_sigmas(model, "simple", 8, 1.0)
    out, _ = real.cs.SamplerCustom().sample(model, True, 11, 1.0, pos, neg, sampler, sigmas,
                                            {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.isfinite(out["samples"]).all() and trace.nfe == 8
    shift = float(model.get_model_object("model_sampling").shift)
    assert trace.options["flow_shift"] == pytest.approx(shift) and trace.options["prediction"] == "hybrid"


def run_policy_auto(real, kind, cfg, scheduler, steps, controller="policy:auto"):
    """One SamplerCustom run of the ADO node under ``controller`` ("policy:auto" by default) on a real model of
    ``kind`` at CFG ``cfg`` with ``steps`` steps of the real ``scheduler``; checks the output and the budget, returns
    (model, trace)."""
    model = real.build(kind)
    pos, neg = conds()
    (sampler,) = real.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(0, "budget", 0.05,
                                                                                    controller=controller)
    trace = real.pack.nodes.comfy_sampler.Trace()
    sampler.extra_options["trace"] = trace
    (sigmas,) = real.cs.BasicScheduler().get_sigmas(model, scheduler, steps, 1.0)
    out, _ = real.cs.SamplerCustom().sample(model, True, 11, cfg, pos, neg, sampler, sigmas,
                                            {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.isfinite(out["samples"]).all() and forwards(model) == trace.nfe <= steps
    return model, trace


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_policy_auto_reads_the_real_guiders_cfg(real, cfg):
    """The node's controller "policy:auto": the domain adapter reads CFG from the real CFGGuider and runs the
    bundled policy for the run (unguided flow: the one whose scope is flow/unguided), within the budget."""
    from adaptive_core.domain import JobDomain, select_policy
    model, trace = run_policy_auto(real, "flow", cfg, "simple", 8)
    guidance = "unguided" if cfg == 1.0 else "guided"
    shift = float(model.get_model_object("model_sampling").shift)       # read from the real model_sampling
    want = select_policy(JobDomain("flow", guidance, cfg, shift, nfe_budget=8))
    assert trace.options["controller"] == ("heuristic" if want is None else f"policy:{want}")
    assert any(n.startswith(f"domain adapter: flow, {guidance} (CFG {cfg:g}), shift {shift:g}") for n in trace.notes)


def test_policy_auto_on_a_guided_ve_run_at_cfg_7(real):
    """An SD 1.5-style run (epsilon prediction: ve to ADO) at CFG 7 under "policy:auto": the real CFGGuider's scale
    takes it to the bundled policy whose scope covers guided ve runs there (docs/policy/README.md, section 10)."""
    from adaptive_core.domain import JobDomain, select_policy
    _, trace = run_policy_auto(real, "eps", 7.0, "karras", 8)
    want = select_policy(JobDomain("ve", "guided", 7.0, nfe_budget=8))
    assert want is not None and trace.options["controller"] == f"policy:{want}"
    assert any(n.startswith("domain adapter: ve, guided (CFG 7)") for n in trace.notes)


@pytest.mark.parametrize("cfg,order,limit", [(7.0, 2, 1.0), (2.0, 3, None), (1.0, 3, None)])
def test_the_real_guiders_cfg_sets_the_predictor_order(real, cfg, order, limit):
    """The heuristic's ``max_order="auto"`` (the node's widget 0) reads the real CFGGuider's scale: order 2 above
    CFG 2 (adaptive_core.sampler.resolve_max_order), else 3; and above CFG 2 order 1 on steps longer than 1 in λ
    (resolve_second_order_max_step)."""
    _, trace = run_policy_auto(real, "eps", cfg, "karras", 8, controller="heuristic")
    assert trace.options["max_order"] == order and trace.options["second_order_max_step"] == limit


@pytest.mark.parametrize("kind", KINDS)
def test_ado_ksampler_denoise_and_inpainting_mask(real, kind):
    model = real.build(kind)
    pos, neg = conds()
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1.0  # repaint the right half
    node = real.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveKSampler"]()
    res = node.sample(model, 5, 6, 3.0, "karras", pos, neg, {"samples": image, "noise_mask": mask}, 0.6)
    out, trace = res["result"]
    x = out["samples"]
    assert torch.isfinite(x).all() and forwards(model) == trace.nfe <= 6
    full = real.comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 10)
    assert trace.planned_sigmas == pytest.approx(full[-7:].double().tolist(), rel=1e-6)
    keep = (mask == 0).expand_as(x)
    torch.testing.assert_close(x[keep], image[keep], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(x[~keep], image[~keep], atol=1e-3)
    (chart,) = res["ui"]["ado_trace"]
    assert chart["nfe"] == trace.nfe and chart["nfe_budget"] == 6


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_interrupts_within_one_model_call(real, kind):
    mm = real.comfy.model_management
    model = real.build(kind)
    pos, neg = conds()
    updates = []

    def hook(value, total, preview, node_id=None):  # the user presses Cancel after the third call
        updates.append(value)
        if len(updates) == 3:
            mm.interrupt_current_processing(True)
    real.comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            real.nodes.common_ksampler(model, 0, 12, 3.0, "ado_adaptive", "karras", pos, neg,
                                       {"samples": torch.zeros(1, 4, 8, 8)})
    finally:
        real.comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert forwards(model) == 3


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_batch_results_do_not_depend_on_batch_size(real, kind):
    model = real.build(kind)
    pos, neg = conds()
    (sampler,) = real.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(0, "tolerance", 0.02)
    (sigmas,) = real.cs.BasicScheduler().get_sigmas(model, "karras", 10, 1.0)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    noise[2] *= 0.3
    latent = torch.zeros(3, 4, 8, 8)
    together = real.comfy.sample.sample_custom(model, noise, 3.0, sampler, sigmas, pos, neg, latent, seed=1)
    for b in range(3):
        alone = real.comfy.sample.sample_custom(model, noise[b:b + 1], 3.0, sampler, sigmas, pos, neg,
                                                latent[b:b + 1], seed=1)
        torch.testing.assert_close(alone[0], together[b], rtol=1e-4, atol=1e-4)


def test_trace_to_sigmas_replays_in_sampler_custom(real):
    model = real.build("eps")
    pos, neg = conds()
    ksampler = real.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveKSampler"]()
    original, trace = ksampler.sample(model, 2, 7, 3.0, "karras", pos, neg,
                                      {"samples": torch.zeros(1, 4, 8, 8)})["result"]
    (sigmas,) = real.pack.NODE_CLASS_MAPPINGS["ADOTraceToSigmas"]().get_sigmas(0, trace)
    (fixed,) = real.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(mode="fixed")
    replay = real.pack.nodes.comfy_sampler.Trace()
    fixed.extra_options["trace"] = replay
    model2 = real.build("eps")
    out, _ = real.cs.SamplerCustom().sample(model2, True, 2, 3.0, pos, neg, fixed, sigmas,
                                            {"samples": torch.zeros(1, 4, 8, 8)})
    torch.testing.assert_close(out["samples"], original["samples"], rtol=1e-4, atol=1e-4)  # the same image
    assert forwards(model2) == len(sigmas) - 1 == sum(r.accepted for r in trace.samples[0])
    assert [r.sigma for r in replay.samples[0]] == pytest.approx(sigmas[:-1].double().tolist(), rel=1e-6)
    # euler on the replayed grid (any sampler) takes the same noise levels
    euler = real.comfy.samplers.sampler_object("euler")
    model3 = real.build("eps")
    real.comfy.sample.sample_custom(model3, torch.randn(1, 4, 8, 8), 3.0, euler, sigmas, pos, neg,
                                    torch.zeros(1, 4, 8, 8), seed=0)
    assert forwards(model3) == len(sigmas) - 1


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_ksampler_advanced_two_stages(real, progress, kind):
    """KSamplerAdvanced: steps 0–5 with leftover noise (a plan ending above 0), then 5–10 without new noise."""
    model = real.build(kind)
    pos, neg = conds()
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (mid,) = real.nodes.common_ksampler(model, 9, 10, 3.0, "ado_adaptive", "karras", pos, neg, latent,
                                        start_step=0, last_step=5, force_full_denoise=False)
    first = forwards(model)
    (end,) = real.nodes.common_ksampler(model, 9, 10, 3.0, "ado_adaptive", "karras", pos, neg, mid,
                                        disable_noise=True, start_step=5, last_step=10000)
    assert torch.isfinite(mid["samples"]).all() and torch.isfinite(end["samples"]).all()
    assert 1 <= first <= 5 and 1 <= forwards(model) - first <= 5
    check_progress(progress[:first], first, 5)  # stage one's bar ends full at its own 5 steps
