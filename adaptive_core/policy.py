"""The PPO step-size policy at run time: a small ONNX actor that turns the per-step features and the quality
monitor's estimate into the next step size.

Idea: a learned controller chooses the next noise level during sampling (TPDM, "Schedule On the Fly", 2024, with
PPO; AdaDiff, 2023, for RL-chosen step budgets); trained offline with PPO (Schulman et al. 2017) by
``python -m adaptive_core.tune policy`` and shipped as ONNX + JSON manifest (no pickle, no training library
here: numpy and, lazily, onnxruntime only).

**Observation** (:data:`OBSERVATION_NAMES`, one row per image and decision): the features of
:mod:`adaptive_core.features`, the monitor's two log10 error estimates (clipped to [−8, 2]) and log of the
*base share* — the share of the remaining λ-span that the heuristic budget plan takes with its next step.

**Action** (per image and decision; action kind ``share_and_order``, two numbers in [−1, 1]; the older kind
``share_of_remaining_lambda`` has the first only):

* a₀, the step: the next step, as a share of the remaining half-log-SNR span (from the current λ to the run's
  last evaluation λ), is ``clip(base_share · exp(action_scale · a₀), min_share, 1)``.  a₀ = 0 is the
  heuristic's step; a share of 1 jumps to the end (the image stops early: fewer NFE).  The sampler keeps the last
  call on the end point, so the budget is never exceeded; after a moved point the rest of the plan is re-laid
  from it as the first plan was (uniform in σ^{1/ρ}, the prior plan, or in shifted time).
* a₁, the solver order of that step, relative to the heuristic's (:func:`order_delta_from_action`): a₁ ≤ −½
  lowers the predictor's order by one (at least 1); a₁ ≥ ½ lifts the heuristic's long-step limit (order 3 on
  steps longer than ``high_order_max_step`` where the history allows it); in between, the heuristic's order.
  The dead zone makes a₁ = 0 — where PPO starts — the heuristic.  Where the order helps is learnt per step, as
  DPM-Solver (Lu et al. 2022) and UniPC (Zhao et al. 2023) pick lower orders for the few-step regime by rule.

**Where it acts** (``min_lambda_progress`` in the manifest's action, 0 by default): decisions before that share
of the run's λ-span (feature ``lambda_progress``) keep the heuristic's step and order without asking the
policy.  The image is decided in the high-noise steps (a different class or layout there is a different
picture: the "critical windows" of Li & Chen 2024 and the phase transition of Sclocchi, Favero & Wyart
2024), and longer steps there made a few images flip in the measurements (docs/policy/README.md); training uses
the same rule, so the policy learns the later steps only.

**A cap on the early steps** (``early_step_cap`` in the manifest's action, absent by default:
``{"below_lambda_progress": p, "max_step_action": a}``): on the rows the policy decides before the share p of
the λ-span, a₀ is capped at a, so those steps are at most ``exp(action_scale · a)`` times the heuristic's (shorter
ones stay allowed).  Where ``min_lambda_progress`` hands the early steps to the heuristic, the cap keeps them with
the policy within a trust region around the heuristic (TRPO's bounded policy change, Schulman et al. 2015).
Training applies the same cap (``policy --early-step-cap``), so PPO learns the steps it may take.

**Fallback rule** (:meth:`Policy.decide`): an observation row falls back to the heuristic step (a = 0) when any
entry is non-finite or lies more than ``ood_z`` standard deviations (std floored at ``std_floor``) from the
mean of the observations seen in training (the manifest's normalisation statistics).  The sampler writes each
fallback in the trace (``decision="policy-fallback"`` and a note).

**Damping before the fallback** (``soft_z`` in the manifest's fallback; absent: none): inside that range, a row's
actions are scaled by ``clip((ood_z − z_max) / (ood_z − soft_z), 0, 1)``, with z_max its largest |z|.  So the
policy acts fully up to ``soft_z`` std from the training mean, and its correction of the heuristic shrinks
linearly to none at ``ood_z``, where the hard fallback takes over, instead of jumping from full to none there.
The policy is a residual on the heuristic controller (residual policy learning: Silver et al. 2018, Johannink
et al. 2019), so a damped action is a step between the heuristic's and the policy's.  On networks no policy was
trained on, rows 3–6 std out are common (the denoised image's RMS is another data set's); damped from 3 std, the
worst of their 12 cells went from 1.22× to 1.06× the heuristic's error (docs/policy/README.md, section 8).
The sampler notes each damped decision in the trace.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .features import FEATURE_NAMES
from .learned import (
    JsonManifest,
    check_io_names,
    graph_runner,
    load_cached,
    open_verified_session,
)

#: Manifest format tag.
MANIFEST_FORMAT = "ado-ppo-policy/1"
#: Folder of the bundled policies (``policy:NAME`` → ``POLICY_DIR / NAME.json``).
POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
#: The observation columns, in order.
OBSERVATION_NAMES = tuple(FEATURE_NAMES) + ("monitor_log10_rmse_to_final", "monitor_log10_rmse_to_reference",
                                            "log_base_share")
N_OBSERVATIONS = len(OBSERVATION_NAMES)
#: Action mapping (see the module docstring): factor range exp(±ACTION_SCALE) around the heuristic's share.
ACTION_SCALE = float(np.log(4.0))
MIN_SHARE = 0.02
#: Action kinds and their number of outputs.
ACTION_KINDS = {"share_of_remaining_lambda": 1, "share_and_order": 2}
#: |a₁| below this keeps the heuristic's solver order (see :func:`order_delta_from_action`).
ORDER_DEAD_ZONE = 0.5
#: Index of ``lambda_progress`` in an observation row (the ``min_lambda_progress`` rule reads it).
LAMBDA_PROGRESS_INDEX = OBSERVATION_NAMES.index("lambda_progress")
#: Keys of the manifest's ``action.early_step_cap`` (see the module docstring, "A cap on the early steps").
EARLY_STEP_CAP_KEYS = ("below_lambda_progress", "max_step_action")
#: Fallback rule defaults: |z| > OOD_Z with std floored at STD_FLOOR.
OOD_Z = 6.0
STD_FLOOR = 0.05
#: Largest |z| at which an exported policy's actions are not yet damped (module docstring, "Damping before the
#: fallback").  On the bundled policies' training configurations the median decision's largest |z| is 1.7–2.3;
#: the Gaussian testbed is the widest (10 % of its ve decisions beyond 3.5).
SOFT_Z = 3.0
_MONITOR_CLIP = (-8.0, 2.0)


class PolicyLoadError(RuntimeError):
    """The policy could not be loaded (missing file, bad manifest, no ONNX Runtime)."""


class PolicyIntegrityError(PolicyLoadError):
    """The ONNX file does not match the sha256 in its manifest."""


def share_from_action(base_share, action, action_scale: float = ACTION_SCALE, min_share: float = MIN_SHARE) -> np.ndarray:
    """Share of the remaining λ-span for the next step: ``clip(base · exp(scale · clip(a, −1, 1)), min_share, 1)``
    (a multiplicative correction of the heuristic's step, as TPDM's policy picks the next noise level)."""
    a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    return np.clip(np.asarray(base_share, dtype=np.float64) * np.exp(action_scale * a), min_share, 1.0)


def order_delta_from_action(action, dead_zone: float = ORDER_DEAD_ZONE) -> np.ndarray:
    """The solver-order change of the step per image (int64, −1 / 0 / +1) from the order action a₁: −1 where
    a₁ ≤ −dead_zone, +1 where a₁ ≥ dead_zone, else 0 (the heuristic's order).  A dead zone rather than a
    rounding keeps PPO's initial mean action (0) on the heuristic, whose order rule follows Lu et al. 2022."""
    a = np.asarray(action, dtype=np.float64)
    return np.where(a <= -dead_zone, -1, np.where(a >= dead_zone, 1, 0)).astype(np.int64)


def check_early_step_cap(cap) -> tuple[float, float] | None:
    """The early-step cap as (below_lambda_progress, max_step_action), checked: None stays None; a mapping with
    :data:`EARLY_STEP_CAP_KEYS` (the manifest's form) or a pair is accepted.  Raises ValueError unless
    0 < below_lambda_progress ≤ 1 and −1 ≤ max_step_action ≤ 1 (module docstring, "A cap on the early steps";
    a trust region around the heuristic's step, Schulman et al. 2015)."""
    if cap is None:
        return None
    try:
        below, most = (cap[k] for k in EARLY_STEP_CAP_KEYS) if isinstance(cap, dict) else cap
        below, most = float(below), float(most)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"early_step_cap must be {{{', '.join(EARLY_STEP_CAP_KEYS)}}} or a pair of numbers, "
                         f"got {cap!r}") from None
    if not 0.0 < below <= 1.0:
        raise ValueError(f"early_step_cap: below_lambda_progress must be in (0, 1], got {below}")
    if not -1.0 <= most <= 1.0:
        raise ValueError(f"early_step_cap: max_step_action must be in [-1, 1], got {most}")
    return below, most


