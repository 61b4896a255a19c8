"""ADO's ComfyUI node pack against fakes of ComfyUI's documented contracts (tests/comfy_fakes.py).

Covers: import without ComfyUI, dropdown registration (idempotent, tolerant of moved internals), the
KSampler-dropdown path, the three nodes, progress / cancel / preview behaviour, flow detection, denoise < 1,
inpainting masks, batch invariance, the NFE cap, the trace chart and replay, and the example workflows.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import math

import pytest
import torch

import comfy_fakes as fakes

REPO = Path(__file__).resolve().parents[1]
ADO_NODES = {"ADOAdaptiveSampler", "ADOAdaptiveKSampler", "ADOTraceToSigmas"}


@pytest.fixture
def host(monkeypatch):
    """Fake ComfyUI modules in sys.modules, and the pack loaded on top of them."""
    h = fakes.install(monkeypatch)
    h.pack = fakes.load_pack()
    yield h
    fakes.unload_pack()


def latent(batch=2, seed=3, size=6):
    """A LATENT dict as ComfyUI passes it (``{"samples": tensor[B, 4, H, W]}``)."""
    return {"samples": torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))}


def run_ksampler(h, kind="eps", steps=8, batch=2, denoise=1.0, mode="budget", lat=None, cfg=3.0):
    """ADO Adaptive KSampler on a fake model; returns (model, ui, latent_out, trace)."""
    model = fakes.ModelPatcher(kind)
    node = h.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveKSampler"]()
    lat = latent(batch) if lat is None else lat
    res = node.sample(model, 7, steps, cfg, "karras", fakes.cond(1.0), fakes.cond(-1.0), lat, denoise, mode, 0.05)
    out, trace = res["result"]
    return model, res["ui"], out, trace


# --- loading and registration -------------------------------------------------------------------------------

def test_pack_imports_without_comfyui_and_says_why_the_dropdown_is_missing(monkeypatch, caplog):
    fakes.hide_comfyui(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ADO"):
        pack = fakes.load_pack()
    try:
        assert set(pack.NODE_CLASS_MAPPINGS) == ADO_NODES
        assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == ADO_NODES
        assert (REPO / pack.WEB_DIRECTORY).is_dir()
        assert "not added to the KSampler dropdown" in caplog.text
        # nodes declare their inputs without ComfyUI (the scheduler list falls back)
        for cls in pack.NODE_CLASS_MAPPINGS.values():
            assert "required" in cls.INPUT_TYPES()
    finally:
        fakes.unload_pack()


def test_import_stays_light(monkeypatch):
    import sys
    fakes.hide_comfyui(monkeypatch)
    before = set(sys.modules)
    fakes.load_pack()
    fakes.unload_pack()
    new = {m.split(".")[0] for m in set(sys.modules) - before}
    assert not new & {"onnxruntime", "stable_baselines3", "gymnasium", "optuna", "diffusers", "matplotlib", "scipy"}


def test_dropdown_registration_is_idempotent(host):
    names = host.samplers.KSampler.SAMPLERS
    assert names is host.samplers.SAMPLER_NAMES
    assert names.index("ado_adaptive") == names.index("uni_pc_bh2") + 1
    assert host.k_sampling.sample_ado_adaptive is host.pack.nodes.sample_ado
    fakes.load_pack()  # a second import (ComfyUI reload, two copies) adds nothing
    assert names.count("ado_adaptive") == 1


def test_dropdown_registration_survives_moved_internals(monkeypatch, caplog):
    h = fakes.install(monkeypatch)
    del h.samplers.KSampler.SAMPLERS  # as if ComfyUI renamed it
    with caplog.at_level(logging.WARNING, logger="ADO"):
        pack = fakes.load_pack()
    try:
        assert "could not add 'ado_adaptive' to the KSampler dropdown" in caplog.text
        assert set(pack.NODE_CLASS_MAPPINGS) == ADO_NODES
    finally:
        fakes.unload_pack()


# --- the KSampler dropdown path ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_ksampler_dropdown_path(host, kind):
    """nodes.py::common_ksampler → comfy.samplers.sampler_object("ado_adaptive") → KSAMPLER.sample."""
    model = fakes.ModelPatcher(kind)
    steps = 7
    sigmas = host.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps)
    lat = latent()
    noise = host.sample.prepare_noise(lat["samples"], 1)
    cb = host.latent_preview.prepare_callback(model, steps)
    out = host.sample.sample_custom(model, noise, 3.0, host.samplers.sampler_object("ado_adaptive"), sigmas,
                                    fakes.cond(1.0), fakes.cond(-1.0), lat["samples"], callback=cb, seed=1)
    assert torch.isfinite(out).all() and out.shape == lat["samples"].shape
    assert model.calls <= steps
    values = [u[0] for u in host.utils.updates]
    assert values == list(range(1, model.calls + 1)) and values[-1] == steps  # every call, ends at 100 %
    assert all(u[2] is not None for u in host.utils.updates)  # a preview with every update
    assert not host.server.PromptServer.instance.sent  # no executing node (not inside a server run): no message


def test_trace_is_sent_to_the_sampling_node(host):
    import types
    host.ctx.context = types.SimpleNamespace(prompt_id="p1", node_id="12", list_index=None)
    model = fakes.ModelPatcher("eps")
    sigmas = host.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 5)
    lat = latent(1)
    host.sample.sample_custom(model, torch.randn_like(lat["samples"]), 2.0, host.samplers.sampler_object("ado_adaptive"),
                              sigmas, fakes.cond(1.0), fakes.cond(0.0), lat["samples"], seed=0)
    event, data, sid = host.server.PromptServer.instance.sent[-1]
    assert (event, data["node"], data["prompt_id"], sid) == ("ado.trace", "12", "p1", "client-1")
    assert data["trace"]["nfe"] == 5 and data["trace"]["nfe_budget"] == 5
    assert json.loads(data["trace_json"])["nfe"] == 5
    json.dumps(data)  # the websocket message is JSON


# --- ADO Adaptive Sampler (SamplerCustom / SamplerCustomAdvanced) ---------------------------------------------

def _custom(host, sampler, kind="eps", steps=10, batch=2, callback=True, model=None, noise=None, lat=None, cfg=3.0):
    model = fakes.ModelPatcher(kind) if model is None else model
    sigmas = host.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps)
    lat = latent(batch) if lat is None else lat
    noise = host.sample.prepare_noise(lat["samples"], 5) if noise is None else noise
    cb = host.latent_preview.prepare_callback(model, steps) if callback else None
    out = host.sample.sample_custom(model, noise, cfg, sampler, sigmas, fakes.cond(1.0), fakes.cond(-1.0),
                                    lat["samples"], callback=cb, seed=5)
    return model, out


@pytest.mark.parametrize("budget", [3, 10, 17])
def test_sampler_node_budget_and_progress(host, budget):
    """A budget other than the sigmas' steps: the bar still moves on every call and ends full."""
    node = host.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]()
    (sampler,) = node.get_sampler(nfe_budget=budget, mode="budget")
    model, out = _custom(host, sampler, steps=10)
    assert model.calls <= budget and torch.isfinite(out).all()
    values = [u[0] for u in host.utils.updates]
    assert len(values) == model.calls and values == sorted(values) and values[-1] == 10


