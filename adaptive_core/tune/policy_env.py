"""Gymnasium environment for training ADO's step policy with PPO (Schulman et al. 2017), after TPDM ("Schedule On
the Fly": PPO picks the next noise level during sampling) and AdaDiff (RL over step budgets).

One episode is one run of :func:`adaptive_core.sample_adaptive` with ``controller=<this env's decider>`` on one
testbed image: a random testbed/model type from the list, a random noise seed from the training pool and a random
NFE budget.  The sampler itself runs the episode (in a worker thread that pauses at every decision), so training
sees exactly the observations, action mapping, plan re-laying and budget rule of the run-time sampler.

* observation: :data:`adaptive_core.policy.OBSERVATION_NAMES` (features, monitor estimates, heuristic share);
* action: a ∈ [−1, 1], the next step as a share of the remaining λ-span around the heuristic's share
  (:func:`adaptive_core.policy.share_from_action`); the last call is always on the end point;
* reward (terminal only; 0 on intermediate steps)::

      r = log(RMSE_heuristic / RMSE_policy) + nfe_weight · (budget − NFE_used) / budget

  RMSE to the testbed's reference ODE solution from the same noise, for this image; RMSE_heuristic is ADO's
  default controller on the same image and budget.  The log-ratio makes testbeds whose errors differ by orders of
  magnitude weigh alike and is 0 for "as good as the heuristic" (so the return reads directly as the gain); the
  NFE term pays for stopping early (a share of 1), which is only worth it when it costs less than
  ``nfe_weight`` in log-error.
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch

from ..policy import ACTION_SCALE, MIN_SHARE, N_OBSERVATIONS
from ..sampler import sample_adaptive
from ..testbeds import make_testbed

#: Default training testbeds (name, model type); gmm_digits-flow can be left out for the transfer measurement.
TRAIN_TESTBEDS = (("gaussian", "ve"), ("gaussian", "flow"), ("gmm_digits", "ve"), ("gmm_digits", "flow"))
TRAIN_BUDGETS = (5, 6, 8, 10)
TRAIN_SEEDS = range(0, 512)
#: Held-out noise seeds for evaluation (never in the training pool).
EVAL_SEEDS = range(20000, 20032)
OBS_BOUND = 20.0


_SHARED: dict[tuple, tuple] = {}


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

    action_scale, min_share, name = ACTION_SCALE, MIN_SHARE, "training-env"

    def __init__(self) -> None:
        self.obs_q: queue.Queue = queue.Queue()
        self.act_q: queue.Queue = queue.Queue()

    def decide(self, observation: np.ndarray):
        """Send the observation row to the env, return its action (batch of one)."""
        self.obs_q.put(("obs", np.asarray(observation[0], dtype=np.float32)))
        msg = self.act_q.get()
        if msg is None:
            raise _Abort()
        return np.array([float(msg)]), [None]


class SamplingEnv(gym.Env):
    """One sampling run per episode; see the module docstring for observation, action and reward.

    Args:
        testbeds: (name, model type) pairs drawn uniformly per episode.
        budgets: NFE budgets drawn uniformly (≥ 4, so every episode has a decision).
        seeds: the pool of noise seeds (training seeds; evaluation uses :data:`EVAL_SEEDS`).
        nfe_weight: weight of the NFE saving in the reward.
    """

    metadata = {"render_modes": []}

    def __init__(self, testbeds: Sequence[tuple[str, str]] = TRAIN_TESTBEDS, budgets: Sequence[int] = TRAIN_BUDGETS,
                 seeds: Sequence[int] = TRAIN_SEEDS, nfe_weight: float = 0.1) -> None:
        super().__init__()
        if not testbeds:
            raise ValueError("testbeds must name at least one (testbed, model type) pair")
        if not budgets or min(budgets) < 4:
            raise ValueError(f"budgets must be ≥ 4 NFE (a run of fewer calls has no free decision), got {budgets}")
        self.specs = [tuple(t) for t in testbeds]
        self.testbeds = [make_testbed(name, mt) for name, mt in self.specs]
        self.budgets, self.seeds, self.nfe_weight = [int(b) for b in budgets], list(seeds), float(nfe_weight)
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (N_OBSERVATIONS,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self._data: dict[int, tuple] = {}
        self._index = {int(s): i for i, s in enumerate(self.seeds)}
        self._thread: threading.Thread | None = None
        self._decider: _ThreadDecider | None = None
        self._episode: dict = {}

    # --- data -------------------------------------------------------------------------------------------------
    def _prepare(self, k: int) -> None:
        """Noise, reference and the heuristic's per-image RMSE per budget for every seed of testbed k, batched
        (decisions are per sample, so a batch gives each image's own result)."""
        if k in self._data:
            return
        key = (self.specs[k], tuple(self.seeds), tuple(self.budgets))
        if key not in _SHARED:   # shared by the env copies of a DummyVecEnv
            tb = self.testbeds[k]
            x = tb.noise(self.seeds)
            ref = tb.reference(x)
            heur = {}
            for budget in self.budgets:
                out = sample_adaptive(tb, x, host_grid(tb, budget), nfe_budget=budget, model_type=tb.model_type)
                heur[budget] = rmse_per_sample(out, ref)
            _SHARED[key] = (x, ref, heur)
        self._data[k] = _SHARED[key]

    def _noise_and_reference(self, k: int, seed: int):
        self._prepare(k)
        i = self._index[seed]
        x, ref, _ = self._data[k]
        return x[i:i + 1], ref[i:i + 1]

    def heuristic_rmse(self, k: int, seed: int, budget: int) -> float:
        """RMSE of ADO's default controller for testbed k, noise seed and budget."""
        self._prepare(k)
        return float(self._data[k][2][budget][self._index[seed]])

    # --- episode thread -----------------------------------------------------------------------------------------
    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._decider.act_q.put(None)
            self._thread.join()
        self._thread, self._decider = None, None

    def _start_thread(self, k: int, seed: int, budget: int) -> None:
        tb = self.testbeds[k]
        x, _ = self._noise_and_reference(k, seed)
        decider = _ThreadDecider()

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
        """Start a new sampling run; ``options`` may fix ``testbed`` (index), ``noise_seed`` and ``budget``."""
        super().reset(seed=seed)
        self._stop_thread()
        options = options or {}
        k = int(options.get("testbed", self.np_random.integers(len(self.testbeds))))
        noise_seed = int(options.get("noise_seed", self.seeds[int(self.np_random.integers(len(self.seeds)))]))
        budget = int(options.get("budget", self.budgets[int(self.np_random.integers(len(self.budgets)))]))
        self._episode = {"testbed": k, "noise_seed": noise_seed, "budget": budget, "steps": 0}
        self._start_thread(k, noise_seed, budget)
        msg = self._next()
        if msg[0] != "obs":  # cannot happen for budgets ≥ 4
            raise RuntimeError(f"the sampling run ended before its first decision (budget {budget})")
        return self._clip(msg[1]), dict(self._episode)

    def step(self, action):
        """Apply the step-size action; the episode ends when the sampler returns."""
        if self._decider is None:
            raise RuntimeError("call reset() before step()")
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        self._decider.act_q.put(a)
        self._episode["steps"] += 1
        msg = self._next()
        if msg[0] == "obs":
            return self._clip(msg[1]), 0.0, False, False, dict(self._episode)
        _, out, nfe = msg
        self._thread.join()
        self._thread, self._decider = None, None
        k, seed, budget = self._episode["testbed"], self._episode["noise_seed"], self._episode["budget"]
        rmse = float(rmse_per_sample(out, self._noise_and_reference(k, seed)[1])[0])
        heur = self.heuristic_rmse(k, seed, budget)
        reward = math.log(max(heur, 1e-12) / max(rmse, 1e-12)) + self.nfe_weight * (budget - nfe) / budget
        info = {**self._episode, "rmse": rmse, "rmse_heuristic": heur, "nfe": nfe,
                "testbed_name": "-".join(self.specs[k])}
        obs = np.zeros(N_OBSERVATIONS, dtype=np.float32)
        return obs, float(reward), True, False, info

    @staticmethod
    def _clip(obs: np.ndarray) -> np.ndarray:
        return np.clip(np.nan_to_num(obs, nan=0.0), -OBS_BOUND, OBS_BOUND).astype(np.float32)

    def close(self) -> None:
        """End a running episode's thread."""
        self._stop_thread()


def evaluate_controller(controller, specs: Sequence[tuple[str, str]], budgets: Sequence[int],
                        seeds: Sequence[int] = EVAL_SEEDS, references: dict | None = None) -> dict:
    """RMSE (over all elements of all ``seeds``, to the reference, as the benchmark) and mean NFE per (testbed-model type, budget) for ADO with
    ``controller`` (None = the heuristic), on held-out seeds; all seeds in one batch (decisions are per sample).
    ``references`` caches {(name, mt): (x, ref)} between calls.  Returns {"name-mt": {budget: {"rmse", "nfe"}}}."""
    from ..trace import Trace
    from ..bench.metrics import rmse
    references = {} if references is None else references
    res: dict = {}
    for name, mt in specs:
        tb = make_testbed(name, mt)
        if (name, mt) not in references:
            x = tb.noise(list(seeds))
            references[(name, mt)] = (x, tb.reference(x))
        x, ref = references[(name, mt)]
        for budget in budgets:
            trace = Trace()
            opts = {} if controller is None else {"controller": controller}
            out = sample_adaptive(tb, x, host_grid(tb, budget), nfe_budget=budget, model_type=mt, trace=trace, **opts)
            nfe = float(np.mean([trace.sample_nfe(b) for b in range(x.shape[0])]))
            res.setdefault(f"{name}-{mt}", {})[int(budget)] = {"rmse": rmse(out, ref),
                                                                "nfe": nfe}
    return res


__all__ = ["EVAL_SEEDS", "SamplingEnv", "TRAIN_BUDGETS", "TRAIN_SEEDS", "TRAIN_TESTBEDS", "evaluate_controller",
           "host_grid", "rmse_per_sample"]
