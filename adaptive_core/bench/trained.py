"""ADO vs peers on the bundled trained MNIST denoisers: RMSE to a reference solve and FD vs NFE.

``python -m adaptive_core.bench.trained [--model-type ve flow] [--cfg 1.0 2.0] [--samples 200] [--nfe ...]
[--peers default|all|NAME ...]``

Same noises and labels (cycling through the ten digits) for every sampler.  Writes a markdown table per model
type and CFG scale, the raw JSON and an FD/RMSE-vs-NFE plot under ``--out`` (default ``docs/bench/trained``),
and reports the NFE at which each sampler comes within 5% of the FD of DPM-Solver++(2M)+Karras at 30 NFE.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from ..testbeds import make_testbed
from .fd import sample_quality
from .metrics import median_sample_rmse, rmse
from .peers import peer_names
from .run import FULL_NFE, run_method

#: Peers run by default (the whole list of :func:`~adaptive_core.bench.peers.peer_names` costs ~4x more
#: UNet time): the multistep solvers that were best on the analytic benchmark, on each model type's usual
#: schedules, plus Euler and Heun as the common baselines.
DEFAULT_PEERS = {"ve": ("dpmpp_2m+karras", "dpmpp_2m+exponential", "dpmpp_3m+karras", "diffusers_unipc_3+karras",
                        "diffusers_deis_3+karras", "euler+karras", "heun+karras"),
                 "flow": ("dpmpp_2m+karras", "dpmpp_2m+simple", "dpmpp_3m+karras", "diffusers_unipc_3+karras",
                          "diffusers_deis_3+simple", "euler+simple", "heun+simple")}
TARGET = ("dpmpp_2m+karras", 30)
TABLE_NFE = (5, 8, 10, 15)


def peers_for(model_type: str, choice: list[str]) -> tuple[str, ...]:
    """The peer list for ``--peers``: "default" (:data:`DEFAULT_PEERS`), "all", or explicit names."""
    if choice == ["default"]:
        return DEFAULT_PEERS[model_type]
    if choice == ["all"]:
        return tuple(peer_names(model_type))
    unknown = sorted(set(choice) - set(peer_names(model_type)))
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown} for {model_type}; known: {peer_names(model_type)}")
    return tuple(choice)


def run(model_type: str, cfg: float, samples: int, nfes, reference_steps: int, peers, progress) -> dict:
    """All samplers at all NFE on one trained model; returns {method: {nfe: metrics}} plus the reference's FD."""
    tb = make_testbed("mnist_unet", model_type, cfg_scale=cfg)
    labels = torch.arange(samples) % 10
    tb.set_labels(labels)
    x = tb.noise(range(samples), dtype=torch.float32)
    ref = tb.solve(x, reference_steps)
    res = {"reference": sample_quality(ref, labels), "methods": {}}
    progress.update(1)
    for method in ("ado",) + tuple(peers):
        for nfe in nfes:
            out, used = run_method(method, tb, x, nfe)
            q = sample_quality(out, labels)
            res["methods"].setdefault(method, {})[str(nfe)] = {
                "rmse": rmse(out, ref), "median_rmse": median_sample_rmse(out, ref), "fd": q["fd"],
                "class_agreement": q["class_agreement"], "confidence": q["confidence"], "nfe_used": used}
            progress.update(1)
    return res


def nfe_within(rows: dict, target_fd: float, tolerance: float = 0.05) -> int | None:
    """Smallest NFE whose FD is within ``tolerance`` (relative) of ``target_fd``, or None."""
    hits = [int(n) for n, r in rows.items() if r["fd"] <= target_fd * (1 + tolerance)]
    return min(hits) if hits else None


def best_peer(res: dict, nfe: int, key: str) -> tuple[str, float]:
    """The peer with the lowest ``key`` at ``nfe`` and its value."""
    peers = {m: rows[str(nfe)][key] for m, rows in res["methods"].items() if m != "ado" and str(nfe) in rows}
    name = min(peers, key=peers.get)
    return name, peers[name]


def fd_turn(rows: dict) -> int | None:
    """The NFE after which the FD stops improving: the smallest NFE whose FD no larger NFE beats by > 2%."""
    ns = sorted(int(n) for n in rows)
    for i, n in enumerate(ns):
        if all(rows[str(m)]["fd"] >= rows[str(n)]["fd"] * 0.98 for m in ns[i + 1:]):
            return n
    return None


