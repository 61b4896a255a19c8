"""Guided runs: the predictor order of ``max_order="auto"`` (2 above CFG 2; from CFG 3, 1 on steps longer than 1 in
λ) against order 3, order 2 and the peers.

``python -m adaptive_core.bench.guided_order [--testbeds mnist_unet digits_unet] [--model-types ve flow]
[--cfg 1.5 2 2.5 3 5 7] [--nfe 5 6 8 10 15 20] [--seeds 64] [--first-seed 30000] [--peers default|none|NAME ...]
[--jobs 2] [--out docs/bench/guided_order]``

For each class-conditional network, model type, CFG scale and budget it runs, on the same noises and against a
λ-uniform reference solve (:data:`REFERENCE_STEPS` steps, as the policy measurements):

* ``ado``: ADO as shipped, ``max_order="auto"`` (:func:`~adaptive_core.sampler.resolve_max_order`) and
  ``second_order_max_step="auto"`` (:func:`~adaptive_core.sampler.resolve_second_order_max_step`);
* ``order3``: ``max_order=3`` without the step limit, what ADO ran on every guided run before the rules
  (2026-11-28);
* ``order2``: ``max_order=2`` without the step limit, what ADO ran above CFG 2 between the two rules (at CFG ≤ 2,
  where ``ado`` is ``order3``: the evidence for the first rule's threshold);
* the peers (:data:`~adaptive_core.bench.trained.DEFAULT_PEERS`, fixed-grid samplers), the best of them per budget.

Writes ``<out>.json``, ``<out>.md`` (tables and a summary) and ``<out>.png`` (order 2 / order 3 and ADO / best
peer against NFE, one line per scale).  The seeds default to 30000 onwards: the threshold was chosen on seeds
20000–20063.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .flow_plan import (
    add_peers,
    add_run_arguments,
    config_and_reference,
    geometric_mean,
    ratio_summary,
    report_meta,
    run_jobs,
    save_figure,
    write_outputs,
)

#: Steps of the reference solve (as the policy measurements,
#: :data:`~adaptive_core.tune.policy_env.TRAINED_REFERENCE_STEPS`).
REFERENCE_STEPS = 128
DEFAULT_OUT = Path("docs/bench/guided_order")


def measure_config(name: str, model_type: str, cfg: float, nfes, seeds, peers) -> dict:
    """RMSE to the reference of ``ado``, ``order3``, ``order2`` and each peer on the class-conditional network
    ``name`` (``model_type``, CFG ``cfg``) for each budget in ``nfes``, over ``seeds``.  Returns {"testbed", "cfg",
    "auto_order", "rows": [{"nfe", "ado", "order3", "order2", "peers": {name: rmse}, "best_peer",
    "best_peer_rmse"}]}."""
    from .. import sample_adaptive
    from ..sampler import resolve_max_order
    from .metrics import rmse
    from .run import host_sigmas
    config, tb, x, ref = config_and_reference(name, model_type, cfg, seeds, REFERENCE_STEPS)
    rows = []
    for n in nfes:
        grid = host_sigmas(tb, n)
        row = {"nfe": int(n), "peers": {}}
        for label, opts in (("ado", {}), ("order3", {"max_order": 3, "second_order_max_step": None}),
                            ("order2", {"max_order": 2, "second_order_max_step": None})):
            row[label] = rmse(sample_adaptive(tb, x, grid, nfe_budget=n, model_type=model_type, **opts), ref)
        add_peers(row, peers, tb, x, n, ref)
        rows.append(row)
    return {"testbed": config.key, "cfg": float(cfg), "model_type": model_type,
            "auto_order": resolve_max_order("auto", tb), "rows": rows}


def _job(job) -> dict:
    """:func:`measure_config` in a worker process of one thread."""
    torch.set_num_threads(1)
    return measure_config(*job)


def summary(results: dict) -> dict:
    """Per group of configurations (those where the rule takes order 2, and those where it keeps 3): geometric
    mean and worst cell of order 2 / order 3 and of ADO / best peer, with the count of cells above 1."""
    out = {}
    for group, auto_order in (("rule_order2", 2), ("rule_order3", 3)):
        configs = [c for c in results["configs"] if c["auto_order"] == auto_order]
        for key, num, den in (("order2_vs_order3", "order2", "order3"), ("ado_vs_order2", "ado", "order2"),
                              ("ado_vs_best_peer", "ado", "best_peer_rmse"),
                              ("order3_vs_best_peer", "order3", "best_peer_rmse")):
            cells = [(r[num] / r[den], c["testbed"], r["nfe"]) for c in configs for r in c["rows"] if den in r]
            if cells:
                out.setdefault(group, {})[key] = ratio_summary(cells)
    return out


def markdown(results: dict) -> str:
    """The report: how to reproduce, the summary, and one table per configuration."""
    meta, summ = results["meta"], results["summary"]
    lines = ["# Guided runs: predictor order 2 above CFG 2, order 1 on long steps", "",
             (f"`{meta['command']}` ({meta['seconds']:.0f} s on {meta['machine']}, torch {meta['torch']}; seeds "
              f"{meta['seeds'][0]}–{meta['seeds'][1] - 1}). RMSE to a {REFERENCE_STEPS}-step λ-uniform solve over "
              "all pixels of all images. `ado` is ADO as shipped (`max_order=\"auto\"`: 2 on guided runs above CFG "
              "2, else 3; `second_order_max_step=\"auto\"`: from CFG 3 order 1 on steps longer than 1 in λ), "
              "`order3` what it ran before both rules, `order2` order 2 without the step limit (what it ran between "
              "them); the peers are fixed-grid samplers on the same noises."), ""]
    names = {"rule_order2": "CFG above 2 (the rule takes order 2)", "rule_order3": "CFG up to 2 (the rule keeps 3)"}
    labels = {"order2_vs_order3": "order 2 / order 3", "ado_vs_order2": "ADO / order 2 (the step limit)",
              "ado_vs_best_peer": "ADO / best peer",
              "order3_vs_best_peer": "order 3 / best peer"}
    for group, parts in summ.items():
        for key, s in parts.items():
            lines.append(f"- **{names[group]}, {labels[key]}**: geometric mean {s['geomean']:.3f} over {s['cells']} "
                         f"cells, best {s['best']:.3f}, worst {s['worst']:.3f} ({s['worst_cell'][0]}, "
                         f"{s['worst_cell'][1]} NFE); {s['cells_above_1']} cells above 1.")
    groups = [(t, auto_order) for auto_order in (2, 3) for t in ("ve", "flow")
              if any(c["model_type"] == t and c["auto_order"] == auto_order for c in results["configs"])]
    lines += ["", "Geometric means per budget, order 2 / order 3, ADO / order 2 and ADO / best peer:", "",
              "| NFE | " + " | ".join(f"{t}, CFG {'above' if o == 2 else 'up to'} 2" for t, o in groups) + " |",
              "|---|" + "---|" * len(groups)]
    for n in meta["nfe"]:
        cells = []
        for model_type, auto_order in groups:
            rows = [r for c in results["configs"] if c["auto_order"] == auto_order and c["model_type"] == model_type
                    for r in c["rows"] if r["nfe"] == n]
            peers = [r["ado"] / r["best_peer_rmse"] for r in rows if "best_peer_rmse" in r]
            cells.append(f"{geometric_mean(r['order2'] / r['order3'] for r in rows):.3f} / "
                         f"{geometric_mean(r['ado'] / r['order2'] for r in rows):.3f} / "
                         + (f"{geometric_mean(peers):.3f}" if peers else "–"))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for c in results["configs"]:
        lines += ["", f"## {c['testbed']} (ADO runs order {c['auto_order']})", "",
                  "| NFE | ado | order 3 | order 2 | order 2 / order 3 | ado / order 2 | best peer | ado / best peer |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            peer = (f"{r['best_peer']} {r['best_peer_rmse']:.4g} | {r['ado'] / r['best_peer_rmse']:.3f}"
                    if "best_peer" in r else "– | –")
            lines.append(f"| {r['nfe']} | {r['ado']:.4g} | {r['order3']:.4g} | {r['order2']:.4g} | "
                         f"{r['order2'] / r['order3']:.3f} | {r['ado'] / r['order2']:.3f} | {peer} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """One row per model type: order 2 / order 3, ADO / order 2 and ADO / best peer against NFE (log scales), one
    line per network and CFG scale (dashed where the rule keeps order 3)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    types = sorted({c["model_type"] for c in results["configs"]})
    fig, axes = plt.subplots(len(types), 3, figsize=(17, 4.2 * len(types)), squeeze=False, sharex=True)
    for row, model_type in zip(axes, types):
        for ax, (num, den, title) in zip(row, (("order2", "order3", "order 2 / order 3"),
                                               ("ado", "order2", "ADO as shipped / order 2 (the step limit)"),
                                               ("ado", "best_peer_rmse", "ADO as shipped / best peer"))):
            for c in (c for c in results["configs"] if c["model_type"] == model_type):
                rows = [r for r in c["rows"] if den in r]
                if rows:
                    ax.plot([r["nfe"] for r in rows], [r[num] / r[den] for r in rows], marker="o", ms=3,
                            ls="-" if c["auto_order"] == 2 else "--", label=c["testbed"])
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(results["meta"]["nfe"], [str(n) for n in results["meta"]["nfe"]])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set_title(f"{model_type}: {title} (< 1: the first is better)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=6, ncol=2)
    for ax in axes[-1]:
        ax.set_xlabel("model calls (NFE)")
    save_figure(fig, path)


def main(argv=None) -> int:
    """CLI entry point (see the module docstring): measure, then write the JSON, the table and the plot."""
    from ..testbeds import CONDITIONAL_TESTBED_NAMES
    from .trained import peers_for
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.bench.guided_order",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--testbeds", nargs="+", default=list(CONDITIONAL_TESTBED_NAMES))
    ap.add_argument("--model-types", nargs="+", default=["ve", "flow"], choices=["ve", "flow"])
    ap.add_argument("--cfg", nargs="+", type=float, default=[1.5, 2.0, 2.5, 3.0, 5.0, 7.0])
    ap.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10, 15, 20])
    add_run_arguments(ap, DEFAULT_OUT, '"default", "all", "none" or peer names')
    args = ap.parse_args(argv)
    unknown = [t for t in args.testbeds if t not in CONDITIONAL_TESTBED_NAMES]
    if unknown:
        ap.error(f"not a class-conditional testbed: {unknown} (choose from {list(CONDITIONAL_TESTBED_NAMES)})")
    if args.seeds < 1 or any(n < 1 for n in args.nfe) or any(not (c >= 0) for c in args.cfg):
        ap.error("--seeds and every --nfe must be at least 1, every --cfg ≥ 0")
    try:
        peers = {t: () if args.peers == ["none"] else peers_for(t, args.peers) for t in args.model_types}
    except ValueError as e:
        ap.error(str(e))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    jobs = [(name, t, cfg, args.nfe, seeds, peers[t]) for name in args.testbeds for t in args.model_types
            for cfg in args.cfg]
    t0 = time.time()
    measured = run_jobs(_job, jobs, args.jobs, "guided configurations", "config")
    results = {"meta": report_meta("guided_order", argv, seeds, min(args.jobs, len(jobs)), t0, nfe=list(args.nfe),
                                   cfg=list(args.cfg), peers={t: list(p) for t, p in peers.items()}),
               "configs": measured}
    results["summary"] = summary(results)
    write_outputs(results, args.out, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
