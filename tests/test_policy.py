"""The PPO step policy: gymnasium env, tiny SB3 training + ONNX export, manifest checks, and the sampler's
``controller="policy:..."`` (budget cap, fallback, default unchanged).  Training tests skip without
stable-baselines3/gymnasium; the run-time tests need only onnxruntime (+ torch's ONNX exporter for a hand-made
policy)."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from adaptive_core import sample_adaptive
from adaptive_core.bench.run import host_sigmas
from adaptive_core.policy import (LEGACY_BASE_PLAN, MANIFEST_FORMAT, N_OBSERVATIONS, OBSERVATION_NAMES, SOFT_Z,
                                  Policy, PolicyIntegrityError, PolicyLoadError, PolicyManifest, load_policy,
                                  order_delta_from_action, share_from_action)
from adaptive_core.testbeds import make_testbed
from adaptive_core.trace import Trace

pytest.importorskip("onnxruntime")


def _write_policy(folder, module, name="hand", ood_z=6.0, kind="share_of_remaining_lambda", soft_z=None,
                  **action_extra):
    """Export ``module`` (raw observation [B, N] → action [B, 1] or [B, 2] for ``kind="share_and_order"``) with a
    unit normalisation (mean 0, std 2) and write its manifest (``soft_z`` None: no damping entry)."""
    pytest.importorskip("onnxscript")
    from adaptive_core.learned import sha256_of_file
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / f"{name}.onnx"
    torch.onnx.export(module.eval(), (torch.zeros(2, N_OBSERVATIONS),), str(onnx_path), input_names=["observation"],
                      output_names=["action"], dynamo=True, external_data=False,
                      dynamic_shapes={"observation": {0: torch.export.Dim("batch", min=1, max=1 << 20)}})
    m = PolicyManifest(onnx_file=onnx_path.name, sha256=sha256_of_file(onnx_path),
                       normalisation={"applied_in_graph": True, "mean": [0.0] * N_OBSERVATIONS,
                                      "var": [4.0] * N_OBSERVATIONS, "epsilon": 1e-8, "clip_obs": 10.0},
                       action={"kind": kind, "action_scale": float(np.log(4.0)), "min_share": 0.02, **action_extra},
                       fallback={"ood_z": ood_z, "std_floor": 0.05,
                                 **({} if soft_z is None else {"soft_z": soft_z})})
    path = folder / f"{name}.json"
    path.write_text(m.to_json())
    return path


class _Tanh(torch.nn.Module):
    def __init__(self, n_out=1):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(N_OBSERVATIONS, 8), torch.nn.Tanh(), torch.nn.Linear(8, n_out))

    def forward(self, observation):
        return torch.clamp(self.net(observation), -1.0, 1.0)


@pytest.fixture(scope="module")
def hand_policy(tmp_path_factory):
    return _write_policy(tmp_path_factory.mktemp("policy"), _Tanh())


class _Constant:
    """A controller object that always answers ``value`` (a step action, or a (step, order) pair) to drive the
    sampler to its limits."""

    action_scale, min_share = float(np.log(4.0)), 0.02
    base_options = LEGACY_BASE_PLAN   # the plan the policies the tools make run on

    def __init__(self, value):
        self.value = np.atleast_1d(np.asarray(value, dtype=np.float64))

    def decide(self, obs):
        return np.tile(self.value, (obs.shape[0], 1)), [None] * obs.shape[0]


class _Counting:
    def __init__(self, tb):
        self.tb, self.calls = tb, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.tb(x, sigma, **kw)


# --- run time -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["ve", "flow"])
@pytest.mark.parametrize("value", [-1.0, 0.3, 1.0, (-1.0, -1.0), (1.0, 1.0)])
def test_budget_cap_holds_under_the_policy(model_type, value, hand_policy):
    tb = make_testbed("gaussian", model_type)
    x = tb.noise(range(3))
    for budget in (1, 2, 4, 5, 8, 12):
        for controller in (_Constant(value), f"policy:{hand_policy}"):
            model, trace = _Counting(tb), Trace()
            out = sample_adaptive(model, x, host_sigmas(tb, budget), nfe_budget=budget, model_type=model_type,
                                  controller=controller, trace=trace)
            assert model.calls <= budget and torch.isfinite(out).all()
            assert all(trace.sample_nfe(b) <= budget for b in range(3))
            step = np.atleast_1d(value)[0]
            if isinstance(controller, _Constant) and step == -1.0:
                assert model.calls == budget            # the shortest steps still reach the end on the last call
            if isinstance(controller, _Constant) and step == 1.0 and budget >= 5:
                assert model.calls < budget             # a share of 1 jumps to the end: the images stop early


def test_default_and_heuristic_controller_unchanged():
    tb = make_testbed("gmm_digits", "ve")
    x = tb.noise(range(4))
    a = sample_adaptive(tb, x, host_sigmas(tb, 8), model_type="ve")
    b = sample_adaptive(tb, x, host_sigmas(tb, 8), model_type="ve", controller="heuristic")
    assert torch.equal(a, b)
    trace = Trace()
    sample_adaptive(tb, x, host_sigmas(tb, 8), model_type="ve", trace=trace)
    assert "controller" not in trace.options


def test_policy_changes_steps_and_is_batch_invariant(hand_policy):
    tb = make_testbed("gaussian", "flow")
    x = tb.noise(range(5))
    trace = Trace()
    out = sample_adaptive(tb, x, host_sigmas(tb, 8), model_type="flow", controller=f"policy:{hand_policy}", trace=trace)
    assert "policy" in [r.decision for r in trace.samples[0]]
    assert any("PPO policy" in n for n in trace.notes)
    one = sample_adaptive(tb, x[3:4], host_sigmas(tb, 8), model_type="flow", controller=f"policy:{hand_policy}")
    assert torch.equal(one, out[3:4])
    heuristic = sample_adaptive(tb, x, host_sigmas(tb, 8), model_type="flow")
    assert not torch.equal(out, heuristic)


def test_out_of_range_falls_back_to_the_heuristic_and_says_so(tmp_path):
    path = _write_policy(tmp_path, _Tanh(), "strict", ood_z=1e-3)    # every observation is "out of range"
    tb = make_testbed("gaussian", "ve")
    x = tb.noise(range(3))
    trace = Trace()
    out = sample_adaptive(tb, x, host_sigmas(tb, 8), model_type="ve", controller=f"policy:{path}", trace=trace)
    assert "policy-fallback" in [r.decision for r in trace.samples[0]]
    assert any("policy fallback to the heuristic step" in n for n in trace.notes)
    assert torch.equal(out, sample_adaptive(tb, x, host_sigmas(tb, 8), model_type="ve"))   # exactly the heuristic
    p = Policy(path)
    obs = np.zeros((2, N_OBSERVATIONS), np.float32)
    obs[1, 0] = np.nan
    assert "not finite" in p.out_of_range(obs)[1]


def test_actions_are_damped_between_soft_z_and_the_fallback(tmp_path):
    """A row whose largest |z| is between soft_z and ood_z gets the policy's actions scaled linearly down to 0 at
    ood_z (std 2 here: |z| 3 / 4.5 / 5.7 at entries 6 / 9 / 11.4); within soft_z the actions are the graph's;
    without soft_z nothing is damped; a bad soft_z is refused."""
    damped = Policy(_write_policy(tmp_path / "a", _Tanh(2), "soft", kind="share_and_order", soft_z=3.0))
    plain = Policy(_write_policy(tmp_path / "b", _Tanh(2), "plain", kind="share_and_order"))
    obs = np.zeros((5, N_OBSERVATIONS))
    obs[1, 0], obs[2, 3], obs[3, 5], obs[4, 7] = 1.0, 6.0, -9.0, 11.4
    want_gain = np.array([1.0, 1.0, 1.0, 0.5, 0.1])
    assert np.allclose(damped.action_gain(obs), want_gain)
    actions, reasons = damped.decide(obs)
    assert reasons == [None] * 5 and np.allclose(actions, damped.act(obs) * want_gain[:, None])
    assert np.abs(damped.act(obs)[3:]).min() > 1e-3        # (so the damping is visible)
    assert np.allclose(plain.decide(obs)[0], plain.act(obs)) and np.all(plain.action_gain(obs) == 1.0)
    obs[4, 7] = 12.5                                       # past ood_z: the fallback, not the damping
    actions, reasons = damped.decide(obs)
    assert reasons[4] is not None and np.all(actions[4] == 0.0)
    for bad in (6.0, -1.0, "3"):
        path = tmp_path / "b" / "plain.json"
        m = json.loads(path.read_text())
        m["fallback"]["soft_z"] = bad
        (tmp_path / "b" / "bad.json").write_text(json.dumps(m))
        with pytest.raises(PolicyLoadError, match="soft_z"):
            Policy(tmp_path / "b" / "bad.json")


def test_decide_gives_the_same_decisions_row_by_row_and_in_a_batch(tmp_path):
    """decide checks a few rows in plain Python and many with numpy: both give, per row, the actor's actions times
    action_gain inside ood_z, action 0 and a reason outside it or for a non-finite row."""
    policy = Policy(_write_policy(tmp_path, _Tanh(2), "soft", kind="share_and_order", soft_z=3.0))
    rng = np.random.default_rng(0)
    obs = rng.normal(0.0, 2.0, (40, N_OBSERVATIONS)).astype(np.float32)   # std 2: |z| 1 on average
    obs[5, 2], obs[6, 0], obs[7, 9], obs[8, 16] = 7.0, -10.0, 13.0, -30.0   # |z| 3.5, 5, 6.5, 15
    obs[9, 4], obs[10, 1], obs[11, 3] = np.nan, np.inf, 6.0                # 6.0: |z| 3, the soft limit itself
    gain = policy.action_gain(obs)
    want = policy.act(obs) * gain[:, None]
    want_reasons = policy.out_of_range(obs)
    assert gain[5] < 1.0 and gain[6] < 1.0 and [r is not None for r in want_reasons[7:11]] == [True] * 4
    want[[r is not None for r in want_reasons]] = 0.0
    batch, batch_reasons = policy.decide(obs)               # 40 rows: numpy
    assert np.allclose(batch, want) and batch_reasons == want_reasons
    for i in range(len(obs)):                               # one row: plain Python
        row, row_reasons = policy.decide(obs[i:i + 1])
        assert np.allclose(row, want[i:i + 1]) and row_reasons == want_reasons[i:i + 1]
    assert np.allclose(policy.decide(obs[:8].astype(np.float64))[0], want[:8], atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \[B, "):
        policy.decide(obs[:, :5])


def test_graph_runner_calls_the_session_core_only_where_it_gives_the_public_output():
    """graph_runner runs a CPU session through its compiled core, with the public run's output; a session without
    that core (or on another provider) keeps the public run."""
    from adaptive_core.learned import graph_runner
    from adaptive_core.policy import resolve_policy_path
    policy = Policy(resolve_policy_path("ppo_ve_guided"))
    session = policy._session
    probe = np.random.default_rng(1).normal(size=(3, N_OBSERVATIONS)).astype(np.float32)
    run = graph_runner(session, "observation", "action", probe[:1])
    assert run.__name__ == "direct"
    assert np.array_equal(run(probe), session.run(["action"], {"observation": probe})[0])

    class PublicOnly:   # an ONNX Runtime without the compiled core attribute
        def get_providers(self):
            return ["CPUExecutionProvider"]

        def run(self, names, feeds):
            return session.run(names, feeds)

    run = graph_runner(PublicOnly(), "observation", "action", probe[:1])
    assert run.__name__ == "public" and np.array_equal(run(probe), policy.act(probe).astype(np.float32))


def test_damped_decisions_are_noted_in_the_trace(tmp_path):
    path = _write_policy(tmp_path, _Tanh(), "soft0", ood_z=1e6, soft_z=0.0)   # every row is damped a little
    tb = make_testbed("gaussian", "ve")
    x = tb.noise(range(2))
    trace = Trace()
    sample_adaptive(tb, x, host_sigmas(tb, 8), model_type="ve", controller=f"policy:{path}", trace=trace)
    assert "policy" in [r.decision for r in trace.samples[0]]
    assert any("policy action damped to" in n and "fallback at 1e+06" in n for n in trace.notes)


def test_manifest_mismatch_is_rejected(hand_policy, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(hand_policy.parent, folder)
    path = folder / hand_policy.name
    good = json.loads(path.read_text())
    assert load_policy(path).name == "hand"
    for change, error in [({"sha256": "0" * 64}, PolicyIntegrityError),
                          ({"observation_names": list(OBSERVATION_NAMES)[::-1]}, PolicyLoadError),
                          ({"format": "ado-ppo-policy/0"}, PolicyLoadError),
                          ({"action": {"kind": "solver_order"}}, PolicyLoadError),
                          ({"input_name": "obs"}, PolicyLoadError),
                          ({"surprise": 1}, PolicyLoadError)]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(error):
            Policy(path)
    path.write_text(json.dumps({**good, "action": {**good["action"], "kind": "share_and_order"}}))
    with pytest.raises(PolicyLoadError, match="action"):     # a one-output graph under a two-action kind
        Policy(path)
    path.write_text(json.dumps(good))
    (folder / good["onnx_file"]).write_bytes(b"not a graph")
    with pytest.raises(PolicyIntegrityError):
        Policy(path)
    tb = make_testbed("gaussian", "ve")
    x = tb.noise([0])
    trace = Trace()
    with pytest.warns(UserWarning, match="policy unavailable"):
        out = sample_adaptive(tb, x, host_sigmas(tb, 6), model_type="ve", controller=f"policy:{path}", trace=trace)
    assert any("policy unavailable" in n for n in trace.notes)
    assert torch.equal(out, sample_adaptive(tb, x, host_sigmas(tb, 6), model_type="ve"))


def test_bad_controller_input_is_refused(hand_policy):
    tb = make_testbed("gaussian", "ve")
    x = tb.noise([0])
    with pytest.raises(ValueError, match="policy:NAME"):
        sample_adaptive(tb, x, host_sigmas(tb, 6), model_type="ve", controller="ppo")
    with pytest.raises(TypeError, match="decide"):
        sample_adaptive(tb, x, host_sigmas(tb, 6), model_type="ve", controller=3)
    with pytest.raises(ValueError, match="mode='budget'"):
        sample_adaptive(tb, x, host_sigmas(tb, 6), model_type="ve", controller=f"policy:{hand_policy}", mode="tolerance")
    with pytest.raises(PolicyLoadError):
        load_policy("policy:no_such_policy_here")


def test_share_from_action_mapping():
    base = np.array([0.2, 0.2, 0.2, 0.9])
    s = share_from_action(base, np.array([0.0, 1.0, -1.0, 1.0]))
    assert np.allclose(s, [0.2, 0.8, 0.05, 1.0])
    assert order_delta_from_action([-1.0, -0.5, -0.49, 0.0, 0.49, 0.5, 1.0]).tolist() == [-1, -1, 0, 0, 0, 1, 1]


def _orders(trace, b=0):
    return [r.order for r in trace.samples[b]]


@pytest.mark.parametrize("model_type", ["ve", "flow"])
def test_order_action_sets_the_solver_order(model_type):
    tb = make_testbed("gmm_digits", model_type)
    x = tb.noise(range(2))
    runs = {}
    for label, value in [("heuristic", None), ("same", (0.0, 0.0)), ("lower", (0.0, -1.0)), ("higher", (0.0, 1.0))]:
        trace = Trace()
        opts = dict(LEGACY_BASE_PLAN) if value is None else {"controller": _Constant(value)}
        out = sample_adaptive(tb, x, host_sigmas(tb, 8), model_type=model_type, trace=trace, **opts)
        runs[label] = (out, _orders(trace))
    assert torch.equal(runs["same"][0], runs["heuristic"][0])            # a₁ in the dead zone: the heuristic
    assert runs["same"][1] == runs["heuristic"][1]
    heur, lower, higher = runs["heuristic"][1], runs["lower"][1], runs["higher"][1]
    assert len(lower) == len(heur)
    # every policy-decided step is one order lower (at least 1); the last step's order is the heuristic's again
    assert all(lo == max(h - 1, 1) for lo, h in zip(lower[1:-1], heur[1:-1]))
    assert sum(lower) < sum(heur) and not torch.equal(runs["lower"][0], runs["heuristic"][0])
    assert all(hi >= h for hi, h in zip(higher, heur)) and max(higher) <= 3


# --- training (stable-baselines3 + gymnasium) ------------------------------------------------------------------------

def test_env_passes_check_env():
    pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env

    from adaptive_core.tune.policy_env import SamplingEnv
    env = SamplingEnv(testbeds=[("gaussian", "ve"), ("gmm_digits", "flow")], budgets=[4, 6], seeds=range(6))
    assert env.action_space.shape == (2,)   # step and solver order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=1)
    done, steps = False, 0
    while not done:
        obs, reward, done, _, info = env.step(np.array([0.5, -1.0], np.float32))
        steps += 1
    assert steps == info["budget"] - 2 or info["nfe"] < info["budget"]
    assert np.isfinite(reward) and info["nfe"] <= info["budget"]
    with pytest.raises(ValueError, match="shape"):
        env.reset(seed=2)
        env.step(np.array([0.5], np.float32))
    env.close()
    one = SamplingEnv(testbeds=[("gaussian", "flow")], budgets=[5], seeds=range(2), order_action=False)
    assert one.action_space.shape == (1,)
    one.close()


def test_env_trained_testbed_draws_class_and_cfg(tmp_path, monkeypatch):
    """mnist_unet episodes: a CFG scale drawn per episode, the class of the seed, a cached reference solve."""
    pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env

    from adaptive_core.tune import policy_env
    monkeypatch.setattr(policy_env, "CACHE_DIR", tmp_path / "cache")
    env = policy_env.SamplingEnv(testbeds=[("mnist_unet", "flow")], budgets=[4], seeds=range(3), cfg_scales=(1.0, 2.0),
                                 trained_seed_pool=2, reference_steps=16)
    assert [c.key for c in env.configs] == ["mnist_unet-flow-cfg1", "mnist_unet-flow-cfg2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, skip_render_check=True)
    seen = set()
    for episode in range(12):
        obs, info = env.reset(seed=100 + episode)
        assert info["noise_seed"] in (0, 1)                      # the trained pool: the first 2 seeds
        seen.add(info["config"])
        done = False
        while not done:
            obs, reward, done, _, info = env.step(np.zeros(2, np.float32))
        # action 0 = the heuristic: the same image as the heuristic's run (up to a batch of one's float noise)
        assert abs(reward) < 1e-5
        assert env.testbeds[info["config"]].labels.tolist() == [info["noise_seed"] % 10]
    assert seen == {0, 1}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2    # one reference solve per CFG scale
    x, ref = policy_env.noise_and_reference(env.configs[1], env.testbeds[1], [0, 1], 16)   # from the cache
    assert torch.equal(ref, env._data[1][1])
    env.close()


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory):
    pytest.importorskip("gymnasium")
    pytest.importorskip("stable_baselines3")
    pytest.importorskip("onnxscript")
    from adaptive_core.tune.policy_train import export_policy, train
    torch.set_num_threads(1)
    specs = [("gaussian", "ve"), ("gaussian", "flow")]
    model, vecnorm, history = train(specs, [5, 6], timesteps=256, n_envs=2, n_steps=64, batch_size=64, n_epochs=2,
                                    train_seeds=range(8), eval_seeds=range(20000, 20004), eval_every=10 ** 9,
                                    progress=False)
    path = export_policy(model, vecnorm, tmp_path_factory.mktemp("trained") / "tiny.onnx",
                         trained_on={"testbeds": ["gaussian-ve", "gaussian-flow"], "model_types": ["flow", "ve"],
                                     "configurations": ["gaussian-ve", "gaussian-flow"]}, training={"timesteps": 256},
                         metrics={"rmse_ratio_vs_heuristic": history["final"]["ratio"]})
    return model, vecnorm, history, path


def test_tiny_training_run_exports_a_loadable_policy(tiny_training):
    model, vecnorm, history, path = tiny_training
    assert model.num_timesteps >= 256 and history["evals"]
    policy = load_policy(path)
    assert policy.manifest.format == MANIFEST_FORMAT and policy.manifest.trained_on["testbeds"]
    # the domain adapter's scope follows from what it was trained on: analytic testbeds run unguided
    assert policy.manifest.applies_to == {"model_types": ["flow", "ve"], "guidance": ["unguided"]}
    assert policy.soft_z == SOFT_Z and "soft_z" in policy.manifest.fallback["rule"]   # exports damp before the fallback
    tb = make_testbed("gaussian", "ve")
    x = tb.noise(range(2))
    model_calls = _Counting(tb)
    out = sample_adaptive(model_calls, x, host_sigmas(tb, 6), nfe_budget=6, model_type="ve", controller=f"policy:{path}")
    assert torch.isfinite(out).all() and model_calls.calls <= 6


def test_onnx_actions_equal_the_ppo_deterministic_actions(tiny_training):
    from adaptive_core.tune.policy_train import sb3_actions
    model, vecnorm, _, path = tiny_training
    policy = Policy(path)
    rng = np.random.default_rng(1)
    obs = (vecnorm.obs_rms.mean + np.sqrt(vecnorm.obs_rms.var) * rng.normal(size=(256, N_OBSERVATIONS)) * 3)
    obs = obs.astype(np.float32)
    got, want = policy.act(obs), sb3_actions(model, vecnorm, obs)
    assert got.shape == want.shape == (256, 2)
    assert np.abs(got - want).max() <= 1e-5


def test_bundled_policies_load_and_respect_the_budget():
    from adaptive_core.policy import bundled_policies
    tb = make_testbed("gaussian", "flow")
    x = tb.noise(range(2))
    for name in bundled_policies():
        policy = load_policy(f"policy:{name}")
        assert policy.manifest.trained_on["model_types"] and policy.manifest.metrics
        model = _Counting(tb)
        out = sample_adaptive(model, x, host_sigmas(tb, 8), model_type="flow", controller=f"policy:{name}")
        assert torch.isfinite(out).all() and model.calls <= 8


def test_runtime_imports_no_training_library(hand_policy):
    import subprocess
    import sys
    code = ("import sys, torch; from adaptive_core import sample_adaptive; from adaptive_core.policy import load_policy; "
            "from adaptive_core.testbeds import make_testbed; from adaptive_core.bench.run import host_sigmas; "
            "tb = make_testbed('gaussian', 've'); "
            f"sample_adaptive(tb, tb.noise([0]), host_sigmas(tb, 6), model_type='ve', controller='policy:{hand_policy}'); "
            "bad = [m for m in ('stable_baselines3', 'gymnasium', 'optuna', 'onnx') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_host_option_selects_a_bundled_policy():
    from adaptive_core import hosts_common as hc
    from adaptive_core.policy import bundled_policies
    assert "ADO controller" not in hc.option_params({})                  # default images keep their parameters
    assert "controller" not in hc.sampler_kwargs({})[0]
    for spec in ["policy:auto"] + [f"policy:{name}" for name in bundled_policies()]:
        values = {"ado_controller": spec}
        assert hc.sampler_kwargs(values)[0]["controller"] == spec
        params = hc.option_params(values)
        assert params["ADO controller"] == spec
        assert hc.sampler_kwargs(hc.options_from_params(params)) == hc.sampler_kwargs(values)
        assert "controller" not in hc.sampler_kwargs({**values, "ado_mode": "tolerance"})[0]
    with pytest.raises(ValueError, match="ado_controller"):
        hc.sampler_kwargs({"ado_controller": "policy:nope"})


def test_optuna_search_two_workers_share_one_study(tmp_path, capsys):
    """Two `policy --trials` runs (as two workers would) on one storage make one study; `policy-study` lists every
    trial with the worker that ran it."""
    pytest.importorskip("optuna")
    pytest.importorskip("stable_baselines3")
    from adaptive_core.tune.policy_train import main, study_main
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["--trials", "1", "--timesteps", "64", "--n-envs", "1", "--n-steps", "32", "--batch-size", "32",
            "--train-seeds", "4", "--eval-seeds", "2", "--testbeds", "gaussian:ve", "--budgets", "5",
            "--storage", storage, "--study", "shared"]
    assert main(args + ["--seed", "0"]) == 0
    assert main(args + ["--seed", "7"]) == 0
    import optuna
    study = optuna.load_study(study_name="shared", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(t.value > 0 and t.user_attrs["worker"] for t in done)
    capsys.readouterr()
    assert study_main(["--storage", storage, "--study", "shared", "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "| 0 |" in out and "| 1 |" in out and "best: trial" in out and (tmp_path / "s.png").stat().st_size > 0
    assert study_main(["--storage", storage, "--study", "nope"]) == 2


def test_episodes_to_final_reward():
    from adaptive_core.tune.policy_train import episodes_to_final
    evals = [{"episodes": e, "eval_reward": r} for e, r in [(0, 0.0), (10, 0.097), (20, 0.08), (30, 0.099), (40, 0.1)]]
    got = episodes_to_final({"evals": evals})
    assert got["first"] == 10 and got["stays"] == 30 and got["final_reward"] == 0.1
    assert got["rmse_first"] == 10 and got["rmse_stays"] == 10      # within ln 1.05 of 0.1 from 0.097 on
    near_heuristic = [{"episodes": e, "eval_reward": r} for e, r in [(0, -0.06), (10, 0.0), (20, 0.02), (30, 0.01)]]
    got = episodes_to_final({"evals": near_heuristic})
    assert got["first"] == 30 and got["stays"] == 30                 # 5% of 0.01: only the final itself
    assert got["rmse_first"] == 10 and got["rmse_stays"] == 10       # RMSE within 5% of the final from 10 on
    assert episodes_to_final({"evals": []})["first"] is None


def test_per_config_reward_scale():
    pytest.importorskip("gymnasium")
    from adaptive_core.tune.policy_env import REWARD_SCALE_WARMUP, SamplingEnv
    env = SamplingEnv(testbeds=[("gaussian", "ve"), ("gaussian", "flow")], budgets=[5], seeds=range(2))
    rng = np.random.default_rng(0)
    wide = [env._reward_scale_of(0, r) for r in rng.normal(0, 2.0, 400)]
    narrow = [env._reward_scale_of(1, r) for r in rng.normal(0, 0.2, 400)]
    assert wide[:REWARD_SCALE_WARMUP] == [1.0] * REWARD_SCALE_WARMUP
    assert abs(wide[-1] - 2.0) < 0.3 and abs(narrow[-1] - 0.2) < 0.03      # each configuration its own std
    flat = SamplingEnv(testbeds=[("gaussian", "ve")], budgets=[5], seeds=range(2), reward_scale="none")
    assert {flat._reward_scale_of(0, r) for r in rng.normal(0, 2.0, 50)} == {1.0}
    with pytest.raises(ValueError, match="reward_scale"):
        SamplingEnv(testbeds=[("gaussian", "ve")], budgets=[5], seeds=range(2), reward_scale="popart")


def test_error_reward_terms_sum_to_the_pooled_rmse():
    """The pooled-MSE share summed over a configuration's seed pool is N · (1 − pooled MSE ratio): the benchmark's
    pooled RMSE; "both" adds the per-image log-ratio; an unknown name is refused."""
    pytest.importorskip("gymnasium")
    from adaptive_core.tune.policy_env import SamplingEnv
    kw = dict(testbeds=[("gaussian", "ve")], budgets=[5], seeds=range(8))
    pooled, both = SamplingEnv(error_reward="pooled-mse", **kw), SamplingEnv(error_reward="both", **kw)
    heur = np.array([pooled.heuristic_rmse(0, s, 5) for s in range(8)])
    assert np.ptp(heur) > 0                                               # images differ in difficulty
    policy = heur * np.linspace(0.3, 1.4, 8)                              # better on easy images, worse on hard
    gains = [pooled.error_gain(0, 5, p, h) for p, h in zip(policy, heur)]
    assert np.isclose(sum(gains), 8 * (1 - np.sum(policy ** 2) / np.sum(heur ** 2)))
    log_ratio = np.log(heur / policy)
    assert np.allclose([both.error_gain(0, 5, p, h) for p, h in zip(policy, heur)], np.array(gains) + log_ratio)
    log_only = SamplingEnv(error_reward="log-ratio", **kw)
    assert log_only.error_gain(0, 5, heur[0] / 2, heur[0]) == pytest.approx(np.log(2))
    with pytest.raises(ValueError, match="error_reward"):
        SamplingEnv(error_reward="rmse", **kw)


def test_policy_eval_rows_carry_per_image_numbers(tmp_path):
    """policy-eval on the bundled policy, one analytic configuration and 6 seeds: the pooled ratio, its bootstrap
    interval around it, the per-image summary, and a table row with them."""
    pytest.importorskip("onnxruntime")
    from adaptive_core.policy import POLICY_DIR, bundled_policies
    from adaptive_core.tune.policy_eval import (markdown, measure, per_image_summary, plot_per_image,
                                                pooled_ratio_interval)
    from adaptive_core.tune.policy_eval import REPO
    assert "ppo_ve_flow" in bundled_policies()            # the bundled policy trained on gaussian-ve
    res = measure(POLICY_DIR / "ppo_ve_flow.json", [("gaussian", "ve")], [5], range(30000, 30006),
                  REPO / "docs" / "bench" / "results.json", None)
    (row,) = res["rows"]
    # the benchmark's oracle grid (fitted on its seeds 0..31) re-run on these seeds: at 5 NFE on the Gaussian
    # it is far better than the host's Karras grid under the heuristic (0.014 against 0.06 on the benchmark)
    assert row["oracle_rmse"] < 0.5 * row["heuristic"] and row["best_peer_rmse"] > 0
    assert row["policy_vs_oracle"] == pytest.approx(row["policy"] / row["oracle_rmse"])
    lo, hi = row["policy_vs_heuristic_ci90"]
    assert lo <= row["policy_vs_heuristic"] <= hi and 0 < row["per_image_geomean_ratio"]
    assert "gaussian-ve | yes | 5 |" in markdown(res) and f"({lo:.2f}–{hi:.2f})" in markdown(res)
    auto = {**res, "trained_on": {"ppo_ve_flow": res["trained_on"]},   # --policy auto: per chosen policy
            "rows": [{**row, "chosen_policy": "ppo_ve_flow"}, {**row, "testbed": "other-ve", "chosen_policy": None}]}
    assert "gaussian-ve | yes | 5 |" in markdown(auto) and "other-ve | – (heuristic) | 5 |" in markdown(auto)
    assert len(row["images"]["policy"]) == len(row["images"]["heuristic"]) == 6
    plot_per_image(res, tmp_path / "per_image.png")
    assert (tmp_path / "per_image.png").read_bytes()[:4] == b"\x89PNG"
    same = per_image_summary([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["per_image_geomean_ratio"] == 1.0 and same["share_of_images_worse"] == 0.0

    assert same["policy_vs_heuristic_ci90"] == pytest.approx([1.0, 1.0])
    # one image of ten carries the pooled error: the interval is wide although nine images halve their error
    lo, hi = pooled_ratio_interval([0.5] * 9 + [12.0], [1.0] * 9 + [10.0])
    assert lo < 0.7 and hi > 1.15
    with pytest.raises(ValueError, match="per-image"):
        pooled_ratio_interval([1.0, 2.0], [1.0])


def test_policy_eval_auto_measures_the_domain_adapters_choice():
    """``policy-eval --policy auto``: each configuration runs ``controller="policy:auto"``, and its rows name the
    policy the adapter chose there, the same run as naming that policy."""
    from adaptive_core.domain import job_domain, select_policy
    from adaptive_core.tune.policy_env import evaluate_controller
    from adaptive_core.tune.policy_eval import measure
    seeds = range(30000, 30004)
    res = measure("auto", [("gaussian", "flow"), ("gaussian@shift=1", "flow"), ("gaussian", "ve")], [5], seeds,
                  None, None)
    for row in res["rows"]:
        name, model_type = row["testbed"].split("-")
        want = select_policy(job_domain(make_testbed(name, model_type), model_type, nfe_budget=5))
        assert row["chosen_policy"] == want
        named = evaluate_controller(None if want is None else f"policy:{want}", [(name, model_type)], [5], seeds)
        assert row["policy"] == named[row["testbed"]][5]["rmse"]
    assert "policy:auto" in res["policy"] and res["latency_us_per_decision"] > 0


def test_policy_eval_latency_only_times_every_bundled_policy(capsys, hand_policy):
    """``policy-eval --latency-only``: one row per policy (every bundled one for 'auto'), a positive time for 1
    and 8 rows, and no sampling run."""
    from adaptive_core.policy import bundled_policies
    from adaptive_core.tune.policy_eval import main
    assert main(["--policy", "auto", "--latency-only"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == bundled_policies()
    assert all(float(t) > 0 for r in rows for t in r[1:])
    assert main(["--policy", str(hand_policy), "--latency-only"]) == 0
    assert "| hand |" in capsys.readouterr().out


def test_keep_best_ends_with_the_best_evaluated_policy(monkeypatch):
    """--keep-best: the model and observation statistics handed back are those of the best periodic evaluation
    (here the third of seven, by a scripted score), not the last; episodes-to-final reads against it."""
    pytest.importorskip("gymnasium")
    pytest.importorskip("stable_baselines3")
    from adaptive_core.tune import policy_train
    torch.set_num_threads(1)
    snapshots, scores = [], iter([0.95, 0.9, 0.7, 0.8, 1.1, 0.99, 1.2, 1.3, 1.4])
    real_evaluate = policy_train.evaluate_controller

    def recording_evaluate(controller, *args, **kwargs):
        if controller is not None:        # a policy evaluation: remember the policy it saw
            snapshots.append(({k: v.clone() for k, v in controller.model.policy.state_dict().items()},
                              controller.vecnorm.obs_rms.mean.copy()))
        return real_evaluate(controller, *args, **kwargs)

    monkeypatch.setattr(policy_train, "evaluate_controller", recording_evaluate)
    monkeypatch.setattr(policy_train, "ratio_summary",
                        lambda res, heur: {"per_testbed": {}, "geomean": (g := next(scores)), "worst": g})
    model, vecnorm, history = policy_train.train(
        [("gaussian", "flow")], [5, 6], timesteps=384, n_envs=2, n_steps=64, batch_size=64, n_epochs=2, lr=1e-3,
        train_seeds=range(8), eval_seeds=range(20000, 20002), eval_every=64, progress=False, keep_best=True)
    assert len(snapshots) >= 5 and history["best"]["rmse_ratio_geomean"] == 0.7
    best_params, best_mean = snapshots[2]
    last_params, _ = snapshots[-1]
    assert any(not torch.equal(best_params[k], last_params[k]) for k in best_params)   # training moved on
    assert all(torch.equal(best_params[k], v) for k, v in model.policy.state_dict().items())
    assert np.array_equal(vecnorm.obs_rms.mean, best_mean)
    assert history["final"]["ratio"]["geomean"] == 0.7
    assert policy_train.episodes_to_final(history)["final_reward"] == pytest.approx(-np.log(0.7))


def test_keep_best_by_worst_cell(monkeypatch):
    """``select_by="worst-cell"`` keeps the evaluation whose worst cell is lowest, not the best geometric mean;
    an unknown criterion is refused."""
    pytest.importorskip("gymnasium")
    pytest.importorskip("stable_baselines3")
    from adaptive_core.tune import policy_train
    torch.set_num_threads(1)
    # (geomean, worst) per evaluation: the best geometric mean (0.6) has the worst cell 1.3; the lowest worst
    # cell (0.95) is at the fourth evaluation
    scores = iter([(0.9, 1.1), (0.6, 1.3), (0.8, 1.0), (0.85, 0.95), (0.7, 1.2)] + [(1.0, 1.5)] * 5)
    monkeypatch.setattr(policy_train, "ratio_summary",
                        lambda res, heur: dict(zip(("geomean", "worst"), next(scores)), per_testbed={}))
    _, _, history = policy_train.train(
        [("gaussian", "flow")], [5], timesteps=256, n_envs=2, n_steps=64, batch_size=64, n_epochs=1,
        train_seeds=range(4), eval_seeds=range(20000, 20002), eval_every=64, progress=False, keep_best=True,
        select_by="worst-cell")
    assert history["best"]["rmse_ratio_worst"] == 0.95 and history["best"]["rmse_ratio_geomean"] == 0.85
    with pytest.raises(ValueError, match="select_by"):
        policy_train.train([("gaussian", "flow")], [5], timesteps=64, select_by="median")


def test_cell_weights_steer_the_episode_draw():
    """set_cell_weights: with mix 1 every episode draws the one weighted (configuration, budget) cell; with mix ½
    half the draws follow the default; bad weights are refused naming the cell; None restores the default."""
    pytest.importorskip("gymnasium")
    from adaptive_core.tune.policy_env import SamplingEnv
    env = SamplingEnv(testbeds=[("gaussian", "ve"), ("gaussian", "flow")], budgets=[5, 6], seeds=range(4))
    assert np.isclose(env.default_cell_probs().sum(), 1.0) and len(env.cells) == 4
    weights = {"gaussian-ve": {5: 0.0, 6: 0.0}, "gaussian-flow": {5: 0.0, 6: 3.0}}
    env.set_cell_weights(weights)
    draws = set()
    for i in range(12):
        _, info = env.reset(seed=i)
        draws.add((env.configs[info["config"]].key, info["budget"]))
    assert draws == {("gaussian-flow", 6)}
    env.set_cell_weights(weights, mix=0.5)
    assert env._cell_probs[env.cells.index((1, 6))] == pytest.approx(0.5 + 0.5 / 4)
    _, info = env.reset(options={"config": 0, "budget": 5})        # options still fix the cell
    assert (info["config"], info["budget"]) == (0, 5)
    with pytest.raises(ValueError, match="gaussian-ve.*budget 6"):
        env.set_cell_weights({"gaussian-ve": {5: 1.0}, "gaussian-flow": {5: 1.0, 6: 1.0}})
    with pytest.raises(ValueError, match="finite"):
        env.set_cell_weights({"gaussian-ve": {5: -1.0, 6: 1.0}, "gaussian-flow": {5: 1.0, 6: 1.0}})
    with pytest.raises(ValueError, match="all be 0"):
        env.set_cell_weights({k: {5: 0.0, 6: 0.0} for k in ("gaussian-ve", "gaussian-flow")})
    env.set_cell_weights(None)
    assert env._cell_probs is None
    env.close()


def test_worst_cell_weights_and_training_reweights_the_draw(monkeypatch):
    """worst_cell_weights is ratio ** sharpness relative to the worst cell; a training run with
    cell_sampling="worst-cell" hands each evaluation's weights to its environments and records them."""
    pytest.importorskip("gymnasium")
    pytest.importorskip("stable_baselines3")
    from adaptive_core.tune import policy_train
    w = policy_train.worst_cell_weights({"a": {5: 1.2, 8: 0.6}, "b": {5: 1.2 / 2 ** 0.5}}, sharpness=2.0)
    assert w["a"][5] == pytest.approx(1.0) and w["a"][8] == pytest.approx(0.25) and w["b"][5] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sharpness"):
        policy_train.worst_cell_weights({"a": {5: 1.0}}, sharpness=float("nan"))
    torch.set_num_threads(1)
    seen = []
    real_set = policy_train.SamplingEnv.set_cell_weights

    def recording_set(self, weights, mix=1.0):
        seen.append((weights, mix))
        real_set(self, weights, mix)

    monkeypatch.setattr(policy_train.SamplingEnv, "set_cell_weights", recording_set)
    _, _, history = policy_train.train(
        [("gaussian", "ve"), ("gaussian", "flow")], [5, 6], timesteps=128, n_envs=2, n_steps=64, batch_size=64,
        n_epochs=1, train_seeds=range(4), eval_seeds=range(20000, 20002), eval_every=64, progress=False,
        cell_sampling="worst-cell", cell_sharpness=4.0)
    assert len(history["cell_weights"]) == len(history["evals"]) >= 2
    assert len(seen) == 2 * len(history["evals"])                          # each env copy, each evaluation
    last = history["cell_weights"][-1]["weights"]
    assert max(v for cells in last.values() for v in cells.values()) == pytest.approx(1.0)
    assert seen[-1] == (last, policy_train.WORST_CELL_MIX)
    with pytest.raises(ValueError, match="cell_sampling"):
        policy_train.train([("gaussian", "flow")], [5], timesteps=64, cell_sampling="hardest")


