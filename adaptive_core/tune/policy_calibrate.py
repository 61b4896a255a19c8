"""``python -m adaptive_core.tune policy-calibrate``: fit one number of a policy to a new model, the offset of its
step action, by a paired line search.

A policy moved to a model it was not trained on mostly needs its steps a little longer or shorter overall. On the
left-out flow UNet (docs/policy/README.md, section 2) adding −0.03 to every step action (steps 4 % shorter) took
the left-out policy's evaluation reward from 0.109 to 0.138 on 256 held-out seeds. PPO on that one number
(``policy --tune-actor bias``) moved it by about 0.012 in 50–150 episodes: its gradient comes from action noise
spread over every decision, while the returns change by flips of a few images. A direct search is cheaper.

1. ``--episodes`` policy episodes are split over the candidate offsets (``--offsets``); every candidate runs the
   *same* images (noise seed, CFG scale, budget, drawn from the training pool as :class:`SamplingEnv` draws
   them), so the candidates' returns are compared image by image (common random numbers; Kleinman, Spall and
   Naiman 1999, "Simulation-Based Optimization with Stochastic Approximation Using Common Random Numbers").
   The return of an episode is the training reward of :mod:`.policy_env` (error gain over the heuristic on the
   same image, and the NFE term).
2. The mean returns are rugged in the offset (one flip of one image moves a candidate's mean), so the offset
   chosen is the peak of a least-squares parabola through them, within the searched range; where the parabola
   opens upwards, the best candidate.
3. The policy before and after (the chosen offset) is evaluated on held-out seeds against the heuristic, as
   ``policy`` evaluates during training; where the offset makes it worse there, the source's offset (0) is
   kept, as ``policy --keep-best`` keeps the best evaluated policy. (So the held-out seeds take part in the
   choice: measure the result on other seeds, e.g. ``policy-eval`` on 30000–30255.)
4. The policy is written again with the offset added to the bias of its step output: the ONNX graph is the same
   but for that one number (checked: its actions are the source's plus the offset, clipped to [−1, 1]); the
   manifest records the search, and the source's training state (critic) is copied along, so ``policy --init``
   can go on from the calibrated file with PPO.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

#: Candidate offsets of the step action (a₀; the step is scaled by 4^offset) searched by default: steps up to
#: 13 % shorter or longer than the policy's, in steps of 4 %.
DEFAULT_OFFSETS = (-0.09, -0.06, -0.03, 0.0, 0.03, 0.06, 0.09)
#: Policy episodes of the search by default (14 images for each default offset).
DEFAULT_EPISODES = 98


class _DecidedRowsWrapper:
    """Base of the wrappers below: a loaded :class:`~adaptive_core.policy.Policy` whose other attributes pass
    through, with the wrapped policy's decision split into what a wrapper changes."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def _decided(self, observation: np.ndarray):
        """(a float64 copy of the wrapped policy's actions, its fallback reasons, the mask of decided rows)."""
        actions, reasons = self.policy.decide(observation)
        return np.array(actions, dtype=np.float64), reasons, np.array([r is None for r in reasons])


class StepOffsetPolicy(_DecidedRowsWrapper):
    """A loaded :class:`~adaptive_core.policy.Policy` whose step action (a₀) is shifted by ``offset`` before the
    clip to [−1, 1]; rows that fall back to the heuristic stay at action 0. Everything else (action mapping,
    ``min_lambda_progress``) is the wrapped policy's. Written to a file, this is a change of the output layer's
    bias alone (bias-only fine-tuning, Ben Zaken et al. 2022, "BitFit")."""

    def __init__(self, policy, offset: float) -> None:
        if not np.isfinite(offset):
            raise ValueError(f"step offset must be finite, got {offset}")
        super().__init__(policy)
        self.offset = float(offset)

    def decide(self, observation: np.ndarray):
        """(actions, fallback reasons) of the wrapped policy with a₀ + offset on the rows it decides."""
        actions, reasons, decided = self._decided(observation)
        actions[decided, 0] = np.clip(actions[decided, 0] + self.offset, -1.0, 1.0)
        return actions, reasons


