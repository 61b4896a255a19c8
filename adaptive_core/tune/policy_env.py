"""Gymnasium environment for training ADO's step policy with PPO (Schulman et al. 2017), after TPDM ("Schedule On
the Fly": PPO picks the next noise level during sampling) and AdaDiff (RL over step budgets).

One episode is one run of :func:`adaptive_core.sample_adaptive` with ``controller=<this env's decider>`` on one
testbed image: a random testbed/model type from the list, a random noise seed from the training pool and a random
NFE budget; on the trained MNIST UNet (``mnist_unet``) also a class (the seed's, ``seed mod 10``, so a random
seed is a random class) and a random classifier-free guidance scale from ``cfg_scales``.  The sampler itself runs
the episode (in a worker thread that pauses at every decision), so training sees exactly the observations,
action mapping, plan re-laying and budget rule of the run-time sampler.

* observation: :data:`adaptive_core.policy.OBSERVATION_NAMES` (features, monitor estimates, heuristic share);
* action: (a₀, a₁) ∈ [−1, 1]²: the next step as a share of the remaining λ-span around the heuristic's share
  (:func:`adaptive_core.policy.share_from_action`; the last call is always on the end point) and the solver
  order of that step relative to the heuristic's (:func:`adaptive_core.policy.order_delta_from_action`);
* reward (terminal only; 0 on intermediate steps), with ``error_reward="both"`` (the default)::

      r = log(RMSE_h / RMSE_p) + (RMSE_h² − RMSE_p²) / mean_pool(RMSE_h²)
          + nfe_weight · (budget − NFE_used) / budget

  RMSE_p is this image's RMSE to the testbed's reference ODE solution from the same noise; RMSE_h is ADO's
  default (heuristic) controller's on the same image and budget, and mean_pool(RMSE_h²) its mean squared error
  over the configuration's whole training seed pool at that budget.  Both error terms are 0 for "as good as the
  heuristic", so the return reads directly as the gain, and both are free of the testbed's error scale:

  - the *log-ratio* (``error_reward="log-ratio"``) rewards every image's relative gain alike: it is what a user
    looking at one image sees;
  - the *pooled-MSE share* (``"pooled-mse"``) sums, over a configuration's episodes, to N · (1 − pooled MSE
    ratio): exactly the benchmark's pooled RMSE.  The log-ratio alone let policies make a few hard images
    (large error, a class that flips) worse while making most images better: 0.40–0.89× the heuristic per image
    (geometric mean) in every cell, yet up to 1.36× in pooled RMSE, where the worst 3 of 64 images carry up to
    82% of the squared error.  Together the two terms ask for both.

  The NFE term pays for stopping early (a share of 1), which is only worth it when it costs less than
  ``nfe_weight`` of the error terms.

  With ``reward_scale="per-config"`` (the default) PPO is given r / s_c, where s_c is the running standard
  deviation of r on that episode's configuration (testbed, model type, CFG; floored at 0.05, 1 for its first 16
  episodes).  Otherwise the testbed where actions move the error most (the power-law Gaussian: ratios of 0.1–0.5)
  dominates the gradient and the policy learns little on the others; normalising each task's return is the
  multi-task fix of PopArt (Hessel et al. 2019), here in its simplest form.  ``info["reward_raw"]`` keeps r.

References: exact for the analytic testbeds; for the trained UNet a fine solve of its ODE
(:meth:`~adaptive_core.testbeds.trained.TrainedDenoiser.solve`, ``reference_steps`` λ-uniform steps, 128 by
default: 0.007 (ve, CFG 2) and 0.003 (flow, CFG 2) RMS from the 512-step solve, where ADO at 10 NFE is
0.12 and 0.04 away, on 8 seeds), computed once per (model type, CFG, seed set) and cached under
``build/policy_env_cache`` (safetensors, keyed by the weights' sha256).
"""
from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch

from ..policy import (ACTION_KINDS, ACTION_SCALE, LEGACY_BASE_PLAN, MIN_SHARE, N_OBSERVATIONS, ORDER_DEAD_ZONE,
                      check_base_plan, check_early_step_cap)
