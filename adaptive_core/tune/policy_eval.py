"""``python -m adaptive_core.tune policy-eval``: measure a step policy against the heuristic controller and the
benchmark's best peer on held-out seeds (docs/policy/README.md).

Per testbed and NFE: RMSE to the reference (pooled over the held-out seeds, as the benchmark) of ADO with the
heuristic controller and with the policy, the policy's mean NFE, the best peer of the committed benchmark
(``docs/bench/results.json``) re-run on the same held-out seeds, and the benchmark's oracle fixed schedule
(its own seeds: the ratio is indicative).  Also the policy's latency per decision on this CPU.
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


def measure(policy_path: Path, specs, nfes, seeds, bench_results: Path | None) -> dict:
    """The numbers of the module docstring, as a dict."""
    from ..bench.metrics import rmse
    from ..bench.run import best_peer, run_method
    from ..policy import load_policy
    from ..testbeds import make_testbed
    from .policy_env import evaluate_controller
    policy = load_policy(policy_path)
    bench = json.loads(bench_results.read_text())["configs"] if bench_results and bench_results.is_file() else {}
    refs: dict = {}
    heur = evaluate_controller(None, specs, nfes, seeds, refs)
    pol = evaluate_controller(f"policy:{policy_path}", specs, nfes, seeds, refs)
    rows = []
    for name, mt in specs:
        key = f"{name}-{mt}"
        tb = make_testbed(name, mt)
        x, ref = refs[(name, mt)]
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
            "trained_on": policy.manifest.trained_on, "latency_us_per_decision": decision_latency_us(policy),
            "train_seconds": policy.manifest.metrics.get("train_seconds"), "torch": torch.__version__}


def markdown(res: dict) -> str:
    """The measurement as a markdown table."""
    trained = set(res["trained_on"].get("testbeds", []))
    lines = ["| testbed | in training | NFE | heuristic | policy (mean NFE) | policy / heuristic | best peer (same seeds) "
             "| policy / best peer | policy / bench oracle |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        peer = f"{r['best_peer']} {r['best_peer_rmse']:.4g}" if "best_peer" in r else "–"
        lines.append(f"| {r['testbed']} | {'yes' if r['testbed'] in trained else '**no (left out)**'} | {r['nfe']} | "
                     f"{r['heuristic']:.4g} | {r['policy']:.4g} ({r['policy_mean_nfe']:.2f}) | "
                     f"{r['policy_vs_heuristic']:.3f} | {peer} | {r.get('policy_vs_best_peer', float('nan')):.3f} | "
                     f"{r.get('policy_vs_bench_oracle', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv) -> int:
    """Parse arguments, measure, print the table, write JSON."""
    from .policy_train import parse_specs
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, required=True, help="policy manifest (.json)")
    ap.add_argument("--testbeds", default="gaussian:ve,gaussian:flow,gmm_digits:ve,gmm_digits:flow")
    ap.add_argument("--nfes", default="5,8,10")
    ap.add_argument("--seeds", type=int, default=64, help="held-out noise seeds 30000..30000+N (not used in training "
                                                          "or in its periodic evaluation)")
    ap.add_argument("--bench", type=Path, default=REPO / "docs" / "bench" / "results.json")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.policy, parse_specs(args.testbeds), [int(n) for n in args.nfes.split(",")],
                  range(30000, 30000 + args.seeds), args.bench)
    print(markdown(res))
    print(f"latency per decision: {res['latency_us_per_decision']:.1f} µs; training time: {res['train_seconds']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


__all__ = ["decision_latency_us", "main", "markdown", "measure"]