class _Recording(_Constant):
    """A constant controller that acts only from ``min_lambda_progress`` on and records the rows it is asked."""

    def __init__(self, value, min_lambda_progress):
        super().__init__(value)
        self.min_lambda_progress, self.asked = min_lambda_progress, []

    def decide(self, obs):
        self.asked.append(np.array(obs))
        return super().decide(obs)


@pytest.mark.parametrize("model_type", ["ve", "flow"])
def test_policy_acts_only_from_min_lambda_progress(model_type):
    """Rows before ``min_lambda_progress`` of the λ-span are never handed to the policy and keep the heuristic's
    steps (the σ taken up to there are the heuristic's); later rows are the policy's."""
    tb = make_testbed("gaussian", model_type)
    x = tb.noise(range(3))
    grid = host_sigmas(tb, 10)
    heur_trace, trace = Trace(), Trace()
    sample_adaptive(tb, x, grid, model_type=model_type, trace=heur_trace, **LEGACY_BASE_PLAN)
    ctl = _Recording(-1.0, 0.3)
    sample_adaptive(tb, x, grid, model_type=model_type, controller=ctl, trace=trace)
    asked = np.concatenate(ctl.asked)
    assert len(asked) and asked[:, OBSERVATION_NAMES.index("lambda_progress")].min() >= 0.3
    decisions = [r.decision for r in trace.samples[0]]
    first_policy = decisions.index("policy")
    assert first_policy >= 1 and "policy" not in decisions[:first_policy]
    # up to the first policy decision the run is the heuristic's, then the short steps (a = −1) depart from it
    assert trace.sigmas_taken(0)[:first_policy + 1] == heur_trace.sigmas_taken(0)[:first_policy + 1]
    assert trace.sigmas_taken(0) != heur_trace.sigmas_taken(0)
    everywhere = _Recording(-1.0, 0.0)
    sample_adaptive(tb, x, grid, model_type=model_type, controller=everywhere)
    assert len(np.concatenate(everywhere.asked)) > len(asked)