class EarlyStepCapPolicy(_DecidedRowsWrapper):
    """A loaded :class:`~adaptive_core.policy.Policy` whose step action a₀ is capped at ``max_step_action`` on
    the decided rows whose ``lambda_progress`` is below ``below_lambda_progress``: a trust region around the
    heuristic's step (TRPO's bounded policy change, Schulman et al. 2015) in the high-noise window where an
    image's class and layout are decided ("critical windows", Li & Chen 2024).  Shorter steps stay allowed.
    A diagnostic wrapper, as :class:`StepOffsetPolicy` (docs/policy/README.md, "What would move the misses"): it
    caps a policy trained without the cap, where ``policy --early-step-cap`` trains under it
    (:func:`adaptive_core.policy.cap_early_step_actions`)."""

    def __init__(self, policy, below_lambda_progress: float, max_step_action: float) -> None:
        from ..policy import check_early_step_cap
        self.cap = check_early_step_cap((below_lambda_progress, max_step_action))
        super().__init__(policy)

    def decide(self, observation: np.ndarray):
        """(actions, fallback reasons) of the wrapped policy with a₀ capped on the early rows it decides."""
        from ..policy import cap_early_step_actions
        actions, reasons, decided = self._decided(observation)
        return cap_early_step_actions(actions, observation, decided, self.cap), reasons


def draw_images(env, n: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """``n`` distinct (configuration index, noise seed, budget) draws of ``env`` (a :class:`SamplingEnv`): the
    configuration and budget as its default episode draw has them, the seed from that configuration's training
    pool. Raises ValueError when the pool has fewer than ``n`` distinct images."""
    probs = env.default_cell_probs()
    total = sum(len(env.seed_pool(k)) for k in range(len(env.configs))) * len(env.budgets)
    if n > total:
        raise ValueError(f"{n} images asked, the training pool has {total} (configuration, seed, budget) images")
    out: set = set()
    while len(out) < n:
        k, budget = env.cells[int(rng.choice(len(probs), p=probs))]
        pool = env.seed_pool(k)
        out.add((k, int(pool[int(rng.integers(len(pool)))]), int(budget)))
    return sorted(out)


def paired_returns(policy, env, images, offsets, progress: bool = False) -> np.ndarray:
    """[len(offsets), len(images)] episode returns (the reward of ``env``, unscaled) of ``policy`` with each step
    offset on the same images; the images of one configuration and budget run as one batch (decisions are per
    image, so each gets its own result). ``progress``: a bar over the batches."""
    from tqdm.auto import tqdm

    from ..sampler import sample_adaptive
    from ..trace import Trace
    from .policy_env import host_grid, rmse_per_sample, set_config_labels
    out = np.zeros((len(offsets), len(images)))
    groups: dict = {}
    for i, (k, seed, budget) in enumerate(images):
        groups.setdefault((k, budget), []).append((i, seed))
    bar = tqdm(total=len(groups) * len(offsets), desc="calibration runs", unit="batch", disable=not progress)
    for (k, budget), members in groups.items():
        cols, seeds = [i for i, _ in members], [s for _, s in members]
        x, ref = env.noise_and_reference_of(k, seeds)
        tb = env.testbeds[k]
        heur = np.array([env.heuristic_rmse(k, s, budget) for s in seeds])
        for j, offset in enumerate(offsets):
            set_config_labels(env.configs[k], tb, seeds)
            trace = Trace()
            result = sample_adaptive(tb, x, host_grid(tb, budget), nfe_budget=budget, model_type=tb.model_type,
                                     controller=StepOffsetPolicy(policy, offset), trace=trace)
            rmse = rmse_per_sample(result, ref)
            for b, (col, err, err_h) in enumerate(zip(cols, rmse, heur)):
                out[j, col] = (env.error_gain(k, budget, float(err), float(err_h))
                               + env.nfe_weight * (budget - trace.sample_nfe(b)) / budget)
            bar.update()
    bar.close()
    return out


def choose_offset(offsets, mean_returns) -> tuple[float, str]:
    """The offset at the peak of the least-squares parabola through (offset, mean return), kept inside the
    searched range, and how it was chosen; the best candidate where the parabola has no maximum (opens upwards
    or is flat) or fewer than three offsets were searched. A second-order response surface (Box and Wilson 1951,
    "On the Experimental Attainment of Optimum Conditions") smooths over single candidates that one image's
    flip moved."""
    x, y = np.asarray(offsets, dtype=np.float64), np.asarray(mean_returns, dtype=np.float64)
    if len(x) >= 3:
        a, b, _ = np.polyfit(x, y, 2)
        if a < 0:
            return float(np.clip(-b / (2 * a), x.min(), x.max())), "parabola peak"
    return float(x[int(np.argmax(y))]), "best candidate"


def write_offset_policy(source: Path, offset: float, out_onnx: Path, record: dict) -> Path:
    """Write the policy at manifest ``source`` again as ``out_onnx`` (+ manifest, + its training state if it has
    one) with ``offset`` added to the bias of its step output, and ``record`` as the manifest's
    ``training["calibration"]``. The new graph's actions must equal the source's with a₀ + offset (clipped) to
    1e-5 on 256 probe rows. Returns the new manifest's path."""
    import onnx
    from onnx import numpy_helper

    from ..learned import sha256_of_file
    from ..policy import Policy, PolicyManifest
    from .policy_train import policy_actor_weights
    src = policy_actor_weights(source)["policy"]   # checked, and a single-actor graph (an ensemble is refused)
    out_onnx = Path(out_onnx)
    if out_onnx.resolve() == (src.path.parent / src.manifest.onnx_file).resolve():
        raise ValueError(f"{out_onnx}: the calibrated policy must not overwrite its source")
    graph = onnx.load(str(src.path.parent / src.manifest.onnx_file))
    bias = next(i for i in graph.graph.initializer if i.name == "action_net.bias")
    values = numpy_helper.to_array(bias).astype(np.float32).copy()
    values[0] += np.float32(offset)
    bias.CopyFrom(numpy_helper.from_array(values, "action_net.bias"))
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(out_onnx))
    manifest = PolicyManifest.from_json(src.path.read_text())
    manifest.onnx_file, manifest.sha256 = out_onnx.name, sha256_of_file(out_onnx)
    earlier = manifest.training.get("calibration")   # a calibrated policy calibrated again keeps the record
    manifest.training = {**manifest.training, "calibration": {**record, **({"earlier": earlier} if earlier else {})}}
    if manifest.training_state:
        from .policy_train import training_state_path
        state = training_state_path(out_onnx)
        shutil.copyfile(src.path.parent / manifest.training_state["file"], state)
        manifest.training_state = {**manifest.training_state, "file": state.name}
    out = out_onnx.with_suffix(".json")
    out.write_text(manifest.to_json() + "\n")
    new = Policy(out)
    probe = (src._mean + 2 * src._std * np.random.default_rng(0).normal(size=(256, len(src._mean))))
    got_a, want_a = new.act(probe), src.act(probe)
    want_a[:, 0] = np.clip(want_a[:, 0] + offset, -1.0, 1.0)
    if not np.allclose(got_a, want_a, atol=1e-5, rtol=0):
        raise RuntimeError(f"{out}: the calibrated graph's actions differ from the source's + offset by "
                           f"{np.abs(got_a - want_a).max():.3g}")
    return out


