"""The benchmark's peer samplers on an exact Gaussian denoiser: budget, convergence, agreement between libraries."""
import math
import sys

import pytest
import torch

from adaptive_core import schedules
from adaptive_core.bench import peers
from adaptive_core.bench.kdiffusion_loader import load_kdiffusion_sampling

VE = dict(model_type="ve", sigma_min=schedules.SD15_SIGMA_MIN, sigma_max=schedules.SD15_SIGMA_MAX, shift=None)
FLOW = dict(model_type="flow", sigma_min=schedules.flow_time_shift(1e-3, 3.0), sigma_max=1.0, shift=3.0)
SETTINGS = {"ve": VE, "flow": FLOW}


class Gaussian:
    """Exact denoiser of x0 ~ N(0, diag(v)): D(x, σ) = v/(v + σ²)·x (ve); flow via D_ve(x/(1 − s), s/(1 − s))."""

    def __init__(self, model_type, dim=16):
        self.model_type, self.name, self.nfe = model_type, f"gauss16-{model_type}", 0
        self.v = torch.linspace(0.05, 4.0, dim, dtype=torch.float64)

    def reset_nfe(self):
        self.nfe = 0

    def __call__(self, x, sigma):
        self.nfe += 1
        s = sigma.reshape(-1, *[1] * (x.ndim - 1))
        if self.model_type == "ve":
            return self.v / (self.v + s ** 2) * x
        return self.v * (1 - s) * x / (self.v * (1 - s) ** 2 + s ** 2)  # D_ve(x/(1-s), s/(1-s)), finite at s = 1

    def noise(self, n=64, seed=0):
        eps = torch.randn(n, len(self.v), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        return eps * SETTINGS[self.model_type]["sigma_max"]

    def reference(self, x):
        """D(x*(σ_min), σ_min) on the exact ODE path: x_ve(σ) = √((v + σ²)/(v + σ0²))·x_ve(σ0) per component."""
        smin = SETTINGS[self.model_type]["sigma_min"]
        if self.model_type == "ve":
            smax = SETTINGS["ve"]["sigma_max"]
            return self.v / (self.v + smin ** 2) * torch.sqrt((self.v + smin ** 2) / (self.v + smax ** 2)) * x
        s_ve = smin / (1 - smin)  # flow x = ε at σ = 1 is the ve path x_ve(σ) = √(v + σ²)·ε
        return self.v / (self.v + s_ve ** 2) * torch.sqrt(self.v + s_ve ** 2) * x


def rmse(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def run(name, mt, nfe, model=None, x=None):
    model = model or Gaussian(mt)
    x = model.noise() if x is None else x
    out, used = peers.run_peer(name, model, x, nfe, **SETTINGS[mt])
    return out, used, rmse(out, model.reference(x))


ALL = [(mt, name) for mt in ("ve", "flow") for name in peers.peer_names(mt)]


def test_peer_lists():
    ve, flow = peers.peer_names("ve"), peers.peer_names("flow")
    assert "dpmpp_2m+karras" in ve and "dpmpp_2m+ays" in ve and "dpmpp_2m+simple" not in ve
    assert "dpmpp_2m+simple" in flow and "euler+exponential" in flow and "lms+ays" not in flow
    for name in ("dpm_fast", "dpm_adaptive", "diffusers_dpmpp_2m+karras", "diffusers_unipc_3+karras",
                 "diffusers_deis_2+karras"):
        assert name in ve and name in flow
    assert "diffusers_unipc_2+simple" in flow
    with pytest.raises(KeyError):
        peers.run_peer("nope", Gaussian("ve"), Gaussian("ve").noise(), 8, **VE)


@pytest.mark.parametrize("mt,name", ALL)
def test_budget_shape_finite(mt, name):
    model = Gaussian(mt)
    x = model.noise()
    out, used, _ = run(name, mt, 8, model, x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert used == model.nfe
    if name.startswith(("heun", "dpm_2")):
        assert used == 7  # 4 levels: 3 two-call steps and one Euler step to 0
    elif name == "dpm_adaptive":
        assert 8 <= used <= 40  # set by a tolerance; its controller needs ~19-22 calls at least
    else:
        assert used == 8


@pytest.mark.parametrize("mt,name", ALL)
def test_error_falls_with_nfe(mt, name):
    lo, hi = (20, 60) if name == "dpm_adaptive" else (5, 20)  # dpm_adaptive can't go below ~19 calls
    err_lo, err_hi = run(name, mt, lo)[2], run(name, mt, hi)[2]
    assert err_hi < 0.7 * err_lo, (err_lo, err_hi)


def test_dpm_adaptive_lands_near_budget_and_caches():
    model = Gaussian("ve")
    x = model.noise()
    _, used, err = run("dpm_adaptive", "ve", 60, model, x)
    assert abs(used - 60) <= 6
    model.nfe = 0
    out2, used2, err2 = run("dpm_adaptive", "ve", 60, model, x)  # cached tolerance: one run, same answer
    assert model.nfe == used2 == used and err2 == err


def _hand_dpmpp_2m(model, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in ve form, written out; the step to σ = 0 returns the denoised."""
    old, h_old = None, None
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = model(x, x.new_full([x.shape[0]], s))
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        d_eff = d if old is None else d + (d - old) * h / (2 * h_old)
        x = (s_next / s) * x + (1 - s_next / s) * d_eff
        old, h_old = d, h
    return x


@pytest.mark.parametrize("nfe", [2, 4])
def test_kdiffusion_dpmpp_2m_matches_hand_written(nfe):
    model = Gaussian("ve")
    x = model.noise()
    out, _, _ = run("dpmpp_2m+karras", "ve", nfe, model, x)
    setting = peers.Setting(**VE)
    hand = _hand_dpmpp_2m(model, x, peers.peer_sigmas("karras", nfe, setting))
    torch.testing.assert_close(out, hand, rtol=1e-10, atol=1e-10)


def test_diffusers_dpmpp_matches_kdiffusion_dpmpp_2m():
    model = Gaussian("ve")
    x = model.noise()
    k_out, _, k_err = run("dpmpp_2m+karras", "ve", 10, model, x)
    d_out, _, d_err = run("diffusers_dpmpp_2m+karras", "ve", 10, model, x)
    # same algorithm on the same grid; diffusers rounds its sample to float32 each step
    assert rmse(k_out, d_out) < 1e-5 * k_out.abs().max().item()
    assert abs(k_err - d_err) < 1e-3 * k_err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy calls on torch tensors (numpy 2)
def test_diffusers_own_karras_grid_is_the_testbed_grid():
    """The adapter installs the testbed's grid; for SD1.5 betas that is diffusers' own Karras grid (to rounding)."""
    for kind in ("dpmpp", "unipc", "deis"):
        sched = peers._diffusers_scheduler(kind, 2, peers.Setting(**VE))
        sched.set_timesteps(10)
        own = sched.sigmas.double()[:10]
        ours = peers.peer_sigmas("karras", 10, peers.Setting(**VE))[:10]
        torch.testing.assert_close(own, ours, rtol=1e-3, atol=0)


def test_loader_does_not_import_the_package():
    sampling = load_kdiffusion_sampling()
    assert load_kdiffusion_sampling() is sampling
    assert hasattr(sampling, "sample_dpmpp_2m") and "torchvision" not in sys.modules
    assert "k_diffusion" not in sys.modules or not getattr(sys.modules["k_diffusion"], "_ado_stub", False)


def test_loader_says_how_to_install(monkeypatch):
    from adaptive_core.bench import kdiffusion_loader

    monkeypatch.setattr(kdiffusion_loader, "_sampling", None)
    monkeypatch.setattr(kdiffusion_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps k-diffusion"):
        kdiffusion_loader.load_kdiffusion_sampling()
