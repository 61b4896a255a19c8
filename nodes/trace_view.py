"""What the browser chart of a run shows, as a small JSON-ready dict (drawn by ``web/ado_trace.js``).

Host-free: it reads only a :class:`~adaptive_core.trace.Trace`.
"""
from __future__ import annotations

import math

from ..adaptive_core import Trace

#: Version of the payload layout; ``web/ado_trace.js`` checks it.
PAYLOAD_VERSION = 1


def _num(v):
    """A finite float, or None (JSON has no inf/NaN)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def chart_payload(trace: Trace, sample: int = 0) -> dict:
    """The chart of one sample of a run: σ taken vs the planned grid, error per call, NFE vs budget.

    Keys: ``version``, ``model_type``, ``mode``, ``nfe``, ``nfe_budget``, ``batch``, ``sample``,
    ``planned`` (the host's σ grid), ``taken`` (σ of the accepted evaluations, then the end), ``calls``
    (one entry per model call of that sample: ``sigma``, ``error``, ``accepted``, ``order``, ``decision``,
    and the quality monitor's ``remaining_error`` / ``reference_error``, None without a monitor),
    ``rejected`` (number of rejected steps), ``sample_nfe`` (model calls per sample) and ``quality_target``
    (None unless the run had one).
    Raises ValueError for an empty trace or a sample index outside the batch.
    """
    if not trace.samples:
        raise ValueError("the trace is empty: the run has not filled it")
    if not 0 <= sample < len(trace.samples):
        raise ValueError(f"sample {sample} is outside the batch of {len(trace.samples)}")
    recs = trace.samples[sample]
    return {
        "version": PAYLOAD_VERSION,
        "model_type": trace.model_type,
        "mode": str(trace.options.get("mode", "")),
        "nfe": int(trace.nfe),
        "nfe_budget": int(trace.nfe_budget),
        "batch": len(trace.samples),
        "sample": sample,
        "planned": [_num(s) for s in trace.planned_sigmas],
        "taken": [_num(s) for s in trace.sigmas_taken(sample)],
        "calls": [{"sigma": _num(r.sigma), "error": _num(r.error), "accepted": bool(r.accepted),
                   "order": int(r.order), "decision": r.decision,
                   "remaining_error": _num(r.estimated_remaining_error),
                   "reference_error": _num(r.estimated_reference_error)} for r in recs],
        "rejected": sum(1 for r in recs if not r.accepted),
        "sample_nfe": [len(s) for s in trace.samples],
        "quality_target": _num(trace.options.get("quality_target")),
    }
