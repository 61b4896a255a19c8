"""``python -m adaptive_core.tune policy-adapt``: adapt a step policy to another trained network in one command.

A policy trained on some networks decides from features that a new network may present differently: its steps
can be too long or too short there (``docs/policy/README.md``, section 2: the left-out testbed).  This command
fits what the new network needs and teaches it to the policy, without PPO:

1. **Oracle grids** (:mod:`adaptive_core.bench.trained_oracle`): for each new (network, model type) and budget,
   the fixed σ grid with the lowest error to the network's own reference solve, found by coordinate descent
   with the reference in the loop on ``--fit-seeds`` noises (the analytic benchmark's oracle; cf. OSS, AYS and
   the DMN search, arXiv 2402.17376).  On a class-conditional network one grid serves every CFG scale
   (``--joint-cfg``), since the policy does not see the scale.
2. **Distillation** (:mod:`.policy_distill` with :class:`~.policy_distill.OracleGridTeacher`): one student MLP
   learns the starting policy's actions on the configurations it was trained on, and on the new network to land
   on the oracle grid ("Learning by Cheating", Chen et al. 2019: a teacher with privileged information; DAgger
   rounds, Ross et al. 2011).  Every row of a new-network run is learned, also where the starting policy would
   fall back to the heuristic, and the student's out-of-range rule is the range of its own training rows.
3. **Measurement** on held-out noises (default 30000–30255; fitting uses 0–31 and distillation 0–255): on each
   new configuration and budget, the RMSE to the reference of the heuristic controller, the starting policy, the
   adapted policy, the oracle grid and the best of the default peers (chosen on the same seeds), with paired
   bootstrap intervals; and on the starting policy's own configurations (validation seeds 20000–20255), the
   adapted policy against the starting one, so a loss there shows.

Writes ``<out-dir>/<name>.onnx`` + ``.json`` (the adapted policy, loadable as ``policy:<path>``), ``<name>_oracle.json``
(the grids), ``<name>_report.json`` / ``.md`` and ``<name>_report.png``.  A new testbed is a trained testbed of
:mod:`adaptive_core.testbeds` (``mnist_unet``, ``photo_unet``, ``digits_unet``) or a variant of an analytic one
(``gaussian@exponent=1.5``, ``gmm_digits@shift=2``; :func:`adaptive_core.testbeds.split_variant_name`), whose
grids are fitted against its exact reference: several variants at once teach the policy spectra and noise ranges the
shipped testbeds do not have (domain randomisation, Tobin et al. 2017).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
#: Noise seeds of the measurement on the new network, and of the check on the starting policy's configurations.
MEASUREMENT_SEED, CHECK_SEED = 30000, 20000


def _ci(policy_images, heuristic_images) -> list[float]:
    from .policy_eval import pooled_ratio_interval
    return [float(v) for v in pooled_ratio_interval(np.asarray(policy_images), np.asarray(heuristic_images))]


def measure_new(start_policy: str, adapted_policy: str, specs, nfes, seeds, grids: dict, peers: bool = True,
                progress=None, reference_steps: int = 128) -> list[dict]:
    """One row per new configuration and budget: RMSE to the ``reference_steps``-step reference solve of the
    heuristic, the starting and the adapted policy (with their ratios to the heuristic and paired bootstrap 90%
    intervals), the oracle grid of ``grids`` ({config key: {nfe: {"sigmas"}}}) and the best default peer on the
    same seeds."""
    from ..bench.metrics import rmse
    from ..bench.run import run_method
    from ..bench.trained import DEFAULT_PEERS
    from ..sampler import sample_adaptive
    from .policy_env import configs_of, evaluate_controller, set_config_labels
    refs: dict = {}
    results = {name: evaluate_controller(ctrl, specs, nfes, seeds, refs, reference_steps=reference_steps)
               for name, ctrl in (("heuristic", None), ("start", f"policy:{start_policy}"),
                                  ("adapted", f"policy:{adapted_policy}"))}
    rows = []
    for config in configs_of(specs):
        tb, x, ref = refs[config.key]
        set_config_labels(config, tb, seeds)
        for n in nfes:
            heur = results["heuristic"][config.key][n]
            row = {"configuration": config.key, "nfe": int(n), "heuristic": heur["rmse"]}
            for name in ("start", "adapted"):
                r = results[name][config.key][n]
                row[name] = r["rmse"]
                row[f"{name}_vs_heuristic"] = r["rmse"] / heur["rmse"]
                row[f"{name}_vs_heuristic_ci90"] = _ci(r["rmse_images"], heur["rmse_images"])
                row[f"{name}_mean_nfe"] = r["nfe"]
            entry = grids.get(config.key, {}).get(str(n), {})
            grid = entry.get("sigmas")
            if grid is not None:   # replayed in the form it was fitted in (grids before that field: data)
                out = sample_adaptive(tb, x, torch.tensor(grid, dtype=torch.float64), model_type=config.model_type,
                                      mode="fixed", prediction=entry.get("prediction", "data"))
                row["oracle"] = rmse(out, ref)
                row["oracle_vs_heuristic"] = row["oracle"] / heur["rmse"]
                row["adapted_vs_oracle"] = row["adapted"] / row["oracle"]
            if peers:
                best = None
                for method in DEFAULT_PEERS[config.model_type]:
                    out, used = run_method(method, tb, x, int(n))
                    error = rmse(out, ref)
                    if used <= n and (best is None or error < best[1]):
                        best = (method, error)
                if best is not None:
                    row["best_peer"], row["best_peer_rmse"] = best
                    row["adapted_vs_best_peer"] = row["adapted"] / best[1]
                    row["start_vs_best_peer"] = row["start"] / best[1]
            rows.append(row)
            if progress is not None:
                progress.update(1)
    return rows


def check_start_configs(start_policy: str, adapted_policy: str, specs, nfes, seeds) -> list[dict]:
    """On the starting policy's own configurations: each policy's RMSE ratio to the heuristic, and adapted / start."""
    from .policy_env import evaluate_controller
    refs: dict = {}
    heur = evaluate_controller(None, specs, nfes, seeds, refs)
    start = evaluate_controller(f"policy:{start_policy}", specs, nfes, seeds, refs)
    adapted = evaluate_controller(f"policy:{adapted_policy}", specs, nfes, seeds, refs)
    rows = []
    for key in heur:
        for n in nfes:
            h, s, a = heur[key][n]["rmse"], start[key][n]["rmse"], adapted[key][n]["rmse"]
            rows.append({"configuration": key, "nfe": int(n), "start_vs_heuristic": s / h,
                         "adapted_vs_heuristic": a / h, "adapted_vs_start": a / s})
    return rows


def markdown(report: dict) -> str:
    """The report as markdown: the new configurations' table, then the check on the starting configurations."""
    m = report["meta"]
    lines = [f"# Adapting `{m['start_policy']}` to {', '.join(m['new_testbeds'])}", "",
             (f"Adapted policy: `{m['adapted_policy']}`. Measured on seeds {m['seeds'][0]}–{m['seeds'][1] - 1} "
              f"(grids fitted on 0–{m['fit_seeds'] - 1}, distillation on 0–{m['distill_seeds'] - 1}). "
              "Ratios are pooled RMSE to the reference over all images, with paired bootstrap 90% intervals; "
              "below 1 is better than the heuristic controller."), "",
             ("| configuration | NFE | heuristic RMSE | start policy / heuristic | adapted / heuristic "
              "| oracle grid / heuristic | best peer (same seeds) | adapted / best peer |"),
             "|---|---|---|---|---|---|---|---|"]

    def ratio(r, name):
        lo, hi = r[f"{name}_vs_heuristic_ci90"]
        return f"{r[f'{name}_vs_heuristic']:.3f} ({lo:.2f}–{hi:.2f})"
    for r in report["new"]:
        oracle = f"{r['oracle_vs_heuristic']:.3f}" if "oracle" in r else "–"
        peer = f"{r['best_peer']} {r['best_peer_rmse']:.4g}" if "best_peer" in r else "–"
        vs_peer = f"{r['adapted_vs_best_peer']:.3f}" if "best_peer" in r else "–"
        lines.append(f"| {r['configuration']} | {r['nfe']} | {r['heuristic']:.4g} | {ratio(r, 'start')} | "
                     f"{ratio(r, 'adapted')} | {oracle} | {peer} | {vs_peer} |")
    if report.get("check"):
        c = report["check"]
        worst = max(c, key=lambda r: r["adapted_vs_start"])
        lines += ["", (f"On the starting policy's configurations (seeds {m['check_seeds'][0]}–"
                       f"{m['check_seeds'][1] - 1}): adapted / start is {min(r['adapted_vs_start'] for r in c):.3f}–"
                       f"{worst['adapted_vs_start']:.3f} (highest: {worst['configuration']} at {worst['nfe']} NFE); "
                       f"worst cell against the heuristic {max(r['start_vs_heuristic'] for r in c):.3f} (start) and "
                       f"{max(r['adapted_vs_heuristic'] for r in c):.3f} (adapted)."), "",
                  "| configuration | NFE | start / heuristic | adapted / heuristic | adapted / start |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['configuration']} | {r['nfe']} | {r['start_vs_heuristic']:.3f} | "
                  f"{r['adapted_vs_heuristic']:.3f} | {r['adapted_vs_start']:.3f} |" for r in c]
    lines += ["", (f"Time: grids {m['seconds']['grids']:.0f} s, distillation {m['seconds']['distill']:.0f} s, "
                   f"measurement {m['seconds']['measure']:.0f} s."), "", "```", m["command"], "```"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Bars per new configuration and budget: ratio to the heuristic of the starting policy, the adapted policy
    (with 90% intervals), the oracle grid and the best peer; the line at 1 is the heuristic."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["new"]
    labels = [f"{r['configuration']}\n{r['nfe']} NFE" for r in rows]
    xs = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(rows) + 2), 4.4))
    series = [("start", "starting policy", "C1"), ("adapted", "adapted policy", "C0")]
    width = 0.2
    for i, (name, label, colour) in enumerate(series):
        vals = np.array([r[f"{name}_vs_heuristic"] for r in rows])
        ci = np.array([r[f"{name}_vs_heuristic_ci90"] for r in rows])
        ax.bar(xs + (i - 1.5) * width, vals, width, color=colour, label=label,
               yerr=np.abs(ci.T - vals), capsize=2, error_kw={"lw": 0.8})
    ax.bar(xs + 0.5 * width, [r.get("oracle_vs_heuristic", np.nan) for r in rows], width, color="C2",
           label="oracle fixed grid (fitted with the reference)")
    ax.bar(xs + 1.5 * width, [r["best_peer_rmse"] / r["heuristic"] if "best_peer" in r else np.nan for r in rows],
           width, color="0.6", label="best default peer (chosen on these seeds)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("RMSE / heuristic controller's")
    m = report["meta"]
    ax.set_title(f"{m['start_policy']} adapted to {', '.join(m['new_testbeds'])} "
                 f"(seeds {m['seeds'][0]}–{m['seeds'][1] - 1})", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv) -> int:
    """``python -m adaptive_core.tune policy-adapt``: fit the new network's oracle grids, distil, measure, report."""
    from ..bench import trained_oracle
    from ..policy import PolicyLoadError, load_policy
    from ..testbeds import CONDITIONAL_TESTBED_NAMES, split_variant_name
    from . import policy_distill
    from .policy_train import parse_specs, policy_training_cells
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-adapt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbeds", required=True,
                    help="the new network(s) or testbed variants: NAME:MODEL_TYPE,... (e.g. "
                         "photo_unet:ve,photo_unet:flow or gaussian@exponent=1.5:ve)")
    ap.add_argument("--policy", default="ppo_ve_flow", help="the starting policy: a bundled name or a manifest path")
    ap.add_argument("--name", required=True, help="adapted policy name: <out-dir>/<name>.onnx + .json")
    ap.add_argument("--out-dir", type=Path, default=REPO / "build" / "policies")
    ap.add_argument("--budgets", default="5,6,8,10", help="NFE budgets the grids are fitted and taught at")
    ap.add_argument("--fit-seeds", type=int, default=32, help="noise seeds 0..N-1 each oracle grid is fitted on")
    ap.add_argument("--reference-steps", type=int, default=128,
                    help="steps of the new network's reference solve (grid fits and measurement; check with "
                         "TrainedDenoiser.reference_converged_check that it is far below the errors compared)")
    ap.add_argument("--grids", type=Path, default=None,
                    help="use this oracle grid file (python -m adaptive_core.bench.trained_oracle) instead of fitting")
    ap.add_argument("--seeds", type=int, default=256, help="distillation noise seeds 0..N-1 per configuration")
    ap.add_argument("--hidden", default="128,128", help="hidden layer widths of the adapted policy")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--dagger-epochs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--order-margin", type=float, default=0.15)
    ap.add_argument("--eval-budgets", default="5,8,10")
    ap.add_argument("--eval-seeds", type=int, default=256, help="measurement seeds FIRST..FIRST+N on the new network")
    ap.add_argument("--first-eval-seed", type=int, default=MEASUREMENT_SEED)
    ap.add_argument("--check-seeds", type=int, default=256,
                    help="validation seeds 20000.. for the check on the starting policy's configurations, against their "
                         "usual 128-step references on trained networks (0: skip)")
    ap.add_argument("--no-peers", action="store_true", help="do not run the peers on the new network")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the grid fits")
    args = ap.parse_args(argv)
    try:
        new_specs = parse_specs(args.testbeds)
    except ValueError as e:
        ap.error(f"--testbeds: {e}")
    for n, _ in new_specs:
        try:
            split_variant_name(n)
        except ValueError as e:
            ap.error(f"--testbeds: {e}")
    budgets = [int(b) for b in args.budgets.split(",") if b]
    eval_budgets = [int(b) for b in args.eval_budgets.split(",") if b]
    if min(budgets + eval_budgets) < 3 or args.reference_steps < 8 or args.fit_seeds < 2 or args.seeds < 1 \
            or args.eval_seeds < 1 or args.check_seeds < 0:
        ap.error("need budgets ≥ 3, --reference-steps ≥ 8, --fit-seeds ≥ 2, --seeds ≥ 1, --eval-seeds ≥ 1 and "
                 "--check-seeds ≥ 0")
    if args.grids is not None and not args.grids.is_file():
        ap.error(f"--grids: no such file {args.grids}")
    try:
        start = load_policy(args.policy)
    except (PolicyLoadError, ValueError, OSError) as e:   # missing, corrupt or mismatched: say which and why
        ap.error(f"--policy {args.policy}: {e}")
    try:
        start_specs, _, cfg_scales = policy_training_cells(start.manifest)
    except ValueError as e:
        ap.error(f"--policy {args.policy}: {e}")
    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}

    t0 = time.time()
    grids_path = args.grids or args.out_dir / f"{args.name}_oracle.json"
    if args.grids is None:
        for testbed in dict.fromkeys(n for n, _ in new_specs):
            types = [m for n, m in new_specs if n == testbed]
            extra = ["--joint-cfg", "--cfg", *[f"{c:g}" for c in cfg_scales]] \
                if testbed in CONDITIONAL_TESTBED_NAMES else []
            trained_oracle.main(["--testbed", testbed, "--model-type", *types, "--nfe", *map(str, budgets),
                                 "--fit-seeds", str(args.fit_seeds), "--reference-steps", str(args.reference_steps),
                                 "--out", str(grids_path),
                                 "--jobs", str(args.jobs), *extra])
    seconds["grids"] = time.time() - t0

    t0 = time.time()
    all_specs = list(dict.fromkeys([*start_specs, *new_specs]))
    policy_distill.main(["--teacher", str(args.policy),
                         "--name", args.name, "--out-dir", str(args.out_dir), "--seeds", str(args.seeds),
                         "--rounds", str(args.rounds), "--epochs", str(args.epochs),
                         "--dagger-epochs", str(args.dagger_epochs), "--hidden", args.hidden,
                         "--testbeds", ",".join(f"{n}:{m}" for n, m in all_specs),
                         "--budgets", ",".join(map(str, budgets)), "--oracle-grids", str(grids_path),
                         "--order-margin", str(args.order_margin), "--fallback-range", "data"])
    seconds["distill"] = time.time() - t0
    adapted = args.out_dir / f"{args.name}.json"

    t0 = time.time()
    from tqdm import tqdm
    grids = {k: v["methods"]["oracle"] for k, v in trained_oracle.load_oracle_grids(grids_path).items()}
    seeds = range(args.first_eval_seed, args.first_eval_seed + args.eval_seeds)
    from .policy_env import configs_of
    with tqdm(total=len(configs_of(new_specs)) * len(eval_budgets), desc="measure", unit="cell") as bar:
        new_rows = measure_new(str(args.policy), str(adapted), new_specs, eval_budgets, seeds, grids,
                               peers=not args.no_peers, progress=bar, reference_steps=args.reference_steps)
    check_rows = []
    if args.check_seeds:
        check_rows = check_start_configs(str(args.policy), str(adapted), start_specs, eval_budgets,
                                         range(CHECK_SEED, CHECK_SEED + args.check_seeds))
    seconds["measure"] = time.time() - t0
    report = {"meta": {"command": "python -m adaptive_core.tune policy-adapt " + " ".join(argv),
                       "start_policy": str(args.policy), "adapted_policy": str(adapted),
                       "new_testbeds": [f"{n}-{m}" for n, m in new_specs], "grids": str(grids_path),
                       "seeds": [seeds.start, seeds.stop], "fit_seeds": args.fit_seeds,
                       "reference_steps": args.reference_steps, "distill_seeds": args.seeds,
                       "check_seeds": [CHECK_SEED, CHECK_SEED + args.check_seeds], "budgets": budgets,
                       "seconds": {k: round(v, 1) for k, v in seconds.items()}, "torch": torch.__version__},
              "new": new_rows, "check": check_rows}
    base = args.out_dir / f"{args.name}_report"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    base.with_suffix(".md").write_text(text)
    plot(report, base.with_suffix(".png"))
    print(text)
    print(f"wrote {adapted}, {grids_path}, {base}.json/.md/.png")
    return 0


__all__ = ["check_start_configs", "main", "markdown", "measure_new", "plot"]
