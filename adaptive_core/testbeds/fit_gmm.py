"""Fit the digits Gaussian mixture once and write ``data/gmm_digits.safetensors`` (needs scikit-learn).

    python -m adaptive_core.testbeds.fit_gmm [--components 16] [--reg-covar 2.25e-4] [--out PATH]

scikit-learn's 8×8 digits (1797 images, pixels 0..16) are mapped to [−1, 1] by x/8 − 1 and fitted by EM with
full covariances (sklearn.mixture.GaussianMixture, random_state=0).  ``reg_covar`` is added to every
covariance's diagonal, so it is the smallest eigenvalue: 2.25e-4 gives a smallest std of 0.015.  The file
holds float64 weights [K], means [K, 64], eigvecs [K, 64, 64] (columns) and eigvals [K, 64], plus metadata.
Run time needs only torch + safetensors (:func:`adaptive_core.testbeds.gmm.load_gmm`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def fit_digits_gmm(n_components: int = 16, reg_covar: float = 2.25e-4, random_state: int = 0):
    """Fit the mixture; returns (tensors as float64 numpy arrays, metadata dict)."""
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.mixture import GaussianMixture

    data = load_digits().data.astype(np.float64) / 8.0 - 1.0
    gmm = GaussianMixture(n_components=n_components, covariance_type="full", reg_covar=reg_covar,
                          random_state=random_state, max_iter=500, n_init=1).fit(data)
    eigvals, eigvecs = np.linalg.eigh(gmm.covariances_)
    tensors = {"weights": gmm.weights_, "means": gmm.means_, "eigvecs": eigvecs, "eigvals": eigvals}
    metadata = {
        "source": "sklearn.datasets.load_digits (8x8, 1797 images), pixels x/8 - 1 in [-1, 1]",
        "shape": [1, 8, 8], "n_components": n_components, "covariance_type": "full", "reg_covar": reg_covar,
        "random_state": random_state, "converged": bool(gmm.converged_), "n_iter": int(gmm.n_iter_),
        "mean_log_likelihood": float(gmm.score(data)), "sklearn_version": sklearn.__version__,
        "script": "python -m adaptive_core.testbeds.fit_gmm",
    }
    return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, metadata


def main(argv=None) -> None:
    from safetensors.numpy import save_file

    from .gmm import DIGITS_GMM_PATH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--reg-covar", type=float, default=2.25e-4)
    parser.add_argument("--out", default=str(DIGITS_GMM_PATH))
    args = parser.parse_args(argv)
    tensors, metadata = fit_digits_gmm(args.components, args.reg_covar)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata={k: json.dumps(v) for k, v in metadata.items()})
    print(f"wrote {args.out}: {json.dumps(metadata, indent=1)}")
    print(f"eigenvalues: min {tensors['eigvals'].min():.3g} (std {np.sqrt(tensors['eigvals'].min()):.4f}), "
          f"max {tensors['eigvals'].max():.3g}; weights {np.round(tensors['weights'], 3).tolist()}")


if __name__ == "__main__":
    main()
