"""The domain adapter (adaptive_core.domain): a job's domain, policy scopes, the choice, and
``controller="policy:auto"`` in the sampler."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from adaptive_core import sample_adaptive
from adaptive_core.bench.run import host_sigmas
from adaptive_core.domain import (
    JobDomain,
    bundled_scopes,
    check_scope,
    guidance_kind,
    job_domain,
    policy_scope,
    scope_of_trained_on,
    select_policy,
)
from adaptive_core.policy import (
    POLICY_DIR,
    PolicyLoadError,
    bundled_policies,
    load_policy,
)
from adaptive_core.testbeds import make_testbed
from adaptive_core.trace import Trace


def test_job_domain_reads_the_guidance_the_heuristic_reads():
    tb = make_testbed("gaussian", "flow")
    assert job_domain(tb, "flow") == JobDomain("flow", "unguided", 1.0, tb.shift)
    assert job_domain(make_testbed("gmm_digits@shift=1.5", "flow"), "flow").flow_shift == 1.5
    assert job_domain(make_testbed("gaussian", "ve"), "ve").flow_shift is None
    assert job_domain(make_testbed("mnist_unet", "ve", cfg_scale=2.0), "ve").guidance == "guided"
    comfy_guider = SimpleNamespace(inner_model=SimpleNamespace(cfg=1.0))      # comfy/samplers.py::CFGGuider.cfg
    assert job_domain(comfy_guider, "flow").guidance == "unguided"
    a1111 = job_domain(object(), "ve", {"cond_scale": 7.0})                   # A1111/Forge extra_args
    assert (a1111.guidance, a1111.guidance_scale) == ("guided", 7.0)
    unknown = job_domain(object(), "flow")       # no CFG, no shift declared: guided, and the heuristic's shift 3
    assert unknown.guidance == "guided" and unknown.guidance_scale is None and "CFG unknown" in unknown.describe()
    assert unknown.flow_shift == 3.0 and unknown.describe().endswith("shift 3")
    assert guidance_kind(1.0) == "unguided" and guidance_kind(1.5) == "guided" and guidance_kind(None) == "guided"
    with pytest.raises(ValueError, match="model_type"):
        job_domain(object(), "eps")


def test_scopes_are_checked_and_derived_from_training():
    assert check_scope({"model_types": ["ve", "flow", "ve"], "guidance": ["unguided"]}) == \
        {"model_types": ["flow", "ve"], "guidance": ["unguided"]}
    for bad in ({"model_types": ["flow"]}, {"model_types": [], "guidance": ["guided"]},
                {"model_types": ["eps"], "guidance": ["guided"]}, {"model_types": ["ve"], "guidance": "guided"},
                {"model_types": ["flow"], "guidance": ["guided"], "flow_shifts": [4, 3]},
                {"model_types": ["flow"], "guidance": ["guided"], "flow_shifts": [0, float("inf")]},
                {"model_types": ["ve"], "guidance": ["guided"], "guidance_scales": [7, 2]},
                {"model_types": ["ve"], "guidance": ["guided"], "guidance_scales": [2]},
                {"model_types": ["flow"], "guidance": ["guided"], "cfg": [1, 2]}, ["ve"]):
        with pytest.raises(ValueError, match="applies_to"):
            check_scope(bad)
    flow_cfg1 = {"model_types": ["flow"], "configurations": ["gaussian-flow", "mnist_unet-flow-cfg1", "photo_unet-flow"]}
    assert scope_of_trained_on(flow_cfg1) == {"model_types": ["flow"], "guidance": ["unguided"]}
    both = {"model_types": ["flow", "ve"], "configurations": ["gmm_digits-ve", "mnist_unet-flow-cfg2"]}
    assert scope_of_trained_on(both)["guidance"] == ["guided", "unguided"]
    # the guided configurations' CFG scales bound the guided runs a trained policy covers
    assert scope_of_trained_on(both)["guidance_scales"] == [2.0, 2.0]
    guided = {"model_types": ["ve"], "configurations": ["mnist_unet-ve-cfg1.5", "mnist_unet-ve-cfg4", "x-ve-cfg1"]}
    assert scope_of_trained_on(guided)["guidance_scales"] == [1.5, 4.0]
    # and the training budgets bound the budgets it covers
    assert scope_of_trained_on({**guided, "budgets": [8, 5, 10, 6]})["nfe_budgets"] == [5.0, 10.0]
    # a manifest without applies_to covers its trained model types under any guidance
    assert policy_scope({"trained_on": {"model_types": ["ve"]}}) == {"model_types": ["ve"],
                                                                     "guidance": ["guided", "unguided"]}
    with pytest.raises(ValueError, match="neither"):
        policy_scope({"trained_on": {}}, "x.json")


def test_the_narrowest_covering_scope_wins():
    scopes = {"wide": {"model_types": ["flow", "ve"], "guidance": ["guided", "unguided"]},
              "flow_free": {"model_types": ["flow"], "guidance": ["unguided"]},
              "also_wide": {"model_types": ["flow", "ve"], "guidance": ["guided", "unguided"]}}
    assert select_policy(JobDomain("flow", "unguided"), scopes) == "flow_free"
    assert select_policy(JobDomain("flow", "guided"), scopes) == "also_wide"     # a tie: the first name
    assert select_policy(JobDomain("ve", "guided"), {"flow_free": scopes["flow_free"]}) is None
    # a flow run outside a policy's shift range goes to the next covering policy
    ranged = {**scopes, "flow_free": {**scopes["flow_free"], "flow_shifts": [3.0, 4.0]}}
    assert select_policy(JobDomain("flow", "unguided", 1.0, 3.5), ranged) == "flow_free"
    assert select_policy(JobDomain("flow", "unguided", 1.0, 1.0), ranged) == "also_wide"
    assert select_policy(JobDomain("flow", "unguided", 1.0, 6.0), {"flow_free": ranged["flow_free"]}) is None
    # a guided run outside a policy's CFG range (or of unknown scale) goes to the next covering policy
    by_scale = {"cfg_low": {"model_types": ["ve"], "guidance": ["guided"], "guidance_scales": [1.5, 2.0]},
                "any_ve": {"model_types": ["ve"], "guidance": ["guided", "unguided"]}}
    assert select_policy(JobDomain("ve", "guided", 2.0), by_scale) == "cfg_low"
    assert select_policy(JobDomain("ve", "guided", 7.0), by_scale) == "any_ve"
    assert select_policy(JobDomain("ve", "guided", None), by_scale) == "any_ve"
    assert select_policy(JobDomain("ve", "guided", 7.0), {"cfg_low": by_scale["cfg_low"]}) is None
    unguided_too = {"p": {"model_types": ["ve"], "guidance": ["guided", "unguided"], "guidance_scales": [2.0, 2.0]}}
    assert select_policy(JobDomain("ve", "unguided", 1.0), unguided_too) == "p"    # the range bounds guided runs only
    for name, scope in bundled_scopes().items():       # every bundled manifest has a usable scope
        assert name in bundled_policies() and scope["model_types"]


def _policy_folder(tmp_path, monkeypatch, scopes):
    """A policies/ folder of copies of the first bundled policy under other names and scopes."""
    source = POLICY_DIR / f"{bundled_policies()[0]}.json"
    manifest = json.loads(source.read_text())
    for name, scope in scopes.items():
        shutil.copy(POLICY_DIR / manifest["onnx_file"], tmp_path / f"{name}.onnx")
        (tmp_path / f"{name}.json").write_text(json.dumps({**manifest, "onnx_file": f"{name}.onnx",
                                                          "training_state": {}, "applies_to": scope}))
    monkeypatch.setattr("adaptive_core.policy.POLICY_DIR", tmp_path)


def test_policy_auto_runs_the_chosen_policy_and_says_so(tmp_path, monkeypatch):
    _policy_folder(tmp_path, monkeypatch, {"for_ve": {"model_types": ["ve"], "guidance": ["guided", "unguided"]},
                                           "for_flow": {"model_types": ["flow"], "guidance": ["unguided"]}})
    tb = make_testbed("gaussian", "flow")
    x, sigmas = tb.noise(range(3)), host_sigmas(tb, 8)
    trace = Trace()
    auto = sample_adaptive(tb, x, sigmas, model_type="flow", controller="policy:auto", trace=trace)
    named = sample_adaptive(tb, x, sigmas, model_type="flow", controller="policy:for_flow")
    assert torch.equal(auto, named)
    assert trace.options["controller"] == "policy:for_flow"
    assert any(f"domain adapter: flow, unguided (CFG 1), shift {tb.shift:g}, 8 calls -> policy:for_flow" in n
               for n in trace.notes)


def test_a_budget_range_bounds_a_policy_to_the_budgets_it_was_measured_at(tmp_path, monkeypatch):
    """A scope's ``nfe_budgets`` holds the runs whose budget lies in it (an unknown budget is outside): the sampler
    passes the run's budget, ``nfe_budget`` or else the sigmas' step count, and outside the range the wider policy
    (or the heuristic) takes the run."""
    _policy_folder(tmp_path, monkeypatch, {"few": {"model_types": ["ve"], "guidance": ["unguided"],
                                                   "nfe_budgets": [5, 8]},
                                           "wide": {"model_types": ["ve", "flow"], "guidance": ["unguided"]}})
    assert select_policy(JobDomain("ve", "unguided", 1.0, nfe_budget=5)) == "few"
    assert select_policy(JobDomain("ve", "unguided", 1.0, nfe_budget=8)) == "few"
    for outside in (4, 10, None):
        assert select_policy(JobDomain("ve", "unguided", 1.0, nfe_budget=outside)) == "wide"
    tb = make_testbed("gaussian", "ve")
    x = tb.noise(range(2))
    for budget, sigmas_steps, want in ((6, 20, "few"), (None, 8, "few"), (None, 12, "wide"), (12, 6, "wide")):
        trace = Trace()
        sample_adaptive(tb, x, host_sigmas(tb, sigmas_steps), nfe_budget=budget, model_type="ve",
                        controller="policy:auto", trace=trace)
        assert trace.options["controller"] == f"policy:{want}", (budget, sigmas_steps)
        calls = budget or sigmas_steps
        assert any(n.startswith(f"domain adapter: ve, unguided (CFG 1), {calls} calls -> policy:{want}")
                   for n in trace.notes)
    with pytest.raises(ValueError, match="nfe_budgets"):
        check_scope({"model_types": ["ve"], "guidance": ["guided"], "nfe_budgets": [8, 5]})


def test_policy_auto_without_a_covering_policy_is_the_heuristic(tmp_path, monkeypatch):
    _policy_folder(tmp_path, monkeypatch, {"for_flow": {"model_types": ["flow"], "guidance": ["unguided"]}})
    tb = make_testbed("gaussian", "ve")
    x, sigmas = tb.noise(range(2)), host_sigmas(tb, 6)
    trace = Trace()
    auto = sample_adaptive(tb, x, sigmas, model_type="ve", controller="policy:auto", trace=trace)
    assert torch.equal(auto, sample_adaptive(tb, x, sigmas, model_type="ve"))
    assert trace.options["controller"] == "heuristic"
    assert "domain adapter: ve, unguided (CFG 1), 6 calls -> heuristic (no bundled policy covers it)" in trace.notes


def test_a_malformed_scope_is_refused(tmp_path, monkeypatch):
    _policy_folder(tmp_path, monkeypatch, {"bad": {"model_types": ["sd"], "guidance": ["unguided"]}})
    with pytest.raises(PolicyLoadError, match="model_types"):
        load_policy("policy:bad")
    with pytest.raises(PolicyLoadError, match="bad.json"):
        bundled_scopes()


def test_an_edited_manifest_is_read_again(tmp_path, monkeypatch):
    """The scopes are cached per file (policy:auto runs once per sampling call), but an edited manifest counts."""
    _policy_folder(tmp_path, monkeypatch, {"p": {"model_types": ["flow"], "guidance": ["unguided"]}})
    assert bundled_scopes()["p"]["model_types"] == ["flow"]
    manifest = json.loads((tmp_path / "p.json").read_text())
    manifest["applies_to"] = {"model_types": ["ve"], "guidance": ["unguided"]}
    (tmp_path / "p.json").write_text(json.dumps(manifest, indent=1))     # another size: the cached scope is stale
    assert bundled_scopes()["p"]["model_types"] == ["ve"]
    (tmp_path / "p.json").write_text("{")
    with pytest.raises(PolicyLoadError, match="p.json"):
        bundled_scopes()


def test_the_bundled_policies_cover_every_domain_within_budget():
    """Every (model type, guidance) gets a bundled policy under ``policy:auto`` at the budgets the policies were
    trained at (5–10 calls), and none outside them (there they lost to the heuristic, up to 4.9×:
    docs/policy/validation_auto_15_20.json); unguided and guided flow (at shift 3) get one made for each (the
    narrowest scope), and a run keeps the NFE cap."""
    for model_type in ("ve", "flow"):
        for guidance, scale in (("unguided", 1.0), ("guided", 2.0)):
            name = select_policy(JobDomain(model_type, guidance, scale, nfe_budget=8))
            assert name is not None and model_type in bundled_scopes()[name]["model_types"]
            for outside in (4, 11, 20, None):
                assert select_policy(JobDomain(model_type, guidance, scale, nfe_budget=outside)) is None
    for name, scope in bundled_scopes().items():   # every bundled policy names the budgets it covers
        assert 5 <= scope["nfe_budgets"][0] <= scope["nfe_budgets"][1] <= 10, name
    made_for = bundled_scopes()[select_policy(JobDomain("flow", "unguided", 1.0, 3.0, nfe_budget=8))]
    assert (made_for["model_types"], made_for["guidance"]) == (["flow"], ["unguided"])
    guided = bundled_scopes()[select_policy(JobDomain("flow", "guided", 2.0, 3.0, nfe_budget=8))]
    assert (guided["model_types"], guided["guidance"]) == (["flow"], ["guided"])   # guided flow runs at CFG 2
    assert guided["guidance_scales"][0] <= 2.0 <= guided["guidance_scales"][1]
    # guided runs at CFG 3-7 (the scales of SD 1.5 and SDXL): policies trained on the heuristic's plan there (order
    # 2, order 1 on long steps) at 5-6 calls, ve and flow; the ve one of the order-2 plan at 8; the heuristic at 10,
    # and on flow at 8, where no policy beat it (docs/policy/README.md, sections 12 and 13)
    for model_type, shift, budgets in (("ve", None, (5, 6, 8)), ("flow", 3.0, (5, 6))):
        for scale in (3.0, 5.0, 7.0):
            for budget in budgets:
                name = select_policy(JobDomain(model_type, "guided", scale, shift, nfe_budget=budget))
                scope = bundled_scopes()[name]
                assert (scope["model_types"], scope["guidance"]) == ([model_type], ["guided"]), (name, budget)
                assert scope["guidance_scales"][0] <= scale <= scope["guidance_scales"][1]
                assert scope["nfe_budgets"][0] <= budget <= scope["nfe_budgets"][1]
                if budget <= 6:     # the ones trained on the plan with order-1 long steps run on it
                    assert load_policy(name).base_options["second_order_max_step"] == 1.0, name
            for budget in sorted({4, 8, 10, 20} - set(budgets)):
                assert select_policy(JobDomain(model_type, "guided", scale, shift, nfe_budget=budget)) is None
    low = select_policy(JobDomain("ve", "guided", 2.0, nfe_budget=8))   # where the wider policy measured better
    assert low is not None and set(bundled_scopes()[low]["guidance"]) == {"unguided", "guided"}
    assert select_policy(JobDomain("ve", "guided", 12.0, nfe_budget=8)) is None   # beyond every measured scale
    if "flow_shifts" in made_for:      # outside its measured shifts, a wider policy (or the heuristic) takes the run
        lo = made_for["flow_shifts"][0]
        assert select_policy(JobDomain("flow", "unguided", 1.0, lo / 2, 8)) != \
            select_policy(JobDomain("flow", "unguided", 1.0, lo, 8))
    tb = make_testbed("gaussian", "flow")
    calls = []

    def model(x, sigma, **kw):
        calls.append(1)
        return tb(x, sigma, **kw)
    model.cfg_scale = 1.0
    out = sample_adaptive(model, tb.noise(range(2)), host_sigmas(tb, 7), model_type="flow", controller="policy:auto")
    assert torch.isfinite(out).all() and len(calls) <= 7
