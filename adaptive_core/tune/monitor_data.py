"""Training data for the quality monitor: per model call of many sampler runs, the features and the targets.

A *run* is one sampler (ADO in budget mode, or a fixed-schedule peer of :mod:`adaptive_core.bench.peers`) at
one budget on one testbed from a batch of noises.  After every model call of every image the features of
:mod:`adaptive_core.features` are recorded, and once the run has ended the two targets:

* ``log10_rmse_to_final``: log10 RMSE from this call's denoised prediction to the sample the run returned;
* ``log10_rmse_to_reference``: log10 RMSE from it to the reference ODE solution of the testbed.

(RMSE per image over its elements; floored at :data:`TARGET_FLOOR`.)  ADO runs record the features through
the sampler's callback (with its error estimate); peers through a wrapper around the model, which sees every
call.  The data are plain float32/int32 arrays, saved with safetensors (no pickle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..features import N_FEATURES, FeatureTracker
from ..schedules import half_log_snr

#: Targets below this RMSE are recorded as this value (the last call of a run: distance ≈ 0).
TARGET_FLOOR = 1e-5

#: ADO budgets and the peers (with their budgets) used for training data, per model type.
ADO_BUDGETS = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)
PEER_BUDGETS = (5, 8, 10, 15, 20, 30)
PEERS = {"ve": ("euler+karras", "dpmpp_2m+karras", "dpmpp_2m+exponential", "dpmpp_3m+ays"),
         "flow": ("euler+simple", "dpmpp_2m+simple", "dpmpp_2m+karras", "dpmpp_3m+simple")}


class RoughDenoiser:
    """A testbed's exact denoiser plus an error that oscillates with the noise level, D + a·sin(3·D + k·log σ).

    A trained network's prediction is not smooth in σ (see :func:`adaptive_core.controller.replan_lambdas`);
    this variant gives the monitor's training data that roughness on an exact testbed (domain randomisation,
    Tobin et al. 2017).  Counts its calls.
    """

    def __init__(self, testbed, amplitude: float = 0.03, frequency: float = 4.0) -> None:
        self.testbed, self.amplitude, self.frequency, self.nfe = testbed, amplitude, frequency, 0
        self.name = f"{testbed.name}-rough"

    def reset_nfe(self) -> None:
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        self.nfe += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        d = self.testbed.denoise(x, sigma)
        phase = (self.frequency * torch.log(sigma.clamp_min(1e-12))).reshape(-1, *([1] * (x.ndim - 1)))
        return d + self.amplitude * torch.sin(3 * d + phase)


@dataclass
class TestbedSpec:
    """A testbed configuration for the monitor's data: ``make_testbed(name, model_type, **params)``, optionally
    wrapped (``imperfect``): "smooth" → :class:`adaptive_core.bench.generality.ImperfectDenoiser`, "rough" →
    :class:`RoughDenoiser`; their reference is a 200-step solve of the wrapped model."""

    name: str
    model_type: str
    params: dict = field(default_factory=dict)
    imperfect: str | None = None

    @property
    def label(self) -> str:
        """Short name, e.g. ``gaussian-ve(exponent=3.0)`` or ``gmm_digits-flow-rough-error``."""
        extra = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}-{self.model_type}" + (f"({extra})" if extra else "") + (
            f"-{self.imperfect}-error" if self.imperfect else "")


#: Where the bundled monitor is trained: both analytic testbeds in both model types, plus two variants.
TRAIN_TESTBEDS = (TestbedSpec("gaussian", "ve"), TestbedSpec("gaussian", "flow"), TestbedSpec("gmm_digits", "ve"),
                  TestbedSpec("gmm_digits", "flow"), TestbedSpec("gaussian", "ve", {"exponent": 3.0}),
                  TestbedSpec("gmm_digits", "flow", {"shift": 1.0}))
#: Imperfect-denoiser variants, available for training (``--with-imperfect``).  Measured: adding them did not help
#: on the left-out trained UNet (quality-target runs within ±25% of the target: 45% with them, 51% without).
IMPERFECT_TESTBEDS = (TestbedSpec("gmm_digits", "ve", imperfect="smooth"),
                      TestbedSpec("gmm_digits", "flow", imperfect="rough"), TestbedSpec("gaussian", "ve", imperfect="rough"))
#: Left out of training entirely: the trained MNIST UNet (a real network, not an exact denoiser).
HELD_OUT_TESTBED = TestbedSpec("mnist_unet", "ve")


def build_testbed(spec: TestbedSpec):
    """(testbed, model called by the samplers) for ``spec``."""
    from ..testbeds import make_testbed
    tb = make_testbed(spec.name, spec.model_type, **spec.params)
    if spec.imperfect == "smooth":
        from ..bench.generality import ImperfectDenoiser
        return tb, ImperfectDenoiser(tb)
    if spec.imperfect == "rough":
        return tb, RoughDenoiser(tb)
    if spec.imperfect is not None:
        raise ValueError(f"unknown imperfect={spec.imperfect!r}: expected None, 'smooth' or 'rough'")
    return tb, tb


def reference_for(spec: TestbedSpec, testbed, model, x: torch.Tensor) -> torch.Tensor:
    """The reference solution from noises x (the testbed's own, or a 200-step solve of an imperfect model)."""
    if spec.imperfect:
        from .. import sample_adaptive
        from ..schedules import karras_sigmas
        return sample_adaptive(model, x, karras_sigmas(200, testbed.sigma_min, testbed.sigma_max),
                               model_type=testbed.model_type, mode="fixed", predictor="exact")
    return testbed.reference(x)


class _RecordingModel:
    """Wraps a denoiser: every call updates a :class:`FeatureTracker` and keeps the prediction."""

    def __init__(self, model, tracker: FeatureTracker, model_type: str) -> None:
        self.model, self.tracker, self.model_type = model, tracker, model_type
        self.nfe = 0
        self.name = getattr(model, "name", type(model).__name__)
        self.features: list[np.ndarray] = []
        self.predictions: list[torch.Tensor] = []

    def reset_nfe(self) -> None:
        self.nfe = 0
        if hasattr(self.model, "reset_nfe"):
            self.model.reset_nfe()

    def __call__(self, x, sigma, **extra_args):
        self.nfe += 1
        d = self.model(x, sigma, **extra_args)
        sigma = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0]).to(torch.float64).cpu().numpy()
        self.features.append(self.tracker.update(d, half_log_snr(sigma, self.model_type)))
        self.predictions.append(d.detach().clone())
        return d