@pytest.mark.parametrize("mode", ["budget", "tolerance", "fixed"])
def test_sampler_node_modes_respect_the_cap(host, mode):
    (sampler,) = host.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(0, mode, 0.01, 0.001)
    model, out = _custom(host, sampler, kind="flow", steps=9)
    assert model.calls <= 9 and torch.isfinite(out).all()


def test_a_single_sigma_returns_the_input(host):
    """SplitSigmas can hand a sampler one σ; k-diffusion samplers then return x without a model call."""
    x = torch.randn(1, 4, 6, 6)
    model = fakes.ModelPatcher("eps")
    assert host.pack.nodes.sample_ado(model, x, torch.tensor([1.5])) is x and model.calls == 0


@pytest.mark.parametrize("widget,cfg,expected", [(0, 7.0, 2), (0, 2.0, 3), (3, 7.0, 3), (1, 7.0, 1)])
def test_sampler_node_max_order_widget(host, widget, cfg, expected):
    """max_order 0 (the widget's default) is "auto": the guider's CFG scale decides (order 2 above CFG 2); a saved
    workflow's 1–3 is used as given."""
    trace = host.pack.nodes.comfy_sampler.Trace()
    (sampler,) = host.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(nfe_budget=8, max_order=widget)
    assert ("max_order" in sampler.extra_options) == (widget != 0)
    sampler.extra_options["trace"] = trace
    _custom(host, sampler, steps=8, cfg=cfg)
    assert trace.options["max_order"] == expected