from ..sampler import sample_adaptive
from ..testbeds import CONDITIONAL_TESTBED_NAMES, TRAINED_TESTBED_NAMES, make_testbed

#: Default training testbeds (name, model type); gmm_digits-flow can be left out for the transfer measurement.
TRAIN_TESTBEDS = (("gaussian", "ve"), ("gaussian", "flow"), ("gmm_digits", "ve"), ("gmm_digits", "flow"))
TRAIN_BUDGETS = (5, 6, 8, 10)
TRAIN_SEEDS = range(0, 512)
#: Held-out noise seeds for evaluation (never in the training pool).
EVAL_SEEDS = range(20000, 20032)
OBS_BOUND = 20.0
#: Classifier-free guidance scales drawn per episode on a trained testbed (Ho & Salimans 2022).
TRAINED_CFG_SCALES = (1.0, 2.0)
#: Training seeds of a trained testbed: the first this many of the pool (each needs a reference solve).
TRAINED_SEED_POOL = 64
#: Steps of a trained testbed's reference solve in training and evaluation (see the module docstring).
TRAINED_REFERENCE_STEPS = 128
#: Where the trained testbeds' references are cached (ignored by git).
CACHE_DIR = Path(__file__).resolve().parents[2] / "build" / "policy_env_cache"

#: Per-configuration reward scaling (see the module docstring): episodes before it starts, floor of the std.
REWARD_SCALE_WARMUP = 16
REWARD_SCALE_FLOOR = 0.05
#: The error terms of the reward (see the module docstring).
ERROR_REWARDS = ("both", "log-ratio", "pooled-mse")

_SHARED: dict[tuple, tuple] = {}


@dataclass(frozen=True)
class Config:
    """One sampling configuration of the env: a testbed, its model type and, for a trained testbed, the CFG
    scale (None for an analytic one; 1 for an unconditional network).  ``key`` names it in results
    (``gmm_digits-flow``, ``mnist_unet-ve-cfg2``, ``photo_unet-flow``)."""

    name: str
    model_type: str
    cfg: float | None = None

    @property
    def key(self) -> str:
        """Its name in results."""
        base = f"{self.name}-{self.model_type}"
        return base if self.cfg is None or not self.conditional else f"{base}-cfg{self.cfg:g}"

    @property
    def trained(self) -> bool:
        """Whether the testbed is a trained network (float32, a solved reference)."""
        return self.name in TRAINED_TESTBED_NAMES

    @property
    def conditional(self) -> bool:
        """Whether the testbed is a trained network that takes class labels and CFG."""
        return self.name in CONDITIONAL_TESTBED_NAMES


def configs_of(specs: Sequence[tuple[str, str]], cfg_scales: Sequence[float] = TRAINED_CFG_SCALES) -> list[Config]:
    """The configurations of (name, model type) pairs: one per analytic pair and per unconditional network
    (CFG 1), one per CFG scale for a class-conditional network."""
    out = []
    for name, mt in specs:
        if name in TRAINED_TESTBED_NAMES and name not in CONDITIONAL_TESTBED_NAMES:
            out.append(Config(name, mt, 1.0))
        elif name in TRAINED_TESTBED_NAMES:
            if not cfg_scales:
                raise ValueError(f"{name}: a trained testbed needs at least one CFG scale")
            out += [Config(name, mt, float(c)) for c in cfg_scales]
        else:
            out.append(Config(name, mt))
    return out


def class_labels(seeds: Sequence[int]) -> torch.Tensor:
    """The class of each noise seed on a class-conditional testbed: ``seed mod 10``."""
    return torch.as_tensor([int(s) % 10 for s in seeds], dtype=torch.long)


def set_config_labels(config: Config, testbed, seeds: Sequence[int]) -> None:
    """Give a class-conditional testbed the labels of ``seeds`` (:func:`class_labels`); nothing for the others."""
    if config.conditional:
        testbed.set_labels(class_labels(seeds))


def make_config_testbed(config: Config):
    """The testbed object of a configuration (the CFG scale set on a trained one)."""
    if config.trained:
        return make_testbed(config.name, config.model_type, cfg_scale=config.cfg)
    return make_testbed(config.name, config.model_type)


