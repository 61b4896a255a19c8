"""adaptive_core.hosts_common: option checks, infotext entries and their way back, the schedule hash,
the pasted-sampler check, per-image infotext values and model-type detection."""
from __future__ import annotations

import types

import pytest
import torch

from adaptive_core import Trace, sample_adaptive
from adaptive_core import hosts_common as hc
from adaptive_core.schedules import SD15_SIGMA_MAX, SD15_SIGMA_MIN, karras_sigmas


def test_defaults_follow_the_sampler_defaults():
    kwargs, model_type = hc.sampler_kwargs({})
    assert kwargs == {"mode": "budget", "schedule": "ado"} and model_type is None
    kwargs, model_type = hc.sampler_kwargs({"ado_mode": "tolerance", "ado_rtol": "0.2", "ado_model_type": "flow"})
    assert kwargs == {"mode": "tolerance", "schedule": "ado", "rtol": 0.2} and model_type == "flow"


@pytest.mark.parametrize("values, match", [
    ({"ado_mode": "fast"}, "ado_mode.*budget"),
    ({"ado_rtol": "abc"}, "ado_rtol.*number"),
    ({"ado_rtol": 0.0}, r"ado_rtol.*\[0.001, 1.0\]"),
    ({"ado_rtol": float("nan")}, "ado_rtol"),
    ({"ado_rtol": True}, "ado_rtol"),
    ({"ado_policy": "x"}, "unknown ADO option"),
])
def test_bad_option_values_are_named(values, match):
    with pytest.raises(ValueError, match=match):
        hc.sampler_kwargs(values)


def test_option_params_round_trip():
    for values in ({}, {"ado_mode": "tolerance", "ado_rtol": 0.125, "ado_schedule": "host", "ado_model_type": "ve"}):
        params = hc.option_params(values)
        assert params[hc.VERSION_KEY] == hc.__version__
        assert all(isinstance(v, str) for v in params.values())
        assert hc.sampler_kwargs(hc.options_from_params(params)) == hc.sampler_kwargs(values)
    assert "ADO tolerance" not in hc.option_params({"ado_mode": "budget"})   # unused outside tolerance mode
    with pytest.raises(ValueError, match="ado_mode"):
        hc.options_from_params({"ADO mode": "sometimes"})


def test_schedule_hash_names_the_schedule():
    s = [14.6, 3.2, 0.5, 0.03, 0.0]
    h = hc.schedule_hash(s)
    assert len(h) == 10 and int(h, 16) >= 0
    assert hc.schedule_hash(torch.tensor(s, dtype=torch.float64)) == h
    assert hc.schedule_hash([v * (1 + 1e-9) for v in s]) == h            # float noise: same schedule
    assert hc.schedule_hash([14.6, 3.3, 0.5, 0.03, 0.0]) != h
    assert hc.schedule_hash(s[:-1]) != h
    for bad in ([], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="finite"):
            hc.schedule_hash(bad)


def test_run_params_of_a_traced_run():
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SD15_SIGMA_MAX
    trace = Trace()
    sample_adaptive(lambda x, s: x / (1 + s.reshape(-1, 1) ** 2), x, karras_sigmas(6, SD15_SIGMA_MIN, SD15_SIGMA_MAX),
                    trace=trace)
    params = hc.run_params(trace, 1)
    assert params == {"ADO NFE": "6", "ADO schedule hash": hc.schedule_hash(trace.sigmas_taken(1))}
    assert set(hc.run_params(trace, 0, hires=True)) == {"ADO hires NFE", "ADO hires schedule hash"}
    with pytest.raises(ValueError, match="sample 2"):
        hc.run_params(trace, 2)


def test_pasted_sampler_problems():
    known = ["Euler", "DPM++ 2M", hc.SAMPLER_LABEL]
    params = {"Sampler": "ADO adaptive", "Hires sampler": "k_ado"}
    assert hc.pasted_sampler_problems(params, known) == []
    assert params["Sampler"] == params["Hires sampler"] == hc.SAMPLER_LABEL
    assert hc.pasted_sampler_problems({"Sampler": "DPM++ 2M Karras"}, known, ["Karras", "karras"]) == []
    problems = hc.pasted_sampler_problems({"Sampler": "Mystery", "Hires sampler": "Use same sampler"}, known)
    assert len(problems) == 1 and "'Mystery'" in problems[0] and "default sampler" in problems[0]
    problems = hc.pasted_sampler_problems({"Sampler": hc.SAMPLER_LABEL, hc.VERSION_KEY: "0.0.1"}, known)
    assert len(problems) == 1 and "0.0.1" in problems[0]


def test_seed_keyed_value_serves_both_index_conventions():
    v = hc.SeedKeyedValue()
    v.set(10, 20, "a")
    v.set(11, 21, "b")
    assert v(all_seeds=[10, 11], all_subseeds=[20, 21], index=1) == "b"                   # current batch
    assert v(all_seeds=[8, 9, 10, 11], all_subseeds=[18, 19, 20, 21], index=2) == "a"     # whole job
    assert v(all_seeds=[10], all_subseeds=[99], index=0) is None
    assert v(all_seeds=[10], all_subseeds=[20], index=5) is None


def test_webui_model_type():
    forge_flow = types.SimpleNamespace(predictor=types.SimpleNamespace(prediction_type="const"))
    forge_eps = types.SimpleNamespace(predictor=types.SimpleNamespace(prediction_type="eps"))
    assert hc.webui_model_type(forge_flow) == "flow"
    assert hc.webui_model_type(forge_eps) == "ve"
    assert hc.webui_model_type(object(), types.SimpleNamespace(is_sd3=True)) == "flow"
    assert hc.webui_model_type(object(), types.SimpleNamespace(is_sd3=False)) == "ve"
