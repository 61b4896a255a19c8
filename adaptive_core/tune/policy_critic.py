"""``python -m adaptive_core.tune policy-critic``: give a policy file the critic that fine-tuning from it needs.

A policy is shipped as its deterministic actor (ONNX + manifest).  PPO (Schulman et al. 2017) also needs a
critic, the value function whose estimates turn each episode's return into an advantage; fine-tuning a shipped
actor with a fresh critic took hundreds of episodes and collapsed in some runs (docs/policy/README.md,
section 2), since the first updates then follow advantages that are mostly noise.  ``policy`` writes the
critic of the PPO model it exports next to the actor (its *training state*), but a policy made another way
(``policy-distill``, or an older file) has none.  This command fits one:

1. a PPO model takes the policy's actor and observation statistics from its ONNX graph (as ``policy --init``);
2. it samples on the policy's training configurations (from its manifest, or ``--testbeds``) with the
   fine-tuning action noise, and for all ``--timesteps`` decisions only the critic learns: the actor is held
   exactly as shipped (a critic warm-up, ``policy --critic-warmup``, that lasts the whole run);
3. the critic (:func:`~.policy_train.save_training_state`; not the optimizer's state) is written as
   ``<stem>.training_state.safetensors`` next to the policy, and the manifest's ``training_state`` names it
   with its sha256.  The actor and its ONNX file are not changed.

Run it again to continue fitting from the state already there.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

#: Decisions of critic fitting by default (about 700 episodes over the training configurations).
CRITIC_TIMESTEPS = 4096


def recorded_nfe_weight(manifest) -> float | None:
    """The NFE weight of the reward a policy was trained with, from its manifest's training record (its own, a
    distillation teacher's, or an ensemble's first member's command); None if none is recorded."""
    import shlex
    training = manifest.training or {}
    while True:
        if "nfe_weight" in training:
            return float(training["nfe_weight"])
        commands = [training.get("command") or ""]
        commands += [m.get("command") or "" for m in (training.get("member_training") or {}).values()]
        for command in commands:
            words = shlex.split(command)
            if "--nfe-weight" in words[:-1]:
                return float(words[words.index("--nfe-weight") + 1])
        teacher = training.get("teacher")
        if not isinstance(teacher, dict) or not isinstance(teacher.get("training"), dict):
            return None
        training = teacher["training"]


def fit_critic(manifest_path: Path, specs, budgets, *, timesteps: int = CRITIC_TIMESTEPS, nfe_weight: float,
               error_reward: str = "both", cfg_scales=None, n_envs: int = 2, n_steps: int = 64,
               batch_size: int = 64, lr: float = 1e-3, seed: int = 0, eval_seeds=range(20000, 20008),
               progress: bool = True, logdir: Path | None = None) -> tuple[dict, dict]:
    """Fit the critic of the policy at ``manifest_path`` on ``specs`` × ``budgets`` for ``timesteps`` decisions
    with its actor held fixed, write it as the policy's training state and name it in the manifest (module
    docstring).  The actor's weights must come out exactly as loaded (RuntimeError otherwise); the held-out
    evaluation before and after is recorded.  Returns (the manifest's new ``training_state`` entry, the training
    history)."""
    from ..policy import Policy, PolicyManifest
    from .policy_env import TRAINED_CFG_SCALES
    from .policy_train import (FINE_TUNE_LOG_STD_INIT, actor_layers, policy_actor_weights, save_training_state,
                               train, training_state_path)
    if timesteps < 1:
        raise ValueError(f"timesteps must be at least 1, got {timesteps}")
    manifest_path = Path(manifest_path)
    policy = Policy(manifest_path)
    shipped = policy_actor_weights(manifest_path)
    earlier = policy.manifest.training_state.get("critic_fit", {}) if policy.manifest.training_state else {}
    model, _, history = train(specs, budgets, timesteps=timesteps, n_envs=n_envs, seed=seed, eval_seeds=eval_seeds,
                              eval_every=10 ** 12, nfe_weight=nfe_weight, lr=lr, n_steps=n_steps,
                              batch_size=batch_size, log_std_init=FINE_TUNE_LOG_STD_INIT[0],
                              order_log_std_init=FINE_TUNE_LOG_STD_INIT[1], init=manifest_path,
                              critic_warmup=timesteps, error_reward=error_reward,
                              cfg_scales=TRAINED_CFG_SCALES if cfg_scales is None else cfg_scales,
                              min_lambda_progress=policy.min_lambda_progress,
                              early_step_cap=policy.early_step_cap, logdir=logdir, progress=progress,
                              run_name=f"critic_{policy.name}")
    for layer, name in actor_layers(model):
        if not (np.array_equal(layer.weight.detach().numpy(), shipped[f"{name}.weight"])
                and np.array_equal(layer.bias.detach().numpy(), shipped[f"{name}.bias"])):
            raise RuntimeError(f"{name} moved while only the critic was to learn")
    first, last = history["evals"][0], history["evals"][-1]
    command_note = (f"policy-critic: {timesteps} decisions on {', '.join(f'{n}-{m}' for n, m in specs)}, "
                    f"budgets {list(budgets)}, nfe_weight {nfe_weight:g}, error reward {error_reward}, actor fixed")
    entry = save_training_state(model, training_state_path(policy.path.parent / policy.manifest.onnx_file),
                                made_by=command_note)
    entry["critic_fit"] = {"decisions": int(timesteps),
                           "decisions_total": int(earlier.get("decisions_total", earlier.get("decisions", 0)))
                           + int(timesteps),                  # a critic already in the file is fitted further
                           "seconds": round(history["train_seconds"], 1),
                           "action_log_std": list(FINE_TUNE_LOG_STD_INIT),
                           "explained_variance": [[u["timesteps"], round(u["explained_variance"], 4)]
                                                  for u in history["updates"]],
                           "eval_before_after": [first["rmse_ratio_geomean"], last["rmse_ratio_geomean"]]}
    manifest = PolicyManifest.from_json(manifest_path.read_text())
    manifest.training_state = entry
    manifest_path.write_text(manifest.to_json() + "\n")
    return entry, history