def cap_early_step_actions(actions: np.ndarray, observation: np.ndarray, decided: np.ndarray, cap) -> np.ndarray:
    """``actions`` [B, n_actions] (a float64 copy) with the step action a₀ capped at ``cap``'s max_step_action on
    the ``decided`` rows whose ``lambda_progress`` is below its below_lambda_progress; other rows and the order
    action unchanged (module docstring, "A cap on the early steps").  ``cap``: None, or the pair
    :func:`check_early_step_cap` returns (checked once where the cap is set, not on this per-decision path)."""
    out = np.array(actions, dtype=np.float64).reshape(len(decided), -1)
    if cap is None:
        return out
    below, most = cap
    with np.errstate(invalid="ignore"):   # (a NaN progress compares False: its row is not capped)
        rows = np.asarray(decided, dtype=bool) & (np.asarray(observation)[:, LAMBDA_PROGRESS_INDEX] < below)
    out[rows, 0] = np.minimum(out[rows, 0], most)
    return out


def policy_observation(features, estimates, base_share) -> np.ndarray:
    """The policy's observation rows [B, N_OBSERVATIONS] (float32) from the features [B, 14], the monitor's
    (remaining, reference) RMSE estimates ([B] each) and the heuristic's base share [B]."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"features must be [B, {len(FEATURE_NAMES)}], got shape {f.shape}")
    cols = [f]
    for est in estimates:
        e = np.asarray(est, dtype=np.float64).reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cols.append(np.clip(np.nan_to_num(np.log10(e), nan=_MONITOR_CLIP[1], posinf=_MONITOR_CLIP[1],
                                              neginf=_MONITOR_CLIP[0]), *_MONITOR_CLIP))
    cols.append(np.log(np.clip(np.asarray(base_share, dtype=np.float64), 1e-6, 1.0)).reshape(-1, 1))
    return np.concatenate(cols, 1).astype(np.float32)


def _observation_rows(o: np.ndarray) -> np.ndarray:
    """``o`` itself if it is a [B, N_OBSERVATIONS] array of observation rows, else a ValueError naming its shape."""
    if o.ndim != 2 or o.shape[1] != N_OBSERVATIONS:
        raise ValueError(f"policy observations must be [B, {N_OBSERVATIONS}], got shape {o.shape}")
    return o


@dataclass
class PolicyManifest(JsonManifest):
    """What a policy file is: the JSON written next to the ONNX actor.

    Attributes:
        onnx_file, sha256: the graph (relative to the manifest's folder) and its hex sha256, checked at load.
        input_name, output_name: tensor names (raw observations in, actions in [−1, 1] out).
        observation_names: the input columns (must equal :data:`OBSERVATION_NAMES`).
        normalisation: ``{"applied_in_graph": true, "mean", "var", "epsilon", "clip_obs"}`` (SB3 VecNormalize).
        action: the mapping ``{"kind": "share_and_order" | "share_of_remaining_lambda", "action_scale",
            "min_share", "order_dead_zone", "min_lambda_progress", "formula"}`` and, where training capped the early
            steps, ``"early_step_cap"`` (see the module docstring).
        fallback: ``{"ood_z", "std_floor", "rule"}``.
        trained_on: ``{"testbeds": [...], "model_types": [...], "budgets": [...]}``.
        applies_to: ``{"model_types": [...], "guidance": [...]}``, the jobs ``controller="policy:auto"`` may give
            this policy (:mod:`adaptive_core.domain`); empty: its ``trained_on.model_types`` under any guidance.
        training, metrics: configuration and evaluation numbers (provenance).
        training_state: optional ``{"file", "sha256", ...}``: the PPO critic that fine-tuning from this file
            starts from (``python -m adaptive_core.tune policy --init``); unused when sampling.
        format: :data:`MANIFEST_FORMAT`.
    """

    onnx_file: str
    sha256: str
    input_name: str = "observation"
    output_name: str = "action"
    observation_names: list[str] = field(default_factory=lambda: list(OBSERVATION_NAMES))
    normalisation: dict[str, Any] = field(default_factory=dict)
    action: dict[str, Any] = field(default_factory=dict)
    fallback: dict[str, Any] = field(default_factory=dict)
    trained_on: dict[str, Any] = field(default_factory=dict)
    applies_to: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    FORMAT = MANIFEST_FORMAT
    REQUIRED = frozenset({"onnx_file", "sha256", "normalisation", "action"})
    WHAT = "policy"
    LOAD_ERROR = PolicyLoadError



class Policy:
    """A verified ONNX actor plus its manifest's action mapping and fallback rule.

    :meth:`act` gives the deterministic actions; :meth:`decide` adds the out-of-range fallback (what the
    sampler calls).  Attributes: ``manifest``, ``path``, ``name``, ``action_scale``, ``min_share``,
    ``min_lambda_progress``, ``early_step_cap`` (None, or (below_lambda_progress, max_step_action)),
    ``base_options`` (the sampler options it runs on: the manifest's ``action.base_plan`` or
    :data:`LEGACY_BASE_PLAN`).
    """

    def __init__(self, manifest_path: str | Path, device: str = "cpu") -> None:
        self.path = Path(manifest_path)
        if not self.path.is_file():
            raise PolicyLoadError(f"policy manifest not found: {self.path}")
        self.manifest = PolicyManifest.from_json(self.path.read_text())
        self.name = self.path.stem
        m = self.manifest
        if list(m.observation_names) != list(OBSERVATION_NAMES):
            raise PolicyLoadError(f"{self.path}: the policy was trained on observations {m.observation_names}, "
                                  f"this ADO computes {list(OBSERVATION_NAMES)}")
        if m.action.get("kind") not in ACTION_KINDS:
            raise PolicyLoadError(f"{self.path}: unknown action kind {m.action.get('kind')!r}; this ADO knows "
                                  f"{sorted(ACTION_KINDS)}")
        self.n_actions = ACTION_KINDS[m.action["kind"]]
        try:
            self.action_scale = float(m.action["action_scale"])
            self.min_share = float(m.action["min_share"])
            self.order_dead_zone = float(m.action.get("order_dead_zone", ORDER_DEAD_ZONE))
            self.min_lambda_progress = float(m.action.get("min_lambda_progress", 0.0))
            self._mean = np.asarray(m.normalisation["mean"], dtype=np.float64)
            self._std = np.maximum(np.sqrt(np.asarray(m.normalisation["var"], dtype=np.float64)),
                                   float(m.fallback.get("std_floor", STD_FLOOR)))
            self._inv_std = 1.0 / self._std
        except (KeyError, TypeError, ValueError) as e:
            raise PolicyLoadError(f"{self.path}: incomplete action mapping or normalisation ({e!r})") from None
        if not 0.0 <= self.min_lambda_progress < 1.0:
            raise PolicyLoadError(f"{self.path}: min_lambda_progress must be in [0, 1), got "
                                  f"{self.min_lambda_progress}")
        try:
            self.early_step_cap = check_early_step_cap(m.action.get("early_step_cap"))
        except ValueError as e:
            raise PolicyLoadError(f"{self.path}: {e}") from None
        if self._mean.shape != (N_OBSERVATIONS,) or self._std.shape != (N_OBSERVATIONS,):
            raise PolicyLoadError(f"{self.path}: normalisation must have {N_OBSERVATIONS} entries")
        try:
            self.base_options = check_base_plan(m.action.get("base_plan", LEGACY_BASE_PLAN))
            rule = m.action.get("auto_plan_rule")
            if uses_auto_plan(self.base_options) and rule != AUTO_PLAN_RULE:
                raise ValueError(f"its base plan {self.base_options} was trained under the sampler's 'auto' rule "
                                 f"{rule!r}, and this ADO's rule is {AUTO_PLAN_RULE!r}; fine-tune it on this one "
                                 f"(python -m adaptive_core.tune policy --init {self.path} --base-plan current)")
            if m.applies_to:
                from .domain import check_scope
                check_scope(m.applies_to)
        except ValueError as e:
            raise PolicyLoadError(f"{self.path}: {e}") from None
        self.ood_z = float(m.fallback.get("ood_z", OOD_Z))
        self._lo, self._hi = self._mean - self.ood_z * self._std, self._mean + self.ood_z * self._std   # (the box)
        soft_z = m.fallback.get("soft_z")
        if soft_z is not None and (isinstance(soft_z, bool) or not isinstance(soft_z, (int, float))):
            raise PolicyLoadError(f"{self.path}: fallback soft_z must be a number, got {soft_z!r}")
        self.soft_z = None if soft_z is None else float(soft_z)
        if self.soft_z is not None and not 0.0 <= self.soft_z < self.ood_z:
            raise PolicyLoadError(f"{self.path}: fallback soft_z must be in [0, ood_z={self.ood_z:g}), got "
                                  f"{self.soft_z:g}")
        undamped_z = self.ood_z if self.soft_z is None else self.soft_z   # rows inside act undamped: decide's fast path
        self._undamped_box = ((self._mean - undamped_z * self._std).tolist(),
                              (self._mean + undamped_z * self._std).tolist())
        self._session, self.providers = open_verified_session(self.path, m.onnx_file, m.sha256, device, "policy",
                                                              PolicyLoadError, PolicyIntegrityError)
        check_io_names(self._session, m.input_name, m.output_name, self.path.parent / m.onnx_file, PolicyLoadError)
        self._run_graph = graph_runner(self._session, m.input_name, m.output_name,
                                       self._mean.reshape(1, -1).astype(np.float32))
        try:   # one probe row: the graph must give the action width its manifest's kind says
            self.act(self._mean.reshape(1, -1))
        except PolicyLoadError:
            raise
        except Exception as e:
            raise PolicyLoadError(f"{self.path}: the policy graph fails on an observation row ({e})") from None

    def act(self, observation: np.ndarray) -> np.ndarray:
        """Deterministic actions [B, n_actions] in [−1, 1] for raw observations [B, N_OBSERVATIONS]
        (normalisation is in the graph)."""
        o = _observation_rows(np.ascontiguousarray(observation, dtype=np.float32))
        a = self._run_graph(o).reshape(o.shape[0], -1).astype(np.float64)
        if a.shape[1] != self.n_actions:
            raise PolicyLoadError(f"{self.path}: the graph gives {a.shape[1]} action(s) per row, its action kind "
                                  f"{self.manifest.action['kind']!r} needs {self.n_actions}")
        np.maximum(a, -1.0, out=a)   # (the graph clips already; cheap guard for other graphs)
        return np.minimum(a, 1.0, out=a)

    def _largest_z(self, o: np.ndarray) -> np.ndarray:
        """Per row of float64 observations, the largest |z| (NaN where an entry is NaN, inf where one is ±inf)."""
        z = o - self._mean   # (mean and std are finite, std > 0: no floating-point warning, NaN stays NaN)
        np.abs(z, out=z)
        z *= self._inv_std
        return z.max(1)

    def out_of_range(self, observation: np.ndarray) -> list[str | None]:
        """Per row: None if inside the training range, else the reason (first offending column and its z)."""
        return self._reasons(np.asarray(observation, dtype=np.float64))

    def _reasons(self, o: np.ndarray, z_max: np.ndarray | None = None) -> list[str | None]:
        z_max = self._largest_z(o) if z_max is None else z_max
        inside = z_max <= self.ood_z   # NaN compares False: caught here too
        reasons: list[str | None] = [None] * o.shape[0]
        if inside.all():
            return reasons
        with np.errstate(invalid="ignore"):
            z = np.abs(o - self._mean) / self._std
        for i in np.flatnonzero(~inside):
            row, zr = o[i], z[i]
            if not np.isfinite(row).all():
                reasons[i] = f"{OBSERVATION_NAMES[int(np.argmin(np.isfinite(row)))]} is not finite"
            else:
                j = int(np.argmax(zr))
                reasons[i] = (f"{OBSERVATION_NAMES[j]}={row[j]:.3g} is {zr[j]:.1f} std from the training mean "
                              f"(limit {self.ood_z:g})")
        return reasons

    def _gain(self, z_max: np.ndarray) -> np.ndarray:
        gain = np.minimum((self.ood_z - z_max) / (self.ood_z - self.soft_z), 1.0)
        return np.where(z_max <= self.ood_z, gain, 0.0)   # (NaN compares False: 0)

    def action_gain(self, observation: np.ndarray) -> np.ndarray:
        """Per row, the factor :meth:`decide` scales the policy's actions by (module docstring, "Damping before the
        fallback"): 1 while the row's largest |z| is at most ``soft_z``, falling linearly to 0 at ``ood_z``; 0 for a
        non-finite row; all 1 when the manifest sets no ``soft_z``."""
        o = np.asarray(observation, dtype=np.float64)
        return np.ones(o.shape[0]) if self.soft_z is None else self._gain(self._largest_z(o))

    def _all_rows_undamped(self, o: np.ndarray) -> bool:
        """Whether every row of ``o`` [B, N_OBSERVATIONS] lies within ``soft_z`` (without one: ``ood_z``) std of the
        training mean, where :meth:`decide` is the bare actor (a NaN compares False).  A sampler decides one row per
        image: for a few rows this compares in plain Python, since on a slow CPU each numpy call ahead of the ONNX
        call costs more than its arithmetic (section 14 of docs/policy/README.md)."""
        lo, hi = self._undamped_box
        if o.shape[0] > 8:
            return bool(((o >= lo) & (o <= hi)).all())
        for row in o.tolist():
            for value, low, high in zip(row, lo, hi):
                if not low <= value <= high:
                    return False
        return True

    def decide(self, observation: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """(actions [B, n_actions], per-row fallback reason or None): rows out of the training range get action 0,
        the heuristic's own step and order; rows between ``soft_z`` and ``ood_z`` std out get the policy's actions
        scaled by :meth:`action_gain`."""
        o = _observation_rows(np.asarray(observation))
        if self._all_rows_undamped(o):
            return self.act(o), [None] * o.shape[0]
        o = o.astype(np.float64)
        z_max = self._largest_z(o)
        ok = z_max <= self.ood_z
        if ok.all():
            reasons: list[str | None] = [None] * o.shape[0]
            actions = self.act(observation)
        else:
            reasons = self._reasons(o, z_max)
            actions = np.zeros((len(reasons), self.n_actions))
            if ok.any():
                actions[ok] = self.act(o[ok])
        if self.soft_z is not None:   # (gain 1 up to soft_z; fallback rows act 0 already)
            actions *= self._gain(z_max)[:, None]
        return actions, reasons

    def __repr__(self) -> str:
        return f"Policy({str(self.path)!r})"


def bundled_policies() -> list[str]:
    """Names of the policies in :data:`POLICY_DIR` (manifests with the policy format), sorted."""
    names = []
    for p in sorted(POLICY_DIR.glob("*.json")):
        try:
            if json.loads(p.read_text()).get("format") == MANIFEST_FORMAT:
                names.append(p.stem)
        except (OSError, ValueError):
            continue
    return names


def resolve_policy_path(spec: str | Path) -> Path:
    """The manifest path for ``spec``: a bundled name (``"ppo_ve"`` → policies/ppo_ve.json), a manifest path,
    or an ONNX path (its manifest has the same stem)."""
    text = str(spec)
    if text.startswith("policy:"):
        text = text[len("policy:"):]
    if not text:
        raise ValueError("empty policy name: expected 'policy:NAME' with a bundled name or a manifest path")
    path = Path(text)
    if path.suffix == ".onnx":
        path = path.with_suffix(".json")
    if path.suffix != ".json" and path.parent == Path("."):
        path = POLICY_DIR / f"{text}.json"
    return path


_CACHE: dict[tuple, Policy] = {}


#: The sampler options a policy's decisions were learned on, where its manifest names none (``action.base_plan``):
#: the policies before 2026-11-28 were trained on the data-prediction form, the ρ plan and the midpoint predictor,
#: also for flow models, at predictor order 3 (the order action is relative to it).  The sampler runs a policy on
#: these unless the caller sets the option (:func:`adaptive_core.sample_adaptive`), because the policy scales the
#: plan's next step and its corrections mean nothing on another plan.
LEGACY_BASE_PLAN = {"prediction": "data", "flow_shift": None, "predictor": "midpoint", "max_order": 3,
                    "second_order_max_step": None}
#: The sampler's own defaults as a base plan (a policy trained on them follows the heuristic's plan of the day,
#: e.g. the shifted-time plan of unguided flow runs), but at order 3 where the sampler's "auto" order would take 2
#: (guided runs above CFG 2, ``adaptive_core.sampler.resolve_max_order``); ``policy --base-plan current`` trains
#: on it.
CURRENT_BASE_PLAN = {"prediction": "auto", "flow_shift": "auto", "predictor": "auto", "max_order": 3,
                     "second_order_max_step": None}
#: The base plans the tuning tools name (``--base-plan``).
BASE_PLANS = {"legacy": LEGACY_BASE_PLAN, "current": CURRENT_BASE_PLAN}
#: What "auto" in a base plan means in this ADO: the rule of ``adaptive_core.sampler.resolve_flow_plan`` and
#: ``resolve_predictor`` (unguided flow runs with ≤ 10 calls: shifted-time plan, hybrid prediction, exact
#: predictor).  A manifest whose base plan says "auto" records the rule it was trained under
#: (``action.auto_plan_rule``), and a policy trained under another rule is refused at load, since its corrections
#: would be applied to a plan it never saw.  Change this tag whenever that rule changes.
AUTO_PLAN_RULE = "shifted-time-hybrid/2026-11-27"


def uses_auto_plan(base_plan: dict) -> bool:
    """Whether a base plan leaves any option to the sampler's "auto" rule (:data:`AUTO_PLAN_RULE`)."""
    return any(v == "auto" for v in base_plan.values())


def check_base_plan(base_plan) -> dict:
    """A copy of ``base_plan`` (sampler options a policy runs on), with ``max_order`` 3 and no
    ``second_order_max_step`` where it names none (every manifest written before the base plan named them was
    trained so); ValueError unless it is a mapping whose keys are among :data:`LEGACY_BASE_PLAN`'s."""
    if not isinstance(base_plan, dict) or set(base_plan) - set(LEGACY_BASE_PLAN):
        raise ValueError(f"base_plan must be a mapping with keys among {sorted(LEGACY_BASE_PLAN)}, got {base_plan!r}")
    return {"max_order": 3, "second_order_max_step": None, **base_plan}


def policy_base_options(spec: Any) -> dict:
    """The sampler options a step policy runs on: a :class:`Policy`'s ``base_options``, or those of the policy
    that ``spec`` names (a load error leaves {} here; the sampler reports it when it loads the policy), or an
    object's own ``base_options`` attribute ({} without one: the sampler's defaults)."""
    if isinstance(spec, (str, Path)):
        try:
            spec = load_policy(spec)   # (resolve_policy_path drops a "policy:" prefix)
        except (PolicyLoadError, OSError, ValueError):
            return {}
    return dict(getattr(spec, "base_options", None) or {})


def load_policy(spec: Any, device: str = "cpu") -> Policy:
    """The policy named by ``spec`` (see :func:`resolve_policy_path`), or a :class:`Policy` as is; sessions are
    reused while the manifest and graph files are unchanged.  Raises PolicyLoadError / PolicyIntegrityError."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"policy must be a name, a manifest path or a Policy, got {type(spec).__name__}")
    path = resolve_policy_path(spec)
    return load_cached(_CACHE, path, PolicyManifest, device, Policy)


__all__ = ["ACTION_KINDS", "ACTION_SCALE", "AUTO_PLAN_RULE", "BASE_PLANS", "CURRENT_BASE_PLAN", "LEGACY_BASE_PLAN",
           "MANIFEST_FORMAT", "MIN_SHARE", "N_OBSERVATIONS",
           "OBSERVATION_NAMES", "OOD_Z", "ORDER_DEAD_ZONE", "POLICY_DIR", "SOFT_Z", "Policy",
           "PolicyIntegrityError",
           "PolicyLoadError", "PolicyManifest", "bundled_policies", "check_base_plan", "load_policy", "order_delta_from_action",
           "policy_base_options", "policy_observation", "resolve_policy_path", "share_from_action", "uses_auto_plan"]
