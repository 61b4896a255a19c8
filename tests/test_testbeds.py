"""Analytic testbeds: exact denoisers, ve/flow equivalence, references, batch invariance, input checks."""
from __future__ import annotations

import pytest
import torch

from adaptive_core.schedules import SD15_SIGMA_MAX, SD15_SIGMA_MIN, flow_time_shift
from adaptive_core.testbeds import (TESTBED_NAMES, DigitsGMM, GaussianMixture, PowerLawGaussian, Testbed,
                                    make_testbed)

F64 = torch.float64
MODEL_TYPES = ("ve", "flow")


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def testbeds():
    return {(name, mt): make_testbed(name, mt) for name in TESTBED_NAMES for mt in MODEL_TYPES}


def small_gaussian_and_gmm(model_type: str):
    """A small power-law Gaussian and the same distribution written as a one-component GaussianMixture."""
    gauss = PowerLawGaussian(model_type, shape=(2, 8, 8))
    eigvals, eigvecs = gauss.eigenbasis()
    n = eigvals.numel()
    gmm = GaussianMixture(torch.ones(1), torch.zeros(1, n), eigvecs[None], eigvals[None], gauss.shape, model_type)
    return gauss, gmm


def test_make_testbed_names_and_ranges(testbeds):
    assert set(TESTBED_NAMES) == {"gaussian", "gmm_digits"}
    for (name, mt), tb in testbeds.items():
        assert isinstance(tb, Testbed) and tb.name == f"{name}-{mt}" and tb.model_type == mt
        if mt == "ve":
            assert (tb.sigma_min, tb.sigma_max, tb.shift) == (SD15_SIGMA_MIN, SD15_SIGMA_MAX, None)
        else:
            assert tb.sigma_max == 1.0 and tb.shift == 3.0
            assert tb.sigma_min == pytest.approx(flow_time_shift(1e-3, 3.0), rel=1e-15)
    assert testbeds["gaussian", "ve"].shape == (4, 16, 16)
    assert testbeds["gmm_digits", "ve"].shape == (1, 8, 8)
    assert make_testbed("gaussian", "flow", shift=1.0).sigma_min == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="gmm_digits"):
        make_testbed("nope", "ve")
    with pytest.raises(ValueError, match="model_type"):
        make_testbed("gaussian", "eps")


def test_variant_names_build_the_family_with_those_parameters(tmp_path):
    """``NAME@PARAM=VALUE`` builds the analytic family with that parameter, keeps it in the name, and is refused
    when malformed, unknown to the family or put on a trained testbed; the oracle grid fit takes a variant."""
    from adaptive_core.bench import trained_oracle
    from adaptive_core.testbeds import split_variant_name
    assert split_variant_name("gaussian") == ("gaussian", {})
    assert split_variant_name("gaussian@exponent=1.5@shift=2") == ("gaussian", {"exponent": 1.5, "shift": 2.0})
    tb = make_testbed("gaussian@exponent=1.5", "ve")
    assert isinstance(tb, PowerLawGaussian) and tb.exponent == 1.5 and tb.name == "gaussian@exponent=1.5-ve"
    plain = make_testbed("gaussian", "ve")
    x = plain.noise([0])
    assert not torch.allclose(tb.denoise(x, torch.tensor([1.0])), plain.denoise(x, torch.tensor([1.0])))
    flow = make_testbed("gmm_digits@shift=1.5", "flow")
    assert flow.shift == 1.5 and flow.sigma_min == pytest.approx(flow_time_shift(1e-3, 1.5), rel=1e-15)
    for bad, match in (("gaussian@exponent", "PARAM=NUMBER"), ("gaussian@exponent=inf", "PARAM=NUMBER"),
                       ("gaussian@exponent=1@exponent=2", "twice"), ("gmm_digits@exponent=2", "exponent"),
                       ("mnist_unet@cfg_scale=2", "only analytic"), ("nope@shift=1", "unknown testbed")):
        with pytest.raises(ValueError, match=match):
            make_testbed(bad, "flow")
    with pytest.raises(ValueError, match="both"):
        make_testbed("gaussian@exponent=1.5", "ve", exponent=2.0)
    out = tmp_path / "grids.json"
    assert trained_oracle.main(["--testbed", "gaussian@exponent=1.5", "--model-type", "ve", "--nfe", "4",
                                "--fit-seeds", "2", "--jobs", "1", "--out", str(out)]) == 0
    grid = trained_oracle.load_oracle_grids(out)["gaussian@exponent=1.5-ve"]["methods"]["oracle"]["4"]
    assert len(grid["sigmas"]) == 5 and grid["fit_rmse"] <= grid["fit_heuristic_rmse"]
    with pytest.raises(SystemExit):
        trained_oracle.main(["--testbed", "gaussian@exponent", "--out", str(out)])


