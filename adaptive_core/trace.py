"""What a run did: the noise levels actually taken, model calls, error estimates and decisions.

A :class:`Trace` is filled by :func:`adaptive_core.sample_adaptive` (pass ``trace=Trace()``), serialises to
JSON for sharing, and :func:`replay_sigmas` turns it back into a σ grid that any fixed-step sampler (or
ADO in ``mode="fixed"``) follows to reproduce the run.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class StepRecord:
    """One model call of one sample: where it was evaluated and what the controller did after it."""

    nfe: int                 # 1-based model-call index within the run
    sigma: float             # σ at which the model was evaluated
    sigma_next: float        # σ the controller moved to afterwards (0 after the final call)
    order: int               # order of the predictor that produced this point (0 for the initial point)
    error: float | None      # scaled predictor–corrector gap at this point (None where no estimate exists)
    accepted: bool           # False if the step that led here was rejected and retried
    decision: str            # short reason, e.g. "plan", "replan", "reject", "final", "quality-stop"
    #: quality monitor (runs with a monitor or quality target only; None otherwise, and left out of the JSON):
    #: estimated RMSE from this call's denoised prediction to the run's final sample / to the reference solution
    estimated_remaining_error: float | None = None
    estimated_reference_error: float | None = None


#: StepRecord fields that are written to JSON only when set (older traces lack them).
_OPTIONAL_FIELDS = ("estimated_remaining_error", "estimated_reference_error")


@dataclass
class Trace:
    """Per-sample record of a run of :func:`adaptive_core.sample_adaptive`.

    ``samples[b]`` is the list of :class:`StepRecord` of sample b.  ``planned_sigmas`` is the host's grid,
    ``options`` the sampler options, ``nfe`` the model calls of the whole batch (a batched call is one NFE).
    """

    model_type: str = ""
    nfe_budget: int = 0
    nfe: int = 0
    planned_sigmas: list[float] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    samples: list[list[StepRecord]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def start(self, batch: int, model_type: str, nfe_budget: int, planned_sigmas, options: dict) -> None:
        """Reset the trace for a new run of ``batch`` samples."""
        self.model_type, self.nfe_budget, self.nfe = model_type, nfe_budget, 0
        self.planned_sigmas = [float(s) for s in planned_sigmas]
        self.options = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                        for k, v in options.items()}
        self.samples = [[] for _ in range(batch)]
        self.notes = []

    def record(self, b: int, rec: StepRecord) -> None:
        self.samples[b].append(rec)

    def sigmas_taken(self, b: int = 0) -> list[float]:
        """The accepted evaluation σ of sample b, in order, then the plan's end (0, or σ_end of a partial plan)."""
        end = self.planned_sigmas[-1] if self.planned_sigmas else 0.0
        return [r.sigma for r in self.samples[b] if r.accepted] + [end]

    def errors(self, b: int = 0) -> list[float | None]:
        """Per-accepted-step error estimates of sample b."""
        return [r.error for r in self.samples[b] if r.accepted]

    def quality_curve(self, b: int = 0) -> list[tuple[int, float | None, float | None]]:
        """Sample b's quality curve: (model call, estimated RMSE to the run's final sample, estimated RMSE to
        the reference) per call, from the quality monitor (None where the run had no monitor)."""
        return [(r.nfe, r.estimated_remaining_error, r.estimated_reference_error) for r in self.samples[b]]

    def sample_nfe(self, b: int = 0) -> int:
        """Model calls that sample b needed: its last recorded call (fewer than ``nfe`` if it stopped early)."""
        return self.samples[b][-1].nfe if self.samples[b] else 0

    def to_dict(self) -> dict:
        """A JSON-ready dict (infinite values written as strings)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            return v
        d = asdict(self)
        d["samples"] = [[{k: clean(v) for k, v in r.items() if v is not None or k not in _OPTIONAL_FIELDS}
                         for r in recs] for recs in d["samples"]]
        return d

    def to_json(self, **kwargs) -> str:
        """The trace as a JSON string."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Trace":
        """Rebuild a trace written by :meth:`to_json`."""
        d = json.loads(text)
        samples = [[StepRecord(**{k: (float(v) if k in ("sigma", "sigma_next") else v) for k, v in r.items()})
                    for r in recs] for recs in d.pop("samples")]
        return cls(samples=samples, **d)


def replay_sigmas(trace: Trace, sample: int = 0) -> torch.Tensor:
    """The σ grid realised by one sample of a traced run (float64, descending, ending in 0).

    Feeding it to a fixed-step sampler with one model call per step (euler, dpmpp_2m, ADO ``mode="fixed"``)
    evaluates the model at the same noise levels; ADO in fixed mode on this grid reproduces the run.
    """
    if not trace.samples or not trace.samples[sample]:
        raise ValueError("the trace is empty: pass trace=Trace() to sample_adaptive first")
    return torch.tensor(trace.sigmas_taken(sample), dtype=torch.float64)
