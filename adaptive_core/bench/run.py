"""Benchmark: ADO against the peer samplers on the testbeds, same model and same noises, in one run.

For every testbed and model type, every NFE and every method, the outputs from the same seeds are
compared with the reference solution of the probability-flow ODE (RMSE, PSNR).  Writes under ``--out``:
``results.json`` (raw), ``README.md`` (tables with the best peer per column marked, headline ratios) and
``error_vs_nfe.png``; prints the tables.
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

from .. import sample_adaptive
from ..trace import Trace
from ..schedules import karras_sigmas, lambda_uniform_sigmas
from ..testbeds import TESTBED_NAMES, make_testbed
from .metrics import median_sample_rmse, psnr, rmse
from .oracle import optimize_schedule
from .peers import peer_names, run_peer

FULL_NFE = (4, 5, 6, 8, 10, 12, 15, 20, 30)
QUICK_NFE = (5, 8, 10, 20)
HEADLINE_NFE = (5, 8, 10, 20)
MATCH_TARGET_PEER = "dpmpp_2m+karras"
MATCH_TARGET_NFE = (20, 30)


def host_sigmas(testbed, nfe: int) -> torch.Tensor:
    """The grid a host would hand ADO for ``nfe`` steps: Karras (ρ = 7) over the testbed's range, then 0."""
    return karras_sigmas(nfe, testbed.sigma_min, testbed.sigma_max)


def run_method(method: str, testbed, x: torch.Tensor, nfe: int, model=None) -> tuple[torch.Tensor, int]:
    """Run ``method`` with a budget of ``nfe`` model calls; returns (sample, real NFE).

    ``"ado"`` is ADO on the host grid of :func:`host_sigmas`; any other name is a peer of
    :func:`~adaptive_core.bench.peers.run_peer`.  ``model`` (default: the testbed) is the denoiser called;
    the testbed gives the model type and noise range.
    """
    model = testbed if model is None else model
    if method == "ado":
        model.reset_nfe()
        out = sample_adaptive(model, x, host_sigmas(testbed, nfe), nfe_budget=nfe, model_type=testbed.model_type)
        return out, model.nfe
    return run_peer(method, model, x, nfe, model_type=testbed.model_type, sigma_min=testbed.sigma_min,
                    sigma_max=testbed.sigma_max, shift=testbed.shift)


def run_oracle(testbed, x: torch.Tensor, ref: torch.Tensor, nfe: int, fit_count: int,
               jitter: float = 0.0, prediction: str = "auto") -> tuple[torch.Tensor, dict]:
    """ADO's integrator on the best fixed grid for this testbed and NFE (fitted on the first ``fit_count`` seeds);
    with ``jitter`` > 0, the best grid whose gain survives moving its points by that much in λ
    (:func:`~adaptive_core.bench.oracle.optimize_schedule`).  ``prediction``: the integrator's form
    (:func:`~adaptive_core.sampler.resolve_flow_plan`; "auto" is ADO's default for the run).  Returns (samples,
    {"sigmas", "prediction"}) with the form the grid was fitted in, which a replay must use."""
    xs, refs = x[:fit_count], ref[:fit_count]

    def run(sigmas):
        return sample_adaptive(testbed, xs, sigmas, model_type=testbed.model_type, mode="fixed", prediction=prediction)
    # multi-start: ADO's own plan and the two common fixed schedules; keep the best after the search
    starts = [sample_adaptive_plan(testbed, nfe), host_sigmas(testbed, nfe),
              lambda_uniform_sigmas(nfe, testbed.sigma_min, testbed.sigma_max, testbed.model_type)]
    grid = min((optimize_schedule(run, refs, s, testbed.model_type, sweeps=2, iters=8, jitter=jitter)
                for s in starts),
               key=lambda found: found[1])[0]
    trace = Trace()
    out = sample_adaptive(testbed, x, grid, model_type=testbed.model_type, mode="fixed", prediction=prediction,
                          trace=trace)
    return out, {"sigmas": grid.tolist(), "prediction": trace.options["prediction"]}


def sample_adaptive_plan(testbed, nfe: int) -> torch.Tensor:
    """ADO's own plan for this budget as a σ grid (the oracle search starts from it)."""
    from ..trace import Trace, replay_sigmas
    trace = Trace()
    sample_adaptive(testbed, testbed.noise([0]), host_sigmas(testbed, nfe), nfe_budget=nfe,
                    model_type=testbed.model_type, trace=trace)
    return replay_sigmas(trace)