def test_digits_gmm_file():
    tb = DigitsGMM()
    assert tb.n_components == 16 and tb.metadata["n_components"] == 16
    assert "digits" in tb.metadata["source"] and "sklearn_version" in tb.metadata
    smallest_std = tb._params["eigvals"].min().sqrt().item()
    assert 0.01 <= smallest_std <= 0.02
    assert tb._params["log_weights"].exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    mean = tb.data_mean()
    assert mean.min() >= -1.0 - 1e-9 and mean.max() <= 1.0 + 1e-9


def test_gaussian_spectrum_and_samples():
    tb = PowerLawGaussian()
    assert tb.variance.mean().item() == pytest.approx(1.0, rel=1e-12)
    assert tb.variance[0, 0, 0] > tb.variance[0, 0, 1] > tb.variance[0, 15, 15]  # power law: low frequencies dominate
    eigvals, u = tb.eigenbasis()
    assert torch.allclose(u.T @ u, torch.eye(u.shape[0], dtype=F64), atol=1e-12)
    x = tb.sample_data(2000, seed=1)
    assert x.pow(2).mean().item() == pytest.approx(1.0, rel=0.05)


def test_gmm_samples_match_moments():
    tb = DigitsGMM()
    x = tb.sample_data(20000, seed=0).reshape(20000, -1)
    assert (x.mean(0) - tb.data_mean().reshape(-1)).abs().max() < 0.05
    assert (torch.cov(x.T) - tb.data_covariance()).abs().max() < 0.05


def test_denoise_limits(testbeds):
    gauss = testbeds["gaussian", "ve"]
    x = gauss.sample_data(3, seed=0) + 1e-4 * torch.randn(3, *gauss.shape, dtype=F64)
    tiny = torch.full((3,), 1e-4, dtype=F64)  # σ² / smallest variance ≈ 1e-7
    assert (gauss.denoise(x, tiny) - x).abs().max() < 1e-5
    assert torch.equal(gauss.denoise(x, torch.zeros(3, dtype=F64)), x)
    for (name, mt), tb in testbeds.items():
        noise = tb.noise([0, 1])
        huge = torch.full((2,), 1e6 if mt == "ve" else 1.0, dtype=F64)
        mean = tb.data_mean().expand(2, *tb.shape)
        assert (tb.denoise(huge.reshape(2, 1, 1, 1) * noise / tb.sigma_max, huge) - mean).abs().max() < 1e-4, tb.name


def test_gaussian_equals_one_component_gmm():
    """Two independent implementations of E[x0|x] (DCT Wiener filter vs mixture code) and of the reference."""
    for mt in MODEL_TYPES:
        gauss, gmm = small_gaussian_and_gmm(mt)
        x = gauss.noise(range(3))
        for s in (gauss.sigma_max, 0.5, 0.05, gauss.sigma_min):
            sigma = torch.full((3,), s, dtype=F64)
            xs = gauss.sample_data(3) * (1 - s if mt == "flow" else 1) + s * x / gauss.sigma_max
            assert (gauss.denoise(xs, sigma) - gmm.denoise(xs, sigma)).abs().max() < 1e-12
        assert rms(gauss.reference(x), gmm.reference(x)) < 1e-7