def test_sampler_node_rejects_bad_widgets(host):
    node = host.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]()
    with pytest.raises(ValueError, match="nfe_budget"):
        node.get_sampler(nfe_budget=-1)
    (sampler,) = node.get_sampler(mode="nope")
    with pytest.raises(ValueError, match="unknown mode"):
        _custom(host, sampler)


@pytest.mark.parametrize("kind,expected", [("eps", "ve"), ("v", "ve"), ("flow", "flow")])
def test_model_type_is_detected_from_model_sampling(host, kind, expected):
    trace = host.pack.nodes.comfy_sampler.Trace()
    sampler = host.samplers.KSAMPLER(host.pack.nodes.sample_ado, extra_options={"trace": trace, "model_type": "auto"})
    _custom(host, sampler, kind=kind, steps=6)
    assert trace.model_type == expected


@pytest.mark.parametrize("schedule,shift,expected", [("discrete_flow", 2.5, 2.5), ("discrete_flow", 1.0, 1.0),
                                                     ("flux", 1.15, math.exp(1.15))])
def test_flow_shift_is_read_from_model_sampling(host, schedule, shift, expected):
    """An unguided few-step flow run plans in the model's own shifted time: ComfyUI's σ at half the schedule
    (``percent_to_sigma(0.5)``) gives the shift for SD3-style (time_snr_shift) and Flux (flux_time_shift) models;
    the guider's CFG scale says whether the run is guided (a guided run keeps the ρ plan in data prediction)."""
    model = fakes.ModelPatcher("flow")
    cls = fakes.ModelSamplingFlux if schedule == "flux" else fakes.ModelSamplingDiscreteFlow

    class Sampling(cls, fakes.CONST):
        pass
    model.model.model_sampling = Sampling()
    model.model.model_sampling.shift = shift
    trace = host.pack.nodes.comfy_sampler.Trace()
    sampler = host.samplers.KSAMPLER(host.pack.nodes.sample_ado, extra_options={"trace": trace, "model_type": "auto"})
    _custom(host, sampler, kind="flow", steps=6, model=model, cfg=1.0)
    assert trace.model_type == "flow"
    assert trace.options["flow_shift"] == pytest.approx(expected)
    assert trace.options["prediction"] == "hybrid"
    _custom(host, sampler, kind="flow", steps=6, model=model, cfg=3.0)
    assert (trace.options["flow_shift"], trace.options["prediction"]) == (None, "data")


def test_policy_auto_follows_the_guiders_cfg(host):
    """The node's ``policy:auto``: the domain adapter reads the guidance from ComfyUI's guider (``CFGGuider.cfg``,
    mirrored by the fake) and runs the policy it picks, or the heuristic where no bundled policy covers the run;
    each run's trace names the choice.  The budget holds either way."""
    import types

    from adaptive_core.domain import job_domain, select_policy
    node = host.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]()
    assert "policy:auto" in node.INPUT_TYPES()["optional"]["controller"][0]
    for cfg in (1.0, 3.0):
        trace = host.pack.nodes.comfy_sampler.Trace()
        (sampler,) = node.get_sampler(nfe_budget=6, mode="budget", controller="policy:auto")
        sampler.extra_options["trace"] = trace
        model, out = _custom(host, sampler, kind="flow", steps=6, cfg=cfg)
        guidance = "unguided" if cfg == 1.0 else "guided"
        (note,) = [n for n in trace.notes if n.startswith(f"domain adapter: flow, {guidance} (CFG {cfg:g}), shift ")]
        shift = float(note.split("shift ")[1].split(",")[0])
        chosen = select_policy(job_domain(types.SimpleNamespace(cfg_scale=cfg, shift=shift), "flow", nfe_budget=6))
        assert trace.options["controller"] == ("heuristic" if chosen is None else f"policy:{chosen}")
        assert model.calls <= 6 and torch.isfinite(out).all()


