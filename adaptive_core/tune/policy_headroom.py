"""How much room a step policy has on one configuration, and how much of it its observations reveal.

``python -m adaptive_core.tune policy-headroom --cell gmm_digits:flow:1:5 [--cell mnist_unet:ve:2:8 ...]
[--train-seeds 512] [--seeds 256] [--per-image-oracle 32] [--out docs/policy/headroom.json]``

A step policy picks each image's noise levels from what it observes.  Three bounds place its result, all on ADO's
integrator and on the held-out measurement seeds (30000 on), against the heuristic controller on the same images:

1. **the per-image oracle**: each image's own σ grid fitted to its own reference (coordinate descent,
   :func:`~adaptive_core.bench.oracle.optimize_schedule`, from the configuration's shared oracle grid).  It is the
   most any choice of noise levels could give, with the answer known;
2. **the per-image best continuation**: the shared oracle grid, and a few variants of it that change only the
   points after call k (all moved by ±0.2 or ±0.4 in half-log-SNR λ, or tilted ±0.3, early points one way and late
   ones the other); each image takes the variant that is best for it, in hindsight.  A policy that decides at call
   k chooses among such continuations;
3. **what the observation reveals**: the same choice made without the answer, by the k nearest neighbours of the
   image's observation at call k (the policy's 17 numbers, :data:`~adaptive_core.policy.OBSERVATION_NAMES`,
   standardised) among ``--train-seeds`` training images; the continuation with the least mean squared error over
   those neighbours is taken.  This is a learned policy, non-parametric (Cover & Hart 1967), fitted with the
   answers of the training images only.  Where it is no better than the best single variant for all images, the
   per-image room of (2) lies in what the policy cannot observe at call k.

The observations are recorded on a run that follows the shared grid exactly (budget mode with the grid as the
plan, ``schedule="host"``, and a policy that keeps the plan: :class:`GridObserver`), so the image at call k is the
one every continuation starts from.  Calls k = 1 and ⌊NFE/2⌋ are measured.  (A flow run's first call is at pure
noise, where the denoiser predicts the same for every image: its observation at call 1 does not differ between
images, and the rule there picks one continuation for all.)  The policy of ``policy:auto`` is
measured on the same images for comparison.

The report (``--out``, JSON, a markdown table on stdout and a bar chart next to the JSON) gives each bound as a
ratio to the heuristic's pooled RMSE.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
#: Shifts in λ of every point after call k, and tilts (the first of those points moved by +t, the last before the
#: end by −t, linearly between) that make the continuations.
CONTINUATION_SHIFTS = (-0.4, -0.2, 0.2, 0.4)
CONTINUATION_TILTS = (-0.3, 0.3)
#: Neighbour counts of the observation-based choice.
NEIGHBOURS = (4, 16, 64)
#: The least gap in λ kept between consecutive points of a moved grid (a move that would reorder them stops there).
MIN_GAP = 0.05
DEFAULT_ORACLE_FILES = (REPO / "docs" / "bench" / "results.json", REPO / "docs" / "bench" / "trained" / "oracle.json",
                        REPO / "docs" / "bench" / "trained" / "oracle_photo.json")


class GridObserver:
    """A step policy that keeps the plan (action 0 at every call, never a fallback) and records every observation
    it is shown: with the plan set to a fixed grid (``schedule="host"``) it observes a run on that grid."""

    name = "grid-observer"
    min_lambda_progress, early_step_cap = 0.0, None

    def __init__(self) -> None:
        from ..policy import ACTION_SCALE, LEGACY_BASE_PLAN, MIN_SHARE, ORDER_DEAD_ZONE
        self.action_scale, self.min_share, self.order_dead_zone = ACTION_SCALE, MIN_SHARE, ORDER_DEAD_ZONE
        self.base_options = dict(LEGACY_BASE_PLAN)
        self.observations: list[np.ndarray] = []

    def decide(self, observation: np.ndarray):
        """Record the rows; return zero actions (the plan's step, the heuristic's order) and no fallback."""
        obs = np.asarray(observation, dtype=np.float64)
        self.observations.append(obs.copy())
        return np.zeros((len(obs), 2)), [None] * len(obs)


def grid_observations(testbed, x: torch.Tensor, grid: torch.Tensor, model_type: str, prediction: str,
                      extra_args: dict | None = None) -> tuple[list[np.ndarray], torch.Tensor]:
    """The policy observations [B, 17] at calls 1 … NFE − 2 of a run that follows ``grid`` (σ, descending, ending
    in 0; NFE = len(grid) − 1) exactly, and its samples (the last call is the end point's, decided by no policy).
    The samples equal ADO's ``mode="fixed"`` run on the grid with the same :func:`run_options`."""
    from ..sampler import sample_adaptive
    observer = GridObserver()
    nfe = int(grid.numel()) - 1
    out = sample_adaptive(testbed, x, grid, extra_args, nfe_budget=nfe, model_type=model_type, schedule="host",
                          controller=observer, **run_options(prediction))
    return observer.observations, out


def run_options(prediction: str) -> dict:
    """The integrator options of every run here: the plan the bundled policies run on
    (:data:`~adaptive_core.policy.LEGACY_BASE_PLAN`, the same with or without a policy) in the form ``prediction``
    the oracle grid was fitted in."""
    from ..policy import LEGACY_BASE_PLAN
    return {**LEGACY_BASE_PLAN, "prediction": prediction}


def continuation_grids(grid: torch.Tensor, model_type: str, after_call: int) -> list[torch.Tensor]:
    """``grid`` and its variants that move only the points after call ``after_call`` (1-based; the points it and
    the calls before it were made at stay, and so does the last nonzero point): every one shifted by each of
    :data:`CONTINUATION_SHIFTS` in half-log-SNR λ, or tilted by each of :data:`CONTINUATION_TILTS` (Kingma et al.
    2021 for λ as the time variable of the ODE).  Consecutive points are kept :data:`MIN_GAP` apart."""
    from ..schedules import half_log_snr, sigma_from_half_log_snr
    sig = [float(s) for s in grid]
    if sig[-1] != 0 or any(b >= a for a, b in itertools.pairwise(sig)):
        raise ValueError(f"need a strictly descending σ grid ending in 0, got {sig}")
    lam = np.array([half_log_snr(s, model_type) for s in sig[:-1]], dtype=np.float64)
    n_moved = len(lam) - 1 - int(after_call)
    if not 1 <= after_call or n_moved < 1:
        raise ValueError(f"after_call must leave a point to move: 1 ≤ after_call ≤ {len(lam) - 2}, got {after_call}")
    offsets = [np.full(n_moved, d) for d in CONTINUATION_SHIFTS]
    if n_moved > 1:
        offsets += [np.linspace(t, -t, n_moved) for t in CONTINUATION_TILTS]
    out = [grid.to(torch.float64).clone()]
    for off in offsets:
        moved = lam.copy()
        moved[after_call:after_call + n_moved] += off
        for i in range(after_call, len(moved) - 1):   # keep the order: at least MIN_GAP after the point before
            if np.isfinite(moved[i - 1]):
                moved[i] = max(moved[i], moved[i - 1] + MIN_GAP)
            moved[i] = min(moved[i], lam[-1] - MIN_GAP * (len(moved) - 1 - i))
        out.append(torch.tensor([sigma_from_half_log_snr(float(v), model_type) for v in moved] + [0.0],
                                dtype=torch.float64))
    return out


def nearest_neighbour_choice(train_obs: np.ndarray, train_err: np.ndarray, test_obs: np.ndarray,
                             k: int) -> np.ndarray:
    """For each test row, the column of ``train_err`` [N, C] (per-image RMSE of C choices) with the least mean
    squared error over the ``k`` training rows nearest to it in the standardised observation (k-nearest-neighbour
    rule, Cover & Hart 1967).  Observation columns that are not finite in every row are left out."""
    if train_obs.shape[0] != train_err.shape[0] or train_obs.shape[1] != test_obs.shape[1]:
        raise ValueError(f"shapes do not match: train {train_obs.shape}, errors {train_err.shape}, test {test_obs.shape}")
    if not 1 <= k <= len(train_obs):
        raise ValueError(f"need 1 ≤ k ≤ {len(train_obs)} training rows, got k={k}")
    keep = np.isfinite(train_obs).all(0) & np.isfinite(test_obs).all(0)
    a, b = train_obs[:, keep], test_obs[:, keep]
    mu, sd = a.mean(0), a.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    za, zb = (a - mu) / sd, (b - mu) / sd
    dist = (zb ** 2).sum(1)[:, None] - 2.0 * zb @ za.T + (za ** 2).sum(1)[None, :]
    idx = np.argsort(dist, 1, kind="stable")[:, :k]
    return np.argmin(np.square(train_err)[idx].mean(1), 1)


def pooled(rmse_images) -> float:
    """The pooled RMSE of images of equal size from their per-image RMSEs (√ of the mean squared)."""
    return float(math.sqrt(np.mean(np.square(np.asarray(rmse_images, dtype=np.float64)))))


def oracle_grid_of(key: str, nfe: int, files: Sequence[Path] = DEFAULT_ORACLE_FILES) -> tuple[torch.Tensor, str]:
    """The shared oracle grid of configuration ``key`` at ``nfe`` calls and the integrator form it was fitted in,
    from the analytic benchmark's results and the trained networks' oracle files (a later file wins), as
    ``policy-eval`` reads them."""
    from ..bench.trained_oracle import load_oracle_grids
    found = None
    for path in files:
        path = Path(path)
        if not path.is_file():
            continue
        configs = json.loads(path.read_text()).get("configs", {})
        bench_layout = any(isinstance(v, dict) and "methods" in v for v in configs.values())
        table = configs if bench_layout else load_oracle_grids(path)   # the analytic benchmark's, or trained_oracle's
        grid = table.get(key, {}).get("methods", {}).get("oracle", {}).get(str(int(nfe)))
        if grid is not None and "sigmas" in grid:
            found = grid
    if found is None:
        raise ValueError(f"no oracle grid for {key} at {nfe} calls in {[str(f) for f in files]}: fit one with "
                         "python -m adaptive_core.bench.trained_oracle")
    return torch.tensor(found["sigmas"], dtype=torch.float64), found.get("prediction", "data")


def _per_image_errors(config, tb, seeds, x, ref, grids, prediction) -> np.ndarray:
    """[N, len(grids)] per-image RMSE of ADO's fixed-grid runs on each grid."""
    from ..sampler import sample_adaptive
    from .policy_env import rmse_per_sample, set_config_labels
    set_config_labels(config, tb, seeds)
    return np.stack([rmse_per_sample(sample_adaptive(tb, x, g, model_type=config.model_type, mode="fixed",
                                                     **run_options(prediction)), ref) for g in grids], 1)


def per_image_oracle(config, tb, seeds, x, ref, grid, prediction, progress=None) -> np.ndarray:
    """Each image's RMSE on its own oracle grid: :func:`~adaptive_core.bench.oracle.optimize_schedule` run on that
    image alone, against its own reference, from ``grid`` (2 sweeps, 8 golden-section steps per point)."""
    from ..bench.oracle import optimize_schedule
    from ..sampler import sample_adaptive
    from .policy_env import set_config_labels
    errors = []
    for i, seed in enumerate(seeds):
        set_config_labels(config, tb, [seed])
        xi, ri = x[i:i + 1], ref[i:i + 1]

        def run(sigmas, xi=xi):
            return sample_adaptive(tb, xi, sigmas, model_type=config.model_type, mode="fixed",
                                   **run_options(prediction))
        errors.append(optimize_schedule(run, ri, grid, config.model_type, sweeps=2, iters=8)[1])
        if progress is not None:
            progress.update(1)
    return np.array(errors)


def measure_cell(testbed: str, model_type: str, cfg: float, nfe: int, train_seeds: Sequence[int],
                 seeds: Sequence[int], per_image_oracle_images: int = 0, oracle_files=DEFAULT_ORACLE_FILES,
                 reference_steps: int | None = None, progress=None) -> dict:
    """The bounds of the module docstring for one configuration and budget, as ratios to the heuristic's pooled
    RMSE on ``seeds`` (the per-image oracle on the first ``per_image_oracle_images`` of them, with the heuristic on
    the same images)."""
    from .policy_env import (
        TRAINED_REFERENCE_STEPS,
        Config,
        evaluate_controller,
        noise_and_reference,
        rmse_per_sample,
        set_config_labels,
    )
    if nfe < 3:
        raise ValueError(f"need a budget of at least 3 calls (a point to move after call 1), got {nfe}")
    if len(train_seeds) < max(NEIGHBOURS) or len(seeds) < 2:
        raise ValueError(f"need at least {max(NEIGHBOURS)} training seeds and 2 measurement seeds, "
                         f"got {len(train_seeds)} and {len(seeds)}")
    if set(train_seeds) & set(seeds):
        raise ValueError("the training and measurement seeds overlap")
    steps = TRAINED_REFERENCE_STEPS if reference_steps is None else int(reference_steps)
    config = Config(testbed, model_type, float(cfg))
    grid, prediction = oracle_grid_of(config.key, nfe, oracle_files)
    refs: dict = {}
    kw = {"cfg_scales": (float(cfg),), "reference_steps": steps}
    heur = np.array(evaluate_controller(None, [(testbed, model_type)], [nfe], seeds, refs, **kw)[config.key][nfe]
                    ["rmse_images"])
    auto = np.array(evaluate_controller("policy:auto", [(testbed, model_type)], [nfe], seeds, refs, **kw)
                    [config.key][nfe]["rmse_images"])
    tb, x, ref = refs[config.key]   # the testbed the measurement seeds were drawn on
    x_train, ref_train = noise_and_reference(config, tb, train_seeds, steps)
    # the observed runs are the shared grid's fixed runs: their errors are every decision call's first column
    set_config_labels(config, tb, train_seeds)
    obs_train, out_train = grid_observations(tb, x_train, grid, model_type, prediction)
    shared_train = rmse_per_sample(out_train, ref_train)
    set_config_labels(config, tb, seeds)
    obs, out = grid_observations(tb, x, grid, model_type, prediction)
    shared = rmse_per_sample(out, ref)
    h = pooled(heur)
    row = {"configuration": config.key, "nfe": int(nfe), "train_seeds": [min(train_seeds), max(train_seeds) + 1],
           "seeds": [min(seeds), max(seeds) + 1], "heuristic_rmse": h, "policy_auto": pooled(auto) / h,
           "shared_oracle_grid": grid.tolist(), "prediction": prediction, "decide_after_call": {}}
    for k in sorted({1, max(1, nfe // 2)}):
        grids = continuation_grids(grid, model_type, k)
        err_train = np.c_[shared_train, _per_image_errors(config, tb, train_seeds, x_train, ref_train, grids[1:],
                                                           prediction)]
        err = np.c_[shared, _per_image_errors(config, tb, seeds, x, ref, grids[1:], prediction)]
        cell = {"shared_grid": pooled(err[:, 0]) / h,
                "best_single_continuation": min(pooled(err[:, j]) for j in range(err.shape[1])) / h,
                "per_image_best_continuation": pooled(err.min(1)) / h,
                "continuations": len(grids)}
        for n in NEIGHBOURS:
            choice = nearest_neighbour_choice(obs_train[k - 1], err_train, obs[k - 1], n)
            cell[f"nearest_{n}"] = pooled(err[np.arange(len(err)), choice]) / h
        row["decide_after_call"][str(k)] = cell
        if progress is not None:
            progress.update(1)
    if per_image_oracle_images > 0:
        m = min(int(per_image_oracle_images), len(seeds))
        own = per_image_oracle(config, tb, list(seeds)[:m], x[:m], ref[:m], grid, prediction)
        row["per_image_oracle"] = {"images": m, "ratio": pooled(own) / pooled(heur[:m])}
    return row


def markdown(rows: Sequence[dict]) -> str:
    """The report's table: one line per configuration, budget and decision call."""
    header = ("| configuration | NFE | decides after call | policy:auto | shared oracle grid | best single continuation "
              f"| chosen from the observation (k = {', '.join(map(str, NEIGHBOURS))}) | per-image best continuation "
              "(hindsight) | per-image oracle (hindsight) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        own = r.get("per_image_oracle")
        own_text = "" if own is None else f"{own['ratio']:.3f} ({own['images']} images)"
        for k, c in r["decide_after_call"].items():
            knn = " / ".join(f"{c[f'nearest_{n}']:.3f}" for n in NEIGHBOURS)
            lines.append(f"| {r['configuration']} | {r['nfe']} | {k} | {r['policy_auto']:.3f} | {c['shared_grid']:.3f} "
                         f"| {c['best_single_continuation']:.3f} | {knn} | {c['per_image_best_continuation']:.3f} | "
                         f"{own_text} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path) -> None:
    """Bars per configuration and decision call: each bound as a ratio to the heuristic (1 = the heuristic; the
    issue's goal 0.9 dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, series = [], {"policy:auto": [], "shared oracle grid": [], "best single continuation": [],
                          f"chosen from the observation (k = {NEIGHBOURS[-1]})": [], "per-image best continuation (hindsight)": [],
                          "per-image oracle (hindsight)": []}
    for r in rows:
        for k, c in r["decide_after_call"].items():
            labels.append(f"{r['configuration']}\n{r['nfe']} NFE, call {k}")
            own = r.get("per_image_oracle")
            for name, v in zip(series, (r["policy_auto"], c["shared_grid"], c["best_single_continuation"],
                                        c[f"nearest_{NEIGHBOURS[-1]}"], c["per_image_best_continuation"],
                                        np.nan if own is None else own["ratio"])):
                series[name].append(v)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(labels)), 4.6))
    width = 0.8 / len(series)
    for j, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(labels)) + (j - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.9, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=7)
    ax.set_ylabel("pooled RMSE / heuristic's (same images)")
    ax.set_title("Room for a step policy, and how much of it its observation reveals (held-out seeds)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_cell(text: str) -> tuple[str, str, float, int]:
    """``TESTBED:MODEL_TYPE:CFG:NFE`` → (testbed, model type, CFG scale, budget), checked."""
    from ..testbeds import (
        CONDITIONAL_TESTBED_NAMES,
        TESTBED_NAMES,
        TRAINED_TESTBED_NAMES,
    )
    parts = text.split(":")
    if len(parts) != 4:
        raise ValueError(f"a cell is TESTBED:MODEL_TYPE:CFG:NFE, got {text!r}")
    testbed, model_type = parts[0], parts[1]
    if testbed not in (*TESTBED_NAMES, *TRAINED_TESTBED_NAMES):
        raise ValueError(f"unknown testbed {testbed!r}: expected one of {[*TESTBED_NAMES, *TRAINED_TESTBED_NAMES]}")
    if model_type not in ("ve", "flow"):
        raise ValueError(f"model type must be ve or flow, got {model_type!r}")
    try:
        cfg, nfe = float(parts[2]), int(parts[3])
    except ValueError:
        raise ValueError(f"CFG must be a number and NFE an integer in {text!r}") from None
    if cfg != 1.0 and testbed not in CONDITIONAL_TESTBED_NAMES:
        raise ValueError(f"{testbed} is unconditional: its CFG scale can only be 1, got {cfg:g}")
    if not cfg >= 0 or nfe < 3:
        raise ValueError(f"need CFG ≥ 0 and NFE ≥ 3 in {text!r}")
    return testbed, model_type, cfg, nfe


def main(argv) -> int:
    """CLI (see the module docstring)."""
    from tqdm.auto import tqdm

    from .policy_eval import MEASUREMENT_SEED
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-headroom",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--cell", action="append", required=True, metavar="TESTBED:MODEL_TYPE:CFG:NFE",
                    help="a configuration and budget, e.g. gmm_digits:flow:1:5 or mnist_unet:ve:2:8 (repeatable)")
    ap.add_argument("--train-seeds", type=int, default=512, help="training images of the neighbour rule (seeds 0..N-1)")
    ap.add_argument("--seeds", type=int, default=256, help=f"measurement images (seeds {MEASUREMENT_SEED}…)")
    ap.add_argument("--per-image-oracle", type=int, default=0, metavar="N",
                    help="also fit each of the first N measurement images its own grid (about 100 runs of one image "
                         "each)")
    ap.add_argument("--reference-steps", type=int, default=None, help="trained testbeds' reference steps (default: "
                                                                       "the policy measurements')")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "policy" / "headroom.json",
                    help="JSON report; the plot goes next to it as .png; cells already in it that are not measured "
                         "now are kept")
    args = ap.parse_args(argv)
    try:
        cells = [parse_cell(c) for c in args.cell]
    except ValueError as e:
        ap.error(f"--cell: {e}")
    if args.train_seeds < max(NEIGHBOURS) or args.seeds < 2 or args.per_image_oracle < 0:
        ap.error(f"need --train-seeds ≥ {max(NEIGHBOURS)}, --seeds ≥ 2 and --per-image-oracle ≥ 0")
    torch.set_num_threads(1)
    seeds = list(range(MEASUREMENT_SEED, MEASUREMENT_SEED + args.seeds))
    t0 = time.time()
    rows = []
    with tqdm(total=sum(len({1, max(1, c[3] // 2)}) for c in cells), desc="policy-headroom", unit="call") as bar:
        for testbed, model_type, cfg, nfe in cells:
            bar.set_postfix_str(f"{testbed}:{model_type}:{cfg:g}:{nfe}")
            rows.append(measure_cell(testbed, model_type, cfg, nfe, range(args.train_seeds), seeds,
                                     args.per_image_oracle, reference_steps=args.reference_steps, progress=bar))
    old = json.loads(args.out.read_text()).get("rows", []) if args.out.is_file() else []
    new_keys = {(r["configuration"], r["nfe"]) for r in rows}
    rows = [r for r in old if (r["configuration"], r["nfe"]) not in new_keys] + rows
    report = {"command": "python -m adaptive_core.tune policy-headroom " + " ".join(argv),
              "seconds": round(time.time() - t0, 1), "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({report['seconds']:.0f} s)")
    return 0


__all__ = ["GridObserver", "continuation_grids", "grid_observations", "markdown", "measure_cell",
           "nearest_neighbour_choice", "oracle_grid_of", "parse_cell", "per_image_oracle", "plot", "pooled",
           "run_options"]
