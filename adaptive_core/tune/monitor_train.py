"""Training and export of the quality monitor (``python -m adaptive_core.tune monitor``).

The monitor is a small MLP over the features of :mod:`adaptive_core.features` that regresses the two targets
of :mod:`.monitor_data` (log10 RMSE to the run's final sample and to the reference), trained with a Huber loss
and AdamW (Loshchilov & Hutter 2019).  The feature normalisation (mean/std of the training rows) is part of the
graph, so the ONNX file takes raw features; the manifest records it.  Export: ``torch.onnx.export`` to one
file (no external data), verified against ONNX Runtime before the manifest with its sha256 is written.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..features import FEATURE_NAMES, N_FEATURES
from ..monitor import MANIFEST_FORMAT, OUTPUT_COLUMNS, MonitorManifest, sha256_of_file

OUTPUT_MEANING = {
    "log10_rmse_to_final": "log10 of the estimated RMSE (per image, over its elements) from this call's denoised "
                           "prediction to the sample the same run returns when it spends its whole budget",
    "log10_rmse_to_reference": "log10 of the estimated RMSE from this call's denoised prediction to the reference "
                               "solution of the probability-flow ODE from the same noise (the converged answer)",
}


class MonitorMLP(nn.Module):
    """(features − mean)/std → Linear–SiLU ×depth → Linear → 2 outputs (see :data:`OUTPUT_MEANING`)."""

    def __init__(self, mean, std, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(1, -1))
        self.register_buffer("inv_std", 1.0 / torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(1, -1))
        layers, width = [], self.mean.shape[1]
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, len(OUTPUT_COLUMNS)))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) * self.inv_std)


def targets_of(data: dict) -> np.ndarray:
    """The [R, 2] target matrix in :data:`OUTPUT_COLUMNS` order."""
    return np.stack([data[c] for c in OUTPUT_COLUMNS], 1).astype(np.float32)


def train_monitor(train: dict, val: dict | None = None, *, hidden: int = 64, depth: int = 2, epochs: int = 30,
                  batch_size: int = 512, lr: float = 3e-3, seed: int = 0, progress: bool = True) -> tuple[MonitorMLP, dict]:
    """Fit a :class:`MonitorMLP` to the rows of ``train``; returns (model in eval mode, history with the losses).

    Huber loss (δ = 0.5 decades) on both outputs, AdamW with weight decay 1e-4 and a cosine learning-rate decay.
    """
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    x = torch.from_numpy(train["features"])
    y = torch.from_numpy(targets_of(train))
    std = x.std(0).clamp_min(1e-3)
    model = MonitorMLP(x.mean(0), std, hidden, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.HuberLoss(delta=0.5)
    gen = torch.Generator().manual_seed(seed)
    history = {"train_loss": [], "val_loss": []}
    bar = tqdm(range(epochs), desc="monitor training", disable=not progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history["train_loss"].append(total / len(x))
        if val is not None:
            history["val_loss"].append(evaluate_loss(model, val))
        bar.set_postfix(train=f"{history['train_loss'][-1]:.4f}",
                        val=f"{history['val_loss'][-1]:.4f}" if history["val_loss"] else "-")
    model.eval()
    return model, history


@torch.no_grad()
def predict_torch(model: MonitorMLP, features: np.ndarray) -> np.ndarray:
    """The model's outputs [R, 2] for features [R, N] (float64)."""
    model.eval()
    return model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).double().numpy()


def evaluate_loss(model: MonitorMLP, data: dict) -> float:
    """Mean Huber loss (δ = 0.5) of the model on ``data``."""
    pred = torch.from_numpy(predict_torch(model, data["features"]))
    return float(nn.HuberLoss(delta=0.5)(pred, torch.from_numpy(targets_of(data)).double()))


def export_onnx(model: MonitorMLP, path: str | Path) -> Path:
    """Write the model as one ONNX file (dynamic batch axis, no external data) and check that ONNX Runtime
    reproduces the torch outputs on random features to 1e-5."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.randn(4, N_FEATURES)
    torch.onnx.export(model, (example,), str(path), input_names=["features"], output_names=["log10_error"],
                      dynamo=True, external_data=False, optimize=True,
                      dynamic_shapes={"features": {0: torch.export.Dim("batch", min=1, max=1 << 20)}})
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (1, 7):
        probe = np.random.default_rng(rows).normal(size=(rows, N_FEATURES)).astype(np.float32)
        got = session.run(["log10_error"], {"features": probe})[0]
        want = predict_torch(model, probe)
        if not np.allclose(got, want, atol=1e-5, rtol=1e-5):
            raise RuntimeError(f"ONNX export of the monitor differs from torch by {np.abs(got - want).max():.3g}")
    return path


def write_manifest(model: MonitorMLP, onnx_path: str | Path, training: dict) -> Path:
    """Write ``<onnx stem>.json`` next to the ONNX file: names, normalisation, output meaning, sha256, training."""
    onnx_path = Path(onnx_path)
    manifest = MonitorManifest(
        onnx_file=onnx_path.name, sha256=sha256_of_file(onnx_path), feature_names=list(FEATURE_NAMES),
        output_columns=list(OUTPUT_COLUMNS),
        normalisation={"applied_in_graph": True, "formula": "(features - mean) / std",
                       "mean": [float(v) for v in model.mean.reshape(-1)],
                       "std": [float(1.0 / v) for v in model.inv_std.reshape(-1)]},
        output_meaning=dict(OUTPUT_MEANING), training=training, format=MANIFEST_FORMAT)
    out = onnx_path.with_suffix(".json")
    out.write_text(manifest.to_json() + "\n")
    return out


def plot_predicted_vs_true(panels: list[tuple[str, np.ndarray, np.ndarray]], path: str | Path) -> None:
    """Predicted vs true log10 RMSE, one hexbin panel per (title, true, predicted), with the diagonal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.3), squeeze=False)
    for ax, (title, true, pred) in zip(axes[0], panels):
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        ax.hexbin(true, pred, gridsize=60, bins="log", cmap="viridis", extent=(lo, hi, lo, hi), mincnt=1)
        ax.plot([lo, hi], [lo, hi], "r--", lw=1)
        ax.set_xlabel("true log10 RMSE")
        ax.set_ylabel("predicted log10 RMSE")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dataset_summary(data: dict) -> dict:
    """Counts of a data set (rows, runs) for the manifest."""
    return {"rows": int(data["features"].shape[0]), "runs": int(len(np.unique(data["run"])))}


def timestamp() -> str:
    """UTC time, ISO 8601, for provenance."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["MonitorMLP", "OUTPUT_MEANING", "dataset_summary", "evaluate_loss", "export_onnx", "plot_predicted_vs_true",
           "predict_torch", "targets_of", "train_monitor", "write_manifest"]