def test_min_lambda_progress_in_the_manifest(tmp_path, tiny_training):
    """A manifest's min_lambda_progress reaches the loaded policy (0 when absent); one outside [0, 1) is refused;
    the trainer's export writes it; the env refuses a bad one."""
    assert load_policy(_write_policy(tmp_path / "a", _Tanh(), "plain")).min_lambda_progress == 0.0
    assert load_policy(_write_policy(tmp_path / "b", _Tanh(), "late", min_lambda_progress=0.25)).min_lambda_progress \
        == 0.25
    with pytest.raises(PolicyLoadError, match="min_lambda_progress"):
        Policy(_write_policy(tmp_path / "c", _Tanh(), "bad", min_lambda_progress=1.5))
    from adaptive_core.tune.policy_train import export_policy
    model, vecnorm, _, _ = tiny_training
    path = export_policy(model, vecnorm, tmp_path / "d" / "late.onnx", trained_on={"testbeds": ["gaussian-ve"]},
                         training={}, metrics={}, min_lambda_progress=0.2)
    assert load_policy(path).min_lambda_progress == 0.2
    from adaptive_core.tune.policy_env import SamplingEnv
    with pytest.raises(ValueError, match="min_lambda_progress"):
        SamplingEnv(testbeds=[("gaussian", "ve")], budgets=[5], seeds=range(2), min_lambda_progress=-0.1)