def per_image_rmse(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """RMSE of each image of a against the same image of b (over its elements, float64) [B]."""
    return (a.to(torch.float64) - b.to(torch.float64)).flatten(1).pow(2).mean(1).sqrt().cpu().numpy()


def run_and_record(method: str, testbed, model, x: torch.Tensor, ref: torch.Tensor, budget: int) -> dict:
    """One run of ``method`` ("ado" or a peer name) at ``budget``; returns arrays with one row per (call, image):
    ``features`` [R, N], ``log10_rmse_to_final`` [R], ``log10_rmse_to_reference`` [R], ``call`` [R] (1-based),
    ``image`` [R] (index in x), ``calls`` [R] (the run's total calls)."""
    from .. import sample_adaptive
    from ..bench.peers import run_peer
    from ..bench.run import host_sigmas
    mt = testbed.model_type
    lam_start = half_log_snr(float(testbed.sigma_max), mt)
    lam_end = half_log_snr(float(testbed.sigma_min), mt)
    tracker = FeatureTracker(np.full(x.shape[0], lam_start), np.full(x.shape[0], lam_end), budget)
    if method == "ado":
        feats, preds = [], []

        def callback(info):
            lam = half_log_snr(info["sigma"].to(torch.float64).cpu().numpy(), mt)
            feats.append(tracker.update(info["denoised"], lam, info["error"].numpy()))
            preds.append(info["denoised"].detach().clone())
        if hasattr(model, "reset_nfe"):
            model.reset_nfe()
        out = sample_adaptive(model, x, host_sigmas(testbed, budget), nfe_budget=budget, model_type=mt,
                              callback=callback)
    else:
        rec = _RecordingModel(model, tracker, mt)
        out, _ = run_peer(method, rec, x, budget, model_type=mt, sigma_min=testbed.sigma_min,
                          sigma_max=testbed.sigma_max, shift=testbed.shift)
        feats, preds = rec.features, rec.predictions
    calls, batch = len(feats), x.shape[0]
    to_final = np.stack([per_image_rmse(d, out) for d in preds])          # [calls, B]
    to_ref = np.stack([per_image_rmse(d, ref) for d in preds])
    return {"features": np.concatenate(feats).astype(np.float32),
            "log10_rmse_to_final": np.log10(np.maximum(to_final, TARGET_FLOOR)).reshape(-1).astype(np.float32),
            "log10_rmse_to_reference": np.log10(np.maximum(to_ref, TARGET_FLOOR)).reshape(-1).astype(np.float32),
            "call": np.repeat(np.arange(1, calls + 1), batch).astype(np.int32),
            "image": np.tile(np.arange(batch), calls).astype(np.int32),
            "calls": np.full(calls * batch, calls, dtype=np.int32)}


def collect(specs, seeds, ado_budgets=ADO_BUDGETS, peer_budgets=PEER_BUDGETS, peers=PEERS, progress=True) -> dict:
    """Runs of ADO and the peers on every testbed of ``specs`` from noises ``seeds``; all rows concatenated.

    Extra int32 columns say where each row comes from: ``testbed`` (index in ``specs``), ``method`` (0 = ADO,
    k = the k-th peer of its model type), ``budget``, ``run`` (a running index).
    """
    from tqdm.auto import tqdm
    from ..bench.peers import peer_names
    jobs = []
    for t, spec in enumerate(specs):
        available = set(peer_names(spec.model_type))
        methods = [("ado", 0, b) for b in ado_budgets]
        methods += [(p, k + 1, b) for k, p in enumerate(peers.get(spec.model_type, ())) if p in available
                    for b in peer_budgets]
        jobs.append((t, spec, methods))
    parts: list[dict] = []
    bar = tqdm(total=sum(len(m) for _, _, m in jobs), desc="monitor data", disable=not progress)
    run_id = 0
    for t, spec, methods in jobs:
        testbed, model = build_testbed(spec)
        x = testbed.noise(list(seeds))
        ref = reference_for(spec, testbed, model, x)
        for method, method_id, budget in methods:
            bar.set_postfix_str(f"{spec.label} {method} {budget}")
            rows = run_and_record(method, testbed, model, x, ref, budget)
            n = rows["call"].shape[0]
            rows.update(testbed=np.full(n, t, np.int32), method=np.full(n, method_id, np.int32),
                        budget=np.full(n, budget, np.int32), run=np.full(n, run_id, np.int32))
            parts.append(rows)
            run_id += 1
            bar.update(1)
    bar.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def save_data(data: dict, path, metadata: dict) -> None:
    """Write the arrays with safetensors; ``metadata`` values are stored as strings."""
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in data.items()}, str(path),
              metadata={k: str(v) for k, v in metadata.items()})


def load_data(path) -> dict:
    """Arrays written by :func:`save_data`."""
    from safetensors.numpy import load_file
    data = load_file(str(path))
    if data["features"].shape[1] != N_FEATURES:
        raise ValueError(f"{path}: {data['features'].shape[1]} features, this ADO computes {N_FEATURES}")
    return data


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr) of two 1-D arrays."""
    from scipy.stats import spearmanr
    value = spearmanr(np.asarray(a), np.asarray(b)).statistic
    return float(value) if math.isfinite(value) else float("nan")
