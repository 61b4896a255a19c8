"""The quality monitor at run time: a small ONNX model that estimates, per image and per step, how far the
current denoised prediction is from where the run will end and from the converged answer.

The model reads the features of :mod:`adaptive_core.features` ([B, N] float32) and returns [B, 2]:
log10 of the estimated RMSE from the current denoised prediction D_t to the run's final sample
(``log10_rmse_to_final``, the *remaining* error) and to the reference solution of the probability-flow ODE
(``log10_rmse_to_reference``).  It is trained offline by ``python -m adaptive_core.tune monitor``.

A monitor is two files: the ONNX graph and a JSON manifest (:class:`MonitorManifest`) naming it, with
the graph's sha256, input names and normalisation, the meaning of the outputs and the training data and
metrics.  :func:`load_monitor` verifies the sha256 before the graph is handed to ONNX Runtime (a corrupt
or swapped file raises :class:`MonitorIntegrityError`).  Only onnxruntime and numpy are imported here —
no training library, no pickle.  Running a learned error estimator next to a solver follows the idea of
learned step-size/stopping signals in adaptive samplers (e.g. TPDM, "Schedule On the Fly", 2024).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .features import FEATURE_NAMES
from .learned import (JsonManifest, check_io_names, graph_runner, import_onnxruntime, load_cached,
                      open_verified_session, sha256_of_bytes, sha256_of_file)

#: Manifest format tag (bumped when the manifest's meaning changes).
MANIFEST_FORMAT = "ado-quality-monitor/1"
#: The monitor shipped with ADO (manifest; the ONNX file sits next to it).
BUNDLED_MONITOR = Path(__file__).resolve().parent.parent / "policies" / "quality_monitor.json"
#: Output columns of the monitor, in order.
OUTPUT_COLUMNS = ("log10_rmse_to_final", "log10_rmse_to_reference")


class MonitorLoadError(RuntimeError):
    """The monitor could not be loaded (missing file, bad manifest, no ONNX Runtime)."""


class MonitorIntegrityError(MonitorLoadError):
    """The ONNX file does not match the sha256 in its manifest (corrupt, truncated or swapped file)."""


@dataclass
class MonitorManifest(JsonManifest):
    """What a monitor file is: the JSON written next to the ONNX graph.

    Attributes:
        onnx_file: file name of the graph, relative to the manifest's folder.
        sha256: hex sha256 of the graph file; checked at load.
        input_name, output_name: tensor names in the graph.
        feature_names: the input columns, in order (must equal :data:`FEATURE_NAMES` at run time).
        output_columns: the output columns, in order (:data:`OUTPUT_COLUMNS`).
        normalisation: how inputs are normalised: ``{"applied_in_graph": true, "mean": [...], "std": [...]}``
            (the graph takes raw features and subtracts/divides itself).
        output_meaning: a sentence per output column.
        training: provenance (command, data, seeds, testbeds, metrics).
        format: :data:`MANIFEST_FORMAT`.
    """

    onnx_file: str
    sha256: str
    input_name: str = "features"
    output_name: str = "log10_error"
    feature_names: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))
    output_columns: list[str] = field(default_factory=lambda: list(OUTPUT_COLUMNS))
    normalisation: dict[str, Any] = field(default_factory=dict)
    output_meaning: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    FORMAT = MANIFEST_FORMAT
    REQUIRED = frozenset({"onnx_file", "sha256"})
    WHAT = "monitor"
    LOAD_ERROR = MonitorLoadError



def _onnxruntime():
    return import_onnxruntime("quality monitor", MonitorLoadError)


class QualityMonitor:
    """An ONNX Runtime session over a verified monitor graph.

    Args:
        manifest_path: the monitor's JSON manifest.
        device: "cpu" (default), "cuda" (CUDA execution provider, CPU as fallback; a warning if CUDA is not
            available or not in use) or "auto" (CUDA when ONNX Runtime offers it).

    Attributes: ``manifest``, ``providers`` (the execution providers the session really uses), ``path``.
    """

    def __init__(self, manifest_path: str | Path, device: str = "cpu") -> None:
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"unknown monitor device {device!r}: expected 'cpu', 'cuda' or 'auto'")
        self.path = Path(manifest_path)
        if not self.path.is_file():
            raise MonitorLoadError(f"monitor manifest not found: {self.path}")
        self.manifest = MonitorManifest.from_json(self.path.read_text())
        if list(self.manifest.feature_names) != list(FEATURE_NAMES):
            raise MonitorLoadError(f"{self.path}: the monitor was trained on features {self.manifest.feature_names}, "
                                   f"this ADO computes {list(FEATURE_NAMES)}")
        self._session, self.providers = open_verified_session(self.path, self.manifest.onnx_file, self.manifest.sha256,
                                                              device, "monitor", MonitorLoadError, MonitorIntegrityError)
        check_io_names(self._session, self.manifest.input_name, self.manifest.output_name,
                       self.path.parent / self.manifest.onnx_file, MonitorLoadError)
        self._run_graph = graph_runner(self._session, self.manifest.input_name, self.manifest.output_name,
                                       np.zeros((1, len(FEATURE_NAMES)), np.float32))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The raw outputs [B, 2] (log10 RMSE to the run's final sample, to the reference) for features [B, N]."""
        f = np.ascontiguousarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"monitor features must be [B, {len(FEATURE_NAMES)}], got shape {f.shape}")
        return self._run_graph(f).astype(np.float64)

    def estimate(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(remaining RMSE to the run's final sample, RMSE to the converged reference) per image, float64 [B]."""
        out = self.predict(features)
        return 10.0 ** out[:, 0], 10.0 ** out[:, 1]

    def __repr__(self) -> str:
        return f"QualityMonitor({str(self.path)!r}, providers={self.providers})"


def load_monitor(spec: Any = None, device: str = "cpu") -> QualityMonitor:
    """The monitor named by ``spec``: None, True or "bundled" → :data:`BUNDLED_MONITOR`; a path to a manifest
    (or to its .onnx graph, whose manifest has the same stem and .json); or a :class:`QualityMonitor`, returned
    as is.  Raises :class:`MonitorLoadError` / :class:`MonitorIntegrityError` with the reason."""
    if isinstance(spec, QualityMonitor):
        return spec
    if spec is None or spec is True or spec == "bundled":
        return QualityMonitor(BUNDLED_MONITOR, device)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.suffix == ".onnx":
            path = path.with_suffix(".json")
        return QualityMonitor(path, device)
    raise TypeError(f"monitor must be None, True, 'bundled', a manifest path or a QualityMonitor, "
                    f"got {type(spec).__name__}")


__all__ = ["BUNDLED_MONITOR", "MANIFEST_FORMAT", "MonitorIntegrityError", "MonitorLoadError", "MonitorManifest",
           "OUTPUT_COLUMNS", "QualityMonitor", "load_monitor", "sha256_of_bytes", "sha256_of_file"]


_CACHE: dict[tuple, QualityMonitor] = {}


def load_monitor_cached(spec: Any = None, device: str = "cpu") -> QualityMonitor:
    """:func:`load_monitor`, reusing a session already made for the same manifest file (same path, size and
    modification time, so a changed file is loaded and verified again) and device."""
    if isinstance(spec, QualityMonitor):
        return spec
    if spec is None or spec is True or spec == "bundled":
        path = BUNDLED_MONITOR
    elif isinstance(spec, (str, Path)):
        path = Path(spec).with_suffix(".json") if Path(spec).suffix == ".onnx" else Path(spec)
    else:
        return load_monitor(spec, device)  # raises the TypeError naming the problem
    return load_cached(_CACHE, path, MonitorManifest, device, load_monitor)


class QualityWatch:
    """Features → remaining-error estimate, once per model call of a run (what the sampler uses).

    Args:
        monitor: a :class:`QualityMonitor`, or None for the model-free fallback
            (:func:`adaptive_core.features.heuristic_remaining_error`; no reference estimate).
        lambda_start, lambda_end, budget: see :class:`adaptive_core.features.FeatureTracker`.

    :meth:`observe` returns (estimated RMSE to the run's final sample, estimated RMSE to the reference), per
    image, float64 [B] (NaN where there is no estimate).
    """

    def __init__(self, monitor: QualityMonitor | None, lambda_start, lambda_end, budget: int) -> None:
        from .features import FeatureTracker
        self.monitor = monitor
        self.source = "monitor" if monitor is not None else "heuristic"
        self.tracker = FeatureTracker(lambda_start, lambda_end, budget)
        self.last_features: np.ndarray | None = None

    def observe(self, denoised, lam: np.ndarray, error_estimate: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Update the features with this call's prediction and return the two estimates (float64 [B])."""
        from .features import heuristic_remaining_error
        f = self.tracker.update(denoised, lam, error_estimate)
        self.last_features = f
        if self.monitor is None:
            return heuristic_remaining_error(f), np.full(f.shape[0], np.nan)
        return self.monitor.estimate(f)


__all__ += ["QualityWatch", "load_monitor_cached"]