def ado_step_overhead_ms(shape=(1, 4, 128, 128), nfe: int = 20, repeats: int = 15) -> float:
    """ADO's own time per model call, model excluded: a model that returns a stored tensor, best of repeats."""
    x = torch.randn(shape) * 14.6
    fixed = torch.randn(shape) * 0.5

    def model(x_, sigma):
        return fixed
    sigmas = karras_sigmas(nfe, 0.0292, 14.6)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample_adaptive(model, x, sigmas, model_type="ve")
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / nfe


def run_config(name: str, model_type: str, nfes, seeds: int, peers, oracle: bool, oracle_fit: int,
               match_nfes, progress) -> dict:
    """All methods on one testbed/model type; returns a dict of results keyed by method then NFE."""
    testbed = make_testbed(name, model_type)
    x = testbed.noise(range(seeds))
    ref = testbed.reference(x)
    res: dict = {"testbed": testbed.name, "methods": {}, "sigma_min": testbed.sigma_min,
                 "sigma_max": testbed.sigma_max, "shift": testbed.shift}

    def put(method, nfe, out, used, extra=None):
        e = rmse(out, ref)
        res["methods"].setdefault(method, {})[str(nfe)] = {"rmse": e, "psnr": psnr(e), "nfe": used,
                                                           "median_sample_rmse": median_sample_rmse(out, ref),
                                                           **(extra or {})}

    for nfe in sorted(set(nfes) | set(match_nfes)):
        progress.set_postfix_str(f"{testbed.name} ado nfe={nfe}")
        out, used = run_method("ado", testbed, x, nfe)
        put("ado", nfe, out, used)
        progress.update(1)
    for nfe in nfes:
        if oracle:
            progress.set_postfix_str(f"{testbed.name} oracle nfe={nfe}")
            out, extra = run_oracle(testbed, x, ref, nfe, oracle_fit)
            put("oracle", nfe, out, nfe, extra)
        progress.update(1)
        for peer in peers(model_type):
            progress.set_postfix_str(f"{testbed.name} {peer} nfe={nfe}")
            out, used = run_method(peer, testbed, x, nfe)
            put(peer, nfe, out, used)
            progress.update(1)
    return res


def _config_job(job) -> dict:
    """One testbed configuration with its own progress bar (a process-pool task)."""
    from tqdm.auto import tqdm
    name, model_type, nfes, seeds, oracle, oracle_fit, match, position = job
    torch.set_num_threads(1)
    total = len(set(nfes) | set(match)) + len(nfes) * (1 + len(peer_names(model_type)))
    with tqdm(total=total, desc=f"{name}-{model_type}", unit="run", position=position) as progress:
        return run_config(name, model_type, nfes, seeds, peer_names, oracle, oracle_fit, match, progress)


def best_peer(cfg: dict, nfe: int) -> tuple[str, float] | None:
    """The peer with the lowest RMSE at ``nfe`` among those that used at most ``nfe`` model calls."""
    best = None
    for method, rows in cfg["methods"].items():
        if method in ("ado", "oracle"):
            continue
        r = rows.get(str(nfe))
        if r is not None and r["nfe"] <= nfe and (best is None or r["rmse"] < best[1]):
            best = (method, r["rmse"])
    return best


def nfe_to_match(cfg: dict, target: float) -> int | None:
    """Smallest NFE at which ADO's RMSE is ≤ ``target`` (None if no measured budget reaches it)."""
    hits = [int(n) for n, r in cfg["methods"]["ado"].items() if r["rmse"] <= target]
    return min(hits) if hits else None


def headline(cfg: dict, nfes) -> dict:
    """Ratios ADO/best peer and ADO/oracle at the headline NFE, and the NFE ADO needs to match the target peer."""
    out = {}
    ado = cfg["methods"]["ado"]
    for nfe in HEADLINE_NFE:
        if nfe not in nfes:
            continue
        bp = best_peer(cfg, nfe)
        row = {"ado_rmse": ado[str(nfe)]["rmse"], "ado_median": ado[str(nfe)]["median_sample_rmse"]}
        if bp:
            row.update(best_peer=bp[0], best_peer_rmse=bp[1], ratio_to_best_peer=ado[str(nfe)]["rmse"] / bp[1],
                       best_peer_median=cfg["methods"][bp[0]][str(nfe)]["median_sample_rmse"])
        if "oracle" in cfg["methods"]:
            o = cfg["methods"]["oracle"][str(nfe)]["rmse"]
            row.update(oracle_rmse=o, ratio_to_oracle=ado[str(nfe)]["rmse"] / o)
        out[str(nfe)] = row
    target = cfg["methods"].get(MATCH_TARGET_PEER, {})
    for nfe in MATCH_TARGET_NFE:
        if str(nfe) in target:
            out[f"nfe_to_match_{MATCH_TARGET_PEER}@{nfe}"] = nfe_to_match(cfg, target[str(nfe)]["rmse"])
    return out