def test_env_decisions_start_at_min_lambda_progress():
    """With min_lambda_progress the env's episodes consist of the later decisions only."""
    pytest.importorskip("gymnasium")
    from adaptive_core.tune.policy_env import SamplingEnv
    kw = dict(testbeds=[("gaussian", "ve"), ("gaussian", "flow")], budgets=[5, 10], seeds=range(4))
    counts = {}
    for p0 in (0.0, 0.2):
        env = SamplingEnv(min_lambda_progress=p0, **kw)
        progress, steps = [], 0
        for i in range(8):
            obs, _ = env.reset(seed=i, options={"config": i % 2, "budget": 10})
            done = False
            while not done:
                progress.append(obs[OBSERVATION_NAMES.index("lambda_progress")])
                obs, _, done, _, _ = env.step(np.zeros(2, np.float32))
                steps += 1
        counts[p0] = steps
        assert min(progress) >= p0
        env.close()
    assert counts[0.2] < counts[0.0]


class _Capped(_Recording):
    """A constant controller with an early-step cap, as a loaded policy whose manifest has one; it records the rows
    it is asked."""

    def __init__(self, value, early_step_cap):
        super().__init__(value, 0.0)
        self.early_step_cap = early_step_cap


@pytest.mark.parametrize("model_type", ["ve", "flow"])
def test_sampler_caps_the_early_steps_of_a_capped_policy(model_type):
    """With early_step_cap (0.3, 0) the longest steps (a₀ = 1) are cut to the heuristic's on the decisions before
    30% of the λ-span: those decisions are still the policy's, the σ taken up to the first later decision are the
    heuristic's, and the run departs from it after; without the cap the first decision already departs."""
    tb = make_testbed("gaussian", model_type)
    x = tb.noise(range(1))
    grid = host_sigmas(tb, 10)
    runs, capped = {}, _Capped(1.0, (0.3, 0.0))
    for name, ctl in [("heuristic", None), ("capped", capped), ("uncapped", _Constant(1.0))]:
        runs[name] = Trace()
        base = dict(LEGACY_BASE_PLAN) if ctl is None else {}   # the heuristic on the plan the policy runs on
        sample_adaptive(tb, x, grid, model_type=model_type, controller=ctl, trace=runs[name], **base)
    heur = runs["heuristic"].sigmas_taken(0)
    assert runs["uncapped"].sigmas_taken(0)[:2] != heur[:2]
    progress = np.concatenate(capped.asked)[:, OBSERVATION_NAMES.index("lambda_progress")]
    n_early = int((progress < 0.3).sum())
    assert 1 <= n_early < len(progress) and (progress[:n_early] < 0.3).all()
    assert [r.decision for r in runs["capped"].samples[0][1:n_early + 1]] == ["policy"] * n_early
    assert runs["capped"].sigmas_taken(0)[:n_early + 1] == heur[:n_early + 1]
    assert runs["capped"].sigmas_taken(0) != heur


def test_early_step_cap_in_the_manifest(tmp_path, tiny_training):
    """A manifest's early_step_cap reaches the loaded policy (None when absent) and the sampler applies it: the run
    equals the uncapped file under :class:`EarlyStepCapPolicy`; a bad cap is refused; the trainer's export and the
    ensemble export write it, an ensemble of members trained under different caps is refused, and fine-tuning from
    a manifest reads its cap."""
    from adaptive_core.tune.policy_calibrate import EarlyStepCapPolicy
    plain = load_policy(_write_policy(tmp_path / "a", _Tanh(), "plain"))
    capped = load_policy(_write_policy(tmp_path / "b", _Tanh(), "capped",
                                       early_step_cap={"below_lambda_progress": 1.0, "max_step_action": -0.5}))
    assert plain.early_step_cap is None and capped.early_step_cap == (1.0, -0.5)
    tb = make_testbed("gaussian", "ve")
    x = tb.noise(range(3))
    grid = host_sigmas(tb, 8)
    outs = [sample_adaptive(tb, x, grid, model_type="ve", controller=c)
            for c in (capped, EarlyStepCapPolicy(plain, 1.0, -0.5), plain)]
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    for bad in ({"below_lambda_progress": 0.0, "max_step_action": 0.1}, {"below_lambda_progress": 0.2,
                "max_step_action": 2.0}, {"below_lambda_progress": 0.2}, "0.2,0.1"):
        with pytest.raises(PolicyLoadError, match="early_step_cap"):
            Policy(_write_policy(tmp_path / "c", _Tanh(), "bad", early_step_cap=bad))
    from adaptive_core.tune.policy_train import ensemble_main, export_policy, save_vecnorm_stats
    model, vecnorm, _, _ = tiny_training
    members = []
    for name, cap in [("m1", (0.2, 0.15)), ("m2", (0.2, 0.15)), ("m3", (0.25, 0.15))]:
        path = export_policy(model, vecnorm, tmp_path / "members" / f"{name}.onnx", trained_on={}, training={},
                             metrics={}, early_step_cap=cap)
        assert load_policy(path).early_step_cap == cap
        model.save(str(tmp_path / "members" / f"{name}.zip"))
        save_vecnorm_stats(vecnorm, tmp_path / "members" / f"{name}.vecnorm.npz")
        members.append(str(tmp_path / "members" / f"{name}.zip"))
    common = ["--members-dir", str(tmp_path / "members"), "--out-dir", str(tmp_path / "ens")]
    assert ensemble_main(["--members", ",".join(members[:2]), "--name", "ens", *common]) == 0
    assert load_policy(tmp_path / "ens" / "ens.json").early_step_cap == (0.2, 0.15)
    with pytest.raises(SystemExit):
        ensemble_main(["--members", ",".join(members), "--name", "mixed", *common])
    from adaptive_core.tune.policy_train import manifest_early_step_cap   # what `policy --init` keeps
    assert manifest_early_step_cap(tmp_path / "members" / "m3.json") == (0.25, 0.15)
    assert manifest_early_step_cap(tmp_path / "a" / "plain.json") is None
    with pytest.raises(ValueError, match="bad.json"):
        manifest_early_step_cap(tmp_path / "c" / "bad.json")


def test_env_applies_the_early_step_cap():
    """SamplingEnv(early_step_cap=(1, −1)) caps every step action at −1, so always answering +1 runs the same
    episode as always answering −1; without the cap the two differ."""
    pytest.importorskip("gymnasium")
    from adaptive_core.tune.policy_env import SamplingEnv
    kw = dict(testbeds=[("gaussian", "ve")], budgets=[8], seeds=range(4), reward_scale="none")
    for cap, same in [((1.0, -1.0), True), (None, False)]:
        env = SamplingEnv(early_step_cap=cap, **kw)
        episodes = []
        for a0 in (1.0, -1.0):
            obs, _ = env.reset(seed=3)
            done, steps, reward = False, 0, 0.0
            while not done:
                obs, reward, done, _, _ = env.step(np.array([a0, 0.0], np.float32))
                steps += 1
            episodes.append((steps, reward))
        env.close()
        assert (episodes[0] == episodes[1]) is same, (cap, episodes)
    with pytest.raises(ValueError, match="early_step_cap"):
        SamplingEnv(early_step_cap=(0.2, 3.0), **kw)


