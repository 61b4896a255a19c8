"""Opt-in check against a real Forge checkout: run by tests/test_forge_optin.py in Forge's own Python.

    FORGE_PYTHON=/path/to/forge-venv/bin/python FORGE_DIR=/path/to/forge python tests/forge_optin_driver.py

Stages, each recorded in the JSON printed as the last line (``{"stages": {name: "ok" | error}, ...}``); a
stage that fails stops the later ones that need it:

1. ``import``: Forge's start-up imports on CPU (``modules.initialize.imports``: gradio, shared options,
   processing, ui) with ``--always-cpu --skip-torch-cuda-test`` and a throw-away ``--data-dir``.
2. ``register``: ``scripts/ado_sampler.py`` loaded as ``modules/scripts.py::load_scripts`` does (extension
   folder on ``sys.path``, ``script_loading.load_module``); "ADO Adaptive" in ``visible_sampler_names()``.
3. ``settings``: ``script_callbacks.ui_settings_callback()``; ADO's options in ``shared.opts`` with infotext keys.
4. ``sample``: a tiny eps model built in code (``backend.modules.k_model.KModel`` over a small torch module,
   a real ``k_prediction.Prediction``, a real ``UnetPatcher``), a real ``StableDiffusionProcessingTxt2Img``,
   and its own ``sample()``: noise from ``rng.ImageRNG``, ``KDiffusionSampler.sample``, the CFG denoiser,
   ``sampling_function``; checks NFE = steps, progress and preview state.
5. ``infotext``: the real ``create_infotext``, ``parse_generation_parameters``, ``infotext_pasted_callback``
   and ``get_override_settings`` on the result.
6. ``flow``: the same with a ``PredictionDiscreteFlow`` model: ADO must detect "flow".
7. ``interrupt``: ``shared.state.interrupted`` set mid-run: the host returns its last latent, no error.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import traceback
import types
from pathlib import Path

ADO_ROOT = Path(__file__).resolve().parents[1]
FORGE_DIR = Path(os.environ["FORGE_DIR"]).resolve()
report: dict = {"stages": {}, "facts": {}}


def stage(name):
    """Run the decorated function as stage ``name``; record "ok" or the error's last lines."""
    def wrap(fn):
        try:
            fn()
            report["stages"][name] = "ok"
            return True
        except BaseException as e:  # noqa: BLE001 — every failure is a finding of this run
            last_lines = "".join(traceback.format_exc().splitlines(True)[-6:])
            report["stages"][name] = f"{type(e).__name__}: {e}\n{last_lines}"
            return False
    return wrap


def done():
    print("\n" + json.dumps(report))
    sys.exit(0)


data_dir = tempfile.mkdtemp(prefix="forge-data-")
sys.argv = ["webui.py", "--always-cpu", "--skip-torch-cuda-test", "--skip-version-check", "--skip-install",
            "--data-dir", data_dir, "--no-download-sd-model"]
os.chdir(FORGE_DIR)
sys.path[:0] = [str(FORGE_DIR)]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


_torchvision_ops = []


def cpu_torchvision_shim() -> None:
    """Let torchvision's pure-Python parts import beside a CPU torch.

    The package registry's torchvision is built for CUDA torch; with the CPU torch its C ops do not load,
    and its import then fails registering fake kernels for ``torchvision::nms``/``qnms`` (the other ops are
    guarded by ``_has_ops()``).  Declaring those two op schemas lets it import; Forge needs only
    ``torchvision.transforms`` at start-up.  A working torchvision is left alone.
    """
    import torch
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_ops.append(lib)            # the definitions live as long as the Library object
    import torchvision  # noqa: F401
    report["facts"]["torchvision_shim"] = True


@stage("import")
def _import():
    cpu_torchvision_shim()
    from modules import initialize
    initialize.imports()


if report["stages"]["import"] != "ok":
    done()

import torch  # noqa: E402
from modules import infotext_utils, processing, script_callbacks, script_loading, sd_samplers, shared  # noqa: E402

LABEL = "ADO Adaptive"


@stage("register")
def _register():
    sd_samplers.set_samplers()
    sys.path.insert(0, str(ADO_ROOT))              # load_scripts puts the extension folder first
    try:
        report["facts"]["module"] = script_loading.load_module(str(ADO_ROOT / "scripts" / "ado_sampler.py")).__name__
    finally:
        sys.path.remove(str(ADO_ROOT))
    names = sd_samplers.visible_sampler_names()
    assert LABEL in names, names
    assert sd_samplers.samplers_map["ado"] == LABEL
    assert sd_samplers.get_sampler_and_scheduler(LABEL, "Automatic")[0] == LABEL
    report["facts"]["samplers"] = len(names)


if report["stages"]["register"] != "ok":
    done()


@stage("settings")
def _settings():
    script_callbacks.ui_settings_callback()
    for key, infotext in [("ado_mode", "ADO mode"), ("ado_rtol", "ADO tolerance"), ("ado_schedule", "ADO schedule")]:
        assert shared.opts.data_labels[key].infotext == infotext, key


