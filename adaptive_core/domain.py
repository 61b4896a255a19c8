"""The domain adapter: which step policy serves a sampling job.

A step policy learns its corrections on the configurations it was trained on (model type, guided or not) and on
the base plan it ran on there (:data:`adaptive_core.policy.LEGACY_BASE_PLAN` or the sampler's own defaults).  A
policy taught one domain can be worse than the heuristic on another: the bundled policy trained on the legacy
plan loses to the heuristic's shifted-time plan on unguided flow runs (docs/policy/README.md, section 5).  So
``controller="policy:auto"`` lets this module pick, per run, the bundled policy made for the job's domain, in the
spirit of mixture-of-experts gating (Jacobs et al. 1991) with a gate that reads the job's declared conditions
rather than a learned one, as domain-specific experts in multi-domain RL are picked by their task identity
(Rusu et al. 2016, "Policy distillation", keeps one head per task for the same reason).

**A job's domain** (:func:`job_domain`): the model type ("ve" or "flow") and the guidance, "unguided" when the
run's classifier-free guidance scale is known to be 1 (:func:`adaptive_core.sampler.detect_guidance_scale`) and
"guided" otherwise, an unknown scale included, which is how the heuristic's own plan treats it
(:func:`adaptive_core.sampler.resolve_flow_plan`).

A flow run's domain also holds its time shift (:func:`adaptive_core.sampler.detect_flow_shift`; undeclared:
:data:`adaptive_core.sampler.DEFAULT_FLOW_SHIFT`, the shift the heuristic then plans with).  The same data under
another declared shift is another σ schedule and so another base plan, and a policy's corrections need not carry
over: the unguided-flow policy, trained at shift 3, was 1.3–1.8× the heuristic's error at shift 1
(docs/policy/README.md, section 6).

A guided run's domain also holds its guidance scale.  A policy trained at CFG 1 and 2 has not seen the larger
corrections of CFG 5–7 (the usual scales of SD 1.5 and SDXL): on the MNIST network at CFG 5, ve, the bundled
policy trained at CFG ≤ 2 was 1.35× the heuristic's error at 5 NFE (docs/policy/README.md, section 9).

A run's domain also holds its budget (model calls).  A policy is trained at a few budgets, and its gain over the
heuristic need not hold at every one, and none was measured to hold outside them: at 15 and 20 calls the bundled
policies, all trained at 5–10, lost to the heuristic in most validation cells, up to 4.9× its error
(docs/policy/validation_auto_15_20.json); the policy for guided ve runs gained at 5–8 calls and lost at 10 on both
networks it was trained on (docs/policy/README.md, section 11).

**A policy's scope** (:func:`policy_scope`): the manifest's ``applies_to`` (``{"model_types": [...],
"guidance": [...]}``, optionally ``"flow_shifts": [lo, hi]``, the shifts of flow runs it covers, and
``"guidance_scales": [lo, hi]``, the CFG scales of guided runs it covers, and ``"nfe_budgets": [lo, hi]``, the
budgets it covers), written by the training tools from the configurations a policy was trained on (the guidance
scales: the range of its guided configurations', the budgets: the range of its training budgets); a manifest
without it covers its ``trained_on.model_types`` under either guidance, any shift, scale and budget.  A guided run
whose scale is unknown is outside every ``guidance_scales`` range, a run whose budget is unknown outside every
``nfe_budgets`` range.

**The rule** (:func:`select_policy`): among the policies whose scope covers the job, the one with the narrowest
scope (fewest model types × guidance kinds); ties go to the first name in sort order.  No policy covers the job:
None, and the sampler runs the heuristic and says so in the trace.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .policy import MANIFEST_FORMAT, PolicyLoadError, bundled_policies

#: The guidance kinds of a job and a policy's scope.
GUIDANCE_KINDS = ("unguided", "guided")
#: The model types a scope may name (adaptive_core.schedules).
MODEL_TYPES = ("ve", "flow")
#: The spec that hands the choice to this module: ``controller="policy:auto"``.
AUTO_POLICY = "policy:auto"


@dataclass(frozen=True)
class JobDomain:
    """What the policy choice of a run depends on: ``model_type`` ("ve" / "flow"), ``guidance`` ("unguided" /
    "guided"), ``guidance_scale`` (the detected CFG scale, None where the host declares none), for a flow run
    ``flow_shift`` (its time shift; None for ve), and ``nfe_budget`` (the run's model calls; None: unknown)."""

    model_type: str
    guidance: str
    guidance_scale: float | None = None
    flow_shift: float | None = None
    nfe_budget: int | None = None

    def describe(self) -> str:
        """One line for the trace, e.g. "flow, unguided (CFG 1), shift 3, 8 calls"."""
        scale = "CFG unknown" if self.guidance_scale is None else f"CFG {self.guidance_scale:g}"
        shift = "" if self.flow_shift is None else f", shift {self.flow_shift:g}"
        budget = "" if self.nfe_budget is None else f", {self.nfe_budget} calls"
        return f"{self.model_type}, {self.guidance} ({scale}){shift}{budget}"


def guidance_kind(guidance_scale: float | None) -> str:
    """"unguided" for a classifier-free guidance scale of exactly 1 (Ho & Salimans 2022: the conditional model
    alone), "guided" for any other scale and for an unknown one (None)."""
    return "unguided" if guidance_scale == 1.0 else "guided"


def job_domain(model, model_type: str, extra_args: dict | None = None, nfe_budget: int | None = None) -> JobDomain:
    """The :class:`JobDomain` of a run on ``model`` (the host's wrapped denoiser, as the sampler receives it)
    of ``model_type`` with ``nfe_budget`` model calls, its guidance read by
    :func:`adaptive_core.sampler.detect_guidance_scale` (ComfyUI's ``CFGGuider.cfg``, A1111/Forge's
    ``extra_args["cond_scale"]``, a testbed's ``cfg_scale``), and for a flow model its time shift
    (:func:`adaptive_core.sampler.detect_flow_shift`, else the default the heuristic uses)."""
    from .sampler import (  # here: sampler imports us
        DEFAULT_FLOW_SHIFT,
        detect_flow_shift,
        detect_guidance_scale,
    )

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    scale = detect_guidance_scale(model, extra_args)
    shift = None
    if model_type == "flow":
        shift = detect_flow_shift(model)
        shift = DEFAULT_FLOW_SHIFT if shift is None else shift
    return JobDomain(model_type, guidance_kind(scale), scale, shift, nfe_budget)


#: The optional range keys of a scope: [lo, hi] of a flow run's time shift, of a guided run's CFG scale and of a
#: run's budget in model calls.
SCOPE_RANGES = ("flow_shifts", "guidance_scales", "nfe_budgets")


def check_scope(scope, where: str = "applies_to") -> dict:
    """A normalised copy of a policy scope ``{"model_types": [...], "guidance": [...]}`` with optional
    ``"flow_shifts": [lo, hi]``, ``"guidance_scales": [lo, hi]`` and ``"nfe_budgets": [lo, hi]``; ValueError
    naming ``where`` when it is not a mapping with these keys, the first two non-empty lists of known values, a
    range two finite numbers 0 < lo ≤ hi."""
    if not isinstance(scope, dict) or not {"model_types", "guidance"} <= set(scope) <= {"model_types", "guidance",
                                                                                        *SCOPE_RANGES}:
        raise ValueError(f"{where} must be a mapping with keys 'model_types' and 'guidance' (and optionally "
                         f"{', '.join(repr(k) for k in SCOPE_RANGES)}), got {scope!r}")
    out = {}
    for key in (k for k in SCOPE_RANGES if k in scope):
        lo_hi = scope[key]
        ok = (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(isinstance(v, (int, float)) and not
              isinstance(v, bool) and math.isfinite(v) for v in lo_hi) and 0 < lo_hi[0] <= lo_hi[1])
        if not ok:
            raise ValueError(f"{where}.{key} must be [lo, hi] with 0 < lo <= hi, got {lo_hi!r}")
        out[key] = [float(lo_hi[0]), float(lo_hi[1])]
    for key, known in (("model_types", MODEL_TYPES), ("guidance", GUIDANCE_KINDS)):
        values = scope[key]
        if not isinstance(values, list) or not values or any(v not in known for v in values):
            raise ValueError(f"{where}.{key} must be a non-empty list of {list(known)}, got {values!r}")
        out[key] = sorted(set(values))
    return dict(sorted(out.items()))


def scope_of_trained_on(trained_on: dict) -> dict:
    """The scope a training run gives its policy, from its manifest's ``trained_on``: its ``model_types``, the
    guidance kinds of its ``configurations`` (keys as ``adaptive_core.tune.policy_env.Config.key``: a
    class-conditional network's end in ``-cfg<scale>``; the others run unguided), where some were guided the
    range of their CFG scales (``guidance_scales``), and the range of its ``budgets`` (``nfe_budgets``): outside
    the budgets they were trained at, the bundled policies lost to the heuristic, up to 4.9× at 15–20 calls
    (docs/policy/validation_auto_15_20.json)."""
    kinds, guided_scales = set(), []
    for key in trained_on.get("configurations") or trained_on.get("testbeds") or []:
        head, _, tail = str(key).rpartition("-cfg")
        scale = float(tail) if head and tail.replace(".", "", 1).isdigit() else 1.0
        kind = guidance_kind(scale)
        kinds.add(kind)
        if kind == "guided":
            guided_scales.append(scale)
    scope = {"model_types": sorted(set(trained_on.get("model_types") or [])), "guidance": sorted(kinds)}
    if guided_scales:
        scope["guidance_scales"] = [min(guided_scales), max(guided_scales)]
    budgets = trained_on.get("budgets") or []
    if budgets:
        scope["nfe_budgets"] = [min(budgets), max(budgets)]
    return check_scope(scope, "trained_on")


def policy_scope(manifest: dict, where: str = "policy") -> dict:
    """The scope of a policy manifest (a parsed JSON dict): its ``applies_to``, else its
    ``trained_on.model_types`` under either guidance.  ValueError (naming ``where``) when neither is usable."""
    if manifest.get("applies_to"):
        return check_scope(manifest["applies_to"], f"{where}: applies_to")
    model_types = (manifest.get("trained_on") or {}).get("model_types")
    if not model_types:
        raise ValueError(f"{where}: the manifest names neither applies_to nor trained_on.model_types")
    return check_scope({"model_types": list(model_types), "guidance": list(GUIDANCE_KINDS)},
                       f"{where}: trained_on.model_types")


def bundled_scopes(policy_dir: str | Path | None = None) -> dict[str, dict]:
    """{name: scope} of the policy manifests in ``policy_dir`` (None: :data:`adaptive_core.policy.POLICY_DIR`,
    policies/); a manifest whose scope is malformed raises PolicyLoadError naming the file (a bundled file is
    never skipped silently)."""
    from . import policy
    scopes = {}
    for path in sorted(Path(policy.POLICY_DIR if policy_dir is None else policy_dir).glob("*.json")):
        scope = _manifest_scope(path)
        if scope is not None:
            scopes[path.stem] = scope
    return scopes


#: {resolved manifest path: ((size, mtime), scope)}: one entry per file, replaced when the file changes.
_SCOPE_CACHE: dict[str, tuple[tuple[int, int], dict | None]] = {}


def _manifest_scope(path: Path) -> dict | None:
    """The scope of the policy manifest at ``path`` (None for a JSON file that is not a policy manifest, e.g. the
    quality monitor's), cached per file by its size and mtime so that ``policy:auto`` does not re-parse every
    bundled manifest on each sampling call; an edited file is read again."""
    try:
        stat = path.stat()
        key, version = str(path.resolve()), (stat.st_size, stat.st_mtime_ns)
        cached = _SCOPE_CACHE.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PolicyLoadError(f"{path}: unreadable manifest ({e})") from None
    scope = None
    if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
        try:
            scope = policy_scope(manifest, str(path))
        except ValueError as e:
            raise PolicyLoadError(str(e)) from None
    _SCOPE_CACHE[key] = (version, scope)
    return scope


def select_policy(domain: JobDomain, scopes: dict[str, dict] | None = None) -> str | None:
    """The name of the policy for ``domain`` among ``scopes`` ({name: scope}; the bundled policies by default):
    of those whose scope covers the domain (model type, guidance, a flow run's shift and a guided run's CFG scale
    and its budget, where the scope names their ranges), the narrowest (fewest model types × guidance kinds), ties
    to the first name in sort order; None when none covers it."""
    scopes = bundled_scopes() if scopes is None else scopes
    covering = [(len(s["model_types"]) * len(s["guidance"]), name) for name, s in sorted(scopes.items())
                if domain.model_type in s["model_types"] and domain.guidance in s["guidance"]
                and _shift_covered(s, domain) and _scale_covered(s, domain) and _budget_covered(s, domain)]
    return min(covering)[1] if covering else None


def _scale_covered(scope: dict, domain: JobDomain) -> bool:
    """Whether ``scope``'s ``guidance_scales`` range (if any) holds a guided run's CFG scale (an unknown scale is
    outside it); unguided runs are not restricted."""
    if "guidance_scales" not in scope or domain.guidance != "guided":
        return True
    lo, hi = scope["guidance_scales"]
    return domain.guidance_scale is not None and lo <= domain.guidance_scale <= hi


def _budget_covered(scope: dict, domain: JobDomain) -> bool:
    """Whether ``scope``'s ``nfe_budgets`` range (if any) holds the run's budget (an unknown budget is outside it)."""
    if "nfe_budgets" not in scope:
        return True
    lo, hi = scope["nfe_budgets"]
    return domain.nfe_budget is not None and lo <= domain.nfe_budget <= hi


def _shift_covered(scope: dict, domain: JobDomain) -> bool:
    """Whether ``scope``'s ``flow_shifts`` range (if any) holds a flow run's shift; ve runs are not restricted."""
    if "flow_shifts" not in scope or domain.model_type != "flow" or domain.flow_shift is None:
        return True
    lo, hi = scope["flow_shifts"]
    return lo <= domain.flow_shift <= hi


def controller_choices() -> list[str]:
    """The step controllers a host offers: "heuristic", :data:`AUTO_POLICY` (this module picks) and
    "policy:NAME" for each bundled policy (:func:`adaptive_core.policy.bundled_policies`)."""
    return ["heuristic", AUTO_POLICY] + [f"policy:{n}" for n in bundled_policies()]


__all__ = [
    "AUTO_POLICY",
    "GUIDANCE_KINDS",
    "MODEL_TYPES",
    "SCOPE_RANGES",
    "JobDomain",
    "bundled_scopes",
    "check_scope",
    "controller_choices",
    "guidance_kind",
    "job_domain",
    "policy_scope",
    "scope_of_trained_on",
    "select_policy",
]
