"""The trained MNIST UNet testbed: shipped weights, preconditioning limits, labels + CFG, NFE counting, training."""
from __future__ import annotations

import pytest
import torch

from adaptive_core.testbeds import TESTBED_NAMES, TRAINED_TESTBED_NAMES, make_testbed, train
from adaptive_core.testbeds.trained import TrainedDenoiser
from adaptive_core.testbeds.unet import NULL_CLASS, precondition

MODEL_TYPES = ("ve", "flow")


@pytest.fixture(scope="module", params=MODEL_TYPES)
def testbed(request):
    return TrainedDenoiser(request.param)


def _data(tb, n=8):
    return tb.sample_data(n, seed=1).to(torch.float32)


def test_registered_apart_from_the_benchmark_testbeds():
    assert "mnist_unet" in TRAINED_TESTBED_NAMES and "mnist_unet" not in TESTBED_NAMES
    tb = make_testbed("mnist_unet", "flow")
    assert isinstance(tb, TrainedDenoiser) and tb.name == "mnist_unet-flow" and tb.sigma_max == 1.0


def test_shipped_weights_give_finite_predictions(testbed):
    assert testbed.meta["model_type"] == testbed.model_type and testbed.meta["steps"] > 0
    x = testbed.noise(range(3))
    for sigma in (testbed.sigma_max, 0.5, torch.tensor([testbed.sigma_max, 0.3, testbed.sigma_min])):
        d = testbed(x, torch.as_tensor(sigma, dtype=torch.float64).reshape(-1))
        assert d.shape == x.shape and d.dtype == x.dtype and torch.isfinite(d).all()


def test_preconditioning_is_finite_at_pure_flow_noise():
    c_skip, c_out, c_in, c_noise = precondition(torch.tensor([1.0]), "flow")
    assert c_skip.item() == 0.0 and torch.isfinite(torch.stack([c_out, c_in, c_noise])).all()


def test_small_noise_returns_nearly_the_input(testbed):
    """At the smallest σ the denoiser only removes a little noise: |D(x) − x| is of the order of σ, not more."""
    x0 = _data(testbed)
    sigma = 0.03 if testbed.model_type == "ve" else 0.003
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x = x0 + sigma * eps if testbed.model_type == "ve" else (1 - sigma) * x0 + sigma * eps
    d = testbed(x, torch.full((x.shape[0],), sigma))
    rms = (d - x).pow(2).mean().sqrt().item()
    assert rms < 2.0 * sigma, rms
    # and the network does denoise: it is closer to the clean image than the input is, or about as close
    assert (d - x0).pow(2).mean().sqrt().item() < 1.2 * (x - x0).pow(2).mean().sqrt().item()


def test_cfg_scale_one_is_conditional_and_uncond_uses_the_null_class(testbed):
    x = testbed.noise(range(4), dtype=torch.float32) * (0.5 if testbed.model_type == "ve" else 1.0)
    sigma = torch.full((4,), 0.4)
    labels = torch.tensor([3, 1, 4, 1])
    net = testbed.net
    cond = net(x, sigma, labels)
    null = net(x, sigma, torch.full((4,), NULL_CLASS))
    try:
        testbed.set_labels(labels)
        testbed.cfg_scale = 1.0
        torch.testing.assert_close(testbed(x, sigma), cond, rtol=1e-5, atol=1e-5)
        testbed.cfg_scale = 2.5
        torch.testing.assert_close(testbed(x, sigma), null + 2.5 * (cond - null), rtol=1e-4, atol=1e-4)
        assert (cond - null).abs().max() > 1e-3  # the label matters
        testbed.set_labels(None)
        torch.testing.assert_close(testbed(x, sigma), null, rtol=1e-5, atol=1e-5)
    finally:
        testbed.set_labels(None)
        testbed.cfg_scale = 1.0


def test_labels_follow_the_batch_and_nfe_counts_one_per_call_with_cfg():
    tb = TrainedDenoiser("ve", labels=torch.arange(10), cfg_scale=3.0)
    x = tb.noise(range(2))
    tb.reset_nfe()
    calls = []
    forward = tb.net.forward
    tb.net.forward = lambda x, s, y: calls.append(y.clone()) or forward(x, s, y)
    try:
        tb(x, torch.full((2,), 2.0))
    finally:
        del tb.net.forward
    assert tb.nfe == 1 and len(calls) == 1  # cond + uncond in one batched call: one NFE
    assert calls[0].tolist() == [0, 1, NULL_CLASS, NULL_CLASS]
    with pytest.raises(ValueError):
        tb(tb.noise(range(11)), torch.ones(11))


def test_tiny_training_run_writes_loadable_weights(tmp_path):
    out, plot, samples = tmp_path / "w.safetensors", tmp_path / "loss.png", tmp_path / "samples.png"
    threads = torch.get_num_threads()
    try:
        facts = train.main(["--model-type", "flow", "--steps", "3", "--batch", "8", "--threads", "1",
                            "--out", str(out), "--plot", str(plot), "--samples", str(samples), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert facts["steps"] == 3 and plot.stat().st_size > 0 and samples.stat().st_size > 0
    tb = TrainedDenoiser("flow", path=out)
    assert tb.meta["steps"] == 3 and tb.meta["batch"] == 8
    assert torch.isfinite(tb(tb.noise(range(2)), torch.ones(2))).all()