def config_noise(config: Config, testbed, seeds: Sequence[int]) -> torch.Tensor:
    """The noise x of ``seeds`` on a configuration's testbed; on a trained testbed it draws float32, as the
    network runs, and sets the labels of a conditional one (:func:`set_config_labels`)."""
    seeds = [int(s) for s in seeds]
    if not config.trained:
        return testbed.noise(seeds)
    set_config_labels(config, testbed, seeds)
    return testbed.noise(seeds, dtype=torch.float32)


def noise_and_reference(config: Config, testbed, seeds: Sequence[int],
                        reference_steps: int = TRAINED_REFERENCE_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise x, reference output) for ``seeds`` (:func:`config_noise`): the exact reference of an analytic
    testbed, or the cached ``reference_steps``-step solve of a trained one (labels :func:`class_labels`, the
    config's CFG)."""
    x = config_noise(config, testbed, seeds)
    if not config.trained:
        return x, testbed.reference(x)
    seeds = [int(s) for s in seeds]
    digest = hashlib.sha256(Path(testbed.path).read_bytes()).hexdigest()[:16]
    tag = hashlib.sha256(repr((seeds, int(reference_steps), config.cfg, digest)).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"{config.key}-{tag}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file
        cached = load_file(str(path))
        if torch.equal(cached["x"], x):
            return x, cached["reference"]
    ref = testbed.solve(x, int(reference_steps))
    from safetensors.torch import save_file
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    save_file({"x": x.contiguous(), "reference": ref.contiguous()}, str(tmp))
    tmp.replace(path)   # atomic: env copies in other processes may write the same file
    return x, ref


class _Abort(Exception):
    """Raised inside the sampler thread to end an episode that the env abandons."""


def host_grid(testbed, nfe: int) -> torch.Tensor:
    """The σ grid a host would pass (the benchmark's Karras grid, :func:`adaptive_core.bench.run.host_sigmas`)."""
    from ..bench.run import host_sigmas
    return host_sigmas(testbed, nfe)


def rmse_per_sample(out: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """RMSE over each sample's elements [B] (float64)."""
    return ((out.double() - ref.double()) ** 2).flatten(1).mean(1).sqrt().numpy()


class _ThreadDecider:
    """The ``controller`` object handed to the sampler in an episode: hands each observation to the env and waits
    for its action (no fallback: training sees every row)."""

    action_scale, min_share, order_dead_zone, name = ACTION_SCALE, MIN_SHARE, ORDER_DEAD_ZONE, "training-env"
    def __init__(self, min_lambda_progress: float = 0.0, early_step_cap=None, base_options=LEGACY_BASE_PLAN) -> None:
        self.min_lambda_progress = float(min_lambda_progress)
        self.base_options = dict(base_options)   # policies are trained on the plan they run on (adaptive_core.policy)
        self.early_step_cap = early_step_cap   # (checked by the env) applied by the sampler, as at run time
        self.obs_q: queue.Queue = queue.Queue()
        self.act_q: queue.Queue = queue.Queue()

    def decide(self, observation: np.ndarray):
        """Send the observation row to the env, return its action row (batch of one)."""
        self.obs_q.put(("obs", np.asarray(observation[0], dtype=np.float32)))
        msg = self.act_q.get()
        if msg is None:
            raise _Abort()
        return np.asarray(msg, dtype=np.float64).reshape(1, -1), [None]


class SamplingEnv(gym.Env):
    """One sampling run per episode; see the module docstring for observation, action and reward.

    Args:
        testbeds: (name, model type) pairs drawn uniformly per episode (a trained one then draws its CFG scale).
        budgets: NFE budgets drawn uniformly (≥ 4, so every episode has a decision).
        seeds: the pool of noise seeds (training seeds; evaluation uses :data:`EVAL_SEEDS`); a trained testbed
            uses its first ``trained_seed_pool``.
        nfe_weight: weight of the NFE saving in the reward.
        cfg_scales: CFG scales of the trained testbeds.
        order_action: whether the action has the solver-order entry (action kind ``share_and_order``) or only
            the step (``share_of_remaining_lambda``).
        reference_steps: steps of a trained testbed's reference solve.
        reward_scale: ``"per-config"`` (divide by the configuration's running reward std) or ``"none"``.
        error_reward: the error terms of the reward, one of :data:`ERROR_REWARDS` (module docstring).
        min_lambda_progress: decisions before this share of the λ-span keep the heuristic's step and order and
            are not the policy's (:mod:`adaptive_core.policy`, "Where it acts"); the exported manifest says it.
        early_step_cap: None, or (below_lambda_progress, max_step_action): the sampler caps the step action of
            decisions before that share of the λ-span, as it does at run time (:mod:`adaptive_core.policy`, "A cap
            on the early steps"); the agent's action is kept as it chose it, the episode runs the capped one.
        draw_seed: None: each episode draws its configuration, noise seed and budget from the env's own RNG (seeded
            by ``reset(seed=...)``).  An integer: from a separate RNG seeded with it, so two env copies given the
            same ``draw_seed`` run the same sequence of episodes (the trainer's paired episodes; ``info`` numbers
            them in ``episode_index``).  A seeded ``reset`` starts the sequence (and the numbering) over.
        base_plan: the sampler options the episodes (and the reward's heuristic runs) use, the plan the policy
            learns to correct: :data:`~adaptive_core.policy.LEGACY_BASE_PLAN` (default) or
            :data:`~adaptive_core.policy.CURRENT_BASE_PLAN`; the exported manifest records it.
    """

    metadata = {"render_modes": []}

    def __init__(self, testbeds: Sequence[tuple[str, str]] = TRAIN_TESTBEDS, budgets: Sequence[int] = TRAIN_BUDGETS,
                 seeds: Sequence[int] = TRAIN_SEEDS, nfe_weight: float = 0.1,
                 cfg_scales: Sequence[float] = TRAINED_CFG_SCALES, order_action: bool = True,
                 trained_seed_pool: int = TRAINED_SEED_POOL, reference_steps: int = TRAINED_REFERENCE_STEPS,
                 reward_scale: str = "per-config", error_reward: str = "both",
                 min_lambda_progress: float = 0.0, draw_seed: int | None = None, early_step_cap=None,
                 base_plan=LEGACY_BASE_PLAN) -> None:
        super().__init__()
        self.base_plan = check_base_plan(base_plan)
        if not testbeds:
            raise ValueError("testbeds must name at least one (testbed, model type) pair")
        if not budgets or min(budgets) < 4:
            raise ValueError(f"budgets must be ≥ 4 NFE (a run of fewer calls has no free decision), got {budgets}")
        if not seeds:
            raise ValueError("seeds must name at least one noise seed")
        self.specs = [tuple(t) for t in testbeds]
        self.configs = configs_of(self.specs, cfg_scales)
        # per spec, the indices of its configurations (one, or one per CFG scale)
        self._spec_configs = [[i for i, c in enumerate(self.configs) if (c.name, c.model_type) == spec]
                              for spec in self.specs]
        self.testbeds = [make_config_testbed(c) for c in self.configs]
        self.budgets, self.seeds, self.nfe_weight = [int(b) for b in budgets], list(seeds), float(nfe_weight)
        self.trained_seeds = self.seeds[:max(1, int(trained_seed_pool))]
        self.reference_steps = int(reference_steps)
        if reward_scale not in ("per-config", "none"):
            raise ValueError(f"reward_scale must be 'per-config' or 'none', got {reward_scale!r}")
        self.reward_scale = reward_scale
        if error_reward not in ERROR_REWARDS:
            raise ValueError(f"error_reward must be one of {ERROR_REWARDS}, got {error_reward!r}")
        self.error_reward = error_reward
        if not 0.0 <= float(min_lambda_progress) < 1.0:
            raise ValueError(f"min_lambda_progress must be in [0, 1), got {min_lambda_progress}")
        self.min_lambda_progress = float(min_lambda_progress)
        self.early_step_cap = check_early_step_cap(early_step_cap)
        self._draw_seed = None if draw_seed is None else int(draw_seed)
        self._draw_rng = None if draw_seed is None else np.random.default_rng(self._draw_seed)
        self._episodes_started = 0
        self._reward_stats = np.zeros((len(self.configs), 3))   # per configuration: count, mean, M2 (Welford)
        self.action_kind = "share_and_order" if order_action else "share_of_remaining_lambda"
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (N_OBSERVATIONS,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_KINDS[self.action_kind],), np.float32)
        self._data: dict[int, tuple] = {}
        self._cell_probs: np.ndarray | None = None   # over self.cells; None: the default draw
        self._thread: threading.Thread | None = None
        self._decider: _ThreadDecider | None = None
        self._episode: dict = {}

    # --- what an episode draws ----------------------------------------------------------------------------------
    @property
    def cells(self) -> list[tuple[int, int]]:
        """The (configuration index, budget) cells an episode can draw, in a fixed order."""
        return [(k, b) for k in range(len(self.configs)) for b in self.budgets]

    def default_cell_probs(self) -> np.ndarray:
        """Probability of each of :attr:`cells` under the default draw: a (name, model type) pair uniformly, then
        its CFG scale and the budget uniformly."""
        probs = []
        for k, _ in self.cells:
            spec = (self.configs[k].name, self.configs[k].model_type)
            probs.append(1.0 / (len(self.specs) * len(self._spec_configs[self.specs.index(spec)]) * len(self.budgets)))
        return np.asarray(probs)

    def set_cell_weights(self, weights: dict | None, mix: float = 1.0) -> None:
        """Draw the next episodes' (configuration, budget) cell with probability (1 − mix) · default + mix ·
        weight / Σ weights, where ``weights`` is a mapping {config key: {budget: weight}} that covers every cell
        (None restores the default draw, :meth:`default_cell_probs`).  The trainer's
        ``cell_sampling="worst-cell"`` sets them from each evaluation, after Group DRO (Sagawa et al. 2020)."""
        if not 0.0 <= float(mix) <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        if weights is None:
            self._cell_probs = None
            return
        w = []
        for k, b in self.cells:
            key = self.configs[k].key
            try:
                v = float(weights[key][b])
            except (KeyError, TypeError) as e:
                raise ValueError(f"cell weights lack configuration {key!r} at budget {b}") from e
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"cell weight of {key!r} at budget {b} must be finite and ≥ 0, got {v}")
            w.append(v)
        w = np.asarray(w)
        if w.sum() <= 0:
            raise ValueError("cell weights must not all be 0")
        self._cell_probs = (1.0 - mix) * self.default_cell_probs() + mix * w / w.sum()

    # --- data -------------------------------------------------------------------------------------------------
    def seed_pool(self, k: int) -> list[int]:
        """The training noise seeds of configuration k."""
        return self.trained_seeds if self.configs[k].trained else self.seeds

    def _prepare(self, k: int) -> None:
        """Noise, reference and the heuristic's per-image RMSE per budget for every seed of configuration k,
        batched (decisions are per sample, so a batch gives each image's own result)."""
        if k in self._data:
            return
        config, pool = self.configs[k], self.seed_pool(k)
        key = (config, tuple(pool), tuple(self.budgets), self.reference_steps)
        if key not in _SHARED:   # shared by the env copies of a DummyVecEnv
            tb = self.testbeds[k]
            x, ref = noise_and_reference(config, tb, pool, self.reference_steps)
            heur = {}
            for budget in self.budgets:
                out = sample_adaptive(tb, x, host_grid(tb, budget), nfe_budget=budget, model_type=tb.model_type,
                                      **self.base_plan)   # the heuristic on the plan the policy runs on
                heur[budget] = rmse_per_sample(out, ref)
            _SHARED[key] = (x, ref, heur, {int(s): i for i, s in enumerate(pool)})
        self._data[k] = _SHARED[key]

    def noise_and_reference_of(self, k: int, seeds: Sequence[int]):
        """(noise, reference solution) of configuration k for ``seeds`` of its training pool, one row each."""
        self._prepare(k)
        x, ref, _, index = self._data[k]
        rows = [index[int(s)] for s in seeds]
        return x[rows], ref[rows]

    def heuristic_rmse(self, k: int, seed: int, budget: int) -> float:
        """RMSE of ADO's default controller for configuration k, noise seed and budget."""
        self._prepare(k)
        _, _, heur, index = self._data[k]
        return float(heur[budget][index[int(seed)]])

    # --- episode thread -----------------------------------------------------------------------------------------
    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._decider.act_q.put(None)
            self._thread.join()
        self._thread, self._decider = None, None

    def _start_thread(self, k: int, seed: int, budget: int) -> None:
        tb = self.testbeds[k]
        x, _ = self.noise_and_reference_of(k, [seed])
        set_config_labels(self.configs[k], tb, [seed])
        decider = _ThreadDecider(self.min_lambda_progress, self.early_step_cap, self.base_plan)

        def run():
            torch.set_num_threads(1)
            try:
                out = sample_adaptive(tb, x, host_grid(tb, budget), nfe_budget=budget, model_type=tb.model_type,
                                      controller=decider)
                decider.obs_q.put(("done", out, tb.nfe))
            except _Abort:
                pass
            except Exception as e:  # surfaced in step()
                decider.obs_q.put(("error", e))

        tb.reset_nfe()
        self._decider = decider
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _next(self):
        msg = self._decider.obs_q.get()
        if msg[0] == "error":
            raise msg[1]
        return msg

    # --- gym API ------------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a new sampling run; ``options`` may fix ``config`` (index into :attr:`configs`), ``noise_seed``
        and ``budget``."""
        super().reset(seed=seed)
        self._stop_thread()
        if seed is not None:   # a seeded reset starts over: the same seed gives the same episodes and infos
            self._episodes_started = 0
            if self._draw_seed is not None:
                self._draw_rng = np.random.default_rng(self._draw_seed)
        options = options or {}
        rng = self.np_random if self._draw_rng is None else self._draw_rng
        budget = None
        if "config" in options:
            k = int(options["config"])
        elif self._cell_probs is not None:
            k, budget = self.cells[int(rng.choice(len(self._cell_probs), p=self._cell_probs))]
        else:
            group = self._spec_configs[int(rng.integers(len(self.specs)))]
            k = group[int(rng.integers(len(group)))]
        pool = self.seed_pool(k)
        noise_seed = int(options.get("noise_seed", pool[int(rng.integers(len(pool)))]))
        if "budget" in options:
            budget = int(options["budget"])
        elif budget is None:
            budget = self.budgets[int(rng.integers(len(self.budgets)))]
        self._episode = {"config": k, "noise_seed": noise_seed, "budget": budget, "steps": 0,
                         "episode_index": self._episodes_started}
        self._episodes_started += 1
        self._start_thread(k, noise_seed, budget)
        msg = self._next()
        if msg[0] != "obs":  # cannot happen for budgets ≥ 4
            raise RuntimeError(f"the sampling run ended before its first decision (budget {budget}, "
                               f"min_lambda_progress {self.min_lambda_progress:g})")
        return self._clip(msg[1]), dict(self._episode)

    def step(self, action):
        """Apply the action (step size, and solver order where the action has it); the episode ends when the
        sampler returns."""
        if self._decider is None:
            raise RuntimeError("call reset() before step()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {a.shape}")
        self._decider.act_q.put(a)
        self._episode["steps"] += 1
        msg = self._next()
        if msg[0] == "obs":
            return self._clip(msg[1]), 0.0, False, False, dict(self._episode)
        _, out, nfe = msg
        self._thread.join()
        self._thread, self._decider = None, None
        k, seed, budget = self._episode["config"], self._episode["noise_seed"], self._episode["budget"]
        rmse = float(rmse_per_sample(out, self.noise_and_reference_of(k, [seed])[1])[0])
        heur = self.heuristic_rmse(k, seed, budget)
        reward = self.error_gain(k, budget, rmse, heur) + self.nfe_weight * (budget - nfe) / budget
        info = {**self._episode, "rmse": rmse, "rmse_heuristic": heur, "nfe": nfe,
                "testbed_name": self.configs[k].key, "reward_raw": reward}
        obs = np.zeros(N_OBSERVATIONS, dtype=np.float32)
        return obs, float(reward / self._reward_scale_of(k, reward)), True, False, info

    def error_gain(self, k: int, budget: int, rmse: float, rmse_heuristic: float) -> float:
        """The reward's error terms (:attr:`error_reward`) for an image of configuration k with RMSE ``rmse``
        where the heuristic controller's is ``rmse_heuristic``: log-ratio and/or pooled-MSE share."""
        gain = 0.0
        if self.error_reward in ("both", "log-ratio"):
            gain += math.log(max(rmse_heuristic, 1e-12) / max(rmse, 1e-12))
        if self.error_reward in ("both", "pooled-mse"):
            self._prepare(k)
            pool_mse = float(np.mean(np.square(self._data[k][2][budget])))
            gain += (rmse_heuristic ** 2 - rmse ** 2) / max(pool_mse, 1e-24)
        return gain

    def _reward_scale_of(self, k: int, reward: float) -> float:
        """Update configuration k's running reward statistics with ``reward``; the divisor for it."""
        if self.reward_scale == "none":
            return 1.0
        st = self._reward_stats[k]
        st[0] += 1
        delta = reward - st[1]
        st[1] += delta / st[0]
        st[2] += delta * (reward - st[1])
        if st[0] <= REWARD_SCALE_WARMUP:
            return 1.0
        return max(math.sqrt(st[2] / (st[0] - 1)), REWARD_SCALE_FLOOR)

    @staticmethod
    def _clip(obs: np.ndarray) -> np.ndarray:
        return np.clip(np.nan_to_num(obs, nan=0.0), -OBS_BOUND, OBS_BOUND).astype(np.float32)

    def close(self) -> None:
        """End a running episode's thread."""
        self._stop_thread()


def evaluate_controller(controller, specs: Sequence[tuple[str, str]], budgets: Sequence[int],
                        seeds: Sequence[int] = EVAL_SEEDS, references: dict | None = None,
                        cfg_scales: Sequence[float] = TRAINED_CFG_SCALES,
                        reference_steps: int = TRAINED_REFERENCE_STEPS) -> dict:
    """RMSE (over all elements of all ``seeds``, to the reference, as the benchmark), each image's RMSE and the
    mean NFE per configuration (:func:`configs_of`) and budget for ADO with ``controller`` (None = the
    heuristic), on held-out seeds; all seeds in one batch (decisions are per sample).  ``references`` caches
    {config key: (testbed, x, ref)} between calls.  Returns {config key: {budget: {"rmse", "rmse_images",
    "nfe"}}}."""
    from ..bench.metrics import rmse
    from ..trace import Trace
    references = {} if references is None else references
    res: dict = {}
    for config in configs_of(specs, cfg_scales):
        if config.key not in references:
            tb = make_config_testbed(config)
            references[config.key] = (tb, *noise_and_reference(config, tb, seeds, reference_steps))
        tb, x, ref = references[config.key]
        set_config_labels(config, tb, seeds)
        for budget in budgets:
            trace = Trace()
            opts = {} if controller is None else {"controller": controller}
            out = sample_adaptive(tb, x, host_grid(tb, budget), nfe_budget=budget, model_type=config.model_type,
                                  trace=trace, **opts)
            nfe = float(np.mean([trace.sample_nfe(b) for b in range(x.shape[0])]))
            res.setdefault(config.key, {})[int(budget)] = {"rmse": rmse(out, ref), "nfe": nfe,
                                                            "rmse_images": rmse_per_sample(out, ref).tolist()}
    return res


__all__ = [
    "CACHE_DIR",
    "ERROR_REWARDS",
    "EVAL_SEEDS",
    "TRAINED_CFG_SCALES",
    "TRAINED_REFERENCE_STEPS",
    "TRAINED_SEED_POOL",
    "TRAIN_BUDGETS",
    "TRAIN_SEEDS",
    "TRAIN_TESTBEDS",
    "Config",
    "SamplingEnv",
    "class_labels",
    "config_noise",
    "configs_of",
    "evaluate_controller",
    "host_grid",
    "make_config_testbed",
    "noise_and_reference",
    "rmse_per_sample",
    "set_config_labels",
]
