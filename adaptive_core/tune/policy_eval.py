"""``python -m adaptive_core.tune policy-eval``: measure a step policy against the heuristic controller and the
benchmark's best peer on held-out seeds (docs/policy/README.md).

Per testbed and NFE: RMSE to the reference (pooled over the held-out seeds, as the benchmark) of ADO with the
heuristic controller and with the policy, the policy's mean NFE, the best peer of the committed benchmark
(``docs/bench/results.json``; for the trained UNet ``docs/bench/trained/results.json``, per model type and CFG)
re-run on the same held-out seeds, and the oracle fixed schedule: the best σ grid fitted with the reference in
the loop on other seeds (the analytic benchmark's; for the trained networks ``docs/bench/trained/oracle.json``
and ``oracle_photo.json`` of ``python -m adaptive_core.bench.trained_oracle``), also re-run on the same held-out
seeds.  Also the policy's latency per decision on this CPU.  ``--policy auto`` measures
``controller="policy:auto"``: each configuration runs the bundled policy the domain adapter picks for it
(:mod:`adaptive_core.domain`), named in its rows (``chosen_policy``; None: the heuristic).

A pooled RMSE over a few dozen images is carried by its hardest images (on the UNet the worst 3 of 64 can hold
80% of the squared error), so each ratio comes with a paired bootstrap 90% interval over the images, the
per-image geometric-mean ratio (what a typical image gains) and the share of images the policy makes worse.
"""
from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
#: First of the measurement seeds: training draws from 0.., its periodic evaluation from 20000..
MEASUREMENT_SEED = 30000