def test_ensemble_export_is_the_mean_of_its_members(tiny_training, tmp_path):
    """policy-ensemble: one ONNX whose actions are the mean of the members' SB3 deterministic actions, with the
    fallback range the intersection of theirs; fewer than two members or a missing statistics file is refused."""
    from adaptive_core.tune.policy_train import (export_ensemble, load_checkpoint, sb3_actions, save_vecnorm_stats)
    model, vecnorm, _, _ = tiny_training
    a = tmp_path / "a.zip"
    model.save(str(a))
    save_vecnorm_stats(vecnorm, a.with_suffix(".vecnorm.npz"))
    b_model, b_stats = load_checkpoint(a)
    with torch.no_grad():                                      # a second member that acts differently
        b_model.policy.action_net.weight.add_(0.5 * torch.randn_like(b_model.policy.action_net.weight))
    b = tmp_path / "b.zip"
    b_model.save(str(b))
    np.savez(b.with_suffix(".vecnorm.npz"), mean=vecnorm.obs_rms.mean + 0.1, var=vecnorm.obs_rms.var * 2.0,
             count=np.array(10.0), epsilon=np.array(vecnorm.epsilon), clip_obs=np.array(vecnorm.clip_obs))
    path = export_ensemble([a, b], tmp_path / "out" / "ens.onnx", trained_on={"testbeds": ["gaussian-ve"]},
                           training={}, metrics={})
    policy = load_policy(path)
    obs = (vecnorm.obs_rms.mean + np.random.default_rng(1).normal(size=(16, N_OBSERVATIONS))).astype(np.float32)
    members = [load_checkpoint(a), load_checkpoint(b)]
    each = [sb3_actions(m, st, obs) for m, st in members]
    assert not np.allclose(each[0], each[1], atol=1e-3)
    assert np.allclose(policy.act(obs), np.mean(each, axis=0), atol=1e-5)
    assert policy.manifest.training["members"] == ["a", "b"]
    for _, st in members:                                   # inside the intersection of the members' boxes
        std = np.maximum(np.sqrt(st.obs_rms.var), 0.05)
        assert (policy._lo >= st.obs_rms.mean - 6 * std - 1e-9).all()
        assert (policy._hi <= st.obs_rms.mean + 6 * std + 1e-9).all()
    with pytest.raises(ValueError, match="at least two"):
        export_ensemble([a], tmp_path / "one.onnx", trained_on={}, training={}, metrics={})
    a.with_suffix(".vecnorm.npz").unlink()
    with pytest.raises(FileNotFoundError, match="vecnorm"):
        load_checkpoint(a)


class _ProgressTeacher:
    """A teacher with a known, non-trivial rule: a shorter step early in the run and a longer one later
    (a₀ = 0.8·tanh(20·(λ-progress − 0.1)); the decisions' λ-progress spans about 0–0.35), a lower order early and
    a higher one later (a₁ = ±0.9)."""

    name, n_actions, action_scale, min_share = "rule", 2, float(np.log(4.0)), 0.02
    order_dead_zone, min_lambda_progress = 0.5, 0.0

    def decide(self, observation):
        p = np.asarray(observation)[:, OBSERVATION_NAMES.index("lambda_progress")]
        actions = np.stack([0.8 * np.tanh(20.0 * (p - 0.1)), np.where(p < 0.1, -0.9, 0.9)], 1)
        return actions, [None] * len(p)


def test_distilled_student_imitates_its_teacher_on_its_own_runs():
    """policy-distill: after the teacher's round and one DAgger round, the student's actions on the rows of its
    own sampling runs (fresh seeds) are close to the teacher's, far closer than an untrained student's."""
    from adaptive_core.tune.policy_distill import (ImitationRecorder, distill, imitation_error, new_student,
                                                   run_configurations, student_actions)
    from adaptive_core.tune.policy_env import configs_of
    torch.set_num_threads(1)
    teacher, configs = _ProgressTeacher(), configs_of([("gaussian", "ve"), ("gaussian", "flow")])
    student, history = distill(teacher, configs, [5, 6, 8], range(16), rounds=1, epochs=150, dagger_epochs=100,
                               lr=3e-3, hidden=(16, 16), log=lambda *_: None)
    assert [r["acting"] for r in history["rounds"]] == ["teacher", "student"]
    assert history["rounds"][1]["rows"] == history["rounds"][0]["rows"] + history["rounds"][1]["new_rows"]
    check = ImitationRecorder(teacher, act=lambda o: student_actions(student, o))
    run_configurations(check, configs, [6, 10], range(100, 108))
    obs, target = check.rows()
    assert len(obs) > 20 and np.std(target[:, 0]) > 0.2
    err = imitation_error(student, obs, target)
    untrained = imitation_error(new_student(obs, 2, (16, 16), seed=1), obs, target)
    assert err["step_action_rms_error"] < 0.25 * untrained["step_action_rms_error"]
    assert err["step_action_rms_error"] < 0.15
    assert err["order_decisions_differing"] < 0.2   # a₁ jumps at λ-progress 0.1: rows near it may differ


def test_distilled_policy_exports_loads_and_keeps_the_teachers_range(tiny_training, tmp_path):
    """The exported student: ONNX equal to the PyTorch student, the teacher's fallback range, action mapping and cap
    in its manifest, and usable as ``controller="policy:<path>"`` within the budget."""
    from adaptive_core.tune.policy_distill import distill, export_student, fit_student, student_actions
    from adaptive_core.tune.policy_env import configs_of
    torch.set_num_threads(1)
    teacher = load_policy(tiny_training[3])
    student, history = distill(teacher, configs_of([("gaussian", "ve")]), [5], range(4), rounds=1, epochs=2,
                               dagger_epochs=1, log=lambda *_: None)
    path = export_student(student, teacher, tmp_path / "student.onnx", training={"history": history}, metrics={})
    policy = load_policy(path)
    obs = (teacher._mean + np.random.default_rng(2).normal(size=(8, N_OBSERVATIONS))).astype(np.float32)
    assert np.allclose(policy.act(obs), student_actions(student, obs), atol=1e-5)
    assert np.allclose(policy._lo, teacher._lo) and np.allclose(policy._hi, teacher._hi)
    assert policy.action_scale == teacher.action_scale and policy.n_actions == teacher.n_actions
    tb = make_testbed("gaussian", "ve")
    model_calls = _Counting(tb)
    out = sample_adaptive(model_calls, tb.noise(range(2)), host_sigmas(tb, 5), nfe_budget=5, model_type="ve",
                          controller=f"policy:{path}")
    assert torch.isfinite(out).all() and model_calls.calls <= 5
    with pytest.raises(ValueError, match="as many target rows"):
        fit_student(student, obs, np.zeros((3, 2)), epochs=1)
    teacher.early_step_cap = (0.2, 0.15)                   # a teacher trained under a cap hands it on
    capped = export_student(student, teacher, tmp_path / "capped.onnx", training={}, metrics={})
    assert load_policy(capped).early_step_cap == (0.2, 0.15) and policy.early_step_cap is None


def test_oracle_grid_teacher_lands_on_its_grid_and_acts_as_the_policy_elsewhere():
    """OracleGridTeacher: sampling with it (through the imitation recorder, as policy-distill does) takes every
    sample exactly onto the oracle grid of the configuration and budget it was told; on a budget without a grid its
    actions are the policy's; a grid whose length does not match the budget is refused."""
    import json

    from adaptive_core.trace import Trace, replay_sigmas
    from adaptive_core.tune.policy_distill import ImitationRecorder, OracleGridTeacher
    from adaptive_core.tune.policy_env import Config, host_grid
    from adaptive_core.tune.policy_eval import REPO
    torch.set_num_threads(1)
    bench = json.loads((REPO / "docs" / "bench" / "results.json").read_text())["configs"]
    grids = {"gaussian-ve": {"5": {"sigmas": bench["gaussian-ve"]["methods"]["oracle"]["5"]["sigmas"]}}}
    policy = load_policy("ppo_ve_flow")
    teacher, config, tb = OracleGridTeacher(policy, grids), Config("gaussian", "ve"), make_testbed("gaussian", "ve")
    x = tb.noise(range(4))
    recorder = ImitationRecorder(teacher)
    recorder.set_context(config, 5, host_grid(tb, 5))
    trace = Trace()
    sample_adaptive(tb, x, host_grid(tb, 5), nfe_budget=5, model_type="ve", controller=recorder, trace=trace)
    want = np.array(grids["gaussian-ve"]["5"]["sigmas"])
    for b in range(4):
        assert np.allclose(replay_sigmas(trace, b).numpy(), want, rtol=1e-5)
    obs, target = recorder.rows()
    assert len(obs) == 4 * 3 and np.all(target[:, 1] == 0)   # 3 free decisions per sample; the heuristic order
    teacher.set_context(config, 6, host_grid(tb, 6))            # no grid at 6 calls: the policy's own actions
    assert np.array_equal(teacher.decide(obs)[0], policy.decide(obs)[0])
    with pytest.raises(ValueError, match="nonzero points"):
        OracleGridTeacher(policy, {"gaussian-ve": {"6": grids["gaussian-ve"]["5"]}}).set_context(
            config, 6, host_grid(tb, 6))
    # a grid step 0.05 short of the long-step order limit (1.5 in λ) is taught 0.15 short of it with a margin
    from adaptive_core.policy import OBSERVATION_NAMES
    from adaptive_core.schedules import half_log_snr, sigma_from_half_log_snr
    host = host_grid(tb, 5)
    start, end = half_log_snr(float(host[0]), "ve"), half_log_snr(float(host[-2]), "ve")
    lams = [start, start + 1.45, start + 3.0, start + 4.0, end]
    edge_grid = {"gaussian-ve": {"5": {"sigmas": [sigma_from_half_log_snr(v, "ve") for v in lams] + [0.0]}}}
    row = np.array(obs[:1], dtype=np.float64)
    row[0, OBSERVATION_NAMES.index("lambda_progress")] = 0.0      # at the first point, after one call of five
    row[0, OBSERVATION_NAMES.index("budget_used")] = 0.2
    row[0, OBSERVATION_NAMES.index("log_base_share")] = np.log(1.0 / (end - start))   # planned: a step of 1
    for margin, step in ((0.0, 1.45), (0.15, 1.35)):
        edge_teacher = OracleGridTeacher(policy, edge_grid, order_margin=margin)
        edge_teacher.set_context(config, 5, host)
        assert edge_teacher.decide(row)[0][0, 0] == pytest.approx(np.log(step) / np.log(4.0), abs=1e-6)
    with pytest.raises(ValueError, match="order_margin"):
        OracleGridTeacher(policy, edge_grid, order_margin=-0.1)


def test_policy_distill_cli_refuses_bad_arguments(tiny_training, tmp_path):
    from adaptive_core.tune.policy_distill import main
    with pytest.raises(SystemExit):
        main(["--teacher", str(tiny_training[3]), "--name", "x", "--out-dir", str(tmp_path), "--seeds", "0"])
    with pytest.raises(SystemExit):
        main(["--teacher", str(tiny_training[3]), "--name", "x", "--out-dir", str(tmp_path), "--budgets", "0,5"])
    with pytest.raises(PolicyLoadError):
        main(["--teacher", str(tmp_path / "missing.json"), "--name", "x", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--teacher", str(tiny_training[3]), "--name", "x", "--out-dir", str(tmp_path), "--oracle-grids",
              str(tmp_path / "missing.json")])
    (tmp_path / "grids.json").write_text('{"configs": {"mnist_unet-ve-cfg1": {"5": {"sigmas": [1, 0]}}}}')
    with pytest.raises(SystemExit):     # the tiny policy was trained on gaussian-ve only: no grid applies
        main(["--teacher", str(tiny_training[3]), "--name", "x", "--out-dir", str(tmp_path), "--oracle-grids",
              str(tmp_path / "grids.json")])