def test_gmm_denoiser_matches_quadrature():
    """Tweedie's E[x0|x] for a 2-D mixture with rotated covariances against brute-force quadrature over x0."""
    means = torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=F64)
    covs = torch.tensor([[[0.30, 0.20], [0.20, 0.40]], [[0.10, -0.05], [-0.05, 0.60]],
                         [[0.50, 0.00], [0.00, 0.05]]], dtype=F64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    eigvals, eigvecs = torch.linalg.eigh(covs)
    tb = GaussianMixture(weights, means, eigvecs, eigvals, shape=(1, 1, 2))

    grid = torch.linspace(-7, 7, 1401, dtype=F64)
    x0 = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    prior = sum(w * torch.distributions.MultivariateNormal(m, c).log_prob(x0).exp()
                for w, m, c in zip(weights, means, covs))
    x = torch.tensor([[0.3, -0.2], [-2.0, 1.5], [1.2, 0.8]], dtype=F64)
    for sigma in (0.2, 0.7, 2.0):
        post = prior[None] * torch.exp(-((x[:, None] - x0[None]) ** 2).sum(-1) / (2 * sigma ** 2))
        expected = (post[..., None] * x0).sum(1) / post.sum(1)[:, None]
        got = tb.denoise(x.reshape(3, 1, 1, 2), torch.full((3,), sigma, dtype=F64)).reshape(3, 2)
        assert (got - expected).abs().max() < 1e-8, sigma


@pytest.mark.parametrize("name", TESTBED_NAMES)
def test_flow_denoiser_is_ve_denoiser_after_conversion(testbeds, name):
    """D_flow(x, s) == D_ve(x/(1−s), s/(1−s)): the same posterior mean at the same half-log-SNR."""
    ve, flow = testbeds[name, "ve"], testbeds[name, "flow"]
    s = torch.tensor([flow.sigma_min, 0.05, 0.3, 0.7, 0.999], dtype=F64)
    x = (1 - s).reshape(-1, 1, 1, 1) * flow.sample_data(5, seed=3) + s.reshape(-1, 1, 1, 1) * flow.noise(range(5))
    d_flow = flow.denoise(x, s)
    d_ve = ve.denoise(x / (1 - s).reshape(-1, 1, 1, 1), s / (1 - s))
    assert (d_flow - d_ve).abs().max() < 1e-12


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gmm_reference_is_converged(testbeds, model_type):
    tb = testbeds["gmm_digits", model_type]
    x = tb.noise(range(8))
    default, tight = tb.reference(x), tb.ode_reference(x, rtol=1e-12, atol=1e-14)
    assert rms(default, tight) < 1e-7
    assert rms(default, tb.data_mean()) > 0.1  # a real sample, not the mean


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gaussian_closed_form_reference_equals_ode_solution(testbeds, model_type):
    tb = testbeds["gaussian", model_type]
    x = tb.noise([0, 1])
    assert rms(tb.reference(x), tb.ode_reference(x)) < 1e-7


@pytest.mark.parametrize("name", TESTBED_NAMES)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoise_agrees_across_batch_sizes_and_keeps_dtype(testbeds, name, model_type, dtype):
    tb = testbeds[name, model_type]
    x = tb.noise(range(4), dtype=dtype) * (0.2 if model_type == "ve" else 1.0)
    sigma = torch.tensor([tb.sigma_max, 1.0 if model_type == "ve" else 0.5, 0.2, tb.sigma_min], dtype=dtype)
    batch = tb(x, sigma)
    assert batch.dtype == dtype and batch.shape == x.shape and torch.isfinite(batch).all()
    for i in range(4):
        assert torch.allclose(tb(x[i:i + 1].clone(), sigma[i:i + 1]), batch[i:i + 1], rtol=1e-6, atol=1e-6)
    assert torch.allclose(tb(x[2:3], float(sigma[2])), batch[2:3], rtol=1e-6, atol=1e-6)  # one σ for the batch, as a number
    assert tb.reference(x[:1]).dtype == dtype


def test_nfe_is_counted(testbeds):
    tb = testbeds["gmm_digits", "ve"]
    tb.reset_nfe()
    tb(tb.noise([0]), torch.tensor([1.0]))
    tb(tb.noise([0]), torch.tensor([1.0]))
    assert tb.nfe == 2


def test_bad_input_names_the_expected_shape(testbeds):
    tb = testbeds["gmm_digits", "ve"]
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        tb.denoise(torch.zeros(2, 8, 8, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        tb.reference(torch.zeros(2, 64, dtype=F64))
    with pytest.raises(ValueError, match=r"\[B, 4, 16, 16\]"):
        testbeds["gaussian", "flow"](torch.zeros(1, 4, 16, 8), torch.ones(1))
    with pytest.raises(ValueError, match="sigma"):
        tb.denoise(torch.zeros(3, 1, 8, 8, dtype=F64), torch.ones(2, dtype=F64))