class TinyEps(torch.nn.Module):
    """A small fixed network predicting ε from the scaled input, the timestep and the text context."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.3)
        self.storage_dtype = self.computation_dtype = torch.float32
        self.load_device = self.offload_device = self.initial_device = torch.device("cpu")
        self.calls = 0

    def forward(self, x, t, context=None, control=None, transformer_options=None, **kwargs):
        self.calls += 1
        c = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.w, x)
        return torch.tanh(h + c) * 0.5 + 0.05 * (t.reshape(-1, 1, 1, 1) / 1000)


def tiny_sd_model(predictor):
    """The loaded checkpoint as Forge's sampler and processing read it, around a real KModel/UnetPatcher."""
    from backend.diffusion_engine.base import ForgeObjects
    from backend.modules.k_model import KModel
    from backend.patcher.unet import UnetPatcher
    net = TinyEps()
    kmodel = KModel(net, diffusers_scheduler=None, k_predictor=predictor)
    unet = UnetPatcher(kmodel, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    objects = ForgeObjects(unet, None, None, None)
    model = types.SimpleNamespace(forge_objects=objects, forge_objects_after_applying_lora=objects.shallow_copy(),
                                  is_inpaint=False, is_sdxl=False, is_sd3=False, use_distilled_cfg_scale=False,
                                  sd_model_hash="0", sd_checkpoint_info=None)
    return model, net


def conds(batch):
    """Cond/uncond in the host's structures (prompt_parser): one prompt, one schedule, 77×8 context."""
    from modules import prompt_parser as pp
    ctx = torch.full((77, 8), 0.3)
    multicond = pp.MulticondLearnedConditioning(shape=(batch,), batch=[
        [pp.ComposableScheduledPromptConditioning([pp.ScheduledPromptConditioning(1000, ctx)])] for _ in range(batch)])
    uncond = [[pp.ScheduledPromptConditioning(1000, torch.zeros(77, 8))] for _ in range(batch)]
    return multicond, uncond


def run(predictor, steps=6, batch=2, on_call=None, cfg_scale=5.0):
    """One txt2img batch through StableDiffusionProcessingTxt2Img.sample; returns (p, samples, net)."""
    from modules import rng
    model, net = tiny_sd_model(predictor)
    shared.sd_model = model
    if on_call is not None:
        original = net.forward
        net.forward = lambda *a, **k: (on_call(net), original(*a, **k))[1]
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a tiny model", negative_prompt="", steps=steps,
                                                    cfg_scale=cfg_scale, width=64, height=64, batch_size=batch,
                                                    sampler_name=LABEL, scheduler="Automatic", seed=7,
                                                    do_not_save_samples=True, do_not_save_grid=True)
    p.setup_prompts()
    p.fill_fields_from_opts()                       # as process_images_inner does
    p.sd_model_name, p.sd_model_hash = "tiny", "0"
    p.all_seeds = [7 + i for i in range(batch)]
    p.all_subseeds = [100 + i for i in range(batch)]
    p.seeds, p.subseeds = p.all_seeds, p.all_subseeds
    p.prompts, p.negative_prompts = p.all_prompts, p.all_negative_prompts
    p.iteration = 0
    p.rng = rng.ImageRNG((4, 8, 8), p.seeds, subseeds=p.subseeds, subseed_strength=0.0)
    shared.state.interrupted = False
    c, uc = conds(batch)
    with torch.inference_mode():                    # as process_images does around process_images_inner
        samples = p.sample(c, uc, p.seeds, p.subseeds, 0.0, p.prompts)
    return p, samples, net


if report["stages"]["settings"] == "ok":
    shared.opts.ado_mode = "budget"

holder = {}


@stage("sample")
def _sample():
    from backend.modules.k_prediction import Prediction
    p, samples, net = run(Prediction(prediction_type="epsilon"), steps=6)
    holder["p"] = p
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
    assert p.sampler.ado_trace.nfe == 6, p.sampler.ado_trace.nfe
    assert p.sampler.ado_trace.model_type == "ve"
    assert shared.state.sampling_steps == 6 and shared.state.sampling_step == 5
    assert shared.state.current_latent is not None
    report["facts"]["unet_calls"] = net.calls
    report["facts"]["sigma_max"] = p.sampler.ado_trace.planned_sigmas[0]
    # the CFG scale Forge hands its denoiser (extra_args["cond_scale"], 5 here) sets the heuristic's order: 2 above 2
    assert p.sampler.ado_trace.options["max_order"] == 2, p.sampler.ado_trace.options
    report["facts"]["max_order_cfg5"] = p.sampler.ado_trace.options["max_order"]
    assert p.sampler.ado_trace.options["second_order_max_step"] == 1.0, p.sampler.ado_trace.options
    report["facts"]["second_order_max_step_cfg5"] = p.sampler.ado_trace.options["second_order_max_step"]