def calibrate(manifest_path: Path, specs, budgets, *, episodes: int = DEFAULT_EPISODES, offsets=DEFAULT_OFFSETS,
              seed: int = 0, nfe_weight: float, error_reward: str = "both", cfg_scales=None,
              eval_seeds=range(20000, 20064), scan_eval: bool = False, progress: bool = False) -> dict:
    """Search the step offset of the policy at ``manifest_path`` on ``specs`` × ``budgets`` with ``episodes``
    policy episodes (module docstring). Returns the search's record: offsets, images, each offset's mean return
    and its paired standard error against offset 0 (or the first offset), the chosen offset, the held-out
    evaluation (RMSE ratio to the heuristic on ``eval_seeds``) of the policy before and with it, and the offset to
    write (``written_offset``: the chosen one, or 0 where it evaluated worse, ``kept_source``). ``scan_eval``
    also evaluates every candidate offset on the held-out seeds (``eval_reward_by_offset``): a diagnostic of how
    finely that evaluation resolves the policy, not used in the choice."""
    from ..policy import Policy
    from .policy_env import TRAINED_CFG_SCALES, SamplingEnv, evaluate_controller
    from .policy_train import ratio_summary
    offsets = [float(o) for o in offsets]
    if len(offsets) < 2 or len(set(offsets)) != len(offsets) or not all(np.isfinite(offsets)):
        raise ValueError(f"offsets must be at least two distinct finite numbers, got {offsets}")
    if any(abs(o) > 1 for o in offsets):
        raise ValueError(f"offsets are in action units (the step is scaled by 4^offset) and must lie in [−1, 1], "
                         f"got {offsets}")
    if episodes < len(offsets):
        raise ValueError(f"episodes ({episodes}) must be at least one image per offset ({len(offsets)} offsets)")
    policy = Policy(manifest_path)
    cfg_scales = TRAINED_CFG_SCALES if cfg_scales is None else cfg_scales
    env = SamplingEnv(specs, budgets, nfe_weight=nfe_weight, cfg_scales=cfg_scales, error_reward=error_reward,
                      reward_scale="none", min_lambda_progress=policy.min_lambda_progress)
    n_images = episodes // len(offsets)
    images = draw_images(env, n_images, np.random.default_rng(seed))
    t0 = time.time()
    returns = paired_returns(policy, env, images, offsets, progress=progress)
    search_seconds = time.time() - t0
    means = returns.mean(1)
    chosen, how = choose_offset(offsets, means)
    base = int(np.argmin(np.abs(np.asarray(offsets))))
    diff = returns - returns[base]
    paired_se = diff.std(1, ddof=1) / np.sqrt(n_images) if n_images > 1 else np.full(len(offsets), np.nan)
    references: dict = {}
    seeds, cfg = list(eval_seeds), dict(cfg_scales=tuple(cfg_scales))
    heur = evaluate_controller(None, specs, budgets, seeds, references, **cfg)

    def held_out(controller) -> dict:
        return ratio_summary(evaluate_controller(controller, specs, budgets, seeds, references, **cfg), heur)

    before, after = held_out(policy), held_out(StepOffsetPolicy(policy, chosen))
    worse = after["geomean"] > before["geomean"]
    scan = {f"{o:g}": float(-np.log(held_out(StepOffsetPolicy(policy, o))["geomean"])) for o in offsets} \
        if scan_eval else {}
    return {"offsets": offsets, "episodes": n_images * len(offsets), "images": [list(i) for i in images],
            "image_keys": [env.configs[k].key for k, _, _ in images], "mean_returns": means.tolist(),
            "paired_se_vs": offsets[base], "paired_se": paired_se.tolist(), "chosen_offset": chosen,
            "chosen_by": how, "written_offset": 0.0 if worse else chosen, "kept_source": bool(worse),
            "seed": int(seed), "search_seconds": round(search_seconds, 1),
            "error_reward": error_reward, "nfe_weight": float(nfe_weight),
            "eval_seeds": [min(seeds), max(seeds) + 1],
            "eval_before": {"rmse_ratio_geomean": before["geomean"], "rmse_ratio_worst": before["worst"],
                            "eval_reward": float(-np.log(before["geomean"]))},
            "eval_after": {"rmse_ratio_geomean": after["geomean"], "rmse_ratio_worst": after["worst"],
                           "eval_reward": float(-np.log(after["geomean"]))},
            "per_testbed_after": after["per_testbed"], **({"eval_reward_by_offset": scan} if scan_eval else {})}


