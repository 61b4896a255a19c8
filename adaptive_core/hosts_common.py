"""Host-free glue shared by the host adapters (A1111/Forge ``scripts/``, ComfyUI ``nodes/``).

What a host adapter needs besides :func:`~adaptive_core.sample_adaptive` itself, written once:

* :data:`HOST_OPTIONS`: ADO's user-facing options (settings key, infotext key, default, allowed values) and
  :func:`sampler_kwargs`, which validates them and turns them into ``sample_adaptive`` arguments;
* the infotext ("PNG parameters") entries that make an image reproducible: :func:`option_params` (the
  options), :func:`run_params` (realised NFE and :func:`schedule_hash` of the realised σ schedule) and
  :func:`options_from_params` (the way back, for pasted parameters);
* :func:`pasted_sampler_problems`: the check that a pasted sampler name is one the host knows, because
  A1111/Forge replace an unknown name by their default sampler without a word (hosts.md §5.6);
* :func:`webui_model_type`: ve or flow for an A1111/Forge denoiser, read from attributes only.

Nothing here imports a host module (``modules.*``, ``comfy``); values are plain Python.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, MutableMapping, Sequence

from . import __version__
from .domain import controller_choices
from .sampler import DEFAULTS
from .trace import Trace

#: The sampler's name in host dropdowns and in the infotext ``Sampler:`` field.
SAMPLER_LABEL = "ADO Adaptive"
#: Other names that mean ADO (matched case-insensitively); a pasted alias is restored to the label.
SAMPLER_ALIASES = ("ado", "ado_adaptive", "k_ado")
#: Infotext key of the ADO version that made an image.
VERSION_KEY = "ADO version"


@dataclass(frozen=True)
class HostOption:
    """One user-facing ADO option as a host shows it (A1111 settings entry, ComfyUI widget).

    ``key`` is the settings name (A1111 ``shared.opts`` key), ``infotext`` the key under which the value is
    written into the image parameters, ``choices`` the allowed strings of a choice option, ``minimum`` /
    ``maximum`` / ``step`` the range of a number option.
    """

    key: str
    infotext: str
    default: Any
    label: str
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None

    def parse(self, value: Any) -> Any:
        """The option's value from ``value`` (a typed value or the text of an infotext), checked against the
        allowed choices or range; raises ValueError naming the option and what is allowed."""
        if self.choices is not None:
            text = str(value).strip()
            if text not in self.choices:
                raise ValueError(f"{self.label} ({self.key}) must be one of {list(self.choices)}, got {value!r}")
            return text
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.label} ({self.key}) must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(number) or not self.minimum <= number <= self.maximum:
            raise ValueError(f"{self.label} ({self.key}) must be a number in [{self.minimum}, {self.maximum}], "
                             f"got {value!r}")
        return number


HOST_OPTIONS: tuple[HostOption, ...] = (
    HostOption("ado_mode", "ADO mode", DEFAULTS["mode"], "ADO: how the steps are spent",
               "budget: 'Sampling steps' model calls, placed where the image changes most; tolerance: stop "
               "early once the error estimate is below the tolerance (never more calls than the steps)",
               choices=("budget", "tolerance")),
    HostOption("ado_rtol", "ADO tolerance", DEFAULTS["rtol"], "ADO: tolerance (tolerance mode)",
               "relative error allowed per step; smaller = more model calls (still capped by the steps)",
               minimum=0.001, maximum=1.0, step=0.001),
    HostOption("ado_schedule", "ADO schedule", DEFAULTS["schedule"], "ADO: noise levels",
               "ado: ADO plans its own noise levels between the schedule's end points; host: start from the "
               "grid of the selected Schedule type", choices=("ado", "host")),
    HostOption("ado_model_type", "ADO model type", "auto", "ADO: model type",
               "auto: flow for rectified-flow models (SD3, Flux), else ve (SD1.x, SDXL); set it only if "
               "auto picks wrong", choices=("auto", "ve", "flow")),
    HostOption("ado_controller", "ADO controller", "heuristic", "ADO: step controller",
               "heuristic: ADO's budget planner (default); policy:NAME: a bundled PPO step policy that adjusts each "
               "step from what the run shows (budget mode only; falls back to the heuristic where it is unsure); "
               "policy:auto: the bundled policy made for the model type and guidance of the run, else the "
               "heuristic. Policies were tuned on small test networks: on your model compare with the heuristic "
               "on a few seeds", choices=tuple(controller_choices())),
)
_BY_KEY = {o.key: o for o in HOST_OPTIONS}


def read_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every host option's checked value, keyed by settings key: taken from ``values`` where present,
    else its default.  An unknown ``ado_*`` key or a bad value raises ValueError naming it."""
    unknown = sorted(k for k in values if k.startswith("ado_") and k not in _BY_KEY)
    if unknown:
        raise ValueError(f"unknown ADO option(s) {unknown}; known: {sorted(_BY_KEY)}")
    return {o.key: o.parse(values[o.key]) if o.key in values else o.default for o in HOST_OPTIONS}