def markdown_table(cfg: dict, nfes) -> str:
    """One markdown table: rows are methods, columns NFE, cells 'RMSE (PSNR dB)'; best peer per column in bold."""
    best = {nfe: (best_peer(cfg, nfe) or (None,))[0] for nfe in nfes}
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    order = [m for m in ("ado", "oracle") if m in cfg["methods"]] + sorted(
        m for m in cfg["methods"] if m not in ("ado", "oracle"))
    for m in order:
        cells = []
        for nfe in nfes:
            r = cfg["methods"][m].get(str(nfe))
            if r is None:
                cells.append("")
                continue
            c = f"{r['rmse']:.4g} ({r['psnr']:.1f})"
            if r["nfe"] != nfe:
                c += f" [{r['nfe']} NFE]"
            cells.append(f"**{c}**" if m == best[nfe] else c)
        label = {"ado": "**ADO**", "oracle": "oracle (best fixed grid, ADO integrator)"}.get(m, m)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Error vs NFE per testbed (log-log): ADO, oracle, best peer per NFE and a few common peers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfgs = results["configs"]
    cols = 2
    rows = math.ceil(len(cfgs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    shown = ("dpmpp_2m+karras", "dpmpp_3m+karras", "diffusers_unipc_3+karras", "euler+karras", "dpm_adaptive")
    for ax, (key, cfg) in zip(axes.flat, cfgs.items()):
        nfes = sorted(int(n) for n in results["meta"]["nfe"])
        def curve(m):  # plotted at the NFE really used (dpm_adaptive lands where its tolerance takes it)
            pts = sorted({r["nfe"]: r["rmse"] for r in cfg["methods"].get(m, {}).values()}.items())
            return [p[0] for p in pts], [p[1] for p in pts]
        for m in shown:
            if m in cfg["methods"]:
                xs, ys = curve(m)
                ax.plot(xs, ys, "-", lw=1, alpha=0.7, label=m)
        bp = [(n, best_peer(cfg, n)) for n in nfes]
        bp = [(n, b[1]) for n, b in bp if b]
        if bp:
            ax.plot(*zip(*bp), "k--", lw=1.5, label="best peer at each NFE")
        if "oracle" in cfg["methods"]:
            ax.plot(*curve("oracle"), "g:", marker="s", ms=3, lw=1.5, label="oracle fixed grid")
        ax.plot(*curve("ado"), "r-", marker="o", ms=3, lw=2.2, label="ADO")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE (model calls)")
        ax.set_ylabel("RMSE to reference ODE solution")
        ax.set_title(key)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cfgs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> str:
    """Write results.json, README.md and the plot under ``out``; return the markdown text."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    nfes = results["meta"]["nfe"]
    md = ["# Benchmark: ADO vs peer samplers", "",
          f"Command: `{results['meta']['command']}`  ",
          f"Seeds: {results['meta']['seeds']}; torch {results['meta']['torch']}; {results['meta']['machine']}.  ",
          "Cells: RMSE to the reference probability-flow ODE solution from the same noise (PSNR in dB, peak 2). "
          "Best peer per column in **bold** (peers that used more model calls than the column are not eligible; "
          "their real NFE is shown in brackets).  The pooled RMSE is dominated by the few noises whose paths are "
          "most sensitive (on the digits mixture: those that start near a boundary between two components); the "
          "headline also gives the median of the per-sample RMSE.", "",
          f"ADO's own time per model call (model excluded), 4×128×128 latent, batch 1: "
          f"**{results['timing']['ado_ms_per_step']:.3f} ms**.", ""]
    md.append("## Headline")
    md.append("")
    md.append("| testbed | NFE | ADO | best peer | ADO / best peer | oracle | ADO / oracle | median per-sample RMSE: ADO / that peer |")
    md.append("|---|---|---|---|---|---|---|---|")
    for key, cfg in results["configs"].items():
        for nfe, h in cfg["headline"].items():
            if nfe.startswith("nfe_to_match"):
                continue
            md.append(f"| {key} | {nfe} | {h['ado_rmse']:.4g} | {h.get('best_peer', '')} {h.get('best_peer_rmse', float('nan')):.4g} "
                      f"| {h.get('ratio_to_best_peer', float('nan')):.3f} | {h.get('oracle_rmse', float('nan')):.4g} "
                      f"| {h.get('ratio_to_oracle', float('nan')):.3f} "
                      f"| {h['ado_median']:.4g} / {h.get('best_peer_median', float('nan')):.4g} |")
    md.append("")
    for key, cfg in results["configs"].items():
        for k, v in cfg["headline"].items():
            if k.startswith("nfe_to_match"):
                md.append(f"- {key}: NFE ADO needs to match {k.split('_match_')[1]}: {v if v else '> measured range'}")
    md.append("")
    md.append("![error vs NFE](error_vs_nfe.png)")
    md.append("")
    for key, cfg in results["configs"].items():
        md += [f"## {key}", "", markdown_table(cfg, nfes), ""]
    text = "\n".join(md)
    (out / "README.md").write_text(text)
    plot(results, out / "error_vs_nfe.png")
    return text


def main(argv=None) -> int:
    """CLI entry point: ``python -m adaptive_core.bench [--quick] [--testbed ...] [--model-type ...]``."""
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer seeds and budgets, no oracle (< 2 min)")
    ap.add_argument("--testbed", nargs="+", default=list(TESTBED_NAMES), choices=TESTBED_NAMES)
    ap.add_argument("--model-type", nargs="+", default=["ve", "flow"], choices=["ve", "flow"])
    ap.add_argument("--nfe", nargs="+", type=int, default=None, help=f"budgets (default {FULL_NFE})")
    ap.add_argument("--seeds", type=int, default=None, help="noises per testbed (default 256, quick 64)")
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle fixed-schedule search")
    ap.add_argument("--oracle-fit", type=int, default=32, help="seeds used to fit the oracle grid")
    ap.add_argument("--out", type=Path, default=None, help="where to write results (default docs/bench; "
                                                              "quick: no files unless given)")
    ap.add_argument("--jobs", type=int, default=2, help="testbed configurations run in parallel processes")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="re-render README.md and the plot from a results.json without re-running")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        for cfg in results["configs"].values():
            cfg["headline"] = headline(cfg, results["meta"]["nfe"])
        print(write_report(results, args.out or args.from_json.parent))
        return 0

    nfes = tuple(args.nfe) if args.nfe else (QUICK_NFE if args.quick else FULL_NFE)
    if any(n < 2 for n in nfes):
        ap.error("every --nfe must be >= 2")
    seeds = args.seeds or (64 if args.quick else 256)
    oracle = not (args.no_oracle or args.quick)
    match = () if args.quick else tuple(range(4, 31))
    configs = [(t, m) for t in args.testbed for m in args.model_type]
    results = {"meta": {"command": "python -m adaptive_core.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                        "seeds": seeds, "nfe": list(nfes), "torch": torch.__version__,
                        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"},
               "configs": {}}
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only contend; parallelism comes from --jobs
    jobs = [(name, model_type, nfes, seeds, oracle, args.oracle_fit, match, i) for i, (name, model_type)
            in enumerate(configs)]
    if args.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(args.jobs, len(jobs))) as pool:
            cfgs = list(pool.map(_config_job, jobs))
    else:
        cfgs = [_config_job(job) for job in jobs]
    for cfg in cfgs:
        cfg["headline"] = headline(cfg, nfes)
        results["configs"][cfg["testbed"]] = cfg
    torch.set_num_threads(threads)
    results["timing"] = {"ado_ms_per_step": ado_step_overhead_ms(), "bench_seconds": time.time() - t0}
    out = args.out if args.out else (None if args.quick else Path("docs/bench"))
    if out is not None:
        text = write_report(results, out)
    else:
        text = "\n\n".join(f"## {k}\n\n" + markdown_table(c, nfes) for k, c in results["configs"].items())
    print(text)
    print("\nADO / best peer (RMSE ratio, < 1 means ADO is better):")
    for key, cfg in results["configs"].items():
        cells = [f"NFE {n}: {h['ratio_to_best_peer']:.2f} (vs {h['best_peer']})" for n, h in cfg["headline"].items()
                 if not n.startswith("nfe_to_match") and "ratio_to_best_peer" in h]
        print(f"  {key}: " + "; ".join(cells))
    print(f"\nADO overhead per step (4x128x128, batch 1, model excluded): {results['timing']['ado_ms_per_step']:.3f} ms")
    print(f"bench time: {results['timing']['bench_seconds']:.1f} s")
    return 0