@stage("infotext")
def _infotext():
    p = holder["p"]
    shared.opts.data["sd_model_checkpoint"] = "tiny.safetensors"   # the selected checkpoint, as after a load
    texts = [processing.create_infotext(p, p.prompts, p.seeds, p.subseeds, index=i) for i in range(2)]
    report["facts"]["infotext"] = texts[0].splitlines()[-1]
    params = [infotext_utils.parse_generation_parameters(t) for t in texts]
    trace = p.sampler.ado_trace
    for b, par in enumerate(params):
        assert par["Sampler"] == LABEL and par["ADO mode"] == "budget", par
        assert par["ADO NFE"] == str(len(trace.samples[b]))
        from adaptive_core.hosts_common import schedule_hash
        assert par["ADO schedule hash"] == schedule_hash(trace.sigmas_taken(b))
    shared.opts.ado_mode = "tolerance"              # the user changed the setting since; pasting restores it
    script_callbacks.infotext_pasted_callback(texts[0], params[0])
    overrides = {k: v for _, k, v in infotext_utils.get_override_settings(params[0])}
    assert overrides.get("ado_mode") == "budget", overrides
    shared.opts.ado_mode = "budget"
    unknown = infotext_utils.parse_generation_parameters(texts[0].replace(f"Sampler: {LABEL}", "Sampler: Mystery"))
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        script_callbacks.infotext_pasted_callback(texts[0], unknown)
    assert "'Mystery'" in console.getvalue(), console.getvalue()     # reported, not silent
    report["facts"]["unknown_sampler_becomes"] = sd_samplers.get_sampler_from_infotext(unknown)


@stage("flow")
def _flow():
    from backend.modules.k_prediction import PredictionDiscreteFlow
    p, samples, _ = run(PredictionDiscreteFlow(shift=3.0), steps=5)
    report["facts"]["flow_sigmas"] = [round(s, 4) for s in p.sampler.ado_trace.planned_sigmas]
    report["facts"]["flow_nfe"] = p.sampler.ado_trace.nfe
    assert p.sampler.ado_trace.model_type == "flow"
    assert abs(p.sampler.ado_trace.planned_sigmas[0] - 1.0) < 1e-3, p.sampler.ado_trace.planned_sigmas[:2]
    # Forge's flow grid ends in a repeated 0 (σ(t=0) = 0, then append_zero): still 5 calls, progress full
    assert torch.isfinite(samples).all() and p.sampler.ado_trace.nfe == 5
    assert shared.state.sampling_steps == 5 and shared.state.sampling_step == 4


@stage("policy_auto")
def _policy_auto():
    """The "ADO: step controller" setting at policy:auto: the domain adapter reads the CFG scale Forge hands its
    CFG denoiser (extra_args["cond_scale"]) and runs the bundled policy for the run (flow at CFG 5 and 1, ve at CFG
    7); the trace names it."""
    from backend.modules.k_prediction import Prediction, PredictionDiscreteFlow

    from adaptive_core.domain import JobDomain, select_policy
    shared.opts.ado_controller = "policy:auto"
    try:
        # flow (SD3-style, shift 3) guided and unguided; ve (SD 1.5-style epsilon prediction) at CFG 7, its users' scale
        # (at budgets inside the guided policies' scopes: 10 and 8 calls)
        for prediction, model_type, cfg, steps, fact in (
                (PredictionDiscreteFlow(shift=3.0), "flow", 5.0, 10, "policy_auto_cfg5"),
                (PredictionDiscreteFlow(shift=3.0), "flow", 1.0, 6, "policy_auto_cfg1"),
                (Prediction(prediction_type="epsilon"), "ve", 7.0, 8, "policy_auto_ve_cfg7")):
            guidance = "unguided" if cfg == 1.0 else "guided"
            p, samples, _ = run(prediction, steps=steps, cfg_scale=cfg)
            trace = p.sampler.ado_trace
            prefix = f"domain adapter: {model_type}, {guidance} (CFG {cfg:g})"
            (note,) = [n for n in trace.notes if n.startswith(prefix)]
            shift = float(note.split("shift ")[1].split(",")[0]) if model_type == "flow" else None
            want = select_policy(JobDomain(model_type, guidance, cfg, shift, nfe_budget=steps))
            assert torch.isfinite(samples).all() and trace.nfe <= steps
            assert trace.options["controller"] == ("heuristic" if want is None else f"policy:{want}"), trace.options
            assert model_type == "flow" or want is not None     # guided ve at CFG 7 has a bundled policy
            report["facts"][fact] = trace.options["controller"] + ("" if shift is None else f" (shift {shift:g})")
    finally:
        shared.opts.ado_controller = "heuristic"


@stage("interrupt")
def _interrupt():
    from backend.modules.k_prediction import Prediction

    def stop(net):
        if net.calls == 3:
            shared.state.interrupted = True
    p, samples, net = run(Prediction(prediction_type="epsilon"), steps=8, on_call=stop)
    assert net.calls == 4 and torch.equal(samples, p.sampler.last_latent)   # stopped at the next call
    report["facts"]["interrupt_unet_calls"] = net.calls
    shared.state.interrupted = False


done()
