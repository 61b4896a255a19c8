"""ADO vs peers on the bundled trained MNIST denoisers: RMSE to a reference solve and FD vs NFE.

``python -m adaptive_core.bench.trained [--model-type ve flow] [--cfg 2.0] [--samples 400] [--nfe ...]``

Same noises and labels (cycling through the ten digits) for every sampler.  Writes a markdown table, the
raw JSON and an FD-vs-NFE plot under ``--out`` (default ``docs/bench/trained``), and reports the NFE at
which each sampler comes within 5% of the FD of DPM-Solver++(2M)+Karras at 30 NFE.
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
from .metrics import rmse
from .run import run_method

PEERS = {"ve": ("dpmpp_2m+karras", "dpmpp_3m+karras", "diffusers_deis_3+karras"),
         "flow": ("dpmpp_2m+karras", "dpmpp_2m+simple", "diffusers_deis_3+simple")}
TARGET = ("dpmpp_2m+karras", 30)


def run(model_type: str, cfg: float, samples: int, nfes, reference_steps: int, progress) -> dict:
    """All samplers at all NFE on one trained model; returns {method: {nfe: metrics}} plus the reference's FD."""
    tb = make_testbed("mnist_unet", model_type, cfg_scale=cfg)
    labels = torch.arange(samples) % 10
    tb.set_labels(labels)
    x = tb.noise(range(samples), dtype=torch.float32)
    ref = tb.solve(x, reference_steps)
    res = {"reference": sample_quality(ref, labels), "methods": {}}
    progress.update(1)
    for method in ("ado",) + PEERS[model_type]:
        for nfe in nfes:
            out = run_method(method, tb, x, nfe)[0]
            q = sample_quality(out, labels)
            res["methods"].setdefault(method, {})[str(nfe)] = {"rmse": rmse(out, ref), "fd": q["fd"],
                                                               "class_agreement": q["class_agreement"]}
            progress.update(1)
    return res


def nfe_within(rows: dict, target_fd: float, tolerance: float = 0.05) -> int | None:
    """Smallest NFE whose FD is within ``tolerance`` (relative) of ``target_fd``, or None."""
    hits = [int(n) for n, r in rows.items() if r["fd"] <= target_fd * (1 + tolerance)]
    return min(hits) if hits else None


def main(argv=None) -> int:
    """CLI (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.bench.trained", description=__doc__.split("\n")[0])
    ap.add_argument("--model-type", nargs="+", default=["ve", "flow"], choices=["ve", "flow"])
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--nfe", nargs="+", type=int, default=[5, 8, 10, 15, 20, 30])
    ap.add_argument("--reference-steps", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/trained"))
    args = ap.parse_args(argv)
    from tqdm.auto import tqdm
    nfes = sorted(set(args.nfe) | {TARGET[1]})
    t0 = time.time()
    results = {"meta": {"command": "python -m adaptive_core.bench.trained " + " ".join(argv or []), "cfg": args.cfg,
                        "samples": args.samples, "nfe": nfes, "reference_steps": args.reference_steps},
               "models": {}}
    total = sum(1 + len(nfes) * (1 + len(PEERS[m])) for m in args.model_type)
    with warnings.catch_warnings(), tqdm(total=total, desc="trained bench", unit="run") as bar:
        warnings.simplefilter("ignore")
        for model_type in args.model_type:
            results["models"][model_type] = run(model_type, args.cfg, args.samples, nfes, args.reference_steps, bar)
    results["meta"]["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Trained MNIST denoisers: ADO vs peers (CFG {args.cfg}, {args.samples} samples)", "",
             f"Command: `{results['meta']['command']}`. RMSE to a {args.reference_steps}-step λ-uniform solve of the "
             "same ODE; FD to the held-out digits in the bundled classifier's features (biased upwards at this "
             "sample count: compare within the table).", ""]
    for model_type, res in results["models"].items():
        target = res["methods"][TARGET[0]][str(TARGET[1])]["fd"]
        lines += [f"## mnist_unet-{model_type}", "",
                  f"FD of the reference solve itself: {res['reference']['fd']:.3f}; target FD "
                  f"({TARGET[0]} at {TARGET[1]} NFE): {target:.3f}.", "",
                  "| method | " + " | ".join(f"NFE {n}: RMSE / FD" for n in nfes) + " | NFE within 5% of target FD |",
                  "|---|" + "---|" * (len(nfes) + 1)]
        for method, rows in res["methods"].items():
            cells = [f"{rows[str(n)]['rmse']:.4f} / {rows[str(n)]['fd']:.2f}" for n in nfes]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {nfe_within(rows, target)} |")
        lines.append("")
    lines.append("![FD vs NFE](fd_vs_nfe.png)")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    _plot(results, args.out / "fd_vs_nfe.png")
    print("\n".join(lines))
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = results["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for col, (model_type, res) in enumerate(models.items()):
        for row, key in enumerate(("fd", "rmse")):
            ax = axes[row, col]
            for method, rows in res["methods"].items():
                xs = sorted(int(n) for n in rows)
                ax.plot(xs, [rows[str(n)][key] for n in xs], marker="o", ms=3,
                        lw=2.2 if method == "ado" else 1, color="red" if method == "ado" else None, label=method)
            if key == "fd":
                ax.axhline(res["reference"]["fd"], color="gray", ls=":", label="reference solve")
            ax.set_xscale("log")
            ax.set_yscale("log" if key == "rmse" else "linear")
            ax.set_xlabel("NFE")
            ax.set_ylabel({"fd": "FD to held-out digits", "rmse": "RMSE to reference"}[key])
            ax.set_title(f"mnist_unet-{model_type}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