def test_fine_tuning_starts_from_a_policy_manifest(tiny_training, tmp_path):
    """``policy --init <manifest>.json``: the bundled policy's (and a trained policy's) ONNX actor and observation
    statistics go into a fresh PPO model whose deterministic actions equal the ONNX policy's, and their critics
    load from their training state; a graph that is not one actor (here a hand-made one) is refused; a tiny
    fine-tune from a manifest runs and exports."""
    from pathlib import Path

    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    from adaptive_core.tune.policy_train import (FINE_TUNE_CRITIC_WARMUP, load_policy_actor, load_training_state,
                                                 make_vec_env, policy_actor_weights, sb3_actions, train)
    torch.set_num_threads(1)
    bundled = Path(__file__).resolve().parents[1] / "policies" / "ppo_ve_flow.json"
    for path in (bundled, tiny_training[3]):
        venv = make_vec_env([("gaussian", "ve")], [5], range(4), 1, "dummy", 0.1, 0)
        vecnorm = VecNormalize(venv, norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=1.0)
        width = int(policy_actor_weights(path)["policy_net.0.weight"].shape[0])   # bundled 128, tiny 64
        model = PPO("MlpPolicy", vecnorm, n_steps=64, batch_size=64, device="cpu",
                    policy_kwargs=dict(net_arch=dict(pi=[width, width], vf=[width, width])))
        policy = load_policy(path)
        probe = (policy._mean + policy._std * np.random.default_rng(3).normal(size=(32, N_OBSERVATIONS)))
        assert not np.allclose(sb3_actions(model, vecnorm, probe.astype(np.float32)), policy.act(probe), atol=1e-3)
        load_policy_actor(model, vecnorm, path)
        assert np.allclose(sb3_actions(model, vecnorm, probe.astype(np.float32)), policy.act(probe), atol=1e-4)
        assert load_training_state(model, path) == policy.manifest.training_state != {}   # both carry a critic
        venv.close()
    with pytest.raises(ValueError, match="not a single-actor policy graph"):
        load_policy_actor(model, vecnorm, _write_policy(tmp_path / "hand", _Tanh(2), kind="share_and_order"))
    model, vecnorm, history = train([("gaussian", "ve")], [5], timesteps=64, n_envs=1, n_steps=64, batch_size=64,
                                    n_epochs=1, train_seeds=range(4), eval_seeds=range(20000, 20002),
                                    eval_every=10 ** 9, progress=False, init=tiny_training[3])
    assert model.num_timesteps >= 64 and history["evals"]
    # with its critic loaded no warm-up by default; a manifest without one warms the critic up first
    assert history["training_state"] and history["critic_warmup"] == 0
    _, _, bare = train([("gaussian", "ve")], [5], timesteps=64, n_envs=1, n_steps=64, batch_size=64, n_epochs=1,
                       train_seeds=range(4), eval_seeds=range(20000, 20002), eval_every=10 ** 9, progress=False,
                       init=_copy_policy(tiny_training[3], tmp_path / "bare", drop_state=True))
    assert not bare["training_state"] and bare["critic_warmup"] == FINE_TUNE_CRITIC_WARMUP


def test_critic_warmup_keeps_the_actor_frozen(tiny_training):
    """``critic_warmup``: while the first decisions run only the critic learns, so a run that ends inside the
    warm-up leaves the copied actor and its action noise exactly as loaded (while the critic, loaded from the
    policy's training state, moves); without warm-up the same run changes them."""
    from safetensors.torch import load_file

    from adaptive_core.tune.policy_train import policy_actor_weights, train
    torch.set_num_threads(1)
    loaded = policy_actor_weights(tiny_training[3])
    kw = dict(timesteps=128, n_envs=2, n_steps=64, batch_size=64, n_epochs=2, train_seeds=range(4),
              eval_seeds=range(20000, 20002), eval_every=10 ** 9, progress=False, init=tiny_training[3],
              log_std_init=-1.0)

    def unchanged(model):
        return (np.allclose(model.policy.action_net.weight.detach().numpy(), loaded["action_net.weight"])
                and np.allclose(model.policy.mlp_extractor.policy_net[0].weight.detach().numpy(),
                                loaded["policy_net.0.weight"])
                and np.allclose(model.policy.log_std.detach().numpy(), [-1.0, -0.7]))
    # a warm-up as long as the run: the update after its last rollout must still leave the actor alone
    frozen, _, history = train([("gaussian", "ve")], [5], critic_warmup=128, **kw)
    assert history["critic_warmup"] == 128 and unchanged(frozen)
    assert all(p.requires_grad for p in frozen.policy.parameters())          # unfrozen again after the run
    critic = load_file(str(tiny_training[3].parent / load_policy(tiny_training[3]).manifest.training_state["file"]))
    assert any(not torch.equal(p.detach(), critic[n]) for n, p in frozen.policy.named_parameters() if n in critic)
    moved, _, _ = train([("gaussian", "ve")], [5], critic_warmup=0, **kw)
    assert not unchanged(moved)
    with pytest.raises(ValueError, match="critic_warmup"):
        train([("gaussian", "ve")], [5], critic_warmup=-1, **kw)


def test_target_kl_stops_an_update_early(tiny_training):
    """``target_kl``: once an update's approximate KL passes 1.5 × target_kl, its remaining epochs are skipped
    (one epoch done instead of two here), and the KL of each update is kept in the history."""
    from adaptive_core.tune.policy_train import train
    torch.set_num_threads(1)
    kw = dict(timesteps=128, n_envs=2, n_steps=64, batch_size=64, n_epochs=2, train_seeds=range(4),
              eval_seeds=range(20000, 20002), eval_every=10 ** 9, progress=False, init=tiny_training[3],
              log_std_init=-1.0)
    full, _, history = train([("gaussian", "ve")], [5], **kw)
    stopped, _, _ = train([("gaussian", "ve")], [5], target_kl=1e-9, **kw)
    assert full._n_updates == 2 and stopped._n_updates == 1
    assert history["updates"][-1]["approx_kl"] > 0
    with pytest.raises(ValueError, match="target_kl"):
        train([("gaussian", "ve")], [5], target_kl=0.0, **kw)


def _ppo_for(vec_kwargs=None, hidden=64):
    """A fresh PPO model (and its VecNormalize) on the gaussian ve testbed, 2 actions, hidden×hidden MLPs."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    from adaptive_core.tune.policy_train import make_vec_env
    venv = make_vec_env([("gaussian", "ve")], [5], range(4), 1, "dummy", 0.1, 0)
    vecnorm = VecNormalize(venv, norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=1.0)
    model = PPO("MlpPolicy", vecnorm, n_steps=64, batch_size=64, device="cpu",
                policy_kwargs=dict(net_arch=dict(pi=[hidden, hidden], vf=[hidden, hidden])))
    return model, vecnorm


def _copy_policy(manifest_path, folder, drop_state=False):
    """Copy a policy's manifest, ONNX and training state files into ``folder``; returns the new manifest path."""
    import json
    import shutil
    folder.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(manifest_path.read_text())
    shutil.copy(manifest_path.parent / manifest["onnx_file"], folder / manifest["onnx_file"])
    if manifest.get("training_state") and not drop_state:
        shutil.copy(manifest_path.parent / manifest["training_state"]["file"],
                    folder / manifest["training_state"]["file"])
    if drop_state:
        manifest["training_state"] = {}
    out = folder / manifest_path.name
    out.write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def test_exported_policy_carries_its_critic(tiny_training, tmp_path):
    """``export_policy`` writes the PPO critic next to the actor (safetensors, sha256 in the manifest);
    ``load_training_state`` puts exactly those weights into a fresh PPO model; a policy without one gives None;
    a missing, altered or ill-fitting file is refused by name; sampling never reads it."""
    from adaptive_core.tune.policy_train import CRITIC_PARAMETER_PREFIXES, load_training_state
    torch.set_num_threads(1)
    trained, _, _, path = tiny_training
    entry = load_policy(path).manifest.training_state
    assert entry["file"].endswith(".training_state.safetensors") and len(entry["sha256"]) == 64
    model, vecnorm = _ppo_for()
    assert load_training_state(model, path) == entry
    want = {n: p for n, p in trained.policy.named_parameters() if n.startswith(CRITIC_PARAMETER_PREFIXES)}
    got = dict(model.policy.named_parameters())
    assert len(want) == 6 and all(torch.equal(got[n].detach(), p.detach()) for n, p in want.items())
    assert load_training_state(model, _copy_policy(path, tmp_path / "none", drop_state=True)) is None
    altered = _copy_policy(path, tmp_path / "altered")
    state_file = altered.parent / entry["file"]
    state_file.write_bytes(state_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        load_training_state(model, altered)
    state_file.unlink()
    with pytest.raises(ValueError, match="missing"):
        load_training_state(model, altered)
    narrow, _ = _ppo_for(hidden=32)
    with pytest.raises(ValueError, match="do not fit"):
        load_training_state(narrow, path)
    vecnorm.close()
    tb = make_testbed("gaussian", "ve")
    out = sample_adaptive(tb, tb.noise(range(2)), host_sigmas(tb, 5), nfe_budget=5, model_type="ve",
                          controller=f"policy:{altered}")             # its training state file is gone
    assert torch.isfinite(out).all()


def test_policy_critic_fits_a_critic_and_keeps_the_actor(tiny_training, tmp_path):
    """``policy-critic`` on a policy without a critic: only the critic learns (the ONNX actor, its sha256 and
    its actions stay), the manifest then names the new training state, which a fine-tune loads; the command
    refuses bad arguments and a reward it cannot know; the bundled policy's NFE weight is read from its record."""
    from adaptive_core.tune.policy_critic import fit_critic, main, recorded_nfe_weight
    from adaptive_core.tune.policy_train import load_training_state
    torch.set_num_threads(1)
    path = _copy_policy(tiny_training[3], tmp_path / "p", drop_state=True)
    before = load_policy(path)
    probe = (before._mean + before._std * np.random.default_rng(5).normal(size=(16, N_OBSERVATIONS)))
    actions, sha = before.act(probe), before.manifest.sha256
    entry, history = fit_critic(path, [("gaussian", "ve")], [5], timesteps=256, nfe_weight=0.1, n_envs=2,
                                n_steps=64, batch_size=64, eval_seeds=range(20000, 20002), progress=False)
    after = Policy(path)
    assert after.manifest.sha256 == sha and np.array_equal(after.act(probe), actions)
    assert after.manifest.training_state == entry and entry["critic_fit"]["decisions"] == 256
    assert [u["timesteps"] for u in history["updates"]] == [128, 256]  # one update per rollout of 2 × 64 decisions
    assert all(np.isfinite(u["explained_variance"]) and u["approx_kl"] >= 0 for u in history["updates"])
    model, vecnorm = _ppo_for()
    assert load_training_state(model, path)["sha256"] == entry["sha256"]
    vecnorm.close()
    with pytest.raises(SystemExit):
        main(["--policy", str(path), "--timesteps", "0"])
    with pytest.raises(SystemExit):                                   # tiny's record has no NFE weight
        main(["--policy", str(path), "--timesteps", "64", "--no-progress"])
    from pathlib import Path
    bundled = Path(__file__).resolve().parents[1] / "policies" / "ppo_ve_flow.json"
    assert recorded_nfe_weight(load_policy(bundled).manifest) == pytest.approx(0.115)


def test_fine_tuning_from_a_checkpoint_uses_the_given_seed(tiny_training, tmp_path):
    """``policy --init <zip> --seed N``: PPO.load re-seeds with the checkpoint's own seed, so the run re-seeds
    with N afterwards; two seeds give different episodes, the same seed the same ones."""
    from adaptive_core.tune.policy_train import save_vecnorm_stats, train
    torch.set_num_threads(1)
    model, vecnorm, _, _ = tiny_training
    zip_path = tmp_path / "tiny.zip"
    model.save(str(zip_path))
    save_vecnorm_stats(vecnorm, zip_path.with_suffix(".vecnorm.npz"))
    kw = dict(timesteps=64, n_envs=1, n_steps=64, batch_size=64, n_epochs=1, train_seeds=range(64),
              eval_seeds=range(20000, 20002), eval_every=10 ** 9, progress=False, init=zip_path)
    runs = [train([("gaussian", "ve"), ("gaussian", "flow")], [5, 6], seed=s, **kw)[2]["episodes"] for s in (0, 1, 0)]
    assert runs[0] == runs[2] and runs[0] != runs[1]


def test_paired_environments_run_the_same_episodes():
    """``make_vec_env(paired=True)``: copies 2j and 2j + 1 draw the same configuration, noise seed and budget for
    their k-th episodes whatever actions they take; the two pairs draw different sequences; an odd count is
    refused."""
    pytest.importorskip("stable_baselines3")
    from adaptive_core.tune.policy_train import make_vec_env
    torch.set_num_threads(1)
    venv = make_vec_env([("gaussian", "flow"), ("gmm_digits", "ve")], [5, 6, 8], range(64), 4, "dummy", 0.1, 3,
                        paired=True)
    venv.reset()
    rng = np.random.default_rng(0)
    ended = {e: [] for e in range(4)}
    for _ in range(48):
        _, _, dones, infos = venv.step(rng.uniform(-1, 1, (4, 2)).astype(np.float32))
        for e, info in enumerate(infos):
            if dones[e]:
                ended[e].append((info["episode_index"], info["config"], info["noise_seed"], info["budget"]))
    venv.close()
    for a, b in ((0, 1), (2, 3)):
        n = min(len(ended[a]), len(ended[b]))
        assert n >= 5 and ended[a][:n] == ended[b][:n]
    assert [k[0] for k in ended[0]] == list(range(len(ended[0])))
    assert ended[0][:5] != ended[2][:5]
    with pytest.raises(ValueError, match="even number"):
        make_vec_env([("gaussian", "flow")], [5], range(4), 3, "dummy", 0.1, 0, paired=True)


def test_paired_advantage_is_the_return_minus_the_twins():
    """:class:`PairedEpisodes`: every decision of an episode gets R − R' (its twin's return), divided by the
    root mean square over the paired decisions; decisions whose episode or twin has not ended get 0 and keep SB3's critic
    target; a twin that ends in a later rollout pairs up then."""
    from adaptive_core.tune.policy_train import PairedEpisodes
    paired = PairedEpisodes(2)
    paired.start_rollout(4)
    # env 0: episode 0 on rows 0-1 (return 1.0), episode 1 on rows 2-3 (not ended)
    # env 1: episode 0 on rows 0-2 (return 0.4), episode 1 on row 3 (return 0.9)
    paired.record(0, [{"episode_index": 0}, {"episode_index": 0}], [0.0, 0.0], [False, False])
    paired.record(1, [{"episode_index": 0}, {"episode_index": 0}], [1.0, 0.0], [True, False])
    paired.record(2, [{"episode_index": 1}, {"episode_index": 0}], [0.0, 0.4], [False, True])
    paired.record(3, [{"episode_index": 1}, {"episode_index": 1}], [0.0, 0.9], [False, True])
    sb3 = np.full((4, 2), 7.0)
    adv, targets, mask = paired.advantages(sb3)
    assert mask.tolist() == [[True, True], [True, True], [False, True], [False, False]]
    raw = np.array([[0.6, -0.6], [0.6, -0.6], [0.0, -0.6], [0.0, 0.0]])
    np.testing.assert_allclose(adv, raw / np.sqrt(np.mean(raw[mask] ** 2)))
    np.testing.assert_allclose(targets, [[1.0, 0.4], [1.0, 0.4], [7.0, 0.4], [7.0, 7.0]])
    assert set(paired.returns) == {(1, 1)}          # the used pair is forgotten, the unmatched one kept
    paired.start_rollout(2)
    paired.record(0, [{"episode_index": 1}, {"episode_index": 2}], [0.5, 0.0], [True, False])
    paired.record(1, [{"episode_index": 2}, {"episode_index": 2}], [0.0, 0.0], [False, False])
    adv, targets, mask = paired.advantages(np.zeros((2, 2)))
    assert mask.tolist() == [[True, False], [False, False]] and adv.tolist() == [[-1.0, 0.0], [0.0, 0.0]]
    assert targets[0, 0] == 0.5
    with pytest.raises(ValueError, match="even number"):
        PairedEpisodes(3)


def test_training_with_the_paired_baseline(tiny_training):
    """``train(baseline="pairs")``: the update uses :class:`PairedEpisodes`' advantages (0 on the unpaired
    decisions, unit root mean square on the others; SB3's own normalisation off) and the history says how many decisions
    were paired; an odd number of environments or a re-weighted draw is refused."""
    from adaptive_core.tune.policy_train import train
    torch.set_num_threads(1)
    kw = dict(timesteps=128, n_envs=2, n_steps=64, batch_size=64, n_epochs=1, train_seeds=range(8),
              eval_seeds=range(20000, 20002), eval_every=10 ** 9, progress=False, init=tiny_training[3],
              baseline="pairs")
    model, _, history = train([("gaussian", "ve"), ("gaussian", "flow")], [5, 6], **kw)
    assert model.normalize_advantage is False
    (_, share), = history["paired_share"]
    adv = model.rollout_buffer.advantages
    assert 0.5 < share < 1.0 and (adv != 0).mean() == pytest.approx(share)
    assert np.sqrt(np.mean(adv[adv != 0] ** 2)) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="even number"):
        train([("gaussian", "ve")], [5], **{**kw, "n_envs": 3})
    with pytest.raises(ValueError, match="default cell draw"):
        train([("gaussian", "ve")], [5], cell_sampling="worst-cell", **kw)