def report(results: dict) -> list[str]:
    """The markdown report: per model type and CFG, the full table, ADO vs best peer, and the 5% NFE."""
    meta = results["meta"]
    nfes = meta["nfe"]
    lines = [f"# Trained MNIST denoisers: ADO vs peers ({meta['samples']} samples)", "",
             f"Command: `{meta['command']}` ({meta['seconds'] / 60:.0f} min on {meta['machine']}). RMSE to a "
             f"{meta['reference_steps']}-step λ-uniform solve of the same ODE (mean over the pixels of all samples; "
             "median of the per-sample RMSE in the JSON); FD to the 1000 held-out test digits in the bundled "
             "classifier's features (biased upwards at this sample count: compare within a table; the FD of the "
             "reference solve is the floor).  *FD turns* = the NFE after which more steps no longer lower the FD "
             "by more than 2%.", ""]
    for key, res in results["runs"].items():
        target = res["methods"][TARGET[0]][str(TARGET[1])]["fd"]
        lines += [f"## mnist_unet-{key}", "",
                  f"FD of the reference solve: {res['reference']['fd']:.2f}; target FD ({TARGET[0]} at {TARGET[1]} "
                  f"NFE): {target:.2f}.", "",
                  "| method | " + " | ".join(f"{n}" for n in nfes) + " | FD within 5% of target at NFE | FD turns at |",
                  "|---|" + "---|" * (len(nfes) + 2)]
        for method, rows in res["methods"].items():
            cells = [f"{rows[str(n)]['rmse']:.4f} / {rows[str(n)]['fd']:.1f}" for n in nfes]
            name = f"**{method}**" if method == "ado" else method
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {nfe_within(rows, target)} | {fd_turn(rows)} |")
        lines += ["", "Cells: RMSE / FD.", "", "| NFE | ADO RMSE | best peer (RMSE) | ratio | ADO FD | best peer (FD) | "
                  "ratio |", "|---|---|---|---|---|---|---|"]
        for n in TABLE_NFE:
            if str(n) not in res["methods"]["ado"]:
                continue
            a = res["methods"]["ado"][str(n)]
            (pr, vr), (pf, vf) = best_peer(res, n, "rmse"), best_peer(res, n, "fd")
            lines.append(f"| {n} | {a['rmse']:.4f} | {pr} ({vr:.4f}) | {a['rmse'] / vr:.2f} | {a['fd']:.2f} | "
                         f"{pf} ({vf:.2f}) | {a['fd'] / vf:.2f} |")
        lines.append("")
    lines.append("![FD and RMSE vs NFE](fd_vs_nfe.png)")
    return lines


def main(argv=None) -> int:
    """CLI (see the module docstring)."""
    import platform

    ap = argparse.ArgumentParser(prog="python -m adaptive_core.bench.trained", description=__doc__.split("\n")[0])
    ap.add_argument("--model-type", nargs="+", default=["ve", "flow"], choices=["ve", "flow"])
    ap.add_argument("--cfg", nargs="+", type=float, default=[1.0, 2.0], help="classifier-free guidance scales")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--nfe", nargs="+", type=int, default=list(FULL_NFE))
    ap.add_argument("--peers", nargs="+", default=["default"], help='"default", "all" or peer names')
    ap.add_argument("--reference-steps", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/trained"))
    ap.add_argument("--from-json", type=Path, help="re-render the report and plot from a results.json")
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        if args.samples < 2 or any(c < 0 for c in args.cfg) or any(n < 1 for n in args.nfe):
            ap.error("need --samples ≥ 2, --cfg ≥ 0 and --nfe ≥ 1")
        from tqdm.auto import tqdm
        nfes = sorted(set(args.nfe) | {TARGET[1]})
        peers = {m: peers_for(m, args.peers) if TARGET[0] in peers_for(m, args.peers) else
                 (TARGET[0],) + peers_for(m, args.peers) for m in args.model_type}
        t0 = time.time()
        results = {"meta": {"command": "python -m adaptive_core.bench.trained " + " ".join(argv or []),
                            "cfg": args.cfg, "samples": args.samples, "nfe": nfes,
                            "reference_steps": args.reference_steps,
                            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}, "runs": {}}
        total = sum(1 + len(nfes) * (1 + len(peers[m])) for m in args.model_type) * len(args.cfg)
        with warnings.catch_warnings(), tqdm(total=total, desc="trained bench", unit="run") as bar:
            warnings.simplefilter("ignore")
            for model_type in args.model_type:
                for cfg in args.cfg:
                    results["runs"][f"{model_type}, CFG {cfg:g}"] = run(model_type, cfg, args.samples, nfes,
                                                                         args.reference_steps, peers[model_type], bar)
        results["meta"]["seconds"] = time.time() - t0
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = report(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    _plot(results, args.out / "fd_vs_nfe.png")
    print("\n".join(lines))
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 7.5), squeeze=False)
    for col, (key, res) in enumerate(runs.items()):
        for row, metric in enumerate(("fd", "rmse")):
            ax = axes[row, col]
            for method, rows in res["methods"].items():
                xs = sorted(int(n) for n in rows)
                ax.plot(xs, [rows[str(n)][metric] for n in xs], marker="o", ms=3,
                        lw=2.2 if method == "ado" else 1, color="red" if method == "ado" else None, label=method)
            if metric == "fd":
                ax.axhline(res["reference"]["fd"], color="gray", ls=":", label="reference solve")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE")
            ax.set_ylabel({"fd": "FD to held-out digits", "rmse": "RMSE to reference"}[metric])
            ax.set_title(f"mnist_unet-{key}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