def main(argv) -> int:
    """``python -m adaptive_core.tune policy-critic``: fit and attach a policy's critic (module docstring)."""
    import argparse
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-critic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="the policy: a manifest path or a bundled name; its manifest is "
                                                    "updated in place and its training state written next to it")
    ap.add_argument("--timesteps", type=int, default=CRITIC_TIMESTEPS, help="decisions of critic fitting")
    ap.add_argument("--testbeds", default=None,
                    help="name:model_type,... (default: the policy's training testbeds from its manifest)")
    ap.add_argument("--budgets", default=None, help="comma-separated NFE budgets (default: the policy's)")
    ap.add_argument("--nfe-weight", type=float, default=None,
                    help="the reward's NFE weight (default: the one the policy was trained with, from its manifest)")
    ap.add_argument("--error-reward", default="both", help="the reward's error terms (see `policy --error-reward`)")
    ap.add_argument("--n-envs", type=int, default=2)
    ap.add_argument("--n-steps", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logdir", type=Path, default=repo / "build" / "policy_tb", help="SB3 TensorBoard logs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from ..policy import load_policy
    from .policy_env import ERROR_REWARDS
    from .policy_train import policy_training_cells
    if args.error_reward not in ERROR_REWARDS:
        ap.error(f"--error-reward must be one of {ERROR_REWARDS}, got {args.error_reward!r}")
    if args.timesteps < 1:
        ap.error(f"--timesteps must be at least 1, got {args.timesteps}")
    torch.set_num_threads(1)
    policy = load_policy(args.policy)
    try:
        specs, budgets, cfg_scales = policy_training_cells(policy.manifest, args.testbeds, args.budgets)
    except ValueError as e:
        ap.error(str(e))
    nfe_weight = args.nfe_weight if args.nfe_weight is not None else recorded_nfe_weight(policy.manifest)
    if nfe_weight is None:
        ap.error("the policy's manifest records no NFE weight: give --nfe-weight")
    start = time.time()
    entry, _ = fit_critic(policy.path, specs, budgets, timesteps=args.timesteps, nfe_weight=nfe_weight,
                          error_reward=args.error_reward, cfg_scales=cfg_scales, n_envs=args.n_envs,
                          n_steps=args.n_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          progress=not args.no_progress, logdir=args.logdir)
    print(json.dumps(entry["critic_fit"], indent=1))
    print(f"wrote {policy.path.parent / entry['file']} and its entry in {policy.path} ({time.time() - start:.0f} s)")
    return 0


__all__ = ["CRITIC_TIMESTEPS", "fit_critic", "main", "recorded_nfe_weight"]
