"""PPO training (Schulman et al. 2017, stable-baselines3) of ADO's step policy and its export to ONNX + manifest.

``python -m adaptive_core.tune policy`` (see :func:`main`).  Training: SB3 PPO on vectorised
:class:`~.policy_env.SamplingEnv` copies (DummyVecEnv, or SubprocVecEnv with ``--vec subproc`` to use several
cores) under VecNormalize (running observation mean/variance; rewards are left raw: they are already free of the
testbed's error scale, and the env scales them per configuration),
with SB3's TensorBoard logs, a progress bar, and a periodic evaluation of the deterministic policy on held-out
seeds against the heuristic controller (logged and plotted).  Export: the deterministic actor (VecNormalize's
normalisation and clipping, the MLP, the action mean, the clip to [−1, 1]) as one ONNX file, checked against
SB3's ``predict(deterministic=True)`` to 1e-5, then a :class:`~adaptive_core.policy.PolicyManifest` with sha256.
The SB3 zip checkpoint goes to an ignored ``build/`` folder only; nothing pickled is shipped.
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..domain import scope_of_trained_on
from ..learned import sha256_of_file
from ..policy import (ACTION_KINDS, ACTION_SCALE, AUTO_PLAN_RULE, BASE_PLANS, EARLY_STEP_CAP_KEYS, LEGACY_BASE_PLAN,
                      MANIFEST_FORMAT, MIN_SHARE, N_OBSERVATIONS, OBSERVATION_NAMES, OOD_Z, ORDER_DEAD_ZONE, SOFT_Z,
                      STD_FLOOR, PolicyManifest, check_base_plan, check_early_step_cap, uses_auto_plan)
from .policy_env import (ERROR_REWARDS, EVAL_SEEDS, TRAINED_CFG_SCALES, TRAINED_REFERENCE_STEPS, TRAINED_SEED_POOL,
                         SamplingEnv, configs_of, evaluate_controller)

#: The manifest's fallback rule in words (adaptive_core.policy, "Fallback rule" and "Damping before the fallback"):
#: FALLBACK_RULE + where the range is centred + SOFT_Z_RULE.
FALLBACK_RULE = ("a row falls back to the heuristic step when any observation is non-finite or more than "
                 "ood_z * max(sqrt(var), std_floor) from ")
SOFT_Z_RULE = ("; inside that range the row's actions are scaled by clip((ood_z - z_max) / (ood_z - soft_z), 0, 1), "
               "z_max its largest |z|")

#: Default training testbeds of the CLI: the shipped analytic and trained testbeds, ve and flow.
DEFAULT_TESTBEDS = "gaussian:ve,gaussian:flow,gmm_digits:ve,gmm_digits:flow,mnist_unet:ve,mnist_unet:flow"
#: The reward's error terms as recorded in a manifest, per ``--error-reward`` (policy_env's module docstring).
REWARD_TEXT = {"log-ratio": "log(RMSE_heuristic / RMSE_policy)",
               "pooled-mse": "(RMSE_heuristic^2 - RMSE_policy^2) / mean_pool(RMSE_heuristic^2)",
               "both": "log(RMSE_heuristic / RMSE_policy) + (RMSE_heuristic^2 - RMSE_policy^2) / "
                       "mean_pool(RMSE_heuristic^2)"}


class SB3Decider:
    """A live SB3 model + VecNormalize as a sampler ``controller`` (deterministic actions, no fallback)."""

    action_scale, min_share, order_dead_zone, name = ACTION_SCALE, MIN_SHARE, ORDER_DEAD_ZONE, "sb3-ppo"
    def __init__(self, model, vecnorm, min_lambda_progress: float = 0.0, early_step_cap=None,
                 base_options=LEGACY_BASE_PLAN) -> None:
        self.model, self.vecnorm, self.min_lambda_progress = model, vecnorm, float(min_lambda_progress)
        self.base_options = dict(base_options)   # the plan an exported policy runs on (adaptive_core.policy)
        self.early_step_cap = check_early_step_cap(early_step_cap)   # applied by the sampler, as to a loaded policy

    def decide(self, observation: np.ndarray):
        """Deterministic PPO actions [B, n_actions] for raw observation rows."""
        act = sb3_actions(self.model, self.vecnorm, observation)
        return act, [None] * len(act)


#: What ``--keep-best`` and the Optuna search score an evaluation by (lower ratio is better): option → the
#: :func:`ratio_summary` entry it reads.
SELECT_BY = {"geomean": "geomean", "worst-cell": "worst"}
#: How episodes draw their (configuration, budget) cell: ``default`` (SamplingEnv's: testbed and model type
#: uniformly, then CFG and budget) or ``worst-cell`` (half of that, half :func:`worst_cell_weights` of the last
#: evaluation).
CELL_SAMPLINGS = ("default", "worst-cell")
#: Initial log-std of the step and order actions when ``policy --init`` starts from a policy manifest, which
#: carries no exploration noise.  The bundled policy's PPO members ended near step −4.0, order −1.8; a fresh
#: run's −1.0/−0.7 swamps the trained decisions (the first fine-tune in docs/policy/README.md, section 2, lost
#: its gain that way).  The step noise is e^−3 rather than e^−4: the policy gradient only sees about a noise
#: width around the current actions, and at e^−4 one update moved the actions by several widths (approximate
#: KL 0.5–3.7 per update at learning rate 1e-3) in a direction set mostly by which images the rollout drew;
#: at e^−3 and 3e-4 it was 0.02–0.1 and none of six seeds collapsed (section 2).
FINE_TUNE_LOG_STD_INIT = (-3.0, -1.8)
#: Decisions of critic warm-up when ``policy --init`` starts from a policy manifest without a training state
#: (no critic: ``policy-critic`` fits one): PPO's first updates against a fresh critic's advantages can pull a
#: trained actor off its policy, so for these decisions only the critic learns (the actor, action noise
#: included, is frozen).  It helped in one of three runs at learning rate 1e-3; without a shipped critic,
#: fine-tuning from a manifest stays slower and less stable than from a checkpoint (docs/policy/README.md,
#: section 2).
FINE_TUNE_CRITIC_WARMUP = 512
WORST_CELL_MIX = 0.5
#: Baselines of the advantages (``train(baseline=...)``, ``--baseline``): SB3's critic, or paired episodes.
BASELINES = ("critic", "pairs")
#: What of the actor learns (``train(tune_actor=...)``, ``--tune-actor``): all layers, the output layer, or the
#: output layer's bias (one offset per action).
TUNE_ACTOR = ("all", "head", "bias")
#: SB3's ``train/*`` statistics of each PPO update that ``train`` keeps in ``history["updates"]``.
UPDATE_STATISTICS = ("explained_variance", "approx_kl", "clip_fraction", "value_loss", "policy_gradient_loss")


def ratio_summary(policy_res: dict, heur_res: dict) -> dict:
    """Per testbed and budget, RMSE_policy / RMSE_heuristic; their geometric mean ``"geomean"`` and their
    largest ``"worst"`` (the cell furthest above the heuristic)."""
    ratios = {tb: {b: policy_res[tb][b]["rmse"] / heur_res[tb][b]["rmse"] for b in policy_res[tb]} for tb in policy_res}
    flat = [r for tb in ratios.values() for r in tb.values()]
    return {"per_testbed": ratios, "geomean": float(np.exp(np.mean(np.log(flat)))), "worst": float(max(flat))}


def worst_cell_weights(per_testbed: dict, sharpness: float) -> dict:
    """Sampling weights of the (configuration, budget) cells from their last evaluated ratios r to the heuristic:
    r ** sharpness, i.e. a softmax of ``sharpness`` · log r, so the cells furthest above the heuristic are
    trained most: the online group re-weighting of Group DRO (Sagawa et al. 2020, eq. 5), whose objective is
    the worst group's loss, here the worst cell's ratio.  {config key: {budget: weight}}."""
    if not math.isfinite(sharpness) or sharpness < 0:
        raise ValueError(f"sharpness must be finite and ≥ 0, got {sharpness}")
    logs = {tb: {int(b): math.log(max(float(r), 1e-12)) for b, r in cells.items()} for tb, cells in per_testbed.items()}
    top = max(v for cells in logs.values() for v in cells.values())
    return {tb: {b: math.exp(sharpness * (v - top)) for b, v in cells.items()} for tb, cells in logs.items()}


def make_vec_env(specs, budgets, seeds, n_envs: int, vec: str, nfe_weight: float, seed: int,
                 paired: bool = False, **env_kwargs):
    """``n_envs`` monitored SamplingEnv copies in a DummyVecEnv or SubprocVecEnv (``env_kwargs``: the other
    :class:`~.policy_env.SamplingEnv` arguments), seeded as SB3's ``make_vec_env`` seeds them (copy i resets
    with ``seed + i``).  ``paired``: copies 2j and 2j + 1 share a ``draw_seed``, so their k-th episodes are the
    same image, budget and CFG (:class:`PairedEpisodes`)."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
    if paired and n_envs % 2:
        raise ValueError(f"paired episodes need an even number of environments, got n_envs={n_envs}")
    kwargs = dict(testbeds=specs, budgets=budgets, seeds=seeds, nfe_weight=nfe_weight, **env_kwargs)

    def make(rank: int):
        draw_seed = int(np.random.SeedSequence([int(seed), rank // 2]).generate_state(1)[0]) if paired else None

        def init():
            env = SamplingEnv(**kwargs, draw_seed=draw_seed)
            env.action_space.seed(seed + rank)
            return Monitor(env)
        return init

    cls = SubprocVecEnv if vec == "subproc" else DummyVecEnv
    venv = cls([make(i) for i in range(n_envs)])
    venv.seed(seed)
    return venv


class PairedEpisodes:
    """Advantages from paired episodes instead of the critic: environment copies 2j and 2j + 1 run the same
    sequence of images (:func:`make_vec_env` with ``paired=True``), and every decision of an episode gets the
    advantage R − R', where R is its episode's return and R' that of the same image's episode in the partner
    copy: the leave-one-out baseline of REINFORCE with several samples per input (Kool et al. 2019, "Buy 4
    REINFORCE samples, get a baseline for free!"; with two samples).  R' does not depend on this episode's
    actions, so the estimate stays unbiased, and it removes what the image itself contributes to the return,
    which a critic cannot learn on a testbed it has not seen (its explained variance there is about 0,
    docs/policy/README.md, section 2).

    The return is the episode's terminal reward (the env's reward is 0 before the end, and γ = 1).  A decision
    whose episode, or whose partner's episode, has not ended by the end of the rollout gets advantage 0 (it
    does not move the actor); the critic's regression target is left to SB3 there.  The advantages of a rollout
    are divided by their root mean square over the paired decisions: PPO's advantage normalisation without the
    masked ones (so SB3's own must be off), and without subtracting the mean, which is 0 in expectation."""

    def __init__(self, n_envs: int) -> None:
        if n_envs < 2 or n_envs % 2:
            raise ValueError(f"paired episodes need an even number (≥ 2) of environments, got {n_envs}")
        self.n_envs = int(n_envs)
        self.rows: np.ndarray | None = None      # episode index of each buffer row [n_steps, n_envs]
        self.returns: dict[tuple[int, int], float] = {}   # (env, episode index) → return, until both partners end

    def start_rollout(self, n_steps: int) -> None:
        """A new rollout of ``n_steps`` rows per environment begins."""
        self.rows = np.full((int(n_steps), self.n_envs), -1, dtype=np.int64)

    def record(self, pos: int, infos, rewards, dones) -> None:
        """Row ``pos`` of the rollout: each environment's episode index (from ``info["episode_index"]``) and, for
        one that ended, its return."""
        for e, info in enumerate(infos):
            if "episode_index" not in info:
                raise ValueError("paired episodes need SamplingEnv's info['episode_index']")
            k = int(info["episode_index"])
            self.rows[pos, e] = k
            if dones[e]:
                self.returns[(e, k)] = float(rewards[e])

    def advantages(self, sb3_returns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(advantages, critic targets, paired mask) for the rows recorded, each [n_steps, n_envs]: R − R' divided
        by its root mean square over the paired rows, and R, where both episodes ended; 0 and ``sb3_returns``
        elsewhere.  Forgets the pairs it has used."""
        adv = np.zeros(self.rows.shape)
        targets = np.array(sb3_returns, dtype=np.float64, copy=True)
        mask = np.zeros(self.rows.shape, dtype=bool)
        for (pos, e), k in np.ndenumerate(self.rows):
            own, other = self.returns.get((e, int(k))), self.returns.get((e ^ 1, int(k)))
            if k >= 0 and own is not None and other is not None:
                adv[pos, e], targets[pos, e], mask[pos, e] = own - other, own, True
        rms = float(np.sqrt(np.mean(np.square(adv[mask])))) if mask.any() else 0.0
        if rms > 0:
            adv[mask] /= rms
        for e, k in [key for key in self.returns if key[0] % 2 == 0]:
            if (e + 1, k) in self.returns:
                del self.returns[(e, k)], self.returns[(e + 1, k)]
        return adv, targets, mask


def train(specs, budgets, *, timesteps: int, n_envs: int = 4, vec: str = "dummy", seed: int = 0,
          train_seeds=range(256), eval_seeds=EVAL_SEEDS, eval_every: int = 4096, nfe_weight: float = 0.1,
          lr: float = 3e-4, n_steps: int = 128, batch_size: int = 128, n_epochs: int = 10, ent_coef: float = 0.0,
          log_std_init: float = -1.0, hidden: int = 64, logdir: Path | None = None, progress: bool = True,
          init: Path | None = None, cfg_scales=TRAINED_CFG_SCALES, order_action: bool = True,
          trained_seed_pool: int = TRAINED_SEED_POOL, reference_steps: int = TRAINED_REFERENCE_STEPS,
          reward_scale: str = "per-config", order_log_std_init: float | None = -0.7, run_name: str = "ppo",
          error_reward: str = "both", keep_best: bool = False, select_by: str = "geomean",
          cell_sampling: str = "default", cell_sharpness: float = 8.0, min_lambda_progress: float = 0.0,
          early_step_cap=None, critic_warmup: int | None = None, target_kl: float | None = None,
          baseline: str = "critic", tune_actor: str = "all", base_plan=LEGACY_BASE_PLAN):
    """Train PPO; returns (model, vecnorm, history).  ``history``: training episodes (timestep, reward) and
    evaluations on held-out seeds (timestep, episodes, the geometric mean over configurations and budgets of the
    pooled RMSE ratio to the heuristic, and its −log as the evaluation reward), and what SB3 logged for each PPO
    update (``updates``: timestep and :data:`UPDATE_STATISTICS`, e.g. the critic's explained variance of the
    returns, 1 − Var[R − V] / Var[R], and the approximate KL divergence of the policy's step).
    ``init``: an SB3 zip (+ ``.vecnorm.npz``) to fine-tune from, or a policy manifest (``.json``, e.g. a bundled
    policy): then the actor and observation statistics come from its ONNX graph (:func:`load_policy_actor`), the
    critic from its training state if it has one (:func:`load_training_state`; else it starts fresh), and the
    command line starts the action noise at :data:`FINE_TUNE_LOG_STD_INIT`.
    ``cfg_scales``, ``order_action``, ``trained_seed_pool``, ``reference_steps``, ``reward_scale``,
    ``error_reward``, ``min_lambda_progress``, ``early_step_cap``, ``base_plan``: see
    :class:`~.policy_env.SamplingEnv` (the periodic evaluations apply them too).
    ``run_name``: the TensorBoard run's name (``<logdir>/<run_name>_<n>``).
    ``order_log_std_init``: the initial log-std of the order action (None: ``log_std_init``); it is set apart
    because the order changes only past |a₁| ≥ ½, which a small step-action noise would never explore.
    ``keep_best``: end with the policy (and observation statistics) of the best periodic evaluation instead of
    the last (model selection on the evaluation seeds, as early stopping in supervised training): a fast
    fine-tune can then be used without its later instabilities.  ``history["best"]`` says which it was.
    ``select_by``: what "best" means, one of :data:`SELECT_BY`: the geometric-mean ratio to the heuristic over
    configurations and budgets, or the worst cell's ratio.
    ``cell_sampling``: one of :data:`CELL_SAMPLINGS`; with ``"worst-cell"`` every evaluation re-weights the
    episodes' draw of configuration and budget towards the cells furthest above the heuristic
    (:func:`worst_cell_weights` with ``cell_sharpness``, mixed half and half with the default draw), so training
    time goes where the worst-cell target is missed; ``history["cell_weights"]`` records them.
    ``critic_warmup``: for this many first decisions only the critic learns, the actor and its action noise stay
    frozen (for an ``init`` without a trained critic).  None: :data:`FINE_TUNE_CRITIC_WARMUP` from a policy
    manifest without a training state, else 0.
    ``target_kl``: SB3's early stop of an update's epochs once its approximate KL divergence from the rollout's
    policy passes 1.5 × this (the KL-adaptive step of Schulman et al. 2017; None: all epochs).
    ``baseline``: what the advantages subtract, one of :data:`BASELINES`: ``"critic"`` (SB3's GAE with the
    value network) or ``"pairs"`` (:class:`PairedEpisodes`: environment copies run each image twice and each
    episode's return is compared with its twin's; needs an even ``n_envs`` and the default cell draw);
    ``history["paired_share"]`` then records, per rollout, the share of decisions that had a finished twin.
    ``tune_actor``: what of the actor learns, one of :data:`TUNE_ACTOR`: ``"all"``, or ``"head"``: only its
    output layer and action noise, the hidden layers held fixed (last-layer fine-tuning: for the 64-wide MLP,
    130 weights to fit from a few hundred episodes instead of 5 442; Kumar et al. 2022, "Fine-Tuning can
    Distort Pretrained Features and Underperform Out-of-Distribution", find it holds up better off the
    training distribution), or ``"bias"``: only the output layer's bias and the action noise, i.e. one offset
    per action added to every decision (bias-only fine-tuning, Ben Zaken et al. 2022, "BitFit")."""
    if critic_warmup is not None and critic_warmup < 0:
        raise ValueError(f"critic_warmup must be ≥ 0 decisions, got {critic_warmup}")
    if target_kl is not None and not target_kl > 0:
        raise ValueError(f"target_kl must be > 0 (or None), got {target_kl}")
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {tuple(SELECT_BY)}, got {select_by!r}")
    if cell_sampling not in CELL_SAMPLINGS:
        raise ValueError(f"cell_sampling must be one of {CELL_SAMPLINGS}, got {cell_sampling!r}")
    if tune_actor not in TUNE_ACTOR:
        raise ValueError(f"tune_actor must be one of {TUNE_ACTOR}, got {tune_actor!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    paired = PairedEpisodes(n_envs) if baseline == "pairs" else None
    if paired is not None and cell_sampling != "default":
        raise ValueError("baseline 'pairs' needs the default cell draw: re-weighting the draw mid-run would give "
                         "twin environments different episodes")
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import VecNormalize
    torch.manual_seed(seed)
    env_kwargs = dict(cfg_scales=tuple(cfg_scales), order_action=order_action, trained_seed_pool=trained_seed_pool,
                      reference_steps=reference_steps, reward_scale=reward_scale, error_reward=error_reward,
                      min_lambda_progress=min_lambda_progress, early_step_cap=early_step_cap, base_plan=base_plan)
    venv = make_vec_env(specs, budgets, train_seeds, n_envs, vec, nfe_weight, seed, paired=paired is not None,
                        **env_kwargs)
    vecnorm = VecNormalize(venv, norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=1.0)
    from_manifest = init is not None and Path(init).suffix == ".json"
    state = None                        # a manifest's training state (its critic), once loaded
    if init is not None and not from_manifest:
        load_vecnorm_stats(vecnorm, Path(init).with_suffix(".vecnorm.npz"))
        model = PPO.load(str(init), env=vecnorm, tensorboard_log=str(logdir) if logdir else None, device="cpu",
                         custom_objects={"n_steps": n_steps, "batch_size": batch_size, "n_epochs": n_epochs,
                                         "learning_rate": lr, "ent_coef": ent_coef, "target_kl": target_kl})
        model.set_random_seed(seed)       # PPO.load re-seeds with the checkpoint's own seed: use this run's
    else:
        if from_manifest:
            graph = policy_actor_weights(init)
            hidden = int(graph["policy_net.0.weight"].shape[0])
        model = PPO("MlpPolicy", vecnorm, learning_rate=lr, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs,
                    target_kl=target_kl,
                    gamma=1.0, gae_lambda=0.95, ent_coef=ent_coef, seed=seed, device="cpu", verbose=0,
                    tensorboard_log=str(logdir) if logdir else None,
                    policy_kwargs=dict(net_arch=dict(pi=[hidden, hidden], vf=[hidden, hidden]),
                                       log_std_init=log_std_init))
        if order_action and order_log_std_init is not None:
            with torch.no_grad():
                model.policy.log_std[1] = float(order_log_std_init)
        if from_manifest:
            load_policy_actor(model, vecnorm, init, graph)
            state = load_training_state(model, init)
    if critic_warmup is None:
        critic_warmup = FINE_TUNE_CRITIC_WARMUP if from_manifest and state is None and paired is None else 0
    if paired is not None:
        model.normalize_advantage = False   # PairedEpisodes normalises over the paired decisions only
    references: dict = {}
    eval_kwargs = dict(cfg_scales=tuple(cfg_scales), reference_steps=reference_steps)
    heur = evaluate_controller(None, specs, budgets, eval_seeds, references, **eval_kwargs)
    history = {"episodes": [], "evals": [], "updates": []}
    if paired is not None:
        history["paired_share"] = []
    best: dict = {}

    def evaluate(step: int, episodes: int) -> dict:
        vecnorm.training = False
        res = evaluate_controller(SB3Decider(model, vecnorm, min_lambda_progress, early_step_cap, base_plan), specs,
                                  budgets,
                                  eval_seeds, references, **eval_kwargs)
        vecnorm.training = True
        summ = ratio_summary(res, heur)
        history["evals"].append({"timesteps": step, "episodes": episodes, "rmse_ratio_geomean": summ["geomean"],
                                 "rmse_ratio_worst": summ["worst"], "eval_reward": float(-np.log(summ["geomean"]))})
        if cell_sampling == "worst-cell":
            weights = worst_cell_weights(summ["per_testbed"], cell_sharpness)
            venv.env_method("set_cell_weights", weights, WORST_CELL_MIX)
            history.setdefault("cell_weights", []).append({"timesteps": step, "weights": weights})
        score = summ[SELECT_BY[select_by]]
        if keep_best and (not best or score < best["score"]):
            rms = vecnorm.obs_rms
            best.update(eval=dict(history["evals"][-1]), summary=summ, score=score,
                        policy={k: v.detach().clone() for k, v in model.policy.state_dict().items()},
                        obs_rms=(rms.mean.copy(), rms.var.copy(), float(rms.count)))
        return summ

    actor = [*model.policy.mlp_extractor.policy_net.parameters(), *model.policy.action_net.parameters(),
             model.policy.log_std]
    # what of the actor learns once it is released (tune_actor): all of it, its output layer and noise, or the
    # output layer's bias and noise
    learning = {"all": actor, "head": [*model.policy.action_net.parameters(), model.policy.log_std],
                "bias": [model.policy.action_net.bias, model.policy.log_std]}[tune_actor]
    for prm in actor:
        prm.requires_grad_(any(prm is q for q in learning))

    class Callback(BaseCallback):
        def __init__(self):
            super().__init__()
            self.episodes, self.last_eval, self.actor_frozen = 0, -1, False

        def _on_training_start(self) -> None:
            if critic_warmup > 0:
                self.actor_frozen = True
                for prm in actor:
                    prm.requires_grad_(False)

        def record_update(self) -> None:
            # what SB3 logged for the last update (kept until the next rollout's log dump)
            logged = self.logger.name_to_value
            if "train/explained_variance" in logged and (not history["updates"] or
                                                         history["updates"][-1]["timesteps"] != self.num_timesteps):
                history["updates"].append({"timesteps": int(self.num_timesteps),
                                           **{k: float(logged[f"train/{k}"]) for k in UPDATE_STATISTICS
                                              if f"train/{k}" in logged}})

        def _on_rollout_start(self) -> None:
            self.record_update()
            if paired is not None:
                paired.start_rollout(self.model.n_steps)
            # the update after a rollout learns from its decisions: the actor joins from the first rollout that
            # starts at or past the warm-up
            if self.actor_frozen and self.num_timesteps >= critic_warmup:
                self.actor_frozen = False
                for prm in learning:
                    prm.requires_grad_(True)

        def _on_rollout_end(self) -> None:
            if paired is not None:
                buf = self.model.rollout_buffer
                adv, targets, mask = paired.advantages(buf.returns)
                buf.advantages[:] = adv
                buf.returns[:] = targets
                history["paired_share"].append((int(self.num_timesteps), float(mask.mean())))

        def _on_step(self) -> bool:
            if paired is not None:   # before SB3 adds this step's row at rollout_buffer.pos
                paired.record(self.model.rollout_buffer.pos, self.locals["infos"], self.locals["rewards"],
                              self.locals["dones"])
            for info in self.locals.get("infos", []):
                if "episode" in info:
                    self.episodes += 1
                    history["episodes"].append((int(self.num_timesteps),
                                                float(info.get("reward_raw", info["episode"]["r"]))))
            if self.last_eval < 0 or self.num_timesteps - self.last_eval >= eval_every:
                self.last_eval = self.num_timesteps
                summ = evaluate(self.num_timesteps, self.episodes)
                self.logger.record("eval/rmse_ratio_vs_heuristic", summ["geomean"])
                self.logger.record("eval/reward_log_ratio", -float(np.log(summ["geomean"])))
            return True

    cb = Callback()
    if progress:
        try:
            import rich  # noqa: F401  (SB3's progress bar needs tqdm and rich)
        except ImportError:
            print("no progress bar: SB3's needs `pip install rich`")
            progress = False
    t0 = time.time()
    model.learn(total_timesteps=timesteps, callback=cb, progress_bar=progress, reset_num_timesteps=init is None,
                tb_log_name=run_name)
    history["train_seconds"] = time.time() - t0
    cb.record_update()
    history["critic_warmup"] = int(critic_warmup)
    if from_manifest:
        history["training_state"] = state is not None
    for prm in actor:
        prm.requires_grad_(True)
    summ = evaluate(model.num_timesteps, cb.episodes)
    if keep_best:
        model.policy.load_state_dict(best["policy"])
        vecnorm.obs_rms.mean, vecnorm.obs_rms.var, vecnorm.obs_rms.count = best["obs_rms"]
        summ = best["summary"]
        history["best"] = best["eval"]
    history["final"] = {"heuristic": heur, "ratio": summ}
    venv.close()
    return model, vecnorm, history


def episodes_to_final(history: dict, tolerance: float = 0.05) -> dict:
    """How fast training got close to where it ended: the training episodes at the first held-out evaluation
    whose reward is within ``tolerance`` of the final evaluation's (``"first"``), and at the first one after which
    every evaluation stays within it (``"stays"``).  The final evaluation is that of the exported policy: the
    last, or with ``keep_best`` the best (``history["best"]``).  ``None`` where none qualifies.

    Two readings of "within 5%" are reported.  ``"first"``/``"stays"`` take it relative to the reward itself.
    The evaluation reward is −ln(geometric-mean RMSE ratio to the heuristic), so it is near 0 wherever a policy
    is close to the heuristic (a fine-tune on a new network), and a relative band there shrinks to nothing:
    5% of 0.03 is 0.0015, a 0.15% change in error.  ``"rmse_first"``/``"rmse_stays"`` take it in the error the
    reward measures: an evaluation whose RMSE is within ``tolerance`` of the final one's, i.e. a reward within
    ln(1 + tolerance) of the final; that band does not depend on which controller the ratio is taken to."""
    evals = history.get("evals", [])
    if not evals:
        return {"first": None, "stays": None, "rmse_first": None, "rmse_stays": None, "final_reward": None,
                "tolerance": tolerance}
    final = history.get("best", evals[-1])["eval_reward"]

    def reached(band: float) -> tuple:
        inside = [abs(e["eval_reward"] - final) <= band for e in evals]
        first = next((e["episodes"] for e, ok in zip(evals, inside) if ok), None)
        stays = next((evals[i]["episodes"] for i in range(len(evals)) if all(inside[i:])), None)
        return first, stays

    first, stays = reached(tolerance * max(abs(final), 1e-12))
    rmse_first, rmse_stays = reached(float(np.log1p(tolerance)))
    return {"first": first, "stays": stays, "rmse_first": rmse_first, "rmse_stays": rmse_stays,
            "final_reward": final, "tolerance": tolerance}


def save_vecnorm_stats(vecnorm, path: Path) -> None:
    """VecNormalize's observation statistics as .npz (numbers only; SB3's own save pickles)."""
    rms = vecnorm.obs_rms
    np.savez(path, mean=rms.mean, var=rms.var, count=np.array(rms.count), epsilon=np.array(vecnorm.epsilon),
             clip_obs=np.array(vecnorm.clip_obs))


def read_vecnorm_stats(path: Path) -> dict:
    """The statistics written by :func:`save_vecnorm_stats`: mean, var, count, epsilon, clip_obs."""
    d = np.load(path)
    return {"mean": d["mean"], "var": d["var"], "count": float(d["count"]), "epsilon": float(d["epsilon"]),
            "clip_obs": float(d["clip_obs"])}


def load_vecnorm_stats(vecnorm, path: Path) -> None:
    """Restore statistics written by :func:`save_vecnorm_stats`."""
    d = read_vecnorm_stats(path)
    vecnorm.obs_rms.mean, vecnorm.obs_rms.var, vecnorm.obs_rms.count = d["mean"], d["var"], d["count"]


class DeterministicActor(nn.Module):
    """raw observation → normalisation (VecNormalize's clip((o − μ)/√(σ² + ε), ±c)) → tanh MLP → action
    mean → clip [−1, 1].  :meth:`from_sb3` copies a PPO model's actor and its VecNormalize statistics;
    :mod:`.policy_distill` builds a fresh one to train."""

    def __init__(self, policy_net: nn.Module, action_net: nn.Module, mean, var, epsilon: float,
                 clip_obs: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(1, -1))
        self.register_buffer("inv_std", 1.0 / torch.sqrt(torch.as_tensor(np.asarray(var), dtype=torch.float32)
                                                         .reshape(1, -1) + float(epsilon)))
        self.clip_obs = float(clip_obs)
        self.policy_net, self.action_net = policy_net, action_net

    @classmethod
    def from_sb3(cls, model, vecnorm) -> "DeterministicActor":
        """The deterministic actor of an SB3 PPO ``model`` trained behind ``vecnorm`` (copies; float32, CPU)."""
        import copy
        rms = vecnorm.obs_rms
        return cls(copy.deepcopy(model.policy.mlp_extractor.policy_net).cpu().float(),
                   copy.deepcopy(model.policy.action_net).cpu().float(), rms.mean, rms.var, vecnorm.epsilon,
                   vecnorm.clip_obs)

    def raw_action(self, observation: torch.Tensor) -> torch.Tensor:
        """The MLP's output before the final clip (what a regression loss should see)."""
        z = torch.clamp((observation - self.mean) * self.inv_std, -self.clip_obs, self.clip_obs)
        return self.action_net(self.policy_net(z))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.raw_action(observation), -1.0, 1.0)


#: The ONNX initialisers of a graph written by :func:`export_policy` or ``policy-distill`` (one
#: :class:`DeterministicActor`), which :func:`load_policy_actor` copies back into a PPO model.
ACTOR_INITIALISERS = ("mean", "inv_std", "policy_net.0.weight", "policy_net.0.bias", "policy_net.2.weight",
                      "policy_net.2.bias", "action_net.weight", "action_net.bias")


def policy_actor_weights(manifest_path: Path) -> dict:
    """{initialiser name: array} of a policy's ONNX actor (:data:`ACTOR_INITIALISERS`), after the manifest and the
    graph's sha256 pass :class:`~adaptive_core.policy.Policy`'s checks.  A graph of another shape (an ensemble)
    is refused: distil it into one actor first (``policy-distill``)."""
    import onnx
    from onnx import numpy_helper

    from ..policy import Policy
    policy = Policy(manifest_path)
    model = onnx.load(str(policy.path.parent / policy.manifest.onnx_file))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    missing = [n for n in ACTOR_INITIALISERS if n not in arrays]
    if missing:
        raise ValueError(f"{manifest_path}: not a single-actor policy graph (no {missing}); an ensemble cannot be "
                         f"fine-tuned as it is: distil it first (python -m adaptive_core.tune policy-distill)")
    out = {n: np.array(arrays[n], dtype=np.float32) for n in ACTOR_INITIALISERS}   # writable copies
    out["epsilon"] = float(policy.manifest.normalisation.get("epsilon", 1e-8))
    out["clip_obs"] = float(policy.manifest.normalisation.get("clip_obs", 10.0))
    out["policy"] = policy
    return out


def actor_layers(model) -> list[tuple[nn.Linear, str]]:
    """The linear layers of an SB3 PPO model's actor (a two-layer tanh MLP, then the action layer), each with the name
    of its weights in a policy graph (:data:`ACTOR_INITIALISERS`: ``<name>.weight``, ``<name>.bias``)."""
    net = model.policy.mlp_extractor.policy_net
    return [(net[0], "policy_net.0"), (net[2], "policy_net.2"), (model.policy.action_net, "action_net")]


def load_policy_actor(model, vecnorm, manifest_path: Path, graph: dict | None = None) -> None:
    """Copy a policy's ONNX actor into a fresh SB3 PPO ``model`` of the same widths (a tanh MLP and action layer)
    and its observation normalisation into ``vecnorm`` (mean; var = 1/inv_std² − ε), then check that SB3's
    deterministic actions equal the ONNX policy's to 1e-4 on 64 probe rows.  The critic and the action noise are
    left as they are (:func:`load_training_state` copies a shipped critic)."""
    graph = policy_actor_weights(manifest_path) if graph is None else graph
    pairs = actor_layers(model)
    for layer, name in pairs:
        w, b = graph[f"{name}.weight"], graph[f"{name}.bias"]
        if tuple(layer.weight.shape) != w.shape or tuple(layer.bias.shape) != b.shape:
            raise ValueError(f"{manifest_path}: {name} is {w.shape} in the graph, the PPO model's is "
                             f"{tuple(layer.weight.shape)} (another layer width or action count)")
    with torch.no_grad():
        for layer, name in pairs:
            layer.weight.copy_(torch.as_tensor(graph[f"{name}.weight"]))
            layer.bias.copy_(torch.as_tensor(graph[f"{name}.bias"]))
    eps = graph["epsilon"]
    vecnorm.obs_rms.mean = graph["mean"].reshape(-1).astype(np.float64)
    vecnorm.obs_rms.var = 1.0 / np.square(graph["inv_std"].reshape(-1).astype(np.float64)) - eps
    # The actor was trained on these statistics: weighted as 10⁶ observations, a fine-tune on one testbed all but
    # keeps them, so the copied actor keeps its input mapping.
    vecnorm.obs_rms.count = 1e6
    vecnorm.epsilon, vecnorm.clip_obs = eps, graph["clip_obs"]
    policy = graph["policy"]
    rng = np.random.default_rng(0)
    probe = (policy._mean + policy._std * rng.normal(size=(64, N_OBSERVATIONS))).astype(np.float32)
    got, want = sb3_actions(model, vecnorm, probe), policy.act(probe)
    if not np.allclose(got, want, atol=1e-4, rtol=0):
        raise RuntimeError(f"{manifest_path}: the PPO model with the copied actor differs from the ONNX policy by "
                           f"{np.abs(got - want).max():.3g}")


#: Format tag of a policy's training state file (:func:`save_training_state`).
TRAINING_STATE_FORMAT = "ado-ppo-training-state/1"
#: The SB3 parameters of the critic, which a policy's training state file carries (the ONNX graph has the actor).
CRITIC_PARAMETER_PREFIXES = ("mlp_extractor.value_net.", "value_net.")


def critic_parameters(model) -> dict:
    """The parameters of an SB3 PPO model's critic (value MLP and value head, :data:`CRITIC_PARAMETER_PREFIXES`)
    by name: what a policy's training state file carries."""
    return {n: p for n, p in model.policy.named_parameters() if n.startswith(CRITIC_PARAMETER_PREFIXES)}


def training_state_path(onnx_path: Path) -> Path:
    """Where a policy's training state goes: ``<stem>.training_state.safetensors`` next to its ONNX actor."""
    return Path(onnx_path).with_name(Path(onnx_path).stem + ".training_state.safetensors")


def save_training_state(model, path: Path, made_by: str) -> dict:
    """Write the critic of a PPO ``model`` (SB3's value MLP and value head), which a policy's ONNX actor lacks, as
    safetensors, so that ``policy --init <manifest>`` can fine-tune the shipped actor with the critic it was
    trained with instead of a fresh one.  PPO's advantages are returns minus the critic's values (Schulman et
    al. 2017); the fine-tunes from a manifest with a fresh critic in docs/policy/README.md (section 2) took
    hundreds of episodes or collapsed.  A shipped critic makes a fine-tune from the file start as one from the
    checkpoint does, though on a new testbed it explains little of the returns at first.  The optimizer state
    is not kept: a fine-tune that also started from Adam moments gathered during the critic fit fell at its
    first update (section 2).  ``made_by`` says how the critic was obtained.  Returns the manifest's
    ``training_state`` entry (file name, sha256, format, contents)."""
    from safetensors.torch import save_file
    tensors = {name: prm.detach().cpu().float().clone().contiguous()
               for name, prm in critic_parameters(model).items()}
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": TRAINING_STATE_FORMAT})
    return {"file": path.name, "sha256": sha256_of_file(path), "format": TRAINING_STATE_FORMAT, "made_by": made_by,
            "contents": "the PPO critic (SB3 mlp_extractor.value_net.*, value_net.*; it reads the observation "
                        "normalised as the actor does); read by `python -m adaptive_core.tune policy --init`, "
                        "never at sampling time"}


def load_training_state(model, manifest_path: Path) -> dict | None:
    """Copy a policy's critic (:func:`save_training_state`, named by its manifest's ``training_state``) into a PPO
    ``model`` whose actor came from the same policy.  Returns the manifest entry, or None when the policy has no
    training state.  A missing file, a wrong sha256, another format, or tensors that do not fit the model's
    critic raise ValueError naming the problem."""
    from safetensors import safe_open

    from ..policy import PolicyManifest
    manifest_path = Path(manifest_path)
    entry = PolicyManifest.from_json(manifest_path.read_text()).training_state
    if not entry:
        return None
    path = manifest_path.parent / str(entry.get("file", ""))
    if not entry.get("file") or not path.is_file():
        raise ValueError(f"{manifest_path}: its training state file {path.name!r} is missing")
    if sha256_of_file(path) != entry.get("sha256"):
        raise ValueError(f"{path}: sha256 does not match the manifest's training_state (corrupt or replaced)")
    with safe_open(str(path), framework="pt") as f:
        fmt = (f.metadata() or {}).get("format")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if fmt != TRAINING_STATE_FORMAT:
        raise ValueError(f"{path}: training state format {fmt!r}, expected {TRAINING_STATE_FORMAT!r}")
    critic = critic_parameters(model)
    shapes = {n: tuple(p.shape) for n, p in critic.items()}
    got = {n: tuple(t.shape) for n, t in tensors.items()}
    if got != shapes:
        raise ValueError(f"{path}: the critic's tensors {got} do not fit the PPO model's {shapes}")
    with torch.no_grad():
        for name, prm in critic.items():
            prm.copy_(tensors[name])
    return entry


def sb3_actions(model, vecnorm, obs: np.ndarray) -> np.ndarray:
    """SB3's deterministic actions for raw observations (VecNormalize applied as in training), [R, n_actions]."""
    act, _ = model.predict(vecnorm.normalize_obs(np.asarray(obs, dtype=np.float32)), deterministic=True)
    return np.asarray(act, dtype=np.float64).reshape(len(obs), -1)


def _action_kind(n_actions: int) -> str:
    """The manifest's action kind for a model with ``n_actions`` outputs."""
    kind = {n: k for k, n in ACTION_KINDS.items()}.get(n_actions)
    if kind is None:
        raise ValueError(f"the model has {n_actions} actions; a policy has one of {sorted(ACTION_KINDS.values())}")
    return kind


def _export_verified(actor: nn.Module, onnx_path: Path, probe_mean: np.ndarray, probe_var: np.ndarray,
                     sb3_reference) -> None:
    """Export ``actor`` (raw observations → actions) as one ONNX file with a dynamic batch, then check that ONNX
    Runtime's output equals ``sb3_reference(probe)`` to 1e-5 on 64 observations drawn around the training
    statistics (±2 std)."""
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(actor.eval(), (torch.randn(4, N_OBSERVATIONS),), str(onnx_path), input_names=["observation"],
                      output_names=["action"], dynamo=True, external_data=False, optimize=True,
                      dynamic_shapes={"observation": {0: torch.export.Dim("batch", min=1, max=1 << 20)}})
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    probe = (probe_mean + np.sqrt(probe_var) * rng.normal(size=(64, N_OBSERVATIONS)) * 2).astype(np.float32)
    got = session.run(["action"], {"observation": probe})[0]
    want = sb3_reference(probe)
    if not np.allclose(got, want, atol=1e-5, rtol=0):
        raise RuntimeError(f"ONNX export of the policy differs from SB3 by {np.abs(got - want).max():.3g}")


def _policy_manifest(onnx_path: Path, n_actions: int, normalisation: dict, *, trained_on: dict, training: dict,
                     metrics: dict, min_lambda_progress: float = 0.0, early_step_cap=None,
                     action_text: str = "a[0]", range_text: str = "the training mean",
                     training_state: dict | None = None, base_plan: dict | None = None) -> Path:
    """Write the manifest (``<stem>.json``) of the ONNX policy at ``onnx_path``: its sha256, the action mapping
    and fallback rule of :mod:`adaptive_core.policy`, and the given normalisation and records.  ``early_step_cap``
    (None or (below_lambda_progress, max_step_action)) and ``base_plan`` (the sampler options the policy runs on;
    absent: :data:`~adaptive_core.policy.LEGACY_BASE_PLAN`) are written only where given; ``applies_to``, the
    jobs the domain adapter may give the policy, follows from ``trained_on`` (:mod:`adaptive_core.domain`)."""
    cap = check_early_step_cap(early_step_cap)
    cap_entry = {} if cap is None else {"early_step_cap": dict(zip(EARLY_STEP_CAP_KEYS, cap))}
    manifest = PolicyManifest(
        onnx_file=onnx_path.name, sha256=sha256_of_file(onnx_path), observation_names=list(OBSERVATION_NAMES),
        normalisation=normalisation,
        action={"kind": _action_kind(n_actions), "action_scale": ACTION_SCALE, "min_share": MIN_SHARE,
                **({"order_dead_zone": ORDER_DEAD_ZONE} if n_actions > 1 else {}),
                "min_lambda_progress": float(min_lambda_progress), **cap_entry,
                **({} if base_plan is None else {"base_plan": dict(base_plan)}),
                **({"auto_plan_rule": AUTO_PLAN_RULE} if base_plan is not None and uses_auto_plan(base_plan) else {}),
                "formula": f"share = clip(base_share * exp(action_scale * clip({action_text}, -1, 1)), min_share, 1); "
                           "lambda_next = lambda + share * (lambda_end - lambda); base_share = the heuristic plan's"
                           + ("; order change = -1 if a[1] <= -order_dead_zone, +1 if a[1] >= order_dead_zone, "
                              "else 0 (the heuristic's)" if n_actions > 1 else "")
                           + "; rows with lambda_progress < min_lambda_progress keep the heuristic's step and order"
                           + ("" if cap is None else "; on decided rows with lambda_progress < early_step_cap."
                              "below_lambda_progress, a[0] is first capped at early_step_cap.max_step_action")},
        fallback={"ood_z": OOD_Z, "std_floor": STD_FLOOR, "soft_z": SOFT_Z, "rule": FALLBACK_RULE + range_text
                  + SOFT_Z_RULE},
        trained_on=trained_on, applies_to=scope_of_trained_on(trained_on) if trained_on.get("model_types") else {},
        training=training, metrics=metrics, training_state=training_state or {}, format=MANIFEST_FORMAT)
    out = onnx_path.with_suffix(".json")
    out.write_text(manifest.to_json() + "\n")
    return out


def export_policy(model, vecnorm, onnx_path: Path, *, trained_on: dict, training: dict, metrics: dict,
                  min_lambda_progress: float = 0.0, early_step_cap=None, base_plan: dict | None = None) -> Path:
    """Write the deterministic actor as one ONNX file, its training state (the critic, for fine-tuning from the
    file: :func:`save_training_state`) and its manifest (``<stem>.json``); the ONNX output must equal SB3's
    deterministic actions on random observations to 1e-5.  Returns the manifest path."""
    onnx_path = Path(onnx_path)
    n_actions = int(model.action_space.shape[0])
    _action_kind(n_actions)
    rms = vecnorm.obs_rms
    _export_verified(DeterministicActor.from_sb3(model, vecnorm), onnx_path, rms.mean, rms.var,
                     lambda probe: sb3_actions(model, vecnorm, probe))
    normalisation = {"applied_in_graph": True,
                     "formula": "clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)",
                     "mean": [float(v) for v in rms.mean], "var": [float(v) for v in rms.var],
                     "epsilon": float(vecnorm.epsilon), "clip_obs": float(vecnorm.clip_obs)}
    state = save_training_state(model, training_state_path(onnx_path),
                                made_by=f"the PPO model at export ({training.get('command', 'policy')})")
    return _policy_manifest(onnx_path, n_actions, normalisation, trained_on=trained_on, training=training,
                            metrics=metrics, min_lambda_progress=min_lambda_progress,
                            early_step_cap=early_step_cap, training_state=state, base_plan=base_plan)


class EnsembleActor(nn.Module):
    """The mean action of several :class:`DeterministicActor` s, each with its own observation normalisation: a
    policy ensemble (the mean of independently trained policies' actions; Lakshminarayanan et al. 2017 average
    ensemble members the same way).  Members trained apart agree on the steps that help most images and
    disagree on the idiosyncratic long steps that make single images flip (docs/policy/README.md), so the mean
    keeps the first and damps the second.

    The members' MLPs (same layer sizes, tanh) run as one batched matrix product per layer, so the ONNX graph
    has the op count of a single policy: with four members a decision takes 52 µs on this CPU, against 61 µs
    for a graph of separate members and 38 µs for one policy (docs/policy/README.md).  ``policy-distill``
    (:mod:`.policy_distill`) trains one policy to act as the ensemble, at one policy's cost."""

    def __init__(self, actors) -> None:
        super().__init__()
        clips = {a.clip_obs for a in actors}
        if len(clips) != 1:
            raise ValueError(f"the members clip their normalised observations differently: {sorted(clips)}")
        self.clip_obs = clips.pop()
        self.register_buffer("mean", torch.stack([a.mean[0] for a in actors]).unsqueeze(1))        # [M, 1, N]
        self.register_buffer("inv_std", torch.stack([a.inv_std[0] for a in actors]).unsqueeze(1))
        layers = [[m for m in a.policy_net] + [a.action_net] for a in actors]
        kinds = {tuple(type(m).__name__ for m in ls) for ls in layers}
        shapes = {tuple(tuple(m.weight.shape) for m in ls if isinstance(m, nn.Linear)) for ls in layers}
        if len(kinds) != 1 or len(shapes) != 1 or not all(k in ("Linear", "Tanh") for k in next(iter(kinds))):
            raise ValueError("ensemble members must share one MLP architecture of Linear and Tanh layers")
        self.kinds = list(next(iter(kinds)))
        linear = [[m for m in ls if isinstance(m, nn.Linear)] for ls in layers]
        self.weights = nn.ParameterList([nn.Parameter(torch.stack([ls[i].weight.T for ls in linear]),
                                                      requires_grad=False) for i in range(len(linear[0]))])
        self.biases = nn.ParameterList([nn.Parameter(torch.stack([ls[i].bias for ls in linear]).unsqueeze(1),
                                                     requires_grad=False) for i in range(len(linear[0]))])

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        h = torch.clamp((observation.unsqueeze(0) - self.mean) * self.inv_std, -self.clip_obs, self.clip_obs)
        i = 0
        for kind in self.kinds:
            if kind == "Linear":
                h = torch.bmm(h, self.weights[i]) + self.biases[i]
                i += 1
            else:
                h = torch.tanh(h)
        return torch.clamp(h, -1.0, 1.0).mean(0)


def load_checkpoint(zip_path: Path):
    """(SB3 PPO model, observation statistics) of a checkpoint written by ``policy`` (``<name>.zip`` and
    ``<name>.vecnorm.npz``; build/ only, the zip is SB3's pickle); the statistics as an object with VecNormalize's
    ``obs_rms.mean``/``.var``, ``epsilon``, ``clip_obs`` and ``normalize_obs``."""
    from types import SimpleNamespace

    from stable_baselines3 import PPO
    zip_path = Path(zip_path)
    stats_path = zip_path.with_suffix(".vecnorm.npz")
    if not zip_path.is_file() or not stats_path.is_file():
        raise FileNotFoundError(f"checkpoint {zip_path} needs {zip_path.name} and {stats_path.name}")
    d = read_vecnorm_stats(stats_path)
    stats = SimpleNamespace(obs_rms=SimpleNamespace(mean=d["mean"], var=d["var"], count=d["count"]),
                            epsilon=d["epsilon"], clip_obs=d["clip_obs"])
    stats.normalize_obs = lambda o: np.clip((o - stats.obs_rms.mean) / np.sqrt(stats.obs_rms.var + stats.epsilon),
                                            -stats.clip_obs, stats.clip_obs).astype(np.float32)
    return PPO.load(str(zip_path), device="cpu"), stats


def export_ensemble(checkpoints, onnx_path: Path, *, trained_on: dict, training: dict, metrics: dict,
                    early_step_cap=None) -> Path:
    """Write the mean of several checkpoints' deterministic actors (:class:`EnsembleActor`) as one ONNX file and
    its manifest; the ONNX output must equal the mean of SB3's deterministic actions to 1e-5.  The manifest's
    normalisation, which only the fallback rule reads (each member normalises inside the graph), is the
    intersection of the members' in-range boxes, so a row falls back when any member has not seen its like.
    ``early_step_cap``: the cap the members were trained under (their checkpoints do not record it).
    Returns the manifest path."""
    checkpoints = [Path(c) for c in checkpoints]
    if len(checkpoints) < 2:
        raise ValueError(f"an ensemble needs at least two checkpoints, got {len(checkpoints)}")
    loaded = [load_checkpoint(c) for c in checkpoints]
    widths = {int(m.action_space.shape[0]) for m, _ in loaded}
    if len(widths) != 1:
        raise ValueError(f"the checkpoints have different action widths {sorted(widths)}")
    n_actions = widths.pop()
    _action_kind(n_actions)
    onnx_path = Path(onnx_path)
    first = loaded[0][1].obs_rms
    _export_verified(EnsembleActor([DeterministicActor.from_sb3(m, st) for m, st in loaded]), onnx_path,
                     first.mean, first.var,
                     lambda probe: np.mean([sb3_actions(m, st, probe) for m, st in loaded], axis=0))
    lo = np.max([st.obs_rms.mean - OOD_Z * np.maximum(np.sqrt(st.obs_rms.var), STD_FLOOR) for _, st in loaded], 0)
    hi = np.min([st.obs_rms.mean + OOD_Z * np.maximum(np.sqrt(st.obs_rms.var), STD_FLOOR) for _, st in loaded], 0)
    if (hi <= lo).any():
        raise ValueError("the members' observation ranges do not overlap: they were trained on different inputs")
    mean, std = (lo + hi) / 2, (hi - lo) / (2 * OOD_Z)
    normalisation = {"applied_in_graph": True, "mean": [float(v) for v in mean], "var": [float(v) for v in std ** 2],
                     "ensemble_of": len(loaded),
                     "formula": "mean of the members' actions; each member computes clip((obs - mean_i) / "
                                "sqrt(var_i + epsilon), -clip_obs, clip_obs) in the graph; mean/var here span the "
                                "intersection of the members' in-range boxes (fallback rule)"}
    return _policy_manifest(onnx_path, n_actions, normalisation, trained_on=trained_on,
                            training={**training, "members": [c.stem for c in checkpoints]}, metrics=metrics,
                            early_step_cap=early_step_cap, action_text="mean of the members' a[0]",
                            range_text="mean, the centre of the members' common training range")


def ensemble_main(argv) -> int:
    """``python -m adaptive_core.tune policy-ensemble``: export the mean of trained checkpoints as one policy,
    copying the members' training record (their manifests next to ``--members-dir``) into the manifest."""
    import argparse
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-ensemble", description=ensemble_main.__doc__)
    ap.add_argument("--members", required=True,
                    help="checkpoint zips written by `policy` (comma-separated; each with its .vecnorm.npz)")
    ap.add_argument("--name", required=True, help="policy name: <out-dir>/<name>.onnx + .json")
    ap.add_argument("--out-dir", type=Path, default=repo / "build" / "policies")
    ap.add_argument("--members-dir", type=Path, default=repo / "build" / "policies",
                    help="where the members' own manifests are (their training records are copied)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    members = [Path(m) for m in args.members.split(",") if m]
    records, trained_on, seconds, caps = {}, None, 0.0, set()
    for m in members:
        own = args.members_dir / f"{m.stem}.json"
        if own.is_file():
            man = json.loads(own.read_text())
            try:
                caps.add(manifest_early_step_cap(own))
            except ValueError as e:
                ap.error(str(e))
            records[m.stem] = {"command": man["training"].get("command"),
                               "train_seconds": man["metrics"].get("train_seconds")}
            seconds += float(man["metrics"].get("train_seconds") or 0.0)
            trained_on = trained_on or man.get("trained_on")
        else:
            print(f"note: no manifest {own}: the member's training record is left out")
    if len(caps) > 1:   # the mean of members trained under different caps has no one cap to run under
        ap.error(f"the members were trained under different early-step caps: {sorted(caps, key=str)}")
    training = {"command": "python -m adaptive_core.tune policy-ensemble " + " ".join(argv),
                "algorithm": "mean of PPO (stable-baselines3) policies", "member_training": records,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}
    manifest = export_ensemble(members, args.out_dir / f"{args.name}.onnx", trained_on=trained_on or {},
                               training=training, metrics={"train_seconds": round(seconds, 1)},
                               early_step_cap=caps.pop() if caps else None)
    print(f"wrote {manifest} ({len(members)} members)")
    return 0


def plot_learning_curve(history: dict, path: Path, title: str = "PPO step policy") -> None:
    """Training episode reward (rolling mean) and held-out evaluation reward vs environment steps; the critic
    warm-up (if any) shaded, the evaluation ``--keep-best`` exported (if any) ringed, and on a second axis the
    critic's explained variance at each update (how much of the returns' spread it accounts for)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if history["episodes"]:
        steps, rew = np.array(history["episodes"]).T
        w = max(1, min(200, len(rew) // 10))
        roll = np.convolve(rew, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], roll, lw=1, label=f"training episode reward (rolling mean of {w})")
    if history["evals"]:
        ax.plot([e["timesteps"] for e in history["evals"]], [e["eval_reward"] for e in history["evals"]], "o-",
                label="held-out seeds: −log(RMSE policy / heuristic)")
    if history.get("critic_warmup"):
        ax.axvspan(0, history["critic_warmup"], color="0.85", zorder=0, label="critic warm-up (actor frozen)")
    if history.get("best"):
        ax.plot([history["best"]["timesteps"]], [history["best"]["eval_reward"]], "o", ms=12, mfc="none",
                color="C3", label="exported (--keep-best)")
    ax.axhline(0.0, color="k", lw=0.8, ls="--", label="heuristic controller")
    ax.set_xlabel("environment steps (decisions)")
    ax.set_ylabel("reward (> 0 beats the heuristic)")
    ax.set_title("\n".join(textwrap.wrap(title, 75)), fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    if history.get("updates"):
        ax2 = ax.twinx()
        steps = np.array([u["timesteps"] for u in history["updates"]], dtype=float)
        ev = np.array([u.get("explained_variance", np.nan) for u in history["updates"]], dtype=float)
        line, = ax2.plot(steps, np.clip(ev, -1.0, 1.0), color="0.45", lw=1, ls=":")
        ax2.set_ylim(-1.05, 1.05)
        ax2.set_ylabel("critic: explained variance of the returns", fontsize=8, color="0.35")
        handles.append(line)
        labels.append("critic's explained variance at each update (right axis)")
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_specs(text: str) -> list[tuple[str, str]]:
    """"gaussian:ve,gmm_digits:flow" → [("gaussian", "ve"), ("gmm_digits", "flow")]."""
    specs = []
    for item in text.split(","):
        name, _, mt = item.strip().partition(":")
        if mt not in ("ve", "flow"):
            raise ValueError(f"testbed {item!r}: expected NAME:ve or NAME:flow")
        specs.append((name, mt))
    return specs


def parse_early_step_cap(text: str) -> tuple[float, float]:
    """"0.2,0.15" → (0.2, 0.15): (below_lambda_progress, max_step_action) of ``--early-step-cap``, checked by
    :func:`adaptive_core.policy.check_early_step_cap` (argparse reports its message on bad input)."""
    import argparse
    try:
        parts = [float(v) for v in text.split(",")]
        if len(parts) != 2:
            raise ValueError(f"expected two numbers P,A, got {len(parts)}")
        return check_early_step_cap(parts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def parse_second_order_max_step(text: str) -> float | None:
    """"1.0" → 1.0, "none" → None: ``--second-order-max-step``, the base plan's longest step in λ at predictor order
    2 or above (checked by :func:`adaptive_core.sampler.resolve_second_order_max_step`, the rule of DPM-Solver, Lu et
    al. 2022, which lowers the order on long steps); argparse reports its message on bad input."""
    import argparse

    from ..sampler import resolve_second_order_max_step
    if text.strip().lower() == "none":
        return None
    try:
        return resolve_second_order_max_step(float(text), model=None)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def manifest_early_step_cap(manifest_path: Path) -> tuple[float, float] | None:
    """The early-step cap a policy manifest was trained under (None when it has none, or the file is missing:
    ``train`` reports that), checked by :func:`adaptive_core.policy.check_early_step_cap`; ``policy --init`` keeps
    it unless ``--early-step-cap`` is given.  ValueError names the file when its cap is malformed."""
    path = Path(manifest_path)
    if not path.is_file():
        return None
    try:
        return check_early_step_cap(json.loads(path.read_text()).get("action", {}).get("early_step_cap"))
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: {e}") from None


def policy_training_cells(manifest, testbeds: str | None = None, budgets: str | None = None):
    """(testbed specs, NFE budgets, CFG scales) to run a policy on again (``policy-distill``, ``policy-critic``):
    ``testbeds`` ("name:model_type,...") and ``budgets`` ("5,6,...") where given, else those of the policy
    manifest's ``trained_on``.  ValueError when neither names testbeds, or a budget is below 1."""
    from .policy_env import TRAIN_BUDGETS, TRAINED_CFG_SCALES
    trained_on = manifest.trained_on or {}
    if testbeds:
        specs = parse_specs(testbeds)
    elif trained_on.get("testbeds"):
        specs = [tuple(t.rsplit("-", 1)) for t in trained_on["testbeds"]]
    else:
        raise ValueError("the policy's manifest names no training testbeds: give --testbeds")
    cells = ([int(b) for b in budgets.split(",")] if budgets
             else [int(b) for b in trained_on.get("budgets", TRAIN_BUDGETS)])
    if min(cells) < 1:
        raise ValueError(f"budgets must be at least 1, got {cells}")
    return specs, cells, tuple(trained_on.get("cfg_scales", TRAINED_CFG_SCALES))


def main(argv) -> int:
    """``python -m adaptive_core.tune policy``: train, evaluate, export, plot."""
    import argparse
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy",
                                 description="Train ADO's PPO step policy on the testbeds and export ONNX + manifest.")
    ap.add_argument("--testbeds", default=DEFAULT_TESTBEDS,
                    help="NAME:MODEL_TYPE pairs, comma-separated (the analytic testbeds and the trained mnist_unet)")
    ap.add_argument("--budgets", default="5,6,8,10", help="NFE budgets drawn per episode (each ≥ 4)")
    ap.add_argument("--cfg", default=",".join(f"{c:g}" for c in TRAINED_CFG_SCALES),
                    help="CFG scales drawn per episode on a trained testbed (comma-separated)")
    ap.add_argument("--trained-seeds", type=int, default=TRAINED_SEED_POOL,
                    help="training noise seeds of a trained testbed (each needs a reference solve, cached in build/)")
    ap.add_argument("--reference-steps", type=int, default=TRAINED_REFERENCE_STEPS,
                    help="steps of a trained testbed's reference solve")
    ap.add_argument("--no-order-action", action="store_true",
                    help="the policy picks the step size only, not the solver order")
    ap.add_argument("--timesteps", type=int, default=50_000, help="environment steps (decisions) to train")
    ap.add_argument("--n-envs", type=int, default=4)
    ap.add_argument("--vec", choices=("dummy", "subproc"), default="dummy",
                    help="subproc: one process per environment (several cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seeds", type=int, default=256, help="noise seeds 0..N-1 form the training pool")
    ap.add_argument("--eval-seeds", type=int, default=32, help="held-out noise seeds 20000.. for evaluation")
    ap.add_argument("--eval-every", type=int, default=4096, help="evaluate every this many environment steps")
    ap.add_argument("--nfe-weight", type=float, default=0.1, help="reward weight of the NFE saved (policy_env)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--n-steps", type=int, default=128, help="PPO rollout length per environment")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ent-coef", type=float, default=0.0)
    ap.add_argument("--log-std-init", type=float, default=None,
                    help="initial log-std of the step action (default -1.0; -3.0 from an --init manifest)")
    ap.add_argument("--order-log-std-init", type=float, default=None,
                    help="initial log-std of the solver-order action, which acts past |a| ≥ 0.5 and so explores "
                         "wider (default -0.7; -1.8 from an --init manifest)")
    ap.add_argument("--critic-warmup", type=int, default=None,
                    help="first decisions in which only the critic learns (default 0; 512 from an --init manifest "
                         "without a training state, i.e. no critic)")
    ap.add_argument("--target-kl", type=float, default=None,
                    help="stop an update's epochs once its approximate KL divergence passes 1.5x this (SB3's "
                         "target_kl; default: none, all epochs)")
    ap.add_argument("--baseline", choices=BASELINES, default="critic",
                    help="advantage baseline: SB3's critic (GAE), or 'pairs': environments run each image twice "
                         "and compare the two returns (even --n-envs; for fine-tuning on a new testbed, where a "
                         "critic explains little)")
    ap.add_argument("--tune-actor", choices=TUNE_ACTOR, default="all",
                    help="what of the actor learns: all layers; 'head': its output layer and action noise only "
                         "(the hidden layers of the --init policy are kept); 'bias': the output layer's bias and "
                         "the action noise only (one offset per action)")
    ap.add_argument("--reward-scale", choices=("per-config", "none"), default="per-config",
                    help="divide each episode's reward by its configuration's running reward std (policy_env)")
    ap.add_argument("--error-reward", choices=ERROR_REWARDS, default="both",
                    help="error terms of the reward: per-image log-ratio, pooled-MSE share, or both (policy_env)")
    ap.add_argument("--keep-best", action="store_true",
                    help="export the policy of the best periodic evaluation instead of the last (e.g. a fine-tune "
                         "at a high learning rate)")
    ap.add_argument("--select-by", choices=tuple(SELECT_BY), default="geomean",
                    help="what --keep-best and the Optuna objective minimise: the geometric-mean RMSE ratio to the "
                         "heuristic over configurations and budgets, or the worst cell's ratio")
    ap.add_argument("--cell-sampling", choices=CELL_SAMPLINGS, default="default",
                    help="worst-cell: after each evaluation, draw half the episodes' (configuration, budget) cells "
                         "in proportion to ratio ** --cell-sharpness (Group DRO re-weighting)")
    ap.add_argument("--cell-sharpness", type=float, default=8.0,
                    help="exponent of the evaluated ratio in --cell-sampling worst-cell (8: a cell at 1.1 is drawn "
                         "2.1x as often as one at 1.0)")
    ap.add_argument("--min-lambda-progress", type=float, default=0.0,
                    help="the policy acts only from this share of the λ-span on; earlier steps stay the heuristic's, "
                         "in training and at run time (the image is decided at high noise)")
    ap.add_argument("--base-plan", choices=sorted(BASE_PLANS), default=None,
                    help="the sampler plan the policy learns to correct: legacy (data prediction, rho plan; the "
                         "default, and what every bundled policy runs on) or current (the sampler's defaults, e.g. "
                         "the shifted-time plan of unguided flow runs); fine-tuning from a manifest keeps its plan")
    ap.add_argument("--max-order", type=int, choices=(1, 2, 3), default=None,
                    help="the base plan's predictor order (default: the --init manifest's, else 3; the heuristic "
                         "takes 2 on guided runs above CFG 2, adaptive_core.sampler.resolve_max_order)")
    ap.add_argument("--second-order-max-step", type=parse_second_order_max_step, default=False, metavar="H",
                    help="the base plan's longest step in λ at predictor order 2 or above, longer steps taking order 1 "
                         "(the heuristic's rule on guided runs at CFG ≥ 3 is 1.0, "
                         "adaptive_core.sampler.resolve_second_order_max_step); 'none': no limit (default: the --init "
                         "manifest's, else none)")
    ap.add_argument("--early-step-cap", type=parse_early_step_cap, default=None, metavar="P,A",
                    help="cap the step action at A on the decisions before the share P of the λ-span (steps at most "
                         "4^A times the heuristic's there), in training and at run time; e.g. 0.2,0.15 (default: "
                         "the cap of an --init policy manifest, else none)")
    ap.add_argument("--init", type=Path, default=None,
                    help="what to fine-tune from: an SB3 zip (build/), or a policy manifest such as "
                         "policies/ppo_ve_flow.json (its actor and statistics, and its critic if the manifest names "
                         "a training state; else the critic starts fresh)")
    ap.add_argument("--name", default="ppo_policy", help="policy name: policies are <out-dir>/<name>.onnx + .json")
    ap.add_argument("--out-dir", type=Path, default=repo / "build" / "policies",
                    help="where the ONNX + manifest go (policies/ to bundle)")
    ap.add_argument("--logdir", type=Path, default=repo / "build" / "policy_tb", help="SB3 TensorBoard logs")
    ap.add_argument("--curve", type=Path, default=None, help="learning-curve PNG (default: <out-dir>/<name>_curve.png)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--trials", type=int, default=0,
                    help="Optuna: run this many trials of a search over PPO and reward hyper-parameters (each trains "
                         "--timesteps) instead of one training run; prints the best parameters")
    ap.add_argument("--storage", default=None,
                    help="Optuna storage: default sqlite:///build/policy_optuna.db; an RDB URL (postgresql://...) lets "
                         "workers on several machines share one study")
    ap.add_argument("--study", default="ado_policy", help="Optuna study name (workers with the same name share it)")
    args = ap.parse_args(argv)
    from_manifest = args.init is not None and args.init.suffix == ".json"
    if args.early_step_cap is None and from_manifest:   # a capped policy stays capped when fine-tuned
        try:
            args.early_step_cap = manifest_early_step_cap(args.init)
        except ValueError as e:
            ap.error(str(e))
        if args.early_step_cap is not None:
            print(f"note: training under the early-step cap of {args.init}: {args.early_step_cap}")
    base_plan = BASE_PLANS[args.base_plan] if args.base_plan else LEGACY_BASE_PLAN
    if args.base_plan is None and from_manifest and args.init.is_file():   # a policy keeps its plan when fine-tuned
        base_plan = json.loads(args.init.read_text()).get("action", {}).get("base_plan", LEGACY_BASE_PLAN)
    base_plan = check_base_plan(base_plan)
    if args.max_order is not None:
        base_plan["max_order"] = args.max_order
    if args.second_order_max_step is not False:
        base_plan["second_order_max_step"] = args.second_order_max_step
    if args.log_std_init is None:
        args.log_std_init = FINE_TUNE_LOG_STD_INIT[0] if from_manifest else -1.0
    if args.order_log_std_init is None:
        args.order_log_std_init = FINE_TUNE_LOG_STD_INIT[1] if from_manifest else -0.7
    if args.critic_warmup is not None and args.critic_warmup < 0:
        ap.error(f"--critic-warmup must be ≥ 0, got {args.critic_warmup}")
    if args.target_kl is not None and not args.target_kl > 0:
        ap.error(f"--target-kl must be > 0, got {args.target_kl}")
    if args.baseline == "pairs" and (args.n_envs < 2 or args.n_envs % 2):
        ap.error(f"--baseline pairs needs an even --n-envs (≥ 2), got {args.n_envs}")
    if args.baseline == "pairs" and args.cell_sampling != "default":
        ap.error("--baseline pairs needs --cell-sampling default")
    torch.set_num_threads(1)
    specs = parse_specs(args.testbeds)
    budgets = [int(b) for b in args.budgets.split(",")]
    try:
        cfg_scales = tuple(float(c) for c in args.cfg.split(","))
    except ValueError:
        ap.error(f"--cfg must be comma-separated numbers, got {args.cfg!r}")
    if any(not np.isfinite(c) or c < 0 for c in cfg_scales):
        ap.error(f"--cfg scales must be finite and ≥ 0, got {args.cfg!r}")
    if args.trained_seeds < 1 or args.reference_steps < 8:
        ap.error("need --trained-seeds ≥ 1 and --reference-steps ≥ 8")
    env_args = dict(cfg_scales=cfg_scales, order_action=not args.no_order_action,
                    trained_seed_pool=args.trained_seeds, reference_steps=args.reference_steps,
                    reward_scale=args.reward_scale, order_log_std_init=args.order_log_std_init,
                    error_reward=args.error_reward, min_lambda_progress=args.min_lambda_progress,
                    early_step_cap=args.early_step_cap, base_plan=base_plan)
    if not 0.0 <= args.min_lambda_progress < 1.0:
        ap.error(f"--min-lambda-progress must be in [0, 1), got {args.min_lambda_progress}")
    eval_seeds = range(EVAL_SEEDS.start, EVAL_SEEDS.start + args.eval_seeds)
    if args.trials > 0:
        return search(args, specs, budgets, eval_seeds, repo, env_args)
    model, vecnorm, history = train(
        specs, budgets, timesteps=args.timesteps, n_envs=args.n_envs, vec=args.vec, seed=args.seed,
        train_seeds=range(args.train_seeds), eval_seeds=eval_seeds, eval_every=args.eval_every,
        nfe_weight=args.nfe_weight, lr=args.lr, n_steps=args.n_steps, batch_size=args.batch_size,
        ent_coef=args.ent_coef, log_std_init=args.log_std_init, logdir=args.logdir, progress=not args.no_progress,
        init=args.init, run_name=args.name, keep_best=args.keep_best, select_by=args.select_by,
        cell_sampling=args.cell_sampling, cell_sharpness=args.cell_sharpness, critic_warmup=args.critic_warmup,
        target_kl=args.target_kl, baseline=args.baseline, tune_actor=args.tune_actor, **env_args)
    build = repo / "build" / "policy_checkpoints"
    build.mkdir(parents=True, exist_ok=True)
    ckpt = build / f"{args.name}.zip"
    model.save(str(ckpt))                                   # SB3's zip (pickle inside): build/ only, never shipped
    save_vecnorm_stats(vecnorm, ckpt.with_suffix(".vecnorm.npz"))
    final = history["final"]
    metrics = {"eval_seeds": [eval_seeds.start, eval_seeds.stop], "heuristic": final["heuristic"],
               "rmse_ratio_vs_heuristic": final["ratio"], "evals": history["evals"],
               "training_episodes": len(history["episodes"]), "train_seconds": round(history["train_seconds"], 1),
               "episodes_to_within_5pct_of_final_eval": episodes_to_final(history)}
    training = {"command": "python -m adaptive_core.tune policy " + " ".join(argv), "algorithm": "PPO (stable-baselines3)",
                "timesteps": int(model.num_timesteps), "n_envs": args.n_envs, "vec": args.vec, "seed": args.seed,
                "train_seeds": [0, args.train_seeds], "trained_testbed_seeds": [0, args.trained_seeds],
                "reference_steps": args.reference_steps, "nfe_weight": args.nfe_weight,
                "ppo": {"learning_rate": args.lr, "n_steps": args.n_steps, "batch_size": args.batch_size,
                        "gamma": 1.0, "gae_lambda": 0.95, "ent_coef": args.ent_coef, "log_std_init": args.log_std_init,
                        "order_log_std_init": args.order_log_std_init, "reward_scale": args.reward_scale,
                        "error_reward": args.error_reward, "cell_sampling": args.cell_sampling,
                        "cell_sharpness": args.cell_sharpness, "critic_warmup": history["critic_warmup"],
                        "target_kl": args.target_kl, "baseline": args.baseline,
                        "tune_actor": args.tune_actor,
                        "net_arch": [64, 64], "activation": "tanh"},
                "reward": REWARD_TEXT[args.error_reward] + " + nfe_weight * (budget - NFE) / budget, at the end",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}
    trained_on = {"testbeds": [f"{n}-{m}" for n, m in specs], "model_types": sorted({m for _, m in specs}),
                  "budgets": budgets, "cfg_scales": list(cfg_scales),
                  "configurations": [c.key for c in configs_of(specs, cfg_scales)]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = export_policy(model, vecnorm, args.out_dir / f"{args.name}.onnx", trained_on=trained_on,
                             training=training, metrics=metrics, min_lambda_progress=args.min_lambda_progress,
                             early_step_cap=args.early_step_cap, base_plan=base_plan)
    curve = args.curve or args.out_dir / f"{args.name}_curve.png"
    plot_learning_curve(history, curve, f"PPO step policy {args.name}: {', '.join(trained_on['testbeds'])}")
    (args.out_dir / f"{args.name}_history.json").write_text(json.dumps(history, indent=1, default=float) + "\n")
    print(json.dumps({"rmse_ratio_vs_heuristic": final["ratio"], "train_seconds": round(history["train_seconds"], 1),
                      "episodes_to_within_5pct_of_final_eval": episodes_to_final(history)}, indent=1, default=float))
    print(f"wrote {manifest}, {curve}, checkpoint {ckpt}")
    return 0


def join_study(optuna, name: str, storage: str, attempts: int = 6):
    """Create the study or join it (``load_if_exists``).  Workers started together on an empty database race to
    create Optuna's tables (one gets a duplicate-table or unique-key error from SQLAlchemy): that worker waits a
    moment and joins the study the other made."""
    for attempt in range(attempts):
        try:
            return optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                                       sampler=optuna.samplers.TPESampler(seed=None))
        except Exception as e:   # sqlalchemy's errors; anything else re-raises on the last attempt
            if attempt == attempts - 1 or not type(e).__module__.startswith("sqlalchemy"):
                raise
            print(f"storage busy ({type(e).__name__}: another worker is creating the study); retrying")
            time.sleep(0.5 + random.random() * 2 ** attempt)


def search(args, specs, budgets, eval_seeds, repo: Path, env_args: dict) -> int:
    """Optuna search (TPE sampler; Akiba et al. 2019) over PPO's learning rate, entropy coefficient, initial
    log-std, rollout length and the reward's NFE weight.  The objective is the RMSE ratio of the deterministic
    policy to the heuristic on the held-out evaluation seeds, as ``--select-by`` says: its geometric mean over
    configurations and budgets, or its worst cell (lower is better; independent of the reward weights, so
    trials are comparable).  Several processes given the same ``--storage`` and ``--study``
    share one study (:func:`join_study`); each trial records the worker (``host:pid``) that ran it."""
    import optuna
    storage = args.storage or default_storage(repo)
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    study = join_study(optuna, args.study, storage)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial):
        trial.set_user_attr("worker", worker)
        params = dict(lr=trial.suggest_float("lr", 1e-4, 1e-3, log=True),
                      ent_coef=trial.suggest_float("ent_coef", 1e-5, 1e-2, log=True),
                      log_std_init=trial.suggest_float("log_std_init", -2.0, 0.0),
                      n_steps=trial.suggest_categorical("n_steps", [64, 128, 256]),
                      nfe_weight=trial.suggest_float("nfe_weight", 0.0, 0.3))
        _, _, history = train(specs, budgets, timesteps=args.timesteps, n_envs=args.n_envs, vec=args.vec,
                              seed=args.seed + trial.number, train_seeds=range(args.train_seeds),
                              eval_seeds=eval_seeds, eval_every=args.eval_every, batch_size=args.batch_size,
                              logdir=None, progress=False, cell_sampling=args.cell_sampling,
                              cell_sharpness=args.cell_sharpness, baseline=args.baseline, **params, **env_args)
        return history["final"]["ratio"][SELECT_BY[args.select_by]]

    study.optimize(objective, n_trials=args.trials)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    print(json.dumps({"study": args.study, "storage": storage, "trials_complete": len(done),
                      "best_value_rmse_ratio": study.best_value, "best_params": study.best_params}, indent=1))
    return 0


def default_storage(repo: Path) -> str:
    """The Optuna storage used when ``--storage`` is not given: a SQLite file under ``build/``."""
    return f"sqlite:///{repo / 'build' / 'policy_optuna.db'}"


def study_main(argv) -> int:
    """``python -m adaptive_core.tune policy-study``: the trials of a (shared) Optuna study as a table — value,
    parameters, which worker ran it, start and end — the best trial, and a PNG of the objective per trial
    coloured by worker."""
    import argparse

    import optuna
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-study", description=study_main.__doc__)
    ap.add_argument("--storage", default=None, help="Optuna storage URL (default: the SQLite file of `policy`)")
    ap.add_argument("--study", default="ado_policy")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the objective per trial, by worker")
    args = ap.parse_args(argv)
    storage = args.storage or default_storage(repo)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        print(f"no study {args.study!r} in {storage}")
        return 2
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not trials:
        print(f"study {args.study!r} has no complete trial yet")
        return 1
    names = sorted({k for t in trials for k in t.params})
    print("| trial | RMSE ratio vs heuristic | " + " | ".join(names) + " | worker | started | finished |")
    print("|---|---|" + "---|" * len(names) + "---|---|---|")
    for t in trials:
        vals = " | ".join(f"{t.params[k]:.3g}" if isinstance(t.params.get(k), float) else str(t.params.get(k))
                          for k in names)
        print(f"| {t.number} | {t.value:.4f} | {vals} | {t.user_attrs.get('worker', '?')} | "
              f"{t.datetime_start:%H:%M:%S} | {t.datetime_complete:%H:%M:%S} |")
    best = study.best_trial
    print(f"best: trial {best.number}, RMSE ratio {best.value:.4f}, {best.params}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        workers = sorted({t.user_attrs.get("worker", "?") for t in trials})
        for w in workers:
            mine = [t for t in trials if t.user_attrs.get("worker", "?") == w]
            ax.plot([t.number for t in mine], [t.value for t in mine], "o", label=w)
        ax.plot([t.number for t in trials], np.minimum.accumulate([t.value for t in trials]), "k-", lw=1,
                label="best so far")
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("trial")
        ax.set_ylabel("RMSE ratio vs heuristic (held-out seeds)")
        ax.set_yscale("log")
        ax.set_title(f"Optuna study {args.study}: {len(trials)} trials, {len(workers)} workers", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
        print(f"wrote {args.plot}")
    return 0


__all__ = ["ACTOR_INITIALISERS", "BASELINES", "CELL_SAMPLINGS", "CRITIC_PARAMETER_PREFIXES", "DeterministicActor",
           "EnsembleActor", "FINE_TUNE_CRITIC_WARMUP", "FINE_TUNE_LOG_STD_INIT", "PairedEpisodes", "SB3Decider",
           "SELECT_BY", "TRAINING_STATE_FORMAT", "TUNE_ACTOR", "UPDATE_STATISTICS", "actor_layers",
           "critic_parameters", "default_storage", "ensemble_main", "episodes_to_final", "export_ensemble",
           "export_policy", "join_study", "load_checkpoint", "load_policy_actor", "load_training_state", "main",
           "make_vec_env", "plot_learning_curve", "policy_actor_weights", "policy_training_cells", "ratio_summary",
           "read_vecnorm_stats", "save_training_state", "sb3_actions", "search", "study_main", "train",
           "training_state_path", "worst_cell_weights"]