def test_cancel_stops_within_one_model_call(host):
    """ComfyUI's Cancel sets a flag that the progress hook checks; ADO also checks it before every call."""
    (sampler,) = host.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler()
    model = fakes.ModelPatcher("eps")
    net = model.model.diffusion_model
    orig = net.forward

    def forward(x, sigma, mu):  # the user presses Cancel during the third call
        if net.calls == 3:
            host.mm.interrupt_current_processing(True)
        return orig(x, sigma, mu)
    net.forward = forward
    for callback in (True, False):  # also when the host passed no progress callback
        net.calls = 0
        with pytest.raises(fakes.InterruptProcessingException):
            _custom(host, sampler, model=model, steps=12, callback=callback)
        assert net.calls == 3


def test_batch_results_do_not_depend_on_batch_size(host):
    (sampler,) = host.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(mode="tolerance", rtol=0.02)
    lat = latent(3)
    noise = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(9))
    noise[1] *= 3.0  # a sample that behaves differently
    _, together = _custom(host, sampler, lat=lat, noise=noise, callback=False)
    for b in range(3):
        _, alone = _custom(host, sampler, lat={"samples": lat["samples"][b:b + 1]}, noise=noise[b:b + 1],
                           callback=False)
        torch.testing.assert_close(alone[0], together[b], rtol=1e-5, atol=1e-5)


# --- ADO Adaptive KSampler --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_ksampler_node_returns_latent_trace_and_chart(host, kind):
    model, ui, out, trace = run_ksampler(host, kind, steps=8)
    assert out["samples"].shape == (2, 4, 6, 6) and torch.isfinite(out["samples"]).all()
    assert trace.nfe == model.calls <= 8 and trace.model_type == ("flow" if kind == "flow" else "ve")
    (chart,) = ui["ado_trace"]
    json.dumps(chart)
    assert trace.from_json(ui["ado_trace_json"][0]).sigmas_taken(1) == trace.sigmas_taken(1)
    assert chart["nfe"] == trace.nfe and chart["nfe_budget"] == 8 and chart["batch"] == 2
    assert len(chart["planned"]) == 9 and chart["planned"][-1] == 0.0
    assert chart["taken"][-1] == 0.0 and len(chart["calls"]) == len(trace.samples[0])
    assert any(c["error"] is not None for c in chart["calls"])
    assert [u[0] for u in host.utils.updates][-1] == 8
    assert not host.server.PromptServer.instance.sent  # the chart goes with the node's output instead


def test_ksampler_node_denoise_below_one(host):
    lat = latent(1)
    model, ui, out, trace = run_ksampler(host, steps=10, denoise=0.5, lat=lat)
    full = host.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 20)
    assert trace.planned_sigmas == pytest.approx(full[-11:].double().tolist())
    assert trace.nfe <= 10 and trace.samples[0][0].sigma == pytest.approx(trace.planned_sigmas[0], rel=1e-6)
    # the exact probability-flow ODE path from the re-noised latent at σ_s to σ_min, then D there (data
    # N(μ, v) with μ after CFG), as every sampler ending in 0 returns
    sigma_s, sigma_min = float(full[-11]), float(full[-2])
    noise = host.sample.prepare_noise(lat["samples"], 7)
    mu, v = -1.0 + 3.0 * (1.0 - -1.0), model.model.diffusion_model.v
    x_min = mu + torch.sqrt((v + sigma_min ** 2) / (v + sigma_s ** 2)) * (lat["samples"] + sigma_s * noise - mu)
    exact = mu + v / (v + sigma_min ** 2) * (x_min - mu)
    err = float((out["samples"] - exact).pow(2).mean().sqrt())
    assert err < 0.01 * float(exact.std())  # 10 NFE; the error falls with NFE (0.2 % at 16)
    _, _, out0, trace0 = run_ksampler(host, steps=6, denoise=0.0, lat=lat)
    assert torch.equal(out0["samples"], lat["samples"]) and trace0.nfe == 0