def test_tune_actor_head_keeps_the_hidden_layers(tiny_training):
    """``tune_actor="head"``: fine-tuning moves the actor's output layer (and noise) but not its hidden layers,
    and the critic still learns; an unknown choice is refused."""
    from adaptive_core.tune.policy_train import train
    torch.set_num_threads(1)
    kw = dict(n_envs=2, n_steps=64, batch_size=64, n_epochs=2, train_seeds=range(8), eval_seeds=range(20000, 20002),
              eval_every=10 ** 9, progress=False, init=tiny_training[3], log_std_init=-1.0)
    start = train([("gaussian", "ve")], [5], timesteps=0, **kw)[0].policy.state_dict()   # as loaded
    model, _, _ = train([("gaussian", "ve")], [5], timesteps=128, tune_actor="head", **kw)
    after = model.policy.state_dict()
    moved = {k for k in after if not torch.equal(after[k], start[k])}
    assert not any(k.startswith("mlp_extractor.policy_net") for k in moved)
    assert any(k.startswith("action_net") for k in moved) and any(k.startswith("value_net") for k in moved)
    assert all(p.requires_grad for p in model.policy.parameters())   # released after training
    with pytest.raises(ValueError, match="tune_actor"):
        train([("gaussian", "ve")], [5], timesteps=128, tune_actor="trunk", **kw)


def test_tune_actor_bias_moves_only_the_output_bias(tiny_training):
    """``tune_actor="bias"``: of the actor, only the output layer's bias (one offset per action) and the action
    noise learn; the critic still learns."""
    from adaptive_core.tune.policy_train import train
    torch.set_num_threads(1)
    kw = dict(n_envs=2, n_steps=64, batch_size=64, n_epochs=2, train_seeds=range(8), eval_seeds=range(20000, 20002),
              eval_every=10 ** 9, progress=False, init=tiny_training[3], log_std_init=-1.0)
    start = train([("gaussian", "ve")], [5], timesteps=0, **kw)[0].policy.state_dict()
    model, _, _ = train([("gaussian", "ve")], [5], timesteps=128, tune_actor="bias", **kw)
    after = model.policy.state_dict()
    moved = {k for k in after if not torch.equal(after[k], start[k])}
    assert {"action_net.bias", "log_std"} <= moved
    assert not any(k.startswith("mlp_extractor.policy_net") or k == "action_net.weight" for k in moved)
    assert any(k.startswith("value_net") for k in moved)


def test_step_offset_policy_shifts_only_decided_steps(tiny_training):
    """``StepOffsetPolicy`` adds its offset to a₀ of the rows the policy decides, clipped to [−1, 1]; a row out of
    the training range keeps the heuristic's action 0; a non-finite offset is refused."""
    from adaptive_core.tune.policy_calibrate import StepOffsetPolicy
    policy = load_policy(tiny_training[3])
    rows = policy._mean + policy._std * np.random.default_rng(1).normal(size=(8, N_OBSERVATIONS))
    rows[3, 0] = policy._mean[0] + 100 * policy._std[0]            # out of range: falls back
    base, reasons = policy.decide(rows)
    shifted, reasons2 = StepOffsetPolicy(policy, 0.3).decide(rows)
    assert reasons2 == reasons and reasons[3] is not None
    ok = np.array([r is None for r in reasons])
    assert np.allclose(shifted[ok, 0], np.clip(base[ok, 0] + 0.3, -1, 1))
    assert np.array_equal(shifted[:, 1:], base[:, 1:]) and np.all(shifted[3] == 0)
    assert StepOffsetPolicy(policy, 0.3).min_lambda_progress == policy.min_lambda_progress
    with pytest.raises(ValueError, match="finite"):
        StepOffsetPolicy(policy, float("nan"))


def test_early_step_cap_limits_only_early_longer_steps(tiny_training):
    """``EarlyStepCapPolicy`` lowers a₀ to the cap on decided rows before the λ-progress limit, leaves shorter
    steps, later rows, the order action and fallback rows alone, and refuses a bad limit."""
    from adaptive_core.policy import LAMBDA_PROGRESS_INDEX
    from adaptive_core.tune.policy_calibrate import EarlyStepCapPolicy
    policy = load_policy(tiny_training[3])
    rows = policy._mean + policy._std * np.random.default_rng(2).normal(size=(32, N_OBSERVATIONS))
    rows[:, LAMBDA_PROGRESS_INDEX] = np.linspace(0.0, 0.6, 32)
    rows[1, 0] = policy._mean[0] + 100 * policy._std[0]            # out of range: falls back
    base, reasons = policy.decide(rows)
    capped, reasons2 = EarlyStepCapPolicy(policy, 0.3, -0.05).decide(rows)
    assert reasons2 == reasons and reasons[1] is not None and np.all(capped[1] == 0)
    early = (rows[:, LAMBDA_PROGRESS_INDEX] < 0.3) & np.array([r is None for r in reasons])
    assert np.allclose(capped[early, 0], np.minimum(base[early, 0], -0.05))
    assert np.array_equal(capped[~early, 0], base[~early, 0]) and np.array_equal(capped[:, 1:], base[:, 1:])
    assert (base[early, 0] > -0.05).any() and (capped[early, 0] < base[early, 0]).any()   # the cap bites
    for bad in [(0.0, 0.1), (1.5, 0.1), (0.2, 1.5), (0.2, float("nan"))]:
        with pytest.raises(ValueError, match="must be in"):
            EarlyStepCapPolicy(policy, *bad)


def test_choose_offset_takes_the_parabola_peak():
    from adaptive_core.tune.policy_calibrate import choose_offset
    x = np.array([-0.1, -0.05, 0.0, 0.05, 0.1])
    assert choose_offset(x, 1 - (x + 0.03) ** 2) == (pytest.approx(-0.03), "parabola peak")
    assert choose_offset(x, 1 - (x - 0.5) ** 2)[0] == pytest.approx(0.1)          # peak outside: the range's end
    assert choose_offset(x, (x - 0.02) ** 2) == (pytest.approx(-0.1), "best candidate")   # no maximum
    assert choose_offset([0.0, 0.1], [0.2, 0.1]) == (0.0, "best candidate")


def test_paired_returns_equal_the_env_episode_returns(tiny_training):
    """The search's batched returns are the training environment's: each image, run as one env episode with
    the offset policy's actions, gets the same reward; every offset runs the same images."""
    pytest.importorskip("gymnasium")
    from adaptive_core.tune.policy_calibrate import StepOffsetPolicy, draw_images, paired_returns
    from adaptive_core.tune.policy_env import SamplingEnv
    torch.set_num_threads(1)
    policy = load_policy(tiny_training[3])
    env = SamplingEnv([("gaussian", "ve"), ("gaussian", "flow")], [5, 6], seeds=range(8), nfe_weight=0.1,
                      reward_scale="none")
    images = draw_images(env, 5, np.random.default_rng(0))
    assert len(set(images)) == 5
    offsets = [-0.2, 0.0, 0.2]
    returns = paired_returns(policy, env, images, offsets)
    assert returns.shape == (3, 5) and np.isfinite(returns).all()
    for j, offset in enumerate(offsets):
        decider = StepOffsetPolicy(policy, offset)
        for i, (k, seed, budget) in enumerate(images):
            obs, _ = env.reset(options={"config": k, "noise_seed": seed, "budget": budget})
            done = False
            while not done:
                action, _ = decider.decide(obs.reshape(1, -1).astype(np.float64))
                obs, _, done, _, info = env.step(action[0].astype(np.float32))
            assert info["reward_raw"] == pytest.approx(returns[j, i], rel=1e-4, abs=1e-6)
    env.close()
    with pytest.raises(ValueError, match="training pool has"):
        draw_images(env, 10 ** 6, np.random.default_rng(0))