def decision_latency_us(policy, repeats: int = 3000, rows: int = 1, blocks: int = 15) -> float:
    """Wall time (µs) of one ``policy.decide`` (fallback check + ONNX actor) on ``rows`` observation rows at the
    training mean (a sampler decides one row per image of its batch), after 50 calls of warm-up: the ``repeats``
    calls are timed one by one in ``blocks`` blocks, and the lowest of the block medians is returned, so that a
    burst of other work on a shared machine (medians of the same code moved up to 2× within minutes on a 2-core
    VM) does not count."""
    from ..policy import N_OBSERVATIONS
    obs = np.zeros((rows, N_OBSERVATIONS), np.float32)
    obs[:] = policy._mean
    for _ in range(50):
        policy.decide(obs)
    medians = []
    for _ in range(blocks):
        times = []
        for _ in range(max(1, repeats // blocks)):
            t = time.perf_counter()
            policy.decide(obs)
            times.append(time.perf_counter() - t)
        medians.append(np.median(times))
    return float(min(medians) * 1e6)


def pooled_ratio_interval(policy_rmse, heuristic_rmse, level: float = 0.9, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap (Efron & Tibshirani 1993) ``level`` interval of the pooled-RMSE ratio
    sqrt(Σ policy² / Σ heuristic²) over images: the images are resampled with replacement, each keeping its
    policy and heuristic errors together."""
    p2, h2 = np.square(np.asarray(policy_rmse, np.float64)), np.square(np.asarray(heuristic_rmse, np.float64))
    if p2.shape != h2.shape or p2.ndim != 1 or p2.size == 0:
        raise ValueError(f"need two equal, non-empty 1-D per-image RMSE lists, got {p2.shape} and {h2.shape}")
    idx = np.random.default_rng(seed).integers(0, p2.size, (resamples, p2.size))
    ratios = np.sqrt(p2[idx].sum(1) / np.maximum(h2[idx].sum(1), 1e-300))
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def per_image_summary(policy_rmse, heuristic_rmse) -> dict:
    """What a typical image gains: the geometric mean of the per-image RMSE ratios policy / heuristic, the share
    of images the policy makes worse (by more than 1%), and the paired bootstrap 90% interval of the pooled
    ratio (:func:`pooled_ratio_interval`)."""
    p, h = np.asarray(policy_rmse, np.float64), np.asarray(heuristic_rmse, np.float64)
    log_ratio = np.log(np.maximum(p, 1e-300) / np.maximum(h, 1e-300))
    return {"per_image_geomean_ratio": float(np.exp(log_ratio.mean())),
            "share_of_images_worse": float(np.mean(log_ratio > np.log(1.01))),
            "policy_vs_heuristic_ci90": list(pooled_ratio_interval(p, h))}


def trained_bench_peers(path: Path | None) -> dict:
    """{config key: {"methods": {method: {nfe: {"rmse", "nfe"}}}}} from the trained benchmark's results
    (``python -m adaptive_core.bench.trained``; runs named "ve, CFG 2"), in the analytic benchmark's layout."""
    if path is None or not path.is_file():
        return {}
    out = {}
    for run, res in json.loads(path.read_text())["runs"].items():
        mt, _, cfg = run.partition(", CFG ")
        out[f"mnist_unet-{mt}-cfg{float(cfg):g}"] = {"methods": {
            m: {n: {"rmse": r["rmse"], "nfe": r["nfe_used"]} for n, r in rows.items()}
            for m, rows in res["methods"].items()}}
    return out


def measure(policy_path: Path, specs, nfes, seeds, bench_results: Path | None, trained_bench: Path | None = None,
            cfg_scales=None, reference_steps: int | None = None, trained_oracle=None) -> dict:
    """The numbers of the module docstring, as a dict.  ``trained_oracle``: a file, or a list of files, of the
    trained networks' oracle grids (:func:`~adaptive_core.bench.trained_oracle.load_oracle_grids`; a later
    file's grid of a configuration replaces an earlier one's); the analytic ones come with
    ``bench_results``."""
    from ..bench.metrics import rmse
    from ..bench.run import best_peer, run_method
    from ..bench.trained_oracle import load_oracle_grids
    from ..domain import job_domain, select_policy
    from ..policy import load_policy
    from ..sampler import sample_adaptive
    from .policy_env import (
        TRAINED_CFG_SCALES,
        TRAINED_REFERENCE_STEPS,
        configs_of,
        evaluate_controller,
        set_config_labels,
    )
    cfg_scales = TRAINED_CFG_SCALES if cfg_scales is None else tuple(cfg_scales)
    reference_steps = TRAINED_REFERENCE_STEPS if reference_steps is None else int(reference_steps)
    auto = str(policy_path) == "auto"
    bench = json.loads(bench_results.read_text())["configs"] if bench_results and bench_results.is_file() else {}
    bench = {**bench, **trained_bench_peers(trained_bench)}
    oracle_files = [trained_oracle] if isinstance(trained_oracle, (str, Path)) else list(trained_oracle or [])
    for path in oracle_files:   # in order: a later file's grid of a configuration replaces an earlier one's
        for key, grids in load_oracle_grids(path).items():
            bench.setdefault(key, {"methods": {}})["methods"].update(grids["methods"])
    refs: dict = {}
    kw = dict(cfg_scales=cfg_scales, reference_steps=reference_steps)
    heur = evaluate_controller(None, specs, nfes, seeds, refs, **kw)
    # policy:auto: the policy the domain adapter picks from each testbed, as the sampler does (or None: heuristic)
    chosen = {(c.key, n): select_policy(job_domain(refs[c.key][0], c.model_type, nfe_budget=n))
              for c in configs_of(specs, cfg_scales) for n in nfes} if auto else {}
    policies = {name: load_policy(f"policy:{name}") for name in set(chosen.values()) - {None}} if auto else \
        {"": load_policy(policy_path)}
    pol = evaluate_controller("policy:auto" if auto else f"policy:{policy_path}", specs, nfes, seeds, refs, **kw)
    rows = []
    for config in configs_of(specs, cfg_scales):
        key = config.key
        tb, x, ref = refs[key]
        set_config_labels(config, tb, seeds)
        for n in nfes:
            row = {"testbed": key, "nfe": n, "heuristic": heur[key][n]["rmse"], "policy": pol[key][n]["rmse"],
                   "policy_mean_nfe": pol[key][n]["nfe"], **({"chosen_policy": chosen[key, n]} if auto else {})}
            row["policy_vs_heuristic"] = row["policy"] / row["heuristic"]
            row.update(per_image_summary(pol[key][n]["rmse_images"], heur[key][n]["rmse_images"]))
            row["images"] = {"heuristic": [float(f"{v:.4g}") for v in heur[key][n]["rmse_images"]],
                             "policy": [float(f"{v:.4g}") for v in pol[key][n]["rmse_images"]]}
            cfg = bench.get(key)
            peer = best_peer(cfg, n) if cfg else None
            if peer is not None:
                out, used = run_method(peer[0], tb, x, n)
                row.update(best_peer=peer[0], best_peer_rmse=rmse(out, ref), best_peer_nfe=used)
                row["policy_vs_best_peer"] = row["policy"] / row["best_peer_rmse"]
            oracle = (cfg or {}).get("methods", {}).get("oracle", {}).get(str(n))
            if oracle is not None and "sigmas" in oracle:
                grid = torch.tensor(oracle["sigmas"], dtype=torch.float64)
                out = sample_adaptive(tb, x, grid, model_type=config.model_type, mode="fixed",
                                      prediction=oracle.get("prediction", "data"))   # the form it was fitted in
                row.update(oracle_rmse=rmse(out, ref), oracle_grid=oracle["sigmas"])
                row["policy_vs_oracle"] = row["policy"] / row["oracle_rmse"]
                row["heuristic_vs_oracle"] = row["heuristic"] / row["oracle_rmse"]
            rows.append(row)
    one = next(iter(policies.values()), None)
    return {"policy": "policy:auto (the domain adapter's choice per configuration)" if auto else str(policy_path),
            "seeds": [seeds.start, seeds.stop], "rows": rows, "reference_steps_trained": reference_steps,
            "trained_on": {n: p.manifest.trained_on for n, p in policies.items()} if auto else one.manifest.trained_on,
            "latency_us_per_decision": max((decision_latency_us(p) for p in policies.values()), default=float("nan")),
            "train_seconds": ({n: training_seconds(p.manifest) for n, p in policies.items()} if auto
                              else training_seconds(one.manifest)), "torch": torch.__version__}


def training_seconds(manifest) -> float | None:
    """The training time a policy manifest records: the sum over its PPO stages where it was trained in several
    (``metrics.train_seconds_stages``; each stage's own ``train_seconds`` counts that stage only), else
    ``metrics.train_seconds``."""
    metrics = manifest.metrics
    return metrics.get("train_seconds_stages", metrics.get("train_seconds"))


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "–"


def markdown(res: dict) -> str:
    """The measurement as a markdown table.  "in training": whether the row's configuration is among those the
    policy was trained on (for ``--policy auto``, the policy chosen for that row)."""
    def in_training(row: dict) -> str:
        if "chosen_policy" in row and row["chosen_policy"] is None:
            return "– (heuristic)"
        on = res["trained_on"][row["chosen_policy"]] if "chosen_policy" in row else res["trained_on"]
        return "yes" if row["testbed"] in set(on.get("configurations", on.get("testbeds", []))) else "**no (left out)**"
    lines = ["| testbed | in training | NFE | heuristic | policy (mean NFE) | policy / heuristic (90% CI) "
             "| per image: geo-mean ratio, share worse | best peer (same seeds) | policy / best peer "
             "| policy / oracle grid (same seeds) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        peer = f"{r['best_peer']} {r['best_peer_rmse']:.4g}" if "best_peer" in r else "–"
        lo, hi = r["policy_vs_heuristic_ci90"]
        lines.append(f"| {r['testbed']} | {in_training(r)} | {r['nfe']} | "
                     f"{r['heuristic']:.4g} | {r['policy']:.4g} ({r['policy_mean_nfe']:.2f}) | "
                     f"{r['policy_vs_heuristic']:.3f} ({lo:.2f}–{hi:.2f}) | "
                     f"{r['per_image_geomean_ratio']:.2f}, {r['share_of_images_worse']:.0%} | {peer} | "
                     f"{_ratio(r, 'policy_vs_best_peer')} | {_ratio(r, 'policy_vs_oracle')} |")
    return "\n".join(lines)


def plot_per_image(res: dict, path: Path) -> None:
    """One panel per configuration: each image's RMSE with the policy against the heuristic's (log-log, one
    colour per NFE), with the diagonal: points below it are images the policy improves.  The pooled ratio is
    carried by the points far right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    keys = list(dict.fromkeys(r["testbed"] for r in res["rows"]))
    cols = min(4, len(keys))
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        lo, hi = np.inf, 0.0
        for r in (r for r in res["rows"] if r["testbed"] == key):
            h, p = np.asarray(r["images"]["heuristic"]), np.asarray(r["images"]["policy"])
            ax.scatter(h, p, s=6, alpha=0.6, label=f"NFE {r['nfe']}: pooled {r['policy_vs_heuristic']:.2f}, "
                                                   f"per image {r['per_image_geomean_ratio']:.2f}")
            lo, hi = min(lo, h.min(), p.min()), max(hi, h.max(), p.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", title=key, xlabel="heuristic RMSE (per image)")
        for axis in (ax.xaxis, ax.yaxis):          # labels on the decades only: minor labels overlap in a narrow span
            axis.set_minor_formatter(NullFormatter())
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes[:, 0]:
        ax.set_ylabel("policy RMSE (per image)")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    title = (f"{Path(res['policy']).stem}: per-image error, policy vs heuristic controller "
             f"(seeds {res['seeds'][0]}–{res['seeds'][1] - 1}; below the diagonal = better)")
    fig.suptitle("\n".join(textwrap.wrap(title, 40 * cols)), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_latency(spec: Path) -> int:
    """Print the latency per decision (:func:`decision_latency_us`: the lowest block median; 1 and 8 rows) of ``spec``
    (a manifest path, or 'auto': every bundled policy)."""
    from ..policy import bundled_policies, load_policy
    names = bundled_policies() if str(spec) == "auto" else [str(spec)]
    print("| policy | µs per decision, 1 row | 8 rows |\n|---|---|---|")
    for name in names:
        policy = load_policy(name)
        print(f"| {policy.name} | {decision_latency_us(policy):.1f} | {decision_latency_us(policy, rows=8):.1f} |")
    return 0


def main(argv) -> int:
    """Parse arguments, measure, print the table, write JSON."""
    from .policy_train import DEFAULT_TESTBEDS, parse_specs
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, required=True,
                    help="policy manifest (.json), or 'auto': the bundled policy the domain adapter picks for each "
                         "configuration (controller='policy:auto')")
    ap.add_argument("--testbeds", default=DEFAULT_TESTBEDS)
    ap.add_argument("--cfg", default="1,2", help="CFG scales of the trained testbeds (comma-separated)")
    ap.add_argument("--reference-steps", type=int, default=128,
                    help="steps of a trained testbed's reference solve (128: 0.007 RMS from the 512-step solve on "
                         "mnist_unet-ve CFG 2, where ADO at 10 NFE is 0.12 away; cached in build/)")
    ap.add_argument("--nfes", default="5,8,10")
    ap.add_argument("--seeds", type=int, default=256,
                    help="noise seeds FIRST..FIRST+N (from 30000: used neither in training nor in its periodic "
                         "evaluation); on the UNet, ratios over 64 images differed from those over 256 by up to 0.2")
    ap.add_argument("--first-seed", type=int, default=MEASUREMENT_SEED,
                    help="first noise seed (20000 measures on the periodic-evaluation seeds, e.g. to choose between "
                         "trained policies without looking at the measurement seeds)")
    ap.add_argument("--bench", type=Path, default=REPO / "docs" / "bench" / "results.json")
    ap.add_argument("--trained-bench", type=Path, default=REPO / "docs" / "bench" / "trained" / "results.json")
    ap.add_argument("--trained-oracle", type=Path, nargs="+",
                    default=[REPO / "docs" / "bench" / "trained" / f for f in ("oracle.json", "oracle_photo.json")],
                    help="files of the trained networks' oracle grids (python -m adaptive_core.bench.trained_oracle)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--plot", type=Path, default=None, help="draw the per-image errors (policy vs heuristic) here")
    ap.add_argument("--latency-only", action="store_true",
                    help="measure only the latency per decision (1 and 8 rows) of the policy, or with --policy auto "
                         "of every bundled policy, and print it")
    args = ap.parse_args(argv)
    if args.latency_only:
        return print_latency(args.policy)
    if args.seeds < 1 or args.first_seed < 0:
        ap.error(f"need --seeds ≥ 1 and --first-seed ≥ 0, got {args.seeds} and {args.first_seed}")
    missing = [str(f) for f in args.trained_oracle if not f.is_file()]
    if missing:
        ap.error(f"--trained-oracle: no such file {', '.join(missing)}")
    torch.set_num_threads(1)
    res = measure(args.policy, parse_specs(args.testbeds), [int(n) for n in args.nfes.split(",")],
                  range(args.first_seed, args.first_seed + args.seeds), args.bench, args.trained_bench,
                  [float(c) for c in args.cfg.split(",")], args.reference_steps, args.trained_oracle)
    print(markdown(res))
    print(f"latency per decision: {res['latency_us_per_decision']:.1f} µs; training time: {res['train_seconds']} s")
    for (key, n), name in sorted({(r["testbed"], r["nfe"]): r["chosen_policy"] for r in res["rows"]
                                  if "chosen_policy" in r}.items()):
        print(f"policy:auto on {key} at {n} NFE: {'the heuristic' if name is None else 'policy:' + name}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        head = json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1)[:-2]
        rows = ",\n  ".join(json.dumps(r) for r in res["rows"])          # one line per row (with its images)
        args.out.write_text(f'{head},\n "rows": [\n  {rows}\n ]\n}}\n')
    if args.plot:
        plot_per_image(res, args.plot)
    return 0


__all__ = [
    "decision_latency_us",
    "main",
    "markdown",
    "measure",
    "per_image_summary",
    "plot_per_image",
    "pooled_ratio_interval",
    "print_latency",
    "trained_bench_peers",
    "training_seconds",
]