def test_ksampler_node_keeps_the_unmasked_region(host):
    lat = latent(1)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1.0  # repaint the left half only
    lat["noise_mask"] = mask
    model, ui, out, trace = run_ksampler(host, steps=8, lat=lat)
    keep = mask.expand_as(lat["samples"]) == 0
    torch.testing.assert_close(out["samples"][keep], lat["samples"][keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["samples"][~keep], lat["samples"][~keep])


# --- ADO Trace to Sigmas -------------------------------------------------------------------------------------

def test_trace_to_sigmas_replays_the_run(host):
    lat = latent(1)
    model, ui, out, trace = run_ksampler(host, steps=8, batch=1, lat=lat, cfg=1.0)
    node = host.pack.NODE_CLASS_MAPPINGS["ADOTraceToSigmas"]()
    (sigmas,) = node.get_sigmas(0, trace)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    (from_json,) = node.get_sigmas(0, None, trace.to_json())
    assert torch.equal(sigmas, from_json)
    # ADO in fixed mode on the replayed grid evaluates the model at the same noise levels
    (fixed,) = host.pack.NODE_CLASS_MAPPINGS["ADOAdaptiveSampler"]().get_sampler(mode="fixed")
    replay_trace = host.pack.nodes.comfy_sampler.Trace()
    fixed.extra_options["trace"] = replay_trace
    noise = host.sample.prepare_noise(lat["samples"], 7)
    model2 = fakes.ModelPatcher("eps")
    replayed = host.sample.sample_custom(model2, noise, 1.0, fixed, sigmas, fakes.cond(1.0), fakes.cond(-1.0),
                                         lat["samples"], seed=7)
    torch.testing.assert_close(replayed, out["samples"], rtol=1e-4, atol=1e-4)  # the same image
    taken = [r.sigma for r in replay_trace.samples[0]]
    assert taken == pytest.approx(sigmas[:-1].double().tolist(), rel=1e-6)
    assert model2.calls == len(sigmas) - 1 == sum(r.accepted for r in trace.samples[0])


def test_trace_to_sigmas_rejects_bad_input(host):
    node = host.pack.NODE_CLASS_MAPPINGS["ADOTraceToSigmas"]()
    with pytest.raises(ValueError, match="connect a trace"):
        node.get_sigmas(0, None, "  ")
    with pytest.raises(ValueError, match="not an ADO trace"):
        node.get_sigmas(0, None, "{not json")
    _, _, _, trace = run_ksampler(host, steps=4, batch=2)
    with pytest.raises(ValueError, match="outside the traced batch"):
        node.get_sigmas(2, trace)


# --- helpers --------------------------------------------------------------------------------------------------

def test_progress_index_is_monotone_and_ends_full(host):
    f = host.pack.nodes.comfy_sampler.host_progress_index
    for budget in range(1, 25):
        for total in range(1, 25):
            idx = [f(i, budget, total) for i in range(budget)]
            assert idx == sorted(idx) and idx[-1] == total - 1 and min(idx) >= 0
            if budget <= total:
                assert len(set(idx)) == budget  # the bar moves on every call
    with pytest.raises(ValueError):
        f(0, 0, 5)


def test_chart_payload_rejects_empty_trace(host):
    view = host.pack.nodes.trace_view
    with pytest.raises(ValueError, match="empty"):
        view.chart_payload(view.Trace())


# --- widgets stay where saved workflows expect them -----------------------------------------------------------

#: Widget order of each node as saved in workflows (append new widgets at the end, optional).
FROZEN_INPUTS = {
    "ADOAdaptiveSampler": ["nfe_budget", "mode", "rtol", "atol", "schedule", "max_order", "model_type"],
    "ADOAdaptiveKSampler": ["model", "seed", "steps", "cfg", "scheduler", "positive", "negative", "latent_image",
                            "denoise", "mode", "rtol"],
    "ADOTraceToSigmas": ["sample", "trace", "trace_json"],
}


def test_node_inputs_keep_their_saved_order(host):
    for node_id, names in FROZEN_INPUTS.items():
        spec = host.pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        declared = list(spec["required"]) + list(spec.get("optional", {}))
        assert declared[:len(names)] == names, node_id
        assert all(n in spec.get("optional", {}) for n in declared[len(names):]), "new inputs must be optional"


# --- web extension and example workflows ---------------------------------------------------------------------

def test_web_extension_is_self_contained():
    js = list((REPO / "web").glob("**/*.js"))
    assert js
    for f in js:
        text = f.read_text()
        assert not re.search(r"""(import|from)\s*\(?\s*["']https?:""", text), f"{f} downloads code"
        assert "<script" not in text


#: ComfyUI core node types the example workflows may use, with their widget counts in saved workflows
#: (nodes.py / comfy_extras/nodes_custom_sampler.py, 0.3.64; seeds add a control_after_generate value).
CORE_WIDGETS = {"CheckpointLoaderSimple": 1, "CLIPTextEncode": 1, "EmptyLatentImage": 3, "VAEDecode": 0,
                "SaveImage": 1, "PreviewImage": 0, "KSampler": 7, "SamplerCustomAdvanced": 0, "RandomNoise": 2,
                "CFGGuider": 1, "BasicScheduler": 3, "SamplerCustom": 4, "KSamplerSelect": 1}
ADO_WIDGETS = {"ADOAdaptiveSampler": 8, "ADOAdaptiveKSampler": 8, "ADOTraceToSigmas": 2}
_WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def saved_widget_count(node_cls) -> int:
    """Values a saved workflow holds for a node: one per widget input, required and optional (combos are lists),
    plus one per ``control_after_generate`` (the frontend's rule, web ``widgetInputs``)."""
    types = node_cls.INPUT_TYPES()
    count = 0
    for spec in (*types.get("required", {}).values(), *types.get("optional", {}).values()):
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list) or kind in _WIDGET_TYPES:
            count += 1 + bool(opts.get("control_after_generate"))
    return count