def plot_calibration(record: dict, path: Path, title: str) -> None:
    """Mean return of each candidate offset (with its paired standard error against offset 0), the fitted
    choice, and the held-out evaluation reward before and after."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x, y = np.asarray(record["offsets"]), np.asarray(record["mean_returns"])
    se = np.nan_to_num(np.asarray(record["paired_se"], dtype=np.float64))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.errorbar(x, y, yerr=se, fmt="o", capsize=3, label=f"mean return, {len(record['images'])} images each")
    if len(x) >= 3:
        c = np.polyfit(x, y, 2)
        xs = np.linspace(x.min(), x.max(), 100)
        ax.plot(xs, np.polyval(c, xs), "--", color="gray", label="least-squares parabola")
    ax.axvline(record["chosen_offset"], color="C3", label=f"chosen {record['chosen_offset']:+.3f} "
                                                        f"({record['chosen_by']})")
    scan = record.get("eval_reward_by_offset")
    if scan:
        ax2 = ax.twinx()
        ax2.plot([float(k) for k in scan], list(scan.values()), "s-", color="C2", ms=4,
                 label="held-out evaluation reward")
        ax2.set_ylabel("held-out evaluation reward", color="C2")
        ax2.legend(fontsize=8, loc="lower left")
    b, a = record["eval_before"]["eval_reward"], record["eval_after"]["eval_reward"]
    ax.set_xlabel("step action offset (step × 4^offset)")
    ax.set_ylabel("mean episode return")
    kept = "; worse, source kept" if record.get("kept_source") else ""
    ax.set_title(f"{title}\nheld-out evaluation reward {b:.3f} → {a:.3f}{kept}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_offsets(text: str) -> list[float]:
    """Comma-separated offsets, or ``lo:hi:n`` for n evenly spaced ones."""
    text = text.strip()
    if text.count(":") == 2:
        lo, hi, n = text.split(":")
        return [float(v) for v in np.linspace(float(lo), float(hi), int(n))]
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv) -> int:
    """``python -m adaptive_core.tune policy-calibrate``: search a policy's step offset on a testbed and write the
    calibrated policy (module docstring)."""
    import argparse

    import torch
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="the policy to calibrate: a manifest path or a bundled name")
    ap.add_argument("--testbeds", required=True, help="name:model_type,... to calibrate on (e.g. mnist_unet:flow)")
    ap.add_argument("--budgets", default="5,6,8,10", help="comma-separated NFE budgets (≥ 4)")
    ap.add_argument("--episodes", type=int, default=DEFAULT_EPISODES,
                    help="policy episodes of the search, spread evenly over the offsets (same images for each)")
    ap.add_argument("--offsets", default=",".join(f"{o:g}" for o in DEFAULT_OFFSETS),
                    help="candidate offsets of the step action, comma-separated or lo:hi:n (write --offsets=-0.1,... "
                         "when the first is negative)")
    ap.add_argument("--nfe-weight", type=float, default=None,
                    help="the reward's NFE weight (default: the one the policy was trained with, from its manifest)")
    ap.add_argument("--error-reward", default="both", help="the reward's error terms (see `policy --error-reward`)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the image draw")
    ap.add_argument("--eval-seeds", type=int, default=64, help="held-out seeds (from 20000) of the before/after check")
    ap.add_argument("--scan-eval", action="store_true",
                    help="also evaluate every candidate offset on the held-out seeds (a diagnostic, drawn in the "
                         "plot; not used in the choice)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--name", required=True, help="name of the calibrated policy (<out-dir>/<name>.onnx/.json)")
    ap.add_argument("--out-dir", type=Path, default=repo / "build" / "policies")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the search (default <out-dir>/<name>_calibration.png)")
    args = ap.parse_args(argv)
    from ..policy import load_policy
    from .policy_critic import recorded_nfe_weight
    from .policy_env import ERROR_REWARDS
    from .policy_train import parse_specs
    if args.error_reward not in ERROR_REWARDS:
        ap.error(f"--error-reward must be one of {ERROR_REWARDS}, got {args.error_reward!r}")
    try:
        specs = parse_specs(args.testbeds)
        budgets = [int(b) for b in args.budgets.split(",")]
        offsets = parse_offsets(args.offsets)
    except ValueError as e:
        ap.error(str(e))
    if args.eval_seeds < 1:
        ap.error(f"--eval-seeds must be at least 1, got {args.eval_seeds}")
    torch.set_num_threads(1)
    policy = load_policy(args.policy)
    nfe_weight = args.nfe_weight if args.nfe_weight is not None else recorded_nfe_weight(policy.manifest)
    if nfe_weight is None:
        ap.error("the policy's manifest records no NFE weight: give --nfe-weight")
    try:
        record = calibrate(policy.path, specs, budgets, episodes=args.episodes, offsets=offsets, seed=args.seed,
                           nfe_weight=nfe_weight, error_reward=args.error_reward,
                           eval_seeds=range(20000, 20000 + args.eval_seeds), scan_eval=args.scan_eval,
                           progress=not args.no_progress)
    except ValueError as e:
        ap.error(str(e))
    record["source"] = {"policy": str(policy.path), "sha256": policy.manifest.sha256}
    record["command"] = "python -m adaptive_core.tune policy-calibrate " + " ".join(argv)
    out = write_offset_policy(policy.path, record["written_offset"], args.out_dir / f"{args.name}.onnx",
                              {k: v for k, v in record.items() if k not in ("images", "image_keys")})
    plot = args.plot or args.out_dir / f"{args.name}_calibration.png"
    plot_calibration(record, plot, f"policy-calibrate {policy.name} on {args.testbeds}")
    (args.out_dir / f"{args.name}_calibration.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"offsets {record['offsets']}\nmean returns {np.round(record['mean_returns'], 4).tolist()}\n"
          f"chosen offset {record['chosen_offset']:+.4f} ({record['chosen_by']}); {record['episodes']} episodes, "
          f"{record['search_seconds']:.0f} s\nheld-out evaluation reward {record['eval_before']['eval_reward']:.4f} "
          f"→ {record['eval_after']['eval_reward']:.4f}"
          + ("; worse there, so the source's offset is kept" if record["kept_source"] else "")
          + f"\nwrote {out} (offset {record['written_offset']:+.4f}), {plot}")
    return 0


__all__ = ["DEFAULT_EPISODES", "DEFAULT_OFFSETS", "EarlyStepCapPolicy", "StepOffsetPolicy", "calibrate",
           "choose_offset", "draw_images", "main", "paired_returns", "parse_offsets", "plot_calibration",
           "write_offset_policy"]
