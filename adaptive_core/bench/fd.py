"""Sample quality of MNIST-shaped images: Fréchet distance in a small classifier's feature space, and how
confidently / correctly that classifier recognises the samples.

The Fréchet distance (FD) between Gaussians fitted to two feature sets is the FID formula of Heusel et al.
2017 ("GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS):

    FD = ||mu_a − mu_b||² + Tr(S_a + S_b − 2 (S_a S_b)^{1/2})

Here the features are the 128-d embedding of :class:`adaptive_core.testbeds.mnist_classifier.MNISTClassifier`
(not Inception), so the numbers are comparable only with each other, not with published FIDs.  The reference
set is the held-out "test" split (1000 digits) of :func:`adaptive_core.testbeds.mnist_data.load_mnist`.
Like FID, FD is biased upwards for small sample counts: compare samplers at the same N.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

#: Diagonal offset added to both covariances when their product's square root is not finite.
SQRTM_EPS = 1e-6


def _as_numpy64(feats) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().to(torch.float64).numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {feats.shape}")
    return feats


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] (float64, unbiased covariance as in FID)."""
    feats = _as_numpy64(feats)
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps: float = SQRTM_EPS) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (Heusel et al. 2017, the FID formula).

    The matrix square root is ``scipy.linalg.sqrtm``; when it is not finite (singular product) ``eps``·I is
    added to both covariances, and a tiny imaginary part from round-off is dropped (a large one raises).
    """
    from scipy import linalg

    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched statistics: {mu_a.shape}, {sigma_a.shape} vs {mu_b.shape}, {sigma_b.shape}")
    diff = mu_a - mu_b
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FD: singular covariance product, adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(len(mu_a)) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FD: sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)  # round-off can leave a tiny negative value for identical distributions


def frechet_distance(feat_a, feat_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D] (numpy or torch).

    FD = ||mu_a − mu_b||² + Tr(S_a + S_b − 2 (S_a S_b)^{1/2}), Heusel et al. 2017 (FID).
    """
    return frechet_distance_from_stats(*gaussian_stats(feat_a), *gaussian_stats(feat_b))


def _check_images(samples: torch.Tensor) -> torch.Tensor:
    samples = torch.as_tensor(samples)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 32, 32):
        raise ValueError(f"samples must be [N, 1, 32, 32] in [-1, 1], got shape {tuple(samples.shape)}")
    # Like image FID, which quantises to 8 bits, values outside the pixel range are clipped.
    return samples.detach().cpu().to(torch.float32).clamp(-1.0, 1.0)


@torch.no_grad()
def classifier_outputs(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 128], logits [N, 10]) of the shipped MNIST classifier for images [N, 1, 32, 32] in [−1, 1]."""
    from adaptive_core.testbeds.mnist_classifier import load_classifier, predict

    return predict(load_classifier(), _check_images(samples))


@lru_cache(maxsize=1)
def reference_stats() -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the classifier features of the held-out "test" split (computed once, cached)."""
    from adaptive_core.testbeds.mnist_data import load_mnist

    x_test, _ = load_mnist("test")
    return gaussian_stats(classifier_outputs(x_test)[0])


def sample_quality(samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Quality of generated digits [N, 1, 32, 32] in [−1, 1] (N ≥ 2), as seen by the shipped MNIST classifier.

    Returns a dict with
      ``fd``: Fréchet distance (Heusel et al. 2017) of the samples' features to the held-out test split's;
      ``confidence``: mean over samples of the maximum softmax probability;
      ``class_agreement``: share of samples classified as their requested ``labels`` [N] (None without labels);
      ``n``: number of samples.
    """
    feats, logits = classifier_outputs(samples)
    mu, sigma = reference_stats()
    probs = torch.softmax(logits.to(torch.float64), dim=1)
    agreement = None
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu()
        if len(labels) != len(logits):
            raise ValueError(f"{len(labels)} labels for {len(logits)} samples")
        agreement = float((logits.argmax(1) == labels).to(torch.float64).mean())
    return {"fd": frechet_distance_from_stats(*gaussian_stats(feats), mu, sigma),
            "confidence": float(probs.max(1).values.mean()), "class_agreement": agreement, "n": len(logits)}


__all__ = ["classifier_outputs", "frechet_distance", "frechet_distance_from_stats", "gaussian_stats",
           "reference_stats", "sample_quality"]