def test_policy_calibrate_writes_the_offset_policy(tiny_training, tmp_path):
    """``policy-calibrate`` end to end on a tiny search: the written graph's actions are the source's with the
    chosen offset on a₀; its manifest records the search and names a copy of the critic, which a fine-tune
    loads; the before/after evaluation is that of the two policies; bad arguments are refused."""
    from adaptive_core.tune.policy_calibrate import main
    from adaptive_core.tune.policy_train import load_training_state
    torch.set_num_threads(1)
    src = _copy_policy(tiny_training[3], tmp_path / "src")
    out_dir = tmp_path / "out"
    assert main(["--policy", str(src), "--testbeds", "gaussian:ve", "--budgets", "5", "--episodes", "6",
                 "--offsets=-0.2,0,0.2", "--eval-seeds", "4", "--nfe-weight", "0.1", "--name", "cal", "--scan-eval",
                 "--out-dir", str(out_dir)]) == 0
    record = json.loads((out_dir / "cal_calibration.json").read_text())
    assert record["episodes"] == 6 and len(record["images"]) == 2 and len(record["mean_returns"]) == 3
    assert -0.2 <= record["chosen_offset"] <= 0.2 and (out_dir / "cal_calibration.png").stat().st_size > 0
    new, old = load_policy(out_dir / "cal.json"), load_policy(src)
    rows = old._mean + old._std * np.random.default_rng(2).normal(size=(32, N_OBSERVATIONS))
    want = old.act(rows)
    assert record["written_offset"] == (0.0 if record["kept_source"] else record["chosen_offset"])
    assert record["kept_source"] == (record["eval_after"]["rmse_ratio_geomean"]
                                     > record["eval_before"]["rmse_ratio_geomean"])
    want[:, 0] = np.clip(want[:, 0] + record["written_offset"], -1, 1)
    assert np.allclose(new.act(rows), want, atol=1e-5)
    assert new.manifest.training["calibration"]["chosen_offset"] == record["chosen_offset"]
    assert new.manifest.training_state["file"] == "cal.training_state.safetensors"
    model, vecnorm = _ppo_for()
    assert load_training_state(model, out_dir / "cal.json") is not None
    vecnorm.close()
    from adaptive_core.tune.policy_env import evaluate_controller
    from adaptive_core.tune.policy_train import ratio_summary
    seeds = list(range(20000, 20004))
    heur = evaluate_controller(None, [("gaussian", "ve")], [5], seeds)
    from adaptive_core.tune.policy_calibrate import StepOffsetPolicy
    after = ratio_summary(evaluate_controller(StepOffsetPolicy(old, record["chosen_offset"]), [("gaussian", "ve")],
                                              [5], seeds), heur)
    assert record["eval_after"]["rmse_ratio_geomean"] == pytest.approx(after["geomean"], rel=1e-4)
    assert record["eval_reward_by_offset"]["0"] == pytest.approx(record["eval_before"]["eval_reward"], rel=1e-6)
    written = ratio_summary(evaluate_controller(new, [("gaussian", "ve")], [5], seeds), heur)["geomean"]
    assert written == pytest.approx(min(after["geomean"], record["eval_before"]["rmse_ratio_geomean"]), rel=1e-4)
    for bad in (["--episodes", "2"], ["--offsets=0"], ["--offsets=-2,0,2"], ["--testbeds", "gaussian"]):
        args = ["--policy", str(src), "--testbeds", "gaussian:ve", "--nfe-weight", "0.1", "--name", "x",
                "--out-dir", str(out_dir), *bad]
        with pytest.raises(SystemExit):
            main(args)
    with pytest.raises(ValueError, match="overwrite"):
        from adaptive_core.tune.policy_calibrate import write_offset_policy
        write_offset_policy(src, 0.1, src.parent / load_policy(src).manifest.onnx_file, {})


def test_policy_runs_on_the_plan_it_was_trained_on(tmp_path, hand_policy):
    """A manifest without ``action.base_plan`` runs on the data-prediction ρ plan every policy so far was trained on,
    also where the heuristic now plans flow models in shifted time; options the caller sets win; a manifest's own
    base_plan is used; a malformed one is refused."""
    tb = make_testbed("gaussian", "flow")
    x, grid = tb.noise(range(2)), host_sigmas(tb, 6)

    def options(**kw):
        trace = Trace()
        sample_adaptive(tb, x, grid, model_type="flow", trace=trace, **kw)
        return trace.options["prediction"], trace.options["flow_shift"]
    assert options() == ("hybrid", tb.shift)                                    # the heuristic's flow plan
    assert options(controller=f"policy:{hand_policy}") == ("data", None)      # LEGACY_BASE_PLAN
    assert options(controller=f"policy:{hand_policy}", prediction="noise") == ("noise", None)
    from adaptive_core.policy import AUTO_PLAN_RULE
    newer = _write_policy(tmp_path / "n", _Tanh(), "newer", base_plan={"prediction": "auto", "flow_shift": "auto"},
                          auto_plan_rule=AUTO_PLAN_RULE)
    assert options(controller=f"policy:{newer}") == ("hybrid", tb.shift)
    # trained when "auto" meant another plan (or saying nothing): refused, and a run falls back to the heuristic
    for rule in ({"auto_plan_rule": "an-older-rule"}, {}):
        stale = _write_policy(tmp_path / "s", _Tanh(), "stale", base_plan={"prediction": "auto"}, **rule)
        with pytest.raises(PolicyLoadError, match="'auto' rule"):
            Policy(stale)
    with pytest.warns(UserWarning, match="policy unavailable"):
        assert options(controller=f"policy:{stale}") == ("hybrid", tb.shift)
    bad = _write_policy(tmp_path / "b", _Tanh(), "bad", base_plan={"schedule": "host"})
    with pytest.raises(PolicyLoadError, match="base_plan"):
        Policy(bad)


def test_a_policy_keeps_the_order_it_was_trained_at_on_a_guided_run(tmp_path, hand_policy):
    """Above CFG 2 the heuristic runs order 2 (``resolve_max_order``), but a policy runs at the order of its base plan:
    3 for a manifest whose base plan names none (every policy before the rule was trained at 3), its own where it
    names one; the caller's ``max_order`` wins."""
    from adaptive_core.policy import check_base_plan
    tb = make_testbed("gaussian", "ve")
    tb.cfg_scale = 5.0   # declared guidance (the denoiser is unchanged): what detect_guidance_scale reads
    x, grid = tb.noise(range(2)), host_sigmas(tb, 8)

    def order(**kw):
        trace = Trace()
        sample_adaptive(tb, x, grid, model_type="ve", trace=trace, **kw)
        return trace.options["max_order"]

    def step_limit(**kw):
        trace = Trace()
        sample_adaptive(tb, x, grid, model_type="ve", trace=trace, **kw)
        return trace.options["second_order_max_step"]
    assert order() == 2 and step_limit() == 1.0
    assert order(controller=f"policy:{hand_policy}") == 3 and step_limit(controller=f"policy:{hand_policy}") is None
    assert order(controller=f"policy:{hand_policy}", max_order=1) == 1
    assert check_base_plan({"prediction": "data"}) == {"prediction": "data", "max_order": 3,
                                                       "second_order_max_step": None}
    own = _write_policy(tmp_path / "o", _Tanh(), "own", base_plan={**LEGACY_BASE_PLAN, "max_order": 2})
    assert order(controller=f"policy:{own}") == 2 and step_limit(controller=f"policy:{own}") is None
    limited = _write_policy(tmp_path / "l", _Tanh(), "limited",
                            base_plan={**LEGACY_BASE_PLAN, "max_order": 2, "second_order_max_step": 1.0})
    assert order(controller=f"policy:{limited}") == 2 and step_limit(controller=f"policy:{limited}") == 1.0


def test_second_order_max_step_option_of_policy_training():
    """``tune policy --second-order-max-step`` sets the base plan's step limit: a number > 0, or 'none'; anything
    else is an argparse error naming the value."""
    import argparse

    from adaptive_core.tune.policy_train import parse_second_order_max_step
    assert parse_second_order_max_step("1.0") == 1.0 and parse_second_order_max_step("None") is None
    for bad in ("0", "-1", "nan", "inf", "auto", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            parse_second_order_max_step(bad)


@pytest.mark.parametrize("model_type", ["ve", "flow"])
def test_action_zero_keeps_the_plan_on_either_base(model_type):
    """Action 0 reproduces the heuristic's run on the plan the policy runs on, also on a flow model's shifted-time
    plan, whose first steps are shorter than the policy's minimum share of the span (they are then measured from
    one planned step back)."""
    tb = make_testbed("gmm_digits", model_type)
    x = tb.noise(range(2))

    class OnCurrentPlan(_Constant):
        base_options = {"prediction": "auto", "flow_shift": "auto", "predictor": "auto"}
    for controller, base in ((OnCurrentPlan((0.0, 0.0)), {}), (_Constant((0.0, 0.0)), dict(LEGACY_BASE_PLAN))):
        for budget in (4, 5, 8, 10, 12, 30):
            grid = host_sigmas(tb, budget)
            heur = sample_adaptive(tb, x, grid, model_type=model_type, **base)
            assert torch.allclose(sample_adaptive(tb, x, grid, model_type=model_type, controller=controller), heur,
                                  rtol=0, atol=1e-6), (type(controller).__name__, budget)


def test_training_on_the_current_plan_records_it(tmp_path):
    """``train(base_plan=CURRENT_BASE_PLAN)``: the env's episodes and heuristic runs use the sampler's defaults, the
    exported manifest says so, and the loaded policy runs on them (a flow run plans in shifted time)."""
    pytest.importorskip("gymnasium")
    pytest.importorskip("stable_baselines3")
    pytest.importorskip("onnxscript")
    from adaptive_core.policy import CURRENT_BASE_PLAN
    from adaptive_core.tune.policy_env import SamplingEnv
    from adaptive_core.tune.policy_train import export_policy, train
    with pytest.raises(ValueError, match="base_plan"):
        SamplingEnv(testbeds=[("gaussian", "flow")], budgets=[5], seeds=range(2), base_plan={"schedule": "host"})
    torch.set_num_threads(1)
    model, vecnorm, history = train([("gaussian", "flow")], [5], timesteps=64, n_envs=1, n_steps=32, batch_size=32,
                                    n_epochs=1, train_seeds=range(4), eval_seeds=range(20000, 20002),
                                    eval_every=10 ** 9, progress=False, base_plan=CURRENT_BASE_PLAN)
    path = export_policy(model, vecnorm, tmp_path / "current.onnx", trained_on={"testbeds": ["gaussian-flow"]},
                         training={"timesteps": 64}, metrics={}, base_plan=CURRENT_BASE_PLAN)
    policy = load_policy(path)
    assert policy.base_options == CURRENT_BASE_PLAN
    from adaptive_core.policy import AUTO_PLAN_RULE
    assert policy.manifest.action["auto_plan_rule"] == AUTO_PLAN_RULE
    tb = make_testbed("gaussian", "flow")
    trace = Trace()
    sample_adaptive(tb, tb.noise(range(2)), host_sigmas(tb, 6), model_type="flow", trace=trace,
                    controller=f"policy:{path}")
    assert trace.options["flow_shift"] == tb.shift and trace.options["prediction"] == "hybrid"


class _MovesFirstPoint(_Constant):
    """Moves the first point it decides (step action ``value``), then keeps the plan (action 0)."""

    def __init__(self, value):
        super().__init__(value)
        self.calls = 0

    def decide(self, obs):
        self.calls += 1
        actions, reasons = super().decide(obs)
        return actions * (self.calls == 1), reasons


@pytest.mark.parametrize("rho", ["prior", 7.0])
def test_a_moved_point_relays_the_plan_as_the_first_plan_was_laid(rho):
    """Where the policy moves a point, the rest of the plan is laid from it by the same rule as the first plan:
    the prior plan for rho="prior" (it was the σ^{1/ρ} plan of the default ρ), uniform in σ^{1/ρ} otherwise."""
    from adaptive_core import controller as ctl
    from adaptive_core.schedules import half_log_snr
    tb = make_testbed("gaussian", "ve")
    x, grid, budget = tb.noise(range(2)), host_sigmas(tb, 8), 8
    trace = Trace()
    sample_adaptive(tb, x, grid, model_type="ve", controller=_MovesFirstPoint(0.5), rho=rho, adapt=False,
                    trace=trace)
    lam = np.array([half_log_snr(s, "ve") for s in trace.sigmas_taken(0)[:-1]])
    moved = [r.decision for r in trace.samples[0] if r.accepted].index("policy")
    lam_lo = np.array([half_log_snr(float(grid[-2]), "ve")])
    rest = budget - 1 - moved
    if rho == "prior":
        expected = ctl.prior_plan(lam[moved:moved + 1], lam_lo, rest, 0.25)[0]
    else:
        expected = ctl.plan_lambdas(lam[moved:moved + 1], lam_lo, rest, rho)[0]
    np.testing.assert_allclose(lam[moved:], expected[:len(lam) - moved], rtol=1e-6, atol=1e-6)


def test_training_seconds_sums_a_policys_ppo_stages():
    """policy-eval reports a staged policy's whole training time, not its last stage's."""
    from adaptive_core.tune.policy_eval import training_seconds
    staged = load_policy("ppo_flow_guided").manifest
    stages = staged.training["stages"]
    assert len(stages) > 1
    assert training_seconds(staged) == pytest.approx(sum(st["train_seconds"] for st in stages), abs=0.1)
    assert training_seconds(staged) > staged.metrics["train_seconds"]
    one = load_policy("ppo_ve_flow").manifest
    assert "train_seconds_stages" not in one.metrics and training_seconds(one) == one.metrics["train_seconds"]
