"""Tolerance mode: the calls a tolerance spends and the error it reaches, against budget mode and k-diffusion's
adaptive DPM-Solver at the same calls.

``python -m adaptive_core.bench.tolerance [--configs gaussian:ve ... mnist_unet:flow:7] [--rtol 0.5 0.2 ...]
[--max-nfe 40] [--seeds 64] [--first-seed 30000] [--peers dpm_adaptive|none] [--jobs 2]
[--out docs/bench/tolerance]``

For each configuration (testbed, model type, CFG scale) and relative tolerance it runs, on the same noises and
against the reference the policy measurements use (exact on the analytic testbeds, a :data:`REFERENCE_STEPS`-step
λ-uniform solve on the networks):

* ``tolerance``: ADO's tolerance mode (``mode="tolerance"``, the tolerance ``rtol``, the default ``atol`` as the
  hosts pass it), capped at ``--max-nfe`` calls; its mean, largest and capped share of calls per image;
* ``budget``: ADO's budget mode (the default) with the tolerance run's mean calls, rounded;
* ``dpm_adaptive`` (when k-diffusion is installed): DPM-Solver-23 with PID step-size control (Lu et al. 2022),
  its own tolerance bisected to land on the same calls (:func:`~adaptive_core.bench.peers.run_peer`).

The tolerance controller is a PI controller (Gustafsson 1991) on the UniC corrector's gap (Zhao et al. 2023).
Writes ``<out>.json``, ``<out>.md`` (tables and a summary) and ``<out>.png`` (RMSE against calls, one panel per
configuration).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .flow_plan import (
    add_run_arguments,
    config_and_reference,
    ratio_summary,
    report_meta,
    run_jobs,
    save_figure,
    write_outputs,
)

#: Steps of the networks' reference solve: the policy measurements' (``TRAINED_REFERENCE_STEPS``).
REFERENCE_STEPS = 128
DEFAULT_OUT = Path("docs/bench/tolerance")
DEFAULT_CONFIGS = ("gaussian:ve", "gaussian:flow", "gmm_digits:ve", "gmm_digits:flow",
                   "mnist_unet:ve:1", "mnist_unet:ve:3", "mnist_unet:ve:7",
                   "mnist_unet:flow:1", "mnist_unet:flow:3", "mnist_unet:flow:7",
                   "digits_unet:ve:1", "digits_unet:ve:7", "digits_unet:flow:1", "digits_unet:flow:7")
DEFAULT_RTOLS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)


def parse_config(text: str) -> tuple[str, str, float]:
    """``"testbed:model_type[:cfg]"`` → (testbed, model type, CFG scale; 1 when left out).  ValueError naming the
    problem otherwise."""
    from ..testbeds import (
        CONDITIONAL_TESTBED_NAMES,
        TESTBED_NAMES,
        TRAINED_TESTBED_NAMES,
    )
    known = TESTBED_NAMES + TRAINED_TESTBED_NAMES
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("ve", "flow"):
        raise ValueError(f"configuration {text!r}: write testbed:ve or testbed:flow, with :CFG for a network")
    if parts[0] not in known:
        raise ValueError(f"configuration {text!r}: unknown testbed; known: {list(known)}")
    cfg = float(parts[2]) if len(parts) == 3 else 1.0
    if not cfg >= 0 or (cfg != 1.0 and parts[0] not in CONDITIONAL_TESTBED_NAMES):
        raise ValueError(f"configuration {text!r}: a CFG scale needs a class-conditional testbed "
                         f"({list(CONDITIONAL_TESTBED_NAMES)}) and must be ≥ 0")
    return parts[0], parts[1], cfg


def measure_config(name: str, model_type: str, cfg: float, rtols, max_nfe: int, seeds, peers) -> dict:
    """For each tolerance in ``rtols``: RMSE and calls of ADO's tolerance mode (capped at ``max_nfe``), budget mode's
    RMSE at the tolerance run's mean calls, and each peer's at those calls, on ``name`` (``model_type``, CFG
    ``cfg``) over ``seeds``.  Returns {"testbed", "model_type", "cfg", "rows": [{"rtol", "tolerance", "mean_nfe",
    "max_nfe", "capped_share", "nfe", "budget", "peers": {name: {"rmse", "nfe"}}}]}."""
    from .. import sample_adaptive
    from ..trace import Trace
    from .metrics import rmse
    from .run import host_sigmas, run_method
    config, tb, x, ref = config_and_reference(name, model_type, cfg, seeds, REFERENCE_STEPS)
    grid = host_sigmas(tb, max_nfe)
    rows = []
    for rtol in rtols:
        trace = Trace()
        out = sample_adaptive(tb, x, grid, nfe_budget=max_nfe, model_type=model_type, mode="tolerance",
                              rtol=float(rtol), trace=trace)
        calls = np.array([trace.sample_nfe(b) for b in range(x.shape[0])])
        n = max(round(float(calls.mean())), 2)
        row = {"rtol": float(rtol), "tolerance": rmse(out, ref), "mean_nfe": float(calls.mean()),
               "max_nfe": int(calls.max()), "capped_share": float((calls >= max_nfe).mean()), "nfe": n,
               "budget": rmse(sample_adaptive(tb, x, host_sigmas(tb, n), nfe_budget=n, model_type=model_type), ref),
               "peers": {}}
        for peer in peers:
            sample, used = run_method(peer, tb, x, n)
            row["peers"][peer] = {"rmse": rmse(sample, ref), "nfe": int(used)}
        rows.append(row)
    return {"testbed": config.key, "model_type": model_type, "cfg": float(cfg), "rows": rows}


def _job(job) -> dict:
    """:func:`measure_config` in a worker process of one thread."""
    torch.set_num_threads(1)
    return measure_config(*job)


def summary(results: dict) -> dict:
    """Over all cells: tolerance / budget mode at the same calls (geometric mean, worst, cells above 1.5), and the
    tolerance runs whose error grew as the tolerance tightened by more than 1.5× ("non_monotone")."""
    cells = [(r["tolerance"] / r["budget"], c["testbed"], r["rtol"]) for c in results["configs"] for r in c["rows"]]
    grew = [(later["tolerance"] / earlier["tolerance"], c["testbed"], later["rtol"]) for c in results["configs"]
            for earlier, later in zip(c["rows"], c["rows"][1:])
            if later["rtol"] < earlier["rtol"] and later["tolerance"] > 1.5 * earlier["tolerance"]]
    out = {"tolerance_vs_budget": ratio_summary(cells, above=1.5), "non_monotone": [list(g) for g in grew]}
    peer_cells = [(r["tolerance"] / p["rmse"], c["testbed"], r["rtol"], name) for c in results["configs"]
                  for r in c["rows"] for name, p in r["peers"].items() if p["nfe"] <= r["nfe"]]
    if peer_cells:
        out["tolerance_vs_peer_within_calls"] = ratio_summary(peer_cells)
    return out


def markdown(results: dict) -> str:
    """The report: how to reproduce, the summary, and one table per configuration."""
    meta, summ = results["meta"], results["summary"]
    tb = summ["tolerance_vs_budget"]
    lines = ["# Tolerance mode: calls and error per tolerance", "",
             (f"`{meta['command']}` ({meta['seconds']:.0f} s on {meta['machine']}, torch {meta['torch']}; seeds "
              f"{meta['seeds'][0]}–{meta['seeds'][1] - 1}; at most {meta['max_nfe']} calls). RMSE over all pixels of "
              f"all images, to the exact solution (analytic testbeds) or a {REFERENCE_STEPS}-step λ-uniform solve "
              "(networks). `budget` is ADO's default mode with the tolerance run's mean calls, rounded; "
              "`dpm_adaptive` is k-diffusion's adaptive DPM-Solver with its tolerance bisected to land on those "
              "calls (it cannot finish in fewer than about 19)."), "",
             (f"- **Tolerance / budget mode at the same calls**: geometric mean {tb['geomean']:.3f} over "
              f"{tb['cells']} cells, best {tb['best']:.3f}, worst {tb['worst']:.3f} ({tb['worst_cell'][0]}, rtol "
              f"{tb['worst_cell'][1]:g}); {tb['cells_above_1.5']} cells above 1.5.")]
    if "tolerance_vs_peer_within_calls" in summ:
        p = summ["tolerance_vs_peer_within_calls"]
        lines.append(f"- **Tolerance / dpm_adaptive where it spent no more calls**: geometric mean {p['geomean']:.3f} "
                     f"over {p['cells']} cells, worst {p['worst']:.3f} ({p['worst_cell'][0]}, rtol "
                     f"{p['worst_cell'][1]:g}); {p['cells_above_1']} above 1.")
    grew = summ["non_monotone"]
    lines.append(f"- **A tighter tolerance, an error over 1.5× larger**: {len(grew)} steps"
                 + (": " + "; ".join(f"{t} at rtol {r:g} ({v:.2f}×)" for v, t, r in grew) if grew else "") + ".")
    for c in results["configs"]:
        peers = sorted({name for r in c["rows"] for name in r["peers"]})
        lines += ["", f"## {c['testbed']}", "",
                  "| rtol | calls (mean / max / capped) | tolerance | budget | tolerance / budget | "
                  + "".join(f"{p} (calls) | " for p in peers),
                  "|---|---|---|---|---|" + "---|" * len(peers)]
        for r in c["rows"]:
            lines.append(f"| {r['rtol']:g} | {r['mean_nfe']:.1f} / {r['max_nfe']} / {r['capped_share']:.0%} | "
                         f"{r['tolerance']:.4g} | {r['budget']:.4g} | {r['tolerance'] / r['budget']:.3f} | "
                         + "".join(f"{r['peers'][p]['rmse']:.4g} ({r['peers'][p]['nfe']}) | " for p in peers))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """One panel per configuration: RMSE against mean calls (log scales) for tolerance mode (each point labelled
    with its rtol), budget mode and the peers at those calls."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = results["configs"]
    cols = min(4, len(configs))
    rows = -(-len(configs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, c in zip(axes.flat, configs):
        rs = c["rows"]
        ax.plot([r["mean_nfe"] for r in rs], [r["tolerance"] for r in rs], "o-", ms=4, label="ADO tolerance mode")
        for r in rs:
            ax.annotate(f"{r['rtol']:g}", (r["mean_nfe"], r["tolerance"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.plot([r["nfe"] for r in rs], [r["budget"] for r in rs], "s--", ms=3, label="ADO budget mode")
        for name in sorted({p for r in rs for p in r["peers"]}):
            ax.plot([r["peers"][name]["nfe"] for r in rs], [r["peers"][name]["rmse"] for r in rs], "^:", ms=3,
                    label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(c["testbed"], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(configs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("model calls (mean per image)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("RMSE to the reference", fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    """CLI entry point (see the module docstring): measure, then write the JSON, the table and the plot."""
    from .peers import peer_names
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.bench.tolerance", description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                    help="testbed:model_type[:cfg], e.g. gaussian:ve or mnist_unet:flow:7")
    ap.add_argument("--rtol", nargs="+", type=float, default=list(DEFAULT_RTOLS))
    ap.add_argument("--max-nfe", type=int, default=40, help="the budget cap of the tolerance runs")
    add_run_arguments(ap, DEFAULT_OUT, '"dpm_adaptive" (the default, when k-diffusion is installed) or "none"')
    args = ap.parse_args(argv)
    try:
        configs = [parse_config(c) for c in args.configs]
    except ValueError as e:
        ap.error(str(e))
    if args.seeds < 1 or args.max_nfe < 2 or any(not (0 < r < 10) for r in args.rtol):
        ap.error("--seeds must be at least 1, --max-nfe at least 2, every --rtol in (0, 10)")
    if args.peers in (["default"], ["dpm_adaptive"]):
        peers = ("dpm_adaptive",) if "dpm_adaptive" in peer_names("ve") else ()
        if not peers and args.peers == ["dpm_adaptive"]:
            ap.error("dpm_adaptive needs k-diffusion (pip install --no-deps -r requirements-peers.txt)")
    elif args.peers == ["none"]:
        peers = ()
    else:
        ap.error(f"--peers: dpm_adaptive or none, got {args.peers}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    rtols = sorted(args.rtol, reverse=True)
    jobs = [(name, t, cfg, rtols, args.max_nfe, seeds, peers) for name, t, cfg in configs]
    t0 = time.time()
    measured = run_jobs(_job, jobs, args.jobs, "configurations", "config")
    results = {"meta": report_meta("tolerance", argv, seeds, min(args.jobs, len(jobs)), t0, rtol=rtols,
                                   max_nfe=args.max_nfe, peers=list(peers)),
               "configs": measured}
    results["summary"] = summary(results)
    write_outputs(results, args.out, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