def sampler_kwargs(values: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The ``sample_adaptive`` keyword options and ``model_type`` (None = detect) for host option values.

    The tolerance is passed only in tolerance mode, where it is used; a policy controller only in budget mode.
    """
    opt = read_options(values)
    kwargs = {"mode": opt["ado_mode"], "schedule": opt["ado_schedule"]}
    if opt["ado_mode"] == "tolerance":
        kwargs["rtol"] = opt["ado_rtol"]
    if opt["ado_controller"] != "heuristic" and opt["ado_mode"] == "budget":
        kwargs["controller"] = opt["ado_controller"]
    model_type = None if opt["ado_model_type"] == "auto" else opt["ado_model_type"]
    return kwargs, model_type


def _text(value: Any) -> str:
    """A value as infotext text: floats without a trailing ``.0`` noise, everything else via ``str``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_params(values: Mapping[str, Any]) -> dict[str, str]:
    """The infotext entries of the options (infotext key → text), plus the ADO version.

    The tolerance is written only in tolerance mode (it has no effect otherwise), the controller only when it is
    not the default heuristic (so images made without a policy keep their parameters).  Pasting these entries
    back through :func:`options_from_params` gives the same :func:`sampler_kwargs`.
    """
    opt = read_options(values)
    out = {o.infotext: _text(opt[o.key]) for o in HOST_OPTIONS
           if (o.key != "ado_rtol" or opt["ado_mode"] == "tolerance")
           and (o.key != "ado_controller" or opt["ado_controller"] != "heuristic")}
    out[VERSION_KEY] = __version__
    return out


def options_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The option values recorded in parsed image parameters (infotext key → text), keyed by settings key.

    Only options present in ``params`` are returned; a bad recorded value raises ValueError naming it.
    """
    return {o.key: o.parse(params[o.infotext]) for o in HOST_OPTIONS if o.infotext in params}


def schedule_hash(sigmas: Sequence[float]) -> str:
    """A 10-hex-digit SHA-256 digest of a realised σ schedule, for the image parameters.

    Each σ is written with 6 significant digits before hashing, so the digest names the schedule
    (two runs with the same digest evaluated the model at the same noise levels) without depending on
    the last bits of float arithmetic.  Raises ValueError for an empty or non-finite schedule.
    """
    values = [float(s) for s in sigmas]
    if not values or not all(math.isfinite(s) for s in values):
        raise ValueError(f"a schedule needs at least one finite σ, got {values}")
    text = ",".join(f"{s:.6g}" for s in values)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:10]


def run_keys(hires: bool = False) -> tuple[str, str]:
    """Infotext keys of a run's realised NFE and schedule hash (the hires-fix pass gets its own keys)."""
    return ("ADO hires NFE", "ADO hires schedule hash") if hires else ("ADO NFE", "ADO schedule hash")


def run_params(trace: Trace, sample: int = 0, hires: bool = False) -> dict[str, str]:
    """Infotext entries of what one sample of a traced run did: model calls it took and the hash of its
    realised schedule (:meth:`Trace.sigmas_taken`, the grid that :func:`~adaptive_core.replay_sigmas`
    returns).  Raises ValueError if the trace holds no such sample."""
    if not 0 <= sample < len(trace.samples) or not trace.samples[sample]:
        raise ValueError(f"the trace has no recorded run for sample {sample} ({len(trace.samples)} samples)")
    nfe_key, hash_key = run_keys(hires)
    return {nfe_key: str(len(trace.samples[sample])), hash_key: schedule_hash(trace.sigmas_taken(sample))}


def is_ado_name(name: Any) -> bool:
    """True if ``name`` is ADO's sampler label or one of its aliases (case-insensitive)."""
    return isinstance(name, str) and name.strip().lower() in {SAMPLER_LABEL.lower(), *SAMPLER_ALIASES}


def pasted_sampler_problems(params: MutableMapping[str, Any], known_names: Iterable[str],
                            scheduler_names: Iterable[str] = ()) -> list[str]:
    """Check the sampler names of pasted image parameters against the samplers a host knows.

    An ADO alias under ``Sampler`` or ``Hires sampler`` is rewritten in place to :data:`SAMPLER_LABEL`
    (A1111/Forge look names up exactly).  Returns one warning per name the host does not know (it would
    silently use its default sampler instead) and one if the image was made by another ADO version.
    ``scheduler_names`` are the labels/names a host strips as a legacy suffix ("Euler a Karras").
    """
    known = set(known_names)
    suffixes = [" " + s for s in scheduler_names if s]
    problems = []
    for key in ("Sampler", "Hires sampler"):
        name = params.get(key)
        if not isinstance(name, str) or name in ("", "Use same sampler"):
            continue
        if is_ado_name(name):
            params[key] = name = SAMPLER_LABEL
        stripped = next((name[:-len(s)] for s in suffixes if name.endswith(s)), name)
        if name not in known and stripped not in known:
            problems.append(f"{key} {name!r} from the pasted parameters is not installed here: the host would "
                            f"use its default sampler instead. Install the extension that provides it, or pick "
                            f"a sampler by hand.")
    recorded = params.get(VERSION_KEY)
    if recorded is not None and str(recorded) != __version__:
        problems.append(f"the image was made with ADO {recorded}; this is ADO {__version__}, whose schedule "
                        f"may differ (compare the 'ADO schedule hash').")
    return problems


class SeedKeyedValue:
    """A per-image infotext value for A1111/Forge ``p.extra_generation_params``.

    The host calls an entry that is callable as ``value(**locals())`` of ``processing.create_infotext``,
    with ``index`` pointing into ``all_seeds``/``all_subseeds`` either for the whole job or for the current
    batch, depending on the caller; the image's (seed, subseed) pair names it in both cases.  ``set`` stores
    the text for one image; an image without one gets None (the host then omits the key).
    """

    def __init__(self):
        self.values: dict[tuple[Any, Any], str] = {}

    def set(self, seed: Any, subseed: Any, text: str) -> None:
        """Store the text for the image with this seed and variation seed."""
        self.values[(seed, subseed)] = text

    def __call__(self, all_seeds=None, all_subseeds=None, index=0, **_locals) -> str | None:
        """The stored text of image ``index`` of ``all_seeds``/``all_subseeds`` (None when unknown)."""
        try:
            key = (all_seeds[index], all_subseeds[index] if all_subseeds is not None else None)
        except (TypeError, IndexError):
            return None
        return self.values.get(key)


def webui_model_type(model_wrap: Any, sd_model: Any = None) -> str:
    """"flow" for an A1111/Forge rectified-flow model, else "ve", from attributes only.

    Forge: ``model_wrap.predictor.prediction_type == "const"`` (``k_diffusion/external.py::ForgeScheduleLinker``
    over ``backend/modules/k_prediction.py`` predictors).  A1111 1.10: ``sd_model.is_sd3``.
    """
    predictor = getattr(model_wrap, "predictor", None)
    if getattr(predictor, "prediction_type", None) == "const":
        return "flow"
    if getattr(sd_model, "is_sd3", False) is True:
        return "flow"
    return "ve"
