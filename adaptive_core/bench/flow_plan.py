"""Flow models: ADO's few-step shifted-time plan and hybrid prediction against the plan it replaced and the peers.

``python -m adaptive_core.bench.flow_plan [--testbeds gaussian gmm_digits mnist_unet ...] [--cfg 1 2]
[--nfe 5 8 10 15 20 30] [--seeds 64] [--first-seed 30000] [--peers default|none|NAME ...] [--jobs 2]
[--out docs/bench/flow_plan]``

For each flow testbed (the analytic ones against their exact reference, the trained networks against a λ-uniform
solve with :data:`REFERENCE_STEPS` steps; the class-conditional networks also at the other ``--cfg`` scales) and
budget it runs, on the same noises:

* ``ado``: ADO as shipped (:func:`~adaptive_core.sampler.resolve_flow_plan`: on an unguided run a plan uniform in
  shifted time for budgets up to :data:`~adaptive_core.sampler.FEW_STEP_BUDGET`, the ρ plan above, hybrid
  prediction; a guided run keeps the ρ plan in data prediction);
* ``ado_before``: the options it replaced, ``prediction="data", flow_shift=None`` (data prediction on the ρ
  plan, as before 2026-11-27);
* on guided runs, ``unguided_rule``: the unguided rule forced (the evidence for keeping guided runs as before);
* the peers (:data:`PEERS`: fixed-grid samplers on the hosts' flow schedules), the best of them per budget.

Writes ``<out>.json``, ``<out>.md`` (tables of RMSE and ratios) and ``<out>.png`` (ratios against NFE).
The seeds default to 30000 onwards, which the rule was not chosen on (it was chosen on 20000–20063).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

#: Flow testbeds measured by default: the two analytic ones and five trained networks.
TESTBEDS = ("gaussian", "gmm_digits", "mnist_unet", "digits_unet", "photo_unet", "skimage_unet", "mpl_unet")
#: Reference solve steps per trained network (those of its own measurements, chosen by the convergence check
#: in ``docs/policy/heldout_*_protocol.md``); others use the policy measurements' 128.
REFERENCE_STEPS = {"digits_unet": 256, "skimage_unet": 256, "mpl_unet": 512}
#: Peers: fixed-grid samplers on the flow schedules hosts offer (the "simple" shifted schedule and Karras).
PEERS = ("diffusers_deis_3+simple", "diffusers_unipc_3+simple", "dpmpp_2m+simple", "dpmpp_3m+simple", "euler+simple",
         "dpmpp_2m+karras")
#: The options ``ado_before`` runs with.
BEFORE = {"prediction": "data", "flow_shift": None}
DEFAULT_OUT = Path("docs/bench/flow_plan")


def measure_testbed(name: str, nfes, seeds, peers, reference_steps: int | None = None, cfg: float = 1.0) -> dict:
    """RMSE to the reference of ``ado``, ``ado_before`` (and ``unguided_rule`` when ``cfg`` ≠ 1) and each peer on
    flow testbed ``name`` at CFG ``cfg`` for each budget in ``nfes``, over ``seeds``.  Returns {"testbed", "cfg",
    "reference_steps", "rows": [{"nfe", "ado", "ado_before", ["unguided_rule"], "peers": {name: rmse},
    "best_peer", "best_peer_rmse"}]}."""
    from .. import sample_adaptive
    from ..sampler import FEW_STEP_BUDGET
    from .metrics import rmse
    from .run import host_sigmas
    steps = int(reference_steps or REFERENCE_STEPS.get(name, 128))
    config, tb, x, ref = config_and_reference(name, "flow", cfg, seeds, steps)
    rows = []
    for n in nfes:
        grid = host_sigmas(tb, n)
        row = {"nfe": int(n),
               "ado": rmse(sample_adaptive(tb, x, grid, nfe_budget=n, model_type="flow"), ref),
               "ado_before": rmse(sample_adaptive(tb, x, grid, nfe_budget=n, model_type="flow", **BEFORE), ref),
               "peers": {}}
        if float(cfg) != 1.0:
            forced = {"prediction": "hybrid", "flow_shift": tb.shift if n <= FEW_STEP_BUDGET else None}
            row["unguided_rule"] = rmse(sample_adaptive(tb, x, grid, nfe_budget=n, model_type="flow", **forced), ref)
        add_peers(row, peers, tb, x, n, ref)
        rows.append(row)
    return {"testbed": config.key, "cfg": float(cfg), "reference_steps": steps if config.trained else None,
            "rows": rows}


def config_and_reference(name: str, model_type: str, cfg: float, seeds, reference_steps: int):
    """(config, testbed, noise, reference) of testbed ``name`` as ``model_type`` at CFG ``cfg`` over ``seeds``, the
    reference a λ-uniform solve of ``reference_steps`` steps (exact on the analytic testbeds), as the policy
    measurements make them (:func:`adaptive_core.tune.policy_env.noise_and_reference`, cached in build/)."""
    from ..tune.policy_env import (
        Config,
        make_config_testbed,
        noise_and_reference,
        set_config_labels,
    )
    config = Config(name, model_type, float(cfg))
    tb = make_config_testbed(config)
    set_config_labels(config, tb, seeds)
    x, ref = noise_and_reference(config, tb, seeds, reference_steps)
    return config, tb, x, ref


def add_peers(row: dict, peers, tb, x, nfe: int, ref) -> None:
    """Run each of ``peers`` at ``nfe`` calls from ``x`` on ``tb``; put their RMSE to ``ref`` in ``row["peers"]``
    and the best of them in ``row["best_peer"]``, ``row["best_peer_rmse"]``."""
    from .metrics import rmse
    from .run import run_method
    for peer in peers:
        out, _ = run_method(peer, tb, x, nfe)
        row["peers"][peer] = rmse(out, ref)
    if row["peers"]:
        row["best_peer"], row["best_peer_rmse"] = min(row["peers"].items(), key=lambda kv: kv[1])


def _job(job) -> dict:
    """:func:`measure_testbed` in a worker process of one thread."""
    torch.set_num_threads(1)
    name, nfes, seeds, peers, cfg = job
    return measure_testbed(name, nfes, seeds, peers, cfg=cfg)


def geometric_mean(values) -> float:
    """exp(mean(log v)) of positive values."""
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def ratio_summary(cells, above: float = 1.0) -> dict:
    """Summary of ``cells`` [(ratio, *where)]: geometric mean, worst and best ratio, where the worst is, the count
    of cells and of those above ``above`` (key ``cells_above_<above>``)."""
    worst = max(cells)
    return {"geomean": geometric_mean(v[0] for v in cells), "worst": worst[0], "worst_cell": list(worst[1:]),
            "best": min(cells)[0], "cells": len(cells), f"cells_above_{above:g}": sum(v[0] > above for v in cells)}


def summary(results: dict) -> dict:
    """Geometric means and worst cells of ado / ado_before and ado / best peer over the unguided rows (and per
    regime), and of the unguided rule forced on guided rows / ado_before ("guided_unguided_rule_vs_before")."""
    from ..sampler import FEW_STEP_BUDGET
    out = {}
    unguided = [t for t in results["testbeds"] if t.get("cfg", 1.0) == 1.0]
    guided = [t for t in results["testbeds"] if t.get("cfg", 1.0) != 1.0]
    for key, num, den, tbs in (("vs_before", "ado", "ado_before", unguided),
                               ("vs_best_peer", "ado", "best_peer_rmse", unguided),
                               ("guided_unguided_rule_vs_before", "unguided_rule", "ado_before", guided)):
        cells = [(r[num] / r[den], t["testbed"], r["nfe"]) for t in tbs for r in t["rows"] if den in r and num in r]
        if not cells:
            continue
        few = [c for c in cells if c[2] <= FEW_STEP_BUDGET]
        more = [c for c in cells if c[2] > FEW_STEP_BUDGET]
        out[key] = {"geomean": geometric_mean(c[0] for c in cells),
                    "geomean_few_step": geometric_mean(c[0] for c in few) if few else None,
                    "geomean_more_steps": geometric_mean(c[0] for c in more) if more else None,
                    "worst": max(cells)[0], "worst_cell": list(max(cells)[1:]), "cells": len(cells),
                    "cells_above_1": sum(c[0] > 1 for c in cells), "cells_at_most_0.8": sum(c[0] <= 0.8 for c in cells)}
    return out


def markdown(results: dict) -> str:
    """The report: how to reproduce, the summary, and one table per testbed."""
    meta, summ = results["meta"], results["summary"]
    intro = (f"`{meta['command']}` ({meta['seconds']:.0f} s on {meta['machine']}, torch {meta['torch']}; seeds "
             f"{meta['seeds'][0]}–{meta['seeds'][1] - 1}). RMSE to the reference over all pixels of all images "
             "(analytic testbeds: exact; trained networks: a λ-uniform solve with the steps shown). `ado` is ADO "
             "as shipped, `before` the same with `prediction=\"data\", flow_shift=None` (the ρ plan in data "
             "prediction, as before), the peers are fixed-grid samplers on the same noises.")
    lines = ["# Flow models: the few-step shifted-time plan and hybrid prediction", "", intro, ""]
    guided_label = "Guided runs (CFG 2), the unguided rule forced / before (ADO keeps the plan before on them)"
    for key, label in (("vs_before", "ADO / before, unguided runs"), ("vs_best_peer", "ADO / best peer, unguided runs"),
                       ("guided_unguided_rule_vs_before", guided_label)):
        if key in summ:
            s = summ[key]
            lines.append(f"- **{label}**: geometric mean {s['geomean']:.3f} over {s['cells']} cells "
                         f"({s['geomean_few_step']:.3f} at ≤ 10 NFE, "
                         + (f"{s['geomean_more_steps']:.3f} above" if s["geomean_more_steps"] else "none above")
                         + f"); worst {s['worst']:.3f} ({s['worst_cell'][0]}, {s['worst_cell'][1]} NFE); "
                         f"{s['cells_above_1']} cells above 1, {s['cells_at_most_0.8']} at ≤ 0.8.")
    for t in results["testbeds"]:
        ref = f", reference {t['reference_steps']} steps" if t["reference_steps"] else ", exact reference"
        forced = any("unguided_rule" in r for r in t["rows"])
        lines += ["", f"## {t['testbed']}{ref}", "",
                  "| NFE | ado | before | ado / before | " + ("unguided rule forced / before | " if forced else "")
                  + "best peer | ado / best peer |", "|---|---|---|---|---|---|" + ("---|" if forced else "")]
        for r in t["rows"]:
            peer = (f"{r['best_peer']} {r['best_peer_rmse']:.4g} | {r['ado'] / r['best_peer_rmse']:.3f}"
                    if "best_peer" in r else "– | –")
            rule = f"{r['unguided_rule'] / r['ado_before']:.3f} | " if forced else ""
            lines.append(f"| {r['nfe']} | {r['ado']:.4g} | {r['ado_before']:.4g} | {r['ado'] / r['ado_before']:.3f} "
                         f"| {rule}{peer} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Two panels against NFE, one line per unguided testbed: ado / before and ado / best peer (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (den, title) in zip(axes, (("ado_before", "ADO / ADO before (ρ plan, data prediction)"),
                                       ("best_peer_rmse", "ADO / best peer at the same NFE"))):
        for t in (t for t in results["testbeds"] if t.get("cfg", 1.0) == 1.0):   # guided runs: ado is before
            rows = [r for r in t["rows"] if den in r]
            if rows:
                ax.plot([r["nfe"] for r in rows], [r["ado"] / r[den] for r in rows], marker="o", label=t["testbed"])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model calls (NFE)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("RMSE ratio (< 1: ADO as shipped is better)")
    if axes[1].get_lines()[:-1]:   # testbed lines besides the reference at 1 (none without peers)
        axes[1].legend(fontsize=7)
    elif axes[0].get_lines()[:-1]:
        axes[0].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    """CLI entry point (see the module docstring): measure, then write the JSON, the table and the plot."""
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.bench.flow_plan", description=__doc__.split("\n")[0])
    ap.add_argument("--testbeds", nargs="+", default=list(TESTBEDS))
    ap.add_argument("--cfg", nargs="+", type=float, default=[1.0, 2.0],
                    help="CFG scales of the class-conditional networks (the others run at 1)")
    ap.add_argument("--nfe", nargs="+", type=int, default=[5, 8, 10, 15, 20, 30])
    add_run_arguments(ap, DEFAULT_OUT, '"default", "none" or peer names')
    args = ap.parse_args(argv)
    from ..testbeds import TESTBED_NAMES, TRAINED_TESTBED_NAMES
    unknown = [t for t in args.testbeds if t not in (*TESTBED_NAMES, *TRAINED_TESTBED_NAMES)]
    if unknown:
        ap.error(f"unknown testbed(s) {unknown}")
    if args.seeds < 1 or any(n < 1 for n in args.nfe):
        ap.error("--seeds and every --nfe must be at least 1")
    peers = list(PEERS) if args.peers == ["default"] else [] if args.peers == ["none"] else list(args.peers)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    from ..testbeds import CONDITIONAL_TESTBED_NAMES
    jobs = [(name, args.nfe, seeds, peers, cfg) for name in args.testbeds
            for cfg in (args.cfg if name in CONDITIONAL_TESTBED_NAMES else [1.0])]
    t0 = time.time()
    measured = run_jobs(_job, jobs, args.jobs, "flow testbeds", "testbed")
    results = {"meta": report_meta("flow_plan", argv, seeds, min(args.jobs, len(jobs)), t0, nfe=list(args.nfe),
                                   peers=peers),
               "testbeds": measured}
    results["summary"] = summary(results)
    write_outputs(results, args.out, markdown, plot)
    return 0


def add_run_arguments(ap: argparse.ArgumentParser, default_out: Path, peers_help: str) -> None:
    """The options these reports share: ``--seeds`` (64), ``--first-seed`` (30000), ``--peers``, ``--jobs`` (2) and
    ``--out`` (the path stem of the files written)."""
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--first-seed", type=int, default=30000)
    ap.add_argument("--peers", nargs="+", default=["default"], help=peers_help)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=default_out, help="path stem of the .json, .md and .png written")


def run_jobs(job, jobs: list, processes: int, desc: str, unit: str) -> list:
    """``[job(j) for j in jobs]``, in ``processes`` worker processes when more than one (and more than one job), with
    a progress bar."""
    from tqdm.auto import tqdm
    if processes > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(processes, len(jobs))) as pool:
            return list(tqdm(pool.map(job, jobs), total=len(jobs), desc=desc, unit=unit))
    return [job(j) for j in tqdm(jobs, desc=desc, unit=unit)]


def report_meta(module: str, argv, seeds: list, processes: int, started: float, **fields) -> dict:
    """The ``meta`` block of a report: the command that ran it (``python -m adaptive_core.bench.<module>`` and
    ``argv``, or the process's own arguments), the seed range, ``fields``, the torch version, the seconds since
    ``started`` and the machine (``processes`` worker processes of one thread each)."""
    return {"command": f"python -m adaptive_core.bench.{module} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seeds": [seeds[0], seeds[-1] + 1], **fields, "torch": torch.__version__, "seconds": time.time() - started,
            "machine": f"{platform.machine()}, {processes} process(es) of 1 thread"}


def save_figure(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (creating its folder) at the reports' resolution, and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out: Path, markdown, plot) -> None:
    """Write ``results`` to ``<out>.json``, ``markdown(results)`` to ``<out>.md`` (and print it) and
    ``plot(results, <out>.png)``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    plot(results, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