def test_ado_widget_counts_follow_the_node_declarations(host):
    assert {name: saved_widget_count(cls) for name, cls in host.pack.NODE_CLASS_MAPPINGS.items()} == ADO_WIDGETS


@pytest.mark.parametrize("path", sorted((REPO / "example_workflows").glob("*.json")), ids=lambda p: p.name)
def test_example_workflows_are_consistent(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert max(nodes) <= wf["last_node_id"]
    for n in wf["nodes"]:
        assert n["type"] in CORE_WIDGETS or n["type"] in ADO_WIDGETS, f"unknown node {n['type']}"
        widgets = {**CORE_WIDGETS, **ADO_WIDGETS}[n["type"]]
        assert len(n.get("widgets_values", [])) == widgets, f"{n['type']} widgets_values"
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert link_id <= wf["last_link_id"]
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == inp["type"] == typ or "*" in (out["type"], inp["type"])
    assert any(n["type"] in ADO_WIDGETS or "ado_adaptive" in n["widgets_values"] for n in wf["nodes"])


def test_chart_payload_carries_the_quality_curve(host):
    view = host.pack.nodes.trace_view
    from adaptive_core.testbeds import make_testbed
    tb = make_testbed("gaussian", "ve")
    sigmas = torch.tensor([tb.sigma_max, 3.0, 1.0, 0.3, 0.1, tb.sigma_min, 0.0], dtype=torch.float64)
    trace = view.Trace()
    from adaptive_core import sample_adaptive
    sample_adaptive(tb, tb.noise([0]), sigmas, model_type="ve", monitor=False, quality_target=1e-9, trace=trace)
    chart = view.chart_payload(trace)
    json.dumps(chart)
    assert chart["quality_target"] == 1e-9
    assert all("remaining_error" in c and "reference_error" in c for c in chart["calls"])
    assert any(c["remaining_error"] is not None for c in chart["calls"])
    plain = view.Trace()
    sample_adaptive(tb, tb.noise([0]), sigmas, model_type="ve", trace=plain)
    assert view.chart_payload(plain)["quality_target"] is None
