"""``python -m adaptive_core.tune policy-eval``: measure a step policy against the heuristic controller and the
benchmark's best peer on held-out seeds (docs/policy/README.md).

Per testbed and NFE: RMSE to the reference (pooled over the held-out seeds, as the benchmark) of ADO with the
heuristic controller and with the policy, the policy's mean NFE, the best peer of the committed benchmark
(``docs/bench/results.json``; for the trained UNet ``docs/bench/trained/results.json``, per model type and CFG)
re-run on the same held-out seeds, and the benchmark's oracle fixed schedule (analytic testbeds; its own seeds:
the ratio is indicative).  Also the policy's latency per decision on this CPU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def decision_latency_us(policy, repeats: int = 3000) -> float:
    """Median wall time of one ``policy.decide`` on one observation row (µs): fallback check + ONNX actor."""
    from ..policy import N_OBSERVATIONS
    obs = np.zeros((1, N_OBSERVATIONS), np.float32)
    obs[0] = policy._mean
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        policy.decide(obs)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


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
            cfg_scales=None, reference_steps: int | None = None) -> dict:
    """The numbers of the module docstring, as a dict."""
    from ..bench.metrics import rmse
    from ..bench.run import best_peer, run_method
    from ..policy import load_policy
    from .policy_env import TRAINED_CFG_SCALES, TRAINED_REFERENCE_STEPS, class_labels, configs_of, evaluate_controller
    cfg_scales = TRAINED_CFG_SCALES if cfg_scales is None else tuple(cfg_scales)
    reference_steps = TRAINED_REFERENCE_STEPS if reference_steps is None else int(reference_steps)
    policy = load_policy(policy_path)
    bench = json.loads(bench_results.read_text())["configs"] if bench_results and bench_results.is_file() else {}
    bench = {**bench, **trained_bench_peers(trained_bench)}
    refs: dict = {}
    kw = dict(cfg_scales=cfg_scales, reference_steps=reference_steps)
    heur = evaluate_controller(None, specs, nfes, seeds, refs, **kw)
    pol = evaluate_controller(f"policy:{policy_path}", specs, nfes, seeds, refs, **kw)
    rows = []
    for config in configs_of(specs, cfg_scales):
        key = config.key
        tb, x, ref = refs[key]
        if config.trained:
            tb.set_labels(class_labels(seeds))
        for n in nfes:
            row = {"testbed": key, "nfe": n, "heuristic": heur[key][n]["rmse"], "policy": pol[key][n]["rmse"],
                   "policy_mean_nfe": pol[key][n]["nfe"]}
            row["policy_vs_heuristic"] = row["policy"] / row["heuristic"]
            cfg = bench.get(key)
            peer = best_peer(cfg, n) if cfg else None
            if peer is not None:
                out, used = run_method(peer[0], tb, x, n)
                row.update(best_peer=peer[0], best_peer_rmse=rmse(out, ref), best_peer_nfe=used)
                row["policy_vs_best_peer"] = row["policy"] / row["best_peer_rmse"]
            oracle = (cfg or {}).get("methods", {}).get("oracle", {}).get(str(n))
            if oracle is not None:
                row["bench_oracle_rmse"] = oracle["rmse"]
                row["policy_vs_bench_oracle"] = row["policy"] / oracle["rmse"]
            rows.append(row)
    return {"policy": str(policy_path), "seeds": [seeds.start, seeds.stop], "rows": rows,
            "reference_steps_trained": reference_steps, "trained_on": policy.manifest.trained_on, "latency_us_per_decision": decision_latency_us(policy),
            "train_seconds": policy.manifest.metrics.get("train_seconds"), "torch": torch.__version__}


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "–"


def markdown(res: dict) -> str:
    """The measurement as a markdown table."""
    trained = set(res["trained_on"].get("configurations", res["trained_on"].get("testbeds", [])))
    lines = ["| testbed | in training | NFE | heuristic | policy (mean NFE) | policy / heuristic | best peer (same seeds) "
             "| policy / best peer | policy / bench oracle |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        peer = f"{r['best_peer']} {r['best_peer_rmse']:.4g}" if "best_peer" in r else "–"
        lines.append(f"| {r['testbed']} | {'yes' if r['testbed'] in trained else '**no (left out)**'} | {r['nfe']} | "
                     f"{r['heuristic']:.4g} | {r['policy']:.4g} ({r['policy_mean_nfe']:.2f}) | "
                     f"{r['policy_vs_heuristic']:.3f} | {peer} | {_ratio(r, 'policy_vs_best_peer')} | "
                     f"{_ratio(r, 'policy_vs_bench_oracle')} |")
    return "\n".join(lines)


def main(argv) -> int:
    """Parse arguments, measure, print the table, write JSON."""
    from .policy_train import DEFAULT_TESTBEDS, parse_specs
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, required=True, help="policy manifest (.json)")
    ap.add_argument("--testbeds", default=DEFAULT_TESTBEDS)
    ap.add_argument("--cfg", default="1,2", help="CFG scales of the trained testbeds (comma-separated)")
    ap.add_argument("--reference-steps", type=int, default=128,
                    help="steps of a trained testbed's reference solve (128: 0.007 RMS from the 512-step solve on "
                         "mnist_unet-ve CFG 2, where ADO at 10 NFE is 0.12 away; cached in build/)")
    ap.add_argument("--nfes", default="5,8,10")
    ap.add_argument("--seeds", type=int, default=64, help="held-out noise seeds 30000..30000+N (not used in training "
                                                          "or in its periodic evaluation)")
    ap.add_argument("--bench", type=Path, default=REPO / "docs" / "bench" / "results.json")
    ap.add_argument("--trained-bench", type=Path, default=REPO / "docs" / "bench" / "trained" / "results.json")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.policy, parse_specs(args.testbeds), [int(n) for n in args.nfes.split(",")],
                  range(30000, 30000 + args.seeds), args.bench, args.trained_bench,
                  [float(c) for c in args.cfg.split(",")], args.reference_steps)
    print(markdown(res))
    print(f"latency per decision: {res['latency_us_per_decision']:.1f} µs; training time: {res['train_seconds']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


__all__ = ["decision_latency_us", "main", "markdown", "measure", "trained_bench_peers"]
